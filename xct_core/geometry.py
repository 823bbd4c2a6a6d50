"""Projection geometry of the two X-ray views (frontal, lateral), parallel or cone beam.

Conventions (docs/CONVENTIONS.md):

- World coordinates are RAS+ millimetres (the NIfTI world: +x = patient's Right,
  +y = Anterior, +z = Superior). Everything here is computed in world space from the
  volume's affine; array order is never used to decide which way the beam runs.
- The isocentre is the world position of the centre of the voxel grid, voxel
  ``(shape - 1) / 2``.
- frontal: beam anterior → posterior (``beam = -A``); the source sits on the patient's
  anterior side. Image columns run towards the patient's left (``u = -R``), so column 0 is
  the patient's right, as on a PA radiograph viewed by a radiologist.
- lateral: beam left → right (``beam = +R``); the source sits on the patient's left.
  Image columns run posteriorly (``u = -A``), so anterior is on the image's left.
- Rows run inferiorly in both views (``v = -S``): row 0 is superior.
- ``beam = u × v``: an image is what a camera at the source sees (x right, y down,
  z forward).
- Cone beam: point source at distance ``sod`` from the isocentre on the beam axis, flat
  detector perpendicular to the beam at distance ``sdd`` from the source; magnification
  at the isocentre ``sdd / sod``. ``pixel_mm`` is the pitch in the detector plane.
- Parallel beam: rays parallel to the beam through the detector pixel centres; the
  "source" is the centre of the plane ``sod`` before the isocentre where rays start
  (informational; parallel line integrals run through the whole volume).
- Pixel ``(col, row)`` has its centre at
  ``det_center + (col - (W-1)/2) * pixel_mm * u + (row - (H-1)/2) * pixel_mm * v``;
  :meth:`PlacedGeometry.project_normalized` gives ``grid_sample`` coordinates for
  ``align_corners=False`` (pixel centres at ``(2*col + 1)/W - 1``).
"""

from __future__ import annotations

import math
import numbers
from dataclasses import asdict, dataclass
from typing import Any, Literal

import numpy as np
import torch

from xct_core.errors import ConfigError

View = Literal["frontal", "lateral"]
Kind = Literal["parallel", "cone"]
VIEWS: tuple[str, ...] = ("frontal", "lateral")
KINDS: tuple[str, ...] = ("parallel", "cone")

Vec3 = tuple[float, float, float]

#: world (RAS+) directions of each view: beam, image columns (u), image rows (v)
VIEW_AXES: dict[str, dict[str, Vec3]] = {
    # beam A→P (source anterior); columns → patient's left (col 0 = right); rows → inferior
    "frontal": {"beam": (0.0, -1.0, 0.0), "u": (-1.0, 0.0, 0.0), "v": (0.0, 0.0, -1.0)},
    # beam L→R (source on the patient's left); columns → posterior (anterior on the left)
    "lateral": {"beam": (1.0, 0.0, 0.0), "u": (0.0, -1.0, 0.0), "v": (0.0, 0.0, -1.0)},
}

#: human-readable statement of the image convention, written into every DRR's JSON
IMAGE_CONVENTION = {
    "frontal": "row 0 = superior; col 0 = patient's right (PA radiograph display); beam anterior->posterior",
    "lateral": "row 0 = superior; col 0 = anterior; beam left->right (source on the patient's left)",
}


def _vec3(x: Any, name: str) -> Vec3:
    a = np.asarray(x, dtype=np.float64).reshape(-1)
    if a.shape != (3,) or not np.all(np.isfinite(a)):
        raise ConfigError(f"geometry: {name} must be 3 finite numbers, got {x!r}")
    return (float(a[0]), float(a[1]), float(a[2]))


def as_affine(affine: Any) -> np.ndarray:
    """A 4×4 float64 NumPy affine (voxel index → world mm) from an array or tensor."""
    if isinstance(affine, torch.Tensor):
        affine = affine.detach().cpu().numpy()
    a = np.asarray(affine, dtype=np.float64)
    if a.shape == (3, 4):
        a = np.vstack([a, [0.0, 0.0, 0.0, 1.0]])
    if a.shape != (4, 4) or not np.all(np.isfinite(a)):
        raise ValueError(f"affine must be a finite 4x4 matrix, got shape {a.shape}")
    if abs(np.linalg.det(a[:3, :3])) < 1e-12:
        raise ValueError("affine is singular")
    return a


def volume_center_world(affine: Any, shape: tuple[int, ...]) -> np.ndarray:
    """World position (mm) of the grid centre, voxel ``(shape - 1) / 2`` (the isocentre)."""
    a = as_affine(affine)
    c = (np.asarray(shape[-3:], dtype=np.float64) - 1.0) / 2.0
    return a[:3, :3] @ c + a[:3, 3]


def voxel_centers_world(
    affine: Any,
    shape: tuple[int, ...],
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """World coordinates (mm) of every voxel centre: ``[X, Y, Z, 3]`` for a grid ``shape``.

    ``out[i, j, k] = affine @ (i, j, k, 1)``. Use with :meth:`PlacedGeometry.project_normalized`
    to back-project detector features along the rendering rays.
    """
    a = torch.as_tensor(as_affine(affine), dtype=torch.float64, device=device)
    nx, ny, nz = (int(s) for s in shape[-3:])
    idx = [torch.arange(n, dtype=torch.float64, device=device) for n in (nx, ny, nz)]
    ii, jj, kk = torch.meshgrid(*idx, indexing="ij")
    ijk = torch.stack([ii, jj, kk], dim=-1)
    return (ijk @ a[:3, :3].T + a[:3, 3]).to(dtype)


@dataclass(frozen=True)
class ProjectionGeometry:
    """A view's projection geometry, independent of any particular volume.

    ``pixels``: square detector size; ``pixel_mm``: detector pitch (mm, in the detector
    plane); ``sdd``/``sod``: source-to-detector / source-to-isocentre distances (mm).
    Place it on a volume grid with :meth:`place` to get world-space rays.
    """

    view: View
    kind: Kind
    pixels: int
    pixel_mm: float
    sdd: float = 1500.0
    sod: float = 1000.0

    def __post_init__(self) -> None:
        if self.view not in VIEWS:
            raise ConfigError(f"geometry: view must be one of {', '.join(VIEWS)}, got {self.view!r}")
        if self.kind not in KINDS:
            raise ConfigError(f"geometry: kind must be one of {', '.join(KINDS)}, got {self.kind!r}")
        if isinstance(self.pixels, bool) or int(self.pixels) != self.pixels or self.pixels < 1:
            raise ConfigError(f"geometry: pixels must be a positive integer, got {self.pixels!r}")
        for name in ("pixel_mm", "sdd", "sod"):
            v = getattr(self, name)
            if isinstance(v, bool) or not (isinstance(v, numbers.Real) and math.isfinite(v) and v > 0):
                raise ConfigError(f"geometry: {name} must be a positive number of mm, got {v!r}")
        if self.sod >= self.sdd:
            raise ConfigError(f"geometry: sod ({self.sod:g} mm) must be smaller than sdd ({self.sdd:g} mm)")
        object.__setattr__(self, "pixels", int(self.pixels))
        for name in ("pixel_mm", "sdd", "sod"):
            object.__setattr__(self, name, float(getattr(self, name)))

    @classmethod
    def from_params(cls, drr_params: Any, view: View, **overrides: Any) -> ProjectionGeometry:
        """Build from a :class:`xct_core.config.DRRParams` (``params.drr``); keyword
        ``overrides`` (``kind``, ``pixels``, ``pixel_mm``, ``sdd``, ``sod``) win over it."""
        kw = {
            "kind": drr_params.geometry,
            "pixels": drr_params.pixels,
            "pixel_mm": drr_params.pixel_mm,
            "sdd": drr_params.sdd,
            "sod": drr_params.sod,
        }
        kw.update({k: v for k, v in overrides.items() if v is not None})
        return cls(view=view, **kw)

    @property
    def magnification(self) -> float:
        """Magnification at the isocentre: ``sdd / sod`` (cone), 1 (parallel)."""
        return self.sdd / self.sod if self.kind == "cone" else 1.0

    def place(self, affine: Any, shape: tuple[int, ...]) -> PlacedGeometry:
        """World-space instance for a volume grid (isocentre = the grid centre).

        ``shape`` may carry leading batch dimensions (only the last three are used).
        Raises :class:`ConfigError` when a cone-beam source would lie inside the volume.
        """
        aff = as_affine(affine)
        shp = tuple(int(s) for s in shape[-3:])
        iso = volume_center_world(aff, shp)
        axes = VIEW_AXES[self.view]
        beam = np.asarray(axes["beam"])
        source = iso - self.sod * beam
        det = source + self.sdd * beam
        if self.kind == "cone":
            # source must be outside the volume's extent box [-0.5, n-0.5] (voxel index space)
            s_vox = np.linalg.solve(aff[:3, :3], source - aff[:3, 3])
            if np.all(s_vox > -0.5) and np.all(s_vox < np.asarray(shp) - 0.5):
                raise ConfigError(
                    f"geometry: the cone-beam source ({self.sod:g} mm from the isocentre) lies inside "
                    "the volume; increase sod"
                )
        return PlacedGeometry(
            view=self.view,
            kind=self.kind,
            pixels=self.pixels,
            pixel_mm=self.pixel_mm,
            sdd=self.sdd,
            sod=self.sod,
            isocenter=_vec3(iso, "isocenter"),
            source=_vec3(source, "source"),
            beam=_vec3(beam, "beam"),
            det_center=_vec3(det, "det_center"),
            u_axis=_vec3(axes["u"], "u_axis"),
            v_axis=_vec3(axes["v"], "v_axis"),
        )


@dataclass(frozen=True)
class PlacedGeometry:
    """A projection geometry placed in world space (all vectors in RAS+ mm, axes unit).

    ``source``: the point source (cone) or the centre of the ray-start plane (parallel);
    ``beam``: unit beam direction; ``det_center``: detector centre; ``u_axis``/``v_axis``:
    unit directions of increasing image column / row. Images are ``[H, W] = [pixels, pixels]``.
    Frozen and hashable, so renderers can cache work per geometry.
    """

    view: str
    kind: str
    pixels: int
    pixel_mm: float
    sdd: float
    sod: float
    isocenter: Vec3
    source: Vec3
    beam: Vec3
    det_center: Vec3
    u_axis: Vec3
    v_axis: Vec3

    # ------------------------------------------------------------------ basics
    @property
    def shape(self) -> tuple[int, int]:
        """Image shape ``(H, W)``."""
        return (self.pixels, self.pixels)

    @property
    def magnification(self) -> float:
        """``sdd / sod`` for cone beam, 1 for parallel beam."""
        return self.sdd / self.sod if self.kind == "cone" else 1.0

    def geometry(self) -> ProjectionGeometry:
        """The volume-independent :class:`ProjectionGeometry` this was placed from."""
        return ProjectionGeometry(self.view, self.kind, self.pixels, self.pixel_mm, self.sdd, self.sod)  # type: ignore[arg-type]

    def _t(self, name: str, dtype: torch.dtype, device: Any) -> torch.Tensor:
        return torch.tensor(getattr(self, name), dtype=dtype, device=device)

    # ------------------------------------------------------------------ rays
    def pixel_centers(self, dtype: torch.dtype = torch.float32, device: Any = None) -> torch.Tensor:
        """World positions (mm) of the detector pixel centres, ``[H, W, 3]``."""
        n = self.pixels
        off = (torch.arange(n, dtype=torch.float64, device=device) - (n - 1) / 2.0) * self.pixel_mm
        u = self._t("u_axis", torch.float64, device)
        v = self._t("v_axis", torch.float64, device)
        d = self._t("det_center", torch.float64, device)
        pts = d + off[None, :, None] * u + off[:, None, None] * v  # [row, col, 3]
        return pts.to(dtype)

    def pixel_rays(
        self, dtype: torch.dtype = torch.float32, device: Any = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Ray ``origins`` and unit ``dirs`` per pixel, both ``[H, W, 3]`` in world mm.

        Cone: every origin is the source and ``dirs`` point at the pixel centres.
        Parallel: origins lie on the plane through ``source`` perpendicular to the beam and
        every direction is ``beam``. A ray ``origin + t * dir`` hits its pixel centre at
        ``t = sdd / (dir · beam)``.
        """
        q = self.pixel_centers(torch.float64, device)
        beam = self._t("beam", torch.float64, device)
        if self.kind == "cone":
            src = self._t("source", torch.float64, device)
            d = q - src
            dirs = d / d.norm(dim=-1, keepdim=True)
            origins = src.expand_as(q).clone()
        else:
            dirs = beam.expand_as(q).clone()
            origins = q - self.sdd * beam
        return origins.to(dtype), dirs.to(dtype)

    # ------------------------------------------------------------------ projection
    def project(self, points_world: torch.Tensor) -> torch.Tensor:
        """Detector position ``(col, row)`` in pixels of world points ``[..., 3]`` → ``[..., 2]``.

        Pixel centres sit at integer coordinates (pixel ``(0, 0)`` at ``(0, 0)``). Cone:
        central projection from the source onto the detector plane (points must lie in
        front of the source); parallel: orthogonal projection along the beam.
        """
        p = torch.as_tensor(points_world)
        if not p.is_floating_point():
            p = p.to(torch.float32)
        dt, dev = p.dtype, p.device
        det = self._t("det_center", dt, dev)
        if self.kind == "cone":
            src = self._t("source", dt, dev)
            ps = p - src
            depth = (ps * self._t("beam", dt, dev)).sum(-1, keepdim=True)
            rel = src + ps * (self.sdd / depth) - det  # central projection onto the detector plane
        else:
            rel = p - det
        c0 = (self.pixels - 1) / 2.0
        col = (rel * self._t("u_axis", dt, dev)).sum(-1) / self.pixel_mm + c0
        row = (rel * self._t("v_axis", dt, dev)).sum(-1) / self.pixel_mm + c0
        return torch.stack([col, row], dim=-1)

    def project_normalized(self, points_world: torch.Tensor) -> torch.Tensor:
        """``grid_sample`` coordinates ``(x=col, y=row)`` in [-1, 1] (``align_corners=False``)
        of world points ``[..., 3]`` → ``[..., 2]``; outside the detector is outside [-1, 1]."""
        cr = self.project(points_world)
        return (2.0 * cr + 1.0) / self.pixels - 1.0

    def depth(self, points_world: torch.Tensor) -> torch.Tensor:
        """Distance (mm) of world points ``[..., 3]`` from the source along the beam → ``[...]``."""
        p = torch.as_tensor(points_world)
        if not p.is_floating_point():
            p = p.to(torch.float32)
        return ((p - self._t("source", p.dtype, p.device)) * self._t("beam", p.dtype, p.device)).sum(-1)

    # ------------------------------------------------------------------ (de)serialisation
    def to_json(self) -> dict:
        """JSON-ready dict (vectors as lists, world mm) with the image convention spelled out."""
        d = asdict(self)
        for k in ("isocenter", "source", "beam", "det_center", "u_axis", "v_axis"):
            d[k] = [float(x) for x in d[k]]
        d["magnification"] = self.magnification
        d["image_shape"] = [self.pixels, self.pixels]
        d["image_convention"] = IMAGE_CONVENTION.get(self.view, "")
        d["source_side"] = {"frontal": "anterior", "lateral": "left"}.get(self.view, "")
        return d

    @classmethod
    def from_json(cls, d: dict) -> PlacedGeometry:
        """Inverse of :meth:`to_json` (extra keys, e.g. a DRR's ``mu_water``, are ignored)."""
        try:
            g = ProjectionGeometry(d["view"], d["kind"], d["pixels"], d["pixel_mm"], d["sdd"], d["sod"])
            vecs = {k: _vec3(d[k], k) for k in ("isocenter", "source", "beam", "det_center", "u_axis", "v_axis")}
        except KeyError as e:
            raise ConfigError(f"geometry JSON: missing key {e.args[0]!r}") from None
        for k in ("beam", "u_axis", "v_axis"):
            if abs(np.linalg.norm(vecs[k]) - 1.0) > 1e-6:
                raise ConfigError(f"geometry JSON: {k} must be a unit vector, got {vecs[k]}")
        return cls(g.view, g.kind, g.pixels, g.pixel_mm, g.sdd, g.sod, **vecs)
