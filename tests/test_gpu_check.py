"""benchmarks/gpu_check.py without a GPU: its arguments, imports (MediaPipe blocked), offline installs,
Vulkan set-up, stage runner and summaries. The GPU stages themselves need an NVIDIA GPU."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]


def load_benchmark(name: str):
    """A benchmarks/ script as a module, without putting benchmarks/ on sys.path (its renderer.py would
    shadow the renderer package)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(f"bench_{name}", REPO / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


gpu_check = load_benchmark("gpu_check")

# Run a script with MediaPipe unimportable (as on the GPU machine): any import of it raises ImportError.
BLOCKED = "import sys, runpy; sys.modules['mediapipe'] = None; sys.argv = sys.argv[1:]; "


def run_blocked(*argv: str, code: str | None = None) -> subprocess.CompletedProcess:
    program = BLOCKED + (code or "runpy.run_path(sys.argv[0], run_name='__main__')")
    return subprocess.run([sys.executable, "-c", program, *argv], cwd=REPO, capture_output=True, text=True,
                          timeout=300, env={**os.environ, "PYTHONPATH": str(REPO)})


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA GPU is here: gpu_check would run it all")
def test_without_a_gpu_it_says_so_in_one_line_and_exits_0(tmp_path):
    done = run_blocked("benchmarks/gpu_check.py", "--out", str(tmp_path / "out"))
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().splitlines() == [
        "gpu_check: no NVIDIA GPU that torch can use on this machine; arguments and imports are fine, "
        "nothing was run."]
    assert not (tmp_path / "out").exists()


def test_the_checks_modules_import_without_mediapipe():
    modules = ["train", "dataset.prepare", "dataset.synthetic", "models.trainer", "models.gpu_setup",
               "export.preview", "renderer.backend", "renderer.reference"]
    scripts = ["gpu_check", "gpu_probe", "renderer", "train_step", "render"]
    code = ("import importlib, importlib.util; sys.path.insert(0, '.'); "
            f"[importlib.import_module(m) for m in {modules!r}]; "
            "specs = [importlib.util.spec_from_file_location('bench_' + n, f'benchmarks/{n}.py') "
            f"for n in {scripts!r}]; "
            "[s.loader.exec_module(importlib.util.module_from_spec(s)) for s in specs]; "
            "assert sys.modules['mediapipe'] is None; "
            # pose/'s settings dataclass (PrepareConfig embeds it) is all of pose/ that may load
            "loaded = sorted(m for m in sys.modules if m.split('.')[0] == 'pose'); "
            "assert set(loaded) <= {'pose', 'pose.config'}, loaded; print('imported')")
    done = run_blocked(code=code)
    assert done.returncode == 0 and done.stdout.strip().endswith("imported"), done.stderr[-2000:]


def fake_wheel(folder: Path, name: str, version: str, body: str = "") -> Path:
    """A minimal pure-Python wheel that pip installs offline (a module with a version attribute)."""
    path = folder / f"{name}-{version}-py3-none-any.whl"
    info = f"{name}-{version}.dist-info"
    with zipfile.ZipFile(path, "w") as whl:
        whl.writestr(f"{name}/__init__.py", f"__version__ = {version!r}\n{body}")
        whl.writestr(f"{info}/METADATA", f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n")
        whl.writestr(f"{info}/WHEEL", "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\n"
                                      "Tag: py3-none-any\n")
        whl.writestr(f"{info}/RECORD", "")
    return path


def check(argv: list[str], capsys) -> tuple[int, str]:
    code = gpu_check.main(argv)
    return code, capsys.readouterr().err.strip()


def test_argument_mistakes_are_one_sentence(tmp_path, capsys):
    afile = tmp_path / "a_file"
    afile.write_text("x")
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    debs = tmp_path / "debs"
    debs.mkdir()
    cases = [
        (["--out", str(afile)], f"--out {afile} is a file; give a folder."),
        (["--out", str(tmp_path / "o"), "--wheels", str(tmp_path / "none")], "is not a folder"),
        (["--out", str(tmp_path / "o"), "--wheels", str(wheels)], "holds no taichi-1.7.4-*.whl"),
        (["--out", str(tmp_path / "o"), "--vulkan-debs", str(debs)], "holds no libvulkan1_*.deb"),
        (["--out", str(tmp_path / "o"), "--budget", "0"], "--budget 0 must be a positive number of seconds."),
    ]
    for argv, message in cases:
        code, err = check(argv, capsys)
        assert code == 2 and message in err and len(err.splitlines()) == 1, (argv, err)
    fake_wheel(wheels, "taichi", "1.7.4")
    code, err = check(["--out", str(tmp_path / "o"), "--wheels", str(wheels)], capsys)
    assert code == 2 and "holds no dill-*.whl" in err
    with pytest.raises(SystemExit) as exit_info:
        gpu_check.main([])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err == "gpu_check.py: error: the following arguments are required: --out"


def test_missing_modules_are_named(monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(gpu_check, "REQUIRED_MODULES", ("json", "surely_not_installed_here"))
    code, err = check(["--out", str(tmp_path / "o")], capsys)
    assert code == 2 and "lacks surely_not_installed_here" in err


def test_wheels_install_offline_into_a_prefix(tmp_path):
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    fake_wheel(wheels, "taichi", "1.7.4")
    fake_wheel(wheels, "dill", "0.3.9")
    fake_wheel(wheels, "unrelated", "1.0")
    installed = gpu_check.install_wheels(wheels, tmp_path / "site")
    assert installed == ["dill-0.3.9-py3-none-any.whl", "taichi-1.7.4-py3-none-any.whl"]
    assert (tmp_path / "site" / "taichi" / "__init__.py").is_file()
    assert not (tmp_path / "site" / "unrelated").exists()
    (wheels / "taichi-1.7.4-py3-none-any.whl").write_bytes(b"not a zip")
    with pytest.raises(gpu_check.CheckError, match="pip could not install"):
        gpu_check.install_wheels(wheels, tmp_path / "site2")
    # A taichi that installs but cannot import (as without colorama) is said in one sentence.
    fake_wheel(wheels, "taichi", "1.7.4", body="import no_such_module_here\n")
    with pytest.raises(gpu_check.CheckError, match=r"does not import: .*no_such_module_here"):
        gpu_check.install_wheels(wheels, tmp_path / "site3")


def test_a_stage_that_exits_0_without_figures_fails():
    record = {"ok": True, "detail": "ok"}
    assert gpu_check.require_figures(record, {}) == {}
    assert not record["ok"] and "no figures" in record["detail"]
    record = {"ok": True, "detail": "ok"}
    assert gpu_check.require_figures(record, {"seconds": 1.0}) == {"seconds": 1.0} and record["ok"]


@pytest.mark.skipif(shutil.which("dpkg-deb") is None, reason="dpkg-deb is not installed")
def test_vulkan_debs_are_unpacked_and_the_nvidia_icd_found(tmp_path, monkeypatch):
    tree = tmp_path / "pkg"
    (tree / "DEBIAN").mkdir(parents=True)
    (tree / "DEBIAN" / "control").write_text("Package: libvulkan1\nVersion: 1.3.0-1\nArchitecture: amd64\n"
                                             "Maintainer: test <t@example.org>\nDescription: test\n")
    lib = tree / "usr" / "lib" / "x86_64-linux-gnu"
    lib.mkdir(parents=True)
    (lib / "libvulkan.so.1").write_bytes(b"\x7fELF")
    debs = tmp_path / "debs"
    debs.mkdir()
    subprocess.run(["dpkg-deb", "--build", str(tree), str(debs / "libvulkan1_1.3.0-1_amd64.deb")], check=True,
                   capture_output=True)
    icd_dir = tmp_path / "icd.d"
    icd_dir.mkdir()
    (icd_dir / "nvidia_icd.json").write_text('{"ICD": {"library_path": "libGLX_nvidia.so.0"}}')
    monkeypatch.setattr(gpu_check, "ICD_DIRS", (str(tmp_path / "missing"), str(icd_dir)))
    monkeypatch.setattr(gpu_check, "EGL_VENDOR_DIRS", ())
    driver = tmp_path / "nvidia" / "lib64"
    driver.mkdir(parents=True)
    (driver / "libGLX_nvidia.so.0").write_bytes(b"\x7fELF")
    monkeypatch.setattr(gpu_check, "DRIVER_LIB_DIRS", (str(tmp_path / "none"), str(driver)))
    real_present = gpu_check.vulkan_loader_present
    monkeypatch.setattr(gpu_check, "vulkan_loader_present", lambda dirs=(): bool(dirs) and real_present(dirs))
    args = gpu_check.build_parser().parse_args(["--out", str(tmp_path / "o"), "--vulkan-debs", str(debs)])
    env = {"LD_LIBRARY_PATH": "/already/here"}
    info = gpu_check.vulkan_environment(args, tmp_path / "work", env)
    unpacked = tmp_path / "work" / "vulkan-debs" / "usr" / "lib" / "x86_64-linux-gnu"
    assert info == {"loader": "unpacked", "icd": str(icd_dir / "nvidia_icd.json"),
                    "unpacked": ["libvulkan1_1.3.0-1_amd64.deb"], "driver_library_dir": str(driver)}
    assert env["LD_LIBRARY_PATH"] == f"{unpacked}:/already/here:{driver}"
    assert env["VK_ICD_FILENAMES"] == env["VK_DRIVER_FILES"] == str(icd_dir / "nvidia_icd.json")


def test_stages_keep_to_their_limits_and_the_budget(tmp_path, monkeypatch):
    monkeypatch.setattr(gpu_check, "STAGE_BUDGETS_S", {"quick": 30, "slow": 6, "late": 30})

    runner = gpu_check.Runner(tmp_path, dict(os.environ), budget_s=10, started=time.monotonic())
    ok = runner.run("quick", [sys.executable, "-c", "print('fine')"])
    slow = runner.run("slow", [sys.executable, "-c", "import time; time.sleep(30)"])
    late = runner.run("late", [sys.executable, "-c", "print('never')"])
    assert ok["ok"] and ok["detail"] == "ok" and (tmp_path / "quick.log").read_text().strip() == "fine"
    assert not slow["ok"] and slow["detail"].startswith("timed out after 6")
    assert not late["ok"] and "budget was spent" in late["detail"]
    bad = gpu_check.Runner(tmp_path, dict(os.environ), 30, time.monotonic()).run(
        "quick", [sys.executable, "-c", "raise SystemExit('broken input')"])
    assert not bad["ok"] and bad["detail"] == "exit status 1: broken input"


def test_summary_from_real_benchmark_outputs(tmp_path, tiny_run, keep_taichi_arch):
    """The figures and the Markdown are built from what the benchmarks really write (run here on the CPU
    at toy sizes), so a GPU run cannot fail in its summary."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    cache = json.loads((tiny_run / "config.json").read_text())["data"]["cache"]
    commands = {
        "renderer": ["benchmarks/renderer.py", "--arch", "cpu", "--side", "8", "--coarse", "16", "--fine",
                     "8", "--repeats", "1", "--warmup", "0"],
        "train_step": ["benchmarks/train_step.py", "--arch", "cpu", "--cache", cache, "--steps", "1",
                       "--warmup", "0"],
        "render": ["benchmarks/render.py", "--arch", "cpu", "--size", "8", "--repeats", "1"],
        "device_skip": ["benchmarks/train_step.py", "--arch", "cpu", "--cache", cache, "--render-skip-empty",
                        "off", "on", "--device-step", "--pretrain", "4", "--steps", "1", "--warmup", "0"],
    }
    reports = {}
    for name, argv in commands.items():
        path = tmp_path / f"{name}.json"
        done = subprocess.run([sys.executable, *argv, "--json", str(path)], cwd=REPO, env=env,
                              capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stderr[-2000:]
        reports[name] = json.loads(path.read_text())
    metrics = tiny_run / "metrics.jsonl"
    trend = gpu_check.psnr_trend(metrics)
    assert trend is not None and trend[1] > trend[0]
    figures = {"cpu": {"renderer_4096": gpu_check.renderer_figures(reports["renderer"]),
                       "train_step": gpu_check.train_step_figures(reports["train_step"]),
                       "render_256": gpu_check.render_figures(reports["render"], "cpu"),
                       "train_200": {"psnr_first": trend[0], "psnr_last": trend[1]},
                       "device_skip": gpu_check.device_skip_figures(reports["device_skip"])}}
    assert figures["cpu"]["renderer_4096"]["rays"] == 64 and figures["cpu"]["renderer_4096"]["agreement_ok"]
    assert figures["cpu"]["train_step"]["ms_per_step"] > 0 and figures["cpu"]["render_256"]["rays_per_s"] > 0
    summary = {"gpu": "none (CPU test)", "python": "3", "setup": {}, "ok": False, "elapsed_s": 1.0,
               "stages": [{"stage": "renderer-cpu-4096", "ok": True, "seconds": 1.0, "limit_s": 25,
                           "detail": "ok"},
                          {"stage": "train-200-cuda", "ok": False, "seconds": 2.0, "limit_s": 90,
                           "detail": "PSNR did not rise: 10.00 -> 10.10 dB"}],
               "figures": figures, "goals": gpu_check.goals(figures), "vulkan_note": "no Vulkan device found"}
    json_path, md_path = gpu_check.write_summary(tmp_path / "out", summary)
    assert json.loads(json_path.read_text())["ok"] is False
    text = md_path.read_text()
    assert text.startswith("# gpu_check: FAILED") and "| train-200-cuda | FAILED |" in text
    assert "renderer fwd+bwd, 64 × 24" in text and "PSNR" in text and "rays/s" in text
    assert figures["cpu"]["device_skip"]["field_evals_per_ray"][0] == 64.0
    assert "device-resident step, cpu preset (1024 rays), skipping off → on" in text


def test_a_gpu_run_that_fails_writes_both_summaries_and_exits_1(tmp_path, monkeypatch, capsys):
    """The orchestration end to end with a pretend GPU: every CUDA stage fails here or is cut by the
    budget, and the summaries say so."""
    monkeypatch.setattr(gpu_check, "nvidia_gpu", lambda: "pretend GPU")
    monkeypatch.setattr(gpu_check, "STAGE_BUDGETS_S", {name: 12 for name in gpu_check.STAGE_BUDGETS_S})
    out = tmp_path / "out"
    code = gpu_check.main(["--out", str(out), "--budget", "12"])  # spent by probe + cache on any machine
    assert code == 1
    summary = json.loads((out / "gpu_check.json").read_text())
    stages = [r["stage"] for r in summary["stages"]]
    assert stages[:4] == ["probe", "cache", "train-200-cuda", "tests-cuda"]
    assert summary["ok"] is False and not summary["stages"][0]["ok"]
    assert any("budget was spent" in r["detail"] for r in summary["stages"])
    assert (out / "gpu_check.md").read_text().startswith("# gpu_check: FAILED")
    assert "wrote" in capsys.readouterr().out


def test_a_stage_never_reads_an_earlier_runs_figures(tmp_path):
    """The file a stage's --json names is deleted before it runs: a reused --out lends it nothing."""
    old = tmp_path / "renderer-cuda-4096.json"
    old.write_text('{"stale": true}')
    runner = gpu_check.Runner(tmp_path, dict(os.environ), budget_s=60, started=time.monotonic())
    record = runner.run("renderer-cuda-4096", [sys.executable, "-c", "pass", "--json", str(old)])
    assert record["ok"] and not old.exists()
    assert gpu_check.require_figures(record, gpu_check.read_json(old) or {}) == {} and not record["ok"]
