"""fit.py: one-look fitting against the shared tiny run (tests/tiny_run.py)."""

from __future__ import annotations

import json

import cv2
import numpy as np
import pytest

import fit
from export.inference import load_model, render_view, start_renderer
from export.mesh import read_ply
from export.metrics import psnr
from models.checkpoint import latest_checkpoint

pytestmark = pytest.mark.usefixtures("keep_taichi_arch")


@pytest.fixture(scope="module")
def model(tiny_run):
    start_renderer("cpu")
    return load_model(latest_checkpoint(tiny_run))


@pytest.mark.slow
def test_fitting_a_heldout_view_comes_within_3db_of_the_training_reconstruction(model):
    from dataset import PreparedDataset

    cache = model.config["data"]["cache"]
    train, heldout = PreparedDataset(cache, "train"), PreparedDataset(cache, "heldout")
    index = 0
    identity = int(heldout.identities[index])
    t = int(np.flatnonzero(train.identities == identity)[0])
    trained = render_view(model, model.latents.codes[identity], train.K[t], train.world_to_camera[t], 64, 64)
    psnr_train = psnr(trained["color"], np.asarray(train.images[t]))

    image, mask = np.asarray(heldout.images[index]), np.asarray(heldout.masks[index])
    K, w2c = heldout.K[index], heldout.world_to_camera[index]
    start = render_view(model, model.latents.mean(), K, w2c, 64, 64)
    result = fit.fit_latent(model, image, mask, K, w2c, fit.FitConfig(steps=120, rays_per_step=512, seed=0))
    scores, _ = fit.reconstruction_scores(model, result.latent, image, mask, K, w2c)

    assert scores["psnr"] >= psnr_train - 3.0, (scores["psnr"], psnr_train)
    assert scores["psnr"] > psnr(start["color"], image) + 1.0  # the fit did the work, not the mean latent
    assert len(result.history) == 120 and result.history[-1]["total"] < result.history[0]["total"]
    # Seeded: the same call gives the same latent.
    again = fit.fit_latent(model, image, mask, K, w2c, fit.FitConfig(steps=3, rays_per_step=64, seed=5))
    once = fit.fit_latent(model, image, mask, K, w2c, fit.FitConfig(steps=3, rays_per_step=64, seed=5))
    np.testing.assert_array_equal(again.latent.numpy(), once.latent.numpy())


@pytest.mark.slow
def test_fit_cli_on_real_photos_writes_every_output_and_reports_bad_photos(tiny_run, tmp_path, capsys):
    import matplotlib.cbook
    import skimage.data

    photos = tmp_path / "photos"
    photos.mkdir()
    astronaut = photos / "astronaut.png"
    cv2.imwrite(str(astronaut), cv2.cvtColor(skimage.data.astronaut(), cv2.COLOR_RGB2BGR))
    grace = photos / "grace_hopper.jpg"
    with matplotlib.cbook.get_sample_data("grace_hopper.jpg") as fh:
        grace.write_bytes(fh.read())
    blank = photos / "blank.png"
    cv2.imwrite(str(blank), np.full((200, 200, 3), 128, np.uint8))
    not_image = photos / "notes.jpg"
    not_image.write_text("not an image")

    out = tmp_path / "fits"
    argv = [
        "--checkpoint",
        str(latest_checkpoint(tiny_run)),
        "--out",
        str(out),
        "--steps",
        "4",
        "--rays",
        "256",
        "--frames",
        "3",
        "--video-size",
        "32",
        "--mesh-resolution",
        "24",
        "--quiet",
    ]
    code = fit.main([*argv, str(astronaut), str(blank), str(grace), str(not_image)])
    printed = capsys.readouterr().out
    assert code == 1  # two inputs failed; the good photos were still fitted
    assert "2 of 4 fitted" in printed
    assert "blank: FAILED" in printed and "notes: FAILED" in printed
    assert not (out / "blank").exists()

    for name in ("astronaut", "grace_hopper"):
        folder = out / name
        for file in (
            "latent.npy",
            "reconstruction.png",
            "depth.png",
            "orbit.mp4",
            "orbit.gif",
            "mesh.ply",
            "mesh.png",
            "metrics.json",
        ):
            assert (folder / file).stat().st_size > 0, f"{name}/{file} is missing or empty"
        latent = np.load(folder / "latent.npy")
        assert latent.shape == (load_model(latest_checkpoint(tiny_run)).latents.dim,)
        assert np.isfinite(latent).all()
        metrics = json.loads((folder / "metrics.json").read_text())
        assert 0.0 < metrics["psnr"] < 100.0 and -1.0 <= metrics["ssim"] <= 1.0
        capture = cv2.VideoCapture(str(folder / "orbit.mp4"))
        assert int(capture.get(cv2.CAP_PROP_FRAME_COUNT)) == 3
        capture.release()
        mesh = read_ply(folder / "mesh.ply")
        assert len(mesh.faces) > 0 and mesh.colors is not None
        assert cv2.imread(str(folder / "depth.png")).shape[:2] == (64, 64)

    # Results are never overwritten silently.
    assert fit.main([*argv, str(astronaut)]) == 1
    assert "--force" in capsys.readouterr().out
    assert fit.main([*argv, "--force", str(astronaut)]) == 0
    # An interrupted batch resumes: complete photos are skipped, an unfinished one is redone.
    (out / "grace_hopper" / "metrics.json").unlink()
    capsys.readouterr()
    assert fit.main([*argv, "--resume", str(astronaut), str(grace)]) == 0
    printed = capsys.readouterr().out
    assert (
        "astronaut: ok      already fitted" in printed and (out / "grace_hopper" / "metrics.json").is_file()
    )


def test_fit_refuses_a_file_that_is_not_a_checkpoint(tmp_path, capsys):
    fake = tmp_path / "model.pt"
    fake.write_bytes(b"\x00" * 64)
    assert fit.main(["--checkpoint", str(fake), "--out", str(tmp_path / "o"), "photo.jpg"]) == 2
    err = capsys.readouterr().err
    assert "not a LOLNeRF checkpoint" in err and err.count("\n") == 1
