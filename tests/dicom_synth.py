"""Synthetic CT DICOM series and NIfTI files for I/O tests (small, written with pydicom/nibabel).

Not a test module (no ``test_`` prefix): imported by tests/test_io.py and tests/test_cli_ct.py.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import nibabel as nib
import numpy as np
from pydicom.dataset import FileDataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, JPEGLosslessSV1, generate_uid

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
    jpeg_lossless: bool = False,
    pixels: bool = True,
) -> Path:
    """One CT slice: ``raw`` uint16 [rows, cols]; ``pixel_spacing`` = [between rows, between cols] mm.

    ``jpeg_lossless``: store the pixels as JPEG Lossless SV1 (1.2.840.10008.1.2.4.70, encoded by
    :func:`jpeg_lossless_sv1`); ``pixels=False``: no PixelData element at all."""
    raw = np.ascontiguousarray(raw, dtype=np.uint16)
    sop_uid = generate_uid()
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = sop_uid
    meta.TransferSyntaxUID = JPEGLosslessSV1 if jpeg_lossless else ExplicitVRLittleEndian
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
    if jpeg_lossless:
        ds.PixelData = encapsulate([jpeg_lossless_sv1(raw)])
        ds["PixelData"].VR = "OB"
        ds["PixelData"].is_undefined_length = True
    elif pixels:
        ds.PixelData = raw.tobytes()
    ds.save_as(path, enforce_file_format=True)
    return path


def jpeg_lossless_sv1(img: np.ndarray) -> bytes:
    """A JPEG Lossless, Non-Hierarchical, First-Order Prediction codestream (ITU-T T.81 Annex H,
    process 14, selection value 1, 16-bit precision, one component, no restart intervals) of a
    uint16 ``[rows, cols]`` image — pydicom has no encoder for this syntax, so tests build one.

    Prediction: 2**15 for the first pixel, the left neighbour along the first row, the pixel above
    at the start of every other row, the left neighbour elsewhere; differences modulo 2**16 are
    Huffman coded (one DC table giving each of the 17 categories a 5-bit code) followed by their
    SSSS extra bits (T.81 F.1.2.1), with 0xFF byte stuffing."""
    x = np.asarray(img, dtype=np.int64)
    rows, cols = x.shape
    pred = np.empty_like(x)
    pred[0, 0] = 1 << 15
    pred[0, 1:] = x[0, :-1]
    pred[1:, 0] = x[:-1, 0]
    pred[1:, 1:] = x[1:, :-1]
    diff = (x - pred) % 65536
    diff = np.where(diff > 32768, diff - 65536, diff)  # -32767 .. 32768
    bits: list[str] = []
    for d in diff.ravel().tolist():
        ssss = 16 if d == 32768 else abs(d).bit_length()
        bits.append(format(ssss, "05b"))  # canonical codes of 17 symbols, all 5 bits long: 0..16
        if 0 < ssss < 16:
            bits.append(format(d if d > 0 else d + (1 << ssss) - 1, f"0{ssss}b"))
    stream = "".join(bits)
    stream += "1" * (-len(stream) % 8)  # pad with 1-bits to a byte boundary
    data = bytearray()
    for i in range(0, len(stream), 8):
        byte = int(stream[i : i + 8], 2)
        data.append(byte)
        if byte == 0xFF:
            data.append(0x00)  # byte stuffing

    def segment(marker: int, payload: bytes) -> bytes:
        return bytes([0xFF, marker]) + (len(payload) + 2).to_bytes(2, "big") + payload

    sof3 = bytes([16]) + rows.to_bytes(2, "big") + cols.to_bytes(2, "big") + bytes([1, 1, 0x11, 0])
    dht = bytes([0x00]) + bytes([0, 0, 0, 0, 17] + [0] * 11) + bytes(range(17))
    sos = bytes([1, 1, 0x00, 1, 0, 0])  # Ns 1, Cs 1, Td/Ta 0, Ss = predictor 1, Se 0, Ah/Al 0
    return (b"\xff\xd8" + segment(0xC3, sof3) + segment(0xC4, dht) + segment(0xDA, sos) + bytes(data)
            + b"\xff\xd9")


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


DX_STORAGE = "1.2.840.10008.5.1.4.1.1.1.1"  # Digital X-Ray Image Storage - For Presentation


def write_xray(
    path: Path,
    stored: np.ndarray,
    *,
    pitch: float,
    bits: int = 16,
    photometric: str = "MONOCHROME2",
    relationship: str | None = "LIN",
    sign: int | None = 1,
    slope: float = 1.0,
    intercept: float = 0.0,
    view_position: str | None = None,
    patient_id: str | None = None,
    jpeg_lossless: bool = False,
) -> Path:
    """A DX radiograph holding ``stored`` (uint16 [rows, cols]) as they are: the caller encodes the
    intensity (LIN/LOG, Sign, rescale); ``None`` leaves an attribute out of the file."""
    stored = np.ascontiguousarray(stored, dtype=np.uint16)
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = DX_STORAGE
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = JPEGLosslessSV1 if jpeg_lossless else ExplicitVRLittleEndian
    ds = FileDataset(str(path), {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID = DX_STORAGE
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.Modality = "DX"
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.ImageType = ["ORIGINAL", "PRIMARY", ""]
    if patient_id is not None:
        ds.PatientID = patient_id
    if view_position is not None:
        ds.ViewPosition = view_position
    ds.ImagerPixelSpacing = [f"{pitch:g}", f"{pitch:g}"]
    ds.Rows, ds.Columns = stored.shape
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = photometric
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, bits, bits - 1, 0
    ds.RescaleSlope, ds.RescaleIntercept, ds.RescaleType = f"{slope:g}", f"{intercept:g}", "US"
    if relationship is not None:
        ds.PixelIntensityRelationship = relationship
    if sign is not None:
        ds.PixelIntensityRelationshipSign = sign
    if jpeg_lossless:
        ds.PixelData = encapsulate([jpeg_lossless_sv1(stored)])
        ds["PixelData"].VR = "OB"
        ds["PixelData"].is_undefined_length = True
    else:
        ds.PixelData = stored.tobytes()
    ds.save_as(path, enforce_file_format=True)
    return path
