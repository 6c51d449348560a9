"""Plain-torch reference of every renderer function (cumprod-based compositing), the test oracle.

The shared types and constants (``Rays``, ``Composited``, ``IMPORTANCE_EPS``, the PCG hash) live in
``renderer.specs``, which the kernels import too; this module only holds the maths in torch.

The Taichi kernels in this package are checked against these functions on every backend, and the
benchmark times them as the baseline. They follow the same contract (docs/ARCHITECTURE.md) and the
same sampling conventions, so both give the same samples at bin centres (no generator), and the same
jittered samples when the reference is handed the kernels' uniforms (``jitter=hashed_uniforms(...)``):

- uniforms: the reference draws them with ``torch.rand`` from the caller's generator. The Taichi kernels
  hash them inside the kernel instead (``torch.rand`` on the CPU is a sequential Mersenne Twister, which
  costs more than the whole stratified kernel; README, Benchmarks): one call draws one 31-bit key from
  the generator (``draw_key``), and sample ``n = ray * S + s`` gets ``hash_uniform(n, key)``, the top 24
  bits of a PCG hash of ``n + pcg(key)`` (Jarzynski & Olano, "Hash Functions for GPU Rendering", JCGT
  2020). Same distribution, different numbers; ``hashed_uniforms`` computes the kernels' numbers in torch
  and the ``jitter`` arguments below take them, so tests compare the two exactly.
- stratified: ``t_i = near + (far - near) * (i + u_i) / S`` with ``u_i ~ U[0, 1)``;
  ``generator=None`` puts every sample at its bin centre.
- importance: a piecewise-constant PDF over S bins whose edges are ``near``, the midpoints between
  consecutive coarse ``t`` and ``far``. Bin ``i`` carries mass ``w_i + eps * width_i / (far - near)``,
  so a ray whose weights are all zero samples uniformly in ``[near, far]``. The uniform numbers are
  stratified, ``u_j = (j + v_j) / F`` with ``v_j ~ U[0, 1)`` (or 0.5 with ``generator=None``), so
  they are sorted and the samples come out sorted.
- merge: a stable merge, so on ties the coarse sample comes first.
"""

from __future__ import annotations

import torch

from renderer.specs import (
    IMPORTANCE_EPS,
    U32,
    Composited,
    PackedComposited,
    PackedSamples,
    Rays,
    broadcast_cameras,
    draw_key,
    expand_background,
    mix_key,
    occupancy_cells,
    offsets_from_counts,
    pcg_hash,
)


def generate_rays(
    pixels: torch.Tensor, K: torch.Tensor, world_to_camera: torch.Tensor, radius: float = 2.0
) -> Rays:
    """Camera rays through pixel centres, clipped to the sphere of ``radius`` around the origin.

    pixels (R, 2) integer (u, v) indices, K (R, 3, 3) or (3, 3), world_to_camera (R, 3, 4) or (3, 4)
    -> Rays(origins (R, 3), directions (R, 3), near (R,), far (R,)).

    The origin is the camera centre ``-R^T t``; near/far solve ``|o + t d| = radius`` exactly, with
    near clamped at 0 when the camera is inside the sphere. A ray that misses gets near == far == 0.

    >>> K = torch.tensor([[128.0, 0, 31.5], [0, 128, 31.5], [0, 0, 1]])
    >>> w2c = torch.tensor([[1.0, 0, 0, 0], [0, 1, 0, 0], [0, 0, 1, 7]])
    >>> generate_rays(torch.tensor([[31.0, 31.0]]), K, w2c).near
    tensor([5.])
    """
    n_rays = pixels.shape[0]
    K, world_to_camera = broadcast_cameras(K, world_to_camera, n_rays)
    rotation, translation = world_to_camera[..., :3], world_to_camera[..., 3]
    fx, fy, cx, cy = K[:, 0, 0], K[:, 1, 1], K[:, 0, 2], K[:, 1, 2]
    skew = K[:, 0, 1]
    y_cam = (pixels[:, 1] + 0.5 - cy) / fy
    x_cam = (pixels[:, 0] + 0.5 - cx - skew * y_cam) / fx
    dirs_cam = torch.stack([x_cam, y_cam, torch.ones_like(x_cam)], dim=-1)
    directions = torch.einsum("rji,rj->ri", rotation, dirs_cam)  # R^T d
    directions = directions / directions.norm(dim=-1, keepdim=True)
    origins = -torch.einsum("rji,rj->ri", rotation, translation)  # -R^T t
    half_b = (origins * directions).sum(-1)
    c = (origins * origins).sum(-1) - radius * radius
    disc = half_b * half_b - c
    root = disc.clamp_min(0).sqrt()
    near = (-half_b - root).clamp_min(0)
    far = (-half_b + root).clamp_min(0)
    hit = (disc > 0) & (far > near)
    zero = torch.zeros_like(near)
    return Rays(origins, directions, torch.where(hit, near, zero), torch.where(hit, far, zero))


def hash_uniform(index: torch.Tensor, key: int) -> torch.Tensor:
    """Uniforms in [0, 1) with 24 random bits: int64 sample indices (< 2^32) -> float32, same shape.

    >>> hash_uniform(torch.arange(3), key=7)
    tensor([0.5025, 0.6542, 0.8584])
    """
    return (pcg_hash((index + mix_key(key)) & U32) >> 8).to(torch.float32) * 2.0**-24


def hashed_uniforms(
    n_rays: int, n_samples: int, generator: torch.Generator | None, device: torch.device | str
) -> torch.Tensor:
    """(R, S) uniforms for one call: hashed from a key the generator draws, or 0.5 without a generator."""
    if generator is None:
        return torch.full((n_rays, n_samples), 0.5, device=device)
    index = torch.arange(n_rays * n_samples, dtype=torch.int64, device=device)
    return hash_uniform(index, draw_key(generator)).view(n_rays, n_samples)


def sample_stratified(
    near: torch.Tensor,
    far: torch.Tensor,
    n_samples: int,
    generator: torch.Generator | None = None,
    jitter: torch.Tensor | None = None,
) -> torch.Tensor:
    """One jittered sample per equal bin of [near, far]: near, far (R,) -> t (R, S) sorted.

    ``generator=None`` gives bin centres (deterministic, for evaluation); ``jitter`` (R, S) in [0, 1)
    gives the uniforms explicitly (for instance ``hashed_uniforms``, to reproduce the Taichi kernel).

    >>> sample_stratified(torch.tensor([0.0]), torch.tensor([4.0]), 4)
    tensor([[0.5000, 1.5000, 2.5000, 3.5000]])
    """
    n_rays = near.shape[0]
    if jitter is not None:
        u = jitter.to(near.dtype)
    elif generator is None:
        u = torch.full((n_rays, n_samples), 0.5, dtype=near.dtype, device=near.device)
    else:
        # Drawn on the generator's own device (a CPU generator may drive CUDA rays), then moved.
        u = torch.rand((n_rays, n_samples), generator=generator, dtype=near.dtype,
                       device=generator.device).to(near.device)
    bins = torch.arange(n_samples, dtype=near.dtype, device=near.device)
    return near[:, None] + (far - near)[:, None] * (bins + u) / n_samples


def importance_uniforms(
    n_rays: int,
    n_samples: int,
    generator: torch.Generator | None,
    device: torch.device | str = "cpu",
    jitter: torch.Tensor | None = None,
) -> torch.Tensor:
    """Sorted stratified uniforms in [0, 1) for inverse-CDF sampling: -> u (R, F), ``(j + v_j) / F``."""
    if jitter is None and generator is None:
        jitter = torch.full((n_rays, n_samples), 0.5, device=device)
    elif jitter is None:
        jitter = torch.rand((n_rays, n_samples), generator=generator, device=generator.device).to(device)
    return (torch.arange(n_samples, dtype=torch.float32, device=device) + jitter) / n_samples


def sample_importance(
    t: torch.Tensor,
    weights: torch.Tensor,
    n_samples: int,
    near: torch.Tensor,
    far: torch.Tensor,
    generator: torch.Generator | None = None,
    jitter: torch.Tensor | None = None,
) -> torch.Tensor:
    """Inverse-CDF samples of the piecewise-constant PDF given by coarse weights (no gradient).

    t, weights (R, S) coarse samples and their compositing weights; near, far (R,) -> t_fine (R, F) sorted.
    Bin edges are [near, midpoints of t, far]; see the module docstring for the epsilon and the uniforms
    (``jitter`` (R, F) gives the v_j explicitly, as in ``sample_stratified``).

    >>> t = torch.tensor([[0.5, 1.5, 2.5, 3.5]]); w = torch.tensor([[0.0, 0.0, 1.0, 0.0]])
    >>> sample_importance(t, w, 2, torch.tensor([0.0]), torch.tensor([4.0]))
    tensor([[2.2500, 2.7500]])
    """
    t, weights = t.detach(), weights.detach()
    near, far = near.detach(), far.detach()
    n_rays = t.shape[0]
    edges = torch.cat([near[:, None], 0.5 * (t[:, 1:] + t[:, :-1]), far[:, None]], dim=1)
    widths = (edges[:, 1:] - edges[:, :-1]).clamp_min(0)
    span = (far - near).clamp_min(torch.finfo(t.dtype).tiny)
    mass = weights.clamp_min(0) + IMPORTANCE_EPS * widths / span[:, None]
    cdf = torch.cat([torch.zeros_like(near)[:, None], torch.cumsum(mass, dim=1)], dim=1)
    total = cdf[:, -1:]
    u = importance_uniforms(n_rays, n_samples, generator, t.device, jitter).to(t.dtype) * total
    # Bin index: the last edge whose cdf is <= u, within [0, S - 1].
    index = (torch.searchsorted(cdf.contiguous(), u.contiguous(), right=True) - 1).clamp(0, t.shape[1] - 1)
    cdf_lo = cdf.gather(1, index)
    bin_mass = mass.gather(1, index)
    frac = torch.where(bin_mass > 0, (u - cdf_lo) / bin_mass.clamp_min(torch.finfo(t.dtype).tiny), 0.0)
    frac = frac.clamp(0, 1)
    samples = edges.gather(1, index) + frac * widths.gather(1, index)
    # A miss (near == far) has no mass at all: every sample sits at near.
    return torch.where(total > 0, samples, near[:, None].expand_as(samples))


def sample_importance_and_merge(
    t: torch.Tensor,
    weights: torch.Tensor,
    n_samples: int,
    near: torch.Tensor,
    far: torch.Tensor,
    generator: torch.Generator | None = None,
    jitter: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``sample_importance`` then ``merge_samples_with_deltas(t, t_fine, far)``:
    -> t_fine (R, F), t_all (R, S+F), order (R, S+F) int64, deltas (R, S+F)."""
    t_fine = sample_importance(t, weights, n_samples, near, far, generator, jitter)
    return (t_fine, *merge_samples_with_deltas(t, t_fine, far))


def merge_samples(t_a: torch.Tensor, t_b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Merge two per-ray sorted sample lists: (R, S), (R, F) -> t_all (R, S+F), order (R, S+F) int64.

    ``order`` indexes ``torch.cat([t_a, t_b], 1)``, so per-sample network outputs can be gathered
    without re-evaluating them. Ties keep the sample of ``t_a`` first (stable).

    >>> merge_samples(torch.tensor([[0.0, 2.0]]), torch.tensor([[1.0]]))
    (tensor([[0., 1., 2.]]), tensor([[0, 2, 1]]))
    """
    t_all, order = torch.sort(torch.cat([t_a, t_b], dim=1).detach(), dim=1, stable=True)
    return t_all, order


def merge_samples_with_deltas(
    t_a: torch.Tensor, t_b: torch.Tensor, far: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``merge_samples`` then ``sample_deltas`` of the merged list: -> t_all, order, deltas (R, S+F).

    >>> merge_samples_with_deltas(torch.tensor([[0.0, 2.0]]), torch.tensor([[1.0]]), torch.tensor([4.0]))
    (tensor([[0., 1., 2.]]), tensor([[0, 2, 1]]), tensor([[1., 1., 2.]]))
    """
    t_all, order = merge_samples(t_a, t_b)
    return t_all, order, sample_deltas(t_all, far)


def sample_deltas(t_all: torch.Tensor, far: torch.Tensor) -> torch.Tensor:
    """Interval lengths: t (R, S), far (R,) -> deltas (R, S), ``t[i+1] - t[i]`` and last ``far - t[-1]``.

    >>> sample_deltas(torch.tensor([[1.0, 1.5, 3.0]]), torch.tensor([4.0]))
    tensor([[0.5000, 1.5000, 1.0000]])
    """
    t_all = t_all.detach()
    nxt = torch.cat([t_all[:, 1:], far.detach()[:, None]], dim=1)
    return (nxt - t_all).clamp_min(0)


def composite(
    sigmas: torch.Tensor,
    rgbs: torch.Tensor,
    t: torch.Tensor,
    deltas: torch.Tensor,
    background: torch.Tensor | float = 0.0,
) -> Composited:
    """Volume rendering by alpha compositing (cumprod form).

    sigmas (R, S) >= 0, rgbs (R, S, 3), t (R, S), deltas (R, S), background (R, 3) | (3,) | float
    -> Composited(color (R, 3), opacity (R,), depth (R,), weights (R, S)).

    ``alpha_i = 1 - exp(-sigma_i delta_i)``, ``T_i = prod_{j<i} (1 - alpha_j)``, ``w_i = T_i alpha_i``,
    ``color = sum w_i c_i + (1 - sum w_i) background``, ``depth = sum w_i t_i``.

    >>> out = composite(torch.tensor([[1e9]]), torch.ones(1, 1, 3), torch.tensor([[2.0]]), torch.ones(1, 1))
    >>> out.opacity, out.depth
    (tensor([1.]), tensor([2.]))
    """
    n_rays = sigmas.shape[0]
    alpha = 1.0 - torch.exp(-sigmas * deltas)
    transmittance = torch.cumprod(
        torch.cat([torch.ones_like(alpha[:, :1]), 1.0 - alpha[:, :-1]], dim=1), dim=1
    )
    weights = transmittance * alpha
    opacity = weights.sum(1)
    bg = expand_background(background, n_rays, sigmas)
    color = (weights[..., None] * rgbs).sum(1) + (1.0 - opacity)[:, None] * bg
    depth = (weights * t.detach()).sum(1)
    return Composited(color, opacity, depth, weights)


def composite_packed(
    sigmas: torch.Tensor,
    rgbs: torch.Tensor,
    t: torch.Tensor,
    deltas: torch.Tensor,
    offsets: torch.Tensor,
    counts: torch.Tensor,
    background: torch.Tensor | float = 0.0,
    eps: float = 1e-4,
) -> PackedComposited:
    """Compositing of a packed sample list with early stop (segmented-cumsum form, as nerfacc).

    sigmas (N,), rgbs (N, 3), t (N,), deltas (N,), offsets, counts (R,) -> PackedComposited(color (R, 3),
    opacity (R,), depth (R,), weights (N,), kept (R,) int32); the contract of
    ``renderer.packed.composite_packed``. ``T_i = exp(-sum_{j<i} sigma_j delta_j)`` within each ray,
    summed in float64 so that long lists do not lose the small terms; sample i is kept while
    ``T_i >= eps`` (a prefix of the ray, as T only falls), ``w_i = T_i (1 - exp(-sigma_i delta_i))``.

    >>> out = composite_packed(torch.tensor([1e9]), torch.ones(1, 3), torch.tensor([2.0]), torch.ones(1),
    ...                        torch.tensor([0]), torch.tensor([1]))
    >>> out.opacity, out.depth
    (tensor([1.]), tensor([2.]))
    """
    n_rays, n_samples = offsets.shape[0], sigmas.shape[0]
    offsets, counts = offsets.to(torch.int64), counts.to(torch.int64)
    # Which ray owns each sample (-1: none) and where that ray's list starts.
    ray_of = torch.repeat_interleave(torch.arange(n_rays, device=sigmas.device), counts)
    local = torch.arange(ray_of.shape[0], device=sigmas.device) - (torch.cumsum(counts, 0) - counts)[ray_of]
    index = offsets[ray_of] + local
    owner = torch.full((n_samples,), -1, dtype=torch.int64, device=sigmas.device).index_put((index,), ray_of)
    starts = torch.zeros(n_samples, dtype=torch.int64, device=sigmas.device).index_put(
        (index,), offsets[ray_of]
    )
    owned = owner >= 0
    tau = (sigmas * deltas).to(torch.float64)
    inclusive = torch.cumsum(tau, 0)
    exclusive = inclusive - tau
    base = torch.where(owned, exclusive[starts.clamp_max(max(n_samples - 1, 0))], 0.0)
    transmittance = torch.exp(-(exclusive - base)).to(sigmas.dtype)
    alive = owned & (transmittance.detach() >= eps)
    alpha = 1.0 - torch.exp(-sigmas * deltas)
    weights = torch.where(alive, transmittance * alpha, torch.zeros_like(alpha))
    ray = owner.clamp_min(0)
    opacity = torch.zeros(n_rays, dtype=sigmas.dtype, device=sigmas.device).index_add(0, ray, weights)
    depth = torch.zeros_like(opacity).index_add(0, ray, weights * t.detach())
    color = torch.zeros((n_rays, 3), dtype=rgbs.dtype, device=rgbs.device).index_add(
        0, ray, weights[:, None] * rgbs
    )
    bg = expand_background(background, n_rays, sigmas)
    color = color + (1.0 - opacity)[:, None] * bg
    kept = torch.zeros(n_rays, dtype=torch.int32, device=sigmas.device).index_add(
        0, ray, alive.to(torch.int32)
    )
    return PackedComposited(color, opacity, depth, weights, kept)


# ---------------------------------------------------------------- occupancy grid (renderer.occupancy)


def occupancy_cell_points(
    cells: torch.Tensor, resolution: int, radius: float, jitter: torch.Tensor | None = None
) -> torch.Tensor:
    """A point in each cell: cells (M,) flat indices, jitter (M, 3) in [0, 1) (None: the centres;
    the kernels hash ``hash_uniform(3 m + d, key)``) -> points (M, 3).

    >>> occupancy_cell_points(torch.tensor([0, 7]), 2, 1.0)
    tensor([[-0.5000, -0.5000, -0.5000],
            [ 0.5000,  0.5000,  0.5000]])
    """
    cells = cells.to(torch.int64)
    ijk = torch.stack([cells // resolution**2, (cells // resolution) % resolution, cells % resolution], 1)
    u = torch.full(ijk.shape, 0.5) if jitter is None else jitter
    return -radius + (2.0 * radius / resolution) * (ijk.to(torch.float32) + u)


def occupancy_update(
    density: torch.Tensor,
    used: torch.Tensor,
    cells: torch.Tensor,
    values: torch.Tensor,
    decay: float,
    threshold: float,
    warmup: bool,
    dilate: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One grid update: density (C,), used (C,) uint8, distinct cells (M,) and their new values (M,)
    -> (density (C,), occupied (C,) uint8). ``density[c] = max(decay * density[c], value)`` for the
    given cells; occupied where density > min(threshold, mean density), in warm-up, or used, and with
    ``dilate`` next to such a cell (26 neighbours).

    >>> occupancy_update(torch.zeros(2), torch.zeros(2, dtype=torch.uint8), torch.tensor([1]),
    ...                  torch.tensor([3.0]), 0.9, 1.0, False)
    (tensor([0., 3.]), tensor([0, 1], dtype=torch.uint8))
    """
    density = density.clone()
    cells = cells.to(torch.int64)
    density[cells] = torch.maximum(density[cells] * decay, values.to(density.dtype))
    cut = min(threshold, float(density.mean()))
    occupied = (density > cut) | (used != 0) | warmup
    if dilate:  # the 26 neighbours of every occupied cell too: a 3x3x3 max filter
        cube = occupied.view(1, 1, *(3 * [round(occupied.shape[0] ** (1 / 3))])).float()
        occupied = torch.nn.functional.max_pool3d(cube, 3, stride=1, padding=1).view(-1) > 0
    return density, occupied.to(torch.uint8)


def occupancy_mark_used(
    used: torch.Tensor,
    resolution: int,
    radius: float,
    rays: Rays,
    t: torch.Tensor,
    counts: torch.Tensor,
    weights: torch.Tensor,
    min_weight: float,
) -> torch.Tensor:
    """``used`` (C,) uint8 with the cells of packed samples (rays back to back) whose weight exceeds
    ``min_weight`` set to 1: rays (R), t, weights (N,), counts (R,) -> (C,) uint8."""
    ray = torch.repeat_interleave(torch.arange(counts.shape[0]), counts.to(torch.int64))
    points = rays.origins[ray] + t[:, None] * rays.directions[ray]
    used = used.clone()
    used[occupancy_cells(points[weights > min_weight], resolution, radius)] = 1
    return used


def march_occupancy(
    occupied: torch.Tensor,
    resolution: int,
    radius: float,
    rays: Rays,
    n_samples: int,
    generator: torch.Generator | None = None,
    jitter: torch.Tensor | None = None,
) -> PackedSamples:
    """The stratified samples of ``sample_stratified`` (with ``jitter`` (R, S) as there) kept where
    ``occupied`` (C,) is non-zero, with their full-list ``sample_deltas``, packed ray after ray; rays
    that miss (near == far) keep none: -> PackedSamples(t, deltas, offsets, counts, bins).

    >>> rays = Rays(torch.tensor([[0.0, 0, -2]]), torch.tensor([[0.0, 0, 1]]), torch.tensor([0.0]),
    ...             torch.tensor([4.0]))
    >>> march_occupancy(torch.zeros(1, dtype=torch.uint8), 1, 2.0, rays, 4).counts   # one empty cell
    tensor([0], dtype=torch.int32)
    """
    t = sample_stratified(rays.near, rays.far, n_samples, generator, jitter)
    deltas = sample_deltas(t, rays.far)
    points = rays.origins[:, None, :] + t[..., None] * rays.directions[:, None, :]
    keep = occupied.to(torch.int64)[occupancy_cells(points, resolution, radius)] != 0
    keep &= (rays.far > rays.near)[:, None]
    counts = keep.sum(1).to(torch.int32)
    bins = torch.arange(n_samples).expand_as(keep)[keep].to(torch.int32)
    return PackedSamples(t[keep], deltas[keep], offsets_from_counts(counts), counts, bins)
