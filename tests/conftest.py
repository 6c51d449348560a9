"""Shared fixtures: every renderer test runs once per Taichi backend (x64 CPU and Vulkan)."""

from __future__ import annotations

import os

import pytest

ARCHES = ("cpu", "vulkan")


def _start(arch: str) -> None:
    """Start Taichi on ``arch`` through the renderer's own backend selection (which refuses Taichi's
    silent x64 fallback with a BackendUnavailableError naming what is missing)."""
    from renderer.backend import init_backend

    init_backend(arch, "cpu", verbose=False)


@pytest.fixture(scope="session", params=ARCHES)
def arch_available(request) -> str:
    """Start Taichi on each backend once; a missing Vulkan driver skips with the reason.

    CI sets LOLNERF_REQUIRE_VULKAN=1 so that a missing driver fails the run instead of skipping it.
    """
    name = request.param
    try:
        _start(name)
    except Exception as err:  # BackendUnavailableError, or whatever Taichi raised while starting
        reason = f"Taichi {name} backend unavailable on this machine: {err}"
        if name == "vulkan" and os.environ.get("LOLNERF_REQUIRE_VULKAN") == "1":
            pytest.fail(reason + " (LOLNERF_REQUIRE_VULKAN=1: install mesa-vulkan-drivers libvulkan1)")
        pytest.skip(reason)
    return name


@pytest.fixture
def arch(arch_available) -> str:
    """The Taichi backend under test ("cpu" or "vulkan"), running when the test starts.

    Tests that restart Taichi elsewhere (training, fitting) may run between two tests of one backend,
    so the backend is checked, and restarted if needed, for every test.
    """
    from renderer.backend import started_arch

    if started_arch() != arch_available:
        _start(arch_available)
    return arch_available


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
