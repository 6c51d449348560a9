"""Choose and start the Taichi arch, and pair it with a torch device.

>>> backend = init_backend(arch="cpu")   # doctest: +SKIP
[renderer] Taichi arch=cpu (x64), torch device=cpu: asked for cpu; torch device cpu pairs with Taichi cpu.

``auto`` takes CUDA when both torch and Taichi can use it, else Vulkan when a Vulkan GPU exists, else
the CPU. ROCm builds of torch (AMD GPUs) also answer ``torch.cuda.is_available()``, but Taichi's CUDA
backend cannot drive an AMD GPU: there ``auto`` skips CUDA, takes Vulkan, and keeps the torch tensors on
the ROCm device (``cuda`` to torch), copied through the host around every kernel (docs/TAICHI.md).
A software Vulkan driver alone (Mesa's lavapipe) does not count for ``auto``: it is Vulkan emulated on
the CPU and slower than the x64 backend, so ``auto`` says so and takes the CPU; ask for
``arch="vulkan"`` to use it anyway (CI does, to test the Vulkan path).

Asking for a backend the machine lacks raises :class:`BackendUnavailableError` with one sentence
naming what is missing; nothing falls back silently (``ti.init`` itself falls back to x64
without a word, so the arch Taichi actually started on is checked after every init).

Taichi CUDA kernels read torch CUDA tensors in place; the CPU and Vulkan arches read CPU tensors.
Tensors on any other torch device (MPS, XPU, or CUDA beside a non-CUDA arch) are copied to the CPU
for each kernel and the results copied back; the chosen backend's ``reason`` says so.
"""

from __future__ import annotations

import time
import weakref
from dataclasses import dataclass

import taichi as ti
import torch

from .vulkan_probe import vulkan_devices

ARCHES = ("auto", "cuda", "vulkan", "metal", "cpu")
DEVICES = ("auto", "cuda", "mps", "xpu", "cpu")

NO_VULKAN = (
    "no Vulkan driver found: install your GPU's Vulkan driver, or mesa-vulkan-drivers and libvulkan1 "
    "for a CPU fallback (lavapipe)"
)


def guard_ndarray_deletion() -> None:
    """Make a ``ti.ndarray`` that outlives its Taichi runtime harmless when it is finally deleted.

    Taichi 1.7's ``ScalarNdarray.__del__`` asks the *current* program to delete the array's C++ object. For an
    array made before a ``ti.reset()``/``ti.init()`` that pointer is dangling, and when the allocator has
    given the address to an array of the new program, the deletion frees that live array: a later
    launch then fails with "argument not found" or reads freed memory (docs/TAICHI.md). Each array
    here remembers the runtime that made it (``ti.init`` starts a new one) and asks only that runtime to
    delete it; an earlier runtime's arrays were freed with it. Installed once, when this module loads.
    """
    ndarray = ti.lang._ndarray.ScalarNdarray  # the only ndarray class with a __del__ in Taichi 1.7
    if getattr(ndarray, "_runtime_guarded", False):
        return
    impl = ti.lang.impl
    make, delete = ndarray.__init__, ndarray.__del__

    def __init__(self, *args, **kwargs):
        make(self, *args, **kwargs)
        self._made_by = weakref.ref(impl.get_runtime())

    def __del__(self):
        made_by = getattr(self, "_made_by", None)
        current = getattr(impl, "get_runtime", None)  # None while the interpreter shuts down
        if made_by is None:  # made before this guard was installed: Taichi's own behaviour
            delete(self)
        elif current is not None and made_by() is current():
            delete(self)

    ndarray.__init__, ndarray.__del__, ndarray._runtime_guarded = __init__, __del__, True


guard_ndarray_deletion()


class BackendUnavailableError(RuntimeError):
    """The requested Taichi arch or torch device does not exist on this machine."""


@dataclass(frozen=True)
class Backend:
    """The started backend: Taichi ``arch`` name, the torch ``device`` for data, and why they were chosen."""

    arch: str
    device: torch.device
    reason: str


def started_arch() -> str | None:
    """Name of the arch Taichi is running on ("cuda", "vulkan", "metal", "cpu"), or None if not started."""
    if ti.lang.impl.get_runtime().prog is None:
        return None
    arch = ti.lang.impl.current_cfg().arch
    if arch == ti.cuda:
        return "cuda"
    if arch == ti.vulkan:
        return "vulkan"
    if arch == ti.metal:
        return "metal"
    return "cpu"


_GENERATION = [0]  # bumped at every (re)start: arrays made by an earlier Taichi runtime are invalid


def runtime_generation() -> int:
    """How many times Taichi has been (re)started by this module; caches of ``ti.ndarray``s key on it."""
    return _GENERATION[0]


def _start(
    arch: str, kernel_profiler: bool = False, random_seed: int = 0, cpu_threads: int | None = None
) -> bool:
    """Start Taichi on ``arch``; True when it really runs there (not on Taichi's silent x64 fallback)."""
    _GENERATION[0] += 1
    ti.reset()
    options = {"cpu_max_num_threads": cpu_threads} if cpu_threads else {}
    if arch == "cpu":
        # Keep ti.types.vector values as LLVM vectors: the x64 kernels' 8-float lanes then compile to
        # AVX instructions (renderer/lanes.py). Other arches keep Taichi's default (scalarised).
        options["real_matrix_scalarize"] = False
    try:
        ti.init(
            arch=getattr(ti, arch),
            default_fp=ti.f32,
            kernel_profiler=kernel_profiler,
            random_seed=random_seed,
            log_level=ti.WARN,
            **options,
        )
    except Exception:  # Taichi raises bare RuntimeErrors when a device cannot be created
        ti.reset()
        return False
    if started_arch() != arch:
        ti.reset()
        return False
    return True


def torch_is_rocm() -> bool:
    """True for a ROCm (AMD) build of torch: ``torch.version.hip`` is set, and its GPUs answer as ``cuda``.

    >>> torch_is_rocm()   # a CUDA or CPU build of torch
    False
    """
    return bool(getattr(torch.version, "hip", None))


def _torch_cuda_missing() -> str | None:
    if torch_is_rocm():
        return (
            f"this torch is a ROCm build (HIP {torch.version.hip}): its 'cuda' device is an AMD GPU, which "
            "Taichi's CUDA backend cannot drive; choose arch='vulkan' (the torch device stays the AMD GPU)"
        )
    if not torch.cuda.is_available():
        return (
            "torch sees no CUDA device (torch.cuda.is_available() is False): install an NVIDIA driver "
            "and a CUDA build of torch, or choose arch='vulkan' or arch='cpu'"
        )
    return None


def _torch_device_missing(device: str) -> str | None:
    if device == "cuda" and not torch.cuda.is_available():  # a ROCm GPU is torch's "cuda" device too
        return _torch_cuda_missing()
    if device == "mps" and not torch.backends.mps.is_available():
        return "torch has no MPS device (Apple GPU on macOS): use device='cpu'"
    if device == "xpu" and not (hasattr(torch, "xpu") and torch.xpu.is_available()):
        return "torch has no XPU device (Intel GPU with an XPU build of torch): use device='cpu'"
    return None


def _start_arch(arch: str, settings: dict) -> str:
    """Start an explicitly requested arch or raise naming what is missing; returns the reason text."""
    if arch == "cuda":
        missing = _torch_cuda_missing()
        if missing:
            raise BackendUnavailableError(f"arch='cuda' is unavailable: {missing}.")
        if not _start("cuda", **settings):
            raise BackendUnavailableError(
                "arch='cuda' is unavailable: Taichi could not start CUDA although torch can; check that "
                "the NVIDIA driver is recent enough for Taichi 1.7.4, or choose arch='vulkan' or 'cpu'."
            )
    elif arch == "vulkan":
        if not _start("vulkan", **settings):
            raise BackendUnavailableError(f"arch='vulkan' is unavailable: {NO_VULKAN}.")
    elif arch == "metal":
        if not _start("metal", **settings):
            raise BackendUnavailableError(
                "arch='metal' is unavailable: Metal needs macOS on a Mac with a Metal GPU; choose "
                "arch='vulkan' or arch='cpu'."
            )
    elif not _start("cpu", **settings):
        raise BackendUnavailableError("arch='cpu' failed to start: reinstall taichi==1.7.4.")
    return f"asked for {arch}"


def _start_auto(settings: dict, allow_cuda: bool = True) -> tuple[str, str]:
    """Start the best available arch in the order CUDA, Vulkan, CPU; returns (arch, reason).

    ``allow_cuda=False`` (the caller's tensors stay on the CPU, which Taichi CUDA cannot read) skips CUDA.
    """
    cuda_missing = _torch_cuda_missing() if allow_cuda else "the torch device is the CPU"
    if cuda_missing is None and _start("cuda", **settings):
        return "cuda", "auto: torch and Taichi both use CUDA"
    why_not_cuda = cuda_missing or "Taichi could not start CUDA"
    devices = vulkan_devices()
    gpus = [d for d in devices if not d.is_software]
    if gpus and _start("vulkan", **settings):
        return "vulkan", f"auto: no CUDA ({why_not_cuda}); a Vulkan GPU exists ({gpus[0].name})"
    if devices and not gpus:
        # lavapipe/llvmpipe is Vulkan emulated on the CPU: correct, but slower than Taichi's x64 backend.
        why_not_vulkan = (
            f"the only Vulkan device is a software driver ({devices[0].name}), slower than x64 "
            "(ask for arch='vulkan' to use it anyway)"
        )
    elif gpus:
        why_not_vulkan = f"Taichi could not start Vulkan on {gpus[0].name}"
    else:
        why_not_vulkan = NO_VULKAN
    _start("cpu", **settings)
    return "cpu", f"auto: no CUDA ({why_not_cuda}) and {why_not_vulkan}; using the CPU"


def init_backend(
    arch: str = "auto",
    device: str = "auto",
    kernel_profiler: bool = False,
    random_seed: int = 0,
    verbose: bool = True,
    cpu_threads: int | None = None,
) -> Backend:
    """Start Taichi on ``arch`` and pair it with a torch ``device``; prints the choice and the reason.

    arch: "auto" | "cuda" | "vulkan" | "metal" | "cpu"; device: "auto" | "cuda" | "mps" | "xpu" | "cpu".
    ``kernel_profiler=True`` turns on Taichi's kernel profiler (see renderer.profiling);
    ``cpu_threads`` caps the threads of Taichi's CPU backend (default: all cores).
    Raises BackendUnavailableError naming what is missing (Taichi is then left stopped, and the next
    renderer call starts ``auto``); ValueError for an unknown name or an impossible pairing.
    Calling it again switches arch in the same process (all renderer kernels recompile).
    """
    if arch not in ARCHES:
        raise ValueError(f"Unknown Taichi arch {arch!r}: choose one of {', '.join(ARCHES)}.")
    if device not in DEVICES:
        raise ValueError(f"Unknown torch device {device!r}: choose one of {', '.join(DEVICES)}.")
    if arch == "cuda" and device not in ("auto", "cuda"):
        raise ValueError(
            f"arch='cuda' reads torch CUDA tensors in place; device={device!r} cannot pair with it: "
            "use device='cuda' (or 'auto')."
        )
    device_missing = _torch_device_missing(device) if device != "auto" else None
    if device_missing:
        raise BackendUnavailableError(f"device={device!r} is unavailable: {device_missing}.")

    settings = {"kernel_profiler": kernel_profiler, "random_seed": random_seed, "cpu_threads": cpu_threads}
    if arch == "auto":
        started, reason = _start_auto(settings, allow_cuda=device in ("auto", "cuda"))
    else:
        started, reason = arch, _start_arch(arch, settings)

    if device == "auto" and started == "vulkan" and torch_is_rocm() and torch.cuda.is_available():
        device = "cuda"
        reason += ("; torch device cuda (the ROCm GPU) beside Taichi vulkan, its tensors copied through the "
                   "host around every renderer kernel")
    elif device == "auto":
        device = "cuda" if started == "cuda" else "cpu"
        reason += f"; torch device {device} pairs with Taichi {started}"
    elif started != "cuda" and device != "cpu":
        reason += (
            f"; Taichi {started} cannot read {device} tensors, so they are copied to the CPU "
            "around every renderer kernel"
        )
    backend = Backend(arch=started, device=torch.device(device), reason=reason)
    if verbose:
        label = " (x64)" if started == "cpu" else ""
        print(f"[renderer] Taichi arch={started}{label}, torch device={device}: {reason}.")
    return backend


def ensure_started() -> str:
    """The running arch's name, starting the ``auto`` backend first if nobody has started Taichi."""
    started = started_arch()
    if started is None:
        started = init_backend("auto").arch
    return started


def kernel_device() -> torch.device:
    """The torch device whose tensors the running Taichi arch reads in place (CUDA or CPU)."""
    return torch.device("cuda") if ensure_started() == "cuda" else torch.device("cpu")


def to_kernel(tensor: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``tensor`` as a contiguous, detached tensor of ``dtype`` that the running arch can read in place."""
    device = kernel_device()
    return tensor.detach().to(device=device, dtype=dtype).contiguous()


class CopyCounter:
    """Bytes of torch tensors that kernel launches hand to an arch that cannot read them in place (Vulkan,
    Metal): Taichi copies each such argument to the device before the launch and back after it
    (docs/TAICHI.md, Torch interop), so every byte counted here crossed the bus twice."""

    def __init__(self):
        self.bytes = 0

    def reset(self) -> None:
        self.bytes = 0


TORCH_COPIES = CopyCounter()


class SyncTimes:
    """Per-kernel wall time of launches bracketed by ``ti.sync()`` (``enabled`` while profiling on an arch
    whose Taichi kernel profiler is not used, see ``renderer.profiling``): {name: [calls, seconds]}."""

    def __init__(self):
        self.enabled = False
        self.totals: dict[str, list] = {}

    def clear(self) -> None:
        self.totals = {}


SYNC_TIMES = SyncTimes()


def launch(name: str, kernel, *args) -> None:
    """Run a Taichi kernel inside a ``renderer.<name>`` torch.profiler range (shows in Chrome traces)."""
    if started_arch() in ("vulkan", "metal"):
        TORCH_COPIES.bytes += sum(a.numel() * a.element_size() for a in args if isinstance(a, torch.Tensor))
    with torch.profiler.record_function(f"renderer.{name}"):
        if not SYNC_TIMES.enabled:
            kernel(*args)
            return
        ti.sync()
        start = time.perf_counter()
        kernel(*args)
        ti.sync()
        entry = SYNC_TIMES.totals.setdefault(name, [0, 0.0])
        entry[0] += 1
        entry[1] += time.perf_counter() - start
