"""Full-image rendering speed: rays/s at 256² through models.render_image on each Taichi arch, against the
plain-torch reference renderer measured in the same run (the baseline, ratio 1.0).

    python benchmarks/render.py                         # x64 and Vulkan, cpu-preset network, 256²
    python benchmarks/render.py --arch cpu --size 128 --repeats 5 --json render_bench.json
    python benchmarks/render.py --checkpoint runs/x/checkpoints/best.pt

Without --checkpoint the network is a freshly initialised (seeded) one of the chosen preset: speed does
not depend on the weights, only on the sizes. Runs are interleaved (baseline, arch, baseline, ...) so a
busy machine slows every contender alike; medians are reported. Each arch runs on its torch device
(``--arch cuda``: the network and tensors on the GPU, Taichi reading them in place; the others on the
CPU), and its baseline is the reference on that same device (``torch-reference`` on the CPU,
``torch-reference-cuda`` on the GPU).

    python benchmarks/render.py --arch cuda --preset paper --size 256
    python benchmarks/render.py --arch vulkan --field-backend taichi   # the field as Taichi kernels too
    python benchmarks/render.py --checkpoint CKPT --render-skip-empty off on   # empty-space skipping

With ``--field-backend taichi`` the field (and a background network) run as Taichi kernels, and on
Vulkan and Metal two contenders are timed: ``<arch>`` (``models.render_image``: every launch gets torch
tensors, which Taichi copies to the device and back) and ``<arch>-device``
(``models.device_render``: everything stays in ``ti.ndarray``s; what render.py, evaluate.py and fit.py
use there). Each reports the host <-> device bytes per image.

With ``--render-skip-empty off on`` (a trained checkpoint needed: a fresh network has no empty space)
each arch also renders through the class occupancy grid (``<arch>+skip-empty``: the checkpoint's grid,
or one estimated from the model, as ``render.py --render-skip-empty on``), interleaved with the dense
path, and the ratio of the two on the same arch is reported (``speedup_vs_dense``). With
``--field-backend taichi`` on Vulkan and Metal the device renderer does the same
(``<arch>-device+skip-empty``, ``models.device_skip``), against ``<arch>-device``.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import renderer
from export.cameras import default_intrinsics, look_at_origin
from models import ConditionedField, FieldConfig, RenderConfig, render_image
from models.background import ConstantBackground
from models.device_render import device_renderer, render_image_on_device, renders_on_device
from models.field_backend import as_backend, background_as_backend
from renderer import reference
from renderer.backend import TORCH_COPIES


def build_model(args: argparse.Namespace):
    """(field, background, latent, render config) from a checkpoint, or a seeded fresh network."""
    if args.checkpoint:
        from export.inference import load_model

        model = load_model(args.checkpoint)
        args.model = model  # for --render-skip-empty on
        return model.field, model.background, model.latents.mean(), model.render_config
    torch.manual_seed(0)
    field_cfg = FieldConfig.paper() if args.preset == "paper" else FieldConfig.cpu()
    render_cfg = RenderConfig.paper() if args.preset == "paper" else RenderConfig.cpu()
    latent_dim = 64 if args.preset == "paper" else 32
    field = ConditionedField(field_cfg, latent_dim).eval()
    latent = torch.randn(latent_dim, generator=torch.Generator().manual_seed(0)) * 0.1
    return field, ConstantBackground([1.0, 1.0, 1.0]), latent, render_cfg


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", nargs="+", default=["cpu", "vulkan"], help="Taichi arches to measure")
    parser.add_argument("--device", default="auto", choices=["auto", "cuda", "cpu"],
                        help="torch device for the network (default auto: cuda for --arch cuda, the CPU for "
                             "the others; cuda with --arch vulkan copies tensors around each kernel)")
    parser.add_argument("--size", type=int, default=256, help="image side in pixels")
    parser.add_argument("--repeats", type=int, default=3, help="timed renders per contender")
    parser.add_argument("--chunk", type=int, default=8192, help="rays per chunk")
    parser.add_argument(
        "--preset", default="cpu", choices=["cpu", "paper"], help="network size without --checkpoint"
    )
    parser.add_argument("--checkpoint", type=Path, help="time a trained model instead")
    parser.add_argument("--field-backend", default="torch", choices=["torch", "taichi"],
                        help="what evaluates the field: torch, or Taichi kernels (then also timed on the "
                             "device-resident path where the arch is Vulkan or Metal)")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--json", type=Path, help="write the results here")
    parser.add_argument("--render-skip-empty", nargs="+", choices=("off", "on"), default=["off"],
                        help="with --checkpoint: also render through the occupancy grid (on), beside the "
                             "dense path (off)")
    args = parser.parse_args(argv)
    if "on" in args.render_skip_empty and not args.checkpoint:
        parser.error("--render-skip-empty on needs --checkpoint (a fresh network has no empty space)")
    if args.threads:
        torch.set_num_threads(args.threads)

    field, background, latent, cfg = build_model(args)
    if args.field_backend == "taichi":
        field, background = as_backend(field, "taichi"), background_as_backend(background, "taichi")
    K = torch.as_tensor(default_intrinsics(args.size, args.size))
    w2c = torch.as_tensor(look_at_origin(7.0, yaw_deg=15.0))
    n_rays = args.size * args.size
    results: dict = {
        "size": args.size,
        "rays_per_image": n_rays,
        "samples_per_ray": cfg.n_coarse + cfg.n_fine,
        "field": dict(vars(field.cfg)),
        "field_backend": args.field_backend,
        "chunk": args.chunk,
        "machine": f"{platform.machine()} {platform.processor() or ''}".strip(),
        "torch_threads": torch.get_num_threads(),
        "contenders": {},
    }

    def time_once(fn) -> float:
        start = time.perf_counter()
        fn()
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            torch.cuda.synchronize()  # render_image returns once queued; CUDA finishes asynchronously
        return time.perf_counter() - start

    def baseline() -> None:
        render_image(field, background, latent, K, w2c, args.size, args.size, cfg, chunk=args.chunk,
                     ops=reference)

    base_times: dict[str, list[float]] = {}
    for arch in args.arch:
        try:
            wanted = args.device if args.device != "auto" else ("cuda" if arch == "cuda" else "cpu")
            backend = renderer.init_backend(arch=arch, device=wanted, verbose=False)
        except (renderer.BackendUnavailableError, RuntimeError, ValueError) as err:
            results["contenders"][arch] = {"skipped": str(err)}
            print(f"{arch}: skipped ({err})")
            continue
        device = backend.device
        field, background, latent = field.to(device), background.to(device), latent.to(device)
        reference_name = "torch-reference" if device.type == "cpu" else f"torch-reference-{device.type}"
        if reference_name not in base_times:
            base_times[reference_name] = []
            time_once(baseline)  # warm-up (allocator, first-call overheads)

        def taichi_render(field=field, background=background, latent=latent) -> None:
            render_image(field, background, latent, K, w2c, args.size, args.size, cfg, chunk=args.chunk)

        def device_render(field=field, background=background, latent=latent) -> None:
            render_image_on_device(field, background, latent, K, w2c, args.size, args.size, cfg,
                                   chunk=args.chunk)  # fmt: skip

        contenders = {arch: taichi_render}
        if renders_on_device(field, background):
            contenders[f"{arch}-device"] = device_render
        occupancy = None
        if "on" in args.render_skip_empty:
            from export.inference import use_skip_empty

            print(f"{arch}: {use_skip_empty(args.model, 'on')}")
            occupancy, skip_cfg = args.model.occupancy, args.model.render_config

            def skip_render(field=field, background=background, latent=latent, skip_cfg=skip_cfg,
                            occupancy=occupancy) -> None:
                render_image(field, background, latent, K, w2c, args.size, args.size, skip_cfg,
                             chunk=args.chunk, occupancy=occupancy)

            def device_skip_render(field=field, background=background, latent=latent, skip_cfg=skip_cfg,
                                   occupancy=occupancy) -> None:
                render_image_on_device(field, background, latent, K, w2c, args.size, args.size, skip_cfg,
                                       chunk=args.chunk, occupancy=occupancy)

            render_image(field, background, latent, K, w2c, 16, 16, skip_cfg, chunk=args.chunk,
                         occupancy=occupancy)  # compile kernels
            contenders[f"{arch}+skip-empty"] = skip_render
            if renders_on_device(field, background):  # the device renderer through the grid
                render_image_on_device(field, background, latent, K, w2c, 16, 16, skip_cfg, chunk=args.chunk,
                                       occupancy=occupancy)  # fmt: skip
                contenders[f"{arch}-device+skip-empty"] = device_skip_render
        times: dict[str, list[float]] = {name: [] for name in contenders}
        copied: dict[str, int] = {}
        for name, fn in contenders.items():  # compile the kernels, then count one image's copies
            render_image(field, background, latent, K, w2c, 16, 16, cfg, chunk=args.chunk)
            render_image_on_device(field, background, latent, K, w2c, 16, 16, cfg, chunk=args.chunk)
            log = None
            if name.endswith("-device"):
                log = device_renderer(field, background, cfg).transfers
            elif name.endswith("-device+skip-empty"):
                log = device_renderer(field, background, skip_cfg, occupancy).transfers
            before = TORCH_COPIES.bytes + (log.uploaded + log.downloaded if log else 0)
            fn()
            copied[name] = TORCH_COPIES.bytes + (log.uploaded + log.downloaded if log else 0) - before
        for _ in range(args.repeats):
            base_times[reference_name].append(time_once(baseline))
            for name, fn in contenders.items():
                times[name].append(time_once(fn))
        for name in contenders:
            median = statistics.median(times[name])
            results["contenders"][name] = {"median_s": median, "rays_per_s": n_rays / median,
                                           "times_s": times[name], "device": str(device),
                                           "baseline": reference_name, "bytes_copied_per_image": copied[name]}
        if occupancy is not None:
            for dense_name in (arch, f"{arch}-device"):
                skip = results["contenders"].get(f"{dense_name}+skip-empty")
                if skip is not None:
                    dense_s = results["contenders"][dense_name]["median_s"]
                    skip["speedup_vs_dense"] = dense_s / skip["median_s"]
                    skip["occupied_fraction"] = occupancy.grid.occupied_fraction()
        if device.type == "cuda":
            results["gpu"] = torch.cuda.get_device_name(device)
    if not base_times:  # nothing ran: still time the CPU reference once
        base_times["torch-reference"] = [time_once(baseline)]
    for name, times in base_times.items():
        base = statistics.median(times)
        results["contenders"][name] = {"median_s": base, "rays_per_s": n_rays / base, "times_s": times}
    for name, entry in results["contenders"].items():
        if "median_s" in entry:
            base = results["contenders"][entry.get("baseline", name)]["median_s"]
            entry["speedup_vs_reference"] = base / entry["median_s"]

    print(
        f"full-image render {args.size}x{args.size} ({n_rays} rays, "
        f"{results['samples_per_ray']} samples/ray), "
        f"median of {args.repeats}"
    )
    print(f"{'renderer':<26}{'median s':>10}{'rays/s':>12}{'vs reference':>14}{'MB copied':>11}"
          f"{'vs dense':>10}")
    for name, entry in results["contenders"].items():
        if "median_s" in entry:
            copied = entry.get("bytes_copied_per_image")
            megabytes = f"{copied / 1e6:>11.2f}" if copied is not None else f"{'':>11}"
            dense = f"{entry['speedup_vs_dense']:>9.2f}x" if "speedup_vs_dense" in entry else ""
            print(f"{name:<26}{entry['median_s']:>10.3f}{entry['rays_per_s']:>12.0f}"
                  f"{entry['speedup_vs_reference']:>13.2f}x{megabytes}{dense}")
    if args.json:
        from common.atomic import write_json

        write_json(args.json, results)
    return results


if __name__ == "__main__":
    main()
