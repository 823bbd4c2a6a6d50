"""Reprojection: render a reconstructed HU volume with the input geometry and compare it with
the input X-rays (the evaluator's reprojection metrics and ``xct reconstruct``'s QA).

:func:`render_views` is the one renderer call for a reconstruction (line integrals,
:func:`xct_core.drr.render`, ``params.hu.mu_water``, ``params.drr.method``/``step_fraction``);
:func:`reprojection_qa` compares each view with PSNR (``data_range = max − min`` of the input
view) and 2D Gaussian SSIM (σ ``eval.ssim_sigma``, ``eval.ssim_win`` taps) —
:func:`xct_core.metrics.reprojection_psnr` / :func:`~xct_core.metrics.ssim2d` — and warns for
a view below ``reconstruct.qa_min_psnr_db`` or ``reconstruct.qa_min_ssim``.

:func:`check_reconstruction` is the last word before a reconstruction leaves
:func:`xct_core.inference.reconstruct` (so ``xct reconstruct``, ``xct evaluate`` and the
registered pyfunc never return it): a volume with a NaN/Inf voxel, or whose dynamic range
(max − min) is below ``limits.min_dynamic_range_hu`` (a constant volume: what a broken
model or a garbage input produces), raises :class:`~xct_core.errors.InputError` naming the
model file with the reason, instead of being written as an all-zero CT.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

from xct_core.config import Params
from xct_core.errors import InputError
from xct_core.geometry import VIEWS, PlacedGeometry

__all__ = ["check_reconstruction", "qa_warnings", "render_views", "reprojection_qa"]


def check_reconstruction(hu: np.ndarray, source: Any, params: Params) -> None:
    """Refuse a reconstruction that is not a CT: any non-finite voxel, or a dynamic range
    (max − min, HU) below ``params.limits.min_dynamic_range_hu``. ``source``: what produced
    it (a file, or a network whose ``xct_source`` is its file), named in the
    :class:`InputError`."""
    where = getattr(source, "xct_source", None) if isinstance(source, torch.nn.Module) else source
    arr = np.asarray(hu)
    finite = np.isfinite(arr)
    bad = int(arr.size - np.count_nonzero(finite))
    if bad:
        n_nan = int(np.count_nonzero(np.isnan(arr)))
        raise InputError(where, f"the reconstruction has {bad} non-finite voxels ({n_nan} NaN, {bad - n_nan} Inf) "
                                f"of {arr.size}: the model's output is not a CT (NaN/Inf weights or an overflow?)")
    if arr.size == 0:
        raise InputError(where, "the reconstruction is empty")
    lo, hi = float(arr.min()), float(arr.max())
    floor = float(params.limits.min_dynamic_range_hu)
    if hi - lo < floor:
        raise InputError(where, f"degenerate reconstruction: every voxel is {lo:.6g} .. {hi:.6g} HU (dynamic range "
                                f"{hi - lo:.3g} < limits.min_dynamic_range_hu {floor:g}): a collapsed or broken model")


@torch.no_grad()
def render_views(
    hu: np.ndarray, affine: np.ndarray, geoms: Mapping[str, PlacedGeometry], params: Params
) -> dict[str, np.ndarray]:
    """Line-integral DRRs ``{view: float32 [P, P]}`` of a HU volume with the given placed
    geometries (``params.hu.mu_water``, ``params.drr.method``/``step_fraction``).

    A geometry placed on another grid is re-placed on this one with the same isocentre
    when the volume's centre is that isocentre (the rays only depend on the isocentre)."""
    from xct_core.drr import render

    vol = torch.from_numpy(np.ascontiguousarray(hu, dtype=np.float32))
    out = {}
    for view, pg in geoms.items():
        img = render(vol, affine, pg, mu_water=params.hu.mu_water, quantity="line_integral",
                     method=params.drr.method, step_fraction=params.drr.step_fraction)
        out[view] = img.numpy().astype(np.float32)
    return out


def _ssim_taps(shape: tuple[int, ...], want: int) -> int:
    """The SSIM window for an image: ``want`` taps, or the largest odd number that fits."""
    return min(int(want), min(shape) - (1 - min(shape) % 2))


def reprojection_qa(
    hu: np.ndarray,
    affine: np.ndarray,
    geoms: Mapping[str, PlacedGeometry],
    inputs: Mapping[str, np.ndarray],
    params: Params,
) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """Render ``hu`` with ``geoms`` and compare with ``inputs`` (line integrals) per view.

    Returns ``(report, reprojections)``; ``report`` = ``{"views": {view: {"psnr_db",
    "ssim", "data_range", "passed"}}, "thresholds": {...}, "passed": bool, "warnings":
    [lines], "protocol": text}``.
    """
    from xct_core.metrics import reprojection_psnr, ssim2d

    rc = params.reconstruct
    ev = params.eval
    reproj = render_views(hu, affine, geoms, params)
    views: dict[str, Any] = {}
    warnings: list[str] = []
    for view in VIEWS:
        if view not in inputs:
            continue
        ref, pred = np.asarray(inputs[view], dtype=np.float32), reproj[view]
        rng = float(ref.max() - ref.min())
        psnr = float(reprojection_psnr(pred, ref)) if rng > 0 else math.nan
        win = _ssim_taps(ref.shape, ev.ssim_win)
        ssim = float(ssim2d(pred, ref, sigma=ev.ssim_sigma, win=win)) if rng > 0 and win >= 3 else math.nan
        ok = math.isfinite(psnr) and math.isfinite(ssim) and psnr >= rc.qa_min_psnr_db and ssim >= rc.qa_min_ssim
        views[view] = {"psnr_db": psnr, "ssim": ssim, "data_range": rng, "ssim_win": win, "passed": ok,
                       "mae": float(np.abs(pred - ref).mean())}
        if not ok:
            warnings.append(
                f"reprojection QA: {view} PSNR {psnr:.2f} dB (min {rc.qa_min_psnr_db:g}), SSIM {ssim:.3f} "
                f"(min {rc.qa_min_ssim:g}) — the reconstruction does not reproduce this input X-ray well"
            )
    report = {
        "views": views,
        "thresholds": {"min_psnr_db": rc.qa_min_psnr_db, "min_ssim": rc.qa_min_ssim},
        "passed": all(v["passed"] for v in views.values()),
        "warnings": warnings,
        "protocol": ("DRR (line integral, input geometry) of the output HU volume vs the input view; PSNR "
                     "data_range = input max - min; 2D Gaussian SSIM sigma "
                     f"{ev.ssim_sigma:g}, window ssim_win taps, same data_range"),
    }
    return report, reproj


def qa_warnings(report: Mapping[str, Any]) -> list[str]:
    """The warning lines of a :func:`reprojection_qa` report."""
    return list(report.get("warnings") or [])
