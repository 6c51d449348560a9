"""Cameras for single-view photos: landmarks, canonical template, LM camera solve, masks, framing.

    from pose import load_image, prepare_photo
    photo = prepare_photo(load_image("face.png"), resolution=64, framing="aligned")
"""

from .camera import CameraFit, project, solve_camera
from .config import PoseConfig
from .conventions import (
    CAMERA_DISTANCE,
    FOCAL_FACTOR,
    default_intrinsics,
    orbit_camera,
    rotation_from_yaw_pitch_roll,
    yaw_pitch_roll,
)
from .errors import ImageError, NoFaceError, PoseRejectedError
from .framing import CropBox, aligned_box, crop_and_resize, crop_intrinsics, landmark_box
from .image_io import decode_image, load_image
from .landmarks import FaceLandmarks, detect_landmarks
from .masks import segment_foreground
from .prepare import PreparedPhoto, prepare_photo, solve_inputs
from .refine import TemplateRefinement, refine_template
from .template import (
    EYE_DISTANCE,
    load_template,
    save_template,
    template_metadata,
)

__all__ = [
    "CAMERA_DISTANCE",
    "EYE_DISTANCE",
    "FOCAL_FACTOR",
    "CameraFit",
    "CropBox",
    "FaceLandmarks",
    "ImageError",
    "NoFaceError",
    "PoseConfig",
    "PoseRejectedError",
    "PreparedPhoto",
    "TemplateRefinement",
    "aligned_box",
    "crop_and_resize",
    "crop_intrinsics",
    "decode_image",
    "default_intrinsics",
    "detect_landmarks",
    "landmark_box",
    "load_image",
    "load_template",
    "orbit_camera",
    "prepare_photo",
    "project",
    "refine_template",
    "rotation_from_yaw_pitch_roll",
    "save_template",
    "segment_foreground",
    "solve_camera",
    "solve_inputs",
    "template_metadata",
    "yaw_pitch_roll",
]
