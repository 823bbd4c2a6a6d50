"""Engine-agnostic training of one cascade stage (pure torch; no Ray, no MLflow).

:func:`train_stage` is the loop. An engine binds it through :class:`TrainHooks`: a
``report(metrics, checkpoint_dir)`` callback (every rank, same steps), an optional model /
data-loader preparation (DDP wrapping, device placement), a progress-bar factory and an
artifact logger. ``components/train.py`` binds it to Ray Train + MLflow; a bare GPU box
runs it directly::

    python -m xct_core.training --stage 1 --processed data/processed --out outputs/train --params params.yaml

What one step does
------------------
Batch ``batch_size`` volumes per worker (data sharded per worker by
:class:`ShardSampler`), draw ``t`` and noise from a generator seeded by
``(seed, rank, step)``, :func:`xct_core.losses.diffusion_loss` (v-prediction, + physics
term when ``physics_weight > 0``; stage k>1 conditions on the ground-truth low-res volume,
noise-augmented) under bf16 autocast on GPU, backward, unscale (fp16) and clip the global
gradient norm, check loss and gradient are finite on every rank, AdamW step, EMA update.
LR: linear warmup then cosine decay (:func:`lr_factor`).

Validation (rank 0, every ``val_every`` steps and at the end) samples with the shared
cascade sampler (:func:`xct_core.cascade.sample_cascade` → :func:`xct_core.diffusion.ddim_sample`)
using the EMA weights of this stage and the frozen, exported earlier stages, on the first
``val_max_volumes`` ids of the val split (never augmented), with a fixed noise seed so
successive validations are comparable. Metrics: :func:`xct_core.metrics.volume_metrics`
(+ reprojection of the reconstruction vs the input X-rays; + the direct-regression twin
when ``train.direct_baseline``).

Layout of ``out_dir`` (``params.train.out_dir``; K = stage index)
-----------------------------------------------------------------
::

    checkpoints/stage{K}/step_{N:08d}/state.pt   full training state (resume), last
                                                 ``keep_last`` + the best one kept
    models/stage{K}/final.pt                     EMA weights at the last step  ┐ read by
    models/stage{K}/best.pt                      EMA weights at the best val   ┘ evaluation /
    models/stage{K}/direct.pt                    direct-regression twin (when configured)
    plots/stage{K}/train.csv, val.csv            curves (step-indexed) for ``dvc plots``
    metrics/stage{K}.json                        summary for ``dvc metrics``
    val/stage{K}/step_{N:08d}.png                validation montages (axial/coronal/sagittal)

Exported models: :func:`xct_core.checkpoint.export_stage_model` (self-contained: EMA
``state_dict`` + the full params as JSON; rebuild with
:func:`xct_core.checkpoint.load_stage_model`). Everything loads with
``torch.load(weights_only=True)``.

Resume: a run starts from the newest checkpoint among ``resume_from`` (e.g. the engine's
checkpoint) and ``checkpoints/stage{K}/``; the step count, optimizer, EMA, data position
(epoch + offset), curves and best-so-far continue. Per-step randomness is a function of
``(seed, rank, step)``, so a resumed run reproduces the uninterrupted one (to float
rounding; tests/test_training.py checks it on CPU). Raising ``train.steps`` later continues
from the last step (the LR schedule is recomputed for the new total); a checkpoint of a
different network (stage/model/diffusion/DRR/HU params) is refused.

Non-finite loss or gradient: the run stops before the optimizer step with
:class:`NonFiniteError` naming the step; no checkpoint is written for it, so the last good
one stays the newest.
"""

from __future__ import annotations

import argparse
import copy
import csv
import io
import json
import math
import os
import random
import resource
import shutil
import sys
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler

from xct_core.cascade import sample_cascade
from xct_core.checkpoint import (
    STATE_FORMAT,
    capture_rng,
    export_stage_model,
    latest_checkpoint,
    list_checkpoints,
    load_stage_model,
    load_state,
    prune_checkpoints,
    read_stage_model,
    restore_rng,
    save_state,
    step_dir_name,
)
from xct_core.config import Params, load_params
from xct_core.diffusion import CosineSchedule
from xct_core.errors import ConfigError, InputError, XctError
from xct_core.losses import PhysicsLoss, diffusion_loss, direct_loss
from xct_core.metrics import metric_kwargs, volume_metrics_per_sample
from xct_core.models import build_stage, stage_config, unwrap

__all__ = [
    "FaultPlan",
    "NonFiniteError",
    "RunLayout",
    "ShardSampler",
    "TrainHooks",
    "TrainResult",
    "TrainingFailed",
    "lr_factor",
    "main",
    "preflight",
    "stage_steps",
    "train_stage",
]

ReportFn = Callable[[dict[str, float], "str | None"], None]


# --------------------------------------------------------------------------- errors


class TrainingFailed(XctError):
    """Training stopped for a reason the user must act on (the message says which)."""

    exit_code = 1


class NonFiniteError(TrainingFailed):
    """A non-finite loss or gradient; ``step`` is the (1-based) step that produced it."""

    def __init__(self, message: str, step: int, last_good: str | None) -> None:
        super().__init__(message)
        self.step = step
        self.last_good = last_good


# --------------------------------------------------------------------------- layout


@dataclass(frozen=True)
class RunLayout:
    """Paths of one stage's outputs under ``out_dir`` (see the module docstring)."""

    out_dir: Path
    stage: int

    @property
    def checkpoints(self) -> Path:
        return self.out_dir / "checkpoints" / f"stage{self.stage}"

    def model(self, which: str = "final", stage: int | None = None) -> Path:
        """``models/stage{k}/{which}.pt`` (``final`` | ``best`` | ``direct``)."""
        return self.out_dir / "models" / f"stage{self.stage if stage is None else stage}" / f"{which}.pt"

    @property
    def plots(self) -> Path:
        return self.out_dir / "plots" / f"stage{self.stage}"

    @property
    def metrics_file(self) -> Path:
        return self.out_dir / "metrics" / f"stage{self.stage}.json"

    @property
    def montages(self) -> Path:
        return self.out_dir / "val" / f"stage{self.stage}"

    def clear(self) -> None:
        """Delete this stage's checkpoints, models, curves, metrics and montages (fresh start)."""
        for p in (self.checkpoints, self.model().parent, self.plots, self.montages):
            shutil.rmtree(p, ignore_errors=True)
        self.metrics_file.unlink(missing_ok=True)


# --------------------------------------------------------------------------- hooks, faults, result


@dataclass
class TrainHooks:
    """How an engine plugs into :func:`train_stage`; every field is optional.

    Attributes:
        report: ``report(metrics, checkpoint_dir)``, called by EVERY rank at the same steps
            (log, checkpoint, validation, end — Ray Train requires equal call counts).
            ``metrics`` is flat ``{name: float}`` with ``step``; rank 0's dict is complete
            (validation metrics only exist there). ``checkpoint_dir`` is the directory just
            written (rank 0, checkpoint steps) else ``None``.
        log_artifact: ``log_artifact(local_path, artifact_subdir)`` — rank 0 only (montages,
            exported models).
        prepare_model: wrap/move the model (e.g. ``ray.train.torch.prepare_model``: device +
            DDP). Default: ``model.to(device)``.
        prepare_loader: wrap the training DataLoader (e.g. ``prepare_data_loader``: device
            transfer; our :class:`ShardSampler` is a ``DistributedSampler`` so it is kept).
        progress: tqdm-compatible factory ``(total=, initial=, desc=)`` with ``update(n)``,
            ``set_description(s)`` and ``close()``; default tqdm on rank 0.
    """

    report: ReportFn | None = None
    log_artifact: Callable[[str, str], None] | None = None
    prepare_model: Callable[[nn.Module], nn.Module] | None = None
    prepare_loader: Callable[[DataLoader], DataLoader] | None = None
    progress: Callable[..., Any] | None = None


@dataclass(frozen=True)
class FaultPlan:
    """Deliberate faults for resilience tests (chaos testing); all off by default.

    Attributes:
        nan_at_step: rank 0 multiplies the loss of this (1-based) step by NaN.
        crash_at_step: ``crash_rank`` kills its own process (SIGKILL) at the start of this
            step, once per out dir (a marker file keeps the retried run from crashing again).
        slow_step_s: sleep this long after every step (to interrupt a run mid-way).
    """

    nan_at_step: int | None = None
    crash_at_step: int | None = None
    crash_rank: int = 0
    slow_step_s: float = 0.0

    @classmethod
    def from_json(cls, text: str | None) -> FaultPlan:
        """From a JSON object (e.g. the ``XCT_TRAIN_FAULTS`` environment variable)."""
        if not text:
            return cls()
        try:
            return cls(**json.loads(text))
        except (ValueError, TypeError) as e:
            raise ConfigError(f"fault plan {text!r}: {e}") from None


@dataclass
class TrainResult:
    """What :func:`train_stage` did (identical on every rank except ``val_metrics``)."""

    stage: int
    name: str
    start_step: int  #: step the run started from (0, or the resumed checkpoint's step)
    final_step: int
    resumed_from: str | None  #: checkpoint directory the run resumed from
    final_model: Path
    best_model: Path | None
    best_step: int | None
    best_value: float | None
    val_metrics: dict[str, float] = field(default_factory=dict)  #: last validation (rank 0)
    train_loss: float | None = None  #: last logged training loss (mean over ranks)
    samples_per_s: float | None = None  #: training throughput over this run (all ranks)
    steps_run: int = 0  #: optimizer steps executed by this call


# --------------------------------------------------------------------------- small pieces


def stage_steps(params: Params, k: int) -> int:
    """``params.train.steps`` of stage ``k``'s name; :class:`ConfigError` when absent."""
    name = list(params.stages)[k - 1]
    try:
        return int(params.train.steps[name])
    except KeyError:
        raise ConfigError(f"train.steps has no entry for {name} (have {', '.join(params.train.steps) or 'none'})") from None


def lr_factor(step: int, total: int, warmup: int, min_ratio: float) -> float:
    """LR multiplier for the update that produces step ``step + 1`` (``step`` = updates done).

    Linear warmup ``(step+1)/warmup`` for ``step < warmup``, then cosine from 1 down to
    ``min_ratio`` at ``step = total − 1`` (the last update)."""
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    span = max(1, total - 1 - warmup)
    prog = min(1.0, max(0.0, (step - warmup) / span))
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * prog))


def _seed(*parts: int) -> int:
    """A 63-bit seed from integers (NumPy SeedSequence mixing)."""
    return int(np.random.SeedSequence([int(p) & 0xFFFFFFFF for p in parts]).generate_state(2, dtype=np.uint32).view(np.uint64)[0] >> 1)


class ShardSampler(DistributedSampler):
    """``DistributedSampler`` (same shuffling and padding: every rank gets
    ``ceil(N / world)`` indices per epoch, permutation seeded by ``seed + epoch``) that can
    start an epoch part-way: :meth:`set_start` skips the first ``start`` indices of this
    rank's shard (exact resume without reading the skipped data)."""

    def __init__(self, dataset: Any, num_replicas: int, rank: int, seed: int, shuffle: bool = True) -> None:
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=shuffle, seed=seed, drop_last=False)
        self.start = 0

    def set_start(self, start: int) -> None:
        self.start = int(start)

    def __iter__(self) -> Iterator[int]:
        return iter(list(super().__iter__())[self.start :])

    def __len__(self) -> int:
        return max(0, self.num_samples - self.start)


class EMA:
    """Exponential moving average of a model's weights (float copy, eval mode, no grad).

    ``update(model, n)``: ``ema ← ema + (1 − d)·(w − ema)`` with
    ``d = min(decay, (1 + n)/(10 + n))`` for the ``n``-th update (warmup: early EMA follows
    the weights closely). Persistent buffers are copied."""

    def __init__(self, model: nn.Module, decay: float) -> None:
        self.decay = float(decay)
        self.module = copy.deepcopy(model).eval().requires_grad_(False)
        # persistent buffers only (non-persistent ones, e.g. lifting grids, are constants)
        self._buffers = [n for n, _ in self.module.named_buffers() if n in self.module.state_dict()]

    def decay_at(self, n: int) -> float:
        return min(self.decay, (1.0 + n) / (10.0 + n))

    @torch.no_grad()
    def update(self, model: nn.Module, n: int) -> None:
        d = self.decay_at(n)
        ema_p = [p for p in self.module.parameters()]
        src_p = [p.detach().to(q.dtype) for p, q in zip(model.parameters(), ema_p, strict=True)]
        torch._foreach_lerp_(ema_p, src_p, 1.0 - d)
        if self._buffers:
            src_b, ema_b = dict(model.named_buffers()), dict(self.module.named_buffers())
            for n in self._buffers:
                ema_b[n].copy_(src_b[n])


def _peak_mem_mb(device: torch.device) -> float:
    """Peak memory of this process: CUDA allocator peak on GPU, max RSS on CPU (MB)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux: KiB


def _dist_on(world_size: int) -> bool:
    return world_size > 1 and dist.is_available() and dist.is_initialized()


from xct_core.atomic import write_text_atomic as _write_text_atomic  # noqa: E402


class _Curves:
    """A step-indexed CSV (``dvc plots``), rewritten atomically on every append. On resume
    rows after the resumed step are dropped (no duplicated steps)."""

    def __init__(self, path: Path, keep_upto: int) -> None:
        self.path = path
        self.rows: list[dict[str, str]] = []
        if path.is_file():
            with open(path, newline="") as f:
                self.rows = [r for r in csv.DictReader(f) if r.get("step") and int(float(r["step"])) <= keep_upto]

    def append(self, step: int, values: Mapping[str, float]) -> None:
        self.rows = [r for r in self.rows if int(float(r["step"])) < step]
        self.rows.append({"step": str(step), **{k: f"{float(v):.6g}" for k, v in values.items()}})
        cols = ["step"] + sorted({k for r in self.rows for k in r if k != "step"})
        buf = io.StringIO()
        w = csv.DictWriter(buf, fieldnames=cols, restval="", lineterminator="\n")
        w.writeheader()
        w.writerows(self.rows)
        _write_text_atomic(self.path, buf.getvalue())


# --------------------------------------------------------------------------- learners


class _Learner:
    """One network being trained: the module (maybe DDP-wrapped), its EMA, optimizer and
    (fp16) grad scaler. ``kind`` = ``diffusion`` (the stage) or ``direct`` (the baseline twin)."""

    def __init__(self, kind: str, net: nn.Module, ema_decay: float) -> None:
        self.kind = kind
        self.net = net
        self.ema = EMA(net, ema_decay)
        self.model: nn.Module = net
        self.opt: torch.optim.Optimizer | None = None
        self.scaler: torch.amp.GradScaler | None = None

    def state(self) -> dict[str, Any]:
        assert self.opt is not None
        return {
            "model": unwrap(self.model).state_dict(),
            "ema": self.ema.module.state_dict(),
            "optimizer": self.opt.state_dict(),
            "scaler": self.scaler.state_dict() if self.scaler is not None else {},
        }


# --------------------------------------------------------------------------- the loop


def train_stage(
    params: Params,
    stage: int,
    processed_dir: str | Path,
    out_dir: str | Path | None = None,
    *,
    device: str | torch.device | None = None,
    rank: int = 0,
    world_size: int = 1,
    resume_from: str | Path | None = None,
    hooks: TrainHooks | None = None,
    faults: FaultPlan | None = None,
    steps: int | None = None,
    fresh: bool = False,
) -> TrainResult:
    """Train stage ``stage`` (1-based) on ``processed_dir`` (layout :mod:`xct_core.preprocess`).

    Args:
        params: the typed params (``stages``, ``train``, ``diffusion``, ``hu``, ``drr``, ``eval``).
        out_dir: outputs (default ``params.train.out_dir``); layout in the module docstring.
            With several workers it must be storage every rank sees (rank 0 writes).
        device: default CUDA when available, else CPU.
        rank, world_size: this worker's global rank and the number of workers. When
            ``world_size > 1`` a ``torch.distributed`` process group must be initialised
            (the engine does it) and ``hooks.prepare_model`` should wrap in DDP.
        resume_from: a checkpoint directory to resume from (e.g. the engine's latest); the
            newer of it and the newest local checkpoint is used.
        hooks: engine binding (:class:`TrainHooks`).
        faults: fault injection for tests (:class:`FaultPlan`).
        steps: override ``params.train.steps[stage name]``.
        fresh: delete this stage's previous outputs first (rank 0) instead of resuming.

    Raises:
        InputError / ConfigError: bad data folder, missing earlier-stage model, bad params.
        NonFiniteError: a non-finite loss or gradient (names the step; last good checkpoint kept).
    """
    hooks = hooks or TrainHooks()
    faults = faults or FaultPlan()
    tp = params.train
    k = int(stage)
    cfg = stage_config(params, k)
    name = list(params.stages)[k - 1]
    max_steps = int(steps) if steps is not None else stage_steps(params, k)
    if max_steps < 1:
        raise ConfigError(f"steps must be >= 1, got {max_steps}")
    layout = RunLayout(Path(out_dir if out_dir is not None else tp.out_dir).absolute(), k)
    dev = torch.device(device) if device is not None else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    is_main = rank == 0
    distributed = _dist_on(world_size)
    if world_size > 1 and not distributed:
        raise RuntimeError("world_size > 1 needs an initialised torch.distributed process group")

    if fresh and is_main:
        layout.clear()
    if distributed:
        dist.barrier()

    # --- data ---------------------------------------------------------------------------
    from xct_core.data import XrayCTDataset

    preflight(params, k, processed_dir, layout.out_dir, world_size=world_size, steps=max_steps)
    window = params.hu.get_window()
    train_ds = XrayCTDataset(processed_dir, k, "train", window)
    sampler = ShardSampler(train_ds, world_size, rank, seed=params.seed)
    steps_per_epoch = sampler.num_samples // cfg.batch_size
    loader: DataLoader = DataLoader(
        train_ds, batch_size=cfg.batch_size, sampler=sampler, drop_last=True,
        num_workers=tp.loader_workers, pin_memory=dev.type == "cuda",
    )
    if hooks.prepare_loader is not None:
        loader = hooks.prepare_loader(loader)
    val_ids: list[str] = []
    if is_main:
        all_val = list(train_ds.manifest["splits"].get("val", []))
        val_ids = all_val[: tp.val_max_volumes] if tp.val_max_volumes > 0 else all_val

    # --- models, resume ------------------------------------------------------------------
    torch.manual_seed(_seed(params.seed, 1, rank))
    np.random.seed(_seed(params.seed, 2, rank) % 2**32)
    random.seed(_seed(params.seed, 3, rank))
    learners = [_Learner("diffusion", build_stage(params, k), tp.ema_decay)]
    if tp.direct_baseline:
        learners.append(_Learner("direct", build_stage(params, k, mode="direct"), tp.ema_decay))
    compat = _compat_key(params, k, [l.kind for l in learners])

    state, resumed_from = _pick_resume(layout, resume_from, fresh)
    start_step = int(state["step"]) if state is not None else 0
    if distributed:  # every rank must resume from the same step (shared storage)
        t = torch.tensor([start_step, -start_step], dtype=torch.float64)
        t = t.to(dev) if dist.get_backend() == "nccl" else t
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        if int(t[0]) != start_step or int(-t[1]) != start_step:
            raise TrainingFailed(
                f"{name}: workers found different checkpoints to resume from (steps {int(-t[1])}…{int(t[0])}); "
                f"{layout.out_dir} must be storage every worker sees"
            )
    if state is not None:
        if state.get("compat") != compat:
            raise ConfigError(
                f"{resumed_from}: checkpoint was trained with a different {name} network/schedule "
                f"(params changed); restore them or start over with --fresh"
            )
        for lrn in learners:
            saved = state["learners"][lrn.kind]
            lrn.net.load_state_dict(saved["model"])
            lrn.ema.module.load_state_dict(saved["ema"])

    amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(tp.precision) if dev.type == "cuda" else None
    for lrn in learners:
        lrn.model = hooks.prepare_model(lrn.net) if hooks.prepare_model is not None else lrn.net.to(dev)
        lrn.net = unwrap(lrn.model)
        lrn.ema.module.to(dev)
        lrn.opt = torch.optim.AdamW(
            lrn.model.parameters(), lr=cfg.lr, betas=tuple(tp.adam_betas), weight_decay=tp.weight_decay
        )
        if amp_dtype == torch.float16:
            lrn.scaler = torch.amp.GradScaler("cuda")
        if state is not None:
            saved = state["learners"][lrn.kind]
            lrn.opt.load_state_dict(saved["optimizer"])
            if lrn.scaler is not None and saved["scaler"]:
                lrn.scaler.load_state_dict(saved["scaler"])
    if state is not None and is_main and state.get("rng") is not None:
        restore_rng(state["rng"])

    schedule = CosineSchedule.from_params(params.diffusion)
    physics = PhysicsLoss.from_params(params, k) if cfg.physics_weight > 0 else None
    best_step: int | None = state.get("best_step") if state is not None else None
    best_value: float | None = state.get("best_value") if state is not None else None
    last_val: dict[str, float] = json.loads(state.get("last_val", "{}")) if state is not None else {}
    samples_seen = int(state.get("samples_seen", 0)) if state is not None else 0
    del state

    train_curve = _Curves(layout.plots / "train.csv", start_step) if is_main else None
    val_curve = _Curves(layout.plots / "val.csv", start_step) if is_main else None
    last_ckpt: list[tuple[int, str]] = [(s, str(d)) for s, d in list_checkpoints(layout.checkpoints)[-1:]] if is_main else []
    validator = _Validator(params, k, processed_dir, val_ids, layout, dev, hooks) if is_main and val_ids else None

    params_json = json.dumps(params.model_dump(mode="json"), sort_keys=True)

    def checkpoint(step: int) -> str | None:
        if not is_main:
            return None
        st = {
            "format": STATE_FORMAT,
            "stage": k,
            "name": name,
            "step": step,
            "max_steps": max_steps,
            "samples_seen": samples_seen,
            "world_size": world_size,
            "compat": compat,
            "params": params_json,
            "learners": {lrn.kind: lrn.state() for lrn in learners},
            "rng": capture_rng(),
            "best_step": best_step,
            "best_value": best_value,
            "last_val": json.dumps(last_val),
        }
        d = save_state(layout.checkpoints, step, st)
        prune_checkpoints(layout.checkpoints, tp.keep_last, [best_step] if best_step is not None else [])
        last_ckpt[:] = [(step, str(d))]
        return str(d)

    def export(which: str, step: int, metrics: Mapping[str, float]) -> Path:
        """EMA weights → models/stage{k}/{which}.pt (+ direct.pt at the end); the metrics
        stored with a model are its own validation metrics, without the ``val/`` prefix."""
        own = {m.removeprefix("val/"): v for m, v in metrics.items() if not m.startswith("val/direct_")}
        path = layout.model(which)
        export_stage_model(path, learners[0].ema.module, params_json=params_json, stage=k, name=name,
                           mode="diffusion", step=step, metrics=own)
        if which == "final" and len(learners) > 1:
            direct = {m.removeprefix("val/direct_"): v for m, v in metrics.items() if m.startswith("val/direct_")}
            export_stage_model(layout.model("direct"), learners[1].ema.module, params_json=params_json, stage=k,
                               name=name, mode="direct", step=step, metrics=direct)
        return path

    def validate(step: int) -> dict[str, float]:
        nonlocal best_step, best_value, last_val
        if validator is None:
            return {}
        t0 = time.perf_counter()
        vals = validator.run(step, [lrn.ema.module for lrn in learners])
        vals["val/time_s"] = time.perf_counter() - t0
        last_val = vals
        assert val_curve is not None
        val_curve.append(step, {k2.removeprefix("val/"): v for k2, v in vals.items()})
        key = f"val/{tp.best_metric}"
        if key not in vals:
            raise ConfigError(f"train.best_metric {tp.best_metric!r} is not a validation metric ({', '.join(sorted(vals))})")
        v = vals[key]
        better = math.isfinite(v) and (
            best_value is None or (v > best_value if tp.best_mode == "max" else v < best_value)
        )
        if better:
            best_step, best_value = step, float(v)
            export("best", step, vals)
        return vals

    # --- already finished? -----------------------------------------------------------------
    final_path = layout.model("final")
    if start_step >= max_steps:
        if is_main and (not final_path.is_file() or read_stage_model(final_path)["step"] != start_step):
            export("final", start_step, last_val)
            if best_step is None:
                shutil.copyfile(final_path, layout.model("best"))
        _report(hooks, {"step": float(start_step), "done": 1.0}, None)
        return TrainResult(
            stage=k, name=name, start_step=start_step, final_step=start_step, resumed_from=resumed_from,
            final_model=final_path, best_model=layout.model("best") if is_main else None,
            best_step=best_step, best_value=best_value, val_metrics=last_val,
        )

    # --- train -----------------------------------------------------------------------------
    bar = None
    if is_main:
        factory = hooks.progress or _default_progress
        bar = factory(total=max_steps, initial=start_step, desc=name)
    gen = torch.Generator(device=dev)
    global_batch = cfg.batch_size * world_size
    step = start_step
    window_t, window_steps, run_t = 0.0, 0, 0.0
    last_loss: float | None = None
    batches = _batch_stream(loader, sampler, start_step, steps_per_epoch, cfg.batch_size)
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    crash_marker = layout.checkpoints / f".fault-crash-{faults.crash_at_step}"
    try:
        while step < max_steps:
            if faults.crash_at_step == step + 1 and rank == faults.crash_rank and not crash_marker.exists():
                crash_marker.parent.mkdir(parents=True, exist_ok=True)
                crash_marker.touch()
                os.kill(os.getpid(), 9)  # simulated hard crash of this worker
            t0 = time.perf_counter()
            batch = next(batches)
            x0 = batch["x0"].to(dev, non_blocking=True)
            frontal = batch["frontal"].to(dev, non_blocking=True)
            lateral = batch["lateral"].to(dev, non_blocking=True)
            cond = batch["x0_prev"].to(dev, non_blocking=True) if "x0_prev" in batch else None
            lr = cfg.lr * lr_factor(step, max_steps, tp.warmup_steps, tp.min_lr_ratio)
            keys: list[str] = []
            stats: list[torch.Tensor] = []
            fatal: list[torch.Tensor] = []  # 1 where a value that must be finite is not
            for i, lrn in enumerate(learners):
                assert lrn.opt is not None
                for g in lrn.opt.param_groups:
                    g["lr"] = lr
                lrn.opt.zero_grad(set_to_none=True)
                gen.manual_seed(_seed(params.seed, 4 + i, rank, step))
                loss_fn = diffusion_loss if lrn.kind == "diffusion" else direct_loss
                with torch.autocast(dev.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
                    loss, logs = loss_fn(
                        lrn.model, x0, frontal, lateral, cond, schedule=schedule, generator=gen,
                        physics_weight=cfg.physics_weight, physics=physics,
                    )
                if faults.nan_at_step == step + 1 and rank == 0 and i == 0:
                    loss = loss * float("nan")
                    logs["loss"] = loss.detach()
                if lrn.scaler is not None:
                    lrn.scaler.scale(loss).backward()
                    lrn.scaler.unscale_(lrn.opt)
                else:
                    loss.backward()
                gnorm = torch.nn.utils.clip_grad_norm_(lrn.model.parameters(), tp.grad_clip).detach().float()
                prefix = "train/" if lrn.kind == "diffusion" else "train/direct_"
                for key in sorted(logs):
                    keys.append(prefix + key)
                    stats.append(logs[key].float().reshape(()))
                keys.append(prefix + "grad_norm")
                stats.append(gnorm.reshape(()))
                fatal.append((~torch.isfinite(loss.detach().float())).float().reshape(()))
                if lrn.scaler is None:  # fp16: an overflowing gradient is the scaler's business
                    fatal.append((~torch.isfinite(gnorm)).float().reshape(()))
            local = torch.stack(stats).to(dev)
            payload = torch.cat([torch.nan_to_num(local, nan=0.0, posinf=0.0, neginf=0.0), torch.stack(fatal).sum().reshape(1).to(dev)])
            if distributed:  # one small all-reduce: mean logs + "any rank non-finite"
                dist.all_reduce(payload)
                payload[:-1] /= world_size
            host = payload.tolist()
            if host[-1] > 0:
                here = ", ".join(f"{key.removeprefix('train/')}={v:.4g}" for key, v in zip(keys, local.tolist(), strict=True))
                good = f"{last_ckpt[-1][1]} (step {last_ckpt[-1][0]})" if last_ckpt else "none written yet"
                raise NonFiniteError(
                    f"{name}: non-finite loss or gradient at step {step + 1} (rank {rank}: {here}); training "
                    f"stopped before the optimizer step. Last good checkpoint: {good}",
                    step + 1,
                    last_ckpt[-1][1] if last_ckpt else None,
                )
            values = dict(zip(keys, (host[:-1] if distributed else local.tolist()), strict=True))
            for lrn in learners:
                assert lrn.opt is not None
                if lrn.scaler is not None:
                    lrn.scaler.step(lrn.opt)
                    lrn.scaler.update()
                else:
                    lrn.opt.step()
            step += 1
            samples_seen += global_batch
            for lrn in learners:
                lrn.ema.update(lrn.net, step)
            if faults.slow_step_s > 0:
                time.sleep(faults.slow_step_s)
            dt = time.perf_counter() - t0
            window_t += dt
            run_t += dt
            window_steps += 1
            last_loss = values["train/loss"]
            if bar is not None:
                bar.update(1)

            do_log = step % tp.log_every == 0 or step == max_steps
            do_val = step == max_steps or (tp.val_every > 0 and step % tp.val_every == 0)
            do_ckpt = do_val or step % tp.ckpt_every == 0 or step == max_steps
            if not (do_log or do_ckpt):
                continue
            metrics: dict[str, float] = {"step": float(step)}
            if do_log:
                metrics.update(values)
                metrics["train/lr"] = lr
                metrics["train/samples_per_s"] = window_steps * global_batch / max(window_t, 1e-9)
                metrics["train/step_time_s"] = window_t / max(window_steps, 1)
                metrics["train/epoch"] = step / steps_per_epoch
                metrics["sys/peak_mem_mb"] = _peak_mem_mb(dev)
                window_t, window_steps = 0.0, 0
                if train_curve is not None:
                    train_curve.append(step, {k2.split("/", 1)[1]: v for k2, v in metrics.items() if k2.startswith(("train/", "sys/"))})
                if bar is not None:
                    bar.set_description(
                        f"{name} loss {values['train/loss']:.4f} | {metrics['train/samples_per_s']:.2f} samples/s"
                    )
            if do_val and is_main:
                metrics.update(validate(step))
                if bar is not None and last_val:
                    bar.set_description(f"{name} val {tp.best_metric} {last_val.get('val/' + tp.best_metric, float('nan')):.3f}")
            ckpt_dir = checkpoint(step) if do_ckpt else None
            if is_main and do_ckpt:
                metrics["checkpoint_step"] = float(step)
            _report(hooks, metrics, ckpt_dir)
    finally:
        if bar is not None:
            bar.close()

    if is_main:
        export("final", step, last_val)
        if best_step is None:  # no validation data: best = final
            shutil.copyfile(final_path, layout.model("best"))
        summary = {
            "stage": k,
            "name": name,
            "step": step,
            "start_step": start_step,
            "best_step": best_step,
            "best_metric": tp.best_metric,
            "best_value": best_value,
            "train_loss": last_loss,
            "samples_per_s": (step - start_step) * global_batch / max(run_t, 1e-9),
            "workers": world_size,
            **{k2.removeprefix("val/"): v for k2, v in last_val.items()},
        }
        _write_text_atomic(layout.metrics_file, json.dumps(_jsonable(summary), indent=2, sort_keys=True) + "\n")
        if hooks.log_artifact is not None:
            hooks.log_artifact(str(final_path), "model")
            if layout.model("best").is_file():
                hooks.log_artifact(str(layout.model("best")), "model")
            if layout.model("direct").is_file():
                hooks.log_artifact(str(layout.model("direct")), "model")
    return TrainResult(
        stage=k, name=name, start_step=start_step, final_step=step,
        resumed_from=resumed_from, final_model=final_path,
        best_model=layout.model("best") if is_main else None, best_step=best_step, best_value=best_value,
        val_metrics=last_val, train_loss=last_loss,
        samples_per_s=(step - start_step) * global_batch / max(run_t, 1e-9), steps_run=step - start_step,
    )


def preflight(
    params: Params,
    stage: int,
    processed_dir: str | Path,
    out_dir: str | Path | None = None,
    *,
    world_size: int = 1,
    steps: int | None = None,
    check_models: bool = True,
) -> None:
    """Check everything a stage training needs before any compute is spent (an engine calls
    it on the driver, :func:`train_stage` again on every worker).

    Raises :class:`ConfigError` (unknown stage, no ``train.steps`` entry, unknown
    ``best_metric``, batch larger than a worker's data shard) or :class:`InputError` (no or
    incomplete processed data, empty train split, earlier stage's exported model missing).
    """
    from xct_core.data import XrayCTDataset
    from xct_core.metrics import METRIC_KEYS

    k = int(stage)
    cfg = stage_config(params, k)
    name = list(params.stages)[k - 1]
    if steps is None:
        stage_steps(params, k)
    tp = params.train
    if tp.best_metric not in METRIC_KEYS and not tp.best_metric.startswith("reproj_"):
        raise ConfigError(f"train.best_metric {tp.best_metric!r} is not a validation metric ({', '.join(METRIC_KEYS)})")
    if tp.best_metric.startswith("reproj_") and not tp.val_reprojection:
        raise ConfigError(f"train.best_metric {tp.best_metric!r} needs train.val_reprojection: true")
    ds = XrayCTDataset(processed_dir, k, "train", params.hu.get_window())
    if len(ds) == 0:
        raise InputError(Path(processed_dir) / "manifest.json", "the train split is empty")
    if ds.grid.size != cfg.size:
        raise ConfigError(
            f"{name}: processed data has {ds.grid.size}³ volumes for stage {k} but params say {cfg.size}³ (re-run preprocess)"
        )
    per_worker = math.ceil(len(ds) / world_size)
    if per_worker < cfg.batch_size:
        raise ConfigError(
            f"{name}: batch_size {cfg.batch_size} exceeds the {per_worker} training volumes per worker "
            f"({len(ds)} volumes / {world_size} workers)"
        )
    if check_models:
        layout = RunLayout(Path(out_dir if out_dir is not None else tp.out_dir).absolute(), k)
        for j in range(1, k):  # frozen earlier stages are needed for validation
            p = layout.model(tp.prev_stage_model, stage=j)
            if not p.is_file():
                raise InputError(p, f"stage {j} model not found: train stage {j} first (xct train --stage {j})")


def _jsonable(v: Any) -> Any:
    if isinstance(v, dict):
        return {str(k): _jsonable(x) for k, x in v.items()}
    if isinstance(v, float) and not math.isfinite(v):
        return None
    return v


def _report(hooks: TrainHooks, metrics: dict[str, float], ckpt: str | None) -> None:
    if hooks.report is not None:
        hooks.report(metrics, ckpt)


def _compat_key(params: Params, k: int, kinds: list[str]) -> str:
    """What a checkpoint's weights depend on: the stage's network, the model/diffusion/DRR
    sections, the HU window and which learners exist. Other params (LR, steps, logging)
    may change between resumes."""
    import hashlib

    blob = {
        "stage": stage_config(params, k).model_dump(mode="json"),
        "prev": stage_config(params, k - 1).size if k > 1 else None,
        "model": params.model.model_dump(mode="json"),
        "diffusion": params.diffusion.model_dump(mode="json"),
        "drr": params.drr.model_dump(mode="json"),
        "hu": params.hu.model_dump(mode="json"),
        "learners": kinds,
    }
    return hashlib.sha256(json.dumps(blob, sort_keys=True).encode()).hexdigest()[:16]


def _pick_resume(layout: RunLayout, resume_from: str | Path | None, fresh: bool) -> tuple[dict[str, Any] | None, str | None]:
    """The newest of ``resume_from`` and the newest local checkpoint, loaded (or ``None``)."""
    cands: list[tuple[int, str]] = []
    if resume_from is not None and not fresh:
        st = load_state(resume_from)
        cands.append((int(st["step"]), str(resume_from)))
        ext_state: dict[str, Any] | None = st
    else:
        ext_state = None
    if not fresh:
        loc = latest_checkpoint(layout.checkpoints)
        if loc is not None:
            cands.append((loc[0], str(loc[1])))
    if not cands:
        return None, None
    step, path = max(cands, key=lambda c: c[0])
    if ext_state is not None and path == str(resume_from):
        return ext_state, path
    return load_state(path), path


def _batch_stream(
    loader: DataLoader, sampler: ShardSampler, start_step: int, steps_per_epoch: int, batch_size: int
) -> Iterator[dict[str, Any]]:
    """Endless batches continuing at ``start_step``: epoch ``s // steps_per_epoch``, starting
    ``(s % steps_per_epoch) · batch_size`` indices into this rank's shard."""
    s = start_step
    while True:
        epoch, off = divmod(s, steps_per_epoch)
        sampler.set_epoch(epoch)
        sampler.set_start(off * batch_size)
        n = 0
        for batch in loader:
            yield batch
            s += 1
            n += 1
            if off + n >= steps_per_epoch:
                break


def _default_progress(total: int, initial: int, desc: str) -> Any:
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, desc=desc, unit="step", dynamic_ncols=True, mininterval=1.0)


# --------------------------------------------------------------------------- validation


class _Validator:
    """Rank-0 validation: cascade sampling with frozen earlier stages + this stage's EMA."""

    def __init__(
        self, params: Params, k: int, processed_dir: str | Path, ids: list[str], layout: RunLayout,
        device: torch.device, hooks: TrainHooks,
    ) -> None:
        from xct_core.data import XrayCTDataset

        self.params = params
        self.k = k
        self.tp = params.train
        self.layout = layout
        self.device = device
        self.hooks = hooks
        self.window = params.hu.get_window()
        self.ds = XrayCTDataset(processed_dir, k, "val", self.window, ids=ids)
        self.schedule = CosineSchedule.from_params(params.diffusion)
        self.prev: list[nn.Module] | None = None
        self.physics = PhysicsLoss.from_params(params, k) if self.tp.val_reprojection else None
        self.kw = metric_kwargs(params.eval)
        cfg = stage_config(params, k)
        self.spacing = float(cfg.fov_mm) / int(cfg.size)

    def _frozen(self) -> list[nn.Module]:
        if self.prev is None:
            self.prev = []
            for j in range(1, self.k):
                path = self.layout.model(self.tp.prev_stage_model, stage=j)
                net = load_stage_model(path, self.device)
                want = stage_config(self.params, j).size
                if getattr(net, "size", want) != want:
                    raise ConfigError(f"{path}: stage {j} grid {net.size}³ does not match params ({want}³)")  # type: ignore[attr-defined]
                self.prev.append(net)
        return self.prev

    @torch.no_grad()
    def run(self, step: int, emas: list[nn.Module]) -> dict[str, float]:
        frozen = self._frozen()
        rows: dict[str, list[dict[str, float]]] = {"": [], "direct_": []}
        first: dict[str, torch.Tensor] = {}
        for idx in range(len(self.ds)):
            item = self.ds[idx]
            x0 = item["x0"].unsqueeze(0).to(self.device)
            f = item["frontal"].unsqueeze(0).to(self.device)
            lat = item["lateral"].unsqueeze(0).to(self.device)
            for ema, prefix in zip(emas, ("", "direct_"), strict=False):
                gen = torch.Generator(device=self.device).manual_seed(_seed(self.params.seed, 99, idx))
                outs = sample_cascade(
                    [*frozen, ema], f, lat, schedule=self.schedule, steps=self.tp.val_sample_steps, generator=gen
                )
                pred = outs[-1].float()
                views = None
                if self.physics is not None:
                    proj = self.physics.project(pred) * self.physics.scale
                    views = {"frontal": (proj[:, 0], f[:, 0]), "lateral": (proj[:, 1], lat[:, 0])}
                rows[prefix] += volume_metrics_per_sample(pred[:, 0], x0[:, 0], self.window, views=views, **self.kw)
                if idx == 0:
                    first["direct" if prefix else "diffusion"] = pred[0, 0]
                    if len(outs) > 1 and prefix == "":
                        first["previous stage"] = outs[-2][0, 0]
            if idx == 0:
                first["target"] = x0[0, 0]
        out: dict[str, float] = {}
        for prefix, rs in rows.items():
            if not rs:
                continue
            for key in rs[0]:
                vals = np.array([r[key] for r in rs], dtype=np.float64)
                out[f"val/{prefix}{key}"] = float(vals.sum() if key == "nan_count" else vals.mean())
        self._montage(step, first, out)
        return out

    def _montage(self, step: int, vols: dict[str, torch.Tensor], metrics: Mapping[str, float]) -> None:
        from xct_core.viz import save_slice_montage

        order = ["target", "diffusion", "direct", "previous stage"]
        hu = {n: self.window.inverse(vols[n].float().cpu().numpy()) for n in order if n in vols}
        spacing = {n: (self.spacing,) * 3 for n in hu}
        if "previous stage" in hu:
            prev = stage_config(self.params, self.k - 1)
            spacing["previous stage"] = (float(prev.fov_mm) / int(prev.size),) * 3
        title = (
            f"stage{self.k} step {step}: PSNR(window) {metrics.get('val/psnr_window_db', float('nan')):.2f} dB, "
            f"SSIM {metrics.get('val/ssim_window', float('nan')):.3f} ({self.window.name} window, EMA, "
            f"{self.tp.val_sample_steps} DDIM steps)"
        )
        path = self.layout.montages / f"{step_dir_name(step)}.png"
        save_slice_montage(hu, path, self.window, spacing=spacing, title=title)
        if self.hooks.log_artifact is not None:
            self.hooks.log_artifact(str(path), "val_montages")


# --------------------------------------------------------------------------- bare entry point


def main(argv: list[str] | None = None) -> int:
    """``python -m xct_core.training``: one stage in this process (no Ray, no MLflow)."""
    ap = argparse.ArgumentParser(prog="python -m xct_core.training", description=__doc__.split("\n")[0])
    ap.add_argument("--stage", type=int, required=True, help="1-based stage index")
    ap.add_argument("--processed", required=True, help="preprocessed data folder (manifest.json)")
    ap.add_argument("--out", default=None, help="output folder (default: params train.out_dir)")
    ap.add_argument("--params", default=None, help="params.yaml (default: $XCT_PARAMS or ./params.yaml)")
    ap.add_argument("--overlay", action="append", default=[], help="YAML fragment merged over the params (repeatable)")
    ap.add_argument("--steps", type=int, default=None, help="override train.steps for this stage")
    ap.add_argument("--device", default=None, help="cuda | cuda:1 | cpu (default: cuda when available)")
    ap.add_argument("--fresh", action="store_true", help="discard this stage's previous outputs instead of resuming")
    a = ap.parse_args(argv)
    try:
        params = load_params(a.params, a.overlay)
        res = train_stage(
            params, a.stage, a.processed, a.out, device=a.device, steps=a.steps, fresh=a.fresh,
            faults=FaultPlan.from_json(os.environ.get("XCT_TRAIN_FAULTS")),
        )
    except XctError as e:
        print(f"xct: error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("xct: error: interrupted", file=sys.stderr)
        return 130
    print(_summary_line(res))
    return 0


def _summary_line(res: TrainResult) -> str:
    where = f"resumed at step {res.start_step}" if res.start_step else "from scratch"
    best = f", best {res.best_value:.3f} at step {res.best_step}" if res.best_value is not None else ""
    speed = f", {res.samples_per_s:.2f} samples/s" if res.samples_per_s else ""
    return f"{res.name}: step {res.final_step} ({where}{speed}{best}) → {res.final_model}"


if __name__ == "__main__":
    sys.exit(main())
