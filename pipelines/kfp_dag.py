"""The end-to-end DAG as a Kubeflow Pipelines v2 pipeline (the dvc.yaml DAG, for a cluster).

::

    importer(data_uri) → ingest → validate → preprocess → train1 → evaluate1 → gate1
      dsl.If(gate1.passed): train2 → evaluate2 → gate2
        dsl.If(gate2.passed): …
          dsl.If(gateN.passed): register          dsl.Else: rejected(N)
        dsl.Else: rejected(2)
      dsl.Else: rejected(1)

The stages come from params alone: :func:`build_pipeline` walks ``params.stages`` (N of
them), nesting each stage under the previous gate's ``dsl.If``. Two artifacts grow along the
cascade: train K hands on the model folder (stages 1 … K), gate K the reports folder
(``eval/stage1..K``, ``gates/stage1..K.json``), so register takes the last of each. The
components are in :mod:`components.kfp_components`.

A failing gate stops the work after it: the tasks nested under its ``dsl.If`` never run and
the ``dsl.Else`` branch records the gate summary; the run itself completes (rejected is a
result, not an error). Step failures (bad data, a crashed trainer) fail the run. The whole
DAG sits inside a ``dsl.ExitHandler`` whose exit task (components/kfp_exit_handler.py) writes
``run_summary.json`` however the run ended, a failed step included.

Everyday controls, from ``params.pipeline.kfp`` at compile time (:func:`build_pipeline`):
step caching of every task (``caching``; ``--no-cache`` on the CLI turns it off), retries
with exponential back-off on the train and preprocess tasks (``retries``: ``set_retry``), and
the train task's accelerator request and tolerations (``train_accelerator``:
``set_accelerator_type`` / ``set_accelerator_limit``, kfp-kubernetes ``add_toleration``),
every task's CPU/memory requests and limits and its deadline by task kind (``resources``:
``set_cpu_request`` … and kfp-kubernetes ``set_timeout``), a non-root pod, and the MLflow
and S3 credentials of the tasks that talk to MLflow (``secrets``: kfp-kubernetes
``use_secret_as_env``; docs/security.md).

Pipeline parameters: ``data_uri`` (a folder of raw CTs: a local path under ``kfp.local``,
``s3://…``/``gs://…`` on a cluster), ``params_yaml`` (the whole effective params as YAML;
its compiled default is the params the pipeline was compiled with), ``ray_address`` and ``mlflow_tracking_uri`` (empty: local Ray and
the embedded sqlite MLflow of the step's container).

Cache keys: a KFP task's cache key is its component spec (the image included) + its inputs.
So no task gets the whole ``params_yaml``: a ``params`` task (and a ``params stage K`` task per
stage) cuts it into one text per task holding only the keys that step reads — the ONE
declaration in components/step_params.py, which also writes dvc.yaml's ``params:`` lists —
and editing ``gates.stage3`` re-runs gate 3 and register (it ships the whole params) alone.
The images are named by their content tag (components/image_tag.py), so a code change
changes every task's key.

Compile: ``xct pipeline compile --out pipeline.yaml`` (:func:`compile_pipeline`); run on a
laptop: ``xct pipeline run --local`` (:func:`run_local`); submit: ``xct pipeline submit
--host URL`` (:func:`submit`).

No ``from __future__ import annotations`` (KFP reads real annotations).
"""

import json
import os
import re
import tempfile
import warnings
from pathlib import Path
from typing import Any

from kfp import compiler, dsl
from kfp.dsl import Dataset

from components.kfp_components import (
    GATE_PASSED,
    data_params_component,
    KFP_LINEAGE,
    evaluate_step_component,
    gate_report_component,
    ingest_component,
    params_from_text,
    preprocess_component,
    register_component,
    rejected_component,
    run_summary_component,
    stage_params_component,
    train_stage_component,
    validate_component,
)
from components.ops_params import KfpParams, OpsParams, params_text
from xct_core.atomic import atomic_path, writable
from xct_core.errors import ConfigError, InputError, XctError

PIPELINE_NAME = "xct-cascade"
#: the keys of the Secrets ``pipeline.kfp.secrets`` names, each mounted as the env var of its name
SECRET_KEYS = {"mlflow": ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"),
               "s3": ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")}
#: where a task's pod finds its KFP run id on a cluster (KFP labels every pod of a run with it)
RUN_ID_FIELD = "metadata.labels['pipeline/runid']"
#: the Secret holding the Ray cluster's auth token (infra/k8s/secrets.template.yaml, key auth_token)
RAY_AUTH_SECRET = "xct-ray-auth"


class _Controls:
    """Applies ``params.pipeline.kfp`` to each task as the DAG is built."""

    def __init__(self, kp: KfpParams, caching: bool, ray_job: bool = False, local: bool = False) -> None:
        self.kp, self.caching = kp, caching
        #: pipeline.ray.address set: the train task submits a Ray job, its pod requests no GPU
        self.ray_job = ray_job
        #: built for kfp.local (:func:`run_local`), which has no pods: see :attr:`lineage`
        self.local = local

    @property
    def lineage(self) -> dict[str, str]:
        """The lineage inputs of the tasks that open MLflow runs (train, register, rejected).

        The task name is the same in every run, so it is an input (part of the cache key, which
        it does not disturb). The run's id and name are unique per run: as inputs they would make
        every such task a cache miss on a KFP server (its cache key holds the resolved input
        values; kubeflow/pipelines#4090, #7241), so on a cluster the task reads the run id from its
        pod's ``pipeline/runid`` label instead (:meth:`pod`: ``use_field_path_as_env``
        ``XCT_KFP_RUN_ID``). kfp.local has no pods and keys its cache on the unresolved
        placeholder text, so a local run passes the run id and name placeholders as inputs."""
        if self.local:
            return dict(KFP_LINEAGE)
        return {"kfp_task_name": KFP_LINEAGE["kfp_task_name"]}

    def __call__(self, task: Any, kind: str = "") -> Any:
        task.set_caching_options(self.caching)
        retry = self.kp.retries.get(kind)
        if retry is not None and retry.num_retries > 0:
            task.set_retry(num_retries=retry.num_retries, backoff_duration=f"{retry.backoff_s:g}s",
                           backoff_factor=retry.backoff_factor, backoff_max_duration=f"{retry.backoff_max_s:g}s")
        acc = self.kp.train_accelerator
        if kind == "train" and acc.type and not self.ray_job:
            task.set_accelerator_type(acc.type).set_accelerator_limit(acc.limit)
        if kind == "train" and self.ray_job:  # the Jobs API's token (Ray token auth), from its Secret
            from kfp import kubernetes

            kubernetes.use_secret_as_env(task, secret_name=RAY_AUTH_SECRET, secret_key_to_env={"auth_token": "RAY_AUTH_TOKEN"})
        if kind == "train" and acc.tolerations and not self.ray_job:
            from kfp import kubernetes

            for tol in acc.tolerations:
                kubernetes.add_toleration(task, key=tol.key, operator=tol.operator, value=tol.value,
                                          effect=tol.effect, toleration_seconds=tol.toleration_seconds)
        if task.container_spec is not None:  # the importer runs in KFP's own pod: nothing of ours to bound
            self.pod(task, kind)
        return task

    def pod(self, task: Any, kind: str = "") -> Any:
        """The task's pod: requests/limits and deadline of its kind (``pipeline.kfp.resources``),
        non-root, and — when it talks to MLflow — the pipeline's MLflow and S3 credentials from
        the Secrets ``pipeline.kfp.secrets`` names, as environment variables (never parameters,
        which KFP stores and shows in the UI)."""
        from kfp import kubernetes

        res = self.kp.resources.of(kind)
        task.set_cpu_request(res.cpu_request).set_cpu_limit(res.cpu_limit)
        task.set_memory_request(res.memory_request).set_memory_limit(res.memory_limit)
        kubernetes.set_timeout(task, res.timeout_s)
        kubernetes.set_security_context(task, run_as_non_root=True)
        if "kfp_run_id" in (task.component_spec.inputs or {}) and not self.local:
            kubernetes.use_field_path_as_env(task, env_name="XCT_KFP_RUN_ID", field_path=RUN_ID_FIELD)
        if "mlflow_tracking_uri" in (task.component_spec.inputs or {}):
            for name, keys in ((self.kp.secrets.mlflow, SECRET_KEYS["mlflow"]), (self.kp.secrets.s3, SECRET_KEYS["s3"])):
                if name:
                    kubernetes.use_secret_as_env(task, name, {k: k for k in keys})
        return task


def _cascade(k: int, n: int, processed: Any, previous: tuple[Any, Any] | None, params_yaml: Any,
             ray_address: Any, mlflow_tracking_uri: Any, ctl: _Controls, register_params: Any) -> None:
    """Stage ``k`` of ``n`` (train → evaluate → gate) and, under ``dsl.If(gate k passed)``, the
    stages after it — register after the last — with ``dsl.Else``: rejected(k).
    ``previous``: stage k-1's (train, gate) tasks, whose model and reports folders grow here."""
    common = {"params_yaml": params_yaml, "ray_address": ray_address, "mlflow_tracking_uri": mlflow_tracking_uri,
              "ctl": ctl, "register_params": register_params}
    # each task gets only the params keys it reads (components/step_params.py): its cache key follows them
    scoped = ctl(stage_params_component(params_yaml=params_yaml, stage=k).set_display_name(f"params stage {k}")).outputs
    after_model = {"previous": previous[0].outputs["model"]} if previous is not None else {}
    after_reports = {"earlier": previous[1].outputs["reports"]} if previous is not None else {}
    train = ctl(train_stage_component(
        stage=k, processed=processed, params_yaml=scoped["train"], ray_address=ray_address,
        mlflow_tracking_uri=mlflow_tracking_uri, **after_model, **ctl.lineage,
    ).set_display_name(f"train stage {k}"), "train")
    evaluate = ctl(evaluate_step_component(
        stage=k, processed=processed, train_dir=train.outputs["model"], params_yaml=scoped["evaluate"],
    ).set_display_name(f"evaluate stage {k}"))
    gate = ctl(gate_report_component(
        stage=k, evaluation=evaluate.outputs["report"], params_yaml=scoped["gate"],
        mlflow_tracking_uri=mlflow_tracking_uri, **after_reports,
    ).set_display_name(f"gate {k}"))
    with dsl.If(gate.outputs[GATE_PASSED] == True, name=f"gate-{k}-passed"):  # noqa: E712 (KFP condition)
        if k < n:
            _cascade(k + 1, n, processed, (train, gate), **common)
        else:
            ctl(register_component(
                model=train.outputs["model"], reports=gate.outputs["reports"], processed=processed,
                params_yaml=register_params, mlflow_tracking_uri=mlflow_tracking_uri, **ctl.lineage,
            ).set_display_name("register"))
    with dsl.Else():  # the rejected candidate's audit trail (MLflow) from the gate's reports
        ctl(rejected_component(
            stage=k, gate_summary=gate.outputs["summary"], model=train.outputs["model"],
            reports=gate.outputs["reports"], processed=processed, params_yaml=register_params,
            mlflow_tracking_uri=mlflow_tracking_uri, **ctl.lineage,
        ).set_display_name(f"rejected at gate {k}"))


def _caching(params: OpsParams, caching: bool | None) -> bool:
    """Step caching: ``caching`` when given (``--no-cache``), else ``pipeline.kfp.caching``."""
    return params.pipeline.kfp.caching if caching is None else bool(caching)


def _check_train_gpus(params: OpsParams) -> None:
    """Without ``pipeline.ray.address`` the train task starts its Ray Train workers inside its
    own pod: GPU workers (``train.ray.use_gpu``, one GPU each unless ``resources_per_worker``
    says otherwise) beyond the GPUs that pod requests (``pipeline.kfp.train_accelerator``)
    would wait forever for GPUs that are not there — a compile error naming both numbers."""
    ray = params.train.ray
    if params.pipeline.ray.address or not ray.use_gpu:
        return
    acc = params.pipeline.kfp.train_accelerator
    requested = acc.limit if acc.type else 0
    needed = ray.num_workers * ray.resources_per_worker.get("GPU", 1.0)
    if needed > requested:
        raise ConfigError(
            f"the KFP train task would start {needed:g} GPU(s) in its own pod (train.ray.num_workers = "
            f"{ray.num_workers}, use_gpu) but its pod requests {requested} (pipeline.kfp.train_accelerator"
            f"{'.limit' if acc.type else ': no type'}): set pipeline.ray.address to train on the Ray cluster "
            "(Jobs API), or match the two")


def task_controls(params: OpsParams, *, caching: bool | None = None, local: bool = False) -> _Controls:
    """What :func:`build_pipeline` applies to each task (``ctl(task, kind)``): ``params.pipeline.kfp``'s
    caching, retries (``set_retry``), resources, secrets — and the Jobs-route train task when
    ``pipeline.ray.address`` is set. Public so a test can wrap ONE task in a small pipeline with
    exactly the controls the DAG gives it (tests/test_jobs_route.py: kfp.local's retry)."""
    return _Controls(params.pipeline.kfp, _caching(params, caching), ray_job=bool(params.pipeline.ray.address),
                     local=local)


def build_pipeline(params: OpsParams | None = None, *, caching: bool | None = None, local: bool = False) -> Any:
    """The ``@dsl.pipeline`` function for ``params`` (the built-in defaults = params.yaml when
    ``None``): one train → evaluate → gate per stage in ``params.stages`` (:func:`_cascade`),
    with ``params.pipeline.kfp``'s controls applied; ``caching`` overrides
    ``pipeline.kfp.caching``. The ``params_yaml`` parameter defaults to these params' text, so
    a run submitted without it (e.g. from the KFP UI) uses what the pipeline was compiled with
    — and the stage count is fixed at compile time: compile with the params the run will get."""
    params = params if params is not None else OpsParams()
    # JSON (a YAML subset) on ONE line: kfp writes each input's default into a comment header
    # of the IR YAML, and a multi-line default would break that file
    compiled_params = json.dumps(params.model_dump(mode="json"), separators=(",", ":"))
    _check_train_gpus(params)
    ctl = task_controls(params, caching=caching, local=local)
    n = params.n_stages

    @dsl.pipeline(name=PIPELINE_NAME, description=f"Biplanar X-ray → 3D CT cascade: data → {n} gated stages → register")
    def xct_pipeline(
        data_uri: str,
        params_yaml: str = compiled_params,
        ray_address: str = "",
        mlflow_tracking_uri: str = "",
    ) -> None:
        exit_task = ctl.pod(run_summary_component(data_uri=data_uri, kfp_run_id=KFP_LINEAGE["kfp_run_id"]
                                          ).set_display_name("run summary"))
        exit_task.set_caching_options(False)  # the summary of THIS run, never a cached one
        with dsl.ExitHandler(exit_task, name="xct-run"):
            raw = ctl(dsl.importer(artifact_uri=data_uri, artifact_class=Dataset, reimport=False)
                      .set_display_name("raw CTs"))
            # each task gets only the params keys it reads (components/step_params.py): its cache key follows them
            scoped = ctl(data_params_component(params_yaml=params_yaml).set_display_name("params")).outputs
            ingest = ctl(ingest_component(raw=raw.output, params_yaml=scoped["ingest"]))
            validate = ctl(validate_component(interim=ingest.outputs["interim"], params_yaml=scoped["validate"]))
            preprocess = ctl(preprocess_component(
                interim=ingest.outputs["interim"], validated=validate.outputs["validated"],
                params_yaml=scoped["preprocess"],
            ), "preprocess")
            _cascade(1, n, preprocess.outputs["processed"], None, params_yaml, ray_address, mlflow_tracking_uri, ctl,
                     scoped["register"])

    return xct_pipeline


#: the pipeline with the default params' controls (what ``xct pipeline compile`` writes without --params)
xct_pipeline = build_pipeline()


def compile_pipeline(out: str | Path, params: OpsParams | None = None, *, caching: bool | None = None,
                     local: bool = False) -> Path:
    """Write the pipeline's IR YAML to ``out`` atomically (controls from ``params``, see
    :func:`build_pipeline`); returns the path."""
    out = Path(out)
    with atomic_path(out, ".yaml") as tmp, writable(out):
        compiler.Compiler().compile(pipeline_func=build_pipeline(params, caching=caching, local=local), package_path=str(tmp))
        load_pipeline_spec(tmp)  # strict protobuf parse before the file is renamed into place
    return out


def load_pipeline_spec(path: str | Path) -> tuple[Any, Any | None]:
    """The compiled YAML parsed STRICTLY as KFP protobufs: ``(PipelineSpec, PlatformSpec or
    None)``; an unknown field or a wrong type is an :class:`InputError` naming the file (what
    a KFP backend does on upload, here before any run)."""
    from google.protobuf import json_format
    from kfp.pipeline_spec import pipeline_spec_pb2

    from xct_core.jsondoc import read_doc_text
    from xct_core.yamlsafe import load_yaml_all_text

    path = Path(path)

    try:
        docs = [d for d in load_yaml_all_text(read_doc_text(path, "pipeline YAML"), path) if d is not None]
    except InputError as e:
        raise InputError(path, f"not a readable pipeline YAML ({e.problem})") from None
    if not docs or len(docs) > 2:
        raise InputError(path, f"a compiled pipeline is one PipelineSpec (+ one PlatformSpec), found {len(docs)} documents")
    try:
        spec = json_format.ParseDict(docs[0], pipeline_spec_pb2.PipelineSpec(), ignore_unknown_fields=False)
        platform = (json_format.ParseDict(docs[1], pipeline_spec_pb2.PlatformSpec(), ignore_unknown_fields=False)
                    if len(docs) == 2 else None)
    except json_format.ParseError as e:
        raise InputError(path, f"not a valid KFP PipelineSpec: {str(e).splitlines()[0]}") from None
    return spec, platform


def _params_and_text(params_yaml: str) -> tuple[OpsParams, str]:
    """The typed params of ``params_yaml`` and the text every task gets; an empty text means
    the params a command finds (``$XCT_PARAMS``, ./params.yaml, else the built-in defaults =
    params.yaml: :func:`xct_core.config.resolve_params`), handed on in full."""
    from components.ops_params import resolve_params

    if not params_yaml.strip():
        params = resolve_params()
        return params, params_text(params)
    return params_from_text(params_yaml, OpsParams), params_yaml


def pipeline_arguments(data_uri: str, params_yaml: str = "", ray_address: str = "",
                       mlflow_tracking_uri: str = "") -> dict[str, str]:
    """The pipeline parameters as a dict (what ``kfp.Client`` and ``kfp.local`` receive)."""
    return {
        "data_uri": data_uri,
        "params_yaml": params_yaml,
        "ray_address": ray_address,
        "mlflow_tracking_uri": mlflow_tracking_uri,
    }


def run_local(data_dir: str | Path, params_yaml: str, pipeline_root: str | Path,
              mlflow_tracking_uri: str = "", *, caching: bool | None = None) -> Any:
    """Run the whole pipeline in this Python environment with ``kfp.local`` (SubprocessRunner).

    ``pipeline_root`` receives every task's artifacts (``<root>/<run>/<task>/<output>``).
    The run executes the compiled YAML (``<root>/pipeline.yaml``, parsed strictly by
    :func:`load_pipeline_spec`, loaded back with ``kfp.components.load_component_from_file``),
    not the Python function, so a local run checks what a cluster would receive. Step caching (kfp.local's file cache under ``<root>/.kfp_cache``) follows
    ``pipeline.kfp.caching`` unless ``caching`` says otherwise.
    Temporary per-task folders (kfp.local leaves them) go under ``<root>/tmp`` via TMPDIR.
    Returns the kfp.local pipeline task (``.outputs``). Raises :class:`InputError` when
    ``data_dir`` is missing and :class:`XctError` when a task fails.
    """
    from kfp import local

    data = Path(data_dir).absolute()
    if not data.is_dir():
        raise InputError(data, "raw data folder not found (run `xct data synth` or `dvc pull` first)")
    params, params_yaml = _params_and_text(params_yaml)
    use_cache = _caching(params, caching)
    root = Path(pipeline_root).absolute()
    tmp = root / "tmp"
    tmp.mkdir(parents=True, exist_ok=True)
    old_tmp = os.environ.get("TMPDIR")
    os.environ["TMPDIR"] = str(tmp)
    tempfile.tempdir = None  # re-read TMPDIR
    try:
        local.init(runner=local.SubprocessRunner(use_venv=False), pipeline_root=str(root),
                   raise_on_error=True, workspace_root=str(root / "workspace"),
                   enable_caching=use_cache, cache_root=str(root / ".kfp_cache"))
        try:
            # run what a cluster would get: the compiled YAML, strictly parsed, loaded back
            from kfp import components

            # (built local=True: the run id as an input, kfp.local has no pod labels: _Controls.lineage)
            spec_file = compile_pipeline(root / "pipeline.yaml", params, caching=use_cache, local=True)
            load_pipeline_spec(spec_file)
            pipeline = components.load_component_from_file(str(spec_file))
            with warnings.catch_warnings():  # the pods' resources, deadline, secrets: a cluster's business
                warnings.filterwarnings("ignore", message=r".*have no effect in the current local runner")
                return pipeline(**pipeline_arguments(str(data), params_yaml, "", mlflow_tracking_uri))
        except RuntimeError as e:
            text = re.sub(r"\x1b\[[0-9;]*m", "", str(e)).strip().splitlines()  # kfp colours its messages
            raise XctError(f"pipeline run failed: {text[-1] if text else type(e).__name__}") from None
    finally:
        if old_tmp is None:
            os.environ.pop("TMPDIR", None)
        else:
            os.environ["TMPDIR"] = old_tmp
        tempfile.tempdir = None


def submit(host: str, data_uri: str, params_yaml: str, ray_address: str = "", mlflow_tracking_uri: str = "",
           experiment: str = "xct", run_name: str | None = None, namespace: str | None = None,
           *, caching: bool | None = None, token: str | None = None, credentials: Any = None) -> str:
    """Submit a run to the Kubeflow Pipelines API at ``host``; returns the run id. ``caching``
    (default ``pipeline.kfp.caching``) is compiled into every task and passed as the run's
    ``enable_caching``. ``token`` (a bearer token) or ``credentials`` (kfp's token
    credentials, e.g. a service-account token file) authenticate every request; the token
    never appears in an error.

    Raises :class:`XctError` (one line) when the host cannot be reached or rejects the run.
    """
    import warnings

    import kfp

    params, params_yaml = _params_and_text(params_yaml)
    use_cache = _caching(params, caching)
    try:
        with warnings.catch_warnings():  # the client's "only works with KFP >= 2.0.0-beta.2" notice
            warnings.simplefilter("ignore", FutureWarning)
            client = kfp.Client(host=host, namespace=namespace, existing_token=token, credentials=credentials)
        run = client.create_run_from_pipeline_func(
            build_pipeline(params, caching=use_cache),
            arguments=pipeline_arguments(data_uri, params_yaml, ray_address, mlflow_tracking_uri),
            run_name=run_name,
            experiment_name=experiment,
            enable_caching=use_cache,
        )
    except Exception as e:  # noqa: BLE001 — kfp/urllib3/kubernetes raise many types; one line to the user
        text = " ".join(str(e).split()) or type(e).__name__
        if token:
            text = text.replace(token, "<token>")
        if "NewConnectionError" in text or "Max retries exceeded" in text or isinstance(e, ConnectionError):
            cause = text.rsplit(": ", 1)[-1].rstrip(")\"'") if ": " in text else text
            raise XctError(f"cannot reach Kubeflow Pipelines at {host} ({cause[:200]})") from None
        raise XctError(f"cannot submit to Kubeflow Pipelines at {host}: {type(e).__name__}: {text[:300]}") from None
    return str(run.run_id)
