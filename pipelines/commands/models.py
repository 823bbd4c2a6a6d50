"""`xct models`: the MLflow model registry of the cascade (``registry.model_name``).

``xct models list`` prints every version with its aliases and key metrics;
``xct models promote VERSION [--alias champion]`` points an alias at a version (a manual
override of the pipeline's automatic champion/candidate decision). Tracking:
``$MLFLOW_TRACKING_URI`` or ``sqlite:///<repo>/mlflow.db``.

``list`` is read-only: when the tracking store does not exist yet (no ``mlflow.db``, no
``file:`` folder) it says so in one line and exits 0, without creating it; ``promote`` then
fails with one line (exit 2).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Annotated, Optional

import typer

from xct_core.config import resolve_params

app = typer.Typer(no_args_is_help=True)

ParamsOpt = Annotated[
    Optional[Path], typer.Option("--params", "-p", help="params file (default: $XCT_PARAMS or ./params.yaml)")
]




@app.command("list")
def list_cmd(params: ParamsOpt = None) -> None:
    """List the registered versions: aliases, last-stage test PSNR (window), lineage."""
    from components.register import list_versions
    from components.tracking import store_exists, tracking_uri

    p = resolve_params(params)
    name = p.registry.model_name
    if not store_exists(tracking_uri()):
        typer.echo(f"no model registry at {tracking_uri()} yet: no versions of {name} (nothing registered)")
        return
    rows = list_versions(p)
    if not rows:
        typer.echo(f"no versions of {name} at {tracking_uri()}")
        return
    typer.echo(f"{name} at {tracking_uri()}")
    typer.echo(f"{'version':>7}  {'aliases':<20} {'psnr_window_db':>14}  {'stages':>6}  {'test_ids':<16}  git")
    for r in rows:
        psnr = r["psnr_window_db"]
        ps = f"{psnr:.3f}" if isinstance(psnr, float) and math.isfinite(psnr) else "—"
        typer.echo(f"{r['version']:>7}  {','.join(r['aliases']) or '-':<20} {ps:>14}  {r['stages'] or '-':>6}  "
                   f"{r['test_ids_hash'] or '-':<16}  {(r['git_commit'] or '-')[:10]}")


@app.command("promote")
def promote_cmd(
    version: Annotated[str, typer.Argument(help="model version number")],
    alias: Annotated[str, typer.Option("--alias", help="alias to set")] = "champion",
    params: ParamsOpt = None,
) -> None:
    """Point ALIAS (default: champion) at VERSION."""
    from components.register import promote

    out = promote(version, alias, resolve_params(params))
    typer.echo(f"{out['name']} v{out['version']} is now @{out['alias']} ({out['model_uri']})")


def register(app_root: typer.Typer) -> None:
    """Add the `models` group to the root app."""
    app_root.add_typer(app, name="models", help="Registered cascade models (MLflow): list, promote.")
