"""Engine-agnostic training of one cascade stage (pure torch; no Ray, no MLflow, no CLI).

:func:`train_stage` is the loop (nanoGPT-style: set up, then ``while step < max_steps``:
:func:`train_step`, synchronise, update, report). An engine binds it through
:class:`TrainHooks`: a ``report(metrics, checkpoint_dir)`` callback (every rank, same
steps), an optional model / data-loader preparation (DDP wrapping, device placement), a
progress-bar factory, an artifact logger and per-step hooks (what :class:`FaultPlan`, the
resilience tests' fault injection, plugs into). ``components/train.py`` binds it to Ray
Train + MLflow; ``xct train --local`` and a bare GPU box call it directly.

What one step does (:func:`train_step`)
---------------------------------------
Batch ``batch_size`` volumes per worker (data sharded per worker by :class:`ShardSampler`),
draw ``t`` and noise from a generator seeded by the one seed rule
(:func:`xct_core.seeding.derive_seed` ``(seed, 4 + learner, rank, step)``),
:func:`xct_core.losses.diffusion_loss` (v-prediction, + physics term when
``physics_weight > 0``; stage k>1 conditions on the ground-truth low-res volume,
noise-augmented) under bf16 autocast on GPU, backward, unscale (fp16) and clip the global
gradient norm. Then the loop all-reduces the logs with an "any rank non-finite" flag
(:func:`sync_stats`), steps AdamW and updates the EMA. LR: linear warmup then cosine decay
(:func:`lr_factor`).

Validation (rank 0, every ``val_every`` steps and at the end) is THE evaluator
(:func:`xct_core.evaluation.evaluate_case`) on the first ``val_max_volumes`` ids of the val
split (never augmented): the EMA weights of this stage behind the frozen, exported earlier
stages, ``train.val_sample_steps`` DDIM steps, ``train.val_samples`` draws, the case seeds
of the one seed rule (successive validations are comparable), metrics against the
full-range HU target exactly as the evaluate step computes them (+ the direct twin when
``train.direct_baseline``). The best value of ``train.best_metric`` picks ``best.pt``.

Layout of ``out_dir``: :mod:`xct_core.layout` (:class:`RunLayout`). Exported models:
:func:`xct_core.checkpoint.export_stage_model` (self-contained: EMA ``state_dict`` + the
full params as JSON; rebuild with :func:`xct_core.checkpoint.load_stage_model`). Everything
loads with ``torch.load(weights_only=True)``.

Resume (:class:`Checkpointer`): a run starts from the newest checkpoint among ``resume_from``
(e.g. the engine's checkpoint) and ``checkpoints/stage{K}/``; the step count, optimizer, EMA,
data position (epoch + offset), curves and best-so-far continue. Per-step randomness is a
function of ``(seed, rank, step)``, so a resumed run reproduces the uninterrupted one (to
float rounding; tests/test_training.py checks it on CPU). Raising ``train.steps`` later
continues from the last step (the LR schedule is recomputed for the new total); a checkpoint
of a different network (stage/model/diffusion/DRR/HU params) is refused.

Non-finite loss or gradient: the run stops before the optimizer step with
:class:`NonFiniteError` naming the step; no checkpoint is written for it, so the last good
one stays the newest.
"""

from __future__ import annotations

import copy
import csv
import hashlib
import io
import json
import math
import os
import random
import resource
import shutil
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler

from xct_core.atomic import write_json_atomic, write_text_atomic
from xct_core.checkpoint import (
    STATE_FORMAT,
    capture_rng,
    export_stage_model,
    latest_checkpoint,
    list_checkpoints,
    load_state,
    prune_checkpoints,
    read_stage_model,
    restore_rng,
    save_state,
    step_dir_name,
)
from xct_core.config import Params, Stage
from xct_core.diffusion import CosineSchedule
from xct_core.errors import ConfigError, InputError, XctError
from xct_core.layout import RunLayout
from xct_core.losses import PhysicsLoss, diffusion_loss, direct_loss
from xct_core.models import build_stage, unwrap
from xct_core.seeding import derive_seed

__all__ = [
    "EMA",
    "Checkpointer",
    "FaultPlan",
    "NonFiniteError",
    "RunLayout",
    "ShardSampler",
    "StepStats",
    "TrainHooks",
    "TrainResult",
    "TrainingFailed",
    "compat_key",
    "lr_factor",
    "preflight",
    "summary_line",
    "sync_stats",
    "train_stage",
    "train_step",
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


# --------------------------------------------------------------------------- hooks, faults, result


@dataclass
class TrainHooks:
    """How an engine (and a test) plugs into :func:`train_stage`; every field is optional.

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
        before_step: ``before_step(step, rank)`` before step ``step`` (1-based) runs.
        after_step: ``after_step(step, rank)`` after step ``step``'s update.
        perturb_loss: ``perturb_loss(step, rank, learner, loss) -> loss`` before backward.
    """

    report: ReportFn | None = None
    log_artifact: Callable[[str, str], None] | None = None
    prepare_model: Callable[[nn.Module], nn.Module] | None = None
    prepare_loader: Callable[[DataLoader], DataLoader] | None = None
    progress: Callable[..., Any] | None = None
    before_step: Callable[[int, int], None] | None = None
    after_step: Callable[[int, int], None] | None = None
    perturb_loss: Callable[[int, int, int, torch.Tensor], torch.Tensor] | None = None


@dataclass(frozen=True)
class FaultPlan:
    """Deliberate faults for resilience tests (chaos testing); all off by default. They
    reach the loop only through :class:`TrainHooks` (:meth:`install`).

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
        """From a JSON object (the adapters read it from ``$XCT_TRAIN_FAULTS``)."""
        if not text:
            return cls()
        try:
            return cls(**json.loads(text))
        except (ValueError, TypeError) as e:
            raise ConfigError(f"fault plan {text!r}: {e}") from None

    def install(self, hooks: TrainHooks, layout: RunLayout) -> TrainHooks:
        """``hooks`` with this plan's faults chained into its per-step hooks."""
        if self == FaultPlan():
            return hooks
        marker = layout.checkpoints / f".fault-crash-{self.crash_at_step}"
        before, after, perturb = hooks.before_step, hooks.after_step, hooks.perturb_loss

        def before_step(step: int, rank: int) -> None:
            if before is not None:
                before(step, rank)
            if self.crash_at_step == step and rank == self.crash_rank and not marker.exists():
                marker.parent.mkdir(parents=True, exist_ok=True)
                marker.touch()
                os.kill(os.getpid(), 9)  # simulated hard crash of this worker

        def after_step(step: int, rank: int) -> None:
            if after is not None:
                after(step, rank)
            if self.slow_step_s > 0:
                time.sleep(self.slow_step_s)

        def perturb_loss(step: int, rank: int, learner: int, loss: torch.Tensor) -> torch.Tensor:
            loss = perturb(step, rank, learner, loss) if perturb is not None else loss
            if self.nan_at_step == step and rank == 0 and learner == 0:
                loss = loss * float("nan")
            return loss

        return replace(hooks, before_step=before_step, after_step=after_step, perturb_loss=perturb_loss)


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


def summary_line(res: TrainResult) -> str:
    """One line about a finished :func:`train_stage` call (what ``xct train --local`` prints)."""
    where = f"resumed at step {res.start_step}" if res.start_step else "from scratch"
    best = f", best {res.best_value:.3f} at step {res.best_step}" if res.best_value is not None else ""
    speed = f", {res.samples_per_s:.2f} samples/s" if res.samples_per_s else ""
    return f"{res.name}: step {res.final_step} → {res.final_model} ({where}{speed}{best})"


# --------------------------------------------------------------------------- small pieces


def lr_factor(step: int, total: int, warmup: int, min_ratio: float) -> float:
    """LR multiplier for the update that produces step ``step + 1`` (``step`` = updates done).

    Linear warmup ``(step+1)/warmup`` for ``step < warmup``, then cosine from 1 down to
    ``min_ratio`` at ``step = total − 1`` (the last update)."""
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    span = max(1, total - 1 - warmup)
    prog = min(1.0, max(0.0, (step - warmup) / span))
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * prog))


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
        write_text_atomic(self.path, buf.getvalue())


def _default_progress(total: int, initial: int, desc: str) -> Any:
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, desc=desc, unit="step", dynamic_ncols=True, mininterval=1.0)


def _report(hooks: TrainHooks, metrics: dict[str, float], ckpt: str | None) -> None:
    if hooks.report is not None:
        hooks.report(metrics, ckpt)


# --------------------------------------------------------------------------- learners, one step


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

    @property
    def prefix(self) -> str:
        return "train/" if self.kind == "diffusion" else "train/direct_"

    def state(self) -> dict[str, Any]:
        assert self.opt is not None
        return {
            "model": unwrap(self.model).state_dict(),
            "ema": self.ema.module.state_dict(),
            "optimizer": self.opt.state_dict(),
            "scaler": self.scaler.state_dict() if self.scaler is not None else {},
        }

    def load(self, saved: Mapping[str, Any]) -> None:
        self.net.load_state_dict(saved["model"])
        self.ema.module.load_state_dict(saved["ema"])

    def update(self) -> None:
        assert self.opt is not None
        if self.scaler is not None:
            self.scaler.step(self.opt)
            self.scaler.update()
        else:
            self.opt.step()


@dataclass
class StepStats:
    """One step's logs on this rank: ``keys`` ↔ ``local`` (0-d tensors stacked) and a count of
    values that must be finite but are not (loss, and the gradient norm without fp16)."""

    keys: list[str]
    local: torch.Tensor
    fatal: torch.Tensor


def train_step(
    learners: list[_Learner],
    batch: Mapping[str, Any],
    *,
    step: int,
    lr: float,
    rank: int,
    seed: int,
    device: torch.device,
    schedule: CosineSchedule,
    stage: Stage,
    physics: PhysicsLoss | None,
    grad_clip: float,
    amp_dtype: torch.dtype | None,
    hooks: TrainHooks,
) -> StepStats:
    """Forward, backward, unscale and clip every learner on one batch (no optimizer step);
    ``step`` = updates done so far (the one being computed is ``step + 1``)."""
    x0 = batch["x0"].to(device, non_blocking=True)
    frontal = batch["frontal"].to(device, non_blocking=True)
    lateral = batch["lateral"].to(device, non_blocking=True)
    cond = batch["x0_prev"].to(device, non_blocking=True) if "x0_prev" in batch else None
    gen = torch.Generator(device=device)
    keys: list[str] = []
    stats: list[torch.Tensor] = []
    fatal: list[torch.Tensor] = []
    for i, lrn in enumerate(learners):
        assert lrn.opt is not None
        for g in lrn.opt.param_groups:
            g["lr"] = lr
        lrn.opt.zero_grad(set_to_none=True)
        gen.manual_seed(derive_seed(seed, 4 + i, rank, step))
        kw: dict[str, Any] = {}
        if lrn.kind == "diffusion" and stage.cfg.anchor == "direct":  # residual diffusion over the twin's EMA
            kw["anchor_net"] = next(o.ema.module for o in learners if o.kind == "direct")
        loss_fn = diffusion_loss if lrn.kind == "diffusion" else direct_loss
        with torch.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
            loss, logs = loss_fn(lrn.model, x0, frontal, lateral, cond, schedule=schedule, generator=gen,
                                 physics_weight=stage.cfg.physics_weight, physics=physics, **kw)
        if hooks.perturb_loss is not None:
            loss = hooks.perturb_loss(step + 1, rank, i, loss)
            logs["loss"] = loss.detach()
        if lrn.scaler is not None:
            lrn.scaler.scale(loss).backward()
            lrn.scaler.unscale_(lrn.opt)
        else:
            loss.backward()
        gnorm = torch.nn.utils.clip_grad_norm_(lrn.model.parameters(), grad_clip).detach().float()
        for key in sorted(logs):
            keys.append(lrn.prefix + key)
            stats.append(logs[key].float().reshape(()))
        keys.append(lrn.prefix + "grad_norm")
        stats.append(gnorm.reshape(()))
        fatal.append((~torch.isfinite(loss.detach().float())).float().reshape(()))
        if lrn.scaler is None:  # fp16: an overflowing gradient is the scaler's business
            fatal.append((~torch.isfinite(gnorm)).float().reshape(()))
    return StepStats(keys, torch.stack(stats).to(device), torch.stack(fatal).sum().reshape(1).to(device))


def sync_stats(stats: StepStats, distributed: bool, world_size: int) -> tuple[dict[str, float], bool]:
    """One small all-reduce: the logs' mean over ranks and "did any rank see a non-finite
    value". Returns ``(values, any_fatal)``; without a process group, this rank's values."""
    payload = torch.cat([torch.nan_to_num(stats.local, nan=0.0, posinf=0.0, neginf=0.0), stats.fatal])
    if distributed:
        dist.all_reduce(payload)
        payload[:-1] /= world_size
    host = payload.tolist()
    values = host[:-1] if distributed else stats.local.tolist()
    return dict(zip(stats.keys, values, strict=True)), host[-1] > 0


# --------------------------------------------------------------------------- checkpoints


def compat_key(params: Params, stage: Stage, kinds: list[str]) -> str:
    """What a checkpoint's weights depend on: the stage's network, the model/diffusion/DRR
    sections, the HU map and window and which learners exist. Other params (LR, steps,
    logging) may change between resumes."""
    blob = {
        "stage": stage.cfg.model_dump(mode="json"),
        "prev": stage.prev.size if stage.prev is not None else None,
        "model": params.model.model_dump(mode="json"),
        "diffusion": params.diffusion.model_dump(mode="json"),
        "drr": params.drr.model_dump(mode="json"),
        "hu": params.hu.model_dump(mode="json"),
        "learners": kinds,
    }
    return hashlib.sha256(json.dumps(blob, sort_keys=True).encode()).hexdigest()[:16]


class Checkpointer:
    """One stage's training states: which one to resume from, whether it fits this network
    (the compatibility key), saving (rank 0) and pruning to ``keep_last`` + the best."""

    def __init__(self, layout: RunLayout, keep_last: int, compat: str, is_main: bool) -> None:
        self.layout = layout
        self.keep_last = int(keep_last)
        self.compat = compat
        self.is_main = is_main
        last = list_checkpoints(layout.checkpoints)[-1:] if is_main else []
        self.last: tuple[int, str] | None = (last[0][0], str(last[0][1])) if last else None

    def pick(self, resume_from: str | Path | None, fresh: bool) -> tuple[dict[str, Any] | None, str | None]:
        """The newest of ``resume_from`` and the newest local checkpoint, loaded (or ``None``)."""
        if fresh:
            return None, None
        cands: list[tuple[int, str]] = []
        ext_state: dict[str, Any] | None = None
        if resume_from is not None:
            ext_state = load_state(resume_from)
            cands.append((int(ext_state["step"]), str(resume_from)))
        loc = latest_checkpoint(self.layout.checkpoints)
        if loc is not None:
            cands.append((loc[0], str(loc[1])))
        if not cands:
            return None, None
        _, path = max(cands, key=lambda c: c[0])
        if ext_state is not None and path == str(resume_from):
            return ext_state, path
        return load_state(path), path

    def check(self, state: Mapping[str, Any], path: str, name: str) -> None:
        """Refuse a checkpoint of another network (:class:`ConfigError`)."""
        if state.get("compat") != self.compat:
            raise ConfigError(
                f"{path}: checkpoint was trained with a different {name} network/schedule "
                f"(params changed); restore them or start over with --fresh"
            )

    def save(self, step: int, state: Mapping[str, Any], best_step: int | None) -> str | None:
        """Write ``step``'s state (rank 0), prune, return its directory (``None`` off rank 0)."""
        if not self.is_main:
            return None
        d = save_state(self.layout.checkpoints, step, {**state, "compat": self.compat})
        prune_checkpoints(self.layout.checkpoints, self.keep_last, [best_step] if best_step is not None else [])
        self.last = (step, str(d))
        return str(d)

    def last_good(self) -> str:
        return f"{self.last[1]} (step {self.last[0]})" if self.last else "none written yet"


# --------------------------------------------------------------------------- preflight


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

    st = params.stage(stage)
    if steps is None:
        st.train_steps  # noqa: B018 - raises ConfigError when absent
    tp = params.train
    base = tp.best_metric.removeprefix("single_")
    if base not in METRIC_KEYS and not base.startswith("reproj_"):
        raise ConfigError(f"train.best_metric {tp.best_metric!r} is not a validation metric ({', '.join(METRIC_KEYS)})")
    if tp.best_metric.startswith("reproj_") and not tp.val_reprojection:
        raise ConfigError(f"train.best_metric {tp.best_metric!r} needs train.val_reprojection: true")
    if st.cfg.anchor == "direct" and not tp.direct_baseline:
        raise ConfigError(f"{st.name}: anchor 'direct' (residual diffusion over the direct twin) needs "
                          "train.direct_baseline: true")
    ds = XrayCTDataset(processed_dir, st.k, "train", params.hu.net_map())
    if len(ds) == 0:
        raise InputError(Path(processed_dir) / "manifest.json", "the train split is empty")
    if ds.grid.size != st.size:
        raise ConfigError(
            f"{st.name}: processed data has {ds.grid.size}³ volumes for stage {st.k} but params say {st.size}³ "
            "(re-run preprocess)"
        )
    per_worker = math.ceil(len(ds) / world_size)
    if per_worker < st.cfg.batch_size:
        raise ConfigError(
            f"{st.name}: batch_size {st.cfg.batch_size} exceeds the {per_worker} training volumes per worker "
            f"({len(ds)} volumes / {world_size} workers)"
        )
    if check_models:
        layout = RunLayout(Path(out_dir if out_dir is not None else tp.out_dir).absolute(), st.k)
        for j in range(1, st.k):  # frozen earlier stages are needed for validation
            p = layout.model(tp.prev_stage_model, stage=j)
            if not p.is_file():
                raise InputError(p, f"stage {j} model not found: train stage {j} first (xct train --stage {j})")


# --------------------------------------------------------------------------- validation


class _Validator:
    """Rank-0 validation: THE evaluator on the val split (module docstring)."""

    def __init__(self, params: Params, stage: Stage, processed_dir: str | Path, ids: list[str], layout: RunLayout,
                 device: torch.device, hooks: TrainHooks) -> None:
        from xct_core.diffusion import Sampler
        from xct_core.evaluation import EvalProtocol, dataset_cases

        self.params, self.stage, self.layout, self.device, self.hooks = params, stage, layout, device, hooks
        self.tp = params.train
        self.protocol = EvalProtocol.from_params(params)
        self.sampler = Sampler.from_params(params, self.tp.val_sample_steps)
        self.cases = list(dataset_cases(processed_dir, stage.k, "val", ids))
        self.prev: list[nn.Module] | None = None

    def _frozen(self) -> list[nn.Module]:
        if self.prev is None:
            from xct_core.evaluation import load_cascade

            self.prev = (load_cascade(self.layout.out_dir, self.stage.k - 1, self.params,
                                      which=self.tp.prev_stage_model, device=self.device) if self.stage.k > 1 else [])
        return self.prev

    @torch.no_grad()
    def run(self, step: int, emas: list[nn.Module]) -> dict[str, float]:
        from xct_core.evaluation import aggregate, evaluate_case, montage_volumes
        from xct_core.models import AnchoredStage

        frozen = self._frozen()
        direct = emas[1] if len(emas) > 1 else None
        if getattr(emas[0], "anchored", False):  # the stage as it is exported: with its twin
            emas = [AnchoredStage(emas[0], emas[1]), *emas[1:]]
        rows = []
        for case in self.cases:
            res = evaluate_case(case, [*frozen, emas[0]], self.params, self.protocol, sampler=self.sampler,
                                samples=self.tp.val_samples, direct=direct, reprojection=self.tp.val_reprojection,
                                device=self.device)
            rows.append(res.metrics)
            if case.index == 0:
                st = self.stage
                vols, spacing = montage_volumes(res, st.spacing_mm, st.prev.spacing_mm if st.prev else None)
        out = {f"val/{k}": v for k, v in aggregate(rows).items()}
        self._montage(step, vols, spacing, out)
        return out

    def _montage(self, step: int, vols: dict[str, np.ndarray], spacing: dict[str, Any], metrics: Mapping[str, float]) -> None:
        from xct_core.viz import save_slice_montage

        w = self.protocol.window
        title = (
            f"{self.stage.name} step {step}: PSNR(window) {metrics.get('val/psnr_window_db', float('nan')):.2f} dB, "
            f"SSIM {metrics.get('val/ssim_window', float('nan')):.3f} ({w.name} window, EMA, "
            f"{self.tp.val_sample_steps} DDIM steps, {self.tp.val_samples} sample(s))"
        )
        path = self.layout.montages / f"{step_dir_name(step)}.png"
        save_slice_montage(vols, path, [w, self.protocol.wide], spacing=spacing, title=title)
        if self.hooks.log_artifact is not None:
            self.hooks.log_artifact(str(path), "val_montages")


# --------------------------------------------------------------------------- the loop


def _batch_stream(
    loader: DataLoader, sampler: ShardSampler, start_step: int, steps_per_epoch: int, batch_size: int
) -> Iterator[Mapping[str, Any]]:
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


@dataclass
class _Progress:
    """What the loop carries from step to step (and into checkpoints)."""

    step: int
    samples_seen: int = 0
    best_step: int | None = None
    best_value: float | None = None
    last_val: dict[str, float] = field(default_factory=dict)
    last_loss: float | None = None
    window_t: float = 0.0
    window_steps: int = 0
    run_t: float = 0.0


class _StageRun:
    """One call of :func:`train_stage`: the resolved stage, its data, learners, checkpointer,
    progress and outputs. Each phase of the loop is one method, so the loop itself reads as
    set up → ``while``: :meth:`step`, :meth:`after_step` → :meth:`close`."""

    def __init__(self, params: Params, stage: int, processed_dir: str | Path, out_dir: str | Path | None, *,
                 device: str | torch.device | None, rank: int, world_size: int, resume_from: str | Path | None,
                 hooks: TrainHooks | None, faults: FaultPlan | None, steps: int | None, fresh: bool) -> None:
        self.params, self.tp, self.st = params, params.train, params.stage(stage)
        self.cfg, self.name = self.st.cfg, self.st.name
        self.max_steps = int(steps) if steps is not None else self.st.train_steps
        if self.max_steps < 1:
            raise ConfigError(f"steps must be >= 1, got {self.max_steps}")
        self.layout = RunLayout(Path(out_dir if out_dir is not None else self.tp.out_dir).absolute(), self.st.k)
        self.hooks = (faults or FaultPlan()).install(hooks or TrainHooks(), self.layout)
        self.dev = torch.device(device) if device is not None else torch.device(
            "cuda" if torch.cuda.is_available() else "cpu")
        self.rank, self.world_size, self.is_main = rank, world_size, rank == 0
        self.distributed = _dist_on(world_size)
        if world_size > 1 and not self.distributed:
            raise RuntimeError("world_size > 1 needs an initialised torch.distributed process group")
        if fresh and self.is_main:
            self.layout.clear()
        if self.distributed:
            dist.barrier()
        self.global_batch = self.cfg.batch_size * world_size
        self._data(processed_dir)
        self._learners(resume_from, fresh)
        self.schedule = CosineSchedule.from_params(params.diffusion)
        self.physics = PhysicsLoss.from_params(params, self.st) if self.cfg.physics_weight > 0 else None
        self.train_curve = _Curves(self.layout.plots / "train.csv", self.start_step) if self.is_main else None
        self.val_curve = _Curves(self.layout.plots / "val.csv", self.start_step) if self.is_main else None
        self.validator = (_Validator(params, self.st, processed_dir, self.val_ids, self.layout, self.dev, self.hooks)
                          if self.is_main and self.val_ids else None)
        self.params_json = json.dumps(params.model_dump(mode="json"), sort_keys=True)

    # --- set-up ------------------------------------------------------------------------------

    def _data(self, processed_dir: str | Path) -> None:
        """The checked data folder, this rank's shard of the train split, the val ids (rank 0)."""
        from xct_core.data import XrayCTDataset

        preflight(self.params, self.st.k, processed_dir, self.layout.out_dir, world_size=self.world_size,
                  steps=self.max_steps)
        train_ds = XrayCTDataset(processed_dir, self.st.k, "train", self.params.hu.net_map())
        self.sampler = ShardSampler(train_ds, self.world_size, self.rank, seed=self.params.seed)
        self.steps_per_epoch = self.sampler.num_samples // self.cfg.batch_size
        loader: DataLoader = DataLoader(
            train_ds, batch_size=self.cfg.batch_size, sampler=self.sampler, drop_last=True,
            num_workers=self.tp.loader_workers, pin_memory=self.dev.type == "cuda",
        )
        self.loader = self.hooks.prepare_loader(loader) if self.hooks.prepare_loader is not None else loader
        self.val_ids: list[str] = []
        if self.is_main:
            all_val = list(train_ds.manifest["splits"].get("val", []))
            self.val_ids = all_val[: self.tp.val_max_volumes] if self.tp.val_max_volumes > 0 else all_val

    def _learners(self, resume_from: str | Path | None, fresh: bool) -> None:
        """The networks (diffusion stage, + direct twin), their optimisers, and the state of
        the checkpoint the run resumes from (every rank must pick the same step)."""
        params, tp, st, dev = self.params, self.tp, self.st, self.dev
        torch.manual_seed(derive_seed(params.seed, 1, self.rank))
        np.random.seed(derive_seed(params.seed, 2, self.rank) % 2**32)
        random.seed(derive_seed(params.seed, 3, self.rank))
        self.learners = [_Learner("diffusion", build_stage(params, st), tp.ema_decay)]
        if tp.direct_baseline:
            self.learners.append(_Learner("direct", build_stage(params, st, mode="direct"), tp.ema_decay))
        self.ckpt = Checkpointer(self.layout, tp.keep_last, compat_key(params, st, [lrn.kind for lrn in self.learners]),
                                 self.is_main)
        state, self.resumed_from = self.ckpt.pick(resume_from, fresh)
        self.start_step = int(state["step"]) if state is not None else 0
        if self.distributed:  # every rank must resume from the same step (shared storage)
            t = torch.tensor([self.start_step, -self.start_step], dtype=torch.float64)
            t = t.to(dev) if dist.get_backend() == "nccl" else t
            dist.all_reduce(t, op=dist.ReduceOp.MAX)
            if int(t[0]) != self.start_step or int(-t[1]) != self.start_step:
                raise TrainingFailed(
                    f"{self.name}: workers found different checkpoints to resume from (steps {int(-t[1])}…{int(t[0])}); "
                    f"{self.layout.out_dir} must be storage every worker sees"
                )
        if state is not None:
            assert self.resumed_from is not None
            self.ckpt.check(state, self.resumed_from, self.name)
            for lrn in self.learners:
                lrn.load(state["learners"][lrn.kind])
        self.amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(tp.precision) if dev.type == "cuda" else None
        for lrn in self.learners:
            lrn.model = self.hooks.prepare_model(lrn.net) if self.hooks.prepare_model is not None else lrn.net.to(dev)
            lrn.net = unwrap(lrn.model)
            lrn.ema.module.to(dev)
            lrn.opt = torch.optim.AdamW(lrn.model.parameters(), lr=self.cfg.lr, betas=tuple(tp.adam_betas),
                                        weight_decay=tp.weight_decay)
            if self.amp_dtype == torch.float16:
                lrn.scaler = torch.amp.GradScaler("cuda")
            if state is not None:
                saved = state["learners"][lrn.kind]
                lrn.opt.load_state_dict(saved["optimizer"])
                if lrn.scaler is not None and saved["scaler"]:
                    lrn.scaler.load_state_dict(saved["scaler"])
        self.prog = _Progress(step=self.start_step)
        if state is not None:
            if self.is_main and state.get("rng") is not None:
                restore_rng(state["rng"])
            self.prog.best_step, self.prog.best_value = state.get("best_step"), state.get("best_value")
            self.prog.last_val = json.loads(state.get("last_val", "{}"))
            self.prog.samples_seen = int(state.get("samples_seen", 0))

    # --- one step and its cadence -------------------------------------------------------------

    def batches(self) -> Iterator[Mapping[str, Any]]:
        if self.dev.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.dev)
        return _batch_stream(self.loader, self.sampler, self.start_step, self.steps_per_epoch, self.cfg.batch_size)

    def progress_bar(self) -> Any:
        if not self.is_main:
            return None
        return (self.hooks.progress or _default_progress)(total=self.max_steps, initial=self.start_step, desc=self.name)

    def step(self, batches: Iterator[Mapping[str, Any]]) -> tuple[dict[str, float], float]:
        """One optimiser step of every learner (fault hooks around it, finiteness checked on
        all ranks before any update); returns the synchronised logs and the LR used."""
        step, hooks = self.prog.step, self.hooks
        if hooks.before_step is not None:
            hooks.before_step(step + 1, self.rank)
        t0 = time.perf_counter()
        lr = self.cfg.lr * lr_factor(step, self.max_steps, self.tp.warmup_steps, self.tp.min_lr_ratio)
        stats = train_step(self.learners, next(batches), step=step, lr=lr, rank=self.rank, seed=self.params.seed,
                           device=self.dev, schedule=self.schedule, stage=self.st, physics=self.physics,
                           grad_clip=self.tp.grad_clip, amp_dtype=self.amp_dtype, hooks=hooks)
        values, bad = sync_stats(stats, self.distributed, self.world_size)
        if bad:
            here = ", ".join(f"{k.removeprefix('train/')}={v:.4g}" for k, v in zip(stats.keys, stats.local.tolist(), strict=True))
            raise NonFiniteError(
                f"{self.name}: non-finite loss or gradient at step {step + 1} (rank {self.rank}: {here}); training "
                f"stopped before the optimizer step. Last good checkpoint: {self.ckpt.last_good()}",
                step + 1, self.ckpt.last[1] if self.ckpt.last else None,
            )
        for lrn in self.learners:
            lrn.update()
        self.prog.step = step = step + 1
        self.prog.samples_seen += self.global_batch
        for lrn in self.learners:
            lrn.ema.update(lrn.net, step)
        if hooks.after_step is not None:
            hooks.after_step(step, self.rank)
        dt = time.perf_counter() - t0
        p = self.prog
        p.window_t, p.window_steps, p.run_t = p.window_t + dt, p.window_steps + 1, p.run_t + dt
        p.last_loss = values["train/loss"]
        return values, lr

    def after_step(self, values: dict[str, float], lr: float, bar: Any) -> None:
        """Logging, validation and checkpoint cadence of the step just taken; every rank
        reports at the same steps (Ray Train needs equal call counts)."""
        step, tp = self.prog.step, self.tp
        do_log = step % tp.log_every == 0 or step == self.max_steps
        do_val = step == self.max_steps or (tp.val_every > 0 and step % tp.val_every == 0)
        do_ckpt = do_val or step % tp.ckpt_every == 0 or step == self.max_steps
        if not (do_log or do_ckpt):
            return
        metrics: dict[str, float] = {"step": float(step)}
        if do_log:
            metrics.update(self._log(step, values, lr, bar))
        if do_val and self.is_main:
            metrics.update(self.validate(step))
            if bar is not None and self.prog.last_val:
                bar.set_description(f"{self.name} val {tp.best_metric} "
                                    f"{self.prog.last_val.get('val/' + tp.best_metric, float('nan')):.3f}")
        ckpt_dir = self.checkpoint(step) if do_ckpt else None
        if self.is_main and do_ckpt:
            metrics["checkpoint_step"] = float(step)
        _report(self.hooks, metrics, ckpt_dir)

    def _log(self, step: int, values: dict[str, float], lr: float, bar: Any) -> dict[str, float]:
        p = self.prog
        m = dict(values)
        m["train/lr"] = lr
        m["train/samples_per_s"] = p.window_steps * self.global_batch / max(p.window_t, 1e-9)
        m["train/step_time_s"] = p.window_t / max(p.window_steps, 1)
        m["train/epoch"] = step / self.steps_per_epoch
        m["sys/peak_mem_mb"] = _peak_mem_mb(self.dev)
        p.window_t, p.window_steps = 0.0, 0
        if self.train_curve is not None:
            self.train_curve.append(step, {k.split("/", 1)[1]: v for k, v in m.items() if k.startswith(("train/", "sys/"))})
        if bar is not None:
            bar.set_description(f"{self.name} loss {values['train/loss']:.4f} | {m['train/samples_per_s']:.2f} samples/s")
        return m

    # --- outputs -------------------------------------------------------------------------------

    def export(self, which: str, step: int, metrics: Mapping[str, float]) -> Path:
        """EMA weights → models/stage{k}/{which}.pt (+ direct.pt at the end); the metrics
        stored with a model are its own validation metrics, without the ``val/`` prefix."""
        st, learners = self.st, self.learners
        own = {m.removeprefix("val/"): v for m, v in metrics.items() if not m.startswith("val/direct_")}
        path = self.layout.model(which)
        twin = learners[1].ema.module if st.cfg.anchor == "direct" else None  # an anchored stage ships its twin
        export_stage_model(path, learners[0].ema.module, params_json=self.params_json, stage=st.k, name=self.name,
                           mode="diffusion", step=step, metrics=own, anchor=twin)
        if which == "final" and len(learners) > 1:
            direct = {m.removeprefix("val/direct_"): v for m, v in metrics.items() if m.startswith("val/direct_")}
            export_stage_model(self.layout.model("direct"), learners[1].ema.module, params_json=self.params_json,
                               stage=st.k, name=self.name, mode="direct", step=step, metrics=direct)
        return path

    def validate(self, step: int) -> dict[str, float]:
        """Validation metrics of this step; exports best.pt when ``best_metric`` improved."""
        if self.validator is None:
            return {}
        t0 = time.perf_counter()
        vals = self.validator.run(step, [lrn.ema.module for lrn in self.learners])
        vals["val/time_s"] = time.perf_counter() - t0
        p, tp = self.prog, self.tp
        p.last_val = vals
        assert self.val_curve is not None
        self.val_curve.append(step, {k.removeprefix("val/"): v for k, v in vals.items()})
        key = f"val/{tp.best_metric}"
        if key not in vals:
            raise ConfigError(f"train.best_metric {tp.best_metric!r} is not a validation metric ({', '.join(sorted(vals))})")
        v = vals[key]
        if math.isfinite(v) and (p.best_value is None or (v > p.best_value if tp.best_mode == "max" else v < p.best_value)):
            p.best_step, p.best_value = step, float(v)
            self.export("best", step, vals)
        return vals

    def checkpoint(self, step: int) -> str | None:
        if not self.is_main:
            return None
        p = self.prog
        return self.ckpt.save(step, {
            "format": STATE_FORMAT, "stage": self.st.k, "name": self.name, "step": step, "max_steps": self.max_steps,
            "samples_seen": p.samples_seen, "world_size": self.world_size, "params": self.params_json,
            "learners": {lrn.kind: lrn.state() for lrn in self.learners}, "rng": capture_rng(),
            "best_step": p.best_step, "best_value": p.best_value, "last_val": json.dumps(p.last_val),
        }, p.best_step)

    def _finish_models(self, step: int) -> None:
        """Export final.pt (and best.pt = final.pt when nothing was validated)."""
        self.export("final", step, self.prog.last_val)
        if self.prog.best_step is None:
            shutil.copyfile(self.layout.model("final"), self.layout.model("best"))

    def result(self, steps_run: int) -> TrainResult:
        p, layout = self.prog, self.layout
        return TrainResult(
            stage=self.st.k, name=self.name, start_step=self.start_step, final_step=p.step,
            resumed_from=self.resumed_from, final_model=layout.model("final"),
            best_model=layout.model("best") if self.is_main else None, best_step=p.best_step,
            best_value=p.best_value, val_metrics=p.last_val, train_loss=p.last_loss,
            samples_per_s=steps_run * self.global_batch / max(p.run_t, 1e-9) if steps_run else None,
            steps_run=steps_run,
        )

    def already_finished(self) -> TrainResult:
        """The checkpoint is at (or past) ``max_steps``: make sure final.pt is that step's, report once."""
        final_path = self.layout.model("final")
        if self.is_main and (not final_path.is_file() or read_stage_model(final_path)["step"] != self.start_step):
            self._finish_models(self.start_step)
        _report(self.hooks, {"step": float(self.start_step), "done": 1.0}, None)
        return self.result(0)

    def close(self) -> TrainResult:
        """After the last step: final/best models, the run's metrics.json, the artifacts."""
        p = self.prog
        res = self.result(p.step - self.start_step)
        if not self.is_main:
            return res
        self._finish_models(p.step)
        tp = self.tp
        summary = {
            "stage": self.st.k, "name": self.name, "step": p.step, "start_step": self.start_step,
            "best_step": p.best_step, "best_metric": tp.best_metric, "best_value": p.best_value,
            "train_loss": p.last_loss, "samples_per_s": res.samples_per_s, "workers": self.world_size,
            **{k.removeprefix("val/"): v for k, v in p.last_val.items()},
        }
        write_json_atomic(self.layout.metrics_file, summary)
        if self.hooks.log_artifact is not None:
            for which in ("final", "best", "direct"):
                if self.layout.model(which).is_file():
                    self.hooks.log_artifact(str(self.layout.model(which)), "model")
        return res


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
        out_dir: outputs (default ``params.train.out_dir``); layout :class:`RunLayout`.
            With several workers it must be storage every rank sees (rank 0 writes).
        device: default CUDA when available, else CPU.
        rank, world_size: this worker's global rank and the number of workers. When
            ``world_size > 1`` a ``torch.distributed`` process group must be initialised
            (the engine does it) and ``hooks.prepare_model`` should wrap in DDP.
        resume_from: a checkpoint directory to resume from (e.g. the engine's latest); the
            newer of it and the newest local checkpoint is used.
        hooks: engine binding (:class:`TrainHooks`).
        faults: fault injection for tests (:class:`FaultPlan`, installed into ``hooks``).
        steps: override ``params.train.steps[stage name]``.
        fresh: delete this stage's previous outputs first (rank 0) instead of resuming.

    Raises:
        InputError / ConfigError: bad data folder, missing earlier-stage model, bad params.
        NonFiniteError: a non-finite loss or gradient (names the step; last good checkpoint kept).
    """
    run = _StageRun(params, stage, processed_dir, out_dir, device=device, rank=rank, world_size=world_size,
                    resume_from=resume_from, hooks=hooks, faults=faults, steps=steps, fresh=fresh)
    if run.start_step >= run.max_steps:
        return run.already_finished()
    bar = run.progress_bar()
    batches = run.batches()
    try:
        while run.prog.step < run.max_steps:
            values, lr = run.step(batches)
            if bar is not None:
                bar.update(1)
            run.after_step(values, lr, bar)
    finally:
        if bar is not None:
            bar.close()
    return run.close()
