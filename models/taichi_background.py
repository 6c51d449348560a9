"""The background network evaluated by Taichi kernels (``renderer.dense``), with a hand-written backward.

Drop-in for :class:`models.background.BackgroundField` (and a subclass of it, so code that asks
``isinstance(bg, BackgroundField)``, such as ``models.checkpoint.model_description``, still records the
network's shape): the same parameters under the same names (``mlp.{0, 2, ..., 2 * depth}.weight/bias``),
so state dicts load either way::

    bg = TaichiBackground(BackgroundConfig.cpu(), latent_dim=64)
    bg.load_state_dict(BackgroundField(BackgroundConfig.cpu(), 64).state_dict())
    rgb = bg(directions, latents)   # directions (R, 3), latents (R, L) -> rgb (R, 3) in (0, 1)

The first layer reads [encoded direction, latents] as two column blocks of its input
(``renderer.dense.Segment``), so the concatenation is never built; the hidden layers are ReLU and the
output a sigmoid, as ``BackgroundField``. The backward pass is written out
(``TaichiBackgroundFunction``): gradients for every weight and bias and for the latents; none for the
directions. The ReLU derivative is folded into the kernel that propagates the gradient to the previous
hidden layer. Computation is float32, like the torch network.
"""

from __future__ import annotations

import torch
from torch import nn

from models.background import BackgroundField
from renderer.backend import to_kernel
from renderer.dense import (
    Segment,
    act_backward,
    dense_forward,
    dense_grad_input,
    dense_grad_params,
    encode_positions,
)


def input_segments(enc: torch.Tensor, latents: torch.Tensor) -> list[Segment]:
    """The first layer's input blocks in ``BackgroundField``'s concatenation order: [enc, latents].

    Shapes: enc (R, E), latents (R, L) -> segments of total width E + L (the latents are left out when
    L == 0). Example: the cpu preset with 64 latents reads [enc (27), latents (64)].
    """
    return [Segment(enc), Segment(latents)] if latents.shape[1] > 0 else [Segment(enc)]


class TaichiBackgroundFunction(torch.autograd.Function):
    """Forward and hand-written backward of the background; ``params`` as ``TaichiBackground.parameter_list``
    (weight, bias of each hidden layer, then of the output layer)."""

    @staticmethod
    def forward(ctx, directions, latents, cfg_info, *params):
        n_frequencies, include_input = cfg_info
        out_device = latents.device
        latents_k = to_kernel(latents)
        weights = [to_kernel(p) for p in params]
        n_hidden = len(weights) // 2 - 1
        enc = encode_positions(to_kernel(directions), n_frequencies, include_input)
        segments = input_segments(enc, latents_k)
        hiddens = []
        for i in range(n_hidden):
            hidden, _ = dense_forward(segments, weights[2 * i], weights[2 * i + 1], "relu")
            hiddens.append(hidden)
            segments = [Segment(hidden)]
        rgb, _ = dense_forward(segments, weights[-2], weights[-1], "sigmoid")
        ctx.save_for_backward(latents_k, enc, rgb, *hiddens, *weights)
        ctx.n_hidden = n_hidden
        ctx.out_device = out_device
        ctx.latent_dtype = latents.dtype
        return rgb.to(out_device)

    @staticmethod
    def backward(ctx, grad_rgb):
        saved = [x.detach() for x in ctx.saved_tensors]
        latents, enc, rgb = saved[:3]
        hiddens = saved[3 : 3 + ctx.n_hidden]
        weights = saved[3 + ctx.n_hidden :]
        n_layers = ctx.n_hidden + 1
        grads: list[torch.Tensor | None] = [None] * len(weights)
        grad_pre = act_backward("sigmoid", rgb, None, to_kernel(grad_rgb))
        want_latents = ctx.needs_input_grad[1]
        grad_latents = None
        for i in reversed(range(n_layers)):
            hidden_in = hiddens[i - 1] if i > 0 else None
            segments = [Segment(hidden_in)] if hidden_in is not None else input_segments(enc, latents)
            grads[2 * i], grads[2 * i + 1] = dense_grad_params(grad_pre, segments)
            if hidden_in is not None:
                grad_pre = dense_grad_input(grad_pre, weights[2 * i], relu_gate=hidden_in)
            elif want_latents:
                grad_latents = dense_grad_input(grad_pre, weights[0], enc.shape[1], latents.shape[1])
        out = ctx.out_device
        grad_params = [g.to(out) for g in grads]
        if grad_latents is not None:
            grad_latents = grad_latents.to(out, ctx.latent_dtype)
        return None, grad_latents, None, *grad_params


class TaichiBackground(BackgroundField):
    """Background MLP (encoded direction, latent) -> sigmoid RGB, run as Taichi kernels.

    Parameters and ``state_dict`` as ``BackgroundField`` (it builds the same ``mlp`` and never calls it).
    Shapes: directions (R, 3), latents (R, L) -> (R, 3) in (0, 1).
    """

    def parameter_list(self) -> list[nn.Parameter]:
        """Weights and biases in the order the autograd function takes them: hidden layers, then output."""
        params = []
        for layer in self.mlp:
            if isinstance(layer, nn.Linear):
                params += [layer.weight, layer.bias]
        return params

    def forward(self, directions: torch.Tensor, latents: torch.Tensor) -> torch.Tensor:
        """Colour seen along each ray direction, with Taichi kernels: (R, 3), (R, L) -> (R, 3)."""
        if directions.dim() != 2 or directions.shape[1] != 3 or latents.dim() != 2 \
                or latents.shape[0] != directions.shape[0] or latents.shape[1] != self.latent_dim:
            raise ValueError(f"TaichiBackground needs directions (R, 3) and latents (R, {self.latent_dim}); "
                             f"got {tuple(directions.shape)} and {tuple(latents.shape)}.")
        cfg_info = (self.cfg.n_frequencies, self.cfg.include_input)
        return TaichiBackgroundFunction.apply(directions, latents, cfg_info, *self.parameter_list())
