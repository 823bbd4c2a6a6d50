"""Pipeline step 3 — preprocess: canonical volumes → stage grids (int16 HU) + DRR pairs.

Inputs: a folder of canonical NIfTIs ``{id}.nii.gz`` (ingest's ``data/interim/volumes``), a
splits JSON (validate's ``data/validated/splits.json`` — ingest's format, or a plain
``{"train": [...], "val": [...], "test": [...]}``) and optionally a quarantine JSON (a list
of ids or a mapping id → reason). Ids listed as ``quarantined`` in the splits file or in the
quarantine file are left out.

Output (``data/processed``; the contract is documented in :mod:`xct_core.preprocess`)::

    stage{k}/{id}.npy   int16 [S, S, S] full-range HU on stage k's grid (windowed at load time)
    xrays/{id}.npz      frontal, lateral float32 [P, P] line integrals + geometry JSON,
                        rendered from the finest stage grid
    xrays_honest/{id}.npz   val/test ids: the same views as a detector records them (the honest
                        protocol, ``eval.detector``; xct_core/detector.py), from the source CT
    manifest.json       ids per split after quarantine, stage grids, params digest, sha256s
    records/{id}.json   per-item bookkeeping for resumable re-runs

Augmentation (``preprocess.augment.copies`` > 0): every TRAIN id gets that many extra train
items ``<id>__aug<j>`` (:func:`xct_core.augment.plan_copies`; val/test ids never), each
resampled from the same canonical volume with its sampled rigid transform / flips / HU
jitter, and its DRRs rendered from its augmented finest grid. The manifest records each
copy's source and sampled transform (``items.<id>.augment``).

Resumable and idempotent: outputs whose input checksum and relevant params are unchanged are
skipped (a re-run touches no file); temp files of an interrupted run are swept; outputs of
ids no longer in the split are removed. ``manifest.json`` is removed while work is pending and
written last, so its presence means the folder is complete.

Parallelism: a ``concurrent.futures`` process pool (``preprocess.workers``, forkserver start
method, one torch thread per worker) with a progress bar, or a Ray Data map when
``preprocess.use_ray`` is true (Ray is imported only then; ``RAY_ADDRESS`` set: that
cluster). The Ray path reports which node made each item (:attr:`PreprocessResult.ray_nodes`,
a log line ``Ray Data ran N item(s) on K node(s): <node id> (count), …``); the processed
folder itself stays the same bytes wherever it was made.

Three ways to run it, one function (:func:`run_preprocess`): ``xct step preprocess
--volumes DIR --splits splits.json [--quarantine q.json] --out data/processed [--params
params.yaml]`` (dvc.yaml), the KFP component :data:`components.kfp_components.preprocess_component`, or a direct call.
"""

import json
import multiprocessing
import os
import re
import sys
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from xct_core.augment import plan_copies
from xct_core.config import Params
from xct_core.errors import InputError
from xct_core.preprocess import (
    HONEST_SPLITS,
    MANIFEST,
    RECORDS_DIR,
    SPLITS,
    XRAYS_DIR,
    XRAYS_HONEST_DIR,
    ItemJob,
    PreprocessSettings,
    build_manifest,
    find_volume,
    init_worker,
    item_up_to_date,
    job_dict,
    job_from_dict,
    read_quarantine,
    read_splits,
    records_for,
    run_job,
    splits_quarantine,
    stage_dir,
    sweep_temp_files,
    write_bytes_atomic,
)

_STAGE_DIR = re.compile(r"^stage\d+$")


@dataclass
class PreprocessResult:
    """What :func:`run_preprocess` did."""

    out_dir: Path
    manifest: dict[str, Any]
    processed: list[str] = field(default_factory=list)  #: ids with at least one file (re)written
    skipped: list[str] = field(default_factory=list)  #: ids already up to date
    files_written: int = 0
    removed: list[str] = field(default_factory=list)  #: stale files deleted (relative paths)
    temp_swept: int = 0  #: temp files of an interrupted run deleted
    ray_nodes: dict[str, str] = field(default_factory=dict)  #: id → Ray node id that (re)made it (``use_ray``)


# --------------------------------------------------------------------------- workers


def _ray_map(row: dict[str, Any]) -> dict[str, Any]:
    import ray

    init_worker()
    vid, written, err = run_job(job_from_dict(json.loads(row["job"])))
    return {"vid": vid, "written": json.dumps(written), "error": err or "",
            "node": ray.get_runtime_context().get_node_id()}


def _run_ray(jobs: Sequence[ItemJob], workers: int) -> tuple[list[tuple[str, list[str], str | None]], dict[str, str]]:
    """The jobs as one Ray Data map (one task per item); (results, ``{id: Ray node id}``)."""
    import ray

    started = not ray.is_initialized()  # an existing cluster/session (ray.init elsewhere) is used as is
    if started:  # RAY_ADDRESS set: join that cluster (it owns its CPU count); else a local Ray
        ray.init(**({} if os.environ.get("RAY_ADDRESS") else {"num_cpus": workers, "include_dashboard": False}))
    try:
        items = [{"job": json.dumps(job_dict(j))} for j in jobs]
        ds = ray.data.from_items(items, override_num_blocks=len(items)).map(_ray_map, num_cpus=1)
        rows = ds.take_all()
        return [(r["vid"], json.loads(r["written"]), r["error"] or None) for r in rows], {r["vid"]: r["node"] for r in rows}
    finally:
        if started:
            ray.shutdown()


def _run_pool(jobs: Sequence[ItemJob], workers: int, progress: bool) -> list[tuple[str, list[str], str | None]]:
    from tqdm import tqdm

    results = []
    bar = tqdm(total=len(jobs), desc="preprocess", unit="vol", disable=not progress, file=sys.stderr)
    try:
        if workers <= 1 or len(jobs) <= 1:
            for job in jobs:
                results.append(run_job(job))
                bar.update()
            return results
        # forkserver: workers fork from a fresh server that only imported xct_core.preprocess
        # (forking a parent that already ran torch/OpenMP work can deadlock; spawn would
        # re-import torch in every worker)
        ctx = multiprocessing.get_context("forkserver")
        ctx.set_forkserver_preload(["xct_core.preprocess"])
        with ProcessPoolExecutor(min(workers, len(jobs)), mp_context=ctx, initializer=init_worker) as ex:
            futures = [ex.submit(run_job, j) for j in jobs]
            try:
                for fut in as_completed(futures):
                    results.append(fut.result())
                    bar.update()
            except BaseException:
                ex.shutdown(wait=True, cancel_futures=True)
                raise
        return results
    finally:
        bar.close()


# --------------------------------------------------------------------------- the step


def _prune(out: Path, settings: PreprocessSettings, ids: set[str], honest_ids: set[str]) -> tuple[list[str], int]:
    """Sweep temp files and delete outputs that are not part of this run's contract
    (honest views: only val/test ids keep theirs)."""
    removed: list[str] = []
    swept = sweep_temp_files(out)
    current = {stage_dir(g.k) for g in settings.grids}
    folders = [p for p in out.iterdir() if p.is_dir() and _STAGE_DIR.match(p.name)] if out.is_dir() else []
    for sub in [*folders, out / XRAYS_DIR, out / XRAYS_HONEST_DIR, out / RECORDS_DIR]:
        if not sub.is_dir():
            continue
        swept += sweep_temp_files(sub)
        suffix = {XRAYS_DIR: ".npz", XRAYS_HONEST_DIR: ".npz", RECORDS_DIR: ".json"}.get(sub.name, ".npy")
        keep = honest_ids if sub.name == XRAYS_HONEST_DIR else ids
        for f in sub.glob(f"*{suffix}"):
            stem = f.name[: -len(suffix)]
            if (_STAGE_DIR.match(sub.name) and sub.name not in current) or stem not in keep:
                f.unlink()
                removed.append(f"{sub.name}/{f.name}")
        if _STAGE_DIR.match(sub.name) and sub.name not in current and not any(sub.iterdir()):
            sub.rmdir()
    return sorted(removed), swept


def run_preprocess(
    volumes_dir: str | Path,
    splits_path: str | Path,
    out_dir: str | Path,
    params: Params,
    quarantine_path: str | Path | None = None,
    *,
    workers: int | None = None,
    progress: bool = True,
    log: Callable[[str], None] | None = None,
) -> PreprocessResult:
    """Preprocess every id of the split (minus quarantine) into ``out_dir``.

    ``workers`` overrides ``params.preprocess.workers``. Raises :class:`InputError` when an
    input is missing or unreadable (naming it), when no volume is left, or when any volume
    fails (all failures listed; the successful items are kept for the re-run, no manifest).
    """
    say = log or (lambda _msg: None)
    settings = PreprocessSettings.from_params(params)
    vol_dir = Path(volumes_dir)
    out = Path(out_dir)
    if not vol_dir.is_dir():
        raise InputError(vol_dir, "volumes folder not found (run the ingest step first)")
    splits = read_splits(splits_path)
    quarantined = splits_quarantine(splits_path)
    if quarantine_path is not None:
        quarantined.update(read_quarantine(quarantine_path))
    kept = {s: [v for v in splits[s] if v not in quarantined] for s in SPLITS}
    ids = [v for s in SPLITS for v in kept[s]]
    if not ids:
        raise InputError(splits_path, f"no volumes left to preprocess ({len(quarantined)} quarantined)")
    volumes = {v: find_volume(vol_dir, v) for v in ids}
    missing = [v for v, p in volumes.items() if p is None]
    if missing:
        raise InputError(
            vol_dir / f"{missing[0]}.nii.gz",
            f"volume listed in {splits_path} not found ({len(missing)} of {len(ids)} missing: {', '.join(missing[:5])})",
        )
    copies = plan_copies(kept["train"], params.preprocess.augment)  # train only: val/test never augmented
    clash = sorted(set(copies) & (set(ids) | set(quarantined)))
    if clash:
        raise InputError(splits_path, f"augmented copy id {clash[0]!r} clashes with a volume id (rename that volume)")
    kept["train"] = kept["train"] + list(copies)
    ids = ids + list(copies)
    volumes.update({a: volumes[c.source_id] for a, c in copies.items()})
    if out.exists() and not out.is_dir():
        raise InputError(out, "output path exists and is not a folder")
    out.mkdir(parents=True, exist_ok=True)

    removed, swept = _prune(out, settings, set(ids), {v for sp in HONEST_SPLITS for v in kept[sp]})
    checks = params.data.ct.model_dump(mode="json")
    honest_ids = {v for sp in HONEST_SPLITS for v in kept[sp]}  # val/test: the honest protocol's views too
    jobs = [ItemJob(v, str(volumes[v]), str(out), settings, checks, copies[v].to_json() if v in copies else None,
                    honest=v in honest_ids, train=v not in honest_ids) for v in ids]  # train: ids + copies
    stale = [j for j in jobs if not item_up_to_date(j)]
    manifest_path = out / MANIFEST
    if stale or removed:
        manifest_path.unlink(missing_ok=True)  # incomplete until the end of this run

    n_workers = int(workers if workers is not None else params.preprocess.workers)
    ray_nodes: dict[str, str] = {}
    if stale and params.preprocess.use_ray:
        results, ray_nodes = _run_ray(stale, n_workers)
    else:
        results = _run_pool(stale, n_workers, progress) if stale else []
    errors = sorted((vid, err) for vid, _, err in results if err)
    if errors:
        lines = "; ".join(f"{vid}: {err}" for vid, err in errors[:5])
        raise InputError(None, f"{len(errors)} of {len(ids)} volume(s) failed to preprocess: {lines}")
    processed = sorted(vid for vid, written, _ in results if written)
    n_files = sum(len(w) for _, w, _ in results)

    records = records_for(out, ids)
    lost = [v for v in ids if v not in records]
    if lost:  # only if records vanished during the run
        raise InputError(out / RECORDS_DIR / f"{lost[0]}.json", "record missing after processing; re-run")
    manifest = build_manifest(settings, kept, records, quarantined)
    data = (json.dumps(manifest, indent=2, sort_keys=True) + "\n").encode()
    if not manifest_path.is_file() or manifest_path.read_bytes() != data:
        write_bytes_atomic(manifest_path, data)
    skipped = sorted(set(ids) - set(processed))
    sizes = ", ".join(f"{s} {len(kept[s])}" for s in SPLITS) + (f" (train incl. {len(copies)} augmented copies)" if copies else "")
    say(
        f"preprocessed {len(ids)} volumes → {out} ({len(processed)} processed, {len(skipped)} skipped as up to date, "
        f"{n_files} files written, {len(removed)} stale files removed, {len(quarantined)} quarantined); split: {sizes}"
    )
    if ray_nodes:
        per_node = {n: sum(1 for v in ray_nodes.values() if v == n) for n in sorted(set(ray_nodes.values()))}
        say(f"Ray Data ran {len(ray_nodes)} item(s) on {len(per_node)} node(s): "
            + ", ".join(f"{n} ({c})" for n, c in per_node.items()))
    return PreprocessResult(out, manifest, processed, skipped, n_files, removed, swept, ray_nodes)
