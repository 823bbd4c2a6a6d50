"""Calibration formulas (xct_core/calibration.py) against an ORACLE sampler.

The oracle draws the truth and K samples from the same known heteroscedastic Gaussian per
voxel — a calibrated sampler by construction — and a shrunk copy (samples with half the
spread) — an over-confident one. Each formula must call the first calibrated and catch the
second; the conformal and σ-recalibration fits are made on one oracle draw ("val") and
checked on an independent one ("test"). Power spectra are checked analytically.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from xct_core import calibration as C
from xct_core.errors import InputError

K = 8
N = 120_000


def oracle(seed: int, shrink: float = 1.0, k: int = K):
    """(samples [K, N], truth [N], sigma [N]): truth and samples ~ N(mu, sigma²) per voxel;
    the samples' spread multiplied by ``shrink``."""
    rng = np.random.default_rng(seed)
    mu = rng.normal(0.0, 50.0, N)
    sigma = np.exp(rng.normal(3.0, 0.6, N))
    truth = mu + sigma * rng.standard_normal(N)
    samples = mu + shrink * sigma * rng.standard_normal((k, N))
    return samples, truth, sigma


def stats(samples):
    return samples.mean(0), samples.std(0, ddof=1)


@pytest.mark.parametrize("k", [2, 8])
def test_spread_skill_is_one_for_the_oracle_and_low_when_overconfident(k: int) -> None:
    s, y, _ = oracle(1, k=k)
    m, sd = stats(s)
    assert C.spread_skill(m, sd, y, k) == pytest.approx(1.0, abs=0.03)
    s2, y2, _ = oracle(2, shrink=0.5, k=k)
    m2, sd2 = stats(s2)
    # spread halves, the K-mean's error shrinks only from σ²(1+1/K) to σ²(1+1/(4K))
    want = 0.5 * math.sqrt((1 + 1 / k) / (1 + 1 / (4 * k)))
    assert C.spread_skill(m2, sd2, y2, k) == pytest.approx(want, abs=0.03)
    # a mask selects voxels; an empty one is NaN
    mask = np.zeros(N, bool)
    assert math.isnan(C.spread_skill(m, sd, y, k, mask))


def test_rank_histogram_is_flat_for_the_oracle_and_u_shaped_when_overconfident() -> None:
    s, y, _ = oracle(3)
    h = C.rank_histogram(C.truth_ranks(s, y), K)
    assert h.shape == (K + 1,) and h.sum() == pytest.approx(1.0)
    assert np.abs(h - 1 / (K + 1)).max() < 0.01
    assert C.minmax_coverage(C.truth_ranks(s, y), K) == pytest.approx((K - 1) / (K + 1), abs=0.01)
    s2, y2, _ = oracle(4, shrink=0.5)
    r2 = C.truth_ranks(s2, y2)
    h2 = C.rank_histogram(r2, K)
    assert h2[0] > 2 / (K + 1) and h2[-1] > 2 / (K + 1)
    assert C.minmax_coverage(r2, K) < 0.6


def test_ties_are_broken_at_random() -> None:
    """A voxel where all samples equal the truth (e.g. clipped air) spreads evenly over the ranks."""
    samples = np.zeros((K, 90_000))
    r = C.truth_ranks(samples, np.zeros(90_000), rng=0)
    assert np.abs(C.rank_histogram(r, K) - 1 / (K + 1)).max() < 0.01


def test_conformal_quantile_finite_sample_rule() -> None:
    assert C.conformal_quantile(np.arange(1, 20), 0.9) == 18.0  # ceil(20·0.9)/19 → 18th smallest
    assert C.conformal_quantile(np.arange(1, 10), 0.9) == 9.0  # ceil(10·0.9)/9 = 1 → the max
    assert C.conformal_quantile(np.arange(1, 5), 0.9) == math.inf  # too few scores
    with pytest.raises(ValueError):
        C.conformal_quantile(np.arange(5), 1.0)


@pytest.mark.parametrize("shrink", [1.0, 0.5])
def test_conformal_fit_on_val_covers_on_test_even_when_the_spread_is_wrong(shrink: float) -> None:
    floor = 1.0
    sv, yv, _ = oracle(5, shrink)
    st, yt, _ = oracle(6, shrink)
    (mv, sdv), (mt, sdt) = stats(sv), stats(st)
    q = C.conformal_quantile(C.normalised_scores(mv, sdv, yv, floor), 0.9)
    cov = C.coverage(C.normalised_scores(mt, sdt, yt, floor), q)
    assert cov == pytest.approx(0.9, abs=0.005)
    lo, hi = C.interval(mt, sdt, q, floor)
    assert np.mean((yt >= lo) & (yt <= hi)) == pytest.approx(cov, abs=1e-3)
    gaussian = C.coverage(C.normalised_scores(mt, sdt, yt, floor), 1.6449)  # the raw ±1.645 std interval
    if shrink == 1.0:
        from scipy.stats import t

        # (mean − y)/std is Student-t with K−1 dof times sqrt(1 + 1/K) for a calibrated sampler
        assert q == pytest.approx(t.ppf(0.95, K - 1) * math.sqrt(1 + 1 / K), rel=0.02)
    else:
        assert gaussian < 0.7 and q > 2.5  # over-confident std: the raw interval misses, conformal widens


def test_sigma_recalibration_fitted_on_val_makes_test_spread_skill_one() -> None:
    sv, yv, _ = oracle(7, shrink=0.5)
    mv, sdv = stats(sv)
    s = C.fit_sigma_scale(float(np.sum(sdv**2)), float(np.sum((mv - yv) ** 2)), K)
    assert s > 1.8
    st, yt, _ = oracle(8, shrink=0.5)
    mt, sdt = stats(st)
    assert C.spread_skill(mt, sdt, yt, K) < 0.6
    assert C.spread_skill(mt, sdt, yt, K, scale=s) == pytest.approx(1.0, abs=0.03)


def test_ause_and_spearman_rank_the_oracle_std_above_a_shuffled_one() -> None:
    s, y, sigma = oracle(9)
    m, sd = stats(s)
    err = np.abs(m - y)
    assert C.ause(err, err) == pytest.approx(0.0, abs=1e-12)  # the oracle order itself
    good = C.ause(sd, err)
    shuffled = np.random.default_rng(0).permutation(sd)
    bad = C.ause(shuffled, err)
    assert 0.0 < good < bad
    assert C.spearman_std_error(sd, err) > 0.3
    assert abs(C.spearman_std_error(shuffled, err)) < 0.02
    assert math.isnan(C.spearman_std_error(np.ones(N), err))


def test_band_power_puts_a_cosine_in_its_band_and_scales_quadratically() -> None:
    n = 32
    x = np.arange(n)
    f = 12 / n  # 12 cycles over the grid: |k|/k_Nyq = 0.75 → band 4 of 5 ([0.6, 0.8])
    vol = np.cos(2 * np.pi * f * x)[:, None, None] * np.ones((n, n, n))
    p = C.band_power(vol, 5)
    assert np.argmax(p) == 3 and np.count_nonzero(p > 1e-9 * p.max()) == 1
    rng = np.random.default_rng(0)
    white = rng.standard_normal((n, n, n))
    np.testing.assert_allclose(C.power_ratio(2 * white, white, 5), 4.0, rtol=1e-9)
    other = rng.standard_normal((n, n, n))  # an independent white "sample": every band ratio ~ 1
    np.testing.assert_allclose(C.power_ratio(other, white, 5), 1.0, atol=0.08)
    # a smooth (posterior-mean-like) volume has lost its top band
    from scipy.ndimage import gaussian_filter

    smooth = gaussian_filter(white, 1.5)
    assert C.power_ratio(smooth, white, 5)[-1] < 0.05


def test_fit_calibration_round_trips_through_json(tmp_path) -> None:
    floor = 1.0
    cases = []
    for seed in (10, 11):
        s, y, _ = oracle(seed, shrink=0.5)
        m, sd = stats(s)
        cases.append(C.CaseScores.of(s, m, sd, y, np.ones(N, bool), floor))
    cal = C.fit_calibration(cases, stage=1, samples=K, level=0.9, floor_hu=floor, fitted_on={"split": "val"})
    assert cal.fitted_on["n_voxels"] == 2 * N and cal.quantiles["0.9"] == cal.q
    assert cal.sigma_scale > 1.8
    p = tmp_path / C.CALIBRATION_JSON
    p.write_text(json.dumps(cal.to_json()))
    back = C.read_calibration(p)
    assert back == cal
    lo, hi = back.interval(np.zeros(3), np.array([0.0, 1.0, 2.0]))
    np.testing.assert_allclose(hi, cal.q * np.array([1.0, 1.0, 2.0]), rtol=1e-6)  # the floor under 0 std
    np.testing.assert_allclose(lo, -hi)
    # an evaluation metrics.json carrying it is read too; anything else is one clear error
    (tmp_path / "metrics.json").write_text(json.dumps({"psnr_window_db": 30.0, "calibration": cal.to_json()}))
    assert C.read_calibration(tmp_path / "metrics.json") == cal
    (tmp_path / "bad.json").write_text(json.dumps({"format": "other"}))
    with pytest.raises(InputError, match="bad.json"):
        C.read_calibration(tmp_path / "bad.json")


def test_reconstruct_hands_out_the_anchor_and_keeps_the_samples() -> None:
    """eval.point_estimate: anchor = the anchored stage's twin output (HU), identical for every
    sample at stage 1; mean = the K-mean; the kept samples give exactly the std."""
    import torch
    from train_fixtures import tiny_params

    from xct_core.config import params_from_dict
    from xct_core.errors import ConfigError
    from xct_core.inference import reconstruct
    from xct_core.models import AnchoredStage, build_stage

    d = tiny_params(eval={"sample_steps": 1}).model_dump(mode="json")
    d["stages"]["stage1"].update(anchor="direct", residual_scale=0.2)
    p = params_from_dict(d)
    torch.manual_seed(0)
    twin = build_stage(p, 1, mode="direct").eval()
    stage = AnchoredStage(build_stage(p, 1).eval(), twin)
    px = p.drr.pixels
    f, lat = np.full((px, px), 0.5, np.float32), np.full((px, px), 0.4, np.float32)
    rec = reconstruct([stage], p, f, lat, samples=3, seed=1, keep_samples=True)
    with torch.no_grad():
        mu = twin(None, None, torch.from_numpy(f)[None, None], torch.from_numpy(lat)[None, None], None, None)
    want = p.hu.net_map().inverse(mu.clamp(-1, 1)[0, 0].double().numpy())
    np.testing.assert_allclose(rec.point_hu("anchor"), want, atol=1e-2)
    assert rec.point_hu("mean") is rec.mean_hu and rec.samples_hu.shape == (3, *rec.mean_hu.shape)
    np.testing.assert_allclose(rec.samples_hu.std(0, ddof=1), rec.std_hu, atol=1e-2)
    plain = reconstruct([build_stage(tiny_params(), 1).eval()], tiny_params(eval={"sample_steps": 1}), f, lat, samples=2)
    assert plain.anchor_hu is None and plain.samples_hu is None
    with pytest.raises(ConfigError, match="anchored"):
        plain.point_hu("anchor")
    # auto (the default): the anchor where the last stage is anchored, the K-mean where it is not
    assert rec.point_hu("auto") is rec.anchor_hu and plain.point_hu("auto") is plain.mean_hu
    assert (rec.resolve_point("auto"), plain.resolve_point("auto")) == ("anchor", "mean")
    # ... and the params resolve it the same way from the stage's `anchor` (what the evaluation,
    # the calibration file and `xct reconstruct` record)
    assert (p.point_estimate_for(1), tiny_params().point_estimate_for(1)) == ("anchor", "mean")
    assert tiny_params(eval={"point_estimate": "mean"}).point_estimate_for(1) == "mean"
