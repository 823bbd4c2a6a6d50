#!/usr/bin/env python
"""Step budget: where the demo's training steps pay (issue 21 item 5).

Trains stage 2 past the demo's 264 steps (default 1000) on a finished ``make demo``'s processed
data with that demo's frozen stage 1, validating every ``--val-every`` steps with the loop's own
validation (``train.val_max_volumes`` val volumes, EMA weights, the honest protocol), and puts its
val curve beside stage 1's (the demo's own ``plots/stage1/val.csv``) and the demo's per-step times
(``plots/stageK/train.csv``: the demo run's own ``samples_per_s``). From those it predicts the
training time of a split of the steps between stages 1 and 2 and recommends one.

Usage::

    nice -n 5 python benchmarks/bench_budget.py --processed /tmp/stage3/processed \\
        --demo /work/demo4 --work /tmp/stage3/run2 --steps 1000 --val-every 100

Note: the cosine LR schedule decays over the run's own length, so the value at step N of a
1000-step run is not what a run of exactly N steps ends at (that one ends at the low LR, usually
a little better); the report shows the demo's own 264-step end point beside the curve.

Writes ``benchmarks/results/budget_cpu.md`` + ``.json``.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import statistics
import sys
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from bench_stage3 import bench_params, prepare_out, run_header, train_run  # noqa: E402


def read_csv(path: Path) -> list[dict[str, float]]:
    with open(path, newline="") as fh:
        return [{k: float(v) for k, v in row.items() if v not in ("", None)} for row in csv.DictReader(fh)]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--processed", required=True)
    ap.add_argument("--demo", required=True, help="a finished `make demo` checkout (read only): outputs/train")
    ap.add_argument("--params", default=str(REPO / "params.yaml"))
    ap.add_argument("--stage", type=int, default=2)
    ap.add_argument("--steps", type=int, default=1000)
    ap.add_argument("--val-every", type=int, default=100)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--work", default="/tmp/xct_bench_budget")
    ap.add_argument("--skip-train", action="store_true", help="only render from --work's training record")
    ap.add_argument("--stage3-record", default=None, help="bench_stage3.py's train_record.json (stage-3 step time)")
    ap.add_argument("--demo-repro-s", type=float, default=936.0, help="the demo's `dvc repro` wall time, s (/work/note.md: 15.6 min)")
    ap.add_argument("--install-s", type=float, default=144.0, help="the demo's install time, s (/work/note.md: ~2.4 min)")
    ap.add_argument("--recommend", default="", help="the recommendation paragraph (written by whoever read the curves)")
    ap.add_argument("--out-dir", default=str(REPO / "benchmarks" / "results"))
    a = ap.parse_args(argv)

    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    record = work / "train_record.json"
    if not a.skip_train:
        header = run_header(os.getloadavg())
        (work / "header.json").write_text(json.dumps(header))
        params = bench_params(a.params, a.stage, a.steps, a.val_every)
        prepare_out(work / "train", Path(a.demo) / "outputs" / "train", a.stage)
        tr = train_run(params, a.stage, a.processed, work / "train", threads=a.threads, log=work / "train_log.jsonl")
        tr.update(header, planned_steps=a.steps)
        record.write_text(json.dumps(tr, indent=2))
    tr = json.loads(record.read_text()) if record.is_file() else record_from_log(work, a.steps)
    return render_and_write(a, tr)


def record_from_log(work: Path, planned: int) -> dict[str, Any]:
    """The training record of a run stopped for time, from its report log (``train_log.jsonl``):
    the steps it reached, its step times and validations so far."""
    rows = [json.loads(line) for line in (work / "train_log.jsonl").read_text().splitlines() if line.strip()]
    logs = [r for r in rows if "train/step_time_s" in r]
    vals = [{k: v for k, v in r.items() if k.startswith("val/") or k == "step"} for r in rows
            if any(k.startswith("val/") for k in r)]
    steady = [r["train/step_time_s"] for r in logs[1:]] or [r["train/step_time_s"] for r in logs]
    header = json.loads((work / "header.json").read_text()) if (work / "header.json").is_file() else {}
    return {**header, "stage": 2, "steps": int(max(r["step"] for r in rows)), "planned_steps": planned,
            "stopped_at": int(max(r["step"] for r in rows)), "threads": 1,
            "step_time_s_median": statistics.median(steady), "samples_per_s_median": statistics.median(
                r["train/samples_per_s"] for r in (logs[1:] or logs)),
            "val_time_s": sum(v.get("val/time_s", 0.0) for v in vals), "val": vals,
            "loadavg_during_median": statistics.median(r["loadavg_1min"] for r in logs)}


def demo_timings(demo: Path, work: Path) -> dict[str, Any]:
    """Per stage of the demo run: median step time and samples/s from its own ``train.csv``, the
    sum of its step times, its validation time (``val.csv`` ``time_s``) and the stage's MLflow run
    wall time (start → end, a copy of the demo's ``mlflow.db`` read with sqlite3)."""
    import shutil
    import sqlite3

    out: dict[str, Any] = {}
    plots = demo / "outputs" / "train" / "plots"
    for sdir in sorted(plots.glob("stage*")):
        if not (sdir / "train.csv").is_file():
            continue
        tr = read_csv(sdir / "train.csv")
        val = read_csv(sdir / "val.csv") if (sdir / "val.csv").is_file() else []
        steps = [int(r["step"]) for r in tr]
        # each row covers the steps since the previous row (log_every, and the last one)
        spans = [b - a for a, b in zip([0, *steps[:-1]], steps)]
        out[sdir.name] = {"steps": steps[-1], "step_time_s_median": statistics.median(r["step_time_s"] for r in tr[1:]),
                          "samples_per_s_median": statistics.median(r["samples_per_s"] for r in tr[1:]),
                          "step_time_sum_s": sum(r["step_time_s"] * n for r, n in zip(tr, spans)),
                          "val_rounds": len(val), "val_time_s": sum(r.get("time_s", 0.0) for r in val)}
    db = demo / "mlflow.db"
    if db.is_file():
        copy = work / "demo_mlflow.db"
        shutil.copyfile(db, copy)
        con = sqlite3.connect(copy)
        for name, t0, t1 in con.execute("select name, start_time, end_time from runs where end_time is not null"):
            if name in out:
                out[name]["mlflow_run_wall_s"] = (t1 - t0) / 1000.0
            elif name == "pipeline":
                out["pipeline_run_wall_s"] = (t1 - t0) / 1000.0
        con.close()
    for st in [v for k, v in out.items() if k.startswith("stage")]:
        if "mlflow_run_wall_s" in st:
            # what a step costs inside the stage's run, logging/checkpoints/validation included
            st["run_s_per_step"] = st["mlflow_run_wall_s"] / st["steps"]
            st["overhead_s"] = st["mlflow_run_wall_s"] - st["step_time_sum_s"] - st["val_time_s"]
    return out


def curve(rows: list[dict[str, float]], prefix: str = "") -> list[dict[str, float]]:
    keys = ("psnr_window_db", "direct_psnr_window_db", "psnr_window_body_db", "direct_psnr_window_body_db", "time_s")
    return [{"step": int(r["step"]), **{k: r.get(f"{prefix}{k}") for k in keys if r.get(f"{prefix}{k}") is not None}}
            for r in rows]


def at_step(points: list[dict[str, float]], step: int, key: str) -> float | None:
    """Linear interpolation of ``key`` on a val curve (None outside it)."""
    pts = [(p["step"], p[key]) for p in points if key in p]
    for (s0, v0), (s1, v1) in zip(pts, pts[1:]):
        if s0 <= step <= s1:
            return v0 + (v1 - v0) * (step - s0) / (s1 - s0)
    for s, v in pts:
        if s == step:
            return v
    return None


def render_and_write(a: argparse.Namespace, tr: dict[str, Any]) -> int:
    from xct_core.atomic import write_text_atomic
    from xct_core.jsondoc import json_text

    work, demo = Path(a.work), Path(a.demo)
    timings = demo_timings(demo, work)
    plots = demo / "outputs" / "train" / "plots"
    s1 = curve(read_csv(plots / "stage1" / "val.csv"))
    s2_demo = curve(read_csv(plots / "stage2" / "val.csv"))
    s2 = curve([{k.removeprefix("val/"): v for k, v in r.items()} for r in tr["val"]])
    s3 = json.loads(Path(a.stage3_record).read_text()) if a.stage3_record and Path(a.stage3_record).is_file() else None
    t1, t2 = timings["stage1"], timings["stage2"]
    # loaded / quiet ratio of stage 2 (same stage, the demo's quiet 2-thread run vs this loaded 1-thread run)
    slow = tr["step_time_s_median"] / t2["step_time_s_median"] if tr.get("step_time_s_median") else None
    c1, c2 = t1["run_s_per_step"], t2["run_s_per_step"]
    splits = []
    for n1 in (600, 900, 1200):
        for n2 in (264, 400, 500, 600, 700, 1000):
            dt = (n1 - t1["steps"]) * c1 + (n2 - t2["steps"]) * c2
            dt_steps = (n1 - t1["steps"]) * t1["step_time_s_median"] + (n2 - t2["steps"]) * t2["step_time_s_median"]
            splits.append({"stage1_steps": n1, "stage2_steps": n2, "training_change_s": dt,
                           "training_change_steps_only_s": dt_steps,
                           "stage1_val_twin_db": at_step(s1, n1, "direct_psnr_window_db"),
                           "stage2_val_twin_db": at_step(s2, n2, "direct_psnr_window_db") if n2 != t2["steps"]
                           else at_step(s2_demo, n2, "direct_psnr_window_db")})
    doc = {"machine": tr.get("machine"), "date": tr.get("date"), "command": tr.get("command"),
           "render_command": "python " + " ".join([Path(sys.argv[0]).as_posix(), *_shown(sys.argv[1:])]),
           "demo": str(demo), "demo_timings_quiet": timings, "stage1_val": s1, "stage2_val_demo": s2_demo,
           "stage2_val_long_run": s2, "stage2_long_run": {k: v for k, v in tr.items() if k != "val"},
           "stage2_loaded_over_quiet": slow, "stage3_run": {k: v for k, v in (s3 or {}).items() if k != "val"} or None,
           "stage3_quiet_estimate_s_per_step": (s3["step_time_s_median"] / slow) if s3 and slow else None,
           "splits": splits, "recommend": a.recommend, "demo_repro_s": a.demo_repro_s, "install_s": a.install_s}
    out = Path(a.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    write_text_atomic(out / "budget_cpu.json", json_text(doc))
    write_text_atomic(out / "budget_cpu.md", render(doc))
    print(f"wrote {out / 'budget_cpu.md'}")
    return 0


def _shown(argv: list[str]) -> list[str]:
    """The command line as shown in the report: the long --recommend text as "TEXT" (it is printed below)."""
    return ["TEXT" if i and argv[i - 1] == "--recommend" else a for i, a in enumerate(argv)]


def _f(v: Any, fmt: str = ".2f") -> str:
    return "—" if v is None else format(v, fmt)


def render(d: dict[str, Any]) -> str:
    t = d["demo_timings_quiet"]
    lr = d["stage2_long_run"]
    lines = ["# Step budget: where the demo's training steps pay (CPU)", "",
             "Issue 21 item 5: \"the step budget goes where the val curves say it pays\" and `make demo` ≤ 15 min. "
             f"Stage 1's curve is the demo's own (`{d['demo']}`, `make demo` of main@24a8a20 on a quiet box, "
             "`outputs/train/plots/stage1/val.csv`); stage 2's is a longer run of the same stage on the same data "
             "with the demo's frozen stage 1.", "",
             f"Machine: {d['machine']}  ", f"Date of the stage-2 run: {d['date']}  ", f"Command: `{d['command']}`  ",
             f"Report: `{d['render_command']}`", "",
             "Validation = the training loop's own (EMA weights, first `train.val_max_volumes` = 6 val volumes, "
             "honest protocol, 10 DDIM steps, 1 sample). \"Twin\" = the direct-regression twin, which is the "
             "shipped point estimate (`eval.point_estimate: auto` → the anchor), so the twin column predicts the "
             "test number the stage-2 target (≥ 24.6 dB whole grid) is about: the demo's val twin 21.79 dB at "
             "264 steps became 21.97 dB on test.", "",
             "## Stage 1 (16³), the demo's run of 1200 steps", "",
             "| step | cascade window PSNR (dB) | twin (dB) | cascade body (dB) | twin body (dB) |", "|---|---|---|---|---|"]
    for p in d["stage1_val"]:
        lines.append(f"| {p['step']} | {_f(p.get('psnr_window_db'))} | {_f(p.get('direct_psnr_window_db'))} | "
                     f"{_f(p.get('psnr_window_body_db'))} | {_f(p.get('direct_psnr_window_body_db'))} |")
    lines += ["", f"## Stage 2 (32³): a run of {lr.get('planned_steps', lr['steps'])} steps" +
              (f" (stopped for time at step {lr['stopped_at']}: the machine was shared by other jobs, load "
               f"{_f(lr.get('loadavg_during_median'), '.0f')} on 2 cores)" if lr.get("stopped_at") else ""), "",
              "| step | cascade window PSNR (dB) | twin (dB) | cascade body (dB) | twin body (dB) |", "|---|---|---|---|---|"]
    for p in d["stage2_val_demo"]:
        lines.append(f"| {p['step']} (the demo's own 264-step run, end of its schedule) | {_f(p.get('psnr_window_db'))} | "
                     f"{_f(p.get('direct_psnr_window_db'))} | {_f(p.get('psnr_window_body_db'))} | "
                     f"{_f(p.get('direct_psnr_window_body_db'))} |")
    for p in d["stage2_val_long_run"]:
        lines.append(f"| {p['step']} | {_f(p.get('psnr_window_db'))} | {_f(p.get('direct_psnr_window_db'))} | "
                     f"{_f(p.get('psnr_window_body_db'))} | {_f(p.get('direct_psnr_window_body_db'))} |")
    lines += ["", "Both curves come from runs whose cosine LR schedule decays over the whole run (stage 1: the demo's "
              f"1200 steps; stage 2: this run's {lr.get('planned_steps', lr['steps'])} steps), so a value at step N "
              "is what N steps of a longer schedule give (LR still high), not what an N-step run ends at — the "
              "latter ends at the low LR and is usually a little better (compare stage 2's 264-step demo end point "
              "with the long run near 264).", "",
              "## Time per step", "",
              "| stage | source | median step time (s) | samples/s | stage run wall (s) | run s per step (all in) | "
              "validation (s) | overhead (s) |", "|---|---|---|---|---|---|---|---|"]
    for name in ("stage1", "stage2"):
        s = t[name]
        lines.append(f"| {name[-1]} | demo run, quiet box, Ray worker with 2 threads | {s['step_time_s_median']:.3f} | "
                     f"{s['samples_per_s_median']:.2f} | {_f(s.get('mlflow_run_wall_s'), '.0f')} | "
                     f"{_f(s.get('run_s_per_step'), '.3f')} | {s['val_time_s']:.0f} ({s['val_rounds']} round{'s' if s['val_rounds'] != 1 else ''}) | "
                     f"{_f(s.get('overhead_s'), '.0f')} |")
    lines.append(f"| 2 | this run, **loaded**, in-process, 1 thread (median 1-min load {_f(lr.get('loadavg_during_median'), '.1f')}) | "
                 f"{_f(lr.get('step_time_s_median'), '.3f')} | {_f(lr.get('samples_per_s_median'))} | — | — | "
                 f"{lr.get('val_time_s', 0):.0f} | — |")
    s3 = d.get("stage3_run")
    if s3:
        lines.append(f"| 3 | benchmarks/bench_stage3.py run, **loaded**, in-process, 1 thread (median 1-min load "
                     f"{_f(s3.get('loadavg_during_median'), '.1f')}) | {_f(s3.get('step_time_s_median'), '.3f')} | "
                     f"{_f(s3.get('samples_per_s_median'), '.3f')} | — | — | {s3.get('val_time_s', 0):.0f} | — |")
        lines += ["", f"Stage 3 on a quiet box, estimated: its loaded step time / (stage 2 loaded / stage 2 quiet = "
                  f"{_f(d['stage2_loaded_over_quiet'])}×) = **{_f(d['stage3_quiet_estimate_s_per_step'])} s/step** "
                  "(an estimate, not a measurement)."]
    lines += ["", "\"Run s per step (all in)\" = the stage's MLflow run wall time (start → end: Ray start-up, "
              "data loading, steps, validation, checkpoints, logging, export) / its steps: the cost used for the "
              "arithmetic below, an upper bound on the marginal cost of a step (the fixed part is counted too).", "",
              "## Splits: predicted change of the demo's training time and the val twin at those steps", "",
              f"The demo's `dvc repro`: {d['demo_repro_s'] / 60:.1f} min, with install {(d['demo_repro_s'] + d['install_s']) / 60:.1f} min "
              f"(/work/note.md); the 15-min target leaves {(900 - d['install_s']) / 60:.1f} min for `dvc repro`, "
              f"i.e. {d['demo_repro_s'] + d['install_s'] - 900:.0f} s must go.", "",
              "| stage 1 steps | stage 2 steps | training time change, all in (s) | steps only (s) | "
              "predicted `make demo`, all in (min) | steps only (min) | "
              "stage 1 val twin at that step (dB) | stage 2 val twin at that step (dB) |", "|---|---|---|---|---|---|---|---|"]
    for s in d["splits"]:
        total = (d["demo_repro_s"] + d["install_s"] + s["training_change_s"]) / 60
        total2 = (d["demo_repro_s"] + d["install_s"] + s["training_change_steps_only_s"]) / 60
        lines.append(f"| {s['stage1_steps']} | {s['stage2_steps']} | {s['training_change_s']:+.0f} | "
                     f"{s['training_change_steps_only_s']:+.0f} | {total:.1f} | {total2:.1f} | "
                     f"{_f(s['stage1_val_twin_db'])} | {_f(s['stage2_val_twin_db'])} |")
    lines += ["", "Arithmetic: change, all in = (stage-1 steps − 1200) × stage-1 run s/step + (stage-2 steps − 264) × "
              "stage-2 run s/step; steps only = the same with the median step times (the marginal cost if logging, "
              "checkpoints and validation did not grow with the steps; they do: one MLflow log every 5 steps, one "
              "checkpoint every 25); quiet demo numbers above; predicted `make demo` = the demo's install + `dvc repro` "
              "+ change. Stage 3 is not trained in the demo (gate 2 fails); were gate 2 to pass, stage 3's "
              "80 steps would add about 80 × the stage-3 quiet estimate plus its validation and evaluation.", ""]
    if d.get("recommend"):
        lines += ["## Recommendation", "", d["recommend"], ""]
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
