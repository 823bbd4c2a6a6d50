"""benchmarks/bench_stage3.py and bench_budget.py: the arithmetic their reports rest on (no training).

Known answers: the "stage 2 upsampled" baseline keeps a constant volume constant and a volume
that is linear along an axis in the networks' units linear (trilinear, ``align_corners=False``,
interior voxels), and it is computed in the networks' units (a ramp linear in HU but crossing a
knot of the piecewise-linear HU map is NOT reproduced exactly); the trivial-predictor losses are
the MSEs they claim on a hand-made processed folder; a val curve is interpolated linearly; a run
stopped for time is reported from its log with the steps it reached.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))


@pytest.fixture(scope="module")
def params():  # noqa: ANN201
    from xct_core.config import load_params

    return load_params(REPO / "params.yaml")


def test_upsampled_baseline_keeps_constants_and_unit_ramps(params) -> None:  # noqa: ANN001
    from bench_stage3 import upsample_hu

    net = params.hu.net_map()
    const = np.full((8, 8, 8), 40.0, dtype=np.float32)
    np.testing.assert_allclose(upsample_hu(params, const, 16), 40.0, atol=1e-3)
    # linear along axis 0 in the networks' units: the interior of the upsampled volume is the same line
    i = np.arange(8, dtype=np.float32)
    unit = np.broadcast_to((-0.5 + 0.05 * i)[:, None, None], (8, 8, 8)).copy()
    up = net.forward(upsample_hu(params, net.inverse(unit), 16))
    centres = (np.arange(16) + 0.5) / 2 - 0.5  # coarse-grid coordinate of each fine voxel centre
    expect = -0.5 + 0.05 * centres
    np.testing.assert_allclose(up[1:-1, 4, 4], expect[1:-1], atol=1e-5)


def test_upsampled_baseline_is_in_network_units_not_hu(params) -> None:  # noqa: ANN001
    """Two neighbours on either side of a knot of the HU map: their midpoint in HU differs from the
    midpoint in the networks' units, and the benchmark must give the latter (what stage 3 is fed)."""
    from bench_stage3 import upsample_hu

    net = params.hu.net_map()
    lo, hi = -1000.0, 100.0
    vol = np.full((2, 2, 2), lo, dtype=np.float32)
    vol[1] = hi
    up = upsample_hu(params, vol, 4)[1:3, 0, 0]  # the two fine voxels between the coarse centres
    w = np.array([0.75, 0.25])  # trilinear weights of the lower neighbour at the fine centres
    unit_mid = net.inverse(w * net.forward(np.float32(lo)) + (1 - w) * net.forward(np.float32(hi)))
    hu_mid = w * lo + (1 - w) * hi
    np.testing.assert_allclose(up, unit_mid, rtol=1e-5, atol=1e-3)
    assert np.abs(unit_mid - hu_mid).max() > 1.0  # the test can tell the two apart


def test_reference_losses_are_the_mses_they_claim(params, tmp_path: Path) -> None:  # noqa: ANN001
    """Volumes constant per volume: passing the condition through is exact (0), zeros give the mean
    square in units, the train mean gives the variance across volumes."""
    from bench_stage3 import reference_losses

    net = params.hu.net_map()
    hus = [-200.0, 0.0, 150.0]
    ids = [f"v{i}" for i in range(len(hus))]
    (tmp_path / "manifest.json").write_text(json.dumps({"format_version": 1, "items": {}, "stages": {}, "splits": {"train": ids}}))
    for k in range(2, params.n_stages + 1):
        size = params.stage(k).size
        (tmp_path / f"stage{k}").mkdir()
        for vid, hu in zip(ids, hus):
            np.save(tmp_path / f"stage{k}" / f"{vid}.npy", np.full((size,) * 3, hu, dtype=np.int16))
    out = reference_losses(params, tmp_path)
    u = np.array([float(net.forward(np.float32(h))) for h in hus])
    for k in range(2, params.n_stages + 1):
        r = out[f"stage{k}"]
        assert r["pass_condition_through"] == pytest.approx(0.0, abs=1e-10)
        assert r["zeros"] == pytest.approx(float((u ** 2).mean()), rel=1e-5)
        assert r["train_mean"] == pytest.approx(float(u.var()), rel=1e-4)
        assert r["volumes"] == 3


def test_val_curve_interpolation() -> None:
    from bench_budget import at_step

    pts = [{"step": 100, "x": 20.0}, {"step": 200, "x": 22.0}, {"step": 400, "x": 23.0}]
    assert at_step(pts, 150, "x") == pytest.approx(21.0)
    assert at_step(pts, 300, "x") == pytest.approx(22.5)
    assert at_step(pts, 400, "x") == pytest.approx(23.0)
    assert at_step(pts, 50, "x") is None and at_step(pts, 500, "x") is None


def test_a_run_stopped_for_time_is_reported_from_its_log(tmp_path: Path) -> None:
    from bench_budget import record_from_log

    rows = [{"step": s, "train/step_time_s": t, "train/samples_per_s": 2 / t, "loadavg_1min": 3.0}
            for s, t in ((5, 9.0), (10, 1.0), (15, 3.0), (20, 2.0))]
    rows.insert(2, {"step": 10, "val/psnr_window_db": 20.0, "val/direct_psnr_window_db": 21.0, "val/time_s": 7.0})
    (tmp_path / "train_log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    rec = record_from_log(tmp_path, planned=700)
    assert rec["stopped_at"] == 20 and rec["planned_steps"] == 700
    assert rec["step_time_s_median"] == pytest.approx(2.0)  # the first (warm-up) window is left out
    assert rec["val"] == [{"step": 10, "val/psnr_window_db": 20.0, "val/direct_psnr_window_db": 21.0, "val/time_s": 7.0}]
    assert rec["val_time_s"] == pytest.approx(7.0)
