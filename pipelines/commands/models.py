"""`xct models`: the MLflow model registry of the cascade (``registry.model_name``).

``xct models list`` prints every version with its aliases and key metrics;
``xct models show VERSION [--json]`` prints the version's model card (logged at registration:
intended use, data, protocol, metrics with intervals, gates, X-ray geometry, lineage);
``xct models show [--reports DIR]`` without a version prints the card the last pipeline run
wrote beside its summary (``reports/model_card.md``; also for a rejected, unregistered run);
``xct models promote VERSION [--alias champion]`` points an alias at a version (a manual
override of the pipeline's automatic champion/candidate decision). Tracking:
``$MLFLOW_TRACKING_URI`` or ``sqlite:///<repo>/mlflow.db``.

``list`` and ``show`` are read-only: when the tracking store does not exist yet (no
``mlflow.db``, no ``file:`` folder) ``list`` says so in one line and exits 0, without
creating it; ``show VERSION`` and ``promote`` then fail with one line (exit 2), as they do
for an unknown version. A registry that cannot answer (server down, black-holed, failing) is
never "no versions" nor "no such version": one line naming the server and why, exit 1, within
``registry.request_timeout_s`` × (1 + ``registry.request_max_retries``) per request
(:class:`components.tracking.RegistryError`).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Annotated, Optional

import typer

from pipelines.commands.params import OverlayOpt, ParamsOpt, SetOpt, command_params

app = typer.Typer(no_args_is_help=True)




@app.command("list")
def list_cmd(params: ParamsOpt = None, overlay: OverlayOpt = None, set_: SetOpt = None) -> None:
    """List the registered versions: aliases, last-stage test PSNR (window), lineage."""
    from components.register import list_versions
    from components.tracking import store_exists, tracking_uri
    from xct_core.redact import redact_url

    p = command_params(params, overlay, set_)
    name = p.registry.model_name
    shown = redact_url(tracking_uri())  # http://user:***@host: the password is never printed
    if not store_exists(tracking_uri()):
        typer.echo(f"no model registry at {shown} yet: no versions of {name} (nothing registered)")
        return
    rows = list_versions(p)
    if not rows:
        typer.echo(f"no versions of {name} at {shown}")
        return
    typer.echo(f"{name} at {shown}")
    typer.echo(f"{'version':>7}  {'aliases':<20} {'psnr_window_db':>14}  {'stages':>6}  {'test_ids':<16}  git")
    for r in rows:
        psnr = r["psnr_window_db"]
        ps = f"{psnr:.3f}" if isinstance(psnr, float) and math.isfinite(psnr) else "—"
        typer.echo(f"{r['version']:>7}  {','.join(r['aliases']) or '-':<20} {ps:>14}  {r['stages'] or '-':>6}  "
                   f"{r['test_ids_hash'] or '-':<16}  {(r['git_commit'] or '-')[:10]}")


@app.command("show")
def show_cmd(
    version: Annotated[Optional[str], typer.Argument(help="model version number (omit: the last run's local card)")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="print the card's JSON instead of its Markdown")] = False,
    reports: Annotated[Path, typer.Option("--reports", help="reports folder of the local card (no VERSION)")] = Path("reports"),
    params: ParamsOpt = None,
    overlay: OverlayOpt = None,
    set_: SetOpt = None,
) -> None:
    """Print the model card of VERSION (or, without VERSION, of the last pipeline run)."""
    if version is None:
        from xct_core.jsondoc import json_text, read_json_doc
        from xct_core.layout import ReportLayout

        lay = ReportLayout(reports)
        hint = "run the pipeline's register step first (make demo / dvc repro)"
        if as_json:
            typer.echo(json_text(read_json_doc(lay.model_card_json, "model card", missing_hint=hint)), nl=False)
            return
        if not lay.model_card_md.is_file():
            from xct_core.errors import InputError

            raise InputError(lay.model_card_md, f"model card not found ({hint})")
        typer.echo(lay.model_card_md.read_text(encoding="utf-8"), nl=False)
        return
    from components.register import show_card

    typer.echo(show_card(version, command_params(params, overlay, set_), as_json=as_json), nl=False)


@app.command("promote")
def promote_cmd(
    version: Annotated[str, typer.Argument(help="model version number")],
    alias: Annotated[str, typer.Option("--alias", help="alias to set")] = "champion",
    params: ParamsOpt = None,
    overlay: OverlayOpt = None,
    set_: SetOpt = None,
) -> None:
    """Point ALIAS (default: champion) at VERSION."""
    from components.register import promote

    out = promote(version, alias, command_params(params, overlay, set_))
    typer.echo(f"{out['name']} v{out['version']} is now @{out['alias']} ({out['model_uri']})")


def register(app_root: typer.Typer) -> None:
    """Add the `models` group to the root app."""
    app_root.add_typer(app, name="models", help="Registered cascade models (MLflow): list, show, promote.")
