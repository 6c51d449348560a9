"""Optimiser updates as Taichi kernels, for parameters that live on the device (``ti.ndarray``s).

The same arithmetic as torch's single-tensor ``torch.optim.Adam`` and ``torch.optim.SGD`` (momentum,
no dampening, no Nesterov, no weight decay), in float32, so a run can hand its state to a torch
optimiser (and back) at a checkpoint and continue::

    m = m + (1 - beta1) (g - m)              v = beta2 v + (1 - beta2) g^2
    p = p - lr / (1 - beta1^t) * m / (sqrt(v) / sqrt(1 - beta2^t) + eps)         (Adam, step t >= 1)
    b = momentum b + g,   p = p - lr b                                           (SGD with momentum)

The bias corrections depend only on the step count, so the host computes them once per step and
passes scalars. Each kernel takes a 1-D or 2-D parameter (biases, weights and the latent table)::

    adam_update(param, grad, m, v, lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8, step=1)
"""

import math

import taichi as ti

from renderer.backend import launch
from renderer.device import Array

f32_1d = ti.types.ndarray(dtype=ti.f32, ndim=1)
f32_2d = ti.types.ndarray(dtype=ti.f32, ndim=2)


@ti.func
def _adam(p, g, m, v, step_size, beta1, beta2, sqrt_bc2, eps):
    """One element of torch's Adam: -> (p, m, v) updated."""
    m = m + (1.0 - beta1) * (g - m)
    v = beta2 * v + (1.0 - beta2) * g * g
    p = p - step_size * (m / (ti.sqrt(v) / sqrt_bc2 + eps))
    return p, m, v


@ti.kernel
def adam_1d(
    param: f32_1d,
    grad: f32_1d,
    m: f32_1d,
    v: f32_1d,
    step_size: ti.f32,
    beta1: ti.f32,
    beta2: ti.f32,
    sqrt_bc2: ti.f32,
    eps: ti.f32,
):
    """Adam on a 1-D parameter (see the module docstring)."""
    for i in range(param.shape[0]):
        param[i], m[i], v[i] = _adam(param[i], grad[i], m[i], v[i], step_size, beta1, beta2, sqrt_bc2, eps)


@ti.kernel
def adam_2d(
    param: f32_2d,
    grad: f32_2d,
    m: f32_2d,
    v: f32_2d,
    step_size: ti.f32,
    beta1: ti.f32,
    beta2: ti.f32,
    sqrt_bc2: ti.f32,
    eps: ti.f32,
):
    """Adam on a 2-D parameter (see the module docstring)."""
    for i, j in ti.ndrange(param.shape[0], param.shape[1]):
        param[i, j], m[i, j], v[i, j] = _adam(
            param[i, j], grad[i, j], m[i, j], v[i, j], step_size, beta1, beta2, sqrt_bc2, eps
        )


@ti.kernel
def sgd_1d(param: f32_1d, grad: f32_1d, buf: f32_1d, lr: ti.f32, momentum: ti.f32):
    """SGD with momentum on a 1-D parameter (a zero buffer makes the first step plain SGD, as torch)."""
    for i in range(param.shape[0]):
        buf[i] = momentum * buf[i] + grad[i]
        param[i] -= lr * buf[i]


@ti.kernel
def sgd_2d(param: f32_2d, grad: f32_2d, buf: f32_2d, lr: ti.f32, momentum: ti.f32):
    """SGD with momentum on a 2-D parameter."""
    for i, j in ti.ndrange(param.shape[0], param.shape[1]):
        buf[i, j] = momentum * buf[i, j] + grad[i, j]
        param[i, j] -= lr * buf[i, j]


def adam_update(
    param: Array,
    grad: Array,
    m: Array,
    v: Array,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    step: int,
) -> None:
    """Adam step ``step`` (>= 1, counted after this update) on ``param`` in place, moments m, v in place.

    Shapes: all four arrays alike, 1-D or 2-D.
    """
    if step < 1:
        raise ValueError(f"Adam's step count starts at 1, got {step}.")
    step_size = lr / (1.0 - beta1**step)
    sqrt_bc2 = math.sqrt(1.0 - beta2**step)
    kernel = adam_1d if len(param.shape) == 1 else adam_2d
    launch("adam", kernel, param, grad, m, v, step_size, beta1, beta2, sqrt_bc2, eps)


def sgd_update(param: Array, grad: Array, buf: Array, lr: float, momentum: float) -> None:
    """SGD with momentum on ``param`` in place; ``buf`` is the momentum buffer (zeros before step 1)."""
    kernel = sgd_1d if len(param.shape) == 1 else sgd_2d
    launch("sgd", kernel, param, grad, buf, lr, momentum)
