"""Gates: thresholds from params, strict checks, clear reasons, missing metrics fail."""

from __future__ import annotations

import math

import pytest

from xct_core.config import StageGate, load_params
from xct_core.gates import evaluate_gate

GOOD = {"psnr_window_db": 30.0, "ssim_window": 0.7, "nan_count": 0, "std": 0.4, "target_std": 0.5}


def test_default_thresholds_are_the_product_gates(repo_root) -> None:
    g = load_params(repo_root / "params.yaml").gates
    assert [(g.for_stage(k).psnr_window_db, g.for_stage(k).ssim_window) for k in (1, 2, 3)] == [
        (28.0, 0.65), (32.0, 0.75), (35.0, 0.80)
    ]


def test_pass_and_margins() -> None:
    rep = evaluate_gate(1, GOOD, StageGate(psnr_window_db=28, ssim_window=0.65))
    assert rep.passed and not rep.failed
    by = {c.name: c for c in rep.checks}
    assert by["psnr_window"].margin == pytest.approx(2.0)
    assert by["not_collapsed"].value == pytest.approx(0.8)


def test_threshold_is_strict() -> None:
    rep = evaluate_gate(1, {**GOOD, "psnr_window_db": 28.0}, StageGate(psnr_window_db=28, ssim_window=0.65))
    assert not rep.passed and [c.name for c in rep.failed] == ["psnr_window"]
    assert "psnr_window: 28 (needs > 28" in rep.summary()


@pytest.mark.parametrize(
    "change, failing",
    [
        ({"ssim_window": 0.5}, "ssim_window"),
        ({"nan_count": 3}, "no_nan"),
        ({"std": 0.01}, "not_collapsed"),  # a mean-volume predictor
        ({"psnr_window_db": math.nan}, "psnr_window"),
        ({"ssim_window": None}, "ssim_window"),
    ],
)
def test_each_check_can_fail(change: dict, failing: str) -> None:
    metrics = {**GOOD, **change}
    rep = evaluate_gate(2, metrics, StageGate(psnr_window_db=20, ssim_window=0.6))
    assert not rep.passed
    assert [c.name for c in rep.failed] == [failing]
    d = rep.to_dict()
    assert d["passed"] is False and failing in d["summary"]


def test_missing_target_std_fails_collapse_check() -> None:
    metrics = dict(GOOD)
    del metrics["target_std"]
    rep = evaluate_gate(1, metrics, StageGate(psnr_window_db=20, ssim_window=0.5))
    assert [c.name for c in rep.failed] == ["not_collapsed"]
