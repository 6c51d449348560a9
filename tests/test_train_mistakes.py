"""A user's mistake on ``train.py`` is one sentence and a non-zero exit, before any work (issue 11)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from tiny_run import train_in_process

ROOT = Path(__file__).resolve().parents[1]
BASE = ["--arch", "cpu", "--device", "cpu", "--preset", "cpu", "--synthetic-identities", "2",
        "--resolution", "16"]

BAD_FLAGS = {
    "field depth 0": (["--field-depth", "0"], "--field-depth 0 must be at least 1"),
    "unknown dataset": (["--dataset", "bogus"], "--dataset 'bogus' must be one of"),
    "NaN learning rate": (["--optim-lr-init", "nan"], "--optim-lr-init nan must be a finite number"),
    "negative radius": (["--render-radius", "-1"], "--render-radius -1.0 must be positive"),
    "resolution 0": (["--resolution", "0"], "--resolution 0 must be at least 8"),
    "zero steps": (["--steps", "0"], "--steps 0 must be at least 1"),
    "negative steps": (["--steps", "-5"], "--steps -5 must be at least 1"),
    "checkpoint every 0": (["--checkpoint-every", "0"], "--checkpoint-every 0 must be at least 1"),
    "log every 0": (["--log-every", "0"], "--log-every 0 must be at least 1"),
    "no pixels": (["--batch-pixels", "0"], "--batch-pixels 0 must be at least 1"),
    "no identities": (["--batch-identities", "0"], "--batch-identities 0 must be at least 1"),
    "no coarse samples": (["--render-n-coarse", "0"], "--render-n-coarse 0 must be at least 1"),
    "negative fine samples": (["--render-n-fine", "-1"], "--render-n-fine -1 must be at least 0"),
    "beta 1": (["--optim-beta2", "1"], "--optim-beta2 1.0 must be in [0, 1)"),
    "negative profile": (["--profile", "-1"], "--profile -1 must be at least 1"),
}


@pytest.mark.parametrize("flags, message", BAD_FLAGS.values(), ids=BAD_FLAGS.keys())
def test_a_bad_flag_is_one_sentence_before_any_work(tmp_path, flags, message):
    run_dir, cache = tmp_path / "run", tmp_path / "cache"
    with pytest.raises(SystemExit) as stop:
        train_in_process([*BASE, *flags, "--out", str(run_dir), "--cache", str(cache)])
    text = str(stop.value.code)
    assert message in text and "\n" not in text, text
    assert not run_dir.exists() and not cache.exists()  # refused before preparing or training anything


def _data_roots(tmp_path) -> dict[str, Path]:
    empty = tmp_path / "empty"
    empty.mkdir()
    a_file = tmp_path / "notes.txt"
    a_file.write_text("not photos\n")
    return {"missing": tmp_path / "no-such-folder", "empty": empty, "a file": a_file}


@pytest.mark.parametrize("kind", ["missing", "empty", "a file"])
def test_an_unusable_data_root_is_one_sentence(tmp_path, kind):
    data_root = _data_roots(tmp_path)[kind]
    run_dir = tmp_path / "run"
    with pytest.raises(SystemExit) as stop:
        train_in_process([*BASE, "--dataset", "folder", "--data-root", str(data_root), "--out", str(run_dir),
                          "--cache", str(tmp_path / "cache")])
    text = str(stop.value.code)
    assert str(data_root) in text and "\n" not in text, text
    assert not run_dir.exists()


def test_a_photo_dataset_without_data_root_is_one_sentence(tmp_path):
    with pytest.raises(SystemExit) as stop:
        train_in_process([*BASE, "--dataset", "ffhq", "--out", str(tmp_path / "run")])
    assert "needs --data-root" in str(stop.value.code)
    assert not (tmp_path / "run").exists()


def test_out_that_is_a_file_is_one_sentence_and_the_file_survives(tmp_path):
    out = tmp_path / "results.txt"
    out.write_text("keep me\n")
    with pytest.raises(SystemExit) as stop:
        train_in_process([*BASE, "--out", str(out), "--cache", str(tmp_path / "cache")])
    assert "is a file" in str(stop.value.code)
    assert out.read_text() == "keep me\n"


def test_the_command_line_shows_no_traceback(tmp_path):
    run = subprocess.run([sys.executable, str(ROOT / "train.py"), *BASE, "--batch-pixels", "0",
                          "--out", str(tmp_path / "run")], capture_output=True, text=True, cwd=ROOT,
                         timeout=300)
    assert run.returncode != 0
    assert "Traceback" not in run.stderr and "--batch-pixels 0 must be at least 1" in run.stderr, run.stderr
    assert len(run.stderr.strip().splitlines()) == 1, run.stderr
