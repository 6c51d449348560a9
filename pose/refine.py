"""Joint refinement of the template and all cameras (the paper's dataset-wide landmark fit).

One least-squares problem over every image's rotation (axis-angle) and translation and the template
points, minimising all landmark reprojection errors in pixels (each image keeps its intrinsics).

Gauge: a template is only defined up to a 3D similarity (7 degrees of freedom) that the cameras can
absorb, so the first two points (the eyes) are held fixed, which fixes translation, scale
(`EYE_DISTANCE`) and two rotation axes, and the third point's (the nose tip's) y is held fixed, which
fixes the rotation about the eye line. The other 3P − 7 coordinates are free: exactly the shape's degrees
of freedom.

Solver: `least_squares(method="lm")` (MINPACK, dense finite-difference Jacobian) for up to
`max_lm_images` images; beyond that the dense Jacobian (10N × (6N + 8)) grows quadratically, so it uses
`method="trf"` with `jac_sparsity`: each image's residuals depend only on its own 6 camera parameters and
the template.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy.optimize import least_squares
from scipy.sparse import lil_matrix
from scipy.spatial.transform import Rotation

from .camera import CameraFit, make_fit, solve_camera
from .config import PoseConfig


@dataclass
class TemplateRefinement:
    """Result of `refine_template`.

    Attributes:
        template: (P, 3) refined template (same gauge as the input's first points).
        fits: the refined `CameraFit` of each image.
        error_before_px: RMS over all points of all images with the initial template and cameras.
        error_after_px: the same after refinement (never larger).
        solver: "lm" or "trf".
    """

    template: np.ndarray
    fits: list[CameraFit]
    error_before_px: float
    error_after_px: float
    solver: str


def gauge_free_mask(n_points: int) -> np.ndarray:
    """(P, 3) bool: True for the template coordinates that are optimised (module docstring).

    >>> int(gauge_free_mask(5).sum())
    8
    """
    free = np.ones((n_points, 3), bool)
    free[:2] = False
    free[2, 1] = False
    return free


def _unpack(params: np.ndarray, n_images: int, template: np.ndarray, free: np.ndarray):
    rotations = Rotation.from_rotvec(params[:3 * n_images].reshape(n_images, 3)).as_matrix()
    translations = params[3 * n_images:6 * n_images].reshape(n_images, 3)
    shape = template.copy()
    shape[free] = params[6 * n_images:]
    return rotations, translations, shape


def _residuals(params, points, K, template, free):
    rotations, translations, shape = _unpack(params, len(points), template, free)
    camera = shape[None] @ np.swapaxes(rotations, 1, 2) + translations[:, None]
    pixels = camera @ np.swapaxes(K, 1, 2)
    return (pixels[..., :2] / pixels[..., 2:3] - points).ravel()


def _sparsity(n_images: int, n_points: int, n_free: int) -> lil_matrix:
    """Which parameters each residual depends on: its image's rotation and translation, and the template."""
    pattern = lil_matrix((2 * n_points * n_images, 6 * n_images + n_free), dtype=np.int8)
    for image in range(n_images):
        rows = slice(2 * n_points * image, 2 * n_points * (image + 1))
        pattern[rows, 3 * image:3 * image + 3] = 1
        pattern[rows, 3 * n_images + 3 * image:3 * n_images + 3 * image + 3] = 1
        pattern[rows, 6 * n_images:] = 1
    return pattern


def refine_template(points: np.ndarray | Sequence[np.ndarray], template: np.ndarray,
                    image_sizes: tuple[int, int] | Sequence[tuple[int, int]],
                    fits: Sequence[CameraFit] | None = None, config: PoseConfig | None = None,
                    max_lm_images: int = 100) -> TemplateRefinement:
    """Refine the template and every camera jointly.

    Args:
        points: (N, P, 2) landmarks of N images (one landmark method, so one template).
        template: (P, 3) initial template, e.g. `load_template(method)`.
        image_sizes: one (H, W) for all images, or N of them.
        fits: initial cameras (their K is kept); default: `solve_camera` per image.
        config: `PoseConfig` (focal defaults, acceptance threshold of the returned fits).
        max_lm_images: above this many images, use `trf` with a sparse Jacobian instead of `lm`.

    Returns:
        `TemplateRefinement`; save it with `save_template` to use it in `prepare_photo`.

    >>> out = refine_template(all_points, load_template(), (256, 256))  # doctest: +SKIP
    >>> out.error_after_px <= out.error_before_px  # doctest: +SKIP
    True
    """
    config = config or PoseConfig()
    points = np.asarray(points, np.float64)
    template = np.asarray(template, np.float64)
    if points.ndim != 3 or points.shape[1:] != (len(template), 2):
        raise ValueError(f"refine_template needs points (N, P, 2) matching the template (P, 3); got "
                         f"{points.shape} and {template.shape}.")
    n_images = len(points)
    sizes = np.broadcast_to(np.asarray(image_sizes, int).reshape(-1, 2), (n_images, 2))
    if fits is None:
        fits = [solve_camera(p, template, tuple(s), config=config)
                for p, s in zip(points, sizes, strict=True)]
    if len(fits) != n_images:
        raise ValueError(f"refine_template got {len(fits)} initial fits for {n_images} images.")
    K = np.stack([fit.K for fit in fits])
    free = gauge_free_mask(len(template))
    x0 = np.concatenate([
        Rotation.from_matrix(np.stack([fit.world_to_camera[:, :3] for fit in fits])).as_rotvec().ravel(),
        np.stack([fit.world_to_camera[:, 3] for fit in fits]).ravel(),
        template[free],
    ])
    args = (points, K, template, free)
    before = float(np.sqrt(np.mean(_residuals(x0, *args).reshape(-1, 2) ** 2) * 2))
    if n_images <= max_lm_images:
        solver = "lm"
        result = least_squares(_residuals, x0, method="lm", x_scale="jac", args=args)
    else:
        solver = "trf"
        result = least_squares(_residuals, x0, method="trf", x_scale="jac", args=args,
                               jac_sparsity=_sparsity(n_images, len(template), int(free.sum())))
    rotations, translations, shape = _unpack(result.x, n_images, template, free)
    after = float(np.sqrt(np.mean(result.fun.reshape(-1, 2) ** 2) * 2))
    refined_fits = [make_fit(points[i], shape, K[i], np.c_[rotations[i], translations[i]], tuple(sizes[i]),
                             config, "refined") for i in range(n_images)]
    return TemplateRefinement(shape, refined_fits, before, after, solver)
