"""`xct train --stage K`: train one cascade stage (Ray Train + MLflow; see components/train.py).

Re-running the same command after an interruption resumes from the last checkpoint;
``--fresh`` starts over. ``RAY_ADDRESS`` joins an existing Ray cluster; ``MLFLOW_TRACKING_URI``
overrides the embedded sqlite tracking store. ``--local`` runs the loop in this process
without Ray or MLflow (what a bare GPU box with only torch runs). ``--gates DIR`` (dvc.yaml)
runs stage K only when ``DIR/stage{K-1}.json`` passed; otherwise its outputs become skip
markers (components/guard.py) and the command exits 0.

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
    processed: Annotated[Path, typer.Option("--processed", help="preprocessed data folder")] = Path("data/processed"),
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
    ctx: typer.Context = None,  # type: ignore[assignment]  (typer injects it; None: called as a function)
) -> None:
    """Train cascade stage K from the preprocessed shards; resumes an interrupted run."""
    from components.guard import proceed
    from xct_core.devices import parse_device
    from xct_core.layout import RunLayout

    from components.ray_params import RayParams

    device = parse_device(device)  # a one-line error before anything is loaded
    p = command_params(params, overlay, alias_sets(set_, **{"train.ray.num_workers": workers, "train.ray.use_gpu": gpu}),
                       schema=RayParams)
    p.stage(stage)  # an unknown stage is a one-line error before anything else
    layout = RunLayout((out or Path(p.train.out_dir)), stage)
    if not proceed(gates, stage, list(layout.step_outputs()), log=lambda m: typer.echo(printable(m))):
        return
    if not local:
        from components.ops_params import OpsParams

        ops = command_params(params, overlay, alias_sets(set_, **{"train.ray.num_workers": workers,
                                                                  "train.ray.use_gpu": gpu}), schema=OpsParams)
        if ops.pipeline.ray.address:
            _submit(ctx, ops, stage, out)
            return
    if local:
        from components.train import run_local
        from xct_core.training import summary_line

        res = run_local(p, stage, processed, out, steps=steps, fresh=fresh, device=device)
        typer.echo(summary_line(res))
        return
    from components.train import run_train

    s = run_train(p, stage, processed, out, steps=steps, fresh=fresh, log=lambda m: typer.echo(printable(m)))
    best = s.metrics.get("best_value")
    metric = s.metrics.get("best_metric", "")
    tail = f", best {metric} {best:.3f} at step {s.metrics.get('best_step')}" if isinstance(best, (int, float)) else ""
    typer.echo(printable(f"{s.name}: step {s.final_step}{tail} → {s.final_model} (MLflow run {s.run_id})"))


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
