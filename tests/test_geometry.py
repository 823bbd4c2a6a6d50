"""Projection geometry: view axes from the affine, rays through pixel centres, projection,
magnification, JSON round trip and input validation (analytic checks only)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from xct_core.config import DRRParams
from xct_core.errors import ConfigError
from xct_core.geometry import PlacedGeometry, ProjectionGeometry, voxel_centers_world

R, A, S = np.eye(3)
SHAPE = (20, 24, 16)


def _affine(spacing=(2.0, 1.5, 2.5), origin=(-17.0, 40.0, 5.0)) -> np.ndarray:
    aff = np.diag([*spacing, 1.0])
    aff[:3, 3] = origin
    return aff


@pytest.mark.parametrize("kind", ["parallel", "cone"])
def test_view_axes_and_source_side(kind: str) -> None:
    aff = _affine()
    iso = aff[:3, :3] @ ((np.array(SHAPE) - 1) / 2) + aff[:3, 3]
    fr = ProjectionGeometry("frontal", kind, 17, 2.0, sdd=900.0, sod=600.0).place(aff, SHAPE)
    la = ProjectionGeometry("lateral", kind, 17, 2.0, sdd=900.0, sod=600.0).place(aff, SHAPE)
    np.testing.assert_allclose(fr.isocenter, iso)
    # frontal: beam anterior → posterior, source anterior, columns towards the patient's left
    np.testing.assert_allclose(fr.beam, -A)
    np.testing.assert_allclose(fr.u_axis, -R)
    np.testing.assert_allclose(fr.v_axis, -S)
    assert fr.source[1] - iso[1] == pytest.approx(600.0)
    assert iso[1] - fr.det_center[1] == pytest.approx(300.0)
    # lateral: beam left → right, source on the patient's left, columns towards posterior
    np.testing.assert_allclose(la.beam, R)
    np.testing.assert_allclose(la.u_axis, -A)
    np.testing.assert_allclose(la.v_axis, -S)
    assert iso[0] - la.source[0] == pytest.approx(600.0)
    for g in (fr, la):  # camera frame: beam = u × v
        np.testing.assert_allclose(np.cross(g.u_axis, g.v_axis), g.beam)


def test_axes_come_from_the_affine_not_array_order() -> None:
    """An LPS-ordered grid (axes flipped) of the same world box gives the same world geometry."""
    ras = _affine()
    lps = ras.copy()
    lps[:3, :3] = ras[:3, :3] @ np.diag([-1.0, -1.0, 1.0])
    lps[:3, 3] = ras[:3, :3] @ ((np.array(SHAPE) - 1) * np.array([1, 1, 0])) + ras[:3, 3]
    g = ProjectionGeometry("frontal", "cone", 9, 2.0, 900.0, 600.0)
    a, b = g.place(ras, SHAPE), g.place(lps, SHAPE)
    np.testing.assert_allclose(a.isocenter, b.isocenter, atol=1e-9)
    assert a.beam == b.beam and a.source == pytest.approx(b.source)


@pytest.mark.parametrize("kind", ["parallel", "cone"])
@pytest.mark.parametrize("view", ["frontal", "lateral"])
def test_rays_pass_through_pixel_centres_and_project_back(view: str, kind: str) -> None:
    pg = ProjectionGeometry(view, kind, 7, 3.0, 900.0, 600.0).place(_affine(), SHAPE)
    o, d = pg.pixel_rays(torch.float64)
    assert o.shape == d.shape == (7, 7, 3)
    torch.testing.assert_close(d.norm(dim=-1), torch.ones(7, 7, dtype=torch.float64))
    cols, rows = torch.meshgrid(torch.arange(7.0, dtype=torch.float64), torch.arange(7.0, dtype=torch.float64), indexing="xy")
    expected = torch.stack([cols, rows], -1)
    for t in (150.0, 600.0, 820.0):  # any point along a ray projects onto its pixel
        torch.testing.assert_close(pg.project(o + t * d), expected, atol=1e-9, rtol=0)
    # the ray meets its pixel centre at t = sdd / (dir · beam)
    beam = torch.tensor(pg.beam, dtype=torch.float64)
    t_hit = pg.sdd / (d @ beam)
    torch.testing.assert_close(o + t_hit[..., None] * d, pg.pixel_centers(torch.float64))


def test_pixel_layout_on_detector() -> None:
    pg = ProjectionGeometry("frontal", "cone", 4, 2.5, 1500.0, 1000.0).place(_affine(), SHAPE)
    q = pg.pixel_centers(torch.float64)
    # neighbours 2.5 mm apart along u (columns) and v (rows); centre of the 4 middle pixels = det centre
    torch.testing.assert_close(q[0, 1] - q[0, 0], 2.5 * torch.tensor(pg.u_axis, dtype=torch.float64))
    torch.testing.assert_close(q[1, 0] - q[0, 0], 2.5 * torch.tensor(pg.v_axis, dtype=torch.float64))
    torch.testing.assert_close(q[1:3, 1:3].reshape(-1, 3).mean(0), torch.tensor(pg.det_center, dtype=torch.float64))


def test_cone_magnification_and_depth() -> None:
    pg = ProjectionGeometry("frontal", "cone", 101, 1.0, 1500.0, 1000.0).place(_affine(), SHAPE)
    iso = torch.tensor(pg.isocenter, dtype=torch.float64)
    centre = (101 - 1) / 2
    # 10 mm towards the patient's left at the isocentre → +10·1.5 px columns
    cr = pg.project(iso + torch.tensor([-10.0, 0.0, 0.0], dtype=torch.float64))
    assert cr[0].item() == pytest.approx(centre + 15.0) and cr[1].item() == pytest.approx(centre)
    # 100 mm closer to the source (anterior): magnification 1500 / 900
    p = iso + torch.tensor([-10.0, 100.0, 0.0], dtype=torch.float64)
    assert pg.project(p)[0].item() == pytest.approx(centre + 10.0 * 1500.0 / 900.0)
    assert pg.depth(p).item() == pytest.approx(900.0)
    assert pg.magnification == pytest.approx(1.5)
    # parallel: no magnification
    pp = ProjectionGeometry("frontal", "parallel", 101, 1.0).place(_affine(), SHAPE)
    assert pp.project(p)[0].item() == pytest.approx(centre + 10.0)


def test_project_normalized_matches_grid_sample() -> None:
    """Sampling an image at the normalised projection of each pixel's ray returns that pixel."""
    pg = ProjectionGeometry("lateral", "cone", 6, 2.0, 900.0, 600.0).place(_affine(), SHAPE)
    img = torch.arange(36, dtype=torch.float64).reshape(1, 1, 6, 6)
    o, d = pg.pixel_rays(torch.float64)
    grid = pg.project_normalized(o + 500.0 * d)  # points inside the patient, on each ray
    out = F.grid_sample(img, grid[None], align_corners=False)
    torch.testing.assert_close(out, img)


def test_voxel_centers_world() -> None:
    aff = _affine()
    c = voxel_centers_world(aff, SHAPE, dtype=torch.float64)
    assert c.shape == (*SHAPE, 3)
    ijk = np.array([3, 7, 11])
    np.testing.assert_allclose(c[3, 7, 11].numpy(), aff[:3, :3] @ ijk + aff[:3, 3])


def test_json_round_trip() -> None:
    pg = ProjectionGeometry("lateral", "cone", 64, 1.25, 1200.0, 800.0).place(_affine(), SHAPE)
    d = json.loads(json.dumps(pg.to_json()))
    assert d["source_side"] == "left" and d["magnification"] == pytest.approx(1.5)
    assert PlacedGeometry.from_json(d) == pg
    with pytest.raises(ConfigError, match="missing key"):
        PlacedGeometry.from_json({k: v for k, v in d.items() if k != "u_axis"})


def test_from_params_and_overrides() -> None:
    p = DRRParams(geometry="parallel", pixels=96, pixel_mm=2.0, sdd=1400.0, sod=900.0)
    g = ProjectionGeometry.from_params(p, "frontal")
    assert (g.kind, g.pixels, g.pixel_mm, g.sdd, g.sod) == ("parallel", 96, 2.0, 1400.0, 900.0)
    g2 = ProjectionGeometry.from_params(p, "lateral", kind="cone", pixels=None)
    assert (g2.view, g2.kind, g2.pixels) == ("lateral", "cone", 96)


@pytest.mark.parametrize(
    "kw, msg",
    [
        ({"view": "oblique"}, "view must be one of"),
        ({"kind": "fan"}, "kind must be one of"),
        ({"pixels": 0}, "pixels must be a positive integer"),
        ({"pixel_mm": -1.0}, "pixel_mm must be a positive"),
        ({"sod": 1500.0}, "sod .* must be smaller than sdd"),
    ],
)
def test_invalid_geometry_is_a_config_error(kw: dict, msg: str) -> None:
    args = {"view": "frontal", "kind": "cone", "pixels": 8, "pixel_mm": 1.0, "sdd": 1500.0, "sod": 1000.0} | kw
    with pytest.raises(ConfigError, match=msg):
        ProjectionGeometry(**args)


def test_cone_source_inside_volume_is_rejected() -> None:
    with pytest.raises(ConfigError, match="inside the volume"):
        ProjectionGeometry("frontal", "cone", 8, 1.0, 30.0, 10.0).place(_affine(), SHAPE)
