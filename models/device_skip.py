"""Skipping empty and hidden samples on the Taichi device (``--render-skip-empty`` with ``--device-step``,
and device-resident rendering through an occupancy grid): ``models.skip_empty``'s algorithm on
``ti.ndarray``s, so that a Vulkan or Metal GPU both skips samples and keeps every array on the device.

    forward = DeviceSkipForward(ws, field, background, render_config, field_values, bg_values, bg_color,
                                grid=DeviceGrid(ws, occupancy))
    state = forward.forward(pixels, K, w2c, ray_codes, n_rays, generator, table=table, identity=identity)
    packed_backward(state, ...)        # in models.device_step: loss -> compositing -> field gradients

Kernel for kernel what ``models.skip_empty.render_rays_skip_empty`` does, with the same random draws,
so seeded alike both render the same samples:

1. march the grid (``renderer.occupancy.march_kernel``), count each ray's kept coarse samples, scan the
   counts into offsets and pack them (``renderer.device_packed``); the field runs once per kept sample;
2. composite the coarse samples (no gradient) with early stop; their weights, scattered back to (R, S),
   drive the importance sampler and merge exactly as the dense path does;
3. keep an importance sample if its cell is occupied and it lies before the ray's coarse cut-off, pack
   and evaluate the kept ones;
4. pack each ray's kept samples in merged order with the merged list's intervals and composite them
   with early stop; a skipped sample counts as density zero. In training, the cells whose samples carry
   weight are flagged and each cell keeps the largest density its samples had (the grid's next update
   reads both: ``DeviceGrid.flush``).

The host learns two numbers per batch, the packed coarse and fine counts (8 bytes), which size the
packed buffers (``renderer.device_packed.capacity``: a few size classes, reused between steps).
Training reads each sample's latent code from the table by its ray's identity (a per-sample gather on
the device; the latent gradient is scattered back the same way); rendering an image, whose rays share
one code, reads that single code for every sample (``Segment.repeat``), with no copy.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import taichi as ti
import torch

from models.device_forward import DeviceForward, Evaluation, _sample_key
from models.skip_empty import ClassOccupancy, SkipStats
from models.taichi_field import field_forward
from renderer.backend import launch
from renderer.composite import PER_RAY
from renderer.device import (
    TransferLog,
    Workspace,
    flat_to_rows_kernel,
    gather_rows_kernel,
    rows_to_flat_kernel,
)
from renderer.device_packed import (
    add_counts_kernel,
    capacity,
    coarse_weights_kernel,
    count_kept_kernel,
    exclusive_scan_kernel,
    fine_keep_kernel,
    mark_and_observe_kernel,
    merge_packed_kernel,
    pack_kept_kernel,
    packed_points_kernel,
    packed_to_dense_kernel,
    row_identity_kernel,
    scan_blocks,
)
from renderer.occupancy import march_kernel
from renderer.packed import packed_forward_kernel

Ndarray = ti.lang._ndarray.Ndarray
MIN_WEIGHT = 1e-4  # a training sample's weight above which its cell counts as used (OccupancyGrid.mark_used)


class DeviceGrid:
    """The device copy of a ``ClassOccupancy`` grid: what marching reads (``occupied``) and what training
    steps leave for the next update (``used`` flags, ``observed`` densities), kept on the device between
    updates. ``ClassOccupancy`` stays the record (checkpoints, updates): ``flush`` hands it what the
    steps saw, ``upload`` takes its new occupancy."""

    def __init__(self, ws: Workspace, occupancy: ClassOccupancy, transfers: TransferLog | None = None):
        self.occupancy = occupancy
        self.transfers = transfers if transfers is not None else TransferLog()
        self.ws = ws
        grid = occupancy.grid
        self.resolution, self.radius = grid.resolution, grid.radius
        self.used = ws.get("grid.used", (grid.n_cells,), ti.u8)
        self.observed = ws.get("grid.observed", (grid.n_cells,))
        self.upload()

    def upload(self) -> None:
        """Take the grid's occupancy, and start the steps' record afresh (after an update or a resume)."""
        occupied = self.occupancy.grid.occupied.cpu().numpy()
        self.occupied = self.transfers.upload(self.ws, "grid.occupied", occupied)
        self.used.fill(0)
        self.observed.fill(-1.0)

    def flush(self) -> None:
        """Fold what training steps saw into the grid (used flags OR-ed, densities max-ed) and start the
        record afresh: before an update or a checkpoint reads the grid."""
        grid, occupancy = self.occupancy.grid, self.occupancy
        used = torch.from_numpy(self.transfers.download(self.used)).to(grid.used.device)
        grid.used = torch.maximum(grid.used, used).contiguous()
        observed = torch.from_numpy(self.transfers.download(self.observed)).to(occupancy.observed.device)
        occupancy.observed = torch.maximum(occupancy.observed, observed)
        self.used.fill(0)
        self.observed.fill(-1.0)


@dataclass
class PackedEvaluation(Evaluation):
    """One field evaluation over packed samples: ``rows`` is the buffers' capacity (rows past each
    ray's samples are padding); ``offsets`` / ``counts`` (R,) each ray's samples, back to back."""

    offsets: Ndarray | None = None
    counts: Ndarray | None = None


class PackedRendered(NamedTuple):
    """What the packed forward pass leaves for the loss and the backward pass (the names the dense
    ``Rendered`` has for what the loss kernels read: ``n_rays``, ``width``, ``weights``, ``per_ray``)."""

    n_rays: int
    width: int  # samples per ray in the dense merged list (the hard loss averages over them)
    coarse: PackedEvaluation
    fine: PackedEvaluation | None
    sigma: Ndarray  # (cap,) merged packed densities, then colours (cap * 3), depths, intervals
    rgb: Ndarray
    t: Ndarray
    deltas: Ndarray
    offsets: Ndarray  # (R,) i32
    counts: Ndarray  # (R,) i32
    kept: Ndarray  # (R,) i32: samples composited before the early stop
    slot: Ndarray  # (cap,) i32: dense merged slot of each packed sample (-1: padding)
    source: Ndarray | None  # (cap,) i32: evaluation row it came from (coarse c, fine -1 - f)
    background: Ndarray  # (R, 3)
    bg: tuple | None
    weights: Ndarray  # (R * width,) dense weights, zero where skipped
    packed_weights: Ndarray  # (cap,)
    per_ray: Ndarray  # (R, PER_RAY)


class DeviceSkipForward(DeviceForward):
    """``DeviceForward`` through an occupancy grid with packed samples (module docstring)."""

    def __init__(self, *args, grid: DeviceGrid, **kwargs):
        super().__init__(*args, **kwargs)
        self.grid = grid
        self.transfers = grid.transfers  # the packed counts come back through it (8 bytes a batch)
        self.last_stats: dict[str, float] = {}

    def _pack(self, prefix: str, keep: Ndarray, t: Ndarray, deltas: Ndarray, n_rays: int,
              width: int) -> tuple[int, dict[str, Ndarray]]:  # fmt: skip
        """Count, scan and pack the kept entries of dense rows (R * width) -> (n, packed arrays)."""
        ws = self.ws
        counts = ws.get(prefix + "counts", (n_rays,), ti.i32)
        offsets = ws.get(prefix + "offsets", (n_rays,), ti.i32)
        total = ws.get(prefix + "total", (1,), ti.i32)
        launch("count_kept", count_kept_kernel, keep, counts)
        launch("exclusive_scan", exclusive_scan_kernel, counts, offsets,
               ws.get("scan.blocks", (scan_blocks(n_rays),), ti.i32), total)  # fmt: skip
        n = int(self.transfers.download(total)[0])  # what the host needs: it sizes the packed buffers
        cap = capacity(n)
        packed = {"counts": counts, "offsets": offsets,
                  "index": ws.get(prefix + "index", (n_rays * width,), ti.i32),
                  "t": ws.get(prefix + "t", (cap,)), "deltas": ws.get(prefix + "deltas", (cap,)),
                  "ray": ws.get(prefix + "ray", (cap,), ti.i32),
                  "slot": ws.get(prefix + "slot", (cap,), ti.i32)}
        launch("pack_kept", pack_kept_kernel, keep, t, deltas, offsets, packed["index"], packed["t"],
               packed["deltas"], packed["ray"], packed["slot"])  # fmt: skip
        return n, packed

    def _evaluate_packed(self, prefix: str, origins, directions, packed: dict, n: int, table, identity,
                         shared_code) -> PackedEvaluation:  # fmt: skip
        """The field at packed samples; each reads its ray's code from the table, or the shared code."""
        ws = self.ws
        cap = packed["t"].shape[0]
        points = ws.get(prefix + "points", (cap, 3))
        launch("packed_points", packed_points_kernel, origins, directions, packed["t"], packed["ray"], n,
               points)  # fmt: skip
        if shared_code is not None:
            codes, repeat = shared_code, cap  # (1, L): row n reads row n // cap = 0
        else:
            row_identity = ws.get(prefix + "row_identity", (cap,), ti.i64)
            launch("row_identity", row_identity_kernel, identity, packed["ray"], row_identity)
            codes, repeat = ws.get(prefix + "codes", (cap, self.field.latent_dim)), 1
            launch("gather_codes", gather_rows_kernel, table, row_identity, 1, codes)
        with self.phase("field forward"):
            acts = field_forward(self.field_values, points, codes, self.field.spec(), self._buffers(prefix),
                                 repeat=repeat)  # fmt: skip
        return PackedEvaluation(prefix, cap, repeat, acts, codes, offsets=packed["offsets"],
                                counts=packed["counts"])

    def forward_packed(self, pixels: Ndarray, K: Ndarray, world_to_camera: Ndarray, ray_codes: Ndarray,
                       n_rays: int, generator: torch.Generator | None, table: Ndarray | None = None,
                       identity: Ndarray | None = None, shared_code: Ndarray | None = None,
                       observe: bool = False) -> PackedRendered:  # fmt: skip
        """Rays -> march -> packed coarse field -> importance samples -> packed fine field -> background
        -> packed compositing (steps 1-4 of the module docstring).

        pixels (R, 2), K (1 | R, 3, 3), world_to_camera (1 | R, 3, 4), ray_codes (R, L) (the
        background's); the field's codes come from ``table`` (I, L) rows ``identity`` (R,) i64, or are
        ``shared_code`` (1, L) for every sample. ``observe``: record used cells and densities in the
        grid (a training step).
        """
        ws, cfg, grid = self.ws, self.render_config, self.grid
        n_coarse, n_fine, eps = cfg.n_coarse, cfg.n_fine, float(cfg.early_stop_eps)
        width = n_coarse + n_fine
        origins, directions, near, far = self.rays(pixels, K, world_to_camera, n_rays)
        t_dense = ws.get("t_coarse", (n_rays * n_coarse,))
        deltas_dense = ws.get("c.deltas_dense", (n_rays * n_coarse,))
        keep_c = ws.get("c.keep", (n_rays * n_coarse,), ti.u8)
        launch("occupancy_march", march_kernel, origins, directions, near, far, grid.occupied,
               *_sample_key(generator), n_coarse, grid.radius, grid.resolution, t_dense, deltas_dense,
               keep_c)  # fmt: skip
        n_c, packed_c = self._pack("c.", keep_c, t_dense, deltas_dense, n_rays, n_coarse)
        codes = (table, identity, shared_code)
        coarse = self._evaluate_packed("c.", origins, directions, packed_c, n_c, *codes)
        cap_c = packed_c["t"].shape[0]
        fine = source = None
        n_f = 0
        if n_fine > 0:
            sigma_c, rgb_c = ws.get("c.sigma_flat", (cap_c,)), ws.get("c.rgb_flat", (cap_c * 3,))
            launch("layout", rows_to_flat_kernel, coarse.acts.sigma, sigma_c)
            launch("layout", rows_to_flat_kernel, coarse.acts.rgb, rgb_c)
            weights_c, kept_c = ws.get("c.weights", (cap_c,)), ws.get("c.kept", (n_rays,), ti.i32)
            launch("composite_packed", packed_forward_kernel, sigma_c, rgb_c, packed_c["t"],
                   packed_c["deltas"], packed_c["offsets"], packed_c["counts"],
                   ws.zeros("c.background", (n_rays, 3)), eps, weights_c,
                   ws.get("c.per_ray", (n_rays, PER_RAY)), kept_c)  # fmt: skip
            weights_rows, cut = ws.get("c.weights_rows", (n_rays, n_coarse)), ws.get("c.cut", (n_rays,))
            launch("coarse_weights", coarse_weights_kernel, weights_c, packed_c["t"], packed_c["slot"],
                   packed_c["offsets"], packed_c["counts"], kept_c, weights_rows, cut)  # fmt: skip
            t_coarse_rows = ws.get("t_coarse_rows", (n_rays, n_coarse))
            launch("layout", flat_to_rows_kernel, t_dense, t_coarse_rows)
            t_fine, t_all, order, deltas = self.importance(t_coarse_rows, weights_rows, near, far, generator)
            keep_f = ws.get("f.keep", (n_rays * n_fine,), ti.u8)
            launch("fine_keep", fine_keep_kernel, origins, directions, near, far, t_fine, cut, grid.occupied,
                   grid.radius, grid.resolution, keep_f)  # fmt: skip
            t_fine_flat = ws.get("f.t_dense", (n_rays * n_fine,))
            launch("layout", rows_to_flat_kernel, t_fine, t_fine_flat)
            # Fine samples need no interval of their own (the merge gives every kept sample its interval in
            # the merged list), so their depths also fill the pack's interval slot, which goes unread.
            n_f, packed_f = self._pack("f.", keep_f, t_fine_flat, t_fine_flat, n_rays, n_fine)
            fine = self._evaluate_packed("f.", origins, directions, packed_f, n_f, *codes)
            counts = ws.get("m.counts", (n_rays,), ti.i32)
            offsets = ws.get("m.offsets", (n_rays,), ti.i32)
            launch("add_counts", add_counts_kernel, packed_c["counts"], packed_f["counts"], counts)
            launch("exclusive_scan", exclusive_scan_kernel, counts, offsets,
                   ws.get("scan.blocks", (scan_blocks(n_rays),), ti.i32), ws.get("m.total", (1,), ti.i32))
            cap = capacity(n_c + n_f)
            sigma, rgb = ws.get("m.sigma", (cap,)), ws.get("m.rgb", (cap * 3,))
            t, deltas_m = ws.get("m.t", (cap,)), ws.get("m.deltas", (cap,))
            slot, source = ws.get("m.slot", (cap,), ti.i32), ws.get("m.source", (cap,), ti.i32)
            launch("merge_packed", merge_packed_kernel, order, packed_c["index"], packed_f["index"], t_all,
                   deltas, coarse.acts.sigma, coarse.acts.rgb, fine.acts.sigma, fine.acts.rgb, offsets,
                   n_coarse, sigma, rgb, t, deltas_m, slot, source)  # fmt: skip
        else:  # the coarse samples are the whole list
            counts, offsets, slot = packed_c["counts"], packed_c["offsets"], packed_c["slot"]
            t, deltas_m = packed_c["t"], packed_c["deltas"]
            sigma, rgb = ws.get("m.sigma", (cap_c,)), ws.get("m.rgb", (cap_c * 3,))
            launch("layout", rows_to_flat_kernel, coarse.acts.sigma, sigma)
            launch("layout", rows_to_flat_kernel, coarse.acts.rgb, rgb)
        background, bg = self._background(directions, ray_codes, n_rays)
        cap = t.shape[0]
        packed_weights, kept = ws.get("m.weights", (cap,)), ws.get("m.kept", (n_rays,), ti.i32)
        per_ray = ws.get("per_ray", (n_rays, PER_RAY))
        launch("composite_packed", packed_forward_kernel, sigma, rgb, t, deltas_m, offsets, counts,
               background, eps, packed_weights, per_ray, kept)  # fmt: skip
        weights = ws.get("weights", (n_rays * width,))
        launch("packed_to_dense", packed_to_dense_kernel, packed_weights, slot, weights)
        if observe:
            launch("occupancy_mark_used", mark_and_observe_kernel, origins, directions, t, sigma,
                   packed_weights, offsets, counts, MIN_WEIGHT, grid.radius, grid.resolution, grid.used,
                   grid.observed)  # fmt: skip
        self.last_stats = SkipStats.last = {
            "coarse_per_ray": n_c / max(n_rays, 1),
            "fine_per_ray": n_f / max(n_rays, 1),
            "field_per_ray": (n_c + n_f) / max(n_rays, 1),
            "dense_per_ray": float(width),
        }
        return PackedRendered(n_rays, width, coarse, fine, sigma, rgb, t, deltas_m, offsets, counts, kept,
                              slot, source, background, bg, weights, packed_weights, per_ray)  # fmt: skip


def device_density(forward: DeviceSkipForward):
    """A density function for ``ClassOccupancy.update`` on the device copies of the field's parameters:
    ``(points (1, M, 3), code (1, L)) -> (sigma (1, M), None)`` as CPU tensors. Each call uploads the
    points and the code and downloads the densities (16 bytes a point), once every ``occupancy_every``
    steps."""

    ws = forward.ws

    def density(points: torch.Tensor, code: torch.Tensor):
        pts = points.reshape(-1, 3).detach().cpu().float().numpy()
        m = pts.shape[0]
        points_dev = forward.transfers.upload(ws, "occ.points", pts)
        code_np = code.reshape(1, -1).detach().cpu().float().numpy()
        code_dev = forward.transfers.upload(ws, "occ.code", code_np)
        acts = field_forward(forward.field_values, points_dev, code_dev, forward.field.spec(),
                             lambda name, shape: ws.get("occ." + name, shape), repeat=m)  # fmt: skip
        return torch.from_numpy(forward.transfers.download(acts.sigma).reshape(1, m)), None

    return density
