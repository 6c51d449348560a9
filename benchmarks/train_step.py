"""Time breakdown of one training step at the cpu preset, Taichi renderer vs the plain-torch baseline.

    python benchmarks/train_step.py                 # cpu preset, x64, 20 measured steps per variant
    python benchmarks/train_step.py --arch vulkan --steps 10 --json runs/bench_train_step.json
    python benchmarks/train_step.py --arch cuda --preset paper --identities 128   # the paper step on a GPU

For each renderer (``renderer`` = Taichi kernels, ``renderer.reference`` = plain torch, measured in the
same run) it prints the median per step of: data, field forward, renderer forward, loss, field backward,
renderer backward, optimiser; rays/s; and the share of the step spent outside the field MLP (the goal on
CPU: renderer + data + optimiser under 15 %). Phases are measured as ``models.step_timing`` describes.

    python benchmarks/train_step.py --render-skip-empty off on      # skipping empty space, both ways

With ``--render-skip-empty`` (the cpu preset with torch on the CPU; ``--preset``, ``--identities`` and
``--device`` do not apply) it instead trains ``--pretrain`` steps with skipping on (so that the field
has empty space and the grid has left warm-up), then alternates measured steps with skipping off and on
(one value alone measures that one) and reports, per setting, the step time in ms (median; with "on"
the grid update's cost is spread over its period and listed apart) and the field evaluations per ray.
``--device-step`` times the device-resident step (Taichi field, every array a ``ti.ndarray``) both ways:

    python benchmarks/train_step.py --arch vulkan --render-skip-empty off on --device-step --checkpoint CKPT
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

import renderer
import renderer.reference
from benchmarks.step_report import machine, step_config, summarise, write_summary
from models.gpu_setup import enable_tf32
from models.render import RenderConfig
from models.step_timing import PhaseTimer, TimedField, breakdown_table, timed_step
from models.train_config import TrainConfig, training_data
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
    parser.add_argument("--render-skip-empty", nargs="+", choices=("off", "on"), default=None,
                        help="measure training steps with empty-space skipping off and/or on instead")
    parser.add_argument("--checkpoint", default=None, metavar="PATH",
                        help="with --render-skip-empty: start from this trained checkpoint (its config; the "
                             "grid is estimated from it before measuring) instead of pre-training")
    parser.add_argument("--pretrain", type=int, default=100,
                        help="steps trained before a --render-skip-empty measurement, the grid's warm-up "
                             "being the first half of them (default 100)")
    parser.add_argument("--occupancy-codes", type=int, default=None,
                        help="with --render-skip-empty: latent codes per grid update (default: the preset's)")
    parser.add_argument("--occupancy-fraction", type=float, default=None,
                        help="with --render-skip-empty: share of cells evaluated per update (default: the "
                             "preset's)")
    parser.add_argument("--occupancy-every", type=int, default=None,
                        help="with --render-skip-empty: steps between grid updates (default: the preset's)")
    parser.add_argument("--device-step", action="store_true",
                        help="with --render-skip-empty: time the device-resident step (models.device_step, "
                             "the Taichi field; what a Vulkan or Metal GPU trains with) instead of the "
                             "torch-tensor step")
    parser.add_argument("--cpu-preset-step", action="store_true",
                        help="with --checkpoint: time the cpu preset's samples per ray and batch (at most "
                             "the checkpoint's identities) on the checkpoint's networks")
    args = parser.parse_args(argv)
    if args.device_step and not args.render_skip_empty:
        parser.error("--device-step times the device-resident step with --render-skip-empty off and/or on; "
                     "add --render-skip-empty (benchmarks/device_step.py times the dense steps).")
    if args.render_skip_empty:
        return main_skip_empty(args)

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


def measure_skip_empty(trainer: Trainer, settings: list[str], steps: int, warmup: int) -> dict[str, list]:
    """Per-step phase times and field evaluations per ray for skipping off/on, alternating step by step.

    On the torch-tensor path both settings train the same trainer (both see the same, evolving model).
    With the device-resident step (``--device-step``) they are two ``DeviceTrainStep``s made from the
    same state, one dense and one through the grid (each trains its own device copy of the networks)."""
    import time

    from models.skip_empty import SkipStats

    occupancy = trainer.module.occupancy
    cfg = trainer.module.render_config
    skip_step = trainer.device_step  # None on the torch-tensor path; else made with the occupancy grid
    steps_by_setting = {}
    if skip_step is not None:
        from models.device_step import DeviceTrainStep

        trainer.sync_to_torch()
        steps_by_setting = {"off": DeviceTrainStep(trainer.field, trainer.background, trainer.latents,
                                                   trainer.optimizers, cfg, trainer.config.loss),
                            "on": skip_step}  # fmt: skip

    def use(name: str) -> None:
        if skip_step is not None:
            trainer.device_step = steps_by_setting[name]
        else:
            trainer.module.occupancy = occupancy if name == "on" else None

    def update_grid() -> None:
        if skip_step is not None:
            skip_step.update_occupancy(trainer.step, trainer.ray_generator, force=True)
        else:
            occupancy.update(trainer.step, timed.field, trainer.latents.codes, trainer.ray_generator)

    samples: dict[str, list] = {name: [] for name in settings}
    timed = TimedField(trainer.module.field, PhaseTimer(trainer.device))
    trainer.module.field = timed
    every, occupancy.every = occupancy.every, 10**9  # updates are timed apart, once per measured step
    try:
        for i in range(warmup + steps):
            for name in settings:
                use(name)
                per, rays = timed_step(trainer, timed)
                trainer.step += 1
                evals = SkipStats.last["field_per_ray"] if name == "on" else float(cfg.n_coarse + cfg.n_fine)
                if name == "on":
                    started = time.perf_counter()
                    update_grid()
                    per["grid update"] = time.perf_counter() - started
                if i >= warmup:
                    samples[name].append({**per, "rays": rays, "field_per_ray": evals})
    finally:
        trainer.module.field = timed.field
        trainer.module.occupancy = occupancy
        trainer.device_step = skip_step
        occupancy.every = every
        trainer.timer = NullTimer()
    return samples


def main_skip_empty(args) -> dict:
    """``--render-skip-empty``: see the module docstring."""
    import time

    from models.checkpoint import read_checkpoint

    try:  # the skip-empty comparison runs its field on the CPU (the cpu preset's setting)
        backend = renderer.init_backend(args.arch, "cpu")
    except (renderer.BackendUnavailableError, ValueError) as err:
        raise SystemExit(str(err)) from None
    payload = None
    if args.checkpoint:
        payload = read_checkpoint(Path(args.checkpoint), "cpu")
        config = TrainConfig.from_json(payload["config"])
        if args.cpu_preset_step:  # the checkpoint's networks, the cpu preset's samples and batch
            cpu = TrainConfig.cpu()
            config.render = dataclasses.replace(config.render, n_coarse=cpu.render.n_coarse,
                                                n_fine=cpu.render.n_fine)
            config.batch = dataclasses.replace(cpu.batch, identities=min(cpu.batch.identities,
                                                                          config.data.synthetic_identities))
            payload["rng"]["ranks"] = []  # another batch shape: the sampler starts from a fresh seed
        pretrain = 0
    else:
        config = TrainConfig.cpu()
        config.data.cache = args.cache
        config.optim.decay_steps = config.run.steps  # as train.py resolves it
        pretrain = args.pretrain
    # The grid's schedule is this version's cpu preset (a dense run's checkpoint has none of its own),
    # with --occupancy-codes/--occupancy-fraction/--occupancy-every applied; warm-up ends halfway through
    # pre-training (the default 256 steps would take minutes here).
    preset = RenderConfig.cpu()
    given = {"occupancy_codes": args.occupancy_codes, "occupancy_fraction": args.occupancy_fraction,
             "occupancy_every": args.occupancy_every}
    schedule = {key: getattr(preset, key) if value is None else value for key, value in given.items()}
    schedule.update({
        "occupancy_resolution": preset.occupancy_resolution, "early_stop_eps": preset.early_stop_eps})
    config.render = dataclasses.replace(config.render, skip_empty=True, occupancy_warmup=pretrain // 2,
                                        **schedule)
    config.data = training_data(config.data)
    with tempfile.TemporaryDirectory() as run_dir:
        field_backend = "taichi" if args.device_step else "torch"
        trainer = Trainer(config, Path(run_dir), backend, payload, set(), field_backend,
                          device_step=args.device_step)
        if payload is not None:  # a dense run's checkpoint: estimate the grid from every cell first
            trainer.module.occupancy.update(trainer.step, trainer.field, trainer.latents.codes)
            if trainer.device_step is not None:
                trainer.device_step.grid.upload()
        started = time.perf_counter()
        for _ in range(pretrain):
            trainer.train_step()
            trainer.step += 1
        pretrain_s = time.perf_counter() - started
        occupancy = trainer.module.occupancy
        measured = measure_skip_empty(trainer, args.render_skip_empty, args.steps, args.warmup)
        update_s = statistics.median(s["grid update"] for s in measured.get("on", [{"grid update": 0.0}]))
    cfg = trainer.module.render_config
    results = {}
    for name, samples in measured.items():
        phases = [{k: v for k, v in s.items() if k not in ("field_per_ray", "grid update")} for s in samples]
        medians, shares, rays = summarise(phases)
        amortised = update_s / cfg.occupancy_every if name == "on" else 0.0
        results[name] = {
            "step_ms": medians["step"] * 1e3,
            "step_ms_with_grid_update": (medians["step"] + amortised) * 1e3 if name == "on" else None,
            "field_evals_per_ray": statistics.mean(s["field_per_ray"] for s in samples),
            "ms_per_step_median": {k: v * 1e3 for k, v in medians.items()}, "rays_per_step": rays}
        step_kind = "device-resident step" if args.device_step else "torch-tensor step"
        print(f"\n== --render-skip-empty {name} ({backend.arch}, {step_kind}), {cfg.n_coarse} + {cfg.n_fine} "
              f"samples, {rays} rays, {args.steps} steps ==")
        print(breakdown_table(medians, rays, shares))
        print(f"field evaluations per ray: {results[name]['field_evals_per_ray']:.1f}")
    summary = {
        "machine": machine(),
        "arch": backend.arch, "device_step": args.device_step, "steps": args.steps,
        "pretrain_steps": pretrain, "checkpoint": args.checkpoint,
        "samples_per_ray": [cfg.n_coarse, cfg.n_fine], "cpu_preset_step": args.cpu_preset_step,
        "rays_per_step": results[next(iter(results))]["rays_per_step"],
        "pretrain_s": pretrain_s, "grid_update_ms": update_s * 1e3,
        "grid_update_every": cfg.occupancy_every, "grid_resolution": cfg.occupancy_resolution,
        "grid_codes": cfg.occupancy_codes, "grid_fraction": cfg.occupancy_fraction,
        "occupied_fraction": occupancy.grid.occupied_fraction(),
        "occupied_before_dilation": float(occupancy.grid.core.float().mean()), "results": results}
    if "off" in results and "on" in results:
        off, on = results["off"], results["on"]
        summary["step_ratio_off_over_on"] = off["step_ms"] / on["step_ms_with_grid_update"]
        summary["field_evals_ratio_off_over_on"] = off["field_evals_per_ray"] / on["field_evals_per_ray"]
        print(f"\nskip-empty on vs off: step {summary['step_ratio_off_over_on']:.2f}x faster (grid update "
              f"{update_s * 1e3:.0f} ms every {cfg.occupancy_every} steps included), field evaluations per "
              f"ray {summary['field_evals_ratio_off_over_on']:.2f}x fewer; occupied cells "
              f"{summary['occupied_fraction']:.1%} of {cfg.occupancy_resolution}^3")
    write_summary(args.json, summary)
    return summary


if __name__ == "__main__":
    main()
