"""Rendering with empty space skipped (models.skip_empty) against the dense path, on every Taichi backend."""

import pytest
import torch
from test_renderer import random_cameras
from torch import nn

from models.field import ConditionedField, FieldConfig
from models.render import RenderConfig, render_rays
from models.skip_empty import ClassOccupancy, SkipStats, render_rays_skip_empty
from renderer import reference as ref


class Ball(nn.Module):
    """An opaque ball of radius 0.8 in empty space (soft edge), coloured by position; the latent shifts
    its density a little so gradients reach it."""

    def __init__(self):
        super().__init__()
        self.scale = nn.Parameter(torch.tensor(1.0))

    def forward(self, points, latents):
        shape = points.shape[:-1]
        if points.dim() == 3:
            latents = latents[:, None, :].expand(*shape, latents.shape[-1])
        inside = torch.sigmoid((0.8 - points.norm(dim=-1)) * 40.0)
        sigma = self.scale * 30.0 * inside * (1.0 + 0.1 * latents[..., 0].tanh())
        return sigma, torch.sigmoid(points * 2.0)


class Flat(nn.Module):
    """Background: a colour per ray from its latent."""

    def forward(self, directions, latents):
        return torch.sigmoid(latents[:, :3])


def rays_and_codes(n: int, seed: int, dim: int = 8):
    K, w2c = random_cameras(n, seed)
    pixels = torch.randint(20, 44, (n, 2), generator=torch.Generator().manual_seed(seed)).float()
    codes = torch.randn(n, dim, generator=torch.Generator().manual_seed(seed + 1))
    return ref.generate_rays(pixels, K, w2c, radius=2.0), codes


def test_fresh_grid_without_cut_renders_exactly_the_dense_path(arch):
    """Every cell occupied and eps = 0: the same samples, values and field gradients as render_rays."""
    torch.manual_seed(0)
    field = ConditionedField(FieldConfig(depth=2, width=16, n_frequencies=2), latent_dim=8)
    cfg = RenderConfig(n_coarse=16, n_fine=8, early_stop_eps=0.0, occupancy_resolution=8)
    rays, codes = rays_and_codes(40, seed=3)
    dense = render_rays(field, Flat(), rays, codes, cfg, generator=torch.Generator().manual_seed(5))
    dense_grads = torch.autograd.grad(dense.color.sum() + dense.weights.sum(), list(field.parameters()))
    skip = render_rays_skip_empty(
        field, Flat(), rays, codes, cfg, ClassOccupancy(cfg), generator=torch.Generator().manual_seed(5)
    )
    skip_grads = torch.autograd.grad(skip.color.sum() + skip.weights.sum(), list(field.parameters()))
    for a, b in zip(skip, dense, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    for a, b in zip(skip_grads, dense_grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    hits = float((rays.far > rays.near).float().mean())
    assert abs(SkipStats.last["field_per_ray"] - 24 * hits) < 1e-6  # misses are not evaluated


def test_estimated_grid_skips_most_samples_and_keeps_the_image(arch):
    field, background = Ball(), Flat()
    cfg = RenderConfig(n_coarse=32, n_fine=32, occupancy_resolution=32, occupancy_warmup=0)
    occupancy = ClassOccupancy(cfg)
    codes_table = torch.randn(6, 8, generator=torch.Generator().manual_seed(1))
    for step in range(3):  # a few updates, each at freshly jittered points (the moving maximum)
        occupancy.update(step + 1, field, codes_table, generator=torch.Generator().manual_seed(step))
    assert 0.01 < occupancy.grid.occupied_fraction() < 0.2
    rays, codes = rays_and_codes(200, seed=7)
    dense = render_rays(field, background, rays, codes, cfg, generator=None)
    skip = render_rays_skip_empty(field, background, rays, codes, cfg, occupancy, generator=None)
    torch.testing.assert_close(skip.color, dense.color, rtol=0, atol=5e-3)
    torch.testing.assert_close(skip.opacity, dense.opacity, rtol=0, atol=5e-3)
    hit = dense.opacity > 0.5
    torch.testing.assert_close(skip.depth[hit], dense.depth[hit], rtol=0, atol=2e-2)
    # The coarse samples in empty space go (about half here); the fine ones sit on the surface and stay.
    assert SkipStats.last["coarse_per_ray"] < 0.6 * 32 and SkipStats.last["field_per_ray"] < 0.75 * 64
    # Fine samples in empty cells are dropped (rays through the sphere that miss the ball lose theirs),
    # and the cells the weights used are flagged for the next update.
    assert SkipStats.last["fine_per_ray"] < 31
    assert occupancy.grid.used.sum() > 0 and torch.all(occupancy.grid.occupied[occupancy.grid.used != 0] == 1)
    # The gradient reaches the field through the kept samples.
    (grad,) = torch.autograd.grad(skip.color.sum(), [field.scale])
    assert torch.isfinite(grad) and grad != 0


def test_training_samples_reestimate_their_cells_without_evaluating_the_field_again(arch):
    """A training render (gradients on) leaves each sample's density in its cell; the next update folds
    those in, so the ball's cells stay occupied and the empty space its rays crossed is dropped, though
    the update itself evaluates almost no cells."""
    field = Ball()
    cfg = RenderConfig(n_coarse=32, n_fine=16, occupancy_resolution=16, occupancy_warmup=0,
                       occupancy_fraction=1e-6, occupancy_codes=1)
    occupancy = ClassOccupancy(cfg)
    occupancy.updates, occupancy.refreshed = 1, True  # past the updates that evaluate every cell
    rays, codes = rays_and_codes(300, seed=11)
    with torch.no_grad():  # rendering for inference observes nothing
        render_rays_skip_empty(field, Flat(), rays, codes, cfg, occupancy, generator=None)
    assert torch.all(occupancy.observed < 0)
    render_rays_skip_empty(field, Flat(), rays, codes, cfg, occupancy,
                           generator=torch.Generator().manual_seed(4))
    seen = occupancy.observed >= 0
    centre = ref.occupancy_cells(torch.zeros(1, 3), 16, 2.0)
    assert seen.sum() > 200 and occupancy.observed[centre] > 20.0  # the ball's density, ~30 inside
    used = occupancy.grid.used.bool().clone()  # cells whose weights the render used stay regardless
    stats = occupancy.update(1, field, codes[:4], generator=torch.Generator().manual_seed(5))
    assert stats["evaluated"] <= 2 and stats["observed"] == seen.sum()
    assert torch.all(occupancy.observed < 0)  # consumed by the update
    core = occupancy.grid.core.bool()
    assert core[centre] and not core[seen & ~used & (occupancy.grid.density < 1e-3)].any()
    assert occupancy.grid.occupied_fraction() < 0.5
    copy = ClassOccupancy(cfg)
    copy.load_state_dict(occupancy.state_dict())
    assert torch.equal(copy.observed, occupancy.observed)


class Fog(nn.Module):
    """Dense everywhere (a field early in training)."""

    def forward(self, points, latents):
        return torch.full(points.shape[:-1], 5.0), torch.full((*points.shape[:-1], 3), 0.5)


def test_the_first_update_after_warmup_forgets_what_the_young_field_said(arch):
    """Estimates made during warm-up (fog everywhere) are replaced by a full re-estimate once warm-up
    ends, so the grid matches a fresh estimate of the formed field instead of keeping every cell."""
    cfg = RenderConfig(n_coarse=32, n_fine=0, occupancy_resolution=16, occupancy_warmup=2,
                       occupancy_fraction=1e-6, occupancy_codes=1)
    owner = ClassOccupancy(cfg)
    table = torch.zeros(3, 8)
    owner.update(0, Fog(), table, torch.Generator().manual_seed(0))  # every cell, in warm-up
    owner.update(1, Ball(), table, torch.Generator().manual_seed(1))  # warm-up, almost no cells
    assert owner.grid.occupied_fraction() == 1.0 and not owner.refreshed
    stats = owner.update(2, Ball(), table, torch.Generator().manual_seed(2))  # warm-up over: all, afresh
    assert stats["evaluated"] == 16**3 and owner.refreshed
    fresh = ClassOccupancy(cfg)
    fresh.update(2, Ball(), table, torch.Generator().manual_seed(2))
    assert torch.equal(owner.grid.occupied, fresh.grid.occupied) and owner.grid.occupied_fraction() < 0.3
    assert owner.update(3, Ball(), table)["evaluated"] <= 2  # later updates: the small share again
    copy = ClassOccupancy(cfg)
    copy.load_state_dict(owner.state_dict())
    assert copy.refreshed


def test_occupancy_owner_rotates_codes_and_round_trips(arch):
    cfg = RenderConfig(n_coarse=8, n_fine=0, occupancy_resolution=8, occupancy_codes=3, occupancy_every=4)
    owner = ClassOccupancy(cfg)
    table = torch.arange(10.0)[:, None].expand(10, 4)
    first, second = owner.codes_for_update(table), owner.codes_for_update(table)
    assert first[:, 0].tolist() == [0.0, 1.0, 4.5] and second[:, 0].tolist() == [2.0, 3.0, 4.5]
    field = Ball()
    assert not owner.maybe_update(3, field, table) and owner.maybe_update(4, field, table)
    copy = ClassOccupancy(cfg)
    copy.load_state_dict(owner.state_dict())
    assert torch.equal(copy.grid.occupied, owner.grid.occupied) and copy.cursor == owner.cursor


@pytest.mark.slow
def test_training_with_skipping_saves_the_grid_and_inference_uses_it(tmp_path, keep_taichi_arch):
    """train.py --render-skip-empty on: the grid leaves warm-up, lands in the checkpoint, and the
    inference path (render.py, fit.py, evaluate.py) renders with it; a checkpoint without one gets a
    grid estimated from the model."""
    from tiny_run import TINY_ARGS, train_in_process

    from export.inference import load_model, render_view, use_skip_empty
    from models.checkpoint import latest_checkpoint

    run = train_in_process([
        "--arch", "cpu", "--device", "cpu", "--out", str(tmp_path / "run"),
        "--cache", str(tmp_path / "cache"), "--steps", "40", *TINY_ARGS, "--synthetic-identities", "4",
        "--render-skip-empty", "on", "--render-occupancy-warmup", "16", "--render-occupancy-every", "8",
        "--render-occupancy-resolution", "16",
    ])  # fmt: skip
    model = load_model(latest_checkpoint(run))
    saved = model.payload["occupancy"]
    assert saved["updates"] == 5 and saved["grid"]["resolution"] == 16  # steps 0, 8, ..., 32
    K = torch.tensor([[64.0, 0, 16], [0, 64, 16], [0, 0, 1]]).numpy()
    w2c = torch.tensor([[1.0, 0, 0, 0], [0, 1, 0, 0], [0, 0, 1, 7]]).numpy()
    dense = render_view(model, model.latents.mean(), K, w2c, 32, 32)
    assert "checkpoint's 16^3 grid" in use_skip_empty(model, "on")
    skipped = render_view(model, model.latents.mean(), K, w2c, 32, 32)
    assert abs(skipped["color"] - dense["color"]).max() < 0.05
    # auto (the inference scripts' default): on for a run trained with skipping (wherever the field
    # renders: the device renderer skips too), and off for a run trained without it.
    assert use_skip_empty(model, "auto").startswith("empty-space skipping: on, the checkpoint's")
    del model.payload["occupancy"]
    assert "trained without it" in use_skip_empty(model, "auto") and model.occupancy is None
    assert "estimated now" in use_skip_empty(model, "on")
    assert use_skip_empty(model, "off") == "empty-space skipping: off" and model.occupancy is None


def test_the_device_step_skips_empty_space_by_default(tmp_path, keep_taichi_arch, capsys):
    """Left at its default, --render-skip-empty is on, on the torch path and on the device-resident step
    alike (models.device_skip): both say so, train with the grid and checkpoint it."""
    from tiny_run import TINY_ARGS, train_in_process

    from models.checkpoint import latest_checkpoint, load_checkpoint

    common = ["--arch", "cpu", "--device", "cpu", "--cache", str(tmp_path / "cache"), "--steps", "2",
              *TINY_ARGS, "--synthetic-identities", "4"]
    plain = train_in_process([*common, "--out", str(tmp_path / "plain")])
    assert "[train] empty-space skipping: on (64^3 occupancy grid" in capsys.readouterr().out
    assert load_checkpoint(latest_checkpoint(plain)).config.render.skip_empty
    assert load_checkpoint(latest_checkpoint(plain)).payload["occupancy"]["updates"] >= 1
    on_device = train_in_process([*common, "--out", str(tmp_path / "device"), "--field-backend", "taichi",
                                  "--device-step", "on"])
    out = capsys.readouterr().out
    assert "[train] empty-space skipping: on (64^3 occupancy grid" in out
    assert "[train] training step: on the Taichi device (asked for on)" in out
    ckpt = load_checkpoint(latest_checkpoint(on_device))
    assert ckpt.config.render.skip_empty and ckpt.payload["occupancy"]["updates"] >= 1


def test_one_code_shared_by_every_ray_renders_as_separate_copies_of_it(arch):
    """render_image expands one latent over the rays (row stride 0), and the packed samples then reach
    the field as one ray of many samples; values and gradients match rays that each hold a copy."""
    torch.manual_seed(2)
    field = ConditionedField(FieldConfig(depth=2, width=16, n_frequencies=2), latent_dim=8)
    cfg = RenderConfig(n_coarse=16, n_fine=8, occupancy_resolution=8)
    occupancy = ClassOccupancy(cfg)
    rays, _ = rays_and_codes(40, seed=5)
    code = torch.randn(8, generator=torch.Generator().manual_seed(9))
    shared, copies = code[None].expand(40, -1), code[None].repeat(40, 1)
    assert shared.stride(0) == 0 and copies.stride(0) == 8
    outs, grads = [], []
    for codes in (shared, copies):
        out = render_rays_skip_empty(field, Flat(), rays, codes, cfg, occupancy,
                                     generator=torch.Generator().manual_seed(1))
        outs.append(out)
        grads.append(torch.autograd.grad(out.color.sum() + out.depth.sum(), list(field.parameters())))
    assert SkipStats.last["field_per_ray"] > 0
    for a, b in zip(*outs, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    for a, b in zip(*grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_meshes_evaluate_only_occupied_cells_and_keep_the_surface(arch):
    """latent_mesh with a grid attached: the field runs at the grid points of occupied cells only (a
    quarter of the cube's for this ball), and the mesh is the one the dense grid gives."""
    from types import SimpleNamespace

    from export.inference import latent_mesh
    from export.mesh import mesh_volume

    class Counting(nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner, self.points = inner, 0

        def forward(self, points, latents):
            self.points += points.shape[:-1].numel()
            return self.inner(points, latents)

    field = Counting(Ball())
    cfg = RenderConfig(n_coarse=32, n_fine=0, occupancy_resolution=32, occupancy_warmup=0)
    occupancy = ClassOccupancy(cfg)
    occupancy.update(1, field.inner, torch.zeros(2, 8), generator=torch.Generator().manual_seed(0))
    model = SimpleNamespace(field=field, latents=SimpleNamespace(codes=torch.zeros(2, 8)), occupancy=None)
    dense = latent_mesh(model, torch.zeros(8), resolution=48, level=15.0)
    dense_points, field.points = field.points, 0
    model.occupancy = occupancy
    skipped = latent_mesh(model, torch.zeros(8), resolution=48, level=15.0)
    assert dense_points >= 48**3 and field.points - (dense_points - 48**3) < 0.3 * 48**3  # 23 %
    assert mesh_volume(skipped) == pytest.approx(mesh_volume(dense), rel=1e-4)
    assert mesh_volume(dense) == pytest.approx(4.0 / 3.0 * 3.14159 * 0.8**3, rel=0.05)


def _update_grid_on_rank(rank: int, world_size: int, store: str, out: str) -> None:
    """One rank of test_ranks_merge_their_grid_updates: four small updates from its own random cells."""
    import torch.distributed as dist

    from renderer.backend import init_backend

    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world_size)
    try:
        init_backend("cpu", "cpu", verbose=False)
        cfg = RenderConfig(n_coarse=32, n_fine=0, occupancy_resolution=16, occupancy_warmup=0,
                           occupancy_fraction=0.05, occupancy_codes=1)
        owner = ClassOccupancy(cfg)
        owner.updates, owner.refreshed = 1, True  # past the updates that evaluate every cell
        for step in range(4):
            if rank == 1 and step == 3:
                owner.grid.used[5] = 1  # a corner cell only rank 1's rays used: every rank keeps it
            owner.update(step + 1, Ball(), torch.zeros(2, 8),
                         generator=torch.Generator().manual_seed(100 * rank + step))
        torch.save({"density": owner.grid.density.cpu(), "occupied": owner.grid.occupied.cpu()},
                   f"{out}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_ranks_merge_their_grid_updates(tmp_path):
    """Under torch.distributed every rank estimates from its own random cells (and batches), and the
    updates are merged (a MAX all-reduce of each cell's new value and of the used flags), so every
    rank holds the same grid: the one the checkpoint saves from rank 0."""
    import torch.multiprocessing as mp

    mp.spawn(_update_grid_on_rank, args=(2, str(tmp_path / "store"), str(tmp_path)), nprocs=2, join=True)
    grids = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    assert torch.equal(grids[0]["density"], grids[1]["density"])
    assert torch.equal(grids[0]["occupied"], grids[1]["occupied"])
    assert grids[0]["occupied"][5] == 1 and 0.0 < grids[0]["occupied"].float().mean() < 1.0


def test_the_step_benchmarks_time_the_dense_path(tmp_path):
    """benchmarks/train_step.py (Taichi against the torch reference) and benchmarks/device_step.py (three
    step implementations) time the dense step although training skips by default (train_step.py
    --render-skip-empty measures skipping)."""
    import importlib.util
    from pathlib import Path

    from models.train_config import TrainConfig

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "step_report.py"
    spec = importlib.util.spec_from_file_location("bench_step_report", path)
    step_report = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(step_report)
    config = step_report.step_config("cpu", str(tmp_path / "cache"), identities=16)
    assert TrainConfig.cpu().render.skip_empty and not config.render.skip_empty


def test_packed_samples_with_a_ray_index_are_the_per_sample_codes():
    """ConditionedField(points, latents (R, L), ray=...) computes each latent term once per ray: the same
    values and gradients (parameters, codes) as each sample holding a copy of its ray's code, with
    gradients on and off, and rays without samples in between."""
    torch.manual_seed(4)
    field = ConditionedField(FieldConfig(depth=3, width=16, n_frequencies=2), latent_dim=6)
    codes = torch.randn(5, 6, requires_grad=True)
    ray = torch.tensor([0, 0, 0, 2, 2, 4, 4, 4, 4])  # rays 1 and 3 own no sample
    points = torch.randn(9, 3)
    by_ray = field(points, codes, ray=ray)
    copies = field(points, codes[ray])
    for a, b in zip(by_ray, copies, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    params = [codes, *field.parameters()]
    grads = [torch.autograd.grad(sigma.sum() + rgb.square().sum(), params)
             for sigma, rgb in (field(points, codes, ray=ray), field(points, codes[ray]))]
    for a, b in zip(*grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert grads[0][0][1].abs().sum() == 0 and grads[0][0][4].abs().sum() > 0
    with torch.no_grad():
        for a, b in zip(field(points, codes, ray=ray), copies, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="packed samples need"):
        field(points, codes, ray=ray[:4])
