"""The bottom layer that every package may import: the atomic file writer (``atomic``) and the camera
convention (``conventions``), on the standard library, numpy and scipy only.

It imports no other package of this project (``tests/test_layering.py``), so renderer/, pose/, dataset/,
models/, export/, the entry scripts and the benchmarks can all use it without creating a cycle.
"""
