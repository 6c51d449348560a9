"""Cameras for single-view photos: landmarks, canonical template, LM camera solve, masks, framing.

    from pose import load_image, prepare_photo
    photo = prepare_photo(load_image("face.png"), resolution=64, framing="aligned")

The names below are imported on first use (PEP 562), so that ``import pose.config`` (the settings,
which ``dataset.PrepareConfig`` embeds) loads neither the solver nor the MediaPipe wrappers: code that
only trains, renders or benchmarks, as on a GPU machine without MediaPipe, never loads them.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

# public name -> the module that defines it
_SOURCES = {
    "CameraFit": ".camera", "project": ".camera", "solve_camera": ".camera",
    "PoseConfig": ".config",
    "CAMERA_DISTANCE": "common.conventions", "FOCAL_FACTOR": "common.conventions",
    "default_intrinsics": "common.conventions", "orbit_camera": "common.conventions",
    "rotation_from_yaw_pitch_roll": "common.conventions", "yaw_pitch_roll": "common.conventions",
    "ImageError": ".errors", "NoFaceError": ".errors", "PoseRejectedError": ".errors",
    "CropBox": ".framing", "aligned_box": ".framing", "crop_and_resize": ".framing",
    "crop_intrinsics": ".framing", "landmark_box": ".framing",
    "decode_image": ".image_io", "load_image": ".image_io",
    "FaceLandmarks": ".landmarks", "detect_landmarks": ".landmarks",
    "segment_foreground": ".masks",
    "PreparedPhoto": ".prepare", "prepare_photo": ".prepare", "solve_inputs": ".prepare",
    "TemplateRefinement": ".refine", "refine_template": ".refine",
    "EYE_DISTANCE": ".template", "load_template": ".template", "save_template": ".template",
    "template_metadata": ".template",
}
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


def __getattr__(name: str):
    source = _SOURCES.get(name)
    if source is None:
        raise AttributeError(f"module 'pose' has no attribute {name!r}")
    value = getattr(importlib.import_module(source, __name__), name)
    globals()[name] = value  # later lookups skip __getattr__
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


if TYPE_CHECKING:  # what type checkers and IDEs see
    from common.conventions import (
        CAMERA_DISTANCE,
        FOCAL_FACTOR,
        default_intrinsics,
        orbit_camera,
        rotation_from_yaw_pitch_roll,
        yaw_pitch_roll,
    )

    from .camera import CameraFit, project, solve_camera
    from .config import PoseConfig
    from .errors import ImageError, NoFaceError, PoseRejectedError
    from .framing import CropBox, aligned_box, crop_and_resize, crop_intrinsics, landmark_box
    from .image_io import decode_image, load_image
    from .landmarks import FaceLandmarks, detect_landmarks
    from .masks import segment_foreground
    from .prepare import PreparedPhoto, prepare_photo, solve_inputs
    from .refine import TemplateRefinement, refine_template
    from .template import EYE_DISTANCE, load_template, save_template, template_metadata
