"""Benchmark: the field's forward + backward on packed samples (what skipping empty space evaluates), with
each sample's code row gathered (``field(points, latents[ray])``, the baseline) against one latent term
per ray added to its samples (``field(points, latents, ray=ray)``), same weights and samples, one run.

    python benchmarks/field_packed.py                      # cpu and paper presets
    python benchmarks/field_packed.py --presets cpu --rays 1024 --per-ray 17 --json field_packed.json

Each ray gets a random number of samples (uniform in 0 .. 2 x ``--per-ray``), back to back as
``models.skip_empty`` packs them; the codes get gradients, as in training. Repeats alternate the two
and medians are reported, with the largest relative difference of the outputs and gradients.
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

from common.atomic import write_json
from models.field import ConditionedField, FieldConfig

PRESETS = {"cpu": (FieldConfig.cpu, 32, 1024, 17), "paper": (FieldConfig.paper, 64, 256, 50)}
# preset: (field config, latent dim, rays, mean samples per ray)


def run_once(field, points, latents, ray, upstream, by_ray: bool) -> tuple[float, list[torch.Tensor]]:
    """Seconds for one forward + backward, and (sigma, rgb, grads of codes and parameters)."""
    codes = latents.detach().requires_grad_()
    params = [codes, *field.parameters()]
    start = time.perf_counter()
    sigma, rgb = field(points, codes, ray=ray) if by_ray else field(points, codes[ray])
    loss = (sigma * upstream[0]).sum() + (rgb * upstream[1]).sum()
    grads = torch.autograd.grad(loss, params)
    return time.perf_counter() - start, [sigma.detach(), rgb.detach(), *grads]


def measure(preset: str, n_rays: int | None, per_ray: int | None, repeats: int) -> dict:
    make_cfg, latent_dim, default_rays, default_per_ray = PRESETS[preset]
    n_rays, per_ray = n_rays or default_rays, per_ray or default_per_ray
    g = torch.Generator().manual_seed(0)
    field = ConditionedField(make_cfg(), latent_dim)
    counts = torch.randint(0, 2 * per_ray + 1, (n_rays,), generator=g)
    ray = torch.repeat_interleave(torch.arange(n_rays), counts)
    n = int(ray.shape[0])
    points = torch.randn(n, 3, generator=g)
    latents = torch.randn(n_rays, latent_dim, generator=g)
    upstream = (torch.randn(n, generator=g), torch.randn(n, 3, generator=g))
    times: dict[str, list[float]] = {"per-sample codes": [], "ray index": []}
    outputs = {}
    for i in range(repeats + 1):  # the first round warms up
        for name, by_ray in (("per-sample codes", False), ("ray index", True)):
            seconds, outputs[name] = run_once(field, points, latents, ray, upstream, by_ray)
            if i:
                times[name].append(seconds)
    diff = max(float((a - b).abs().max() / b.abs().max().clamp_min(1e-12))
               for a, b in zip(outputs["ray index"], outputs["per-sample codes"], strict=True))
    medians = {name: statistics.median(t) for name, t in times.items()}
    return {"preset": preset, "rays": n_rays, "samples": n, "latent_dim": latent_dim,
            "ms_median": {k: v * 1e3 for k, v in medians.items()},
            "speedup_ray_index": medians["per-sample codes"] / medians["ray index"],
            "max_relative_difference": diff}


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--presets", nargs="+", default=["cpu", "paper"], choices=sorted(PRESETS))
    parser.add_argument("--rays", type=int, default=None, help="rays (default: per preset, see PRESETS)")
    parser.add_argument("--per-ray", type=int, default=None, help="mean packed samples per ray")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--json", default=None, metavar="PATH")
    args = parser.parse_args(argv)
    results = []
    print(f"{'preset':<8}{'samples':>9}{'per-sample codes ms':>21}{'ray index ms':>14}{'speedup':>9}"
          f"{'max rel diff':>14}")
    for preset in args.presets:
        r = measure(preset, args.rays, args.per_ray, args.repeats)
        results.append(r)
        ms = r["ms_median"]
        print(f"{preset:<8}{r['samples']:>9}{ms['per-sample codes']:>21.1f}{ms['ray index']:>14.1f}"
              f"{r['speedup_ray_index']:>8.2f}x{r['max_relative_difference']:>14.1e}")
    if args.json:
        write_json(Path(args.json), {"machine": f"{platform.machine()} {platform.processor()}".strip(),
                                     "torch_threads": torch.get_num_threads(), "results": results})
    return results


if __name__ == "__main__":
    main()
