"""Arrays that stay on the Taichi device between kernels, and the small kernels that move data among them.

On CPU and CUDA a kernel reads a torch tensor in place; on Vulkan and Metal Taichi 1.7.4 copies every
torch tensor argument to the device and back at every launch (docs/TAICHI.md, Torch interop). A
``ti.ndarray`` argument stays where it is, so a chain of kernels that passes ndarrays from one to the
next copies nothing. This module holds what such a chain needs and nothing about any network:

    ws = Workspace()
    t = ws.get("t", (4, 8))                     # a (4, 8) f32 ndarray, reused by later calls
    pts = ws.get("points", (32, 3))
    launch("ray_points", ray_points_kernel, origins, directions, t, pts)
    transfers = TransferLog()
    pixels = transfers.upload(ws, "pixels", np.zeros((4, 2), np.float32))
    loss = transfers.download(ws.get("loss", (4,)))   # numpy; bytes counted both ways

Kernels here (all arguments ndarrays or torch tensors alike):

* ``ray_points_kernel``: points ``o + t d`` for (R, S) sample depths -> (R * S, 3);
* ``gather_rows_kernel`` / ``scatter_add_rows_kernel``: rows of a table by index, each row repeated
  for ``repeat`` consecutive outputs (one latent code per ray, read by each of its samples), and the
  matching sum of gradients back into the table;
* ``merge_outputs_kernel`` / ``split_grads_kernel``: two evaluations (coarse, fine) interleaved by
  a merge ``order`` into flat per-sample arrays, and the gradients split back;
* ``rows_to_flat_kernel`` / ``flat_to_rows_kernel``: layout copies (Taichi ndarrays have no views or
  reshapes); ``fill_rows_kernel``: one row repeated (a constant background).
"""

from collections.abc import Sequence

import numpy as np
import taichi as ti
import torch

from renderer.backend import kernel_device, runtime_generation, to_kernel

Array = torch.Tensor | ti.lang._ndarray.Ndarray  # what the generic kernels' wrappers accept

f32_1d = ti.types.ndarray(dtype=ti.f32, ndim=1)
f32_2d = ti.types.ndarray(dtype=ti.f32, ndim=2)
i64_1d = ti.types.ndarray(dtype=ti.i64, ndim=1)

_TI_DTYPES = {np.dtype(np.float32): ti.f32, np.dtype(np.int64): ti.i64, np.dtype(np.int32): ti.i32,
              np.dtype(np.uint8): ti.u8}


def is_device_array(x) -> bool:
    """True for a ``ti.ndarray`` (scalar or vector), False for a torch tensor."""
    return isinstance(x, ti.lang._ndarray.Ndarray)


def as_kernel_arg(x: Array) -> Array:
    """An argument a kernel can take: an ndarray as it is, a torch tensor as ``to_kernel`` gives it."""
    return x if is_device_array(x) else to_kernel(x)


def empty_like_kind(like: Array, shape: Sequence[int]) -> Array:
    """A new float32 array of ``shape`` of the same kind as ``like`` (ndarray, or torch on the kernels'
    device). Example: ``empty_like_kind(torch.zeros(2), (3, 4)).shape == (3, 4)``."""
    if is_device_array(like):
        return ti.ndarray(ti.f32, tuple(int(n) for n in shape))
    return torch.empty(tuple(shape), device=kernel_device())


_DUMMIES: dict[tuple[int, bool], Array] = {}


def dummy_like(like: Array) -> Array:
    """A (1, 1) float32 placeholder of ``like``'s kind, made once per Taichi runtime."""
    key = (runtime_generation(), is_device_array(like))
    if key not in _DUMMIES:
        if any(k[0] != key[0] for k in _DUMMIES):  # made by an earlier runtime: invalid now
            _DUMMIES.clear()
        _DUMMIES[key] = ti.ndarray(ti.f32, (1, 1)) if key[1] else torch.zeros((1, 1), device=kernel_device())
    return _DUMMIES[key]


class Workspace:
    """Named ndarrays kept between steps: ``get`` returns the same buffer for the same name and shape,
    so a training loop allocates device memory once. A restart of Taichi (``renderer.backend``)
    invalidates every buffer; the workspace then starts empty.

    >>> ws = Workspace()
    >>> ws.get("x", (2, 3)) is ws.get("x", (2, 3))
    True
    """

    def __init__(self):
        self._arrays: dict[str, ti.lang._ndarray.Ndarray] = {}
        self._generation = runtime_generation()

    def get(self, name: str, shape: Sequence[int], dtype=ti.f32) -> ti.lang._ndarray.Ndarray:
        """The buffer called ``name`` with this shape and dtype (contents left as they are)."""
        if self._generation != runtime_generation():
            self._arrays.clear()
            self._generation = runtime_generation()
        shape = tuple(int(n) for n in shape)
        array = self._arrays.get(name)
        if array is None or tuple(array.shape) != shape or array.dtype != dtype:
            array = ti.ndarray(dtype, shape)
            self._arrays[name] = array
        return array

    def zeros(self, name: str, shape: Sequence[int], dtype=ti.f32) -> ti.lang._ndarray.Ndarray:
        """``get``, then filled with zeros on the device."""
        array = self.get(name, shape, dtype)
        array.fill(0)
        return array

    def nbytes(self) -> int:
        """Device memory the workspace holds, in bytes."""
        return sum(int(np.prod(a.shape)) * 4 * (2 if a.dtype == ti.i64 else 1) for a in self._arrays.values())


class TransferLog:
    """Host <-> device copies made through it, counted in bytes (reset with ``reset``)."""

    def __init__(self):
        self.uploaded = 0
        self.downloaded = 0

    def reset(self) -> None:
        self.uploaded = self.downloaded = 0

    def upload(self, ws: Workspace, name: str, values: np.ndarray) -> ti.lang._ndarray.Ndarray:
        """Copy ``values`` (float32, int32, int64 or uint8 numpy) into the workspace buffer ``name``."""
        values = np.ascontiguousarray(values)
        array = ws.get(name, values.shape, _TI_DTYPES[values.dtype])
        array.from_numpy(values)
        self.uploaded += values.nbytes
        return array

    def download(self, array: ti.lang._ndarray.Ndarray) -> np.ndarray:
        """The array's contents as numpy (waits for the device)."""
        values = array.to_numpy()
        self.downloaded += values.nbytes
        return values


@ti.kernel
def ray_points_kernel(origins: f32_2d, directions: f32_2d, t: f32_2d, points: f32_2d):
    """origins, directions (R, 3), t (R, S) -> points (R * S, 3) with row ray * S + s = o + t d."""
    n_samples = t.shape[1]
    for ray, s in ti.ndrange(t.shape[0], n_samples):
        n = ray * n_samples + s
        for a in ti.static(range(3)):
            points[n, a] = origins[ray, a] + t[ray, s] * directions[ray, a]


@ti.kernel
def gather_rows_kernel(table: f32_2d, index: i64_1d, repeat: ti.i32, out: f32_2d):
    """out[n] = table[index[n // repeat]]: index (R,), out (R * repeat, L)."""
    for n, c in ti.ndrange(out.shape[0], out.shape[1]):
        out[n, c] = table[index[n // repeat], c]


@ti.kernel
def scatter_add_rows_kernel(rows: f32_2d, index: i64_1d, repeat: ti.i32, table: f32_2d):
    """table[index[r]] += sum of rows[r * repeat .. r * repeat + repeat - 1]: rows (R * repeat, L)."""
    for r, c in ti.ndrange(index.shape[0], rows.shape[1]):
        total = 0.0
        for k in range(repeat):
            total += rows[r * repeat + k, c]
        ti.atomic_add(table[index[r], c], total)


@ti.func
def merged_layout(order: ti.template(), rows_a: ti.template(), n_a):
    """The shape of a merge of two evaluations: order flat (R * S), rows_a (R * n_a, ...) ->
    (R, S, n_b = S - n_a)."""
    n_rays = rows_a.shape[0] // n_a
    width = order.shape[0] // n_rays
    return n_rays, width, width - n_a


@ti.func
def source_row(order: ti.template(), ray, i, n_a, n_b):
    """Where merged slot i of ``ray`` comes from: (True, its row of a) when order[i] < n_a, else
    (False, its row of b)."""
    source = ti.cast(order[i], ti.i32)
    from_a = source < n_a
    return from_a, ti.select(from_a, ray * n_a + source, ray * n_b + source - n_a)


@ti.kernel
def merge_outputs_kernel(
    order: i64_1d, sigma_a: f32_2d, rgb_a: f32_2d, sigma_b: f32_2d, rgb_b: f32_2d, n_a: ti.i32,
    sigma: f32_1d, rgb: f32_1d,
):  # fmt: skip
    """Merged slot i = ray * S + k takes source order[i] of [a (R * n_a rows), b (R * n_b rows)]:
    order flat (R * S), sigma_* (R * n, 1), rgb_* (R * n, 3) -> flat sigma (R * S), rgb (R * S * 3),
    S = n_a + n_b."""
    n_rays, width, n_b = merged_layout(order, sigma_a, n_a)
    for ray, k in ti.ndrange(n_rays, width):
        i = ray * width + k
        from_a, row = source_row(order, ray, i, n_a, n_b)
        if from_a:
            sigma[i] = sigma_a[row, 0]
            for c in ti.static(range(3)):
                rgb[3 * i + c] = rgb_a[row, c]
        else:
            sigma[i] = sigma_b[row, 0]
            for c in ti.static(range(3)):
                rgb[3 * i + c] = rgb_b[row, c]


@ti.kernel
def split_grads_kernel(
    order: i64_1d, grad_sigma: f32_1d, grad_rgb: f32_1d, n_a: ti.i32,
    grad_sigma_a: f32_2d, grad_rgb_a: f32_2d, grad_sigma_b: f32_2d, grad_rgb_b: f32_2d,
):  # fmt: skip
    """The inverse of ``merge_outputs_kernel`` for gradients (each source appears once in ``order``)."""
    n_rays, width, n_b = merged_layout(order, grad_sigma_a, n_a)
    for ray, k in ti.ndrange(n_rays, width):
        i = ray * width + k
        from_a, row = source_row(order, ray, i, n_a, n_b)
        if from_a:
            grad_sigma_a[row, 0] = grad_sigma[i]
            for c in ti.static(range(3)):
                grad_rgb_a[row, c] = grad_rgb[3 * i + c]
        else:
            grad_sigma_b[row, 0] = grad_sigma[i]
            for c in ti.static(range(3)):
                grad_rgb_b[row, c] = grad_rgb[3 * i + c]


@ti.kernel
def rows_to_flat_kernel(rows: f32_2d, flat: f32_1d):
    """(N, C) -> flat (N * C), row-major."""
    width = rows.shape[1]
    for n, c in ti.ndrange(rows.shape[0], width):
        flat[n * width + c] = rows[n, c]


@ti.kernel
def flat_to_rows_kernel(flat: f32_1d, rows: f32_2d):
    """flat (N * C) -> (N, C), row-major."""
    width = rows.shape[1]
    for n, c in ti.ndrange(rows.shape[0], width):
        rows[n, c] = flat[n * width + c]


@ti.kernel
def fill_rows_kernel(values: f32_1d, out: f32_2d):
    """Every row of out (R, C) set to values (C,) (a constant background colour)."""
    for n, c in ti.ndrange(out.shape[0], out.shape[1]):
        out[n, c] = values[c]
