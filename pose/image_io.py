"""`load_image`: any photo file → uint8 (H, W, 3) RGB, or one clear `ImageError`.

Conversions (all with OpenCV):
- EXIF orientation is honoured (OpenCV applies it when decoding with IMREAD_ANYCOLOR).
- Grayscale is repeated to three channels.
- Alpha (PNG colour types 4 and 6) is composited on white, because portrait PNGs with transparency
  are cut-outs whose background should read as empty, not black. PNGs carry no EXIF orientation here.
- 16-bit images are scaled to 8 bits (value / 257, rounded); float images are clipped to [0, 1].
- Truncated JPEGs and PNGs are detected from their end markers (OpenCV would decode them partially).
"""

from __future__ import annotations

import os
from pathlib import Path

import cv2
import numpy as np

from .errors import ImageError

_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_JPEG_SIGNATURE = b"\xff\xd8"


def _is_truncated(data: bytes) -> bool:
    """True when a JPEG lacks its end-of-image marker after the scan or a PNG lacks its IEND chunk."""
    if data.startswith(_JPEG_SIGNATURE):
        start_of_scan = data.find(b"\xff\xda")
        end_of_image = data.rfind(b"\xff\xd9")
        # An EXIF thumbnail has its own end marker before the main scan, so the order matters.
        return start_of_scan < 0 or end_of_image < start_of_scan
    if data.startswith(_PNG_SIGNATURE):
        return data.find(b"IEND", max(len(data) - 64, 0)) < 0
    return False


def _png_has_alpha(data: bytes) -> bool:
    """PNG colour type (byte 25 of the IHDR chunk) 4 = gray+alpha, 6 = RGBA."""
    return data.startswith(_PNG_SIGNATURE) and len(data) > 25 and data[25] in (4, 6)


def _to_uint8(pixels: np.ndarray) -> np.ndarray:
    """Any OpenCV depth → uint8, keeping the channel layout.

    >>> _to_uint8(np.array([[65535, 0]], np.uint16)).tolist()
    [[255, 0]]
    """
    if pixels.dtype == np.uint8:
        return pixels
    if pixels.dtype == np.uint16:
        return np.round(pixels.astype(np.float32) / 257.0).astype(np.uint8)
    if np.issubdtype(pixels.dtype, np.floating):
        return np.round(np.clip(pixels, 0.0, 1.0) * 255.0).astype(np.uint8)
    raise ImageError(f"Unsupported pixel type {pixels.dtype}; convert the image to 8- or 16-bit RGB.")


def _composite_on_white(bgra: np.ndarray) -> np.ndarray:
    """(H, W, 4) uint8 BGRA → (H, W, 3) uint8 BGR over a white background."""
    alpha = bgra[..., 3:4].astype(np.float32) / 255.0
    color = bgra[..., :3].astype(np.float32)
    return np.round(color * alpha + 255.0 * (1.0 - alpha)).astype(np.uint8)


def decode_image(data: bytes, name: str = "image", min_side: int = 32) -> np.ndarray:
    """Decode encoded image bytes to uint8 (H, W, 3) RGB (see the module docstring for conversions).

    Raises `ImageError` naming `name` when the bytes are not a complete image of at least `min_side` px.
    """
    if len(data) == 0:
        raise ImageError(f"{name} is empty (0 bytes); remove it or replace it with a real image.")
    if _is_truncated(data):
        raise ImageError(f"{name} is truncated (its end marker is missing); re-download or re-export it.")
    buffer = np.frombuffer(data, np.uint8)
    if _png_has_alpha(data):
        pixels = cv2.imdecode(buffer, cv2.IMREAD_UNCHANGED)
    else:
        # IMREAD_ANYCOLOR | IMREAD_ANYDEPTH keeps gray and 16-bit and, unlike IMREAD_UNCHANGED,
        # applies the EXIF orientation.
        pixels = cv2.imdecode(buffer, cv2.IMREAD_ANYCOLOR | cv2.IMREAD_ANYDEPTH)
    if pixels is None or pixels.size == 0:
        raise ImageError(f"{name} is not a readable image (OpenCV cannot decode it); "
                         "remove it from the data.")
    pixels = _to_uint8(pixels)
    if pixels.ndim == 2:
        pixels = cv2.cvtColor(pixels, cv2.COLOR_GRAY2RGB)
    elif pixels.shape[2] == 4:
        pixels = cv2.cvtColor(_composite_on_white(pixels), cv2.COLOR_BGR2RGB)
    elif pixels.shape[2] == 3:
        pixels = cv2.cvtColor(pixels, cv2.COLOR_BGR2RGB)
    elif pixels.shape[2] == 2:  # gray + alpha decoded unchanged
        gray = np.repeat(pixels[..., :1], 3, axis=2)
        pixels = _composite_on_white(np.concatenate([gray, pixels[..., 1:2]], axis=2))
    else:
        raise ImageError(f"{name} has {pixels.shape[2]} channels; convert it to RGB.")
    height, width = pixels.shape[:2]
    if min(height, width) < min_side:
        raise ImageError(
            f"{name} is too small ({width}×{height} px, the minimum side is {min_side} px); "
            "use a larger photo or lower PoseConfig.min_image_side."
        )
    return np.ascontiguousarray(pixels)


def load_image(path: str | os.PathLike, min_side: int = 32) -> np.ndarray:
    """Read a photo file as uint8 (H, W, 3) RGB, honouring EXIF orientation.

    Args:
        path: any file OpenCV can decode (JPEG, PNG, BMP, TIFF, WebP, ...).
        min_side: the smallest accepted height or width in pixels.

    Returns:
        (H, W, 3) uint8 RGB, C-contiguous.

    Raises:
        ImageError: one sentence naming the file and the problem (missing, empty, truncated, not an
            image, too small).

    >>> load_image("astronaut.png").shape  # doctest: +SKIP
    (512, 512, 3)
    """
    path = Path(path)
    try:
        data = path.read_bytes()
    except IsADirectoryError as err:
        raise ImageError(f"{path} is a directory, not an image file.") from err
    except OSError as err:
        raise ImageError(f"{path} cannot be read ({err.strerror}); check the path and permissions.") from err
    return decode_image(data, str(path), min_side)
