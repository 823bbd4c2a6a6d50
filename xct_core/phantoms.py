"""Procedural torso phantoms: the embedded default CT data set.

A phantom is a chest/upper-abdomen CT volume in Hounsfield units, built from analytic
shapes defined in **world millimetres** (so a 64³ grid at 6.4 mm and a 128³ grid at
3.2 mm show the same patient) and rasterised with vectorised NumPy.

Conventions (docs/CONVENTIONS.md)
---------------------------------
- Array axes (i, j, k) are RAS+: i increases towards the patient's **Right**, j
  **Anterior**, k **Superior**. World x = patient's right, y = anterior, z = superior (mm).
- The grid is isotropic (``spacing_mm``) and centred at the world origin:
  voxel ``(S - 1) / 2`` sits at (0, 0, 0); see :func:`canonical_affine`.
- Anatomy is left-right asymmetric on purpose (heart, aorta, stomach, spleen on the
  patient's LEFT = smaller x; liver on the RIGHT), so orientation errors are visible.
- Values are HU (float32, clipped to [-1024, 3071]); ``labels`` is a uint8 map of
  :class:`Label` (one tissue per voxel, at the voxel centre, before blur/noise).

Determinism: every random choice comes from the ``numpy.random.Generator`` passed in.
Anatomy is drawn first (independent of the grid); image noise comes from a child stream,
so the anatomy does not depend on ``size`` or ``spacing_mm``. For a data set, phantom
``index`` of seed ``seed`` uses :func:`phantom_rng` — it depends only on (seed, index).
"""

from __future__ import annotations

import enum
import json
import math
import os
import tempfile
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from scipy import ndimage

from xct_core.config import SynthParams
from xct_core.errors import InputError
from xct_core.io import save_nifti

#: bump when the generator changes in a way that changes the output for a given seed
PHANTOM_VERSION = 1
#: smallest grid that still resolves the anatomy meaningfully
MIN_SIZE = 16
#: HU clip range of generated volumes (the range of real CT data in this project)
HU_MIN, HU_MAX = -1024.0, 3071.0


class Label(enum.IntEnum):
    """Tissue label of each voxel (``labels`` array of :func:`make_phantom`).

    Nominal HU (without / with IV contrast) are in :data:`NOMINAL_HU`.
    """

    AIR = 0  #: outside the body
    FAT = 1  #: subcutaneous, mediastinal, epicardial, perirenal and mesenteric fat
    SOFT_TISSUE = 2  #: muscle, body wall, diaphragm, oesophagus, airway walls, neck
    LUNG = 3  #: aerated lung parenchyma
    LUNG_VESSEL = 4  #: pulmonary vessels (voxels whose centre is mostly vessel)
    AIRWAY = 5  #: air in the trachea and bronchi
    MYOCARDIUM = 6  #: heart muscle
    BLOOD_POOL = 7  #: blood in the heart chambers
    AORTA = 8  #: aorta (ascending, arch, descending)
    LIVER = 9
    SPLEEN = 10
    STOMACH = 11  #: stomach wall and fluid content
    GAS = 12  #: gas in the stomach
    KIDNEY = 13
    BOWEL = 14  #: abdominal soft tissue (bowel loops)
    VERTEBRA = 15  #: trabecular bone of the vertebral bodies
    CORTICAL_BONE = 16  #: vertebral cortex and posterior vertebral elements
    DISC = 17  #: intervertebral discs
    SPINAL_CANAL = 18  #: spinal canal (cord + CSF)
    RIB = 19
    COSTAL_CARTILAGE = 20
    STERNUM = 21
    CLAVICLE = 22
    SCAPULA = 23
    VESSEL = 24  #: other mediastinal vessels: aortic-arch branches, superior vena cava


#: nominal HU per label: (no contrast, IV contrast). Per-patient values jitter around these.
NOMINAL_HU: dict[Label, tuple[float, float]] = {
    Label.AIR: (-1000.0, -1000.0),
    Label.FAT: (-100.0, -100.0),
    Label.SOFT_TISSUE: (40.0, 50.0),
    Label.LUNG: (-850.0, -850.0),
    Label.LUNG_VESSEL: (40.0, 250.0),
    Label.AIRWAY: (-1000.0, -1000.0),
    Label.MYOCARDIUM: (40.0, 100.0),
    Label.BLOOD_POOL: (40.0, 275.0),
    Label.AORTA: (40.0, 300.0),
    Label.LIVER: (60.0, 100.0),
    Label.SPLEEN: (45.0, 120.0),
    Label.STOMACH: (20.0, 30.0),
    Label.GAS: (-1000.0, -1000.0),
    Label.KIDNEY: (30.0, 170.0),
    Label.BOWEL: (30.0, 60.0),
    Label.VERTEBRA: (200.0, 200.0),
    Label.CORTICAL_BONE: (400.0, 400.0),
    Label.DISC: (80.0, 80.0),
    Label.SPINAL_CANAL: (15.0, 15.0),
    Label.RIB: (700.0, 700.0),
    Label.COSTAL_CARTILAGE: (150.0, 150.0),
    Label.STERNUM: (350.0, 350.0),
    Label.CLAVICLE: (650.0, 650.0),
    Label.SCAPULA: (500.0, 500.0),
    Label.VESSEL: (40.0, 280.0),
}



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


def _smoothstep(e0: float, e1: float, x):
    t = np.clip((x - e0) / (e1 - e0), 0.0, 1.0)
    return t * t * (3.0 - 2.0 * t)


def _unit(v) -> np.ndarray:
    v = np.asarray(v, dtype=np.float64)
    return v / np.linalg.norm(v)


def _frame(axis) -> np.ndarray:
    """Orthonormal frame (columns) whose first column is ``axis``; the second is horizontal-ish."""
    e1 = _unit(axis)
    ref = np.array([0.0, 0.0, 1.0]) if abs(e1[2]) < 0.9 else np.array([1.0, 0.0, 0.0])
    e2 = _unit(np.cross(ref, e1))
    e3 = np.cross(e1, e2)
    return np.stack([e1, e2, e3], axis=1)


def _ellipsoid_q(x, y, z, center, radii, rot: np.ndarray | None = None):
    """Normalised squared radius of a (rotated) ellipsoid: ≤ 1 inside.

    ``rot`` columns are the ellipsoid axes (world directions) matching ``radii``.
    """
    dx, dy, dz = x - center[0], y - center[1], z - center[2]
    if rot is None:
        return (dx / radii[0]) ** 2 + (dy / radii[1]) ** 2 + (dz / radii[2]) ** 2
    q = 0.0
    for k in range(3):
        u = dx * rot[0, k] + dy * rot[1, k] + dz * rot[2, k]
        q = q + (u / radii[k]) ** 2
    return q


def _ellipsoid_box(center, radii, rot: np.ndarray | None = None, pad: float = 0.0):
    c = np.asarray(center, dtype=np.float64)
    r = np.asarray(radii, dtype=np.float64)
    ext = r if rot is None else np.sqrt((rot**2) @ (r**2))
    return c - ext - pad, c + ext + pad


def _catmull_rom(points: np.ndarray, radii: np.ndarray, step: float) -> tuple[np.ndarray, np.ndarray]:
    """Resample a polyline through ``points`` [N,3] as a smooth Catmull-Rom curve every ~``step`` mm."""
    p = np.asarray(points, dtype=np.float64)
    r = np.asarray(radii, dtype=np.float64)
    ext = np.vstack([2 * p[0] - p[1], p, 2 * p[-1] - p[-2]])
    out_p, out_r = [], []
    for i in range(len(p) - 1):
        p0, p1, p2, p3 = ext[i], ext[i + 1], ext[i + 2], ext[i + 3]
        n = max(1, int(math.ceil(np.linalg.norm(p2 - p1) / step)))
        t = np.arange(n)[:, None] / n
        t2, t3 = t * t, t * t * t
        seg = 0.5 * (
            (2 * p1) + (-p0 + p2) * t + (2 * p0 - 5 * p1 + 4 * p2 - p3) * t2 + (-p0 + 3 * p1 - 3 * p2 + p3) * t3
        )
        out_p.append(seg)
        out_r.append(r[i] + (r[i + 1] - r[i]) * t[:, 0])
    out_p.append(p[-1:])
    out_r.append(r[-1:])
    return np.vstack(out_p), np.concatenate(out_r)


#: voxels per chunk when rasterising many segments at once
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


# ----------------------------------------------------------------------------- texture

#: lattice node counts and spacings (mm) of the two smooth random fields
_TEX_N = (41, 25)
_TEX_H = (15.0, 25.0)


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
    """Label map and vessel-fraction field for an anatomy on a grid."""
    S = grid.size
    lab = np.zeros((S, S, S), dtype=np.uint8)
    sl, X, Y, Z = grid.full()

    # -- body outline, fat, muscle, cavity ------------------------------------------
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

    # -- abdominal organs (painted inside the abdominal cavity only) -------------------
    belly = _lut([Label.BOWEL, Label.FAT])
    a_c = an.body_a - an.fat - an.wall_lat
    _, b_ca, b_cp = (float(v) for v in an.cavity_axes(np.float64(an.z_dome_r - 60.0)))
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

    # -- heart --------------------------------------------------------------------------
    hc, hrot = np.asarray(an.heart_center), np.asarray(an.heart_rot)
    b = grid.box(*_ellipsoid_box(hc, np.asarray(an.heart_radii) + 5.0, hrot))
    if b:
        bs, x, y, z = b
        above = z > an.diaphragm(x, y) - 3.0
        _paint(lab, bs, above & (an.heart_q(x, y, z, grow=4.0) <= 1.0), Label.FAT, _lut([Label.FAT, Label.LUNG]))
        myo = above & (an.heart_q(x, y, z) <= 1.0)
        _paint(lab, bs, myo, Label.MYOCARDIUM)
        r1, r2, r3 = an.heart_radii
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

    # -- oesophagus, aorta, airways -----------------------------------------------------
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

    # -- spine ------------------------------------------------------------------------
    _paint_spine(an, grid, lab, X, Y, Z, muscle)

    # -- rib cage, sternum, scapulae, clavicles --------------------------------------
    _paint_chest_wall(an, grid, lab, X, Y, Z, muscle, q_c)
    del q_c, muscle

    # -- pulmonary vessels (fractional occupancy; blended into lung/fat at HU time) --------
    ves = np.zeros((S, S, S), dtype=np.float32)
    vflat = ves.reshape(-1)
    r_eff_min = 0.6 * grid.spacing
    for idx, d, rloc in _segment_voxels(grid, np.asarray(an.vessels), r_eff_min):
        # area-preserving: a sub-voxel vessel becomes a fainter, voxel-wide one
        r_eff = np.maximum(rloc, r_eff_min)
        inside = d <= r_eff
        np.maximum.at(vflat, idx[inside], ((rloc[inside] / r_eff[inside]) ** 2).astype(np.float32))
    return lab, ves


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


# ----------------------------------------------------------------------------- HU


def tissue_hu(an: Anatomy, contrast: bool) -> np.ndarray:
    """Per-label HU of this patient (a 256-entry lookup table)."""
    lut = np.zeros(256, dtype=np.float32)
    for lab, (plain, enh) in NOMINAL_HU.items():
        v = plain + (enh - plain) * an.contrast_gain if contrast else plain
        if lab not in (Label.AIR, Label.AIRWAY, Label.GAS):
            v += an.hu_jitter[int(lab)]
        lut[int(lab)] = v
    return lut


def _hu_from_labels(an: Anatomy, grid: _Grid, lab: np.ndarray, ves: np.ndarray, contrast: bool) -> np.ndarray:
    lut = tissue_hu(an, contrast)
    hu = lut[lab]
    _, _, Y, _ = grid.full()
    tex = _smooth_field(an.texture[0], _TEX_H[0], grid)
    # lung: gravity-dependent density (patient supine: posterior lung denser) + texture
    lung = lab == Label.LUNG
    grad = an.lung_gradient * np.clip(-(Y - an.cy) / 120.0, -1.0, 1.0)
    hu += np.where(lung, np.broadcast_to(grad, lab.shape) + 12.0 * tex, 0.0).astype(np.float32)
    amp = np.zeros(256, dtype=np.float32)
    amp[[Label.LIVER, Label.SPLEEN, Label.SOFT_TISSUE, Label.KIDNEY]] = 5.0
    amp[[Label.BOWEL, Label.FAT]] = 8.0
    amp[[Label.VERTEBRA, Label.STERNUM]] = 25.0
    hu += amp[lab] * tex
    del tex
    # pulmonary vessels: blend blood into lung / mediastinal fat by fractional occupancy
    blood = lut[int(Label.LUNG_VESSEL)]
    blendable = _lut([Label.LUNG, Label.FAT])[lab] & (ves > 0.0)
    v = ves[blendable]
    hu[blendable] = hu[blendable] * (1.0 - v) + blood * v
    lab[blendable & (ves >= 0.5)] = Label.LUNG_VESSEL
    return hu


def make_phantom(
    size: int,
    spacing_mm: float,
    rng_or_seed: np.random.Generator | int | Sequence[int],
    contrast: bool = False,
    noise_hu: float = 12.0,
    blur_vox: float = 0.5,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One torso phantom on an isotropic ``size``³ grid of ``spacing_mm`` voxels.

    Returns ``(hu, labels, affine)``: ``hu`` float32 [S, S, S] in HU (clipped to
    [-1024, 3071]), ``labels`` uint8 [S, S, S] of :class:`Label`, ``affine`` the RAS+
    voxel→world matrix (:func:`canonical_affine`, volume centred at the origin).
    ``contrast`` selects IV contrast (enhanced blood, heart chambers, organs).
    ``noise_hu``: standard deviation of white noise; ``blur_vox``: Gaussian PSF σ in voxels
    (anti-aliasing of the analytic edges), applied before the noise.
    """
    if int(size) != size or size < MIN_SIZE:
        raise ValueError(f"size must be an integer >= {MIN_SIZE}, got {size!r}")
    if not (math.isfinite(spacing_mm) and spacing_mm > 0):
        raise ValueError(f"spacing_mm must be positive, got {spacing_mm!r}")
    if noise_hu < 0 or blur_vox < 0:
        raise ValueError("noise_hu and blur_vox must be >= 0")
    rng = rng_or_seed if isinstance(rng_or_seed, np.random.Generator) else np.random.default_rng(rng_or_seed)
    an = sample_anatomy(rng)
    noise_rng = np.random.default_rng(rng.integers(0, 2**63))
    grid = _Grid(int(size), float(spacing_mm))
    lab, ves = _rasterise(an, grid)
    hu = _hu_from_labels(an, grid, lab, ves, contrast)
    del ves
    if blur_vox > 0:
        hu = ndimage.gaussian_filter(hu, sigma=blur_vox, mode="nearest", truncate=3.0)
    if noise_hu > 0:
        hu += noise_rng.standard_normal(hu.shape, dtype=np.float32) * np.float32(noise_hu)
    np.clip(hu, HU_MIN, HU_MAX, out=hu)
    return hu, lab, canonical_affine(int(size), float(spacing_mm))


# ----------------------------------------------------------------------------- data set


def phantom_rng(seed: int, index: int) -> np.random.Generator:
    """The random stream of phantom ``index`` in the data set of ``seed`` (depends on both only)."""
    if seed < 0 or index < 0:
        raise ValueError(f"seed and index must be >= 0, got seed={seed}, index={index}")
    return np.random.default_rng(np.random.SeedSequence([int(seed), int(index)]))


def phantom_name(index: int) -> str:
    """File name of phantom ``index`` in a synthesised data set."""
    return f"phantom_{index:04d}.nii.gz"


@dataclass(frozen=True)
class SynthPhantom:
    """A data-set phantom: volume, labels, affine and its IV-contrast flag."""

    index: int
    hu: np.ndarray
    labels: np.ndarray
    affine: np.ndarray
    contrast: bool


def synth_phantom(
    seed: int,
    index: int,
    size: int,
    spacing_mm: float,
    contrast_fraction: float = 0.5,
    noise_hu: float = 12.0,
) -> SynthPhantom:
    """Phantom ``index`` of the data set ``seed``.

    The contrast draw is always taken first from the phantom's stream, so the anatomy of
    phantom ``index`` does not depend on ``contrast_fraction`` or on the other phantoms.
    """
    if not 0.0 <= contrast_fraction <= 1.0:
        raise ValueError(f"contrast_fraction must be in [0, 1], got {contrast_fraction}")
    rng = phantom_rng(seed, index)
    contrast = bool(rng.random() < contrast_fraction)
    hu, labels, affine = make_phantom(size, spacing_mm, rng, contrast=contrast, noise_hu=noise_hu)
    return SynthPhantom(index, hu, labels, affine, contrast)


# ----------------------------------------------------------------------------- writing a data set

#: name of the data-set manifest written next to the phantoms
MANIFEST_NAME = "phantoms.json"
PREVIEW_NAME = "preview.png"


def _prepare_out_dir(out_dir: Path) -> Path:
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise InputError(out_dir, "exists and is not a directory")
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise InputError(out_dir, f"cannot create the output directory ({e.strerror or e})") from None
    if not os.access(out_dir, os.W_OK | os.X_OK):
        raise InputError(out_dir, "output directory is not writable")
    return out_dir


def stale_phantoms(out_dir: str | Path, n: int) -> list[Path]:
    """Phantom files in ``out_dir`` that a data set of ``n`` phantoms did not write (an
    earlier, larger run); they are left alone but callers should say so."""
    keep = {phantom_name(i) for i in range(n)}
    return sorted(p for p in Path(out_dir).glob("phantom_*.nii.gz") if p.name not in keep)


def write_phantoms(
    out_dir: str | Path,
    synth: SynthParams,
    *,
    preview: bool = True,
    preview_count: int = 3,
    drr: Mapping[str, Any] | None = None,
    mu_water: float = 0.02,
    on_progress: Callable[[int, int], None] | None = None,
) -> list[Path]:
    """Write ``synth.n`` phantoms of data set ``synth.seed`` to ``out_dir``.

    Files: ``phantom_0000.nii.gz`` … (int16 HU, RAS+ affine centred at the origin, via
    :func:`xct_core.io.save_nifti`, atomic), ``phantoms.json`` (generator version,
    parameters, per-file contrast flag) and, with ``preview``, ``preview.png`` (the first
    ``preview_count`` phantoms: slices in soft-tissue and lung windows + frontal/lateral
    DRRs; ``drr``: keyword arguments of :func:`xct_core.viz.drr_pair`).
    ``on_progress(done, total)`` is called after each phantom. Returns the NIfTI paths.
    Raises :class:`InputError` when ``out_dir`` cannot be used.
    """
    out = _prepare_out_dir(Path(out_dir))
    paths: list[Path] = []
    shown: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    entries = []
    for i in range(synth.n):
        ph = synth_phantom(synth.seed, i, synth.size, synth.spacing_mm, synth.contrast_fraction, synth.noise_hu)
        path = out / phantom_name(i)
        try:
            save_nifti(path, ph.hu, ph.affine)
        except OSError as e:
            raise InputError(path, f"cannot write ({e.strerror or e})") from None
        paths.append(path)
        entries.append({"file": path.name, "index": i, "contrast": ph.contrast})
        if preview and len(shown) < preview_count:
            shown[f"{path.name} ({'contrast' if ph.contrast else 'no contrast'})"] = (ph.hu, ph.affine)
        if on_progress is not None:
            on_progress(i + 1, synth.n)
    manifest = {
        "generator": "xct_core.phantoms",
        "version": PHANTOM_VERSION,
        "params": synth.model_dump(mode="json"),
        "orientation": "RAS+",
        "units": "HU",
        "labels": {lab.name: int(lab) for lab in Label},
        "phantoms": entries,
    }
    _write_text_atomic(out / MANIFEST_NAME, json.dumps(manifest, indent=2) + "\n")
    if preview and shown:
        from xct_core.viz import save_ct_preview

        title = (
            f"xct phantoms · seed {synth.seed} · {synth.size}³ @ {synth.spacing_mm:g} mm "
            "· rows: soft-tissue / lung window slices, frontal + lateral DRR"
        )
        try:
            save_ct_preview(shown, out / PREVIEW_NAME, drr=drr, mu_water=mu_water, title=title)
        except OSError as e:
            raise InputError(out / PREVIEW_NAME, f"cannot write ({e.strerror or e})") from None
    return paths


def _write_text_atomic(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        mask = os.umask(0o022)
        os.umask(mask)
        os.chmod(tmp, 0o666 & ~mask)
        os.replace(tmp, path)
    except OSError as e:
        Path(tmp).unlink(missing_ok=True)
        raise InputError(path, f"cannot write ({e.strerror or e})") from None
