"""Train LOLNeRF: an auto-decoder NeRF (one latent per identity, one shared field) from single views.

    python train.py                                   # built-in synthetic heads, CPU preset, a few minutes
    python train.py --dataset ffhq --data-root DIR    # photos (prepared once into a cache, then reused)
    python train.py --out runs/x --resume             # continue exactly where runs/x stopped
    torchrun --nproc_per_node 2 train.py ...          # torch.distributed (gloo on CPU, NCCL on CUDA)

Every configuration value has a flag (``--help`` lists them with both presets' defaults). The run
directory holds ``config.json``, ``metrics.jsonl``, ``previews/step_*.png`` and ``checkpoints/``.
This file sets a run up (backend, distributed, cache, resume) and reports; the presets and flags are in
``models/train_config.py`` and the loop in ``models/trainer.py``.

Fault injection for tests (debug only, not a user feature): ``--debug-nan-steps 3,4`` or the environment
variable ``LOLNERF_DEBUG_NAN_STEPS=3,4`` makes the loss NaN at those steps.
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
from pathlib import Path

import torch

from common.atomic import write_json
from dataset.cache import CacheError, LockedError, directory_lock
from models.checkpoint import CheckpointError, read_checkpoint, read_newest_checkpoint
from models.distributed import env_rank, launched_by_torchrun, pin_local_gpu, start_process_group, world
from models.field_backend import choose_device_step, choose_field_backend
from models.gpu_setup import enable_tf32, memory_plan
from models.step_timing import profile_steps
from models.train_config import (
    DataConfig,
    TrainConfig,
    build_parser,
    check_resume_compatible,
    resolve_config,
    resume_config,
    training_data,
)
from models.trainer import StopRequest, Trainer


def prepare_cache(data: DataConfig, given: set[str] = frozenset(), rebuild: bool = False,
                  verbose: bool = True) -> DataConfig:
    """``models.train_config.training_data``, with its refusals as one sentence and exit status 1."""
    from dataset.prepare import CacheMismatch
    from dataset.sources import DataRootError

    try:
        return training_data(data, given, rebuild, verbose)
    except (CacheMismatch, DataRootError, CacheError) as err:
        raise SystemExit(str(err)) from None


def parse_nan_steps(text: str) -> set[int]:
    """'3,4,5' -> {3, 4, 5} (debug fault injection)."""
    return {int(s) for s in text.replace(" ", "").split(",") if s}


def main(argv: list[str] | None = None) -> Path:
    """Train (or profile) and return the run directory."""
    args = build_parser().parse_args(argv)
    if args.profile < 0:
        raise SystemExit(f"--profile {args.profile} must be at least 1 (steps to profile), or left out.")
    if not args.dist_timeout > 0:
        raise SystemExit(f"--dist-timeout {args.dist_timeout:g} must be a positive number of minutes.")
    from renderer.backend import BackendUnavailableError, init_backend, torch_is_rocm

    distributed = launched_by_torchrun()
    starting_group = distributed and not torch.distributed.is_initialized()
    if starting_group:
        try:  # before any CUDA call: Taichi CUDA takes device 0 of what the process sees
            pin_local_gpu()
        except ValueError as err:
            raise SystemExit(str(err)) from None
    rank = world()[0] if torch.distributed.is_initialized() else env_rank()
    arch = args.arch
    if arch == "auto":
        # Without CUDA the torch field MLP (most of a step) runs on the CPU whatever Taichi uses, and a
        # Vulkan renderer copies every tensor host<->device (README, Benchmarks). So training's auto is
        # CUDA or x64; a Vulkan-only GPU is used with --arch vulkan (and --field-backend auto then runs
        # the MLP there too). ROCm torch answers torch.cuda.is_available() for an AMD GPU, which Taichi
        # CUDA cannot drive: there auto is Vulkan beside the MLP on the AMD GPU.
        if torch_is_rocm():
            arch = "vulkan"
            if rank == 0:
                print(f"[train] --arch auto: torch is a ROCm build (HIP {torch.version.hip}), so the "
                      "renderer runs on Taichi Vulkan and the MLP on the AMD GPU.")
        else:
            arch = "cuda" if torch.cuda.is_available() else "cpu"
        if arch == "cpu" and rank == 0:
            print("[train] --arch auto: torch has no CUDA, so the renderer runs on Taichi x64 beside the "
                  "CPU MLP; --arch vulkan uses a Vulkan GPU.")
    try:
        from renderer.profiling import uses_kernel_profiler

        backend = init_backend(arch, args.device,
                               kernel_profiler=args.profile > 0 and uses_kernel_profiler(arch),
                               random_seed=0, verbose=rank == 0)
    except (BackendUnavailableError, ValueError) as err:
        raise SystemExit(str(err)) from None
    if backend.device.type == "cuda" and distributed:
        # Pinned: each rank sees only its own GPU, as device 0 (torch and Taichi alike).
        backend = dataclasses.replace(backend, device=torch.device("cuda", 0))
    if starting_group:
        # NCCL for CUDA tensors, gloo for CPU ones: from the device used, not torch.cuda.is_available().
        group = start_process_group(backend.device, args.dist_timeout)
        if rank == 0:
            print(f"[train] torch.distributed: {group} for {backend.device.type} tensors, first-barrier "
                  f"timeout {args.dist_timeout:g} min.")
    if backend.device.type == "cuda":
        note = enable_tf32(backend.device, args.tf32 == "on")
        if rank == 0:
            print(f"[train] {note}.")

    field_backend, why = choose_field_backend(args.field_backend, backend.arch, backend.device)
    if rank == 0:
        print(f"[train] field MLP: {field_backend} ({why}).")
    config, overrides, preset = resolve_config(args, backend.device.type)
    if backend.device.type == "cuda" and not args.resume:
        # Resuming keeps the batch the run was started with (exact continuation).
        batch_given = any(section == "batch" for section, _ in overrides)
        try:
            config.batch, note = memory_plan(backend.device, config, batch_given)
        except ValueError as err:
            raise SystemExit(str(err)) from None
        if rank == 0:
            print(f"[train] {note}.")
    resume_payload, resume_source = None, None
    if args.resume:
        resume_source = Path(args.resume if args.resume != "auto" else (args.out or ""))
        if args.resume == "auto" and not args.out:
            raise SystemExit("--resume without a path needs --out RUN_DIR (the run to continue).")
        try:
            if resume_source.is_file():
                path, resume_payload = resume_source, read_checkpoint(resume_source)
            else:
                path, resume_payload = read_newest_checkpoint(resume_source)
        except CheckpointError as err:
            raise SystemExit(f"Cannot resume: {err}") from None
        saved = TrainConfig.from_json(resume_payload["config"])
        if args.preset and args.preset != saved.preset:
            raise SystemExit(f"Cannot resume with --preset {args.preset}: the run was trained with the "
                             f"{saved.preset} preset; drop --preset to resume, or start a new run "
                             "with another --out.")
        config = resume_config(saved, overrides)
        run_dir = Path(args.out) if args.out else path.parent.parent
    else:
        stamp = time.strftime("%Y%m%d-%H%M%S")
        default_dir = Path("runs") / f"{config.data.dataset}-{preset}-{stamp}"
        run_dir = Path(args.out) if args.out else default_dir
        if (run_dir / "checkpoints").is_dir() and any((run_dir / "checkpoints").glob("step_*.pt")):
            raise SystemExit(f"{run_dir} already holds checkpoints; pass --resume to continue that run or "
                             f"choose another --out.")

    try:
        device_step, why = choose_device_step(args.device_step, field_backend, backend.arch, backend.device,
                                              world()[1])
    except ValueError as err:
        raise SystemExit(str(err)) from None
    if config.render.skip_empty and rank == 0:
        r = config.render
        print(f"[train] empty-space skipping: on ({r.occupancy_resolution}^3 occupancy grid, every cell "
              f"occupied for the first {r.occupancy_warmup} steps, early stop at transmittance "
              f"{r.early_stop_eps:g}; --render-skip-empty off renders every sample).")
    if rank == 0:
        print(f"[train] training step: {'on the Taichi device' if device_step else 'torch tensors'} ({why}).")

    # Resuming trains on the cache as the run saved it; the fingerprint check below guards the rest.
    given = set() if resume_payload else {key for section, key in overrides if section == "data"}
    if run_dir.exists() and not run_dir.is_dir():
        raise SystemExit(f"--out {run_dir} is a file; choose a folder for the run.")
    # The cache first (it has its own lock; preparing can take hours), so a refused data root leaves
    # no run directory behind.
    if rank == 0:
        config.data = prepare_cache(config.data, given, args.rebuild_cache)
    if distributed:
        torch.distributed.barrier()
        if rank != 0:  # the cache now exists: every other rank just opens it
            config.data = prepare_cache(config.data, given, verbose=False)
    try:
        with directory_lock(run_dir, wait=False, what="--out") if rank == 0 else contextlib.nullcontext():
            return train_in(run_dir, config, overrides, args, backend, (field_backend, device_step),
                            resume_payload, resume_source)
    except LockedError as err:
        raise SystemExit(str(err)) from None
    except PermissionError as err:
        raise SystemExit(f"Cannot write the run directory {run_dir} ({err.strerror}): choose an --out you "
                         "may write to.") from None


def train_in(run_dir: Path, config: TrainConfig, overrides: dict, args, backend,
             implementation: tuple[str, bool], resume_payload, resume_source) -> Path:
    """Everything after the run directory is locked: config.json, the loop, the report.

    ``implementation``: (field backend, whether the step stays on the Taichi device)."""
    field_backend, device_step = implementation
    rank, _ = world()
    distributed = launched_by_torchrun()
    if resume_payload is not None:
        from dataset import PreparedDataset

        fingerprint = PreparedDataset(config.data.cache).fingerprint
        check_resume_compatible(TrainConfig.from_json(resume_payload["config"]), overrides, fingerprint,
                                resume_payload["fingerprint"], resume_source)
        if config.run.steps <= resume_payload["step"] and not args.profile:
            raise SystemExit(f"The run is already at step {resume_payload['step']} of --steps "
                             f"{config.run.steps}; pass a larger --steps to train on.")
    if rank == 0:
        write_json(run_dir / "config.json", config.to_json())

    from export.preview import write_preview

    trainer = Trainer(config, run_dir, backend, resume_payload, parse_nan_steps(args.debug_nan_steps),
                      field_backend, write_preview, device_step=device_step)
    if args.profile > 0:
        profile_steps(trainer, args.profile, run_dir / "profile_trace.json")
        return run_dir
    with StopRequest() as stop:
        reason = trainer.run(stop)
    if rank == 0:
        report_end(reason, trainer, run_dir, stop)
    if distributed:
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
    if reason == "diverged":
        raise SystemExit(diagnosis(trainer))
    return run_dir


def diagnosis(trainer: Trainer) -> str:
    """One paragraph on why the loss went non-finite and what to try."""
    config = trainer.config
    return (f"Training stopped at step {trainer.step}: the loss was NaN/inf for {config.run.max_bad_steps} "
            f"steps in a row, so the weights no longer produce finite values. The last checkpoint in "
            f"{trainer.run_dir / 'checkpoints'} is from before the failure. Try a smaller --optim-lr-init "
            f"(now {config.optim.lr_init}), check the dataset for NaN cameras or images, then "
            f"resume with --resume.")


def report_end(reason: str, trainer: Trainer, run_dir: Path, stop: StopRequest) -> None:
    """Print where the outputs are."""
    if reason == "signal":
        print(f"[train] {stop.signal_name} received: checkpoint written at step {trainer.step}; continue "
              f"with --out {run_dir} --resume.")
    if reason != "diverged":
        print(f"[train] run directory: {run_dir}\n"
              f"  checkpoints: {run_dir / 'checkpoints'}\n"
              f"  previews:    {run_dir / 'previews'}\n"
              f"  metrics:     {run_dir / 'metrics.jsonl'}")


if __name__ == "__main__":
    main()
