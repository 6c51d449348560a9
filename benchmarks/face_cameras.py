"""Benchmark: the landmark camera solve's error against the truth, on the faces source's renders.

    python benchmarks/face_cameras.py --identities 120 --views 3 --json face_cameras.json --cache /tmp/fc

Each identity of ``dataset.faces`` is rendered from ``--views`` seeded cameras (yaw ±35°, pitch ±15°; a
view Face Mesh does not find is redrawn, as the faces source does; ``dataset.mesh_template.
render_landmark_set``), Face Mesh runs once per render (and once more with its attention model,
``refine_landmarks=True``), and every candidate in ``--candidates`` finds the camera from the landmarks,
at the render size (the solve is scale-free, so the training resolution changes nothing but the pixel
units). Candidates:

- ``mesh_posed``: the mean of the plain and the attention Face Mesh's 468 points against the shipped
  posed template (``pose/data/mesh_posed_template.json``), solved jointly with the pose: the default
  ``PoseConfig(solve_points="mesh_posed")``; refused when its calibration seed is the evaluated one;
- ``mesh_posed_plain``: the plain Face Mesh's 468 points against a posed template triangulated from them on
  the calibration renders (what the posed template does without the attention model);
- ``mesh_mean_of_models``: the mean of both models' points against a fixed template triangulated from them
  on the calibration renders (what the second model does without the posed template);
- ``paper5``: the official code's 5 points (eye and mouth corners, nose tip) against the shipped 5-point
  template (``PoseConfig(solve_points="paper5")``);
- ``paper5_calibrated``: the same 5 points against their template triangulated on the calibration renders;
- ``mesh_mean``: all 468 Face Mesh points against the mean mesh of the template portraits (uncalibrated);
- ``mesh``: all 468 points against the shipped mesh template (``pose/data/mesh_template.json``,
  ``PoseConfig(solve_points="mesh")``, the default before the posed template); refused when its
  calibration seed is the evaluated one;
- ``mesh_all_textures``: the same against a template triangulated on all calibration renders, the
  cameraman's texture too with ``--cameraman-texture`` (without it every render is registered, so this is
  the mesh template triangulated afresh on this generator's calibration renders);
- ``mesh_attention``: the 468 points of Face Mesh's attention model against a template triangulated from
  its own detections on the calibration renders;
- ``facemesh_3d``: Face Mesh's own 3D output (x, y, z) aligned to the mean mesh by a 3D similarity
  (rotation; translation from the similarity's scale, weak perspective);
- ``facemesh_3d_calibrated``: the same against a 3D template calibrated on the calibration renders (each
  one's Face Mesh 3D output, scaled and shifted onto the truth at the true rotation, mapped back to the
  world and averaged).

Calibrated templates are fitted on renders of ``--calibration-seed`` (default 1) with their true
cameras, only those textured by the template portraits (``dataset.mesh_template``, REGISTERED_TEXTURES)
unless said otherwise; the evaluation seed (``--seed``, default 0) must differ.

By default the faces source textures its identities with astronaut and grace_hopper only (generator
version 3); ``--cameraman-texture`` brings back the cameraman's texture (misregistered on the mesh:
docs/MEDIAPIPE.md) for both seeds, as the generator before version 3 drew it.

Reported per candidate, over all renders and separately over the registered textures (astronaut,
grace_hopper) and, with ``--cameraman-texture``, the cameraman's:

- rotation error: the angle of R_solved · R_trueᵀ (degrees), median and 90th percentile;
- relative rotation error: the same for the rotation between two views of one identity;
- translation error |t_solved − t_true| (head units; the true camera is 7 units away);
- yaw, pitch, roll: median absolute error, and the slope of solved against true angle (1 = unbiased);
- for the 2D solves, the floor: the same solve on the exact projections of the true vertices (for the
  calibrated templates, which hold Face Mesh's bias, this is not a floor but a check of that bias);
- with ``--refine``: the 5-point candidates after ``pose.refine_template`` over all renders (the
  paper's joint refinement of the template and every camera).
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from common.atomic import write_json  # noqa: E402 (after the sys.path line, so it runs from any directory)
from common.conventions import default_intrinsics  # noqa: E402
from dataset import mesh_template as calibration  # noqa: E402
from pose import load_template, solve_camera, yaw_pitch_roll  # noqa: E402
from pose.camera import make_fit, project  # noqa: E402
from pose.landmarks import MESH_INDICES  # noqa: E402
from pose.mesh_template import MESH_METHOD, load_posed_template  # noqa: E402
from pose.refine import refine_template  # noqa: E402
from pose.template import MESH_POSED_TEMPLATE_PATH, MESH_TEMPLATE_PATH  # noqa: E402

CANDIDATES = ("mesh_posed", "mesh_posed_plain", "mesh_mean_of_models", "paper5", "paper5_calibrated",
              "mesh_mean", "mesh", "mesh_all_textures", "mesh_attention", "facemesh_3d",
              "facemesh_3d_calibrated")
FIVE = list(MESH_INDICES.values())
ALL = list(range(468))


def rotation_angle(rotation: np.ndarray) -> float:
    """Angle in degrees of a (3, 3) rotation."""
    return float(np.degrees(np.arccos(np.clip((np.trace(rotation) - 1.0) / 2.0, -1.0, 1.0))))


def similarity(source: np.ndarray, target: np.ndarray) -> tuple[np.ndarray, float, np.ndarray]:
    """Rotation (3, 3), scale and shift (3,) minimising |s R source + shift − target|² (Umeyama; (P, 3)
    points each)."""
    source_mean, target_mean = source.mean(0), target.mean(0)
    a, b = source - source_mean, target - target_mean
    u, sigma, vt = np.linalg.svd(b.T @ a)
    d = np.diag([1.0, 1.0, np.sign(np.linalg.det(u @ vt))])
    rotation = u @ d @ vt
    scale = float(np.sum(sigma * np.diag(d)) / np.sum(a**2))
    return rotation, scale, target_mean - scale * rotation @ source_mean


def facemesh_3d_camera(mesh: np.ndarray, template: np.ndarray, K: np.ndarray) -> np.ndarray:
    """(3, 4) world-to-camera from Face Mesh's 3D output (468, 3) pixels (x·W, y·H, z·W) aligned to a
    (468, 3) template: the similarity's rotation, and the translation that puts the points' centroid at
    depth f / scale on the ray through their image centroid (weak perspective)."""
    observed = np.c_[mesh[:, :2] - K[:2, 2], mesh[:, 2]]
    rotation, scale, _ = similarity(template, observed)
    depth = K[0, 0] / scale
    centroid = np.r_[observed[:, :2].mean(0) * depth / K[0, 0], depth]
    return np.c_[rotation, centroid - rotation @ template.mean(0)]


def facemesh_3d_template(renders: list[dict], start: np.ndarray, K: np.ndarray, rounds: int = 3
                         ) -> np.ndarray:
    """(468, 3) template for ``facemesh_3d_camera``: each render's Face Mesh 3D output, scaled and
    shifted onto the template turned by the true rotation, turned back to the world, averaged."""
    template = start
    for _ in range(rounds):
        back = []
        for render in renders:
            rotation = render["world_to_camera"][:, :3]
            observed = np.c_[render["mesh"][:, :2] - K[:2, 2], render["mesh"][:, 2]]
            turned = template @ rotation.T
            a, b = turned - turned.mean(0), observed - observed.mean(0)
            scale = float(np.sum(a * b) / np.sum(a**2))
            back.append((b / scale + turned.mean(0)) @ rotation)
        template = np.mean(back, axis=0)
    return template


def errors(fits, renders) -> dict:
    """Error statistics of one list of fits against the truth (module docstring)."""
    rotation, translation, angles, truth, by_identity = [], [], [], [], {}
    for fit, render in zip(fits, renders, strict=True):
        solved, true = fit.world_to_camera, render["world_to_camera"]
        rotation.append(rotation_angle(solved[:, :3] @ true[:, :3].T))
        translation.append(float(np.linalg.norm(solved[:, 3] - true[:, 3])))
        angles.append(yaw_pitch_roll(solved[:, :3]))
        truth.append(yaw_pitch_roll(true[:, :3]))
        by_identity.setdefault(render["identity"], []).append((solved[:, :3], true[:, :3]))
    relative = [rotation_angle((a[0] @ b[0].T) @ (a[1] @ b[1].T).T)
                for views in by_identity.values() for i, a in enumerate(views) for b in views[i + 1:]]
    angles, truth = np.array(angles), np.array(truth)

    def stats(values) -> dict:
        return {"median": round(float(np.median(values)), 3),
                "p90": round(float(np.percentile(values, 90)), 3)}

    return {
        "renders": len(fits),
        "rotation_deg": stats(rotation),
        "relative_rotation_deg": stats(relative) if relative else None,
        "translation": stats(translation),
        **{f"{name}_abs_error_deg": round(float(np.median(np.abs(angles[:, k] - truth[:, k]))), 3)
           for k, name in enumerate(("yaw", "pitch", "roll"))},
        **{f"{name}_mean_error_deg": round(float(np.mean(angles[:, k] - truth[:, k])), 3)
           for k, name in enumerate(("yaw", "pitch", "roll"))},
        **{f"{name}_slope": round(float(np.polyfit(truth[:, k], angles[:, k], 1)[0]), 3)
           for k, name in enumerate(("yaw", "pitch"))},
        "rejected": int(sum(not fit.accepted for fit in fits)),
    }


def grouped(fits, renders) -> dict:
    """``errors`` over all renders, the registered textures' and the cameraman's."""
    groups = {"all": [True] * len(renders),
              "registered_textures": [calibration.registered(r) for r in renders]}
    groups["cameraman_texture"] = [not keep for keep in groups["registered_textures"]]
    return {name: errors([f for f, keep in zip(fits, mask, strict=True) if keep],
                         [r for r, keep in zip(renders, mask, strict=True) if keep])
            for name, mask in groups.items() if any(mask)}


def check_calibration_seed(path: Path, seed: int) -> None:
    """Refuse to measure a shipped template on the seed it was calibrated on."""
    provenance = json.loads(path.read_text())["provenance"]
    if provenance.get("faces_seed") == seed:
        raise SystemExit(f"error: the shipped template {path.name} was calibrated on seed {seed}; "
                         "evaluate another seed (--seed) so that the benchmark does not measure on its own "
                         "calibration set.")


def shipped_mesh_template(seed: int) -> np.ndarray:
    """The shipped mesh template, after checking it was not calibrated on the evaluated seed."""
    check_calibration_seed(MESH_TEMPLATE_PATH, seed)
    return load_template(MESH_METHOD)


def solvers(names: list[str], calibration_renders: list[dict], seed: int, size: int) -> dict:
    """Per candidate: (landmark key, point indices (P,), template (P, 3), "2d" or "3d")."""
    K = default_intrinsics(size, size)
    registered = [r for r in calibration_renders if calibration.registered(r)]
    mean = calibration.mean_mesh()
    table = {}
    for name in names:
        if name == "mesh_posed":
            check_calibration_seed(MESH_POSED_TEMPLATE_PATH, seed)
            table[name] = ("mean_of_models", ALL, load_posed_template(), "2d")
        elif name == "mesh_posed_plain":
            template = calibration.calibrate_posed(registered, size, "mesh")[0]
            table[name] = ("mesh", ALL, template, "2d")
        elif name == "mesh_mean_of_models":
            template = calibration.calibrate(registered, size, "mean_of_models")[0]
            table[name] = ("mean_of_models", ALL, template, "2d")
        elif name == "paper5":
            table[name] = ("mesh", FIVE, load_template("face_mesh"), "2d")
        elif name == "paper5_calibrated":
            table[name] = ("mesh", FIVE, calibration.calibrate(registered, size)[0][FIVE], "2d")
        elif name == "mesh_mean":
            table[name] = ("mesh", ALL, mean, "2d")
        elif name == "mesh":
            table[name] = ("mesh", ALL, shipped_mesh_template(seed), "2d")
        elif name == "mesh_all_textures":
            table[name] = ("mesh", ALL, calibration.calibrate(calibration_renders, size)[0], "2d")
        elif name == "mesh_attention":
            template = calibration.calibrate(registered, size, "mesh_refined")[0]
            table[name] = ("mesh_refined", ALL, template, "2d")
        elif name == "facemesh_3d":
            table[name] = ("mesh", ALL, mean, "3d")
        elif name == "facemesh_3d_calibrated":
            table[name] = ("mesh", ALL, facemesh_3d_template(registered, mean, K), "3d")
        else:
            raise ValueError(f"Unknown candidate {name!r}; use some of {', '.join(CANDIDATES)}.")
    return table


def landmarks_of(render: dict, key: str) -> np.ndarray:
    """(468, 2 or 3) the render's landmarks from ``key`` ("mesh", "mesh_refined", or "mean_of_models":
    the points the default solve fits, ``dataset.mesh_template.render_points``), the plain Face Mesh's
    where the attention model found no face."""
    if key == "mean_of_models":
        return calibration.render_points(render, key)
    mesh = render[key][:468]
    return mesh if np.all(np.isfinite(mesh)) else render["mesh"]


def measure(renders: list[dict], table: dict, size: int, refine: bool) -> dict:
    """Per candidate: errors on Face Mesh's landmarks, on the exact projections (2D solves: the floor)
    and, with ``refine``, after joint refinement (5-point candidates)."""
    K = default_intrinsics(size, size)
    results = {}
    for name, (key, index, template, kind) in table.items():
        start = time.perf_counter()
        meshes = [landmarks_of(r, key) for r in renders]
        if kind == "2d":
            fits = [solve_camera(m[index, :2], template, (size, size)) for m in meshes]
        else:
            fits = [make_fit(m[FIVE, :2], template[FIVE], K, facemesh_3d_camera(m, template, K), (size, size))
                    for m in meshes]
        seconds = (time.perf_counter() - start) / len(renders)
        result = {"points": len(index), "solve_ms": round(1000 * seconds, 2),
                  "landmarks": grouped(fits, renders)}
        if kind == "2d":
            exact = [solve_camera(project(r["vertices"][index], K, r["world_to_camera"]), template,
                                  (size, size)) for r in renders]
            result["exact_landmarks"] = grouped(exact, renders)
            if refine and len(index) == 5:
                points = np.stack([m[index, :2] for m in meshes])
                refined = refine_template(points, template, (size, size), fits)
                result["refined"] = {**grouped(refined.fits, renders),
                                     "rms_px_before": round(refined.error_before_px, 3),
                                     "rms_px_after": round(refined.error_after_px, 3)}
        results[name] = result
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--identities", type=int, default=120, help="identities rendered (default: 120)")
    parser.add_argument("--views", type=int, default=3, help="views per identity (default: 3)")
    parser.add_argument("--seed", type=int, default=0, help="generator seed evaluated (default: 0)")
    parser.add_argument("--calibration-seed", type=int, default=1,
                        help="generator seed of the calibration renders (default: 1)")
    parser.add_argument("--calibration-identities", type=int, default=300,
                        help="identities of the calibration renders (default: 300, × --views, as for the "
                             "shipped posed template)")
    parser.add_argument("--render-size", type=int, default=256, help="render side in pixels (default: 256)")
    parser.add_argument("--candidates", nargs="+", default=list(CANDIDATES), choices=CANDIDATES,
                        help="camera solves to measure (default: all)")
    parser.add_argument("--refine", action="store_true",
                        help="also measure the 5-point candidates after joint template refinement")
    parser.add_argument("--cameraman-texture", action="store_true",
                        help="also texture identities with the misregistered cameraman portrait, as the "
                             "generator before version 3 did (default: astronaut and grace_hopper only)")
    parser.add_argument("--json", default=None, help="write the results to this JSON file")
    parser.add_argument("--cache", default=None,
                        help="folder to keep the renders' landmarks in (.npz), reused by later runs")
    args = parser.parse_args(argv)
    if args.identities < 1 or args.views < 1 or args.render_size < 64 or args.calibration_identities < 1:
        parser.error("--identities, --calibration-identities and --views must be at least 1 and "
                     "--render-size at least 64.")
    if args.calibration_seed == args.seed:
        parser.error("--calibration-seed must differ from --seed: templates are not fitted on the renders "
                     "they are measured on.")
    cache = Path(args.cache) if args.cache else None
    start = time.perf_counter()
    renders, misses = calibration.render_landmark_set(args.identities, args.views, args.seed,
                                                      args.render_size, cache, args.cameraman_texture)
    calibration_renders, _ = calibration.render_landmark_set(args.calibration_identities, args.views,
                                                             args.calibration_seed, args.render_size, cache,
                                                             args.cameraman_texture)
    render_seconds = time.perf_counter() - start
    table = solvers(args.candidates, calibration_renders, args.seed, args.render_size)
    results = measure(renders, table, args.render_size, args.refine)
    counts = {"renders": len(renders), "renders_without_a_face": misses,
              "registered_texture_renders": sum(calibration.registered(r) for r in renders),
              "calibration_renders": len(calibration_renders),
              "calibration_registered_renders": sum(calibration.registered(r) for r in calibration_renders)}
    report = {"machine": {"platform": platform.platform(), "processor": platform.processor(),
                          "python": platform.python_version()},
              "settings": vars(args), **counts, "render_and_landmarks_seconds": round(render_seconds, 1),
              "results": results}
    print(f"{counts['renders']} renders ({counts['registered_texture_renders']} with registered textures; "
          f"{misses} redrawn: no face found), calibration on {counts['calibration_registered_renders']} "
          f"renders of seed {args.calibration_seed}; {render_seconds:.0f} s to render and detect")
    for name, result in results.items():
        for kind in ("landmarks", "exact_landmarks", "refined"):
            if kind not in result:
                continue
            for group in ("all", "registered_textures"):
                r = result[kind][group]
                relative = r["relative_rotation_deg"] or {"median": float("nan"), "p90": float("nan")}
                print(f"{name:>22} ({result['points']:>3} pts) {kind:<15} {group:<19} "
                      f"rotation {r['rotation_deg']['median']:5.2f}° / {r['rotation_deg']['p90']:5.2f}° p90, "
                      f"relative {relative['median']:5.2f}° / {relative['p90']:5.2f}°, translation "
                      f"{r['translation']['median']:.3f} / {r['translation']['p90']:.3f}, |Δypr| "
                      f"{r['yaw_abs_error_deg']:.2f}° {r['pitch_abs_error_deg']:.2f}° "
                      f"{r['roll_abs_error_deg']:.2f}°, slopes {r['yaw_slope']:.2f} {r['pitch_slope']:.2f}")
    if args.json:
        write_json(Path(args.json), report)
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
