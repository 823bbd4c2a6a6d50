"""Evaluation gates: a pure decision from measured metrics and thresholds to pass/fail.

Thresholds come from params (``gates.stageK``), never from code. Every check reports its
threshold, the measured value, whether it passed and by how much (``margin``: positive =
headroom, negative = shortfall), so a gate report says exactly which check failed.

Checks (all gating ones must pass):
- ``psnr_window_db > threshold`` — 3D PSNR in the training window (data_range 2), whole grid.
- ``psnr_window_body_db > threshold`` — the same PSNR inside the body only (the air around
  the patient, ~60 % of a demo grid, inflates the whole-grid number by 4+ dB).
- ``ssim_window > threshold`` — 3D SSIM in the training window.
  An absolute threshold of ``None`` (null in params) is reported, not gating (``gating``).
- ``nan_count <= max_nan`` — no non-finite voxels in the outputs.
- ``std / target_std >= min_std_ratio`` — the output is not collapsed to a constant
  (a model that outputs the mean volume has a tiny std in the window).
A missing or non-finite metric fails its check (never passes by default).

Relative checks (``gates.stageK.relative``, :class:`xct_core.config.RelativeGate`) compare
the candidate with a baseline measured on the same test split: the mean volume and the
direct twin come from the same ``metrics.json`` (``baseline_*`` / ``direct_*``), the
champion's stage-K metrics are passed in by the gate step (:class:`Champion`; it reads them
from the registry). Each becomes one :class:`GateCheck` whose ``threshold`` is the effective
bar (``baseline + max(min_absolute_change, min_relative_change·|baseline|)``), with the
baseline and its value recorded beside it.

Stage k > 1 (``upsampled_psnr_window_db`` in the metrics): one more row, never gating, puts the
point estimate beside the previous stage upsampled (its own input) with the gain's paired
bootstrap interval (``psnr_window_vs_upsampled_previous``).

Paired bootstrap (``paired_bootstrap: true``): with per-patient rows on both sides (the
evaluation's ``per_patient.csv``; the champion's from its registration run), the check is
decided by the LOWER bound of the 95 % interval of the mean per-patient change
(:func:`xct_core.intervals.paired_bootstrap`): pass iff it clears the required change — "the
candidate is at worst ``-min_absolute_change`` dB behind on patients like these". Why not a raw
``>=`` of two means on a re-used test split: a retrained model is then promoted or refused by
noise; the paired interval says how sure the difference is. Without rows (or < 5 patients)
the point estimate decides and the check says so (``decided_by``).

Non-inferiority to the twin (``non_inferiority_slack_db``): the required change is
``-non_inferiority_margin_db(K, slack)`` (the one formula, below), K = the evaluation's
``samples``: a perfect sampler's K-mean trails the MSE-trained twin by 10·log10(1 + 1/K) dB.

Ceiling (``ceiling=``, :mod:`xct_core.ceiling`): beside every absolute PSNR check, the
information ceiling of the data, the floor (the mean volume's value, ``baseline_<metric>``)
and the fraction of the achievable gain ``(value − floor)/(ceiling − floor)``; a threshold at or
above its ceiling is flagged :data:`UNREACHABLE` ("unreachable on this data"). The threshold
itself stays what params say: the flag informs, it never changes the decision.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from xct_core.config import RelativeGate, StageGate
from xct_core.errors import InputError
from xct_core.intervals import bootstrap_interval, paired_bootstrap, rows_by_id
from xct_core.jsondoc import read_json_doc
from xct_core.metric_table import KMEAN_PREFIX, UPSAMPLED_PREFIX, baseline_prefix

#: the note of a threshold at or above the information ceiling
UNREACHABLE = "unreachable on this data"


@dataclass(frozen=True)
class GateCheck:
    name: str
    metric: str
    op: str  # ">", ">=", "<="
    threshold: float
    value: float
    passed: bool
    margin: float
    #: relative checks: which baseline, its value, the requested changes; ``note`` says why a check was skipped
    baseline: str | None = None
    baseline_value: float | None = None
    min_absolute_change: float | None = None
    min_relative_change: float | None = None
    note: str = ""
    #: a relative check that could not be compared (no champion / another test split): passes, says why
    skipped: bool = False
    #: False: reported beside the others, does not decide the gate (a null threshold in params)
    gating: bool = True
    #: the patient bootstrap 95 % interval of ``value`` (absolute checks; xct_core/intervals.py)
    interval: list[float] | None = None
    #: absolute PSNR checks: the information ceiling, the floor (the mean volume's value), the
    #: fraction of the achievable gain (value − floor)/(ceiling − floor) and whether the
    #: threshold is at or above the ceiling (:data:`UNREACHABLE`)
    ceiling: float | None = None
    floor: float | None = None
    achievable_fraction: float | None = None
    unreachable: bool = False
    #: relative checks: the mean per-patient change (sign: better is positive) and its paired
    #: bootstrap 95 % interval, the bar it had to clear (``required_change``) and what decided
    change: float | None = None
    change_interval: list[float] | None = None
    required_change: float | None = None
    decided_by: str | None = None


@dataclass(frozen=True)
class Champion:
    """The registered champion's metrics for one stage, as the gate step read them."""

    version: str
    test_ids_hash: str | None
    metrics: dict[str, float]
    #: the champion's per-patient rows of this stage (its registration run's
    #: ``eval/stageK/per_patient.csv``), or None when it has none (an older registration)
    rows: list[dict[str, Any]] | None = None


@dataclass
class GateReport:
    stage: int
    passed: bool
    checks: list[GateCheck] = field(default_factory=list)
    #: the information ceiling this report was judged beside (xct_core/ceiling.py), or
    #: ``{"known": False, "reason": …}``
    ceiling: dict[str, Any] | None = None

    @property
    def failed(self) -> list[GateCheck]:
        return [c for c in self.checks if not c.passed and c.gating]

    @property
    def unreachable(self) -> list[str]:
        """Names of the checks whose threshold is at or above the ceiling."""
        return [c.name for c in self.checks if c.unreachable]

    def summary(self) -> str:
        if self.passed:
            return f"stage {self.stage}: gate passed ({len(self.checks)} checks)"
        parts = [
            f"{c.name}: {_fmt(c.value)} (needs {c.op} {_fmt(c.threshold)}, {_fmt(c.margin, signed=True)}"
            + (f"; {c.note}" if c.note else "") + ")"
            for c in self.failed
        ]
        return f"stage {self.stage}: gate FAILED — " + "; ".join(parts)

    def to_dict(self) -> dict[str, Any]:
        return {
            "stage": self.stage,
            "passed": self.passed,
            "checks": [asdict(c) for c in self.checks],
            "summary": self.summary(),
            "ceiling": self.ceiling,
            "unreachable": self.unreachable,
        }


def non_inferiority_margin_db(k: int, slack: float = 0.3) -> float:
    """How far (dB) a K-sample posterior mean may trail the MSE-trained twin and still be
    non-inferior: ``10·log10(1 + 1/K) + slack``.

    Why: the twin estimates the posterior mean E[x|y]; a perfect sampler's K-sample mean has
    error ``(E[x|y] − x) + (mean of K posterior draws − E[x|y])``, whose MSE is
    ``MMSE·(1 + 1/K)`` (the draws' spread around the posterior mean equals the posterior
    variance = MMSE). In PSNR that is ``10·log10(1 + 1/K)`` dB below the twin by construction
    (0.51 dB at K = 8, 1.76 dB at K = 2); ``slack`` (dB) is the allowance for a sampler that is
    not perfect. The one source of this formula (gates, calibration reports)."""
    k = int(k)
    if k < 1:
        raise ValueError(f"K must be >= 1 samples, got {k}")
    return 10.0 * math.log10(1.0 + 1.0 / k) + float(slack)


def achievable_fraction(value: float, floor: float, ceiling: float) -> float:
    """``(value − floor) / (ceiling − floor)``: the share of the achievable gain over the floor
    (the mean volume) that ``value`` reaches; NaN when any is unknown or ceiling <= floor."""
    v, f, c = float(value), float(floor), float(ceiling)
    if not all(math.isfinite(x) for x in (v, f, c)) or c <= f:
        return math.nan
    return (v - f) / (c - f)


def ceiling_value(ceiling: dict[str, Any] | None, key: str) -> float:
    """The ceiling (dB) of metric ``key`` in a :func:`xct_core.ceiling.stage_ceiling` result
    (NaN: unknown, or no ceiling for that metric)."""
    if not ceiling or not ceiling.get("known"):
        return math.nan
    m = (ceiling.get("metrics") or {}).get(key)
    return float(m["ceiling_db"]) if m else math.nan


def _fmt(v: float, signed: bool = False) -> str:
    if not math.isfinite(v):
        return str(v)
    return f"{v:+.4g}" if signed else f"{v:.4g}"


def _num(metrics: dict[str, Any], key: str) -> float:
    v = metrics.get(key)
    try:
        return float(v)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return math.nan


def _check(name: str, metric: str, op: str, threshold: float, value: float) -> GateCheck:
    if not math.isfinite(value):
        return GateCheck(name, metric, op, threshold, value, False, math.nan)
    if op == ">":
        ok, margin = value > threshold, value - threshold
    elif op == ">=":
        ok, margin = value >= threshold, value - threshold
    elif op == "<=":
        ok, margin = value <= threshold, threshold - value
    else:  # pragma: no cover - programming error
        raise ValueError(op)
    return GateCheck(name, metric, op, float(threshold), float(value), bool(ok), float(margin))


def _relative(rel: RelativeGate, metrics: dict[str, Any], champion: Champion | None,
              rows: list[dict[str, Any]] | None = None) -> GateCheck:
    """One check against a baseline (module docstring). With ``paired_bootstrap`` and
    per-patient rows on both sides, the lower bound of the paired interval decides."""
    name = f"{rel.metric.removesuffix('_db')}_vs_{rel.baseline}"
    # non-inferiority judges the K-sample mean (issue 21), also when the point estimate is the anchor
    own = (KMEAN_PREFIX + rel.metric if rel.non_inferiority_slack_db is not None and KMEAN_PREFIX + rel.metric in metrics
           else rel.metric)
    value = _num(metrics, own)
    sign = 1.0 if rel.greater_is_better else -1.0
    op = ">=" if rel.greater_is_better else "<="
    kw: dict[str, Any] = {"baseline": rel.baseline, "min_absolute_change": rel.min_absolute_change,
                          "min_relative_change": rel.min_relative_change}
    note = ""
    base_rows: dict[str, float] | None = None
    if rel.baseline == "champion":
        if champion is None:
            return GateCheck(name, rel.metric, op, math.nan, value, True, math.nan, **kw, note="no champion yet: skipped",
                             skipped=True)
        here = metrics.get("test_ids_hash")
        if champion.test_ids_hash != here:
            return GateCheck(name, rel.metric, op, math.nan, value, True, math.nan, **kw,
                             note=f"champion v{champion.version} was measured on another test split "
                                  f"({champion.test_ids_hash} vs {here}): not comparable, skipped", skipped=True)
        base = _num(champion.metrics, rel.metric)
        note = f"champion v{champion.version}"
        if champion.rows is not None:
            base_rows = rows_by_id(champion.rows, rel.metric)
        elif rel.paired_bootstrap:
            note += " has no per-patient rows: point check"
    else:
        prefix = baseline_prefix(rel.baseline)  # the metric table's prediction prefixes
        base = _num(metrics, prefix + rel.metric)
        if not math.isfinite(base):
            note = f"no {prefix}{rel.metric} in the metrics (the evaluation did not measure this baseline)"
        if rows:
            base_rows = rows_by_id(rows, prefix + rel.metric)
    if rel.non_inferiority_slack_db is not None:
        k = _num(metrics, "samples")
        if not (math.isfinite(k) and k >= 1):
            return GateCheck(name, rel.metric, op, math.nan, value, False, math.nan, baseline_value=base, **kw,
                             note="non-inferiority needs the evaluation's sample count K ('samples' in metrics.json)")
        need_abs: float | None = -non_inferiority_margin_db(int(k), rel.non_inferiority_slack_db)
        note = (note + "; " if note else "") + (f"non-inferiority of the K-sample mean ({own}): K = {int(k)}, "
                                                  "margin 10·log10(1 + 1/K) + "
                                                  f"{rel.non_inferiority_slack_db:g} = {-need_abs:.3g} dB")
    else:
        need_abs = rel.min_absolute_change
    if not (math.isfinite(value) and math.isfinite(base)):
        return GateCheck(name, rel.metric, op, math.nan, value, False, math.nan, baseline_value=base, **kw, note=note)
    need = max(need_abs if need_abs is not None else -math.inf,
               rel.min_relative_change * abs(base) if rel.min_relative_change is not None else -math.inf)
    threshold = base + sign * need
    change = sign * (value - base)
    decided, interval = "point estimate (mean over patients)", None
    if rel.paired_bootstrap and base_rows is not None and rows:
        pb = paired_bootstrap(rows_by_id(rows, own), base_rows)
        if pb.get("interval") is not None:
            lo, hi = (sign * v for v in pb["interval"])
            interval = sorted([float(lo), float(hi)])
            decided = f"lower bound of the paired bootstrap 95 % interval over {pb['n']} patients"
            change = sign * float(pb["mean"])
            passed = interval[0] >= need
            return GateCheck(name, rel.metric, op, float(threshold), float(value), bool(passed), float(interval[0] - need),
                             baseline_value=float(base), **kw, note=note, change=float(change),
                             change_interval=interval, required_change=float(need), decided_by=decided)
        decided = f"point estimate ({pb.get('note') or 'no paired interval'})"
    elif rel.paired_bootstrap:
        decided = "point estimate (no per-patient rows on both sides)"
    passed = change >= need
    return GateCheck(name, rel.metric, op, float(threshold), float(value), bool(passed), float(change - need),
                     baseline_value=float(base), **kw, note=note, change=float(change), change_interval=interval,
                     required_change=float(need), decided_by=decided)


def _absolute(name: str, metric: str, threshold: float | None, metrics: dict[str, Any],
              rows: list[dict[str, Any]] | None, ceiling: dict[str, Any] | None) -> GateCheck:
    """An absolute ``>`` check with its interval and, for PSNR, its ceiling, floor and the
    fraction of the achievable gain (``threshold`` None: reported, not gating)."""
    value = _num(metrics, metric)
    gating = threshold is not None
    c = _check(name, metric, ">", float(threshold) if gating else math.nan, value)
    extra: dict[str, Any] = {"gating": gating}
    if not gating:
        extra.update(passed=True, margin=math.nan, note="reported, not gating (null threshold in params)")
    if rows:
        extra["interval"] = bootstrap_interval([r.get(metric, math.nan) for r in rows]).get("interval")
    top = ceiling_value(ceiling, metric)
    if math.isfinite(top):
        floor = _num(metrics, "baseline_" + metric)
        extra.update(ceiling=top, floor=floor if math.isfinite(floor) else None,
                     achievable_fraction=_finite_or_none(achievable_fraction(value, floor, top)))
        if gating and float(threshold) >= top:  # type: ignore[arg-type]
            extra.update(unreachable=True, note=f"{UNREACHABLE}: threshold {float(threshold):g} dB >= ceiling "  # type: ignore[arg-type]
                                                 f"{top:.2f} dB")
    return replace(c, **extra)


def _beside_upsampled(metrics: dict[str, Any], rows: list[dict[str, Any]] | None) -> GateCheck:
    """Stage k > 1: the point estimate's window PSNR beside the previous stage upsampled (its own
    input; ``upsampled_psnr_window_db``), the gain with its paired bootstrap interval — an
    informational row (``gating`` False), not a check params decide."""
    metric, base_key = "psnr_window_db", UPSAMPLED_PREFIX + "psnr_window_db"
    value, base = _num(metrics, metric), _num(metrics, base_key)
    interval, decided = None, "point estimate (mean over patients)"
    if rows:
        pb = paired_bootstrap(rows_by_id(rows, metric), rows_by_id(rows, base_key))
        interval = pb.get("interval")
        decided = (f"paired bootstrap 95 % interval over {pb['n']} patients" if interval is not None
                   else f"point estimate ({pb.get('note') or 'no paired interval'})")
    return GateCheck("psnr_window_vs_upsampled_previous", metric, ">=", base, value, True, value - base,
                     baseline="previous_stage_upsampled", baseline_value=base, gating=False, change=value - base,
                     change_interval=interval, decided_by=decided,
                     note="reported, not gating: the gain over the stage's own input (the previous stage's point "
                          "estimate upsampled)")


def _finite_or_none(v: float) -> float | None:
    return float(v) if math.isfinite(v) else None


def evaluate_gate(stage: int, metrics: dict[str, Any], gate: StageGate, champion: Champion | None = None, *,
                  rows: list[dict[str, Any]] | None = None, ceiling: dict[str, Any] | None = None) -> GateReport:
    """Decide one stage's gate from its (patient-mean) metrics.

    ``metrics`` needs ``psnr_window_db``, ``ssim_window``, ``nan_count``, ``std`` (output std
    in window units) and ``target_std`` (the ground truth's std, same units); relative checks
    read ``baseline_<metric>`` / ``direct_<metric>``, ``samples`` and ``test_ids_hash`` too, and
    ``champion`` (the registered champion's metrics for this stage, or ``None``). ``rows``: the
    per-patient rows (intervals; paired bootstrap); ``ceiling``: :func:`xct_core.ceiling.stage_ceiling`
    (or an unknown one), shown beside every PSNR threshold. Checks with a null threshold are
    reported but do not decide.
    """
    std, tstd = _num(metrics, "std"), _num(metrics, "target_std")
    ratio = std / tstd if (math.isfinite(std) and math.isfinite(tstd) and tstd > 0) else math.nan
    checks = [
        _absolute("psnr_window", "psnr_window_db", gate.psnr_window_db, metrics, rows, ceiling),
        _absolute("psnr_window_body", "psnr_window_body_db", gate.psnr_window_body_db, metrics, rows, ceiling),
        _absolute("ssim_window", "ssim_window", gate.ssim_window, metrics, rows, ceiling),
        _check("no_nan", "nan_count", "<=", float(gate.max_nan), _num(metrics, "nan_count")),
        _check("not_collapsed", "std/target_std", ">=", gate.min_std_ratio, ratio),
    ]
    checks += [_relative(rel, metrics, champion, rows) for rel in gate.relative]
    if UPSAMPLED_PREFIX + "psnr_window_db" in metrics:  # stage k > 1: reported beside, never gating
        checks.append(_beside_upsampled(metrics, rows))
    return GateReport(stage=stage, passed=all(c.passed for c in checks if c.gating), checks=checks, ceiling=ceiling)


def read_gate_report(path: str | Path) -> dict[str, Any]:
    """A gate report (:meth:`GateReport.to_dict` as written by the gate step, or a skip
    marker of ``components/guard.py``) — the one reader of these files.

    Raises :class:`InputError` when the file is missing, not JSON, or has no boolean
    ``passed`` field: a broken report is never read as a pass or a skip.
    """
    doc = read_json_doc(path, "gate report", missing_hint="run the gate step first")
    if not isinstance(doc.get("passed"), bool):
        raise InputError(path, "gate report has no boolean 'passed' field")
    return doc


def read_eval_metrics(path: str | Path) -> dict[str, Any]:
    """An evaluate step's ``metrics.json`` (what a gate judges; :class:`InputError` when
    missing or not a JSON object)."""
    return read_json_doc(path, "metrics file", missing_hint="run the evaluate step first")
