"""HTML reports of reconstructions and evaluations (pure: arrays/files in, HTML + PNGs out).

One HTML file plus its pictures in ``<report dir>/images/`` (PNG, referenced by relative
paths, so the folder can be zipped or logged as an artifact as a whole). Pictures:

* per case, a slice montage (axial/coronal/sagittal, :mod:`xct_core.viz` display
  conventions): ground truth, reconstruction and baselines in the training window and in
  [-1024, 1024] HU; the error map (reconstruction − ground truth, ±window width, blue-red);
  the uncertainty (voxel-wise std over samples, 0 … its 99.5th percentile) when K > 1;
* per case, the input X-rays beside the reprojections (DRRs of the reconstruction with the
  input geometry, shared grey scale per view) and their difference;
* training curves (``plots/stage*/train.csv`` columns with ``loss`` in their name vs step)
  when a training folder is given.

Tables: the cascade beside the baselines (mean volume, direct regression, for stage k > 1 the
previous stage upsampled, with the gain over it) — patient means with
their patient bootstrap 95 % interval ``mean [low, high]`` when the report has the patients
(:func:`xct_core.intervals.bootstrap_interval`, the same as the model card and the summary) —,
one row per patient, and the promotion gate checks (``reports/gates/stage*.json``) when
present, each PSNR threshold beside its information ceiling, the floor and the fraction of the
achievable gain (a threshold above the ceiling: "unreachable on this data"). Which
metrics, in which order and under which label: :mod:`xct_core.metric_table` (use ``report``).
Everything is written atomically (temp file + rename).
"""

from __future__ import annotations

import csv
import datetime as _dt
import html
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from xct_core.atomic import write_text_atomic
from xct_core.errors import XctError
from xct_core.hu import HUWindow
from xct_core.intervals import BOOTSTRAP, bootstrap_interval
from xct_core.metric_table import PREDICTIONS, entry, label, names_for
from xct_core.viz import PLANES, Panel, orthogonal_slice, save_image_grid, slice_aspect

__all__ = [
    "COMPARE_METRICS",
    "ReportCase",
    "build_report",
    "save_case_images",
    "save_calibration_plot",
    "save_training_curves",
    "read_gate_reports",
]

#: the metrics of the report's tables (:mod:`xct_core.metric_table`, use ``report``), in table order
COMPARE_METRICS: tuple[str, ...] = names_for("report")
IMAGES = "images"


@dataclass
class ReportCase:
    """One case in a report: its id, metrics and pictures (caption → path)."""

    case_id: str
    metrics: Mapping[str, Any]
    images: dict[str, Path] = field(default_factory=dict)


def _safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name)


def _rows_for(name: str, vol: np.ndarray, lo: float, hi: float, cmap: str, spacing: Any, tag: str) -> list[Panel]:
    return [Panel(orthogonal_slice(vol, p), f"{p} · {tag}", lo, hi, cmap, slice_aspect(p, spacing)) for p in PLANES]


def save_case_images(
    img_dir: str | Path,
    case_id: str,
    *,
    volumes: Mapping[str, np.ndarray],
    window: HUWindow,
    spacing: Any = None,
    ground_truth: np.ndarray | None = None,
    uncertainty: np.ndarray | None = None,
    xrays: Mapping[str, tuple[np.ndarray, np.ndarray]] | None = None,
) -> dict[str, Path]:
    """Write the case's montage and X-ray comparison PNGs into ``img_dir``.

    ``volumes``: name → HU volume (RAS+ ``[X, Y, Z]``; e.g. reconstruction, baselines);
    ``ground_truth`` adds its row first and an error-map row per volume; ``uncertainty``
    (std, HU) adds a row; ``xrays``: view → ``(input, reprojection)`` line integrals.
    Returns caption → path.
    """
    d = Path(img_dir)
    out: dict[str, Path] = {}
    rows: dict[str, list[Panel]] = {}
    named = ({"ground truth": ground_truth} if ground_truth is not None else {}) | dict(volumes)
    for name, vol in named.items():
        v = np.asarray(vol, dtype=np.float32)
        rows[name] = (_rows_for(name, v, window.lo, window.hi, "gray", spacing, window.name)
                      + _rows_for(name, v, -1024.0, 1024.0, "gray", spacing, "[-1024,1024]"))
    if ground_truth is not None:
        gt = np.asarray(ground_truth, dtype=np.float32)
        for name, vol in volumes.items():
            err = np.asarray(vol, dtype=np.float32) - gt
            rows[f"error: {name}"] = _rows_for(name, err, -window.width, window.width, "coolwarm", spacing,
                                               f"± {window.width:g} HU")
    if uncertainty is not None:
        u = np.asarray(uncertainty, dtype=np.float32)
        hi = float(np.percentile(u, 99.5)) if u.size else 1.0
        rows["uncertainty (std)"] = _rows_for("std", u, 0.0, max(hi, 1e-3), "magma", spacing, f"0…{hi:.0f} HU")
    if rows:
        out["slices"] = save_image_grid(rows, d / f"{_safe(case_id)}_slices.png",
                                        title=f"{case_id}: slices (RAS+, radiological display)")
    if xrays:
        xrows: dict[str, list[Panel]] = {}
        for view, (inp, rep) in xrays.items():
            a, b = np.asarray(inp, dtype=np.float32), np.asarray(rep, dtype=np.float32)
            fin = np.concatenate([a.ravel(), b.ravel()])
            fin = fin[np.isfinite(fin)]
            lo, hi = (float(np.percentile(fin, 0.5)), float(np.percentile(fin, 99.5))) if fin.size else (0.0, 1.0)
            diff = b - a
            m = float(np.abs(diff).max()) if diff.size else 1.0
            xrows[view] = [Panel(a, "input", lo, hi), Panel(b, "reprojection", lo, hi),
                           Panel(diff, "reprojection − input", -max(m, 1e-6), max(m, 1e-6), "coolwarm")]
        out["xrays"] = save_image_grid(xrows, d / f"{_safe(case_id)}_xrays.png",
                                       title=f"{case_id}: input X-rays vs reprojections (line integrals)")
    return out


def save_training_curves(train_dir: str | Path, img_dir: str | Path) -> dict[str, Path]:
    """One PNG per stage with the ``*loss*`` columns of ``plots/stage*/train.csv`` vs step
    (log scale); stages without a CSV are skipped."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    from xct_core.viz import _atomic_savefig  # the project's atomic PNG writer

    out: dict[str, Path] = {}
    for csv_path in sorted(Path(train_dir).glob("plots/stage*/train.csv")):
        with open(csv_path, newline="") as f:
            rows = list(csv.DictReader(f))
        cols = [c for c in (rows[0].keys() if rows else []) if "loss" in c]
        if not cols:
            continue
        fig = Figure(figsize=(6, 3.2), facecolor="black")
        FigureCanvasAgg(fig)
        ax = fig.subplots()
        ax.set_facecolor("black")
        for c in cols:
            pts = [(float(r["step"]), float(r[c])) for r in rows if r.get(c) not in (None, "")]
            pts = [(s, v) for s, v in pts if math.isfinite(v) and v > 0]
            if pts:
                ax.plot(*zip(*pts, strict=True), label=c)
        ax.set_yscale("log")
        ax.set_xlabel("step", color="white")
        ax.tick_params(colors="white")
        ax.legend(fontsize=7)
        stage = csv_path.parent.name
        ax.set_title(f"{stage} training loss", color="white", fontsize=9)
        fig.tight_layout()
        out[stage] = _atomic_savefig(fig, Path(img_dir) / f"curves_{stage}.png", 100)
    return out


def read_gate_reports(gates_dir: str | Path) -> list[dict[str, Any]]:
    """The gate reports ``stage*.json`` of a folder (unreadable files are reported as such)."""
    from xct_core.gates import read_gate_report

    out = []
    for p in sorted(Path(gates_dir).glob("stage*.json")):
        try:
            out.append(read_gate_report(p))
        except XctError as e:
            out.append({"stage": p.stem, "summary": str(e), "checks": []})
    return out


def _fmt(v: Any) -> str:
    if v is None:
        return "—"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, (int, float, np.floating)):
        f = float(v)
        return "nan" if not math.isfinite(f) else f"{f:.4g}"
    return html.escape(str(v))


def _with_interval(mean: Any, values: Sequence[Any]) -> Any:
    """``mean [low, high]`` (the patient bootstrap interval of ``values``), or ``mean`` alone."""
    iv = bootstrap_interval([v for v in values if isinstance(v, (int, float, np.floating))]).get("interval")
    if iv is None or not isinstance(mean, (int, float, np.floating)) or not math.isfinite(float(mean)):
        return mean
    return f"{_fmt(mean)} [{_fmt(iv[0])}, {_fmt(iv[1])}]"


def _gate_ceiling(ch: Mapping[str, Any], ceiling: Mapping[str, Any] | None) -> str:
    """The ceiling cell of a gate check: ceiling, floor, gain fraction, unreachable flag."""
    if ch.get("ceiling") is None:
        known = (ceiling or {}).get("known")
        return "unknown" if known is False and not ch.get("baseline") and str(ch.get("metric", "")).startswith("psnr") else ""
    gain = ch.get("achievable_fraction")
    text = f"{_fmt(ch['ceiling'])} (floor {_fmt(ch.get('floor'))}" + (f", gain {gain:.0%})" if isinstance(gain, float) else ")")
    return text + (" — unreachable on this data" if ch.get("unreachable") else "")


def _table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    head = "".join(f"<th>{html.escape(str(h))}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{_fmt(c)}</td>" for c in r) + "</tr>" for r in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _img(path: Path, base: Path, caption: str) -> str:
    try:
        rel = path.resolve().relative_to(base.resolve()).as_posix()
    except ValueError:
        rel = path.resolve().as_uri()
    return (f'<figure><img src="{html.escape(rel)}" alt="{html.escape(caption)}">'
            f"<figcaption>{html.escape(caption)}</figcaption></figure>")


def save_calibration_plot(curve: Mapping[str, Any], path: str | Path, title: str) -> Path:
    """The calibration plot of a ``calibration_curve`` (:func:`xct_core.calibration.coverage_curve`):
    left, expected vs observed coverage (Gaussian interval raw and recalibrated, conformal);
    right, the rank histogram of the truth among the K samples (flat = calibrated)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    from xct_core.viz import _atomic_savefig  # the project's atomic PNG writer

    fig = Figure(figsize=(8, 3.4), facecolor="black")
    FigureCanvasAgg(fig)
    ax, bx = fig.subplots(1, 2)
    for a in (ax, bx):
        a.set_facecolor("black")
        a.tick_params(colors="white")
    lv = list(curve.get("levels") or [])
    ax.plot([0, 1], [0, 1], color="gray", lw=1, ls="--", label="ideal")
    for key, lab in (("gaussian_raw", "mean ± z·std (raw)"), ("gaussian_recal", "mean ± z·s·std (recalibrated)"),
                     ("conformal", "conformal (q fitted on val)")):
        if curve.get(key):
            ax.plot(lv, curve[key], marker="o", label=lab)
    ax.set_xlabel("nominal coverage", color="white")
    ax.set_ylabel("observed coverage", color="white")
    ax.set_xlim(0.4, 1.0)
    ax.set_ylim(0.0, 1.0)
    ax.legend(fontsize=6)
    hist = list(curve.get("rank_histogram") or [])
    if hist:
        bx.bar(range(len(hist)), hist, color="#4a90d9")
        bx.axhline(1.0 / len(hist), color="gray", ls="--", lw=1)
        bx.set_xlabel(f"rank of the truth among K = {len(hist) - 1} samples", color="white")
        bx.set_ylabel("fraction of body voxels", color="white")
    fig.suptitle(title, color="white", fontsize=9)
    fig.tight_layout()
    return _atomic_savefig(fig, Path(path), 100)


_CSS = """body{font-family:sans-serif;margin:1.5em;background:#fafafa;color:#222}
table{border-collapse:collapse;margin:.5em 0 1.5em}th,td{border:1px solid #bbb;padding:3px 8px;text-align:right}
th{background:#eee}td:first-child,th:first-child{text-align:left}img{max-width:100%}
figure{margin:.5em 0 1.5em}figcaption{font-size:90%;color:#555}.warn{color:#a00}.note{color:#555;font-size:90%}"""


def build_report(
    path: str | Path,
    *,
    title: str,
    cases: Sequence[ReportCase],
    summary: Mapping[str, Any] | None = None,
    notes: Sequence[str] = (),
    warnings: Sequence[str] = (),
    gates: Sequence[Mapping[str, Any]] = (),
    curves: Mapping[str, Path] | None = None,
    info: Mapping[str, Any] | None = None,
    label_context: Mapping[str, Any] | None = None,
    calibration: Mapping[str, Path] | None = None,
) -> Path:
    """Write the HTML report at ``path`` (pictures are referenced relative to its folder).

    ``summary``: patient means (same keys as a case's metrics); ``notes``: protocol/baseline
    remarks shown verbatim; ``warnings``: QA warnings (highlighted); ``gates``: gate report
    dicts (:func:`read_gate_reports`); ``curves``: stage → curve PNG; ``info``: key → value
    shown at the top (model URI, steps, seeds …); ``label_context``: the values the metric
    labels are formatted with (:meth:`xct_core.evaluation.EvalProtocol.label_context` of the
    evaluated grid: the SSIM label states the taps actually used); ``calibration``: caption →
    calibration plot PNG (:func:`save_calibration_plot`). A table row whose label
    needs a value the context lacks is a ``ValueError``, never a guessed label.
    """
    out = Path(path)
    base = out.parent
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
             f"<style>{_CSS}</style></head><body><h1>{html.escape(title)}</h1>",
             f"<p class='note'>generated {_dt.datetime.now(_dt.timezone.utc).isoformat(timespec='seconds')}</p>"]
    if info:
        parts.append(_table(["item", "value"], [(k, v) for k, v in info.items()]))
    for w in warnings:
        parts.append(f"<p class='warn'>⚠ {html.escape(w)}</p>")
    for n in notes:
        parts.append(f"<p class='note'>{html.escape(n)}</p>")
    ref = summary if summary is not None else (cases[0].metrics if len(cases) == 1 else None)
    compared = [k for k in COMPARE_METRICS if entry(k).per_prediction]
    if ref:
        cols = [(p.report, p.prefix) for p in PREDICTIONS
                if p.report is not None and (p.prefix == "" or any(k.startswith(p.prefix) for k in ref))]
        patients = summary is not None and len(cases) >= BOOTSTRAP.min_patients
        rows = [[label(key, label_context)] + [
            _with_interval(ref.get(prefix + key), [c.metrics.get(prefix + key) for c in cases]) if patients
            else ref.get(prefix + key) for _, prefix in cols] for key in compared if key in ref]
        parts.append("<h2>Cascade and baselines" + (" (patient means)" if summary is not None else "") + "</h2>")
        if patients:
            parts.append(f"<p class='note'>mean [low, high]: patient bootstrap {BOOTSTRAP.confidence_level:.0%} "
                         f"interval ({BOOTSTRAP.method}, {BOOTSTRAP.n_resamples} resamples, seed {BOOTSTRAP.seed})</p>")
        parts.append(_table(["metric"] + [c for c, _ in cols], rows))
        if isinstance(ref.get("gain_over_upsampled_db"), (int, float, np.floating)):
            gain = ref["gain_over_upsampled_db"]
            if patients:
                gain = _with_interval(gain, [c.metrics.get("gain_over_upsampled_db") for c in cases])
            parts.append(f"<p class='note'>{html.escape(label('gain_over_upsampled_db', label_context))}: "
                         f"{_fmt(gain)} (per-patient "
                         "differences: a paired interval)</p>")
    if len(cases) > 1 or (cases and summary is not None):
        keys = [k for k in compared if any(k in c.metrics for c in cases)]
        beside = [p + k for k in compared for p in entry(k).shown_with]
        beside += [k for k in COMPARE_METRICS if k not in compared]
        extra = [k for k in beside if any(k in c.metrics for c in cases)]
        parts.append("<h2>Per patient</h2>")
        parts.append(_table(["id", *keys, *extra], [[c.case_id, *(c.metrics.get(k) for k in keys + extra)]
                                                     for c in cases]))
    for c in cases:
        if c.images:
            parts.append(f"<h2>{html.escape(c.case_id)}</h2>")
            parts.extend(_img(p, base, f"{c.case_id}: {cap}") for cap, p in c.images.items())
    if gates:
        parts.append("<h2>Promotion gates</h2>")
        rows = []
        for g in gates:
            for ch in g.get("checks") or []:
                iv = ch.get("interval") or ch.get("change_interval")
                value = ch.get("value")
                if iv:
                    what = "change" if ch.get("change_interval") else ""
                    value = f"{_fmt(value)} ({what + ' ' if what else ''}95% [{_fmt(iv[0])}, {_fmt(iv[1])}])"
                result = ("pass" if ch.get("passed") else "FAIL") if ch.get("gating", True) else "info"
                rows.append([f"stage{g.get('stage')}", ch.get("metric"), ch.get("op"), ch.get("threshold"),
                             value, result, _gate_ceiling(ch, g.get("ceiling"))])
            if not g.get("checks"):
                rows.append([f"stage{g.get('stage')}", g.get("summary") or g.get("reason"), "", "", "", "—", ""])
        parts.append(_table(["stage", "metric", "op", "threshold", "value", "result", "ceiling (floor, gain)"], rows))
    if calibration:
        parts.append("<h2>Uncertainty calibration</h2>")
        parts.extend(_img(p, base, cap) for cap, p in calibration.items())
    if curves:
        parts.append("<h2>Training curves</h2>")
        parts.extend(_img(p, base, f"{stage} training loss") for stage, p in curves.items())
    parts.append("</body></html>\n")
    return write_text_atomic(out, "\n".join(parts))
