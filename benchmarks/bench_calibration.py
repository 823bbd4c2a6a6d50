"""Calibration benchmark (issue 21 items 2-4): the diffusion's uncertainty and realism per stage,
raw and recalibrated, on val (fit) and test (check), and the point-estimate evidence.

    python benchmarks/bench_calibration.py --train-dir DIR --processed DIR [--stages 1 2]
        [--max-val N] [--max-test N] [--no-reprojection] [--out benchmarks/results/calibration_cpu]

The project's own code only: THE evaluator (:func:`xct_core.evaluation.evaluate_stage`, the
call the evaluate step makes) on the val split, :func:`~xct_core.evaluation.fit_stage_calibration`
(σ-recalibration ``s`` + split-conformal ``q``), then the test split with that calibration —
what ``xct step evaluate`` does (components/evaluate.py). The model's own params (embedded in
its stage files) give the sampler, K (``eval.samples``) and the seeds. Point-estimate evidence:
per val/test case, window PSNR (whole grid and body) of the K-mean, of the anchor (the anchored
stage's twin, averaged over the K samples' earlier stages: the residual diffusion's K → ∞
limit) and of one sample. Writes ``OUT.json`` (every number, the machine) and prints a table.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from components.model_uri import resolve_model  # noqa: E402
from xct_core.evaluation import CaseResult, EvalProtocol, evaluate_stage, fit_stage_calibration  # noqa: E402

KEYS = ("spread_skill", "spread_skill_recal", "coverage_minmax", "conformal_coverage", "ause", "spearman_std_abs_err",
        "psd_top_band_ratio", "single_psd_top_band_ratio", "direct_psd_top_band_ratio", "psnr_window_db",
        "single_psnr_window_db", "direct_psnr_window_db", "psnr_window_body_db")


def _point_rows(protocol: EvalProtocol) -> tuple[list[dict[str, float]], Any]:
    rows: list[dict[str, float]] = []

    def grab(res: CaseResult) -> None:
        r = {}
        for name, vol in (("mean", res.recon.mean_hu), ("anchor", res.recon.anchor_hu), ("single", res.recon.first_hu)):
            if vol is not None:
                m = protocol.metrics(vol, res.target_hu)
                r[f"{name}_psnr_window_db"] = m["psnr_window_db"]
                r[f"{name}_psnr_window_body_db"] = m["psnr_window_body_db"]
        rows.append(r)

    return rows, grab


def _means(rows: list[dict[str, float]]) -> dict[str, float]:
    keys = sorted({k for r in rows for k in r})
    return {k: float(np.nanmean([r.get(k, math.nan) for r in rows])) for k in keys}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--train-dir", type=Path, required=True)
    ap.add_argument("--processed", type=Path, required=True)
    ap.add_argument("--stages", type=int, nargs="+", default=[1])
    ap.add_argument("--max-val", type=int, default=0)
    ap.add_argument("--max-test", type=int, default=0)
    ap.add_argument("--no-reprojection", action="store_true")
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/calibration_cpu"))
    a = ap.parse_args(argv)
    params = resolve_model(str(a.train_dir)).params
    protocol = EvalProtocol.from_params(params)
    out: dict[str, Any] = {"machine": f"{platform.node()} {os.cpu_count()} CPUs (shared, loaded)",
                           "command": " ".join(sys.argv), "stages": {}}
    for k in a.stages:
        st = params.stage(k)
        entry: dict[str, Any] = {"samples": params.eval.samples_for(st.name), "size": st.size}
        vrows, vgrab = _point_rows(protocol)
        t0 = time.monotonic()
        val = evaluate_stage(params, a.processed, a.train_dir, k, protocol=protocol, split="val",
                             reprojection=not a.no_reprojection, max_volumes=a.max_val, on_case=vgrab,
                             log=lambda m: print(m, file=sys.stderr, flush=True))
        entry["val_s"] = round(time.monotonic() - t0, 1)
        cal = fit_stage_calibration(val, params)
        trows, tgrab = _point_rows(protocol)
        t0 = time.monotonic()
        test = evaluate_stage(params, a.processed, a.train_dir, k, protocol=protocol, split="test",
                              reprojection=not a.no_reprojection, max_volumes=a.max_test, calibration=cal,
                              on_case=tgrab, log=lambda m: print(m, file=sys.stderr, flush=True))
        entry["test_s"] = round(time.monotonic() - t0, 1)
        entry["calibration"] = cal.to_json() if cal is not None else None
        entry["val"] = {kk: val.metrics.get(kk) for kk in KEYS} | {"n": len(val.ids)}
        entry["test"] = {kk: test.metrics.get(kk) for kk in KEYS} | {"n": len(test.ids)}
        entry["val_point"] = _means(vrows)
        entry["test_point"] = _means(trows)
        entry["val_curve"] = val.metrics.get("calibration_curve")
        entry["test_curve"] = test.metrics.get("calibration_curve")
        entry["power_spectrum_test"] = test.metrics.get("power_spectrum")
        out["stages"][f"stage{k}"] = entry
        print(json.dumps(entry, indent=1, default=float), flush=True)
    a.out.parent.mkdir(parents=True, exist_ok=True)
    Path(str(a.out) + ".json").write_text(json.dumps(out, indent=1, default=float) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
