"""K per stage by val evidence (issue 21 item 5): the diffusion's samples per volume K against
calibration, ranking and PSNR on the VAL split, per stage.

    python benchmarks/bench_k.py --train-dir DIR --processed DIR [--stages 1 2] [--ks 2 4 8]
        [--ks-stage2 2 4 8 16] [--max-val N] [--out benchmarks/results/k_choice_cpu]

For each stage and each K: THE evaluator (:func:`xct_core.evaluation.evaluate_stage`, as the
evaluate step calls it; the model's own params with only ``eval.samples`` of that stage set
to K; reprojection off) on the val split. From its metrics: the raw spread-skill ratio,
Spearman(std, |error|), window PSNR of the point estimate (``eval.point_estimate``: the anchor
on anchored stages), of the K-sample mean, of one sample and of the twin (patient means).
Calibration with :func:`~xct_core.evaluation.fit_stage_calibration` as it is:

* fitted on all of val → ``s`` and ``q`` (what the evaluate step would ship; its in-sample
  recalibrated spread-skill is 1 by construction on pooled voxels, so it is not evidence);
* 2-fold cross-fit on val: fitted on half A (even positions of the split), checked on half B
  (odd positions), and the other way round → held-out recalibrated spread-skill and held-out
  split-conformal 90 % coverage (:func:`xct_core.calibration.spread_skill` /
  :func:`~xct_core.calibration.coverage`, the functions the evaluator uses), mean of both folds.

Seeds: the one seed rule (sample i of case c has the same seed at every K, so a larger K adds
samples to the smaller K's). Wall time per volume: between consecutive cases of the evaluator
(the K samples of the whole cascade 1…k, the twin and the metrics; the first case also loads
the models). Writes ``OUT.json`` and ``OUT.md``.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from xct_core import calibration as cal  # noqa: E402
from xct_core.config import Params  # noqa: E402
from xct_core.evaluation import CaseResult, EvalProtocol, EvalResult, evaluate_stage, fit_stage_calibration  # noqa: E402
from xct_core.metric_table import KMEAN_PREFIX  # noqa: E402
from xct_core.metrics import body_mask  # noqa: E402

#: the evaluator's patient-mean metrics this benchmark reports (point = eval.point_estimate)
VAL_KEYS = ("spread_skill", "spearman_std_abs_err", "coverage_minmax", "ause", "psnr_window_db", "psnr_window_body_db",
            f"{KMEAN_PREFIX}psnr_window_db", f"{KMEAN_PREFIX}psnr_window_body_db", "single_psnr_window_db",
            "direct_psnr_window_db", "single_psd_top_band_ratio", "uncertainty_mean_std_hu")


def with_samples(params: Params, stage_name: str, k_samples: int) -> Params:
    """``params`` with only ``eval.samples`` of ``stage_name`` set to ``k_samples``."""
    ev = params.eval
    base = ev.samples if isinstance(ev.samples, dict) else {params.stage(j).name: int(ev.samples) for j in range(1, params.n_stages + 1)}
    return params.model_copy(update={"eval": ev.model_copy(update={"samples": {**base, stage_name: int(k_samples)}})})


def _cross_fit(val: EvalResult, cases: list[dict[str, Any]], params: Params, k_samples: int) -> dict[str, Any]:
    """2-fold cross-fit of the calibration on ``val`` (module docstring)."""
    halves = [[i for i in range(len(cases)) if i % 2 == j] for j in (0, 1)]
    folds = []
    for fit_idx, check_idx in (halves, halves[::-1]):
        part = EvalResult(stage=val.stage, split=val.split, ids=[val.ids[i] for i in fit_idx],
                          rows=[val.rows[i] for i in fit_idx], metrics={"samples": k_samples},
                          scores=[val.scores[i] for i in fit_idx])
        c = fit_stage_calibration(part, params)
        assert c is not None
        ss = [cal.spread_skill(cases[i]["mean"], cases[i]["std"], cases[i]["target"], k_samples, cases[i]["mask"],
                               scale=c.sigma_scale) for i in check_idx]
        cov = [cal.coverage(val.scores[i].scores, c.q) for i in check_idx]
        folds.append({"fit_n": len(fit_idx), "check_n": len(check_idx), "sigma_scale": c.sigma_scale, "q": c.q,
                      "spread_skill_recal": float(np.nanmean(ss)), "conformal_coverage": float(np.nanmean(cov))})
    return {"folds": folds, **{key: float(np.mean([f[key] for f in folds]))
                              for key in ("spread_skill_recal", "conformal_coverage", "sigma_scale")}}


def run_one(params: Params, processed: Path, train_dir: Path, k: int, k_samples: int, max_val: int,
            protocol: EvalProtocol) -> dict[str, Any]:
    st = params.stage(k)
    pk = with_samples(params, st.name, k_samples)
    cases: list[dict[str, Any]] = []
    stamps = [time.monotonic()]

    def grab(res: CaseResult) -> None:
        stamps.append(time.monotonic())
        y = res.target_hu
        cases.append({"mean": res.recon.mean_hu, "std": res.recon.std_hu, "target": y,
                      "mask": body_mask(y, protocol.body_hu).cpu().numpy().reshape(y.shape)})

    val = evaluate_stage(pk, processed, train_dir, k, protocol=protocol, split="val", reprojection=False,
                         max_volumes=max_val, on_case=grab, log=lambda m: print(m, file=sys.stderr, flush=True))
    per_case = np.diff(stamps)
    full = fit_stage_calibration(val, pk)
    assert full is not None
    out: dict[str, Any] = {"K": k_samples, "n": len(val.ids), "point_estimate": val.metrics["point_estimate"],
                           **{key: val.metrics.get(key) for key in VAL_KEYS},
                           "fit_all_val": {"sigma_scale": full.sigma_scale, "q": full.q},
                           "cross_fit": _cross_fit(val, cases, pk, k_samples),
                           "wall_s_per_volume": {"median": float(np.median(per_case)),
                                                 "mean": float(np.mean(per_case)),
                                                 "first_incl_load": float(per_case[0]),
                                                 "total": float(stamps[-1] - stamps[0])}}
    return out


def _fmt(v: Any, nd: int = 3) -> str:
    return "—" if v is None or (isinstance(v, float) and not math.isfinite(v)) else f"{v:.{nd}f}"


def markdown(doc: dict[str, Any]) -> str:
    lines = ["# K per stage by val evidence (issue 21, item 5) — CPU", "",
             f"Machine: {doc['machine']}; load average at start {doc['load_at_start']} (**loaded**: other sessions "
             f"shared the 2 cores, wall times are not comparable with quiet-box tables); {doc['when']}; "
             f"commit {doc['commit']}.", "", "Command (worktree root, `PYTHONPATH=$PWD`):", "", "```",
             doc["command"], "```", "",
             "Model: the demo4 fresh-clone `make demo` of main@24a8a20 (honest protocol; `models/stageK/best.pt`, "
             "read-only), its own params; split: **val** (the test split is not touched: K is a choice). "
             "Definitions: benchmarks/bench_k.py docstring; metrics are the evaluator's (xct_core/evaluation.py, "
             "xct_core/calibration.py), body voxels, patient means. `recal.`/`conformal` are **held-out**: 2-fold "
             "cross-fit on val (fit on one half, check on the other, both ways, mean). PSNR = window PSNR whole "
             "grid; the anchor is the residual diffusion's K → ∞ limit and does not depend on K except through "
             "the earlier stages' samples it is averaged over.", ""]
    for name, rows in doc["stages"].items():
        lines += [f"## {name}", "",
                  "| K | spread-skill raw | s (fit: all val) | spread-skill recal. (held-out) | conformal 90 % "
                  "(held-out) | Spearman(std, abs err) | AUSE | [min, max] cov. | K-mean PSNR | anchor (point) PSNR | "
                  "one sample | twin | wall s/volume (median) |", "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in rows:
            cf = r["cross_fit"]
            lines.append(
                f"| {r['K']} | {_fmt(r['spread_skill'])} | {_fmt(r['fit_all_val']['sigma_scale'])} | "
                f"{_fmt(cf['spread_skill_recal'])} | {_fmt(cf['conformal_coverage'])} | "
                f"{_fmt(r['spearman_std_abs_err'])} | {_fmt(r['ause'])} | {_fmt(r['coverage_minmax'])} | "
                f"{_fmt(r[f'{KMEAN_PREFIX}psnr_window_db'], 2)} | {_fmt(r['psnr_window_db'], 2)} | "
                f"{_fmt(r['single_psnr_window_db'], 2)} | {_fmt(r['direct_psnr_window_db'], 2)} | "
                f"{_fmt(r['wall_s_per_volume']['median'], 1)} |")
        lines.append("")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--train-dir", type=Path, required=True)
    ap.add_argument("--processed", type=Path, required=True)
    ap.add_argument("--stages", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--ks", type=int, nargs="+", default=[2, 4, 8])
    ap.add_argument("--ks-stage2", type=int, nargs="+", default=None, help="K values for stage 2 (default --ks)")
    ap.add_argument("--max-val", type=int, default=0)
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "k_choice_cpu")
    a = ap.parse_args(argv)
    from bench_redraw import run_start

    params, protocol, doc = run_start(a.train_dir)
    doc.update({"split": "val", "stages": {}})
    out_json = Path(str(a.out) + ".json")
    out_json.parent.mkdir(parents=True, exist_ok=True)
    for k in a.stages:
        ks = a.ks_stage2 if (k == 2 and a.ks_stage2) else a.ks
        rows = doc["stages"].setdefault(f"stage{k}", [])
        for kk in ks:
            t0 = time.monotonic()
            rows.append(run_one(params, a.processed, a.train_dir, k, kk, a.max_val, protocol))
            print(f"stage{k} K={kk}: {time.monotonic() - t0:.0f} s {json.dumps(rows[-1], default=float)}", flush=True)
            out_json.write_text(json.dumps(doc, indent=1, default=float) + "\n")  # partial results survive
    Path(str(a.out) + ".md").write_text(markdown(doc))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
