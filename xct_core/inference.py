"""Reconstruction for users: X-ray inputs → cascade → HU volume, uncertainty, reprojection QA.

Pure torch/numpy/pydicom/PIL (no MLflow: model URIs are resolved by
``components/model_uri.py``, which hands over local stage files + params).

Inputs (:func:`load_xray`; image conventions of docs/CONVENTIONS.md: row 0 superior;
frontal shows the patient's right on the left columns, lateral shows anterior on the left)
------------------------------------------------------------------------------------------
* ``.npy`` — written by ``xct drr``: float32 ``[P, P]`` line integrals (or intensities,
  converted with the JSON's ``i0``), with ``OUT.json`` beside it holding the placed
  geometry. The JSON is REQUIRED; its ``view`` must be the slot it is given for, and its
  detector (kind, pixels, pixel_mm, sdd, sod) and ``mu_water`` must equal the model's
  training geometry (``params.drr``, ``params.hu.mu_water``; relative tolerance 1e-3).
* ``.png`` — an 8- or 16-bit grayscale **intensity** image: ``I/I0 = value / full scale``
  (255 or 65535), clamped below at ``reconstruct.min_intensity_fraction``, then
  ``p = −ln(I/I0)``. The geometry is the model's training geometry (``params.drr``).
* DICOM radiograph (any other file with the DICM preamble) — the same mapping with full
  scale ``2**BitsStored − 1`` (MONOCHROME1 is inverted first); the pixel pitch is
  ``ImagerPixelSpacing`` (detector plane), else ``PixelSpacing``, and must equal
  ``drr.pixel_mm`` (1 % tolerance). Rows × columns must equal ``drr.pixels``. Stored
  values are used as they are (RescaleSlope/Intercept and PixelIntensityRelationship are
  not applied: a linear raw intensity is assumed). A cross-sectional modality (CT, MR, PT,
  NM, US — e.g. a CT slice) is rejected.

Every problem raises :class:`~xct_core.errors.InputError` naming the file.

Output grid
-----------
The last run stage's grid: ``S``³ isotropic voxels of ``fov_mm / S`` mm, centred at the
isocentre of the input geometry (``isocenter`` of the ``.npy`` JSONs — both views must
agree within 1 mm — or the world origin for PNG/DICOM inputs), axes RAS+ of that world
frame: ``affine = grid_affine((S,)*3, fov/S, isocenter)``. Values are HU: the window
inverse of the sampler's [−1, 1] output, so they saturate at the training window's ends
(``hu.window``; soft tissue [−200, 200] HU by default).

Sampling
--------
Sample ``i`` of ``K`` uses a ``torch.Generator`` seeded with ``seed + i`` and the shared
sampler (:func:`xct_core.cascade.sample_cascade`, DDIM with ``diffusion.eta``), so
``K = 1`` with seed ``s`` gives exactly what the registered pyfunc predicts for seed ``s``.
The output is the voxel-wise mean of the K samples (HU); the uncertainty is their voxel-wise
sample standard deviation (HU, ``ddof = 1``), computed with Welford's running update (no
K volumes held in memory).

Reprojection QA (:func:`reprojection_qa`)
-----------------------------------------
The output volume is rendered with the input geometry (line integrals,
:func:`xct_core.drr.render`) and compared with each input view: PSNR with
``data_range = max − min`` of the input view and 2D Gaussian SSIM (σ 1.5, 11 taps) —
:func:`xct_core.metrics.reprojection_psnr` / :func:`~xct_core.metrics.ssim2d`. A view
below ``reconstruct.qa_min_psnr_db`` or ``reconstruct.qa_min_ssim`` gets a warning.
Note: with a narrow training window the saturated air (e.g. −200 HU instead of −1000 HU)
adds attenuation, so absolute reprojection numbers are a relative quality signal.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from xct_core.config import Params
from xct_core.errors import ConfigError, InputError
from xct_core.geometry import VIEW_AXES, VIEWS, PlacedGeometry, ProjectionGeometry
from xct_core.io import CTVolume, grid_affine

__all__ = [
    "CaseResult",
    "Reconstruction",
    "XrayInput",
    "evaluate_ct",
    "evaluate_cts",
    "case_inputs",
    "input_geometries",
    "load_stages",
    "load_xray",
    "output_affine",
    "qa_warnings",
    "reconstruct",
    "render_views",
    "reprojection_qa",
    "sample_steps",
]

#: relative tolerance when comparing an input's geometry with the model's
GEOMETRY_RTOL = 1e-3
#: isocentres of the two views must agree within this (mm)
ISOCENTER_TOL_MM = 1.0
#: DICOM pixel spacing vs drr.pixel_mm, relative
DICOM_SPACING_RTOL = 0.01
#: DICOM modalities rejected as X-ray inputs (slices of a volume, not projections)
NON_RADIOGRAPH_MODALITIES = frozenset({"CT", "MR", "PT", "NM", "US"})


# --------------------------------------------------------------------------- inputs


@dataclass
class XrayInput:
    """One input view as the model sees it.

    ``image``: float32 ``[P, P]`` line integrals ∫mu dl (dimensionless), display order;
    ``geometry``: the placed geometry from the ``.npy``'s JSON (``None`` for PNG/DICOM: the
    model's training geometry applies); ``fmt``: ``npy`` | ``png`` | ``dicom``.
    """

    view: str
    image: np.ndarray
    geometry: PlacedGeometry | None
    source: str
    fmt: str
    notes: list[str] = field(default_factory=list)


def _close(a: float, b: float, rtol: float = GEOMETRY_RTOL) -> bool:
    return abs(float(a) - float(b)) <= rtol * max(abs(float(a)), abs(float(b)), 1e-12)


def _check_image(path: Path, img: np.ndarray, params: Params) -> np.ndarray:
    if img.ndim == 3 and img.shape[0] == 1:
        img = img[0]
    if img.ndim != 2:
        raise InputError(path, f"expected a 2D X-ray image, got shape {tuple(img.shape)}")
    p = int(params.drr.pixels)
    if img.shape != (p, p):
        raise InputError(
            path, f"image is {img.shape[0]}x{img.shape[1]} pixels, the model's detector is {p}x{p} (drr.pixels)"
        )
    bad = int(img.size - np.count_nonzero(np.isfinite(img)))
    if bad:
        n_nan = int(np.count_nonzero(np.isnan(img)))
        raise InputError(path, f"{bad} non-finite pixels ({n_nan} NaN, {bad - n_nan} Inf) of {img.size}")
    return np.ascontiguousarray(img, dtype=np.float32)


def _check_geometry(path: Path, meta: Mapping[str, Any], view: str, params: Params) -> PlacedGeometry:
    """The JSON's placed geometry, checked against the slot (``view``) and the model."""
    got_view = meta.get("view")
    if got_view != view:
        raise InputError(
            path, f"geometry JSON says view {got_view!r} but it was given as --{view} (swapped inputs?)"
        )
    try:
        pg = PlacedGeometry.from_json(dict(meta))
    except ConfigError as e:
        raise InputError(path, f"invalid geometry JSON ({e})") from None
    for name, want in (("beam", "beam"), ("u_axis", "u"), ("v_axis", "v")):
        if not np.allclose(getattr(pg, name), VIEW_AXES[view][want], atol=1e-6):
            raise InputError(path, f"geometry JSON {name} {list(getattr(pg, name))} is not the {view} view's "
                                   f"{list(VIEW_AXES[view][want])}")
    d = params.drr
    diffs = []
    if pg.kind != d.geometry:
        diffs.append(f"kind {pg.kind} vs {d.geometry}")
    if pg.pixels != d.pixels:
        diffs.append(f"pixels {pg.pixels} vs {d.pixels}")
    for name in ("pixel_mm", "sdd", "sod"):
        if pg.kind == "parallel" and name in ("sdd", "sod"):
            continue  # informational for parallel beam
        if not _close(getattr(pg, name), getattr(d, name)):
            diffs.append(f"{name} {getattr(pg, name):g} vs {getattr(d, name):g}")
    mu = meta.get("mu_water")
    if mu is not None and not _close(float(mu), params.hu.mu_water):
        diffs.append(f"mu_water {float(mu):g} vs {params.hu.mu_water:g}")
    if diffs:
        raise InputError(path, "geometry differs from the model's training geometry (input vs model): "
                               + ", ".join(diffs))
    return pg


def _load_npy(path: Path, view: str, params: Params) -> XrayInput:
    jpath = path.with_suffix(".json")
    if not jpath.is_file():
        raise InputError(path, f"missing geometry JSON {jpath.name} beside it (`xct drr` writes OUT.npy + OUT.json)")
    try:
        meta = json.loads(jpath.read_text())
    except (OSError, ValueError) as e:
        raise InputError(jpath, f"unreadable geometry JSON ({e})") from None
    if not isinstance(meta, dict):
        raise InputError(jpath, "geometry JSON must hold an object")
    pg = _check_geometry(jpath, meta, view, params)
    try:
        arr = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as e:
        raise InputError(path, f"unreadable .npy ({str(e).splitlines()[0][:200]})") from None
    if not np.issubdtype(arr.dtype, np.number):
        raise InputError(path, f"not a numeric image (dtype {arr.dtype})")
    img = _check_image(path, np.asarray(arr, dtype=np.float64), params)
    quantity = meta.get("quantity", "line_integral")
    notes = []
    if quantity == "intensity":
        i0 = float(meta.get("i0", 1.0))
        if np.any(img <= 0) or i0 <= 0:
            raise InputError(path, "intensity image with pixels <= 0: cannot take -ln(I/I0)")
        img = (-np.log(img / i0)).astype(np.float32)
        notes.append(f"intensity converted to line integrals: p = -ln(I / {i0:g})")
    elif quantity != "line_integral":
        raise InputError(jpath, f"unknown quantity {quantity!r} (line_integral | intensity)")
    return XrayInput(view, img, pg, str(path), "npy", notes)


def _intensity_to_line_integral(values: np.ndarray, full_scale: float, params: Params) -> np.ndarray:
    """``p = −ln(max(value / full_scale, min_intensity_fraction))`` (module docstring)."""
    frac = np.clip(values.astype(np.float64) / float(full_scale), params.reconstruct.min_intensity_fraction, None)
    return (-np.log(frac)).astype(np.float32)


def _load_png(path: Path, params: Params) -> tuple[np.ndarray, list[str]]:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            im.load()
            mode = im.mode
            arr = np.asarray(im)
    except (OSError, UnidentifiedImageError, ValueError) as e:
        raise InputError(path, f"unreadable PNG ({str(e).splitlines()[0][:200]})") from None
    if mode == "L":
        full = 255.0
    elif mode in ("I;16", "I;16B", "I;16L", "I"):
        full = 65535.0
    else:
        raise InputError(path, f"PNG mode {mode!r}: expected an 8- or 16-bit grayscale image (L, I;16)")
    img = _check_image(path, np.asarray(arr, dtype=np.float64), params)
    if img.max() > full:
        raise InputError(path, f"pixel values up to {img.max():g} exceed the {int(full)} full scale")
    p = _intensity_to_line_integral(img, full, params)
    return p, [f"PNG intensity I/I0 = value/{int(full)} -> p = -ln(I/I0); geometry = model's params.drr"]


def _load_dicom(path: Path, params: Params) -> tuple[np.ndarray, list[str]]:
    import pydicom
    from pydicom.errors import InvalidDicomError

    try:
        ds = pydicom.dcmread(path)
        raw = ds.pixel_array
    except InvalidDicomError:
        raise InputError(path, "not a .npy, .png or DICOM file") from None
    except Exception as e:  # noqa: BLE001 - truncated/corrupt data, missing decoder
        raise InputError(path, f"unreadable DICOM ({type(e).__name__}: {str(e).splitlines()[0][:200]})") from None
    modality = str(ds.get("Modality", "") or "").strip().upper()
    if modality in NON_RADIOGRAPH_MODALITIES:
        raise InputError(path, f"DICOM modality {modality} is a cross-sectional image, not a projection radiograph "
                               "(expected an X-ray: DX, CR, ...)")
    spacing = ds.get("ImagerPixelSpacing") or ds.get("PixelSpacing")
    if not spacing or len(spacing) != 2:
        raise InputError(path, "DICOM radiograph without ImagerPixelSpacing/PixelSpacing: pixel pitch unknown")
    sp = [float(s) for s in spacing]
    want = float(params.drr.pixel_mm)
    if not all(_close(s, want, DICOM_SPACING_RTOL) for s in sp):
        raise InputError(path, f"pixel spacing {sp[0]:g} x {sp[1]:g} mm differs from the model's detector pitch "
                               f"{want:g} mm (drr.pixel_mm)")
    bits = int(ds.get("BitsStored", 0) or ds.get("BitsAllocated", 16) or 16)
    full = float(2**bits - 1)
    img = _check_image(path, np.asarray(raw, dtype=np.float64), params)
    if str(ds.get("PhotometricInterpretation", "MONOCHROME2")).strip() == "MONOCHROME1":
        img = full - img  # MONOCHROME1: high values are dark → intensity
    return _intensity_to_line_integral(img, full, params), [
        f"DICOM intensity I/I0 = value/{int(full)} (BitsStored {bits}) -> p = -ln(I/I0); geometry = model's params.drr"
    ]


def load_xray(path: str | Path, view: str, params: Params) -> XrayInput:
    """Load one input view for a model with ``params`` (formats and checks: module docstring)."""
    if view not in VIEWS:
        raise ValueError(f"view must be one of {VIEWS}, got {view!r}")
    p = Path(path)
    if not p.exists():
        raise InputError(p, "no such file")
    if not p.is_file():
        raise InputError(p, "not a regular file")
    suffix = p.suffix.lower()
    if suffix == ".npy":
        return _load_npy(p, view, params)
    if suffix == ".png":
        img, notes = _load_png(p, params)
        return XrayInput(view, img, None, str(p), "png", notes)
    img, notes = _load_dicom(p, params)
    return XrayInput(view, img, None, str(p), "dicom", notes)


def input_geometries(
    frontal: XrayInput, lateral: XrayInput, params: Params
) -> tuple[np.ndarray, dict[str, PlacedGeometry]]:
    """``(isocenter [3] world mm, {view: placed geometry})`` for the reconstruction.

    JSON geometries are used as given (their isocentres must agree within 1 mm); a view
    without one (PNG/DICOM) gets the model's geometry placed at the other view's isocentre
    or the world origin.
    """
    isos = {x.view: np.asarray(x.geometry.isocenter) for x in (frontal, lateral) if x.geometry is not None}
    if len(isos) == 2 and float(np.linalg.norm(isos["frontal"] - isos["lateral"])) > ISOCENTER_TOL_MM:
        raise InputError(lateral.source, f"isocentre {isos['lateral'].tolist()} differs from the frontal view's "
                                         f"{isos['frontal'].tolist()} by more than {ISOCENTER_TOL_MM:g} mm")
    iso = next(iter(isos.values())) if isos else np.zeros(3)
    geoms: dict[str, PlacedGeometry] = {}
    for x in (frontal, lateral):
        if x.geometry is not None:
            geoms[x.view] = x.geometry
        else:
            geoms[x.view] = ProjectionGeometry.from_params(params.drr, x.view).place(  # type: ignore[arg-type]
                grid_affine((2, 2, 2), 1.0, iso), (2, 2, 2))
    return np.asarray(iso, dtype=np.float64), geoms


def output_affine(params: Params, stage: int, isocenter: Sequence[float]) -> np.ndarray:
    """Affine of stage ``stage``'s grid (1-based) centred at ``isocenter`` (world mm, RAS+)."""
    cfg = list(params.stages.values())[stage - 1]
    return grid_affine((cfg.size,) * 3, float(cfg.fov_mm) / int(cfg.size), isocenter)


# --------------------------------------------------------------------------- models


def load_stages(files: Sequence[str | Path], params: Params, device: str | torch.device = "cpu") -> list[nn.Module]:
    """Frozen stage networks from exported files (stage 1 first); each grid must match
    ``params.stages`` (:class:`InputError` otherwise)."""
    from xct_core.checkpoint import load_stage_model

    cfgs = list(params.stages.values())
    if len(files) > len(cfgs):
        raise InputError(files[-1], f"{len(files)} stage files but the model's params define {len(cfgs)} stages")
    nets = []
    for k, f in enumerate(files, start=1):
        net = load_stage_model(f, device)
        size = int(getattr(net, "size", cfgs[k - 1].size))
        if size != cfgs[k - 1].size:
            raise InputError(f, f"stage {k} grid {size}³ does not match the model's params ({cfgs[k - 1].size}³)")
        nets.append(net)
    return nets


def sample_steps(params: Params, steps: int | None = None) -> int:
    """DDIM steps: ``steps`` or ``eval.sample_steps`` or ``diffusion.sample_steps`` (as the pyfunc)."""
    return int(steps or params.eval.sample_steps or params.diffusion.sample_steps)


# --------------------------------------------------------------------------- reconstruction


@dataclass
class Reconstruction:
    """Mean (and std when ``samples > 1``) HU volumes on the output grid ``affine``."""

    mean_hu: np.ndarray  #: float32 [S, S, S] HU (RAS+)
    std_hu: np.ndarray | None  #: float32 [S, S, S] HU, sample std over K (None for K = 1)
    affine: np.ndarray  #: float64 4x4 voxel → world mm
    stage: int
    steps: int
    seeds: list[int]
    #: stage (stage - 1) output of the first sample (HU, its own grid) for pictures; None at stage 1
    previous_hu: np.ndarray | None = None

    @property
    def samples(self) -> int:
        return len(self.seeds)


@torch.no_grad()
def reconstruct(
    stages: Sequence[nn.Module],
    params: Params,
    frontal: np.ndarray | torch.Tensor,
    lateral: np.ndarray | torch.Tensor,
    *,
    isocenter: Sequence[float] = (0.0, 0.0, 0.0),
    steps: int | None = None,
    samples: int = 1,
    seed: int | None = None,
    upto: int | None = None,
    device: str | torch.device = "cpu",
    log: Any = None,
) -> Reconstruction:
    """Run the cascade ``samples`` times on one X-ray pair (module docstring: seeds, mean, std).

    ``frontal``/``lateral``: ``[P, P]`` line integrals; ``upto``: run stages 1 … upto
    (default all given); ``seed`` default ``params.seed``.
    """
    from xct_core.cascade import sample_cascade
    from xct_core.diffusion import CosineSchedule

    say = log or (lambda _m: None)
    n = len(stages) if upto is None else int(upto)
    if not 1 <= n <= len(stages):
        raise ConfigError(f"--stages must be in 1…{len(stages)}, got {upto}")
    if samples < 1:
        raise ConfigError(f"--samples must be >= 1, got {samples}")
    dev = torch.device(device)
    window = params.hu.get_window()
    schedule = CosineSchedule.from_params(params.diffusion)
    n_steps = sample_steps(params, steps)
    base = int(params.seed if seed is None else seed)
    f = torch.as_tensor(np.asarray(frontal, dtype=np.float32))[None, None].to(dev)
    lat = torch.as_tensor(np.asarray(lateral, dtype=np.float32))[None, None].to(dev)
    mean: np.ndarray | None = None
    m2: np.ndarray | None = None
    prev: np.ndarray | None = None
    seeds = []
    for i in range(samples):
        s = base + i
        seeds.append(s)
        gen = torch.Generator(device=dev).manual_seed(s)
        outs = sample_cascade(list(stages[:n]), f, lat, schedule=schedule, steps=n_steps,
                              eta=float(params.diffusion.eta), generator=gen)
        hu = window.inverse(outs[-1][0, 0].float().cpu().numpy().astype(np.float64))
        if i == 0 and len(outs) > 1:
            prev = window.inverse(outs[-2][0, 0].float().cpu().numpy()).astype(np.float32)
        if mean is None:
            mean, m2 = hu.copy(), np.zeros_like(hu)
        else:  # Welford
            delta = hu - mean
            mean += delta / (i + 1)
            m2 += delta * (hu - mean)
        say(f"sample {i + 1}/{samples} (seed {s}, {n_steps} DDIM steps, stages 1-{n})")
    assert mean is not None and m2 is not None
    std = np.sqrt(np.maximum(m2 / (samples - 1), 0.0)).astype(np.float32) if samples > 1 else None
    size = int(mean.shape[0])
    cfg = list(params.stages.values())[n - 1]
    if size != cfg.size:
        raise InputError(None, f"stage {n} produced {size}³, the params say {cfg.size}³")
    return Reconstruction(mean.astype(np.float32), std, output_affine(params, n, isocenter), n, n_steps, seeds, prev)


# --------------------------------------------------------------------------- reprojection QA


@torch.no_grad()
def render_views(
    hu: np.ndarray, affine: np.ndarray, geoms: Mapping[str, PlacedGeometry], params: Params
) -> dict[str, np.ndarray]:
    """Line-integral DRRs ``{view: float32 [P, P]}`` of a HU volume with the given placed
    geometries (``params.hu.mu_water``, ``params.drr.method``/``step_fraction``).

    A geometry placed on another grid is re-placed on this one with the same isocentre
    when the volume's centre is that isocentre (the rays only depend on the isocentre)."""
    from xct_core.drr import render

    vol = torch.from_numpy(np.ascontiguousarray(hu, dtype=np.float32))
    out = {}
    for view, pg in geoms.items():
        img = render(vol, affine, pg, mu_water=params.hu.mu_water, quantity="line_integral",
                     method=params.drr.method, step_fraction=params.drr.step_fraction)
        out[view] = img.numpy().astype(np.float32)
    return out


def reprojection_qa(
    hu: np.ndarray,
    affine: np.ndarray,
    geoms: Mapping[str, PlacedGeometry],
    inputs: Mapping[str, np.ndarray],
    params: Params,
) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """Render ``hu`` with ``geoms`` and compare with ``inputs`` (line integrals) per view.

    Returns ``(report, reprojections)``; ``report`` = ``{"views": {view: {"psnr_db",
    "ssim", "data_range", "passed"}}, "thresholds": {...}, "passed": bool, "warnings":
    [lines], "protocol": text}``.
    """
    from xct_core.metrics import reprojection_psnr, ssim2d

    rc = params.reconstruct
    ev = params.eval
    reproj = render_views(hu, affine, geoms, params)
    views: dict[str, Any] = {}
    warnings: list[str] = []
    for view in VIEWS:
        if view not in inputs:
            continue
        ref, pred = np.asarray(inputs[view], dtype=np.float32), reproj[view]
        rng = float(ref.max() - ref.min())
        psnr = float(reprojection_psnr(pred, ref)) if rng > 0 else math.nan
        win = min(int(ev.ssim_win), min(ref.shape) - (1 - min(ref.shape) % 2))
        ssim = float(ssim2d(pred, ref, sigma=ev.ssim_sigma, win=win)) if rng > 0 and win >= 3 else math.nan
        ok = math.isfinite(psnr) and math.isfinite(ssim) and psnr >= rc.qa_min_psnr_db and ssim >= rc.qa_min_ssim
        views[view] = {"psnr_db": psnr, "ssim": ssim, "data_range": rng, "ssim_win": win, "passed": ok,
                       "mae": float(np.abs(pred - ref).mean())}
        if not ok:
            warnings.append(
                f"reprojection QA: {view} PSNR {psnr:.2f} dB (min {rc.qa_min_psnr_db:g}), SSIM {ssim:.3f} "
                f"(min {rc.qa_min_ssim:g}) — the reconstruction does not reproduce this input X-ray well"
            )
    report = {
        "views": views,
        "thresholds": {"min_psnr_db": rc.qa_min_psnr_db, "min_ssim": rc.qa_min_ssim},
        "passed": all(v["passed"] for v in views.values()),
        "warnings": warnings,
        "protocol": ("DRR (line integral, input geometry) of the output HU volume vs the input view; PSNR "
                     "data_range = input max - min; 2D Gaussian SSIM sigma "
                     f"{ev.ssim_sigma:g}, window ssim_win taps, same data_range"),
    }
    return report, reproj


def qa_warnings(report: Mapping[str, Any]) -> list[str]:
    """The warning lines of a :func:`reprojection_qa` report."""
    return list(report.get("warnings") or [])


# --------------------------------------------------------------------------- evaluation on user CTs


@dataclass
class CaseResult:
    """One CT evaluated end to end (``xct evaluate``): metrics and pictures' inputs."""

    case_id: str
    metrics: dict[str, float]
    target_hu: np.ndarray  #: ground truth on the output grid (HU, full range)
    recon: Reconstruction
    xrays: dict[str, np.ndarray]  #: rendered input views (line integrals)
    reprojections: dict[str, np.ndarray]  #: DRRs of the reconstruction
    direct_hu: np.ndarray | None = None


def case_inputs(vol: CTVolume, params: Params, upto: int) -> tuple[np.ndarray, dict[str, np.ndarray], dict[str, PlacedGeometry], np.ndarray]:
    """As the preprocess step: resample ``vol`` to the finest stage grid (centred on the
    volume centre), render both views from it; the target is ``vol`` on stage ``upto``'s
    grid. Returns ``(target_hu, xrays, placed geometries, centre)``."""
    from xct_core.preprocess import PreprocessSettings, render_xrays, stage_hu

    s = PreprocessSettings.from_params(params)
    center = np.asarray(vol.center_world, dtype=np.float64)
    finest = stage_hu(vol, s.finest, s.fill_hu, s.antialias)
    frontal, lateral, geo = render_xrays(finest, s.finest.affine(center), s)
    grid = s.grids[upto - 1]
    target = finest if grid.k == s.finest.k else stage_hu(vol, grid, s.fill_hu, s.antialias)
    geoms = {v: PlacedGeometry.from_json(geo[v]) for v in VIEWS}
    return target.astype(np.float32), {"frontal": frontal, "lateral": lateral}, geoms, center


def _metrics(pred_hu: np.ndarray, target_hu: np.ndarray, views: dict[str, tuple[np.ndarray, np.ndarray]],
             params: Params) -> dict[str, float]:
    from xct_core.metrics import metric_kwargs, volume_metrics_per_sample

    w = params.hu.get_window()
    pred = torch.from_numpy(w.forward(np.asarray(pred_hu, dtype=np.float32)))[None]
    tgt_hu = torch.from_numpy(np.asarray(target_hu, dtype=np.float32))[None]
    tgt = torch.from_numpy(w.forward(np.asarray(target_hu, dtype=np.float32)))[None]
    v = {k: (torch.from_numpy(a)[None], torch.from_numpy(b)[None]) for k, (a, b) in views.items()}
    return volume_metrics_per_sample(pred, tgt, w, target_hu=tgt_hu, views=v, **metric_kwargs(params.eval))[0]


def evaluate_ct(
    case_id: str,
    vol: CTVolume,
    stages: Sequence[nn.Module],
    params: Params,
    *,
    steps: int | None = None,
    samples: int = 1,
    seed: int | None = None,
    upto: int | None = None,
    direct: nn.Module | None = None,
    baseline_hu: np.ndarray | None = None,
    device: str | torch.device = "cpu",
    inputs: tuple[np.ndarray, dict[str, np.ndarray], dict[str, PlacedGeometry], np.ndarray] | None = None,
) -> CaseResult:
    """Render the two X-rays of ``vol`` as preprocess does, reconstruct, and measure.

    Metric keys: :data:`xct_core.metrics.METRIC_KEYS` + ``reproj_psnr_<view>_db`` /
    ``reproj_ssim_<view>`` for the cascade; ``baseline_*`` for ``baseline_hu`` (the mean
    volume, HU on the output grid) and ``direct_*`` for the direct-regression twin
    ``direct`` (fed by the same earlier-stage samples, same seed) when given.
    ``inputs``: :func:`case_inputs` of ``vol`` when already computed.
    """
    from xct_core.cascade import sample_cascade
    from xct_core.diffusion import CosineSchedule

    n = len(stages) if upto is None else int(upto)
    target, xrays, geoms, center = inputs if inputs is not None else case_inputs(vol, params, n)
    rec = reconstruct(stages, params, xrays["frontal"], xrays["lateral"], isocenter=center, steps=steps,
                      samples=samples, seed=seed, upto=n, device=device)
    reproj = render_views(rec.mean_hu, rec.affine, geoms, params)
    m = _metrics(rec.mean_hu, target, {v: (reproj[v], xrays[v]) for v in VIEWS}, params)
    if rec.std_hu is not None:
        m["uncertainty_mean_std_hu"] = float(rec.std_hu.mean())
    direct_hu = None
    if direct is not None:
        w = params.hu.get_window()
        gen = torch.Generator(device=torch.device(device)).manual_seed(rec.seeds[0])
        f = torch.from_numpy(xrays["frontal"])[None, None].to(device)
        lat = torch.from_numpy(xrays["lateral"])[None, None].to(device)
        outs = sample_cascade([*stages[: n - 1], direct], f, lat, schedule=CosineSchedule.from_params(params.diffusion),
                              steps=rec.steps, eta=float(params.diffusion.eta), generator=gen)
        direct_hu = w.inverse(outs[-1][0, 0].float().cpu().numpy()).astype(np.float32)
        dre = render_views(direct_hu, rec.affine, geoms, params)
        m.update({f"direct_{k}": v for k, v in _metrics(direct_hu, target, {v: (dre[v], xrays[v]) for v in VIEWS},
                                                        params).items()})
    if baseline_hu is not None:
        if baseline_hu.shape != target.shape:
            raise InputError(None, f"mean-volume baseline {baseline_hu.shape} does not match the grid {target.shape}")
        bre = render_views(baseline_hu, rec.affine, geoms, params)
        m.update({f"baseline_{k}": v for k, v in _metrics(baseline_hu, target, {v: (bre[v], xrays[v]) for v in VIEWS},
                                                          params).items()})
    return CaseResult(case_id, m, target, rec, xrays, reproj, direct_hu)


#: how the mean-volume baseline was obtained (recorded in metrics.json and the report)
BASELINE_TRAIN = "train-split mean volume"
BASELINE_LOO = "leave-one-out mean of the other evaluated CTs"


def evaluate_cts(
    cts: Mapping[str, CTVolume],
    stages: Sequence[nn.Module],
    params: Params,
    *,
    steps: int | None = None,
    samples: int = 1,
    seed: int | None = None,
    upto: int | None = None,
    direct: nn.Module | None = None,
    train_mean_hu: np.ndarray | None = None,
    device: str | torch.device = "cpu",
    log: Any = None,
) -> tuple[list[CaseResult], dict[str, Any]]:
    """Evaluate several CTs (:func:`evaluate_ct`); returns the cases and the summary.

    Mean-volume baseline: ``train_mean_hu`` (the train split's voxel-wise mean HU on the
    output grid) when given; otherwise — the model artifacts carry no train mean — the
    voxel-wise mean of the OTHER evaluated CTs' targets (leave-one-out; needs >= 2 CTs),
    else none. The summary: ``mean`` (patient means; ``*nan_count`` summed), ``n_patients``,
    ``baseline`` (which mean volume, or why none), ``has_direct``, ``sample_steps``, ``seeds``.
    """
    say = log or (lambda _m: None)
    n = len(stages) if upto is None else int(upto)
    ids = list(cts)
    if not ids:
        raise InputError(None, "no CT to evaluate")
    prepared = {i: case_inputs(cts[i], params, n) for i in ids}
    if train_mean_hu is not None:
        baseline_note = BASELINE_TRAIN
    elif len(ids) >= 2:
        baseline_note = BASELINE_LOO + " (the model artifacts carry no train-split mean volume)"
        total = np.sum([prepared[i][0].astype(np.float64) for i in ids], axis=0)
    else:
        baseline_note = ("none: the model artifacts carry no train-split mean volume and a leave-one-out "
                         "mean needs >= 2 CTs (pass the processed data folder to use its train split)")
    cases = []
    for idx, i in enumerate(ids):
        if train_mean_hu is not None:
            base = np.asarray(train_mean_hu, dtype=np.float32)
        elif len(ids) >= 2:
            base = ((total - prepared[i][0]) / (len(ids) - 1)).astype(np.float32)
        else:
            base = None
        case = evaluate_ct(i, cts[i], stages, params, steps=steps, samples=samples,
                           seed=None if seed is None else seed + 1000 * idx, upto=n, direct=direct,
                           baseline_hu=base, device=device, inputs=prepared[i])
        m = case.metrics
        say(f"{i}: PSNR(window) {m['psnr_window_db']:.2f} dB, PSNR[-1024,1024] {m['psnr_hu_db']:.2f} dB, "
            f"SSIM {m['ssim_window']:.3f}, MAE {m['mae_hu']:.1f} HU")
        cases.append(case)
    keys = list(cases[0].metrics)
    mean = {}
    for k in keys:
        vals = np.array([c.metrics.get(k, math.nan) for c in cases], dtype=np.float64)
        mean[k] = float(vals.sum() if k.endswith("nan_count") else vals.mean())
    summary = {
        "n_patients": len(cases),
        "stage": n,
        "mean": mean,
        "baseline": baseline_note,
        "has_baseline": any("baseline_psnr_window_db" in c.metrics for c in cases),
        "has_direct": direct is not None,
        "sample_steps": cases[0].recon.steps,
        "samples": samples,
        "seeds": {c.case_id: c.recon.seeds for c in cases},
    }
    return cases, summary
