"""X-ray input files for reconstruction: ``.npy`` (+ geometry JSON), PNG, DICOM radiographs.

Pure NumPy/pydicom/PIL. Image conventions of docs/CONVENTIONS.md: row 0 superior; frontal
shows the patient's right on the left columns, lateral shows anterior on the left.

* ``.npy`` — written by ``xct drr``: float32 ``[P, P]`` line integrals (or intensities,
  converted with the JSON's ``i0``), with ``OUT.json`` beside it holding the placed
  geometry. The JSON is REQUIRED; its ``view`` must be the slot it is given for, and its
  detector (kind, pixels, pixel_mm, sdd, sod) and ``mu_water`` must equal the model's
  training geometry (``params.drr``, ``params.hu.mu_water``; relative tolerance 1e-3).
* ``.png`` — an 8- or 16-bit grayscale **intensity** image: ``I/I0 = value / full scale``
  (255 or 65535), clamped below at ``reconstruct.min_intensity_fraction``, then
  ``p = −ln(I/I0)``. An ``sBIT`` chunk with ``b`` significant bits sets the full scale to
  ``2**b − 1`` when every value fits in ``b`` bits (data stored unscaled, e.g. 12-bit values
  0..4095 in a 16-bit PNG); values above that were scaled to the sample depth as the PNG
  standard asks, and the full scale stays. The geometry is the model's training geometry
  (``params.drr``).
* DICOM radiograph (any other file with the DICM preamble) — as DICOM PS3.3 C.8.11.3.1.2
  defines it: the Modality LUT (RescaleSlope/Intercept; identity in a conformant DX) is
  applied, the result must lie in ``0 .. F`` with ``F = 2**BitsStored − 1``;
  ``PixelIntensityRelationshipSign −1`` (higher values = less X-ray intensity) flips it to
  ``F − value``; then ``PixelIntensityRelationship`` LIN gives ``I/I0 = value / F`` and LOG
  ``I/I0 = F**(value/F − 1)`` (the log image of a linear detector of the same bit depth:
  DICOM leaves the log scale open, so a LOG file also gets a warning line that says so), and
  ``p = −ln(I/I0)`` with the PNG clamp. PhotometricInterpretation is a presentation attribute:
  it decides the direction (MONOCHROME1 = Sign −1) only when the Sign is absent, with a
  warning line; any other relationship (DISP, …) is refused. The pixel pitch is
  ``ImagerPixelSpacing`` (detector plane), else ``PixelSpacing``, and must equal
  ``drr.pixel_mm`` (1 % tolerance). Rows × columns must equal ``drr.pixels``. A
  cross-sectional modality (CT, MR, PT, NM, US — e.g. a CT slice) is rejected; a ViewPosition
  of the other slot (LL/RL given as ``--frontal``, AP/PA as ``--lateral``) or an oblique one
  is refused. Compressed pixel data needs its pydicom plugin (JPEG, JPEG Lossless, JPEG-LS:
  pylibjpeg-libjpeg; JPEG 2000: pylibjpeg-openjpeg, both pinned); a missing one is named.
* Every view: a constant image (all black, all white) is refused. :func:`check_pair`
  refuses the same file or the same image in both slots, two DICOM PatientIDs, and ``.npy``
  views whose JSONs record different CTs (sha256, or shape + affine for a DICOM series); where
  the metadata cannot tell (PNG, no PatientID / ViewPosition) it returns one warning line.

Hostile and broken inputs (``params.yaml → limits``, :class:`~xct_core.config.LimitsParams`)
* Sizes are judged from the header BEFORE any pixel is read (:class:`~xct_core.config.LimitsParams`): the
  ``.npy`` header's shape, the PNG's IHDR size (PIL's decompression-bomb guard surfaces as
  the same one-line error), the DICOM Rows × Columns — against ``limits.max_xray_pixels`` and
  then against the model's ``drr.pixels``; a ``.npy`` shorter than its header's claim is
  truncated, an empty one is named as such.
* Values (:func:`check_line_integrals`, also what the registered pyfunc applies): a real
  dtype (a ``.npy`` must be floating point, as ``xct drr`` writes it: integer, complex, bool
  or object arrays are not DRRs), every pixel finite, and **plausible line integrals
  0 ≤ p ≤ limits.max_line_integral** (default 50; ``p = ∫mu dl`` is dimensionless: 400 mm
  of water at mu_water = 0.02/mm give 8, a lateral chest with bone about 10, metal can add
  tens; e^−50 ≈ 2e−22 is far beyond any detector, a 16-bit one ends near 11). Negative
  values (float rounding of −ln(I/I0) aside: ``LINE_INTEGRAL_ATOL``) are not line integrals.

Every problem raises :class:`~xct_core.errors.InputError` naming the file.
:func:`input_geometries` places both views for the reconstruction (isocentre of the JSONs —
both views must agree within 1 mm — or the world origin for PNG/DICOM inputs).
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from xct_core.config import Params
from xct_core.errors import ConfigError, InputError
from xct_core.geometry import VIEW_AXES, VIEWS, PlacedGeometry, ProjectionGeometry
from xct_core.grid import grid_affine

__all__ = ["LINE_INTEGRAL_ATOL", "XrayInput", "check_line_integrals", "check_pair", "input_geometries", "load_xray"]

#: relative tolerance when comparing an input's geometry with the model's
GEOMETRY_RTOL = 1e-3
#: isocentres of the two views must agree within this (mm)
ISOCENTER_TOL_MM = 1.0
#: DICOM pixel spacing vs drr.pixel_mm, relative
DICOM_SPACING_RTOL = 0.01
#: DICOM modalities rejected as X-ray inputs (slices of a volume, not projections)
NON_RADIOGRAPH_MODALITIES = frozenset({"CT", "MR", "PT", "NM", "US"})
#: line integrals below 0 by at most this are float rounding of -ln(I/I0) (I = I0 in air)
LINE_INTEGRAL_ATOL = 1e-5


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
    #: what the file says about where it comes from, for :func:`check_pair`: ``view_position``
    #: (DICOM ViewPosition), ``patient_id`` (DICOM PatientID), ``ct`` (the CT a ``.npy``'s JSON
    #: was rendered from: its sha256, or shape + affine for a DICOM series); absent = unknown
    ident: dict[str, Any] = field(default_factory=dict)
    #: conversions the file's metadata could not pin down (printed as warning lines)
    warnings: list[str] = field(default_factory=list)


def _close(a: float, b: float, rtol: float = GEOMETRY_RTOL) -> bool:
    return abs(float(a) - float(b)) <= rtol * max(abs(float(a)), abs(float(b)), 1e-12)


def _check_shape(path: object, shape: tuple[int, ...], params: Params) -> None:
    """A claimed or actual image shape: within ``limits.max_xray_pixels``, then 2D (or
    ``[1, P, P]``) and the model's detector ``drr.pixels`` square."""
    shape = tuple(int(s) for s in shape)
    params.limits.check_claim(path, shape, "max_xray_pixels", "pixels")
    dims = shape[1:] if len(shape) == 3 and shape[0] == 1 else shape
    if len(dims) != 2:
        raise InputError(path, f"expected a 2D X-ray image, got shape {shape}")
    p = int(params.drr.pixels)
    if dims != (p, p):
        raise InputError(path, f"image is {dims[0]}x{dims[1]} pixels, the model's detector is {p}x{p} (drr.pixels)")


def _check_image(path: Path, img: np.ndarray, params: Params) -> np.ndarray:
    _check_shape(path, img.shape, params)
    if img.ndim == 3:
        img = img[0]
    bad = int(img.size - np.count_nonzero(np.isfinite(img)))
    if bad:
        n_nan = int(np.count_nonzero(np.isnan(img)))
        raise InputError(path, f"{bad} non-finite pixels ({n_nan} NaN, {bad - n_nan} Inf) of {img.size}")
    return np.ascontiguousarray(img, dtype=np.float32)


def check_line_integrals(where: object, img: Any, params: Params) -> np.ndarray:
    """``img`` as float32 line integrals, or :class:`InputError` naming ``where``: a real
    numeric dtype (not complex, bool, object), every value finite, and
    ``0 <= p <= limits.max_line_integral`` (module docstring: why that range). Nothing is
    cast before the checks (no NumPy warnings on complex or huge values)."""
    arr = np.asarray(img)
    if arr.dtype.kind not in "fiu":
        raise InputError(where, f"X-ray values must be real numbers (line integrals), got dtype {arr.dtype}")
    if arr.dtype.kind == "f":
        bad = int(arr.size - np.count_nonzero(np.isfinite(arr)))
        if bad:
            n_nan = int(np.count_nonzero(np.isnan(arr)))
            raise InputError(where, f"{bad} non-finite pixels ({n_nan} NaN, {bad - n_nan} Inf) of {arr.size}")
    if arr.size == 0:
        raise InputError(where, "empty X-ray image")
    lo, hi = float(arr.min()), float(arr.max())
    top = float(params.limits.max_line_integral)
    if lo < -LINE_INTEGRAL_ATOL or hi > top:
        n_neg = int(np.count_nonzero(arr < -LINE_INTEGRAL_ATOL))
        n_big = int(np.count_nonzero(arr > top))
        raise InputError(
            where, f"not plausible line integrals: values {lo:.4g} .. {hi:.4g} ({n_neg} below 0, {n_big} above "
                   f"limits.max_line_integral {top:g}); an X-ray input is p = -ln(I/I0) = integral of mu dl, 0 <= p <= {top:g}"
        )
    return np.ascontiguousarray(arr, dtype=np.float32)


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
    from xct_core.jsondoc import read_json_doc

    meta = read_json_doc(jpath, "geometry JSON")  # bounded: size, depth, UTF-8, an object
    pg = _check_geometry(jpath, meta, view, params)
    quantity = meta.get("quantity", "line_integral")
    if quantity not in ("line_integral", "intensity"):
        raise InputError(jpath, f"unknown quantity {quantity!r} (line_integral | intensity)")
    _shape, dtype = _npy_header(path, params)
    if dtype.kind != "f":
        raise InputError(path, f"a DRR is a floating-point image (xct drr writes float32), this .npy holds {dtype}")
    try:
        arr = np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError) as e:
        raise InputError(path, f"unreadable .npy ({_first_line(e)})") from None
    img = _check_image(path, np.asarray(arr, dtype=np.float64), params)
    notes = []
    if quantity == "intensity":
        try:
            i0 = float(meta.get("i0", 1.0))
        except (TypeError, ValueError):
            raise InputError(jpath, f"invalid i0 {meta.get('i0')!r}") from None
        if not np.isfinite(i0) or i0 <= 0 or np.any(img <= 0):
            raise InputError(path, "intensity image with pixels <= 0 (or i0 <= 0): cannot take -ln(I/I0)")
        with np.errstate(over="ignore", under="ignore"):
            img = -np.log(img.astype(np.float64) / i0)
        notes.append(f"intensity converted to line integrals: p = -ln(I / {i0:g})")
    img = check_line_integrals(path, img, params)
    ct = meta.get("ct")
    ident: dict[str, Any] = {}
    if isinstance(ct, dict):
        if ct.get("sha256"):
            ident["ct"] = {"sha256": str(ct["sha256"])}
        elif ct.get("shape") is not None and ct.get("affine") is not None:
            ident["ct"] = {"shape": ct.get("shape"), "affine": ct.get("affine")}
    return XrayInput(view, img, pg, str(path), "npy", notes, ident)


def _first_line(e: BaseException) -> str:
    """The first line of an exception's message (its type name when there is none), ≤ 200 chars."""
    lines = str(e).strip().splitlines()
    return lines[0][:200] if lines else type(e).__name__


def _npy_header(path: Path, params: Params) -> tuple[tuple[int, ...], np.dtype]:
    """Shape and dtype from a ``.npy`` header, judged before the data is read: the claimed
    pixel count and shape (:func:`_check_shape`) and the claimed bytes against the file size."""
    try:
        size = path.stat().st_size
        if size == 0:
            raise InputError(path, "unreadable .npy: empty file (0 bytes)")
        with open(path, "rb") as f:
            version = np.lib.format.read_magic(f)
            if version == (1, 0):
                shape, _fortran, dtype = np.lib.format.read_array_header_1_0(f)
            elif version == (2, 0):
                shape, _fortran, dtype = np.lib.format.read_array_header_2_0(f)
            else:
                raise InputError(path, f"unsupported .npy format version {version[0]}.{version[1]}")
            offset = f.tell()
    except InputError:
        raise
    except (OSError, ValueError, EOFError, SyntaxError) as e:
        raise InputError(path, f"unreadable .npy ({_first_line(e)})") from None
    if dtype.hasobject or dtype.fields is not None:
        raise InputError(path, f"not a numeric image (dtype {dtype})")
    _check_shape(path, shape, params)
    params.limits.check_payload(path, int(np.prod(shape, dtype=object)) * dtype.itemsize, size, compressed=False,
                                offset=offset)
    return tuple(int(s) for s in shape), dtype


def intensity_to_line_integral(fraction: np.ndarray, min_intensity_fraction: float) -> np.ndarray:
    """``p = −ln(max(I / I0, min_intensity_fraction))`` (float64): THE clamp of reading an
    intensity image (also the honest protocol's detector, :mod:`xct_core.detector`)."""
    return -np.log(np.clip(np.asarray(fraction, dtype=np.float64), float(min_intensity_fraction), None))


def _intensity_to_line_integral(values: np.ndarray, full_scale: float, params: Params) -> np.ndarray:
    """``p = −ln(max(value / full_scale, min_intensity_fraction))`` (module docstring)."""
    frac = values.astype(np.float64) / float(full_scale)
    return intensity_to_line_integral(frac, params.reconstruct.min_intensity_fraction).astype(np.float32)


def _load_png(path: Path, params: Params) -> tuple[np.ndarray, list[str]]:
    from PIL import Image, UnidentifiedImageError

    try:
        with warnings.catch_warnings():
            # PIL's decompression-bomb guard: a warning above Image.MAX_IMAGE_PIXELS, an error
            # above twice that; both become the one-line error below, never terminal noise
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as im:
                w, h = im.size  # from the header (IHDR): nothing decoded yet
                _check_shape(path, (h, w), params)
                im.load()
                mode = im.mode
                arr = np.asarray(im)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise InputError(path, f"PNG header claims too many pixels ({_first_line(e)})") from None
    except (OSError, UnidentifiedImageError, ValueError, SyntaxError, EOFError) as e:
        raise InputError(path, f"unreadable PNG ({_first_line(e)})") from None
    if mode == "L":
        depth = 8
    elif mode in ("I;16", "I;16B", "I;16L", "I"):
        depth = 16
    else:
        raise InputError(path, f"PNG mode {mode!r}: expected an 8- or 16-bit grayscale image (L, I;16)")
    full = float(2**depth - 1)
    img = _check_image(path, np.asarray(arr, dtype=np.float64), params)
    if img.max() > full:
        raise InputError(path, f"pixel values up to {img.max():g} exceed the {int(full)} full scale")
    sbit = _png_sbit(path)
    how = ""
    if sbit is not None and sbit != depth:
        if not 1 <= sbit < depth:
            raise InputError(path, f"invalid sBIT chunk: {sbit} significant bits in a {depth}-bit image")
        if img.max() <= 2**sbit - 1:  # the samples were stored as they are: full scale is 2**sBIT - 1
            full = float(2**sbit - 1)
            how = f" (sBIT {sbit}: {sbit}-bit values stored unscaled)"
        else:  # scaled up to the sample depth as the PNG standard asks: the full scale stays
            how = f" (sBIT {sbit}: values scaled to {depth} bits)"
    p = _intensity_to_line_integral(img, full, params)
    return p, [f"PNG intensity I/I0 = value/{int(full)}{how} -> p = -ln(I/I0); geometry = model's params.drr"]


def _png_sbit(path: Path) -> int | None:
    """The first byte of a PNG's sBIT chunk (significant bits of a grayscale sample), or None.

    Pillow does not report sBIT, so the chunks before the first IDAT are walked here (the file
    has already been read by Pillow, so its structure is sound)."""
    try:
        with open(path, "rb") as f:
            if f.read(8) != b"\x89PNG\r\n\x1a\n":
                return None
            while True:
                head = f.read(8)
                if len(head) < 8:
                    return None
                length, ctype = int.from_bytes(head[:4], "big"), head[4:]
                if ctype in (b"IDAT", b"IEND"):
                    return None
                if ctype == b"sBIT":
                    data = f.read(min(length, 4))
                    return int(data[0]) if data else None
                f.seek(length + 4, 1)  # data + CRC
    except OSError as e:
        raise InputError(path, f"unreadable PNG ({e.strerror or e})") from None


#: DICOM ViewPosition (0018,5101) values of each slot's view; obliques are neither
VIEW_POSITIONS = {"frontal": frozenset({"AP", "PA"}), "lateral": frozenset({"LL", "RL"})}
OBLIQUE_POSITIONS = frozenset({"RLO", "LLO", "RAO", "LAO", "RPO", "LPO"})


def _dicom_ident(path: Path, ds: Any, view: str) -> dict[str, Any]:
    """PatientID and ViewPosition; a view position of the other slot (or an oblique) is refused."""
    ident: dict[str, Any] = {}
    pid = str(ds.get("PatientID", "") or "").strip()
    if pid:
        ident["patient_id"] = pid
    vp = str(ds.get("ViewPosition", "") or "").strip().upper()
    if vp:
        ident["view_position"] = vp
    other = "lateral" if view == "frontal" else "frontal"
    if vp in VIEW_POSITIONS[other]:
        raise InputError(path, f"ViewPosition {vp} is a {other} view but it was given as --{view} (swapped inputs?)")
    if vp in OBLIQUE_POSITIONS:
        raise InputError(path, f"ViewPosition {vp} is an oblique view; the model needs a frontal (AP/PA) and a "
                               "lateral (LL/RL) view")
    return ident


def _intensity_relationship(path: Path, ds: Any) -> tuple[str, int, list[str], list[str]]:
    """``(LIN|LOG, sign, notes, warnings)`` from PixelIntensityRelationship(Sign) (DICOM PS3.3
    C.8.11.3.1.2); PhotometricInterpretation is a presentation attribute and only decides the
    direction when the Sign is absent (then a warning says so)."""
    rel = str(ds.get("PixelIntensityRelationship", "") or "").strip().upper()
    raw_sign = ds.get("PixelIntensityRelationshipSign")
    notes: list[str] = []
    warn: list[str] = []
    guessed = []
    if not rel:
        rel = "LIN"
        guessed.append("PixelIntensityRelationship absent: assumed LIN (values proportional to X-ray intensity)")
    elif rel not in ("LIN", "LOG"):
        raise InputError(path, f"PixelIntensityRelationship {rel!r} is neither LIN nor LOG: the pixel values are not "
                               "related to the X-ray intensity in a known way, no line integrals can be computed")
    if raw_sign is None or str(raw_sign).strip() == "":
        photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2")).strip()
        sign = -1 if photometric == "MONOCHROME1" else 1
        guessed.append(f"PixelIntensityRelationshipSign absent: taken as {sign:+d} from PhotometricInterpretation "
                       f"{photometric}")
    else:
        try:
            sign = int(raw_sign)
        except (TypeError, ValueError):
            raise InputError(path, f"unreadable PixelIntensityRelationshipSign {raw_sign!r}") from None
        if sign not in (1, -1):
            raise InputError(path, f"PixelIntensityRelationshipSign {sign} must be +1 or -1")
    if guessed:
        warn.append(f"{path}: " + "; ".join(guessed))
    notes.append(f"PixelIntensityRelationship {rel}, Sign {sign:+d}"
                 + (" (higher values = less X-ray intensity: inverted)" if sign < 0 else ""))
    return rel, sign, notes, warn


def _load_dicom(path: Path, params: Params, view: str) -> tuple[np.ndarray, list[str], dict[str, Any], list[str]]:
    import pydicom
    from pydicom.errors import InvalidDicomError
    from pydicom.pixels import apply_modality_lut

    from xct_core.io import decode_pixels

    try:
        ds = pydicom.dcmread(path)
    except InvalidDicomError:
        raise InputError(path, "not a .npy, .png or DICOM file") from None
    except Exception as e:  # noqa: BLE001 - truncated/corrupt header
        raise InputError(path, f"unreadable DICOM ({type(e).__name__}: {_first_line(e)})") from None
    modality = str(ds.get("Modality", "") or "").strip().upper()
    if modality in NON_RADIOGRAPH_MODALITIES:
        raise InputError(path, f"DICOM modality {modality} is a cross-sectional image, not a projection radiograph "
                               "(expected an X-ray: DX, CR, ...)")
    ident = _dicom_ident(path, ds, view)
    spacing = ds.get("ImagerPixelSpacing") or ds.get("PixelSpacing")
    if not spacing or len(spacing) != 2:
        raise InputError(path, "DICOM radiograph without ImagerPixelSpacing/PixelSpacing: pixel pitch unknown")
    sp = [float(s) for s in spacing]
    want = float(params.drr.pixel_mm)
    if not all(_close(s, want, DICOM_SPACING_RTOL) for s in sp):
        raise InputError(path, f"pixel spacing {sp[0]:g} x {sp[1]:g} mm differs from the model's detector pitch "
                               f"{want:g} mm (drr.pixel_mm)")
    try:  # the size the header claims, before any pixel is decoded
        claim = tuple(int(ds.get(k) or 1) for k in ("NumberOfFrames", "Rows", "Columns", "SamplesPerPixel"))
    except (TypeError, ValueError):
        raise InputError(path, "unreadable Rows/Columns/NumberOfFrames/SamplesPerPixel") from None
    if "PixelData" not in ds:
        raise InputError(path, "DICOM file without pixel data")
    params.limits.check_claim(path, claim, "max_xray_pixels", "pixels")
    if claim[0] != 1 or claim[3] != 1:
        raise InputError(path, f"expected one grayscale frame, the header claims {claim[0]} frame(s) of "
                               f"{claim[3]} sample(s) per pixel")
    _check_shape(path, claim[1:3], params)
    rel, sign, notes, warn = _intensity_relationship(path, ds)
    bits = int(ds.get("BitsStored", 0) or ds.get("BitsAllocated", 16) or 16)
    full = float(2**bits - 1)
    raw = decode_pixels(path, ds)
    if np.asarray(raw).dtype.kind not in "iu":
        raise InputError(path, f"DICOM radiograph pixels must be stored integers, got {np.asarray(raw).dtype}")
    try:  # RescaleSlope/Intercept (identity in a conformant DX; CR may carry one)
        values = np.asarray(apply_modality_lut(np.asarray(raw), ds), dtype=np.float64)
    except Exception as e:  # noqa: BLE001 - broken Modality LUT
        raise InputError(path, f"cannot apply the modality LUT / rescale ({type(e).__name__}: {_first_line(e)})") from None
    try:
        slope = float(ds.get("RescaleSlope") if ds.get("RescaleSlope") not in (None, "") else 1.0)
        inter = float(ds.get("RescaleIntercept") if ds.get("RescaleIntercept") not in (None, "") else 0.0)
    except (TypeError, ValueError):
        raise InputError(path, "unreadable RescaleSlope/RescaleIntercept") from None
    rescaled = slope != 1.0 or inter != 0.0
    what = "values after RescaleSlope/Intercept" if rescaled else "pixel values"
    img = _check_image(path, values, params)
    if img.max() > full or img.min() < 0:
        raise InputError(path, f"{what} {img.min():g} .. {img.max():g} lie outside the stored range "
                               f"0 .. {int(full)} (BitsStored {bits})")
    if rescaled:
        notes.append(f"RescaleSlope {slope:g}, RescaleIntercept {inter:g} applied")
    if sign < 0:
        img = full - img  # higher values = less intensity → values that grow with intensity
    if rel == "LOG":
        # DICOM fixes only the monotonic relationship, not the log scale: the values are taken as the
        # log image of a linear detector of the same bit depth, value = full * ln(v_lin) / ln(full)
        frac = np.exp((img / full - 1.0) * np.log(full))
        warn.append(f"{path}: PixelIntensityRelationship LOG: the log scale is not in the file; assumed "
                    f"I/I0 = {int(full)}^(value/{int(full)} - 1) (the log image of a linear {bits}-bit detector)")
        p = _intensity_to_line_integral(frac, 1.0, params)
        notes.append(f"DICOM log intensity: I/I0 = {int(full)}^(value/{int(full)} - 1) -> p = -ln(I/I0); "
                     "geometry = model's params.drr")
    else:
        p = _intensity_to_line_integral(img, full, params)
        notes.insert(0, f"DICOM intensity I/I0 = value/{int(full)} (BitsStored {bits}) -> p = -ln(I/I0); "
                        "geometry = model's params.drr")
    return p, notes, ident, warn


def _refuse_constant(path: Path, img: np.ndarray) -> None:
    """A patient's radiograph is never uniform: a constant image (all black, all white) is refused
    before it could be reconstructed (and reprojection QA would divide by a zero range)."""
    lo, hi = float(np.min(img)), float(np.max(img))
    if lo == hi:
        raise InputError(path, f"constant image: every pixel is the same line integral {lo:.4g} (a blank, all-black "
                               "or all-white X-ray carries nothing to reconstruct)")


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
        x = _load_npy(p, view, params)
    elif suffix == ".png":
        img, notes = _load_png(p, params)
        x = XrayInput(view, check_line_integrals(p, img, params), None, str(p), "png", notes)
    else:
        img, notes, ident, warn = _load_dicom(p, params, view)
        x = XrayInput(view, check_line_integrals(p, img, params), None, str(p), "dicom", notes, ident, warn)
    _refuse_constant(p, x.image)
    return x


def check_pair(frontal: XrayInput, lateral: XrayInput) -> list[str]:
    """Refuse a pair that cannot be one patient's frontal + lateral: the same file or the same
    image twice, different DICOM PatientIDs, ``.npy`` inputs rendered from different CTs (their
    JSONs' ``ct`` checksums). Returns one warning line when the metadata cannot tell (PNG, no
    PatientID / ViewPosition, a ``.npy`` JSON without its CT's identity, mixed formats)."""
    f, lat = Path(frontal.source), Path(lateral.source)
    try:
        same = f.samefile(lat)
    except OSError:
        same = False
    if same:
        raise InputError(lateral.source, f"--frontal and --lateral are the same file ({frontal.source})")
    if frontal.image.shape == lateral.image.shape and np.array_equal(frontal.image, lateral.image):
        raise InputError(lateral.source, f"the lateral image is identical to the frontal one ({frontal.source}): "
                                         "the same X-ray given twice?")
    unknown: list[str] = []
    pf, pl = frontal.ident.get("patient_id"), lateral.ident.get("patient_id")
    cf, cl = frontal.ident.get("ct"), lateral.ident.get("ct")
    if pf and pl:
        if pf != pl:
            raise InputError(lateral.source, f"different patients: PatientID {pl!r} here, {pf!r} in the frontal "
                                             f"({frontal.source})")
    elif cf and cl:
        if cf != cl:
            what = (f"sha256 {cl['sha256'][:12]}… here, {cf['sha256'][:12]}…" if "sha256" in cf and "sha256" in cl
                    else "CT identity (checksum or shape/affine) differs from the one")
            raise InputError(lateral.source, f"rendered from a different CT than the frontal: {what} in "
                                             f"{Path(frontal.source).with_suffix('.json')}")
    else:
        unknown.append("that both views are of the same patient")
    for x in (frontal, lateral):
        if x.fmt == "dicom" and "view_position" not in x.ident:
            unknown.append(f"that {Path(x.source).name} is a {x.view} view (no ViewPosition)")
        elif x.fmt == "png":
            unknown.append(f"that {Path(x.source).name} is a {x.view} view (a PNG has no view metadata)")
    if not unknown:
        return []
    return [(f"could not check {'; '.join(unknown)}: make sure --frontal is the frontal (AP/PA) and --lateral the "
             "lateral X-ray of the same patient")]


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
