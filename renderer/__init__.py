"""Differentiable volume renderer in Taichi: rays, sampling and compositing (docs/ARCHITECTURE.md).

Every function runs as Taichi kernels on the arch chosen by :func:`init_backend` and takes and returns
torch tensors; ``composite`` has a hand-written backward. ``renderer.reference`` holds the same maths
in plain torch, and ``renderer.profiling`` the switch for the kernel profiler.
"""

from renderer.backend import Backend, BackendUnavailableError, init_backend
from renderer.composite import composite
from renderer.packed import composite_packed
from renderer.rays import generate_rays
from renderer.sampling import (
    merge_samples,
    merge_samples_with_deltas,
    sample_deltas,
    sample_importance,
    sample_importance_and_merge,
    sample_stratified,
)
from renderer.specs import Composited, PackedComposited, Rays

__all__ = [
    "Backend",
    "BackendUnavailableError",
    "Composited",
    "PackedComposited",
    "Rays",
    "composite",
    "composite_packed",
    "generate_rays",
    "init_backend",
    "merge_samples",
    "merge_samples_with_deltas",
    "sample_deltas",
    "sample_importance",
    "sample_importance_and_merge",
    "sample_stratified",
]
