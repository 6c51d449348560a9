"""`prepare_photo`: one photo → training-resolution image, mask, camera and fit quality."""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import cv2
import numpy as np

from .camera import solve_camera
from .config import Framing, PoseConfig
from .errors import PoseRejectedError
from .framing import aligned_box, crop_and_resize, landmark_box
from .image_io import load_image
from .landmarks import MESH_INDICES, FaceLandmarks, detect_landmarks
from .masks import segment_foreground
from .mesh_template import PosedTemplate, load_posed_template, mean_mesh_points
from .template import MESH_METHOD, MESH_POSED_METHOD, load_template


@dataclass
class PreparedPhoto:
    """A photo ready for the dataset cache (all at the training resolution r).

    Attributes:
        image: (r, r, 3) uint8 RGB.
        mask: (r, r) uint8, 255 = foreground (Selfie Segmentation, soft).
        K: (3, 3) intrinsics at resolution r (focal `focal_factor` × r unless optimised).
        world_to_camera: (3, 4) [R | t].
        reprojection_error_px: RMS landmark error in pixels at resolution r.
        landmarks: `FaceLandmarks` in the r × r image's pixel coordinates.
        info: JSON-ready record: detection choice, crop box in source pixels, source size, fit summary.
    """

    image: np.ndarray
    mask: np.ndarray
    K: np.ndarray
    world_to_camera: np.ndarray
    reprojection_error_px: float
    landmarks: FaceLandmarks
    info: dict = field(default_factory=dict)


def solve_inputs(landmarks: FaceLandmarks, config: PoseConfig | None = None
                 ) -> tuple[np.ndarray, np.ndarray | PosedTemplate, str]:
    """The points the camera solve fits and their template, as `config.solve_points` chooses.

    Returns:
        (points (P, 2) pixels, template, the template's method name), for a Face Mesh detection:
        `solve_points="mesh_posed"`: the mean of the plain and the attention model's 468 points (the
        plain ones alone where the attention model found no face) and the `PosedTemplate`
        ("face_mesh_posed"); "mesh": the plain 468 points and the (468, 3) mesh template
        ("face_mesh_all"). Otherwise `landmarks.points` against its method's (P, 3) template (the
        paper's 5 points, or the fallback's 4).
    """
    config = config or PoseConfig()
    if landmarks.method == "face_mesh" and landmarks.mesh is not None:
        if config.solve_points == "mesh_posed":
            return (mean_mesh_points(landmarks.mesh, landmarks.mesh_attention),
                    load_posed_template(config.mesh_template_path), MESH_POSED_METHOD)
        if config.solve_points == "mesh":
            return (landmarks.mesh[:, :2].copy(), load_template(MESH_METHOD, config.mesh_template_path),
                    MESH_METHOD)
    return landmarks.points, load_template(landmarks.method, config.template_path), landmarks.method


def prepare_photo(image: np.ndarray | str | os.PathLike, resolution: int, framing: Framing = "aligned",
                  config: PoseConfig | None = None, template_path: str | os.PathLike | None = None
                  ) -> PreparedPhoto:
    """Detect landmarks, frame, resize, segment and solve the camera of one photo.

    The camera is solved in the resized image with the default intrinsics there (focal
    `focal_factor` × r, principal point at the centre), so K and the landmarks match the r × r image.

    Args:
        image: (H, W, 3) uint8 RGB, or a path (read with `load_image`).
        resolution: side r of the square training image.
        framing: "aligned" (FFHQ/CelebA-HQ: centred square, resized) or "landmarks" (crop on the face).
        config: `PoseConfig`.
        template_path: a 5-point template JSON (default: `config.template_path`, else the shipped one);
            given, it is solved against with the paper's 5 points whatever `config.solve_points` says.

    Returns:
        `PreparedPhoto`.

    Raises:
        ImageError: a path that is not a usable image.
        NoFaceError: no face found.
        PoseRejectedError: the fit's error is above `max_error_fraction` × r.

    >>> prepare_photo(skimage.data.astronaut(), 64, framing="landmarks").image.shape  # doctest: +SKIP
    (64, 64, 3)
    """
    config = config or PoseConfig()
    if not isinstance(image, np.ndarray):
        image = load_image(image, config.min_image_side)
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(f"prepare_photo needs a uint8 (H, W, 3) RGB image, got {image.dtype} {image.shape}.")
    if framing not in ("aligned", "landmarks"):
        raise ValueError(f"Unknown framing {framing!r}; use 'aligned' (FFHQ, CelebA-HQ) or 'landmarks'.")
    landmarks = detect_landmarks(image, config)
    box = aligned_box(image.shape[:2]) if framing == "aligned" else landmark_box(landmarks, config.crop_scale)
    scale = resolution / box.side
    framed_landmarks = landmarks.transformed(scale, np.array([box.x0, box.y0], np.float64))
    if template_path is not None:
        config = config.with_(solve_points="paper5", template_path=str(template_path))
    points, template, template_method = solve_inputs(framed_landmarks, config)
    fit = solve_camera(points, template, (resolution, resolution), config=config)
    if not fit.accepted:
        raise PoseRejectedError(
            f"The camera fit is rejected: reprojection error {fit.reprojection_error_px:.2f} px is above the "
            f"threshold {fit.threshold_px:.2f} px ({config.max_error_fraction:.1%} of {resolution} px); "
            "the landmarks do not match a face seen by a pinhole camera.",
            fit.reprojection_error_px, fit.threshold_px)
    # Segment the source image, not the crop: the segmenter sees the whole scene, and padding stays 0.
    mask = crop_and_resize(segment_foreground(image, config), box, resolution, cv2.BORDER_CONSTANT)
    info = {
        **landmarks.summary(),
        **fit.summary(),
        "framing": framing,
        "source_size": [int(image.shape[0]), int(image.shape[1])],
        "crop_box": [box.x0, box.y0, box.side],
        "initialisation": fit.initialisation,
        "solve_points": template_method,
        "n_points": len(points),
        # the named points' errors (all of them for the 5- and 4-point sets), so records stay small
        "per_point_error_px": [round(float(e), 3) for e in (
            fit.per_point_error_px[list(MESH_INDICES.values())] if len(points) == 468
            else fit.per_point_error_px)],
    }
    return PreparedPhoto(
        image=crop_and_resize(image, box, resolution),
        mask=np.round(np.clip(mask, 0.0, 1.0) * 255.0).astype(np.uint8),
        K=fit.K,
        world_to_camera=fit.world_to_camera,
        reprojection_error_px=fit.reprojection_error_px,
        landmarks=framed_landmarks,
        info=info,
    )
