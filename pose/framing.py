"""Square crops of photos and the exact intrinsics that go with them.

A crop is `CropBox(x0, y0, side)` in integer pixel indices of the source image: it covers source pixels
[x0, x0 + side) × [y0, y0 + side), and may reach outside the image (the outside is padded). Resizing it to
r × r maps continuous coordinates by p' = (p − (x0, y0)) · r / side, which is exactly what `cv2.resize`
does with pixel centres at (i + 0.5, j + 0.5); `crop_intrinsics` applies the same map to K.

- `aligned` (FFHQ, CelebA-HQ): the largest centred square (the whole image when it is square).
- `landmarks` (raw photos): FFHQ's alignment rule without its rotation: centre = eye midpoint +
  0.1 × eye-to-mouth, side = `crop_scale` × max(2.0 × eye distance, 1.8 × eye-to-mouth distance),
  with eye centres and the mouth midpoint (FFHQ uses 2.0 for `crop_scale`).
"""

from __future__ import annotations

from typing import NamedTuple

import cv2
import numpy as np

from .landmarks import FaceLandmarks


class CropBox(NamedTuple):
    """Square crop in source pixel indices: columns [x0, x0 + side), rows [y0, y0 + side)."""

    x0: int
    y0: int
    side: int


def aligned_box(image_size: tuple[int, int]) -> CropBox:
    """The largest centred square.

    >>> aligned_box((480, 640))
    CropBox(x0=80, y0=0, side=480)
    """
    height, width = image_size
    side = min(height, width)
    return CropBox((width - side) // 2, (height - side) // 2, side)


def landmark_box(landmarks: FaceLandmarks, crop_scale: float = 2.0) -> CropBox:
    """FFHQ-style square around the face (module docstring)."""
    eye_mid = landmarks.eye_centres.mean(0)
    eye_to_eye = np.linalg.norm(landmarks.eye_centres[1] - landmarks.eye_centres[0])
    eye_to_mouth = landmarks.mouth_centre - eye_mid
    centre = eye_mid + 0.1 * eye_to_mouth
    side = max(round(crop_scale * max(2.0 * eye_to_eye, 1.8 * np.linalg.norm(eye_to_mouth))), 1)
    x0, y0 = (round(float(c) - side / 2) for c in centre)
    return CropBox(x0, y0, side)


def crop_and_resize(array: np.ndarray, box: CropBox, resolution: int,
                    border: int = cv2.BORDER_REPLICATE) -> np.ndarray:
    """Cut `box` out of an (H, W) or (H, W, C) array (padding outside the image) and resize to r × r.

    Replicated edges keep padded photo areas plausible; pass `cv2.BORDER_CONSTANT` for masks (0 outside).
    Resizing uses `cv2.INTER_AREA`.

    >>> crop_and_resize(np.ones((4, 6), np.float32), CropBox(1, 0, 4), 2).shape
    (2, 2)
    """
    height, width = array.shape[:2]
    pad = (max(-box.y0, 0), max(box.y0 + box.side - height, 0),
           max(-box.x0, 0), max(box.x0 + box.side - width, 0))
    if any(pad):
        array = cv2.copyMakeBorder(array, *pad, border, value=0)
    y0, x0 = box.y0 + pad[0], box.x0 + pad[2]
    crop = array[y0:y0 + box.side, x0:x0 + box.side]
    if box.side == resolution:
        return np.ascontiguousarray(crop)
    return cv2.resize(crop, (resolution, resolution), interpolation=cv2.INTER_AREA)


def crop_intrinsics(K: np.ndarray, box: CropBox, resolution: int) -> np.ndarray:
    """K of the source image → K of the crop resized to r × r (exact: shift then scale).

    >>> K = np.array([[100.0, 0, 50], [0, 100, 40], [0, 0, 1]])
    >>> crop_intrinsics(K, CropBox(10, 0, 80), 40)[0].tolist()
    [50.0, 0.0, 20.0]
    """
    scale = resolution / box.side
    image_map = np.array([[scale, 0.0, -box.x0 * scale], [0.0, scale, -box.y0 * scale], [0.0, 0.0, 1.0]])
    return image_map @ K
