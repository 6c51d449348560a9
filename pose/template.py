"""The canonical 3D landmark template and the project's scale, stated once.

World convention (DESIGN.md): OpenCV axes (x right, y down), the face looks towards −z, and the
origin is the approximate head centre. The template is in *head units*:

- the outer eye corners are `EYE_DISTANCE` = 1.2 units apart;
- the origin lies `NOSE_DEPTH` = 1.4 units behind the nose tip (half a typical nose-tip-to-back-of-head
  length of 21 cm, with 1 unit ≈ 7.5 cm when the eye corners are 9 cm apart), and vertically at the
  FFHQ crop centre (eye midpoint + 0.1 × eye-to-mouth);
- with focal length `FOCAL_FACTOR` × image width and the camera `CAMERA_DISTANCE` = 7 units from the
  origin, a frontal face fills an FFHQ-like crop.

`pose/data/template.json` is written by `python -m pose.make_template` from Face Mesh's own 3D output;
see that module for how.
"""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path

import numpy as np

EYE_DISTANCE = 1.2
NOSE_DEPTH = 1.4
CAMERA_DISTANCE = 7.0
FOCAL_FACTOR = 2.0
HEAD_RADIUS = 1.5
TEMPLATE_PATH = Path(__file__).with_name("data") / "template.json"


@lru_cache(maxsize=8)
def _read(path: str) -> dict:
    try:
        return json.loads(Path(path).read_text())
    except FileNotFoundError as err:
        raise FileNotFoundError(f"Template {path} is missing; run `python -m pose.make_template`.") from err


def load_template(method: str = "face_mesh", path: str | Path | None = None) -> np.ndarray:
    """The canonical 3D points of one landmark method, in head units.

    Args:
        method: "face_mesh" (5 points) or "face_detection" (4 points, the fallback); the point order
            matches `FaceLandmarks.points` of that method.
        path: a template JSON (default: the shipped `pose/data/template.json`, or a refined one
            written by `save_template`).

    Returns:
        (P, 3) float64, a fresh copy.

    >>> load_template().shape
    (5, 3)
    """
    data = _read(str(path or TEMPLATE_PATH))
    if method not in data["points"]:
        raise ValueError(f"Unknown landmark method {method!r}; the template has {sorted(data['points'])}.")
    return np.array(data["points"][method], np.float64)


def template_metadata(path: str | Path | None = None) -> dict:
    """The template file's full contents (names, units, provenance), for manifests."""
    return json.loads(json.dumps(_read(str(path or TEMPLATE_PATH))))


def save_template(points: dict[str, np.ndarray], path: str | Path, provenance: dict) -> None:
    """Write a template JSON atomically (temp file + os.replace) in `load_template`'s format."""
    import os

    path = Path(path)
    body = {
        "format": 1,
        "units": f"head units: outer eye corners {EYE_DISTANCE} apart; "
                 f"origin {NOSE_DEPTH} behind the nose tip",
        "axes": "OpenCV: x right, y down, the face looks towards -z",
        "points": {name: np.round(np.asarray(p, np.float64), 6).tolist() for name, p in points.items()},
        "provenance": provenance,
    }
    tmp = path.with_suffix(path.suffix + f".tmp{os.getpid()}")
    tmp.write_text(json.dumps(body, indent=1))
    os.replace(tmp, path)
    _read.cache_clear()
