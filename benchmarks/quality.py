"""Quality on synthetic heads: train with the cpu preset for a fixed budget, then measure reconstruction and
novel-view PSNR / SSIM and depth error against the mean-image baseline (the mean training image, and the
mean training depth, predicted for every view). Goal: novel-view PSNR at least 6 dB above the baseline.

    python benchmarks/quality.py                          # 128 identities, 3000 steps (cpu preset), x64
    python benchmarks/quality.py --steps 3000 --identities 64 --json quality.json --work runs/quality
    python benchmarks/quality.py -- --latent-lr-scale 3      # flags after -- go to train.py as they are

1. generates a synthetic single-view training set (one view per identity) with 3 held-out views each;
2. trains ``train.py --preset cpu`` for --steps steps, with the learning rate decaying over the whole
   run (``train.py``'s default, stated here too as ``--optim-decay-steps`` = --steps);
3. evaluates (export.evaluation.evaluate) and prints model vs baseline; a run trained with
   ``-- --render-skip-empty on`` is evaluated with its occupancy grid too (as render.py/evaluate.py
   ``--render-skip-empty on`` would).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

GOAL_DB = 6.0


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=3000, help="training steps (the fixed budget)")
    parser.add_argument("--identities", type=int, default=128, help="synthetic identities")
    parser.add_argument("--resolution", type=int, default=64)
    parser.add_argument("--arch", default="cpu", help="Taichi arch for training and evaluation")
    parser.add_argument("--max-images", type=int, default=96, help="views per evaluation, evenly spread")
    parser.add_argument("--work", type=Path, help="keep the cache and run here (default: a temp folder)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, help="write the results here")
    parser.add_argument("--reuse", action="store_true", help="with --work: evaluate its trained run again")
    parser.add_argument("train_flags", nargs="*", metavar="-- TRAIN_FLAG",
                        help="extra train.py flags after --, e.g. -- --loss-hard 0.3")
    args = parser.parse_args(argv)

    import torch

    import train
    from common.atomic import write_json
    from export.evaluation import evaluate
    from export.inference import load_model, start_renderer, use_skip_empty
    from models.checkpoint import CheckpointError, latest_checkpoint

    work = args.work or Path(tempfile.mkdtemp(prefix="lolnerf-quality-"))
    run_dir, cache = work / "run", work / "cache"
    train_argv = ["--preset", "cpu", "--arch", args.arch, "--device", "cpu", "--out", str(run_dir),
                  "--cache", str(cache), "--synthetic-identities", str(args.identities),
                  "--resolution", str(args.resolution), "--steps", str(args.steps), "--seed", str(args.seed),
                  "--preview-every", str(10**9), "--checkpoint-every", str(args.steps),
                  "--optim-decay-steps", str(args.steps), *args.train_flags]  # fmt: skip
    try:
        reuse = args.reuse and latest_checkpoint(run_dir).is_file()
    except CheckpointError:
        reuse = False
    started = time.perf_counter()
    if reuse:
        print(f"reusing the trained run in {run_dir} (--reuse)")
    else:
        train.main(train_argv)
    train_s = None if reuse else time.perf_counter() - started

    start_renderer(args.arch)
    started = time.perf_counter()
    model = load_model(latest_checkpoint(run_dir))
    skip_empty = model.config.render.skip_empty  # a run trained with it is evaluated with it too
    print(use_skip_empty(model, "on" if skip_empty else "off"))
    with torch.no_grad():
        results = evaluate(model, cache, None, args.max_images)
    eval_s = time.perf_counter() - started
    results.pop("per_view", None)

    gain = results["novel_view"]["psnr"] - results["baseline_novel_view"]["psnr"]
    results.update(
        {
            "benchmark": {
                "steps": args.steps,
                "identities": args.identities,
                "resolution": args.resolution,
                "arch": args.arch,
                "train_flags": args.train_flags,
                "render_skip_empty": skip_empty,
                "train_s": train_s,
                "eval_s": eval_s,
                "run_dir": str(run_dir),
            },
            "novel_view_gain_db": gain,
            "goal_db": GOAL_DB,
            "goal_met": bool(gain >= GOAL_DB),
        }
    )

    rows = [
        ("PSNR (dB)", "psnr", "{:.2f}"),
        ("SSIM", "ssim", "{:.3f}"),
        ("depth abs rel", "depth_abs_rel", "{:.4f}"),
        ("  median-scaled", "depth_abs_rel_scaled", "{:.4f}"),
        ("depth RMSE", "depth_rmse", "{:.4f}"),
        ("depth corr", "depth_corr", "{:.3f}"),
    ]
    print(
        f"\nquality: {args.identities} synthetic identities at {args.resolution}², {args.steps} steps "
        f"(train {'reused' if train_s is None else f'{train_s:.0f} s'}, evaluate {eval_s:.0f} s, "
        f"arch {args.arch})"
    )
    print(f"{'metric':<16}{'recon model':>13}{'recon mean':>12}{'novel model':>13}{'novel mean':>12}")
    for title, key, fmt in rows:
        cells = [
            results[s].get(key, float("nan"))
            for s in ("reconstruction", "baseline_reconstruction", "novel_view", "baseline_novel_view")
        ]
        print(
            f"{title:<16}"
            + "".join(f"{fmt.format(v):>{w}}" for v, w in zip(cells, (13, 12, 13, 12), strict=True))
        )
    verdict = "met" if gain >= GOAL_DB else "NOT met"
    print(f"novel-view PSNR gain over the mean image: {gain:+.2f} dB (goal +{GOAL_DB:.0f} dB: {verdict})")
    if args.json:
        write_json(args.json, results)
    return results


if __name__ == "__main__":
    main()
