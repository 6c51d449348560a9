"""`PoseConfig`: every setting of landmark detection, camera solve, masks and framing in one place."""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Literal

Framing = Literal["aligned", "landmarks"]
SolvePoints = Literal["mesh_posed", "mesh", "paper5"]
SOLVE_POINTS = ("mesh_posed", "mesh", "paper5")
MESH_SOLVES = ("mesh_posed", "mesh")  # the all-points solves


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
        solve_points: which Face Mesh points the camera solve fits, against which template (median
            rotation error on the faces benchmark, README, "Camera error of the landmark solve"):
            "mesh_posed" = the mean of the plain and the attention Face Mesh's 468 points (two Face
            Mesh runs) against the posed template, whose points move with the pose, solved jointly
            with it (`pose.mesh_template`; 1.9°); "mesh" = the plain Face Mesh's 468 points against
            the fixed mesh template (2.4°); "paper5" = the official code's 5 points (eye and mouth
            corners, nose tip) against the 5-point template (3.3°). Both mesh templates are calibrated
            on renders with known cameras. The Face Detection fallback always uses its 4 points.
        template_path: a 5-point template JSON (e.g. one refined by `python -m pose.fit_template`) for
            `solve_points="paper5"` and the fallback; None = the shipped `pose/data/template.json`.
        mesh_template_path: a 468-point template JSON written by `python -m dataset.mesh_template` for
            the all-points solves (a posed one, `--posed`, for "mesh_posed"); None = the shipped
            `pose/data/mesh_posed_template.json` or `pose/data/mesh_template.json`.
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
    solve_points: SolvePoints = "mesh_posed"
    template_path: str | None = None
    mesh_template_path: str | None = None

    def __post_init__(self) -> None:
        if self.solve_points not in SOLVE_POINTS:
            raise ValueError(f"PoseConfig.solve_points must be one of {SOLVE_POINTS}, "
                             f"got {self.solve_points!r}.")
        if self.template_path is not None and self.solve_points in MESH_SOLVES:
            raise ValueError(
                "PoseConfig.template_path is a 5-point template, which the default all-points solve "
                "(solve_points='mesh_posed' or 'mesh') does not use; set solve_points='paper5' with it, or "
                "pass a 468-point template as mesh_template_path.")

    @classmethod
    def paper(cls) -> PoseConfig:
        """The defaults (the best-measured solve, "mesh_posed"; the paper's own 5-point solve is
        `with_(solve_points="paper5")`)."""
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
