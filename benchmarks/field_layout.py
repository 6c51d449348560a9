"""Benchmark: the field's forward + backward with per-layer concatenation and per-sample latent copies
(the formulation before weight blocks, the baseline) against ``ConditionedField`` as it is now (weight
blocks, one code per ray), same weights, same rays, one run.

    python benchmarks/field_layout.py                          # cpu and paper presets
    python benchmarks/field_layout.py --presets cpu --rays 4096 --samples 64 --json layout.json

The baseline expands each ray's code to every sample (R x S x L floats) and concatenates
[hidden, latent chunk, encoding] before every layer, as ``models/field.py`` did until this change;
it is kept here, and only here, to measure against. Repeats are interleaved (baseline, blocks, ...)
and medians reported. Both are also compared with the baseline run in float64: a ReLU input within
rounding of zero can take the other branch in float32 (in the baseline too), so the weight-block error
must stay within ``--max-error-ratio`` times the baseline's own error (or below 1e-5), or the run fails.
"""

from __future__ import annotations

import argparse
import copy
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
from torch.nn import functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common.atomic import write_json
from models.field import ConditionedField, FieldConfig, positional_encoding

PRESETS = {"cpu": (FieldConfig.cpu, 2048, 64), "paper": (FieldConfig.paper, 512, 192)}  # cfg, rays, samples
LATENT_DIM = 64


def concatenated_forward(field: ConditionedField, points: torch.Tensor, ray_latents: torch.Tensor):
    """The baseline: per-sample codes, one concatenation per layer. (R, S, 3), (R, L) -> (R, S), (R, S, 3)."""
    n_rays, n_samples, _ = points.shape
    codes = ray_latents[:, None, :].expand(n_rays, n_samples, -1).reshape(n_rays * n_samples, -1)
    enc = positional_encoding(points.reshape(-1, 3), field.cfg.n_frequencies, field.cfg.include_input)
    hidden = None
    for layer, chunk in zip(field.layers, field.latent_chunks(codes), strict=True):
        parts = [chunk, enc] if hidden is None else [hidden, chunk, enc]
        hidden = F.relu(layer(torch.cat(parts, dim=-1)))
    sigma = F.softplus(field.density_head(hidden)).view(n_rays, n_samples)
    return sigma, torch.sigmoid(field.color_head(hidden)).view(n_rays, n_samples, 3)


def run_once(forward, field, points, latents, upstream) -> tuple[float, list[torch.Tensor]]:
    """Seconds for one forward + backward, and [sigma, rgb, d latents, d params...]."""
    latents = latents.clone().requires_grad_()
    start = time.perf_counter()
    sigma, rgb = forward(field, points, latents)
    grads = torch.autograd.grad([sigma, rgb], [latents, *field.parameters()], grad_outputs=upstream)
    return time.perf_counter() - start, [sigma.detach(), rgb.detach(), *grads]


def max_relative_diff(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    return max(float((x - y).abs().max() / y.abs().max().clamp_min(1e-12)) for x, y in zip(a, b, strict=True))


def measure(preset: str, n_rays: int, n_samples: int, repeats: int) -> dict:
    make_cfg, default_rays, default_samples = PRESETS[preset]
    n_rays, n_samples = n_rays or default_rays, n_samples or default_samples
    torch.manual_seed(0)
    field = ConditionedField(make_cfg(), LATENT_DIM)
    g = torch.Generator().manual_seed(1)
    points = torch.rand(n_rays, n_samples, 3, generator=g) * 4 - 2
    latents = torch.randn(n_rays, LATENT_DIM, generator=g) * 0.1
    upstream = [torch.randn(n_rays, n_samples, generator=g), torch.randn(n_rays, n_samples, 3, generator=g)]
    contenders = {"concatenated (baseline)": concatenated_forward,
                  "weight blocks": lambda f, p, z: f(p, z)}
    times = {name: [] for name in contenders}
    results = {}
    for _ in range(repeats + 1):  # the first round warms up and is dropped
        for name, forward in contenders.items():
            seconds, results[name] = run_once(forward, field, points, latents, upstream)
            times[name].append(seconds)
    medians = {name: statistics.median(t[1:]) for name, t in times.items()}
    base = medians["concatenated (baseline)"]
    return {"preset": preset, "rays": n_rays, "samples": n_samples, "latent_dim": LATENT_DIM,
            "median_ms": {k: 1e3 * v for k, v in medians.items()},
            "speedup_vs_baseline": {k: base / v for k, v in medians.items()},
            "error_vs_float64": float64_errors(field, points, latents, upstream, results)}


def float64_errors(field, points, latents, upstream, results: dict) -> dict[str, float]:
    """Each contender's largest relative difference from the baseline computed in float64."""
    exact = copy.deepcopy(field).double()
    _, truth = run_once(concatenated_forward, exact, points.double(), latents.double(),
                        [u.double() for u in upstream])
    return {name: max_relative_diff([r.double() for r in values], truth) for name, values in results.items()}


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--presets", nargs="+", default=["cpu", "paper"], choices=sorted(PRESETS))
    parser.add_argument("--rays", type=int, default=None, help="rays (default: per preset, see PRESETS)")
    parser.add_argument("--samples", type=int, default=None, help="samples per ray (default: per preset)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--max-error-ratio", type=float, default=4.0,
                        help="fail when the weight blocks' float64 error exceeds this times the baseline's")
    parser.add_argument("--json", default=None, metavar="PATH")
    args = parser.parse_args(argv)
    print(f"field forward + backward, torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"{platform.processor() or platform.machine()}")
    rows = []
    for preset in args.presets:
        row = measure(preset, args.rays, args.samples, args.repeats)
        rows.append(row)
        print(f"\n{preset}: {row['rays']} rays x {row['samples']} samples, latent {row['latent_dim']}")
        for name, ms in row["median_ms"].items():
            print(f"  {name:<26} {ms:9.1f} ms   x{row['speedup_vs_baseline'][name]:.2f}")
        errors = row["error_vs_float64"]
        print("  largest relative error against float64: "
              + ", ".join(f"{name} {value:.1e}" for name, value in errors.items()))
    if args.json:
        write_json(Path(args.json), {"machine": platform.platform(), "results": rows})
    for row in rows:
        errors = row["error_vs_float64"]
        allowed = max(args.max_error_ratio * errors["concatenated (baseline)"], 1e-5)
        if errors["weight blocks"] > allowed:
            raise SystemExit(f"{row['preset']}: the weight blocks' error against float64 is "
                             f"{errors['weight blocks']:.2e}, above {allowed:.2e}.")
    return rows


if __name__ == "__main__":
    main()
