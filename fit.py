"""Learn from one look: fit a new photo's latent with the network frozen, then render it in 3D.

    python fit.py --checkpoint runs/cpu/checkpoints/best.pt --out fits photo.jpg [more.jpg ...]
    python fit.py --checkpoint CKPT --out fits --from-cache data/synthetic64 --split heldout --index 0 3

Each photo goes through the training preparation (``pose.prepare_photo``: landmarks, camera solve, mask)
at the checkpoint's training resolution. A fresh latent starts at the mean latent and is optimised with
the training losses (RGB + mask + hard-surface) to reconstruct the photo. Per photo, ``OUT/<name>/`` gets:

    latent.npy          the fitted code (L,) float32
    reconstruction.png  input | reconstruction | depth, with PSNR / SSIM written on it
    depth.png           colour-mapped depth of the reconstruction (near = warm)
    orbit.mp4, orbit.gif  the head turning (yaw +-35 deg, pitch +-10 deg) around the photo's camera
    mesh.ply            marching cubes on the density grid, vertex colours from the colour field
    mesh.png            a picture of that mesh, seen 30 deg to the side
    metrics.json        PSNR, SSIM, camera, losses, settings

A photo with no face or a rejected camera is reported and skipped; the others still run, and the exit
code is 1 if any photo failed. ``--resume`` skips photos whose outputs are complete (``metrics.json`` is
written last), so an interrupted batch continues where it stopped.
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from common.atomic import save_npy, write_json
from export.arguments import (
    add_arch_flag,
    add_field_backend_flag,
    add_skip_empty_flag,
    at_least,
    positive_float,
)
from export.cameras import orbit_cameras, scale_intrinsics, yaw_cameras
from export.fitting import FitConfig, FitResult, fit_latent, reconstruction_scores
from export.inference import (
    latent_mesh,
    load_model,
    render_path,
    source_name,
    start_renderer,
    surface_depth,
    training_framing,
    training_resolution,
    use_field_backend,
    use_skip_empty,
)
from export.media import colorize_depth, image_grid, save_gif, save_mp4, save_png, upscale
from export.mesh import preview_mesh, write_ply
from export.outputs import (
    OutputExistsError,
    OutputPathError,
    claim_dir,
    inside,
    output_name,
)
from models.checkpoint import CheckpointError, LoadedCheckpoint
from renderer.backend import BackendUnavailableError


@dataclass
class OutputSettings:
    """What to write besides the latent: orbit length and size, mesh grid."""

    frames: int = 36
    fps: float = 18.0
    video_size: int | None = None  # None: twice the training resolution
    mesh_resolution: int = 128
    mesh_level: float | None = None  # None: read off the model (export.inference.surface_level)
    chunk: int = 8192


def write_outputs(
    model: LoadedCheckpoint,
    result: FitResult,
    image: np.ndarray,
    mask: np.ndarray | None,
    K: np.ndarray,
    world_to_camera: np.ndarray,
    out_dir: Path,
    settings: OutputSettings,
    extra: dict | None = None,
) -> dict:
    """Write every per-photo output into ``out_dir`` (already claimed). Returns the metrics record."""
    scores, view = reconstruction_scores(
        model, result.latent, image, mask, K, world_to_camera, settings.chunk
    )
    save_npy(inside(out_dir, "latent.npy"), result.latent.numpy().astype(np.float32))
    depth_rgb = colorize_depth(surface_depth(view), view["opacity"])
    save_png(inside(out_dir, "depth.png"), depth_rgb)
    label = f"PSNR {scores['psnr']:.1f} SSIM {scores['ssim']:.2f}"
    cells = [upscale(cell, 128) for cell in (image, view["color"], depth_rgb)]
    save_png(inside(out_dir, "reconstruction.png"), image_grid([cells], labels=[["input", label, "depth"]]))

    size = settings.video_size or 2 * int(np.asarray(image).shape[0])
    K_video = scale_intrinsics(K, np.asarray(image).shape[:2], (size, size))
    cameras = orbit_cameras(world_to_camera, n_frames=settings.frames)
    frames = [
        f["color"]
        for f in render_path(model, result.latent, K_video, cameras, size, size, settings.chunk, desc="orbit")
    ]
    save_mp4(inside(out_dir, "orbit.mp4"), frames, fps=settings.fps)
    save_gif(inside(out_dir, "orbit.gif"), frames, fps=settings.fps)

    mesh = latent_mesh(model, result.latent, resolution=settings.mesh_resolution, level=settings.mesh_level)
    write_ply(inside(out_dir, "mesh.ply"), mesh)
    side_view = yaw_cameras(world_to_camera, [30.0])[0]
    save_png(inside(out_dir, "mesh.png"), preview_mesh(mesh, K_video, side_view, size, size))

    record = {
        **scores,
        "final_loss": result.history[-1] if result.history else None,
        "mesh": {"vertices": len(mesh.vertices), "faces": len(mesh.faces)},
        "K": np.asarray(K).tolist(),
        "world_to_camera": np.asarray(world_to_camera).tolist(),
        **(extra or {}),
    }
    write_json(inside(out_dir, "metrics.json"), record)
    return record


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    # No usage block: a mistake is the one line "prog: error: ..." (--help lists every flag).
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        usage=argparse.SUPPRESS,
    )
    parser.add_argument("photos", nargs="*", type=Path, help="photos to fit (any format OpenCV reads)")
    parser.add_argument("--checkpoint", required=True, type=Path, help="a checkpoint written by train.py")
    parser.add_argument("--out", required=True, type=Path, help="output folder; one subfolder per photo")
    parser.add_argument("--from-cache", type=Path, help="fit already-prepared views of a dataset cache")
    parser.add_argument("--split", default="heldout", choices=["train", "heldout"], help="with --from-cache")
    parser.add_argument(
        "--index", type=at_least(0), nargs="+", default=[0], help="with --from-cache: view indices"
    )
    parser.add_argument("--preset", default="cpu", choices=["cpu", "paper"], help="FitConfig preset")
    parser.add_argument("--steps", type=at_least(1), help="optimisation steps (default: the preset's)")
    parser.add_argument("--lr", type=positive_float, help="latent learning rate (default: the preset's)")
    parser.add_argument("--rays", type=at_least(1), help="random pixels per step (default: the preset's)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--frames", type=at_least(1), default=36, help="frames of the orbit video")
    parser.add_argument(
        "--video-size", type=at_least(8), help="orbit video side in pixels (default 2x training)"
    )
    parser.add_argument(
        "--mesh-resolution", type=at_least(8), default=128, help="density grid side for the mesh"
    )
    parser.add_argument("--mesh-level", type=float, help="density iso-level (default: read off the model)")
    parser.add_argument("--framing", choices=["aligned", "landmarks"], help="default: as in training")
    add_arch_flag(parser)
    add_field_backend_flag(parser)
    add_skip_empty_flag(parser)
    parser.add_argument(
        "--chunk", type=at_least(1), default=8192, help="rays per rendering chunk (bounds memory)"
    )
    parser.add_argument("--force", action="store_true", help="overwrite existing outputs")
    parser.add_argument(
        "--resume",
        action="store_true",
        help="skip photos whose outputs are complete (metrics.json, written last)",
    )
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    args = parser.parse_args(argv)
    if not args.photos and args.from_cache is None:
        parser.error("give at least one photo, or --from-cache CACHE with --index.")
    return args


def _jobs(args: argparse.Namespace, resolution: int, framing: str):
    """Yield (name, loader) pairs; a loader returns (image, mask, K, world_to_camera, info) or raises."""
    used: set[str] = set()

    def unique(name: str) -> str:
        candidate, k = name, 2
        while candidate in used:
            candidate, k = f"{name}_{k}", k + 1
        used.add(candidate)
        return candidate

    for path in args.photos:

        def load(path=path):
            from pose import prepare_photo

            photo = prepare_photo(path, resolution=resolution, framing=framing)
            info = {"source": str(path), "reprojection_error_px": float(photo.reprojection_error_px)}
            return photo.image, photo.mask, photo.K, photo.world_to_camera, info

        yield unique(output_name(path.stem)), load

    if args.from_cache is not None:
        from functools import cache

        from dataset import PreparedDataset

        @cache
        def open_split() -> PreparedDataset:
            return PreparedDataset(args.from_cache, split=args.split)

        for index in args.index:

            def load(index=index):
                ds = open_split()
                if not 0 <= index < len(ds):
                    raise IndexError(f"index {index} is outside the {args.split} split (0..{len(ds) - 1}).")
                source = ds.sources[index]
                info = {
                    "source": source_name(source),
                    "cache": str(args.from_cache),
                    "split": args.split,
                    "index": index,
                    "identity": int(ds.identities[index]),
                }
                mask = np.asarray(ds.masks[index])
                return np.asarray(ds.images[index]), mask, ds.K[index], ds.world_to_camera[index], info

            yield unique(f"{args.split}_{index:04d}"), load


def main(argv: list[str] | None = None) -> int:
    """Fit every photo; returns the exit code (0 if all succeeded, 1 if any failed, 2 on a bad checkpoint)."""
    args = parse_args(argv)
    from dataset import CacheError
    from pose import ImageError, NoFaceError, PoseRejectedError

    try:
        model = load_model(args.checkpoint)
    except CheckpointError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    try:
        backend = start_renderer(args.arch, args.device)
        print(use_field_backend(model, args.field_backend, backend))
        print(use_skip_empty(model, args.render_skip_empty))
        claim_dir(args.out, force=True)  # an --out that cannot be written is found before any fitting
    except (BackendUnavailableError, OutputExistsError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    resolution = training_resolution(model)
    framing = args.framing or training_framing(model)
    preset = FitConfig.paper() if args.preset == "paper" else FitConfig.cpu()
    config = FitConfig(
        steps=preset.steps if args.steps is None else args.steps,
        lr=preset.lr if args.lr is None else args.lr,
        final_lr_fraction=preset.final_lr_fraction,
        rays_per_step=preset.rays_per_step if args.rays is None else args.rays,
        seed=args.seed,
    )
    settings = OutputSettings(
        frames=args.frames,
        video_size=args.video_size,
        mesh_resolution=args.mesh_resolution,
        mesh_level=args.mesh_level,
        chunk=args.chunk,
    )
    summary: list[tuple[str, str]] = []
    for name, load in _jobs(args, resolution, framing):
        started = time.perf_counter()
        if args.resume and not args.force and inside(args.out, name, "metrics.json").is_file():
            summary.append((name, "ok      already fitted (--resume)"))
            print(f"{name}: {summary[-1][1]}", flush=True)
            continue
        try:
            image, mask, K, w2c, info = load()
            # --resume: a folder without metrics.json holds an interrupted fit, which is redone.
            out_dir = claim_dir(inside(args.out, name), force=args.force or args.resume)
            result = fit_latent(model, image, mask, K, w2c, config, progress=not args.quiet)
            record = write_outputs(
                model,
                result,
                image,
                mask,
                K,
                w2c,
                out_dir,
                settings,
                extra={**info, "fit": asdict(config), "checkpoint": str(args.checkpoint)},
            )
            line = f"ok      PSNR {record['psnr']:.2f} dB  SSIM {record['ssim']:.3f}  -> {out_dir}"
        except (
            CacheError,
            ImageError,
            NoFaceError,
            PoseRejectedError,
            OutputExistsError,
            OutputPathError,
            IndexError,
            ValueError,
            OSError,
        ) as err:
            line = f"FAILED  {err}"
        summary.append((name, f"{line}  ({time.perf_counter() - started:.1f} s)"))
        print(f"{name}: {summary[-1][1]}", flush=True)
    failed = sum(1 for _, line in summary if line.startswith("FAILED"))
    print(f"\nfit.py summary: {len(summary) - failed} of {len(summary)} fitted")
    for name, line in summary:
        print(f"  {name}: {line}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
