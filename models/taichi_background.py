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

from collections.abc import Callable, Sequence
from typing import NamedTuple

import torch
from torch import nn

from models.background import BackgroundField
from models.taichi_field import torch_buffers
from renderer.backend import to_kernel
from renderer.dense import (
    Segment,
    act_backward,
    dense_forward,
    dense_grad_input,
    dense_grad_params,
    encode_positions,
)
from renderer.device import Array


def input_segments(enc: Array, latents: Array) -> list[Segment]:
    """The first layer's input blocks in ``BackgroundField``'s concatenation order: [enc, latents].

    Shapes: enc (R, E), latents (R, L) -> segments of total width E + L (the latents are left out when
    L == 0). Example: the cpu preset with 64 latents reads [enc (27), latents (64)].
    """
    return [Segment(enc), Segment(latents)] if latents.shape[1] > 0 else [Segment(enc)]


class BackgroundActivations(NamedTuple):
    """rgb (R, 3), the encoding (R, E) and every hidden layer's output (R, W)."""

    rgb: Array
    enc: Array
    hiddens: list[Array]


def background_forward(
    params: Sequence[Array], directions: Array, latents: Array, n_frequencies: int, include_input: bool,
    buffers: Callable[[str, tuple[int, ...]], Array] = torch_buffers,
) -> BackgroundActivations:
    """The background network's forward pass on torch tensors or ``ti.ndarray``s alike.

    Shapes: params as ``TaichiBackground.parameter_list``, directions (R, 3), latents (R, L) ->
    ``BackgroundActivations``; ``buffers(name, shape)`` provides every array written.
    """
    n_rows, n_hidden = directions.shape[0], len(params) // 2 - 1
    enc_width = 3 * (2 * n_frequencies + int(include_input))
    enc = encode_positions(directions, n_frequencies, include_input,
                           out=buffers("bg_enc", (n_rows, enc_width)))
    segments = input_segments(enc, latents)
    hiddens = []
    for i in range(n_hidden):
        hidden, _ = dense_forward(segments, params[2 * i], params[2 * i + 1], "relu",
                                  out=buffers(f"bg_hidden{i}", (n_rows, params[2 * i].shape[0])))
        hiddens.append(hidden)
        segments = [Segment(hidden)]
    rgb, _ = dense_forward(segments, params[-2], params[-1], "sigmoid", out=buffers("bg_rgb", (n_rows, 3)))
    return BackgroundActivations(rgb, enc, hiddens)


def background_backward(params: Sequence[Array], acts: BackgroundActivations, latents: Array, grad_rgb: Array,
                        buffers: Callable[[str, tuple[int, ...]], Array] = torch_buffers,
                        grads: Sequence[Array] | None = None,
                        grad_latents: Array | None = None,
                        param_grads: bool = True) -> tuple[list[Array], Array | None]:
    """Parameter gradients (ADDED to ``grads`` buffers when given; skipped, None, with
    ``param_grads=False``) and the latent gradient (written to ``grad_latents`` (R, L) when given), from
    grad_rgb (R, 3)."""
    hiddens, n_rows = acts.hiddens, grad_rgb.shape[0]
    n_layers = len(hiddens) + 1
    out: list[Array | None] = [None] * len(params)
    grad_pre = act_backward("sigmoid", acts.rgb, None, grad_rgb, grad_pre=buffers("bg_g_rgb", (n_rows, 3)))
    for i in reversed(range(n_layers)):
        hidden_in = hiddens[i - 1] if i > 0 else None
        segments = [Segment(hidden_in)] if hidden_in is not None else input_segments(acts.enc, latents)
        if param_grads:
            w, b = (None, None) if grads is None else (grads[2 * i], grads[2 * i + 1])
            out[2 * i], out[2 * i + 1] = dense_grad_params(grad_pre, segments, grad_weight=w, grad_bias=b)
        if hidden_in is not None:
            grad_pre = dense_grad_input(grad_pre, params[2 * i], relu_gate=hidden_in,
                                        out=buffers(f"bg_g_hidden{i % 2}", (n_rows, hidden_in.shape[1])))
        elif grad_latents is not None and latents.shape[1] > 0:
            dense_grad_input(grad_pre, params[0], acts.enc.shape[1], latents.shape[1], out=grad_latents)
    return out, grad_latents


class TaichiBackgroundFunction(torch.autograd.Function):
    """Forward and hand-written backward of the background; ``params`` as ``TaichiBackground.parameter_list``
    (weight, bias of each hidden layer, then of the output layer)."""

    @staticmethod
    def forward(ctx, directions, latents, cfg_info, *params):
        n_frequencies, include_input = cfg_info
        out_device = latents.device
        latents_k = to_kernel(latents)
        weights = [to_kernel(p) for p in params]
        acts = background_forward(weights, to_kernel(directions), latents_k, n_frequencies, include_input)
        ctx.save_for_backward(latents_k, acts.enc, acts.rgb, *acts.hiddens, *weights)
        ctx.n_hidden = len(acts.hiddens)
        ctx.out_device = out_device
        ctx.latent_dtype = latents.dtype
        return acts.rgb.to(out_device)

    @staticmethod
    def backward(ctx, grad_rgb):
        saved = [x.detach() for x in ctx.saved_tensors]
        latents, enc, rgb = saved[:3]
        hiddens = saved[3 : 3 + ctx.n_hidden]
        weights = saved[3 + ctx.n_hidden :]
        want_latents = ctx.needs_input_grad[1] and latents.shape[1] > 0
        grad_latents = torch.empty_like(latents) if want_latents else None
        acts = BackgroundActivations(rgb, enc, list(hiddens))
        grads, grad_latents = background_backward(weights, acts, latents, to_kernel(grad_rgb),
                                                  grad_latents=grad_latents)
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
