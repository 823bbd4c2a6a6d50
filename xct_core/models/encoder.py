"""2D X-ray encoder shared by both views.

One CNN (shared weights) encodes the frontal and the lateral image; a learned view
embedding (0 = frontal, 1 = lateral) is added to its first feature map so the network
knows which view it sees. It is a small U-Net: the output feature map has the detector
resolution (``lift_channels`` channels, sampled later by the depth lifting), and the
deepest level is mean-pooled into a per-view global vector.

Input: DRR line integrals ``p = ∫mu dl`` (dimensionless, [N, 1, H, W], detector convention
of docs/CONVENTIONS.md) already divided by ``params.model.xray_scale``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from xct_core.models.backbone import ConvResBlock, group_norm

__all__ = ["VIEWS", "XrayEncoder"]

#: view index of each view name (the view-embedding rows)
VIEWS: dict[str, int] = {"frontal": 0, "lateral": 1}


class XrayEncoder(nn.Module):
    """Shared-weight 2D U-Net encoder with a learned view embedding.

    Args:
        channels: channels per level (level 0 at detector resolution, each next level
            halves H and W).
        out_channels: channels of the returned full-resolution feature map.
        num_views: rows of the view embedding.

    ``forward(x [N,1,H,W], view [N] long) -> (features [N, out_channels, H, W],
    global [N, channels[-1]])``. Any H, W work (odd sizes are handled by resizing the
    upsampled map to the skip's size).
    """

    def __init__(self, channels: Sequence[int], out_channels: int, num_views: int = 2) -> None:
        super().__init__()
        chans = list(channels)
        if not chans:
            raise ValueError("enc_channels must not be empty")
        self.global_dim = chans[-1]
        self.inp = nn.Conv2d(1, chans[0], 3, padding=1)
        self.view_embed = nn.Embedding(num_views, chans[0])
        nn.init.normal_(self.view_embed.weight, std=0.5)
        self.enc = nn.ModuleList([ConvResBlock(chans[0], chans[0], 0, dims=2)])
        self.down = nn.ModuleList()
        for lvl in range(1, len(chans)):
            self.down.append(nn.Conv2d(chans[lvl - 1], chans[lvl], 3, stride=2, padding=1))
            self.enc.append(ConvResBlock(chans[lvl], chans[lvl], 0, dims=2))
        self.up = nn.ModuleList()
        self.dec = nn.ModuleList()
        for lvl in reversed(range(len(chans) - 1)):
            self.up.append(nn.Conv2d(chans[lvl + 1], chans[lvl], 3, padding=1))
            self.dec.append(ConvResBlock(2 * chans[lvl], chans[lvl], 0, dims=2))
        self.out_norm = group_norm(chans[0])
        self.out = nn.Conv2d(chans[0], out_channels, 1)

    def forward(self, x: torch.Tensor, view: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if x.dim() != 4 or x.shape[1] != 1:
            raise ValueError(f"expected X-ray images [N, 1, H, W], got {tuple(x.shape)}")
        h = self.inp(x) + self.view_embed(view)[:, :, None, None]
        skips = []
        for lvl, block in enumerate(self.enc):
            if lvl > 0:
                h = self.down[lvl - 1](h)
            h = block(h)
            skips.append(h)
        glob = h.mean(dim=(2, 3))
        for up, block, skip in zip(self.up, self.dec, reversed(skips[:-1]), strict=True):
            h = up(F.interpolate(h, size=skip.shape[-2:], mode="nearest"))
            h = block(torch.cat([h, skip], dim=1))
        return self.out(F.silu(self.out_norm(h))), glob
