"""`PoseConfig`: every setting of landmark detection, camera solve, masks and framing in one place."""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Literal

Framing = Literal["aligned", "landmarks"]


@dataclass(frozen=True)
class PoseConfig:
    """Settings for `pose` (defaults are the `paper` preset).

    Attributes:
        min_image_side: images whose shorter side is below this (pixels) are rejected by `load_image`.
        max_num_faces: how many faces Face Mesh may return; the largest, most central one is chosen.
        min_detection_confidence: MediaPipe detection confidence for Face Mesh and Face Detection.
        use_face_detection_fallback: when Face Mesh finds nothing, use Face Detection's keypoints.
        focal_factor: default focal length in pixels is `focal_factor × image width` (the official
            code's 512 px at 256²).
        optimise_focal: also solve for the focal length (otherwise it is held at the default).
        max_error_fraction: a fit is accepted when its RMS reprojection error is at most this fraction
            of the image width (0.03 = 7.7 px at 256², about 2 px at 64²).
        crop_scale: for `framing="landmarks"`, the square crop side is `crop_scale ×
            max(2.0 × eye distance, 1.8 × eye-to-mouth distance)` (FFHQ's alignment rule uses 2.0).
        segmentation_model: Selfie Segmentation model: 0 = general (256×256), 1 = landscape.
        template_path: a template JSON to solve against (e.g. one refined by `python -m
            pose.fit_template`); None = the shipped `pose/data/template.json`.
    """

    min_image_side: int = 32
    max_num_faces: int = 4
    min_detection_confidence: float = 0.5
    use_face_detection_fallback: bool = True
    focal_factor: float = 2.0
    optimise_focal: bool = False
    max_error_fraction: float = 0.03
    crop_scale: float = 2.0
    segmentation_model: int = 0
    template_path: str | None = None

    @classmethod
    def paper(cls) -> PoseConfig:
        """The defaults."""
        return cls()

    @classmethod
    def cpu(cls) -> PoseConfig:
        """The same pose settings (pose work is CPU-bound anyway).

        >>> PoseConfig.cpu().focal_factor
        2.0
        """
        return cls()

    def with_(self, **changes) -> PoseConfig:
        """A copy with some fields changed."""
        return replace(self, **changes)
