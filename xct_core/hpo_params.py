"""Typed ``hpo`` section of a params file: the Optuna search (``xct hpo``).

Its own module, not xct_core/config.py: the HPO settings are operational (how a search
runs), and no dvc.yaml science step imports this file, so editing a default here re-runs
none of them. :class:`xct_core.config.Params` knows the section's name only;
``components.ops_params.OpsParams`` validates it with :class:`HPOParams`, and the pure
search logic (xct_core/hpo.py) reads it from there. Defaults = params.yaml's ``hpo``
(tests/test_one_source.py).
"""

from __future__ import annotations

import json
from typing import Any, Literal

from pydantic import Field, field_validator
from pydantic import model_validator as _model_validator

from xct_core.config import MetricName
from xct_core.config import Section as _Section


class HPODistribution(_Section):
    """One searched parameter of ``hpo.space``.

    ``float`` / ``int``: uniform on [low, high] (``log``: log-uniform, needs low > 0; ``step``:
    a grid low, low+step, …; not with ``log``). ``categorical``: one of ``choices``
    (scalars: numbers, strings, booleans, null).
    """

    type: Literal["float", "int", "categorical"]
    low: float | None = None
    high: float | None = None
    log: bool = False
    step: float | None = Field(None, gt=0)
    choices: list[Any] | None = None

    @_model_validator(mode="after")
    def _check(self) -> HPODistribution:
        if self.type == "categorical":
            if not self.choices:
                raise ValueError("a categorical distribution needs a non-empty 'choices' list")
            bad = [c for c in self.choices if c is not None and not isinstance(c, (bool, int, float, str))]
            if bad:
                raise ValueError(f"choices must be scalars (number, string, boolean, null), got {bad!r}")
            if len({json.dumps(c) for c in self.choices}) != len(self.choices):
                raise ValueError(f"choices contain duplicates: {self.choices!r}")
            if self.low is not None or self.high is not None or self.log or self.step is not None:
                raise ValueError("a categorical distribution takes only 'choices' (no low/high/log/step)")
            return self
        if self.choices is not None:
            raise ValueError(f"a {self.type} distribution takes low/high, not 'choices'")
        if self.low is None or self.high is None:
            raise ValueError(f"a {self.type} distribution needs 'low' and 'high'")
        if not self.low < self.high:
            raise ValueError(f"low ({self.low:g}) must be smaller than high ({self.high:g})")
        if self.log and self.low <= 0:
            raise ValueError(f"log: true needs low > 0, got {self.low:g}")
        if self.log and self.step is not None:
            raise ValueError("'step' and 'log: true' cannot be combined")
        if self.type == "int":
            ints = [v for v in (self.low, self.high, self.step) if v is not None]
            if any(float(v) != int(v) for v in ints):
                raise ValueError(f"an int distribution needs integer low/high/step, got {ints}")
        return self


#: default search space of ``xct hpo`` (= params.yaml); ``{stage}`` expands to the tuned stage
_DEFAULT_HPO_SPACE: dict[str, HPODistribution] = {
    "stages.{stage}.lr": HPODistribution(type="float", low=1.0e-4, high=3.0e-3, log=True),
    "stages.{stage}.lift_channels": HPODistribution(type="categorical", choices=[8, 16, 32]),
    "stages.{stage}.physics_weight": HPODistribution(type="float", low=0.0, high=0.3),
    "stages.{stage}.token_grid": HPODistribution(type="categorical", choices=[4, 8]),
}


class HPOParams(_Section):
    """``xct hpo --stage K --trials N``: an Optuna study (TPE) run as Ray Tune trials.

    Each trial is a short stage-K training (``steps`` of the stage, validation every
    ``val_every`` steps); the scheduler (ASHA or the median stopping rule) stops trials whose
    intermediate validation ``metric`` lags, and the study records them as PRUNED. The study
    lives in ``storage`` (an Optuna RDB: any SQLAlchemy URL; relative sqlite paths are
    relative to the working directory) and resumes when re-run. Outputs in ``out_dir``:
    ``best_stage{K}.yaml`` (a params overlay holding only the searched keys, picked up by
    params.yaml ``overlays``), ``stage{K}_history.png``, ``stage{K}_importance.png``,
    ``stage{K}_trials.csv``; per-trial training outputs in ``trials/<study>/trial_NNNN``.
    """

    #: Optuna storage; a cluster uses e.g. postgresql+psycopg2://user@host:5432/optuna (the
    #: password from PGPASSWORD / ~/.pgpass or `xct hpo --storage` / $XCT_HPO_STORAGE, never here)
    storage: str = "sqlite:///hpo/optuna.db"
    #: default study name: "{study_prefix}-stage{K}" (`xct hpo --study NAME` overrides)
    study_prefix: str = "xct"
    #: validation metric optimised (a key of xct_core.metrics.volume_metrics) and its direction
    metric: MetricName = "psnr_window_db"
    mode: Literal["max", "min"] = "max"
    #: optimiser steps of one trial, per stage
    steps: dict[str, int] = Field(default_factory=lambda: {"stage1": 200, "stage2": 60, "stage3": 30})
    #: validation every N steps of a trial (and at its end): the intermediate values the scheduler sees
    val_every: int = Field(25, ge=1)
    #: early stopping: asha (async successive halving) | median (median stopping rule)
    scheduler: Literal["asha", "median"] = "asha"
    #: no trial is stopped before this many validation rounds
    grace_rounds: int = Field(3, ge=1)
    #: asha: keep the top 1/reduction_factor of trials at each rung
    reduction_factor: float = Field(2.0, gt=1)
    #: median: compare with at least this many other trials (fewer: continue)
    min_samples: int = Field(2, ge=1)
    #: trials run at the same time (Ray schedules them over the cluster)
    max_concurrent_trials: int = Field(1, ge=1)
    #: resources of one trial (one process; torch threads = CPUs)
    cpus_per_trial: float = Field(1.0, gt=0)
    gpus_per_trial: float = Field(0.0, ge=0)
    #: TPE sampler seed
    seed: int = 0
    #: MLflow experiment of the study runs (one run per study, one child run per trial)
    experiment: str = "xct-hpo"
    #: outputs (fragment, plots, trials table, per-trial training outputs)
    out_dir: str = "hpo"
    #: configurations evaluated first when a study is created: [{param path: value}, …]
    points: list[dict[str, Any]] = Field(default_factory=list)
    #: searched parameters: dotted params path ({stage} = the tuned stage) → distribution
    space: dict[str, HPODistribution] = Field(default_factory=lambda: dict(_DEFAULT_HPO_SPACE))

    @field_validator("steps")
    @classmethod
    def _positive_trial_steps(cls, v: dict[str, int]) -> dict[str, int]:
        bad = {k: n for k, n in v.items() if int(n) < 1}
        if bad:
            raise ValueError(f"steps must be >= 1, got {bad}")
        return v

