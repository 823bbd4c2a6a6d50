"""The real-CT profile (params.realct.yaml) and the real-data experiment (pipelines/realct.py).

The experiment test runs the whole command on ../shared/data with a TINY overlay (8³/16³/32³
grids, 32-pixel detector, one augmented copy, 2 training steps, 2 DDIM steps) and checks the
split (no test chest in train/val, label map never ingested, augmented copies only in train),
that `xct evaluate` reported exactly the two test chests with both baselines, and that the
cross-fitted calibration step reproduces `xct evaluate`'s raw numbers and fits each chest on
the other one only. It skips cleanly when the shared data are absent (``shared_data``
fixture). The cross-fit folds and the target verdicts are also checked without data.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

import numpy as np

from pipelines.realct import TEST_FILES, TRAIN_FILES, cross_fit_folds, fit_folds, main, run_experiment, \
    target_verdicts
from xct_core.calibration import CaseScores, conformal_quantile, fit_sigma_scale
from xct_core.config import load_params
from xct_core.errors import InputError
from xct_core.preprocess import read_manifest

TEST_IDS = sorted(f.split(".")[0] for f in TEST_FILES)

TINY = """
stages:
  stage1: {size: 8, token_grid: 4, conv_channels: [8], dim: 16, depth: 1, heads: 2, enc_channels: [8, 8], lift_channels: 4}
  stage2: {size: 16, token_grid: 4, conv_channels: [8, 8], dim: 16, depth: 1, heads: 2, enc_channels: [8, 8], lift_channels: 4}
  stage3: {size: 32, token_grid: 4, conv_channels: [8, 8, 8], dim: 16, depth: 1, heads: 2, enc_channels: [8, 8], lift_channels: 4}
drr: {pixels: 32, pixel_mm: 19.2}
preprocess: {antialias: false, augment: {copies: 1}}
train: {steps: {stage1: 2, stage2: 2, stage3: 1}, log_every: 1, ckpt_every: 10}
eval: {sample_steps: 2, ssim_win: 7}   # the 8³ output grid is smaller than the default 11³ SSIM window
"""


def test_profile_validates_and_detector_covers_the_fov(repo_root: Path) -> None:
    p = load_params(repo_root / "params.yaml", [repo_root / "params.realct.yaml"])
    base = load_params(repo_root / "params.yaml")
    mag = p.drr.sdd / p.drr.sod if p.drr.geometry == "cone" else 1.0
    for s in p.stages.values():
        assert p.drr.pixels * p.drr.pixel_mm / mag >= s.fov_mm - 1e-6
    assert [s.size for s in p.stages.values()] == [32, 64, 128]
    assert p.hu.get_window().lo == -1024.0 and p.hu.get_window().hi == 1024.0  # wide: HU metrics meaningful
    assert p.preprocess.augment.copies > 0 and base.preprocess.augment.copies == 0  # on here, off by default
    assert (p.ingest.train_fraction, p.ingest.val_fraction, p.ingest.test_fraction) == (1.0, 0.0, 0.0)
    assert p.validation.policy == "quarantine" and p.validation.min_extent_mm == base.validation.min_extent_mm
    # the gates' thresholds are kept as they are; real CTs have no generator: the ceiling is unknown
    assert {k: g.model_copy(update={"ceiling": base.gates[k].ceiling}) for k, g in p.gates.items()} == base.gates
    assert all(g.ceiling.source == "none" for g in p.gates.values()) and base.gates["stage1"].ceiling.source == "synth"
    assert p.train.direct_baseline and p.eval.model_file == "final"
    assert p.eval.protocol == "honest" and p.preprocess.train_detector  # issue 21: no inverse crime
    assert p.preprocess.augment.flip_lr == 0.0 and p.preprocess.augment.flip_ap == 0.0  # no mirrored anatomy


@pytest.fixture(scope="module")
def tiny_run(shared_data: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    root = tmp_path_factory.mktemp("realct")
    overlay = root / "tiny.yaml"
    overlay.write_text(TINY)
    out = root / "out"
    summary = run_experiment(shared_data, out, overlays=[overlay], stages=1, results=root / "res" / "realct",
                             command="pytest tiny run", log=lambda _m: None)
    return out, summary


def test_split_keeps_test_chests_and_label_map_out(tiny_run: tuple[Path, dict]) -> None:
    out, summary = tiny_run
    assert sorted(p.name for p in (out / "raw").iterdir()) == sorted(TRAIN_FILES)
    stats = json.loads((out / "interim" / "stats.json").read_text())
    ingested = {r["id"] for r in stats["volumes"]}
    assert not any("labels" in v or "LungPETCTDx" in v for v in ingested)  # label map and test set never ingested
    man = read_manifest(out / "processed")
    assert man["splits"]["val"] == [] and man["splits"]["test"] == []
    train = man["splits"]["train"]
    assert not any("LungPETCTDx" in v or "labels" in v for v in train)
    originals = sorted(v for v in train if "augment" not in man["items"][v])
    copies = sorted(v for v in train if "augment" in man["items"][v])
    assert originals == sorted(summary["train_cts"]) and len(originals) == 3  # the 4 cm slab is quarantined
    assert summary["quarantined"] == ["upper-abdomen-slab_totalseg-dicom"]
    assert copies == [f"{v}__aug0" for v in originals]
    assert all(man["items"][v]["split"] == "train" for v in copies)


def test_evaluate_reports_both_test_chests_and_both_baselines(tiny_run: tuple[Path, dict]) -> None:
    out, summary = tiny_run
    ev = json.loads((out / "eval" / "metrics.json").read_text())
    assert sorted(p["id"] for p in ev["patients"]) == TEST_IDS
    for row in ev["patients"]:
        for prefix in ("", "direct_", "baseline_"):
            for key in ("psnr_hu_db", "psnr_window_db", "ssim_window", "mae_hu", "psnr_slice_avg_db"):
                assert math.isfinite(row[prefix + key]), prefix + key
    assert sorted(summary["per_patient"]) == TEST_IDS
    assert set(summary["mean"]) == {"diffusion cascade", "diffusion cascade, one sample",
                                    "diffusion cascade, K-sample mean", "direct regression",
                                    "mean volume (train split)", "previous stage upsampled"}
    md = (out.parent / "res" / "realct.md").read_text()
    assert all(t in md for t in TEST_IDS) and "supports no clinical claim" in md
    assert json.loads((out.parent / "res" / "realct.json").read_text())["test_cts"] == TEST_IDS


def test_missing_data_folder_is_one_line_error(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    rc = main(["--data", str(tmp_path / "absent"), "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1
    assert err.startswith("realct: error:") and "real CT data folder not found" in err
    assert not (tmp_path / "out").exists()


def _scores(scale: float, n: int, seed: int) -> CaseScores:
    rng = np.random.default_rng(seed)
    s = np.abs(rng.normal(0.0, scale, n))
    return CaseScores(scores=s, sum_var=float(n), sum_sq_err=float(n) * scale**2, ranks=np.zeros(n, dtype=np.int64))


def test_cross_fit_never_fits_a_chest_on_itself(repo_root: Path) -> None:
    assert cross_fit_folds(["a", "b", "c"]) == [("a", ["b", "c"]), ("b", ["a", "c"]), ("c", ["a", "b"])]
    for bad in (["a"], [], ["a", "a"]):
        with pytest.raises(InputError, match="needs >= 2 distinct"):
            cross_fit_folds(bad)
    params = load_params(repo_root / "params.yaml", [repo_root / "params.realct.yaml"])
    level = params.eval.calibration.level
    scores = {"a": _scores(1.0, 4000, 0), "b": _scores(3.0, 4000, 1), "c": _scores(10.0, 4000, 2)}
    fits = fit_folds(scores, params, stage=1, samples=8, point_estimate="anchor")
    for held, others in cross_fit_folds(list(scores)):
        fit = fits[held]
        assert fit.fitted_on["ids"] == others and held not in fit.fitted_on["ids"] and fit.fitted_on["held_out"] == held
        pooled = np.concatenate([scores[j].scores for j in others])
        assert fit.q == pytest.approx(conformal_quantile(pooled, level))
        assert fit.sigma_scale == pytest.approx(fit_sigma_scale(sum(scores[j].sum_var for j in others),
                                                                sum(scores[j].sum_sq_err for j in others), 8))
        assert fit.fitted_on["n_voxels"] == pooled.size
    # the held-out chest's own data never move its fit: scale a's scores 100x, a's fit is unchanged
    moved = fit_folds({**scores, "a": _scores(100.0, 4000, 0)}, params, stage=1, samples=8, point_estimate="anchor")
    assert moved["a"].q == fits["a"].q and moved["a"].sigma_scale == fits["a"].sigma_scale
    assert moved["b"].q > fits["b"].q  # ... while it does move the others'


def test_target_verdicts_state_met_or_the_miss() -> None:
    v = target_verdicts({"spread_skill": 0.5, "spread_skill_recal": 1.0, "conformal_coverage": 0.95,
                         "spearman_std_abs_err": 0.25, "single_psd_top_band_ratio": float("nan"), "other": 3.0})
    assert set(v) == {"spread_skill", "spread_skill_recal", "conformal_coverage", "spearman_std_abs_err"}
    assert not v["spread_skill"]["met"] and v["spread_skill"]["miss"] == pytest.approx(0.3)
    assert v["spread_skill_recal"]["met"] and v["spread_skill_recal"]["miss"] == 0.0
    assert not v["conformal_coverage"]["met"] and v["conformal_coverage"]["miss"] == pytest.approx(0.02)
    assert v["spearman_std_abs_err"]["miss"] == pytest.approx(0.05) and v["spearman_std_abs_err"]["target"] == [0.3, None]
    assert target_verdicts({"spearman_std_abs_err": 0.9})["spearman_std_abs_err"]["met"]


def test_calibration_is_cross_fitted_and_reproduces_evaluate(tiny_run: tuple[Path, dict]) -> None:
    out, summary = tiny_run
    c = summary["calibration"]
    assert list(c["protocols"]) == ["honest", "clean"] and c["samples"] == 8
    ev = {row["id"]: row for row in json.loads((out / "eval" / "metrics.json").read_text())["patients"]}
    for name, pr in c["protocols"].items():
        assert sorted(pr["per_chest"]) == TEST_IDS
        for pid, row in pr["per_chest"].items():
            assert row["fit"]["ids"] == [t for t in TEST_IDS if t != pid]  # fitted on the OTHER chest only
            assert 0.0 <= row["conformal_coverage"] <= 1.0 and row["spread_skill"] > 0
            # the recalibrated ratio is the raw one times the other chest's s (spread-skill is linear in s)
            assert row["spread_skill_recal"] == pytest.approx(row["spread_skill"] * row["fit"]["sigma_scale"], rel=1e-9)
            if name == "honest":  # same model, views and seeds as `xct evaluate`: its raw numbers
                for key in ("spread_skill", "spearman_std_abs_err", "psnr_window_db", "single_psd_top_band_ratio"):
                    assert row[key] == pytest.approx(ev[pid][key], rel=1e-9), key
        assert pr["mean"]["conformal_coverage"] == pytest.approx(
            np.mean([r["conformal_coverage"] for r in pr["per_chest"].values()]))
    # the clean views are other views: the same model's numbers differ
    assert c["protocols"]["clean"]["per_chest"][TEST_IDS[0]]["psnr_window_db"] != \
        c["protocols"]["honest"]["per_chest"][TEST_IDS[0]]["psnr_window_db"]
    cascade = summary["mean"]["diffusion cascade"]
    assert cascade["conformal_coverage"] == c["protocols"]["honest"]["mean"]["conformal_coverage"]
    assert set(summary["target_verdicts"]["honest"]["mean"]) >= {"spread_skill", "conformal_coverage"}
    md = (out.parent / "res" / "realct.md").read_text()
    assert "cross-fitted over the held-out test chests" in md and "clean (inverse-crime)" in md
    assert "missed by" in md or "**met**" in md
    assert len(summary["invocations"]) == 1 and summary["invocations"][0]["wall_s"]["calibrate"] >= 0
