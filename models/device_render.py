"""Rendering on the Taichi device: ray batches and whole images on ``ti.ndarray``s, for a Vulkan or Metal GPU.

On such a machine torch runs on the CPU and every Taichi launch that takes a torch tensor copies it to
the device and back (docs/TAICHI.md, Torch interop): rendering one image through ``render_image``
with the Taichi field moves every sample's activations across at every launch. ``DeviceRenderer``
keeps all of it in ndarrays instead: the network parameters go to the device once (again only when
torch changed them), and per chunk of rays only the pixel indices go in and (colour, opacity, depth)
come out (``transfers`` counts both).

    renderer = DeviceRenderer(field, background, RenderConfig.cpu())   # field: a TaichiField
    image = renderer.render_image(latent, K, world_to_camera, 64, 64)  # as models.render_image

Its forward pass is ``models.device_forward.DeviceForward`` (shared with the device-resident training
step), or through an occupancy grid ``models.device_skip.DeviceSkipForward``. With ``generator=None``
the samples sit at bin centres, as in ``render_rays``, so an image is the one ``render_image`` renders.
"""

from __future__ import annotations

import numpy as np
import torch

from models.background import ConstantBackground
from models.device_forward import DeviceForward
from models.device_skip import DeviceGrid, DeviceSkipForward
from models.render import RenderConfig, pixel_grid, render_image
from models.taichi_background import TaichiBackground
from models.taichi_field import TaichiField
from renderer.backend import launch, runtime_generation, started_arch
from renderer.composite import PER_RAY
from renderer.device import TransferLog, Workspace, fill_rows_kernel
from renderer.specs import COLOR, DEPTH, OPACITY


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
