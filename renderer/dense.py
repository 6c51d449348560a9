"""Dense (fully connected) layers and NeRF positional encoding as Taichi kernels, on torch tensors.

Generic building blocks for an MLP whose layers read a concatenation of column blocks
(``Segment``s) without building it: the layer's weight is split into matching column blocks, so
``y = act([a, b, c] @ W^T + bias)`` reads ``a``, ``b`` and ``c`` where they lie. Nothing here knows
about any particular network (``models.taichi_field`` wires them into the LOLNeRF field).

    y = dense_forward([Segment(x)], weight, bias, "relu")            # x (N, K), weight (O, K) -> (N, O)
    dz = act_backward("relu", y, None, dy)                             # dL/d(pre-activation)
    dx = dense_grad_input(dz, weight)                                  # (N, K)
    dw, db = dense_grad_params(dz, [Segment(x)])                       # (O, K), (O,)

Activations: ``none``, ``relu``, ``softplus`` (log(1 + e^z), torch's default threshold 20) and
``sigmoid``. Backward of softplus needs the pre-activation ``z`` (``dense_forward(...,
keep_pre=True)``); relu and sigmoid need only the output.

Kernel layout, chosen for a GPU and kept simple enough to run unchanged on x64 and Vulkan:

* forward and ``dense_grad_input``: one thread per TILE x TILE block of outputs (rows x columns),
  accumulated in registers as outer products, so each step loads 2 * TILE values for TILE^2
  multiply-adds; every inner loop reads contiguous rows (of x and W forward, of W backward);
* ``dense_grad_params``: the rows are cut into blocks of ``BLOCK_ROWS``; one thread per (block,
  TILE outputs, TILE input columns of one segment, or the bias) sums its block in registers and makes
  ONE atomic add per weight, so atomics are N / BLOCK_ROWS per weight instead of N;
* tiles at the edges (N, O or a segment not a multiple of TILE) re-read the last row or column and
  skip the writes, so no shape needs padding.

``ti.simt.block.SharedArray`` would let a GPU thread block stage tiles of x and W in shared memory,
but Taichi 1.7.4's x64 backend refuses ``ti.simt.block.sync`` (a compilation error; Vulkan runs it),
so one path for both arches keeps everything in registers.
"""

from dataclasses import dataclass

import taichi as ti
import torch

from renderer.backend import kernel_device, launch
from renderer.device import Array, as_kernel_arg, dummy_like, empty_like_kind, is_device_array

f32_1d = ti.types.ndarray(dtype=ti.f32, ndim=1)
f32_2d = ti.types.ndarray(dtype=ti.f32, ndim=2)

ACTIVATIONS = {"none": 0, "relu": 1, "softplus": 2, "sigmoid": 3}
MAX_SEGMENTS = 3
# Each thread computes a TILE x TILE block of outputs in registers (the kernels take it as a template
# argument, so it can be tuned per arch); README's benchmarks/field.py section has the measured choice.
TILE = 4
BLOCK_ROWS = 128  # rows summed in registers per atomic add of the weight gradient
# dense_grad_input with ``repeat``: up to this many multiply-adds per output entry (repeat x outputs) one
# thread sums a block of rows itself; beyond it (one code shared by thousands of samples) the per-row
# gradients are summed by a block reduction. One thread's loop over a whole block of that size is slow
# on a GPU, and Mesa's lavapipe stops a loop after 65,535 iterations in all (docs/TAICHI.md).
DIRECT_REPEAT_MACS = 32768
SOFTPLUS_THRESHOLD = 20.0  # as torch.nn.functional.softplus: z above it passes through unchanged


@dataclass(frozen=True)
class Segment:
    """Columns ``start .. start + size - 1`` of a (N / repeat, C) float32 tensor: one block of a layer's
    input, whose row n is the tensor's row ``n // repeat``.

    ``size=None`` means all columns from ``start``. Example: the 16 latent values layer 1 sees,
    ``Segment(latents, 16, 16)`` for latents (N, 64); with one code per ray of S samples,
    ``Segment(codes, 16, 16, repeat=S)`` for codes (N / S, 64), and no per-sample copy is made.
    """

    tensor: Array
    start: int = 0
    size: int | None = None
    repeat: int = 1

    @property
    def width(self) -> int:
        """Number of columns this segment contributes."""
        return self.tensor.shape[1] - self.start if self.size is None else self.size


# ----------------------------------------------------------------------------------------------------
# Taichi functions and kernels


@ti.func
def _log1p(t):
    """log(1 + t) for 0 <= t <= 1, to float32 precision also for tiny t.

    Below 0.1 an alternating series to t^9 (truncation < t^10 / 10, relative 1e-9): ``log(1 + t)``
    alone loses the low bits of t when 1 + t rounds, and Goldberg's ``log(u) * t / (u - 1)`` fix is
    undone by Taichi's fast-math (it folds ``(1 + t) - 1`` back into t, which brings the rounding error
    of ``log(1 + t)`` back; docs/TAICHI.md, Code generation on x64).
    """
    result = ti.log(1.0 + t)
    if t < 0.1:
        poly = 1.0 / 9.0
        for k in ti.static(range(8, 0, -1)):
            poly = 1.0 / k - t * poly
        result = t * poly
    return result


@ti.func
def _activate(z, act):
    y = z
    if act == 1:
        y = ti.max(z, 0.0)
    elif act == 2:
        if z <= SOFTPLUS_THRESHOLD:
            y = ti.max(z, 0.0) + _log1p(ti.exp(-ti.abs(z)))
    elif act == 3:
        y = 1.0 / (1.0 + ti.exp(-z))
    return y


@ti.kernel
def _encode_kernel(points: f32_2d, out: f32_2d, n_frequencies: ti.i32, include_input: ti.i32):
    """(N, D) -> (N, D * (2F + include_input)): [x, sin(2^f x_d) at f*D + d, cos(2^f x_d) after]."""
    n_dims = points.shape[1]
    base = include_input * n_dims
    for n, d in ti.ndrange(points.shape[0], n_dims):
        x = points[n, d]
        if include_input:
            out[n, d] = x
        scale = 1.0
        for f in range(n_frequencies):
            col = base + f * n_dims + d
            out[n, col] = ti.sin(x * scale)
            out[n, col + n_frequencies * n_dims] = ti.cos(x * scale)
            scale *= 2.0


@ti.func
def _tile_rows(first, limit, tile: ti.template()):
    """tile consecutive indices from ``first``, clamped to ``limit - 1`` (tiles at the edge re-read
    the last row or column; their extra results are never written)."""
    return ti.Vector([ti.min(first + t, limit - 1) for t in ti.static(range(tile))], ti.i32)


@ti.func
def _mac_rows(
    acc, x: ti.template(), rows, x_start, weight: ti.template(), outs, w_start, length, tile: ti.template()
):
    """acc[r, t] += sum_m x[rows[r], x_start + m] * weight[outs[t], w_start + m] (both walk along rows)."""
    for m in range(length):
        xs = ti.Vector([x[rows[r], x_start + m] for r in ti.static(range(tile))])
        ws = ti.Vector([weight[outs[t], w_start + m] for t in ti.static(range(tile))])
        acc += xs.outer_product(ws)
    return acc


@ti.kernel
def _forward_kernel(
    x0: f32_2d, s0: ti.i32, k0: ti.i32, r0: ti.i32,
    x1: f32_2d, s1: ti.i32, k1: ti.i32, r1: ti.i32,
    x2: f32_2d, s2: ti.i32, k2: ti.i32, r2: ti.i32,
    weight: f32_2d, bias: f32_1d, out: f32_2d, pre: f32_2d, keep_pre: ti.i32, act: ti.i32,
    tile: ti.template(),
):  # fmt: skip
    """out[n, o] = act(bias[o] + sum over the 3 segments of x_s[n // r_s, s_s + j] * weight[o, off_s + j]).

    One thread per tile x tile block of outputs (tile rows x tile output columns).
    """
    n_rows, n_out = out.shape[0], out.shape[1]
    for tn, to in ti.ndrange((n_rows + tile - 1) // tile, (n_out + tile - 1) // tile):
        rows = _tile_rows(tn * tile, n_rows, tile)
        outs = _tile_rows(to * tile, n_out, tile)
        acc = ti.Matrix([[bias[outs[t]] for t in ti.static(range(tile))] for _ in ti.static(range(tile))])
        acc = _mac_rows(acc, x0, rows // r0, s0, weight, outs, 0, k0, tile)
        acc = _mac_rows(acc, x1, rows // r1, s1, weight, outs, k0, k1, tile)
        acc = _mac_rows(acc, x2, rows // r2, s2, weight, outs, k0 + k1, k2, tile)
        for r, t in ti.static(ti.ndrange(tile, tile)):
            n, o = tn * tile + r, to * tile + t
            if n < n_rows and o < n_out:
                if keep_pre:
                    pre[n, o] = acc[r, t]
                out[n, o] = _activate(acc[r, t], act)


@ti.kernel
def _act_backward_kernel(out: f32_2d, pre: f32_2d, grad_out: f32_2d, grad_pre: f32_2d, act: ti.i32):
    """grad_pre = grad_out * act'(z), from the output y (relu, sigmoid) or the pre-activation z (softplus)."""
    for n, o in ti.ndrange(grad_out.shape[0], grad_out.shape[1]):
        g = grad_out[n, o]
        if act == 1:
            if out[n, o] <= 0.0:
                g = 0.0
        elif act == 2:
            z = pre[n, o]
            if z <= SOFTPLUS_THRESHOLD:
                g *= 1.0 / (1.0 + ti.exp(-z))
        elif act == 3:
            y = out[n, o]
            g *= y * (1.0 - y)
        grad_pre[n, o] = g


@ti.kernel
def _grad_input_kernel(
    grad_pre: f32_2d, weight: f32_2d, w_start: ti.i32,
    out: f32_2d, out_start: ti.i32, size: ti.i32, accumulate: ti.i32, gate: f32_2d, use_gate: ti.i32,
    repeat: ti.i32, tile: ti.template(),
):  # fmt: skip
    """out[m, out_start + j] (+)= [gate[m, j] > 0] * sum over the rows n of m's block of ``repeat``
    (m * repeat .. m * repeat + repeat - 1) of sum_o grad_pre[n, o] * weight[o, w_start + j].

    One thread per tile x tile block of (output row, column); the loop over o reads a row of W each
    step. ``repeat`` > 1 sums the gradient of a segment read with ``Segment.repeat`` in the kernel.
    """
    n_rows, n_out = grad_pre.shape[0] // repeat, grad_pre.shape[1]
    for tn, tj in ti.ndrange((n_rows + tile - 1) // tile, (size + tile - 1) // tile):
        rows = _tile_rows(tn * tile, n_rows, tile)
        cols = _tile_rows(tj * tile, size, tile)
        acc = ti.Matrix.zero(ti.f32, tile, tile)
        for k in range(repeat):
            for o in range(n_out):
                gs = ti.Vector([grad_pre[rows[r] * repeat + k, o] for r in ti.static(range(tile))])
                ws = ti.Vector([weight[o, w_start + cols[t]] for t in ti.static(range(tile))])
                acc += gs.outer_product(ws)
        for r, t in ti.static(ti.ndrange(tile, tile)):
            n, j = tn * tile + r, tj * tile + t
            if n < n_rows and j < size:
                g = acc[r, t]
                if use_gate:
                    if gate[n, j] <= 0.0:
                        g = 0.0
                if accumulate:
                    g += out[n, out_start + j]
                out[n, out_start + j] = g


@ti.kernel
def _sum_row_blocks_kernel(rows: f32_2d, repeat: ti.i32, block_rows: ti.i32, out: f32_2d, out_start: ti.i32,
                           accumulate: ti.i32):  # fmt: skip
    """out[m, out_start + j] (+)= sum of rows[m * repeat .. m * repeat + repeat - 1, j]: rows (N, size).

    One thread per (output row, block of ``block_rows`` rows, column) sums its block, then one atomic add;
    the first loop (run before the second: two tasks of one launch) clears the columns unless
    ``accumulate``."""
    size = rows.shape[1]
    n_out_rows = rows.shape[0] // repeat
    if not accumulate:
        for m, j in ti.ndrange(n_out_rows, size):
            out[m, out_start + j] = 0.0
    n_blocks = (repeat + block_rows - 1) // block_rows
    for m, b, j in ti.ndrange(n_out_rows, n_blocks, size):
        first = m * repeat + b * block_rows
        last = ti.min(first + block_rows, (m + 1) * repeat)
        total = 0.0
        for n in range(first, last):
            total += rows[n, j]
        ti.atomic_add(out[m, out_start + j], total)


@ti.func
def _mac_columns(
    acc, grad_pre: ti.template(), outs, x: ti.template(), cols, first, last, repeat, tile: ti.template()
):
    """acc[r, t] += sum_{n = first}^{last - 1} grad_pre[n, outs[r]] * x[n // repeat, cols[t]]."""
    for n in range(first, last):
        row = n // repeat
        gs = ti.Vector([grad_pre[n, outs[r]] for r in ti.static(range(tile))])
        xs = ti.Vector([x[row, cols[t]] for t in ti.static(range(tile))])
        acc += gs.outer_product(xs)
    return acc


@ti.func
def _add_weight_tile(grad_weight: ti.template(), acc, to, n_out, w_col, count, tile: ti.template()):
    """Atomically add the valid part of a tile x tile tile at (to * tile, w_col)."""
    for r, t in ti.static(ti.ndrange(tile, tile)):
        o = to * tile + r
        if o < n_out and t < count:
            ti.atomic_add(grad_weight[o, w_col + t], acc[r, t])


@ti.kernel
def _grad_params_kernel(
    grad_pre: f32_2d,
    x0: f32_2d, s0: ti.i32, k0: ti.i32, r0: ti.i32,
    x1: f32_2d, s1: ti.i32, k1: ti.i32, r1: ti.i32,
    x2: f32_2d, s2: ti.i32, k2: ti.i32, r2: ti.i32,
    grad_weight: f32_2d, grad_bias: f32_1d, block_rows: ti.i32, tile: ti.template(),
):  # fmt: skip
    """grad_weight[o, c] += sum_n grad_pre[n, o] * input[n, c], grad_bias[o] += sum_n grad_pre[n, o].

    One thread per (row block, tile outputs, tile input columns of one segment, or the bias): a register
    sum over ``block_rows`` rows, then one atomic add per weight.
    """
    n_rows, n_out = grad_pre.shape[0], grad_pre.shape[1]
    n_blocks = (n_rows + block_rows - 1) // block_rows
    c0, c1, c2 = (k0 + tile - 1) // tile, (k1 + tile - 1) // tile, (k2 + tile - 1) // tile
    for blk, to, tc in ti.ndrange(n_blocks, (n_out + tile - 1) // tile, c0 + c1 + c2 + 1):
        first = blk * block_rows
        last = ti.min(first + block_rows, n_rows)
        outs = _tile_rows(to * tile, n_out, tile)
        acc = ti.Matrix.zero(ti.f32, tile, tile)
        if tc < c0:
            cols = _tile_rows(s0 + tc * tile, s0 + k0, tile)
            acc = _mac_columns(acc, grad_pre, outs, x0, cols, first, last, r0, tile)
            _add_weight_tile(grad_weight, acc, to, n_out, tc * tile, k0 - tc * tile, tile)
        elif tc < c0 + c1:
            c = tc - c0
            cols = _tile_rows(s1 + c * tile, s1 + k1, tile)
            acc = _mac_columns(acc, grad_pre, outs, x1, cols, first, last, r1, tile)
            _add_weight_tile(grad_weight, acc, to, n_out, k0 + c * tile, k1 - c * tile, tile)
        elif tc < c0 + c1 + c2:
            c = tc - c0 - c1
            cols = _tile_rows(s2 + c * tile, s2 + k2, tile)
            acc = _mac_columns(acc, grad_pre, outs, x2, cols, first, last, r2, tile)
            _add_weight_tile(grad_weight, acc, to, n_out, k0 + k1 + c * tile, k2 - c * tile, tile)
        else:
            sums = ti.Vector.zero(ti.f32, tile)
            for n in range(first, last):
                sums += ti.Vector([grad_pre[n, outs[r]] for r in ti.static(range(tile))])
            for r in ti.static(range(tile)):
                if to * tile + r < n_out:
                    ti.atomic_add(grad_bias[to * tile + r], sums[r])


# ----------------------------------------------------------------------------------------------------
# torch-facing functions


def _act_code(act: str) -> int:
    if act not in ACTIVATIONS:
        raise ValueError(f"Unknown activation {act!r}: choose one of {', '.join(ACTIVATIONS)}.")
    return ACTIVATIONS[act]


def tile_size() -> int:
    """Register tile side of the matmul kernels (``TILE``; a function so that one arch can differ)."""
    return TILE


def _dummy(like: Array | None = None) -> Array:
    """A (1, 1) placeholder for an unused array argument, of the same kind as ``like`` (a torch tensor
    beside ndarrays would be copied to the device on every launch)."""
    return dummy_like(like) if like is not None else torch.zeros((1, 1), device=kernel_device())


def _segment_args(segments: list[Segment], n_rows: int) -> list:
    """Kernel arguments (tensor, start, size) for up to MAX_SEGMENTS segments, padded with empty ones."""
    if not 1 <= len(segments) <= MAX_SEGMENTS:
        raise ValueError(f"a dense layer reads 1 to {MAX_SEGMENTS} input segments; got {len(segments)}.")
    args = []
    for seg in segments:
        x = as_kernel_arg(seg.tensor)
        if seg.repeat < 1 or len(x.shape) != 2 or x.shape[0] * seg.repeat != n_rows:
            raise ValueError(f"segment tensors must be (N / repeat = {n_rows} / {seg.repeat}, C); got "
                             f"{tuple(x.shape)}.")
        if seg.start < 0 or seg.start + seg.width > x.shape[1]:
            raise ValueError(f"segment columns {seg.start}..{seg.start + seg.width} exceed {x.shape[1]}.")
        args += [x, seg.start, seg.width, seg.repeat]
    for _ in range(MAX_SEGMENTS - len(segments)):
        args += [_dummy(segments[0].tensor), 0, 0, 1]
    return args


def encode_positions(points: Array, n_frequencies: int, include_input: bool = True,
                     out: Array | None = None) -> Array:
    """NeRF positional encoding [x, sin(2^k x), cos(2^k x)], k = 0..n_frequencies-1 (no gradient).

    Shapes: points (N, D) -> (N, D * (2 * n_frequencies + include_input)); column order as
    ``models.field.positional_encoding`` (all sines of frequency k for every dimension, then cosines).
    ``out``: a buffer to write into (a ``ti.ndarray`` on the device-resident path).

    >>> encode_positions(torch.zeros(2, 3), 4).shape
    torch.Size([2, 27])
    """
    x = as_kernel_arg(points)
    width = x.shape[1] * (2 * n_frequencies + int(include_input))
    if out is None:
        out = empty_like_kind(x, (x.shape[0], width))
    if x.shape[0] > 0:
        launch("encode_positions", _encode_kernel, x, out, n_frequencies, int(include_input))
    return out


def dense_forward(
    segments: list[Segment], weight: Array, bias: Array, act: str = "none",
    keep_pre: bool = False, out: Array | None = None, pre: Array | None = None,
) -> tuple[Array, Array | None]:  # fmt: skip
    """``act(concat(segments) @ weight.T + bias)`` without building the concatenation.

    Shapes: segments of total width K (each (N, C_s)), weight (O, K), bias (O,) -> (y (N, O), z) where
    z is the pre-activation (N, O) when ``keep_pre`` (needed by ``act_backward`` for softplus), else None.
    ``out`` and ``pre``: buffers to write into instead of new tensors (every argument may be a
    ``ti.ndarray``, for the device-resident path).

    >>> y, _ = dense_forward([Segment(torch.ones(2, 3))], torch.ones(4, 3), torch.zeros(4), "relu")
    >>> y
    tensor([[3., 3., 3., 3.],
            [3., 3., 3., 3.]])
    """
    code = _act_code(act)
    weight_k, bias_k = as_kernel_arg(weight), as_kernel_arg(bias)
    n_rows = segments[0].tensor.shape[0] * segments[0].repeat
    if sum(s.width for s in segments) != weight_k.shape[1]:
        raise ValueError(
            f"segments give {sum(s.width for s in segments)} columns; weight has {weight_k.shape[1]}."
        )
    args = _segment_args(segments, n_rows)
    shape = (n_rows, weight_k.shape[0])
    if out is None:
        out = empty_like_kind(weight_k, shape)
    if keep_pre and pre is None:
        pre = empty_like_kind(weight_k, shape)
    pre_arg = pre if keep_pre else _dummy(weight_k)
    if n_rows > 0 and shape[1] > 0:
        launch(
            "dense_forward", _forward_kernel,
            *args, weight_k, bias_k, out, pre_arg, int(keep_pre), code, tile_size(),
        )  # fmt: skip
    return out, (pre if keep_pre else None)


def act_backward(
    act: str, out: Array, pre: Array | None, grad_out: Array, grad_pre: Array | None = None
) -> Array:
    """Gradient wrt the pre-activation: ``grad_out * act'(z)``.

    Shapes: out (N, O) (the layer's output), pre (N, O) (needed for softplus, else may be None),
    grad_out (N, O) -> (N, O), written into ``grad_pre`` when given.

    >>> act_backward("relu", torch.tensor([[0.0, 2.0]]), None, torch.tensor([[5.0, 5.0]]))
    tensor([[0., 5.]])
    """
    code = _act_code(act)
    if code == 2 and pre is None:
        raise ValueError("act_backward('softplus') needs the pre-activation (dense_forward keep_pre=True).")
    out_k, grad_k = as_kernel_arg(out), as_kernel_arg(grad_out)
    pre_k = as_kernel_arg(pre) if pre is not None else _dummy(grad_k)
    if grad_pre is None:
        grad_pre = empty_like_kind(grad_k, tuple(grad_k.shape))
    if grad_k.shape[0] > 0:
        launch("dense_act_backward", _act_backward_kernel, out_k, pre_k, grad_k, grad_pre, code)
    return grad_pre


def dense_grad_input(
    grad_pre: Array, weight: Array, w_start: int = 0, size: int | None = None,
    out: Array | None = None, out_start: int = 0, accumulate: bool = False,
    relu_gate: Array | None = None, repeat: int = 1,
) -> Array:  # fmt: skip
    """Gradient wrt one input segment: ``grad_pre @ weight[:, w_start : w_start + size]``.

    Shapes: grad_pre (N, O), weight (O, K) -> (N, size) written into ``out[:, out_start:]`` (a new
    (N, size) tensor when ``out`` is None), added to what is there when ``accumulate``. ``relu_gate``
    (N, size) zeroes entries where it is <= 0: pass the ReLU output that fed this segment, and the
    result is already the gradient wrt that ReLU's pre-activation. ``repeat`` > 1: the gradient of a
    ``Segment(..., repeat=repeat)``, summed over each block of ``repeat`` rows -> (N / repeat, size).

    >>> dense_grad_input(torch.ones(1, 2), torch.tensor([[1.0, 2.0], [3.0, 4.0]]))
    tensor([[4., 6.]])
    """
    grad_k, weight_k = as_kernel_arg(grad_pre), as_kernel_arg(weight)
    size = weight_k.shape[1] - w_start if size is None else size
    if repeat < 1 or grad_k.shape[0] % repeat:
        raise ValueError(f"repeat {repeat} must be at least 1 and divide the {grad_k.shape[0]} rows.")
    if out is None:
        out = empty_like_kind(grad_k, (grad_k.shape[0] // repeat, size))
        out_start, accumulate = 0, False
    gate = as_kernel_arg(relu_gate) if relu_gate is not None else _dummy(grad_k)
    if grad_k.shape[0] == 0 or size == 0:
        return out
    if repeat > 1 and relu_gate is None and repeat * grad_k.shape[1] > DIRECT_REPEAT_MACS:
        # Per-row gradients first, then a block reduction over each code's rows (see DIRECT_REPEAT_MACS).
        rows = empty_like_kind(grad_k, (grad_k.shape[0], size))
        launch("dense_grad_input", _grad_input_kernel, grad_k, weight_k, w_start, rows, 0, size, 0, gate, 0,
               1, tile_size())  # fmt: skip
        launch("sum_row_blocks", _sum_row_blocks_kernel, rows, repeat, BLOCK_ROWS, out, out_start,
               int(accumulate))  # fmt: skip
        return out
    launch(
        "dense_grad_input", _grad_input_kernel,
        grad_k, weight_k, w_start, out, out_start, size, int(accumulate),
        gate, int(relu_gate is not None), repeat, tile_size(),
    )  # fmt: skip
    return out


def dense_grad_params(
    grad_pre: Array, segments: list[Segment], block_rows: int = BLOCK_ROWS,
    grad_weight: Array | None = None, grad_bias: Array | None = None,
) -> tuple[Array, Array]:  # fmt: skip
    """Weight and bias gradients: ``grad_pre.T @ concat(segments)`` and ``grad_pre.sum(0)``.

    Shapes: grad_pre (N, O), segments of total width K -> (dW (O, K), db (O,)). Given ``grad_weight``
    and ``grad_bias`` buffers, the gradients are ADDED to what they hold (the kernel accumulates with
    atomics), so one buffer can collect several evaluations of a layer (coarse and fine samples).

    >>> dw, db = dense_grad_params(torch.ones(3, 1), [Segment(torch.ones(3, 2))])
    >>> dw, db
    (tensor([[3., 3.]]), tensor([3.]))
    """
    grad_k = as_kernel_arg(grad_pre)
    n_rows, n_out = grad_k.shape
    args = _segment_args(segments, n_rows)
    k_total = sum(s.width for s in segments)
    if (grad_weight is None) != (grad_bias is None):
        raise ValueError("dense_grad_params takes both grad_weight and grad_bias buffers, or neither.")
    if grad_weight is None and is_device_array(grad_k):
        grad_weight, grad_bias = empty_like_kind(grad_k, (n_out, k_total)), empty_like_kind(grad_k, (n_out,))
        grad_weight.fill(0)
        grad_bias.fill(0)
    elif grad_weight is None:
        grad_weight = torch.zeros((n_out, k_total), device=grad_k.device)
        grad_bias = torch.zeros((n_out,), device=grad_k.device)
    elif tuple(grad_weight.shape) != (n_out, k_total) or tuple(grad_bias.shape) != (n_out,):
        raise ValueError(f"gradient buffers must be ({n_out}, {k_total}) and ({n_out},); got "
                         f"{tuple(grad_weight.shape)} and {tuple(grad_bias.shape)}.")
    if n_rows > 0 and n_out > 0:
        launch(
            "dense_grad_params", _grad_params_kernel,
            grad_k, *args, grad_weight, grad_bias, block_rows, tile_size(),
        )  # fmt: skip
    return grad_weight, grad_bias


def dense_backward(
    x: torch.Tensor, weight: torch.Tensor, out: torch.Tensor, grad_out: torch.Tensor, act: str = "none",
    pre: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:  # fmt: skip
    """Backward of ``y = act(x @ weight.T + b)`` for one plain input: (dx (N, K), dW (O, K), db (O,)).

    Shapes: x (N, K), weight (O, K), out y (N, O), grad_out (N, O); ``pre`` (N, O) for softplus.

    >>> x, w = torch.ones(2, 3), torch.ones(1, 3)
    >>> y, _ = dense_forward([Segment(x)], w, torch.zeros(1))
    >>> [t.shape for t in dense_backward(x, w, y, torch.ones(2, 1))]
    [torch.Size([2, 3]), torch.Size([1, 3]), torch.Size([1])]
    """
    grad_pre = act_backward(act, out, pre, grad_out)
    grad_x = dense_grad_input(grad_pre, weight)
    grad_weight, grad_bias = dense_grad_params(grad_pre, [Segment(x)])
    return grad_x, grad_weight, grad_bias
