"""Alpha compositing of a packed (ragged) sample list, with early stop, as Taichi kernels with a
hand-written backward (nerfacc's packed layout: ``nerfacc/volrend.py``, ``nerfacc/pack.py``).

Layout: the N samples of all rays lie in flat arrays; ray r owns samples ``offsets[r] ..
offsets[r] + counts[r] - 1``, sorted by depth (nerfacc's ``packed_info = [offsets, counts]``). A ray
may own no sample at all (it then shows the background), and rays need not be stored in order.

    out = composite_packed(sigmas, rgbs, t, deltas, offsets, counts, background, eps=1e-4)
    # PackedComposited(color (R, 3), opacity (R,), depth (R,), weights (N,), kept (R,) int32)

Early stop: a ray stops at its first sample whose transmittance *before* it, ``T_i = prod_{j<i} e_j``,
is below ``eps`` (as nerfacc's ``early_stop_eps``, which masks ``trans >= eps``); that sample and every
later one get weight 0 and no gradient, and ``kept`` counts the samples composited. What is cut
carries at most ``eps`` of the ray's weight, so the colour changes by at most ``eps`` times the largest
colour difference. ``eps=0`` composites every sample. The cut point is piecewise constant in sigma, so
the gradient is that of the truncated sum (what the reference's mask gives too).

Forward per ray, front to back, one exp per sample (as ``renderer.composite``)::

    e_i = exp(-sigma_i delta_i),  w_i = T_i (1 - e_i),  T_{i+1} = T_i e_i

Backward per ray, back to front over the kept samples, from the saved weights and final
transmittance (``T_k = T_{k+1} + w_k``, which only adds non-negative numbers; see
``renderer.composite`` for the derivation)::

    dL/dsigma_k = delta_k (g_k T_{k+1} - sum_{k<i<kept} g_i w_i),   g_i = gC.(c_i - bg) + gA + gD t_i + gW_i

The packed kernels are scalar on every arch: the packed list has no fixed 8-sample rows to give the x64
lane kernels (``renderer.lanes``), and with empty space removed compositing is a small part of a step.
"""

import taichi as ti
import torch

from renderer.backend import kernel_device, launch, to_kernel
from renderer.specs import PackedComposited, expand_background

f32_1d = ti.types.ndarray(dtype=ti.f32, ndim=1)
f32_2d = ti.types.ndarray(dtype=ti.f32, ndim=2)
i32_1d = ti.types.ndarray(dtype=ti.i32, ndim=1)

EARLY_STOP_EPS = 1e-4  # nerfacc's default early_stop_eps
# Per-ray values travel packed (one tensor, one copy per Vulkan launch): forward writes colour (3),
# opacity, depth and final transmittance; backward reads the upstream gradients of the first five.
PER_RAY = 6


@ti.kernel
def packed_forward_kernel(
    sigmas: f32_1d,
    rgbs: f32_1d,
    t: f32_1d,
    deltas: f32_1d,
    offsets: i32_1d,
    counts: i32_1d,
    background: f32_2d,
    eps: ti.f32,
    weights: f32_1d,
    per_ray: f32_2d,
    kept: i32_1d,
):
    """Flat (N) sigmas, (N*3) rgbs, (N) t, deltas; (R,) offsets, counts; (R, 3) background
    -> (N) weights, (R, 6) per-ray values, (R,) kept counts."""
    # Every weight is written, cut and unowned samples' too: on Vulkan an argument the kernel only
    # writes is not copied in, so an entry left unwritten comes back as whatever the device buffer held
    # (docs/TAICHI.md). This loop runs before the next one (two tasks of one launch).
    for i in range(weights.shape[0]):
        weights[i] = 0.0
    for ray in range(offsets.shape[0]):
        first = offsets[ray]
        end = first + counts[ray]
        transmittance = 1.0
        acc_r, acc_g, acc_b = 0.0, 0.0, 0.0
        acc_w, acc_d = 0.0, 0.0
        stop = end
        for i in range(first, end):
            if transmittance < eps:
                stop = i
                break
            survive = ti.exp(-sigmas[i] * deltas[i])
            w = transmittance * (1.0 - survive)
            weights[i] = w
            acc_r += w * rgbs[3 * i]
            acc_g += w * rgbs[3 * i + 1]
            acc_b += w * rgbs[3 * i + 2]
            acc_w += w
            acc_d += w * t[i]
            transmittance *= survive
        kept[ray] = stop - first
        residual = 1.0 - acc_w
        per_ray[ray, 0] = acc_r + residual * background[ray, 0]
        per_ray[ray, 1] = acc_g + residual * background[ray, 1]
        per_ray[ray, 2] = acc_b + residual * background[ray, 2]
        per_ray[ray, 3] = acc_w
        per_ray[ray, 4] = acc_d
        per_ray[ray, 5] = transmittance


@ti.kernel
def packed_backward_kernel(
    rgbs: f32_1d,
    t: f32_1d,
    deltas: f32_1d,
    offsets: i32_1d,
    kept: i32_1d,
    background: f32_2d,
    weights: f32_1d,
    per_ray: f32_2d,
    grad_per_ray: f32_2d,
    grad_weights: f32_1d,
    use_grad_weights: ti.i32,
    grad_sigmas: f32_1d,
    grad_rgbs: f32_1d,
    grad_background: f32_2d,
):
    """Reverse scan over each ray's kept samples: saved forward values + (R, 5) upstream gradients
    -> (N) dsigma, (N*3) drgb (zero for cut and unowned samples), (R, 3) dbg."""
    for i in range(grad_sigmas.shape[0]):  # write every entry (see the forward kernel)
        grad_sigmas[i] = 0.0
        grad_rgbs[3 * i] = 0.0
        grad_rgbs[3 * i + 1] = 0.0
        grad_rgbs[3 * i + 2] = 0.0
    for ray in range(offsets.shape[0]):
        g_r, g_g, g_b = grad_per_ray[ray, 0], grad_per_ray[ray, 1], grad_per_ray[ray, 2]
        bg_term = g_r * background[ray, 0] + g_g * background[ray, 1] + g_b * background[ray, 2]
        g_const = grad_per_ray[ray, 3] - bg_term
        g_depth = grad_per_ray[ray, 4]
        first = offsets[ray]
        stop = first + kept[ray]
        # Pass 1 (no loop-carried dependency): colour gradients, and each sample's g_i parked in
        # grad_sigmas; pass 2 is the reverse scan (as renderer.composite, which measured this split).
        for i in range(first, stop):
            w = weights[i]
            g = g_const + g_depth * t[i] + g_r * rgbs[3 * i] + g_g * rgbs[3 * i + 1] + g_b * rgbs[3 * i + 2]
            if use_grad_weights:
                g += grad_weights[i]
            grad_sigmas[i] = g
            grad_rgbs[3 * i] = w * g_r
            grad_rgbs[3 * i + 1] = w * g_g
            grad_rgbs[3 * i + 2] = w * g_b
        transmittance_after = per_ray[ray, 5]
        suffix = 0.0
        for k in range(stop - first):
            i = stop - 1 - k
            w = weights[i]
            g = grad_sigmas[i]
            grad_sigmas[i] = deltas[i] * (g * transmittance_after - suffix)
            suffix += g * w
            transmittance_after += w
        residual = 1.0 - per_ray[ray, 3]
        grad_background[ray, 0] = residual * g_r
        grad_background[ray, 1] = residual * g_g
        grad_background[ray, 2] = residual * g_b


def _upstream(grad: torch.Tensor | None, shape: tuple[int, ...], device: torch.device) -> torch.Tensor:
    return torch.zeros(shape, device=device) if grad is None else to_kernel(grad).view(shape)


class PackedCompositeFunction(torch.autograd.Function):
    """Taichi packed compositing with gradients wrt sigmas, rgbs and an (R, 3) background."""

    @staticmethod
    def forward(ctx, sigmas, rgbs, t, deltas, offsets, counts, background, eps):
        n_samples, n_rays = sigmas.shape[0], offsets.shape[0]
        out_device = sigmas.device
        device = kernel_device()
        sigmas_k, rgbs_k, t_k, deltas_k = (to_kernel(x).view(-1) for x in (sigmas, rgbs, t, deltas))
        offsets_k, counts_k = to_kernel(offsets, torch.int32), to_kernel(counts, torch.int32)
        bg_k = to_kernel(background)
        weights = torch.empty(n_samples, device=device)
        per_ray = torch.empty((n_rays, PER_RAY), device=device)
        kept = torch.zeros(n_rays, dtype=torch.int32, device=device)
        if n_rays > 0:
            launch(
                "composite_packed_forward", packed_forward_kernel,
                sigmas_k, rgbs_k, t_k, deltas_k, offsets_k, counts_k, bg_k, float(eps), weights, per_ray,
                kept,
            )  # fmt: skip
        else:  # no rays: nothing owns a sample (the kernel, which zeroes them, does not run)
            weights.zero_()
        ctx.save_for_backward(rgbs_k, t_k, deltas_k, offsets_k, kept, bg_k, weights, per_ray)
        ctx.out_device = out_device
        ctx.grad_dtypes = (sigmas.dtype, rgbs.dtype, background.dtype)  # computed in float32
        ctx.mark_non_differentiable(kept)
        # Copies, not views of per_ray (which backward reads): callers may edit outputs in place.
        color, opacity, depth = per_ray[:, :3].clone(), per_ray[:, 3].clone(), per_ray[:, 4].clone()
        return tuple(x.to(out_device) for x in (color, opacity, depth, weights, kept))

    @staticmethod
    def backward(ctx, grad_color, grad_opacity, grad_depth, grad_weights, _grad_kept):
        rgbs, t, deltas, offsets, kept, background, weights, per_ray = (x.detach() for x in ctx.saved_tensors)
        n_samples, n_rays = weights.shape[0], offsets.shape[0]
        device = weights.device
        grad_sigmas = torch.empty(n_samples, device=device)
        grad_rgbs = torch.empty((n_samples, 3), device=device)
        grad_background = torch.zeros((n_rays, 3), device=device)
        if n_rays > 0:
            grad_per_ray = torch.cat(
                [
                    _upstream(grad_color, (n_rays, 3), device),
                    _upstream(grad_opacity, (n_rays, 1), device),
                    _upstream(grad_depth, (n_rays, 1), device),
                ],
                dim=1,
            ).contiguous()
            use_grad_weights = grad_weights is not None
            upstream_weights = _upstream(grad_weights, (n_samples,), device) if use_grad_weights else weights
            launch(
                "composite_packed_backward", packed_backward_kernel,
                rgbs, t, deltas, offsets, kept, background, weights, per_ray, grad_per_ray,
                upstream_weights, int(use_grad_weights), grad_sigmas, grad_rgbs.view(-1), grad_background,
            )  # fmt: skip
        else:
            grad_sigmas.zero_()
            grad_rgbs.zero_()
        out, (d_sigma, d_rgb, d_bg) = ctx.out_device, ctx.grad_dtypes
        return (
            grad_sigmas.to(out, d_sigma), grad_rgbs.to(out, d_rgb), None, None, None, None,
            grad_background.to(out, d_bg), None,
        )  # fmt: skip


def check_packed(sigmas, rgbs, t, deltas, offsets, counts) -> None:
    """ValueError unless the arguments form a packed list: (N,), (N, 3), (N,), (N,), (R,), (R,)."""
    if sigmas.dim() != 1 or rgbs.shape != (sigmas.shape[0], 3):
        raise ValueError(
            f"composite_packed needs sigmas (N,) and rgbs (N, 3); got {tuple(sigmas.shape)} and "
            f"{tuple(rgbs.shape)}."
        )
    if t.shape != sigmas.shape or deltas.shape != sigmas.shape:
        raise ValueError(
            f"composite_packed needs t and deltas shaped like sigmas {tuple(sigmas.shape)}; got "
            f"{tuple(t.shape)} and {tuple(deltas.shape)}."
        )
    if offsets.dim() != 1 or counts.shape != offsets.shape:
        raise ValueError(
            f"offsets and counts must both have shape (R,); got {tuple(offsets.shape)} and "
            f"{tuple(counts.shape)}."
        )


def composite_packed(
    sigmas: torch.Tensor,
    rgbs: torch.Tensor,
    t: torch.Tensor,
    deltas: torch.Tensor,
    offsets: torch.Tensor,
    counts: torch.Tensor,
    background: torch.Tensor | float = 0.0,
    eps: float = EARLY_STOP_EPS,
) -> PackedComposited:
    """Volume rendering of a packed sample list with early stop (Taichi forward and backward).

    sigmas (N,) >= 0, rgbs (N, 3), t (N,), deltas (N,), offsets (R,), counts (R,) integer (ray r owns
    samples offsets[r] .. offsets[r] + counts[r] - 1, sorted by t), background (R, 3) | (3,) | float,
    eps >= 0 -> PackedComposited(color (R, 3), opacity (R,), depth (R,), weights (N,), kept (R,) int32).

    Differentiable wrt sigmas, rgbs and a tensor background; t, deltas, offsets and counts get none.
    Same maths as ``renderer.reference.composite_packed``; with eps=0 and every ray's samples a full
    row it equals ``renderer.composite``.

    Three rays: one opaque sample, two faint samples, and no sample at all (the background shows):

    >>> sig = torch.tensor([1e9, 1.0, 0.5]); rgb = torch.ones(3, 3); t = torch.tensor([2.0, 1.0, 2.0])
    >>> out = composite_packed(sig, rgb, t, torch.ones(3), torch.tensor([0, 1, 3]), torch.tensor([1, 2, 0]))
    >>> out.opacity, out.kept
    (tensor([1.0000, 0.7769, 0.0000]), tensor([1, 2, 0], dtype=torch.int32))
    """
    check_packed(sigmas, rgbs, t, deltas, offsets, counts)
    if eps < 0:
        raise ValueError(f"eps must be >= 0 (0 keeps every sample), got {eps}.")
    bg = expand_background(background, offsets.shape[0], sigmas)
    return PackedComposited(*PackedCompositeFunction.apply(sigmas, rgbs, t, deltas, offsets, counts, bg, eps))
