"""Sample placement along rays as Taichi kernels: stratified, importance, merge and interval lengths.

Every function is one kernel launch, works per ray in parallel, and carries no gradient (sample
positions are under stop-gradient in LOLNeRF). Random numbers are hashed inside the kernels from one
key that each call draws from the caller's generator (a PCG hash of the sample index), so a seed gives
the same samples on every backend; ``reference.hashed_uniforms`` computes the same numbers in torch.
The conventions (bins, PDF edges, epsilon, uniforms) are in ``renderer.reference``'s docstring.
"""

import taichi as ti
import torch

from renderer.backend import kernel_device, launch, to_kernel
from renderer.lanes import LANES, aligned, as_lanes, lanes_1d, lanes_active, shift_down
from renderer.specs import (
    IMPORTANCE_EPS,
    PCG_INCREMENT,
    PCG_MULTIPLIER,
    PCG_OUTPUT,
    draw_key,
    mix_key,
)

f32_1d = ti.types.ndarray(dtype=ti.f32, ndim=1)
f32_2d = ti.types.ndarray(dtype=ti.f32, ndim=2)
i64_2d = ti.types.ndarray(dtype=ti.i64, ndim=2)

TINY = 1.1754944e-38  # smallest normal float32: guards divisions by a zero-length interval


@ti.func
def hash_uniform(index, mixed_key):
    """``reference.hash_uniform``: a uniform in [0, 1) from a sample index and ``reference.mix_key(key)``."""
    state = (ti.cast(index, ti.u32) + mixed_key) * ti.u32(PCG_MULTIPLIER) + ti.u32(PCG_INCREMENT)
    word = ((state >> ((state >> ti.u32(28)) + ti.u32(4))) ^ state) * ti.u32(PCG_OUTPUT)
    word = (word >> ti.u32(22)) ^ word
    return ti.cast(word >> ti.u32(8), ti.f32) * (1.0 / 16777216.0)


@ti.kernel
def stratified_kernel(
    near: f32_1d, far: f32_1d, mixed_key: ti.u32, use_jitter: ti.i32, t: f32_1d, n_samples: ti.i32
):
    """near, far (R,), hashed jitter (unless use_jitter is 0: bin centres) -> flat t (R*S)."""
    # Rays in parallel, samples in an inner serial loop over flat indices: each thread streams through
    # one ray's contiguous samples and does the per-ray work once; on x64 a 2-D ndrange over
    # (ray, sample) was much slower, and 2-D indexing slower than flat.
    for ray in range(near.shape[0]):
        lo = near[ray]
        bin_width = (far[ray] - lo) / n_samples  # one division per ray, not per sample
        first = ray * n_samples
        for s in range(n_samples):
            u = 0.5
            if use_jitter:
                u = hash_uniform(first + s, mixed_key)
            t[first + s] = lo + bin_width * (s + u)


@ti.kernel
def stratified_lanes(
    near: f32_1d, far: f32_1d, mixed_key: ti.u32, use_jitter: ti.template(), t: lanes_1d, chunks: ti.i32
):
    """``stratified_kernel`` 8 samples at a time, for x64 (``renderer.lanes``): near, far (R,) -> lanes of
    t (R*S/8), bit for bit. The jitter is ``hash_uniform`` lane by lane: a copy of the hash written in
    8-wide vector operations was no faster, so both kernels share the scalar hash."""
    for ray in range(near.shape[0]):
        # Built inside the parallel loop: a vector local shared across Taichi's offloaded tasks
        # crashed the x64 build.
        lane_offsets = ti.Vector([float(k) for k in range(LANES)])
        lo = near[ray]
        bin_width = (far[ray] - lo) / (chunks * LANES)
        for c in range(ray * chunks, ray * chunks + chunks):
            u = ti.Vector([0.5] * LANES)
            if ti.static(use_jitter):
                u = ti.Vector([hash_uniform(c * LANES + k, mixed_key) for k in ti.static(range(LANES))])
            first_bin = ti.cast((c - ray * chunks) * LANES, ti.f32)
            t[c] = lo + bin_width * (first_bin + lane_offsets + u)


@ti.func
def place(t_all: ti.template(), order: ti.template(), ray, k, value, source, take):
    """Write (value, source) to slot k of the ray's merged list, and keep it only if ``take``: returns
    the next free slot. Branch-free: a slot written but not kept is overwritten by the next one."""
    t_all[ray, k] = value
    order[ray, k] = source
    return k + ti.cast(take, ti.i32)


@ti.kernel
def importance_kernel(
    t: f32_2d,
    weights: f32_2d,
    near: f32_1d,
    far: f32_1d,
    mixed_key: ti.u32,
    use_jitter: ti.i32,
    t_fine: f32_2d,
    merged: ti.template(),
    t_all: f32_2d,
    order: i64_2d,
    deltas: f32_2d,
    lane_deltas: ti.template(),
    t_all_lanes: lanes_1d,
    deltas_lanes: lanes_1d,
):
    """Inverse CDF by a two-pointer walk (the uniforms are sorted): (R, S) t, weights -> (R, F) t_fine.

    Bin i spans [left_i, right_i] = [near | mid(t[i-1], t[i]), mid(t[i], t[i+1]) | far]; its mass is
    ``max(w_i, 0) + eps * width_i / (far - near)``. The walk carries the current bin's edges and its
    mass, so each bin is visited once per ray: O(S + F).

    With ``merged`` (a compile-time flag) the walk also writes ``merge_samples_with_deltas(t, t_fine,
    far)`` into (R, S+F) t_all, order and deltas, which needs no search: coarse sample t_i lies in bin
    i, so every coarse sample before the current bin is ``<=`` the fine sample being placed, and every
    one after it is ``>=``. The walk places t_i when it leaves bin i, or before the first fine sample of
    bin i that is ``>= t_i``, both without a data-dependent branch (``place``); a loop catches the ties
    of degenerate rays (equal coarse samples), so the result is the stable merge exactly. The interval
    lengths follow in a last pass over the row, 8 at a time on x64 (``lane_deltas``; the *_lanes
    arguments are lane views of t_all and deltas). Merging inside the walk saves ``merge_kernel``'s
    separate launch and its second sweep over the samples (README, Benchmarks, has the comparison).
    """
    n_bins = t.shape[1]
    n_fine = t_fine.shape[1]
    for ray in range(t.shape[0]):
        lo, hi = near[ray], far[ray]
        eps_per_length = IMPORTANCE_EPS / ti.max(hi - lo, TINY)
        weight_sum = 0.0
        for i in range(n_bins):
            weight_sum += ti.max(weights[ray, i], 0.0)
        # The bin widths telescope to far - near (coarse t sorted inside [near, far]).
        total = weight_sum + eps_per_length * (hi - lo)
        u_scale = total / n_fine
        i = 0
        cdf_below = 0.0
        left = lo
        right = hi
        if n_bins > 1:
            right = 0.5 * (t[ray, 0] + t[ray, 1])
        mass = ti.max(weights[ray, 0], 0.0) + eps_per_length * ti.max(right - left, 0.0)
        k = 0  # merged slots filled
        placed = 0  # coarse samples placed
        for j in range(n_fine):
            sample = lo  # a miss (near == far) has no mass: every sample sits at near
            if total > 0.0:
                v = 0.5
                if use_jitter:
                    v = hash_uniform(ray * n_fine + j, mixed_key)
                u = (j + v) * u_scale
                while i < n_bins - 1 and cdf_below + mass <= u:
                    if ti.static(merged):  # leaving bin i: t_i comes before every later sample
                        k = place(t_all, order, ray, k, t[ray, i], i, placed <= i)
                        placed = ti.max(placed, i + 1)
                    cdf_below += mass
                    i += 1
                    left = right
                    right = hi
                    if i < n_bins - 1:
                        right = 0.5 * (t[ray, i] + t[ray, i + 1])
                    mass = ti.max(weights[ray, i], 0.0) + eps_per_length * ti.max(right - left, 0.0)
                frac = 0.0
                if mass > 0.0:
                    frac = ti.min(ti.max((u - cdf_below) / mass, 0.0), 1.0)
                sample = left + frac * ti.max(right - left, 0.0)
            t_fine[ray, j] = sample
            if ti.static(merged):
                coarse = t[ray, i]
                take = (placed <= i) & (coarse <= sample)  # ties: the coarse sample first (stable)
                k = place(t_all, order, ray, k, coarse, i, take)
                placed = ti.select(take, i + 1, placed)
                while placed < n_bins and t[ray, placed] <= sample:  # only on degenerate (tied) rays
                    k = place(t_all, order, ray, k, t[ray, placed], placed, True)
                    placed += 1
                k = place(t_all, order, ray, k, sample, n_bins + j, True)
        if ti.static(merged):
            while placed < n_bins:
                k = place(t_all, order, ray, k, t[ray, placed], placed, True)
                placed += 1
            width = n_bins + n_fine
            if ti.static(lane_deltas):
                chunks = width // LANES
                for c in range(ray * chunks, ray * chunks + chunks):
                    here = t_all_lanes[c]
                    after = hi
                    if c + 1 < ray * chunks + chunks:
                        after = t_all_lanes[c + 1][0]
                    deltas_lanes[c] = ti.max(shift_down(here, 1, after) - here, 0.0)
            else:
                for m in range(width - 1):
                    deltas[ray, m] = ti.max(t_all[ray, m + 1] - t_all[ray, m], 0.0)
                deltas[ray, width - 1] = ti.max(hi - t_all[ray, width - 1], 0.0)


@ti.func
def merge_step(
    t_a: ti.template(),
    t_b: ti.template(),
    t_all: ti.template(),
    order: ti.template(),
    deltas: ti.template(),
    ray,
    k,
    i,
    j,
    a,
    b,
    previous,
):
    """Emit output k of one ray's merge from the list heads a = t_a[i], b = t_b[j]; return the new state.

    Ties take ``a`` (a stable merge); an exhausted list's head is +inf. Branch-free: which list to
    take is data-dependent and would be mispredicted half the time. With deltas (a non-empty array),
    output k also completes interval k - 1 (k = 0 writes a placeholder that k = 1 overwrites).
    """
    n_a = t_a.shape[1]
    n_b = t_b.shape[1]
    take_a = a <= b
    value = ti.select(take_a, a, b)
    t_all[ray, k] = value
    order[ray, k] = ti.select(take_a, i, n_a + j)
    if deltas.shape[1] > 0:
        deltas[ray, ti.max(k - 1, 0)] = ti.max(value - previous, 0.0)
    i_next = ti.select(take_a, i + 1, i)
    j_next = ti.select(take_a, j, j + 1)
    a_next = ti.select(i_next < n_a, t_a[ray, ti.min(i_next, n_a - 1)], ti.math.inf)
    b_next = ti.select(j_next < n_b, t_b[ray, ti.min(j_next, n_b - 1)], ti.math.inf)
    return i_next, j_next, a_next, b_next, value


@ti.kernel
def merge_kernel(
    t_a: f32_2d, t_b: f32_2d, far: f32_1d, t_all: f32_2d, order: i64_2d, deltas: f32_2d, half: ti.i32
):
    """Stable two-list merge per ray: (R, S), (R, F) sorted -> (R, S+F) sorted and source indices, and,
    when ``deltas`` is (R, S+F) rather than (R, 0), the interval lengths (as ``deltas_kernel``) in the
    same pass: one launch and one sweep instead of two.

    Each merge is a chain of dependent steps (compare, then load the next head), so one thread
    interleaves two rays' merges, so that one ray's steps fill the other's wait for its loads.
    Ray p pairs with ray p + half, half = ceil(R / 2), passed in because Taichi's Vulkan (SPIR-V)
    codegen rejects integer floor division of an ndarray shape.
    """
    n_rays = t_a.shape[0]
    width = t_a.shape[1] + t_b.shape[1]
    for pair in range(half):
        ray0 = pair
        # With an odd R the last pair has no partner and merges its own ray twice (same values).
        ray1 = ti.select(pair + half < n_rays, pair + half, pair)
        i0, j0, a0, b0, p0 = 0, 0, t_a[ray0, 0], t_b[ray0, 0], 0.0
        i1, j1, a1, b1, p1 = 0, 0, t_a[ray1, 0], t_b[ray1, 0], 0.0
        for k in range(width):
            i0, j0, a0, b0, p0 = merge_step(t_a, t_b, t_all, order, deltas, ray0, k, i0, j0, a0, b0, p0)
            i1, j1, a1, b1, p1 = merge_step(t_a, t_b, t_all, order, deltas, ray1, k, i1, j1, a1, b1, p1)
        if deltas.shape[1] > 0:
            deltas[ray0, width - 1] = ti.max(far[ray0] - p0, 0.0)
            deltas[ray1, width - 1] = ti.max(far[ray1] - p1, 0.0)


@ti.kernel
def deltas_kernel(t: f32_1d, far: f32_1d, deltas: f32_1d, n_samples: ti.i32):
    """Flat t (R*S), far (R,) -> flat deltas (R*S): next sample (or far) minus this one, never negative."""
    for ray in range(far.shape[0]):
        last = ray * n_samples + n_samples - 1
        for i in range(ray * n_samples, last):
            deltas[i] = ti.max(t[i + 1] - t[i], 0.0)
        deltas[last] = ti.max(far[ray] - t[last], 0.0)


def _mixed_key(generator: torch.Generator | None) -> int:
    """``mix_key`` of a fresh key from the caller's generator (0, unused, without a generator)."""
    if generator is None:
        return 0
    return mix_key(draw_key(generator))


def _check_rays(near: torch.Tensor, far: torch.Tensor) -> None:
    if near.dim() != 1 or far.shape != near.shape:
        raise ValueError(
            f"near and far must both have shape (R,); got {tuple(near.shape)} and {tuple(far.shape)}."
        )


def sample_stratified(
    near: torch.Tensor, far: torch.Tensor, n_samples: int, generator: torch.Generator | None = None
) -> torch.Tensor:
    """One jittered sample per equal bin of [near, far]: near, far (R,) -> t (R, S) sorted.

    ``generator=None`` gives bin centres (deterministic, for evaluation).

    >>> sample_stratified(torch.tensor([0.0]), torch.tensor([4.0]), 4)
    tensor([[0.5000, 1.5000, 2.5000, 3.5000]])
    """
    _check_rays(near, far)
    if n_samples < 1:
        raise ValueError(f"n_samples must be at least 1, got {n_samples}.")
    n_rays = near.shape[0]
    t = torch.empty((n_rays, n_samples), device=kernel_device())
    if n_rays > 0 and n_samples % LANES == 0 and lanes_active() and aligned(t):
        launch(
            "sample_stratified", stratified_lanes, to_kernel(near), to_kernel(far), _mixed_key(generator),
            generator is not None, as_lanes(t), n_samples // LANES,
        )  # fmt: skip
    elif n_rays > 0:
        launch(
            "sample_stratified", stratified_kernel, to_kernel(near), to_kernel(far), _mixed_key(generator),
            int(generator is not None), t.view(-1), n_samples,
        )  # fmt: skip
    return t.to(near.device)


def sample_importance(
    t: torch.Tensor,
    weights: torch.Tensor,
    n_samples: int,
    near: torch.Tensor,
    far: torch.Tensor,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Inverse-CDF samples of the piecewise-constant PDF given by coarse weights (no gradient).

    t, weights (R, S) coarse samples (sorted) and their compositing weights; near, far (R,)
    -> t_fine (R, F) sorted. Bins are [near, midpoints of t, far]; zero weights sample uniformly.

    >>> t = torch.tensor([[0.5, 1.5, 2.5, 3.5]]); w = torch.tensor([[0.0, 0.0, 1.0, 0.0]])
    >>> sample_importance(t, w, 2, torch.tensor([0.0]), torch.tensor([4.0]))
    tensor([[2.2500, 2.7500]])
    """
    return _importance(t, weights, n_samples, near, far, generator, merged=False)[0]


def sample_importance_and_merge(
    t: torch.Tensor,
    weights: torch.Tensor,
    n_samples: int,
    near: torch.Tensor,
    far: torch.Tensor,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``sample_importance``, then ``merge_samples_with_deltas(t, t_fine, far)``, in one kernel pass:
    -> t_fine (R, F), t_all (R, S+F), order (R, S+F) int64, deltas (R, S+F); the same numbers as the
    two calls with the same generator state.

    >>> t = torch.tensor([[0.5, 1.5, 2.5, 3.5]]); w = torch.tensor([[0.0, 0.0, 1.0, 0.0]])
    >>> near, far = torch.tensor([0.0]), torch.tensor([4.0])
    >>> t_fine, t_all, order, deltas = sample_importance_and_merge(t, w, 2, near, far)
    >>> order, deltas
    (tensor([[0, 1, 4, 2, 5, 3]]), tensor([[1.0000, 0.7500, 0.2500, 0.2500, 0.7500, 0.5000]]))
    """
    return _importance(t, weights, n_samples, near, far, generator, merged=True)


def _importance(
    t: torch.Tensor,
    weights: torch.Tensor,
    n_samples: int,
    near: torch.Tensor,
    far: torch.Tensor,
    generator: torch.Generator | None,
    merged: bool,
) -> tuple[torch.Tensor, ...]:
    _check_rays(near, far)
    if t.dim() != 2 or weights.shape != t.shape or t.shape[0] != near.shape[0]:
        raise ValueError(
            f"t and weights must both have shape (R, S) with R = {near.shape[0]} rays; got "
            f"{tuple(t.shape)} and {tuple(weights.shape)}."
        )
    if n_samples < 1 or t.shape[1] < 1:
        raise ValueError(f"need at least one coarse and one fine sample; got {t.shape[1]} and {n_samples}.")
    n_rays = t.shape[0]
    device = kernel_device()
    t_fine = torch.empty((n_rays, n_samples), device=device)
    width = t.shape[1] + n_samples if merged else 0  # (R, 0) placeholders when not merging
    t_all = torch.empty((n_rays, width), device=device)
    order = torch.empty((n_rays, width), dtype=torch.int64, device=device)
    deltas = torch.empty((n_rays, width), device=device)
    lane_deltas = merged and width % LANES == 0 and lanes_active() and aligned(t_all, deltas)
    unused = torch.zeros((1, LANES), device=device)
    lane_views = (as_lanes(t_all), as_lanes(deltas)) if lane_deltas else (unused, unused)
    if n_rays > 0:
        launch(
            "sample_importance_and_merge" if merged else "sample_importance", importance_kernel,
            to_kernel(t), to_kernel(weights), to_kernel(near), to_kernel(far), _mixed_key(generator),
            int(generator is not None), t_fine, merged, t_all, order, deltas, lane_deltas, *lane_views,
        )  # fmt: skip
    out = (t_fine, t_all, order, deltas) if merged else (t_fine,)
    return tuple(x.to(t.device) for x in out)


def merge_samples(t_a: torch.Tensor, t_b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Merge two per-ray sorted sample lists: (R, S), (R, F) -> t_all (R, S+F), order (R, S+F) int64.

    ``order`` indexes ``torch.cat([t_a, t_b], 1)``; ties keep ``t_a``'s sample first (stable). An
    O(S+F) merge per ray, not a sort.

    >>> merge_samples(torch.tensor([[0.0, 2.0]]), torch.tensor([[1.0]]))
    (tensor([[0., 1., 2.]]), tensor([[0, 2, 1]]))
    """
    return _merge(t_a, t_b, None)[:2]


def merge_samples_with_deltas(
    t_a: torch.Tensor, t_b: torch.Tensor, far: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``merge_samples`` and ``sample_deltas`` of the merged list in one kernel pass:
    (R, S), (R, F), far (R,) -> t_all (R, S+F), order (R, S+F) int64, deltas (R, S+F).

    >>> merge_samples_with_deltas(torch.tensor([[0.0, 2.0]]), torch.tensor([[1.0]]), torch.tensor([4.0]))
    (tensor([[0., 1., 2.]]), tensor([[0, 2, 1]]), tensor([[1., 1., 2.]]))
    """
    if far.shape != (t_a.shape[0],):
        raise ValueError(f"far must have shape ({t_a.shape[0]},); got {tuple(far.shape)}.")
    return _merge(t_a, t_b, far)


def _merge(t_a: torch.Tensor, t_b: torch.Tensor, far: torch.Tensor | None) -> tuple[torch.Tensor, ...]:
    if t_a.dim() != 2 or t_b.dim() != 2 or t_a.shape[0] != t_b.shape[0]:
        raise ValueError(
            f"merge_samples needs two (R, S) and (R, F) tensors with the same R; got {tuple(t_a.shape)} "
            f"and {tuple(t_b.shape)}."
        )
    n_rays, width = t_a.shape[0], t_a.shape[1] + t_b.shape[1]
    device = kernel_device()
    t_all = torch.empty((n_rays, width), device=device)
    order = torch.empty((n_rays, width), dtype=torch.int64, device=device)
    deltas = torch.empty((n_rays, width if far is not None else 0), device=device)
    if n_rays > 0 and t_a.shape[1] > 0 and t_b.shape[1] > 0:
        far_k = to_kernel(far) if far is not None else torch.zeros(n_rays, device=device)
        launch("merge_samples", merge_kernel, to_kernel(t_a), to_kernel(t_b), far_k, t_all, order, deltas,
               (n_rays + 1) // 2)  # fmt: skip
    elif n_rays > 0:  # one list is empty: the other is already the merge
        t_all.copy_(to_kernel(t_a if t_a.shape[1] else t_b))
        order.copy_(torch.arange(width, device=device).expand(n_rays, width))
        if far is not None:
            deltas = sample_deltas(t_all, far)
    out = (t_all, order) if far is None else (t_all, order, deltas)
    return tuple(x.to(t_a.device) for x in out)


def sample_deltas(t_all: torch.Tensor, far: torch.Tensor) -> torch.Tensor:
    """Interval lengths: t (R, S), far (R,) -> deltas (R, S), ``t[i+1] - t[i]`` and last ``far - t[-1]``.

    >>> sample_deltas(torch.tensor([[1.0, 1.5, 3.0]]), torch.tensor([4.0]))
    tensor([[0.5000, 1.5000, 1.0000]])
    """
    if t_all.dim() != 2 or far.shape != (t_all.shape[0],):
        raise ValueError(
            f"sample_deltas needs t (R, S) and far (R,); got {tuple(t_all.shape)} and {tuple(far.shape)}."
        )
    deltas = torch.empty(t_all.shape, device=kernel_device())
    if t_all.numel() > 0:
        launch(
            "sample_deltas",
            deltas_kernel,
            to_kernel(t_all).view(-1),
            to_kernel(far),
            deltas.view(-1),
            t_all.shape[1],
        )
    return deltas.to(t_all.device)
