"""The per-ray steps that the scalar compositing kernels (``renderer.composite``) and their 8-lane x64
versions (``renderer.composite_lanes``) share: the forward's write-out of the packed per-ray values,
the backward's prologue (the upstream gradients that are constant along a ray) and its epilogue (the
background's gradient). The slots are named in ``renderer.specs``. Taichi inlines a ``ti.func``, so
sharing them costs nothing at run time.
"""

import taichi as ti

from renderer.specs import COLOR, DEPTH, OPACITY, TRANSMITTANCE


@ti.func
def store_per_ray(
    per_ray: ti.template(), background: ti.template(), ray, red, green, blue, opacity, depth, transmittance
):
    """Write one ray's outputs: colour = sum w c + (1 - opacity) bg, opacity, depth, final transmittance."""
    residual = 1.0 - opacity
    per_ray[ray, COLOR] = red + residual * background[ray, 0]
    per_ray[ray, COLOR + 1] = green + residual * background[ray, 1]
    per_ray[ray, COLOR + 2] = blue + residual * background[ray, 2]
    per_ray[ray, OPACITY] = opacity
    per_ray[ray, DEPTH] = depth
    per_ray[ray, TRANSMITTANCE] = transmittance


@ti.func
def ray_upstream(grad_per_ray: ti.template(), background: ti.template(), ray):
    """One ray's upstream gradients: the colour's (g_r, g_g, g_b), and the parts of every sample's
    ``g_i = gC . (c_i - bg) + gA + gD t_i`` that do not depend on i: ``g_const = gA - gC . bg`` and
    ``g_depth = gD``. Returns (g_r, g_g, g_b, g_const, g_depth)."""
    g_r = grad_per_ray[ray, COLOR]
    g_g = grad_per_ray[ray, COLOR + 1]
    g_b = grad_per_ray[ray, COLOR + 2]
    bg_term = g_r * background[ray, 0] + g_g * background[ray, 1] + g_b * background[ray, 2]
    return g_r, g_g, g_b, grad_per_ray[ray, OPACITY] - bg_term, grad_per_ray[ray, DEPTH]


@ti.func
def store_background_grad(grad_background: ti.template(), per_ray: ti.template(), ray, g_r, g_g, g_b):
    """dL/dbg = (1 - opacity) gC for one ray."""
    residual = 1.0 - per_ray[ray, OPACITY]
    grad_background[ray, 0] = residual * g_r
    grad_background[ray, 1] = residual * g_g
    grad_background[ray, 2] = residual * g_b
