"""The model card (xct_core/model_card.py) and its MLflow side (components/register.py,
`xct models show`), against a real MLflow on sqlite in a tmp dir.

Per-patient rows are drawn by the TEST from a seeded generator (labelled values), so the
expected statistics are computed here, independently, with a direct scipy call on the same
rows; the protocol numbers are checked against the protocol object built from params.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from scipy import stats

from cli_run import xct
from test_evaluate import export_tiny_stages
from xct_core.config import Params
from xct_core.evaluation import EvalProtocol, aggregate, rows_csv
from xct_core.metrics import ssim_taps
from xct_core.model_card import (
    BOOTSTRAP,
    CARD_SECTIONS,
    StageInputs,
    bootstrap_interval,
    build_card,
    read_rows_csv,
    render_markdown,
)

NAME = "xct-cascade"


def _rows(n: int, seed: int, psnr: float = 24.0) -> list[dict[str, Any]]:
    rng = np.random.default_rng(seed)
    return [{"id": f"case{i:02d}", "psnr_window_db": float(psnr + 2 * rng.standard_normal()),
             "ssim_window": float(0.8 + 0.05 * rng.standard_normal()), "psnr_hu_db": float(30 + rng.standard_normal()),
             "mae_hu": float(40 + 5 * rng.standard_normal()), "nan_count": 0.0, "std": 0.4, "target_std": 0.5,
             "psnr_slice_avg_db": float(33 + rng.standard_normal()),
             "baseline_psnr_window_db": float(15 + rng.standard_normal())} for i in range(n)]


def _metrics(k: int, rows: list[dict[str, Any]], protocol: EvalProtocol, size: int) -> dict[str, Any]:
    return {**aggregate(rows), "stage": k, "split": "test", "n_patients": len(rows), "samples": 2, "sample_steps": 1,
            "test_ids_hash": "split-A", "ssim_taps": protocol.ssim_taps(size), "protocol": protocol.describe(size)}


def _card(params: Params, rows_by_stage: dict[int, list[dict[str, Any]]]) -> dict[str, Any]:
    prot = EvalProtocol.from_params(params)
    stages = []
    for k in range(1, params.n_stages + 1):
        rows = rows_by_stage.get(k)
        m = _metrics(k, rows, prot, params.stage(k).size) if rows else None
        gate = {"stage": k, "passed": True, "summary": f"stage {k}: gate passed (1 checks)",
                "checks": [{"name": "psnr_window", "metric": "psnr_window_db", "op": ">", "threshold": 10.0,
                            "value": 24.0, "passed": True, "margin": 14.0}]} if rows else None
        stages.append(StageInputs(k, m, rows, gate))
    return build_card(params=params, protocol=prot, stages=stages, status={"status": "rejected", "rejected_at_stage": 3},
                      lineage={"git_commit": "c0ffee", "params_digest": params.digest(), "data_hash": "d4t4"})


# --------------------------------------------------------------------------- the pure card


def test_card_has_every_section_with_the_protocol_and_geometry_of_params() -> None:
    params = Params()
    card = _card(params, {1: _rows(15, 0), 2: _rows(4, 1)})
    assert [k for k in card if k in CARD_SECTIONS] == list(CARD_SECTIONS)
    assert "NOT FOR DIAGNOSIS" in " ".join(card["intended_use"]["out_of_scope"])
    assert "Synthetic" in card["intended_use"]["inputs"]
    g, d = card["xray_geometry"], params.drr
    assert (g["geometry"], g["pixels"], g["pixel_mm"], g["sdd_mm"], g["sod_mm"]) == (d.geometry, d.pixels, d.pixel_mm,
                                                                                      d.sdd, d.sod)
    assert card["network_data_format"]["inputs"]["frontal"]["spatial_shape"] == [d.pixels, d.pixels]
    hmap = params.hu.net_map()
    assert card["hu_output_map"]["hu_knots"] == list(hmap.hu) and card["hu_output_map"]["name"] == hmap.name
    p, w = card["evaluation_protocol"], params.hu.get_window()
    assert (p["window"]["lo_hu"], p["window"]["hi_hu"], p["window"]["data_range"]) == (w.lo, w.hi, 2.0)
    assert p["hu_range"] == [params.eval.hu_lo, params.eval.hu_hi]
    assert p["hu_data_range"] == params.eval.hu_hi - params.eval.hu_lo
    for k in (1, 2, 3):
        st = params.stage(k)
        assert p["ssim"]["taps"][st.name] == ssim_taps(st.size, params.eval.ssim_win)
    desc = EvalProtocol.from_params(params).describe(params.stage(1).size)
    assert p["definitions"]["stage1"]["psnr_hu_db"] == desc["psnr_hu_db"]  # the evaluate step's words
    assert card["lineage"]["git_commit"] == "c0ffee" and card["lineage"]["params_digest"] == params.digest()
    assert card["gates"][0]["passed"] and card["gates"][2]["summary"] == "no gate report"

    md = render_markdown(card)
    for heading in ("## Intended use and limits", "## Inputs the model expects (X-ray geometry)", "## Training data",
                    "## Evaluation protocol", "## Metrics (test split)", "## Gates", "## Lineage", "HU output map"):
        assert heading in md, heading
    # the slice averages sit under the protocol's own label (X2CT-style), not among the 3D metrics
    label = desc["psnr_slice_avg_db / ssim_slice_avg"]
    assert "X2CT-style" in label and f"{label}:" in md
    assert md.index("`psnr_slice_avg_db`") > md.index(f"{label}:") > md.index("`psnr_window_db`")
    assert f"{d.pixels} × {d.pixels}" in md and "c0ffee" in md and params.digest() in md
    assert render_markdown(json.loads(json.dumps(card))) == md  # re-renders from the stored JSON


def test_bootstrap_interval_is_over_the_per_patient_rows() -> None:
    params = Params()
    rows = _rows(15, 7)
    card = _card(params, {1: rows})
    vals = card["metrics"]["stages"][0]["values"]
    for key in ("psnr_window_db", "ssim_window", "baseline_psnr_window_db", "psnr_slice_avg_db"):
        x = np.array([r[key] for r in rows])
        ref = stats.bootstrap((x,), np.mean, confidence_level=0.95, n_resamples=BOOTSTRAP.n_resamples,
                              method=BOOTSTRAP.method, rng=np.random.default_rng(BOOTSTRAP.seed))
        got = vals[key]
        assert got["n"] == 15 and got["mean"] == pytest.approx(x.mean(), abs=1e-12)
        lo, hi = got["interval"]
        assert lo == pytest.approx(ref.confidence_interval.low, rel=1e-12)
        assert hi == pytest.approx(ref.confidence_interval.high, rel=1e-12)
        assert lo < got["mean"] < hi
    # computed from the rows, not from the stored mean: other rows, other interval
    other = _card(params, {1: _rows(15, 8)})["metrics"]["stages"][0]["values"]["psnr_window_db"]["interval"]
    assert other != vals["psnr_window_db"]["interval"]
    iv = card["metrics"]["interval"]
    assert (iv["method"], iv["n_resamples"], iv["seed"], iv["confidence_level"]) == (
        BOOTSTRAP.method, BOOTSTRAP.n_resamples, BOOTSTRAP.seed, 0.95)
    assert f"method {BOOTSTRAP.method}, n_resamples {BOOTSTRAP.n_resamples}" in render_markdown(card)


def test_fewer_than_five_patients_give_no_interval() -> None:
    card = _card(Params(), {1: _rows(4, 3)})
    v = card["metrics"]["stages"][0]["values"]["psnr_window_db"]
    assert v["interval"] is None and v["n"] == 4 and v["note"].startswith("n < 5: no interval")
    assert v["mean"] == pytest.approx(np.mean([r["psnr_window_db"] for r in _rows(4, 3)]))
    md = render_markdown(card)
    assert "n < 5: no interval (n = 4)" in md
    assert bootstrap_interval([1.0, 2.0, float("nan"), 3.0, 4.0, 5.0])["n"] == 5  # NaN rows dropped, 5 left
    assert bootstrap_interval([2.0] * 6)["interval"] == [2.0, 2.0]  # degenerate: no warning, no NaN


def test_card_states_the_test_coverage_and_spread_skill_of_the_val_fitted_calibration() -> None:
    params = Params()
    rows = [{**r, "spread_skill": 0.7 + 0.01 * i, "spread_skill_recal": 1.0 + 0.01 * i,
             "conformal_coverage": 0.9 + 0.001 * i, "spearman_std_abs_err": 0.4}
            for i, r in enumerate(_rows(6, 1))]
    prot = EvalProtocol.from_params(params)
    m = {**_metrics(1, rows, prot, params.stage(1).size),
         "calibration": {"level": 0.9, "sigma_scale": 1.43, "q": 2.5, "fitted_on": {"split": "val", "n_patients": 14}}}
    card = build_card(params=params, protocol=prot, stages=[StageInputs(1, m, rows, None)],
                      status={"status": "rejected", "rejected_at_stage": 1},
                      lineage={"git_commit": "c0ffee", "params_digest": params.digest(), "data_hash": "d4t4"})
    u = card["metrics"]["stages"][0]["uncertainty"]
    assert u["conformal_coverage"] == pytest.approx(np.mean([r["conformal_coverage"] for r in rows]))
    md = render_markdown(card)
    want = (f"spread-skill {np.mean([r['spread_skill'] for r in rows]):.3f} raw (1 = calibrated), "
            f"{np.mean([r['spread_skill_recal'] for r in rows]):.3f} with the std × s = 1.430; the 90 % split-conformal "
            f"interval (q = 2.500, fitted on 14 val patients) covers "
            f"{np.mean([r['conformal_coverage'] for r in rows]):.3f} of the voxels")
    assert want in md
    # without a calibration the card says the std is raw
    m2 = {k: v for k, v in m.items() if k not in ("calibration", "conformal_coverage", "spread_skill_recal")}
    card2 = build_card(params=params, protocol=prot, stages=[StageInputs(1, m2, None, None)],
                       status={"status": "rejected", "rejected_at_stage": 1}, lineage={"git_commit": "c0ffee"})
    assert "no calibration fitted" in render_markdown(card2)


def test_stage_two_shows_the_previous_stage_upsampled_and_the_paired_gain() -> None:
    """Stage 2's table gets the "previous stage upsampled" column (its bootstrap interval over
    the rows) and the gain over it, whose interval is the bootstrap of the per-patient
    differences (paired), computed here with a direct scipy call; stage 1 has neither."""
    params = Params()
    rows2 = []
    for i, r in enumerate(_rows(12, 5)):
        up = r["psnr_window_db"] - 1.0 + 0.3 * math.sin(i)  # stage 2 beats its input by ~1 dB, patient by patient
        rows2.append({**r, "upsampled_psnr_window_db": up, "gain_over_upsampled_db": r["psnr_window_db"] - up})
    card = _card(params, {1: _rows(12, 4), 2: rows2})
    v1, v2 = (card["metrics"]["stages"][i]["values"] for i in (0, 1))
    assert not any("upsampled" in k for k in v1)
    diffs = np.array([r["psnr_window_db"] - r["upsampled_psnr_window_db"] for r in rows2])
    ref = stats.bootstrap((diffs,), np.mean, confidence_level=0.95, n_resamples=BOOTSTRAP.n_resamples,
                          method=BOOTSTRAP.method, rng=np.random.default_rng(BOOTSTRAP.seed))
    g = v2["gain_over_upsampled_db"]
    assert g["mean"] == pytest.approx(diffs.mean(), abs=1e-12)
    assert g["interval"] == pytest.approx([ref.confidence_interval.low, ref.confidence_interval.high], rel=1e-12)
    assert v2["upsampled_psnr_window_db"]["n"] == 12 and v2["upsampled_psnr_window_db"]["interval"] is not None
    md = render_markdown(card)
    s1, s2 = md.split("### Stage 2")[0].split("### Stage 1")[1], md.split("### Stage 2")[1].split("###")[0]
    assert "previous stage upsampled" not in s1 and "Gain over its own input" not in s1
    header = next(line for line in s2.splitlines() if line.startswith("| metric |"))
    assert header.rstrip(" |").endswith("previous stage upsampled")
    lo, hi = g["interval"]
    assert "Gain over its own input (stage 1's point estimate upsampled" in s2
    assert f"{g['mean']:.4f} [{lo:.4f}, {hi:.4f}] dB" in s2


def test_rows_csv_round_trip(tmp_path: Path) -> None:
    rows = _rows(3, 0)
    rows[1]["mae_hu"] = float("nan")
    (tmp_path / "p.csv").write_text(rows_csv(rows))
    back = read_rows_csv(tmp_path / "p.csv")
    assert [r["id"] for r in back] == [r["id"] for r in rows] and math.isnan(back[1]["mae_hu"])
    assert back[0]["psnr_window_db"] == pytest.approx(rows[0]["psnr_window_db"])
    (tmp_path / "s.csv").write_text("skipped,reason\ntrue,gate 1 failed\n")
    assert read_rows_csv(tmp_path / "s.csv") is None


# --------------------------------------------------------------------------- MLflow + CLI


@pytest.fixture(scope="module")
def card_env(tmp_path_factory: pytest.TempPathFactory) -> Any:
    from test_register import registry_env

    yield from registry_env(tmp_path_factory.mktemp("card"))


def _pipeline_run(env: dict[str, Any], name: str, n_patients: int, passing2: bool) -> tuple[dict[str, Any], Path]:
    """Evaluate-step outputs (metrics.json + per_patient.csv, TEST-chosen rows) judged by the real
    gate step (test thresholds 10 dB / SSIM 0.1), then the real register step."""
    from components.gate import run_gate
    from components.register import run_register

    params = env["params"]
    data = params.model_dump(mode="json")
    for k in (1, 2):
        data["gates"][f"stage{k}"] = {"psnr_window_db": 10.0, "ssim_window": 0.1, "max_nan": 0, "min_std_ratio": 0.25}
    gp = Params.model_validate(data)
    run = env["root"] / name
    export_tiny_stages(run / "train", params, seed=len(name))
    prot = EvalProtocol.from_params(params)
    for k in (1, 2):
        rows = _rows(n_patients, 10 * k, psnr=24.0 if (k == 1 or passing2) else 5.0)
        ed = run / "reports" / "eval" / f"stage{k}"
        ed.mkdir(parents=True)
        (ed / "metrics.json").write_text(json.dumps(_metrics(k, rows, prot, params.stage(k).size)))
        (ed / "per_patient.csv").write_text(rows_csv(rows))
        run_gate(k, ed / "metrics.json", run / "reports" / "gates" / f"stage{k}.json", gp)
    reports = run / "reports"
    s = run_register(reports / "gates", reports / "eval", run / "train", reports / "summary.json", params,
                     processed_dir=env["processed"], tracking_uri=env["uri"])
    return s, reports


def test_registered_version_carries_its_card_and_models_show_prints_it(card_env: dict[str, Any], capsys) -> None:
    from mlflow import MlflowClient

    s, reports = _pipeline_run(card_env, "reg", n_patients=6, passing2=True)
    assert s["status"] == "promoted" and s["model_version"] == "1"
    c = MlflowClient(card_env["uri"])
    mv = c.get_model_version(NAME, "1")
    assert mv.tags["xct.model_card"] == f"runs:/{mv.tags['xct.run_id']}/model_card"
    arts = {a.path for a in c.list_artifacts(mv.tags["xct.run_id"], "model_card")}
    assert arts == {"model_card/model_card.json", "model_card/model_card.md"}

    local = json.loads((reports / "model_card.json").read_text())
    assert local["model"]["version"] == "1" and local["model"]["status"] == "promoted"
    assert local["lineage"]["content_hash"] == mv.tags["xct.content_hash"]
    assert local["training_data"]["data_hash"] == mv.tags["xct.data_hash"]
    splits = local["training_data"]["splits"]
    assert splits["train"]["volumes"] == 1 and splits["test"]["volumes"] == 1
    st1 = local["metrics"]["stages"][0]["values"]["psnr_window_db"]
    x = np.array([r["psnr_window_db"] for r in _rows(6, 10)])
    ref = stats.bootstrap((x,), np.mean, n_resamples=BOOTSTRAP.n_resamples, method=BOOTSTRAP.method,
                          rng=np.random.default_rng(BOOTSTRAP.seed)).confidence_interval
    assert st1["interval"] == pytest.approx([ref.low, ref.high], rel=1e-9)  # from the CSV rows, through the step

    pf = str(card_env["params_file"])
    capsys.readouterr()
    assert xct(["models", "show", "1", "--params", pf]) == 0
    out = capsys.readouterr().out
    assert out == (reports / "model_card.md").read_text()
    assert out.startswith(f"# Model card: {NAME} v1") and "## Gates" in out
    assert xct(["models", "show", "1", "--json", "--params", pf]) == 0
    assert json.loads(capsys.readouterr().out) == local

    assert xct(["models", "show", "99", "--params", pf]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("xct: error:") and "no version '99'" in err


def test_rejected_run_writes_its_card_beside_the_reports(card_env: dict[str, Any], capsys) -> None:
    s, reports = _pipeline_run(card_env, "rej", n_patients=3, passing2=False)
    assert s["status"] == "rejected" and s["rejected_at_stage"] == 2
    card = json.loads((reports / "model_card.json").read_text())
    assert card["model"]["status"] == "rejected" and card["model"]["version"] is None
    assert card["model"]["rejected_at_stage"] == 2 and not card["gates"][1]["passed"]
    assert card["metrics"]["stages"][0]["values"]["psnr_window_db"]["interval"] is None  # 3 patients
    assert s["reports"]["model_card"] == str(reports / "model_card.md")
    capsys.readouterr()
    assert xct(["models", "show", "--reports", str(reports)]) == 0
    out = capsys.readouterr().out
    assert out == (reports / "model_card.md").read_text() and "rejected at stage 2" in out
    assert "n < 5: no interval (n = 3)" in out


def test_models_show_without_a_registry_fails_cleanly_and_creates_nothing(tmp_path: Path, monkeypatch,
                                                                          capsys) -> None:
    db = tmp_path / "none" / "mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{db}")
    assert xct(["models", "show", "1"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "no model registry" in err
    assert not db.exists() and not db.parent.exists()
    assert xct(["models", "show", "--reports", str(tmp_path / "nothing")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "model card not found" in err
