"""The canonical 3D landmark template and the project's scale, stated once.

World convention (docs/ARCHITECTURE.md, Conventions): OpenCV axes (x right, y down), the face looks
towards −z, and the origin is the approximate head centre. The template is in *head units*:

- the outer eye corners are `EYE_DISTANCE` = 1.2 units apart;
- the origin lies `NOSE_DEPTH` = 1.4 units behind the nose tip (half a typical nose-tip-to-back-of-head
  length of 21 cm, with 1 unit ≈ 7.5 cm when the eye corners are 9 cm apart), and vertically at the
  FFHQ crop centre (eye midpoint + 0.1 × eye-to-mouth);
- with focal length `FOCAL_FACTOR` × image width and the camera `CAMERA_DISTANCE` = 7 units from the
  origin (both stated in `common.conventions`), a frontal face fills an FFHQ-like crop.

`pose/data/template.json` (the paper's 5 points and the Face Detection fallback's 4) is written by
`python -m pose.make_template` from Face Mesh's own 3D output; see that module for how.
`pose/data/mesh_template.json` (all 468 Face Mesh points, method `"face_mesh_all"`) and
`pose/data/mesh_posed_template.json` (the same points moving with the pose, method `"face_mesh_posed"`,
the default solve's) are written by `python -m dataset.mesh_template`, calibrated on renders with known
cameras (`pose.mesh_template`).
"""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path

import numpy as np

from common.atomic import write_json

EYE_DISTANCE = 1.2
NOSE_DEPTH = 1.4
HEAD_RADIUS = 1.5
TEMPLATE_PATH = Path(__file__).with_name("data") / "template.json"
MESH_TEMPLATE_PATH = Path(__file__).with_name("data") / "mesh_template.json"
MESH_POSED_TEMPLATE_PATH = Path(__file__).with_name("data") / "mesh_posed_template.json"
MESH_METHOD = "face_mesh_all"  # the template method of the 468-point set (pose.mesh_template)
MESH_POSED_METHOD = "face_mesh_posed"  # the same points, moving with the pose (pose.mesh_template)


def default_template_path(method: str) -> Path:
    """The shipped file holding a method's template: the mesh template for "face_mesh_all", the posed one
    for "face_mesh_posed", else `pose/data/template.json`."""
    return {MESH_METHOD: MESH_TEMPLATE_PATH, MESH_POSED_METHOD: MESH_POSED_TEMPLATE_PATH}.get(method,
                                                                                             TEMPLATE_PATH)


class TemplateError(ValueError):
    """A landmark template file that is missing or not a template; the message says which and what to do."""


@lru_cache(maxsize=8)
def _read(path: str) -> dict:
    fix = ("pass a template written by `python -m pose.fit_template`, or leave --template out for the "
           "shipped one")
    try:
        data = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise TemplateError(f"Template {path} does not exist; {fix}.") from None
    except (OSError, UnicodeDecodeError) as err:
        raise TemplateError(f"Template {path} cannot be read ({err}); {fix}.") from None
    except json.JSONDecodeError as err:
        raise TemplateError(f"Template {path} is not JSON (line {err.lineno}, column {err.colno}: "
                            f"{err.msg}); {fix}.") from None
    points = data.get("points") if isinstance(data, dict) else None
    if not isinstance(points, dict) or not points:
        raise TemplateError(f"Template {path} has no \"points\" table of landmark methods; {fix}.")
    for method, value in points.items():
        array = np.asarray(value, dtype=object)
        try:
            ok = array.ndim == 2 and array.shape[1] == 3 and np.isfinite(array.astype(np.float64)).all()
        except (TypeError, ValueError):
            ok = False
        if not ok:
            raise TemplateError(f"Template {path}: the {method!r} points are not a list of finite "
                                f"(x, y, z) triples; {fix}.")
    return data


def load_template(method: str = "face_mesh", path: str | Path | None = None) -> np.ndarray:
    """The canonical 3D points of one landmark method, in head units.

    Args:
        method: "face_mesh" (the paper's 5 points), "face_detection" (4 points, the fallback; the point
            order of both matches `FaceLandmarks.points` of that method) or "face_mesh_all" (all 468
            Face Mesh points, in Face Mesh's order).
        path: a template JSON (default: the shipped one holding `method`, `default_template_path`; or
            one written by `save_template`).

    Returns:
        (P, 3) float64, a fresh copy.

    >>> load_template().shape
    (5, 3)
    """
    data = _read(str(path or default_template_path(method)))
    if method not in data["points"]:
        raise ValueError(f"Unknown landmark method {method!r}; the template has {sorted(data['points'])}.")
    return np.array(data["points"][method], np.float64)


def template_metadata(path: str | Path | None = None, method: str = "face_mesh") -> dict:
    """The template file's full contents (names, units, provenance), for manifests: the file at `path`,
    else the shipped one holding `method` (`default_template_path`)."""
    return json.loads(json.dumps(_read(str(path or default_template_path(method)))))


def save_template(points: dict[str, np.ndarray], path: str | Path, provenance: dict,
                  pose_terms: dict[str, np.ndarray] | None = None) -> None:
    """Write a template JSON atomically (``common.atomic``) in `load_template`'s format; a posed template
    (`pose.mesh_template.PosedTemplate`) also has ``pose_terms``, one (P, 3) table per pose feature."""
    path = Path(path)
    body = {
        "format": 1,
        "units": f"head units: outer eye corners {EYE_DISTANCE} apart; "
                 f"origin {NOSE_DEPTH} behind the nose tip",
        "axes": "OpenCV: x right, y down, the face looks towards -z",
        "points": {name: np.round(np.asarray(p, np.float64), 6).tolist() for name, p in points.items()},
        "provenance": provenance,
    }
    if pose_terms is not None:
        body["pose_terms"] = {name: np.round(np.asarray(p, np.float64), 6).tolist()
                              for name, p in pose_terms.items()}
    write_json(path, body)
    _read.cache_clear()
