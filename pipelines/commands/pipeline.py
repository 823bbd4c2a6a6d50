"""`xct pipeline` command group: the Kubeflow Pipelines v2 DAG (pipelines/kfp_dag.py).

::

    xct pipeline compile [--out pipeline.yaml] [--params P] [--overlay O] [--set K=V] [--no-cache]   IR YAML
    xct pipeline run --local [--params P] [--overlay O] [--set K=V] [--data DIR] [--no-cache]   kfp.local
    xct pipeline submit --host URL [--data-uri URI] [--ray-address A] [--mlflow-uri U] [--no-cache]
                        [--token-file F | --sa-token-file F]   (or $XCT_KFP_TOKEN)   multi-user Kubeflow
    xct pipeline dvc-sync [--params P] [--overlay O] [--check]   dvc.yaml's per-stage lines from params

Caching, retries and the train task's accelerator come from ``pipeline.kfp`` in the params
(pipelines/kfp_dag.py :func:`build_pipeline`); ``--no-cache`` turns step caching off. The
params (``--params``/``--overlay``/``--set``, pipelines/commands/params.py) are resolved here,
whole, and handed to every task as text; the compiled pipeline's ``params_yaml`` defaults to them.

Credentials of ``submit`` (a multi-user Kubeflow refuses anonymous calls): a bearer token
from ``--token-file`` or ``$XCT_KFP_TOKEN`` (``kfp.Client(existing_token=…)``), or, inside a
pod, the projected service-account token of ``--sa-token-file`` (re-read on every request:
``kfp.client.ServiceAccountTokenVolumeCredentials``). The token is sent as
``Authorization: Bearer …`` and never printed, not even in an error.

The DVC twin of the same DAG is ``dvc repro`` (dvc.yaml); ``make demo`` runs that one.
Heavy imports (kfp, torch) happen inside the commands so ``xct --help`` stays fast.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Annotated, Optional

import typer

from pipelines.commands.params import OverlayOpt, ParamsOpt, SetOpt, command_params
from xct_core.errors import ConfigError, InputError, XctError, printable

app = typer.Typer(no_args_is_help=True)
NoCacheOpt = Annotated[
    bool, typer.Option("--no-cache", help="turn KFP step caching off for every task (default: params pipeline.kfp.caching)"),
]


def _caching(no_cache: bool) -> bool | None:
    """``False`` when --no-cache was given, else ``None`` (params decide)."""
    return False if no_cache else None


def _params(path: Path | None, overlay: list[Path] | None = None, sets: list[str] | None = None):  # noqa: ANN202
    """The whole params (``OpsParams``: the KFP controls included) the pipeline runs with."""
    from components.ops_params import OpsParams

    return command_params(path, overlay, sets, schema=OpsParams)


def params_text(path: Path | None, overlay: list[Path] | None = None, sets: list[str] | None = None) -> str:
    """The effective params as self-contained YAML (never empty: see :func:`_params`).

    Resolved here, with the file's ``overlays:`` (e.g. the hpo/best_stageK.yaml results)
    merged in: the steps run from a temporary copy elsewhere, so the text they get must be
    self-contained. A bad file is a one-line ConfigError before anything is submitted."""
    from components.ops_params import params_text as text_of

    return text_of(_params(path, overlay, sets))


@app.command("compile")
def compile_cmd(
    out: Annotated[Path, typer.Option("--out", "-o", help="IR YAML to write")] = Path("pipeline.yaml"),
    params: ParamsOpt = None,
    overlay: OverlayOpt = None,
    set_: SetOpt = None,
    no_cache: NoCacheOpt = False,
) -> None:
    """Compile the KFP v2 pipeline (dsl.If gates, exit handler, retries, caching) to an IR YAML file."""
    from pipelines.kfp_dag import compile_pipeline

    if out.is_dir():
        raise InputError(out, "is a folder; give a file name such as pipeline.yaml")
    path = compile_pipeline(out, _params(params, overlay, set_), caching=_caching(no_cache))
    typer.echo(printable(f"wrote {path}"))


def _find_outputs(run_root: Path, name: str) -> list[Path]:
    return sorted(p for p in run_root.rglob(name) if p.is_file())


def local_report(root: Path, started: float) -> str:
    """A short account of a kfp.local run under ``root``: gate verdicts and the summary."""
    from components.pipeline_verdict import format_summary, read_summary

    gates = [p for p in _find_outputs(root, "stage*.json") if "gate" in p.as_posix()
             and p.stat().st_mtime >= started]
    lines = []
    # each gate task hands on the reports so far: one report per stage (the copies are the same file)
    for g in sorted({p.name: p for p in gates}.values(), key=lambda p: int(p.stem.removeprefix("stage"))):
        doc = json.loads(g.read_text())
        lines.append(str(doc.get("summary", f"{g}: passed={doc.get('passed')}")))
    summaries = [p for p in _find_outputs(root, "summary.json") if p.stat().st_mtime >= started]
    if summaries:
        lines += ["", format_summary(read_summary(summaries[-1]))]
    else:
        lines += ["", "REJECTED: a gate did not pass; later stages were not run (nothing registered)"]
    return "\n".join(lines)


@app.command("run")
def run_cmd(
    local: Annotated[bool, typer.Option("--local", help="run every task here with kfp.local (SubprocessRunner)")] = False,
    params: ParamsOpt = None,
    overlay: OverlayOpt = None,
    set_: SetOpt = None,
    data: Annotated[
        Optional[Path], typer.Option("--data", help="raw CT folder (default: params data.raw_dir)")
    ] = None,
    root: Annotated[
        Path, typer.Option("--root", help="kfp.local pipeline root (task outputs, temp dirs)")
    ] = Path("outputs/kfp-local"),
    no_cache: NoCacheOpt = False,
) -> None:
    """Run the KFP pipeline on this machine (``--local``); exit 0 when it completes (promoted or rejected)."""
    if not local:
        raise ConfigError(
            "only local runs are supported here: pass --local (cluster: `xct pipeline submit --host URL`; "
            "DVC: `dvc repro`)"
        )
    from pipelines.kfp_dag import run_local

    p = _params(params, overlay, set_)
    from components.ops_params import params_text as text_of

    text = text_of(p)
    data_dir = data if data is not None else Path(p.data.raw_dir)
    started = time.time()
    run_local(data_dir, text, root, caching=_caching(no_cache))
    typer.echo(local_report(root.absolute(), started - 1))
    typer.echo(printable(f"kfp.local run finished in {time.time() - started:.0f} s; task outputs under {root}"))


#: default --timeout of `xct pipeline submit` (seconds)
SUBMIT_TIMEOUT_S = 30.0
#: environment variable holding a Kubeflow Pipelines bearer token (CI; never printed)
TOKEN_ENV = "XCT_KFP_TOKEN"
#: where Kubeflow projects a pod's pipelines token (kfp's own default for in-cluster clients)
SA_TOKEN_DEFAULT = "/var/run/secrets/kubeflow/pipelines/token"


def _read_token(path: Path) -> str:
    """The one bearer token in ``path``; a one-line InputError naming the file otherwise (the
    token itself is never part of a message)."""
    from xct_core.jsondoc import read_doc_text

    words = read_doc_text(path, "token file", max_bytes=64 * 1024).split()
    if len(words) != 1:
        raise InputError(path, "is empty: expected one bearer token" if not words
                         else "holds more than one word: expected one bearer token")
    from xct_core.redact import register_secret

    register_secret(words[0])  # masked wherever a library would print it (xct_core/redact.py)
    return words[0]


def kfp_credentials(token_file: Path | None, sa_token_file: Path | None):  # noqa: ANN201 - (str | None, credentials | None)
    """``(existing_token, credentials)`` for ``kfp.Client``: from ``--token-file``,
    ``--sa-token-file`` or ``$XCT_KFP_TOKEN`` (at most one of them), else ``(None, None)``."""
    env_token = os.environ.get(TOKEN_ENV, "").strip()
    given = [n for n, v in (("--token-file", token_file), ("--sa-token-file", sa_token_file), (f"${TOKEN_ENV}", env_token))
             if v]
    if len(given) > 1:
        raise ConfigError(f"give one Kubeflow Pipelines credential, not {' and '.join(given)}")
    if token_file is not None:
        return _read_token(token_file), None
    if sa_token_file is not None:
        _read_token(sa_token_file)  # missing or empty: one line now, not a failed request later
        from kfp.client import ServiceAccountTokenVolumeCredentials

        return None, ServiceAccountTokenVolumeCredentials(path=str(sa_token_file))
    if env_token and len(env_token.split()) != 1:
        raise ConfigError(f"${TOKEN_ENV} holds more than one word: expected one bearer token")
    return env_token or None, None


def bounded_call(fn, timeout_s: float, message: str):  # noqa: ANN001, ANN201 - any callable, its result
    """``fn()`` with a deadline: every socket it opens times out after ``timeout_s`` (the
    default socket timeout, which urllib3 and so the KFP client use) and the whole call is
    abandoned after ``timeout_s`` — an :class:`XctError` with ``message`` (one line) instead of
    a hang on a host that accepts TCP and never answers. ``fn`` runs in a daemon thread, so
    an abandoned call never keeps the process alive."""
    import socket
    import threading

    box: dict[str, object] = {}

    def run() -> None:
        try:
            box["value"] = fn()
        except BaseException as e:  # noqa: BLE001 - re-raised in the caller's thread
            box["error"] = e

    old = socket.getdefaulttimeout()
    socket.setdefaulttimeout(timeout_s)
    try:
        worker = threading.Thread(target=run, name="xct-bounded-call", daemon=True)
        worker.start()
        worker.join(timeout_s)
    finally:
        socket.setdefaulttimeout(old)
    if worker.is_alive():
        raise XctError(message)
    if "error" in box:
        raise box["error"]  # type: ignore[misc]
    return box["value"]


@app.command("submit")
def submit_cmd(
    host: Annotated[str, typer.Option("--host", help="Kubeflow Pipelines API endpoint, e.g. http://localhost:8080")],
    data_uri: Annotated[
        str, typer.Option("--data-uri", help="raw CT folder the cluster can read (s3://…, gs://…, a PVC path)")
    ] = "s3://xct-data/raw",
    params: ParamsOpt = None,
    ray_address: Annotated[str, typer.Option("--ray-address", help="Ray cluster address (empty: local Ray per task)")] = "",
    mlflow_uri: Annotated[str, typer.Option("--mlflow-uri", help="MLflow tracking URI (empty: step default)")] = "",
    experiment: Annotated[str, typer.Option("--experiment", help="KFP experiment name")] = "xct",
    run_name: Annotated[Optional[str], typer.Option("--run-name", help="KFP run name")] = None,
    namespace: Annotated[Optional[str], typer.Option("--namespace", help="Kubernetes namespace (multi-user KFP)")] = None,
    no_cache: NoCacheOpt = False,
    timeout: Annotated[float, typer.Option("--timeout", min=0.1, help="seconds to wait for the Kubeflow Pipelines API "
                                           "(the whole submission; every socket operation too)")] = SUBMIT_TIMEOUT_S,
    token_file: Annotated[Optional[Path], typer.Option(
        "--token-file", help=f"file holding a bearer token for a multi-user Kubeflow (or set ${TOKEN_ENV})")] = None,
    sa_token_file: Annotated[Optional[Path], typer.Option(
        "--sa-token-file", help=f"in a pod: the projected service-account token, re-read per request "
                                f"(Kubeflow's default path: {SA_TOKEN_DEFAULT})")] = None,
) -> None:
    """Submit the pipeline to a Kubeflow Pipelines cluster (data location, Ray and MLflow as parameters)."""
    from pipelines.kfp_dag import submit

    text = params_text(params)  # a bad params file is its own one-line error, before the clock starts
    token, credentials = kfp_credentials(token_file, sa_token_file)
    run_id = bounded_call(lambda: submit(host, data_uri, text, ray_address, mlflow_uri, experiment, run_name, namespace,
                                         caching=_caching(no_cache), token=token, credentials=credentials),
                          timeout, f"Kubeflow Pipelines at {host} did not answer within {timeout:g} s (--timeout); "
                                   "nothing was submitted unless the server received it before then")
    typer.echo(printable(f"submitted run {run_id} to {host}"))


@app.command("dvc-sync")
def dvc_sync_cmd(
    params: ParamsOpt = None,
    overlay: OverlayOpt = None,
    dvc_yaml: Annotated[Path, typer.Option("--dvc-yaml", help="the DVC pipeline file to update")] = Path("dvc.yaml"),
    check: Annotated[bool, typer.Option("--check", help="write nothing; exit 2 when dvc.yaml is out of date")] = False,
) -> None:
    """Write dvc.yaml's per-stage lines (the cascade and preprocess's grid keys) from the params' stages."""
    from pipelines.dvc_dag import sync_dvc_yaml

    p = command_params(params, overlay, None)
    res = sync_dvc_yaml(dvc_yaml, p, check=check)
    if check and (res.changed or res.overlays):
        missing = f"; missing {', '.join(map(str, res.overlays))}" if res.overlays else ""
        raise InputError(dvc_yaml, f"out of date with the params' {p.n_stages} stages{missing} "
                                   "(run `xct pipeline dvc-sync`)")
    done = "updated" if res.changed and not check else "up to date"
    made = f"; wrote {', '.join(map(str, res.overlays))}" if res.overlays and not check else ""
    typer.echo(printable(f"{dvc_yaml}: {done} for {p.n_stages} stages ({', '.join(p.stages)}){made}"))


def register(root: typer.Typer) -> None:
    """Add the `pipeline` group to the root app."""
    root.add_typer(app, name="pipeline", help="The KFP pipeline: compile, run locally, submit to a cluster.")
