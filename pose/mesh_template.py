"""The full Face Mesh templates: all 468 points, calibrated against renders with known cameras.

The all-points camera solves fit all 468 of Face Mesh's 2D landmarks to a 468-point template: the fixed
one, `pose/data/mesh_template.json` (`PoseConfig.solve_points = "mesh"`), or the posed one below (the
default). That template is not Face Mesh's 3D output: on
renders with known cameras, Face Mesh's 2D points are biased with pose (a 5-point solve against the
measured template reads pitch at 0.76× the truth, an all-points solve against the mean mesh is off by
5° in pitch; README, "Camera error of the landmark solve"). The shipped template is instead the set of
3D points that Face Mesh's 2D landmarks behave like: each point is **triangulated** from its detections
in many renders of the `faces` source whose cameras are known (`triangulate`: linear least squares,
then Gauss–Newton on the pixel error), then made mirror-symmetric (`symmetrise`), in head units and the
world frame of `pose.template`. Its landmarks' own pose bias is thereby folded into the template once,
on renders of a calibration seed that the benchmark never evaluates on.

**The pose-dependent template** (`PosedTemplate`, `pose/data/mesh_posed_template.json`, the default
solve's since it measured better; README, "Camera error of the landmark solve"). A fixed template holds
Face Mesh's *average* bias, but the bias changes with pose: against the fixed template an all-points
solve still reads pitch at 0.89× the truth. The posed template lets each point move linearly with the
head's pose, X_p(R) = A_p + sin(yaw(R)) B_p + sin(pitch(R)) C_p (`POSE_FEATURES`), triangulated the
same way (`triangulate_posed`: every render's detection under its true camera and pose), and the solve
finds the pose and the template jointly (`pose.camera.solve_camera` given a `PosedTemplate`). It is
fitted to the mean of the plain and the attention Face Mesh's 468 points (`mean_mesh_points`), which are
less noisy together than either alone.

`python -m dataset.mesh_template` writes both (the renders need `dataset`, which `pose` must not
import); these functions are the pure part.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from common.conventions import yaw_pitch_roll

from .template import MESH_METHOD, MESH_POSED_METHOD, MESH_POSED_TEMPLATE_PATH, TemplateError, _read

__all__ = ["MESH_METHOD", "MESH_POSED_METHOD", "N_MESH_POINTS", "POSE_FEATURES", "PosedTemplate",
           "load_posed_template", "mean_mesh_points", "mirror_index", "pose_features", "symmetrise",
           "symmetrise_posed", "triangulate", "triangulate_posed"]
N_MESH_POINTS = 468
POSE_FEATURES = ("sin_yaw", "sin_pitch")  # the terms a posed template's points move with
# Under a mirror (x -> -x) yaw changes sign and pitch does not: the parity of each pose feature.
_FEATURE_PARITY = (-1.0, 1.0)


def pose_features(rotation: np.ndarray) -> np.ndarray:
    """(3,) [1, sin yaw, sin pitch] of a (3, 3) world-to-camera rotation (`common.conventions` angles).

    >>> from common.conventions import rotation_from_yaw_pitch_roll
    >>> np.round(pose_features(rotation_from_yaw_pitch_roll(30.0, -90.0 / 3, 5.0)), 6).tolist()
    [1.0, 0.5, -0.5]
    """
    yaw, pitch, _ = np.radians(yaw_pitch_roll(rotation))
    return np.array([1.0, np.sin(yaw), np.sin(pitch)])


@dataclass(frozen=True)
class PosedTemplate:
    """A 468-point template whose points move linearly with the head's pose.

    Attributes:
        coefficients: (3, 468, 3) float64 head units: the points at the frontal pose, then their change
            per unit of sin(yaw) and of sin(pitch) (`POSE_FEATURES`).

    >>> frontal = np.zeros((468, 3)); frontal[:, 2] = 1.0
    >>> model = PosedTemplate(np.stack([frontal, np.ones((468, 3)), np.zeros((468, 3))]))
    >>> from common.conventions import rotation_from_yaw_pitch_roll
    >>> model.at(rotation_from_yaw_pitch_roll(30.0, 0.0))[0].round(6).tolist()
    [0.5, 0.5, 1.5]
    """

    coefficients: np.ndarray

    @property
    def frontal(self) -> np.ndarray:
        """(468, 3) the template at yaw = pitch = 0."""
        return self.coefficients[0]

    def at(self, rotation: np.ndarray) -> np.ndarray:
        """(468, 3) the template for a head seen with this (3, 3) world-to-camera rotation."""
        return np.tensordot(pose_features(rotation), self.coefficients, axes=1)


def load_posed_template(path: str | Path | None = None) -> PosedTemplate:
    """The posed template in a JSON written by `python -m dataset.mesh_template` (default: the shipped
    `pose/data/mesh_posed_template.json`): its ``points["face_mesh_posed"]`` (frontal) and
    ``pose_terms`` (one (468, 3) table per `POSE_FEATURES` name).

    >>> load_posed_template().coefficients.shape
    (3, 468, 3)
    """
    path = str(path or MESH_POSED_TEMPLATE_PATH)
    data = _read(path)
    terms = data.get("pose_terms")
    fix = ("write one with `python -m dataset.mesh_template --posed`, or leave the mesh template path out "
           "for the shipped one")
    if (MESH_POSED_METHOD not in data["points"] or not isinstance(terms, dict)
            or sorted(terms) != sorted(POSE_FEATURES)):
        raise TemplateError(f"Template {path} is not a posed template (it needs "
                            f"points[{MESH_POSED_METHOD!r}] and pose_terms {list(POSE_FEATURES)}); {fix}.")
    try:
        coefficients = np.stack([np.asarray(data["points"][MESH_POSED_METHOD], np.float64)]
                                + [np.asarray(terms[name], np.float64) for name in POSE_FEATURES])
    except (TypeError, ValueError):
        coefficients = None
    if (coefficients is None or coefficients.shape != (3, N_MESH_POINTS, 3)
            or not np.all(np.isfinite(coefficients))):
        raise TemplateError(f"Template {path}: the posed template's tables are not {N_MESH_POINTS} finite "
                            f"(x, y, z) triples each; {fix}.")
    return PosedTemplate(coefficients)


def mean_mesh_points(plain: np.ndarray, attention: np.ndarray | None) -> np.ndarray:
    """(468, 2) the mean of the plain and the attention Face Mesh's 2D points (the first 468 of the
    attention model's 478), or the plain ones where the attention model found no face (None or NaN).

    >>> mean_mesh_points(np.zeros((468, 3)), np.ones((478, 3)))[0].tolist()
    [0.5, 0.5]
    """
    plain = np.asarray(plain, np.float64)[:N_MESH_POINTS, :2]
    if attention is None or not np.all(np.isfinite(attention[:N_MESH_POINTS, :2])):
        return plain.copy()
    return (plain + np.asarray(attention, np.float64)[:N_MESH_POINTS, :2]) / 2.0


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
    return _triangulate_linear_model(points, K, world_to_camera, np.ones((len(points), 1)), iterations)[:, 0]


def triangulate_posed(points: np.ndarray, K: np.ndarray, world_to_camera: np.ndarray,
                      iterations: int = 10) -> np.ndarray:
    """The `PosedTemplate` coefficients whose projections best match 2D detections in views with known
    cameras: like `triangulate`, but each point is A + sin(yaw) B + sin(pitch) C with the view's own pose.

    Each point is solved on its own: the linear (DLT) least-squares solution in its 9 unknowns, then
    Gauss–Newton steps on the sum of squared pixel errors. Detections that are NaN are left out.

    Args:
        points: (N, P, 2) detections in N views; K: (N, 3, 3) or (3, 3); world_to_camera: (N, 3, 4).
        iterations: Gauss–Newton steps.

    Returns:
        (3, P, 3) float64 coefficients (NaN for a point seen in fewer than 5 views).

    >>> from common.conventions import default_intrinsics, orbit_camera
    >>> from pose.camera import project
    >>> cams = np.stack([orbit_camera(a, b) for a in (-30.0, 0.0, 30.0) for b in (-10.0, 10.0)])
    >>> truth = np.array([[[0.1, -0.2, -1.0]], [[0.05, 0.0, 0.0]], [[0.0, 0.1, 0.02]]])
    >>> K = default_intrinsics(64, 64)
    >>> uv = np.stack([project(PosedTemplate(truth).at(c[:, :3]), K, c) for c in cams])
    >>> bool(np.allclose(triangulate_posed(uv, K, cams), truth, atol=1e-6))
    True
    """
    world_to_camera = np.asarray(world_to_camera, np.float64)
    features = np.stack([pose_features(c[:, :3]) for c in world_to_camera])  # (N, 3)
    coefficients = _triangulate_linear_model(points, K, world_to_camera, features, iterations)
    return np.ascontiguousarray(np.transpose(coefficients, (1, 0, 2)))


def _triangulate_linear_model(points: np.ndarray, K: np.ndarray, world_to_camera: np.ndarray,
                              features: np.ndarray, iterations: int) -> np.ndarray:
    """(P, F, 3) per point, the coefficients C of X = Σ_f features[n, f] C[f] (each view n its own
    features; F = 1 with features 1 is a fixed point) that best match the detections: the linear (DLT)
    least-squares solution, then Gauss–Newton on the sum of squared pixel errors. NaN detections are
    left out; a point seen in fewer views than its 3F unknowns need (2 equations a view) is NaN."""
    points = np.asarray(points, np.float64)
    n_views, n_points = points.shape[:2]
    n_unknowns = 3 * features.shape[1]
    K = np.broadcast_to(np.asarray(K, np.float64), (n_views, 3, 3))
    world_to_camera = np.asarray(world_to_camera, np.float64)
    seen = np.all(np.isfinite(points), axis=2)  # (N, P)
    uv = np.where(seen[..., None], points, 0.0)
    weight = seen.astype(np.float64)
    enough = 2 * seen.sum(0) >= n_unknowns
    projection = K @ world_to_camera  # (N, 3, 4)
    # DLT rows per view and point: (u P3 - P1) . [X, 1] = 0 and (v P3 - P2) . [X, 1] = 0, with X linear
    # in the unknowns (flattened feature-major).
    rows = uv[..., :, None] * projection[:, None, 2:3, :] - projection[:, None, :2, :]  # (N, P, 2, 4)
    A = np.einsum("npki,nf->npkfi", rows[..., :3], features).reshape(n_views, n_points, 2, n_unknowns)
    normal = np.einsum("np,npki,npkj->pij", weight, A, A)
    normal[~enough] = np.eye(n_unknowns)
    rhs = np.einsum("np,npki,npk->pi", weight, A, -rows[..., 3])
    C = np.linalg.solve(normal, rhs[..., None])[..., 0].reshape(n_points, -1, 3)
    rotation, translation = world_to_camera[:, :, :3], world_to_camera[:, :, 3]
    fx, fy = K[:, 0, 0][:, None], K[:, 1, 1][:, None]
    for _ in range(iterations):
        X = np.einsum("pfi,nf->npi", C, features)
        camera = np.einsum("nij,npj->npi", rotation, X) + translation[:, None]  # (N, P, 3)
        z = camera[..., 2]
        pixels = np.stack([fx * camera[..., 0] / z + K[:, 0, 2][:, None],
                           fy * camera[..., 1] / z + K[:, 1, 2][:, None]], axis=-1)
        d_pixel = np.zeros((n_views, n_points, 2, 3))  # d pixel / d camera point
        d_pixel[..., 0, 0] = fx / z
        d_pixel[..., 0, 2] = -fx * camera[..., 0] / z**2
        d_pixel[..., 1, 1] = fy / z
        d_pixel[..., 1, 2] = -fy * camera[..., 1] / z**2
        J = np.einsum("npkc,ncj,nf->npkfj", d_pixel, rotation, features).reshape(n_views, n_points, 2,
                                                                                 n_unknowns)
        normal = np.einsum("np,npki,npkj->pij", weight, J, J)
        normal[~enough] = np.eye(n_unknowns)
        gradient = np.einsum("np,npki,npk->pi", weight, J, pixels - uv)
        C = C - np.linalg.solve(normal, gradient[..., None])[..., 0].reshape(n_points, -1, 3)
    C[~enough] = np.nan
    return C


def symmetrise_posed(coefficients: np.ndarray, mirror: np.ndarray) -> np.ndarray:
    """(3, P, 3): `symmetrise` for a posed template. Mirroring a head negates its yaw, so the sin(yaw)
    term of a point is the negated mirror image of its partner's; the other two are plain mirror images.

    >>> C = np.zeros((3, 2, 3)); C[1, 0] = [0.2, 0.1, 0.0]; C[1, 1] = [0.2, -0.1, 0.0]
    >>> symmetrise_posed(C, np.array([1, 0]))[1].round(6).tolist()
    [[0.2, 0.1, 0.0], [0.2, -0.1, 0.0]]
    """
    coefficients = np.asarray(coefficients, np.float64)
    parity = np.array([1.0, *_FEATURE_PARITY])[:, None, None]
    mirrored = coefficients[:, mirror] * [-1.0, 1.0, 1.0] * parity
    return (coefficients + mirrored) / 2.0


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
