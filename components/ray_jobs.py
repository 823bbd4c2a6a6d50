"""A stage's training as a Ray job on an existing cluster (the Ray Jobs API).

With ``pipeline.ray.address`` set (the head's dashboard URL, e.g.
``http://xct-ray-head-svc.xct.svc.cluster.local:8265``), ``xct train`` and the KFP train task
do not start Ray themselves: :func:`submit_train` hands the same ``xct train`` command to the
cluster through :class:`ray.job_submission.JobSubmissionClient` and follows it:

* entrypoint = ``<pipeline.ray.command> train <the caller's arguments> --params params.yaml``,
  run by the image's installed code on the cluster; ``params.yaml`` is the caller's effective
  params (overlays and ``--set`` merged) with ``pipeline.ray.address`` cleared, so the job
  trains instead of submitting again. It travels as the job's ``working_dir`` (uploaded
  through the same authenticated dashboard). Local paths among the arguments are made
  absolute (the job's working directory is not the caller's): they must name storage the
  cluster sees (a shared mount at the same path, or URIs);
* the token: ``RAY_AUTH_TOKEN``, else the file ``RAY_AUTH_TOKEN_PATH``, else
  ``~/.ray/auth_token`` (Ray's own order) goes into the client's ``Authorization: Bearer``
  header; a cluster with token authentication refuses a caller without it (401/403), which
  is reported in one line;
* the job's log is streamed to the caller's output as it comes, plus one progress line per
  status change (``ray job ID: RUNNING (12 s)``);
* the Ray job is stopped (``stop_job``, then a bounded wait for a terminal state) when the
  caller is interrupted (SIGINT), terminated (SIGTERM: a cancelled KFP task, an evicted pod)
  or exceeds ``pipeline.ray.timeout_s``; a job that fails or is stopped fails the caller with
  one line ending in the job's last log lines.

Forwarded to the job's environment: :data:`FORWARD_ENV` only (credentials in an
``MLFLOW_TRACKING_URI`` are dropped: the cluster holds its own secrets). Ray Client
(``ray://``) is not used anywhere: Ray recommends the Jobs API for Ray Train/Tune.
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
import shlex
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from xct_core.errors import ConfigError
from xct_core.training.guards import SigtermGuard
from xct_core.training.result import TrainingFailed

#: the caller's variables the job's driver gets (its own environment comes from the cluster)
#: (the KFP lineage ``XCT_KFP_*``: the job's MLflow runs carry the KFP run id and task name)
FORWARD_ENV = ("MLFLOW_TRACKING_URI", "MLFLOW_EXPERIMENT_NAME", "XCT_TRAIN_FAULTS",
               "XCT_KFP_RUN_ID", "XCT_KFP_RUN_NAME", "XCT_KFP_TASK_NAME")
#: the params file inside the job's working_dir
PARAMS_NAME = "params.yaml"
#: the job's final log lines quoted in a failure message
ERROR_LINES = 6
TERMINAL = ("SUCCEEDED", "FAILED", "STOPPED")
#: set by Ray in a job's entrypoint (its job config): the process is a Ray job's driver
IN_RAY_JOB_ENV = "RAY_JOB_CONFIG_JSON_ENV_VAR"


class RayJobFailed(TrainingFailed):
    """The Ray job failed, was stopped, or could not be submitted (exit 1)."""


@dataclass
class JobOutcome:
    """How a submitted job ended (only SUCCEEDED is returned; the rest raise)."""

    job_id: str
    status: str
    seconds: float
    logs: str


def ray_token() -> str | None:
    """The Ray auth token this process holds, in Ray's order: ``RAY_AUTH_TOKEN``, the file
    ``RAY_AUTH_TOKEN_PATH``, ``~/.ray/auth_token``; None without one."""
    token = os.environ.get("RAY_AUTH_TOKEN", "").strip()
    if token:
        return token
    path = os.environ.get("RAY_AUTH_TOKEN_PATH")
    candidates = [Path(path)] if path else [Path.home() / ".ray" / "auth_token"]
    for p in candidates:
        try:
            token = p.read_text().strip()
        except OSError as e:
            if path:  # named explicitly: unreadable is an error, as in Ray
                raise ConfigError(f"{p}: cannot read the Ray auth token (RAY_AUTH_TOKEN_PATH): {e.strerror}") from None
            return None
        if token:
            return token
        if path:
            raise ConfigError(f"{p}: the Ray auth token file (RAY_AUTH_TOKEN_PATH) is empty")
    return None


def auth_headers(token: str | None) -> dict[str, str]:
    """The HTTP headers that authenticate to a token-auth Ray dashboard (empty without a token)."""
    return {"Authorization": f"Bearer {token}"} if token else {}


def without_credentials(url: str) -> str:
    """``url`` with any ``user:password@`` removed (it is forwarded and shown)."""
    parts = urlsplit(url)
    if parts.username is None and parts.password is None:
        return url
    host = parts.hostname or ""
    if parts.port:
        host = f"{host}:{parts.port}"
    return urlunsplit((parts.scheme, host, parts.path, parts.query, parts.fragment))


def check_address(address: str) -> str:
    """The dashboard URL of ``pipeline.ray.address``; ``ray://`` (Ray Client) and other
    schemes are refused in one line."""
    scheme = urlsplit(address).scheme
    if scheme not in ("http", "https"):
        raise ConfigError(f"pipeline.ray.address {without_credentials(address)!r}: expected the Ray head's dashboard "
                          "URL, http(s)://HOST:8265 (the Jobs API; Ray Client ray:// is not supported)")
    return address.rstrip("/")


def job_env(environ: dict[str, str] | None = None) -> dict[str, str]:
    """The variables of :data:`FORWARD_ENV` set in ``environ`` (credentials stripped from URLs)."""
    env = os.environ if environ is None else environ
    out = {k: env[k] for k in FORWARD_ENV if env.get(k)}
    if "MLFLOW_TRACKING_URI" in out:
        out["MLFLOW_TRACKING_URI"] = without_credentials(out["MLFLOW_TRACKING_URI"])
    return out


def entrypoint(command: str, args: Sequence[str]) -> str:
    """The job's shell command: ``command train ARGS --params params.yaml`` (quoted)."""
    return shlex.join([*shlex.split(command), "train", *map(str, args), "--params", PARAMS_NAME])


#: the job manager's own lines in a job's log (runtime-env set-up, the entrypoint echo)
_RAY_NOISE = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d+\s+(DEBUG|INFO)\b|Running entrypoint for job )")


def last_lines(text: str, n: int = ERROR_LINES) -> str:
    """The last ``n`` non-empty lines of a job's log, Ray's own INFO lines left out, joined
    with `` | `` (one line)."""
    lines = [ln.strip() for ln in text.splitlines() if ln.strip() and not _RAY_NOISE.match(ln.strip())]
    return " | ".join(lines[-n:])


def _client(address: str, token: str | None) -> Any:
    from ray.job_submission import JobSubmissionClient

    for name in ("ray.dashboard.modules.dashboard_sdk", "ray.dashboard.modules.job.sdk"):
        logging.getLogger(name).setLevel(logging.WARNING)  # "Uploading package …", "WebSocket closed …"
    try:
        return JobSubmissionClient(address, headers=auth_headers(token))
    except Exception as e:  # noqa: BLE001 - connection, auth, version: one line
        raise RayJobFailed(f"Ray Jobs API at {without_credentials(address)}: {_reason(e, token)}") from None


def _reason(e: BaseException, token: str | None) -> str:
    text = " ".join(str(e).split())
    if "401" in text or "Unauthorized" in text:
        return "refused (401): no Ray auth token sent (set RAY_AUTH_TOKEN or RAY_AUTH_TOKEN_PATH)"
    if "403" in text or "Forbidden" in text:
        return "refused (403): the Ray auth token is not this cluster's"
    if token:
        text = text.replace(token, "***")
    return f"{type(e).__name__}: {text[:300]}"


class _LogTail(threading.Thread):
    """Streams the job's log (``tail_job_logs``, a websocket) to ``out`` until the job ends."""

    def __init__(self, client: Any, job_id: str, out: Callable[[str], None]) -> None:
        super().__init__(daemon=True, name=f"ray-job-log-{job_id}")
        self.client, self.job_id, self.out = client, job_id, out
        self.error: BaseException | None = None

    def run(self) -> None:
        async def follow() -> None:
            async for chunk in self.client.tail_job_logs(self.job_id):
                self.out(chunk)

        try:
            asyncio.run(follow())
        except BaseException as e:  # noqa: BLE001 - reported by the caller
            self.error = e


def submit_train(address: str, args: Sequence[str], params_text: str, *, command: str = "xct",
                 timeout_s: float = 0.0, poll_s: float = 1.0, stop_wait_s: float = 60.0,
                 name: str = "xct-train", log: Callable[[str], None] = print,
                 write: Callable[[str], None] | None = None) -> JobOutcome:
    """Run ``xct train ARGS`` as a Ray job on the cluster at ``address`` (module docstring) and
    follow it to its end. ``params_text``: the effective params (YAML) the job trains with;
    ``timeout_s`` 0: no deadline. ``log``: progress lines; ``write``: the job's log chunks
    (default: ``log`` without the newline). Returns the outcome of a SUCCEEDED job; raises
    :class:`RayJobFailed` (failed, stopped, timed out, refused) or
    :class:`~xct_core.training.result.Terminated` (SIGTERM: the job is stopped first)."""
    address = check_address(address)
    shown = without_credentials(address)
    if os.environ.get(IN_RAY_JOB_ENV):  # a job that would submit itself again, for ever
        raise ConfigError(f"pipeline.ray.address is set ({shown}) inside a Ray job: the job must train, not submit; "
                          "clear it in the params the job runs with (--set pipeline.ray.address=)")
    token = ray_token()
    client = _client(address, token)
    write = write or (lambda chunk: log(chunk.rstrip("\n")))
    job_id = f"{name}-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:8]}"
    state = {"status": "", "submitted": False}

    def stop_message() -> str:
        return f"ray job {job_id}: stopped by SIGTERM ({_stop(client, job_id, state, stop_wait_s, log)})"

    with tempfile.TemporaryDirectory(prefix="xct-rayjob-") as wd, SigtermGuard(stop_message):
        Path(wd, PARAMS_NAME).write_text(params_text)
        ep = entrypoint(command, args)
        try:
            client.submit_job(entrypoint=ep, submission_id=job_id, metadata={"xct.job": name},
                              runtime_env={"working_dir": wd, "env_vars": job_env()})
        except Exception as e:  # noqa: BLE001 - one line
            raise RayJobFailed(f"ray job submission to {shown} failed: {_reason(e, token)}") from None
        state["submitted"] = True
        t0 = time.monotonic()
        log(f"ray job {job_id} submitted to {shown}: {ep}")
        tail = _LogTail(client, job_id, write)
        tail.start()
        try:
            status = _follow(client, job_id, t0, timeout_s, poll_s, state, log)
        except BaseException:
            # SIGTERM (the guard then raises Terminated), SIGINT, a lost Jobs API …: never
            # leave the job running behind a caller that is gone
            _stop(client, job_id, state, stop_wait_s, log)
            raise
        how = _stop(client, job_id, state, stop_wait_s, log) if status == "TIMEOUT" else ""
        tail.join(timeout=15)  # the rest of the log (the stream ends with the job)
        seconds = time.monotonic() - t0
        logs = _logs(client, job_id)
        if status == "TIMEOUT":
            raise RayJobFailed(f"ray job {job_id} exceeded pipeline.ray.timeout_s = {timeout_s:g} s ({how}); "
                               f"last lines: {last_lines(logs) or '(no log)'}")
        if status != "SUCCEEDED":
            message = ""
            try:
                message = " ".join((client.get_job_info(job_id).message or "").split())[:200]
            except Exception:  # noqa: BLE001 - the message is a courtesy
                pass
            raise RayJobFailed(f"ray job {job_id} {status} after {seconds:.0f} s"
                               f"{f' ({message})' if message and status == 'STOPPED' else ''}; "
                               f"last lines: {last_lines(logs) or message or '(no log)'}")
        return JobOutcome(job_id, status, seconds, logs)


def _follow(client: Any, job_id: str, t0: float, timeout_s: float, poll_s: float, state: dict,
            log: Callable[[str], None]) -> str:
    """Poll the job's status until it is terminal ("TIMEOUT" past the deadline); one progress
    line per status change."""
    errors = 0
    while True:
        try:
            status = str(client.get_job_status(job_id).value)
            errors = 0
        except Exception as e:  # noqa: BLE001 - a dashboard restart: retry a few times
            errors += 1
            if errors >= 10:
                raise RayJobFailed(f"ray job {job_id}: lost the Jobs API ({_reason(e, None)})") from None
            time.sleep(poll_s)
            continue
        if status != state["status"]:
            state["status"] = status
            log(f"ray job {job_id}: {status} ({time.monotonic() - t0:.0f} s)")
        if status in TERMINAL:
            return status
        if timeout_s and time.monotonic() - t0 > timeout_s:
            return "TIMEOUT"
        time.sleep(poll_s)


def _stop(client: Any, job_id: str, state: dict, wait_s: float, log: Callable[[str], None]) -> str:
    """Stop the job (if submitted and not finished) and wait up to ``wait_s`` for a terminal
    state; returns what happened, in words."""
    if not state.get("submitted"):
        return "nothing was submitted"
    if state.get("stopped"):
        return state["stopped"]
    state["stopped"] = "stop requested"
    try:
        client.stop_job(job_id)
        deadline = time.monotonic() + wait_s
        status = ""
        while time.monotonic() < deadline:
            status = str(client.get_job_status(job_id).value)
            if status in TERMINAL:
                break
            time.sleep(0.5)
        state["stopped"] = f"the Ray job is {status or 'unknown'}"
    except Exception as e:  # noqa: BLE001 - report, never hide the first error
        state["stopped"] = f"stopping the Ray job failed: {_reason(e, None)}"
    log(f"ray job {job_id}: {state['stopped']}")
    return state["stopped"]


def _logs(client: Any, job_id: str) -> str:
    try:
        return client.get_job_logs(job_id) or ""
    except Exception:  # noqa: BLE001 - the failure message says "(no log)"
        return ""


def absolute_args(args: Sequence[Any]) -> list[str]:
    """The argument list with every :class:`~pathlib.Path` made absolute (the job does not
    run in the caller's working directory); URIs and other values unchanged."""
    return [str(a.absolute()) if isinstance(a, Path) and "://" not in str(a) else str(a) for a in args]


def passthrough_args(ctx: Any, drop: Sequence[str]) -> list[str]:
    """The options of a click/typer invocation (``ctx``) as an argument list, with the
    parameters named in ``drop`` left out: what the caller gave (and the defaults), so any
    option a command grows flows through to the job. Path values are made absolute."""
    out: list[Any] = []
    for p in ctx.command.params:
        if p.name in drop or not getattr(p, "opts", None):
            continue
        value = ctx.params.get(p.name)
        if value is None:
            continue
        if getattr(p, "is_flag", False) and isinstance(value, bool):
            if value:
                out.append(p.opts[0])
            elif p.secondary_opts:
                out.append(p.secondary_opts[0])
            continue
        for v in value if getattr(p, "multiple", False) else [value]:
            out += [p.opts[0], v]
    return absolute_args(out)


def submit_stage(params: Any, stage: int, processed: str | Path, out: str | Path, *, fresh: bool = False,
                 run_id: str | None = None, log: Callable[[str], None] = print) -> int:
    """The KFP train task's route with ``pipeline.ray.address`` set: ``xct train --stage K``
    as a Ray job (:func:`submit_train`); returns the final step from the stage's metrics
    summary, which lands in ``out`` (``RunLayout(out, K).metrics_file``).

    Without ``run_id``: ``--processed P --out O [--fresh]`` — the task and the cluster must
    share that storage. With ``run_id`` (run storage, ``pipeline.storage.uri`` on S3): the
    processed folder is published to the run (``RunStorage.publish_processed``; unchanged
    files are skipped on a retry) and the job runs ``--data-uri <run>/processed --storage-uri
    URI --run-id ID`` — never ``--fresh``, so a retried task resumes from the run's newest
    checkpoint; the summary is fetched from the run's ``train/``."""
    from components.run_storage import RunStorage
    from xct_core.jsondoc import read_json_doc
    from xct_core.layout import RUN_STORAGE_DIRS, RunLayout

    k = int(stage)
    metrics = RunLayout(Path(out).absolute(), k).metrics_file
    if run_id is None:
        args = ["--stage", str(k), *absolute_args(["--processed", Path(processed), "--out", Path(out)])]
        if fresh:
            args.append("--fresh")
    else:
        uri = params.pipeline.storage.uri
        storage = RunStorage.for_run(uri, run_id, params.s3)
        if not storage.is_s3:
            raise ConfigError(f"pipeline.storage.uri {uri!r} with pipeline.ray.address: the Ray-job route reads the "
                              "run's data by URI; use an s3:// storage URI (a mounted folder: run without the address)")
        if fresh:
            raise ConfigError("the Ray-job route with run storage resumes the run (the same run id): it never starts "
                              "fresh")
        log(f"publishing {processed} → {storage.processed}")
        data_uri = storage.publish_processed(processed)
        args = ["--stage", str(k), "--data-uri", data_uri, "--storage-uri", uri, "--run-id", run_id]
    cfg = params.pipeline.ray
    submit_train(cfg.address, args, cleared_params_text(params), command=cfg.command, timeout_s=cfg.timeout_s,
                 name=f"xct-train-stage{k}", log=log)
    if run_id is not None:
        storage.get_file(f"{RUN_STORAGE_DIRS['train']}/{metrics.relative_to(Path(out).absolute()).as_posix()}",
                         metrics)
    doc = read_json_doc(metrics, "training summary", required=("step",),
                        missing_hint="the Ray job succeeded, but this task does not see its outputs: the task and "
                                     "the cluster must share the output storage")
    return int(doc["step"])


def cleared_params_text(ops_params: Any) -> str:
    """The effective params as YAML with ``pipeline.ray.address`` cleared: the job's
    ``params.yaml`` (it trains on the cluster instead of submitting again)."""
    import yaml

    data = ops_params.model_dump(mode="json")
    data["pipeline"]["ray"]["address"] = ""
    return yaml.safe_dump(data, sort_keys=False)


__all__ = ["JobOutcome", "RayJobFailed", "submit_train", "submit_stage", "ray_token", "auth_headers", "entrypoint",
           "job_env", "passthrough_args", "cleared_params_text", "check_address", "without_credentials"]
