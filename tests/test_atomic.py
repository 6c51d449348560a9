"""common.atomic, the one writer every package uses: unique temp names, fsync of file and folder,
os.replace, nothing left behind on failure; and no other module renames files into place itself."""

from __future__ import annotations

import ast
import json
import os
import threading
from pathlib import Path

import pytest

from common import atomic
from common.atomic import atomic_path, is_temp_name, write_json, write_text

ROOT = Path(__file__).resolve().parents[1]


def test_each_write_gets_its_own_temp_file_beside_the_target(tmp_path):
    target = tmp_path / "config.json"
    with atomic_path(target) as first, atomic_path(target) as second:
        assert first != second  # two writers of one target never share a temp file
        assert first.parent == second.parent == tmp_path
        assert is_temp_name(first.name) and is_temp_name(second.name)
        first.write_text("first")
        second.write_text("second")
    assert target.read_text() == "first"  # the block that ends last wins
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json"]


def test_keep_suffix_keeps_the_format_suffix(tmp_path):
    with atomic_path(tmp_path / "image.png", keep_suffix=True) as tmp:
        assert tmp.suffix == ".png" and is_temp_name(tmp.name)
        tmp.write_bytes(b"png")
    assert (tmp_path / "image.png").read_bytes() == b"png"


def test_the_file_and_its_folder_are_fsynced_before_and_after_the_rename(tmp_path, monkeypatch):
    events = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        events.append(("fsync", "dir" if os.path.isdir(f"/proc/self/fd/{fd}") else "file"))
        real_fsync(fd)

    def replace(src, dst):
        events.append(("replace", Path(dst).name))
        real_replace(src, dst)

    monkeypatch.setattr(atomic.os, "fsync", fsync)
    monkeypatch.setattr(atomic.os, "replace", replace)
    write_json(tmp_path / "a.json", {"steps": 3})
    assert events == [("fsync", "file"), ("replace", "a.json"), ("fsync", "dir")]
    assert json.loads((tmp_path / "a.json").read_text()) == {"steps": 3}


def test_a_failed_write_keeps_the_old_file_and_leaves_no_temp_file(tmp_path):
    target = write_text(tmp_path / "notes.txt", "old")
    with pytest.raises(RuntimeError), atomic_path(target) as tmp:
        tmp.write_text("half")
        raise RuntimeError("disk full")
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["notes.txt"]


def test_files_get_ordinary_permissions(tmp_path):
    umask = os.umask(0o022)
    try:
        path = write_text(tmp_path / "shared.txt", "x")
    finally:
        os.umask(umask)
    assert path.stat().st_mode & 0o777 == 0o644


def test_concurrent_writers_of_one_file_never_leave_a_torn_file(tmp_path):
    target = tmp_path / "state.json"
    bodies = [{"writer": i, "pad": "x" * 20000} for i in range(8)]

    def write(body):
        for _ in range(10):
            write_json(target, body)

    threads = [threading.Thread(target=write, args=(b,)) for b in bodies]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert json.loads(target.read_text()) in bodies
    assert [p.name for p in tmp_path.iterdir()] == ["state.json"]


def test_json_values_numpy_and_paths_become_plain_json(tmp_path):
    import numpy as np

    write_json(tmp_path / "r.json", {"psnr": float("inf"), "n": np.int64(3), "x": np.zeros(2, np.float32),
                                     "where": tmp_path})
    assert json.loads((tmp_path / "r.json").read_text()) == {"psnr": "inf", "n": 3, "x": [0.0, 0.0],
                                                             "where": str(tmp_path)}


def test_no_other_module_renames_a_file_into_place():
    """One writer: os.replace / os.rename / mkstemp appear only in common/atomic.py."""
    offenders = []
    for path in sorted(ROOT.rglob("*.py")):
        if ".venv" in path.parts or "tests" in path.parts or path == ROOT / "common" / "atomic.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if (isinstance(node, ast.Attribute) and node.attr in ("replace", "rename", "mkstemp")
                    and isinstance(node.value, ast.Name) and node.value.id in ("os", "tempfile")):
                offenders.append(f"{path.relative_to(ROOT)}:{node.lineno}")
    assert not offenders, f"write through common.atomic instead: {offenders}"
