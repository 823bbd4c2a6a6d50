"""`xct ct` command group: inspect and convert CT volumes (NIfTI, DICOM series).

Both commands load through :func:`xct_core.io.load_ct` (canonical RAS+, HU, sanity checks
from ``params.yaml → data.ct``, header size limits from ``params.yaml → limits``); bad input
surfaces as a one-line error from the CLI root.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Optional

import numpy as np
import typer

from xct_core.atomic import check_writable
from pipelines.commands.params import OverlayOpt, SetOpt, command_params
from xct_core.config import Params
from xct_core.errors import InputError, printable
from xct_core.io import CTVolume, load_ct, orientation_codes, save_ct

app = typer.Typer(no_args_is_help=True)

ParamsOpt = Annotated[
    Optional[Path],
    typer.Option(
        "--params",
        "-p",
        help="params file for the data.ct checks and limits (default: $XCT_PARAMS or ./params.yaml if present)",
    ),
]
SrcArg = Annotated[Path, typer.Argument(help="a .nii/.nii.gz file, a DICOM series directory or one DICOM file")]

PERCENTILES = (1, 5, 50, 95, 99)


def _load(path: Path, params: Path | None, overlay: list[Path] | None = None, sets: list[str] | None = None) -> CTVolume:
    """``path`` loaded with the data.ct checks and the limits of the command's params
    (--params, else ``$XCT_PARAMS`` / ./params.yaml, else the built-in defaults = params.yaml)."""
    p: Params = command_params(params, overlay, sets)
    return load_ct(path, p.data.ct, limits=p.limits)


def describe(vol: CTVolume) -> dict:
    """Summary of a loaded volume (what `xct ct info` prints): JSON-serialisable."""
    hu = vol.hu
    pct = np.percentile(hu, PERCENTILES)
    return {
        "source": vol.source,
        "format": vol.meta.get("format", ""),
        "shape": list(vol.shape),
        "spacing_mm": [float(s) for s in vol.spacing],
        "source_orientation": "".join(vol.meta.get("source_orientation", ())),
        "orientation": "".join(orientation_codes(vol.affine)),
        "hu": {
            "min": float(hu.min()),
            "max": float(hu.max()),
            "mean": float(hu.mean(dtype=np.float64)),
            **{f"p{q}": float(v) for q, v in zip(PERCENTILES, pct)},
        },
        "affine": np.asarray(vol.affine, dtype=np.float64).tolist(),
        **({"n_slices": vol.meta["n_slices"]} if "n_slices" in vol.meta else {}),
    }


@app.command("info")
def info(
    path: SrcArg,
    params: ParamsOpt = None,
    overlay: OverlayOpt = None,
    set_: SetOpt = None,
    as_json: Annotated[bool, typer.Option("--json", help="print one JSON object instead of text")] = False,
) -> None:
    """Print shape, spacing, orientation, HU statistics and affine of a CT (after canonicalisation)."""
    d = describe(_load(path, params, overlay, set_))
    if as_json:
        typer.echo(json.dumps(d))
        return
    src = d["format"] + (f", {d['n_slices']} slices" if "n_slices" in d else "")
    typer.echo(printable(f"source:       {d['source']} ({src})"))
    typer.echo(f"shape:        {' x '.join(str(s) for s in d['shape'])} (canonical {d['orientation']}+)")
    typer.echo(f"spacing_mm:   {' x '.join(f'{s:.4g}' for s in d['spacing_mm'])}")
    typer.echo(f"orientation:  source {d['source_orientation']} → {d['orientation']}")
    h = d["hu"]
    stats = "  ".join(f"{k} {h[k]:.1f}" for k in ("min", *(f"p{q}" for q in PERCENTILES), "max", "mean"))
    typer.echo(f"HU:           {stats}")
    typer.echo("affine (voxel → world mm, RAS+):")
    for row in d["affine"]:
        typer.echo("  " + " ".join(f"{v:11.5f}" for v in row))


@app.command("convert")
def convert(
    src: SrcArg,
    out: Annotated[Path, typer.Argument(help="output NIfTI (.nii or .nii.gz)")],
    params: ParamsOpt = None,
    overlay: OverlayOpt = None,
    set_: SetOpt = None,
) -> None:
    """Convert a DICOM series or NIfTI to a canonical RAS+ int16 HU NIfTI (written atomically)."""
    if not out.name.lower().endswith((".nii", ".nii.gz")):
        raise InputError(out, "output must be a NIfTI file ending in .nii or .nii.gz")
    check_writable(out)
    vol = _load(src, params, overlay, set_)
    save_ct(out, vol)
    sp = " x ".join(f"{s:.4g}" for s in vol.spacing)
    typer.echo(printable(f"wrote {out}: {' x '.join(map(str, vol.shape))} voxels, {sp} mm, RAS+ int16 HU"))
