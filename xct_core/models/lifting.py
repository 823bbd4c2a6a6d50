"""Depth lifting: back-project each view's 2D feature map into the stage volume along
that view's OWN rays.

For every voxel centre of the stage grid (world mm, RAS+), the view's placed projection
geometry gives the detector position the voxel projects to, as ``grid_sample`` coordinates
(x = column, y = row, in [-1, 1], ``align_corners=False``). Bilinearly sampling the feature
map there copies a detector pixel's features onto every voxel on its ray: a parallel beam
spreads them along the beam axis (frontal: anterior-posterior, lateral: left-right), a
cone beam along the diverging rays from the source. Voxels projecting outside the detector
get zeros. The sampling grids depend only on the geometry and the stage grid, so they are
computed once per stage and kept as (non-persistent) buffers, not parameters.

The two views are lifted separately and CONCATENATED along channels (never averaged).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

if TYPE_CHECKING:  # pragma: no cover
    from xct_core.geometry import PlacedGeometry

__all__ = ["DepthLifting", "lifting_grid"]


def lifting_grid(placed: PlacedGeometry, affine: np.ndarray, size: int) -> torch.Tensor:
    """``[size, size, size, 2]`` float32 grid_sample coordinates (x = column, y = row,
    ``align_corners=False``) of every voxel centre of a ``size``³ grid with voxel→world
    ``affine`` (mm), projected by ``placed`` (computed in float64)."""
    from xct_core.geometry import voxel_centers_world

    pts = voxel_centers_world(affine, (size, size, size), dtype=torch.float64)
    grid = placed.project_normalized(pts).to(torch.float32)
    if grid.shape != (size, size, size, 2):
        raise RuntimeError(f"projection returned {tuple(grid.shape)}, expected {(size, size, size, 2)}")
    return grid


class DepthLifting(nn.Module):
    """Samples per-view 2D features into a 3D grid along each view's rays.

    Args:
        grids: ``{"frontal": [X, Y, Z, 2], "lateral": [X, Y, Z, 2]}`` grid_sample coordinates
            (see :func:`lifting_grid`).

    The grid coordinates are resolution-independent (``align_corners=False``), so feature
    maps of a binned detector (H/b × W/b, see :func:`xct_core.models.stage.xray_binning`)
    are sampled at the same physical positions.

    ``lift(features [B, C, H, W], view) -> [B, C, X, Y, Z]``;
    ``forward(frontal_feat, lateral_feat) -> [B, 2C, X, Y, Z]`` (frontal channels first).
    """

    view_names = ("frontal", "lateral")

    def __init__(self, grids: dict[str, torch.Tensor]) -> None:
        super().__init__()
        shapes = {tuple(grids[v].shape) for v in self.view_names}
        if len(shapes) != 1 or len(next(iter(shapes))) != 4 or next(iter(shapes))[-1] != 2:
            raise ValueError(f"need one [X, Y, Z, 2] grid per view, got {shapes}")
        self.shape3d: tuple[int, int, int] = tuple(next(iter(shapes))[:3])  # type: ignore[assignment]
        X, Y, Z = self.shape3d
        for v in self.view_names:
            # stored as a [1, X, Y·Z, 2] 2D sampling grid (grid_sample works on 2D maps)
            self.register_buffer(f"grid_{v}", grids[v].reshape(1, X, Y * Z, 2).float(), persistent=False)

    def lift(self, features: torch.Tensor, view: str) -> torch.Tensor:
        if view not in self.view_names:
            raise ValueError(f"unknown view {view!r}")
        B, C = features.shape[:2]
        # the sampling positions stay float32 (a bf16 grid rounds by up to 0.25 px at 256 px):
        # sample float32 features, return the features' dtype
        # (autocast runs grid_sample in float32 too: it is on its float32 list)
        grid = getattr(self, f"grid_{view}").float().expand(B, -1, -1, -1)
        out = F.grid_sample(features.float(), grid, mode="bilinear", padding_mode="zeros", align_corners=False)
        return out.to(features.dtype).view(B, C, *self.shape3d)

    def forward(self, frontal: torch.Tensor, lateral: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.lift(frontal, "frontal"), self.lift(lateral, "lateral")], dim=1)
