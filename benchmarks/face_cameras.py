"""Benchmark: the landmark camera solve's error against the truth, on the faces source's renders.

    python benchmarks/face_cameras.py --identities 70 --views 3 --json face_cameras.json

Each identity of ``dataset.faces`` is rendered from ``--views`` seeded cameras (yaw ±35°, pitch ±15°; a
view MediaPipe does not find is redrawn, as the faces source does), Face Mesh runs once per render, and
every point set in ``--points`` solves the camera with ``pose.solve_camera``, exactly as photo
preparation does (at the render size: the solve is scale-free, so the training resolution changes
nothing but the pixel units). Reported per point set:

- rotation error: the angle of R_solved · R_trueᵀ (degrees), median and 90th percentile;
- relative rotation error: the same for the rotation between two views of one identity (it cancels a
  per-identity offset, e.g. the template's fit to that face);
- translation error |t_solved − t_true| (head units; the true camera is 7 units away) and the camera
  centre error;
- yaw, pitch, roll: median absolute error, and the slope of solved against true angle (1 = unbiased);
- the floor: the same solve on the exact projections of the true vertices (no landmark noise: what is
  left is the template's fit to individual faces);
- with ``--refine``: the same after ``pose.refine_template`` over all renders (the paper's joint
  refinement of the template and every camera).

Point sets: ``paper5`` (the 5 points of the official code against the shipped template) and
``stableN`` (the 5 points plus N more of Face Mesh's points in mirror pairs, away from the face oval,
the lips and the eyelids, ranked by their median landmark error on renders of another seed (seed 1);
their template is the calibration faces' mean in head units, made mirror-symmetric, as
``pose.make_template`` makes the shipped one).
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from common.atomic import write_json  # noqa: E402
from common.conventions import default_intrinsics, orbit_camera  # noqa: E402
from dataset import faces  # noqa: E402 (after the sys.path line, so it runs from any directory)
from pose import NoFaceError, detect_landmarks, load_template, solve_camera, yaw_pitch_roll  # noqa: E402
from pose.camera import project  # noqa: E402
from pose.landmarks import MESH_INDICES  # noqa: E402
from pose.refine import refine_template  # noqa: E402

# Mirror pairs of Face Mesh points ranked by median landmark error (seed 1, 113 renders at 256²),
# excluding the face oval, the lips (but the corners) and the eyelids (but the corners).
RANKED_PAIRS = [209, 429, 47, 277, 198, 420, 126, 355, 22, 252, 114, 343, 217, 437, 49, 279, 121, 350, 100,
                329, 231, 451, 131, 360, 142, 371, 232, 452, 26, 256, 48, 278, 120, 349, 102, 331, 188, 412,
                174, 399]


def rotation_angle(rotation: np.ndarray) -> float:
    """Angle in degrees of a (3, 3) rotation."""
    return float(np.degrees(np.arccos(np.clip((np.trace(rotation) - 1.0) / 2.0, -1.0, 1.0))))


def point_sets(names: list[str]) -> dict[str, tuple[list[int], np.ndarray]]:
    """Each point set's Face Mesh indices (the 5 paper points first, so the refinement's gauge holds)
    and its (P, 3) template in head units."""
    five = list(MESH_INDICES.values())
    bases = faces.base_faces()
    mean = np.mean([b.vertices for b in bases if b.name.split(" ")[0] in faces.CALIBRATION_PORTRAITS], 0)
    mirror = np.array([np.argmin(np.linalg.norm(mean - mean[i] * [-1, 1, 1], axis=1)) for i in range(468)])
    sets = {}
    for name in names:
        if name == "paper5":
            sets[name] = (five, load_template("face_mesh"))
            continue
        if not name.startswith("stable") or not name[6:].isdigit() or int(name[6:]) > len(RANKED_PAIRS):
            raise ValueError(f"Unknown point set {name!r}; use paper5 or stableN with N <= "
                             f"{len(RANKED_PAIRS)}.")
        index = five + RANKED_PAIRS[:int(name[6:])]
        template = (mean[index] + mean[mirror[index]] * [-1, 1, 1]) / 2  # mirror-symmetric
        sets[name] = (index, template)
    return sets


def render_set(identities: int, views: int, seed: int, size: int) -> tuple[list[dict], dict]:
    """Renders MediaPipe finds (Face Mesh), with their meshes and truth; and the counts of misses."""
    config = faces.FacesConfig(seed=seed, render_size=size, resolution=size)
    K = default_intrinsics(size, size)
    renders, misses = [], 0
    for identity in range(identities):
        face = faces.sample_identity(faces.identity_rng(config, identity), config.shape_noise)
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
                renders.append({"identity": identity, "mesh": landmarks.mesh[:, :2],
                                "vertices": face.vertices[:faces.N_MESH], "world_to_camera": world_to_camera})
                break
    return renders, {"renders": len(renders), "renders_without_a_face": misses}


def errors(fits, renders, K) -> dict:
    """Error statistics of one list of fits against the truth (module docstring)."""
    rotation, translation, centre, angles, truth, by_identity = [], [], [], [], [], {}
    for fit, render in zip(fits, renders, strict=True):
        solved, true = fit.world_to_camera, render["world_to_camera"]
        rotation.append(rotation_angle(solved[:, :3] @ true[:, :3].T))
        translation.append(float(np.linalg.norm(solved[:, 3] - true[:, 3])))
        centre.append(float(np.linalg.norm(solved[:, :3].T @ solved[:, 3] - true[:, :3].T @ true[:, 3])))
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
        "rotation_deg": stats(rotation),
        "relative_rotation_deg": stats(relative) if relative else None,
        "translation": stats(translation),
        "translation_percent_of_distance": stats(100 * np.array(translation) / np.linalg.norm(
            [r["world_to_camera"][:, 3] for r in renders], axis=1)),
        "camera_centre": stats(centre),
        **{f"{name}_abs_error_deg": round(float(np.median(np.abs(angles[:, k] - truth[:, k]))), 3)
           for k, name in enumerate(("yaw", "pitch", "roll"))},
        **{f"{name}_slope": round(float(np.polyfit(truth[:, k], angles[:, k], 1)[0]), 3)
           for k, name in enumerate(("yaw", "pitch"))},
        "rejected": int(sum(not fit.accepted for fit in fits)),
    }


def measure(renders: list[dict], sets: dict, size: int, refine: bool) -> dict:
    """Per point set: errors of the solve on MediaPipe's landmarks, on the exact projections (floor),
    and after joint refinement."""
    K = default_intrinsics(size, size)
    results = {}
    for name, (index, template) in sets.items():
        start = time.perf_counter()
        points = np.stack([r["mesh"][index] for r in renders])
        fits = [solve_camera(p, template, (size, size)) for p in points]
        seconds = (time.perf_counter() - start) / len(renders)
        exact = [solve_camera(project(r["vertices"][index], K, r["world_to_camera"]), template, (size, size))
                 for r in renders]
        results[name] = {"points": len(index), "solve_ms": round(1000 * seconds, 2),
                         "landmarks": errors(fits, renders, K), "exact_landmarks": errors(exact, renders, K)}
        if refine:
            refined = refine_template(points, template, (size, size), fits)
            results[name]["refined"] = {**errors(refined.fits, renders, K),
                                        "rms_px_before": round(refined.error_before_px, 3),
                                        "rms_px_after": round(refined.error_after_px, 3)}
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--identities", type=int, default=70, help="identities rendered (default: 70)")
    parser.add_argument("--views", type=int, default=3, help="views per identity (default: 3)")
    parser.add_argument("--seed", type=int, default=0, help="generator seed (default: 0)")
    parser.add_argument("--render-size", type=int, default=256, help="render side in pixels (default: 256)")
    parser.add_argument("--points", nargs="+", default=["paper5", "stable10", "stable40"],
                        help="point sets: paper5, stableN (default: paper5 stable10 stable40)")
    parser.add_argument("--refine", action="store_true", help="also measure after joint template refinement")
    parser.add_argument("--json", default=None, help="write the results to this JSON file")
    args = parser.parse_args(argv)
    if args.identities < 1 or args.views < 1 or args.render_size < 64:
        parser.error("--identities and --views must be at least 1 and --render-size at least 64.")
    try:
        sets = point_sets(args.points)
    except ValueError as err:
        parser.error(str(err))
    start = time.perf_counter()
    renders, counts = render_set(args.identities, args.views, args.seed, args.render_size)
    render_seconds = time.perf_counter() - start
    results = measure(renders, sets, args.render_size, args.refine)
    report = {"machine": {"platform": platform.platform(), "processor": platform.processor(),
                          "python": platform.python_version()},
              "settings": vars(args), **counts, "render_and_landmarks_seconds": round(render_seconds, 1),
              "results": results}
    print(f"{counts['renders']} renders ({counts['renders_without_a_face']} redrawn: no face found), "
          f"{render_seconds:.0f} s to render and detect")
    for name, result in results.items():
        for kind in ("landmarks", "exact_landmarks", "refined"):
            if kind not in result:
                continue
            r = result[kind]
            relative = r["relative_rotation_deg"] or {"median": float("nan"), "p90": float("nan")}
            print(f"{name:>9} ({result['points']:>2} points) {kind:<16} "
                  f"rotation {r['rotation_deg']['median']:5.2f}° "
                  f"median / {r['rotation_deg']['p90']:5.2f}° p90, relative {relative['median']:5.2f}° / "
                  f"{relative['p90']:5.2f}°, translation {r['translation']['median']:.3f} / "
                  f"{r['translation']['p90']:.3f} units, |Δyaw| {r['yaw_abs_error_deg']:.2f}° "
                  f"|Δpitch| {r['pitch_abs_error_deg']:.2f}° |Δroll| {r['roll_abs_error_deg']:.2f}°, "
                  f"slopes yaw {r['yaw_slope']:.2f} pitch {r['pitch_slope']:.2f}, rejected {r['rejected']}")
    if args.json:
        write_json(Path(args.json), report)
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
