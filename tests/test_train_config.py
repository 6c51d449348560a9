"""models.train_config: one typed TrainConfig, JSON only at config.json and checkpoints, checkpoints of
earlier versions still load, and --help generated from each field's declaration."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch

from models.train_config import SECTIONS, TrainConfig, build_parser, flag_name, resolve_config

# config.json / a checkpoint's "config" as train.py wrote it before TrainConfig (the cpu preset, with the
# decay resolved to the run's length), copied from a run of that code.
OLD_CPU_CONFIG = json.loads("""{"data": {"dataset": "synthetic", "data_root": "", "cache": "",
 "resolution": 64, "synthetic_identities": 64}, "run": {"steps": 1000, "seed": 0, "log_every": 25,
 "preview_every": 250, "preview_identities": 4, "checkpoint_every": 250, "keep_last": 3,
 "max_bad_steps": 20}, "field": {"depth": 4, "width": 64, "n_frequencies": 4, "include_input": true,
 "latent_mode": "chunks"}, "background": {"depth": 2, "width": 32, "n_frequencies": 4,
 "include_input": true}, "latent": {"dim": 32, "init_std": 0.0, "optimizer": "adam", "lr": null,
 "lr_scale": 10.0, "momentum": 0.0}, "render": {"n_coarse": 32, "n_fine": 32, "radius": 2.0},
 "loss": {"rgb": 1.0, "mask": 1.0, "hard": 0.1}, "optim": {"lr_init": 0.002, "lr_final": 0.0005,
 "decay_steps": 1000, "beta1": 0.9, "beta2": 0.999}, "batch": {"identities": 16, "views": 2,
 "pixels": 32}, "preset": "cpu"}""")


def cpu_as_resolved() -> TrainConfig:
    config = TrainConfig.cpu()
    config.optim.decay_steps = config.run.steps
    return config


def test_every_section_is_a_dataclass_with_both_presets_and_every_field_is_documented():
    for name, cls in SECTIONS.items():
        assert dataclasses.is_dataclass(cls), name
        assert isinstance(cls.paper(), cls) and isinstance(cls.cpu(), cls), name
        for f in dataclasses.fields(cls):
            assert f.metadata.get("help", "").strip(), f"{cls.__name__}.{f.name} has no help"
    config = TrainConfig.cpu()
    assert all(isinstance(getattr(config, name), cls) for name, cls in SECTIONS.items())


def test_json_round_trip_and_the_format_is_what_earlier_versions_wrote():
    config = cpu_as_resolved()
    written = config.to_json()
    # config.json and checkpoints keep their format; the only keys added since are the skip-empty
    # settings (issue 12), which an older dict lacks and from_json fills from the preset, except skip_empty
    # itself: such a run rendered every sample, so it reads as off (the presets have it on).
    added = {"skip_empty", "early_stop_eps", "occupancy_resolution", "occupancy_every", "occupancy_warmup",
             "occupancy_codes", "occupancy_fraction"}
    assert set(written["render"]) - set(OLD_CPU_CONFIG["render"]) == added
    written["render"] = {k: v for k, v in written["render"].items() if k not in added}
    assert written == OLD_CPU_CONFIG
    assert TrainConfig.from_json(json.loads(json.dumps(config.to_json()))) == config
    dense = dataclasses.replace(config, render=dataclasses.replace(config.render, skip_empty=False))
    assert config.render.skip_empty and TrainConfig.from_json(OLD_CPU_CONFIG) == dense


def test_from_json_fills_what_an_older_dict_lacks_from_its_preset_and_ignores_unknown_fields():
    partial = {"preset": "cpu", "run": {"steps": 7}, "loss": {"hard": 0.3, "retired_term": 1.0}}
    config = TrainConfig.from_json(partial)
    assert config.run.steps == 7 and config.loss.hard == 0.3
    assert config.field == TrainConfig.cpu().field and config.run.seed == 0
    assert TrainConfig.from_json({}) == TrainConfig.paper()


def test_with_values_copies_and_never_shares_a_section():
    base = TrainConfig.cpu()
    changed = base.with_values({("run", "steps"): 5, ("loss", "mask"): 0.0})
    assert (changed.run.steps, changed.loss.mask) == (5, 0.0)
    assert (base.run.steps, base.loss.mask) == (1000, 1.0)
    assert changed.field is not base.field
    with pytest.raises(KeyError):
        base.with_values({("nonsense", "x"): 1})


def test_resolve_config_gives_a_typed_config_with_the_decay_over_the_run():
    args = build_parser().parse_args(["--steps", "30", "--loss-hard", "0.2", "--field-latent-mode", "whole"])
    config, overrides, preset = resolve_config(args, "cpu")
    assert isinstance(config, TrainConfig) and preset == "cpu" == config.preset
    assert overrides == {("run", "steps"): 30, ("loss", "hard"): 0.2, ("field", "latent_mode"): "whole"}
    assert config.optim.decay_steps == 30 and config.loss.hard == 0.2 and config.field.latent_mode == "whole"
    given = build_parser().parse_args(["--steps", "30", "--optim-decay-steps", "10"])
    assert resolve_config(given, "cpu")[0].optim.decay_steps == 10


def test_help_is_generated_from_the_field_declarations():
    text = "".join(build_parser().format_help().split())  # argparse wraps lines: compare without spaces
    cpu, paper = TrainConfig.cpu(), TrainConfig.paper()
    for name, cls in SECTIONS.items():
        for f in dataclasses.fields(cls):
            defaults = f"cpu:{cpu.value(name, f.name)!r},paper:{paper.value(name, f.name)!r}"
            entry = f"{flag_name(name, f.name)}V{f.metadata['help']};{defaults}"
            assert "".join(entry.split()) in text, flag_name(name, f.name)
    # what --optim-decay-steps means when it is not given
    assert "none(thedefault)meanstherun's--steps,fixedwhentherunstarts" in text


def test_a_checkpoint_written_before_trainconfig_loads_and_renders_the_same(tmp_path, keep_taichi_arch):
    from export.inference import (
        load_model,
        render_view,
        start_renderer,
        training_cache,
        training_losses,
        training_resolution,
    )
    from models import ConstantBackground, LatentTable, RenderConfig, render_image
    from models.checkpoint import checkpoint_payload, save_checkpoint
    from models.field import ConditionedField, FieldConfig

    start_renderer("cpu")
    torch.manual_seed(3)
    field = ConditionedField(FieldConfig(**OLD_CPU_CONFIG["field"]), OLD_CPU_CONFIG["latent"]["dim"])
    background = ConstantBackground([1.0, 1.0, 1.0])
    latents = LatentTable(4, OLD_CPU_CONFIG["latent"]["dim"], init_std=0.5,
                          generator=torch.Generator().manual_seed(1))
    opt = torch.optim.Adam(field.parameters())
    payload = checkpoint_payload(field=field, background=background, latents=latents,
                                 optimizers={"networks": opt},
                                 schedulers={"networks": torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1)},
                                 step=9, rng={}, config=TrainConfig(), fingerprint="f" * 40)
    old = {**OLD_CPU_CONFIG, "data": {**OLD_CPU_CONFIG["data"], "cache": str(tmp_path / "cache")}}
    payload["config"] = old  # the dict exactly as the earlier train.py put it into checkpoints
    path = save_checkpoint(tmp_path / "old.pt", payload)

    model = load_model(path)
    assert model.config == TrainConfig.from_json(old) and model.config.preset == "cpu"
    # What the old dict holds, and the cpu preset's value for what it lacks (the skip-empty settings;
    # skipping itself off: the old run rendered every sample).
    saved_render = dataclasses.replace(RenderConfig.cpu(), n_coarse=32, n_fine=32, radius=2.0,
                                       skip_empty=False)
    assert model.render_config == saved_render == model.config.render and not saved_render.skip_empty
    assert training_cache(model) == tmp_path / "cache" and training_resolution(model) == 64
    assert training_losses(model) == model.config.loss
    from export.cameras import default_intrinsics, look_at_origin

    K, w2c = default_intrinsics(8, 8), look_at_origin(7.0)
    z = model.latents.codes[2]
    view = render_view(model, z, K, w2c, 8, 8)
    with torch.no_grad():
        expected = render_image(field.eval(), background, latents.codes[2].detach(), torch.as_tensor(K),
                                torch.as_tensor(w2c), 8, 8, RenderConfig(**old["render"]))
    for key in ("color", "opacity", "depth"):
        assert np.array_equal(view[key], expected[key].numpy().astype(np.float32)), key
