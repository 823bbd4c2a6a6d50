"""The patient: a random :class:`Anatomy` in world millimetres (independent of any grid),
and its vessel trees."""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import numpy as np

from xct_core.phantoms.labels import Label
from xct_core.phantoms.shapes import (
    _TEX_N,
    _catmull_rom,
    _ellipsoid_q,
    _frame,
    _smoothstep,
)

# ----------------------------------------------------------------------------- anatomy


@dataclass(frozen=True, eq=False)
class Anatomy:
    """One patient's anatomy, in world millimetres (RAS+; the grid is centred at the origin).

    Every field is drawn by :func:`sample_anatomy`; nothing here depends on the voxel grid.
    """

    cx: float  #: body midline x
    cy: float  #: body centre y (anterior-posterior)
    z0: float  #: patient z offset (shifts every level)
    body_a: float  #: half width (left-right)
    body_b_ant: float  #: anterior half depth
    body_b_post: float  #: posterior half depth
    body_p: float  #: superellipse exponent of the body outline (2 = ellipse)
    belly: float  #: relative anterior bulge of the abdomen
    fat: float  #: subcutaneous fat thickness
    wall_lat: float  #: lateral chest-wall thickness (muscle + ribs)
    wall_ant: float  #: anterior chest-wall thickness
    wall_post: float  #: posterior wall thickness (paraspinal muscles)
    cav_p: float  #: superellipse exponent of the thoracic cavity
    z_apex: float  #: lung apex level
    z_dome_r: float  #: right hemidiaphragm dome level (highest point)
    z_dome_l: float  #: left hemidiaphragm dome level
    dome_drop: float  #: how far the diaphragm falls from dome to the costophrenic angles
    mediastinum_w: float  #: half width of the central mediastinum
    heart_center: tuple[float, float, float]
    heart_radii: tuple[float, float, float]  #: semi-axes (long axis base→apex first)
    heart_rot: tuple[tuple[float, ...], ...]  #: 3×3, columns = heart axes
    z_carina: float
    vert_period: float  #: thoracic vertebral height incl. disc (also the rib spacing)
    vert_rx: float  #: vertebral body half width at the top of the thorax
    kyphosis: float  #: posterior bow of the thoracic spine
    rib_drop: float  #: how far ribs descend from their posterior end to the sternum
    rib_h: float  #: rib height (cranio-caudal)
    rib_t: float  #: rib thickness (radial)
    liver_scale: float
    spleen_scale: float
    stomach_scale: float
    gas_fraction: float  #: part of the stomach holding gas (anterior, patient supine)
    lung_gradient: float  #: posterior (dependent) lung density increase, HU
    contrast_gain: float  #: scales the contrast enhancement
    hu_jitter: tuple[float, ...]  #: per-label HU offsets (len(Label))
    vessels: tuple[tuple[float, ...], ...]  #: pulmonary vessel segments (x0,y0,z0,x1,y1,z1,r0,r1)
    texture: tuple[np.ndarray, np.ndarray]  #: lattice values of two smooth random fields

    # -- derived shapes (vectorised over broadcastable x, y, z arrays) --------------

    def body_axes(self, z):
        """(a, b_ant, b_post) of the body outline at height z."""
        neck = _smoothstep(self.z_apex + 15.0, self.z_apex + 90.0, z)
        belly = _smoothstep(self.z_dome_r - 20.0, self.z_dome_r - 170.0, z)
        a = self.body_a * (1.0 - 0.2 * neck) * (1.0 + 0.04 * belly)
        b_ant = self.body_b_ant * (1.0 + self.belly * belly) * (1.0 - 0.15 * neck)
        b_post = self.body_b_post * (1.0 - 0.1 * neck)
        return a, b_ant, b_post

    def cavity_axes(self, z):
        """(a, b_ant, b_post) of the thoraco-abdominal cavity at height z (0 above its top)."""
        a, b_ant, b_post = self.body_axes(z)
        top = self.z_apex + 12.0
        shoulder = self.z_apex - 120.0
        t = np.clip((z - shoulder) / (top - shoulder), 0.0, 1.0)
        dome = np.sqrt(np.clip(1.0 - t * t, 0.0, 1.0))
        dome = np.where(z > top, 0.0, dome)
        wider = 1.0 + 0.07 * _smoothstep(self.z_apex - 40.0, self.z_dome_r, z)
        a_c = np.maximum(a - self.fat - self.wall_lat, 10.0) * dome * wider
        b_ca = np.maximum(b_ant - self.fat - self.wall_ant, 10.0) * (0.35 + 0.65 * dome)
        b_cp = np.maximum(b_post - self.fat - self.wall_post, 10.0) * dome
        return a_c, b_ca, b_cp

    def spine_y(self, z):
        """y of the vertebral-body centre at height z."""
        _, _, b_cp = self.cavity_axes(np.minimum(z, self.z_apex - 120.0))
        mid = 0.5 * (self.z_apex + self.z_dome_r) - 40.0
        bow = self.kyphosis * np.clip(1.0 - ((z - mid) / 200.0) ** 2, 0.0, 1.0)
        return self.cy - b_cp + 1.3 * self.vert_rx - bow

    def vert_radius(self, z):
        """Vertebral-body half width (grows caudally)."""
        return self.vert_rx * (1.0 + 0.0018 * np.clip(self.z_apex - z, 0.0, 400.0))

    def diaphragm(self, x, y):
        """Height of the diaphragm's upper surface under (x, y): two domes, right higher."""
        a_c = self.body_a - self.fat - self.wall_lat
        rx = 0.62 * a_c
        out = None
        for side, zt in ((1.0, self.z_dome_r), (-1.0, self.z_dome_l)):
            xs = self.cx + side * 0.42 * a_c
            dy = y - (self.cy + 5.0)
            ry = np.where(dy < 0.0, 70.0, 115.0)
            dome = zt - self.dome_drop * (((x - xs) / rx) ** 2 + (dy / ry) ** 2)
            out = dome if out is None else np.maximum(out, dome)
        return out

    def heart_q(self, x, y, z, grow: float = 0.0):
        r = tuple(v + grow for v in self.heart_radii)
        return _ellipsoid_q(x, y, z, self.heart_center, r, np.asarray(self.heart_rot))

    def cavity_q(self, x, y, z):
        """``rho ** cav_p`` of the cavity cross-section's superellipse norm rho (≤ 1 inside)."""
        a_c, b_ca, b_cp = self.cavity_axes(z)
        u = np.abs(x - self.cx) / np.maximum(a_c, 1e-3)
        dy = y - self.cy
        v = np.abs(dy) / np.maximum(np.where(dy >= 0.0, b_ca, b_cp), 1e-3)
        p = np.float32(self.cav_p)
        return u**p + v**p

    def in_lung(self, x, y, z, margin: float = 0.0):
        """Analytic lung membership (the same test rasterises the lungs and guides the vessels).

        ``margin`` (mm) shrinks the lungs, e.g. to keep vessel end points inside.
        """
        a_c, b_ca, _ = self.cavity_axes(z)
        q = self.cavity_q(x, y, z)
        m = q <= np.clip(1.0 - margin / np.maximum(a_c, 1.0), 0.0, 1.0) ** self.cav_p
        m = m & (z > self.diaphragm(x, y) + margin)
        med = self.mediastinum_w + 14.0 * np.exp(-(((z - self.z_carina - 25.0) / 35.0) ** 2))
        # the lungs nearly meet behind the sternum (anterior junction)
        med = med * (1.0 - 0.6 * _smoothstep(0.15, 0.85, (y - self.cy) / np.maximum(b_ca, 1.0)))
        m = m & (np.abs(x - self.cx + 4.0) > med + margin)
        m = m & (self.heart_q(x, y, z, grow=5.0 + margin) > 1.0)
        return m


def _uniform(rng: np.random.Generator, lo: float, hi: float) -> float:
    return float(rng.uniform(lo, hi))


def sample_anatomy(rng: np.random.Generator) -> Anatomy:
    """Draw one patient's anatomy (sizes, positions, vessel tree, textures) from ``rng``."""
    u = lambda lo, hi: _uniform(rng, lo, hi)  # noqa: E731
    size = rng.normal(0.0, 1.0)  # overall build, correlates body and organ sizes
    build = float(np.clip(1.0 + 0.07 * size, 0.85, 1.15))
    cx, cy, z0 = u(-12, 12), u(-15, 10), u(-20, 20)
    body_a = float(np.clip(u(150, 178) * build, 135, 190))
    body_b = float(np.clip(u(106, 126) * build, 92, 140))
    fat = float(np.clip(u(5, 22) * build**2, 4, 30))
    z_apex = z0 + u(140, 160)
    z_dome_r = z0 + u(-75, -40)
    z_dome_l = z_dome_r - u(8, 24)
    kw = dict(
        cx=cx,
        cy=cy,
        z0=z0,
        body_a=body_a,
        body_b_ant=body_b * u(0.95, 1.05),
        body_b_post=body_b * u(0.95, 1.05),
        body_p=u(2.1, 2.6),
        belly=u(0.0, 0.15) * build,
        fat=fat,
        wall_lat=u(20, 28),
        wall_ant=u(14, 20),
        wall_post=u(26, 34),
        cav_p=u(2.0, 2.3),
        z_apex=z_apex,
        z_dome_r=z_dome_r,
        z_dome_l=z_dome_l,
        dome_drop=u(50, 70),
        mediastinum_w=u(18, 26),
        z_carina=z_apex - u(85, 105),
    )
    # partial object to evaluate derived shapes while sampling the rest
    tmp = _PartialAnatomy(**kw)
    b_ca = float(tmp.cavity_axes(np.float64(z_dome_r + 40.0))[1])

    # heart: long axis from base (right-posterior-superior) to apex (left-anterior-inferior)
    az, el = math.radians(u(35, 55)), math.radians(u(18, 32))
    e1 = np.array([-math.sin(az) * math.cos(el), math.cos(az) * math.cos(el), -math.sin(el)])
    rot = _frame(e1)
    if rot[0, 1] < 0:  # make axis 2 point towards the patient's right (RV side)
        rot[:, 1] *= -1
        rot[:, 2] *= -1
    hs = u(0.9, 1.12)
    radii = (u(58, 68) * hs, u(44, 50) * hs, u(38, 44) * hs)
    ext = np.sqrt((rot**2) @ np.asarray(radii) ** 2)
    hx = cx - u(18, 32)
    hy = min(cy + 0.2 * b_ca + u(-5, 10), cy + b_ca - ext[1] - 4.0)
    hz = float(tmp.diaphragm(np.float64(hx), np.float64(hy))) + 0.8 * ext[2]
    kw.update(heart_center=(hx, hy, hz), heart_radii=radii, heart_rot=tuple(map(tuple, rot)))

    kw.update(
        vert_period=u(22.5, 27.0) * build**0.5,
        vert_rx=u(15, 18) * build**0.5,
        kyphosis=u(0, 12),
        rib_drop=u(70, 95),
        rib_h=u(12, 15),
        rib_t=u(8.0, 10.0),
        liver_scale=u(0.88, 1.12),
        spleen_scale=u(0.8, 1.2),
        stomach_scale=u(0.8, 1.15),
        gas_fraction=u(0.1, 0.3),
        lung_gradient=u(20, 60),
        contrast_gain=u(0.9, 1.1),
        hu_jitter=tuple(float(v) for v in rng.normal(0.0, 4.0, size=len(Label))),
    )
    tmp = _PartialAnatomy(**{**kw, "vessels": (), "texture": (np.zeros(1), np.zeros(1))})
    kw["vessels"] = _pulmonary_tree(tmp, rng)
    kw["texture"] = (
        rng.standard_normal((_TEX_N[0],) * 3).astype(np.float32),
        rng.standard_normal((_TEX_N[1],) * 3).astype(np.float32),
    )
    return Anatomy(**kw)


#: what :func:`redraw_nonidentifiable` re-draws: the parts of a patient that barely change the
#: two X-rays (a few tenths of a percent of the projection range; xct_core/ceiling.py measures it)
REDRAWN_PARTS: tuple[str, ...] = (
    "abdominal fat/bowel mixture field (texture[1])",
    "fine tissue texture (texture[0])",
    "pulmonary vessel tree below the hila (segmental branches)",
    "image noise (make_phantom's noise stream)",
)


def redraw_nonidentifiable(an: Anatomy, rng: np.random.Generator) -> Anatomy:
    """``an`` with the parts in :data:`REDRAWN_PARTS` (bar the image noise, which
    :func:`xct_core.phantoms.make_phantom` draws) re-drawn from ``rng``; everything else —
    outline, organs, bones, heart, HU of every tissue, the vessel trunks — kept.

    Two re-draws of one patient are two exact samples of the generator's posterior over those
    parts given the rest: what no reconstruction from the X-rays can tell apart."""
    vessels = _pulmonary_tree(an, rng)
    texture = (
        rng.standard_normal((_TEX_N[0],) * 3).astype(np.float32),
        rng.standard_normal((_TEX_N[1],) * 3).astype(np.float32),
    )
    return replace(an, vessels=vessels, texture=texture)


class _PartialAnatomy(Anatomy):
    """An :class:`Anatomy` whose later fields are not drawn yet (used while sampling)."""

    def __init__(self, **kw):  # noqa: D401 - helper
        for f in Anatomy.__dataclass_fields__:
            object.__setattr__(self, f, kw.get(f, None))


# ----------------------------------------------------------------------------- vessels


def _unit_rows(v: np.ndarray) -> np.ndarray:
    return v / np.maximum(np.linalg.norm(v, axis=-1, keepdims=True), 1e-12)


def _rotate_rows(v: np.ndarray, axis: np.ndarray, angle: np.ndarray) -> np.ndarray:
    """Rodrigues rotation of row vectors ``v`` [..., 3] about unit ``axis`` [..., 3] by ``angle`` [...]."""
    c, s = np.cos(angle)[..., None], np.sin(angle)[..., None]
    return v * c + np.cross(axis, v) * s + axis * (axis * v).sum(-1, keepdims=True) * (1.0 - c)


def _random_perp(v: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Random unit vectors perpendicular to the rows of ``v`` [..., 3]."""
    w = np.cross(v, rng.normal(size=v.shape))
    return _unit_rows(w)


def _grow_trees(an: Anatomy, rng: np.random.Generator, starts, dirs, radii) -> list[tuple[float, ...]]:
    """Grow bifurcating vessel trees from roots, generation by generation (vectorised).

    A segment of radius r has length ≈ 7 r (6-28 mm); each of five candidate directions
    (growing jitter) is tried and the first whose end and middle stay inside the lung
    wins, otherwise the branch ends. Children: radius × 0.74-0.84, split by 20-40°.
    """
    r_min = 0.9
    P = np.asarray(starts, dtype=np.float64).reshape(-1, 3)
    D = _unit_rows(np.asarray(dirs, dtype=np.float64).reshape(-1, 3))
    R = np.asarray(radii, dtype=np.float64).reshape(-1)
    segs: list[tuple[float, ...]] = []
    scale = 0.15 + 0.15 * np.arange(5)
    for depth in range(14):
        n = len(R)
        if n == 0:
            break
        length = np.clip(7.0 * R, 6.0, 28.0) * rng.uniform(0.8, 1.2, size=n)
        jitter = rng.normal(size=(n, 5)) * scale
        axes = _random_perp(np.repeat(D[:, None, :], 5, axis=1), rng)
        cand = _unit_rows(_rotate_rows(np.repeat(D[:, None, :], 5, axis=1), axes, jitter))
        ends = P[:, None, :] + length[:, None, None] * cand
        mids = P[:, None, :] + 0.5 * length[:, None, None] * cand
        ok = an.in_lung(ends[..., 0], ends[..., 1], ends[..., 2], margin=3.0)
        ok &= an.in_lung(mids[..., 0], mids[..., 1], mids[..., 2], margin=1.0)
        if depth == 0:
            ok[:, 0] = True  # roots start in the hilum, outside the lung proper
        alive = ok.any(axis=1)
        k = np.argmax(ok, axis=1)
        idx = np.nonzero(alive)[0]
        dd = cand[idx, k[idx]]
        q = ends[idx, k[idx]]
        p0, r0 = P[idx], R[idx]
        for i in range(len(idx)):
            segs.append((*p0[i], *q[i], r0[i], 0.92 * r0[i]))
        m = len(idx)
        axis = _random_perp(dd, rng)
        spread = rng.uniform(0.35, 0.7, size=m)
        split = rng.uniform(0.3, 0.7, size=m)
        rc = r0 * rng.uniform(0.74, 0.84, size=m)
        go = rc >= r_min
        d1 = _unit_rows(_rotate_rows(dd, axis, spread * split))
        d2 = _unit_rows(_rotate_rows(dd, axis, -spread * (1.0 - split)))
        P = np.concatenate([q[go], q[go]])
        D = np.concatenate([d1[go], d2[go]])
        R = np.concatenate([(rc * (1.05 - 0.1 * split))[go], (rc * (0.95 + 0.1 * split))[go]])
    return segs


def _pulmonary_tree(an: Anatomy, rng: np.random.Generator) -> tuple[tuple[float, ...], ...]:
    """Pulmonary arteries (trunk → hila → segmental trees) and veins (→ left atrium).

    Returns segments (x0, y0, z0, x1, y1, z1, r0, r1) in mm. Growth only uses the analytic
    lung membership, so the tree is the same at every grid resolution.
    """
    segs: list[tuple[float, ...]] = []
    hc = np.asarray(an.heart_center)
    rot = np.asarray(an.heart_rot)
    r1, r2, r3 = an.heart_radii
    trunk0 = hc - 0.45 * r1 * rot[:, 0] + 0.45 * r2 * rot[:, 1] + 0.35 * r3 * rot[:, 2]
    bif = np.array([an.cx - 8.0, an.cy + 5.0, an.z_carina - 15.0])
    ctrl = np.array([trunk0, 0.5 * (trunk0 + bif) + [0, 8, 0], bif])
    pts, rr = _catmull_rom(ctrl, np.array([13.0, 13.0, 12.0]), 6.0)
    segs += [(*pts[i], *pts[i + 1], rr[i], rr[i + 1]) for i in range(len(pts) - 1)]
    w = an.mediastinum_w
    hila = {
        1.0: np.array([an.cx + w + 10.0, an.cy - 5.0, an.z_carina - 22.0]),
        -1.0: np.array([an.cx - w - 12.0, an.cy - 5.0, an.z_carina - 8.0]),
    }
    # segmental directions (lateral, anterior, superior), lateral = side · x
    seg_dirs = [
        (0.3, 0.1, 1.0), (0.7, 0.5, 0.6), (0.6, -0.5, 0.6), (0.3, 0.7, 0.7), (0.3, -0.4, 1.0),  # upper lobe
        (0.8, 0.6, -0.1), (0.3, 0.9, -0.3),  # middle lobe / lingula
        (0.5, -0.7, -0.2), (0.8, -0.1, -0.7), (0.3, -0.6, -0.8), (0.2, 0.3, -1.0), (0.6, 0.4, -0.8),  # lower lobe
    ]
    starts, dirs, radii = [], [], []
    for side, hil in hila.items():
        segs.append((*bif, *hil, 10.0, 9.0))
        for lat, ant, sup in seg_dirs:
            starts.append(hil)
            dirs.append([side * lat, ant, sup])
            radii.append(5.0)
    # pulmonary veins: trees rooted near the left atrium (posterior of the heart base)
    la = hc - 0.62 * r1 * rot[:, 0] - 0.25 * r2 * rot[:, 1] + 0.15 * r3 * rot[:, 2]
    for side in (1.0, -1.0):
        for sup in (0.7, -0.6):
            root = la + np.array([side * (0.35 * r2 + 8.0), -8.0, 12.0 * sup])
            start = np.array([an.cx + side * (w + 10.0), root[1] - 6.0, root[2] + 10.0 * sup])
            segs.append((*root, *start, 7.0, 6.0))
            for lat, ant, s2 in ((0.8, 0.2, sup), (0.6, -0.6, sup), (0.7, 0.6, 0.3 * sup)):
                starts.append(start)
                dirs.append([side * lat, ant, s2])
                radii.append(4.5)
    segs += _grow_trees(an, rng, starts, dirs, radii)
    return tuple(tuple(float(v) for v in s) for s in segs)


