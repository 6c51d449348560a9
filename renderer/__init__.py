"""Differentiable volume renderer: rays, sampling and compositing (see docs/ARCHITECTURE.md).

Temporary: the plain-torch reference implementations are exported until the Taichi kernels land.
"""

from renderer.reference import (
    Composited,
    Rays,
    composite,
    generate_rays,
    merge_samples,
    sample_deltas,
    sample_importance,
    sample_stratified,
)

__all__ = [
    "Composited",
    "Rays",
    "composite",
    "generate_rays",
    "merge_samples",
    "sample_deltas",
    "sample_importance",
    "sample_stratified",
]
