"""The default all-points camera solve: its calibrated mesh template, triangulation, and the solve on it."""

from __future__ import annotations

import json

import numpy as np
import pytest
import skimage.data

from common.conventions import default_intrinsics, orbit_camera, rotation_from_yaw_pitch_roll
from pose import PoseConfig, load_template, prepare_photo, project, solve_camera, solve_inputs
from pose.landmarks import MESH_INDICES
from pose.mesh_template import MESH_METHOD, mirror_index, symmetrise, triangulate
from pose.template import EYE_DISTANCE, MESH_TEMPLATE_PATH


def _angle(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.degrees(np.arccos(np.clip((np.trace(a @ b.T) - 1) / 2, -1, 1))))


def test_shipped_mesh_template():
    template = load_template(MESH_METHOD)
    assert template.shape == (468, 3) and np.all(np.isfinite(template))
    assert np.allclose(symmetrise(template, mirror_index(template)), template, atol=1e-6)
    eyes = template[[MESH_INDICES["right_eye_outer"], MESH_INDICES["left_eye_outer"]]]
    assert np.linalg.norm(eyes[1] - eyes[0]) == pytest.approx(EYE_DISTANCE, rel=0.1)  # head units
    assert template[MESH_INDICES["nose_tip"], 2] < eyes[:, 2].min()  # the face looks towards -z
    provenance = json.loads(MESH_TEMPLATE_PATH.read_text())["provenance"]
    assert provenance["faces_seed"] != 0  # benchmarks/face_cameras.py evaluates seed 0


def test_mesh_solve_recovers_a_known_camera():
    """Exact projections of the 468-point template give back the camera (rotation, translation)."""
    template = load_template(MESH_METHOD)
    K = default_intrinsics(256, 256)
    for yaw, pitch, roll in ((25.0, -10.0, 3.0), (-33.0, 14.0, -5.0), (0.0, 0.0, 0.0)):
        truth = np.c_[rotation_from_yaw_pitch_roll(yaw, pitch, roll), [0.2, -0.1, 7.3]]
        fit = solve_camera(project(template, K, truth), template, (256, 256))
        assert _angle(fit.world_to_camera[:, :3], truth[:, :3]) < 1e-3
        assert np.allclose(fit.world_to_camera[:, 3], truth[:, 3], atol=1e-4)
        assert fit.accepted and fit.reprojection_error_px < 1e-3
        # 1-px landmark noise moves it by a fraction of a degree, not more
        noisy = project(template, K, truth) + np.random.default_rng(0).normal(0.0, 1.0, (468, 2))
        assert _angle(solve_camera(noisy, template, (256, 256)).world_to_camera[:, :3], truth[:, :3]) < 0.5


def test_triangulate_recovers_points_from_known_cameras():
    rng = np.random.default_rng(3)
    points = rng.uniform(-1.0, 1.0, (40, 3))
    cameras = np.stack([orbit_camera(yaw, pitch) for yaw, pitch in rng.uniform(-30, 30, (12, 2))])
    K = default_intrinsics(256, 256)
    pixels = project(points, K, cameras)  # (12, 40, 2)
    assert np.allclose(triangulate(pixels, K, cameras), points, atol=1e-6)
    noisy = pixels + rng.normal(0.0, 0.5, pixels.shape)
    noisy[0, :5] = np.nan  # a point missed in one view is solved from the others
    noisy[:11, 39] = np.nan  # one seen in a single view cannot be
    solved = triangulate(noisy, K, cameras)
    assert np.all(np.isnan(solved[39])) and np.all(np.isfinite(solved[:39]))
    assert np.abs(solved[:39] - points[:39]).max() < 0.1
    # each point minimises its pixel error (not only the DLT's algebraic one): scipy's LM finds no better
    from scipy.optimize import least_squares

    for i in (0, 7, 20):
        seen = np.isfinite(noisy[:, i, 0])

        def residual(x, i=i, seen=seen):
            return (project(x[None], K, cameras[seen])[:, 0] - noisy[seen, i]).ravel()

        best = least_squares(residual, points[i], method="lm", xtol=1e-12, ftol=1e-12)
        assert 0.5 * np.sum(residual(solved[i]) ** 2) <= best.cost * (1 + 1e-8) + 1e-12


def test_mirror_index_and_symmetrise():
    template = load_template(MESH_METHOD)
    mirror = mirror_index(template)
    assert np.array_equal(mirror[mirror], np.arange(468))
    assert mirror[MESH_INDICES["right_eye_outer"]] == MESH_INDICES["left_eye_outer"]
    assert mirror[MESH_INDICES["nose_tip"]] == MESH_INDICES["nose_tip"]
    with pytest.raises(ValueError, match="symmetric"):
        mirror_index(np.array([[-1.0, 0, 0], [0.9, 0, 0], [1.0, 0.05, 0]]))


def test_config_points_and_templates():
    with pytest.raises(ValueError, match="solve_points"):
        PoseConfig(solve_points="all")
    with pytest.raises(ValueError, match="paper5"):
        PoseConfig(template_path="refined.json")  # a 5-point template with the all-points solve
    assert PoseConfig().solve_points == "mesh" and PoseConfig.paper() == PoseConfig()
    assert PoseConfig(template_path="refined.json", solve_points="paper5").template_path == "refined.json"


def test_default_solve_on_photos():
    """The all-points solve on a real photo and its mirror: accepted, mirrored yaw and roll, and close to
    the 5-point solve (the photos have no ground truth; README, Camera error)."""
    image = skimage.data.astronaut()
    angles = {}
    for name, picture in (("photo", image), ("mirrored", np.ascontiguousarray(image[:, ::-1]))):
        for points in ("mesh", "paper5"):
            photo = prepare_photo(picture, 64, framing="landmarks", config=PoseConfig(solve_points=points))
            assert photo.info["solve_points"] == {"mesh": MESH_METHOD, "paper5": "face_mesh"}[points]
            assert photo.reprojection_error_px < 0.02 * 64
            angles[name, points] = np.array([photo.info[k] for k in ("yaw_deg", "pitch_deg", "roll_deg")])
    for points in ("mesh", "paper5"):
        flipped = angles["mirrored", points] * [-1, 1, -1]
        assert np.abs(flipped - angles["photo", points]).max() < 2.5
    assert np.abs(angles["photo", "mesh"] - angles["photo", "paper5"]).max() < 10.0
    points, template, method = solve_inputs(photo.landmarks, PoseConfig())
    assert points.shape == (468, 2) and template.shape == (468, 3) and method == MESH_METHOD
