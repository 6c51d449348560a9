"""SRN scenes are scaled from the data to fit the render sphere, and a scale that does not fit is refused
(issue 14, item 1)."""

from __future__ import annotations

import pytest

from dataset import DataRootError, PrepareConfig, PreparedDataset, prepare_dataset
from dataset.prepare import main as prepare_main
from dataset.srn import FIT_RADIUS, write_srn_layout
from dataset.synthetic import SyntheticConfig

HEADS = SyntheticConfig(n_identities=4, train_views=2, heldout_views=0, resolution=32, seed=3)
CONFIG = PrepareConfig(resolution=32, views_per_identity=1, heldout_views=0, chunk_size=4)


def _prepare(root, out, **changes):
    return prepare_dataset("srn", root, out, CONFIG.with_(**changes), workers=1, progress=False,
                           verbose=False)


@pytest.mark.parametrize("written_at", [3.0, 1.0])
def test_the_scale_comes_from_the_data(tmp_path, written_at):
    """The synthetic heads (inside radius 1.5) written at 1/3 and at full size: the estimate undoes it."""
    root = write_srn_layout(tmp_path / "srn", HEADS, world_scale=written_at)
    fit = PreparedDataset(_prepare(root, tmp_path / "cache")).manifest["scene_fit"]
    assert fit["scale_from_data"] and fit["views_outside_render_sphere"] == 0
    assert fit["estimated_radius"] * fit["world_scale"] == pytest.approx(FIT_RADIUS, rel=1e-4)
    # In the generator's units the heads reach 1.0-1.5 from the origin (their silhouettes bound that).
    assert 1.0 < fit["estimated_radius"] * written_at <= 1.5 + 1e-3


def test_a_given_scale_that_does_not_fit_is_refused_in_one_sentence(tmp_path, capsys):
    root = write_srn_layout(tmp_path / "srn", HEADS, world_scale=1.0)  # full-size heads: x3 is too big
    with pytest.raises(DataRootError, match="do not fit the render sphere at world scale 3") as err:
        _prepare(root, tmp_path / "cache", srn_world_scale=3.0)
    assert "leave --srn-world-scale out" in str(err.value)
    assert not (tmp_path / "cache").exists()
    code = prepare_main(["--dataset", "srn", "--data-root", str(root), "--out", str(tmp_path / "cache"),
                         "--srn-world-scale", "3", "--resolution", "32", "--heldout-views", "0",
                         "--no-progress"])
    lines = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and "do not fit" in lines[0]


def test_the_summary_says_which_scale(tmp_path, capsys):
    root = write_srn_layout(tmp_path / "srn", HEADS, world_scale=3.0)
    assert prepare_main(["--dataset", "srn", "--data-root", str(root), "--out", str(tmp_path / "cache"),
                         "--resolution", "32", "--heldout-views", "0", "--no-progress"]) == 0
    assert "(from the data)" in capsys.readouterr().out
