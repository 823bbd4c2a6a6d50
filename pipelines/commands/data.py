"""`xct data` command group: data sets (synthesise phantoms; validate, pull, push).

`xct data synth` is a contract scripts rely on::

    xct data synth --n N --size S --seed K --out DIR [--spacing-mm MM]

writes ``DIR/phantom_0000.nii.gz`` … (int16 HU, RAS+, volume centred at the world
origin), ``DIR/phantoms.json`` and ``DIR/preview.png``. Phantom ``i`` depends only on
(seed, i), so ``--n 3`` writes a prefix of ``--n 5``. Unset options come from
``params.yaml → data.synth``.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated, Optional

import typer
from pydantic import ValidationError
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from pipelines.commands.params import OverlayOpt, ParamsOpt, SetOpt, command_params
from xct_core.config import SynthParams
from xct_core.errors import ConfigError, printable

app = typer.Typer(no_args_is_help=True)





def synth_params(base: SynthParams, **overrides: object) -> SynthParams:
    """``base`` with the non-None ``overrides`` applied, validated; errors name the option."""
    given = {k: v for k, v in overrides.items() if v is not None}
    try:
        return SynthParams.model_validate({**base.model_dump(), **given})
    except ValidationError as e:
        err = e.errors()[0]
        field = str(err["loc"][0]) if err["loc"] else "?"
        where = f"--{field.replace('_', '-')}" if field in given else f"data.synth.{field}"
        got = f" (got {err['input']!r})" if "input" in err else ""
        raise ConfigError(f"{where}: {err['msg'].lower()}{got}") from None


def _opt(flag: str, help: str, *short: str) -> typer.models.OptionInfo:
    return typer.Option(flag, *short, help=help)


@app.command("synth")
def synth(
    n: Annotated[Optional[int], _opt("--n", "number of phantoms (default: params data.synth.n)")] = None,
    size: Annotated[Optional[int], _opt("--size", "grid size S, S³ voxels (default: data.synth.size)")] = None,
    seed: Annotated[Optional[int], _opt("--seed", "data-set seed >= 0 (default: data.synth.seed)")] = None,
    out: Annotated[Optional[Path], _opt("--out", "output directory (default: data.raw_dir)", "-o")] = None,
    spacing_mm: Annotated[
        Optional[float], _opt("--spacing-mm", "isotropic voxel size in mm (default: data.synth.spacing_mm)")
    ] = None,
    contrast_fraction: Annotated[
        Optional[float], _opt("--contrast-fraction", "IV-contrast fraction (default: data.synth.contrast_fraction)")
    ] = None,
    noise_hu: Annotated[Optional[float], _opt("--noise-hu", "noise std in HU (default: data.synth.noise_hu)")] = None,
    preview: Annotated[bool, typer.Option("--preview/--no-preview", help="write DIR/preview.png")] = True,
    params: ParamsOpt = None,
    overlay: OverlayOpt = None,
    set_: SetOpt = None,
) -> None:
    """Write N procedural torso phantoms (NIfTI, HU, RAS+) plus preview.png and phantoms.json."""
    from xct_core.phantoms import stale_phantoms, write_phantoms

    p = command_params(params, overlay, set_)
    sp = synth_params(
        p.data.synth,
        n=n,
        size=size,
        seed=seed,
        spacing_mm=spacing_mm,
        contrast_fraction=contrast_fraction,
        noise_hu=noise_hu,
    )
    out_dir = out if out is not None else Path(p.data.raw_dir)
    drr = {
        "kind": p.drr.geometry,
        "pixels": p.drr.pixels,
        "pixel_mm": p.drr.pixel_mm,
        "sdd": p.drr.sdd,
        "sod": p.drr.sod,
    }
    t0 = time.perf_counter()
    console = Console(stderr=True)
    with Progress(
        TextColumn("synthesising phantoms"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=console,
        transient=True,
        disable=not console.is_terminal,
    ) as bar:
        task = bar.add_task("synth", total=sp.n)
        paths = write_phantoms(
            out_dir,
            sp,
            preview=preview,
            drr=drr,
            mu_water=p.hu.mu_water,
            on_progress=lambda done, total: bar.update(task, completed=done),
        )
    dt = time.perf_counter() - t0
    stale = stale_phantoms(out_dir, sp.n)
    if stale:
        names = ", ".join(p.name for p in stale[:3]) + (", …" if len(stale) > 3 else "")
        typer.echo(printable(f"note: {out_dir} also holds {len(stale)} phantom file(s) not from this run ({names})"), err=True)
    extra = f", preview: {out_dir / 'preview.png'}" if preview else ""
    typer.echo(printable(
        f"wrote {len(paths)} phantoms ({sp.size}³ @ {sp.spacing_mm:g} mm, seed {sp.seed}) "
        f"to {out_dir} in {dt:.1f} s{extra}"
    ))


# sub-commands implemented in their own modules: `xct data validate` (pipeline step 2) and
# `xct data pull|push` (S3 through boto3)
from pipelines.commands import data_s3, data_validate  # noqa: E402

data_validate.register(app)
data_s3.register(app)
