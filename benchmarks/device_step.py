"""The training step three ways, in one run: torch field on torch tensors, Taichi field on torch tensors,
and the device-resident step (``models.device_step``), with the bytes each copies host <-> device.

    python benchmarks/device_step.py --arch vulkan              # the cpu preset, 10 measured steps each
    python benchmarks/device_step.py --arch cpu --steps 20 --json runs/bench_device_step.json

Variants alternate step by step, so a change in machine load hits all alike. For each it prints the
median ms per step and per phase (``models.step_timing``), rays/s, and the megabytes per step that
Taichi copies for torch-tensor arguments (Vulkan and Metal only; zero on x64 and CUDA, which read
torch tensors in place) or that the device step uploads and downloads; then each variant's step time
over the first variant's. On a software Vulkan driver (lavapipe) the "device" is the CPU, so the copies
cost little and the kernels run slower than torch's CPU matmuls: the figures that matter for a Vulkan
GPU need one (README, Benchmarks, says which machine measured what).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import renderer
from benchmarks.step_report import machine, step_config, summarise, write_summary
from models.step_timing import PhaseTimer, TimedField, timed_step
from models.trainer import NullTimer, Trainer
from renderer.backend import TORCH_COPIES

VARIANTS = {  # name: (field backend, device-resident step)
    "torch field, torch tensors": ("torch", False),
    "taichi field, torch tensors": ("taichi", False),
    "taichi field, device-resident": ("taichi", True),
}


def measure(trainers: dict[str, Trainer], steps: int, warmup: int) -> dict[str, list[dict]]:
    """Per-step phase times and copied bytes of each trainer, alternating trainers step by step."""
    samples: dict[str, list[dict]] = {name: [] for name in trainers}
    timed = {name: TimedField(t.module.field, PhaseTimer(t.device)) for name, t in trainers.items()}
    for name, t in trainers.items():
        t.module.field = timed[name]
    try:
        for i in range(warmup + steps):
            for name, t in trainers.items():
                TORCH_COPIES.reset()
                per, rays = timed_step(t, timed[name])
                moved = TORCH_COPIES.bytes * 2  # each torch-tensor argument goes to the device and back
                if t.device_step is not None:
                    moved += t.device_step.transfers.uploaded + t.device_step.transfers.downloaded
                if i >= warmup:
                    samples[name].append({**per, "rays": rays, "bytes": moved})
    finally:
        for name, t in trainers.items():
            t.module.field = timed[name].field
            t.timer = NullTimer()
    return samples


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default="vulkan", help="Taichi arch (default vulkan)")
    parser.add_argument("--steps", type=int, default=10, help="measured steps per variant (default 10)")
    parser.add_argument("--warmup", type=int, default=2, help="unmeasured steps first (default 2)")
    parser.add_argument("--cache", default="", help="prepared cache (default: the cpu preset's synthetic)")
    parser.add_argument("--json", default=None, metavar="PATH", help="also write the results as JSON")
    args = parser.parse_args(argv)
    if args.steps < 1 or args.warmup < 0:
        raise SystemExit("--steps must be at least 1 and --warmup at least 0.")

    backend = renderer.init_backend(args.arch, "cpu")
    config = step_config("cpu", args.cache)
    with tempfile.TemporaryDirectory() as run_dir:
        trainers = {name: Trainer(config, Path(run_dir) / str(i), backend, None, set(), field_backend,
                                  device_step=device_step)
                    for i, (name, (field_backend, device_step)) in enumerate(VARIANTS.items())}
        measured = measure(trainers, args.steps, args.warmup)
    results = {}
    for name, samples in measured.items():
        medians, _, rays = summarise(samples)
        medians = {k: v * 1e3 for k, v in medians.items()}
        results[name] = {"ms_per_step_median": medians, "rays_per_s": rays / medians["step"] * 1e3,
                         "mb_copied_per_step": statistics.median(s["bytes"] for s in samples) / 1e6}
    base = next(iter(results))
    print(f"\n== training step, cpu preset, Taichi {backend.arch}, {args.steps} steps per variant ==")
    print(f"{'variant':<32} {'ms/step':>9} {'field fwd':>10} {'field bwd':>10} {'rays/s':>9} "
          f"{'MB copied':>10} {'vs first':>9}")
    for name, r in results.items():
        m = r["ms_per_step_median"]
        ratio = m["step"] / results[base]["ms_per_step_median"]["step"]
        r["step_ratio_over_first"] = ratio
        print(f"{name:<32} {m['step']:>9.1f} {m.get('field forward', 0.0):>10.1f} "
              f"{m.get('field backward', 0.0):>10.1f} {r['rays_per_s']:>9.0f} "
              f"{r['mb_copied_per_step']:>10.3f} {ratio:>8.2f}x")
    summary = {"machine": machine(),
               "arch": backend.arch, "steps": args.steps, "rays_per_step": rays, "results": results}
    write_summary(args.json, summary)
    return summary


if __name__ == "__main__":
    main()
