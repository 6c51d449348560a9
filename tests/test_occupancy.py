"""The occupancy grid's kernels (cell points, update with decay, warm-up, used cells, marching) against
the plain-torch reference, on every Taichi backend (the `arch` fixture)."""

import pytest
import torch
from test_renderer import random_cameras

import renderer
from renderer import reference as ref
from renderer.occupancy import OccupancyGrid
from renderer.specs import draw_key

RADIUS = 2.0


def blob(points: torch.Tensor) -> torch.Tensor:
    """A dense ball of radius 0.8 off the centre, empty elsewhere: points (M, 3) -> density (M,)."""
    return 50.0 * ((points - torch.tensor([0.3, 0.0, -0.2])).norm(dim=1) < 0.8).float()


def random_rays(n: int, seed: int) -> renderer.Rays:
    K, w2c = random_cameras(n, seed)
    pixels = torch.randint(0, 64, (n, 2), generator=torch.Generator().manual_seed(seed + 1)).float()
    return ref.generate_rays(pixels, K, w2c, radius=RADIUS)


def cell_jitter(n_cells: int, generator: torch.Generator) -> torch.Tensor:
    """The uniforms the cell-points kernel hashes for one call: (M, 3)."""
    return ref.hash_uniform(torch.arange(3 * n_cells), draw_key(generator)).view(n_cells, 3)


def test_cell_points_match_reference_and_lie_in_their_cells(arch):
    grid = OccupancyGrid(resolution=8, radius=RADIUS)
    cells = torch.randperm(512, generator=torch.Generator().manual_seed(0))[:100]
    points = grid.cell_points(cells, torch.Generator().manual_seed(3))
    expected = ref.occupancy_cell_points(cells, 8, RADIUS, cell_jitter(100, torch.Generator().manual_seed(3)))
    torch.testing.assert_close(points, expected, rtol=0, atol=1e-6)
    assert torch.equal(ref.occupancy_cells(points, 8, RADIUS), cells)
    centres = grid.cell_points(cells)
    torch.testing.assert_close(centres, ref.occupancy_cell_points(cells, 8, RADIUS), rtol=0, atol=1e-6)


@pytest.mark.parametrize("dilate", [False, True])
def test_update_matches_reference_with_warmup_decay_and_subsets(arch, dilate):
    grid = OccupancyGrid(resolution=8, radius=RADIUS, decay=0.5, dilate=dilate)
    density = torch.zeros(512)
    used = torch.zeros(512, dtype=torch.uint8)
    schedule = [(True, 1.0, blob), (False, 0.25, blob), (False, 0.25, lambda p: 0.1 * blob(p)),
                (False, 1.0, lambda p: torch.zeros(p.shape[0]))]  # fmt: skip
    for step, (warmup, fraction, fn) in enumerate(schedule):
        g_grid, g_ref = torch.Generator().manual_seed(step), torch.Generator().manual_seed(step)
        cells = grid.select_cells(fraction, g_ref)  # what the update picks (state + generator)
        points = ref.occupancy_cell_points(cells, 8, RADIUS, cell_jitter(cells.shape[0], g_ref))
        stats = grid.update(fn, g_grid, warmup=warmup, fraction=fraction, chunk=37)
        values = fn(points)
        density, occupied = ref.occupancy_update(density, used, cells, values, 0.5, grid.threshold, warmup,
                                                 dilate)  # fmt: skip
        torch.testing.assert_close(grid.density, density)
        assert torch.equal(grid.occupied, occupied), f"update {step}"
        assert stats["evaluated"] == cells.shape[0]
        if warmup:
            assert torch.all(grid.occupied == 1), "warm-up keeps every cell occupied"
        elif step == 1:
            assert 0.01 < stats["occupied"] < (0.5 if dilate else 0.2), (
                "after warm-up only the ball's cells stay occupied"
            )
            assert cells.shape[0] < 512 and cells.unique().shape == cells.shape
    # The last update saw zeros everywhere: only the decayed estimates are left, and the threshold rule
    # (at most the mean) keeps the ball's densest cells.
    assert 0 < grid.core.sum() < 100
    # A field faint everywhere (the ball's density 1e-3, far below the threshold) keeps its densest cells.
    faint = OccupancyGrid(resolution=8, radius=RADIUS)
    faint.update(lambda p: 2e-5 * blob(p), fraction=1.0)
    assert faint.threshold > 1e-2 and 0 < faint.core.sum() < 100


def test_observed_densities_fold_in_with_the_evaluated_ones(arch):
    """update(observed=...): cells with an observed density are re-estimated from it (the larger of it
    and an evaluated value where both exist); cells with neither keep their estimate."""
    grid = OccupancyGrid(resolution=8, radius=RADIUS, decay=0.5, dilate=False)
    grid.update(blob, torch.Generator().manual_seed(0), fraction=1.0)
    density, used = grid.density.clone(), grid.used.clone()
    observed = torch.full((512,), -1.0)
    seen = torch.randperm(512, generator=torch.Generator().manual_seed(1))[:40]
    observed[seen] = torch.rand(40, generator=torch.Generator().manual_seed(2)) * 100.0
    g_grid, g_ref = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    cells = grid.select_cells(0.05, g_ref)
    points = ref.occupancy_cell_points(cells, 8, RADIUS, cell_jitter(cells.shape[0], g_ref))
    stats = grid.update(blob, g_grid, fraction=0.05, observed=observed)
    merged = observed.clone()
    merged[cells.long()] = torch.maximum(merged[cells.long()], blob(points))
    both = torch.nonzero(merged >= 0)[:, 0]
    expected, occupied = ref.occupancy_update(density, used, both, merged[both], 0.5, grid.threshold, False)
    torch.testing.assert_close(grid.density, expected)
    assert torch.equal(grid.occupied, occupied)
    assert stats["evaluated"] == cells.shape[0] and stats["observed"] == 40
    untouched = merged < 0
    assert untouched.sum() > 300 and torch.equal(grid.density[untouched], density[untouched])


def test_mark_used_keeps_cells_until_the_next_update(arch):
    grid = OccupancyGrid(resolution=8, radius=RADIUS, dilate=False)
    nothing = lambda p: torch.zeros(p.shape[0])  # noqa: E731
    grid.update(nothing, warmup=False, fraction=1.0)
    assert grid.occupied.sum() == 0, "an empty field leaves no cell occupied"
    rays = random_rays(30, seed=4)
    g = torch.Generator().manual_seed(5)
    counts = torch.randint(0, 6, (30,), generator=g).to(torch.int32)
    offsets = torch.cumsum(counts, 0).to(torch.int32) - counts
    n = int(counts.sum())
    ray = torch.repeat_interleave(torch.arange(30), counts.to(torch.int64))
    t = rays.near[ray] + (rays.far - rays.near)[ray] * torch.rand(n, generator=g)
    weights = torch.rand(n, generator=g) * (torch.rand(n, generator=g) < 0.5)
    grid.mark_used(rays, t, offsets, counts, weights, min_weight=0.1)
    expected = ref.occupancy_mark_used(torch.zeros(512, dtype=torch.uint8), 8, RADIUS, rays, t, counts,
                                       weights, 0.1)  # fmt: skip
    assert torch.equal(grid.used, expected) and expected.sum() > 3
    grid.update(nothing, fraction=1.0)
    assert torch.equal(grid.occupied, expected), "cells the weights used stay occupied"
    assert grid.used.sum() == 0
    grid.update(nothing, fraction=1.0)
    assert grid.occupied.sum() == 0, "and are dropped once no ray uses them"


@pytest.mark.parametrize("n_samples", [32, 13])  # x64: the dense stratified kernel's 8-lane path, or not
def test_march_matches_reference(arch, n_samples):
    rays = random_rays(200, seed=6)
    grid = OccupancyGrid(resolution=16, radius=RADIUS)
    grid.update(blob, fraction=1.0)
    assert 0.01 < grid.occupied_fraction() < 0.5
    for seed in (None, 8):

        def gen(seed=seed):
            return None if seed is None else torch.Generator().manual_seed(seed)

        packed = grid.march(rays, n_samples, gen())
        jitter = None if seed is None else ref.hashed_uniforms(200, n_samples, gen(), "cpu")
        want = ref.march_occupancy(grid.occupied, 16, RADIUS, rays, n_samples, jitter=jitter)
        assert torch.equal(packed.counts, want.counts) and torch.equal(packed.bins, want.bins)
        assert torch.equal(packed.offsets, want.offsets)
        torch.testing.assert_close(packed.t, want.t, rtol=0, atol=2e-6)
        torch.testing.assert_close(packed.deltas, want.deltas, rtol=0, atol=4e-6)
        hits = rays.far > rays.near
        assert torch.all(packed.counts[~hits] == 0), "a ray that misses the sphere gets no samples"
        assert (packed.counts[hits] == 0).sum() > 5, "some rays cross no occupied cell"
        assert 0 < packed.counts.sum() < 0.5 * n_samples * hits.sum()


def test_march_on_a_fresh_grid_gives_the_dense_samples(arch):
    """Every cell occupied: the packed samples are sample_stratified's, with sample_deltas' intervals."""
    rays = random_rays(64, seed=9)
    hits = rays.far > rays.near
    packed = OccupancyGrid(resolution=8, radius=RADIUS).march(rays, 16, torch.Generator().manual_seed(2))
    t = renderer.sample_stratified(rays.near, rays.far, 16, torch.Generator().manual_seed(2))
    deltas = renderer.sample_deltas(t, rays.far)
    assert torch.equal(packed.counts, hits.to(torch.int32) * 16)
    torch.testing.assert_close(packed.t, t[hits].view(-1), rtol=0, atol=1e-6)
    torch.testing.assert_close(packed.deltas, deltas[hits].view(-1), rtol=0, atol=2e-6)
    assert torch.equal(packed.bins, torch.arange(16, dtype=torch.int32).repeat(int(hits.sum())))


@pytest.mark.parametrize("n_samples", [32, 13])
def test_march_gives_the_dense_stratified_depths_from_the_same_launch(arch, n_samples):
    """march_with_depths' dense t (R, S) is sample_stratified's for the same generator state, for every
    ray (those that miss the sphere too), and both advance the generator alike; its packed samples are
    march's."""
    rays = random_rays(120, seed=12)
    grid = OccupancyGrid(resolution=16, radius=RADIUS)
    grid.update(blob, fraction=1.0)
    for seed in (None, 3):
        gen_a = None if seed is None else torch.Generator().manual_seed(seed)
        gen_b = None if seed is None else torch.Generator().manual_seed(seed)
        packed, t = grid.march_with_depths(rays, n_samples, gen_a)
        want = renderer.sample_stratified(rays.near, rays.far, n_samples, gen_b)
        assert t.shape == (120, n_samples) and (~(rays.far > rays.near)).sum() > 3
        torch.testing.assert_close(t, want, rtol=0, atol=1e-6)
        jitter = (None if seed is None
                  else ref.hashed_uniforms(120, n_samples, torch.Generator().manual_seed(seed), "cpu"))
        torch.testing.assert_close(t, ref.sample_stratified(rays.near, rays.far, n_samples, jitter=jitter),
                                   rtol=0, atol=2e-6)  # the plain-torch reference
        if seed is not None:
            assert torch.equal(torch.randint(0, 2**30, (4,), generator=gen_a),
                               torch.randint(0, 2**30, (4,), generator=gen_b))
        again = grid.march(rays, n_samples, None if seed is None else torch.Generator().manual_seed(seed))
        for a, b in zip(packed, again, strict=True):
            assert torch.equal(a, b)


def test_march_through_an_empty_grid_and_no_rays(arch):
    grid = OccupancyGrid(resolution=8, radius=RADIUS)
    grid.occupied.zero_()
    packed = grid.march(random_rays(10, seed=1), 8)
    assert packed.t.shape == (0,) and torch.all(packed.counts == 0) and torch.all(packed.offsets == 0)
    none = grid.march(
        random_rays(1, seed=1)._replace(
            origins=torch.zeros(0, 3), directions=torch.zeros(0, 3), near=torch.zeros(0), far=torch.zeros(0)
        ),
        8,
    )
    assert none.counts.shape == (0,) and none.t.shape == (0,)
    with pytest.raises(ValueError, match="n_samples"):
        grid.march(random_rays(1, seed=1), 0)


def test_marched_packed_compositing_equals_dense_with_empty_space_zeroed(arch):
    """The contract end to end: packed samples through composite_packed (eps=0) give the dense render
    of the same rays with sigma set to zero in empty cells."""
    rays = random_rays(120, seed=11)
    grid = OccupancyGrid(resolution=16, radius=RADIUS)
    grid.update(blob, fraction=1.0)
    field = lambda p: blob(p) * 0.2 + 0.05 * p.norm(dim=-1)  # noqa: E731  faint outside the ball
    colour = lambda p: torch.sigmoid(p)  # noqa: E731
    packed = grid.march(rays, 24, torch.Generator().manual_seed(1))
    ray = torch.repeat_interleave(torch.arange(120), packed.counts.to(torch.int64))
    points = rays.origins[ray] + packed.t[:, None] * rays.directions[ray]
    out = renderer.composite_packed(field(points), colour(points), packed.t, packed.deltas, packed.offsets,
                                    packed.counts, 1.0, eps=0.0)  # fmt: skip
    t = renderer.sample_stratified(rays.near, rays.far, 24, torch.Generator().manual_seed(1))
    dense_points = rays.origins[:, None] + t[..., None] * rays.directions[:, None]
    keep = grid.occupied[ref.occupancy_cells(dense_points, 16, RADIUS)] != 0
    sigma = torch.where(keep, field(dense_points.view(-1, 3)).view(120, 24), 0.0)
    dense = renderer.composite(sigma, colour(dense_points), t, renderer.sample_deltas(t, rays.far), 1.0)
    torch.testing.assert_close(out.color, dense.color, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.depth, dense.depth, rtol=1e-5, atol=1e-4)


def test_state_dict_round_trip_and_bad_arguments(arch):
    grid = OccupancyGrid(resolution=8, radius=RADIUS)
    grid.update(blob, fraction=1.0)
    copy = OccupancyGrid(resolution=8, radius=RADIUS)
    copy.load_state_dict(grid.state_dict())
    assert torch.equal(copy.occupied, grid.occupied) and torch.equal(copy.density, grid.density)
    with pytest.raises(ValueError, match="occupancy grid mismatch"):
        OccupancyGrid(resolution=16, radius=RADIUS).load_state_dict(grid.state_dict())
    with pytest.raises(ValueError, match="resolution"):
        OccupancyGrid(resolution=0)
    with pytest.raises(ValueError, match="min_alpha"):
        OccupancyGrid(min_alpha=1.0)
    small = OccupancyGrid(resolution=4, radius=1.0)
    small.update(lambda p: (p.norm(dim=1) < 0.5).float() * 100.0, fraction=1.0)
    assert int(small.core.sum()) == 8  # the docstring's example: the 8 cells around the centre,
    assert int(small.occupied.sum()) == 64  # and with their neighbours, every cell of a 4^3 grid
