"""A tiny trained run shared by the tests that need a checkpoint (fit, render, evaluate).

    run_dir = make_tiny_run(tmp_path)           # trains once, on Taichi x64, in about a minute
    ckpt = load_checkpoint(latest_checkpoint(run_dir))
    ckpt.config.data.cache                      # the prepared synthetic cache, with heldout/ views

The run: 16 synthetic identities at 64 × 64 px (1 training view each, 3 held-out views), the cpu-preset
4 × 64 field, 16 + 16 samples per ray, 8 identities × 2 views × 32 px per step, 600 steps at Adam
4e-3 -> 1e-3, skipping empty space as the cpu preset does (every cell occupied for the first 256 steps).
Training PSNR goes from 8.8 dB (step 1) to about 25 dB (the last ten logged batches: 24.8 dB on average,
25.3 with ``--render-skip-empty off``); the preview in
``run_dir/previews`` shows each head's shape, skin and hair colours (not yet eyes or mouth).
"""

from __future__ import annotations

from pathlib import Path

TINY_STEPS = 600
TINY_ARGS = (
    "--preset", "cpu", "--synthetic-identities", "16", "--resolution", "64",
    "--render-n-coarse", "16", "--render-n-fine", "16",
    "--batch-identities", "8", "--batch-views", "2", "--batch-pixels", "32",
    "--log-every", "10", "--preview-every", "1000000", "--checkpoint-every", "1000000",
    "--preview-identities", "2",
    "--optim-lr-init", "4e-3", "--optim-lr-final", "1e-3", "--optim-decay-steps", "600",
)


def restore_arch(previous: str | None) -> None:
    """Start Taichi again on the arch a caller had (tests parametrised over arches must keep theirs)."""
    from renderer.backend import init_backend, started_arch

    if previous is not None and started_arch() != previous:
        init_backend(previous, "cpu", verbose=False)


def train_in_process(argv: list[str]) -> Path:
    """``train.main(argv)`` that leaves the Taichi arch as it found it."""
    import train
    from renderer.backend import started_arch

    previous = started_arch()
    try:
        return train.main(argv)
    finally:
        restore_arch(previous)


def make_tiny_run(out_dir: Path, steps: int = TINY_STEPS) -> Path:
    """Train the tiny synthetic model under ``out_dir`` (x64 backend) and return its run directory."""
    out_dir = Path(out_dir)
    return train_in_process(["--arch", "cpu", "--device", "cpu", "--out", str(out_dir / "run"),
                             "--cache", str(out_dir / "cache"), "--steps", str(steps), *TINY_ARGS])
