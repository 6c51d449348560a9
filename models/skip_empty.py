"""Skipping empty and hidden samples (``--render-skip-empty on``): the class-level occupancy grid's owner,
and ray rendering through it with packed samples (``renderer.occupancy``, ``renderer.packed``).

    occupancy = ClassOccupancy(render_config)
    occupancy.maybe_update(step, field, latent_codes, generator)     # every ``occupancy_every`` steps
    out = render_rays_skip_empty(field, background, rays, latents, render_config, occupancy, generator)
    # RayOutput as models.render.render_rays; weights (R, S+F) with zeros where samples were skipped

One grid serves the whole class: a cell is occupied when the field is dense there for some identity.
Two sources feed it. (a) Training steps: every sample a training step evaluates anyway leaves its
density in its cell (the largest since the last update, over every identity of the batches: ``observe``),
at no extra field cost. (b) Each update evaluates the field, without gradients, at one jittered point in
a random ``occupancy_fraction`` of all cells plus as many occupied ones (so empty space that fills up is
found), for ``occupancy_codes - 1`` latent codes taken in turn from the table (a rotating subset, so every
identity is visited over time) and the mean code, keeping the largest density per point. Both fold into
the grid with decay; during the first ``occupancy_warmup`` steps every cell stays occupied (the field is
still forming), and the first update after them evaluates every cell and forgets the earlier
estimates. Cells that training rays' weights use stay occupied (``OccupancyGrid.mark_used``), so the
grid never takes away a surface the rendering relies on.

Rendering a ray batch, with the field evaluated once per kept sample:
1. march the grid (one launch, which also gives the ray's whole list of coarse depths): the coarse
   stratified samples that fall in occupied cells (packed), field with gradients;
2. their detached compositing with early stop gives the weights; scattered back to (R, S) (zeros where
   skipped) they drive importance sampling and the merge exactly as in ``render_rays``;
3. a fine sample is kept if its cell is occupied and it lies before the ray's coarse cut-off (the first
   coarse sample with transmittance below eps): field with gradients, kept fine samples only;
4. the kept coarse and fine samples, in merged order and with the merged list's intervals, are
   composited packed with early stop; a skipped sample counts as density zero.
"""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import nn

import renderer
from models.render import RayOutput, RenderConfig
from renderer.occupancy import OccupancyGrid
from renderer.specs import occupancy_cells, offsets_from_counts, ray_indices


class ClassOccupancy:
    """The occupancy grid of a class of objects and its update schedule (``RenderConfig``'s
    ``occupancy_*`` values); ``state_dict`` goes into checkpoints."""

    def __init__(self, cfg: RenderConfig):
        # The opacity threshold applies over one coarse sample spacing at most (a ray's chord <= 2r).
        self.grid = OccupancyGrid(
            resolution=cfg.occupancy_resolution,
            radius=cfg.radius,
            step=2.0 * cfg.radius / max(cfg.n_coarse, 1),
        )
        self.every = cfg.occupancy_every
        self.warmup = cfg.occupancy_warmup
        self.n_codes = cfg.occupancy_codes
        self.fraction = cfg.occupancy_fraction
        self.cursor = 0  # the next identity of the rotating subset
        self.updates = 0
        self.refreshed = False  # whether an update after warm-up has re-estimated every cell afresh
        # The largest density training samples had in each cell since the last update (-1: none).
        self.observed = torch.full((self.grid.n_cells,), -1.0, device=self.grid.density.device)
        self.last_stats: dict[str, float] = {}

    def codes_for_update(self, codes: torch.Tensor) -> torch.Tensor:
        """The rotating subset of ``codes`` (n, L) plus their mean: -> (k, L), k <= occupancy_codes."""
        n = codes.shape[0]
        take = min(max(self.n_codes - 1, 0), n)
        index = (self.cursor + torch.arange(take, device=codes.device)) % n
        self.cursor = (self.cursor + take) % max(n, 1)
        return torch.cat([codes[index], codes.mean(0, keepdim=True)]).detach()

    @torch.no_grad()
    def update(
        self, step: int, field: nn.Module, codes: torch.Tensor, generator: torch.Generator | None = None
    ) -> dict[str, float]:
        """Fold the field's density for a few codes into the grid now (see the module docstring)."""
        chosen = self.codes_for_update(codes)

        def density(points: torch.Tensor) -> torch.Tensor:
            best = None
            for code in chosen:  # one code per call, shared by every point (never copied per point)
                sigma, _ = field(points[None].to(code.device), code[None])
                best = sigma[0] if best is None else torch.maximum(best, sigma[0])
            return best

        # The first update sees every cell, and so does the first one after warm-up, which also forgets
        # the estimates made while the field was forming: a young field is dense nearly everywhere, and
        # cells that neither training samples nor the random share revisit would keep that estimate
        # (a 600-step run ended with every cell above the threshold, while a fresh estimate of the same
        # model occupied 16 % of them).
        refresh = step >= self.warmup and not self.refreshed
        fraction = 1.0 if self.updates == 0 or refresh else self.fraction
        self.last_stats = self.grid.update(density, generator, warmup=step < self.warmup, fraction=fraction,
                                           observed=self.observed, reset=refresh, combine=rank_maximum())
        self.refreshed = self.refreshed or refresh
        self.observed.fill_(-1.0)
        self.updates += 1
        return self.last_stats

    @torch.no_grad()
    def observe(self, rays: renderer.Rays, t: torch.Tensor, counts: torch.Tensor,
                sigma: torch.Tensor) -> None:
        """Keep, per cell, the largest density of packed samples a training step evaluated: rays (R),
        t, sigma (N,), counts (R,) (rays back to back); folded in at the next ``update``."""
        if t.shape[0] == 0:
            return
        ray = ray_indices(counts, t.shape[0]).to(rays.origins.device)
        points = rays.origins[ray] + t[:, None] * rays.directions[ray]
        cells = occupancy_cells(points, self.grid.resolution, self.grid.radius).to(self.observed.device)
        values = torch.nan_to_num(sigma.detach().float(), nan=float("inf")).to(self.observed.device)
        self.observed.scatter_reduce_(0, cells, values, reduce="amax")

    def maybe_update(
        self, step: int, field: nn.Module, codes: torch.Tensor, generator: torch.Generator | None = None
    ) -> bool:
        """``update`` when ``step`` is a multiple of ``occupancy_every``; True when it ran."""
        if step % self.every != 0:
            return False
        was_training = field.training
        field.eval()
        try:
            self.update(step, field, codes, generator)
        finally:
            field.train(was_training)
        return True

    def render_rays(self, field, background, rays, latents, cfg, generator=None) -> RayOutput:
        """``render_rays_skip_empty`` through this grid (how ``models.render.render_image`` calls it)."""
        return render_rays_skip_empty(field, background, rays, latents, cfg, self, generator)

    def state_dict(self) -> dict:
        return {"grid": self.grid.state_dict(), "cursor": self.cursor, "updates": self.updates,
                "observed": self.observed.cpu(), "refreshed": self.refreshed}

    def load_state_dict(self, state: dict) -> None:
        self.grid.load_state_dict(state["grid"])
        self.cursor, self.updates = int(state["cursor"]), int(state["updates"])
        self.refreshed = bool(state.get("refreshed", False))  # older grids: re-estimated at the next update
        observed = state.get("observed")  # grids saved before training samples were observed lack it
        self.observed = (torch.full_like(self.grid.density, -1.0) if observed is None
                         else observed.to(self.grid.density.device, torch.float32).clone())


def rank_maximum():
    """In a distributed run, a function taking the element-wise maximum of a tensor over the ranks in
    place (a MAX all-reduce); None in one process. Each rank estimates the grid from its own batches,
    identities and random cells; merged so, every rank marks the same cells (the union of what they
    saw) and the checkpoint's grid, rank 0's, is every rank's."""
    import torch.distributed as dist

    from models.distributed import world

    if world()[1] == 1:
        return None
    return lambda tensor: dist.all_reduce(tensor, op=dist.ReduceOp.MAX)


class SkipStats:
    """Field evaluations of the last ``render_rays_skip_empty`` call (per ray: coarse, fine, total)."""

    last: ClassVar[dict[str, float]] = {}


def field_at_samples(field: nn.Module, points: torch.Tensor, latents: torch.Tensor,
                     ray: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The field at packed samples: points (N, 3) of rays ``ray`` (N,) with codes ``latents`` (R, L) ->
    sigma (N,), rgb (N, 3).

    Where every ray shares one code (``render_image`` expands a single latent: a zero row stride), the
    samples go to the field as one ray of N samples, so its latent term is computed once instead of per
    sample and no (N, L) copy of the code is made. Otherwise a field that takes a ray index
    (``ConditionedField.takes_ray_index``) computes each latent term once per ray and adds it to the
    ray's samples; any other field (the Taichi field) gets each sample's code row (an (N, L) gather).

        >>> from models.field import ConditionedField, FieldConfig
        >>> field = ConditionedField(FieldConfig(depth=2, width=8), latent_dim=4)
        >>> code = torch.zeros(4)[None].expand(3, -1)  # three rays, one code
        >>> sigma, rgb = field_at_samples(field, torch.zeros(5, 3), code, torch.tensor([0, 0, 1, 2, 2]))
        >>> sigma.shape, rgb.shape
        (torch.Size([5]), torch.Size([5, 3]))
    """
    if latents.shape[0] > 1 and latents.stride(0) == 0:
        sigma, rgb = field(points[None], latents[:1])
        return sigma[0], rgb[0]
    if getattr(field, "takes_ray_index", False):
        return field(points, latents, ray=ray)
    return field(points, latents[ray])


def render_rays_skip_empty(
    field: nn.Module,
    background: nn.Module,
    rays: renderer.Rays,
    latents: torch.Tensor,
    cfg: RenderConfig,
    occupancy: ClassOccupancy,
    generator: torch.Generator | None = None,
) -> RayOutput:
    """``render_rays`` with empty space and hidden samples skipped (module docstring, steps 1-4).

    Shapes: rays with R rows, latents (R, L) -> RayOutput(color (R, 3), opacity (R,), depth (R,),
    weights (R, S+F) in merged order, zero for skipped samples). Same samples as ``render_rays`` for
    the same generator state where every cell is occupied and eps is 0.
    """
    grid = occupancy.grid
    n_rays, n_coarse, n_fine = rays.near.shape[0], cfg.n_coarse, cfg.n_fine
    eps = cfg.early_stop_eps
    dev = rays.near.device
    coarse, t_coarse = grid.march_with_depths(rays, n_coarse, generator)  # packed, and the dense depths
    n_c = coarse.t.shape[0]
    ray_c = ray_indices(coarse.counts, n_c)
    points = rays.origins[ray_c] + coarse.t[:, None] * rays.directions[ray_c]
    sigma_c, rgb_c = field_at_samples(field, points, latents, ray_c)
    with torch.no_grad():
        first = renderer.composite_packed(
            sigma_c.detach(),
            rgb_c.detach(),
            coarse.t,
            coarse.deltas,
            coarse.offsets,
            coarse.counts,
            0.0,
            eps=eps,
        )
        bins_c = coarse.bins.to(torch.int64)
        dense_slot = ray_c * n_coarse + bins_c  # packed coarse -> (R, S) slot
        weights_c = torch.zeros(n_rays * n_coarse, device=dev).index_put_((dense_slot,), first.weights)
        weights_c = weights_c.view(n_rays, n_coarse)
        # The ray's coarse cut-off: the first coarse sample not composited (+inf when none was cut).
        cut_at = coarse.offsets.to(torch.int64) + first.kept.to(torch.int64)
        was_cut = first.kept < coarse.counts
        cut_depth = torch.full((n_rays,), float("inf"), device=dev)
        if n_c > 0:
            cut_depth = torch.where(was_cut, coarse.t[cut_at.clamp_max(n_c - 1)], cut_depth)
    if n_fine > 0:
        t_fine, t_all, order, deltas = renderer.sample_importance_and_merge(
            t_coarse, weights_c, n_fine, rays.near, rays.far, generator=generator
        )
        with torch.no_grad():
            fine_points = rays.origins[:, None] + t_fine[..., None] * rays.directions[:, None]
            keep_f = grid.occupied_at(fine_points) & (t_fine < cut_depth[:, None])
            keep_f &= (rays.far > rays.near)[:, None]
            slot_f = keep_f.view(-1).nonzero()[:, 0]  # kept fine samples' (R * F) slots, one nonzero only
            ray_f = torch.div(slot_f, n_fine, rounding_mode="floor")
        sigma_f, rgb_f = field_at_samples(field, fine_points.view(-1, 3)[slot_f], latents, ray_f)
        width = n_coarse + n_fine
        n_f = sigma_f.shape[0]
        with torch.no_grad():
            # Index of each (R, S+F) merged sample among cat([packed coarse, packed fine]), -1 if skipped.
            source = torch.full((n_rays * width,), -1, dtype=torch.int64, device=dev)
            source[ray_c * width + bins_c] = torch.arange(n_c, device=dev)
            source[slot_f + ray_f * n_coarse + n_coarse] = torch.arange(n_c, n_c + n_f, device=dev)
            source = source.view(n_rays, width).gather(1, order)
            keep = source >= 0
            counts = keep.sum(1).to(torch.int32)
            kept = keep.view(-1).nonzero()[:, 0]  # the kept merged samples' (R * (S+F)) slots
            pick = source.view(-1)[kept]
        sigma = torch.cat([sigma_c, sigma_f])[pick]
        rgb = torch.cat([rgb_c, rgb_f])[pick]
        t_kept, deltas_kept = t_all.reshape(-1)[kept], deltas.reshape(-1)[kept]
    else:
        kept = dense_slot
        sigma, rgb, t_kept, deltas_kept, counts = sigma_c, rgb_c, coarse.t, coarse.deltas, coarse.counts
        width = n_coarse
        n_f = 0
    offsets = offsets_from_counts(counts)
    bg = background(rays.directions, latents)
    out = renderer.composite_packed(
        sigma.contiguous(), rgb.contiguous(), t_kept, deltas_kept, offsets, counts, bg, eps=eps
    )
    if torch.is_grad_enabled():  # a training step: its weights keep cells, its densities re-estimate them
        grid.mark_used(rays, t_kept, offsets, counts, out.weights.detach())
        occupancy.observe(rays, t_kept, counts, sigma)
    # The hard-surface loss averages over every sample of the dense list; skipped samples weigh 0.
    weights = torch.zeros(n_rays * width, dtype=out.weights.dtype, device=dev)
    weights = weights.index_put((kept,), out.weights).view(n_rays, width)
    SkipStats.last = {
        "coarse_per_ray": n_c / max(n_rays, 1),
        "fine_per_ray": n_f / max(n_rays, 1),
        "field_per_ray": (n_c + n_f) / max(n_rays, 1),
        "dense_per_ray": float(width),
    }
    return RayOutput(out.color, out.opacity, out.depth, weights)
