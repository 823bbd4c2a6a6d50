"""`xct drr`: render a digitally reconstructed radiograph (DRR) from a CT.

Writes ``OUT.npy`` (float32 ``[pixels, pixels]``; line integral by default) and
``OUT.json`` (the placed geometry in world mm, physics constants and the CT's identity:
everything needed to re-render or back-project), optionally a PNG preview. Defaults come
from ``params.yaml → drr`` / ``hu.mu_water``; every write is atomic.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import IO, Annotated, Any, Optional

import numpy as np
import typer
from pydantic import ValidationError

import xct_core
from pipelines.commands.params import OverlayOpt, ParamsOpt, SetOpt, command_params
from xct_core.config import DRRParams
from xct_core.drr import display_image, joseph_applies, render
from xct_core.atomic import atomic_path, check_writable, writable
from xct_core.errors import ConfigError, printable
from xct_core.geometry import KINDS, VIEWS, ProjectionGeometry
from xct_core.io import load_ct, orientation_codes
from xct_core.stats import file_sha256

QUANTITY_NAMES = {"line-integral": "line_integral", "intensity": "intensity"}
_OPTION_OF = {"geometry": "--geometry", "pixels": "--pixels", "pixel_mm": "--pixel-mm", "sdd": "--sdd", "sod": "--sod"}




def _choice(value: str, allowed: tuple[str, ...], option: str) -> str:
    if value not in allowed:
        raise ConfigError(f"{option} must be one of {', '.join(allowed)}, got {value!r}")
    return value


def _drr_params(base: DRRParams, overrides: dict[str, Any]) -> DRRParams:
    """``base`` with command-line overrides, validated like params.yaml."""
    data = base.model_dump() | {k: v for k, v in overrides.items() if v is not None}
    try:
        return DRRParams.model_validate(data)
    except ValidationError as e:
        first = e.errors()[0]
        field = str(first["loc"][0]) if first["loc"] else ""
        raise ConfigError(f"invalid {_OPTION_OF.get(field, field)}: {first['msg']}") from None


def _atomic_write(path: Path, write: Callable[[IO[bytes]], None]) -> None:
    """``write(f)`` into a temp sibling of ``path``, then rename it over ``path``
    (:func:`xct_core.atomic.atomic_path`; unwritable targets are one-line errors)."""
    with atomic_path(path) as tmp, writable(path), open(tmp, "wb") as f:
        write(f)


def _sha256(path: Path) -> str | None:
    if not path.is_file():
        return None  # a DICOM directory: identified by shape + affine
    return file_sha256(path)


def save_png(path: Path, img8: np.ndarray) -> None:
    """Atomically save a uint8 grayscale image as PNG."""
    from PIL import Image

    _atomic_write(path, lambda f: Image.fromarray(img8, mode="L").save(f, format="PNG"))


def drr(
    ct: Annotated[Path, typer.Argument(help="CT: .nii/.nii.gz, a DICOM series directory or one DICOM file")],
    view: Annotated[str, typer.Option("--view", help="frontal (beam A→P) | lateral (beam L→R)")],
    out: Annotated[Path, typer.Option("--out", "-o", help="output .npy (geometry goes to the same name .json)")],
    geometry: Annotated[Optional[str], typer.Option("--geometry", help="parallel | cone (default: params drr.geometry)")] = None,
    pixels: Annotated[Optional[int], typer.Option("--pixels", help="detector size, square (default: params drr.pixels)")] = None,
    pixel_mm: Annotated[Optional[float], typer.Option("--pixel-mm", help="detector pitch, mm (default: params drr.pixel_mm)")] = None,
    sdd: Annotated[Optional[float], typer.Option("--sdd", help="source-to-detector, mm (default: params drr.sdd)")] = None,
    sod: Annotated[Optional[float], typer.Option("--sod", help="source-to-isocentre, mm (default: params drr.sod)")] = None,
    quantity: Annotated[str, typer.Option("--quantity", help="line-integral | intensity")] = "line-integral",
    png: Annotated[Optional[Path], typer.Option("--png", help="also save a viewable PNG preview")] = None,
    method: Annotated[Optional[str], typer.Option("--method", help="auto | joseph | reference (default: params drr.method)")] = None,
    params: ParamsOpt = None,
    overlay: OverlayOpt = None,
    set_: SetOpt = None,
) -> None:
    """Render a DRR (Beer-Lambert line integral or intensity) of a CT.

    Image convention: row 0 = superior; frontal shows the patient's right on the left columns (PA display), lateral shows anterior on the left columns.
    """
    _choice(view, VIEWS, "--view")
    if geometry is not None:
        _choice(geometry, KINDS, "--geometry")
    q = QUANTITY_NAMES.get(quantity)
    if q is None:
        raise ConfigError(f"--quantity must be one of {', '.join(QUANTITY_NAMES)}, got {quantity!r}")
    if method is not None:
        _choice(method, ("auto", "joseph", "reference"), "--method")
    if out.suffix != ".npy":
        raise ConfigError(f"--out must name a .npy file, got {str(out)!r}")
    if png is not None and png.suffix.lower() != ".png":
        raise ConfigError(f"--png must name a .png file, got {str(png)!r}")

    for target in (out, out.with_suffix(".json"), *([png] if png is not None else [])):
        check_writable(target)  # before the CT is loaded and rendered
    p = command_params(params, overlay, set_)
    dp = _drr_params(p.drr, {"geometry": geometry, "pixels": pixels, "pixel_mm": pixel_mm, "sdd": sdd, "sod": sod})
    meth = method or dp.method
    geom = ProjectionGeometry.from_params(dp, view)  # type: ignore[arg-type]
    vol = load_ct(ct, p.data.ct, limits=p.limits)
    placed = geom.place(vol.affine, vol.shape)
    used = "reference" if meth == "reference" or not joseph_applies(vol.affine, placed, vol.shape) else "joseph"
    if meth == "joseph" and used != "joseph":
        raise ConfigError(f"{ct}: --method joseph needs an axis-aligned affine; use auto or reference")
    img = render(
        vol.hu, vol.affine, placed, mu_water=p.hu.mu_water, quantity=q, i0=dp.i0, method=used, step_fraction=dp.step_fraction  # type: ignore[arg-type]
    )
    arr = np.ascontiguousarray(img.detach().cpu().numpy(), dtype=np.float32)

    meta = {
        "format": "xct-drr/1",
        **placed.to_json(),
        "quantity": q,
        "units": "dimensionless line integral of mu (1/mm) over mm" if q == "line_integral" else "intensity, I0 * exp(-line integral)",
        "mu_water": p.hu.mu_water,
        "i0": dp.i0,
        "method": used,
        "step_fraction": dp.step_fraction,
        "array": {"file": out.name, "shape": list(arr.shape), "dtype": "float32", "min": float(arr.min()), "max": float(arr.max())},
        "ct": {
            "path": str(ct.resolve()),
            "sha256": _sha256(ct),
            "shape": list(vol.shape),
            "affine": np.asarray(vol.affine, dtype=np.float64).tolist(),
            "spacing_mm": [float(s) for s in vol.spacing],
            "orientation": "".join(orientation_codes(vol.affine)),
        },
        "params_digest": p.digest(),
        "xct_version": xct_core.__version__,
    }
    json_path = out.with_suffix(".json")
    _atomic_write(out, lambda f: np.save(f, arr))
    _atomic_write(json_path, lambda f: f.write((json.dumps(meta, indent=2) + "\n").encode()))
    extra = ""
    if png is not None:
        save_png(png, display_image(arr, q))
        extra = f" + {png}"
    typer.echo(printable(
        f"wrote {out} ({arr.shape[0]}x{arr.shape[1]} float32 {q}, {view} {dp.geometry}, {used}) + {json_path}{extra}"
    ))


def register(app: typer.Typer) -> None:
    """Add the top-level `drr` command to the root app."""
    app.command("drr", no_args_is_help=True)(drr)
