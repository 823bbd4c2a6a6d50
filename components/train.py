"""Pipeline step 4 — train one cascade stage on Ray Train, tracked in MLflow.

The loop is :func:`xct_core.training.train_stage` (engine-agnostic); this module binds it:

* **Ray Train**: ``ray.train.torch.TorchTrainer`` with a ``ScalingConfig`` from
  ``params.train.ray`` (workers, GPU, CPUs/resources per worker, accelerator type for an
  A100/H100 pool). ``RAY_ADDRESS`` set → join that cluster; otherwise a local Ray runtime
  is started (and shut down at the end). DDP via ``prepare_model`` (gloo on CPU, NCCL on
  GPU) and ``prepare_data_loader`` (device transfer; the loop's ``ShardSampler`` already
  shards the data per worker). Checkpoints are reported to Ray (``RunConfig(name=stageK,
  storage_path=<out>/ray)``); ``FailureConfig(max_failures)`` restarts crashed workers from
  the latest one. A re-run of the same command after the driver was killed resumes too
  (Ray restores the run from its storage path; the loop also looks at its own checkpoints).
* **Where it ran**: at the start of every worker-group attempt the ranks gather their Ray
  node id, node IP and pid; rank 0 appends the attempt (and the checkpoint Ray handed it,
  ``ray_checkpoint``; the loop resumes from the newer of that and its own) to
  ``checkpoints/stage{K}/ray_workers.json``. The driver copies it to the MLflow run
  (artifact ``ray/ray_workers.json``; tags ``xct.ray_nodes`` = the distinct node ids,
  ``xct.ray_attempts``) and to :attr:`TrainSummary.attempts`.
* **MLflow** (:mod:`components.tracking`): one run per stage nested under a pipeline run;
  params, lineage tags (git commit, DVC data hash, params digest), per-step losses, LR,
  throughput, peak memory, validation metrics, montage PNGs and the final/best models.
  Rank 0 logs directly from the worker. A non-finite loss marks the run FAILED.

* **Fail closed**: the output folder is locked for the run (a second ``xct train`` on it
  exits 1 naming the holder's pid); SIGTERM (a Kubernetes eviction) marks the MLflow run
  KILLED, shuts Ray down and exits 143 naming the intact newest checkpoint — ``ray.init``'s
  own SIGTERM handler (``sys.exit`` under a C++ stack dump) is replaced after start-up
  (:mod:`xct_core.training.guards`). A damaged checkpoint is skipped or refused by the loop
  (``train.on_corrupt_checkpoint``), with a warning line forwarded from rank 0.

* **Run storage** (``pipeline.storage.uri`` + a run id; :mod:`components.run_storage`,
  docs/cluster.md "Storage and resume"): the processed data, Ray Train's ``storage_path``
  (the checkpoints), the exported models and the stage's state docs live under
  ``<uri>/<run id>/`` (S3 or a mounted RWX folder); workers read the data through a
  node-local cache and train in a node-local scratch folder rebuilt from the run storage at
  each attempt; the driver writes nothing to ``out_dir``. The same run id resumes (a KFP
  retry, a re-submitted Ray job) from the newest intact checkpoint there.

Entry points: ``xct train --stage K`` (pipelines/commands/train.py; dvc.yaml runs it), the
KFP train component (components/kfp_components.py) and :func:`run_train` / :func:`run_local`
(in-process, no Ray, no MLflow: ``xct train --local``).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from xct_core.atomic import write_json_atomic
from xct_core.redact import redact, redact_doc, redact_url
from xct_core.checkpoint import latest_checkpoint
from components.ray_params import RayParams
from xct_core.config import Params, params_from_dict
from xct_core.errors import InputError, XctError
from xct_core.layout import RUN_STORAGE_DIRS
from xct_core.training import (
    FaultPlan,
    NonFiniteError,
    RunLayout,
    SigtermGuard,
    Terminated,
    TrainHooks,
    TrainingFailed,
    TrainResult,
    folder_lock,
    preflight,
    train_stage,
)

#: a :class:`components.run_storage.RunStorage` (run storage, ``pipeline.storage.uri``). It is
#: handed in by the callers (``xct train``, the KFP task) and pickled to the workers, never
#: imported here: the training step that dvc.yaml runs must not depend on the operational S3
#: settings (tests/test_one_source.py), and it never uses run storage.
RunStorageLike = Any

#: environment variable with a JSON :class:`xct_core.training.FaultPlan` (resilience tests)
FAULTS_ENV = "XCT_TRAIN_FAULTS"


@dataclass
class TrainSummary:
    """What :func:`run_train` did."""

    stage: int
    name: str
    final_step: int
    start_step: int | None  #: step the (last) worker run started from (resume), from metrics/stage{K}.json
    final_model: Path
    best_model: Path
    run_id: str | None
    parent_run_id: str | None
    metrics: dict[str, Any] = field(default_factory=dict)  #: metrics/stage{K}.json
    ray_startup_s: float = 0.0  #: ray.init wall time (0 when Ray was already up)
    fit_s: float = 0.0  #: TorchTrainer.fit wall time (worker start-up included)
    #: the worker-group attempts of this stage run (``ray_workers.json``): each
    #: ``{attempt, ray_checkpoint, workers: [{rank, node_id, node_ip, pid}]}``
    attempts: list[dict[str, Any]] = field(default_factory=list)
    #: with run storage (``pipeline.storage.uri``): the run's training folder there
    #: (``<root>/<run id>/train``: ``models/stage{K}/final.pt`` …); ``final_model`` /
    #: ``best_model`` are then the paths relative to it, nothing is kept locally
    train_uri: str | None = None

    @property
    def nodes(self) -> list[str]:
        """The distinct Ray node ids any worker of this stage run ran on."""
        return _distinct_nodes(self.attempts)


def faults_from_env() -> FaultPlan:
    """The fault plan of the resilience tests, from ``$XCT_TRAIN_FAULTS`` (JSON; unset: none)."""
    return FaultPlan.from_json(os.environ.get(FAULTS_ENV))


def run_local(
    params: Params,
    stage: int,
    processed_dir: str | Path,
    out_dir: str | Path | None = None,
    *,
    steps: int | None = None,
    fresh: bool = False,
    device: str | None = None,
) -> TrainResult:
    """Train in this process (no Ray, no MLflow): ``xct train --local`` and a bare GPU box.
    Holds the output folder's lock; SIGTERM stops it as :class:`Terminated` (exit 143)."""
    layout = RunLayout(Path(out_dir if out_dir is not None else params.train.out_dir).absolute(), int(stage))
    name = params.stage(stage).name
    preflight(params, stage, processed_dir, layout.out_dir, steps=steps)  # bad input: no folder, no lock file
    with folder_lock(layout.train_lock), SigtermGuard(lambda: _stopped(name, layout)):
        return train_stage(params, stage, processed_dir, out_dir, device=device, steps=steps, fresh=fresh,
                           faults=faults_from_env())


def _stopped(name: str, layout: RunLayout, tracked: str = "", storage: RunStorageLike | None = None) -> str:
    """The one line of a run stopped by SIGTERM: where it can resume from."""
    if storage is not None:
        try:
            names = storage.checkpoint_dirs(name)
        except Exception:  # noqa: BLE001 - the storage is unreachable: say so, do not mask the stop
            names = None
        newest = f"{storage.url(RUN_STORAGE_DIRS['ray'], name, names[-1])}" if names else None
        where = (f"newest checkpoint {newest} is in the run storage" if newest else
                 "no checkpoint is in the run storage yet" if names is not None else "the run storage is unreachable")
        return f"{name}: stopped by SIGTERM{tracked}; {where}: re-run the same command (same run id) to resume"
    last = latest_checkpoint(layout.checkpoints)
    where = f"newest checkpoint {last[1]} (step {last[0]}) is intact" if last else "no checkpoint was written yet"
    return f"{name}: stopped by SIGTERM{tracked}; {where}: re-run the same command to resume"


# --------------------------------------------------------------------------- progress


class ProgressFile:
    """The rank-0 worker's progress bar: a tqdm-like object that writes ``{n, total, desc}``
    to a small JSON file (atomically, at most every ``interval_s``) instead of drawing.

    Ray forwards worker output to the driver line by line with a ``(RayTrainWorker pid=…)``
    prefix, so a bar drawn in the worker repeats on every update; the driver draws the one
    bar from this file (:class:`DriverBar`)."""

    def __init__(self, path: Path, total: int, initial: int = 0, desc: str = "", interval_s: float = 0.5) -> None:
        self.path, self.total, self.n, self.desc = path, int(total), int(initial), desc
        self.interval_s = interval_s
        self._last = 0.0
        self._write(force=True)

    def _write(self, force: bool = False) -> None:
        now = time.monotonic()
        if force or now - self._last >= self.interval_s:
            self._last = now
            write_json_atomic(self.path, {"n": self.n, "total": self.total, "desc": self.desc})

    def update(self, n: int = 1) -> None:
        self.n += int(n)
        self._write(force=self.n >= self.total)

    def set_description(self, desc: str) -> None:
        self.desc = desc
        self._write()

    def close(self) -> None:
        self._write(force=True)


class DriverBar:
    """The driver's one progress line for a stage: a thread polling :class:`ProgressFile`'s
    JSON and updating a tqdm bar in place (on a terminal; elsewhere tqdm prints sparse lines)."""

    def __init__(self, path: Path, desc: str, poll_s: float = 0.5) -> None:
        import threading

        self.path, self.desc, self.poll_s = path, desc, poll_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"progress-{desc}", daemon=True)
        self._bar: Any = None

    def __enter__(self) -> DriverBar:
        self.path.unlink(missing_ok=True)
        self._thread.start()
        return self

    def _poll(self) -> None:
        from xct_core.jsondoc import read_json_doc

        try:
            doc = read_json_doc(self.path, "progress")
        except XctError:
            return
        if self._bar is None:
            from tqdm.auto import tqdm

            self._bar = tqdm(total=int(doc["total"]), initial=int(doc["n"]), desc=self.desc, unit="step",
                             dynamic_ncols=True, mininterval=1.0 if sys.stderr.isatty() else 30.0)
        self._bar.set_description(str(doc.get("desc") or self.desc), refresh=False)
        self._bar.update(int(doc["n"]) - self._bar.n)

    def _run(self) -> None:
        while not self._stop.wait(self.poll_s):
            self._poll()

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self._poll()
        if self._bar is not None:
            self._bar.close()


# --------------------------------------------------------------------------- worker side


def _worker_loop(config: dict[str, Any]) -> None:
    """The per-worker function run by ``TorchTrainer`` (every rank)."""
    import logging
    import warnings

    import ray.train
    import ray.train.torch as rt

    from components.tracking import MetricLogger

    # The stage nets run channels-last 3D convs; DDP's flat buckets are contiguous, so it
    # copies those grads once per step and says so every step. Harmless; keep logs readable.
    warnings.filterwarnings("ignore", message="Grad strides do not match bucket view strides")
    # Ray Train V2 logs every report (metrics dict included) at INFO from each worker, which
    # buries the progress bar; its logger is named after the module's file path.
    try:
        from ray.train.v2._internal.execution import context as _ray_ctx

        logging.getLogger(_ray_ctx.__file__).setLevel(logging.WARNING)
    except ImportError:  # a Ray without Train V2: nothing to quiet
        pass
    # run storage: every boto3 session says where it found credentials, at INFO
    logging.getLogger("botocore.credentials").setLevel(logging.WARNING)
    params = params_from_dict(config["params"], "params", RayParams)
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    logger = MetricLogger(config["run_id"], config["tracking_uri"]) if rank == 0 and config.get("run_id") else None

    def report(metrics: dict[str, float], checkpoint_dir: str | None) -> None:
        if logger is not None:
            logger.log(metrics, int(metrics["step"]))
        ckpt = ray.train.Checkpoint.from_directory(checkpoint_dir) if checkpoint_dir else None
        ray.train.report(
            dict(metrics), checkpoint=ckpt, checkpoint_dir_name=Path(checkpoint_dir).name if checkpoint_dir else None
        )

    def progress(total: int, initial: int, desc: str) -> Any:
        return ProgressFile(Path(config["progress_file"]), total=total, initial=initial, desc=desc)

    hooks = TrainHooks(
        report=report,
        log_artifact=(lambda path, sub: logger.artifact(path, sub)) if logger is not None else None,
        prepare_model=rt.prepare_model,
        prepare_loader=rt.prepare_data_loader,
        progress=progress,
    )
    kwargs = dict(
        device=rt.get_device(), rank=rank, world_size=world, hooks=hooks,
        faults=FaultPlan(**config["faults"]), steps=config["steps"],
    )
    k = config["stage"]
    storage = config.get("storage")  # a components.run_storage.RunStorage (pickled by Ray)
    if storage is not None:  # shared storage: data through the URI, outputs in a node-local scratch
        processed: str | Path = storage.node_copy(config["processed"])
        out_dir = _worker_scratch(storage, params, k, rank)
        publish = (lambda: _publish_outputs(storage, RunLayout(out_dir, k))) if rank == 0 else (lambda: None)
    else:
        processed, out_dir, publish = config["processed"], Path(config["out_dir"]), (lambda: None)
    layout = RunLayout(out_dir, k)
    if storage is not None and rank == 0:
        hooks.report = _publishing(report, publish)
    ckpt = ray.train.get_checkpoint()
    _record_placement(layout, rank, world, Path(ckpt.path).name if ckpt is not None else None)
    publish()
    try:
        if ckpt is not None:
            with ckpt.as_directory() as d:
                train_stage(params, k, processed, out_dir, resume_from=d, **kwargs)
        else:
            train_stage(params, k, processed, out_dir, **kwargs)
    except NonFiniteError as e:
        # Every rank detects it at the same step (the loop all-reduces the check). End
        # normally so Ray does not retry a deterministic failure; rank 0 leaves the reason
        # for the driver (Result.metrics only holds checkpointed reports).
        if rank == 0:
            _write_failure(layout, {"step": e.step, "message": str(e)})
            if storage is not None:
                storage.put_file(_failure_file(layout), _train_rel(layout, _failure_file(layout)))
        return
    publish()
    if storage is not None:
        shutil.rmtree(out_dir, ignore_errors=True)


def _train_rel(layout: RunLayout, path: Path) -> str:
    """The storage key of ``path`` (inside the training folder ``layout.out_dir``)."""
    return f"{RUN_STORAGE_DIRS['train']}/{path.relative_to(layout.out_dir).as_posix()}"


def _publishing(report: Any, publish: Any) -> Any:
    """Rank 0's report hook with run storage: the stage's outputs so far (models, curves,
    montages) are published before a checkpoint is reported, so the run folder is never
    older than the newest checkpoint Ray persists."""

    def hook(metrics: dict[str, float], checkpoint_dir: str | None) -> None:
        if checkpoint_dir is not None:
            publish()
        report(metrics, checkpoint_dir)

    return hook


def _publish_outputs(storage: RunStorageLike, layout: RunLayout) -> None:
    """Rank 0: copy this stage's outputs from the scratch training folder to ``<run>/train``
    (unchanged files are skipped): exported models, curves, montages, metrics, placement."""
    for folder in (layout.model().parent, layout.plots, layout.montages):
        storage.put_dir(folder, _train_rel(layout, folder))
    for f in (layout.metrics_file, layout.ray_workers):
        storage.put_file(f, _train_rel(layout, f))


def _worker_scratch(storage: RunStorageLike, params: Params, k: int, rank: int) -> Path:
    """A node-local training folder for this rank, rebuilt from the run storage at every
    worker-group attempt: the run's training folder (earlier stages' models, this stage's
    outputs and placement record) and this stage's checkpoints (every one Ray kept, so the
    loop's resume picks the newest intact one, its digest checked, exactly as locally).
    Fault-injection markers of the resilience tests (``.fault-*``) survive the rebuild."""
    import hashlib

    name = params.stage(k).name
    scratch = storage.node_cache() / "runs" / hashlib.sha256(storage.root.encode()).hexdigest()[:16] / f"{name}-rank{rank}"
    layout = RunLayout(scratch, k)
    markers = {p.name: p.read_bytes() for p in layout.checkpoints.glob(".fault-*")} if layout.checkpoints.is_dir() else {}
    shutil.rmtree(scratch, ignore_errors=True)
    storage.get_dir(RUN_STORAGE_DIRS["train"], scratch)
    layout.checkpoints.mkdir(parents=True, exist_ok=True)
    for stale in layout.checkpoints.glob("step_*"):  # a checkpoint that Ray never persisted is not part of the run
        shutil.rmtree(stale, ignore_errors=True)
    storage.get_checkpoints(name, layout.checkpoints)
    for marker, data in markers.items():
        (layout.checkpoints / marker).write_bytes(data)
    return scratch


def _read_placement(layout: RunLayout) -> list[dict[str, Any]]:
    """The recorded worker-group attempts (``[]`` when there are none yet)."""
    from xct_core.jsondoc import read_json_doc

    path = layout.ray_workers
    return list(read_json_doc(path, "Ray worker placement")["attempts"]) if path.is_file() else []


def _record_placement(layout: RunLayout, rank: int, world: int, ray_checkpoint: str | None) -> None:
    """Every rank (a collective): gather each worker's Ray node; rank 0 appends the attempt."""
    import ray
    import torch.distributed as dist

    me = {"rank": rank, "node_id": ray.get_runtime_context().get_node_id(),
          "node_ip": ray.util.get_node_ip_address(), "pid": os.getpid()}
    workers: list[Any] = [me]
    if world > 1 and dist.is_available() and dist.is_initialized():
        workers = [None] * world
        dist.all_gather_object(workers, me)
    if rank == 0:
        attempts = _read_placement(layout)
        attempts.append({"attempt": len(attempts) + 1, "ray_checkpoint": ray_checkpoint, "workers": workers})
        write_json_atomic(layout.ray_workers, {"attempts": attempts})


def _distinct_nodes(attempts: list[dict[str, Any]]) -> list[str]:
    return sorted({w["node_id"] for a in attempts for w in a["workers"]})


def _placement_tags(attempts: list[dict[str, Any]]) -> dict[str, Any]:
    nodes = _distinct_nodes(attempts)
    return {"xct.ray_nodes": ",".join(nodes), "xct.ray_attempts": len(attempts)} if attempts else {}


def _has_checkpoint(layout: RunLayout, ray_run_dir: Path) -> bool:
    """Is there anything to resume from (the loop's checkpoints or Ray's)?"""
    return latest_checkpoint(layout.checkpoints) is not None or any(ray_run_dir.glob("step_*/state.pt"))


def _failure_file(layout: RunLayout) -> Path:
    return layout.checkpoints / "nonfinite.json"


def _write_failure(layout: RunLayout, doc: dict[str, Any]) -> None:
    write_json_atomic(_failure_file(layout), redact_doc(doc))  # no credential in what the driver reads back


# --------------------------------------------------------------------------- driver side


def _ray_init() -> tuple[bool, float]:
    """Join ``$RAY_ADDRESS`` or start local Ray; returns (started here, seconds)."""
    import ray

    if ray.is_initialized():
        return False, 0.0
    t0 = time.perf_counter()
    if os.environ.get("RAY_ADDRESS"):
        ray.init(address=os.environ["RAY_ADDRESS"], log_to_driver=True)
    else:
        ray.init(log_to_driver=True)
    return True, time.perf_counter() - t0


def scaling_config(params: RayParams) -> Any:
    """``ray.train.ScalingConfig`` from ``params.train.ray``."""
    from ray.train import ScalingConfig

    rp = params.train.ray
    res: dict[str, float] = {"CPU": rp.cpus_per_worker}
    if rp.use_gpu:
        res["GPU"] = 1.0
    res.update(rp.resources_per_worker)
    return ScalingConfig(
        num_workers=rp.num_workers, use_gpu=rp.use_gpu, resources_per_worker=res, accelerator_type=rp.accelerator_type
    )


def _root_cause(e: BaseException) -> str:
    fails = getattr(e, "worker_failures", None)
    if fails:
        rank, err = sorted(fails.items())[0]
        return f"rank {rank}: {type(err).__name__}: {str(err).strip().splitlines()[-1][:300] if str(err).strip() else ''}"
    cause = getattr(e, "controller_failure", None)
    text = str(cause or e).strip()
    return text.splitlines()[-1][:300] if text else type(e).__name__


def run_train(
    params: RayParams,
    stage: int,
    processed_dir: str | Path,
    out_dir: str | Path | None = None,
    *,
    steps: int | None = None,
    fresh: bool = False,
    faults: FaultPlan | None = None,
    parent_run_id: str | None = None,
    tracking: bool = True,
    progress: bool = True,
    log: Any = print,
    storage: RunStorageLike | None = None,
) -> TrainSummary:
    """Train stage ``stage`` on Ray Train with MLflow tracking (see the module docstring).

    ``fresh`` deletes this stage's previous outputs (checkpoints, models, curves, Ray run)
    and starts a new MLflow stage run (for stage 1 a new pipeline run); otherwise an
    interrupted run is resumed. ``faults``: injected failures for tests (default from
    ``$XCT_TRAIN_FAULTS``). Raises :class:`XctError` subclasses with one-line messages.

    The output folder is locked for the run (a second run on it is refused in one line,
    :func:`xct_core.training.folder_lock`). SIGTERM (an eviction) stops it cleanly: the
    MLflow run is marked KILLED, Ray is shut down, :class:`Terminated` (exit 143) names the
    intact newest checkpoint to resume from.

    ``storage`` (:class:`components.run_storage.RunStorage`, from ``pipeline.storage.uri``
    and a run id): the run lives in shared storage instead of ``out_dir``, which is then
    not written at all. ``processed_dir`` (a local folder) is published to the run's
    ``processed/`` (or is an ``s3://`` data URI read as is); Ray Train persists the
    checkpoints to the run's ``ray/``; every worker reads the data through a node-local
    cache and trains in a node-local scratch folder rebuilt from the run storage at each
    attempt; rank 0 publishes the stage's models, curves and metrics to the run's
    ``train/``. The same command with the same run id (a retried KFP task, a re-submitted
    Ray job, on any node) resumes from the newest intact checkpoint there, in the same
    MLflow run; the driver's small state (MLflow run ids, the lock) is kept in the node
    cache and the run storage.
    """
    if not isinstance(params, RayParams):  # the science's Params carry no train.ray: never guess it
        raise TypeError("run_train needs params with train.ray: load them with components.ray_params.RayParams "
                        "(or components.ops_params.OpsParams)")
    k = int(stage)
    if storage is not None:
        return _run_in_storage(params, k, str(processed_dir), storage, steps=steps, fresh=fresh, faults=faults,
                               parent_run_id=parent_run_id, tracking=tracking, progress=progress, log=log)
    out = Path(out_dir if out_dir is not None else params.train.out_dir).absolute()
    processed = Path(processed_dir).absolute()
    preflight(params, k, processed, out, world_size=params.train.ray.num_workers, steps=steps)
    layout = RunLayout(out, k)
    with folder_lock(layout.train_lock), SigtermGuard(lambda: _stopped(params.stage(k).name, layout)) as guard:
        return _run_locked(params, k, processed, out, steps=steps, fresh=fresh, faults=faults,
                           parent_run_id=parent_run_id, tracking=tracking, progress=progress, log=log, guard=guard)


def _run_in_storage(params: RayParams, k: int, processed: str, storage: RunStorageLike, *, steps: int | None,
                    fresh: bool, faults: FaultPlan | None, parent_run_id: str | None, tracking: bool,
                    progress: bool, log: Any) -> TrainSummary:
    """:func:`run_train` with run storage: the driver's checks, the data published, then
    :func:`_run_locked` on a node-local driver folder that mirrors the run's state docs."""
    import hashlib

    st = params.stage(k)
    if storage.is_data_uri(processed):
        data_uri, local_data = processed, storage.node_copy(processed)
    else:
        data_uri, local_data = storage.processed, Path(processed).absolute()
    preflight(params, k, local_data, None, world_size=params.train.ray.num_workers, steps=steps, check_models=False)
    for j in range(1, k):  # the frozen earlier stages must be in the run (trained with the same run id)
        rel = f"{RUN_STORAGE_DIRS['train']}/{RunLayout(Path('.'), j).model(params.train.prev_stage_model).as_posix()}"
        if not storage.exists(rel):
            raise InputError(storage.url(rel), f"stage {j} model not found in the run storage: train stage {j} "
                                               f"with the same run id first (xct train --stage {j} --run-id …)")
    driver = storage.node_cache() / "driver" / hashlib.sha256(storage.root.encode()).hexdigest()[:16]
    layout = RunLayout(driver, k)
    with folder_lock(layout.train_lock), SigtermGuard(lambda: _stopped(st.name, layout, storage=storage)) as guard:
        if not storage.is_data_uri(processed):
            log(f"{st.name}: publishing {local_data} → {data_uri}")
            storage.publish_processed(local_data)
        return _run_locked(params, k, local_data, driver, steps=steps, fresh=fresh, faults=faults,
                           parent_run_id=parent_run_id, tracking=tracking, progress=progress, log=log, guard=guard,
                           storage=storage, data_uri=data_uri)


def _start_tracking(params: Params, k: int, n_steps: int, processed: Path, out: Path, *, fresh: bool,
                    resuming: bool, parent_run_id: str | None, where: dict[str, str] | None = None) -> Any:
    """The stage's MLflow run (:class:`components.tracking.StageRun`), new or resumed."""
    from components.tracking import StageRun, bound_requests, lineage_tags

    bound_requests(params.registry)  # the params' MLflow time bounds for this process and those it starts
    name = params.stage(k).name
    cfg = params.stages[name].model_dump(mode="json")
    logged = {
        "stage": k, "steps": n_steps, "seed": params.seed, name: cfg,
        "train": {kk: v for kk, v in params.train.model_dump(mode="json").items() if kk != "steps"},
        "diffusion": params.diffusion.model_dump(mode="json"), "hu": params.hu.model_dump(mode="json"),
        "model": params.model.model_dump(mode="json"), "drr": params.drr.model_dump(mode="json"),
    }
    layout = RunLayout(out, k)
    return StageRun(
        experiment=params.train.experiment, stage=k, run_name=name,
        state_file=layout.mlflow_state, pipeline_file=out / "mlflow_pipeline.json",
        params=logged, tags={**lineage_tags(params.digest(), processed), **(where or {"xct.out_dir": str(out)})},
        new_run=fresh or not resuming, new_pipeline=fresh and k == 1,
        parent_run_id=parent_run_id,
    )


def _trainer(params: Params, name: str, storage: Path | str, config: dict[str, Any], filesystem: Any = None) -> Any:
    """The ``TorchTrainer`` of one stage run (scaling, storage, retries, checkpoints kept);
    ``filesystem``: the pyarrow filesystem ``storage`` is a path in (run storage on S3)."""
    from ray.train import CheckpointConfig, FailureConfig, LoggingConfig, RunConfig
    from ray.train.torch import TorchTrainer

    return TorchTrainer(
        _worker_loop,
        train_loop_config=config,
        scaling_config=scaling_config(params),
        run_config=RunConfig(
            name=name,
            storage_path=str(storage),
            storage_filesystem=filesystem,
            failure_config=FailureConfig(max_failures=params.train.ray.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=params.train.keep_last),
            logging_config=LoggingConfig(log_level="WARNING"),
        ),
    )


def _stage_docs(layout: RunLayout) -> list[Path]:
    """The driver's small state docs of a stage (mirrored to the run storage's ``train/``)."""
    return [layout.mlflow_state, layout.out_dir / "mlflow_pipeline.json", layout.ray_workers, _failure_file(layout),
            layout.metrics_file]


def _sync_down(store: RunStorageLike, layout: RunLayout) -> None:
    """The driver folder's state docs := the run storage's (absent there: absent here)."""
    for f in _stage_docs(layout):
        f.unlink(missing_ok=True)
        store.get_file(_train_rel(layout, f), f)


def _clear_storage(store: RunStorageLike, layout: RunLayout, name: str) -> None:
    """``--fresh`` with run storage: this stage's checkpoints, outputs and state docs go."""
    store.delete(f"{RUN_STORAGE_DIRS['ray']}/{name}")
    for p in (layout.checkpoints, layout.model().parent, layout.plots, layout.montages, layout.metrics_file):
        store.delete(_train_rel(layout, p))


def _run_locked(params: Params, k: int, processed: Path, out: Path, *, steps: int | None, fresh: bool,
                faults: FaultPlan | None, parent_run_id: str | None, tracking: bool, progress: bool, log: Any,
                guard: SigtermGuard, storage: RunStorageLike | None = None, data_uri: str | None = None) -> TrainSummary:
    """:func:`run_train` once the folder is locked and SIGTERM is guarded (``storage``: the
    run storage; ``out`` is then the driver's node-local mirror of its state docs)."""
    st = params.stage(k)
    name = st.name
    n_steps = int(steps) if steps is not None else st.train_steps

    import ray  # after the checks: a bad input fails fast, without importing Ray

    layout = RunLayout(out, k)
    ray_storage: Path | str = out / "ray"
    filesystem = None
    faults = faults if faults is not None else faults_from_env()
    if storage is not None:
        ray_storage, filesystem = storage.ray_storage()
        if fresh:
            _clear_storage(storage, layout, name)
        storage.delete(_train_rel(layout, _failure_file(layout)))
        _sync_down(storage, layout)
        resuming = bool(storage.checkpoint_dirs(name))
        if not resuming:
            storage.delete(_train_rel(layout, layout.ray_workers))
            layout.ray_workers.unlink(missing_ok=True)
    else:
        if fresh:
            layout.clear()
            shutil.rmtree(Path(ray_storage) / name, ignore_errors=True)
        _failure_file(layout).unlink(missing_ok=True)
        resuming = _has_checkpoint(layout, Path(ray_storage) / name)
        if not resuming:  # attempts of an earlier try that saved nothing are not part of this run
            layout.ray_workers.unlink(missing_ok=True)

    mlrun = None
    if tracking:
        where = {"xct.run_uri": storage.root, "xct.data_uri": str(data_uri)} if storage is not None else None
        mlrun = _start_tracking(params, k, n_steps, processed, out, fresh=fresh, resuming=resuming,
                                parent_run_id=parent_run_id, where=where)
        log(f"{name}: MLflow run {mlrun.run_id} ({'resumed' if mlrun.resumed else 'new'}) at {redact_url(mlrun.uri)}")
        if storage is not None:  # a retry on another node continues the same MLflow runs
            for f in _stage_docs(layout)[:2]:
                storage.put_file(f, _train_rel(layout, f))

    was_up = ray.is_initialized()
    t_init = t_fit = 0.0
    try:
        _, t_init = _ray_init()
        guard.reassert()  # ray.init installed its own SIGTERM handler (sys.exit + a C++ stack dump)
        progress_file = layout.checkpoints / "progress.json"
        config = {
            "params": params.model_dump(mode="json"), "stage": k, "processed": str(processed), "out_dir": str(out),
            "steps": n_steps, "faults": asdict(faults), "progress_file": str(progress_file),
            "run_id": mlrun.run_id if mlrun else None, "tracking_uri": mlrun.uri if mlrun else None,
            "storage": None,
        }
        if storage is not None:  # workers read and write only through the run storage
            config.update(processed=str(data_uri), out_dir=None, storage=storage)
        trainer = _trainer(params, name, ray_storage, config, filesystem)
        t0 = time.perf_counter()
        with DriverBar(progress_file, name) if progress else contextlib.nullcontext():
            result = trainer.fit()
        t_fit = time.perf_counter() - t0
    except BaseException as e:
        if storage is not None:
            with contextlib.suppress(Exception):
                _sync_down(storage, layout)
        _end_failed(e, mlrun, guard, name, layout, params.train.ray.max_failures, storage)
        raise
    finally:
        if not was_up and ray.is_initialized():
            ray.shutdown()
    if storage is not None:
        _sync_down(storage, layout)
    return _summarise(name, k, layout, mlrun, result, log, t_init, t_fit, storage)


def _end_failed(e: BaseException, mlrun: Any, guard: SigtermGuard, name: str, layout: RunLayout,
                max_failures: int, storage: RunStorageLike | None = None) -> None:
    """Close the MLflow run of a run that raised ``e`` (never leave it RUNNING) and raise the
    one-line error to show, if it is not ``e`` itself."""
    import ray.train

    if guard.fired:  # SIGTERM, however the engine passed it on
        msg = _stopped(name, layout, f" (MLflow run {mlrun.run_id} marked KILLED)" if mlrun else "", storage=storage)
        if mlrun:
            mlrun.end("KILLED", msg)
        raise Terminated(msg) from None
    if isinstance(e, KeyboardInterrupt):
        if mlrun:
            mlrun.end("KILLED", "interrupted")
        return
    if isinstance(e, ray.train.TrainingFailedError):
        msg = f"{name}: training failed after {max_failures} retries ({redact(_root_cause(e))})"
        if mlrun:
            mlrun.set_tags(_placement_tags(_read_placement(layout)))
            mlrun.end("FAILED", msg)
        raise TrainingFailed(msg) from None
    if mlrun:  # XctError: its message; a bug or an infrastructure error: its type too
        mlrun.end("FAILED", str(e) if isinstance(e, XctError) else f"{type(e).__name__}: {e}")


def _summarise(name: str, k: int, layout: RunLayout, mlrun: Any, result: Any, log: Any, t_init: float,
               t_fit: float, storage: RunStorageLike | None = None) -> TrainSummary:
    """After ``fit``: the non-finite verdict, tags, the placement record, the summary."""
    final = dict(result.metrics or {})
    if _failure_file(layout).is_file():
        doc = json.loads(_failure_file(layout).read_text())
        if mlrun:
            mlrun.set_tags({"xct.nonfinite_step": int(doc["step"])})
            mlrun.end("FAILED", doc["message"])
        raise NonFiniteError(doc["message"], int(doc["step"]), None)

    summary = json.loads(layout.metrics_file.read_text()) if layout.metrics_file.is_file() else {}
    attempts = _read_placement(layout)
    if attempts:
        nodes = _distinct_nodes(attempts)
        log(f"{name}: Ray workers ran on {len(nodes)} node(s) in {len(attempts)} attempt(s) "
            f"({', '.join(n[:12] for n in nodes)})")
    if mlrun:
        names = {"step": "xct.final_step", "start_step": "xct.start_step", "best_step": "xct.best_step"}
        mlrun.set_tags({tag: summary[key] for key, tag in names.items() if summary.get(key) is not None}
                       | _placement_tags(attempts))
        if attempts:
            mlrun.client.log_artifact(mlrun.run_id, str(layout.ray_workers), "ray")
        mlrun.end("FINISHED")
    models = (layout.model("final"), layout.model("best"))
    if storage is not None:
        models = tuple(m.relative_to(layout.out_dir) for m in models)  # type: ignore[assignment]
    return TrainSummary(
        stage=k, name=name, final_step=int(summary.get("step", final.get("step", 0))), start_step=summary.get("start_step"),
        final_model=models[0], best_model=models[1],
        run_id=mlrun.run_id if mlrun else None, parent_run_id=mlrun.parent_run_id if mlrun else None,
        metrics=summary, ray_startup_s=t_init, fit_s=t_fit, attempts=attempts,
        train_uri=storage.train if storage is not None else None,
    )
