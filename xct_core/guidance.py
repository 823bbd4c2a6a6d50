"""DRR data consistency inside DDIM: the two X-rays are measurements, not only features.

:class:`DataConsistency` is an ``x0_fn`` of :func:`xct_core.diffusion.ddim_step`: at every
sampler step it moves the x0 prediction toward the input line integrals with SIRT steps
(simultaneous iterative reconstruction technique, Gilbert 1972) in attenuation units::

    mu  ← max(0, mu + λ · C⁻¹ Pᵀ R⁻¹ (y − P mu)),   R = P 1 (row sums),  C = Pᵀ 1 (column sums)

with ``P = bin ∘ render`` the differentiable renderer (:func:`xct_core.drr.render_mu`, the one
the training DRRs and the physics loss use) on the stage grid with the training geometry,
followed by average-binning of the detector by the stage's X-ray binning (about one voxel's
footprint on the detector: a 16³ stage cannot reproduce the 128² detector's detail, its
binned image it can), ``y`` the binned input views and ``Pᵀ`` by autograd (P is linear in mu).
λ ∈ (0, 2) is SIRT's stable range. mu = mu_water·(1 + HU/1000); HU ↔ network units through the
networks' HU map (``params.hu.output``), whose range clips the result.

Meaningful only for networks whose output is a CT (a full-range ``hu.output``): a
window-clipped volume renders −200 HU air, and matching the line integrals would push soft
tissue down. For an anchored (residual-diffusion) stage the sampler's x0 is the residual
``r``; the correction is applied to the volume ``anchor + scale·r`` and returned as a residual.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F

from xct_core.drr import render_mu
from xct_core.hu import HUMap

if TYPE_CHECKING:  # pragma: no cover
    from xct_core.config import DRRParams, Params

__all__ = ["DataConsistency", "Guidance"]


class DataConsistency:
    """SIRT data-consistency step on x0 predictions of one stage (module docstring).

    Args:
        hmap: the networks' HU map (units ↔ HU).
        affine: the stage grid's voxel → world affine (origin-centred: the training geometry's frame).
        geometries: ``{"frontal": ProjectionGeometry, "lateral": …}`` (the training geometry).
        views: ``{"frontal": [B, 1, H, W] or [B, H, W] line integrals, …}`` (the input X-rays).
        mu_water: 1/mm. weight: SIRT relaxation λ (0 = off). iters: SIRT steps per sampler step.
        bin: detector binning before comparing (1 = the full detector).
        anchor, scale: residual mode (x0 = anchor + scale · r; ``anchor`` in network units).
    """

    def __init__(
        self,
        hmap: HUMap,
        affine: np.ndarray,
        geometries: Mapping[str, Any],
        views: Mapping[str, torch.Tensor],
        *,
        mu_water: float = 0.02,
        weight: float = 1.0,
        iters: int = 1,
        bin: int = 1,
        anchor: torch.Tensor | None = None,
        scale: float = 1.0,
    ) -> None:
        self.hmap, self.affine = hmap, np.asarray(affine, dtype=np.float64)
        self.geoms = dict(geometries)
        self.mu_water, self.weight, self.iters, self.bin = float(mu_water), float(weight), int(iters), int(bin)
        self.anchor, self.scale = anchor, float(scale)
        self.y = {v: self._pool(img.reshape(-1, *img.shape[-2:]).float()) for v, img in views.items()}
        self._R: dict[str, torch.Tensor] = {}
        self._C: torch.Tensor | None = None

    def _pool(self, img: torch.Tensor) -> torch.Tensor:
        return F.avg_pool2d(img[:, None], self.bin)[:, 0] if self.bin > 1 else img

    def project(self, mu: torch.Tensor) -> dict[str, torch.Tensor]:
        """``{view: P mu}`` of ``mu`` ``[B, X, Y, Z]`` (1/mm), binned."""
        return {v: self._pool(render_mu(mu, self.affine, g)) for v, g in self.geoms.items()}

    def _adjoint(self, like: torch.Tensor, resid: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """``Σ_v P_vᵀ resid_v`` (autograd through the linear renderer)."""
        with torch.enable_grad():
            z = torch.zeros_like(like, requires_grad=True)
            proj = self.project(z)
            (g,) = torch.autograd.grad(sum((proj[v] * resid[v]).sum() for v in proj), z)
        return g

    def _norms(self, like: torch.Tensor) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        if self._C is None or self._C.shape != like.shape:
            ones = torch.ones_like(like)
            self._R = {v: p.clamp(min=1e-6) for v, p in self.project(ones).items()}
            self._C = self._adjoint(like, {v: torch.ones_like(p) for v, p in self._R.items()}).clamp(min=1e-6)
        return self._R, self._C

    @torch.no_grad()
    def sirt(self, hu: torch.Tensor) -> torch.Tensor:
        """``iters`` SIRT steps on a HU volume ``[B, X, Y, Z]`` → HU."""
        mu = self.mu_water * (1.0 + hu.float() / 1000.0)
        R, C = self._norms(mu)
        for _ in range(self.iters):
            proj = self.project(mu)
            resid = {v: (self.y[v].to(mu) - proj[v]) / R[v] for v in proj}
            mu = (mu + self.weight * self._adjoint(mu, resid) / C).clamp(min=0.0)
        return (mu / self.mu_water - 1.0) * 1000.0

    def residual(self, hu: torch.Tensor) -> float:
        """Mean squared binned line-integral error of a HU volume ``[B, X, Y, Z]`` (both views)."""
        proj = self.project(self.mu_water * (1.0 + hu.float() / 1000.0))
        return float(sum(((proj[v] - self.y[v].to(proj[v])) ** 2).mean() for v in proj))

    def __call__(self, x0: torch.Tensor, t: int) -> torch.Tensor:
        """The ``x0_fn`` hook: ``x0`` ``[B, 1, S, S, S]`` network units (or the residual) → corrected."""
        if self.weight <= 0:
            return x0
        vol = x0 if self.anchor is None else self.anchor + self.scale * x0
        new = self.hmap.forward(self.sirt(self.hmap.inverse(vol[:, 0].float())))[:, None].to(x0.dtype)
        return new if self.anchor is None else (new - self.anchor) / self.scale


@dataclass(frozen=True)
class Guidance:
    """The sampler's data-consistency settings (``diffusion.guidance_*``), resolved once; it
    builds each stage's :class:`DataConsistency` for the X-rays being reconstructed."""

    hmap: HUMap
    drr: DRRParams
    mu_water: float
    weight: float
    iters: int

    @classmethod
    def from_params(cls, params: Params) -> Guidance:
        d = params.diffusion
        return cls(params.hu.net_map(), params.drr, float(params.hu.mu_water), float(d.guidance_weight),
                   int(d.guidance_iters))

    def for_stage(self, net: Any, frontal: torch.Tensor, lateral: torch.Tensor, *,
                  anchor: torch.Tensor | None = None) -> Callable[[torch.Tensor, int], torch.Tensor]:
        """The ``x0_fn`` of stage network ``net`` (its grid, X-ray binning, residual scale)."""
        from xct_core.geometry import ProjectionGeometry
        from xct_core.grid import StageGrid

        affine = StageGrid(0, int(net.size), float(net.cfg.fov_mm)).affine()
        geoms = {v: ProjectionGeometry.from_params(self.drr, v) for v in ("frontal", "lateral")}
        inner = getattr(net, "diffusion", net)  # an AnchoredStage's residual network holds the binning
        return DataConsistency(self.hmap, affine, geoms, {"frontal": frontal, "lateral": lateral},
                               mu_water=self.mu_water, weight=self.weight, iters=self.iters,
                               bin=int(getattr(inner, "xray_bin", 1)), anchor=anchor,
                               scale=float(getattr(net, "residual_scale", 1.0)) if anchor is not None else 1.0)
