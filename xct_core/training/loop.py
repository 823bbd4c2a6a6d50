"""The loop: :func:`train_stage` sets up one :class:`_StageRun` (data, learners, resumed
state, curves, validator), then ``while step < max_steps``: :meth:`_StageRun.step`,
:meth:`_StageRun.after_step`; then :meth:`_StageRun.close` (models, metrics, artifacts)."""

from __future__ import annotations

import csv
import io
import json
import math
import random
import resource
import shutil
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader

from xct_core.atomic import write_json_atomic, write_text_atomic
from xct_core.checkpoint import STATE_FORMAT, capture_rng, export_stage_model, read_stage_model, restore_rng
from xct_core.config import Params
from xct_core.diffusion import CosineSchedule
from xct_core.errors import ConfigError
from xct_core.layout import RunLayout
from xct_core.losses import PhysicsLoss
from xct_core.models import build_stage, unwrap
from xct_core.seeding import derive_seed
from xct_core.training.batches import ShardSampler, batch_stream
from xct_core.training.crossfit import fold_kind
from xct_core.training.hooks import FaultPlan, TrainHooks, call_report, default_progress, default_warn
from xct_core.training.preflight import preflight
from xct_core.training.result import NonFiniteError, TrainingFailed, TrainResult
from xct_core.training.state import Checkpointer, compat_key
from xct_core.training.step import Learner, lr_factor, sync_stats, train_step
from xct_core.training.validation import Validator

__all__ = ["train_stage"]


def _peak_mem_mb(device: torch.device) -> float:
    """Peak memory of this process: CUDA allocator peak on GPU, max RSS on CPU (MB)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux: KiB


def _dist_on(world_size: int) -> bool:
    return world_size > 1 and dist.is_available() and dist.is_initialized()


class Curves:
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
        self.train_curve = Curves(self.layout.plots / "train.csv", self.start_step) if self.is_main else None
        self.val_curve = Curves(self.layout.plots / "val.csv", self.start_step) if self.is_main else None
        self.validator = (Validator(params, self.st, processed_dir, self.val_ids, self.layout, self.dev, self.hooks)
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
        self.learners = [Learner("diffusion", build_stage(params, st), tp.ema_decay)]
        if tp.direct_baseline:
            self.learners.append(Learner("direct", build_stage(params, st, mode="direct"), tp.ema_decay))
        if self.cfg.anchor_folds > 1:  # cross-fitted anchors: twin g never trains on fold g (training/crossfit.py)
            self.learners += [Learner(fold_kind(g), build_stage(params, st, mode="direct"), tp.ema_decay, holdout=g)
                              for g in range(self.cfg.anchor_folds)]
        self.ckpt = Checkpointer(self.layout, tp.keep_last, compat_key(params, st, [lrn.kind for lrn in self.learners]),
                                 self.is_main, on_corrupt=tp.on_corrupt_checkpoint, warn=self.hooks.warn or default_warn)
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
        return batch_stream(self.loader, self.sampler, self.start_step, self.steps_per_epoch, self.cfg.batch_size)

    def progress_bar(self) -> Any:
        if not self.is_main:
            return None
        return (self.hooks.progress or default_progress)(total=self.max_steps, initial=self.start_step, desc=self.name)

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
        call_report(self.hooks, metrics, ckpt_dir)

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
        vals = self.validator.run(step, [lrn.ema.module for lrn in self.learners[:2]])  # the stage + its shipped twin
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
        call_report(self.hooks, {"step": float(self.start_step), "done": 1.0}, None)
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
