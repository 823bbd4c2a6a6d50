"""Pipeline step — gate stage K: evaluation metrics + thresholds (``params.gates``) → report.

Writes ``reports/gates/stageK.json``: :meth:`xct_core.gates.GateReport.to_dict` (stage,
passed, every check with its metric, operator, threshold, measured value, pass/fail and
margin, a one-line summary) plus the metrics file it judged and the params digest.

A completed run exits 0 whether the gate passes or fails (the decision is in the report;
the register step and the KFP ``dsl.If`` read it); unusable input exits non-zero. One
function, :func:`run_gate`, called by ``xct step gate`` (dvc.yaml) and the KFP component.

Relative checks against the champion (``gates[stageK].relative`` with ``baseline:
champion``) read the registry's champion (``registry.champion_alias``): its registration
run's ``stage{K}/<metric>`` metrics and its ``xct.test_ids_hash`` tag (:func:`read_champion`).
The registry is only read: a tracking store that does not exist yet means "no champion"; a
registry that cannot answer stops the gate (one line, exit 1), never "no champion".
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from xct_core.config import Params
from xct_core.errors import InputError
from xct_core.gates import Champion, GateReport, evaluate_gate


def read_champion(stage: int, params: Params, tracking_uri: str | None = None) -> Champion | None:
    """The champion's stage-``stage`` metrics from the registry, or ``None`` — only when the
    registry answers that there is none (no store, no registered model, no champion alias).
    A registry that cannot answer (down, no answer within ``registry.request_timeout_s``, a
    server error) raises :class:`components.tracking.RegistryError`: "cannot tell" never
    passes a gate as "no champion yet". Never creates a store."""
    from mlflow.exceptions import MlflowException

    from components.tracking import bound_requests, get_client, not_found, registry_errors, store_exists
    from components.tracking import tracking_uri as default_uri

    uri = tracking_uri or default_uri()
    if not store_exists(uri):
        return None
    bound_requests(params.registry)
    client = get_client(uri)
    reg = params.registry
    with registry_errors(uri, f"reading {reg.model_name}@{reg.champion_alias} for the stage {stage} gate"):
        try:
            mv = client.get_model_version_by_alias(reg.model_name, reg.champion_alias)
        except MlflowException as e:
            if not_found(e):  # no registered model / no champion alias yet
                return None
            raise
        prefix = f"stage{stage}/"
        run_metrics = client.get_run(mv.run_id).data.metrics if mv.run_id else {}
    return Champion(version=str(mv.version), test_ids_hash=(mv.tags or {}).get("xct.test_ids_hash"),
                    metrics={k.removeprefix(prefix): float(v) for k, v in run_metrics.items() if k.startswith(prefix)})


def gate_metrics(stage: int, metrics: dict[str, Any], params: Params, champion: Champion | None = None) -> GateReport:
    """The gate decision for ``stage`` from an evaluation summary (thresholds from params)."""
    return evaluate_gate(stage, metrics, params.stage(stage).gate, champion)


def run_gate(
    stage: int,
    metrics_path: str | Path,
    out_path: str | Path,
    params: Params,
    *,
    tracking_uri: str | None = None,
) -> GateReport:
    """Judge ``metrics_path`` (an evaluate step's ``metrics.json``) and write the gate report
    (the champion, when a relative check needs it, from the registry at ``tracking_uri``)."""
    from xct_core.atomic import write_json_atomic
    from xct_core.gates import read_eval_metrics

    metrics = read_eval_metrics(metrics_path)
    got = metrics.get("stage")
    if got is not None and int(got) != int(stage):
        raise InputError(metrics_path, f"holds stage {got} metrics, gate asked for stage {stage}")
    gate = params.stage(stage).gate
    champion = read_champion(stage, params, tracking_uri) if any(r.baseline == "champion" for r in gate.relative) else None
    report = gate_metrics(stage, metrics, params, champion)
    doc = {**report.to_dict(), "metrics_file": str(metrics_path), "params_digest": params.digest(),
           "test_ids_hash": metrics.get("test_ids_hash")}
    write_json_atomic(out_path, doc)
    return report


def report_lines(report: GateReport) -> list[str]:
    """The gate's summary and one line per check (what ``xct step gate`` prints)."""
    lines = [report.summary()]
    for c in report.checks:
        vs = f" [{c.baseline} {c.baseline_value:.4g}]" if c.baseline_value is not None else ""
        note = f" — {c.note}" if c.note else ""
        lines.append(f"  {'PASS' if c.passed else 'FAIL'}  {c.name:<14} {c.metric} {c.op} {c.threshold:g}: {c.value:.4g} "
                     f"(margin {c.margin:+.4g}){vs}{note}")
    return lines
