"""Patient-level bootstrap intervals: the one source of every reported interval.

* :data:`BOOTSTRAP` / :class:`BootstrapSpec` — how a 95 % interval is obtained
  (``scipy.stats.bootstrap``: fixed seed, stated method and number of resamples; no interval
  below ``min_patients``);
* :func:`bootstrap_interval` — a patient mean and its interval (the model card, the HTML
  report, ``reports/summary.json`` and the gates all call it);
* :func:`paired_bootstrap` — the mean of per-patient differences (candidate − baseline,
  matched by patient id) and its interval: the champion and non-inferiority checks of
  :mod:`xct_core.gates` judge the lower bound of it;
* :func:`read_rows_csv` / :func:`rows_by_id` — the per-patient rows an evaluate step writes
  (``per_patient.csv``, :func:`xct_core.evaluation.rows_csv`).

Why a paired bootstrap: two models evaluated on the SAME test patients share the patients'
difficulty; the per-patient differences cancel it, so their interval is much narrower than
the difference of two unpaired intervals, and its lower bound says how much worse the
candidate could plausibly be on patients like these.

Pure NumPy/SciPy (no torch).
"""

from __future__ import annotations

import csv
import io
import math
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from xct_core.errors import InputError

__all__ = ["BOOTSTRAP", "BootstrapSpec", "bootstrap_interval", "format_interval", "paired_bootstrap",
           "read_rows_csv", "rows_by_id"]


@dataclass(frozen=True)
class BootstrapSpec:
    """How the 95 % interval of a patient mean is obtained (``scipy.stats.bootstrap``)."""

    method: str = "BCa"
    n_resamples: int = 9999
    confidence_level: float = 0.95
    seed: int = 0  #: ``numpy.random.default_rng(seed)``, the same for every metric
    min_patients: int = 5  #: fewer test patients: no interval


BOOTSTRAP = BootstrapSpec()


def read_rows_csv(path: str | Path) -> list[dict[str, Any]] | None:
    """The per-patient rows of ``per_patient.csv`` (``id`` a string, every other column a
    float; an empty cell is NaN, as :func:`xct_core.evaluation.rows_csv` writes NaN), ``None``
    for a skip marker (first line ``skipped,reason``). :class:`InputError` when unreadable."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise InputError(p, "per-patient rows not found (run the evaluate step first)") from None
    except (OSError, UnicodeDecodeError) as e:
        raise InputError(p, f"unreadable per-patient rows ({getattr(e, 'strerror', None) or e})") from None
    reader = csv.DictReader(io.StringIO(text))
    fields = reader.fieldnames or []
    if fields[:2] == ["skipped", "reason"]:
        return None
    if "id" not in fields:
        raise InputError(p, "not a per-patient rows file (no 'id' column)")
    rows = []
    for r in reader:
        row: dict[str, Any] = {"id": r["id"]}
        for k, v in r.items():
            if k == "id":
                continue
            try:
                row[k] = float(v) if v not in ("", None) else math.nan
            except ValueError:
                raise InputError(p, f"row {r['id']!r}: column {k!r} is not a number ({v!r})") from None
        rows.append(row)
    return rows


def bootstrap_interval(values: Sequence[float], spec: BootstrapSpec = BOOTSTRAP) -> dict[str, Any]:
    """Patient mean of ``values`` (non-finite values dropped; ``n`` = those kept) and its
    bootstrap interval ``[low, high]`` (``scipy.stats.bootstrap`` of the mean with ``spec``),
    or ``interval: None`` with a ``note`` when there are fewer than ``spec.min_patients``."""
    from scipy.stats import bootstrap

    vals = np.asarray([float(v) for v in values if v is not None and math.isfinite(float(v))], dtype=np.float64)
    n = int(vals.size)
    out: dict[str, Any] = {"mean": float(vals.mean()) if n else None, "n": n, "interval": None}
    if n < spec.min_patients:
        out["note"] = f"n < {spec.min_patients}: no interval (n = {n})"
        return out
    if float(np.ptp(vals)) == 0.0:  # every patient the same value: the resamples are all that value
        out["interval"] = [float(vals[0]), float(vals[0])]
        out["note"] = "every patient has the same value"
        return out
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # scipy's degenerate-data warning: handled below
        res = bootstrap((vals,), np.mean, confidence_level=spec.confidence_level, n_resamples=spec.n_resamples,
                        method=spec.method, rng=np.random.default_rng(spec.seed))
    lo, hi = float(res.confidence_interval.low), float(res.confidence_interval.high)
    if math.isfinite(lo) and math.isfinite(hi):
        out["interval"] = [lo, hi]
    else:
        out["note"] = f"the {spec.method} interval is undefined for these values"
    return out


def rows_by_id(rows: Sequence[Mapping[str, Any]] | None, key: str) -> dict[str, float]:
    """``{patient id: value of key}`` of per-patient rows (rows without the key or an id skipped)."""
    out: dict[str, float] = {}
    for r in rows or ():
        if "id" in r and key in r:
            try:
                out[str(r["id"])] = float(r[key])
            except (TypeError, ValueError):
                out[str(r["id"])] = math.nan
    return out


def paired_bootstrap(candidate: Mapping[str, float], baseline: Mapping[str, float],
                     spec: BootstrapSpec = BOOTSTRAP) -> dict[str, Any]:
    """The paired difference ``candidate − baseline`` over the patients both have (by id):
    :func:`bootstrap_interval` of the per-patient differences (``mean``, ``interval``, ``n``,
    ``note``) plus ``ids`` (the patients compared) and ``missing`` (ids only one side has).
    Patients whose difference is not finite are dropped (counted in ``n``)."""
    common = sorted(set(candidate) & set(baseline))
    diffs = [float(candidate[i]) - float(baseline[i]) for i in common]
    out = bootstrap_interval(diffs, spec)
    out["ids"] = common
    out["missing"] = sorted(set(candidate) ^ set(baseline))
    return out


def format_interval(stat: Mapping[str, Any] | None, digits: int = 2) -> str:
    """``"30.12 [29.80, 30.41]"`` of a :func:`bootstrap_interval` result (``"—"`` without a
    mean; the mean alone without an interval)."""
    if not stat or stat.get("mean") is None or not math.isfinite(float(stat["mean"])):
        return "—"
    text = f"{float(stat['mean']):.{digits}f}"
    iv = stat.get("interval")
    if iv:
        text += f" [{float(iv[0]):.{digits}f}, {float(iv[1]):.{digits}f}]"
    return text
