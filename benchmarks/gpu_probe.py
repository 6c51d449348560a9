"""What the GPU machine offers, as JSON: torch, CUDA, the driver, Taichi on CUDA, the Vulkan devices.

    python benchmarks/gpu_probe.py --json probe.json

``benchmarks/gpu_check.py`` runs it first: it exits 1 when Taichi cannot start on CUDA, and reports the
NVIDIA Vulkan device (``nvidia_vulkan``, None without one) that decides whether the Vulkan stages run.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def driver_version() -> str | None:
    """The NVIDIA driver version nvidia-smi reports, or None."""
    try:
        done = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                              capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return done.stdout.strip().splitlines()[0] if done.returncode == 0 and done.stdout.strip() else None


def probe() -> dict:
    """The facts, and ``error`` when Taichi could not start on CUDA."""
    import taichi as ti
    import torch

    from renderer.backend import BackendUnavailableError, init_backend
    from renderer.vulkan_probe import vulkan_devices

    devices = vulkan_devices()
    nvidia = [d.name for d in devices if not d.is_software and "nvidia" in d.name.lower()]
    facts = {"torch": torch.__version__, "cuda": torch.version.cuda, "driver": driver_version(),
             "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
             "taichi": ".".join(map(str, ti.__version__)),
             "vulkan_devices": [f"{d.name} ({d.kind})" for d in devices],
             "nvidia_vulkan": nvidia[0] if nvidia else None}
    try:
        facts["taichi_cuda"] = init_backend("cuda", "cuda", verbose=False).reason
    except BackendUnavailableError as err:
        facts["error"] = str(err)
    return facts


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", type=Path, help="write the facts here")
    args = parser.parse_args(argv)
    facts = probe()
    text = json.dumps(facts, indent=2)
    print(text)
    if args.json:
        args.json.write_text(text + "\n")
    if "error" in facts:
        print(f"gpu_probe: {facts['error']}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
