"""Time breakdown of one training step at the cpu preset, Taichi renderer vs the plain-torch baseline.

    python benchmarks/train_step.py                 # cpu preset, x64, 20 measured steps per variant
    python benchmarks/train_step.py --arch vulkan --steps 10 --json runs/bench_train_step.json
    python benchmarks/train_step.py --arch cuda --preset paper --identities 128   # the paper step on a GPU

For each renderer (``renderer`` = Taichi kernels, ``renderer.reference`` = plain torch, measured in the
same run) it prints the median per step of: data, field forward, renderer forward, loss, field backward,
renderer backward, optimiser; rays/s; and the share of the step spent outside the field MLP (the goal on
CPU: renderer + data + optimiser under 15 %). Phases are measured as ``models.step_timing`` describes.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

import renderer
import renderer.reference
from benchmarks.step_report import machine, step_config, summarise, write_summary
from models.gpu_setup import enable_tf32
from models.step_timing import PhaseTimer, TimedField, breakdown_table, timed_step
from models.trainer import NullTimer, Trainer


def measure(trainer: Trainer, variants: dict, steps: int, warmup: int) -> dict[str, list[dict]]:
    """Per-step phase times for each renderer variant, alternating variants step by step so that a
    change in machine load (a shared machine) hits both alike."""
    samples: dict[str, list[dict]] = {name: [] for name in variants}
    timed = TimedField(trainer.module.field, PhaseTimer(trainer.device))
    trainer.module.field = timed
    try:
        for i in range(warmup + steps):
            for name, ops in variants.items():
                trainer.module.ops = ops
                per, rays = timed_step(trainer, timed)
                if i >= warmup:
                    samples[name].append({**per, "rays": rays})
    finally:
        trainer.module.field = timed.field
        trainer.module.ops = renderer
        trainer.timer = NullTimer()
    return samples


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default="cpu", help="Taichi arch (default cpu = x64)")
    parser.add_argument("--device", default="auto", choices=["auto", "cuda", "mps", "xpu", "cpu"],
                        help="torch device (default auto: cuda with --arch cuda, else cpu)")
    parser.add_argument("--preset", default="cpu", choices=["cpu", "paper"],
                        help="network, samples and batch of this training preset (default cpu)")
    parser.add_argument("--identities", type=int, default=None,
                        help="synthetic identities to prepare (default: the preset's; fewer prepare faster "
                             "and time the same step)")
    parser.add_argument("--tf32", choices=("on", "off"), default="on",
                        help="TF32 matrix products on a CUDA GPU that has them, as train.py (default on)")
    parser.add_argument("--steps", type=int, default=20, help="measured steps per variant (default 20)")
    parser.add_argument("--warmup", type=int, default=3, help="unmeasured steps first (default 3)")
    parser.add_argument("--cache", default="", help="prepared cache (default: the cpu preset's synthetic)")
    parser.add_argument("--json", default=None, metavar="PATH", help="also write the results as JSON")
    args = parser.parse_args(argv)

    try:
        backend = renderer.init_backend(args.arch, args.device)
    except (renderer.BackendUnavailableError, ValueError) as err:
        raise SystemExit(str(err)) from None
    tf32 = enable_tf32(backend.device, args.tf32 == "on")
    config = step_config(args.preset, args.cache, args.identities)
    with tempfile.TemporaryDirectory() as run_dir:
        trainer = Trainer(config, Path(run_dir), backend, None, set())
        variants = {"taichi": renderer, "reference": renderer.reference}
        measured = measure(trainer, variants, args.steps, args.warmup)
    results = {}
    for name, samples in measured.items():
        medians, shares, rays = summarise(samples)
        results[name] = {"ms_per_step_median": {k: v * 1e3 for k, v in medians.items()},
                         "share_of_total": shares, "rays_per_s": rays / medians["step"],
                         "share_outside_mlp": 1 - shares["field forward"] - shares["field backward"]}
        print(f"\n== renderer: {name} ({backend.arch}, torch {backend.device}), {args.preset} preset, "
              f"{args.steps} steps ==")
        print(breakdown_table(medians, rays, shares))
    taichi, ref = results["taichi"]["ms_per_step_median"], results["reference"]["ms_per_step_median"]
    renderer_ms = {}
    for name, r in results.items():
        median = r["ms_per_step_median"]
        renderer_ms[name] = median["renderer forward"] + median["renderer backward"]
    summary = {
        "machine": machine(),
        "gpu": torch.cuda.get_device_name(backend.device) if backend.device.type == "cuda" else None,
        "arch": backend.arch, "device": str(backend.device), "preset": args.preset, "tf32": tf32,
        "rays_per_step": rays, "steps": args.steps,
        "step_ratio_taichi_over_reference": taichi["step"] / ref["step"],
        "renderer_ratio_taichi_over_reference": renderer_ms["taichi"] / renderer_ms["reference"],
        "goal_share_outside_mlp_below": 0.15, "results": results}
    print(f"\nstep time Taichi / reference: {summary['step_ratio_taichi_over_reference']:.2f}x; renderer "
          f"time (fwd+bwd) Taichi / reference: {summary['renderer_ratio_taichi_over_reference']:.2f}x; "
          f"share outside the MLP with Taichi: {results['taichi']['share_outside_mlp']:.1%} "
          f"(goal < 15%: {'met' if results['taichi']['share_outside_mlp'] < 0.15 else 'NOT met'})")
    write_summary(args.json, summary)
    return summary


if __name__ == "__main__":
    main()
