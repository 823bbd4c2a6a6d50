"""How an engine (and a test) plugs into the loop: :class:`TrainHooks`, and the fault
injection of the resilience tests (:class:`FaultPlan`) that reaches the loop only through them."""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader

from xct_core.errors import ConfigError
from xct_core.layout import RunLayout

__all__ = ["FaultPlan", "ReportFn", "TrainHooks", "call_report", "default_progress", "default_warn"]

ReportFn = Callable[[dict[str, float], "str | None"], None]


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
        warn: ``warn(line)`` — one line the user must see (e.g. a damaged checkpoint that was
            skipped on resume); rank 0 only. Default: ``xct: warning: <line>`` on stderr.
    """

    report: ReportFn | None = None
    log_artifact: Callable[[str, str], None] | None = None
    prepare_model: Callable[[nn.Module], nn.Module] | None = None
    prepare_loader: Callable[[DataLoader], DataLoader] | None = None
    progress: Callable[..., Any] | None = None
    before_step: Callable[[int, int], None] | None = None
    after_step: Callable[[int, int], None] | None = None
    perturb_loss: Callable[[int, int, int, torch.Tensor], torch.Tensor] | None = None
    warn: Callable[[str], None] | None = None


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



def default_progress(total: int, initial: int, desc: str) -> Any:
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, desc=desc, unit="step", dynamic_ncols=True, mininterval=1.0)


def default_warn(line: str) -> None:
    """A warning line on stderr, in the CLI's ``xct: warning:`` form."""
    from xct_core.errors import warning_line

    print(warning_line(line), file=sys.stderr, flush=True)


def call_report(hooks: TrainHooks, metrics: dict[str, float], ckpt: str | None) -> None:
    if hooks.report is not None:
        hooks.report(metrics, ckpt)
