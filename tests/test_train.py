"""train.py end to end on tiny synthetic runs: learning, exact resume, refusals, faults, torchrun."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from tiny_run import train_in_process

from models.checkpoint import latest_checkpoint, load_checkpoint, read_checkpoint
from renderer.backend import started_arch

pytestmark = pytest.mark.usefixtures("keep_taichi_arch")  # every test leaves the arch it found
ROOT = Path(__file__).resolve().parents[1]
# 8 identities at 32 px, 2 × 32 field, 16 + 16 samples, 8 × 2 × 32 = 512 rays per step.
TINY = ["--device", "cpu", "--preset", "cpu", "--synthetic-identities", "8", "--resolution", "32",
        "--field-depth", "2", "--field-width", "32", "--latent-dim", "16",
        "--render-n-coarse", "16", "--render-n-fine", "16",
        "--batch-identities", "8", "--batch-views", "2", "--batch-pixels", "32",
        "--log-every", "1", "--preview-every", "100000", "--checkpoint-every", "100000",
        "--preview-identities", "1"]


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    """One prepared synthetic cache shared by the tests of this module."""
    from dataset.config import PrepareConfig
    from dataset.prepare import prepare_dataset

    out = tmp_path_factory.mktemp("cache") / "synthetic8"
    return prepare_dataset("synthetic", None, out, PrepareConfig(resolution=32, synthetic_identities=8),
                           verbose=False)


def train(out: Path, cache: Path, *extra: str, arch: str = "cpu") -> Path:
    return train_in_process(["--arch", arch, "--out", str(out), "--cache", str(cache), *TINY, *extra])


def metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_tiny_run_learns(arch, cache, tmp_path):
    """PSNR rises by at least 6 dB over the first step, on every Taichi backend."""
    run_dir = train(tmp_path / "run", cache, "--steps", "120", "--optim-lr-init", "5e-3", arch=arch)
    rows = [r for r in metrics(run_dir) if "psnr" in r]
    first = rows[0]["psnr"]
    last = sum(r["psnr"] for r in rows[-10:]) / 10
    assert rows[0]["step"] == 1 and rows[-1]["step"] == 120
    assert last - first >= 6.0, f"PSNR {first:.2f} -> {last:.2f} dB"
    assert started_arch() == arch
    ckpt = load_checkpoint(latest_checkpoint(run_dir))
    assert ckpt.step == 120 and ckpt.latents.n == 8
    assert list((run_dir / "previews").glob("step_*.png"))
    config = json.loads((run_dir / "config.json").read_text())
    assert Path(config["data"]["cache"]) == cache.resolve()


def params(run_dir: Path) -> dict[str, torch.Tensor]:
    payload = read_checkpoint(latest_checkpoint(run_dir))
    flat = {f"field.{k}": v for k, v in payload["field"].items()}
    flat.update({f"latents.{k}": v for k, v in payload["latents"].items()})
    flat.update({f"background.{k}": v for k, v in payload["background"].items()})
    return flat


def test_resume_is_exact(cache, tmp_path):
    """2N steps in one go == N steps, then --resume for N more (x64, CPU). The learning rate decays over
    the run's --steps unless told otherwise, so the N-step run is given the 2N-step run's schedule."""
    whole = train(tmp_path / "whole", cache, "--steps", "12")
    half = train(tmp_path / "half", cache, "--steps", "6", "--optim-decay-steps", "12")
    assert read_checkpoint(latest_checkpoint(half))["step"] == 6
    resumed = train_in_process(["--out", str(half), "--resume", "--steps", "12", "--arch", "cpu"])
    a, b = params(whole), params(resumed)
    assert a.keys() == b.keys()
    for key in a:
        assert torch.allclose(a[key], b[key], atol=1e-5, rtol=0), key
    assert any((a[k] != 0).any() for k in a if k.startswith("latents"))
    steps = [r["step"] for r in metrics(resumed) if "psnr" in r]
    assert steps == list(range(1, 13))


def test_incompatible_resume_is_refused(cache, tmp_path):
    run_dir = train(tmp_path / "run", cache, "--steps", "2")
    with pytest.raises(SystemExit, match=r"--field-depth 3 differs from the run's 2"):
        train_in_process(["--out", str(run_dir), "--resume", "--field-depth", "3", "--arch", "cpu"])
    other = tmp_path / "other_cache"
    shutil.copytree(cache, other)
    manifest = json.loads((other / "manifest.json").read_text())
    manifest["fingerprint"] = "0" * 64
    (other / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(SystemExit, match="different dataset"):
        train_in_process(["--out", str(run_dir), "--resume", "--cache", str(other), "--arch", "cpu"])
    with pytest.raises(SystemExit, match="already holds checkpoints"):
        train(run_dir, cache, "--steps", "2")


def test_nan_steps_are_skipped_then_a_streak_stops_the_run(cache, tmp_path, capsys):
    run_dir = train(tmp_path / "skip", cache, "--steps", "8", "--debug-nan-steps", "3,4")
    rows = metrics(run_dir)
    assert [r["step"] for r in rows if "skipped" in r] == [3, 4]
    ckpt = load_checkpoint(latest_checkpoint(run_dir))
    assert ckpt.step == 8
    assert all(torch.isfinite(p).all() for p in ckpt.field.parameters())
    assert "loss is NaN/inf, step skipped" in capsys.readouterr().err

    stop_dir = tmp_path / "stop"
    with pytest.raises(SystemExit, match="NaN/inf for 3 steps in a row"):
        train(stop_dir, cache, "--steps", "20", "--checkpoint-every", "2", "--max-bad-steps", "3",
              "--debug-nan-steps", ",".join(str(s) for s in range(5, 21)))
    # The last checkpoint predates the failure and is intact.
    assert load_checkpoint(latest_checkpoint(stop_dir)).step == 4


def test_sigterm_checkpoints_and_exits_cleanly(cache, tmp_path, capsys):
    run_dir = tmp_path / "run"

    def send_sigterm_after_first_steps():
        log = run_dir / "metrics.jsonl"
        deadline = time.time() + 120
        while time.time() < deadline:
            if log.exists() and len(log.read_text().splitlines()) >= 3:
                os.kill(os.getpid(), signal.SIGTERM)
                return
            time.sleep(0.05)

    killer = threading.Thread(target=send_sigterm_after_first_steps, daemon=True)
    previous_handler = signal.getsignal(signal.SIGTERM)
    killer.start()
    result = train(run_dir, cache, "--steps", "100000")
    killer.join()
    assert signal.getsignal(signal.SIGTERM) == previous_handler
    assert result == run_dir
    ckpt = load_checkpoint(latest_checkpoint(run_dir))
    assert 3 <= ckpt.step < 100000
    assert "SIGTERM received: checkpoint written" in capsys.readouterr().out


def test_torchrun_two_processes_shard_identities(cache, tmp_path):
    """2 ranks (gloo): each trains its own identities; the checkpoint holds every identity's latent."""
    out = tmp_path / "ddp"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               str(ROOT / "train.py"), "--arch", "cpu", "--out", str(out), "--cache", str(cache), *TINY,
               "--steps", "6", "--batch-identities", "4"]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    ckpt = load_checkpoint(latest_checkpoint(out))
    assert ckpt.step == 6 and ckpt.latents.n == 8
    trained = (ckpt.latents.codes != 0).any(dim=1)
    assert trained.all(), f"identities without a trained latent: {(~trained).nonzero().flatten().tolist()}"
    assert read_checkpoint(latest_checkpoint(out))["rng"]["ranks"].__len__() == 2


def test_help_lists_every_config_flag(capsys):
    import train

    with pytest.raises(SystemExit) as exit_info:
        train.main(["--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    from models.train_config import TrainConfig, fields_of, flag_name

    for section, key, _, _ in fields_of(TrainConfig.cpu()):
        assert flag_name(section, key) in text
    for flag in ("--out", "--preset", "--arch", "--device", "--resume", "--profile"):
        assert flag in text
    assert "--debug-nan-steps" not in text  # a test hook, not a user feature


def test_profile_prints_breakdown_and_writes_trace(cache, tmp_path, capsys):
    run_dir = train(tmp_path / "prof", cache, "--profile", "2")
    out = capsys.readouterr().out
    # Skipping empty space is on by default: packed compositing and the samples each ray kept.
    for phase in ("data", "field forward", "renderer forward", "field backward", "renderer backward",
                  "optimiser", "packed_forward_kernel", "march_kernel",
                  "share of the step outside the field MLP", "kept samples per ray (last step)"):
        assert phase in out
    trace = json.loads((run_dir / "profile_trace.json").read_text())
    assert trace["traceEvents"]
    assert not list((run_dir / "checkpoints").glob("*.pt"))  # profiling trains nothing to keep


def test_learning_rate_decays_over_the_run_and_resume_keeps_the_schedule(cache, tmp_path):
    run_dir = train(tmp_path / "run", cache, "--steps", "4")
    optim = json.loads((run_dir / "config.json").read_text())["optim"]
    assert optim["decay_steps"] == 4  # the run's --steps (the cpu preset used to decay over 1,000)
    lrs = {r["step"]: r["lr"] for r in metrics(run_dir)}  # logged after the step: the next step's rate
    assert lrs[4] == pytest.approx(optim["lr_final"], rel=1e-6) and lrs[1] > lrs[2] > lrs[3] > lrs[4]
    # a longer --steps on resume keeps the 4-step schedule the run started with
    train_in_process(["--out", str(run_dir), "--resume", "--steps", "6", "--arch", "cpu"])
    assert json.loads((run_dir / "config.json").read_text())["optim"]["decay_steps"] == 4
    lrs = {r["step"]: r["lr"] for r in metrics(run_dir)}
    assert lrs[5] == pytest.approx(optim["lr_final"], rel=1e-6) == lrs[6]
