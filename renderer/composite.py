"""Alpha compositing as Taichi kernels with a hand-written backward (one launch each way).

Forward, per ray, front to back with a single exp per sample::

    e_i = exp(-sigma_i delta_i),  w_i = T_i (1 - e_i),  T_{i+1} = T_i e_i
    color = sum w_i c_i + (1 - sum w_i) bg,  opacity = sum w_i,  depth = sum w_i t_i

Backward, per ray, back to front. With upstream gradients gC (3,), gA, gD and gW_i, the
loss is locally ``sum_i g_i w_i`` with ``g_i = gC . (c_i - bg) + gA + gD t_i + gW_i``, and since
``dw_i/dtau_k`` is ``T_{k+1}`` for i = k, ``-w_i`` for i > k and 0 otherwise (tau = sigma delta)::

    dL/dsigma_k = delta_k (g_k T_{k+1} - sum_{i>k} g_i w_i)      (a suffix sum: O(S))
    dL/dc_k = w_k gC,   dL/dbg = (1 - opacity) gC

Each kernel makes two passes per ray: one with no loop-carried dependency (forward: the exps;
backward: g_i and the colour gradients), then the sequential scan, so the independent work is not
serialised behind the scan's dependency chain; on x64 this beat one fused loop, both ways. ``ti.exp`` is
used as is: in these scalar kernels an inlined polynomial exp was slower, since Taichi's x64 backend
vectorises neither (the 8-lane kernels of ``composite_lanes`` do use a polynomial).
No exp is recomputed in the backward pass: the scan starts from the saved final transmittance and rebuilds
``T_k = T_{k+1} + w_k`` from the saved weights. That recursion only adds non-negative numbers, so
it stays accurate where T is tiny (saturated rays), unlike ``T_{k+1} = 1 - sum_{i<=k} w_i``.
Gradients do not flow to t or deltas (sample positions carry no gradient).
"""

import taichi as ti
import torch

from renderer.backend import kernel_device, launch, to_kernel
from renderer.composite_lanes import composite_backward_lanes, composite_forward_lanes
from renderer.composite_per_ray import ray_upstream, store_background_grad, store_per_ray
from renderer.lanes import LANES, aligned, as_lanes, lane_ready, lanes_active
from renderer.specs import (
    COLOR,
    DEPTH,
    GRAD_PER_RAY,
    OPACITY,
    PER_RAY,
    TRANSMITTANCE,
    Composited,
    expand_background,
)

f32_1d = ti.types.ndarray(dtype=ti.f32, ndim=1)
f32_2d = ti.types.ndarray(dtype=ti.f32, ndim=2)

# Per-sample arrays are flat (row-major) views: sample (ray, s) is ray * S + s, its colour channel
# c is 3 * (ray * S + s) + c: fewer index computations per access than 2-D/3-D ndarray indexing,
# which was slower on x64.
# Per-ray values travel packed, to keep launches short (and Vulkan's per-argument copies few):
# forward writes (R, PER_RAY) = colour (3), opacity, depth, final transmittance; backward reads
# (R, GRAD_PER_RAY) = upstream gradients of colour (3), opacity, depth (slots named in renderer.specs).


@ti.kernel
def composite_forward_kernel(
    sigmas: f32_1d,
    rgbs: f32_1d,
    t: f32_1d,
    deltas: f32_1d,
    background: f32_2d,
    weights: f32_1d,
    per_ray: f32_2d,
    n_samples: ti.i32,
):
    """Flat (R*S) sigmas, (R*S*3) rgbs, (R*S) t, deltas, (R, 3) background -> (R*S) weights, (R, PER_RAY)."""
    for ray in range(background.shape[0]):
        first = ray * n_samples
        # Pass 1 has no loop-carried dependency, so it runs at full speed; the exps are parked in
        # `weights`, which pass 2 (the scan) overwrites.
        for i in range(first, first + n_samples):
            weights[i] = ti.exp(-sigmas[i] * deltas[i])
        transmittance = 1.0
        acc_r, acc_g, acc_b = 0.0, 0.0, 0.0
        acc_w, acc_d = 0.0, 0.0
        for i in range(first, first + n_samples):
            survive = weights[i]
            w = transmittance * (1.0 - survive)
            weights[i] = w
            acc_r += w * rgbs[3 * i]
            acc_g += w * rgbs[3 * i + 1]
            acc_b += w * rgbs[3 * i + 2]
            acc_w += w
            acc_d += w * t[i]
            transmittance *= survive
        store_per_ray(per_ray, background, ray, acc_r, acc_g, acc_b, acc_w, acc_d, transmittance)


@ti.kernel
def composite_backward_kernel(
    rgbs: f32_1d,
    t: f32_1d,
    deltas: f32_1d,
    background: f32_2d,
    weights: f32_1d,
    per_ray: f32_2d,
    grad_per_ray: f32_2d,
    grad_weights: f32_1d,
    use_grad_weights: ti.i32,
    grad_sigmas: f32_1d,
    grad_rgbs: f32_1d,
    grad_background: f32_2d,
    n_samples: ti.i32,
):
    """Reverse scan: saved forward values + (R, GRAD_PER_RAY) upstream grads -> dsigma, drgb (flat),
    dbg (R, 3)."""
    for ray in range(background.shape[0]):
        g_r, g_g, g_b, g_const, g_depth = ray_upstream(grad_per_ray, background, ray)
        first = ray * n_samples
        # Pass 1 (no loop-carried dependency): colour gradients, and each sample's g_i parked in
        # grad_sigmas. Pass 2 is the reverse scan.
        for i in range(first, first + n_samples):
            w = weights[i]
            g = g_const + g_depth * t[i] + g_r * rgbs[3 * i] + g_g * rgbs[3 * i + 1] + g_b * rgbs[3 * i + 2]
            if use_grad_weights:
                g += grad_weights[i]
            grad_sigmas[i] = g
            grad_rgbs[3 * i] = w * g_r
            grad_rgbs[3 * i + 1] = w * g_g
            grad_rgbs[3 * i + 2] = w * g_b
        transmittance_after = per_ray[ray, TRANSMITTANCE]
        suffix = 0.0
        last = first + n_samples - 1
        for k in range(n_samples):
            i = last - k
            w = weights[i]
            g = grad_sigmas[i]
            grad_sigmas[i] = deltas[i] * (g * transmittance_after - suffix)
            suffix += g * w
            transmittance_after += w
        store_background_grad(grad_background, per_ray, ray, g_r, g_g, g_b)


def _flat(x: torch.Tensor) -> torch.Tensor:
    return to_kernel(x).view(-1)


def _upstream(grad: torch.Tensor | None, shape: tuple[int, ...], device: torch.device) -> torch.Tensor:
    return torch.zeros(shape, device=device) if grad is None else to_kernel(grad).view(shape)


class CompositeFunction(torch.autograd.Function):
    """Taichi compositing with gradients wrt sigmas, rgbs and an (R, 3) background."""

    @staticmethod
    def forward(ctx, sigmas, rgbs, t, deltas, background):
        n_rays, n_samples = sigmas.shape
        out_device = sigmas.device
        device = kernel_device()
        sigmas_k, rgbs_k, t_k, deltas_k = (_flat(x) for x in (sigmas, rgbs, t, deltas))
        bg_k = to_kernel(background)
        weights = torch.empty((n_rays, n_samples), device=device)
        per_ray = torch.empty((n_rays, PER_RAY), device=device)
        use_lanes = n_rays > 0 and n_samples > 0 and n_samples % LANES == 0 and lanes_active()
        if use_lanes:
            sigmas_k, rgbs_k, t_k, deltas_k = (lane_ready(x) for x in (sigmas_k, rgbs_k, t_k, deltas_k))
            use_lanes = aligned(sigmas_k, rgbs_k, t_k, deltas_k, weights)
        if use_lanes:
            launch(
                "composite_forward",
                composite_forward_lanes,
                *(as_lanes(x) for x in (sigmas_k, rgbs_k, t_k, deltas_k)), bg_k, as_lanes(weights), per_ray,
                n_samples // LANES,
            )  # fmt: skip
        elif n_rays > 0 and n_samples > 0:
            launch(
                "composite_forward",
                composite_forward_kernel,
                sigmas_k, rgbs_k, t_k, deltas_k, bg_k, weights.view(-1), per_ray, n_samples,
            )  # fmt: skip
        elif n_rays > 0:  # no samples: nothing is hit, the background shows through
            per_ray.zero_()
            per_ray[:, COLOR : COLOR + 3] = bg_k
            per_ray[:, TRANSMITTANCE] = 1.0
        ctx.save_for_backward(rgbs_k, t_k, deltas_k, bg_k, weights, per_ray)
        ctx.lanes = use_lanes
        ctx.out_device = out_device
        ctx.grad_dtypes = (sigmas.dtype, rgbs.dtype, background.dtype)  # computed in float32
        # Copies, not views of per_ray (which backward reads): callers may edit outputs in place.
        color = per_ray[:, COLOR : COLOR + 3].clone()
        opacity, depth = per_ray[:, OPACITY].clone(), per_ray[:, DEPTH].clone()
        return tuple(x.to(out_device) for x in (color, opacity, depth, weights))

    @staticmethod
    def backward(ctx, grad_color, grad_opacity, grad_depth, grad_weights):
        # Saved outputs come back attached to the graph; Taichi must see plain tensors.
        rgbs, t, deltas, background, weights, per_ray = (x.detach() for x in ctx.saved_tensors)
        n_rays, n_samples = weights.shape
        device = weights.device
        # The kernel writes every entry, so no zero-fill (that alone would cost about a millisecond).
        grad_sigmas = torch.empty((n_rays, n_samples), device=device)
        grad_rgbs = torch.empty((n_rays, n_samples, 3), device=device)
        if n_rays > 0 and n_samples > 0:
            grad_background = torch.empty((n_rays, 3), device=device)
            grad_per_ray = torch.empty((n_rays, GRAD_PER_RAY), device=device)
            grad_per_ray[:, COLOR : COLOR + 3] = _upstream(grad_color, (n_rays, 3), device)
            grad_per_ray[:, OPACITY] = _upstream(grad_opacity, (n_rays,), device)
            grad_per_ray[:, DEPTH] = _upstream(grad_depth, (n_rays,), device)
            use_grad_weights = grad_weights is not None
            upstream_weights = _flat(grad_weights) if use_grad_weights else torch.zeros(LANES, device=device)
            use_lanes = ctx.lanes and lanes_active()
            if use_lanes:
                upstream_weights = lane_ready(upstream_weights)
                lane_tensors = (rgbs, t, deltas, weights, upstream_weights, grad_sigmas, grad_rgbs)
                use_lanes = aligned(*lane_tensors)
            if use_lanes:
                launch(
                    "composite_backward",
                    composite_backward_lanes,
                    *(as_lanes(x) for x in lane_tensors[:3]), background, as_lanes(weights), per_ray,
                    grad_per_ray, as_lanes(upstream_weights), use_grad_weights, as_lanes(grad_sigmas),
                    as_lanes(grad_rgbs), grad_background, n_samples // LANES,
                )  # fmt: skip
            else:
                launch(
                    "composite_backward",
                    composite_backward_kernel,
                    rgbs, t, deltas, background, weights.view(-1), per_ray, grad_per_ray, upstream_weights,
                    int(use_grad_weights), grad_sigmas.view(-1), grad_rgbs.view(-1), grad_background,
                    n_samples,
                )  # fmt: skip
        else:
            grad_background = _upstream(grad_color, (n_rays, 3), device) * (1 - per_ray[:, OPACITY, None])
        out, (d_sigma, d_rgb, d_bg) = ctx.out_device, ctx.grad_dtypes
        grad_background = grad_background.to(out, d_bg)
        return grad_sigmas.to(out, d_sigma), grad_rgbs.to(out, d_rgb), None, None, grad_background


def composite(
    sigmas: torch.Tensor,
    rgbs: torch.Tensor,
    t: torch.Tensor,
    deltas: torch.Tensor,
    background: torch.Tensor | float = 0.0,
) -> Composited:
    """Volume rendering by alpha compositing (Taichi forward and backward).

    sigmas (R, S) >= 0, rgbs (R, S, 3), t (R, S), deltas (R, S), background (R, 3) | (3,) | float
    -> Composited(color (R, 3), opacity (R,), depth (R,), weights (R, S)).

    Differentiable wrt sigmas, rgbs and a tensor background (all four outputs may carry gradient);
    t and deltas get none. Same maths as ``renderer.reference.composite``.

    >>> out = composite(torch.tensor([[1e9]]), torch.ones(1, 1, 3), torch.tensor([[2.0]]), torch.ones(1, 1))
    >>> out.opacity, out.depth
    (tensor([1.]), tensor([2.]))
    """
    if sigmas.dim() != 2 or rgbs.shape != (*sigmas.shape, 3):
        raise ValueError(
            f"composite needs sigmas (R, S) and rgbs (R, S, 3); got {tuple(sigmas.shape)} and "
            f"{tuple(rgbs.shape)}."
        )
    if t.shape != sigmas.shape or deltas.shape != sigmas.shape:
        raise ValueError(
            f"composite needs t and deltas shaped like sigmas {tuple(sigmas.shape)}; got "
            f"{tuple(t.shape)} and {tuple(deltas.shape)}."
        )
    bg = expand_background(background, sigmas.shape[0], sigmas)
    color, opacity, depth, weights = CompositeFunction.apply(sigmas, rgbs, t, deltas, bg)
    return Composited(color, opacity, depth, weights)
