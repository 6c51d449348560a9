"""Checkpoints: atomic, self-describing, loadable with ``torch.load(weights_only=True)``.

Layout of a run directory's checkpoints:

    RUN/checkpoints/step_00001000.pt   the last ``keep_last`` of these are kept
    RUN/checkpoints/best.pt            the lowest training loss seen at a checkpoint step

Payload (a plain dict of tensors, numbers, strings, lists and dicts):

    format "lolnerf-checkpoint", version 1,
    model      {"field": FieldConfig dict, "latent_dim", "n_identities", "background": "network" | [r, g, b],
                "background_net": BackgroundConfig dict or None}   (enough to rebuild the modules)
    field, background, latents         state dicts
    optimizers, schedulers             {name: state dict}
    step, metric                       int, float or None
    rng        {"torch", "python", ...}  (train.py adds the sampler's numpy state and its torch generator)
    config     the run's full configuration, ``TrainConfig.to_json()`` (read back with ``from_json``, which
               also reads the dicts earlier versions wrote)
    fingerprint  the dataset fingerprint (``PreparedDataset.fingerprint``)

    ckpt = load_checkpoint(latest_checkpoint(run_dir))
    ckpt.field, ckpt.background, ckpt.latents, ckpt.config, ckpt.step, ckpt.fingerprint, ckpt.render_config
    ckpt.config.data.cache, ckpt.config.loss     # ckpt.config is a models.train_config.TrainConfig

Writes go through ``common.atomic``: a temporary file with a unique name in the same directory, fsync'ed,
then ``os.replace``d over the target (and the directory fsync'ed), so a write killed midway leaves every
earlier checkpoint intact (the stray temp file is ignored and cleaned up by the next save).
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from dataclasses import field as dataclass_field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from common.atomic import atomic_write, is_temp_name
from models.background import BackgroundConfig, BackgroundField, background_spec, make_background
from models.field import ConditionedField, FieldConfig
from models.latents import LatentTable
from models.render import RenderConfig
from models.train_config import TrainConfig

CHECKPOINT_FORMAT = "lolnerf-checkpoint"
FORMAT_VERSION = 1
CHECKPOINT_DIR = "checkpoints"
STEP_PATTERN = re.compile(r"^step_(\d+)\.pt$")
BEST_NAME = "best.pt"


class CheckpointError(Exception):
    """A file is not a readable checkpoint of this project, or none exists where one was expected."""


@dataclass
class LoadedCheckpoint:
    """Modules rebuilt from a checkpoint (on ``map_location``, in eval mode) plus its metadata.

    ``config`` is the run's typed configuration (``render_config`` is ``config.render``); ``payload`` is
    the raw dict (optimiser/scheduler/RNG states, the config as JSON) that ``train.py --resume`` needs.
    """

    field: ConditionedField
    background: nn.Module | None
    latents: LatentTable
    config: TrainConfig
    step: int
    fingerprint: str
    render_config: RenderConfig = dataclass_field(default_factory=RenderConfig)
    path: Path | None = None
    payload: dict = dataclass_field(default_factory=dict, repr=False)


def atomic_torch_save(obj: Any, path: Path) -> Path:
    """``torch.save`` through ``common.atomic`` (unique temp file beside ``path``, fsync, rename)."""
    return atomic_write(path, lambda handle: torch.save(obj, handle))


def model_description(field: ConditionedField, background: nn.Module | None, latents: LatentTable) -> dict:
    """What ``build_modules`` needs to rebuild the networks, as a plain dict."""
    return {
        "field": dataclasses.asdict(field.cfg),
        "latent_dim": field.latent_dim,
        "n_identities": latents.n,
        "background": background_spec(background) if background is not None else None,
        "background_net": (dataclasses.asdict(background.cfg) if isinstance(background, BackgroundField)
                           else None),
    }


def build_modules(model: dict) -> tuple[ConditionedField, nn.Module | None, LatentTable]:
    """Fresh (untrained) field, background and latent table from a ``model_description`` dict."""
    field = ConditionedField(FieldConfig(**model["field"]), model["latent_dim"])
    background = None
    if model["background"] is not None:
        net_cfg = BackgroundConfig(**model["background_net"]) if model["background_net"] else None
        background = make_background(model["background"], model["latent_dim"], net_cfg)
    return field, background, LatentTable(model["n_identities"], model["latent_dim"])


def checkpoint_payload(*, field: ConditionedField, background: nn.Module | None, latents: LatentTable,
                       optimizers: dict[str, torch.optim.Optimizer], schedulers: dict[str, Any], step: int,
                       rng: dict, config: TrainConfig, fingerprint: str,
                       metric: float | None = None) -> dict:
    """Assemble the checkpoint dict (tensors are moved to CPU so any device can load it)."""
    def cpu_state(module: nn.Module) -> dict:
        return {k: v.detach().cpu() for k, v in module.state_dict().items()}

    return {
        "format": CHECKPOINT_FORMAT,
        "version": FORMAT_VERSION,
        "model": model_description(field, background, latents),
        "field": cpu_state(field),
        "background": cpu_state(background) if background is not None else {},
        "latents": cpu_state(latents),
        "optimizers": {name: opt.state_dict() for name, opt in optimizers.items()},
        "schedulers": {name: sch.state_dict() for name, sch in schedulers.items()},
        "step": int(step),
        "metric": None if metric is None else float(metric),
        "rng": rng,
        "config": config.to_json(),
        "fingerprint": str(fingerprint),
    }


def save_checkpoint(path: Path, payload: dict) -> Path:
    """Write a payload from ``checkpoint_payload`` atomically to ``path``."""
    if payload.get("format") != CHECKPOINT_FORMAT:
        raise ValueError("save_checkpoint expects a dict built by checkpoint_payload().")
    return atomic_torch_save(payload, Path(path))


def read_checkpoint(path: Path, map_location: str | torch.device = "cpu") -> dict:
    """Load and validate a checkpoint's raw payload; anything else raises ``CheckpointError``."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path} does not exist or is not a file; pass a checkpoint written by "
                              f"train.py (RUN/{CHECKPOINT_DIR}/step_*.pt or best.pt).")
    try:
        payload = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:  # torch raises many types for truncated or foreign files
        raise CheckpointError(f"{path} is not a LOLNeRF checkpoint (torch.load failed: "
                              f"{type(err).__name__}); pass a file written by train.py.") from err
    if not isinstance(payload, dict) or payload.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"{path} is a torch file but not a LOLNeRF checkpoint; pass a file written by "
                              f"train.py.")
    if payload.get("version") != FORMAT_VERSION:
        raise CheckpointError(f"{path} has checkpoint format version {payload.get('version')}, this code "
                              f"reads version {FORMAT_VERSION}; use the matching release of this project.")
    return payload


def load_checkpoint(path: Path, map_location: str | torch.device = "cpu") -> LoadedCheckpoint:
    """Rebuild the trained field, background and latent table from a checkpoint file (eval mode)."""
    payload = read_checkpoint(path, map_location)
    field, background, latents = build_modules(payload["model"])
    try:
        field.load_state_dict(payload["field"])
        if background is not None:
            background.load_state_dict(payload["background"])
        latents.load_state_dict(payload["latents"])
    except RuntimeError as err:
        raise CheckpointError(f"{path} is damaged: its weights do not match its own model description "
                              f"({err}).") from err
    modules = [m for m in (field, background, latents) if m is not None]
    for module in modules:
        module.to(map_location).eval()
    config = TrainConfig.from_json(payload["config"] if isinstance(payload["config"], dict) else {})
    return LoadedCheckpoint(field, background, latents, config, payload["step"], payload["fingerprint"],
                            config.render, Path(path), payload)


def checkpoint_dir(run_dir: Path) -> Path:
    """Where a run keeps its checkpoints."""
    return Path(run_dir) / CHECKPOINT_DIR


def step_checkpoints(run_dir: Path) -> list[tuple[int, Path]]:
    """All ``step_*.pt`` checkpoints of a run, sorted by step (temp files are ignored)."""
    directory = checkpoint_dir(run_dir)
    if not directory.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in directory.iterdir() if (m := STEP_PATTERN.match(p.name))]
    return sorted(found)


def latest_checkpoint(run_dir: Path) -> Path:
    """The newest ``step_*.pt`` of a run directory (or of its ``checkpoints/`` folder itself)."""
    run_dir = Path(run_dir)
    if run_dir.name == CHECKPOINT_DIR and not checkpoint_dir(run_dir).is_dir():
        run_dir = run_dir.parent
    found = step_checkpoints(run_dir)
    if not found:
        raise CheckpointError(f"no checkpoint found in {checkpoint_dir(run_dir)}; train first with "
                              f"`python train.py --out {run_dir}`.")
    return found[-1][1]


def read_newest_checkpoint(run_dir: Path, map_location: str | torch.device = "cpu") -> tuple[Path, dict]:
    """The newest readable ``step_*.pt`` of a run and its payload, for resuming.

    An unreadable newer one (truncated by a full disk, say) is renamed ``*.unreadable`` (kept, never
    deleted, and out of the way of pruning) and the next older one is tried, with one line saying so.
    Raises CheckpointError when none is readable, naming each one tried.
    """
    latest_checkpoint(run_dir)  # the "no checkpoint at all" error
    run_dir = Path(run_dir)
    if run_dir.name == CHECKPOINT_DIR and not checkpoint_dir(run_dir).is_dir():
        run_dir = run_dir.parent
    tried = []
    for _, path in reversed(step_checkpoints(run_dir)):
        try:
            payload = read_checkpoint(path, map_location)
        except CheckpointError as err:
            tried.append(f"{path.name} ({err})")
            continue
        for bad in tried:
            name = bad.split(" ", 1)[0]
            (path.parent / name).rename(path.parent / f"{name}.unreadable")
            print(f"[train] {path.parent / name} cannot be read, so it was renamed {name}.unreadable; "
                  f"resuming from {path.name} instead.")
        return path, payload
    raise CheckpointError(f"no checkpoint in {checkpoint_dir(run_dir)} can be read: " + "; ".join(tried))


class CheckpointKeeper:
    """Writes step checkpoints, keeps the last ``keep_last`` and a copy of the best (lowest metric)."""

    def __init__(self, run_dir: Path, keep_last: int = 3):
        self.directory = checkpoint_dir(run_dir)
        self.keep_last = max(1, keep_last)
        self.best_metric: float | None = None
        best = self.directory / BEST_NAME
        if best.is_file():
            try:
                self.best_metric = read_checkpoint(best).get("metric")
            except CheckpointError:
                self.best_metric = None

    def save(self, payload: dict) -> Path:
        """Write ``step_<step>.pt`` (and ``best.pt`` when its metric improves), then prune old steps."""
        self.directory.mkdir(parents=True, exist_ok=True)
        for stray in self.directory.iterdir():
            if is_temp_name(stray.name):  # left by a write that was killed
                stray.unlink(missing_ok=True)
        path = save_checkpoint(self.directory / f"step_{payload['step']:08d}.pt", payload)
        metric = payload.get("metric")
        if metric is not None and (self.best_metric is None or metric < self.best_metric):
            save_checkpoint(self.directory / BEST_NAME, payload)
            self.best_metric = metric
        for _, old in step_checkpoints(self.directory.parent)[:-self.keep_last]:
            old.unlink(missing_ok=True)
        return path
