"""Calibrate the 468-point mesh template on faces renders: `python -m dataset.mesh_template`.

    python -m dataset.mesh_template --seed 1 --identities 100 --views 3 --out pose/data/mesh_template.json
    python -m dataset.mesh_template --posed --seed 1 --identities 300 --views 3 \
        --out pose/data/mesh_posed_template.json

Renders views of the ``faces`` source (``render_landmark_set``: the benchmark's renders, a view Face
Mesh does not find redrawn as the source does), keeps those textured by a portrait the template frame
was measured on (``--textures``, default astronaut and grace_hopper and their mirrors; see below),
triangulates each of the 468 Face Mesh points from its 2D detections under the true cameras and makes
the result mirror-symmetric (``pose.mesh_template``), and writes it as the template method
``face_mesh_all``, with its provenance (seed, counts, per-point error under the true cameras). With
``--posed`` it triangulates the posed template instead (``face_mesh_posed``: each point moves linearly
with sin(yaw) and sin(pitch), ``pose.mesh_template.triangulate_posed``) from the mean of the plain and
the attention Face Mesh's points (``pose.mesh_template.mean_mesh_points``), as the default solve
(``PoseConfig.solve_points="mesh_posed"``) reads them.

The shipped ``pose/data/mesh_template.json`` comes from seed 1; ``benchmarks/face_cameras.py`` evaluates
on seed 0 and refuses to measure the shipped template on its calibration seed.

Why not the cameraman's texture: the ``faces`` source maps each portrait onto the mesh through that
photo's own Face Mesh landmarks, and the cameraman's (a 70-px face turned 55° aside) are off: on renders
textured by it, Face Mesh's landmarks lie 8–10 px RMS from the true vertices at 256², against 3–4 px for
the other portraits, with the eye and mouth corners shifted 5–8 px in one direction (docs/MEDIAPIPE.md).
Its painted features are not where its vertices are, so its renders would teach the template the
texture's misregistration. Since generator version 3 the faces source draws no cameraman texture unless
asked (``FacesConfig.cameraman_texture``); ``--textures cameraman`` asks for it.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from common.atomic import atomic_path
from common.conventions import default_intrinsics, orbit_camera
from dataset import faces
from pose import NoFaceError, detect_landmarks, save_template
from pose.landmarks import run_graph
from pose.mesh_template import (
    MESH_METHOD,
    MESH_POSED_METHOD,
    N_MESH_POINTS,
    POSE_FEATURES,
    PosedTemplate,
    mean_mesh_points,
    mirror_index,
    symmetrise,
    symmetrise_posed,
    triangulate,
    triangulate_posed,
)
from pose.template import MESH_POSED_TEMPLATE_PATH, MESH_TEMPLATE_PATH

REGISTERED_TEXTURES = faces.CALIBRATION_PORTRAITS  # the portraits whose texture sits on its vertices
RENDER_KEYS = ("identity", "texture", "mesh", "mesh_refined", "vertices", "world_to_camera")


def render_landmark_set(identities: int, views: int, seed: int, size: int, cache: Path | None = None,
                        cameraman_texture: bool = False) -> tuple[list[dict], int]:
    """Renders of the faces source that Face Mesh finds, with their landmarks and truth.

    Each render's dict: identity (int), texture (the portrait lending the texture), mesh (468, 3) Face
    Mesh output in pixels (x·W, y·H, z·W), mesh_refined (478, 3) the same from Face Mesh with
    ``refine_landmarks=True`` (its attention model; NaN where it finds no face), vertices (468, 3) the
    true head-unit vertices, world_to_camera (3, 4) the true camera (K: ``default_intrinsics(size,
    size)``). ``cameraman_texture``: the faces source's opt-in (``FacesConfig.cameraman_texture``; off,
    the textures are astronaut and grace_hopper only). With ``cache``, the set is read from (or written
    to) one ``.npz`` in that folder per (seed, identities, views, size, generator version, cameraman).

    Returns:
        (renders, how many renders were redrawn because Face Mesh found no face).
    """
    path = None
    if cache is not None:
        path = Path(cache) / (f"face_landmarks_seed{seed}_{identities}x{views}_{size}"
                              f"_v{faces.GENERATOR_VERSION}{'_cameraman' if cameraman_texture else ''}.npz")
        if path.exists():
            data = np.load(path)
            renders = [dict(zip(RENDER_KEYS, values, strict=True))
                       for values in zip(*(data[k] for k in RENDER_KEYS), strict=True)]
            for render in renders:
                render["identity"], render["texture"] = int(render["identity"]), str(render["texture"])
            return renders, int(data["misses"])
    config = faces.FacesConfig(seed=seed, render_size=size, resolution=size,
                               cameraman_texture=cameraman_texture)
    K = default_intrinsics(size, size)
    renders, misses = [], 0
    for identity in range(identities):
        face = faces.make_identity(config, identity)
        for view in range(views):
            for attempt in range(config.max_attempts):
                yaw, pitch = faces.view_angles(config, identity, view, attempt)
                world_to_camera = orbit_camera(yaw, pitch, config.camera_distance)
                image, _ = faces.render_face(face, K, world_to_camera, size, config.supersample)
                try:
                    landmarks = detect_landmarks(image)
                except NoFaceError:
                    landmarks = None
                if landmarks is None or landmarks.method != "face_mesh":
                    misses += 1
                    continue
                refined = run_graph("face_mesh", image, max_num_faces=1, min_detection_confidence=0.5,
                                    refine_landmarks=True)
                mesh_refined = np.full((478, 3), np.nan)
                if refined.multi_face_landmarks:
                    mesh_refined = np.array([[p.x * size, p.y * size, p.z * size]
                                             for p in refined.multi_face_landmarks[0].landmark])
                renders.append({"identity": identity, "texture": face.texture_name, "mesh": landmarks.mesh,
                                "mesh_refined": mesh_refined, "vertices": face.vertices[:faces.N_MESH],
                                "world_to_camera": world_to_camera})
                break
    if path is not None and renders:
        with atomic_path(path, keep_suffix=True) as tmp:
            np.savez(tmp, misses=misses, **{k: np.stack([r[k] for r in renders]) for k in RENDER_KEYS})
    return renders, misses


def registered(render: dict, textures: tuple[str, ...] = REGISTERED_TEXTURES) -> bool:
    """Whether a render's texture comes from one of these portraits (mirrored or not)."""
    return render["texture"].split(" ")[0] in textures


def mean_mesh() -> np.ndarray:
    """(468, 3) the mean of the template portraits' Face Mesh shapes, in head units (the world frame)."""
    bases = [b.vertices for b in faces.base_faces() if b.name.split(" ")[0] in faces.CALIBRATION_PORTRAITS]
    return np.mean(bases, axis=0)


def render_points(render: dict, key: str) -> np.ndarray:
    """(468, 2) one ``render_landmark_set`` render's 2D points: "mesh" (the plain Face Mesh's),
    "mesh_refined" (the attention model's first 468) or "mean_of_models" (their mean, the points the
    default solve fits: ``pose.mesh_template.mean_mesh_points``)."""
    if key == "mean_of_models":
        return mean_mesh_points(render["mesh"], render["mesh_refined"])
    return render[key][:N_MESH_POINTS, :2]


def calibrate(renders: list[dict], size: int, key: str = "mesh") -> tuple[np.ndarray, np.ndarray]:
    """Triangulate the mesh template from renders with known cameras.

    Args:
        renders: ``render_landmark_set`` dicts; key: their points (``render_points``); renders where
            they are NaN (the attention model found no face) are left out.
        size: the renders' side (their K is ``default_intrinsics(size, size)``).

    Returns:
        (template (468, 3) mirror-symmetric head units, per-point RMS pixel error (468,) of the
        detections against the template's projections under the true cameras).
    """
    points = [render_points(r, key) for r in renders]
    usable = [i for i, p in enumerate(points) if np.all(np.isfinite(p))]
    points = np.stack([points[i] for i in usable])
    cameras = np.stack([renders[i]["world_to_camera"] for i in usable])
    K = default_intrinsics(size, size)
    template = symmetrise(triangulate(points, K, cameras), mirror_index(mean_mesh()))
    from pose.camera import project

    error = np.sqrt(np.mean(np.sum((project(template, K, cameras) - points) ** 2, axis=-1), axis=0))
    return template, error


def calibrate_posed(renders: list[dict], size: int, key: str = "mean_of_models"
                    ) -> tuple[PosedTemplate, np.ndarray]:
    """Triangulate the posed template from renders with known cameras, on their ``key`` points
    (``render_points``; the default: the points the default solve fits).

    Returns:
        (the mirror-symmetric ``PosedTemplate``, per-point RMS pixel error (468,) of the points against
        its projections under the true cameras and poses).
    """
    points = np.stack([render_points(r, key) for r in renders])
    cameras = np.stack([r["world_to_camera"] for r in renders])
    K = default_intrinsics(size, size)
    model = PosedTemplate(symmetrise_posed(triangulate_posed(points, K, cameras), mirror_index(mean_mesh())))
    from pose.camera import project

    projected = np.stack([project(model.at(c[:, :3]), K, c) for c in cameras])
    error = np.sqrt(np.mean(np.sum((projected - points) ** 2, axis=-1), axis=0))
    return model, error


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=1,
                        help="generator seed (default: 1; the benchmark evaluates seed 0)")
    parser.add_argument("--identities", type=int, default=100, help="identities rendered (default: 100)")
    parser.add_argument("--views", type=int, default=3, help="views per identity (default: 3)")
    parser.add_argument("--render-size", type=int, default=256, help="render side in pixels (default: 256)")
    parser.add_argument("--textures", nargs="+", default=list(REGISTERED_TEXTURES),
                        choices=faces.PORTRAIT_NAMES,
                        help="portraits whose textured renders are used (default: "
                             f"{' '.join(REGISTERED_TEXTURES)})")
    parser.add_argument("--posed", action="store_true",
                        help="triangulate the posed template (points moving with the pose) of the default "
                             "solve from the mean of the plain and attention Face Mesh points (default: the "
                             "fixed template of the plain points)")
    parser.add_argument("--out", default=None,
                        help="template JSON to write (default: the shipped pose/data/mesh_template.json, or "
                             "pose/data/mesh_posed_template.json with --posed)")
    parser.add_argument("--cache", default=None, help="folder to keep the renders' landmarks in (.npz)")
    args = parser.parse_args(argv)
    if args.identities < 1 or args.views < 1 or args.render_size < 64:
        parser.error("--identities and --views must be at least 1 and --render-size at least 64.")
    renders, misses = render_landmark_set(args.identities, args.views, args.seed, args.render_size,
                                          Path(args.cache) if args.cache else None,
                                          cameraman_texture="cameraman" in args.textures)
    used = [r for r in renders if registered(r, tuple(args.textures))]
    if len(used) < 20:
        parser.error(f"only {len(used)} renders have the chosen textures; render more identities.")
    if args.posed:
        used = [r for r in used if np.all(np.isfinite(r["mesh_refined"]))]
        model, error = calibrate_posed(used, args.render_size)
        method = ("python -m dataset.mesh_template --posed: each Face Mesh point (mediapipe 0.10.21; the "
                  "mean of the plain and the attention model's) triangulated as A + sin(yaw) B + "
                  "sin(pitch) C from its 2D detections in faces renders with known cameras and poses, then "
                  "made mirror-symmetric (pose/mesh_template.py, dataset/mesh_template.py).")
    else:
        template, error = calibrate(used, args.render_size)
        method = ("python -m dataset.mesh_template: each Face Mesh point (mediapipe 0.10.21) triangulated "
                  "from its 2D detections in faces renders with known cameras, then made mirror-symmetric "
                  "(pose/mesh_template.py, dataset/mesh_template.py).")
    provenance = {
        "method": method,
        "faces_seed": args.seed, "identities": args.identities, "views": args.views,
        "render_size": args.render_size, "generator_version": faces.GENERATOR_VERSION,
        "textures": list(args.textures), "renders": len(renders), "renders_used": len(used),
        "renders_redrawn_no_face": misses,
        "rms_error_px_under_true_cameras": {"median": round(float(np.median(error)), 3),
                                            "max": round(float(error.max()), 3)},
    }
    out = args.out or (MESH_POSED_TEMPLATE_PATH if args.posed else MESH_TEMPLATE_PATH)
    if args.posed:
        save_template({MESH_POSED_METHOD: model.frontal}, out, provenance,
                      pose_terms=dict(zip(POSE_FEATURES, model.coefficients[1:], strict=True)))
    else:
        save_template({MESH_METHOD: template}, out, provenance)
    print(f"{len(used)} of {len(renders)} renders (seed {args.seed}, textures {' '.join(args.textures)}); "
          f"per-point RMS error under the true cameras {np.median(error):.2f} px median; wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
