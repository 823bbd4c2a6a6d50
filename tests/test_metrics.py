"""Metrics: analytic values and cross-checks against scikit-image."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy import ndimage

from xct_core import metrics as M
from xct_core.config import EvalParams
from xct_core.hu import WINDOWS, HUWindow

skm = pytest.importorskip("skimage.metrics")

SOFT = WINDOWS["soft_tissue"]


def _structured(shape=(20, 22, 18), seed=0, noise=0.15) -> tuple[np.ndarray, np.ndarray]:
    """A smooth random field in about [-1, 1] and a noisy, slightly blurred copy."""
    rng = np.random.default_rng(seed)
    a = ndimage.gaussian_filter(rng.standard_normal(shape), 2.0)
    a = 0.95 * a / np.abs(a).max()
    b = ndimage.gaussian_filter(a, 0.7) + noise * rng.standard_normal(shape)
    return a, b


# ------------------------------------------------------------------- PSNR


def test_psnr_window_matches_skimage_and_clips():
    a, b = _structured()
    ref = skm.peak_signal_noise_ratio(np.clip(a, -1, 1), np.clip(b, -1, 1), data_range=2.0)
    assert M.psnr_window(b, a) == pytest.approx(ref, abs=1e-9)
    assert M.psnr_window(torch.from_numpy(b).float(), torch.from_numpy(a).float()) == pytest.approx(ref, abs=1e-4)
    assert HUWindow.normalised_range == 2.0
    # values beyond the window do not count: pred overshoots where target is at the edge
    t = np.clip(a * 2, -1, 1)
    p = t.copy()
    p[t >= 1] = 1.7
    p[t <= -1] = -5.0
    assert (p != t).any()
    assert M.psnr_window(p, t) == math.inf


def test_psnr_analytic_constant_offset():
    a, _ = _structured()
    t = 0.5 * a  # stays inside [-1, 1] after the offset
    for d in (0.01, 0.1, 0.3):
        assert M.psnr_window(t + d, t) == pytest.approx(20 * math.log10(2.0 / d), abs=1e-9)
    hu = 500.0 * a  # inside [-1024, 1024] after the offset
    for d in (1.0, 16.0, 100.0):
        assert M.psnr_hu(hu + d, hu) == pytest.approx(20 * math.log10(2048.0 / d), abs=1e-9)
        assert M.psnr(hu + d, hu, data_range=4000.0) == pytest.approx(20 * math.log10(4000.0 / d), abs=1e-9)


def test_psnr_hu_matches_skimage_and_clips():
    a, b = _structured(seed=3)
    t_hu, p_hu = 1500.0 * a, 1500.0 * b  # exceeds ±1024 in places
    ref = skm.peak_signal_noise_ratio(np.clip(t_hu, -1024, 1024), np.clip(p_hu, -1024, 1024), data_range=2048)
    assert M.psnr_hu(p_hu, t_hu) == pytest.approx(ref, abs=1e-9)
    ref2 = skm.peak_signal_noise_ratio(np.clip(t_hu, -200, 300), np.clip(p_hu, -200, 300), data_range=500)
    assert M.psnr_hu(p_hu, t_hu, lo=-200, hi=300) == pytest.approx(ref2, abs=1e-9)
    # air padding (-3024) vs -1024 is the same after clipping
    t = np.full((8, 8, 8), -1024.0)
    t[2:6, 2:6, 2:6] = 40.0
    p = t.copy()
    p[0] = -3024.0
    assert M.psnr_hu(p, t) == math.inf
    with pytest.raises(ValueError):
        M.psnr_hu(p, t, lo=10, hi=0)


def test_mae_hu_known_offset_and_clipping():
    a, _ = _structured()
    hu = 500.0 * a
    assert M.mae_hu(hu + 25.0, hu) == pytest.approx(25.0, abs=1e-9)
    assert M.mae_hu(hu - 7.5, hu) == pytest.approx(7.5, abs=1e-9)
    t = np.zeros((6, 6, 6))
    p = t.copy()
    p[0] = 5000.0  # 1/6 of the voxels, clipped to 1024 by default
    assert M.mae_hu(p, t) == pytest.approx(1024.0 / 6, abs=1e-9)
    assert M.mae_hu(p, t, lo=None, hi=None) == pytest.approx(5000.0 / 6, abs=1e-9)


# ------------------------------------------------------------------- SSIM


def test_ssim3d_identical_is_one():
    a, _ = _structured()
    assert M.ssim3d(a, a, 2.0) == pytest.approx(1.0, abs=1e-6)


@pytest.mark.parametrize("data_range", [2.0, 0.5])
def test_ssim3d_matches_skimage(data_range):
    a, b = _structured(shape=(24, 20, 22), seed=1)
    ref = skm.structural_similarity(a, b, gaussian_weights=True, sigma=1.5, use_sample_covariance=False,
                                    data_range=data_range)
    got = M.ssim3d(b, a, data_range)
    assert got == pytest.approx(ref, abs=1e-4)
    assert 0.2 < got < 0.99  # a non-trivial value
    # torch float32 input, and a different sigma with its matching window size
    assert M.ssim3d(torch.from_numpy(b).float(), torch.from_numpy(a).float(), data_range) == pytest.approx(ref, abs=1e-4)
    ref_s1 = skm.structural_similarity(a, b, gaussian_weights=True, sigma=1.0, use_sample_covariance=False,
                                       data_range=data_range)  # skimage: 2·int(3.5σ+0.5)+1 = 9 taps
    assert M.ssim3d(b, a, data_range, sigma=1.0, win=9) == pytest.approx(ref_s1, abs=1e-4)


def test_ssim2d_and_reprojection_psnr_match_skimage():
    rng = np.random.default_rng(4)
    ref_img = ndimage.gaussian_filter(rng.random((40, 36)), 2.0) * 7.0 + 1.0  # line integrals ~ [1, 8]
    pred = ref_img + 0.2 * rng.standard_normal(ref_img.shape)
    rng_ref = float(ref_img.max() - ref_img.min())
    want_ssim = skm.structural_similarity(ref_img, pred, gaussian_weights=True, sigma=1.5,
                                          use_sample_covariance=False, data_range=rng_ref)
    assert M.ssim2d(pred, ref_img) == pytest.approx(want_ssim, abs=1e-4)  # default: ref max−min
    want_ssim8 = skm.structural_similarity(ref_img, pred, gaussian_weights=True, sigma=1.5,
                                           use_sample_covariance=False, data_range=8.0)
    assert M.ssim2d(pred, ref_img, data_range=8.0) == pytest.approx(want_ssim8, abs=1e-4)
    want_psnr = skm.peak_signal_noise_ratio(ref_img, pred, data_range=rng_ref)
    assert M.reprojection_psnr(pred, ref_img) == pytest.approx(want_psnr, abs=1e-9)
    assert M.reprojection_psnr(pred, ref_img, data_range=10.0) == pytest.approx(
        skm.peak_signal_noise_ratio(ref_img, pred, data_range=10.0), abs=1e-9)


def test_ssim_rejects_small_or_even_windows():
    a, b = _structured(shape=(8, 12, 12))
    with pytest.raises(ValueError, match="exceeds"):
        M.ssim3d(a, b, 2.0)
    with pytest.raises(ValueError, match="odd"):
        M.ssim3d(a, b, 2.0, win=4)


# ------------------------------------------------------------------- slice averages


def test_slice_psnr_is_mean_of_per_slice_psnr():
    a, b = _structured(shape=(16, 14, 9), seed=5)
    t_hu, p_hu = 800.0 * a, 800.0 * b
    per = [skm.peak_signal_noise_ratio(t_hu[:, :, k], p_hu[:, :, k], data_range=2048) for k in range(9)]
    assert M.slice_psnr(p_hu, t_hu, 2048) == pytest.approx(float(np.mean(per)), abs=1e-9)
    # and it is a different number from the 3D PSNR (hence the label)
    assert M.slice_psnr(p_hu, t_hu, 2048) != pytest.approx(M.psnr(p_hu, t_hu, 2048), abs=1e-3)
    # an identical slice counts as the 100 dB cap
    p2 = p_hu.copy()
    p2[:, :, 0] = t_hu[:, :, 0]
    want = (M.SLICE_PSNR_CAP_DB + sum(per[1:])) / 9
    assert M.slice_psnr(p2, t_hu, 2048) == pytest.approx(want, abs=1e-9)


def test_slice_ssim_is_mean_of_per_slice_ssim():
    a, b = _structured(shape=(16, 14, 5), seed=6)
    per = [
        skm.structural_similarity(a[:, :, k], b[:, :, k], gaussian_weights=True, sigma=1.5,
                                  use_sample_covariance=False, data_range=2.0)
        for k in range(5)
    ]
    assert M.slice_ssim(b, a, 2.0) == pytest.approx(float(np.mean(per)), abs=1e-4)


# ------------------------------------------------------------------- sanity metrics


def test_dynamic_range_and_nan_count():
    x = np.linspace(-0.5, 0.7, 4 * 5 * 6).reshape(4, 5, 6)
    rng, std = M.dynamic_range(x)
    assert rng == pytest.approx(1.2, abs=1e-12)
    assert std == pytest.approx(float(x.std()), abs=1e-12)
    assert M.dynamic_range(np.full((4, 4, 4), 0.3)) == (0.0, 0.0)  # collapsed output
    y = x.copy()
    y[0, 0, 0], y[1, 1, 1], y[2, 2, 2] = np.nan, np.inf, -np.inf
    assert M.nan_count(y) == 3 and M.nan_count(x) == 0
    fin = y[np.isfinite(y)]
    rng_y, std_y = M.dynamic_range(y)  # non-finite values ignored
    assert rng_y == pytest.approx(float(fin.max() - fin.min()))
    assert std_y == pytest.approx(float(fin.std()))
    all_nan = M.dynamic_range(np.full((3, 3, 3), np.nan))
    assert math.isnan(all_nan[0]) and math.isnan(all_nan[1])


def test_non_finite_inputs_do_not_crash():
    a, b = _structured(shape=(14, 14, 14))
    b = b.copy()
    b[3, 4, 5] = np.nan
    b[6, 6, 6] = np.inf
    assert math.isnan(M.psnr_window(b, a))
    assert math.isnan(M.ssim3d(b, a, 2.0))
    assert math.isnan(M.mae_hu(b * 500, a * 500))
    m = M.volume_metrics(b, a, SOFT)
    assert m["nan_count"] == 2.0
    for k in ("psnr_window_db", "psnr_hu_db", "ssim_window", "mae_hu", "psnr_slice_avg_db", "ssim_slice_avg"):
        assert math.isnan(m[k]), k
    assert math.isfinite(m["dynamic_range"]) and math.isfinite(m["std"])


# ------------------------------------------------------------------- batching


def test_batched_equals_per_sample():
    vols = [_structured(shape=(14, 13, 12), seed=s) for s in range(3)]
    t = np.stack([v[0] for v in vols])
    p = np.stack([v[1] for v in vols])
    cases = {
        "psnr_window": (M.psnr_window, ()),
        "psnr_hu": (lambda x, y: M.psnr_hu(x * 900, y * 900), ()),
        "mae_hu": (lambda x, y: M.mae_hu(x * 900, y * 900), ()),
        "ssim3d": (lambda x, y: M.ssim3d(x, y, 2.0), ()),
        "slice_psnr": (lambda x, y: M.slice_psnr(x, y, 2.0), ()),
        "slice_ssim": (lambda x, y: M.slice_ssim(x, y, 2.0), ()),
    }
    for name, (fn, _) in cases.items():
        batched = fn(p, t)
        assert isinstance(batched, np.ndarray) and batched.shape == (3,), name
        singles = [fn(p[i], t[i]) for i in range(3)]
        assert all(isinstance(s, float) for s in singles), name
        np.testing.assert_allclose(batched, singles, rtol=0, atol=1e-9, err_msg=name)
        # [B, 1, X, Y, Z] and torch input give the same
        np.testing.assert_allclose(fn(torch.from_numpy(p[:, None]), torch.from_numpy(t[:, None])), singles,
                                   rtol=0, atol=1e-9, err_msg=name)
    rng, std = M.dynamic_range(p)
    np.testing.assert_allclose(rng, [M.dynamic_range(x)[0] for x in p])
    np.testing.assert_allclose(std, [M.dynamic_range(x)[1] for x in p])
    assert M.nan_count(p).tolist() == [0, 0, 0]
    # 2D images: [B, H, W] and [B, 1, H, W]
    imgs_t, imgs_p = t[:, :, :, 0] * 3 + 4, p[:, :, :, 0] * 3 + 4
    np.testing.assert_allclose(M.reprojection_psnr(imgs_p, imgs_t),
                               [M.reprojection_psnr(imgs_p[i], imgs_t[i]) for i in range(3)], atol=1e-9)
    np.testing.assert_allclose(M.ssim2d(imgs_p[:, None], imgs_t[:, None]),
                               [M.ssim2d(imgs_p[i], imgs_t[i]) for i in range(3)], atol=1e-9)
    with pytest.raises(ValueError):
        M.psnr_window(p[:, None].repeat(2, axis=1), t[:, None].repeat(2, axis=1))  # C != 1
    with pytest.raises(ValueError):
        M.psnr_window(p, t[:2])


# ------------------------------------------------------------------- the full set


def test_volume_metrics_keys_and_values():
    a, b = _structured(shape=(16, 16, 14), seed=7)
    m = M.volume_metrics(b, a, SOFT)
    assert tuple(m) == M.METRIC_KEYS
    assert all(isinstance(v, float) for v in m.values())
    assert m["psnr_window_db"] == pytest.approx(M.psnr_window(b, a), abs=1e-9)
    bc, ac = np.clip(b, -1, 1), np.clip(a, -1, 1)
    assert m["ssim_window"] == pytest.approx(
        skm.structural_similarity(ac, bc, gaussian_weights=True, sigma=1.5, use_sample_covariance=False,
                                  data_range=2.0), abs=1e-4)
    p_hu, t_hu = SOFT.inverse(bc), SOFT.inverse(ac)  # [-200, 200] HU: width 400 = 2 units
    assert m["mae_hu"] == pytest.approx(float(np.abs(p_hu - t_hu).mean()), abs=1e-9)
    assert m["mae_hu"] == pytest.approx(200.0 * float(np.abs(bc - ac).mean()), abs=1e-9)
    assert m["psnr_hu_db"] == pytest.approx(
        skm.peak_signal_noise_ratio(t_hu, p_hu, data_range=2048), abs=1e-9)
    # the same error measured over 2048 HU instead of 400 HU reads 20·log10(2048/400) dB higher
    assert m["psnr_hu_db"] - m["psnr_window_db"] == pytest.approx(20 * math.log10(2048 / 400), abs=1e-9)
    assert m["psnr_slice_avg_db"] == pytest.approx(M.slice_psnr(p_hu, t_hu, 2048), abs=1e-9)
    assert m["dynamic_range"] == pytest.approx(float(b.max() - b.min()))
    assert m["nan_count"] == 0.0


def test_volume_metrics_with_full_range_target_and_views():
    a, b = _structured(shape=(14, 14, 12), seed=8)
    t_hu = 1000.0 * a  # the real reference: lung/bone outside the soft-tissue window
    t_norm = SOFT.forward(t_hu)
    p_norm = SOFT.forward(1000.0 * b)
    p_hu = SOFT.inverse(np.clip(p_norm, -1, 1))
    m = M.volume_metrics(p_norm, t_norm, SOFT, target_hu=t_hu)
    assert m["psnr_hu_db"] == pytest.approx(M.psnr_hu(p_hu, t_hu), abs=1e-9)
    assert m["mae_hu"] == pytest.approx(M.mae_hu(p_hu, t_hu), abs=1e-9)
    # without the full-range target the HU metrics only see the window (and read better)
    assert M.volume_metrics(p_norm, t_norm, SOFT)["psnr_hu_db"] > m["psnr_hu_db"] + 3
    rng = np.random.default_rng(0)
    front = ndimage.gaussian_filter(rng.random((24, 24)), 2) * 5
    lat = ndimage.gaussian_filter(rng.random((24, 24)), 2) * 5
    views = {"frontal": (front + 0.1, front), "lateral": (lat, lat)}
    mv = M.volume_metrics(p_norm, t_norm, SOFT, target_hu=t_hu, views=views)
    assert mv["reproj_psnr_frontal_db"] == pytest.approx(
        20 * math.log10((front.max() - front.min()) / 0.1), abs=1e-9)
    assert mv["reproj_psnr_lateral_db"] == math.inf and mv["reproj_ssim_lateral"] == pytest.approx(1.0, abs=1e-6)
    assert {k: mv[k] for k in M.METRIC_KEYS} == m


def test_volume_metrics_batch_is_mean_of_samples():
    vols = [_structured(shape=(14, 14, 12), seed=s) for s in (10, 11)]
    t = torch.from_numpy(np.stack([v[0] for v in vols])).float()[:, None]
    p = torch.from_numpy(np.stack([v[1] for v in vols])).float()[:, None]
    p[1, 0, 0, 0, 0] = float("nan")
    rows = M.volume_metrics_per_sample(p, t, SOFT)
    assert len(rows) == 2 and rows[0] == M.volume_metrics(p[0, 0], t[0, 0], SOFT)
    m = M.volume_metrics(p, t, SOFT)
    assert m["nan_count"] == 1.0
    assert math.isnan(m["psnr_window_db"])  # one bad sample poisons the batch mean
    assert m["dynamic_range"] == pytest.approx((rows[0]["dynamic_range"] + rows[1]["dynamic_range"]) / 2)


def test_eval_params_defaults_match_metric_defaults():
    e = EvalParams()
    assert (e.ssim_sigma, e.ssim_win, e.hu_lo, e.hu_hi) == (1.5, 11, -1024.0, 1024.0)
    assert M.metric_kwargs(e) == {"hu_range": (-1024.0, 1024.0), "ssim_sigma": 1.5, "ssim_win": 11}
    with pytest.raises(ValueError):
        EvalParams(ssim_win=8)


# ------------------------------------------------------------------- the protocol of issue 14


def test_ssim_taps_fit_the_grid():
    assert [M.ssim_taps(s, 11) for s in (8, 12, 16, 24, 32, 64)] == [3, 5, 7, 11, 11, 11]
    assert M.ssim_taps(64, 7) == 7  # never more than asked
    # 16³ with 7 taps keeps a valid region of 10³ voxels (11 taps: 6³)
    x = torch.rand(16, 16, 16, dtype=torch.float64)
    assert M.ssim3d(x, x, 1.0, win=M.ssim_taps(16)) == pytest.approx(1.0)


def _torso(n: int = 24) -> np.ndarray:
    """Air around a cylindrical body (40 HU) with a lung (-850 HU) inside, along the S axis."""
    i, j = np.meshgrid(np.arange(n), np.arange(n), indexing="ij")
    r = np.hypot(i - (n - 1) / 2, j - (n - 1) / 2)
    sl = np.where(r < n * 0.4, 40.0, -1000.0)
    sl[(r < n * 0.2)] = -850.0  # the lung: below the body threshold but inside the body
    return np.repeat(sl[:, :, None], n, axis=2).astype(np.float32)


def test_body_mask_fills_the_lungs_and_drops_the_air_around():
    t = _torso()
    m = M.body_mask(t, -500.0)[0].numpy()
    n = t.shape[0]
    i, j = np.meshgrid(np.arange(n), np.arange(n), indexing="ij")
    r = np.hypot(i - (n - 1) / 2, j - (n - 1) / 2)
    want = np.repeat((r < n * 0.4)[:, :, None], n, axis=2)
    np.testing.assert_array_equal(m, want)
    assert m[t == -850.0].all() and not m[t == -1000.0].any()


def test_body_psnr_ignores_errors_in_the_air():
    t = _torso()
    p = t.copy()
    p[t == -1000.0] = -200.0  # a wrong value in the air only: whole-volume PSNRs drop, body PSNRs stay inf
    body = M.body_mask(t, -500.0)
    assert M.masked_psnr(p, t, body, 2048.0) == math.inf
    p2 = t + np.float32(20.0)  # a uniform 20 HU error everywhere
    assert M.masked_psnr(p2, t, body, 2048.0) == pytest.approx(20 * math.log10(2048 / 20), abs=1e-6)
    row = M.hu_metrics_per_sample(p, t, SOFT, body_hu=-500.0)[0]
    assert row["psnr_hu_body_db"] == math.inf and math.isfinite(row["psnr_hu_db"])
    assert row["psnr_window_body_db"] == math.inf  # -200 and -1000 both read as the window floor
    assert row["body_fraction"] == pytest.approx(float(body.double().mean()))
    assert "psnr_hu_body_db" not in M.hu_metrics_per_sample(p, t, SOFT)[0]  # only when asked
    assert math.isnan(M.masked_psnr(p, t, torch.zeros(t.shape, dtype=torch.bool), 2048.0))  # empty mask
