"""Where a training step's time goes: data, field forward/backward, renderer, loss, optimiser.

``profile_steps`` is ``train.py --profile N`` (with the renderer's Taichi kernel profiler and
torch.profiler); ``timed_step`` is one measured step, which ``benchmarks/train_step.py`` repeats.

Field forward time is measured around each call of the field. Field backward time is measured with two
identity autograd functions placed around the field's outputs and inputs: the backward pass reaches the
outputs' marker when the field's backward starts and the inputs' marker when it ends (the CPU autograd
engine runs one node at a time, so that interval is the field's backward). Everything else in the
backward pass is the renderer's (compositing, gathering) and the loss's.
"""

from __future__ import annotations

import time
from collections import defaultdict
from contextlib import contextmanager

import taichi as ti
import torch
from torch import nn

from renderer.backend import TORCH_COPIES, started_arch


def sync(device: torch.device) -> None:
    """Wait for queued device work (torch's CUDA queue, Taichi's Vulkan/Metal queue) so wall-clock
    timers mean something on GPUs."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    if started_arch() in ("vulkan", "metal"):
        ti.sync()


class PhaseTimer:
    """Accumulates seconds per named phase; ``per_step()`` gives means over the recorded steps."""

    def __init__(self, device: torch.device):
        self.device = device
        self.seconds: dict[str, float] = defaultdict(float)
        self.marks: dict[str, list[float]] = defaultdict(list)  # backward-pass times from _Mark
        self.steps = 0

    @contextmanager
    def phase(self, name: str):
        """Time the enclosed block (synchronised) and add it to ``name``."""
        sync(self.device)
        start = time.perf_counter()
        try:
            yield
        finally:
            sync(self.device)
            self.seconds[name] += time.perf_counter() - start

    def add(self, name: str, seconds: float) -> None:
        """Add time measured elsewhere."""
        self.seconds[name] += seconds

    def per_step(self) -> dict[str, float]:
        """Mean seconds per step of each phase."""
        return {name: total / max(self.steps, 1) for name, total in self.seconds.items()}


class _Mark(torch.autograd.Function):
    """Identity whose backward records the time at which the gradient passes through it."""

    @staticmethod
    def forward(ctx, timer, key, *tensors):
        ctx.timer, ctx.key = timer, key
        return tensors if len(tensors) > 1 else tensors[0]

    @staticmethod
    def backward(ctx, *grads):
        sync(ctx.timer.device)
        ctx.timer.marks[ctx.key].append(time.perf_counter())
        return (None, None, *grads)


class TimedField(nn.Module):
    """Wraps a field: times its forward calls and (through ``_Mark``) its backward passes."""

    def __init__(self, field: nn.Module, timer: PhaseTimer):
        super().__init__()
        self.field = field
        self.timer = timer  # may be swapped for a fresh PhaseTimer between steps

    @property
    def takes_ray_index(self) -> bool:
        """Whether the wrapped field takes packed samples with a ray index (``ConditionedField``)."""
        return getattr(self.field, "takes_ray_index", False)

    def forward(self, points: torch.Tensor, latents: torch.Tensor, ray: torch.Tensor | None = None):
        """The wrapped field's forward (any shape contract of ``ConditionedField``), timed."""
        tracking = torch.is_grad_enabled() and latents.requires_grad
        if tracking:
            latents = _Mark.apply(self.timer, "end", latents)
        with self.timer.phase("field forward"):
            sigma, rgb = self.field(points, latents) if ray is None else self.field(points, latents, ray=ray)
        if tracking:
            sigma, rgb = _Mark.apply(self.timer, "start", sigma, rgb)
        return sigma, rgb

    def collect_backward(self) -> None:
        """Turn this step's start/end marks into field-backward seconds."""
        starts, ends = sorted(self.timer.marks["start"]), sorted(self.timer.marks["end"])
        for start, end in zip(starts, ends, strict=False):
            self.timer.add("field backward", max(end - start, 0.0))
        self.timer.marks.clear()


def breakdown_table(per_step: dict[str, float], rays_per_step: int,
                    shares: dict[str, float] | None = None) -> str:
    """Fixed-width table: ms per step and share of the step per phase, rays/s, and the non-MLP share.

    ``shares`` (e.g. medians of per-step shares) replaces ``per_step[phase] / step`` when ``per_step``
    holds medians, which need not add up on a loaded machine.
    """
    total = per_step["step"]
    shares = shares or {name: value / total for name, value in per_step.items()}
    order = ["data", "field forward", "renderer forward", "loss", "field backward", "renderer backward",
             "optimiser"]
    lines = [f"{'phase':<22} {'ms/step':>10} {'share':>7}"]
    for name in order:
        if name in per_step:
            lines.append(f"{name:<22} {per_step[name] * 1e3:>10.2f} {shares[name]:>7.1%}")
    other = 1.0 - sum(shares[name] for name in order if name in shares)
    lines.append(f"{'(untimed rest)':<22} {'':>10} {other:>7.1%}")
    lines.append(f"{'step (wall)':<22} {total * 1e3:>10.2f} {1:>7.1%}")
    mlp = shares.get("field forward", 0.0) + shares.get("field backward", 0.0)
    lines.append(f"rays/s: {rays_per_step / total:,.0f}   share of the step outside the field MLP: "
                 f"{1 - mlp:.1%}")
    return "\n".join(lines)


def timed_step(trainer, timed: TimedField) -> tuple[dict[str, float], int]:
    """One ``trainer.train_step()`` with every phase timed: ({phase: seconds}, rays).

    ``timed`` wraps ``trainer.module.field``; the renderer's share is the forward/backward time left
    after the field's own.
    """
    timer = PhaseTimer(trainer.device)
    timed.timer = timer
    trainer.timer = timer
    with timer.phase("step"):
        metrics = trainer.train_step()
    timed.collect_backward()
    per = timer.per_step()
    per["renderer forward"] = per.pop("forward") - per.get("field forward", 0.0)
    per["renderer backward"] = per.pop("backward") - per.get("field backward", 0.0)
    return per, metrics["rays"]


DOWNLOADED = "loss sums (and packed sample counts) from the device"


def profile_steps(trainer, n_steps: int, trace_path, warmup: int = 2) -> dict[str, float]:
    """``n_steps`` timed steps under the Taichi kernel profiler and torch.profiler, after ``warmup``
    steps that compile the kernels; prints the phase table and the kernel table, writes a Chrome trace
    to ``trace_path``, and returns the mean seconds per phase."""
    from models.trainer import NullTimer
    from renderer.profiling import profile

    for _ in range(warmup):
        trainer.train_step()
    timed = TimedField(trainer.module.field, PhaseTimer(trainer.device))
    trainer.module.field = timed
    steps, rays = [], 0
    copied = {"torch tensors copied by Taichi (each way)": 0, "batch to the device": 0,
              DOWNLOADED: 0}
    try:
        with profile(trace_path=trace_path, print_table=False) as prof:
            for _ in range(n_steps):
                TORCH_COPIES.reset()
                per, rays = timed_step(trainer, timed)
                steps.append(per)
                copied["torch tensors copied by Taichi (each way)"] += TORCH_COPIES.bytes
                if trainer.device_step is not None:
                    copied["batch to the device"] += trainer.device_step.transfers.uploaded
                    copied[DOWNLOADED] += trainer.device_step.transfers.downloaded
    finally:
        trainer.module.field = timed.field
        trainer.timer = NullTimer()
    per_step = {name: sum(s.get(name, 0.0) for s in steps) / len(steps) for name in steps[0]}
    print(f"[profile] {n_steps} steps after {warmup} warm-up steps; Taichi arch {trainer.backend.arch}, "
          f"torch device {trainer.device}")
    print(breakdown_table(per_step, rays))
    if getattr(trainer.module, "occupancy", None) is not None:  # --render-skip-empty on
        from models.skip_empty import SkipStats

        kept = SkipStats.last
        print(f"kept samples per ray (last step): {kept['coarse_per_ray']:.1f} coarse + "
              f"{kept['fine_per_ray']:.1f} fine = {kept['field_per_ray']:.1f} field evaluations, of "
              f"{kept['dense_per_ray']:.0f} without skipping; occupied cells "
              f"{trainer.module.occupancy.grid.occupied_fraction():.1%}")
    print("\nkernels (source taichi: Taichi's kernel profiler; sync: each launch timed between ti.sync() "
          "calls, on Vulkan/Metal) and top torch operators (torch.profiler), all steps:")
    print(prof.table())
    path = "the device-resident step" if trainer.device_step is not None else "torch tensors"
    print(f"\nhost <-> device bytes per step ({path}, Taichi {trainer.backend.arch}; 0 where the arch "
          "reads torch tensors in place):")
    for what, total in copied.items():
        print(f"  {what:<44} {total / n_steps:>14,.0f} bytes")
    print(f"[profile] Chrome trace: {trace_path}")
    return per_step

