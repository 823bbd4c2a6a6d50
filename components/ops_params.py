"""The operational sections of a params file, and the model of the whole file.

``pipeline`` (how the DAG runs: dvc.yaml's ``xct train`` flags, the KFP compile-time
controls) and ``s3`` (``xct data pull|push``) are validated here, ``train.ray`` in
components/ray_params.py and ``hpo`` in xct_core/hpo_params.py. None of them is read by the
science, so they are not in xct_core/config.py, which every dvc.yaml step depends on:
editing a default here re-runs no science step (tests/test_one_source.py runs ``dvc
status`` to prove it).

:class:`OpsParams` = the science's :class:`~xct_core.config.Params` + every operational
section: the model of a whole params file. Commands that hand params on or read an
operational section load it with :func:`load_params` / :func:`resolve_params` here
(``xct params show``, ``xct pipeline …``, ``xct hpo``, ``xct data pull|push``, the KFP train
task); unknown keys are errors in every section. Defaults = params.yaml
(tests/test_one_source.py).
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import yaml
from pydantic import Field, model_validator

from components.ray_params import RayParams
from xct_core import config as _config
from xct_core.config import Section
from xct_core.hpo_params import HPOParams


class PipelineTrainParams(Section):
    """How the DAG runs the training steps. dvc.yaml unpacks this mapping into flags of
    ``xct train`` (``${pipeline.train}``: ``local: true`` → ``--local``), so the keys are
    ``xct train`` options."""

    #: train in-process (``xct train --local``: no Ray, no MLflow run) — quick CI checks;
    #: false (the default, the demo and production): Ray Train + MLflow
    local: bool = False


class KfpRetry(Section):
    """``task.set_retry`` of one KFP task kind: a failed task is re-run up to
    ``num_retries`` times, waiting ``backoff_s · backoff_factor^i`` (at most
    ``backoff_max_s`` in all). ``num_retries: 0``: no retry policy."""

    num_retries: int = Field(2, ge=0, le=20)
    backoff_s: float = Field(60.0, ge=0)
    backoff_factor: float = Field(2.0, ge=1.0)
    backoff_max_s: float = Field(3600.0, gt=0)


class KfpToleration(Section):
    """A Kubernetes toleration of the train task's pod (kfp-kubernetes ``add_toleration``)."""

    key: str
    operator: Literal["Exists", "Equal"] = "Exists"
    value: str | None = None
    effect: Literal["NoSchedule", "PreferNoSchedule", "NoExecute"] | None = None
    toleration_seconds: int | None = Field(None, ge=0)


class KfpAccelerator(Section):
    """The train task's accelerator request (``set_accelerator_type`` + ``set_accelerator_limit``)
    and the tolerations that let it schedule on tainted GPU nodes. ``type: ""``: a CPU pod (the
    demo default). Used when the train task trains with a local Ray runtime inside its own pod
    (no ``pipeline.ray.address``); with the address set the pod requests no GPU (the Ray
    cluster's workers have them) and none of this is applied."""

    type: str = ""
    limit: int = Field(1, ge=1)
    tolerations: list[KfpToleration] = []


#: Kubernetes quantities KFP accepts (``set_cpu_*``: cores or millicores; ``set_memory_*``: bytes
#: with a decimal or binary suffix)
_CPU = r"^[0-9]+(\.[0-9]+)?m?$"
_MEMORY = r"^[0-9]+(\.[0-9]+)?(E|Ei|P|Pi|T|Ti|G|Gi|M|Mi|K|Ki)?$"
_SUFFIX = {"m": 1e-3, "K": 1e3, "M": 1e6, "G": 1e9, "T": 1e12, "P": 1e15, "E": 1e18,
           "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "Pi": 2**50, "Ei": 2**60}


def quantity(value: str) -> float:
    """A Kubernetes quantity (``500m``, ``2``, ``4Gi``, ``1.5G``) as a number (cores or bytes)."""
    for suffix in sorted(_SUFFIX, key=len, reverse=True):
        if value.endswith(suffix):
            return float(value[: -len(suffix)]) * _SUFFIX[suffix]
    return float(value)


class KfpTaskResources(Section):
    """One KFP task kind's pod: CPU/memory requests and limits (``set_cpu_request|limit``,
    ``set_memory_request|limit``) and its deadline (kfp-kubernetes ``set_timeout``: the pod's
    ``activeDeadlineSeconds``; a retry is a new pod with a new deadline)."""

    cpu_request: str = Field("500m", pattern=_CPU)
    cpu_limit: str = Field("2", pattern=_CPU)
    memory_request: str = Field("1Gi", pattern=_MEMORY)
    memory_limit: str = Field("4Gi", pattern=_MEMORY)
    timeout_s: int = Field(3600, ge=1)

    @model_validator(mode="after")
    def _request_within_limit(self) -> KfpTaskResources:
        for what in ("cpu", "memory"):
            req, lim = getattr(self, f"{what}_request"), getattr(self, f"{what}_limit")
            if quantity(req) > quantity(lim):
                raise ValueError(f"{what}_request {req} exceeds {what}_limit {lim}")
        return self


class KfpResources(Section):
    """Requests, limits and deadline of every KFP task, by kind: ``train`` (the train-stage
    tasks), ``preprocess``, ``default`` (every other task: ingest, validate, evaluate, gate,
    register, rejected, the run summary)."""

    default: KfpTaskResources = KfpTaskResources()
    preprocess: KfpTaskResources = KfpTaskResources(cpu_request="2", cpu_limit="4", memory_request="4Gi",
                                                    memory_limit="16Gi", timeout_s=14400)
    train: KfpTaskResources = KfpTaskResources(cpu_request="4", cpu_limit="8", memory_request="16Gi",
                                               memory_limit="64Gi", timeout_s=259200)

    def of(self, kind: str) -> KfpTaskResources:
        """The resources of task kind ``kind`` (``""``: default)."""
        return getattr(self, kind) if kind in ("train", "preprocess") else self.default


class KfpSecrets(Section):
    """Kubernetes Secrets (in the namespace the runs execute in) that KFP tasks get as
    environment variables (kfp-kubernetes ``use_secret_as_env``): every task that talks to
    MLflow (it has a ``mlflow_tracking_uri`` input: train, gate, register). ``""``: none
    (e.g. a server without auth, or S3 access through the pod's cloud IAM role)."""

    #: MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD of the pipeline's MLflow user
    mlflow: str = "xct-mlflow-pipeline"
    #: AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY of the pipeline's bucket-scoped object-store
    #: user (never the store's admin): artifact uploads when MLflow hands out s3:// locations
    s3: str = "xct-s3"


class KfpParams(Section):
    """Compile-time controls of the KFP pipeline (pipelines/kfp_dag.py); dvc.yaml ignores them."""

    #: KFP step caching of every task (``xct pipeline compile|run|submit --no-cache`` turns it off)
    caching: bool = True
    #: retries with exponential back-off of the train and preprocess tasks
    retries: dict[Literal["train", "preprocess"], KfpRetry] = {
        "train": KfpRetry(), "preprocess": KfpRetry(num_retries=2, backoff_s=30.0, backoff_max_s=1800.0)}
    train_accelerator: KfpAccelerator = KfpAccelerator()
    #: CPU/memory requests, limits and the deadline of every task, by kind
    resources: KfpResources = KfpResources()
    #: Secrets mounted as environment variables into the tasks that need them
    secrets: KfpSecrets = KfpSecrets()


class PipelineRayParams(Section):
    """Training on an existing Ray cluster through the Jobs API (components/ray_jobs.py):
    ``xct train`` and the KFP train task submit the stage as a Ray job instead of starting
    Ray themselves. ``address: ""`` (the default): today's route (a local Ray runtime, or
    ``RAY_ADDRESS`` as a driver)."""

    #: the Ray head's dashboard URL, e.g. http://xct-ray-head-svc.xct.svc.cluster.local:8265 ("": no Jobs API)
    address: str = ""
    #: how the cluster's image starts xct (the job's entrypoint is ``<command> train …``)
    command: str = "xct"
    #: the Ray job is stopped and the caller fails after this many seconds (0: no limit)
    timeout_s: float = Field(259200.0, ge=0)


class PipelineStorageParams(Section):
    """The run-scoped shared storage of training (components/run_storage.py): processed
    data, Ray Train's checkpoints and the exported stage models live under
    ``<uri>/<run id>/`` (the KFP pipeline run id, or ``xct train --run-id``), which every
    node reads and writes; a retried or re-submitted run resumes from the newest checkpoint
    there. ``s3://bucket/prefix`` (credentials and endpoint from the environment, settings
    from ``s3``) or an absolute path every node mounts (an RWX volume). ``""``: the local
    output folder (``--out``), as dvc.yaml runs it."""

    uri: str = ""


class PipelineParams(Section):
    """Settings of the end-to-end DAG (dvc.yaml and the KFP pipeline)."""

    train: PipelineTrainParams = PipelineTrainParams()
    storage: PipelineStorageParams = PipelineStorageParams()
    kfp: KfpParams = KfpParams()
    ray: PipelineRayParams = PipelineRayParams()


class S3Params(Section):
    """Retries, timeouts and part sizes of ``xct data pull|push`` (components/s3sync.py).

    Credentials never live here: they come from the standard boto3 chain only (environment,
    shared config/credentials files, instance/pod role). The endpoint (MinIO, other
    S3-compatible stores) comes from ``--endpoint-url``, ``$XCT_S3_ENDPOINT_URL`` or
    ``$AWS_ENDPOINT_URL``.
    """

    #: region when the boto3 chain gives none (AWS_DEFAULT_REGION / profile win)
    region: str = "us-east-1"
    #: bucket addressing: auto | path (MinIO and most S3-compatible stores) | virtual
    addressing_style: Literal["auto", "path", "virtual"] = "auto"
    #: botocore attempts per request ("standard" mode, jittered backoff of up to 2, 4, 8 … s)
    request_attempts: int = Field(3, ge=1, le=20)
    #: our own attempts per object around the whole transfer (stream errors, resets)
    object_attempts: int = Field(3, ge=1, le=20)
    #: backoff between object attempts: base * 2**attempt seconds (jittered), capped
    backoff_s: float = Field(0.5, ge=0)
    backoff_max_s: float = Field(10.0, ge=0)
    #: socket timeouts, seconds
    connect_timeout_s: float = Field(5.0, gt=0)
    read_timeout_s: float = Field(30.0, gt=0)
    #: uploads above this size are multipart, in parts of multipart_chunksize_mb (MiB)
    multipart_threshold_mb: int = Field(64, ge=5)
    multipart_chunksize_mb: int = Field(16, ge=5)
    #: parallel part uploads of one multipart object
    max_concurrency: int = Field(4, ge=1, le=64)


class OpsParams(RayParams):
    """A whole params file: the science's sections, ``train.ray`` and the operational
    sections (``pipeline``, ``s3``, ``hpo``)."""

    pipeline: PipelineParams = PipelineParams()
    s3: S3Params = S3Params()
    hpo: HPOParams = HPOParams()


def load_params(path: str | Path | None = None, overlays: list[str | Path] | None = None,
                sets: list[str] | None = None) -> OpsParams:
    """:func:`xct_core.config.load_params` validated as a whole file (:class:`OpsParams`)."""
    return _config.load_params(path, overlays, sets, schema=OpsParams)


def resolve_params(path: str | Path | None = None, overlays: list[str | Path] | None = None,
                   sets: list[str] | None = None) -> OpsParams:
    """:func:`xct_core.config.resolve_params` validated as a whole file (:class:`OpsParams`)."""
    return _config.resolve_params(path, overlays, sets, schema=OpsParams)


def params_from_dict(data: dict, source: str = "<dict>") -> OpsParams:
    """:func:`xct_core.config.params_from_dict` validated as a whole file (:class:`OpsParams`)."""
    return _config.params_from_dict(data, source, OpsParams)


def params_text(params: OpsParams) -> str:
    """The params as self-contained YAML text (every key, overlays merged in): what the
    pipelines hand every step (``params_yaml``)."""
    return yaml.safe_dump(params.model_dump(mode="json"), sort_keys=False)
