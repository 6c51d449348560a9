"""Parallel, resumable, idempotent cache builds from any source in ``dataset.sources`` / ``dataset.srn``.

A build splits the sorted source items into chunks of ``chunk_size``. Worker processes (spawn context, so
every worker creates its own MediaPipe graphs) turn a chunk into a shard under ``OUT/partial/``: an
``.npz`` of arrays, then a ``.json`` that marks the shard complete, both written atomically. A rerun with
the same fingerprint skips finished shards, so an interruption loses at most the chunks in flight. When
all shards exist they are streamed into the cache files (never all in memory), the manifest is written
last and ``partial/`` is removed.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import multiprocessing
import os
import time
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor, as_completed
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path

import numpy as np

from common.atomic import save_npz, write_json
from dataset.cache import (
    FORMAT_VERSION,
    SPLITS,
    TRUTH_KEYS,
    complete_manifest,
    invalidate,
    remove_partial,
    remove_split,
    split_dir,
    write_split,
)
from dataset.config import PrepareConfig
from dataset.sources import REASONS, DataRootError, ItemResult, check_head_fit, head_fit_summary, skip

ARRAY_KEYS = ("image", "mask", "depth", "K", "world_to_camera", *TRUTH_KEYS)


class BuildInterrupted(RuntimeError):
    """The build stopped before finishing (``stop_after_chunks``); rerunning it continues."""


def fingerprint(source, data_root: Path, items: list[str], settings: dict) -> tuple[str, str]:
    """(source fingerprint, cache fingerprint): sha256 over every item file's relative path, size and
    mtime; the cache fingerprint adds the source name, the settings and the cache format version."""
    files = hashlib.sha256()
    for item in items:
        for rel in sorted(source.item_files(data_root, item)):
            stat = (data_root / rel).stat()
            files.update(f"{rel}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
    source_fp = files.hexdigest()
    payload = json.dumps({"format_version": FORMAT_VERSION, "source": source.name, "settings": settings,
                          "files": source_fp}, sort_keys=True)
    return source_fp, hashlib.sha256(payload.encode()).hexdigest()


def list_source_items(source, data_root: Path, limit: int | None) -> tuple[list[str], list[dict]]:
    """The source's items and the skip entries of paths it could not list, or one clear DataRootError
    naming the expected layout."""
    if source.needs_data_root and not Path(data_root).is_dir():
        raise DataRootError(f"Data root {data_root} does not exist or is not a folder; the {source.name} "
                            f"source expects {source.layout}.")
    items, problems = source.list_items(data_root)
    if not items:
        listed = f" ({len(problems)} paths could not be used, e.g. {problems[0]['file']}: " \
                 f"{problems[0]['detail']})" if problems else ""
        raise DataRootError(f"Data root {data_root} holds nothing the {source.name} source can use{listed}; "
                            f"it expects {source.layout}.")
    return (items[:limit] if limit is not None else items), problems


def _process_item(source, data_root: Path, item: str, config: PrepareConfig) -> ItemResult:
    try:
        return source.process(data_root, item, config)
    except Exception as err:  # one bad file must not stop a 70,000-image build; the summary shows it
        return skip(item, "error", f"{type(err).__name__}: {err}")


def die_with_parent(parent_pid: int, poll_seconds: float = 0.5) -> None:
    """Worker initialiser: exit as soon as the process that started this worker is gone.

    A worker blocked on its task queue never notices on its own when its parent is killed (kill -9,
    an OOM kill): each would keep its MediaPipe graphs, and the memory they hold, alive indefinitely. On
    Linux the kernel kills it at once (PR_SET_PDEATHSIG); elsewhere a daemon thread sees the parent change
    and exits.
    """
    import ctypes
    import signal
    import sys
    import threading

    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # 1 = PR_SET_PDEATHSIG
    if os.getppid() != parent_pid:  # the parent died before the line above took effect
        os._exit(1)

    def watch() -> None:
        while os.getppid() == parent_pid:
            time.sleep(poll_seconds)
        os._exit(1)

    threading.Thread(target=watch, name="die-with-parent", daemon=True).start()


def process_chunk(task: tuple) -> tuple[int, int]:
    """Worker entry point: prepare one chunk and write its shard. Returns (chunk index, items done)."""
    source, data_root, items, config, partial, index = task
    arrays: dict[str, list[np.ndarray]] = {}
    meta = {"items": items, "records": {split: [] for split in SPLITS}, "skipped": []}
    for item in items:
        result = _process_item(source, data_root, item, config)
        if result.skipped is not None:
            meta["skipped"].append(result.skipped)
        for record in result.records:
            split = record["split"]
            for key in ARRAY_KEYS:
                if key in record:
                    arrays.setdefault(f"{split}_{key}", []).append(np.asarray(record[key]))
            meta["records"][split].append({"item": item, **{k: v for k, v in record.items()
                                                            if k not in ARRAY_KEYS and k != "split"}})
    shard = Path(partial) / f"chunk_{index:06d}"
    save_npz(shard.with_suffix(".npz"), **{k: np.stack(v) for k, v in arrays.items()})
    write_json(shard.with_suffix(".json"), meta)  # written last: its presence marks the shard done
    return index, len(items)


def _prepare_partial(partial: Path, cache_fp: str, chunk_size: int) -> None:
    """Keep ``partial/`` only when it belongs to this exact build; otherwise start it afresh."""
    state = {"fingerprint": cache_fp, "chunk_size": chunk_size}
    state_path = partial / "build.json"
    try:
        if json.loads(state_path.read_text()) == state:
            return
    except (OSError, ValueError):
        pass
    remove_partial(partial)
    partial.mkdir(parents=True, exist_ok=True)
    write_json(state_path, state)


def run_chunks(source, data_root: Path, items: list[str], config: PrepareConfig, partial: Path,
               workers: int, stop_after_chunks: int | None = None, progress: bool = True) -> dict:
    """Prepare every chunk without a finished shard, in parallel; returns counts of reused/new chunks."""
    from tqdm import tqdm

    chunks = [items[i:i + config.chunk_size] for i in range(0, len(items), config.chunk_size)]
    done = {i for i in range(len(chunks)) if (partial / f"chunk_{i:06d}.json").exists()}
    tasks = [(source, data_root, chunk, config, str(partial), i) for i, chunk in enumerate(chunks)
             if i not in done]
    limit = len(tasks) if stop_after_chunks is None else min(stop_after_chunks, len(tasks))
    bar = tqdm(total=len(items), initial=sum(len(chunks[i]) for i in done), unit="item",
               desc=f"prepare {source.name}", disable=not progress)
    finished = 0
    workers = max(1, min(workers, len(tasks)))
    try:
        if workers == 1:
            results: Iterator = (process_chunk(task) for task in tasks[:limit])
            for _index, n in results:
                bar.update(n)
                finished += 1
        else:
            # spawn: workers start clean (no forked MediaPipe/Taichi state) and build their own graphs.
            # An executor (unlike multiprocessing.Pool) reports a crashed worker instead of hanging.
            executor = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"),
                                           initializer=die_with_parent, initargs=(os.getpid(),))
            try:
                futures = [executor.submit(process_chunk, task) for task in tasks]
                for future in as_completed(futures):
                    _index, n = future.result()
                    bar.update(n)
                    finished += 1
                    if finished >= limit:
                        break
            finally:
                executor.shutdown(wait=True, cancel_futures=True)
    except BrokenProcessPool as err:
        raise RuntimeError("A preparation worker process died (a crash inside a decoder or MediaPipe?); "
                           "finished chunks are kept: rerun with --workers 1 to continue and see which file "
                           "fails.") from err
    finally:
        bar.close()
    finished = sum((partial / f"chunk_{i:06d}.json").exists() for i in range(len(chunks))) - len(done)
    if finished < len(tasks):
        raise BuildInterrupted(f"Stopped after {finished} new chunks ({len(done) + finished} of "
                               f"{len(chunks)} done); rerun the same command to continue.")
    return {"chunks": len(chunks), "chunks_reused": len(done), "chunks_processed": finished}


def _load_shard_metas(partial: Path, n_chunks: int) -> list[dict]:
    return [json.loads((partial / f"chunk_{i:06d}.json").read_text()) for i in range(n_chunks)]


def _assign_identities(metas: list[dict]) -> dict[str, int]:
    """Identity = rank of the item among items with a training record, in sorted item order."""
    identity: dict[str, int] = {}
    for meta in metas:
        for record in meta["records"]["train"]:
            identity.setdefault(record["item"], len(identity))
    return identity


def _split_chunks(partial: Path, metas: list[dict], split: str, identity: dict[str, int]) -> Iterator[dict]:
    """Stream one split's shards as ``write_split`` chunks (one shard in memory at a time)."""
    for i, meta in enumerate(metas):
        records = meta["records"][split]
        keep = [j for j, r in enumerate(records) if r["item"] in identity]
        if not keep:
            continue
        with np.load(partial / f"chunk_{i:06d}.npz", allow_pickle=False) as shard:
            chunk = {key: shard[f"{split}_{key}"][keep] for key in ARRAY_KEYS if f"{split}_{key}" in shard}
        chunk["identity"] = np.array([identity[records[j]["item"]] for j in keep], np.int64)
        chunk["sources"] = [{"file": records[j]["source"], "identity": identity[records[j]["item"]],
                             **{k: v for k, v in records[j].items() if k not in ("item", "source")}}
                            for j in keep]
        yield chunk


def finalise(partial: Path, out_dir: Path, n_chunks: int, manifest: dict,
             unlisted: list[dict] = ()) -> dict:
    """Assemble the shards into the cache (manifest last); returns the completed manifest. ``unlisted``
    are the skip entries of paths the listing could not use."""
    metas = _load_shard_metas(partial, n_chunks)
    skipped = [*unlisted, *(entry for meta in metas for entry in meta["skipped"])]
    identity = _assign_identities(metas)
    counts = {split: sum(1 for m in metas for r in m["records"][split] if r["item"] in identity)
              for split in SPLITS}
    if counts["train"] == 0:
        write_json(out_dir / "skipped.json", skipped)
        by_reason = {reason: sum(1 for s in skipped if s["reason"] == reason) for reason in REASONS}
        raise DataRootError(f"No usable image in {manifest['source']['data_root']}: skipped "
                            f"{ {k: v for k, v in by_reason.items() if v} }; see {out_dir / 'skipped.json'}.")
    first = next(i for i, m in enumerate(metas) if m["records"]["train"])
    with np.load(partial / f"chunk_{first:06d}.npz", allow_pickle=False) as shard:
        image_size = tuple(shard["train_image"].shape[1:3])
        with_depth = "train_depth" in shard
        with_truth = "train_true_world_to_camera" in shard
    errors = [r["reprojection_error_px"] for m in metas for r in m["records"]["train"]]
    fit = head_fit_summary([r["head_fit"] for m in metas for r in m["records"]["train"] if "head_fit" in r])
    check_head_fit(fit)  # photos whose faces do not fit the render sphere: refused before anything is written
    manifest = complete_manifest({**manifest, "n_identities": len(identity),
                                  "median_reprojection_error_px": float(np.median(errors)),
                                  **({"head_fit": fit} if fit else {})},
                                 counts, skipped, image_size)
    for split in reversed(SPLITS):  # heldout first: the top-level manifest comes last
        directory = split_dir(out_dir, split)
        if counts[split] == 0:
            if split == "heldout":
                remove_split(directory)
            continue
        write_split(directory, _split_chunks(partial, metas, split, identity), counts[split], image_size,
                    with_depth, with_truth)
        write_json(directory / "skipped.json", skipped if split == "train" else [])
        write_json(directory / "manifest.json", {**manifest, "split": split})
    return manifest


def build_cache(source, data_root: Path, out_dir: Path, config: PrepareConfig, workers: int,
                manifest: dict, items: list[str], cache_fp: str, stop_after_chunks: int | None = None,
                progress: bool = True, unlisted: list[dict] = ()) -> dict:
    """Run (or resume) the chunks and finalise. Returns the manifest plus a "build" entry with timings.
    ``unlisted``: skip entries for paths the listing could not use, reported with the others."""
    start = time.perf_counter()
    out_dir.mkdir(parents=True, exist_ok=True)
    invalidate(out_dir)  # from here on the old cache is gone: never served stale, even if interrupted
    partial = out_dir / "partial"
    _prepare_partial(partial, cache_fp, config.chunk_size)
    build = run_chunks(source, data_root, items, config, partial, workers, stop_after_chunks, progress)
    build["workers"] = workers
    build["seconds"] = round(time.perf_counter() - start, 3)
    manifest = finalise(partial, out_dir, build["chunks"], {**manifest, "build": build}, unlisted)
    remove_partial(partial)
    return manifest
