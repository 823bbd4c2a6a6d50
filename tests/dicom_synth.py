"""Synthetic CT DICOM series and NIfTI files for I/O tests (small, written with pydicom/nibabel).

Not a test module (no ``test_`` prefix): imported by tests/test_io.py and tests/test_cli_ct.py.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import nibabel as nib
import numpy as np
from pydicom.dataset import FileDataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

MR_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.4"


def write_slice(
    path: Path,
    raw: np.ndarray,
    ipp: Sequence[float],
    iop: Sequence[float] = (1, 0, 0, 0, 1, 0),
    pixel_spacing: Sequence[float] = (1.0, 1.0),
    slope: float = 1.0,
    intercept: float = -1024.0,
    series_uid: str = "1.2.3.4.5",
    sop_class: str = CTImageStorage,
    instance: int = 1,
    image_type: Sequence[str] = ("ORIGINAL", "PRIMARY", "AXIAL"),
) -> Path:
    """One CT slice: ``raw`` uint16 [rows, cols]; ``pixel_spacing`` = [between rows, between cols] mm."""
    raw = np.ascontiguousarray(raw, dtype=np.uint16)
    sop_uid = generate_uid()
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = sop_uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = FileDataset(str(path), {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = sop_uid
    ds.Modality = "CT" if sop_class == CTImageStorage else "MR"
    ds.ImageType = list(image_type)
    ds.StudyInstanceUID = "1.2.3.4"
    ds.SeriesInstanceUID = series_uid
    ds.InstanceNumber = instance
    ds.ImagePositionPatient = [f"{v:.6f}" for v in ipp]
    ds.ImageOrientationPatient = [f"{v:.6f}" for v in iop]
    ds.PixelSpacing = [f"{v:.6f}" for v in pixel_spacing]
    ds.Rows, ds.Columns = raw.shape
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = 16
    ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 0
    ds.RescaleSlope = f"{slope:g}"
    ds.RescaleIntercept = f"{intercept:g}"
    ds.RescaleType = "HU"
    ds.PixelData = raw.tobytes()
    ds.save_as(path, enforce_file_format=True)
    return path


def write_series(
    directory: Path,
    raw: np.ndarray,
    ipp0: Sequence[float] = (-10.0, -20.0, 30.0),
    iop: Sequence[float] = (1, 0, 0, 0, 1, 0),
    pixel_spacing: Sequence[float] = (1.0, 1.0),
    gap: float = 2.5,
    shuffle_seed: int | None = 0,
    **kw,
) -> list[Path]:
    """A series from ``raw`` uint16 [n_slices, rows, cols]; slice s sits at ipp0 + s·gap·normal.

    File names are random (seeded) so that name order is not spatial order; returns the
    paths in slice order (s = 0, 1, ...).
    """
    directory.mkdir(parents=True, exist_ok=True)
    iop_a = np.asarray(iop, dtype=float)
    normal = np.cross(iop_a[:3], iop_a[3:])
    n = raw.shape[0]
    rng = np.random.default_rng(shuffle_seed)
    names = rng.permutation(n) if shuffle_seed is not None else np.arange(n)
    paths = []
    for s in range(n):
        ipp = np.asarray(ipp0, dtype=float) + s * gap * normal
        p = directory / f"IM{int(names[s]):04d}_{int(rng.integers(1e6)):06d}.dcm"
        write_slice(p, raw[s], ipp, iop, pixel_spacing, instance=int(names[s]) + 1, **kw)
        paths.append(p)
    return paths


def write_nifti(
    path: Path,
    data: np.ndarray,
    affine: np.ndarray | None,
    codes: tuple[int, int] = (1, 1),
    slope_inter: tuple[float, float] | None = None,
) -> Path:
    """A NIfTI with the data's own dtype, qform/sform codes ``codes`` and optional scaling."""
    img = nib.Nifti1Image(data, None)
    if affine is not None:
        img.set_sform(affine, code=codes[1])
        # a qform must be decomposable (no zero/singular axes): leave it unset when code 0
        img.set_qform(affine if codes[0] else None, code=codes[0])
    if slope_inter is not None:
        img.header.set_slope_inter(*slope_inter)
    nib.save(img, str(path))
    return path
