"""Camera from landmarks: Levenberg–Marquardt fit of a 3D template to 2D points.

Model: u = K (R X + t), OpenCV axes, pixel coordinates continuous (pixel (i, j) covers
[i, i + 1) × [j, j + 1), its centre at (i + 0.5, j + 0.5)); the default principal point is the image
centre (W/2, H/2) and the default focal length `focal_factor` × W.

Error: `reprojection_error_px` is the RMS over points of the pixel distance between projected template
points and landmarks; a fit is `accepted` when it is at most `max_error_fraction` × W.

Angles (`yaw_pitch_roll_deg`) follow `common.conventions`: R = Ry(−yaw) · Rx(−pitch) · Rz(roll); yaw > 0
when the face turns towards image right (the subject's left), pitch > 0 when the face looks up, roll > 0
when the head tilts clockwise in the image. A frontal face has R = I and all three are 0; mirroring
the photo negates yaw and roll.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import cv2
import numpy as np
from scipy.optimize import least_squares
from scipy.spatial.transform import Rotation

from common.conventions import default_intrinsics, rotation_from_yaw_pitch_roll, yaw_pitch_roll

from .config import PoseConfig
from .mesh_template import PosedTemplate, pose_features


@dataclass
class CameraFit:
    """One image's camera.

    Attributes:
        K: (3, 3) intrinsics in pixels.
        world_to_camera: (3, 4) [R | t].
        reprojection_error_px: RMS point error in pixels.
        per_point_error_px: (P,) pixel error of each point.
        yaw_pitch_roll_deg: (3,) degrees (signs in the module docstring).
        accepted: `reprojection_error_px <= threshold_px`.
        threshold_px: the acceptance threshold used.
        image_size: (H, W).
        initialisation: which start won ("sqpnp", "epnp", "frontal", or one of these + "+mirrored"),
            + "+posed" when a `PosedTemplate` was then solved jointly with the pose.
    """

    K: np.ndarray
    world_to_camera: np.ndarray
    reprojection_error_px: float
    per_point_error_px: np.ndarray
    yaw_pitch_roll_deg: np.ndarray
    accepted: bool
    threshold_px: float
    image_size: tuple[int, int]
    initialisation: str = field(default="")

    @property
    def camera_position(self) -> np.ndarray:
        """(3,) camera centre in world units: −Rᵀ t."""
        return -self.world_to_camera[:, :3].T @ self.world_to_camera[:, 3]

    def summary(self) -> dict:
        """JSON-ready numbers of the fit."""
        yaw, pitch, roll = (round(float(a), 2) for a in self.yaw_pitch_roll_deg)
        return {"reprojection_error_px": round(self.reprojection_error_px, 3), "accepted": self.accepted,
                "threshold_px": round(self.threshold_px, 3), "yaw_deg": yaw, "pitch_deg": pitch,
                "roll_deg": roll, "focal_px": round(float(self.K[0, 0]), 3)}


def project(points: np.ndarray, K: np.ndarray, world_to_camera: np.ndarray) -> np.ndarray:
    """Project world points to continuous pixel coordinates.

    Args:
        points: (P, 3) world points.
        K: (3, 3) or (N, 3, 3); world_to_camera: (3, 4) or (N, 3, 4).

    Returns:
        (P, 2), or (N, P, 2) for batched cameras.

    >>> project(np.zeros((1, 3)), default_intrinsics(64, 64), np.c_[np.eye(3), [0, 0, 7]]).tolist()
    [[32.0, 32.0]]
    """
    camera = points @ np.swapaxes(world_to_camera[..., :3], -1, -2) + world_to_camera[..., None, :, 3]
    pixels = camera @ np.swapaxes(K, -1, -2)
    return pixels[..., :2] / pixels[..., 2:3]


def _projection(params: np.ndarray, template: np.ndarray, K: np.ndarray, optimise_focal: bool
                ) -> tuple[np.ndarray, np.ndarray]:
    """Projected points (2P,) and their exact Jacobian (2P, 6 or 7) w.r.t. (rotvec, t[, log focal]).

    `cv2.projectPoints` returns both; its Jacobian columns are rvec, tvec, fx, fy, cx, cy, distortion.
    """
    intrinsics = K
    if optimise_focal:
        intrinsics = K.copy()
        intrinsics[0, 0] = intrinsics[1, 1] = K[0, 0] * np.exp(params[6])
    pixels, jacobian = cv2.projectPoints(template, params[:3], params[3:6], intrinsics, None)
    columns = [jacobian[:, :6]]
    if optimise_focal:
        columns.append(((jacobian[:, 6] + jacobian[:, 7]) * intrinsics[0, 0])[:, None])
    return pixels.reshape(-1), np.concatenate(columns, axis=1)


def _residuals(params: np.ndarray, template: np.ndarray, points: np.ndarray, K: np.ndarray,
               optimise_focal: bool) -> np.ndarray:
    return _projection(params, template, K, optimise_focal)[0] - points.reshape(-1)


def _jacobian(params: np.ndarray, template: np.ndarray, points: np.ndarray, K: np.ndarray,
              optimise_focal: bool) -> np.ndarray:
    return _projection(params, template, K, optimise_focal)[1]


def _posed_residuals(params: np.ndarray, model: PosedTemplate, points: np.ndarray, K: np.ndarray,
                     optimise_focal: bool) -> np.ndarray:
    """`_residuals` with the template the posed model gives for the rotation in `params`."""
    rotation = Rotation.from_rotvec(params[:3]).as_matrix()
    return _residuals(params, np.ascontiguousarray(model.at(rotation)), points, K, optimise_focal)


def _feature_gradient(rotvec: np.ndarray, step: float = 1e-6) -> np.ndarray:
    """(2, 3) d(sin yaw, sin pitch) / d rotvec, by central differences (two smooth scalars of three
    variables; the Euler conversion has no closed-form derivative in scipy)."""
    columns = []
    for axis in np.eye(3) * step:
        plus = pose_features(Rotation.from_rotvec(rotvec + axis).as_matrix())[1:]
        minus = pose_features(Rotation.from_rotvec(rotvec - axis).as_matrix())[1:]
        columns.append((plus - minus) / (2 * step))
    return np.stack(columns, axis=1)


def _posed_jacobian(params: np.ndarray, model: PosedTemplate, points: np.ndarray, K: np.ndarray,
                    optimise_focal: bool) -> np.ndarray:
    """(2P, 6 or 7) Jacobian of `_posed_residuals`: the fixed-template Jacobian at the current template,
    plus, in the rotation columns, the projection's change with the template points times their change
    with the rotation (d pixel / d point · R · (B ⊗ ∇sin yaw + C ⊗ ∇sin pitch))."""
    rotation = Rotation.from_rotvec(params[:3]).as_matrix()
    template = np.ascontiguousarray(model.at(rotation))
    jacobian = _projection(params, template, K, optimise_focal)[1].copy()
    focal = K[0, 0] * np.exp(params[6]) if optimise_focal else K[0, 0]
    camera = template @ rotation.T + params[3:6]
    z = camera[:, 2]
    d_pixel = np.zeros((len(template), 2, 3))
    d_pixel[:, 0, 0] = d_pixel[:, 1, 1] = focal / z
    d_pixel[:, 0, 2] = -focal * camera[:, 0] / z**2
    d_pixel[:, 1, 2] = -focal * camera[:, 1] / z**2
    d_template = np.einsum("fpi,fj->pij", model.coefficients[1:], _feature_gradient(params[:3]))  # (P, 3, 3)
    jacobian[:, :3] += np.einsum("pkc,cd,pdj->pkj", d_pixel, rotation, d_template).reshape(-1, 3)
    return jacobian


def _in_front(template: np.ndarray, params: np.ndarray) -> bool:
    """Whether every template point lies in front of the camera (rotvec, t[, log focal]) `params`."""
    rotation = Rotation.from_rotvec(params[:3]).as_matrix()
    return bool(np.all(template @ rotation[2] + params[5] > 1e-6))


def _starts(points: np.ndarray, template: np.ndarray, K: np.ndarray) -> dict[str, np.ndarray]:
    """Candidate (rotvec, t) starts: OpenCV PnP solutions, a frontal guess, and their yaw mirrors."""
    starts: dict[str, np.ndarray] = {}
    for name, flag, minimum in (("sqpnp", cv2.SOLVEPNP_SQPNP, 3), ("epnp", cv2.SOLVEPNP_EPNP, 4)):
        if len(points) < minimum:
            continue
        try:
            ok, rvec, tvec = cv2.solvePnP(template, points, K, None, flags=flag)
        except cv2.error:
            continue
        if ok and np.all(np.isfinite(rvec)) and np.all(np.isfinite(tvec)) and tvec[2, 0] > 0:
            starts[name] = np.r_[rvec.ravel(), tvec.ravel()]
    # Frontal: depth from the template's spread against the landmarks' spread, centred on them.
    spread_ratio = np.ptp(template[:, 0]) / max(np.ptp(points[:, 0]), 1e-6)
    depth = K[0, 0] * spread_ratio - template[:, 2].mean()
    centre = (points.mean(0) - K[:2, 2]) / K[0, 0] * (depth + template[:, 2].mean()) - template[:, :2].mean(0)
    starts["frontal"] = np.r_[0.0, 0.0, 0.0, centre, depth]
    for name, start in list(starts.items()):
        yaw, pitch, roll = yaw_pitch_roll(Rotation.from_rotvec(start[:3]).as_matrix())
        if abs(yaw) > 1.0:
            mirrored = Rotation.from_matrix(rotation_from_yaw_pitch_roll(-yaw, pitch, roll)).as_rotvec()
            starts[name + "+mirrored"] = np.r_[mirrored, start[3:]]
    return starts


def solve_camera(points: np.ndarray, template: np.ndarray | PosedTemplate, image_size: tuple[int, int],
                 focal: float | None = None, optimise_focal: bool | None = None,
                 config: PoseConfig | None = None) -> CameraFit:
    """Fit rotation, translation (and optionally focal length) so the template projects onto the points.

    Every start from `_starts` is refined with `least_squares(method="lm")`; the lowest-cost fit with
    all points in front of the camera wins. A `PosedTemplate` is solved at its frontal shape first, then
    jointly: the template follows the rotation being solved (another LM run from that fit, whose
    Jacobian adds the template's change with the rotation, `_posed_jacobian`).

    Args:
        points: (P, 2) landmark pixels (continuous coordinates), P ≥ 4.
        template: (P, 3) template points in the same order (head units), or a `PosedTemplate` (P = 468).
        image_size: (H, W) of the image the points are in.
        focal: focal length in pixels (default `config.focal_factor` × W); the start when optimised.
        optimise_focal: also fit the focal length (default `config.optimise_focal`).
        config: `PoseConfig` (acceptance threshold, focal defaults).

    Returns:
        `CameraFit`; check `accepted` before using it.

    >>> fit = solve_camera(lm.points, load_template(lm.method), image.shape[:2])  # doctest: +SKIP
    """
    config = config or PoseConfig()
    optimise_focal = config.optimise_focal if optimise_focal is None else optimise_focal
    points = np.asarray(points, np.float64)
    posed = template if isinstance(template, PosedTemplate) else None
    # contiguous: cv2.projectPoints refuses strided views (a posed template's tables can be one)
    template = np.ascontiguousarray(posed.frontal if posed is not None else template, np.float64)
    if points.ndim != 2 or points.shape[1] != 2 or template.shape != (len(points), 3):
        raise ValueError(f"solve_camera needs points (P, 2) and a template (P, 3) in the same order; got "
                         f"{points.shape} and {template.shape} (use load_template(landmarks.method)).")
    if len(points) < 4:
        raise ValueError(f"solve_camera needs at least 4 points, got {len(points)}.")
    if not (np.all(np.isfinite(points)) and np.all(np.isfinite(template))):
        raise ValueError("solve_camera got non-finite landmark or template coordinates.")
    height, width = image_size
    K = default_intrinsics(height, width, focal if focal is not None else config.focal_factor * width)
    best = None
    for name, start in _starts(points, template, K).items():
        x0 = np.r_[start, 0.0] if optimise_focal else start
        result = least_squares(_residuals, x0, jac=_jacobian, method="lm", x_scale="jac",
                               args=(template, points, K, optimise_focal))
        if _in_front(template, result.x) and (best is None or result.cost < best[1].cost):
            best = (name, result)
    if best is None:
        raise ValueError("No camera places all template points in front of it; the landmarks are degenerate.")
    name, result = best
    if posed is not None:
        joint = least_squares(_posed_residuals, result.x, jac=_posed_jacobian, method="lm", x_scale="jac",
                              args=(posed, points, K, optimise_focal))
        joint_template = posed.at(Rotation.from_rotvec(joint.x[:3]).as_matrix())
        if _in_front(joint_template, joint.x):  # else keep the frontal template's fit
            name, result, template = name + "+posed", joint, joint_template
    if optimise_focal:
        K = K.copy()
        K[0, 0] = K[1, 1] = K[0, 0] * np.exp(result.x[6])
    rotation = Rotation.from_rotvec(result.x[:3]).as_matrix()
    return make_fit(points, template, K, np.c_[rotation, result.x[3:6]], image_size, config, name)


def make_fit(points: np.ndarray, template: np.ndarray, K: np.ndarray, world_to_camera: np.ndarray,
             image_size: tuple[int, int], config: PoseConfig | None = None, initialisation: str = ""
             ) -> CameraFit:
    """Measure a given camera against the landmarks and wrap it as a `CameraFit`.

    Args:
        points: (P, 2) landmarks; template: (P, 3); K: (3, 3); world_to_camera: (3, 4);
        image_size: (H, W).
    """
    config = config or PoseConfig()
    per_point = np.linalg.norm(project(template, K, world_to_camera) - points, axis=1)
    error = float(np.sqrt(np.mean(per_point**2)))
    threshold = config.max_error_fraction * image_size[1]
    return CameraFit(K=K, world_to_camera=world_to_camera, reprojection_error_px=error,
                     per_point_error_px=per_point, yaw_pitch_roll_deg=yaw_pitch_roll(world_to_camera[:, :3]),
                     accepted=bool(error <= threshold), threshold_px=float(threshold),
                     image_size=(int(image_size[0]), int(image_size[1])), initialisation=initialisation)
