"""`xct hpo --stage K --trials N [--study NAME]`: Optuna search of one stage on Ray Tune.

Trials are short stage-K trainings pruned on their intermediate validation metric; the
study lives in ``hpo.storage`` (sqlite by default; ``--storage`` / ``$XCT_HPO_STORAGE`` for a
PostgreSQL URL on a cluster) and resumes when re-run: ``--trials N`` is the total number of
finished trials wanted. Results in ``hpo.out_dir``: ``best_stageK.yaml`` (picked up by
params.yaml ``overlays`` and `dvc repro`), ``stageK_history.png``, ``stageK_importance.png``,
``stageK_trials.csv``. See components/hpo.py.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from pipelines.commands.params import OverlayOpt, ParamsOpt, SetOpt, command_params


def hpo(
    stage: Annotated[int, typer.Option("--stage", "-k", help="1-based cascade stage to tune")],
    trials: Annotated[int, typer.Option("--trials", "-n", min=1, help="total finished trials the study should have")],
    study: Annotated[Optional[str], typer.Option("--study", help="study name (default: hpo.study_prefix-stageK)")] = None,
    processed: Annotated[Path, typer.Option("--processed", help="preprocessed data folder")] = Path("data/processed"),
    params: ParamsOpt = None,
    overlay: OverlayOpt = None,
    set_: SetOpt = None,
    storage: Annotated[Optional[str], typer.Option("--storage", envvar="XCT_HPO_STORAGE", show_envvar=True,
                                                   help="Optuna storage URL (default: hpo.storage)")] = None,
    out: Annotated[Optional[Path], typer.Option("--out", help="output folder (default: hpo.out_dir)")] = None,
    train_dir: Annotated[Optional[Path], typer.Option("--train-dir", help="trained earlier stages, for K > 1 (default: train.out_dir)")] = None,
) -> None:
    """Search stage K's hyperparameters (Optuna TPE on Ray Tune, pruned on validation)."""
    from components.ops_params import OpsParams

    p = command_params(params, overlay, set_, schema=OpsParams)
    from components.hpo import run_hpo
    from xct_core.training import TrainingFailed

    s = run_hpo(p, stage, trials, processed, study=study, storage=storage, out_dir=out, train_dir=train_dir,
                log=typer.echo)
    counts = f"{s.complete} complete, {s.pruned} pruned, {s.failed} failed; ran {s.ran} now"
    if s.best_value is None:
        raise TrainingFailed(f"study {s.study}: no completed trial ({counts}); no best parameters written "
                             f"(MLflow run {s.run_id})")
    typer.echo(f"study {s.study}: {counts}; best trial {s.best_number}: {s.metric} {s.best_value:.4f}")
    typer.echo(f"best params → {s.fragment}; plots → {s.history_png}, {s.importance_png} (MLflow run {s.run_id})")


def register(app: typer.Typer) -> None:
    """Add the top-level `hpo` command to the root app."""
    app.command("hpo", no_args_is_help=True)(hpo)
