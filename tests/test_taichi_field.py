"""TaichiField (Taichi kernels, hand-written backward) against the torch ConditionedField, per backend."""

from __future__ import annotations

import pytest
import torch

from models.field import ConditionedField, FieldConfig, positional_encoding
from models.taichi_field import TaichiField
from renderer.dense import Segment, dense_backward, dense_forward, encode_positions

RTOL = 1e-4


def assert_close(actual: torch.Tensor, expected: torch.Tensor, name: str, rtol: float = RTOL) -> None:
    """Max error relative to the largest magnitude of ``expected`` (float32 sums of ~100-300 terms)."""
    scale = expected.abs().max().clamp_min(1e-12)
    err = (actual - expected).abs().max() / scale
    assert err < rtol, f"{name}: max error {err:.2e} of max |value| {scale:.2e} (tolerance {rtol})"


def make_pair(cfg: FieldConfig, latent_dim: int, seed: int = 0) -> tuple[ConditionedField, TaichiField]:
    torch.manual_seed(seed)
    reference = ConditionedField(cfg, latent_dim)
    # Larger biases than nn.Linear's default, so the density head sees both signs and ReLUs switch.
    with torch.no_grad():
        for p in reference.parameters():
            p.mul_(2.0)
    field = TaichiField(cfg, latent_dim)
    field.load_state_dict(reference.state_dict())
    return reference, field


def inputs(n: int, latent_dim: int, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 3, generator=g) * 4 - 2, torch.randn(n, latent_dim, generator=g)


def compare(reference: ConditionedField, field: TaichiField, n: int) -> None:
    """Values and gradients (every parameter, latents) from the same random upstream gradients."""
    points, latents = inputs(n, reference.latent_dim)
    g = torch.Generator().manual_seed(2)
    up_sigma, up_rgb = torch.randn(n, generator=g), torch.randn(n, 3, generator=g)
    results = []
    for module in (reference, field):
        module.zero_grad()
        lat = latents.clone().requires_grad_()
        sigma, rgb = module(points, lat)
        torch.autograd.backward([sigma, rgb], [up_sigma, up_rgb])
        grads = {name: p.grad.clone() for name, p in module.named_parameters()}
        results.append((sigma.detach(), rgb.detach(), lat.grad.clone(), grads))
    (ref_sigma, ref_rgb, ref_lat, ref_grads), (sigma, rgb, lat_grad, grads) = results
    assert sigma.shape == (n,) and rgb.shape == (n, 3)
    assert_close(sigma, ref_sigma, "sigma")
    assert_close(rgb, ref_rgb, "rgb")
    assert_close(lat_grad, ref_lat, "d latents")
    assert grads.keys() == ref_grads.keys()
    for name in ref_grads:
        assert_close(grads[name], ref_grads[name], f"d {name}")


def test_cpu_preset_matches_torch(arch):
    reference, field = make_pair(FieldConfig.cpu(), 64)
    compare(reference, field, 1000)


@pytest.mark.parametrize("n", [1, 333])
def test_odd_shape_whole_mode_matches_torch(arch, n):
    cfg = FieldConfig(depth=3, width=24, latent_mode="whole")
    reference, field = make_pair(cfg, 10, seed=3)
    compare(reference, field, n)


def test_uneven_chunks_without_input_matches_torch(arch):
    """10 latent values over 3 layers: chunks 4, 3, 3; no raw xyz in the encoding."""
    cfg = FieldConfig(depth=3, width=24, n_frequencies=2, include_input=False)
    reference, field = make_pair(cfg, 10, seed=4)
    compare(reference, field, 257)


def test_state_dict_round_trip():
    cfg = FieldConfig(depth=3, width=24, latent_mode="whole")
    reference = ConditionedField(cfg, 10)
    field = TaichiField(cfg, 10)
    field.load_state_dict(reference.state_dict())
    assert list(field.state_dict()) == list(reference.state_dict())
    back = ConditionedField(cfg, 10)
    back.load_state_dict(field.state_dict())
    for name, value in reference.state_dict().items():
        assert torch.equal(back.state_dict()[name], value), name


def test_no_latent_gradient_when_not_required(arch):
    _, field = make_pair(FieldConfig(depth=2, width=16), 8)
    points, latents = inputs(50, 8)
    sigma, rgb = field(points, latents)
    (sigma.sum() + rgb.sum()).backward()
    assert latents.grad is None
    assert all(p.grad is not None for p in field.parameters())


def test_dense_layer_and_encoding_match_torch(arch):
    """The generic kernels alone: a 2-segment relu layer, its backward, and the encoding."""
    g = torch.Generator().manual_seed(5)
    a, b = torch.randn(37, 5, generator=g), torch.randn(37, 9, generator=g)
    weight, bias = torch.randn(6, 7, generator=g), torch.randn(6, generator=g)
    y, _ = dense_forward([Segment(a, 1, 3), Segment(b, 5)], weight, bias, "relu")
    x = torch.cat([a[:, 1:4], b[:, 5:]], dim=1).requires_grad_()
    w, bb = weight.clone().requires_grad_(), bias.clone().requires_grad_()
    expected = torch.relu(x @ w.T + bb)
    assert_close(y, expected.detach(), "dense y")
    dy = torch.randn(37, 6, generator=g)
    expected.backward(dy)
    dx, dw, db = dense_backward(x.detach(), weight, y, dy, "relu")
    assert_close(dx, x.grad, "dense dx")
    assert_close(dw, w.grad, "dense dW")
    assert_close(db, bb.grad, "dense db")
    # Heads: softplus on both sides of its threshold (20) and far below zero; sigmoid.
    z = torch.linspace(-40, 40, 81)[:, None].requires_grad_()
    eye = torch.eye(1)
    for act, fn in (("softplus", torch.nn.functional.softplus), ("sigmoid", torch.sigmoid)):
        y, pre = dense_forward([Segment(z.detach())], eye, torch.zeros(1), act, keep_pre=True)
        expected = fn(z)
        assert torch.allclose(y, expected.detach(), rtol=1e-5, atol=0), act
        (dz,) = torch.autograd.grad(expected.sum(), z)
        dx, _, _ = dense_backward(z.detach(), eye, y, torch.ones(81, 1), act, pre)
        assert torch.allclose(dx, dz, rtol=1e-5, atol=1e-30), act
    points = torch.randn(11, 3, generator=g)
    assert_close(encode_positions(points, 4), positional_encoding(points, 4), "encoding", rtol=1e-6)


@pytest.mark.parametrize("mode", ["chunks", "whole"])
def test_one_code_per_ray_matches_torch(arch, mode):
    """The (R, S, 3) points with (R, L) codes form that models.render uses, both fields alike: values and
    every gradient, the codes' summed over each ray's samples in the kernel (``Segment.repeat``)."""
    reference, field = make_pair(FieldConfig(depth=3, width=16, latent_mode=mode), 8, seed=5)
    g = torch.Generator().manual_seed(6)
    points, codes = torch.rand(7, 5, 3, generator=g) * 4 - 2, torch.randn(7, 8, generator=g)
    up_sigma, up_rgb = torch.randn(7, 5, generator=g), torch.randn(7, 5, 3, generator=g)
    results = []
    for module in (reference, field):
        module.zero_grad()
        lat = codes.clone().requires_grad_()
        sigma, rgb = module(points, lat)
        torch.autograd.backward([sigma, rgb], [up_sigma, up_rgb])
        results.append((sigma.detach(), rgb.detach(), lat.grad.clone(),
                        {name: p.grad.clone() for name, p in module.named_parameters()}))
    (ref_sigma, ref_rgb, ref_lat, ref_grads), (sigma, rgb, lat_grad, grads) = results
    assert sigma.shape == (7, 5) and rgb.shape == (7, 5, 3) and lat_grad.shape == (7, 8)
    assert_close(sigma, ref_sigma, "sigma")
    assert_close(rgb, ref_rgb, "rgb")
    assert_close(lat_grad, ref_lat, "d codes")
    for name in ref_grads:
        assert_close(grads[name], ref_grads[name], f"d {name}")


@pytest.mark.parametrize("accumulate", [False, True])
def test_a_code_shared_by_thousands_of_samples_gets_its_summed_gradient(arch, accumulate):
    """dense_grad_input with a large ``repeat`` (one code read by every sample: fitting a photo's code
    through packed samples) sums per-row gradients by blocks: right on every arch (one thread looping
    over all 5,000 x 64 products stopped after 65,535 iterations on lavapipe and returned a wrong sum),
    into the given columns, added to what is there when asked."""
    from renderer.dense import DIRECT_REPEAT_MACS, dense_grad_input

    g = torch.Generator().manual_seed(8)
    grad_pre, weight = torch.randn(2 * 5000, 64, generator=g), torch.randn(64, 20, generator=g)
    assert 5000 * 64 > DIRECT_REPEAT_MACS  # the block-reduction path
    out = torch.randn(2, 12, generator=g)
    expected = out.clone()
    sums = (grad_pre @ weight[:, 5:13]).view(2, 5000, 8).sum(1)
    expected[:, 3:11] = expected[:, 3:11] + sums if accumulate else sums
    got = dense_grad_input(grad_pre, weight, 5, 8, out=out, out_start=3, accumulate=accumulate, repeat=5000)
    assert_close(got, expected, "summed gradient", rtol=1e-4)
