"""The full Face Mesh template: all 468 points, calibrated against renders with known cameras.

The default camera solve (`PoseConfig.solve_points = "mesh"`) fits all 468 of Face Mesh's 2D landmarks
to a 468-point template, `pose/data/mesh_template.json`. That template is not Face Mesh's 3D output: on
renders with known cameras, Face Mesh's 2D points are biased with pose (a 5-point solve against the
measured template reads pitch at 0.76× the truth, an all-points solve against the mean mesh is off by
5° in pitch; README, "Camera error of the landmark solve"). The shipped template is instead the set of
3D points that Face Mesh's 2D landmarks behave like: each point is **triangulated** from its detections
in many renders of the `faces` source whose cameras are known (`triangulate`: linear least squares,
then Gauss–Newton on the pixel error), then made mirror-symmetric (`symmetrise`), in head units and the
world frame of `pose.template`. Its landmarks' own pose bias is thereby folded into the template once,
on renders of a calibration seed that the benchmark never evaluates on.

`python -m dataset.mesh_template` writes it (the renders need `dataset`, which `pose` must not
import); these functions are the pure part.
"""

from __future__ import annotations

import numpy as np

from .template import MESH_METHOD

__all__ = ["MESH_METHOD", "N_MESH_POINTS", "mirror_index", "symmetrise", "triangulate"]
N_MESH_POINTS = 468


def triangulate(points: np.ndarray, K: np.ndarray, world_to_camera: np.ndarray,
                iterations: int = 10) -> np.ndarray:
    """The 3D points whose projections best match their 2D detections in views with known cameras.

    Each point is solved on its own: the linear (DLT) least-squares solution, then Gauss–Newton steps on
    the sum of squared pixel errors. Detections that are NaN (the point was not found in that view) are
    left out of that point's sums.

    Args:
        points: (N, P, 2) detections in N views, continuous pixel coordinates.
        K: (N, 3, 3) or (3, 3) intrinsics.
        world_to_camera: (N, 3, 4) cameras.
        iterations: Gauss–Newton steps.

    Returns:
        (P, 3) float64 world points (NaN for a point seen in fewer than 2 views).

    >>> from common.conventions import default_intrinsics, orbit_camera
    >>> cams = np.stack([orbit_camera(a, 0.0) for a in (-20.0, 0.0, 20.0)])
    >>> X = np.array([[0.1, -0.2, -1.0]])
    >>> uv = np.stack([(default_intrinsics(64, 64) @ (c[:, :3] @ X.T + c[:, 3:])).T for c in cams])
    >>> np.round(triangulate(uv[..., :2] / uv[..., 2:], default_intrinsics(64, 64), cams), 6).tolist()
    [[0.1, -0.2, -1.0]]
    """
    points = np.asarray(points, np.float64)
    n_views = points.shape[0]
    K = np.broadcast_to(np.asarray(K, np.float64), (n_views, 3, 3))
    world_to_camera = np.asarray(world_to_camera, np.float64)
    seen = np.all(np.isfinite(points), axis=2)  # (N, P)
    uv = np.where(seen[..., None], points, 0.0)
    weight = seen.astype(np.float64)
    projection = K @ world_to_camera  # (N, 3, 4)
    # DLT rows per view and point: (u P3 - P1) . [X, 1] = 0 and (v P3 - P2) . [X, 1] = 0.
    rows = uv[..., :, None] * projection[:, None, 2:3, :] - projection[:, None, :2, :]  # (N, P, 2, 4)
    A, b = rows[..., :3], -rows[..., 3]
    normal = np.einsum("np,npki,npkj->pij", weight, A, A)
    rhs = np.einsum("np,npki,npk->pi", weight, A, b)
    enough = seen.sum(0) >= 2
    normal[~enough] = np.eye(3)
    X = np.linalg.solve(normal, rhs[..., None])[..., 0]
    rotation, translation = world_to_camera[:, :, :3], world_to_camera[:, :, 3]
    for _ in range(iterations):
        camera = np.einsum("nij,pj->npi", rotation, X) + translation[:, None]  # (N, P, 3)
        z = camera[..., 2]
        fx, fy = K[:, 0, 0][:, None], K[:, 1, 1][:, None]
        pixels = np.stack([fx * camera[..., 0] / z + K[:, 0, 2][:, None],
                           fy * camera[..., 1] / z + K[:, 1, 2][:, None]], axis=-1)
        residual = pixels - uv  # (N, P, 2)
        d_pixel = np.zeros((*camera.shape[:2], 2, 3))  # d pixel / d camera point
        d_pixel[..., 0, 0] = fx / z
        d_pixel[..., 0, 2] = -fx * camera[..., 0] / z**2
        d_pixel[..., 1, 1] = fy / z
        d_pixel[..., 1, 2] = -fy * camera[..., 1] / z**2
        J = np.einsum("npkc,ncj->npkj", d_pixel, rotation)  # (N, P, 2, 3)
        normal = np.einsum("np,npki,npkj->pij", weight, J, J)
        normal[~enough] = np.eye(3)
        step = np.linalg.solve(normal, np.einsum("np,npki,npk->pi", weight, J, residual)[..., None])[..., 0]
        X = X - step
    X[~enough] = np.nan
    return X


def mirror_index(mesh: np.ndarray) -> np.ndarray:
    """(P,) int: for each point of a near-symmetric mesh (P, 3), its mirror partner across x = 0 (itself on
    the midline): the nearest point to its mirror image. Raises when that is not an involution (the mesh is
    not near-symmetric enough to tell pairs apart).

    >>> mirror_index(np.array([[-1.0, 0, 0], [0.0, 1, 0], [1.02, 0, 0]])).tolist()
    [2, 1, 0]
    """
    mirrored = np.asarray(mesh, np.float64) * [-1.0, 1.0, 1.0]
    distance = np.linalg.norm(mirrored[:, None] - mesh[None], axis=2)
    index = np.argmin(distance, axis=1)
    if not np.array_equal(index[index], np.arange(len(mesh))):
        raise ValueError("The mesh is not symmetric enough to pair its points with their mirror images.")
    return index


def symmetrise(points: np.ndarray, mirror: np.ndarray) -> np.ndarray:
    """(P, 3): each point averaged with its partner's mirror image (midline points get x = 0).

    >>> symmetrise(np.array([[-1.0, 0, 0], [0.1, 1, 0], [1.2, 0.2, 0]]), np.array([2, 1, 0])).tolist()
    [[-1.1, 0.1, 0.0], [0.0, 1.0, 0.0], [1.1, 0.1, 0.0]]
    """
    points = np.asarray(points, np.float64)
    return (points + points[mirror] * [-1.0, 1.0, 1.0]) / 2.0
