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
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

from pathlib import Path

from xct_core.config import StageGate
from xct_core.errors import InputError
from xct_core.jsondoc import read_json_doc


@dataclass(frozen=True)
class GateCheck:
    name: str
    metric: str
    op: str  # ">", ">=", "<="
    threshold: float
    value: float
    passed: bool
    margin: float


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
            f"{c.name}: {_fmt(c.value)} (needs {c.op} {_fmt(c.threshold)}, {_fmt(c.margin, signed=True)})"
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


def evaluate_gate(stage: int, metrics: dict[str, Any], gate: StageGate) -> GateReport:
    """Decide one stage's gate from its (patient-mean) metrics.

    ``metrics`` needs ``psnr_window_db``, ``ssim_window``, ``nan_count``, ``std`` (output std
    in window units) and ``target_std`` (the ground truth's std, same units).
    """
    std, tstd = _num(metrics, "std"), _num(metrics, "target_std")
    ratio = std / tstd if (math.isfinite(std) and math.isfinite(tstd) and tstd > 0) else math.nan
    checks = [
        _check("psnr_window", "psnr_window_db", ">", gate.psnr_window_db, _num(metrics, "psnr_window_db")),
        _check("ssim_window", "ssim_window", ">", gate.ssim_window, _num(metrics, "ssim_window")),
        _check("no_nan", "nan_count", "<=", float(gate.max_nan), _num(metrics, "nan_count")),
        _check("not_collapsed", "std/target_std", ">=", gate.min_std_ratio, ratio),
    ]
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
