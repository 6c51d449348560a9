"""A training step that stays on the Taichi device: for a Vulkan or Metal GPU that torch cannot use.

On such a machine torch runs on the CPU, and every Taichi launch that takes a torch tensor copies it
to the device and back (docs/TAICHI.md, Torch interop). This step keeps everything in ``ti.ndarray``s
from kernel to kernel: rays, samples, field inputs, activations and outputs, compositing weights, every
gradient, the network parameters, the latent table and the optimisers' moments. Per step only the
batch goes in (pixels, cameras, colours, masks, identity rows: 116 bytes a ray) and the three loss sums
come out (12 bytes; skipping empty space, also the two packed sample counts, 8 bytes, and the grid's
update every ``occupancy_every`` steps); ``transfers`` counts them all.

    step = DeviceTrainStep(field, background, latents, optimizers, RenderConfig.cpu(), LossConfig())
    terms = step.run(batch, generator)        # {"rgb", "mask", "hard", "total"} or None (not finite)
    step.to_torch()                           # parameters, table and optimiser state back into torch

Its forward pass is ``models.device_forward.DeviceForward`` (shared with device-resident rendering), or
``models.device_skip.DeviceSkipForward`` through an occupancy grid.
It does what ``models.trainer.Trainer.train_step`` does on the torch path, kernel for kernel: the
same stratified samples and importance draws from the same generator (so, seeded alike, both paths
render the same rays), one field evaluation per sample (coarse, then fine), compositing, the LOLNeRF
losses (``models.device_losses``), the hand-written backward passes (``renderer.composite``,
``models.taichi_field``, ``models.taichi_background``) and torch's Adam / SGD arithmetic
(``renderer.optimizers``). The torch modules and optimisers stay the record: ``to_torch`` writes the
device state into them (for checkpoints, previews, logging and evaluation) and ``from_torch`` reads it
back (after a resume), so a checkpoint does not know which path wrote it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import numpy as np
import taichi as ti
import torch

from models.background import ConstantBackground
from models.device_forward import DeviceForward, Rendered
from models.device_losses import loss_grads_kernel, loss_scales, loss_sums_kernel, loss_terms
from models.device_skip import DeviceGrid, DeviceSkipForward, PackedEvaluation, PackedRendered, device_density
from models.losses import LossConfig
from models.render import RenderConfig
from models.skip_empty import ClassOccupancy
from models.taichi_background import TaichiBackground, background_backward
from models.taichi_field import TaichiField, field_backward
from renderer.backend import launch
from renderer.composite import composite_backward_kernel
from renderer.device import (
    TransferLog,
    Workspace,
    flat_to_rows_kernel,
    gather_rows_kernel,
    scatter_add_rows_kernel,
    split_grads_kernel,
)
from renderer.device_packed import dense_to_packed_kernel, split_packed_grads_kernel, sum_rows_per_ray_kernel
from renderer.optimizers import adam_update, sgd_update
from renderer.packed import packed_backward_kernel


class _DeviceParam:
    """One torch parameter's device copy, its gradient and its optimiser state (m, v or a momentum buffer)."""

    def __init__(self, ws: Workspace, name: str, param: torch.nn.Parameter, n_moments: int):
        self.param = param
        shape = tuple(param.shape)
        self.value = ws.get(name, shape)
        self.grad = ws.get(name + ".grad", shape)
        self.moments = [ws.get(f"{name}.m{k}", shape) for k in range(n_moments)]


class _Optimiser:
    """A torch optimiser's arithmetic on device copies of its parameters."""

    def __init__(self, ws: Workspace, name: str, optimizer: torch.optim.Optimizer):
        if len(optimizer.param_groups) != 1:
            raise ValueError("the device-resident step takes optimisers with one parameter group.")
        self.torch = optimizer
        group = optimizer.param_groups[0]
        if isinstance(optimizer, torch.optim.Adam):
            self.kind = "adam"
            if group["weight_decay"] or group["amsgrad"] or group.get("maximize"):
                raise ValueError("the device-resident step's Adam has no weight decay, amsgrad or maximize.")
        elif isinstance(optimizer, torch.optim.SGD):
            self.kind = "sgd"
            if group["weight_decay"] or group["dampening"] or group["nesterov"] or group.get("maximize"):
                raise ValueError(
                    "the device-resident step's SGD has momentum only (no decay, dampening, "
                    "Nesterov or maximize)."
                )
        else:
            raise ValueError(f"the device-resident step has no kernel for {type(optimizer).__name__}.")
        n_moments = 2 if self.kind == "adam" else 1
        self.params = [_DeviceParam(ws, f"{name}{i}", p, n_moments) for i, p in enumerate(group["params"])]
        self.steps = 0

    def from_torch(self) -> None:
        """Upload the parameters and the optimiser state (zeros before the first step)."""
        self.steps = 0
        for p in self.params:
            p.value.from_numpy(p.param.detach().cpu().float().numpy())
            state = self.torch.state.get(p.param, {})
            keys = ("exp_avg", "exp_avg_sq") if self.kind == "adam" else ("momentum_buffer",)
            for moment, key in zip(p.moments, keys, strict=True):
                value = state.get(key)
                if value is None:
                    moment.fill(0)
                else:
                    moment.from_numpy(value.detach().cpu().float().numpy())
            if self.kind == "adam" and "step" in state:
                self.steps = int(float(state["step"]))
            elif self.kind == "sgd" and state.get("momentum_buffer") is not None:
                self.steps = 1  # torch's SGD records no count; a buffer means it has stepped

    def to_torch(self) -> None:
        """Download the parameters and write the state as torch's optimiser keeps it."""
        for p in self.params:
            with torch.no_grad():
                p.param.copy_(torch.from_numpy(p.value.to_numpy()))
            if self.steps == 0:
                self.torch.state.pop(p.param, None)
                continue
            moments = [torch.from_numpy(m.to_numpy()).to(p.param.device) for m in p.moments]
            if self.kind == "adam":
                self.torch.state[p.param] = {
                    "step": torch.tensor(float(self.steps)),
                    "exp_avg": moments[0],
                    "exp_avg_sq": moments[1],
                }
            else:
                self.torch.state[p.param] = {"momentum_buffer": moments[0]}

    def zero_grad(self) -> None:
        for p in self.params:
            p.grad.fill(0)

    def step(self) -> None:
        """One update at the group's current learning rate (the torch scheduler sets it)."""
        group = self.torch.param_groups[0]
        self.steps += 1
        for p in self.params:
            if self.kind == "adam":
                beta1, beta2 = group["betas"]
                adam_update(
                    p.value,
                    p.grad,
                    p.moments[0],
                    p.moments[1],
                    group["lr"],
                    beta1,
                    beta2,
                    group["eps"],
                    self.steps,
                )
            else:
                sgd_update(p.value, p.grad, p.moments[0], group["lr"], group["momentum"])
        # The update ran here, not in torch's step(): tell the LR scheduler that the optimiser stepped
        # (otherwise it warns that scheduler.step() came first).
        self.torch._opt_called = True


class DeviceTrainStep:
    """The training step on ``ti.ndarray``s (see the module docstring).

    ``field`` is a ``TaichiField``; ``background`` a ``TaichiBackground`` or ``ConstantBackground``;
    ``optimizers`` as the trainer's: {"networks": Adam over field + background parameters, "latents":
    Adam or SGD over the table}. ``occupancy`` (a ``models.skip_empty.ClassOccupancy``, with
    ``--render-skip-empty on``): render through its grid with packed samples (``models.device_skip``)
    and update it with ``update_occupancy``. ``train_networks=False`` freezes the field and background
    (no parameter gradients, no network update, the grid left as it is): only the latent table learns,
    as when fitting a new photo's code (``export.fitting``). ``timer`` (a
    ``models.step_timing.PhaseTimer``) may be swapped in to time the phases.
    """

    def __init__(
        self,
        field: TaichiField,
        background: torch.nn.Module,
        latents: torch.nn.Module,
        optimizers: dict[str, torch.optim.Optimizer],
        render_config: RenderConfig,
        loss_config: LossConfig,
        occupancy: ClassOccupancy | None = None,
        train_networks: bool = True,
    ):
        if not isinstance(field, TaichiField):
            raise ValueError("the device-resident step needs the Taichi field (--field-backend taichi).")
        if not isinstance(background, TaichiBackground | ConstantBackground):
            raise ValueError("the device-resident step needs a Taichi background network or a constant one.")
        self.field, self.background, self.latents = field, background, latents
        self.render_config, self.loss_config = render_config, loss_config
        self.ws = Workspace()
        self.transfers = TransferLog()
        self.timer = None
        self.networks = _Optimiser(self.ws, "net", optimizers["networks"])
        self.table = _Optimiser(self.ws, "table", optimizers["latents"])
        by_param = {id(p.param): p for p in self.networks.params}
        self.field_params = [by_param[id(p)] for p in field.parameter_list()]
        self.bg_params = (
            [by_param[id(p)] for p in background.parameter_list()]
            if isinstance(background, TaichiBackground)
            else []
        )
        if len(self.field_params) + len(self.bg_params) != len(self.networks.params):
            raise ValueError(
                "the networks optimiser must hold exactly the field's and background's parameters."
            )
        if len(self.table.params) != 1:
            raise ValueError("the latent optimiser must hold exactly the latent table.")
        self._bg_color = None if self.bg_params else self.ws.get("bg_color", (3,))
        field_values, bg_values = [p.value for p in self.field_params], [p.value for p in self.bg_params]
        self.occupancy = occupancy
        self.train_networks = train_networks
        self.grid = None if occupancy is None else DeviceGrid(self.ws, occupancy, self.transfers)
        if self.grid is None:
            self.rendering = DeviceForward(self.ws, field, background, render_config, field_values, bg_values,
                                           self._bg_color, phase=self._phase)  # fmt: skip
        else:
            self.rendering = DeviceSkipForward(self.ws, field, background, render_config, field_values,
                                               bg_values, self._bg_color, phase=self._phase, grid=self.grid)
        self.from_torch()

    # ----- state -------------------------------------------------------------------------------------
    def from_torch(self) -> None:
        """Read parameters, table and optimiser state from the torch modules (start, resume)."""
        self.networks.from_torch()
        self.table.from_torch()
        if self._bg_color is not None:
            self._bg_color.from_numpy(self.background.color.detach().cpu().float().numpy())
        if self.grid is not None:
            self.grid.upload()

    def to_torch(self) -> None:
        """Write parameters, table and optimiser state into the torch modules (checkpoints, previews), and
        what the steps saw of the occupancy grid into ``occupancy``."""
        self.networks.to_torch()
        self.table.to_torch()
        if self.grid is not None:
            self.grid.flush()

    def update_occupancy(self, step: int, generator: torch.Generator | None, force: bool = False) -> bool:
        """The grid's update when ``step`` is a multiple of ``occupancy_every`` or ``force`` is set (as
        ``ClassOccupancy.maybe_update`` on the torch path, with the same draws from ``generator``): the
        field's density on the device's parameters, the table's codes, and what the steps since the
        last update saw. True when it ran."""
        if self.grid is None or (step % self.occupancy.every != 0 and not force):
            return False
        self.grid.flush()
        codes = torch.from_numpy(self.transfers.download(self.table.params[0].value))
        self.occupancy.update(step, device_density(self.rendering), codes, generator)
        self.grid.upload()
        return True

    # ----- helpers -----------------------------------------------------------------------------------
    def _phase(self, name: str):
        return self.timer.phase(name) if self.timer is not None else contextlib.nullcontext()

    def _buffers(self, prefix: str) -> Callable[[str, tuple[int, ...]], ti.lang._ndarray.Ndarray]:
        return lambda name, shape: self.ws.get(prefix + name, shape)

    def _upload_batch(self, batch: dict[str, torch.Tensor]) -> dict:
        up, ws = self.transfers, self.ws
        arrays = {
            "pixels": up.upload(ws, "in.pixels", batch["pixels"].numpy().astype(np.float32)),
            "K": up.upload(ws, "in.K", batch["K"].numpy().astype(np.float32).reshape(-1, 3, 3)),
            "w2c": up.upload(
                ws, "in.w2c", batch["world_to_camera"].numpy().astype(np.float32).reshape(-1, 3, 4)
            ),
            "rgb": up.upload(ws, "in.rgb", batch["rgb"].numpy().astype(np.float32)),
            "identity": up.upload(ws, "in.identity", batch["identity"].numpy().astype(np.int64)),
        }
        arrays["n_rays"] = int(batch["pixels"].shape[0])
        mask = batch.get("mask")
        arrays["has_mask"] = mask is not None
        arrays["mask"] = (
            up.upload(ws, "in.mask", mask.numpy().astype(np.float32))
            if mask is not None
            else ws.get("in.no_mask", (1,))
        )
        return arrays

    # ----- one step ----------------------------------------------------------------------------------
    def run(self, batch: dict[str, torch.Tensor], generator: torch.Generator,
            poison: bool = False) -> dict[str, float] | None:
        """Render the batch, compute the losses and, when they are finite, take the optimiser steps.

        ``batch`` as ``dataset.PixelBatchSampler.sample`` gives it (CPU tensors); ``generator`` draws
        the two sample keys as the torch path does. ``poison`` makes the loss NaN (``--debug-nan-steps``).
        Returns the loss terms as floats, or None when the total is not finite (nothing updated).
        """
        with self._phase("data"):
            inputs = self._upload_batch(batch)
        with self._phase("forward"):
            state = self._forward(inputs, generator)
        with self._phase("loss"):
            sums = self.ws.zeros("loss_sums", (3,))
            launch("loss_sums", loss_sums_kernel, state.per_ray, state.weights, inputs["rgb"], inputs["mask"],
                   int(inputs["has_mask"]), sums)
            terms = loss_terms(self.transfers.download(sums), state.n_rays, state.width, inputs["has_mask"],
                               self.loss_config)
        if poison:
            terms["total"] = float("nan")
        if not np.isfinite(terms["total"]):
            return None
        with self._phase("backward"):
            self._backward(inputs, state)
        with self._phase("optimiser"):
            if self.train_networks:
                self.networks.step()
            self.table.step()
        return terms

    def _forward(self, inputs: dict, generator: torch.Generator) -> Rendered | PackedRendered:
        """Each ray's code from the table, then ``DeviceForward.forward`` (the same draws as render_rays),
        or through the grid ``DeviceSkipForward.forward_packed`` (as render_rays_skip_empty)."""
        n_rays = inputs["n_rays"]
        table = self.table.params[0].value
        codes = self.ws.get("codes", (n_rays, self.field.latent_dim))
        launch("gather_codes", gather_rows_kernel, table, inputs["identity"], 1, codes)
        if self.grid is not None:
            return self.rendering.forward_packed(inputs["pixels"], inputs["K"], inputs["w2c"], codes, n_rays,
                                                 generator, table=table, identity=inputs["identity"],
                                                 observe=self.train_networks)  # fmt: skip
        return self.rendering.forward(inputs["pixels"], inputs["K"], inputs["w2c"], codes, n_rays, generator)

    def _backward(self, inputs: dict, state: Rendered | PackedRendered) -> None:
        """Loss -> compositing -> (coarse, fine) field and background -> parameter and table gradients."""
        ws = self.ws
        n_rays, width, identity = state.n_rays, state.width, inputs["identity"]
        grad_per_ray = ws.get("grad_per_ray", (n_rays, 5))
        grad_weights = ws.get("grad_weights", (n_rays * width,))
        launch("loss_grads", loss_grads_kernel, state.per_ray, state.weights, inputs["rgb"], inputs["mask"],
               int(inputs["has_mask"]), *loss_scales(n_rays, width, inputs["has_mask"], self.loss_config),
               grad_per_ray, grad_weights)  # fmt: skip
        grad_bg = ws.get("grad_background", (n_rays, 3))
        if isinstance(state, PackedRendered):
            self._composite_backward_packed(state, grad_per_ray, grad_weights, grad_bg)
        else:
            self._composite_backward_dense(state, grad_per_ray, grad_weights, grad_bg)
        passes = [state.coarse] + ([state.fine] if state.fine is not None else [])
        if self.train_networks:
            self.networks.zero_grad()
        self.table.zero_grad()
        table_grad = self.table.params[0].grad
        values, grads = [p.value for p in self.field_params], [p.grad for p in self.field_params]
        for evaluation in passes:
            # Dense: one code per ray (its samples' gradients summed by field_backward's repeat). Packed:
            # one code row per sample (gathered from the table by its ray's identity), whose gradients are
            # summed per ray (a ray's samples lie back to back) before the one scatter per ray.
            packed = isinstance(evaluation, PackedEvaluation)
            code_rows = evaluation.rows if packed else n_rays
            grad_codes = ws.get(evaluation.prefix + "grad_codes", (code_rows, self.field.latent_dim))
            with self._phase("field backward"):
                field_backward(values, evaluation.acts, evaluation.codes, evaluation.grad_sigma,
                               evaluation.grad_rgb, self.field.spec(), self._buffers(evaluation.prefix),
                               grads=grads, grad_latents=grad_codes, repeat=evaluation.per_ray,
                               param_grads=self.train_networks)  # fmt: skip
            if packed:
                per_ray = ws.get(evaluation.prefix + "grad_codes_per_ray", (n_rays, self.field.latent_dim))
                launch("sum_codes_per_ray", sum_rows_per_ray_kernel, grad_codes, evaluation.offsets,
                       evaluation.counts, per_ray)  # fmt: skip
                grad_codes = per_ray
            launch("scatter_codes", scatter_add_rows_kernel, grad_codes, identity, 1, table_grad)
        if state.bg is not None:
            acts, codes = state.bg
            grad_codes = ws.get("bg.grad_codes", (n_rays, self.field.latent_dim))
            background_backward([p.value for p in self.bg_params], acts, codes, grad_bg, self._buffers("bg."),
                                grads=[p.grad for p in self.bg_params], grad_latents=grad_codes,
                                param_grads=self.train_networks)  # fmt: skip
            launch("scatter_codes", scatter_add_rows_kernel, grad_codes, identity, 1, table_grad)

    def _evaluation_grads(self, state: Rendered | PackedRendered) -> None:
        """Buffers for the gradients of each evaluation's outputs: grad_sigma (rows, 1), grad_rgb
        (rows, 3)."""
        for evaluation in [state.coarse] + ([state.fine] if state.fine is not None else []):
            evaluation.grad_sigma = self.ws.get(evaluation.prefix + "grad_sigma", (evaluation.rows, 1))
            evaluation.grad_rgb = self.ws.get(evaluation.prefix + "grad_rgb", (evaluation.rows, 3))

    def _composite_backward_dense(self, state: Rendered, grad_per_ray, grad_weights, grad_bg) -> None:
        """Dense compositing backward, its gradients split to the coarse and fine evaluations."""
        ws, width = self.ws, state.width
        grad_sigma = ws.get("grad_sigma", (state.n_rays * width,))
        grad_rgb = ws.get("grad_rgb", (state.n_rays * width * 3,))
        launch("composite_backward", composite_backward_kernel, state.rgb, state.t_all, state.deltas,
               state.background, state.weights, state.per_ray, grad_per_ray, grad_weights, 1, grad_sigma,
               grad_rgb, grad_bg, width)  # fmt: skip
        self._evaluation_grads(state)
        if state.fine is not None:
            launch("split_grads", split_grads_kernel, state.order, grad_sigma, grad_rgb,
                   self.render_config.n_coarse, state.coarse.grad_sigma, state.coarse.grad_rgb,
                   state.fine.grad_sigma, state.fine.grad_rgb)  # fmt: skip
        else:
            launch("layout", flat_to_rows_kernel, grad_sigma, state.coarse.grad_sigma)
            launch("layout", flat_to_rows_kernel, grad_rgb, state.coarse.grad_rgb)

    def _composite_backward_packed(self, state: PackedRendered, grad_per_ray, grad_weights, grad_bg) -> None:
        """Packed compositing backward (early stop as the forward), its gradients back to the packed
        coarse and fine evaluations (padding rows get zeros, so they add nothing to any gradient)."""
        ws, cap = self.ws, state.t.shape[0]
        grad_weights_packed = ws.get("m.grad_weights", (cap,))
        launch("dense_to_packed", dense_to_packed_kernel, grad_weights, state.slot, grad_weights_packed)
        grad_sigma, grad_rgb = ws.get("m.grad_sigma", (cap,)), ws.get("m.grad_rgb", (cap * 3,))
        launch("composite_packed_backward", packed_backward_kernel, state.rgb, state.t, state.deltas,
               state.offsets, state.kept, state.background, state.packed_weights, state.per_ray, grad_per_ray,
               grad_weights_packed, 1, grad_sigma, grad_rgb, grad_bg)  # fmt: skip
        self._evaluation_grads(state)
        if state.fine is not None:
            launch("split_grads", split_packed_grads_kernel, state.source, state.slot, grad_sigma, grad_rgb,
                   state.coarse.grad_sigma, state.coarse.grad_rgb, state.fine.grad_sigma,
                   state.fine.grad_rgb)  # fmt: skip
        else:  # the merged list is the coarse one, row for row
            launch("layout", flat_to_rows_kernel, grad_sigma, state.coarse.grad_sigma)
            launch("layout", flat_to_rows_kernel, grad_rgb, state.coarse.grad_rgb)
