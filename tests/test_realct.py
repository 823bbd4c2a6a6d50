"""The real-CT profile (params.realct.yaml) and the real-data experiment (pipelines/realct.py).

The experiment test runs the whole command on ../shared/data with a TINY overlay (8³/16³/32³
grids, 32-pixel detector, one augmented copy, 2 training steps, 2 DDIM steps) and checks the
split (no test chest in train/val, label map never ingested, augmented copies only in train)
and that `xct evaluate` reported exactly the two test chests with both baselines. It skips
cleanly when the shared data are absent (``shared_data`` fixture).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from pipelines.realct import TEST_FILES, TRAIN_FILES, main, run_experiment
from xct_core.config import load_params
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
