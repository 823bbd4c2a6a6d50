"""Analytic shape maths in world millimetres (no grid): smooth steps, orthonormal frames,
ellipsoid quadratic forms and boxes, Catmull-Rom splines, and the texture-field sizes."""

from __future__ import annotations

import math

import numpy as np


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


_TEX_N = (41, 25)
_TEX_H = (15.0, 25.0)
