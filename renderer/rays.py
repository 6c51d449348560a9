"""Camera rays clipped to the bounding sphere, as one Taichi kernel.

Conventions (docs/ARCHITECTURE.md, Conventions): OpenCV cameras, world-to-camera [R|t], pixel (u, v)
has its centre at (u + 0.5, v + 0.5). The ray starts at the camera centre ``-R^T t`` and its unit direction is
``R^T K^-1 (u + 0.5, v + 0.5, 1)``. near/far solve ``|o + t d| = radius`` exactly (near clamped at
0 inside the sphere); a ray that misses gets near == far == 0, which renders pure background.
No gradient flows to the cameras.
"""

import taichi as ti
import torch

from renderer.backend import kernel_device, launch, to_kernel
from renderer.specs import Rays, validate_cameras

f32_1d = ti.types.ndarray(dtype=ti.f32, ndim=1)
f32_2d = ti.types.ndarray(dtype=ti.f32, ndim=2)
f32_3d = ti.types.ndarray(dtype=ti.f32, ndim=3)


@ti.kernel
def rays_kernel(
    pixels: f32_2d,
    K: f32_3d,
    world_to_camera: f32_3d,
    radius: ti.f32,
    origins: f32_2d,
    directions: f32_2d,
    near: f32_1d,
    far: f32_1d,
):
    """pixels (R, 2), K (1 | R, 3, 3), [R|t] (1 | R, 3, 4) -> origins, directions (R, 3), near, far (R,)."""
    for ray in range(pixels.shape[0]):
        ik = ray if K.shape[0] > 1 else 0
        ie = ray if world_to_camera.shape[0] > 1 else 0
        y_cam = (pixels[ray, 1] + 0.5 - K[ik, 1, 2]) / K[ik, 1, 1]
        x_cam = (pixels[ray, 0] + 0.5 - K[ik, 0, 2] - K[ik, 0, 1] * y_cam) / K[ik, 0, 0]
        cam = ti.Vector([x_cam, y_cam, 1.0])
        rot = ti.Matrix.zero(ti.f32, 3, 3)
        trans = ti.Vector.zero(ti.f32, 3)
        for a, b in ti.static(ti.ndrange(3, 3)):
            rot[a, b] = world_to_camera[ie, a, b]
        for a in ti.static(range(3)):
            trans[a] = world_to_camera[ie, a, 3]
        direction = (rot.transpose() @ cam).normalized()
        # 0 - v, not -v: unary minus on a vector aborts LLVM on x64 (see renderer/lanes.py).
        origin = 0.0 - rot.transpose() @ trans
        half_b = origin.dot(direction)
        c = origin.dot(origin) - radius * radius
        disc = half_b * half_b - c
        root = ti.sqrt(ti.max(disc, 0.0))
        t_near = ti.max(-half_b - root, 0.0)
        t_far = ti.max(-half_b + root, 0.0)
        if not (disc > 0.0 and t_far > t_near):
            t_near, t_far = 0.0, 0.0
        for a in ti.static(range(3)):
            origins[ray, a] = origin[a]
            directions[ray, a] = direction[a]
        near[ray] = t_near
        far[ray] = t_far


def generate_rays(
    pixels: torch.Tensor, K: torch.Tensor, world_to_camera: torch.Tensor, radius: float = 2.0
) -> Rays:
    """Camera rays through pixel centres, clipped to the sphere of ``radius`` around the origin.

    pixels (R, 2) integer (u, v) indices, K (R, 3, 3) or (3, 3), world_to_camera (R, 3, 4) or (3, 4)
    -> Rays(origins (R, 3), directions (R, 3) unit, near (R,), far (R,)); a miss has near == far == 0.

    >>> K = torch.tensor([[128.0, 0, 31.5], [0, 128, 31.5], [0, 0, 1]])
    >>> w2c = torch.tensor([[1.0, 0, 0, 0], [0, 1, 0, 0], [0, 0, 1, 7]])
    >>> generate_rays(torch.tensor([[31.0, 31.0]]), K, w2c).near
    tensor([5.])
    """
    if pixels.dim() != 2 or pixels.shape[1] != 2:
        raise ValueError(f"pixels must have shape (R, 2) holding (u, v); got {tuple(pixels.shape)}.")
    if radius <= 0:
        raise ValueError(f"radius must be positive, got {radius}.")
    n_rays = pixels.shape[0]
    validate_cameras(K, world_to_camera, n_rays)
    K_k = to_kernel(K.reshape(-1, 3, 3))
    w2c_k = to_kernel(world_to_camera.reshape(-1, 3, 4))
    device = kernel_device()
    origins = torch.empty((n_rays, 3), device=device)
    directions = torch.empty((n_rays, 3), device=device)
    near = torch.empty((n_rays,), device=device)
    far = torch.empty((n_rays,), device=device)
    if n_rays > 0:
        launch(
            "generate_rays",
            rays_kernel,
            to_kernel(pixels),
            K_k,
            w2c_k,
            float(radius),
            origins,
            directions,
            near,
            far,
        )
    out = pixels.device
    return Rays(origins.to(out), directions.to(out), near.to(out), far.to(out))
