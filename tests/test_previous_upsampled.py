"""The "previous stage upsampled" baseline (issue 21: every stage k > 1 reports it beside the
twin and the mean volume; the ``upsampled_`` prefix and ``gain_over_upsampled_db``).

Analytic set-ups on the tiny 16³ → 32³ cascade: stages whose output is a volume chosen HERE
(a direct-mode stage network wrapped so that it returns that volume, whatever its inputs), so
the expected baseline is computed independently with the cascade's own resizer; and real
random-weight stages to show the baseline is stage k − 1's point estimate of the SAME runs
(equal to reconstructing up to stage k − 1 alone), resolved by ``eval.point_estimate``.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from train_fixtures import tiny_params

from xct_core.cascade import resize_volume
from xct_core.config import Params, params_from_dict
from xct_core.diffusion import Sampler
from xct_core.errors import ConfigError
from xct_core.evaluation import EvalProtocol, ct_case, evaluate_case, montage_volumes, upsample_previous
from xct_core.gates import evaluate_gate
from xct_core.inference import reconstruct
from xct_core.io import CTVolume
from xct_core.metric_table import UPSAMPLED_PREFIX
from xct_core.models import AnchoredStage, build_stage
from xct_core.phantoms import make_phantom
from xct_core.seeding import case_seed


class FixedStage(nn.Module):
    """A direct-mode stage whose output is ``out`` (network units), whatever its inputs; the
    wrapped network gives the static attributes (size, conditional, mode) the cascade reads."""

    def __init__(self, net: nn.Module, out: torch.Tensor) -> None:
        super().__init__()
        self.module = net  # xct_core.models.stage.unwrap reads the static attributes through it
        self.register_buffer("out", out)

    def forward(self, x_t, t, frontal, lateral, cond=None, cond_aug=None, **_kw):  # noqa: ANN001, ANN201
        return self.out.expand(frontal.shape[0], -1, -1, -1, -1)


def _params(**eval_over) -> Params:
    return tiny_params(eval={"sample_steps": 1, **eval_over})


def _case(params: Params, upto: int):
    n = params.stage(params.n_stages).size
    hu, _, affine = make_phantom(n, params.stage(1).fov_mm / n, 3)
    return ct_case("ph3", CTVolume(hu.astype(np.float32), affine), params, upto=upto, xrays="clean")


def _v1() -> torch.Tensor:
    """Stage 1's output: a smooth random field spanning most of [-1, 1] (crosses the HU map's knots)."""
    g = torch.Generator().manual_seed(7)
    v = F.avg_pool3d(torch.rand((1, 1, 16, 16, 16), generator=g) * 2 - 1, 3, 1, 1, count_include_pad=False)
    return (v - v.mean()) / v.abs().max() * 0.95


def _fixed_cascade(params: Params, v1: torch.Tensor, v2: torch.Tensor) -> list[nn.Module]:
    torch.manual_seed(0)
    return [FixedStage(build_stage(params, 1, mode="direct"), v1), FixedStage(build_stage(params, 2, mode="direct"), v2)]


def test_a_stage_that_returns_its_upsampled_input_gains_exactly_nothing() -> None:
    """Stage 2 outputs exactly what the cascade's resizer makes of stage 1's output: the
    point estimate IS the previous stage upsampled, so every upsampled_ metric equals the
    point's and the gain is 0 dB; the baseline is the cascade's resampling (trilinear in the
    networks' units), not a nearest-neighbour or HU-space one."""
    params = _params()
    net = params.hu.net_map()
    v1 = _v1()
    stages = _fixed_cascade(params, v1, resize_volume(v1, 32))
    case = _case(params, 2)
    res = evaluate_case(case, stages, params, EvalProtocol.from_params(params), sampler=Sampler.from_params(params),
                        samples=1, reprojection=False)
    m = res.metrics
    want = net.inverse(resize_volume(v1, 32)[0, 0].double().numpy())
    np.testing.assert_allclose(res.upsampled_hu, want, atol=1e-2)
    np.testing.assert_allclose(res.recon.previous_point_hu("auto"), net.inverse(v1[0, 0].double().numpy()), atol=1e-2)
    for key in ("psnr_window_db", "ssim_window", "mae_hu", "psnr_window_body_db", "psnr_hu_db"):
        assert m[UPSAMPLED_PREFIX + key] == pytest.approx(m[key], abs=1e-4), key
    assert m["gain_over_upsampled_db"] == pytest.approx(0.0, abs=1e-4)
    # the test can tell resamplers apart: nearest-neighbour, or trilinear in HU, is another volume
    nearest = net.inverse(F.interpolate(v1, size=(32,) * 3, mode="nearest")[0, 0].double().numpy())
    in_hu = F.interpolate(torch.from_numpy(net.inverse(v1.double().numpy())), size=(32,) * 3, mode="trilinear",
                          align_corners=False)[0, 0].numpy()
    assert np.abs(nearest - want).max() > 50.0 and np.abs(in_hu - want).max() > 5.0
    # the montage shows it on stage 2's grid, beside the previous stage's own-grid sample
    vols, spacing = montage_volumes(res, 12.8, 25.6)
    assert vols["previous stage upsampled"] is res.upsampled_hu and spacing["previous stage upsampled"] == (12.8,) * 3


def test_the_baseline_is_stage_one_whatever_stage_two_does() -> None:
    """Stage 2 outputs an unrelated volume: the upsampled_ metrics are those of stage 1's
    output upsampled, measured independently with the protocol, and the gain is the
    difference of the two window PSNRs."""
    params = _params()
    net, protocol = params.hu.net_map(), EvalProtocol.from_params(params)
    v1 = _v1()
    v2 = torch.linspace(-0.9, 0.9, 32).view(1, 1, 32, 1, 1).expand(1, 1, 32, 32, 32).contiguous()
    case = _case(params, 2)
    res = evaluate_case(case, _fixed_cascade(params, v1, v2), params, protocol, sampler=Sampler.from_params(params),
                        samples=1, reprojection=False)
    m = res.metrics
    ref = protocol.metrics(upsample_previous(net.inverse(v1[0, 0].numpy()), 32, params), case.target_hu)
    for key, val in ref.items():
        assert m[UPSAMPLED_PREFIX + key] == pytest.approx(val, rel=1e-5, abs=1e-6), key
    assert m["gain_over_upsampled_db"] == m["psnr_window_db"] - m[UPSAMPLED_PREFIX + "psnr_window_db"]
    assert m["gain_over_upsampled_db"] == pytest.approx(m["psnr_window_db"] - ref["psnr_window_db"], abs=1e-4)
    assert abs(m["gain_over_upsampled_db"]) > 0.1  # a different stage 2 does change the gain


def test_stage_one_alone_has_no_upsampled_baseline() -> None:
    params = _params()
    v1 = _v1()
    stages = _fixed_cascade(params, v1, resize_volume(v1, 32))[:1]
    res = evaluate_case(_case(params, 1), stages, params, EvalProtocol.from_params(params),
                        sampler=Sampler.from_params(params), samples=1, reprojection=False)
    assert not [k for k in res.metrics if k.startswith(UPSAMPLED_PREFIX) or "upsampled" in k]
    assert res.upsampled_hu is None and res.recon.previous_point_hu("auto") is None
    assert "previous stage upsampled" not in montage_volumes(res, 25.6, None)[0]


def test_the_previous_point_comes_from_the_same_runs_and_follows_the_point_estimate_rule() -> None:
    """K = 2 samples of a real (random-weight) cascade whose stage 1 is anchored: stage 1's
    K-mean and mean anchor inside the stage-2 run equal what reconstructing stage 1 alone
    gives (same seeds, same draws); ``auto`` picks the anchor for an anchored stage 1,
    ``mean`` the K-mean, and the evaluator upsamples the one eval.point_estimate names."""
    d = _params().model_dump(mode="json")
    d["stages"]["stage1"].update(anchor="direct", residual_scale=0.2)
    params = params_from_dict(d)
    torch.manual_seed(1)
    s1 = AnchoredStage(build_stage(params, 1).eval(), build_stage(params, 1, mode="direct").eval())
    s2 = build_stage(params, 2).eval()
    case = _case(params, 2)
    as_mean = params.model_copy(update={"eval": params.eval.model_copy(update={"point_estimate": "mean"})})
    assert (params.point_estimate_for(1), as_mean.point_estimate_for(1)) == ("anchor", "mean")
    sampler = Sampler.from_params(params)
    res = {which: evaluate_case(case, [s1, s2], p, EvalProtocol.from_params(p), sampler=sampler, samples=2, seed=0,
                                reprojection=False) for which, p in (("anchor", params), ("mean", as_mean))}
    # stage 1 alone, with the case seed evaluate_case derives: the same draws
    alone = reconstruct([s1, s2], params, case.frontal, case.lateral, upto=1, samples=2, seed=case_seed(0, case.index),
                        isocenter=case.isocenter)
    rec = res["anchor"].recon
    np.testing.assert_allclose(rec.previous_mean_hu, alone.mean_hu, atol=1e-3)
    np.testing.assert_allclose(rec.previous_anchor_hu, alone.anchor_hu, atol=1e-3)
    assert not np.allclose(alone.mean_hu, alone.anchor_hu, atol=1.0)  # two different points
    assert rec.previous_point_hu("auto") is rec.previous_anchor_hu and rec.previous_point_hu("mean") is rec.previous_mean_hu
    for which, r in res.items():  # the evaluator upsampled the point eval.point_estimate names for stage 1
        np.testing.assert_allclose(r.upsampled_hu, upsample_previous(alone.point_hu(which), 32, params), atol=1e-2)
    plain = reconstruct([build_stage(_params(), 1).eval(), s2], _params(), case.frontal, case.lateral, samples=1)
    assert plain.previous_anchor_hu is None and plain.previous_point_hu("auto") is plain.previous_mean_hu
    with pytest.raises(ConfigError, match="anchored stage 1"):
        plain.previous_point_hu("anchor")


def test_the_gate_report_shows_it_beside_and_never_gates_on_it() -> None:
    """A stage-2 gate report gets one informational row (point vs the previous stage
    upsampled, the paired interval of the gain); a stage 2 worse than its input still passes
    a gate whose thresholds it meets, and stage 1 gets no such row."""
    gate = tiny_params().stage(2).gate.model_copy(update={"relative": [], "psnr_window_db": 20.0,
                                                          "psnr_window_body_db": 20.0, "ssim_window": 0.5})
    rng = np.random.default_rng(0)
    rows = [{"id": f"p{i}", "psnr_window_db": 30.0 + rng.normal(), "upsampled_psnr_window_db": 31.0 + rng.normal()}
            for i in range(8)]
    mean = {k: float(np.mean([r[k] for r in rows])) for k in ("psnr_window_db", "upsampled_psnr_window_db")}
    metrics = {**mean, "ssim_window": 0.99, "psnr_window_body_db": 40.0, "nan_count": 0.0, "std": 0.5,
               "target_std": 0.5}
    rep = evaluate_gate(2, metrics, gate, rows=rows)
    row = next(c for c in rep.checks if c.name == "psnr_window_vs_upsampled_previous")
    assert rep.passed and not row.gating and row.baseline_value == pytest.approx(mean["upsampled_psnr_window_db"])
    diffs = [r["psnr_window_db"] - r["upsampled_psnr_window_db"] for r in rows]
    assert row.change == pytest.approx(float(np.mean(diffs))) and row.change < 0
    lo, hi = row.change_interval
    assert lo < row.change < hi and math.isfinite(lo)
    no_up = {k: v for k, v in metrics.items() if not k.startswith("upsampled_")}
    assert [c.name for c in evaluate_gate(2, no_up, gate).checks] == [c.name for c in rep.checks if c is not row]
