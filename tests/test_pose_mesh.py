"""The all-points camera solves: the calibrated mesh templates (fixed and posed), triangulation, and the
solves on them."""

from __future__ import annotations

import json

import numpy as np
import pytest
import skimage.data

from common.conventions import default_intrinsics, orbit_camera, rotation_from_yaw_pitch_roll
from pose import PoseConfig, load_template, prepare_photo, project, save_template, solve_camera, solve_inputs
from pose.landmarks import MESH_INDICES, matching_mesh
from pose.mesh_template import (
    MESH_METHOD,
    MESH_POSED_METHOD,
    PosedTemplate,
    load_posed_template,
    mean_mesh_points,
    mirror_index,
    symmetrise,
    symmetrise_posed,
    triangulate,
    triangulate_posed,
)
from pose.template import EYE_DISTANCE, MESH_POSED_TEMPLATE_PATH, MESH_TEMPLATE_PATH, TemplateError


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
    with pytest.raises(ValueError, match="paper5"):
        PoseConfig(template_path="refined.json", solve_points="mesh")
    assert PoseConfig().solve_points == "mesh_posed" and PoseConfig.paper() == PoseConfig()
    assert PoseConfig(template_path="refined.json", solve_points="paper5").template_path == "refined.json"


def test_all_points_solves_on_photos():
    """The two all-points solves and the 5-point one on a real photo and its mirror: accepted, mirrored yaw
    and roll, and close to each other (the photos have no ground truth; README, Camera error)."""
    image = skimage.data.astronaut()
    methods = {"mesh_posed": MESH_POSED_METHOD, "mesh": MESH_METHOD, "paper5": "face_mesh"}
    angles = {}
    for name, picture in (("photo", image), ("mirrored", np.ascontiguousarray(image[:, ::-1]))):
        for points in methods:
            photo = prepare_photo(picture, 64, framing="landmarks", config=PoseConfig(solve_points=points))
            assert photo.info["solve_points"] == methods[points]
            assert photo.info["attention_mesh"] == (points == "mesh_posed")
            assert photo.info["initialisation"].endswith("+posed") == (points == "mesh_posed")
            assert photo.reprojection_error_px < 0.02 * 64
            angles[name, points] = np.array([photo.info[k] for k in ("yaw_deg", "pitch_deg", "roll_deg")])
    for points in methods:
        flipped = angles["mirrored", points] * [-1, 1, -1]
        assert np.abs(flipped - angles["photo", points]).max() < 2.5
    assert np.abs(angles["photo", "mesh"] - angles["photo", "paper5"]).max() < 10.0
    assert np.abs(angles["photo", "mesh_posed"] - angles["photo", "mesh"]).max() < 5.0
    landmarks = photo.landmarks  # the mirrored photo's, from the last (paper5) run: no attention mesh
    assert landmarks.mesh_attention is None
    points, template, method = solve_inputs(landmarks, PoseConfig(solve_points="mesh"))
    assert points.shape == (468, 2) and template.shape == (468, 3) and method == MESH_METHOD
    # the posed solve falls back to the plain points where the attention model found no face
    points, template, method = solve_inputs(landmarks, PoseConfig())
    assert isinstance(template, PosedTemplate) and method == MESH_POSED_METHOD
    assert np.array_equal(points, landmarks.mesh[:, :2])


def test_posed_solve_on_a_photo_uses_both_models():
    photo = prepare_photo(skimage.data.astronaut(), 64, framing="landmarks")
    landmarks = photo.landmarks
    assert landmarks.mesh_attention.shape == (478, 3)
    # the attention model found the same face, a few pixels at most from the plain model's points
    gap = np.linalg.norm(landmarks.mesh_attention[:468, :2] - landmarks.mesh[:, :2], axis=1)
    assert np.median(gap) < 0.05 * 64
    points, _, _ = solve_inputs(landmarks, PoseConfig())
    assert np.allclose(points, (landmarks.mesh[:, :2] + landmarks.mesh_attention[:468, :2]) / 2)


def test_shipped_posed_template():
    model = load_posed_template()
    assert model.coefficients.shape == (3, 468, 3) and np.all(np.isfinite(model.coefficients))
    mirror = mirror_index(load_template(MESH_METHOD))
    assert np.allclose(symmetrise_posed(model.coefficients, mirror), model.coefficients, atol=1e-6)
    eyes = model.frontal[[MESH_INDICES["right_eye_outer"], MESH_INDICES["left_eye_outer"]]]
    assert np.linalg.norm(eyes[1] - eyes[0]) == pytest.approx(EYE_DISTANCE, rel=0.1)
    assert model.frontal[MESH_INDICES["nose_tip"], 2] < eyes[:, 2].min()
    # the pose terms are corrections below a head unit per unit of sin(angle); the largest are the
    # midline points' x under yaw, which trade off against their depth (a point moved in x in proportion
    # to sin(yaw) projects nearly as one moved in depth), so they are not small one by one
    assert 0.0 < np.abs(model.coefficients[1:]).max() < 1.0
    assert np.median(np.abs(model.coefficients[1:])) < 0.1
    provenance = json.loads(MESH_POSED_TEMPLATE_PATH.read_text())["provenance"]
    assert provenance["faces_seed"] != 0  # benchmarks/face_cameras.py evaluates seed 0


def test_posed_template_is_mirror_consistent():
    """A symmetrised posed template seen at (yaw, pitch, roll) is the mirror image of itself seen at
    (−yaw, pitch, −roll), point for mirrored point."""
    model = load_posed_template()
    mirror = mirror_index(load_template(MESH_METHOD))
    for yaw, pitch, roll in ((25.0, -10.0, 4.0), (-12.0, 13.0, 0.0)):
        seen = model.at(rotation_from_yaw_pitch_roll(yaw, pitch, roll))
        mirrored = model.at(rotation_from_yaw_pitch_roll(-yaw, pitch, -roll))
        assert np.allclose(mirrored[mirror] * [-1.0, 1.0, 1.0], seen, atol=1e-6)


def test_posed_solve_recovers_a_known_camera():
    """Exact projections of a posed template at a known camera give it back, which the frontal template
    alone does not (so the joint solve is what recovers it)."""
    model = load_posed_template()
    K = default_intrinsics(256, 256)
    for yaw, pitch, roll in ((30.0, -12.0, 3.0), (-33.0, 14.0, -5.0), (0.0, 0.0, 0.0)):
        truth = np.c_[rotation_from_yaw_pitch_roll(yaw, pitch, roll), [0.2, -0.1, 7.3]]
        pixels = project(model.at(truth[:, :3]), K, truth)
        fit = solve_camera(pixels, model, (256, 256))
        assert fit.initialisation.endswith("+posed")
        assert _angle(fit.world_to_camera[:, :3], truth[:, :3]) < 0.01
        assert np.allclose(fit.world_to_camera[:, 3], truth[:, 3], atol=1e-3)
        assert fit.reprojection_error_px < 1e-2
        if yaw:
            frontal = solve_camera(pixels, model.frontal, (256, 256))
            assert _angle(frontal.world_to_camera[:, :3], truth[:, :3]) > 0.5


def test_triangulate_posed_recovers_a_planted_model():
    rng = np.random.default_rng(5)
    truth = np.stack([rng.uniform(-1.0, 1.0, (30, 3)), rng.normal(0.0, 0.1, (30, 3)),
                      rng.normal(0.0, 0.1, (30, 3))])
    cameras = np.stack([orbit_camera(yaw, pitch) for yaw, pitch in
                        zip(rng.uniform(-35, 35, 40), rng.uniform(-15, 15, 40), strict=True)])
    K = default_intrinsics(256, 256)
    pixels = np.stack([project(PosedTemplate(truth).at(c[:, :3]), K, c) for c in cameras])
    assert np.allclose(triangulate_posed(pixels, K, cameras), truth, atol=1e-6)
    noisy = pixels + rng.normal(0.0, 0.3, pixels.shape)
    noisy[:36, 29] = np.nan  # seen in 4 views: 8 equations for 9 unknowns
    solved = triangulate_posed(noisy, K, cameras)
    assert np.all(np.isnan(solved[:, 29])) and np.all(np.isfinite(solved[:, :29]))
    assert np.abs(solved[0, :29, :2] - truth[0, :29, :2]).max() < 0.02  # depth is less well determined
    assert np.abs(solved[0, :29, 2] - truth[0, :29, 2]).max() < 0.15
    # a fixed template cannot follow the pose terms: its pixel error is well above the posed model's
    fixed = triangulate(noisy[:, :29], K, cameras)
    posed_error = np.stack([project(PosedTemplate(solved[:, :29]).at(c[:, :3]), K, c) for c in cameras])
    fixed_error = project(fixed, K, cameras)
    target = noisy[:, :29]
    assert np.sqrt(np.mean((posed_error - target) ** 2)) < 0.5 * np.sqrt(np.mean((fixed_error - target) ** 2))


def test_mean_mesh_points_and_matching():
    plain = np.random.default_rng(1).uniform(0, 64, (468, 3))
    attention = np.concatenate([plain + 1.0, np.zeros((10, 3))])
    assert np.allclose(mean_mesh_points(plain, attention), plain[:, :2] + 0.5)
    assert np.array_equal(mean_mesh_points(plain, None), plain[:, :2])
    attention[3, 0] = np.nan  # the benchmark's renders mark a missing attention face with NaN
    assert np.array_equal(mean_mesh_points(plain, attention), plain[:, :2])
    far = plain + np.array([40.0, 0.0, 0.0])  # another face in the photo
    assert matching_mesh([far], plain) is None and matching_mesh([], plain) is None
    assert matching_mesh([far, plain + 1.0], plain) is not None


def test_posed_template_files(tmp_path):
    """A fixed mesh template where a posed one is needed, and a damaged posed one, are clear errors."""
    with pytest.raises(TemplateError, match="not a posed template"):
        load_posed_template(MESH_TEMPLATE_PATH)
    model = load_posed_template()
    bad = tmp_path / "posed.json"
    save_template({MESH_POSED_METHOD: model.frontal}, bad, {},
                  pose_terms={"sin_yaw": model.coefficients[1], "sin_pitch": model.coefficients[2][:10]})
    with pytest.raises(TemplateError, match="468 finite"):
        load_posed_template(bad)
    good = tmp_path / "copy.json"
    save_template({MESH_POSED_METHOD: model.frontal}, good, {"note": "copy"},
                  pose_terms={"sin_yaw": model.coefficients[1], "sin_pitch": model.coefficients[2]})
    assert np.allclose(load_posed_template(good).coefficients, model.coefficients, atol=1e-6)
    config = PoseConfig(mesh_template_path=str(MESH_TEMPLATE_PATH))  # the fixed one, for the posed solve
    with pytest.raises(TemplateError, match="not a posed template"):
        prepare_photo(skimage.data.astronaut(), 64, framing="landmarks", config=config)


def test_cache_fingerprint_covers_the_mesh_templates():
    """Photo and faces caches are fingerprinted with the templates their solve reads, the posed
    template's pose terms included, so a cache solved another way (or against another template) is
    rebuilt rather than reused."""
    from dataset import PrepareConfig
    from dataset.faces import FacesConfig, FacesSource
    from dataset.sources import PHOTO_SOURCES

    posed, fixed = PrepareConfig.cpu(), PrepareConfig.cpu().with_(pose=PoseConfig(solve_points="mesh"))
    shipped = json.loads(MESH_POSED_TEMPLATE_PATH.read_text())
    for source in (PHOTO_SOURCES["ffhq"], FacesSource(FacesConfig())):
        settings = source.settings(posed)
        assert settings["mesh_posed_template"]["pose_terms"] == shipped["pose_terms"]
        assert settings["mesh_posed_template"]["points"] == shipped["points"]
        assert "mesh_template_points" in source.settings(fixed) and settings != source.settings(fixed)
        assert source.manifest_extra(posed)["mesh_template"]["provenance"] == shipped["provenance"]


@pytest.mark.parametrize("optimise_focal", [False, True])
def test_posed_jacobian_matches_finite_differences(optimise_focal):
    from pose.camera import _posed_jacobian, _posed_residuals

    model = load_posed_template()
    K = default_intrinsics(256, 256)
    truth = np.c_[rotation_from_yaw_pitch_roll(28.0, -11.0, 4.0), [0.1, 0.2, 7.2]]
    points = project(model.at(truth[:, :3]), K, truth) + np.random.default_rng(2).normal(0, 1.0, (468, 2))
    params = np.r_[0.3, -0.2, 0.05, 0.1, 0.2, 7.0, 0.03][:7 if optimise_focal else 6]
    analytic = _posed_jacobian(params, model, points, K, optimise_focal)
    numeric = np.stack([(_posed_residuals(params + e, model, points, K, optimise_focal)
                         - _posed_residuals(params - e, model, points, K, optimise_focal)) / 2e-6
                        for e in np.eye(len(params)) * 1e-6], axis=1)
    assert analytic.shape == numeric.shape
    assert np.abs(analytic - numeric).max() < 1e-4 * np.abs(numeric).max()


def test_default_solve_on_faces_renders_against_the_truth():
    """End to end on renders Face Mesh really sees (a seed neither template was calibrated on): the
    default solve's cameras are within a few degrees of the truth, and no worse than the fixed template's
    (README, "Camera error of the landmark solve", measures this over 360 renders)."""
    from dataset.mesh_template import render_landmark_set, render_points

    renders, _ = render_landmark_set(8, 3, seed=3, size=256)
    model, fixed = load_posed_template(), load_template(MESH_METHOD)

    def errors(template, key):
        fits = [solve_camera(render_points(r, key), template, (256, 256)) for r in renders]
        return np.array([_angle(f.world_to_camera[:, :3], r["world_to_camera"][:, :3])
                         for f, r in zip(fits, renders, strict=True)])

    posed, plain = errors(model, "mean_of_models"), errors(fixed, "mesh")
    assert len(renders) == 24 and all(np.all(np.isfinite(r["mesh_refined"])) for r in renders)
    assert np.median(posed) < 3.0 and np.percentile(posed, 90) < 6.0, (np.median(posed), posed.max())
    assert np.median(posed) <= np.median(plain) + 0.25, (np.median(posed), np.median(plain))
