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
import sys
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
    m = sub.add_parser("report")
    m.add_argument("--json", type=Path, nargs="+", required=True, help="eval outputs (one per row is fine: rows merge)")
    m.add_argument("--out", type=Path, required=True)
    for s in (p, t, e):
        s.add_argument("--work", type=Path, required=True)
        s.add_argument("--params", type=Path, default=Path(__file__).resolve().parents[1] / "params.yaml")
    a = ap.parse_args(argv)
    a.load_at_start = os.getloadavg()[0]
    a.machine = f"{platform.machine()} {os.cpu_count()} cores"
    if a.cmd == "report":
        return cmd_report(a)
    return {"prepare": cmd_prepare, "train": cmd_train, "eval": cmd_eval}[a.cmd](a)


#: per-patient keys reported with bootstrap intervals (evaluation rows; point = eval.point_estimate)
PSNR_KEYS = {
    "point": "psnr_window_db", "point_body": "psnr_window_body_db",
    "kmean": "mean_psnr_window_db", "kmean_body": "mean_psnr_window_body_db",
    "single": "single_psnr_window_db",
    "twin": "direct_psnr_window_db", "twin_body": "direct_psnr_window_body_db",
    "mean_volume": "baseline_psnr_window_db", "mean_volume_body": "baseline_psnr_window_body_db",
}
#: split summaries (uncertainty and realism; recal/conformal need the val fit: test only)
SUMMARY_KEYS = ("spread_skill", "spread_skill_recal", "conformal_coverage", "coverage_minmax", "ause",
                "spearman_std_abs_err", "psd_top_band_ratio", "single_psd_top_band_ratio", "direct_psd_top_band_ratio",
                "point_estimate", "samples", "sample_steps", "n_patients", "direct_source")


def _split_doc(res) -> dict:  # noqa: ANN001 - an EvalResult
    from xct_core.intervals import bootstrap_interval

    doc = {name: bootstrap_interval([r.get(key) for r in res.rows]) for name, key in PSNR_KEYS.items()}
    doc.update({k: res.metrics.get(k) for k in SUMMARY_KEYS})
    return doc


def residual_diagnostic(params, work: Path, row: str) -> dict | None:  # noqa: ANN001
    """The cause, measured on the TRAIN volumes of a cross-fitted run's last checkpoint: RMS of
    ``x0 − twin`` (network units) of the all-data twin (in-sample: what an uncross-fitted residual
    model learns) vs of each volume's fold twin (out-of-fold: what the cross-fitted one learns),
    and the all-data twin vs the fold twins' average on val (clean views) — the inference anchor."""
    import torch

    from xct_core.checkpoint import list_checkpoints, load_state
    from xct_core.data import XrayCTDataset
    from xct_core.layout import RunLayout
    from xct_core.models import build_stage
    from xct_core.training.crossfit import fold_kind, fold_of

    st = params.stage(STAGE)
    folds = st.cfg.anchor_folds
    ckpts = list_checkpoints(RunLayout(work / "runs" / row, STAGE).checkpoints)
    if folds < 2 or not ckpts:
        return None
    state = load_state(ckpts[-1][1])

    def net(kind: str):  # noqa: ANN202
        m = build_stage(params, st, mode="direct")
        m.load_state_dict(state["learners"][kind]["ema"])
        return m.eval()

    full, twins = net("direct"), [net(fold_kind(g)) for g in range(folds)]
    out: dict = {"step": int(state["step"]), "folds": folds}
    with torch.no_grad():
        for split in ("train", "val"):
            ds = XrayCTDataset(processed_for(work, row), STAGE, split, params.hu.net_map())
            se = {"all_data_twin": [], "fold_twin": [], "fold_average": []}
            for i in range(len(ds)):
                it = ds[i]
                x0, f, lat = it["x0"][None], it["frontal"][None], it["lateral"][None]
                preds = [t(None, None, f, lat, None, None).clamp(-1, 1) for t in twins]
                se["all_data_twin"].append(float((full(None, None, f, lat, None, None).clamp(-1, 1) - x0).square().mean()))
                se["fold_twin"].append(float((preds[fold_of(it["id"], folds)] - x0).square().mean()))
                se["fold_average"].append(float((torch.stack(preds).mean(0) - x0).square().mean()))
            out[split] = {k: float(sum(v) / len(v)) ** 0.5 for k, v in se.items()} | {"n": len(ds)}
    out["train"]["oof_over_in_sample"] = out["train"]["fold_twin"] / out["train"]["all_data_twin"]
    return out


def cmd_eval(a: argparse.Namespace) -> int:
    import torch

    from xct_core.ceiling import cached_stage_ceiling
    from xct_core.evaluation import EvalProtocol, evaluate_stage, fit_stage_calibration

    torch.set_num_threads(1)
    rows = [r for r in a.rows.split(",") if r]
    out_json = a.out.with_suffix(".json") if a.out else a.work / "ablation.json"
    doc = json.loads(out_json.read_text()) if out_json.is_file() else {"rows": {}}
    doc.update({"command": "python benchmarks/bench_ablation.py " + " ".join(sys.argv[1:]),
                "machine": f"{a.machine}, torch {torch.__version__}, no GPU (shared 2-core dev box, loaded)",
                "stage": STAGE, "levers": {r: dict(zip(("train_detector", "decoder", "anchor_folds"), v, strict=True))
                                           for r, v in ROWS.items()}})
    for row in rows:
        run = a.work / "runs" / row
        info = run / "ablation_train.json"
        if not info.is_file():
            print(f"{row}: not trained yet (no {info})", flush=True)
            continue
        params = row_params(row, a.params)
        protocol = EvalProtocol.from_params(params)
        proc = processed_for(a.work, row)
        t0 = time.perf_counter()
        val = evaluate_stage(params, proc, run, STAGE, protocol=protocol, split="val", reprojection=False)
        cal = fit_stage_calibration(val, params)
        test = evaluate_stage(params, proc, run, STAGE, protocol=protocol, split="test", reprojection=False,
                              calibration=cal)
        entry = {"train": json.loads(info.read_text()), "val": _split_doc(val), "test": _split_doc(test),
                 "calibration": cal.to_json() if cal is not None else None,
                 "eval_s": round(time.perf_counter() - t0, 1), "eval_load_at_start": a.load_at_start,
                 "residuals": residual_diagnostic(params, a.work, row)}
        doc["rows"][row] = entry
        if "ceiling" not in doc:
            doc["ceiling"] = cached_stage_ceiling(params, STAGE, Path.home() / ".cache/xct/ceiling", phantoms=2, seed=1)
        doc["date"] = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
        out_json.parent.mkdir(parents=True, exist_ok=True)
        out_json.write_text(json.dumps(doc, indent=1, sort_keys=True, default=float) + "\n")
        v, t = entry["val"], entry["test"]
        print(f"{row}: val point {v['point']['mean']:.2f} kmean {v['kmean']['mean']:.2f} twin {v['twin']['mean']:.2f} "
              f"ss {v['spread_skill']:.3f} | test point {t['point']['mean']:.2f} ss {t['spread_skill']:.3f} "
              f"recal {t['spread_skill_recal']:.3f} conf {t['conformal_coverage']:.3f}", flush=True)
    return 0


def _fmt(stat: dict | None) -> str:
    from xct_core.intervals import format_interval

    return format_interval(stat) if stat and stat.get("mean") is not None else "–"


def _num(x: object, d: int = 3) -> str:
    return f"{x:.{d}f}" if isinstance(x, (int, float)) else "–"


def cmd_report(a: argparse.Namespace) -> int:
    """The results page's tables from the eval JSON (the prose is written by hand around them)."""
    doc: dict = {"rows": {}}
    for path in a.json:
        part = json.loads(path.read_text())
        doc = {**doc, **{k: v for k, v in part.items() if k != "rows"}, "rows": {**doc["rows"], **part["rows"]}}
    order = [r for r in ROWS if r in doc["rows"]]
    lines = []
    for split in ("val", "test"):
        lines += [f"### {split} ({'choosing' if split == 'val' else 'reporting'}), window PSNR dB, patient bootstrap 95 %",
                  "", "| row | detector | decoder | folds | point (anchor) | body | K-mean | K-mean body | one sample | twin | twin body | mean volume | mean volume body |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in order:
            e, (det, dec, f) = doc["rows"][r][split], ROWS[r]
            lines.append(f"| {r} | {'on' if det else 'off'} | {dec} | {f} | " + " | ".join(
                _fmt(e.get(k)) for k in ("point", "point_body", "kmean", "kmean_body", "single", "twin", "twin_body",
                                         "mean_volume", "mean_volume_body")) + " |")
        lines.append("")
    lines += ["### uncertainty and realism (K = 8; val: raw; test: raw → σ-recalibrated on val; conformal 90 % fitted on val)", "",
              "| row | val spread-skill | val Spearman | test spread-skill raw | test recal | test conformal cov. | test [min,max] cov. | test AUSE | test Spearman | test top-band PSD (one sample) | (anchor) | (twin) |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in order:
        v, t = doc["rows"][r]["val"], doc["rows"][r]["test"]
        lines.append(f"| {r} | {_num(v.get('spread_skill'))} | {_num(v.get('spearman_std_abs_err'))} | "
                     f"{_num(t.get('spread_skill'))} | {_num(t.get('spread_skill_recal'))} | {_num(t.get('conformal_coverage'))} | "
                     f"{_num(t.get('coverage_minmax'))} | {_num(t.get('ause'), 4)} | {_num(t.get('spearman_std_abs_err'))} | "
                     f"{_num(t.get('single_psd_top_band_ratio'))} | {_num(t.get('psd_top_band_ratio'))} | "
                     f"{_num(t.get('direct_psd_top_band_ratio'))} |")
    lines.append("")
    res = [(r, doc["rows"][r]["residuals"]) for r in order if doc["rows"][r].get("residuals")]
    if res:
        lines += ["### the cause: twin residual RMS (network units, last checkpoint) of the cross-fitted runs "
                  "(val: the clean training-renderer DRRs, not the honest views)", "",
                  "| row | step | train: all-data twin (in-sample) | train: own fold twin (out-of-fold) | ratio | val: all-data twin | val: own-fold twin | val: fold average |",
                  "|---|---|---|---|---|---|---|---|"]
        for r, d in res:
            tr, va = d["train"], d["val"]
            lines.append(f"| {r} | {d['step']} | {tr['all_data_twin']:.4f} | {tr['fold_twin']:.4f} | {tr['oof_over_in_sample']:.3f} | "
                         f"{va['all_data_twin']:.4f} | {va['fold_twin']:.4f} | {va['fold_average']:.4f} |")
        lines.append("")
    c = doc.get("ceiling", {}).get("metrics", {})
    if c:
        lines.append(f"Ceiling (stage 1, the gate's {doc['ceiling'].get('phantoms')} re-drawn phantoms, cached): "
                     f"{c['psnr_window_db']['ceiling_db']:.2f} dB whole-grid, {c['psnr_window_body_db']['ceiling_db']:.2f} dB body.")
    a.out.write_text("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
