"""Gates: thresholds from params, strict checks, clear reasons, missing metrics fail."""

from __future__ import annotations

import math

import pytest

from xct_core.config import StageGate, load_params
from xct_core.gates import evaluate_gate

GOOD = {"psnr_window_db": 30.0, "ssim_window": 0.7, "nan_count": 0, "std": 0.4, "target_std": 0.5}


def test_default_thresholds_are_the_product_gates(repo_root) -> None:
    g = load_params(repo_root / "params.yaml").gates
    assert [(g[f"stage{k}"].psnr_window_db, g[f"stage{k}"].ssim_window) for k in (1, 2, 3)] == [
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


# --------------------------------------------------------------------------- relative to baselines

from xct_core.config import RelativeGate  # noqa: E402
from xct_core.errors import ConfigError  # noqa: E402
from xct_core.gates import Champion  # noqa: E402

REL = {**GOOD, "baseline_psnr_window_db": 20.0, "direct_psnr_window_db": 30.5, "test_ids_hash": "abc",
       "mae_hu": 40.0, "baseline_mae_hu": 90.0}


def _rel(*checks: dict, champion: Champion | None = None, metrics: dict | None = None):
    gate = StageGate(psnr_window_db=20, ssim_window=0.5, relative=[RelativeGate(**c) for c in checks])
    rep = evaluate_gate(1, metrics or REL, gate, champion)
    return rep, {c.name: c for c in rep.checks}


def test_relative_to_the_mean_volume_absolute_and_relative_margins() -> None:
    rep, by = _rel({"baseline": "mean_volume", "min_absolute_change": 9.0})
    c = by["psnr_window_vs_mean_volume"]
    assert rep.passed and c.baseline_value == 20.0 and c.threshold == pytest.approx(29.0) and c.margin == pytest.approx(1.0)
    rep, by = _rel({"baseline": "mean_volume", "min_absolute_change": 11.0})
    assert not rep.passed and by["psnr_window_vs_mean_volume"].margin == pytest.approx(-1.0)
    # relative: +50 % of 20 dB = 30 dB needed; 30.0 passes exactly (>=), +51 % does not
    assert _rel({"baseline": "mean_volume", "min_relative_change": 0.5})[0].passed
    rep, by = _rel({"baseline": "mean_volume", "min_relative_change": 0.51})
    assert not rep.passed and by["psnr_window_vs_mean_volume"].threshold == pytest.approx(30.2)
    # both: the stricter one decides
    rep, by = _rel({"baseline": "mean_volume", "min_absolute_change": 5.0, "min_relative_change": 0.6})
    assert not rep.passed and by["psnr_window_vs_mean_volume"].threshold == pytest.approx(32.0)


def test_relative_to_the_twin_and_lower_is_better() -> None:
    rep, by = _rel({"baseline": "direct_twin", "min_absolute_change": 0.0})
    assert not rep.passed and by["psnr_window_vs_direct_twin"].margin == pytest.approx(-0.5)
    assert "psnr_window_vs_direct_twin" in rep.summary()
    assert _rel({"baseline": "direct_twin", "min_absolute_change": -0.5})[0].passed  # "within 0.5 dB of the twin"
    # MAE: lower is better; 40 vs 90 HU is a 50 HU improvement
    rep, by = _rel({"metric": "mae_hu", "baseline": "mean_volume", "min_absolute_change": 45.0, "greater_is_better": False})
    c = by["mae_hu_vs_mean_volume"]
    assert rep.passed and c.op == "<=" and c.threshold == pytest.approx(45.0) and c.margin == pytest.approx(5.0)
    assert not _rel({"metric": "mae_hu", "baseline": "mean_volume", "min_absolute_change": 55.0,
                     "greater_is_better": False})[0].passed


def test_a_missing_baseline_fails_and_says_why() -> None:
    metrics = {k: v for k, v in REL.items() if not k.startswith("direct_")}
    rep, by = _rel({"baseline": "direct_twin", "min_absolute_change": -1.0}, metrics=metrics)
    assert not rep.passed and "direct_psnr_window_db" in by["psnr_window_vs_direct_twin"].note


def test_champion_same_split_other_split_and_none() -> None:
    check = {"baseline": "champion", "min_absolute_change": 0.1}
    better = Champion("3", "abc", {"psnr_window_db": 29.95})
    rep, by = _rel(check, champion=better)
    assert not rep.passed and by["psnr_window_vs_champion"].baseline_value == pytest.approx(29.95)
    assert "champion v3" in rep.summary()
    assert _rel(check, champion=Champion("3", "abc", {"psnr_window_db": 29.0}))[0].passed
    rep, by = _rel(check, champion=Champion("3", "other", {"psnr_window_db": 99.0}))
    assert rep.passed and "not comparable" in by["psnr_window_vs_champion"].note
    rep, by = _rel(check, champion=None)
    assert rep.passed and "no champion yet" in by["psnr_window_vs_champion"].note
    d = rep.to_dict()
    assert d["checks"][-1]["baseline"] == "champion" and d["checks"][-1]["min_absolute_change"] == 0.1


def test_relative_gate_needs_a_margin_and_a_known_baseline() -> None:
    from xct_core.config import params_from_dict

    with pytest.raises(ConfigError, match="min_absolute_change"):
        params_from_dict({"gates": {"stage1": {"psnr_window_db": 28, "ssim_window": 0.65,
                                               "relative": [{"baseline": "mean_volume"}]}}})
    with pytest.raises(ConfigError, match="baseline"):
        params_from_dict({"gates": {"stage1": {"psnr_window_db": 28, "ssim_window": 0.65,
                                               "relative": [{"baseline": "prior_art", "min_absolute_change": 1}]}}})


def test_default_gates_require_the_mean_volume_margin_and_the_champion(repo_root) -> None:
    p = load_params(repo_root / "params.yaml")
    for st in p.stage_list():
        kinds = {(r.baseline, r.metric) for r in st.gate.relative}
        assert kinds == {("mean_volume", "psnr_window_db"), ("direct_twin", "psnr_window_db"),
                         ("champion", "psnr_window_db")}
        twin = next(r for r in st.gate.relative if r.baseline == "direct_twin")
        assert twin.non_inferiority_slack_db == 0.3 and twin.paired_bootstrap  # issue 21 item 4


# --------------------------------------------------------------------------- gates mirror the stages


def _stages(n: int) -> dict:
    """``n`` stages grown from the default three (16³ → 32³ → 64³ → 128³ …)."""
    from xct_core.config import Params

    base = Params().model_dump(mode="json")["stages"]
    out = {}
    for k in range(1, n + 1):
        s = dict(base[f"stage{min(k, 3)}"])
        if k > 3:
            s.update(size=16 * 2 ** (k - 1), conv_channels=[8] * (k - 1) + [32])
        out[f"stage{k}"] = s
    return out


def _gate(psnr: float) -> dict:
    return {"psnr_window_db": psnr, "ssim_window": 0.5}


def test_gates_are_a_mapping_keyed_like_the_stages() -> None:
    from xct_core.config import params_from_dict

    p = params_from_dict({"stages": _stages(4), "gates": {f"stage{k}": _gate(20.0 + k) for k in range(1, 5)}})
    assert p.n_stages == 4 and [st.gate.psnr_window_db for st in p.stage_list()] == [21.0, 22.0, 23.0, 24.0]
    two = params_from_dict({"stages": _stages(2), "gates": {"stage1": _gate(1.0), "stage2": _gate(2.0)}})
    assert [st.gate.psnr_window_db for st in two.stage_list()] == [1.0, 2.0]


def test_a_stage_without_a_gate_is_a_load_time_error(tmp_path) -> None:
    import yaml

    from xct_core.config import params_from_dict

    # the default gates cover three stages: a fourth stage alone has none
    with pytest.raises(ConfigError, match=r"invalid parameter gates: .*no gate for stage4"):
        params_from_dict({"stages": _stages(4)})
    with pytest.raises(ConfigError, match="no gate for stage2"):
        params_from_dict({"stages": _stages(2), "gates": {"stage1": _gate(1.0)}})
    f = tmp_path / "p.yaml"
    f.write_text(yaml.safe_dump({"stages": _stages(4)}))
    with pytest.raises(ConfigError, match=str(f)):
        load_params(f)


def test_a_gate_key_must_name_a_stage_and_surplus_gates_gate_nothing() -> None:
    from xct_core.config import params_from_dict

    with pytest.raises(ConfigError, match=r"keyed by stage name.*'stage_2'"):
        params_from_dict({"gates": {"stage1": _gate(1), "stage_2": _gate(2), "stage2": _gate(2), "stage3": _gate(3)}})
    # a gate beyond the cascade (a trimmed profile keeping the base gates) is kept and gates nothing
    p = params_from_dict({"stages": _stages(1)})
    assert p.n_stages == 1 and p.stage(1).gate.psnr_window_db == 28.0 and "stage3" in p.gates
    with pytest.raises(ConfigError, match="stage 2 does not exist"):
        p.stage(2)
