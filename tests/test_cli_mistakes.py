"""fit.py, render.py, evaluate.py and dataset.prepare: a user's mistake is one line and a non-zero exit
before any work, nothing is written outside ``--out``, and a checkpoint is scored only on its own data
(issue 11, items 2 and 5 and "every user mistake")."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
import skimage.data
import torch

import evaluate
import fit
import render
from dataset.prepare import main as prepare_main
from models.checkpoint import latest_checkpoint

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.usefixtures("keep_taichi_arch")

# Refused while parsing: the checkpoint need not exist, and nothing is loaded or written.
PARSE_MISTAKES = {
    "render size -5": (render.main, ["--size", "-5"], "--size: -5 must be at least 1"),
    "render size 0": (render.main, ["--size", "0"], "--size: 0 must be at least 1"),
    "render chunk 0": (render.main, ["--chunk", "0"], "--chunk: 0 must be at least 1"),
    "render random -2": (render.main, ["--random", "-2"], "--random: -2 must be at least 0"),
    "render arch bogus": (render.main, ["--arch", "bogus"], "--arch: invalid choice"),
    "render device bogus": (render.main, ["--device", "bogus"], "--device: invalid choice"),
    "render frames 0": (render.main, ["--frames", "0"], "--frames: 0 must be at least 1"),
    "render fps 0": (render.main, ["--fps", "0"], "--fps: 0 must be positive"),
    "render fps nan": (render.main, ["--fps", "nan"], "--fps: nan must be a finite number"),
    "fit arch bogus": (fit.main, ["--arch", "bogus", "p.jpg"], "--arch: invalid choice"),
    "fit device bogus": (fit.main, ["--device", "bogus", "p.jpg"], "--device: invalid choice"),
    "fit video size -4": (fit.main, ["--video-size", "-4", "p.jpg"], "--video-size: -4 must be at least 8"),
    "fit steps 0": (fit.main, ["--steps", "0", "p.jpg"], "--steps: 0 must be at least 1"),
    "fit frames 0": (fit.main, ["--frames", "0", "p.jpg"], "--frames: 0 must be at least 1"),
    "fit chunk 0": (fit.main, ["--chunk", "0", "p.jpg"], "--chunk: 0 must be at least 1"),
    "fit mesh resolution 0": (fit.main, ["--mesh-resolution", "0", "p.jpg"], "0 must be at least 8"),
    "evaluate max images 0": (evaluate.main, ["--max-images", "0"], "--max-images: 0 must be at least 1"),
}


@pytest.mark.parametrize("main, flags, message", PARSE_MISTAKES.values(), ids=PARSE_MISTAKES.keys())
def test_a_bad_flag_is_one_line_before_any_work(tmp_path, capsys, main, flags, message):
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as stop:
        main(["--checkpoint", str(tmp_path / "missing.pt"), "--out", str(out), *flags])
    err = capsys.readouterr().err.strip().splitlines()
    assert stop.value.code == 2 and len(err) == 1 and message in err[0], err
    assert not out.exists()


PREPARE_MISTAKES = {
    "workers 0": (["--workers", "0"], "--workers: 0 must be at least 1"),
    "workers -1": (["--workers", "-1"], "--workers: -1 must be at least 1"),
    "max error fraction -1": (["--max-error-fraction", "-1"], "-1.0 must be a positive number"),
}


@pytest.mark.parametrize("flags, message", PREPARE_MISTAKES.values(), ids=PREPARE_MISTAKES.keys())
def test_prepare_refuses_a_bad_number_in_one_line(tmp_path, capsys, flags, message):
    out = tmp_path / "cache"
    with pytest.raises(SystemExit) as stop:
        prepare_main(["--dataset", "synthetic", "--out", str(out), *flags])
    err = capsys.readouterr().err.strip().splitlines()
    assert stop.value.code == 2 and len(err) == 1 and message in err[0], err
    assert not out.exists()


@pytest.mark.parametrize("kind", ["missing", "text", "no points"])
def test_prepare_refuses_a_broken_template_before_any_work(tmp_path, capsys, kind):
    template = tmp_path / "refined.json"
    if kind == "text":
        template.write_text("my notes\n")
    elif kind == "no points":
        template.write_text('{"names": ["a"]}')
    out = tmp_path / "cache"
    code = prepare_main(["--dataset", "synthetic", "--identities", "2", "--resolution", "16", "--out",
                         str(out), "--template", str(template), "--no-progress"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and f"Template {template}" in err[0], err
    assert "Expecting value" not in err[0] or "is not JSON" in err[0]
    assert not out.exists()


def test_evaluate_json_under_a_file_is_one_line(tmp_path, capsys):
    a_file = tmp_path / "notes.txt"
    a_file.write_text("keep\n")
    code = evaluate.main(["--checkpoint", str(tmp_path / "missing.pt"), "--json", str(a_file / "e.json")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "Cannot write" in err[0], err
    assert a_file.read_text() == "keep\n"


def test_the_scripts_show_no_traceback(tmp_path):
    for script, flags in (("render.py", ["--chunk", "0"]), ("fit.py", ["--device", "bogus", "p.jpg"]),
                          ("evaluate.py", ["--max-images", "0"])):
        run = subprocess.run([sys.executable, str(ROOT / script), "--checkpoint", "x.pt", "--out",
                              str(tmp_path / "o"), *flags], capture_output=True, text=True, cwd=ROOT,
                             timeout=120)
        assert run.returncode == 2 and "Traceback" not in run.stderr, run.stderr
        assert len(run.stderr.strip().splitlines()) == 1, run.stderr


@pytest.mark.parametrize("text, problem", [("{not json", "is not valid JSON"),
                                           ('{"K": "abc", "world_to_camera": [1]}', "cannot be read"),
                                           ('{"K": [[1, 0, 0], [0, 1, 0], [0, 0, 1]]}', "lacks")])
def test_a_broken_camera_file_is_one_line(tiny_run, tmp_path, capsys, text, problem):
    camera = tmp_path / "cam.json"
    camera.write_text(text)
    out = tmp_path / "out"
    code = render.main(["--checkpoint", str(latest_checkpoint(tiny_run)), "--out", str(out),
                        "--camera", "file", "--camera-file", str(camera)])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and f"Camera file {camera}" in err[0] and problem in err[0], err
    assert not out.exists()


def _tree(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_fit_writes_a_photo_named_dots_inside_out(tiny_run, tmp_path):
    photos = tmp_path / "photos"
    photos.mkdir()
    photo = photos / "...jpg"  # its stem is ".."
    assert cv2.imwrite(str(photo), skimage.data.astronaut()[..., ::-1])
    (tmp_path / "metrics.json").write_text("someone else's\n")
    out = tmp_path / "fits"
    before = {k: v for k, v in _tree(tmp_path).items()}
    code = fit.main(["--checkpoint", str(latest_checkpoint(tiny_run)), "--out", str(out), "--steps", "2",
                     "--rays", "64", "--frames", "2", "--video-size", "16", "--mesh-resolution", "16",
                     "--quiet", str(photo)])
    assert code == 0
    after = _tree(tmp_path)
    outside = {k for k in after if not k.startswith("fits/")}
    assert {k: after[k] for k in outside} == before  # nothing new or changed outside --out
    assert (out / "unnamed" / "metrics.json").is_file()


def test_render_writes_a_latent_named_dots_inside_out(tiny_run, tmp_path):
    from export.inference import load_model

    ckpt = latest_checkpoint(tiny_run)
    latents = tmp_path / "latents"
    latents.mkdir()
    np.save(latents / "...npy", load_model(ckpt).latents.codes[0].numpy())
    (tmp_path / "frame_000.png").write_bytes(b"a user's picture")
    before = _tree(tmp_path)
    out = tmp_path / "renders"
    code = render.main(["--checkpoint", str(ckpt), "--out", str(out), "--latent", str(latents / "...npy"),
                        "--camera", "yaw", "--frames", "2", "--size", "8", "--outputs", "frames", "depth"])
    assert code == 0
    after = _tree(tmp_path)
    assert {k: v for k, v in after.items() if not k.startswith("renders/")} == before
    assert (out / "unnamed" / "frame_000.png").is_file()


def test_evaluate_refuses_another_dataset_with_as_many_identities(tiny_run, tmp_path, capsys):
    from tiny_run import TINY_ARGS

    from models.checkpoint import read_checkpoint

    ckpt = latest_checkpoint(tiny_run)
    trained_on = read_checkpoint(ckpt)["config"]["data"]
    other = tmp_path / "other"
    identities = TINY_ARGS[TINY_ARGS.index("--synthetic-identities") + 1]
    assert prepare_main(["--dataset", "synthetic", "--identities", identities, "--resolution",
                         str(trained_on["resolution"]), "--seed", "7", "--heldout-views", "0",
                         "--out", str(other), "--no-progress"]) == 0
    argv = ["--checkpoint", str(ckpt), "--cache", str(other), "--max-images", "2"]
    code = evaluate.main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "--allow-other-cache" in err[0], err
    assert evaluate.main([*argv, "--allow-other-cache"]) == 0
    assert "Reconstruction (train views)" in capsys.readouterr().out


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is here: --arch cuda would run")
def test_arch_cuda_without_cuda_is_one_line(tiny_run, tmp_path, capsys):
    """render/fit/evaluate accept --arch cuda (and --device, as train.py); without CUDA: one sentence."""
    ckpt = str(latest_checkpoint(tiny_run))
    for main, argv in ((render.main, ["--out", str(tmp_path / "r")]), (evaluate.main, []),
                       (fit.main, ["--out", str(tmp_path / "f"), "p.jpg"])):
        code = main(["--checkpoint", ckpt, "--arch", "cuda", *argv])
        err = capsys.readouterr().err.strip().splitlines()
        assert code == 2 and len(err) == 1 and "arch='cuda' is unavailable" in err[0], (main, err)
    assert not (tmp_path / "r").exists()
