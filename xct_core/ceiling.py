"""The information ceiling of a stage on phantom data: what a perfect model could score.

Two X-rays do not determine a torso. The procedural generator (:mod:`xct_core.phantoms`)
knows which of its parts barely change the X-rays — the abdominal fat/bowel mixture field,
the fine tissue texture, the pulmonary vessel tree below the hila and the image noise
(:data:`xct_core.phantoms.anatomy.REDRAWN_PARTS`; :func:`xray_change` measures how little) —
and can re-draw exactly those with everything else fixed (``make_phantom(..., redraw=seed)``).

Why two re-draws bound the PSNR (the maths)
-------------------------------------------
Let ``A`` and ``B`` be two re-draws of one patient: two independent samples of ``x`` given the
X-rays ``y`` and the identifiable rest ``r`` (as far as the re-drawn parts are invisible in
``y``). For independent draws with mean ``m = E[x | y, r]``,
``E‖A − B‖² = E‖A − m‖² + E‖B − m‖² = 2·E‖x − m‖²``, and ``E‖x − m‖²`` is the MMSE of the
best possible estimator given ``(y, r)``. A real model sees only ``y`` (not ``r``), so its
MSE is at least that: ``MSE ≥ MMSE(y, r) = ½·E‖A − B‖²``. In PSNR:
``PSNR ≤ 10·log10(R² / ½·MSE(A, B)) = PSNR(A, B) + 10·log10 2`` (= two-draw PSNR + 3.01 dB),
R the metric's data range. The same holds for the body-masked PSNR (the mask is the
target's body, which the re-draw does not move). The re-drawn parts change the X-rays by a
few tenths of a percent of their range (:func:`xray_change`), so a model could in principle
read a little of them: the bound is tight up to that leakage, not a theorem about every
conceivable model. SSIM has no such identity: :func:`stage_ceiling` reports the two-draw
SSIM for reference only (never a bound).

What is averaged: per phantom, the MSEs of its two re-draws on the stage grid, resampled
exactly as the preprocess step does (:func:`xct_core.preprocess.stage_hu`, then scored with
the evaluation's own metric set, :func:`xct_core.metrics.hu_metrics_per_sample` with the
evaluation protocol's window, HU range, SSIM window and body threshold); the
ceiling is the PSNR of the mean ``½·MSE`` over ``phantoms`` phantoms (and, beside it, the mean of
the per-phantom ceilings, as the evaluation averages patient PSNRs).

How a gate uses it: :func:`xct_core.gates.ceiling_value` / :func:`xct_core.gates.achievable_fraction`
(in the gates module, so a step that only reads gate reports does not import the generator).

Per voxel: :func:`redraw_std` is the std over ``N`` seeded re-draws (the first two are the
ceiling's pair) on a stage grid — the exact posterior spread of the re-drawn parts, the map a
model's std is compared with (benchmarks/bench_redraw.py). Its mean variance over a volume is
that volume's MMSE above; it is a lower bound on the spread given the X-rays alone.

Real data: there is no generator, the ceiling is unknown (:func:`unknown_ceiling` says so).

The result is cached in a JSON file whose name carries a hash of everything that shapes it
(:func:`ceiling_key`: the generator version and ``data.synth`` without ``n``, the stage grid,
the preprocess fill/anti-aliasing, the window, the body threshold, the SSIM window, the number
of phantoms and the re-draw seed): a changed input is a different file, never a stale hit.

Pure science: numpy/torch only (no orchestration imports).
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from pathlib import Path
from typing import Any

import numpy as np

from xct_core.config import Params
from xct_core.grid import StageGrid

__all__ = ["CEILING_VERSION", "GATED", "cached_stage_ceiling", "ceiling_key", "phantom_on_grids", "redraw_std",
           "stage_ceiling", "stage_ceilings", "two_draw_bound_db", "unknown_ceiling", "xray_change"]

#: bump when the meaning of a cached ceiling changes
CEILING_VERSION = 1
#: PSNR metrics that get a ceiling (absolute gate metric → the same key in the ceiling)
GATED: tuple[str, ...] = ("psnr_window_db", "psnr_window_body_db", "psnr_hu_db", "psnr_hu_body_db")
_TWO = 10.0 * math.log10(2.0)


def two_draw_bound_db(two_draw_psnr_db: float) -> float:
    """The PSNR ceiling from the PSNR between two exact posterior draws: ``+ 10·log10 2``
    (module docstring: MMSE = half the two-draw MSE)."""
    return float(two_draw_psnr_db) + _TWO


def unknown_ceiling(reason: str) -> dict[str, Any]:
    """The ceiling of data without a generator: unknown, and why."""
    return {"known": False, "reason": reason}


def _grid(params: Params, k: int) -> StageGrid:
    st = params.stage(k)
    return StageGrid(k, int(st.size), float(st.fov_mm))


def _sections(params: Params, k: int, phantoms: int, seed: int) -> dict[str, Any]:
    from xct_core.phantoms import PHANTOM_VERSION

    synth = params.data.synth.model_dump(mode="json")
    synth.pop("n", None)  # the ceiling uses its own phantom count
    g = _grid(params, k)
    ev = params.eval
    w = params.hu.get_window()
    return {
        "v": CEILING_VERSION, "phantom_version": PHANTOM_VERSION, "synth": dict(sorted(synth.items())),
        "grid": {"size": g.size, "fov_mm": g.fov_mm}, "fill_hu": float(params.preprocess.fill_hu),
        "antialias": bool(params.preprocess.antialias), "window": [w.name, float(w.lo), float(w.hi)],
        "hu_range": [float(ev.hu_lo), float(ev.hu_hi)], "ssim": [float(ev.ssim_sigma), int(ev.ssim_win)],
        "body_hu": float(params.ingest.body_hu), "phantoms": int(phantoms), "seed": int(seed),
    }


def ceiling_key(params: Params, k: int, phantoms: int, seed: int) -> str:
    """Hash of everything that shapes stage ``k``'s ceiling (module docstring)."""
    doc = json.dumps(_sections(params, k, phantoms, seed), sort_keys=True, default=str)
    return hashlib.sha256(doc.encode()).hexdigest()[:16]


def phantom_on_grids(params: Params, index: int, ks: list[int], redraw: list[int] | None = None) -> dict[int, np.ndarray]:
    """Phantom ``index`` of ``params.data.synth`` (``redraw``: the generator's re-draw seed, ``None``
    = the phantom as the data set has it) resampled onto each stage grid ``k`` in ``ks`` exactly
    as preprocess does (:func:`xct_core.preprocess.stage_hu`): int16 HU."""
    from xct_core.io import CTVolume
    from xct_core.phantoms import synth_phantom
    from xct_core.preprocess import stage_hu

    s = params.data.synth
    ph = synth_phantom(s.seed, index, s.size, s.spacing_mm, s.contrast_fraction, s.noise_hu,
                       redraw=redraw)  # type: ignore[arg-type]
    vol = CTVolume(hu=ph.hu, affine=ph.affine, source=f"phantom {index}" + (f" re-draw {redraw}" if redraw else ""))
    return {k: stage_hu(vol, _grid(params, k), float(params.preprocess.fill_hu), bool(params.preprocess.antialias))
            for k in ks}


def _redraw_volumes(params: Params, index: int, seed: int, ks: list[int], draws: int) -> dict[int, list[np.ndarray]]:
    """``draws`` re-draws of phantom ``index`` (re-draw ``d`` seeded ``[seed, index, d]``) on each
    stage grid (:func:`phantom_on_grids`)."""
    out: dict[int, list[np.ndarray]] = {k: [] for k in ks}
    for draw in range(int(draws)):
        for k, v in phantom_on_grids(params, index, ks, [int(seed), int(index), draw]).items():
            out[k].append(v)
    return out


def _redraws(params: Params, index: int, seed: int, grids: list[StageGrid]) -> dict[int, tuple[np.ndarray, np.ndarray]]:
    """Two re-draws of phantom ``index`` resampled onto each grid (int16 HU, as preprocess)."""
    return {k: (v[0], v[1]) for k, v in _redraw_volumes(params, index, seed, [g.k for g in grids], 2).items()}


def redraw_std(params: Params, index: int, ks: list[int], *, draws: int = 4, seed: int = 1) -> dict[int, np.ndarray]:
    """Per-voxel standard deviation (float32 HU, ``ddof = 1``) over ``draws`` re-draws of phantom
    ``index`` of ``params.data.synth`` on each stage grid ``k`` in ``ks`` (resampled as preprocess
    does; the first two re-draws are the ceiling's pair for the same ``seed``).

    What it is: the generator's exact posterior spread of the re-drawn parts
    (:data:`xct_core.phantoms.anatomy.REDRAWN_PARTS`) given everything else — zero where the
    generator re-draws nothing (the air around the body when ``noise_hu`` is 0), positive in
    re-drawn tissue. It is a LOWER bound on the posterior spread given the X-rays alone (the
    identifiable rest is held fixed here; a model also carries its own estimation error).
    ``draws = 2`` gives ``|a − b| / √2``."""
    if draws < 2:
        raise ValueError(f"draws must be >= 2 for a standard deviation, got {draws}")
    vols = _redraw_volumes(params, index, seed, list(ks), draws)
    return {k: np.std(np.stack(v).astype(np.float64), axis=0, ddof=1).astype(np.float32) for k, v in vols.items()}


def _summarise(params: Params, k: int, pairs: list[tuple[np.ndarray, np.ndarray]], phantoms: int, seed: int,
               seconds: float) -> dict[str, Any]:
    import torch

    from xct_core.metrics import hu_metrics_per_sample, ssim_taps

    ev, w = params.eval, params.hu.get_window()
    span = float(ev.hu_hi) - float(ev.hu_lo)
    rows = [hu_metrics_per_sample(torch.from_numpy(a.astype(np.float32)), torch.from_numpy(b.astype(np.float32)), w,
                                  hu_range=(float(ev.hu_lo), float(ev.hu_hi)), ssim_sigma=float(ev.ssim_sigma),
                                  ssim_win=ssim_taps(int(a.shape[-1]), int(ev.ssim_win)),
                                  body_hu=float(params.ingest.body_hu))[0] for a, b in pairs]
    ranges = {"psnr_window_db": 2.0, "psnr_window_body_db": 2.0,  # the window's normalised range
              "psnr_hu_db": span, "psnr_hu_body_db": span}
    metrics: dict[str, Any] = {}
    for key in GATED:
        two = np.array([r.get(key, math.nan) for r in rows], dtype=np.float64)
        if not np.all(np.isfinite(two)):
            continue
        mse = ranges[key] ** 2 / 10.0 ** (two / 10.0)  # back from each phantom's PSNR
        metrics[key] = {
            "ceiling_db": float(10.0 * math.log10(ranges[key] ** 2 / (0.5 * mse.mean()))),
            "ceiling_patient_mean_db": float(np.mean([two_draw_bound_db(t) for t in two])),
            "two_draw_db": float(two.mean()),
            "per_phantom_db": [float(two_draw_bound_db(t)) for t in two],
        }
    ssim = np.array([r.get("ssim_window", math.nan) for r in rows], dtype=np.float64)
    g = _grid(params, k)
    return {
        "known": True, "stage": k, "grid": f"{g.size}³ @ {g.spacing_mm:g} mm", "phantoms": int(phantoms),
        "redraw_seed": int(seed), "metrics": metrics,
        "ssim_window_two_draw": float(ssim.mean()) if ssim.size else None,
        "ssim_note": "two-draw SSIM, for reference only: SSIM has no half-MSE identity, so no SSIM ceiling is claimed",
        "redrawn": list(_parts()), "method": "two re-draws per phantom, ceiling = PSNR of half their mean MSE "
        "(= two-draw PSNR + 3.01 dB), xct_core/ceiling.py", "seconds": round(float(seconds), 2),
        "key": ceiling_key(params, k, phantoms, seed),
    }


def _parts() -> tuple[str, ...]:
    from xct_core.phantoms.anatomy import REDRAWN_PARTS

    return REDRAWN_PARTS


def stage_ceiling(params: Params, k: int, *, phantoms: int = 2, seed: int = 1) -> dict[str, Any]:
    """Stage ``k``'s ceiling on the phantoms of ``params.data.synth`` (module docstring):
    ``{"known": True, "metrics": {key: {"ceiling_db", "two_draw_db", …}}, …}`` for every
    PSNR key in :data:`GATED`."""
    return stage_ceilings(params, [k], phantoms=phantoms, seed=seed)[k]


def stage_ceilings(params: Params, ks: list[int], *, phantoms: int = 2, seed: int = 1) -> dict[int, dict[str, Any]]:
    """:func:`stage_ceiling` of several stages from the same re-draws (one synthesis per phantom)."""
    if phantoms < 1:
        raise ValueError(f"phantoms must be >= 1, got {phantoms}")
    grids = [_grid(params, k) for k in ks]
    t0 = time.perf_counter()
    pairs: dict[int, list[tuple[np.ndarray, np.ndarray]]] = {k: [] for k in ks}
    for i in range(int(phantoms)):
        for k, ab in _redraws(params, i, seed, grids).items():
            pairs[k].append(ab)
    dt = (time.perf_counter() - t0) / max(len(ks), 1)
    return {k: _summarise(params, k, pairs[k], phantoms, seed, dt) for k in ks}


def cached_stage_ceiling(params: Params, k: int, cache_dir: str | Path, *, phantoms: int = 2,
                         seed: int = 1) -> dict[str, Any]:
    """:func:`stage_ceiling`, read from ``cache_dir/stage{k}-{key}.json`` when that exists
    (the key names every input) and written there otherwise (atomically). A miss computes
    every stage of the cascade from the same re-draws (the synthesis dominates the cost) and
    caches each, so the later gates of a run find theirs."""
    from xct_core.atomic import write_json_atomic

    def path_of(j: int) -> Path:
        return Path(cache_dir) / f"stage{j}-{ceiling_key(params, j, phantoms, seed)}.json"

    def read(j: int) -> dict[str, Any] | None:
        p = path_of(j)
        try:
            doc = json.loads(p.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None  # absent or unreadable: recomputed (and overwritten)
        return {**doc, "cached": str(p)} if isinstance(doc, dict) and doc.get("key") == p.stem.split("-", 1)[1] else None

    hit = read(k)
    if hit is not None:
        return hit
    todo = sorted({k} | {j for j in range(1, params.n_stages + 1) if read(j) is None})
    docs = stage_ceilings(params, todo, phantoms=phantoms, seed=seed)
    for j, doc in docs.items():
        try:
            write_json_atomic(path_of(j), doc)
        except OSError as e:  # an unwritable cache costs time, never the gate
            doc["cache_note"] = f"not cached: {path_of(j).parent} is not writable ({e.strerror or e})"
    return docs[k]


def xray_change(params: Params, *, phantoms: int = 2, seed: int = 1) -> dict[str, Any]:
    """How much the re-draw changes the two X-rays: per view, the mean and max absolute
    difference of the line integrals between the two re-draws, as a percentage of the
    projection range (max − min of the first re-draw), rendered as preprocess renders them
    (:func:`xct_core.preprocess.render_xrays` from the finest stage grid)."""
    from xct_core.preprocess import PreprocessSettings, render_xrays

    settings = PreprocessSettings.from_params(params)
    fine = settings.finest
    out: dict[str, list[float]] = {}
    for i in range(int(phantoms)):
        a, b = _redraws(params, i, seed, [fine])[fine.k]
        fa, la, _ = render_xrays(a, fine.affine(), settings)
        fb, lb, _ = render_xrays(b, fine.affine(), settings)
        for view, x, y in (("frontal", fa, fb), ("lateral", la, lb)):
            rng = float(x.max() - x.min()) or 1.0
            d = np.abs(x.astype(np.float64) - y)
            out.setdefault(f"{view}_mean_pct", []).append(100.0 * float(d.mean()) / rng)
            out.setdefault(f"{view}_rms_pct", []).append(100.0 * float(np.sqrt((d**2).mean())) / rng)
            out.setdefault(f"{view}_max_pct", []).append(100.0 * float(d.max()) / rng)
    return {key: float(np.mean(v)) for key, v in out.items()} | {"phantoms": int(phantoms), "grid": fine.size}
