"""The CUDA start-up choices, tested on the CPU with the CUDA calls mocked: one GPU per rank, the
process-group backend, ROCm, the memory-fitted batch, TF32, and the per-step host syncs."""

from __future__ import annotations

import pytest
import torch

from models import distributed, gpu_setup
from models.field import FieldConfig


def test_each_rank_is_pinned_to_its_own_gpu():
    env = {"WORLD_SIZE": "4", "LOCAL_RANK": "2"}
    assert distributed.pin_local_gpu(env) == "2" and env["CUDA_VISIBLE_DEVICES"] == "2"
    env = {"WORLD_SIZE": "2", "LOCAL_RANK": "1", "CUDA_VISIBLE_DEVICES": "3, 7"}
    assert distributed.pin_local_gpu(env) == "7" and env["CUDA_VISIBLE_DEVICES"] == "7"
    alone = {"LOCAL_RANK": "0"}
    assert distributed.pin_local_gpu(alone) is None and "CUDA_VISIBLE_DEVICES" not in alone
    with pytest.raises(ValueError, match="lists 1: start at most 1 processes per node"):
        distributed.pin_local_gpu({"WORLD_SIZE": "2", "LOCAL_RANK": "1", "CUDA_VISIBLE_DEVICES": "0"})


def test_process_group_backend_follows_the_tensors_device(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # a CUDA machine, tensors on the CPU
    assert distributed.process_group_backend(torch.device("cpu")) == "gloo"
    assert distributed.process_group_backend(torch.device("cuda", 0)) == "nccl"
    calls = {}
    monkeypatch.setattr(distributed.dist, "init_process_group",
                        lambda backend, timeout: calls.update(backend=backend, timeout=timeout))
    monkeypatch.setattr(torch.cuda, "set_device", lambda device: calls.update(device=device))
    assert distributed.start_process_group(torch.device("cpu"), 90) == "gloo"
    assert calls["backend"] == "gloo" and calls["timeout"].total_seconds() == 90 * 60
    assert "device" not in calls
    assert distributed.start_process_group(torch.device("cuda", 0)) == "nccl"
    assert calls["device"] == torch.device("cuda", 0)
    assert calls["timeout"].total_seconds() == distributed.DEFAULT_TIMEOUT_MINUTES * 60


def test_rocm_torch_keeps_taichi_off_cuda(monkeypatch, keep_taichi_arch):
    from renderer import backend

    monkeypatch.setattr(torch.version, "hip", "6.2.0", raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert backend.torch_is_rocm()
    with pytest.raises(backend.BackendUnavailableError, match=r"ROCm build .* choose arch='vulkan'"):
        backend.init_backend("cuda", verbose=False)
    started = []
    real_start = backend._start
    monkeypatch.setattr(backend, "_start", lambda arch, **kw: started.append(arch) or real_start(arch, **kw))
    chosen = backend.init_backend("auto", verbose=False)
    assert "cuda" not in started and "ROCm build" in chosen.reason
    if chosen.arch == "vulkan":  # a Vulkan GPU here: the MLP stays on the ROCm device
        assert chosen.device.type == "cuda"


def test_saved_activations_are_measured_and_scale_with_the_network():
    small = gpu_setup.saved_bytes_per_ray(FieldConfig.cpu(), 64, 64)
    paper = gpu_setup.saved_bytes_per_ray(FieldConfig.paper(), 64, 192)
    # 8 layers of 256 keep ~2,800 floats per sample (a pre-activation and a ReLU output per layer...).
    per_sample_floats = paper / 192 / 4
    assert 1500 < per_sample_floats < 6000, per_sample_floats
    assert paper > 10 * small
    assert gpu_setup.saved_bytes_per_ray(FieldConfig.paper(), 64, 96) < paper


def test_the_batch_shrinks_to_the_free_memory():
    paper = {"identities": 64, "views": 2, "pixels": 64}
    assert gpu_setup.fit_batch(paper, 8192) == (paper, None)
    shrunk, note = gpu_setup.fit_batch(paper, 3000)
    assert shrunk == {"identities": 64, "views": 2, "pixels": 23} and "2944 rays" in note
    shrunk, _ = gpu_setup.fit_batch(paper, 500)  # pixels stop at 8, then identities go
    assert shrunk == {"identities": 31, "views": 2, "pixels": 8}
    with pytest.raises(ValueError, match="Not even one identity"):
        gpu_setup.fit_batch(paper, 1)
    assert gpu_setup.rays_that_fit(24 * 2**30, 2 * 2**20) == int(24 * 2**30 * 0.6) // (2 * 2**20)
    with pytest.raises(ValueError, match="must be positive"):
        gpu_setup.rays_that_fit(1, 0)


def test_memory_plan_reads_the_free_memory(monkeypatch):
    from models.train_config import TrainConfig

    config = TrainConfig.paper()
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device: (20 * 2**30, 24 * 2**30))
    batch, note = gpu_setup.memory_plan(torch.device("cuda", 0), config, batch_given=False)
    rays = batch.identities * batch.views * batch.pixels
    assert rays < 8192 and f"= {rays} rays" in note and "20.0 of 24.0 GiB free" in note
    kept, warning = gpu_setup.memory_plan(torch.device("cuda", 0), config, batch_given=True)
    assert kept == config.batch and "may run out of memory" in warning
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device: (140 * 2**30, 141 * 2**30))
    batch, note = gpu_setup.memory_plan(torch.device("cuda", 0), config, batch_given=False)
    assert batch == config.batch and note.endswith("batch 8192 rays fits")


def test_tf32_is_set_by_capability(monkeypatch):
    previous = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    try:
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device: (9, 0))
        assert gpu_setup.enable_tf32(torch.device("cuda", 0)).startswith("TF32: on")
        assert torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32
        assert gpu_setup.enable_tf32(torch.device("cuda", 0), wanted=False) == "TF32: off (--tf32 off)"
        assert not torch.backends.cuda.matmul.allow_tf32
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device: (7, 5))
        assert "has no TF32" in gpu_setup.enable_tf32(torch.device("cuda", 0))
        assert gpu_setup.enable_tf32(torch.device("cpu")) == "TF32: not applicable (cpu)"
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = previous


def test_one_host_read_for_all_logged_values():
    from models.trainer import host_metrics

    out = host_metrics({"total": torch.tensor(0.5), "rgb": torch.tensor(0.001), "mask": torch.tensor(0.0),
                        "hard": torch.tensor(0.2), "rays": 16})
    assert out["psnr"] == pytest.approx(30.0) and out["rays"] == 16
    assert all(isinstance(out[k], float) for k in ("total", "rgb", "mask", "hard"))
    assert distributed.any_rank(torch.tensor(True)) and not distributed.any_rank(torch.tensor(False))


def test_bad_dist_timeout_is_one_sentence():
    import train

    with pytest.raises(SystemExit, match=r"--dist-timeout 0 must be a positive number of minutes\."):
        train.main(["--dist-timeout", "0"])


def test_test_tensors_follow_the_arch_device():
    """The conftest helper behind the cuda arch: factories land on the device, seeded CPU generators
    still drive them (checked with the meta device, which exists without a GPU)."""
    from conftest import arch_device, tensors_on
    from torch.overrides import TorchFunctionMode

    class Recorder(TorchFunctionMode):  # sees each call after tensors_on's modes have rewritten it
        def __init__(self):
            super().__init__()
            self.devices = []

        def __torch_function__(self, func, types, args=(), kwargs=None):
            if func is torch.rand:
                self.devices.append((kwargs or {}).get("device"))
            return func(*args, **(kwargs or {}))

    assert arch_device("cuda") == torch.device("cuda") and arch_device("cpu") == torch.device("cpu")
    meta = torch.device("meta")
    with Recorder() as recorder, tensors_on(meta):
        seeded = torch.rand(3, generator=torch.Generator().manual_seed(0))
        plain = torch.zeros(2)
        explicit = torch.ones(2, device="cpu")
    assert seeded.device == meta and plain.device == meta and explicit.device.type == "cpu"
    assert recorder.devices == ["cpu"]  # drawn on the CPU generator's device, then moved
    with tensors_on(torch.device("cpu")):
        assert torch.zeros(1).device.type == "cpu"


def test_batches_reach_cuda_through_pinned_memory_without_blocking():
    from types import SimpleNamespace

    from models.trainer import Trainer

    class Recorded:
        def __init__(self):
            self.calls = []

        def pin_memory(self):
            self.calls.append("pin_memory")
            return self

        def to(self, device, non_blocking=False):
            self.calls.append(("to", str(device), non_blocking))
            return self

    value = Recorded()
    Trainer.to_device(SimpleNamespace(device=torch.device("cuda", 0)), {"rgb": value})
    assert value.calls == ["pin_memory", ("to", "cuda:0", True)]
    cpu = torch.ones(2)
    assert Trainer.to_device(SimpleNamespace(device=torch.device("cpu")), {"rgb": cpu})["rgb"] is cpu


def test_a_steps_collective_decisions_share_one_all_reduce(monkeypatch):
    """Under DDP the step's finiteness check and the stop request are agreed in one all-reduce and one
    host read (``any_rank_each``), not one each."""
    calls = []

    def fake_all_reduce(tensor, op=None):
        calls.append(tuple(tensor.shape))
        tensor.copy_(torch.maximum(tensor, torch.tensor([0.0, 1.0])))  # another rank was asked to stop

    monkeypatch.setattr(distributed, "world", lambda: (0, 2))
    monkeypatch.setattr(distributed.dist, "all_reduce", fake_all_reduce)
    assert distributed.any_rank_each(torch.tensor([False, False])) == [False, True]
    assert calls == [(2,)]
