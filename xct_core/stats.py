"""Per-volume statistics, checksums, duplicate detection and the patient split (pipeline step 1).

Pure numpy/nibabel/pydicom: the Great Expectations suite that judges these numbers lives in
``components/validate.py``; the step that writes them in ``components/ingest.py``.

A *source* is one CT as it arrives in ``data/raw``: a ``.nii``/``.nii.gz`` file, or a
directory that directly holds DICOM files (one series). Each source becomes one row of the
stats table (:data:`STATS_COLUMNS`), including sources that fail to load: their row has
``status = "error"`` and the loader's message in ``error``, plus whatever a lenient probe
could still read (header geometry, NaN counts, value range) so validation can say more.

Conventions
-----------
- Geometry of loaded volumes is canonical RAS+ (``shape_x`` = voxels towards the patient's
  right, …); spacings and extents in mm. For rows that failed to load, geometry is in the
  source's own axis order (it could not be canonicalised).
- HU statistics (min, max, p1, p50, p99, mean) are over the finite voxels, in HU.
- ``body_fraction`` = fraction of voxels strictly above ``body_hu`` (default -500 HU).
- ``slice_gap_*``: distances (mm) between consecutive slice positions. DICOM: from
  ImagePositionPatient along the slice normal; NIfTI: the spacing of the third source axis.
- ``sha256``: a single file's plain sha256 (``sha256sum`` agrees); a DICOM directory: sha256
  over the lines ``"<name>  <sha256>\\n"`` of its files, sorted by name.
- ``data_sha256``: sha256 over the canonical int16 voxel data and shape (the bytes a saved
  volume holds), so two files with the same voxels but different headers are duplicates.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import nibabel as nib
import numpy as np
import pydicom
from pydicom.errors import InvalidDicomError

from xct_core.config import CTCheckParams, IngestParams, LimitsParams
from xct_core.errors import InputError
from xct_core.io import CTVolume, check_nifti_claim, load_ct, orientation_codes

#: the columns of the stats table, in order (CSV header; JSON rows have the same keys)
STATS_COLUMNS: tuple[str, ...] = (
    "id", "patient_id", "source", "format", "status", "error", "n_files",
    "source_shape", "source_ndim", "source_dtype", "source_orientation",
    "shape_x", "shape_y", "shape_z", "n_voxels",
    "spacing_x", "spacing_y", "spacing_z", "spacing_min", "spacing_max",
    "extent_x_mm", "extent_y_mm", "extent_z_mm",
    "hu_min", "hu_max", "hu_p1", "hu_p50", "hu_p99", "hu_mean",
    "nan_count", "inf_count", "body_fraction",
    "slice_gap_mm", "slice_gap_min_mm", "slice_gap_max_mm",
    "sha256", "data_sha256", "duplicate_of", "duplicate_kind",
    "volume", "volume_sha256",
)  # fmt: skip

#: bump when the meaning or computation of a column changes (invalidates ingest's cache)
STATS_VERSION = 1

SPLITS = ("train", "val", "test")
_NIFTI_SUFFIXES = (".nii.gz", ".nii")
_ID_SAFE = re.compile(r"[^A-Za-z0-9._-]+")


# --------------------------------------------------------------------------- discovery


@dataclass(frozen=True)
class Source:
    """One raw CT: a NIfTI file or a directory holding one DICOM series."""

    id: str  #: unique, filename-safe (relative path, ``/`` → ``__``, NIfTI suffix dropped)
    path: Path  #: the file or directory
    rel: str  #: POSIX path relative to the raw root ("." when the root itself is the series)
    kind: Literal["nifti", "dicom"]
    files: tuple[Path, ...]  #: the files the checksum covers (sorted by name)


def _is_nifti(name: str) -> bool:
    return name.lower().endswith(_NIFTI_SUFFIXES)


def _strip_nifti(name: str) -> str:
    low = name.lower()
    for suf in _NIFTI_SUFFIXES:
        if low.endswith(suf):
            return name[: -len(suf)]
    return name


def is_dicom_file(path: Path) -> bool:
    """True when ``path`` has the DICOM Part 10 preamble (128 bytes, then ``DICM``)."""
    try:
        with open(path, "rb") as f:
            head = f.read(132)
    except OSError:
        return False
    return len(head) == 132 and head[128:132] == b"DICM"


def _dir_files(directory: Path) -> list[Path]:
    """Regular, non-hidden files directly inside ``directory`` (what the DICOM loader reads)."""
    return sorted(p for p in directory.iterdir() if p.is_file() and not p.name.startswith("."))


def discover(raw_dir: str | Path) -> tuple[list[Source], list[str]]:
    """Find every CT under ``raw_dir`` (recursively; hidden files and folders are skipped).

    Returns the sources sorted by relative path, and the relative paths of the files that are
    neither NIfTI nor part of a DICOM directory (README, CSV, …: reported, not loaded). A file
    named ``.nii``/``.nii.gz`` is a source even when it is corrupt (its load error is then
    recorded); a directory is a DICOM source when at least one of its files has the DICOM
    preamble. Raises :class:`InputError` when ``raw_dir`` is not a directory.
    """
    root = Path(raw_dir)
    if not root.is_dir():
        raise InputError(root, "not a directory (expected a folder of NIfTI files and/or DICOM series)")
    found: list[tuple[str, Path, Literal["nifti", "dicom"], tuple[Path, ...]]] = []
    ignored: list[str] = []
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        here = Path(dirpath)
        rel_dir = here.relative_to(root).as_posix()
        names = sorted(n for n in filenames if not n.startswith(".") and (here / n).is_file())
        other: list[str] = []
        for n in names:
            rel = n if rel_dir == "." else f"{rel_dir}/{n}"
            if _is_nifti(n):
                found.append((rel, here / n, "nifti", (here / n,)))
            else:
                other.append(rel)
        non_nifti = [here / n for n in names if not _is_nifti(n)]
        if any(p.name.upper() != "DICOMDIR" and is_dicom_file(p) for p in non_nifti):
            found.append((rel_dir, here, "dicom", tuple(non_nifti)))
        else:
            ignored.extend(other)
    found.sort(key=lambda t: t[0])
    sources: list[Source] = []
    taken: set[str] = set()
    for rel, path, kind, files in found:
        base = _strip_nifti(rel) if kind == "nifti" else rel
        if base == ".":
            base = root.resolve().name or "series"
        sid = _ID_SAFE.sub("_", base.replace("/", "__")).strip("_") or "volume"
        cand, k = sid, 2
        while cand in taken:
            cand, k = f"{sid}_{k}", k + 1
        taken.add(cand)
        sources.append(Source(id=cand, path=path, rel=rel, kind=kind, files=files))
    return sources, sorted(ignored)


# --------------------------------------------------------------------------- checksums


def file_sha256(path: str | Path) -> str:
    """sha256 of a file's bytes (hex; ``sha256sum`` agrees). THE file checksum of the project:
    ingest, validate, preprocess, register and ``xct drr`` all call this one."""
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def source_sha256(src: Source) -> str:
    """Checksum of a source: the file's sha256, or for a DICOM directory the sha256 of its
    sorted ``"<name>  <sha256>\\n"`` manifest (renaming the directory keeps it)."""
    if src.kind == "nifti":
        return file_sha256(src.path)
    manifest = "".join(f"{p.name}  {file_sha256(p)}\n" for p in src.files)
    return hashlib.sha256(manifest.encode()).hexdigest()


def data_sha256(hu: np.ndarray) -> str:
    """sha256 of the voxel data as saved: HU rounded to int16 (C order), plus the shape."""
    q = np.clip(np.rint(np.asarray(hu, dtype=np.float64)), -32768, 32767).astype("<i2")
    h = hashlib.sha256(json.dumps([int(s) for s in q.shape]).encode())
    h.update(np.ascontiguousarray(q).tobytes())
    return h.hexdigest()


# --------------------------------------------------------------------------- statistics


def _empty_row() -> dict[str, Any]:
    return {c: None for c in STATS_COLUMNS}


def _geometry(shape: Sequence[int], spacing: Sequence[float]) -> dict[str, Any]:
    shp = [int(s) for s in shape[:3]]
    sp = [float(s) for s in spacing[:3]]
    out: dict[str, Any] = {
        "n_voxels": int(np.prod(shp, dtype=np.int64)),
        "spacing_min": min(sp),
        "spacing_max": max(sp),
    }
    for ax, n, s in zip("xyz", shp, sp):
        out[f"shape_{ax}"] = n
        out[f"spacing_{ax}"] = s
        out[f"extent_{ax}_mm"] = n * s
    return out


def value_stats(values: np.ndarray, body_hu: float = -500.0) -> dict[str, Any]:
    """HU statistics over the finite voxels of any array, plus NaN/Inf counts.

    ``body_fraction`` is over all voxels (non-finite ones count as not-body). When no voxel is
    finite the HU fields are None.
    """
    a = np.asarray(values)
    if a.dtype.kind != "f":
        a = a.astype(np.float32)
    nan = int(np.count_nonzero(np.isnan(a)))
    inf = int(np.count_nonzero(np.isinf(a)))
    fin = a[np.isfinite(a)] if nan or inf else a.reshape(-1)
    out: dict[str, Any] = {"nan_count": nan, "inf_count": inf}
    if fin.size == 0:
        out.update(dict.fromkeys(("hu_min", "hu_max", "hu_p1", "hu_p50", "hu_p99", "hu_mean"), None))
        out["body_fraction"] = 0.0
        return out
    p1, p50, p99 = np.percentile(fin, (1, 50, 99))
    out.update(
        hu_min=float(fin.min()),
        hu_max=float(fin.max()),
        hu_p1=float(p1),
        hu_p50=float(p50),
        hu_p99=float(p99),
        hu_mean=float(fin.mean(dtype=np.float64)),
        body_fraction=float(np.count_nonzero(fin > body_hu)) / a.size,
    )
    return out


def volume_stats(vol: CTVolume, body_hu: float = -500.0) -> dict[str, Any]:
    """Geometry (canonical RAS+), HU statistics and the voxel checksum of a loaded volume."""
    row = _geometry(vol.shape, vol.spacing)
    row.update(value_stats(vol.hu, body_hu))
    row["data_sha256"] = data_sha256(vol.hu)
    return row


def nifti_slice_gaps(affine: np.ndarray) -> dict[str, float]:
    """Slice gap of a NIfTI: the length of the third source axis (mm); uniform by construction."""
    gap = float(np.sqrt((np.asarray(affine, dtype=np.float64)[:3, 2] ** 2).sum()))
    return {"slice_gap_mm": gap, "slice_gap_min_mm": gap, "slice_gap_max_mm": gap}


def dicom_header_probe(files: Iterable[Path]) -> dict[str, Any]:
    """Lenient header pass over a DICOM directory: slice-gap statistics and the PatientID.

    Reads headers only (no pixel data). Slice positions are ``ImagePositionPatient · n`` with
    ``n`` the normal of the first file's ImageOrientationPatient; gaps are the differences of
    the sorted positions (median, min, max, mm). Files without usable geometry are ignored;
    fields that cannot be computed are absent.
    """
    positions: list[float] = []
    normal: np.ndarray | None = None
    patient = ""
    n_dicom = 0
    for p in files:
        try:
            ds = pydicom.dcmread(p, stop_before_pixels=True)
        except (InvalidDicomError, OSError):
            continue
        except Exception:  # noqa: BLE001  corrupt header: the loader reports it with the reason
            continue
        n_dicom += 1
        patient = patient or str(ds.get("PatientID", "") or "").strip()
        try:
            ipp = np.array([float(v) for v in ds.ImagePositionPatient])
            if normal is None:
                iop = np.array([float(v) for v in ds.ImageOrientationPatient])
                nrm = np.cross(iop[:3], iop[3:])
                if not np.linalg.norm(nrm) > 0:
                    continue
                normal = nrm / np.linalg.norm(nrm)
            positions.append(float(ipp @ normal))
        except Exception:  # missing/garbled geometry tags
            continue
    out: dict[str, Any] = {"n_dicom_files": n_dicom}
    if patient:
        out["patient_id"] = patient
    if len(positions) >= 2:
        gaps = np.diff(np.sort(np.asarray(positions)))
        out.update(
            slice_gap_mm=float(np.median(gaps)),
            slice_gap_min_mm=float(gaps.min()),
            slice_gap_max_mm=float(gaps.max()),
        )
    return out


def probe_nifti(path: Path, body_hu: float = -500.0, limits: LimitsParams | None = None) -> dict[str, Any]:
    """Whatever a lenient read of a NIfTI that :func:`load_ct` rejected still tells.

    Header: source shape/ndim/dtype, spacing (header zooms of the first three axes, source
    order), orientation codes. Data (when it can be read and the header's size claim passes
    :func:`xct_core.io.check_nifti_claim` with ``limits``): HU statistics over all voxels (4D
    included), NaN/Inf counts. Never raises; unreadable parts are simply absent.
    """
    out: dict[str, Any] = {}
    try:
        img = nib.load(str(path))
        shape = tuple(int(s) for s in img.shape)
    except Exception:
        return out
    out["source_shape"] = "x".join(map(str, shape))
    out["source_ndim"] = len(shape)
    try:
        out["source_dtype"] = str(img.get_data_dtype())
    except Exception:
        pass
    if len(shape) >= 3:
        try:
            zooms = [float(z) for z in img.header.get_zooms()[:3]]
            out.update(_geometry(shape, zooms))
        except Exception:
            pass
    try:
        aff = np.asarray(img.affine, dtype=np.float64)
        if np.all(np.isfinite(aff)):
            out["source_orientation"] = "".join(orientation_codes(aff))
            if len(shape) >= 3:
                out.update(nifti_slice_gaps(aff))
    except Exception:
        pass
    try:
        check_nifti_claim(path, img, limits)  # never allocate what a forged header claims
        data = np.asarray(img.dataobj)
        out.update(value_stats(data, body_hu))
    except Exception:  # an implausible size claim, a truncated or corrupt data block
        pass
    return out


def patient_of(volume_id: str, dicom_patient: str | None, patient_regex: str | None) -> str:
    """The patient a volume belongs to: ``patient_regex`` group 1 on the id, else the DICOM
    PatientID, else the volume id itself (every volume its own patient)."""
    if patient_regex:
        m = re.search(patient_regex, volume_id)
        if m and m.group(1):
            return m.group(1)
    return dicom_patient or volume_id


def measure(
    src: Source,
    checks: CTCheckParams | None = None,
    ingest: IngestParams | None = None,
    sha256: str | None = None,
    limits: LimitsParams | None = None,
) -> tuple[dict[str, Any], CTVolume | None]:
    """Load one source with :func:`load_ct` (size ``limits``: ``params.limits``) and compute
    its stats-table row.

    Returns ``(row, volume)``; on a load error (an :class:`InputError`) ``row['status']`` is
    ``"error"``, ``row['error']`` the message and ``volume`` None: the row is still filled
    from a lenient probe as far as possible. ``row['volume']``/``volume_sha256`` are left for
    the caller (who decides where the canonical volume goes).
    """
    ingest = ingest or IngestParams()
    row = _empty_row()
    row.update(id=src.id, source=src.rel, format=src.kind, n_files=len(src.files))
    row["sha256"] = sha256 if sha256 is not None else source_sha256(src)
    dicom_patient = None
    if src.kind == "dicom":
        head = dicom_header_probe(src.files)
        dicom_patient = head.pop("patient_id", None)
        head.pop("n_dicom_files", None)
        row.update(head)
    vol: CTVolume | None
    try:
        vol = load_ct(src.path, checks, limits=limits)
    except InputError as e:
        vol = None
        # the message without the source path when it names the source itself
        msg = e.problem if e.path == str(src.path) else str(e)
        row.update(status="error", error=msg)
        if src.kind == "nifti":
            row.update(probe_nifti(src.path, ingest.body_hu, limits))
    else:
        row["status"] = "ok"
        row.update(volume_stats(vol, ingest.body_hu))
        meta = vol.meta
        src_shape = meta.get("source_shape", vol.shape)
        row.update(
            source_shape="x".join(str(int(s)) for s in src_shape),
            source_ndim=len(src_shape),
            source_dtype=meta.get("source_dtype", "dicom" if src.kind == "dicom" else None),
            source_orientation="".join(meta.get("source_orientation", ())),
        )
        if src.kind == "nifti" and "source_affine" in meta:
            row.update(nifti_slice_gaps(meta["source_affine"]))
    row["patient_id"] = patient_of(src.id, dicom_patient, ingest.patient_regex)
    return row, vol


# --------------------------------------------------------------------------- duplicates


def mark_duplicates(rows: list[dict[str, Any]]) -> None:
    """Fill ``duplicate_of``/``duplicate_kind`` in place: a row whose source checksum, or whose
    voxel data checksum, equals that of an earlier row (rows in id order) is a duplicate of
    that row ("same file" / "same voxel data"). The first copy is not marked."""
    by_file: dict[str, str] = {}
    by_data: dict[str, str] = {}
    for row in sorted(rows, key=lambda r: r["id"]):
        row["duplicate_of"] = row["duplicate_kind"] = None
        f, d = row.get("sha256"), row.get("data_sha256")
        if f and f in by_file:
            row["duplicate_of"], row["duplicate_kind"] = by_file[f], "same file"
        elif d and d in by_data:
            row["duplicate_of"], row["duplicate_kind"] = by_data[d], "same voxel data"
        if f:
            by_file.setdefault(f, row["id"])
        if d:
            by_data.setdefault(d, row["id"])


# --------------------------------------------------------------------------- split


def split_counts(n: int, fractions: Sequence[float], min_eval: int = 2) -> tuple[int, int, int]:
    """How many of ``n`` patients go to (train, val, test).

    Largest-remainder apportionment of ``n`` over the fractions (ties: train, test, val),
    then val and test (when their fraction > 0) are raised, one patient at a time taken from
    train and alternating test/val, towards ``min_eval`` — but only while train keeps at least
    as many patients as val and test together. So 24 patients at 0.7/0.15/0.15 → (17, 3, 4),
    10 → (6, 2, 2), 7 → (4, 1, 2), 5 → (3, 1, 1), 3 → (2, 0, 1), 2 → (1, 0, 1), 1 → (1, 0, 0).
    """
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    fr = [float(f) for f in fractions]
    if len(fr) != 3 or min(fr) < 0 or abs(sum(fr) - 1.0) > 1e-6:
        raise ValueError(f"fractions must be three non-negative numbers summing to 1, got {fractions!r}")
    exact = [f * n for f in fr]
    counts = [math.floor(e) for e in exact]
    order = sorted(range(3), key=lambda k: (-(exact[k] - counts[k]), (0, 2, 1)[k]))
    for k in order[: n - sum(counts)]:
        counts[k] += 1
    changed = True
    while changed:
        changed = False
        for k in (2, 1):
            if fr[k] > 0 and counts[k] < min_eval and counts[0] - 1 >= counts[1] + counts[2] + 1:
                counts[0] -= 1
                counts[k] += 1
                changed = True
    return counts[0], counts[1], counts[2]


def _rank_key(seed: int, patient: str) -> str:
    return hashlib.sha256(f"{seed}:{patient}".encode()).hexdigest()


def assign_splits(
    patients: Mapping[str, str],
    fractions: Sequence[float] = (0.7, 0.15, 0.15),
    min_eval: int = 2,
    seed: int = 0,
) -> dict[str, Any]:
    """Split volumes by patient: ``patients`` maps volume id → patient id.

    Patients are ranked by ``sha256(f"{seed}:{patient}")`` (deterministic, independent of
    input order and of the other patients: adding or removing a patient moves others only
    across a split boundary); the first ``n_test`` go to test, the next ``n_val`` to val, the
    rest to train (counts from :func:`split_counts`). Returns
    ``{"patients": {split: [patient ids]}, "volumes": {split: [volume ids]}}``, lists sorted.
    """
    uniq = sorted(set(patients.values()), key=lambda p: (_rank_key(seed, p), p))
    n_train, n_val, n_test = split_counts(len(uniq), fractions, min_eval)
    group = {
        "test": uniq[:n_test],
        "val": uniq[n_test : n_test + n_val],
        "train": uniq[n_test + n_val :],
    }
    where = {p: s for s, ps in group.items() for p in ps}
    vols: dict[str, list[str]] = {s: [] for s in SPLITS}
    for vid, p in patients.items():
        vols[where[p]].append(vid)
    return {
        "patients": {s: sorted(group[s]) for s in SPLITS},
        "volumes": {s: sorted(vols[s]) for s in SPLITS},
    }


def make_splits(rows: Sequence[Mapping[str, Any]], ingest: IngestParams | None = None) -> dict[str, Any]:
    """The splits document for a stats table: loaded volumes split by patient; volumes that
    failed to load are listed under ``excluded`` with their error (never silently dropped)."""
    ingest = ingest or IngestParams()
    ok = {r["id"]: r["patient_id"] for r in rows if r["status"] == "ok"}
    fr = (ingest.train_fraction, ingest.val_fraction, ingest.test_fraction)
    doc = {
        "seed": ingest.split_seed,
        "fractions": dict(zip(SPLITS, fr)),
        "min_eval_patients": ingest.min_eval_patients,
        **assign_splits(ok, fr, ingest.min_eval_patients, ingest.split_seed),
        "excluded": {r["id"]: f"load error: {r['error']}" for r in rows if r["status"] != "ok"},
    }
    return doc


def drop_from_splits(splits: Mapping[str, Any], reasons: Mapping[str, str]) -> dict[str, Any]:
    """A copy of a splits document without the volumes in ``reasons`` (id → reason), which are
    added to ``excluded``; patients left without volumes disappear from ``patients``."""
    out = json.loads(json.dumps(splits))
    vols = out["volumes"]
    for s in SPLITS:
        vols[s] = [v for v in vols.get(s, []) if v not in reasons]
    excluded = dict(out.get("excluded", {}))
    for vid, why in reasons.items():
        excluded.setdefault(vid, why)
    out["excluded"] = dict(sorted(excluded.items()))
    return out


# --------------------------------------------------------------------------- table I/O


from xct_core.atomic import write_text_atomic  # noqa: E402,F401  (re-exported: one implementation)
from xct_core.jsondoc import json_text, read_json_doc  # noqa: E402,F401  (re-exported: one implementation)


def table_csv(rows: Sequence[Mapping[str, Any]]) -> str:
    """The stats table as CSV (header :data:`STATS_COLUMNS`; None → empty cell)."""
    import csv
    import io

    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(STATS_COLUMNS)
    for r in rows:
        w.writerow(["" if r.get(c) is None else r.get(c) for c in STATS_COLUMNS])
    return buf.getvalue()


def read_stats(path: str | Path) -> dict[str, Any]:
    """Read ``stats.json`` written by ingest (``{"volumes": [rows], "raw_dir": …, …}``).

    Raises :class:`InputError` when it is missing or malformed.
    """
    p = Path(path)
    doc = read_json_doc(p, "stats table", missing_hint="run the ingest step first")
    if not isinstance(doc.get("volumes"), list):
        raise InputError(p, "not an xct stats table (no 'volumes' list)")
    for r in doc["volumes"]:
        if not isinstance(r, dict) or "id" not in r or "status" not in r:
            raise InputError(p, "not an xct stats table (rows need 'id' and 'status')")
        for c in STATS_COLUMNS:
            r.setdefault(c, None)
    return doc
