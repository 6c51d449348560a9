"""Packing sample lists on the Taichi device: the kernels that turn dense (R, S) sample rows with a keep
flag into packed (ragged) lists and back, for a chain of kernels that never leaves ``ti.ndarray``s.

``renderer.occupancy`` marches into a dense keep flag and lets torch pack it (``nonzero``); on a Vulkan
or Metal GPU without torch, each of those torch steps would copy the arrays to the host and back. These
kernels do the same bookkeeping on the device:

    launch("count_kept", count_kept_kernel, keep, counts)                 # (R * S) u8 -> (R,) i32
    launch("exclusive_scan", exclusive_scan_kernel, counts, offsets, block_sums, total)
    n = int(total.to_numpy()[0])                                           # the one number the host needs
    launch("pack_kept", pack_kept_kernel, keep, t, deltas, offsets, index, t_out, deltas_out, ray_out,
           slot_out)

Packed arrays are sized to a *capacity* (``capacity(n)``, a few size classes, so a training loop reuses
its buffers instead of allocating new ones whenever the count changes); rows from n to the capacity
are padding, which the kernels here fill with harmless values (points at the origin, gradients zero), so
that a network run over the padded rows adds nothing to any gradient. Layout as ``renderer.packed``:
ray r owns entries ``offsets[r] .. offsets[r] + counts[r] - 1``, in depth order.

Every kernel writes every element of the arrays it writes (on Vulkan an argument a kernel only writes
is not copied in; docs/TAICHI.md).
"""

import math

import taichi as ti

from renderer.occupancy import cell_of

f32_1d = ti.types.ndarray(dtype=ti.f32, ndim=1)
f32_2d = ti.types.ndarray(dtype=ti.f32, ndim=2)
i32_1d = ti.types.ndarray(dtype=ti.i32, ndim=1)
i64_1d = ti.types.ndarray(dtype=ti.i64, ndim=1)
u8_1d = ti.types.ndarray(dtype=ti.u8, ndim=1)

SCAN_BLOCK = 256  # rays per thread in the scan's first and last passes
MIN_CAPACITY = 256


def capacity(n: int) -> int:
    """The buffer size for ``n`` packed entries: the next of the size classes ``2^(k/8)``, rounded up to
    a multiple of 256 (at most 9 % padding; ``MIN_CAPACITY`` at least).

    >>> capacity(0), capacity(256), capacity(1000), capacity(100_000)
    (256, 256, 1024, 101120)
    """
    if n <= MIN_CAPACITY:
        return MIN_CAPACITY
    size = 2.0 ** (math.ceil(8.0 * math.log2(n) - 1e-9) / 8.0)
    return max(n, math.ceil(size / 256.0) * 256)


def scan_blocks(n_rays: int) -> int:
    """Length of the ``block_sums`` scratch array ``exclusive_scan_kernel`` needs for ``n_rays``."""
    return max(1, -(-n_rays // SCAN_BLOCK))


@ti.kernel
def count_kept_kernel(keep: u8_1d, counts: i32_1d):
    """counts[r] = number of set flags in keep[r * S .. r * S + S - 1]: keep (R * S), counts (R,)."""
    width = keep.shape[0] // counts.shape[0]
    for ray in range(counts.shape[0]):
        n = 0
        for s in range(width):
            n += ti.cast(keep[ray * width + s] != 0, ti.i32)
        counts[ray] = n


@ti.kernel
def add_counts_kernel(a: i32_1d, b: i32_1d, out: i32_1d):
    """out = a + b element-wise (the merged list holds each ray's kept coarse and fine samples)."""
    for r in range(out.shape[0]):
        out[r] = a[r] + b[r]


@ti.kernel
def exclusive_scan_kernel(counts: i32_1d, offsets: i32_1d, block_sums: i32_1d, total: i32_1d):
    """offsets = exclusive prefix sum of counts (R,), total[0] = their sum; block_sums (scan_blocks(R),)
    is scratch. Three passes, one launch (Taichi runs a kernel's top-level loops in order): a serial
    scan inside each block of ``SCAN_BLOCK`` rays, a serial scan of the block sums, and the block
    offsets added back; so no thread walks more than max(SCAN_BLOCK, R / SCAN_BLOCK) entries."""
    n = counts.shape[0]
    for b in range(block_sums.shape[0]):
        running = 0
        for k in range(SCAN_BLOCK):
            r = b * SCAN_BLOCK + k
            if r < n:
                offsets[r] = running
                running += counts[r]
        block_sums[b] = running
    for _ in range(1):
        running = 0
        for b in range(block_sums.shape[0]):
            size = block_sums[b]
            block_sums[b] = running
            running += size
        total[0] = running
    for r in range(n):
        offsets[r] += block_sums[r // SCAN_BLOCK]


@ti.kernel
def pack_kept_kernel(
    keep: u8_1d, t: f32_1d, deltas: f32_1d, offsets: i32_1d,
    index: i32_1d, t_out: f32_1d, deltas_out: f32_1d, ray_out: i32_1d, slot_out: i32_1d,
):  # fmt: skip
    """The kept entries of dense rows (R * S) packed from ``offsets``: t, deltas, their ray and dense
    slot (r * S + s); ``index`` (R * S) maps each dense slot to its packed entry (-1: not kept).
    Padding rows (past the last kept entry, up to the capacity) get t = deltas = 0, ray 0, slot -1."""
    n_rays = offsets.shape[0]
    width = keep.shape[0] // n_rays
    for i in range(t_out.shape[0]):
        t_out[i] = 0.0
        deltas_out[i] = 0.0
        ray_out[i] = 0
        slot_out[i] = -1
    for ray in range(n_rays):
        j = offsets[ray]
        for s in range(width):
            slot = ray * width + s
            if keep[slot] != 0:
                t_out[j] = t[slot]
                deltas_out[j] = deltas[slot]
                ray_out[j] = ray
                slot_out[j] = slot
                index[slot] = j
                j += 1
            else:
                index[slot] = -1


@ti.kernel
def packed_points_kernel(origins: f32_2d, directions: f32_2d, t: f32_1d, ray: i32_1d, n_valid: ti.i32,
                         points: f32_2d):  # fmt: skip
    """points[i] = o + t d of entry i's ray, for i < n_valid; the origin for padding rows."""
    for i in range(points.shape[0]):
        r = ray[i]
        for a in ti.static(range(3)):
            value = 0.0
            if i < n_valid:
                value = origins[r, a] + t[i] * directions[r, a]
            points[i, a] = value


@ti.kernel
def row_identity_kernel(identity: i64_1d, ray: i32_1d, out: i64_1d):
    """out[i] = identity[ray[i]]: the latent-table row of each packed entry's ray (padding: ray 0's)."""
    for i in range(out.shape[0]):
        out[i] = identity[ray[i]]


@ti.kernel
def sum_rows_per_ray_kernel(rows: f32_2d, offsets: i32_1d, counts: i32_1d, out: f32_2d):
    """out[r] = sum of rows[offsets[r] .. offsets[r] + counts[r] - 1]: packed (cap, C) -> (R, C). A ray's
    samples' latent gradients summed before one scatter into the table per ray (as the dense path's
    ``repeat``), instead of one atomic add per sample into a few shared table rows."""
    for ray, c in ti.ndrange(out.shape[0], out.shape[1]):
        total = 0.0
        for i in range(offsets[ray], offsets[ray] + counts[ray]):
            total += rows[i, c]
        out[ray, c] = total


@ti.kernel
def coarse_weights_kernel(
    weights: f32_1d, t: f32_1d, slot: i32_1d, offsets: i32_1d, counts: i32_1d, kept: i32_1d,
    dense: f32_2d, cut: f32_1d,
):  # fmt: skip
    """Packed coarse weights -> dense rows (R, S) with zeros where samples were skipped, and each ray's
    cut-off depth: the depth of its first coarse sample not composited (early stop), +inf if none."""
    n_samples = dense.shape[1]
    for ray, s in ti.ndrange(dense.shape[0], n_samples):
        dense[ray, s] = 0.0
    for ray in range(offsets.shape[0]):
        first = offsets[ray]
        for k in range(counts[ray]):
            i = first + k
            dense[ray, slot[i] - ray * n_samples] = weights[i]
        depth = ti.math.inf
        if kept[ray] < counts[ray]:
            depth = t[first + kept[ray]]
        cut[ray] = depth


@ti.kernel
def fine_keep_kernel(
    origins: f32_2d, directions: f32_2d, near: f32_1d, far: f32_1d, t_fine: f32_2d, cut: f32_1d,
    occupied: u8_1d, radius: ti.f32, res: ti.i32, keep: u8_1d,
):  # fmt: skip
    """Whether each importance sample (R, F) is evaluated: its cell is occupied, it lies before the ray's
    coarse cut-off, and the ray meets the sphere -> keep flat (R * F)."""
    n_fine = t_fine.shape[1]
    for ray, f in ti.ndrange(t_fine.shape[0], n_fine):
        d = t_fine[ray, f]
        cell = cell_of(origins[ray, 0] + d * directions[ray, 0], origins[ray, 1] + d * directions[ray, 1],
                       origins[ray, 2] + d * directions[ray, 2], radius, res)  # fmt: skip
        flag = occupied[cell] != 0 and d < cut[ray] and far[ray] > near[ray]
        keep[ray * n_fine + f] = ti.cast(flag, ti.u8)


@ti.kernel
def merge_packed_kernel(
    order: i64_1d, coarse_index: i32_1d, fine_index: i32_1d, t_all: f32_1d, deltas_all: f32_1d,
    sigma_c: f32_2d, rgb_c: f32_2d, sigma_f: f32_2d, rgb_f: f32_2d, offsets: i32_1d, n_coarse: ti.i32,
    sigma: f32_1d, rgb: f32_1d, t: f32_1d, deltas: f32_1d, slot: i32_1d, source: i32_1d,
):  # fmt: skip
    """The kept samples of each ray's merged list (order flat (R * W): merged slot -> coarse bin, or
    n_coarse + fine index) packed from ``offsets``, in merged order, with the merged list's depths and
    intervals and the field's outputs. ``coarse_index`` (R * S) / ``fine_index`` (R * F) map a ray's
    samples to their packed evaluations (-1: skipped). ``slot`` is the dense merged slot (r * W + m);
    ``source`` the evaluation it came from: a coarse row c as c, a fine row f as -1 - f. Padding: zeros,
    slot -1, source 0."""
    n_rays = offsets.shape[0]
    width = order.shape[0] // n_rays
    n_fine = width - n_coarse
    for i in range(t.shape[0]):
        sigma[i] = 0.0
        for c in ti.static(range(3)):
            rgb[3 * i + c] = 0.0
        t[i] = 0.0
        deltas[i] = 0.0
        slot[i] = -1
        source[i] = 0
    for ray in range(n_rays):
        j = offsets[ray]
        for m in range(width):
            merged = ray * width + m
            origin = ti.cast(order[merged], ti.i32)
            row = -1
            if origin < n_coarse:
                row = coarse_index[ray * n_coarse + origin]
            else:
                row = fine_index[ray * n_fine + origin - n_coarse]
            if row >= 0:
                t[j] = t_all[merged]
                deltas[j] = deltas_all[merged]
                slot[j] = merged
                if origin < n_coarse:
                    source[j] = row
                    sigma[j] = sigma_c[row, 0]
                    for c in ti.static(range(3)):
                        rgb[3 * j + c] = rgb_c[row, c]
                else:
                    source[j] = -1 - row
                    sigma[j] = sigma_f[row, 0]
                    for c in ti.static(range(3)):
                        rgb[3 * j + c] = rgb_f[row, c]
                j += 1


@ti.kernel
def packed_to_dense_kernel(values: f32_1d, slot: i32_1d, dense: f32_1d):
    """dense (R * W) = 0, then dense[slot[i]] = values[i] for every packed entry (slot -1: padding)."""
    for k in range(dense.shape[0]):
        dense[k] = 0.0
    for i in range(values.shape[0]):
        if slot[i] >= 0:
            dense[slot[i]] = values[i]


@ti.kernel
def dense_to_packed_kernel(dense: f32_1d, slot: i32_1d, values: f32_1d):
    """values[i] = dense[slot[i]] (0 for padding): the inverse of ``packed_to_dense_kernel``."""
    for i in range(values.shape[0]):
        value = 0.0
        if slot[i] >= 0:
            value = dense[slot[i]]
        values[i] = value


@ti.kernel
def split_packed_grads_kernel(
    source: i32_1d, slot: i32_1d, grad_sigma: f32_1d, grad_rgb: f32_1d,
    grad_sigma_c: f32_2d, grad_rgb_c: f32_2d, grad_sigma_f: f32_2d, grad_rgb_f: f32_2d,
):  # fmt: skip
    """Gradients of the merged packed list back to the evaluations they came from (``source`` as
    ``merge_packed_kernel`` writes it); rows no merged entry came from (padding) get zeros."""
    for i in range(grad_sigma_c.shape[0]):
        grad_sigma_c[i, 0] = 0.0
        for c in ti.static(range(3)):
            grad_rgb_c[i, c] = 0.0
    for i in range(grad_sigma_f.shape[0]):
        grad_sigma_f[i, 0] = 0.0
        for c in ti.static(range(3)):
            grad_rgb_f[i, c] = 0.0
    for i in range(grad_sigma.shape[0]):
        if slot[i] >= 0:
            src = source[i]
            if src >= 0:
                grad_sigma_c[src, 0] = grad_sigma[i]
                for c in ti.static(range(3)):
                    grad_rgb_c[src, c] = grad_rgb[3 * i + c]
            else:
                grad_sigma_f[-1 - src, 0] = grad_sigma[i]
                for c in ti.static(range(3)):
                    grad_rgb_f[-1 - src, c] = grad_rgb[3 * i + c]


@ti.kernel
def mark_and_observe_kernel(
    origins: f32_2d, directions: f32_2d, t: f32_1d, sigma: f32_1d, weights: f32_1d, offsets: i32_1d,
    counts: i32_1d, min_weight: ti.f32, radius: ti.f32, res: ti.i32, used: u8_1d, observed: f32_1d,
):  # fmt: skip
    """For a training step's packed samples: flag the cells whose samples carry weight above
    ``min_weight`` (as ``renderer.occupancy.mark_used_kernel``) and keep, per cell, the largest density
    seen (NaN counts as +inf, so a cell with an unknown density stays occupied); ``used`` (C,) and
    ``observed`` (C,) are read and updated in place."""
    for ray in range(offsets.shape[0]):
        ox, oy, oz = origins[ray, 0], origins[ray, 1], origins[ray, 2]
        dx, dy, dz = directions[ray, 0], directions[ray, 1], directions[ray, 2]
        for i in range(offsets[ray], offsets[ray] + counts[ray]):
            d = t[i]
            cell = cell_of(ox + d * dx, oy + d * dy, oz + d * dz, radius, res)
            if weights[i] > min_weight and used[cell] == 0:
                used[cell] = ti.u8(1)
            value = sigma[i]
            if value != value:
                value = ti.math.inf
            ti.atomic_max(observed[cell], value)
