"""The forward pass on the Taichi device: a ray batch rendered on ``ti.ndarray``s, for a Vulkan or Metal GPU.

``DeviceForward`` is the forward pass that device-resident rendering (``models.device_render``) and the
device-resident training step (``models.device_step``) run, kernel for kernel what
``models.render.render_rays`` does: stratified samples, the coarse field, coarse compositing, importance
samples from its weights and their merge, the fine field, the background and compositing. With
``generator=None`` the samples sit at bin centres, as in ``render_rays``, so an image is the one
``render_image`` renders. ``models.device_skip`` builds the same pass through an occupancy grid on it.

    forward = DeviceForward(ws, field, background, RenderConfig.cpu(), field_values, bg_values, bg_color)
    rendered = forward.forward(pixels, K, world_to_camera, codes, n_rays, generator)   # -> Rendered
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple

import taichi as ti
import torch

from models.background import ConstantBackground
from models.render import RenderConfig
from models.taichi_background import TaichiBackground, background_forward
from models.taichi_field import FieldActivations, TaichiField, field_forward
from renderer.backend import launch
from renderer.composite import PER_RAY, composite_forward_kernel
from renderer.device import (
    Workspace,
    fill_rows_kernel,
    flat_to_rows_kernel,
    merge_outputs_kernel,
    ray_points_kernel,
    rows_to_flat_kernel,
)
from renderer.rays import rays_kernel
from renderer.sampling import deltas_kernel, importance_merge_kernel, stratified_kernel
from renderer.specs import draw_key, mix_key

Ndarray = ti.lang._ndarray.Ndarray


@dataclass
class Evaluation:
    """One evaluation of the field (coarse or fine samples): its activations and, after the compositing
    backward, the gradients of its outputs."""

    prefix: str  # workspace names of its buffers start with it
    rows: int  # R * samples per ray
    per_ray: int  # samples per ray
    acts: FieldActivations
    codes: Ndarray  # (R, L): each ray's latent code, read by its samples
    grad_sigma: Ndarray | None = None
    grad_rgb: Ndarray | None = None


class Rendered(NamedTuple):
    """What the forward pass leaves for the loss and the backward pass."""

    n_rays: int
    width: int  # samples per ray after the merge
    coarse: Evaluation
    fine: Evaluation | None
    order: Ndarray | None  # flat (R * width): slot -> coarse index, or n_coarse + fine
    rgb: Ndarray  # flat merged per-sample colours
    t_all: Ndarray
    deltas: Ndarray
    background: Ndarray  # (R, 3)
    bg: tuple | None  # the background network's (activations, codes), None for a constant colour
    weights: Ndarray
    per_ray: Ndarray  # (R, PER_RAY) composited values (slots in renderer.specs)


def _sample_key(generator: torch.Generator | None) -> tuple[int, int]:
    """(mixed key, use_jitter) for one sampling call: a fresh key from the generator, or bin centres."""
    return (0, 0) if generator is None else (mix_key(draw_key(generator)), 1)


class DeviceForward:
    """The forward pass on ndarrays (module docstring). ``field_values`` and ``bg_values`` are the
    device copies of ``field.parameter_list()`` and ``background.parameter_list()`` (empty for a
    constant background, whose colour is ``bg_color`` (3,)); ``phase(name)`` gives a timing context."""

    def __init__(self, ws: Workspace, field: TaichiField, background: torch.nn.Module,
                 render_config: RenderConfig,
                 field_values: list[Ndarray], bg_values: list[Ndarray], bg_color: Ndarray | None,
                 phase: Callable[[str], contextlib.AbstractContextManager] | None = None):  # fmt: skip
        if not isinstance(field, TaichiField):
            raise ValueError("rendering on the Taichi device needs the Taichi field "
                             "(--field-backend taichi).")
        if not isinstance(background, TaichiBackground | ConstantBackground):
            raise ValueError("rendering on the Taichi device needs a Taichi background network or a "
                             "constant one.")
        self.ws, self.field, self.background, self.render_config = ws, field, background, render_config
        self.field_values, self.bg_values, self.bg_color = field_values, bg_values, bg_color
        self.phase = phase or (lambda name: contextlib.nullcontext())

    def _buffers(self, prefix: str) -> Callable[[str, tuple[int, ...]], Ndarray]:
        return lambda name, shape: self.ws.get(prefix + name, shape)

    def evaluate(self, prefix: str, origins, directions, t_rows, codes, n_rays: int,
                 n_samples: int) -> Evaluation:
        """The field at ``n_samples`` depths (R, S) per ray, each sample reading its ray's code (R, L)."""
        rows = n_rays * n_samples
        points = self.ws.get(prefix + "points", (rows, 3))
        launch("ray_points", ray_points_kernel, origins, directions, t_rows, points)
        with self.phase("field forward"):
            acts = field_forward(self.field_values, points, codes, self.field.spec(), self._buffers(prefix),
                                 repeat=n_samples)  # fmt: skip
        return Evaluation(prefix, rows, n_samples, acts, codes)

    def rays(self, pixels: Ndarray, K: Ndarray, world_to_camera: Ndarray,
             n_rays: int) -> tuple[Ndarray, Ndarray, Ndarray, Ndarray]:  # fmt: skip
        """The pixels' rays, as ``renderer.generate_rays``: origins, directions (R, 3), near, far (R,)."""
        ws = self.ws
        origins, directions = ws.get("origins", (n_rays, 3)), ws.get("directions", (n_rays, 3))
        near, far = ws.get("near", (n_rays,)), ws.get("far", (n_rays,))
        launch("generate_rays", rays_kernel, pixels, K, world_to_camera, float(self.render_config.radius),
               origins, directions, near, far)  # fmt: skip
        return origins, directions, near, far

    def importance(self, t_coarse: Ndarray, weights: Ndarray, near: Ndarray, far: Ndarray,
                   generator: torch.Generator | None) -> tuple[Ndarray, Ndarray, Ndarray, Ndarray]:
        """Importance samples from the coarse weights and their merge with the coarse depths, as
        ``renderer.sample_importance_and_merge``: t_coarse, weights (R, S) -> t_fine (R, F), and flat
        (R * (S + F)) t_all, order (i64: merged slot -> coarse bin, or S + fine index), deltas."""
        n_rays, width = t_coarse.shape[0], self.render_config.n_coarse + self.render_config.n_fine
        t_fine = self.ws.get("t_fine", (n_rays, self.render_config.n_fine))
        t_all, deltas = self.ws.get("t_all", (n_rays * width,)), self.ws.get("deltas", (n_rays * width,))
        order = self.ws.get("order", (n_rays * width,), ti.i64)
        launch("sample_importance_and_merge", importance_merge_kernel, t_coarse, weights, near, far,
               *_sample_key(generator), t_fine, t_all, order, deltas)  # fmt: skip
        return t_fine, t_all, order, deltas

    def forward(self, pixels: Ndarray, K: Ndarray, world_to_camera: Ndarray, codes: Ndarray, n_rays: int,
                generator: torch.Generator | None) -> Rendered:  # fmt: skip
        """Rays -> coarse samples -> field -> importance samples -> field -> background -> compositing.

        pixels (R, 2), K (1 | R, 3, 3), world_to_camera (1 | R, 3, 4), codes (R, L); ``generator`` draws
        the stratified and then the importance key as ``render_rays`` does (None: bin centres).
        """
        ws, cfg = self.ws, self.render_config
        n_coarse, n_fine = cfg.n_coarse, cfg.n_fine
        width = n_coarse + n_fine
        origins, directions, near, far = self.rays(pixels, K, world_to_camera, n_rays)
        t_coarse = ws.get("t_coarse", (n_rays * n_coarse,))
        launch("sample_stratified", stratified_kernel, near, far, *_sample_key(generator), t_coarse, n_coarse)
        t_coarse_rows = ws.get("t_coarse_rows", (n_rays, n_coarse))
        launch("layout", flat_to_rows_kernel, t_coarse, t_coarse_rows)
        coarse = self.evaluate("c.", origins, directions, t_coarse_rows, codes, n_rays, n_coarse)
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
            weights_rows = ws.get("c.weights_rows", (n_rays, n_coarse))
            launch("layout", flat_to_rows_kernel, weights_c, weights_rows)
            t_fine, t_all, order, deltas = self.importance(t_coarse_rows, weights_rows, near, far, generator)
            fine = self.evaluate("f.", origins, directions, t_fine, codes, n_rays, n_fine)
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
        return Rendered(n_rays, width, coarse, fine, order, rgb, t_all, deltas, background, bg, weights,
                        per_ray)

    def _background(self, directions, codes, n_rays: int) -> tuple:
        """(R, 3) background colours, and the network's (activations, codes) or None for a constant."""
        background = self.ws.get("background", (n_rays, 3))
        if not self.bg_values:
            launch("fill_background", fill_rows_kernel, self.bg_color, background)
            return background, None
        cfg = self.background.cfg
        acts = background_forward(self.bg_values, directions, codes, cfg.n_frequencies, cfg.include_input,
                                  self._buffers("bg."))  # fmt: skip
        return acts.rgb, (acts, codes)
