"""What :func:`~xct_core.training.train_stage` returns (:class:`TrainResult`, its one-line
:func:`summary_line`) or raises (:class:`TrainingFailed`, :class:`NonFiniteError`,
:class:`Terminated`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from xct_core.errors import XctError

__all__ = ["NonFiniteError", "Terminated", "TrainResult", "TrainingFailed", "summary_line"]


class TrainingFailed(XctError):
    """Training stopped for a reason the user must act on (the message says which)."""

    exit_code = 1


class NonFiniteError(TrainingFailed):
    """A non-finite loss or gradient; ``step`` is the (1-based) step that produced it."""

    def __init__(self, message: str, step: int, last_good: str | None) -> None:
        super().__init__(message)
        self.step = step
        self.last_good = last_good


class Terminated(TrainingFailed):
    """The run was stopped by SIGTERM (a Kubernetes eviction, ``kill``): exit 143 (128 + 15),
    the shell's code for it. Raised by :class:`xct_core.training.guards.SigtermGuard`."""

    exit_code = 143


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
