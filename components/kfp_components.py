"""Every Kubeflow Pipelines v2 component of the DAG, in one place (pipelines/kfp_dag.py wires them).

Each component is a thin adapter that calls its step's plain function — the same function the
``xct`` command that dvc.yaml runs calls (``components.ingest.run_ingest``, ``run_validate``,
``run_preprocess``, ``components.train.run_train``, ``run_evaluate``, ``run_gate``,
``run_register``), as the KFP v2 lightweight-component samples do — so the step logic stays in
the step modules and the three ways of running a step (DVC, a KFP cluster, ``kfp.local``)
cannot drift apart. Nothing here calls up into ``pipelines/``. The bodies are self-contained
(KFP ships a function's source into the container), so they import xct inside the function.

Artifacts map onto the DVC layout (:mod:`xct_core.layout`):

- ``ingest_component`` → ``interim`` (volumes, stats table, splits); ``validate_component`` →
  ``validated`` (report.json, splits.json) + ``report_html``; ``preprocess_component`` →
  ``processed`` (stage grids, X-rays, manifest).
- ``train_stage_component`` → ``model`` (``Output[Model]``): a training output folder
  (``models/stage{1..K}``, ``plots``, ``metrics``; layout in :mod:`xct_core.training`).
  Stage K>1 starts from a copy of stage K-1's folder (the frozen earlier stages).
- ``evaluate_step_component`` → ``report`` (``reports/eval/stageK``: ``metrics.json``,
  ``per_patient.csv``) + a KFP ``Metrics`` artifact with the numeric metrics.
- ``gate_report_component`` → ``reports``: the reports folder so far (a
  :class:`xct_core.layout.ReportLayout`: ``eval/stage1..K``, ``gates/stage1..K.json``), grown
  from stage K-1's the way training grows the model folder; and the output parameter
  ``passed`` that the pipeline's ``dsl.If`` conditions read.
- ``register_component`` (the last stage's model and reports in) → ``summary``
  (``summary.json`` + the model card ``model_card.{json,md}``), run after the last gate passed.
- ``rejected_component``: the ``dsl.Else`` branch of a gate; records why the run stopped.
- ``run_summary_component``: the exit task (:mod:`components.kfp_exit_handler`).

``params_yaml`` is the text of a params.yaml (empty: the built-in defaults);
``ray_address`` / ``mlflow_tracking_uri`` (empty: the step's own default — local Ray, the
embedded sqlite MLflow) become ``RAY_ADDRESS`` / ``MLFLOW_TRACKING_URI`` for the step.

Lineage: the tasks that open MLflow runs (train, register, rejected) and the exit task take
``kfp_run_id`` / ``kfp_run_name`` / ``kfp_task_name``, which the pipeline fills with
:data:`KFP_LINEAGE` (``dsl.PIPELINE_JOB_ID_PLACEHOLDER``, ``…JOB_NAME…``, ``…TASK_NAME…``,
resolved by KFP at run time); the task hands them to the step as ``XCT_KFP_*``
(:func:`components.tracking.kfp_environment`) and every MLflow run it makes is tagged
``kfp.run_id`` / ``kfp.run_name`` / ``kfp.task_name`` (:func:`components.tracking.origin_tags`).
The processed data's artifact URI becomes ``XCT_DATA_URI``: the source of the runs' dataset
inputs.

Images: ``xct-light`` (CPU: every step but training) and ``xct-train`` (CUDA: training). Both
ship xct and the pinned kfp, so components do not pip-install kfp at start-up
(``install_kfp_package=False``); that also keeps ``kfp.local`` runs from touching the current
environment. The compiled pipeline names each image by its content tag
(``xct-light:0.1.0-<digest of the code>``, :mod:`components.image_tag`), so a code change
changes every task's cache key. Override the images with ``XCT_IMAGE_LIGHT`` /
``XCT_IMAGE_TRAIN`` (used verbatim; read when this module is imported, i.e. at pipeline
compile time).

No ``from __future__ import annotations``: KFP reads the real annotation objects
(``Input[Dataset]``), not strings.
"""

import os
from collections.abc import Callable
from typing import Any, NamedTuple

from kfp import dsl
from kfp.dsl import HTML, Artifact, Dataset, Input, Markdown, Metrics, Model, Output

from xct_core.config import Params, params_from_dict
from xct_core.errors import ConfigError

def _content_tagged(var: str, base: str, key: str) -> str:
    """``$var`` verbatim when set; else ``base`` with the content tag of this checkout's image
    ``key`` (:mod:`components.image_tag`: a code change = a new image name = new cache keys).
    Inside a running task the tag is not needed (the image is already chosen)."""
    if var in os.environ or os.environ.get("_KFP_RUNTIME", "false") == "true":
        return base
    from components.image_tag import content_ref

    return content_ref(base, key)


#: CPU image for data steps (release tag from infra/images.yaml; compiled with its content tag)
IMAGE_LIGHT: str = _content_tagged("XCT_IMAGE_LIGHT", os.environ.get("XCT_IMAGE_LIGHT", "xct-light:0.1.0"), "light")
#: GPU image for training steps
IMAGE_TRAIN: str = _content_tagged("XCT_IMAGE_TRAIN", os.environ.get("XCT_IMAGE_TRAIN", "xct-train:0.1.0"), "train")


def _in_kfp_task() -> bool:
    """True inside a running KFP task: the executor sets ``_KFP_RUNTIME=true`` and its
    ``kfp.dsl`` then has no ``component`` decorator. A component body that imports its own
    step module (``from components.ingest import run_ingest``) must still import cleanly."""
    return os.environ.get("_KFP_RUNTIME", "false") == "true"


def light_component(func: Callable[..., Any]) -> Any:
    """``@dsl.component`` on the light (CPU) image, without a kfp pip install at start-up."""
    if _in_kfp_task():
        return func
    return dsl.component(func, base_image=IMAGE_LIGHT, install_kfp_package=False)


def train_component(func: Callable[..., Any]) -> Any:
    """``@dsl.component`` on the training (GPU) image, without a kfp pip install at start-up."""
    if _in_kfp_task():
        return func
    return dsl.component(func, base_image=IMAGE_TRAIN, install_kfp_package=False)


def params_from_text(params_yaml: str, schema: type[Params] | None = None, *, step: str | None = None,
                     stage: int | None = None) -> Params:
    """Typed params from the text of a params.yaml (how pipelines hand params to components),
    validated by ``schema`` (default: the science's :class:`Params`; the train task reads
    ``pipeline`` and ``train.ray`` too: ``components.ops_params.OpsParams``).

    ``step`` (and ``stage`` for train/evaluate/gate): the text is the KFP task's scoped params
    (:func:`components.step_params.scoped_text`: only the keys that step reads, so its cache
    key changes only when they do). Every key the step reads must be in it — a missing one is
    a :class:`ConfigError`, never a silent default (:func:`components.step_params.parse_scoped`);
    a whole params text passes too. An empty text is a :class:`ConfigError`, never a silent
    fall-back to built-in defaults. Invalid YAML or values (unknown keys included) raise
    :class:`ConfigError`.
    """
    from xct_core.errors import InputError
    from xct_core.yamlsafe import load_yaml_text

    try:  # the one bounded YAML reader (aliases, depth, duplicate keys)
        data = load_yaml_text(params_yaml, "params_yaml") if params_yaml.strip() else {}
    except InputError as e:
        raise ConfigError(str(e)) from None
    if not isinstance(data, dict):
        raise ConfigError(f"params_yaml: top level must be a mapping, got {type(data).__name__}")
    if not data:
        raise ConfigError("params_yaml is empty: a task needs its params text "
                          "(`xct pipeline compile|run|submit` hand it on; the compiled default is the compile-time params)")
    if step is not None:
        from components.step_params import parse_scoped

        data = parse_scoped(data, step, stage)
    return params_from_dict(data, "params_yaml", schema)


# --------------------------------------------------------------------------- params scoping


@light_component
def data_params_component(
    params_yaml: str,
) -> NamedTuple("DataParamsOutputs", [("ingest", str), ("validate", str), ("preprocess", str),  # noqa: UP014
                                      ("register", str)]):
    """KFP step: the whole ``params_yaml`` (validated as a whole file) → the params text of each
    data step and of register: only the keys that step reads
    (:func:`components.step_params.scoped_text`), so each task's cache key follows its own keys."""
    from collections import namedtuple

    from components.kfp_components import params_from_text
    from components.ops_params import OpsParams
    from components.step_params import scoped_text

    params = params_from_text(params_yaml, OpsParams)
    steps = ["ingest", "validate", "preprocess", "register"]
    return namedtuple("DataParamsOutputs", steps)(*(scoped_text(params, s) for s in steps))


@light_component
def stage_params_component(
    params_yaml: str,
    stage: int,
) -> NamedTuple("StageParamsOutputs", [("train", str), ("evaluate", str), ("gate", str)]):  # noqa: UP014
    """KFP step: the whole ``params_yaml`` → the params text of stage ``stage``'s train,
    evaluate and gate tasks (:func:`components.step_params.scoped_text`)."""
    from collections import namedtuple

    from components.kfp_components import params_from_text
    from components.ops_params import OpsParams
    from components.step_params import scoped_text

    params = params_from_text(params_yaml, OpsParams)
    steps = ["train", "evaluate", "gate"]
    return namedtuple("StageParamsOutputs", steps)(*(scoped_text(params, s, stage) for s in steps))


# --------------------------------------------------------------------------- data steps


@light_component
def ingest_component(
    raw: Input[Dataset],
    interim: Output[Dataset],
    params_yaml: str = "",
) -> NamedTuple("IngestOutputs", [("n_ok", int), ("n_failed", int)]):  # noqa: UP014
    """KFP step: ``raw`` (a folder of CTs) → ``interim`` (volumes, stats table, splits).

    ``params_yaml``: the text of params.yaml (empty: defaults). Returns the number of volumes
    that loaded and that failed (the failures are judged by the validate step).
    """
    from collections import namedtuple

    from components.kfp_components import params_from_text
    from components.ingest import run_ingest

    res = run_ingest(raw.path, interim.path, params_from_text(params_yaml, step="ingest"), log=print)
    interim.metadata["n_volumes"] = len(res.rows)
    interim.metadata["n_failed"] = res.n_failed
    return namedtuple("IngestOutputs", ["n_ok", "n_failed"])(res.n_ok, res.n_failed)


@light_component
def validate_component(
    interim: Input[Dataset],
    validated: Output[Dataset],
    report_html: Output[HTML],
    params_yaml: str = "",
) -> NamedTuple("ValidateOutputs", [("passed", bool), ("n_failed", int)]):  # noqa: UP014
    """KFP step: validate ``interim`` (ingest output) → ``validated`` (report.json, splits.json)
    and ``report_html``. Policy fail with failures raises (the run stops, the task is red)."""
    import shutil
    from collections import namedtuple
    from pathlib import Path

    from components.kfp_components import params_from_text
    from components.validate import REPORT_HTML, run_validate

    params = params_from_text(params_yaml, step="validate")
    report = run_validate(interim.path, validated.path, params, log=print)
    Path(report_html.path).parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(Path(validated.path) / REPORT_HTML, report_html.path)
    validated.metadata["n_failed"] = len(report.failed)
    validated.metadata["quarantined"] = report.quarantined
    if not report.success and report.policy == "fail":
        raise RuntimeError(
            f"data validation failed for {len(report.failed)} volume(s):\n" + "\n".join(report.failure_lines())
        )
    return namedtuple("ValidateOutputs", ["passed", "n_failed"])(report.success, len(report.failed))


@light_component
def preprocess_component(
    interim: Input[Dataset],
    validated: Input[Dataset],
    processed: Output[Dataset],
    params_yaml: str = "",
) -> NamedTuple("PreprocessOutputs", [("n_volumes", int), ("params_digest", str)]):  # noqa: UP014
    """KFP step: ``interim`` (ingest output: ``volumes/``) + ``validated`` (validate output:
    ``splits.json`` after quarantine) → ``processed`` (stage grids, X-rays, manifest).

    ``params_yaml``: the text of params.yaml (empty: defaults).
    """
    from collections import namedtuple
    from pathlib import Path

    from components.kfp_components import params_from_text
    from components.preprocess import run_preprocess

    res = run_preprocess(
        Path(interim.path) / "volumes",
        Path(validated.path) / "splits.json",
        processed.path,
        params_from_text(params_yaml, step="preprocess"),
        progress=False,
        log=print,
    )
    n = len(res.manifest["items"])
    processed.metadata["n_volumes"] = n
    processed.metadata["params_digest"] = res.manifest["params_digest"]
    processed.metadata["splits"] = {s: len(v) for s, v in res.manifest["splits"].items()}
    if res.ray_nodes:
        processed.metadata["ray_nodes"] = sorted(set(res.ray_nodes.values()))
    return namedtuple("PreprocessOutputs", ["n_volumes", "params_digest"])(n, res.manifest["params_digest"])


# --------------------------------------------------------------------------- cascade steps


#: the output-parameter name of the gate decision (read by ``dsl.If`` in pipelines/kfp_dag.py)
GATE_PASSED = "passed"
#: the lineage inputs of the tasks that open MLflow runs: KFP resolves these placeholders at
#: run time to the run's id and name and the task's name (``**KFP_LINEAGE`` in pipelines/kfp_dag.py)
KFP_LINEAGE = {"kfp_run_id": dsl.PIPELINE_JOB_ID_PLACEHOLDER, "kfp_run_name": dsl.PIPELINE_JOB_NAME_PLACEHOLDER,
               "kfp_task_name": dsl.PIPELINE_TASK_NAME_PLACEHOLDER}


def _environment(values: dict) -> None:
    """Set the non-empty ``values`` as environment variables of this task (RAY_ADDRESS,
    MLFLOW_TRACKING_URI: the engines read them). From here on the task's output is redacted
    (:func:`xct_core.redact.install_redaction`: a tracking URI's password never reaches its log)."""
    import os

    from xct_core.redact import install_redaction

    os.environ.update({k: v for k, v in values.items() if v})
    install_redaction()


def _lineage_environment(kfp_run_id: str, kfp_run_name: str, kfp_task_name: str, data: Any = None) -> None:
    """``XCT_KFP_*`` from the task's lineage inputs (:data:`KFP_LINEAGE`) and ``XCT_DATA_URI``
    from the processed data artifact ``data``: the tags and dataset source of its MLflow runs."""
    from components.tracking import kfp_environment

    _environment({**kfp_environment(kfp_run_id, kfp_run_name, kfp_task_name),
                  "XCT_DATA_URI": getattr(data, "uri", "") if data is not None else ""})


@train_component
def train_stage_component(
    stage: int,
    processed: Input[Dataset],
    model: Output[Model],
    previous: Input[Model] = None,
    params_yaml: str = "",
    ray_address: str = "",
    mlflow_tracking_uri: str = "",
    kfp_run_id: str = "",
    kfp_run_name: str = "",
    kfp_task_name: str = "",
) -> NamedTuple("TrainOutputs", [("final_step", int)]):  # noqa: UP014
    """Train cascade stage ``stage`` into ``model`` (:func:`components.train.run_train`: Ray
    Train + MLflow; :func:`components.train.run_local` in-process when
    ``pipeline.train.local`` is true) — the functions ``xct train`` calls. With
    ``pipeline.ray.address`` set the stage runs as a Ray job on that cluster
    (:func:`components.ray_jobs.submit_stage`: log streamed here, stopped when the task is).

    ``previous``: stage K-1's ``model`` folder (required for K > 1; copied in first so the
    frozen earlier stages are found at ``models/stage{1..K-1}``).

    With run storage (``pipeline.storage.uri``; ``kfp_run_id`` = the KFP run's id,
    ``dsl.PIPELINE_JOB_ID_PLACEHOLDER``, names the run's folder) the training lives in ``<uri>/<run id>/``: data,
    checkpoints and models there, never in this pod; a retried task resumes from the newest
    checkpoint there (no ``fresh`` start). ``model`` then receives the run's exported models,
    curves and metrics for the downstream tasks. With ``pipeline.ray.address`` too, the
    task publishes the processed data to the run and submits ``xct train --data-uri
    <run>/processed --storage-uri … --run-id <run id>`` as the Ray job (no ``--fresh``: a
    retry resumes from the run's checkpoints); nothing the job reads or writes is in this pod.
    """
    import os
    import shutil
    from collections import namedtuple
    from pathlib import Path

    from components.kfp_components import _environment, _lineage_environment, params_from_text
    from components.ops_params import OpsParams
    from components.run_storage import RunStorage
    from components.train import run_local, run_train
    from xct_core.errors import ConfigError
    from xct_core.layout import RUN_STORAGE_DIRS, RunLayout

    out = Path(model.path)
    if stage > 1:
        if previous is None:
            raise ValueError(f"stage {stage} needs the previous stage's model folder")
        shutil.copytree(previous.path, out, dirs_exist_ok=True, ignore=shutil.ignore_patterns("checkpoints", "ray"))
    out.mkdir(parents=True, exist_ok=True)
    params = params_from_text(params_yaml, OpsParams, step="train", stage=stage)
    _environment({"RAY_ADDRESS": ray_address, "MLFLOW_TRACKING_URI": mlflow_tracking_uri})
    _lineage_environment(kfp_run_id, kfp_run_name, kfp_task_name, processed)  # tags of its MLflow runs
    if params.pipeline.storage.uri and not params.pipeline.train.local:
        run_id = os.environ.get("XCT_KFP_RUN_ID", "")  # set by _lineage_environment or the pod's label
        if not run_id:
            raise ConfigError("pipeline.storage.uri is set but the train task got no kfp_run_id (the run's folder "
                              "in the storage): run it from the compiled pipeline, which passes the KFP run id")
        storage = RunStorage.for_run(params.pipeline.storage.uri, run_id, params.s3)
        for j in range(1, stage):  # the frozen earlier stages (a cached upstream task may not have published them)
            folder = RunLayout(out, j).model().parent
            storage.put_dir(folder, f"{RUN_STORAGE_DIRS['train']}/{folder.relative_to(out).as_posix()}")
        if params.pipeline.ray.address:  # a Ray job trains the run in the storage (the same run id: resumes)
            from components.ray_jobs import submit_stage

            final_step = submit_stage(params, stage, processed.path, out, run_id=run_id)
        else:
            final_step = run_train(params, stage, processed.path, None, storage=storage, log=print).final_step
        lay = RunLayout(out, stage)
        for p in (lay.model().parent, lay.plots, lay.metrics_file):
            rel = f"{RUN_STORAGE_DIRS['train']}/{p.relative_to(out).as_posix()}"
            storage.get_file(rel, p) if p.suffix == ".json" else storage.get_dir(rel, p)
        model.metadata["run_uri"] = storage.root
    elif params.pipeline.train.local:
        final_step = run_local(params, stage, processed.path, out, fresh=True).final_step
    elif params.pipeline.ray.address:  # a Ray job on that cluster (Jobs API); this pod needs no GPU
        from components.ray_jobs import submit_stage

        final_step = submit_stage(params, stage, processed.path, out, fresh=True)
    else:
        final_step = run_train(params, stage, processed.path, out, fresh=True).final_step
    model.metadata["stage"] = stage
    model.metadata["final_step"] = int(final_step)
    return namedtuple("TrainOutputs", ["final_step"])(int(final_step))


@light_component
def evaluate_step_component(
    stage: int,
    processed: Input[Dataset],
    train_dir: Input[Model],
    report: Output[Dataset],
    metrics: Output[Metrics],
    params_yaml: str = "",
) -> None:
    """Evaluate the cascade 1 … ``stage`` from ``train_dir`` on the test split
    (:func:`components.evaluate.run_evaluate`) → ``report`` (metrics.json, per_patient.csv,
    montage.png); the numeric metrics also go to a KFP ``Metrics`` artifact."""
    import math

    from components.evaluate import run_evaluate
    from components.kfp_components import params_from_text

    doc = run_evaluate(stage, processed.path, train_dir.path, report.path, params_from_text(params_yaml, step="evaluate", stage=stage),
                       log=print)
    for key, value in doc.items():
        if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
            metrics.log_metric(key, float(value))
    report.metadata["stage"] = stage


@light_component
def gate_report_component(
    stage: int,
    evaluation: Input[Dataset],
    reports: Output[Dataset],
    earlier: Input[Dataset] = None,
    params_yaml: str = "",
    mlflow_tracking_uri: str = "",
) -> NamedTuple("GateOutputs", [("passed", bool), ("summary", str)]):  # noqa: UP014
    """Apply stage ``stage``'s gate to its evaluation (:func:`components.gate.run_gate`) and hand
    on the reports so far: ``reports`` = ``earlier`` (stage K-1's ``reports``; required for
    K > 1) + ``eval/stageK`` (a copy of ``evaluation``) + ``gates/stageK.json``, the layout of
    :class:`xct_core.layout.ReportLayout` that the register step reads. Returns ``passed`` (the
    ``dsl.If`` condition) and the summary. ``mlflow_tracking_uri``: the registry a champion
    check reads (empty: the step's default)."""
    import shutil
    from collections import namedtuple
    from pathlib import Path

    from components.gate import report_lines, run_gate
    from components.kfp_components import params_from_text
    from xct_core.layout import ReportLayout

    out = ReportLayout(Path(reports.path))
    if earlier is not None:
        shutil.copytree(earlier.path, out.root, dirs_exist_ok=True)
    elif stage > 1:
        raise ValueError(f"gate {stage} needs the reports of gates 1 … {stage - 1}")
    shutil.copytree(evaluation.path, out.eval_dir(stage), dirs_exist_ok=True)
    report = run_gate(stage, out.eval_metrics(stage), out.gate(stage), params_from_text(params_yaml, step="gate", stage=stage),
                      tracking_uri=mlflow_tracking_uri or None)
    for line in report_lines(report):
        print(line)
    reports.metadata["stages"] = stage
    reports.metadata["passed"] = report.passed
    return namedtuple("GateOutputs", ["passed", "summary"])(bool(report.passed), report.summary())


@light_component
def register_component(
    model: Input[Model],
    reports: Input[Dataset],
    summary: Output[Dataset],
    processed: Input[Dataset] = None,
    params_yaml: str = "",
    mlflow_tracking_uri: str = "",
    kfp_run_id: str = "",
    kfp_run_name: str = "",
    kfp_task_name: str = "",
) -> None:
    """Register the cascade (every gate passed; :func:`components.register.run_register`) →
    ``summary`` (``summary.json`` + the model card). ``model``: the last stage's training
    folder (every stage's model); ``reports``: the last gate's reports (every stage's
    evaluation and gate report, :class:`xct_core.layout.ReportLayout`); ``processed``: the
    data (lineage: its hash, the dataset inputs, the card's protocol)."""
    from pathlib import Path

    from components.kfp_components import _environment, _lineage_environment, params_from_text
    from components.register import run_register
    from xct_core.layout import ReportLayout

    _environment({"MLFLOW_TRACKING_URI": mlflow_tracking_uri})
    _lineage_environment(kfp_run_id, kfp_run_name, kfp_task_name, processed)
    layout = ReportLayout(Path(reports.path))
    out = Path(summary.path) / "summary.json"
    run_register(layout.gates_root, layout.eval_root, model.path, out, params_from_text(params_yaml, step="register"),
                 processed_dir=processed.path if processed is not None else None, log=print)


@light_component
def rejected_component(
    stage: int,
    gate_summary: str,
    report: Output[Markdown],
    summary: Output[Dataset],
    model: Input[Model] = None,
    reports: Input[Dataset] = None,
    processed: Input[Dataset] = None,
    params_yaml: str = "",
    mlflow_tracking_uri: str = "",
    kfp_run_id: str = "",
    kfp_run_name: str = "",
    kfp_task_name: str = "",
) -> str:
    """The ``dsl.Else`` branch of gate ``stage``: the run stops here (rejected, not failed).
    With the gate's ``reports`` (and ``model``, ``processed``, ``params_yaml``) it runs the
    register step's rejected path (:func:`components.register.run_register`): ``summary``
    gets ``summary.json`` + the model card, and MLflow the rejected candidate's audit run
    (:func:`components.register.log_rejected`) and the pipeline run's gate metrics."""
    from pathlib import Path

    from components.kfp_components import _environment, _lineage_environment, params_from_text
    from components.register import run_register
    from xct_core.layout import ReportLayout

    line = f"Rejected at stage {stage}; later stages were not run. {gate_summary}"
    print(line)
    with open(report.path, "w") as f:
        f.write(f"# Pipeline stopped at gate {stage}\n\n{gate_summary}\n")
    if reports is not None:
        _environment({"MLFLOW_TRACKING_URI": mlflow_tracking_uri})
        _lineage_environment(kfp_run_id, kfp_run_name, kfp_task_name, processed)
        layout = ReportLayout(Path(reports.path))
        doc = run_register(layout.gates_root, layout.eval_root, model.path if model is not None else summary.path,
                           Path(summary.path) / "summary.json", params_from_text(params_yaml),
                           processed_dir=processed.path if processed is not None else None, log=print)
        if doc["status"] != "rejected":
            raise RuntimeError(f"gate {stage} failed but the reports say {doc['status']}: {layout.root}")
    return line


# --------------------------------------------------------------------------- exit task


@light_component
def run_summary_component(status: dsl.PipelineTaskFinalStatus, summary: Output[Artifact], data_uri: str = "",
                          kfp_run_id: str = "") -> str:
    """Exit task: write the run summary (``summary/run_summary.json``); returns the final state.
    ``kfp_run_id`` (``dsl.PIPELINE_JOB_ID_PLACEHOLDER``): the id the run's MLflow runs carry
    as ``kfp.run_id``."""
    import json

    from components.kfp_exit_handler import run_summary, write_run_summary

    doc = run_summary(status.state, job=status.pipeline_job_resource_name, task=status.pipeline_task_name,
                      error_code=status.error_code, error_message=status.error_message or "", data_uri=data_uri,
                      job_id=kfp_run_id if not kfp_run_id.startswith("{{") else "")
    write_run_summary(doc, summary.path)
    print(f"xct run summary: {json.dumps(doc, sort_keys=True)}")
    return str(status.state)
