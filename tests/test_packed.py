"""Packed (ragged) compositing with early stop against the plain-torch reference, on every Taichi
backend (the `arch` fixture): values, hand-written gradients, finite differences and edge cases."""

import pytest
import torch

import renderer
from renderer import reference as ref
from renderer.packed import composite_packed
from renderer.specs import offsets_from_counts, ray_indices

EPS = 1e-4


def random_packed(n_rays: int, max_count: int, seed: int, shuffle: bool = True) -> dict[str, torch.Tensor]:
    """Rays with 0..max_count sorted samples each, stored in a shuffled ray order with one unowned
    sample in front (so offsets are neither sorted nor contiguous from 0); sigmas from empty to opaque."""
    g = torch.Generator().manual_seed(seed)
    counts = torch.randint(0, max_count + 1, (n_rays,), generator=g)
    counts[:3] = torch.tensor([0, max_count, 1])  # an empty ray, a full ray, a single sample
    order = torch.randperm(n_rays, generator=g) if shuffle else torch.arange(n_rays)
    stored = counts[order]
    starts = 1 + torch.cumsum(stored, 0) - stored  # sample 0 belongs to no ray
    offsets = torch.empty_like(counts)
    offsets[order] = starts
    n = 1 + int(counts.sum())
    t = 5 + 4 * torch.rand(n, generator=g)
    for ray in range(n_rays):  # sort each ray's depths
        span = slice(int(offsets[ray]), int(offsets[ray] + counts[ray]))
        t[span] = torch.sort(t[span]).values
    deltas = 4 * torch.rand(n, generator=g) / max_count
    return {
        "sigmas": torch.rand(n, generator=g) ** 3 * 60,
        "rgbs": torch.rand(n, 3, generator=g),
        "t": t,
        "deltas": deltas,
        "offsets": offsets,
        "counts": counts,
        "background": torch.rand(n_rays, 3, generator=g),
    }


def with_grads(fn, batch, upstream, eps, outputs=(0, 1, 2, 3)):
    """Outputs of ``fn`` and the gradients of sum_k <upstream_k, output_k> wrt sigmas, rgbs, background."""
    leaves = [batch[k].clone().requires_grad_() for k in ("sigmas", "rgbs", "background")]
    sigmas, rgbs, background = leaves
    packing = (batch["t"], batch["deltas"], batch["offsets"], batch["counts"])
    out = fn(sigmas, rgbs, *packing, background, eps=eps)
    loss = sum((out[k] * upstream[k]).sum() for k in outputs)
    return out, torch.autograd.grad(loss, leaves, allow_unused=True)


def upstream_for(n_rays: int, n_samples: int, seed: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=g) for s in ((n_rays, 3), (n_rays,), (n_rays,), (n_samples,))]


def transmittance_margin(batch, eps: float) -> float:
    """Smallest |log T_i - log eps| over owned samples: the cut is decided the same way by float32
    products (kernel) and float64 sums (reference) only when this is well above float32 rounding."""
    tau = (batch["sigmas"] * batch["deltas"]).double()
    margins = []
    for ray in range(batch["offsets"].shape[0]):
        start, count = int(batch["offsets"][ray]), int(batch["counts"][ray])
        before = torch.cumsum(tau[start : start + count], 0) - tau[start : start + count]
        margins.append((before - torch.log(torch.tensor(1.0 / eps, dtype=torch.float64))).abs())
    return float(torch.cat(margins).min())


@pytest.mark.parametrize("eps", [EPS, 1e-2, 0.0])
def test_packed_matches_reference_values_and_gradients(arch, eps):
    batch = random_packed(60, 40, seed=0)
    if eps > 0:
        assert transmittance_margin(batch, eps) > 1e-3, "test data too close to the cut"
    n_rays, n_samples = batch["offsets"].shape[0], batch["sigmas"].shape[0]
    upstream = upstream_for(n_rays, n_samples, seed=1)
    got, got_grads = with_grads(composite_packed, batch, upstream, eps)
    want, want_grads = with_grads(ref.composite_packed, batch, upstream, eps)
    for name, a, b in zip(("color", "opacity", "depth", "weights"), got[:4], want[:4], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=2e-5, msg=f"{name} differs from the reference")
    assert torch.equal(got.kept, want.kept)
    if eps > 0:
        assert (got.kept < batch["counts"]).sum() > 10, "the cut should shorten many rays"
    else:
        assert torch.equal(got.kept, batch["counts"].to(torch.int32))
    for name, a, b in zip(("sigmas", "rgbs", "background"), got_grads, want_grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=5e-5, msg=f"d{name} differs from the reference")
    assert got.weights[0] == 0 and got_grads[0][0] == 0 and torch.all(got_grads[1][0] == 0), "unowned sample"


@pytest.mark.parametrize("outputs", [(0,), (1, 2), (3,)])
def test_packed_gradients_of_single_outputs(arch, outputs):
    """Upstream gradients given for some outputs only (the others arrive as None in backward)."""
    batch = random_packed(20, 16, seed=2)
    upstream = upstream_for(20, batch["sigmas"].shape[0], seed=3)
    _, got = with_grads(composite_packed, batch, upstream, EPS, outputs)
    _, want = with_grads(ref.composite_packed, batch, upstream, EPS, outputs)
    for a, b in zip(got, want, strict=True):
        b = torch.zeros_like(a) if b is None else b  # the reference's unused leaves: no gradient at all
        torch.testing.assert_close(a, b, rtol=1e-4, atol=5e-5)


def test_packed_gradients_match_finite_differences(arch):
    """Central differences of the kernel's own forward (float32, so a coarse step and tolerance),
    on every sigma and a few colour channels, for a loss that uses all four outputs."""
    batch = random_packed(6, 6, seed=4, shuffle=False)
    batch["sigmas"] = batch["sigmas"].clamp(0.2, 5.0)  # no cut nearby, no saturation: FD well conditioned
    n_samples = batch["sigmas"].shape[0]
    upstream = upstream_for(6, n_samples, seed=5)

    def loss(sigmas, rgbs):
        out = composite_packed(
            sigmas,
            rgbs,
            batch["t"],
            batch["deltas"],
            batch["offsets"],
            batch["counts"],
            batch["background"],
            eps=EPS,
        )
        return sum((out[k] * upstream[k]).sum() for k in range(4))

    _, (d_sigma, d_rgb, _) = with_grads(composite_packed, batch, upstream, EPS)
    h = 1e-2
    for i in range(1, n_samples):
        plus, minus = batch["sigmas"].clone(), batch["sigmas"].clone()
        plus[i] += h
        minus[i] -= h
        fd = (loss(plus, batch["rgbs"]) - loss(minus, batch["rgbs"])) / (2 * h)
        assert abs(float(fd) - float(d_sigma[i])) < 2e-3 + 2e-2 * abs(float(fd)), f"dsigma[{i}]"
    for i, c in ((1, 0), (3, 2), (n_samples - 1, 1)):
        plus, minus = batch["rgbs"].clone(), batch["rgbs"].clone()
        plus[i, c] += h
        minus[i, c] -= h
        fd = (loss(batch["sigmas"], plus) - loss(batch["sigmas"], minus)) / (2 * h)
        assert abs(float(fd) - float(d_rgb[i, c])) < 2e-3 + 2e-2 * abs(float(fd)), f"drgb[{i}, {c}]"


def test_packed_without_cut_equals_dense_composite(arch):
    """eps=0 and full rows: the packed kernels give renderer.composite's values and gradients."""
    g = torch.Generator().manual_seed(6)
    n_rays, n_samples = 12, 10
    t = torch.sort(5 + 4 * torch.rand(n_rays, n_samples, generator=g), 1).values
    deltas = ref.sample_deltas(t, torch.full((n_rays,), 9.0))
    sigmas = torch.rand(n_rays, n_samples, generator=g) ** 3 * 40
    rgbs = torch.rand(n_rays, n_samples, 3, generator=g)
    bg = torch.rand(n_rays, 3, generator=g)
    counts = torch.full((n_rays,), n_samples)
    offsets = offsets_from_counts(counts)
    gc = torch.randn(n_rays, 3, generator=g)
    s_d, r_d = sigmas.clone().requires_grad_(), rgbs.clone().requires_grad_()
    dense = renderer.composite(s_d, r_d, t, deltas, bg)
    (dense.color * gc).sum().backward()
    s_p, r_p = sigmas.view(-1).clone().requires_grad_(), rgbs.view(-1, 3).clone().requires_grad_()
    packed = composite_packed(s_p, r_p, t.view(-1), deltas.view(-1), offsets, counts, bg, eps=0.0)
    (packed.color * gc).sum().backward()
    torch.testing.assert_close(packed.color, dense.color, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(packed.weights, dense.weights.view(-1), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(s_p.grad, s_d.grad.view(-1), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(r_p.grad, r_d.grad.view(-1, 3), rtol=1e-6, atol=1e-6)


def test_packed_edge_cases_empty_rays_first_sample_cut_and_no_rays(arch):
    # Ray 0: no samples. Ray 1: an opaque first sample, so the cut falls right after it. Ray 2: faint.
    sigmas = torch.tensor([1e4, 3.0, 2.0, 0.1, 0.2])
    rgbs = torch.rand(5, 3, generator=torch.Generator().manual_seed(7))
    t = torch.tensor([1.0, 1.5, 2.0, 1.0, 2.0])
    deltas = torch.full((5,), 0.5)
    offsets, counts = torch.tensor([0, 0, 3]), torch.tensor([0, 3, 2])
    bg = torch.tensor([[0.2, 0.4, 0.6], [0.1, 0.1, 0.1], [0.9, 0.8, 0.7]], requires_grad=True)
    s, r = sigmas.clone().requires_grad_(), rgbs.clone().requires_grad_()
    out = composite_packed(s, r, t, deltas, offsets, counts, bg)
    want = ref.composite_packed(sigmas, rgbs, t, deltas, offsets, counts, bg.detach())
    assert out.kept.tolist() == [0, 1, 2] == want.kept.tolist()
    torch.testing.assert_close(out.color, want.color)
    torch.testing.assert_close(out.color[0], bg[0].detach())  # the empty ray shows its background
    assert out.opacity[0] == 0 and out.depth[0] == 0
    torch.testing.assert_close(out.color[1], rgbs[0])  # the first sample alone colours ray 1
    assert torch.all(out.weights[1:3] == 0)
    out.color.sum().backward()
    assert torch.all(s.grad[1:3] == 0) and torch.all(r.grad[1:3] == 0), "cut samples must get no gradient"
    torch.testing.assert_close(bg.grad[0], torch.ones(3))  # d color / d bg = 1 - opacity = 1
    # No rays at all, and rays that own no samples out of an empty list.
    none = composite_packed(
        torch.zeros(0),
        torch.zeros(0, 3),
        torch.zeros(0),
        torch.zeros(0),
        torch.zeros(0, dtype=torch.int64),
        torch.zeros(0, dtype=torch.int64),
    )
    assert none.color.shape == (0, 3) and none.weights.shape == (0,)
    empty = composite_packed(
        torch.zeros(0),
        torch.zeros(0, 3),
        torch.zeros(0),
        torch.zeros(0),
        torch.zeros(2, dtype=torch.int64),
        torch.zeros(2, dtype=torch.int64),
        0.5,
    )
    torch.testing.assert_close(empty.color, torch.full((2, 3), 0.5))


def test_packed_helpers_and_bad_shapes(arch):
    counts = torch.tensor([2, 0, 3])
    assert offsets_from_counts(counts).tolist() == [0, 2, 2]
    assert ray_indices(counts).tolist() == [0, 0, 2, 2, 2]
    with pytest.raises(ValueError, match="sigmas \\(N,\\) and rgbs \\(N, 3\\)"):
        composite_packed(
            torch.zeros(2, 1),
            torch.zeros(2, 3),
            torch.zeros(2),
            torch.zeros(2),
            torch.zeros(1),
            torch.ones(1),
        )
    with pytest.raises(ValueError, match="offsets and counts"):
        composite_packed(
            torch.zeros(2), torch.zeros(2, 3), torch.zeros(2), torch.zeros(2), torch.zeros(2), torch.ones(1)
        )
    with pytest.raises(ValueError, match="eps must be"):
        composite_packed(
            torch.zeros(2),
            torch.zeros(2, 3),
            torch.zeros(2),
            torch.zeros(2),
            torch.zeros(1),
            torch.ones(1),
            eps=-1.0,
        )
