"""Benchmark: the Taichi renderer against the plain-torch reference, in one process.

    python benchmarks/renderer.py --arch cpu --json renderer_cpu.json

Times forward + backward of sampling and compositing for a 64 x 64 view (4,096 rays, frontal camera
7 units from the origin, bounding sphere of radius 2), exactly the renderer part of a training step:
stratified 128 -> importance 64 (from fixed coarse weights), merged with the coarse samples and their
interval lengths (``sample_importance_and_merge``: one kernel in Taichi, ``sample_importance``
then a sort in the reference) -> composite of the 192 merged samples -> backward from upstream
gradients on all four outputs (colour, opacity, depth, weights). The densities and colours stand in
for the network: fixed leaf tensors, so only renderer work is timed. Both implementations run
interleaved in each repeat (so load from other processes hits both alike) with the same seeds; each
stage is timed alone and the whole chain end to end. Prints medians and the reference / Taichi ratio;
``--json`` writes them. Each implementation draws its jitter its own way (the reference with
``torch.rand``, the kernels by hashing in-kernel; see ``renderer.reference``), so the agreement check
runs one extra pass at bin centres. It fails the run (exit status 1, after printing and writing the
JSON) when the largest colour difference exceeds ``--max-color-diff`` or the largest dσ difference
exceeds ``--max-dsigma-diff``. The defaults are about four times the largest differences measured on
the default inputs (x64: colour 3.9e-6, dσ 2.1e-5; Vulkan on lavapipe: 4.5e-6, 3.5e-5; the same with
``--threads 1``): margin for other CPUs and drivers, while a colour scaled by 1 + 1e-4 (1.0e-4 off)
or a dσ scaled by 1 + 1e-3 (1.9e-4 off) already fails. Other ``--side/--coarse/--fine`` may need
other limits.

On a machine shared with other jobs, wall times mislead: torch's OpenMP threads wait for each other
when another process holds a core, which inflates the reference far more than Taichi (we saw the
reference go from ~50 to ~300 ms). ``--threads 1 --clock cpu`` measures this process's CPU time on
one thread for both, which is stable under load; on an idle machine use the defaults as well.
With ``--arch vulkan`` on lavapipe, lavapipe's own worker threads compete with torch's, so compare
with ``--threads 1`` there too.

torch's OpenMP (libgomp) workers spin after each parallel op before they sleep, and on 2 cores that
spinning takes the core Taichi's second thread needs right after. ``GOMP_SPINCOUNT=30000`` (set in
the environment before the run; libgomp reads it when it loads) shortens the spin: measured here, it
left the reference's time unchanged and cut Taichi's (README). The JSON records the OpenMP settings.
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
from renderer import reference

STAGES = ("stratified", "importance_merge", "composite_forward", "composite_backward")
# Agreement thresholds (max |Taichi - reference| at bin centres): ~4x the largest differences
# measured on the default inputs, x64 3.9e-6 / 2.1e-5, Vulkan (lavapipe) 4.5e-6 / 3.5e-5.
MAX_COLOR_DIFF = 2e-5
MAX_DSIGMA_DIFF = 1.5e-4


def make_inputs(n_side: int, n_coarse: int, n_fine: int, device: torch.device | str = "cpu") -> dict:
    """Rays of a frontal 64x64-style view, fixed coarse weights and fixed per-sample network outputs,
    built on the CPU (the same numbers for every device) and then moved to ``device``.

    >>> x = make_inputs(4, 8, 4)
    >>> x["sigmas"].shape, x["sigmas"].requires_grad
    (torch.Size([16, 12]), True)
    """
    built = _cpu_inputs(n_side, n_coarse, n_fine)
    moved = {}
    for key, value in built.items():
        if torch.is_tensor(value):
            value = value.detach().to(device).requires_grad_(value.requires_grad)
        elif isinstance(value, list):
            value = [item.to(device) for item in value]
        moved[key] = value
    return moved


def _cpu_inputs(n_side: int, n_coarse: int, n_fine: int) -> dict:
    K = torch.tensor([[2.0 * n_side, 0, n_side / 2], [0, 2.0 * n_side, n_side / 2], [0, 0, 1]])
    w2c = torch.tensor([[1.0, 0, 0, 0], [0, 1, 0, 0], [0, 0, 1, 7]])
    v, u = torch.meshgrid(torch.arange(n_side), torch.arange(n_side), indexing="ij")
    pixels = torch.stack([u, v], -1).reshape(-1, 2).float()
    rays = reference.generate_rays(pixels, K, w2c, radius=2.0)

    # A soft sphere of radius 1.5 stands in for a head: density 20 inside, fading over 0.1 units.
    def density(t):
        points = rays.origins[:, None] + t[..., None] * rays.directions[:, None]
        return 20 * torch.sigmoid((1.5 - points.norm(dim=-1)) / 0.1)

    t_coarse = reference.sample_stratified(rays.near, rays.far, n_coarse)
    coarse = reference.composite(
        density(t_coarse),
        torch.ones(*t_coarse.shape, 3),
        t_coarse,
        reference.sample_deltas(t_coarse, rays.far),
        0.0,
    )
    n_rays, n_all = pixels.shape[0], n_coarse + n_fine
    g = torch.Generator().manual_seed(0)
    return {
        "near": rays.near,
        "far": rays.far,
        "coarse_weights": coarse.weights,
        "n_coarse": n_coarse,
        "n_fine": n_fine,
        "sigmas": density(reference.sample_stratified(rays.near, rays.far, n_all)).requires_grad_(),
        "rgbs": torch.rand(n_rays, n_all, 3, generator=g).requires_grad_(),
        "background": torch.rand(n_rays, 3, generator=g).requires_grad_(),
        "upstream": [
            torch.randn(n_rays, 3, generator=g),
            torch.randn(n_rays, generator=g),
            torch.randn(n_rays, generator=g),
            torch.randn(n_rays, n_all, generator=g),
        ],
    }


def run_pipeline(impl, x: dict, seed: int | None, clock: Callable[[], float]) -> tuple[dict, tuple]:
    """One renderer pass; returns per-stage seconds and (color, grad sigmas) for the agreement check.
    ``seed=None`` puts every sample at its bin centre (no jitter)."""
    g = None if seed is None else torch.Generator().manual_seed(seed)
    marks = [clock()]
    t = impl.sample_stratified(x["near"], x["far"], x["n_coarse"], g)
    marks.append(clock())
    _, t_all, _, deltas = impl.sample_importance_and_merge(
        t, x["coarse_weights"], x["n_fine"], x["near"], x["far"], g
    )
    marks.append(clock())
    out = impl.composite(x["sigmas"], x["rgbs"], t_all, deltas, x["background"])
    marks.append(clock())
    # The upstream gradients go straight into the outputs' backward (no loss built from them, whose
    # own multiply, sum and their backward would be torch work timed as if it were the renderer's).
    grads = torch.autograd.grad(out, [x["sigmas"], x["rgbs"], x["background"]], grad_outputs=x["upstream"])
    marks.append(clock())
    times = {stage: marks[i + 1] - marks[i] for i, stage in enumerate(STAGES)}
    times["total"] = sum(times[s] for s in STAGES)
    return times, (out.color.detach(), grads[0])


def _sync() -> None:
    """Wait for Taichi's and (on a GPU) torch's queued work, so a clock reading ends the timed work."""
    ti.sync()
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


def synced_wall_clock() -> float:
    _sync()
    return time.perf_counter()


def synced_cpu_clock() -> float:
    """CPU seconds of this process (all threads): insensitive to other processes competing for cores."""
    _sync()
    return time.process_time()


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark; returns 0, or 1 when the outputs disagree with the reference past the limits."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--arch", default="cpu", choices=["auto", "cuda", "vulkan", "metal", "cpu"])
    parser.add_argument("--device", default="auto", choices=["auto", "cuda", "mps", "xpu", "cpu"],
                        help="torch device for the tensors (default auto: cuda with --arch cuda, else cpu)")
    parser.add_argument("--side", type=int, default=64, help="rays = side^2 (default 64 -> 4,096 rays)")
    parser.add_argument("--coarse", type=int, default=128)
    parser.add_argument("--fine", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None, help="CPU threads for torch and Taichi")
    parser.add_argument(
        "--clock",
        choices=["wall", "cpu"],
        default="wall",
        help="wall: elapsed time; cpu: this process's CPU time (robust on a shared machine)",
    )
    parser.add_argument(
        "--max-color-diff",
        type=float,
        default=MAX_COLOR_DIFF,
        help="fail (exit 1) when max |colour - reference| at bin centres exceeds this",
    )
    parser.add_argument(
        "--max-dsigma-diff",
        type=float,
        default=MAX_DSIGMA_DIFF,
        help="fail (exit 1) when max |dsigma - reference| at bin centres exceeds this",
    )
    parser.add_argument("--json", type=Path, default=None, help="write the results here")
    args = parser.parse_args(argv)

    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        backend = renderer.init_backend(arch=args.arch, device=args.device, cpu_threads=args.threads)
    except (renderer.BackendUnavailableError, ValueError) as err:
        raise SystemExit(str(err)) from None
    x = make_inputs(args.side, args.coarse, args.fine, backend.device)
    impls = {"reference": reference, "taichi": renderer}
    clock = synced_cpu_clock if args.clock == "cpu" else synced_wall_clock
    samples = {name: {s: [] for s in (*STAGES, "total")} for name in impls}
    for repeat in range(args.warmup + args.repeats):
        for name, impl in impls.items():
            times, _ = run_pipeline(impl, x, seed=repeat, clock=clock)
            if repeat >= args.warmup:
                for stage, seconds in times.items():
                    samples[name][stage].append(seconds * 1e3)
    results = {name: run_pipeline(impl, x, seed=None, clock=clock)[1] for name, impl in impls.items()}
    color_diff = (results["taichi"][0] - results["reference"][0]).abs().max().item()
    grad_diff = (results["taichi"][1] - results["reference"][1]).abs().max().item()
    # ``not <=`` so that a NaN difference fails too.
    failures = [
        f"max |{what} diff| {diff:.2e} exceeds {limit:.2e} (--max-{flag}-diff)"
        for what, flag, diff, limit in (
            ("colour", "color", color_diff, args.max_color_diff),
            ("dsigma", "dsigma", grad_diff, args.max_dsigma_diff),
        )
        if not diff <= limit
    ]

    medians = {name: {s: statistics.median(v) for s, v in stages.items()} for name, stages in samples.items()}
    n_rays = args.side * args.side
    print(
        f"\n{n_rays} rays x {args.coarse + args.fine} samples, Taichi arch={backend.arch}, "
        f"torch device={backend.device}, "
        f"{args.repeats} repeats, medians in ms of {args.clock} time "
        f"(threads: torch {torch.get_num_threads()}, cpu cores {os.cpu_count()})"
    )
    print(f"{'stage':<20} {'reference':>10} {'taichi':>10} {'ratio':>7}")
    for stage in (*STAGES, "total"):
        ref_ms, ti_ms = medians["reference"][stage], medians["taichi"][stage]
        print(f"{stage:<20} {ref_ms:>10.3f} {ti_ms:>10.3f} {ref_ms / ti_ms:>6.2f}x")
    ratio = medians["reference"]["total"] / medians["taichi"]["total"]
    print(
        f"Taichi {backend.arch} is {ratio:.2f}x the torch reference end to end "
        f"(max |colour diff| {color_diff:.2e}, max |dsigma diff| {grad_diff:.2e})"
    )

    if args.json:
        report = {
            "benchmark": "renderer",
            "arch": backend.arch,
            "device": str(backend.device),
            "gpu": torch.cuda.get_device_name(backend.device) if backend.device.type == "cuda" else None,
            "n_rays": n_rays,
            "n_samples": args.coarse + args.fine,
            "coarse": args.coarse,
            "fine": args.fine,
            "repeats": args.repeats,
            "clock": args.clock,
            "medians_ms": medians,
            "ratio_total": ratio,
            "ratio_per_stage": {
                s: medians["reference"][s] / medians["taichi"][s] for s in (*STAGES, "total")
            },
            "max_abs_color_diff": color_diff,
            "max_abs_dsigma_diff": grad_diff,
            "agreement": {
                "max_color_diff": args.max_color_diff,
                "max_dsigma_diff": args.max_dsigma_diff,
                "ok": not failures,
            },
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
        args.json.parent.mkdir(parents=True, exist_ok=True)
        write_json(args.json, report)
        print(f"wrote {args.json}")
    for failure in failures:
        print(f"agreement check FAILED: {failure}", file=sys.stderr)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
