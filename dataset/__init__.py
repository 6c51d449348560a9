"""Prepared datasets: the memory-mapped cache, its sources and builds, the synthetic generator, batches."""

from dataset.cache import FORMAT_VERSION, CacheError, PreparedDataset
from dataset.synthetic import SyntheticConfig, generate_synthetic

__all__ = ["FORMAT_VERSION", "CacheError", "PreparedDataset", "SyntheticConfig", "generate_synthetic"]
