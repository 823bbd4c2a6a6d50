"""`xct params show`, and the params options every command shares.

Every command that reads params takes the same three options, resolved by one function
(:func:`command_params`):

* ``--params/-p FILE`` (default ``$XCT_PARAMS``, else ./params.yaml; a command that finds
  neither uses the built-in defaults, which are params.yaml's values — tests/test_one_source.py);
* ``--overlay FILE`` (repeatable): a YAML fragment deep-merged over it (e.g. params.production.yaml);
* ``--set KEY=VALUE`` (repeatable, applied last): one value by dotted key, parsed as YAML
  (``--set train.ray.num_workers=2 --set eval.samples='{stage1: 4}'``). Per-value flags that
  predate it (``xct train --workers/--gpu``, ``xct step validate --policy``, ``xct step
  preprocess --workers``) are aliases that become ``--set`` items.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Optional

import typer
import yaml

app = typer.Typer(no_args_is_help=True)

ParamsOpt = Annotated[
    Optional[Path],
    typer.Option("--params", "-p", help="params file (default: $XCT_PARAMS, else ./params.yaml, else the built-in "
                                        "defaults = the repo's params.yaml)"),
]
OverlayOpt = Annotated[
    Optional[list[Path]], typer.Option("--overlay", help="YAML fragment merged over the params file (repeatable)")
]
SetOpt = Annotated[
    Optional[list[str]],
    typer.Option("--set", metavar="KEY=VALUE",
                 help="set one params value: dotted key, YAML value, e.g. train.ray.num_workers=2 (repeatable, applied last)"),
]


def alias_sets(sets: list[str] | None, **aliases: Any) -> list[str]:
    """``sets`` plus one ``KEY=VALUE`` item per alias flag that was given (``None``: not given);
    ``aliases`` maps a dotted params key to the flag's value (``train__ray__num_workers`` style
    is avoided: pass ``{"train.ray.num_workers": workers}`` as ``**{...}``)."""
    extra = [f"{k}={yaml.safe_dump(v, default_flow_style=True).strip().removesuffix('...').strip()}"
             for k, v in aliases.items() if v is not None]
    return [*extra, *(sets or [])]


def command_params(path: Path | None, overlay: list[Path] | None = None, sets: list[str] | None = None,
                   *, schema: type | None = None) -> Any:
    """The params a command runs with: ``path`` (or ``$XCT_PARAMS`` / ./params.yaml / the
    built-in defaults), its overlays, ``overlay`` and ``sets`` merged, validated by ``schema``
    (default: the science's :class:`xct_core.config.Params`; commands that read an operational
    section pass ``components.ops_params.OpsParams``)."""
    from xct_core.config import resolve_params

    return resolve_params(path, overlay, sets, schema=schema)


@app.command("show")
def show(params: ParamsOpt = None, overlay: OverlayOpt = None, set_: SetOpt = None) -> None:
    """Print the effective parameters (every section, defaults filled in) as YAML, with their digest."""
    from components.ops_params import OpsParams

    p = command_params(params, overlay, set_, schema=OpsParams)
    typer.echo(yaml.safe_dump(p.model_dump(mode="json"), sort_keys=False).rstrip())
    typer.echo(f"# digest: {p.digest()}")
