"""MLflow helpers shared by the pipeline steps: where tracking goes, lineage tags, runs.

Tracking URI: ``$MLFLOW_TRACKING_URI`` when set (a server, ``sqlite:///…``, ``file:…``),
else the embedded default ``sqlite:///<repo>/mlflow.db`` with artifacts under
``<repo>/mlruns`` (for any ``sqlite:///DIR/x.db`` the artifacts go to ``DIR/mlruns``;
a tracking server decides its own artifact store).

Lineage tags on every run: ``mlflow.source.git.commit`` (+ ``xct.git_dirty``), the DVC
hash of the data folder (``xct.data_hash`` from ``dvc.lock`` or ``<data>.dvc``; without
DVC the sha256 of the preprocess manifest, which lists every file's sha256 — the tag
``xct.data_hash_source`` says which), ``xct.params_digest`` and where the run came from
(:func:`origin_tags`): ``xct.origin`` = ``kfp`` with ``kfp.run_id`` / ``kfp.run_name`` /
``kfp.task_name`` inside a KFP task (the pipeline hands ``dsl.PIPELINE_JOB_ID_PLACEHOLDER``
etc. to the task, which sets ``XCT_KFP_*``), ``local`` otherwise (``dvc repro``, ``xct``).

Datasets (:func:`dataset_inputs`): the processed data as an MLflow dataset input (source
URI, digest = ``xct.data_hash``, context ``train`` / ``val`` / ``test``) — on the stage runs
(train, val) and on the registration / rejected-candidate run (train, val, test).

Experiments are created (or found) with ``mlflow.experimentKind = custom_model_development``
(:data:`EXPERIMENT_KIND`), the tag MLflow 3's UI reads to open an experiment on its runs
rather than its GenAI (traces) view; a kind the user set is left alone.

Runs: one parent *pipeline* run per output folder (or ``$XCT_PIPELINE_RUN_ID``, e.g. set by
the KFP pipeline) and one nested run per stage (tag ``mlflow.parentRunId``). The ids are
kept next to the outputs so a re-run after a crash continues the same runs
(:class:`MetricLogger` never logs a (metric, step) pair twice).

"Cannot tell" is not "none": MLflow raises the same :class:`MlflowException` for "no such
model / alias / run" and for a server that is down, black-holed or failing. Only a definite
"not found" answer (:func:`not_found`) means none; anything else becomes
:class:`RegistryError`, one line (the CLI prints it, exit 1). Every HTTP request is bounded:
:func:`bound_requests` sets MLflow's ``MLFLOW_HTTP_REQUEST_TIMEOUT`` and
``MLFLOW_HTTP_REQUEST_MAX_RETRIES`` from ``params.registry`` (``request_timeout_s``,
``request_max_retries``) unless the user's environment sets them.

Authentication (a ``mlflow server --app-name basic-auth``, docs/security.md): the client
sends ``$MLFLOW_TRACKING_USERNAME`` / ``$MLFLOW_TRACKING_PASSWORD``; a refusal (HTTP 401
not authenticated, 403 permission denied) is one :class:`RegistryError` line too, naming
the user (never the password) and what was refused (:func:`auth_status`).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import subprocess
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from mlflow import MlflowClient
from mlflow.entities import Metric, Param, RunTag
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE, RESOURCE_DOES_NOT_EXIST, ErrorCode
from mlflow.utils.mlflow_tags import MLFLOW_GIT_COMMIT, MLFLOW_PARENT_RUN_ID, MLFLOW_RUN_NAME

from xct_core.atomic import write_json_atomic
from xct_core.errors import InputError, XctError
from xct_core.jsondoc import read_json_doc
from xct_core.redact import redact, redact_doc, redact_url
from xct_core.yamlsafe import read_yaml_doc

REPO = Path(__file__).resolve().parents[1]
#: the embedded default (no server): a sqlite file in the repo
DEFAULT_TRACKING_URI = f"sqlite:///{REPO / 'mlflow.db'}"
#: environment variable naming an existing pipeline (parent) run to nest stage runs under
PIPELINE_RUN_ENV = "XCT_PIPELINE_RUN_ID"
_PARAM_MAX = 6000
#: the experiment tag MLflow 3's UI reads (mlflow/server/js: ExperimentKind) and its value
#: for a model-training experiment (the UI then opens on the runs, not the GenAI traces view)
EXPERIMENT_KIND = ("mlflow.experimentKind", "custom_model_development")
#: environment variables a KFP task sets from the pipeline's placeholders → run tags
KFP_ENV = {"XCT_KFP_RUN_ID": "kfp.run_id", "XCT_KFP_RUN_NAME": "kfp.run_name", "XCT_KFP_TASK_NAME": "kfp.task_name"}
#: the MLflow dataset name of the processed data (one dataset, a context per split)
DATASET_NAME = "xct-processed"
#: the file in a training output folder that names its pipeline (parent) run (:class:`StageRun`)
PIPELINE_FILE = "mlflow_pipeline.json"


class RegistryError(XctError):
    """MLflow (tracking server, registry, store) could not give an answer: unreachable, no
    answer in time, a server error, or a request it refused. Never means "nothing there"."""

    exit_code = 1


#: MLflow's own environment variables that bound one HTTP request → the ``registry`` params key
HTTP_BOUNDS = {"MLFLOW_HTTP_REQUEST_TIMEOUT": "request_timeout_s", "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "request_max_retries"}
_BOUNDS_SET: dict[str, str] = {}  # what bound_requests wrote (anything else in the env is the user's)


def bound_requests(registry: Any = None) -> dict[str, str]:
    """Bound every MLflow HTTP request of this process (and of the processes it starts):
    ``MLFLOW_HTTP_REQUEST_TIMEOUT`` / ``MLFLOW_HTTP_REQUEST_MAX_RETRIES`` from ``registry``
    (:class:`xct_core.config.RegisterParams`; without it the params defaults, and only
    where nothing is set yet), except where the user's environment sets them. Returns the
    values in force."""
    given = registry is not None
    if registry is None:
        from xct_core.config import RegisterParams

        registry = RegisterParams()
    for var, key in HTTP_BOUNDS.items():
        cur = os.environ.get(var)
        if cur is None or (given and cur == _BOUNDS_SET.get(var)):
            os.environ[var] = _BOUNDS_SET[var] = str(int(getattr(registry, key)))
    return {k: os.environ.get(k, "") for k in HTTP_BOUNDS}


def not_found(e: MlflowException) -> bool:
    """Whether ``e`` is a definite "does not exist" answer (no such registered model,
    version, run or alias) rather than a failure to answer."""
    code = getattr(e, "error_code", None)
    if code == ErrorCode.Name(RESOURCE_DOES_NOT_EXIST):
        return True
    msg = str(e).lower()  # an unknown alias is INVALID_PARAMETER_VALUE "Registered model alias X not found."
    return code == ErrorCode.Name(INVALID_PARAMETER_VALUE) and "alias" in msg and "not found" in msg


def _why(e: BaseException) -> str:
    """The short reason of a failed MLflow call (no URL dumps, no chained tracebacks)."""
    text = str(e)
    low = text.lower()
    if "connection refused" in low or "newconnectionerror" in low:
        return "connection refused"
    if "timed out" in low or "timeout" in low:
        return f"no answer within {os.environ.get('MLFLOW_HTTP_REQUEST_TIMEOUT', '120')} s"
    if "remotedisconnected" in low or "connection aborted" in low or "connection reset" in low:
        return "connection closed without an answer"
    if "too many" in low and "error responses" in low:
        return "server error (HTTP 5xx) on every retry"
    code = getattr(e, "error_code", None)
    first = (text.strip().splitlines() or [type(e).__name__])[0]
    return f"{code + ': ' if code and code != 'INTERNAL_ERROR' else ''}{first[:300]}"


def auth_status(e: BaseException) -> int | None:
    """401 or 403 when ``e`` is the server refusing the caller (basic-auth: credentials
    missing or wrong, or a user without the permission), else ``None``. MLflow raises
    :class:`MlflowException` with ``UNAUTHENTICATED`` / ``PERMISSION_DENIED`` for REST calls
    and ``requests.HTTPError`` for proxied artifact transfers."""
    code = getattr(e, "error_code", None)
    if code in ("UNAUTHENTICATED", "CUSTOMER_UNAUTHORIZED"):
        return 401
    if code == "PERMISSION_DENIED":
        return 403
    status = getattr(getattr(e, "response", None), "status_code", None)
    return status if status in (401, 403) else None


def _refused(status: int, uri: str, what: str) -> RegistryError:
    """One line for a request the server refused: who asked (never the password) and what to do."""
    user = os.environ.get("MLFLOW_TRACKING_USERNAME")
    if status == 401:
        who = (f"user {user!r} with the given MLFLOW_TRACKING_PASSWORD was not accepted" if user
               else "no credentials were sent")
        return RegistryError(f"MLflow at {uri} refused a request while {what}: not authenticated (HTTP 401): {who}; set "
                             "MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD to an MLflow user's credentials")
    who = f"user {user!r} (MLFLOW_TRACKING_USERNAME)" if user else "this user"
    return RegistryError(f"MLflow at {uri} refused a request while {what}: permission denied (HTTP 403): {who} lacks the "
                         "permission; an MLflow admin grants it (docs/security.md)")


def registry_error(e: BaseException, uri: str, what: str) -> RegistryError:
    """One line: which MLflow, what was being done, why it failed, what bounds applied
    (a refusal, HTTP 401/403, says so instead: :func:`auth_status`)."""
    status = auth_status(e)
    if status is not None:
        return _refused(status, uri, what)
    b = {k: os.environ.get(k) for k in HTTP_BOUNDS}
    bounds = "" if "://" not in uri or uri.startswith(("sqlite", "file")) else (
        f" (requests bounded by MLFLOW_HTTP_REQUEST_TIMEOUT={b['MLFLOW_HTTP_REQUEST_TIMEOUT'] or '120'} s, "
        f"MLFLOW_HTTP_REQUEST_MAX_RETRIES={b['MLFLOW_HTTP_REQUEST_MAX_RETRIES'] or '7'}; params registry.request_*)")
    return RegistryError(f"MLflow at {uri} cannot answer while {what}: {_why(e)}{bounds}")


def _transport_errors() -> tuple[type[BaseException], ...]:
    import requests
    import urllib3

    return (MlflowException, requests.exceptions.RequestException, urllib3.exceptions.HTTPError)


@contextmanager
def registry_errors(uri: str, what: str) -> Iterator[None]:
    """Turn any MLflow / HTTP failure inside the block into one :class:`RegistryError` line
    (the chained tracebacks are dropped). Use :func:`not_found` first where "none" is a
    legitimate answer."""
    try:
        yield
    except RegistryError:
        raise
    except _transport_errors() as e:
        raise registry_error(e, uri, what) from None


@contextmanager
def no_progress_bars() -> Iterator[None]:
    """MLflow's tqdm "Downloading/Uploading artifacts" bars off inside the block (unless the
    user's ``MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR`` asks for them): a step's stderr stays its
    messages."""
    var = "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"
    before = os.environ.get(var)
    os.environ[var] = before or "false"
    try:
        yield
    finally:
        if before is None:
            os.environ.pop(var, None)


def tracking_uri() -> str:
    """``$MLFLOW_TRACKING_URI`` or :data:`DEFAULT_TRACKING_URI`."""
    return os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_TRACKING_URI


def store_exists(uri: str) -> bool:
    """Whether the tracking store at ``uri`` already exists, WITHOUT creating it (opening a
    ``sqlite:///`` or ``file:`` store with MLflow creates it): a sqlite file or a local
    folder must be there; a server (http, postgresql, …) is assumed to exist.

    Read-only commands (``xct models list``, ``models:/`` and ``runs:/`` URIs) check this
    first, so they never leave an empty ``mlflow.db`` behind."""
    if uri.startswith("sqlite:///"):
        db = uri.removeprefix("sqlite:///").split("?", 1)[0]
        return db in ("", ":memory:") or Path(db).is_file()
    if uri.startswith("file:"):
        from urllib.parse import unquote, urlparse

        return Path(unquote(urlparse(uri).path)).is_dir()
    if "://" not in uri:  # a plain local path is a file store
        return Path(uri).is_dir()
    return True


def artifact_root(uri: str) -> str | None:
    """Local artifact root for a ``sqlite:///DIR/file.db`` store (``DIR/mlruns`` as a file
    URI); ``None`` (the server's default) otherwise."""
    if uri.startswith("sqlite:///"):
        db = Path(uri.removeprefix("sqlite:///"))
        return (db.parent.absolute() / "mlruns").as_uri()
    return None


def get_client(uri: str | None = None) -> MlflowClient:
    """A client of ``uri`` (default :func:`tracking_uri`) whose requests are bounded
    (:func:`bound_requests`; the params defaults unless set already)."""
    bound_requests()
    return MlflowClient(tracking_uri=uri or tracking_uri())


def ensure_experiment(client: MlflowClient, name: str) -> str:
    """The id of experiment ``name``, created (with :func:`artifact_root`) if missing, and
    marked a model-training experiment (:data:`EXPERIMENT_KIND`) unless it has a kind."""
    key, kind = EXPERIMENT_KIND
    exp = client.get_experiment_by_name(name)
    if exp is None:
        try:
            return client.create_experiment(name, artifact_location=artifact_root(client.tracking_uri),
                                            tags={key: kind})
        except MlflowException:  # created concurrently
            exp = client.get_experiment_by_name(name)
            if exp is None:
                raise
    if key not in (exp.tags or {}):
        client.set_experiment_tag(exp.experiment_id, key, kind)
    return exp.experiment_id


# --------------------------------------------------------------------------- lineage


def git_commit(repo: Path = REPO) -> tuple[str | None, bool]:
    """``(HEAD commit, working tree dirty)``; ``(None, False)`` outside a git checkout."""
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True, text=True, timeout=10)
        if head.returncode != 0:
            return None, False
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"], cwd=repo, capture_output=True, text=True, timeout=10
        )
        return head.stdout.strip(), bool(dirty.stdout.strip())
    except (OSError, subprocess.SubprocessError):
        return None, False


def dvc_data_hash(data_dir: str | Path, repo: Path = REPO) -> tuple[str | None, str]:
    """The DVC hash of ``data_dir``: from ``dvc.lock`` (an ``outs`` entry with that path),
    else from ``<data_dir>.dvc``, else the sha256 of ``<data_dir>/manifest.json``.

    Returns ``(hash, source)`` with source ``dvc.lock`` | ``.dvc`` | ``manifest`` | ``none``.
    """
    d = Path(data_dir).absolute()
    try:
        rel = d.relative_to(repo.absolute()).as_posix()
    except ValueError:
        rel = None
    lock = repo / "dvc.lock"
    if rel is not None and lock.is_file():
        try:
            doc = read_yaml_doc(lock, "dvc.lock") or {}
        except InputError:
            doc = {}
        for stage in (doc.get("stages") or {}).values():
            for out in stage.get("outs") or []:
                if str(out.get("path", "")).rstrip("/") == rel and out.get("md5"):
                    return str(out["md5"]), "dvc.lock"
    dvc_file = d.with_name(d.name + ".dvc")
    if dvc_file.is_file():
        try:
            outs = (read_yaml_doc(dvc_file, ".dvc file") or {}).get("outs") or []
        except InputError:
            outs = []
        if outs and outs[0].get("md5"):
            return str(outs[0]["md5"]), ".dvc"
    manifest = d / "manifest.json"
    if manifest.is_file():
        return hashlib.sha256(manifest.read_bytes()).hexdigest()[:32], "manifest"
    return None, "none"


def kfp_environment(run_id: str = "", run_name: str = "", task_name: str = "") -> dict[str, str]:
    """The ``XCT_KFP_*`` variables for a KFP task's resolved placeholders (empty or unresolved
    ``{{$.…}}`` values left out): what :func:`origin_tags` reads."""
    vals = dict(zip(KFP_ENV, (run_id, run_name, task_name), strict=True))
    return {k: v for k, v in vals.items() if v and not v.startswith("{{")}


def origin_tags() -> dict[str, str]:
    """Where a run comes from: inside a KFP task ``xct.origin=kfp`` + ``kfp.run_id``,
    ``kfp.run_name``, ``kfp.task_name`` (from ``XCT_KFP_*``, :func:`kfp_environment`);
    elsewhere (``dvc repro``, the ``xct`` CLI) ``xct.origin=local`` and no ``kfp.*`` tags."""
    tags = {tag: os.environ[var] for var, tag in KFP_ENV.items() if os.environ.get(var)}
    return {"xct.origin": "kfp" if "kfp.run_id" in tags else "local", **tags}


def lineage_tags(params_digest: str, data_dir: str | Path | None) -> dict[str, str]:
    """Git commit, DVC data hash, params digest and origin (:func:`origin_tags`) as MLflow tags."""
    commit, dirty = git_commit()
    tags = {"xct.params_digest": params_digest, **origin_tags()}
    if commit:
        tags[MLFLOW_GIT_COMMIT] = commit
        tags["xct.git_dirty"] = str(dirty).lower()
    if data_dir is not None:
        h, src = dvc_data_hash(data_dir)
        if h:
            tags["xct.data_hash"] = h
        tags["xct.data_hash_source"] = src
        tags["xct.data_dir"] = str(Path(data_dir).absolute())
    return tags


def _dataset_source(uri: str) -> Any:
    """An MLflow dataset source for ``uri`` (s3://, gs://, a local path, … as MLflow resolves
    them; KFP's ``minio://`` is its S3 store: ``s3://``). A scheme MLflow does not know keeps
    its URI in a local-artifact source (the URI is what lineage needs)."""
    import warnings

    from mlflow.data.dataset_source_registry import resolve_dataset_source

    if uri.startswith("minio://"):
        uri = "s3://" + uri.removeprefix("minio://")
    with warnings.catch_warnings():  # "can be interpreted in multiple ways" notices
        warnings.simplefilter("ignore")
        try:
            return resolve_dataset_source(uri)
        except MlflowException:
            return type(resolve_dataset_source(str(Path.cwd())))(uri)


def dataset_inputs(data_dir: str | Path, contexts: tuple[str, ...], source_uri: str | None = None) -> list[Any]:
    """The processed data folder as MLflow dataset inputs, one per context (``train``, ``val``,
    ``test``): name ``xct-processed-<context>`` (:data:`DATASET_NAME`), source ``source_uri``
    (``$XCT_DATA_URI`` — e.g. the KFP artifact's URI — else the folder's absolute path),
    digest = the DVC / manifest hash of :func:`dvc_data_hash`, profile = the number of volumes
    per split (from the preprocess manifest) and where the digest came from. ``[]`` when the folder has no hash."""
    from mlflow.entities import Dataset, DatasetInput, InputTag
    from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT

    digest, origin = dvc_data_hash(data_dir)
    if digest is None:
        return []
    splits: dict[str, int] = {}
    try:
        splits = {str(s): len(v) for s, v in (read_json_doc(Path(data_dir) / "manifest.json", "preprocess manifest")
                                              .get("splits") or {}).items()}
    except XctError:
        pass
    source = source_uri or os.environ.get("XCT_DATA_URI") or str(Path(data_dir).absolute())
    src = _dataset_source(source)
    profile = json.dumps({"digest_source": origin, "n_volumes": splits}, sort_keys=True)
    # one dataset per split: MLflow keeps one input per (dataset, run), whatever its context
    return [DatasetInput(Dataset(name=f"{DATASET_NAME}-{c}", digest=digest[:36], source_type=src._get_source_type(),
                                 source=src.to_json(), profile=profile),
                         tags=[InputTag(MLFLOW_DATASET_CONTEXT, c)]) for c in contexts]


def log_datasets(client: MlflowClient, run_id: str, data_dir: str | Path | None, contexts: tuple[str, ...]) -> int:
    """Log :func:`dataset_inputs` of ``data_dir`` to ``run_id`` (nothing when ``data_dir`` is
    None or has no hash); returns how many inputs were logged."""
    inputs = dataset_inputs(data_dir, contexts) if data_dir is not None else []
    if inputs:
        client.log_inputs(run_id, datasets=inputs)
    return len(inputs)


def pipeline_run_of(train_dir: str | Path, uri: str) -> str | None:
    """The parent pipeline run of a training output folder (``mlflow_pipeline.json``, written
    by :class:`StageRun`) when it is in the store at ``uri``; else ``$XCT_PIPELINE_RUN_ID``;
    else None."""
    state = _read_json(Path(train_dir) / PIPELINE_FILE)
    if state.get("run_id") and state.get("tracking_uri") == uri:
        return str(state["run_id"])
    return os.environ.get(PIPELINE_RUN_ENV) or None


def gate_metrics(gates: Mapping[int, Mapping[str, Any] | None]) -> dict[str, float]:
    """Gate reports (stage → ``gates/stageK.json`` content, None when missing) as metrics of
    the pipeline run: ``gate{k}.passed`` (1/0; a missing report is 0) and each check's
    measured value ``gate{k}.{check}`` (e.g. ``gate1.psnr_window``)."""
    out: dict[str, float] = {}
    for k, doc in sorted(gates.items()):
        doc = doc or {}
        out[f"gate{k}.passed"] = 1.0 if doc.get("passed") and not doc.get("skipped") else 0.0
        for c in doc.get("checks") or []:
            v = c.get("value")
            if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(float(v)):
                out[f"gate{k}.{c.get('name') or c.get('metric')}"] = float(v)
    return out


def log_pipeline_verdict(client: MlflowClient, run_id: str, gates: Mapping[int, Mapping[str, Any] | None],
                         tags: Mapping[str, str]) -> None:
    """The gate results (:func:`gate_metrics`) and the verdict ``tags`` on the pipeline run."""
    now = int(time.time() * 1000)
    metrics = [Metric(k, v, now, 0) for k, v in gate_metrics(gates).items()]
    client.log_batch(run_id, metrics=metrics, tags=[RunTag(k, str(v)) for k, v in tags.items()], synchronous=True)


def flatten(d: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """Nested params → ``{"a.b.c": "value"}`` (lists as JSON), values cut to MLflow's limit."""
    out: dict[str, str] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping) and v:
            out.update(flatten(v, key + "."))
        else:
            s = json.dumps(v) if isinstance(v, (list, tuple, dict)) else str(v)
            out[key] = s[:_PARAM_MAX]
    return out


# --------------------------------------------------------------------------- metrics


class MetricLogger:
    """Logs step-indexed metrics to one run, never the same (key, step) twice.

    On creation it reads the steps already logged for each key (a run resumed after a
    crash keeps its earlier points; points between the resumed checkpoint and the crash
    are not logged again). Non-numeric values and the ``step`` key itself are skipped."""

    def __init__(self, run_id: str, uri: str | None = None) -> None:
        self.uri = uri or tracking_uri()
        self.client = get_client(self.uri)
        self.run_id = run_id
        self.last: dict[str, int] = {}
        with registry_errors(self.uri, f"reading run {run_id}"):
            run = self.client.get_run(run_id)
            for key in run.data.metrics:
                hist = self.client.get_metric_history(run_id, key)
                if hist:
                    self.last[key] = max(m.step for m in hist)

    def log(self, metrics: Mapping[str, Any], step: int) -> int:
        """Log ``metrics`` at ``step``; returns how many points were written."""
        now = int(time.time() * 1000)
        batch = []
        for key, v in metrics.items():
            if key in ("step", "done") or isinstance(v, bool) or not isinstance(v, (int, float)):
                continue
            if self.last.get(key, -1) >= step:
                continue
            val = float(v)
            batch.append(Metric(key, val if math.isfinite(val) else float("nan"), now, int(step)))
            self.last[key] = int(step)
        with registry_errors(self.uri, f"logging metrics of run {self.run_id}"):
            for i in range(0, len(batch), 900):
                self.client.log_batch(self.run_id, metrics=batch[i : i + 900], synchronous=True)
        return len(batch)

    def artifact(self, path: str, subdir: str | None = None) -> None:
        with registry_errors(self.uri, f"logging {Path(path).name} to run {self.run_id}"):
            self.client.log_artifact(self.run_id, path, subdir)


# --------------------------------------------------------------------------- runs


def _read_json(path: Path) -> dict[str, Any]:
    """A run-state file, or {} when missing or unusable (a new run is started then)."""
    try:
        return read_json_doc(path, "MLflow run state")
    except XctError:
        return {}


def _write_json(path: Path, doc: Mapping[str, Any]) -> None:
    write_json_atomic(path, dict(doc))


def _same_store(state: Mapping[str, Any], uri: str) -> bool:
    """Whether a run-state file was written for tracking store ``uri`` (the files keep the
    URI with its password masked; older ones the raw URI)."""
    kept = state.get("tracking_uri")
    return isinstance(kept, str) and redact_url(kept) == redact_url(uri)


def _usable_run(client: MlflowClient, run_id: str | None, experiment_id: str) -> bool:
    if not run_id:
        return False
    try:
        run = client.get_run(run_id)
    except MlflowException as e:
        if not_found(e):  # a deleted / unknown run: start a new one; a failing server is an error
            return False
        raise
    return run.info.experiment_id == experiment_id and run.info.lifecycle_stage == "active"


class StageRun:
    """The MLflow runs of one stage training: the parent pipeline run and the nested stage
    run, created or (after a crash / re-run) reopened.

    ``state_file`` (next to the stage's checkpoints) and ``pipeline_file`` (in the output
    folder) remember the run ids. ``new_run`` creates a new stage run (nothing to resume);
    ``new_pipeline`` also a new pipeline run (a fresh start of the cascade)."""

    def __init__(self, **kw: Any) -> None:
        """Keyword arguments: ``experiment``, ``stage``, ``run_name``, ``state_file``,
        ``pipeline_file``, ``params``, ``tags``, ``new_run``, ``new_pipeline``,
        ``parent_run_id``, ``data_contexts`` (see :meth:`_open`). An MLflow that cannot
        answer is one :class:`RegistryError` line."""
        self.uri = tracking_uri()
        self.client = get_client(self.uri)
        with registry_errors(self.uri, f"opening the MLflow run of stage {kw.get('stage')}"):
            self._open(**kw)

    def _open(
        self,
        *,
        experiment: str,
        stage: int,
        run_name: str,
        state_file: Path,
        pipeline_file: Path,
        params: Mapping[str, Any],
        tags: Mapping[str, str],
        new_run: bool = False,
        new_pipeline: bool = False,
        parent_run_id: str | None = None,
        data_contexts: tuple[str, ...] = ("train", "val"),
    ) -> None:
        """``data_contexts``: the splits of the data folder (tag ``xct.data_dir``) a new stage
        run logs as dataset inputs (:func:`log_datasets`)."""
        self.experiment_id = ensure_experiment(self.client, experiment)
        parent = parent_run_id or os.environ.get(PIPELINE_RUN_ENV)
        #: we keep the parent's status in step with the stages only when the parent is ours
        #: (not one handed in by an orchestrator, which owns its status)
        self.owns_parent = not parent
        pstate = _read_json(pipeline_file)
        if not parent:
            if not new_pipeline and _same_store(pstate, self.uri) and _usable_run(
                self.client, pstate.get("run_id"), self.experiment_id
            ):
                parent = pstate["run_id"]
            else:
                parent = self.client.create_run(
                    self.experiment_id, tags=redact_doc({**tags, "xct.kind": "pipeline"}), run_name="pipeline"
                ).info.run_id
                _write_json(pipeline_file, {"run_id": parent, "tracking_uri": redact_url(self.uri)})
        self.parent_run_id: str = parent
        if self.owns_parent:
            self.client.update_run(parent, status="RUNNING")

        sstate = {} if new_run else _read_json(state_file)
        self.resumed = (
            _same_store(sstate, self.uri)
            and sstate.get("parent_run_id") == parent
            and _usable_run(self.client, sstate.get("run_id"), self.experiment_id)
        )
        if self.resumed:
            self.run_id: str = sstate["run_id"]
            self.client.update_run(self.run_id, status="RUNNING")
            self.client.set_tag(self.run_id, "xct.resumed", "true")
        else:
            run = self.client.create_run(
                self.experiment_id,
                tags=redact_doc({**tags, MLFLOW_PARENT_RUN_ID: parent, MLFLOW_RUN_NAME: run_name, "xct.kind": "stage",
                                 "xct.stage": str(stage)}),
                run_name=run_name,
            )
            self.run_id = run.info.run_id
            _write_json(state_file, {"run_id": self.run_id, "parent_run_id": parent, "tracking_uri": redact_url(self.uri)})
            if tags.get("xct.data_dir"):
                log_datasets(self.client, self.run_id, tags["xct.data_dir"], data_contexts)
        self._log_params(params)
        self.client.log_batch(self.run_id, tags=[RunTag(k, redact(v)) for k, v in tags.items()], synchronous=True)

    def _log_params(self, params: Mapping[str, Any]) -> None:
        have = self.client.get_run(self.run_id).data.params
        flat = {k: redact(v) for k, v in flatten(params).items()}  # no credential in a logged param
        todo = [Param(k, v) for k, v in flat.items() if k not in have]
        changed = sorted(k for k, v in flat.items() if k in have and have[k] != v)
        for i in range(0, len(todo), 90):
            self.client.log_batch(self.run_id, params=todo[i : i + 90], synchronous=True)
        if changed:  # params are immutable in MLflow; record what a resume changed
            self.client.set_tag(self.run_id, "xct.params_changed_on_resume", ",".join(changed)[:5000])

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        with registry_errors(self.uri, f"tagging run {self.run_id}"):
            self.client.log_batch(self.run_id, tags=[RunTag(k, redact(v)) for k, v in tags.items()], synchronous=True)

    def end(self, status: str, message: str | None = None) -> None:
        """Terminate the stage run with ``status`` (FINISHED | FAILED | KILLED); a parent
        run of ours follows (it is set RUNNING again when the next stage starts)."""
        if status not in ("FINISHED", "FAILED", "KILLED"):
            raise ValueError(f"not a terminal run status: {status!r}")
        try:
            if message:
                self.client.set_tag(self.run_id, "xct.failure", redact(message)[:5000])
            self.client.set_terminated(self.run_id, status=status)
            if self.owns_parent:
                self.client.set_terminated(self.parent_run_id, status=status)
        except _transport_errors() as e:
            # one line that keeps the failure being reported (``message``) in front
            err = registry_error(e, self.uri, f"marking run {self.run_id} {status}")
            raise RegistryError(f"{message}; {err}" if message else str(err)) from None


def stage_rows(client: Any, run_id: str, stage: int) -> list[dict[str, Any]] | None:
    """A registered version's stage rows (``eval/stageK/per_patient.csv`` of its registration
    run: the gate's and the alias decision's paired champion comparison), or None when the run
    has none (listed first: a missing file is "none", a failing download raises)."""
    import tempfile

    from xct_core.intervals import read_rows_csv
    from xct_core.layout import PER_PATIENT_CSV

    folder = f"eval/stage{stage}"
    if not any(Path(f.path).name == PER_PATIENT_CSV for f in client.list_artifacts(run_id, folder)):
        return None
    with tempfile.TemporaryDirectory(prefix="xct-champion-") as tmp:
        local = client.download_artifacts(run_id, f"{folder}/{PER_PATIENT_CSV}", tmp)
        return read_rows_csv(local)
