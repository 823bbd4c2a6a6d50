"""The honest protocol's detector model (xct_core/detector.py): analytic checks, seconds.

- noise-free, blur-free, scatter-free, one ray per pixel: the views ARE the reference ray
  marcher's line integrals (the detector adds nothing of its own);
- Poisson: at a uniform flat field of line integral p, Var(p̂) = 1/(N0·e^{-p}) (delta method);
- blur conserves the image integral (reflecting borders) and does blur;
- scatter adds exactly scatter_fraction × the primary's mean (noise off);
- supersampling averages INTENSITIES over the pixel aperture (not line integrals);
- the noise is seeded per (seed, volume id, view): reruns identical, volumes independent;
- the honest views differ from the clean training DRRs by a measured, bounded amount, and
  are placed with exactly the clean views' geometry;
- bad detector params are config errors.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from xct_core.config import DetectorParams, DRRParams, params_from_dict
from xct_core.detector import (
    FWHM_PER_SIGMA,
    DetectorModel,
    bin_pixels,
    corrupt_views,
    detect,
    detector_postprocess,
    gaussian_blur,
    honest_views,
    noise_rng,
)
from xct_core.drr import render
from xct_core.errors import ConfigError
from xct_core.geometry import VIEWS, ProjectionGeometry
from xct_core.io import CTVolume, grid_affine
from xct_core.preprocess import PreprocessSettings, StageGrid, render_xrays, stage_hu

FOV = 64.0
DRR = DRRParams(geometry="cone", pixels=16, pixel_mm=FOV * 1.5 / 16)


def model(**kw: object) -> DetectorModel:
    """params.yaml's detector (DetectorParams defaults) with ``kw`` changed."""
    return DetectorModel(**{**DetectorParams().model_dump(), "min_intensity_fraction": 1e-4, **kw})


def off(**kw: object) -> DetectorModel:
    """A detector that adds nothing: no noise, blur or scatter, one ray per pixel."""
    return model(**{"photons_per_pixel": 0.0, "blur_fwhm_mm": 0.0, "scatter_fraction": 0.0, "supersample": 1, **kw})


def phantom() -> CTVolume:
    """A 24³ box of 3 mm voxels centred off the origin: water-ish body, a lung-like hole, a dense marker."""
    n, sp = 24, 3.0
    idx = np.stack(np.meshgrid(*[np.arange(n)] * 3, indexing="ij"), axis=-1).astype(np.float64)
    rel = (idx - (n - 1) / 2) * sp
    hu = np.full((n, n, n), -1000.0, dtype=np.float32)
    hu[(np.abs(rel[..., 0]) < 28) & (np.abs(rel[..., 1]) < 22) & (np.abs(rel[..., 2]) < 30)] = 30.0
    hu[((rel[..., 0] + 12) ** 2 + rel[..., 1] ** 2 + rel[..., 2] ** 2) < 9**2] = -800.0
    hu[((rel[..., 0] - 15) ** 2 + (rel[..., 1] - 8) ** 2 + (rel[..., 2] - 10) ** 2) < 7**2] = 900.0
    return CTVolume(hu=hu, affine=grid_affine(hu.shape, sp, (12.0, -5.0, 30.0)))


def test_noise_free_path_is_the_reference_renderer() -> None:
    vol = phantom()
    m = off(step_fraction=0.5)
    f, lat, geo = honest_views(vol.hu, vol.affine, "v", DRR, 0.02, m)
    for view, img in zip(VIEWS, (f, lat), strict=True):
        placed = ProjectionGeometry.from_params(DRR, view).place(vol.affine, vol.hu.shape)
        ref = render(torch.from_numpy(vol.hu), vol.affine, placed, mu_water=0.02, method="reference", step_fraction=0.5)
        np.testing.assert_allclose(img, ref.numpy(), rtol=0, atol=2e-5)
        assert geo[view]["isocenter"] == pytest.approx(list(vol.center_world))
    assert float(f.max()) > 0.5  # the phantom is actually seen


def test_poisson_variance_matches_the_delta_method() -> None:
    p0, n0 = 1.5, 1.0e4
    flat = np.full((128, 128), p0)
    out = detect(flat, off(photons_per_pixel=n0), pixel_mm=1.0, rng=np.random.default_rng(1))
    want = 1.0 / (n0 * math.exp(-p0))
    assert np.var(out) == pytest.approx(want, rel=0.05)
    assert float(out.mean()) == pytest.approx(p0, abs=5 * math.sqrt(want / out.size) + want)
    # and the noise-free path at the same flat field is exact
    np.testing.assert_allclose(detect(flat, off(), 1.0, None), p0, atol=1e-12)


def test_blur_conserves_the_integral_and_blurs() -> None:
    rng = np.random.default_rng(0)
    img = rng.random((40, 40))
    img[5, 7] = 50.0  # a hot pixel near the border
    b = gaussian_blur(img, 2.5)
    assert b.sum() == pytest.approx(img.sum(), rel=1e-12)
    assert b[5, 7] < 0.2 * img[5, 7]
    np.testing.assert_array_equal(gaussian_blur(img, 0.0), img)
    # the detector's blur sigma in pixels is FWHM / 2.3548 / pitch: a point's FWHM after blurring
    delta = np.zeros((1, 201))
    delta[0, 100] = 1.0
    prof = gaussian_blur(np.repeat(delta, 3, 0), 8.0 / FWHM_PER_SIGMA)[1]
    above = np.nonzero(prof >= prof.max() / 2)[0]
    assert above[-1] - above[0] + 1 == pytest.approx(8.0, abs=1.0)


def test_scatter_adds_exactly_its_stated_fraction() -> None:
    rng = np.random.default_rng(2)
    p = rng.uniform(0.2, 4.0, (32, 32))
    p[:4] = 0.0  # unattenuated field beside the body: it scatters nothing
    primary = np.exp(-p)
    for f in (0.05, 0.1, 1.0):
        out = detect(p, off(scatter_fraction=f, scatter_sigma_mm=20.0), pixel_mm=2.0, rng=None)
        scatter = np.exp(-out) - primary
        assert scatter.mean() == pytest.approx(f * (p * primary).mean(), rel=1e-10)  # the blur conserves it
        assert np.all(out[4:] < p[4:])  # scatter only adds photons: every line integral drops
    # behind a uniform slab of line integral p0 the scatter-to-primary ratio is exactly f·p0
    for p0 in (0.5, 2.0, 5.0):
        out = detect(np.full((24, 24), p0), off(scatter_fraction=0.1), pixel_mm=2.0, rng=None)
        np.testing.assert_allclose(out, p0 - math.log1p(0.1 * p0), atol=1e-12)
    np.testing.assert_allclose(detect(p, off(scatter_fraction=0.0), 2.0, None), p, atol=1e-12)
    assert np.all(detect(np.zeros((8, 8)), off(scatter_fraction=1.0), 2.0, None) == 0)  # air: no scatter


def test_supersampling_averages_intensities() -> None:
    rng = np.random.default_rng(3)
    p = rng.uniform(0.0, 5.0, (16, 16))
    out = detect(p, off(supersample=2), pixel_mm=4.0, rng=None)
    want = -np.log(np.exp(-p).reshape(8, 2, 8, 2).mean(axis=(1, 3)))
    np.testing.assert_allclose(out, want, atol=1e-12)
    assert not np.allclose(out, bin_pixels(p, 2), atol=1e-3)  # ≠ averaging line integrals (partial volume)


def test_detect_is_the_post_render_callable_and_corrupt_views_uses_it_per_view() -> None:
    """One source: the honest views' detect() = detector_postprocess at the model's supersampling;
    the train-time augmentation (corrupt_views) = detector_postprocess at 1 ray/pixel, seeded per view."""
    rng = np.random.default_rng(5)
    p = rng.uniform(0.0, 4.0, (16, 16))
    m = model(supersample=2, blur_fwhm_mm=3.0)
    np.testing.assert_array_equal(detect(p, m, 6.0, noise_rng(1, "v", "frontal")),
                                  detector_postprocess(p, m, 6.0, noise_rng(1, "v", "frontal"), supersample=2))
    m1 = model(supersample=1)
    views = {v: rng.uniform(0.0, 4.0, (8, 8)).astype(np.float32) for v in VIEWS}
    got = corrupt_views(views, "tr_x", 6.0, m1)
    for v in VIEWS:
        want = detector_postprocess(views[v], m1, 6.0, noise_rng(m1.seed, "tr_x", v), supersample=1)
        np.testing.assert_array_equal(got[v], want.astype(np.float32))
        assert got[v].dtype == np.float32 and got[v].shape == (8, 8)
    assert not np.array_equal(got["frontal"], corrupt_views(views, "tr_y", 6.0, m1)["frontal"])
    # a detector that adds nothing returns the clean line integrals (up to the reading clamp)
    np.testing.assert_allclose(corrupt_views(views, "tr_x", 6.0, off())["lateral"], views["lateral"], atol=1e-5)


def test_noise_is_seeded_per_volume_and_view() -> None:
    vol = phantom()
    m = model(step_fraction=1.0)
    a = honest_views(vol.hu, vol.affine, "case_a", DRR, 0.02, m)
    again = honest_views(vol.hu, vol.affine, "case_a", DRR, 0.02, m)
    b = honest_views(vol.hu, vol.affine, "case_b", DRR, 0.02, m)
    other_seed = honest_views(vol.hu, vol.affine, "case_a", DRR, 0.02, model(step_fraction=1.0, seed=7))
    np.testing.assert_array_equal(a[0], again[0])
    np.testing.assert_array_equal(a[1], again[1])
    assert not np.array_equal(a[0], b[0]) and not np.array_equal(a[0], other_seed[0])
    assert not np.array_equal(noise_rng(0, "x", "frontal").random(4), noise_rng(0, "x", "lateral").random(4))


def test_honest_views_differ_from_the_clean_drrs_by_a_bounded_amount() -> None:
    vol = phantom()
    s = PreprocessSettings(grids=(StageGrid(1, 16, FOV),), drr=DRR.model_dump(mode="json"), mu_water=0.02)
    centre = vol.center_world
    cf, cl, cgeo = render_xrays(stage_hu(vol, s.finest), s.finest.affine(centre), s)
    hf, hl, hgeo = honest_views(vol.hu, vol.affine, "v", DRR, 0.02, model())
    nf, nl, _ = honest_views(vol.hu, vol.affine, "v", DRR, 0.02, off())
    for view in VIEWS:  # one geometry: the same source, detector, rays
        for key in ("source", "det_center", "isocenter", "u_axis", "v_axis"):
            assert hgeo[view][key] == pytest.approx(cgeo[view][key], abs=1e-6), (view, key)
    clean = np.stack([cf, cl])
    rms = lambda d: float(np.sqrt(np.mean(np.square(d))))  # noqa: E731
    renderer_gap = rms(np.stack([nf, nl]) - clean)  # finest grid + independent renderer alone
    detector_gap = rms(np.stack([hf, hl]) - clean)
    assert 0.005 < renderer_gap < 0.2 * float(clean.max())
    assert renderer_gap < detector_gap < 0.25 * float(clean.max())


@pytest.mark.parametrize("kw", [
    {"photons_per_pixel": -1.0}, {"blur_fwhm_mm": -0.1}, {"scatter_fraction": -0.5}, {"scatter_sigma_mm": 0.0},
    {"step_fraction": 0.0}, {"step_fraction": 1.5}, {"supersample": 0}, {"supersample": 2.5}, {"seed": -1},
    {"min_intensity_fraction": 0.0}, {"photons_per_pixel": float("nan")},
])
def test_bad_detector_model_is_a_config_error(kw: dict) -> None:
    with pytest.raises(ConfigError, match="eval.detector"):
        model(**kw)


@pytest.mark.parametrize("ev", [
    {"protocol": "dirty"}, {"detector": {"scatter_sigma_mm": 0}}, {"detector": {"photons_per_pixel": -5}},
    {"detector": {"supersample": 9}}, {"detector": {"grid": True}},
])
def test_bad_eval_protocol_params_are_config_errors(ev: dict) -> None:
    with pytest.raises(ConfigError):
        params_from_dict({"eval": ev})
