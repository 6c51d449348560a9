"""Pictures and videos on disk: depth colour maps, image grids, PNG, MP4 (OpenCV) and GIF (Pillow).

Every writer is atomic (temp file in the same folder, then ``os.replace``), so an interrupted run
never leaves a half-written file under the final name. Images are RGB: float in [0, 1] or uint8.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import cv2
import numpy as np

from common.atomic import atomic_path


def to_uint8(image: np.ndarray) -> np.ndarray:
    """Convert an image to uint8 RGB.

    image: (H, W), (H, W, 1) or (H, W, 3); float in [0, 1] (clipped) or uint8; torch tensors are accepted.
    Returns (H, W, 3) uint8 (gray is repeated over three channels).

    >>> to_uint8(np.ones((2, 2))).shape
    (2, 2, 3)
    """
    if hasattr(image, "detach"):
        image = image.detach().cpu().numpy()
    arr = np.asarray(image)
    if arr.dtype != np.uint8:
        arr = (np.clip(arr.astype(np.float32), 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)
    if arr.ndim == 3 and arr.shape[2] == 1:
        arr = arr[:, :, 0]
    if arr.ndim == 2:
        arr = np.repeat(arr[:, :, None], 3, axis=2)
    if arr.ndim != 3 or arr.shape[2] != 3:
        raise ValueError(f"Expected an image of shape (H, W) or (H, W, 3), got {arr.shape}.")
    return np.ascontiguousarray(arr)


def colorize_depth(
    depth: np.ndarray,
    mask: np.ndarray | None = None,
    near: float | None = None,
    far: float | None = None,
) -> np.ndarray:
    """Colour-map a depth map with OpenCV's turbo map; near is warm, far is cold, outside the mask black.

    depth (H, W) float; mask (H, W) in [0, 1] or bool, pixels > 0.5 are foreground (None: all).
    near/far fix the range (e.g. shared across a video); by default the 1st-99th percentiles of the
    foreground depths, so one stray sample does not wash the map out. Returns (H, W, 3) uint8 RGB.

    >>> colorize_depth(np.linspace(6, 8, 16).reshape(4, 4)).shape
    (4, 4, 3)
    """
    if hasattr(depth, "detach"):
        depth = depth.detach().cpu().numpy()
    d = np.asarray(depth, dtype=np.float32)
    if d.ndim != 2:
        raise ValueError(f"depth must have shape (H, W), got {d.shape}.")
    if mask is None:
        fg = np.isfinite(d)
    else:
        if hasattr(mask, "detach"):
            mask = mask.detach().cpu().numpy()
        m = np.asarray(mask)
        fg = (m > (127 if m.dtype == np.uint8 else 0.5)) & np.isfinite(d)
    out = np.zeros((*d.shape, 3), dtype=np.uint8)
    if not fg.any():
        return out
    values = d[fg]
    lo = float(np.percentile(values, 1)) if near is None else float(near)
    hi = float(np.percentile(values, 99)) if far is None else float(far)
    scale = max(hi - lo, 1e-6)
    # Near = 1 so that the closest surface gets the hottest colour of the map.
    closeness = 1.0 - np.clip((d - lo) / scale, 0.0, 1.0)
    closeness[~np.isfinite(closeness)] = 0.0
    bgr = cv2.applyColorMap((closeness * 255.0 + 0.5).astype(np.uint8), cv2.COLORMAP_TURBO)
    rgb = cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)
    out[fg] = rgb[fg]
    return out


def upscale(image: np.ndarray, min_side: int) -> np.ndarray:
    """Enlarge by an integer factor (nearest neighbour, so pixels stay crisp) until the short side is at
    least ``min_side``. (H, W, C) -> (kH, kW, C) uint8; images already large enough are returned as is.
    """
    img = to_uint8(image)
    factor = int(np.ceil(min_side / min(img.shape[:2])))
    if factor <= 1:
        return img
    return cv2.resize(img, None, fx=factor, fy=factor, interpolation=cv2.INTER_NEAREST)


def caption(image: np.ndarray, text: str, fill: int = 255) -> np.ndarray:
    """Put ``text`` in a band above the image (never over it), scaled to fit the image's width.

    image (H, W, 3) -> (H + band, W, 3) uint8.
    """
    img = to_uint8(image)
    w = img.shape[1]
    (tw, th), base = cv2.getTextSize(text, cv2.FONT_HERSHEY_SIMPLEX, 1.0, 1)
    scale = min(0.5, (w - 4) / max(tw, 1))
    height = int(np.ceil((th + base) * scale)) + 6
    band = np.full((height, w, 3), fill, dtype=np.uint8)
    color = (0, 0, 0) if fill > 127 else (255, 255, 255)
    baseline_y = height - int(base * scale) - 3
    cv2.putText(band, text, (2, baseline_y), cv2.FONT_HERSHEY_SIMPLEX, scale, color, 1, cv2.LINE_AA)
    return np.concatenate([band, img], axis=0)


def image_grid(
    rows: Sequence[Sequence[np.ndarray]],
    labels: Sequence[Sequence[str]] | None = None,
    spacing: int = 2,
    fill: int = 255,
) -> np.ndarray:
    """Tile images into one picture: ``rows[i][j]`` is the cell at row i, column j.

    Cells may be float [0, 1] or uint8, gray or RGB, and of different sizes (each is centred in a cell
    of the largest size); rows may have different lengths. ``labels`` (same nesting) adds a caption band
    above each cell. Returns (H, W, 3) uint8.

    >>> image_grid([[np.zeros((4, 4, 3)), np.ones((4, 4))]]).shape
    (4, 10, 3)
    """
    if len(rows) == 0 or all(len(r) == 0 for r in rows):
        raise ValueError("image_grid needs at least one image.")
    cells = [[to_uint8(img) for img in row] for row in rows]
    if labels is not None:
        cells = [
            [caption(img, text, fill) for img, text in zip(row, lrow, strict=False)]
            for row, lrow in zip(cells, labels, strict=False)
        ]
    cell_h = max(img.shape[0] for row in cells for img in row)
    cell_w = max(img.shape[1] for row in cells for img in row)
    n_cols = max(len(row) for row in cells)
    height = len(cells) * cell_h + (len(cells) - 1) * spacing
    width = n_cols * cell_w + (n_cols - 1) * spacing
    grid = np.full((height, width, 3), fill, dtype=np.uint8)
    for i, row in enumerate(cells):
        for j, img in enumerate(row):
            y = i * (cell_h + spacing) + (cell_h - img.shape[0]) // 2
            x = j * (cell_w + spacing) + (cell_w - img.shape[1]) // 2
            grid[y : y + img.shape[0], x : x + img.shape[1]] = img
    return grid


def save_png(path: str | Path, image: np.ndarray) -> Path:
    """Write an RGB image (float [0, 1] or uint8, gray or RGB) as PNG, atomically. Returns the path.

    The format follows the suffix (OpenCV), so ``.png`` is expected; other suffixes such as ``.jpg`` work.
    """
    path = Path(path)
    with atomic_path(path, keep_suffix=True) as tmp:
        if not cv2.imwrite(str(tmp), cv2.cvtColor(to_uint8(image), cv2.COLOR_RGB2BGR)):
            raise OSError(f"OpenCV could not write {path}; check that the folder is writable.")
    return path


def _check_frames(frames: Sequence[np.ndarray]) -> list[np.ndarray]:
    if len(frames) == 0:
        raise ValueError("A video needs at least one frame.")
    out = [to_uint8(f) for f in frames]
    if any(f.shape != out[0].shape for f in out):
        raise ValueError("All video frames must have the same size.")
    return out


def save_mp4(path: str | Path, frames: Sequence[np.ndarray], fps: float = 24.0) -> Path:
    """Write RGB frames as an MP4 (MPEG-4 Part 2, 'mp4v', which every OpenCV build can encode).

    frames: N images (H, W, 3) of one size. Odd sizes are padded to even ones because many players
    reject odd-sized MPEG-4 video. Returns the path.
    """
    path = Path(path)
    rgb = _check_frames(frames)
    h, w = rgb[0].shape[:2]
    H, W = h + h % 2, w + w % 2
    with atomic_path(path, keep_suffix=True) as tmp:
        writer = cv2.VideoWriter(str(tmp), cv2.VideoWriter_fourcc(*"mp4v"), float(fps), (W, H))
        if not writer.isOpened():
            raise OSError(f"OpenCV has no MP4 encoder here, so {path} cannot be written; save a GIF instead.")
        for f in rgb:
            padded = np.zeros((H, W, 3), dtype=np.uint8)
            padded[:h, :w] = f
            writer.write(cv2.cvtColor(padded, cv2.COLOR_RGB2BGR))
        writer.release()
    return path


def save_gif(path: str | Path, frames: Sequence[np.ndarray], fps: float = 24.0) -> Path:
    """Write RGB frames as a looping GIF with Pillow (OpenCV has no GIF writer). Returns the path."""
    from PIL import Image

    path = Path(path)
    rgb = _check_frames(frames)
    images = [Image.fromarray(f) for f in rgb]
    with atomic_path(path, keep_suffix=True) as tmp:
        images[0].save(
            tmp,
            format="GIF",
            save_all=True,
            append_images=images[1:],
            duration=max(round(1000.0 / fps), 20),
            loop=0,
            optimize=True,
        )
    return path
