"""The information ceiling (xct_core/ceiling.py) and the generator's re-draw option."""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

import numpy as np
import pytest

from xct_core.ceiling import (
    cached_stage_ceiling,
    ceiling_key,
    redraw_std,
    stage_ceiling,
    two_draw_bound_db,
    xray_change,
)
from xct_core.config import Params, params_from_dict
from xct_core.io import CTVolume
from xct_core.gates import achievable_fraction
from xct_core.phantoms import Label, synth_phantom
from xct_core.preprocess import stage_hu


def test_default_phantom_is_bit_identical_to_before_the_redraw_option() -> None:
    """The sha256 of phantom 0 of seed 0 at 32³ (int16 HU as saved to NIfTI), recorded from
    main before the re-draw option existed: the default output did not move."""
    ph = synth_phantom(0, 0, 32, 12.8)
    assert hashlib.sha256(np.rint(ph.hu).astype(np.int16).tobytes()).hexdigest() == (
        "fb93259636e19b6c11b2ab09bfffe32dd4775d6126d7d3c1b973689964bf8c33")
    assert np.array_equal(ph.hu, synth_phantom(0, 0, 32, 12.8, redraw=None).hu)


def test_redraw_changes_only_the_non_identifiable_parts() -> None:
    a = synth_phantom(0, 1, 32, 12.8, redraw=[1, 1, 0])
    b = synth_phantom(0, 1, 32, 12.8, redraw=[1, 1, 1])
    again = synth_phantom(0, 1, 32, 12.8, redraw=[1, 1, 0])
    assert np.array_equal(a.hu, again.hu)  # seeded
    assert not np.array_equal(a.hu, b.hu)
    assert a.contrast == b.contrast
    changed = a.labels != b.labels
    allowed = {int(Label.LUNG), int(Label.LUNG_VESSEL), int(Label.FAT), int(Label.BOWEL)}
    assert changed.any()
    assert set(np.unique(a.labels[changed])) | set(np.unique(b.labels[changed])) <= allowed
    for lab in (Label.VERTEBRA, Label.LIVER, Label.AIR):  # bones, organs, outline: untouched
        assert np.array_equal(a.labels == lab, b.labels == lab)


def test_two_draw_bound_is_the_mmse_of_an_exact_posterior_toy() -> None:
    """x = r + z with z invisible (z ~ N(0, σ²) given the data): the best estimate is r, its
    MSE σ²; two exact posterior draws differ by 2σ² in MSE, so PSNR(A, B) + 3.01 dB is the PSNR
    of the posterior mean."""
    rng = np.random.default_rng(0)
    n, sigma = 400_000, 0.07
    r = rng.uniform(-1, 1, n)
    x = r + sigma * rng.standard_normal(n)
    a, b = r + sigma * rng.standard_normal(n), r + sigma * rng.standard_normal(n)

    def psnr(p: np.ndarray, q: np.ndarray) -> float:
        return 10 * math.log10(4.0 / float(((p - q) ** 2).mean()))

    assert two_draw_bound_db(psnr(a, b)) == pytest.approx(psnr(r, x), abs=0.02)
    assert two_draw_bound_db(psnr(a, b)) - psnr(a, b) == pytest.approx(3.0103, abs=1e-4)
    # no estimator beats it: e.g. a single draw, or a shrunk mean
    assert psnr(a, x) < two_draw_bound_db(psnr(a, b)) and psnr(0.9 * r, x) < two_draw_bound_db(psnr(a, b))


def test_achievable_fraction() -> None:
    assert achievable_fraction(25.0, 15.0, 35.0) == pytest.approx(0.5)
    assert achievable_fraction(15.0, 15.0, 35.0) == 0.0 and achievable_fraction(35.0, 15.0, 35.0) == 1.0
    assert math.isnan(achievable_fraction(25.0, 15.0, math.nan))
    assert math.isnan(achievable_fraction(25.0, 30.0, 30.0))  # no gain possible


def _small() -> Params:
    data = Params().model_dump(mode="json")
    data["data"]["synth"].update(size=32, spacing_mm=12.8)
    return params_from_dict(data)


def test_stage_ceiling_on_small_phantoms_is_cached_by_its_inputs(tmp_path: Path) -> None:
    p = _small()
    c = cached_stage_ceiling(p, 1, tmp_path, phantoms=1, seed=1)
    assert "cached" not in c
    m = c["metrics"]["psnr_window_db"]
    assert c["known"] and len(m["per_phantom_db"]) == 1
    assert m["ceiling_db"] == pytest.approx(m["two_draw_db"] + 10 * math.log10(2), abs=1e-9)  # one phantom
    body = c["metrics"]["psnr_window_body_db"]["ceiling_db"]
    assert body < m["ceiling_db"]  # the air outside the body is identical in both re-draws
    files = sorted(f.name for f in tmp_path.iterdir())
    assert len(files) == p.n_stages and all(f.endswith(".json") for f in files)  # every stage from one synthesis
    hit = cached_stage_ceiling(p, 1, tmp_path, phantoms=1, seed=1)
    assert hit["cached"] and hit["metrics"] == c["metrics"]
    # another generator setting or grid is another key (never a stale hit)
    data = p.model_dump(mode="json")
    data["data"]["synth"]["noise_hu"] = 30.0
    assert ceiling_key(params_from_dict(data), 1, 1, 1) != ceiling_key(p, 1, 1, 1)
    assert ceiling_key(p, 2, 1, 1) != ceiling_key(p, 1, 1, 1) and ceiling_key(p, 1, 2, 1) != ceiling_key(p, 1, 1, 1)
    data = p.model_dump(mode="json")
    data["data"]["synth"]["n"] = 7  # the data-set size does not shape the ceiling
    assert ceiling_key(params_from_dict(data), 1, 1, 1) == ceiling_key(p, 1, 1, 1)
    # a damaged cache file is recomputed, not trusted
    path = tmp_path / f"stage1-{ceiling_key(p, 1, 1, 1)}.json"
    path.write_text("{not json")
    again = cached_stage_ceiling(p, 1, tmp_path, phantoms=1, seed=1)
    assert "cached" not in again and again["metrics"] == c["metrics"]  # deterministic
    assert json.loads(path.read_text())["key"] == ceiling_key(p, 1, 1, 1)
    assert stage_ceiling(p, 1, phantoms=1, seed=1)["metrics"] == c["metrics"]


def test_redraw_barely_changes_the_xrays() -> None:
    """The re-drawn parts move the line integrals by well under a few percent of their range."""
    ch = xray_change(_small(), phantoms=1)
    for view in ("frontal", "lateral"):
        assert 0.0 < ch[f"{view}_mean_pct"] < 3.0
        assert ch[f"{view}_mean_pct"] <= ch[f"{view}_rms_pct"] <= ch[f"{view}_max_pct"]


def _on_stage(p: Params, index: int, k: int, redraw: list[int] | None) -> np.ndarray:
    """Phantom ``index`` (optionally re-drawn) on stage ``k``'s grid, as preprocess resamples it."""
    s, st = p.data.synth, p.stage(k)
    from xct_core.grid import StageGrid

    ph = synth_phantom(s.seed, index, s.size, s.spacing_mm, s.contrast_fraction, s.noise_hu, redraw=redraw)
    vol = CTVolume(hu=ph.hu, affine=ph.affine, source="test")
    return stage_hu(vol, StageGrid(k, int(st.size), float(st.fov_mm)), float(p.preprocess.fill_hu),
                    bool(p.preprocess.antialias)).astype(np.float64)


def test_redraw_std_is_zero_where_nothing_is_redrawn_and_positive_in_redrawn_tissue() -> None:
    """Without image noise the generator re-draws only tissue inside the body (fat/bowel field,
    texture, vessels): the std over re-draws is exactly 0 in the air around the body and > 0 in
    almost every body voxel; seeded; two draws give |a − b|/√2 of the ceiling's own pair."""
    from scipy import ndimage

    data = _small().model_dump(mode="json")
    data["data"]["synth"]["noise_hu"] = 0.0
    p = params_from_dict(data)
    sd = redraw_std(p, 1, [1, 2], draws=4, seed=1)
    for k in (1, 2):
        y = _on_stage(p, 1, k, None)
        assert sd[k].shape == y.shape and sd[k].dtype == np.float32
        air = ~ndimage.binary_dilation(y > -990.0, iterations=2)  # air at least 2 voxels from any tissue
        assert air.sum() > 0.2 * y.size and float(np.abs(sd[k][air]).max()) == 0.0
        body = y > -500.0
        assert (sd[k][body] > 0).mean() > 0.95 and float(sd[k][body].mean()) > 1.0
    again = redraw_std(p, 1, [1], draws=4, seed=1)[1]
    assert np.array_equal(again, sd[1])  # deterministic for a seed
    assert not np.array_equal(redraw_std(p, 1, [1], draws=4, seed=2)[1], sd[1])  # the seed matters
    # N = 2: the sample std (ddof 1) of two draws is |a − b| / √2 — the ceiling's pair [seed, index, 0/1]
    a, b = (_on_stage(p, 1, 1, [1, 1, d]) for d in (0, 1))
    two = redraw_std(p, 1, [1], draws=2, seed=1)[1]
    np.testing.assert_allclose(two, np.abs(a - b) / math.sqrt(2.0), rtol=1e-6, atol=1e-5)
    assert float(two.max()) > 0
    with pytest.raises(ValueError, match="draws"):
        redraw_std(p, 1, [1], draws=1)


def test_bench_redraw_compare_is_the_stated_ratios_and_correlations() -> None:
    """benchmarks/bench_redraw.py's per-case numbers on maps with known answers: a model std
    twice the re-draw std gives ratio 2 and rank/linear correlation 1; an error three times the
    re-draw std gives an irreducible MSE share of 1/9; voxels outside the mask do not count."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("bench_redraw", Path(__file__).resolve().parents[1]
                                                  / "benchmarks" / "bench_redraw.py")
    assert spec is not None and spec.loader is not None
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    rng = np.random.default_rng(0)
    rd = rng.uniform(1.0, 10.0, (8, 8, 8))
    mask = np.ones(rd.shape, dtype=bool)
    mask[0] = False
    model, err = 2.0 * rd, 3.0 * rd
    model[0], err[0] = 1e6, 0.0  # outside the mask: ignored
    c = bench.compare(model, rd, err, mask)
    assert c["ratio_mean"] == pytest.approx(2.0) and c["ratio_rms"] == pytest.approx(2.0)
    assert c["spearman_std"] == pytest.approx(1.0) and c["pearson_std"] == pytest.approx(1.0)
    assert c["spearman_abs_err"] == pytest.approx(1.0) and c["irreducible_mse_share"] == pytest.approx(1 / 9)
    assert c["redraw_std_body_mean_hu"] == pytest.approx(float(rd[mask].mean()))
    anti = bench.compare(11.0 - rd, rd, err, mask)  # reversed ranks
    assert anti["spearman_std"] == pytest.approx(-1.0)
    assert bench.phantom_index("phantom_0042") == 42
    with pytest.raises(SystemExit, match="not a generator phantom"):
        bench.phantom_index("chest_01")
