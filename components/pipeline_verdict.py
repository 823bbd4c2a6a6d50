"""The pipeline's verdict, ``reports/summary.json``: per-stage gate results, the registered
model and where the reports are — written by the register step, printed at the end of
``make demo`` / ``xct pipeline run`` (scripts rely on its keys). Not to be confused with
:mod:`components.kfp_exit_handler` (the KFP exit task's ``run_summary.json``: how a KFP run
ended, written even when a step failed).

Keys (stable):

* ``status``: ``"promoted"`` (registered and aliased ``champion``) | ``"registered"``
  (registered, aliased ``candidate``) | ``"rejected"`` (a gate failed or is missing; nothing
  registered);
* ``rejected_at_stage``: the first stage whose gate did not pass (int) or ``null``;
* ``stages``: one entry per stage, in order: ``{"stage", "passed", "skipped", "summary",
  "metrics": {the metric table's ``summary`` metrics (:mod:`xct_core.metric_table`), each
  with the baselines the table shows beside it (e.g. ``baseline_psnr_window_db``), and
  n_patients} (those present; :data:`STAGE_METRIC_KEYS`),
  "intervals": {the same keys but the counts: the patient bootstrap 95 % interval ``[low, high]`` of the mean
  (:func:`xct_core.intervals.bootstrap_interval` over the stage's ``per_patient.csv``; ``null``
  with fewer than 5 patients or without rows)},
  "checks": [gate checks: name, metric, op, threshold, value, passed, margin, and for PSNR
  checks ceiling, floor, achievable_fraction, unreachable],
  "ceiling": the gate report's information ceiling (``{"known": false, "reason"}`` for real data),
  "unreachable": [names of checks whose threshold is at or above the ceiling: "unreachable on
  this data"],
  "gate_report", "eval_metrics"}``;
* ``model_uri``: ``models:/<name>/<version>`` when registered; else the last trained stage's
  training run artifact ``runs:/<run_id>/model/<file>.pt`` when that run is known, else the
  local path of its exported ``.pt``; ``null`` when no stage was trained;
* ``model_version``, ``alias``, ``model_name`` (null when not registered);
* ``mlflow_tracking_uri`` (its password masked: ``http://user:***@host``);
* ``reports``: ``{"summary", "gates_dir", "eval_dir", "gates": [paths], "eval": [paths]}``.

:func:`format_summary` renders the printed end-of-run table (stage, metric, threshold,
value, pass) and the commands to open the MLflow UI and to reconstruct with the model.

No credential is written or printed: the summary is passed through
:func:`xct_core.redact.redact_doc` when built and again when written (a DVC metrics output
is committed), and the printed table through :func:`xct_core.redact.redact`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from xct_core.atomic import write_text_atomic
from xct_core.intervals import bootstrap_interval
from xct_core.jsondoc import json_text, read_json_doc
from xct_core.metric_table import METRICS, summed
from xct_core.redact import redact, redact_doc

STATUSES = ("promoted", "registered", "rejected")
SUMMARY_KEYS = (
    "status", "rejected_at_stage", "stages", "model_uri", "model_name", "model_version", "alias",
    "mlflow_tracking_uri", "reports",
)
#: metrics copied from each stage's metrics.json into the summary: the metric table's
#: ``summary`` metrics, each with the baselines shown beside it, + the number of patients
STAGE_METRIC_KEYS: tuple[str, ...] = (
    *(p + n for m in METRICS if "summary" in m.uses for n in m.names() for p in ("", *m.shown_with)),
    "n_patients",
)


def stage_entry(
    stage: int,
    gate: Mapping[str, Any] | None,
    metrics: Mapping[str, Any] | None,
    gate_path: str | Path,
    eval_path: str | Path,
) -> dict[str, Any]:
    """One ``stages[]`` entry from a gate report (or skip marker / ``None`` when missing)
    and the stage's evaluation metrics (``None`` when missing or skipped)."""
    m = metrics if metrics is not None and not metrics.get("skipped") else {}
    rows = _rows_beside(eval_path) if m else None
    if gate is None:
        passed, skipped, summary, checks = False, False, f"stage {stage}: no gate report at {gate_path}", []
    else:
        passed = bool(gate.get("passed")) and not gate.get("skipped")
        skipped = bool(gate.get("skipped"))
        summary = str(gate.get("summary") or gate.get("reason") or "")
        checks = list(gate.get("checks") or [])
    return {
        "stage": int(stage),
        "passed": passed,
        "skipped": skipped,
        "summary": summary,
        "metrics": {k: m[k] for k in STAGE_METRIC_KEYS if k in m},
        "intervals": {k: (bootstrap_interval([r.get(k, math.nan) for r in rows]).get("interval") if rows else None)
                      for k in STAGE_METRIC_KEYS if k in m and k != "n_patients" and not summed(k)},  # a count: no mean
        "checks": checks,
        "ceiling": (gate or {}).get("ceiling"),
        "unreachable": list((gate or {}).get("unreachable") or []),
        "gate_report": str(gate_path),
        "eval_metrics": str(eval_path),
    }


def _rows_beside(eval_path: str | Path) -> list[dict[str, Any]] | None:
    """The per-patient rows next to a stage's ``metrics.json`` (None when absent or a skip marker)."""
    from xct_core.intervals import read_rows_csv
    from xct_core.layout import PER_PATIENT_CSV

    p = Path(eval_path).parent / PER_PATIENT_CSV
    return read_rows_csv(p) if p.is_file() else None


def rejected_at(stages: Sequence[Mapping[str, Any]]) -> int | None:
    """The first stage that did not pass (a real failure before a skip), else ``None``."""
    for s in stages:
        if not s["passed"]:
            return int(s["stage"])
    return None


def build_summary(
    *,
    status: str,
    stages: Sequence[Mapping[str, Any]],
    model_uri: str | None,
    tracking_uri: str,
    reports: Mapping[str, Any],
    model_name: str | None = None,
    model_version: str | None = None,
    alias: str | None = None,
) -> dict[str, Any]:
    """The summary document (keys in the module docstring)."""
    if status not in STATUSES:
        raise ValueError(f"status must be one of {STATUSES}, got {status!r}")
    return redact_doc({
        "status": status,
        "rejected_at_stage": rejected_at(stages) if status == "rejected" else None,
        "stages": [dict(s) for s in stages],
        "model_uri": model_uri,
        "model_name": model_name,
        "model_version": model_version,
        "alias": alias,
        "mlflow_tracking_uri": tracking_uri,
        "reports": dict(reports),
    })


def write_summary(path: str | Path, summary: Mapping[str, Any]) -> Path:
    """Write the summary atomically (sorted keys; NaN → null; credentials masked)."""
    return write_text_atomic(path, json_text(redact_doc(dict(summary))))


def read_summary(path: str | Path) -> dict[str, Any]:
    """``reports/summary.json`` (:class:`InputError` when missing or not a summary)."""
    return read_json_doc(path, "run summary", missing_hint="run the register step first")


def _v(x: Any) -> str:
    if x is None:
        return "—"
    if isinstance(x, float):
        return "nan" if not math.isfinite(x) else f"{x:.4g}"
    return str(x)


def format_summary(summary: Mapping[str, Any]) -> str:
    """The end-of-run table (stage, metric, threshold, value, pass) + how to look and use."""
    rows = [("stage", "check", "threshold", "value", "pass", "ceiling (gain)")]
    for s in summary["stages"]:
        if not s["checks"]:
            rows.append((f"stage{s['stage']}", "(gate)", "—", "skipped" if s["skipped"] else "missing", "FAIL", ""))
        ce = s.get("ceiling") or {}
        for c in s["checks"]:
            vs = f" (vs {c['baseline']})" if c.get("baseline") else ""  # relative checks name their baseline
            verdict = "skip" if c.get("skipped") else ("info" if c.get("gating") is False else
                                                       ("pass" if c["passed"] else "FAIL"))
            top = ""
            if c.get("ceiling") is not None:
                gain = c.get("achievable_fraction")
                top = f"{_v(c['ceiling'])}" + (f" ({gain:.0%})" if isinstance(gain, float) else "")
                top += " UNREACHABLE on this data" if c.get("unreachable") else ""
            elif ce and not ce.get("known") and c.get("metric", "").startswith("psnr") and not c.get("baseline"):
                top = "unknown"
            rows.append((f"stage{s['stage']}", f"{c['metric']} {c['op']}{vs}", _v(c["threshold"]), _v(c["value"]),
                         verdict, top))
    widths = [max(len(r[i]) for r in rows) for i in range(6)]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(r, widths, strict=True)).rstrip() for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    status = summary["status"]
    head = {
        "promoted": f"PROMOTED: {summary['model_uri']} (alias {summary['alias']})",
        "registered": f"REGISTERED: {summary['model_uri']} (alias {summary['alias']}; did not beat the champion)",
        "rejected": f"REJECTED at stage {summary['rejected_at_stage']}: nothing registered",
    }[status]
    uri = summary["mlflow_tracking_uri"]
    tail = [
        "",
        head,
        f"MLflow UI:    mlflow ui --backend-store-uri {uri}" if not uri.startswith("http") else f"MLflow UI:    {uri}",
    ]
    if summary.get("model_uri"):
        tail.append(f"Reconstruct:  xct reconstruct --model {summary['model_uri']} --frontal FRONTAL.npy "
                    f"--lateral LATERAL.npy --out ct.nii.gz")
    tail.append(f"Summary:      {summary['reports'].get('summary')}")
    return redact("\n".join(lines + tail))
