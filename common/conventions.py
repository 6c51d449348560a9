"""The camera convention, stated once in code (docs/ARCHITECTURE.md, Conventions, in words).

- OpenCV cameras: x right, y down, z forward; ``world_to_camera`` is [R|t] (3, 4), ``K`` (3, 3) in pixels
  with the principal point at the image centre and focal length ``FOCAL_FACTOR`` × width.
- The object sits at the world origin, world y points down, the face looks towards −z; the frontal
  camera is R = I, t = (0, 0, d): it sits at (0, 0, −d), ``CAMERA_DISTANCE`` units away, looking along +z.
- Angles, from R = Ry(−yaw) · Rx(−pitch) · Rz(roll) (world-to-camera): yaw > 0 when the face turns
  towards image right (the camera moves towards world −x), pitch > 0 when the face looks up (the camera
  moves down the world's y axis, which points down), roll > 0 when the head tilts clockwise in the
  image. Every camera this project makes from angles (synthetic data, renders, orbits) uses these, and
  ``yaw_pitch_roll`` reads them back from a solved camera.

    >>> K = default_intrinsics(64, 64)                       # focal 128, centre (32, 32)
    >>> w2c = orbit_camera(30.0, 15.0)                       # (3, 4), t = (0, 0, 7)
    >>> np.round(yaw_pitch_roll(w2c[:, :3]), 6).tolist()
    [30.0, 15.0, 0.0]
"""

from __future__ import annotations

import numpy as np
from scipy.spatial.transform import Rotation

CAMERA_DISTANCE = 7.0
FOCAL_FACTOR = 2.0


def default_intrinsics(height: int, width: int, focal: float | None = None) -> np.ndarray:
    """(3, 3) float64 K: focal ``focal`` (default ``FOCAL_FACTOR`` × width), principal point at the centre.

    >>> default_intrinsics(256, 256).tolist()
    [[512.0, 0.0, 128.0], [0.0, 512.0, 128.0], [0.0, 0.0, 1.0]]
    """
    f = float(focal) if focal is not None else FOCAL_FACTOR * width
    return np.array([[f, 0.0, width / 2], [0.0, f, height / 2], [0.0, 0.0, 1.0]])


def rotation_from_yaw_pitch_roll(yaw: float, pitch: float, roll: float = 0.0) -> np.ndarray:
    """(3, 3) world-to-camera rotation Ry(−yaw) · Rx(−pitch) · Rz(roll), angles in degrees.

    >>> rotation_from_yaw_pitch_roll(0, 0, 0).tolist() == np.eye(3).tolist()
    True
    """
    return Rotation.from_euler("YXZ", [-yaw, -pitch, roll], degrees=True).as_matrix()


def yaw_pitch_roll(rotation: np.ndarray) -> np.ndarray:
    """(3,) yaw, pitch, roll in degrees of a (3, 3) world-to-camera rotation (inverse of the above).

    >>> np.round(yaw_pitch_roll(rotation_from_yaw_pitch_roll(20, -10, 5)), 6).tolist()
    [20.0, -10.0, 5.0]
    """
    a, b, c = Rotation.from_matrix(rotation).as_euler("YXZ", degrees=True)
    return np.array([-a, -b, c])


def orbit_camera(yaw_deg: float, pitch_deg: float, distance: float = CAMERA_DISTANCE) -> np.ndarray:
    """World-to-camera [R|t] (3, 4) float64 of a camera ``distance`` from the origin, looking at it, at
    these angles (roll 0). t is always (0, 0, distance); yaw = pitch = 0 is the frontal camera.

    >>> orbit_camera(0.0, 0.0)[:, 3].tolist()
    [0.0, 0.0, 7.0]
    """
    rotation = rotation_from_yaw_pitch_roll(yaw_deg, pitch_deg, 0.0)
    return np.concatenate([rotation, [[0.0], [0.0], [float(distance)]]], axis=1)
