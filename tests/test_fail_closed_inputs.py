"""Wrong inputs are refused or converted, never silently turned into a wrong CT (issue 24,
items 6 and 7).

Every case has a known answer built here: DICOM forbids a negative PixelSpacing; a pixel-less
slice in a series is a hole; a NIfTI's qform and sform with opposite handedness are a corrupted
header; NIfTI units (micron, metre) are defined by the standard; a radiograph's
PixelIntensityRelationship (LIN/LOG) and Sign, its RescaleSlope/Intercept and a PNG's sBIT
define how the stored values map to X-ray intensity — so LIN, LOG, sign-flipped and rescaled
encodings of one DRR (and 12- vs 16-bit PNGs of it) must give the same line integrals, to the
quantisation of each encoding. The reconstruct CLI refuses swapped views, the same X-ray twice,
different patients and blank images with one line, and warns in one line where the metadata
cannot tell. JPEG Lossless (1.2.840.10008.1.2.4.70) is encoded here (pydicom has no encoder:
:func:`dicom_synth.jpeg_lossless_sv1`) and must decode bit-exactly; without the decoder plugin
the one-line error names the package to install.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from importlib.metadata import version
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import pytest
from dicom_synth import write_nifti, write_series, write_slice, write_xray
from PIL import Image, PngImagePlugin
from test_reconstruct import _args, env, xct  # noqa: F401 - env: the shared tiny-model fixture

from xct_core.errors import InputError
from xct_core.io import load_ct

REPO = Path(__file__).resolve().parents[1]


def _raw_series(n: int = 6, rows: int = 10, cols: int = 12) -> np.ndarray:
    """uint16 [slice, row, col], HU = stored - 1024 in 0 .. 1920: plausible, unique per voxel."""
    s, r, c = np.meshgrid(np.arange(n), np.arange(rows), np.arange(cols), indexing="ij")
    return (1024 + c + 20 * r + 300 * s).astype(np.uint16)


def _refused(path: Path, *needles: str, named: Path | None = None) -> str:
    with pytest.raises(InputError) as ei:
        load_ct(path)
    msg = str(ei.value)
    assert "\n" not in msg and msg.startswith(f"{named or path}: "), msg
    for n in needles:
        assert n in msg, (n, msg)
    return msg


def _one_line_error(code: int, err: str, *needles: str) -> str:
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith("xct: error: "), (code, err)
    for n in needles:
        assert n in lines[0], (n, lines[0])
    return lines[0]


# --------------------------------------------------------------------------- CT: DICOM


def test_negative_pixel_spacing_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """DICOM's PixelSpacing is a distance: a negative one used to mirror the volume (RAS for LPS)."""
    for name, spacing in (("neg_row", (-1.0, 1.0)), ("neg_col", (1.0, -0.5))):
        paths = write_series(tmp_path / name, _raw_series(), pixel_spacing=spacing)
        msg = _refused(tmp_path / name, "PixelSpacing", "must be positive", named=min(paths))
        assert str(min(spacing)) in msg
    code, _, err = xct(["ct", "info", str(tmp_path / "neg_row")], capsys)
    _one_line_error(code, err, "PixelSpacing", "must be positive")
    write_series(tmp_path / "ok", _raw_series(), pixel_spacing=(1.0, 0.5))  # control
    assert load_ct(tmp_path / "ok").spacing.tolist() == pytest.approx([0.5, 1.0, 2.5])


def test_ct_slice_without_pixel_data_is_refused(tmp_path: Path) -> None:
    """Three of six slices without PixelData: dropping them silently doubled the slice gap."""
    d = tmp_path / "holes"
    raw = _raw_series(n=6)
    paths = write_series(d, raw, gap=2.5)
    for s in (1, 3, 5):
        write_slice(paths[s], raw[s], (-10.0, -20.0, 30.0 + 2.5 * s), pixels=False)
    msg = _refused(d, "CT slice without pixel data", "3 of 6 slices", named=min(paths[s] for s in (1, 3, 5)))
    assert "incomplete" in msg
    # the same refusal when one file of the series is given
    with pytest.raises(InputError, match="CT slice without pixel data"):
        load_ct(paths[0])
    # control: a header-only CT object in a series of its own is still skipped, as before
    ok = tmp_path / "ok"
    write_series(ok, raw, gap=2.5)
    write_slice(ok / "header_only.dcm", raw[0], (0.0, 0.0, 0.0), series_uid="9.9.9", pixels=False)
    vol = load_ct(ok)
    assert vol.shape == (12, 10, 6) and vol.spacing[2] == pytest.approx(2.5)
    assert vol.meta["files_skipped"] == {"no pixel data": 1}


# --------------------------------------------------------------------------- CT: NIfTI


def _hu_block(shape: tuple[int, int, int] = (10, 12, 8)) -> np.ndarray:
    i, j, k = np.meshgrid(*[np.arange(n) for n in shape], indexing="ij")
    return (-1000 + 40 * i + 30 * j + 20 * k).astype(np.int16)  # -1000 .. +500 HU


def test_nifti_qform_mirrored_against_sform_is_refused(tmp_path: Path) -> None:
    hu = _hu_block()
    img = nib.Nifti1Image(hu, None)
    img.set_sform(np.diag([1.0, 1.0, 2.0, 1.0]), code=1)
    img.set_qform(np.diag([-1.0, 1.0, 2.0, 1.0]), code=1)  # left-right mirrored
    nib.save(img, str(tmp_path / "mirrored.nii.gz"))
    _refused(tmp_path / "mirrored.nii.gz", "qform (LAS)", "sform (RAS)", "disagree in handedness")
    # control: the same handedness, a different translation (e.g. a registered sform) loads, by its sform
    img.set_qform(np.array([[1.0, 0, 0, 5], [0, 1, 0, 0], [0, 0, 2, 0], [0, 0, 0, 1]]), code=1)
    nib.save(img, str(tmp_path / "shifted.nii.gz"))
    np.testing.assert_allclose(load_ct(tmp_path / "shifted.nii.gz").affine, np.diag([1.0, 1.0, 2.0, 1.0]))


def test_nifti_int8_and_negative_slope_are_refused(tmp_path: Path) -> None:
    aff = np.diag([1.0, 1.0, 2.0, 1.0])
    hu = _hu_block()
    # int8 holds -128 .. 127: no air, no bone
    write_nifti(tmp_path / "int8.nii.gz", (hu // 16).astype(np.int8), aff)
    _refused(tmp_path / "int8.nii.gz", "not Hounsfield units: int8 voxels (range -128 .. 127", "cannot hold air")
    # scl_slope -1 on the negated data would give plausible HU: refused, the scale is inverted
    write_nifti(tmp_path / "neg.nii.gz", (-hu).astype(np.int16), aff, slope_inter=(-1.0, 0.0))
    _refused(tmp_path / "neg.nii.gz", "negative scl_slope -1")
    # control: int8 with a scaling that spans air..bone is HU (16 HU steps, -2048 .. 2032)
    write_nifti(tmp_path / "int8_scaled.nii.gz", (hu // 16).astype(np.int8), aff, slope_inter=(16.0, 0.0))
    vol = load_ct(tmp_path / "int8_scaled.nii.gz")
    np.testing.assert_allclose(vol.hu, (hu // 16) * 16.0)


@pytest.mark.parametrize(("unit", "scale"), [("micron", 1000.0), ("meter", 1e-3)])
def test_nifti_xyz_units_are_converted_to_mm(tmp_path: Path, unit: str, scale: float) -> None:
    """NIfTI defines xyz units: a 0.8 x 1 x 2 mm grid written in microns (or metres) is that grid."""
    hu = _hu_block()
    aff_mm = np.array([[0.8, 0, 0, -40.0], [0, 1.0, 0, 12.0], [0, 0, 2.0, 100.0], [0, 0, 0, 1]])
    aff = aff_mm.copy()
    aff[:3, :] *= scale
    img = nib.Nifti1Image(hu, aff)
    img.set_qform(aff, code=1)
    img.set_sform(aff, code=1)
    img.header.set_xyzt_units(unit, "sec")
    nib.save(img, str(tmp_path / f"{unit}.nii.gz"))
    vol = load_ct(tmp_path / f"{unit}.nii.gz")
    np.testing.assert_allclose(vol.affine, aff_mm, rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(vol.spacing, [0.8, 1.0, 2.0], rtol=1e-5)
    assert vol.meta["xyz_units"] == unit


# --------------------------------------------------------------------------- X-rays: DICOM conversion


def _drr(env: dict[str, Any], view: str) -> tuple[np.ndarray, float]:
    p = np.load(env["xr"] / f"{view}.npy").astype(np.float64)
    return p, float(json.loads((env["xr"] / f"{view}.json").read_text())["pixel_mm"])


def test_lin_log_sign_and_rescale_give_the_same_line_integrals(env: dict[str, Any], tmp_path: Path) -> None:
    """One DRR encoded five ways (DICOM PS3.3 C.8.11.3.1.2): LIN, LIN with Sign -1, LOG (the log
    image of the same 16-bit detector: v = F ln(F I/I0) / ln F), LOG with Sign -1, and LIN stored
    halved with RescaleSlope 2 and RescaleIntercept 500. All must give the DRR's line integrals
    to their quantisation wherever I/I0 > 1 %."""
    from xct_core.xray_io import load_xray

    p, pitch = _drr(env, "frontal")
    full = 65535.0
    inten = np.exp(-p)
    lin = np.rint(inten * full)
    log = np.rint(full * np.log(np.clip(inten * full, 1.0, None)) / np.log(full))
    resc = np.clip(np.rint((lin - 500.0) / 2.0), 0, None)
    files = {
        "lin": write_xray(tmp_path / "lin.dcm", lin, pitch=pitch),
        "lin_sign": write_xray(tmp_path / "lin_sign.dcm", full - lin, pitch=pitch, sign=-1),
        "log": write_xray(tmp_path / "log.dcm", log, pitch=pitch, relationship="LOG"),
        "log_sign": write_xray(tmp_path / "log_sign.dcm", full - log, pitch=pitch, relationship="LOG", sign=-1,
                               photometric="MONOCHROME1"),
        "rescaled": write_xray(tmp_path / "rescaled.dcm", resc, pitch=pitch, slope=2.0, intercept=500.0),
    }
    got = {k: load_xray(f, "frontal", env["params"]) for k, f in files.items()}
    ok = (inten > 0.01) & (lin >= 1500)  # (the rescaled file cannot hold values below its intercept 500)
    assert ok.mean() > 0.5
    tol = {"lin": 0.5 / full / 0.01, "lin_sign": 0.5 / full / 0.01, "log": 0.5 * np.log(full) / full,
           "log_sign": 0.5 * np.log(full) / full, "rescaled": 1.0 / full / 0.01}
    for k, x in got.items():
        np.testing.assert_allclose(x.image[ok], p[ok], atol=tol[k] + 1e-6, err_msg=k)
    assert "Sign -1" in " ".join(got["lin_sign"].notes) and "RescaleSlope 2" in " ".join(got["rescaled"].notes)
    # the log scale is an assumption DICOM leaves open: one warning line per LOG file
    assert len(got["log"].warnings) == 1 and "PixelIntensityRelationship LOG" in got["log"].warnings[0]
    assert not got["lin"].warnings


def test_unknown_intensity_relationship_is_refused(env: dict[str, Any], tmp_path: Path) -> None:
    from xct_core.xray_io import load_xray

    p, pitch = _drr(env, "frontal")
    lin = np.rint(np.exp(-p) * 65535.0)
    write_xray(tmp_path / "disp.dcm", lin, pitch=pitch, relationship="DISP")
    with pytest.raises(InputError, match="PixelIntensityRelationship 'DISP' is neither LIN nor LOG"):
        load_xray(tmp_path / "disp.dcm", "frontal", env["params"])
    write_xray(tmp_path / "sign2.dcm", lin, pitch=pitch, sign=2)
    with pytest.raises(InputError, match="PixelIntensityRelationshipSign 2 must be"):
        load_xray(tmp_path / "sign2.dcm", "frontal", env["params"])


# --------------------------------------------------------------------------- X-rays: PNG sBIT, blank images


def _png(path: Path, values: np.ndarray, sbit: int | None = None) -> Path:
    info = PngImagePlugin.PngInfo()
    if sbit is not None:
        info.add(b"sBIT", bytes([sbit]))
    Image.fromarray(np.ascontiguousarray(values, dtype=np.uint16)).save(path, pnginfo=info)
    return path


def test_png_sbit_sets_the_full_scale(env: dict[str, Any], tmp_path: Path) -> None:
    """12-bit data in a 16-bit PNG: stored as they are (0..4095, sBIT 12) the full scale is 4095;
    scaled to 16 bits as the PNG standard asks (v << 4 | v >> 8) it stays 65535. Both give the
    16-bit image's line integrals (before: off by ln 16 = 2.77 for the unscaled one)."""
    from xct_core.xray_io import load_xray

    p, _ = _drr(env, "lateral")
    inten = np.exp(-p)
    v12 = np.rint(inten * 4095).astype(np.uint16)
    f16 = load_xray(_png(tmp_path / "16.png", np.rint(inten * 65535)), "lateral", env["params"]).image
    raw = load_xray(_png(tmp_path / "raw12.png", v12, sbit=12), "lateral", env["params"])
    scaled = load_xray(_png(tmp_path / "scaled12.png", (v12 << 4) | (v12 >> 8), sbit=12), "lateral", env["params"])
    ok = inten > 0.02
    assert ok.mean() > 0.5
    for x in (raw, scaled):
        np.testing.assert_allclose(x.image[ok], f16[ok], atol=(0.5 / 4095 + 0.5 / 65535) / 0.02 + 1e-6)
    assert "value/4095 (sBIT 12" in raw.notes[0] and "value/65535 (sBIT 12" in scaled.notes[0]


def test_blank_png_pair_is_refused_with_one_line(env: dict[str, Any], tmp_path: Path, capsys) -> None:
    black = np.zeros((16, 16), np.uint16)
    f = _png(tmp_path / "f.png", black)
    lat = _png(tmp_path / "l.png", black)
    code, _, err = xct(_args(env, tmp_path / "ct.nii.gz", frontal=f, lateral=lat), capsys)
    _one_line_error(code, err, str(f), "constant image")
    assert not list(tmp_path.glob("ct*"))


# --------------------------------------------------------------------------- X-rays: the pair


def _dicom_pair(env: dict[str, Any], root: Path, **kw: Any) -> dict[str, Path]:
    """The frontal and lateral DRRs as LIN DX files; ``kw[view]``: write_xray options."""
    root.mkdir(parents=True, exist_ok=True)
    out = {}
    for view in ("frontal", "lateral"):
        p, pitch = _drr(env, view)
        out[view] = write_xray(root / f"{view}.dcm", np.rint(np.exp(-p) * 65535), pitch=pitch, **kw.get(view, {}))
    return out


def test_swapped_views_duplicates_and_mixed_patients_are_refused(env: dict[str, Any], tmp_path: Path,
                                                                 capsys) -> None:
    out = tmp_path / "ct.nii.gz"
    fine = _dicom_pair(env, tmp_path / "fine", frontal={"view_position": "PA", "patient_id": "P1"},
                       lateral={"view_position": "LL", "patient_id": "P1"})
    bad: dict[str, tuple[Path, Path, str, str]] = {
        "lateral as --frontal": (fine["lateral"], fine["frontal"], str(fine["lateral"]),
                                 "ViewPosition LL is a lateral view but it was given as --frontal"),
    }
    swap = _dicom_pair(env, tmp_path / "swap", frontal={"view_position": "PA"}, lateral={"view_position": "AP"})
    bad["PA as --lateral"] = (swap["frontal"], swap["lateral"], str(swap["lateral"]),
                              "ViewPosition AP is a frontal view but it was given as --lateral")
    plain = _dicom_pair(env, tmp_path / "plain")
    bad["same file"] = (plain["frontal"], plain["frontal"], str(plain["frontal"]),
                        "--frontal and --lateral are the same file")
    shutil.copyfile(plain["frontal"], tmp_path / "copy.dcm")
    bad["a copy"] = (plain["frontal"], tmp_path / "copy.dcm", str(tmp_path / "copy.dcm"),
                     "the lateral image is identical to the frontal one")
    mixed = _dicom_pair(env, tmp_path / "mixed", frontal={"patient_id": "P1", "view_position": "PA"},
                        lateral={"patient_id": "P2", "view_position": "LL"})
    bad["two patients"] = (mixed["frontal"], mixed["lateral"], str(mixed["lateral"]),
                           "different patients: PatientID 'P2' here, 'P1' in the frontal")
    for name, (f, lat, where, msg) in bad.items():
        code, _, err = xct(_args(env, out, frontal=f, lateral=lat), capsys)
        line = _one_line_error(code, err, where, msg)
        assert not list(tmp_path.glob("ct*")), (name, line)
    # control: the consistent pair runs with no input warning
    code, _, err = xct(_args(env, out, frontal=fine["frontal"], lateral=fine["lateral"]), capsys)
    assert code == 0, err
    assert not [ln for ln in err.splitlines() if "could not check" in ln]


def test_npy_pair_from_two_ct_checksums_is_refused(env: dict[str, Any], tmp_path: Path, capsys) -> None:
    """The sidecar JSONs of `xct drr` record the CT's sha256: pat0's frontal + pat1's lateral is refused."""
    lat = tmp_path / "lateral_pat1.npy"
    code, _, err = xct(["drr", str(env["cts"] / "pat1.nii.gz"), "--view", "lateral", "--out", str(lat),
                        "--params", str(env["pfile"])], capsys)
    assert code == 0, err
    want = json.loads((env["xr"] / "frontal.json").read_text())["ct"]["sha256"]
    assert json.loads(lat.with_suffix(".json").read_text())["ct"]["sha256"] != want
    code, _, err = xct(_args(env, tmp_path / "ct.nii.gz", lateral=lat), capsys)
    _one_line_error(code, err, str(lat), "rendered from a different CT than the frontal", want[:12])
    assert not list(tmp_path.glob("ct*"))


def test_metadata_that_cannot_tell_gives_one_warning_line(env: dict[str, Any], tmp_path: Path, capsys) -> None:
    """PNG inputs (no view, no patient) and DICOMs without ViewPosition/PatientID are reconstructed,
    with one warning line that says what could not be checked; recorded in the QA JSON too."""
    pngs = {}
    for view in ("frontal", "lateral"):
        p, _ = _drr(env, view)
        pngs[view] = _png(tmp_path / f"{view}.png", np.rint(np.exp(-p) * 65535))
    dcm = _dicom_pair(env, tmp_path / "dcm")
    for name, files in (("png", pngs), ("dicom", dcm)):
        out = tmp_path / f"{name}.nii.gz"
        code, _, err = xct(_args(env, out, frontal=files["frontal"], lateral=files["lateral"]), capsys)
        assert code == 0, err
        warn = [ln for ln in err.splitlines() if ln.startswith("xct: warning: could not check")]
        assert len(warn) == 1, err
        suffix = {"png": "png", "dicom": "dcm"}[name]
        assert "same patient" in warn[0] and f"frontal.{suffix} is a frontal view" in warn[0]
        qa = json.loads((tmp_path / f"{name}.qa.json").read_text())
        assert qa["input_warnings"] == [warn[0].removeprefix("xct: warning: ")]


# --------------------------------------------------------------------------- JPEG Lossless


def test_jpeg_lossless_series_and_radiograph_decode_exactly(env: dict[str, Any], tmp_path: Path) -> None:
    from xct_core.xray_io import load_xray

    raw = _raw_series(n=4)
    raw[:, 0, :] = [0, 65535] * 6  # extreme neighbours: the 2**16-modulo differences
    raw[1, 5, 5] = 32768
    write_series(tmp_path / "plain", raw, intercept=-32768.0)
    write_series(tmp_path / "jpeg", raw, intercept=-32768.0, jpeg_lossless=True)
    import pydicom

    ds = pydicom.dcmread(next((tmp_path / "jpeg").iterdir()), stop_before_pixels=True)
    assert ds.file_meta.TransferSyntaxUID == "1.2.840.10008.1.2.4.70"
    from xct_core.config import CTCheckParams

    lax = CTCheckParams(max_implausible_fraction=1.0)  # the extremes are not HU; exactness is the point
    np.testing.assert_array_equal(load_ct(tmp_path / "jpeg", lax).hu, load_ct(tmp_path / "plain", lax).hu)
    p, pitch = _drr(env, "frontal")
    lin = np.rint(np.exp(-p) * 65535)
    a = load_xray(write_xray(tmp_path / "plain.dcm", lin, pitch=pitch), "frontal", env["params"]).image
    b = load_xray(write_xray(tmp_path / "jl.dcm", lin, pitch=pitch, jpeg_lossless=True), "frontal",
                  env["params"]).image
    np.testing.assert_array_equal(a, b)


def test_jpeg_lossless_decoder_is_pinned() -> None:
    """A fresh clone installs the decoder: pylibjpeg-libjpeg pinned, at the installed version,
    in requirements/base.txt and requirements/lock.txt."""
    want = f"pylibjpeg-libjpeg=={version('pylibjpeg-libjpeg')}"
    for name in ("base.txt", "lock.txt"):
        lines = [ln.split("#")[0].strip() for ln in (REPO / "requirements" / name).read_text().splitlines()]
        assert want in lines, (name, want)


def test_missing_decoder_names_the_package(tmp_path: Path) -> None:
    """Without the plugin (pydicom's decoder for the syntax left with no available plugin, as in an
    environment installed without pylibjpeg-libjpeg) the one line names what to install, complete
    (it used to be cut before the package name)."""
    d = tmp_path / "jpeg"
    write_series(d, _raw_series(n=3), jpeg_lossless=True)
    code = ("from pydicom.pixels import get_decoder\n"
            "from pydicom.uid import JPEGLosslessSV1\n"
            "get_decoder(JPEGLosslessSV1).remove_plugin('pylibjpeg')  # as if pylibjpeg-libjpeg were absent\n"
            "from pipelines.cli import main\n"
            f"main(['ct', 'info', {str(d)!r}, '--params', {str(REPO / 'params.yaml')!r}])\n")
    r = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=120,
                       check=False)
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(lines) == 1 and lines[0].startswith("xct: error: "), r.stderr
    assert "no decoder for transfer syntax JPEG Lossless" in lines[0] and "1.2.840.10008.1.2.4.70" in lines[0]
    assert lines[0].rstrip().endswith("(pip install pylibjpeg pylibjpeg-libjpeg)"), lines[0]
