"""Readers of the paper's evaluation sets in their published folder layouts: 3DFAW and HUMBI (face).

Neither set can be downloaded here (both need a request to their organisers), so these readers follow the
layouts as published and have only met small folders that the tests write in the same layout, never the
real data. ``export.evaluation`` runs the protocols on what they return.

**3DFAW** (Gross et al. / 3DFAW challenge, ECCV 2016 workshop), as DepthNet (Moniz et al., NeurIPS 2018;
github.com/joelmoniz/DepthNets, ``depthnet-pytorch/util.py`` and ``prepare_dataset.py``) reads the release::

    ROOT/train_img/<id>.jpg     ROOT/train_lm/<id>_lm.csv
    ROOT/valid_img/<id>.jpg     ROOT/valid_lm/<id>_lm.csv
    ROOT/list_valid_test.txt    optional: "<id>,valid|test,<orientation>" per line (DepthNet's split of
                                the valid images: 225 test images, 75 each left / center / right)

Each ``_lm.csv`` holds 66 lines ``x,y,z``: x, y in the image's pixels, z the landmark's depth in the same
pixel units (DepthNet divides x by the width, y by the height and z by the mean side). Taken here as
continuous pixel coordinates; which way z points is not checked on real data.

**HUMBI** face session (Yu et al., CVPR 2020; github.com/zhixuany/HUMBI, README and ``face/config.m``)::

    ROOT/subject_<n>/face/intrinsic.txt, extrinsic.txt
    ROOT/subject_<n>/face/<frame, 8 digits>/image_cropped/image<camera, 7 digits>.jpg
    ROOT/subject_<n>/face/<frame>/image_cropped/list.txt   "<camera> <xmin> <xmax> <ymin> <ymax>" per line:
                                                            the crop on the 1920 x 1080 original

``intrinsic.txt``: three header lines, then per camera a line "<ignored> <camera>" and the 3 x 3 K (of the
original image). ``extrinsic.txt``: three header lines, then per camera a line "<ignored> <camera>", the
camera centre C (3 numbers) and the 3 x 3 rotation R, world to camera (HUMBI projects with
M = K R [I | -C]), in metres. HUMBI ships no image-space foreground masks for faces.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

FAW_LANDMARKS = 66  # 3DFAW's landmarks per image
FAW_SUBSETS = ("test", "valid", "train")


@dataclass(frozen=True)
class FawImage:
    """One 3DFAW image: ``name`` (its id), ``image_path``, ``landmarks`` (66, 3) float64 x, y (pixels of
    the image) and z as stored, ``orientation`` (left / center / right from the split list, or None)."""

    name: str
    image_path: Path
    landmarks: np.ndarray
    orientation: str | None = None


def read_3dfaw_landmarks(path: Path) -> np.ndarray:
    """(66, 3) float64 from one ``<id>_lm.csv`` (lines "x,y,z"); ValueError naming the file otherwise."""
    try:
        rows = [line.split(",") for line in Path(path).read_text().splitlines() if line.strip()]
        points = np.array([[float(v) for v in row[:3]] for row in rows], dtype=np.float64)
    except (OSError, ValueError, IndexError) as err:
        raise ValueError(f"{path} is not a 3DFAW landmark file of 'x,y,z' lines ({err}).") from None
    if points.shape != (FAW_LANDMARKS, 3) or not np.isfinite(points).all():
        raise ValueError(f"{path} holds {points.shape[0]} landmarks; a 3DFAW file has {FAW_LANDMARKS} "
                         "'x,y,z' lines.")
    return points


def read_3dfaw(root: Path, subset: str | None = None) -> list[FawImage]:
    """The images of one 3DFAW subset with their landmarks, sorted by id.

    subset: "test" (the split list's test ids, images from valid_img), "valid" (the list's valid ids, or
    every valid_img image without a list), "train" (every train_img image); None: "test" when
    ``list_valid_test.txt`` exists, else "valid". An image without its landmark file is an error.
    """
    root = Path(root)
    listing = root / "list_valid_test.txt"
    if subset is None:
        subset = "test" if listing.is_file() else "valid"
    if subset not in FAW_SUBSETS:
        raise ValueError(f"Unknown 3DFAW subset {subset!r}; use one of {', '.join(FAW_SUBSETS)}.")
    folder = "train" if subset == "train" else "valid"
    images, marks = root / f"{folder}_img", root / f"{folder}_lm"
    if not images.is_dir() or not marks.is_dir():
        raise ValueError(f"{root} is not a 3DFAW folder: it needs {folder}_img/ and {folder}_lm/.")
    orientations: dict[str, str | None]
    if subset == "train" or not listing.is_file():
        if subset == "test":
            raise ValueError(f"{listing} is missing, so the 3DFAW test subset is unknown; use "
                             "--3dfaw-subset valid.")
        orientations = {p.stem: None for p in sorted(images.glob("*.jpg"))}
    else:
        orientations = {}
        for line in listing.read_text().splitlines():
            parts = [part.strip() for part in line.split(",")]
            if len(parts) >= 2 and parts[1] == subset:
                orientations[parts[0]] = parts[2] if len(parts) > 2 else None
    if not orientations:
        raise ValueError(f"{root} has no 3DFAW images in its {subset} subset.")
    found = []
    for name in sorted(orientations):
        image_path, lm_path = images / f"{name}.jpg", marks / f"{name}_lm.csv"
        if not image_path.is_file() or not lm_path.is_file():
            raise ValueError(f"3DFAW image {name} needs {image_path} and {lm_path}.")
        found.append(FawImage(name, image_path, read_3dfaw_landmarks(lm_path), orientations[name]))
    return found


@dataclass(frozen=True)
class HumbiView:
    """One HUMBI face image: subject ("subject_<n>"), frame (8 digits), camera, image_path, crop (xmin,
    xmax, ymin, ymax) on the original image, K (3, 3) of the original image, world_to_camera (3, 4)
    [R | -R C] in HUMBI's world (metres)."""

    subject: str
    frame: str
    camera: int
    image_path: Path
    crop: tuple[float, float, float, float]
    K: np.ndarray
    world_to_camera: np.ndarray


def _camera_blocks(path: Path, rows: int) -> dict[int, np.ndarray]:
    """HUMBI camera file -> {camera: (rows, 3) float64}: three header lines, then per camera a line
    "<ignored> <camera>" and ``rows`` lines of three numbers."""
    try:
        lines = [line.split() for line in Path(path).read_text().splitlines() if line.strip()][3:]
        if len(lines) % (rows + 1):
            raise ValueError(f"{len(lines)} lines after the header, not a multiple of {rows + 1}")
        blocks = {}
        for start in range(0, len(lines), rows + 1):
            camera = int(lines[start][1])
            block = lines[start + 1:start + rows + 1]
            blocks[camera] = np.array([[float(v) for v in line[:3]] for line in block])
            if blocks[camera].shape != (rows, 3):
                raise ValueError(f"camera {camera} has a short row")
    except (OSError, ValueError, IndexError) as err:
        raise ValueError(f"{path} is not a HUMBI camera file ({err}).") from None
    return blocks


def read_humbi_cameras(face_dir: Path) -> dict[int, tuple[np.ndarray, np.ndarray]]:
    """{camera: (K (3, 3), world_to_camera (3, 4))} from ``face/intrinsic.txt`` and ``face/extrinsic.txt``."""
    intrinsics = _camera_blocks(Path(face_dir) / "intrinsic.txt", 3)
    extrinsics = _camera_blocks(Path(face_dir) / "extrinsic.txt", 4)
    cameras = {}
    for camera in sorted(set(intrinsics) & set(extrinsics)):
        centre, rotation = extrinsics[camera][0], extrinsics[camera][1:]
        world_to_camera = np.concatenate([rotation, (-rotation @ centre)[:, None]], axis=1)
        cameras[camera] = (intrinsics[camera], world_to_camera)
    return cameras


def read_humbi_crops(path: Path) -> dict[int, tuple[float, float, float, float]]:
    """{camera: (xmin, xmax, ymin, ymax)} from an ``image_cropped/list.txt``."""
    crops = {}
    try:
        for line in Path(path).read_text().splitlines():
            parts = line.split()
            if parts:
                crops[int(float(parts[0]))] = tuple(float(v) for v in parts[1:5])
    except (OSError, ValueError) as err:
        raise ValueError(f"{path} is not a HUMBI crop list ({err}).") from None
    return crops


IMAGE_NAME = re.compile(r"image(\d+)\.(jpg|png)$")


def read_humbi_face(root: Path, subjects: set[str] | None = None) -> list[HumbiView]:
    """Every face image of the chosen subjects (all when None) that has a camera and a crop, sorted by
    (subject, frame, camera). ValueError when the folder has no HUMBI face session."""
    root = Path(root)
    sessions = sorted(p for p in root.glob("subject_*/face") if p.is_dir())
    if not sessions:
        raise ValueError(f"{root} is not a HUMBI folder: it has no subject_<n>/face/ session.")
    views = []
    for face_dir in sessions:
        subject = face_dir.parent.name
        if subjects is not None and subject not in subjects:
            continue
        cameras = read_humbi_cameras(face_dir)
        for frame_dir in sorted(p for p in face_dir.iterdir() if (p / "image_cropped").is_dir()):
            crops = read_humbi_crops(frame_dir / "image_cropped" / "list.txt")
            for image_path in sorted((frame_dir / "image_cropped").iterdir()):
                match = IMAGE_NAME.fullmatch(image_path.name)
                if match is None:
                    continue
                camera = int(match.group(1))
                if camera in cameras and camera in crops:
                    K, w2c = cameras[camera]
                    crop = crops[camera]
                    views.append(HumbiView(subject, frame_dir.name, camera, image_path, crop, K, w2c))
    return sorted(views, key=lambda v: (v.subject, v.frame, v.camera))
