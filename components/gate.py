"""Pipeline step — gate stage K: evaluation metrics + thresholds (``params.gates``) → report.

Writes ``reports/gates/stageK.json``: :meth:`xct_core.gates.GateReport.to_dict` (stage,
passed, every check with its metric, operator, threshold, measured value, pass/fail and
margin, a one-line summary) plus the metrics file it judged and the params digest.

A completed run exits 0 whether the gate passes or fails (the decision is in the report;
the register step and the KFP ``dsl.If`` read it); unusable input exits non-zero. One
function, :func:`run_gate`, called by ``xct step gate`` (dvc.yaml) and the KFP component.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from xct_core.config import Params
from xct_core.errors import InputError
from xct_core.gates import GateReport, evaluate_gate


def gate_metrics(stage: int, metrics: dict[str, Any], params: Params) -> GateReport:
    """The gate decision for ``stage`` from an evaluation summary (thresholds from params)."""
    return evaluate_gate(stage, metrics, params.gates.for_stage(stage))


def run_gate(
    stage: int,
    metrics_path: str | Path,
    out_path: str | Path,
    params: Params | None = None,
) -> GateReport:
    """Judge ``metrics_path`` (an evaluate step's ``metrics.json``) and write the gate report."""
    from xct_core.atomic import write_json_atomic
    from xct_core.gates import read_eval_metrics

    params = params or Params()
    metrics = read_eval_metrics(metrics_path)
    got = metrics.get("stage")
    if got is not None and int(got) != int(stage):
        raise InputError(metrics_path, f"holds stage {got} metrics, gate asked for stage {stage}")
    report = gate_metrics(stage, metrics, params)
    doc = {**report.to_dict(), "metrics_file": str(metrics_path), "params_digest": params.digest(),
           "test_ids_hash": metrics.get("test_ids_hash")}
    write_json_atomic(out_path, doc)
    return report


def report_lines(report: GateReport) -> list[str]:
    """The gate's summary and one line per check (what ``xct step gate`` prints)."""
    lines = [report.summary()]
    for c in report.checks:
        lines.append(f"  {'PASS' if c.passed else 'FAIL'}  {c.name:<14} {c.metric} {c.op} {c.threshold:g}: {c.value:.4g} "
                     f"(margin {c.margin:+.4g})")
    return lines
