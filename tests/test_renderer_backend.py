"""Backend selection errors and the profiling switch."""

import gc
import json
import sys

import numpy as np
import pytest
import taichi as ti
import torch

import renderer
from renderer import backend
from renderer.profiling import profile, uses_kernel_profiler
from renderer.vulkan_probe import DEVICE_TYPES, VulkanDevice, vulkan_devices


@pytest.fixture
def restore_taichi():
    """Put Taichi back on the arch (and profiler setting) it ran before the test."""
    arch = backend.started_arch()
    profiler = bool(ti.lang.impl.current_cfg().kernel_profiler) if arch else False
    yield
    if arch is None:
        ti.reset()
    else:
        assert backend._start(arch, profiler, 0), f"could not restart Taichi on {arch}"


def test_unknown_names_are_rejected():
    with pytest.raises(ValueError, match="Unknown Taichi arch 'opengl'"):
        renderer.init_backend(arch="opengl")
    with pytest.raises(ValueError, match="Unknown torch device 'tpu'"):
        renderer.init_backend(device="tpu")
    with pytest.raises(ValueError, match="device='cuda'"):
        renderer.init_backend(arch="cuda", device="cpu")


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_missing_cuda_is_one_clear_error(restore_taichi):
    with pytest.raises(
        renderer.BackendUnavailableError, match=r"arch='cuda' is unavailable: torch sees no CUDA"
    ):
        renderer.init_backend(arch="cuda")
    with pytest.raises(renderer.BackendUnavailableError, match=r"device='cuda' is unavailable"):
        renderer.init_backend(arch="cpu", device="cuda")


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_taichi_silent_fallback_is_detected(restore_taichi):
    """ti.init(arch=ti.cuda) without CUDA quietly starts x64; _start must report the failure."""
    assert backend._start("cuda", False, 0) is False
    assert backend.started_arch() is None


@pytest.mark.skipif(sys.platform == "darwin", reason="macOS may have Metal")
def test_missing_metal_and_mps_are_clear_errors(restore_taichi):
    with pytest.raises(renderer.BackendUnavailableError, match="Metal needs macOS"):
        renderer.init_backend(arch="metal")
    with pytest.raises(renderer.BackendUnavailableError, match="torch has no MPS device"):
        renderer.init_backend(arch="cpu", device="mps")


def test_missing_vulkan_names_the_driver_and_auto_says_why(restore_taichi, monkeypatch, capsys):
    real_start = backend._start

    def start_without_gpu_drivers(arch, **settings):
        if arch in ("vulkan", "cuda"):
            return False
        return real_start(arch, **settings)

    monkeypatch.setattr(backend, "_start", start_without_gpu_drivers)
    monkeypatch.setattr(backend, "vulkan_devices", lambda: [])
    with pytest.raises(renderer.BackendUnavailableError, match="no Vulkan driver found: install"):
        renderer.init_backend(arch="vulkan")
    chosen = renderer.init_backend(arch="auto")
    assert chosen.arch == "cpu" and chosen.device == torch.device("cpu")
    assert "no Vulkan driver found" in chosen.reason
    assert "Taichi arch=cpu" in capsys.readouterr().out


def test_auto_passes_over_a_software_vulkan_driver_and_says_so(restore_taichi, monkeypatch):
    real_start = backend._start
    started = []

    def start_recorded(arch, **settings):
        started.append(arch)
        return False if arch == "cuda" else real_start(arch, **settings)

    monkeypatch.setattr(backend, "_start", start_recorded)
    lavapipe = VulkanDevice(name="llvmpipe (LLVM 15.0.6, 256 bits)", kind="CPU")
    monkeypatch.setattr(backend, "vulkan_devices", lambda: [lavapipe])
    chosen = renderer.init_backend(arch="auto")
    assert chosen.arch == "cpu" and "vulkan" not in started
    assert "software driver (llvmpipe" in chosen.reason and "arch='vulkan'" in chosen.reason


def test_vulkan_probe_agrees_with_taichi(restore_taichi):
    """The ctypes probe finds a device exactly when Taichi can start Vulkan here."""
    devices = vulkan_devices()
    assert all(d.name and d.kind in DEVICE_TYPES.values() for d in devices)
    assert bool(devices) == backend._start("vulkan")


def test_auto_picks_an_arch_that_really_runs(restore_taichi, capsys):
    chosen = renderer.init_backend(arch="auto")
    assert chosen.arch == backend.started_arch()
    assert chosen.arch in ("cuda", "vulkan", "cpu")
    assert f"Taichi arch={chosen.arch}" in capsys.readouterr().out
    out = renderer.composite(torch.ones(2, 3), torch.ones(2, 3, 3), torch.ones(2, 3), torch.ones(2, 3), 0.0)
    assert torch.isfinite(out.color).all()


def test_profile_table_and_chrome_trace(arch, tmp_path, capsys):
    sigmas = torch.rand(64, 16, requires_grad=True)
    rgbs = torch.rand(64, 16, 3, requires_grad=True)
    near, far = torch.full((64,), 1.0), torch.full((64,), 3.0)
    trace = tmp_path / "trace.json"
    with profile(trace_path=trace) as prof:
        for _ in range(2):
            t = renderer.sample_stratified(near, far, 16)
            out = renderer.composite(sigmas, rgbs, t, renderer.sample_deltas(t, far), 1.0)
            (out.color.sum() + out.weights.sum()).backward()
    assert backend.started_arch() == arch
    rows = {(r.source, r.name): r for r in prof.rows}
    # x64 runs the 8-sample lane kernels (16 samples per ray is a multiple of 8). On Vulkan the kernel
    # profiler is off (renderer.profiling) and each launch is timed between syncs, under its launch name.
    if uses_kernel_profiler(arch):
        source = "taichi"
        kind = "lanes" if arch == "cpu" else "kernel"
        kernels = (f"composite_forward_{kind}", f"composite_backward_{kind}", f"stratified_{kind}")
    else:
        source, kernels = "sync", ("composite_forward", "composite_backward", "sample_stratified")
    for kernel in kernels:
        row = rows[(source, kernel)]
        assert row.calls == 2 and row.total_ms > 0
        assert row.mean_ms == pytest.approx(row.total_ms / 2)
    assert any(source == "torch" for source, _ in rows)
    printed = capsys.readouterr().out
    assert kernels[1] in printed and "total ms" in printed
    events = json.loads(trace.read_text())["traceEvents"]
    assert any(e.get("name") == "renderer.composite_forward" for e in events)


class _RecordingProgram:
    """Stands in for Taichi's program: records which arrays it is asked to delete, forwards the rest."""

    def __init__(self, program):
        self.program, self.deleted = program, []

    def delete_ndarray(self, arr):
        self.deleted.append(arr)
        self.program.delete_ndarray(arr)

    def __getattr__(self, name):
        return getattr(self.program, name)


def test_an_array_from_before_a_restart_is_never_deleted_by_the_new_runtime(restore_taichi):
    """Taichi 1.7 deletes any dropped ndarray through the *current* program: for an array of an earlier
    runtime that is a dangling pointer, which can free a live array of the new runtime (seen in CI as
    "argument not found" in a resumed run's Adam launch). The guard sends each deletion to the runtime
    that made the array, so only the new runtime's own arrays reach it."""
    assert backend._start("cpu", False, 0)
    old = ti.ndarray(ti.f32, (4,))
    assert backend._start("cpu", False, 0)
    runtime = ti.lang.impl.get_runtime()
    new = ti.ndarray(ti.f32, (4,))
    new_arr, recorder = new.arr, _RecordingProgram(runtime.prog)
    runtime.prog = recorder
    try:
        del old
        gc.collect()
        assert recorder.deleted == []
        del new
        gc.collect()
        assert recorder.deleted == [new_arr]  # the new runtime's own arrays are still freed
    finally:
        runtime.prog = recorder.program


def test_arrays_of_the_new_runtime_survive_the_old_ones_being_dropped(restore_taichi):
    """The same end to end: many arrays made, Taichi restarted, as many made again (the allocator reuses
    the old addresses), the old ones dropped; every new one still holds its values and launches."""
    assert backend._start("cpu", False, 0)
    old = [ti.ndarray(ti.f32, (16,)) for _ in range(300)]
    assert backend._start("cpu", False, 0)
    new = [ti.ndarray(ti.f32, (16,)) for _ in range(300)]
    for i, array in enumerate(new):
        array.fill(float(i))
    del old
    gc.collect()
    for i, array in enumerate(new):
        _double(array)
        assert np.array_equal(array.to_numpy(), np.full(16, 2.0 * i, np.float32)), i


@ti.kernel
def _double(a: ti.types.ndarray(dtype=ti.f32, ndim=1)):
    for i in a:
        a[i] += a[i]
