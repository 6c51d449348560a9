"""Start-up choices for a CUDA run: how many rays fit the GPU's free memory, and TF32 matrix products.

A training step keeps every activation of the field MLP for the backward pass: for the paper network
(8 × 256, latent fed to every layer) that is thousands of floats per sample, so 8,192 rays × 192 samples
need tens of GiB. ``saved_bytes_per_ray`` measures what autograd really saves (on a small CPU batch, the
graph is the same on CUDA), ``rays_that_fit`` turns free bytes into a ray count, and ``fit_batch``
shrinks the batch (pixels per view first, then identities) to that count.

    per_ray = saved_bytes_per_ray(FieldConfig.paper(), latent_dim=64, samples_per_ray=192)
    rays = rays_that_fit(free_bytes=20 * 2**30, bytes_per_ray=per_ray)          # -> an int
    batch, note = fit_batch({"identities": 64, "views": 2, "pixels": 64}, rays)
"""

from __future__ import annotations

import dataclasses

import torch

from models.field import ConditionedField, FieldConfig
from models.train_config import BatchConfig, TrainConfig

# Per sample, besides the MLP: the renderer's saved sigma/rgb/t/deltas/weights and the concatenated,
# re-ordered (gather) copies of sigma and rgb that render_rays builds for the merged samples.
RENDER_BYTES_PER_SAMPLE = 24 * 4
# Share of the free memory the saved activations may take: the backward pass needs gradient buffers
# as large as the biggest activations, and the allocator fragments.
USABLE_FRACTION = 0.6
PROBE_RAYS = 4


def _saved_bytes(field: ConditionedField, n_rays: int, n_samples: int) -> int:
    """Bytes autograd saves for one forward of ``field`` on (n_rays, n_samples) points, one code per ray."""
    generator = torch.Generator().manual_seed(0)
    points = torch.rand(n_rays, n_samples, 3, generator=generator)
    latents = torch.rand(n_rays, field.latent_dim, generator=generator)
    seen: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        seen[storage.data_ptr()] = storage.nbytes()  # a tensor saved twice is stored once
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        sigma, rgb = field(points, latents.requires_grad_())
    del sigma, rgb
    return sum(seen.values())


def saved_bytes_per_ray(field_config: FieldConfig, latent_dim: int, samples_per_ray: int) -> int:
    """Bytes autograd keeps per ray of a training step: the field's saved tensors (measured with
    ``torch.autograd.graph.saved_tensors_hooks`` on two small CPU batches, PROBE_RAYS rays × 8 and × 16
    samples, which separates the per-sample from the per-ray part) plus the renderer's
    ``RENDER_BYTES_PER_SAMPLE``, for ``samples_per_ray`` samples.

    >>> saved_bytes_per_ray(FieldConfig.cpu(), latent_dim=8, samples_per_ray=64) > 0
    True
    """
    field = ConditionedField(field_config, latent_dim)
    short, long = _saved_bytes(field, PROBE_RAYS, 8), _saved_bytes(field, PROBE_RAYS, 16)
    per_sample = (long - short) / (PROBE_RAYS * 8)
    per_ray = max(0.0, short / PROBE_RAYS - 8 * per_sample)
    return round(per_ray + (per_sample + RENDER_BYTES_PER_SAMPLE) * samples_per_ray)


def rays_that_fit(free_bytes: int, bytes_per_ray: int, fraction: float = USABLE_FRACTION) -> int:
    """How many rays' saved activations fit in ``fraction`` of ``free_bytes`` (at least 0).

    >>> rays_that_fit(free_bytes=10 * 2**20, bytes_per_ray=1024, fraction=0.5)
    5120
    """
    if bytes_per_ray <= 0:
        raise ValueError(f"bytes_per_ray must be positive, not {bytes_per_ray}.")
    return max(0, int(free_bytes * fraction) // int(bytes_per_ray))


def fit_batch(batch: dict, max_rays: int) -> tuple[dict, str | None]:
    """``batch`` ({"identities", "views", "pixels"}) shrunk to at most ``max_rays`` rays, and a sentence
    saying what changed (None when it already fits). Pixels per view go down first (to 8), then
    identities (to 1); views stay, since a view pair per identity is part of the method.

    >>> fit_batch({"identities": 64, "views": 2, "pixels": 64}, 4096)[0]
    {'identities': 64, 'views': 2, 'pixels': 32}
    """
    identities, views, pixels = int(batch["identities"]), int(batch["views"]), int(batch["pixels"])
    requested = identities * views * pixels
    if requested <= max_rays:
        return dict(batch), None
    pixels = max(1, min(pixels, max(8, max_rays // (identities * views))))
    if identities * views * pixels > max_rays:
        identities = max(1, max_rays // (views * pixels))
    if identities * views * pixels > max_rays:
        raise ValueError(f"Not even one identity × {views} views × {pixels} pixels ({views * pixels} rays) "
                         f"fits in GPU memory (room for {max_rays} rays): free GPU memory, or use a smaller "
                         "network (--field-width, --field-depth) or fewer samples (--render-n-coarse).")
    shrunk = {**batch, "identities": identities, "views": views, "pixels": pixels}
    return shrunk, (f"batch {requested} rays does not fit, using {identities} identities × {views} views × "
                    f"{pixels} pixels = {identities * views * pixels} rays")


def enable_tf32(device: torch.device, wanted: bool = True) -> str:
    """Let float32 matrix products and convolutions use TF32 tensor cores on a CUDA GPU that has them
    (compute capability 8.0 and later: A100, H100, RTX 30xx on); returns a sentence saying what was set.

    >>> enable_tf32(torch.device("cpu"))
    'TF32: not applicable (cpu)'
    """
    if torch.device(device).type != "cuda":
        return f"TF32: not applicable ({torch.device(device).type})"
    major, minor = torch.cuda.get_device_capability(device)
    has_tf32 = major >= 8 and not getattr(torch.version, "hip", None)
    on = wanted and has_tf32
    torch.backends.cuda.matmul.allow_tf32 = on
    torch.backends.cudnn.allow_tf32 = on
    if on:
        return (f"TF32: on for float32 matrix products (compute capability {major}.{minor}; --tf32 off "
                "disables it)")
    if not wanted:
        return "TF32: off (--tf32 off)"
    return f"TF32: off, this GPU has no TF32 (compute capability {major}.{minor})"


def memory_plan(device: torch.device, config: TrainConfig, batch_given: bool) -> tuple[BatchConfig, str]:
    """Fit ``config.batch`` to the free memory of CUDA ``device``; returns (batch, sentence for
    start-up). An explicitly given batch (``batch_given``) is kept, with a warning when it may not fit."""
    free, total = torch.cuda.mem_get_info(device)
    samples = int(config.render.n_coarse) + int(config.render.n_fine)
    per_ray = saved_bytes_per_ray(config.field, int(config.latent.dim), samples)
    max_rays = rays_that_fit(free, per_ray)
    batch = dataclasses.asdict(config.batch)
    rays = batch["identities"] * batch["views"] * batch["pixels"]
    head = (f"GPU memory: {free / 2**30:.1f} of {total / 2**30:.1f} GiB free, about {per_ray / 2**20:.2f} "
            f"MiB of activations per ray ({samples} samples), room for {max_rays} rays")
    if rays <= max_rays:
        return config.batch, f"{head}; batch {rays} rays fits"
    if batch_given:
        return config.batch, (f"{head}; the batch you gave ({rays} rays) may run out of memory (the "
                              "--batch-* flags are kept as given)")
    shrunk, note = fit_batch(batch, max_rays)
    return BatchConfig(**shrunk), f"{head}; {note}"
