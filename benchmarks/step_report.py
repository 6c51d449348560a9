"""What the training-step benchmarks (``train_step.py``, ``device_step.py``) share: the configuration
they time (a preset resolved as ``train.py`` resolves it, on a prepared cache), the summary of their
per-step samples, the machine line and the JSON they write."""

from __future__ import annotations

import os
import statistics
from pathlib import Path

import torch

from common.atomic import write_json
from models.train_config import TrainConfig, training_data

NOT_PHASES = ("rays", "bytes")  # per-step sample fields that are counts, not phase seconds


def step_config(preset: str, cache: str, identities: int | None = None) -> TrainConfig:
    """The ``preset`` training configuration on ``cache`` (default: the preset's synthetic cache, prepared
    if missing), with ``identities`` synthetic identities when given (at least the preset's batch), and
    every sample rendered: these benchmarks compare renderers and steps on the dense path (the skip-empty
    path always runs the Taichi kernels); ``train_step.py --render-skip-empty`` measures skipping."""
    config = TrainConfig.named(preset)
    config.render.skip_empty = False
    config.data.cache = cache
    if identities is not None:
        if identities < config.batch.identities:
            raise SystemExit(f"--identities {identities} is fewer than the {preset} preset's batch of "
                             f"{config.batch.identities} identities.")
        config.data.synthetic_identities = identities
    config.optim.decay_steps = config.run.steps  # as train.py resolves it
    config.data = training_data(config.data)
    return config


def summarise(samples: list[dict]) -> tuple[dict[str, float], dict[str, float], int]:
    """(median seconds per phase, median over steps of each phase's share of its step, rays per step).

    Per-step shares are robust to a step slowed down as a whole by other work on a shared machine.
    """
    phases = [k for k in samples[0] if k not in NOT_PHASES]
    medians = {k: statistics.median(s[k] for s in samples) for k in phases}
    shares = {k: statistics.median(s[k] / s["step"] for s in samples) for k in phases}
    return medians, shares, int(samples[0]["rays"])


def machine() -> str:
    """The CPU cores and torch's threads, as the JSON records them."""
    return f"{os.cpu_count()} CPU cores, torch threads {torch.get_num_threads()}"


def write_summary(path: str | None, summary: dict) -> None:
    """Write ``summary`` as JSON to ``path`` (its folder made if missing) and say where; nothing when
    ``path`` is None."""
    if path:
        target = Path(path)
        target.parent.mkdir(parents=True, exist_ok=True)
        write_json(target, summary)
        print(f"JSON: {target}")
