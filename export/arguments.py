"""argparse value types for the entry scripts: a bad number is refused while parsing, in one sentence.

    parser.add_argument("--frames", type=at_least(1), default=36)
    parser.add_argument("--fps", type=positive_float, default=18.0)

argparse turns the ``ArgumentTypeError`` into ``prog: error: argument --frames: ...`` and exit status 2,
before any model is loaded or any file written.
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable

RENDER_ARCHES = ("auto", "cpu", "vulkan", "metal", "cuda")
RENDER_DEVICES = ("auto", "cuda", "mps", "xpu", "cpu")


def at_least(low: int) -> Callable[[str], int]:
    """An argparse type: an integer >= ``low``.

    >>> at_least(1)("3")
    3
    """

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"{value} must be at least {low}")
        return value

    parse.__name__ = f"integer >= {low}"  # what argparse names in its own messages
    return parse


def finite_float(text: str) -> float:
    """An argparse type: a finite number.

    >>> finite_float("-0.5")
    -0.5
    """
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"{text} must be a finite number")
    return value


def positive_float(text: str) -> float:
    """An argparse type: a finite number > 0.

    >>> positive_float("18")
    18.0
    """
    value = finite_float(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"{text} must be positive")
    return value


def add_arch_flag(parser: argparse.ArgumentParser) -> None:
    """``--arch`` and ``--device`` for the scripts that render a trained model (fit, render, evaluate), as
    ``train.py`` has them: ``--arch cuda`` (or ``auto`` on a CUDA machine) with ``--device auto`` puts the
    model on the GPU and Taichi reads its tensors in place (``export.inference.start_renderer``).

    >>> parser = argparse.ArgumentParser(); add_arch_flag(parser)
    >>> vars(parser.parse_args(["--arch", "cuda"]))
    {'arch': 'cuda', 'device': 'auto'}
    """
    parser.add_argument("--arch", default="cpu", choices=RENDER_ARCHES,
                        help="Taichi arch for the renderer (default cpu = x64; auto: CUDA, else a Vulkan "
                             "GPU, else x64)")
    parser.add_argument("--device", default="auto", choices=RENDER_DEVICES,
                        help="torch device for the model (default auto: cuda with --arch cuda, else cpu)")


def add_field_backend_flag(parser: argparse.ArgumentParser) -> None:
    """``--field-backend``, as in train.py: which implementation evaluates the field MLP."""
    from models.field_backend import FIELD_BACKENDS

    parser.add_argument("--field-backend", default="auto", choices=FIELD_BACKENDS,
                        help="torch, or Taichi kernels on the renderer's arch (auto: taichi on a "
                             "Vulkan/Metal GPU, else torch)")


def add_skip_empty_flag(parser: argparse.ArgumentParser) -> None:
    """``--render-skip-empty auto|on|off``, as in train.py: march the class occupancy grid and composite
    packed samples with early stop (``export.inference.use_skip_empty``)."""
    parser.add_argument("--render-skip-empty", default="auto", choices=("auto", "on", "off"),
                        help="skip empty space and hidden samples (README, Training, has the speed and "
                             "quality figures): on uses the checkpoint's occupancy grid or estimates one; "
                             "auto (the default) is on for a run trained with skipping")
