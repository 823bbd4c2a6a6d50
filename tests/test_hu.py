"""HU windows: forward to [-1, 1], inverse back to HU, named windows from params."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from xct_core.errors import ConfigError
from xct_core.hu import DEFAULT_WINDOW, WINDOWS, get_window


def test_default_is_soft_tissue_minus200_200() -> None:
    w = WINDOWS[DEFAULT_WINDOW]
    assert (w.lo, w.hi) == (-200.0, 200.0)
    assert w.level == 0.0 and w.width == 400.0


@pytest.mark.parametrize("name", sorted(WINDOWS))
def test_forward_maps_edges_and_inverse_round_trips(name: str) -> None:
    w = WINDOWS[name]
    hu = np.linspace(w.lo, w.hi, 101)
    x = w.forward(hu)
    assert x[0] == pytest.approx(-1.0) and x[-1] == pytest.approx(1.0)
    assert x[50] == pytest.approx(0.0, abs=1e-6)  # the level maps to 0
    np.testing.assert_allclose(w.inverse(x), hu, atol=1e-3)


def test_forward_clips_outside_window() -> None:
    w = get_window("soft_tissue")
    x = w.forward(np.array([-1000.0, -200.0, 0.0, 200.0, 3000.0]))
    np.testing.assert_allclose(x, [-1, -1, 0, 1, 1])
    np.testing.assert_allclose(w.inverse(x), [-200, -200, 0, 200, 200])


def test_torch_forward_keeps_gradient_inside_window() -> None:
    w = get_window("wide")
    hu = torch.tensor([-2000.0, 0.0, 512.0], requires_grad=True)
    w.forward(hu).sum().backward()
    np.testing.assert_allclose(hu.grad.numpy(), [0.0, 2 / 2048, 2 / 2048], rtol=1e-6)


def test_named_windows_match_radiology_level_width() -> None:
    assert (WINDOWS["wide"].lo, WINDOWS["wide"].hi) == (-1024, 1024)
    assert WINDOWS["lung"].level == -600 and WINDOWS["lung"].width == 1500
    assert WINDOWS["bone"].level == 400 and WINDOWS["bone"].width == 1800


def test_custom_and_unknown_windows() -> None:
    w = get_window([-100, 300])
    assert w.width == 400 and w.hu_per_unit() == 200
    with pytest.raises(ConfigError, match="unknown HU window 'softtissue'"):
        get_window("softtissue")
    with pytest.raises(ConfigError, match="lo < hi"):
        get_window([100, 100])


def test_output_maps_are_monotone_invert_and_give_soft_tissue_more_of_the_range():
    import torch

    from xct_core.hu import OUTPUT_MAPS, HUMap

    hu = np.linspace(-1024, 1024, 257)
    for m in (*OUTPUT_MAPS.values(), HUMap.from_window(get_window("soft_tissue"))):
        y = m.forward(hu)
        assert np.all(np.diff(y) >= 0) and y.min() >= -1 and y.max() <= 1
        inside = (hu >= m.lo) & (hu <= m.hi)
        np.testing.assert_allclose(m.inverse(y)[inside], hu[inside], atol=1e-6)
        np.testing.assert_allclose(m.forward(torch.from_numpy(hu)).numpy(), y, atol=1e-9)
    soft = OUTPUT_MAPS["soft60"]
    assert soft.lo == -1024 and soft.hi == 1024  # a CT: air, lung and bone are representable
    assert soft.forward(np.array([-200.0, 200.0])).tolist() == [-0.6, 0.6]  # soft tissue: 60 % of [-1, 1]
    assert soft.hu_per_unit(0.0) == pytest.approx(400 / 1.2) and soft.hu_per_unit(-600.0) == pytest.approx(824 / 0.4)
    w = get_window("soft_tissue")
    np.testing.assert_allclose(HUMap.from_window(w).forward(hu), w.forward(hu), atol=1e-7)
