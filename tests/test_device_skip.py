"""Skipping empty space on the Taichi device (models.device_skip, renderer.device_packed), on x64 and Vulkan.

The device path must render what ``render_rays_skip_empty`` renders for the same grid and generator
(values, losses, every gradient, the grid's record of used cells and densities), keep every array on
the device, and train, update its grid and checkpoint it through the trainer.
"""

from __future__ import annotations

import numpy as np
import pytest
import taichi as ti
import torch
from test_device_step import _batch, _models, assert_same_step

import renderer
from models.device_step import DeviceTrainStep
from models.losses import LossConfig, compute_losses
from models.render import RenderConfig
from models.skip_empty import ClassOccupancy, SkipStats, render_rays_skip_empty
from renderer.backend import launch as backend_launch
from renderer.device import Workspace
from renderer.device_packed import (
    capacity,
    count_kept_kernel,
    exclusive_scan_kernel,
    pack_kept_kernel,
    scan_blocks,
)


def _upload(ws: Workspace, name: str, x: np.ndarray, dtype=ti.f32):
    array = ws.get(name, x.shape, dtype)
    array.from_numpy(x)
    return array


@pytest.mark.parametrize("n_rays, width", [(1, 5), (700, 3), (3 * 256, 4)])
def test_count_scan_and_pack_are_torchs_nonzero(arch, n_rays, width):
    """Several scan blocks (and a partial one), rays with nothing kept, all kept, one kept."""
    g = np.random.default_rng(n_rays)
    keep = (g.uniform(size=(n_rays, width)) > 0.6).astype(np.uint8)
    keep[0] = 1
    if n_rays > 2:
        keep[1] = 0
        keep[2] = 0
        keep[2, -1] = 1
    t = g.uniform(size=n_rays * width).astype(np.float32)
    deltas = g.uniform(size=n_rays * width).astype(np.float32)
    ws = Workspace()
    keep_nd = _upload(ws, "keep", keep.reshape(-1), ti.u8)
    counts, offsets = ws.get("counts", (n_rays,), ti.i32), ws.get("offsets", (n_rays,), ti.i32)
    total = ws.get("total", (1,), ti.i32)
    backend_launch("count_kept", count_kept_kernel, keep_nd, counts)
    backend_launch("exclusive_scan", exclusive_scan_kernel, counts, offsets,
                   ws.get("blocks", (scan_blocks(n_rays),), ti.i32), total)
    expected_counts = keep.sum(1)
    assert np.array_equal(counts.to_numpy(), expected_counts)
    assert np.array_equal(offsets.to_numpy(), np.cumsum(expected_counts) - expected_counts)
    n = int(total.to_numpy()[0])
    assert n == keep.sum()
    cap = capacity(n)
    outs = [ws.get("t_out", (cap,)), ws.get("d_out", (cap,)), ws.get("ray", (cap,), ti.i32),
            ws.get("slot", (cap,), ti.i32)]
    index = ws.get("index", (n_rays * width,), ti.i32)
    for out in outs:  # stale values, which padding must overwrite
        out.fill(7)
    backend_launch("pack_kept", pack_kept_kernel, keep_nd, _upload(ws, "t", t), _upload(ws, "d", deltas),
                   offsets, index, *outs)
    slots = np.flatnonzero(keep.reshape(-1))
    t_out, d_out, ray, slot = (o.to_numpy() for o in outs)
    assert np.array_equal(slot[:n], slots) and np.all(slot[n:] == -1)
    assert np.array_equal(ray[:n], slots // width) and np.all(ray[n:] == 0)
    assert np.array_equal(t_out[:n], t[slots]) and np.all(t_out[n:] == 0)
    assert np.array_equal(d_out[:n], deltas[slots]) and np.all(d_out[n:] == 0)
    expected_index = np.full(n_rays * width, -1)
    expected_index[slots] = np.arange(n)
    assert np.array_equal(index.to_numpy(), expected_index)


def test_capacity_classes_cover_and_stay_few():
    for n in [0, 1, 255, 256, 257, 1000, 4097, 65_536, 1_000_003]:
        assert capacity(n) >= n and capacity(n) % 256 == 0
        assert capacity(n) <= max(256, 1.1 * n + 256)
    assert len({capacity(n) for n in range(20_000, 40_000)}) <= 10


def _grid(cfg: RenderConfig) -> ClassOccupancy:
    """A grid with a ball of radius 1 occupied (and its dilation), empty elsewhere."""
    occupancy = ClassOccupancy(cfg)
    occupancy.grid.update(lambda p: (p.norm(dim=1) < 1.0).float() * 100.0, fraction=1.0)
    fraction = occupancy.grid.occupied_fraction()
    assert 0.05 < fraction < 0.5, fraction
    return occupancy


def _torch_skip_step(field, bg, table, optimizers, batch, cfg, loss_cfg, occupancy, seed):
    for opt in optimizers.values():
        opt.zero_grad(set_to_none=True)
    rays = renderer.generate_rays(batch["pixels"], batch["K"], batch["world_to_camera"], radius=cfg.radius)
    out = render_rays_skip_empty(field, bg, rays, table(batch["identity"]), cfg, occupancy,
                                 torch.Generator().manual_seed(seed))
    terms = compute_losses(out.color, out.opacity, out.weights, batch["rgb"], batch["mask"], loss_cfg)
    terms["total"].backward()
    return {k: float(v.detach()) for k, v in terms.items()}, dict(SkipStats.last)


@pytest.mark.parametrize("background, latent_opt, n_fine, density_bias, eps",
                         [("network", "adam", 8, 0.0, 1e-4), ("constant", "sgd", 8, 6.0, 1e-4),
                          ("network", "adam", 16, 2.0, 0.05), ("network", "sgd", 0, 6.0, 1e-4)])
def test_the_device_skip_step_is_the_torch_skip_paths(arch, request, background, latent_opt, n_fine,
                                                      density_bias, eps):
    """Losses, gradients, kept samples and the grid's record of the step, against render_rays_skip_empty
    on the same grid. Density biases of 2 and 6 make rays stop early (the coarse cut-off and the packed
    early stop both matter then; with eps 0.05 the cut comes while the weights are still spread, so
    importance samples land near the cut-off). No torch tensor reaches a kernel."""
    cfg = RenderConfig(n_coarse=16, n_fine=n_fine, occupancy_resolution=16, early_stop_eps=eps)
    loss_cfg = LossConfig()
    batch = _batch(n_rays=64)
    batch["pixels"][:3] = torch.tensor([[0.0, 0.0], [31.0, 0.0], [31.0, 31.0]])  # corners: miss the sphere
    rays = renderer.generate_rays(batch["pixels"], batch["K"], batch["world_to_camera"], radius=cfg.radius)
    assert bool((rays.far[:3] == rays.near[:3]).all()) and bool((rays.far[3:] > rays.near[3:]).all())

    def models():
        field, bg, table, optimizers = _models(background, latent_opt)
        with torch.no_grad():
            field.density_head.bias.fill_(density_bias)
        return field, bg, table, optimizers

    field, bg, table, optimizers = models()
    occupancy = _grid(cfg)
    expected, stats = _torch_skip_step(field, bg, table, optimizers, batch, cfg, loss_cfg, occupancy, seed=5)
    assert stats["field_per_ray"] < 0.8 * stats["dense_per_ray"]  # the grid skips samples here
    grads = {"field": [p.grad.clone() for p in field.parameter_list()],
             "bg": [p.grad.clone() for p in bg.parameters()], "table": table.codes.grad.clone()}

    launched = request.getfixturevalue("forbid_torch_launches")
    field2, bg2, table2, optimizers2 = models()
    occupancy2 = _grid(cfg)
    step = DeviceTrainStep(field2, bg2, table2, optimizers2, cfg, loss_cfg, occupancy=occupancy2)
    terms = step.run(batch, torch.Generator().manual_seed(5))
    assert {"occupancy_march", "pack_kept", "composite_packed", "composite_packed_backward"} <= set(launched)
    assert step.rendering.last_stats == pytest.approx(stats)
    if density_bias:
        assert int((step.rendering.grid.occupied.to_numpy() != 0).sum()) > 0
    assert_same_step(step, terms, expected, grads)
    # What the step leaves for the grid's next update: the cells its weights used, the densities seen.
    step.to_torch()
    assert torch.equal(occupancy2.grid.used, occupancy.grid.used)
    assert int(occupancy.grid.used.sum()) > 0
    torch.testing.assert_close(occupancy2.observed, occupancy.observed, rtol=1e-5, atol=1e-6)


def test_update_occupancy_is_the_torch_paths_update(arch):
    """update_occupancy on the device's parameters and table equals ClassOccupancy.maybe_update on the
    torch modules: same draws, same densities, same occupied cells."""
    cfg = RenderConfig(n_coarse=16, n_fine=8, occupancy_resolution=16, occupancy_warmup=0,
                       occupancy_every=4, occupancy_fraction=0.3)
    field, bg, table, optimizers = _models("network", "adam")
    with torch.no_grad():
        field.density_head.bias.fill_(-3.0)
        field.layers[0].bias.mul_(4.0)
    reference = ClassOccupancy(cfg)
    occupancy = ClassOccupancy(cfg)
    step = DeviceTrainStep(field, bg, table, optimizers, cfg, LossConfig(), occupancy=occupancy)
    g_ref, g_dev = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    for n in (0, 3, 4, 8):
        ran = reference.maybe_update(n, field, table.codes, g_ref)
        assert step.update_occupancy(n, g_dev) == ran
    assert reference.updates == occupancy.updates == 3
    torch.testing.assert_close(occupancy.grid.density, reference.grid.density, rtol=1e-5, atol=1e-5)
    assert torch.equal(occupancy.grid.occupied, reference.grid.occupied)
    assert 0.0 < reference.grid.occupied_fraction() < 1.0
    assert np.array_equal(step.grid.occupied.to_numpy(), reference.grid.occupied.numpy())


def test_an_empty_grid_renders_the_background_on_both_paths(arch):
    """No occupied cell: no sample is evaluated (the device's packed buffers hold padding only), every ray
    shows its background, and the device step's losses and background and table gradients are the
    torch path's, with no gradient reaching the field from the padding."""
    cfg, loss_cfg = RenderConfig(n_coarse=16, n_fine=8, occupancy_resolution=16), LossConfig()
    batch = _batch(n_rays=40)
    field, bg, table, optimizers = _models("network", "adam")
    occupancy = ClassOccupancy(cfg)
    occupancy.grid.occupied.zero_()
    expected, stats = _torch_skip_step(field, bg, table, optimizers, batch, cfg, loss_cfg, occupancy, seed=2)
    assert stats["field_per_ray"] == 0.0
    assert all(p.grad is None or not p.grad.any() for p in field.parameters())
    field2, bg2, table2, optimizers2 = _models("network", "adam")
    step = DeviceTrainStep(field2, bg2, table2, optimizers2, cfg, loss_cfg, occupancy=occupancy)
    terms = step.run(batch, torch.Generator().manual_seed(2))
    assert step.rendering.last_stats["field_per_ray"] == 0.0
    for key in ("rgb", "mask", "hard", "total"):
        assert terms[key] == pytest.approx(expected[key], rel=1e-5, abs=1e-7), key
    for p in step.field_params:
        assert not np.any(p.grad.to_numpy()), "padding rows must add nothing to the field's gradients"
    for i, (dev, ref) in enumerate(zip(step.bg_params, bg.parameters(), strict=True)):
        np.testing.assert_allclose(dev.grad.to_numpy(), ref.grad.numpy(), rtol=1e-4, atol=1e-7,
                                   err_msg=f"background parameter {i}")
    np.testing.assert_allclose(step.table.params[0].grad.to_numpy(), table.codes.grad.numpy(), rtol=1e-4,
                               atol=1e-7)
