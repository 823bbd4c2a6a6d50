"""Evaluation of the cascade up to stage K on a held-out split (pure torch/numpy).

What is measured
----------------
Stage K is evaluated **as in production**: stages 1 … K run in sequence with the shared
sampler (:func:`xct_core.cascade.sample_cascade` → :func:`xct_core.diffusion.ddim_sample`),
stage k>1 conditioned on stage k−1's *samples* (never on the ground truth), with
``eval.sample_steps`` DDIM steps (null: ``diffusion.sample_steps``) and a fixed noise seed
per volume derived from the top-level ``seed`` — two runs on the same models and data give
the same numbers. The stage models are the exported ``outputs/train/models/stage{k}/{best|final}.pt``
(``eval.model_file``; layout: :mod:`xct_core.training`), loaded with ``weights_only=True``.

Per volume (the demo data and the LIDC ids have one volume per patient, so a row is a
patient): :func:`xct_core.metrics.volume_metrics_per_sample` of the sample against the
stage-K target, with the target's **full-range HU** (stored un-windowed by the preprocess
step) for the HU metrics, reprojection PSNR/SSIM of the sample's DRRs against the input
X-rays, and ``target_std`` (std of the windowed target, the reference of the gates'
not-collapsed check). Two baselines on the same volumes, same metric code:

* ``baseline_*`` — the **mean volume**: the voxel-wise mean HU of the TRAIN split's stage-K
  volumes, predicted for every test volume (what a collapsed model scores);
* ``direct_*`` — the direct-regression twin ``models/stageK/direct.pt`` (one forward pass,
  fed by the same earlier-stage samples), only when that file exists.

The summary (:attr:`EvalResult.metrics`) holds patient means (``nan_count``: the total),
``n_patients``, ``sample_steps``, ``seed``, ``split`` and ``test_ids_hash`` (sha256 of the
sorted ids: models are only compared on the same split).
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from xct_core.cascade import sample_cascade
from xct_core.checkpoint import load_stage_model, read_stage_model
from xct_core.config import Params
from xct_core.data import XrayCTDataset
from xct_core.diffusion import CosineSchedule
from xct_core.errors import ConfigError, InputError
from xct_core.metrics import dynamic_range, metric_kwargs, volume_metrics_per_sample
from xct_core.preprocess import read_manifest, stage_file
from xct_core.stats import json_text, write_text_atomic

__all__ = [
    "METRICS_JSON",
    "MONTAGE_PNG",
    "PER_PATIENT_CSV",
    "EvalResult",
    "eval_sample_steps",
    "evaluate_stage",
    "load_cascade",
    "mean_volume_baseline",
    "read_eval_metrics",
    "split_ids_hash",
    "stage_model_path",
    "write_eval_reports",
]

METRICS_JSON = "metrics.json"
PER_PATIENT_CSV = "per_patient.csv"
MONTAGE_PNG = "montage.png"


def stage_model_path(train_dir: str | Path, k: int, which: str = "best") -> Path:
    """``train_dir/models/stage{k}/{which}.pt`` (``which``: best | final | direct)."""
    return Path(train_dir) / "models" / f"stage{k}" / f"{which}.pt"


def eval_sample_steps(params: Params) -> int:
    """DDIM steps of the evaluation sampler: ``eval.sample_steps`` or ``diffusion.sample_steps``."""
    return int(params.eval.sample_steps or params.diffusion.sample_steps)


def split_ids_hash(ids: Sequence[str]) -> str:
    """Order-independent identity of a split: sha256 (16 hex) of the sorted ids, one a line."""
    return hashlib.sha256("\n".join(sorted(ids)).encode()).hexdigest()[:16]


def load_cascade(
    train_dir: str | Path,
    upto: int,
    params: Params,
    *,
    which: str | None = None,
    device: str | torch.device = "cpu",
) -> list[nn.Module]:
    """Frozen stage networks 1 … ``upto`` from ``train_dir/models`` (``which`` default
    ``params.eval.model_file``). Each stage's grid must match ``params.stages``."""
    which = which or params.eval.model_file
    if not 1 <= upto <= len(params.stages):
        raise ConfigError(f"stage {upto} not in params.stages (1…{len(params.stages)})")
    nets = []
    for k in range(1, upto + 1):
        path = stage_model_path(train_dir, k, which)
        net = load_stage_model(path, device)
        want = list(params.stages.values())[k - 1].size
        if int(getattr(net, "size", want)) != want:
            raise InputError(path, f"stage {k} grid {net.size}³ does not match params ({want}³)")
        nets.append(net)
    return nets


def _hu_volume(processed: Path, k: int, vid: str) -> np.ndarray:
    path = processed / stage_file(k, vid)
    try:
        arr = np.load(path, mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError) as e:
        raise InputError(path, f"unreadable stage volume ({e})") from None
    return np.asarray(arr, dtype=np.float32)


def mean_volume_baseline(processed_dir: str | Path, k: int, split: str = "train") -> np.ndarray:
    """Voxel-wise mean (float32 HU, full range) of ``split``'s stage-``k`` volumes."""
    root = Path(processed_dir)
    ids = list(read_manifest(root)["splits"].get(split) or [])
    if not ids:
        raise InputError(root / "manifest.json", f"split {split!r} is empty: no mean-volume baseline")
    acc: np.ndarray | None = None
    for vid in ids:
        v = _hu_volume(root, k, vid).astype(np.float64)
        acc = v if acc is None else acc + v
    assert acc is not None
    return (acc / len(ids)).astype(np.float32)


@dataclass
class EvalResult:
    """One stage's evaluation: per-volume rows, the summary, and volumes for the montage."""

    stage: int
    split: str
    ids: list[str]
    rows: list[dict[str, Any]]
    metrics: dict[str, Any]
    #: HU volumes of the first volume (target, diffusion, direct, mean-volume baseline, previous stage)
    montage: dict[str, np.ndarray] = field(default_factory=dict)
    spacing: dict[str, tuple[float, float, float]] = field(default_factory=dict)


def _summary(rows: list[dict[str, Any]]) -> dict[str, float]:
    out: dict[str, float] = {}
    for key in rows[0]:
        if key == "id":
            continue
        vals = np.array([r[key] for r in rows], dtype=np.float64)
        out[key] = float(vals.sum() if key.endswith("nan_count") else vals.mean())
    return out


def _seed(base: int, idx: int) -> int:
    return (int(base) * 1_000_003 + 7919 * int(idx) + 12345) % (2**63 - 1)


@torch.no_grad()
def evaluate_stage(
    params: Params,
    processed_dir: str | Path,
    train_dir: str | Path,
    k: int,
    *,
    split: str = "test",
    steps: int | None = None,
    device: str | torch.device = "cpu",
    reprojection: bool = True,
    log: Any = None,
) -> EvalResult:
    """Run the cascade 1 … ``k`` on ``split`` and measure stage ``k`` (module docstring).

    ``steps`` overrides :func:`eval_sample_steps`. Raises :class:`InputError` for a missing
    model or data file, or an empty split.
    """
    from xct_core.losses import PhysicsLoss

    say = log or (lambda _m: None)
    root = Path(processed_dir)
    window = params.hu.get_window()
    n_steps = int(steps or eval_sample_steps(params))
    ds = XrayCTDataset(root, k, split, window)
    ids = list(ds.ids)
    if params.eval.max_volumes:
        ids = ids[: params.eval.max_volumes]
    if not ids:
        raise InputError(root / "manifest.json", f"split {split!r} is empty: nothing to evaluate")
    dev = torch.device(device)
    stages = load_cascade(train_dir, k, params, device=dev)
    direct_path = stage_model_path(train_dir, k, "direct")
    direct = load_stage_model(direct_path, dev) if direct_path.is_file() else None
    schedule = CosineSchedule.from_params(params.diffusion)
    physics = PhysicsLoss.from_params(params, k).to(dev) if reprojection else None
    kw = metric_kwargs(params.eval)
    base_hu = mean_volume_baseline(root, k, "train")
    base_norm = torch.from_numpy(window.forward(base_hu)).float()

    rows: list[dict[str, Any]] = []
    montage: dict[str, np.ndarray] = {}
    for idx, vid in enumerate(ids):
        item = ds[ds.ids.index(vid)]
        x0 = item["x0"].unsqueeze(0).to(dev)  # [1,1,S,S,S] windowed
        t_hu = torch.from_numpy(_hu_volume(root, k, vid)).unsqueeze(0)
        f = item["frontal"].unsqueeze(0).to(dev)
        lat = item["lateral"].unsqueeze(0).to(dev)
        row: dict[str, Any] = {"id": vid}
        preds: dict[str, torch.Tensor] = {}
        gen = torch.Generator(device=dev).manual_seed(_seed(params.seed, idx))
        outs = sample_cascade(stages, f, lat, schedule=schedule, steps=n_steps, generator=gen)
        preds[""] = outs[-1].float()
        if direct is not None:
            gen = torch.Generator(device=dev).manual_seed(_seed(params.seed, idx))
            d_outs = sample_cascade([*stages[:-1], direct], f, lat, schedule=schedule, steps=n_steps, generator=gen)
            preds["direct_"] = d_outs[-1].float()
        preds["baseline_"] = base_norm.to(dev)[None, None]
        for prefix, pred in preds.items():
            views = None
            if physics is not None:
                proj = physics.project(pred) * physics.scale
                views = {"frontal": (proj[:, 0], f[:, 0]), "lateral": (proj[:, 1], lat[:, 0])}
            m = volume_metrics_per_sample(pred[:, 0].cpu(), x0[:, 0].cpu(), window, target_hu=t_hu,
                                          views=None if views is None else {
                                              n: (a.cpu(), b.cpu()) for n, (a, b) in views.items()}, **kw)[0]
            row.update({f"{prefix}{key}": v for key, v in m.items()})
        row["target_std"] = float(dynamic_range(x0[0, 0].cpu())[1])
        rows.append(row)
        say(f"stage{k} {split} {vid}: PSNR(window) {row['psnr_window_db']:.2f} dB, "
            f"SSIM {row['ssim_window']:.3f} (mean volume {row['baseline_psnr_window_db']:.2f} dB)")
        if idx == 0:
            montage["target"] = t_hu[0].numpy()
            montage["diffusion"] = window.inverse(preds[""][0, 0].cpu().numpy())
            if "direct_" in preds:
                montage["direct"] = window.inverse(preds["direct_"][0, 0].cpu().numpy())
            montage["mean volume"] = base_hu
            if len(outs) > 1:
                montage["previous stage"] = window.inverse(outs[-2][0, 0].cpu().numpy())

    metrics: dict[str, Any] = _summary(rows)
    metrics.update({
        "stage": k,
        "split": split,
        "n_patients": len(rows),
        "sample_steps": n_steps,
        "seed": int(params.seed),
        "model_file": params.eval.model_file,
        "has_direct": direct is not None,
        "test_ids_hash": split_ids_hash(ids),
    })
    cfgs = list(params.stages.values())
    sp = {n: (cfgs[k - 1].fov_mm / cfgs[k - 1].size,) * 3 for n in montage}
    if "previous stage" in montage:
        sp["previous stage"] = (cfgs[k - 2].fov_mm / cfgs[k - 2].size,) * 3
    return EvalResult(stage=k, split=split, ids=ids, rows=rows, metrics=metrics, montage=montage, spacing=sp)


def _csv_text(rows: Sequence[Mapping[str, Any]]) -> str:
    cols = ["id"] + sorted({c for r in rows for c in r} - {"id"})
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=cols, lineterminator="\n")
    w.writeheader()
    for r in rows:
        w.writerow({c: ("" if isinstance(r.get(c), float) and not math.isfinite(r[c]) else r.get(c, "")) for c in cols})
    return buf.getvalue()


def write_eval_reports(result: EvalResult, out_dir: str | Path, window: Any = None) -> dict[str, Path]:
    """Write ``metrics.json`` (summary; NaN → null), ``per_patient.csv`` (one row per volume,
    sorted columns) and ``montage.png`` (first volume: target, samples, baselines; the
    training window and a wide [-1024, 1024] HU window) into ``out_dir``, atomically."""
    from xct_core.viz import save_slice_montage

    out = Path(out_dir)
    paths = {
        "metrics": write_text_atomic(out / METRICS_JSON, json_text(result.metrics)),
        "per_patient": write_text_atomic(out / PER_PATIENT_CSV, _csv_text(result.rows)),
    }
    if result.montage:
        windows = [window, (-1024.0, 1024.0)] if window is not None else ["soft_tissue", (-1024.0, 1024.0)]
        m = result.metrics
        title = (f"stage{result.stage} {result.split} {result.ids[0]}: PSNR(window) {m.get('psnr_window_db', math.nan):.2f} dB "
                 f"(mean volume {m.get('baseline_psnr_window_db', math.nan):.2f} dB), {m.get('sample_steps')} DDIM steps")
        paths["montage"] = save_slice_montage(result.montage, out / MONTAGE_PNG, windows, spacing=result.spacing, title=title)
    return paths


def read_eval_metrics(path: str | Path) -> dict[str, Any]:
    """A ``metrics.json`` written by :func:`write_eval_reports` (:class:`InputError` when
    missing or not a JSON object)."""
    p = Path(path)
    try:
        doc = json.loads(p.read_text())
    except FileNotFoundError:
        raise InputError(p, "metrics file not found (run the evaluate step first)") from None
    except (OSError, ValueError) as e:
        raise InputError(p, f"unreadable metrics file ({e})") from None
    if not isinstance(doc, dict):
        raise InputError(p, "metrics file must hold a JSON object")
    return doc


def stage_model_info(path: str | Path) -> dict[str, Any]:
    """Stage index, name, mode and step recorded in an exported stage model."""
    blob = read_stage_model(path)
    return {"stage": int(blob["stage"]), "name": blob["name"], "mode": blob["mode"], "step": int(blob["step"])}
