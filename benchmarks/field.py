"""Benchmark: the conditioned field's forward + backward, torch ``ConditionedField`` vs ``TaichiField``.

    python benchmarks/field.py --arch cpu --json runs/bench_field_cpu.json
    python benchmarks/field.py --arch vulkan --presets cpu --threads 1 --clock cpu

For each preset (``cpu``: 4 x 64, ``paper``: 8 x 256, both with 64-d latents in ``chunks`` mode) both
implementations get the same state dict, points and latents; one repeat runs each of them once,
interleaved (so load from other processes hits both alike): forward, then backward from fixed
upstream gradients on sigma and rgb (gradients for every parameter and the latents). Prints the
median forward, backward and total milliseconds and the torch / Taichi ratio (above 1: Taichi is
faster), and the largest relative difference of the outputs and gradients, between the two and of
each against the torch field run in float64; ``--json`` writes them.

The clocks and the ``--threads`` / ``--clock cpu`` advice are those of ``benchmarks/renderer.py``: on
a shared machine wall times mislead, and lavapipe's worker threads compete with torch's.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import taichi as ti
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import renderer
from common.atomic import write_json
from models.field import ConditionedField, FieldConfig
from models.taichi_field import TaichiField

PRESETS = {"cpu": FieldConfig.cpu, "paper": FieldConfig.paper}
PHASES = ("forward", "backward", "total")
LATENT_DIM = 64


def synced_wall_clock() -> float:
    ti.sync()
    return time.perf_counter()


def synced_cpu_clock() -> float:
    """CPU seconds of this process (all threads): insensitive to other processes competing for cores."""
    ti.sync()
    return time.process_time()


def make_inputs(n: int, latent_dim: int, seed: int = 0) -> dict:
    """Points in the [-2, 2]^3 bounding box, random latents and upstream gradients."""
    g = torch.Generator().manual_seed(seed)
    return {
        "points": torch.rand(n, 3, generator=g) * 4 - 2,
        "latents": torch.randn(n, latent_dim, generator=g) * 0.1,
        "grad_sigma": torch.randn(n, generator=g),
        "grad_rgb": torch.randn(n, 3, generator=g),
    }


def run_once(field: torch.nn.Module, x: dict, clock: Callable[[], float]) -> tuple[dict, list]:
    """One forward + backward; returns ({phase: seconds}, [sigma, rgb, d latents, d params...])."""
    latents = x["latents"].clone().requires_grad_()
    params = list(field.parameters())
    start = clock()
    sigma, rgb = field(x["points"], latents)
    middle = clock()
    upstream = [x["grad_sigma"], x["grad_rgb"]]
    grads = torch.autograd.grad([sigma, rgb], [latents, *params], grad_outputs=upstream)
    end = clock()
    times = {"forward": middle - start, "backward": end - middle, "total": end - start}
    return times, [sigma.detach(), rgb.detach(), *grads]


def max_relative_diff(a: list, b: list) -> float:
    """Largest over tensors of max |a - b| / max |b|."""
    pairs = zip(a, b, strict=True)
    return max(((x - y).abs().max() / y.abs().max().clamp_min(1e-12)).item() for x, y in pairs)


def bench_preset(preset: str, n: int, repeats: int, warmup: int, clock: Callable[[], float]) -> dict:
    cfg = PRESETS[preset]()
    torch.manual_seed(0)
    reference = ConditionedField(cfg, LATENT_DIM)
    taichi_field = TaichiField(cfg, LATENT_DIM)
    taichi_field.load_state_dict(reference.state_dict())
    impls = {"torch": reference, "taichi": taichi_field}
    x = make_inputs(n, LATENT_DIM)
    samples = {name: {p: [] for p in PHASES} for name in impls}
    outputs = {}
    for repeat in range(warmup + repeats):
        for name, field in impls.items():
            times, outputs[name] = run_once(field, x, clock)
            if repeat >= warmup:
                for phase, seconds in times.items():
                    samples[name][phase].append(seconds * 1e3)
    # The torch field in float64 as the exact answer. Either float32 result can be ~1e-2 off it in a
    # single row: a ReLU input within rounding of 0 (seen: 4e-8) takes the other branch, which changes
    # that row's latent gradient and adds or drops one sample's share of the weight gradients below.
    # Measured: torch 3e-2 (cpu preset, 16,384 rows), Taichi 6e-3 (paper preset, 4,096 rows).
    exact = ConditionedField(cfg, LATENT_DIM).double()
    exact.load_state_dict(reference.state_dict())
    _, outputs["float64"] = run_once(exact, {k: v.double() for k, v in x.items()}, clock)
    medians = {name: {p: statistics.median(v) for p, v in phases.items()} for name, phases in samples.items()}
    ratios = {p: medians["torch"][p] / medians["taichi"][p] for p in PHASES}
    return {
        "preset": preset,
        "depth": cfg.depth,
        "width": cfg.width,
        "latent_dim": LATENT_DIM,
        "n_samples": n,
        "medians_ms": medians,
        "ratio_torch_over_taichi": ratios,
        "max_relative_diff": max_relative_diff(outputs["taichi"], outputs["torch"]),
        "max_relative_error_vs_float64": {
            name: max_relative_diff([t.double() for t in outputs[name]], outputs["float64"]) for name in impls
        },
    }


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--arch", default="cpu", choices=["auto", "cuda", "vulkan", "metal", "cpu"])
    parser.add_argument("--presets", nargs="+", default=["cpu", "paper"], choices=list(PRESETS))
    parser.add_argument("--samples", type=int, default=16384, help="samples (rows) for the cpu preset")
    parser.add_argument("--paper-samples", type=int, default=4096,
                        help="samples for the paper preset (4096: ~16x the cpu preset's work per row)")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=None, help="CPU threads for torch and Taichi")
    parser.add_argument("--clock", choices=["wall", "cpu"], default="wall",
                        help="wall: elapsed time; cpu: this process's CPU time (robust on a shared machine)")
    parser.add_argument("--json", type=Path, default=None, help="write the results here")
    args = parser.parse_args(argv)
    for name in ("samples", "paper_samples", "repeats"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1")

    if args.threads:
        torch.set_num_threads(args.threads)
    backend = renderer.init_backend(arch=args.arch, device="cpu", cpu_threads=args.threads)
    clock = synced_cpu_clock if args.clock == "cpu" else synced_wall_clock
    results = []
    for preset in args.presets:
        n = args.samples if preset == "cpu" else args.paper_samples
        r = bench_preset(preset, n, args.repeats, args.warmup, clock)
        results.append(r)
        print(f"\n{preset} preset ({r['depth']} x {r['width']}, latent {LATENT_DIM}), {n} samples, Taichi "
              f"arch={backend.arch}, {args.repeats} repeats, medians in ms of {args.clock} time "
              f"(threads: torch {torch.get_num_threads()}, cpu cores {os.cpu_count()})")
        print(f"{'phase':<10} {'torch':>10} {'taichi':>10} {'ratio':>7}")
        for phase in PHASES:
            t_ms, k_ms = r["medians_ms"]["torch"][phase], r["medians_ms"]["taichi"][phase]
            print(f"{phase:<10} {t_ms:>10.2f} {k_ms:>10.2f} {t_ms / k_ms:>6.2f}x")
        ratio = r["ratio_torch_over_taichi"]["total"]
        print(f"Taichi {backend.arch} is {ratio:.2f}x torch (above 1: faster); "
              f"max relative difference of outputs and gradients {r['max_relative_diff']:.1e}; vs float64: "
              + ", ".join(f"{k} {v:.1e}" for k, v in r["max_relative_error_vs_float64"].items()))

    report = {
        "benchmark": "field",
        "arch": backend.arch,
        "repeats": args.repeats,
        "clock": args.clock,
        "results": results,
        "machine": {
            "platform": platform.platform(),
            "processor": platform.processor() or platform.machine(),
            "cpu_count": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "openmp_env": {k: os.environ.get(k) for k in ("GOMP_SPINCOUNT", "OMP_WAIT_POLICY")},
            "torch": torch.__version__,
            "taichi": ".".join(map(str, ti.__version__)),
        },
    }
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        write_json(args.json, report)
        print(f"wrote {args.json}")
    return report


if __name__ == "__main__":
    main()
