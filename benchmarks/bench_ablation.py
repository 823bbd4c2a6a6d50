"""Issue 21 item 6: the ablation table of stage 1 (16³) on the demo data, val for choosing,
test for reporting, under the honest protocol.

    python benchmarks/bench_ablation.py prepare --processed DEMO/data/processed \\
        --volumes DEMO/data/interim/volumes --splits DEMO/data/validated/splits.json --work /tmp/xct-ablation
    python benchmarks/bench_ablation.py train --work /tmp/xct-ablation --row base [--steps 1200]
    python benchmarks/bench_ablation.py eval --work /tmp/xct-ablation [--rows base,...] \\
        --out benchmarks/results/ablation_cpu.json

Training levers (one stage-1 training per row):

1. ``detector``: the training DRRs pass through the detector (``preprocess.train_detector``);
   off = clean training DRRs (``prepare`` re-runs preprocess with it off into WORK/processed_clean:
   only the train ids' DRRs change, the honest val/test views and the grids are reused);
2. ``conv_first``: the decoder convolves before it upsamples (``stages.stage1.decoder``); off =
   ``upsample_first``;
3. ``crossfit``: cross-fitted anchors (``stages.stage1.anchor_folds: 2``); off = 1.

Rows: ``base`` (all off), each lever alone, ``all`` (all on). Eval-only levers read from every
evaluation: (4) the point estimate (the anchor, ``psnr_window_db`` under ``point_estimate:
auto``, vs the K-sample mean ``mean_psnr_window_db``) and (5) σ-recalibration (raw vs val-fitted
spread-skill). Stage 2 is not in the table: one 32³ training costs ~40 min on the 2-core box.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import time
from pathlib import Path

#: row → (train_detector, decoder, anchor_folds)
ROWS: dict[str, tuple[bool, str, int]] = {
    "base": (False, "upsample_first", 1),
    "detector": (True, "upsample_first", 1),
    "conv_first": (False, "conv_first", 1),
    "crossfit": (False, "upsample_first", 2),
    "all": (True, "conv_first", 2),
}
STAGE = 1


def row_sets(row: str) -> list[str]:
    det, dec, folds = ROWS[row]
    sets = [f"preprocess.train_detector={str(det).lower()}", f"stages.stage{STAGE}.decoder={dec}"]
    if folds != 1:  # the key is only written when on: the off rows run on code without it too
        sets.append(f"stages.stage{STAGE}.anchor_folds={folds}")
    return sets


def row_params(row: str, params_path: Path):
    from xct_core.config import load_params

    return load_params(params_path, sets=row_sets(row))


def processed_for(work: Path, row: str) -> Path:
    return work / ("processed_detector" if ROWS[row][0] else "processed_clean")


def cmd_prepare(a: argparse.Namespace) -> int:
    from components.preprocess import run_preprocess
    from xct_core.config import load_params

    a.work.mkdir(parents=True, exist_ok=True)
    for det, name in ((True, "processed_detector"), (False, "processed_clean")):
        dst = a.work / name
        if (dst / ".ablation_ready").is_file():
            continue
        if dst.exists():
            shutil.rmtree(dst)
        shutil.copytree(a.processed, dst)
        params = load_params(a.params, sets=[f"preprocess.train_detector={str(det).lower()}"])
        t0 = time.perf_counter()
        res = run_preprocess(a.volumes, a.splits, dst, params, progress=False)
        print(f"{name}: {res.files_written} files re-written in {time.perf_counter() - t0:.1f} s", flush=True)
        (dst / ".ablation_ready").write_text("ok\n")
    return 0


def cmd_train(a: argparse.Namespace) -> int:
    import torch

    from xct_core.training import train_stage

    torch.set_num_threads(1)
    params = row_params(a.row, a.params)
    out = a.work / "runs" / a.row
    t0 = time.perf_counter()
    res = train_stage(params, STAGE, processed_for(a.work, a.row), out, device="cpu", steps=a.steps)
    wall = time.perf_counter() - t0
    doc = {"row": a.row, "sets": row_sets(a.row), "steps": res.final_step, "steps_run": res.steps_run,
           "wall_s": round(wall, 1), "best_step": res.best_step, "best_value": res.best_value,
           "samples_per_s": res.samples_per_s, "load_at_start": a.load_at_start}
    (out / "ablation_train.json").write_text(json.dumps(doc, indent=1) + "\n")
    print(json.dumps(doc), flush=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("prepare")
    p.add_argument("--processed", type=Path, required=True)
    p.add_argument("--volumes", type=Path, required=True)
    p.add_argument("--splits", type=Path, required=True)
    t = sub.add_parser("train")
    t.add_argument("--row", choices=sorted(ROWS), required=True)
    t.add_argument("--steps", type=int, default=None)
    e = sub.add_parser("eval")
    e.add_argument("--rows", default=",".join(ROWS))
    e.add_argument("--out", type=Path)
    for s in (p, t, e):
        s.add_argument("--work", type=Path, required=True)
        s.add_argument("--params", type=Path, default=Path(__file__).resolve().parents[1] / "params.yaml")
    a = ap.parse_args(argv)
    a.load_at_start = os.getloadavg()[0]
    a.machine = f"{platform.machine()} {os.cpu_count()} cores"
    return {"prepare": cmd_prepare, "train": cmd_train, "eval": cmd_eval}[a.cmd](a)


def cmd_eval(a: argparse.Namespace) -> int:
    raise SystemExit("eval: not written yet")


if __name__ == "__main__":
    raise SystemExit(main())
