"""The bottom layer: small standard-library-only helpers that every package may import.

It imports no other package of this project (``tests/test_layering.py``), so renderer/, pose/, dataset/,
models/, export/, the entry scripts and the benchmarks can all use it without creating a cycle.
"""
