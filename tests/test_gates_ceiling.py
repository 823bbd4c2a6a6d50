"""Gates that know their ceiling (issue 21): the non-inferiority margin, ceiling/floor/gain
beside the thresholds, "unreachable on this data", body-masked gating, intervals, and the
paired-bootstrap champion / twin checks — on constructed data whose answer is known."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from xct_core.config import ConfigError, RelativeGate, StageGate, params_from_dict
from xct_core.evaluation import rows_csv
from xct_core.gates import UNREACHABLE, Champion, evaluate_gate, non_inferiority_margin_db
from xct_core.intervals import paired_bootstrap

GOOD = {"psnr_window_db": 30.0, "psnr_window_body_db": 26.0, "ssim_window": 0.9, "nan_count": 0, "std": 0.4,
        "target_std": 0.5, "baseline_psnr_window_db": 18.0, "baseline_psnr_window_body_db": 14.0,
        "test_ids_hash": "h", "samples": 8}


def _ceiling(window: float, body: float) -> dict:
    return {"known": True, "metrics": {"psnr_window_db": {"ceiling_db": window},
                                       "psnr_window_body_db": {"ceiling_db": body}}}


# --------------------------------------------------------------------------- the margin formula


def test_non_inferiority_margin_is_the_posterior_mean_penalty_plus_slack() -> None:
    assert non_inferiority_margin_db(8, 0.0) == pytest.approx(0.51, abs=0.005)
    assert non_inferiority_margin_db(2, 0.0) == pytest.approx(1.76, abs=0.005)
    assert non_inferiority_margin_db(8) == pytest.approx(0.51 + 0.3, abs=0.005)  # default slack 0.3 dB
    assert non_inferiority_margin_db(2) == pytest.approx(2.06, abs=0.005)
    # K -> infinity: only the slack; K = 1: 3.01 dB (two independent draws' half-MSE identity)
    assert non_inferiority_margin_db(10**9, 0.0) == pytest.approx(0.0, abs=1e-6)
    assert non_inferiority_margin_db(1, 0.0) == pytest.approx(10 * math.log10(2))
    with pytest.raises(ValueError):
        non_inferiority_margin_db(0)


def test_margin_matches_a_simulated_perfect_sampler() -> None:
    """A K-sample mean of exact posterior draws vs the exact posterior mean: the PSNR gap is
    10·log10(1 + 1/K) (Gaussian toy, 2e5 voxels)."""
    rng = np.random.default_rng(0)
    n, k, sigma = 200_000, 4, 0.1
    m = rng.uniform(-1, 1, n)  # the posterior mean (what the twin estimates)
    x = m + sigma * rng.standard_normal(n)  # the truth: one posterior draw
    kmean = m + sigma * rng.standard_normal((k, n)).mean(axis=0)  # mean of K independent draws

    def psnr(a: np.ndarray) -> float:
        return 10 * math.log10(4.0 / float(((a - x) ** 2).mean()))

    assert psnr(m) - psnr(kmean) == pytest.approx(non_inferiority_margin_db(k, 0.0), abs=0.03)


# --------------------------------------------------------------------------- ceiling beside thresholds


def test_threshold_above_the_ceiling_is_flagged_and_the_gain_fraction_is_exact() -> None:
    gate = StageGate(psnr_window_db=35.0, ssim_window=0.8, psnr_window_body_db=24.0)
    rep = evaluate_gate(3, GOOD, gate, ceiling=_ceiling(33.0, 30.0))
    by = {c.name: c for c in rep.checks}
    whole, body = by["psnr_window"], by["psnr_window_body"]
    assert whole.unreachable and UNREACHABLE in whole.note and "33.00" in whole.note
    assert not body.unreachable  # 24 < 30
    assert whole.ceiling == 33.0 and whole.floor == 18.0
    assert whole.achievable_fraction == pytest.approx((30.0 - 18.0) / (33.0 - 18.0))
    assert body.achievable_fraction == pytest.approx((26.0 - 14.0) / (30.0 - 14.0))
    d = rep.to_dict()
    assert d["unreachable"] == ["psnr_window"] and d["ceiling"]["known"] is True
    # the threshold stays what params say: 30 < 35 still fails
    assert not rep.passed and [c.name for c in rep.failed] == ["psnr_window"]
    # exactly at the ceiling is unreachable too (strict '>')
    assert {c.name: c for c in evaluate_gate(1, GOOD, StageGate(psnr_window_db=33.0, ssim_window=0.5),
                                             ceiling=_ceiling(33.0, 30.0)).checks}["psnr_window"].unreachable


def test_unknown_ceiling_flags_nothing() -> None:
    rep = evaluate_gate(1, GOOD, StageGate(psnr_window_db=99.0, ssim_window=0.5),
                        ceiling={"known": False, "reason": "real data"})
    assert rep.unreachable == [] and all(c.ceiling is None for c in rep.checks)
    assert rep.to_dict()["ceiling"] == {"known": False, "reason": "real data"}


def test_body_gate_decides_and_a_null_threshold_only_reports() -> None:
    gated = StageGate(psnr_window_db=28.0, ssim_window=0.65, psnr_window_body_db=27.0)
    rep = evaluate_gate(1, GOOD, gated)
    assert not rep.passed and [c.name for c in rep.failed] == ["psnr_window_body"]  # 26 < 27
    assert evaluate_gate(1, GOOD, StageGate(psnr_window_db=28.0, ssim_window=0.65, psnr_window_body_db=25.0)).passed
    # whole-grid not gating (null): a failing value no longer decides, but is still reported
    info = evaluate_gate(1, {**GOOD, "psnr_window_db": 10.0},
                         StageGate(psnr_window_db=None, ssim_window=0.65, psnr_window_body_db=25.0))
    c = {c.name: c for c in info.checks}["psnr_window"]
    assert info.passed and not c.gating and c.value == 10.0 and "not gating" in c.note
    # a missing body metric fails a gating body check (never passes by default)
    no_body = {k: v for k, v in GOOD.items() if k != "psnr_window_body_db"}
    assert [c.name for c in evaluate_gate(1, no_body, gated).failed] == ["psnr_window_body"]


def test_absolute_checks_carry_the_patient_interval() -> None:
    rows = [{"id": f"p{i}", "psnr_window_db": 30.0 + d, "ssim_window": 0.9, "psnr_window_body_db": 26.0 + d}
            for i, d in enumerate([-1.0, -0.5, 0.0, 0.5, 1.0, 0.2])]
    rep = evaluate_gate(1, GOOD, StageGate(psnr_window_db=28.0, ssim_window=0.65), rows=rows)
    iv = {c.name: c for c in rep.checks}["psnr_window"].interval
    mean = float(np.mean([r["psnr_window_db"] for r in rows]))
    assert iv is not None and iv[0] < mean < iv[1] and iv[1] - iv[0] < 2.0


# --------------------------------------------------------------------------- paired bootstrap


def _rows(base: np.ndarray, delta: np.ndarray, key: str = "psnr_window_db", prefix: str = "") -> list[dict]:
    return [{"id": f"p{i:02d}", prefix + key: float(b + d)} for i, (b, d) in enumerate(zip(base, delta, strict=True))]


def _champ(base: np.ndarray) -> Champion:
    return Champion("3", "h", {"psnr_window_db": float(base.mean())}, rows=_rows(base, np.zeros_like(base)))


CHAMP_GATE = StageGate(psnr_window_db=1.0, ssim_window=0.1, relative=[
    RelativeGate(metric="psnr_window_db", baseline="champion", min_absolute_change=-0.1, paired_bootstrap=True)])


@pytest.mark.parametrize("shift, noise, passes", [
    (0.5, 0.05, True),     # clearly better on every patient
    (-0.5, 0.05, False),   # clearly worse
    (0.0, 0.02, True),     # the same model: the change's interval sits inside the ±0.1 dB margin
    (0.05, 1.5, False),    # mean change ≥ -0.1 (the old point check passes) but the interval is wide
])
def test_paired_champion_check_judges_the_lower_bound(shift: float, noise: float, passes: bool) -> None:
    rng = np.random.default_rng(1)
    base = rng.uniform(25, 35, 12)  # patients differ a lot: only pairing cancels it
    delta = shift + noise * rng.standard_normal(12)
    delta -= delta.mean() - shift  # the mean change is exactly `shift`
    rows = _rows(base, delta)
    metrics = {**GOOD, "psnr_window_db": float((base + delta).mean())}
    c = {c.name: c for c in evaluate_gate(2, metrics, CHAMP_GATE, _champ(base), rows=rows).checks}["psnr_window_vs_champion"]
    assert c.passed is passes
    assert c.change == pytest.approx(shift) and "paired bootstrap" in c.decided_by
    lo, hi = c.change_interval
    assert lo <= shift <= hi and c.margin == pytest.approx(lo + 0.1)
    ref = paired_bootstrap({r["id"]: r["psnr_window_db"] for r in rows},
                           {f"p{i:02d}": float(b) for i, b in enumerate(base)})
    assert [lo, hi] == pytest.approx(ref["interval"])  # the one bootstrap (xct_core/intervals.py)


def test_champion_without_rows_falls_back_to_the_point_check_with_a_note() -> None:
    base = np.full(6, 30.0)
    rows = _rows(base, np.full(6, -0.05))
    champ = Champion("3", "h", {"psnr_window_db": 30.0}, rows=None)
    c = {c.name: c for c in evaluate_gate(2, {**GOOD, "psnr_window_db": 29.95}, CHAMP_GATE, champ,
                                          rows=rows).checks}["psnr_window_vs_champion"]
    assert c.passed and c.change_interval is None and "no per-patient rows" in c.note
    assert c.decided_by.startswith("point estimate")


def test_twin_non_inferiority_uses_k_from_the_evaluation() -> None:
    gate = StageGate(psnr_window_db=1.0, ssim_window=0.1, relative=[
        RelativeGate(metric="psnr_window_db", baseline="direct_twin", non_inferiority_slack_db=0.3, paired_bootstrap=True)])
    rng = np.random.default_rng(2)
    twin = rng.uniform(25, 35, 10)

    def check(gap: float, k: int | None):
        rows = [{"id": f"p{i:02d}", "psnr_window_db": float(t - gap + 0.02 * rng.standard_normal()),
                 "direct_psnr_window_db": float(t)} for i, t in enumerate(twin)]
        m = {**GOOD, "psnr_window_db": float(twin.mean() - gap), "direct_psnr_window_db": float(twin.mean())}
        m = {**m, "samples": k} if k is not None else {kk: v for kk, v in m.items() if kk != "samples"}
        return {c.name: c for c in evaluate_gate(1, m, gate, rows=rows).checks}["psnr_window_vs_direct_twin"]

    ok = check(0.6, 8)  # 0.6 dB behind, margin 0.81 dB at K = 8
    assert ok.passed and ok.required_change == pytest.approx(-non_inferiority_margin_db(8))
    assert "K = 8" in ok.note and ok.change_interval is not None
    assert not check(1.0, 8).passed  # 1.0 > 0.81
    assert check(1.0, 2).passed  # K = 2: margin 2.06 dB
    missing = check(0.0, None)
    assert not missing.passed and "samples" in missing.note


def test_twin_non_inferiority_judges_the_k_sample_mean_not_the_anchor() -> None:
    """With eval.point_estimate auto/anchor the point estimate IS the twin (a change of 0 by
    construction); the evaluation also measures the K-sample mean (``mean_``) and the check
    judges that: a K-mean 1.5 dB behind fails at K = 8 although the point estimate ties."""
    gate = StageGate(psnr_window_db=1.0, ssim_window=0.1, relative=[
        RelativeGate(metric="psnr_window_db", baseline="direct_twin", non_inferiority_slack_db=0.3, paired_bootstrap=True)])
    twin = np.random.default_rng(3).uniform(25, 35, 10)

    def check(kmean_gap: float):
        rows = [{"id": f"p{i:02d}", "psnr_window_db": float(t), "mean_psnr_window_db": float(t - kmean_gap + 0.01 * i),
                 "direct_psnr_window_db": float(t)} for i, t in enumerate(twin)]
        m = {**GOOD, "samples": 8, "psnr_window_db": float(twin.mean()), "direct_psnr_window_db": float(twin.mean()),
             "mean_psnr_window_db": float(np.mean([r["mean_psnr_window_db"] for r in rows]))}
        return {c.name: c for c in evaluate_gate(1, m, gate, rows=rows).checks}["psnr_window_vs_direct_twin"]

    bad, good = check(1.5), check(0.3)
    assert not bad.passed and bad.value == pytest.approx(twin.mean() - 1.5 + 0.045) and "mean_psnr_window_db" in bad.note
    assert good.passed and good.change_interval is not None


def test_non_inferiority_params_are_checked() -> None:
    base = {"psnr_window_db": 28, "ssim_window": 0.65}
    with pytest.raises(ConfigError, match="direct_twin"):
        params_from_dict({"gates": {"stage1": {**base, "relative": [
            {"baseline": "mean_volume", "non_inferiority_slack_db": 0.3}]}}})
    with pytest.raises(ConfigError, match="leave min_absolute_change"):
        params_from_dict({"gates": {"stage1": {**base, "relative": [
            {"baseline": "direct_twin", "non_inferiority_slack_db": 0.3, "min_absolute_change": -1}]}}})


# --------------------------------------------------------------------------- the gate step and the summary


def _eval_dir(tmp: Path, n: int = 6) -> Path:
    d = tmp / "eval" / "stage1"
    d.mkdir(parents=True)
    rows = [{"id": f"p{i}", "psnr_window_db": 30.0 + 0.3 * i, "psnr_window_body_db": 26.0 + 0.3 * i,
             "ssim_window": 0.9, "direct_psnr_window_db": 30.2 + 0.3 * i, "baseline_psnr_window_db": 18.0,
             "nan_count": 0.0, "std": 0.4, "target_std": 0.5} for i in range(n)]
    mean = {k: float(np.mean([r[k] for r in rows])) for k in rows[0] if k != "id"}
    (d / "metrics.json").write_text(json.dumps({**mean, "stage": 1, "samples": 8, "test_ids_hash": "h",
                                                "n_patients": n}))
    (d / "per_patient.csv").write_text(rows_csv(rows))
    return d


def test_gate_step_with_real_data_says_the_ceiling_is_unknown_and_summary_has_intervals(tmp_path: Path) -> None:
    from components.gate import run_gate
    from components.pipeline_verdict import format_summary, stage_entry

    d = _eval_dir(tmp_path)
    from xct_core.config import Params

    gates = Params().model_dump(mode="json")["gates"]
    gates["stage1"] = {"psnr_window_db": 28.0, "ssim_window": 0.65, "psnr_window_body_db": 24.0,
                       "ceiling": {"source": "none"},
                       "relative": [{"baseline": "direct_twin", "paired_bootstrap": True, "non_inferiority_slack_db": 0.3}]}
    params = params_from_dict({"gates": gates})
    rep = run_gate(1, d / "metrics.json", tmp_path / "gates" / "stage1.json", params, ceiling_dir=tmp_path / "cache")
    doc = json.loads((tmp_path / "gates" / "stage1.json").read_text())
    assert rep.passed and doc["ceiling"]["known"] is False and "unknown" in doc["ceiling"]["reason"]
    twin = {c["name"]: c for c in doc["checks"]}["psnr_window_vs_direct_twin"]
    assert twin["change"] == pytest.approx(-0.2) and twin["change_interval"] is not None
    assert not (tmp_path / "cache").exists()  # nothing computed for real data
    entry = stage_entry(1, doc, json.loads((d / "metrics.json").read_text()), tmp_path / "gates" / "stage1.json",
                        d / "metrics.json")
    lo, hi = entry["intervals"]["psnr_window_db"]
    assert lo < entry["metrics"]["psnr_window_db"] < hi
    assert "nan_count" not in entry["intervals"] and "nan_count" in entry["metrics"]  # a count has no mean interval
    assert entry["ceiling"]["known"] is False
    summary = {"stages": [entry], "status": "rejected", "rejected_at_stage": 1, "model_uri": None, "alias": None,
               "mlflow_tracking_uri": "sqlite:///x.db", "reports": {"summary": "s.json"}}
    assert "unknown" in format_summary(summary)


def test_html_report_shows_intervals_and_the_unreachable_flag(tmp_path: Path) -> None:
    from xct_core.config import Params
    from xct_core.evaluation import EvalProtocol
    from xct_core.intervals import bootstrap_interval
    from xct_core.report import ReportCase, build_report

    vals = [29.0, 29.5, 30.0, 30.5, 31.0, 30.2]
    cases = [ReportCase(f"p{i}", {"psnr_window_db": v, "baseline_psnr_window_db": 18.0 + 0.1 * i})
             for i, v in enumerate(vals)]
    summary = {"psnr_window_db": float(np.mean(vals)), "baseline_psnr_window_db": 18.25}
    rep = evaluate_gate(3, GOOD, StageGate(psnr_window_db=35.0, ssim_window=0.8), ceiling=_ceiling(33.0, 30.0))
    text = build_report(tmp_path / "r.html", title="t", cases=cases, summary=summary, gates=[rep.to_dict()],
                        label_context=EvalProtocol.from_params(Params()).label_context(16)).read_text()
    lo, hi = bootstrap_interval(vals)["interval"]
    assert f"[{lo:.4g}, {hi:.4g}]" in text  # the same interval as the card and the summary
    assert "unreachable on this data" in text and "33 (floor 18" in text


def test_gate_step_on_phantom_data_writes_the_ceiling_beside_the_thresholds(tmp_path: Path) -> None:
    from components.gate import run_gate
    from xct_core.config import Params

    d = _eval_dir(tmp_path)
    data = Params().model_dump(mode="json")
    data["data"]["synth"].update(size=32, spacing_mm=12.8)  # small phantoms: seconds
    data["gates"]["stage1"].update(psnr_window_db=60.0, ceiling={"source": "synth", "phantoms": 1, "seed": 1},
                                   relative=[])
    params = params_from_dict(data)
    rep = run_gate(1, d / "metrics.json", tmp_path / "g.json", params, ceiling_dir=tmp_path / "cache")
    doc = json.loads((tmp_path / "g.json").read_text())
    whole = {c["name"]: c for c in doc["checks"]}["psnr_window"]
    assert doc["ceiling"]["known"] and whole["ceiling"] == pytest.approx(
        doc["ceiling"]["metrics"]["psnr_window_db"]["ceiling_db"])
    assert whole["unreachable"] and doc["unreachable"] == ["psnr_window"] and not rep.passed  # 60 dB: above it
    assert whole["floor"] == 18.0 and whole["achievable_fraction"] == pytest.approx(
        (whole["value"] - 18.0) / (whole["ceiling"] - 18.0))
    assert len(list((tmp_path / "cache").glob("stage*.json"))) == params.n_stages  # cached for the later gates
