"""THE metric table: every metric the evaluator emits, declared once.

Each :class:`Metric` says what a key of :func:`xct_core.evaluation.evaluate_case`'s metrics
is: its unit, which direction is better, its labels, the function that computes it, which
outputs may show or judge it (:data:`USES`), how rows are aggregated and the protocol
sentence that defines it. Every consumer reads the table instead of keeping its own list:

* the HTML report (:mod:`xct_core.report`), the model card (:mod:`xct_core.model_card`),
  the pipeline verdict ``reports/summary.json`` (:mod:`components.pipeline_verdict`) and the
  real-data tables (:mod:`pipelines.realct`) pick the metrics marked for them, in table order;
* the evaluation protocol (:meth:`xct_core.evaluation.EvalProtocol.describe`, written to
  ``metrics.json``) is :func:`definitions`; :func:`xct_core.metrics.mean_rows` sums the
  ``aggregate="sum"`` metrics and averages the others;
* params that name a metric (``train.best_metric``, ``hpo.metric``,
  ``gates.stageK.relative[].metric``) are checked against it when they load
  (:func:`check_param_metric`, called by :mod:`xct_core.config`): an unknown name is an error.

Adding a metric = compute it in :func:`xct_core.metrics.hu_metrics_per_sample` (or
:func:`~xct_core.evaluation.evaluate_case`) + one entry here; ``tests/test_metric_table.py``
fails while either is missing.

Names: a metric is emitted once per prediction (:data:`PREDICTIONS`: the key prefixed with
``single_`` / ``mean_`` / ``direct_`` / ``baseline_`` / ``upsampled_``) unless ``per_prediction``
is false; a name with
``{view}`` is emitted once per X-ray view (:data:`xct_core.geometry.VIEWS`).

Pure data: no torch import (the config loads it), nothing from outside xct_core.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

__all__ = [
    "METRICS",
    "KMEAN_PREFIX",
    "PREDICTIONS",
    "UPSAMPLED_PREFIX",
    "USES",
    "Metric",
    "Prediction",
    "baseline_prefix",
    "check_param_metric",
    "definitions",
    "emitted_names",
    "entry",
    "label",
    "lookup",
    "names_for",
    "summed",
]

#: who may use a metric: ``report`` (HTML report tables), ``card`` (model card), ``realct``
#: (real-data tables), ``summary`` (``reports/summary.json`` stage metrics), ``gate`` (the
#: absolute checks of :func:`xct_core.gates.evaluate_gate`)
USES = frozenset({"report", "card", "realct", "summary", "gate"})

Better = Literal["higher", "lower", "none"]


@dataclass(frozen=True)
class Metric:
    """One metric (module docstring). Labels and the definition are ``str.format``
    templates: labels may use ``{sigma}``, ``{taps}``, ``{hu_lo}``, ``{hu_hi}``,
    ``{hu_span}`` and ``{view}``; definitions ``{window}``, ``{wlo}``, ``{whi}``, ``{sigma}``,
    ``{taps_text}``, ``{body_hu}``, ``{hu_lo}``, ``{hu_hi}``, ``{hu_span}``
    (:meth:`xct_core.evaluation.EvalProtocol.label_context`)."""

    name: str  #: the key (``{view}``: one per view)
    unit: str  #: "dB", "HU", "count", "window units", "" (dimensionless)
    better: Better
    label: str  #: the long label (HTML report)
    short: str  #: the column label of the real-data tables
    computed_by: str  #: dotted path of the function that computes it
    uses: frozenset[str] = frozenset()
    per_prediction: bool = True  #: emitted for every prediction prefix (False: once per case)
    aggregate: Literal["mean", "sum"] = "mean"  #: over patients (:func:`xct_core.metrics.mean_rows`)
    #: prefixes (besides the prediction itself) whose value the run summary and the report's
    #: per-patient table show beside it (``baseline_``, ``direct_``)
    shown_with: tuple[str, ...] = ()
    definition: str | None = None  #: the protocol sentence (:func:`definitions`)
    defined_with: str | None = None  #: shares the definition of that metric (one sentence, key "a / b")
    digits: int = 2  #: decimals in the real-data tables
    papers_only: bool = False  #: X2CT-style slice average: shown apart, for comparison with papers only

    @property
    def per_view(self) -> bool:
        return "{view}" in self.name

    def names(self, views: tuple[str, ...] | None = None) -> tuple[str, ...]:
        """The emitted key(s): one, or one per view."""
        if not self.per_view:
            return (self.name,)
        return tuple(self.name.format(view=v) for v in (views if views is not None else _views()))

    @property
    def comparable(self) -> bool:
        """May be named by a selection or a relative gate: measured per prediction, with a
        direction."""
        return self.per_prediction and self.better != "none"


@dataclass(frozen=True)
class Prediction:
    """One prediction the evaluator measures (its key prefix) and its labels."""

    prefix: str
    card: str  #: model card column
    table: str  #: real-data table row
    report: str | None  #: HTML report column (None: not shown)
    gate_baseline: str | None = None  #: its name as a relative gate's ``baseline``


#: the prefix of the K-sample mean (K > 1), measured whatever ``eval.point_estimate`` is: the
#: twin non-inferiority check (:mod:`xct_core.gates`) judges it
KMEAN_PREFIX = "mean_"
#: the prefix of the "previous stage upsampled" baseline (stage k > 1 only): stage k − 1's point
#: estimate (``eval.point_estimate`` for stage k − 1, from the same K runs) upsampled to stage k's
#: grid as the cascade upsamples its condition (:func:`xct_core.evaluation.upsample_previous`)
UPSAMPLED_PREFIX = "upsampled_"

PREDICTIONS: tuple[Prediction, ...] = (
    Prediction("", "cascade (posterior mean of the samples)", "diffusion cascade", "cascade"),
    Prediction("single_", "cascade, one sample", "diffusion cascade, one sample", None),
    Prediction("mean_", "cascade, K-sample mean", "diffusion cascade, K-sample mean", None),
    Prediction("direct_", "direct-regression twin", "direct regression", "direct regression", "direct_twin"),
    Prediction("baseline_", "mean volume (train split)", "mean volume (train split)", "mean volume", "mean_volume"),
    Prediction(UPSAMPLED_PREFIX, "previous stage upsampled", "previous stage upsampled", "previous stage upsampled"),
)

_TABLES = frozenset({"report", "card", "realct"})

#: the table, in the order every output lists the metrics
METRICS: tuple[Metric, ...] = (
    Metric("psnr_window_db", "dB", "higher", "3D PSNR in the training window, range 2 (dB)", "PSNR window (dB)",
           "xct_core.metrics.psnr_window", _TABLES | {"summary", "gate"},
           shown_with=("baseline_", "direct_", UPSAMPLED_PREFIX),
           definition="3D PSNR in the evaluation window {window} [{wlo:g}, {whi:g}] HU (both clipped), data_range 2"),
    Metric("ssim_window", "", "higher", "3D SSIM in the window (Gaussian σ {sigma:g}, {taps}³, range 2)", "SSIM (3D)",
           "xct_core.metrics.ssim3d", _TABLES | {"summary", "gate"}, digits=3,
           definition="3D SSIM in the window, Gaussian sigma {sigma:g}, {taps_text}, data_range 2, "
                      "mean over the valid region"),
    Metric("psnr_window_body_db", "dB", "higher", "3D PSNR in the window inside the body (dB)",
           "PSNR window body (dB)", "xct_core.metrics.masked_psnr", frozenset({"card", "report", "summary", "gate"}),
           shown_with=("baseline_", "direct_", UPSAMPLED_PREFIX),
           definition="the same PSNRs with the MSE inside the body only: per axial slice the hole-filled target "
                      "> {body_hu:g} HU"),
    Metric("psnr_hu_db", "dB", "higher", "3D PSNR [{hu_lo:g},{hu_hi:g}] HU, range {hu_span:g} (dB)",
           "PSNR [-1024,1024] HU (dB)", "xct_core.metrics.psnr_hu", _TABLES | {"summary"},
           definition="3D PSNR, both volumes clipped to [{hu_lo:g}, {hu_hi:g}] HU, data_range {hu_span:g}"),
    Metric("psnr_hu_body_db", "dB", "higher", "3D PSNR [{hu_lo:g},{hu_hi:g}] HU inside the body (dB)",
           "PSNR HU body (dB)", "xct_core.metrics.masked_psnr", frozenset({"card"}),
           defined_with="psnr_window_body_db"),
    Metric("mae_hu", "HU", "lower", "MAE [{hu_lo:g},{hu_hi:g}] HU", "MAE (HU)", "xct_core.metrics.mae_hu",
           _TABLES | {"summary"}, digits=1, definition="mean absolute error, clipped to [{hu_lo:g}, {hu_hi:g}] HU"),
    Metric("reproj_psnr_{view}_db", "dB", "higher", "reprojection PSNR {view} (dB, range = input max−min)",
           "reproj. PSNR {view} (dB)", "xct_core.metrics.reprojection_psnr", _TABLES,
           definition="2D PSNR of the reconstruction's DRR vs the input view, data_range = input max-min"),
    Metric("reproj_ssim_{view}", "", "higher", "reprojection SSIM {view} (range = input max−min)",
           "reproj. SSIM {view}", "xct_core.metrics.ssim2d", digits=3),
    Metric("psnr_slice_avg_db", "dB", "higher", "X2CT-style axial slice-average PSNR (dB; papers only)",
           "slice-avg PSNR (dB, X2CT-style)", "xct_core.metrics.slice_psnr", _TABLES, papers_only=True,
           definition="X2CT-style axial SLICE AVERAGES over the HU range (papers only)"),
    Metric("ssim_slice_avg", "", "higher", "X2CT-style axial slice-average SSIM (papers only)",
           "slice-avg SSIM (X2CT-style)", "xct_core.metrics.slice_ssim", _TABLES, digits=3, papers_only=True,
           defined_with="psnr_slice_avg_db"),
    Metric("nan_count", "count", "lower", "non-finite output voxels", "NaN voxels", "xct_core.metrics.nan_count",
           frozenset({"summary", "gate"}), aggregate="sum", digits=0),
    Metric("std", "window units", "none", "std of the output in the window", "std (window)",
           "xct_core.metrics.dynamic_range", frozenset({"summary", "gate"}), digits=3),
    Metric("dynamic_range", "window units", "none", "max − min of the output in the window", "range (window)",
           "xct_core.metrics.dynamic_range", digits=3),
    Metric("body_fraction", "", "none", "fraction of the grid inside the body", "body fraction",
           "xct_core.metrics.body_mask", digits=3),
    Metric("target_std", "window units", "none", "std of the target in the window", "target std (window)",
           "xct_core.metrics.dynamic_range", frozenset({"summary", "gate"}), per_prediction=False, digits=3),
    Metric("gain_over_upsampled_db", "dB", "higher", "PSNR gain in the window over the previous stage upsampled (dB)",
           "gain over prev. stage (dB)", "xct_core.evaluation.gain_over_upsampled",
           frozenset({"report", "card", "realct", "summary"}), per_prediction=False,
           definition="stage k > 1: psnr_window_db of the point estimate minus that of the previous stage "
                      "upsampled (upsampled_: stage k-1's point estimate from the same samples, upsampled in the "
                      "networks' units as the cascade upsamples its condition, trilinear), per patient"),
    Metric("uncertainty_mean_std_hu", "HU", "none", "mean voxel-wise std over the samples (HU)", "mean sample std (HU)",
           "xct_core.inference.reconstruct", frozenset({"report"}), per_prediction=False, digits=1),
    Metric("psd_top_band_ratio", "", "none", "top radial power band / the truth's (1 = as detailed)",
           "top-band power ratio", "xct_core.calibration.power_ratio", frozenset({"report", "card", "realct"}),
           shown_with=("single_", "direct_"), digits=2,
           definition="radial power spectrum of the whole grid in the window ([-1, 1], mean removed, |3D FFT|^2), "
                      "5 equal bands of [0, Nyquist]: the top band's power of the prediction / of the truth "
                      "(single_: one sample, realism target ~1; a posterior mean is smoother, < 1)"),
    Metric("spread_skill", "", "none", "spread-skill ratio of the samples (1 = calibrated, < 1 over-confident)",
           "spread-skill", "xct_core.calibration.spread_skill", frozenset({"report", "card", "realct", "summary"}),
           per_prediction=False,
           definition="body mask: sqrt(mean std^2)·sqrt((K+1)/K) / RMSE of the K-sample mean (std ddof 1, HU); "
                      "1 = calibrated at any K"),
    Metric("spread_skill_recal", "", "none", "spread-skill ratio with the std × s fitted on val",
           "spread-skill (recal.)", "xct_core.calibration.spread_skill", frozenset({"report", "card", "realct"}),
           per_prediction=False, defined_with="spread_skill"),
    Metric("coverage_minmax", "", "none", "truth inside [min, max] of the K samples (calibrated: (K−1)/(K+1))",
           "[min,max] coverage", "xct_core.calibration.minmax_coverage", frozenset({"report"}), per_prediction=False,
           digits=3, definition="body mask: fraction of voxels whose truth ranks 1…K-1 among the K samples "
                                "(ties broken at random); calibrated: (K-1)/(K+1)"),
    Metric("conformal_coverage", "", "none", "coverage of the split-conformal interval fitted on val (nominal: "
           "eval.calibration.level)", "conformal coverage", "xct_core.calibration.coverage",
           frozenset({"report", "card", "realct", "summary"}), per_prediction=False, digits=3,
           definition="body mask: fraction of voxels with |y - point| <= q·max(std, floor_hu), q the "
                      "ceil((n+1)·level)-th smallest val score (calibration.json)"),
    Metric("ause", "", "lower", "area under the sparsification-error curve (RMSE, normalised; 0 = std ranks "
           "errors perfectly)", "AUSE", "xct_core.calibration.ause", frozenset({"report"}), per_prediction=False,
           digits=3, definition="body mask: mean over f = 0, 0.05, …, 0.95 of RMSE(rest after removing the f most "
                                "uncertain voxels) minus the same removing the largest true errors, / full RMSE"),
    Metric("spearman_std_abs_err", "", "higher", "Spearman(std, |error|) per volume", "Spearman(std, |err|)",
           "xct_core.calibration.spearman_std_error", frozenset({"report", "card", "realct"}), per_prediction=False,
           digits=3, definition="body mask: Spearman rank correlation of the samples' std and |K-mean - truth|"),
)

_BY_NAME: dict[str, Metric] = {m.name: m for m in METRICS}
_TEMPLATES: tuple[tuple[re.Pattern[str], Metric], ...] = tuple(
    (re.compile(re.escape(m.name).replace(re.escape("{view}"), "(?P<view>[a-z0-9]+)") + "$"), m)
    for m in METRICS if m.per_view
)


def _views() -> tuple[str, ...]:
    from xct_core.geometry import VIEWS  # lazily: geometry imports torch, the config must not

    return tuple(VIEWS)


def _resolve(base: str) -> tuple[Metric, str] | None:
    """(entry, view) of an unprefixed key, or None."""
    m = _BY_NAME.get(base)
    if m is not None and not m.per_view:
        return m, ""
    for rx, cand in _TEMPLATES:
        hit = rx.match(base)
        if hit and hit["view"] in _views():
            return cand, hit["view"]
    return None


def entry(key: str) -> Metric:
    """The entry of an unprefixed key (``reproj_psnr_frontal_db``) or of an entry's own name
    (``reproj_psnr_{view}_db``); KeyError when the table does not know it."""
    hit = _BY_NAME.get(key) or (_resolve(key) or (None, ""))[0]
    if hit is None:
        raise KeyError(f"{key!r} is not in the metric table")
    return hit


def lookup(key: str, prefixes: tuple[str, ...] | None = None) -> tuple[str, Metric] | None:
    """``(prefix, entry)`` of an emitted key (``direct_reproj_psnr_lateral_db`` →
    ``("direct_", reproj_psnr_{view}_db)``), or None when the table does not know it.
    ``prefixes``: the prediction prefixes allowed (default: all)."""
    allowed = tuple(p.prefix for p in PREDICTIONS) if prefixes is None else prefixes
    for prefix in sorted(allowed, key=len, reverse=True):
        if not key.startswith(prefix):
            continue
        hit = _resolve(key[len(prefix):])
        if hit is not None and (prefix == "" or hit[0].per_prediction):
            return prefix, hit[0]
    return None


def emitted_names(views: tuple[str, ...] | None = None) -> set[str]:
    """Every key the table declares, expanded over predictions and views."""
    out: set[str] = set()
    for m in METRICS:
        for n in m.names(views):
            out.update({p.prefix + n for p in PREDICTIONS} if m.per_prediction else {n})
    return out


def names_for(use: str, views: tuple[str, ...] | None = None) -> tuple[str, ...]:
    """The (unprefixed) keys marked for ``use`` (:data:`USES`), in table order, views expanded."""
    if use not in USES:
        raise ValueError(f"unknown metric use {use!r} (known: {', '.join(sorted(USES))})")
    return tuple(n for m in METRICS if use in m.uses for n in m.names(views))


def summed(key: str) -> bool:
    """Whether patient rows of ``key`` are summed (a count) rather than averaged."""
    hit = lookup(key)
    return hit is not None and hit[1].aggregate == "sum"


def label(key: str, context: Mapping[str, Any] | None = None, *, short: bool = False) -> str:
    """The label of an (unprefixed) key, formatted with ``context``
    (:meth:`xct_core.evaluation.EvalProtocol.label_context`). ``ValueError`` when the label
    needs a value the context lacks (e.g. the SSIM taps: never a default)."""
    hit = _resolve(key)
    if hit is None:
        raise KeyError(f"{key!r} is not in the metric table")
    m, view = hit
    try:
        return (m.short if short else m.label).format(**{**(context or {}), "view": view})
    except KeyError as e:
        raise ValueError(f"the label of {key} needs {e.args[0]!r} (pass the evaluation protocol's label context)") from None


def definitions(context: Mapping[str, Any]) -> dict[str, str]:
    """The protocol sentences: key (``a / b`` when metrics share one; ``<view>`` for a
    per-view metric) → the definition formatted with ``context``."""
    out: dict[str, str] = {}
    for m in METRICS:
        if m.definition is None:
            continue
        key = " / ".join(x.name.replace("{view}", "<view>") for x in (m, *(o for o in METRICS if o.defined_with == m.name)))
        out[key] = m.definition.format(**context)
    return out


def baseline_prefix(baseline: str) -> str:
    """The key prefix of a relative gate's ``mean_volume`` / ``direct_twin`` baseline."""
    for p in PREDICTIONS:
        if p.gate_baseline == baseline:
            return p.prefix
    raise KeyError(f"no prediction is the relative-gate baseline {baseline!r}")


def check_param_metric(name: str, prefixes: tuple[str, ...] = ("",)) -> str:
    """A metric named by a params key, checked against the table: it must be a known
    per-prediction metric with a better direction (a prefix among ``prefixes``). Returns
    ``name``; ``ValueError`` (one line naming the known keys) otherwise."""
    hit = lookup(name, prefixes)
    if hit is not None and hit[1].comparable:
        return name
    known = ", ".join(m.name for m in METRICS if m.comparable)
    pre = f" (optionally prefixed {', '.join(p for p in prefixes if p)})" if any(prefixes) else ""
    what = ("has no better direction or is not measured per prediction" if hit is not None
            else "is not in the metric table (xct_core/metric_table.py)")
    raise ValueError(f"metric {name!r} {what}; use one of {known}{pre}")
