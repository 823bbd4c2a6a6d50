"""`xct train --stage K`: train one cascade stage (Ray Train + MLflow; see components/train.py).

Re-running the same command after an interruption resumes from the last checkpoint;
``--fresh`` starts over. ``RAY_ADDRESS`` joins an existing Ray cluster; ``MLFLOW_TRACKING_URI``
overrides the embedded sqlite tracking store. ``--local`` runs the loop in this process
without Ray or MLflow (what a bare GPU box with only torch runs). ``--gates DIR`` (dvc.yaml)
runs stage K only when ``DIR/stage{K-1}.json`` passed; otherwise its outputs become skip
markers (components/guard.py) and the command exits 0. ``--storage-uri URI --run-id ID``
(``pipeline.storage.uri``) keeps the run in shared storage, ``URI/ID/`` (data, checkpoints,
models; components/run_storage.py), so the command can run on any node — e.g. as a Ray job
entrypoint — and the same id resumes; ``--data-uri s3://…`` then reads data already published
(instead of publishing ``--processed``).

With ``pipeline.ray.address`` set (params, or ``--set pipeline.ray.address=http://HEAD:8265``)
the stage runs as a Ray job on that cluster (components/ray_jobs.py): the same command and
options, with the effective params and the address cleared; its log streams here, and
SIGTERM / Ctrl-C / ``pipeline.ray.timeout_s`` stop the job.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from pipelines.commands.params import OverlayOpt, ParamsOpt, SetOpt, alias_sets, command_params
from xct_core.errors import printable


def train(
    stage: Annotated[int, typer.Option("--stage", "-k", help="1-based cascade stage")],
    processed: Annotated[Path, typer.Option("--processed", help="preprocessed data folder (with run storage: "
                                            "published to the run first)")] = Path("data/processed"),
    out: Annotated[Optional[Path], typer.Option("--out", help="output folder (default: params train.out_dir)")] = None,
    params: ParamsOpt = None,
    overlay: OverlayOpt = None,
    set_: SetOpt = None,
    steps: Annotated[Optional[int], typer.Option("--steps", min=1, help="override train.steps for this stage")] = None,
    workers: Annotated[Optional[int], typer.Option("--workers", min=1, help="= --set train.ray.num_workers=N")] = None,
    gpu: Annotated[Optional[bool], typer.Option("--gpu/--no-gpu", help="= --set train.ray.use_gpu=true|false")] = None,
    fresh: Annotated[bool, typer.Option("--fresh", help="discard this stage's previous outputs instead of resuming")] = False,
    local: Annotated[bool, typer.Option("--local", help="run in this process: no Ray, no MLflow")] = False,
    device: Annotated[Optional[str], typer.Option("--device", help="--local: cuda | cuda:1 | cpu (default: cuda when available)")] = None,
    gates: Annotated[Optional[Path], typer.Option("--gates", help="run only if the previous stage's gate in this folder "
                                                  "passed (else write skip markers; dvc.yaml)")] = None,
    storage_uri: Annotated[Optional[str], typer.Option("--storage-uri", help="= --set pipeline.storage.uri=URI: the run "
                                                       "lives in URI/RUN_ID/ (s3://bucket/prefix or a mounted folder)")] = None,
    run_id: Annotated[Optional[str], typer.Option("--run-id", help="the run's folder under the storage URI; the same id "
                                                  "resumes it (required with run storage)")] = None,
    data_uri: Annotated[Optional[str], typer.Option("--data-uri", help="with run storage: read the processed data from "
                                                    "this s3:// URI instead of --processed (a Ray job's entrypoint)")] = None,
    ctx: typer.Context = None,  # type: ignore[assignment]  (typer injects it; None: called as a function)
) -> None:
    """Train cascade stage K from the preprocessed shards; resumes an interrupted run."""
    from components.guard import proceed
    from xct_core.devices import parse_device
    from xct_core.layout import RunLayout

    from components.ops_params import OpsParams
    from components.run_storage import RunStorage

    device = parse_device(device)  # a one-line error before anything is loaded
    p = command_params(params, overlay, alias_sets(set_, **{"train.ray.num_workers": workers, "train.ray.use_gpu": gpu,
                                                            "pipeline.storage.uri": storage_uri}),
                       schema=OpsParams)
    storage = None
    if p.pipeline.storage.uri:
        from xct_core.errors import ConfigError

        if local:
            raise ConfigError("--local trains in this process into --out: it does not use pipeline.storage.uri")
        if not run_id:
            raise ConfigError(f"pipeline.storage.uri is {p.pipeline.storage.uri!r}: give --run-id (the run's folder "
                              "there; the same id resumes it)")
        storage = RunStorage.for_run(p.pipeline.storage.uri, run_id, p.s3)
    elif run_id or data_uri:
        from xct_core.errors import ConfigError

        flag = "--run-id names a folder under" if run_id else "--data-uri is read through"
        raise ConfigError(f"{flag} the run storage: set --storage-uri (pipeline.storage.uri) too")
    if data_uri is not None and not RunStorage.is_data_uri(data_uri):
        from xct_core.errors import ConfigError

        raise ConfigError(f"--data-uri {data_uri!r}: expected s3://bucket/prefix (a local folder is --processed)")
    p.stage(stage)  # an unknown stage is a one-line error before anything else
    layout = RunLayout((out or Path(p.train.out_dir)), stage)
    if not proceed(gates, stage, list(layout.step_outputs()), log=lambda m: typer.echo(printable(m))):
        return
    if not local and p.pipeline.ray.address:
        if storage is not None and data_uri is None and ctx is not None:  # the job's driver reads the run's copy
            ctx.params["data_uri"] = storage.publish_processed(processed)
        _submit(ctx, p, stage, out)
        return
    if local:
        from components.train import run_local
        from xct_core.training import summary_line

        res = run_local(p, stage, processed, out, steps=steps, fresh=fresh, device=device)
        typer.echo(summary_line(res))
        return
    from components.train import run_train

    s = run_train(p, stage, data_uri or processed, out, steps=steps, fresh=fresh,
                  log=lambda m: typer.echo(printable(m)), storage=storage)
    best = s.metrics.get("best_value")
    metric = s.metrics.get("best_metric", "")
    tail = f", best {metric} {best:.3f} at step {s.metrics.get('best_step')}" if isinstance(best, (int, float)) else ""
    where = f"{s.train_uri}/{s.final_model.as_posix()}" if s.train_uri else str(s.final_model)
    typer.echo(printable(f"{s.name}: step {s.final_step}{tail} → {where} (MLflow run {s.run_id})"))


#: options the job does not get as given: the params options and their aliases (the job gets the
#: effective params file instead) and ``--gates`` (decided here, before submitting)
_NOT_PASSED = ("params", "overlay", "set_", "workers", "gpu", "gates")


def _submit(ctx: typer.Context, ops: object, stage: int, out: Optional[Path]) -> None:
    """This invocation as a Ray job (components/ray_jobs.py): every option passes through."""
    from components.ray_jobs import cleared_params_text, passthrough_args, submit_train
    from xct_core.errors import ConfigError

    if ctx is None:
        raise ConfigError("pipeline.ray.address is set: submit through the `xct train` command (its options are "
                          "what the Ray job runs), or clear it (--set pipeline.ray.address=)")
    args = passthrough_args(ctx, _NOT_PASSED)
    if out is None:  # the params' out_dir, resolved here (the job's working directory is not ours)
        args += ["--out", str(Path(ops.train.out_dir).absolute())]  # type: ignore[attr-defined]
    cfg = ops.pipeline.ray  # type: ignore[attr-defined]
    submit_train(cfg.address, args, cleared_params_text(ops), command=cfg.command, timeout_s=cfg.timeout_s,
                 name=f"xct-train-stage{stage}", log=typer.echo)


def register(app: typer.Typer) -> None:
    """Add the top-level `train` command to the root app."""
    app.command("train", no_args_is_help=True)(train)
