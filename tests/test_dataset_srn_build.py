"""The SRN loader and the build machinery (resume, idempotence, change detection), on SRN trees that the
tests render from synthetic heads: no MediaPipe needed, so these are fast."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from dataset import BuildInterrupted, DataRootError, PrepareConfig, PreparedDataset, prepare_dataset
from dataset.prepare import synthetic_config
from dataset.srn import SrnSource, parse_intrinsics, write_srn_layout
from dataset.synthetic import SyntheticConfig, SyntheticSource, render_identity

SYNTH = SyntheticConfig(n_identities=5, train_views=2, heldout_views=2, resolution=32, seed=7)
CONFIG = PrepareConfig(resolution=32, views_per_identity=1, heldout_views=2, chunk_size=2,
                       srn_world_scale=3.0)


@pytest.fixture(scope="module")
def srn_root(tmp_path_factory):
    return write_srn_layout(tmp_path_factory.mktemp("srn"), SYNTH, world_scale=3.0)


def _build(root, out, **kwargs):
    return prepare_dataset("srn", root, out, kwargs.pop("config", CONFIG), workers=1, progress=False,
                           verbose=False, **kwargs)


def test_srn_tree_layout(srn_root):
    instance = srn_root / "instance_0000"
    assert sorted(p.name for p in instance.iterdir()) == ["intrinsics.txt", "pose", "rgb"]
    K, size = parse_intrinsics(instance / "intrinsics.txt")
    assert size == (32, 32) and K[0, 0] == 64.0 and K[0, 2] == 16.0
    assert np.loadtxt(instance / "pose" / "000000.txt").size == 16


def test_srn_layout_of_only_the_heldout_views_under_the_synthetic_cache_names(tmp_path):
    """What tests/test_evaluate.py scores through --views: the held-out views only, in folders named like
    a synthetic cache's sources, cameras at scale 1."""
    import cv2

    from dataset.srn import read_camera

    synth = SyntheticConfig(n_identities=2, train_views=1, heldout_views=2, resolution=16, seed=3)
    root = write_srn_layout(tmp_path / "srn", synth, world_scale=1.0, splits=("heldout",),
                            instance_name="identity_{:06d}")
    assert sorted(p.name for p in root.iterdir()) == ["identity_000000", "identity_000001"]
    for identity in range(2):
        records = render_identity(synth, identity)
        files = sorted((root / f"identity_{identity:06d}" / "rgb").glob("*.png"))
        heldout = [view for view, record in enumerate(records) if record["split"] == "heldout"]
        assert [int(f.stem) for f in files] == heldout == [1, 2]
        for f in files:
            record = records[int(f.stem)]
            assert np.array_equal(cv2.imread(str(f))[..., ::-1], record["image"])
            camera = read_camera(f.parent.parent / "pose" / f"{f.stem}.txt", 1.0)
            assert np.allclose(camera, record["world_to_camera"], atol=1e-6)


def test_srn_loader_reads_cameras_images_and_splits(srn_root, tmp_path):
    cache = _build(srn_root, tmp_path / "cache")
    train, heldout = PreparedDataset(cache), PreparedDataset(cache, split="heldout")
    assert len(train) == 5 and len(heldout) == 10
    assert train.identities.tolist() == [0, 1, 2, 3, 4] and train.n_identities == 5
    assert train.background == [1.0, 1.0, 1.0] and train.manifest["world_scale"] == 3.0
    for ds in (train, heldout):
        for i in range(len(ds)):
            identity = int(ds.identities[i])
            view = int(Path(ds.sources[i]["file"]).stem)
            expected = render_identity(SYNTH, identity)[view]
            # The camera comes back exactly (the tree stores it at 1/3 scale, the loader scales by 3).
            assert np.allclose(ds.world_to_camera[i], expected["world_to_camera"], atol=1e-5)
            assert np.allclose(ds.K[i], expected["K"])
            assert np.abs(ds.images[i].astype(int) - expected["image"]).max() <= 1
            assert np.array_equal(ds.masks[i] > 127, expected["mask"] > 0)
    # Training and held-out views of one instance never overlap.
    files = [s["file"] for s in train.sources] + [s["file"] for s in heldout.sources]
    assert len(set(files)) == len(files)


def test_bad_srn_instance_is_skipped_and_missing_root_is_clear(srn_root, tmp_path):
    broken = tmp_path / "srn"
    write_srn_layout(broken, SyntheticConfig(n_identities=2, train_views=1, heldout_views=0, resolution=32))
    (broken / "instance_0001" / "intrinsics.txt").write_text("garbage\n")
    cache = _build(broken, tmp_path / "cache", config=CONFIG.with_(heldout_views=0))
    skipped = json.loads((cache / "skipped.json").read_text())
    assert [(s["file"], s["reason"]) for s in skipped] == [("instance_0001", "bad_instance")]
    assert len(PreparedDataset(cache)) == 1
    with pytest.raises(DataRootError, match=r"does not exist.*rgb"):
        _build(tmp_path / "missing", tmp_path / "c2")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataRootError, match="nothing the srn source can use"):
        _build(tmp_path / "empty", tmp_path / "c3")


def test_interrupted_build_resumes_without_redoing_work(srn_root, tmp_path, monkeypatch):
    out = tmp_path / "cache"
    with pytest.raises(BuildInterrupted, match="rerun"):
        _build(srn_root, out, stop_after_chunks=2)
    shards = sorted((out / "partial").glob("chunk_*.json"))
    assert len(shards) == 2 and not (out / "manifest.json").exists()
    processed = []
    original = SrnSource.process

    def counting(self, data_root, item, config):
        processed.append(item)
        return original(self, data_root, item, config)

    monkeypatch.setattr(SrnSource, "process", counting)
    _build(srn_root, out)
    assert processed == ["instance_0004"]  # only the unfinished third chunk ran again
    monkeypatch.undo()
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["build"]["chunks"] == 3
    assert manifest["build"]["chunks_reused"] == 2 and manifest["build"]["chunks_processed"] == 1
    assert not (out / "partial").exists()
    reference = _build(srn_root, tmp_path / "uninterrupted")
    for split in ("train", "heldout"):
        a, b = PreparedDataset(out, split), PreparedDataset(reference, split)
        assert np.array_equal(a.images, b.images) and np.array_equal(a.world_to_camera, b.world_to_camera)
        assert a.fingerprint == b.fingerprint


def test_idempotent_and_detects_changes(srn_root, tmp_path):
    root = tmp_path / "srn"
    write_srn_layout(root, SyntheticConfig(n_identities=3, train_views=1, heldout_views=1, resolution=32))
    out = tmp_path / "cache"
    _build(root, out)
    stamp = (out / "images.npy").stat().st_mtime_ns
    fingerprint = PreparedDataset(out).fingerprint
    _build(root, out)
    assert (out / "images.npy").stat().st_mtime_ns == stamp  # nothing rebuilt
    # A touched source file (new mtime) changes the fingerprint and forces a rebuild.
    pose_file = root / "instance_0002" / "pose" / "000000.txt"
    os.utime(pose_file, ns=(pose_file.stat().st_atime_ns, pose_file.stat().st_mtime_ns + 10**9))
    _build(root, out)
    assert PreparedDataset(out).fingerprint != fingerprint
    # A new instance is picked up; changed settings rebuild too.
    write_srn_layout(root / "extra", SyntheticConfig(n_identities=1, train_views=1, heldout_views=1,
                                                     resolution=32))
    _build(root, out)
    assert len(PreparedDataset(out)) == 4
    _build(root, out, config=CONFIG.with_(resolution=16))
    assert PreparedDataset(out).image_size == (16, 16)
    assert np.allclose(PreparedDataset(out).K[0, 0, 0], 32.0)


def test_cli_prints_summary_and_clear_errors(srn_root, tmp_path):
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    run = [sys.executable, "-m", "dataset.prepare", "--dataset", "srn", "--data-root", str(srn_root),
           "--out", str(tmp_path / "cache"), "--resolution", "32", "--heldout-views", "1", "--workers", "1",
           "--no-progress"]
    done = subprocess.run(run, capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "Kept 5 training images (5 held-out views) of 5 identities" in done.stdout
    assert f"Cache: {(tmp_path / 'cache').resolve()}" in done.stdout
    again = subprocess.run(run, capture_output=True, text=True, env=env, timeout=120)
    assert "is up to date" in again.stdout
    bad = subprocess.run([*run[:6], str(tmp_path / "nope"), *run[7:]], capture_output=True, text=True,
                         env=env, timeout=120)
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1 and "expects SRN folders" in bad.stderr


def test_concurrent_builds_into_one_cache_build_once(srn_root, tmp_path, capsys):
    """Two builders of the same cache (e.g. two ranks) serialise on its lock: one builds, one reuses."""
    out = tmp_path / "cache"
    errors = []

    def build():
        try:
            prepare_dataset("srn", srn_root, out, CONFIG, workers=1, progress=False)
        except Exception as err:  # surfaced below; a thread cannot raise into the test
            errors.append(err)

    threads = [threading.Thread(target=build) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert not errors
    printed = capsys.readouterr().out
    assert printed.count("is up to date") == 1 and printed.count("Kept 5 training images") == 2
    assert len(PreparedDataset(out)) == 5


def test_invalid_settings_are_one_clear_error():
    with pytest.raises(ValueError, match=r"resolution must be at least 8 \(got 4\)"):
        PrepareConfig(resolution=4)
    with pytest.raises(ValueError, match="framing must be"):
        PrepareConfig(framing="centre")
    with pytest.raises(ValueError, match="Unknown dataset 'imagenet'"):
        prepare_dataset("imagenet", None, "/nonexistent", verbose=False)
    assert PrepareConfig.paper().resolution == 256 and PrepareConfig.cpu() == PrepareConfig()


# The CLI build of test_killed_build_resumes (dataset.prepare.main) with one hook: identity number
# ``hold_after`` touches the file ``held`` and then never finishes, so the SIGKILL always lands
# mid-build, after exactly ``hold_after`` finished shards (one identity per chunk), however fast or
# loaded the machine is.
HELD_BUILD = """
import sys, time
from pathlib import Path
from dataset import prepare
from dataset.synthetic import SyntheticSource

held, hold_after, argv = Path(sys.argv[1]), int(sys.argv[2]), sys.argv[3:]
process = SyntheticSource.process

def held_process(self, data_root, item, config):
    if int(item.split("_")[-1]) == hold_after:
        held.touch()
        time.sleep(600)  # killed here
    return process(self, data_root, item, config)

SyntheticSource.process = held_process
sys.exit(prepare.main(argv))
"""


def test_killed_build_resumes(tmp_path, monkeypatch):
    """SIGKILL a real CLI build mid-way; the rerun keeps its finished shards and completes the cache."""
    out, held, identities, hold_after = tmp_path / "cache", tmp_path / "held", 12, 3
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    command = [sys.executable, "-c", HELD_BUILD, str(held), str(hold_after), "--dataset", "synthetic",
               "--out", str(out), "--identities", str(identities), "--resolution", "32",
               "--heldout-views", "1", "--chunk-size", "1", "--workers", "1", "--no-progress"]
    log = tmp_path / "stderr.txt"
    with log.open("wb") as stderr:
        process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=stderr)
    try:
        deadline = time.monotonic() + 60
        while not held.exists():
            assert process.poll() is None, f"the build ended before the held item: {log.read_text()}"
            assert time.monotonic() < deadline, "the build never reached the held item"
            time.sleep(0.02)
    finally:
        process.kill()
        process.wait()
    assert not (out / "manifest.json").exists()
    assert len(list((out / "partial").glob("chunk_*.json"))) == hold_after
    processed = []
    original = SyntheticSource.process

    def counting(self, data_root, item, config):
        processed.append(item)
        return original(self, data_root, item, config)

    monkeypatch.setattr(SyntheticSource, "process", counting)
    config = PrepareConfig(resolution=32, heldout_views=1, synthetic_identities=identities, chunk_size=1)
    prepare_dataset("synthetic", None, out, config, workers=1, progress=False, verbose=False)
    monkeypatch.undo()
    # Only the unfinished chunks ran again, and the resumed cache is the one a single build makes.
    assert processed == [f"identity_{i:06d}" for i in range(hold_after, identities)]
    ds = PreparedDataset(out)
    assert ds.manifest["build"]["chunks_reused"] == hold_after and len(ds) == identities
    assert ds.manifest["build"]["chunks_processed"] == identities - hold_after
    for identity in (0, hold_after - 1, hold_after, identities - 1):
        expected = render_identity(synthetic_config(config), identity)[0]
        assert np.array_equal(ds.images[identity], expected["image"])


def test_default_workers_stay_in_process_for_small_sources():
    from dataset.sources import PHOTO_SOURCES, default_workers

    photos = PHOTO_SOURCES["folder"]
    assert photos.default_workers(20) == 1
    assert photos.default_workers(70_000) == default_workers()
    assert SrnSource().default_workers(5) == 1
