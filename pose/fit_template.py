"""Refine the landmark template over a folder of photos: `python -m pose.fit_template DIR --out PATH`.

This is the paper's dataset-wide step: Face Mesh landmarks of every photo (or of a seeded random subset,
`--limit`), one camera per photo from the shipped template, then `refine_template` over all of them.
Only Face Mesh detections with an accepted fit take part; unreadable files, photos without a face and
Face Detection fallbacks (a different point set) are counted and skipped. The Face Detection template is
copied unchanged. Use the result with `PoseConfig(template_path=PATH, solve_points="paper5")` (it is a
5-point template; the default all-points solve uses `pose/data/mesh_template.json`).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from tqdm import tqdm

from .camera import solve_camera
from .config import PoseConfig
from .errors import ImageError, NoFaceError
from .framing import aligned_box, landmark_box
from .image_io import load_image
from .landmarks import detect_landmarks
from .refine import TemplateRefinement, refine_template
from .template import load_template, save_template, template_metadata

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff"}


def list_photos(root: Path, limit: int | None = None, seed: int = 0) -> list[Path]:
    """Image files under `root` (any depth), sorted; a seeded random subset of `limit` of them if given."""
    files = sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if limit is not None and limit < len(files):
        chosen = np.random.default_rng(seed).choice(len(files), size=limit, replace=False)
        files = [files[i] for i in sorted(chosen)]
    return files


def fit_template_to_photos(paths: list[Path], framing: str = "aligned", config: PoseConfig | None = None,
                           progress: bool = True) -> tuple[TemplateRefinement, dict[str, int]]:
    """Landmarks and cameras of each photo (in its framed square), then one joint refinement.

    Returns:
        (the refinement, counts of used and skipped photos by reason).
    """
    config = config or PoseConfig()
    base = load_template("face_mesh", config.template_path)
    points, sizes, fits = [], [], []
    counts = {"used": 0, "unreadable": 0, "no_face": 0, "fallback_detector": 0, "pose_rejected": 0}
    for path in tqdm(paths, desc="landmarks", disable=not progress):
        try:
            image = load_image(path, config.min_image_side)
            landmarks = detect_landmarks(image, config)
        except ImageError:
            counts["unreadable"] += 1
            continue
        except NoFaceError:
            counts["no_face"] += 1
            continue
        if landmarks.method != "face_mesh":
            counts["fallback_detector"] += 1
            continue
        if framing == "aligned":
            box = aligned_box(image.shape[:2])
        else:
            box = landmark_box(landmarks, config.crop_scale)
        framed = landmarks.points - [box.x0, box.y0]
        fit = solve_camera(framed, base, (box.side, box.side), config=config)
        if not fit.accepted:
            counts["pose_rejected"] += 1
            continue
        points.append(framed)
        sizes.append((box.side, box.side))
        fits.append(fit)
        counts["used"] += 1
    if counts["used"] < 2:
        raise ValueError(f"Only {counts['used']} photos have usable landmarks ({counts}); the template needs "
                         "at least 2 (preferably hundreds) of varied poses.")
    return refine_template(np.stack(points), base, sizes, fits, config), counts


def main(argv: list[str] | None = None) -> TemplateRefinement:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("images", type=Path, help="folder of photos (searched at any depth)")
    parser.add_argument("--out", type=Path, required=True, help="template JSON to write")
    parser.add_argument("--limit", type=int, default=None, help="use a seeded random subset of this many")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--framing", choices=("aligned", "landmarks"), default="aligned")
    args = parser.parse_args(argv)
    if not args.images.is_dir():
        parser.error(f"{args.images} is not a folder; pass a folder of face photos.")
    paths = list_photos(args.images, args.limit, args.seed)
    result, counts = fit_template_to_photos(paths, args.framing)
    provenance = template_metadata()["provenance"]
    provenance["refined"] = {
        "images": str(args.images), "framing": args.framing, "limit": args.limit, "seed": args.seed,
        "counts": counts, "solver": result.solver,
        "rms_error_px_before": round(result.error_before_px, 4),
        "rms_error_px_after": round(result.error_after_px, 4),
    }
    save_template({"face_mesh": result.template, "face_detection": load_template("face_detection")},
                  args.out, provenance)
    print(f"{counts['used']} photos, RMS landmark error {result.error_before_px:.3f} px -> "
          f"{result.error_after_px:.3f} px ({result.solver}); skipped {counts}; wrote {args.out}")
    return result


if __name__ == "__main__":
    main()
