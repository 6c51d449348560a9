"""One switch for profiling: Taichi's kernel profiler and torch.profiler together.

Usage::

    from renderer.profiling import profile

    with profile(trace_path="runs/trace.json") as prof:   # trace_path=None: no trace file
        for _ in range(n_steps):
            train_step()
    # on exit: prints one table, one row per kernel (name, calls, total ms, mean ms)
    prof.rows      # [KernelRow(source, name, calls, total_ms, mean_ms), ...] sorted by total time

Rows come from two sources: ``taichi`` (every renderer kernel, timed by Taichi's kernel profiler,
tasks of one kernel summed) and ``torch`` (the torch operators with the most self time, from
torch.profiler). The Chrome trace is torch.profiler's; every renderer call shows in it as a
``renderer.*`` range (``torch.profiler.record_function``) around its Taichi launches, since Taichi's
CPU and Vulkan profilers record durations but no timestamps. Open it in chrome://tracing or Perfetto.

Taichi's kernel profiler can only be switched on by ``ti.init``: start the renderer with
``init_backend(..., kernel_profiler=True)``. If it is off, ``profile`` restarts Taichi on the same
arch with it on; that is safe for the renderer (its kernels use no Taichi fields, they recompile).

On Vulkan and Metal the kernel profiler is not used (``uses_kernel_profiler``): with Taichi 1.7.4 on
Vulkan it crashed the device-resident step (a segfault in ``ti.sync`` during ``ndarray.from_numpy``,
docs/TAICHI.md). There every launch is bracketed by ``ti.sync()`` instead (``renderer.backend.
SYNC_TIMES``) and its rows say ``sync``: wall time of the kernel including the dispatch and the wait,
an upper bound on the GPU time, with nothing queued behind it.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import taichi as ti
import torch

from common.atomic import atomic_path
from renderer.backend import SYNC_TIMES, ensure_started, init_backend

# Taichi names compiled tasks "<kernel>_c<id>_<n>_kernel_<i>_<kind>" (x64, CUDA) or
# "<kernel>_c<id>_<n>_<i>_t<j>" (Vulkan); rows group by <kernel>.
_TASK_SUFFIX = re.compile(r"_c\d+_\d+(_.*)?$")


@dataclass(frozen=True)
class KernelRow:
    """One line of the profile table; times in milliseconds."""

    source: str
    name: str
    calls: int
    total_ms: float
    mean_ms: float


@dataclass
class Profile:
    """What ``profile`` collected: table rows (filled on exit) and the trace file written, if any."""

    rows: list[KernelRow] = field(default_factory=list)
    trace_path: Path | None = None

    def table(self) -> str:
        """The rows as a fixed-width text table."""
        lines = [f"{'source':<7} {'kernel':<48} {'calls':>7} {'total ms':>10} {'mean ms':>9}"]
        lines += [
            f"{r.source:<7} {r.name[:48]:<48} {r.calls:>7d} {r.total_ms:>10.3f} {r.mean_ms:>9.4f}"
            for r in self.rows
        ]
        return "\n".join(lines)


def uses_kernel_profiler(arch: str) -> bool:
    """Whether ``profile`` times kernels with Taichi's kernel profiler on ``arch`` (else with syncs).

    >>> uses_kernel_profiler("cpu"), uses_kernel_profiler("vulkan")
    (True, False)
    """
    return arch not in ("vulkan", "metal")


def sync_timed_rows() -> list[KernelRow]:
    """Per-kernel totals of the sync-bracketed launches since ``SYNC_TIMES`` was last cleared."""
    return [KernelRow("sync", name, calls, seconds * 1e3, seconds * 1e3 / calls)
            for name, (calls, seconds) in SYNC_TIMES.totals.items()]


def kernel_profiler_enabled() -> bool:
    """Whether Taichi was started with its kernel profiler on."""
    return bool(ti.lang.impl.current_cfg().kernel_profiler)


def enable_kernel_profiler() -> None:
    """Make sure Taichi runs with the kernel profiler, restarting it on the same arch if needed."""
    arch = ensure_started()
    if not kernel_profiler_enabled():
        threads = ti.lang.impl.current_cfg().cpu_max_num_threads
        init_backend(arch=arch, kernel_profiler=True, verbose=False, cpu_threads=threads)


def taichi_kernel_rows() -> list[KernelRow]:
    """Per-kernel totals recorded by Taichi's kernel profiler since it was last cleared."""
    ti.sync()
    prog = ti.lang.impl.get_runtime().prog
    prog.sync_kernel_profiler()
    prog.update_kernel_profiler()
    # A launch leaves one record per offloaded task; a kernel's calls are its busiest task's count.
    task_counts: dict[str, dict[str, int]] = {}
    totals: dict[str, float] = {}
    for record in prog.get_kernel_profiler_records():
        kernel = _TASK_SUFFIX.sub("", record.name)
        tasks = task_counts.setdefault(kernel, {})
        tasks[record.name] = tasks.get(record.name, 0) + 1
        totals[kernel] = totals.get(kernel, 0.0) + record.kernel_time
    merged = {kernel: (max(tasks.values()), totals[kernel]) for kernel, tasks in task_counts.items()}
    return [KernelRow("taichi", name, int(n), total, total / n) for name, (n, total) in merged.items()]


def torch_op_rows(prof: torch.profiler.profile, limit: int) -> list[KernelRow]:
    """The ``limit`` torch operators with the most self time (CPU, plus CUDA when present)."""
    rows = []
    for event in prof.key_averages():
        self_us = event.self_cpu_time_total + getattr(event, "self_device_time_total", 0.0)
        if event.key.startswith("renderer.") or self_us <= 0:
            continue  # our own ranges enclose the Taichi rows; listing them too would count twice
        rows.append(KernelRow("torch", event.key, event.count, self_us / 1e3, self_us / 1e3 / event.count))
    rows.sort(key=lambda r: r.total_ms, reverse=True)
    return rows[:limit]


def _write_trace_atomically(prof: torch.profiler.profile, path: Path) -> None:
    with atomic_path(path, keep_suffix=True) as tmp:  # torch picks gzip by the suffix
        prof.export_chrome_trace(str(tmp))


@contextmanager
def profile(
    trace_path: str | os.PathLike | None = None, torch_rows: int = 15, print_table: bool = True
) -> Iterator[Profile]:
    """Profile the enclosed code with Taichi's kernel profiler and torch.profiler.

    On exit prints the per-kernel table (unless ``print_table=False``), fills ``Profile.rows`` and,
    with ``trace_path``, writes the Chrome trace JSON there (atomically).
    """
    by_profiler = uses_kernel_profiler(ensure_started())
    if by_profiler:
        enable_kernel_profiler()
        ti.sync()
        ti.profiler.clear_kernel_profiler_info()
    else:
        ti.sync()
        SYNC_TIMES.clear()
        SYNC_TIMES.enabled = True
    activities = [torch.profiler.ProfilerActivity.CPU]
    if torch.cuda.is_available():
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    result = Profile(trace_path=Path(trace_path) if trace_path is not None else None)
    try:
        with torch.profiler.profile(activities=activities) as torch_prof:
            yield result
            ti.sync()
    finally:
        SYNC_TIMES.enabled = False
    rows = taichi_kernel_rows() if by_profiler else sync_timed_rows()
    result.rows = sorted(rows, key=lambda r: r.total_ms, reverse=True)
    result.rows += torch_op_rows(torch_prof, torch_rows)
    if result.trace_path is not None:
        _write_trace_atomically(torch_prof, result.trace_path)
    if print_table:
        print(result.table())
