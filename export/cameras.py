"""Camera paths for rendering: yaw sweeps and orbits about the world origin, look-at cameras, K files.

Conventions: ``common.conventions`` (OpenCV cameras, world-to-camera [R|t] (3, 4), K (3, 3) in pixels,
the object at the world origin, world y down, the frontal camera R = I, t = (0, 0, d), and the
yaw/pitch/roll angles).

Moving a camera on a sphere about the origin by a world rotation Q keeps it looking at the same point
and keeps its distance: the camera centre C becomes Q C and its axes turn with it, so
R' = R Q^T and t' = -R' (Q C) = t. Only the rotation block changes.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from common import conventions
from common.conventions import CAMERA_DISTANCE, orbit_camera


def rotation_y(angle_deg: float) -> np.ndarray:
    """Rotation about the world y (vertical, pointing down) axis.

    Returns (3, 3) float64. A positive angle turns +z towards +x.
    """
    a = np.deg2rad(angle_deg)
    c, s = np.cos(a), np.sin(a)
    return np.array([[c, 0.0, s], [0.0, 1.0, 0.0], [-s, 0.0, c]])


def rotation_x(angle_deg: float) -> np.ndarray:
    """Rotation about the world x axis. Returns (3, 3) float64; a positive angle turns +y towards +z."""
    a = np.deg2rad(angle_deg)
    c, s = np.cos(a), np.sin(a)
    return np.array([[1.0, 0.0, 0.0], [0.0, c, -s], [0.0, s, c]])


def rotate_camera(world_to_camera: np.ndarray, rotation: np.ndarray) -> np.ndarray:
    """Move a camera rigidly about the world origin by the world rotation ``rotation``.

    world_to_camera (3, 4), rotation (3, 3) -> (3, 4) float32. The camera keeps its distance from the
    origin and keeps pointing at the same world point (rotated with it).

    >>> w2c = np.hstack([np.eye(3), [[0], [0], [7.0]]])
    >>> rotate_camera(w2c, np.eye(3)).shape
    (3, 4)
    """
    w2c = np.asarray(world_to_camera, dtype=np.float64)
    if w2c.shape != (3, 4):
        raise ValueError(f"world_to_camera must have shape (3, 4), got {w2c.shape}; pass one [R|t] matrix.")
    out = w2c.copy()
    out[:, :3] = w2c[:, :3] @ np.asarray(rotation, dtype=np.float64).T
    return out.astype(np.float32)


def yaw_cameras(world_to_camera: np.ndarray, yaws_deg) -> np.ndarray:
    """Turn one camera about the world's vertical axis (world y through the origin) by each yaw.

    world_to_camera (3, 4), yaws_deg (N,) degrees -> (N, 3, 4) float32.
    Yaw 0 returns the input camera. From the frontal camera a positive yaw moves the camera towards
    world -x, so more of the side of the head at world -x comes into view.

    >>> w2c = np.hstack([np.eye(3), [[0], [0], [7.0]]])
    >>> yaw_cameras(w2c, [-30, 0, 30]).shape
    (3, 3, 4)
    """
    yaws = np.atleast_1d(np.asarray(yaws_deg, dtype=np.float64))
    return np.stack([rotate_camera(world_to_camera, rotation_y(y)) for y in yaws])


def orbit_cameras(
    world_to_camera: np.ndarray,
    n_frames: int = 48,
    yaw_amplitude_deg: float = 35.0,
    pitch_amplitude_deg: float = 10.0,
) -> np.ndarray:
    """A closed loop around a camera: yaw swings left-right while pitch bobs, like a head turning.

    world_to_camera (3, 4) -> (n_frames, 3, 4) float32. Frame k has yaw = A_yaw sin(2 pi k / n) and
    pitch = A_pitch sin(4 pi k / n) (a figure eight), so the first frame is the input camera and the
    path loops seamlessly as a GIF.

    >>> w2c = np.hstack([np.eye(3), [[0], [0], [7.0]]])
    >>> orbit_cameras(w2c, n_frames=8).shape
    (8, 3, 4)
    """
    if n_frames < 1:
        raise ValueError(f"n_frames must be at least 1, got {n_frames}.")
    phase = 2.0 * np.pi * np.arange(n_frames) / n_frames
    yaws = yaw_amplitude_deg * np.sin(phase)
    pitches = pitch_amplitude_deg * np.sin(2.0 * phase)
    return np.stack(
        [
            # Q = Rx(p) Ry(y), so that from the frontal camera frame k is orbit_camera(yaw_k, pitch_k).
            rotate_camera(world_to_camera, rotation_x(p) @ rotation_y(y))
            for y, p in zip(yaws, pitches, strict=True)
        ]
    )


def look_at_origin(distance: float = CAMERA_DISTANCE, yaw_deg: float = 0.0,
                   pitch_deg: float = 0.0) -> np.ndarray:
    """A camera ``distance`` from the origin looking at it, at yaw and pitch (``common.conventions``), as
    (3, 4) float32: the same camera as ``common.conventions.orbit_camera`` and the synthetic data.

    >>> look_at_origin(7.0)[:, 3].tolist()
    [0.0, 0.0, 7.0]
    """
    return orbit_camera(yaw_deg, pitch_deg, distance).astype(np.float32)


def default_intrinsics(height: int, width: int) -> np.ndarray:
    """``common.conventions.default_intrinsics`` as float32 (3, 3), for rendering."""
    return conventions.default_intrinsics(height, width).astype(np.float32)


def scale_intrinsics(K: np.ndarray, from_size: tuple[int, int], to_size: tuple[int, int]) -> np.ndarray:
    """Rescale K so the same view renders at another resolution.

    K (3, 3); sizes are (height, width) -> (3, 3) float32. Pixel-centre conventions are preserved
    because pixel edges, not centres, scale: the principal point in edge coordinates scales linearly.

    >>> scale_intrinsics(np.diag([128.0, 128.0, 1.0]), (64, 64), (256, 256))[0, 0]
    512.0
    """
    sy = to_size[0] / from_size[0]
    sx = to_size[1] / from_size[1]
    out = np.asarray(K, dtype=np.float64).copy()
    out[0, :] *= sx
    out[1, :] *= sy
    return out.astype(np.float32)


def load_camera_file(path: str | Path) -> tuple[np.ndarray, np.ndarray, tuple[int, int] | None]:
    """Read cameras from a file: ``.json`` or ``.npz``.

    JSON: {"K": 3x3, "world_to_camera": 3x4 or Nx3x4, optional "height", "width"} (the K describes an
    image of that size; without a size K is taken as-is). NPZ: arrays ``K`` and ``world_to_camera``.
    Returns (K (3, 3), world_to_camera (N, 3, 4), (height, width) or None).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"Camera file {path} does not exist; pass a .json or .npz with K and [R|t].")
    if path.suffix.lower() not in (".json", ".npz"):
        raise ValueError(f"Camera file {path} must end in .json or .npz.")
    size = None
    try:
        if path.suffix.lower() == ".json":
            data = json.loads(path.read_text())
            K = np.asarray(data["K"], dtype=np.float32)
            w2c = np.asarray(data["world_to_camera"], dtype=np.float32)
            if "height" in data and "width" in data:
                size = (int(data["height"]), int(data["width"]))
        else:
            with np.load(path, allow_pickle=False) as data:
                K = np.asarray(data["K"], dtype=np.float32)
                w2c = np.asarray(data["world_to_camera"], dtype=np.float32)
                if "height" in data and "width" in data:
                    size = (int(data["height"]), int(data["width"]))
    except KeyError as err:
        raise ValueError(
            f"Camera file {path} lacks {err}; it needs 'K' (3x3) and 'world_to_camera' (3x4)."
        ) from None
    except json.JSONDecodeError as err:
        raise ValueError(f"Camera file {path} is not valid JSON (line {err.lineno}, column {err.colno}: "
                         f"{err.msg}); it needs 'K' (3x3) and 'world_to_camera' (3x4).") from None
    except (TypeError, ValueError, OSError, UnicodeDecodeError) as err:  # wrong shapes/types, not a zip
        raise ValueError(f"Camera file {path} cannot be read as cameras ({err}); it needs 'K' (3x3) and "
                         "'world_to_camera' (3x4).") from None
    if not (np.isfinite(K).all() and np.isfinite(w2c).all()):
        raise ValueError(f"Camera file {path} holds NaN or infinite values.")
    if K.ndim == 3:
        K = K[0]
    if w2c.ndim == 2:
        w2c = w2c[None]
    if K.shape != (3, 3) or w2c.shape[1:] != (3, 4):
        raise ValueError(
            f"Camera file {path} has K {K.shape} and world_to_camera {w2c.shape}; "
            "expected (3, 3) and (N, 3, 4)."
        )
    return K, w2c, size
