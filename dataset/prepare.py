"""``prepare_dataset`` and its CLI: any source -> a prepared cache, idempotent, resumable, explained.

    python -m dataset.prepare --dataset ffhq --data-root ~/data/ffhq --out runs/cache/ffhq64
    python -m dataset.prepare --dataset synthetic --out runs/cache/synthetic64
    python -m dataset.prepare --dataset faces --out runs/cache/faces64

``train.py`` calls ``prepare_dataset`` with the same arguments when its cache is missing.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import fields
from pathlib import Path

from dataset.build import BuildInterrupted, build_cache, fingerprint, list_source_items
from dataset.cache import (
    CacheError,
    claim_cache_dir,
    directory_lock,
    is_up_to_date,
    read_manifest,
    remove_partial,
)
from dataset.config import PrepareConfig
from dataset.faces import FacesConfig, FacesSource
from dataset.sources import PHOTO_SOURCES, REASONS, DataRootError, default_workers
from dataset.srn import SrnSource
from dataset.synthetic import SyntheticConfig, SyntheticSource
from pose.config import SOLVE_POINTS

SOURCES = {**PHOTO_SOURCES, "srn": SrnSource()}
GENERATED = ("synthetic", "faces")  # sources without a data root: they draw their own identities
DATASETS = (*GENERATED, *SOURCES)
SUMMARY_SKIP_LINES = 50


def synthetic_config(config: PrepareConfig) -> SyntheticConfig:
    """The synthetic generator's settings implied by a PrepareConfig."""
    return SyntheticConfig(n_identities=config.synthetic_identities, train_views=config.views_per_identity,
                           heldout_views=max(config.heldout_views, 0), resolution=config.resolution,
                           seed=config.seed)


def faces_config(config: PrepareConfig) -> FacesConfig:
    """The faces generator's settings implied by a PrepareConfig."""
    return FacesConfig(n_identities=config.synthetic_identities, train_views=config.views_per_identity,
                       heldout_views=max(config.heldout_views, 0), resolution=config.resolution,
                       render_size=config.faces_render_size, cameraman_texture=config.faces_cameraman_texture,
                       seed=config.seed)


def format_summary(cache_dir: Path, up_to_date: bool = False) -> str:
    """What a build did, from its files: counts, each skipped file and why, fit quality, location."""
    manifest = read_manifest(cache_dir) or {}
    counts = manifest.get("counts", {})
    source = manifest.get("source", {})
    lines = []
    if up_to_date:
        lines.append(f"{cache_dir} is up to date (same source files and settings); nothing was rebuilt.")
    build = manifest.get("build", {})
    took = f" in {build['seconds']:.1f} s" if "seconds" in build else ""
    root = f" {source['data_root']}" if source.get("data_root") else ""
    lines.append(f"Kept {counts.get('kept', 0)} training images ({counts.get('heldout', 0)} held-out "
                 f"views) of {manifest.get('n_identities', 0)} identities from {source.get('name')}"
                 f"{root}{took}.")
    if build.get("chunks_reused"):
        lines.append(f"Resumed: {build['chunks_reused']} of {build['chunks']} chunks were already done.")
    skipped_path = Path(cache_dir) / "skipped.json"
    skipped = json.loads(skipped_path.read_text()) if skipped_path.exists() else []
    by_reason = counts.get("skipped_by_reason", {})
    if skipped:
        lines.append(f"Skipped {len(skipped)}: " + ", ".join(f"{n} {reason} ({REASONS.get(reason, reason)})"
                                                             for reason, n in by_reason.items()))
        for entry in skipped[:SUMMARY_SKIP_LINES]:
            lines.append(f"  skipped {entry['file']}: {entry['reason']}: {entry['detail']}")
        if len(skipped) > SUMMARY_SKIP_LINES:
            lines.append(f"  ... and {len(skipped) - SUMMARY_SKIP_LINES} more, listed in {skipped_path}")
    else:
        lines.append("Skipped 0.")
    fit = manifest.get("scene_fit")
    if fit:  # SRN: how the scenes were placed in the render sphere
        how = "from the data" if fit["scale_from_data"] else "as given"
        scaled = fit["estimated_radius"] * fit["world_scale"]
        lines.append(f"World scale {fit['world_scale']:.4g} ({how}): objects of radius about "
                     f"{fit['estimated_radius']:.3g} become {scaled:.3g} (render sphere 2); "
                     f"{fit['views_outside_render_sphere']} of {fit['views_sampled']} sampled views reach "
                     "beyond it.")
    if manifest.get("template"):  # photo datasets: the landmark fit's quality
        size = manifest.get("image_size", ["?"])[-1]
        lines.append(f"Median reprojection error: {manifest['median_reprojection_error_px']:.3f} px "
                     f"(at {size} px).")
    head = manifest.get("head_fit")
    if head:  # photo datasets: do the faces lie inside the render sphere at their solved cameras?
        radii = (f"face radius median {head['median_face_radius']:.3g}, largest "
                 f"{head['max_face_radius']:.3g}; render sphere {head['render_radius']:g}")
        if head["outside_render_sphere"]:
            lines.append(f"Head fit: {head['outside_render_sphere']} of {head['photos']} photos put the face "
                         f"beyond the render sphere at their solved cameras ({radii}); they are marked "
                         "\"fits\": false under head_fit in sources.json.")
        else:
            lines.append(f"Head fit: every face lies inside the render sphere at its solved camera "
                         f"({radii}).")
    lines.append(f"Cache: {Path(cache_dir).resolve()}")
    return "\n".join(lines)


def source_for(name: str, config: PrepareConfig):
    """The source component for a dataset name."""
    if name == "synthetic":
        return SyntheticSource(synthetic_config(config))
    if name == "faces":
        return FacesSource(faces_config(config))
    if name not in SOURCES:
        raise ValueError(f"Unknown dataset {name!r}; choose one of {', '.join(DATASETS)}.")
    return SOURCES[name]


def prepare_dataset(name: str, data_root: str | Path | None, out_dir: str | Path,
                    config: PrepareConfig | None = None, workers: int | None = None, *,
                    progress: bool = True, verbose: bool = True,
                    stop_after_chunks: int | None = None) -> Path:
    """Prepare ``name`` from ``data_root`` into the cache ``out_dir`` (see ``dataset.cache`` for the layout).

    Idempotent: an up-to-date cache (same fingerprint over source files and settings) is returned as
    is. Resumable: an interrupted build continues from its finished chunks. ``workers`` processes run
    in parallel (default: one per core when the source is big enough to repay a worker's start-up,
    else 1; 1 runs in this process).
    ``stop_after_chunks`` stops the build (raising ``BuildInterrupted``) after that many new chunks, as
    an interruption would: for tests. ``data_root`` is None for "synthetic" and "faces".

    >>> prepare_dataset("synthetic", None, "runs/cache/synthetic64")  # doctest: +SKIP
    PosixPath('runs/cache/synthetic64')
    """
    config = config or PrepareConfig()
    return prepare_source(source_for(name, config), data_root, out_dir, config, workers, progress=progress,
                          verbose=verbose, stop_after_chunks=stop_after_chunks)


def prepare_source(source, data_root: str | Path | None, out_dir: str | Path, config: PrepareConfig,
                   workers: int | None = None, *, progress: bool = True, verbose: bool = True,
                   stop_after_chunks: int | None = None) -> Path:
    """``prepare_dataset`` for a source component (see ``dataset.sources``) instead of a name."""
    out_dir = Path(out_dir)
    say = print if verbose else (lambda *_a, **_k: None)
    if source.needs_data_root:
        if data_root is None:
            raise DataRootError(f"The {source.name} dataset needs --data-root: a folder with "
                                f"{source.layout}.")
        data_root = Path(data_root).expanduser().absolute()
    items, unlisted = list_source_items(source, data_root, config.limit)
    extra = {}
    if hasattr(source, "resolve"):  # settings that come from the data (the SRN world scale)
        config, extra = source.resolve(data_root, items, config)
    claim_cache_dir(out_dir, data_root)  # refuses a user's folder before anything is written
    # A second process (another rank, a second shell) waits, then finds the cache done.
    with directory_lock(out_dir, wait=True, what="--out"):
        return _prepare_locked(source, data_root, out_dir, config, items, unlisted, workers, say, progress,
                               stop_after_chunks, extra)


def _prepare_locked(source, data_root, out_dir: Path, config: PrepareConfig, items: list[str],
                    unlisted: list[dict], workers: int | None, say, progress: bool,
                    stop_after_chunks: int | None, extra: dict) -> Path:
    """Under the lock: return an up-to-date cache as it is, or (re)build it and print the summary."""
    settings = {**source.settings(config), "limit": config.limit}
    source_fp, cache_fp = fingerprint(source, data_root, items, settings)
    if is_up_to_date(out_dir, cache_fp):
        remove_partial(out_dir / "partial")  # left if a finished build was cut short
        say(format_summary(out_dir, up_to_date=True))
        return out_dir
    background = source.background
    manifest = {
        "source": {"name": source.name, "data_root": None if data_root is None else str(data_root)},
        "settings": settings,
        "fingerprint": cache_fp,
        "source_fingerprint": source_fp,
        "template": None,
        "background": background if isinstance(background, str) else list(background),
        **source.manifest_extra(config),
        **extra,
    }
    workers = workers or source.default_workers(len(items))
    build_cache(source, data_root, out_dir, config, workers, manifest, items, cache_fp,
                stop_after_chunks=stop_after_chunks, progress=progress, unlisted=unlisted)
    say(format_summary(out_dir))
    return out_dir


TRAINING_FLAGS = {"dataset": "--dataset", "data_root": "--data-root", "resolution": "--resolution",
                  "synthetic_identities": "--synthetic-identities"}


class CacheMismatch(ValueError):
    """A prepared cache exists, and a setting the user gave contradicts how it was prepared."""


def default_training_cache(dataset: str, data_root: str, resolution: int, synthetic_identities: int) -> Path:
    """Where training keeps a cache it prepares itself: beside the data root, named by source and size
    (under ``data/prepared/`` for the synthetic set)."""
    if dataset in GENERATED:
        return Path("data/prepared") / f"{dataset}-{synthetic_identities}-{resolution}"
    root = Path(data_root).expanduser().resolve()
    return root.parent / f"{root.name}-prepared-{dataset}-{resolution}"


def prepared_from(cache_dir: str | Path) -> dict | None:
    """How the complete cache at ``cache_dir`` was prepared, in training's terms (dataset, data_root,
    resolution, synthetic_identities); None when no complete cache is there."""
    manifest = read_manifest(cache_dir)
    if manifest is None or "source" not in manifest or "image_size" not in manifest:
        return None
    name = manifest["source"].get("name", "")
    return {"dataset": name, "data_root": manifest["source"].get("data_root") or "",
            "resolution": int(manifest["image_size"][0]),
            "synthetic_identities": int(manifest.get("n_identities", 0)) if name in GENERATED else None}


def _same(key: str, given, prepared) -> bool:
    if key == "data_root":
        return Path(str(given)).expanduser().resolve() == Path(str(prepared)).expanduser().resolve()
    return prepared is None or given == prepared  # synthetic_identities means nothing to a photo cache


def cache_for_training(cache_dir: str | Path | None, wanted: dict, given: set[str], rebuild: bool = False,
                       verbose: bool = True) -> tuple[Path, dict]:
    """The cache to train on, and the data settings it holds: an existing complete cache as it was
    prepared, else one prepared now with ``wanted`` (dataset, data_root, resolution, synthetic_identities).

    A setting in ``given`` (the flags the user typed) that contradicts an existing cache raises
    CacheMismatch: the cache may hold hours of preparation with settings training does not know (a
    refined template, another world scale), so it is never rebuilt unless ``rebuild`` says so.

    >>> cache_for_training("data/prepared/ffhq64", {"dataset": "ffhq", ...}, {"dataset"})  # doctest: +SKIP
    (PosixPath('data/prepared/ffhq64'), {'dataset': 'ffhq', 'data_root': '/data/ffhq', ...})
    """
    if cache_dir is None or str(cache_dir) == "":
        cache_dir = default_training_cache(wanted["dataset"], wanted["data_root"], wanted["resolution"],
                                           wanted["synthetic_identities"])
    cache_dir = Path(cache_dir)
    prepared = prepared_from(cache_dir)
    if prepared is not None and not rebuild:
        described = (f"{prepared['dataset']} at {prepared['resolution']} px"
                     + (f" from {prepared['data_root']}" if prepared["data_root"] else ""))
        for key in TRAINING_FLAGS:
            if key in given and not _same(key, wanted[key], prepared[key]):
                raise CacheMismatch(
                    f"{cache_dir} holds {described}, but {TRAINING_FLAGS[key]} {wanted[key]} contradicts it: "
                    "drop the flag to train on the cache as prepared, choose another --cache, or add "
                    "--rebuild-cache to prepare it again with your settings (replacing it).")
        if verbose:
            print(f"[train] training on the prepared cache {cache_dir} as it is ({described}); "
                  "--rebuild-cache prepares it again.")
        return cache_dir, {key: value for key, value in prepared.items() if value is not None}
    if wanted["dataset"] not in GENERATED and not wanted["data_root"]:
        raise DataRootError(f"--dataset {wanted['dataset']} needs --data-root DIR pointing at the photos.")
    settings = PrepareConfig(resolution=wanted["resolution"],
                             synthetic_identities=wanted["synthetic_identities"])
    prepare_dataset(wanted["dataset"], wanted["data_root"] or None, cache_dir, settings, verbose=verbose)
    return cache_dir, {key: wanted[key] for key in TRAINING_FLAGS}


def generate_synthetic(out_dir: str | Path, config: SyntheticConfig | None = None, workers: int | None = None,
                       progress: bool = False) -> Path:
    """Render every identity into a prepared cache (with ``depths.npy`` and ``heldout/``).

    Idempotent (an up-to-date cache is left alone) and resumable, through the same build as every
    other source. Returns the cache directory.

    >>> cache = generate_synthetic("/tmp/synthetic64", SyntheticConfig(n_identities=8))  # doctest: +SKIP
    """
    config = config or SyntheticConfig()
    if config.n_identities < 1 or config.train_views < 1 or config.heldout_views < 0:
        raise ValueError("SyntheticConfig needs n_identities >= 1, train_views >= 1 and heldout_views >= 0.")
    prepare = PrepareConfig(resolution=config.resolution, views_per_identity=config.train_views,
                            heldout_views=config.heldout_views, synthetic_identities=config.n_identities,
                            seed=config.seed)
    return prepare_source(SyntheticSource(config), None, out_dir, prepare, workers, progress=progress,
                          verbose=False)


def training_cache(data: dict, given: set[str] = frozenset(), rebuild: bool = False,
                   verbose: bool = True) -> Path:
    """Open the prepared cache a training config's ``data`` section names (or prepare it), and update
    ``data`` to what it holds (dataset, data root, resolution, identities; ``cache`` resolved).

    An existing complete cache is trained on as prepared; a flag in ``given`` that contradicts it raises
    CacheMismatch (see ``cache_for_training``). Returns the cache directory.
    """
    cache, prepared = cache_for_training(data["cache"], data, given, rebuild, verbose)
    data.update(prepared, cache=str(cache.resolve()))
    return cache


def build_parser() -> argparse.ArgumentParser:
    """The CLI; every flag's help shows its default (the cpu preset's, unless --preset says otherwise)."""
    cpu, paper = PrepareConfig.cpu(), PrepareConfig.paper()
    parser = argparse.ArgumentParser(
        prog="python -m dataset.prepare", usage=argparse.SUPPRESS,  # a mistake is one line
        description="Prepare a dataset cache for LOLNeRF training: "
        "cameras from landmarks (photos, faces), given cameras (srn) or exact cameras (synthetic).")
    parser.add_argument("--dataset", required=True, choices=DATASETS, help="source format")
    parser.add_argument("--data-root", default=None, help="source folder (not needed for synthetic, faces)")
    parser.add_argument("--out", required=True, help="cache directory to create or update")
    parser.add_argument("--preset", default="cpu", choices=("cpu", "paper"),
                        help="settings preset; the flags below override it (default: cpu)")
    parser.add_argument("--workers", type=int, default=None,
                        help=f"parallel processes; 1 runs in-process (default: one per core, "
                             f"{default_workers()}, for sources big enough to repay the start-up of a "
                             "worker; in-process otherwise)")
    for f in fields(PrepareConfig):
        if f.name == "pose":
            continue
        flag = "--identities" if f.name == "synthetic_identities" else "--" + f.name.replace("_", "-")
        value, paper_value = getattr(cpu, f.name), getattr(paper, f.name)
        kind = {"framing": str, "limit": int, "srn_world_scale": float}.get(f.name, type(value))
        extra = f"; paper preset: {paper_value}" if paper_value != value else ""
        if kind is bool:  # --flag / --no-flag; unset keeps the preset's value
            parser.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction, default=None,
                                help=f"{f.metadata['help']} (default: {'on' if value else 'off'}{extra})")
            continue
        parser.add_argument(flag, dest=f.name, type=kind, default=None,
                            choices=("aligned", "landmarks") if f.name == "framing" else None,
                            help=f"{f.metadata['help']} (default: {value}{extra})")
    parser.add_argument("--max-error-fraction", type=float, default=None,
                        help=f"reject a camera fit whose error exceeds this fraction of the image width "
                             f"(default: {cpu.pose.max_error_fraction})")
    parser.add_argument("--solve-points", default=None, choices=SOLVE_POINTS,
                        help="landmarks the camera solve fits: mesh_posed = all 468 Face Mesh points (the "
                             "mean of its plain and attention models) against the calibrated template that "
                             "moves with the pose, mesh = the plain model's 468 points against the fixed "
                             "calibrated mesh template, paper5 = the paper's 5 points (default: "
                             f"{cpu.pose.solve_points}; paper5 when --template is given)")
    parser.add_argument("--template", default=None,
                        help="5-point landmark template JSON to solve cameras against, e.g. one refined by "
                             "python -m pose.fit_template; implies --solve-points paper5 (default: the "
                             "shipped template)")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar (default: shown)")
    return parser


def config_from_args(args: argparse.Namespace) -> PrepareConfig:
    """The preset with every given flag applied."""
    config = PrepareConfig.paper() if args.preset == "paper" else PrepareConfig.cpu()
    changes = {f.name: getattr(args, f.name) for f in fields(PrepareConfig)
               if f.name != "pose" and getattr(args, f.name, None) is not None}
    solve_points = args.solve_points or ("paper5" if args.template is not None else None)
    pose_changes = {name: value for name, value in (("max_error_fraction", args.max_error_fraction),
                                                    ("solve_points", solve_points),
                                                    ("template_path", args.template)) if value is not None}
    if pose_changes:
        changes["pose"] = config.pose.with_(**pose_changes)
    return config.with_(**changes)


def main(argv: list[str] | None = None) -> int:
    """CLI entry point: one clear line on bad input, exit status 2; 3 when stopped early."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.workers is not None and args.workers < 1:
        parser.error(f"argument --workers: {args.workers} must be at least 1 (1 runs in-process).")
    if args.max_error_fraction is not None and not 0 < args.max_error_fraction < float("inf"):
        parser.error(f"argument --max-error-fraction: {args.max_error_fraction} must be a positive number.")
    try:
        if args.template is not None:
            from pose.template import template_metadata

            template_metadata(args.template)  # a missing or broken template is found before any work
        prepare_dataset(args.dataset, args.data_root, args.out, config_from_args(args), args.workers,
                        progress=not args.no_progress)
    except (DataRootError, CacheError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except BuildInterrupted as err:
        print(str(err), file=sys.stderr)
        return 3
    except KeyboardInterrupt:
        print("Interrupted; finished chunks are kept under the cache's partial/ folder: rerun the same "
              "command to continue.", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
