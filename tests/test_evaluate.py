"""evaluate.py and export.evaluation: every metric is reported on the tiny run, and the numbers are right
on known answers."""

from __future__ import annotations

import json
import math
from types import SimpleNamespace

import numpy as np
import pytest

import evaluate
from export import evaluation
from export.inference import start_renderer
from export.metrics import lpips_status
from models.checkpoint import latest_checkpoint

pytestmark = pytest.mark.usefixtures("keep_taichi_arch")


def test_score_view_on_known_answers():
    rng = np.random.default_rng(0)
    image = rng.uniform(0.1, 0.8, (16, 16, 3)).astype(np.float32)
    depth = np.full((16, 16), 6.0, np.float32)
    depth[:, 8:] = 7.0
    depth[:2] = 0.0  # background rows: no ground truth there
    mask = (depth > 0).astype(np.float32)
    opacity = np.ones((16, 16), np.float32)
    perfect = evaluation.score_view(
        {"color": image, "opacity": opacity, "depth": depth}, image, mask, depth, None
    )
    assert perfect["psnr"] == math.inf and perfect["ssim"] == pytest.approx(1.0)
    assert perfect["depth_abs_rel"] == 0.0 and perfect["depth_rmse"] == 0.0
    assert perfect["depth_corr"] == pytest.approx(1.0)

    # Colour off by 0.1 everywhere -> 20 dB; depth 0.3 too far -> RMSE 0.3; half-opaque pixels are
    # scored at their surface depth (depth / opacity), so the same error appears there too.
    half = opacity * 0.5
    shifted = {"color": image + 0.1, "opacity": half, "depth": (depth + 0.3) * half}
    scores = evaluation.score_view(shifted, image, mask, depth, None)
    assert scores["psnr"] == pytest.approx(20.0, abs=1e-4)
    assert scores["depth_rmse"] == pytest.approx(0.3, abs=1e-5)
    valid = depth[mask > 0]
    assert scores["depth_abs_rel"] == pytest.approx(np.mean(0.3 / valid), rel=1e-5)
    assert "lpips" not in scores


def test_mean_image_baseline_and_summary_on_known_answers():
    images = np.stack([np.full((8, 8, 3), v, np.uint8) for v in (100, 140)])
    depths = np.stack([np.full((8, 8), d, np.float32) for d in (6.0, 8.0)])
    train = SimpleNamespace(images=images, depths=depths)
    K, w2c = np.eye(3), np.zeros((3, 4))
    views = [evaluation.View(0, images[0], None, K, w2c, depths[0]),
             evaluation.View(1, images[1], None, K, w2c, depths[1])]
    records = evaluation.mean_image_baseline(train, views)
    # The mean image is 120 everywhere: 20/255 off for both views; the mean depth 7 is 1 off.
    expected = -10 * math.log10((20 / 255) ** 2)
    assert records[0]["psnr"] == pytest.approx(expected) and records[1]["psnr"] == pytest.approx(expected)
    assert records[0]["depth_rmse"] == pytest.approx(1.0)
    assert records[1]["depth_abs_rel"] == pytest.approx(1 / 8)
    summary = evaluation.summarise(records)
    assert summary["n_views"] == 2 and summary["depth_abs_rel"] == pytest.approx((1 / 6 + 1 / 8) / 2)


@pytest.mark.slow
def test_evaluate_reports_every_metric_on_the_tiny_run(tiny_run, tmp_path, capsys, monkeypatch):
    from dataset import PreparedDataset, SyntheticConfig, write_srn_layout

    start_renderer("cpu")
    ckpt = latest_checkpoint(tiny_run)
    out = tmp_path / "eval.json"
    assert (
        evaluate.main(
            [
                "--checkpoint",
                str(ckpt),
                "--json",
                str(out),
                "--max-images",
                "4",
                "--markdown",
                str(tmp_path / "eval.md"),
            ]
        )
        == 0
    )
    table = capsys.readouterr().out
    results = json.loads(out.read_text())
    for section in ("reconstruction", "novel_view", "baseline_reconstruction", "baseline_novel_view"):
        for key in ("psnr", "ssim", "depth_abs_rel", "depth_rmse", "depth_corr"):
            assert isinstance(results[section][key], float), (section, key)
        assert results[section]["n_views"] == 4
    # LPIPS is reported exactly when it can run here: a score in each rendered evaluation (never in
    # the mean-image baselines), a table row and the "computed" note; otherwise no score, no row and
    # the note that says why it was skipped.
    lpips_ran, lpips_note = lpips_status()
    assert results["lpips_note"] == lpips_note and f"- {lpips_note}" in table
    assert lpips_note.startswith("LPIPS skipped") != lpips_ran
    for section in ("reconstruction", "novel_view"):
        assert ("lpips" in results[section]) == lpips_ran, section
        assert all(("lpips" in r) == lpips_ran for r in results["per_view"][section]), section
    assert not any("lpips" in results[s] for s in ("baseline_reconstruction", "baseline_novel_view"))
    assert ("| LPIPS" in table) == lpips_ran
    for row in ("PSNR", "SSIM", "depth abs rel", "depth RMSE", "depth correlation"):
        assert f"| {row}" in table
    assert (tmp_path / "eval.md").read_text() in table + "\n"
    # Trained renders beat the mean training image on the images they were trained on.
    assert results["reconstruction"]["psnr"] > results["baseline_reconstruction"]["psnr"]
    # Existing results are not overwritten without --force.
    assert evaluate.main(["--checkpoint", str(ckpt), "--json", str(out)]) == 2

    # The same held-out views in the SRN layout score exactly what the cache's heldout/ split scores.
    # This run also takes the other LPIPS branch from the one above: with the check answering "available"
    # and a stand-in metric (a constant: the network and its weights are never needed), LPIPS must
    # appear in every rendered evaluation, per view, in the table and in the note.
    monkeypatch.setattr(evaluation, "lpips_status", lambda: (True, "LPIPS stand-in computed (test)."))
    monkeypatch.setattr(evaluation, "Lpips", lambda: lambda pred, target: 0.375)
    # The dataset's own SRN writer renders the same held-out views, in folders named like the training
    # sources, with cameras in the cache's world (scale 1).
    synthetic = PreparedDataset(results["cache"]).manifest["settings"]["synthetic"]
    srn = write_srn_layout(tmp_path / "srn", SyntheticConfig(**synthetic), world_scale=1.0,
                           splits=("heldout",), instance_name="identity_{:06d}")
    out_srn = tmp_path / "eval_srn.json"
    assert (
        evaluate.main(
            ["--checkpoint", str(ckpt), "--views", str(srn), "--json", str(out_srn), "--max-images", "4"]
        )
        == 0
    )
    table_srn = capsys.readouterr().out
    results_srn = json.loads(out_srn.read_text())
    assert results_srn["lpips_note"] == "LPIPS stand-in computed (test)."
    for section in ("reconstruction", "novel_view"):
        assert results_srn[section].get("lpips") == 0.375, section
        assert all(r.get("lpips") == 0.375 for r in results_srn["per_view"][section]), section
    assert "lpips" not in results_srn["baseline_reconstruction"]
    assert "| LPIPS ↓ | 0.375 | 0.375 | – |" in table_srn
    assert "- LPIPS stand-in computed (test)." in table_srn
    via_srn = results_srn["novel_view"]
    assert via_srn["psnr"] == pytest.approx(results["novel_view"]["psnr"], abs=1e-3)
    assert via_srn["ssim"] == pytest.approx(results["novel_view"]["ssim"], abs=1e-4)
