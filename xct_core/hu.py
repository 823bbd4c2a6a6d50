"""Hounsfield units ↔ [-1, 1]: windows (evaluation and display views) and the networks' map.

* :class:`HUWindow` — a named [lo, hi] range mapped linearly to [-1, 1]. The forward map
  clips to the window, so ``inverse(forward(hu))`` is ``clip(hu, lo, hi)``. A window's width
  in normalised units is always 2, the ``data_range`` of PSNR/SSIM computed on windowed
  volumes (one source of truth: :attr:`HUWindow.normalised_range`). Windows are VIEWS of a
  CT: the gates read PSNR/SSIM in ``hu.window`` (soft tissue by default).
* :class:`HUMap` — the units the stage networks predict in: a monotone piecewise-linear map
  from HU knots to unit knots spanning [-1, 1] (``hu.output`` in params). With the knots of a
  window it is that window (values outside are clipped); a full-range map lets the networks
  output air, lung and bone.

Both work on NumPy arrays and torch tensors alike (torch keeps gradients inside the range).
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


def _clip(x: ArrayT, lo: float, hi: float) -> ArrayT:
    if hasattr(x, "clamp"):
        return x.clamp(lo, hi)  # type: ignore[return-value]
    return np.clip(x, lo, hi)  # type: ignore[return-value]


def _piecewise(x: ArrayT, xs: tuple[float, ...], ys: tuple[float, ...]) -> ArrayT:
    """Monotone piecewise-linear interpolation ``xs → ys`` of ``x`` clipped to [xs[0], xs[-1]],
    written as ``ys[0] + Σ slope_i · clip(x − xs[i], 0, xs[i+1] − xs[i])`` (differentiable in
    torch, no searchsorted)."""
    out = x * 0.0 + ys[0]
    for (x0, x1), (y0, y1) in zip(zip(xs, xs[1:]), zip(ys, ys[1:])):
        out = out + (y1 - y0) / (x1 - x0) * _clip(x - x0, 0.0, x1 - x0)
    if not hasattr(out, "clamp"):
        out = np.asarray(out).astype(np.result_type(out, np.float32), copy=False)
    return out  # type: ignore[return-value]


@dataclass(frozen=True)
class HUMap:
    """The networks' units: HU ↔ [-1, 1], monotone piecewise linear through the knots.

    ``hu``: strictly increasing HU knots; ``unit``: strictly increasing unit knots from -1 to
    1. :meth:`forward` clips HU to ``[hu[0], hu[-1]]`` (the representable range);
    :meth:`inverse` clips units to [-1, 1]. A two-knot map is a window.
    """

    name: str
    hu: tuple[float, ...]
    unit: tuple[float, ...]

    def __post_init__(self) -> None:
        h, u = tuple(float(v) for v in self.hu), tuple(float(v) for v in self.unit)
        object.__setattr__(self, "hu", h)
        object.__setattr__(self, "unit", u)
        if len(h) < 2 or len(h) != len(u):
            raise ConfigError(f"HU map {self.name!r}: need >= 2 knots and as many unit knots, got {len(h)} / {len(u)}")
        if not all(np.isfinite(h)) or any(b <= a for a, b in zip(h, h[1:])):
            raise ConfigError(f"HU map {self.name!r}: HU knots must be finite and strictly increasing, got {list(h)}")
        if u[0] != -1.0 or u[-1] != 1.0 or any(b <= a for a, b in zip(u, u[1:])):
            raise ConfigError(f"HU map {self.name!r}: unit knots must increase strictly from -1 to 1, got {list(u)}")

    @classmethod
    def from_window(cls, w: HUWindow) -> HUMap:
        return cls(w.name, (w.lo, w.hi), (-1.0, 1.0))

    @property
    def lo(self) -> float:
        """Lowest representable HU."""
        return self.hu[0]

    @property
    def hi(self) -> float:
        """Highest representable HU."""
        return self.hu[-1]

    def forward(self, hu: ArrayT) -> ArrayT:
        """HU → units in [-1, 1] (HU clipped to the representable range first)."""
        return _piecewise(hu, self.hu, self.unit)

    def inverse(self, x: ArrayT) -> ArrayT:
        """Units → HU (units clipped to [-1, 1] first)."""
        return _piecewise(x, self.unit, self.hu)

    def hu_per_unit(self, hu: float) -> float:
        """Local slope dHU/dunit at ``hu`` (how many HU one unit is worth there)."""
        i = int(np.clip(np.searchsorted(self.hu, hu, side="right") - 1, 0, len(self.hu) - 2))
        return (self.hu[i + 1] - self.hu[i]) / (self.unit[i + 1] - self.unit[i])


#: named output maps of the networks (``hu.output``). ``soft60``: soft tissue [-200, 200] HU
#: gets 60 % of [-1, 1] (0.6 unit per 200 HU, 1.67x finer than a linear [-1024, 1024] map),
#: air/lung [-1024, -200] and bone [200, 1024] HU 20 % each — on 16 validation phantoms it
#: kept the window PSNR of a window-only network (30.71 vs 30.74 dB, direct twin) while the
#: HU PSNR over [-1024, 1024] went from 10.3 to 36.9 dB. ``wide``: linear over [-1024, 1024]
#: HU (soft tissue gets 400/2048 of the range; -1.3 dB window PSNR on the same set).
OUTPUT_MAPS: dict[str, HUMap] = {
    "soft60": HUMap("soft60", (-1024.0, -200.0, 200.0, 1024.0), (-1.0, -0.6, 0.6, 1.0)),
    "wide": HUMap("wide", (-1024.0, 1024.0), (-1.0, 1.0)),
}
