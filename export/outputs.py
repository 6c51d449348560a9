"""Where results go: output folders are created, never overwritten silently; ``--force`` overwrites.

The files themselves are written by ``common.atomic`` (temp file, fsync, ``os.replace``).
"""

from __future__ import annotations

import re
import tempfile
from pathlib import Path


class OutputExistsError(FileExistsError):
    """An output would replace existing results and the user did not pass --force."""


class OutputPathError(ValueError):
    """A path derived from input data would land outside the output folder."""


def output_name(text: str) -> str:
    """``text`` as one safe file or folder name: no separators, no leading dots, nothing but
    letters, digits, ``_``, ``-`` and inner ``.``; empty or dots-only becomes ``unnamed``.

    >>> output_name(".."), output_name("a/b c.jpg"), output_name(".hidden")
    ('unnamed', 'a_b_c.jpg', 'hidden')
    """
    name = re.sub(r"[^A-Za-z0-9._-]+", "_", str(text)).lstrip(".")
    return name if name.strip("._") else "unnamed"


def inside(root: str | Path, *parts: str) -> Path:
    """``root / parts...``, refused with OutputPathError unless it lies inside ``root`` (after resolving
    ``..`` and symlinks), so no name taken from the data can write elsewhere.

    >>> inside("/tmp/out", "a", "b.png")
    PosixPath('/tmp/out/a/b.png')
    """
    path = Path(root).joinpath(*parts)
    base = Path(root).resolve()
    target = path.resolve()
    if target == base or base not in target.parents:
        raise OutputPathError(f"{path} would be written outside {root}; rename the input.")
    return path


def claim_dir(path: str | Path, force: bool = False) -> Path:
    """Create an output folder; a non-empty existing one is an error unless ``force``, and so is one
    this process may not write to (found now, before any work rather than after it).

    With ``force`` the folder is kept and its files are overwritten one by one as new ones are written.
    """
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise OutputExistsError(f"{path} exists and is not a folder; choose another --out.")
    if path.is_dir() and any(path.iterdir()) and not force:
        raise OutputExistsError(
            f"{path} already holds results; choose another --out or pass --force to overwrite."
        )
    try:
        path.mkdir(parents=True, exist_ok=True)
        tempfile.TemporaryFile(dir=path).close()
    except OSError as err:
        raise OutputExistsError(f"Cannot write to {path} ({err.strerror}); choose an --out you may "
                                "write to.") from None
    return path


def claim_file(path: str | Path, force: bool = False) -> Path:
    """Check an output file may be written (its folder is created); existing is an error unless ``force``."""
    path = Path(path)
    if path.is_dir():
        raise OutputExistsError(f"{path} is a folder; give a file name.")
    if path.exists() and not force:
        raise OutputExistsError(f"{path} already exists; choose another path or pass --force to overwrite.")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tempfile.TemporaryFile(dir=path.parent).close()
    except OSError as err:  # a parent that is a file, or a folder this process may not write to
        raise OutputExistsError(f"Cannot write {path} ({err.strerror}); choose another path.") from None
    return path
