"""One command that checks and measures the CUDA (and NVIDIA Vulkan) path on a GPU machine, in under 8 min.

    python benchmarks/gpu_check.py --out runs/gpu_check --wheels WHEELS --vulkan-debs DEBS

On a machine with an NVIDIA GPU (Python 3.12, CUDA torch, numpy, scipy, scikit-image, OpenCV, tqdm, rich
and pytest installed; no network; taichi possibly absent), it:

1. installs the taichi 1.7.4 and dill wheels from ``--wheels`` offline into a temporary prefix
   (``pip install --no-index --no-deps --target``) when taichi cannot be imported (and a colorama wheel
   there when colorama is missing), then checks that taichi imports;
2. unpacks the ``.deb`` files of ``--vulkan-debs`` (Debian's ``libvulkan1`` and the libraries NVIDIA's
   Vulkan driver loads) with ``dpkg-deb -x`` when the machine has no Vulkan loader, and points
   ``VK_ICD_FILENAMES`` / ``VK_DRIVER_FILES`` at NVIDIA's ICD file where the driver keeps it;
3. prepares 64 synthetic heads at 256² and trains the paper preset for 200 steps on CUDA on them,
   checking that PSNR rises (first, so that a slow later stage never crowds out this quality check);
4. runs the renderer test files with the ``arch`` fixture on ``cuda`` (LOLNERF_REQUIRE_CUDA=1), and on
   ``vulkan`` when an NVIDIA Vulkan device is found (it says which);
5. runs ``benchmarks/renderer.py`` at 4,096 × 192 and 65,536 × 192 rays (Taichi against the torch
   reference on the same GPU), ``benchmarks/train_step.py`` with the paper preset, and
   ``benchmarks/render.py`` at 256², on CUDA and, when present, on Vulkan (torch on the GPU beside it);
6. writes ``gpu_check.json`` and ``gpu_check.md`` into ``--out``; exits 1 if any stage failed (or was cut
   by the time budget), 2 for a bad argument.

Every stage is a subprocess with its own time limit (``STAGE_BUDGETS_S``), inside an overall budget
(``--budget`` seconds, default 450) so that the whole check stays under 8 minutes. On a machine without
an NVIDIA GPU that torch can use, it checks its arguments and imports, says so in one line and exits 0.

Nothing here needs MediaPipe or loads ``pose/``'s code: the stages import the renderer, models, the
synthetic dataset and the benchmarks; of ``pose/`` only its settings dataclass (``pose.config``, which
``PrepareConfig`` embeds; ``pose/__init__`` imports its names on first use) is loaded
(tests/test_gpu_check.py blocks mediapipe and checks both).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
REQUIRED_MODULES = ("torch", "numpy", "scipy", "skimage", "cv2", "tqdm", "rich", "pytest")
TAICHI_WHEEL = re.compile(r"^taichi-1\.7\.4-.*\.whl$")
DILL_WHEEL = re.compile(r"^dill-.*\.whl$")
COLORAMA_WHEEL = re.compile(r"^colorama-.*\.whl$")  # taichi imports it; installed only when in --wheels
ICD_DIRS = (
    "/usr/share/vulkan/icd.d",
    "/etc/vulkan/icd.d",
    "/usr/local/share/vulkan/icd.d",
    "/usr/local/nvidia/share/vulkan/icd.d",
    "/usr/local/nvidia/icd.d",
    "/usr/share/glvnd/vulkan/icd.d",
)
# Where a container's NVIDIA driver keeps the library an ICD file names without a path (libGLX_nvidia).
DRIVER_LIB_DIRS = ("/usr/local/nvidia/lib64", "/usr/local/nvidia/lib", "/usr/lib/x86_64-linux-gnu")
EGL_VENDOR_DIRS = (
    "/usr/share/glvnd/egl_vendor.d",
    "/etc/glvnd/egl_vendor.d",
    "/usr/local/nvidia/share/glvnd/egl_vendor.d",
)
RENDERER_TESTS = (
    "tests/test_renderer.py",
    "tests/test_renderer_backend.py",
    "tests/test_taichi_field.py",
    "tests/test_taichi_background.py",
    "tests/test_field_backend.py",
    "tests/test_packed.py",  # empty-space skipping's kernels: on by default in training (issue 12)
    "tests/test_occupancy.py",
    "tests/test_device_skip.py",  # the same skipping on ti.ndarrays (the device-resident step)
)
# Seconds each stage may take at most (its subprocess is killed after that). They are caps, not
# estimates: the CUDA stages' caps sum to 445 s, inside the default --budget; the Vulkan ones run after
# them in what is left of it, and one that no longer fits is recorded as not run. The 200-step training
# (the one quality check) runs right after the cache, so a slow stage never crowds it out.
STAGE_BUDGETS_S = {
    "probe": 40,
    "cache": 90,
    "train-200-cuda": 90,
    "tests-cuda": 90,
    "renderer-cuda-4096": 25,
    "renderer-cuda-65536": 35,
    "train-step-cuda": 45,
    "render-cuda-256": 30,
    "tests-vulkan": 60,
    "renderer-vulkan-4096": 25,
    "renderer-vulkan-65536": 35,
    "train-step-vulkan": 45,
    "render-vulkan-256": 30,
    "device-skip-vulkan": 60,
}
DEFAULT_BUDGET_S = 450
SYNTHETIC_IDENTITIES = 64  # the paper batch takes 64 identities per step
TRAIN_STEPS = 200
LOG_EVERY = 20
MIN_PSNR_GAIN_DB = 0.5
RENDERER_GOAL_RATIO = 3.0
OUTSIDE_MLP_GOAL = 0.15


class CheckError(Exception):
    """A mistake in the arguments or the environment, said in one sentence."""


# ----- arguments and environment -------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="gpu_check.py", usage=argparse.SUPPRESS, description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, type=Path, help="folder for gpu_check.json, gpu_check.md "
                        "and the stages' logs (created if missing)")
    parser.add_argument("--wheels", type=Path, help="folder with the taichi 1.7.4 wheel and a dill wheel "
                        "for this Python, installed offline when taichi is not importable")
    parser.add_argument("--vulkan-debs", type=Path, help="folder with libvulkan1 (and the libraries NVIDIA's "
                        "Vulkan driver needs) as .deb files, unpacked when the machine has no Vulkan loader")
    parser.add_argument("--budget", type=float, default=DEFAULT_BUDGET_S, metavar="S",
                        help=f"overall time limit in seconds (default {DEFAULT_BUDGET_S})")
    return parser


def check_arguments(args: argparse.Namespace) -> None:
    """Raise CheckError naming the first unusable argument."""
    out = args.out
    if out.exists() and not out.is_dir():
        raise CheckError(f"--out {out} is a file; give a folder.")
    probe = out if out.exists() else next((p for p in out.parents if p.exists()), Path("."))
    if not os.access(probe, os.W_OK):
        raise CheckError(f"--out {out} cannot be written here ({probe} is not writable); choose another "
                         "folder.")
    if args.wheels is not None:
        if not args.wheels.is_dir():
            raise CheckError(f"--wheels {args.wheels} is not a folder; give the folder holding the taichi "
                             "1.7.4 and dill wheels.")
        names = [p.name for p in args.wheels.iterdir()]
        if not any(TAICHI_WHEEL.match(n) for n in names):
            raise CheckError(f"--wheels {args.wheels} holds no taichi-1.7.4-*.whl; download the wheel for "
                             "this Python (pip download taichi==1.7.4 --no-deps) into it.")
        if not any(DILL_WHEEL.match(n) for n in names):
            raise CheckError(f"--wheels {args.wheels} holds no dill-*.whl (taichi needs it); add it beside "
                             "the taichi wheel.")
    if args.vulkan_debs is not None:
        if not args.vulkan_debs.is_dir():
            raise CheckError(f"--vulkan-debs {args.vulkan_debs} is not a folder; give the folder holding "
                             "libvulkan1_*.deb.")
        if not any(args.vulkan_debs.glob("libvulkan1_*.deb")):
            raise CheckError(f"--vulkan-debs {args.vulkan_debs} holds no libvulkan1_*.deb; apt-get download "
                             "libvulkan1 into it.")
    if not args.budget > 0:
        raise CheckError(f"--budget {args.budget:g} must be a positive number of seconds.")


def missing_modules(names=None) -> list[str]:
    """The modules of ``names`` (default REQUIRED_MODULES) that this Python cannot import (found without
    importing them).

    >>> missing_modules(["json", "no_such_module_here"])
    ['no_such_module_here']
    """
    return [name for name in (REQUIRED_MODULES if names is None else names)
            if importlib.util.find_spec(name) is None]


def nvidia_gpu() -> str | None:
    """The name of the CUDA GPU torch can use (not a ROCm one), or None."""
    import torch

    if getattr(torch.version, "hip", None) or not torch.cuda.is_available():
        return None
    return torch.cuda.get_device_name(0)


def install_wheels(wheels: Path, prefix: Path, python: str = sys.executable) -> list[str]:
    """Install the taichi 1.7.4 and dill wheels of ``wheels`` into ``prefix`` offline; returns their names.

    ``pip install --no-index --no-deps --target``: nothing is fetched, nothing outside ``prefix`` changes
    (taichi's other needs, numpy and rich, are expected installed; colorama too, unless its wheel is in
    ``wheels``). Then ``import taichi`` is tried with ``prefix`` on the path. Raises CheckError when pip
    fails or times out, or taichi still does not import.
    """
    wanted = (TAICHI_WHEEL, DILL_WHEEL) + ((COLORAMA_WHEEL,) if importlib.util.find_spec("colorama") is None
                                           else ())  # fmt: skip
    files = sorted(p for p in wheels.iterdir() if any(w.match(p.name) for w in wanted))
    command = [python, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile",
               "--disable-pip-version-check", "--target", str(prefix), *map(str, files)]
    names = ", ".join(p.name for p in files)
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=120)
    except subprocess.TimeoutExpired as err:
        raise CheckError(f"pip did not finish installing {names} within 120 s.") from err
    if done.returncode != 0:
        last = (done.stderr.strip().splitlines() or ["no output"])[-1]
        raise CheckError(f"pip could not install {names} offline: {last}")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(prefix), os.environ.get("PYTHONPATH", "")]))
    try:
        check = subprocess.run([python, "-c", "import taichi"], capture_output=True, text=True, timeout=120,
                               env=env)
    except subprocess.TimeoutExpired as err:
        raise CheckError("taichi was installed but did not import within 120 s.") from err
    if check.returncode != 0:
        last = (check.stderr.strip().splitlines() or ["no output"])[-1]
        raise CheckError(f"taichi was installed from {wheels} but does not import: {last} (add the wheel "
                         "of the missing module to --wheels).")
    return [p.name for p in files]


def vulkan_loader_present(extra_dirs: list[Path] = ()) -> bool:
    """True when ``libvulkan.so.1`` is known to the dynamic linker (ldconfig) or lies in ``extra_dirs``."""
    if any((Path(d) / "libvulkan.so.1").exists() for d in extra_dirs):
        return True
    try:
        listing = subprocess.run(["ldconfig", "-p"], capture_output=True, text=True, timeout=20).stdout
    except (OSError, subprocess.TimeoutExpired):
        listing = ""
    return "libvulkan.so.1" in listing


def unpack_debs(debs: Path, dest: Path) -> list[Path]:
    """``dpkg-deb -x`` every ``.deb`` of ``debs`` into ``dest``; returns the folders holding shared
    libraries (for LD_LIBRARY_PATH). Raises CheckError when dpkg-deb is missing or fails."""
    if shutil.which("dpkg-deb") is None:
        raise CheckError("dpkg-deb is not installed, so --vulkan-debs cannot be unpacked; install dpkg or "
                         "the Vulkan loader (libvulkan1).")
    dest.mkdir(parents=True, exist_ok=True)
    for deb in sorted(debs.glob("*.deb")):
        try:
            done = subprocess.run(["dpkg-deb", "-x", str(deb), str(dest)], capture_output=True, text=True,
                                  timeout=60)
        except subprocess.TimeoutExpired as err:
            raise CheckError(f"dpkg-deb did not unpack {deb.name} within 60 s.") from err
        if done.returncode != 0:
            raise CheckError(f"dpkg-deb could not unpack {deb.name}: {done.stderr.strip() or 'no output'}")
    return sorted({p.parent for p in dest.rglob("*.so*") if p.is_file() or p.is_symlink()})


def find_nvidia_file(dirs, pattern: str) -> Path | None:
    """The first file matching ``pattern`` (a glob) in ``dirs``, or None.

    >>> find_nvidia_file(["/no/such/dir"], "nvidia_icd*.json") is None
    True
    """
    for folder in dirs:
        found = sorted(Path(folder).glob(pattern)) if Path(folder).is_dir() else []
        if found:
            return found[0]
    return None


def driver_library_dir(icd: Path) -> Path | None:
    """The folder of ``DRIVER_LIB_DIRS`` holding the library an ICD file names without a path (the
    Vulkan loader finds it only through the linker's path), or None (named with a path, or not found)."""
    try:
        library = json.loads(icd.read_text())["ICD"]["library_path"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if "/" in library:
        return None
    return next((Path(d) for d in DRIVER_LIB_DIRS if (Path(d) / library).exists()), None)


def vulkan_environment(args: argparse.Namespace, work: Path, env: dict) -> dict:
    """Set up ``env`` for NVIDIA's Vulkan driver; returns what was found and done (for the summary)."""
    info: dict = {"loader": None, "icd": None, "unpacked": []}
    if vulkan_loader_present():
        info["loader"] = "system"
    elif args.vulkan_debs is not None:
        lib_dirs = unpack_debs(args.vulkan_debs, work / "vulkan-debs")
        paths = [*map(str, lib_dirs), env.get("LD_LIBRARY_PATH", "")]
        env["LD_LIBRARY_PATH"] = os.pathsep.join(paths).rstrip(os.pathsep)
        info["unpacked"] = sorted(p.name for p in args.vulkan_debs.glob("*.deb"))
        info["loader"] = "unpacked" if vulkan_loader_present(lib_dirs) else None
    icd = find_nvidia_file(ICD_DIRS, "nvidia*icd*.json")
    if icd is not None:
        env["VK_ICD_FILENAMES"] = env["VK_DRIVER_FILES"] = str(icd)
        info["icd"] = str(icd)
        folder = driver_library_dir(icd)
        if folder is not None and str(folder) not in env.get("LD_LIBRARY_PATH", "").split(os.pathsep):
            env["LD_LIBRARY_PATH"] = os.pathsep.join(
                [p for p in (env.get("LD_LIBRARY_PATH", ""), str(folder)) if p])
            info["driver_library_dir"] = str(folder)
    egl = find_nvidia_file(EGL_VENDOR_DIRS, "*nvidia*.json")
    if egl is not None:
        env.setdefault("__EGL_VENDOR_LIBRARY_FILENAMES", str(egl))
    return info


# ----- stages -------------------------------------------------------------------------------------------
class Runner:
    """Runs stages as subprocesses inside one overall deadline; keeps their records."""

    def __init__(self, out: Path, env: dict, budget_s: float, started: float):
        self.out, self.env, self.deadline = out, env, started + budget_s
        self.records: list[dict] = []

    def run(self, name: str, command: list[str], extra_env: dict | None = None) -> dict:
        """Run one stage; the record says ok, seconds, its limit and the log file's name."""
        limit = min(STAGE_BUDGETS_S[name], self.deadline - time.monotonic())
        log = self.out / f"{name}.log"
        record = {"stage": name, "command": " ".join(command), "limit_s": round(max(limit, 0), 1),
                  "log": log.name}
        if limit < 5:
            record.update(ok=False, seconds=0.0, detail="not run: the overall time budget was spent")
            self.records.append(record)
            print(f"[gpu_check] {name}: not run (time budget spent)", flush=True)
            return record
        print(f"[gpu_check] {name} (at most {limit:.0f} s) ...", flush=True)
        if "--json" in command:  # an earlier run's figures in a reused --out must not pass as this run's
            Path(command[command.index("--json") + 1]).unlink(missing_ok=True)
        started = time.monotonic()
        with open(log, "w") as handle:
            try:
                done = subprocess.run(command, cwd=REPO, env={**self.env, **(extra_env or {})}, stdout=handle,
                                      stderr=subprocess.STDOUT, timeout=limit)
                code = done.returncode
            except subprocess.TimeoutExpired:
                code = None
        record["seconds"] = round(time.monotonic() - started, 1)
        if code is None:
            record.update(ok=False, detail=f"timed out after {limit:.0f} s")
        else:
            record.update(ok=code == 0, detail="ok" if code == 0 else f"exit status {code}: {tail(log)}")
        print(f"[gpu_check] {name}: {'ok' if record['ok'] else 'FAILED ' + record['detail']} "
              f"({record['seconds']} s)", flush=True)
        self.records.append(record)
        return record


def tail(path: Path, lines: int = 1) -> str:
    """The last non-empty line(s) of a log, shortened."""
    try:
        text = [line for line in path.read_text(errors="replace").splitlines() if line.strip()]
    except OSError:
        return ""
    return " | ".join(text[-lines:])[-300:]


def read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def pytest_counts(log: Path) -> str:
    """pytest's last summary line ('N passed, M skipped in ...'), or ''."""
    for line in reversed(log.read_text(errors="replace").splitlines() if log.exists() else []):
        if re.search(r"\d+ (passed|failed|error)", line):
            return line.strip("= ").strip()
    return ""


def psnr_trend(metrics: Path) -> tuple[float, float] | None:
    """(first logged PSNR, mean of the last three logged) of a train.py metrics.jsonl, or None."""
    values = []
    for line in metrics.read_text().splitlines() if metrics.exists() else []:
        try:
            entry = json.loads(line)
        except ValueError:
            continue
        if "psnr" in entry:
            values.append(float(entry["psnr"]))
    if len(values) < 2:
        return None
    return values[0], statistics.mean(values[-3:])


def renderer_figures(report: dict | None) -> dict:
    if not report:
        return {}
    medians = report["medians_ms"]
    return {"rays": report["n_rays"], "samples": report["n_samples"], "taichi_ms": medians["taichi"]["total"],
            "reference_ms": medians["reference"]["total"], "ratio": report["ratio_total"],
            "agreement_ok": report["agreement"]["ok"]}


def train_step_figures(report: dict | None) -> dict:
    if not report:
        return {}
    taichi = report["results"]["taichi"]
    return {"ms_per_step": taichi["ms_per_step_median"]["step"], "rays_per_s": taichi["rays_per_s"],
            "share_outside_mlp": taichi["share_outside_mlp"], "rays_per_step": report["rays_per_step"],
            "reference_ms_per_step": report["results"]["reference"]["ms_per_step_median"]["step"],
            "tf32": report.get("tf32")}


def render_figures(report: dict | None, arch: str) -> dict:
    if not report or "median_s" not in report["contenders"].get(arch, {}):
        return {}
    entry = report["contenders"][arch]
    return {"size": report["size"], "seconds": entry["median_s"], "rays_per_s": entry["rays_per_s"],
            "speedup_vs_reference": entry["speedup_vs_reference"]}


def device_skip_figures(report: dict | None) -> dict:
    """The device-resident step with empty-space skipping off and on (``train_step.py --render-skip-empty
    off on --device-step``)."""
    if not report or "step_ratio_off_over_on" not in report:
        return {}
    off, on = report["results"]["off"], report["results"]["on"]
    return {"off_ms": off["step_ms"], "on_ms": on["step_ms_with_grid_update"],
            "step_ratio": report["step_ratio_off_over_on"],
            "field_evals_per_ray": [off["field_evals_per_ray"], on["field_evals_per_ray"]],
            "rays_per_step": report["rays_per_step"]}


def require_figures(record: dict, figures: dict) -> dict:
    """``figures``; a stage that exited 0 but left none (a benchmark that skipped its arch) is failed."""
    if record.get("ok") and not figures:
        record.update(ok=False, detail="exited 0 but wrote no figures (see its log)")
    return figures


def run_arch(runner: Runner, arch: str, cache: Path, figures: dict) -> None:
    """The benchmarks on one arch (torch on the GPU beside it), their figures into ``figures[arch]``."""
    py, out, got = sys.executable, runner.out, figures.setdefault(arch, {})
    device = ["--device", "cuda"]
    for side, rays in ((64, 4096), (256, 65536)):
        name = f"renderer-{arch}-{rays}"
        path = out / f"{name}.json"
        repeats = "20" if rays == 4096 else "10"
        record = runner.run(name, [py, "benchmarks/renderer.py", "--arch", arch, *device, "--side", str(side),
                          "--coarse", "128", "--fine", "64", "--repeats", repeats, "--warmup", "3",
                          "--json", str(path)])
        got[f"renderer_{rays}"] = require_figures(record, renderer_figures(read_json(path)))
    name = f"train-step-{arch}"
    record = runner.run(name, [py, "benchmarks/train_step.py", "--arch", arch, *device, "--preset", "paper",
                               "--cache", str(cache), "--steps", "10", "--warmup", "3",
                               "--json", str(out / f"{name}.json")])  # fmt: skip
    got["train_step"] = require_figures(record, train_step_figures(read_json(out / f"{name}.json")))
    name = f"render-{arch}-256"
    record = runner.run(name, [py, "benchmarks/render.py", "--arch", arch, *device, "--preset", "paper",
                               "--size", "256", "--repeats", "3", "--json", str(out / f"{name}.json")])
    got["render_256"] = require_figures(record, render_figures(read_json(out / f"{name}.json"), arch))
    if arch == "vulkan":  # what a Vulkan GPU trains with: the device-resident step, skipping empty space
        name = "device-skip-vulkan"
        record = runner.run(name, [py, "benchmarks/train_step.py", "--arch", arch, "--render-skip-empty",
                                   "off", "on", "--device-step", "--pretrain", "100", "--steps", "6",
                                   "--warmup", "2", "--json", str(out / f"{name}.json")])  # fmt: skip
        got["device_skip"] = require_figures(record, device_skip_figures(read_json(out / f"{name}.json")))


def run_gpu_stages(args: argparse.Namespace, gpu: str, started: float) -> dict:
    """Everything after the no-GPU exit; returns the summary."""
    args.out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="gpu_check-"))
    env = dict(os.environ, PYTHONUNBUFFERED="1", LOLNERF_REQUIRE_CUDA="1")
    summary: dict = {"gpu": gpu, "python": sys.version.split()[0], "setup": {}, "stages": [], "figures": {}}
    python_path = [str(REPO)]
    try:
        if importlib.util.find_spec("taichi") is None:
            if args.wheels is None:
                raise CheckError("taichi is not installed and no --wheels folder was given; pass --wheels "
                                 "DIR with the taichi 1.7.4 and dill wheels for this Python.")
            summary["setup"]["installed"] = install_wheels(args.wheels, work / "site")
            python_path.append(str(work / "site"))
        else:
            summary["setup"]["installed"] = []
        env["PYTHONPATH"] = os.pathsep.join([*python_path, env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
        summary["setup"]["vulkan"] = vulkan_environment(args, work, env)
    except CheckError as err:
        summary["setup"]["error"] = str(err)
        summary["ok"] = False
        return summary
    runner = Runner(args.out, env, args.budget - (time.monotonic() - started), time.monotonic())

    probe_path = args.out / "probe.json"
    runner.run("probe", [sys.executable, "benchmarks/gpu_probe.py", "--json", str(probe_path)])
    probe = read_json(probe_path) or {}
    summary["probe"] = probe
    nvidia_vulkan = probe.get("nvidia_vulkan")

    cache = args.out / "cache-synthetic-paper"
    runner.run("cache", [sys.executable, "-m", "dataset.prepare", "--dataset", "synthetic", "--preset",
                         "paper", "--identities", str(SYNTHETIC_IDENTITIES), "--out", str(cache)])

    run_dir = args.out / "train-200"
    shutil.rmtree(run_dir, ignore_errors=True)
    train = runner.run("train-200-cuda", [
        sys.executable, "train.py", "--arch", "cuda", "--preset", "paper", "--cache", str(cache), "--out",
        str(run_dir), "--steps", str(TRAIN_STEPS), "--log-every", str(LOG_EVERY), "--checkpoint-every",
        str(TRAIN_STEPS), "--preview-every", str(TRAIN_STEPS)])
    trend = psnr_trend(run_dir / "metrics.jsonl")
    summary["figures"].setdefault("cuda", {})["train_200"] = (
        {"psnr_first": trend[0], "psnr_last": trend[1]} if trend else {})
    if train["ok"] and (trend is None or not trend[1] > trend[0] + MIN_PSNR_GAIN_DB):
        train["ok"] = False
        train["detail"] = ("PSNR did not rise: " + (f"{trend[0]:.2f} -> {trend[1]:.2f} dB" if trend
                                                    else "no PSNR logged"))

    tests_cuda = runner.run("tests-cuda", [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                                           *RENDERER_TESTS], {"LOLNERF_TEST_ARCHES": "cuda"})
    tests_cuda["counts"] = pytest_counts(args.out / "tests-cuda.log")
    run_arch(runner, "cuda", cache, summary["figures"])

    if nvidia_vulkan:
        summary["vulkan_device"] = nvidia_vulkan
        tests_vk = runner.run("tests-vulkan", [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                                               *RENDERER_TESTS],
                              {"LOLNERF_TEST_ARCHES": "vulkan", "LOLNERF_REQUIRE_VULKAN": "1"})
        tests_vk["counts"] = pytest_counts(args.out / "tests-vulkan.log")
        run_arch(runner, "vulkan", cache, summary["figures"])
    else:
        summary["vulkan_device"] = None
        seen = probe.get("vulkan_devices") or []
        summary["vulkan_note"] = (f"no NVIDIA Vulkan device found ({', '.join(seen)})" if seen
                                  else "no Vulkan device found")
    summary["stages"] = runner.records
    summary["goals"] = goals(summary["figures"])
    summary["ok"] = all(r["ok"] for r in runner.records)
    shutil.rmtree(work, ignore_errors=True)
    return summary


def goals(figures: dict) -> dict:
    """The issue's goals for the figures, met or not (reported, not failures)."""
    cuda = figures.get("cuda", {})
    ratio = cuda.get("renderer_65536", {}).get("ratio")
    share = cuda.get("train_step", {}).get("share_outside_mlp")
    return {"renderer_65536_ratio_at_least_3": None if ratio is None else ratio >= RENDERER_GOAL_RATIO,
            "outside_mlp_share_below_15pct": None if share is None else share < OUTSIDE_MLP_GOAL}


# ----- summary ------------------------------------------------------------------------------------------
def markdown(summary: dict) -> str:
    """The Markdown summary: verdict, stages, then the figures per arch."""
    lines = [f"# gpu_check: {'all stages passed' if summary.get('ok') else 'FAILED'}", "",
             f"GPU: {summary.get('gpu')}; Python {summary.get('python')}; "
             f"total {summary.get('elapsed_s', 0):.0f} s", ""]
    probe = summary.get("probe") or {}
    if probe:
        vulkan = ", ".join(probe.get("vulkan_devices", [])) or "none"
        lines += [f"torch {probe.get('torch')}, CUDA {probe.get('cuda')}, driver {probe.get('driver')}, "
                  f"taichi {probe.get('taichi')}; Vulkan devices: {vulkan}", ""]
    if summary["setup"].get("error"):
        lines += [f"Setup failed: {summary['setup']['error']}", ""]
    lines += ["| stage | result | seconds | limit s | detail |", "| --- | --- | ---: | ---: | --- |"]
    for r in summary["stages"]:
        detail = r.get("counts") or r["detail"]
        lines.append(f"| {r['stage']} | {'ok' if r['ok'] else 'FAILED'} | {r['seconds']} | {r['limit_s']} | "
                     f"{detail.replace('|', '/')} |")
    for arch, got in summary.get("figures", {}).items():
        lines += ["", f"## {arch}", "", "| measurement | figure |", "| --- | --- |"]
        for rays in (4096, 65536):
            r = got.get(f"renderer_{rays}") or {}
            if r:
                lines.append(f"| renderer fwd+bwd, {r['rays']} × {r['samples']} | Taichi "
                             f"{r['taichi_ms']:.2f} ms, reference {r['reference_ms']:.2f} ms, "
                             f"{r['ratio']:.2f}× |")
        t = got.get("train_step") or {}
        if t:
            lines.append(f"| paper training step ({t['rays_per_step']} rays) | {t['ms_per_step']:.1f} ms, "
                         f"{t['rays_per_s']:.0f} rays/s, {t['share_outside_mlp']:.1%} outside the MLP "
                         f"(reference renderer {t['reference_ms_per_step']:.1f} ms) |")
        g = got.get("render_256") or {}
        if g:
            lines.append(f"| render 256² (paper network) | {g['seconds']:.3f} s, {g['rays_per_s']:.0f} "
                         f"rays/s, {g['speedup_vs_reference']:.2f}× the reference |")
        d = got.get("device_skip") or {}
        if d:
            lines.append(f"| device-resident step, cpu preset ({d['rays_per_step']} rays), skipping off → on "
                         f"| {d['off_ms']:.1f} → {d['on_ms']:.1f} ms ({d['step_ratio']:.2f}×), field "
                         f"evaluations per ray {d['field_evals_per_ray'][0]:.1f} → "
                         f"{d['field_evals_per_ray'][1]:.1f} |")
        p = got.get("train_200") or {}
        if p:
            lines.append(f"| {TRAIN_STEPS} paper steps, PSNR | {p['psnr_first']:.2f} → "
                         f"{p['psnr_last']:.2f} dB |")
    if summary.get("goals"):
        lines += ["", "Goals: " + ", ".join(f"{k}: {v}" for k, v in summary["goals"].items())]
    if summary.get("vulkan_note"):
        lines += ["", f"Vulkan: {summary['vulkan_note']}; the Vulkan stages were not run."]
    return "\n".join(lines) + "\n"


def write_summary(out: Path, summary: dict) -> tuple[Path, Path]:
    out.mkdir(parents=True, exist_ok=True)
    json_path, md_path = out / "gpu_check.json", out / "gpu_check.md"
    json_path.write_text(json.dumps(summary, indent=2) + "\n")
    md_path.write_text(markdown(summary))
    return json_path, md_path


def main(argv: list[str] | None = None) -> int:
    started = time.monotonic()
    args = build_parser().parse_args(argv)
    args.out = args.out.resolve()  # the stages run in the repository root; the summary reads their files here
    try:
        check_arguments(args)
        missing = missing_modules()
        if missing:
            raise CheckError(f"this Python ({sys.executable}) lacks {', '.join(missing)}; install them first "
                             "(the check needs no network, only these).")
    except CheckError as err:
        print(f"gpu_check: {err}", file=sys.stderr)
        return 2
    gpu = nvidia_gpu()
    if gpu is None:
        print("gpu_check: no NVIDIA GPU that torch can use on this machine; arguments and imports are fine, "
              "nothing was run.")
        return 0
    summary = run_gpu_stages(args, gpu, started)
    summary["elapsed_s"] = round(time.monotonic() - started, 1)
    json_path, md_path = write_summary(args.out, summary)
    print(markdown(summary))
    print(f"[gpu_check] wrote {json_path} and {md_path}")
    return 0 if summary.get("ok") else 1


if __name__ == "__main__":
    sys.exit(main())
