"""--field-backend: training, resuming and inference with the field as Taichi kernels (issue 10, item 3)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from test_train import TINY, metrics, params
from tiny_run import train_in_process

from models.checkpoint import latest_checkpoint, load_checkpoint, read_checkpoint
from models.field_backend import as_backend, choose_field_backend
from models.taichi_field import TaichiField
from renderer.backend import started_arch
from renderer.vulkan_probe import VulkanDevice

pytestmark = pytest.mark.usefixtures("keep_taichi_arch")  # every test leaves the arch it found


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    from dataset.config import PrepareConfig
    from dataset.prepare import prepare_dataset

    out = tmp_path_factory.mktemp("cache") / "synthetic8"
    return prepare_dataset("synthetic", None, out, PrepareConfig(resolution=32, synthetic_identities=8),
                           verbose=False)


def _train(out: Path, cache: Path, *extra: str, arch: str = "cpu") -> Path:
    device = ["--device", "auto"] if arch == "cuda" else []  # TINY's --device cpu cannot serve Taichi CUDA
    return train_in_process(["--arch", arch, "--out", str(out), "--cache", str(cache), *TINY, *device,
                             *extra])


def _devices(*software: bool) -> list[VulkanDevice]:
    return [VulkanDevice("llvmpipe", "CPU") if s else VulkanDevice("Radeon", "discrete GPU")
            for s in software]


def test_auto_takes_taichi_only_on_a_gpu_torch_cannot_use(monkeypatch):
    cpu = torch.device("cpu")
    assert choose_field_backend("auto", "cpu", cpu)[0] == "torch"
    assert choose_field_backend("auto", "cuda", torch.device("cuda"))[0] == "torch"
    assert choose_field_backend("auto", "metal", cpu)[0] == "taichi"
    assert choose_field_backend("auto", "metal", torch.device("mps"))[0] == "torch"
    monkeypatch.setattr("renderer.vulkan_probe.vulkan_devices", lambda: _devices(True))
    name, why = choose_field_backend("auto", "vulkan", cpu)
    assert name == "torch" and "software" in why
    monkeypatch.setattr("renderer.vulkan_probe.vulkan_devices", lambda: _devices(True, False))
    assert choose_field_backend("auto", "vulkan", cpu)[0] == "taichi"
    assert choose_field_backend("taichi", "cpu", cpu) == ("taichi", "asked for taichi")
    with pytest.raises(ValueError, match="not one of"):
        choose_field_backend("jax", "cpu", cpu)


def test_training_with_the_taichi_field_learns_and_its_checkpoint_loads_in_torch(arch, cache, tmp_path,
                                                                                  capsys, monkeypatch):
    calls = []
    original = TaichiField.forward
    monkeypatch.setattr(TaichiField, "forward", lambda self, *a: calls.append(1) or original(self, *a))
    run_dir = _train(tmp_path / "run", cache, "--steps", "60", "--optim-lr-init", "5e-3",
                     "--optim-decay-steps", "1000", "--field-backend", "taichi", "--device-step", "off",
                     arch=arch)  # the torch-tensor path (tests/test_device_step.py has the other)
    assert "[train] field MLP: taichi (asked for taichi)" in capsys.readouterr().out
    assert len(calls) >= 2 * 60  # coarse and fine samples of every step went through the kernels
    rows = [r for r in metrics(run_dir) if "psnr" in r]
    first, last = rows[0]["psnr"], sum(r["psnr"] for r in rows[-10:]) / 10
    assert last - first >= 4.0, f"PSNR {first:.2f} -> {last:.2f} dB"
    assert started_arch() == arch
    ckpt = load_checkpoint(latest_checkpoint(run_dir))  # a torch ConditionedField
    kernels = as_backend(ckpt.field, "taichi")
    assert isinstance(kernels, TaichiField)
    g = torch.Generator().manual_seed(0)
    points, codes = torch.rand(64, 3, generator=g) * 2 - 1, ckpt.latents.codes[:1].detach().expand(64, -1)
    with torch.no_grad():
        (s_torch, c_torch), (s_taichi, c_taichi) = ckpt.field(points, codes), kernels(points, codes)
    assert torch.allclose(s_taichi, s_torch, rtol=1e-4, atol=1e-5)
    assert torch.allclose(c_taichi, c_torch, rtol=1e-4, atol=1e-5)


def test_resume_with_the_taichi_field_is_exact(cache, tmp_path):
    """2N steps == N + resumed N with --field-backend taichi (x64), to 1e-5."""
    flags = ("--field-backend", "taichi", "--optim-decay-steps", "10")  # one schedule for both runs
    whole = _train(tmp_path / "whole", cache, "--steps", "10", *flags)
    half = _train(tmp_path / "half", cache, "--steps", "5", *flags)
    resumed = train_in_process(["--out", str(half), "--resume", "--steps", "10", "--arch", "cpu", *flags])
    a, b = params(whole), params(resumed)
    assert a.keys() == b.keys()
    for key in a:
        assert torch.allclose(a[key], b[key], atol=1e-5, rtol=0), key
    assert read_checkpoint(latest_checkpoint(resumed))["step"] == 10
    assert json.loads((half / "config.json").read_text())["field"]["depth"] == 2


def test_render_uses_the_taichi_field_when_asked(cache, tmp_path, capsys, monkeypatch):
    import render

    calls = []
    original = TaichiField.forward
    monkeypatch.setattr(TaichiField, "forward", lambda self, *a: calls.append(1) or original(self, *a))
    run_dir = _train(tmp_path / "run", cache, "--steps", "3")
    outs = {}
    for backend in ("torch", "taichi"):
        out, before = tmp_path / f"render_{backend}", len(calls)
        code = render.main(["--checkpoint", str(latest_checkpoint(run_dir)), "--out", str(out),
                            "--camera", "fixed", "--size", "16", "--outputs", "depth",
                            "--field-backend", backend])
        assert code == 0
        assert f"field MLP: {backend}" in capsys.readouterr().out
        assert (len(calls) > before) == (backend == "taichi")
        outs[backend] = np.load(out / "identity_0000" / "depth_000.npy")
    assert abs(outs["torch"] - outs["taichi"]).max() < 1e-3
