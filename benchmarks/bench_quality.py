"""Ablation benchmark of the reconstruction-quality levers (issue 14): each lever alone and
combined, on the demo test split and on the real-CT profile's two Lung-PET-CT-Dx chests.

    python benchmarks/bench_quality.py [--only demo|realct] [--rows NAME,...] [--work DIR]
                                       [--out benchmarks/results/quality_cpu]

Every row is a params overlay (``ROWS``) applied over params.yaml (demo) or params.yaml +
params.realct.yaml (real CTs), trained and evaluated by the project's own code — the same
``train_stage`` and THE evaluator (:func:`xct_core.evaluation.evaluate_stage` /
``xct evaluate``) the pipeline runs — with the same seeds and steps within a group. Rows
that differ only in inference settings (samples, guidance) share one trained model; each
row's wall time is its training time (when it trained) plus its evaluation time.

Demo part. The data are the project's phantoms (``xct data synth``; phantom ``i`` depends only
on the seed and ``i``). The TEST set is fixed for every row: the 4 test phantoms of the demo's
own 24-phantom split (ingest's patient split), so rows with more training phantoms (ids 24 …)
are compared on the same volumes; the 3 demo val phantoms are never trained on. Stage 1
(16³) only: the gate the demo has to pass first. Metrics: window PSNR/SSIM (the gate), HU PSNR
over [-1024, 1024] (data_range 2048), body-masked PSNR, reprojection PSNR per view — beside
the direct twin and the mean volume.

Real-CT part: ``pipelines.realct.run_experiment`` (train on LIDC-IDRI-0001 + the
TotalSegmentator CTs with augmentation, evaluate on the two held-out chests), per row.
Skipped with a note when ../shared/data is absent.

Results: ``OUT.json`` (every row, every metric, the machine, the commit) and ``OUT.md``
(the tables). Levers were CHOSEN on validation data (the research log in the note of
issue 14); the test numbers here are the report, not the selection.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

MACHINE = "2-core AMD EPYC CPU dev machine (no GPU)"
DEMO_SPLIT_N = 24  #: the demo's data set size whose test split is the benchmark's test set


@dataclass(frozen=True)
class Row:
    """One ablation row: a params overlay, the training data size (demo) and whether it
    re-uses the trained model of an earlier row (``model``: that row's name)."""

    name: str
    part: str  #: "demo" | "realct"
    overlay: Mapping[str, Any] = field(default_factory=dict)
    n_train_extra: int = 0  #: demo: phantoms added to the 17 demo train phantoms (ids 24 …)
    model: str | None = None  #: share the trained model of this row (inference-only differences)
    note: str = ""


def _deep_merge(base: dict, over: Mapping[str, Any]) -> dict:
    out = dict(base)
    for k, v in over.items():
        out[k] = _deep_merge(out[k], v) if isinstance(v, Mapping) and isinstance(out.get(k), dict) else v
    return out


#: main when issue 14 was filed: window output (the clipped soft-tissue window), plain diffusion,
#: one sample of 50 DDIM steps scored (the diffusion/eval sections of params.yaml then)
_START = {"hu": {"output": "window"}, "stages": {"stage1": {"anchor": "none"}},
          "eval": {"samples": {"stage1": 1}, "sample_steps": {"stage1": 50}}}
_K8 = {"eval": {"samples": {"stage1": 8}, "sample_steps": {"stage1": 10}}}  # the demo default
_EXTRA = 72  #: 24 + 72 = 96 phantoms, the demo's data set size

#: the levers, alone and combined (chosen on validation data: the research log in issue 14's note)
ROWS: list[Row] = [
    Row("A. main at issue start (24 phantoms)", "demo", _START,
        note="window output, plain diffusion, 17 train phantoms, 1 sample × 50 DDIM steps"),
    Row("B. A + posterior mean K=8", "demo", _deep_merge(_START, _K8), model="A. main at issue start (24 phantoms)",
        note="A's model; the point estimate is the mean of 8 samples (10 DDIM steps each)"),
    Row("C. A + data (96 phantoms)", "demo", _START, n_train_extra=_EXTRA,
        note="89 train phantoms (the 7 val/test phantoms of the 24-phantom split held out)"),
    Row("D. C + full-range output soft60", "demo", {**_START, "hu": {"output": "soft60"}}, n_train_extra=_EXTRA,
        note="the network predicts [-1024, 1024] HU (soft tissue gets 60 % of [-1, 1]); the gate still reads the window"),
    Row("E. D + posterior mean K=8", "demo", _deep_merge({**_START, "hu": {"output": "soft60"}}, _K8),
        n_train_extra=_EXTRA, model="D. C + full-range output soft60", note="D's model, mean of 8 samples"),
    Row("F. D + residual on the direct twin", "demo", {"eval": _START["eval"]}, n_train_extra=_EXTRA,
        note="stages.stage1.anchor: direct (diffusion of the residual over the twin's estimate), 1 sample"),
    Row("G. all levers = the demo profile", "demo", {}, n_train_extra=_EXTRA, model="F. D + residual on the direct twin",
        note="params.yaml as shipped: 96 phantoms, soft60, residual, mean of 8 samples × 10 steps"),
    Row("H. G + data-consistency guidance λ=0.1", "demo", {"diffusion": {"guidance_weight": 0.1}}, n_train_extra=_EXTRA,
        model="F. D + residual on the direct twin", note="off by default: it lowers window PSNR (see the note)"),
    Row("R1. real CTs at issue start", "realct", _START,
        note="params.realct.yaml with the plain window-mapped (wide) output, plain diffusion, 1 sample"),
    Row("R2. real CTs, all levers (profile default)", "realct", {},
        note="params.realct.yaml as shipped: soft60 output, residual on the twin, mean of 8 samples"),
]


# --------------------------------------------------------------------------- helpers


def _say(msg: str) -> None:
    print(f"[bench_quality] {msg}", flush=True)


def _params(base: Any, overlay: Mapping[str, Any]) -> Any:
    from xct_core.config import params_from_dict

    return params_from_dict(_deep_merge(base.model_dump(mode="json"), overlay), "bench overlay")


def _git() -> dict[str, Any]:
    from components.tracking import git_commit

    commit, dirty = git_commit(REPO)
    return {"commit": commit, "dirty": dirty}


def _vid(i: int) -> str:
    """The volume id of phantom ``i`` (its file name without ``.nii.gz``, as ingest names it)."""
    from xct_core.phantoms import phantom_name

    return phantom_name(i).split(".")[0]


def demo_split(work: Path, base: Any) -> dict[str, list[str]]:
    """The demo's own split of its 24 phantoms (ingest's patient split, split_seed), by id."""
    from xct_core.stats import make_splits, patient_of

    ids = [_vid(i) for i in range(DEMO_SPLIT_N)]
    rows = [{"id": v, "patient_id": patient_of(v, None, base.ingest.patient_regex), "status": "ok"} for v in ids]
    doc = make_splits(rows, base.ingest)
    return {s: list(doc["volumes"][s]) for s in ("train", "val", "test")}


def prepare_demo_data(work: Path, base: Any, n_extra: int, say: Callable[[str], None]) -> tuple[Path, float]:
    """Phantoms 0 … 23 + ``n_extra`` more → processed data with the fixed demo val/test split.
    Returns ``(processed folder, seconds)``; a re-run reuses what exists."""
    from components.preprocess import run_preprocess
    from xct_core.phantoms import write_phantoms

    t0 = time.perf_counter()
    n = DEMO_SPLIT_N + n_extra
    raw = work / f"raw{n}"
    synth = base.data.synth.model_copy(update={"n": n})
    if not (raw / "phantoms.json").is_file():
        say(f"synth {n} phantoms → {raw}")
        write_phantoms(raw, synth, preview=False)
    split = demo_split(work, base)
    held = set(split["val"]) | set(split["test"])
    splits = {"train": [_vid(i) for i in range(n) if _vid(i) not in held],
              "val": split["val"], "test": split["test"]}
    sp = work / f"splits{n}.json"
    sp.write_text(json.dumps(splits))
    out = work / f"processed{n}"
    run_preprocess(raw, sp, out, base, progress=False, log=say)
    return out, time.perf_counter() - t0


# --------------------------------------------------------------------------- the two parts


def run_demo_rows(rows: Sequence[Row], work: Path, say: Callable[[str], None]) -> list[dict[str, Any]]:
    from xct_core.config import load_params
    from xct_core.evaluation import EvalProtocol, evaluate_stage
    from xct_core.training import train_stage

    base = load_params(REPO / "params.yaml")
    results, trained = [], {}
    for row in rows:
        params = _params(base, row.overlay)
        processed, t_data = prepare_demo_data(work, base, row.n_train_extra, say)
        key = row.model or row.name
        train_dir = work / "train" / key.replace(" ", "_").replace("/", "_")
        t_train = 0.0
        done = train_dir / "bench_trained.json"  # a re-run (or a later --rows run) reuses a finished model
        if key not in trained and done.is_file():
            trained[key] = json.loads(done.read_text())["train_s"]
        if key not in trained:
            say(f"{row.name}: train stage 1 ({params.stage(1).train_steps} steps) → {train_dir}")
            t0 = time.perf_counter()
            train_stage(params, 1, processed, train_dir, device="cpu", fresh=True)
            t_train = time.perf_counter() - t0
            trained[key] = t_train
            done.write_text(json.dumps({"train_s": t_train, "row": row.name}))
        t0 = time.perf_counter()
        res = evaluate_stage(params, processed, train_dir, 1, protocol=EvalProtocol.from_params(params), split="test")
        t_eval = time.perf_counter() - t0
        results.append({"row": row.name, "part": "demo", "note": row.note, "overlay": dict(row.overlay),
                        "n_train": len(json.loads((work / f"splits{DEMO_SPLIT_N + row.n_train_extra}.json")
                                                  .read_text())["train"]),
                        "model": key, "metrics": res.metrics, "per_patient": res.rows,
                        "wall_s": {"train": round(t_train, 1), "eval": round(t_eval, 1), "data": round(t_data, 1)}})
        m = res.metrics
        say(f"{row.name}: window {m['psnr_window_db']:.2f} dB / SSIM {m['ssim_window']:.3f}, HU {m['psnr_hu_db']:.2f} dB "
            f"(direct {m.get('direct_psnr_window_db', float('nan')):.2f}, mean volume {m['baseline_psnr_window_db']:.2f})")
    return results


def run_realct_rows(rows: Sequence[Row], work: Path, say: Callable[[str], None]) -> list[dict[str, Any]]:
    from pipelines.realct import DEFAULT_DATA, find_data, run_experiment
    from xct_core.errors import InputError

    try:
        find_data(DEFAULT_DATA)
    except InputError as e:
        say(f"real-CT rows skipped: {e}")
        return []
    results = []
    for row in rows:
        key = row.model or row.name
        out = work / "realct" / key.replace(" ", "_").replace("/", "_")
        ov = work / "realct" / f"{row.name.replace(' ', '_').replace('/', '_')}.yaml"
        ov.parent.mkdir(parents=True, exist_ok=True)
        import yaml

        ov.write_text(yaml.safe_dump(dict(row.overlay)))
        t0 = time.perf_counter()
        if row.model is not None:  # inference-only difference: re-evaluate the shared model
            from pipelines.commands.reconstruct import evaluate_cmd

            ev_out = work / "realct" / f"eval_{row.name.replace(' ', '_').replace('/', '_')}"
            pfile = out / "params.yaml"
            merged = ov.parent / f"{ov.stem}_params.yaml"
            merged.write_text(yaml.safe_dump(_deep_merge(yaml.safe_load(pfile.read_text()), row.overlay)))
            evaluate_cmd(model=str(out / "train"), ct=out / "test_ct", out=ev_out, steps=None, samples=None, seed=None,
                         stages=None, processed=out / "processed", gates=out / "gates", train_dir=out / "train",
                         params=merged, device="cpu")
            doc = json.loads((ev_out / "metrics.json").read_text())
        else:
            # the shipped profile's row also refreshes the committed real-data result (docs/real-data.md)
            res = REPO / "benchmarks" / "results" / "realct_cpu" if not row.overlay else None
            run_experiment(DEFAULT_DATA, out, overlays=[ov], log=say, results=res,
                           command=f"python benchmarks/bench_quality.py --only realct (row {row.name!r})")
            doc = json.loads((out / "eval" / "metrics.json").read_text())
        results.append({"row": row.name, "part": "realct", "note": row.note, "overlay": dict(row.overlay), "model": key,
                        "metrics": doc["mean"], "per_patient": doc["patients"],
                        "wall_s": {"total": round(time.perf_counter() - t0, 1)}})
        m = doc["mean"]
        say(f"{row.name}: HU {m['psnr_hu_db']:.2f} dB / SSIM {m['ssim_window']:.3f} (direct {m.get('direct_psnr_hu_db', float('nan')):.2f} "
            f"/ {m.get('direct_ssim_window', float('nan')):.3f})")
    return results


# --------------------------------------------------------------------------- report

DEMO_COLS = [("psnr_window_db", "window PSNR"), ("ssim_window", "SSIM"), ("psnr_window_body_db", "window PSNR body"),
             ("psnr_hu_db", "HU PSNR"), ("reproj_psnr_frontal_db", "reproj F"), ("reproj_psnr_lateral_db", "reproj L")]
REAL_COLS = [("psnr_hu_db", "HU PSNR"), ("ssim_window", "SSIM"), ("psnr_hu_body_db", "HU PSNR body"),
             ("mae_hu", "MAE HU"), ("reproj_psnr_frontal_db", "reproj F"), ("reproj_psnr_lateral_db", "reproj L")]


def _fmt(v: Any, key: str) -> str:
    if not isinstance(v, (int, float)):
        return "—"
    return f"{v:.3f}" if "ssim" in key else (f"{v:.1f}" if "mae" in key else f"{v:.2f}")


def markdown(doc: dict[str, Any]) -> str:
    lines = ["# Reconstruction-quality ablation (issue 14)", "",
             f"Machine: {doc['machine']}; torch {doc['torch']}; commit {doc['git']['commit']}"
             f"{' (dirty)' if doc['git']['dirty'] else ''}; {doc['date']}. Command: `{doc['command']}`.", "",
             "Each cell: the method / its direct-regression twin / the mean volume (same volumes, same metric code).",
             "Levers were chosen on validation data; these are test numbers.", ""]
    for part, cols, title in (("demo", DEMO_COLS, "Demo test split (4 phantoms), stage 1 (16³)"),
                              ("realct", REAL_COLS, "Real CTs: the two Lung-PET-CT-Dx chests, stage 1 (32³), mean of 2")):
        rows = [r for r in doc["rows"] if r["part"] == part]
        if not rows:
            continue
        lines += [f"## {title}", "", "| row | " + " | ".join(c[1] for c in cols) + " | wall (s) |",
                  "|---|" + "---|" * (len(cols) + 1)]
        for r in rows:
            m = r["metrics"]
            cells = [f"{_fmt(m.get(k), k)} / {_fmt(m.get('direct_' + k), k)} / {_fmt(m.get('baseline_' + k), k)}"
                     for k, _ in cols]
            wall = sum(v for kk, v in r["wall_s"].items() if kk != "data")
            lines.append(f"| {r['row']} | " + " | ".join(cells) + f" | {wall:.0f} |")
        lines += [""]
        for r in rows:
            if r["note"]:
                lines.append(f"- **{r['row']}**: {r['note']}")
        lines += [""]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    import torch

    from xct_core.atomic import write_json_atomic, write_text_atomic

    ap = argparse.ArgumentParser(prog="python benchmarks/bench_quality.py", description=__doc__.splitlines()[0])
    ap.add_argument("--only", choices=("demo", "realct"), default=None, help="run one part only")
    ap.add_argument("--rows", default=None, help="comma-separated row names (default: all)")
    ap.add_argument("--work", type=Path, default=REPO / "outputs" / "bench_quality", help="scratch folder")
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "quality_cpu", help="results prefix")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    a = ap.parse_args(argv)
    if a.threads > 0:
        torch.set_num_threads(a.threads)
    wanted = set(a.rows.split(",")) if a.rows else None
    rows = [r for r in ROWS if (wanted is None or r.name in wanted) and (a.only is None or r.part == a.only)]
    a.work.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    results = run_demo_rows([r for r in rows if r.part == "demo"], a.work, _say)
    results += run_realct_rows([r for r in rows if r.part == "realct"], a.work, _say)
    doc = {"format": "xct-bench-quality/1", "machine": f"{MACHINE} ({platform.machine()}, {os.cpu_count()} CPUs)",
           "torch": torch.__version__, "threads": torch.get_num_threads(), "git": _git(),
           "date": time.strftime("%Y-%m-%dT%H:%M:%S"), "command": "python benchmarks/bench_quality.py "
           + " ".join(argv if argv is not None else sys.argv[1:]), "wall_total_s": round(time.perf_counter() - t0, 1),
           "rows": results}
    prev = a.out.with_suffix(".json")
    if prev.is_file() and wanted is not None:  # a partial re-run updates its rows, keeps the others
        old = json.loads(prev.read_text())
        names = {r["row"] for r in results}
        doc["rows"] = [r for r in old.get("rows", []) if r["row"] not in names] + results
    write_json_atomic(a.out.with_suffix(".json"), doc)
    write_text_atomic(a.out.with_suffix(".md"), markdown(doc))
    _say(f"wrote {a.out.with_suffix('.json')} and {a.out.with_suffix('.md')} in {doc['wall_total_s']:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
