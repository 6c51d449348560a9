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
  ground truth is ray distance). ``depth_corr`` is the Pearson correlation over every foreground pixel of
  a view: the synthetic heads have no landmarks, so this (not the 3DFAW protocol) is their depth figure.
- Depth at landmarks (the paper's 3DFAW protocol), where the data has true landmarks (``faces``: the 468
  Face Mesh points of each view, projected with the true camera, those hidden by the face left out):
  ``landmark_depth_pearson``, the Pearson correlation per view between the rendered depth at each
  landmark's pixel and the landmark's true distance, averaged over views; and ``landmark_depth_corr``,
  DepthNet's DepthCorr (``export.metrics.depth_corr_sum``: per landmark, |correlation| over views, summed)
  with ``landmark_depth_corr_mean`` = that sum / landmarks counted (x 66 to compare with 3DFAW figures).
  Correlation is unchanged by any scale and offset of either depth, so nothing is aligned first: the
  model's world is the landmark solve's and its depth is seen from the solved camera, the truth from the
  generator's. Pixels the model leaves transparent (opacity < 0.5) have no rendered depth.
- Foreground: ``psnr_fg`` / ``ssim_fg``, PSNR over the foreground pixels and the SSIM map averaged over
  them (the paper's HUMBI protocol), beside the full-image figures. The foreground is the true mask where
  the data has one (``faces``), else the view's own mask; ``foreground_mask`` in the results says which.
- ``evaluate_3dfaw`` and ``humbi_views``: the same protocols on a 3DFAW- or HUMBI-layout folder
  (``export.benchmark_sets`` reads them).
- LPIPS only if the ``lpips`` package and AlexNet weights are already on this machine (never downloads).
- The mean-image baseline: the mean training image (and mean training depth) predicted for every view.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np
from tqdm import tqdm

from export.inference import render_view, source_name, surface_depth
from export.metrics import (
    Lpips,
    depth_corr_sum,
    depth_errors,
    landmark_depths,
    lpips_status,
    pearson,
    psnr,
    ssim,
)
from models.checkpoint import LoadedCheckpoint

MIN_OPACITY = 0.5  # a rendered pixel less opaque than this has no surface depth (landmark protocol)


class View(NamedTuple):
    """One view to score.

    identity: training identity (its latent); image (H, W, 3) uint8; mask (H, W) the view's own mask or
    None; K (3, 3); world_to_camera (3, 4); depth (H, W) true ray distance (0 = background) or None;
    true_mask (H, W) the true foreground (``faces``) or None; landmarks (P, 4) u, v (pixels of this
    image), true depth, visible (1 / 0), or None.
    """

    identity: int
    image: np.ndarray
    mask: np.ndarray | None
    K: np.ndarray
    world_to_camera: np.ndarray
    depth: np.ndarray | None = None
    true_mask: np.ndarray | None = None
    landmarks: np.ndarray | None = None


def spread_indices(n: int, limit: int | None) -> np.ndarray:
    """Up to ``limit`` indices evenly spread over range(n) (deterministic). ``limit=None``: all.

    >>> spread_indices(10, 3).tolist()
    [0, 4, 9]
    """
    if limit is None or limit >= n:
        return np.arange(n)
    return np.unique(np.linspace(0, n - 1, limit).round().astype(int))


def opaque_depth(pred: dict[str, np.ndarray]) -> np.ndarray:
    """(H, W) surface depth (``surface_depth``) where the rendered opacity is at least MIN_OPACITY, NaN
    elsewhere (the ray hits nothing there)."""
    return np.where(pred["opacity"] >= MIN_OPACITY, surface_depth(pred), np.nan)


def landmark_scores(
    pred: dict[str, np.ndarray], landmarks: np.ndarray
) -> tuple[dict[str, float], np.ndarray, np.ndarray]:
    """The 3DFAW protocol on one view: ({"landmark_depth_pearson", "landmark_count"}, rendered (P,),
    true (P,) depths, NaN where a landmark is hidden or the render is transparent there).

    pred as ``score_view``'s; landmarks (P, 4) u, v, true depth, visible.
    """
    marks = np.asarray(landmarks, dtype=np.float64)
    rendered, true = landmark_depths(opaque_depth(pred), marks[:, :2], marks[:, 2], marks[:, 3] > 0.5)
    count = int(np.isfinite(rendered).sum())
    return {"landmark_depth_pearson": pearson(rendered, true), "landmark_count": float(count)}, rendered, true


def score_view(
    pred: dict[str, np.ndarray],
    image: np.ndarray,
    mask: np.ndarray | None,
    depth: np.ndarray | None,
    lpips: Lpips | None,
    foreground: np.ndarray | None = None,
) -> dict[str, float]:
    """Metrics of one rendered view against its ground truth.

    pred: {"color" (H, W, 3), "opacity" (H, W), "depth" (H, W)}; image (H, W, 3) uint8 or float;
    mask (H, W) or None; depth (H, W) ground-truth ray distance (0 = background) or None; foreground
    (H, W) the mask of ``psnr_fg`` / ``ssim_fg`` (default: ``mask``; none when both are None or empty).
    """
    scores = {"psnr": psnr(pred["color"], image), "ssim": ssim(pred["color"], image)}
    foreground = mask if foreground is None else foreground
    if foreground is not None:
        inside = np.asarray(foreground)
        inside = inside > 127 if inside.dtype == np.uint8 else inside > 0.5
        if inside.any():
            scores["psnr_fg"] = psnr(pred["color"], image, inside)
            scores["ssim_fg"] = ssim(pred["color"], image, inside)
    if lpips is not None:
        scores["lpips"] = lpips(pred["color"], image)
    if depth is not None and (np.asarray(depth) > 0).any():
        errors = depth_errors(surface_depth(pred), depth, mask)
        scores.update({f"depth_{k}": v for k, v in errors.items() if k != "n_pixels"})
    return scores


def landmark_summary(rendered: list[np.ndarray], true: list[np.ndarray]) -> dict[str, float]:
    """DepthCorr over views: {"landmark_depth_corr": sum, "landmark_depth_corr_mean": sum / counted,
    "landmark_depth_corr_landmarks": counted}; rendered, true: one (P,) array per view (NaN = not seen)."""
    total, counted = depth_corr_sum(np.stack(rendered), np.stack(true))
    return {
        "landmark_depth_corr": total,
        "landmark_depth_corr_mean": total / counted if counted else math.nan,
        "landmark_depth_corr_landmarks": float(counted),
    }


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
) -> tuple[list[dict[str, float]], dict[str, float]]:
    """Render and score ``View``s with their identities' latents. Returns (per-view records, the
    DepthCorr summary of ``landmark_summary``, empty when no view has landmarks)."""
    records, rendered, true = [], [], []
    for view in tqdm(list(views), desc=desc, leave=False):
        latent = model.latents.codes[int(view.identity)].detach()
        height, width = view.image.shape[:2]
        pred = render_view(model, latent, view.K, view.world_to_camera, height, width, chunk)
        scores = score_view(pred, view.image, view.mask, view.depth, lpips, view.true_mask)
        if view.landmarks is not None:
            extra, at_marks, truth = landmark_scores(pred, view.landmarks)
            scores.update(extra)
            rendered.append(at_marks)
            true.append(truth)
        records.append({"identity": int(view.identity), **scores})
    return records, (landmark_summary(rendered, true) if rendered else {})


def cache_views(ds, indices: np.ndarray):
    """``View``s for the chosen indices of a PreparedDataset split, with its truth where it has some."""
    for i in indices:
        yield View(
            int(ds.identities[i]),
            np.asarray(ds.images[i]),
            np.asarray(ds.masks[i]),
            ds.K[i],
            ds.world_to_camera[i],
            None if ds.depths is None else np.asarray(ds.depths[i]),
            None if ds.true_masks is None else np.asarray(ds.true_masks[i]),
            None if ds.true_landmarks is None else np.asarray(ds.true_landmarks[i]),
        )


def foreground_source(ds) -> str:
    """Which mask ``psnr_fg`` / ``ssim_fg`` use for a PreparedDataset split, in words."""
    if ds.true_masks is not None:
        return "true coverage masks (the faces generator's)"
    name = str(ds.manifest.get("source", {}).get("name", ""))
    if name == "synthetic":
        return "the cache's masks (exact: ray-traced with the true cameras)"
    if name == "srn":
        return "the cache's masks (white-background threshold)"
    return f"the cache's masks ({name or 'photo'}: Selfie Segmentation, estimated, not true)"


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
            yield View(identity, image, mask, K, w2c)
    if matched == 0:
        raise ValueError(f"no instance folder in {folder} matches a training identity's source name.")


def training_preparation(train_ds):
    """(framing, PoseConfig) the training cache prepared its photos with (its manifest's settings; the
    defaults, "aligned" framing, for caches that record none)."""
    from pose import PoseConfig

    settings = train_ds.manifest.get("settings", {})
    try:
        pose_config = PoseConfig(**settings["pose"])
    except (KeyError, TypeError):
        pose_config = PoseConfig()
    return str(settings.get("framing") or "aligned"), pose_config


def prepare_or_skip(image_path: Path, resolution: int, framing: str, pose_config, skipped: Counter):
    """``pose.prepare_photo`` on one file, as the training photos were prepared; None (and a count in
    ``skipped`` by reason) when there is no face or the camera solve is rejected."""
    from pose import ImageError, NoFaceError, PoseRejectedError, load_image, prepare_photo

    try:
        return prepare_photo(load_image(image_path), resolution, framing, config=pose_config)
    except NoFaceError:
        skipped["no_face"] += 1
    except PoseRejectedError:
        skipped["pose_rejected"] += 1
    except ImageError:
        skipped["unreadable"] += 1
    return None


def humbi_views(folder: Path, train_ds, skipped: Counter):
    """Held-out ``View``s from a HUMBI-layout folder (``export.benchmark_sets.read_humbi_face``).

    A subject counts when its folder name (``subject_<n>``) is a path part of exactly one training
    identity's sources; its training images are the sources that end with an image's path inside the
    folder. Held out: that subject's other images in the frames its training images come from (its first
    frame when no training image is found in the folder). Each is prepared as the training photos were
    (landmarks, camera solve, Selfie mask at the training resolution and framing): the cache's world is
    the landmark template's frame, so HUMBI's calibration (metres, its own world) is not used to pose it.
    """
    from export.benchmark_sets import read_humbi_face

    sources = [Path(source_name(s)).parts for s in train_ds.sources]
    views = read_humbi_face(folder)
    framing, pose_config = training_preparation(train_ds)
    resolution = int(train_ds.image_size[0])
    matched = 0
    for subject in sorted({v.subject for v in views}):
        hits = {int(train_ds.identities[i]) for i, parts in enumerate(sources) if subject in parts}
        if len(hits) != 1:
            continue
        matched += 1
        identity = next(iter(hits))
        mine = [v for v in views if v.subject == subject]

        def trained(view) -> bool:
            tail = view.image_path.relative_to(folder).parts
            return any(parts[-len(tail):] == tail for parts in sources)

        frames = {v.frame for v in mine if trained(v)} or {mine[0].frame}
        for view in mine:
            if view.frame not in frames or trained(view):
                continue
            photo = prepare_or_skip(view.image_path, resolution, framing, pose_config, skipped)
            if photo is not None:
                yield View(identity, photo.image, photo.mask, photo.K, photo.world_to_camera)
    if matched == 0:
        raise ValueError(f"no subject folder in {folder} matches a training identity's source name.")


@dataclass(frozen=True)
class BenchmarkFolders:
    """The paper's evaluation sets to score besides the training cache (``export.benchmark_sets``).

    Attributes:
        humbi: a HUMBI-layout folder whose held-out views replace the cache's ``heldout/`` split.
        faw: a 3DFAW-layout folder for the depth-at-landmarks protocol (each image's latent is fitted).
        faw_subset: "test", "valid" or "train" (None: "test" when the split list exists, else "valid").
        fit: (model, image, mask, K, world_to_camera) -> latent (L,), the one-look fit ``faw`` needs.
    """

    humbi: Path | None = None
    faw: Path | None = None
    faw_subset: str | None = None
    fit: Callable | None = None


def evaluate_3dfaw(model: LoadedCheckpoint, train_ds, folders: BenchmarkFolders, max_images: int | None,
                   chunk: int) -> dict:
    """Depth at landmarks on 3DFAW images (the paper's 3DFAW protocol).

    Each image is prepared as the training photos were (``training_preparation``), a latent is fitted to
    it (``folders.fit``) and its depth rendered from the solved camera; the 66 landmarks are mapped into
    the prepared image by its crop (p' = (p - (x0, y0)) r / side) and the rendered depth there is compared
    with the stored z: ``landmark_z_pearson`` per image (signed: against z as stored) and DepthCorr
    (``landmark_depth_corr``, |correlation| per landmark over images, summed; 66 is perfect).
    """
    from export.benchmark_sets import read_3dfaw

    if folders.fit is None:
        raise ValueError("the 3DFAW protocol needs a fit function for each image's latent.")
    items = read_3dfaw(folders.faw, folders.faw_subset)
    items = [items[i] for i in spread_indices(len(items), max_images)]
    framing, pose_config = training_preparation(train_ds)
    resolution = int(train_ds.image_size[0])
    skipped: Counter = Counter()
    records, rendered, true = [], [], []
    for item in tqdm(items, desc="3DFAW", leave=False):
        photo = prepare_or_skip(item.image_path, resolution, framing, pose_config, skipped)
        if photo is None:
            continue
        latent = folders.fit(model, photo.image, photo.mask, photo.K, photo.world_to_camera)
        pred = render_view(model, latent, photo.K, photo.world_to_camera, resolution, resolution, chunk)
        x0, y0, side = photo.info["crop_box"]
        points = (item.landmarks[:, :2] - np.array([x0, y0], np.float64)) * resolution / side
        at_marks, truth = landmark_depths(opaque_depth(pred), points, item.landmarks[:, 2])
        rendered.append(at_marks)
        true.append(truth)
        records.append({"name": item.name, "orientation": item.orientation,
                        "landmark_z_pearson": pearson(at_marks, truth),
                        "landmark_count": float(np.isfinite(at_marks).sum())})
    if not records:
        raise ValueError(f"no 3DFAW image in {folders.faw} could be prepared ({dict(skipped)}).")
    summary = summarise([{k: v for k, v in r.items() if isinstance(v, float)} for r in records])
    summary = {("n_images" if k == "n_views" else k): v for k, v in summary.items()}
    return {**summary, **landmark_summary(rendered, true), "skipped": dict(skipped),
            "source": str(folders.faw), "per_image": records}


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
    for view in views:
        if view.image.shape[:2] != mean_image.shape[:2]:
            raise ValueError("the mean-image baseline needs views at the training resolution.")
        pred = {
            "color": mean_image,
            "opacity": np.ones(view.image.shape[:2]),
            "depth": mean_depth if mean_depth is not None else np.zeros(view.image.shape[:2]),
        }
        depth = view.depth if mean_depth is not None else None
        scores = score_view(pred, view.image, view.mask, depth, None, view.true_mask)
        records.append({"identity": int(view.identity), **scores})
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
        ("psnr_fg", "PSNR in the foreground (dB) ↑", "{:.2f}"),
        ("ssim_fg", "SSIM in the foreground ↑", "{:.3f}"),
        ("lpips", "LPIPS ↓", "{:.3f}"),
        ("depth_abs_rel", "depth abs rel ↓", "{:.4f}"),
        ("depth_abs_rel_scaled", "depth abs rel, median-scaled ↓", "{:.4f}"),
        ("depth_rmse", "depth RMSE ↓", "{:.4f}"),
        ("depth_corr", "depth correlation, foreground pixels ↑", "{:.3f}"),
        ("landmark_depth_pearson", "depth Pearson at landmarks, per view ↑", "{:.3f}"),
        ("landmark_depth_corr", "DepthCorr at landmarks (sum) ↑", "{:.2f}"),
        ("landmark_depth_corr_mean", "DepthCorr per landmark ↑", "{:.3f}"),
        ("landmark_depth_corr_landmarks", "landmarks in DepthCorr", "{:.0f}"),
    ]
    lines = ["| metric | " + " | ".join(t for _, t in columns) + " |", "|---" * (len(columns) + 1) + "|"]
    for key, title, fmt in metrics:
        if not any(key in results[k] for k, _ in columns):
            continue
        cells = [fmt.format(results[k][key]) if key in results[k] else "–" for k, _ in columns]
        lines.append(f"| {title} | " + " | ".join(cells) + " |")
    notes = [f"- {results[k]['skipped']}" for k in ("novel_view",) if "skipped" in results.get(k, {})]
    if "foreground_mask" in results:
        notes.append(f"- Foreground: {results['foreground_mask']}.")
    if "novel_view_foreground_mask" in results:
        notes.append(f"- Novel-view foreground: {results['novel_view_foreground_mask']}.")
    faw = results.get("3dfaw")
    if isinstance(faw, dict) and "n_images" in faw:
        notes.append(
            f"- 3DFAW ({faw['n_images']:.0f} images, {sum(faw['skipped'].values())} skipped): depth "
            f"Pearson at landmarks per image (against z as stored) {faw['landmark_z_pearson']:.3f}; "
            f"DepthCorr {faw['landmark_depth_corr']:.2f} over "
            f"{faw['landmark_depth_corr_landmarks']:.0f} landmarks."
        )
    notes.append(f"- {results['lpips_note']}")
    return "\n".join(lines) + "\n\n" + "\n".join(notes) + "\n"


def evaluate(
    model: LoadedCheckpoint,
    cache: Path,
    views_dir: Path | None = None,
    max_images: int | None = 200,
    chunk: int = 8192,
    allow_other_cache: bool = False,
    folders: BenchmarkFolders | None = None,
) -> dict:
    """Every evaluation for one checkpoint and its training cache. Returns the results dict (JSON-ready).

    A cache whose fingerprint differs from the one the checkpoint was trained on is refused (ValueError)
    unless ``allow_other_cache``: latents index identities, so another dataset's images would be scored
    against the wrong heads. ``folders`` adds a HUMBI folder's held-out views (instead of the cache's
    ``heldout/``; not with ``views_dir``) and the 3DFAW protocol (``results["3dfaw"]``).
    """
    folders = folders or BenchmarkFolders()
    if views_dir is not None and folders.humbi is not None:
        raise ValueError("give either an SRN views folder or a HUMBI folder for the novel views, not both.")
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
    per_train, marks = evaluate_views(model, cache_views(train, train_idx), lpips, chunk, "reconstruction")
    results["reconstruction"] = {**summarise(per_train), **marks}
    results["foreground_mask"] = foreground_source(train)
    results["baseline_reconstruction"] = summarise(mean_image_baseline(train, cache_views(train, train_idx)))

    novel = None
    if views_dir is not None:
        novel = list(srn_views(views_dir, train))
        novel = [novel[i] for i in spread_indices(len(novel), max_images)]
        results["novel_view_source"] = str(views_dir)
    elif folders.humbi is not None:
        skipped: Counter = Counter()
        novel = list(humbi_views(Path(folders.humbi), train, skipped))
        if not novel:
            raise ValueError(
                f"no held-out HUMBI view in {folders.humbi} could be prepared ({dict(skipped)})."
            )
        novel = [novel[i] for i in spread_indices(len(novel), max_images)]
        results["novel_view_source"] = str(folders.humbi)
        results["novel_view_skipped"] = dict(skipped)
        results["novel_view_foreground_mask"] = "Selfie Segmentation of each view (HUMBI ships no face masks)"
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
        per_novel, marks = evaluate_views(model, novel, lpips, chunk, "novel views")
        results["novel_view"] = {**summarise(per_novel), **marks}
        same_size = all(v.image.shape[:2] == train.image_size for v in novel)
        if same_size:
            results["baseline_novel_view"] = summarise(mean_image_baseline(train, novel))
    results["per_view"] = {"reconstruction": per_train, "novel_view": per_novel}
    if folders.faw is not None:
        results["3dfaw"] = evaluate_3dfaw(model, train, folders, max_images, chunk)
    return results
