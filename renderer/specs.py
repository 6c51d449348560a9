"""The renderer's shared types and constants: what the Taichi kernels and the torch reference agree on.

    rays = Rays(origins, directions, near, far)          # (R, 3), (R, 3), (R,), (R,)
    out = Composited(color, opacity, depth, weights)     # (R, 3), (R,), (R,), (R, S)

Sampling conventions (stratified bins, the importance PDF with ``IMPORTANCE_EPS``, the stable merge) are
described in ``renderer.reference``; the hashed uniforms both sides use are defined here: sample
``n = ray * S + s`` of a call gets the top 24 bits of ``pcg_hash(n + mix_key(key))`` with one 31-bit
``key`` per call drawn from the caller's generator (``draw_key``).
"""

from __future__ import annotations

from typing import NamedTuple

import torch

# Mass added to each importance bin in proportion to its width (as a fraction of the ray's interval).
IMPORTANCE_EPS = 1e-5
# PCG hash constants (Jarzynski & Olano 2020) and the 32-bit mask the torch version works under.
PCG_MULTIPLIER, PCG_INCREMENT, PCG_OUTPUT = 747796405, 2891336453, 277803737
U32 = 0xFFFFFFFF

# Per-ray slots of the compositing kernels' packed per-ray arrays (one tensor, so one launch argument
# and on Vulkan one copy): the forward writes (R, PER_RAY) = colour (3 slots from COLOR), opacity,
# depth, final transmittance; the backward reads the upstream gradients of the first three outputs as
# (R, GRAD_PER_RAY), in the same slots.
COLOR, OPACITY, DEPTH, TRANSMITTANCE = 0, 3, 4, 5
PER_RAY = 6
GRAD_PER_RAY = 5


class Rays(NamedTuple):
    """A batch of rays: origins (R, 3), unit directions (R, 3), near (R,), far (R,).

    A ray that misses the bounding sphere has near == far.
    """

    origins: torch.Tensor
    directions: torch.Tensor
    near: torch.Tensor
    far: torch.Tensor


class Composited(NamedTuple):
    """Compositing output: color (R, 3), opacity (R,), depth (R,), weights (R, S)."""

    color: torch.Tensor
    opacity: torch.Tensor
    depth: torch.Tensor
    weights: torch.Tensor


def validate_cameras(K: torch.Tensor, world_to_camera: torch.Tensor, n_rays: int) -> None:
    """ValueError unless K is (3, 3) or (R, 3, 3) and world_to_camera (3, 4) or (R, 3, 4), R = ``n_rays``
    (a leading 1 counts as shared)."""
    if K.shape[-2:] != (3, 3) or K.dim() not in (2, 3):
        raise ValueError(f"K must have shape (3, 3) or (R, 3, 3), got {tuple(K.shape)}.")
    if world_to_camera.shape[-2:] != (3, 4) or world_to_camera.dim() not in (2, 3):
        raise ValueError(
            f"world_to_camera must have shape (3, 4) or (R, 3, 4), got {tuple(world_to_camera.shape)}."
        )
    for name, tensor in (("K", K), ("world_to_camera", world_to_camera)):
        if tensor.dim() == 3 and tensor.shape[0] not in (1, n_rays):
            raise ValueError(f"{name} must be shared or one per ray ({n_rays}); got {tuple(tensor.shape)}.")


def broadcast_cameras(
    K: torch.Tensor, world_to_camera: torch.Tensor, n_rays: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Expand shared cameras to one per ray (broadcast views, no copy), after ``validate_cameras``.

    K (3, 3) | (R, 3, 3), world_to_camera (3, 4) | (R, 3, 4) -> (R, 3, 3), (R, 3, 4).
    """
    validate_cameras(K, world_to_camera, n_rays)
    return K.expand(n_rays, 3, 3), world_to_camera.expand(n_rays, 3, 4)


def draw_key(generator: torch.Generator) -> int:
    """One 31-bit key for a call's hashed uniforms, from (and advancing) the caller's generator.

    With a CUDA generator the ``.item()`` waits for the device: one small sync per sampling call.
    """
    return int(torch.randint(0, 2**31 - 1, (1,), generator=generator, device=generator.device).item())


def pcg_hash(x: torch.Tensor) -> torch.Tensor:
    """The PCG output hash of int64 values holding unsigned 32-bit integers (a bijection on 32 bits)."""
    state = (x * PCG_MULTIPLIER + PCG_INCREMENT) & U32
    word = (((state >> ((state >> 28) + 4)) ^ state) * PCG_OUTPUT) & U32
    return (word >> 22) ^ word


def mix_key(key: int) -> int:
    """``pcg_hash(key)``: the offset that key adds to every sample index (the kernels take it as is)."""
    return int(pcg_hash(torch.tensor(key, dtype=torch.int64)))


def expand_background(background: torch.Tensor | float, n_rays: int, like: torch.Tensor) -> torch.Tensor:
    """A background given as (R, 3), (3,) or a float, as an (R, 3) tensor (a broadcast view)."""
    if not torch.is_tensor(background):
        background = torch.tensor(float(background), dtype=like.dtype, device=like.device)
    if background.dim() == 0:
        background = background.expand(3)
    if background.shape not in ((3,), (n_rays, 3)):
        raise ValueError(
            f"background must be a float, a (3,) or an ({n_rays}, 3) tensor, "
            f"got shape {tuple(background.shape)}."
        )
    return background.expand(n_rays, 3)


class PackedComposited(NamedTuple):
    """Compositing output of a packed sample list: color (R, 3), opacity (R,), depth (R,), weights (N,)
    aligned with the samples, and kept (R,) int32, the samples of each ray composited before the
    transmittance cut (the rest have weight 0)."""

    color: torch.Tensor
    opacity: torch.Tensor
    depth: torch.Tensor
    weights: torch.Tensor
    kept: torch.Tensor


def offsets_from_counts(counts: torch.Tensor) -> torch.Tensor:
    """First sample of each ray in a packed list (nerfacc's packed_info[:, 0]): counts (R,) -> (R,) int32.

    >>> offsets_from_counts(torch.tensor([2, 0, 3]))
    tensor([0, 2, 2], dtype=torch.int32)
    """
    return (torch.cumsum(counts, 0) - counts).to(torch.int32)


def ray_indices(counts: torch.Tensor, n_samples: int | None = None) -> torch.Tensor:
    """The ray of every sample of a packed list whose rays are stored back to back, in ray order (as
    ``offsets_from_counts`` and the marching kernels lay them out): counts (R,) -> (N,) int64,
    N = counts.sum() (pass ``n_samples`` when known, to save a device sync).

    >>> ray_indices(torch.tensor([2, 0, 3]))
    tensor([0, 0, 2, 2, 2])
    """
    rays = torch.arange(counts.shape[0], device=counts.device)
    return torch.repeat_interleave(rays, counts.to(torch.int64), output_size=n_samples)


class PackedSamples(NamedTuple):
    """Samples placed by marching an occupancy grid, packed: t (N,) and deltas (N,) float32, ray r's
    samples at offsets[r] .. offsets[r] + counts[r] - 1 (offsets, counts (R,) int32, rays back to back),
    and bins (N,) int32: each sample's index among the ray's S stratified samples, so per-sample values
    can be scattered back to an (R, S) row (``values_dense.view(-1)[ray * S + bin] = values``)."""

    t: torch.Tensor
    deltas: torch.Tensor
    offsets: torch.Tensor
    counts: torch.Tensor
    bins: torch.Tensor


def occupancy_cells(points: torch.Tensor, resolution: int, radius: float) -> torch.Tensor:
    """The occupancy grid's cell convention (``renderer.occupancy.cell_of`` in Taichi): the flat cell
    index ``(i * res + j) * res + k`` of points in the cube [-radius, radius]^3 (outside points clamp to
    the border): points (..., 3) -> (...) int64.

    >>> occupancy_cells(torch.tensor([[-1.0, -1.0, 0.9], [0.1, 0.1, 0.1]]), 2, 1.0)
    tensor([1, 7])
    """
    ijk = torch.floor((points + radius) * (resolution / (2.0 * radius))).to(torch.int64)
    ijk = ijk.clamp(0, resolution - 1)
    return (ijk[..., 0] * resolution + ijk[..., 1]) * resolution + ijk[..., 2]
