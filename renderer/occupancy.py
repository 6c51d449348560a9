"""An occupancy grid over the cube around the render sphere, and ray marching through it into packed
samples, as Taichi kernels (after nerfacc's ``OccGridEstimator``, ``nerfacc/estimators/occ_grid.py``).

    grid = OccupancyGrid(resolution=64, radius=2.0)
    grid.update(density_fn, generator=g, warmup=step < 256)   # density_fn: points (M, 3) -> sigma (M,)
    packed = grid.march(rays, n_samples=32, generator=g)  # PackedSamples(t, deltas, offsets, counts, bins)
    grid.mark_used(rays, packed.t, packed.offsets, packed.counts, weights)   # training rays' weights

The grid covers [-radius, radius]^3 in resolution^3 cells; cell (i, j, k) along (x, y, z) has flat index
``(i * res + j) * res + k``. It keeps, per cell, a float32 density estimate (an exponential moving
average: ``max(decay * old, new)``, as nerfacc) and one byte ``occupied``, which is what marching reads.
A cell is occupied when its estimate exceeds ``min(threshold, mean of all estimates)`` (nerfacc's rule,
so a field that is faint everywhere still keeps its densest cells), during warm-up (every cell), or when
a training ray's weights used it since the last update (``mark_used``: the grid never drops a cell that
the rendering still relies on); with ``dilate`` (the default) the neighbours of such cells are occupied
too. Dilation is not in nerfacc: one jittered point per cell and update can miss a dense part of a
cell on a surface's soft edge, and dropping it loses that surface's fringe (the grazing rays of a test
ball lost up to 0.08 of colour with 3 updates and no dilation; tests/test_skip_empty.py), so the grid
errs on the side of keeping samples. ``threshold`` is the density whose opacity over one ``step`` is
``min_alpha`` (nerfacc's ``occ_thre`` 0.01 applies to ``density * render_step_size``).

Marching places the same stratified samples as ``renderer.sample_stratified`` (same bins, same hashed
jitter from the same generator state) and keeps those whose point lies in an occupied cell; each kept
sample keeps the interval length it has in the full list (``sample_deltas``). Dropping a sample
therefore means taking its density as zero: with every cell occupied, marching gives exactly the dense
samples. Rays that miss the sphere (near == far) get no samples.

The field is the caller's: ``update`` takes any function of points (``renderer`` never imports
``models``). Every function is one or two kernel launches; nothing here carries gradients.
"""

import math
from collections.abc import Callable

import taichi as ti
import torch

from renderer.backend import kernel_device, launch, to_kernel
from renderer.sampling import hash_uniform
from renderer.specs import PackedSamples, Rays, draw_key, mix_key, occupancy_cells, offsets_from_counts

f32_1d = ti.types.ndarray(dtype=ti.f32, ndim=1)
f32_2d = ti.types.ndarray(dtype=ti.f32, ndim=2)
i32_1d = ti.types.ndarray(dtype=ti.i32, ndim=1)
u8_1d = ti.types.ndarray(dtype=ti.u8, ndim=1)


@ti.func
def cell_of(x, y, z, radius, res):
    """Flat index of the cell holding point (x, y, z); points outside the cube clamp to its border."""
    scale = res / (2.0 * radius)
    i = ti.min(ti.max(ti.cast(ti.floor((x + radius) * scale), ti.i32), 0), res - 1)
    j = ti.min(ti.max(ti.cast(ti.floor((y + radius) * scale), ti.i32), 0), res - 1)
    k = ti.min(ti.max(ti.cast(ti.floor((z + radius) * scale), ti.i32), 0), res - 1)
    return (i * res + j) * res + k


@ti.kernel
def cell_points_kernel(
    cells: i32_1d, mixed_key: ti.u32, use_jitter: ti.i32, radius: ti.f32, res: ti.i32, points: f32_2d
):
    """(M,) flat cell indices -> (M, 3) points, uniform in each cell (hashed ``3 m + d``), or its centre."""
    size = 2.0 * radius / res
    for m in range(cells.shape[0]):
        c = cells[m]
        i = c // (res * res)
        j = (c - i * res * res) // res
        k = c - (i * res + j) * res
        for d in ti.static(range(3)):
            u = 0.5
            if use_jitter:
                u = hash_uniform(3 * m + d, mixed_key)
            index = i if d == 0 else (j if d == 1 else k)
            points[m, d] = -radius + size * (ti.cast(index, ti.f32) + u)


@ti.kernel
def update_kernel(cells: i32_1d, values: f32_1d, decay: ti.f32, density: f32_1d):
    """density[cells[m]] = max(decay * density[cells[m]], values[m]); cells are distinct (no race)."""
    for m in range(cells.shape[0]):
        c = cells[m]
        density[c] = ti.max(density[c] * decay, values[m])


@ti.kernel
def binarize_kernel(
    density: f32_1d,
    threshold: ti.f32,
    warmup: ti.i32,
    res: ti.i32,
    dilate: ti.i32,
    used: u8_1d,
    core: u8_1d,
    occupied: u8_1d,
):
    """core = warm-up | density > threshold | used since the last update (then ``used`` is cleared);
    occupied = core, grown by one cell in every direction (26 neighbours) when ``dilate`` is set. The
    two loops run one after the other (two tasks of one launch)."""
    for c in range(density.shape[0]):
        keep = warmup != 0 or density[c] > threshold or used[c] != 0
        core[c] = ti.cast(keep, ti.u8)
        used[c] = ti.u8(0)
    for c in range(density.shape[0]):
        hit = core[c]
        if dilate:
            i = c // (res * res)
            j = (c - i * res * res) // res
            k = c - (i * res + j) * res
            for di, dj, dk in ti.ndrange((-1, 2), (-1, 2), (-1, 2)):
                a, b, e = i + di, j + dj, k + dk
                if 0 <= a < res and 0 <= b < res and 0 <= e < res:
                    hit = hit | core[(a * res + b) * res + e]
        occupied[c] = hit


@ti.func
def stratified_t(lo, bin_width, first, s, mixed_key, use_jitter):
    """Sample s of a ray as ``renderer.sample_stratified`` places it (same arithmetic, same hash)."""
    u = 0.5
    if use_jitter:
        u = hash_uniform(first + s, mixed_key)
    return lo + bin_width * (s + u)


@ti.kernel
def march_kernel(
    origins: f32_2d,
    directions: f32_2d,
    near: f32_1d,
    far: f32_1d,
    occupied: u8_1d,
    mixed_key: ti.u32,
    use_jitter: ti.i32,
    n_samples: ti.i32,
    radius: ti.f32,
    res: ti.i32,
    t_out: f32_1d,
    deltas_out: f32_1d,
    keep_out: u8_1d,
):
    """Every stratified sample of each ray in the dense (R * S) layout: its depth (as
    ``renderer.sample_stratified``), its interval in the full list (as ``sample_deltas``, clamped at 0)
    and whether its cell is occupied (never for a ray that misses the sphere). One launch; the caller
    packs the kept ones. Every element is written (on Vulkan an argument a kernel only writes is not
    copied in, docs/TAICHI.md)."""
    for ray in range(near.shape[0]):
        lo, hi = near[ray], far[ray]
        ox, oy, oz = origins[ray, 0], origins[ray, 1], origins[ray, 2]
        dx, dy, dz = directions[ray, 0], directions[ray, 1], directions[ray, 2]
        bin_width = (hi - lo) / n_samples
        first = ray * n_samples
        current = stratified_t(lo, bin_width, first, 0, mixed_key, use_jitter)
        for s in range(n_samples):
            # The next sample is recomputed (not looked up) so that a kept sample's interval is the one it
            # has in the full list, whether or not the next sample is kept.
            after = hi
            if s + 1 < n_samples:
                after = stratified_t(lo, bin_width, first, s + 1, mixed_key, use_jitter)
            keep = 0
            if hi > lo:
                cell = cell_of(ox + current * dx, oy + current * dy, oz + current * dz, radius, res)
                keep = ti.cast(occupied[cell] != 0, ti.i32)
            t_out[first + s] = current
            deltas_out[first + s] = ti.max(after - current, 0.0)
            keep_out[first + s] = ti.cast(keep, ti.u8)
            current = after


@ti.kernel
def mark_used_kernel(
    origins: f32_2d,
    directions: f32_2d,
    t: f32_1d,
    offsets: i32_1d,
    counts: i32_1d,
    weights: f32_1d,
    min_weight: ti.f32,
    radius: ti.f32,
    res: ti.i32,
    used: u8_1d,
):
    """used[cell of every packed sample whose weight exceeds min_weight] = 1 (racing writes of one
    value, so no atomics are needed). The kernel reads ``used`` before it writes: on Vulkan an argument
    a kernel only writes is not copied in, and the cells it leaves alone would come back as garbage
    (docs/TAICHI.md); the read also spares the writes to cells already flagged."""
    for ray in range(offsets.shape[0]):
        ox, oy, oz = origins[ray, 0], origins[ray, 1], origins[ray, 2]
        dx, dy, dz = directions[ray, 0], directions[ray, 1], directions[ray, 2]
        for i in range(offsets[ray], offsets[ray] + counts[ray]):
            if weights[i] > min_weight:
                d = t[i]
                cell = cell_of(ox + d * dx, oy + d * dy, oz + d * dz, radius, res)
                if used[cell] == 0:
                    used[cell] = ti.u8(1)


def _mixed_key(generator: torch.Generator | None) -> int:
    return 0 if generator is None else mix_key(draw_key(generator))


class OccupancyGrid:
    """Occupancy of the cube [-radius, radius]^3 (the render sphere's bounding cube), for skipping empty
    space; state on the renderer's kernel device, one byte per cell for marching.

    resolution: cells per axis (64 -> 262,144 cells, 128 -> 2,097,152); radius: the render sphere's;
    min_alpha, step: a cell is occupied when its density's opacity over ``step`` (default: one cell) is
    above ``min_alpha``; decay: the moving average's factor per update; dilate: also occupy the 26
    neighbours of every occupied cell.
    Fresh grids are all occupied (nothing is known yet), so marching an unestimated grid loses nothing.

    >>> grid = OccupancyGrid(resolution=4, radius=1.0)
    >>> _ = grid.update(lambda p: (p.norm(dim=1) < 0.5).float() * 100.0, fraction=1.0)  # every cell
    >>> int(grid.core.sum()), int(grid.occupied.sum())   # the 8 cells around the centre; dilated
    (8, 64)
    """

    def __init__(
        self,
        resolution: int = 64,
        radius: float = 2.0,
        min_alpha: float = 0.01,
        decay: float = 0.95,
        step: float | None = None,
        dilate: bool = True,
    ):
        if resolution < 1 or resolution > 1024:
            raise ValueError(f"resolution must be 1..1024 cells per axis, got {resolution}.")
        if not 0 <= min_alpha < 1:
            raise ValueError(f"min_alpha must be in [0, 1), got {min_alpha}.")
        self.resolution = int(resolution)
        self.radius = float(radius)
        self.decay = float(decay)
        self.dilate = bool(dilate)
        self.step = float(step) if step is not None else 2.0 * self.radius / self.resolution
        self.threshold = -math.log1p(-min_alpha) / self.step  # density with opacity min_alpha over step
        device = kernel_device()
        n_cells = self.resolution**3
        self.density = torch.zeros(n_cells, device=device)
        self.occupied = torch.ones(n_cells, dtype=torch.uint8, device=device)
        self.used = torch.zeros(n_cells, dtype=torch.uint8, device=device)
        self.core = torch.zeros(n_cells, dtype=torch.uint8, device=device)  # occupied before dilation

    @property
    def n_cells(self) -> int:
        return self.resolution**3

    def occupied_fraction(self) -> float:
        """Share of the cells marked occupied (a device sync)."""
        return float(self.occupied.float().mean())

    def occupied_at(self, points: torch.Tensor) -> torch.Tensor:
        """Whether each point lies in an occupied cell (outside the cube: its border cell):
        points (..., 3) -> (...) bool, on the points' device.

        >>> grid = OccupancyGrid(resolution=2, radius=1.0)   # fresh: every cell occupied
        >>> grid.occupied_at(torch.zeros(4, 3)).tolist()
        [True, True, True, True]
        """
        cells = occupancy_cells(points, self.resolution, self.radius).to(self.occupied.device)
        return (self.occupied[cells] != 0).to(points.device)

    def cell_points(self, cells: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """A uniform point in each cell (hashed from the generator), or the centres without one:
        cells (M,) flat indices -> points (M, 3) float32 on the kernel device."""
        cells_k = to_kernel(cells, torch.int32)
        points = torch.empty((cells_k.shape[0], 3), device=kernel_device())
        if cells_k.shape[0] > 0:
            launch(
                "occupancy_cell_points", cell_points_kernel, cells_k, _mixed_key(generator),
                int(generator is not None), self.radius, self.resolution, points,
            )  # fmt: skip
        return points

    def select_cells(self, fraction: float, generator: torch.Generator | None = None) -> torch.Tensor:
        """The cells an update evaluates: all for ``fraction >= 1``, else (nerfacc) a random ``fraction``
        of all cells plus as many random occupied ones, without repeats: -> (M,) int32 sorted. Warm-up
        does not change the choice (nerfacc evaluates every cell then; on a CPU that costs more than
        the steps it would save, and warm-up keeps every cell occupied anyway)."""
        device = kernel_device()
        if fraction >= 1:
            return torch.arange(self.n_cells, dtype=torch.int32, device=device)
        n_pick = max(1, int(fraction * self.n_cells))
        g = generator if generator is not None else torch.Generator(device=device).manual_seed(0)
        anywhere = torch.randperm(self.n_cells, generator=g, device=device)[:n_pick]
        occupied = torch.nonzero(self.occupied, as_tuple=True)[0]
        pick = torch.randperm(occupied.shape[0], generator=g, device=device)[:n_pick]
        return torch.unique(torch.cat([anywhere, occupied[pick]])).to(torch.int32)

    @torch.no_grad()
    def update(
        self,
        density_fn: Callable[[torch.Tensor], torch.Tensor],
        generator: torch.Generator | None = None,
        warmup: bool = False,
        fraction: float = 0.25,
        chunk: int = 65536,
        observed: torch.Tensor | None = None,
        reset: bool = False,
        combine: Callable[[torch.Tensor], None] | None = None,
    ) -> dict[str, float]:
        """Re-estimate the grid from ``density_fn`` (points (M, 3) -> density (M,), any torch device)
        at cell-jittered points, decay the old estimates, and re-mark the occupied cells.

        warmup: keep every cell occupied (the estimates are still updated); fraction: share of cells
        evaluated (plus as many occupied ones; 1: every cell); chunk: points per ``density_fn`` call
        (bounds memory); observed: (C,) densities already known per cell, negative where none is
        (the largest a training step's samples had there): folded in like evaluated values, so those
        cells are re-estimated without evaluating the field again.
        reset: forget the old estimates first (the new values replace them instead of ``max(decay *
        old, new)``), for a re-estimate once the field has formed.
        combine: called in place on the new value of every cell ((C,) float32, negative where this
        call has none) and on the used-cell flags (as float32) before they are folded in, e.g. a MAX
        all-reduce over the ranks of a distributed run: every rank then folds the same values into the
        same cells (the union of what each evaluated and observed) and marks the same cells.
        Cells that ``mark_used`` flagged since the last update stay occupied. Returns
        {"evaluated": cells evaluated, "observed": cells taken from ``observed``, "occupied": share of
        cells occupied after the update}.
        """
        cells = self.select_cells(fraction, generator)
        points = self.cell_points(cells, generator)
        values = torch.cat([
            density_fn(points[start:start + chunk]).reshape(-1).float().to(points.device)
            for start in range(0, points.shape[0], chunk)
        ])  # fmt: skip
        values = torch.nan_to_num(values, nan=float("inf")).contiguous()  # an unknown value: keep the cell
        n_evaluated, n_observed = cells.shape[0], 0
        if observed is not None or combine is not None:  # one value per cell: the largest known
            merged = (torch.full((self.n_cells,), -1.0, device=values.device) if observed is None
                      else observed.to(device=values.device, dtype=torch.float32).clone())
            n_observed = int((merged >= 0).sum())
            merged[cells.long()] = torch.maximum(merged[cells.long()], values)
            if combine is not None:
                combine(merged)
                used = self.used.float()
                combine(used)
                self.used = (used > 0).to(torch.uint8).contiguous()
            cells = torch.nonzero(merged >= 0, as_tuple=True)[0].to(torch.int32)
            values = merged[cells.long()].contiguous()
        if reset:
            self.density.zero_()
        launch("occupancy_update", update_kernel, cells, values, self.decay, self.density)
        threshold = min(self.threshold, float(self.density.mean()))
        launch("occupancy_binarize", binarize_kernel, self.density, threshold, int(warmup), self.resolution,
               int(self.dilate), self.used, self.core, self.occupied)  # fmt: skip
        return {"evaluated": float(n_evaluated), "observed": float(n_observed),
                "occupied": self.occupied_fraction()}

    @torch.no_grad()
    def mark_used(
        self,
        rays: Rays,
        t: torch.Tensor,
        offsets: torch.Tensor,
        counts: torch.Tensor,
        weights: torch.Tensor,
        min_weight: float = 1e-4,
    ) -> None:
        """Flag the cells of packed samples whose compositing weight exceeds ``min_weight``, so that the
        next ``update`` keeps them occupied: rays (R), t, weights (N,), offsets, counts (R,)."""
        if offsets.shape[0] == 0 or t.shape[0] == 0:
            return
        launch(
            "occupancy_mark_used", mark_used_kernel, to_kernel(rays.origins), to_kernel(rays.directions),
            to_kernel(t), to_kernel(offsets, torch.int32), to_kernel(counts, torch.int32), to_kernel(weights),
            float(min_weight), self.radius, self.resolution, self.used,
        )  # fmt: skip

    @torch.no_grad()
    def march(self, rays: Rays, n_samples: int, generator: torch.Generator | None = None) -> PackedSamples:
        """Stratified samples of each ray, kept only in occupied cells, packed (rays back to back):
        rays (R) -> PackedSamples(t (N,), deltas (N,), offsets (R,), counts (R,), bins (N,)).

        Same samples as ``renderer.sample_stratified(rays.near, rays.far, n_samples, generator)`` (same
        generator state) minus those in empty cells, with their full-list ``sample_deltas``.
        """
        return self.march_with_depths(rays, n_samples, generator)[0]

    @torch.no_grad()
    def march_with_depths(self, rays: Rays, n_samples: int, generator: torch.Generator | None = None
                          ) -> tuple[PackedSamples, torch.Tensor]:
        """``march`` and, from the same launch, every ray's dense stratified depths t (R, S): the
        numbers ``renderer.sample_stratified`` gives for that generator state (the importance sampler
        needs the whole list)."""
        if n_samples < 1:
            raise ValueError(f"n_samples must be at least 1, got {n_samples}.")
        device = kernel_device()
        n_rays = rays.near.shape[0]
        t_dense = torch.empty(n_rays * n_samples, device=device)
        deltas_dense = torch.empty(n_rays * n_samples, device=device)
        keep = torch.empty(n_rays * n_samples, dtype=torch.uint8, device=device)
        key = _mixed_key(generator)  # drawn even without rays: the generator advances alike for any batch
        if n_rays > 0:
            launch(
                "occupancy_march", march_kernel, to_kernel(rays.origins), to_kernel(rays.directions),
                to_kernel(rays.near), to_kernel(rays.far), self.occupied, key, int(generator is not None),
                int(n_samples), self.radius, self.resolution, t_dense, deltas_dense, keep,
            )  # fmt: skip
        slots = torch.nonzero(keep, as_tuple=True)[0]  # ray-major, bins ascending: the packed order
        counts = keep.view(n_rays, n_samples).sum(1, dtype=torch.int32)
        out = rays.near.device
        packed = PackedSamples(t_dense[slots].to(out), deltas_dense[slots].to(out),
                               offsets_from_counts(counts).to(out), counts.to(out),
                               (slots % n_samples).to(torch.int32).to(out))
        return packed, t_dense.view(n_rays, n_samples).to(out)

    def state_dict(self) -> dict:
        """The grid's settings and state, for checkpoints (CPU tensors)."""
        return {
            "resolution": self.resolution, "radius": self.radius, "decay": self.decay, "step": self.step,
            "dilate": self.dilate,
            "threshold": self.threshold, "density": self.density.cpu(), "occupied": self.occupied.cpu(),
            "used": self.used.cpu(),
        }  # fmt: skip

    def load_state_dict(self, state: dict) -> None:
        """Restore ``state_dict``'s output; the resolution and radius must match this grid's."""
        if state["resolution"] != self.resolution or state["radius"] != self.radius:
            raise ValueError(
                f"occupancy grid mismatch: checkpoint has {state['resolution']}^3 cells over radius "
                f"{state['radius']}, this grid {self.resolution}^3 over {self.radius}."
            )
        device = kernel_device()
        self.decay, self.step, self.threshold = state["decay"], state["step"], state["threshold"]
        self.dilate = bool(state.get("dilate", True))
        self.density = state["density"].to(device=device, dtype=torch.float32).contiguous()
        self.occupied = state["occupied"].to(device=device, dtype=torch.uint8).contiguous()
        self.used = state["used"].to(device=device, dtype=torch.uint8).contiguous()
