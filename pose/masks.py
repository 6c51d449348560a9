"""Soft foreground masks from MediaPipe Selfie Segmentation."""

from __future__ import annotations

import numpy as np

from .config import PoseConfig
from .landmarks import run_graph


def segment_foreground(image: np.ndarray, config: PoseConfig | None = None) -> np.ndarray:
    """Soft person/foreground mask of a photo.

    Args:
        image: (H, W, 3) uint8 RGB.
        config: `segmentation_model` picks the general (0) or landscape (1) model.

    Returns:
        (H, W) float32 in [0, 1]; 1 = person.

    >>> segment_foreground(skimage.data.astronaut()).shape  # doctest: +SKIP
    (512, 512)
    """
    config = config or PoseConfig()
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(f"segment_foreground needs a uint8 (H, W, 3) RGB image, "
                         f"got {image.dtype} {image.shape}.")
    result = run_graph("selfie_segmentation", image, model_selection=config.segmentation_model)
    return np.clip(np.asarray(result.segmentation_mask, np.float32), 0.0, 1.0)
