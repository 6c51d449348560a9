"""A trained model at inference time: load it frozen, read its training settings, render views and paths,
mesh a latent. fit.py, render.py and evaluate.py share these so they render exactly the same way.

    model = load_model("runs/x/checkpoints/best.pt")
    view = render_view(model, model.latents.mean(), K, w2c, 128, 128)   # numpy color/opacity/depth
    mesh = latent_mesh(model, z, resolution=128)
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from common.conventions import CAMERA_DISTANCE
from export.mesh import Mesh, density_grid, extract_mesh, vertex_colors
from models.background import ConstantBackground
from models.checkpoint import LoadedCheckpoint, load_checkpoint
from models.device_render import render_image_on_device

DEFAULT_MESH_LEVEL = 10.0


def start_renderer(arch: str = "cpu", device: str = "auto", verbose: bool = False):
    """Start the Taichi renderer on ``arch`` ("auto" | "cpu" | "vulkan" | "cuda" | "metal") with the torch
    ``device`` for the model ("auto" | "cuda" | "mps" | "xpu" | "cpu", as ``train.py --device``); returns
    the ``renderer.backend.Backend`` (``.arch``, ``.device``).

    The CLIs default to "cpu" (x64) so results do not depend on which drivers a machine happens to have;
    ``device="auto"`` pairs CUDA tensors with ``arch="cuda"`` and CPU tensors with the other arches.

    >>> start_renderer("cpu").device   # doctest: +SKIP
    device(type='cpu')
    """
    from renderer.backend import Backend, init_backend, started_arch

    if arch != "auto" and started_arch() == arch and device in ("auto", "cpu" if arch != "cuda" else "cuda"):
        # Already there: restarting would only throw away compiled kernels.
        return Backend(arch=arch, device=torch.device("cuda" if arch == "cuda" else "cpu"),
                       reason="already running")
    return init_backend(arch=arch, device=device, verbose=verbose)


def model_device(model: LoadedCheckpoint) -> torch.device:
    """The torch device the model's weights are on (its latent table's)."""
    return model.latents.codes.device


def use_field_backend(model: LoadedCheckpoint, requested: str, backend) -> str:
    """Move ``model`` to ``backend.device`` and evaluate its field with torch or Taichi kernels
    (``models.field_backend``: "auto" | "torch" | "taichi" on ``backend.arch``); swaps ``model.field``
    (and a background network) in place and returns why.

    >>> print(use_field_backend(model, "auto", start_renderer("cpu")))   # doctest: +SKIP
    field MLP: torch (...)
    """
    from models.field_backend import as_backend, background_as_backend, choose_field_backend

    for module in (model.field, model.background, model.latents):
        module.to(backend.device)
    name, why = choose_field_backend(requested, backend.arch, backend.device)
    model.field = as_backend(model.field, name)
    model.background = background_as_backend(model.background, name)
    return f"field MLP: {name} ({why}); model on {backend.device}"


def use_skip_empty(model: LoadedCheckpoint, mode: str) -> str:
    """``--render-skip-empty auto|on|off``: attach the class occupancy grid to ``model``
    (``model.occupancy``, read by ``render_view``, ``latent_mesh`` and fit.py) or detach it; returns a
    line saying which.

    "on" takes the grid saved in the checkpoint (runs trained with skipping on), or else estimates one
    now from the model itself: every cell, at the mean code and a few codes of the table. "auto" is "on"
    for a run trained with skipping (its checkpoint holds the grid) and "off" otherwise. Where the field
    renders on the Taichi device (``models.device_render``) images skip empty space there too.
    """
    saved = model.payload.get("occupancy") if isinstance(model.payload, dict) else None
    if mode == "auto":
        if saved is None:
            model.occupancy = None
            return "empty-space skipping: off (auto: the run was trained without it)"
        mode = "on"
    if mode == "off":
        model.occupancy = None
        return "empty-space skipping: off"
    from dataclasses import replace

    from models.skip_empty import ClassOccupancy

    model.render_config = replace(model.render_config, skip_empty=True)
    occupancy = ClassOccupancy(model.render_config)
    if saved is not None:
        occupancy.load_state_dict(saved)
        source = f"the checkpoint's {occupancy.grid.resolution}^3 grid"
    else:
        occupancy.n_codes = 8
        occupancy.update(step=occupancy.warmup, field=model.field, codes=model.latents.codes.detach())
        source = f"a {occupancy.grid.resolution}^3 grid estimated now (the checkpoint has none)"
    model.occupancy = occupancy
    return (f"empty-space skipping: on, {source}, {occupancy.grid.occupied_fraction():.1%} of cells "
            f"occupied, early stop at transmittance {model.render_config.early_stop_eps:g}")


def load_model(path: str | Path, device: str | torch.device = "cpu") -> LoadedCheckpoint:
    """Load a checkpoint (``weights_only=True`` inside models.checkpoint) with every weight frozen.

    A file that is not a checkpoint of this project raises ``models.checkpoint.CheckpointError``.
    """
    ckpt = load_checkpoint(Path(path), map_location=device)
    for module in (ckpt.field, ckpt.background, ckpt.latents):
        if module is not None:
            module.requires_grad_(False).eval()
    if ckpt.background is None:
        # No background recorded: composite over black, which is what an empty background term means.
        ckpt.background = ConstantBackground([0.0, 0.0, 0.0])
    return ckpt


def training_cache(model: LoadedCheckpoint) -> Path | None:
    """The prepared dataset the checkpoint was trained on (``model.config.data.cache``; None when empty)."""
    found = model.config.data.cache
    return Path(found) if found else None


def training_resolution(model: LoadedCheckpoint) -> int:
    """Side of the square training images (``model.config.data.resolution``, which train.py sets to what
    the training cache holds)."""
    return int(model.config.data.resolution)


def training_framing(model: LoadedCheckpoint) -> str:
    """How training photos were cropped: the training cache's preparation setting, else "aligned" (the
    FFHQ / CelebA-HQ default). Framing is a preparation setting, so the training config does not hold it."""
    found = None
    cache = training_cache(model)
    manifest = cache / "manifest.json" if cache is not None else None
    if manifest is not None and manifest.is_file():
        import json

        try:
            found = json.loads(manifest.read_text()).get("settings", {}).get("framing")
        except (ValueError, AttributeError):
            found = None
    return str(found) if found else "aligned"


def default_camera(
    height: int, width: int, distance: float = CAMERA_DISTANCE, yaw_deg: float = 0.0
) -> tuple[np.ndarray, np.ndarray]:
    """The project's standard frontal view at any size: K (3, 3) with focal 2 x width, [R|t] (3, 4)."""
    from export.cameras import default_intrinsics, look_at_origin

    return default_intrinsics(height, width), look_at_origin(distance, yaw_deg=yaw_deg)


def render_view(
    model: LoadedCheckpoint,
    latent: torch.Tensor,
    K: np.ndarray,
    world_to_camera: np.ndarray,
    height: int,
    width: int,
    chunk: int = 8192,
) -> dict[str, np.ndarray]:
    """Render one view with ``models.render_image`` (chunks of ``chunk`` rays, so memory is bounded), on
    the Taichi device when the Taichi field runs on Vulkan or Metal (``models.device_render``).

    latent (L,), K (3, 3), world_to_camera (3, 4) ->
    {"color": (H, W, 3) float32 in [0, 1], "opacity": (H, W), "depth": (H, W) ray distance}.
    """
    out = render_image_on_device(
        model.field,
        model.background,
        torch.as_tensor(latent, dtype=torch.float32).to(model_device(model)),
        torch.as_tensor(np.asarray(K), dtype=torch.float32),
        torch.as_tensor(np.asarray(world_to_camera), dtype=torch.float32),
        int(height),
        int(width),
        model.render_config,
        chunk=chunk,
        occupancy=getattr(model, "occupancy", None),
    )
    return {key: value.detach().cpu().numpy().astype(np.float32) for key, value in out.items()}


def render_path(
    model: LoadedCheckpoint,
    latent: torch.Tensor,
    K: np.ndarray,
    cameras: np.ndarray,
    height: int,
    width: int,
    chunk: int = 8192,
    desc: str | None = None,
) -> list[dict[str, np.ndarray]]:
    """Render one latent from each camera of a path: cameras (N, 3, 4) -> N dicts as ``render_view``."""
    frames = []
    for w2c in tqdm(cameras, desc=desc, disable=desc is None, leave=False):
        frames.append(render_view(model, latent, K, w2c, height, width, chunk))
    return frames


def surface_level(model: LoadedCheckpoint, latent: torch.Tensor, height: int = 32, width: int = 32) -> float:
    """A density iso-level for meshing, read off the model itself: the median density at the rendered
    depth of the frontal view's opaque pixels (where the renders put the surface). Falls back to
    ``DEFAULT_MESH_LEVEL`` when nothing opaque is rendered."""
    import renderer
    from models.render import pixel_grid

    device = model_device(model)
    latent = torch.as_tensor(latent, dtype=torch.float32).to(device)
    K, w2c = default_camera(height, width)
    view = render_view(model, latent, K, w2c, height, width)
    opaque = view["opacity"].reshape(-1) > 0.5
    if not opaque.any():
        return DEFAULT_MESH_LEVEL
    with torch.no_grad():
        rays = renderer.generate_rays(
            pixel_grid(height, width, device),
            torch.as_tensor(K, dtype=torch.float32, device=device),
            torch.as_tensor(w2c, dtype=torch.float32, device=device),
            radius=model.render_config.radius,
        )
        depth = torch.as_tensor(view["depth"].reshape(-1), device=device)
        points = (rays.origins + depth[:, None] * rays.directions)[torch.as_tensor(opaque, device=device)]
        sigma, _ = model.field(points, latent[None].expand(points.shape[0], -1))
    level = float(sigma.median())
    return level if math.isfinite(level) and level > 0 else DEFAULT_MESH_LEVEL


def latent_mesh(
    model: LoadedCheckpoint,
    latent: torch.Tensor,
    resolution: int = 128,
    bound: float = 1.5,
    level: float | None = None,
    chunk: int = 65536,
) -> Mesh:
    """Marching cubes on the density of one latent over [-bound, bound]^3, coloured by the colour field.

    ``level=None`` picks the level with ``surface_level``. Raises ValueError when no density reaches it.
    With an occupancy grid attached (``use_skip_empty(model, "on")``) the field is evaluated only at grid
    points in occupied cells and is zero elsewhere, as the renders see it.
    """
    device = model_device(model)
    latent = torch.as_tensor(latent, dtype=torch.float32).to(device)
    if level is None:
        level = surface_level(model, latent)
    occupancy = getattr(model, "occupancy", None)

    def density(points: torch.Tensor) -> torch.Tensor:
        points = points.to(device)
        if occupancy is None:
            return model.field(points[None], latent[None])[0][0]
        inside = occupancy.grid.occupied_at(points)
        sigma = torch.zeros(points.shape[0], device=device)
        sigma[inside] = model.field(points[inside][None], latent[None])[0][0]
        return sigma

    def color(points: torch.Tensor) -> torch.Tensor:
        return model.field(points.to(device), latent[None].expand(points.shape[0], -1))[1]

    grid = density_grid(density, resolution, bound, chunk)
    mesh = extract_mesh(grid, bound, level)
    # Colour slightly inside the surface: the iso-level is where density starts, colour is settled inside.
    mesh.colors = vertex_colors(color, mesh, inset=2.0 * bound / (resolution - 1), chunk=chunk)
    return mesh


def random_latents(model: LoadedCheckpoint, n: int, psi: float, seed: int) -> torch.Tensor:
    """New identities: Gaussian codes with the latent table's per-dimension mean and spread, truncated
    towards the mean by ``psi`` (z' = z_mean + psi (z - z_mean)). Returns (n, L) on the CPU, drawn the
    same on every device."""
    codes = model.latents.codes.detach().cpu()
    mean = codes.mean(0)
    std = codes.std(0, unbiased=False) if codes.shape[0] > 1 else torch.ones_like(mean)
    generator = torch.Generator().manual_seed(int(seed))
    z = mean + std * torch.randn(n, codes.shape[1], generator=generator)
    return model.latents.truncate(z.to(model_device(model)), psi).cpu()


def training_losses(model: LoadedCheckpoint):
    """The loss weights the checkpoint was trained with (``models.LossConfig``: ``model.config.loss``)."""
    return model.config.loss


def surface_depth(view: dict[str, np.ndarray]) -> np.ndarray:
    """Depth of the surface a pixel sees: the rendered sum_i w_i t_i divided by the opacity sum_i w_i.

    The raw sum counts the (transparent) rest of the ray as depth 0, so half-opaque edge pixels would look
    close to the camera; dividing by opacity gives the expected depth given the ray hits. (H, W) -> (H, W).
    """
    return view["depth"] / np.maximum(view["opacity"], 1e-6)


def source_name(entry) -> str:
    """The source file name of one ``sources.json`` entry (a string, or a dict with "file" or "source")."""
    if isinstance(entry, str):
        return entry
    if isinstance(entry, dict):
        for key in ("file", "source", "path", "name"):
            if key in entry:
                return str(entry[key])
    return str(entry)
