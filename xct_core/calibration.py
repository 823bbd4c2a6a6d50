"""Calibration and realism of the diffusion's uncertainty — one source of each formula.

The cascade's K samples are the product: their voxel-wise mean is a point estimate and their
spread a claim about its error. This module measures whether the claim holds, fits the two
corrections chosen on the VALIDATION split, and measures realism of single samples. Pure
numpy (+ scipy's Spearman); no torch.

Conventions (stated once, used everywhere)
------------------------------------------
* Voxels: the metrics below are computed over the voxels of a mask — the evaluator passes
  the body mask of the target (:func:`xct_core.metrics.body_mask`, ``ingest.body_hu``): the
  air around a patient is trivially predicted and would inflate every coverage. Units: HU,
  unclipped (what ``xct reconstruct`` writes).
* ``std`` is the sample standard deviation of the K samples with ``ddof = 1``
  (:func:`xct_core.inference.reconstruct`).
* **Spread-skill ratio** (:func:`spread_skill`): ``sqrt(mean std²) · sqrt((K+1)/K) / RMSE``
  with RMSE the root-mean-square error of the K-mean. For K exchangeable draws from the
  true predictive distribution (variance σ²), E[std²] = σ² and E[(mean − y)²] = σ²(1 + 1/K),
  so the ratio is 1 for a calibrated sampler at any K; < 1: over-confident (spread too
  small), > 1: under-confident.
* **Rank histogram** (:func:`rank_histogram`): the rank of the truth among the K samples
  (K + 1 bins, ties broken uniformly at random); flat = calibrated. **[min, max] coverage**
  = the fraction of voxels whose rank is neither 0 nor K; calibrated: (K − 1)/(K + 1).
* **Split-conformal interval** (:func:`fit_conformal`): normalised score
  ``|y − mean| / max(std, floor)``; on the val split ``q`` = the ``ceil((n+1)·level)``-th
  smallest of the n pooled val voxel scores; the interval is
  ``mean ± q · max(std, floor)``. Voxels of one patient are not exchangeable with each
  other, patients are: the finite-sample correction over voxels is the standard pooled
  form (n is 10⁴–10⁶, so it moves q by < 10⁻⁴); the test split checks the coverage.
* **σ-recalibration** (:func:`fit_sigma_scale`): the scalar ``s`` with spread-skill = 1
  on the pooled val voxels; the std the product reports is ``s · std``.
* **AUSE** (:func:`ause`): area under the sparsification-error curve — remove the fraction
  f of voxels with the largest std, RMSE of the rest, minus the same with the oracle order
  (largest true |error| first), both divided by the full RMSE, averaged over f = 0, 1/20, …,
  19/20. 0 = the std ranks errors perfectly; larger = worse.
* **Spearman** (:func:`spearman_std_error`): rank correlation of std and |error| over the mask.
* **Radial power spectrum** (:func:`band_power`): the whole grid, window-normalised
  ([-1, 1] in the evaluation window), mean removed, |3D FFT|², radial frequency
  ``|k| / k_Nyquist`` (``k`` in cycles/voxel, Nyquist 0.5); ``bands`` equal bands of
  [0, 1] (the corners beyond the axis Nyquist are left out); band power = mean |F|² in the
  band. :func:`power_ratio` = prediction / truth per band; the top band is the finest
  detail a sample has (a posterior mean is smooth: ratio ≪ 1; a realistic sample ≈ 1).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

__all__ = [
    "CALIBRATION_FORMAT",
    "CALIBRATION_JSON",
    "COVERAGE_LEVELS",
    "PSD_BANDS",
    "Calibration",
    "CaseScores",
    "ause",
    "band_power",
    "conformal_quantile",
    "coverage",
    "coverage_curve",
    "fit_calibration",
    "fit_conformal",
    "fit_sigma_scale",
    "minmax_coverage",
    "power_ratio",
    "rank_histogram",
    "read_calibration",
    "spearman_std_error",
    "spread_skill",
    "truth_ranks",
]

#: the file the evaluate step writes beside metrics.json and the registered model carries
CALIBRATION_JSON = "calibration.json"
CALIBRATION_FORMAT = "xct-calibration/1"
#: nominal levels of the calibration plot (expected vs observed coverage)
COVERAGE_LEVELS: tuple[float, ...] = (0.5, 0.6, 0.7, 0.8, 0.9, 0.95)
#: radial bands of [0, Nyquist] of the power-spectrum ratio (the top one is reported)
PSD_BANDS = 5


def _flat(a: np.ndarray, mask: np.ndarray | None) -> np.ndarray:
    a = np.asarray(a, dtype=np.float64)
    return a.reshape(-1) if mask is None else a[np.asarray(mask, dtype=bool)]


# --------------------------------------------------------------------------- spread vs skill


def spread_skill(mean: np.ndarray, std: np.ndarray, truth: np.ndarray, k: int, mask: np.ndarray | None = None,
                 scale: float = 1.0) -> float:
    """``sqrt(mean (scale·std)²) · sqrt((K+1)/K) / RMSE(mean)`` over ``mask`` (module
    docstring); NaN when the RMSE is 0 or the mask empty."""
    if k < 2:
        raise ValueError(f"spread-skill needs K >= 2 samples, got {k}")
    s, e = _flat(std, mask) * scale, _flat(mean, mask) - _flat(truth, mask)
    if e.size == 0:
        return math.nan
    rmse = math.sqrt(float(np.mean(e**2)))
    return math.sqrt(float(np.mean(s**2)) * (k + 1) / k) / rmse if rmse > 0 else math.nan


def fit_sigma_scale(sum_var: float, sum_sq_err: float, k: int) -> float:
    """The ``s`` with spread-skill 1 on pooled voxels: ``sqrt(Σ err² / (Σ std² · (K+1)/K))``
    (``sum_var`` = Σ std², ``sum_sq_err`` = Σ (mean − y)² over the same voxels)."""
    if sum_var <= 0 or k < 2:
        return math.nan
    return math.sqrt(sum_sq_err / (sum_var * (k + 1) / k))


# --------------------------------------------------------------------------- ranks


def truth_ranks(samples: np.ndarray, truth: np.ndarray, mask: np.ndarray | None = None,
                rng: np.random.Generator | int | None = 0) -> np.ndarray:
    """Rank (0 … K) of the truth among the K samples per voxel (``samples``: [K, …]);
    ties broken uniformly at random (``rng``)."""
    x = np.asarray(samples)
    k = x.shape[0]
    xs = x.reshape(k, -1) if mask is None else x[:, np.asarray(mask, dtype=bool)]
    y = _flat(truth, mask)
    below = (xs < y).sum(axis=0)
    ties = (xs == y).sum(axis=0)
    gen = rng if isinstance(rng, np.random.Generator) else np.random.default_rng(rng)
    return below + np.floor(gen.random(y.shape) * (ties + 1)).astype(np.int64)


def rank_histogram(ranks: np.ndarray, k: int) -> np.ndarray:
    """Fractions of voxels per rank 0 … K (K + 1 bins; flat 1/(K+1) = calibrated)."""
    h = np.bincount(np.asarray(ranks, dtype=np.int64), minlength=k + 1).astype(np.float64)
    return h / max(h.sum(), 1.0)


def minmax_coverage(ranks: np.ndarray, k: int) -> float:
    """Fraction of voxels with the truth inside [min, max] of the K samples (rank 1 … K−1);
    calibrated: (K − 1)/(K + 1)."""
    r = np.asarray(ranks)
    return float(np.mean((r > 0) & (r < k))) if r.size else math.nan


# --------------------------------------------------------------------------- conformal


def normalised_scores(mean: np.ndarray, std: np.ndarray, truth: np.ndarray, floor: float,
                      mask: np.ndarray | None = None) -> np.ndarray:
    """``|y − mean| / max(std, floor)`` over ``mask``."""
    return np.abs(_flat(truth, mask) - _flat(mean, mask)) / np.maximum(_flat(std, mask), float(floor))


def conformal_quantile(scores: np.ndarray, level: float) -> float:
    """Split-conformal quantile: the ``ceil((n+1)·level)``-th smallest of the n calibration
    scores (= their ``ceil((n+1)·level)/n`` empirical quantile; +inf when that rank exceeds
    n: too few scores)."""
    if not 0.0 < level < 1.0:
        raise ValueError(f"coverage level must be in (0, 1), got {level}")
    s = np.asarray(scores, dtype=np.float64).reshape(-1)
    n = s.size
    if n == 0:
        raise ValueError("no calibration scores")
    r = math.ceil((n + 1) * level - 1e-9)  # the r-th smallest score (1-based)
    return math.inf if r > n else float(np.partition(s, r - 1)[r - 1])


def fit_conformal(scores: np.ndarray, levels: Sequence[float]) -> dict[float, float]:
    """``{level: q}`` for each level (:func:`conformal_quantile`)."""
    return {float(a): conformal_quantile(scores, a) for a in levels}


def interval(mean: np.ndarray, std: np.ndarray, q: float, floor: float) -> tuple[np.ndarray, np.ndarray]:
    """The conformal interval ``mean ± q · max(std, floor)`` (same shapes as ``mean``)."""
    half = float(q) * np.maximum(np.asarray(std, dtype=np.float32), np.float32(floor))
    m = np.asarray(mean, dtype=np.float32)
    return (m - half).astype(np.float32), (m + half).astype(np.float32)


def coverage(scores: np.ndarray, q: float) -> float:
    """Fraction of normalised scores ≤ q (= the truth inside ``mean ± q·max(std, floor)``)."""
    s = np.asarray(scores)
    return float(np.mean(s <= q)) if s.size else math.nan


# --------------------------------------------------------------------------- error ranking


def ause(std: np.ndarray, abs_err: np.ndarray, mask: np.ndarray | None = None, n_fractions: int = 20) -> float:
    """Area under the sparsification-error curve (module docstring; RMSE, normalised)."""
    u, e = _flat(std, mask), _flat(abs_err, mask)
    n = e.size
    if n == 0:
        return math.nan
    e2 = e**2
    total = math.sqrt(float(e2.mean()))
    if total == 0:
        return 0.0

    def curve(order: np.ndarray) -> np.ndarray:
        # order: voxels from most to least uncertain; remove the first f·n, RMSE of the rest
        tail = np.cumsum(e2[order][::-1])[::-1]  # tail[i] = Σ e² of order[i:]
        out = []
        for j in range(n_fractions):
            i = int(math.floor(j / n_fractions * n))
            out.append(math.sqrt(tail[i] / (n - i)))
        return np.asarray(out) / total

    model = curve(np.argsort(-u, kind="stable"))
    oracle = curve(np.argsort(-e, kind="stable"))
    return float(np.mean(model - oracle))


def spearman_std_error(std: np.ndarray, abs_err: np.ndarray, mask: np.ndarray | None = None) -> float:
    """Spearman rank correlation of std and |error| over ``mask`` (NaN when either is constant)."""
    from scipy.stats import spearmanr

    u, e = _flat(std, mask), _flat(abs_err, mask)
    if u.size < 3 or np.ptp(u) == 0 or np.ptp(e) == 0:
        return math.nan
    return float(spearmanr(u, e).statistic)


# --------------------------------------------------------------------------- power spectrum


def band_power(vol: np.ndarray, bands: int) -> np.ndarray:
    """Mean |3D FFT|² of the mean-removed volume in ``bands`` equal radial bands of
    [0, Nyquist] (module docstring); the DC term is left out."""
    v = np.asarray(vol, dtype=np.float64)
    p = np.abs(np.fft.fftn(v - v.mean())) ** 2
    grids = np.meshgrid(*[np.fft.fftfreq(n) for n in v.shape], indexing="ij")
    r = np.sqrt(sum(g**2 for g in grids)) / 0.5
    edges = np.linspace(0.0, 1.0, bands + 1)
    out = np.empty(bands)
    for b in range(bands):
        sel = (r > edges[b]) & (r <= edges[b + 1])
        out[b] = float(p[sel].mean()) if sel.any() else math.nan
    return out


def power_ratio(pred: np.ndarray, truth: np.ndarray, bands: int) -> np.ndarray:
    """Band power of ``pred`` / band power of ``truth`` (NaN where the truth has none)."""
    t = band_power(truth, bands)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(t > 0, band_power(pred, bands) / t, math.nan)


# --------------------------------------------------------------------------- fitted calibration


@dataclass
class CaseScores:
    """What one case contributes to a fit (body voxels): the normalised scores and the
    sums of the spread-skill ratio."""

    scores: np.ndarray  #: |y − mean| / max(std, floor)
    sum_var: float  #: Σ std²
    sum_sq_err: float  #: Σ (mean − y)²
    ranks: np.ndarray  #: truth ranks 0 … K

    @classmethod
    def of(cls, samples: np.ndarray, mean: np.ndarray, std: np.ndarray, truth: np.ndarray, mask: np.ndarray,
           floor: float, seed: int = 0) -> CaseScores:
        e = _flat(mean, mask) - _flat(truth, mask)
        return cls(normalised_scores(mean, std, truth, floor, mask), float(np.sum(_flat(std, mask) ** 2)),
                   float(np.sum(e**2)), truth_ranks(samples, truth, mask, seed))


@dataclass
class Calibration:
    """The calibration of one stage fitted on val (``calibration.json``, format
    :data:`CALIBRATION_FORMAT`): ``sigma_scale`` s (reported std = s · raw std), the
    conformal quantile ``q`` at ``level`` (interval = mean ± q · max(raw std, floor_hu)),
    the quantiles of the plot's levels, and where it was fitted."""

    stage: int
    samples: int  #: K the fit was made at (q and s hold for this K)
    level: float
    q: float
    sigma_scale: float
    floor_hu: float
    quantiles: dict[str, float] = field(default_factory=dict)  #: "0.9" → q at that level
    fitted_on: dict[str, Any] = field(default_factory=dict)  #: split, n_patients, n_voxels, ids_hash
    point_estimate: str = "mean"  #: what the interval is centred on (eval.point_estimate)
    format: str = CALIBRATION_FORMAT

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, doc: Mapping[str, Any], source: str = "calibration") -> Calibration:
        if doc.get("format") != CALIBRATION_FORMAT:
            raise ValueError(f"{source}: not an xct calibration (format {doc.get('format')!r}, "
                             f"expected {CALIBRATION_FORMAT!r})")
        try:
            cal = cls(stage=int(doc["stage"]), samples=int(doc["samples"]), level=float(doc["level"]),
                      q=float(doc["q"]), sigma_scale=float(doc["sigma_scale"]), floor_hu=float(doc["floor_hu"]),
                      quantiles={str(k): float(v) for k, v in dict(doc.get("quantiles") or {}).items()},
                      fitted_on=dict(doc.get("fitted_on") or {}), point_estimate=str(doc.get("point_estimate", "mean")))
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(f"{source}: malformed calibration ({e})") from None
        if not (math.isfinite(cal.q) and cal.q > 0 and math.isfinite(cal.sigma_scale) and cal.sigma_scale > 0):
            raise ValueError(f"{source}: q and sigma_scale must be finite and > 0, got {cal.q}, {cal.sigma_scale}")
        return cal

    def interval(self, mean: np.ndarray, std: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The calibrated ``level`` interval (lo, hi) in HU."""
        return interval(mean, std, self.q, self.floor_hu)

    def std(self, std: np.ndarray) -> np.ndarray:
        """The recalibrated std ``s · std`` (HU)."""
        return (np.asarray(std, dtype=np.float32) * np.float32(self.sigma_scale)).astype(np.float32)


def fit_calibration(cases: Sequence[CaseScores], *, stage: int, samples: int, level: float, floor_hu: float,
                    fitted_on: Mapping[str, Any] | None = None, point_estimate: str = "mean") -> Calibration:
    """Fit ``s`` and ``q`` on the pooled voxels of the val ``cases``."""
    if not cases:
        raise ValueError("no validation cases to fit a calibration on")
    scores = np.concatenate([c.scores for c in cases])
    qs = fit_conformal(scores, sorted({*COVERAGE_LEVELS, float(level)}))
    s = fit_sigma_scale(sum(c.sum_var for c in cases), sum(c.sum_sq_err for c in cases), samples)
    return Calibration(stage=stage, samples=samples, level=float(level), q=qs[float(level)], sigma_scale=s,
                       floor_hu=float(floor_hu), quantiles={f"{a:g}": v for a, v in qs.items()},
                       fitted_on={**(fitted_on or {}), "n_voxels": int(scores.size)}, point_estimate=point_estimate)


def coverage_curve(cases: Sequence[CaseScores], calibration: Calibration | None, k: int,
                   levels: Sequence[float] = COVERAGE_LEVELS) -> dict[str, Any]:
    """Expected vs observed coverage over the pooled voxels of ``cases`` (the calibration
    plot; ``k``: the samples per case): the Gaussian interval ``point ± z_p · std`` raw and recalibrated (``z_p · s · std``),
    and the conformal interval with the val quantile of each level; plus the pooled rank
    histogram."""
    from scipy.stats import norm

    scores = np.concatenate([c.scores for c in cases]) if cases else np.empty(0)
    ranks = np.concatenate([c.ranks for c in cases]) if cases else np.empty(0, dtype=np.int64)
    z = [float(norm.ppf(0.5 + a / 2)) for a in levels]
    out: dict[str, Any] = {"levels": [float(a) for a in levels], "n_voxels": int(scores.size),
                           "gaussian_raw": [coverage(scores, zi) for zi in z]}
    if calibration is not None:
        out["gaussian_recal"] = [coverage(scores, zi * calibration.sigma_scale) for zi in z]
        qs = calibration.quantiles
        out["conformal"] = [coverage(scores, qs[f"{a:g}"]) if f"{a:g}" in qs else math.nan for a in levels]
    if ranks.size:
        out["rank_histogram"] = [float(v) for v in rank_histogram(ranks, k)]
    return out


def read_calibration(path: str | Path) -> Calibration:
    """A ``calibration.json`` (or an evaluation ``metrics.json`` carrying one under
    ``calibration``); :class:`~xct_core.errors.InputError` naming the file otherwise."""
    from xct_core.errors import InputError
    from xct_core.jsondoc import read_json_doc

    doc = read_json_doc(path, "calibration")
    if isinstance(doc, dict) and "calibration" in doc and "format" not in doc:
        doc = doc["calibration"]
    if not isinstance(doc, dict):
        raise InputError(path, "not a calibration (expected a JSON object)")
    try:
        return Calibration.from_json(doc, str(path))
    except ValueError as e:
        raise InputError(path, str(e).removeprefix(f"{path}: ")) from None
