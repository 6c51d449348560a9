"""LOLNeRF's losses (``models.losses``) as Taichi kernels, for the device-resident training step.

The same terms as ``compute_losses``: the pixel MSE, the mask MSE and the hard-surface prior over
every compositing weight, and their gradients with respect to the composited colour, opacity and
weights, in the packed per-ray layout that ``renderer.composite``'s kernels use (forward writes
(R, 6) = colour, opacity, depth, final transmittance; backward reads (R, 5) = upstream gradients of
colour, opacity, depth)::

    sums = ws.zeros("loss_sums", (3,))
    launch("loss_sums", loss_sums_kernel, per_ray, weights, target_rgb, mask, 1, sums)
    terms = loss_terms(transfers.download(sums), n_rays, n_samples, has_mask=True, cfg=LossConfig())
    launch("loss_grads", loss_grads_kernel, per_ray, weights, target_rgb, mask, 1,
           *loss_scales(n_rays, n_samples, True, cfg), grad_per_ray, grad_weights)

torch's ``abs`` has derivative 0 at 0 (``sign``), and so does the hard-surface gradient here.
"""

import numpy as np
import taichi as ti

from models.losses import LossConfig

f32_1d = ti.types.ndarray(dtype=ti.f32, ndim=1)
f32_2d = ti.types.ndarray(dtype=ti.f32, ndim=2)


@ti.func
def _sign(x):
    return ti.select(x > 0.0, 1.0, ti.select(x < 0.0, -1.0, 0.0))


@ti.kernel
def loss_sums_kernel(
    per_ray: f32_2d, weights: f32_1d, target_rgb: f32_2d, mask: f32_1d, has_mask: ti.i32, sums: f32_1d
):
    """sums (3,) += [sum (c - target)^2, sum (opacity - mask)^2, sum hard(w)] (sums zeroed by the caller)."""
    for ray in range(per_ray.shape[0]):
        err = 0.0
        for c in ti.static(range(3)):
            diff = per_ray[ray, c] - target_rgb[ray, c]
            err += diff * diff
        ti.atomic_add(sums[0], err)
        if has_mask:
            diff = per_ray[ray, 3] - mask[ray]
            ti.atomic_add(sums[1], diff * diff)
    for i in range(weights.shape[0]):
        w = weights[i]
        ti.atomic_add(sums[2], -ti.log(ti.exp(-ti.abs(w)) + ti.exp(-ti.abs(1.0 - w))))


@ti.kernel
def loss_grads_kernel(
    per_ray: f32_2d,
    weights: f32_1d,
    target_rgb: f32_2d,
    mask: f32_1d,
    has_mask: ti.i32,
    rgb_scale: ti.f32,
    mask_scale: ti.f32,
    hard_scale: ti.f32,
    grad_per_ray: f32_2d,
    grad_weights: f32_1d,
):
    """d total / d (colour, opacity, depth) -> grad_per_ray (R, 5); d total / d weights -> (R * S).

    The scales are each term's weight divided by its element count (``loss_scales``).
    """
    for ray in range(per_ray.shape[0]):
        for c in ti.static(range(3)):
            grad_per_ray[ray, c] = 2.0 * rgb_scale * (per_ray[ray, c] - target_rgb[ray, c])
        g_opacity = 0.0
        if has_mask:
            g_opacity = 2.0 * mask_scale * (per_ray[ray, 3] - mask[ray])
        grad_per_ray[ray, 3] = g_opacity
        grad_per_ray[ray, 4] = 0.0
    for i in range(weights.shape[0]):
        w = weights[i]
        a = ti.exp(-ti.abs(w))
        b = ti.exp(-ti.abs(1.0 - w))
        grad_weights[i] = hard_scale * (a * _sign(w) - b * _sign(1.0 - w)) / (a + b)


def loss_scales(n_rays: int, n_samples: int, has_mask: bool, cfg: LossConfig) -> tuple[float, float, float]:
    """Each term's weight over its element count: (rgb / 3R, mask / R or 0, hard / RS).

    >>> loss_scales(2, 4, False, LossConfig())
    (0.16666666666666666, 0.0, 0.0125)
    """
    mask = cfg.mask / n_rays if (cfg.mask and has_mask) else 0.0
    return cfg.rgb / (3 * n_rays), mask, cfg.hard / (n_rays * n_samples)


def loss_terms(sums: np.ndarray, n_rays: int, n_samples: int, has_mask: bool, cfg: LossConfig) -> dict:
    """The logged terms from the kernel's sums, as ``compute_losses`` reports them (floats).

    >>> loss_terms(np.array([3.0, 0.0, 8.0]), 1, 8, False, LossConfig())["total"]
    1.1
    """
    rgb = float(sums[0]) / (3 * n_rays)
    mask = float(sums[1]) / n_rays if has_mask else 0.0
    hard = float(sums[2]) / (n_rays * n_samples)
    total = cfg.rgb * rgb
    if cfg.mask and has_mask:
        total += cfg.mask * mask
    if cfg.hard:
        total += cfg.hard * hard
    return {"rgb": rgb, "mask": mask, "hard": hard, "total": total}
