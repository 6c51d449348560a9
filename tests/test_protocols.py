"""The paper's evaluation protocols (issue 14, item 3): depth at landmarks (3DFAW), PSNR / SSIM inside the
foreground (HUMBI), and the 3DFAW and HUMBI folder readers, on folders written here in the published
layouts from the ``faces`` generator's renders (whose true depth is known)."""

from __future__ import annotations

import json
import math
from pathlib import Path
from types import SimpleNamespace

import cv2
import numpy as np
import pytest
import torch

from common.conventions import default_intrinsics, orbit_camera
from dataset import faces as F
from export import evaluation
from export.benchmark_sets import read_3dfaw, read_3dfaw_landmarks, read_humbi_cameras, read_humbi_face
from export.metrics import depth_corr_sum, landmark_depths, pearson, sample_at_points
from pose.camera import project

pytestmark = pytest.mark.usefixtures("keep_taichi_arch")
SIDE = 256  # the renders written into the folders


# ---------------------------------------------------------------------------------------------------
# Metrics


def test_sample_at_points_reads_the_pixel_that_contains_each_point():
    values = np.arange(12.0).reshape(3, 4)  # value = 4 row + column
    points = np.array([[3.99, 0.0], [0.0, 2.5], [1.5, 1.5], [-0.01, 1.0], [4.0, 0.0], [np.nan, 0.0]])
    got = sample_at_points(values, points)
    np.testing.assert_array_equal(got[:3], [3.0, 8.0, 5.0])  # (u, v) = (column, row)
    assert np.isnan(got[3:]).all()


def test_pearson_and_landmark_depths_ignore_scale_offset_and_hidden_points():
    rng = np.random.default_rng(1)
    truth = rng.uniform(6.0, 8.0, 20)
    assert pearson(3.0 * truth - 5.0, truth) == pytest.approx(1.0)
    assert pearson(-truth, truth) == pytest.approx(-1.0)
    assert math.isnan(pearson(np.ones(20), truth)) and math.isnan(pearson(truth[:2], truth[:2]))
    # A depth map equal to 2 x the truth + 1 at each landmark's pixel, garbage at the hidden ones.
    depth = np.full((16, 16), 100.0)
    points = np.stack([rng.integers(0, 16, 20) + 0.5, rng.integers(0, 16, 20) + 0.5], axis=1)
    visible = np.ones(20, bool)
    visible[:4] = False
    for (u, v), t, seen in zip(points, truth, visible, strict=True):
        if seen:
            depth[int(v), int(u)] = 2.0 * t + 1.0
    rendered, true = landmark_depths(depth, points, truth, visible)
    assert np.isnan(rendered[:4]).all() and np.isnan(true[:4]).all()
    assert pearson(rendered, true) == pytest.approx(1.0)
    # Reading the map at (v, u) instead of (u, v), or counting the hidden landmarks, breaks it.
    assert pearson(*landmark_depths(depth, points[:, ::-1], truth, visible)) < 0.9
    assert pearson(*landmark_depths(depth, points, truth, None)) < 0.9


def test_depth_corr_sum_is_depthnets_trace_of_abs_correlations():
    rng = np.random.default_rng(2)
    true = rng.normal(size=(30, 5))
    pred = true * np.array([1.0, -2.0, 0.5, 1.0, 1.0]) + rng.normal(scale=[0, 0, 0, 0.5, 5.0], size=(30, 5))
    expected = sum(abs(np.corrcoef(pred[:, k], true[:, k])[0, 1]) for k in range(5))
    total, counted = depth_corr_sum(pred, true)
    assert counted == 5 and total == pytest.approx(expected)
    assert total == pytest.approx(3.0 + abs(np.corrcoef(pred[:, 3], true[:, 3])[0, 1])
                                  + abs(np.corrcoef(pred[:, 4], true[:, 4])[0, 1]))
    # A landmark seen in fewer than 3 views does not count; the others keep their correlation.
    pred[2:, 0] = np.nan
    total2, counted2 = depth_corr_sum(pred, true)
    assert counted2 == 4 and total2 == pytest.approx(expected - 1.0)


def test_foreground_scores_count_only_the_foreground():
    rng = np.random.default_rng(3)
    image = rng.uniform(0.2, 0.8, (16, 16, 3))
    foreground = np.zeros((16, 16), np.float32)
    foreground[4:12, 4:12] = 1.0
    pred = image.copy()
    pred[foreground == 0] += rng.normal(0.0, 0.2, (int((foreground == 0).sum()), 3))  # wrong off the head
    view = {"color": pred, "opacity": np.ones((16, 16)), "depth": np.zeros((16, 16))}
    scores = evaluation.score_view(view, image, None, None, None, foreground)
    assert scores["psnr_fg"] == math.inf and scores["psnr"] < 20.0
    assert scores["ssim_fg"] > scores["ssim"] + 0.1  # 7x7 windows at the edge still see the noise
    # Without a foreground mask there are no foreground scores; with the view's own mask, it is used.
    assert "psnr_fg" not in evaluation.score_view(view, image, None, None, None)
    own = evaluation.score_view(view, image, (foreground * 255).astype(np.uint8), None, None)
    assert own["psnr_fg"] == math.inf


# ---------------------------------------------------------------------------------------------------
# Folders in the published layouts, from faces renders


@pytest.fixture(scope="module")
def identities():
    config = F.FacesConfig()
    return [F.sample_identity(F.identity_rng(config, i), config.shape_noise) for i in range(2)]


def inner_landmarks(identity, count: int = 66) -> np.ndarray:
    """``count`` Face Mesh indices away from the face oval (seen from every test view)."""
    return np.flatnonzero(np.abs(identity.vertices[:F.N_MESH, 0]) < 0.45)[:: 3][:count]


FAW_VIEWS = [(-14.0, 4.0), (-7.0, -5.0), (0.0, 0.0), (8.0, 6.0), (15.0, -4.0)]


def write_3dfaw(root: Path, identity) -> list[str]:
    """ROOT/valid_img, valid_lm and list_valid_test.txt (3 test, 2 valid images) of one head at FAW_VIEWS;
    z is the landmark's camera-space depth (the test's choice; correlation ignores its units)."""
    (root / "valid_img").mkdir(parents=True)
    (root / "valid_lm").mkdir()
    K, marks = default_intrinsics(SIDE, SIDE), inner_landmarks(identity)
    names, lines = [], []
    for i, (yaw, pitch) in enumerate(FAW_VIEWS):
        name = f"image{i:05d}"
        w2c = orbit_camera(yaw, pitch)
        image, _ = F.render_face(identity, K, w2c, SIDE)
        cv2.imwrite(str(root / "valid_img" / f"{name}.jpg"), image[..., ::-1], [cv2.IMWRITE_JPEG_QUALITY, 95])
        points = identity.vertices[marks]
        uv, z = project(points, K, w2c), (points @ w2c[:, :3].T + w2c[:, 3])[:, 2]
        rows = [f"{u:.3f},{v:.3f},{d:.5f}" for (u, v), d in zip(uv, z, strict=True)]
        (root / "valid_lm" / f"{name}_lm.csv").write_text("\n".join(rows) + "\n")
        lines.append(f"{name},{'test' if i % 2 == 0 else 'valid'},{('left', 'center', 'right')[i % 3]}")
        names.append(name)
    (root / "list_valid_test.txt").write_text("\n".join(lines) + "\n")
    return names


HUMBI_CAMERAS = {0: (0.0, 0.0), 5: (-18.0, 5.0), 12: (20.0, -4.0)}


def write_humbi(root: Path, identities) -> None:
    """ROOT/subject_<n>/face/{intrinsic,extrinsic}.txt and frame 00000001's image_cropped/ for each head,
    in HUMBI's formats (camera header line "0 <camera>"; extrinsic centre then R, world to camera)."""
    K = default_intrinsics(SIDE, SIDE)
    for n, identity in enumerate(identities, start=1):
        face = root / f"subject_{n}" / "face"
        crops = face / "00000001" / "image_cropped"
        crops.mkdir(parents=True)
        header = ["Numcam: 3", "numframes: 3", "numP: 3"]
        intrinsic, extrinsic, crop_lines = list(header), list(header), []
        for camera, (yaw, pitch) in HUMBI_CAMERAS.items():
            w2c = orbit_camera(yaw, pitch)
            centre = -w2c[:, :3].T @ w2c[:, 3]
            intrinsic += [f"0 {camera}", *(" ".join(f"{v:.6f}" for v in row) for row in K)]
            extrinsic += [f"0 {camera}", " ".join(f"{v:.6f}" for v in centre),
                          *(" ".join(f"{v:.9f}" for v in row) for row in w2c[:, :3])]
            crop_lines.append(f"{camera} {700 + camera} {956 + camera} {300 + camera} {556 + camera}")
            image, _ = F.render_face(identity, K, w2c, SIDE)
            cv2.imwrite(str(crops / f"image{camera:07d}.jpg"), image[..., ::-1],
                        [cv2.IMWRITE_JPEG_QUALITY, 95])
        (face / "intrinsic.txt").write_text("\n".join(intrinsic) + "\n")
        (face / "extrinsic.txt").write_text("\n".join(extrinsic) + "\n")
        (crops / "list.txt").write_text("\n".join(crop_lines) + "\n")


def test_read_3dfaw_follows_the_layout(tmp_path, identities):
    names = write_3dfaw(tmp_path / "faw", identities[0])
    test = read_3dfaw(tmp_path / "faw")  # the split list exists: its test images by default
    assert [item.name for item in test] == names[::2]
    assert [item.orientation for item in test] == ["left", "right", "center"]
    assert [item.name for item in read_3dfaw(tmp_path / "faw", "valid")] == names[1::2]
    first = test[0]
    assert first.image_path == tmp_path / "faw" / "valid_img" / f"{names[0]}.jpg"
    K, w2c = default_intrinsics(SIDE, SIDE), orbit_camera(*FAW_VIEWS[0])
    expected = project(identities[0].vertices[inner_landmarks(identities[0])], K, w2c)
    np.testing.assert_allclose(first.landmarks[:, :2], expected, atol=1e-3)
    # Mistakes are one sentence each.
    (tmp_path / "faw" / "list_valid_test.txt").unlink()
    assert len(read_3dfaw(tmp_path / "faw")) == len(names)  # no list: every valid image
    with pytest.raises(ValueError, match="test subset is unknown"):
        read_3dfaw(tmp_path / "faw", "test")
    bad = tmp_path / "faw" / "valid_lm" / f"{names[1]}_lm.csv"
    bad.write_text("1,2,3\n")
    with pytest.raises(ValueError, match="holds 1 landmarks"):
        read_3dfaw_landmarks(bad)
    with pytest.raises(ValueError, match="is not a 3DFAW folder"):
        read_3dfaw(tmp_path)


def test_read_humbi_face_follows_the_layout(tmp_path, identities):
    write_humbi(tmp_path / "humbi", identities)
    cameras = read_humbi_cameras(tmp_path / "humbi" / "subject_1" / "face")
    assert sorted(cameras) == sorted(HUMBI_CAMERAS)
    for camera, (yaw, pitch) in HUMBI_CAMERAS.items():
        K, w2c = cameras[camera]
        np.testing.assert_allclose(K, default_intrinsics(SIDE, SIDE), atol=1e-6)
        np.testing.assert_allclose(w2c, orbit_camera(yaw, pitch), atol=1e-5)  # [R | -R C]
    views = read_humbi_face(tmp_path / "humbi")
    assert [(v.subject, v.camera) for v in views] == [(f"subject_{n}", c) for n in (1, 2) for c in (0, 5, 12)]
    assert views[1].frame == "00000001" and views[1].crop == (705.0, 961.0, 305.0, 561.0)
    assert views[1].image_path.name == "image0000005.jpg"
    assert len(read_humbi_face(tmp_path / "humbi", {"subject_2"})) == 3
    with pytest.raises(ValueError, match="is not a HUMBI folder"):
        read_humbi_face(tmp_path)


# ---------------------------------------------------------------------------------------------------
# The protocols on those folders, with a stand-in model whose depth is the true head's


def true_depth_renderer(identities):
    """A stand-in for ``render_view``: the true head of identity ``int(latent[0])`` rasterised from the
    given camera (depth = ray distance, opaque on the head)."""
    triangles, _ = F.face_triangles()

    def render(model, latent, K, world_to_camera, height, width, chunk=8192):
        identity = identities[int(torch.as_tensor(latent).reshape(-1)[0])]
        raster = F.rasterise(identity.vertices, triangles, np.asarray(K, np.float64),
                             np.asarray(world_to_camera, np.float64), height, width)
        hit = raster.hit.astype(np.float32)
        colour = np.zeros((height, width, 3), np.float32)
        return {"color": colour, "opacity": hit, "depth": raster.depth * hit}

    return render


def test_3dfaw_protocol_finds_the_true_depth_at_the_landmarks(tmp_path, identities, monkeypatch):
    write_3dfaw(tmp_path / "faw", identities[0])
    monkeypatch.setattr(evaluation, "render_view", true_depth_renderer(identities))
    train = SimpleNamespace(manifest={"settings": {"framing": "landmarks"}}, image_size=(64, 64))
    folders = evaluation.BenchmarkFolders(faw=tmp_path / "faw", faw_subset="valid",
                                          fit=lambda model, image, mask, K, w2c: torch.zeros(1))
    (tmp_path / "faw" / "list_valid_test.txt").unlink()  # every valid image: 5 views for DepthCorr
    result = evaluation.evaluate_3dfaw(None, train, folders, None, 8192)
    assert result["n_images"] == 5 and result["skipped"] == {}
    assert [r["name"] for r in result["per_image"]] == [f"image{i:05d}" for i in range(5)]
    assert result["landmark_count"] >= 60  # the landmarks land on the rendered head in the prepared crop
    # Measured 0.92 (the solved camera is a few degrees off the true one, depth is read at 64²); the
    # landmarks mapped without the crop's offset score 0.68.
    assert result["landmark_z_pearson"] > 0.9
    # DepthCorr over only 5 views of one head is weak (measured 0.50 per landmark): it is checked on known
    # answers in test_depth_corr_sum_is_depthnets_trace_of_abs_correlations; here, that it covers nearly
    # all: 64 of the 66 are seen in the 3 views it needs (faces generator version 3's identity 0; version
    # 2's, textured by grace_hopper unmirrored, got 66): two are off the head at the solved cameras of 3
    # of the 5 views.
    assert result["landmark_depth_corr_landmarks"] >= 60 and result["landmark_depth_corr_mean"] > 0.3
    assert result["landmark_depth_corr"] == pytest.approx(
        result["landmark_depth_corr_mean"] * result["landmark_depth_corr_landmarks"])
    with pytest.raises(ValueError, match="needs a fit function"):
        evaluation.evaluate_3dfaw(None, train, evaluation.BenchmarkFolders(faw=tmp_path / "faw"), None, 8192)


def test_humbi_views_are_the_training_subjects_other_cameras(tmp_path, identities):
    write_humbi(tmp_path / "humbi", identities)
    trained = [f"humbi/subject_{n}/face/00000001/image_cropped/image0000000.jpg" for n in (1, 2)]
    train = SimpleNamespace(sources=[{"source": s} for s in trained], identities=np.array([1, 0]),
                            manifest={"settings": {"framing": "landmarks"}}, image_size=(64, 64))
    skipped = evaluation.Counter()
    views = list(evaluation.humbi_views(tmp_path / "humbi", train, skipped))
    assert skipped == {} and [v.identity for v in views] == [1, 1, 0, 0]
    for view, camera in zip(views, [5, 12, 5, 12], strict=True):
        assert view.image.shape == (64, 64, 3) and view.mask.shape == (64, 64) and view.mask.max() > 127
        # Posed by the landmark solve, in the template's world: close to the true camera.
        true = orbit_camera(*HUMBI_CAMERAS[camera])
        rotation = view.world_to_camera[:, :3] @ true[:, :3].T
        assert np.degrees(np.arccos(np.clip((np.trace(rotation) - 1) / 2, -1, 1))) < 10.0
    # No subject of the folder among the training sources: one sentence.
    other = SimpleNamespace(**{**vars(train), "sources": [{"source": "ffhq/00000.png"}] * 2})
    with pytest.raises(ValueError, match="no subject folder"):
        list(evaluation.humbi_views(tmp_path / "humbi", other, skipped))


def test_faces_cache_landmarks_line_up_with_renders_from_the_cache_cameras(tmp_path, identities, monkeypatch):
    """The faces cache's true landmarks (true camera) are scored on renders from the cache's own
    (landmark-solved) cameras: with the true head as the model, the rendered depth at them correlates
    with their true depth almost perfectly, and the foreground is the true mask."""
    from dataset import PreparedDataset
    from dataset.prepare import main as prepare_main

    cache = tmp_path / "faces"
    assert prepare_main(["--dataset", "faces", "--out", str(cache), "--identities", "2", "--heldout-views",
                         "1", "--no-progress"]) == 0
    monkeypatch.setattr(evaluation, "render_view", true_depth_renderer(identities))
    model = SimpleNamespace(latents=SimpleNamespace(codes=torch.arange(2.0)[:, None]))
    for split in ("train", "heldout"):
        ds = PreparedDataset(cache, split=split)
        views = list(evaluation.cache_views(ds, np.arange(len(ds))))
        assert all(v.true_mask is not None and v.landmarks.shape == (F.N_MESH, 4) for v in views)
        records, marks = evaluation.evaluate_views(model, views, None, 8192, split)
        for record in records:
            assert record["landmark_depth_pearson"] > 0.9 and record["landmark_count"] > 300
            assert "psnr_fg" in record and "ssim_fg" in record
        assert math.isnan(marks["landmark_depth_corr_mean"])  # two views: too few for DepthCorr
    assert evaluation.foreground_source(ds).startswith("true coverage")


@pytest.mark.slow
def test_evaluate_cli_reads_3dfaw_and_humbi_folders(tiny_run, tmp_path, identities, capsys):
    """evaluate.py on the tiny synthetic run: --3dfaw fits each image and reports the landmark figures,
    the foreground figures come beside the full-image ones, and folder mistakes are one sentence."""
    import evaluate
    from export.inference import start_renderer
    from models.checkpoint import latest_checkpoint

    start_renderer("cpu")
    ckpt = str(latest_checkpoint(tiny_run))
    write_3dfaw(tmp_path / "faw", identities[0])
    write_humbi(tmp_path / "humbi", identities)
    out = tmp_path / "eval.json"
    assert evaluate.main(["--checkpoint", ckpt, "--max-images", "3", "--3dfaw", str(tmp_path / "faw"),
                          "--fit-steps", "2", "--json", str(out)]) == 0
    table = capsys.readouterr().out
    results = json.loads(out.read_text())
    faw = results["3dfaw"]
    assert faw["n_images"] == 3 and [r["name"] for r in faw["per_image"]] == ["image00000", "image00002",
                                                                               "image00004"]
    assert -1.0 <= faw["landmark_z_pearson"] <= 1.0 and faw["landmark_depth_corr_landmarks"] <= 66
    assert "- 3DFAW (3 images, 0 skipped)" in table
    for section in ("reconstruction", "novel_view", "baseline_reconstruction"):
        assert all(isinstance(results[section][key], float) for key in ("psnr_fg", "ssim_fg")), section
    assert "exact" in results["foreground_mask"] and "| PSNR in the foreground" in table
    assert evaluate.main(["--checkpoint", ckpt, "--humbi", str(tmp_path / "humbi")]) == 2
    assert "no subject folder" in capsys.readouterr().err
    assert evaluate.main(["--checkpoint", ckpt, "--3dfaw", str(tmp_path)]) == 2
    assert "is not a 3DFAW folder" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        evaluate.main(["--checkpoint", ckpt, "--views", str(tmp_path), "--humbi", str(tmp_path)])
