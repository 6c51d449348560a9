"""The device-resident training step (models.device_step, issue 10 item 2), on x64 and Vulkan.

It must do what the torch-tensor path does: the same losses and gradients for the same batch and
generator, torch's optimiser arithmetic, and a run that learns, resumes exactly and writes checkpoints
that load on either field backend. And it must stay on the device: no torch tensor reaches a kernel.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import taichi as ti
import torch
from test_train import TINY, metrics, params
from tiny_run import train_in_process

import renderer
from common.conventions import default_intrinsics, orbit_camera
from models.background import BackgroundConfig, ConstantBackground
from models.checkpoint import latest_checkpoint, load_checkpoint
from models.device_losses import loss_grads_kernel, loss_scales, loss_sums_kernel, loss_terms
from models.device_step import DeviceTrainStep
from models.field import FieldConfig
from models.field_backend import as_backend, choose_device_step
from models.latents import LatentTable
from models.losses import LossConfig, compute_losses
from models.render import RenderConfig, render_image, render_rays
from models.taichi_background import TaichiBackground
from models.taichi_field import TaichiField
from renderer.backend import launch as backend_launch
from renderer.device import Workspace, merge_outputs_kernel, split_grads_kernel
from renderer.optimizers import adam_update, sgd_update

N_IDS, LATENT = 4, 8


def _batch(n_rays: int = 48, seed: int = 0) -> dict[str, torch.Tensor]:
    """A pixel batch as dataset.PixelBatchSampler gives it: cameras on an orbit looking at the origin."""
    g = np.random.default_rng(seed)
    K = default_intrinsics(32, 32)
    cams = [orbit_camera(float(y), float(p)) for y, p in g.uniform(-30, 30, (n_rays, 2))]
    pixels = np.stack([g.integers(6, 26, n_rays), g.integers(6, 26, n_rays)], axis=1).astype(np.float32)
    return {"pixels": torch.from_numpy(pixels),
            "K": torch.from_numpy(np.repeat(np.asarray(K, np.float32)[None], n_rays, 0)),
            "world_to_camera": torch.from_numpy(np.stack(cams).astype(np.float32)),
            "rgb": torch.from_numpy(g.uniform(0, 1, (n_rays, 3)).astype(np.float32)),
            "mask": torch.from_numpy((g.uniform(0, 1, n_rays) > 0.5).astype(np.float32)),
            "identity": torch.from_numpy(g.integers(0, N_IDS, n_rays).astype(np.int64))}


def _models(background: str, latent_opt: str):
    torch.manual_seed(0)
    cfg = FieldConfig(depth=3, width=32, n_frequencies=4)  # 3 chunks of the 8-d code: 3 + 3 + 2 columns
    field = TaichiField(cfg, LATENT)
    bg = (TaichiBackground(BackgroundConfig(depth=2, width=16), LATENT) if background == "network"
          else ConstantBackground([0.2, 0.5, 1.0]))
    table = LatentTable(N_IDS, LATENT, 0.3, torch.Generator().manual_seed(1))
    networks = torch.optim.Adam([*field.parameters(), *bg.parameters()], lr=1e-3, betas=(0.9, 0.99))
    latents = (torch.optim.SGD(table.parameters(), lr=0.05, momentum=0.9) if latent_opt == "sgd"
               else torch.optim.Adam(table.parameters(), lr=0.01))
    return field, bg, table, {"networks": networks, "latents": latents}


def _torch_step(field, bg, table, optimizers, batch, render_cfg, loss_cfg, seed: int):
    """The torch-tensor path (Taichi kernels on torch tensors, autograd): terms, grads after backward."""
    for opt in optimizers.values():
        opt.zero_grad(set_to_none=True)
    rays = renderer.generate_rays(batch["pixels"], batch["K"], batch["world_to_camera"],
                                  radius=render_cfg.radius)
    generator = torch.Generator().manual_seed(seed)
    out = render_rays(field, bg, rays, table(batch["identity"]), render_cfg, generator)
    terms = compute_losses(out.color, out.opacity, out.weights, batch["rgb"], batch["mask"], loss_cfg)
    terms["total"].backward()
    return {k: float(v.detach()) for k, v in terms.items()}


def _close(device: np.ndarray, reference: torch.Tensor, what: str) -> None:
    """Same float32 kernels on both paths; the sums run in another order (atomics, autograd's adds), so
    allow float32 rounding of the largest entry, accumulated over a few thousand terms."""
    ref = reference.detach().numpy()
    scale = float(np.abs(ref).max())
    assert scale > 0, f"{what}: the reference gradient is zero, the comparison would prove nothing"
    np.testing.assert_allclose(device, ref, rtol=1e-4, atol=2e-5 * scale, err_msg=what)


def assert_same_step(step: DeviceTrainStep, terms: dict, expected: dict, grads: dict) -> None:
    """The device step's loss terms and gradients (field, background, table) against the torch path's."""
    for key in ("rgb", "mask", "hard", "total"):
        assert terms[key] == pytest.approx(expected[key], rel=1e-5, abs=1e-7), key
    for i, (dev, ref) in enumerate(zip(step.field_params, grads["field"], strict=True)):
        _close(dev.grad.to_numpy(), ref, f"field parameter {i}")
    for i, (dev, ref) in enumerate(zip(step.bg_params, grads["bg"], strict=True)):
        _close(dev.grad.to_numpy(), ref, f"background parameter {i}")
    _close(step.table.params[0].grad.to_numpy(), grads["table"], "latent table")


@pytest.mark.parametrize("background, latent_opt, n_fine", [("network", "adam", 8), ("constant", "sgd", 8),
                                                            ("network", "sgd", 0)])
def test_the_device_step_computes_the_torch_paths_losses_and_gradients(arch, request, background,
                                                                       latent_opt, n_fine):
    render_cfg, loss_cfg = RenderConfig(n_coarse=8, n_fine=n_fine), LossConfig()
    batch = _batch()
    field, bg, table, optimizers = _models(background, latent_opt)
    expected = _torch_step(field, bg, table, optimizers, batch, render_cfg, loss_cfg, seed=5)
    grads = {"field": [p.grad.clone() for p in field.parameter_list()],
             "bg": [p.grad.clone() for p in bg.parameters()], "table": table.codes.grad.clone()}

    # The device step, from the same initial state, must see no torch tensor in any launch.
    launched = request.getfixturevalue("forbid_torch_launches")
    field2, bg2, table2, optimizers2 = _models(background, latent_opt)
    step = DeviceTrainStep(field2, bg2, table2, optimizers2, render_cfg, loss_cfg)
    terms = step.run(batch, torch.Generator().manual_seed(5))
    assert {"dense_forward", "composite_backward", "adam"} <= set(launched)
    assert_same_step(step, terms, expected, grads)
    assert step.transfers.uploaded == 116 * 48 and step.transfers.downloaded == 12

    # The optimisers: torch's step on the torch path's gradients vs the kernels on the device's.
    for opt in optimizers.values():
        opt.step()
    step.to_torch()
    for name, a, b in [("field", field, field2), ("background", bg, bg2), ("table", table, table2)]:
        for (key, x), y in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
            # Adam's first step moves a weight by about lr whatever its gradient's size, so rounding
            # of a near-zero gradient may move it by up to 2 lr: compare to that, not tighter.
            assert torch.allclose(x, y, atol=2.5e-3, rtol=0), f"{name}.{key}"
        moved = [(x - y).abs().max().item() for x, y in zip(a.state_dict().values(),
                                                             b.state_dict().values(), strict=True)]
        assert np.median(moved) < 1e-4, f"{name}: {moved}"


def test_a_poisoned_step_changes_nothing(arch):
    field, bg, table, optimizers = _models("network", "adam")
    step = DeviceTrainStep(field, bg, table, optimizers, RenderConfig(n_coarse=8, n_fine=8), LossConfig())
    before = step.field_params[0].value.to_numpy().copy()
    assert step.run(_batch(), torch.Generator().manual_seed(0), poison=True) is None
    assert np.array_equal(step.field_params[0].value.to_numpy(), before)
    assert step.networks.steps == 0


@pytest.mark.parametrize("kind", ["adam", "sgd"])
@pytest.mark.parametrize("shape", [(7,), (5, 3)])
def test_optimiser_kernels_are_torchs_arithmetic(arch, kind, shape):
    g = torch.Generator().manual_seed(0)
    param = torch.nn.Parameter(torch.randn(shape, generator=g))
    opt = (torch.optim.Adam([param], lr=0.01, betas=(0.8, 0.95), eps=1e-6) if kind == "adam"
           else torch.optim.SGD([param], lr=0.1, momentum=0.7))
    ws = Workspace()
    value, grad, m, v = (ws.get(n, shape) for n in ("p", "g", "m", "v"))
    value.from_numpy(param.detach().numpy())
    m.fill(0)
    v.fill(0)
    for step in range(1, 5):
        gradient = torch.randn(shape, generator=g) * 10.0 ** (-step)  # shrinking: bias corrections matter
        param.grad = gradient.clone()
        opt.step()
        grad.from_numpy(gradient.numpy())
        if kind == "adam":
            adam_update(value, grad, m, v, 0.01, 0.8, 0.95, 1e-6, step)
        else:
            sgd_update(value, grad, m, 0.1, 0.7)
        np.testing.assert_allclose(value.to_numpy(), param.detach().numpy(), rtol=1e-6, atol=1e-7)
    with pytest.raises(ValueError, match="starts at 1"):
        adam_update(value, grad, m, v, 0.01, 0.8, 0.95, 1e-6, 0)


def test_loss_kernels_match_compute_losses(arch):
    """Values and gradients of the three terms, with weights at the kinks of |w| and |1 - w|."""
    g = torch.Generator().manual_seed(0)
    n_rays, n_samples = 6, 5
    per_ray = torch.rand(n_rays, 6, generator=g)
    weights = torch.rand(n_rays * n_samples, generator=g)
    weights[:3] = torch.tensor([0.0, 1.0, 0.5])
    target, mask = torch.rand(n_rays, 3, generator=g), (torch.rand(n_rays, generator=g) > 0.5).float()
    cfg = LossConfig(rgb=1.0, mask=0.7, hard=0.3)
    for has_mask in (True, False):
        color = per_ray[:, :3].clone().requires_grad_()
        opacity = per_ray[:, 3].clone().requires_grad_()
        w = weights.view(n_rays, n_samples).clone().requires_grad_()
        ref = compute_losses(color, opacity, w, target, mask if has_mask else None, cfg)
        ref["total"].backward()
        ws = Workspace()
        arrays = {}
        for name, x in [("per_ray", per_ray), ("w", weights), ("t", target), ("m", mask)]:
            arrays[name] = ws.get(name, tuple(x.shape))
            arrays[name].from_numpy(x.numpy())
        sums = ws.zeros("sums", (3,))
        args = (arrays["per_ray"], arrays["w"], arrays["t"], arrays["m"], int(has_mask))
        backend_launch("loss_sums", loss_sums_kernel, *args, sums)
        terms = loss_terms(sums.to_numpy(), n_rays, n_samples, has_mask, cfg)
        for key in ("rgb", "mask", "hard", "total"):
            assert terms[key] == pytest.approx(float(ref[key]), rel=1e-5, abs=1e-7), (has_mask, key)
        grad_per_ray, grad_w = ws.get("gpr", (n_rays, 5)), ws.get("gw", (n_rays * n_samples,))
        backend_launch("loss_grads", loss_grads_kernel, *args, *loss_scales(n_rays, n_samples, has_mask, cfg),
                       grad_per_ray, grad_w)
        gpr = grad_per_ray.to_numpy()
        np.testing.assert_allclose(gpr[:, :3], color.grad.numpy(), rtol=1e-5, atol=1e-8)
        expected_opacity = opacity.grad.numpy() if has_mask else np.zeros(n_rays)
        np.testing.assert_allclose(gpr[:, 3], expected_opacity, rtol=1e-5, atol=1e-8)
        np.testing.assert_allclose(gpr[:, 4], 0.0)
        np.testing.assert_allclose(grad_w.to_numpy(), w.grad.numpy().reshape(-1), rtol=1e-5, atol=1e-8)


def test_merge_outputs_and_split_grads_follow_order_with_unequal_halves(arch):
    """The coarse/fine interleave of the field outputs and its inverse for gradients, against torch's
    gather and scatter, with n_a != n_b (the step's tests use 8 + 8, where a swap of the two goes
    unseen)."""
    g = torch.Generator().manual_seed(0)
    n_rays, n_a, n_b = 5, 6, 3
    width = n_a + n_b
    order = torch.stack([torch.randperm(width, generator=g) for _ in range(n_rays)])  # (R, S)
    sigma_a, sigma_b = torch.rand(n_rays * n_a, 1, generator=g), torch.rand(n_rays * n_b, 1, generator=g)
    rgb_a, rgb_b = torch.rand(n_rays * n_a, 3, generator=g), torch.rand(n_rays * n_b, 3, generator=g)
    ws = Workspace()

    def upload(name, x, dtype=ti.f32):
        array = ws.get(name, tuple(x.shape), dtype)
        array.from_numpy(x.numpy())
        return array

    order_nd = upload("order", order.reshape(-1), ti.i64)
    sigma, rgb = ws.get("sigma", (n_rays * width,)), ws.get("rgb", (n_rays * width * 3,))
    halves = (upload("sa", sigma_a), upload("ra", rgb_a), upload("sb", sigma_b), upload("rb", rgb_b))
    backend_launch("merge_outputs", merge_outputs_kernel, order_nd, *halves, n_a, sigma, rgb)
    # Per ray, the sources are [its n_a rows of a | its n_b rows of b], indexed by order.
    sources = [torch.cat([x_a.view(n_rays, n_a, -1), x_b.view(n_rays, n_b, -1)], 1)
               for x_a, x_b in ((sigma_a, sigma_b), (rgb_a, rgb_b))]
    expected = [x.gather(1, order[..., None].expand(-1, -1, x.shape[2])) for x in sources]
    assert np.array_equal(sigma.to_numpy(), expected[0].reshape(-1).numpy())
    assert np.array_equal(rgb.to_numpy(), expected[1].reshape(-1).numpy())

    grad_sigma = torch.rand(n_rays * width, generator=g)
    grad_rgb = torch.rand(n_rays * width * 3, generator=g)
    outs = [ws.get(name, shape) for name, shape in [("gsa", (n_rays * n_a, 1)), ("gra", (n_rays * n_a, 3)),
                                                    ("gsb", (n_rays * n_b, 1)), ("grb", (n_rays * n_b, 3))]]
    merged_grads = (upload("gs", grad_sigma), upload("gr", grad_rgb))
    backend_launch("split_grads", split_grads_kernel, order_nd, *merged_grads, n_a, *outs)
    for merged, (out_a, out_b) in ((grad_sigma.view(n_rays, width, 1), outs[::2]),
                                   (grad_rgb.view(n_rays, width, 3), outs[1::2])):
        split = torch.empty_like(merged).scatter_(1, order[..., None].expand_as(merged), merged)
        assert np.array_equal(out_a.to_numpy(), split[:, :n_a].reshape(-1, merged.shape[2]).numpy())
        assert np.array_equal(out_b.to_numpy(), split[:, n_a:].reshape(-1, merged.shape[2]).numpy())


def test_auto_keeps_the_step_on_a_vulkan_or_metal_device_only():
    cpu = torch.device("cpu")
    assert choose_device_step("auto", "taichi", "vulkan", cpu, 1)[0]
    assert choose_device_step("auto", "taichi", "metal", cpu, 1)[0]
    assert not choose_device_step("auto", "taichi", "cpu", cpu, 1)[0]
    assert not choose_device_step("auto", "torch", "vulkan", cpu, 1)[0]
    assert not choose_device_step("auto", "taichi", "vulkan", cpu, 2)[0]
    assert not choose_device_step("off", "taichi", "vulkan", cpu, 1)[0]
    assert choose_device_step("on", "taichi", "cpu", cpu, 1) == (True, "asked for on")
    with pytest.raises(ValueError, match="--field-backend taichi"):
        choose_device_step("on", "torch", "vulkan", cpu, 1)


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    from dataset.config import PrepareConfig
    from dataset.prepare import prepare_dataset

    out = tmp_path_factory.mktemp("cache") / "synthetic8"
    return prepare_dataset("synthetic", None, out, PrepareConfig(resolution=32, synthetic_identities=8),
                           verbose=False)


DEVICE = ("--field-backend", "taichi", "--device-step", "on")


@pytest.mark.usefixtures("keep_taichi_arch")
def test_a_device_resident_run_learns_and_its_checkpoint_renders_the_same_in_torch(arch, cache, tmp_path,
                                                                                   capsys):
    """Skipping empty space (the default) with the grid out of warm-up after 40 steps: it learns, its
    grid drops cells, and per step only the batch goes in and the loss sums and two sample counts come
    out (the grid's updates, every 16 steps, move more)."""
    run_dir = train_in_process(["--arch", arch, "--out", str(tmp_path / "run"), "--cache", str(cache), *TINY,
                                "--steps", "120", "--optim-lr-init", "5e-3",
                                "--render-occupancy-warmup", "40", *DEVICE])  # fmt: skip
    assert "[train] training step: on the Taichi device (asked for on)" in capsys.readouterr().out
    rows = [r for r in metrics(run_dir) if "psnr" in r]
    first, last = rows[0]["psnr"], sum(r["psnr"] for r in rows[-10:]) / 10
    assert last - first >= 6.0, f"PSNR {first:.2f} -> {last:.2f} dB"
    assert rows[-1]["bytes_to_device"] == 116 * 8 * 2 * 32 and rows[-1]["bytes_from_device"] == 12 + 8
    ckpt = load_checkpoint(latest_checkpoint(run_dir))  # loads as the torch ConditionedField
    assert not isinstance(ckpt.field, TaichiField)
    grid = ckpt.payload["occupancy"]
    assert grid["updates"] >= 7 and grid["refreshed"] and float(grid["grid"]["occupied"].float().mean()) < 0.9
    K = torch.from_numpy(np.asarray(default_intrinsics(16, 16), np.float32))
    w2c = torch.from_numpy(np.asarray(orbit_camera(20.0, 10.0), np.float32))
    cfg = RenderConfig(n_coarse=16, n_fine=16)
    code = ckpt.latents.codes[0].detach()
    images = [render_image(f, ckpt.background, code, K, w2c, 16, 16, cfg)
              for f in (ckpt.field, as_backend(ckpt.field, "taichi"))]
    for key in ("color", "opacity", "depth"):
        assert torch.allclose(images[0][key], images[1][key], atol=1e-4, rtol=1e-4), key
    assert images[0]["opacity"].max() > 0.5  # a head was learnt, so the comparison means something


@pytest.mark.parametrize("skip_empty", ["on", "off"])
def test_resume_on_the_device_step_is_exact(cache, tmp_path, skip_empty):
    """2N steps == N + resumed N on the device-resident path (x64), to 1e-5, with empty-space skipping
    (its grid updated on both sides of the resume) and without."""
    flags = (*DEVICE, "--optim-decay-steps", "10", "--render-skip-empty", skip_empty,
             "--render-occupancy-warmup", "2", "--render-occupancy-every", "3")
    whole = train_in_process(["--arch", "cpu", "--out", str(tmp_path / "whole"), "--cache", str(cache), *TINY,
                              "--steps", "10", *flags])
    half = train_in_process(["--arch", "cpu", "--out", str(tmp_path / "half"), "--cache", str(cache), *TINY,
                             "--steps", "5", *flags])
    resumed = train_in_process(["--out", str(half), "--resume", "--steps", "10", "--arch", "cpu", *flags])
    a, b = params(whole), params(resumed)
    assert a.keys() == b.keys()
    for key in a:
        assert torch.allclose(a[key], b[key], atol=1e-5, rtol=0), key
    moved = params(half)
    assert any(not torch.equal(moved[k], a[k]) for k in a)  # the second half did train
    grids = [load_checkpoint(latest_checkpoint(run)).payload.get("occupancy") for run in (whole, resumed)]
    if skip_empty == "on":
        # The networks agree to float32 rounding (above), and so do the densities estimated from them,
        # except where that rounding moved a sample into another cell (seen: 1 cell of 262,144).
        for a_, b_ in ((grids[0]["grid"]["density"], grids[1]["grid"]["density"]),
                       (grids[0]["observed"], grids[1]["observed"])):
            assert torch.isclose(a_, b_, rtol=1e-4, atol=1e-5).float().mean() > 0.9999
        for key in ("occupied", "used"):
            assert torch.equal(grids[0]["grid"][key], grids[1]["grid"][key]), key
        assert grids[0]["updates"] == grids[1]["updates"] == 4
    else:
        assert grids == [None, None]
    assert json.loads((half / "config.json").read_text())["field"]["depth"] == 2
