"""The model card of a cascade: one document that says what the model is for, what it was
trained and measured on, how it was measured, and what it must be fed.

The convention is that of MONAI bundles (``configs/metadata.json``: ``intended_use``,
``data_source``, ``network_data_format`` with each input's shape, dtype and value range) and of
Hugging Face model cards (intended uses and limitations, training data, evaluation protocol,
results). Pure logic from plain inputs — the params, the :class:`~xct_core.evaluation.EvalProtocol`,
each stage's ``metrics.json`` + per-patient rows + gate report, the preprocess manifest and the
lineage values — so no tracking engine is needed here (the register step,
:mod:`components.register`, logs the card to MLflow and writes it beside the run's reports).

* :func:`build_card` → the card as a JSON-able dict (:data:`CARD_SECTIONS` in order);
* :func:`render_markdown` → its Markdown, rendered from the dict alone (a stored
  ``model_card.json`` re-renders to the same text);
* :func:`bootstrap_interval` → the patient mean of a metric and its bootstrap interval
  (``scipy.stats.bootstrap`` with :data:`BOOTSTRAP`: fixed seed, stated method and number of
  resamples; no interval below ``min_patients``);
* :func:`read_rows_csv` → the rows of an evaluate step's ``per_patient.csv``
  (:func:`xct_core.evaluation.rows_csv` writes them; a skip marker reads as ``None``).

Every protocol number comes from the protocol object and every protocol sentence from the
``protocol`` section the evaluate step wrote into ``metrics.json`` (:meth:`EvalProtocol.describe`);
nothing about how a metric is computed is re-typed here.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any


from xct_core.hu import HUWindow
from xct_core.intervals import BOOTSTRAP, BootstrapSpec, bootstrap_interval, read_rows_csv
from xct_core.metric_table import METRICS, UPSAMPLED_PREFIX, entry
from xct_core.metric_table import PREDICTIONS as _PREDICTIONS

if TYPE_CHECKING:
    from xct_core.config import Params
    from xct_core.evaluation import EvalProtocol

__all__ = [
    "BOOTSTRAP",
    "CARD_FORMAT",
    "CARD_SECTIONS",
    "INTENDED_USE",
    "BootstrapSpec",
    "StageInputs",
    "bootstrap_interval",
    "build_card",
    "read_rows_csv",
    "render_markdown",
]

#: version of the card's JSON layout
CARD_FORMAT = 1
#: the card's sections, in order (JSON keys; the Markdown follows the same order)
CARD_SECTIONS = ("model", "intended_use", "network_data_format", "xray_geometry", "hu_output_map",
                 "training_data", "evaluation_protocol", "metrics", "gates", "lineage")



#: the card's metrics (:mod:`xct_core.metric_table`, use ``card``; keys as the evaluator writes
#: them, each for every prediction present), ``reproj_psnr_<view>_db`` expanded per view
#: (:func:`card_metrics`): the main table, then the slice averages in their own table, under the
#: protocol's own label
CARD_METRICS: tuple[str, ...] = tuple(m.name for m in METRICS if "card" in m.uses and not m.papers_only)
SLICE_AVG_KEYS: tuple[str, ...] = tuple(m.name for m in METRICS if "card" in m.uses and m.papers_only)
#: the predictions the evaluator measures (key prefix → what it is; :data:`xct_core.metric_table.PREDICTIONS`)
PREDICTIONS: tuple[tuple[str, str], ...] = tuple((p.prefix, p.card) for p in _PREDICTIONS)
_UPSAMPLED_LABEL = dict(PREDICTIONS)[UPSAMPLED_PREFIX]

INTENDED_USE: dict[str, Any] = {
    "primary": ("Research and engineering of biplanar X-ray to 3D CT reconstruction: reconstruct a CT volume "
                "(HU) from one frontal and one lateral projection rendered with the geometry below."),
    "inputs": ("Synthetic digitally reconstructed radiographs (DRRs): line integrals of attenuation rendered "
               "from CT volumes by xct's Beer-Lambert renderer (`xct drr`), not clinical radiographs."),
    "out_of_scope": [
        "Diagnosis, treatment planning, screening or any other clinical decision: NOT FOR DIAGNOSIS.",
        "Real radiographs (scatter, detector response, post-processing, other geometries) without "
        "validation on such data.",
        "X-rays rendered with another geometry, detector size or quantity than the one stated below.",
    ],
    "limitations": [
        "Trained and evaluated on the data set named below only (the demo: procedural phantoms, not patients).",
        "A generative model: the output is a plausible CT consistent with two projections, not a measurement; "
        "anatomy not visible in either view can be invented or missed.",
        "Metrics are measured in the stated window and HU range; they are not comparable with numbers measured "
        "under another protocol (e.g. slice-averaged PSNR, other data_range).",
    ],
}


def card_metrics() -> tuple[str, ...]:
    """:data:`CARD_METRICS` with each per-view metric once per view (:data:`xct_core.geometry.VIEWS`)."""
    return tuple(n for k in CARD_METRICS for n in entry(k).names())


def _views() -> tuple[str, ...]:
    from xct_core.geometry import VIEWS

    return tuple(VIEWS)


# --------------------------------------------------------------------------- inputs


@dataclass(frozen=True)
class StageInputs:
    """What the pipeline produced for one stage: the evaluate step's ``metrics.json`` (None:
    never ran), its per-patient rows (None: none available) and the gate report (None: none)."""

    k: int
    metrics: Mapping[str, Any] | None = None
    rows: Sequence[Mapping[str, Any]] | None = None
    gate: Mapping[str, Any] | None = None

    @property
    def skipped(self) -> bool:
        return bool((self.metrics or {}).get("skipped") or (self.gate or {}).get("skipped"))


def _stage_results(st: StageInputs, spec: BootstrapSpec) -> dict[str, Any]:
    """One stage's metrics: for each card metric and prediction present, the patient mean and
    its interval (from the rows; without rows, the evaluate step's mean and no interval)."""
    m = st.metrics or {}
    entry: dict[str, Any] = {"stage": st.k, "evaluated": bool(m) and not st.skipped}
    if not entry["evaluated"]:
        entry["note"] = str(m.get("reason") or (st.gate or {}).get("reason")
                            or ("no metrics.json" if not m else "skipped"))
        return entry
    entry.update({k: m.get(k) for k in ("split", "n_patients", "samples", "sample_steps", "test_ids_hash",
                                        "ssim_taps", "model_file", "nan_count", "point_estimate", "eval_detector_text",
                                        "direct_source") if k in m})
    if "spread_skill" in m:  # the diffusion's uncertainty, measured on this (test) split
        cal = m.get("calibration") or {}
        entry["uncertainty"] = {
            "spread_skill": m.get("spread_skill"), "spread_skill_recal": m.get("spread_skill_recal"),
            "conformal_coverage": m.get("conformal_coverage"), "level": cal.get("level"),
            "sigma_scale": cal.get("sigma_scale"), "q": cal.get("q"), "fitted_on": cal.get("fitted_on"),
            "spearman_std_abs_err": m.get("spearman_std_abs_err")}
    from xct_core.evaluation import PROTOCOL_LABELS

    # the input X-rays' protocol (issue 21); metrics.json from before it were all the clean DRRs
    entry["eval_protocol_label"] = m.get("eval_protocol_label") or PROTOCOL_LABELS["clean"]
    rows = list(st.rows or [])
    entry["interval_over"] = (f"{len(rows)} per-patient rows (per_patient.csv)" if rows
                              else "no per-patient rows: means from metrics.json, no interval")
    table: dict[str, dict[str, Any]] = {}
    for key in (*card_metrics(), *SLICE_AVG_KEYS):
        for prefix, _label in PREDICTIONS:
            col = f"{prefix}{key}"
            if rows and any(col in r for r in rows):
                table[col] = bootstrap_interval([r.get(col, math.nan) for r in rows], spec)
            elif not rows and isinstance(m.get(col), (int, float)) and not isinstance(m.get(col), bool):
                table[col] = {"mean": float(m[col]), "n": m.get("n_patients"), "interval": None,
                              "note": "no per-patient rows: no interval"}
    entry["values"] = table
    return entry


# --------------------------------------------------------------------------- the card


def _protocol_section(protocol: EvalProtocol, params: Params, stages: Sequence[StageInputs]) -> dict[str, Any]:
    w, (lo, hi) = protocol.window, protocol.hu_range
    sizes = {st.name: st.size for st in (params.stage(k) for k in range(1, params.n_stages + 1))}
    described: dict[str, Any] = {}
    for st in stages:
        name = params.stage(st.k).name
        prot = (st.metrics or {}).get("protocol")
        described[name] = ({"source": "metrics.json", **prot} if isinstance(prot, Mapping) and not st.skipped
                           else {"source": "protocol (stage not evaluated)", **protocol.describe(sizes[name])})
    return {
        "window": {"name": w.name, "lo_hu": w.lo, "hi_hu": w.hi, "data_range": HUWindow.normalised_range,
                   "note": "both volumes clipped to the window, mapped to [-1, 1]"},
        "hu_range": [lo, hi],
        "hu_data_range": hi - lo,
        "ssim": {"sigma": protocol.ssim_sigma, "max_taps": protocol.ssim_win,
                 "taps": {name: protocol.ssim_taps(size) for name, size in sizes.items()},
                 "grid": {name: size for name, size in sizes.items()}},
        "body_mask": {"threshold_hu": protocol.body_hu},
        "unit": "patient (one test volume per patient: the evaluator's rows)",
        "slice_average_keys": list(SLICE_AVG_KEYS),
        "definitions": described,
    }


def _data_section(manifest: Mapping[str, Any] | None, lineage: Mapping[str, Any],
                  stages: Sequence[StageInputs]) -> dict[str, Any]:
    from xct_core.evaluation import split_ids_hash

    out: dict[str, Any] = {
        "data_hash": lineage.get("data_hash"),
        "data_hash_source": lineage.get("data_hash_source"),
        "data_dir": lineage.get("data_dir"),
        "evaluated_test_ids_hash": {f"stage{st.k}": (st.metrics or {}).get("test_ids_hash")
                                    for st in stages if st.metrics and not st.skipped},
    }
    if manifest is None:
        out["splits"] = None
        out["note"] = "no preprocess manifest available: split sizes and hashes unknown"
        return out
    from xct_core.preprocess import SPLITS

    items = manifest.get("items") or {}
    found = manifest.get("splits") or {}
    splits = {}
    for name in [*(s for s in SPLITS if s in found), *(s for s in found if s not in SPLITS)]:
        ids = list(found[name])
        splits[name] = {"volumes": len(ids), "augmented_copies": sum(1 for i in ids if (items.get(i) or {}).get("augment")),
                        "ids_hash": split_ids_hash(ids)}
    out["splits"] = splits
    out["quarantined"] = len(manifest.get("quarantined") or {})
    out["grids"] = [{k: g.get(k) for k in ("k", "size", "fov_mm", "spacing_mm")} for g in manifest.get("stages") or []]
    return out


def build_card(
    *,
    params: Params,
    protocol: EvalProtocol,
    stages: Sequence[StageInputs],
    lineage: Mapping[str, Any],
    status: Mapping[str, Any],
    manifest: Mapping[str, Any] | None = None,
    bootstrap: BootstrapSpec = BOOTSTRAP,
) -> dict[str, Any]:
    """The model card (:data:`CARD_SECTIONS`) from plain inputs.

    ``lineage``: ``git_commit``, ``git_dirty``, ``params_digest``, ``data_hash``,
    ``data_hash_source`` (+ ``content_hash``, ``run_id`` when registered). ``status``:
    ``status`` (promoted | registered | rejected), ``name``, ``version``, ``model_uri``,
    ``alias``, ``alias_reason``, ``rejected_at_stage`` (those known). ``manifest``: the
    preprocess manifest (split sizes and hashes, the X-ray quantity), when available.
    """
    last = params.stage(params.n_stages)
    hmap = params.hu.net_map()
    drr = params.drr
    xr = (manifest or {}).get("xrays") or {}
    quantity = xr.get("quantity", "line_integral")
    xray_input = {
        "type": "image", "modality": "DRR (synthetic X-ray)", "format": quantity, "num_channels": 1,
        "spatial_shape": [drr.pixels, drr.pixels], "dtype": "float32",
        "value_range": [0.0, params.limits.max_line_integral],
    }
    card: dict[str, Any] = {
        "card_format": CARD_FORMAT,
        "model": {
            "name": status.get("name") or params.registry.model_name,
            "version": status.get("version"),
            "status": status.get("status"),
            "model_uri": status.get("model_uri"),
            "alias_at_registration": status.get("alias"),
            "alias_reason": status.get("alias_reason"),
            "rejected_at_stage": status.get("rejected_at_stage"),
            "task": "biplanar X-ray (frontal + lateral) to 3D CT reconstruction",
            "architecture": (f"cascade of {params.n_stages} v-parameterised diffusion stages "
                             + " -> ".join(f"{params.stage(k).size}^3" for k in range(1, params.n_stages + 1))),
        },
        "intended_use": INTENDED_USE,
        "network_data_format": {  # MONAI bundle metadata.json convention
            "inputs": {v: dict(xray_input) for v in _views()},
            "outputs": {"ct": {
                "type": "image", "format": "HU", "num_channels": 1, "spatial_shape": [last.size] * 3,
                "spacing_mm": [last.spacing_mm] * 3, "axes": "RAS+", "dtype": "float32",
                "value_range": [hmap.lo, hmap.hi],
            }},
        },
        "xray_geometry": {
            "geometry": drr.geometry, "pixels": drr.pixels, "pixel_mm": drr.pixel_mm,
            "detector_mm": drr.pixels * drr.pixel_mm, "sdd_mm": drr.sdd, "sod_mm": drr.sod,
            "magnification": (drr.sdd / drr.sod) if drr.geometry == "cone" else 1.0,
            "quantity": quantity, "views": list(_views()), "mu_water_per_mm": params.hu.mu_water,
            "isocentre": "the volume centre", "conventions": "docs/CONVENTIONS.md",
        },
        "hu_output_map": {"name": hmap.name, "hu_knots": list(hmap.hu), "unit_knots": list(hmap.unit),
                          "representable_hu": [hmap.lo, hmap.hi]},
        "training_data": _data_section(manifest, lineage, stages),
        "evaluation_protocol": _protocol_section(protocol, params, stages),
        "metrics": {"interval": {**asdict(bootstrap), "statistic": "mean over test patients",
                                 "implementation": "scipy.stats.bootstrap"},
                    "stages": [_stage_results(st, bootstrap) for st in stages]},
        "gates": [
            {"stage": st.k, "passed": bool((st.gate or {}).get("passed")) and not st.skipped, "skipped": st.skipped,
             "summary": (st.gate or {}).get("summary") or (st.gate or {}).get("reason")
             or ("no gate report" if st.gate is None else ""),
             "checks": list((st.gate or {}).get("checks") or []),
             "ceiling": (st.gate or {}).get("ceiling"),
             "unreachable": list((st.gate or {}).get("unreachable") or [])}
            for st in stages
        ],
        "lineage": {k: lineage.get(k) for k in ("git_commit", "git_dirty", "params_digest", "content_hash", "run_id")},
    }
    return card


# --------------------------------------------------------------------------- Markdown


def _num(v: Any, digits: int = 3) -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "—"
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return str(v)
    return f"{v:.{digits}f}" if isinstance(v, float) else str(v)


def _count(v: Any) -> str:
    return str(int(v)) if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) else "—"


def _cell(entry: Mapping[str, Any] | None) -> str:
    if not entry or entry.get("mean") is None:
        return ""
    digits = 4 if abs(float(entry["mean"])) < 2 else 2
    s = _num(float(entry["mean"]), digits)
    iv = entry.get("interval")
    if iv:
        s += f" [{_num(float(iv[0]), digits)}, {_num(float(iv[1]), digits)}]"
    return s


def _metric_table(values: Mapping[str, Any], keys: Sequence[str]) -> list[str]:
    cols = [(p, label) for p, label in PREDICTIONS if any(f"{p}{k}" in values for k in keys)]
    if not cols:
        return []
    lines = ["| metric | " + " | ".join(label for _p, label in cols) + " |",
             "|---|" + "---|" * len(cols)]
    for k in keys:
        if not any(f"{p}{k}" in values for p, _ in cols):
            continue
        lines.append(f"| `{k}` | " + " | ".join(_cell(values.get(f"{p}{k}")) for p, _ in cols) + " |")
    return lines


def _definition(defs: Mapping[str, Any], metric: str) -> str | None:
    """The protocol sentence that defines ``metric`` (its keys name one or more metrics,
    ``"a / b"``)."""
    return next((str(t) for k, t in defs.items() if metric in (s.strip() for s in k.split("/"))), None)


def uncertainty_line(u: Mapping[str, Any], split: str = "test") -> str:
    """The card's sentence on the diffusion's uncertainty (xct_core/calibration.py)."""
    line = f"Uncertainty ({split}, body voxels): spread-skill {_num(u.get('spread_skill'))} raw (1 = calibrated)"
    if u.get("conformal_coverage") is None:
        return line + "; no calibration fitted (no val split or eval.calibration.fit: false): the std is raw."
    fit = u.get("fitted_on") or {}
    return (line + f", {_num(u.get('spread_skill_recal'))} with the std × s = {_num(u.get('sigma_scale'), 3)}; the "
            f"{_num(100 * float(u.get('level') or 0), 0)} % split-conformal interval (q = {_num(u.get('q'), 3)}, fitted "
            f"on {fit.get('n_patients', '?')} {fit.get('split', 'val')} patients) covers "
            f"{_num(u.get('conformal_coverage'), 3)} of the voxels; Spearman(std, |error|) "
            f"{_num(u.get('spearman_std_abs_err'), 3)}.")


def render_markdown(card: Mapping[str, Any]) -> str:
    """The card as Markdown (from the card dict only)."""
    m, use = card["model"], card["intended_use"]
    title = f"{m['name']} v{m['version']}" if m.get("version") else f"{m['name']} (not registered: {m.get('status')})"
    out = [f"# Model card: {title}", ""]
    out += [f"- task: {m['task']}", f"- architecture: {m['architecture']}", f"- status: {m.get('status')}"
            + (f" at stage {m['rejected_at_stage']}" if m.get("rejected_at_stage") else "")]
    if m.get("model_uri"):
        out.append(f"- model: `{m['model_uri']}`")
    if m.get("alias_at_registration"):
        out.append(f"- alias at registration: @{m['alias_at_registration']} ({m.get('alias_reason')})")

    out += ["", "## Intended use and limits", "", use["primary"], "", f"Inputs: {use['inputs']}", "", "Out of scope:"]
    out += [f"- {x}" for x in use["out_of_scope"]]
    out += ["", "Limitations:"] + [f"- {x}" for x in use["limitations"]]

    g, ndf = card["xray_geometry"], card["network_data_format"]
    out += ["", "## Inputs the model expects (X-ray geometry)", "",
            f"Two views ({', '.join(g['views'])}), each rendered with:", "",
            "| geometry | pixels | pixel_mm | detector (mm) | SDD (mm) | SOD (mm) | magnification | quantity |",
            "|---|---|---|---|---|---|---|---|",
            f"| {g['geometry']} | {g['pixels']} × {g['pixels']} | {_num(g['pixel_mm'])} | {_num(g['detector_mm'], 1)} | "
            f"{_num(g['sdd_mm'], 1)} | {_num(g['sod_mm'], 1)} | {_num(g['magnification'])} | {g['quantity']} |", ""]
    for name, spec in ndf["inputs"].items():
        out.append(f"- input `{name}`: {spec['modality']}, {spec['format']}, shape {spec['spatial_shape']}, "
                   f"{spec['dtype']}, values in {spec['value_range']}")
    o = ndf["outputs"]["ct"]
    out.append(f"- output `ct`: {o['format']}, shape {o['spatial_shape']}, spacing {o['spacing_mm']} mm, {o['axes']}, "
               f"{o['dtype']}, values in {o['value_range']} HU")
    out.append(f"- mu_water {g['mu_water_per_mm']} /mm; isocentre = {g['isocentre']}; image conventions: {g['conventions']}")
    h = card["hu_output_map"]
    out += ["", f"HU output map `{h['name']}` (network units ↔ HU, piecewise linear): HU knots {h['hu_knots']} ↔ "
            f"units {h['unit_knots']}; representable {h['representable_hu']} HU.", ""]

    d = card["training_data"]
    out += ["## Training data", "",
            f"- DVC data hash: `{d.get('data_hash')}` (source: {d.get('data_hash_source')})"]
    if d.get("splits"):
        out += ["", "| split | volumes | of which augmented copies | ids hash |", "|---|---|---|---|"]
        for s, v in d["splits"].items():
            out.append(f"| {s} | {v['volumes']} | {v['augmented_copies']} | `{v['ids_hash']}` |")
        out += ["", f"- quarantined by validation: {d.get('quarantined', 0)}"]
    else:
        out.append(f"- {d.get('note')}")
    if d.get("evaluated_test_ids_hash"):
        out.append("- evaluated test ids hash: " + ", ".join(f"{k} `{v}`" for k, v in d["evaluated_test_ids_hash"].items()))

    p = card["evaluation_protocol"]
    w, ss = p["window"], p["ssim"]
    out += ["", "## Evaluation protocol", "",
            f"- window: {w['name']} [{_num(w['lo_hu'], 0)}, {_num(w['hi_hu'], 0)}] HU, data_range {_num(w['data_range'], 0)} "
            f"({w['note']})",
            f"- HU range: [{_num(p['hu_range'][0], 0)}, {_num(p['hu_range'][1], 0)}] HU, data_range {_num(p['hu_data_range'], 0)}",
            f"- SSIM: Gaussian sigma {ss['sigma']}, at most {ss['max_taps']} taps; taps per grid: "
            + ", ".join(f"{s} ({ss['grid'][s]}^3) {t}^3" for s, t in ss["taps"].items()),
            f"- body mask: hole-filled target > {_num(p['body_mask']['threshold_hu'], 0)} HU",
            f"- unit of the statistics: {p['unit']}", ""]
    defs = p["definitions"]
    if defs:
        keys = list(next(iter(defs.values())))
        out.append("Definitions (the evaluate step's `protocol`, as written to metrics.json):")
        out.append("")
        for k in keys:
            if k == "source":
                continue
            texts = {s: v.get(k) for s, v in defs.items()}
            if len(set(texts.values())) == 1:
                out.append(f"- `{k}`: {next(iter(texts.values()))}")
            else:
                out.append(f"- `{k}`: " + "; ".join(f"{s}: {t}" for s, t in texts.items()))

    mi = card["metrics"]["interval"]
    out += ["", "## Metrics (test split)", "",
            f"Patient mean [{int(mi['confidence_level'] * 100)} % interval: {mi['implementation']}, method {mi['method']}, "
            f"n_resamples {mi['n_resamples']}, seed {mi['seed']}; only with at least {mi['min_patients']} patients, "
            f"else n < {mi['min_patients']}: no interval]."]
    for st in card["metrics"]["stages"]:
        out += ["", f"### Stage {st['stage']}", ""]
        if not st.get("evaluated"):
            out.append(f"Not evaluated: {st.get('note')}")
            continue
        out.append(f"{st.get('n_patients')} test patients, {st.get('samples')} sample(s), {st.get('sample_steps')} DDIM "
                   f"steps, SSIM {st.get('ssim_taps')}^3 taps, NaN voxels {_count(st.get('nan_count'))}; interval over "
                   f"{st.get('interval_over')}.")
        out.append("")
        out.append(f"Input X-rays: {st['eval_protocol_label']}"
                   + (f" — {st['eval_detector_text']}" if st.get("eval_detector_text") else "") + ".")
        if st.get("direct_source"):
            out.append(f"Direct twin compared: {st['direct_source']}.")
        notes = sorted({v["note"] for v in st["values"].values() if v.get("note")})
        out.append("")
        out += _metric_table(st["values"], card_metrics())
        slice_label = _definition(defs.get(f"stage{st['stage']}") or {}, SLICE_AVG_KEYS[0])
        sl = _metric_table(st["values"], SLICE_AVG_KEYS)
        if sl:
            out += ["", f"{slice_label or 'slice averages'}:", ""] + sl
        gain = st["values"].get("gain_over_upsampled_db")
        if gain and gain.get("mean") is not None:
            out += ["", f"Gain over its own input (stage {st['stage'] - 1}'s point estimate upsampled, column "
                        f"'{_UPSAMPLED_LABEL}'): {_cell(gain)} dB PSNR in the window (per-patient differences: "
                        "a paired interval)."]
        if notes:
            out += [""] + [f"- {n}" for n in notes]
        if st.get("uncertainty"):
            out += ["", uncertainty_line(st["uncertainty"], st.get("split") or "test")]

    out += ["", "## Gates", ""]
    for gt in card["gates"]:
        verdict = "skipped" if gt["skipped"] else ("PASS" if gt["passed"] else "FAIL")
        out.append(f"- stage {gt['stage']}: {verdict} — {gt['summary']}")
        ce = gt.get("ceiling") or {}
        if ce and not ce.get("known"):
            out.append(f"  - information ceiling: unknown ({ce.get('reason', '')})")
        elif ce:
            out.append(f"  - information ceiling: {ce.get('grid', '')}, {ce.get('phantoms')} phantom(s) re-drawn twice "
                       "(xct_core/ceiling.py)")
        for c in gt["checks"]:
            verdict = ("PASS" if c.get("passed") else "FAIL") if c.get("gating", True) else "info"
            iv = c.get("interval") or c.get("change_interval")
            ivs = (f" [{'change ' if c.get('change_interval') else ''}95 % {_num(iv[0], 4)}, {_num(iv[1], 4)}]"
                   if iv else "")
            top = ""
            if c.get("ceiling") is not None:
                gain = c.get("achievable_fraction")
                top = (f"; ceiling {_num(c['ceiling'], 2)}, floor {_num(c.get('floor'), 2)}"
                       + (f", {gain:.0%} of the achievable gain" if isinstance(gain, float) else ""))
                if c.get("unreachable"):
                    top += " — **unreachable on this data** (threshold at or above the ceiling)"
            out.append(f"  - {verdict} `{c.get('metric')} {c.get('op')} "
                       f"{_num(c.get('threshold'))}`: {_num(c.get('value'), 4)}{ivs} (margin {_num(c.get('margin'), 4)})"
                       f"{top}")

    ln = card["lineage"]
    out += ["", "## Lineage", "", f"- git commit: `{ln.get('git_commit')}`"
            + (" (working tree dirty)" if str(ln.get("git_dirty")).lower() == "true" else ""),
            f"- params digest: `{ln.get('params_digest')}`"]
    if ln.get("content_hash"):
        out.append(f"- content hash: `{ln['content_hash']}`")
    if ln.get("run_id"):
        out.append(f"- MLflow registration run: `{ln['run_id']}`")
    return "\n".join(out) + "\n"
