"""The one atomic writer: every file this project writes (caches, checkpoints, config.json, results,
media, traces) goes through ``atomic_path``.

A write goes to a temporary file with a unique name (``tempfile.mkstemp``) in the target's own folder,
is fsync'ed, then ``os.replace``d over the target, and the folder is fsync'ed so the rename itself
survives a power cut. Readers therefore see the old file or the new one, never half of either; two
writers of one target never share a temp file; a writer killed midway leaves only a stray temp file
(``.NAME.XXXXXXXX.tmp``, or ``.NAME.XXXXXXXX.SUFFIX`` with ``keep_suffix``), which ``is_temp_name``
recognises and every reader ignores.

    with atomic_path("out/image.png", keep_suffix=True) as tmp:   # writers that pick a format by suffix
        cv2.imwrite(str(tmp), image)
    write_json("run/config.json", {"run": {"steps": 10}})
    write_bytes("a.bin", b"...")

Where it lives: ``common/`` is the lowest layer, below renderer/ and pose/ (the two bottom packages, which
must not import each other) and everything above them, and it imports nothing of this project. A module
inside renderer/ would not do: dataset/ and pose/ must not import renderer/ (``tests/test_layering.py``).
Temp files get ordinary permissions (0666 minus the umask, like ``open``), not mkstemp's 0600.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

TEMP_SUFFIX = ".tmp"
# .NAME.<8 mkstemp characters>.tmp  or  .NAME.<8 characters>SUFFIX (keep_suffix)
_TEMP_NAME = re.compile(r"^\..+\.[A-Za-z0-9_]{8}(\.[^.]+)?$")


def is_temp_name(name: str) -> bool:
    """Whether a file name is one of ``atomic_path``'s temp files (a stray one is a write cut short).

    >>> is_temp_name(".step_00000002.pt.k3j_9xq2.tmp"), is_temp_name("step_00000002.pt")
    (True, False)
    """
    return bool(_TEMP_NAME.match(name))


def fsync_directory(directory: str | os.PathLike) -> None:
    """Make renames in ``directory`` durable (a no-op where folders cannot be opened, e.g. Windows)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some file systems refuse fsync on a folder; the rename is still atomic
    finally:
        os.close(fd)


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, keep_suffix: bool = False) -> Iterator[Path]:
    """Yield a fresh temp path beside ``path``; when the block ends without an exception it is fsync'ed
    and renamed over ``path`` (and the folder fsync'ed), otherwise it is removed.

    ``keep_suffix`` ends the temp name with ``path``'s suffix, for writers that choose the format by the
    file name (``cv2.imwrite``, ``torch.profiler``'s trace export); the default ends it with ``.tmp``.
    The parent folder is created.

    >>> with atomic_path("/tmp/example.txt") as tmp:  # doctest: +SKIP
    ...     tmp.write_text("done")
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    suffix = path.suffix if keep_suffix and path.suffix else TEMP_SUFFIX
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix, dir=path.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        _fsync_file(tmp)
        os.replace(tmp, path)
        fsync_directory(path.parent)
    finally:
        tmp.unlink(missing_ok=True)


def atomic_write(path: str | os.PathLike, write: Callable[[Any], None]) -> Path:
    """Call ``write(handle)`` on a binary file handle, atomically (``atomic_path``); returns ``path``.

    >>> atomic_write("/tmp/x.npy", lambda fh: np.save(fh, array))  # doctest: +SKIP
    """
    with atomic_path(path) as tmp, open(tmp, "wb") as handle:
        write(handle)
    return Path(path)


def write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write bytes atomically; returns ``path``."""
    return atomic_write(path, lambda handle: handle.write(data))


def write_text(path: str | os.PathLike, text: str) -> Path:
    """Write UTF-8 text atomically; returns ``path``."""
    return write_bytes(path, text.encode("utf-8"))


def save_npy(path: str | os.PathLike, array) -> Path:
    """``np.save`` atomically; returns ``path``."""
    import numpy as np

    return atomic_write(path, lambda handle: np.save(handle, np.asarray(array)))


def save_npz(path: str | os.PathLike, **arrays) -> Path:
    """``np.savez`` atomically; returns ``path``."""
    import numpy as np

    return atomic_write(path, lambda handle: np.savez(handle, **arrays))


def json_safe(obj):
    """``obj`` with what JSON cannot hold made plain: numpy/torch scalars and arrays -> numbers and lists,
    paths -> strings, tuples -> lists, NaN/inf -> "nan"/"inf"/"-inf" (a perfect PSNR is inf).

    >>> json_safe({"psnr": float("inf"), "shape": (2, 3)})
    {'psnr': 'inf', 'shape': [2, 3]}
    """
    if isinstance(obj, dict):
        return {str(k): json_safe(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [json_safe(v) for v in obj]
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    if isinstance(obj, float) and (obj != obj or obj in (float("inf"), float("-inf"))):
        return "nan" if obj != obj else ("inf" if obj > 0 else "-inf")
    if hasattr(obj, "tolist") and not isinstance(obj, str | bytes):  # numpy / torch scalars and arrays
        return json_safe(obj.tolist())
    return obj


def write_json(path: str | os.PathLike, obj, indent: int = 1) -> Path:
    """Write ``json_safe(obj)`` as JSON atomically (a trailing newline); returns ``path``.

    >>> write_json("/tmp/example.json", {"steps": 10})  # doctest: +SKIP
    """
    return write_text(path, json.dumps(json_safe(obj), indent=indent) + "\n")
