"""Pipeline step 2 — validate: a Great Expectations suite over the ingest stats table.

Every threshold in ``params.yaml → validation`` (:class:`xct_core.config.ValidateParams`) is
one GX expectation over a column of the stats table (:data:`xct_core.stats.STATS_COLUMNS`);
so is "the volume loaded" (4D data, truncated/corrupt files, NaN/Inf voxels, implausible
geometry all make :func:`xct_core.io.load_ct` fail, with the reason), "no duplicate" (same
source checksum or same voxel data as an earlier volume) and, for an ingest output folder,
"the canonical volume file is there and matches its recorded checksum" (file checks).
GX runs in an ephemeral context; the per-volume verdicts come from each expectation's
``unexpected_index_list`` (keyed by the ``id`` column).

Outputs (``run_validate``, in OUT, default ``data/validated``)::

    report.json   per-volume pass/fail + reasons, per-expectation results, thresholds
    report.html   the same as one self-contained HTML page, rendered from the GX results
                  (not GX Data Docs: those are a multi-file site with run-timestamped paths)
    splits.json   the ingest split minus quarantined volumes (policy quarantine, or when
                  every volume passed); absent when policy fail found failures

Policy (``validation.policy``): ``fail`` → non-zero exit when any volume fails; ``quarantine``
→ failing volumes leave the split (listed under ``excluded``/``quarantined`` with their
reasons) and the step succeeds, unless no training volume is left.

Entry points, one implementation: ``xct step validate --interim data/interim
--out data/validated`` (dvc.yaml), the KFP component :data:`components.kfp_components.validate_component`, and
``xct data validate DIR`` (:func:`validate_dir`, pipelines/commands/data_validate.py).
"""

import html
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from xct_core.config import Params, ValidateParams
from xct_core.errors import InputError
from xct_core.stats import (
    STATS_COLUMNS,
    discover,
    drop_from_splits,
    file_sha256,
    json_text,
    mark_duplicates,
    measure,
    read_stats,
    write_text_atomic,
)

os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")

REPORT_JSON = "report.json"
REPORT_HTML = "report.html"
SPLITS_JSON = "splits.json"
#: extra column filled by the file checks of an ingest output folder
VOLUME_CHECK = "volume_check"


# --------------------------------------------------------------------------- the checks


@dataclass(frozen=True)
class Check:
    """One expectation of the suite and how to word its failure for one volume."""

    name: str  #: stable short name (report key, GX ``meta.xct_check``)
    expectation: str  #: GX expectation class name, e.g. ``ExpectColumnValuesToBeBetween``
    kwargs: dict[str, Any]
    reason: Callable[[Mapping[str, Any]], str]


def _g(v: Any) -> str:
    return "?" if v is None else f"{float(v):g}"


def _xyz(row: Mapping[str, Any], fmt: str, prefix: str, suffix: str = "") -> str:
    vals = [row.get(f"{prefix}{ax}{suffix}") for ax in "xyz"]
    return " x ".join("?" if v is None else format(float(v), fmt) for v in vals)


def build_checks(params: Params) -> list[Check]:
    """The suite, one :class:`Check` per expectation, thresholds from ``params.validation``.

    Rows with a missing value are not judged by the numeric checks (GX ignores nulls); a
    volume that did not load fails the ``loaded`` check whatever else is known about it.
    """
    v: ValidateParams = params.validation
    body_hu = params.ingest.body_hu
    lo, hi = v.min_spacing_mm, v.max_spacing_mm
    shape_min = " x ".join(str(s) for s in v.min_shape)
    extent_min = " x ".join(f"{e:g}" for e in v.min_extent_mm)

    def spacing(r: Mapping[str, Any]) -> str:
        return f"absurd voxel spacing {_xyz(r, 'g', 'spacing_')} mm (allowed {lo:g}..{hi:g} mm per axis)"

    def small_shape(r: Mapping[str, Any]) -> str:
        return f"too small for the stage grid: {_xyz(r, '.0f', 'shape_')} voxels (min_shape {shape_min})"

    def small_extent(r: Mapping[str, Any]) -> str:
        return f"too small for the stage grid: extent {_xyz(r, '.0f', 'extent_', '_mm')} mm (min_extent_mm {extent_min})"

    between = "ExpectColumnValuesToBeBetween"
    checks = [
        Check("loaded", "ExpectColumnValuesToBeInSet", {"column": "status", "value_set": ["ok"]},
              lambda r: f"load error: {r.get('error')}"),
        Check("no_nan", between, {"column": "nan_count", "min_value": 0, "max_value": 0},
              lambda r: f"{r.get('nan_count')} NaN voxels"),
        Check("no_inf", between, {"column": "inf_count", "min_value": 0, "max_value": 0},
              lambda r: f"{r.get('inf_count')} Inf voxels"),
        Check("hu_min_has_air", between, {"column": "hu_min", "max_value": v.max_hu_min},
              lambda r: f"not HU: minimum {_g(r.get('hu_min'))} > {v.max_hu_min:g} HU, no air "
                        "(raw stored values without rescale?)"),
        Check("hu_min_plausible", between, {"column": "hu_min", "min_value": v.min_hu_min},
              lambda r: f"not HU: minimum {_g(r.get('hu_min'))} < {v.min_hu_min:g} HU"),
        Check("hu_max_plausible", between, {"column": "hu_max", "max_value": v.max_hu_max},
              lambda r: f"not HU: maximum {_g(r.get('hu_max'))} > {v.max_hu_max:g} HU"),
        Check("hu_max_has_tissue", between, {"column": "hu_max", "min_value": v.min_hu_max},
              lambda r: f"not HU: maximum {_g(r.get('hu_max'))} < {v.min_hu_max:g} HU, nothing denser than water"),
        Check("spacing_min", between, {"column": "spacing_min", "min_value": lo}, spacing),
        Check("spacing_max", between, {"column": "spacing_max", "max_value": hi}, spacing),
        *(Check(f"shape_{ax}", between, {"column": f"shape_{ax}", "min_value": n}, small_shape)
          for ax, n in zip("xyz", v.min_shape)),
        *(Check(f"extent_{ax}", between, {"column": f"extent_{ax}_mm", "min_value": e}, small_extent)
          for ax, e in zip("xyz", v.min_extent_mm)),
        Check("body_fraction", between, {"column": "body_fraction", "min_value": v.min_body_fraction},
              lambda r: f"nearly empty: {100 * float(r.get('body_fraction') or 0):.2f}% of voxels above "
                        f"{body_hu:g} HU (min {100 * v.min_body_fraction:g}%)"),
        Check("not_duplicate", "ExpectColumnValuesToBeNull", {"column": "duplicate_of"},
              lambda r: f"duplicate of {r.get('duplicate_of')} ({r.get('duplicate_kind')})"),
        Check("unique_id", "ExpectColumnValuesToBeUnique", {"column": "id"},
              lambda r: f"id {r.get('id')} is not unique"),
        Check("volume_file", "ExpectColumnValuesToBeInSet", {"column": VOLUME_CHECK, "value_set": ["ok"]},
              lambda r: f"canonical volume {r.get('volume')}: {r.get(VOLUME_CHECK)}"),
    ]  # fmt: skip
    return checks


# --------------------------------------------------------------------------- GX plumbing


class _GX:
    """One ephemeral GX context per process (import ≈ 2.5 s; context and suites are reused)."""

    ctx: Any = None
    batch: Any = None
    definitions: dict[str, Any] = {}


def _gx_definition(checks: Sequence[Check]) -> Any:
    import hashlib
    import json

    import great_expectations as gx
    from great_expectations.data_context.types.base import ProgressBarsConfig

    if _GX.ctx is None:
        ctx = gx.get_context(mode="ephemeral")
        ctx.variables.progress_bars = ProgressBarsConfig(globally=False)
        asset = ctx.data_sources.add_pandas("xct").add_dataframe_asset("stats")
        _GX.batch = asset.add_batch_definition_whole_dataframe("stats")
        _GX.ctx = ctx
    spec = json.dumps([[c.name, c.expectation, c.kwargs] for c in checks], sort_keys=True, default=str)
    name = "xct-stats-" + hashlib.sha256(spec.encode()).hexdigest()[:12]
    if name not in _GX.definitions:
        suite = _GX.ctx.suites.add(gx.ExpectationSuite(name=name))
        for c in checks:
            cls = getattr(gx.expectations, c.expectation)
            suite.add_expectation(cls(**c.kwargs, meta={"xct_check": c.name}))
        vd = gx.ValidationDefinition(name=name, data=_GX.batch, suite=suite)
        _GX.definitions[name] = _GX.ctx.validation_definitions.add(vd)
    return _GX.definitions[name]


def _gx_error(info: Any) -> str | None:
    """The message of an exception GX caught while evaluating an expectation, else None.

    ``exception_info`` is either one ``{"raised_exception", "exception_message", …}`` dict or
    a dict of them keyed by metric.
    """
    if not isinstance(info, dict):
        return None
    if "raised_exception" in info:
        return str(info.get("exception_message")) if info.get("raised_exception") else None
    for sub in info.values():
        msg = _gx_error(sub)
        if msg is not None:
            return msg
    return None


def _frame(rows: Sequence[Mapping[str, Any]]) -> Any:
    import pandas as pd

    cols = [*STATS_COLUMNS, VOLUME_CHECK]
    return pd.DataFrame([{c: r.get(c) for c in cols} for r in rows], columns=cols)


# --------------------------------------------------------------------------- the report


@dataclass
class ValidationReport:
    """Outcome of the suite: per-volume verdicts and per-expectation results."""

    suite: str
    policy: str
    volumes: list[dict[str, Any]]  #: id, source, path, passed, reasons (rows in table order)
    expectations: list[dict[str, Any]]  #: name, type, kwargs, success, unexpected_count, failed_ids
    thresholds: dict[str, Any]
    gx_version: str
    quarantined: list[str] = field(default_factory=list)
    #: files under the folder that are neither NIfTI nor part of a DICOM series (not validated)
    ignored: list[str] = field(default_factory=list)

    @property
    def success(self) -> bool:
        """True when every volume passed every expectation."""
        return all(v["passed"] for v in self.volumes) and all(e["success"] for e in self.expectations)

    @property
    def failed(self) -> list[dict[str, Any]]:
        return [v for v in self.volumes if not v["passed"]]

    def failure_lines(self) -> list[str]:
        """One line per failing volume: ``<path>: <reason>; <reason>``."""
        return [f"{v['path']}: {'; '.join(v['reasons'])}" for v in self.failed]

    def ignored_lines(self) -> list[str]:
        """One line per ignored file: ``<path>: ignored (…)`` — not a verdict, a notice."""
        return [f"{p}: ignored (neither a .nii/.nii.gz file nor part of a DICOM series)" for p in self.ignored]

    def to_dict(self) -> dict[str, Any]:
        return {
            "success": self.success,
            "policy": self.policy,
            "suite": self.suite,
            "great_expectations": self.gx_version,
            "thresholds": self.thresholds,
            "statistics": {
                "n_volumes": len(self.volumes),
                "n_passed": len(self.volumes) - len(self.failed),
                "n_failed": len(self.failed),
                "evaluated_expectations": len(self.expectations),
                "successful_expectations": sum(e["success"] for e in self.expectations),
            },
            "volumes": self.volumes,
            "expectations": self.expectations,
            "quarantined": self.quarantined,
            "ignored_files": self.ignored,
        }


def validate_rows(
    rows: Sequence[Mapping[str, Any]], params: Params, raw_dir: str | Path | None = None
) -> ValidationReport:
    """Run the GX suite (:func:`build_checks`) over stats-table rows and collect the verdicts.

    ``raw_dir`` (when known) turns each row's ``source`` into the path shown to the user.
    """
    import great_expectations as gx

    if not rows:
        raise InputError(raw_dir, "the stats table is empty: no CT volumes to validate")
    checks = build_checks(params)
    vd = _gx_definition(checks)
    result = vd.run(
        batch_parameters={"dataframe": _frame(rows)},
        result_format={"result_format": "COMPLETE", "unexpected_index_column_names": ["id"]},
    )
    row_of = {r["id"]: r for r in rows}
    failed_ids: dict[str, list[str]] = {}
    expectations = []
    for res in result.results:
        cfg = res.expectation_config
        name = (cfg.meta or {}).get("xct_check", cfg.type)
        err = _gx_error(res.exception_info)
        if err is not None:  # a broken expectation is a bug, not a verdict on the data
            raise RuntimeError(f"GX expectation {name} ({cfg.type}) raised: {err}")
        ids = sorted({str(u["id"]) for u in (res.result or {}).get("unexpected_index_list") or []})
        failed_ids[name] = ids
        expectations.append(
            {
                "name": name,
                "type": cfg.type,
                "kwargs": {k: val for k, val in cfg.kwargs.items() if k != "batch_id"},
                "success": bool(res.success),
                "unexpected_count": int((res.result or {}).get("unexpected_count") or 0),
                "failed_ids": ids,
            }
        )
    order = {c.name: i for i, c in enumerate(checks)}
    expectations.sort(key=lambda x: order.get(x["name"], len(order)))
    reasons: dict[str, list[str]] = {r["id"]: [] for r in rows}
    for c in checks:  # reasons in suite order, each worded once
        for vid in failed_ids.get(c.name, []):
            if vid not in row_of:
                continue
            why = c.reason(row_of[vid])
            if why not in reasons[vid]:
                reasons[vid].append(why)
    base = Path(raw_dir) if raw_dir is not None else None
    volumes = [
        {
            "id": r["id"],
            "source": r.get("source"),
            "path": str(base / r["source"]) if base is not None and r.get("source") else str(r.get("source") or r["id"]),
            "passed": not reasons[r["id"]],
            "reasons": reasons[r["id"]],
        }
        for r in rows
    ]
    return ValidationReport(
        suite=vd.suite.name,
        policy=params.validation.policy,
        volumes=volumes,
        expectations=expectations,
        thresholds={"validation": params.validation.model_dump(mode="json"), "body_hu": params.ingest.body_hu},
        gx_version=gx.__version__,
    )


def check_volume_files(rows: Sequence[dict[str, Any]], interim_dir: str | Path) -> None:
    """File checks of an ingest output: set ``volume_check`` on every loaded row to ``ok``,
    ``missing`` or ``checksum mismatch`` (the canonical volume vs its recorded sha256)."""
    base = Path(interim_dir)
    for r in rows:
        if r.get("status") != "ok":
            r[VOLUME_CHECK] = None
            continue
        p = base / str(r.get("volume") or "")
        if not r.get("volume") or not p.is_file():
            r[VOLUME_CHECK] = "missing"
        elif r.get("volume_sha256") and file_sha256(p) != r["volume_sha256"]:
            r[VOLUME_CHECK] = "checksum mismatch (changed after ingest)"
        else:
            r[VOLUME_CHECK] = "ok"


def scan_raw(
    raw_dir: str | Path, params: Params, ignored: list[str] | None = None
) -> list[dict[str, Any]]:
    """Stats rows for a raw folder, in memory (nothing written): what ingest would record.

    ``ignored`` (when given) receives the relative paths of the files that are not CTs."""
    sources, other = discover(raw_dir)
    if ignored is not None:
        ignored.extend(other)
    if not sources:
        listing = f" ({len(other)} other file(s), e.g. {other[0]})" if other else ""
        raise InputError(raw_dir, f"no CT volumes found (expected .nii/.nii.gz files or DICOM series folders){listing}")
    rows = [measure(s, params.data.ct, params.ingest, limits=params.limits)[0] for s in sources]
    mark_duplicates(rows)
    return rows


def validate_dir(path: str | Path, params: Params) -> ValidationReport:
    """Validate a folder: an ingest output (it has ``stats.json``: table + file checks) or a
    raw folder of CTs (scanned in memory). What ``xct data validate DIR`` runs."""
    p = Path(path)
    if not p.exists():
        raise InputError(p, "no such directory")
    if (p / "stats.json").is_file():
        doc = read_stats(p / "stats.json")
        rows = doc["volumes"]
        check_volume_files(rows, p)
        rep = validate_rows(rows, params, doc.get("raw_dir"))
        base = Path(doc["raw_dir"]) if doc.get("raw_dir") else None
        rep.ignored = [str(base / f) if base is not None else str(f) for f in doc.get("ignored_files") or []]
        return rep
    other: list[str] = []
    rep = validate_rows(scan_raw(p, params, other), params, p)
    rep.ignored = [str(p / f) for f in other]
    return rep


# --------------------------------------------------------------------------- outputs


def render_html(report: ValidationReport) -> str:
    """A self-contained HTML page of the report (volumes first, then expectations)."""
    e = html.escape
    d = report.to_dict()
    st = d["statistics"]
    verdict = "PASSED" if report.success else "FAILED"
    vol_rows = "\n".join(
        f"<tr class='{'ok' if v['passed'] else 'bad'}'><td>{e(v['id'])}</td><td>{e(v['path'])}</td>"
        f"<td>{'pass' if v['passed'] else 'FAIL'}</td><td>{'<br>'.join(e(x) for x in v['reasons'])}</td></tr>"
        for v in report.volumes
    )
    exp_rows = "\n".join(
        f"<tr class='{'ok' if x['success'] else 'bad'}'><td>{e(x['name'])}</td><td><code>{e(x['type'])}</code></td>"
        f"<td><code>{e(', '.join(f'{k}={val!r}' for k, val in sorted(x['kwargs'].items())))}</code></td>"
        f"<td>{'pass' if x['success'] else 'FAIL'}</td><td>{x['unexpected_count']}</td>"
        f"<td>{e(', '.join(x['failed_ids']))}</td></tr>"
        for x in report.expectations
    )
    quarantine = (
        f"<p>Quarantined (dropped from the split): {e(', '.join(report.quarantined))}</p>" if report.quarantined else ""
    )
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>xct data validation: {verdict}</title>
<style>
body {{ font-family: sans-serif; margin: 2em; }} table {{ border-collapse: collapse; margin-bottom: 2em; }}
td, th {{ border: 1px solid #ccc; padding: 4px 8px; text-align: left; vertical-align: top; }}
tr.bad td {{ background: #fde8e8; }} tr.ok td {{ background: #eef8ee; }} code {{ font-size: 90%; }}
</style></head><body>
<h1>xct data validation: {verdict}</h1>
<p>{st['n_passed']} of {st['n_volumes']} volumes passed; {st['successful_expectations']} of
{st['evaluated_expectations']} expectations met. Policy: <b>{e(report.policy)}</b>.
Suite <code>{e(report.suite)}</code>, Great Expectations {e(report.gx_version)}
(rendered from the GX validation results).</p>
{quarantine}
<h2>Volumes</h2>
<table><tr><th>id</th><th>source</th><th>verdict</th><th>reasons</th></tr>
{vol_rows}
</table>
<h2>Expectations</h2>
<table><tr><th>check</th><th>expectation</th><th>arguments</th><th>result</th><th>unexpected</th><th>volumes</th></tr>
{exp_rows}
</table>
</body></html>
"""


def write_report(report: ValidationReport, json_path: str | Path, html_path: str | Path | None = None) -> None:
    """Write the report as JSON (and HTML when ``html_path`` is given), atomically."""
    write_text_atomic(json_path, json_text(report.to_dict()))
    if html_path is not None:
        write_text_atomic(html_path, render_html(report))


def html_path_for(json_path: str | Path) -> Path:
    """``OUT.json`` → ``OUT.html`` (the HTML report written beside a JSON report)."""
    p = Path(json_path)
    return p.with_suffix(".html") if p.suffix.lower() == ".json" else p.with_name(p.name + ".html")


def run_validate(
    interim_dir: str | Path,
    out_dir: str | Path,
    params: Params,
    log: Callable[[str], None] | None = None,
) -> ValidationReport:
    """Validate an ingest output folder and apply the policy (module docstring).

    Writes ``report.json``/``report.html`` always, and ``splits.json`` unless policy ``fail``
    met failures (then a stale one is removed so nothing downstream consumes it). The caller
    decides the exit status: failure = ``not report.success and report.policy == "fail"``.
    Raises :class:`InputError` when quarantine leaves no training volume.
    """
    say = log or (lambda _msg: None)
    interim = Path(interim_dir)
    out = Path(out_dir)
    report = validate_dir(interim, params)
    splits_doc = _read_splits(interim / "splits.json")
    failing = {v["id"]: "; ".join(v["reasons"]) for v in report.failed}
    for line in report.failure_lines():
        say(line)
    splits_out = out / SPLITS_JSON
    if failing and report.policy == "fail":
        write_report(report, out / REPORT_JSON, out / REPORT_HTML)
        splits_out.unlink(missing_ok=True)
        say(f"validation failed: {len(failing)} of {len(report.volumes)} volumes (policy fail)")
        return report
    report.quarantined = sorted(failing)
    kept = drop_from_splits(splits_doc, {k: f"quarantined: {why}" for k, why in failing.items()})
    kept["quarantined"] = report.quarantined
    write_report(report, out / REPORT_JSON, out / REPORT_HTML)
    if not kept["volumes"]["train"]:
        splits_out.unlink(missing_ok=True)
        raise InputError(interim, f"no training volume left after quarantining {len(failing)} volume(s)")
    write_text_atomic(splits_out, json_text(kept))
    n_kept = sum(len(v) for v in kept["volumes"].values())
    say(f"validation: {len(report.volumes) - len(failing)} of {len(report.volumes)} volumes passed; "
        f"{len(failing)} quarantined; {n_kept} in the split")
    return report


def _read_splits(path: Path) -> dict[str, Any]:
    from xct_core.jsondoc import read_json_doc

    doc = read_json_doc(path, "splits file", missing_hint="run the ingest step first")
    if not isinstance(doc.get("volumes"), dict):
        raise InputError(path, "not an xct splits file (no 'volumes' mapping)")
    return doc
