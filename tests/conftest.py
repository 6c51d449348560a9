"""Shared fixtures: every renderer test runs once per Taichi backend (x64 CPU, Vulkan and CUDA).

``cuda`` runs where torch and Taichi have CUDA, paired with torch's CUDA device: the test body runs under
``torch.device("cuda")``, so the tensors it makes are CUDA tensors that the kernels read in place.
LOLNERF_TEST_ARCHES=cuda,vulkan picks the arches to run (default all three); LOLNERF_REQUIRE_VULKAN=1 and
LOLNERF_REQUIRE_CUDA=1 turn a missing backend into a failure instead of a skip.
"""

from __future__ import annotations

import contextlib
import os

import pytest
import torch
from torch.overrides import TorchFunctionMode

ALL_ARCHES = ("cpu", "vulkan", "cuda")
REQUIRE = {"vulkan": ("LOLNERF_REQUIRE_VULKAN", "install mesa-vulkan-drivers libvulkan1"),
           "cuda": ("LOLNERF_REQUIRE_CUDA", "run on a machine with an NVIDIA GPU and a CUDA build of torch")}


def selected_arches() -> tuple[str, ...]:
    """The arches named in LOLNERF_TEST_ARCHES (comma-separated), or all of ALL_ARCHES."""
    names = [a.strip() for a in os.environ.get("LOLNERF_TEST_ARCHES", "").split(",") if a.strip()]
    unknown = sorted(set(names) - set(ALL_ARCHES))
    if unknown:
        raise pytest.UsageError(f"LOLNERF_TEST_ARCHES names {', '.join(unknown)}: choose from "
                                f"{', '.join(ALL_ARCHES)}.")
    return tuple(names) or ALL_ARCHES


ARCHES = selected_arches()


def _start(arch: str) -> None:
    """Start Taichi on ``arch`` through the renderer's own backend selection (which refuses Taichi's
    silent x64 fallback with a BackendUnavailableError naming what is missing), paired with the torch
    device that arch reads in place (CUDA for cuda, else the CPU)."""
    from renderer.backend import init_backend

    init_backend(arch, "cuda" if arch == "cuda" else "cpu", verbose=False)


class _CpuGeneratorsOnDevice(TorchFunctionMode):
    """Under a CUDA default device, a random factory given a CPU ``torch.Generator`` (as the tests seed
    theirs) draws on the CPU and moves the result: the same numbers on every device."""

    FACTORIES = (torch.rand, torch.randn, torch.randint, torch.randperm, torch.normal)

    def __init__(self, device: torch.device):
        super().__init__()
        self.device = device

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        generator = kwargs.get("generator")
        if (func in self.FACTORIES and kwargs.get("device") is None and isinstance(generator, torch.Generator)
                and generator.device.type == "cpu"):
            kwargs["device"] = "cpu"
            return func(*args, **kwargs).to(self.device)
        return func(*args, **kwargs)


def arch_device(arch: str) -> torch.device:
    """The torch device paired with a Taichi arch in the tests: CUDA for ``cuda``, else the CPU.

    >>> arch_device("vulkan")
    device(type='cpu')
    """
    return torch.device("cuda") if arch == "cuda" else torch.device("cpu")


@contextlib.contextmanager
def tensors_on(device: torch.device):
    """Tensors made without a device inside the block land on ``device`` (nothing changes for the CPU)."""
    if device.type == "cpu":
        yield
        return
    with torch.device(device), _CpuGeneratorsOnDevice(device):
        yield


@pytest.fixture(scope="session", params=ARCHES)
def arch_available(request) -> str:
    """Start Taichi on each backend once; a missing Vulkan driver or CUDA device skips with the reason.

    CI sets LOLNERF_REQUIRE_VULKAN=1 so that a missing driver fails the run instead of skipping it;
    ``benchmarks/gpu_check.py`` sets LOLNERF_REQUIRE_CUDA=1 likewise.
    """
    name = request.param
    try:
        _start(name)
    except Exception as err:  # BackendUnavailableError, or whatever Taichi raised while starting
        reason = f"Taichi {name} backend unavailable on this machine: {err}"
        variable, remedy = REQUIRE.get(name, (None, ""))
        if variable and os.environ.get(variable) == "1":
            pytest.fail(f"{reason} ({variable}=1: {remedy})")
        pytest.skip(reason)
    return name


@pytest.fixture
def arch(arch_available) -> str:
    """The Taichi backend under test ("cpu", "vulkan" or "cuda"), running when the test starts; for
    ``cuda`` the test body runs with torch's default device set to CUDA (``tensors_on``).

    Tests that restart Taichi elsewhere (training, fitting) may run between two tests of one backend,
    so the backend is checked, and restarted if needed, for every test.
    """
    from renderer.backend import started_arch

    if started_arch() != arch_available:
        _start(arch_available)
    with tensors_on(arch_device(arch_available)):
        yield arch_available


@pytest.fixture
def keep_taichi_arch():
    """For tests that start the renderer themselves: give later tests back the arch that was running."""
    from tiny_run import restore_arch

    from renderer.backend import started_arch

    previous = started_arch()
    yield
    restore_arch(previous)


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory):
    """A tiny synthetic training run, trained once per test session and shared by the tests that need a
    checkpoint (fit, render, evaluate). Returns the run directory."""
    from tiny_run import make_tiny_run

    return make_tiny_run(tmp_path_factory.mktemp("tiny_run"))


# Modules whose kernel launches the device-resident path makes (each imports renderer.backend.launch).
DEVICE_PATH_MODULES = ("models.device_step", "models.device_forward", "models.device_skip",
                       "models.device_render", "renderer.dense", "renderer.optimizers")


@pytest.fixture
def forbid_torch_launches(monkeypatch):
    """Make every launch of the device-resident path fail if any argument is a torch tensor (on Vulkan it
    would be copied host <-> device); returns the list of launched kernel names, filled as they run.
    ``monkeypatch.undo()`` lifts it."""
    from renderer.backend import launch

    launched: list[str] = []

    def no_torch(name, kernel, *args):
        bad = [type(a).__name__ for a in args if isinstance(a, torch.Tensor)]
        assert not bad, f"{name} was given a torch tensor: it would be copied host <-> device"
        launched.append(name)
        launch(name, kernel, *args)

    for module in DEVICE_PATH_MODULES:
        monkeypatch.setattr(f"{module}.launch", no_torch)
    return launched
