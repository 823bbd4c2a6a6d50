"""Hounsfield-unit windows: named [lo, hi] ranges mapped linearly to [-1, 1] and back.

The forward map clips to the window, so ``inverse(forward(hu))`` is ``clip(hu, lo, hi)``.
A window's width in normalised units is always 2, which is the ``data_range`` of PSNR/SSIM
computed on windowed volumes (one source of truth: :attr:`HUWindow.normalised_range`).
Works on NumPy arrays and torch tensors alike (torch keeps gradients inside the window).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, TypeVar

import numpy as np

from xct_core.errors import ConfigError

ArrayT = TypeVar("ArrayT")


@dataclass(frozen=True)
class HUWindow:
    name: str
    lo: float
    hi: float

    def __post_init__(self) -> None:
        if not (np.isfinite(self.lo) and np.isfinite(self.hi) and self.hi > self.lo):
            raise ConfigError(f"HU window {self.name!r}: need finite lo < hi, got [{self.lo}, {self.hi}]")

    @property
    def width(self) -> float:
        return float(self.hi - self.lo)

    @property
    def level(self) -> float:
        return 0.5 * (self.lo + self.hi)

    #: the span of the normalised range [-1, 1]; PSNR/SSIM data_range for windowed data
    normalised_range: ClassVar[float] = 2.0

    def forward(self, hu: ArrayT) -> ArrayT:
        """HU → [-1, 1], clipped to the window."""
        scaled = (hu - self.lo) * (2.0 / self.width) - 1.0
        if hasattr(scaled, "clamp"):
            return scaled.clamp(-1.0, 1.0)  # type: ignore[return-value]
        return np.clip(scaled, -1.0, 1.0).astype(np.result_type(scaled, np.float32), copy=False)

    def inverse(self, x: ArrayT) -> ArrayT:
        """[-1, 1] → HU (values outside [-1, 1] extrapolate linearly)."""
        return (x + 1.0) * (0.5 * self.width) + self.lo  # type: ignore[operator]

    def hu_per_unit(self) -> float:
        """HU represented by one normalised unit (to convert an MAE in [-1, 1] units to HU)."""
        return 0.5 * self.width


#: named windows (level/width from common radiology practice)
WINDOWS: dict[str, HUWindow] = {
    "soft_tissue": HUWindow("soft_tissue", -200.0, 200.0),  # default training window
    "wide": HUWindow("wide", -1024.0, 1024.0),  # the full-range evaluation window
    "lung": HUWindow("lung", -1350.0, 150.0),  # L -600 / W 1500
    "bone": HUWindow("bone", -500.0, 1300.0),  # L 400 / W 1800
    "mediastinum": HUWindow("mediastinum", -125.0, 225.0),  # L 50 / W 350
}

DEFAULT_WINDOW = "soft_tissue"


def get_window(name_or_range: str | tuple[float, float] | list[float]) -> HUWindow:
    """Look up a named window, or build one from an explicit ``[lo, hi]`` pair."""
    if isinstance(name_or_range, str):
        try:
            return WINDOWS[name_or_range]
        except KeyError:
            raise ConfigError(
                f"unknown HU window {name_or_range!r}; known: {', '.join(sorted(WINDOWS))}"
            ) from None
    lo, hi = (float(v) for v in name_or_range)
    return HUWindow(f"custom[{lo:g},{hi:g}]", lo, hi)
