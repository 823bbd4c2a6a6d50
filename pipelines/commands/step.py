"""`xct step …`: the pipeline steps, as dvc.yaml runs them (one CLI for every step).

Each command is a thin shell around the step's plain function in ``components/`` — the same
function the KFP components (components/kfp_components.py) call — so DVC,
``kfp.local`` and a Kubeflow cluster run one implementation. Errors are the CLI's usual
one line (``xct: error: <file>: <problem>``, non-zero exit).

``--gates DIR`` (evaluate, gate; ``xct train`` has it too): a stage-K step runs only when
``DIR/stage{K-1}.json`` passed; otherwise its declared outputs become skip markers and the
command exits 0 (components/guard.py).
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from pipelines.commands.params import OverlayOpt, ParamsOpt, SetOpt, alias_sets, command_params
from xct_core.config import Params
from xct_core.errors import printable


def _say(msg: str) -> None:
    """A step's one-line log message on stdout, control characters in file names escaped."""
    typer.echo(printable(msg))


app = typer.Typer(no_args_is_help=True, help="Pipeline steps (what dvc.yaml runs; components/*.py).")

GatesOpt = Annotated[Optional[Path], typer.Option("--gates", help="run only if the previous stage's gate in this folder "
                                                  "passed (else write skip markers)")]


def _params(path: Path | None, overlay: list[Path] | None = None, sets: list[str] | None = None) -> Params:
    return command_params(path, overlay, sets)


@app.command("ingest")
def ingest(
    raw: Annotated[Optional[Path], typer.Option("--raw", help="raw CT folder (default: params data.raw_dir)")] = None,
    out: Annotated[Path, typer.Option("--out", help="output folder")] = Path("data/interim"),
    params: ParamsOpt = None,
    overlay: OverlayOpt = None,
    set_: SetOpt = None,
) -> None:
    """Canonical volumes, the stats table and the patient split (volumes that fail to load are recorded)."""
    from components.ingest import run_ingest

    p = _params(params, overlay, set_)
    run_ingest(raw if raw is not None else Path(p.data.raw_dir), out, p, log=_say)


@app.command("validate")
def validate(
    interim: Annotated[Path, typer.Option("--interim", help="ingest output")] = Path("data/interim"),
    out: Annotated[Path, typer.Option("--out", help="output folder")] = Path("data/validated"),
    policy: Annotated[Optional[str], typer.Option("--policy", help="= --set validation.policy=fail|quarantine")] = None,
    params: ParamsOpt = None,
    overlay: OverlayOpt = None,
    set_: SetOpt = None,
) -> None:
    """The Great Expectations suite over the stats table; exit 1 when policy fail met failures."""
    from components.validate import run_validate
    from xct_core.errors import ConfigError

    if policy is not None and policy not in ("fail", "quarantine"):
        raise ConfigError(f"--policy must be fail or quarantine, got {policy!r}")
    p = _params(params, overlay, alias_sets(set_, **{"validation.policy": policy}))
    report = run_validate(interim, out, p, log=lambda m: print(printable(m), file=sys.stderr))
    if not report.success and report.policy == "fail":
        raise typer.Exit(1)


@app.command("preprocess")
def preprocess(
    volumes: Annotated[Path, typer.Option("--volumes", help="folder of canonical NIfTIs {id}.nii.gz")] = Path("data/interim/volumes"),
    splits: Annotated[Path, typer.Option("--splits", help="splits JSON")] = Path("data/validated/splits.json"),
    out: Annotated[Path, typer.Option("--out", help="output folder")] = Path("data/processed"),
    quarantine: Annotated[Optional[Path], typer.Option("--quarantine", help="optional JSON of quarantined ids")] = None,
    workers: Annotated[Optional[int], typer.Option("--workers", min=1, help="= --set preprocess.workers=N")] = None,
    progress: Annotated[bool, typer.Option("--progress/--no-progress", help="progress bar")] = True,
    params: ParamsOpt = None,
    overlay: OverlayOpt = None,
    set_: SetOpt = None,
) -> None:
    """Stage grids (int16 HU) and DRR pairs of every volume → the processed folder."""
    from components.preprocess import run_preprocess

    p = _params(params, overlay, alias_sets(set_, **{"preprocess.workers": workers}))
    run_preprocess(volumes, splits, out, p, quarantine, progress=progress, log=_say)


@app.command("evaluate")
def evaluate(
    stage: Annotated[int, typer.Option("--stage", "-k", help="cascade stage K (1-based)")],
    processed: Annotated[Path, typer.Option("--processed", help="preprocessed data folder")] = Path("data/processed"),
    train_dir: Annotated[Optional[Path], typer.Option("--train-dir", help="training folder (default: params train.out_dir)")] = None,
    out: Annotated[Optional[Path], typer.Option("--out", help="report folder (default: reports/eval/stageK)")] = None,
    split: Annotated[str, typer.Option("--split", help="test | val | train")] = "test",
    device: Annotated[str, typer.Option("--device", help="torch device")] = "cpu",
    gates: GatesOpt = None,
    params: ParamsOpt = None,
    overlay: OverlayOpt = None,
    set_: SetOpt = None,
) -> None:
    """Run the cascade 1 … K on the test split: metrics.json, per_patient.csv, montage.png."""
    from components.evaluate import run_evaluate, step_outputs
    from components.guard import proceed
    from xct_core.devices import parse_device
    from xct_core.errors import ConfigError
    from xct_core.layout import ReportLayout

    device = parse_device(device)
    if split not in ("test", "val", "train"):
        raise ConfigError(f"--split must be test, val or train, got {split!r}")
    p = _params(params, overlay, set_)
    p.stage(stage)
    out = out or ReportLayout().eval_dir(stage)
    if not proceed(gates, stage, step_outputs(out), log=_say):
        return
    run_evaluate(stage, processed, train_dir or Path(p.train.out_dir), out, p, split=split, device=device,
                 log=_say)


@app.command("gate")
def gate(
    stage: Annotated[int, typer.Option("--stage", "-k", help="cascade stage K (1-based)")],
    metrics: Annotated[Optional[Path], typer.Option("--metrics", help="metrics.json (default: reports/eval/stageK/metrics.json)")] = None,
    out: Annotated[Optional[Path], typer.Option("--out", help="gate report (default: reports/gates/stageK.json)")] = None,
    gates: GatesOpt = None,
    params: ParamsOpt = None,
    overlay: OverlayOpt = None,
    set_: SetOpt = None,
) -> None:
    """Judge stage K's metrics against gates.stageK; exit 0 whether it passes or not.

    Prints the one-line verdict (every check is in the report, and in the run summary)."""
    from components.gate import run_gate
    from components.guard import proceed
    from xct_core.layout import ReportLayout

    p = _params(params, overlay, set_)
    p.stage(stage)
    out = out or ReportLayout().gate(stage)
    if not proceed(gates, stage, [out], log=_say):
        return
    report = run_gate(stage, metrics or ReportLayout().eval_metrics(stage), out, p)
    typer.echo(report.summary())


@app.command("register")
def register_step(
    gates: Annotated[Path, typer.Option("--gates", help="gate reports folder (stageK.json)")] = Path("reports/gates"),
    eval_dir: Annotated[Path, typer.Option("--eval", help="evaluation folder (stageK/metrics.json)")] = Path("reports/eval"),
    train_dir: Annotated[Optional[Path], typer.Option("--train-dir", help="training folder (default: params train.out_dir)")] = None,
    processed: Annotated[Path, typer.Option("--processed", help="processed data (lineage hash)")] = Path("data/processed"),
    out: Annotated[Path, typer.Option("--out", help="summary file")] = Path("reports/summary.json"),
    params: ParamsOpt = None,
    overlay: OverlayOpt = None,
    set_: SetOpt = None,
) -> None:
    """Register the cascade when every gate passed; always write the run summary."""
    from components.register import run_register

    p = _params(params, overlay, set_)
    summary = run_register(gates, eval_dir, train_dir or Path(p.train.out_dir), out, p, processed_dir=processed,
                           log=_say)
    typer.echo(printable(f"register: {summary.get('status')} → {out}"))


def register(root: typer.Typer) -> None:
    """Add the `step` group to the root app."""
    root.add_typer(app, name="step", help="Pipeline steps (what dvc.yaml runs).")
