"""Which implementation evaluates the field: torch (``ConditionedField``) or Taichi kernels (``TaichiField``).

    name, reason = choose_field_backend("auto", arch="vulkan", device=torch.device("cpu"))
    field = make_field(FieldConfig.cpu(), latent_dim=64, backend=name)

Both have the same parameters and ``state_dict``, so a checkpoint written with one loads into the other
and the choice is not part of what a run learns (it may change on ``--resume``). ``auto`` takes Taichi
when the renderer runs on a Vulkan or Metal GPU and torch has no device there (the torch field would
run on the CPU beside it); otherwise torch, which is faster on the CPU at the paper preset and is what
a CUDA GPU runs best (README, ``benchmarks/field.py``). A software Vulkan driver (Mesa's lavapipe) is
the CPU in disguise, so ``auto`` keeps torch there.

The background network (``BackgroundField``, for datasets whose manifest asks for ``"network"``) follows
the field's backend (``TaichiBackground``; same parameters and ``state_dict``); a
``ConstantBackground`` has no network and is the same on both::

    background = make_background_for("network", 64, BackgroundConfig.cpu(), backend=name)
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from models.background import BackgroundConfig, BackgroundField, make_background
from models.field import ConditionedField, FieldConfig

FIELD_BACKENDS = ("auto", "torch", "taichi")
DEVICE_STEPS = ("auto", "on", "off")


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


def choose_device_step(requested: str, field_backend: str, arch: str, device: torch.device,
                       world_size: int) -> tuple[bool, str]:
    """(whether the step stays on the Taichi device (``models.device_step``), why).

    ``auto`` keeps it on the device when the field runs as Taichi kernels on a Vulkan or Metal arch and
    torch has no device there (every torch tensor would be copied per launch); ``on`` asks for it on
    any arch (x64 too: the same kernels, no copies to save), ``off`` never. It needs the Taichi field
    and one process. It skips empty space as the torch path does (``models.device_skip``).

    >>> choose_device_step("auto", "taichi", "vulkan", torch.device("cpu"), 1)[0]
    True
    """
    if requested not in DEVICE_STEPS:
        raise ValueError(f"--device-step {requested!r} is not one of {', '.join(DEVICE_STEPS)}.")
    if requested == "off":
        return False, "asked for off"
    missing = None
    if field_backend != "taichi":
        missing = "the field runs in torch (it needs --field-backend taichi)"
    elif world_size > 1:
        missing = "it runs in one process only (this run has several ranks)"
    if requested == "on":
        if missing:
            raise ValueError(f"--device-step on cannot be served: {missing}.")
        return True, "asked for on"
    if missing:
        return False, f"auto: {missing}"
    if arch not in ("vulkan", "metal") or device.type != "cpu":
        return False, f"auto: Taichi {arch} reads torch's {device.type} tensors in place, nothing to save"
    return True, f"auto: on Taichi {arch} every torch tensor would be copied per launch"


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
    return _same_placement(converted, field)


def _same_placement(converted: nn.Module, original: nn.Module) -> nn.Module:
    """``converted`` on ``original``'s device, train/eval mode and ``requires_grad``."""
    first = next(original.parameters())
    return converted.to(first.device).train(original.training).requires_grad_(first.requires_grad)


def background_as_backend(background: nn.Module | None, backend: str) -> nn.Module | None:
    """The same background on another implementation: a ``BackgroundField`` (torch) or ``TaichiBackground``
    (Taichi kernels) with the same weights, ``requires_grad``, train/eval mode and device.

    Anything that is not a background network (a ``ConstantBackground``, or None) is returned unchanged.
    """
    from models.taichi_background import TaichiBackground

    if backend not in ("torch", "taichi"):
        raise ValueError(f"background backend must be 'torch' or 'taichi', not {backend!r}.")
    if not isinstance(background, BackgroundField):
        return background
    if isinstance(background, TaichiBackground) == (backend == "taichi"):
        return background
    wanted = TaichiBackground if backend == "taichi" else BackgroundField
    converted = wanted(background.cfg, background.latent_dim)
    converted.load_state_dict(background.state_dict())
    return _same_placement(converted, background)


def make_background_for(spec: str | Sequence[float], latent_dim: int, cfg: BackgroundConfig | None,
                        backend: str) -> nn.Module:
    """``models.background.make_background`` on ``backend`` ("torch" or "taichi"): the torch network is
    built first and converted, so a seed gives the same initial weights on both."""
    return background_as_backend(make_background(spec, latent_dim, cfg), backend)
