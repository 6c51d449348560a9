"""Textured faces with known cameras, depth and masks, from the real portraits that installed packages ship.

The ``faces`` source checks the photo path (landmarks -> LM camera -> masks) against ground truth. Each
identity is a textured Face Mesh surface rendered by this module's own rasteriser (numpy z-buffered
triangles with barycentric texture lookup; nothing here uses ``renderer/``):

- **Portraits** (``portraits``): scikit-image's astronaut and cameraman (grayscale) and matplotlib's
  grace_hopper, and their mirror images: six base faces (docs/MEDIAPIPE.md, Real photos available
  offline). By default only the four registered ones (astronaut, grace_hopper, mirrored or not) are
  used, for shapes and textures alike; ``FacesConfig.cameraman_texture`` opts the cameraman's texture
  back in.
- **Shape.** Face Mesh's 468 3D landmarks of each base face (the model inside the pinned wheel), aligned
  by 3D similarity to their mean and put in head units by the same frame as the landmark template
  (``pose.make_template``: outer eye corners 1.2 apart, origin 1.4 behind the nose tip, face towards
  -z, y down). An identity blends the shapes of the four calibration faces (astronaut, grace_hopper,
  mirrored or not) with Dirichlet weights, scales each axis by a few per cent and adds smooth random
  bumps. The cameraman never lends its shape: its Face Mesh (a 70-px face turned aside) disagrees with
  the others' eye-nose-mouth geometry by about 10° of head rotation, which would make its truth frame
  ambiguous. Its landmarks being off, its texture is misregistered on the mesh too (its painted eyes
  and mouth are not where the vertices are, so Face Mesh finds them 8–9 px RMS off at 256²,
  docs/MEDIAPIPE.md), and renders textured by it disagree with their ground truth: off by default.
- **Triangles** (``face_triangles``): the 3-cliques of mediapipe's ``FACEMESH_TESSELATION`` edge list
  (less the two separating 3-cycles that are not faces of the surface); the eye and mouth openings it
  leaves are closed by a fan around one added vertex each.
- **Texture and colour.** One of the texture portraits' base faces (``FacesConfig.texture_portraits``:
  four by default, six with the cameraman), drawn uniformly, its photo mapped through its own
  landmarks (vertex i takes the photo's colour at its landmark i), times a per-identity skin tone;
  Lambertian shading under a per-identity world light is baked per vertex, so a point has the same
  colour from every view. The background is a random colour gradient with low-frequency noise.
- **Cameras** follow ``common.conventions``: ``orbit_camera(yaw, pitch, CAMERA_DISTANCE)``, yaw in
  ±``max_yaw_deg`` (35°) and pitch in ±``max_pitch_deg`` (15°), ``default_intrinsics`` (focal
  2 × width, principal point at the centre).
- **Kept renders.** A view is kept only when MediaPipe Face Mesh finds a face in it and the landmark
  camera solve is accepted; otherwise another camera is drawn (``max_attempts`` per view).

Depth is the **ray distance t** along the unit ray direction from the true camera (what the renderer's
depth output is), 0 on the background; it is exact (the hit point on the planar triangle). Masks are
the exact coverage fraction of each pixel, from a supersampled coverage render.

Everything is seeded by (seed, identity, view, attempt), so identity i is the same whatever
``n_identities`` is, and a rerun is identical.
"""

from __future__ import annotations

import itertools
from collections import Counter, defaultdict
from dataclasses import asdict, dataclass
from functools import lru_cache

import cv2
import numpy as np

from common.conventions import CAMERA_DISTANCE, default_intrinsics, orbit_camera

# Bump when the generator changes what it draws, so caches built by an older generator are rebuilt.
# 2: the projected true landmarks (``true_landmarks``) are kept with the truth; 3: no cameraman texture by
# default (identities draw their texture from the four registered base faces).
GENERATOR_VERSION = 3
N_MESH = 468  # Face Mesh landmarks (without the iris refinement)
# The portraits the landmark template was derived from (pose.make_template.calibration_photos).
CALIBRATION_PORTRAITS = ("astronaut", "grace_hopper")
# Every portrait the generator can use, in base-face order (``portraits``).
PORTRAIT_NAMES = ("astronaut", "cameraman", "grace_hopper")
# A landmark counts as visible in a view when the true depth map at its pixel is within this distance (head
# units, about one pixel's footprint at 64² and 7 units) of its own distance from the camera.
LANDMARK_VISIBLE_TOL = 0.05


@dataclass(frozen=True)
class FacesConfig:
    """What to generate: ``train_views`` views per identity for training, ``heldout_views`` more held out.

    Attributes:
        n_identities: identities drawn.
        train_views, heldout_views: views per identity in each split.
        resolution: side of the training images (the renders are resized to it, like photos).
        render_size: side of the rendered image MediaPipe sees (Face Mesh needs a face of about 100 px).
        supersample: colour and coverage are rendered at ``supersample`` × ``render_size`` and averaged.
        camera_distance: distance of every camera from the origin (head units).
        max_yaw_deg, max_pitch_deg: camera angles are uniform in ± these (``common.conventions``).
        shape_noise: amplitude (head units) of the smooth random bumps added to each identity's shape.
        max_attempts: cameras drawn per view until MediaPipe finds the face and the solve is accepted.
        cameraman_texture: also draw textures from the cameraman (and its mirror), as generator versions
            up to 2 did: 6 texture base faces instead of 4. Off by default, because his Face Mesh is
            misregistered by about 10° of head rotation (docs/MEDIAPIPE.md), so the truth of the renders
            he textures is wrong. With it on, identity i is the same as in generator version 2.
        seed: seeds every random choice.
    """

    n_identities: int = 64
    train_views: int = 1
    heldout_views: int = 3
    resolution: int = 64
    render_size: int = 256
    supersample: int = 2
    camera_distance: float = CAMERA_DISTANCE
    max_yaw_deg: float = 35.0
    max_pitch_deg: float = 15.0
    shape_noise: float = 0.03
    max_attempts: int = 8
    cameraman_texture: bool = False
    seed: int = 0

    def __post_init__(self) -> None:
        problems = [f"{name} must be at least {low} (got {getattr(self, name)})"
                    for name, low in (("n_identities", 1), ("train_views", 1), ("heldout_views", 0),
                                      ("resolution", 8), ("render_size", 64), ("supersample", 1),
                                      ("max_attempts", 1)) if getattr(self, name) < low]
        if not self.camera_distance > 2.0:
            problems.append(f"camera_distance must be above the render radius 2 (got {self.camera_distance})")
        if problems:
            raise ValueError("Invalid FacesConfig: " + "; ".join(problems) + ".")

    @property
    def texture_portraits(self) -> tuple[str, ...]:
        """The portraits whose photos (mirrored or not) texture the identities, in ``PORTRAIT_NAMES``
        order: astronaut and grace_hopper, and the cameraman with ``cameraman_texture``."""
        return tuple(name for name in PORTRAIT_NAMES
                     if name in CALIBRATION_PORTRAITS or (self.cameraman_texture and name == "cameraman"))


@dataclass(frozen=True)
class BaseFace:
    """One measured portrait: vertices (468, 3) in head units, uv (468, 2) photo pixels (continuous),
    photo (H, W, 3) float32 in [0, 1]."""

    name: str
    vertices: np.ndarray
    uv: np.ndarray
    photo: np.ndarray


@dataclass(frozen=True)
class FaceIdentity:
    """One identity: vertices (V, 3) head units (468 Face Mesh points, then the hole-fill points),
    uv (V, 2) texture pixels, the texture photo (H, W, 3) float32, per-vertex shading (V,), skin tone
    (3,), background parameters, the base faces' shape weights (6,; the cameraman's are 0) and the name of
    the base face lending the texture (``BaseFace.name``, e.g. "grace_hopper (mirrored)")."""

    vertices: np.ndarray
    uv: np.ndarray
    texture: np.ndarray
    shading: np.ndarray
    tone: np.ndarray
    background: tuple
    weights: np.ndarray
    texture_name: str


# ---------------------------------------------------------------------------------------------------
# Portraits and base faces


def portraits() -> dict[str, np.ndarray]:
    """The real portraits shipped by installed packages, as uint8 (H, W, 3) RGB: scikit-image's astronaut
    and cameraman (grayscale, as RGB), matplotlib's grace_hopper."""
    import matplotlib.cbook
    import skimage.data

    with matplotlib.cbook.get_sample_data("grace_hopper.jpg") as f:
        hopper = cv2.imdecode(np.frombuffer(f.read(), np.uint8), cv2.IMREAD_COLOR)[..., ::-1]
    return {"astronaut": skimage.data.astronaut(),
            "cameraman": np.repeat(skimage.data.camera()[..., None], 3, axis=2),
            "grace_hopper": np.ascontiguousarray(hopper)}


def measure_mesh(image: np.ndarray) -> np.ndarray:
    """Face Mesh's (468, 3) landmarks of the face in uint8 RGB ``image``, in pixels (x·W, y·H, z·W)."""
    from pose.landmarks import run_graph

    height, width = image.shape[:2]
    result = run_graph("face_mesh", np.ascontiguousarray(image), max_num_faces=1,
                       min_detection_confidence=0.5)
    if not result.multi_face_landmarks:
        raise RuntimeError("Face Mesh found no face in a shipped portrait; the faces source cannot be built.")
    landmarks = result.multi_face_landmarks[0].landmark
    return np.array([[p.x * width, p.y * height, p.z * width] for p in landmarks])


@lru_cache(maxsize=1)
def base_faces() -> tuple[BaseFace, ...]:
    """The six base faces (three portraits and their mirrors), in head units, measured once per process.

    The world frame is the landmark template's: the portraits the template was derived from
    (``pose.make_template.calibration_photos``: astronaut, grace_hopper and their mirrors) are aligned to
    their running mean by 3D similarity (generalised Procrustes) exactly as ``pose.make_template`` does,
    the mean's canonical frame takes it to head units, and every base face (the cameraman too, for
    ``FacesConfig.cameraman_texture``) is aligned by similarity to that mean.
    """
    from pose.make_template import apply, canonical_frame, similarity

    names, meshes, uvs, photos = [], [], [], []
    shipped = portraits()
    for name, photo in shipped.items():
        for mirrored in (False, True):
            image = np.ascontiguousarray(photo[:, ::-1]) if mirrored else photo
            mesh = measure_mesh(image)
            names.append(name + (" (mirrored)" if mirrored else ""))
            meshes.append(mesh)
            uvs.append(mesh[:, :2].copy())
            photos.append(image.astype(np.float32) / 255.0)
    used = [i for i, name in enumerate(names) if name.split(" ")[0] in CALIBRATION_PORTRAITS]
    mean = meshes[used[0]]
    for _ in range(3):
        mean = np.mean([apply(similarity(meshes[i], mean), meshes[i]) for i in used], axis=0)
    frame = canonical_frame(mean)
    alignments = [similarity(mesh, mean) for mesh in meshes]
    return tuple(BaseFace(n, apply(frame @ a, m), uv, p)
                 for n, a, m, uv, p in zip(names, alignments, meshes, uvs, photos, strict=True))


# ---------------------------------------------------------------------------------------------------
# Triangulation


def _boundary_loops(triangles: np.ndarray) -> list[list[int]]:
    """The closed loops of edges that belong to one triangle only, each as an ordered vertex list."""
    count = Counter(frozenset(e) for t in triangles for e in itertools.combinations(t, 2))
    neighbours = defaultdict(list)
    for edge, n in count.items():
        if n == 1:
            a, b = tuple(edge)
            neighbours[a].append(b)
            neighbours[b].append(a)
    loops, seen = [], set()
    for start in sorted(neighbours):
        if start in seen:
            continue
        loop, previous, current = [start], None, start
        seen.add(start)
        while True:
            options = [v for v in neighbours[current] if v != previous]
            nxt = options[0] if options else None
            if nxt is None or nxt == start:
                break
            if nxt in seen:  # a vertex shared by two loops: stop this walk
                break
            loop.append(nxt)
            seen.add(nxt)
            previous, current = current, nxt
        loops.append(loop)
    return loops


@lru_cache(maxsize=1)
def face_triangles() -> tuple[np.ndarray, tuple[tuple[int, ...], ...]]:
    """The Face Mesh triangulation: (triangles (T, 3) int64 over 468 + holes vertices, hole loops).

    Triangles are the 3-cliques of ``FACEMESH_TESSELATION`` (an edge list), less the separating ones: a
    3-cycle that is not a face of the surface has all three edges shared by two faces besides itself, so a
    clique whose three edges each belong to three or more cliques is dropped. The inner loops of boundary
    edges (eyes, mouth) are closed by a fan around one added vertex each, vertex 468 + k for loop k (its
    position and uv are the loop's mean, ``close_holes``). The face oval, the longest loop, stays open.
    """
    import mediapipe as mp

    edges = mp.solutions.face_mesh.FACEMESH_TESSELATION
    adjacent = defaultdict(set)
    for a, b in edges:
        adjacent[a].add(b)
        adjacent[b].add(a)
    cliques = sorted({tuple(sorted((a, b, c))) for a, b in edges for c in adjacent[a] & adjacent[b]})
    shared = Counter(frozenset(e) for tri in cliques for e in itertools.combinations(tri, 2))
    kept = [tri for tri in cliques if min(shared[frozenset(e)] for e in itertools.combinations(tri, 2)) < 3]
    triangles = np.array(kept, np.int64)
    loops = sorted(_boundary_loops(triangles), key=len)[:-1]  # all but the face oval
    fans = [(N_MESH + k, loop[i], loop[(i + 1) % len(loop)]) for k, loop in enumerate(loops)
            for i in range(len(loop))]
    return np.concatenate([triangles, np.array(fans, np.int64)]), tuple(tuple(loop) for loop in loops)


def close_holes(points: np.ndarray) -> np.ndarray:
    """(468, D) per-landmark values -> (468 + holes, D): each hole's added vertex takes its loop's mean."""
    _, loops = face_triangles()
    return np.concatenate([points, np.stack([points[list(loop)].mean(0) for loop in loops])])


def vertex_normals(vertices: np.ndarray, triangles: np.ndarray) -> np.ndarray:
    """(V, 3) unit normals, area-weighted over incident triangles, pointing away from the origin (the head
    centre), i.e. out of the face."""
    a, b, c = (vertices[triangles[:, i]] for i in range(3))
    face_normals = np.cross(b - a, c - a)
    outward = np.einsum("ij,ij->i", face_normals, (a + b + c) / 3.0) < 0
    face_normals[outward] *= -1
    normals = np.zeros_like(vertices)
    for i in range(3):
        np.add.at(normals, triangles[:, i], face_normals)
    return normals / np.maximum(np.linalg.norm(normals, axis=1, keepdims=True), 1e-12)


# ---------------------------------------------------------------------------------------------------
# Identities


def sample_identity(rng: np.random.Generator, shape_noise: float = 0.03,
                    textures: tuple[str, ...] = CALIBRATION_PORTRAITS) -> FaceIdentity:
    """Draw one identity: blended, perturbed shape; one portrait's texture; skin tone; light; background.

    The texture is drawn uniformly from the base faces of the portraits ``textures`` (each mirrored or not;
    ``FacesConfig.texture_portraits``). The random calls are the same whatever ``textures`` is: only the
    texture index's range and the base face it picks change, so with all three portraits this is
    generator version 2 (the default, astronaut and grace_hopper, is version 3).
    """
    bases = base_faces()
    unknown = sorted(set(textures) - set(PORTRAIT_NAMES))
    if unknown or not textures:
        raise ValueError(f"textures must be some of {', '.join(PORTRAIT_NAMES)} (got {list(textures)}).")
    triangles, _ = face_triangles()
    shapes = [i for i, b in enumerate(bases) if b.name.split(" ")[0] in CALIBRATION_PORTRAITS]
    weights = np.zeros(len(bases))
    weights[shapes] = rng.dirichlet(np.full(len(shapes), 0.7))
    shape = np.tensordot(weights, np.stack([b.vertices for b in bases]), axes=1)
    shape = shape * np.array([rng.uniform(0.94, 1.06), rng.uniform(0.94, 1.06), rng.uniform(0.9, 1.1)])
    for _ in range(4):  # smooth bumps, mostly in depth
        centre = shape[rng.integers(N_MESH)]
        sigma = rng.uniform(0.2, 0.45)
        amplitude = rng.normal(0.0, shape_noise)
        bump = np.exp(-np.sum((shape - centre) ** 2, axis=1) / (2 * sigma**2))
        shape = shape + amplitude * bump[:, None] * np.array([0.3, 0.3, 1.0])
    choices = [i for i, b in enumerate(bases) if b.name.split(" ")[0] in textures]
    base = bases[choices[int(rng.integers(len(choices)))]]
    vertices = close_holes(shape)
    uv = close_holes(base.uv)
    light = np.array([rng.uniform(-0.8, 0.8), rng.uniform(-0.8, 0.3), -1.0])
    light /= np.linalg.norm(light)
    ambient = rng.uniform(0.45, 0.75)
    lambert = np.clip(vertex_normals(vertices, triangles) @ light, 0.0, None)
    shading = (ambient + (1.0 - ambient) * lambert) / (ambient + (1.0 - ambient) * 0.75)
    brightness, warmth = rng.uniform(0.6, 1.15), rng.uniform(-0.05, 0.2)
    tone = brightness * np.array([1.0 + warmth, 1.0, 1.0 - warmth])
    if "cameraman" in base.name:  # a grayscale photo: give its skin a colour
        tone = tone * np.array([1.08, 0.9, 0.76])
    background = (rng.uniform(0.0, 1.0, 3), rng.uniform(0.0, 1.0, 3), rng.uniform(0.0, 2 * np.pi),
                  rng.uniform(0.0, 0.15), int(rng.integers(2**31)))
    return FaceIdentity(vertices=vertices, uv=uv, texture=base.photo, shading=shading, tone=tone,
                        background=background, weights=weights, texture_name=base.name)


def background_image(params: tuple, size: int) -> np.ndarray:
    """(size, size, 3) float32: a linear gradient between two colours plus low-frequency noise."""
    first, second, angle, noise, seed = params
    v, u = np.meshgrid(np.linspace(-1, 1, size), np.linspace(-1, 1, size), indexing="ij")
    ramp = np.clip(0.5 + 0.5 * (np.cos(angle) * u + np.sin(angle) * v), 0.0, 1.0)[..., None]
    image = first * (1 - ramp) + second * ramp
    coarse = np.random.default_rng(seed).uniform(-1.0, 1.0, (5, 5, 3)).astype(np.float32)
    image = image + noise * cv2.resize(coarse, (size, size), interpolation=cv2.INTER_CUBIC)
    return np.clip(image, 0.0, 1.0).astype(np.float32)


# ---------------------------------------------------------------------------------------------------
# Rasteriser


@dataclass
class Raster:
    """One rasterised view at (H, W).

    Attributes:
        triangle: (H, W) int64 index of the visible triangle at each pixel centre, -1 on the background.
        weights: (H, W, 3) float64 perspective-correct barycentric weights of its three vertices.
        depth: (H, W) float32 ray distance t from the camera centre to the hit point, 0 on the background.
    """

    triangle: np.ndarray
    weights: np.ndarray
    depth: np.ndarray

    @property
    def hit(self) -> np.ndarray:
        """(H, W) bool: pixel centres that see the surface."""
        return self.triangle >= 0


def rasterise(vertices: np.ndarray, triangles: np.ndarray, K: np.ndarray, world_to_camera: np.ndarray,
              height: int, width: int) -> Raster:
    """Z-buffered rasterisation of triangles at pixel centres (u + 0.5, v + 0.5).

    Args:
        vertices: (V, 3) world points; triangles: (T, 3) vertex indices.
        K: (3, 3) intrinsics in pixels; world_to_camera: (3, 4) [R | t], OpenCV (``common.conventions``).
        height, width: image size.

    Returns:
        ``Raster``. A pixel centre belongs to a triangle when its screen-space barycentric weights are all
        non-negative; the nearest hit (smallest camera z) wins. The weights are then made
        perspective-correct (w_i / z_i normalised), so the hit point Σ w_i X_i lies exactly on the
        triangle's plane along the pixel's ray, and depth is its distance from the camera centre.

    >>> K = default_intrinsics(64, 64)
    >>> tri = np.array([[-1.0, -1, 0], [1, -1, 0], [0, 1, 0]])
    >>> r = rasterise(tri, np.array([[0, 1, 2]]), K, orbit_camera(0, 0), 64, 64)
    >>> round(float(r.depth[32, 32]), 4), int(r.triangle[0, 0])
    (7.0, -1)
    """
    camera = vertices @ world_to_camera[:, :3].T + world_to_camera[:, 3]
    z = camera[:, 2]
    with np.errstate(divide="ignore", invalid="ignore"):
        pixels = (camera @ K.T)[:, :2] / z[:, None]
    zbuffer = np.full((height, width), np.inf)
    triangle_at = np.full((height, width), -1, np.int64)
    weights = np.zeros((height, width, 3))
    corners = pixels[triangles]  # (T, 3, 2)
    front = np.all(z[triangles] > 1e-6, axis=1)
    low = np.ceil(corners.min(axis=1) - 0.5).astype(np.int64)
    high = np.floor(corners.max(axis=1) - 0.5).astype(np.int64)
    visible = front & np.all(high >= 0, axis=1) & (low[:, 0] < width) & (low[:, 1] < height)
    for index in np.flatnonzero(visible):
        (x0, y0), (x1, y1) = np.maximum(low[index], 0), np.minimum(high[index], [width - 1, height - 1])
        if x1 < x0 or y1 < y0:
            continue
        p0, p1, p2 = corners[index]
        area = (p1[0] - p0[0]) * (p2[1] - p0[1]) - (p1[1] - p0[1]) * (p2[0] - p0[0])
        if abs(area) < 1e-12:
            continue
        ys, xs = np.mgrid[y0:y1 + 1, x0:x1 + 1]
        px, py = xs + 0.5, ys + 0.5
        w0 = ((p1[0] - px) * (p2[1] - py) - (p1[1] - py) * (p2[0] - px)) / area
        w1 = ((p2[0] - px) * (p0[1] - py) - (p2[1] - py) * (p0[0] - px)) / area
        w2 = 1.0 - w0 - w1
        inside = (w0 >= 0) & (w1 >= 0) & (w2 >= 0)
        if not inside.any():
            continue
        tri_z = z[triangles[index]]
        q = np.stack([w0, w1, w2], axis=-1) / tri_z
        inverse_z = q.sum(axis=-1)
        depth_z = 1.0 / inverse_z
        region = zbuffer[y0:y1 + 1, x0:x1 + 1]
        closer = inside & (depth_z < region)
        if not closer.any():
            continue
        region[closer] = depth_z[closer]
        triangle_at[y0:y1 + 1, x0:x1 + 1][closer] = index
        weights[y0:y1 + 1, x0:x1 + 1][closer] = q[closer] / inverse_z[closer, None]
    hit = triangle_at >= 0
    points = np.einsum("hwk,hwkc->hwc", weights, camera[triangles[np.maximum(triangle_at, 0)]])
    depth = np.where(hit, np.linalg.norm(points, axis=-1), 0.0).astype(np.float32)
    return Raster(triangle_at, weights, depth)


def interpolate(raster: Raster, triangles: np.ndarray, values: np.ndarray) -> np.ndarray:
    """(H, W, D) per-pixel interpolation of per-vertex ``values`` (V, D) (0 on the background)."""
    corner_values = values[triangles[np.maximum(raster.triangle, 0)]]  # (H, W, 3, D)
    out = np.einsum("hwk,hwkd->hwd", raster.weights, corner_values)
    return np.where(raster.hit[..., None], out, 0.0)


def render_face(identity: FaceIdentity, K: np.ndarray, world_to_camera: np.ndarray, size: int,
                supersample: int = 2) -> tuple[np.ndarray, np.ndarray]:
    """One view of a face -> image (size, size, 3) uint8 and coverage (size, size) float32 in [0, 1].

    Rendered at ``supersample`` × ``size`` (K scaled exactly: continuous pixel coordinates scale by the
    factor) and averaged down by area.
    """
    triangles, _ = face_triangles()
    big = size * supersample
    K_big = np.diag([supersample, supersample, 1.0]) @ K
    raster = rasterise(identity.vertices, triangles, K_big, world_to_camera, big, big)
    uv = interpolate(raster, triangles, identity.uv)
    texture = cv2.remap(identity.texture, (uv[..., 0] - 0.5).astype(np.float32),
                        (uv[..., 1] - 0.5).astype(np.float32), cv2.INTER_LINEAR,
                        borderMode=cv2.BORDER_REFLECT)
    shading = interpolate(raster, triangles, identity.shading[:, None])
    colour = np.clip(texture * identity.tone * shading, 0.0, 1.0)
    coverage = raster.hit.astype(np.float32)
    rgb = np.where(raster.hit[..., None], colour, background_image(identity.background, big))
    if supersample > 1:
        rgb = cv2.resize(rgb.astype(np.float32), (size, size), interpolation=cv2.INTER_AREA)
        coverage = cv2.resize(coverage, (size, size), interpolation=cv2.INTER_AREA)
    return np.round(np.clip(rgb, 0.0, 1.0) * 255.0).astype(np.uint8), np.clip(coverage, 0.0, 1.0)


def face_depth(identity: FaceIdentity, K: np.ndarray, world_to_camera: np.ndarray, size: int) -> np.ndarray:
    """(size, size) float32 exact ray distance t at every pixel centre of a view, 0 on the background."""
    triangles, _ = face_triangles()
    return rasterise(identity.vertices, triangles, K, world_to_camera, size, size).depth


def identity_rng(config: FacesConfig, identity: int) -> np.random.Generator:
    """The generator of identity ``identity``'s looks (independent of ``n_identities``)."""
    return np.random.default_rng([config.seed, identity, 7])


def make_identity(config: FacesConfig, identity: int) -> FaceIdentity:
    """Identity ``identity`` of ``config``, as the source draws it (seeded by (seed, identity); textures
    from ``config.texture_portraits``)."""
    return sample_identity(identity_rng(config, identity), config.shape_noise, config.texture_portraits)


def view_angles(config: FacesConfig, identity: int, view: int, attempt: int) -> tuple[float, float]:
    """(yaw, pitch) in degrees of one attempt at one view, seeded by (seed, identity, view, attempt)."""
    rng = np.random.default_rng([config.seed, identity, view, attempt, 8])
    return (float(rng.uniform(-config.max_yaw_deg, config.max_yaw_deg)),
            float(rng.uniform(-config.max_pitch_deg, config.max_pitch_deg)))



def true_landmarks(identity: FaceIdentity, K: np.ndarray, world_to_camera: np.ndarray,
                   depth: np.ndarray) -> np.ndarray:
    """(468, 4) float32 per Face Mesh landmark of one view: u, v (continuous pixel position, true camera),
    t (its ray distance from the camera, the depth map's units) and visible (1.0 / 0.0: the depth map
    (H, W) at its pixel is within ``LANDMARK_VISIBLE_TOL`` of t, so no other part of the face hides it)."""
    from pose.camera import project

    points = identity.vertices[:N_MESH]
    uv = project(points, K, world_to_camera)
    t = np.linalg.norm(points @ world_to_camera[:, :3].T + world_to_camera[:, 3], axis=1)
    cols, rows = np.floor(uv[:, 0]).astype(int), np.floor(uv[:, 1]).astype(int)
    inside = (cols >= 0) & (rows >= 0) & (cols < depth.shape[1]) & (rows < depth.shape[0])
    seen = np.zeros(N_MESH)
    seen[inside] = depth[rows[inside], cols[inside]]
    visible = inside & (seen > 0) & (np.abs(seen - t) < LANDMARK_VISIBLE_TOL)
    return np.concatenate([uv, t[:, None], visible[:, None]], axis=1).astype(np.float32)


def render_view(identity: FaceIdentity, config: FacesConfig, yaw: float, pitch: float) -> dict:
    """One view at known angles: the render MediaPipe sees and the truth at the training resolution.

    Returns a dict: image (render_size, render_size, 3) uint8; true_mask (r, r) uint8 coverage × 255;
    true_depth (r, r) float32 ray distance t; true_K (3, 3) and true_world_to_camera (3, 4) float32;
    true_landmarks (468, 4) float32 (``true_landmarks``), all at r = ``config.resolution``
    (``common.conventions``).
    """
    world_to_camera = orbit_camera(yaw, pitch, config.camera_distance)
    image, coverage = render_face(identity, default_intrinsics(config.render_size, config.render_size),
                                  world_to_camera, config.render_size, config.supersample)
    r = config.resolution
    K = default_intrinsics(r, r)
    mask = cv2.resize(coverage, (r, r), interpolation=cv2.INTER_AREA) if r != config.render_size else coverage
    depth = face_depth(identity, K, world_to_camera, r)
    return {"image": image, "true_mask": np.round(np.clip(mask, 0, 1) * 255).astype(np.uint8),
            "true_depth": depth, "true_K": K.astype(np.float32),
            "true_world_to_camera": world_to_camera.astype(np.float32),
            "true_landmarks": true_landmarks(identity, K, world_to_camera, depth)}


@dataclass(frozen=True)
class FacesSource:
    """The faces generator as a build source: one item per identity, cameras solved from landmarks.

    Each view is rendered at ``render_size`` and then prepared exactly as a photo is
    (``pose.prepare_photo`` with aligned framing: Face Mesh landmarks, the LM solve against the landmark
    template, Selfie Segmentation), so the cache's cameras and masks are the photo path's. The
    generator's truth goes beside them (``true_cameras.npz``, ``true_depths.npy``, ``true_masks.npy``).
    ``data_root`` is unused (None); the fingerprint covers the settings, the template and
    GENERATOR_VERSION.
    """

    config: FacesConfig
    name: str = "faces"
    layout: str = "no files: the faces are rendered from portraits that installed packages ship"
    background = "network"
    has_template = True
    needs_data_root = False

    def list_items(self, data_root) -> tuple[list[str], list[dict]]:
        return [f"identity_{i:06d}" for i in range(self.config.n_identities)], []

    def item_files(self, data_root, item: str) -> list[str]:
        return []

    def settings(self, prepare_config) -> dict:
        from dataset.sources import template_settings

        return {"faces": asdict(self.config), "generator_version": GENERATOR_VERSION,
                "portraits": list(self.config.texture_portraits),
                "pose": prepare_config.to_dict()["pose"], **template_settings(prepare_config.pose)}

    def manifest_extra(self, prepare_config) -> dict:
        from dataset.sources import template_records

        return {**template_records(prepare_config.pose),
                "truth": {"files": ["true_cameras.npz", "true_depths.npy", "true_masks.npy"],
                          "depth": "ray distance t along the unit ray direction from the true camera, "
                                   "0 on the background",
                          "mask": "exact coverage fraction x 255",
                          "cameras": "the generator's K and world_to_camera at the cache resolution",
                          "landmarks": "true_cameras.npz landmarks (N, 468, 4): each Face Mesh landmark's "
                                       "u, v (true camera, cache resolution), ray distance t, visible"}}

    def default_workers(self, n_items: int) -> int:
        """In-process for small sets: a worker's start-up (imports, MediaPipe graphs, measuring the
        portraits) costs as much as preparing a few dozen views."""
        from dataset.sources import default_workers

        views = self.config.train_views + self.config.heldout_views
        return max(1, min(default_workers(), n_items * views // 200))

    def process(self, data_root, item: str, prepare_config):
        """Render and prepare every view of one identity; a view whose renders MediaPipe never finds (or
        whose solve is always rejected) in ``max_attempts`` cameras is dropped, and with it the identity
        when it is the training view."""
        from dataset.sources import ItemResult, face_points, head_fit, skip
        from pose import NoFaceError, PoseRejectedError, prepare_photo

        config = self.config
        index = int(item.split("_")[-1])
        identity = make_identity(config, index)
        records = []
        for view in range(config.train_views + config.heldout_views):
            failures = Counter()
            for attempt in range(config.max_attempts):
                yaw, pitch = view_angles(config, index, view, attempt)
                rendered = render_view(identity, config, yaw, pitch)
                try:
                    photo = prepare_photo(rendered["image"], config.resolution, "aligned",
                                          config=prepare_config.pose)
                except NoFaceError:
                    failures["no_face"] += 1
                    continue
                except PoseRejectedError:
                    failures["pose_rejected"] += 1
                    continue
                if photo.landmarks.method != "face_mesh":  # only Face Detection found it
                    failures["no_face"] += 1
                    continue
                records.append({
                    "split": "train" if view < config.train_views else "heldout",
                    "image": photo.image, "mask": photo.mask,
                    "K": np.asarray(photo.K, np.float32),
                    "world_to_camera": np.asarray(photo.world_to_camera, np.float32),
                    **{key: rendered[key] for key in ("true_mask", "true_depth", "true_K",
                                                      "true_world_to_camera", "true_landmarks")},
                    "source": f"faces/{item}/view_{view:02d}",
                    "reprojection_error_px": round(float(photo.reprojection_error_px), 4),
                    "pose": photo.info,
                    "head_fit": head_fit(face_points(photo.landmarks), photo.K, photo.world_to_camera),
                    "true_yaw_pitch_deg": [round(yaw, 4), round(pitch, 4)],
                    "texture": identity.texture_name,
                    "render_attempts": attempt + 1,
                })
                break
            else:
                if view < config.train_views:
                    reason = max(failures, key=failures.get)
                    return skip(item, reason, f"MediaPipe found no usable face in {config.max_attempts} "
                                f"renders of training view {view} ({dict(failures)})")
        return ItemResult(item=item, records=records)
