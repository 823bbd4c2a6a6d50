"""Rasterising analytic anatomy onto a voxel grid: the canonical grid, painting helpers
(ellipsoids, tubes along splines), smooth texture fields and the whole-body rasteriser."""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING

import numpy as np

from xct_core.phantoms.labels import Label
from xct_core.phantoms.shapes import (
    _TEX_H,
    _catmull_rom,
    _ellipsoid_box,
    _ellipsoid_q,
    _frame,
    _unit,
)

if TYPE_CHECKING:  # pragma: no cover - typing only (anatomy imports shapes, not raster)
    from xct_core.phantoms.anatomy import Anatomy

# ----------------------------------------------------------------------------- grid


def canonical_affine(size: int, spacing_mm: float) -> np.ndarray:
    """RAS+ affine of an isotropic ``size``³ grid centred at the world origin (mm)."""
    s = float(spacing_mm)
    c = -(size - 1) / 2.0 * s
    return np.array(
        [[s, 0.0, 0.0, c], [0.0, s, 0.0, c], [0.0, 0.0, s, c], [0.0, 0.0, 0.0, 1.0]], dtype=np.float64
    )


class _Grid:
    """Voxel-centre world coordinates of an isotropic grid centred at the origin."""

    def __init__(self, size: int, spacing: float):
        self.size = size
        self.spacing = float(spacing)
        self.c = ((np.arange(size, dtype=np.float64) - (size - 1) / 2.0) * spacing).astype(np.float32)
        self.c0 = float(self.c[0])

    def _range(self, lo: float, hi: float) -> slice:
        i0 = max(0, int(math.ceil((lo - self.c0) / self.spacing)))
        i1 = min(self.size, int(math.floor((hi - self.c0) / self.spacing)) + 1)
        return slice(i0, max(i0, i1))

    def box(self, lo: Sequence[float], hi: Sequence[float]):
        """Index slices and broadcastable coordinates (X, Y, Z) of a world box, or None if empty."""
        sl = tuple(self._range(a, b) for a, b in zip(lo, hi))
        if any(s.stop <= s.start for s in sl):
            return None
        x = self.c[sl[0]][:, None, None]
        y = self.c[sl[1]][None, :, None]
        z = self.c[sl[2]][None, None, :]
        return sl, x, y, z

    def full(self):
        return self.box((-1e9,) * 3, (1e9,) * 3)


def _lut(labels: Sequence[int]) -> np.ndarray:
    t = np.zeros(256, dtype=bool)
    t[list(labels)] = True
    return t


def _paint(lab: np.ndarray, sl, mask: np.ndarray, value: Label, allowed: np.ndarray | None = None) -> None:
    """``lab[sl][mask] = value``, optionally only where the current label is in ``allowed`` (a LUT)."""
    sub = lab[sl]
    m = np.broadcast_to(mask, sub.shape)
    if allowed is not None:
        m = m & allowed[sub]
    sub[m] = value


_SPLAT_CHUNK = 1 << 21


def _segment_voxels(grid: _Grid, segs: np.ndarray, pad: float) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """Voxels near round-capped segments, vectorised over all segments.

    ``segs`` [N, 8]: (x0, y0, z0, x1, y1, z1, r0, r1) in mm, radius varying linearly.
    Yields chunks of ``(flat voxel index, distance to the segment axis, local radius)`` for
    every voxel in each segment's bounding box (grown by ``pad``); a voxel near several
    segments appears once per segment.
    """
    segs = np.asarray(segs, dtype=np.float64).reshape(-1, 8)
    if len(segs) == 0:
        return
    p0, p1 = segs[:, 0:3], segs[:, 3:6]
    rmax = np.maximum(segs[:, 6], segs[:, 7]) + pad
    lo = np.minimum(p0, p1) - rmax[:, None]
    hi = np.maximum(p0, p1) + rmax[:, None]
    S, sp, c0 = grid.size, grid.spacing, grid.c0
    i0 = np.clip(np.ceil((lo - c0) / sp), 0, S).astype(np.int64)
    i1 = np.clip(np.floor((hi - c0) / sp) + 1, 0, S).astype(np.int64)
    n = np.maximum(i1 - i0, 0)
    count = n[:, 0] * n[:, 1] * n[:, 2]
    keep = np.nonzero(count > 0)[0]
    start = 0
    while start < len(keep):
        csum = np.cumsum(count[keep[start:]])
        stop = start + max(1, int(np.searchsorted(csum, _SPLAT_CHUNK, side="right")))
        ids = keep[start:stop]
        start = stop
        cnt = count[ids]
        sid = np.repeat(ids, cnt)
        offs = np.repeat(np.cumsum(cnt) - cnt, cnt)
        loc = np.arange(int(cnt.sum()), dtype=np.int64) - offs
        nyz = n[sid, 1] * n[sid, 2]
        ii = i0[sid, 0] + loc // nyz
        rem = loc % nyz
        jj = i0[sid, 1] + rem // n[sid, 2]
        kk = i0[sid, 2] + rem % n[sid, 2]
        a, v = p0[sid], p1[sid] - p0[sid]
        dx = c0 + ii * sp - a[:, 0]
        dy = c0 + jj * sp - a[:, 1]
        dz = c0 + kk * sp - a[:, 2]
        vv = np.maximum((v * v).sum(1), 1e-12)
        t = np.clip((dx * v[:, 0] + dy * v[:, 1] + dz * v[:, 2]) / vv, 0.0, 1.0)
        ex, ey, ez = dx - t * v[:, 0], dy - t * v[:, 1], dz - t * v[:, 2]
        d = np.sqrt(ex * ex + ey * ey + ez * ez)
        r = segs[sid, 6] + t * (segs[sid, 7] - segs[sid, 6])
        yield (ii * S + jj) * S + kk, d, r


def _polyline_segments(pts: np.ndarray, radii: np.ndarray, grow: float = 0.0) -> np.ndarray:
    pts = np.asarray(pts, dtype=np.float64)
    radii = np.asarray(radii, dtype=np.float64) + grow
    return np.concatenate([pts[:-1], pts[1:], radii[:-1, None], radii[1:, None]], axis=1)


def _paint_tube(grid: _Grid, lab: np.ndarray, pts, radii, value: Label, allowed=None, grow: float = 0.0) -> None:
    """Paint the voxels inside a tube (polyline ``pts`` with ``radii`` + ``grow``)."""
    flat = lab.reshape(-1)
    for idx, d, r in _segment_voxels(grid, _polyline_segments(pts, radii, grow), 0.0):
        idx = idx[d <= r]
        if allowed is not None:
            idx = idx[allowed[flat[idx]]]
        flat[idx] = value


# ----------------------------------------------------------------------------- texture

#: lattice node counts and spacings (mm) of the two smooth random fields
def _smooth_field(values: np.ndarray, h: float, grid: _Grid) -> np.ndarray:
    """A smooth random field (≈ unit variance) on the grid from lattice ``values`` in world mm.

    Gaussian-weighted lattice (σ = node spacing), separable, evaluated with three tensor
    contractions; the lattice is fixed in world coordinates (resolution independent).
    """
    n = values.shape[0]
    nodes = (np.arange(n) - (n - 1) / 2.0) * h
    w = np.exp(-0.5 * ((grid.c[:, None].astype(np.float64) - nodes[None, :]) / h) ** 2)
    w /= np.sqrt((w**2).sum(axis=1, keepdims=True)) + 1e-12
    w = w.astype(np.float32)
    f = np.tensordot(values, w, axes=([2], [1]))  # [n, n, Z]
    f = np.tensordot(f, w, axes=([1], [1]))  # [n, Z, Y]
    f = np.tensordot(w, f, axes=([1], [0]))  # [X, Z, Y]
    return np.ascontiguousarray(f.transpose(0, 2, 1))


# ----------------------------------------------------------------------------- rasteriser


def _rasterise(an: Anatomy, grid: _Grid) -> tuple[np.ndarray, np.ndarray]:
    """Label map and vessel-fraction field for an anatomy on a grid.

    Painted in this order (later tissues overwrite earlier ones where allowed): trunk
    (body, fat, muscle, cavity, lungs), abdominal organs, heart, mediastinal tubes
    (oesophagus, aorta and branches, airways), spine, chest wall; then the pulmonary vessels
    as a separate fractional field.
    """
    S = grid.size
    lab = np.zeros((S, S, S), dtype=np.uint8)
    _, X, Y, Z = grid.full()
    muscle, q_c = _paint_trunk(an, grid, lab, X, Y, Z)
    _paint_abdomen(an, grid, lab)
    _paint_heart(an, grid, lab)
    _paint_mediastinal_tubes(an, grid, lab)
    _paint_spine(an, grid, lab, X, Y, Z, muscle)
    _paint_chest_wall(an, grid, lab, X, Y, Z, muscle, q_c)
    del q_c, muscle
    return lab, _pulmonary_vessels(an, grid)


def _cavity_radii(an: Anatomy) -> tuple[float, float, float]:
    """(lateral half-width, anterior, posterior semi-axis) of the abdominal cavity (mm)."""
    a_c = an.body_a - an.fat - an.wall_lat
    _, b_ca, b_cp = (float(v) for v in an.cavity_axes(np.float64(an.z_dome_r - 60.0)))
    return a_c, b_ca, b_cp


def _paint_trunk(an: Anatomy, grid: _Grid, lab: np.ndarray, X, Y, Z) -> tuple[np.ndarray, np.ndarray]:
    """Body outline, fat, muscle, the chest and abdominal cavities and the lungs.

    Returns the muscle mask (inside the fat layer) and the cavity's ``q_c`` field, which the
    spine and chest wall read."""
    # The outlines are superellipses with norm rho = (|u|^p + |v|^p)^(1/p); we work with
    # q = rho^p and compare it with 2D thresholds (cheaper than a 3D power).
    # Depth below the skin along the ray from the body axis: r (1/rho - 1).
    a, b_ant, b_post = an.body_axes(Z)
    dxb, dyb = X - an.cx, Y - an.cy
    p = np.where(dyb >= 0.0, an.body_p, an.body_p + 0.8).astype(np.float32)  # flatter back
    q_b = (np.abs(dxb) / a) ** p + (np.abs(dyb) / np.where(dyb >= 0.0, b_ant, b_post)) ** p
    r_xy = np.sqrt(dxb**2 + dyb**2)  # [X, Y, 1]
    t_fat = an.fat * (0.75 + 0.5 * (dxb / np.maximum(r_xy, 1e-6)) ** 2)  # thicker laterally
    body = q_b <= 1.0
    lab[body] = Label.FAT
    muscle = q_b <= (r_xy / (r_xy + t_fat)) ** p  # depth >= t_fat
    lab[muscle] = Label.SOFT_TISSUE
    del q_b, body

    q_c = an.cavity_q(X, Y, Z)
    zd = an.diaphragm(X, Y)  # [X, Y, 1]
    cavity = muscle & (q_c <= 1.0)
    chest = cavity & (Z > zd)
    lab[chest] = Label.FAT  # mediastinum (lungs are carved out next)
    abdomen = cavity & (Z <= zd - 5.0)
    mixture = _smooth_field(an.texture[1], _TEX_H[1], grid)
    lab[abdomen] = Label.BOWEL
    lab[abdomen & (mixture > 0.6)] = Label.FAT  # mesenteric fat
    del mixture, abdomen, cavity
    ci, cj, ck = np.nonzero(chest)
    del chest
    lung = an.in_lung(grid.c[ci], grid.c[cj], grid.c[ck])
    lab[ci[lung], cj[lung], ck[lung]] = Label.LUNG
    del ci, cj, ck, lung
    return muscle, q_c


def _paint_abdomen(an: Anatomy, grid: _Grid, lab: np.ndarray) -> None:
    """Liver, spleen, stomach (with its gas cap) and kidneys, inside the abdominal cavity only."""
    belly = _lut([Label.BOWEL, Label.FAT])
    a_c, b_ca, b_cp = _cavity_radii(an)
    ls = an.liver_scale
    liver = [  # (centre, semi-axes): right lobe, left lobe reaching across the midline
        (
            (an.cx + 0.38 * a_c, an.cy - 0.05 * b_cp, an.z_dome_r - 70.0 * ls),
            (0.62 * a_c * ls, 0.9 * b_cp + 0.4 * b_ca, 95.0 * ls),
        ),
        ((an.cx - 0.1 * a_c, an.cy + 0.45 * b_ca, an.z_dome_r - 45.0), (0.5 * a_c * ls, 0.45 * b_ca, 45.0 * ls)),
    ]
    for c, r in liver:
        b = grid.box(*_ellipsoid_box(c, r))
        if b:
            bs, x, y, z = b
            _paint(lab, bs, _ellipsoid_q(x, y, z, c, r) <= 1.0, Label.LIVER, belly)
    ss = an.spleen_scale
    sp_rot = _frame(_unit([-0.45, 0.85, -0.25]))
    c = (an.cx - 0.72 * a_c, an.cy - 0.45 * b_cp, an.z_dome_l - 55.0)
    r = (55.0 * ss, 22.0 * ss, 45.0 * ss)
    b = grid.box(*_ellipsoid_box(c, r, sp_rot))
    if b:
        bs, x, y, z = b
        _paint(lab, bs, _ellipsoid_q(x, y, z, c, r, sp_rot) <= 1.0, Label.SPLEEN, belly)
    st = an.stomach_scale
    st_rot = _frame(_unit([0.35, 0.3, -0.9]))
    c = (an.cx - 0.42 * a_c, an.cy + 0.3 * b_ca, an.z_dome_l - 60.0 * st)
    r = (70.0 * st, 42.0 * st, 36.0 * st)
    b = grid.box(*_ellipsoid_box(c, r, st_rot))
    if b:
        bs, x, y, z = b
        inside = _ellipsoid_q(x, y, z, c, r, st_rot) <= 1.0
        _paint(lab, bs, inside, Label.STOMACH, belly)
        ymax = c[1] + float(np.sqrt((st_rot[1] ** 2) @ np.asarray(r) ** 2))
        gas_y = ymax - 2.0 * an.gas_fraction * (ymax - c[1])
        _paint(lab, bs, inside & (y > gas_y), Label.GAS, _lut([Label.STOMACH]))
    for side, dz in ((1.0, -150.0), (-1.0, -135.0)):
        zk = (an.z_dome_r if side > 0 else an.z_dome_l) + dz + 30.0
        yk = float(an.spine_y(np.float64(zk))) + 8.0
        c = (an.cx + side * 62.0, yk, zk)
        k_rot = _frame(_unit([side * 0.15, 0.2, 1.0]))
        r = (55.0, 30.0, 24.0)
        rf = (67.0, 40.0, 33.0)
        b = grid.box(*_ellipsoid_box(c, rf, k_rot))
        if b:
            bs, x, y, z = b
            q = _ellipsoid_q(x, y, z, c, r, k_rot)
            _paint(lab, bs, _ellipsoid_q(x, y, z, c, rf, k_rot) <= 1.0, Label.FAT, _lut([Label.BOWEL]))
            _paint(lab, bs, q <= 1.0, Label.KIDNEY, _lut([Label.BOWEL, Label.FAT, Label.SOFT_TISSUE]))


def _paint_heart(an: Anatomy, grid: _Grid, lab: np.ndarray) -> None:
    """Pericardial fat, myocardium and the four blood-pool chambers."""
    hc, hrot = np.asarray(an.heart_center), np.asarray(an.heart_rot)
    b = grid.box(*_ellipsoid_box(hc, np.asarray(an.heart_radii) + 5.0, hrot))
    if b:
        bs, x, y, z = b
        above = z > an.diaphragm(x, y) - 3.0
        _paint(lab, bs, above & (an.heart_q(x, y, z, grow=4.0) <= 1.0), Label.FAT, _lut([Label.FAT, Label.LUNG]))
        myo = above & (an.heart_q(x, y, z) <= 1.0)
        _paint(lab, bs, myo, Label.MYOCARDIUM)
        chambers = [  # (offset along heart axes in units of radii, radii fractions)
            ((0.15, -0.32, 0.0), (0.58, 0.38, 0.5)),  # left ventricle
            ((0.05, 0.47, 0.0), (0.52, 0.28, 0.55)),  # right ventricle
            ((-0.62, -0.25, 0.15), (0.33, 0.4, 0.45)),  # left atrium
            ((-0.55, 0.45, -0.05), (0.33, 0.32, 0.45)),  # right atrium
        ]
        for off, fr in chambers:
            cc = hc + hrot @ (np.asarray(off) * an.heart_radii)
            rr = np.asarray(fr) * an.heart_radii
            _paint(lab, bs, myo & (_ellipsoid_q(x, y, z, cc, rr, hrot) <= 1.0), Label.BLOOD_POOL)


def _paint_mediastinal_tubes(an: Anatomy, grid: _Grid, lab: np.ndarray) -> None:
    """Oesophagus, aorta with the arch branches and the superior vena cava, trachea and bronchi."""
    a_c, b_ca, _ = _cavity_radii(an)
    hc, hrot = np.asarray(an.heart_center), np.asarray(an.heart_rot)
    top = an.z_apex + 400.0  # tubes run out of any field of view (anatomy, not grid, based)
    zc = an.z_carina
    ys_car = float(an.spine_y(np.float64(zc)))
    vr = float(an.vert_radius(np.float64(zc)))
    soft_ok = _lut([Label.FAT, Label.LUNG, Label.SOFT_TISSUE, Label.BOWEL])
    oes_y = ys_car + 0.8 * vr + 9.0
    st_top = (an.cx - 0.35 * a_c, an.cy + 0.2 * b_ca, an.z_dome_l - 25.0)
    oes = np.array(
        [[an.cx - 2.0, oes_y, top], [an.cx - 4.0, oes_y, zc], [an.cx - 10.0, oes_y + 8.0, an.z_dome_l - 5.0], st_top]
    )
    pts, rr = _catmull_rom(oes, np.array([7.0, 7.0, 7.5, 9.0]), 5.0)
    _paint_tube(grid, lab, pts, rr, Label.SOFT_TISSUE, soft_ok)

    ys = lambda z: float(an.spine_y(np.float64(z)))  # noqa: E731
    vx = lambda z: float(an.vert_radius(np.float64(z)))  # noqa: E731
    r1, r2, r3 = an.heart_radii
    root = hc - 0.55 * r1 * hrot[:, 0] - 0.1 * r2 * hrot[:, 1] + 0.3 * r3 * hrot[:, 2]
    z_arch = zc + 32.0
    z_bot = an.z_dome_r - 500.0
    aorta = np.array(
        [
            root,
            [an.cx + 18.0, root[1] + 5.0, zc - 15.0],
            [an.cx + 6.0, an.cy + 10.0, z_arch],
            [an.cx - 18.0, ys(z_arch) + vx(z_arch) + 20.0, z_arch - 5.0],
            [an.cx - vx(zc) - 14.0, ys(zc - 30) + 16.0, zc - 40.0],
            [an.cx - vx(an.z_dome_l) - 11.0, ys(an.z_dome_l) + 18.0, an.z_dome_l - 20.0],
            [an.cx - 10.0, ys(z_bot) + vx(z_bot) + 14.0, z_bot],
        ]
    )
    pts, rr = _catmull_rom(aorta, np.array([15.0, 15.0, 14.0, 13.0, 12.0, 11.0, 10.0]), 4.0)
    _paint_tube(grid, lab, pts, rr, Label.FAT, _lut([Label.LUNG]), grow=3.0)
    _paint_tube(grid, lab, pts, rr, Label.AORTA)
    # arch branches (brachiocephalic, left carotid, left subclavian) and superior vena cava
    y_arch = float(pts[np.argmax(pts[:, 2]), 1])
    branches = [  # (x, y offset from the arch, z) of three control points, radius
        ((4.0, 4.0, z_arch), (14.0, 6.0, z_arch + 40.0), (22.0, 0.0, top), 7.0),
        ((-6.0, 0.0, z_arch), (-10.0, -2.0, z_arch + 40.0), (-16.0, -4.0, top), 5.0),
        ((-14.0, -10.0, z_arch - 2.0), (-24.0, -14.0, z_arch + 30.0), (-50.0, -16.0, top), 5.5),
    ]
    branches = [(*([an.cx + c[0], y_arch + c[1], c[2]] for c in ctrl), rad) for *ctrl, rad in branches]
    ra_top = hc - 0.55 * r1 * hrot[:, 0] + 0.45 * r2 * hrot[:, 1]
    svc = ([an.cx + 30.0, root[1] + 2.0, top], [an.cx + 28.0, root[1], zc], ra_top.tolist(), 9.0)
    for p0, p1, p2, rad in [*branches, svc]:
        pts, rr = _catmull_rom(np.array([p0, p1, p2]), np.full(3, rad), 5.0)
        _paint_tube(grid, lab, pts, rr, Label.FAT, _lut([Label.LUNG]), grow=3.0)
        _paint_tube(grid, lab, pts, rr, Label.VESSEL, _lut([Label.FAT, Label.LUNG, Label.SOFT_TISSUE]))

    tr_y = oes_y + 18.0
    car = np.array([an.cx + 2.0, tr_y, zc])
    trachea = np.array([[an.cx + 1.0, tr_y + 4.0, top], [an.cx + 1.0, tr_y + 2.0, zc + 60.0], car])
    r_b = np.array([an.cx + 0.35 * a_c * 0.5 + 10.0, tr_y - 6.0, zc - 38.0])
    l_b = np.array([an.cx - 0.35 * a_c * 0.5 - 24.0, tr_y - 6.0, zc - 32.0])
    airways = [
        (_catmull_rom(trachea, np.array([9.0, 9.0, 8.5]), 5.0)),
        (np.array([car, r_b]), np.array([7.0, 6.0])),
        (np.array([car, l_b]), np.array([6.5, 5.5])),
    ]
    for side, base in ((1.0, r_b), (-1.0, l_b)):
        for d, rr_ in (((0.4, 0.1, 0.9), 4.5), ((0.45, -0.4, -0.8), 5.0), ((0.5, 0.7, -0.3), 3.5)):
            tip = base + 22.0 * _unit([side * d[0], d[1], d[2]])
            airways.append((np.array([base, tip]), np.array([rr_, rr_ * 0.8])))
    wall_ok = _lut([Label.FAT, Label.LUNG, Label.SOFT_TISSUE])
    for pts, rr in airways:
        _paint_tube(grid, lab, pts, rr, Label.SOFT_TISSUE, wall_ok, grow=1.8)
    for pts, rr in airways:
        _paint_tube(grid, lab, pts, rr, Label.AIRWAY, _lut([Label.SOFT_TISSUE]))


def _pulmonary_vessels(an: Anatomy, grid: _Grid) -> np.ndarray:
    """Fractional occupancy of the pulmonary vessels (blended into lung/fat at HU time)."""
    S = grid.size
    ves = np.zeros((S, S, S), dtype=np.float32)
    vflat = ves.reshape(-1)
    r_eff_min = 0.6 * grid.spacing
    for idx, d, rloc in _segment_voxels(grid, np.asarray(an.vessels), r_eff_min):
        # area-preserving: a sub-voxel vessel becomes a fainter, voxel-wide one
        r_eff = np.maximum(rloc, r_eff_min)
        inside = d <= r_eff
        np.maximum.at(vflat, idx[inside], ((rloc[inside] / r_eff[inside]) ** 2).astype(np.float32))
    return ves


def _paint_spine(an: Anatomy, grid: _Grid, lab: np.ndarray, X, Y, Z, muscle) -> None:
    """Vertebral bodies (cortex + trabecular), discs, canal and posterior elements."""
    zc = Z[0, 0, :]
    ys = an.spine_y(zc)[None, None, :]
    rx = an.vert_radius(zc)[None, None, :]
    ry = 0.8 * rx
    # vertebral phase: thoracic period P above the lumbar junction, 1.15 P below it
    z_t1 = an.z_apex + 8.0
    z_l1 = an.z_dome_r - 85.0
    P = an.vert_period
    phase = np.where(zc >= z_l1, (z_t1 - zc) / P, (z_t1 - z_l1) / P + (z_l1 - zc) / (1.15 * P))
    frac = (phase - np.floor(phase))[None, None, :]
    disc = (frac < 0.2) & (phase[None, None, :] >= -0.2)
    # body region limited to the x/y band around the spine to keep the arrays small
    xlim = float(an.vert_radius(np.float64(grid.c[0]))) * 3.2 + 10.0
    b = grid.box((an.cx - xlim, -1e9, -1e9), (an.cx + xlim, 1e9, 1e9))
    if b is None:
        return
    bs, x, y, z = b
    ys_b, rx_b, ry_b, disc_b = ys[:, :, bs[2]], rx[:, :, bs[2]], ry[:, :, bs[2]], disc[:, :, bs[2]]
    frac_b = frac[:, :, bs[2]]
    inb = muscle[bs]
    dx, dy = x - an.cx, y - ys_b
    q = (dx / rx_b) ** 2 + (dy / ry_b) ** 2
    body = (q <= 1.0) & inb
    sub = lab[bs]
    # pleural/soft-tissue shell so the lungs do not touch the bone directly
    shell = (((dx / (rx_b + 3.0)) ** 2 + (dy / (ry_b + 3.0)) ** 2) <= 1.0) & inb
    sub[shell & (sub == Label.LUNG)] = Label.SOFT_TISSUE
    cortex = ((dx / (rx_b - 2.5)) ** 2 + (dy / (ry_b - 2.5)) ** 2) > 1.0
    endplate = (frac_b < 0.26) | (frac_b > 0.94)
    sub[body] = Label.VERTEBRA
    sub[body & (cortex | endplate)] = Label.CORTICAL_BONE
    sub[body & disc_b] = Label.DISC
    # posterior elements at vertebral (non-disc) levels
    cy_can = ys_b - ry_b - 8.0
    dyc = y - cy_can
    rc = np.sqrt(dx**2 + dyc**2)
    level = (frac_b > 0.3) & (frac_b < 0.9)
    arch = (rc <= 14.0) & (dyc <= 4.0) & level
    spinous = (np.abs(dx) <= 4.5) & (dyc < 0.0) & (dyc >= -42.0) & (frac_b > 0.35) & (frac_b < 0.95)
    transverse = (np.abs(dyc + 2.0) <= 5.5) & (np.abs(dx) <= 34.0) & (frac_b > 0.4) & (frac_b < 0.8)
    post = (arch | spinous | transverse) & inb & (sub != Label.LUNG)
    sub[post] = Label.CORTICAL_BONE
    sub[(rc <= 7.5) & inb] = Label.SPINAL_CANAL


def _paint_chest_wall(an: Anatomy, grid: _Grid, lab: np.ndarray, X, Y, Z, muscle, q_c) -> None:
    """Ribs + costal cartilages, sternum, scapulae, clavicles in the chest wall.

    Works on the shell of voxels outside the cavity (``q_c`` > 1) but under the fat layer
    (``muscle``), within ``reach`` mm of the cavity: ``d_out = r (1 - 1/rho_c)``.
    """
    z_t1 = an.z_apex + 8.0
    P = an.vert_period
    zmin = z_t1 - 12.5 * P - an.rib_drop - 20.0
    g, t = 2.0, an.rib_t
    reach = g + t + 18.0  # ribs + scapula depth outside the cavity
    dx, dy = X - an.cx, Y - an.cy
    r = np.sqrt(dx**2 + dy**2)  # [X, Y, 1]
    # d_out <= reach  <=>  rho_c <= r / (r - reach) (always true where r <= reach)
    lim = np.where(r > reach, (r / np.maximum(r - reach, 1e-6)) ** an.cav_p, np.inf).astype(np.float32)
    shell = muscle & (q_c > 1.0) & (q_c <= lim) & (Z >= zmin) & (Z <= an.z_apex + 40.0)
    idx = np.nonzero(shell)
    del shell
    px, py, pz = grid.c[idx[0]], grid.c[idx[1]], grid.c[idx[2]]
    rho = q_c[idx] ** (1.0 / an.cav_p)
    pd = np.sqrt((px - an.cx) ** 2 + (py - an.cy) ** 2) * (1.0 - 1.0 / rho)
    phi = np.abs(np.arctan2(px - an.cx, -(py - an.cy)))  # 0 posterior, π anterior
    out = np.zeros(px.shape, dtype=np.uint8)

    phi0 = 0.22
    s = np.clip((phi - phi0) / (math.pi - phi0), 0.0, 1.0) ** 1.4
    dr = (pd - g - 0.5 * t) / (0.5 * t)
    for n in range(12):
        z_post = z_t1 - (n + 0.4) * P
        drop = an.rib_drop * (0.6 + 0.05 * n)
        zc = z_post - drop * s + 6.0 * np.sin(np.minimum(phi, 1.5))  # rises a little laterally
        h = an.rib_h * (1.25 if n == 0 else 1.0)
        ell = ((pz - zc) / (0.5 * h)) ** 2 + dr**2 <= 1.0
        if n <= 6:
            bone_end, cart_end = 0.72 * math.pi - 0.02 * n, math.pi - 0.12
        elif n <= 9:
            bone_end, cart_end = 0.66 * math.pi, 0.86 * math.pi - 0.03 * (n - 7)
        else:
            bone_end, cart_end = (0.52 - 0.08 * (n - 10)) * math.pi, 0.0
        out[ell & (phi >= phi0) & (phi <= bone_end)] = Label.RIB
        out[ell & (phi > bone_end) & (phi <= cart_end)] = Label.COSTAL_CARTILAGE

    # scapulae: posterolateral plates outside the ribs, narrowing to the inferior angle
    z_top, z_bot = an.z_apex - 5.0, an.z_apex - 175.0
    f = np.clip((z_top - pz) / (z_top - z_bot), 0.0, 1.0)
    med = 0.55 + 0.3 * f
    lat = 1.55 - 0.55 * f
    scap = (pz <= z_top) & (pz >= z_bot) & (phi >= med) & (phi <= lat)
    scap &= (pd >= g + t + 5.0) & (pd <= g + t + 5.0 + 5.0)
    out[scap] = Label.SCAPULA

    # sternum: anterior midline plate from the first to the seventh costal cartilage
    z_st_top = z_t1 - 0.4 * P - an.rib_drop * 0.6 + 20.0
    z_st_bot = z_t1 - 6.4 * P - an.rib_drop * 0.9 - 15.0
    half_w = np.where(pz > z_st_top - 45.0, 26.0, 15.0)
    ster = (np.abs(px - an.cx) <= half_w) & (py > an.cy) & (pz <= z_st_top) & (pz >= z_st_bot)
    ster &= (pd >= 1.0) & (pd <= 13.0)
    out[ster] = Label.STERNUM
    sub_vals = lab[idx]
    keep = out > 0
    sub_vals[keep] = out[keep]
    lab[idx] = sub_vals

    # clavicles: S-shaped rods from the manubrium to the shoulders
    a, b_ant, _ = (float(v) for v in an.body_axes(np.float64(z_st_top)))
    for side in (1.0, -1.0):
        ctrl = np.array(
            [
                [an.cx + side * 18.0, an.cy + b_ant - an.fat - 14.0, z_st_top + 2.0],
                [an.cx + side * 0.35 * a, an.cy + b_ant - an.fat - 12.0, z_st_top + 16.0],
                [an.cx + side * 0.62 * a, an.cy + 0.35 * b_ant, z_st_top + 24.0],
                [an.cx + side * 0.82 * a, an.cy + 0.05 * b_ant, z_st_top + 30.0],
            ]
        )
        pts, rr = _catmull_rom(ctrl, np.array([8.0, 7.0, 6.5, 7.5]), 5.0)
        _paint_tube(grid, lab, pts, rr, Label.CLAVICLE, _lut([Label.SOFT_TISSUE]))


