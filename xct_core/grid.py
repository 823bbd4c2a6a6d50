"""Voxel grids: the one definition of a grid's affine and of a cascade stage's grid.

Every stage grid is an isotropic cube of ``size``³ voxels of ``fov_mm / size`` mm (the same
FOV at every stage), axes RAS+, with the grid centre (voxel ``(S-1)/2``) at a world point
(the world origin for the networks; the volume centre for stored data). Pure NumPy.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

__all__ = ["StageGrid", "grid_affine", "token_levels"]


def _spacing3(spacing_mm: float | Sequence[float]) -> np.ndarray:
    sp = np.broadcast_to(np.asarray(spacing_mm, dtype=np.float64), (3,)).copy()
    if not np.all(np.isfinite(sp)) or np.any(sp <= 0):
        raise ValueError(f"spacing_mm must be positive and finite, got {spacing_mm!r}")
    return sp


def grid_affine(
    shape: Sequence[int], spacing_mm: float | Sequence[float], center_world: Sequence[float]
) -> np.ndarray:
    """Affine of an axis-aligned RAS+ grid whose centre voxel ((n-1)/2) sits at ``center_world``."""
    sp = _spacing3(spacing_mm)
    shp = np.asarray(shape, dtype=np.float64)
    aff = np.diag([*sp, 1.0])
    aff[:3, 3] = np.asarray(center_world, dtype=np.float64) - sp * (shp - 1.0) / 2.0
    return aff


def token_levels(size: int, token_grid: int) -> int:
    """How many times the conv stem halves a ``size``³ grid down to ``token_grid``³
    (``log2(size / token_grid)``); ``ValueError`` unless the ratio is a power of two >= 2."""
    if size % token_grid:
        raise ValueError(f"size {size} is not divisible by token_grid {token_grid}")
    ratio = size // token_grid
    if ratio < 2 or ratio & (ratio - 1):
        raise ValueError(f"size/token_grid = {ratio} must be a power of two >= 2")
    return ratio.bit_length() - 1


@dataclass(frozen=True)
class StageGrid:
    """Stage ``k``'s grid: ``size``³ isotropic voxels over ``fov_mm`` (mm), RAS+."""

    k: int
    size: int
    fov_mm: float

    @property
    def spacing_mm(self) -> float:
        return float(self.fov_mm) / int(self.size)

    @property
    def shape(self) -> tuple[int, int, int]:
        return (self.size, self.size, self.size)

    def affine(self, center_world: Sequence[float] = (0.0, 0.0, 0.0)) -> np.ndarray:
        """Voxel → world (mm) affine with the grid centre (voxel ``(S-1)/2``) at ``center_world``."""
        return grid_affine(self.shape, self.spacing_mm, center_world)
