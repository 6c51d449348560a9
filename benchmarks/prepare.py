"""Benchmark: photos prepared per second, single-process against multi-process, measured in one run.

    python benchmarks/prepare.py --images 48 192 --repeats 3 --json prepare.json

The photos are seeded augmentations (flip, small rotation, scale, brightness) of the two real portraits
shipped by installed packages (scikit-image's astronaut, matplotlib's grace_hopper), written as PNG/JPEG
into a temp folder. Every repeat runs ``python -m dataset.prepare --dataset folder`` in a fresh process
into a fresh cache (landmark framing, MediaPipe Face Mesh + Selfie Segmentation + LM camera solve), so
the times include imports, worker start-up (each spawned worker builds its own MediaPipe graphs) and
cache assembly.
Medians are reported, and the multi-process speed-up is the ratio to the single-process baseline.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from common.atomic import write_json  # noqa: E402
from dataset import PrepareConfig  # noqa: E402 (after the sys.path line, so it runs from any directory)
from dataset.sources import default_workers  # noqa: E402


def portraits() -> list[np.ndarray]:
    """The two real portraits as uint8 RGB."""
    import skimage.data
    from matplotlib import cbook

    with cbook.get_sample_data("grace_hopper.jpg") as f:
        hopper = cv2.imdecode(np.frombuffer(f.read(), np.uint8), cv2.IMREAD_COLOR)[..., ::-1]
    return [skimage.data.astronaut(), np.ascontiguousarray(hopper)]


def write_augmented(folder: Path, n: int, seed: int) -> None:
    """``n`` seeded augmentations of the portraits: flip, rotation ±10°, scale 0.9-1.1, brightness ±15%."""
    rng = np.random.default_rng(seed)
    sources = portraits()
    for i in range(n):
        image = sources[i % len(sources)]
        if rng.uniform() < 0.5:
            image = image[:, ::-1]
        height, width = image.shape[:2]
        warp = cv2.getRotationMatrix2D((width / 2, height / 2), rng.uniform(-10, 10), rng.uniform(0.9, 1.1))
        image = cv2.warpAffine(np.ascontiguousarray(image), warp, (width, height),
                               borderMode=cv2.BORDER_REFLECT)
        image = np.clip(image * rng.uniform(0.85, 1.15), 0, 255).astype(np.uint8)
        suffix = ".png" if i % 2 == 0 else ".jpg"
        cv2.imwrite(str(folder / f"photo_{i:04d}{suffix}"), image[..., ::-1])


def time_build(folder: Path, workers: int, config: PrepareConfig, scratch: Path) -> tuple[float, dict]:
    """Seconds for ``python -m dataset.prepare`` to prepare the folder from scratch with ``workers``
    processes, as a user runs it (a fresh process each time, so both settings pay their start-up),
    and the manifest's counts."""
    out = scratch / f"cache_w{workers}"
    shutil.rmtree(out, ignore_errors=True)
    command = [sys.executable, "-m", "dataset.prepare", "--dataset", "folder", "--data-root", str(folder),
               "--out", str(out), "--resolution", str(config.resolution),
               "--chunk-size", str(config.chunk_size), "--workers", str(workers), "--no-progress"]
    start = time.perf_counter()
    subprocess.run(command, cwd=REPO, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    seconds = time.perf_counter() - start
    counts = json.loads((out / "manifest.json").read_text())["counts"]
    return seconds, counts


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, nargs="+", default=[48, 192],
                        help="folder sizes to prepare; a larger one shows throughput once worker start-up "
                             "is amortised (default: 48 192)")
    parser.add_argument("--resolution", type=int, default=64, help="training resolution (default: 64)")
    parser.add_argument("--workers", type=int, default=default_workers(),
                        help="processes for the multi-process run "
                             f"(default: one per core, {default_workers()})")
    parser.add_argument("--repeats", type=int, default=3, help="runs per setting; medians are reported "
                        "(default: 3)")
    parser.add_argument("--seed", type=int, default=0, help="augmentation seed (default: 0)")
    parser.add_argument("--json", default=None, help="also write the results to this JSON file")
    args = parser.parse_args(argv)
    rows = []
    with tempfile.TemporaryDirectory(prefix="lolnerf_prepare_bench_") as tmp:
        for n_images in args.images:
            rows += bench_size(Path(tmp) / f"n{n_images}", n_images, args)
    print(f"prepare 'folder' source -> {args.resolution}² ({args.repeats} repeats, medians) on "
          f"{platform.machine()} with {os.cpu_count()} CPUs; ratio = speed-up over 1 worker at that size")
    header = ("images", 7), ("workers", 8), ("median s", 9), ("images/s", 9), ("ratio", 7), ("kept", 5), \
        ("skipped", 8)
    print(" ".join(f"{name:>{width}}" for name, width in header))
    for row in rows:
        print(f"{row['images']:>7} {row['workers']:>8} {row['median_s']:>9.2f} {row['images_per_s']:>9.2f} "
              f"{row['speedup_vs_1_worker']:>6.2f}x {row['kept']:>5} {row['skipped']:>8}")
    marginal = marginal_rates(rows)
    for workers, rate in marginal.items():
        print(f"marginal rate between the two largest sizes (start-up excluded), {workers} worker(s): "
              f"{rate:.2f} images/s ({rate / marginal[1]:.2f}x)")
    if args.json:
        result = {"benchmark": "prepare", "resolution": args.resolution, "repeats": args.repeats,
                  "machine": platform.machine(), "cpus": os.cpu_count(), "python": platform.python_version(),
                  "rows": rows, "marginal_images_per_s": marginal}
        write_json(Path(args.json), result)
    return 0


def marginal_rates(rows: list[dict]) -> dict[int, float]:
    """Images per second between the two largest folder sizes, per worker count: the throughput once
    start-up (imports, spawning, MediaPipe graphs) is paid. Empty with fewer than two sizes."""
    sizes = sorted({row["images"] for row in rows})[-2:]
    if len(sizes) < 2:
        return {}
    by_key = {(row["images"], row["workers"]): row["median_s"] for row in rows}
    return {workers: round((sizes[1] - sizes[0]) / max(by_key[sizes[1], workers] - by_key[sizes[0], workers],
                                                       1e-9), 2)
            for workers in sorted({row["workers"] for row in rows})}


def bench_size(scratch: Path, n_images: int, args: argparse.Namespace) -> list[dict]:
    """Median seconds for one folder of ``n_images`` with 1 worker and with ``args.workers`` workers."""
    config = PrepareConfig(resolution=args.resolution, chunk_size=max(1, n_images // (4 * args.workers)))
    folder = scratch / "photos"
    folder.mkdir(parents=True)
    write_augmented(folder, n_images, args.seed)
    settings: dict[int, list[float]] = {1: [], args.workers: []}
    counts = {}
    for _ in range(args.repeats):
        for workers in settings:  # interleaved, so drift in machine load hits both settings alike
            seconds, counts[workers] = time_build(folder, workers, config, scratch)
            settings[workers].append(seconds)
    baseline = statistics.median(settings[1])
    rows = []
    for workers, times in settings.items():
        median = statistics.median(times)
        rows.append({"images": n_images, "workers": workers, "chunk_size": config.chunk_size,
                     "median_s": round(median, 3), "images_per_s": round(n_images / median, 2),
                     "speedup_vs_1_worker": round(baseline / median, 3),
                     "times_s": [round(t, 3) for t in times],
                     "kept": counts[workers]["kept"], "skipped": counts[workers]["skipped"]})
    return rows


if __name__ == "__main__":
    sys.exit(main())
