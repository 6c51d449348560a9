"""Rendering a batch of rays (training) and whole images (previews, evaluation) with the field.

    out = render_rays(field, background, rays, latents, RenderConfig.cpu(), generator=g)
    # RayOutput(color (R, 3), opacity (R,), depth (R,), weights (R, S+F))
    img = render_image(field, background, latent, K, world_to_camera, 64, 64, RenderConfig.cpu())
    # {"color": (64, 64, 3), "opacity": (64, 64), "depth": (64, 64)}

Each sample is evaluated by the network exactly once:
1. coarse stratified samples -> field (with gradients);
2. compositing of the detached coarse outputs gives the weights for importance sampling (no gradient);
3. importance samples -> field (with gradients), the fine samples only. The same call
   (``sample_importance_and_merge``) merges coarse + fine depths and gives the interval lengths; its
   ``order`` gathers the already computed sigma/rgb;
4. ``renderer.composite`` over all samples, with gradients. The coarse pass has no loss of its own.
"""

from __future__ import annotations

from dataclasses import dataclass
from dataclasses import field as dataclass_field
from types import ModuleType
from typing import NamedTuple

import torch
from torch import nn

import renderer


@dataclass
class RenderConfig:
    """Samples per ray and the scene bounds (a sphere of ``radius`` around the origin).

        >>> RenderConfig.cpu().n_coarse, RenderConfig.paper().n_coarse
        (32, 128)
    """

    n_coarse: int = dataclass_field(default=128, metadata={"help": "stratified samples per ray"})
    n_fine: int = dataclass_field(default=64, metadata={"help": "importance samples per ray"})
    radius: float = dataclass_field(default=2.0, metadata={
        "help": "bounding sphere radius around the origin (head units; the official L = 2 x radius)"})
    # Skipping empty and hidden samples (models.skip_empty).
    skip_empty: bool = dataclass_field(default=True, metadata={
        "help": "on | off: march the class occupancy grid and composite packed samples with early stop "
                "(models/skip_empty.py, and models/device_skip.py for the device-resident step; README, "
                "Skipping empty space, has the speed and quality figures)"})
    early_stop_eps: float = dataclass_field(default=1e-4, metadata={
        "help": "skip-empty only: a ray stops once its transmittance falls below this"})
    occupancy_resolution: int = dataclass_field(default=128, metadata={
        "help": "skip-empty only: cells per side of the occupancy grid over the render sphere's cube"})
    occupancy_every: int = dataclass_field(default=16, metadata={
        "help": "skip-empty only: training steps between occupancy grid updates"})
    occupancy_warmup: int = dataclass_field(default=256, metadata={
        "help": "skip-empty only: every cell stays occupied for this many training steps"})
    occupancy_codes: int = dataclass_field(default=2, metadata={
        "help": "skip-empty only: latent codes the field is evaluated for per grid update (the mean code "
                "and a rotating subset of the table)"})
    occupancy_fraction: float = dataclass_field(default=1 / 64, metadata={
        "help": "skip-empty only: random share of all cells (plus as many occupied ones) the field is "
                "evaluated at per grid update; the cells training samples passed through are re-estimated "
                "from their densities at no extra cost"})

    @classmethod
    def paper(cls) -> RenderConfig:
        """The official configs' 128 stratified + 64 importance samples."""
        return cls()

    @classmethod
    def cpu(cls) -> RenderConfig:
        """32 + 32 samples: enough for 64 px on 2 CPU cores."""
        return cls(n_coarse=32, n_fine=32, occupancy_resolution=64)


class RayOutput(NamedTuple):
    """Rendered rays: color (R, 3), opacity (R,), depth (R,), weights (R, S+F) in merged order."""

    color: torch.Tensor
    opacity: torch.Tensor
    depth: torch.Tensor
    weights: torch.Tensor


def evaluate_samples(field: nn.Module, rays: renderer.Rays, t: torch.Tensor,
                     latents: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Field at the points ``o + t d``: rays (R), t (R, S), latents (R, L) -> sigma (R, S), rgb (R, S, 3)."""
    points = rays.origins[:, None, :] + t[..., None] * rays.directions[:, None, :]
    return field(points, latents)  # one code per ray, shared by its samples (never copied per sample)


def render_rays(field: nn.Module, background: nn.Module, rays: renderer.Rays, latents: torch.Tensor,
                cfg: RenderConfig, generator: torch.Generator | None = None,
                ops: ModuleType = renderer) -> RayOutput:
    """Coarse + importance rendering of a ray batch, one network evaluation per sample.

    Shapes: rays with R rows, latents (R, L) -> RayOutput with S + F samples per ray.
    ``generator=None`` is deterministic (bin centres), for previews and evaluation. ``ops`` provides the
    renderer functions (``renderer`` = Taichi kernels; ``renderer.reference`` = plain torch, a baseline).
    """
    t_coarse = ops.sample_stratified(rays.near, rays.far, cfg.n_coarse, generator=generator)
    sigma_coarse, rgb_coarse = evaluate_samples(field, rays, t_coarse, latents)
    with torch.no_grad():
        deltas_coarse = ops.sample_deltas(t_coarse, rays.far)
        coarse = ops.composite(sigma_coarse.detach(), rgb_coarse.detach(), t_coarse, deltas_coarse, 0.0)
    if cfg.n_fine > 0:
        t_fine, t_all, order, deltas = ops.sample_importance_and_merge(
            t_coarse, coarse.weights, cfg.n_fine, rays.near, rays.far, generator=generator)
        sigma_fine, rgb_fine = evaluate_samples(field, rays, t_fine, latents)
        sigma = torch.cat([sigma_coarse, sigma_fine], dim=1).gather(1, order)
        rgb = torch.cat([rgb_coarse, rgb_fine], dim=1).gather(1, order[..., None].expand(-1, -1, 3))
    else:
        t_all, sigma, rgb, deltas = t_coarse, sigma_coarse, rgb_coarse, deltas_coarse
    bg = background(rays.directions, latents)
    out = ops.composite(sigma.contiguous(), rgb.contiguous(), t_all.contiguous(), deltas, bg)
    return RayOutput(out.color, out.opacity, out.depth, out.weights)


def pixel_grid(height: int, width: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """Integer (u, v) indices of every pixel in row-major order: -> (H*W, 2) float32.

    Example: ``pixel_grid(1, 2)`` is ``[[0, 0], [1, 0]]``.
    """
    v, u = torch.meshgrid(torch.arange(height, device=device), torch.arange(width, device=device),
                          indexing="ij")
    return torch.stack([u.reshape(-1), v.reshape(-1)], dim=-1).float()


@torch.no_grad()
def render_image(field: nn.Module, background: nn.Module, latent: torch.Tensor, K: torch.Tensor,
                 world_to_camera: torch.Tensor, height: int, width: int, render_config: RenderConfig,
                 chunk: int = 8192, ops: ModuleType = renderer, occupancy=None) -> dict[str, torch.Tensor]:
    """Render one whole image in chunks of rays (bounded memory, no gradients, deterministic samples).

    Shapes: latent (L,), K (3, 3), world_to_camera (3, 4) ->
    {"color": (H, W, 3), "opacity": (H, W), "depth": (H, W)} on the latent's device. ``ops`` as in
    ``render_rays`` (``renderer.reference`` renders the same image in plain torch). With ``occupancy`` (a
    ``models.skip_empty.ClassOccupancy``) empty space is skipped (its ``render_rays``).
    """
    device = latent.device
    pixels = pixel_grid(height, width, device)
    K = K.to(device=device, dtype=torch.float32)
    world_to_camera = world_to_camera.to(device=device, dtype=torch.float32)
    colors, opacities, depths = [], [], []
    for start in range(0, pixels.shape[0], chunk):
        rays = ops.generate_rays(pixels[start:start + chunk], K, world_to_camera,
                                 radius=render_config.radius)
        codes = latent[None, :].expand(rays.origins.shape[0], -1)
        if occupancy is not None:
            out = occupancy.render_rays(field, background, rays, codes, render_config)
        else:
            out = render_rays(field, background, rays, codes, render_config, generator=None, ops=ops)
        colors.append(out.color)
        opacities.append(out.opacity)
        depths.append(out.depth)
    return {"color": torch.cat(colors).reshape(height, width, 3),
            "opacity": torch.cat(opacities).reshape(height, width),
            "depth": torch.cat(depths).reshape(height, width)}
