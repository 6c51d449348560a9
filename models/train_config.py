"""Training configuration: one dataclass per concern with ``paper`` and ``cpu`` presets, and the CLI.

Sections (each a flat dict in the run's ``config.json`` and checkpoints): ``data``, ``run`` (flags without
prefix: ``--steps``), and ``field``, ``background``, ``latent``, ``render``, ``loss``, ``optim``,
``batch`` (flags with the section as prefix: ``--field-depth``).

    config = preset_config("cpu"); config["run"]["steps"]      # 1000
    args = build_parser().parse_args(["--steps", "50"])
    config, overrides, preset = resolve_config(args, "cpu")
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
from dataclasses import dataclass
from pathlib import Path

from dataset.prepare import DATASETS
from models.background import BackgroundConfig
from models.field import FieldConfig
from models.field_backend import FIELD_BACKENDS
from models.latents import LatentConfig
from models.losses import LossConfig
from models.render import RenderConfig

NAN_ENV = "LOLNERF_DEBUG_NAN_STEPS"


@dataclass
class OptimConfig:
    """Adam for the networks; the learning rate decays exponentially from lr_init to lr_final over
    decay_steps (then stays). ``decay_steps=None`` means the run's length: it is fixed to ``run.steps``
    when a run starts and saved with it, so ``--resume`` (even with a larger ``--steps``) keeps the
    schedule the run began with."""

    lr_init: float = 5e-4
    lr_final: float = 1e-4
    decay_steps: int | None = None
    beta1: float = 0.9
    beta2: float = 0.999

    @classmethod
    def paper(cls) -> OptimConfig:
        """The official schedule."""
        return cls()

    @classmethod
    def cpu(cls) -> OptimConfig:
        """A short run needs a larger step size (README has the measurement)."""
        return cls(lr_init=2e-3, lr_final=5e-4)


@dataclass
class BatchConfig:
    """Rays per step = identities × views × pixels (a random pixel subset of each chosen view)."""

    identities: int = 64
    views: int = 2
    pixels: int = 64

    @classmethod
    def paper(cls) -> BatchConfig:
        """64 identities × 2 views × 64 px = 8,192 rays."""
        return cls()

    @classmethod
    def cpu(cls) -> BatchConfig:
        """16 × 2 × 32 = 1,024 rays."""
        return cls(identities=16, views=2, pixels=32)


@dataclass
class DataConfig:
    """What to train on. ``cache`` is the prepared-cache directory (default: derived from the dataset)."""

    dataset: str = "synthetic"
    data_root: str = ""
    cache: str = ""
    resolution: int = 256
    synthetic_identities: int = 1024

    @classmethod
    def paper(cls) -> DataConfig:
        """256 px crops."""
        return cls()

    @classmethod
    def cpu(cls) -> DataConfig:
        """64 px, 64 synthetic identities."""
        return cls(resolution=64, synthetic_identities=64)


@dataclass
class RunConfig:
    """Run length, seeds and the cadence of logs, previews and checkpoints."""

    steps: int = 500_000
    seed: int = 0
    log_every: int = 100
    preview_every: int = 5000
    preview_identities: int = 4
    checkpoint_every: int = 5000
    keep_last: int = 3
    max_bad_steps: int = 20

    @classmethod
    def paper(cls) -> RunConfig:
        """The official run length."""
        return cls()

    @classmethod
    def cpu(cls) -> RunConfig:
        """A few minutes on 2 cores."""
        return cls(steps=1000, log_every=25, preview_every=250, checkpoint_every=250)


# Section name -> config class. Sections in NO_PREFIX get flags without the section prefix (--steps).
SECTIONS: dict[str, type] = {"data": DataConfig, "run": RunConfig, "field": FieldConfig,
                             "background": BackgroundConfig, "latent": LatentConfig, "render": RenderConfig,
                             "loss": LossConfig, "optim": OptimConfig, "batch": BatchConfig}
NO_PREFIX = ("data", "run")
# Values that may change when resuming (they do not change what is being learned, only for how long).
RESUMABLE = {("run", "steps"), ("run", "log_every"), ("run", "preview_every"), ("run", "checkpoint_every"),
             ("run", "keep_last"), ("run", "max_bad_steps"), ("data", "cache"), ("data", "data_root")}


# What each value may be. Integers not listed must be at least 1; floats must be finite (lr: or none).
CHOICES = {("data", "dataset"): DATASETS, ("field", "latent_mode"): ("chunks", "whole"),
           ("latent", "optimizer"): ("sgd", "adam")}
AT_LEAST = {("data", "resolution"): 8, ("run", "seed"): 0, ("run", "preview_identities"): 0,
            ("field", "n_frequencies"): 0, ("background", "n_frequencies"): 0, ("render", "n_fine"): 0,
            ("render", "occupancy_warmup"): 0}
POSITIVE = {("render", "radius"), ("optim", "lr_init"), ("optim", "lr_final"), ("latent", "lr"),
            ("latent", "lr_scale")}
UNIT_INTERVAL = {("optim", "beta1"), ("optim", "beta2"), ("latent", "momentum")}  # [0, 1)
WHOLE_OR_NONE = {("optim", "decay_steps")}  # None by default; a given value is a whole number


# What a flag means, for --help (values whose name says it all are left out).
FLAG_HELP = {
    ("data", "dataset"): " | ".join(DATASETS),
    ("data", "data_root"): "folder with the source photos (not needed for synthetic)",
    ("data", "cache"): "prepared-cache directory (default: data/prepared/<source>-...). Other preparation "
                       "settings (--srn-world-scale, --heldout-views, --template, --framing, ...) are "
                       "python -m dataset.prepare flags: prepare with them, then train with --cache DIR",
    ("data", "synthetic_identities"): "identities of the built-in synthetic dataset",
    ("run", "steps"): "train until this step (extend a run with --resume --steps N)",
    ("run", "max_bad_steps"): "stop after this many NaN/inf losses in a row",
    ("run", "keep_last"): "step checkpoints kept (best.pt is kept as well)",
    ("field", "latent_mode"): "chunks (one slice of the latent per layer) | whole",
    ("field", "n_frequencies"): "positional-encoding octaves 2^0..2^(n-1)",
    ("background", "depth"): "background network layers (photo datasets only)",
    ("latent", "optimizer"): "sgd | adam, for the latent table",
    ("latent", "lr"): "latent learning rate (none: the network's)",
    ("latent", "lr_scale"): "multiplies the latent learning rate",
    ("render", "n_coarse"): "stratified samples per ray",
    ("render", "n_fine"): "importance samples per ray",
    ("render", "radius"): "bounding sphere radius (head units)",
    ("render", "skip_empty"): "on | off: march an occupancy grid and composite packed samples with early "
                              "stop (models/skip_empty.py; README has the speed and quality figures)",
    ("render", "early_stop_eps"): "stop a ray once its transmittance is below this (skip-empty only)",
    ("loss", "mask"): "weight of (opacity - mask)^2",
    ("loss", "hard"): "weight of the hard-surface loss on sample weights",
    ("optim", "decay_steps"): "steps over which lr decays from lr_init to lr_final (none: the run's "
                              "--steps, fixed when the run starts)",
    ("batch", "identities"): "identities per step",
    ("batch", "views"): "views per identity per step",
    ("batch", "pixels"): "random pixels per view per step",
}


def config_problem(section: str, key: str, value) -> str | None:
    """Why ``value`` cannot be the configuration value (section, key), or None when it can.

    >>> config_problem("field", "depth", 0)
    'must be at least 1'
    """
    if (section, key) in CHOICES:
        choices = CHOICES[(section, key)]
        return None if value in choices else f"must be one of {', '.join(choices)}"
    if isinstance(value, bool) or value is None or isinstance(value, str):
        return None
    if isinstance(value, int):
        low = AT_LEAST.get((section, key), 1)
        return None if value >= low else f"must be at least {low}"
    if not math.isfinite(value):
        return "must be a finite number"
    if (section, key) in POSITIVE and value <= 0:
        return "must be positive"
    if (section, key) in UNIT_INTERVAL and not 0 <= value < 1:
        return "must be in [0, 1)"
    if value < 0:
        return "must not be negative"
    return None


def check_config(config: dict) -> None:
    """One sentence (SystemExit) naming the first flag whose value cannot work, before any work starts."""
    for section, cls in SECTIONS.items():
        for key, value in config.get(section, {}).items():
            problem = config_problem(section, key, value)
            if problem:
                raise SystemExit(f"{flag_name(section, key)} {value!r} {problem} ({cls.__name__}.{key}).")


def preset_config(preset: str) -> dict[str, dict]:
    """The whole configuration for a preset as a plain dict of sections."""
    if preset not in ("paper", "cpu"):
        raise ValueError(f"--preset must be 'paper' or 'cpu', not {preset!r}.")
    return {name: dataclasses.asdict(getattr(cls, preset)()) for name, cls in SECTIONS.items()}


def flag_name(section: str, key: str) -> str:
    """CLI flag of a config value: ``--steps`` for run/data values, else ``--field-depth`` style."""
    name = key if section in NO_PREFIX else f"{section}_{key}"
    return "--" + name.replace("_", "-")


def parse_value(text: str, like):
    """Parse a flag's text as the type of the preset value ``like`` (None-able floats accept 'none')."""
    if isinstance(like, bool):
        if text.lower() in ("1", "true", "yes", "on"):
            return True
        if text.lower() in ("0", "false", "no", "off"):
            return False
        raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")
    if text.lower() == "none":
        return None
    if isinstance(like, int):
        return int(text)
    if isinstance(like, float) or like is None:
        return float(text)
    return text


def build_parser() -> argparse.ArgumentParser:
    """The CLI: run-level flags plus one flag per configuration value (defaults shown for both presets)."""
    parser = argparse.ArgumentParser(
        usage=argparse.SUPPRESS,  # a mistake is one line, "train.py: error: ..."; --help lists every flag
        description="Train LOLNeRF (auto-decoder NeRF) on a prepared dataset; with no arguments, on the "
                    "built-in synthetic heads with the CPU preset.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Multi-GPU/multi-node: torchrun --nnodes M --nproc_per_node K --rdzv_backend c10d "
               "--rdzv_endpoint HOST:PORT train.py ... (identities are sharded across ranks).")
    parser.add_argument("--out", default=None,
                        help="run directory (default: runs/<dataset>-<preset>-<time>)")
    parser.add_argument("--preset", choices=("paper", "cpu"), default=None,
                        help="configuration preset (default: paper on CUDA, cpu otherwise)")
    parser.add_argument("--arch", default="auto",
                        help="Taichi arch: auto|cuda|vulkan|metal|cpu (default auto: cuda when torch has "
                             "CUDA, else cpu = x64; Vulkan only when asked for)")
    parser.add_argument("--device", default="auto",
                        help="torch device: auto|cuda|mps|xpu|cpu (default auto)")
    parser.add_argument("--field-backend", default="auto", choices=FIELD_BACKENDS,
                        help="what evaluates the field MLP: torch, or Taichi kernels on the renderer's arch "
                             "(default auto: taichi on a Vulkan/Metal GPU that torch cannot use, else "
                             "torch; the start-up line says which and why; checkpoints load in either)")
    parser.add_argument("--resume", nargs="?", const="auto", default=None, metavar="CHECKPOINT",
                        help="continue from the latest checkpoint in --out, or from the given checkpoint "
                             "file or run directory")
    parser.add_argument("--rebuild-cache", action="store_true",
                        help="prepare the cache again with these flags even though a complete one exists "
                             "(default: an existing --cache is trained on as prepared)")
    parser.add_argument("--profile", type=int, default=0, metavar="N",
                        help="run N steps under the Taichi kernel profiler and torch.profiler, print where "
                             "the time went, write a Chrome trace, and exit")
    parser.add_argument("--debug-nan-steps", default=os.environ.get(NAN_ENV, ""), help=argparse.SUPPRESS)
    paper, cpu = preset_config("paper"), preset_config("cpu")
    for section, cls in SECTIONS.items():
        group = parser.add_argument_group(f"{section} ({cls.__name__})")
        for key, value in paper[section].items():
            meaning = FLAG_HELP.get((section, key))
            help_text = (f"{meaning}; " if meaning else "") + f"cpu: {cpu[section][key]!r}, paper: {value!r}"
            group.add_argument(flag_name(section, key), dest=f"{section}.{key}", default=None, metavar="V",
                               type=str, help=help_text)
    return parser


def explicit_overrides(args: argparse.Namespace, base: dict[str, dict]) -> dict[tuple[str, str], object]:
    """Config values given on the command line, parsed to the type of the preset's value."""
    found = {}
    for section, values in base.items():
        for key, like in values.items():
            text = getattr(args, f"{section}.{key}")
            if like is None and (section, key) in WHOLE_OR_NONE:
                like = 0
            if text is not None:
                try:
                    found[(section, key)] = parse_value(text, like)
                except (ValueError, argparse.ArgumentTypeError) as err:
                    raise SystemExit(f"{flag_name(section, key)} {text!r} is not valid ({err}); "
                                     f"give a value like {like!r}.") from None
    return found


def check_resume_compatible(saved: dict, overrides: dict, fingerprint: str, saved_fingerprint: str,
                            source: Path) -> None:
    """Refuse, in one sentence, a resume whose dataset or learning-relevant config differs."""
    if fingerprint != saved_fingerprint:
        raise SystemExit(f"Cannot resume from {source}: it was trained on a different dataset (fingerprint "
                         f"{saved_fingerprint[:12]} vs {fingerprint[:12]}); pass the same --dataset/--cache "
                         f"or start a new run with another --out.")
    for (section, key), value in overrides.items():
        if (section, key) in RESUMABLE:
            continue
        if saved.get(section, {}).get(key) != value:
            raise SystemExit(f"Cannot resume from {source}: {flag_name(section, key)} {value!r} differs from "
                             f"the run's {saved.get(section, {}).get(key)!r}; drop the flag to resume, or "
                             f"start a new run with another --out.")


def resolve_config(args: argparse.Namespace, device_type: str) -> tuple[dict, dict, str]:
    """Preset + explicit flags -> (config, explicit overrides, preset name)."""
    preset = args.preset or ("paper" if device_type == "cuda" else "cpu")
    config = preset_config(preset)
    overrides = explicit_overrides(args, config)
    for (section, key), value in overrides.items():
        config[section][key] = value
    check_config(config)
    if config["optim"]["decay_steps"] is None:  # decay over the whole run (README: +0.8 dB at 3,000 steps)
        config["optim"]["decay_steps"] = config["run"]["steps"]
    config["preset"] = preset
    return config, overrides, preset
