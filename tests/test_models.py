"""models/: field, background, latent table, losses, ray/image rendering, checkpoints, sharding."""

from __future__ import annotations

import math
import subprocess
import sys
import textwrap

import pytest
import torch

import renderer
from common.atomic import is_temp_name
from models import (
    BackgroundConfig,
    BackgroundField,
    ConditionedField,
    ConstantBackground,
    FieldConfig,
    LatentConfig,
    LatentTable,
    LossConfig,
    RenderConfig,
    compute_losses,
    hard_loss,
    make_background,
    make_latent_optimizer,
    positional_encoding,
    render_image,
    render_rays,
)
from models.checkpoint import (
    CheckpointError,
    CheckpointKeeper,
    checkpoint_payload,
    latest_checkpoint,
    load_checkpoint,
    read_checkpoint,
    save_checkpoint,
)
from models.distributed import gather_owned_rows, owned_range
from models.field import latent_chunk_sizes
from models.train_config import TrainConfig

FOCAL, SIZE = 64.0, 32


def small_field(latent_dim: int = 8, mode: str = "chunks") -> ConditionedField:
    torch.manual_seed(0)
    return ConditionedField(FieldConfig(depth=2, width=16, latent_mode=mode), latent_dim)


def camera() -> tuple[torch.Tensor, torch.Tensor]:
    K = torch.tensor([[FOCAL, 0, SIZE / 2], [0, FOCAL, SIZE / 2], [0, 0, 1]])
    w2c = torch.tensor([[1.0, 0, 0, 0], [0, 1, 0, 0], [0, 0, 1, 7]])
    return K, w2c


def some_rays(n: int = 24, seed: int = 0) -> renderer.Rays:
    g = torch.Generator().manual_seed(seed)
    pixels = torch.randint(0, SIZE, (n, 2), generator=g).float()
    K, w2c = camera()
    return renderer.generate_rays(pixels, K, w2c, radius=2.0)


# ----- field ---------------------------------------------------------------------------------------
def test_positional_encoding_values():
    x = torch.tensor([[0.5, -1.0, 2.0]])
    enc = positional_encoding(x, 2)
    assert enc.shape == (1, 15)
    assert torch.allclose(enc[0, :3], x[0])
    # layout: [x, sin(2^0 x), sin(2^1 x), cos(2^0 x), cos(2^1 x)] per frequency block of 3
    assert torch.allclose(enc[0, 3:6], torch.sin(x[0]))
    assert torch.allclose(enc[0, 6:9], torch.sin(2 * x[0]))
    assert torch.allclose(enc[0, 9:12], torch.cos(x[0]))


def test_latent_chunks_cover_the_code():
    assert latent_chunk_sizes(10, 4, "chunks") == [3, 3, 2, 2]
    assert latent_chunk_sizes(10, 4, "whole") == [10] * 4
    with pytest.raises(ValueError, match="latent_mode"):
        latent_chunk_sizes(10, 4, "tokens")


@pytest.mark.parametrize("mode", ["chunks", "whole"])
def test_field_shapes_ranges_and_conditioning(mode):
    field = small_field(8, mode)
    points = torch.randn(50, 3)
    z = torch.randn(50, 8)
    sigma, rgb = field(points, z)
    assert sigma.shape == (50,) and rgb.shape == (50, 3)
    assert (sigma >= 0).all() and (rgb > 0).all() and (rgb < 1).all()
    # Every chunk of the code reaches the output: changing only the last value changes it.
    z2 = z.clone()
    z2[:, -1] += 3.0
    assert not torch.allclose(field(points, z2)[1], rgb)
    with pytest.raises(ValueError, match="expects 8"):
        field(points, torch.zeros(50, 5))


def test_backgrounds():
    dirs = torch.nn.functional.normalize(torch.randn(7, 3), dim=-1)
    z = torch.zeros(7, 4)
    const = make_background([1.0, 0.5, 0.0], 4)
    assert isinstance(const, ConstantBackground)
    assert torch.equal(const(dirs, z), torch.tensor([[1.0, 0.5, 0.0]]).expand(7, 3))
    net = make_background("network", 4, BackgroundConfig(depth=2, width=8))
    assert isinstance(net, BackgroundField)
    out = net(dirs, z)
    assert out.shape == (7, 3) and ((out > 0) & (out < 1)).all()
    with pytest.raises(ValueError, match="network"):
        make_background("sky", 4)


# ----- latents -------------------------------------------------------------------------------------
def test_latent_table_mean_truncate_and_sparse_sgd():
    table = LatentTable(5, 3)
    assert torch.equal(table.codes, torch.zeros(5, 3))
    with torch.no_grad():
        table.codes.copy_(torch.arange(15.0).reshape(5, 3))
    mean = table.mean()
    assert torch.allclose(mean, torch.tensor([6.0, 7.0, 8.0]))
    z = table.codes[4].detach()
    assert torch.allclose(table.truncate(z, 0.0), mean)
    assert torch.allclose(table.truncate(z, 1.0), z)
    assert torch.allclose(table.truncate(z, 0.5), mean + 0.5 * (z - mean))
    opt = make_latent_optimizer(table, LatentConfig(), network_lr=0.1)
    assert isinstance(opt, torch.optim.SGD) and opt.param_groups[0]["lr"] == pytest.approx(0.1)
    before = table.codes.detach().clone()
    table(torch.tensor([1, 3])).sum().backward()
    opt.step()
    changed = (table.codes.detach() != before).any(dim=1)
    assert changed.tolist() == [False, True, False, True, False]


# ----- losses --------------------------------------------------------------------------------------
def test_losses_values_and_weights():
    assert hard_loss(torch.tensor([[0.0, 1.0]])).item() == pytest.approx(-math.log(1 + math.exp(-1)),
                                                                        abs=1e-6)
    assert hard_loss(torch.tensor([[0.5]])).item() > hard_loss(torch.tensor([[0.0]])).item()
    color = torch.full((4, 3), 0.5)
    target = torch.zeros(4, 3)
    opacity = torch.tensor([1.0, 1.0, 0.0, 0.0])
    mask = torch.tensor([1.0, 0.0, 0.0, 0.0])
    weights = torch.tensor([[1.0, 0.0]] * 4)
    terms = compute_losses(color, opacity, weights, target, mask, LossConfig(rgb=1.0, mask=2.0, hard=0.1))
    assert terms["rgb"].item() == pytest.approx(0.25)
    assert terms["mask"].item() == pytest.approx(0.25)
    expected = 0.25 + 2.0 * 0.25 + 0.1 * terms["hard"].item()
    assert terms["total"].item() == pytest.approx(expected)
    no_mask = compute_losses(color, opacity, weights, target, None, LossConfig())
    assert no_mask["mask"].item() == 0.0


# ----- rendering -----------------------------------------------------------------------------------
class CountingField(torch.nn.Module):
    """Wraps a field and counts how many points it evaluates."""

    def __init__(self, field):
        super().__init__()
        self.field = field
        self.points = 0

    def forward(self, points, latents):
        self.points += points.shape[:-1].numel()
        return self.field(points, latents)


def test_render_rays_evaluates_each_sample_once_and_matches_reevaluation():
    field = CountingField(small_field(8))
    background = make_background([1.0, 1.0, 1.0], 8)
    rays = some_rays(24)
    z = torch.randn(24, 8, requires_grad=True)
    cfg = RenderConfig(n_coarse=8, n_fine=8)
    gen = torch.Generator().manual_seed(3)
    out = render_rays(field, background, rays, z, cfg, generator=gen)
    assert field.points == 24 * 16
    assert out.color.shape == (24, 3) and out.weights.shape == (24, 16)

    # Rebuild the same samples and evaluate the field at the merged depths directly: the gathered
    # coarse+fine outputs must be the field's values at the merged, sorted depths.
    gen = torch.Generator().manual_seed(3)
    t_c = renderer.sample_stratified(rays.near, rays.far, 8, generator=gen)
    with torch.no_grad():
        pts = rays.origins[:, None] + t_c[..., None] * rays.directions[:, None]
        s, c = field.field(pts.reshape(-1, 3), z.detach().repeat_interleave(8, 0))
        coarse = renderer.composite(s.reshape(24, 8), c.reshape(24, 8, 3), t_c,
                                    renderer.sample_deltas(t_c, rays.far), 0.0)
        t_f = renderer.sample_importance(t_c, coarse.weights, 8, rays.near, rays.far, generator=gen)
        t_all, _ = renderer.merge_samples(t_c, t_f)
        pts = rays.origins[:, None] + t_all[..., None] * rays.directions[:, None]
        s, c = field.field(pts.reshape(-1, 3), z.detach().repeat_interleave(16, 0))
        ref = renderer.composite(s.reshape(24, 16), c.reshape(24, 16, 3), t_all,
                                 renderer.sample_deltas(t_all, rays.far), torch.ones(3))
    assert torch.allclose(out.color, ref.color, atol=1e-5)
    assert torch.allclose(out.weights, ref.weights, atol=1e-5)

    # Gradients flow to the latents and to the network through both coarse and fine samples.
    out.color.sum().backward()
    assert z.grad is not None and z.grad.abs().sum() > 0
    assert all(p.grad is not None for p in field.parameters())


def test_render_image_is_chunk_invariant_and_deterministic():
    field = small_field(8)
    background = make_background([1.0, 1.0, 1.0], 8)
    K, w2c = camera()
    z = torch.randn(8)
    cfg = RenderConfig(n_coarse=8, n_fine=8)
    a = render_image(field, background, z, K, w2c, SIZE, SIZE, cfg, chunk=97)
    b = render_image(field, background, z, K, w2c, SIZE, SIZE, cfg, chunk=4096)
    assert a["color"].shape == (SIZE, SIZE, 3) and a["opacity"].shape == (SIZE, SIZE)
    assert a["depth"].shape == (SIZE, SIZE)
    for key in a:
        assert torch.allclose(a[key], b[key], atol=1e-6)
    assert not a["color"].requires_grad
    # Depth lies inside the bounding sphere seen from 7 units away (or 0 where nothing is hit).
    hit = a["opacity"] > 0.5
    assert hit.any() and (a["depth"][hit] / a["opacity"][hit]).min() >= 5.0 - 1e-4


# ----- checkpoints ---------------------------------------------------------------------------------
def make_payload(step: int, metric: float | None = None, background=None) -> dict:
    field = small_field(8)
    background = background if background is not None else make_background([1.0, 1.0, 1.0], 8)
    latents = LatentTable(6, 8)
    with torch.no_grad():
        latents.codes.normal_(generator=torch.Generator().manual_seed(step))
    opt = torch.optim.Adam(field.parameters(), lr=1e-3)
    sch = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 ** s)
    field(torch.randn(4, 3), torch.randn(4, 8)).__getitem__(0).sum().backward()
    opt.step()
    sch.step()
    return checkpoint_payload(field=field, background=background, latents=latents,
                              optimizers={"networks": opt}, schedulers={"networks": sch}, step=step,
                              rng={"torch": torch.get_rng_state()},
                              config=TrainConfig.paper().with_values({("render", "n_coarse"): 8,
                                                                      ("render", "n_fine"): 4}),
                              fingerprint="abc", metric=metric)


def test_checkpoint_round_trip_weights_only(tmp_path):
    bg = make_background("network", 8, BackgroundConfig(depth=1, width=8))
    payload = make_payload(5, background=bg)
    path = save_checkpoint(tmp_path / "c.pt", payload)
    raw = torch.load(path, weights_only=True)
    assert raw["step"] == 5 and raw["fingerprint"] == "abc"
    ckpt = load_checkpoint(path)
    assert ckpt.step == 5 and ckpt.fingerprint == "abc"
    assert ckpt.render_config == RenderConfig(n_coarse=8, n_fine=4, radius=2.0)
    assert isinstance(ckpt.background, BackgroundField)
    assert torch.equal(ckpt.latents.codes, payload["latents"]["codes"])
    for key, value in payload["field"].items():
        assert torch.equal(ckpt.field.state_dict()[key], value)
    points, z = torch.randn(5, 3), torch.randn(5, 8)
    field = ConditionedField(ckpt.field.cfg, 8)
    field.load_state_dict(payload["field"])
    assert torch.equal(ckpt.field(points, z)[0], field(points, z)[0])


def test_keeper_keeps_last_k_and_best(tmp_path):
    keeper = CheckpointKeeper(tmp_path, keep_last=2)
    for step, metric in [(1, 0.5), (2, 0.1), (3, 0.3), (4, 0.2)]:
        keeper.save(make_payload(step, metric))
    names = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert names == ["best.pt", "step_00000003.pt", "step_00000004.pt"]
    assert load_checkpoint(tmp_path / "checkpoints" / "best.pt").step == 2
    assert latest_checkpoint(tmp_path).name == "step_00000004.pt"
    assert latest_checkpoint(tmp_path / "checkpoints").name == "step_00000004.pt"
    # A new keeper in the same run remembers the best metric.
    assert CheckpointKeeper(tmp_path, keep_last=2).best_metric == pytest.approx(0.1)


def test_not_a_checkpoint_raises_one_clear_error(tmp_path):
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"this is not a checkpoint at all")
    with pytest.raises(CheckpointError, match="is not a LOLNeRF checkpoint"):
        load_checkpoint(junk)
    other = tmp_path / "other.pt"
    torch.save({"weights": torch.zeros(3)}, other)
    with pytest.raises(CheckpointError, match="not a LOLNeRF checkpoint"):
        load_checkpoint(other)
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(tmp_path / "missing.pt")
    with pytest.raises(CheckpointError, match="no checkpoint found"):
        latest_checkpoint(tmp_path)
    truncated = tmp_path / "truncated.pt"
    good = save_checkpoint(tmp_path / "good.pt", make_payload(1))
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(CheckpointError):
        read_checkpoint(truncated)


KILL_MIDWAY = textwrap.dedent("""
    import os, signal, sys
    import torch
    sys.path.insert(0, {root!r})
    from models.checkpoint import save_checkpoint

    payload = torch.load({source!r}, weights_only=True)
    payload["step"] = 2
    real_save = torch.save

    def save_then_die(obj, handle, *args, **kwargs):
        real_save(obj, handle, *args, **kwargs)
        handle.flush()
        handle.truncate(handle.tell() // 2)   # half the bytes are on disk ...
        os.kill(os.getpid(), signal.SIGKILL)  # ... when the process is killed

    torch.save = save_then_die
    save_checkpoint({target!r}, payload)
""")


def test_checkpoint_write_killed_midway_leaves_previous_loadable(tmp_path):
    import pathlib

    root = str(pathlib.Path(__file__).resolve().parents[1])
    keeper = CheckpointKeeper(tmp_path, keep_last=3)
    first = keeper.save(make_payload(1, 0.5))
    best = tmp_path / "checkpoints" / "best.pt"
    # Kill one write of a new step file and one overwrite of best.pt.
    for target in (tmp_path / "checkpoints" / "step_00000002.pt", best):
        script = KILL_MIDWAY.format(root=root, source=str(first), target=str(target))
        result = subprocess.run([sys.executable, "-c", script], capture_output=True, timeout=120)
        assert result.returncode == -9, result.stderr.decode()
    assert latest_checkpoint(tmp_path) == first
    assert load_checkpoint(first).step == 1
    assert load_checkpoint(best).step == 1
    strays = [p for p in (tmp_path / "checkpoints").iterdir() if is_temp_name(p.name)]
    assert len(strays) == 2  # the half-written temp files, ignored by every reader
    keeper.save(make_payload(3, 0.4))  # the next save cleans them up
    assert not [p for p in (tmp_path / "checkpoints").iterdir() if is_temp_name(p.name)]


# ----- sharding ------------------------------------------------------------------------------------
def test_owned_ranges_partition_identities():
    for n, world_size in [(10, 3), (16, 2), (5, 5)]:
        blocks = [owned_range(n, r, world_size) for r in range(world_size)]
        covered = [i for lo, hi in blocks for i in range(lo, hi)]
        assert covered == list(range(n))
    with pytest.raises(ValueError, match="fewer processes"):
        owned_range(2, 0, 3)
    table = torch.randn(4, 2)
    assert torch.equal(gather_owned_rows(table), table)


def _concatenated(field: ConditionedField, points: torch.Tensor, latents: torch.Tensor):
    """The field as one product per layer over the concatenated [hidden, chunk, encoding] (the layout the
    parameters describe), per sample: (N, 3), (N, L) -> (N,), (N, 3)."""
    from torch.nn import functional as F

    from models.field import positional_encoding

    enc = positional_encoding(points, field.cfg.n_frequencies, field.cfg.include_input)
    hidden = None
    for layer, chunk in zip(field.layers, field.latent_chunks(latents), strict=True):
        hidden = F.relu(layer(torch.cat([chunk, enc] if hidden is None else [hidden, chunk, enc], -1)))
    return F.softplus(field.density_head(hidden)).squeeze(-1), torch.sigmoid(field.color_head(hidden))


@pytest.mark.parametrize("mode", ["chunks", "whole"])
def test_weight_blocks_compute_the_concatenated_layer_per_sample_and_per_ray(mode):
    torch.manual_seed(0)
    field = ConditionedField(FieldConfig(depth=3, width=16, n_frequencies=2, latent_mode=mode), 7).double()
    points = torch.randn(5, 6, 3, dtype=torch.float64)
    ray_latents = torch.randn(5, 7, dtype=torch.float64, requires_grad=True)
    per_sample_latents = ray_latents[:, None].expand(5, 6, 7).reshape(30, 7)
    want = _concatenated(field, points.reshape(30, 3), per_sample_latents)
    for got in (field(points, ray_latents), field(points.reshape(30, 3), per_sample_latents)):
        assert torch.allclose(got[0].reshape(30), want[0], rtol=0, atol=1e-12)
        assert torch.allclose(got[1].reshape(30, 3), want[1], rtol=0, atol=1e-12)
    upstream = torch.randn(30, dtype=torch.float64), torch.randn(30, 3, dtype=torch.float64)
    inputs = [ray_latents, *field.parameters()]
    want_grads = torch.autograd.grad(want, inputs, upstream)
    sigma, rgb = field(points, ray_latents)
    got_grads = torch.autograd.grad((sigma, rgb), inputs, (upstream[0].view(5, 6), upstream[1].view(5, 6, 3)))
    for got, expected in zip(got_grads, want_grads, strict=True):
        assert torch.allclose(got, expected, rtol=0, atol=1e-12)
    with pytest.raises(ValueError, match="do not pair"):
        field(points, ray_latents[:4])
