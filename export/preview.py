"""Training previews: one PNG grid row per fixed identity.

Columns: ground truth | reconstruction | two novel yaw views | depth of the reconstruction.

    grid = preview_grid(field, background, latents, dataset, identities=[0, 1, 2], render_config=cfg)
    export.save_png(run_dir / "previews" / "step_001000.png", grid)
    trainer = Trainer(..., write_preview=write_preview)  # as train.py does; models/ never imports export
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch import nn

from export.cameras import yaw_cameras
from export.media import colorize_depth, image_grid, save_png
from models.device_render import render_image_on_device
from models.latents import LatentTable
from models.render import RenderConfig

COLUMNS = ("truth", "recon", "yaw -{yaw}", "yaw +{yaw}", "depth")


def first_view_of(identities: np.ndarray, identity: int) -> int:
    """Index of the first training image of ``identity`` in a dataset's (N,) identity array."""
    hits = np.flatnonzero(np.asarray(identities) == identity)
    if hits.size == 0:
        raise ValueError(f"identity {identity} has no training image; choose preview identities that exist.")
    return int(hits[0])


@torch.no_grad()
def preview_row(field: nn.Module, background: nn.Module, latent: torch.Tensor, image: np.ndarray,
                K: np.ndarray, world_to_camera: np.ndarray, render_config: RenderConfig,
                yaw_deg: float = 30.0) -> list[np.ndarray]:
    """The five cells of one identity's row, as (H, W, 3) arrays (float [0, 1] or uint8)."""
    height, width = image.shape[:2]
    K_t = torch.as_tensor(np.asarray(K), dtype=torch.float32)
    cameras = [np.asarray(world_to_camera), *yaw_cameras(np.asarray(world_to_camera), [-yaw_deg, yaw_deg])]
    renders = [render_image_on_device(field, background, latent, K_t, torch.as_tensor(c, dtype=torch.float32),
                                      height, width, render_config) for c in cameras]
    recon = renders[0]
    depth = colorize_depth(recon["depth"].cpu().numpy(), mask=recon["opacity"].cpu().numpy())
    return [np.asarray(image), *(r["color"].cpu().numpy() for r in renders), depth]


def preview_grid(field: nn.Module, background: nn.Module, latents: LatentTable, dataset,
                 identities: Sequence[int], render_config: RenderConfig, yaw_deg: float = 30.0) -> np.ndarray:
    """``preview_row`` for each identity, captions on the first row: -> (H', W', 3) uint8."""
    rows, labels = [], []
    for i, identity in enumerate(identities):
        index = first_view_of(dataset.identities, identity)
        latent = latents.codes[identity].detach()
        rows.append(preview_row(field, background, latent, np.asarray(dataset.images[index]),
                                dataset.K[index], dataset.world_to_camera[index], render_config, yaw_deg))
        labels.append([c.format(yaw=int(yaw_deg)) if i == 0 else "" for c in COLUMNS])
    return image_grid(rows, labels=labels)


def write_preview(trainer) -> Path:
    """The preview grid of a ``models.trainer.Trainer``'s fixed identities, saved as
    ``RUN/previews/step_<step>.png``; the trainer calls it (rank 0) every ``preview_every`` steps."""
    grid = preview_grid(trainer.field, trainer.background, trainer.latents, trainer.dataset,
                        trainer.preview_ids, trainer.module.render_config)
    return save_png(trainer.run_dir / "previews" / f"step_{trainer.step:08d}.png", grid)

