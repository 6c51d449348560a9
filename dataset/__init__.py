"""Prepared datasets: the memory-mapped cache, its sources and builds, the synthetic generator, batches."""

from dataset.cache import FORMAT_VERSION, CacheError, PreparedDataset
from dataset.sampler import PixelBatchSampler
from dataset.synthetic import SyntheticConfig, generate_synthetic

__all__ = [
    "FORMAT_VERSION",
    "CacheError",
    "PixelBatchSampler",
    "PreparedDataset",
    "SyntheticConfig",
    "generate_synthetic",
]
