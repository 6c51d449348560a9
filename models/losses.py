"""LOLNeRF losses, each returned separately so it can be logged.

    L = w_rgb · L_rgb + λ_mask · L_mask + λ_hard · L_hard

- ``rgb_loss``: MSE on sRGB values in [0, 1].
- ``mask_loss``: (rendered opacity − foreground mask)², λ_mask = 1.
- ``hard_loss``: −log(e^{−|w|} + e^{−|1−w|}) averaged over per-sample compositing weights, λ_hard = 0.1.
  It is smallest at w ∈ {0, 1}, which turns fog into solid surfaces.

    terms = compute_losses(color, opacity, weights, target_rgb, target_mask, LossConfig())
    terms["total"].backward(); log({k: v.item() for k, v in terms.items()})
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class LossConfig:
    """Loss weights; a weight of 0 drops that term (it is still reported, detached).

        >>> LossConfig.cpu() == LossConfig.paper()
        True
    """

    rgb: float = field(default=1.0, metadata={"help": "weight of the pixel MSE"})
    mask: float = field(default=1.0, metadata={"help": "weight of (opacity - mask)^2"})
    hard: float = field(default=0.1, metadata={
        "help": "weight of the hard-surface loss -log(e^-|w| + e^-|1-w|) on sample weights"})

    @classmethod
    def paper(cls) -> LossConfig:
        """Official weights, no schedule."""
        return cls()

    @classmethod
    def cpu(cls) -> LossConfig:
        """Same weights as the paper: nothing about them depends on compute."""
        return cls()


def rgb_loss(color: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Pixel MSE: (R, 3), (R, 3) -> scalar."""
    return torch.mean((color - target) ** 2)


def mask_loss(opacity: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Opacity vs segmentation mask: (R,), (R,) -> scalar mean of (α − m)²."""
    return torch.mean((opacity - mask) ** 2)


def hard_loss(weights: torch.Tensor) -> torch.Tensor:
    """Hard-surface prior on compositing weights: (R, S) -> scalar.

    Example: ``hard_loss(torch.tensor([[0.0, 1.0]]))`` = −log(1 + e^{−1}) ≈ −0.3133, its minimum.
    """
    return torch.mean(-torch.log(torch.exp(-weights.abs()) + torch.exp(-(1.0 - weights).abs())))


def psnr_from_mse(mse: torch.Tensor | float) -> float:
    """PSNR in dB of an MSE on [0, 1] images (the training loss); images are scored by
    ``export.metrics.psnr``. Example: ``psnr_from_mse(0.01) == 20.0``."""
    value = float(mse)
    return float("inf") if value <= 0 else -10.0 * torch.log10(torch.tensor(value)).item()


def compute_losses(color: torch.Tensor, opacity: torch.Tensor, weights: torch.Tensor,
                   target_rgb: torch.Tensor, target_mask: torch.Tensor | None,
                   cfg: LossConfig) -> dict[str, torch.Tensor]:
    """All loss terms and their weighted sum.

    Shapes: color (R, 3), opacity (R,), weights (R, S), target_rgb (R, 3), target_mask (R,) or None
    -> {"total", "rgb", "mask", "hard"} scalars. A missing mask gives mask = 0 and no mask term.
    """
    terms = {"rgb": rgb_loss(color, target_rgb), "hard": hard_loss(weights)}
    terms["mask"] = (mask_loss(opacity, target_mask) if target_mask is not None
                     else torch.zeros((), device=color.device))
    total = cfg.rgb * terms["rgb"]
    if cfg.mask and target_mask is not None:
        total = total + cfg.mask * terms["mask"]
    if cfg.hard:
        total = total + cfg.hard * terms["hard"]
    terms["total"] = total
    return terms
