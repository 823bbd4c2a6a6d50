"""Pipeline step 1 — ingest: raw CTs → canonical volumes, a per-volume stats table, a patient split.

Input: a raw folder (``data/raw``) of NIfTI files and/or DICOM series folders, searched
recursively (see :func:`xct_core.stats.discover`). Output folder (``data/interim``)::

    volumes/<id>.nii.gz   canonical RAS+ int16 HU (xct_core.io.save_ct), one per loaded volume
    stats.json            {"volumes": [rows], "raw_dir", "ignored_files", counts, cache key}
    stats.csv             the same rows, columns xct_core.stats.STATS_COLUMNS
    splits.json           train/val/test volume ids by patient (xct_core.stats.make_splits);
                          volumes that failed to load are under "excluded" with their error

Volumes that fail to load are kept in the table (``status = "error"`` + the message) so the
validate step reports them; they get no canonical volume. Every file is written atomically,
and a re-run is idempotent: identical bytes, volumes of deleted raw files are removed, and a
volume whose source checksum, output file and relevant params are unchanged is not reloaded.

Three ways to run it, one function (:func:`run_ingest`):
``xct step ingest --raw data/raw --out data/interim`` (dvc.yaml), the KFP
component :data:`components.kfp_components.ingest_component`, or a direct call.
"""

import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from xct_core.config import Params
from xct_core.errors import InputError
from xct_core.io import save_ct
from xct_core.jsondoc import read_json_doc
from xct_core.stats import (
    STATS_COLUMNS,
    STATS_VERSION,
    discover,
    file_sha256,
    json_text,
    make_splits,
    mark_duplicates,
    measure,
    source_sha256,
    table_csv,
    write_text_atomic,
)

VOLUMES_DIR = "volumes"
STATS_JSON = "stats.json"
STATS_CSV = "stats.csv"
SPLITS_JSON = "splits.json"


@dataclass
class IngestResult:
    """What :func:`run_ingest` did: the rows it wrote and where."""

    out_dir: Path
    rows: list[dict[str, Any]]
    splits: dict[str, Any]
    ignored_files: list[str] = field(default_factory=list)
    reused: int = 0  #: volumes taken unchanged from the previous run

    @property
    def n_ok(self) -> int:
        return sum(r["status"] == "ok" for r in self.rows)

    @property
    def n_failed(self) -> int:
        return len(self.rows) - self.n_ok


def _cache_key(params: Params, raw_dir: str) -> str:
    """Everything besides the source bytes that a row depends on."""
    blob = {
        "stats_version": STATS_VERSION,
        "raw_dir": raw_dir,
        "ct": params.data.ct.model_dump(mode="json"),
        "body_hu": params.ingest.body_hu,
        "patient_regex": params.ingest.patient_regex,
    }
    return hashlib.sha256(json.dumps(blob, sort_keys=True).encode()).hexdigest()[:16]


def _previous_rows(out: Path, key: str) -> dict[str, dict[str, Any]]:
    """Rows of the previous run's stats.json when it was made with the same cache key."""
    try:
        doc = read_json_doc(out / STATS_JSON, "stats table")
    except InputError:
        return {}
    if doc.get("cache_key") != key or not isinstance(doc.get("volumes"), list):
        return {}
    return {r["id"]: r for r in doc["volumes"] if isinstance(r, dict) and "id" in r}


def _reusable(prev: dict[str, Any] | None, rel: str, sha: str, out: Path) -> bool:
    if prev is None or prev.get("source") != rel or prev.get("sha256") != sha:
        return False
    if prev.get("status") != "ok":
        return True
    vol = out / str(prev.get("volume") or "")
    return vol.is_file() and file_sha256(vol) == prev.get("volume_sha256")


def run_ingest(
    raw_dir: str | Path,
    out_dir: str | Path,
    params: Params,
    log: Callable[[str], None] | None = None,
) -> IngestResult:
    """Ingest every CT under ``raw_dir`` into ``out_dir`` (layout in the module docstring).

    Load checks come from ``params.data.ct``, the body threshold, patient rule and split from
    ``params.ingest``. ``log`` receives one line per volume that failed to load and a summary.
    Raises :class:`InputError` when ``raw_dir`` is missing or holds no CT at all.
    """
    say = log or (lambda _msg: None)
    raw = Path(raw_dir)
    out = Path(out_dir)
    sources, ignored = discover(raw)
    if not sources:
        raise InputError(raw, "no CT volumes found (expected .nii/.nii.gz files or DICOM series folders)")
    key = _cache_key(params, str(raw))
    previous = _previous_rows(out, key)
    vol_dir = out / VOLUMES_DIR
    rows: list[dict[str, Any]] = []
    reused = 0
    for src in sources:
        sha = source_sha256(src)
        prev = previous.get(src.id)
        if _reusable(prev, src.rel, sha, out):
            row = {c: prev.get(c) for c in STATS_COLUMNS}  # type: ignore[union-attr]
            reused += 1
        else:
            row, vol = measure(src, params.data.ct, params.ingest, sha256=sha, limits=params.limits)
            if vol is not None:
                target = vol_dir / f"{src.id}.nii.gz"
                save_ct(target, vol)
                row["volume"] = f"{VOLUMES_DIR}/{target.name}"
                row["volume_sha256"] = file_sha256(target)
            del vol
        if row["status"] != "ok":
            say(f"load error: {src.rel}: {row['error']}")
        rows.append(row)
    mark_duplicates(rows)
    splits = make_splits(rows, params.ingest)

    keep = {f"{r['id']}.nii.gz" for r in rows if r["status"] == "ok"}
    if vol_dir.is_dir():
        for stale in vol_dir.glob("*.nii.gz"):
            if stale.name not in keep:
                stale.unlink()
    n_ok = sum(r["status"] == "ok" for r in rows)
    doc = {
        "stats_version": STATS_VERSION,
        "cache_key": key,
        "raw_dir": str(raw),
        "columns": list(STATS_COLUMNS),
        "n_volumes": len(rows),
        "n_ok": n_ok,
        "n_failed": len(rows) - n_ok,
        "ignored_files": ignored,
        "volumes": rows,
    }
    write_text_atomic(out / STATS_JSON, json_text(doc))
    write_text_atomic(out / STATS_CSV, table_csv(rows))
    write_text_atomic(out / SPLITS_JSON, json_text(splits))
    sizes = ", ".join(f"{s} {len(splits['volumes'][s])}" for s in ("train", "val", "test"))
    say(
        f"ingested {len(rows)} volumes from {raw} ({n_ok} loaded, {len(rows) - n_ok} failed, "
        f"{reused} unchanged; {len(ignored)} other files ignored) → {out}; split: {sizes}"
    )
    return IngestResult(out_dir=out, rows=rows, splits=splits, ignored_files=ignored, reused=reused)
