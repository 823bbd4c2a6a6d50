"""The honest protocol on the demo data: what it costs in preprocess and how far its views are
from the clean (inverse-crime) DRRs; optionally a trained cascade scored under both protocols.

    python benchmarks/bench_protocol.py --volumes data/interim/volumes --splits data/validated/splits.json \\
        --processed data/processed --work /tmp/xct-protocol [--train-dir outputs/train --stage 1] \\
        [--out benchmarks/results/protocol_cpu.json]

1. Copies ``--processed`` (a finished preprocess of the same volumes) into ``WORK/processed``
   and re-runs the preprocess step on it with the current params: the stage grids and clean
   DRRs are reused (their keys are unchanged), so the wall time is what the honest val/test
   views add (``preprocess.workers`` processes).
2. Per val/test volume and view: PSNR of the honest views against the clean ones
   (``data_range`` = the clean view's max) — with the full detector, and with the detector
   switched off (finest grid + independent renderer only) — and the renderer step's error
   (``step_fraction`` vs 0.25, noise off) on the first volume.
3. With ``--train-dir``: stage ``--stage`` of that training folder evaluated on the test split
   under ``eval.protocol: clean`` and ``honest`` (the evaluate step's code).
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import time
from pathlib import Path

import numpy as np


def _psnr(ref: np.ndarray, x: np.ndarray) -> float:
    mse = float(np.mean((x.astype(np.float64) - ref) ** 2))
    return 20 * math.log10(float(ref.max())) - 10 * math.log10(mse) if mse > 0 else math.inf


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--volumes", type=Path, required=True)
    ap.add_argument("--splits", type=Path, required=True)
    ap.add_argument("--processed", type=Path, required=True)
    ap.add_argument("--work", type=Path, required=True)
    ap.add_argument("--params", type=Path, default=Path("params.yaml"))
    ap.add_argument("--train-dir", type=Path)
    ap.add_argument("--stage", type=int, default=1)
    ap.add_argument("--protocols", default="clean,honest", help="protocols evaluated with --train-dir")
    ap.add_argument("--out", type=Path)
    a = ap.parse_args(argv)

    from components.preprocess import run_preprocess
    from xct_core.config import load_params
    from xct_core.detector import DetectorModel, honest_views
    from xct_core.io import load_ct
    from xct_core.preprocess import read_manifest, xray_file, xray_honest_file

    params = load_params(a.params)
    work = a.work
    proc = work / "processed"
    if proc.exists():
        shutil.rmtree(proc)
    shutil.copytree(a.processed, proc)
    t0 = time.perf_counter()
    res = run_preprocess(a.volumes, a.splits, proc, params, progress=False)
    wall = time.perf_counter() - t0
    man = read_manifest(proc)
    ids = man["splits"]["val"] + man["splits"]["test"]
    doc: dict = {"preprocess_rerun_s": round(wall, 1), "workers": params.preprocess.workers,
                 "files_written": res.files_written, "honest_volumes": len(ids),
                 "detector": DetectorModel.from_params(params).to_json()}
    print(f"preprocess re-run: {res.files_written} files written in {wall:.1f} s ({len(ids)} val+test volumes)")

    off = DetectorModel(**{**DetectorModel.from_params(params).to_json(), "photons_per_pixel": 0.0,
                           "blur_fwhm_mm": 0.0, "scatter_fraction": 0.0})
    rows = []
    for vid in ids:
        with np.load(proc / xray_file(vid)) as c, np.load(proc / xray_honest_file(vid)) as h:
            clean = {v: c[v] for v in ("frontal", "lateral")}
            honest = {v: h[v] for v in ("frontal", "lateral")}
        row = {"id": vid, "split": "val" if vid in man["splits"]["val"] else "test"}
        for v in clean:
            row[f"psnr_{v}_db"] = _psnr(clean[v], honest[v])
        rows.append(row)
    vol = load_ct(a.volumes / f"{man['splits']['test'][0]}.nii.gz", params.data.ct)
    t1 = time.perf_counter()
    nf, nl, _ = honest_views(vol.hu, vol.affine, "x", params.drr, params.hu.mu_water, off)
    t_one = time.perf_counter() - t1
    fine = DetectorModel(**{**off.to_json(), "step_fraction": 0.25})
    ff, fl, _ = honest_views(vol.hu, vol.affine, "x", params.drr, params.hu.mu_water, fine)
    with np.load(proc / xray_file(man["splits"]["test"][0])) as c:
        doc["renderer_only_psnr_db"] = {"frontal": _psnr(c["frontal"], nf), "lateral": _psnr(c["lateral"], nl)}
    doc["step_error_psnr_db_vs_0.25"] = {"frontal": _psnr(ff, nf), "lateral": _psnr(fl, nl)}
    doc["honest_views_one_volume_s"] = round(t_one, 2)
    doc["per_volume"] = rows
    for sp in ("val", "test"):
        for v in ("frontal", "lateral"):
            vals = [r[f"psnr_{v}_db"] for r in rows if r["split"] == sp]
            doc[f"{sp}_{v}_psnr_db_mean"] = float(np.mean(vals)) if vals else None
            doc[f"{sp}_{v}_psnr_db_min"] = float(np.min(vals)) if vals else None
    print(json.dumps({k: v for k, v in doc.items() if k != "per_volume"}, indent=1))

    if a.train_dir is not None:
        from xct_core.config import params_from_dict
        from xct_core.evaluation import EvalProtocol, evaluate_stage

        doc["eval"] = {}
        for prot in a.protocols.split(","):
            p = params_from_dict({**json.loads(params.model_dump_json()),
                                  "eval": {**json.loads(params.eval.model_dump_json()), "protocol": prot}})
            t2 = time.perf_counter()
            r = evaluate_stage(p, proc, a.train_dir, a.stage, protocol=EvalProtocol.from_params(p), split="test")
            keep = {k: r.metrics.get(k) for k in ("psnr_window_db", "direct_psnr_window_db", "single_psnr_window_db",
                                                  "baseline_psnr_window_db", "ssim_window", "psnr_hu_db",
                                                  "reproj_psnr_frontal_db", "reproj_psnr_lateral_db", "psnr_window_body_db", "n_patients", "samples", "sample_steps",
                                                  "direct_source", "eval_protocol_label")}
            keep["wall_s"] = round(time.perf_counter() - t2, 1)
            doc["eval"][prot] = keep
            print(prot, json.dumps(keep))
    if a.out is not None:
        a.out.parent.mkdir(parents=True, exist_ok=True)
        a.out.write_text(json.dumps(doc, indent=2, sort_keys=True) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
