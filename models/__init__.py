"""LOLNeRF model: conditioned field, background, latent table, losses, rendering and checkpoints.

    from models import ConditionedField, BackgroundField, LatentTable, render_rays, render_image
    from models.checkpoint import load_checkpoint, save_checkpoint, CheckpointError
"""

from models.background import BackgroundConfig, BackgroundField, ConstantBackground, make_background
from models.field import ConditionedField, FieldConfig, positional_encoding
from models.latents import LatentConfig, LatentTable, make_latent_optimizer
from models.losses import LossConfig, compute_losses, hard_loss, mask_loss, psnr_from_mse, rgb_loss
from models.render import RayOutput, RenderConfig, render_image, render_rays

__all__ = [
    "BackgroundConfig",
    "BackgroundField",
    "ConditionedField",
    "ConstantBackground",
    "FieldConfig",
    "LatentConfig",
    "LatentTable",
    "LossConfig",
    "RayOutput",
    "RenderConfig",
    "compute_losses",
    "hard_loss",
    "make_background",
    "make_latent_optimizer",
    "mask_loss",
    "positional_encoding",
    "psnr_from_mse",
    "render_image",
    "render_rays",
    "rgb_loss",
]
