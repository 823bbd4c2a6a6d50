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

Cross-fitted anchors (``stages.stageK.anchor_folds`` = F ≥ 2, anchored stages): F more twins,
twin ``g`` trained on every hash-fold of the train ids but ``g``; the residual diffusion of a
fold-``g`` volume is anchored on twin ``g`` (out-of-fold residuals, as at inference). The
all-data twin is still the shipped anchor; the fold twins live in checkpoints only
(:mod:`~xct_core.training.crossfit`). F = 1 (default) is the uncross-fitted step bit for bit.

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
of a different network (stage/model/diffusion/DRR/HU params) is refused. Each checkpoint
carries a sha256 of its ``state.pt``; a damaged one (changed bytes, truncated, unreadable) is
never resumed silently: one warning line names it, it is moved aside and the newest intact
older one is used, or, with ``train.on_corrupt_checkpoint: fail``, the run is refused
(:class:`Checkpointer`). A failed checkpoint write (disk full, ``ulimit -f``) is one line
naming it and the last good one.

One run per output folder and SIGTERM as a clean stop (:mod:`xct_core.training.guards`,
used by the engine bindings): a second ``xct train`` on a folder is refused in one line
naming the holder's pid; SIGTERM ends a run with :class:`Terminated` (exit 143) and the
newest checkpoint intact.

Modules: :mod:`~xct_core.training.loop` (:func:`train_stage`), :mod:`~xct_core.training.step`
(one optimiser step, EMA, LR), :mod:`~xct_core.training.batches` (data sharding and resume
position), :mod:`~xct_core.training.state` (resume and save), :mod:`~xct_core.training.validation`,
:mod:`~xct_core.training.preflight`, :mod:`~xct_core.training.crossfit` (cross-fitted anchors),
:mod:`~xct_core.training.hooks` (engine binding, fault injection), :mod:`~xct_core.training.guards`, :mod:`~xct_core.training.result`. Every public
name is importable from ``xct_core.training``.

Non-finite loss or gradient: the run stops before the optimizer step with
:class:`NonFiniteError` naming the step; no checkpoint is written for it, so the last good
one stays the newest.
"""

from __future__ import annotations

from xct_core.layout import RunLayout
from xct_core.training.batches import ShardSampler
from xct_core.training.guards import SigtermGuard, folder_lock
from xct_core.training.hooks import FaultPlan, TrainHooks
from xct_core.training.loop import train_stage
from xct_core.training.preflight import preflight
from xct_core.training.result import NonFiniteError, Terminated, TrainingFailed, TrainResult, summary_line
from xct_core.training.state import Checkpointer, compat_key
from xct_core.training.step import EMA, StepStats, lr_factor, sync_stats, train_step

__all__ = [
    "EMA",
    "Checkpointer",
    "FaultPlan",
    "NonFiniteError",
    "RunLayout",
    "ShardSampler",
    "SigtermGuard",
    "StepStats",
    "Terminated",
    "TrainHooks",
    "TrainResult",
    "TrainingFailed",
    "compat_key",
    "folder_lock",
    "lr_factor",
    "preflight",
    "summary_line",
    "sync_stats",
    "train_stage",
    "train_step",
]
