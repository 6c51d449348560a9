"""Image and depth metrics: PSNR, SSIM (scikit-image), depth abs-rel / RMSE / correlation, depth at
landmarks (per-image Pearson and DepthNet's DepthCorr), optional LPIPS.

Images are float RGB in [0, 1] (H, W, 3) or uint8; masks (H, W) select the pixels that count
(> 0.5 for float masks, > 127 for uint8 ones).
"""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import numpy as np
from skimage.metrics import structural_similarity


def _as_float_image(image) -> np.ndarray:
    if hasattr(image, "detach"):
        image = image.detach().cpu().numpy()
    arr = np.asarray(image)
    if arr.dtype == np.uint8:
        return arr.astype(np.float64) / 255.0
    return arr.astype(np.float64)


def _as_bool_mask(mask, shape: tuple[int, int]) -> np.ndarray:
    if mask is None:
        return np.ones(shape, dtype=bool)
    if hasattr(mask, "detach"):
        mask = mask.detach().cpu().numpy()
    m = np.asarray(mask)
    if m.shape != shape:
        raise ValueError(
            f"mask has shape {m.shape} but the image is {shape}; pass one (H, W) mask per image."
        )
    return m > 127 if m.dtype == np.uint8 else m > 0.5


def psnr(pred, target, mask=None) -> float:
    """Peak signal-to-noise ratio in dB for images in [0, 1]: -10 log10(MSE), over the mask if given.

    pred, target (H, W, 3) or (H, W). A perfect prediction returns ``inf``.

    >>> round(psnr(np.zeros((4, 4, 3)), np.full((4, 4, 3), 0.1)), 6)
    20.0
    """
    p, t = _as_float_image(pred), _as_float_image(target)
    if p.shape != t.shape:
        raise ValueError(f"pred {p.shape} and target {t.shape} must have the same shape.")
    m = _as_bool_mask(mask, p.shape[:2])
    if not m.any():
        raise ValueError("The mask selects no pixels, so PSNR is undefined.")
    mse = float(np.mean((p[m] - t[m]) ** 2))
    return math.inf if mse == 0.0 else -10.0 * math.log10(mse)


def ssim(pred, target, mask=None) -> float:
    """Structural similarity (skimage.metrics.structural_similarity, data range 1, uniform 7x7
    windows), averaged over the mask if given. pred, target (H, W, 3) or (H, W); 1.0 for identical images.
    """
    p, t = _as_float_image(pred), _as_float_image(target)
    if p.shape != t.shape:
        raise ValueError(f"pred {p.shape} and target {t.shape} must have the same shape.")
    win = min(7, p.shape[0], p.shape[1])
    win -= 1 - win % 2  # the window must be odd
    if win < 3:
        raise ValueError(f"SSIM needs images of at least 3x3 pixels, got {p.shape[:2]}.")
    channel_axis = -1 if p.ndim == 3 else None
    _, full = structural_similarity(p, t, data_range=1.0, channel_axis=channel_axis, win_size=win, full=True)
    if full.ndim == 3:
        full = full.mean(axis=-1)
    m = _as_bool_mask(mask, p.shape[:2])
    if not m.any():
        raise ValueError("The mask selects no pixels, so SSIM is undefined.")
    return float(full[m].mean())


def depth_errors(pred, target, mask=None) -> dict[str, float]:
    """Depth error inside the mask, where the ground truth is positive (0 marks background).

    pred, target (H, W) in world units. Returns {"abs_rel": mean |p - t| / t, "rmse": sqrt mean (p - t)^2,
    "abs_rel_scaled": abs_rel after scaling p by median(t) / median(p), "corr": Pearson correlation of p
    and t (NaN when either is constant), "n_pixels": count}.

    ``abs_rel_scaled`` is the median-scaled error of monocular depth evaluation: one view fixes depth only
    up to a near-ambiguity between an object's size and its distance, so it separates the shape error
    from that global scale.

    >>> depth_errors(np.full((2, 2), 7.0), np.full((2, 2), 7.0))["rmse"]
    0.0
    """
    p = np.asarray(pred.detach().cpu().numpy() if hasattr(pred, "detach") else pred, dtype=np.float64)
    t = np.asarray(target.detach().cpu().numpy() if hasattr(target, "detach") else target, dtype=np.float64)
    if p.shape != t.shape or p.ndim != 2:
        raise ValueError(f"pred {p.shape} and target {t.shape} must both be (H, W) depth maps.")
    valid = _as_bool_mask(mask, t.shape) & (t > 0) & np.isfinite(t) & np.isfinite(p)
    n = int(valid.sum())
    if n == 0:
        raise ValueError("No pixel is inside the mask with a positive ground-truth depth.")
    pv, tv = p[valid], t[valid]
    diff = pv - tv
    if n > 1 and pv.std() > 0 and tv.std() > 0:
        corr = float(np.corrcoef(pv, tv)[0, 1])
    else:
        corr = math.nan
    median_p = float(np.median(pv))
    scale = float(np.median(tv)) / median_p if median_p > 0 else math.nan
    return {
        "abs_rel": float(np.mean(np.abs(diff) / tv)),
        "abs_rel_scaled": float(np.mean(np.abs(scale * pv - tv) / tv)),
        "rmse": float(np.sqrt(np.mean(diff**2))),
        "corr": corr,
        "n_pixels": n,
    }


def sample_at_points(values, points) -> np.ndarray:
    """The value of the pixel that contains each point; NaN for points outside the image.

    values (H, W); points (K, 2) continuous pixel coordinates (u, v), pixel (i, j) covering
    [i, i + 1) x [j, j + 1) so its centre is (i + 0.5, j + 0.5) (``common.conventions``).
    Returns (K,) float64.

    >>> sample_at_points(np.arange(6.0).reshape(2, 3), np.array([[2.9, 1.2], [0.5, 0.5], [3.0, 0.0]]))
    array([ 5.,  0., nan])
    """
    v = np.asarray(values, dtype=np.float64)
    p = np.asarray(points, dtype=np.float64).reshape(-1, 2)
    cols, rows = np.floor(p[:, 0]), np.floor(p[:, 1])
    inside = np.isfinite(cols) & np.isfinite(rows) & (cols >= 0) & (rows >= 0)
    inside &= (cols < v.shape[1]) & (rows < v.shape[0])
    out = np.full(p.shape[0], np.nan)
    out[inside] = v[rows[inside].astype(int), cols[inside].astype(int)]
    return out


def pearson(a, b) -> float:
    """Pearson correlation of two (K,) samples over the entries finite in both; NaN with fewer than 3 such
    entries or when either is constant there. Invariant to any positive scale and offset of either.

    >>> round(pearson([1.0, 2.0, 4.0], [10.0, 20.0, 40.0]), 6), round(pearson([1, 2, 4], [-3, -5, -9]), 6)
    (1.0, -1.0)
    """
    x, y = np.asarray(a, dtype=np.float64).ravel(), np.asarray(b, dtype=np.float64).ravel()
    if x.shape != y.shape:
        raise ValueError(f"pearson needs samples of one length, got {x.shape} and {y.shape}.")
    keep = np.isfinite(x) & np.isfinite(y)
    x, y = x[keep], y[keep]
    if x.size < 3 or x.std() == 0 or y.std() == 0:
        return math.nan
    return float(np.corrcoef(x, y)[0, 1])


def landmark_depths(pred_depth, points, true_depth, visible=None) -> tuple[np.ndarray, np.ndarray]:
    """Rendered and true depth at K landmarks of one view (the 3DFAW protocol's samples).

    pred_depth (H, W) rendered surface depth; points (K, 2) landmark pixel positions (u, v) in that image;
    true_depth (K,) the landmarks' true depths; visible (K,) bool or None (all). Returns (pred (K,),
    true (K,)) float64, NaN where a landmark is hidden, outside the image or has no finite rendered depth.
    """
    pred = sample_at_points(pred_depth, points)
    true = np.asarray(true_depth, dtype=np.float64).ravel().copy()
    if true.shape != pred.shape:
        raise ValueError(f"{pred.shape[0]} landmark positions but {true.shape[0]} true depths.")
    hidden = ~np.isfinite(pred) | ~np.isfinite(true)
    if visible is not None:
        hidden |= ~np.asarray(visible, dtype=bool).ravel()
    pred[hidden], true[hidden] = np.nan, np.nan
    return pred, true


def depth_corr_sum(pred, true, min_views: int = 3) -> tuple[float, int]:
    """DepthNet's DepthCorr (Moniz et al. 2018, also Unsup3d's and LOLNeRF's 3DFAW figure): for each
    landmark k, the absolute Pearson correlation over the N views between its rendered and its true depth,
    summed over landmarks (66 is perfect on 3DFAW's 66 landmarks).

    pred, true (N, K) with NaN for a landmark hidden in a view; a landmark counts only where it is seen in
    at least ``min_views`` views (and is not constant there). Returns (sum, number of landmarks counted).

    >>> depth_corr_sum(np.array([[1.0, 5.0], [2.0, 4.0], [3.0, 6.0]]), np.array([[2.0, 1.0], [4, 3], [6, 2]]))
    (1.5, 2)
    """
    p, t = np.asarray(pred, dtype=np.float64), np.asarray(true, dtype=np.float64)
    if p.shape != t.shape or p.ndim != 2:
        raise ValueError(f"pred {p.shape} and true {t.shape} must both be (views, landmarks).")
    total, counted = 0.0, 0
    for k in range(p.shape[1]):
        seen = np.isfinite(p[:, k]) & np.isfinite(t[:, k])
        if seen.sum() < min_views:
            continue
        r = pearson(p[seen, k], t[seen, k])
        if not math.isnan(r):
            total += abs(r)
            counted += 1
    return total, counted


ALEXNET_WEIGHTS = "alexnet-owt-7be5be79.pth"


def lpips_status() -> tuple[bool, str]:
    """Whether LPIPS can run offline: the ``lpips`` package and the AlexNet backbone weights in torch's
    hub cache must both already be present (this project never downloads). Returns (available, note)."""
    if importlib.util.find_spec("lpips") is None:
        return False, "LPIPS skipped: the 'lpips' package is not installed (pip install lpips)."
    import torch

    weights = Path(torch.hub.get_dir()) / "checkpoints" / ALEXNET_WEIGHTS
    if not weights.is_file():
        return (
            False,
            f"LPIPS skipped: AlexNet backbone weights not found at {weights} (never downloaded here).",
        )
    return True, "LPIPS (AlexNet) computed with weights found on this machine."


class Lpips:
    """LPIPS distance (lower is better) with the AlexNet backbone; only build it when ``lpips_status()``
    says it is available, because otherwise torchvision would try to download weights."""

    def __init__(self) -> None:
        available, note = lpips_status()
        if not available:
            raise RuntimeError(note)
        import lpips

        self.model = lpips.LPIPS(net="alex", verbose=False).eval()

    def __call__(self, pred, target) -> float:
        """pred, target (H, W, 3) in [0, 1] -> LPIPS distance (float)."""
        import torch

        def to_tensor(img):
            arr = _as_float_image(img).astype(np.float32)
            return torch.from_numpy(arr).permute(2, 0, 1)[None] * 2.0 - 1.0

        with torch.no_grad():
            return float(self.model(to_tensor(pred), to_tensor(target)).item())
