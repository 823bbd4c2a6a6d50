"""Evaluate and gate steps on a tiny two-stage cascade (16³ → 32³, 16-pixel DRRs).

The stage models are untrained (random weights, exported with the real exporter): these
tests check the plumbing and the numbers that have known answers (the mean-volume baseline,
determinism, gate decisions against thresholds set HERE for the test), not image quality.
"""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import yaml

from cli_run import xct
from components.evaluate import run_evaluate
from components.gate import run_gate
from train_fixtures import tiny_params
from xct_core.checkpoint import export_stage_model
from xct_core.config import Params, load_params
from xct_core.errors import InputError
from xct_core.evaluation import evaluate_stage, mean_volume_baseline, split_ids_hash
from xct_core.io import save_nifti
from xct_core.models import build_stage
from xct_core.phantoms import make_phantom
from xct_core.preprocess import stage_file


def make_tiny_params(**eval_overrides: Any) -> Params:
    """Tiny cascade, 1 DDIM step at evaluation (speed), seed 0."""
    return tiny_params(eval={"sample_steps": 1, **eval_overrides})


def export_tiny_stages(train_dir: Path, params: Params, seed: int = 0, direct: bool = False) -> list[Path]:
    """Random-weight stage models in the training layout ``models/stage{k}/best.pt``."""
    out = []
    for k in range(1, len(params.stages) + 1):
        torch.manual_seed(1000 * seed + k)
        p = train_dir / "models" / f"stage{k}" / "best.pt"
        export_stage_model(p, build_stage(params, k), params_json=params.model_dump_json(), stage=k,
                           name=f"stage{k}", mode="diffusion", step=1)
        out.append(p)
    if direct:
        k = len(params.stages)
        torch.manual_seed(1000 * seed + 99)
        export_stage_model(train_dir / "models" / f"stage{k}" / "direct.pt", build_stage(params, k, mode="direct"),
                           params_json=params.model_dump_json(), stage=k, name=f"stage{k}", mode="direct", step=1)
    return out


def build_tiny_processed(root: Path, params: Params, n_train: int = 3, n_test: int = 1, n_val: int = 0) -> Path:
    """Phantoms → NIfTI → the real preprocess step, with a TEST split (and ``n_val`` val volumes after it)."""
    from components.preprocess import run_preprocess

    stages = list(params.stages.values())
    size = stages[-1].size
    vols = root / "volumes"
    vols.mkdir(parents=True, exist_ok=True)
    ids = [f"ph{i:02d}" for i in range(n_train + n_test + n_val)]
    for i, vid in enumerate(ids):
        hu, _, affine = make_phantom(size, stages[-1].fov_mm / size, i)
        save_nifti(vols / f"{vid}.nii.gz", hu, affine)
    (root / "splits.json").write_text(json.dumps({"train": ids[:n_train], "val": ids[n_train + n_test:],
                                                  "test": ids[n_train:n_train + n_test]}))
    out = root / "processed"
    run_preprocess(vols, root / "splits.json", out, params, workers=1, progress=False)
    return out


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("eval")
    params = make_tiny_params()
    processed = build_tiny_processed(root, params)
    train_dir = root / "train"
    export_tiny_stages(train_dir, params, direct=True)
    params_file = root / "params.yaml"
    params_file.write_text(yaml.safe_dump(params.model_dump(mode="json")))
    return {"root": root, "params": params, "processed": processed, "train": train_dir, "params_file": params_file}


def test_evaluate_cli_writes_metrics_per_patient_and_montage(tiny_run: dict[str, Any], capsys) -> None:
    out = tiny_run["root"] / "reports" / "eval" / "stage2"
    rc = xct(["step", "evaluate", "--stage", "2", "--processed", str(tiny_run["processed"]), "--train-dir",
                        str(tiny_run["train"]), "--out", str(out), "--params", str(tiny_run["params_file"])])
    assert rc == 0
    m = json.loads((out / "metrics.json").read_text())
    for key in ("psnr_window_db", "ssim_window", "psnr_hu_db", "mae_hu", "std", "target_std", "nan_count",
                "baseline_psnr_window_db", "baseline_ssim_window", "direct_psnr_window_db",
                "upsampled_psnr_window_db", "upsampled_ssim_window", "upsampled_reproj_psnr_frontal_db",
                "gain_over_upsampled_db", "reproj_psnr_frontal_db"):
        assert isinstance(m[key], (int, float)) and math.isfinite(m[key]), key
    assert m["n_patients"] == 1 and m["stage"] == 2 and m["sample_steps"] == 1 and m["has_direct"] is True
    assert m["test_ids_hash"] == split_ids_hash(["ph03"])
    assert m["target_std"] > 0.05  # a phantom has structure in the soft-tissue window
    with open(out / "per_patient.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["id"] for r in rows] == ["ph03"]
    assert float(rows[0]["psnr_window_db"]) == pytest.approx(m["psnr_window_db"])
    assert (out / "montage.png").stat().st_size > 1000
    # stage 2 beside its own input: stage 1's point estimate upsampled, and the gain over it
    assert m["has_upsampled"] is True
    assert m["gain_over_upsampled_db"] == pytest.approx(m["psnr_window_db"] - m["upsampled_psnr_window_db"])
    assert float(rows[0]["gain_over_upsampled_db"]) == pytest.approx(m["gain_over_upsampled_db"])
    said = capsys.readouterr()
    assert f"previous stage upsampled {m['upsampled_psnr_window_db']:.2f} dB" in said.out + said.err


def test_evaluate_step_fits_calibration_on_val_and_checks_it_on_test(tmp_path: Path) -> None:
    """K = 2 with a val split: calibration.json (fitted on the VAL ids) + calibration.png are
    written, metrics.json carries the same calibration, and the test metrics apply it:
    spread_skill_recal = s · spread_skill exactly (the ratio is linear in the std)."""
    from xct_core.calibration import read_calibration

    params = make_tiny_params(samples=2)
    processed = build_tiny_processed(tmp_path, params, n_train=2, n_test=1, n_val=1)
    train = tmp_path / "train"
    export_tiny_stages(train, params)
    out = tmp_path / "eval"
    m = run_evaluate(1, processed, train, out, params)
    cal = read_calibration(out / "calibration.json")
    assert cal.fitted_on["split"] == "val" and cal.fitted_on["ids_hash"] == split_ids_hash(["ph03"])
    assert cal.stage == 1 and cal.samples == 2 and cal.level == 0.9 and cal.q > 0
    assert m["calibration"] == json.loads((out / "calibration.json").read_text())
    assert m["spread_skill_recal"] == pytest.approx(cal.sigma_scale * m["spread_skill"], rel=1e-9)
    assert 0.0 <= m["conformal_coverage"] <= 1.0 and 0.0 <= m["coverage_minmax"] <= 1.0
    assert sum(m["calibration_curve"]["rank_histogram"]) == pytest.approx(1.0)
    assert len(m["calibration_curve"]["rank_histogram"]) == 3  # K + 1 bins
    assert (out / "calibration.png").stat().st_size > 1000
    # without a val split (or with fit: false) no calibration is fitted, the raw metrics stay
    p2 = params.model_copy(update={"eval": params.eval.model_copy(
        update={"calibration": params.eval.calibration.model_copy(update={"fit": False})})})
    m2 = run_evaluate(1, processed, train, tmp_path / "eval2", p2)
    assert "conformal_coverage" not in m2 and "spread_skill" in m2
    assert m["has_upsampled"] is False and not [k for k in (*m, *m2) if "upsampled" in k and k != "has_upsampled"]
    assert not (tmp_path / "eval2" / "calibration.json").exists()


def test_mean_volume_baseline_matches_an_independent_computation(tiny_run: dict[str, Any]) -> None:
    """Known answer: the baseline is the voxel mean of the TRAIN volumes; its window PSNR on
    the test volume is 10·log10(2² / MSE) of the clipped windowed volumes."""
    params, processed = tiny_run["params"], tiny_run["processed"]
    base = mean_volume_baseline(processed, 1, "train")
    train = [np.load(processed / stage_file(1, f"ph{i:02d}")).astype(np.float64) for i in range(3)]
    np.testing.assert_allclose(base, np.mean(train, axis=0), atol=1e-3)

    res = evaluate_stage(params, processed, tiny_run["train"], 1, reprojection=False)
    w = params.hu.get_window()
    target = np.clip(w.forward(np.load(processed / stage_file(1, "ph03")).astype(np.float32)), -1, 1)
    pred = np.clip(w.forward(base), -1, 1)
    mse = float(np.mean((pred.astype(np.float64) - target) ** 2))
    assert res.metrics["baseline_psnr_window_db"] == pytest.approx(10 * math.log10(4.0 / mse), abs=1e-4)
    assert res.metrics["target_std"] == pytest.approx(float(np.std(target)), rel=1e-4)
    assert "direct_psnr_window_db" not in res.metrics  # no stage1/direct.pt
    # fixed seed: a second run gives the same sample, hence the same numbers
    again = evaluate_stage(params, processed, tiny_run["train"], 1, reprojection=False)
    assert again.metrics["psnr_window_db"] == res.metrics["psnr_window_db"]


def test_evaluate_missing_model_is_a_one_line_error(tiny_run: dict[str, Any], tmp_path: Path, capsys) -> None:
    with pytest.raises(InputError, match="stage model not found"):
        run_evaluate(1, tiny_run["processed"], tmp_path / "nothing", tmp_path / "out", tiny_run["params"])
    rc = xct(["step", "evaluate", "--stage", "1", "--processed", str(tiny_run["processed"]), "--train-dir", str(tmp_path),
                        "--out", str(tmp_path / "o"), "--params", str(tiny_run["params_file"])])
    assert rc == 2 and "stage model not found" in capsys.readouterr().err


# ---------------------------------------------------------------------------- gate


def _metrics_file(path: Path, **over: Any) -> Path:
    doc = {"stage": 1, "psnr_window_db": 30.0, "ssim_window": 0.7, "nan_count": 0, "std": 0.4,
           "target_std": 0.5, "test_ids_hash": "abc", **over}
    path.write_text(json.dumps(doc))
    return path


def _params_with_gate(tmp_path: Path, psnr: float, ssim: float) -> Path:
    """Thresholds set by the TEST (not the product thresholds)."""
    # the effective params (params.yaml with its `overlays:` merged), else the defaults
    data = (load_params("params.yaml") if Path("params.yaml").is_file() else Params()).model_dump(mode="json")
    data["gates"]["stage1"] = {"psnr_window_db": psnr, "ssim_window": ssim, "max_nan": 0, "min_std_ratio": 0.25}
    p = tmp_path / f"params_{psnr}_{ssim}.yaml"
    p.write_text(yaml.safe_dump(data))
    return p


def test_gate_pass_and_fail_both_exit_zero_with_full_report(tmp_path: Path, capsys) -> None:
    metrics = _metrics_file(tmp_path / "metrics.json")
    out = tmp_path / "gates" / "stage1.json"
    assert xct(["step", "gate", "--stage", "1", "--metrics", str(metrics), "--out", str(out),
                      "--params", str(_params_with_gate(tmp_path, 29.0, 0.6))]) == 0
    rep = json.loads(out.read_text())
    assert rep["passed"] is True and rep["stage"] == 1
    by = {c["name"]: c for c in rep["checks"]}
    assert by["psnr_window"]["threshold"] == 29.0 and by["psnr_window"]["value"] == 30.0
    assert by["psnr_window"]["margin"] == pytest.approx(1.0) and by["not_collapsed"]["value"] == pytest.approx(0.8)

    assert xct(["step", "gate", "--stage", "1", "--metrics", str(metrics), "--out", str(out),
                      "--params", str(_params_with_gate(tmp_path, 31.5, 0.6))]) == 0
    rep = json.loads(out.read_text())
    assert rep["passed"] is False
    failed = [c for c in rep["checks"] if not c["passed"]]
    assert [c["name"] for c in failed] == ["psnr_window"] and failed[0]["margin"] == pytest.approx(-1.5)
    assert "FAIL" in capsys.readouterr().out


def test_gate_non_finite_metric_fails_and_bad_input_errors(tmp_path: Path, capsys) -> None:
    params = Params()
    rep = run_gate(1, _metrics_file(tmp_path / "m.json", psnr_window_db=None), tmp_path / "g.json", params)
    assert not rep.passed and "psnr_window" in [c.name for c in rep.failed]
    assert json.loads((tmp_path / "g.json").read_text())["checks"][0]["margin"] is None  # NaN → null
    assert xct(["step", "gate", "--stage", "1", "--metrics", str(tmp_path / "missing.json"), "--out", str(tmp_path / "x.json")]) == 2
    assert "metrics file not found" in capsys.readouterr().err
    with pytest.raises(InputError, match="holds stage 1 metrics"):
        run_gate(2, tmp_path / "m.json", tmp_path / "g2.json", params)
