"""A training step that stays on the Taichi device: for a Vulkan or Metal GPU that torch cannot use.

On such a machine torch runs on the CPU, and every Taichi launch that takes a torch tensor copies it
to the device and back (docs/TAICHI.md, Torch interop). This step keeps everything in ``ti.ndarray``s
from kernel to kernel: rays, samples, field inputs, activations and outputs, compositing weights, every
gradient, the network parameters, the latent table and the optimisers' moments. Per step only the
batch goes in (pixels, cameras, colours, masks, identity rows: 116 bytes a ray) and the three loss sums
come out (12 bytes); ``transfers`` counts both.

    step = DeviceTrainStep(field, background, latents, optimizers, RenderConfig.cpu(), LossConfig())
    terms = step.run(batch, generator)        # {"rgb", "mask", "hard", "total"} or None (not finite)
    step.to_torch()                           # parameters, table and optimiser state back into torch

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
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import taichi as ti
import torch

from models.background import ConstantBackground
from models.device_losses import loss_grads_kernel, loss_scales, loss_sums_kernel, loss_terms
from models.losses import LossConfig
from models.render import RenderConfig
from models.taichi_background import TaichiBackground, background_backward, background_forward
from models.taichi_field import FieldActivations, TaichiField, field_backward, field_forward
from renderer.backend import launch
from renderer.composite import PER_RAY, composite_backward_kernel, composite_forward_kernel
from renderer.device import (
    TransferLog,
    Workspace,
    fill_rows_kernel,
    flat_to_rows_kernel,
    gather_rows_kernel,
    merge_outputs_kernel,
    ray_points_kernel,
    rows_to_flat_kernel,
    scatter_add_rows_kernel,
    split_grads_kernel,
)
from renderer.optimizers import adam_update, sgd_update
from renderer.rays import rays_kernel
from renderer.sampling import deltas_kernel, inverse_cdf_kernel, merge_binned_kernel, stratified_kernel
from renderer.specs import draw_key, mix_key


@dataclass
class _Evaluation:
    """One evaluation of the field (coarse or fine samples): its activations and, after the compositing
    backward, the gradients of its outputs."""

    prefix: str  # workspace names of its buffers start with it
    rows: int  # R * samples per ray
    per_ray: int  # samples per ray
    acts: FieldActivations
    codes: ti.lang._ndarray.Ndarray  # (R, L): each ray's latent code, read by its samples
    grad_sigma: ti.lang._ndarray.Ndarray | None = None
    grad_rgb: ti.lang._ndarray.Ndarray | None = None


class _Rendered(NamedTuple):
    """What the forward pass leaves for the loss and the backward pass."""

    n_rays: int
    width: int  # samples per ray after the merge
    coarse: _Evaluation
    fine: _Evaluation | None
    order: ti.lang._ndarray.Ndarray | None  # flat (R * width): slot -> coarse index, or n_coarse + fine
    rgb: ti.lang._ndarray.Ndarray  # flat merged per-sample colours
    t_all: ti.lang._ndarray.Ndarray
    deltas: ti.lang._ndarray.Ndarray
    background: ti.lang._ndarray.Ndarray  # (R, 3)
    bg: tuple | None  # the background network's (activations, codes), None for a constant colour
    weights: ti.lang._ndarray.Ndarray
    per_ray: ti.lang._ndarray.Ndarray  # (R, 6) composited values


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
    Adam or SGD over the table}. ``timer`` (a ``models.step_timing.PhaseTimer``) may be swapped in to
    time the phases.
    """

    def __init__(
        self,
        field: TaichiField,
        background: torch.nn.Module,
        latents: torch.nn.Module,
        optimizers: dict[str, torch.optim.Optimizer],
        render_config: RenderConfig,
        loss_config: LossConfig,
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
        self.from_torch()

    # ----- state -------------------------------------------------------------------------------------
    def from_torch(self) -> None:
        """Read parameters, table and optimiser state from the torch modules (start, resume)."""
        self.networks.from_torch()
        self.table.from_torch()
        if isinstance(self.background, ConstantBackground):
            self._bg_color = self.ws.get("bg_color", (3,))
            self._bg_color.from_numpy(self.background.color.detach().cpu().float().numpy())

    def to_torch(self) -> None:
        """Write parameters, table and optimiser state into the torch modules (checkpoints, previews)."""
        self.networks.to_torch()
        self.table.to_torch()

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

    def _evaluate(self, prefix: str, origins, directions, t_rows, codes, n_rays: int,
                  n_samples: int) -> _Evaluation:
        """The field at ``n_samples`` depths (R, S) per ray, each sample reading its ray's code (R, L)."""
        rows = n_rays * n_samples
        points = self.ws.get(prefix + "points", (rows, 3))
        launch("ray_points", ray_points_kernel, origins, directions, t_rows, points)
        values = [p.value for p in self.field_params]
        with self._phase("field forward"):
            acts = field_forward(values, points, codes, self.field.spec(), self._buffers(prefix),
                                 repeat=n_samples)
        return _Evaluation(prefix, rows, n_samples, acts, codes)

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
            self.networks.step()
            self.table.step()
        return terms

    def _forward(self, inputs: dict, generator: torch.Generator) -> _Rendered:
        """Rays -> coarse samples -> field -> importance samples -> field -> background -> compositing."""
        ws, cfg = self.ws, self.render_config
        n_rays, identity = inputs["n_rays"], inputs["identity"]
        n_coarse, n_fine = cfg.n_coarse, cfg.n_fine
        width = n_coarse + n_fine
        origins, directions = ws.get("origins", (n_rays, 3)), ws.get("directions", (n_rays, 3))
        near, far = ws.get("near", (n_rays,)), ws.get("far", (n_rays,))
        launch("generate_rays", rays_kernel, inputs["pixels"], inputs["K"], inputs["w2c"], float(cfg.radius),
               origins, directions, near, far)  # fmt: skip
        t_coarse = ws.get("t_coarse", (n_rays * n_coarse,))
        launch("sample_stratified", stratified_kernel, near, far, mix_key(draw_key(generator)), 1, t_coarse,
               n_coarse)  # fmt: skip
        t_coarse_rows = ws.get("t_coarse_rows", (n_rays, n_coarse))
        launch("layout", flat_to_rows_kernel, t_coarse, t_coarse_rows)
        codes = ws.get("codes", (n_rays, self.field.latent_dim))
        launch("gather_codes", gather_rows_kernel, self.table.params[0].value, identity, 1, codes)
        coarse = self._evaluate("c.", origins, directions, t_coarse_rows, codes, n_rays, n_coarse)
        sigma, rgb = ws.get("sigma", (n_rays * width,)), ws.get("rgb", (n_rays * width * 3,))
        fine = order = None
        if n_fine > 0:
            # The coarse weights (no gradient) place the importance samples, as render_rays does.
            sigma_c = ws.get("c.sigma_flat", (n_rays * n_coarse,))
            rgb_c = ws.get("c.rgb_flat", (n_rays * n_coarse * 3,))
            launch("layout", rows_to_flat_kernel, coarse.acts.sigma, sigma_c)
            launch("layout", rows_to_flat_kernel, coarse.acts.rgb, rgb_c)
            deltas_c = ws.get("c.deltas", (n_rays * n_coarse,))
            launch("sample_deltas", deltas_kernel, t_coarse, far, deltas_c, n_coarse)
            weights_c = ws.get("c.weights", (n_rays * n_coarse,))
            launch("composite_forward", composite_forward_kernel, sigma_c, rgb_c, t_coarse, deltas_c,
                   ws.zeros("c.background", (n_rays, 3)), weights_c, ws.get("c.per_ray", (n_rays, PER_RAY)),
                   n_coarse)  # fmt: skip
            weights_c_rows = ws.get("c.weights_rows", (n_rays, n_coarse))
            launch("layout", flat_to_rows_kernel, weights_c, weights_c_rows)
            t_fine = ws.get("t_fine", (n_rays, n_fine))
            bins = ws.get("bins", (n_rays, n_fine), ti.i32)
            launch("sample_importance", inverse_cdf_kernel, t_coarse_rows, weights_c_rows, near, far,
                   mix_key(draw_key(generator)), 1, t_fine, bins)  # fmt: skip
            t_all, deltas = ws.get("t_all", (n_rays * width,)), ws.get("deltas", (n_rays * width,))
            order = ws.get("order", (n_rays * width,), ti.i64)
            launch("sample_importance_and_merge", merge_binned_kernel, t_coarse_rows, t_fine, bins, far,
                   t_all, order, deltas)  # fmt: skip
            fine = self._evaluate("f.", origins, directions, t_fine, codes, n_rays, n_fine)
            launch("merge_outputs", merge_outputs_kernel, order, coarse.acts.sigma, coarse.acts.rgb,
                   fine.acts.sigma, fine.acts.rgb, n_coarse, sigma, rgb)  # fmt: skip
        else:
            launch("layout", rows_to_flat_kernel, coarse.acts.sigma, sigma)
            launch("layout", rows_to_flat_kernel, coarse.acts.rgb, rgb)
            t_all, deltas = t_coarse, ws.get("deltas", (n_rays * width,))
            launch("sample_deltas", deltas_kernel, t_coarse, far, deltas, n_coarse)
        background, bg = self._background(directions, codes, n_rays)
        weights, per_ray = ws.get("weights", (n_rays * width,)), ws.get("per_ray", (n_rays, PER_RAY))
        launch("composite_forward", composite_forward_kernel, sigma, rgb, t_all, deltas, background, weights,
               per_ray, width)  # fmt: skip
        return _Rendered(n_rays, width, coarse, fine, order, rgb, t_all, deltas, background, bg, weights,
                         per_ray)

    def _background(self, directions, codes, n_rays: int) -> tuple:
        """(R, 3) background colours, and the network's (activations, codes) or None for a constant."""
        background = self.ws.get("background", (n_rays, 3))
        if not self.bg_params:
            launch("fill_background", fill_rows_kernel, self._bg_color, background)
            return background, None
        cfg = self.background.cfg
        acts = background_forward([p.value for p in self.bg_params], directions, codes, cfg.n_frequencies,
                                  cfg.include_input, self._buffers("bg."))  # fmt: skip
        return acts.rgb, (acts, codes)

    def _backward(self, inputs: dict, state: _Rendered) -> None:
        """Loss -> compositing -> (coarse, fine) field and background -> parameter and table gradients."""
        ws = self.ws
        n_rays, width, identity = state.n_rays, state.width, inputs["identity"]
        n_coarse = self.render_config.n_coarse
        grad_per_ray = ws.get("grad_per_ray", (n_rays, 5))
        grad_weights = ws.get("grad_weights", (n_rays * width,))
        launch("loss_grads", loss_grads_kernel, state.per_ray, state.weights, inputs["rgb"], inputs["mask"],
               int(inputs["has_mask"]), *loss_scales(n_rays, width, inputs["has_mask"], self.loss_config),
               grad_per_ray, grad_weights)  # fmt: skip
        grad_sigma = ws.get("grad_sigma", (n_rays * width,))
        grad_rgb = ws.get("grad_rgb", (n_rays * width * 3,))
        grad_bg = ws.get("grad_background", (n_rays, 3))
        launch("composite_backward", composite_backward_kernel, state.rgb, state.t_all, state.deltas,
               state.background, state.weights, state.per_ray, grad_per_ray, grad_weights, 1, grad_sigma,
               grad_rgb, grad_bg, width)  # fmt: skip
        passes = [state.coarse] + ([state.fine] if state.fine is not None else [])
        for evaluation in passes:
            evaluation.grad_sigma = ws.get(evaluation.prefix + "grad_sigma", (evaluation.rows, 1))
            evaluation.grad_rgb = ws.get(evaluation.prefix + "grad_rgb", (evaluation.rows, 3))
        if state.fine is not None:
            launch("split_grads", split_grads_kernel, state.order, grad_sigma, grad_rgb, n_coarse,
                   state.coarse.grad_sigma, state.coarse.grad_rgb, state.fine.grad_sigma,
                   state.fine.grad_rgb)  # fmt: skip
        else:
            launch("layout", flat_to_rows_kernel, grad_sigma, state.coarse.grad_sigma)
            launch("layout", flat_to_rows_kernel, grad_rgb, state.coarse.grad_rgb)
        self.networks.zero_grad()
        self.table.zero_grad()
        table_grad = self.table.params[0].grad
        values, grads = [p.value for p in self.field_params], [p.grad for p in self.field_params]
        for evaluation in passes:
            grad_codes = ws.get(evaluation.prefix + "grad_codes", (n_rays, self.field.latent_dim))
            with self._phase("field backward"):
                field_backward(values, evaluation.acts, evaluation.codes, evaluation.grad_sigma,
                               evaluation.grad_rgb, self.field.spec(), self._buffers(evaluation.prefix),
                               grads=grads, grad_latents=grad_codes, repeat=evaluation.per_ray)  # fmt: skip
            launch("scatter_codes", scatter_add_rows_kernel, grad_codes, identity, 1, table_grad)
        if state.bg is not None:
            acts, codes = state.bg
            grad_codes = ws.get("bg.grad_codes", (n_rays, self.field.latent_dim))
            background_backward([p.value for p in self.bg_params], acts, codes, grad_bg, self._buffers("bg."),
                                grads=[p.grad for p in self.bg_params], grad_latents=grad_codes)  # fmt: skip
            launch("scatter_codes", scatter_add_rows_kernel, grad_codes, identity, 1, table_grad)
