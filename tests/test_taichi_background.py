"""TaichiBackground (Taichi kernels, hand-written backward) against the torch BackgroundField, per backend."""

from __future__ import annotations

import pytest
import torch

from models.background import BackgroundConfig, BackgroundField, ConstantBackground
from models.checkpoint import model_description
from models.field import FieldConfig
from models.field_backend import background_as_backend, make_background_for, make_field
from models.latents import LatentTable
from models.taichi_background import TaichiBackground

RTOL = 1e-4


def assert_close(actual: torch.Tensor, expected: torch.Tensor, name: str, rtol: float = RTOL) -> None:
    """Max error relative to the largest magnitude of ``expected`` (float32 sums of ~30-300 terms)."""
    scale = expected.abs().max().clamp_min(1e-12)
    err = (actual - expected).abs().max() / scale
    assert err < rtol, f"{name}: max error {err:.2e} of max |value| {scale:.2e} (tolerance {rtol})"


def make_pair(cfg: BackgroundConfig, latent_dim: int,
              seed: int = 0) -> tuple[BackgroundField, TaichiBackground]:
    torch.manual_seed(seed)
    reference = BackgroundField(cfg, latent_dim)
    # Larger weights than nn.Linear's default, so ReLUs switch and the sigmoid leaves its linear middle.
    with torch.no_grad():
        for p in reference.parameters():
            p.mul_(2.0)
    background = TaichiBackground(cfg, latent_dim)
    background.load_state_dict(reference.state_dict())
    return reference, background


def inputs(n: int, latent_dim: int, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    directions = torch.nn.functional.normalize(torch.randn(n, 3, generator=g), dim=-1)
    return directions, torch.randn(n, latent_dim, generator=g)


def compare(reference: BackgroundField, background: TaichiBackground, n: int) -> None:
    """Values and gradients (every parameter, latents) from the same random upstream gradient."""
    directions, latents = inputs(n, reference.latent_dim)
    upstream = torch.randn(n, 3, generator=torch.Generator().manual_seed(2))
    results = []
    for module in (reference, background):
        module.zero_grad()
        lat = latents.clone().requires_grad_()
        rgb = module(directions, lat)
        rgb.backward(upstream)
        grads = {name: p.grad.clone() for name, p in module.named_parameters()}
        results.append((rgb.detach(), lat.grad.clone(), grads))
    (ref_rgb, ref_lat, ref_grads), (rgb, lat_grad, grads) = results
    assert rgb.shape == (n, 3)
    assert_close(rgb, ref_rgb, "rgb")
    assert_close(lat_grad, ref_lat, "d latents")
    assert grads.keys() == ref_grads.keys()
    for name in ref_grads:
        assert_close(grads[name], ref_grads[name], f"d {name}")


def test_cpu_preset_matches_torch(arch):
    reference, background = make_pair(BackgroundConfig.cpu(), 64)
    compare(reference, background, 1000)


@pytest.mark.parametrize("n", [1, 333])
def test_odd_shapes_match_torch(arch, n):
    """3 hidden layers of an odd width, odd latent size, no raw direction in the encoding."""
    cfg = BackgroundConfig(depth=3, width=23, n_frequencies=2, include_input=False)
    reference, background = make_pair(cfg, 10, seed=3)
    compare(reference, background, n)


def test_no_hidden_layer_matches_torch(arch):
    """depth 0: the output layer reads [encoded direction, latents] directly."""
    reference, background = make_pair(BackgroundConfig(depth=0, width=8), 5, seed=4)
    compare(reference, background, 257)


def test_no_latent_gradient_when_not_required(arch):
    _, background = make_pair(BackgroundConfig(depth=2, width=16), 8)
    directions, latents = inputs(50, 8)
    directions.requires_grad_()
    background(directions, latents).sum().backward()
    assert latents.grad is None and directions.grad is None
    assert all(p.grad is not None for p in background.parameters())


def test_state_dict_round_trip():
    cfg = BackgroundConfig(depth=3, width=24)
    reference = BackgroundField(cfg, 10)
    background = TaichiBackground(cfg, 10)
    background.load_state_dict(reference.state_dict())
    assert list(background.state_dict()) == list(reference.state_dict())
    back = BackgroundField(cfg, 10)
    back.load_state_dict(background.state_dict())
    for name, value in reference.state_dict().items():
        assert torch.equal(back.state_dict()[name], value), name


def test_conversion_keeps_weights_mode_and_constant_backgrounds():
    constant = ConstantBackground([1.0, 0.5, 0.0])
    assert background_as_backend(constant, "taichi") is constant
    assert background_as_backend(None, "taichi") is None
    assert isinstance(make_background_for([1, 1, 1], 8, None, "taichi"), ConstantBackground)

    cfg = BackgroundConfig(depth=2, width=16)
    torch.manual_seed(7)
    expected = BackgroundField(cfg, 8).state_dict()
    torch.manual_seed(7)
    made = make_background_for("network", 8, cfg, "taichi")  # the same seed gives the same network
    assert isinstance(made, TaichiBackground)
    for name, value in expected.items():
        assert torch.equal(made.state_dict()[name], value), name

    made.eval().requires_grad_(False)
    torch_bg = background_as_backend(made, "torch")
    assert type(torch_bg) is BackgroundField
    assert not torch_bg.training and not any(p.requires_grad for p in torch_bg.parameters())
    assert background_as_backend(torch_bg, "torch") is torch_bg
    assert background_as_backend(made, "taichi") is made
    with pytest.raises(ValueError, match="'torch' or 'taichi'"):
        background_as_backend(torch_bg, "auto")
    # A checkpoint records the network's shape whichever backend trained it.
    field = make_field(FieldConfig(depth=2, width=16), 8, "torch")
    assert model_description(field, made, LatentTable(2, 8))["background_net"]["width"] == 16
