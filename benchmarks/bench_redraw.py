"""The model's std map against the generator's re-draw std (issue 21 item 2), per stage, on the
demo test phantoms.

    python benchmarks/bench_redraw.py --train-dir DIR --processed DIR --calibration-dir DIR
        [--stages 1 2] [--split test] [--draws 8] [--samples K] [--max-volumes N]
        [--out benchmarks/results/redraw_cpu]

Per test phantom and stage k:

* the model: the trained cascade 1…k (``eval.model_file``, the model's own params) run on the
  case's stored X-rays of the evaluation protocol (honest views under ``eval.protocol: honest``)
  with K = ``eval.samples`` of the stage and the evaluator's seeds (``case_seed`` of the case's
  position in the split) — :func:`xct_core.inference.reconstruct` ``(keep_samples=True)``, the
  call the evaluator makes; its std map raw and σ-recalibrated (``s`` of the stage's
  ``calibration.json``, fitted on val by the evaluate step);
* the generator: :func:`xct_core.ceiling.redraw_std`, the per-voxel std over ``--draws``
  seeded re-draws (the gate ceiling's seed) of the non-identifiable parts of THE SAME phantom
  (``phantom_NNNN`` = index NNNN of ``data.synth``), resampled onto the stage grid as
  preprocess does. A check per case: the non-re-drawn phantom resampled the same way equals
  the stored target (max |Δ| ≤ 1 HU: the NIfTI's rounding).

Inside the evaluator's body mask (:func:`xct_core.metrics.body_mask` of the target): the
ratio of body-mean std (model / re-draw) and of RMS std; Spearman and Pearson correlation of
the two maps; the same correlations of the point estimate's |error| (``eval.point_estimate``)
with the re-draw std; and the irreducible share of the model's MSE = mean re-draw variance /
MSE (the re-drawn parts' MMSE, as the ceiling defines it). Patient means over the split.

What the re-draw std is and is not: the exact posterior spread of the RE-DRAWN parts only,
given everything else about the patient (outline, organs, bones, HU of every tissue). It is a
LOWER bound on the posterior spread given the X-rays alone; a model also carries its own
estimation error. A calibrated model's std should therefore be at least the re-draw std
(ratio ≥ 1) and need not track it voxel by voxel where the identifiable anatomy dominates.

Writes ``OUT.json``, ``OUT.md`` and ``OUT.png`` (a coronal slice of truth, model std
(recalibrated) and re-draw std of the first case, per stage).
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import math
import os
import platform
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from components.model_uri import resolve_model  # noqa: E402
from xct_core import calibration as cal  # noqa: E402
from xct_core.ceiling import phantom_on_grids, redraw_std  # noqa: E402
from xct_core.config import Params  # noqa: E402
from xct_core.diffusion import Sampler  # noqa: E402
from xct_core.evaluation import EvalProtocol, dataset_cases, load_cascade  # noqa: E402
from xct_core.inference import reconstruct  # noqa: E402
from xct_core.jsondoc import read_json_doc  # noqa: E402
from xct_core.metrics import body_mask  # noqa: E402
from xct_core.preprocess import read_manifest  # noqa: E402
from xct_core.seeding import case_seed  # noqa: E402

_PHANTOM = re.compile(r"^phantom_(\d+)$")


def phantom_index(case_id: str) -> int:
    m = _PHANTOM.match(case_id)
    if m is None:
        raise SystemExit(f"bench_redraw: case {case_id!r} is not a generator phantom (phantom_NNNN): no re-draw")
    return int(m.group(1))


def pearson(a: np.ndarray, b: np.ndarray, mask: np.ndarray) -> float:
    x, y = np.asarray(a, np.float64)[mask], np.asarray(b, np.float64)[mask]
    if x.size < 3 or np.ptp(x) == 0 or np.ptp(y) == 0:
        return math.nan
    return float(np.corrcoef(x, y)[0, 1])


def compare(std_model: np.ndarray, std_redraw: np.ndarray, abs_err: np.ndarray, mask: np.ndarray) -> dict[str, float]:
    """The per-case numbers of the module docstring (body voxels ``mask``)."""
    m, r, e = (np.asarray(v, np.float64)[mask] for v in (std_model, std_redraw, abs_err))
    return {
        "model_std_body_mean_hu": float(m.mean()), "redraw_std_body_mean_hu": float(r.mean()),
        "ratio_mean": float(m.mean() / r.mean()) if r.mean() > 0 else math.nan,
        "ratio_rms": float(math.sqrt((m**2).mean() / (r**2).mean())) if (r**2).mean() > 0 else math.nan,
        "spearman_std": cal.spearman_std_error(std_model, std_redraw, mask),
        "pearson_std": pearson(std_model, std_redraw, mask),
        "spearman_abs_err": cal.spearman_std_error(std_redraw, abs_err, mask),
        "pearson_abs_err": pearson(std_redraw, abs_err, mask),
        "rmse_body_hu": float(math.sqrt((e**2).mean())),
        "irreducible_mse_share": float((r**2).mean() / (e**2).mean()) if (e**2).mean() > 0 else math.nan,
    }


def _mean(rows: list[dict[str, float]]) -> dict[str, float]:
    return {k: float(np.nanmean([r[k] for r in rows])) for k in rows[0] if isinstance(rows[0][k], float)}


def run_stage(params: Params, processed: Path, train_dir: Path, k: int, calib: cal.Calibration, split: str, draws: int,
              samples: int | None, max_volumes: int, protocol: EvalProtocol, seed: int,
              redraws: dict[int, dict[int, Any]], ks: list[int]) -> dict[str, Any]:
    """Stage ``k`` on ``split`` (module docstring); ``redraws``: phantom index → {stage: (re-draw
    std, target check)}, filled for every stage in ``ks`` at once (one synthesis serves all grids)."""
    import torch

    st = params.stage(k)
    K = int(samples or params.eval.samples_for(st.name))
    ids = list(read_manifest(processed)["splits"].get(split) or [])[: max_volumes or None]
    stages = load_cascade(train_dir, k, params)
    sampler = Sampler.from_params(params)
    point = params.point_estimate_for(k)
    rows: list[dict[str, Any]] = []
    picture: dict[str, np.ndarray] = {}
    t_model = t_redraw = 0.0
    for case in dataset_cases(processed, k, split, ids, xrays=protocol.xrays):
        t0 = time.monotonic()
        rec = reconstruct(stages, params, case.frontal, case.lateral, sampler=sampler, isocenter=case.isocenter,
                          samples=K, seed=case_seed(int(params.seed), case.index), device=torch.device("cpu"),
                          keep_samples=True)
        t1 = time.monotonic()
        idx = phantom_index(case.id)
        if idx not in redraws:
            stds = redraw_std(params, idx, ks, draws=draws, seed=seed)
            plain = phantom_on_grids(params, idx, ks)
            redraws[idx] = {j: (stds[j], plain[j]) for j in ks}
        rd, plain_k = redraws[idx][k]
        truth_check = float(np.abs(plain_k.astype(np.float64) - case.target_hu).max())
        t2 = time.monotonic()
        t_model, t_redraw = t_model + t1 - t0, t_redraw + t2 - t1
        y = case.target_hu
        mask = body_mask(y, protocol.body_hu).cpu().numpy().reshape(y.shape)
        assert rec.std_hu is not None
        abs_err = np.abs(rec.point_hu(point).astype(np.float64) - y)
        raw = compare(rec.std_hu, rd, abs_err, mask)
        recal = compare(calib.std(rec.std_hu), rd, abs_err, mask)
        rows.append({"id": case.id, "phantom_index": idx, "target_max_abs_diff_hu": truth_check, "raw": raw,
                     "recal": {key: recal[key] for key in ("model_std_body_mean_hu", "ratio_mean", "ratio_rms")}})
        print(f"stage{k} {case.id}: ratio raw {raw['ratio_mean']:.2f} recal {recal['ratio_mean']:.2f}, "
              f"spearman {raw['spearman_std']:.3f}, |err| spearman {raw['spearman_abs_err']:.3f} "
              f"({t1 - t0:.1f} + {t2 - t1:.1f} s)", file=sys.stderr, flush=True)
        if not picture:
            picture = {"truth": y, "model_std": calib.std(rec.std_hu), "redraw_std": rd, "id": case.id}
    return {"K": K, "n": len(rows), "point_estimate": point, "sigma_scale": calib.sigma_scale, "calibration_k": calib.samples, "draws": draws,
            "redraw_seed": seed, "grid": f"{st.size}³ @ {st.spacing_mm:g} mm",
            "raw": _mean([r["raw"] for r in rows]), "recal": _mean([r["recal"] for r in rows]),
            "max_target_diff_hu": float(max(r["target_max_abs_diff_hu"] for r in rows)),
            "seconds": {"model": round(t_model, 1), "redraw": round(t_redraw, 1)}, "cases": rows,
            "_picture": picture}


def figure(pictures: dict[str, dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(pictures), 3, figsize=(10.5, 3.4 * len(pictures)), squeeze=False)
    for row, (name, pic) in zip(axes, pictures.items()):
        j = pic["truth"].shape[1] // 2  # coronal slice through the middle (RAS+: x, y, z)
        sl = {key: np.asarray(pic[key])[:, j, :].T for key in ("truth", "model_std", "redraw_std")}
        vmax = float(np.percentile(np.concatenate([sl["model_std"].ravel(), sl["redraw_std"].ravel()]), 99))
        im = row[0].imshow(sl["truth"], cmap="gray", vmin=-1000, vmax=600, origin="lower")
        row[0].set_title(f"{name} {pic['id']}: truth (HU)")
        fig.colorbar(im, ax=row[0], fraction=0.046)
        for ax, key, title in ((row[1], "model_std", "model std, σ-recalibrated (HU)"),
                               (row[2], "redraw_std", "generator re-draw std (HU)")):
            im = ax.imshow(sl[key], cmap="magma", vmin=0, vmax=vmax, origin="lower")
            ax.set_title(title)
            fig.colorbar(im, ax=ax, fraction=0.046)
        for ax in row:
            ax.set_xticks([])
            ax.set_yticks([])
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def markdown(doc: dict[str, Any]) -> str:
    f = lambda v, nd=3: "—" if v is None or not math.isfinite(v) else f"{v:.{nd}f}"  # noqa: E731
    lines = ["# The model's std map vs the generator's re-draw std (issue 21, item 2) — CPU", "",
             f"Machine: {doc['machine']}; load average at start {doc['load_at_start']} (**loaded**: other sessions "
             f"shared the 2 cores); {doc['when']}; commit {doc['commit']}.", "",
             "Command (worktree root, `PYTHONPATH=$PWD`):", "", "```", doc["command"], "```", "",
             f"Model: the demo4 fresh-clone `make demo` of main@24a8a20, `{doc['model_file']}` of each stage, its own "
             f"params; split **{doc['split']}** ({doc['protocol']} views); σ-recalibration `s` from "
             "`reports/eval/stageK/calibration.json` (fitted on val by the evaluate step). Definitions: "
             "benchmarks/bench_redraw.py docstring (body voxels, patient means).", "",
             "**Caveat.** The re-draw std is the exact posterior spread of the re-drawn parts only (abdominal "
             "fat/bowel field, fine texture, vessel tree below the hila, image noise) given everything else about "
             "the patient. It is a **lower bound** on the posterior spread given the two X-rays alone; the model's "
             "std also has to carry its own estimation error of the identifiable anatomy. So a ratio ≥ 1 is "
             "expected of a calibrated model, a ratio < 1 means the model is narrower than even the irreducible "
             "part, and a weak voxel correlation is not by itself a defect where estimation error dominates.", "",
             "| stage | grid | K | re-draws | model std / re-draw std (body mean): raw | σ-recal. (s) | RMS ratio "
             "raw / recal. | Spearman(model std, re-draw std) | Pearson | Spearman(abs error, re-draw std) | "
             "Pearson | irreducible share of the MSE | n |", "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, r in doc["stages"].items():
        raw, rc = r["raw"], r["recal"]
        lines.append(
            f"| {name} | {r['grid']} | {r['K']} | {r['draws']} | {f(raw['ratio_mean'], 2)} | "
            f"{f(rc['ratio_mean'], 2)} ({f(r['sigma_scale'])}) | {f(raw['ratio_rms'], 2)} / {f(rc['ratio_rms'], 2)} | "
            f"{f(raw['spearman_std'])} | {f(raw['pearson_std'])} | {f(raw['spearman_abs_err'])} | "
            f"{f(raw['pearson_abs_err'])} | {f(raw['irreducible_mse_share'])} | {r['n']} |")
    lines += ["", "Body means (HU): "
              + "; ".join(f"{n}: model std raw {f(r['raw']['model_std_body_mean_hu'], 1)}, recal. "
                          f"{f(r['recal']['model_std_body_mean_hu'], 1)}, re-draw std "
                          f"{f(r['raw']['redraw_std_body_mean_hu'], 1)}, point-estimate RMSE "
                          f"{f(r['raw']['rmse_body_hu'], 1)}; target check max |Δ| {f(r['max_target_diff_hu'], 0)} HU; "
                          f"{r['seconds']['model']} s model, {r['seconds']['redraw']} s re-draws"
                          for n, r in doc["stages"].items()) + ".", "",
              "`s` is the stage's shipped σ-recalibration, fitted at the stage's K (`calibration_k` in the JSON); "
              "on a row run at another K it is applied as is (an approximation). Re-draw seconds are counted once "
              "per phantom (the maps of every stage come from the same syntheses).", "",
              f"Figure: `{Path(doc['figure']).name}` (coronal mid-slice of the first case per stage: truth, model std "
              "σ-recalibrated, re-draw std on one colour scale per row).", ""]
    return "\n".join(lines)


def run_start(train_dir: Path) -> tuple[Params, EvalProtocol, dict[str, Any]]:
    """One torch thread; the trained model's params and evaluation protocol; the run's record
    (machine, load at start, command, time, commit, protocol) — shared with bench_k."""
    import torch

    torch.set_num_threads(1)
    params = resolve_model(str(train_dir)).params
    protocol = EvalProtocol.from_params(params)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True,
                            text=True).stdout.strip()
    doc: dict[str, Any] = {
        "machine": f"{platform.node()}, {os.cpu_count()} CPUs (shared), torch {torch.__version__}, 1 thread",
        "load_at_start": " ".join(f"{x:.2f}" for x in os.getloadavg()), "command": " ".join(["python", *sys.argv]),
        "when": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"), "commit": commit,
        "protocol": protocol.label}
    return params, protocol, doc


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--train-dir", type=Path, required=True)
    ap.add_argument("--processed", type=Path, required=True)
    ap.add_argument("--calibration-dir", type=Path, required=True, help="reports/eval (stageK/calibration.json)")
    ap.add_argument("--stages", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--split", default="test")
    ap.add_argument("--draws", type=int, default=8)
    ap.add_argument("--samples", type=int, default=0, help="K (default: eval.samples of the stage)")
    ap.add_argument("--also-samples", type=int, default=0,
                    help="also run every stage whose K differs with this K (a less noisy std map)")
    ap.add_argument("--max-volumes", type=int, default=0)
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "redraw_cpu")
    a = ap.parse_args(argv)
    params, protocol, doc = run_start(a.train_dir)
    doc.update({"split": a.split, "model_file": params.eval.model_file, "figure": str(a.out) + ".png", "stages": {}})
    seed = int(params.stage(1).gate.ceiling.seed)
    pictures: dict[str, dict[str, Any]] = {}
    redraws: dict[int, dict[int, Any]] = {}
    a.out.parent.mkdir(parents=True, exist_ok=True)
    runs = [(k, a.samples or params.eval.samples_for(params.stage(k).name), f"stage{k}") for k in a.stages]
    runs += [(k, a.also_samples, f"stage{k} (K = {a.also_samples})") for k, kk, _ in list(runs)
             if a.also_samples and a.also_samples != kk]
    for k, kk, name in runs:
        cpath = a.calibration_dir / f"stage{k}" / "calibration.json"
        calib = cal.Calibration.from_json(read_json_doc(cpath, "calibration"), str(cpath))
        res = run_stage(params, a.processed, a.train_dir, k, calib, a.split, a.draws, kk, a.max_volumes,
                        protocol, seed, redraws, list(a.stages))
        pic = res.pop("_picture")
        if name == f"stage{k}":
            pictures[name] = pic
        doc["stages"][name] = res
        # after every run: partial results survive a stopped run
        Path(str(a.out) + ".json").write_text(json.dumps(doc, indent=1, default=float) + "\n")
        Path(str(a.out) + ".md").write_text(markdown(doc))
        figure(pictures, Path(str(a.out) + ".png"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
