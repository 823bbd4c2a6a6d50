#!/usr/bin/env python
"""Decoder order A/B: train one stage with ``decoder: upsample_first`` and ``conv_first``
for the same number of steps on the same data, from the same seed and the same frozen
earlier stages, and compare validation PSNR (cascade and direct twin) and seconds per step.

Usage (demo data and the demo's trained stage 1 from a finished ``make demo``)::

    nice python benchmarks/bench_decoder.py --processed data/processed --prev-run outputs/train \\
        --stage 2 --steps 150 --val-every 50

Each order trains in its own subprocess (``xct_core.training.train_stage``, in-process, CPU
fp32, 1 torch thread); with ``--parallel`` (default) both run at the same time, so a shared
machine's load falls on both alike. Everything else is params.yaml (the stage's
``train.steps`` is overridden by ``--steps``; validation every ``--val-every`` steps and at
the end, on ``train.val_max_volumes`` val volumes).

Writes ``benchmarks/results/decoder_cpu.md`` (+ ``.json``: the training runs and the FLOP
table of both orders, demo and production; ``decoder_train_cpu.json``: the training runs
alone, which ``--from-json`` re-renders without training).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

ORDERS = ("upsample_first", "conv_first")


def _params(args: dict[str, Any], order: str):  # noqa: ANN202
    from xct_core.config import load_params, params_from_dict

    base = load_params(args["params"])
    data = base.model_dump(mode="json")
    name = f"stage{args['stage']}"
    data["stages"][name]["decoder"] = order
    data["train"]["steps"][name] = args["steps"]
    data["train"].update(val_every=args["val_every"], ckpt_every=args["steps"], log_every=5)
    return params_from_dict(data, f"bench params ({order})")


def run_one(args: dict[str, Any]) -> dict[str, Any]:
    """Train one order in this process; the loop's own reports are the measurements."""
    import torch

    from xct_core.models import build_stage
    from xct_core.training import TrainHooks, train_stage

    torch.set_num_threads(1)
    params = _params(args, args["order"])
    k = int(args["stage"])
    times: list[float] = []
    vals: list[dict[str, float]] = []
    steps_seen = [0]

    def report(m: dict[str, float], _ckpt: str | None) -> None:
        if "train/step_time_s" in m:
            times.append(float(m["train/step_time_s"]))
        if any(key.startswith("val/") for key in m):
            vals.append({key: float(v) for key, v in m.items() if key.startswith("val/") or key == "step"})
        steps_seen[0] = int(m.get("step", steps_seen[0]))

    t0 = time.perf_counter()
    res = train_stage(params, k, args["processed"], args["out"], device="cpu", hooks=TrainHooks(report=report),
                      fresh=True)
    wall = time.perf_counter() - t0
    steady = times[1:] or times
    net = build_stage(params, k, device="meta")
    return {"order": args["order"], "stage": k, "steps": res.final_step, "wall_s": wall,
            "step_time_s_median": statistics.median(steady), "step_time_s_mean": statistics.fmean(steady),
            "val_time_s": sum(v.get("val/time_s", 0.0) for v in vals), "val": vals,
            "n_params": sum(p.numel() for p in net.parameters()),
            "loadavg_end": os.getloadavg()}


def _write(doc: dict[str, Any], out_dir: Path, stage: int) -> int:
    from bench_model import flop_table, profile_params

    from xct_core.atomic import write_text_atomic

    out_dir.mkdir(parents=True, exist_ok=True)
    write_text_atomic(out_dir / "decoder_train_cpu.json", json.dumps(doc, indent=2) + "\n")
    params, overlay = REPO / "params.yaml", REPO / "params.production.yaml"
    flops = flop_table([(p, profile_params(p, params, overlay)) for p in ("demo", "production")], [1, 2, 3])
    write_text_atomic(out_dir / "decoder_cpu.md", render(doc, flops))
    write_text_atomic(out_dir / "decoder_cpu.json", json.dumps({**doc, "flops": flops}, indent=2) + "\n")
    print(f"wrote {out_dir / 'decoder_cpu.md'}")
    return 0


def render(doc: dict[str, Any], flops: list[dict[str, Any]]) -> str:
    """``decoder_<device>.md``: the FLOP saving per stage and profile, then the training A/B."""
    from bench_model import flop_lines

    rows = {r["order"]: r for r in doc["results"]}
    lines = ["# Decoder order: conv_first vs upsample_first (CPU)", "",
             "`stages.<stage>.decoder` (params.yaml): `conv_first` (default) runs each decoder level's 3×3×3 "
             "channel-reducing conv at the LOWER resolution and upsamples its output trilinearly; "
             "`upsample_first` is the original order (nearest ×2 upsample, then the conv at the higher "
             "resolution). Same channel schedule and the same parameter tensors (exactly equal parameter "
             "counts; only the conv's name differs, so one order's weights never load into the other); the "
             "conv's 3-voxel kernel spans 6 output voxels instead of 3 (larger receptive field).", "",
             f"Machine: {doc['machine']}  ", f"Date: {doc['date']}  ", f"Command: `{doc['command']}`", ""]
    lines += flop_lines(flops)
    lines += [f"## Training A/B: stage {doc['results'][0]['stage']}, same data, seed, steps and frozen stage 1", "",
              "Both orders trained " + ("at the same time (one process each, 1 torch thread), so the shared "
                                        "machine's load fell on both alike" if doc.get("parallel") else
                                        "one after the other") + "; step time = median over the loop's logging "
              "windows after the first (includes data loading, the twin's step, the physics loss and EMA). "
              "Validation: the loop's own (EMA weights, cascade DDIM sampling with the frozen stage 1, "
              "train.val_max_volumes val volumes), window PSNR of the cascade (K-sample mean) and of the twin.", "",
              "| decoder | steps | step time median (s) | mean (s) | wall (s) | val step | cascade PSNR window (dB) "
              "| twin PSNR window (dB) | cascade SSIM window |", "|---|---|---|---|---|---|---|---|---|"]
    for order, r in rows.items():
        for v in r["val"]:
            lines.append(f"| {order} | {r['steps']} | {r['step_time_s_median']:.2f} | {r['step_time_s_mean']:.2f} | "
                         f"{r['wall_s']:.0f} | {int(v.get('step', 0))} | {v.get('val/psnr_window_db', float('nan')):.2f} | "
                         f"{v.get('val/direct_psnr_window_db', float('nan')):.2f} | "
                         f"{v.get('val/ssim_window', float('nan')):.3f} |")
    if {"conv_first", "upsample_first"} <= rows.keys():
        a, b = rows["upsample_first"], rows["conv_first"]
        ratio = a["step_time_s_median"] / b["step_time_s_median"]
        lines += ["", f"At equal wall-clock time, conv_first runs {ratio:.2f}× the steps of upsample_first "
                  f"({a['steps']} steps of upsample_first buy {a['steps'] * ratio:.0f} of conv_first) on this "
                  "machine under this load."]
    return "\n".join([*lines, ""])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--processed", default=str(REPO / "data" / "processed"))
    ap.add_argument("--prev-run", default=str(REPO / "outputs" / "train"),
                    help="a training out dir holding models/stage1 … stage(K-1) (copied, read only)")
    ap.add_argument("--stage", type=int, default=2)
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("--val-every", type=int, default=50)
    ap.add_argument("--params", default=str(REPO / "params.yaml"))
    ap.add_argument("--orders", default=",".join(ORDERS))
    ap.add_argument("--serial", action="store_true", help="train the orders one after the other")
    ap.add_argument("--work", default=None, help="working folder (default: a temp dir, removed)")
    ap.add_argument("--out-dir", default=str(REPO / "benchmarks" / "results"))
    ap.add_argument("--_one", help=argparse.SUPPRESS)
    ap.add_argument("--_out", help=argparse.SUPPRESS)
    ap.add_argument("--from-json", help="only render the report from a decoder_train_<device>.json of an earlier run")
    a = ap.parse_args(argv)
    if a.from_json:
        return _write(json.loads(Path(a.from_json).read_text()), Path(a.out_dir), a.stage)
    if a._one:
        Path(a._out).write_text(json.dumps(run_one(json.loads(a._one))))
        return 0
    from bench_model import machine

    work = Path(a.work) if a.work else Path(tempfile.mkdtemp(prefix="bench_decoder_"))
    procs = []
    load0 = os.getloadavg()
    host = machine("cpu")  # before the runs: its load average is the one at the start
    for order in a.orders.split(","):
        out = work / order
        if out.exists():
            shutil.rmtree(out)
        for j in range(1, a.stage):
            src = Path(a.prev_run) / "models" / f"stage{j}"
            dst = out / "models" / f"stage{j}"
            dst.mkdir(parents=True, exist_ok=True)
            for f in src.glob("*.pt"):
                shutil.copyfile(f, dst / f.name)
        spec = {"order": order, "stage": a.stage, "steps": a.steps, "val_every": a.val_every,
                "params": a.params, "processed": a.processed, "out": str(out)}
        res_file = work / f"{order}.json"
        cmd = [sys.executable, __file__, "--_one", json.dumps(spec), "--_out", str(res_file)]
        log = open(work / f"{order}.log", "w")  # noqa: SIM115 - closed below
        procs.append((order, subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=REPO), res_file, log))
        if a.serial:
            procs[-1][1].wait()
    rows = []
    for order, p, res_file, log in procs:
        rc = p.wait()
        log.close()
        if rc != 0:
            tail = (work / f"{order}.log").read_text().strip().splitlines()[-3:]
            print(f"bench_decoder: {order} failed (exit {rc}): {' | '.join(tail)}", file=sys.stderr)
            return 1
        rows.append(json.loads(res_file.read_text()))
    doc = {"machine": host + f"; load average (1/5/15 min) at start {load0[0]:.1f} {load0[1]:.1f} {load0[2]:.1f}",
           "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
           "command": "python " + " ".join([Path(sys.argv[0]).as_posix(), *sys.argv[1:]]),
           "parallel": not a.serial, "results": rows}
    _write(doc, Path(a.out_dir), a.stage)
    for r in rows:
        last = r["val"][-1] if r["val"] else {}
        print(f"{r['order']}: {r['steps']} steps, {r['step_time_s_median']:.3f} s/step (median), "
              f"val PSNR window cascade {last.get('val/psnr_window_db', float('nan')):.2f} dB, "
              f"twin {last.get('val/direct_psnr_window_db', float('nan')):.2f} dB")
    if not a.work:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
