"""The training loop of one process (``train.py`` sets it up; torchrun starts one per rank).

    trainer = Trainer(config, run_dir, backend, resume_payload=None, nan_steps=set())   # config: TrainConfig
    reason = trainer.run(stop)     # "done" | "signal" | "diverged"

A step: sample a pixel batch of this rank's identities -> rays -> ``render_rays`` through DDP (shared
networks only) -> losses -> backward -> Adam on the networks, the latent table's own optimiser on its
rows -> learning-rate schedules. A NaN/inf loss skips the step on every rank. A step syncs with the host
once (the finiteness check after backward, with the ranks' stop requests in the same all-reduce);
logged values are read every ``--log-every`` steps. The next step's batch is sampled while the GPU
runs this one's backward, and copied from pinned memory.
"""

from __future__ import annotations

import contextlib
import json
import random
import signal
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from common.atomic import write_text
from models.background import make_background
from models.checkpoint import CheckpointKeeper, checkpoint_payload
from models.distributed import all_agree, any_rank_each, gather_owned_rows, owned_identities, world
from models.field_backend import background_as_backend, make_field
from models.latents import LatentTable, make_latent_optimizer
from models.losses import compute_losses, psnr_from_mse
from models.render import RenderConfig, render_rays
from models.skip_empty import ClassOccupancy, render_rays_skip_empty
from models.train_config import OptimConfig, TrainConfig


class RenderModule(nn.Module):
    """Field + background in one module, so DDP wraps the shared networks (not the latent table).

    forward(rays, latents, generator) -> RayOutput (see models.render.render_rays).
    """

    def __init__(self, field: nn.Module, background: nn.Module, render_config: RenderConfig):
        import renderer

        super().__init__()
        self.field = field
        self.background = background
        self.render_config = render_config
        self.ops = renderer  # renderer.reference swaps in the plain-torch baseline (benchmarks)
        self.occupancy = None  # a models.skip_empty.ClassOccupancy with --render-skip-empty on

    def forward(self, rays, latents: torch.Tensor, generator: torch.Generator | None):
        if self.occupancy is not None:
            return render_rays_skip_empty(self.field, self.background, rays, latents, self.render_config,
                                          self.occupancy, generator)
        return render_rays(self.field, self.background, rays, latents, self.render_config, generator,
                           ops=self.ops)


def lr_factor(optim: OptimConfig):
    """Multiplier on lr_init at a step: exponential decay to lr_final over decay_steps, then constant."""
    ratio = optim.lr_final / optim.lr_init
    decay = max(1, int(optim.decay_steps))
    return lambda step: ratio ** (min(step, decay) / decay)


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
    """One training run: builds everything from a ``TrainConfig``, then ``run()``s the loop."""

    def __init__(self, config: TrainConfig, run_dir: Path, backend, resume_payload: dict | None,
                 nan_steps: set[int], field_backend: str = "torch",
                 write_preview: Callable[[Trainer], Path] | None = None, device_step: bool = False):
        self.config, self.run_dir, self.backend = config, run_dir, backend
        self.preview_writer = write_preview  # a callback: previews are images, made outside models/
        self.device = backend.device
        self.rank, self.world_size = world()
        self.is_main = self.rank == 0
        self.nan_steps = nan_steps
        run, data = config.run, config.data
        from dataset import PixelBatchSampler, PreparedDataset

        self.dataset = PreparedDataset(data.cache, split="train")
        self.fingerprint = self.dataset.fingerprint
        n_ids = self.dataset.n_identities
        self.owned = owned_identities(n_ids, self.rank, self.world_size)
        batch = config.batch
        self.sampler = PixelBatchSampler(
            self.dataset, identities_per_batch=min(batch.identities, len(self.owned)),
            views_per_identity=batch.views, pixels_per_view=batch.pixels,
            seed=run.seed * 1000 + self.rank,
            identity_subset=self.owned if self.world_size > 1 else None)
        # Same seed on every rank: identical initial networks (DDP also broadcasts them).
        torch.manual_seed(run.seed)
        random.seed(run.seed)
        latent_dim = config.latent.dim
        # "torch" or "taichi" (models.field_backend): same parameters and initial weights either way.
        self.field = make_field(config.field, latent_dim, field_backend)
        self.background = background_as_backend(make_background(
            self.dataset.background, latent_dim, config.background), field_backend)
        init_gen = torch.Generator().manual_seed(run.seed + 1)
        self.latents = LatentTable(n_ids, latent_dim, config.latent.init_std, init_gen)
        for module in (self.field, self.background, self.latents):
            module.to(self.device)
        self.module = RenderModule(self.field, self.background, config.render)
        if self.module.render_config.skip_empty:
            self.module.occupancy = ClassOccupancy(self.module.render_config)
        self.model: nn.Module = self.module
        if self.world_size > 1:
            self.model = nn.parallel.DistributedDataParallel(
                self.module, device_ids=[self.device.index] if self.device.type == "cuda" else None)
        optim = config.optim
        self.optimizers = {
            "networks": torch.optim.Adam(self.module.parameters(), lr=optim.lr_init,
                                         betas=(optim.beta1, optim.beta2)),
            "latents": make_latent_optimizer(self.latents, config.latent, optim.lr_init),
        }
        self.schedulers = {name: torch.optim.lr_scheduler.LambdaLR(opt, lr_factor(optim))
                           for name, opt in self.optimizers.items()}
        self.ray_generator = torch.Generator(device="cpu").manual_seed(run.seed * 1000 + 7 + self.rank)
        self.stop: StopRequest | None = None  # set by run(); train_step folds its flag into the step's sync
        self.stop_agreed: bool | None = None  # that flag agreed by all ranks in the last torch-path step
        self.prefetched: dict | None = None  # the next step's batch, already on its way to the device
        self.sampler_state: dict | None = None
        self.timer = NullTimer()
        self.step = 0
        self.bad_in_row = 0
        self.last_loss: torch.Tensor | None = None  # on the device; read at checkpoints only
        self.keeper = CheckpointKeeper(run_dir, run.keep_last) if self.is_main else None
        if resume_payload is not None:
            self.restore(resume_payload)
        n_ids_preview = min(run.preview_identities, len(self.owned))
        self.preview_ids = self.owned[:n_ids_preview]
        # models.device_step: the step on ti.ndarrays; the torch modules are then synced only for
        # checkpoints and previews (sync_to_torch).
        self.device_step = None
        if device_step:
            from models.device_step import DeviceTrainStep

            if self.world_size > 1:
                raise ValueError("the device-resident step runs in one process only.")
            self.device_step = DeviceTrainStep(self.field, self.background, self.latents, self.optimizers,
                                               self.module.render_config, config.loss,
                                               occupancy=self.module.occupancy)

    def sync_to_torch(self) -> None:
        """Bring the device-resident step's parameters and optimiser state into the torch modules (a
        no-op on the torch path, where they live there already)."""
        if self.device_step is not None:
            self.device_step.to_torch()

    # ----- state -------------------------------------------------------------------------------------
    def restore(self, payload: dict) -> None:
        """Load networks, table, optimisers, schedulers, step and RNG states from a checkpoint payload."""
        self.prefetched = self.sampler_state = None  # a batch drawn before the restore is not trained on
        self.field.load_state_dict(payload["field"])
        self.background.load_state_dict(payload["background"])
        self.latents.load_state_dict(payload["latents"])
        for name, opt in self.optimizers.items():
            opt.load_state_dict(payload["optimizers"][name])
        for name, sch in self.schedulers.items():
            sch.load_state_dict(payload["schedulers"][name])
        self.step = int(payload["step"])
        if self.module.occupancy is not None and "occupancy" in payload:
            self.module.occupancy.load_state_dict(payload["occupancy"])
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
        self.sync_to_torch()
        table = gather_owned_rows(self.latents.codes)
        latent_opt = self.optimizers["latents"].state_dict()
        # state_dict() shares the live per-parameter dicts: build new ones, or the gathered rows of other
        # ranks would leak into this rank's optimiser state.
        latent_opt["state"] = {
            index: {key: (gather_owned_rows(value)
                          if torch.is_tensor(value) and value.shape == self.latents.codes.shape else value)
                    for key, value in state.items()}
            for index, state in latent_opt["state"].items()}
        # The sampler's state before the batch prefetched for the next step (see next_batch), so that a
        # resumed run samples that batch again: resume stays exact.
        sampler_state = self.sampler_state if self.prefetched is not None else self.sampler.state_dict()
        mine = {"sampler": sampler_state, "rays": self.ray_generator.get_state()}
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
            config=self.config, fingerprint=self.fingerprint,
            metric=None if self.last_loss is None else float(self.last_loss))
        payload["optimizers"]["latents"] = latent_opt
        if self.module.occupancy is not None:
            payload["occupancy"] = self.module.occupancy.state_dict()
        return payload

    def save(self) -> Path | None:
        """Write a checkpoint (rank 0 writes; all ranks take part in gathering)."""
        payload = self.payload()
        if payload is None:
            return None
        return self.keeper.save(payload)

    # ----- one step ----------------------------------------------------------------------------------
    def to_device(self, batch: dict) -> dict:
        """A sampled batch on the training device: on CUDA through pinned memory with asynchronous copies
        (the caching host allocator keeps each pinned buffer until its copy is done)."""
        if self.device.type != "cuda":
            return {k: v.to(self.device) for k, v in batch.items()}
        return {k: v.pin_memory().to(self.device, non_blocking=True) for k, v in batch.items()}

    def prefetch(self) -> None:
        """Sample the next step's batch now and start copying it; remember the sampler's state before it."""
        if self.prefetched is None:
            self.sampler_state = self.sampler.state_dict()
            self.prefetched = self.to_device(self.sampler.sample())

    def next_batch(self) -> dict:
        """The batch for this step: the one prefetched during the last step, else a fresh one."""
        self.prefetch()
        batch, self.prefetched = self.prefetched, None
        return batch

    def train_step(self) -> dict | None:
        """Sample a batch, render it, take an optimiser step. Returns metrics, or None for a skipped step."""
        timer = self.timer
        if self.device_step is not None:
            return self.device_train_step()
        with timer.phase("data"):
            batch = self.next_batch()
        if self.module.occupancy is not None:  # the grid's update, every occupancy_every steps
            with timer.phase("occupancy"):
                self.module.occupancy.maybe_update(self.step, self.field, self.latents.codes,
                                                   self.ray_generator)
        with timer.phase("forward"):
            rays = self.module.ops.generate_rays(batch["pixels"], batch["K"], batch["world_to_camera"],
                                          radius=self.module.render_config.radius)
            codes = self.latents(batch["identity"])
            out = self.model(rays, codes, self.ray_generator)
        with timer.phase("loss"):
            terms = compute_losses(out.color, out.opacity, out.weights, batch["rgb"], batch.get("mask"),
                                   self.config.loss)
            if self.step + 1 in self.nan_steps:
                terms["total"] = terms["total"] * float("nan")
        for opt in self.optimizers.values():
            opt.zero_grad(set_to_none=True)
        with timer.phase("backward"):
            terms["total"].backward()
        with timer.phase("data"):
            # While the GPU works through the queued forward and backward, the CPU samples the next batch
            # and starts its copy (on the CPU, where nothing is queued, this only changes the order).
            self.prefetch()
        # The step's one host sync: is the loss finite on every rank, and has any rank been asked to stop?
        # Checked after backward, so the GPU never waits between forward and backward; a skipped step's
        # gradients are discarded by the next zero_grad. (Under DDP backward has already all-reduced
        # them, on every rank alike.)
        total = terms["total"].detach()
        stop_now = self.stop is not None and self.stop.signal_name is not None
        bad, self.stop_agreed = any_rank_each(torch.stack([~torch.isfinite(total),
                                                            torch.tensor(stop_now, device=total.device)]))
        if bad:
            return None
        with timer.phase("optimiser"):
            for opt in self.optimizers.values():
                opt.step()
            for sch in self.schedulers.values():
                sch.step()
        timer.steps += 1
        # Device tensors: read on the host (a sync) only when logged, every --log-every steps.
        metrics = {k: v.detach() for k, v in terms.items()}
        metrics["rays"] = int(batch["rgb"].shape[0])
        return metrics

    def device_train_step(self) -> dict | None:
        """``train_step`` on the device-resident path: the batch goes in, the loss terms come out."""
        with self.timer.phase("data"):
            batch = self.sampler.sample()
        if self.module.occupancy is not None:  # the grid's update, as on the torch path
            with self.timer.phase("occupancy"):
                self.device_step.update_occupancy(self.step, self.ray_generator)
        self.device_step.timer = self.timer
        self.device_step.transfers.reset()
        terms = self.device_step.run(batch, self.ray_generator, poison=self.step + 1 in self.nan_steps)
        if terms is None:
            return None
        for sch in self.schedulers.values():
            sch.step()
        self.timer.steps += 1
        metrics = dict(terms)
        metrics["psnr"] = psnr_from_mse(metrics["rgb"])
        metrics["rays"] = int(batch["rgb"].shape[0])
        metrics["bytes_to_device"] = self.device_step.transfers.uploaded
        metrics["bytes_from_device"] = self.device_step.transfers.downloaded
        return metrics

    # ----- outputs -----------------------------------------------------------------------------------
    def write_preview(self) -> Path | None:
        """The preview for the fixed identities (rank 0), by the ``write_preview`` the trainer was given
        (``export.preview.write_preview`` in train.py); None without one."""
        if self.preview_writer is None:
            return None
        self.sync_to_torch()
        return self.preview_writer(self)

    def run(self, stop: StopRequest) -> str:
        """The training loop; returns why it ended: 'done', 'signal' or 'diverged'."""
        from tqdm import tqdm

        run = self.config.run
        self.stop = stop
        if self.is_main:
            drop_metrics_after(self.run_dir / "metrics.jsonl", self.step)
        log = open(self.run_dir / "metrics.jsonl", "a") if self.is_main else None
        tb = open_tensorboard(self.run_dir) if self.is_main else None
        bar = tqdm(total=run.steps, initial=self.step, disable=not self.is_main, dynamic_ncols=True,
                   desc="train")
        reason = "done"
        try:
            while self.step < run.steps:
                started = time.perf_counter()
                metrics = self.train_step()
                seconds = time.perf_counter() - started
                if metrics is None:
                    self.bad_in_row += 1
                    self.step += 1
                    bar.update(1)
                    self.report_bad_step(log)
                    if self.bad_in_row >= run.max_bad_steps:
                        reason = "diverged"
                        break
                else:
                    self.bad_in_row = 0
                    self.step += 1
                    bar.update(1)
                    self.last_loss = metrics["total"]
                    if self.step % run.log_every == 0 or self.step == 1:
                        metrics = host_metrics(metrics)
                        metrics["rays_per_s"] = metrics["rays"] * self.world_size / max(seconds, 1e-9)
                        bar.set_postfix(loss=f"{metrics['total']:.4f}", psnr=f"{metrics['psnr']:.2f}",
                                        rays_s=f"{metrics['rays_per_s']:.0f}")
                        if log:
                            self.log_metrics(log, tb, metrics, seconds)
                # Under DDP the torch path's step has already agreed on it in its one sync; one process
                # (or the device step) reads the flag directly, which costs nothing.
                agreed = self.stop_agreed if self.world_size > 1 and self.stop_agreed is not None else None
                if agreed if agreed is not None else all_agree(stop.signal_name is not None, self.device):
                    reason = "signal"
                    break
                if self.step % run.checkpoint_every == 0 and self.bad_in_row == 0:
                    self.save()
                if self.is_main and self.step % run.preview_every == 0:
                    self.write_preview()
        finally:
            bar.close()
            if log:
                log.close()
            if tb:
                tb.close()
        if reason != "diverged":
            self.save()
            if self.is_main and self.step % run.preview_every != 0:
                self.write_preview()
        return reason

    def log_metrics(self, log, tb, metrics: dict, seconds: float) -> None:
        """One JSONL line (and TensorBoard scalars when available)."""
        record = {"step": self.step, "loss": metrics["total"], "rgb": metrics["rgb"], "mask": metrics["mask"],
                  "hard": metrics["hard"], "psnr": metrics["psnr"], "rays_per_s": metrics["rays_per_s"],
                  "step_s": seconds, "lr": self.optimizers["networks"].param_groups[0]["lr"],
                  "time": time.time()}
        for key in ("bytes_to_device", "bytes_from_device"):  # the device-resident step's transfers
            if key in metrics:
                record[key] = metrics[key]
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
                   f"({self.bad_in_row} in a row, stopping at {self.config.run.max_bad_steps}).")
        print(message, file=sys.stderr)
        if log:
            log.write(json.dumps({"step": self.step, "skipped": "non-finite loss",
                                  "in_a_row": self.bad_in_row, "time": time.time()}) + "\n")
            log.flush()


def host_metrics(metrics: dict) -> dict:
    """A step's metrics with the device tensors read into floats (one sync for all) and PSNR added.

    >>> host_metrics({"rgb": torch.tensor(0.01), "rays": 8})["psnr"]
    20.0
    """
    names = [k for k, v in metrics.items() if torch.is_tensor(v)]
    values = torch.stack([metrics[k].float().reshape(()) for k in names]).tolist() if names else []
    out = {**metrics, **dict(zip(names, values, strict=True))}
    out["psnr"] = psnr_from_mse(out["rgb"])
    return out


def drop_metrics_after(path: Path, step: int) -> None:
    """Remove log lines past ``step`` (written after the checkpoint a resumed run starts from), and a
    torn line (a crash mid-write), saying so; any other unreadable line is kept as it is."""
    if not path.exists():
        return
    lines = path.read_text().splitlines()
    kept = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            entry = json.loads(line)
        except ValueError:
            if number == len(lines):
                print(f"[train] {path}: dropped a torn last line (a write cut short): {line[:60]!r}")
                continue
            raise SystemExit(f"{path} line {number} is not JSON, so the log cannot be continued safely: "
                             "move the file aside (resuming does not need it) and resume again.") from None
        if entry.get("step", 0) <= step:
            kept.append(line)
    if len(kept) != len(lines):
        write_text(path, "".join(line + "\n" for line in kept))


class NullTimer:
    """Stands in for ``models.step_timing.PhaseTimer`` when nothing is being measured."""

    steps = 0

    @staticmethod
    def phase(name: str):
        return contextlib.nullcontext()


def open_tensorboard(run_dir: Path):
    """A SummaryWriter when tensorboard is installed, else None (it is optional)."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        return None
    return SummaryWriter(str(run_dir / "tensorboard"))
