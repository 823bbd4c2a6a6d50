"""A phantom data set on disk: deterministic per (seed, index), NIfTI files, a manifest and
a preview picture (``xct data synth``)."""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from xct_core.atomic import write_text_atomic
from xct_core.config import SynthParams
from xct_core.errors import InputError
from xct_core.io import save_nifti
from xct_core.phantoms.labels import PHANTOM_VERSION, Label
from xct_core.phantoms.tissue import make_phantom

# ----------------------------------------------------------------------------- data set


def phantom_rng(seed: int, index: int) -> np.random.Generator:
    """The random stream of phantom ``index`` in the data set of ``seed`` (depends on both only)."""
    if seed < 0 or index < 0:
        raise ValueError(f"seed and index must be >= 0, got seed={seed}, index={index}")
    return np.random.default_rng(np.random.SeedSequence([int(seed), int(index)]))


def phantom_name(index: int) -> str:
    """File name of phantom ``index`` in a synthesised data set."""
    return f"phantom_{index:04d}.nii.gz"


@dataclass(frozen=True)
class SynthPhantom:
    """A data-set phantom: volume, labels, affine and its IV-contrast flag."""

    index: int
    hu: np.ndarray
    labels: np.ndarray
    affine: np.ndarray
    contrast: bool


def synth_phantom(
    seed: int,
    index: int,
    size: int,
    spacing_mm: float,
    contrast_fraction: float = 0.5,
    noise_hu: float = 12.0,
    redraw: int | None = None,
) -> SynthPhantom:
    """Phantom ``index`` of the data set ``seed`` (``redraw``: a seed that re-draws its
    non-identifiable parts, :func:`xct_core.phantoms.make_phantom`; ``None`` = as written).

    The contrast draw is always taken first from the phantom's stream, so the anatomy of
    phantom ``index`` does not depend on ``contrast_fraction`` or on the other phantoms.
    """
    if not 0.0 <= contrast_fraction <= 1.0:
        raise ValueError(f"contrast_fraction must be in [0, 1], got {contrast_fraction}")
    rng = phantom_rng(seed, index)
    contrast = bool(rng.random() < contrast_fraction)
    hu, labels, affine = make_phantom(size, spacing_mm, rng, contrast=contrast, noise_hu=noise_hu, redraw=redraw)
    return SynthPhantom(index, hu, labels, affine, contrast)


# ----------------------------------------------------------------------------- writing a data set

#: name of the data-set manifest written next to the phantoms
MANIFEST_NAME = "phantoms.json"
PREVIEW_NAME = "preview.png"


def _prepare_out_dir(out_dir: Path) -> Path:
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise InputError(out_dir, "exists and is not a directory")
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise InputError(out_dir, f"cannot create the output directory ({e.strerror or e})") from None
    if not os.access(out_dir, os.W_OK | os.X_OK):
        raise InputError(out_dir, "output directory is not writable")
    return out_dir


def stale_phantoms(out_dir: str | Path, n: int) -> list[Path]:
    """Phantom files in ``out_dir`` that a data set of ``n`` phantoms did not write (an
    earlier, larger run); they are left alone but callers should say so."""
    keep = {phantom_name(i) for i in range(n)}
    return sorted(p for p in Path(out_dir).glob("phantom_*.nii.gz") if p.name not in keep)


def write_phantoms(
    out_dir: str | Path,
    synth: SynthParams,
    *,
    preview: bool = True,
    preview_count: int = 3,
    drr: Mapping[str, Any] | None = None,
    mu_water: float = 0.02,
    on_progress: Callable[[int, int], None] | None = None,
) -> list[Path]:
    """Write ``synth.n`` phantoms of data set ``synth.seed`` to ``out_dir``.

    Files: ``phantom_0000.nii.gz`` … (int16 HU, RAS+ affine centred at the origin, via
    :func:`xct_core.io.save_nifti`, atomic), ``phantoms.json`` (generator version,
    parameters, per-file contrast flag) and, with ``preview``, ``preview.png`` (the first
    ``preview_count`` phantoms: slices in soft-tissue and lung windows + frontal/lateral
    DRRs; ``drr``: keyword arguments of :func:`xct_core.viz.drr_pair`).
    ``on_progress(done, total)`` is called after each phantom. Returns the NIfTI paths.
    Raises :class:`InputError` when ``out_dir`` cannot be used.
    """
    out = _prepare_out_dir(Path(out_dir))
    paths: list[Path] = []
    shown: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    entries = []
    for i in range(synth.n):
        ph = synth_phantom(synth.seed, i, synth.size, synth.spacing_mm, synth.contrast_fraction, synth.noise_hu)
        path = out / phantom_name(i)
        try:
            save_nifti(path, ph.hu, ph.affine)
        except OSError as e:
            raise InputError(path, f"cannot write ({e.strerror or e})") from None
        paths.append(path)
        entries.append({"file": path.name, "index": i, "contrast": ph.contrast})
        if preview and len(shown) < preview_count:
            shown[f"{path.name} ({'contrast' if ph.contrast else 'no contrast'})"] = (ph.hu, ph.affine)
        if on_progress is not None:
            on_progress(i + 1, synth.n)
    manifest = {
        "generator": "xct_core.phantoms",
        "version": PHANTOM_VERSION,
        "params": synth.model_dump(mode="json"),
        "orientation": "RAS+",
        "units": "HU",
        "labels": {lab.name: int(lab) for lab in Label},
        "phantoms": entries,
    }
    write_text_atomic(out / MANIFEST_NAME, json.dumps(manifest, indent=2) + "\n")
    if preview and shown:
        from xct_core.viz import save_ct_preview

        title = (
            f"xct phantoms · seed {synth.seed} · {synth.size}³ @ {synth.spacing_mm:g} mm "
            "· rows: soft-tissue / lung window slices, frontal + lateral DRR"
        )
        try:
            save_ct_preview(shown, out / PREVIEW_NAME, drr=drr, mu_water=mu_water, title=title)
        except OSError as e:
            raise InputError(out / PREVIEW_NAME, f"cannot write ({e.strerror or e})") from None
    return paths
