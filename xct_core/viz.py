"""Pictures: slice montages, image rows and CT previews (PNG, matplotlib Agg, atomic writes).

Display conventions (docs/CONVENTIONS.md; volumes are canonical RAS+ ``[X, Y, Z]``):

- axial (a slice at fixed k, viewed from the feet): patient's right on the image's
  left, anterior at the top;
- coronal (fixed j, viewed from the front): patient's right on the left, superior at
  the top;
- sagittal (fixed i, viewed from the patient's left): anterior on the left, superior at
  the top — the same orientation as a lateral DRR;
- DRRs come from :func:`xct_core.drr.render` already in display order (row 0 superior;
  frontal: patient's right on the left; lateral: anterior on the left).

Figures are drawn with matplotlib's object API on an Agg canvas (no pyplot, no global
backend switch), written to a temporary file next to the target and renamed into place.
Inputs may be NumPy arrays or (CPU or CUDA) torch tensors.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Union

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from xct_core.atomic import atomic_path, file_mode  # noqa: F401  (file_mode re-exported)
from xct_core.hu import HUWindow, get_window

WindowLike = Union[str, HUWindow, Sequence[float]]
#: slice planes in montage column order
PLANES: tuple[str, ...] = ("axial", "coronal", "sagittal")


def to_numpy(x: Any) -> np.ndarray:
    """A NumPy array from an array-like or a torch tensor (detached, moved to the CPU)."""
    if hasattr(x, "detach"):
        x = x.detach().cpu().numpy()
    return np.asarray(x)


def as_window(w: WindowLike) -> HUWindow:
    """An :class:`HUWindow` from a window, a name in :data:`xct_core.hu.WINDOWS` or ``(lo, hi)``."""
    return w if isinstance(w, HUWindow) else get_window(w)  # type: ignore[arg-type]


def _spacing(spacing: Any) -> tuple[float, float, float]:
    if spacing is None:
        return (1.0, 1.0, 1.0)
    a = np.asarray(to_numpy(spacing), dtype=np.float64)
    if a.shape == (4, 4):  # an affine
        a = np.sqrt((a[:3, :3] ** 2).sum(axis=0))
    if a.shape != (3,) or not np.all(a > 0):
        raise ValueError(f"spacing must be 3 positive numbers or a 4x4 affine, got {spacing!r}")
    return (float(a[0]), float(a[1]), float(a[2]))


def orthogonal_slice(volume: Any, plane: str, index: int | None = None) -> np.ndarray:
    """A display-oriented 2D slice of a RAS+ volume ``[X, Y, Z]`` (see the module conventions).

    ``index``: the voxel index along the plane's normal (default: the centre).
    """
    v = to_numpy(volume)
    if v.ndim != 3:
        raise ValueError(f"volume must be 3D [X, Y, Z], got shape {v.shape}")
    axis = {"axial": 2, "coronal": 1, "sagittal": 0}.get(plane)
    if axis is None:
        raise ValueError(f"plane must be one of {PLANES}, got {plane!r}")
    n = v.shape[axis]
    k = n // 2 if index is None else int(index)
    if not 0 <= k < n:
        raise ValueError(f"{plane} index {k} outside [0, {n})")
    if plane == "axial":  # rows: anterior → posterior, cols: right → left
        return v[::-1, ::-1, k].T
    if plane == "coronal":  # rows: superior → inferior, cols: right → left
        return v[::-1, k, ::-1].T
    return v[k, ::-1, ::-1].T  # sagittal, rows: superior → inferior, cols: anterior → posterior


def slice_aspect(plane: str, spacing: Any = None) -> float:
    """``imshow`` aspect (row pitch / column pitch) of a plane for voxel ``spacing`` (mm or affine)."""
    sx, sy, sz = _spacing(spacing)
    return {"axial": sy / sx, "coronal": sz / sx, "sagittal": sz / sy}[plane]


@dataclass(frozen=True)
class Panel:
    """One image in a grid: the 2D array (row 0 at the top) and how to show it."""

    image: np.ndarray
    title: str = ""
    vmin: float | None = None
    vmax: float | None = None
    cmap: str = "gray"
    aspect: float = 1.0


def _robust_limits(img: np.ndarray) -> tuple[float, float]:
    finite = img[np.isfinite(img)]
    if finite.size == 0:
        return 0.0, 1.0
    lo, hi = np.percentile(finite, [0.5, 99.5])
    if hi <= lo:
        hi = lo + 1.0
    return float(lo), float(hi)


def _atomic_savefig(fig: Figure, path: Path, dpi: int) -> Path:
    path = Path(path)
    with atomic_path(path, ".png") as tmp:
        FigureCanvasAgg(fig)
        fig.savefig(tmp, format="png", dpi=dpi, facecolor="black")
    return path


def save_image_grid(
    rows: Mapping[str, Sequence[Panel]],
    path: str | Path,
    *,
    title: str | None = None,
    panel_size: float = 2.6,
    dpi: int = 100,
) -> Path:
    """Save a grid of panels (one row per key, labelled with the key) as a PNG, atomically.

    Panels with ``vmin``/``vmax`` left as None are scaled to their 0.5-99.5 percentiles.
    """
    if not rows:
        raise ValueError("nothing to draw: no rows")
    n_rows = len(rows)
    n_cols = max(len(p) for p in rows.values())
    if n_cols == 0:
        raise ValueError("nothing to draw: empty rows")
    fig = Figure(figsize=(panel_size * n_cols, panel_size * n_rows + (0.4 if title else 0.0)), facecolor="black")
    axes = fig.subplots(n_rows, n_cols, squeeze=False)
    for r, (name, panels) in enumerate(rows.items()):
        for c in range(n_cols):
            ax = axes[r, c]
            ax.set_axis_off()
            if c >= len(panels):
                continue
            p = panels[c]
            img = np.asarray(to_numpy(p.image), dtype=np.float32)
            if img.ndim != 2:
                raise ValueError(f"panel {name!r}/{p.title!r}: image must be 2D, got shape {img.shape}")
            lo, hi = _robust_limits(img)
            vmin = lo if p.vmin is None else p.vmin
            vmax = hi if p.vmax is None else p.vmax
            ax.imshow(img, cmap=p.cmap, vmin=vmin, vmax=vmax, aspect=p.aspect, interpolation="nearest")
            label = f"{name}\n{p.title}" if c == 0 and name else p.title
            ax.set_title(label, color="white", fontsize=8)
    if title:
        fig.suptitle(title, color="white", fontsize=10)
    fig.tight_layout()
    return _atomic_savefig(fig, Path(path), dpi)


def slice_panels(
    volume: Any,
    windows: WindowLike | Sequence[WindowLike] = "soft_tissue",
    *,
    planes: Sequence[str] = PLANES,
    index: Sequence[int | None] | None = None,
    spacing: Any = None,
) -> list[Panel]:
    """Panels of a HU volume: every plane in every window (windows outer, planes inner).

    ``index``: voxel indices (i, j, k) of the slices (None entries: the centre);
    ``spacing``: voxel size (mm) or the affine, for the aspect ratio.
    """
    wins = _windows(windows)
    idx = tuple(index) if index is not None else (None, None, None)
    normal = {"sagittal": 0, "coronal": 1, "axial": 2}
    panels = []
    for w in wins:
        for plane in planes:
            img = orthogonal_slice(volume, plane, idx[normal[plane]])
            panels.append(Panel(img, f"{plane} · {w.name}", w.lo, w.hi, "gray", slice_aspect(plane, spacing)))
    return panels


def _windows(windows: WindowLike | Sequence[WindowLike]) -> list[HUWindow]:
    if isinstance(windows, (str, HUWindow)):
        return [as_window(windows)]
    seq = list(windows)  # type: ignore[arg-type]
    if len(seq) == 2 and all(isinstance(v, (int, float, np.floating, np.integer)) for v in seq):
        return [as_window(seq)]  # one explicit (lo, hi) window
    return [as_window(w) for w in seq]


def save_slice_montage(
    volumes: Mapping[str, Any],
    path: str | Path,
    window: WindowLike | Sequence[WindowLike] = "soft_tissue",
    *,
    planes: Sequence[str] = PLANES,
    index: Sequence[int | None] | None = None,
    spacing: Any = None,
    title: str | None = None,
) -> Path:
    """Axial/coronal/sagittal slices of several HU volumes: one row per volume.

    ``volumes``: name → RAS+ ``[X, Y, Z]`` HU array/tensor (shapes may differ);
    ``window``: one window or several (name, ``(lo, hi)`` or :class:`HUWindow`), each
    giving a set of plane columns; ``index``: slice voxel indices (i, j, k), default the
    centre of each volume; ``spacing``: mm per axis or an affine — one for all volumes or
    a mapping name → spacing.
    """
    rows = {}
    for name, vol in volumes.items():
        sp = spacing.get(name) if isinstance(spacing, Mapping) else spacing
        rows[name] = slice_panels(vol, window, planes=planes, index=index, spacing=sp)
    return save_image_grid(rows, path, title=title)


def save_image_row(
    images: Mapping[str, Any],
    path: str | Path,
    *,
    cmap: str = "gray",
    vmin: float | None = None,
    vmax: float | None = None,
    shared_scale: bool = False,
    title: str | None = None,
) -> Path:
    """One row of 2D images (name → ``[rows, cols]``, row 0 at the top), saved as a PNG.

    Limits: ``vmin``/``vmax`` if given, else each image's 0.5-99.5 percentiles, or — with
    ``shared_scale`` — the percentiles over all images (to compare e.g. a DRR with its
    reprojection).
    """
    arrays = {k: np.asarray(to_numpy(v), dtype=np.float32) for k, v in images.items()}
    if shared_scale and (vmin is None or vmax is None):
        lo, hi = _robust_limits(np.concatenate([a.ravel() for a in arrays.values()]))
        vmin = lo if vmin is None else vmin
        vmax = hi if vmax is None else vmax
    panels = [Panel(a, k, vmin, vmax, cmap) for k, a in arrays.items()]
    return save_image_grid({"": panels}, path, title=title)


def drr_pair(
    volume_hu: Any,
    affine: Any,
    *,
    kind: str = "parallel",
    pixels: int | None = None,
    pixel_mm: float | None = None,
    sdd: float = 1500.0,
    sod: float = 1000.0,
    mu_water: float = 0.02,
) -> dict[str, np.ndarray]:
    """Frontal and lateral line-integral DRRs (``xct_core.drr.render``) in display order.

    Defaults cover the whole volume: ``pixels`` = the largest grid dimension and
    ``pixel_mm`` = the largest voxel spacing × the magnification.
    """
    import torch

    from xct_core.drr import render
    from xct_core.geometry import ProjectionGeometry, as_affine

    aff = as_affine(affine)
    vol = torch.as_tensor(to_numpy(volume_hu), dtype=torch.float32)
    sp = _spacing(aff)
    n = int(pixels or max(vol.shape))
    mag = sdd / sod if kind == "cone" else 1.0
    pm = float(pixel_mm or max(sp) * mag)
    out = {}
    with torch.no_grad():
        for view in ("frontal", "lateral"):
            geom = ProjectionGeometry(view, kind, n, pm, sdd, sod)  # type: ignore[arg-type]
            out[view] = render(vol, aff, geom, mu_water=mu_water).numpy()
    return out


def ct_preview_panels(
    volume_hu: Any,
    affine: Any,
    *,
    windows: Sequence[WindowLike] = ("soft_tissue", "lung"),
    drr: Mapping[str, Any] | None = None,
    mu_water: float = 0.02,
) -> list[Panel]:
    """Panels for one CT: axial/coronal/sagittal slices in each window, then the frontal
    and lateral DRRs (``drr``: keyword arguments of :func:`drr_pair`; ``None`` → whole-volume
    parallel beam)."""
    panels = slice_panels(volume_hu, windows, spacing=affine)
    pair = drr_pair(volume_hu, affine, mu_water=mu_water, **dict(drr or {}))
    for view, img in pair.items():
        panels.append(Panel(img, f"DRR {view}"))  # line integral: dense = white, as on film
    return panels


def save_ct_preview(
    cases: Mapping[str, tuple[Any, Any]],
    path: str | Path,
    *,
    windows: Sequence[WindowLike] = ("soft_tissue", "lung"),
    drr: Mapping[str, Any] | None = None,
    mu_water: float = 0.02,
    title: str | None = None,
) -> Path:
    """One row per CT (name → ``(hu [X, Y, Z], affine)``): slices in each window + DRR pair."""
    rows = {}
    for name, (hu, aff) in cases.items():
        rows[name] = ct_preview_panels(hu, aff, windows=windows, drr=drr, mu_water=mu_water)
    return save_image_grid(rows, path, title=title)
