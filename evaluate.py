"""Measure a trained model the way the paper did; write JSON and a Markdown table.

    python evaluate.py --checkpoint runs/cpu/checkpoints/best.pt --json eval.json
    python evaluate.py --checkpoint CKPT --views srn_cars/cars_test --json eval.json
    python evaluate.py --checkpoint CKPT --humbi HUMBI_ROOT --3dfaw 3DFAW_ROOT --json eval.json

Reconstruction and novel-view PSNR / SSIM, full-image and inside the foreground mask (LPIPS when it is
installed with its weights), depth errors where the data has ground truth, depth at landmarks where it has
true landmarks, and the mean-image baseline; ``export/evaluation.py`` says how each is measured and
``export/benchmark_sets.py`` which HUMBI and 3DFAW layouts it reads. This file only parses the arguments
and calls ``export.evaluation.evaluate``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from common.atomic import write_json, write_text
from export.arguments import add_arch_flag, add_field_backend_flag, add_skip_empty_flag, at_least
from export.evaluation import BenchmarkFolders, evaluate, markdown_table
from export.inference import load_model, start_renderer, training_cache, use_field_backend, use_skip_empty
from export.outputs import OutputExistsError, claim_file
from models.checkpoint import CheckpointError
from renderer.backend import BackendUnavailableError


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    # No usage block: a mistake is the one line "prog: error: ..." (--help lists every flag).
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        usage=argparse.SUPPRESS,
    )
    parser.add_argument("--checkpoint", required=True, type=Path, help="a checkpoint written by train.py")
    parser.add_argument("--cache", type=Path, help="training cache (default: the one the checkpoint records)")
    novel = parser.add_mutually_exclusive_group()
    novel.add_argument(
        "--views", type=Path, help="SRN-layout folder of held-out views (instead of heldout/)"
    )
    novel.add_argument(
        "--humbi",
        type=Path,
        help="HUMBI-layout folder (subject_<n>/face/...): the training subjects' other views are the novel "
        "views (instead of heldout/)",
    )
    parser.add_argument(
        "--3dfaw",
        dest="faw",
        type=Path,
        help="3DFAW-layout folder (valid_img/, valid_lm/): fit each image, score depth at its 66 landmarks",
    )
    parser.add_argument(
        "--3dfaw-subset",
        dest="faw_subset",
        choices=("test", "valid", "train"),
        help="3DFAW images to use (default: test when list_valid_test.txt exists, else valid)",
    )
    parser.add_argument(
        "--fit-steps", type=at_least(1), default=300, help="latent-fit steps per 3DFAW image (fit.py's)"
    )
    parser.add_argument("--json", type=Path, help="write the results here")
    parser.add_argument("--markdown", type=Path, help="write the Markdown table here (always printed)")
    parser.add_argument(
        "--max-images", type=at_least(1), default=200, help="views per evaluation, evenly spread"
    )
    parser.add_argument(
        "--chunk", type=at_least(1), default=8192, help="rays per rendering chunk (bounds memory)"
    )
    add_arch_flag(parser)
    add_field_backend_flag(parser)
    add_skip_empty_flag(parser)
    parser.add_argument("--force", action="store_true", help="overwrite existing --json / --markdown")
    parser.add_argument(
        "--allow-other-cache",
        action="store_true",
        help="score a cache other than the one the checkpoint was trained on (same "
        "identity count; refused by default)",
    )
    return parser.parse_args(argv)


def fitter(steps: int):
    """The one-look fit of fit.py as (model, image, mask, K, world_to_camera) -> latent (L,)."""

    def fit(model, image, mask, K, world_to_camera):
        from export.fitting import FitConfig, fit_latent

        with torch.enable_grad():
            return fit_latent(model, image, mask, K, world_to_camera, FitConfig(steps=steps)).latent

    return fit


def main(argv: list[str] | None = None) -> int:
    """Evaluate and report; returns the exit code (2 for unusable inputs)."""
    from dataset import CacheError

    args = parse_args(argv)
    try:
        for path in (args.json, args.markdown):
            if path is not None:
                claim_file(path, force=args.force)
        model = load_model(args.checkpoint)
        cache = args.cache or training_cache(model)
        if cache is None:
            raise ValueError("the checkpoint records no training cache; pass --cache DIR.")
        print(use_field_backend(model, args.field_backend, start_renderer(args.arch, args.device)))
        print(use_skip_empty(model, args.render_skip_empty))
        folders = BenchmarkFolders(args.humbi, args.faw, args.faw_subset, fitter(args.fit_steps))
        with torch.no_grad():
            results = evaluate(
                model, Path(cache), args.views, args.max_images, args.chunk, args.allow_other_cache, folders
            )
    except (
        CheckpointError,
        CacheError,
        OutputExistsError,
        ValueError,
        FileNotFoundError,
        BackendUnavailableError,
    ) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    results["checkpoint"] = str(args.checkpoint)
    table = markdown_table(results)
    print(table)
    if args.json is not None:
        write_json(args.json, results)
    if args.markdown is not None:
        write_text(args.markdown, table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
