"""The cache format (round trip, clear errors) and the pixel-batch sampler."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from dataset import CacheError, PixelBatchSampler, PreparedDataset, SyntheticConfig, generate_synthetic
from dataset.cache import FORMAT_VERSION


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    config = SyntheticConfig(n_identities=8, train_views=2, heldout_views=1, resolution=16, seed=1)
    return generate_synthetic(tmp_path_factory.mktemp("cache"), config)


def _records(n: int, size: int = 8):
    rng = np.random.default_rng(0)
    return [{"split": "train", "image": rng.integers(0, 256, (size, size, 3), dtype=np.uint8),
             "mask": rng.integers(0, 256, (size, size), dtype=np.uint8),
             "K": np.eye(3, dtype=np.float32) * (i + 1), "world_to_camera": np.full((3, 4), i, np.float32),
             "source": f"img{i}.png", "reprojection_error_px": 0.5 * i} for i in range(n)]


class RecordSource:
    """Known records through the real build path (one item per record, the last item skipped)."""

    name = "folder"
    layout = "no files"
    background = "network"
    has_template = False
    needs_data_root = False

    def __init__(self, records):
        self.records = records

    def list_items(self, data_root):
        return [f"item{i}" for i in range(len(self.records) + 1)], []

    def item_files(self, data_root, item):
        return []

    def settings(self, config):
        return {"records": len(self.records)}

    def manifest_extra(self, config):
        return {}

    def default_workers(self, n_items):
        return 1

    def process(self, data_root, item, config):
        from dataset.sources import ItemResult, skip

        index = int(item[4:])
        if index == len(self.records):
            return skip("bad.txt", "not_an_image", "x")
        return ItemResult(item=item, records=[self.records[index]])


def test_round_trip(tmp_path):
    from dataset.config import PrepareConfig
    from dataset.prepare import prepare_source

    records = _records(3)
    prepare_source(RecordSource(records), None, tmp_path / "cache", PrepareConfig(resolution=8),
                   workers=1, progress=False, verbose=False)
    ds = PreparedDataset(tmp_path / "cache")
    assert ds.background == "network" and ds.depths is None
    assert ds.manifest["format_version"] == FORMAT_VERSION
    assert ds.manifest["counts"] == {"kept": 3, "heldout": 0, "skipped": 1,
                                     "skipped_by_reason": {"not_an_image": 1}}
    for i, r in enumerate(records):
        assert np.array_equal(ds.images[i], r["image"]) and np.array_equal(ds.masks[i], r["mask"])
        assert np.array_equal(ds.K[i], r["K"]) and np.array_equal(ds.world_to_camera[i], r["world_to_camera"])
        assert ds.identities[i] == i
    assert ds.sources[2] == {"file": "img2.png", "identity": 2, "reprojection_error_px": 1.0}
    assert json.loads((tmp_path / "cache" / "skipped.json").read_text()) == [
        {"file": "bad.txt", "reason": "not_an_image", "detail": "x"}]
    assert not (tmp_path / "cache" / "heldout").exists()
    with pytest.raises(CacheError, match="no held-out split"):
        PreparedDataset(tmp_path / "cache", split="heldout")


def test_missing_cache_and_missing_manifest(tmp_path):
    with pytest.raises(CacheError, match="No prepared cache"):
        PreparedDataset(tmp_path / "nowhere")
    (tmp_path / "images.npy").write_bytes(b"")
    with pytest.raises(CacheError, match=r"no manifest\.json"):
        PreparedDataset(tmp_path)


def test_newer_format_is_refused(cache, tmp_path):
    copy = shutil.copytree(cache, tmp_path / "copy")
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["format_version"] = FORMAT_VERSION + 1
    (copy / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(CacheError, match="newer than this code"):
        PreparedDataset(copy)


@pytest.mark.parametrize("name", ["images.npy", "cameras.npz", "identities.npy", "sources.json"])
def test_corrupt_or_missing_file_is_one_clear_error(cache, tmp_path, name):
    copy = shutil.copytree(cache, tmp_path / "copy")
    data = (copy / name).read_bytes()
    (copy / name).write_bytes(data[: len(data) // 3])
    with pytest.raises(CacheError, match=f"{name}.*(corrupt|inconsistent)|inconsistent"):
        PreparedDataset(copy).sources  # noqa: B018 (sources.json is read on first use)
    (copy / name).unlink()
    with pytest.raises(CacheError, match="missing"):
        PreparedDataset(copy)


def test_sampler_shapes_and_values(cache):
    ds = PreparedDataset(cache)
    sampler = PixelBatchSampler(ds, identities_per_batch=3, views_per_identity=2, pixels_per_view=5, seed=0)
    batch = sampler.sample()
    r = 3 * 2 * 5
    expected = {"rgb": (r, 3), "mask": (r,), "pixels": (r, 2), "K": (r, 3, 3), "world_to_camera": (r, 3, 4),
                "identity": (r,), "image_index": (r,)}
    assert {k: tuple(v.shape) for k, v in batch.items()} == expected
    assert batch["identity"].dtype == torch.int64 and batch["rgb"].dtype == torch.float32
    # Three distinct identities, each with its two training views (without replacement).
    ids = batch["identity"].view(3, 2, 5)
    assert len(set(ids[:, 0, 0].tolist())) == 3
    images = batch["image_index"].view(3, 2, 5)
    assert (images[:, 0, 0] != images[:, 1, 0]).all()
    # Every row matches the cache at its pixel and carries its own image's camera and identity.
    for row in range(r):
        i = int(batch["image_index"][row])
        u, v = (int(x) for x in batch["pixels"][row])
        assert torch.allclose(batch["rgb"][row], torch.from_numpy(ds.images[i, v, u] / 255.0).float())
        assert batch["mask"][row] == ds.masks[i, v, u] / 255.0
        assert torch.equal(batch["K"][row], torch.from_numpy(ds.K[i]))
        assert torch.equal(batch["world_to_camera"][row], torch.from_numpy(ds.world_to_camera[i]))
        assert batch["identity"][row] == ds.identities[i]


def test_sampler_seeded_and_resumable(cache):
    ds = PreparedDataset(cache)

    def make(seed=0):
        return PixelBatchSampler(ds, identities_per_batch=4, views_per_identity=1, pixels_per_view=7,
                                 seed=seed)

    a, b = make(), make()
    for _ in range(2):
        ba, bb = a.sample(), b.sample()
        assert all(torch.equal(ba[k], bb[k]) for k in ba)
    assert not torch.equal(make(1).sample()["pixels"], make(0).sample()["pixels"])
    state = json.loads(json.dumps(a.state_dict()))  # the state survives a JSON/checkpoint round trip
    expected = [a.sample() for _ in range(2)]
    resumed = make(seed=99)
    resumed.load_state_dict(state)
    for want in expected:
        got = resumed.sample()
        assert all(torch.equal(got[k], want[k]) for k in want)
    wrong = PixelBatchSampler(ds, identities_per_batch=2, views_per_identity=1, pixels_per_view=7)
    with pytest.raises(ValueError, match="another batch shape"):
        wrong.load_state_dict(state)


def test_sampler_subset_and_single_view_repeats(cache):
    ds = PreparedDataset(cache)
    sampler = PixelBatchSampler(ds, 2, 3, 4, seed=5, identity_subset=[1, 6])
    for _ in range(5):
        assert set(sampler.sample()["identity"].tolist()) == {1, 6}
    with pytest.raises(ValueError, match="identity_subset"):
        PixelBatchSampler(ds, 2, 1, 4, identity_subset=[100])
    heldout = PreparedDataset(cache, split="heldout")  # one held-out view per identity
    batch = PixelBatchSampler(heldout, 2, 3, 4, seed=0).sample()
    per_identity = batch["image_index"].view(2, 3, 4)
    assert (per_identity == per_identity[:, :1, :1]).all()  # V views of one image: the same image again


def test_sampler_reads_only_sampled_pixels(cache, monkeypatch):
    """The sampler fancy-indexes the memmaps; it never asks for a whole image or array."""
    ds = PreparedDataset(cache)
    requests = []

    class Spy:
        def __init__(self, array):
            self.array = array

        def __getitem__(self, key):
            requests.append(key)
            assert isinstance(key, tuple) and len(key) == 3
            assert all(isinstance(k, np.ndarray) for k in key)
            return self.array[key]

        def __len__(self):
            return len(self.array)

    assert isinstance(ds.images, np.memmap)
    monkeypatch.setattr(ds, "images", Spy(ds.images))
    monkeypatch.setattr(ds, "masks", Spy(ds.masks))
    monkeypatch.setattr(type(ds), "image_size", property(lambda self: (16, 16)))
    PixelBatchSampler(ds, 2, 1, 3).sample()
    assert len(requests) == 2 and all(len(key[0]) == 6 for key in requests)
