"""Training configuration: one dataclass per concern with ``paper`` and ``cpu`` presets, held together by
``TrainConfig``, and the CLI generated from them.

The run is configured by one typed ``TrainConfig`` (sections ``data``, ``run``, ``field``, ``background``,
``latent``, ``render``, ``loss``, ``optim``, ``batch``, each a dataclass, plus the preset's name). It is
turned into plain JSON only where it leaves the process: the run's ``config.json`` and the checkpoints
(``to_json`` / ``from_json``; ``from_json`` also reads the dicts earlier versions wrote). Each field is
documented once, in its declaration's ``metadata["help"]``; ``train.py --help`` is built from that.
Flags: ``data`` and ``run`` values have no prefix (``--steps``), the others the section's
(``--field-depth``).

    config = TrainConfig.cpu(); config.run.steps                 # 1000
    args = build_parser().parse_args(["--steps", "50"])
    config, overrides, preset = resolve_config(args, "cpu")      # TrainConfig, {("run", "steps"): 50}, "cpu"
    TrainConfig.from_json(config.to_json()) == config            # True
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
from dataclasses import dataclass
from dataclasses import field as dataclass_field
from pathlib import Path
from typing import Any

from dataset.prepare import DATASETS
from models.background import BackgroundConfig
from models.distributed import DEFAULT_TIMEOUT_MINUTES
from models.field import FieldConfig
from models.field_backend import DEVICE_STEPS, FIELD_BACKENDS
from models.latents import LatentConfig
from models.losses import LossConfig
from models.render import RenderConfig

PRESETS = ("paper", "cpu")

NAN_ENV = "LOLNERF_DEBUG_NAN_STEPS"


@dataclass
class OptimConfig:
    """Adam for the networks; the learning rate decays exponentially from lr_init to lr_final over
    decay_steps, then stays.

        >>> OptimConfig.cpu().lr_init, OptimConfig.paper().decay_steps is None
        (0.002, True)
    """

    lr_init: float = dataclass_field(default=5e-4, metadata={"help": "network learning rate at step 0"})
    lr_final: float = dataclass_field(default=1e-4, metadata={
        "help": "network learning rate at the end of the decay"})
    decay_steps: int | None = dataclass_field(default=None, metadata={
        "help": "steps over which the learning rate decays from lr_init to lr_final, then stays; none "
                "(the default) means the run's --steps, fixed when the run starts and saved with it, so "
                "--resume (even with a larger --steps) keeps the schedule the run began with"})
    beta1: float = dataclass_field(default=0.9, metadata={"help": "Adam beta1 (networks)"})
    beta2: float = dataclass_field(default=0.999, metadata={"help": "Adam beta2 (networks)"})

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
    """Rays per step = identities × views × pixels (a random pixel subset of each chosen view).

        >>> b = BatchConfig.cpu(); b.identities * b.views * b.pixels
        1024
    """

    identities: int = dataclass_field(default=64, metadata={"help": "identities per step"})
    views: int = dataclass_field(default=2, metadata={"help": "views per identity per step"})
    pixels: int = dataclass_field(default=64, metadata={"help": "random pixels per view per step"})

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
    """What to train on.

        >>> DataConfig.cpu().resolution
        64
    """

    dataset: str = dataclass_field(default="synthetic", metadata={"help": " | ".join(DATASETS)})
    data_root: str = dataclass_field(default="", metadata={
        "help": "folder with the source photos (not needed for synthetic)"})
    cache: str = dataclass_field(default="", metadata={
        "help": "prepared-cache directory (default: data/prepared/<source>-...; the run records the "
                "resolved path). Other preparation settings (--srn-world-scale, --heldout-views, "
                "--solve-points, --template, --framing, ...) are python -m dataset.prepare flags: prepare "
                "with them, then train with --cache DIR"})
    resolution: int = dataclass_field(default=256, metadata={"help": "side of the square training images"})
    synthetic_identities: int = dataclass_field(default=1024, metadata={
        "help": "identities of the built-in synthetic dataset"})

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
    """Run length, seeds and the cadence of logs, previews and checkpoints.

        >>> RunConfig.cpu().steps
        1000
    """

    steps: int = dataclass_field(default=500_000, metadata={
        "help": "train until this step (extend a run with --resume --steps N)"})
    seed: int = dataclass_field(default=0, metadata={
        "help": "seeds the networks, the latent table, the batches and the ray samples"})
    log_every: int = dataclass_field(default=100, metadata={"help": "steps between metrics.jsonl lines"})
    preview_every: int = dataclass_field(default=5000, metadata={"help": "steps between preview images"})
    preview_identities: int = dataclass_field(default=4, metadata={"help": "identities in a preview"})
    checkpoint_every: int = dataclass_field(default=5000, metadata={"help": "steps between checkpoints"})
    keep_last: int = dataclass_field(default=3, metadata={
        "help": "step checkpoints kept (best.pt is kept as well)"})
    max_bad_steps: int = dataclass_field(default=20, metadata={
        "help": "stop after this many NaN/inf losses in a row"})

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


@dataclass
class TrainConfig:
    """The whole configuration of a training run: one dataclass per concern, and the preset's name.

    Passed whole from ``train.py`` to ``models.trainer.Trainer``; plain JSON only at the run's
    ``config.json`` and in checkpoints (``to_json``, ``from_json``).

        >>> config = TrainConfig.cpu()
        >>> config.run.steps, config.field.width, config.preset
        (1000, 64, 'cpu')
        >>> config.to_json()["batch"]
        {'identities': 16, 'views': 2, 'pixels': 32}
    """

    data: DataConfig = dataclass_field(default_factory=DataConfig)
    run: RunConfig = dataclass_field(default_factory=RunConfig)
    field: FieldConfig = dataclass_field(default_factory=FieldConfig)
    background: BackgroundConfig = dataclass_field(default_factory=BackgroundConfig)
    latent: LatentConfig = dataclass_field(default_factory=LatentConfig)
    render: RenderConfig = dataclass_field(default_factory=RenderConfig)
    loss: LossConfig = dataclass_field(default_factory=LossConfig)
    optim: OptimConfig = dataclass_field(default_factory=OptimConfig)
    batch: BatchConfig = dataclass_field(default_factory=BatchConfig)
    preset: str = "paper"

    @classmethod
    def paper(cls) -> TrainConfig:
        """Every section's paper preset (the official configuration)."""
        return cls.named("paper")

    @classmethod
    def cpu(cls) -> TrainConfig:
        """Every section's cpu preset (minutes on 2 CPU cores)."""
        return cls.named("cpu")

    @classmethod
    def named(cls, preset: str) -> TrainConfig:
        """The preset called ``preset`` ("paper" or "cpu")."""
        if preset not in PRESETS:
            raise ValueError(f"--preset must be 'paper' or 'cpu', not {preset!r}.")
        return cls(**{name: getattr(section, preset)() for name, section in SECTIONS.items()}, preset=preset)

    def value(self, section: str, key: str) -> Any:
        """One value by its section and field name: ``config.value("run", "steps")``."""
        return getattr(getattr(self, section), key)

    def with_values(self, values: dict[tuple[str, str], Any]) -> TrainConfig:
        """A copy with ``{(section, key): value}`` applied (the sections are copied, never shared).

            >>> TrainConfig.cpu().with_values({("run", "steps"): 10}).run.steps
            10
        """
        changes: dict[str, dict[str, Any]] = {}
        for (section, key), value in values.items():
            if section not in SECTIONS:
                raise KeyError(f"no configuration section {section!r}")
            changes.setdefault(section, {})[key] = value
        copies = {name: dataclasses.replace(getattr(self, name), **changes.get(name, {}))
                  for name in SECTIONS}
        return dataclasses.replace(self, **copies)

    def to_json(self) -> dict[str, Any]:
        """Plain JSON: ``{section: {field: value}}`` and ``"preset"`` (the format of config.json and of a
        checkpoint's ``config``)."""
        return {**{name: dataclasses.asdict(getattr(self, name)) for name in SECTIONS}, "preset": self.preset}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> TrainConfig:
        """Read ``to_json``'s dict back, including the dicts earlier versions wrote: a section or field
        that is missing takes the recorded preset's value (paper when none is recorded), and a field this
        version does not know is ignored.

            >>> TrainConfig.from_json({"preset": "cpu", "run": {"steps": 7}}).run.steps
            7

        A render section without ``skip_empty`` was written before empty-space skipping existed (its run
        rendered every sample), so it reads as off although the presets now have it on.
        """
        preset = data.get("preset") if data.get("preset") in PRESETS else "paper"
        base = cls.named(preset)
        values = {}
        for name, section in SECTIONS.items():
            saved = data.get(name)
            if isinstance(saved, dict):
                known = {f.name for f in dataclasses.fields(section)}
                values.update({(name, key): value for key, value in saved.items() if key in known})
        if isinstance(data.get("render"), dict) and "skip_empty" not in data["render"]:
            values["render", "skip_empty"] = False  # written before skipping existed: trained dense
        return base.with_values(values)


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
POSITIVE = {("render", "radius"), ("render", "occupancy_fraction"), ("optim", "lr_init"),
            ("optim", "lr_final"), ("latent", "lr"), ("latent", "lr_scale")}
UNIT_INTERVAL = {("optim", "beta1"), ("optim", "beta2"), ("latent", "momentum")}  # [0, 1)
WHOLE_OR_NONE = {("optim", "decay_steps")}  # None by default; a given value is a whole number


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


def fields_of(config: TrainConfig):
    """(section, key, value, dataclasses.Field) for every configuration value, in flag order."""
    for section, cls in SECTIONS.items():
        values = getattr(config, section)
        for f in dataclasses.fields(cls):
            yield section, f.name, getattr(values, f.name), f


def check_config(config: TrainConfig) -> None:
    """One sentence (SystemExit) naming the first flag whose value cannot work, before any work starts."""
    for section, key, value, _ in fields_of(config):
        problem = config_problem(section, key, value)
        if problem:
            raise SystemExit(f"{flag_name(section, key)} {value!r} {problem} "
                             f"({SECTIONS[section].__name__}.{key}).")


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


def flag_help(field: dataclasses.Field, cpu_value, paper_value) -> str:
    """A flag's --help text: the field's documentation (its ``metadata["help"]``) and both presets'
    defaults."""
    meaning = field.metadata.get("help", "")
    return (f"{meaning}; " if meaning else "") + f"cpu: {cpu_value!r}, paper: {paper_value!r}"


def build_parser() -> argparse.ArgumentParser:
    """The CLI: run-level flags plus one flag per configuration value, its help taken from the field's
    declaration (defaults shown for both presets)."""
    parser = argparse.ArgumentParser(
        usage=argparse.SUPPRESS,  # a mistake is one line, "train.py: error: ..."; --help lists every flag
        description="Train LOLNeRF (auto-decoder NeRF) on a prepared dataset; with no arguments, on the "
                    "built-in synthetic heads with the CPU preset.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Multi-GPU/multi-node: torchrun --nnodes M --nproc_per_node K --rdzv_backend c10d "
               "--rdzv_endpoint HOST:PORT train.py ... (identities are sharded across ranks).")
    parser.add_argument("--out", default=None,
                        help="run directory (default: runs/<dataset>-<preset>-<time>)")
    parser.add_argument("--preset", choices=PRESETS, default=None,
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
    parser.add_argument("--device-step", default="auto", choices=DEVICE_STEPS,
                        help="keep the whole training step on the Taichi device (ti.ndarrays, Adam as a "
                             "kernel; only the batch goes in and the loss comes out): on, off, or auto "
                             "(default: on when the Taichi field runs on Vulkan/Metal with torch on the "
                             "CPU, in one process); needs --field-backend taichi")
    parser.add_argument("--resume", nargs="?", const="auto", default=None, metavar="CHECKPOINT",
                        help="continue from the latest checkpoint in --out, or from the given checkpoint "
                             "file or run directory")
    parser.add_argument("--rebuild-cache", action="store_true",
                        help="prepare the cache again with these flags even though a complete one exists "
                             "(default: an existing --cache is trained on as prepared)")
    parser.add_argument("--profile", type=int, default=0, metavar="N",
                        help="run N steps under the Taichi kernel profiler and torch.profiler, print where "
                             "the time went, write a Chrome trace, and exit")
    parser.add_argument("--tf32", choices=("on", "off"), default="on",
                        help="on CUDA GPUs with TF32 (compute capability 8.0+), let float32 matrix products "
                             "use it (default on; the start-up line says what was set)")
    parser.add_argument("--dist-timeout", type=float, default=DEFAULT_TIMEOUT_MINUTES, metavar="MIN",
                        help="torchrun only: minutes the other ranks wait at the first barrier while rank 0 "
                             f"prepares the dataset cache (default {DEFAULT_TIMEOUT_MINUTES})")
    parser.add_argument("--debug-nan-steps", default=os.environ.get(NAN_ENV, ""), help=argparse.SUPPRESS)
    cpu = TrainConfig.cpu()
    groups = {section: parser.add_argument_group(f"{section} ({cls.__name__})")
              for section, cls in SECTIONS.items()}
    for section, key, paper_value, f in fields_of(TrainConfig.paper()):
        groups[section].add_argument(flag_name(section, key), dest=f"{section}.{key}", default=None,
                                     metavar="V", type=str,
                                     help=flag_help(f, cpu.value(section, key), paper_value))
    return parser


def explicit_overrides(args: argparse.Namespace, base: TrainConfig) -> dict[tuple[str, str], object]:
    """Config values given on the command line, parsed to the type of the preset's value."""
    found = {}
    for section, key, like, _ in fields_of(base):
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


def check_resume_compatible(saved: TrainConfig, overrides: dict, fingerprint: str, saved_fingerprint: str,
                            source: Path) -> None:
    """Refuse, in one sentence, a resume whose dataset or learning-relevant config differs."""
    if fingerprint != saved_fingerprint:
        raise SystemExit(f"Cannot resume from {source}: it was trained on a different dataset (fingerprint "
                         f"{saved_fingerprint[:12]} vs {fingerprint[:12]}); pass the same --dataset/--cache "
                         f"or start a new run with another --out.")
    for (section, key), value in overrides.items():
        if (section, key) in RESUMABLE:
            continue
        if saved.value(section, key) != value:
            raise SystemExit(f"Cannot resume from {source}: {flag_name(section, key)} {value!r} differs from "
                             f"the run's {saved.value(section, key)!r}; drop the flag to resume, or "
                             f"start a new run with another --out.")


def resume_config(saved: TrainConfig, overrides: dict) -> TrainConfig:
    """The configuration a resumed run continues with: the saved one, with only the RESUMABLE flags given
    on the command line applied (the others are checked by ``check_resume_compatible``)."""
    return saved.with_values({name: value for name, value in overrides.items() if name in RESUMABLE})


def training_data(data: DataConfig, given: set[str] = frozenset(), rebuild: bool = False,
                  verbose: bool = True) -> DataConfig:
    """Open (or prepare) the cache ``data`` names, with ``dataset.prepare.training_cache``, and return
    ``data`` as the cache holds it (dataset, data root, resolution, identities; ``cache`` resolved).

    ``given`` holds the data fields set on the command line (a contradiction with an existing cache is
    refused: ``dataset.prepare.CacheMismatch``). dataset/ sits below models/ and speaks plain dicts, so
    the section crosses as one here.
    """
    from dataset.prepare import training_cache

    values = dataclasses.asdict(data)
    training_cache(values, given, rebuild, verbose)
    return dataclasses.replace(data, **values)


def resolve_config(args: argparse.Namespace, device_type: str) -> tuple[TrainConfig, dict, str]:
    """Preset + explicit flags -> (config, explicit overrides, preset name)."""
    preset = args.preset or ("paper" if device_type == "cuda" else "cpu")
    base = TrainConfig.named(preset)
    overrides = explicit_overrides(args, base)
    config = base.with_values(overrides)
    check_config(config)
    if config.optim.decay_steps is None:  # decay over the whole run (README: +0.8 dB at 3,000 steps)
        config.optim.decay_steps = config.run.steps
    return config, overrides, preset
