"""Sampling kernels for x64 over 8-sample lanes (``renderer.lanes``): same samples as ``renderer.sampling``.

``renderer.sampling`` runs these on the x64 arch when the samples per ray are a multiple of 8.
"""

import taichi as ti

from renderer.lanes import LANES, hash_uniform_lanes, lanes_1d

f32_1d = ti.types.ndarray(dtype=ti.f32, ndim=1)


@ti.kernel
def stratified_lanes(
    near: f32_1d, far: f32_1d, mixed_key: ti.u32, use_jitter: ti.template(), t: lanes_1d, chunks: ti.i32
):
    """``stratified_kernel`` 8 samples at a time: near, far (R,) -> lanes of t (R*S/8), bit for bit."""
    for ray in range(near.shape[0]):
        # Built inside the parallel loop: a vector local shared across Taichi's offloaded tasks
        # crashed the x64 build.
        lane_offsets = ti.Vector([float(k) for k in range(LANES)])
        lo = near[ray]
        bin_width = (far[ray] - lo) / (chunks * LANES)
        for c in range(ray * chunks, ray * chunks + chunks):
            u = ti.Vector([0.5] * LANES)
            if ti.static(use_jitter):
                u = hash_uniform_lanes(c * LANES, mixed_key)
            first_bin = ti.cast((c - ray * chunks) * LANES, ti.f32)
            t[c] = lo + bin_width * (first_bin + lane_offsets + u)
