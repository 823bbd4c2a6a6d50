"""One optimiser step: the LR schedule (:func:`lr_factor`), the EMA, a learner (network +
EMA + optimizer + scaler), :func:`train_step` (forward, backward, unscale, clip) and the
one all-reduce of its logs (:func:`sync_stats`)."""

from __future__ import annotations

import copy
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from xct_core.config import Stage
from xct_core.diffusion import CosineSchedule
from xct_core.losses import PhysicsLoss, diffusion_loss, direct_loss
from xct_core.models import unwrap
from xct_core.seeding import derive_seed
from xct_core.training.crossfit import FoldAnchor, batch_folds, fold_weights
from xct_core.training.hooks import TrainHooks

__all__ = ["EMA", "Learner", "StepStats", "lr_factor", "sync_stats", "train_step"]


def lr_factor(step: int, total: int, warmup: int, min_ratio: float) -> float:
    """LR multiplier for the update that produces step ``step + 1`` (``step`` = updates done).

    Linear warmup ``(step+1)/warmup`` for ``step < warmup``, then cosine from 1 down to
    ``min_ratio`` at ``step = total − 1`` (the last update)."""
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    span = max(1, total - 1 - warmup)
    prog = min(1.0, max(0.0, (step - warmup) / span))
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * prog))


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


class Learner:
    """One network being trained: the module (maybe DDP-wrapped), its EMA, optimizer and
    (fp16) grad scaler. ``kind`` = ``diffusion`` (the stage), ``direct`` (the baseline twin,
    the shipped anchor) or ``direct_fold{g}`` (a cross-fitted twin: ``holdout`` = the fold
    ``g`` of :func:`~xct_core.training.crossfit.fold_of` it never trains on)."""

    def __init__(self, kind: str, net: nn.Module, ema_decay: float, holdout: int | None = None) -> None:
        self.kind = kind
        self.holdout = holdout
        self.net = net
        self.ema = EMA(net, ema_decay)
        self.model: nn.Module = net
        self.opt: torch.optim.Optimizer | None = None
        self.scaler: torch.amp.GradScaler | None = None

    @property
    def prefix(self) -> str:
        return "train/" if self.kind == "diffusion" else f"train/{self.kind}_"

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
    learners: list[Learner],
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
    folds = int(stage.cfg.anchor_folds)
    fold_twins = sorted((o for o in learners if o.holdout is not None), key=lambda o: int(o.holdout))  # type: ignore[arg-type]
    if folds > 1 and len(fold_twins) != folds:
        raise ValueError(f"{stage.name}: anchor_folds {folds} needs {folds} fold twins, got {len(fold_twins)}")
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
            if folds > 1:  # cross-fitted: each item over the fold twin that never trained on it
                kw["anchor_net"] = FoldAnchor([o.ema.module for o in fold_twins], batch_folds(batch["id"], folds))
            else:
                kw["anchor_net"] = next(o.ema.module for o in learners if o.kind == "direct")
        if lrn.holdout is not None:  # a fold twin: no loss (and no gradient) from its held-out fold
            kw["sample_weight"] = fold_weights(batch["id"], folds, lrn.holdout).to(device)
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
