"""Render a trained model: training identities, saved latents, random identities, interpolations.

    python render.py --checkpoint CKPT --out renders --identity 0 3 --camera orbit --outputs grid gif
    python render.py --checkpoint CKPT --out renders --source view_00 --camera yaw --size 256
    python render.py --checkpoint CKPT --out renders --latent fits/photo/latent.npy --outputs mp4 mesh
    python render.py --checkpoint CKPT --out renders --random 8 --psi 0.7 --seed 1 --camera fixed
    python render.py --checkpoint CKPT --out renders --interpolate 0 5 --steps 8 --outputs gif grid
    python render.py --checkpoint CKPT --out renders --identity 2 --camera file --camera-file cam.json

Subjects (one row each) x cameras (one column each). Cameras: ``fixed`` (frontal), ``yaw`` (a sweep over
--yaw-range), ``orbit`` (a loop, yaw and pitch), ``file`` (K and [R|t] from .json/.npz). Any --size:
K is rescaled from the training resolution, and rays are rendered in --chunk sized pieces so memory is
bounded at any resolution. Outputs:

    frames  OUT/<subject>/frame_###.png            grid   OUT/grid.png (and depth_grid.png with depth)
    mp4/gif OUT/<subject>.mp4|gif over the cameras (with one camera: OUT/sequence.* over the subjects)
    depth   OUT/<subject>/depth_###.png colour-mapped and depth_###.npy raw ray distances
    mesh    OUT/<subject>.ply and a picture of it, OUT/<subject>_mesh.png (first camera)
    latent  OUT/<subject>.npy (the code rendered)
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from common.atomic import save_npy
from common.conventions import CAMERA_DISTANCE
from export.arguments import (
    add_arch_flag,
    add_field_backend_flag,
    add_skip_empty_flag,
    at_least,
    finite_float,
    positive_float,
)
from export.cameras import (
    default_intrinsics,
    load_camera_file,
    look_at_origin,
    orbit_cameras,
    scale_intrinsics,
    yaw_cameras,
)
from export.inference import (
    latent_mesh,
    load_model,
    random_latents,
    render_path,
    source_name,
    start_renderer,
    surface_depth,
    training_cache,
    training_resolution,
    use_field_backend,
    use_skip_empty,
)
from export.media import colorize_depth, image_grid, save_gif, save_mp4, save_png
from export.mesh import preview_mesh, write_ply
from export.outputs import OutputExistsError, claim_dir, inside, output_name
from models.checkpoint import CheckpointError, LoadedCheckpoint
from renderer.backend import BackendUnavailableError

OUTPUT_KINDS = ("frames", "grid", "mp4", "gif", "depth", "mesh", "latent")
MAX_GRID_COLUMNS = 8


@dataclass
class Subject:
    """One latent to render and the name its files get."""

    name: str
    latent: torch.Tensor


def identity_subjects(model: LoadedCheckpoint, indices: list[int]) -> list[Subject]:
    """Training identities by index into the latent table."""
    subjects = []
    for index in indices:
        if not 0 <= index < model.latents.n:
            raise ValueError(
                f"identity {index} does not exist: the checkpoint has identities 0..{model.latents.n - 1}."
            )
        subjects.append(Subject(f"identity_{index:04d}", model.latents.codes[index].detach().clone()))
    return subjects


def source_subjects(model: LoadedCheckpoint, names: list[str], cache: Path | None) -> list[Subject]:
    """Training identities by (part of) their source file name, looked up in the training cache."""
    from dataset import PreparedDataset

    if cache is None or not Path(cache).is_dir():
        raise ValueError(
            "--source needs the training cache: the checkpoint records none here; pass --cache DIR."
        )
    ds = PreparedDataset(cache, split="train")
    sources = [source_name(s) for s in ds.sources]
    subjects = []
    for name in names:
        matches = [i for i, s in enumerate(sources) if name == s or name == Path(s).name or name in s]
        identities = sorted({int(ds.identities[i]) for i in matches})
        if len(identities) != 1:
            found = "no training image" if not identities else f"{len(identities)} identities"
            raise ValueError(f"--source {name!r} matches {found}; give a longer part of the file name.")
        subjects.append(
            Subject(output_name(Path(name).stem), model.latents.codes[identities[0]].detach().clone())
        )
    return subjects


def latent_file_subjects(model: LoadedCheckpoint, paths: list[Path]) -> list[Subject]:
    """Saved latents (.npy of shape (L,), e.g. from fit.py)."""
    subjects = []
    for path in paths:
        try:
            z = np.load(path, allow_pickle=False)
        except (OSError, ValueError) as err:
            raise ValueError(f"{path} is not a readable .npy latent ({err}).") from None
        z = np.asarray(z, dtype=np.float32).reshape(-1)
        if z.shape[0] != model.latents.dim:
            raise ValueError(
                f"{path} holds {z.shape[0]} values but this checkpoint's latents have {model.latents.dim}."
            )
        name = path.resolve().parent.name if path.stem == "latent" else path.stem
        subjects.append(Subject(output_name(name), torch.from_numpy(z)))
    return subjects


def interpolation_subjects(model: LoadedCheckpoint, a: int, b: int, steps: int) -> list[Subject]:
    """``steps`` codes on the straight line from identity a to identity b (both ends included)."""
    za, zb = (s.latent for s in identity_subjects(model, [a, b]))
    weights = np.linspace(0.0, 1.0, max(steps, 2))
    return [Subject(f"interp_{a}_{b}_{k:02d}", (1 - w) * za + w * zb) for k, w in enumerate(weights)]


def camera_path(
    kind: str,
    K: np.ndarray,
    base: np.ndarray,
    frames: int,
    yaw_range: tuple[float, float],
    camera_file: Path | None,
    size: tuple[int, int],
) -> tuple[np.ndarray, np.ndarray]:
    """(K (3, 3) at ``size``, cameras (N, 3, 4)) for a path kind: fixed | yaw | orbit | file."""
    if kind == "fixed":
        return K, base[None]
    if kind == "yaw":
        return K, yaw_cameras(base, np.linspace(yaw_range[0], yaw_range[1], frames))
    if kind == "orbit":
        return K, orbit_cameras(base, n_frames=frames)
    if kind == "file":
        if camera_file is None:
            raise ValueError(
                "--camera file needs --camera-file PATH (.json or .npz with K and world_to_camera)."
            )
        K_file, cameras, file_size = load_camera_file(camera_file)
        if file_size is not None and file_size != size:
            K_file = scale_intrinsics(K_file, file_size, size)
        return K_file, cameras
    raise ValueError(f"unknown camera path {kind!r}; use fixed, yaw, orbit or file.")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    # No usage block: a mistake is the one line "prog: error: ..." (--help lists every flag).
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        usage=argparse.SUPPRESS,
    )
    parser.add_argument("--checkpoint", required=True, type=Path, help="a checkpoint written by train.py")
    parser.add_argument("--out", required=True, type=Path, help="output folder (must be new or empty)")
    who = parser.add_argument_group("what to render (combine freely; default: identity 0)")
    who.add_argument("--identity", type=int, nargs="+", default=[], help="training identity indices")
    who.add_argument("--source", nargs="+", default=[], help="training identities by source file name")
    who.add_argument("--cache", type=Path, help="training cache for --source (default: from the checkpoint)")
    who.add_argument("--latent", type=Path, nargs="+", default=[], help="saved latents (.npy)")
    who.add_argument("--random", type=at_least(0), default=0, help="this many random identities")
    who.add_argument("--psi", type=finite_float, default=0.7, help="truncation for --random (1 = none)")
    who.add_argument("--seed", type=int, default=0, help="seed for --random")
    who.add_argument("--interpolate", type=int, nargs=2, metavar=("A", "B"), help="identities to blend")
    who.add_argument("--steps", type=at_least(2), default=8, help="codes along --interpolate")
    cams = parser.add_argument_group("cameras")
    cams.add_argument("--camera", default="orbit", choices=["fixed", "yaw", "orbit", "file"])
    cams.add_argument("--frames", type=at_least(1), default=36, help="cameras along yaw/orbit paths")
    cams.add_argument(
        "--yaw-range", type=finite_float, nargs=2, default=[-40.0, 40.0], metavar=("FROM", "TO")
    )
    cams.add_argument("--camera-file", type=Path, help="with --camera file")
    cams.add_argument(
        "--distance", type=positive_float, default=CAMERA_DISTANCE, help="camera distance"
    )
    cams.add_argument("--size", type=at_least(1), help="square output side (default: training resolution)")
    cams.add_argument("--height", type=at_least(1), help="output height (overrides --size)")
    cams.add_argument("--width", type=at_least(1), help="output width (overrides --size)")
    parser.add_argument("--outputs", nargs="+", default=["grid", "gif"], choices=OUTPUT_KINDS)
    parser.add_argument("--fps", type=positive_float, default=18.0)
    parser.add_argument("--mesh-resolution", type=at_least(8), default=128)
    parser.add_argument("--mesh-level", type=float, help="density iso-level (default: read off the model)")
    parser.add_argument(
        "--chunk", type=at_least(1), default=8192, help="rays per rendering chunk (bounds memory)"
    )
    add_arch_flag(parser)
    add_field_backend_flag(parser)
    add_skip_empty_flag(parser)
    parser.add_argument("--force", action="store_true", help="write into a folder that holds results")
    return parser.parse_args(argv)


def collect_subjects(model: LoadedCheckpoint, args: argparse.Namespace) -> list[Subject]:
    """Every subject the flags ask for, in the order: identities, sources, latents, random, interpolation."""
    subjects = identity_subjects(model, args.identity)
    if args.source:
        subjects += source_subjects(model, args.source, args.cache or training_cache(model))
    subjects += latent_file_subjects(model, args.latent)
    if args.random:
        codes = random_latents(model, args.random, args.psi, args.seed)
        subjects += [Subject(f"random_s{args.seed}_{k:03d}", z) for k, z in enumerate(codes)]
    if args.interpolate:
        subjects += interpolation_subjects(model, args.interpolate[0], args.interpolate[1], args.steps)
    subjects = subjects or identity_subjects(model, [0])
    seen: dict[str, int] = {}
    for subject in subjects:  # two latents named alike (a/x/latent.npy, b/x/latent.npy) get two names
        count = seen[subject.name] = seen.get(subject.name, 0) + 1
        if count > 1:
            subject.name = f"{subject.name}_{count}"
    return subjects


def grid_columns(n: int) -> list[int]:
    """At most MAX_GRID_COLUMNS evenly spread camera indices for the grid."""
    return sorted(set(np.linspace(0, n - 1, min(n, MAX_GRID_COLUMNS)).round().astype(int).tolist()))


def main(argv: list[str] | None = None) -> int:
    """Render and write the requested outputs; returns the exit code."""
    args = parse_args(argv)
    try:
        model = load_model(args.checkpoint)
        subjects = collect_subjects(model, args)
        train_res = training_resolution(model)
        height = args.height or args.size or train_res
        width = args.width or args.size or train_res
        K_base = scale_intrinsics(
            default_intrinsics(train_res, train_res), (train_res, train_res), (height, width)
        )
        K, cameras = camera_path(
            args.camera,
            K_base,
            look_at_origin(args.distance),
            args.frames,
            tuple(args.yaw_range),
            args.camera_file,
            (height, width),
        )
        backend = start_renderer(args.arch, args.device)
        print(use_field_backend(model, args.field_backend, backend))
        print(use_skip_empty(model, args.render_skip_empty))
        out = claim_dir(args.out, force=args.force)
    except (
        CheckpointError,
        ValueError,
        OutputExistsError,
        FileNotFoundError,
        BackendUnavailableError,
    ) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    kinds = set(args.outputs)
    rendered = {}
    for subject in subjects:
        views = render_path(model, subject.latent, K, cameras, height, width, args.chunk, desc=subject.name)
        rendered[subject.name] = views
        if "latent" in kinds:
            save_npy(inside(out, f"{subject.name}.npy"), subject.latent.detach().cpu().numpy())
        if "frames" in kinds or "depth" in kinds:
            for k, view in enumerate(views):
                if "frames" in kinds:
                    save_png(inside(out, subject.name, f"frame_{k:03d}.png"), view["color"])
                if "depth" in kinds:
                    save_png(
                        inside(out, subject.name, f"depth_{k:03d}.png"),
                        colorize_depth(surface_depth(view), view["opacity"]),
                    )
                    save_npy(inside(out, subject.name, f"depth_{k:03d}.npy"), view["depth"])
        if len(cameras) > 1:
            frames = [v["color"] for v in views]
            if "mp4" in kinds:
                save_mp4(inside(out, f"{subject.name}.mp4"), frames, args.fps)
            if "gif" in kinds:
                save_gif(inside(out, f"{subject.name}.gif"), frames, args.fps)
        if "mesh" in kinds:
            try:
                mesh = latent_mesh(model, subject.latent, args.mesh_resolution, level=args.mesh_level)
            except ValueError as err:
                print(f"{subject.name}: no mesh: {err}", file=sys.stderr)
            else:
                write_ply(inside(out, f"{subject.name}.ply"), mesh)
                save_png(
                    inside(out, f"{subject.name}_mesh.png"), preview_mesh(mesh, K, cameras[0], height, width)
                )
    if len(cameras) == 1 and len(subjects) > 1:
        frames = [rendered[s.name][0]["color"] for s in subjects]
        if "mp4" in kinds:
            save_mp4(inside(out, "sequence.mp4"), frames, args.fps)
        if "gif" in kinds:
            save_gif(inside(out, "sequence.gif"), frames, args.fps)
    if len(cameras) == 1 and len(subjects) == 1 and kinds & {"mp4", "gif"}:
        print("note: mp4/gif need several cameras or subjects; one frame was rendered, so none was written.")
    if "grid" in kinds:
        cols = grid_columns(len(cameras))
        save_png(
            inside(out, "grid.png"),
            image_grid([[rendered[s.name][c]["color"] for c in cols] for s in subjects]),
        )
        if "depth" in kinds:
            rows = [
                [
                    colorize_depth(surface_depth(rendered[s.name][c]), rendered[s.name][c]["opacity"])
                    for c in cols
                ]
                for s in subjects
            ]
            save_png(inside(out, "depth_grid.png"), image_grid(rows))
    print(f"rendered {len(subjects)} subject(s) x {len(cameras)} camera(s) at {width}x{height} -> {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
