"""Nothing a user made is destroyed: caches, run directories and worker processes (issue 11, items 0-4)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import cv2
import pytest
import skimage.data
from tiny_run import train_in_process

from dataset import PreparedDataset
from dataset.cache import MARKER
from dataset.prepare import main as prepare_main
from models.checkpoint import latest_checkpoint, read_checkpoint

ROOT = Path(__file__).resolve().parents[1]


def _photo(path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    assert cv2.imwrite(str(path), skimage.data.astronaut()[..., ::-1])


def _tree(root) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_prepare_refuses_a_users_folder_and_leaves_it_as_it_was(tmp_path, capsys):
    faces = tmp_path / "faces"
    for name in ("train/a.jpg", "heldout/b.jpg", "partial/c.jpg"):
        _photo(faces / name)
    before = _tree(faces)
    code = prepare_main(["--dataset", "folder", "--data-root", str(faces / "train"), "--out", str(faces),
                         "--no-progress"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "Traceback" not in err[0], err
    assert _tree(faces) == before  # heldout/ and partial/ survive, and no marker or lock was written


def test_prepare_refuses_a_non_empty_out_that_is_not_a_cache(tmp_path, capsys):
    out = tmp_path / "notes"
    out.mkdir()
    (out / "thesis.tex").write_text("three years of work\n")
    code = prepare_main(["--dataset", "synthetic", "--identities", "2", "--resolution", "16",
                         "--heldout-views", "0", "--out", str(out), "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2 and "thesis.tex" in err and "Traceback" not in err
    assert sorted(p.name for p in out.iterdir()) == ["thesis.tex"]


def test_a_rebuild_removes_only_what_the_build_wrote(tmp_path):
    out = tmp_path / "cache"
    args = ["--dataset", "synthetic", "--identities", "2", "--resolution", "16", "--out", str(out),
            "--no-progress"]
    assert prepare_main([*args, "--heldout-views", "1"]) == 0
    assert (out / MARKER).is_file() and (out / "heldout" / "images.npy").is_file()
    (out / "heldout" / "my_notes.txt").write_text("which views looked odd\n")
    (out / "partial").mkdir()
    (out / "partial" / "keep.txt").write_text("mine\n")
    assert prepare_main([*args, "--heldout-views", "0"]) == 0  # new settings: a rebuild without heldout/
    assert len(PreparedDataset(out)) == 2
    assert sorted(p.name for p in (out / "heldout").iterdir()) == ["my_notes.txt"]
    assert sorted(p.name for p in (out / "partial").iterdir()) == ["keep.txt"]
    with pytest.raises(Exception, match="held-out"):
        PreparedDataset(out, split="heldout")


def test_a_cache_from_before_the_marker_is_still_rebuilt_in_place(tmp_path):
    out = tmp_path / "cache"
    args = ["--dataset", "synthetic", "--identities", "2", "--resolution", "16", "--heldout-views", "0",
            "--out", str(out), "--no-progress"]
    assert prepare_main(args) == 0
    (out / MARKER).unlink()  # as written by the code before the marker existed
    args[args.index("--identities") + 1] = "3"
    assert prepare_main(args) == 0
    assert len(PreparedDataset(out)) == 3 and (out / MARKER).is_file()


# --- train.py: a prepared cache is trained on as prepared, a run directory has one user at a time ---------

TRAIN = ["--arch", "cpu", "--device", "cpu", "--preset", "cpu", "--field-depth", "2", "--field-width", "16",
         "--latent-dim", "8", "--render-n-coarse", "8", "--render-n-fine", "8", "--batch-identities", "2",
         "--batch-views", "1", "--batch-pixels", "16", "--log-every", "1", "--preview-every", "100000",
         "--checkpoint-every", "1", "--preview-identities", "1"]


@pytest.fixture
def odd_cache(tmp_path):
    """A synthetic cache prepared with settings train.py would never choose (4 identities, 16 px, seed 5)."""
    out = tmp_path / "odd_cache"
    assert prepare_main(["--dataset", "synthetic", "--identities", "4", "--resolution", "16", "--seed", "5",
                         "--heldout-views", "0", "--out", str(out), "--no-progress"]) == 0
    return out


def _fingerprint(cache) -> str:
    return json.loads((cache / "manifest.json").read_text())["fingerprint"]


def test_train_uses_an_existing_cache_as_prepared(odd_cache, tmp_path, capsys):
    before = _fingerprint(odd_cache)
    run_dir = train_in_process([*TRAIN, "--out", str(tmp_path / "run"), "--cache", str(odd_cache),
                                "--steps", "1"])
    assert _fingerprint(odd_cache) == before  # not rebuilt with train.py's defaults (64 identities, 64 px)
    data = json.loads((run_dir / "config.json").read_text())["data"]
    assert (data["dataset"], data["resolution"], data["synthetic_identities"]) == ("synthetic", 16, 4)
    assert "as it is" in capsys.readouterr().out


@pytest.mark.parametrize("contradiction", [["--resolution", "32"], ["--synthetic-identities", "8"],
                                           ["--dataset", "ffhq", "--data-root", "photos"]])
def test_train_refuses_flags_that_contradict_the_cache(odd_cache, tmp_path, contradiction):
    before = _tree(odd_cache)
    with pytest.raises(SystemExit) as stop:
        train_in_process([*TRAIN, "--out", str(tmp_path / "run"), "--cache", str(odd_cache), "--steps", "1",
                          *contradiction])
    message = str(stop.value.code)
    assert contradiction[0] in message and "--rebuild-cache" in message and "\n" not in message
    assert _tree(odd_cache) == before


def test_rebuild_cache_prepares_it_again_when_asked(odd_cache, tmp_path):
    before = _fingerprint(odd_cache)
    run_dir = train_in_process([*TRAIN, "--out", str(tmp_path / "run"), "--cache", str(odd_cache),
                                "--steps", "1", "--resolution", "16", "--synthetic-identities", "3",
                                "--rebuild-cache"])
    assert _fingerprint(odd_cache) != before and len(PreparedDataset(odd_cache)) == 3
    assert json.loads((run_dir / "config.json").read_text())["data"]["synthetic_identities"] == 3


def test_a_second_run_on_one_out_is_refused(odd_cache, tmp_path):
    run_dir = tmp_path / "run"
    first = subprocess.Popen([sys.executable, str(ROOT / "train.py"), *TRAIN, "--out", str(run_dir),
                              "--cache", str(odd_cache), "--steps", "1000000"],
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=ROOT)
    try:
        deadline = time.monotonic() + 120
        while not list((run_dir / "checkpoints").glob("step_*.pt")) and first.poll() is None:
            assert time.monotonic() < deadline, "the first run never started training"
            time.sleep(0.2)
        with pytest.raises(SystemExit) as stop:  # --resume: what would interleave logs and checkpoints
            train_in_process([*TRAIN, "--out", str(run_dir), "--resume", "--steps", "1000000"])
        assert f"process {first.pid}" in str(stop.value.code)
        assert first.poll() is None  # the first run is untouched
    finally:
        first.kill()
        first.wait()
    # The lock dies with its holder: after kill -9, the run can be resumed.
    done = read_checkpoint(latest_checkpoint(run_dir))["step"]
    train_in_process([*TRAIN, "--out", str(run_dir), "--resume", "--steps", str(done + 1)])


def _short_run(cache, run_dir) -> Path:
    return train_in_process([*TRAIN, "--out", str(run_dir), "--cache", str(cache), "--steps", "3"])


def test_resume_trims_a_torn_last_metrics_line(odd_cache, tmp_path, capsys):
    run_dir = _short_run(odd_cache, tmp_path / "run")
    with open(run_dir / "metrics.jsonl", "a") as log:
        log.write('{"step": 4, "loss": 0.0')  # a crash in the middle of a write
    train_in_process([*TRAIN, "--out", str(run_dir), "--resume", "--steps", "5"])
    steps = [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4, 5]
    assert "torn last line" in capsys.readouterr().out


def test_resume_falls_back_to_the_newest_readable_checkpoint(odd_cache, tmp_path, capsys):
    run_dir = _short_run(odd_cache, tmp_path / "run")
    newest = run_dir / "checkpoints" / "step_00000003.pt"
    newest.write_bytes(newest.read_bytes()[:1000])  # a full disk or a crash cut it short
    train_in_process([*TRAIN, "--out", str(run_dir), "--resume", "--steps", "3"])
    printed = capsys.readouterr().out
    assert "step_00000002.pt" in printed and "unreadable" in printed
    assert (run_dir / "checkpoints" / "step_00000003.pt.unreadable").is_file()  # kept, never deleted
    assert read_checkpoint(latest_checkpoint(run_dir))["step"] == 3  # step 3 trained again from step 2


def test_resume_refuses_a_preset_it_cannot_honour(odd_cache, tmp_path):
    run_dir = _short_run(odd_cache, tmp_path / "run")
    with pytest.raises(SystemExit) as stop:
        train_in_process(["--out", str(run_dir), "--resume", "--preset", "paper", "--arch", "cpu"])
    assert "--preset paper" in str(stop.value.code) and "cpu preset" in str(stop.value.code)


# --- dataset.prepare: workers die with their parent; bad paths in a data root are reported, not fatal ----


def _children(pid: int) -> list[int]:
    found = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        found += [int(c) for c in (task / "children").read_text().split()]
    return found


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return False
    return state != "Z"  # a zombie has exited; only its parent (here: init, maybe absent) can reap it


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="needs Linux /proc to find child processes")
def test_workers_die_with_a_killed_parent(tmp_path):
    out = tmp_path / "cache"
    command = [sys.executable, "-m", "dataset.prepare", "--dataset", "synthetic", "--out", str(out),
               "--identities", "400", "--resolution", "96", "--heldout-views", "1", "--chunk-size", "1",
               "--workers", "2", "--no-progress"]
    parent = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while not list((out / "partial").glob("chunk_*.json")) and parent.poll() is None:
            assert time.monotonic() < deadline, "the build never started writing shards"
            time.sleep(0.05)
        workers = [pid for pid in _children(parent.pid) if _alive(pid)]
        assert parent.poll() is None and len(workers) >= 2, "expected the parent and its workers running"
    finally:
        parent.kill()
        parent.wait()
    deadline = time.monotonic() + 10
    while any(_alive(pid) for pid in workers) and time.monotonic() < deadline:
        time.sleep(0.1)
    survivors = [pid for pid in workers if _alive(pid)]
    for pid in survivors:  # do not leave them behind even when the test fails
        os.kill(pid, signal.SIGKILL)
    assert not survivors, f"{len(survivors)} worker processes outlived their killed parent"


def test_bad_paths_in_a_data_root_are_skipped_with_a_reason(tmp_path, monkeypatch):
    root = tmp_path / "photos"
    _photo(root / "astronaut.jpg")
    (root / "dangling.jpg").symlink_to(root / "gone.jpg")
    (root / "self.jpg").symlink_to(root / "self.jpg")  # a link loop
    (root / "nested").mkdir()
    (root / "nested" / "up").symlink_to(root)  # a folder loop
    _photo(root / "locked" / "hidden_from_us.jpg")
    # A folder we may not list. chmod 0 does not stop root (as CI runs), so the listing itself fails.
    real_scandir = os.scandir

    def scandir(path="."):
        if Path(path) == root / "locked":
            raise PermissionError(13, "Permission denied", str(path))
        return real_scandir(path)

    monkeypatch.setattr(os, "scandir", scandir)
    out = tmp_path / "cache"
    assert prepare_main(["--dataset", "folder", "--data-root", str(root), "--out", str(out), "--no-progress",
                         "--workers", "1"]) == 0
    skipped = {entry["file"]: entry for entry in json.loads((out / "skipped.json").read_text())}
    assert set(skipped) == {"dangling.jpg", "self.jpg", "nested/up", "locked"}
    assert {entry["reason"] for entry in skipped.values()} == {"bad_path"}
    assert "to nothing" in skipped["dangling.jpg"]["detail"] and "Permission" in skipped["locked"]["detail"]
    assert len(PreparedDataset(out)) == 1
