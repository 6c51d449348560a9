"""The paper's evaluation protocol as a library: ``evaluate.py`` is its command line, and
``benchmarks/quality.py`` calls ``evaluate`` directly.

    results = evaluate(load_model(ckpt), cache, views_dir=None, max_images=200)
    print(markdown_table(results))

- Reconstruction: PSNR / SSIM of each training image rendered from its own camera with its own latent.
- Novel views: PSNR / SSIM of held-out views of training identities, rendered with the latent learned
  from the training view(s) - from the cache's ``heldout/`` split, or from an SRN-layout folder
  (DIR/<instance>/rgb/*.png, pose/*.txt camera-to-world 4x4, intrinsics.txt) whose instance names match
  training source names.
- Depth, where the data has ground truth (synthetic): abs-rel (raw and median-scaled), RMSE and
  correlation inside the mask, rendered depth taken as sum(w t) / sum(w) (the surface a ray hits;
  ground truth is ray distance).
- LPIPS only if the ``lpips`` package and AlexNet weights are already on this machine (never downloads).
- The mean-image baseline: the mean training image (and mean training depth) predicted for every view.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
from tqdm import tqdm

from export.inference import render_view, source_name, surface_depth
from export.metrics import Lpips, depth_errors, lpips_status, psnr, ssim
from models.checkpoint import LoadedCheckpoint


def spread_indices(n: int, limit: int | None) -> np.ndarray:
    """Up to ``limit`` indices evenly spread over range(n) (deterministic). ``limit=None``: all.

    >>> spread_indices(10, 3).tolist()
    [0, 4, 9]
    """
    if limit is None or limit >= n:
        return np.arange(n)
    return np.unique(np.linspace(0, n - 1, limit).round().astype(int))


def score_view(
    pred: dict[str, np.ndarray],
    image: np.ndarray,
    mask: np.ndarray | None,
    depth: np.ndarray | None,
    lpips: Lpips | None,
) -> dict[str, float]:
    """Metrics of one rendered view against its ground truth.

    pred: {"color" (H, W, 3), "opacity" (H, W), "depth" (H, W)}; image (H, W, 3) uint8 or float;
    mask (H, W) or None; depth (H, W) ground-truth ray distance (0 = background) or None.
    """
    scores = {"psnr": psnr(pred["color"], image), "ssim": ssim(pred["color"], image)}
    if lpips is not None:
        scores["lpips"] = lpips(pred["color"], image)
    if depth is not None and (np.asarray(depth) > 0).any():
        errors = depth_errors(surface_depth(pred), depth, mask)
        scores.update({f"depth_{k}": v for k, v in errors.items() if k != "n_pixels"})
    return scores


def summarise(records: list[dict[str, float]]) -> dict[str, float]:
    """Mean of each metric over views (NaN-skipping; a single infinite PSNR makes the mean infinite)."""
    keys = sorted({k for r in records for k in r if isinstance(r[k], float)})
    out: dict[str, float] = {"n_views": len(records)}
    for key in keys:
        values = np.array([r[key] for r in records if key in r], dtype=np.float64)
        finite = values[~np.isnan(values)]
        out[key] = float(finite.mean()) if finite.size else math.nan
    return out


def evaluate_views(
    model: LoadedCheckpoint, views, lpips: Lpips | None, chunk: int, desc: str
) -> list[dict[str, float]]:
    """Render and score views. ``views`` yields (identity, image, mask, K, world_to_camera, depth or None)."""
    records = []
    for identity, image, mask, K, w2c, depth in tqdm(list(views), desc=desc, leave=False):
        latent = model.latents.codes[int(identity)].detach()
        pred = render_view(model, latent, K, w2c, image.shape[0], image.shape[1], chunk)
        records.append({"identity": int(identity), **score_view(pred, image, mask, depth, lpips)})
    return records


def cache_views(ds, indices: np.ndarray):
    """(identity, image, mask, K, w2c, depth) for the chosen indices of a PreparedDataset split."""
    for i in indices:
        depth = None if ds.depths is None else np.asarray(ds.depths[i])
        yield (
            int(ds.identities[i]),
            np.asarray(ds.images[i]),
            np.asarray(ds.masks[i]),
            ds.K[i],
            ds.world_to_camera[i],
            depth,
        )


def read_srn_instance(
    folder: Path, world_scale: float = 1.0, white_threshold: int = 250
) -> list[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]]:
    """One SRN instance folder -> [(image uint8 (H, W, 3), mask uint8 (H, W), K (3, 3), w2c (3, 4))].

    Read with the dataset's own SRN readers (dataset.srn), including the uniform ``world_scale`` the
    training cache applied to camera positions, so held-out cameras live in the training world, and its
    ``white_threshold`` for the masks.
    Views are rendered at the size of their files.
    """
    import cv2

    from dataset.srn import mask_from_white, parse_intrinsics, read_camera

    K_file, (file_height, file_width) = parse_intrinsics(folder / "intrinsics.txt")
    views = []
    for rgb_path in sorted((folder / "rgb").glob("*.png")):
        pose_path = folder / "pose" / f"{rgb_path.stem}.txt"
        if not pose_path.is_file():
            continue
        bgr = cv2.imread(str(rgb_path), cv2.IMREAD_COLOR)
        if bgr is None:
            raise ValueError(f"{rgb_path} is not a readable image.")
        image = cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)
        h, w = image.shape[:2]
        K = (np.diag([w / file_width, h / file_height, 1.0]) @ K_file).astype(np.float32)
        w2c = read_camera(pose_path, world_scale).astype(np.float32)
        mask = (mask_from_white(image, white_threshold) * 255).astype(np.uint8)
        views.append((image, mask, K, w2c))
    return views


def srn_views(folder: Path, train_ds):
    """Held-out views from an SRN-layout folder whose instance names match training source names
    (an instance matches when its folder name is one of the path parts of a training source)."""
    sources = [Path(source_name(s)).parts for s in train_ds.sources]
    world_scale = float(train_ds.manifest.get("world_scale", 1.0))
    white_threshold = int(train_ds.manifest.get("settings", {}).get("white_threshold", 250))
    instances = sorted(p for p in Path(folder).iterdir() if (p / "rgb").is_dir())
    if not instances:
        raise ValueError(f"{folder} has no SRN instance folders (<instance>/rgb, pose, intrinsics.txt).")
    matched = 0
    for instance in instances:
        hits = {int(train_ds.identities[i]) for i, parts in enumerate(sources) if instance.name in parts}
        if len(hits) != 1:
            continue
        matched += 1
        identity = next(iter(hits))
        for image, mask, K, w2c in read_srn_instance(instance, world_scale, white_threshold):
            yield identity, image, mask, K, w2c, None
    if matched == 0:
        raise ValueError(f"no instance folder in {folder} matches a training identity's source name.")


def mean_image_baseline(train_ds, views) -> list[dict[str, float]]:
    """Score the mean training image (and the mean training depth) as the prediction for every view."""
    mean_image = np.mean(np.asarray(train_ds.images, dtype=np.float64), axis=0) / 255.0
    mean_depth = None
    if train_ds.depths is not None:
        depths = np.asarray(train_ds.depths, dtype=np.float64)
        hit = depths > 0
        counts = hit.sum(axis=0)
        overall = depths[hit].mean() if hit.any() else 0.0
        mean_depth = np.where(counts > 0, depths.sum(axis=0) / np.maximum(counts, 1), overall)
    records = []
    for identity, image, mask, _, _, depth in views:
        if image.shape[:2] != mean_image.shape[:2]:
            raise ValueError("the mean-image baseline needs views at the training resolution.")
        pred = {
            "color": mean_image,
            "opacity": np.ones(image.shape[:2]),
            "depth": mean_depth if mean_depth is not None else np.zeros(image.shape[:2]),
        }
        scores = score_view(pred, image, mask, depth if mean_depth is not None else None, None)
        records.append({"identity": int(identity), **scores})
    return records


def markdown_table(results: dict) -> str:
    """The summary as a Markdown table: metrics as rows, evaluations as columns."""
    columns = [
        ("reconstruction", "Reconstruction (train views)"),
        ("novel_view", "Novel views (held out)"),
        ("baseline_reconstruction", "Mean image (train views)"),
        ("baseline_novel_view", "Mean image (held out)"),
    ]
    columns = [
        (k, title) for k, title in columns if isinstance(results.get(k), dict) and "n_views" in results[k]
    ]
    metrics = [
        ("n_views", "views", "{:.0f}"),
        ("psnr", "PSNR (dB) ↑", "{:.2f}"),
        ("ssim", "SSIM ↑", "{:.3f}"),
        ("lpips", "LPIPS ↓", "{:.3f}"),
        ("depth_abs_rel", "depth abs rel ↓", "{:.4f}"),
        ("depth_abs_rel_scaled", "depth abs rel, median-scaled ↓", "{:.4f}"),
        ("depth_rmse", "depth RMSE ↓", "{:.4f}"),
        ("depth_corr", "depth correlation ↑", "{:.3f}"),
    ]
    lines = ["| metric | " + " | ".join(t for _, t in columns) + " |", "|---" * (len(columns) + 1) + "|"]
    for key, title, fmt in metrics:
        if not any(key in results[k] for k, _ in columns):
            continue
        cells = [fmt.format(results[k][key]) if key in results[k] else "–" for k, _ in columns]
        lines.append(f"| {title} | " + " | ".join(cells) + " |")
    notes = [f"- {results[k]['skipped']}" for k in ("novel_view",) if "skipped" in results.get(k, {})]
    notes.append(f"- {results['lpips_note']}")
    return "\n".join(lines) + "\n\n" + "\n".join(notes) + "\n"


def evaluate(
    model: LoadedCheckpoint,
    cache: Path,
    views_dir: Path | None = None,
    max_images: int | None = 200,
    chunk: int = 8192,
    allow_other_cache: bool = False,
) -> dict:
    """Every evaluation for one checkpoint and its training cache. Returns the results dict (JSON-ready).

    A cache whose fingerprint differs from the one the checkpoint was trained on is refused (ValueError)
    unless ``allow_other_cache``: latents index identities, so another dataset's images would be scored
    against the wrong heads.
    """
    from dataset import CacheError, PreparedDataset

    train = PreparedDataset(cache, split="train")
    if train.fingerprint != model.fingerprint and not allow_other_cache:
        raise ValueError(
            f"the cache {cache} is not the dataset this checkpoint was trained on (fingerprint "
            f"{train.fingerprint[:12]} vs {str(model.fingerprint)[:12]}); pass the training cache with "
            "--cache, or --allow-other-cache to score it anyway."
        )
    if train.n_identities != model.latents.n:
        raise ValueError(
            f"the cache {cache} has {train.n_identities} identities but the checkpoint has "
            f"{model.latents.n}; pass the cache the model was trained on (--cache)."
        )
    available, note = lpips_status()
    lpips = Lpips() if available else None
    results: dict = {
        "step": model.step,
        "cache": str(cache),
        "lpips_note": note,
        "same_cache_as_training": train.fingerprint == model.fingerprint,
    }

    train_idx = spread_indices(len(train), max_images)
    per_train = evaluate_views(model, cache_views(train, train_idx), lpips, chunk, "reconstruction")
    results["reconstruction"] = summarise(per_train)
    results["baseline_reconstruction"] = summarise(mean_image_baseline(train, cache_views(train, train_idx)))

    novel = None
    if views_dir is not None:
        novel = list(srn_views(views_dir, train))
        novel = [novel[i] for i in spread_indices(len(novel), max_images)]
        results["novel_view_source"] = str(views_dir)
    else:
        try:
            heldout = PreparedDataset(cache, split="heldout")
        except CacheError as err:
            results["novel_view"] = {"skipped": f"novel views skipped: {err}"}
        else:
            novel = list(cache_views(heldout, spread_indices(len(heldout), max_images)))
            results["novel_view_source"] = f"{cache}/heldout"
    per_novel = []
    if novel is not None:
        per_novel = evaluate_views(model, novel, lpips, chunk, "novel views")
        results["novel_view"] = summarise(per_novel)
        same_size = all(v[1].shape[:2] == train.image_size for v in novel)
        if same_size:
            results["baseline_novel_view"] = summarise(mean_image_baseline(train, novel))
    results["per_view"] = {"reconstruction": per_train, "novel_view": per_novel}
    return results
