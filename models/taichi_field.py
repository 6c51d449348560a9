"""The conditioned field evaluated by Taichi kernels (``renderer.dense``), with a hand-written backward.

Drop-in for :class:`models.field.ConditionedField`: the same parameters under the same names
(``layers.{i}.weight/bias``, ``density_head``, ``color_head``), so state dicts load either way::

    field = TaichiField(FieldConfig.cpu(), latent_dim=64)
    field.load_state_dict(ConditionedField(FieldConfig.cpu(), 64).state_dict())
    sigma, rgb = field(points, latents)   # points (N, 3), latents (N, L) -> sigma (N,), rgb (N, 3)

Layer i reads [hidden_{i-1}, latent chunk i, encoded xyz] as three column blocks of its input
(``renderer.dense.Segment``): the concatenation is never built, the latent chunk is read in place
from the latents tensor, and each layer's weight is used as column blocks. The backward pass is
written out (``TaichiFieldFunction``): gradients for every weight and bias and for the latents
(chunk columns written per layer in ``chunks`` mode, summed over layers in ``whole`` mode); none for
the points. The ReLU derivative is folded into the kernel that propagates the gradient to the hidden
input, so no separate mask pass runs. Computation is float32, like the torch field.
"""

from __future__ import annotations

import torch
from torch import nn

from models.field import FieldConfig, encoded_size, latent_chunk_sizes
from renderer.backend import kernel_device, to_kernel
from renderer.dense import (
    Segment,
    act_backward,
    dense_forward,
    dense_grad_input,
    dense_grad_params,
    encode_positions,
)


def chunk_offsets(chunk_sizes: list[int], mode: str) -> list[int]:
    """First latent column each layer reads.

    Example: ``chunk_offsets([16, 16, 16, 16], "chunks") == [0, 16, 32, 48]``; ``"whole"`` gives zeros.
    """
    if mode == "whole":
        return [0] * len(chunk_sizes)
    offsets, start = [], 0
    for size in chunk_sizes:
        offsets.append(start)
        start += size
    return offsets


def layer_segments(hidden: torch.Tensor | None, latents: torch.Tensor, start: int, size: int,
                   enc: torch.Tensor) -> list[Segment]:
    """The input blocks of one layer, in ``ConditionedField``'s concatenation order.

    Shapes: hidden (N, W) or None (first layer), latents (N, L), enc (N, E) -> segments of total
    width W + size + E (or size + E). Example: layer 1 of the cpu preset reads
    [hidden (64), latents[:, 16:32], enc (27)].
    """
    segments = [] if hidden is None else [Segment(hidden)]
    return [*segments, Segment(latents, start, size), Segment(enc)]


class TaichiFieldFunction(torch.autograd.Function):
    """Forward and hand-written backward of the field; ``params`` as ``TaichiField.parameter_list``."""

    @staticmethod
    def forward(ctx, points, latents, cfg_info, *params):
        n_frequencies, include_input, offsets, sizes, _ = cfg_info
        out_device = latents.device
        latents_k = to_kernel(latents)
        weights = [to_kernel(p) for p in params]
        enc = encode_positions(to_kernel(points), n_frequencies, include_input)
        hiddens = []
        hidden = None
        for i, (start, size) in enumerate(zip(offsets, sizes, strict=True)):
            segments = layer_segments(hidden, latents_k, start, size, enc)
            hidden, _ = dense_forward(segments, weights[2 * i], weights[2 * i + 1], "relu")
            hiddens.append(hidden)
        d = 2 * len(sizes)
        sigma, sigma_pre = dense_forward([Segment(hidden)], weights[d], weights[d + 1], "softplus", True)
        rgb, _ = dense_forward([Segment(hidden)], weights[d + 2], weights[d + 3], "sigmoid")
        ctx.save_for_backward(latents_k, enc, sigma, sigma_pre, rgb, *hiddens, *weights)
        ctx.cfg_info = cfg_info
        ctx.n_hidden = len(hiddens)
        ctx.out_device = out_device
        ctx.latent_dtype = latents.dtype
        return sigma.view(-1).to(out_device), rgb.to(out_device)

    @staticmethod
    def backward(ctx, grad_sigma, grad_rgb):
        _, _, offsets, sizes, mode = ctx.cfg_info
        saved = [x.detach() for x in ctx.saved_tensors]
        latents, enc, sigma, sigma_pre, rgb = saved[:5]
        hiddens = saved[5 : 5 + ctx.n_hidden]
        weights = saved[5 + ctx.n_hidden :]
        n_rows, device = latents.shape[0], kernel_device()
        if grad_sigma is None:
            grad_sigma = torch.zeros(n_rows, device=device)
        if grad_rgb is None:
            grad_rgb = torch.zeros(n_rows, 3, device=device)
        d = 2 * ctx.n_hidden
        last = hiddens[-1]

        # Heads: softplus (from its pre-activation) and sigmoid (from its output).
        g_sigma = act_backward("softplus", sigma, sigma_pre, to_kernel(grad_sigma).view(-1, 1))
        g_rgb = act_backward("sigmoid", rgb, None, to_kernel(grad_rgb))
        grads: list[torch.Tensor | None] = [None] * len(weights)
        grads[d], grads[d + 1] = dense_grad_params(g_sigma, [Segment(last)])
        grads[d + 2], grads[d + 3] = dense_grad_params(g_rgb, [Segment(last)])
        grad_pre = dense_grad_input(g_sigma, weights[d], relu_gate=last)
        dense_grad_input(g_rgb, weights[d + 2], out=grad_pre, accumulate=True, relu_gate=last)

        want_latents = ctx.needs_input_grad[1]
        grad_latents = torch.empty_like(latents) if want_latents else None
        width = last.shape[1]
        for i in reversed(range(ctx.n_hidden)):
            hidden_in = hiddens[i - 1] if i > 0 else None
            start, size = offsets[i], sizes[i]
            segments = layer_segments(hidden_in, latents, start, size, enc)
            grads[2 * i], grads[2 * i + 1] = dense_grad_params(grad_pre, segments)
            hidden_width = 0 if hidden_in is None else width
            if want_latents:
                accumulate = mode == "whole" and i != ctx.n_hidden - 1
                dense_grad_input(grad_pre, weights[2 * i], hidden_width, size, out=grad_latents,
                                 out_start=start, accumulate=accumulate)
            if hidden_in is not None:
                grad_pre = dense_grad_input(grad_pre, weights[2 * i], 0, width, relu_gate=hidden_in)
        out = ctx.out_device
        grad_params = [g.to(out) for g in grads]
        grad_latents = grad_latents.to(out, ctx.latent_dtype) if want_latents else None
        return None, grad_latents, None, *grad_params


class TaichiField(nn.Module):
    """Latent-conditioned density + colour MLP run as Taichi kernels; parameters as ``ConditionedField``.

    Shapes: points (N, 3), latents (N, L) -> sigma (N,) >= 0, rgb (N, 3) in (0, 1).
    """

    def __init__(self, cfg: FieldConfig, latent_dim: int):
        super().__init__()
        self.cfg = cfg
        self.latent_dim = latent_dim
        self.chunk_sizes = latent_chunk_sizes(latent_dim, cfg.depth, cfg.latent_mode)
        self.chunk_offsets = chunk_offsets(self.chunk_sizes, cfg.latent_mode)
        enc = encoded_size(3, cfg.n_frequencies, cfg.include_input)
        self.layers = nn.ModuleList()
        for i, chunk in enumerate(self.chunk_sizes):
            hidden_in = 0 if i == 0 else cfg.width
            self.layers.append(nn.Linear(hidden_in + chunk + enc, cfg.width))
        self.density_head = nn.Linear(cfg.width, 1)
        self.color_head = nn.Linear(cfg.width, 3)

    def parameter_list(self) -> list[nn.Parameter]:
        """Weights and biases in the order the autograd function takes them: layers, density, colour."""
        params = []
        for layer in [*self.layers, self.density_head, self.color_head]:
            params += [layer.weight, layer.bias]
        return params

    def forward(self, points: torch.Tensor, latents: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Evaluate the field with Taichi kernels.

        Shapes: points (N, 3), latents (N, L) -> (sigma (N,) >= 0, rgb (N, 3) in (0, 1)); or, as
        ``ConditionedField``, points (R, S, 3) with one code per ray, latents (R, L) -> (R, S), (R, S, 3)
        (the kernels read one latent row per sample, so here the codes are expanded per sample).
        """
        if latents.shape[-1] != self.latent_dim:
            raise ValueError(f"latents have {latents.shape[-1]} values per row; this field expects "
                             f"{self.latent_dim}.")
        if points.dim() == 3 and latents.dim() == 2 and points.shape[0] == latents.shape[0]:
            n_rays, n_samples, _ = points.shape
            codes = latents[:, None, :].expand(n_rays, n_samples, -1).reshape(n_rays * n_samples, -1)
            sigma, rgb = self(points.reshape(-1, 3), codes)
            return sigma.view(n_rays, n_samples), rgb.view(n_rays, n_samples, 3)
        if points.shape[:-1] != latents.shape[:-1] or points.shape[-1] != 3 or points.dim() != 2:
            raise ValueError(f"TaichiField needs points (N, 3) and latents (N, L); got "
                             f"{tuple(points.shape)} and {tuple(latents.shape)}.")
        cfg_info = (self.cfg.n_frequencies, self.cfg.include_input, tuple(self.chunk_offsets),
                    tuple(self.chunk_sizes), self.cfg.latent_mode)
        return TaichiFieldFunction.apply(points, latents, cfg_info, *self.parameter_list())
