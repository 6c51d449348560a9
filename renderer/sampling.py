"""Sample placement along rays as Taichi kernels: stratified, importance, merge and interval lengths.

Each kernel does one job, per ray in parallel: stratified samples, the inverse CDF (importance samples
and their bins), a merge (of any two sorted lists, or of coarse and importance samples by their bins,
with the interval lengths the compositing needs), interval lengths (``interval`` is their one
definition). The inverse CDF and the merge by bins are written as per-sample steps (``walk_to`` on a
``Walk``, ``merge_fine`` on a ``Merge``), so that ``importance_merge_kernel`` can take both steps for
each importance sample in one pass over the ray, from the same functions. On x64 the stratified samples
and the interval lengths also have 8-lane versions (``renderer.lanes``). The public functions launch
one or two of the kernels, and carry no gradient (sample positions are under stop-gradient in
LOLNeRF). Random numbers are hashed inside the kernels from one key that each call draws from the
caller's generator (a PCG hash of the sample index), so a seed gives the same samples on every
backend; ``reference.hashed_uniforms`` computes the same numbers in torch.
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
i32_2d = ti.types.ndarray(dtype=ti.i32, ndim=2)
i64_1d = ti.types.ndarray(dtype=ti.i64, ndim=1)
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
def interval(here, after):
    """The length from ``here`` to ``after`` (the next sample, far, or a bin's right edge), never
    negative: the one definition behind every interval length and bin width here. Works on floats and
    on ``Lanes`` alike, so the scalar and the 8-lane kernels give the same numbers bit for bit."""
    return ti.max(after - here, 0.0)


@ti.func
def row_intervals(t: ti.template(), deltas: ti.template(), first, count, end):
    """Interval lengths of one ray's samples t[first : first + count] of a flat array into deltas (the
    same slots): each sample's ``interval`` to the next one, the last one's to ``end`` (far)."""
    last = first + count - 1
    for i in range(first, last):
        deltas[i] = interval(t[i], t[i + 1])
    deltas[last] = interval(t[last], end)


@ti.func
def bin_right(t: ti.template(), ray, i, n_bins, far):
    """Right edge of importance bin i: the midpoint of coarse samples i and i + 1, far for the last bin."""
    right = far
    if i < n_bins - 1:
        right = 0.5 * (t[ray, i] + t[ray, i + 1])
    return right


@ti.func
def bin_mass(weight, left, right, eps_per_length):
    """Mass of the bin [left, right]: its coarse weight (negative ones count as 0) plus the epsilon share
    of its width."""
    return ti.max(weight, 0.0) + eps_per_length * interval(left, right)


@ti.dataclass
class Walk:
    """One ray's inverse-CDF walk: the ray's constants, and the bin that the last fine sample lies in.

    Bin i spans [left_i, right_i] = [near | mid(t[i-1], t[i]), mid(t[i], t[i+1]) | far] (``bin_right``);
    its mass is ``bin_mass``. The fine samples' uniforms are sorted, so the walk only moves forward and
    visits each bin once per ray: O(S + F).
    """

    near: ti.f32
    far: ti.f32
    eps_per_length: ti.f32  # IMPORTANCE_EPS spread over [near, far]
    total: ti.f32  # the ray's mass: 0 for a miss (near == far)
    u_scale: ti.f32  # total / F: the uniforms scaled to the CDF
    bin: ti.i32
    cdf_below: ti.f32  # the mass of the bins before ``bin``
    left: ti.f32  # ``bin``'s edges and mass
    right: ti.f32
    mass: ti.f32


@ti.func
def walk_start(t: ti.template(), weights: ti.template(), ray, near, far, n_fine):
    """The walk of one ray at bin 0, before its first fine sample."""
    n_bins = t.shape[1]
    eps_per_length = IMPORTANCE_EPS / ti.max(far - near, TINY)
    weight_sum = 0.0
    for i in range(n_bins):
        weight_sum += ti.max(weights[ray, i], 0.0)
    # The bin widths telescope to far - near (coarse t sorted inside [near, far]).
    total = weight_sum + eps_per_length * (far - near)
    right = bin_right(t, ray, 0, n_bins, far)
    return Walk(
        near=near, far=far, eps_per_length=eps_per_length, total=total, u_scale=total / n_fine, bin=0,
        cdf_below=0.0, left=near, right=right, mass=bin_mass(weights[ray, 0], near, right, eps_per_length),
    )  # fmt: skip


@ti.func
def walk_next_bin(t: ti.template(), weights: ti.template(), ray, walk: ti.template()):
    """Move ``walk`` (in place) to the next bin."""
    walk.cdf_below += walk.mass
    walk.bin += 1
    walk.left = walk.right
    walk.right = bin_right(t, ray, walk.bin, t.shape[1], walk.far)
    walk.mass = bin_mass(weights[ray, walk.bin], walk.left, walk.right, walk.eps_per_length)


@ti.func
def walk_to(
    t: ti.template(), weights: ti.template(), ray, j, n_fine, mixed_key, use_jitter, walk: ti.template()
):
    """Fine sample j of the ray: moves ``walk`` (in place) to the sample's bin and returns its position.

    The sample's point on the CDF is (j + v) total / F, v hashed from ``mixed_key`` (``hash_uniform``)
    unless use_jitter is 0 (then v = 0.5). A ray with no mass (a miss, near == far) puts every sample
    at near, in bin 0.
    """
    sample = walk.near
    if walk.total > 0.0:
        v = 0.5
        if use_jitter:
            v = hash_uniform(ray * n_fine + j, mixed_key)
        u = (j + v) * walk.u_scale
        while walk.bin < t.shape[1] - 1 and walk.cdf_below + walk.mass <= u:
            walk_next_bin(t, weights, ray, walk)
        frac = 0.0
        if walk.mass > 0.0:
            frac = ti.min(ti.max((u - walk.cdf_below) / walk.mass, 0.0), 1.0)
        sample = walk.left + frac * interval(walk.left, walk.right)
    return sample


@ti.dataclass
class Merge:
    """One ray's stable merge of its coarse samples with its importance samples, in flat outputs."""

    first: ti.i32  # the ray's first slot
    slot: ti.i32  # the next slot to write
    placed: ti.i32  # coarse samples placed so far


@ti.func
def merge_start(ray, width):
    """The merge of one ray whose merged row (``width`` slots) starts at flat slot ray * width."""
    return Merge(first=ray * width, slot=ray * width, placed=0)


@ti.func
def place(t_all: ti.template(), order: ti.template(), merge: ti.template(), value, source, take):
    """Write (value, source) to ``merge``'s next slot, and keep it only if ``take``. Branch-free: a slot
    written but not kept is overwritten by the next one."""
    t_all[merge.slot] = value
    order[merge.slot] = source
    merge.slot += ti.cast(take, ti.i32)


@ti.func
def merge_fine(
    t: ti.template(), t_all: ti.template(), order: ti.template(), ray, merge: ti.template(), b, sample, j
):
    """Place the ray's importance sample j (``sample``, in bin b) after the coarse samples that come
    before it, and advance ``merge`` (in place).

    No search is needed, because coarse sample t_i lies in bin i: every coarse sample of an earlier bin
    is ``<=`` the fine sample (t_{b-1} <= left_b), and only t_b needs a comparison. So: place the coarse
    samples of the bins before b not placed yet (the first one branch-free, since in dense regions
    there is at most one), then t_b if it is ``<=`` the fine sample, then the fine sample. A later
    coarse sample can only tie with it (equal coarse samples of a degenerate ray make zero-width bins,
    or the fine sample rounds onto the next edge): a loop that almost never runs places those first,
    so the result is the stable merge exactly (ties put the coarse sample first).
    """
    n_bins = t.shape[1]
    behind = merge.placed < b
    place(t_all, order, merge, t[ray, ti.min(merge.placed, n_bins - 1)], merge.placed, behind)
    merge.placed += ti.cast(behind, ti.i32)
    while merge.placed < b:
        place(t_all, order, merge, t[ray, merge.placed], merge.placed, True)
        merge.placed += 1
    take = (merge.placed <= b) & (t[ray, b] <= sample)
    place(t_all, order, merge, t[ray, b], b, take)
    merge.placed = ti.select(take, b + 1, merge.placed)
    while merge.placed < n_bins and t[ray, merge.placed] <= sample:  # only on ties
        place(t_all, order, merge, t[ray, merge.placed], merge.placed, True)
        merge.placed += 1
    place(t_all, order, merge, sample, n_bins + j, True)


@ti.func
def merge_finish(
    t: ti.template(),
    t_all: ti.template(),
    order: ti.template(),
    deltas: ti.template(),
    ray,
    merge: ti.template(),
    far,
):
    """After the ray's last importance sample: place the coarse samples left, then the interval lengths
    of the merged row (``row_intervals``) while it is still in cache, which was faster than a separate
    launch of ``deltas_lanes`` (README)."""
    n_bins = t.shape[1]
    while merge.placed < n_bins:
        place(t_all, order, merge, t[ray, merge.placed], merge.placed, True)
        merge.placed += 1
    row_intervals(t_all, deltas, merge.first, merge.slot - merge.first, far)  # every slot is kept by now


@ti.kernel
def inverse_cdf_kernel(
    t: f32_2d,
    weights: f32_2d,
    near: f32_1d,
    far: f32_1d,
    mixed_key: ti.u32,
    use_jitter: ti.i32,
    t_fine: f32_2d,
    bins: i32_2d,
):
    """Inverse CDF by a two-pointer walk (``Walk``): (R, S) t, weights, near, far (R,) -> (R, F) t_fine
    and bins, the bin each fine sample lies in (what ``merge_binned_kernel`` merges by)."""
    n_fine = t_fine.shape[1]
    for ray in range(t.shape[0]):
        walk = walk_start(t, weights, ray, near[ray], far[ray], n_fine)
        for j in range(n_fine):
            t_fine[ray, j] = walk_to(t, weights, ray, j, n_fine, mixed_key, use_jitter, walk)
            bins[ray, j] = walk.bin


@ti.kernel
def merge_binned_kernel(
    t: f32_2d, t_fine: f32_2d, bins: i32_2d, far: f32_1d, t_all: f32_1d, order: i64_1d, deltas: f32_1d
):
    """The stable merge of each ray's coarse samples (R, S) with its importance samples (R, F), given
    the bin of every importance sample (``inverse_cdf_kernel``), and far (R,) -> the compositing input:
    flat (R*(S+F)) t_all, order and deltas, the numbers of ``merge_kernel`` (order indexes
    [coarse | fine], ties put the coarse sample first) and ``deltas_kernel``. ``merge_fine`` says how.
    """
    n_fine = t_fine.shape[1]
    for ray in range(t.shape[0]):
        merge = merge_start(ray, t.shape[1] + n_fine)
        for j in range(n_fine):
            merge_fine(t, t_all, order, ray, merge, bins[ray, j], t_fine[ray, j], j)
        merge_finish(t, t_all, order, deltas, ray, merge, far[ray])


@ti.kernel
def importance_merge_kernel(
    t: f32_2d,
    weights: f32_2d,
    near: f32_1d,
    far: f32_1d,
    mixed_key: ti.u32,
    use_jitter: ti.i32,
    t_fine: f32_2d,
    t_all: f32_1d,
    order: i64_1d,
    deltas: f32_1d,
):
    """``inverse_cdf_kernel`` then ``merge_binned_kernel`` in one pass per ray: each importance sample
    is merged as soon as the walk has placed it, from the walk's own bin, so the bins are never stored
    and the ray's samples are still in cache. (R, S) t, weights, near, far (R,) -> (R, F) t_fine and
    flat (R*(S+F)) t_all, order and deltas, bit for bit the numbers of the two kernels."""
    n_fine = t_fine.shape[1]
    for ray in range(t.shape[0]):
        walk = walk_start(t, weights, ray, near[ray], far[ray], n_fine)
        merge = merge_start(ray, t.shape[1] + n_fine)
        for j in range(n_fine):
            sample = walk_to(t, weights, ray, j, n_fine, mixed_key, use_jitter, walk)
            t_fine[ray, j] = sample
            merge_fine(t, t_all, order, ray, merge, walk.bin, sample, j)
        merge_finish(t, t_all, order, deltas, ray, merge, far[ray])


@ti.func
def merge_step(
    t_a: ti.template(), t_b: ti.template(), t_all: ti.template(), order: ti.template(), ray, k, i, j, a, b
):
    """Emit output k of one ray's merge from the list heads a = t_a[i], b = t_b[j]; return the new state.

    Ties take ``a`` (a stable merge); an exhausted list's head is +inf. Branch-free: which list to
    take is data-dependent and would be mispredicted half the time.
    """
    n_a = t_a.shape[1]
    n_b = t_b.shape[1]
    take_a = a <= b
    t_all[ray, k] = ti.select(take_a, a, b)
    order[ray, k] = ti.select(take_a, i, n_a + j)
    i_next = ti.select(take_a, i + 1, i)
    j_next = ti.select(take_a, j, j + 1)
    a_next = ti.select(i_next < n_a, t_a[ray, ti.min(i_next, n_a - 1)], ti.math.inf)
    b_next = ti.select(j_next < n_b, t_b[ray, ti.min(j_next, n_b - 1)], ti.math.inf)
    return i_next, j_next, a_next, b_next


@ti.kernel
def merge_kernel(t_a: f32_2d, t_b: f32_2d, t_all: f32_2d, order: i64_2d, half: ti.i32):
    """Stable two-list merge per ray, for any two sorted lists: (R, S), (R, F) -> (R, S+F) sorted and
    source indices (into [t_a | t_b]).

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
        i0, j0, a0, b0 = 0, 0, t_a[ray0, 0], t_b[ray0, 0]
        i1, j1, a1, b1 = 0, 0, t_a[ray1, 0], t_b[ray1, 0]
        for k in range(width):
            i0, j0, a0, b0 = merge_step(t_a, t_b, t_all, order, ray0, k, i0, j0, a0, b0)
            i1, j1, a1, b1 = merge_step(t_a, t_b, t_all, order, ray1, k, i1, j1, a1, b1)


@ti.kernel
def deltas_kernel(t: f32_1d, far: f32_1d, deltas: f32_1d, n_samples: ti.i32):
    """Flat t (R*S), far (R,) -> flat deltas (R*S): ``interval`` to the next sample (the last: to far)."""
    for ray in range(far.shape[0]):
        row_intervals(t, deltas, ray * n_samples, n_samples, far[ray])


@ti.kernel
def deltas_lanes(t: lanes_1d, far: f32_1d, deltas: lanes_1d, chunks: ti.i32):
    """``deltas_kernel`` 8 samples at a time, for x64 (``renderer.lanes``): lanes of t (R*S/8), far (R,)
    -> lanes of deltas (R*S/8), bit for bit."""
    for ray in range(far.shape[0]):
        end = ray * chunks + chunks
        for c in range(ray * chunks, end):
            here = t[c]
            after = far[ray]
            if c + 1 < end:
                after = t[c + 1][0]
            deltas[c] = interval(here, shift_down(here, 1, after))


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
    _check_importance(t, weights, n_samples, near, far)
    n_rays = t.shape[0]
    device = kernel_device()
    t_fine = torch.empty((n_rays, n_samples), device=device)
    bins = torch.empty((n_rays, n_samples), dtype=torch.int32, device=device)
    if n_rays > 0:
        launch(
            "sample_importance", inverse_cdf_kernel,
            to_kernel(t), to_kernel(weights), to_kernel(near), to_kernel(far), _mixed_key(generator),
            int(generator is not None), t_fine, bins,
        )  # fmt: skip
    return t_fine.to(t.device)


def sample_importance_and_merge(
    t: torch.Tensor,
    weights: torch.Tensor,
    n_samples: int,
    near: torch.Tensor,
    far: torch.Tensor,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``sample_importance``, then ``merge_samples_with_deltas(t, t_fine, far)``, without the merge's
    search: -> t_fine (R, F), t_all (R, S+F), order (R, S+F) int64, deltas (R, S+F); the same numbers
    as the two calls with the same generator state. One launch of ``importance_merge_kernel``: each
    importance sample is merged by its bin as soon as the walk has placed it, then each ray's interval
    lengths follow.

    >>> t = torch.tensor([[0.5, 1.5, 2.5, 3.5]]); w = torch.tensor([[0.0, 0.0, 1.0, 0.0]])
    >>> near, far = torch.tensor([0.0]), torch.tensor([4.0])
    >>> t_fine, t_all, order, deltas = sample_importance_and_merge(t, w, 2, near, far)
    >>> order, deltas
    (tensor([[0, 1, 4, 2, 5, 3]]), tensor([[1.0000, 0.7500, 0.2500, 0.2500, 0.7500, 0.5000]]))
    """
    _check_importance(t, weights, n_samples, near, far)
    n_rays, width = t.shape[0], t.shape[1] + n_samples
    device = kernel_device()
    t_fine = torch.empty((n_rays, n_samples), device=device)
    t_all = torch.empty((n_rays, width), device=device)
    order = torch.empty((n_rays, width), dtype=torch.int64, device=device)
    deltas = torch.empty((n_rays, width), device=device)
    if n_rays > 0:
        launch(
            "sample_importance_and_merge", importance_merge_kernel,
            to_kernel(t), to_kernel(weights), to_kernel(near), to_kernel(far), _mixed_key(generator),
            int(generator is not None), t_fine, t_all.view(-1), order.view(-1), deltas.view(-1),
        )  # fmt: skip
    return tuple(x.to(t.device) for x in (t_fine, t_all, order, deltas))


def _check_importance(
    t: torch.Tensor, weights: torch.Tensor, n_samples: int, near: torch.Tensor, far: torch.Tensor
) -> None:
    _check_rays(near, far)
    if t.dim() != 2 or weights.shape != t.shape or t.shape[0] != near.shape[0]:
        raise ValueError(
            f"t and weights must both have shape (R, S) with R = {near.shape[0]} rays; got "
            f"{tuple(t.shape)} and {tuple(weights.shape)}."
        )
    if n_samples < 1 or t.shape[1] < 1:
        raise ValueError(f"need at least one coarse and one fine sample; got {t.shape[1]} and {n_samples}.")


def merge_samples(t_a: torch.Tensor, t_b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Merge two per-ray sorted sample lists: (R, S), (R, F) -> t_all (R, S+F), order (R, S+F) int64.

    ``order`` indexes ``torch.cat([t_a, t_b], 1)``; ties keep ``t_a``'s sample first (stable). An
    O(S+F) merge per ray, not a sort.

    >>> merge_samples(torch.tensor([[0.0, 2.0]]), torch.tensor([[1.0]]))
    (tensor([[0., 1., 2.]]), tensor([[0, 2, 1]]))
    """
    t_all, order = _merge(t_a, t_b)
    return t_all.to(t_a.device), order.to(t_a.device)


def merge_samples_with_deltas(
    t_a: torch.Tensor, t_b: torch.Tensor, far: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``merge_samples``, then ``sample_deltas`` of the merged list (two launches, no round trip through
    the caller's device): (R, S), (R, F), far (R,) -> t_all (R, S+F), order (R, S+F) int64, deltas
    (R, S+F).

    >>> merge_samples_with_deltas(torch.tensor([[0.0, 2.0]]), torch.tensor([[1.0]]), torch.tensor([4.0]))
    (tensor([[0., 1., 2.]]), tensor([[0, 2, 1]]), tensor([[1., 1., 2.]]))
    """
    if far.shape != (t_a.shape[0],):
        raise ValueError(f"far must have shape ({t_a.shape[0]},); got {tuple(far.shape)}.")
    t_all, order = _merge(t_a, t_b)
    deltas = _intervals(t_all, to_kernel(far), "merge_samples_with_deltas.deltas")
    return tuple(x.to(t_a.device) for x in (t_all, order, deltas))


def _merge(t_a: torch.Tensor, t_b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``merge_kernel`` after the argument checks: -> t_all, order on the kernel device."""
    if t_a.dim() != 2 or t_b.dim() != 2 or t_a.shape[0] != t_b.shape[0]:
        raise ValueError(
            f"merge_samples needs two (R, S) and (R, F) tensors with the same R; got {tuple(t_a.shape)} "
            f"and {tuple(t_b.shape)}."
        )
    n_rays, width = t_a.shape[0], t_a.shape[1] + t_b.shape[1]
    device = kernel_device()
    t_all = torch.empty((n_rays, width), device=device)
    order = torch.empty((n_rays, width), dtype=torch.int64, device=device)
    if n_rays > 0 and t_a.shape[1] > 0 and t_b.shape[1] > 0:
        launch("merge_samples", merge_kernel, to_kernel(t_a), to_kernel(t_b), t_all, order, (n_rays + 1) // 2)
    elif n_rays > 0:  # one list is empty: the other is already the merge
        t_all.copy_(to_kernel(t_a if t_a.shape[1] else t_b))
        order.copy_(torch.arange(width, device=device).expand(n_rays, width))
    return t_all, order


def sample_deltas(t_all: torch.Tensor, far: torch.Tensor) -> torch.Tensor:
    """Interval lengths: t (R, S), far (R,) -> deltas (R, S), ``t[i+1] - t[i]`` and last ``far - t[-1]``
    (never negative).

    >>> sample_deltas(torch.tensor([[1.0, 1.5, 3.0]]), torch.tensor([4.0]))
    tensor([[0.5000, 1.5000, 1.0000]])
    """
    if t_all.dim() != 2 or far.shape != (t_all.shape[0],):
        raise ValueError(
            f"sample_deltas needs t (R, S) and far (R,); got {tuple(t_all.shape)} and {tuple(far.shape)}."
        )
    return _intervals(to_kernel(t_all), to_kernel(far), "sample_deltas").to(t_all.device)


def _intervals(t_all: torch.Tensor, far: torch.Tensor, name: str) -> torch.Tensor:
    """Interval lengths of a contiguous kernel-device (R, S) t_all, far (R,) -> (R, S) deltas on the
    kernel device: ``deltas_lanes`` on x64 when S is a multiple of 8 and the data is aligned, else
    ``deltas_kernel`` (the same numbers)."""
    deltas = torch.empty(t_all.shape, device=kernel_device())
    if t_all.numel() == 0:
        return deltas
    width = t_all.shape[1]
    if width % LANES == 0 and lanes_active() and aligned(t_all, deltas):
        launch(name, deltas_lanes, as_lanes(t_all), far, as_lanes(deltas), width // LANES)
    else:
        launch(name, deltas_kernel, t_all.view(-1), far, deltas.view(-1), width)
    return deltas
