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

from collections.abc import Callable, Sequence
from typing import NamedTuple

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
from renderer.device import Array


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


def layer_segments(hidden: Array | None, latents: Array, start: int, size: int, enc: Array,
                   repeat: int = 1) -> list[Segment]:
    """The input blocks of one layer, in ``ConditionedField``'s concatenation order.

    Shapes: hidden (N, W) or None (first layer), latents (N / repeat, L) (one code per ``repeat``
    consecutive rows: a ray's samples), enc (N, E) -> segments of total width W + size + E (or
    size + E). Example: layer 1 of the cpu preset reads [hidden (64), latents[:, 16:32], enc (27)].
    """
    segments = [] if hidden is None else [Segment(hidden)]
    return [*segments, Segment(latents, start, size, repeat), Segment(enc)]


class FieldSpec(NamedTuple):
    """What the kernels need to know of a field's configuration (hashable, for autograd's ctx)."""

    n_frequencies: int
    include_input: bool
    offsets: tuple[int, ...]  # first latent column each layer reads
    sizes: tuple[int, ...]  # latent columns each layer reads
    mode: str  # "chunks" | "whole"


class FieldActivations(NamedTuple):
    """Outputs and what the backward pass reads: sigma (N, 1), rgb (N, 3), its pre-softplus (N, 1),
    the encoding (N, E) and every hidden layer's output (N, W)."""

    sigma: Array
    rgb: Array
    sigma_pre: Array
    enc: Array
    hiddens: list[Array]


def torch_buffers(name: str, shape: tuple[int, ...]) -> torch.Tensor:
    """Allocator for the torch-tensor path: a new float32 tensor on the kernels' device (name unused)."""
    return torch.empty(shape, device=kernel_device())


def field_forward(params: Sequence[Array], points: Array, latents: Array, spec: FieldSpec,
                  buffers: Callable[[str, tuple[int, ...]], Array] = torch_buffers,
                  repeat: int = 1) -> FieldActivations:
    """The field's forward pass on torch tensors or ``ti.ndarray``s alike.

    Shapes: params as ``TaichiField.parameter_list`` (weight (O, K), bias (O,) per layer, then the
    density and colour heads), points (N, 3), latents (N / repeat, L): row n of the points reads code
    n // repeat (a ray's samples share its code, never copied) -> ``FieldActivations``. ``buffers(name,
    shape)`` provides every array written (a ``renderer.device.Workspace``'s ``get`` keeps them on the
    device between steps).
    """
    n_rows = points.shape[0]
    enc_width = 3 * (2 * spec.n_frequencies + int(spec.include_input))
    enc = encode_positions(points, spec.n_frequencies, spec.include_input,
                           out=buffers("enc", (n_rows, enc_width)))
    hiddens, hidden = [], None
    for i, (start, size) in enumerate(zip(spec.offsets, spec.sizes, strict=True)):
        weight, bias = params[2 * i], params[2 * i + 1]
        segments = layer_segments(hidden, latents, start, size, enc, repeat)
        hidden, _ = dense_forward(segments, weight, bias, "relu",
                                  out=buffers(f"hidden{i}", (n_rows, weight.shape[0])))
        hiddens.append(hidden)
    d = 2 * len(spec.sizes)
    sigma, sigma_pre = dense_forward([Segment(hidden)], params[d], params[d + 1], "softplus", True,
                                     out=buffers("sigma", (n_rows, 1)), pre=buffers("sigma_pre", (n_rows, 1)))
    rgb, _ = dense_forward([Segment(hidden)], params[d + 2], params[d + 3], "sigmoid",
                           out=buffers("rgb", (n_rows, 3)))
    return FieldActivations(sigma, rgb, sigma_pre, enc, hiddens)


def field_backward(params: Sequence[Array], acts: FieldActivations, latents: Array, grad_sigma: Array,
                   grad_rgb: Array, spec: FieldSpec,
                   buffers: Callable[[str, tuple[int, ...]], Array] = torch_buffers,
                   grads: Sequence[Array] | None = None, grad_latents: Array | None = None,
                   repeat: int = 1, param_grads: bool = True) -> tuple[list[Array], Array | None]:
    """Gradients of every parameter and of the latents, from grad_sigma (N, 1) and grad_rgb (N, 3).

    ``grads``: buffers shaped like ``params`` that the parameter gradients are ADDED to (None: new
    zero-initialised tensors). ``grad_latents`` (N / repeat, L): a buffer the latent gradient is written
    to, summed over each code's rows (None: no latent gradient). ``param_grads=False`` skips the
    parameter gradients (a frozen network: fitting a latent), which are then None. Returns (parameter
    gradients, grad_latents).
    """
    hiddens = acts.hiddens
    n_rows, n_hidden = acts.enc.shape[0], len(hiddens)
    d = 2 * n_hidden
    last = hiddens[-1]
    width = last.shape[1]

    def add_param_grads(k: int, g_pre: Array, segments: list[Segment]) -> None:
        if not param_grads:
            return
        w, b = (None, None) if grads is None else (grads[k], grads[k + 1])
        out[k], out[k + 1] = dense_grad_params(g_pre, segments, grad_weight=w, grad_bias=b)

    out: list[Array | None] = [None] * len(params)
    # Heads: softplus (from its pre-activation) and sigmoid (from its output).
    g_sigma = act_backward("softplus", acts.sigma, acts.sigma_pre, grad_sigma,
                           grad_pre=buffers("g_sigma", (n_rows, 1)))
    g_rgb = act_backward("sigmoid", acts.rgb, None, grad_rgb, grad_pre=buffers("g_rgb", (n_rows, 3)))
    add_param_grads(d, g_sigma, [Segment(last)])
    add_param_grads(d + 2, g_rgb, [Segment(last)])
    grad_pre = dense_grad_input(g_sigma, params[d], relu_gate=last, out=buffers("g_hidden0", (n_rows, width)))
    dense_grad_input(g_rgb, params[d + 2], out=grad_pre, accumulate=True, relu_gate=last)
    for i in reversed(range(n_hidden)):
        hidden_in = hiddens[i - 1] if i > 0 else None
        start, size = spec.offsets[i], spec.sizes[i]
        add_param_grads(2 * i, grad_pre, layer_segments(hidden_in, latents, start, size, acts.enc, repeat))
        hidden_width = 0 if hidden_in is None else width
        if grad_latents is not None:
            accumulate = spec.mode == "whole" and i != n_hidden - 1
            dense_grad_input(grad_pre, params[2 * i], hidden_width, size, out=grad_latents, out_start=start,
                             accumulate=accumulate, repeat=repeat)
        if hidden_in is not None:  # two buffers in turn: the next layer's gradient never overwrites its input
            grad_pre = dense_grad_input(grad_pre, params[2 * i], 0, width, relu_gate=hidden_in,
                                        out=buffers(f"g_hidden{(n_hidden - i) % 2}", (n_rows, width)))
    return out, grad_latents


class TaichiFieldFunction(torch.autograd.Function):
    """Forward and hand-written backward of the field; ``params`` as ``TaichiField.parameter_list``."""

    @staticmethod
    def forward(ctx, points, latents, spec, repeat, *params):
        out_device = latents.device
        latents_k = to_kernel(latents)
        weights = [to_kernel(p) for p in params]
        acts = field_forward(weights, to_kernel(points), latents_k, spec, repeat=repeat)
        ctx.save_for_backward(latents_k, acts.enc, acts.sigma, acts.sigma_pre, acts.rgb, *acts.hiddens,
                              *weights)
        ctx.spec, ctx.repeat = spec, repeat
        ctx.n_hidden = len(acts.hiddens)
        ctx.out_device = out_device
        ctx.latent_dtype = latents.dtype
        return acts.sigma.view(-1).to(out_device), acts.rgb.to(out_device)

    @staticmethod
    def backward(ctx, grad_sigma, grad_rgb):
        saved = [x.detach() for x in ctx.saved_tensors]
        latents, enc, sigma, sigma_pre, rgb = saved[:5]
        hiddens = saved[5 : 5 + ctx.n_hidden]
        weights = saved[5 + ctx.n_hidden :]
        n_rows, device = enc.shape[0], kernel_device()
        grad_sigma = torch.zeros(n_rows, 1, device=device) if grad_sigma is None else to_kernel(grad_sigma)
        grad_rgb = torch.zeros(n_rows, 3, device=device) if grad_rgb is None else to_kernel(grad_rgb)
        acts = FieldActivations(sigma, rgb, sigma_pre, enc, list(hiddens))
        want_latents = ctx.needs_input_grad[1]
        grad_latents = torch.empty_like(latents) if want_latents else None
        grads, grad_latents = field_backward(weights, acts, latents, grad_sigma.view(-1, 1),
                                             grad_rgb.view(-1, 3), ctx.spec, grad_latents=grad_latents,
                                             repeat=ctx.repeat)
        out = ctx.out_device
        grad_params = [g.to(out) for g in grads]
        grad_latents = grad_latents.to(out, ctx.latent_dtype) if want_latents else None
        return None, grad_latents, None, None, *grad_params


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
        (each sample's kernel thread reads its ray's code: ``Segment.repeat``, no per-sample copy).
        """
        if latents.shape[-1] != self.latent_dim:
            raise ValueError(f"latents have {latents.shape[-1]} values per row; this field expects "
                             f"{self.latent_dim}.")
        if points.dim() == 3 and latents.dim() == 2 and points.shape[0] == latents.shape[0]:
            n_rays, n_samples, _ = points.shape
            if n_samples == 0:
                return points.new_zeros(n_rays, 0), points.new_zeros(n_rays, 0, 3)
            sigma, rgb = TaichiFieldFunction.apply(points.reshape(-1, 3), latents, self.spec(), n_samples,
                                                   *self.parameter_list())
            return sigma.view(n_rays, n_samples), rgb.view(n_rays, n_samples, 3)
        if points.shape[:-1] != latents.shape[:-1] or points.shape[-1] != 3 or points.dim() != 2:
            raise ValueError(f"TaichiField needs points (N, 3) and latents (N, L); got "
                             f"{tuple(points.shape)} and {tuple(latents.shape)}.")
        return TaichiFieldFunction.apply(points, latents, self.spec(), 1, *self.parameter_list())

    def spec(self) -> FieldSpec:
        """The configuration the kernels read (``field_forward`` / ``field_backward``)."""
        return FieldSpec(self.cfg.n_frequencies, self.cfg.include_input, tuple(self.chunk_offsets),
                         tuple(self.chunk_sizes), self.cfg.latent_mode)
