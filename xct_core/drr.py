"""Beer-Lambert digitally reconstructed radiographs (DRRs), differentiable w.r.t. the volume.

Physics (docs/CONVENTIONS.md): ``mu = mu_water * (1 + HU/1000)`` clamped at 0 (1/mm);
line integral ``p = ∫ mu dl`` with ``dl`` in mm (dimensionless); intensity
``I = I0 * exp(-p)``. Networks and the physics loss compare line integrals.

Volume model: the volume is the trilinear interpolant of the voxel values, replicated
out to the faces of the voxel-extent box (index ``-0.5 … n-0.5`` on each axis) and zero
outside. Both renderers below integrate that same function:

- ``"joseph"`` (fast; affine axis-aligned up to axis permutation/flips, which canonical
  volumes are): Joseph's method. Each ray is sampled where it crosses every voxel-centre
  plane perpendicular to the beam; within a plane the crossings of all rays form an
  axis-aligned grid (scaled per plane for cone beam, fixed for parallel beam), so the
  bilinear in-plane interpolation separates into two 1-D linear interpolations done with
  row gathers and sparse weighted sums (``embedding_bag``), processed a few planes at a
  time so intermediates stay in cache. The step is ``|spacing along beam| / cos(angle to
  the beam)``. Parallel beam sums the volume along the beam first (exact for this model).
  Cone beam runs as a custom autograd function whose backward is the exact adjoint
  (back-projection along the same rays).
- ``"reference"`` (any affine): ``grid_sample`` ray marching in world mm, each ray clipped
  to the volume box and cut into equal steps no longer than ``step_fraction`` × the
  smallest voxel spacing (midpoint rule).

``method="auto"`` picks Joseph when it applies. Tensors of any device (CPU/CUDA) and
floating dtype work; batched volumes ``[B, X, Y, Z]`` share one affine.
"""

from __future__ import annotations

import math
import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from xct_core.geometry import PlacedGeometry, ProjectionGeometry, as_affine

Quantity = Literal["line_integral", "intensity"]
Method = Literal["auto", "joseph", "reference"]
QUANTITIES: tuple[str, ...] = ("line_integral", "intensity")
METHODS: tuple[str, ...] = ("auto", "joseph", "reference")

#: target number of elements of one Joseph chunk's intermediate (planes × detector dim ×
#: content axis); ~2 MB in float32, so a chunk's gather/transpose/sum stays in cache
_CHUNK_ELEMS = 1 << 19
#: reference ray marcher: samples per grid_sample call
_REF_CHUNK_SAMPLES = 1 << 21


# --------------------------------------------------------------------------- physics


def hu_to_mu(hu: Any, mu_water: float = 0.02) -> Any:
    """Linear attenuation (1/mm) from HU: ``mu_water * (1 + HU/1000)``, clamped at 0.

    Works on NumPy arrays (returns float32 or wider) and torch tensors (keeps autograd).
    """
    if mu_water <= 0:
        raise ValueError(f"mu_water must be positive, got {mu_water}")
    if isinstance(hu, torch.Tensor):
        x = hu if hu.is_floating_point() else hu.to(torch.float32)
        if x.requires_grad:
            return torch.clamp_min(x * (mu_water / 1000.0) + mu_water, 0.0)
        return torch.add(x, 1000.0).mul_(mu_water / 1000.0).clamp_min_(0.0)
    a = np.asarray(hu)
    a = a.astype(np.result_type(a.dtype, np.float32), copy=False)
    return np.maximum((a + 1000.0) * (mu_water / 1000.0), 0.0)


def line_integral_to_intensity(p: torch.Tensor, i0: float = 1.0) -> torch.Tensor:
    """Beer-Lambert: ``I = I0 * exp(-p)``."""
    return i0 * torch.exp(-p)


def display_image(img: Any, quantity: Quantity = "line_integral", i0: float = 1.0) -> np.ndarray:
    """uint8 radiograph-style preview of a DRR ``[H, W]``: dense (high attenuation) is white.

    Intensities are converted back to attenuation ``-ln(I/I0)``; the grey scale spans
    ``[0, 99.8th percentile]`` of the attenuation.
    """
    a = img.detach().cpu().numpy() if isinstance(img, torch.Tensor) else np.asarray(img)
    a = a.astype(np.float64)
    if quantity == "intensity":
        a = -np.log(np.clip(a / i0, 1e-12, None))
    top = float(np.percentile(a, 99.8)) if a.size else 0.0
    scaled = np.clip(a / top, 0.0, 1.0) if top > 0 else np.zeros_like(a)
    return np.round(scaled * 255.0).astype(np.uint8)


# --------------------------------------------------------------------------- helpers


@dataclass(frozen=True)
class _AxisMap:
    """An affine that is a scaled signed axis permutation (plus translation)."""

    world_axis: tuple[int, int, int]  # world axis (0=R, 1=A, 2=S) of each array axis
    spacing: tuple[float, float, float]  # signed mm per index step along that world axis
    origin: tuple[float, float, float]  # world position of voxel (0, 0, 0)

    def permuted(self, perm: tuple[int, int, int]) -> _AxisMap:
        return _AxisMap(
            tuple(self.world_axis[k] for k in perm),  # type: ignore[arg-type]
            tuple(self.spacing[k] for k in perm),  # type: ignore[arg-type]
            self.origin,
        )


def _axis_map(affine: np.ndarray, shape: tuple[int, int, int], tol: float = 1e-3) -> _AxisMap | None:
    """The affine as an axis map, or None when it is oblique.

    Off-axis terms are tolerated while they move no voxel by more than ``tol`` × the
    smallest spacing across the grid.
    """
    m = affine[:3, :3]
    wa = np.argmax(np.abs(m), axis=0)
    if sorted(wa.tolist()) != [0, 1, 2]:
        return None
    sp = np.array([m[wa[k], k] for k in range(3)])
    off = m.copy()
    for k in range(3):
        off[wa[k], k] = 0.0
    drift = np.abs(off) @ (np.asarray(shape, dtype=np.float64))
    if drift.max() > tol * np.abs(sp).min():
        return None
    return _AxisMap(tuple(int(w) for w in wa), tuple(float(s) for s in sp), tuple(float(o) for o in affine[:3, 3]))  # type: ignore[arg-type]


def _unit_axis(vec: tuple[float, float, float]) -> int | None:
    v = np.asarray(vec)
    k = int(np.argmax(np.abs(v)))
    rest = np.abs(np.delete(v, k))
    return k if abs(abs(v[k]) - 1.0) < 1e-9 and rest.max() < 1e-9 else None


def _interp_weights(
    x: torch.Tensor, n: int, dx: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """1-D linear interpolation at fractional indices ``x`` on a grid of ``n`` samples.

    Inside ``[-0.5, n-0.5]`` the value is interpolated (replicated within the half voxel at
    each end); outside, both weights are 0. ``dx`` (optional, broadcastable to ``x``): how
    far ``x`` moves over one beam step; the weights are then scaled by the fraction of that
    step ``[x - |dx|/2, x + |dx|/2]`` that lies inside, so rays leaving through a side face
    are clipped at the face (as in the reference renderer). Returns ``(i0, i1, w0, w1)``.
    """
    lo, hi = -0.5, n - 0.5
    if dx is None:
        frac = ((x >= lo) & (x <= hi)).to(x.dtype)
    else:
        h = (dx.abs() / 2).expand_as(x)
        inside = (torch.minimum(x + h, torch.full_like(x, hi)) - torch.maximum(x - h, torch.full_like(x, lo))).clamp_min(0)
        frac = torch.where(h > 0, (inside / h.clamp_min(1e-30) / 2).clamp(max=1.0), ((x >= lo) & (x <= hi)).to(x.dtype))
    xc = x.clamp(0.0, float(n - 1))
    i0 = xc.floor().clamp(max=max(n - 2, 0)).long()
    f = xc - i0
    i1 = (i0 + 1).clamp(max=n - 1)
    return i0, i1, (1.0 - f) * frac, f * frac


def _csr_rows(cols: torch.Tensor, vals: torch.Tensor):
    """CSR ``(offsets, cols, vals)`` of a matrix given row by row: ``cols``/``vals`` are
    ``[n_rows, k]`` (entry e of row r); zero weights are dropped."""
    keep = vals != 0
    offsets = torch.zeros(cols.shape[0] + 1, dtype=torch.long, device=cols.device)
    offsets[1:] = torch.cumsum(keep.sum(1), 0)
    return offsets, cols[keep].contiguous(), vals[keep].contiguous()


def _csr_transpose(csr: tuple[torch.Tensor, torch.Tensor, torch.Tensor], n_cols: int):
    """CSR of the transpose of a CSR matrix with ``n_cols`` columns."""
    offsets, cols, vals = csr
    rows = torch.repeat_interleave(torch.arange(offsets.numel() - 1, device=cols.device), offsets.diff())
    order = torch.sort(cols, stable=True).indices
    t_off = torch.zeros(n_cols + 1, dtype=torch.long, device=cols.device)
    t_off[1:] = torch.cumsum(torch.bincount(cols, minlength=n_cols), 0)
    return t_off, rows[order].contiguous(), vals[order].contiguous()


def _csr_mm(csr: tuple[torch.Tensor, torch.Tensor, torch.Tensor], dense: torch.Tensor) -> torch.Tensor:
    """CSR matrix @ dense ``[n_cols, k]`` → ``[n_rows, k]`` (a weighted row-gather-sum)."""
    offsets, cols, vals = csr
    return F.embedding_bag(cols, dense, offsets=offsets, mode="sum", per_sample_weights=vals, include_last_offset=True)


# --------------------------------------------------------------------------- Joseph plan


@dataclass(frozen=True)
class _Layout:
    """Which array axis plays which role for one (volume grid, geometry) pair.

    The plan runs on ``vol.permute(0, *(1 + p for p in perm))`` made contiguous, so its
    last axis (``kc``) is the one contiguous in memory; ``perm`` is chosen from the input's
    strides so that this costs no copy unless the beam runs along the contiguous axis.
    """

    amap: _AxisMap  # axis map of the permuted volume the plan runs on
    perm: tuple[int, int, int]  # array-axis permutation applied to the volume first
    kb: int  # array axis (after perm) along the beam
    ki: int  # the other in-plane axis, interpolated first (0 or 1)
    kc: int  # the contiguous in-plane axis (always 2), interpolated second
    ki_is_col: bool  # True when ki maps to image columns (then kc maps to rows)


def _layout(amap: _AxisMap, pg: PlacedGeometry, strides: tuple[int, int, int] = (2, 1, 0)) -> _Layout | None:
    """Roles of the array axes, or None when the geometry is not axis-aligned.

    ``strides``: memory strides of the three spatial axes (default: C order).
    """
    wb, wu, wv = _unit_axis(pg.beam), _unit_axis(pg.u_axis), _unit_axis(pg.v_axis)
    if wb is None or wu is None or wv is None or len({wb, wu, wv}) != 3:
        return None
    kb0 = amap.world_axis.index(wb)
    order = sorted(range(3), key=lambda k: (-strides[k], k))  # slowest … fastest in memory
    if order[2] == kb0:  # beam along the contiguous axis: put it first (costs one copy)
        order = [kb0] + [k for k in range(3) if k != kb0]
    perm = (order[0], order[1], order[2])
    pm = amap.permuted(perm)
    kb = perm.index(kb0)
    ki = 1 - kb
    return _Layout(pm, perm, kb, ki, 2, pm.world_axis[ki] == wu)


@dataclass(frozen=True)
class _Chunk:
    """A run of consecutive beam planes ``p0 … p0+m-1`` of a Joseph cone-beam operator.

    Stage 1 interpolates along ``ki`` (a weighted sum of two rows of the flattened
    ``[A0*A1, A2]`` volume per entry: ``rows``, ``w``), giving ``[(plane, q_i), A2]``; stage 2 is the
    CSR matrix ``s2`` (image index ``q_c`` × ``(plane, kc index)``) that interpolates along
    ``kc`` and sums the planes. ``s2t`` and ``s1t`` are the transposes used by the adjoint.
    """

    p0: int
    m: int
    rows: torch.Tensor  # [m*N, 2] long: the two volume rows each (plane, q_i) interpolates
    w: torch.Tensor  # [m*N, 2] their weights
    s2: tuple[torch.Tensor, torch.Tensor, torch.Tensor]
    s2t: tuple[torch.Tensor, torch.Tensor, torch.Tensor]
    s1t: tuple[torch.Tensor, torch.Tensor, torch.Tensor]


class _JosephCone:
    """Precomputed Joseph cone-beam operator for one grid, geometry, dtype and device.

    Works on the permuted volume of :class:`_Layout` (``[B, A0, A1, A2]`` contiguous, beam
    along ``kb`` ∈ {0, 1}, ``kc`` = 2 contiguous). ``N`` = detector size.
    """

    def __init__(self, lay: _Layout, shape: tuple[int, int, int], pg: PlacedGeometry, dtype, device):
        self.shape = shape
        self.lay = lay
        self.N = N = pg.pixels
        f64 = dict(dtype=torch.float64, device=device)
        am = lay.amap
        src = torch.tensor(pg.source, **f64)
        det = torch.tensor(pg.det_center, **f64)
        wb = am.world_axis[lay.kb]
        zb = am.origin[wb] + am.spacing[lay.kb] * torch.arange(shape[lay.kb], **f64)
        t_all = (zb - src[wb]) / (det[wb] - src[wb])  # per plane: fraction of the way source → detector
        planes = torch.nonzero(t_all > 0).flatten()  # planes behind the source do not count
        self.all_planes = planes.numel() == shape[lay.kb]
        t = t_all[planes]
        dt = am.spacing[lay.kb] / (det[wb] - src[wb])  # change of t from one plane to the next
        off = (torch.arange(N, **f64) - (N - 1) / 2.0) * pg.pixel_mm  # pixel offsets on the detector

        def coords(k: int, axis_vec: tuple[float, float, float]) -> tuple[torch.Tensor, torch.Tensor]:
            """Fractional index along array axis k where each ray crosses each plane
            ([P, N]), and its change from one plane to the next ([1, N])."""
            wa = am.world_axis[k]
            q = det[wa] + off * axis_vec[wa]  # detector coordinate along wa, per pixel
            x = src[wa] + t[:, None] * (q[None, :] - src[wa])
            return (x - am.origin[wa]) / am.spacing[k], (q[None, :] - src[wa]) * dt / am.spacing[k]

        xi, dxi = coords(lay.ki, pg.u_axis if lay.ki_is_col else pg.v_axis)
        xc, dxc = coords(lay.kc, pg.v_axis if lay.ki_is_col else pg.u_axis)
        nvi, nvc = shape[lay.ki], shape[lay.kc]
        i0, i1, w0, w1 = _interp_weights(xi, nvi, dxi)  # [P, N]
        j0, j1, v0, v1 = _interp_weights(xc, nvc, dxc)
        rstride = (shape[1], 1)  # row of the flattened [A0*A1, A2] volume = idx0 * A1 + idx1
        rows0 = planes[:, None] * rstride[lay.kb] + i0 * rstride[lay.ki]
        rows1 = planes[:, None] * rstride[lay.kb] + i1 * rstride[lay.ki]

        # step length per pixel: |spacing along the beam| / cos(angle between ray and beam)
        step = abs(am.spacing[lay.kb]) * torch.sqrt(pg.sdd**2 + off[None, :] ** 2 + off[:, None] ** 2) / pg.sdd
        self.step = step.to(dtype)  # [H, W]

        n_p = int(t.numel())
        pc = max(1, min(n_p, _CHUNK_ELEMS // max(N * nvc, 1)))
        self.chunks: list[_Chunk] = []
        for a in range(0, n_p, pc):
            sl = slice(a, min(n_p, a + pc))
            m = sl.stop - a
            loc = torch.arange(m, device=device)[:, None]  # local plane index
            s2 = _csr_rows(torch.cat([loc * nvc + j0[sl], loc * nvc + j1[sl]]).t(), torch.cat([v0[sl], v1[sl]]).t().to(dtype))
            # stage 1 as a CSR matrix, rows (loc, q), entries (loc, ki index); its transpose
            # (row (loc, n) collects the rays that read voxel n) is the stage-1 adjoint
            s1 = _csr_rows(
                torch.stack([(loc * nvi + i0[sl]).reshape(-1), (loc * nvi + i1[sl]).reshape(-1)], 1),
                torch.stack([w0[sl].reshape(-1), w1[sl].reshape(-1)], 1).to(dtype),
            )  # [(loc, q)] × [(loc, n)]
            s1t = _csr_transpose(s1, m * nvi)
            self.chunks.append(
                _Chunk(
                    p0=int(planes[a]),
                    m=m,
                    rows=torch.stack([rows0[sl].reshape(-1), rows1[sl].reshape(-1)], 1).contiguous(),
                    w=torch.stack([w0[sl].reshape(-1), w1[sl].reshape(-1)], 1).to(dtype).contiguous(),
                    s2=s2,
                    s2t=_csr_transpose(s2, m * nvc),
                    s1t=s1t,
                )
            )

    def forward(self, vol: torch.Tensor) -> torch.Tensor:
        """``vol [B, A0, A1, A2]`` (contiguous) → line integrals ``[B, H, W]``."""
        B, N = vol.shape[0], self.N
        a0, a1, a2 = self.shape
        out = []
        for flat in vol.reshape(B, a0 * a1, a2):
            acc = torch.zeros(N, N, dtype=vol.dtype, device=vol.device)  # [q_c, q_i]
            for c in self.chunks:
                g = F.embedding_bag(c.rows, flat, per_sample_weights=c.w, mode="sum")  # [(plane, q_i), A2]
                gt = torch.empty(c.m, a2, N, dtype=vol.dtype, device=vol.device)
                gt.copy_(g.view(c.m, N, a2).transpose(1, 2))  # [(plane, kc index), q_i]
                acc += _csr_mm(c.s2, gt.view(c.m * a2, N))
            out.append((acc if self.lay.ki_is_col else acc.t()) * self.step)
        return torch.stack(out)

    def adjoint(self, grad: torch.Tensor) -> torch.Tensor:
        """Back-projection, the exact adjoint of :meth:`forward`: ``[B, H, W]`` → ``[B, A0, A1, A2]``."""
        B, N = grad.shape[0], self.N
        a0, a1, a2 = self.shape
        kb, nvi = self.lay.kb, self.shape[self.lay.ki]
        alloc = torch.empty if self.all_planes else torch.zeros  # chunks cover every plane → no zero fill
        res = alloc(B, a0, a1, a2, dtype=grad.dtype, device=grad.device)
        for bi in range(B):
            g = grad[bi] * self.step
            g = (g if self.lay.ki_is_col else g.t()).contiguous()  # [q_c, q_i]
            for c in self.chunks:
                ga = _csr_mm(c.s2t, g)  # [(plane, kc index), q_i]
                gt = torch.empty(c.m, N, a2, dtype=grad.dtype, device=grad.device)
                gt.copy_(ga.view(c.m, a2, N).transpose(1, 2))  # [(plane, q_i), A2]
                gv = _csr_mm(c.s1t, gt.view(c.m * N, a2)).view(c.m, nvi, a2)  # [(plane, ki index), A2]
                target = res[bi].narrow(kb, c.p0, c.m)
                target.copy_(gv if kb == 0 else gv.transpose(0, 1))
        return res


class _JosephConeFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, vol: torch.Tensor, op: _JosephCone) -> torch.Tensor:  # type: ignore[override]
        ctx.op = op
        return op.forward(vol)

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad: torch.Tensor):  # type: ignore[override]
        return ctx.op.adjoint(grad.contiguous()), None


_PLAN_CACHE: OrderedDict[tuple, _JosephCone] = OrderedDict()
_PLAN_LOCK = threading.Lock()
_PLAN_CACHE_SIZE = 8


def _cone_plan(lay: _Layout, shape: tuple[int, int, int], pg: PlacedGeometry, dtype, device) -> _JosephCone:
    key = (lay, shape, pg, dtype, str(device))
    with _PLAN_LOCK:
        op = _PLAN_CACHE.get(key)
        if op is not None:
            _PLAN_CACHE.move_to_end(key)
            return op
    op = _JosephCone(lay, shape, pg, dtype, device)
    with _PLAN_LOCK:
        _PLAN_CACHE[key] = op
        while len(_PLAN_CACHE) > _PLAN_CACHE_SIZE:
            _PLAN_CACHE.popitem(last=False)
    return op


def _interp_matrix(x: torch.Tensor, n: int, dtype) -> torch.Tensor:
    """Dense ``[len(x), n]`` linear-interpolation matrix (see :func:`_interp_weights`)."""
    i0, i1, w0, w1 = _interp_weights(x, n)
    m = torch.zeros(x.numel(), n, dtype=torch.float64, device=x.device)
    r = torch.arange(x.numel(), device=x.device)
    m.index_put_((r, i0), w0, accumulate=True)
    m.index_put_((r, i1), w1, accumulate=True)
    return m.to(dtype)


def _joseph_parallel(vol: torch.Tensor, lay: _Layout, pg: PlacedGeometry) -> torch.Tensor:
    """Parallel beam: sum along the beam, then separable bilinear resampling to the detector."""
    am = lay.amap
    f64 = dict(dtype=torch.float64, device=vol.device)
    off = (torch.arange(pg.pixels, **f64) - (pg.pixels - 1) / 2.0) * pg.pixel_mm
    det = pg.det_center

    def matrix(k: int, axis_vec: tuple[float, float, float]) -> torch.Tensor:
        wa = am.world_axis[k]
        x = (det[wa] + off * axis_vec[wa] - am.origin[wa]) / am.spacing[k]
        return _interp_matrix(x, vol.shape[1 + k], vol.dtype)

    proj = vol.sum(dim=1 + lay.kb)  # [B, n_ki, n_kc] (ki < kc always)
    mi = matrix(lay.ki, pg.u_axis if lay.ki_is_col else pg.v_axis)  # [N_img, n_ki]
    mc = matrix(lay.kc, pg.v_axis if lay.ki_is_col else pg.u_axis)  # [N_img, n_kc]
    img = mi @ proj @ mc.t()  # [B, img(ki), img(kc)]
    if lay.ki_is_col:
        img = img.transpose(1, 2)
    return img * abs(am.spacing[lay.kb])


# --------------------------------------------------------------------------- reference


def _render_reference(mu: torch.Tensor, affine: np.ndarray, pg: PlacedGeometry, step_fraction: float) -> torch.Tensor:
    """``grid_sample`` ray marching: ``mu [B, A0, A1, A2]`` → line integrals ``[B, H, W]``."""
    dev, dt = mu.device, mu.dtype
    B = mu.shape[0]
    shape = torch.tensor(mu.shape[1:], dtype=torch.float64, device=dev)
    origins, dirs = pg.pixel_rays(torch.float64, dev)
    inv = torch.as_tensor(np.linalg.inv(affine), dtype=torch.float64, device=dev)
    o = origins.reshape(-1, 3) @ inv[:3, :3].T + inv[:3, 3]  # voxel-index coordinates
    d = dirs.reshape(-1, 3) @ inv[:3, :3].T  # index units per mm
    lo, hi = torch.full_like(shape, -0.5), shape - 0.5
    with torch.no_grad():
        safe = torch.where(d.abs() < 1e-12, torch.full_like(d, 1e-12), d)
        t1, t2 = (lo - o) / safe, (hi - o) / safe
        tmin = torch.minimum(t1, t2)
        tmax = torch.maximum(t1, t2)
        par = d.abs() < 1e-12  # parallel to a face: inside the slab or not at all
        inside = (o >= lo) & (o <= hi)
        tmin = torch.where(par, torch.where(inside, torch.full_like(tmin, -math.inf), torch.full_like(tmin, math.inf)), tmin)
        tmax = torch.where(par, torch.where(inside, torch.full_like(tmax, math.inf), torch.full_like(tmax, -math.inf)), tmax)
        t_in = tmin.max(dim=1).values
        t_out = tmax.min(dim=1).values
        if pg.kind == "cone":
            t_in = t_in.clamp_min(0.0)
        length = (t_out - t_in).clamp_min(0.0)
        length = torch.where(torch.isfinite(length), length, torch.zeros_like(length))
        t_in = torch.where(length > 0, t_in, torch.zeros_like(t_in))
    spacing = np.sqrt((affine[:3, :3] ** 2).sum(axis=0))
    step = step_fraction * float(spacing.min())
    n_steps = max(1, int(math.ceil(float(length.max()) / step))) if float(length.max()) > 0 else 1
    dtl = length / n_steps  # per-ray step (mm), ≤ step
    vol5 = mu.unsqueeze(0)  # [1, B, A0, A1, A2]: batch as channels, one shared grid
    n_rays = o.shape[0]
    rays_per = max(1, _REF_CHUNK_SAMPLES // n_steps)
    k = torch.arange(n_steps, dtype=torch.float64, device=dev) + 0.5
    out = []
    for a in range(0, n_rays, rays_per):
        sl = slice(a, min(n_rays, a + rays_per))
        tt = t_in[sl, None] + k[None, :] * dtl[sl, None]  # [R, K]
        pts = o[sl, None, :] + tt[..., None] * d[sl, None, :]  # [R, K, 3] index coords (i, j, k)
        g = (2.0 * pts + 1.0) / shape - 1.0
        grid = g.flip(-1).to(dt)[None, :, :, None, :]  # (x, y, z) = (k, j, i)
        s = F.grid_sample(vol5, grid, mode="bilinear", padding_mode="border", align_corners=False)
        out.append(s[0, :, :, :, 0].sum(-1) * dtl[sl].to(dt))  # [B, R]
    return torch.cat(out, dim=1).reshape(B, pg.pixels, pg.pixels)


# --------------------------------------------------------------------------- public API


def _to_tensor(v: Any) -> torch.Tensor:
    if isinstance(v, np.ndarray) and any(st < 0 for st in v.strides):
        v = v.copy(order="K")  # torch cannot view flipped (negative-stride) arrays
    return torch.as_tensor(v)


def _as_volume(v: Any) -> tuple[torch.Tensor, bool]:
    t = _to_tensor(v)
    if not t.is_floating_point():
        t = t.to(torch.float32)
    if t.dim() == 3:
        return t.unsqueeze(0), False
    if t.dim() == 4:
        return t, True
    raise ValueError(f"volume must be [X, Y, Z] or [B, X, Y, Z], got shape {tuple(t.shape)}")


def _place(geom: ProjectionGeometry | PlacedGeometry, affine: np.ndarray, shape: tuple[int, ...]) -> PlacedGeometry:
    if isinstance(geom, PlacedGeometry):
        return geom
    if isinstance(geom, ProjectionGeometry):
        return geom.place(affine, shape)
    raise TypeError(f"geom must be a ProjectionGeometry or PlacedGeometry, got {type(geom).__name__}")


def joseph_applies(affine: Any, geom: ProjectionGeometry | PlacedGeometry, shape: tuple[int, ...]) -> bool:
    """Whether the fast Joseph renderer handles this affine and geometry (axis-aligned)."""
    aff = as_affine(affine)
    amap = _axis_map(aff, tuple(int(s) for s in shape[-3:]))  # type: ignore[arg-type]
    return amap is not None and _layout(amap, _place(geom, aff, shape)) is not None


def render_mu(
    mu: Any,
    affine: Any,
    geom: ProjectionGeometry | PlacedGeometry,
    *,
    method: Method = "auto",
    step_fraction: float = 0.5,
) -> torch.Tensor:
    """Line integrals ``∫ mu dl`` (dimensionless) of an attenuation volume (1/mm).

    ``mu``: ``[X, Y, Z]`` or ``[B, X, Y, Z]`` (array or tensor, any device); ``affine``:
    4×4 voxel → world mm shared by the batch; ``geom``: a :class:`ProjectionGeometry`
    (placed on this grid, isocentre = grid centre) or an already placed geometry.
    Returns ``[H, W]`` or ``[B, H, W]`` in ``mu``'s dtype/device, differentiable w.r.t. ``mu``.
    ``method``: ``"auto"`` | ``"joseph"`` (raises ValueError for oblique affines) |
    ``"reference"``; ``step_fraction`` (reference only): step / smallest voxel spacing.
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    vol, batched = _as_volume(mu)
    aff = as_affine(affine)
    shape = tuple(int(s) for s in vol.shape[1:])
    pg = _place(geom, aff, shape)
    lay = None
    if method != "reference":
        amap = _axis_map(aff, shape)  # type: ignore[arg-type]
        strides = tuple(int(s) for s in vol.stride()[1:])
        lay = _layout(amap, pg, strides) if amap is not None else None  # type: ignore[arg-type]
        if lay is None and method == "joseph":
            raise ValueError("joseph renderer needs an axis-aligned affine and geometry; use method='reference'")
    if lay is None:
        img = _render_reference(vol, aff, pg, step_fraction)
    else:
        vol = vol.permute(0, *(1 + p for p in lay.perm))
        if pg.kind == "parallel":
            img = _joseph_parallel(vol, lay, pg)  # a sum along the beam: any memory layout
        else:
            vol = vol.contiguous()  # a no-op unless the beam runs along the contiguous axis
            shp = tuple(int(s) for s in vol.shape[1:])
            op = _cone_plan(lay, shp, pg, vol.dtype, vol.device)  # type: ignore[arg-type]
            img = _JosephConeFn.apply(vol, op)
    return img if batched else img[0]


def render(
    volume_hu: Any,
    affine: Any,
    geom: ProjectionGeometry | PlacedGeometry,
    *,
    mu_water: float = 0.02,
    quantity: Quantity = "line_integral",
    i0: float = 1.0,
    method: Method = "auto",
    step_fraction: float = 0.5,
) -> torch.Tensor:
    """DRR of a HU volume: ``[X, Y, Z]`` → ``[H, W]`` or ``[B, X, Y, Z]`` → ``[B, H, W]``.

    ``quantity="line_integral"`` (default): ``p = ∫ mu dl`` with ``mu = hu_to_mu(HU,
    mu_water)``; ``"intensity"``: ``I0 * exp(-p)``. Image convention: row 0 superior;
    frontal shows the patient's right on the left columns, lateral shows anterior on the
    left columns (see :mod:`xct_core.geometry`).
    """
    if quantity not in QUANTITIES:
        raise ValueError(f"quantity must be one of {QUANTITIES}, got {quantity!r}")
    mu = hu_to_mu(_to_tensor(volume_hu), mu_water)
    p = render_mu(mu, affine, geom, method=method, step_fraction=step_fraction)
    return p if quantity == "line_integral" else line_integral_to_intensity(p, i0)
