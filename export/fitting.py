"""Fitting a new photo's latent code with the network frozen ("learn from one look"), and scoring the fit.

    result = fit_latent(model, photo.image, photo.mask, photo.K, photo.world_to_camera, FitConfig.cpu())
    scores, view = reconstruction_scores(model, result.latent, photo.image, photo.mask, photo.K,
                                         photo.world_to_camera)

The library behind ``fit.py`` (and ``evaluate.py``'s 3DFAW protocol, which fits each image).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch
from tqdm import tqdm

import renderer
from export.inference import model_device, render_view, training_losses
from export.metrics import psnr, ssim
from models import compute_losses, render_rays
from models.checkpoint import LoadedCheckpoint
from models.device_render import renders_on_device
from models.render import pixel_grid
from models.skip_empty import render_rays_skip_empty


@dataclass
class FitConfig:
    """Latent optimisation: Adam on the code only, learning rate decaying exponentially to
    ``lr * final_lr_fraction`` over ``steps``, ``rays_per_step`` random pixels of the photo per step."""

    steps: int = 300
    lr: float = 0.03
    final_lr_fraction: float = 0.1
    rays_per_step: int = 1024
    seed: int = 0

    @classmethod
    def paper(cls) -> FitConfig:
        """256² photos on a GPU: more rays and steps."""
        return cls(steps=1000, rays_per_step=4096)

    @classmethod
    def cpu(cls) -> FitConfig:
        """64² photos on 2 CPU cores: 300 steps of 1,024 rays (README has the measured time)."""
        return cls()


@dataclass
class FitResult:
    """A fitted code (L,) and the per-step loss terms."""

    latent: torch.Tensor
    history: list[dict[str, float]] = field(default_factory=list)


def _as_float_image(image: np.ndarray) -> torch.Tensor:
    arr = np.asarray(image)
    arr = arr.astype(np.float32) / 255.0 if arr.dtype == np.uint8 else arr.astype(np.float32)
    return torch.from_numpy(np.ascontiguousarray(arr))


def fit_latent(
    model: LoadedCheckpoint,
    image: np.ndarray,
    mask: np.ndarray | None,
    K: np.ndarray,
    world_to_camera: np.ndarray,
    config: FitConfig | None = None,
    progress: bool = False,
) -> FitResult:
    """Optimise one latent so the frozen model reconstructs ``image`` seen from (K, world_to_camera).

    image (H, W, 3) uint8 or float [0, 1]; mask (H, W) uint8 {0..255} or float [0, 1] or None (no mask
    term); K (3, 3); world_to_camera (3, 4). Starts from the latent table's mean and uses the training
    losses recorded in the checkpoint. Every random draw comes from a generator seeded with ``config.seed``.

    >>> result = fit_latent(model, photo.image, photo.mask, photo.K, photo.world_to_camera)  # doctest: +SKIP
    >>> result.latent.shape                                                                 # doctest: +SKIP
    torch.Size([32])
    """
    config = config or FitConfig.cpu()
    if config.steps < 1 or config.rays_per_step < 1 or config.lr <= 0:
        raise ValueError("fit needs steps >= 1, rays_per_step >= 1 and lr > 0.")
    rgb = _as_float_image(image)
    height, width = rgb.shape[:2]
    if rgb.ndim != 3 or rgb.shape[2] != 3:
        raise ValueError(f"fit_latent needs an (H, W, 3) image, got {tuple(rgb.shape)}.")
    target_rgb = rgb.reshape(-1, 3)
    target_mask = None if mask is None else _as_float_image(mask).reshape(-1)
    if target_mask is not None and target_mask.shape[0] != target_rgb.shape[0]:
        raise ValueError(f"mask has {target_mask.shape[0]} pixels but the image has {target_rgb.shape[0]}.")
    device = model_device(model)  # everything on the model's device (CUDA tensors for Taichi CUDA)
    target_rgb = target_rgb.to(device)
    target_mask = None if target_mask is None else target_mask.to(device)
    pixels = pixel_grid(height, width, device)
    K_t = torch.as_tensor(np.asarray(K), dtype=torch.float32).to(device)
    w2c_t = torch.as_tensor(np.asarray(world_to_camera), dtype=torch.float32).to(device)
    if renders_on_device(model.field, model.background):
        return fit_latent_on_device(model, pixels, target_rgb, target_mask, K_t, w2c_t, config, progress)
    loss_config = training_losses(model)
    latent = torch.nn.Parameter(model.latents.mean().clone())
    optimizer = torch.optim.Adam([latent], lr=config.lr)
    scheduler = torch.optim.lr_scheduler.ExponentialLR(optimizer, _decay(config))

    def take_step(index: torch.Tensor, generator: torch.Generator) -> dict[str, float]:
        index = index.to(device)
        rays = renderer.generate_rays(pixels[index], K_t, w2c_t, radius=model.render_config.radius)
        codes = latent[None].expand(index.shape[0], -1)
        if getattr(model, "occupancy", None) is not None:  # --render-skip-empty on
            out = render_rays_skip_empty(model.field, model.background, rays, codes, model.render_config,
                                         model.occupancy, generator=generator)  # fmt: skip
        else:
            out = render_rays(model.field, model.background, rays, codes, model.render_config,
                              generator=generator)
        terms = compute_losses(
            out.color,
            out.opacity,
            out.weights,
            target_rgb[index],
            None if target_mask is None else target_mask[index],
            loss_config,
        )
        optimizer.zero_grad(set_to_none=True)
        terms["total"].backward()
        optimizer.step()
        scheduler.step()
        return {k: float(v.detach()) for k, v in terms.items()}

    history = _fit_loop(config, pixels.shape[0], take_step, progress)
    return FitResult(latent.detach().cpu().clone(), history)


def _fit_loop(config: FitConfig, n_pixels: int,
              take_step: Callable[[torch.Tensor, torch.Generator], dict[str, float]],
              progress: bool) -> list[dict[str, float]]:  # fmt: skip
    """The fit's steps, shared by the torch and the device loop: each draws ``rays_per_step`` pixels
    (CPU indices) from the seeded generator, which ``take_step`` then draws its samples from too;
    returns the per-step loss terms."""
    generator = torch.Generator().manual_seed(int(config.seed))
    n_rays = min(config.rays_per_step, n_pixels)
    history = []
    bar = tqdm(range(config.steps), desc="fit", disable=not progress, leave=False)
    for _ in bar:
        index = torch.randperm(n_pixels, generator=generator)[:n_rays]
        history.append(take_step(index, generator))
        bar.set_postfix(loss=f"{history[-1]['total']:.4f}")
    return history


def _decay(config: FitConfig) -> float:
    """The learning rate's factor per step: ``final_lr_fraction`` after ``steps - 1`` steps."""
    return config.final_lr_fraction ** (1.0 / max(config.steps - 1, 1))


def fit_latent_on_device(model: LoadedCheckpoint, pixels: torch.Tensor, target_rgb: torch.Tensor,
                         target_mask: torch.Tensor | None, K: torch.Tensor, world_to_camera: torch.Tensor,
                         config: FitConfig, progress: bool = False) -> FitResult:  # fmt: skip
    """``fit_latent``'s loop on the Taichi device (``models.device_step`` with the networks frozen), for
    the Taichi field on a Vulkan or Metal GPU, where torch tensors would be copied per kernel launch:
    per step only the chosen pixels, their colours and mask go in and three loss sums come out. The
    same draws from the same seed as the torch loop, so the same code up to float rounding.

    pixels (H * W, 2), target_rgb (H * W, 3), target_mask (H * W,) or None, K (3, 3), world_to_camera
    (3, 4), on the CPU.
    """
    from models.device_step import DeviceTrainStep
    from models.latents import LatentTable
    from models.taichi_background import TaichiBackground

    table = LatentTable(1, model.latents.codes.shape[1])
    with torch.no_grad():
        table.codes.copy_(model.latents.mean()[None])
    frozen = [*model.field.parameter_list()]
    if isinstance(model.background, TaichiBackground):
        frozen += model.background.parameter_list()
    optimizers = {"networks": torch.optim.Adam(frozen, lr=0.0),  # holds the frozen weights; never steps
                  "latents": torch.optim.Adam(table.parameters(), lr=config.lr)}
    scheduler = torch.optim.lr_scheduler.ExponentialLR(optimizers["latents"], _decay(config))
    step = DeviceTrainStep(model.field, model.background, table, optimizers, model.render_config,
                           training_losses(model), occupancy=getattr(model, "occupancy", None),
                           train_networks=False)  # fmt: skip
    def take_step(index: torch.Tensor, generator: torch.Generator) -> dict[str, float]:
        batch = {"pixels": pixels[index], "K": K[None], "world_to_camera": world_to_camera[None],
                 "rgb": target_rgb[index], "identity": torch.zeros(index.shape[0], dtype=torch.int64)}
        if target_mask is not None:
            batch["mask"] = target_mask[index]
        terms = step.run(batch, generator)
        scheduler.step()
        if terms is None:  # not finite: the step changed nothing
            terms = dict.fromkeys(("rgb", "mask", "hard", "total"), float("nan"))
        return terms

    history = _fit_loop(config, pixels.shape[0], take_step, progress)
    step.table.to_torch()
    return FitResult(table.codes[0].detach().cpu().clone(), history)


def reconstruction_scores(
    model: LoadedCheckpoint,
    latent: torch.Tensor,
    image: np.ndarray,
    mask: np.ndarray | None,
    K: np.ndarray,
    world_to_camera: np.ndarray,
    chunk: int = 8192,
) -> tuple[dict[str, float], dict[str, np.ndarray]]:
    """Render the fitted latent at the photo's camera and score it against the photo.

    Returns ({"psnr", "ssim", and with a mask "psnr_masked"}, the rendered view as ``render_view``).
    """
    target = _as_float_image(image).numpy()
    view = render_view(model, latent, K, world_to_camera, target.shape[0], target.shape[1], chunk)
    scores = {"psnr": psnr(view["color"], target), "ssim": ssim(view["color"], target)}
    if mask is not None and (_as_float_image(mask).numpy() > 0.5).any():
        scores["psnr_masked"] = psnr(view["color"], target, _as_float_image(mask).numpy())
    return scores, view
