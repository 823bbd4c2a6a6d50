"""Hyperparameter search of one cascade stage: an Optuna study whose trials run on Ray Tune.
(The user's guide, with a measured study: docs/hpo.md; the pure part: :mod:`xct_core.hpo`.)

``xct hpo --stage K --trials N [--study NAME]`` (pipelines/commands/hpo.py) → :func:`run_hpo`:

* **Study** — Optuna, TPE sampler (``hpo.seed``), direction from ``hpo.mode``, stored in an
  RDB (``hpo.storage``: sqlite by default, ``postgresql+psycopg2://…`` on a cluster;
  ``--storage`` / ``$XCT_HPO_STORAGE`` override it so a password never sits in params). The
  search space is ``hpo.space`` (validated by :func:`xct_core.hpo.parse_space`).
  ``--trials N`` is the TOTAL number of finished (COMPLETE or PRUNED) trials the study should
  have: a re-run after an interruption, or with the same N, runs only the missing ones; a
  larger N continues the search (TPE sees every earlier trial). Trials left RUNNING by an
  interrupted driver are marked FAIL first (one driver per study at a time).
  ``hpo.points`` are enqueued when a study is created (tried first, in order).
* **Trials** — Ray Tune (``RAY_ADDRESS`` set: that cluster; else local Ray) with
  :class:`PruningOptunaSearch` (Ray's ``OptunaSearch`` + the fixes below) and an ASHA or
  median-stopping scheduler over ``training_iteration`` = validation rounds. One trial = one
  process (``hpo.cpus_per_trial`` CPUs = torch threads, ``hpo.gpus_per_trial`` GPUs) running
  :func:`xct_core.training.train_stage` for ``hpo.steps[stageK]`` steps with validation every
  ``hpo.val_every`` steps; each validation is reported to Tune (``tune.report``) and is an
  Optuna intermediate value at its training step. Outputs: ``<out>/trials/<study>/trial_NNNN``
  (checkpoints are deleted when the trial ends; the exported models stay). Stage K > 1 trials
  use the frozen earlier stages from ``--train-dir`` (default ``train.out_dir``).
* **Why a subclass of OptunaSearch** — Ray 2.60's ``OptunaSearch.on_trial_complete`` tells
  Optuna COMPLETE whenever the last result holds the metric, which is also the case when the
  scheduler stopped the trial early, so pruned trials would read as complete ones (with a
  half-trained value that TPE would then trust). It also never reports the result that
  triggered the stop (Tune withholds it from the searcher). :class:`PruningOptunaSearch`
  tells PRUNED (the stop result recorded as the last intermediate value) when a trial ended
  before its last training step, reports intermediate values at the training step, enqueues
  nothing itself (the driver enqueues ``hpo.points`` once per study) and keeps no Tune
  experiment state (resume goes through the Optuna RDB).
* **MLflow** (:mod:`components.tracking`; ``$MLFLOW_TRACKING_URI`` or the repo's sqlite) —
  one run per study in experiment ``hpo.experiment`` (its id is kept in the study's user
  attributes, so a resumed study reuses it) with lineage tags, the search settings, the
  plots, the trials table and the fragment; one child run per trial (tag
  ``mlflow.parentRunId``) with the sampled values as params, the validation curve and the
  training losses as metrics, the Ray node it ran on (``xct.ray_node_id``), and at the end
  ``xct.trial_state`` = COMPLETE (status FINISHED) | PRUNED (KILLED, ``xct.pruned_at_step``)
  | FAIL (FAILED, ``xct.failure``).
* **Outputs** in ``hpo.out_dir`` (atomic writes): ``best_stage{K}.yaml`` (params overlay with
  the best trial's searched keys + derived keys, see :mod:`xct_core.hpo`; params.yaml lists it
  under ``overlays`` so every command and ``dvc repro`` use it), Optuna's own plots
  (``optuna.visualization.matplotlib``): ``stage{K}_history.png`` (optimisation history),
  ``stage{K}_intermediate.png`` (validation curves), ``stage{K}_importance.png`` (fANOVA; a
  note when fewer than 2 trials completed), and ``stage{K}_trials.csv`` (``trials_dataframe()``).
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ray.tune.schedulers import MedianStoppingRule
from ray.tune.search.optuna import OptunaSearch

from xct_core.atomic import atomic_path, write_text_atomic
from components.ops_params import OpsParams
from xct_core.config import Params, params_from_dict
from xct_core.errors import ConfigError, InputError
from xct_core.redact import redact, redact_url
from xct_core.hpo import (
    SearchSpace,
    carried_over,
    check_metric,
    check_points,
    fragment_yaml,
    parse_space,
    stage_name,
    trial_params,
    trial_steps,
    validation_rounds,
)

#: environment variable overriding ``hpo.storage`` (keeps a database password out of params)
STORAGE_ENV = "XCT_HPO_STORAGE"
#: key of the trial config holding the driver's bookkeeping (Optuna number, MLflow run id)
TRIAL_KEY = "xct_trial"
#: study user attributes naming the study's MLflow run
_RUN_ATTR, _URI_ATTR = "mlflow_run_id", "mlflow_tracking_uri"

log_ = logging.getLogger(__name__)


@dataclass
class HPOSummary:
    """What :func:`run_hpo` did and where the results are."""

    stage: int
    study: str
    storage: str  #: storage URL with any password masked
    ran: int  #: trials run by this call
    complete: int
    pruned: int
    failed: int
    best_number: int | None
    best_value: float | None
    best_params: dict[str, Any] = field(default_factory=dict)
    fragment: Path | None = None  #: written only when a trial completed
    history_png: Path | None = None
    intermediate_png: Path | None = None
    importance_png: Path | None = None
    trials_csv: Path | None = None
    run_id: str | None = None  #: the study's MLflow run
    metric: str = ""


# --------------------------------------------------------------------------- small pieces


#: ``url`` with its password replaced by ``***`` — the program's one redaction (xct_core/redact.py)
mask_url = redact_url


def open_storage(url: str) -> Any:
    """An Optuna RDB storage for ``url`` (sqlite: the folder is created); a one-line
    :class:`ConfigError` when it cannot be opened."""
    import optuna

    if url.startswith("sqlite:///"):
        Path(url.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
    try:
        return optuna.storages.RDBStorage(url)
    except Exception as e:  # sqlalchemy: bad URL, driver missing, server unreachable, …
        first = redact(str(e).strip().splitlines()[0])[:300] if str(e).strip() else type(e).__name__
        raise ConfigError(f"hpo storage {mask_url(url)}: cannot open ({first})") from None


def distributions(space: SearchSpace) -> dict[str, Any]:
    """Optuna distributions of a search space, keyed by parameter path."""
    from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

    out: dict[str, Any] = {}
    for p in space.params:
        if p.kind == "categorical":
            out[p.name] = CategoricalDistribution(list(p.choices))
        elif p.kind == "int":
            out[p.name] = IntDistribution(int(p.low), int(p.high), log=p.log, step=int(p.step or 1))  # type: ignore[arg-type]
        else:
            out[p.name] = FloatDistribution(float(p.low), float(p.high), log=p.log, step=p.step)  # type: ignore[arg-type]
    return out


def build_scheduler(params: Params, rounds: int) -> Any:
    """The Tune scheduler of ``hpo.scheduler`` over ``training_iteration`` (validation rounds)."""
    from ray.tune.schedulers import ASHAScheduler

    hp = params.hpo
    mode = hp.mode
    if hp.scheduler == "asha":
        return ASHAScheduler(
            time_attr="training_iteration", metric=hp.metric, mode=mode, max_t=rounds,
            grace_period=hp.grace_rounds, reduction_factor=hp.reduction_factor, brackets=1,
        )
    return MedianStoppingNoPause(
        time_attr="training_iteration", metric=hp.metric, mode=mode, grace_period=hp.grace_rounds,
        min_samples_required=hp.min_samples, hard_stop=True,
    )


class MedianStoppingNoPause(MedianStoppingRule):
    """Tune's median stopping rule that never PAUSES a trial for lack of comparison samples.

    The stock rule pauses such a trial whenever other trials are pending (a cluster short of
    resources); our trials keep no Tune checkpoint, so a paused trial would restart from
    step 0. Here it simply continues (stopping decisions are unchanged)."""

    def _on_insufficient_samples(self, tune_controller: Any, trial: Any, time: float) -> str:
        from ray.tune.schedulers import TrialScheduler

        return TrialScheduler.CONTINUE


def _short(config: Mapping[str, Any]) -> str:
    def fmt(v: Any) -> str:
        return f"{v:.4g}" if isinstance(v, float) else str(v)

    return " ".join(f"{k.rsplit('.', 1)[-1]}={fmt(v)}" for k, v in config.items())


# --------------------------------------------------------------------------- the searcher


class PruningOptunaSearch(OptunaSearch):
    """Ray Tune's ``OptunaSearch`` that records scheduler-stopped trials as PRUNED.

    ``total_steps``: the training steps of a trial; a trial whose last result has ``step``
    below it was stopped early → Optuna PRUNED (the result that triggered the stop becomes
    its last intermediate value); one that reached it → COMPLETE with its last value; an
    errored trial or one without the metric → FAIL. Intermediate values are reported at the
    training ``step``. ``on_new(ot_trial, config) -> dict`` (driver side) adds bookkeeping to
    the trial config under :data:`TRIAL_KEY`; ``on_done(number, state, value, step)`` is
    called once per trial with the state Optuna recorded.
    """

    def __init__(
        self,
        *args: Any,
        total_steps: int,
        on_new: Callable[[Any, dict[str, Any]], dict[str, Any]] | None = None,
        on_done: Callable[[int, str, float | None, int | None], None] | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        self._total_steps = int(total_steps)
        self._on_new = on_new
        self._on_done = on_done
        self._reported: dict[str, set[int]] = {}

    def suggest(self, trial_id: str) -> dict[str, Any] | None:
        config = super().suggest(trial_id)
        if not isinstance(config, dict):
            return config
        ot_trial = self._ot_trials[trial_id]
        extra = self._on_new(ot_trial, dict(config)) if self._on_new is not None else {}
        return {**config, TRIAL_KEY: {"number": ot_trial.number, **extra}}

    def _report(self, trial_id: str, value: float, step: int) -> None:
        seen = self._reported.setdefault(trial_id, set())
        if step not in seen:
            self._ot_trials[trial_id].report(float(value), int(step))
            seen.add(step)

    def on_trial_result(self, trial_id: str, result: dict[str, Any]) -> None:
        if trial_id in self._completed_trials or trial_id not in self._ot_trials:
            return
        value, step = result.get(self._metric), result.get("step")
        if value is not None and step is not None:
            self._report(trial_id, value, step)

    def on_trial_complete(self, trial_id: str, result: dict[str, Any] | None = None, error: bool = False) -> None:
        from optuna.trial import TrialState

        if trial_id in self._completed_trials or trial_id not in self._ot_trials:
            return
        ot_trial = self._ot_trials[trial_id]
        value = result.get(self._metric) if result else None
        step = result.get("step") if result else None
        if error or value is None:
            state, told = TrialState.FAIL, None
        elif step is not None and int(step) < self._total_steps:
            state, told = TrialState.PRUNED, None
            self._report(trial_id, value, int(step))  # Tune withholds the result that stopped it
        else:
            state, told = TrialState.COMPLETE, float(value)
        try:
            recorded = self._ot_study.tell(ot_trial, told, state=state).state
        except (ValueError, RuntimeError) as e:  # e.g. already told
            log_.warning("optuna tell for trial %s: %s", ot_trial.number, e)
            recorded = state
        self._completed_trials.add(trial_id)
        if self._on_done is not None:
            shown = told if recorded == TrialState.COMPLETE else (None if value is None else float(value))
            self._on_done(ot_trial.number, recorded.name, shown, None if step is None else int(step))

    def save(self, checkpoint_path: str) -> None:
        """Keep no Tune experiment state: a study resumes from its Optuna RDB (and the
        driver-side callbacks hold MLflow clients, which do not pickle)."""

    def restore(self, checkpoint_path: str) -> None:
        raise RuntimeError("xct hpo resumes from the Optuna storage, not from a Tune experiment checkpoint")


# --------------------------------------------------------------------------- the trial (worker side)


class _Quiet:
    """A progress bar that draws nothing (trial logs stay readable; the driver prints one
    line per trial)."""

    def __init__(self, **_: Any) -> None:
        pass

    def update(self, n: int = 1) -> None:
        pass

    def set_description(self, s: str) -> None:
        pass

    def close(self) -> None:
        pass


def _copy_earlier_stages(train_dir: Path, trial_dir: Path, stage: int, which: str) -> None:
    """Frozen earlier stages (validation of stage K > 1) into the trial's output folder."""
    for j in range(1, stage):
        src = train_dir / "models" / f"stage{j}" / f"{which}.pt"
        dst = trial_dir / "models" / f"stage{j}" / f"{which}.pt"
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src, dst)


def trial_fn(config: dict[str, Any], setup: dict[str, Any]) -> None:
    """One Tune trial (its own process): ``train_stage`` with the sampled values, every
    validation forwarded to ``tune.report`` (the last one after ``train_stage`` returned, so a
    scheduler stopping the trial on it cannot cut the model export short) and everything
    logged to the trial's MLflow run."""
    import ray
    import torch
    from ray import tune

    from components.tracking import MetricLogger
    from xct_core.training import TrainHooks, TrainingFailed, train_stage

    torch.set_num_threads(int(setup["threads"]))
    book = config[TRIAL_KEY]
    sampled = {k: v for k, v in config.items() if k != TRIAL_KEY}
    stage = int(setup["stage"])
    trial_dir = Path(setup["trials_dir"]) / f"trial_{int(book['number']):04d}"
    logger = MetricLogger(book["run_id"], setup["tracking_uri"]) if book.get("run_id") else None
    key = f"val/{setup['metric']}"
    total = int(setup["steps"])

    def to_tune(metrics: Mapping[str, float], step: int) -> dict[str, float]:
        return {**{k.removeprefix("val/"): float(v) for k, v in metrics.items() if k.startswith("val/")}, "step": step}

    def report(metrics: dict[str, float], _ckpt: str | None) -> None:
        if logger is not None:
            logger.log(metrics, int(metrics["step"]))
        if key in metrics and int(metrics["step"]) < total:  # the last one is reported after the run
            tune.report(to_tune(metrics, int(metrics["step"])))

    try:
        base = params_from_dict(setup["params"], "params", OpsParams)
        params, _ = trial_params(base, stage, sampled, str(trial_dir))
        if logger is not None:
            logger.client.set_tag(book["run_id"], "xct.params_digest", params.digest())
            # where the trial ran (a multi-node cluster: which node's CPUs/GPUs it got)
            logger.client.set_tag(book["run_id"], "xct.ray_node_id", ray.get_runtime_context().get_node_id())
        _copy_earlier_stages(Path(setup["train_dir"]), trial_dir, stage, params.train.prev_stage_model)
        res = train_stage(params, stage, setup["processed"], trial_dir, hooks=TrainHooks(report=report, progress=_Quiet),
                          steps=total, fresh=True)
        if key not in res.val_metrics:
            raise TrainingFailed(f"trial {book['number']}: the final validation has no {key}")
        # last: a scheduler may stop the trial on this report; the models and metrics are written
        tune.report(to_tune(res.val_metrics, res.final_step))
    except Exception as e:
        if logger is not None:
            logger.client.set_tag(book["run_id"], "xct.failure", redact(f"{type(e).__name__}: {e}")[:5000])
        raise


# --------------------------------------------------------------------------- driver side


class _Book:
    """Driver-side bookkeeping: MLflow child runs and one progress line per trial."""

    def __init__(self, client: Any, experiment_id: str, parent: str, study: str, stage: int,
                 trials_dir: Path, metric: str, log: Callable[[str], None],
                 lineage: Mapping[str, str] | None = None) -> None:
        self.client = client
        #: the training runs' lineage tags (git commit, DVC data hash, params digest of the base
        #: params; each trial then records its own digest) — every trial run carries them
        self.lineage = dict(lineage or {})
        self.experiment_id = experiment_id
        self.parent = parent
        self.study = study
        self.stage = stage
        self.trials_dir = trials_dir
        self.metric = metric
        self.log = log
        self.runs: dict[int, str] = {}
        self.ran = 0
        self.tune_dir: Path | None = None  #: the Tune experiment folder (error files of failed trials)

    def on_new(self, ot_trial: Any, config: dict[str, Any]) -> dict[str, Any]:
        from mlflow.entities import Param
        from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID, MLFLOW_RUN_NAME

        n = ot_trial.number
        run = self.client.create_run(
            self.experiment_id, run_name=f"trial-{n}",
            tags={**self.lineage, MLFLOW_PARENT_RUN_ID: self.parent, MLFLOW_RUN_NAME: f"trial-{n}", "xct.kind": "hpo_trial",
                  "xct.study": self.study, "xct.stage": str(self.stage), "xct.trial_number": str(n),
                  "xct.out_dir": str(self.trials_dir / f"trial_{n:04d}")},
        )
        rid = run.info.run_id
        values = [Param(k, json.dumps(v) if isinstance(v, (list, dict)) else str(v)) for k, v in config.items()]
        self.client.log_batch(rid, params=[*values, Param("trial_number", str(n))], synchronous=True)
        ot_trial.set_user_attr(_RUN_ATTR, rid)
        self.runs[n] = rid
        self.log(f"trial {n}: started ({_short(config)})")
        return {"run_id": rid}

    def on_done(self, number: int, state: str, value: float | None, step: int | None) -> None:
        self.ran += 1
        rid = self.runs.get(number)
        shown = f": {self.metric} {value:.4f}" if isinstance(value, float) and math.isfinite(value) else ""
        where = f" at step {step}" if step is not None else ""
        reason = ""
        if rid is not None:
            tags = {"xct.trial_state": state}
            if value is not None and math.isfinite(float(value)):
                tags["xct.trial_value"] = f"{float(value):.6g}"
            if state == "PRUNED" and step is not None:
                tags["xct.pruned_at_step"] = str(step)
            for k, v in tags.items():
                self.client.set_tag(rid, k, v)
            if state == "FAIL":
                reason = self.client.get_run(rid).data.tags.get("xct.failure", "")
                if not reason and self.tune_dir is not None:
                    reason = f"no message from the trial; see the error file under {self.tune_dir}"
            status = {"COMPLETE": "FINISHED", "PRUNED": "KILLED"}.get(state, "FAILED")
            self.client.set_terminated(rid, status=status)
        shutil.rmtree(self.trials_dir / f"trial_{number:04d}" / "checkpoints", ignore_errors=True)
        self.log(f"trial {number}: {state}{where}{shown}" + (f" ({reason.splitlines()[0][:300]})" if reason else ""))


def _log_params_once(client: Any, run_id: str, params: Mapping[str, Any]) -> None:
    """Log params not yet on the run; a changed value (a resumed study with other settings)
    is recorded in the tag ``xct.params_changed_on_resume`` (MLflow params are immutable)."""
    from mlflow.entities import Param

    from components.tracking import flatten

    have = client.get_run(run_id).data.params
    flat = {k: redact(v) for k, v in flatten(params).items()}  # no credential in a logged param
    todo = [Param(k, v) for k, v in flat.items() if k not in have]
    for i in range(0, len(todo), 90):
        client.log_batch(run_id, params=todo[i : i + 90], synchronous=True)
    changed = sorted(k for k, v in flat.items() if k in have and have[k] != v)
    if changed:
        client.set_tag(run_id, "xct.params_changed_on_resume", ",".join(changed)[:5000])


def _study_run(client: Any, study: Any, experiment: str, uri: str, tags: Mapping[str, str]) -> str:
    """The study's MLflow run: the one named in the study's user attributes when usable,
    else a new one (remembered there)."""
    from components.tracking import _usable_run, ensure_experiment

    exp_id = ensure_experiment(client, experiment)
    attrs = study.user_attrs
    rid = attrs.get(_RUN_ATTR)
    if not (attrs.get(_URI_ATTR) == uri and _usable_run(client, rid, exp_id)):
        rid = client.create_run(exp_id, run_name=study.study_name, tags=dict(tags)).info.run_id
        study.set_user_attr(_RUN_ATTR, rid)
        study.set_user_attr(_URI_ATTR, uri)
    client.update_run(rid, status="RUNNING")
    return rid


def _fail_stale(study: Any, client: Any, log: Callable[[str], None], numbers: set[int] | None = None) -> int:
    """Trials left RUNNING (by an interrupted driver; ``numbers``: only these) → FAIL, their
    MLflow runs → KILLED. A FAIL trial does not count as finished, so it is re-done."""
    from optuna.trial import TrialState

    n = 0
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        if numbers is not None and t.number not in numbers:
            continue
        study.tell(t.number, state=TrialState.FAIL)
        rid = t.user_attrs.get(_RUN_ATTR)
        if rid:
            try:
                client.set_tag(rid, "xct.trial_state", "FAIL")
                client.set_tag(rid, "xct.failure", "interrupted: the driver stopped before the trial ended")
                client.set_terminated(rid, status="KILLED")
            except Exception:  # noqa: BLE001 - a run in another tracking store: nothing to close
                pass
        n += 1
    if n:
        log(f"marked {n} interrupted trial(s) as FAIL (they do not count as finished)")
    return n


def run_hpo(
    params: Params,
    stage: int,
    trials: int,
    processed_dir: str | Path,
    *,
    study: str | None = None,
    storage: str | None = None,
    out_dir: str | Path | None = None,
    train_dir: str | Path | None = None,
    log: Callable[[str], None] = print,
) -> HPOSummary:
    """Run (or resume) the study of stage ``stage`` until it has ``trials`` finished trials,
    then write the fragment, plots and trials table (see the module docstring).

    ``storage``: overrides ``hpo.storage`` (default ``$XCT_HPO_STORAGE`` or ``hpo.storage``);
    ``out_dir``: overrides ``hpo.out_dir``; ``train_dir``: where the earlier stages' exported
    models are (default ``train.out_dir``). Raises :class:`ConfigError` / :class:`InputError`
    (one-line messages) before anything starts when the setup is wrong.
    """
    from xct_core.training import preflight

    hp = params.hpo
    k = int(stage)
    name = stage_name(params, k)
    if trials < 1:
        raise ConfigError(f"--trials must be >= 1, got {trials}")
    space = parse_space(params, k)
    points = check_points(space, hp.points)
    check_metric(params)
    steps = trial_steps(params, k)
    rounds = validation_rounds(steps, hp.val_every)
    if rounds <= hp.grace_rounds:
        raise ConfigError(
            f"hpo: a {name} trial validates {rounds} time(s) ({steps} steps, val_every {hp.val_every}) and "
            f"grace_rounds is {hp.grace_rounds}: nothing could ever be pruned (lower hpo.val_every or hpo.grace_rounds)"
        )
    out = Path(out_dir if out_dir is not None else hp.out_dir).absolute()
    processed = Path(processed_dir).absolute()
    prev = Path(train_dir if train_dir is not None else params.train.out_dir).absolute()
    probe, _ = trial_params(params, k, {}, str(out / "trials"))
    preflight(probe, k, processed, prev, steps=steps)
    _check_val_split(processed, k, params)
    study_name = study or f"{hp.study_prefix}-{name}"
    url = storage or os.environ.get(STORAGE_ENV) or hp.storage
    shown_url = mask_url(url)

    import optuna
    from mlflow.entities import RunTag
    from optuna.trial import TrialState

    from components.tracking import get_client, lineage_tags, tracking_uri

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    rdb = open_storage(url)
    sampler = optuna.samplers.TPESampler(seed=hp.seed)
    direction = "maximize" if hp.mode == "max" else "minimize"
    try:
        ostudy = optuna.create_study(study_name=study_name, storage=rdb, load_if_exists=True,
                                     direction=direction, sampler=sampler)
    except ValueError as e:  # e.g. an existing study with the other direction
        raise ConfigError(f"study {study_name} in {shown_url}: {e}") from None
    if ostudy.direction.name.lower() != direction:
        raise ConfigError(f"study {study_name} in {shown_url} was created to {ostudy.direction.name.lower()}, "
                          f"but hpo.mode is {hp.mode}: use another --study name")

    uri = tracking_uri()
    client = get_client(uri)
    lineage = lineage_tags(params.digest(), processed)
    parent_tags = {
        **lineage, "xct.kind": "hpo_study", "xct.study": study_name,
        "xct.stage": str(k), "xct.optuna_storage": shown_url, "xct.out_dir": str(out),
    }
    parent = _study_run(client, ostudy, hp.experiment, uri, parent_tags)
    client.log_batch(parent, tags=[RunTag(t, v) for t, v in parent_tags.items()], synchronous=True)
    _log_params_once(client, parent, {
        "stage": k, "study": study_name, "storage": shown_url, "metric": hp.metric, "mode": hp.mode,
        "steps_per_trial": steps, "val_every": hp.val_every, "scheduler": hp.scheduler,
        "grace_rounds": hp.grace_rounds, "reduction_factor": hp.reduction_factor, "min_samples": hp.min_samples,
        "seed": hp.seed, "space": {p.name: p.kind for p in space.params},
        "space_json": json.dumps({p.name: {"type": p.kind, "low": p.low, "high": p.high, "log": p.log,
                                           "step": p.step, "choices": list(p.choices)} for p in space.params}),
    })

    finished = (TrialState.COMPLETE, TrialState.PRUNED)
    trials_dir = out / "trials" / study_name
    book = _Book(client, client.get_run(parent).info.experiment_id, parent, study_name, k, trials_dir, hp.metric, log,
                 lineage=lineage)
    try:
        _fail_stale(ostudy, client, log)
        if not ostudy.trials and points:
            for pt in points:
                ostudy.enqueue_trial(pt)
        done = len(ostudy.get_trials(deepcopy=False, states=finished))
        todo = max(0, int(trials) - done)
        log(f"study {study_name} ({shown_url}): {done} finished trial(s), {todo} to run "
            f"({steps} steps each, validation every {hp.val_every}, {hp.scheduler} pruning on {hp.metric})")
        if space.global_names:
            log(f"note: {', '.join(space.global_names)} not under stages.{name}: best_{name}.yaml sets them for every stage")
        if todo:
            try:
                _tune(params, k, space, rdb, sampler, study_name, todo, steps, rounds, processed, prev, trials_dir,
                      out, uri, book)
            finally:  # Tune ends the experiment on Ctrl-C; trials it cut short stay RUNNING in Optuna
                _fail_stale(ostudy, client, log, numbers=set(book.runs))
        summary = write_outputs(params, k, ostudy, space, out, shown_url, log=log)
        summary.ran = book.ran
        summary.run_id = parent
        _log_study_results(client, parent, summary)
    except KeyboardInterrupt:
        client.set_terminated(parent, status="KILLED")
        raise
    except Exception as e:
        client.set_tag(parent, "xct.failure", redact(f"{type(e).__name__}: {e}")[:5000])
        client.set_terminated(parent, status="FAILED")
        raise
    client.set_terminated(parent, status="FINISHED")
    return summary


def _check_val_split(processed: Path, stage: int, params: Params) -> None:
    from xct_core.data import XrayCTDataset

    ds = XrayCTDataset(processed, stage, "train", params.hu.net_map())
    if not list(ds.manifest["splits"].get("val", [])):
        raise InputError(processed / "manifest.json", "the val split is empty: trials are scored on validation data")


def _ray_init_quiet() -> bool:
    """Join ``$RAY_ADDRESS`` or start local Ray (like components.train), without forwarding
    the trial processes' output: the driver prints one line per trial, a trial's error goes
    to its MLflow run (``xct.failure``) and Tune's error file, and a trial the scheduler
    stops would otherwise print its SIGTERM traceback. Returns whether Ray was started here."""
    import ray

    if ray.is_initialized():
        return False
    if os.environ.get("RAY_ADDRESS"):
        ray.init(address=os.environ["RAY_ADDRESS"], log_to_driver=False)
    else:
        ray.init(log_to_driver=False)
    return True


def _tune(params: Params, k: int, space: SearchSpace, rdb: Any, sampler: Any, study_name: str, todo: int,
          steps: int, rounds: int, processed: Path, prev: Path, trials_dir: Path, out: Path, uri: str,
          book: _Book) -> None:
    """Run ``todo`` trials through Ray Tune (local Ray unless ``RAY_ADDRESS``)."""
    # Tune's new console output prints a heading even at verbose=0; the legacy reporter is
    # silent there (the driver prints one line per trial instead)
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    import ray
    from ray import tune


    hp = params.hpo
    searcher = PruningOptunaSearch(
        distributions(space), metric=hp.metric, mode=hp.mode, sampler=sampler, study_name=study_name, storage=rdb,
        total_steps=steps, on_new=book.on_new, on_done=book.on_done,
    )
    setup = {
        "params": params.model_dump(mode="json"), "stage": k, "processed": str(processed), "train_dir": str(prev),
        "trials_dir": str(trials_dir), "steps": steps, "metric": hp.metric, "tracking_uri": uri,
        "threads": max(1, int(hp.cpus_per_trial)),
    }
    resources = {"cpu": hp.cpus_per_trial, **({"gpu": hp.gpus_per_trial} if hp.gpus_per_trial > 0 else {})}
    trainable = tune.with_resources(tune.with_parameters(trial_fn, setup=setup), resources)
    name = f"{study_name}-{time.strftime('%Y%m%d-%H%M%S')}"
    book.tune_dir = out / "ray" / name
    # Tune logs each failed trial's traceback at ERROR and its progress at INFO; the driver
    # prints one line per trial instead (a failure's message is on it and on its MLflow run)
    tune_log = logging.getLogger("ray.tune")
    level = tune_log.level
    tune_log.setLevel(logging.CRITICAL)
    started = False
    try:
        started = _ray_init_quiet()
        tuner = tune.Tuner(
            trainable,
            tune_config=tune.TuneConfig(
                search_alg=searcher, scheduler=build_scheduler(params, rounds), num_samples=todo,
                max_concurrent_trials=hp.max_concurrent_trials,
                trial_dirname_creator=lambda t: f"t_{t.trial_id}",
            ),
            run_config=tune.RunConfig(
                name=name, storage_path=str(out / "ray"), verbose=0,
                failure_config=tune.FailureConfig(max_failures=0),
            ),
        )
        tuner.fit()
    finally:
        tune_log.setLevel(level)
        if started:
            ray.shutdown()


# --------------------------------------------------------------------------- outputs


def write_outputs(params: Params, stage: int, study: Any, space: SearchSpace, out: Path, shown_url: str,
                  log: Callable[[str], None] = print) -> HPOSummary:
    """Fragment (when a trial completed), history and importance plots, trials table."""
    from optuna.trial import TrialState

    name = stage_name(params, stage)
    hp = params.hpo
    all_trials = study.get_trials(deepcopy=False)
    complete = [t for t in all_trials if t.state == TrialState.COMPLETE]
    pruned = [t for t in all_trials if t.state == TrialState.PRUNED]
    failed = [t for t in all_trials if t.state == TrialState.FAIL]
    out.mkdir(parents=True, exist_ok=True)
    summary = HPOSummary(stage=stage, study=study.study_name, storage=shown_url, ran=0, complete=len(complete),
                         pruned=len(pruned), failed=len(failed), best_number=None, best_value=None, metric=hp.metric)
    summary.trials_csv = write_trials_csv(study, space, out / f"{name}_trials.csv")
    summary.history_png = plot_history(study, out / f"{name}_history.png", hp.metric)
    summary.intermediate_png = plot_intermediate(study, out / f"{name}_intermediate.png", hp.metric, name)
    summary.importance_png = plot_importance(study, out / f"{name}_importance.png", hp.seed)
    if not complete:
        log(f"no completed trial yet: {out / f'best_{name}.yaml'} left unchanged")
        return summary
    best = study.best_trial
    summary.best_number, summary.best_value = best.number, float(best.value)
    _, changed = trial_params(params, stage, dict(best.params), str(out))
    path = out / f"best_{name}.yaml"
    previous = _read_fragment(path)
    kept = carried_over(previous, params, changed)
    summary.best_params = dict(best.params)
    header = [
        f"Tuned params overlay for {name}, written by `xct hpo --stage {stage}`; merged over params.yaml",
        "through its `overlays:` list (write {} to drop the tuned values).",
        f"study {study.study_name} in {shown_url}: best trial {best.number}, {hp.metric} = {best.value:.6g} ({hp.mode}),",
        f"{len(complete)} complete / {len(pruned)} pruned / {len(failed)} failed trial(s).",
    ]
    glob = [n for n in space.global_names if n in changed]
    if glob:
        header.append(f"global keys (they apply to every stage): {', '.join(glob)}")
    if kept:
        header.append(f"kept from the previous fragment (in effect, not searched in this study): {', '.join(sorted(kept))}")
    write_text_atomic(path, fragment_yaml({**kept, **changed}, header))
    summary.fragment = path
    return summary


def _read_fragment(path: Path) -> dict[str, Any]:
    from xct_core.errors import InputError
    from xct_core.yamlsafe import read_yaml_doc

    try:
        doc = read_yaml_doc(path, "HPO fragment")
    except InputError:
        return {}
    return doc if isinstance(doc, dict) else {}


def write_trials_csv(study: Any, space: SearchSpace, path: Path) -> Path:
    """Optuna's ``study.trials_dataframe()`` as ``number, state, value, last_step, duration_s``
    and one column per searched parameter (its value as JSON; empty where a trial has none)."""
    import pandas as pd

    df = study.trials_dataframe(attrs=("number", "state", "value", "duration", "params"))
    last = {t.number: t.last_step for t in study.get_trials(deepcopy=False)}
    table = df.reindex(columns=["number", "state", "value"])
    table["last_step"] = table["number"].map(last).astype("Int64")
    table["duration_s"] = pd.to_timedelta(df["duration"]).dt.total_seconds().round(1) if "duration" in df else None
    for name in space.names:
        col = df.get(f"params_{name}")
        table[name] = "" if col is None else col.map(lambda v: "" if _missing(v) else json.dumps(_plain(v)))
    return write_text_atomic(path, table.to_csv(index=False, lineterminator="\n", float_format="%.6g"))


def _missing(v: Any) -> bool:
    return v is None or (isinstance(v, float) and math.isnan(v))


def _plain(v: Any) -> Any:
    """A dataframe cell as a JSON-able value (tuples → lists, numpy scalars → Python)."""
    if isinstance(v, tuple | list):
        return [_plain(x) for x in v]
    return v.item() if hasattr(v, "item") else v


def _save_axes(ax: Any, path: Path) -> Path:
    """Save the figure of an Optuna matplotlib plot atomically and close it (pyplot keeps it)."""
    import matplotlib.pyplot as plt

    fig = ax.figure
    try:
        fig.tight_layout()
        with atomic_path(path, ".png") as tmp:
            fig.savefig(tmp, format="png", dpi=100, bbox_inches="tight")  # Optuna's legends sit outside
    finally:
        plt.close(fig)
    return path


def _note_png(path: Path, title: str, note: str) -> Path:
    """A picture that says why a plot could not be drawn."""
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 3))
    ax.text(0.5, 0.5, note, ha="center", va="center", fontsize=12, transform=ax.transAxes, wrap=True)
    ax.set_axis_off()
    ax.set_title(title)
    return _save_axes(ax, path)


def _optuna_plot(fn: Callable[..., Any], study: Any, **kw: Any) -> Any:
    """Call an ``optuna.visualization.matplotlib`` plot; Optuna marks them experimental, a
    warning that is noise in a CLI run."""
    import warnings

    from optuna.exceptions import ExperimentalWarning

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ExperimentalWarning)
        return fn(study, **kw)


def plot_history(study: Any, path: Path, metric: str) -> Path:
    """Optuna's optimisation history (each complete trial's value and the best so far)."""
    from optuna.trial import TrialState
    from optuna.visualization.matplotlib import plot_optimization_history

    title = f"{study.study_name}: optimisation history"
    if not study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
        return _note_png(path, title, "no completed trial yet")
    ax = _optuna_plot(plot_optimization_history, study, target_name=metric)
    ax.set_title(title)
    return _save_axes(ax, path)


def plot_intermediate(study: Any, path: Path, metric: str, name: str) -> Path:
    """Optuna's intermediate values: each trial's validation curve over its training steps."""
    from optuna.visualization.matplotlib import plot_intermediate_values

    if not any(t.intermediate_values for t in study.get_trials(deepcopy=False)):
        return _note_png(path, f"{study.study_name}: intermediate values", "no validation reported yet")
    ax = _optuna_plot(plot_intermediate_values, study)
    ax.set_xlabel(f"{name} training step")
    ax.set_ylabel(f"validation {metric}")
    ax.set_title(f"{study.study_name}: intermediate values")
    return _save_axes(ax, path)


def plot_importance(study: Any, path: Path, seed: int) -> Path:
    """Optuna's fANOVA parameter importances over the complete trials; with fewer than 2 (or
    when they cannot be computed, e.g. identical results) a picture that says why."""
    from optuna.importance import FanovaImportanceEvaluator
    from optuna.trial import TrialState
    from optuna.visualization.matplotlib import plot_param_importances

    n = len(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)))
    title = f"{study.study_name}: parameter importances ({n} complete trials)"
    if n < 2:
        return _note_png(path, title, f"parameter importances need ≥ 2 completed trials\n(this study has {n})")
    try:
        ax = _optuna_plot(plot_param_importances, study, evaluator=FanovaImportanceEvaluator(seed=seed))
    except (RuntimeError, ValueError) as e:
        return _note_png(path, title, f"parameter importances unavailable over {n} completed trials:\n{str(e)[:120]}")
    ax.set_title(title, loc="left")  # where Optuna puts it
    return _save_axes(ax, path)


def _log_study_results(client: Any, run_id: str, s: HPOSummary) -> None:
    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    n = s.complete + s.pruned
    metrics = [Metric("trials_complete", s.complete, now, n), Metric("trials_pruned", s.pruned, now, n),
               Metric("trials_failed", s.failed, now, n)]
    if s.best_value is not None and math.isfinite(s.best_value):
        metrics.append(Metric(f"best_{s.metric}", s.best_value, now, n))
        client.set_tag(run_id, "xct.best_trial", str(s.best_number))
    client.log_batch(run_id, metrics=metrics, synchronous=True)
    for p in (s.history_png, s.intermediate_png, s.importance_png, s.trials_csv, s.fragment):
        if p is not None and p.is_file():
            client.log_artifact(run_id, str(p))
