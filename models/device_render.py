"""Rendering on the Taichi device: ray batches and whole images on ``ti.ndarray``s, for a Vulkan or Metal GPU.

On such a machine torch runs on the CPU and every Taichi launch that takes a torch tensor copies it to
the device and back (docs/TAICHI.md, Torch interop): rendering one image through ``render_image``
with the Taichi field moves every sample's activations across at every launch. ``DeviceRenderer``
keeps all of it in ndarrays instead: the network parameters go to the device once (again only when
torch changed them), and per chunk of rays only the pixel indices go in and (colour, opacity, depth)
come out (``transfers`` counts both).

    renderer = DeviceRenderer(field, background, RenderConfig.cpu())   # field: a TaichiField
    image = renderer.render_image(latent, K, world_to_camera, 64, 64)  # as models.render_image

``DeviceForward`` is the forward pass both this and the device-resident training step
(``models.device_step``) run, kernel for kernel what ``models.render.render_rays`` does: stratified
samples, the coarse field, coarse compositing, importance samples from its weights and their merge,
the fine field, the background and compositing. With ``generator=None`` the samples sit at bin
centres, as in ``render_rays``, so an image is the one ``render_image`` renders.
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
from models.render import RenderConfig, pixel_grid, render_image
from models.taichi_background import TaichiBackground, background_forward
from models.taichi_field import FieldActivations, TaichiField, field_forward
from renderer.backend import launch, runtime_generation, started_arch
from renderer.composite import PER_RAY, composite_forward_kernel
from renderer.device import (
    TransferLog,
    Workspace,
    fill_rows_kernel,
    flat_to_rows_kernel,
    merge_outputs_kernel,
    ray_points_kernel,
    rows_to_flat_kernel,
)
from renderer.rays import rays_kernel
from renderer.sampling import deltas_kernel, importance_merge_kernel, stratified_kernel
from renderer.specs import COLOR, DEPTH, OPACITY, draw_key, mix_key

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

    def forward(self, pixels: Ndarray, K: Ndarray, world_to_camera: Ndarray, codes: Ndarray, n_rays: int,
                generator: torch.Generator | None) -> Rendered:  # fmt: skip
        """Rays -> coarse samples -> field -> importance samples -> field -> background -> compositing.

        pixels (R, 2), K (1 | R, 3, 3), world_to_camera (1 | R, 3, 4), codes (R, L); ``generator`` draws
        the stratified and then the importance key as ``render_rays`` does (None: bin centres).
        """
        ws, cfg = self.ws, self.render_config
        n_coarse, n_fine = cfg.n_coarse, cfg.n_fine
        width = n_coarse + n_fine
        origins, directions = ws.get("origins", (n_rays, 3)), ws.get("directions", (n_rays, 3))
        near, far = ws.get("near", (n_rays,)), ws.get("far", (n_rays,))
        launch("generate_rays", rays_kernel, pixels, K, world_to_camera, float(cfg.radius), origins,
               directions, near, far)  # fmt: skip
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
            weights_c_rows = ws.get("c.weights_rows", (n_rays, n_coarse))
            launch("layout", flat_to_rows_kernel, weights_c, weights_c_rows)
            t_fine = ws.get("t_fine", (n_rays, n_fine))
            t_all, deltas = ws.get("t_all", (n_rays * width,)), ws.get("deltas", (n_rays * width,))
            order = ws.get("order", (n_rays * width,), ti.i64)
            launch("sample_importance_and_merge", importance_merge_kernel, t_coarse_rows, weights_c_rows,
                   near, far, *_sample_key(generator), t_fine, t_all, order, deltas)  # fmt: skip
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


def _versions(params: list[torch.nn.Parameter]) -> tuple[int, ...]:
    """Each parameter's in-place version counter: changes whenever torch writes into it."""
    return tuple(p._version for p in params)


class DeviceRenderer:
    """``models.render_image`` on the Taichi device (module docstring). The parameters are uploaded when
    it is made and again whenever torch has written into them since (an optimiser step, a loaded state
    dict), so one renderer serves a whole evaluation or a training run's previews. With ``occupancy``
    (a ``models.skip_empty.ClassOccupancy``) it renders through the grid with packed samples
    (``models.device_skip``), as ``render_image(..., occupancy=...)`` does; the grid's occupancy is
    uploaded with each image (one byte a cell)."""

    def __init__(self, field: TaichiField, background: torch.nn.Module, render_config: RenderConfig,
                 occupancy=None):  # fmt: skip
        self.ws = Workspace()
        self.generation = runtime_generation()  # a restarted Taichi runtime invalidates every buffer
        self.transfers = TransferLog()
        self.field, self.background, self.render_config = field, background, render_config
        self.occupancy = occupancy
        field_params = field.parameter_list()
        bg_params = background.parameter_list() if isinstance(background, TaichiBackground) else []
        self._params = field_params + bg_params
        self._values = [self.ws.get(f"param{i}", tuple(p.shape)) for i, p in enumerate(self._params)]
        bg_color = None if bg_params else self.ws.get("bg_color", (3,))
        values = (self._values[:len(field_params)], self._values[len(field_params):], bg_color)
        if occupancy is None:
            self.forward_pass = DeviceForward(self.ws, field, background, render_config, *values)
        else:
            from models.device_skip import DeviceGrid, DeviceSkipForward  # it builds on DeviceForward

            self.grid = DeviceGrid(self.ws, occupancy, self.transfers)
            self.forward_pass = DeviceSkipForward(self.ws, field, background, render_config, *values,
                                                  grid=self.grid)  # fmt: skip
        self._uploaded: tuple[int, ...] | None = None

    def sync_parameters(self) -> None:
        """Upload the parameters (and a constant background's colour) if torch changed them."""
        constant = not self.forward_pass.bg_values
        versions = _versions(self._params) + ((self.background.color._version,) if constant else ())
        if versions == self._uploaded:
            return
        with torch.no_grad():
            for value, param in zip(self._values, self._params, strict=True):
                value.from_numpy(param.detach().cpu().float().numpy())
            if constant:
                self.forward_pass.bg_color.from_numpy(self.background.color.detach().cpu().float().numpy())
        self.transfers.uploaded += sum(p.numel() * 4 for p in self._params) + (12 if constant else 0)
        self._uploaded = versions

    def render_image(self, latent: torch.Tensor, K: torch.Tensor, world_to_camera: torch.Tensor, height: int,
                     width: int, chunk: int = 8192) -> dict[str, torch.Tensor]:  # fmt: skip
        """As ``models.render_image``: latent (L,), K (3, 3), world_to_camera (3, 4) ->
        {"color": (H, W, 3), "opacity": (H, W), "depth": (H, W)} as CPU tensors, deterministic samples."""
        if self.generation != runtime_generation():  # Taichi restarted: every buffer here is gone
            self.__init__(self.field, self.background, self.render_config, self.occupancy)
        self.sync_parameters()
        if self.occupancy is not None:
            self.grid.upload()
        up, ws = self.transfers, self.ws
        K_dev = up.upload(ws, "in.K", K.detach().cpu().float().numpy().reshape(1, 3, 3))
        w2c_dev = up.upload(ws, "in.w2c", world_to_camera.detach().cpu().float().numpy().reshape(1, 3, 4))
        code = up.upload(ws, "in.latent", latent.detach().cpu().float().numpy().reshape(-1))
        pixels = pixel_grid(height, width).numpy()
        n_pixels = pixels.shape[0]
        # Every chunk has the same size (the last one padded with copies of the last pixel), so the
        # workspace keeps one set of buffers instead of reallocating them for a shorter last chunk; the
        # chunks are balanced, so the padding is under one ray per chunk.
        n_chunks = -(-n_pixels // max(1, int(chunk)))
        chunk = -(-n_pixels // n_chunks)
        padded = n_chunks * chunk
        pixels = np.concatenate([pixels, np.repeat(pixels[-1:], padded - n_pixels, axis=0)])
        codes = ws.get("codes", (chunk, code.shape[0]))
        launch("fill_codes", fill_rows_kernel, code, codes)
        shared = None
        if self.occupancy is not None:  # every packed sample reads this one row (no per-sample copy)
            shared = up.upload(ws, "in.latent_row", latent.detach().cpu().float().numpy().reshape(1, -1))
        per_ray = np.empty((padded, PER_RAY), np.float32)
        for start in range(0, padded, chunk):
            rows = up.upload(ws, "in.pixels", pixels[start:start + chunk])
            if shared is None:
                rendered = self.forward_pass.forward(rows, K_dev, w2c_dev, codes, chunk, generator=None)
            else:
                rendered = self.forward_pass.forward_packed(rows, K_dev, w2c_dev, codes, chunk, None,
                                                            shared_code=shared)  # fmt: skip
            per_ray[start:start + chunk] = up.download(rendered.per_ray)
        per_ray = per_ray[:n_pixels]
        per_ray = torch.from_numpy(per_ray)
        return {"color": per_ray[:, COLOR:COLOR + 3].reshape(height, width, 3),
                "opacity": per_ray[:, OPACITY].reshape(height, width),
                "depth": per_ray[:, DEPTH].reshape(height, width)}


# The renderer used last: one evaluation or training run renders one model over and over, and holding
# only one keeps one workspace of device buffers alive, not one per model ever rendered.
_LAST: list[DeviceRenderer] = []


def device_renderer(field: TaichiField, background: torch.nn.Module, render_config: RenderConfig,
                    occupancy=None) -> DeviceRenderer:  # fmt: skip
    """The ``DeviceRenderer`` of this field, background, configuration and grid: the last one made when
    it is for the same objects (and the Taichi runtime has not restarted since), else a new one."""
    made = _LAST[0] if _LAST else None
    if (made is None or made.field is not field or made.background is not background
            or made.render_config != render_config or made.occupancy is not occupancy
            or made.generation != runtime_generation()):
        _LAST[:] = [made := DeviceRenderer(field, background, render_config, occupancy)]
    return made


def renders_on_device(field: torch.nn.Module, background: torch.nn.Module) -> bool:
    """Whether ``render_image_on_device`` keeps the work on the Taichi device: the Taichi field and a
    Taichi or constant background, on Vulkan or Metal (where torch tensors would be copied per launch;
    on x64 and CUDA the kernels read torch tensors in place and nothing is gained)."""
    return (isinstance(field, TaichiField) and isinstance(background, TaichiBackground | ConstantBackground)
            and started_arch() in ("vulkan", "metal"))


def render_image_on_device(field: torch.nn.Module, background: torch.nn.Module, latent: torch.Tensor,
                           K: torch.Tensor, world_to_camera: torch.Tensor, height: int, width: int,
                           render_config: RenderConfig, chunk: int = 8192,
                           occupancy=None) -> dict[str, torch.Tensor]:  # fmt: skip
    """``models.render_image``, through ``DeviceRenderer`` where ``renders_on_device`` says so (same
    shapes, the same image; on the latent's device), else ``models.render_image`` itself; with an
    ``occupancy`` grid (skipping empty space, ``models.skip_empty``) either way."""
    if not renders_on_device(field, background):
        return render_image(field, background, latent, K, world_to_camera, height, width, render_config,
                            chunk=chunk, occupancy=occupancy)  # fmt: skip
    renderer = device_renderer(field, background, render_config, occupancy)
    out = renderer.render_image(latent, K, world_to_camera, height, width, chunk=chunk)
    return {key: value.to(latent.device) for key, value in out.items()}
