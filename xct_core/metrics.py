"""Image-quality metrics for reconstructed CT volumes and their reprojections.

Inputs are torch tensors (any device) or NumPy arrays:

* volumes ``[X, Y, Z]`` (one volume) or batched ``[B, X, Y, Z]`` / ``[B, 1, X, Y, Z]``;
* images (DRRs) ``[H, W]`` or batched ``[B, H, W]`` / ``[B, 1, H, W]``.

A single input gives a Python ``float`` (``int`` for counts); a batched input gives a
NumPy ``float64`` array ``[B]`` with the metric of each sample ("batched = per-sample").
Axes follow docs/CONVENTIONS.md (RAS+, so axis Z = the last spatial axis is the axial,
inferior→superior axis).

Definitions (each metric's unit, better direction, labels and protocol sentence are declared
once, in :mod:`xct_core.metric_table`):

* PSNR = ``10·log10(data_range² / MSE)``, MSE over all voxels of a sample (3D PSNR).
  ``inf`` when the inputs are identical. :func:`psnr_window`: both inputs clipped to the
  normalised window [-1, 1], data_range = :attr:`HUWindow.normalised_range` (= 2).
  :func:`psnr_hu`: both clipped to [lo, hi] HU (default [-1024, 1024]), data_range hi − lo.
* SSIM (Wang et al. 2004) with a Gaussian window: σ = 1.5 voxels, ``win`` = 11 taps per
  axis (truncated, normalised), K1 = 0.01, K2 = 0.03, population (co)variances, mean over
  the "valid" region (voxels at least ``win // 2`` from every border) — the same number as
  ``skimage.metrics.structural_similarity(..., gaussian_weights=True, sigma=1.5,
  use_sample_covariance=False, data_range=R)``. Computed in float32 after dividing by R.
* Non-finite values: :func:`nan_count` counts NaN and ±Inf; the other metrics do not raise
  but return NaN (PSNR, SSIM, MAE) or ignore them (:func:`dynamic_range`).
* Slice-averaged metrics (:func:`slice_psnr`, :func:`slice_ssim`) are X2CT-style 2D
  metrics averaged over axial slices. They are NOT the 3D metrics (slice averages read
  several dB higher) and exist only to compare with papers that report them.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from xct_core.hu import HUWindow
from xct_core.metric_table import summed

ArrayLike = torch.Tensor | np.ndarray
Scalar = float | np.ndarray  # float for one sample, float64 array [B] for a batch

__all__ = [
    "psnr",
    "psnr_window",
    "psnr_hu",
    "mae_hu",
    "ssim3d",
    "ssim2d",
    "dynamic_range",
    "nan_count",
    "reprojection_psnr",
    "slice_psnr",
    "slice_ssim",
    "volume_metrics",
    "volume_metrics_per_sample",
    "hu_metrics_per_sample",
    "mean_rows",
    "body_mask",
    "masked_psnr",
    "ssim_taps",
    "METRIC_KEYS",
    "metric_kwargs",
]

#: keys of :func:`volume_metrics` (always present; reprojection keys are added per view)
METRIC_KEYS: tuple[str, ...] = (
    "psnr_window_db",
    "psnr_hu_db",
    "ssim_window",
    "mae_hu",
    "dynamic_range",
    "std",
    "nan_count",
    "psnr_slice_avg_db",
    "ssim_slice_avg",
)

#: PSNR given to a slice whose MSE is exactly 0 in the slice averages (keeps the mean finite)
SLICE_PSNR_CAP_DB = 100.0


# --------------------------------------------------------------------------------------
# input handling
# --------------------------------------------------------------------------------------


def _as_batch(x: ArrayLike, spatial: int, name: str = "input") -> tuple[torch.Tensor, bool]:
    """→ (float64 tensor ``[B, *spatial]`` on the input's device, was_batched)."""
    t = torch.from_numpy(np.asarray(x)) if not isinstance(x, torch.Tensor) else x
    t = t.detach()
    if t.dim() == spatial:
        return t.unsqueeze(0).to(torch.float64), False
    if t.dim() == spatial + 1:
        return t.to(torch.float64), True
    if t.dim() == spatial + 2 and t.shape[1] == 1:
        return t[:, 0].to(torch.float64), True
    kind = "volume [X,Y,Z]" if spatial == 3 else "image [H,W]"
    raise ValueError(
        f"{name}: expected a {kind}, its batch [B,...] or [B,1,...]; got shape {tuple(t.shape)}"
    )


def _pair(a: ArrayLike, b: ArrayLike, spatial: int) -> tuple[torch.Tensor, torch.Tensor, bool]:
    x, bx = _as_batch(a, spatial, "pred")
    y, by = _as_batch(b, spatial, "target")
    if x.shape != y.shape:
        raise ValueError(f"pred {tuple(x.shape)} and target {tuple(y.shape)} differ in shape")
    return x, y.to(x.device), bx or by


def _out(vals: torch.Tensor, batched: bool) -> Scalar:
    arr = vals.detach().to("cpu", torch.float64).numpy()
    return arr if batched else float(arr[0])


def _psnr_from_mse(mse: torch.Tensor, data_range: torch.Tensor | float) -> torch.Tensor:
    r = torch.as_tensor(data_range, dtype=torch.float64, device=mse.device)
    return 10.0 * torch.log10(r**2 / mse)


def _range_arg(ref: torch.Tensor, data_range: float | None) -> torch.Tensor:
    """Per-sample data_range ``[B]``: the given value, or ``max − min`` of ``ref``."""
    if data_range is None:
        return _per_sample_range(ref)
    return torch.full((ref.shape[0],), float(data_range), dtype=torch.float64, device=ref.device)


def _per_sample_range(ref: torch.Tensor) -> torch.Tensor:
    """max − min over the finite values of each sample (NaN if none)."""
    flat = ref.reshape(ref.shape[0], -1)
    fin = torch.isfinite(flat)
    hi = torch.where(fin, flat, torch.full_like(flat, -math.inf)).amax(dim=1)
    lo = torch.where(fin, flat, torch.full_like(flat, math.inf)).amin(dim=1)
    rng = hi - lo
    return torch.where(fin.any(dim=1), rng, torch.full_like(rng, math.nan))


# --------------------------------------------------------------------------------------
# PSNR / MAE
# --------------------------------------------------------------------------------------


def psnr(pred: ArrayLike, target: ArrayLike, data_range: float) -> Scalar:
    """3D PSNR (dB) of volumes, no clipping: ``10·log10(data_range² / MSE)``."""
    x, y, b = _pair(pred, target, 3)
    mse = ((x - y) ** 2).flatten(1).mean(dim=1)
    return _out(_psnr_from_mse(mse, float(data_range)), b)


def psnr_window(pred_norm: ArrayLike, target_norm: ArrayLike) -> Scalar:
    """3D PSNR in the training window: both volumes clipped to [-1, 1] (windowed units),
    data_range = :attr:`HUWindow.normalised_range` (= 2, the window width)."""
    x, y, b = _pair(pred_norm, target_norm, 3)
    x, y = x.clamp(-1.0, 1.0), y.clamp(-1.0, 1.0)
    mse = ((x - y) ** 2).flatten(1).mean(dim=1)
    return _out(_psnr_from_mse(mse, HUWindow.normalised_range), b)


def psnr_hu(pred_hu: ArrayLike, target_hu: ArrayLike, lo: float = -1024.0, hi: float = 1024.0) -> Scalar:
    """3D PSNR over a HU range: both volumes clipped to [lo, hi] HU, data_range = hi − lo
    (default [-1024, 1024] HU, data_range 2048)."""
    if not hi > lo:
        raise ValueError(f"need hi > lo, got [{lo}, {hi}]")
    x, y, b = _pair(pred_hu, target_hu, 3)
    x, y = x.clamp(lo, hi), y.clamp(lo, hi)
    mse = ((x - y) ** 2).flatten(1).mean(dim=1)
    return _out(_psnr_from_mse(mse, hi - lo), b)


def mae_hu(
    pred_hu: ArrayLike, target_hu: ArrayLike, lo: float | None = -1024.0, hi: float | None = 1024.0
) -> Scalar:
    """Mean absolute error in HU over all voxels; both volumes are first clipped to
    [lo, hi] HU (default [-1024, 1024], as :func:`psnr_hu`; ``None`` = no clipping)."""
    x, y, b = _pair(pred_hu, target_hu, 3)
    if lo is not None or hi is not None:
        x, y = x.clamp(lo, hi), y.clamp(lo, hi)
    return _out((x - y).abs().flatten(1).mean(dim=1), b)


def reprojection_psnr(drr_pred: ArrayLike, drr_ref: ArrayLike, data_range: float | None = None) -> Scalar:
    """2D PSNR of a DRR of the reconstruction against the reference view (one view at a time).

    No clipping. ``data_range`` default: ``max − min`` of ``drr_ref`` (per sample, finite
    values) — state it when reporting; pass a fixed value to compare across patients.
    """
    x, y, b = _pair(drr_pred, drr_ref, 2)
    r = _range_arg(y, data_range)
    mse = ((x - y) ** 2).flatten(1).mean(dim=1)
    return _out(_psnr_from_mse(mse, r), b)


# --------------------------------------------------------------------------------------
# SSIM
# --------------------------------------------------------------------------------------


def _gauss_kernel(sigma: float, win: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Normalised 1D Gaussian with ``win`` taps (= scipy.ndimage's kernel of radius win//2)."""
    if win < 1 or win % 2 == 0:
        raise ValueError(f"SSIM window must be a positive odd number, got {win}")
    if not sigma > 0:
        raise ValueError(f"SSIM sigma must be > 0, got {sigma}")
    r = win // 2
    i = torch.arange(-r, r + 1, dtype=torch.float64)
    g = torch.exp(-0.5 * (i / sigma) ** 2)
    return (g / g.sum()).to(device=device, dtype=dtype)


def _ssim(
    x: torch.Tensor,
    y: torch.Tensor,
    data_range: torch.Tensor,
    sigma: float,
    win: int,
    K1: float,
    K2: float,
) -> torch.Tensor:
    """Gaussian SSIM per sample of ``[B, *spatial]`` (2 or 3 spatial dims) → ``[B]`` float64."""
    nd = x.dim() - 1
    if any(s < win for s in x.shape[1:]):
        raise ValueError(f"SSIM window {win} exceeds the image extent {tuple(x.shape[1:])}")
    conv = F.conv3d if nd == 3 else F.conv2d
    dtype = torch.float32
    g = _gauss_kernel(sigma, win, dtype, x.device)
    C1, C2 = K1**2, K2**2  # data scaled to unit range below
    # process a chunk of samples at a time: ~2**24 voxels (a 256³ volume, or many slices)
    per = max(1, (1 << 24) // max(1, x[0].numel()))
    out = []
    for i in range(0, x.shape[0], per):
        r = data_range[i : i + per].view(-1, *([1] * nd))
        a = (x[i : i + per] / r).to(dtype)
        c = (y[i : i + per] / r).to(dtype)
        stack = torch.stack([a, c, a * a, c * c, a * c], dim=1)  # [n, 5, *spatial]
        for ax in range(nd):
            shape = [1] * nd
            shape[ax] = win
            w = g.view(1, 1, *shape).expand(5, 1, *shape)
            stack = conv(stack, w, groups=5)
        ux, uy, uxx, uyy, uxy = stack.to(torch.float64).unbind(dim=1)
        vx, vy, vxy = uxx - ux * ux, uyy - uy * uy, uxy - ux * uy
        s = ((2 * ux * uy + C1) * (2 * vxy + C2)) / ((ux * ux + uy * uy + C1) * (vx + vy + C2))
        out.append(s.flatten(1).mean(dim=1))
    return torch.cat(out)


def ssim3d(
    pred: ArrayLike,
    target: ArrayLike,
    data_range: float,
    *,
    sigma: float = 1.5,
    win: int = 11,
    K1: float = 0.01,
    K2: float = 0.03,
) -> Scalar:
    """3D SSIM with a separable Gaussian window (σ = 1.5 voxels, 11³ taps by default),
    K1 = 0.01, K2 = 0.03, population covariances, mean over the valid region; equals
    skimage's ``structural_similarity(gaussian_weights=True, sigma=1.5,
    use_sample_covariance=False, data_range=data_range)``. No clipping of the inputs."""
    x, y, b = _pair(pred, target, 3)
    return _out(_ssim(x, y, _range_arg(y, float(data_range)), sigma, win, K1, K2), b)


def ssim2d(
    pred: ArrayLike,
    target: ArrayLike,
    data_range: float | None = None,
    *,
    sigma: float = 1.5,
    win: int = 11,
    K1: float = 0.01,
    K2: float = 0.03,
) -> Scalar:
    """2D Gaussian SSIM (as :func:`ssim3d`, 11×11 window) of images, e.g. a DRR of the
    reconstruction against the input view. ``data_range`` default: ``max − min`` of
    ``target`` per sample (finite values)."""
    x, y, b = _pair(pred, target, 2)
    r = _range_arg(y, data_range)
    return _out(_ssim(x, y, r, sigma, win, K1, K2), b)


# --------------------------------------------------------------------------------------
# slice-averaged (X2CT-style, for comparison with papers only)
# --------------------------------------------------------------------------------------


def _axial_slices(x: torch.Tensor) -> torch.Tensor:
    """``[B, X, Y, Z]`` → ``[B·Z, X, Y]`` axial slices (Z = inferior→superior in RAS+)."""
    B, X, Y, Z = x.shape
    return x.permute(0, 3, 1, 2).reshape(B * Z, X, Y)


def slice_psnr(pred: ArrayLike, target: ArrayLike, data_range: float) -> Scalar:
    """SLICE-AVERAGED PSNR (X2CT-style; for comparison with papers only, not a 3D PSNR).

    For each axial slice (fixed Z index) ``10·log10(data_range² / MSE_slice)``, then the
    mean over slices. Slices with MSE = 0 count as :data:`SLICE_PSNR_CAP_DB` (100 dB).
    No clipping (clip beforehand, as :func:`volume_metrics` does).
    """
    x, y, b = _pair(pred, target, 3)
    mse = ((x - y) ** 2).mean(dim=(1, 2))  # [B, Z]
    p = _psnr_from_mse(mse, float(data_range))
    p = torch.where(mse == 0, torch.full_like(p, SLICE_PSNR_CAP_DB), p)
    return _out(p.mean(dim=1), b)


def slice_ssim(
    pred: ArrayLike,
    target: ArrayLike,
    data_range: float,
    *,
    sigma: float = 1.5,
    win: int = 11,
    K1: float = 0.01,
    K2: float = 0.03,
) -> Scalar:
    """SLICE-AVERAGED SSIM (X2CT-style; for comparison with papers only, not a 3D SSIM).

    2D Gaussian SSIM (:func:`ssim2d` parameters, fixed ``data_range``) of every axial
    slice, averaged over slices."""
    x, y, b = _pair(pred, target, 3)
    B, Z = x.shape[0], x.shape[3]
    r = torch.full((B * Z,), float(data_range), dtype=torch.float64, device=x.device)
    s = _ssim(_axial_slices(x), _axial_slices(y), r, sigma, win, K1, K2).reshape(B, Z)
    return _out(s.mean(dim=1), b)


# --------------------------------------------------------------------------------------
# sanity metrics
# --------------------------------------------------------------------------------------


def dynamic_range(x: ArrayLike) -> tuple[Scalar, Scalar]:
    """``(max − min, std)`` of a volume over its finite values (population std), in the
    input's units — small values flag a collapsed (constant) output. NaN when no value is
    finite."""
    v, b = _as_batch(x, 3, "x")
    flat = v.reshape(v.shape[0], -1)
    fin = torch.isfinite(flat)
    rng = _per_sample_range(v)
    n = fin.sum(dim=1).to(torch.float64)
    z = torch.where(fin, flat, torch.zeros_like(flat))
    mean = z.sum(dim=1) / n
    var = (torch.where(fin, flat - mean[:, None], torch.zeros_like(flat)) ** 2).sum(dim=1) / n
    return _out(rng, b), _out(var.sqrt(), b)


def nan_count(x: ArrayLike) -> int | np.ndarray:
    """Number of non-finite values (NaN or ±Inf) of a volume (int) or per sample (int64 [B])."""
    v, b = _as_batch(x, 3, "x")
    n = (~torch.isfinite(v)).reshape(v.shape[0], -1).sum(dim=1).cpu().numpy().astype(np.int64)
    return n if b else int(n[0])


# --------------------------------------------------------------------------------------
# the full set
# --------------------------------------------------------------------------------------


def metric_kwargs(eval_params: Any) -> dict[str, Any]:
    """Keyword arguments of :func:`volume_metrics` from the ``eval:`` section of params.yaml
    (``xct_core.config.EvalParams``): ``volume_metrics(p, t, w, **metric_kwargs(params.eval))``."""
    return {
        "hu_range": (float(eval_params.hu_lo), float(eval_params.hu_hi)),
        "ssim_sigma": float(eval_params.ssim_sigma),
        "ssim_win": int(eval_params.ssim_win),
    }


def ssim_taps(size: int, win: int = 11) -> int:
    """The SSIM window for a ``size``³ grid: ``win`` taps, or the largest odd number ≤
    ``size // 2 − 1`` when that is smaller (16³ → 7 taps, a valid region of 10³ voxels; with
    11 taps a 16³ volume keeps only 6³ and the mean volume passes a 0.65 SSIM gate by itself)."""
    cap = size // 2 - 1
    cap -= 1 - cap % 2  # odd
    return max(3, min(int(win), cap))


def body_mask(target_hu: ArrayLike, body_hu: float = -500.0) -> torch.Tensor:
    """The body of a CT (bool, same shape): per axial slice (RAS+: the last axis), the
    hole-filled set of voxels above ``body_hu`` — lungs and airways inside the chest wall count,
    the air and the scanner padding around the patient do not."""
    from scipy.ndimage import binary_fill_holes

    t, _ = _as_batch(target_hu, 3, "target_hu")
    m = (t > body_hu).cpu().numpy()
    out = np.zeros_like(m)
    for b in range(m.shape[0]):
        for z in range(m.shape[-1]):
            out[b, :, :, z] = binary_fill_holes(m[b, :, :, z])
    return torch.from_numpy(out).to(t.device)


def masked_psnr(pred: ArrayLike, target: ArrayLike, mask: ArrayLike, data_range: float) -> Scalar:
    """3D PSNR with the MSE over the voxels of ``mask`` only (NaN for an empty mask)."""
    x, y, b = _pair(pred, target, 3)
    m, _ = _as_batch(mask, 3, "mask")
    m = m.to(x.device, torch.float64)
    n = m.flatten(1).sum(dim=1)
    mse = (((x - y) ** 2) * m).flatten(1).sum(dim=1) / n.clamp(min=1)
    p = _psnr_from_mse(mse, float(data_range))
    return _out(torch.where(n > 0, p, torch.full_like(p, math.nan)), b)


def hu_metrics_per_sample(
    pred_hu: ArrayLike,
    target_hu: ArrayLike,
    window: HUWindow,
    *,
    hu_range: tuple[float, float] = (-1024.0, 1024.0),
    ssim_sigma: float = 1.5,
    ssim_win: int = 11,
    views: Mapping[str, tuple[ArrayLike, ArrayLike]] | None = None,
    body_hu: float | None = None,
) -> list[dict[str, float]]:
    """THE metric set, per sample, of volumes in HU (the one implementation; training
    validation, evaluation, ``xct evaluate`` and the gates all read these keys).

    Args:
        pred_hu, target_hu: ``[X, Y, Z]`` or a batch, in HU (the target over its full range).
        window: the evaluation window: ``psnr_window_db`` / ``ssim_window`` compare both
            volumes windowed (clipped) to it, data_range 2 (= the window's width).
        hu_range: [lo, hi] HU of ``psnr_hu_db`` / ``mae_hu`` / slice averages (both clipped
            to it; data_range hi − lo).
        ssim_sigma, ssim_win: Gaussian SSIM window (voxels).
        views: ``{"frontal": (drr_of_pred, input_view), …}`` → ``reproj_psnr_<view>_db``,
            ``reproj_ssim_<view>`` (data_range = input max − min).
        body_hu: also ``psnr_window_body_db`` / ``psnr_hu_body_db``: the same PSNRs with the
            MSE inside the target's :func:`body_mask` only (the air around the patient, most
            of a demo grid and 30-60 % of a chest CT's, no longer inflates them).

    Keys (:data:`METRIC_KEYS` + reprojection + body): as :func:`volume_metrics`;
    ``dynamic_range`` / ``std`` are those of the windowed prediction (window units),
    ``nan_count`` counts non-finite prediction voxels.
    """
    ph, th, _ = _pair(pred_hu, target_hu, 3)
    B = ph.shape[0]
    lo, hi = float(hu_range[0]), float(hu_range[1])
    x, y = window.forward(ph), window.forward(th)
    phc, thc = ph.clamp(lo, hi), th.clamp(lo, hi)

    def arr(v: Any) -> np.ndarray:
        return np.asarray(v, dtype=np.float64).reshape(B)

    rng, std = dynamic_range(x)
    cols: dict[str, np.ndarray] = {
        "psnr_window_db": arr(psnr_window(x, y)),
        "psnr_hu_db": arr(psnr_hu(phc, thc, lo, hi)),
        "ssim_window": arr(ssim3d(x, y, HUWindow.normalised_range, sigma=ssim_sigma, win=ssim_win)),
        "mae_hu": arr(mae_hu(phc, thc, lo, hi)),
        "dynamic_range": arr(rng),
        "std": arr(std),
        "nan_count": arr(nan_count(ph)),
        "psnr_slice_avg_db": arr(slice_psnr(phc, thc, hi - lo)),
        "ssim_slice_avg": arr(slice_ssim(phc, thc, hi - lo, sigma=ssim_sigma, win=ssim_win)),
    }
    if body_hu is not None:
        mask = body_mask(th, body_hu)
        cols["psnr_window_body_db"] = arr(masked_psnr(x, y, mask, HUWindow.normalised_range))
        cols["psnr_hu_body_db"] = arr(masked_psnr(phc, thc, mask, hi - lo))
        cols["body_fraction"] = arr(mask.flatten(1).double().mean(dim=1).cpu().numpy())
    for name, (drr_pred, drr_ref) in (views or {}).items():
        dp, _ = _as_batch(drr_pred, 2, f"views[{name}] pred")
        dr, _ = _as_batch(drr_ref, 2, f"views[{name}] ref")
        if dp.shape[0] != B:
            raise ValueError(f"views[{name}]: batch {dp.shape[0]} != volume batch {B}")
        cols[f"reproj_psnr_{name}_db"] = arr(reprojection_psnr(dp, dr))
        cols[f"reproj_ssim_{name}"] = arr(ssim2d(dp, dr, sigma=ssim_sigma, win=ssim_win))
    return [{k: float(v[i]) for k, v in cols.items()} for i in range(B)]


def volume_metrics_per_sample(
    pred_norm: ArrayLike,
    target_norm: ArrayLike,
    window: HUWindow,
    *,
    target_hu: ArrayLike | None = None,
    hu_range: tuple[float, float] = (-1024.0, 1024.0),
    ssim_sigma: float = 1.5,
    ssim_win: int = 11,
    views: Mapping[str, tuple[ArrayLike, ArrayLike]] | None = None,
) -> list[dict[str, float]]:
    """:func:`volume_metrics` for each sample of a batch (one dict per sample): window-unit
    inputs mapped to HU, then :func:`hu_metrics_per_sample`."""
    x, y, _ = _pair(pred_norm, target_norm, 3)
    if target_hu is not None:
        t_hu, _ = _as_batch(target_hu, 3, "target_hu")
        if t_hu.shape != x.shape:
            raise ValueError(f"target_hu {tuple(t_hu.shape)} does not match pred {tuple(x.shape)}")
        t_hu = t_hu.to(x.device)
    else:
        t_hu = window.inverse(y.clamp(-1.0, 1.0))
    rows = hu_metrics_per_sample(window.inverse(x.clamp(-1.0, 1.0)), t_hu, window, hu_range=hu_range,
                                 ssim_sigma=ssim_sigma, ssim_win=ssim_win, views=views)
    # spread and non-finite count of the RAW window-unit prediction (clipping would hide both)
    B = x.shape[0]
    rng, std = (np.asarray(v, dtype=np.float64).reshape(B) for v in dynamic_range(x))
    bad = np.asarray(nan_count(x), dtype=np.float64).reshape(B)
    for i, r in enumerate(rows):
        r["dynamic_range"], r["std"], r["nan_count"] = float(rng[i]), float(std[i]), float(bad[i])
    return rows


def mean_rows(rows: Sequence[Mapping[str, Any]]) -> dict[str, float]:
    """Mean of each numeric key over rows (the metric table's counts, ``*nan_count``: the
    sum, :func:`xct_core.metric_table.summed`); the one aggregation of per-sample /
    per-patient metrics. Non-numeric values (an ``id``) are skipped."""
    out: dict[str, float] = {}
    keys = [k for k in rows[0] if isinstance(rows[0][k], (int, float, np.floating, np.integer))
            and not isinstance(rows[0][k], bool)] if rows else []
    for k in keys:
        vals = np.array([float(r.get(k, math.nan)) for r in rows], dtype=np.float64)
        out[k] = float(vals.sum()) if summed(k) else float(vals.mean())
    return out


def volume_metrics(
    pred_norm: ArrayLike,
    target_norm: ArrayLike,
    window: HUWindow,
    *,
    target_hu: ArrayLike | None = None,
    hu_range: tuple[float, float] = (-1024.0, 1024.0),
    ssim_sigma: float = 1.5,
    ssim_win: int = 11,
    views: Mapping[str, tuple[ArrayLike, ArrayLike]] | None = None,
) -> dict[str, float]:
    """The full metric set of window-unit volumes (batch: the mean over samples).

    Args:
        pred_norm, target_norm: windowed volumes in [-1, 1] (``window.forward``), one
            ``[X, Y, Z]`` or a batch; both are clipped to [-1, 1].
        window: the window (maps [-1, 1] back to HU).
        target_hu: the reference in HU over its full range. Without it the HU metrics
            compare ``window.inverse`` of both windowed volumes, i.e. they only see
            the window's HU span — pass it for the honest wide-range numbers.
        hu_range: [lo, hi] HU of the wide-range metrics (data_range hi − lo).
        ssim_sigma, ssim_win: Gaussian SSIM window (voxels).
        views: optional ``{"frontal": (drr_of_pred, input_view), "lateral": …}`` → adds
            ``reproj_psnr_<view>_db`` and ``reproj_ssim_<view>`` (data_range = ref max−min).

    Returns (stable keys, :data:`METRIC_KEYS`):
        ``psnr_window_db`` 3D PSNR in the window (data_range 2); ``psnr_hu_db`` 3D PSNR
        over ``hu_range``; ``ssim_window`` 3D SSIM in the window (data_range 2); ``mae_hu``;
        ``dynamic_range`` / ``std`` of ``pred_norm`` (window units, finite values);
        ``nan_count`` (non-finite values in ``pred_norm``); ``psnr_slice_avg_db`` /
        ``ssim_slice_avg`` X2CT-style axial slice averages over ``hu_range`` (papers only).
        For a batch: the mean over samples (``nan_count``: the total). Metrics of a sample
        with non-finite values are NaN, so the batch mean is NaN too.
    """
    return mean_rows(volume_metrics_per_sample(
        pred_norm, target_norm, window, target_hu=target_hu, hu_range=hu_range,
        ssim_sigma=ssim_sigma, ssim_win=ssim_win, views=views,
    ))
