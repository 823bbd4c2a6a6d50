#!/usr/bin/env python
"""Measure the information ceiling of every stage on the demo phantoms (xct_core/ceiling.py).

For ``--phantoms N`` phantoms of ``data.synth`` (params.yaml), two re-draws of the parts that
barely change the X-rays (fat/bowel field, fine texture, vessel tree below the hila, image
noise) → each stage grid exactly as preprocess resamples → ceiling = PSNR of half the mean
two-draw MSE (= two-draw PSNR + 3.01 dB), whole grid and body-masked; per-phantom spread; how
much the re-draw changes the two X-rays (% of the projection range); the wall time of one
ceiling at the gate's default phantom count.

Usage: ``python benchmarks/bench_ceiling.py [--phantoms 6] [--params params.yaml] [--out-dir DIR]``
Writes ``DIR/ceiling_cpu.json`` and ``.md`` (default DIR: benchmarks/results).
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--phantoms", type=int, default=6)
    ap.add_argument("--params", default=str(REPO / "params.yaml"))
    ap.add_argument("--out-dir", default=str(REPO / "benchmarks" / "results"))
    a = ap.parse_args()

    import torch

    from xct_core.ceiling import stage_ceilings, xray_change
    from xct_core.config import load_params

    p = load_params(a.params)
    ks = list(range(1, p.n_stages + 1))
    gate_n = p.stage(1).gate.ceiling.phantoms
    t0 = time.perf_counter()
    stage_ceilings(p, ks, phantoms=gate_n, seed=p.stage(1).gate.ceiling.seed)
    t_gate = time.perf_counter() - t0
    t0 = time.perf_counter()
    res = stage_ceilings(p, ks, phantoms=a.phantoms, seed=p.stage(1).gate.ceiling.seed)
    t_all = time.perf_counter() - t0
    t0 = time.perf_counter()
    xr = xray_change(p, phantoms=min(a.phantoms, 3), seed=p.stage(1).gate.ceiling.seed)
    t_xr = time.perf_counter() - t0
    commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True).stdout.strip()
    doc = {"phantoms": a.phantoms, "stages": {str(k): res[k] for k in ks}, "xray_change": xr,
           "seconds": {"gate_default_all_stages": t_gate, "bench_all_stages": t_all, "xray_change": t_xr},
           "gate_phantoms": gate_n, "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}",
           "commit": commit, "when": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")}
    out = Path(a.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "ceiling_cpu.json").write_text(json.dumps(doc, indent=2) + "\n")

    lines = ["# Information ceiling of the demo stages (issue 21, item 1)", "",
             f"Machine: the shared 2-core CPU dev box, loaded by other sessions ({doc['machine']}); commit {commit}; "
             f"{doc['when']}. Command: `python benchmarks/bench_ceiling.py --phantoms {a.phantoms}`.", "",
             f"{a.phantoms} phantoms of `data.synth` (params.yaml: {p.data.synth.size}³ @ {p.data.synth.spacing_mm:g} mm, "
             f"noise {p.data.synth.noise_hu:g} HU), two re-draws each of the parts that barely change the X-rays "
             "(abdominal fat/bowel field, fine texture, vessel tree below the hila, image noise), resampled onto each "
             "stage grid as preprocess does. Ceiling = PSNR of half the mean two-draw MSE (two-draw PSNR + 3.01 dB; "
             "xct_core/ceiling.py explains why). ± = standard deviation of the per-phantom ceilings.", "",
             "| stage | grid | window PSNR ceiling | ± | body window PSNR ceiling | ± | HU PSNR ceiling | "
             "two-draw SSIM (reference) | gate threshold (whole / body) |",
             "|---|---|---|---|---|---|---|---|---|"]
    for k in ks:
        r = res[k]["metrics"]
        g = p.stage(k).gate
        sd = lambda key: statistics.pstdev(r[key]["per_phantom_db"]) if len(r[key]["per_phantom_db"]) > 1 else 0.0  # noqa: E731
        flag = lambda t, c: f"{t:g}" + (" (**unreachable**)" if t is not None and t >= c else "") if t is not None else "—"  # noqa: E731
        lines.append(f"| {k} | {res[k]['grid']} | {r['psnr_window_db']['ceiling_db']:.2f} | {sd('psnr_window_db'):.2f} | "
                     f"{r['psnr_window_body_db']['ceiling_db']:.2f} | {sd('psnr_window_body_db'):.2f} | "
                     f"{r['psnr_hu_db']['ceiling_db']:.2f} | {res[k]['ssim_window_two_draw']:.3f} | "
                     f"{flag(g.psnr_window_db, r['psnr_window_db']['ceiling_db'])} / "
                     f"{flag(g.psnr_window_body_db, r['psnr_window_body_db']['ceiling_db'])} |")
    lines += ["", "## How much the re-draw changes the X-rays", "",
              f"{xr['phantoms']} phantoms, DRRs rendered as preprocess renders them (finest stage grid {xr['grid']}³, "
              "params.drr); difference of the two re-draws' line integrals as % of the first's range (max − min):", "",
              "| view | mean | RMS | max |", "|---|---|---|---|"]
    for v in ("frontal", "lateral"):
        lines.append(f"| {v} | {xr[v + '_mean_pct']:.2f} % | {xr[v + '_rms_pct']:.2f} % | {xr[v + '_max_pct']:.2f} % |")
    lines += ["", "## Cost", "",
              f"- the gate's default ({gate_n} phantoms, every stage from the same re-draws, computed once and cached "
              f"in `~/.cache/xct/ceiling`): {t_gate:.1f} s",
              f"- this table ({a.phantoms} phantoms): {t_all:.1f} s; the X-ray check: {t_xr:.1f} s", "",
              "The floor (the mean-volume baseline's PSNR) is measured by each evaluation (`baseline_psnr_window_db`) "
              "and shown beside the ceiling in every gate report."]
    (out / "ceiling_cpu.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
