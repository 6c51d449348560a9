"""Renderer kernels against the plain-torch reference, on every Taichi backend (the `arch` fixture)."""

import importlib
import math

import numpy as np
import pytest
import torch
from scipy.spatial.transform import Rotation

import renderer
from renderer import backend
from renderer import reference as ref

RADIUS = 2.0


def random_cameras(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """n cameras about 7 units from the origin, randomly rotated: K (n, 3, 3), [R|t] (n, 3, 4)."""
    rng = np.random.default_rng(seed)
    rotations = Rotation.random(n, random_state=rng).as_matrix()
    translations = np.stack([rng.normal(0, 0.3, n), rng.normal(0, 0.3, n), rng.uniform(5, 9, n)], 1)
    w2c = np.concatenate([rotations, translations[:, :, None]], 2)
    K = np.tile(np.array([[128.0, 0.5, 32.0], [0.0, 120.0, 30.0], [0.0, 0.0, 1.0]]), (n, 1, 1))
    return torch.tensor(K, dtype=torch.float32), torch.tensor(w2c, dtype=torch.float32)


def random_batch(n_rays: int, n_samples: int, seed: int) -> dict[str, torch.Tensor]:
    """Sorted t in [5, 9], deltas, sigmas spanning empty to opaque, colours and a background."""
    g = torch.Generator().manual_seed(seed)
    t = torch.sort(5 + 4 * torch.rand(n_rays, n_samples, generator=g), 1).values
    far = torch.full((n_rays,), 9.0)
    sigmas = torch.rand(n_rays, n_samples, generator=g) ** 3 * 40
    return {
        "t": t,
        "far": far,
        "deltas": ref.sample_deltas(t, far),
        "sigmas": sigmas,
        "rgbs": torch.rand(n_rays, n_samples, 3, generator=g),
        "background": torch.rand(n_rays, 3, generator=g),
    }


def composite_with_grads(fn, sigmas, rgbs, t, deltas, background, upstream, outputs=(0, 1, 2, 3)):
    """Outputs of ``fn`` and the grads of sum_k <upstream_k, output_k> (over the chosen outputs)."""
    sigmas = sigmas.clone().requires_grad_()
    rgbs = rgbs.clone().requires_grad_()
    leaves = [sigmas, rgbs]
    if torch.is_tensor(background):
        background = background.clone().requires_grad_()
        leaves.append(background)
    out = fn(sigmas, rgbs, t, deltas, background)
    loss = sum((out[k] * upstream[k]).sum() for k in outputs)
    grads = torch.autograd.grad(loss, leaves, allow_unused=True)
    return out, grads


def upstream_for(n_rays: int, n_samples: int, seed: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    shapes = [(n_rays, 3), (n_rays,), (n_rays,), (n_rays, n_samples)]
    return [torch.randn(s, generator=g) for s in shapes]


def assert_close(actual, expected, rtol=1e-5, atol=1e-5):
    """Values equal within tolerances; an expected value made on another device is compared where the
    actual one is (test_outputs_stay_on_the_arch_device checks where outputs land)."""
    torch.testing.assert_close(actual, expected.to(actual.device), rtol=rtol, atol=atol)


# ---------------------------------------------------------------- rays


def test_rays_match_reference_and_analytic_sphere(arch):
    K, w2c = random_cameras(300, seed=0)
    pixels = torch.randint(0, 64, (300, 2), generator=torch.Generator().manual_seed(1)).float()
    rays = renderer.generate_rays(pixels, K, w2c, radius=RADIUS)
    expected = ref.generate_rays(pixels, K, w2c, radius=RADIUS)
    for got, want in zip(rays, expected, strict=True):
        assert_close(got, want, atol=2e-5)

    assert_close(rays.directions.norm(dim=1), torch.ones(300))
    centres = -torch.einsum("rji,rj->ri", w2c[:, :, :3], w2c[:, :, 3])
    assert_close(rays.origins, centres)
    hit = rays.far > rays.near
    assert 20 < hit.sum() < 300, "the cameras should produce both hits and misses"
    for depth in (rays.near[hit], rays.far[hit]):
        points = rays.origins[hit] + depth[:, None] * rays.directions[hit]
        assert_close(points.norm(dim=1), torch.full_like(depth, RADIUS), atol=1e-4)
    assert torch.all(rays.near[~hit] == rays.far[~hit])

    # The direction projects back onto the pixel centre.
    cam_dirs = torch.einsum("rij,rj->ri", w2c[:, :, :3], rays.directions)
    projected = torch.einsum("rij,rj->ri", K, cam_dirs)
    assert_close(projected[:, :2] / projected[:, 2:], pixels + 0.5, atol=2e-3)


def test_rays_shared_camera_inside_sphere_and_centre_pixel(arch):
    K = torch.tensor([[128.0, 0, 32.0], [0, 128, 32.0], [0, 0, 1]])
    front = torch.tensor([[1.0, 0, 0, 0], [0, 1, 0, 0], [0, 0, 1, 7]])
    rays = renderer.generate_rays(torch.tensor([[31.5, 31.5]]), K, front)
    assert_close(rays.near, torch.tensor([5.0]))
    assert_close(rays.far, torch.tensor([9.0]))
    assert_close(rays.directions, torch.tensor([[0.0, 0.0, 1.0]]))
    inside = torch.tensor([[1.0, 0, 0, 0], [0, 1, 0, 0], [0, 0, 1, 0.5]])  # camera at z = -0.5
    rays = renderer.generate_rays(torch.tensor([[31.5, 31.5]]), K, inside, radius=RADIUS)
    assert rays.near.item() == 0.0
    assert_close(rays.far, torch.tensor([2.5]))
    empty = renderer.generate_rays(torch.zeros(0, 2), K, front)
    assert [tuple(x.shape) for x in empty] == [(0, 3), (0, 3), (0,), (0,)]


def test_rays_reject_bad_shapes(arch):
    K = torch.eye(3)
    with pytest.raises(ValueError, match="pixels must have shape"):
        renderer.generate_rays(torch.zeros(4, 3), K, torch.zeros(3, 4))
    with pytest.raises(ValueError, match="world_to_camera must have shape"):
        renderer.generate_rays(torch.zeros(4, 2), K, torch.zeros(3, 3))


# ---------------------------------------------------------------- sampling


def test_stratified_within_bins_seeded_and_matching_reference(arch):
    near = torch.tensor([0.0, 5.0, 2.0, 3.0])
    far = torch.tensor([4.0, 9.0, 2.0, 3.5])  # includes a miss (near == far)
    t = renderer.sample_stratified(near, far, 16, torch.Generator().manual_seed(7))
    again = renderer.sample_stratified(near, far, 16, torch.Generator().manual_seed(7))
    other = renderer.sample_stratified(near, far, 16, torch.Generator().manual_seed(8))
    jitter = ref.hashed_uniforms(4, 16, torch.Generator().manual_seed(7), near.device)
    expected = ref.sample_stratified(near, far, 16, jitter=jitter)
    assert torch.equal(t, again) and not torch.equal(t, other)
    assert_close(t, expected)
    width = (far - near)[:, None] / 16
    lower = near[:, None] + torch.arange(16) * width
    assert torch.all(t >= lower - 1e-6) and torch.all(t <= lower + width + 1e-6)
    assert torch.all(t[:, 1:] >= t[:, :-1])
    assert torch.all(t[2] == 2.0)
    centres = renderer.sample_stratified(near, far, 16)
    assert_close(centres, lower + 0.5 * width)


def test_importance_matches_reference(arch):
    rays = 64
    g = torch.Generator().manual_seed(3)
    near = 4 + torch.rand(rays, generator=g)
    far = near + 1 + 3 * torch.rand(rays, generator=g)
    far[:4] = near[:4]  # misses
    t = ref.sample_stratified(near, far, 32, g)
    weights = torch.rand(rays, 32, generator=g) ** 6
    weights[4:8] = 0  # zero-weight rays
    weights[:4] = 0
    for seed in (None, 11):
        gen_a = None if seed is None else torch.Generator().manual_seed(seed)
        gen_b = None if seed is None else torch.Generator().manual_seed(seed)
        fine = renderer.sample_importance(t, weights, 24, near, far, gen_a)
        jitter = None if seed is None else ref.hashed_uniforms(rays, 24, gen_b, "cpu")
        expected = ref.sample_importance(t, weights, 24, near, far, jitter=jitter)
        assert_close(fine, expected, atol=1e-4)
        assert torch.all(fine[:, 1:] >= fine[:, :-1]), "importance samples must be sorted"
        assert torch.all(fine >= near[:, None] - 1e-5) and torch.all(fine <= far[:, None] + 1e-5)
        assert torch.all(fine[:4] == near[:4, None])


@pytest.mark.parametrize("n_coarse, n_fine", [(32, 24), (13, 5)])
def test_importance_and_merge_equals_importance_then_merge(arch, n_coarse, n_fine):
    """The one-pass importance and merge by bins is exactly sample_importance + merge_samples_with_deltas
    (the general merge), ties and misses included."""
    rays = 40
    g = torch.Generator().manual_seed(4)
    near = 4 + torch.rand(rays, generator=g)
    far = near + 1 + 3 * torch.rand(rays, generator=g)
    far[:3] = near[:3]  # misses: every sample at near, all tied
    t = ref.sample_stratified(near, far, n_coarse, g)
    t[3, 4:8] = t[3, 4]  # equal coarse samples: zero-width bins and ties with the fine samples
    t[4] = torch.sort(t[4]).values
    weights = torch.rand(rays, n_coarse, generator=g) ** 6
    weights[5] = 0  # uniform sampling
    weights[6, 2] = 1e4  # a spike: many fine samples in one bin
    for seed in (None, 11):
        def generator(seed=seed):
            return None if seed is None else torch.Generator().manual_seed(seed)

        fine = renderer.sample_importance(t, weights, n_fine, near, far, generator())
        separate = (fine, *renderer.merge_samples_with_deltas(t, fine, far))
        fused = renderer.sample_importance_and_merge(t, weights, n_fine, near, far, generator())
        for got, want in zip(fused, separate, strict=True):
            assert torch.equal(got, want)
        jitter = None if seed is None else ref.hashed_uniforms(rays, n_fine, generator(), "cpu")
        expected = ref.sample_importance_and_merge(t, weights, n_fine, near, far, jitter=jitter)
        assert_close(fused[1], expected[1], atol=1e-4)
        assert_close(fused[3], expected[3], atol=2e-4)
        assert torch.equal(fused[1].gather(1, fused[2].argsort(1))[:, :n_coarse], t)


def test_hashed_uniforms_are_uniform_seeded_and_fresh_per_call(arch):
    """The in-kernel PCG uniforms: bit-exact with the torch version, flat, and a new key per call."""
    g = torch.Generator().manual_seed(0)
    n_rays, n = 512, 256
    near, far = torch.zeros(n_rays), torch.full((n_rays,), float(n))
    first = renderer.sample_stratified(near, far, n, g)
    second = renderer.sample_stratified(near, far, n, g)  # the generator moved on: a new key
    replay = torch.Generator().manual_seed(0)
    u, u_next = (ref.hashed_uniforms(n_rays, n, replay, "cpu") for _ in range(2))
    assert_close(first, ref.sample_stratified(near, far, n, jitter=u), atol=0, rtol=0)
    assert_close(second, ref.sample_stratified(near, far, n, jitter=u_next), atol=0, rtol=0)
    assert not torch.equal(first, second)
    assert u.min() >= 0 and u.max() < 1
    # 131,072 uniforms: 16 equal bins each within 3 % of their share, and no correlation between
    # neighbouring samples of a ray or between the two calls.
    counts = torch.histc(u, bins=16, min=0, max=1)
    assert (counts / u.numel() * 16 - 1).abs().max() < 0.03
    centred, centred_next = u - 0.5, u_next - 0.5
    assert abs((centred[:, 1:] * centred[:, :-1]).mean().item()) < 0.002
    assert abs((centred * centred_next).mean().item()) < 0.002


def test_importance_follows_pdf_and_has_no_gradient(arch):
    near, far = torch.tensor([0.0, 0.0]), torch.tensor([8.0, 8.0])
    t = ref.sample_stratified(near, far, 8)  # bin centres 0.5 ... 7.5, PDF bins [i, i + 1]
    weights = torch.zeros(2, 8)
    weights[0, 5] = 0.9
    weights[0, 1] = 0.1
    weights.requires_grad_()
    fine = renderer.sample_importance(t, weights, 1000, near, far, torch.Generator().manual_seed(0))
    assert not fine.requires_grad
    in_bin5 = ((fine[0] >= 5) & (fine[0] <= 6)).float().mean().item()
    in_bin1 = ((fine[0] >= 1) & (fine[0] <= 2)).float().mean().item()
    assert abs(in_bin5 - 0.9) < 0.01 and abs(in_bin1 - 0.1) < 0.01
    # Zero weights: uniform on [near, far], so the sorted samples sit at the stratified quantiles.
    quantiles = (torch.arange(1000) + 0.5) / 1000 * 8
    assert (fine[1] - quantiles).abs().max() < 8 / 1000 + 1e-4


def test_importance_single_bin_and_single_sample(arch):
    near, far = torch.tensor([1.0]), torch.tensor([3.0])
    fine = renderer.sample_importance(torch.tensor([[2.0]]), torch.tensor([[1.0]]), 1, near, far)
    assert_close(fine, torch.tensor([[2.0]]))


def test_merge_matches_sort_and_order_gathers(arch):
    g = torch.Generator().manual_seed(5)
    a = torch.sort(torch.rand(51, 13, generator=g), 1).values  # odd R: the kernel pairs rays
    b = torch.rand(51, 7, generator=g)
    b[:, 0] = a[:, 3]  # exact ties: a's sample must come first
    b = torch.sort(b, 1).values
    merged, order = renderer.merge_samples(a, b)
    expected, expected_order = ref.merge_samples(a, b)
    assert torch.equal(merged, expected)
    assert torch.equal(order, expected_order)
    assert order.dtype == torch.int64
    assert torch.equal(torch.cat([a, b], 1).gather(1, order), merged)
    merged, order = renderer.merge_samples(a, b[:, :0])
    assert torch.equal(merged, a) and torch.equal(order, torch.arange(13).expand(51, 13))
    merged, order = renderer.merge_samples(a[:1], b[:1])  # a single ray
    assert torch.equal(order, expected_order[:1])


def test_merge_with_deltas_matches_merge_then_deltas(arch):
    g = torch.Generator().manual_seed(6)
    a = torch.sort(torch.rand(33, 9, generator=g), 1).values
    b = torch.sort(torch.cat([torch.rand(33, 4, generator=g), a[:, 2:3]], 1), 1).values  # with ties
    far = 1 + torch.rand(33, generator=g)
    far[0] = 0.5  # far before the last samples: the last interval is clamped to 0
    got = renderer.merge_samples_with_deltas(a, b, far)
    want = ref.merge_samples_with_deltas(a, b, far)
    for x, y in zip(got, want, strict=True):
        assert torch.equal(x, y)
    t_all, _, deltas = renderer.merge_samples_with_deltas(a, b[:, :0], far)  # one list empty
    assert torch.equal(t_all, a) and torch.equal(deltas, ref.sample_deltas(a, far))
    with pytest.raises(ValueError, match="far must have shape"):
        renderer.merge_samples_with_deltas(a, b, far[:3])


def test_deltas_match_reference(arch):
    t = torch.tensor([[1.0, 1.5, 3.0], [2.0, 2.0, 2.0]])
    far = torch.tensor([4.0, 2.0])
    deltas = renderer.sample_deltas(t, far)
    assert_close(deltas, torch.tensor([[0.5, 1.5, 1.0], [0.0, 0.0, 0.0]]))
    batch = random_batch(40, 17, seed=2)
    assert_close(renderer.sample_deltas(batch["t"], batch["far"]), batch["deltas"])


# ---------------------------------------------------------------- compositing


@pytest.mark.parametrize("background_kind", ["per_ray", "shared", "constant"])
def test_composite_matches_reference_with_grads(arch, background_kind):
    batch = random_batch(200, 48, seed=4)
    background = {
        "per_ray": batch["background"],
        "shared": torch.tensor([0.2, 0.5, 0.9]),
        "constant": 1.0,
    }[background_kind]
    upstream = upstream_for(200, 48, seed=9)
    args = (batch["sigmas"], batch["rgbs"], batch["t"], batch["deltas"], background, upstream)
    out, grads = composite_with_grads(renderer.composite, *args)
    out_ref, grads_ref = composite_with_grads(ref.composite, *args)
    assert isinstance(out, renderer.Composited)
    for got, want in zip(out, out_ref, strict=True):
        assert_close(got, want)
    for got, want in zip(grads, grads_ref, strict=True):
        assert_close(got, want, atol=2e-5)


@pytest.mark.parametrize("outputs", [(0,), (3,), (1, 2)])
def test_composite_grads_from_a_subset_of_outputs(arch, outputs):
    batch = random_batch(30, 20, seed=6)
    upstream = upstream_for(30, 20, seed=1)
    args = (batch["sigmas"], batch["rgbs"], batch["t"], batch["deltas"], batch["background"], upstream)
    _, grads = composite_with_grads(renderer.composite, *args, outputs=outputs)
    _, grads_ref = composite_with_grads(ref.composite, *args, outputs=outputs)
    for got, want in zip(grads, grads_ref, strict=True):
        assert_close(got, torch.zeros_like(got) if want is None else want, atol=2e-5)


def edge_case_batch(n: int = 6) -> tuple[torch.Tensor, ...]:
    """One row per edge case, n >= 6 samples each."""
    t = torch.linspace(5, 8, n).expand(7, n).clone()
    deltas = torch.full((7, n), 0.6)
    sigmas = torch.rand(7, n, generator=torch.Generator().manual_seed(0)) * 3
    sigmas[0] = 0.0  # empty space
    sigmas[1] = 1e9  # saturating: T underflows to exactly 0 after the first sample
    sigmas[2, 2:] = 1e30  # saturating mid-ray
    deltas[3] = 0.0  # zero-length intervals
    deltas[4] = 1e6  # very long intervals
    t[5], deltas[5] = 2.0, 0.0  # a miss: near == far, every sample at near
    sigmas[6] = torch.tensor([0.0, 1e-8, 1e-4, 1e4, 0.0, 5.0] + [0.5] * (n - 6))  # mixed scales
    rgbs = torch.rand(7, n, 3, generator=torch.Generator().manual_seed(1))
    background = torch.rand(7, 3, generator=torch.Generator().manual_seed(2))
    return sigmas, rgbs, t, deltas, background


def test_composite_edge_cases_finite_and_exact(arch):
    sigmas, rgbs, t, deltas, background = edge_case_batch()
    upstream = upstream_for(7, 6, seed=3)
    out, grads = composite_with_grads(renderer.composite, sigmas, rgbs, t, deltas, background, upstream)
    out_ref, grads_ref = composite_with_grads(ref.composite, sigmas, rgbs, t, deltas, background, upstream)
    for value in (*out, *grads):
        assert torch.isfinite(value).all()
    for got, want in zip((*out, *grads), (*out_ref, *grads_ref), strict=True):
        assert_close(got, want, atol=2e-5)
    # Empty space, zero-length intervals and misses render pure background.
    for row in (0, 3, 5):
        assert torch.all(out.weights[row] == 0)
        assert_close(out.color[row], background[row])
    assert out.weights[1, 0] == 1.0 and torch.all(out.weights[1, 1:] == 0)
    assert out.opacity[1] == 1.0 and out.depth[1] == t[1, 0]
    assert torch.all(out.weights[2, 3:] == 0)


def test_composite_single_sample_and_empty_batch(arch):
    sigmas, rgbs = torch.tensor([[2.0]]), torch.tensor([[[0.1, 0.2, 0.3]]])
    t, deltas = torch.tensor([[6.0]]), torch.tensor([[0.5]])
    upstream = upstream_for(1, 1, seed=0)
    out, grads = composite_with_grads(renderer.composite, sigmas, rgbs, t, deltas, 0.5, upstream)
    out_ref, grads_ref = composite_with_grads(ref.composite, sigmas, rgbs, t, deltas, 0.5, upstream)
    assert_close(out.opacity, torch.tensor([1 - math.exp(-1.0)]))
    for got, want in zip((*out, *grads), (*out_ref, *grads_ref), strict=True):
        assert_close(got, want)

    sigmas = torch.zeros(0, 8, requires_grad=True)
    rgbs = torch.zeros(0, 8, 3, requires_grad=True)
    background = torch.zeros(3, requires_grad=True)
    out = renderer.composite(sigmas, rgbs, torch.zeros(0, 8), torch.zeros(0, 8), background)
    assert [tuple(x.shape) for x in out] == [(0, 3), (0,), (0,), (0, 8)]
    (out.color.sum() + out.weights.sum()).backward()
    assert sigmas.grad.shape == (0, 8) and rgbs.grad.shape == (0, 8, 3)
    assert torch.equal(background.grad, torch.zeros(3))


def test_composite_no_gradient_to_sample_positions(arch):
    batch = random_batch(10, 8, seed=0)
    t = batch["t"].clone().requires_grad_()
    deltas = batch["deltas"].clone().requires_grad_()
    sigmas = batch["sigmas"].clone().requires_grad_()
    out = renderer.composite(sigmas, batch["rgbs"], t, deltas, 0.0)
    grads = torch.autograd.grad(out.depth.sum(), [sigmas, t, deltas], allow_unused=True)
    assert grads[0] is not None and grads[1] is None and grads[2] is None


def test_composite_rejects_bad_shapes(arch):
    with pytest.raises(ValueError, match="rgbs"):
        renderer.composite(torch.zeros(4, 3), torch.zeros(4, 3), torch.zeros(4, 3), torch.zeros(4, 3))
    with pytest.raises(ValueError, match="background"):
        renderer.composite(
            torch.zeros(4, 3), torch.zeros(4, 3, 3), torch.zeros(4, 3), torch.zeros(4, 3), torch.zeros(2)
        )


def test_composite_gradient_matches_finite_differences(arch):
    """Central differences of the Taichi float32 forward against the hand-written backward."""
    batch = random_batch(6, 10, seed=8)
    sigmas, rgbs = batch["sigmas"] * 0.1, batch["rgbs"]
    background = batch["background"]
    upstream = upstream_for(6, 10, seed=2)

    def loss(s, c, bg):
        out = renderer.composite(s, c, batch["t"], batch["deltas"], bg)
        return sum((out[k] * upstream[k]).sum() for k in range(4)).double()

    _, (g_sigma, g_rgb, g_bg) = composite_with_grads(
        renderer.composite, sigmas, rgbs, batch["t"], batch["deltas"], background, upstream
    )
    step = 1e-2
    for ray, s in [(0, 0), (1, 4), (3, 9), (5, 2)]:
        plus, minus = sigmas.clone(), sigmas.clone()
        plus[ray, s] += step
        minus[ray, s] -= step
        numeric = (loss(plus, rgbs, background) - loss(minus, rgbs, background)) / (2 * step)
        assert abs(numeric.item() - g_sigma[ray, s].item()) < 2e-3 * (1 + abs(numeric.item()))
        plus, minus = rgbs.clone(), rgbs.clone()
        plus[ray, s, 1] += step
        minus[ray, s, 1] -= step
        numeric = (loss(sigmas, plus, background) - loss(sigmas, minus, background)) / (2 * step)
        assert abs(numeric.item() - g_rgb[ray, s, 1].item()) < 2e-3 * (1 + abs(numeric.item()))
    plus, minus = background.clone(), background.clone()
    plus[2, 0] += step
    minus[2, 0] -= step
    numeric = (loss(sigmas, rgbs, plus) - loss(sigmas, rgbs, minus)) / (2 * step)
    assert abs(numeric.item() - g_bg[2, 0].item()) < 2e-3 * (1 + abs(numeric.item()))


def test_full_pipeline_matches_reference(arch):
    """Rays -> stratified -> importance -> merge -> deltas -> composite, seeded, on both implementations."""
    assert backend.started_arch() == arch, "the kernels must run on the backend under test"
    K, w2c = random_cameras(1, seed=3)
    pixels = torch.stack(torch.meshgrid(torch.arange(16.0), torch.arange(16.0), indexing="xy"), -1)
    pixels = pixels.reshape(-1, 2) * 4
    results = []
    for impl in (renderer, ref):
        g = torch.Generator().manual_seed(21)
        # The kernels hash their jitter in-kernel; the reference is handed the same numbers.
        hashed = {} if impl is renderer else {"jitter": ref.hashed_uniforms(256, 16, g, "cpu")}
        rays = impl.generate_rays(pixels, K[0], w2c[0])
        t = impl.sample_stratified(rays.near, rays.far, 16, g, **hashed)
        coarse = impl.composite(
            torch.full_like(t, 0.7), torch.ones(*t.shape, 3), t, impl.sample_deltas(t, rays.far), 0.0
        )
        hashed = {} if impl is renderer else {"jitter": ref.hashed_uniforms(256, 8, g, "cpu")}
        fine = impl.sample_importance(t, coarse.weights, 8, rays.near, rays.far, g, **hashed)
        t_all, order = impl.merge_samples(t, fine)
        sigmas = 2.0 - (rays.origins[:, None] + t_all[..., None] * rays.directions[:, None]).norm(dim=-1)
        out = impl.composite(
            sigmas.clamp_min(0) * 3,
            torch.rand(*t_all.shape, 3, generator=g),
            t_all,
            impl.sample_deltas(t_all, rays.far),
            1.0,
        )
        results.append((t_all, order, *out))
    assert torch.equal(results[0][1], results[1][1]), "merge order differs"
    for got, want in zip(results[0][2:], results[1][2:], strict=True):
        assert_close(got, want, atol=2e-4)
    assert_close(results[0][0], results[1][0], atol=2e-4)


def test_reference_composite_gradcheck_float64():
    """The reference's own gradients are right (the Taichi backward is checked against them)."""
    sigmas, rgbs, t, deltas, background = (x.double() for x in edge_case_batch())
    sigmas = sigmas.clamp_max(50)  # gradcheck perturbs inputs; keep the saturated rows differentiable
    inputs = (sigmas.requires_grad_(), rgbs.requires_grad_(), background.requires_grad_())

    def fn(s, c, bg):
        return tuple(ref.composite(s, c, t, deltas, bg))

    assert torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=1e-6)


def test_composite_without_samples_shows_background(arch):
    background = torch.tensor([[0.1, 0.2, 0.3], [0.4, 0.5, 0.6]], requires_grad=True)
    empty = torch.zeros(2, 0)
    out = renderer.composite(empty, torch.zeros(2, 0, 3), empty, empty, background)
    assert_close(out.color, background.detach())
    assert torch.equal(out.opacity, torch.zeros(2)) and out.weights.shape == (2, 0)
    out.color.sum().backward()
    assert torch.equal(background.grad, torch.ones(2, 3))


def test_docstring_examples(arch):
    """The examples in the renderer's docstrings run and print what they say."""
    import doctest
    import importlib

    for name in ("renderer.rays", "renderer.sampling", "renderer.composite", "renderer.reference",
                 "renderer.specs", "renderer.device_packed"):
        result = doctest.testmod(importlib.import_module(name), optionflags=doctest.ELLIPSIS)
        assert result.attempted > 0 and result.failed == 0, name


def test_composite_float64_leaves_get_float64_gradients(arch):
    batch = random_batch(5, 6, seed=1)
    sigmas = batch["sigmas"].double().requires_grad_()
    rgbs = batch["rgbs"].double().requires_grad_()
    out = renderer.composite(sigmas, rgbs, batch["t"], batch["deltas"], 0.5)
    assert out.color.dtype == torch.float32  # the renderer computes in float32
    out.color.sum().backward()
    sigmas32 = batch["sigmas"].requires_grad_()
    expected = ref.composite(sigmas32, batch["rgbs"], batch["t"], batch["deltas"], 0.5)
    (grad,) = torch.autograd.grad(expected.color.sum(), [sigmas32])
    assert sigmas.grad.dtype == torch.float64 and rgbs.grad.dtype == torch.float64
    assert_close(sigmas.grad.float(), grad)


@pytest.fixture
def lane_launches(monkeypatch, keep_taichi_arch):
    """Starts x64 (the only arch with the 8-sample lane kernels) and counts the lane kernels' launches."""
    if backend.started_arch() != "cpu":
        backend.init_backend("cpu", "cpu", verbose=False)
    composite_module = importlib.import_module("renderer.composite")  # renderer.composite is the function
    sampling_module = importlib.import_module("renderer.sampling")

    counts = {}
    for module, name in [
        (composite_module, "composite_forward_lanes"),
        (composite_module, "composite_backward_lanes"),
        (sampling_module, "stratified_lanes"),
        (sampling_module, "deltas_lanes"),
    ]:
        kernel = getattr(module, name)

        def counted(*args, _kernel=kernel, _name=name):
            counts[_name] = counts.get(_name, 0) + 1
            return _kernel(*args)

        monkeypatch.setattr(module, name, counted)
    return counts


def run_both_paths(monkeypatch, fn):
    """``fn()`` with the lane kernels and again with the scalar kernels (lanes switched off)."""
    from renderer import lanes

    with_lanes = fn()
    monkeypatch.setattr(lanes, "ENABLED", False)
    scalar = fn()
    monkeypatch.setattr(lanes, "ENABLED", True)
    return with_lanes, scalar


def misaligned_copy(x: torch.Tensor) -> torch.Tensor:
    """The same values in a contiguous view that starts one float into its storage (not 32-byte aligned)."""
    storage = torch.empty(x.numel() + 1, dtype=x.dtype)
    view = storage[1:].view(x.shape)
    view.copy_(x)
    return view


@pytest.mark.parametrize("misaligned", [False, True])
def test_composite_lanes_match_scalar_kernels_and_reference(lane_launches, monkeypatch, misaligned):
    """Random rays plus every edge case, 8 and 24 samples per ray: lanes == scalar == reference."""
    batch = random_batch(37, 24, seed=12)
    edge = edge_case_batch(8)
    cases = [
        (batch["sigmas"], batch["rgbs"], batch["t"], batch["deltas"], batch["background"]),
        edge,
    ]
    for sigmas, rgbs, t, deltas, background in cases:
        if misaligned:
            sigmas, rgbs, t, deltas = (misaligned_copy(x) for x in (sigmas, rgbs, t, deltas))
        upstream = upstream_for(*sigmas.shape, seed=5)
        args = (sigmas, rgbs, t, deltas, background, upstream)

        def run(args=args):
            out, grads = composite_with_grads(renderer.composite, *args)
            return (*out, *grads)

        before = dict(lane_launches)
        with_lanes, scalar = run_both_paths(monkeypatch, run)
        assert lane_launches["composite_forward_lanes"] == before.get("composite_forward_lanes", 0) + 1
        assert lane_launches["composite_backward_lanes"] == before.get("composite_backward_lanes", 0) + 1
        out_ref, grads_ref = composite_with_grads(ref.composite, *args)
        for got, want, expected in zip(with_lanes, scalar, (*out_ref, *grads_ref), strict=True):
            assert torch.isfinite(got).all()
            assert_close(got, want, atol=2e-6)
            assert_close(got, expected, atol=2e-5)


def test_composite_lanes_weights_gradient_and_saturation(lane_launches, monkeypatch):
    """Gradient through the weights alone, and rays that saturate inside, across and after a lane."""
    sigmas, rgbs, t, deltas, background = edge_case_batch(16)
    sigmas[0, 7:] = 1e6  # opaque from the last lane of the first chunk on
    upstream = [torch.zeros(7, 3), torch.zeros(7), torch.zeros(7), torch.randn(7, 16)]

    def run():
        out, grads = composite_with_grads(renderer.composite, sigmas, rgbs, t, deltas, background, upstream)
        return (*out, *grads)

    with_lanes, scalar = run_both_paths(monkeypatch, run)
    assert lane_launches["composite_backward_lanes"] == 1
    for got, want in zip(with_lanes, scalar, strict=True):
        assert_close(got, want, atol=2e-6)
    assert torch.all(with_lanes[3][0, 8:] == 0)


def test_stratified_lanes_match_scalar_kernel_bit_for_bit(lane_launches, monkeypatch):
    near = torch.tensor([0.0, 5.0, 2.0, 3.0, 4.5])
    far = torch.tensor([4.0, 9.0, 2.0, 3.5, 8.25])

    def run():
        seeded = [None, lambda: torch.Generator().manual_seed(3)]
        return tuple(
            renderer.sample_stratified(near, far, n, make() if make else None)
            for n in (8, 64)
            for make in seeded
        )

    with_lanes, scalar = run_both_paths(monkeypatch, run)
    assert lane_launches["stratified_lanes"] == 4
    for got, want in zip(with_lanes, scalar, strict=True):
        assert torch.equal(got, want)


def test_deltas_lanes_match_scalar_kernel_bit_for_bit(lane_launches, monkeypatch):
    """sample_deltas and the merges' interval lengths, 8 at a time on x64 and one at a time elsewhere."""
    batch = random_batch(37, 24, seed=7)
    t, far = batch["t"].clone(), batch["far"].clone()
    t[0, 5:9] = t[0, 5]  # zero-length intervals across a lane boundary
    t[1, -1] = far[1] + 1  # a sample past far: the last interval is clamped to 0
    fine = torch.sort(5 + 4 * torch.rand(37, 16, generator=torch.Generator().manual_seed(8)), 1).values

    def run():
        return (renderer.sample_deltas(t, far), renderer.merge_samples_with_deltas(t, fine, far)[2])

    with_lanes, scalar = run_both_paths(monkeypatch, run)
    assert lane_launches["deltas_lanes"] == 2
    for got, want in zip(with_lanes, scalar, strict=True):
        assert torch.equal(got, want)
    assert torch.equal(with_lanes[0], ref.sample_deltas(t, far))


def test_sampling_kernels_take_taichi_ndarrays(arch):
    """The sampling kernels run with every array argument a ``ti.ndarray`` (kept in device memory between
    launches), and give the torch-tensor path's numbers: stratified -> inverse CDF -> merge by bins ->
    interval lengths (the split kernels, each one job), the one-pass
    ``importance_merge_kernel`` that ``sample_importance_and_merge`` launches, and the general merge."""
    import taichi as ti
    from conftest import arch_device

    from renderer import sampling
    from renderer.specs import draw_key, mix_key

    device = arch_device(arch)  # the reference runs there (CUDA tensors for cuda)

    def nd(x: torch.Tensor):
        dtype = {torch.float32: ti.f32, torch.int32: ti.i32, torch.int64: ti.i64}[x.dtype]
        array = ti.ndarray(dtype, tuple(x.shape))
        array.from_numpy(x.cpu().numpy())
        return array

    n_rays, n_coarse, n_fine = 21, 16, 8
    width = n_coarse + n_fine
    g = torch.Generator().manual_seed(9)
    near = 4 + torch.rand(n_rays, generator=g, device="cpu")
    far = near + 1 + 3 * torch.rand(n_rays, generator=g, device="cpu")
    far[0] = near[0]  # a miss
    weights = torch.rand(n_rays, n_coarse, generator=g, device="cpu") ** 4
    expected_t = renderer.sample_stratified(near.to(device), far.to(device), n_coarse,
                                            torch.Generator().manual_seed(1)).cpu()  # fmt: skip
    expected = [x.cpu() for x in renderer.sample_importance_and_merge(
        expected_t.to(device), weights.to(device), n_fine, near.to(device), far.to(device),
        torch.Generator().manual_seed(2))]  # fmt: skip
    near_nd, far_nd, weights_nd = nd(near), nd(far), nd(weights)
    t_nd = ti.ndarray(ti.f32, (n_rays * n_coarse,))
    mixed = mix_key(draw_key(torch.Generator().manual_seed(1)))  # what sample_stratified draws
    sampling.stratified_kernel(near_nd, far_nd, mixed, 1, t_nd, n_coarse)
    t = torch.from_numpy(t_nd.to_numpy()).view(n_rays, n_coarse)
    assert torch.equal(t, expected_t)

    t_2d = nd(t)
    t_fine, bins = ti.ndarray(ti.f32, (n_rays, n_fine)), ti.ndarray(ti.i32, (n_rays, n_fine))
    mixed = mix_key(draw_key(torch.Generator().manual_seed(2)))
    sampling.inverse_cdf_kernel(t_2d, weights_nd, near_nd, far_nd, mixed, 1, t_fine, bins)
    t_all, order = ti.ndarray(ti.f32, (n_rays * width,)), ti.ndarray(ti.i64, (n_rays * width,))
    deltas = ti.ndarray(ti.f32, (n_rays * width,))
    sampling.merge_binned_kernel(t_2d, t_fine, bins, far_nd, t_all, order, deltas)
    got = [torch.from_numpy(x.to_numpy()).view(n_rays, -1) for x in (t_fine, t_all, order, deltas)]
    for g_, e in zip(got, expected, strict=True):
        assert torch.equal(g_, e)
    one_pass = [ti.ndarray(ti.f32, (n_rays, n_fine))] + [
        ti.ndarray(dtype, (n_rays * width,)) for dtype in (ti.f32, ti.i64, ti.f32)
    ]
    sampling.importance_merge_kernel(t_2d, weights_nd, near_nd, far_nd, mixed, 1, *one_pass)
    for array, e in zip(one_pass, expected, strict=True):
        assert torch.equal(torch.from_numpy(array.to_numpy()).view(n_rays, -1), e)
    separate = ti.ndarray(ti.f32, (n_rays * width,))
    sampling.deltas_kernel(t_all, far_nd, separate, width)
    assert torch.equal(torch.from_numpy(separate.to_numpy()).view(n_rays, width), expected[3])

    merged, merged_order = ti.ndarray(ti.f32, (n_rays, width)), ti.ndarray(ti.i64, (n_rays, width))
    sampling.merge_kernel(t_2d, t_fine, merged, merged_order, (n_rays + 1) // 2)
    assert torch.equal(torch.from_numpy(merged.to_numpy()), expected[1])
    assert torch.equal(torch.from_numpy(merged_order.to_numpy()), expected[2])


def test_composite_kernels_take_taichi_ndarrays(arch):
    """The scalar compositing kernels run with every array argument a ``ti.ndarray`` and give, bit for
    bit, the numbers of ``composite`` (which launches the same kernels here on every arch: 7 samples per
    ray are no whole number of lanes)."""
    import taichi as ti

    from renderer.specs import GRAD_PER_RAY, PER_RAY

    composite_module = importlib.import_module("renderer.composite")  # renderer.composite is the function

    def nd(x: torch.Tensor):
        array = ti.ndarray(ti.f32, tuple(x.shape))
        array.from_numpy(x.contiguous().cpu().numpy())
        return array

    def back(array, shape):
        return torch.from_numpy(array.to_numpy()).view(shape)

    b = random_batch(13, 7, seed=3)
    n_rays, n_samples = b["sigmas"].shape
    flat = [nd(b[k].reshape(-1)) for k in ("sigmas", "rgbs", "t", "deltas")]
    background = nd(b["background"])
    weights, per_ray = ti.ndarray(ti.f32, (n_rays * n_samples,)), ti.ndarray(ti.f32, (n_rays, PER_RAY))
    composite_module.composite_forward_kernel(*flat, background, weights, per_ray, n_samples)
    upstream = upstream_for(n_rays, n_samples, seed=4)
    grad_per_ray = nd(torch.cat([upstream[0], upstream[1][:, None], upstream[2][:, None]], 1))
    assert grad_per_ray.shape == (n_rays, GRAD_PER_RAY)
    grad_sigmas = ti.ndarray(ti.f32, (n_rays * n_samples,))
    grad_rgbs = ti.ndarray(ti.f32, (n_rays * n_samples * 3,))
    grad_background = ti.ndarray(ti.f32, (n_rays, 3))
    composite_module.composite_backward_kernel(
        flat[1], flat[2], flat[3], background, weights, per_ray, grad_per_ray, nd(upstream[3].reshape(-1)),
        1, grad_sigmas, grad_rgbs, grad_background, n_samples,
    )  # fmt: skip
    out, grads = composite_with_grads(
        renderer.composite, b["sigmas"], b["rgbs"], b["t"], b["deltas"], b["background"], upstream
    )
    per_ray_t = back(per_ray, (n_rays, PER_RAY))
    got = [per_ray_t[:, :3], per_ray_t[:, 3], per_ray_t[:, 4], back(weights, (n_rays, n_samples)),
           back(grad_sigmas, (n_rays, n_samples)), back(grad_rgbs, (n_rays, n_samples, 3)),
           back(grad_background, (n_rays, 3))]  # fmt: skip
    for g_, e in zip(got, (*out, *grads), strict=True):
        assert torch.equal(g_, e.cpu())


def test_outputs_stay_on_the_arch_device(arch):
    """Inputs on the arch's torch device (CUDA for cuda, read in place) give outputs and gradients there."""
    from conftest import arch_device

    device = arch_device(arch)
    batch = random_batch(8, 16, seed=31)
    assert batch["sigmas"].device.type == device.type
    out, grads = composite_with_grads(renderer.composite, batch["sigmas"], batch["rgbs"], batch["t"],
                                      batch["deltas"], batch["background"], upstream_for(8, 16, 32))
    for tensor in (*out, *grads):
        assert tensor.device.type == device.type
    K, w2c = random_cameras(1, 3)
    rays = renderer.generate_rays(torch.zeros(4, 2), K[0], w2c[0], radius=RADIUS)
    assert rays.origins.device.type == device.type
    t = renderer.sample_stratified(rays.near, rays.far, 8, torch.Generator().manual_seed(0))
    assert t.device.type == device.type
