"""Compositing kernels for x64 over 8-sample lanes: the maths of ``renderer.composite``, vectorised.

``renderer.composite`` runs these on the x64 arch when the samples per ray are a multiple of 8 (and the
scalar kernels otherwise, and on every other arch). Each ``Lanes`` value holds 8 consecutive samples
of one ray (``renderer.lanes``); interleaved RGB takes three of them per 8 samples.

Forward, per chunk of 8 samples: ``e = exp(-sigma delta)`` by polynomial, the transmittance inside the
chunk as the incoming T times an exclusive prefix product of ``e``, then 8-wide accumulations. Only
the incoming T is carried from chunk to chunk, so the sequential dependency is one multiply per chunk.

Backward, per chunk from the last to the first: the same formulas as ``composite_backward_kernel``,
``dL/dsigma_k = delta_k (g_k T_{k+1} - sum_{i>k} g_i w_i)`` with ``T_{k+1} = T_final + sum_{i>k} w_i``:
both suffix sums are in-chunk scans plus a carry. The rays are also visited from last to first, so the
whole sweep walks memory downwards. Walking each ray backwards but the rays forwards would visit memory
in a sawtooth, which the CPU's prefetcher does not follow (it follows one direction), and was much
slower (README, Benchmarks).
"""

import taichi as ti

from renderer.composite_per_ray import ray_upstream, store_background_grad, store_per_ray
from renderer.lanes import (
    exp_lanes,
    lanes_1d,
    prefix_product,
    rgb_pattern,
    shift_down,
    shift_up,
    spread_rgb,
    suffix_sum,
    sum_rgb,
)
from renderer.specs import TRANSMITTANCE

f32_2d = ti.types.ndarray(dtype=ti.f32, ndim=2)


@ti.kernel
def composite_forward_lanes(
    sigmas: lanes_1d,
    rgbs: lanes_1d,
    t: lanes_1d,
    deltas: lanes_1d,
    background: f32_2d,
    weights: lanes_1d,
    per_ray: f32_2d,
    chunks: ti.i32,
):
    """Lanes of sigmas, t, deltas (R*S/8), rgbs (3*R*S/8), (R, 3) background -> weights, (R, PER_RAY)."""
    for ray in range(background.shape[0]):
        transmittance = 1.0
        acc_0 = ti.Vector([0.0] * 8)  # the three RGB parts of sum w c, interleaved like rgbs
        acc_1 = ti.Vector([0.0] * 8)
        acc_2 = ti.Vector([0.0] * 8)
        acc_w = ti.Vector([0.0] * 8)
        acc_d = ti.Vector([0.0] * 8)
        for c in range(ray * chunks, ray * chunks + chunks):
            survive = exp_lanes(0.0 - sigmas[c] * deltas[c])
            running = prefix_product(survive)
            w = transmittance * shift_up(running, 1, 1.0) * (1.0 - survive)  # T_k (1 - e_k)
            transmittance *= running[7]
            weights[c] = w
            acc_w += w
            acc_d += w * t[c]
            acc_0 += spread_rgb(w, 0) * rgbs[3 * c]
            acc_1 += spread_rgb(w, 1) * rgbs[3 * c + 1]
            acc_2 += spread_rgb(w, 2) * rgbs[3 * c + 2]
        # Float k of the 24-float pattern holds channel k % 3.
        red = acc_0[0] + acc_0[3] + acc_0[6] + acc_1[1] + acc_1[4] + acc_1[7] + acc_2[2] + acc_2[5]
        green = acc_0[1] + acc_0[4] + acc_0[7] + acc_1[2] + acc_1[5] + acc_2[0] + acc_2[3] + acc_2[6]
        blue = acc_0[2] + acc_0[5] + acc_1[0] + acc_1[3] + acc_1[6] + acc_2[1] + acc_2[4] + acc_2[7]
        store_per_ray(per_ray, background, ray, red, green, blue, acc_w.sum(), acc_d.sum(), transmittance)


@ti.kernel
def composite_backward_lanes(
    rgbs: lanes_1d,
    t: lanes_1d,
    deltas: lanes_1d,
    background: f32_2d,
    weights: lanes_1d,
    per_ray: f32_2d,
    grad_per_ray: f32_2d,
    grad_weights: lanes_1d,
    use_grad_weights: ti.template(),
    grad_sigmas: lanes_1d,
    grad_rgbs: lanes_1d,
    grad_background: f32_2d,
    chunks: ti.i32,
):
    """Saved forward values + (R, GRAD_PER_RAY) upstream grads -> lanes of dsigma, drgb, and dbg (R, 3)."""
    n_rays = background.shape[0]
    for reversed_ray in range(n_rays):
        ray = n_rays - 1 - reversed_ray
        g_r, g_g, g_b, g_const, g_depth = ray_upstream(grad_per_ray, background, ray)
        pattern_0 = rgb_pattern(g_r, g_g, g_b, 0)
        pattern_1 = rgb_pattern(g_r, g_g, g_b, 1)
        pattern_2 = rgb_pattern(g_r, g_g, g_b, 2)
        suffix_carry = 0.0  # sum_{i > chunk} g_i w_i
        transmittance_carry = per_ray[ray, TRANSMITTANCE]  # T after this chunk's last sample
        last = ray * chunks + chunks - 1
        for k in range(chunks):
            c = last - k
            w = weights[c]
            colour = sum_rgb(
                rgbs[3 * c] * pattern_0, rgbs[3 * c + 1] * pattern_1, rgbs[3 * c + 2] * pattern_2
            )
            g = g_const + g_depth * t[c] + colour
            if ti.static(use_grad_weights):
                g += grad_weights[c]
            grad_rgbs[3 * c] = spread_rgb(w, 0) * pattern_0
            grad_rgbs[3 * c + 1] = spread_rgb(w, 1) * pattern_1
            grad_rgbs[3 * c + 2] = spread_rgb(w, 2) * pattern_2
            gw_suffix = suffix_sum(g * w)
            w_suffix = suffix_sum(w)
            later_gw = shift_down(gw_suffix, 1, 0.0) + suffix_carry
            transmittance_after = shift_down(w_suffix, 1, 0.0) + transmittance_carry
            grad_sigmas[c] = deltas[c] * (g * transmittance_after - later_gw)
            suffix_carry += gw_suffix[0]
            transmittance_carry += w_suffix[0]
        store_background_grad(grad_background, per_ray, ray, g_r, g_g, g_b)
