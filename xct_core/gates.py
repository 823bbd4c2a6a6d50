"""Evaluation gates: a pure decision from measured metrics and thresholds to pass/fail.

Thresholds come from params (``gates.stageK``), never from code. Every check reports its
threshold, the measured value, whether it passed and by how much (``margin``: positive =
headroom, negative = shortfall), so a gate report says exactly which check failed.

Checks (all must pass):
- ``psnr_window_db > threshold`` — 3D PSNR in the training window (data_range 2).
- ``ssim_window > threshold`` — 3D SSIM in the training window.
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
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from xct_core.config import RelativeGate, StageGate
from xct_core.errors import InputError
from xct_core.jsondoc import read_json_doc
from xct_core.metric_table import baseline_prefix


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


@dataclass(frozen=True)
class Champion:
    """The registered champion's metrics for one stage, as the gate step read them."""

    version: str
    test_ids_hash: str | None
    metrics: dict[str, float]


@dataclass
class GateReport:
    stage: int
    passed: bool
    checks: list[GateCheck] = field(default_factory=list)

    @property
    def failed(self) -> list[GateCheck]:
        return [c for c in self.checks if not c.passed]

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


def _relative(rel: RelativeGate, metrics: dict[str, Any], champion: Champion | None) -> GateCheck:
    """One check against a baseline (module docstring)."""
    name = f"{rel.metric.removesuffix('_db')}_vs_{rel.baseline}"
    value = _num(metrics, rel.metric)
    sign = 1.0 if rel.greater_is_better else -1.0
    op = ">=" if rel.greater_is_better else "<="
    kw = {"baseline": rel.baseline, "min_absolute_change": rel.min_absolute_change,
          "min_relative_change": rel.min_relative_change}
    note = ""
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
    else:
        prefix = baseline_prefix(rel.baseline)  # the metric table's prediction prefixes
        base = _num(metrics, prefix + rel.metric)
        if not math.isfinite(base):
            note = f"no {prefix}{rel.metric} in the metrics (the evaluation did not measure this baseline)"
    if not (math.isfinite(value) and math.isfinite(base)):
        return GateCheck(name, rel.metric, op, math.nan, value, False, math.nan, baseline_value=base, **kw, note=note)
    need = max(rel.min_absolute_change if rel.min_absolute_change is not None else -math.inf,
               rel.min_relative_change * abs(base) if rel.min_relative_change is not None else -math.inf)
    threshold = base + sign * need
    change = sign * (value - base)
    passed = change >= need
    return GateCheck(name, rel.metric, op, float(threshold), float(value), bool(passed), float(change - need),
                     baseline_value=float(base), **kw, note=note)


def evaluate_gate(stage: int, metrics: dict[str, Any], gate: StageGate, champion: Champion | None = None) -> GateReport:
    """Decide one stage's gate from its (patient-mean) metrics.

    ``metrics`` needs ``psnr_window_db``, ``ssim_window``, ``nan_count``, ``std`` (output std
    in window units) and ``target_std`` (the ground truth's std, same units); relative checks
    read ``baseline_<metric>`` / ``direct_<metric>`` and ``test_ids_hash`` too, and
    ``champion`` (the registered champion's metrics for this stage, or ``None``).
    """
    std, tstd = _num(metrics, "std"), _num(metrics, "target_std")
    ratio = std / tstd if (math.isfinite(std) and math.isfinite(tstd) and tstd > 0) else math.nan
    checks = [
        _check("psnr_window", "psnr_window_db", ">", gate.psnr_window_db, _num(metrics, "psnr_window_db")),
        _check("ssim_window", "ssim_window", ">", gate.ssim_window, _num(metrics, "ssim_window")),
        _check("no_nan", "nan_count", "<=", float(gate.max_nan), _num(metrics, "nan_count")),
        _check("not_collapsed", "std/target_std", ">=", gate.min_std_ratio, ratio),
    ]
    checks += [_relative(rel, metrics, champion) for rel in gate.relative]
    return GateReport(stage=stage, passed=all(c.passed for c in checks), checks=checks)


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
