"""Eight-float lanes: the helpers that let the x64 kernels use the CPU's vector unit.

Taichi 1.7.4's x64 code never vectorises a scalar kernel: after every store it reloads each ndarray's
data pointer (a float store might alias the argument buffer), which defeats LLVM's loop vectoriser, so
the scalar kernels run one float at a time. A value of type ``Lanes`` (``ti.types.vector(8, f32)``)
read from an ndarray of such vectors is different: with the compile option
``real_matrix_scalarize=False`` (set by ``backend`` for x64 only) it compiles to one 256-bit AVX load,
8-wide arithmetic and one store, so a kernel over such values handles 8 samples per instruction
(README, Benchmarks, compares the two kinds of kernel).

So the x64 kernels hold 8 consecutive samples of one ray per ``Lanes`` value, and these helpers do what
would otherwise be scalar: an exp by polynomial, in-vector scans (prefix products and suffix sums) and the
interleaved RGB shuffles. Taichi bugs under ``real_matrix_scalarize=False`` shape
them: unary minus on a vector and ``ti.cast`` of a vector abort inside LLVM, so negation is written
``0.0 - x`` and casts go lane by lane (LLVM's SLP vectoriser fuses them back into vector instructions);
a vector local created before a kernel's parallel loop and used inside it crashed, so kernels build
their vector constants inside the loop.

A tensor can take the lane path when its length is a multiple of 8 and its data is 32-byte aligned
(``aligned``): the vector loads and stores are aligned AVX instructions, and a misaligned address
would crash, so ``aligned`` is checked for every tensor before any lane kernel runs.
"""

import taichi as ti
import torch

from renderer.backend import started_arch

LANES = 8
Lanes = ti.types.vector(LANES, ti.f32)
lanes_1d = ti.types.ndarray(dtype=Lanes, ndim=1)
ALIGNMENT = 32  # bytes: one AVX vector

# Tests switch this off to run the scalar kernels on x64 and compare the two paths.
ENABLED = True


def lanes_active() -> bool:
    """True when the running arch compiles ``Lanes`` to vector code (x64, see ``backend``)."""
    return ENABLED and started_arch() == "cpu"


def aligned(*tensors: torch.Tensor) -> bool:
    """Every tensor is contiguous float32, a whole number of lanes long, and 32-byte aligned."""
    return all(
        x.dtype == torch.float32
        and x.is_contiguous()
        and x.numel() % LANES == 0
        and x.data_ptr() % ALIGNMENT == 0
        for x in tensors
    )


def lane_ready(x: torch.Tensor) -> torch.Tensor:
    """A contiguous tensor as it is when 32-byte aligned, else an aligned copy (a view into a larger
    tensor can start anywhere; a fresh torch CPU allocation is 64-byte aligned)."""
    return x if x.data_ptr() % ALIGNMENT == 0 else x.clone()


def as_lanes(x: torch.Tensor) -> torch.Tensor:
    """A contiguous float32 tensor viewed as (numel / 8, 8): one row per ``Lanes`` value."""
    return x.view(-1, LANES)


@ti.func
def exp_lanes(x):
    """exp(x) for x <= 0, to about 2 ulp (Cephes' expf): x = n ln2 + r, exp(r) by a degree-6
    polynomial, 2^n built in the exponent bits. Below -87.3 (where float32 exp leaves the normal range)
    it returns exactly 0, as exp does after underflow."""
    clamped = ti.max(x, -87.3)
    n = ti.floor(clamped * 1.44269504088896341 + 0.5)
    r = clamped - n * 0.693359375 - n * -2.12194440e-4
    poly = 1.9875691500e-4 * r + 1.3981999507e-3
    poly = poly * r + 8.3334519073e-3
    poly = poly * r + 4.1665795894e-2
    poly = poly * r + 1.6666665459e-1
    poly = poly * r + 5.0000001201e-1
    poly = poly * r * r + r + 1.0
    scale = ti.Vector(
        [ti.bit_cast((ti.cast(n[k], ti.i32) + 127) << 23, ti.f32) for k in ti.static(range(LANES))]
    )
    return ti.select(x < -87.3, 0.0, poly * scale)


@ti.func
def shift_up(v, by: ti.template(), fill):
    """Lanes moved ``by`` places up (towards lane 7): ``out[k] = v[k - by]``, ``fill`` below."""
    return ti.Vector(
        [v[ti.static(max(k - by, 0))] if ti.static(k >= by) else fill for k in ti.static(range(LANES))]
    )


@ti.func
def shift_down(v, by: ti.template(), fill):
    """Lanes moved ``by`` places down (towards lane 0): ``out[k] = v[k + by]``, ``fill`` above."""
    return ti.Vector(
        [
            v[ti.static(min(k + by, LANES - 1))] if ti.static(k + by < LANES) else fill
            for k in ti.static(range(LANES))
        ]
    )


@ti.func
def prefix_product(v):
    """Inclusive running product over the lanes: ``out[k] = v[0] * ... * v[k]`` (three shift steps)."""
    p = v * shift_up(v, 1, 1.0)
    p = p * shift_up(p, 2, 1.0)
    return p * shift_up(p, 4, 1.0)


@ti.func
def suffix_sum(v):
    """Inclusive running sum from the top lane down: ``out[k] = v[k] + ... + v[7]``."""
    s = v + shift_down(v, 1, 0.0)
    s = s + shift_down(s, 2, 0.0)
    return s + shift_down(s, 4, 0.0)


@ti.func
def spread_rgb(w, part: ti.template()):
    """Per-sample values repeated for each colour channel, to line up with interleaved RGB:
    part ``p`` (0, 1, 2) of 8 samples' 24 floats is ``w[(8 p + k) // 3]`` in lane k."""
    return ti.Vector([w[ti.static((part * LANES + k) // 3)] for k in ti.static(range(LANES))])


@ti.func
def rgb_pattern(r, g, b, part: ti.template()):
    """(r, g, b) repeated over 24 floats; part ``p`` is floats 8 p .. 8 p + 7 of the pattern."""
    return ti.Vector(
        [
            r
            if ti.static((part * LANES + k) % 3 == 0)
            else (g if ti.static((part * LANES + k) % 3 == 1) else b)
            for k in ti.static(range(LANES))
        ]
    )


@ti.func
def sum_rgb(p0, p1, p2):
    """Per-sample sums of interleaved (r, g, b) triples held in three lane vectors (24 floats)."""
    parts = [p0, p1, p2]
    return ti.Vector(
        [
            parts[ti.static((3 * s) // LANES)][ti.static((3 * s) % LANES)]
            + parts[ti.static((3 * s + 1) // LANES)][ti.static((3 * s + 1) % LANES)]
            + parts[ti.static((3 * s + 2) // LANES)][ti.static((3 * s + 2) % LANES)]
            for s in ti.static(range(LANES))
        ]
    )
