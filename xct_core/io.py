"""CT volume I/O: NIfTI and DICOM series → canonical RAS+ volumes in HU.

Canonical convention (every volume inside xct): array axes (i, j, k) point to the
patient's Right, Anterior and Superior (nibabel RAS+, ``aff2axcodes == ('R','A','S')``);
``affine`` maps voxel indices to world millimetres; values are Hounsfield units.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import nibabel as nib
import numpy as np


@dataclass
class CTVolume:
    """A CT volume in canonical RAS+ orientation, in HU."""

    hu: np.ndarray  # float32 [X, Y, Z], axes → R, A, S
    affine: np.ndarray  # float64 [4, 4], voxel → world mm
    source: str = ""
    meta: dict = field(default_factory=dict)

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(int(s) for s in self.hu.shape)  # type: ignore[return-value]

    @property
    def spacing(self) -> np.ndarray:
        """Voxel size along i, j, k in mm."""
        return np.sqrt((np.asarray(self.affine)[:3, :3] ** 2).sum(axis=0))


def _atomic_target(path: Path) -> tuple[int, str]:
    path.parent.mkdir(parents=True, exist_ok=True)
    suffix = "".join(path.suffixes) or ".tmp"
    return tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix, dir=path.parent)


def save_nifti(path: str | Path, hu: np.ndarray, affine: np.ndarray) -> Path:
    """Write an int16 HU NIfTI (qform = sform = affine), atomically (temp file + rename)."""
    path = Path(path)
    data = np.clip(np.rint(np.asarray(hu, dtype=np.float64)), -32768, 32767).astype(np.int16)
    img = nib.Nifti1Image(data, np.asarray(affine, dtype=np.float64))
    img.set_qform(img.affine, code=1)
    img.set_sform(img.affine, code=1)
    img.header.set_xyzt_units("mm", "sec")
    fd, tmp = _atomic_target(path)
    os.close(fd)
    try:
        nib.save(img, tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path
