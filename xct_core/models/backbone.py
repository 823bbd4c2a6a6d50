"""Hybrid 3D backbone: conv stem → transformer on a token grid → conv decoder with skips.

Layout (``S`` = stage grid size, ``T`` = token grid, ``L = log2(S/T)`` halvings)::

    input [B, Cin, S³] ─ 1×1 fuse ─ ResBlock(c0) ────────────────────── skip0 ─┐
        ─ down ─ ResBlock(c1) @ (S/2)³ ─────────────────────────── skip1 ─┐     │
        …                                                                  │     │
        ─ down ─ tokens [B, T³, dim] + 3D sinusoidal position embedding    │     │
        ─ depth × DiT block (adaLN-Zero on the conditioning vector, SDPA)  │     │
        ─ up ─ cat skip_{L-1} ─ ResBlock …  ─ up ─ cat skip0 ─ ResBlock(c0) @ S³ ─ out conv → [B, 1, S³]

The decoder returns to FULL resolution through skip connections, so the output can carry
voxel-level detail (the noise component of v) that a token-resolution prediction cannot.
Each "up" (:class:`UpBlock`, ``decoder`` order in params) is either ``conv_first``: the 3×3×3
channel-reducing conv runs at the LOWER resolution and its output is upsampled trilinearly
(the default; 1/8 of the conv's FLOPs), or ``upsample_first``: nearest ×2 upsample, then the
conv at the higher resolution (the original order; kept so models trained with it load).
Every conv ResBlock is FiLM-conditioned (scale/shift) on the same conditioning vector as
the transformer (time embedding + previous-stage augmentation level + global X-ray
embedding). All tensors use the [B, C, X, Y, Z] axis order of docs/CONVENTIONS.md.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from xct_core.grid import token_levels

__all__ = [
    "DECODER_ORDERS",
    "Backbone3D",
    "ConvResBlock",
    "TransformerBlock",
    "UpBlock",
    "group_norm",
    "run_maybe_checkpointed",
    "sincos_pos_embed_3d",
]


#: decoder level orders (``params.stages.<stage>.decoder``): see :class:`UpBlock`
DECODER_ORDERS = ("conv_first", "upsample_first")


def group_norm(channels: int, max_groups: int = 8, min_group_size: int = 1) -> nn.GroupNorm:
    """GroupNorm with the largest divisor of ``gcd(channels, max_groups)`` as group count that
    leaves at least ``min_group_size`` channels per group (1 group if none does).

    ``min_group_size`` 1 (the default) gives single-channel groups when ``channels ≤
    max_groups`` (8 channels: 8 groups = per-channel instance norm). A per-channel norm
    erases every per-channel offset and gain of its input, so a head ``conv(silu(norm(h)))``
    behind it cannot take its output's level or range from ``h`` at all, only from its own
    few affine scalars (benchmarks/results/stage3_diagnosis_cpu.md); 2 keeps the relative
    level of the channels within a group."""
    if min_group_size < 1:
        raise ValueError(f"min_group_size must be >= 1, got {min_group_size}")
    g = math.gcd(channels, max_groups)
    groups = max([d for d in range(1, g + 1) if g % d == 0 and channels // d >= min_group_size], default=1)
    return nn.GroupNorm(groups, channels)


def run_maybe_checkpointed(fn: Callable[..., torch.Tensor], *args: torch.Tensor, enabled: bool) -> torch.Tensor:
    """``fn(*args)``, recomputed in backward (non-reentrant checkpoint) when ``enabled`` and
    gradients are being recorded."""
    if enabled and torch.is_grad_enabled():
        return checkpoint(fn, *args, use_reentrant=False)
    return fn(*args)


class ConvResBlock(nn.Module):
    """Pre-norm 3D residual block with FiLM conditioning (zero-initialised: starts as identity
    modulation): ``x → GN·SiLU·conv3 → GN·(1+scale)+shift·SiLU·conv3 (+ 1×1 skip)``."""

    def __init__(self, in_ch: int, out_ch: int, cond_dim: int, dims: int = 3, norm_min_group_size: int = 1) -> None:
        super().__init__()
        conv = nn.Conv3d if dims == 3 else nn.Conv2d
        self.norm1 = group_norm(in_ch, min_group_size=norm_min_group_size)
        self.conv1 = conv(in_ch, out_ch, 3, padding=1)
        self.norm2 = group_norm(out_ch, min_group_size=norm_min_group_size)
        self.conv2 = conv(out_ch, out_ch, 3, padding=1)
        self.skip = conv(in_ch, out_ch, 1) if in_ch != out_ch else nn.Identity()
        self.film: nn.Linear | None = None
        if cond_dim > 0:
            self.film = nn.Linear(cond_dim, 2 * out_ch)
            nn.init.zeros_(self.film.weight)
            nn.init.zeros_(self.film.bias)

    def forward(self, x: torch.Tensor, c: torch.Tensor | None = None) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.norm2(h)
        if self.film is not None:
            if c is None:
                raise ValueError("this block is conditioned: pass the conditioning vector")
            scale, shift = self.film(F.silu(c)).unflatten(1, (2, -1)).unbind(1)
            view = (h.shape[0], h.shape[1]) + (1,) * (h.dim() - 2)
            h = h * (1 + scale.reshape(view)) + shift.reshape(view)
        h = self.conv2(F.silu(h))
        return self.skip(x) + h


class TransformerBlock(nn.Module):
    """DiT block with adaLN-Zero: the conditioning vector sets shift/scale/gate for the
    attention and MLP branches (gates start at zero, so the block starts as identity).
    Attention is :func:`torch.nn.functional.scaled_dot_product_attention` (flash /
    memory-efficient kernels where available; no N×N matrix is materialised)."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float, cond_dim: int) -> None:
        super().__init__()
        if dim % heads:
            raise ValueError(f"dim {dim} not divisible by heads {heads}")
        self.heads = heads
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.norm2 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        hidden = int(round(dim * mlp_ratio))
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(approximate="tanh"), nn.Linear(hidden, dim))
        self.ada = nn.Linear(cond_dim, 6 * dim)
        nn.init.zeros_(self.ada.weight)
        nn.init.zeros_(self.ada.bias)

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        B, N, D = x.shape
        sh1, sc1, g1, sh2, sc2, g2 = self.ada(F.silu(c)).unsqueeze(1).chunk(6, dim=-1)
        h = self.norm1(x) * (1 + sc1) + sh1
        q, k, v = self.qkv(h).view(B, N, 3, self.heads, D // self.heads).permute(2, 0, 3, 1, 4).unbind(0)
        a = F.scaled_dot_product_attention(q, k, v)  # [B, heads, N, hd]
        x = x + g1 * self.proj(a.transpose(1, 2).reshape(B, N, D))
        h = self.norm2(x) * (1 + sc2) + sh2
        return x + g2 * self.mlp(h)


def sincos_pos_embed_3d(grid: int, dim: int) -> torch.Tensor:
    """Fixed 3D sine-cosine position embedding ``[grid³, dim]`` for a ``grid``³ token grid
    flattened in (x, y, z) C-order (the order of ``tensor.flatten(2)`` on [B, C, X, Y, Z]).

    Each axis gets ``2·(dim // 6)`` channels (cos/sin pairs, frequencies
    ``10000^(−k/(dim//6))``, positions in token units); leftover channels are zero.
    """
    per = dim // 6
    if per < 1:
        raise ValueError(f"dim {dim} too small for a 3D sin-cos embedding (need >= 6)")
    freqs = torch.exp(-math.log(10000.0) * torch.arange(per, dtype=torch.float64) / per)
    pos = torch.arange(grid, dtype=torch.float64)
    ax = torch.cat([torch.cos(pos[:, None] * freqs), torch.sin(pos[:, None] * freqs)], dim=1)  # [grid, 2per]
    gx, gy, gz = torch.meshgrid(torch.arange(grid), torch.arange(grid), torch.arange(grid), indexing="ij")
    emb = torch.cat([ax[gx.reshape(-1)], ax[gy.reshape(-1)], ax[gz.reshape(-1)]], dim=1)
    out = torch.zeros(grid**3, dim, dtype=torch.float64)
    out[:, : emb.shape[1]] = emb
    return out.to(torch.float32)


class Backbone3D(nn.Module):
    """Conv stem → transformer on ``token_grid``³ tokens → conv decoder back to full resolution.

    Args:
        in_channels: channels of the fused input volume.
        size: stage grid edge ``S`` (voxels).
        token_grid: transformer grid edge ``T``; ``S/T`` must be a power of two ≥ 2.
        conv_channels: channels at resolutions ``S, S/2, …, 2T`` (``log2(S/T)`` entries).
        dim, depth, heads, mlp_ratio: transformer sizes.
        cond_dim: size of the conditioning vector.
        grad_checkpointing: recompute every ResBlock and transformer block in backward.
        out_channels: output channels (1: v or x0).
        decoder: order of each decoder level's upsampling and channel-reducing conv
            (:data:`DECODER_ORDERS`, see :class:`UpBlock`).
        norm_min_group_size: at least this many channels per GroupNorm group in the conv
            blocks and the head (:func:`group_norm`; 1 = the original norms).

    ``forward(h, c)`` maps ``[B, in_channels, S, S, S]`` and ``c [B, cond_dim]`` to
    ``[B, out_channels, S, S, S]``.
    """

    def __init__(
        self,
        in_channels: int,
        size: int,
        token_grid: int,
        conv_channels: Sequence[int],
        dim: int,
        depth: int,
        heads: int,
        mlp_ratio: float,
        cond_dim: int,
        grad_checkpointing: bool = False,
        out_channels: int = 1,
        decoder: str = "conv_first",
        norm_min_group_size: int = 1,
    ) -> None:
        super().__init__()
        if decoder not in DECODER_ORDERS:
            raise ValueError(f"decoder must be one of {DECODER_ORDERS}, got {decoder!r}")
        self.decoder = decoder
        levels = token_levels(size, token_grid)
        chans = list(conv_channels)
        if len(chans) != levels:
            raise ValueError(f"conv_channels needs {levels} entries for {size}³ → {token_grid}³, got {chans}")
        self.size, self.token_grid, self.dim = size, token_grid, dim
        self.grad_checkpointing = grad_checkpointing

        # 1×1×1 fusion of [lifted views, x_t, cond] (the ResBlocks that follow mix space);
        # a 3×3×3 conv here would be the costliest layer at full resolution
        self.fuse = nn.Conv3d(in_channels, chans[0], 1)
        gn = norm_min_group_size
        self.enc = nn.ModuleList([ConvResBlock(chans[0], chans[0], cond_dim, norm_min_group_size=gn)])
        self.down = nn.ModuleList()
        for lvl in range(1, levels):
            self.down.append(nn.Conv3d(chans[lvl - 1], chans[lvl], 3, stride=2, padding=1))
            self.enc.append(ConvResBlock(chans[lvl], chans[lvl], cond_dim, norm_min_group_size=gn))
        # last halving = patch embedding into the token grid
        self.to_tokens = nn.Conv3d(chans[-1], dim, 3, stride=2, padding=1)
        self.register_buffer("pos_embed", sincos_pos_embed_3d(token_grid, dim), persistent=False)
        self.blocks = nn.ModuleList([TransformerBlock(dim, heads, mlp_ratio, cond_dim) for _ in range(depth)])
        self.norm_tokens = nn.LayerNorm(dim)
        # decoder: up to level lvl, concatenate skip_lvl, ResBlock(2c → c)
        self.dec = nn.ModuleList()
        prev = dim
        for lvl in reversed(range(levels)):
            self.dec.append(UpBlock(prev, chans[lvl], cond_dim, order=decoder, norm_min_group_size=gn))
            prev = chans[lvl]
        self.out_norm = group_norm(chans[0], min_group_size=gn)
        # 1×1×1 head: the full-resolution 3×3×3 convs before it provide the spatial context
        self.out = nn.Conv3d(chans[0], out_channels, 1)

    def _ckpt(self, fn: Callable[..., torch.Tensor], *args: torch.Tensor) -> torch.Tensor:
        return run_maybe_checkpointed(fn, *args, enabled=self.grad_checkpointing and self.training)

    def forward(self, h: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        """``[B, in_channels, S³]`` → ``[B, out_channels, S³]`` (fuse conv, then :meth:`trunk`)."""
        if h.shape[-3:] != (self.size,) * 3:
            raise ValueError(f"expected a {self.size}³ input grid, got {tuple(h.shape[-3:])}")
        return self.trunk(self.fuse(h), c)

    def trunk(self, h: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        """Everything after the fuse conv: ``[B, conv_channels[0], S³]`` → output."""
        skips = []
        for lvl, block in enumerate(self.enc):
            if lvl > 0:
                h = self.down[lvl - 1](h)
            h = self._ckpt(block, h, c)
            skips.append(h)
        t = self.to_tokens(h)  # [B, dim, T, T, T]
        tokens = t.flatten(2).transpose(1, 2)  # [B, T³, dim], (x, y, z) C-order
        if tokens.shape[1] != self.pos_embed.shape[0]:
            raise RuntimeError(
                f"token grid {tuple(t.shape[-3:])} does not match the position embedding "
                f"({self.token_grid}³ = {self.pos_embed.shape[0]} tokens)"
            )
        tokens = tokens + self.pos_embed.to(tokens.dtype)
        for blk in self.blocks:
            tokens = self._ckpt(blk, tokens, c)
        h = self.norm_tokens(tokens).transpose(1, 2).reshape(t.shape).contiguous(memory_format=torch.channels_last_3d)
        for block, skip in zip(self.dec, reversed(skips), strict=True):
            h = self._ckpt(block, h, skip, c)
        return self._ckpt(self._head, h)

    def _head(self, h: torch.Tensor) -> torch.Tensor:
        return self.out(F.silu(self.out_norm(h)))


class UpBlock(nn.Module):
    """Decoder level: ×2 upsampling with a 3×3×3 conv ``in_ch → out_ch``, concatenate the
    skip, then a FiLM ResBlock ``2·out_ch → out_ch`` (one unit, so checkpointing saves only
    its inputs).

    ``order`` places the conv:

    * ``"conv_first"`` (attribute ``conv``): conv at the input (lower) resolution, then
      trilinear upsampling to the skip's grid. The conv costs 1/8 of the other order's
      FLOPs, and its 3-voxel kernel spans 6 output voxels (receptive field grows); the
      trilinear interpolation keeps the upsampled features smooth (no 2×2×2 blocks), and the
      ResBlock that follows mixes them with the full-resolution skip.
    * ``"upsample_first"`` (attribute ``up``, the original order): nearest ×2 upsampling,
      then the conv at the higher resolution.

    The two orders have the same parameter shapes under different names, so the weights of
    one never load silently into the other (:func:`xct_core.checkpoint.load_stage_model`
    names the mismatch).
    """

    def __init__(self, in_ch: int, out_ch: int, cond_dim: int, order: str = "conv_first",
                 norm_min_group_size: int = 1) -> None:
        super().__init__()
        if order not in DECODER_ORDERS:
            raise ValueError(f"order must be one of {DECODER_ORDERS}, got {order!r}")
        self.order = order
        conv = nn.Conv3d(in_ch, out_ch, 3, padding=1)
        if order == "conv_first":
            self.conv = conv
        else:
            self.up = conv
        self.res = ConvResBlock(2 * out_ch, out_ch, cond_dim, norm_min_group_size=norm_min_group_size)

    def forward(self, h: torch.Tensor, skip: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        if self.order == "conv_first":
            h = F.interpolate(self.conv(h), size=skip.shape[-3:], mode="trilinear", align_corners=False)
        else:
            h = self.up(F.interpolate(h, size=skip.shape[-3:], mode="nearest"))
        return self.res(torch.cat([h, skip], dim=1), c)
