"""Backgrounds: a small network for photos, a constant colour for synthetic and SRN data.

Both share one call shape so the renderer does not care which it has:

    bg = make_background(dataset.background, latent_dim=64, cfg=BackgroundConfig.cpu())
    rgb = bg(directions, latents)   # directions (R, 3) unit, latents (R, L) -> (R, 3) in [0, 1]

Pixel colour is ``fg + (1 - opacity) * bg`` (composited by ``renderer.composite``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from models.field import encoded_size, positional_encoding


@dataclass
class BackgroundConfig:
    """Shape of the background network (used only when the dataset says ``"network"``: photos).

        >>> BackgroundConfig.cpu().width
        32
    """

    depth: int = field(default=5, metadata={"help": "background network layers (photo datasets only)"})
    width: int = field(default=256, metadata={"help": "units per background layer"})
    n_frequencies: int = field(default=4, metadata={
        "help": "octaves of the ray direction's positional encoding"})
    include_input: bool = field(default=True, metadata={"help": "also feed the raw ray direction"})

    @classmethod
    def paper(cls) -> BackgroundConfig:
        """The official 5 × 256 background network."""
        return cls()

    @classmethod
    def cpu(cls) -> BackgroundConfig:
        """A 2 × 32 background network for 2 CPU cores."""
        return cls(depth=2, width=32)


class BackgroundField(nn.Module):
    """MLP from (encoded ray direction, latent) to a sigmoid RGB colour.

    Shapes: directions (R, 3), latents (R, L) -> (R, 3).
    """

    def __init__(self, cfg: BackgroundConfig, latent_dim: int):
        super().__init__()
        self.cfg = cfg
        self.latent_dim = latent_dim
        width_in = encoded_size(3, cfg.n_frequencies, cfg.include_input) + latent_dim
        layers: list[nn.Module] = []
        for _ in range(cfg.depth):
            layers += [nn.Linear(width_in, cfg.width), nn.ReLU()]
            width_in = cfg.width
        layers.append(nn.Linear(width_in, 3))
        self.mlp = nn.Sequential(*layers)

    def forward(self, directions: torch.Tensor, latents: torch.Tensor) -> torch.Tensor:
        """Colour seen along each ray direction: (R, 3), (R, L) -> (R, 3)."""
        enc = positional_encoding(directions, self.cfg.n_frequencies, self.cfg.include_input)
        return torch.sigmoid(self.mlp(torch.cat([enc, latents], dim=-1)))


class ConstantBackground(nn.Module):
    """A fixed colour (from the dataset manifest); has no parameters to train.

    Shapes: directions (R, 3), latents (R, L) -> (R, 3), every row equal to ``color``.
    """

    def __init__(self, color: Sequence[float]):
        super().__init__()
        if len(color) != 3:
            raise ValueError(f"a constant background needs 3 RGB values in [0, 1], got {list(color)}.")
        self.register_buffer("color", torch.tensor([float(c) for c in color], dtype=torch.float32))

    def forward(self, directions: torch.Tensor, latents: torch.Tensor) -> torch.Tensor:
        """Broadcast the colour to every ray: (R, 3), (R, L) -> (R, 3)."""
        return self.color.to(directions.dtype).expand(directions.shape[0], 3)


def make_background(spec: str | Sequence[float], latent_dim: int,
                    cfg: BackgroundConfig | None = None) -> nn.Module:
    """Build the background a dataset asks for: ``"network"`` or an RGB list (constant).

    Example: ``make_background([1.0, 1.0, 1.0], 64)`` is a white ``ConstantBackground``.
    """
    if isinstance(spec, str):
        if spec != "network":
            raise ValueError(f"background must be 'network' or an RGB list such as [1, 1, 1], not {spec!r}.")
        return BackgroundField(cfg or BackgroundConfig(), latent_dim)
    return ConstantBackground(spec)


def background_spec(background: nn.Module) -> str | list[float]:
    """Inverse of ``make_background``: what to store in a config so the same background can be rebuilt."""
    if isinstance(background, ConstantBackground):
        return [float(c) for c in background.color.tolist()]
    return "network"

