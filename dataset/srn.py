"""The ShapeNet-SRN source: ``<instance>/rgb/*.png``, ``pose/*.txt`` and ``intrinsics.txt``.

SRN files, as SRN and pixelNeRF read them:

- ``pose/<view>.txt``: 16 numbers, a 4x4 camera-to-world matrix in the OpenCV convention;
- ``intrinsics.txt``: first line ``f cx cy 0.``, then the grid barycentre (3 numbers), a scale line, and
  last line ``H W``: the image size that f, cx, cy refer to;
- ``rgb/<view>.png``: the images on a white background.

The given cameras are used as they are, except for one uniform scale: every camera position is
multiplied by ``world_scale`` so that the objects fit at radius ``FIT_RADIUS`` (1.5, like a head) inside
the renderer's radius-2 sphere. By default the scale comes from the data (``fit_scene``): a view's
silhouette, seen from a camera at distance d, bounds the object's radius by d · sin(its largest angle
from the ray to the origin); the largest bound over a seeded sample of views is the object radius.
``srn_world_scale`` overrides it (SRN cars: 3). Either way, when more than ``MAX_OUTSIDE_FRACTION`` of
the sampled views show the silhouette beyond the render sphere's outline, the build stops with one
sentence. The manifest records ``world_scale`` and the ``scene_fit``. Each instance is one identity;
``views_per_identity`` seeded-random views train and ``heldout_views`` others go to ``heldout/``.
Masks come from the white background.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from common.conventions import default_intrinsics, orbit_camera
from dataset.config import PrepareConfig
from dataset.sources import DataRootError, ItemResult, default_workers, skip, walk
from dataset.synthetic import SyntheticConfig, render_identity

FIT_RADIUS = 1.5  # objects are scaled to this radius (pose.template.HEAD_RADIUS: a head's)
RENDER_RADIUS = 2.0  # the renderer's bounding sphere (models.render.RenderConfig.radius)
MAX_OUTSIDE_FRACTION = 0.05  # views whose silhouette may reach beyond the render sphere's outline
FIT_SAMPLE_VIEWS = 600  # views read to fit the scene (seeded; at most 3 per instance)


def parse_intrinsics(path: Path) -> tuple[np.ndarray, tuple[int, int]]:
    """SRN ``intrinsics.txt`` -> K (3, 3) float64 and the (H, W) it refers to.

    >>> parse_intrinsics(Path("cars_train/1a0c.../intrinsics.txt"))  # doctest: +SKIP
    (array([[131.25, 0., 64.], [0., 131.25, 64.], [0., 0., 1.]]), (128, 128))
    """
    lines = [line.split() for line in Path(path).read_text().splitlines() if line.strip()]
    if len(lines) < 2 or len(lines[0]) < 3 or len(lines[-1]) != 2:
        raise ValueError(f"{path} is not an SRN intrinsics file (first line 'f cx cy 0.', last line 'H W').")
    f, cx, cy = (float(x) for x in lines[0][:3])
    height, width = (int(float(x)) for x in lines[-1])
    return np.array([[f, 0.0, cx], [0.0, f, cy], [0.0, 0.0, 1.0]]), (height, width)


def read_camera(path: Path, world_scale: float) -> np.ndarray:
    """SRN ``pose/<view>.txt`` (4x4 camera-to-world, OpenCV) -> world_to_camera (3, 4), scene scaled."""
    camera_to_world = np.loadtxt(path, dtype=np.float64).reshape(4, 4)
    rotation = camera_to_world[:3, :3]
    centre = camera_to_world[:3, 3] * world_scale
    return np.concatenate([rotation.T, (-rotation.T @ centre)[:, None]], axis=1)


def mask_from_white(image: np.ndarray, threshold: int) -> np.ndarray:
    """(H, W) float32 1 where any channel of uint8 (H, W, 3) is below ``threshold`` (not background)."""
    return (image.min(axis=2) < threshold).astype(np.float32)


def silhouette_angle(mask: np.ndarray, K: np.ndarray, world_to_camera: np.ndarray) -> float:
    """Largest angle (radians) between a foreground pixel's ray and the ray to the world origin.

    mask (H, W) (non-zero = object), K (3, 3) for that size, world_to_camera (3, 4); 0 for an empty
    mask. An object inside a sphere of radius r about the origin seen from distance d stays within
    asin(r / d) of the origin's ray, so d * sin(angle) bounds r.

    >>> K = np.array([[100.0, 0, 50], [0, 100, 50], [0, 0, 1]])
    >>> mask = np.zeros((100, 100)); mask[50, 50] = mask[50, 99] = 1
    >>> round(float(np.degrees(silhouette_angle(mask, K, np.c_[np.eye(3), [0, 0, 4]]))), 2)
    26.34
    """
    v, u = np.nonzero(mask)
    if u.size == 0:
        return 0.0
    rays = np.linalg.solve(K, np.stack([u + 0.5, v + 0.5, np.ones_like(u, dtype=np.float64)]))  # camera frame
    rays /= np.linalg.norm(rays, axis=0, keepdims=True)
    to_origin = world_to_camera[:, 3] / np.linalg.norm(world_to_camera[:, 3])  # the origin, camera frame
    return float(np.arccos(np.clip(to_origin @ rays, -1.0, 1.0)).max())


@dataclass(frozen=True)
class SceneFit:
    """How the SRN scenes sit in the render sphere: the object radius estimated from silhouettes (in the
    files' units), the scale applied (from the data, or given), and the views whose silhouette reaches
    beyond the render sphere's outline after scaling."""

    radius: float
    world_scale: float
    scale_from_data: bool
    views: int
    views_outside: int

    def record(self) -> dict:
        """JSON-ready, for the manifest."""
        return {"estimated_radius": round(self.radius, 5), "world_scale": round(self.world_scale, 6),
                "scale_from_data": self.scale_from_data, "views_sampled": self.views,
                "views_outside_render_sphere": self.views_outside}


def fit_scene(data_root: Path, items: list[str], config: PrepareConfig) -> SceneFit:
    """Estimate the object radius from a seeded sample of views and choose (or check) the world scale.

    Raises DataRootError when the silhouettes are all empty (nothing to fit) or when, after scaling,
    more than MAX_OUTSIDE_FRACTION of the sampled views reach beyond the render sphere.
    """
    rng = np.random.default_rng(config.seed)
    per_instance = max(1, min(3, FIT_SAMPLE_VIEWS // max(len(items), 1)))
    chosen = rng.permutation(len(items))[: max(1, FIT_SAMPLE_VIEWS // per_instance)]
    views = []  # (distance to the origin in file units, largest silhouette angle)
    for index in sorted(chosen):
        instance = Path(data_root) / items[index]
        try:
            K_file, (file_height, file_width) = parse_intrinsics(instance / "intrinsics.txt")
        except (OSError, ValueError):
            continue  # process() reports the instance
        names = sorted(p.stem for p in (instance / "rgb").glob("*.png")
                       if (instance / "pose" / f"{p.stem}.txt").exists())
        for name in (names[i] for i in rng.permutation(len(names))[:per_instance]):
            image = cv2.imread(str(instance / "rgb" / f"{name}.png"), cv2.IMREAD_COLOR)
            try:
                world_to_camera = read_camera(instance / "pose" / f"{name}.txt", 1.0)
            except (OSError, ValueError):
                continue
            if image is None:
                continue
            height, width = image.shape[:2]
            K = np.diag([width / file_width, height / file_height, 1.0]) @ K_file
            mask = mask_from_white(image[..., ::-1], config.srn_white_threshold)
            distance = float(np.linalg.norm(world_to_camera[:, 3]))
            views.append((distance, silhouette_angle(mask, K, world_to_camera)))
    bounds = [d * np.sin(min(a, np.pi / 2)) for d, a in views]
    if not bounds or max(bounds) <= 0:
        raise DataRootError(f"Cannot fit the SRN scenes in {data_root} into the render sphere: no sampled "
                            "view shows an object on the white background; check --srn-white-threshold, or "
                            "give --srn-world-scale.")
    radius = float(max(bounds))
    scale = config.srn_world_scale if config.srn_world_scale is not None else FIT_RADIUS / radius
    outside = sum(1 for d, a in views if a > np.arcsin(min(1.0, RENDER_RADIUS / (scale * d))))
    fit = SceneFit(radius, float(scale), config.srn_world_scale is None, len(views), outside)
    if outside > MAX_OUTSIDE_FRACTION * len(views):
        hint = ("leave --srn-world-scale out to scale from the data" if config.srn_world_scale is not None
                else "the cameras are too close to the objects to fit them; give --srn-world-scale")
        raise DataRootError(
            f"The SRN objects do not fit the render sphere at world scale {scale:.3g}: in {outside} of "
            f"{len(views)} sampled views the silhouette reaches beyond the radius-{RENDER_RADIUS:g} sphere "
            f"(object radius about {radius:.3g} in the files' units, {radius * scale:.3g} after scaling); "
            f"{hint} (about {FIT_RADIUS / radius:.3g} fits them at radius {FIT_RADIUS}).")
    return fit


def list_instances(root: Path) -> tuple[list[str], list[dict]]:
    """Sorted relative paths of every folder that has an ``rgb/`` subfolder, at any depth, and the skip
    entries of the paths the walk could not use (``dataset.sources.walk``)."""
    found, problems = [], []
    for directory, subdirs, _files in walk(root, problems):
        if "rgb" in subdirs:
            found.append(Path(directory).relative_to(root).as_posix())
            subdirs[:] = []
    return sorted(found), problems


@dataclass(frozen=True)
class SrnSource:
    """ShapeNet-SRN instances with their given cameras; one identity per instance."""

    name: str = "srn"
    layout: str = ("SRN folders DIR/<instance>/rgb/*.png, DIR/<instance>/pose/*.txt (4x4 camera-to-world) "
                   "and DIR/<instance>/intrinsics.txt")
    background = (1.0, 1.0, 1.0)
    has_template = False
    needs_data_root = True

    def list_items(self, data_root: Path) -> tuple[list[str], list[dict]]:
        return list_instances(Path(data_root))

    def item_files(self, data_root: Path, item: str) -> list[str]:
        root = Path(data_root)
        return [Path(d, f).relative_to(root).as_posix()
                for d, _s, files in walk(root / item, []) for f in files]  # bad files: process says

    def resolve(self, data_root: Path, items: list[str], config: PrepareConfig) -> tuple[PrepareConfig, dict]:
        """The config with the world scale the data needs (``fit_scene``), and the fit for the manifest."""
        fit = fit_scene(data_root, items, config)
        return config.with_(srn_world_scale=fit.world_scale), {"scene_fit": fit.record()}

    def settings(self, config: PrepareConfig) -> dict:
        return {"resolution": config.resolution, "views_per_identity": config.views_per_identity,
                "heldout_views": config.heldout_views, "world_scale": config.srn_world_scale,
                "white_threshold": config.srn_white_threshold, "seed": config.seed}

    def manifest_extra(self, config: PrepareConfig) -> dict:
        return {"world_scale": config.srn_world_scale}

    def default_workers(self, n_items: int) -> int:
        """One per core for big sets; an instance reads in milliseconds, so small sets stay in-process."""
        return max(1, min(default_workers(), n_items // 1000))

    def process(self, data_root: Path, item: str, config: PrepareConfig) -> ItemResult:
        """Read one instance: chosen training views and held-out views as cache records."""
        from pose import ImageError, load_image

        instance = Path(data_root) / item
        try:
            K_file, (file_height, file_width) = parse_intrinsics(instance / "intrinsics.txt")
        except (OSError, ValueError) as err:
            return skip(item, "bad_instance", f"intrinsics.txt: {err}")
        views = sorted(p.stem for p in (instance / "rgb").glob("*.png")
                       if (instance / "pose" / f"{p.stem}.txt").exists())
        if len(views) < config.views_per_identity:
            return skip(item, "bad_instance", f"{len(views)} views with both rgb/<view>.png and "
                        f"pose/<view>.txt, fewer than views_per_identity={config.views_per_identity}")
        # Seeded by the instance's name, so its split does not depend on which other instances exist.
        rng = np.random.default_rng([config.seed, zlib.crc32(item.encode())])
        order = rng.permutation(len(views))
        n_heldout = len(views) if config.heldout_views < 0 else config.heldout_views
        chosen = [(views[i], "train") for i in order[: config.views_per_identity]]
        chosen += [(views[i], "heldout") for i in order[config.views_per_identity:][:n_heldout]]
        records = []
        r = config.resolution
        for view, split in chosen:
            try:
                image = load_image(instance / "rgb" / f"{view}.png", min_side=1)
                world_to_camera = read_camera(instance / "pose" / f"{view}.txt", config.srn_world_scale)
            except (ImageError, OSError, ValueError) as err:
                return skip(item, "bad_instance", f"view {view}: {err}")
            height, width = image.shape[:2]
            # f, cx, cy refer to intrinsics.txt's H x W; scale them to the file, then to r x r.
            K = np.diag([r / file_width, r / file_height, 1.0]) @ K_file
            mask = mask_from_white(image, config.srn_white_threshold)
            if (height, width) != (r, r):
                image = cv2.resize(image, (r, r), interpolation=cv2.INTER_AREA)
                mask = cv2.resize(mask, (r, r), interpolation=cv2.INTER_AREA)
            records.append({
                "split": split,
                "image": image,
                "mask": np.round(mask * 255).astype(np.uint8),
                "K": K.astype(np.float32),
                "world_to_camera": world_to_camera.astype(np.float32),
                "source": f"{item}/rgb/{view}.png",
                "reprojection_error_px": 0.0,
            })
        return ItemResult(item=item, records=records)


def write_srn_layout(root: str | Path, config: SyntheticConfig, world_scale: float = 3.0,
                     splits: tuple[str, ...] = ("train", "heldout"),
                     instance_name: str = "instance_{:04d}") -> Path:
    """Render synthetic identities into the SRN layout (for tests and for checking the SRN loader).

    Instance i (folder ``instance_name.format(i)``) gets the views of ``splits`` among its
    ``train_views + heldout_views`` (view files keep their index among all of them); camera positions
    are divided by ``world_scale`` so that reading them back with ``srn_world_scale=world_scale``
    restores the synthetic cameras exactly. Returns ``root``.

        write_srn_layout(tmp, SyntheticConfig(n_identities=2, resolution=32), world_scale=1.0,
                         splits=("heldout",), instance_name="identity_{:06d}")  # a synthetic cache's names
    """
    root = Path(root)
    K = default_intrinsics(config.resolution, config.resolution)
    for identity in range(config.n_identities):
        instance = root / instance_name.format(identity)
        (instance / "rgb").mkdir(parents=True, exist_ok=True)
        (instance / "pose").mkdir(exist_ok=True)
        (instance / "intrinsics.txt").write_text(
            f"{K[0, 0]} {K[0, 2]} {K[1, 2]} 0.\n0. 0. 0.\n1.\n{config.resolution} {config.resolution}\n")
        for view, record in enumerate(render_identity(config, identity)):
            if record["split"] not in splits:
                continue
            yaw, pitch = record["yaw_pitch_deg"]
            world_to_camera = orbit_camera(yaw, pitch, config.camera_distance)
            camera_to_world = np.eye(4)
            camera_to_world[:3, :3] = world_to_camera[:, :3].T
            camera_to_world[:3, 3] = -world_to_camera[:, :3].T @ world_to_camera[:, 3] / world_scale
            np.savetxt(instance / "pose" / f"{view:06d}.txt", camera_to_world.reshape(1, 16), fmt="%.9f")
            cv2.imwrite(str(instance / "rgb" / f"{view:06d}.png"), record["image"][..., ::-1])
    return root
