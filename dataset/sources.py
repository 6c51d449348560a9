"""Photo sources (ffhq, celeba, celebahq, folder): which files an item is, and how one becomes records.

A source is a small swappable component with three jobs:

- ``list_items(data_root)``: the sorted relative paths of its items (a photo file, an SRN instance),
  and a skip entry for each path the listing could not use (a dangling link, an unreadable folder);
- ``item_files(data_root, item)``: the files whose (path, size, mtime) make up the source fingerprint;
- ``process(data_root, item, config)``: an ``ItemResult`` with cache records, or why it was skipped.

``process`` runs inside worker processes, so sources are plain picklable dataclasses.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from dataset.config import PrepareConfig

# Below this many photos per worker, spawning workers costs more than it saves (benchmarks/prepare.py:
# with the default two-model solve, 2 workers break even at about 25 photos on 2 cores).
PHOTOS_PER_WORKER = 50
IMAGE_EXTENSIONS = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp"})


def default_workers() -> int:
    """One worker per CPU core this process may use."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


class DataRootError(ValueError):
    """The data root is missing or holds nothing this source can use."""


@dataclass
class ItemResult:
    """What one source item produced: records for the cache, or a skip reason (one of ``REASONS``)."""

    item: str
    records: list[dict] = field(default_factory=list)
    skipped: dict | None = None


REASONS = {
    "not_an_image": "not an image file",
    "unreadable": "unreadable, truncated or corrupt image",
    "tiny": "image smaller than min_image_side",
    "no_face": "no face found",
    "pose_rejected": "camera fit rejected (reprojection error above threshold)",
    "bad_instance": "SRN instance with missing or inconsistent files",
    "bad_path": "dangling or looping symbolic link, or a folder that cannot be read",
    "error": "unexpected error while preparing (a bug: please report it)",
}


RENDER_RADIUS = 2.0  # the renderer's bounding sphere (models.render.RenderConfig.radius; README, Scale)
MAX_OUTSIDE_FRACTION = 0.05  # photos whose face may reach beyond the render sphere before a build stops


def head_fit(pixels: np.ndarray, K: np.ndarray, world_to_camera: np.ndarray) -> dict:
    """Does the face lie inside the render sphere at its solved camera?

    Args:
        pixels: (P, 2) face points in the training image (Face Mesh's 468 points, the face oval up to the
            forehead; or the fallback's keypoints and face box corners).
        K: (3, 3) and world_to_camera: (3, 4), the solved camera at the training resolution.

    Returns:
        JSON-ready {"face_radius", "camera_distance", "fits"}: a face seen from distance d within an angle
        a of the ray to the world origin lies at radius at least d · sin(a) (``dataset.srn`` bounds SRN
        objects the same way), so face_radius = d · sin(largest a) over the points. It fits when that is
        within the render sphere (radius ``RENDER_RADIUS``) and the camera is outside it. With the
        shipped template (head units), a face's bound is about 1.5; a template in other units scales it.

    >>> K = np.array([[128.0, 0, 32], [0, 128, 32], [0, 0, 1]])
    >>> head_fit(np.array([[32.0, 32], [32, 62]]), K, np.c_[np.eye(3), [0, 0, 7]])["fits"]
    True
    """
    rays = np.linalg.solve(K, np.c_[pixels, np.ones(len(pixels))].T)
    rays /= np.linalg.norm(rays, axis=0, keepdims=True)
    distance = float(np.linalg.norm(world_to_camera[:, 3]))
    to_origin = world_to_camera[:, 3] / max(distance, 1e-12)  # the origin's direction, camera frame
    angle = float(np.arccos(np.clip(to_origin @ rays, -1.0, 1.0)).max())
    radius = distance * np.sin(min(angle, np.pi / 2))
    return {"face_radius": round(float(radius), 4), "camera_distance": round(distance, 4),
            "fits": bool(radius <= RENDER_RADIUS and distance > RENDER_RADIUS)}


def face_points(landmarks) -> np.ndarray:
    """(P, 2) pixels that outline a ``pose.FaceLandmarks`` face: the whole mesh, or (fallback) the
    keypoints and the face box's corners."""
    if landmarks.mesh is not None:
        return landmarks.mesh[:, :2]
    x0, y0, x1, y1 = landmarks.box
    return np.concatenate([landmarks.points, [[x0, y0], [x1, y0], [x0, y1], [x1, y1]]])


def template_settings(pose_config) -> dict:
    """The landmark templates' tables that a ``pose.PoseConfig``'s camera solve reads, for a source's
    fingerprint (so a template rewritten in place triggers a rebuild): the 5-point one (and the
    fallback's), and the 468-point one of an all-points solve (with its pose terms for "mesh_posed")."""
    from pose import template_metadata
    from pose.template import MESH_METHOD, MESH_POSED_METHOD

    settings = {"template_points": template_metadata(pose_config.template_path)["points"]}
    if pose_config.solve_points == "mesh":
        settings["mesh_template_points"] = template_metadata(pose_config.mesh_template_path,
                                                             MESH_METHOD)["points"]
    elif pose_config.solve_points == "mesh_posed":
        posed = template_metadata(pose_config.mesh_template_path, MESH_POSED_METHOD)
        settings["mesh_posed_template"] = {"points": posed["points"], "pose_terms": posed.get("pose_terms")}
    return settings


def template_records(pose_config) -> dict:
    """For a manifest: the landmark templates the cameras were solved against (points, units and
    provenance), the 5-point one and, for an all-points solve, the 468-point one."""
    from pose import template_metadata
    from pose.template import MESH_METHOD, MESH_POSED_METHOD

    records = {"template": template_metadata(pose_config.template_path)}
    if pose_config.solve_points in ("mesh", "mesh_posed"):
        method = MESH_POSED_METHOD if pose_config.solve_points == "mesh_posed" else MESH_METHOD
        records["mesh_template"] = template_metadata(pose_config.mesh_template_path, method)
    return records


def head_fit_summary(fits: list[dict]) -> dict | None:
    """The manifest's ``head_fit``: how many training photos' faces reach beyond the render sphere."""
    if not fits:
        return None
    radii = np.array([f["face_radius"] for f in fits])
    return {"photos": len(fits), "outside_render_sphere": int(sum(not f["fits"] for f in fits)),
            "median_face_radius": round(float(np.median(radii)), 3),
            "max_face_radius": round(float(radii.max()), 3), "render_radius": RENDER_RADIUS}


def check_head_fit(summary: dict | None) -> None:
    """Raise DataRootError (one sentence naming the fix) when more than ``MAX_OUTSIDE_FRACTION`` of the
    photos put the face beyond the render sphere at their solved cameras."""
    if not summary or summary["outside_render_sphere"] <= MAX_OUTSIDE_FRACTION * summary["photos"]:
        return
    raise DataRootError(
        f"{summary['outside_render_sphere']} of {summary['photos']} photos put the face beyond the render "
        f"sphere (radius {RENDER_RADIUS:g}) at their solved cameras (face radius up to "
        f"{summary['max_face_radius']:.3g}, median {summary['median_face_radius']:.3g}; about 1.5 in head "
        "units), so the landmark template is not in head units (outer eye corners 1.2 apart): use the "
        "shipped template, or one written by python -m pose.fit_template, with --template.")


def skip(item: str, reason: str, detail: str) -> ItemResult:
    """An ItemResult that records why ``item`` was skipped (one line in skipped.json and the summary)."""
    return ItemResult(item=item, skipped={"file": item, "reason": reason, "detail": detail})


def walk(root: Path, problems: list[dict]):
    """``os.walk(root)`` that follows symbolic links to folders, but never into a loop, yields only files
    that can be opened, and appends a ``bad_path`` skip entry to ``problems`` for each dangling or
    looping link and each folder it may not read (os.walk alone drops those silently, and a later stat
    of a dangling link fails). Hidden files and folders (a leading dot) are left out, so editor and OS
    droppings do not count as data. Yields (directory, subdirs, files) like os.walk; prune subdirs to
    stop descending."""
    root = Path(root)

    def note(path, detail: str) -> None:
        problems.append(skip(Path(path).relative_to(root).as_posix(), "bad_path", detail).skipped)

    def unreadable(err: OSError) -> None:
        note(err.filename, f"cannot list this folder ({err.strerror}); check its permissions")

    walked = set()
    for directory, subdirs, files in os.walk(root, onerror=unreadable, followlinks=True):
        real = os.path.realpath(directory)
        if real in walked:  # a link back up the tree, or a second link to a folder already listed
            note(directory, f"a symbolic link to {real}, which is already listed (a link loop?)")
            subdirs[:] = []
            continue
        walked.add(real)
        subdirs[:] = sorted(d for d in subdirs if not d.startswith("."))
        usable = []
        for name in sorted(f for f in files if not f.startswith(".")):
            path = Path(directory, name)
            try:
                path.stat()
            except OSError as err:  # os.walk lists a dangling or looping link as a file
                what = "a symbolic link to nothing" if path.is_symlink() else "cannot be read"
                note(path, f"{what} ({err.strerror})")
                continue
            usable.append(name)
        yield directory, subdirs, usable


def walk_files(root: Path) -> tuple[list[str], list[dict]]:
    """Every usable file under ``root`` at any depth, as sorted POSIX relative paths, and the skip
    entries of the paths that could not be used (see ``walk``)."""
    problems: list[dict] = []
    found = [Path(directory, f).relative_to(root).as_posix()
             for directory, _subdirs, files in walk(root, problems) for f in files]
    return sorted(found), problems


@dataclass(frozen=True)
class PhotoSource:
    """Single-view photos, one identity each; cameras from ``pose.prepare_photo``."""

    name: str
    default_framing: str
    layout: str
    background = "network"
    has_template = True
    needs_data_root = True

    def list_items(self, data_root: Path) -> tuple[list[str], list[dict]]:
        """Every (non-hidden) file at any depth: non-images are listed so they get a skip line."""
        return walk_files(data_root)

    def item_files(self, data_root: Path, item: str) -> list[str]:
        return [item]

    def settings(self, config: PrepareConfig) -> dict:
        """The settings that change this source's output (they enter the fingerprint), including the
        template's points, so a template refined in place also triggers a rebuild."""
        return {"resolution": config.resolution, "framing": self.framing(config),
                "min_image_side": config.min_image_side, "pose": config.to_dict()["pose"],
                **template_settings(config.pose)}

    def manifest_extra(self, config: PrepareConfig) -> dict:
        return template_records(config.pose)

    def default_workers(self, n_items: int) -> int:
        """One per core, but in-process for small folders: a spawned worker's start-up (imports,
        MediaPipe graphs) costs as much as preparing many photos, so a worker pays off only with
        ``PHOTOS_PER_WORKER`` photos or more (README, Benchmarks, ``benchmarks/prepare.py``)."""
        return max(1, min(default_workers(), n_items // PHOTOS_PER_WORKER))

    def framing(self, config: PrepareConfig) -> str:
        return config.framing or self.default_framing

    def process(self, data_root: Path, item: str, config: PrepareConfig) -> ItemResult:
        """Load, check and prepare one photo; every known failure becomes a skip reason, never a crash."""
        from pose import ImageError, NoFaceError, PoseRejectedError, load_image, prepare_photo

        if Path(item).suffix.lower() not in IMAGE_EXTENSIONS:
            return skip(item, "not_an_image", f"extension {Path(item).suffix or '(none)'!r} is not one of "
                        f"{sorted(IMAGE_EXTENSIONS)}")
        try:
            image = load_image(Path(data_root) / item, min_side=1)
        except ImageError as err:
            return skip(item, "unreadable", str(err))
        height, width = image.shape[:2]
        if min(height, width) < config.min_image_side:
            return skip(item, "tiny", f"{width}x{height} px is below min_image_side={config.min_image_side}")
        try:
            photo = prepare_photo(image, config.resolution, self.framing(config), config=config.pose)
        except NoFaceError as err:
            return skip(item, "no_face", str(err))
        except PoseRejectedError as err:
            return skip(item, "pose_rejected", str(err))
        record = {
            "split": "train",
            "image": photo.image,
            "mask": photo.mask,
            "K": np.asarray(photo.K, np.float32),
            "world_to_camera": np.asarray(photo.world_to_camera, np.float32),
            "source": item,
            "reprojection_error_px": round(float(photo.reprojection_error_px), 4),
            "pose": photo.info,
            "head_fit": head_fit(face_points(photo.landmarks), photo.K, photo.world_to_camera),
        }
        return ItemResult(item=item, records=[record])


PHOTO_SOURCES = {
    "ffhq": PhotoSource("ffhq", "aligned", "FFHQ PNGs at any folder depth, e.g. DIR/00000/00000.png "
                        "(images1024x1024 or thumbnails128x128 as shipped)"),
    "celeba": PhotoSource("celeba", "aligned", "CelebA JPGs as shipped, e.g. "
                          "DIR/img_align_celeba/000001.jpg"),
    "celebahq": PhotoSource("celebahq", "aligned", "CelebA-HQ images as shipped, e.g. DIR/0.jpg or "
                            "DIR/CelebA-HQ-img/0.jpg"),
    "folder": PhotoSource("folder", "landmarks", "any photos (JPG, PNG, ...) at any folder depth, one face "
                          "each"),
}
