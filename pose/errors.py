"""Errors raised by `pose`: each carries one sentence saying what is wrong and what to do."""

from __future__ import annotations


class ImageError(ValueError):
    """The file is not an image this project can use (unreadable, truncated, not an image, too small)."""


class NoFaceError(ValueError):
    """Neither Face Mesh nor the Face Detection fallback found a face in the image."""


class PoseRejectedError(ValueError):
    """The camera fit's reprojection error is above the acceptance threshold.

    `error_px` and `threshold_px` hold the numbers so a caller can report them.
    """

    def __init__(self, message: str, error_px: float, threshold_px: float) -> None:
        super().__init__(message)
        self.error_px = error_px
        self.threshold_px = threshold_px
