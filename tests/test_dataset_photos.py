"""Photo folders end to end: a folder seeded with every kind of bad input gives the right report.

Good photos are real ones shipped by installed packages (scikit-image's astronaut, matplotlib's
grace_hopper); coffee has no face. Eight MediaPipe-prepared photos in all, built by two worker processes.
"""

from __future__ import annotations

import json
import shutil
import struct

import cv2
import numpy as np
import pytest
import skimage.data
from matplotlib import cbook

from dataset import PrepareConfig, PreparedDataset, prepare_dataset


def _exif_orientation_jpeg(rgb: np.ndarray, orientation: int) -> bytes:
    """A JPEG of ``rgb`` with an EXIF APP1 segment holding only the Orientation tag (0x0112)."""
    ok, encoded = cv2.imencode(".jpg", rgb[..., ::-1], [cv2.IMWRITE_JPEG_QUALITY, 95])
    assert ok
    tiff = b"MM\x00\x2a" + struct.pack(">I", 8) + struct.pack(">H", 1)
    tiff += struct.pack(">HHIHH", 0x0112, 3, 1, orientation, 0) + struct.pack(">I", 0)
    app1 = b"Exif\x00\x00" + tiff
    data = encoded.tobytes()
    return data[:2] + b"\xff\xe1" + struct.pack(">H", len(app1) + 2) + app1 + data[2:]


def _write_png(path, rgb_or_gray) -> None:
    array = rgb_or_gray[..., ::-1] if rgb_or_gray.ndim == 3 and rgb_or_gray.shape[2] == 3 else rgb_or_gray
    assert cv2.imwrite(str(path), array)


@pytest.fixture(scope="module")
def photo_folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("photos")
    astronaut = skimage.data.astronaut()
    with cbook.get_sample_data("grace_hopper.jpg") as f:
        hopper_bytes = f.read()
    hopper = cv2.imdecode(np.frombuffer(hopper_bytes, np.uint8), cv2.IMREAD_COLOR)[..., ::-1]
    (root / "nested" / "deeper").mkdir(parents=True)
    _write_png(root / "astronaut.png", astronaut)
    (root / "nested" / "grace_hopper.jpg").write_bytes(hopper_bytes)
    _write_png(root / "nested" / "deeper" / "gray.png", cv2.cvtColor(astronaut, cv2.COLOR_RGB2GRAY))
    rgba = np.dstack([astronaut[..., ::-1], np.full(astronaut.shape[:2], 255, np.uint8)])
    rgba[:40, :40, 3] = 0  # a transparent corner, composited on white
    cv2.imwrite(str(root / "rgba.png"), rgba)
    cv2.imwrite(str(root / "sixteen_bit.png"), astronaut[..., ::-1].astype(np.uint16) * 257)
    # Pixels stored rotated 90° clockwise, with EXIF orientation 8 (display rotated 90° anticlockwise):
    # upright when EXIF is honoured, a sideways face when it is not.
    (root / "exif_rotated.jpg").write_bytes(_exif_orientation_jpeg(np.rot90(hopper, k=-1).copy(), 8))
    png = (root / "astronaut.png").read_bytes()
    (root / "truncated.png").write_bytes(png[: len(png) // 2])
    (root / "truncated.jpg").write_bytes(hopper_bytes[: len(hopper_bytes) // 2])
    (root / "not_really.png").write_text("this is text, not a PNG\n")
    (root / "notes.txt").write_text("photos from the lab, 2024\n")
    _write_png(root / "tiny.png", cv2.resize(astronaut, (40, 40), interpolation=cv2.INTER_AREA))
    _write_png(root / "coffee.png", skimage.data.coffee())
    (root / ".DS_Store").write_bytes(b"\x00\x01")  # hidden: ignored, not reported
    return root


EXPECTED_SKIPS = {
    "coffee.png": "no_face",
    "not_really.png": "unreadable",
    "notes.txt": "not_an_image",
    "tiny.png": "tiny",
    "truncated.jpg": "unreadable",
    "truncated.png": "unreadable",
}
EXPECTED_KEPT = ["astronaut.png", "exif_rotated.jpg", "nested/deeper/gray.png", "nested/grace_hopper.jpg",
                 "rgba.png", "sixteen_bit.png"]


@pytest.fixture(scope="module")
def prepared(photo_folder, tmp_path_factory):
    out = tmp_path_factory.mktemp("cache") / "folder64"
    config = PrepareConfig(resolution=64, chunk_size=4)
    prepare_dataset("folder", photo_folder, out, config, workers=2, progress=False, verbose=False)
    return out


def test_bad_inputs_report(prepared):
    skipped = json.loads((prepared / "skipped.json").read_text())
    assert {s["file"]: s["reason"] for s in skipped} == EXPECTED_SKIPS
    assert all(s["detail"] and "\n" not in s["detail"] for s in skipped)
    ds = PreparedDataset(prepared)
    assert sorted(s["file"] for s in ds.sources) == EXPECTED_KEPT
    assert ds.manifest["counts"] == {"kept": 6, "heldout": 0, "skipped": 6, "skipped_by_reason": {
        "no_face": 1, "not_an_image": 1, "tiny": 1, "unreadable": 3}}
    assert ds.background == "network" and ds.manifest["template"]["points"]
    assert ds.identities.tolist() == list(range(6)) and ds.n_identities == 6


def test_prepared_photos_are_usable(prepared):
    ds = PreparedDataset(prepared)
    assert ds.images.shape == (6, 64, 64, 3) and ds.masks.shape == (6, 64, 64)
    errors = [s["reprojection_error_px"] for s in ds.sources]
    assert max(errors) < 0.03 * 64
    assert np.median(errors) == pytest.approx(ds.manifest["median_reprojection_error_px"])
    # Cameras sit about 7 units from the origin, looking at it (the face centre projects near the middle).
    R, t = ds.world_to_camera[:, :, :3], ds.world_to_camera[:, :, 3]
    centres = -np.einsum("nji,nj->ni", R, t)
    assert np.all(np.abs(np.linalg.norm(centres, axis=1) - 7.0) < 2.5)
    # The masks cover the middle of each face crop.
    assert (ds.masks[:, 28:36, 28:36].mean(axis=(1, 2)) > 127).all()


def test_conversions_and_exif(prepared):
    ds = PreparedDataset(prepared)
    index = {s["file"]: i for i, s in enumerate(ds.sources)}
    colour = ds.images[index["astronaut.png"]].astype(int)
    gray = ds.images[index["nested/deeper/gray.png"]].astype(int)
    assert (gray[..., 0] == gray[..., 1]).all() and (gray[..., 1] == gray[..., 2]).all()
    assert np.abs(ds.images[index["sixteen_bit.png"]].astype(int) - colour).mean() < 1.0
    assert np.abs(ds.images[index["rgba.png"]].astype(int) - colour).mean() < 3.0
    # The EXIF-rotated JPEG is prepared upright: like the original photo, not like its sideways pixels.
    upright = ds.images[index["nested/grace_hopper.jpg"]].astype(int)
    rotated = ds.images[index["exif_rotated.jpg"]].astype(int)
    assert np.abs(rotated - upright).mean() < 6.0
    roll = [ds.sources[index[name]]["pose"]["roll_deg"]
            for name in ("exif_rotated.jpg", "nested/grace_hopper.jpg")]
    assert abs(roll[0] - roll[1]) < 5.0


def test_rebuild_is_idempotent_and_summary_lists_each_skip(photo_folder, prepared, capsys):
    stamp = (prepared / "images.npy").stat().st_mtime_ns
    prepare_dataset("folder", photo_folder, prepared, PrepareConfig(resolution=64, chunk_size=4), workers=2,
                    progress=False)
    out = capsys.readouterr().out
    assert "is up to date" in out and (prepared / "images.npy").stat().st_mtime_ns == stamp
    for name, reason in EXPECTED_SKIPS.items():
        assert sum(line.startswith(f"  skipped {name}: {reason}") for line in out.splitlines()) == 1
    assert "Median reprojection error" in out


def test_all_skipped_is_one_clear_error(tmp_path):
    root = tmp_path / "photos"
    root.mkdir()
    (root / "readme.md").write_text("no photos here")
    shutil.copy(__file__, root / "script.py")
    from dataset import DataRootError

    with pytest.raises(DataRootError, match="No usable image"):
        prepare_dataset("folder", root, tmp_path / "cache", workers=1, progress=False, verbose=False)
