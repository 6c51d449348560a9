"""Turning a trained model into things people look at: camera paths, images and videos, meshes, metrics."""

from export.cameras import (
    load_camera_file,
    look_at_origin,
    orbit_cameras,
    rotate_camera,
    scale_intrinsics,
    yaw_cameras,
)
from export.media import caption, colorize_depth, image_grid, save_gif, save_mp4, save_png, to_uint8, upscale
from export.mesh import Mesh, extract_mesh, mesh_volume, write_ply
from export.metrics import depth_errors, psnr, ssim

__all__ = [
    "Mesh",
    "caption",
    "colorize_depth",
    "depth_errors",
    "extract_mesh",
    "image_grid",
    "load_camera_file",
    "look_at_origin",
    "mesh_volume",
    "orbit_cameras",
    "psnr",
    "rotate_camera",
    "save_gif",
    "save_mp4",
    "save_png",
    "scale_intrinsics",
    "ssim",
    "to_uint8",
    "upscale",
    "write_ply",
    "yaw_cameras",
]
