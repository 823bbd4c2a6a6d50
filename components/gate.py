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
registry that cannot answer stops the gate (one line, exit 1), never "no champion". The
champion's per-patient rows (its registration run's ``eval/stageK/per_patient.csv``) feed the
paired bootstrap; a champion registered without them is judged on its means, with a note.

Per-patient rows: the ``per_patient.csv`` beside the judged ``metrics.json`` (intervals of
every absolute check; the paired bootstrap of the relative ones).

Ceiling (``gates.stageK.ceiling``, :mod:`xct_core.ceiling`): with ``source: synth`` the step
computes (or reads from its cache) the stage's information ceiling on ``data.synth``'s
phantoms and writes it beside every PSNR threshold; ``source: none`` (real data) records it as
unknown. Cache: ``$XCT_CACHE_DIR/ceiling`` (default ``~/.cache/xct/ceiling``), one file per
key of every input (:func:`xct_core.ceiling.ceiling_key`): the gate's decision never depends
on it (thresholds stay what params say), only the report's annotations.
"""

from __future__ import annotations

import os
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

    from components.tracking import bound_requests, get_client, not_found, registry_errors, stage_rows, store_exists
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
        rows = stage_rows(client, mv.run_id, stage) if mv.run_id else None
    return Champion(version=str(mv.version), test_ids_hash=(mv.tags or {}).get("xct.test_ids_hash"),
                    metrics={k.removeprefix(prefix): float(v) for k, v in run_metrics.items() if k.startswith(prefix)},
                    rows=rows)


def ceiling_cache_dir() -> Path:
    """Where computed ceilings are kept (``$XCT_CACHE_DIR/ceiling``, default ``~/.cache/xct/ceiling``)."""
    root = os.environ.get("XCT_CACHE_DIR") or str(Path.home() / ".cache" / "xct")
    return Path(root) / "ceiling"


def stage_ceiling(stage: int, params: Params, cache_dir: str | Path | None = None) -> dict[str, Any]:
    """The ceiling shown beside stage ``stage``'s thresholds (module docstring)."""
    from xct_core.ceiling import cached_stage_ceiling, unknown_ceiling

    cp = params.stage(stage).gate.ceiling
    if cp.source == "none":
        return unknown_ceiling("no generator for this data (gates.stageK.ceiling.source: none): the ceiling is unknown")
    return cached_stage_ceiling(params, stage, cache_dir or ceiling_cache_dir(), phantoms=cp.phantoms, seed=cp.seed)


def gate_metrics(stage: int, metrics: dict[str, Any], params: Params, champion: Champion | None = None, *,
                 rows: list[dict[str, Any]] | None = None, ceiling: dict[str, Any] | None = None) -> GateReport:
    """The gate decision for ``stage`` from an evaluation summary (thresholds from params)."""
    return evaluate_gate(stage, metrics, params.stage(stage).gate, champion, rows=rows, ceiling=ceiling)


def run_gate(
    stage: int,
    metrics_path: str | Path,
    out_path: str | Path,
    params: Params,
    *,
    tracking_uri: str | None = None,
    ceiling_dir: str | Path | None = None,
) -> GateReport:
    """Judge ``metrics_path`` (an evaluate step's ``metrics.json``) and write the gate report
    (the champion, when a relative check needs it, from the registry at ``tracking_uri``)."""
    from xct_core.atomic import write_json_atomic
    from xct_core.gates import read_eval_metrics

    from xct_core.intervals import read_rows_csv
    from xct_core.layout import PER_PATIENT_CSV

    metrics = read_eval_metrics(metrics_path)
    got = metrics.get("stage")
    if got is not None and int(got) != int(stage):
        raise InputError(metrics_path, f"holds stage {got} metrics, gate asked for stage {stage}")
    rows_path = Path(metrics_path).parent / PER_PATIENT_CSV
    rows = read_rows_csv(rows_path) if rows_path.is_file() else None
    gate = params.stage(stage).gate
    champion = read_champion(stage, params, tracking_uri) if any(r.baseline == "champion" for r in gate.relative) else None
    ceiling = stage_ceiling(stage, params, ceiling_dir)
    report = gate_metrics(stage, metrics, params, champion, rows=rows, ceiling=ceiling)
    doc = {**report.to_dict(), "metrics_file": str(metrics_path), "params_digest": params.digest(),
           "test_ids_hash": metrics.get("test_ids_hash")}
    write_json_atomic(out_path, doc)
    return report


def report_lines(report: GateReport) -> list[str]:
    """The gate's summary and one line per check (what ``xct step gate`` prints)."""
    lines = [report.summary()]
    for c in report.checks:
        vs = f" [{c.baseline} {c.baseline_value:.4g}]" if c.baseline_value is not None else ""
        iv = f" 95% [{c.interval[0]:.4g}, {c.interval[1]:.4g}]" if c.interval else ""
        if c.change_interval:
            iv = f" change {c.change:+.3g} 95% [{c.change_interval[0]:+.3g}, {c.change_interval[1]:+.3g}]"
        top = (f" (floor {c.floor:.4g}, ceiling {c.ceiling:.4g}, gain {c.achievable_fraction:.0%})"
               if c.ceiling is not None and c.floor is not None and c.achievable_fraction is not None else "")
        note = f" — {c.note}" if c.note else ""
        verdict = ("PASS" if c.passed else "FAIL") if c.gating else "info"
        lines.append(f"  {verdict:<4}  {c.name:<14} {c.metric} {c.op} {c.threshold:g}: {c.value:.4g}{iv} "
                     f"(margin {c.margin:+.4g}){vs}{top}{note}")
    ce = report.ceiling or {}
    if ce and not ce.get("known"):
        lines.append(f"  ceiling: unknown — {ce.get('reason', '')}")
    return lines
