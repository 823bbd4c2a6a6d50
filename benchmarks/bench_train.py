#!/usr/bin/env python
"""Benchmark stage training: samples/s and step time per stage, Ray start-up separately.

Cases (demo profile = params.yaml, CPU):
  * ``core``  — :func:`xct_core.training.train_stage` in this process (no Ray, 1 worker);
  * ``ray1`` / ``ray2`` — :func:`components.train.run_train` on a local Ray runtime with
    1 and 2 DDP workers (gloo, 1 CPU each), MLflow tracking off.
Per case: median step time and samples/s over the logged windows after the first (warm-up)
one, the validation time (cascade DDIM sampling of one val volume), and for Ray the
overhead = ``fit`` wall time − in-loop training time − validation time (worker start-up,
process group, checkpoint upload, teardown); ``ray.init`` is timed on its own.

GPU (when CUDA is available): the production overlay (params.production.yaml: 64³/128³/256³)
on one GPU with the in-process loop (bf16 autocast), plus peak memory. Otherwise the
result says that no GPU was available.

Data: procedural phantoms through the real preprocess step (tests/train_fixtures.py), at
the profile's stage grids and DRR size, in a temp dir.

Usage: ``python benchmarks/bench_train.py [--steps N] [--stages 1 2 3] [--out-dir DIR] [--no-ray]``
Writes ``DIR/train_<cpu|gpu>.json`` and ``.md`` (default DIR: benchmarks/results).
"""

from __future__ import annotations

import argparse
import csv
import datetime as _dt
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))
os.environ.setdefault("RAY_AUTH_MODE", "token")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

import torch  # noqa: E402

from train_fixtures import build_processed  # noqa: E402
from xct_core.config import Params, load_params, params_from_dict  # noqa: E402
from xct_core.models import build_stage  # noqa: E402
from xct_core.training import RunLayout, TrainHooks, train_stage  # noqa: E402


def _params(base: Params, steps: int, workers: int = 1, device_gpu: bool = False) -> Params:
    data = base.model_dump(mode="json")
    data["train"].update(
        steps={name: steps for name in data["stages"]}, log_every=2, ckpt_every=steps, val_every=0,
        val_max_volumes=1, warmup_steps=1,
    )
    data["train"]["ray"].update(num_workers=workers, use_gpu=device_gpu, max_failures=0)
    return params_from_dict(data, "bench params")


def _summarise(step_times: list[float], batch: int, workers: int) -> dict[str, float]:
    steady = step_times[1:] or step_times  # first window = warm-up (allocations, oneDNN plans)
    med = statistics.median(steady)
    return {"step_time_s": med, "samples_per_s": batch * workers / med, "windows": len(steady)}


def bench_core(params: Params, k: int, processed: Path, out: Path, device: str) -> dict[str, Any]:
    """In-process loop; step times from the loop's own report (mean per logging window)."""
    times: list[float] = []
    val_s = [0.0]

    def report(m: dict[str, float], _ckpt: str | None) -> None:
        if "train/step_time_s" in m:
            times.append(m["train/step_time_s"])
        val_s[0] += m.get("val/time_s", 0.0)

    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    res = train_stage(params, k, processed, out, device=device, hooks=TrainHooks(report=report), fresh=True)
    wall = time.perf_counter() - t0
    cfg = list(params.stages.values())[k - 1]
    row = {"case": "core", "workers": 1, "batch_per_worker": cfg.batch_size, "steps": res.final_step,
           "wall_s": wall, "val_s": val_s[0], **_summarise(times, cfg.batch_size, 1)}
    if device == "cuda":
        row["peak_mem_gb"] = torch.cuda.max_memory_allocated() / 2**30
    return row


def bench_ray(params: Params, k: int, processed: Path, out: Path, workers: int) -> dict[str, Any]:
    from components.train import run_train

    s = run_train(params, k, processed, out, fresh=True, tracking=False, log=lambda _m: None)
    with open(RunLayout(out, k).plots / "train.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    times = [float(r["step_time_s"]) for r in rows]
    log_every = params.train.log_every
    train_time = sum(t * log_every for t in times)
    val_s = float(s.metrics.get("time_s") or 0.0)
    cfg = list(params.stages.values())[k - 1]
    return {"case": f"ray{workers}", "workers": workers, "batch_per_worker": cfg.batch_size, "steps": s.final_step,
            "wall_s": s.fit_s, "val_s": val_s, "ray_overhead_s": s.fit_s - train_time - val_s,
            **_summarise(times, cfg.batch_size, workers)}


def _copy_prev_models(src: Path, dst: Path, k: int) -> None:
    for j in range(1, k):
        d = dst / "models" / f"stage{j}"
        d.mkdir(parents=True, exist_ok=True)
        for f in (src / "models" / f"stage{j}").glob("*.pt"):
            shutil.copyfile(f, d / f.name)


def _md(doc: dict[str, Any]) -> str:
    lines = [f"# Stage training benchmark ({doc['device']})", "", f"Machine: {doc['machine']}", "",
             f"Command: `{doc['command']}`  ", f"Date: {doc['date']}; torch {doc['torch']}, "
             f"{doc['torch_threads']} intra-op threads in-process (Ray workers: 1 CPU each); "
             f"load average (1/5/15 min) at start {doc['loadavg']}, at end {doc['loadavg_end']}", ""]
    if doc.get("ray_init_s") is not None:
        lines += [f"Ray start-up (`ray.init`, local runtime): **{doc['ray_init_s']:.1f} s** "
                  "(once per `xct train`; not in the numbers below).", ""]
    lines += ["| stage | grid | params | case | workers | batch/worker | step time (s) | samples/s | "
              "validation (s) | fit wall (s) | Ray overhead in fit (s) |",
              "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in doc["results"]:
        lines.append(
            f"| {r['stage']} | {r['grid']}³ | {r['n_params'] / 1e6:.2f}M | {r['case']} | {r['workers']} | "
            f"{r['batch_per_worker']} | {r['step_time_s']:.3f} | {r['samples_per_s']:.2f} | {r['val_s']:.1f} | "
            f"{r['wall_s']:.1f} | {format(r['ray_overhead_s'], '.1f') if 'ray_overhead_s' in r else '–'} |"
            + (f" peak {r['peak_mem_gb']:.1f} GB |" if "peak_mem_gb" in r else "")
        )
    lines += ["", *[f"- {n}" for n in doc["notes"]], ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=10, help="optimiser steps per case")
    ap.add_argument("--stages", type=int, nargs="+", default=[1, 2, 3])
    ap.add_argument("--n-train", type=int, default=4)
    ap.add_argument("--out-dir", default=str(REPO / "benchmarks" / "results"))
    ap.add_argument("--no-ray", action="store_true", help="only the in-process loop")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads of the in-process case (default 1 = one Ray worker's CPU; 0 = torch default)")
    a = ap.parse_args(argv)
    if a.threads > 0:
        torch.set_num_threads(a.threads)

    load_start = " ".join(f"{x:.1f}" for x in os.getloadavg())
    gpu = torch.cuda.is_available()
    device = "cuda" if gpu else "cpu"
    base = load_params(REPO / "params.yaml", [REPO / "params.production.yaml"] if gpu else [])
    params = _params(base, a.steps, device_gpu=gpu)
    tmp = Path(tempfile.mkdtemp(prefix="xct-bench-train-"))
    ray_tmp = Path(tempfile.mkdtemp(prefix="xr-", dir="/tmp"))
    os.environ["RAY_TMPDIR"] = str(ray_tmp)
    results: list[dict[str, Any]] = []
    ray_init_s = None
    try:
        t0 = time.perf_counter()
        processed = build_processed(tmp, params, n_train=a.n_train, n_val=1)
        data_s = time.perf_counter() - t0
        core_out = tmp / "core"
        if not a.no_ray and not gpu:
            import ray

            t0 = time.perf_counter()
            ray.init(num_cpus=max(2, os.cpu_count() or 2), log_to_driver=False)
            ray_init_s = time.perf_counter() - t0
        for k in a.stages:
            cfg = list(params.stages.values())[k - 1]
            n_params = sum(p.numel() for p in build_stage(params, k, device="meta").parameters())
            meta = {"stage": k, "grid": cfg.size, "n_params": n_params}
            row = bench_core(params, k, processed, core_out, device)
            results.append({**meta, **row})
            print(json.dumps(results[-1]), flush=True)
            if a.no_ray or gpu:
                continue
            for w in (1, 2):
                out = tmp / f"ray{w}"
                _copy_prev_models(core_out, out, k)
                row = bench_ray(_params(base, a.steps, workers=w), k, processed, out, w)
                results.append({**meta, **row})
                print(json.dumps(results[-1]), flush=True)
    finally:
        if ray_init_s is not None:
            import ray

            ray.shutdown()
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(ray_tmp, ignore_errors=True)

    notes = [
        f"Data: {a.n_train} train + 1 val procedural phantoms through the preprocess step ({data_s:.0f} s), "
        f"DRRs {params.drr.pixels}² {params.drr.geometry} beam; stage grids {[s.size for s in params.stages.values()]}.",
        f"{a.steps} steps per case, logged every {params.train.log_every}; step time = median over the logging "
        "windows after the first (warm-up); samples/s = batch/worker × workers / step time.",
        "Step time includes the data loading, the physics (DRR) loss where physics_weight > 0, the per-step "
        "finiteness all-reduce and the EMA update.",
        "Validation = cascade DDIM sampling of 1 val volume with the EMA weights "
        f"({params.train.val_sample_steps} steps per stage) + metrics + montage.",
    ]
    if not gpu:
        notes.append("No GPU was available on this machine: production sizes (params.production.yaml, "
                     "64³/128³/256³ on one A100/H100) were NOT measured; run this script on a GPU box.")
        notes.append("The 2-core machine is shared: 2 Ray workers × 1 thread each compete with the driver, "
                     "the Ray system processes and other users, so ray2 is not a clean 2× scaling measurement.")
    doc = {
        "device": f"{torch.cuda.get_device_name(0)}" if gpu else "cpu",
        "machine": (f"{torch.cuda.get_device_name(0)}, " if gpu else "")
        + f"{os.cpu_count()}-core CPU dev machine ({platform.processor() or platform.machine()}, {platform.platform()})",
        "command": "python benchmarks/bench_train.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "date": _dt.datetime.now().isoformat(timespec="seconds"),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "loadavg": load_start,
        "loadavg_end": " ".join(f"{x:.1f}" for x in os.getloadavg()),
        "ray_init_s": ray_init_s,
        "profile": "production (params.production.yaml)" if gpu else "demo (params.yaml)",
        "results": results,
        "notes": notes,
    }
    out_dir = Path(a.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = out_dir / f"train_{'gpu' if gpu else 'cpu'}"
    from xct_core.atomic import write_text_atomic

    for path, text in ((stem.with_suffix(".json"), json.dumps(doc, indent=2) + "\n"), (stem.with_suffix(".md"), _md(doc))):
        write_text_atomic(path, text)
    print(_md(doc))
    return 0


if __name__ == "__main__":
    sys.exit(main())
