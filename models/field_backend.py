"""Which implementation evaluates the field: torch (``ConditionedField``) or Taichi kernels (``TaichiField``).

    name, reason = choose_field_backend("auto", arch="vulkan", device=torch.device("cpu"))
    field = make_field(FieldConfig.cpu(), latent_dim=64, backend=name)

Both have the same parameters and ``state_dict``, so a checkpoint written with one loads into the other
and the choice is not part of what a run learns (it may change on ``--resume``). ``auto`` takes Taichi
when the renderer runs on a Vulkan or Metal GPU and torch has no device there (the torch field would
run on the CPU beside it); otherwise torch, which is faster on the CPU at the paper preset and is what
a CUDA GPU runs best (README, ``benchmarks/field.py``). A software Vulkan driver (Mesa's lavapipe) is
the CPU in disguise, so ``auto`` keeps torch there.
"""

from __future__ import annotations

import torch
from torch import nn

from models.field import ConditionedField, FieldConfig

FIELD_BACKENDS = ("auto", "torch", "taichi")


def choose_field_backend(requested: str, arch: str, device: torch.device) -> tuple[str, str]:
    """("torch" | "taichi", why) for a request, the running Taichi ``arch`` and the torch ``device``.

    >>> choose_field_backend("auto", "cpu", torch.device("cpu"))[0]
    'torch'
    """
    if requested not in FIELD_BACKENDS:
        raise ValueError(f"--field-backend {requested!r} is not one of {', '.join(FIELD_BACKENDS)}.")
    if requested != "auto":
        return requested, f"asked for {requested}"
    if arch not in ("vulkan", "metal"):
        return "torch", f"auto: the renderer runs on Taichi {arch}, where torch runs the field well"
    if device.type != "cpu":
        return "torch", f"auto: torch has the {device.type} device beside Taichi {arch}"
    if arch == "vulkan":
        from renderer.vulkan_probe import vulkan_devices

        devices = vulkan_devices()
        if devices and all(d.is_software for d in devices):
            return "torch", (f"auto: the only Vulkan device is a software driver ({devices[0].name}), "
                             "on which the torch field is faster")
    return "taichi", f"auto: Taichi {arch} is a GPU that torch cannot use, so the field runs there too"


def make_field(cfg: FieldConfig, latent_dim: int, backend: str) -> nn.Module:
    """A fresh field of ``backend`` ("torch" or "taichi"), initialised as ``ConditionedField`` is.

    The Taichi field takes the torch field's initial weights, so a seed gives the same network on both.
    """
    field = ConditionedField(cfg, latent_dim)
    if backend == "torch":
        return field
    if backend != "taichi":
        raise ValueError(f"field backend must be 'torch' or 'taichi', not {backend!r}.")
    return as_backend(field, "taichi")


def as_backend(field: nn.Module, backend: str) -> nn.Module:
    """The same field (weights, ``requires_grad``, train/eval mode, device) on another implementation."""
    from models.taichi_field import TaichiField

    wanted = TaichiField if backend == "taichi" else ConditionedField
    if isinstance(field, wanted):
        return field
    converted = wanted(field.cfg, field.latent_dim)
    converted.load_state_dict(field.state_dict())
    first = next(field.parameters())
    converted.to(first.device).train(field.training).requires_grad_(first.requires_grad)
    return converted
