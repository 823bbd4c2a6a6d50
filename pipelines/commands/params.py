"""`xct params`: show the effective typed parameters."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer
import yaml

from xct_core.config import load_params

app = typer.Typer(no_args_is_help=True)

ParamsOpt = Annotated[
    Optional[Path], typer.Option("--params", "-p", help="params file (default: $XCT_PARAMS or ./params.yaml)")
]
OverlayOpt = Annotated[
    Optional[list[Path]], typer.Option("--overlay", help="YAML fragment merged over the params file (repeatable)")
]


@app.command("show")
def show(params: ParamsOpt = None, overlay: OverlayOpt = None) -> None:
    """Print the effective parameters (defaults filled in) as YAML, with their digest."""
    p = load_params(params, overlay)
    typer.echo(yaml.safe_dump(p.model_dump(mode="json"), sort_keys=False).rstrip())
    typer.echo(f"# digest: {p.digest()}")
