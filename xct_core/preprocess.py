"""Pipeline step 3 core: one canonical CT → its stage grids (int16 HU) and DRR pair.

Pure per-volume logic and the on-disk contract; the step that fans it out over a process
pool or Ray Data is ``components/preprocess.py``; the reader is :mod:`xct_core.data`.

Layout of the processed folder ``OUT`` (a contract for training and evaluation)
-------------------------------------------------------------------------------
::

    OUT/stage{k}/{id}.npy   int16 [S, S, S] HU, S = stages.stage{k}.size, axes (i, j, k) = RAS+
    OUT/xrays/{id}.npz      frontal, lateral: float32 [P, P] line integrals ∫mu dl (dimensionless),
                            P = drr.pixels; geometry: JSON string (see below)
    OUT/xrays_honest/{id}.npz   VAL and TEST ids only: the same views as a detector records them
                            (the honest protocol, :mod:`xct_core.detector`; same keys, geometry
                            JSON with ``protocol`` and ``detector``)
    OUT/manifest.json       ids per split (after quarantine), stage grids, DRR settings, the
                            params digest of the sections that affect the output, per-file sha256
    OUT/records/{id}.json   per-item bookkeeping for resumable re-runs (internal)

Grids. Stage ``k`` is an isotropic cube of ``size``³ voxels of ``fov_mm / size`` mm covering
``fov_mm`` (the same FOV at every stage), centred on the volume centre
(:attr:`xct_core.io.CTVolume.center_world`), produced by
:func:`xct_core.io.resample_to_grid` (trilinear, optional Gaussian anti-aliasing, voxels
outside the source = ``preprocess.fill_hu``). Its affine is
``grid_affine((S,)*3, fov/S, center_world)`` with ``center_world`` recorded per id in the
manifest; this is :func:`xct_core.models.stage_affine` translated by ``center_world``.
Geometry is relative to the isocentre (= the grid centre), so the model may use the
origin-centred affine.

HU are stored **full range, un-windowed** (rounded to int16). The training window
(``hu.window``) is applied at load time by :class:`xct_core.data.XrayCTDataset`, so changing
the window needs no re-run of this step.

X-rays. Both views are rendered with :func:`xct_core.drr.render` (line integrals, float32,
``hu.mu_water``, geometry from ``params.drr``) from the full-range int16 HU volume of the
**finest** stage grid — the exact array stored in ``stage{K}/{id}.npy`` — so the X-rays and
every stage target describe the same physical box (everything outside the FOV cube is
``fill_hu``, i.e. air). Image convention: docs/CONVENTIONS.md (row 0 superior; frontal shows
the patient's right on the left columns; lateral shows anterior on the left columns). The
``geometry`` JSON holds, per view, :meth:`xct_core.geometry.PlacedGeometry.to_json` of the
geometry placed on that finest grid, plus ``mu_water``, ``quantity``, the grid affine/shape.

Honest views (``eval.protocol: honest``, :mod:`xct_core.detector`). For every val/test id
the canonical source CT itself (the 128³ phantom / the native scan — not a stage grid) is
rendered with the reference ray marcher and the detector model of ``eval.detector`` (blur,
scatter, Poisson noise seeded per volume, the reading clamp ``reconstruct.min_intensity_fraction``)
into ``xrays_honest/{id}.npz``. Its key holds the detector and DRR settings, so changing
them redoes exactly these files; the manifest records the detector (``xrays_honest``).
Train ids never get them: training keeps the training renderer.

Train-time detector (``preprocess.train_detector``, default on). The TRAIN ids' (and their
augmented copies') ``xrays/{id}.npz`` hold the training renderer's DRRs passed through
:func:`xct_core.detector.detector_postprocess` with ``eval.detector`` (blur, scatter, Poisson
noise seeded per ``(seed, id, view)``, the reading clamp) at one ray per pixel — the same
corruptions as the honest views, as augmentation, with no re-render by the reference
marcher. Their key holds the detector (only when on, so switching it off restores the old
keys), the geometry JSON gains ``detector``, the manifest records it (``xrays.train_detector``).
Val/test ``xrays/`` stay clean (``eval.protocol: clean`` reads them).

Augmentation (``preprocess.augment``, default off; :mod:`xct_core.augment`). Each TRAIN id
gets ``copies`` extra train items ``<id>__aug<j>`` (never val/test): the same source CT,
rigidly moved / flipped / intensity-jittered by its sampled :class:`~xct_core.augment.Augmentation`
folded into the one resampling onto each stage grid (same ``center_world`` as the source);
the X-rays are then rendered from the augmented finest grid exactly as above. The sampled
transform is in the item's record and in the manifest (``items.<id>.augment``).

Re-runs. Every output has a *key*: a hash of the input file's sha256 and the settings that
shape that output (stage grid, fill, anti-aliasing; for X-rays also the DRR section and
mu_water; for augmented copies also the sampled augmentation). An output is reused when its record holds the expected key and the file still
has the recorded size and mtime (else its sha256 is checked). Files are written to a temp
file in the same folder and ``os.replace``-d, and the item's record is written last, so an
interrupted run leaves either a complete, recorded output or one that is redone.
"""

from __future__ import annotations

import hashlib
import io
import json
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from xct_core.augment import Augmentation
from xct_core.config import CTCheckParams, DRRParams, Params
from xct_core.detector import DetectorModel
from xct_core.errors import InputError, XctError
from xct_core.geometry import VIEWS, ProjectionGeometry
from xct_core.grid import StageGrid
from xct_core.io import CTVolume, load_ct, resample_to_grid
from xct_core.jsondoc import read_json_doc
from xct_core.stats import file_sha256  # re-exported (``__all__``): one implementation

#: bump when the meaning of any output changes (invalidates every recorded key)
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
XRAYS_DIR = "xrays"
#: the honest protocol's val/test views (:mod:`xct_core.detector`)
XRAYS_HONEST_DIR = "xrays_honest"
#: the splits that get honest views (train keeps the training renderer)
HONEST_SPLITS: tuple[str, ...] = ("val", "test")
RECORDS_DIR = "records"
SPLITS: tuple[str, ...] = ("train", "val", "test")
_ID_OK = re.compile(r"^[A-Za-z0-9_-][A-Za-z0-9._-]*$")

__all__ = [
    "FORMAT_VERSION", "HONEST_SPLITS", "MANIFEST", "RECORDS_DIR", "SPLITS", "XRAYS_DIR", "XRAYS_HONEST_DIR",
    "ItemJob", "ItemResult", "PreprocessSettings", "StageGrid",
    "build_manifest", "check_id", "file_sha256", "find_volume", "init_worker", "item_affine",
    "item_up_to_date", "process_item", "run_job",
    "job_dict", "job_from_dict", "read_manifest", "read_quarantine", "read_splits", "record_path",
    "records_for", "render_xrays", "splits_quarantine",
    "load_view_pair", "stage_dir", "stage_file", "stage_hu", "sweep_temp_files", "write_bytes_atomic", "xray_file",
    "xray_honest_file",
]  # fmt: skip


# --------------------------------------------------------------------------- layout


def stage_dir(k: int) -> str:
    """Folder (relative to OUT) of stage ``k`` (1-based)."""
    return f"stage{int(k)}"


def stage_file(k: int, vid: str) -> str:
    """Relative path of stage ``k``'s int16 HU volume of ``vid``."""
    return f"{stage_dir(k)}/{vid}.npy"


def xray_file(vid: str) -> str:
    """Relative path of the DRR pair of ``vid``."""
    return f"{XRAYS_DIR}/{vid}.npz"


def xray_honest_file(vid: str) -> str:
    """Relative path of the honest-protocol view pair of ``vid`` (val/test ids only)."""
    return f"{XRAYS_HONEST_DIR}/{vid}.npz"


def record_path(out: str | Path, vid: str) -> Path:
    return Path(out) / RECORDS_DIR / f"{vid}.json"


def check_id(vid: Any, where: str | Path | None = None) -> str:
    """A volume id usable as a file name (letters, digits, ``._-``; not starting with a dot)."""
    if not isinstance(vid, str) or not _ID_OK.match(vid):
        raise InputError(where, f"invalid volume id {vid!r} (allowed: letters, digits, '.', '_', '-')")
    return vid


# --------------------------------------------------------------------------- settings


@dataclass(frozen=True)
class PreprocessSettings:
    """Everything that shapes the outputs (picklable; sent to workers)."""

    grids: tuple[StageGrid, ...]
    drr: dict[str, Any]  #: ``params.drr`` as a plain dict
    mu_water: float
    fill_hu: float = -1024.0
    antialias: bool = True
    #: ``params.preprocess.augment`` as a plain dict when augmentation is on (copies > 0), else None
    augment: dict[str, Any] | None = None
    #: the honest views' detector (:meth:`xct_core.detector.DetectorModel.to_json`), None: no honest views
    detector: dict[str, Any] | None = None
    #: the detector the TRAIN ids' DRRs pass through (``preprocess.train_detector``), None: clean DRRs
    train_detector: dict[str, Any] | None = None

    @classmethod
    def from_params(cls, params: Params) -> PreprocessSettings:
        grids = tuple(
            StageGrid(k, int(s.size), float(s.fov_mm)) for k, s in enumerate(params.stages.values(), start=1)
        )
        return cls(
            grids=grids,
            drr=params.drr.model_dump(mode="json"),
            mu_water=float(params.hu.mu_water),
            fill_hu=float(params.preprocess.fill_hu),
            antialias=bool(params.preprocess.antialias),
            augment=params.preprocess.augment.model_dump(mode="json") if params.preprocess.augment.copies > 0 else None,
            detector=DetectorModel.from_params(params).to_json(),
            train_detector=DetectorModel.from_params(params).to_json() if params.preprocess.train_detector else None,
        )

    @property
    def finest(self) -> StageGrid:
        """The finest (last, largest) stage grid: the DRRs are rendered on it."""
        return self.grids[-1]

    def geometry(self, view: str) -> ProjectionGeometry:
        return ProjectionGeometry.from_params(DRRParams(**self.drr), view)  # type: ignore[arg-type]

    def _stage_part(self, g: StageGrid) -> dict[str, Any]:
        return {"size": g.size, "fov_mm": g.fov_mm, "fill_hu": self.fill_hu, "antialias": self.antialias}

    def sections(self) -> dict[str, Any]:
        """The parameter values that affect the output (recorded in the manifest; ``augment``
        only when augmentation is on, so the digest of un-augmented data is unchanged)."""
        out = {
            "format_version": FORMAT_VERSION,
            "stages": {stage_dir(g.k): self._stage_part(g) for g in self.grids},
            "drr": dict(sorted(self.drr.items())),
            "mu_water": self.mu_water,
            "fill_hu": self.fill_hu,
            "antialias": self.antialias,
        }
        if self.augment is not None:
            out["augment"] = dict(sorted(self.augment.items()))
        if self.detector is not None:
            out["detector"] = dict(sorted(self.detector.items()))
        if self.train_detector is not None:  # only when on: the digest of clean training DRRs is unchanged
            out["train_detector"] = dict(sorted(self.train_detector.items()))
        return out

    def digest(self) -> str:
        """Hash of :meth:`sections` (changes exactly when some output would change)."""
        return _hash(self.sections())

    def stage_key(self, k: int, input_sha: str, augment: Mapping[str, Any] | None = None) -> str:
        """Key of stage ``k``'s output; ``augment``: the item's sampled augmentation (JSON)."""
        doc: dict[str, Any] = {"v": FORMAT_VERSION, "input": input_sha, "stage": self._stage_part(self.grids[k - 1])}
        if augment is not None:
            doc["augment"] = dict(augment)
        return _hash(doc)

    def xray_key(self, input_sha: str, augment: Mapping[str, Any] | None = None, train: bool = False) -> str:
        """Key of the DRR pair; ``augment``: the item's sampled augmentation (JSON); ``train``:
        a train id (its DRRs pass through :attr:`train_detector` when that is set)."""
        doc: dict[str, Any] = {
            "v": FORMAT_VERSION,
            "input": input_sha,
            "grid": self._stage_part(self.finest),
            "drr": dict(sorted(self.drr.items())),
            "mu_water": self.mu_water,
        }
        if augment is not None:
            doc["augment"] = dict(augment)
        if train and self.train_detector is not None:
            doc["train_detector"] = dict(sorted(self.train_detector.items()))
        return _hash(doc)

    def honest_key(self, input_sha: str) -> str:
        """Key of the honest view pair: the source CT, the DRR geometry, mu_water, the detector."""
        assert self.detector is not None
        return _hash({"v": FORMAT_VERSION, "input": input_sha, "protocol": "honest",
                      "drr": dict(sorted(self.drr.items())), "mu_water": self.mu_water,
                      "detector": dict(sorted(self.detector.items()))})


def _hash(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:16]


# --------------------------------------------------------------------------- pure per-volume logic


def stage_hu(
    vol: CTVolume,
    grid: StageGrid,
    fill_hu: float = -1024.0,
    antialias: bool = True,
    augment: Augmentation | None = None,
) -> np.ndarray:
    """``vol`` resampled onto ``grid`` centred on the volume centre, as int16 HU [S, S, S]
    (rounded to the nearest HU and clipped to the int16 range; not windowed). ``augment``:
    the rigid transform / flips folded into that one resampling, then the intensity jitter
    (:meth:`xct_core.augment.Augmentation.resample`)."""
    if augment is None:
        hu = resample_to_grid(vol, grid.shape, grid.spacing_mm, None, fill_hu, antialias=antialias).hu
    else:
        hu = augment.resample(vol, grid.shape, grid.spacing_mm, fill_hu, antialias)
    return np.clip(np.rint(hu), -32768, 32767).astype(np.int16)


def render_xrays(
    hu: np.ndarray, affine: np.ndarray, settings: PreprocessSettings
) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    """Frontal and lateral DRRs (float32 [P, P] line integrals) of a full-range HU volume.

    ``hu``: [X, Y, Z] HU on the grid ``affine`` (the finest stage grid); geometry from
    ``settings.drr``, isocentre = grid centre. Returns ``(frontal, lateral, geometry)`` with
    ``geometry`` the JSON-ready description stored next to the images.
    """
    from xct_core.drr import render

    vol_t = torch.from_numpy(np.asarray(hu, dtype=np.float32))
    images: dict[str, np.ndarray] = {}
    geo: dict[str, Any] = {
        "quantity": "line_integral",
        "mu_water": settings.mu_water,
        "grid": {"shape": list(vol_t.shape), "affine": np.asarray(affine, dtype=np.float64).tolist()},
    }
    with torch.no_grad():
        for view in VIEWS:
            placed = settings.geometry(view).place(affine, tuple(vol_t.shape))
            img = render(
                vol_t,
                affine,
                placed,
                mu_water=settings.mu_water,
                quantity="line_integral",
                step_fraction=float(settings.drr.get("step_fraction", 0.5)),
            )
            images[view] = img.numpy().astype(np.float32, copy=False)
            geo[view] = {**placed.to_json(), "mu_water": settings.mu_water, "quantity": "line_integral"}
    return images["frontal"], images["lateral"], geo


# --------------------------------------------------------------------------- file helpers


from xct_core.atomic import write_bytes_atomic  # noqa: E402,F401  (re-exported: one implementation)


def _npy_bytes(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, arr, allow_pickle=False)
    return buf.getvalue()


def _npz_bytes(**arrays: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.savez(buf, **arrays)  # uncompressed: fast to read, the images are small
    return buf.getvalue()


def _json_bytes(obj: Any) -> bytes:
    return (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode()


def sweep_temp_files(folder: str | Path) -> int:
    """Delete temp files (``.*.tmp``) left in ``folder`` by an interrupted run; returns how many."""
    n = 0
    d = Path(folder)
    if d.is_dir():
        for p in d.glob(".*.tmp"):
            p.unlink(missing_ok=True)
            n += 1
    return n


def _file_entry(path: Path, key: str, sha: str | None = None) -> dict[str, Any]:
    st = path.stat()
    return {"key": key, "sha256": sha or file_sha256(path), "size": st.st_size, "mtime_ns": st.st_mtime_ns}


def _entry_valid(path: Path, entry: Mapping[str, Any] | None, key: str) -> bool:
    """Whether ``path`` is the recorded output for ``key`` (size+mtime fast path, else sha256)."""
    if not entry or entry.get("key") != key:
        return False
    try:
        st = path.stat()
    except OSError:
        return False
    if st.st_size != entry.get("size"):
        return False
    if st.st_mtime_ns == entry.get("mtime_ns"):
        return True
    return file_sha256(path) == entry.get("sha256")


def _read_json(path: Path) -> dict[str, Any] | None:
    """A record, or None when it is missing or unusable (the item is then redone)."""
    try:
        return read_json_doc(path, "record")
    except InputError:
        return None


# --------------------------------------------------------------------------- one item


@dataclass(frozen=True)
class ItemJob:
    """One volume to preprocess (picklable; plain values only)."""

    vid: str
    volume: str  #: path of the canonical NIfTI
    out: str  #: the processed folder
    settings: PreprocessSettings
    ct_checks: dict[str, Any] = field(default_factory=dict)  #: ``params.data.ct`` as a dict
    #: augmented copy: :meth:`xct_core.augment.Augmentation.to_json` of its sampled transform
    augment: dict[str, Any] | None = None
    #: a val/test id: also render its honest views (``xrays_honest/``)
    honest: bool = False
    #: a train id (or augmented copy): its DRRs pass through ``settings.train_detector`` when set
    train: bool = False


@dataclass
class ItemResult:
    """What :func:`process_item` did for one volume."""

    vid: str
    written: list[str]  #: relative paths (re)written
    record: dict[str, Any]

    @property
    def skipped(self) -> bool:
        return not self.written


def _input_sha(path: Path, prev: Mapping[str, Any] | None) -> tuple[str, dict[str, Any]]:
    st = path.stat()
    old = (prev or {}).get("input") or {}
    if old.get("size") == st.st_size and old.get("mtime_ns") == st.st_mtime_ns and old.get("sha256"):
        sha = str(old["sha256"])
    else:
        sha = file_sha256(path)
    return sha, {"path": str(path), "sha256": sha, "size": st.st_size, "mtime_ns": st.st_mtime_ns}


@dataclass
class _ItemState:
    prev: dict[str, Any] | None
    input_entry: dict[str, Any]
    keys: dict[str, str]  #: relative output path → expected key
    valid: dict[str, bool]  #: relative output path → reusable as is
    center: list[float] | None
    #: the record lists outputs this job no longer has (e.g. honest views of an id that left val/test)
    extra: bool = False

    @property
    def up_to_date(self) -> bool:
        return all(self.valid.values()) and self.center is not None and not self.extra


def _item_state(job: ItemJob) -> _ItemState:
    out = Path(job.out)
    src = Path(job.volume)
    s = job.settings
    prev = _read_json(record_path(out, job.vid))
    if prev is not None and prev.get("id") != job.vid:
        prev = None
    try:
        input_sha, input_entry = _input_sha(src, prev)
    except OSError as e:
        raise InputError(src, f"cannot read volume ({e.strerror or e})") from e
    prev_files: dict[str, Any] = dict((prev or {}).get("files") or {})
    keys = {stage_file(g.k, job.vid): s.stage_key(g.k, input_sha, job.augment) for g in s.grids}
    keys[xray_file(job.vid)] = s.xray_key(input_sha, job.augment, job.train)
    if job.honest and s.detector is not None:
        keys[xray_honest_file(job.vid)] = s.honest_key(input_sha)
    valid = {rel: _entry_valid(out / rel, prev_files.get(rel), key) for rel, key in keys.items()}
    return _ItemState(prev, input_entry, keys, valid, (prev or {}).get("center_world"), bool(set(prev_files) - set(keys)))


def item_up_to_date(job: ItemJob) -> bool:
    """Whether every output of ``job`` is recorded with its expected key and intact
    (what :func:`process_item` would skip). Cheap: stats files, hashes only changed ones."""
    return _item_state(job).up_to_date


def process_item(job: ItemJob) -> ItemResult:
    """Bring ``job.vid``'s outputs up to date (layout in the module docstring).

    Outputs whose recorded key and file still match are kept; the others are recomputed:
    stage volumes need the CT loaded; the X-rays are rendered from the finest stage volume
    (read back from disk when it is already valid). Writes are atomic; the record last.
    Raises :class:`InputError` (naming the volume) when the CT cannot be loaded.
    """
    out = Path(job.out)
    src = Path(job.volume)
    s = job.settings
    rec_path = record_path(out, job.vid)
    st = _item_state(job)
    prev, input_entry, keys, valid, center = st.prev, st.input_entry, st.keys, st.valid, st.center
    if st.up_to_date:
        assert prev is not None
        if prev.get("input") != input_entry:  # same bytes, new mtime: refresh the fast path
            prev = {**prev, "input": input_entry}
            write_bytes_atomic(rec_path, _json_bytes(prev))
        return ItemResult(job.vid, [], prev)
    prev_files: dict[str, Any] = dict((prev or {}).get("files") or {})

    finest_rel = stage_file(s.finest.k, job.vid)
    need_stage = [g for g in s.grids if not valid[stage_file(g.k, job.vid)]]
    need_xray = not valid[xray_file(job.vid)]
    honest_rel = xray_honest_file(job.vid)
    need_honest = honest_rel in keys and not valid[honest_rel]
    written: list[str] = []
    files = {rel: prev_files[rel] for rel in keys if valid[rel]}
    finest: np.ndarray | None = None
    vol: CTVolume | None = None
    aug = Augmentation.from_json(job.augment) if job.augment is not None else None
    if need_stage or center is None or need_honest:
        vol = load_ct(src, CTCheckParams(**job.ct_checks))
        center = [float(c) for c in vol.center_world]
    for g in need_stage:
        assert vol is not None
        arr = stage_hu(vol, g, s.fill_hu, s.antialias, aug)
        rel = stage_file(g.k, job.vid)
        data = _npy_bytes(arr)
        write_bytes_atomic(out / rel, data)
        files[rel] = _file_entry(out / rel, keys[rel], hashlib.sha256(data).hexdigest())
        written.append(rel)
        if g.k == s.finest.k:
            finest = arr
    if need_honest:  # from the source CT on its own grid (not a stage grid), the reference renderer
        assert vol is not None and s.detector is not None
        from xct_core.detector import honest_views

        hf, hl, hgeo = honest_views(vol.hu, vol.affine, job.vid, s.drr, s.mu_water, DetectorModel(**s.detector))
        payload = _npz_bytes(frontal=hf, lateral=hl, geometry=np.array(json.dumps(hgeo, sort_keys=True)))
        write_bytes_atomic(out / honest_rel, payload)
        files[honest_rel] = _file_entry(out / honest_rel, keys[honest_rel], hashlib.sha256(payload).hexdigest())
        written.append(honest_rel)
    del vol
    if need_xray:  # rendered from the (augmented) finest grid: X-rays always match the targets
        if finest is None:
            finest = np.load(out / finest_rel, allow_pickle=False)
        frontal, lateral, geo = render_xrays(finest, s.finest.affine(center), s)
        if job.train and s.train_detector is not None:  # training augmentation: the detector's corruptions
            from xct_core.detector import corrupt_views

            model = DetectorModel(**s.train_detector)
            views = corrupt_views({"frontal": frontal, "lateral": lateral}, job.vid, float(s.drr["pixel_mm"]), model)
            frontal, lateral = views["frontal"], views["lateral"]
            geo["detector"] = model.to_json()
        rel = xray_file(job.vid)
        payload = _npz_bytes(frontal=frontal, lateral=lateral, geometry=np.array(json.dumps(geo, sort_keys=True)))
        write_bytes_atomic(out / rel, payload)
        files[rel] = _file_entry(out / rel, keys[rel], hashlib.sha256(payload).hexdigest())
        written.append(rel)
    record = {
        "id": job.vid,
        "format_version": FORMAT_VERSION,
        "input": input_entry,
        "center_world": center,
        "files": dict(sorted(files.items())),
    }
    if job.augment is not None:
        record["augment"] = dict(job.augment)
    write_bytes_atomic(rec_path, _json_bytes(record))
    return ItemResult(job.vid, written, record)


def init_worker() -> None:
    """Process-pool initializer: one torch thread per worker (the pool is the parallelism)."""
    torch.set_num_threads(1)
    try:
        torch.set_num_interop_threads(1)
    except RuntimeError:  # already set in this process
        pass


def run_job(job: ItemJob) -> tuple[str, list[str], str | None]:
    """:func:`process_item` for pools: ``(id, written, error message or None)``.

    User errors come back as text because :class:`InputError` does not survive a pickle
    round trip between processes.
    """
    try:
        res = process_item(job)
    except XctError as e:
        return job.vid, [], str(e)
    return job.vid, res.written, None


# --------------------------------------------------------------------------- inputs: splits, quarantine


def read_splits(path: str | Path) -> dict[str, list[str]]:
    """Volume ids per split from a splits JSON.

    Accepts ingest's document (``{"volumes": {"train": [...], "val": [...], "test": [...]}, …}``,
    :func:`xct_core.stats.make_splits`) or a plain ``{"train": [...], "val": [...], "test": [...]}``.
    Missing splits are empty; an id in two splits is an error.
    """
    p = Path(path)
    doc = _load_json_input(p, "splits file")
    body = doc.get("volumes") if isinstance(doc.get("volumes"), dict) else doc
    if not any(s in body for s in SPLITS):
        raise InputError(p, f"not a splits file (expected keys {', '.join(SPLITS)} or 'volumes')")
    out: dict[str, list[str]] = {}
    seen: dict[str, str] = {}
    for s in SPLITS:
        ids = body.get(s) or []
        if not isinstance(ids, list):
            raise InputError(p, f"split {s!r} must be a list of volume ids")
        for vid in ids:
            check_id(vid, p)
            if vid in seen:
                raise InputError(p, f"volume {vid!r} is in two splits ({seen[vid]} and {s})")
            seen[vid] = s
        out[s] = list(ids)
    return out


def splits_quarantine(path: str | Path) -> dict[str, str]:
    """Ids a splits document itself lists as quarantined (validate's ``splits.json`` has
    ``"quarantined": [ids]`` and the reasons under ``"excluded"``); empty when none."""
    p = Path(path)
    doc = _load_json_input(p, "splits file")
    ids = doc.get("quarantined") or []
    if not isinstance(ids, list) or not all(isinstance(v, str) for v in ids):
        raise InputError(p, "'quarantined' must be a list of volume ids")
    excluded = doc.get("excluded") if isinstance(doc.get("excluded"), dict) else {}
    return {v: str(excluded.get(v, "quarantined")) for v in ids}


def read_quarantine(path: str | Path) -> dict[str, str]:
    """Quarantined volume ids → reason, from a JSON list of ids, a mapping id → reason, or
    a document holding one of those under ``quarantined`` / ``quarantine`` / ``volumes`` / ``ids``."""
    p = Path(path)
    doc: Any = _load_json_input(p, "quarantine file", allow_list=True)
    if isinstance(doc, dict):
        for k in ("quarantined", "quarantine", "volumes", "ids"):
            if k in doc:
                doc = doc[k]
                break
    if isinstance(doc, list):
        if not all(isinstance(v, str) for v in doc):
            raise InputError(p, "quarantine list must hold volume ids (strings)")
        return {v: "quarantined" for v in doc}
    if isinstance(doc, dict):
        return {str(k): str(v) for k, v in doc.items()}
    raise InputError(p, "quarantine file must be a list of ids or a mapping id → reason")


def _load_json_input(p: Path, what: str, allow_list: bool = False) -> Any:
    if allow_list:  # a quarantine file may be a bare list of ids
        try:
            doc = json.loads(p.read_text())
        except (OSError, ValueError):
            doc = None
        if isinstance(doc, list):
            return doc
    return read_json_doc(p, what)


def find_volume(volumes_dir: str | Path, vid: str) -> Path | None:
    """The canonical NIfTI of ``vid`` in ``volumes_dir`` (``{id}.nii.gz`` or ``{id}.nii``)."""
    for suffix in (".nii.gz", ".nii"):
        p = Path(volumes_dir) / f"{vid}{suffix}"
        if p.is_file():
            return p
    return None


# --------------------------------------------------------------------------- manifest


def build_manifest(
    settings: PreprocessSettings,
    splits: Mapping[str, Sequence[str]],
    records: Mapping[str, Mapping[str, Any]],
    quarantined: Mapping[str, str] | None = None,
) -> dict[str, Any]:
    """The manifest document (deterministic: no timestamps, sorted keys)."""
    items = {}
    where = {vid: s for s, ids in splits.items() for vid in ids}
    for vid in sorted(where):
        rec = records[vid]
        items[vid] = {
            "split": where[vid],
            "center_world": rec["center_world"],
            "input_sha256": rec["input"]["sha256"],
            "files": {rel: e["sha256"] for rel, e in sorted(rec["files"].items())},
        }
        if rec.get("augment") is not None:  # an augmented copy: its source and sampled transform
            items[vid]["augment"] = rec["augment"]
    return {
        "format_version": FORMAT_VERSION,
        "splits": {s: sorted(splits.get(s, [])) for s in SPLITS},
        "quarantined": dict(sorted((quarantined or {}).items())),
        "stages": [
            {"k": g.k, "size": g.size, "fov_mm": g.fov_mm, "spacing_mm": g.spacing_mm, "dir": stage_dir(g.k)}
            for g in settings.grids
        ],
        "volumes": {
            "dtype": "int16",
            "units": "HU, full range, not windowed (the Dataset windows at load time)",
            "axes": "RAS+",
            "fill_hu": settings.fill_hu,
            "antialias": settings.antialias,
        },
        "xrays": {
            "dir": XRAYS_DIR,
            "views": list(VIEWS),
            "pixels": int(settings.drr["pixels"]),
            "quantity": "line_integral",
            "dtype": "float32",
            "rendered_on_stage": settings.finest.k,
            "mu_water": settings.mu_water,
            **({"train_detector": {
                "splits": ["train"],
                "applied": "xct_core.detector.detector_postprocess on the training renderer's DRRs, one ray per pixel",
                "detector": dict(sorted(settings.train_detector.items())),
            }} if settings.train_detector is not None else {}),
        },
        **({"xrays_honest": {
            "dir": XRAYS_HONEST_DIR,
            "splits": list(HONEST_SPLITS),
            "views": list(VIEWS),
            "quantity": "line_integral",
            "rendered_from": "the canonical source CT on its own grid (reference ray marcher)",
            "detector": dict(sorted(settings.detector.items())),
        }} if settings.detector is not None else {}),
        "params_digest": settings.digest(),
        "params": settings.sections(),
        "items": items,
    }


def read_manifest(processed_dir: str | Path) -> dict[str, Any]:
    """Read ``OUT/manifest.json``; :class:`InputError` naming the path when absent or malformed."""
    out = Path(processed_dir)
    if not out.is_dir():
        raise InputError(out, "processed data folder not found (run the preprocess step first)")
    p = out / MANIFEST
    if not p.is_file():
        raise InputError(p, "manifest not found: the preprocess step did not finish (re-run it)")
    doc = _read_json(p)
    if doc is None or not all(k in doc for k in ("splits", "stages", "items")):
        raise InputError(p, "not an xct preprocess manifest (need 'splits', 'stages' and 'items')")
    if doc.get("format_version") != FORMAT_VERSION:
        raise InputError(p, f"manifest format {doc.get('format_version')!r}, expected {FORMAT_VERSION} (re-run preprocess)")
    return doc


def item_affine(manifest: Mapping[str, Any], k: int, vid: str) -> np.ndarray:
    """World affine of ``vid``'s stage-``k`` grid (centred on that volume's centre)."""
    st = manifest["stages"][k - 1]
    grid = StageGrid(int(st["k"]), int(st["size"]), float(st["fov_mm"]))
    return grid.affine(manifest["items"][vid]["center_world"])


def records_for(out: str | Path, ids: Iterable[str]) -> dict[str, dict[str, Any]]:
    """Records of ``ids`` (missing ones are left out)."""
    res = {}
    for vid in ids:
        rec = _read_json(record_path(out, vid))
        if rec is not None:
            res[vid] = rec
    return res


def job_dict(job: ItemJob) -> dict[str, Any]:
    """``job`` as plain values (for Ray Data rows)."""
    return asdict(job)


def job_from_dict(d: Mapping[str, Any]) -> ItemJob:
    """Inverse of :func:`job_dict`."""
    s = dict(d["settings"])
    s["grids"] = tuple(StageGrid(**g) for g in s["grids"])
    return ItemJob(
        vid=d["vid"], volume=d["volume"], out=d["out"], settings=PreprocessSettings(**s), ct_checks=dict(d["ct_checks"]),
        augment=d.get("augment"), honest=bool(d.get("honest", False)), train=bool(d.get("train", False)),
    )


def load_view_pair(path: str | Path, pixels: int) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """``({"frontal", "lateral"}: float32 [P, P], geometry JSON)`` of a stored view pair
    (``xrays/`` or ``xrays_honest/``); :class:`InputError` naming the file when it is
    missing, unreadable or of the wrong size."""
    p = Path(path)
    try:
        with np.load(p, allow_pickle=False) as z:
            views = {v: np.ascontiguousarray(z[v], dtype=np.float32) for v in VIEWS}
            geo = json.loads(str(z["geometry"]))
    except FileNotFoundError:
        raise InputError(p, "view pair not found (re-run the preprocess step)") from None
    except (OSError, ValueError, KeyError) as e:
        raise InputError(p, f"unreadable view pair ({e})") from None
    for v, img in views.items():
        if img.shape != (pixels, pixels):
            raise InputError(p, f"{v} image has shape {img.shape}, expected {(pixels, pixels)}")
    return views, geo
