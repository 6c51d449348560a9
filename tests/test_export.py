"""export/: cameras, media writers, marching-cubes meshes and metrics, on inputs with known answers."""

from __future__ import annotations

import json
import math

import cv2
import numpy as np
import pytest

from export.cameras import (
    default_intrinsics,
    load_camera_file,
    look_at_origin,
    orbit_cameras,
    scale_intrinsics,
    yaw_cameras,
)
from export.media import colorize_depth, image_grid, save_gif, save_mp4, save_png
from export.mesh import (
    Mesh,
    extract_mesh,
    grid_points,
    is_watertight,
    mesh_volume,
    preview_mesh,
    read_ply,
    write_ply,
)
from export.metrics import depth_errors, lpips_status, psnr, ssim


def camera_centre(w2c: np.ndarray) -> np.ndarray:
    return -w2c[:, :3].T @ w2c[:, 3]


def project(K: np.ndarray, w2c: np.ndarray, point: np.ndarray) -> np.ndarray:
    cam = w2c[:, :3] @ point + w2c[:, 3]
    uv = K @ cam
    return uv[:2] / uv[2]


# ---------------------------------------------------------------- cameras


def test_yaw_cameras_circle_the_vertical_axis_and_keep_looking_at_the_origin():
    K = np.array([[128.0, 0, 32], [0, 128.0, 32], [0, 0, 1]])
    frontal = look_at_origin(7.0)
    cams = yaw_cameras(frontal, [0.0, 30.0, 90.0, -45.0])
    np.testing.assert_allclose(cams[0], frontal, atol=1e-6)
    for w2c in cams:
        centre = camera_centre(w2c)
        assert np.linalg.norm(centre) == pytest.approx(7.0, rel=1e-5)
        assert centre[1] == pytest.approx(0.0, abs=1e-5)  # stays at the height of the origin
        np.testing.assert_allclose(project(K, w2c, np.zeros(3)), [32, 32], atol=1e-4)
        np.testing.assert_allclose(w2c[:, :3] @ w2c[:, :3].T, np.eye(3), atol=1e-5)
    # Positive yaw moves the camera towards world -x; 90 degrees puts it on the -x axis.
    np.testing.assert_allclose(camera_centre(cams[2]), [-7.0, 0.0, 0.0], atol=1e-4)
    assert camera_centre(cams[1])[0] < 0 < camera_centre(cams[3])[0]


def test_orbit_starts_at_the_input_camera_and_loops():
    frontal = look_at_origin(7.0)
    cams = orbit_cameras(frontal, n_frames=16, yaw_amplitude_deg=30, pitch_amplitude_deg=10)
    assert cams.shape == (16, 3, 4)
    np.testing.assert_allclose(cams[0], frontal, atol=1e-6)
    yaws = np.degrees(np.arcsin(-np.array([camera_centre(c)[0] for c in cams]) / 7.0))
    assert yaws.max() == pytest.approx(30.0, abs=1.0) and yaws.min() == pytest.approx(-30.0, abs=1.0)
    assert np.linalg.norm(cams[1] - cams[-1]) > 1e-3  # the loop turns, it does not stand still


def test_scale_intrinsics_keeps_the_image_of_a_point_at_the_same_relative_place():
    K64 = np.array([[128.0, 0, 32], [0, 128.0, 32], [0, 0, 1]])
    K256 = scale_intrinsics(K64, (64, 64), (256, 256))
    w2c = look_at_origin(7.0, yaw_deg=20)
    point = np.array([0.3, -0.2, 0.1])
    np.testing.assert_allclose(project(K256, w2c, point), 4.0 * project(K64, w2c, point), rtol=1e-5)


def test_camera_file_round_trip_and_clear_errors(tmp_path):
    K = [[100.0, 0, 50], [0, 100.0, 50], [0, 0, 1]]
    w2c = look_at_origin(6.0, yaw_deg=10).tolist()
    path = tmp_path / "cam.json"
    path.write_text(json.dumps({"K": K, "world_to_camera": w2c, "height": 100, "width": 100}))
    K_read, w2c_read, size = load_camera_file(path)
    assert size == (100, 100) and w2c_read.shape == (1, 3, 4)
    np.testing.assert_allclose(K_read, K)
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"K": K}))
    with pytest.raises(ValueError, match="world_to_camera"):
        load_camera_file(bad)


# ---------------------------------------------------------------- media


def test_colorize_depth_is_hot_near_cold_far_and_black_outside_the_mask():
    depth = np.tile(np.linspace(6.0, 8.0, 32, dtype=np.float32), (8, 1))
    mask = np.ones_like(depth)
    mask[:, -4:] = 0
    rgb = colorize_depth(depth, mask)
    assert rgb.shape == (8, 32, 3) and rgb.dtype == np.uint8
    near, far = rgb[0, 0].astype(int), rgb[0, 27].astype(int)
    assert near[0] > near[2] and far[2] > far[0]
    assert (rgb[:, -4:] == 0).all()


def test_image_grid_pads_mixed_cells_and_media_round_trip(tmp_path):
    a = np.zeros((10, 12, 3), np.float32)
    b = np.full((8, 8), 255, np.uint8)
    grid = image_grid([[a, b], [b]], spacing=2)
    assert grid.shape == (22, 26, 3)
    assert (grid[:10, :12] == 0).all()

    png = save_png(tmp_path / "g.png", grid)
    np.testing.assert_array_equal(cv2.cvtColor(cv2.imread(str(png)), cv2.COLOR_BGR2RGB), grid)

    frames = [np.full((17, 21, 3), v, np.uint8) for v in (0, 128, 255)]
    mp4 = save_mp4(tmp_path / "v.mp4", frames, fps=10)
    cap = cv2.VideoCapture(str(mp4))
    assert int(cap.get(cv2.CAP_PROP_FRAME_COUNT)) == 3
    ok, first = cap.read()
    cap.release()
    assert ok and first.shape == (18, 22, 3)  # padded to even sizes

    from PIL import Image

    gif = save_gif(tmp_path / "v.gif", frames, fps=10)
    with Image.open(gif) as im:
        assert im.n_frames == 3
    assert not list(tmp_path.glob(".*"))  # no temp files left behind


# ---------------------------------------------------------------- mesh


def test_marching_cubes_sphere_is_watertight_with_the_analytic_volume(tmp_path):
    radius, bound = 1.0, 1.5
    r = np.linalg.norm(grid_points(64, bound), axis=-1)
    density = np.clip(50.0 * (radius - r) + 10.0, 0.0, None).astype(np.float32)  # level 10 at r = radius
    mesh = extract_mesh(density, bound, level=10.0)
    assert is_watertight(mesh)
    assert mesh_volume(mesh) == pytest.approx(4.0 / 3.0 * math.pi * radius**3, rel=0.02)
    np.testing.assert_allclose(np.linalg.norm(mesh.vertices, axis=1), radius, atol=0.03)
    outward = np.einsum("ij,ij->i", mesh.normals, mesh.vertices)
    assert (outward > 0).mean() > 0.99

    mesh.colors = np.tile(np.array([[200, 100, 50]], np.uint8), (len(mesh.vertices), 1))
    picture = preview_mesh(mesh, default_intrinsics(64, 64), look_at_origin(7.0), 64, 64)
    assert (picture[0, 0] == 255).all()  # background
    assert picture[32, 32, 0] > picture[32, 32, 2]  # the sphere, in its (shaded) orange
    # The sphere's outline: focal 128 px, distance 7, radius 1 -> about 128 / sqrt(48) = 18.5 px.
    assert (picture[32, 32 + 16] != 255).any() and (picture[32, 32 + 21] == 255).all()
    back = read_ply(write_ply(tmp_path / "sphere.ply", mesh))
    np.testing.assert_allclose(back.vertices, mesh.vertices)
    np.testing.assert_array_equal(back.faces, mesh.faces)
    np.testing.assert_array_equal(back.colors, mesh.colors)


def test_a_surface_cut_by_the_grid_is_capped_and_an_empty_grid_is_a_clear_error():
    r = np.linalg.norm(grid_points(32, 1.0), axis=-1)
    mesh = extract_mesh((r < 5.0).astype(np.float32) * 20.0, 1.0, level=10.0)  # density fills the grid
    assert is_watertight(mesh)
    assert mesh_volume(mesh) == pytest.approx(8.0, rel=0.01)
    with pytest.raises(ValueError, match="iso-level"):
        extract_mesh(np.zeros((8, 8, 8), np.float32), 1.0, level=10.0)


def test_mesh_volume_of_a_unit_tetrahedron():
    tet = Mesh(
        np.array([[0, 0, 0], [1, 0, 0], [0, 1, 0], [0, 0, 1]], np.float32),
        np.array([[0, 2, 1], [0, 1, 3], [0, 3, 2], [1, 2, 3]]),
        np.zeros((4, 3), np.float32),
    )
    assert mesh_volume(tet) == pytest.approx(1.0 / 6.0)
    assert is_watertight(tet)


# ---------------------------------------------------------------- metrics


def test_image_metrics_on_known_answers():
    rng = np.random.default_rng(0)
    target = rng.uniform(0.2, 0.8, (32, 32, 3))
    assert psnr(target, target) == math.inf
    assert ssim(target, target) == pytest.approx(1.0)
    assert psnr(target + 0.1, target) == pytest.approx(20.0, abs=1e-6)
    assert psnr(np.clip(target + 0.01, 0, 1), target) == pytest.approx(40.0, abs=1e-6)
    mask = np.zeros((32, 32))
    mask[:, :12] = 1.0
    shifted = target.copy()
    shifted[:, 16:] += 0.5  # outside the mask and its SSIM windows: must not count
    assert psnr(shifted, target, mask) == math.inf
    assert ssim(shifted, target, mask) == pytest.approx(1.0)
    assert ssim(shifted, target) < 0.9
    assert ssim(rng.uniform(0, 1, (32, 32, 3)), target) < 0.2
    u8 = (target * 255).astype(np.uint8)
    assert psnr(u8, u8 / 255.0) == math.inf  # uint8 is read as value / 255


def test_depth_errors_on_known_answers():
    gt = np.full((16, 16), 5.0)
    gt[:, 8:] = 6.0
    gt[0, 0] = 0.0  # background marker: ignored
    perfect = depth_errors(gt, gt)
    assert perfect["abs_rel"] == 0.0 and perfect["rmse"] == 0.0 and perfect["corr"] == pytest.approx(1.0)
    assert perfect["n_pixels"] == 255
    shifted = depth_errors(gt + 0.5, gt)
    assert shifted["rmse"] == pytest.approx(0.5)
    valid = gt[gt > 0]
    assert shifted["abs_rel"] == pytest.approx(np.mean(0.5 / valid))
    assert shifted["corr"] == pytest.approx(1.0)  # a constant offset keeps the shape
    inverted = depth_errors(11.0 - gt, gt, mask=gt > 0)
    assert inverted["corr"] == pytest.approx(-1.0)
    # Median scaling removes a global scale (size vs distance), not an offset or a wrong shape.
    assert perfect["abs_rel_scaled"] == 0.0
    scaled = depth_errors(gt * 1.1, gt)
    assert scaled["abs_rel"] == pytest.approx(0.1)
    assert scaled["abs_rel_scaled"] == pytest.approx(0.0, abs=1e-12)
    rescaled_shift = (valid + 0.5) * 6 / 6.5  # medians 6.5 and 6
    assert shifted["abs_rel_scaled"] == pytest.approx(np.mean(np.abs(rescaled_shift - valid) / valid))
    with pytest.raises(ValueError, match="mask"):
        depth_errors(gt, gt, mask=np.zeros((16, 16)))


def test_lpips_status_never_claims_what_is_missing():
    available, note = lpips_status()
    assert isinstance(available, bool) and note
    if not available:
        assert "skipped" in note


def test_every_camera_builder_follows_one_convention():
    """look_at_origin, orbit paths, the synthetic data and the pose solver agree (common.conventions)."""
    from common.conventions import orbit_camera, yaw_pitch_roll
    from export.cameras import orbit_cameras

    for yaw, pitch in ((30.0, 15.0), (-20.0, 10.0), (0.0, -12.0)):
        truth = orbit_camera(yaw, pitch, 7.0)
        assert np.allclose(look_at_origin(7.0, yaw_deg=yaw, pitch_deg=pitch), truth, atol=1e-6)
        assert np.allclose(yaw_pitch_roll(truth[:, :3]), [yaw, pitch, 0.0], atol=1e-6)
    # An orbit from the frontal camera passes through the convention's cameras at its frames' angles:
    # frame 2 of 8 has yaw A_yaw sin(pi/2) = 35 and pitch A_pitch sin(pi) = 0; frame 1 both non-zero.
    frames = orbit_cameras(look_at_origin(7.0), n_frames=8)
    angle = 2 * np.pi / 8
    assert np.allclose(frames[1], orbit_camera(35 * np.sin(angle), 10 * np.sin(2 * angle), 7.0), atol=1e-5)
    assert np.allclose(frames[2], orbit_camera(35.0, 0.0, 7.0), atol=1e-5)
