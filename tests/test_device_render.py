"""Whole images rendered on the Taichi device (models.device_render), on x64 and Vulkan.

``DeviceRenderer.render_image`` must give the image ``models.render_image`` gives with the same Taichi
field (the same samples at bin centres, the same kernels), follow the parameters when torch changes
them, and on Vulkan keep the work on the device: no torch tensor reaches a kernel, and only the pixel
indices, the camera, the code and (once) the parameters go in.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from common.conventions import default_intrinsics, orbit_camera
from models.background import BackgroundConfig, ConstantBackground
from models.device_render import DeviceRenderer, device_renderer, render_image_on_device, renders_on_device
from models.field import FieldConfig
from models.render import RenderConfig, render_image
from models.taichi_background import TaichiBackground
from models.taichi_field import TaichiField
from renderer.specs import PER_RAY

LATENT, SIZE = 8, 20


def _models(background: str):
    torch.manual_seed(0)
    field = TaichiField(FieldConfig(depth=3, width=32, n_frequencies=4), LATENT)
    with torch.no_grad():  # a density that puts a visible blob in the image, so colours and depth vary
        field.parameter_list()[-1].add_(0.5)
    bg = (TaichiBackground(BackgroundConfig(depth=2, width=16), LATENT) if background == "network"
          else ConstantBackground([0.2, 0.5, 1.0]))
    return field, bg


def _camera():
    K = torch.from_numpy(np.asarray(default_intrinsics(SIZE, SIZE), np.float32))
    w2c = torch.from_numpy(np.asarray(orbit_camera(25.0, -10.0), np.float32))
    return K, w2c


def _assert_same(a: dict, b: dict) -> None:
    for key in ("color", "opacity", "depth"):
        assert a[key].shape == b[key].shape, key
        # Same float32 kernels on the same inputs; only the order of float sums inside a dense layer's
        # tiles may differ between the tensor and the ndarray instantiation.
        assert torch.allclose(a[key], b[key], atol=2e-5, rtol=1e-5), (key, (a[key] - b[key]).abs().max())


@pytest.mark.parametrize("background", ["network", "constant"])
@pytest.mark.parametrize("n_fine", [0, 12])
def test_the_device_renderer_renders_render_images_image(arch, request, background, n_fine):
    field, bg = _models(background)
    cfg = RenderConfig(n_coarse=16, n_fine=n_fine)
    K, w2c = _camera()
    code = torch.linspace(-0.5, 0.5, LATENT)
    expected = render_image(field, bg, code, K, w2c, SIZE, SIZE, cfg, chunk=128)

    launched = request.getfixturevalue("forbid_torch_launches")
    device = DeviceRenderer(field, bg, cfg)
    got = device.render_image(code, K, w2c, SIZE, SIZE, chunk=128)  # 400 pixels: the last chunk padded
    assert {"dense_forward", "composite_forward"} <= set(launched)
    _assert_same(got, expected)
    assert expected["opacity"].max() > 0.2 and expected["opacity"].min() < expected["opacity"].max() - 0.1

    n_params = sum(p.numel() for p in field.parameter_list()) + sum(p.numel() for p in bg.parameters())
    n_params += 3 if background == "constant" else 0  # its colour
    pixels = 4 * 100  # 400 pixels in 4 balanced chunks of 100
    assert device.transfers.uploaded == 4 * (n_params + 9 + 12 + LATENT + 2 * pixels)
    assert device.transfers.downloaded == 4 * PER_RAY * pixels


def test_the_device_renderer_follows_parameter_changes(arch):
    field, bg = _models("network")
    cfg = RenderConfig(n_coarse=16, n_fine=8)
    K, w2c = _camera()
    code = torch.zeros(LATENT)
    device = DeviceRenderer(field, bg, cfg)
    device.render_image(code, K, w2c, SIZE, SIZE)
    uploaded = device.transfers.uploaded
    device.render_image(code, K, w2c, SIZE, SIZE)  # unchanged parameters are not sent again
    assert device.transfers.uploaded - uploaded < 4 * 1000
    with torch.no_grad():  # as an optimiser step or load_state_dict would
        field.parameter_list()[0].mul_(1.5)
        bg.parameter_list()[-1].add_(0.3)
    _assert_same(device.render_image(code, K, w2c, SIZE, SIZE), render_image(field, bg, code, K, w2c, SIZE,
                                                                             SIZE, cfg))  # fmt: skip


def test_render_image_on_device_goes_to_the_device_on_vulkan_only(arch):
    field, bg = _models("constant")
    cfg = RenderConfig(n_coarse=16, n_fine=8)
    K, w2c = _camera()
    code = torch.zeros(LATENT)
    assert renders_on_device(field, bg) == (arch == "vulkan")
    assert not renders_on_device(torch.nn.Linear(2, 2), bg)  # the torch field: render_image itself
    _assert_same(render_image_on_device(field, bg, code, K, w2c, SIZE, SIZE, cfg),
                 render_image(field, bg, code, K, w2c, SIZE, SIZE, cfg))


def test_one_renderer_is_kept_and_reused_for_the_same_model(arch):
    field, bg = _models("constant")
    cfg = RenderConfig(n_coarse=16, n_fine=8)
    first = device_renderer(field, bg, cfg)
    assert device_renderer(field, bg, RenderConfig(n_coarse=16, n_fine=8)) is first
    other_field, _ = _models("constant")
    assert device_renderer(other_field, bg, cfg) is not first
    assert device_renderer(field, bg, RenderConfig(n_coarse=8, n_fine=8)) is not first


def test_a_renderer_outlives_a_restart_of_taichi(arch):
    """A restart invalidates every ndarray; a renderer someone holds makes its buffers again."""
    from conftest import _start

    from renderer.backend import runtime_generation

    field, bg = _models("network")
    cfg = RenderConfig(n_coarse=16, n_fine=8)
    K, w2c = _camera()
    code = torch.zeros(LATENT)
    device = DeviceRenderer(field, bg, cfg)
    before = device.render_image(code, K, w2c, SIZE, SIZE)
    generation = runtime_generation()
    _start(arch)
    assert runtime_generation() != generation
    _assert_same(device.render_image(code, K, w2c, SIZE, SIZE), before)


@pytest.mark.parametrize("n_fine", [0, 12])
def test_the_device_renderer_skips_empty_space_as_render_image_does(arch, request, monkeypatch, n_fine):
    """Through an occupancy grid (models.device_skip): the image render_image renders with the same grid,
    with fewer field evaluations than the dense image, one shared code read by every packed sample, and
    no torch tensor reaching a kernel."""
    from models.skip_empty import ClassOccupancy, SkipStats

    field, bg = _models("network")
    cfg = RenderConfig(n_coarse=16, n_fine=n_fine, occupancy_resolution=16, early_stop_eps=1e-3)
    occupancy = ClassOccupancy(cfg)
    # A ball of radius 1 occupied (dilated), empty space around it (this random field is dense
    # everywhere, so its own grid would skip nothing).
    occupancy.grid.update(lambda p: (p.norm(dim=1) < 1.0).float() * 100.0, fraction=1.0)
    assert 0.05 < occupancy.grid.occupied_fraction() < 0.5
    code = torch.linspace(-0.5, 0.5, LATENT)
    K, w2c = _camera()
    # Chunks of 100 rays on both sides (the device renderer balances 128 into 4 x 100), so that both
    # report the same last chunk's kept samples.
    expected = render_image(field, bg, code, K, w2c, SIZE, SIZE, cfg, chunk=100, occupancy=occupancy)
    expected_stats = dict(SkipStats.last)

    launched = request.getfixturevalue("forbid_torch_launches")
    device = DeviceRenderer(field, bg, cfg, occupancy)
    got = device.render_image(code, K, w2c, SIZE, SIZE, chunk=128)
    assert {"occupancy_march", "pack_kept", "composite_packed"} <= set(launched)
    _assert_same(got, expected)
    assert device.forward_pass.last_stats == pytest.approx(expected_stats)  # the last chunk's
    assert expected_stats["field_per_ray"] < 0.8 * expected_stats["dense_per_ray"]
    # render_image_on_device takes the grid on Vulkan and Metal, and gives the same image everywhere.
    monkeypatch.undo()  # on x64 it is render_image, on torch tensors
    via = render_image_on_device(field, bg, code, K, w2c, SIZE, SIZE, cfg, chunk=128, occupancy=occupancy)
    _assert_same(via, expected)
    # A grid that changed since (an update during training) is the one the next image marches.
    occupancy.grid.update(lambda p: (p.norm(dim=1) < 0.5).float() * 100.0, fraction=1.0, reset=True)
    _assert_same(device.render_image(code, K, w2c, SIZE, SIZE, chunk=128),
                 render_image(field, bg, code, K, w2c, SIZE, SIZE, cfg, chunk=128, occupancy=occupancy))
