"""Train LOLNeRF: an auto-decoder NeRF (one latent per identity, one shared field) from single views.

    python train.py                                   # built-in synthetic heads, CPU preset, a few minutes
    python train.py --dataset ffhq --data-root DIR    # photos (prepared once into a cache, then reused)
    python train.py --out runs/x --resume             # continue exactly where runs/x stopped
    torchrun --nproc_per_node 2 train.py ...          # torch.distributed (gloo on CPU, NCCL on CUDA)

Every configuration value has a flag (``--help`` lists them with both presets' defaults). The run
directory holds ``config.json``, ``metrics.jsonl``, ``previews/step_*.png`` and ``checkpoints/``.

Fault injection for tests (debug only, not a user feature): ``--debug-nan-steps 3,4`` or the environment
variable ``LOLNERF_DEBUG_NAN_STEPS=3,4`` makes the loss NaN at those steps.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import random
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from models.background import BackgroundConfig, make_background
from models.checkpoint import (
    CheckpointError,
    CheckpointKeeper,
    checkpoint_payload,
    latest_checkpoint,
    read_checkpoint,
)
from models.distributed import all_agree, gather_owned_rows, launched_by_torchrun, owned_identities, world
from models.field import ConditionedField, FieldConfig
from models.latents import LatentConfig, LatentTable, make_latent_optimizer
from models.losses import LossConfig, compute_losses, psnr
from models.render import RenderConfig, render_rays

NAN_ENV = "LOLNERF_DEBUG_NAN_STEPS"


@dataclass
class OptimConfig:
    """Adam for the networks; the learning rate decays exponentially from lr_init to lr_final over
    decay_steps (then stays), independent of --steps so a resumed run follows the same schedule."""

    lr_init: float = 5e-4
    lr_final: float = 1e-4
    decay_steps: int = 500_000
    beta1: float = 0.9
    beta2: float = 0.999

    @classmethod
    def paper(cls) -> OptimConfig:
        """The official schedule."""
        return cls()

    @classmethod
    def cpu(cls) -> OptimConfig:
        """A short run needs a larger step size (README has the measurement)."""
        return cls(lr_init=2e-3, lr_final=5e-4, decay_steps=1000)


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


# What a flag means, for --help (values whose name says it all are left out).
FLAG_HELP = {
    ("data", "dataset"): "synthetic | ffhq | celeba | celebahq | folder | srn",
    ("data", "data_root"): "folder with the source photos (not needed for synthetic)",
    ("data", "cache"): "prepared-cache directory (default: data/prepared/<source>-...)",
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
    ("loss", "mask"): "weight of (opacity - mask)^2",
    ("loss", "hard"): "weight of the hard-surface loss on sample weights",
    ("optim", "decay_steps"): "steps over which lr decays from lr_init to lr_final",
    ("batch", "identities"): "identities per step",
    ("batch", "views"): "views per identity per step",
    ("batch", "pixels"): "random pixels per view per step",
}


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
    parser.add_argument("--resume", nargs="?", const="auto", default=None, metavar="CHECKPOINT",
                        help="continue from the latest checkpoint in --out, or from the given checkpoint "
                             "file or run directory")
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
            if text is not None:
                try:
                    found[(section, key)] = parse_value(text, like)
                except (ValueError, argparse.ArgumentTypeError) as err:
                    raise SystemExit(f"{flag_name(section, key)} {text!r} is not valid ({err}); "
                                     f"give a value like {like!r}.") from None
    return found


def default_cache(data: dict) -> Path:
    """Prepared-cache directory when --cache is not given: under data/prepared/, named by source."""
    if data["dataset"] == "synthetic":
        return Path("data/prepared") / f"synthetic-{data['synthetic_identities']}-{data['resolution']}"
    root = Path(data["data_root"]).expanduser().resolve()
    return root.parent / f"{root.name}-prepared-{data['dataset']}-{data['resolution']}"


def prepare_cache(data: dict, reuse_existing: bool = False) -> Path:
    """Make sure the prepared cache exists (idempotent) and return its directory.

    ``reuse_existing`` (resume) opens a complete cache as it is, so a --cache that points at another
    dataset is refused by the fingerprint check instead of being rebuilt.
    """
    cache = Path(data["cache"]) if data["cache"] else default_cache(data)
    if reuse_existing and (cache / "manifest.json").is_file():
        return cache
    if data["dataset"] != "synthetic" and not data["data_root"]:
        raise SystemExit(f"--dataset {data['dataset']} needs --data-root DIR pointing at the photos.")
    from dataset.config import PrepareConfig
    from dataset.prepare import prepare_dataset

    settings = PrepareConfig(resolution=data["resolution"], synthetic_identities=data["synthetic_identities"])
    return Path(prepare_dataset(data["dataset"], data["data_root"] or None, cache, settings))


class RenderModule(nn.Module):
    """Field + background in one module, so DDP wraps the shared networks (not the latent table).

    forward(rays, latents, generator) -> RayOutput (see models.render.render_rays).
    """

    def __init__(self, field: ConditionedField, background: nn.Module, render_config: RenderConfig):
        import renderer

        super().__init__()
        self.field = field
        self.background = background
        self.render_config = render_config
        self.ops = renderer  # renderer.reference swaps in the plain-torch baseline (benchmarks)

    def forward(self, rays, latents: torch.Tensor, generator: torch.Generator | None):
        return render_rays(self.field, self.background, rays, latents, self.render_config, generator,
                           ops=self.ops)


def lr_factor(optim: dict):
    """Multiplier on lr_init at a step: exponential decay to lr_final over decay_steps, then constant."""
    ratio = optim["lr_final"] / optim["lr_init"]
    decay = max(1, int(optim["decay_steps"]))
    return lambda step: ratio ** (min(step, decay) / decay)


def parse_nan_steps(text: str) -> set[int]:
    """'3,4,5' -> {3, 4, 5} (debug fault injection)."""
    return {int(s) for s in text.replace(" ", "").split(",") if s}


def atomic_write_json(path: Path, obj) -> None:
    """JSON via temp file + os.replace."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(obj, indent=1))
    os.replace(tmp, path)


class StopRequest:
    """Turns SIGINT/SIGTERM into a flag the loop checks after each step (checkpoint, then clean exit)."""

    def __init__(self):
        self.signal_name: str | None = None
        self.previous = {}

    def __enter__(self):
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                self.previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread: leave signals alone
                pass
        return self

    def _handle(self, signum, frame):
        self.signal_name = signal.Signals(signum).name

    def __exit__(self, *exc):
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)


class Trainer:
    """One training run: builds everything from a config dict, then ``run()``s the loop."""

    def __init__(self, config: dict, run_dir: Path, backend, resume_payload: dict | None,
                 nan_steps: set[int]):
        self.config, self.run_dir, self.backend = config, run_dir, backend
        self.device = backend.device
        self.rank, self.world_size = world()
        self.is_main = self.rank == 0
        self.nan_steps = nan_steps
        run, data = config["run"], config["data"]
        from dataset import PixelBatchSampler, PreparedDataset

        self.dataset = PreparedDataset(data["cache"], split="train")
        self.fingerprint = self.dataset.fingerprint
        n_ids = self.dataset.n_identities
        self.owned = owned_identities(n_ids, self.rank, self.world_size)
        batch = config["batch"]
        self.sampler = PixelBatchSampler(
            self.dataset, identities_per_batch=min(batch["identities"], len(self.owned)),
            views_per_identity=batch["views"], pixels_per_view=batch["pixels"],
            seed=run["seed"] * 1000 + self.rank,
            identity_subset=self.owned if self.world_size > 1 else None)
        # Same seed on every rank: identical initial networks (DDP also broadcasts them).
        torch.manual_seed(run["seed"])
        random.seed(run["seed"])
        latent_dim = config["latent"]["dim"]
        self.field = ConditionedField(FieldConfig(**config["field"]), latent_dim)
        self.background = make_background(self.dataset.background, latent_dim,
                                          BackgroundConfig(**config["background"]))
        init_gen = torch.Generator().manual_seed(run["seed"] + 1)
        self.latents = LatentTable(n_ids, latent_dim, config["latent"]["init_std"], init_gen)
        for module in (self.field, self.background, self.latents):
            module.to(self.device)
        self.module = RenderModule(self.field, self.background, RenderConfig(**config["render"]))
        self.model: nn.Module = self.module
        if self.world_size > 1:
            self.model = nn.parallel.DistributedDataParallel(
                self.module, device_ids=[self.device.index] if self.device.type == "cuda" else None)
        optim = config["optim"]
        self.optimizers = {
            "networks": torch.optim.Adam(self.module.parameters(), lr=optim["lr_init"],
                                         betas=(optim["beta1"], optim["beta2"])),
            "latents": make_latent_optimizer(self.latents, LatentConfig(**config["latent"]),
                                             optim["lr_init"]),
        }
        self.schedulers = {name: torch.optim.lr_scheduler.LambdaLR(opt, lr_factor(optim))
                           for name, opt in self.optimizers.items()}
        self.ray_generator = torch.Generator(device="cpu").manual_seed(run["seed"] * 1000 + 7 + self.rank)
        self.timer = NullTimer()
        self.step = 0
        self.bad_in_row = 0
        self.last_loss: float | None = None
        self.keeper = CheckpointKeeper(run_dir, run["keep_last"]) if self.is_main else None
        if resume_payload is not None:
            self.restore(resume_payload)
        n_ids_preview = min(run["preview_identities"], len(self.owned))
        self.preview_ids = self.owned[:n_ids_preview]

    # ----- state -------------------------------------------------------------------------------------
    def restore(self, payload: dict) -> None:
        """Load networks, table, optimisers, schedulers, step and RNG states from a checkpoint payload."""
        self.field.load_state_dict(payload["field"])
        self.background.load_state_dict(payload["background"])
        self.latents.load_state_dict(payload["latents"])
        for name, opt in self.optimizers.items():
            opt.load_state_dict(payload["optimizers"][name])
        for name, sch in self.schedulers.items():
            sch.load_state_dict(payload["schedulers"][name])
        self.step = int(payload["step"])
        rng = payload["rng"]
        torch.set_rng_state(rng["torch"])
        random.setstate(rng["python"])
        per_rank = rng["ranks"]
        if len(per_rank) == self.world_size:
            mine = per_rank[self.rank]
            self.sampler.load_state_dict(mine["sampler"])
            self.ray_generator.set_state(mine["rays"])
        elif self.is_main:
            print(f"[train] the checkpoint was written by {len(per_rank)} ranks, this run has "
                  f"{self.world_size}: batches continue from fresh seeds (not an exact continuation).")

    def payload(self) -> dict | None:
        """Checkpoint payload on rank 0 (None elsewhere); collective: every rank must call it."""
        table = gather_owned_rows(self.latents.codes)
        latent_opt = self.optimizers["latents"].state_dict()
        for state in latent_opt["state"].values():
            for key, value in state.items():
                if torch.is_tensor(value) and value.shape == self.latents.codes.shape:
                    state[key] = gather_owned_rows(value)
        mine = {"sampler": self.sampler.state_dict(), "rays": self.ray_generator.get_state()}
        if self.world_size > 1:
            ranks = [None] * self.world_size
            torch.distributed.all_gather_object(ranks, mine)
        else:
            ranks = [mine]
        if not self.is_main:
            return None
        latents = LatentTable(self.latents.n, self.latents.dim)
        latents.codes.data.copy_(table)
        optimizers = dict(self.optimizers)
        payload = checkpoint_payload(
            field=self.field, background=self.background, latents=latents, optimizers=optimizers,
            schedulers=self.schedulers, step=self.step,
            rng={"torch": torch.get_rng_state(), "python": random.getstate(), "ranks": ranks},
            config=self.config, fingerprint=self.fingerprint, metric=self.last_loss)
        payload["optimizers"]["latents"] = latent_opt
        return payload

    def save(self) -> Path | None:
        """Write a checkpoint (rank 0 writes; all ranks take part in gathering)."""
        payload = self.payload()
        if payload is None:
            return None
        return self.keeper.save(payload)

    # ----- one step ----------------------------------------------------------------------------------
    def train_step(self) -> dict | None:
        """Sample a batch, render it, take an optimiser step. Returns metrics, or None for a skipped step."""
        timer = self.timer
        with timer.phase("data"):
            batch = {k: v.to(self.device) for k, v in self.sampler.sample().items()}
        with timer.phase("forward"):
            rays = self.module.ops.generate_rays(batch["pixels"], batch["K"], batch["world_to_camera"],
                                          radius=self.module.render_config.radius)
            codes = self.latents(batch["identity"])
            out = self.model(rays, codes, self.ray_generator)
        with timer.phase("loss"):
            terms = compute_losses(out.color, out.opacity, out.weights, batch["rgb"], batch.get("mask"),
                                   LossConfig(**self.config["loss"]))
            if self.step + 1 in self.nan_steps:
                terms["total"] = terms["total"] * float("nan")
            finite = bool(torch.isfinite(terms["total"]).item())
        for opt in self.optimizers.values():
            opt.zero_grad(set_to_none=True)
        if all_agree(not finite, self.device):
            return None
        with timer.phase("backward"):
            terms["total"].backward()
        with timer.phase("optimiser"):
            for opt in self.optimizers.values():
                opt.step()
            for sch in self.schedulers.values():
                sch.step()
        timer.steps += 1
        metrics = {k: float(v.detach()) for k, v in terms.items()}
        metrics["psnr"] = psnr(metrics["rgb"])
        metrics["rays"] = int(batch["rgb"].shape[0])
        return metrics

    # ----- outputs -----------------------------------------------------------------------------------
    def write_preview(self) -> Path:
        """Preview grid PNG for the fixed identities (rank 0)."""
        from export.media import save_png
        from models.preview import preview_grid

        grid = preview_grid(self.field, self.background, self.latents, self.dataset, self.preview_ids,
                            self.module.render_config)
        return save_png(self.run_dir / "previews" / f"step_{self.step:08d}.png", grid)

    def run(self, stop: StopRequest) -> str:
        """The training loop; returns why it ended: 'done', 'signal' or 'diverged'."""
        from tqdm import tqdm

        run = self.config["run"]
        if self.is_main:
            drop_metrics_after(self.run_dir / "metrics.jsonl", self.step)
        log = open(self.run_dir / "metrics.jsonl", "a") if self.is_main else None
        tb = open_tensorboard(self.run_dir) if self.is_main else None
        bar = tqdm(total=run["steps"], initial=self.step, disable=not self.is_main, dynamic_ncols=True,
                   desc="train")
        reason = "done"
        try:
            while self.step < run["steps"]:
                started = time.perf_counter()
                metrics = self.train_step()
                seconds = time.perf_counter() - started
                if metrics is None:
                    self.bad_in_row += 1
                    self.step += 1
                    bar.update(1)
                    self.report_bad_step(log)
                    if self.bad_in_row >= run["max_bad_steps"]:
                        reason = "diverged"
                        break
                else:
                    self.bad_in_row = 0
                    self.step += 1
                    bar.update(1)
                    self.last_loss = metrics["total"]
                    metrics["rays_per_s"] = metrics["rays"] * self.world_size / max(seconds, 1e-9)
                    bar.set_postfix(loss=f"{metrics['total']:.4f}", psnr=f"{metrics['psnr']:.2f}",
                                    rays_s=f"{metrics['rays_per_s']:.0f}")
                    if log and (self.step % run["log_every"] == 0 or self.step == 1):
                        self.log_metrics(log, tb, metrics, seconds)
                if all_agree(stop.signal_name is not None, self.device):
                    reason = "signal"
                    break
                if self.step % run["checkpoint_every"] == 0 and self.bad_in_row == 0:
                    self.save()
                if self.is_main and self.step % run["preview_every"] == 0:
                    self.write_preview()
        finally:
            bar.close()
            if log:
                log.close()
            if tb:
                tb.close()
        if reason != "diverged":
            self.save()
            if self.is_main and self.step % run["preview_every"] != 0:
                self.write_preview()
        return reason

    def log_metrics(self, log, tb, metrics: dict, seconds: float) -> None:
        """One JSONL line (and TensorBoard scalars when available)."""
        record = {"step": self.step, "loss": metrics["total"], "rgb": metrics["rgb"], "mask": metrics["mask"],
                  "hard": metrics["hard"], "psnr": metrics["psnr"], "rays_per_s": metrics["rays_per_s"],
                  "step_s": seconds, "lr": self.optimizers["networks"].param_groups[0]["lr"],
                  "time": time.time()}
        log.write(json.dumps(record) + "\n")
        log.flush()
        if tb:
            for key in ("loss", "rgb", "mask", "hard", "psnr", "rays_per_s", "lr"):
                tb.add_scalar(f"train/{key}", record[key], self.step)

    def report_bad_step(self, log) -> None:
        """Tell the user a step was skipped (and log it)."""
        if not self.is_main:
            return
        message = (f"[train] step {self.step}: loss is NaN/inf, step skipped "
                   f"({self.bad_in_row} in a row, stopping at {self.config['run']['max_bad_steps']}).")
        print(message, file=sys.stderr)
        if log:
            log.write(json.dumps({"step": self.step, "skipped": "non-finite loss",
                                  "in_a_row": self.bad_in_row, "time": time.time()}) + "\n")
            log.flush()


def drop_metrics_after(path: Path, step: int) -> None:
    """Remove log lines past ``step`` (written after the checkpoint a resumed run starts from)."""
    if not path.exists():
        return
    lines = path.read_text().splitlines()
    kept = [line for line in lines if line.strip() and json.loads(line).get("step", 0) <= step]
    if len(kept) != len(lines):
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text("".join(line + "\n" for line in kept))
        os.replace(tmp, path)


class NullTimer:
    """Stands in for ``models.step_timing.PhaseTimer`` when nothing is being measured."""

    steps = 0

    @staticmethod
    def phase(name: str):
        return contextlib.nullcontext()


def profile_training(trainer: Trainer, n_steps: int, run_dir: Path) -> dict[str, float]:
    """``--profile N``: N steps under the Taichi kernel profiler and torch.profiler; print one table."""
    from models.step_timing import PhaseTimer, TimedField, breakdown_table
    from renderer.profiling import profile

    warmup = 2  # compiles the Taichi kernels and warms torch's allocator outside the measurement
    for _ in range(warmup):
        trainer.train_step()
    timer = PhaseTimer(trainer.device)
    trainer.timer = timer
    timed = TimedField(trainer.module.field, timer)
    trainer.module.field = timed
    trace = run_dir / "profile_trace.json"
    rays = 0
    try:
        with profile(trace_path=trace, print_table=False) as prof:
            for _ in range(n_steps):
                with timer.phase("step"):
                    metrics = trainer.train_step()
                timed.collect_backward()
                rays = metrics["rays"] if metrics else rays
    finally:
        trainer.module.field = timed.field
        trainer.timer = NullTimer()
    per_step = timer.per_step()
    per_step["renderer forward"] = per_step.pop("forward") - per_step.get("field forward", 0.0)
    per_step["renderer backward"] = per_step.pop("backward") - per_step.get("field backward", 0.0)
    print(f"[profile] {n_steps} steps after {warmup} warm-up steps; Taichi arch {trainer.backend.arch}, "
          f"torch device {trainer.device}")
    print(breakdown_table(per_step, rays))
    print("\nrenderer kernels (Taichi kernel profiler) and top torch operators (torch.profiler), all steps:")
    print(prof.table())
    print(f"[profile] Chrome trace: {trace}")
    return per_step


def open_tensorboard(run_dir: Path):
    """A SummaryWriter when tensorboard is installed, else None (it is optional)."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        return None
    return SummaryWriter(str(run_dir / "tensorboard"))


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
    config["preset"] = preset
    return config, overrides, preset


def main(argv: list[str] | None = None) -> Path:
    """Train (or profile) and return the run directory."""
    args = build_parser().parse_args(argv)
    from renderer.backend import BackendUnavailableError, init_backend

    distributed = launched_by_torchrun()
    if distributed and not torch.distributed.is_initialized():
        use_nccl = args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
        torch.distributed.init_process_group(backend="nccl" if use_nccl else "gloo")
        if use_nccl:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    rank, _ = world()
    arch = args.arch
    if arch == "auto":
        # Without CUDA the field MLP (~90 % of a step) runs in torch on the CPU whatever Taichi uses, and a
        # Vulkan renderer copies every tensor host<->device (on lavapipe a tiny run took 23 s vs 4.8 s on
        # x64). So training's auto is CUDA or x64; a Vulkan-only GPU is used with --arch vulkan.
        arch = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        backend = init_backend(arch, args.device, kernel_profiler=args.profile > 0,
                                        random_seed=0, verbose=rank == 0)
    except (BackendUnavailableError, ValueError) as err:
        raise SystemExit(str(err)) from None
    if backend.device.type == "cuda" and distributed:
        backend = dataclasses.replace(backend, device=torch.device("cuda", torch.cuda.current_device()))

    config, overrides, preset = resolve_config(args, backend.device.type)
    resume_payload, resume_source = None, None
    if args.resume:
        resume_source = Path(args.resume if args.resume != "auto" else (args.out or ""))
        if args.resume == "auto" and not args.out:
            raise SystemExit("--resume without a path needs --out RUN_DIR (the run to continue).")
        try:
            path = resume_source if resume_source.is_file() else latest_checkpoint(resume_source)
            resume_payload = read_checkpoint(path)
        except CheckpointError as err:
            raise SystemExit(f"Cannot resume: {err}") from None
        saved = resume_payload["config"]
        config = {section: dict(values) if isinstance(values, dict) else values
                  for section, values in saved.items()}
        for (section, key), value in overrides.items():
            if (section, key) in RESUMABLE:
                config[section][key] = value
        run_dir = Path(args.out) if args.out else path.parent.parent
    else:
        stamp = time.strftime("%Y%m%d-%H%M%S")
        default_dir = Path("runs") / f"{config['data']['dataset']}-{preset}-{stamp}"
        run_dir = Path(args.out) if args.out else default_dir
        if (run_dir / "checkpoints").is_dir() and any((run_dir / "checkpoints").glob("step_*.pt")):
            raise SystemExit(f"{run_dir} already holds checkpoints; pass --resume to continue that run or "
                             f"choose another --out.")

    if rank == 0:
        run_dir.mkdir(parents=True, exist_ok=True)
        cache = prepare_cache(config["data"], reuse_existing=resume_payload is not None)
    if distributed:
        torch.distributed.barrier()
        if rank != 0:  # the cache now exists: every other rank just opens it
            cache = prepare_cache(config["data"], reuse_existing=True)
    config["data"]["cache"] = str(Path(cache).resolve())

    if resume_payload is not None:
        from dataset import PreparedDataset

        fingerprint = PreparedDataset(config["data"]["cache"]).fingerprint
        check_resume_compatible(resume_payload["config"], overrides, fingerprint,
                                resume_payload["fingerprint"], resume_source)
    if rank == 0:
        atomic_write_json(run_dir / "config.json", config)

    trainer = Trainer(config, run_dir, backend, resume_payload, parse_nan_steps(args.debug_nan_steps))
    if args.profile > 0:
        profile_training(trainer, args.profile, run_dir)
        return run_dir
    with StopRequest() as stop:
        reason = trainer.run(stop)
    if rank == 0:
        report_end(reason, trainer, run_dir, stop)
    if distributed:
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
    if reason == "diverged":
        raise SystemExit(diagnosis(trainer))
    return run_dir


def diagnosis(trainer: Trainer) -> str:
    """One paragraph on why the loss went non-finite and what to try."""
    run = trainer.config["run"]
    return (f"Training stopped at step {trainer.step}: the loss was NaN/inf for {run['max_bad_steps']} steps "
            f"in a row, so the weights no longer produce finite values. The last checkpoint in "
            f"{trainer.run_dir / 'checkpoints'} is from before the failure. Try a smaller --optim-lr-init "
            f"(now {trainer.config['optim']['lr_init']}), check the dataset for NaN cameras or images, then "
            f"resume with --resume.")


def report_end(reason: str, trainer: Trainer, run_dir: Path, stop: StopRequest) -> None:
    """Print where the outputs are."""
    if reason == "signal":
        print(f"[train] {stop.signal_name} received: checkpoint written at step {trainer.step}; continue "
              f"with --out {run_dir} --resume.")
    if reason != "diverged":
        print(f"[train] run directory: {run_dir}\n"
              f"  checkpoints: {run_dir / 'checkpoints'}\n"
              f"  previews:    {run_dir / 'previews'}\n"
              f"  metrics:     {run_dir / 'metrics.jsonl'}")


if __name__ == "__main__":
    main()
