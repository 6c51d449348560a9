"""The synthetic generator: shapes, determinism, depth/mask consistency and the camera convention."""

from __future__ import annotations

import numpy as np
import pytest

from common.conventions import default_intrinsics, orbit_camera
from dataset import PreparedDataset, SyntheticConfig, generate_synthetic
from dataset.synthetic import camera_rays, render_identity

SMALL = SyntheticConfig(n_identities=6, train_views=1, heldout_views=2, resolution=32, seed=3)


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return generate_synthetic(tmp_path_factory.mktemp("synthetic"), SMALL)


def test_cache_shapes_and_splits(cache):
    train, heldout = PreparedDataset(cache), PreparedDataset(cache, split="heldout")
    assert train.images.shape == (6, 32, 32, 3) and train.images.dtype == np.uint8
    assert heldout.images.shape == (12, 32, 32, 3)
    assert train.masks.shape == (6, 32, 32) and train.depths.shape == (6, 32, 32)
    assert train.identities.tolist() == list(range(6))
    assert sorted(heldout.identities.tolist()) == sorted(list(range(6)) * 2)
    assert train.n_identities == heldout.n_identities == 6
    assert train.background == [1.0, 1.0, 1.0]
    assert train.fingerprint == heldout.fingerprint
    assert train.manifest["source"] == {"name": "synthetic", "data_root": None}
    assert isinstance(train.images, np.memmap)
    # Every identity is visible and inside the frame (no foreground on the border rows/columns).
    assert (train.masks.reshape(6, -1).max(axis=1) == 255).all()
    masks = train.masks
    border = np.concatenate([masks[:, 0], masks[:, -1], masks[:, :, 0], masks[:, :, -1]])
    assert border.max() == 0


def test_deterministic_and_seed_dependent():
    a, b = render_identity(SMALL, 2), render_identity(SMALL, 2)
    assert all(np.array_equal(x["image"], y["image"]) for x, y in zip(a, b, strict=True))
    other = render_identity(SyntheticConfig(resolution=32, seed=4), 2)
    assert not np.array_equal(a[0]["image"], other[0]["image"])
    # Identity i does not depend on how many identities are generated.
    bigger = render_identity(SyntheticConfig(n_identities=50, train_views=1, heldout_views=2, resolution=32,
                                             seed=3), 2)
    assert np.array_equal(a[1]["image"], bigger[1]["image"])


def test_background_white_where_mask_empty_and_depth_consistent(cache):
    ds = PreparedDataset(cache)
    fg = ds.masks[:] > 0
    assert ((ds.depths[:] > 0) == fg).all()
    assert (ds.images[:][~fg] == 255).all()
    # Hits lie between the camera (distance 7) and the far side of the radius-1.5 sphere.
    assert ds.depths[:][fg].min() > 7.0 - 1.5 and ds.depths[:][fg].max() < 7.0 + 1.5


def test_depth_backprojects_onto_object_inside_radius(cache):
    ds = PreparedDataset(cache)
    for i in range(len(ds)):
        K, pose = ds.K[i].astype(np.float64), ds.world_to_camera[i].astype(np.float64)
        origins, directions = camera_rays(K, pose, 32, 32)
        depth = ds.depths[i].ravel()
        points = origins + depth[:, None] * directions
        radius = np.linalg.norm(points[depth > 0], axis=1)
        assert radius.max() < 1.5 and radius.min() > 0.5


def test_cameras_look_at_origin_on_sphere(cache):
    for split in ("train", "heldout"):
        ds = PreparedDataset(cache, split=split)
        R, t = ds.world_to_camera[:, :, :3].astype(np.float64), ds.world_to_camera[:, :, 3].astype(np.float64)
        assert np.allclose(R @ R.transpose(0, 2, 1), np.eye(3), atol=1e-5)
        assert np.allclose(np.linalg.det(R), 1.0, atol=1e-5)
        centres = -np.einsum("nji,nj->ni", R, t)
        assert np.allclose(np.linalg.norm(centres, axis=1), 7.0, atol=1e-4)
        # The origin projects to the principal point.
        assert np.allclose(t[:, :2], 0.0, atol=1e-5)
        assert np.allclose(ds.K, default_intrinsics(32, 32), atol=1e-5)


def test_frontal_camera_convention():
    """Yaw = pitch = 0 is R = I, t = (0, 0, d); the face's nose points at that camera (towards -z)."""
    pose = orbit_camera(0.0, 0.0, 7.0)
    assert np.allclose(pose[:, :3], np.eye(3)) and np.allclose(pose[:, 3], [0, 0, 7])
    # Yaw turns the camera about world y, pitch about x; the angles mean what pose's solver reports.
    yawed = orbit_camera(30.0, 0.0, 7.0)
    assert np.allclose(-yawed[:, :3].T @ yawed[:, 3], [-3.5, 0.0, -7.0 * np.cos(np.pi / 6)])
    pitched = orbit_camera(0.0, 10.0, 7.0)
    below = [0.0, 7.0 * np.sin(np.pi / 18), -7.0 * np.cos(np.pi / 18)]
    assert np.allclose(-pitched[:, :3].T @ pitched[:, 3], below)
    from pose import yaw_pitch_roll

    assert np.allclose(yaw_pitch_roll(orbit_camera(20.0, -10.0, 7.0)[:, :3]), [20.0, -10.0, 0.0])
    frontal = SyntheticConfig(n_identities=1, train_views=1, heldout_views=0, resolution=64,
                              max_yaw_deg=0.0, max_pitch_deg=0.0)
    record = render_identity(frontal, 0)[0]
    assert np.allclose(record["world_to_camera"], pose, atol=1e-6)
    depth = record["depth"]
    # The nose is the nearest point to the frontal camera and sits near the image's horizontal centre.
    v, u = np.unravel_index(np.argmin(np.where(depth > 0, depth, np.inf)), depth.shape)
    assert abs(u + 0.5 - 32) <= 2.5 and depth[v, u] < 7.0 - 0.9


def test_generation_is_idempotent_by_fingerprint(cache, tmp_path):
    before = (cache / "images.npy").stat().st_mtime_ns
    generate_synthetic(cache, SMALL)
    assert (cache / "images.npy").stat().st_mtime_ns == before
    other = generate_synthetic(tmp_path / "other", SyntheticConfig(n_identities=2, resolution=32, seed=3))
    assert PreparedDataset(other).fingerprint != PreparedDataset(cache).fingerprint


def test_parallel_build_matches_in_process(cache, tmp_path):
    """Two spawned workers and small chunks give the same cache as one in-process build."""
    from dataset import PrepareConfig, prepare_dataset

    config = PrepareConfig(resolution=32, views_per_identity=1, heldout_views=2, synthetic_identities=6,
                           seed=3, chunk_size=2)
    parallel = prepare_dataset("synthetic", None, tmp_path / "parallel", config, workers=2, progress=False,
                               verbose=False)
    for split in ("train", "heldout"):
        a, b = PreparedDataset(parallel, split), PreparedDataset(cache, split)
        assert a.fingerprint == b.fingerprint
        for name in ("images", "masks", "depths", "K", "world_to_camera", "identities"):
            assert np.array_equal(getattr(a, name), getattr(b, name)), name


def test_sampled_pixels_give_the_generators_rays_in_the_renderer(cache):
    """The sampler's (pixels, K, world_to_camera) rebuild, through the renderer's generate_rays, the very
    rays the generator traced: the depth of each foreground pixel lands on a surface inside radius 1.5."""
    import torch

    from dataset import PixelBatchSampler
    from renderer.reference import generate_rays

    ds = PreparedDataset(cache, split="heldout")
    batch = PixelBatchSampler(ds, identities_per_batch=4, views_per_identity=2, pixels_per_view=256,
                              seed=0).sample()
    rays = generate_rays(batch["pixels"], batch["K"], batch["world_to_camera"], radius=2.0)
    index, u, v = batch["image_index"].numpy(), *batch["pixels"].numpy().astype(int).T
    depth = torch.from_numpy(ds.depths[index, v, u])
    fg = depth > 0
    assert fg.sum() > 50 and (~fg).sum() > 50
    assert torch.equal(fg, batch["mask"] > 0)
    for i in np.unique(index)[:3]:
        K, pose = ds.K[i].astype(np.float64), ds.world_to_camera[i].astype(np.float64)
        origins, directions = camera_rays(K, pose, 32, 32)
        rows = np.flatnonzero(index == i)
        flat = v[rows] * 32 + u[rows]
        assert np.allclose(rays.directions[rows].numpy(), directions[flat], atol=1e-5)
        assert np.allclose(rays.origins[rows].numpy(), origins[flat], atol=1e-4)
    points = rays.origins[fg] + depth[fg, None] * rays.directions[fg]
    assert points.norm(dim=1).max() < 1.5
    assert (depth[fg] > rays.near[fg]).all() and (depth[fg] < rays.far[fg]).all()
