"""The prepared-dataset cache: a versioned directory of memory-mappable arrays that other tools can read.

Layout (FORMAT_VERSION = 1)::

    manifest.json     format_version, source, settings, fingerprint, template, counts, background, ...
    images.npy        (N, H, W, 3) uint8
    masks.npy         (N, H, W) uint8, 255 = foreground
    cameras.npz       K (N, 3, 3) float32, world_to_camera (N, 3, 4) float32 (OpenCV, world-to-camera)
    identities.npy    (N,) int64, which latent each image trains
    sources.json      [{"file", "identity", "reprojection_error_px", ...}] per image
    skipped.json      [{"file", "reason", "detail"}] per skipped file
    depths.npy        optional (N, H, W) float32 ray distance t, 0 = background (synthetic only)
    true_cameras.npz  optional (faces): the generator's K (N, 3, 3), world_to_camera (N, 3, 4) float32,
                      landmarks (N, 468, 4) float32: u, v, ray distance t, visible (generator version 2 on)
    true_depths.npy   optional (faces): (N, H, W) float32 true ray distance t from the true camera
    true_masks.npy    optional (faces): (N, H, W) uint8 exact coverage, 255 = foreground
    heldout/          optional: the same files for held-out views of training identities

``manifest.json`` is written last and removed first, so a directory with a manifest is complete.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import time
import zipfile
from collections import Counter
from collections.abc import Iterable
from functools import cached_property
from pathlib import Path

import numpy as np

from common.atomic import atomic_path, save_npy, save_npz, write_json

FORMAT_VERSION = 1
SPLITS = ("train", "heldout")
# record keys of the truth
TRUTH_KEYS = ("true_mask", "true_depth", "true_K", "true_world_to_camera", "true_landmarks")
TRUTH_FILES = ("true_cameras.npz", "true_depths.npy", "true_masks.npy")
SPLIT_FILES = ("manifest.json", "images.npy", "masks.npy", "cameras.npz", "identities.npy", "sources.json",
               "skipped.json")


class CacheError(RuntimeError):
    """A prepared cache that cannot be read: missing, incomplete, corrupt or from a newer format."""


class LockedError(RuntimeError):
    """Another process holds the lock on a cache or run directory."""


@contextlib.contextmanager
def directory_lock(directory: Path, wait: bool, what: str):
    """Hold an exclusive advisory lock on ``directory/.lock`` (POSIX flock; nothing on Windows).

    ``wait`` blocks until the holder lets go (two builds of one cache: the second then finds it done);
    otherwise a held lock raises LockedError naming the holder's pid, as the holder writes it into the
    lock file. The lock dies with its process, so a killed run never leaves a stale lock behind.
    """
    try:
        import fcntl
    except ImportError:  # Windows: no lock
        yield
        return
    directory.mkdir(parents=True, exist_ok=True)
    with open(directory / ".lock", "a+") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "another process"
            raise LockedError(f"{directory} is in use by {holder}; wait for it to finish (or stop it), or "
                              f"choose another {what}.") from None
        handle.seek(0)
        handle.truncate()
        handle.write(f"process {os.getpid()} ({Path(sys.argv[0]).name or 'python'}) since "
                     f"{time.strftime('%Y-%m-%d %H:%M:%S')}\n")
        handle.flush()
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def split_dir(cache_dir: Path, split: str) -> Path:
    """``cache_dir`` for the training split, ``cache_dir/heldout`` for the held-out views."""
    if split not in SPLITS:
        raise ValueError(f"Unknown split {split!r}; use 'train' or 'heldout'.")
    return Path(cache_dir) if split == "train" else Path(cache_dir) / "heldout"


def write_split(directory: Path, chunks: Iterable[dict], n: int, image_size: tuple[int, int],
                with_depth: bool, with_truth: bool = False) -> None:
    """Stream one split's chunks into the cache files without holding all images in memory.

    Each chunk is a dict: image (k, H, W, 3) uint8, mask (k, H, W) uint8, depth (k, H, W) float32
    (when with_depth), K (k, 3, 3), world_to_camera (k, 3, 4), identity (k,), sources (list of k dicts);
    when with_truth also true_mask (k, H, W) uint8, true_depth (k, H, W) float32, true_K (k, 3, 3) and
    true_world_to_camera (k, 3, 4), true_landmarks (k, 468, 4) (the faces generator's truth, written to
    the TRUTH_FILES).
    Big arrays go to temp files through np.lib.format.open_memmap and are moved into place at the end.
    """
    if n < 1:
        raise ValueError(f"Nothing to write for {directory}: a split needs at least one image.")
    directory.mkdir(parents=True, exist_ok=True)
    height, width = image_size
    shapes = {"images": ((n, height, width, 3), np.uint8), "masks": ((n, height, width), np.uint8)}
    if with_depth:
        shapes["depths"] = ((n, height, width), np.float32)
    if with_truth:
        shapes["true_depths"] = ((n, height, width), np.float32)
        shapes["true_masks"] = ((n, height, width), np.uint8)
    with contextlib.ExitStack() as moves:  # each temp file is moved into place when the stack closes
        temps = {name: moves.enter_context(atomic_path(directory / f"{name}.npy")) for name in shapes}
        maps = {name: np.lib.format.open_memmap(temps[name], mode="w+", dtype=dtype, shape=shape)
                for name, (shape, dtype) in shapes.items()}
        _fill_split(maps, chunks, n, directory, with_depth, with_truth)
    if not with_depth and (directory / "depths.npy").exists():
        (directory / "depths.npy").unlink()


def _fill_split(maps: dict, chunks: Iterable[dict], n: int, directory: Path, with_depth: bool,
                with_truth: bool) -> None:
    """Copy the chunks into the memmaps and write the small per-image files (``write_split``)."""
    Ks, world_to_cameras, identities, sources, true_Ks, true_world_to_cameras = [], [], [], [], [], []
    true_landmarks = []
    start = 0
    for chunk in chunks:
        k = len(chunk["identity"])
        if k == 0:
            continue
        maps["images"][start:start + k] = chunk["image"]
        maps["masks"][start:start + k] = chunk["mask"]
        if with_depth:
            maps["depths"][start:start + k] = chunk["depth"]
        if with_truth:
            maps["true_depths"][start:start + k] = chunk["true_depth"]
            maps["true_masks"][start:start + k] = chunk["true_mask"]
            true_Ks.append(np.asarray(chunk["true_K"], np.float32))
            true_world_to_cameras.append(np.asarray(chunk["true_world_to_camera"], np.float32))
            true_landmarks.append(np.asarray(chunk["true_landmarks"], np.float32))
        Ks.append(np.asarray(chunk["K"], np.float32))
        world_to_cameras.append(np.asarray(chunk["world_to_camera"], np.float32))
        identities.append(np.asarray(chunk["identity"], np.int64))
        sources.extend(chunk["sources"])
        start += k
    if start != n:
        raise RuntimeError(f"internal error: expected {n} images for {directory}, got {start}")
    for array in maps.values():
        array.flush()
    maps.clear()  # drop the memmaps before their files are moved
    if with_truth:
        save_npz(directory / "true_cameras.npz", K=np.concatenate(true_Ks),
                 world_to_camera=np.concatenate(true_world_to_cameras),
                 landmarks=np.concatenate(true_landmarks))
    else:
        for name in TRUTH_FILES:
            (directory / name).unlink(missing_ok=True)
    save_npz(directory / "cameras.npz", K=np.concatenate(Ks),
             world_to_camera=np.concatenate(world_to_cameras))
    save_npy(directory / "identities.npy", np.concatenate(identities))
    write_json(directory / "sources.json", sources)


MARKER = ".lolnerf-cache"  # written into a cache directory before anything in it is created or removed
BUILD_FILES = (*SPLIT_FILES, "depths.npy", *TRUTH_FILES, "partial", "heldout", ".lock", MARKER)


def claim_cache_dir(out_dir: Path, data_root: Path | None = None) -> Path:
    """Make ``out_dir`` a cache directory this project owns, or refuse it before anything is written.

    A new or empty folder, or one this project has built into (its marker file, or a manifest or
    ``partial/`` from a build written before the marker existed), is claimed by writing the marker; any
    other non-empty folder belongs to the user and raises CacheError, as does a data root inside it.

    >>> claim_cache_dir(Path("runs/cache/synthetic64"))  # doctest: +SKIP
    PosixPath('runs/cache/synthetic64')
    """
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise CacheError(f"--out {out_dir} is a file, not a folder; choose a new folder for the cache.")
    if data_root is not None:
        cache, root = out_dir.resolve(), Path(data_root).resolve()
        if root == cache or root.is_relative_to(cache):
            raise CacheError(f"--data-root {data_root} lies inside --out {out_dir}, and a build rewrites its "
                             "--out: put the cache in a folder of its own.")
    if out_dir.is_dir() and not (out_dir / MARKER).is_file():
        legacy = read_manifest(out_dir) is not None or (out_dir / "partial" / "build.json").is_file()
        foreign = sorted(p.name for p in out_dir.iterdir() if p.name not in BUILD_FILES)
        if foreign or (any(out_dir.iterdir()) and not legacy):
            shown = ", ".join(foreign[:3]) + (", ..." if len(foreign) > 3 else "")
            raise CacheError(f"--out {out_dir} already holds files that are not a prepared cache ({shown}); "
                             "nothing was changed: choose a new or empty folder for the cache.")
    out_dir.mkdir(parents=True, exist_ok=True)
    # Exclusive create, not a temp file and a rename: of two builds claiming one folder, one writes it.
    with contextlib.suppress(FileExistsError), open(out_dir / MARKER, "x") as marker:
        marker.write("A prepared LOLNeRF dataset cache: dataset.prepare rewrites the files it made here.\n")
    return out_dir


def remove_created(directory: Path, names: Iterable[str], patterns: Iterable[str] = ()) -> None:
    """Delete the files a build wrote in ``directory`` (by name or glob pattern), then the folder itself
    if that left it empty. Anything else in it (a user's file) is kept, and with it the folder."""
    directory = Path(directory)
    if not directory.is_dir() or directory.is_symlink():
        return
    doomed = {directory / name for name in names}
    for pattern in patterns:
        doomed.update(directory.glob(pattern))
    for path in doomed:
        if path.is_file() or path.is_symlink():
            path.unlink(missing_ok=True)
    with contextlib.suppress(OSError):  # not empty: something we did not write is still there
        directory.rmdir()


def remove_split(directory: Path) -> None:
    """Delete a split folder (e.g. a stale ``heldout/``) as far as a build wrote it."""
    remove_created(directory, (*SPLIT_FILES, "depths.npy", *TRUTH_FILES), (".*.tmp",))


def remove_partial(partial: Path) -> None:
    """Delete a build's ``partial/`` shards folder as far as the build wrote it."""
    remove_created(partial, ("build.json",), ("chunk_*.npz", "chunk_*.json", ".*.tmp"))


def invalidate(cache_dir: Path) -> None:
    """Remove the manifests first, so an interrupted rewrite never looks like a complete cache."""
    for directory in (Path(cache_dir), Path(cache_dir) / "heldout"):
        (directory / "manifest.json").unlink(missing_ok=True)


def complete_manifest(manifest: dict, counts: dict[str, int], skipped: list[dict],
                      image_size: tuple[int, int]) -> dict:
    """Add the fields every cache has: format version, counts (kept/heldout/skipped by reason), size."""
    by_reason = Counter(entry["reason"] for entry in skipped)
    return {
        "format_version": FORMAT_VERSION,
        **manifest,
        "image_size": list(image_size),
        "counts": {"kept": counts.get("train", 0), "heldout": counts.get("heldout", 0),
                   "skipped": len(skipped), "skipped_by_reason": dict(sorted(by_reason.items()))},
    }


def read_manifest(cache_dir: str | Path) -> dict | None:
    """The manifest of a complete cache, or None when there is none (or it is unreadable)."""
    try:
        with open(Path(cache_dir) / "manifest.json") as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def is_up_to_date(cache_dir: str | Path, fingerprint: str) -> bool:
    """True when ``cache_dir`` holds a complete, readable cache of this format with this fingerprint."""
    manifest = read_manifest(cache_dir)
    if not manifest or manifest.get("fingerprint") != fingerprint:
        return False
    if manifest.get("format_version") != FORMAT_VERSION:
        return False
    try:
        PreparedDataset(cache_dir)
        if manifest.get("counts", {}).get("heldout"):
            PreparedDataset(cache_dir, split="heldout")
    except CacheError:
        return False
    return True


def _load_array(path: Path, mmap: bool) -> np.ndarray:
    try:
        return np.load(path, mmap_mode="r" if mmap else None, allow_pickle=False)
    except FileNotFoundError:
        raise CacheError(f"Prepared cache file {path} is missing; delete {path.parent} and prepare the "
                         "dataset again (python -m dataset.prepare ...).") from None
    except (ValueError, OSError, EOFError) as err:
        raise CacheError(f"Prepared cache file {path} is corrupt ({err}); delete {path.parent} and prepare "
                         "the dataset again (python -m dataset.prepare ...).") from None


class PreparedDataset:
    """A prepared cache split, memory-mapped: nothing big is read until it is indexed.

    Attributes: images (N, H, W, 3) uint8 memmap, masks (N, H, W) uint8 memmap, depths (N, H, W) float32
    memmap or None, true_K / true_world_to_camera / true_depths / true_masks (the faces generator's truth,
    else None), true_landmarks (N, 468, 4) u, v, t, visible or None (faces generator version 2 on),
    K (N, 3, 3) float32, world_to_camera (N, 3, 4) float32, identities (N,) int64,
    manifest (dict), fingerprint (str), n_identities (int, the size of the latent table, equal for both
    splits), image_size (H, W), background ("network" for photos, or an RGB list), sources (list, read
    on first use).

    >>> ds = PreparedDataset("runs/cache/synthetic64", split="train")  # doctest: +SKIP
    >>> ds.images.shape, ds.K.shape  # doctest: +SKIP
    ((64, 64, 64, 3), (64, 3, 3))
    """

    def __init__(self, cache_dir: str | Path, split: str = "train"):
        self.cache_dir = Path(cache_dir)
        self.split = split
        directory = split_dir(self.cache_dir, split)
        top = self.cache_dir / "manifest.json"
        if not self.cache_dir.is_dir():
            raise CacheError(f"No prepared cache at {self.cache_dir}; create one with python -m "
                             "dataset.prepare --dataset NAME --data-root DIR --out CACHE_DIR.")
        if not top.exists():
            raise CacheError(f"{self.cache_dir} has no manifest.json, so it is not a complete prepared cache "
                             "(an interrupted build?); rerun python -m dataset.prepare with the same --out.")
        self.manifest = self._read_json(top)
        version = self.manifest.get("format_version")
        if not isinstance(version, int):
            raise CacheError(f"{top} has no integer format_version; it is not a prepared cache.")
        if version > FORMAT_VERSION:
            raise CacheError(f"{self.cache_dir} uses cache format {version}, newer than this code's "
                             f"{FORMAT_VERSION}; update the code or prepare the dataset again.")
        if split == "heldout":
            if not self.manifest.get("counts", {}).get("heldout") or not directory.is_dir():
                raise CacheError(f"{self.cache_dir} has no held-out split (heldout/); only the synthetic, "
                                 "faces and srn datasets have held-out views.")
            heldout_manifest = self._read_json(directory / "manifest.json")
            if heldout_manifest.get("fingerprint") != self.manifest.get("fingerprint"):
                raise CacheError(f"{directory} does not belong to the cache at {self.cache_dir} "
                                 "(fingerprints differ); prepare the dataset again.")
        self.images = _load_array(directory / "images.npy", mmap=True)
        self.masks = _load_array(directory / "masks.npy", mmap=True)
        self.identities = _load_array(directory / "identities.npy", mmap=False).astype(np.int64)
        cameras_path = directory / "cameras.npz"
        try:
            with np.load(cameras_path, allow_pickle=False) as cameras:
                self.K = np.asarray(cameras["K"], np.float32)
                self.world_to_camera = np.asarray(cameras["world_to_camera"], np.float32)
        except FileNotFoundError:
            raise CacheError(f"Prepared cache file {cameras_path} is missing; prepare the dataset "
                             "again.") from None
        except (ValueError, OSError, KeyError, EOFError, zipfile.BadZipFile) as err:
            raise CacheError(f"Prepared cache file {cameras_path} is corrupt ({err}); prepare the dataset "
                             "again.") from None
        depth_path = directory / "depths.npy"
        self.depths = _load_array(depth_path, mmap=True) if depth_path.exists() else None
        self.true_K = self.true_world_to_camera = self.true_depths = self.true_masks = None
        self.true_landmarks = None
        if (directory / "true_cameras.npz").exists():  # the faces generator's truth, for evaluation
            self.true_depths = _load_array(directory / "true_depths.npy", mmap=True)
            self.true_masks = _load_array(directory / "true_masks.npy", mmap=True)
            try:
                with np.load(directory / "true_cameras.npz", allow_pickle=False) as truth:
                    self.true_K = np.asarray(truth["K"], np.float32)
                    self.true_world_to_camera = np.asarray(truth["world_to_camera"], np.float32)
                    if "landmarks" in truth:  # caches from faces generator version 1 lack them
                        self.true_landmarks = np.asarray(truth["landmarks"], np.float32)
            except (ValueError, OSError, KeyError, EOFError, zipfile.BadZipFile) as err:
                raise CacheError(f"Prepared cache file {directory / 'true_cameras.npz'} is corrupt ({err}); "
                                 "prepare the dataset again.") from None
        self._sources_path = directory / "sources.json"
        if not self._sources_path.is_file():
            raise CacheError(f"Prepared cache file {self._sources_path} is missing; prepare the dataset "
                             "again.")
        self._check_shapes()

    def _read_json(self, path: Path):
        try:
            with open(path) as f:
                return json.load(f)
        except FileNotFoundError:
            raise CacheError(f"Prepared cache file {path} is missing; prepare the dataset again.") from None
        except ValueError as err:
            raise CacheError(f"Prepared cache file {path} is corrupt ({err}); prepare the dataset "
                             "again.") from None

    def _check_shapes(self) -> None:
        n = len(self.images)
        problems = []
        if self.images.ndim != 4 or self.images.shape[-1] != 3 or self.images.dtype != np.uint8:
            problems.append(f"images.npy is {self.images.dtype} {self.images.shape}, "
                            "expected uint8 (N, H, W, 3)")
        expected = {"masks.npy": (self.masks.shape, (n, *self.images.shape[1:3])),
                    "cameras.npz K": (self.K.shape, (n, 3, 3)),
                    "cameras.npz world_to_camera": (self.world_to_camera.shape, (n, 3, 4)),
                    "identities.npy": (self.identities.shape, (n,))}
        if self.depths is not None:
            expected["depths.npy"] = (self.depths.shape, (n, *self.images.shape[1:3]))
        if self.true_K is not None:
            expected.update({"true_depths.npy": (self.true_depths.shape, (n, *self.images.shape[1:3])),
                             "true_masks.npy": (self.true_masks.shape, (n, *self.images.shape[1:3])),
                             "true_cameras.npz K": (self.true_K.shape, (n, 3, 3)),
                             "true_cameras.npz world_to_camera": (self.true_world_to_camera.shape,
                                                                  (n, 3, 4))})
        if self.true_landmarks is not None:
            expected["true_cameras.npz landmarks"] = (self.true_landmarks.shape,
                                                      (n, self.true_landmarks.shape[1], 4))
        problems += [f"{name} has shape {got}, expected {want}" for name, (got, want) in expected.items()
                     if tuple(got) != tuple(want)]
        if problems:
            raise CacheError(f"Prepared cache {self.cache_dir} ({self.split}) is inconsistent: "
                             + "; ".join(problems) + ". Prepare the dataset again.")

    @cached_property
    def sources(self) -> list[dict]:
        """Per image: source file, identity, reprojection error (px) and fit details; read on first use,
        since for 70,000 photos it is tens of MB that training never needs."""
        sources = self._read_json(self._sources_path)
        if not isinstance(sources, list) or len(sources) != len(self):
            raise CacheError(f"Prepared cache file {self._sources_path} does not list one entry per image; "
                             "prepare the dataset again.")
        return sources

    def __len__(self) -> int:
        return len(self.images)

    @property
    def fingerprint(self) -> str:
        """The manifest's fingerprint: a hash over the source files and the preparation settings."""
        return self.manifest["fingerprint"]

    @property
    def background(self):
        """"network" (photos: a background network learns it) or a constant RGB list in [0, 1]."""
        return self.manifest.get("background", "network")

    @property
    def image_size(self) -> tuple[int, int]:
        """(H, W) of every image in the cache."""
        return tuple(int(s) for s in self.images.shape[1:3])

    @property
    def n_identities(self) -> int:
        """Number of latent codes: identities run from 0 to n_identities - 1 in both splits."""
        if "n_identities" in self.manifest:
            return int(self.manifest["n_identities"])
        return int(self.identities.max()) + 1 if len(self.identities) else 0
