"""fit.py: one-look fitting against the shared tiny run (tests/tiny_run.py)."""

from __future__ import annotations

import json

import cv2
import numpy as np
import pytest
import torch

import fit
from export import fitting
from export.fitting import FitConfig
from export.inference import load_model, render_view, start_renderer
from export.mesh import read_ply
from export.metrics import psnr, ssim
from models.checkpoint import latest_checkpoint

pytestmark = pytest.mark.usefixtures("keep_taichi_arch")


@pytest.fixture(scope="module")
def model(tiny_run):
    start_renderer("cpu")
    return load_model(latest_checkpoint(tiny_run))


@pytest.mark.slow
def test_fitting_a_heldout_view_comes_within_3db_of_the_training_reconstruction(model):
    from dataset import PreparedDataset

    cache = model.config.data.cache
    train, heldout = PreparedDataset(cache, "train"), PreparedDataset(cache, "heldout")
    index = 0
    identity = int(heldout.identities[index])
    t = int(np.flatnonzero(train.identities == identity)[0])
    trained = render_view(model, model.latents.codes[identity], train.K[t], train.world_to_camera[t], 64, 64)
    psnr_train = psnr(trained["color"], np.asarray(train.images[t]))

    image, mask = np.asarray(heldout.images[index]), np.asarray(heldout.masks[index])
    K, w2c = heldout.K[index], heldout.world_to_camera[index]
    start = render_view(model, model.latents.mean(), K, w2c, 64, 64)
    result = fitting.fit_latent(model, image, mask, K, w2c, FitConfig(steps=120, rays_per_step=512, seed=0))
    scores, _ = fitting.reconstruction_scores(model, result.latent, image, mask, K, w2c)

    assert scores["psnr"] >= psnr_train - 3.0, (scores["psnr"], psnr_train)
    assert scores["psnr"] > psnr(start["color"], image) + 1.0  # the fit did the work, not the mean latent
    assert len(result.history) == 120 and result.history[-1]["total"] < result.history[0]["total"]
    # Seeded: the same call gives the same latent.
    again = fitting.fit_latent(model, image, mask, K, w2c, FitConfig(steps=3, rays_per_step=64, seed=5))
    once = fitting.fit_latent(model, image, mask, K, w2c, FitConfig(steps=3, rays_per_step=64, seed=5))
    np.testing.assert_array_equal(again.latent.numpy(), once.latent.numpy())


@pytest.mark.slow
def test_fit_cli_on_real_photos_writes_every_output_and_reports_bad_photos(
    tiny_run, tmp_path, capsys, monkeypatch
):
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
    checkpoint = latest_checkpoint(tiny_run)
    model = load_model(checkpoint)
    argv = [
        "--checkpoint",
        str(checkpoint),
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
    # The image each fit was given (the prepared photo), to score its outputs independently.
    given = {}
    write_outputs = fit.write_outputs

    def recording(model, result, image, mask, K, w2c, out_dir, *rest, **kwargs):
        given[out_dir.name] = np.asarray(image)
        return write_outputs(model, result, image, mask, K, w2c, out_dir, *rest, **kwargs)

    monkeypatch.setattr(fit, "write_outputs", recording)
    # Besides the photos, one held-out synthetic view from the training cache: the one input this
    # model can actually reconstruct, so the one where a fit that does not fit can be seen.
    from_cache = ["--from-cache", str(model.config.data.cache), "--split", "heldout", "--index", "0"]
    code = fit.main([*argv, str(astronaut), str(blank), str(grace), str(not_image), *from_cache])
    printed = capsys.readouterr().out
    assert code == 1  # two inputs failed; the good ones were still fitted
    assert "3 of 5 fitted" in printed
    assert "blank: FAILED" in printed and "notes: FAILED" in printed
    assert not (out / "blank").exists()
    monkeypatch.undo()

    for name in ("astronaut", "grace_hopper", "heldout_0000"):
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
        assert latent.shape == (model.latents.dim,)
        assert np.isfinite(latent).all()
        metrics = json.loads((folder / "metrics.json").read_text())
        # The reported scores are those of the saved latent, rendered at the saved camera, against the
        # image that was fitted.
        image = given[name]
        K, w2c = np.array(metrics["K"]), np.array(metrics["world_to_camera"])
        view = render_view(model, torch.from_numpy(latent), K, w2c, *image.shape[:2])
        assert metrics["psnr"] == pytest.approx(psnr(view["color"], image), abs=1e-3), name
        assert metrics["ssim"] == pytest.approx(ssim(view["color"], image), abs=1e-4), name
        if name == "heldout_0000":
            # The fit did work: on this view (measured with the tiny run: mean latent 19.0 dB, fitted
            # 19.4 dB after these 4 steps of 256 rays, 19.6 after 8; a flat image of the view's mean
            # colour 10.1 dB) it beats the mean latent it started from, at the same camera, by
            # 0.1 dB (a quarter of the measured gain), and the flat mean colour by 5 dB.
            start = render_view(model, model.latents.mean(), K, w2c, *image.shape[:2])
            start_psnr = psnr(start["color"], image)
            assert metrics["psnr"] > start_psnr + 0.1, (metrics["psnr"], start_psnr)
            flat = np.broadcast_to(image.reshape(-1, 3).mean(0) / 255.0, image.shape)
            assert metrics["psnr"] > psnr(flat, image) + 5.0
            assert metrics["ssim"] > ssim(start["color"], image)
        # Real photos: the tiny synthetic model renders them at 3-4 dB from any latent (a flat image of
        # the photo's mean colour scores 10-11 dB), and 4 steps move that by under 0.01 dB, so no quality
        # bound fits them; the checks above still catch scores that are not the fit's.
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


@pytest.mark.parametrize("skip_empty", ["off", "on"])
def test_the_device_fit_is_the_torch_fit(arch, tiny_run, request, monkeypatch, skip_empty):
    """With the Taichi field on a Vulkan or Metal GPU, fit_latent runs on the Taichi device
    (fit_latent_on_device, networks frozen): the same draws give the torch loop's code and losses, with
    and without the occupancy grid, and no torch tensor reaches a kernel."""
    from dataset import PreparedDataset
    from export.inference import use_skip_empty
    from models.field_backend import as_backend, background_as_backend

    model = load_model(latest_checkpoint(tiny_run))
    model.field = as_backend(model.field, "taichi")
    model.background = background_as_backend(model.background, "taichi")
    use_skip_empty(model, skip_empty)
    heldout = PreparedDataset(model.config.data.cache, "heldout")
    image, mask = np.asarray(heldout.images[0]), np.asarray(heldout.masks[0])
    K, w2c = heldout.K[0], heldout.world_to_camera[0]
    config = FitConfig(steps=6, rays_per_step=256, seed=3)
    monkeypatch.setattr(fitting, "renders_on_device", lambda field, background: False)
    reference = fitting.fit_latent(model, image, mask, K, w2c, config)
    monkeypatch.setattr(fitting, "renders_on_device", lambda field, background: True)
    launched = request.getfixturevalue("forbid_torch_launches")
    grid_before = None if model.occupancy is None else model.occupancy.state_dict()
    device = fitting.fit_latent(model, image, mask, K, w2c, config)
    assert {"dense_forward", "adam"} <= set(launched) and "dense_grad_params" not in launched  # frozen
    moved = (reference.latent - model.latents.mean()).abs().max()
    assert moved > 1e-3  # the fit moved the code, so agreeing means something
    torch.testing.assert_close(device.latent, reference.latent, rtol=0, atol=2e-4 * float(moved) + 1e-6)
    for a, b in zip(device.history, reference.history, strict=True):
        # Each term to float32 rounding of its sum over the batch's 256 x 32 samples (the device sums in
        # another order); the total is their small difference, so it is held to their errors.
        for key in ("rgb", "mask", "hard"):
            assert a[key] == pytest.approx(b[key], rel=2e-4, abs=1e-7), key
        assert a["total"] == pytest.approx(b["total"], abs=1e-4)
    if skip_empty == "on":  # fitting on the device leaves the class grid as it was
        after = model.occupancy.state_dict()
        for key in ("density", "occupied", "used"):
            assert torch.equal(after["grid"][key], grid_before["grid"][key]), key
        assert torch.equal(after["observed"], grid_before["observed"])
