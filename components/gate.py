"""Pipeline step — gate stage K: evaluation metrics + thresholds (``params.gates``) → report.

Writes ``reports/gates/stageK.json``: :meth:`xct_core.gates.GateReport.to_dict` (stage,
passed, every check with its metric, operator, threshold, measured value, pass/fail and
margin, a one-line summary) plus the metrics file it judged and the params digest.

A completed run exits 0 whether the gate passes or fails (the decision is in the report;
the register step and the KFP ``dsl.If`` read it); unusable input exits non-zero.
``python -m components.gate --stage K --metrics reports/eval/stageK/metrics.json
--out reports/gates/stageK.json [--params params.yaml]``, or the KFP component
:data:`components.stages_kfp` (its KFP component, which runs this module's CLI).
"""

import argparse
import sys
from pathlib import Path
from typing import Any

from xct_core.config import Params, load_params
from xct_core.errors import InputError, XctError
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
    from xct_core.evaluation import read_eval_metrics
    from xct_core.stats import json_text, write_text_atomic

    params = params or Params()
    metrics = read_eval_metrics(metrics_path)
    got = metrics.get("stage")
    if got is not None and int(got) != int(stage):
        raise InputError(metrics_path, f"holds stage {got} metrics, gate asked for stage {stage}")
    report = gate_metrics(stage, metrics, params)
    doc = {**report.to_dict(), "metrics_file": str(metrics_path), "params_digest": params.digest(),
           "test_ids_hash": metrics.get("test_ids_hash")}
    write_text_atomic(out_path, json_text(doc))
    return report


def main(argv: list[str] | None = None) -> int:
    """CLI (dvc.yaml): exit 0 when the gate was judged (passed or not); 2 on unusable input."""
    ap = argparse.ArgumentParser(prog="python -m components.gate", description=__doc__.splitlines()[0])
    ap.add_argument("--stage", type=int, required=True, help="cascade stage K (1-based)")
    ap.add_argument("--metrics", type=Path, default=None, help="metrics.json (default: reports/eval/stageK/metrics.json)")
    ap.add_argument("--out", type=Path, default=None, help="gate report (default: reports/gates/stageK.json)")
    ap.add_argument("--params", type=Path, default=None, help="params file (default: $XCT_PARAMS or ./params.yaml)")
    args = ap.parse_args(argv)
    try:
        params = load_params(args.params)
        metrics = args.metrics or Path("reports/eval") / f"stage{args.stage}" / "metrics.json"
        out = args.out or Path("reports/gates") / f"stage{args.stage}.json"
        report = run_gate(args.stage, metrics, out, params)
    except XctError as e:
        print(f"gate: error: {e}", file=sys.stderr)
        return e.exit_code
    print(report.summary())
    for c in report.checks:
        print(f"  {'PASS' if c.passed else 'FAIL'}  {c.name:<14} {c.metric} {c.op} {c.threshold:g}: {c.value:.4g} "
              f"(margin {c.margin:+.4g})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
