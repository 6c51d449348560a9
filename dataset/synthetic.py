"""Procedural head-like objects, ray-traced analytically in numpy: the project's built-in default data.

Each identity is a union of axis-aligned ellipsoids (head, optional hair volume, nose, two ears, two
eyes) with its own shape, size, colours and a 3D texture. Shading is Lambertian under one fixed world
light and is baked into the albedo, so a surface point has the same colour from every camera (the
model's colour does not depend on the view direction either). Nothing here uses ``renderer/``, so
these images, depths and exact cameras can check the renderer.

Cameras, K and angles follow ``common.conventions`` (``orbit_camera``, ``default_intrinsics``): cameras on
a sphere of radius ``camera_distance`` looking at the origin. Objects are centred at the origin inside
radius 1.5, the front facing -z, on a constant white background.

Depth is the **ray distance t** along the unit ray direction (what the renderer's depth output is),
0 on the background.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from common.conventions import CAMERA_DISTANCE, default_intrinsics, orbit_camera

# Bump when the generator changes what it draws, so caches built by an older generator are rebuilt.
GENERATOR_VERSION = 2
BACKGROUND = (1.0, 1.0, 1.0)
# Direction towards the light: above (-y), left and in front (-z) of the face.
LIGHT_DIRECTION = np.array([-0.4, -0.6, -0.7]) / np.linalg.norm([-0.4, -0.6, -0.7])
AMBIENT = 0.35


@dataclass(frozen=True)
class SyntheticConfig:
    """What to generate. ``train_views`` views per identity go to the training split, ``heldout_views``
    more to ``heldout/``; yaw and pitch are drawn uniformly in ±max_yaw_deg / ±max_pitch_deg."""

    n_identities: int = 64
    train_views: int = 1
    heldout_views: int = 3
    resolution: int = 64
    camera_distance: float = CAMERA_DISTANCE
    max_yaw_deg: float = 35.0
    max_pitch_deg: float = 15.0
    seed: int = 0

    @classmethod
    def paper(cls) -> SyntheticConfig:
        """1,024 identities at 256²."""
        return cls(n_identities=1024, resolution=256)

    @classmethod
    def cpu(cls) -> SyntheticConfig:
        """64 identities at 64² (a few seconds)."""
        return cls()


@dataclass(frozen=True)
class HeadParams:
    """One identity: ellipsoids (E, 3) centres and radii, per-part albedo (E, 3), texture waves."""

    centres: np.ndarray
    radii: np.ndarray
    albedo: np.ndarray
    wave_vectors: np.ndarray  # (3, 3) spatial frequencies of the skin texture, per unit length
    wave_phases: np.ndarray  # (3,)
    texture_strength: float


def camera_rays(K: np.ndarray, world_to_camera: np.ndarray, height: int, width: int):
    """Origins (H*W, 3) and unit directions (H*W, 3) through every pixel centre (u + 0.5, v + 0.5).

    Rows are in raster order (v major), matching ``image.reshape(-1, 3)``.
    """
    v, u = np.meshgrid(np.arange(height) + 0.5, np.arange(width) + 0.5, indexing="ij")
    pixels = np.stack([u.ravel(), v.ravel(), np.ones(u.size)], axis=1)
    rotation, translation = world_to_camera[:, :3], world_to_camera[:, 3]
    directions = pixels @ np.linalg.inv(K).T @ rotation  # R^T d_cam, written row-wise
    directions /= np.linalg.norm(directions, axis=1, keepdims=True)
    origin = -rotation.T @ translation
    return np.broadcast_to(origin, directions.shape), directions


def intersect_ellipsoids(origins: np.ndarray, directions: np.ndarray, centres: np.ndarray,
                         radii: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """First hit of each ray with a union of axis-aligned ellipsoids, in closed form.

    origins, directions (R, 3); centres, radii (E, 3) -> t (R,) (inf on a miss), part (R,) int (-1 on a
    miss). Each ellipsoid becomes a unit sphere after (x - c) / r, where |o' + t d'|² = 1 is a quadratic.
    """
    o = (origins[:, None, :] - centres[None]) / radii[None]  # (R, E, 3)
    d = directions[:, None, :] / radii[None]
    a = np.einsum("rei,rei->re", d, d)
    b = 2.0 * np.einsum("rei,rei->re", o, d)
    c = np.einsum("rei,rei->re", o, o) - 1.0
    disc = b * b - 4.0 * a * c
    hit = disc >= 0.0
    t = (-b - np.sqrt(np.where(hit, disc, 0.0))) / (2.0 * a)
    t = np.where(hit & (t > 0.0), t, np.inf)
    part = np.argmin(t, axis=1)
    t_first = t[np.arange(len(t)), part]
    return t_first, np.where(np.isfinite(t_first), part, -1)


def sample_head(rng: np.random.Generator) -> HeadParams:
    """Draw one identity's shape, colours and texture; every part stays inside radius 1.5."""
    rx, ry, rz = rng.uniform(0.75, 0.95), rng.uniform(0.95, 1.2), rng.uniform(0.85, 1.02)
    skin = np.array([rng.uniform(0.45, 0.95), 0.0, 0.0])
    skin[1] = skin[0] * rng.uniform(0.6, 0.85)
    skin[2] = skin[1] * rng.uniform(0.6, 0.9)
    hair = rng.uniform(0.05, 0.85, 3) * rng.uniform(0.3, 1.0)
    eyes = rng.uniform(0.0, 0.3, 3)

    def on_front(x: float, y: float) -> float:
        # z of the head surface (front, -z side) above (x, y), slightly sunk so parts join the head
        inside = max(1.0 - (x / rx) ** 2 - (y / ry) ** 2, 0.05)
        return -rz * np.sqrt(inside) * 0.97

    nose_y = rng.uniform(0.0, 0.2)
    eye_x, eye_y = rng.uniform(0.26, 0.36), rng.uniform(-0.22, -0.06)
    ear_y, ear_z = rng.uniform(-0.05, 0.15), rng.uniform(-0.05, 0.1)
    has_hair_volume = rng.uniform() < 0.6
    hair_scale = rng.uniform(0.8, 0.9)
    parts = [
        ((0.0, 0.0, 0.0), (rx, ry, rz), skin),
        # Hair volume over the top and back; a bald identity hides it inside the head.
        ((0.0, -0.25, 0.15), (rx + 0.08, ry * hair_scale, rz + 0.05) if has_hair_volume
         else (0.1, 0.1, 0.1), hair),
        ((0.0, nose_y, on_front(0.0, nose_y)),
         (rng.uniform(0.1, 0.16), rng.uniform(0.18, 0.28), rng.uniform(0.14, 0.24)), skin * 0.95),
        ((-rx * 0.97, ear_y, ear_z), (rng.uniform(0.08, 0.12), rng.uniform(0.2, 0.28), 0.15), skin * 0.9),
        ((rx * 0.97, ear_y, ear_z), (rng.uniform(0.08, 0.12), rng.uniform(0.2, 0.28), 0.15), skin * 0.9),
        ((-eye_x, eye_y, on_front(eye_x, eye_y)), (0.11, 0.07, 0.06), eyes),
        ((eye_x, eye_y, on_front(eye_x, eye_y)), (0.11, 0.07, 0.06), eyes),
    ]
    centres, radii, albedo = (np.array([p[i] for p in parts], dtype=np.float64) for i in range(3))
    return HeadParams(centres=centres, radii=radii, albedo=albedo,
                      wave_vectors=rng.normal(0.0, 4.0, (3, 3)), wave_phases=rng.uniform(0, 2 * np.pi, 3),
                      texture_strength=float(rng.uniform(0.05, 0.2)))


def shade(head: HeadParams, points: np.ndarray, part: np.ndarray) -> np.ndarray:
    """RGB (R, 3) in [0, 1] of surface points (R, 3) on parts (R,): albedo x (ambient + diffuse).

    Depends only on the point, never on the ray, so every view sees the same colour there.
    """
    centres, radii = head.centres[part], head.radii[part]
    normals = (points - centres) / radii**2  # gradient of the ellipsoid's implicit function
    normals /= np.linalg.norm(normals, axis=1, keepdims=True)
    light = AMBIENT + (1.0 - AMBIENT) * np.clip(normals @ LIGHT_DIRECTION, 0.0, None)
    albedo = head.albedo[part].copy()
    skin_like = part <= 4  # head, hair, nose, ears carry the texture; eyes stay flat
    waves = np.sin(points @ head.wave_vectors.T + head.wave_phases).mean(axis=1)
    albedo[skin_like] *= 1.0 + head.texture_strength * waves[skin_like, None]
    # Hair colour on the top and back of the head itself (a hairline), so bald heads still vary.
    on_head = part == 0
    q = (points - centres) / radii
    hairline = on_head & (q[:, 1] < -0.45 + 0.6 * np.clip(q[:, 2], 0.0, None))
    albedo[hairline] = head.albedo[1]
    return np.clip(albedo * light[:, None], 0.0, 1.0)


def render_head(head: HeadParams, K: np.ndarray, world_to_camera: np.ndarray, height: int, width: int):
    """Ray-trace one view -> rgb (H, W, 3) float32 [0, 1], mask (H, W) bool, depth (H, W) float32.

    Depth is the ray distance t along the unit direction, 0 where the ray misses (white background).
    """
    origins, directions = camera_rays(K, world_to_camera, height, width)
    t, part = intersect_ellipsoids(origins, directions, head.centres, head.radii)
    hit = part >= 0
    rgb = np.full((height * width, 3), BACKGROUND)
    points = origins[hit] + t[hit, None] * directions[hit]
    rgb[hit] = shade(head, points, part[hit])
    depth = np.where(hit, t, 0.0)
    return (rgb.reshape(height, width, 3).astype(np.float32), hit.reshape(height, width),
            depth.reshape(height, width).astype(np.float32))


def identity_views(config: SyntheticConfig, identity: int) -> np.ndarray:
    """(train_views + heldout_views, 2) yaw and pitch in degrees for one identity, seeded by
    (seed, identity), so identity i looks the same whatever n_identities is."""
    rng = np.random.default_rng([config.seed, identity, 1])
    n = config.train_views + config.heldout_views
    return np.stack([rng.uniform(-config.max_yaw_deg, config.max_yaw_deg, n),
                     rng.uniform(-config.max_pitch_deg, config.max_pitch_deg, n)], axis=1)


def render_identity(config: SyntheticConfig, identity: int) -> list[dict]:
    """All views of one identity as cache records (train views first, then held-out views).

    Each record: split, image (r, r, 3) uint8, mask (r, r) uint8 {0, 255}, depth (r, r) float32,
    K (3, 3), world_to_camera (3, 4), source (str), reprojection_error_px (0: the camera is exact).
    """
    head = sample_head(np.random.default_rng([config.seed, identity]))
    K = default_intrinsics(config.resolution, config.resolution)
    records = []
    for view, (yaw, pitch) in enumerate(identity_views(config, identity)):
        world_to_camera = orbit_camera(yaw, pitch, config.camera_distance)
        rgb, mask, depth = render_head(head, K, world_to_camera, config.resolution, config.resolution)
        records.append({
            "split": "train" if view < config.train_views else "heldout",
            "image": np.round(rgb * 255.0).astype(np.uint8),
            "mask": mask.astype(np.uint8) * 255,
            "depth": depth,
            "K": K.astype(np.float32),
            "world_to_camera": world_to_camera.astype(np.float32),
            "source": f"synthetic/identity_{identity:06d}/view_{view:02d}",
            "reprojection_error_px": 0.0,
            "yaw_pitch_deg": [float(yaw), float(pitch)],
        })
    return records


@dataclass(frozen=True)
class SyntheticSource:
    """The generator as a build source: one item per identity, so big sets build in parallel, resumably.

    ``data_root`` is unused (None); the fingerprint covers the settings and GENERATOR_VERSION only.
    """

    config: SyntheticConfig
    name: str = "synthetic"
    layout: str = "no files: the objects are generated"
    background = BACKGROUND
    has_template = False
    needs_data_root = False

    def list_items(self, data_root) -> tuple[list[str], list[dict]]:
        return [f"identity_{i:06d}" for i in range(self.config.n_identities)], []

    def item_files(self, data_root, item: str) -> list[str]:
        return []

    def settings(self, prepare_config) -> dict:
        return {"synthetic": asdict(self.config), "generator_version": GENERATOR_VERSION}

    def manifest_extra(self, prepare_config) -> dict:
        return {"depth": "ray distance t along the unit ray direction, 0 on the background"}

    def default_workers(self, n_items: int) -> int:
        """In-process below a few million rays: below that, the workers' start-up would cancel what
        they save."""
        from dataset.sources import default_workers

        views = self.config.train_views + self.config.heldout_views
        return 1 if n_items * views * self.config.resolution**2 < 4_000_000 else default_workers()

    def process(self, data_root, item: str, prepare_config):
        from dataset.sources import ItemResult

        return ItemResult(item=item, records=render_identity(self.config, int(item.split("_")[-1])))
