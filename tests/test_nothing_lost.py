"""Nothing a user made is destroyed: caches, run directories and worker processes (issue 11, items 0-4)."""

from __future__ import annotations

import cv2
import pytest
import skimage.data

from dataset import PreparedDataset
from dataset.cache import MARKER
from dataset.prepare import main as prepare_main


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
