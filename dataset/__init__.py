"""Prepared datasets: the memory-mapped cache, its sources and builds, the synthetic generator, batches.

Names are imported on first use, so worker processes and ``python -m dataset.prepare`` do not pay for
torch (only the sampler needs it).
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "FORMAT_VERSION": "dataset.cache",
    "CacheError": "dataset.cache",
    "PreparedDataset": "dataset.cache",
    "PixelBatchSampler": "dataset.sampler",
    "PrepareConfig": "dataset.config",
    "prepare_dataset": "dataset.prepare",
    "BuildInterrupted": "dataset.build",
    "DataRootError": "dataset.sources",
    "SyntheticConfig": "dataset.synthetic",
    "generate_synthetic": "dataset.prepare",
    "write_srn_layout": "dataset.srn",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'dataset' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)
