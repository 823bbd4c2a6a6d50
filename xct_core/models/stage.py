"""One cascade stage network (encoder → depth lifting → hybrid 3D backbone) and its builders.

A stage maps the two X-rays (DRR line integrals, frontal + lateral), the noisy volume
``x_t`` and its timestep ``t`` — and, for stage k>1, the previous stage's volume upsampled
to this grid plus that condition's noise-augmentation level — to ``v`` (diffusion mode), or
maps the X-rays (+ condition) directly to ``x0`` in one pass (``mode="direct"``, the fast
regression baseline; same class, no ``x_t`` input, constant ``t = 0``).

Tensors: volumes ``[B, 1, S, S, S]`` windowed to [-1, 1], axes (i, j, k) = RAS+ (see
docs/CONVENTIONS.md); X-rays ``[B, 1, H, W]`` raw line integrals ∫mu dl (the network
divides them by ``params.model.xray_scale``); timesteps ``[B]`` integer (``torch.long``).

Stage indices ``k`` are 1-based (stage 1 = the coarsest grid), as in params.yaml.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from xct_core.diffusion import timestep_embedding
from xct_core.grid import StageGrid
from xct_core.models.backbone import Backbone3D, run_maybe_checkpointed
from xct_core.models.encoder import VIEWS, XrayEncoder
from xct_core.models.lifting import DepthLifting, lifting_grid

if TYPE_CHECKING:  # pragma: no cover
    from xct_core.config import Params, Stage, StageParams

Mode = Literal["diffusion", "direct"]

__all__ = ["AnchoredStage", "Mode", "StageNet", "ViewContext", "build_stage", "stage_affine", "unwrap", "xray_binning"]


def stage_affine(cfg: StageParams) -> np.ndarray:
    """Voxel→world affine (mm, RAS+, float64 4×4) of a stage grid: ``cfg.size``³ isotropic
    voxels of ``cfg.fov_mm / cfg.size`` mm, centred at the world origin (the centre of the
    grid, between the two middle voxels for even sizes, is at (0, 0, 0)) — the same as
    ``params.stage(k).affine()`` (:class:`xct_core.grid.StageGrid`)."""
    return StageGrid(0, int(cfg.size), float(cfg.fov_mm)).affine()


def xray_binning(voxel_mm: float, magnification: float, pixel_mm: float, pixels: int) -> int:
    """Detector binning for a stage: the largest power of two ≤ a voxel's footprint on the
    detector at the isocentre (``voxel_mm · magnification / pixel_mm`` pixels) that divides
    ``pixels``; at least 1. Binning (average pooling) the X-rays to about the stage's
    resolution anti-aliases the depth lifting and keeps the 2D encoder cheap at coarse
    stages (demo stage 1: 25.6 mm voxels ≈ 12 pixels → bin 8)."""
    foot = voxel_mm * magnification / pixel_mm
    b = 1
    while 2 * b <= foot and pixels % (2 * b) == 0:
        b *= 2
    return b


def unwrap(model: nn.Module) -> nn.Module:
    """The bare module inside DDP / FSDP / ``torch.compile`` wrappers — ONLY to read static
    attributes (mode, sizes). Always call the wrapper itself for forward passes (DDP's
    gradient synchronisation hooks live there)."""
    while True:
        inner = getattr(model, "module", None) or getattr(model, "_orig_mod", None)
        if not isinstance(inner, nn.Module):
            return model
        model = inner


@dataclass
class ViewContext:
    """Per-sample X-ray encoding, independent of ``x_t`` and ``t`` (computed once per
    sample and reused at every sampler step).

    Attributes:
        frontal, lateral: encoder feature maps ``[B, lift_channels, H, W]``.
        global_emb: ``[B, dim]`` global X-ray embedding (both views, concatenated then projected).
    """

    frontal: torch.Tensor
    lateral: torch.Tensor
    global_emb: torch.Tensor


class StageNet(nn.Module):
    """A cascade stage: shared-weight X-ray encoder + view embedding, per-view depth
    lifting, hybrid 3D backbone, conditioning MLPs.

    Args:
        cfg: the stage's :class:`xct_core.config.StageParams`.
        lift_grids: ``{"frontal", "lateral"}`` → ``[S, S, S, 2]`` sampling grids (see
            :func:`xct_core.models.lifting.lifting_grid`).
        xray_scale: X-ray line integrals are divided by this before the encoder.
        xray_bin: the X-rays are average-binned by this factor (detector pixels) before the
            encoder (see :func:`xray_binning`); 1 = full detector resolution.
        prev_size: grid size of the previous stage (``None`` for stage 1): adds the
            condition channel and the augmentation-level embedding.
        mode: ``"diffusion"`` (predict v from x_t, t) or ``"direct"`` (predict x0, no x_t).
        name: stage name (e.g. ``"stage1"``).
        norm_min_group_size: channels per GroupNorm group at least (backbone conv blocks and
            head, :func:`xct_core.models.backbone.group_norm`); 1 = the original norms.
        cond_skip: a direct-mode stage k>1 predicts a residual over its (upsampled,
            augmented) condition: ``x0̂ = cond + backbone(…)`` with a zero-initialised head, so
            that at initialisation it returns its condition. Off = the original network.
    """

    def __init__(
        self,
        cfg: StageParams,
        lift_grids: dict[str, torch.Tensor],
        *,
        xray_scale: float,
        xray_bin: int = 1,
        prev_size: int | None = None,
        mode: Mode = "diffusion",
        name: str = "stage",
        norm_min_group_size: int = 1,
        cond_skip: bool = False,
    ) -> None:
        super().__init__()
        if mode not in ("diffusion", "direct"):
            raise ValueError(f"mode must be 'diffusion' or 'direct', got {mode!r}")
        if cond_skip and (mode != "direct" or prev_size is None):
            raise ValueError("cond_skip needs a direct-mode stage k>1 (it adds the condition to an x0 prediction)")
        self.cond_skip = bool(cond_skip)
        self.cfg = cfg
        self.name = name
        self.mode: Mode = mode
        self.size = int(cfg.size)
        self.prev_size = prev_size
        self.xray_scale = float(xray_scale)
        if xray_bin < 1:
            raise ValueError(f"xray_bin must be >= 1, got {xray_bin}")
        self.xray_bin = int(xray_bin)
        dim = cfg.dim

        self.encoder = XrayEncoder(cfg.enc_channels, cfg.lift_channels, num_views=len(VIEWS))
        self.lifting = DepthLifting(lift_grids)
        if self.lifting.shape3d != (self.size,) * 3:
            raise ValueError(f"lifting grids {self.lifting.shape3d} do not match the {self.size}³ stage grid")
        self.xray_global = nn.Linear(2 * self.encoder.global_dim, dim)
        self.time_embed = nn.Sequential(nn.Linear(dim, dim), nn.SiLU(), nn.Linear(dim, dim))
        self.aug_embed = (
            nn.Sequential(nn.Linear(dim, dim), nn.SiLU(), nn.Linear(dim, dim)) if self.conditional else None
        )
        #: residual diffusion over the direct twin (``cfg.anchor == "direct"``): the twin's
        #: estimate is an extra input channel and x_t / v refer to the scaled residual
        self.anchored = mode == "diffusion" and cfg.anchor == "direct"
        self.residual_scale = float(cfg.residual_scale)
        in_ch = (2 * cfg.lift_channels + (1 if mode == "diffusion" else 0) + (1 if self.conditional else 0)
                 + (1 if self.anchored else 0))
        self.backbone = Backbone3D(
            in_channels=in_ch,
            size=cfg.size,
            token_grid=cfg.token_grid,
            conv_channels=cfg.conv_channels,
            dim=dim,
            depth=cfg.depth,
            heads=cfg.heads,
            mlp_ratio=cfg.mlp_ratio,
            cond_dim=dim,
            grad_checkpointing=cfg.grad_checkpointing,
            decoder=cfg.decoder,
            norm_min_group_size=norm_min_group_size,
        )
        if self.cond_skip:  # starts as the identity on its condition
            nn.init.zeros_(self.backbone.out.weight)
            nn.init.zeros_(self.backbone.out.bias)
        # channels-last (NDHWC) conv weights: oneDNN (CPU) and cuDNN (bf16 tensor cores) run
        # 3D convs fastest in this layout; activations follow the weights' layout. 1×1×1
        # kernels keep the plain layout (their channels-last strides are ambiguous, which
        # makes DDP's gradient bucket views mismatch).
        for m in self.backbone.modules():
            if isinstance(m, nn.Conv3d) and m.kernel_size != (1, 1, 1):
                m.weight.data = m.weight.data.contiguous(memory_format=torch.channels_last_3d)
        # The buffers are derived from params (geometry, token grid): DDP need not
        # broadcast them every step (at 256³ the lifting grids are 2 × 134 MB).
        nn.parallel.DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(
            self, [n for n, _ in self.named_buffers()]
        )

    @property
    def conditional(self) -> bool:
        """True for stage k>1 (conditioned on the upsampled previous-stage volume)."""
        return self.prev_size is not None

    # -- pieces ---------------------------------------------------------------------------
    def encode_views(self, frontal: torch.Tensor, lateral: torch.Tensor) -> ViewContext:
        """Encode both X-rays with the shared encoder (+ view embedding)."""
        frontal, lateral = _as_image(frontal, "frontal"), _as_image(lateral, "lateral")
        if frontal.shape != lateral.shape:
            raise ValueError(f"frontal {tuple(frontal.shape)} and lateral {tuple(lateral.shape)} differ in shape")
        B = frontal.shape[0]
        x = (torch.cat([frontal, lateral], dim=0) / self.xray_scale).to(self.encoder.inp.weight.dtype)
        if self.xray_bin > 1:
            b = self.xray_bin
            if x.shape[-2] % b or x.shape[-1] % b:
                raise ValueError(f"X-ray size {tuple(x.shape[-2:])} is not divisible by the binning {b}")
            x = F.avg_pool2d(x, b)
        view = torch.tensor([VIEWS["frontal"]] * B + [VIEWS["lateral"]] * B, device=x.device)
        feats, glob = self.encoder(x, view)
        g = self.xray_global(torch.cat([glob[:B], glob[B:]], dim=1))
        return ViewContext(frontal=feats[:B], lateral=feats[B:], global_emb=g)

    def _fused_input(self, feat_f: torch.Tensor, feat_l: torch.Tensor, *vols: torch.Tensor) -> torch.Tensor:
        """Lift both views, concatenate [frontal-lifted, lateral-lifted, x_t?, cond?], fuse conv."""
        lifted = self.lifting(feat_f, feat_l)
        h = torch.cat([lifted, *[v.to(lifted.dtype) for v in vols]], dim=1)
        # channels-last (NDHWC) is the fast layout for oneDNN (CPU) and cuDNN (bf16) 3D convs;
        # converting after the 1×1 fusion moves conv_channels[0] channels instead of all inputs
        return self.backbone.fuse(h).contiguous(memory_format=torch.channels_last_3d)

    # -- forward --------------------------------------------------------------------------
    def forward(
        self,
        x_t: torch.Tensor | None,
        t: torch.Tensor | None,
        frontal: torch.Tensor,
        lateral: torch.Tensor,
        cond: torch.Tensor | None = None,
        cond_aug: torch.Tensor | None = None,
        *,
        context: ViewContext | None = None,
        anchor: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Predict v (diffusion) or x0 (direct), ``[B, 1, S, S, S]``.

        Args:
            x_t: noisy volume ``[B, 1, S, S, S]`` (diffusion); ignored-must-be-None (direct).
            t: integer timesteps ``[B]`` (diffusion); ``None`` in direct mode (t = 0).
            frontal, lateral: line-integral images ``[B, 1, H, W]`` (or ``[B, H, W]``).
            cond: stage k>1: the previous-stage volume (any grid size; upsampled here
                trilinearly to ``S``³), already noise-augmented by the caller.
            cond_aug: stage k>1: the augmentation timesteps ``[B]`` used on ``cond``
                (default 0 = clean).
            context: a precomputed :meth:`encode_views` result (skips the encoder).
            anchor: an anchored stage (:attr:`anchored`): the direct twin's estimate
                ``[B, 1, S, S, S]`` (network units); ``x_t`` and v then refer to the residual
                ``(x0 − anchor) / residual_scale``.
        """
        if context is None:
            context = self.encode_views(frontal, lateral)
        B = context.frontal.shape[0]
        dev = context.frontal.device
        vols: list[torch.Tensor] = []
        if self.mode == "diffusion":
            if x_t is None or t is None:
                raise ValueError("diffusion mode needs x_t and t")
            if tuple(x_t.shape) != (B, 1, self.size, self.size, self.size):
                raise ValueError(f"x_t must be {(B, 1) + (self.size,) * 3}, got {tuple(x_t.shape)}")
            vols.append(x_t)
        else:
            if x_t is not None:
                raise ValueError("direct mode takes no x_t (pass None)")
            t = torch.zeros(B, dtype=torch.long, device=dev)
        if t.shape != (B,):  # type: ignore[union-attr]
            raise ValueError(f"t must be [{B}], got {tuple(t.shape)}")  # type: ignore[union-attr]
        dim = self.cfg.dim
        emb_dtype = self.time_embed[0].weight.dtype  # float32 params under autocast; bf16 for a .to(bf16) model
        c = self.time_embed(timestep_embedding(t, dim).to(dev, emb_dtype)) + context.global_emb  # type: ignore[arg-type]
        if self.conditional:
            if cond is None:
                raise ValueError(f"{self.name} is conditioned on the previous stage: pass cond")
            if cond.dim() != 5 or cond.shape[:2] != (B, 1):
                raise ValueError(f"cond must be [B, 1, X, Y, Z], got {tuple(cond.shape)}")
            if cond.shape[-3:] != (self.size,) * 3:
                cond = F.interpolate(cond, size=(self.size,) * 3, mode="trilinear", align_corners=False)
            vols.append(cond)
            if cond_aug is None:
                cond_aug = torch.zeros(B, dtype=torch.long, device=dev)
            c = c + self.aug_embed(timestep_embedding(cond_aug, dim).to(dev, emb_dtype))  # type: ignore[misc]
        elif cond is not None:
            raise ValueError(f"{self.name} is the first stage: it takes no cond")
        if self.anchored:
            if anchor is None or tuple(anchor.shape) != (B, 1, self.size, self.size, self.size):
                raise ValueError(f"{self.name} is anchored on its direct twin: pass anchor [B, 1, S, S, S], "
                                 f"got {None if anchor is None else tuple(anchor.shape)}")
            vols.append(anchor)
        elif anchor is not None:
            raise ValueError(f"{self.name} is not anchored: it takes no anchor")
        ckpt = self.backbone.grad_checkpointing and self.training
        h = run_maybe_checkpointed(self._fused_input, context.frontal, context.lateral, *vols, enabled=ckpt)
        out = self.backbone.trunk(h, c)
        return out + cond.to(out.dtype) if self.cond_skip else out  # type: ignore[union-attr]


class AnchoredStage(nn.Module):
    """An anchored (residual-diffusion) stage as one frozen model: the diffusion network and
    the direct-regression twin it is anchored on (``cfg.anchor == "direct"``).

    :func:`xct_core.cascade.sample_cascade` samples it as ``mu + residual_scale · r``: ``mu`` =
    the twin's estimate (one pass), ``r`` = a DDIM sample of the residual network conditioned
    on ``mu``. Static attributes (name, size, cfg, conditional …) are the diffusion network's.
    """

    def __init__(self, diffusion: StageNet, anchor: StageNet) -> None:
        super().__init__()
        if not getattr(diffusion, "anchored", False) or anchor.mode != "direct":
            raise ValueError("AnchoredStage needs an anchored diffusion stage and a direct-mode twin")
        if anchor.size != diffusion.size or anchor.prev_size != diffusion.prev_size:
            raise ValueError(f"twin grid {anchor.size}³ does not match the stage's {diffusion.size}³")
        self.diffusion = diffusion
        self.anchor = anchor
        self.mode: Mode = "diffusion"
        self.anchored = True
        self.name, self.size, self.cfg, self.prev_size = diffusion.name, diffusion.size, diffusion.cfg, diffusion.prev_size
        self.residual_scale = diffusion.residual_scale

    @property
    def conditional(self) -> bool:
        return self.diffusion.conditional

    def encode_views(self, frontal: torch.Tensor, lateral: torch.Tensor) -> ViewContext:
        return self.diffusion.encode_views(frontal, lateral)

    def forward(self, *args, **kwargs):  # noqa: ANN002, ANN003, ANN201 - the diffusion net's forward
        return self.diffusion(*args, **kwargs)


def _as_image(x: torch.Tensor, what: str) -> torch.Tensor:
    if x.dim() == 3:
        x = x.unsqueeze(1)
    if x.dim() != 4 or x.shape[1] != 1:
        raise ValueError(f"{what} must be [B, 1, H, W] line integrals, got {tuple(x.shape)}")
    return x


def build_stage(
    params: Params,
    k: int | Stage,
    *,
    mode: Mode = "diffusion",
    device: torch.device | str | None = None,
    norm_min_group_size: int = 1,
    cond_skip: bool = False,
) -> StageNet:
    """Build stage ``k`` (1-based) from params: its grid (:func:`stage_affine`), the
    projection geometry of both views (``params.drr``) for the lifting grids, and the sizes
    in ``params.stages``. ``device="meta"`` builds a shape-only model (no lifting grids, no
    memory; the detector binning is computed as for a real build) for inspecting production
    configurations. ``norm_min_group_size`` and ``cond_skip``: see :class:`StageNet`
    (defaults = the original network)."""
    from xct_core.geometry import ProjectionGeometry

    st = params.stage(k) if isinstance(k, int) else k
    cfg, S, name = st.cfg, st.size, st.name
    prev_size = st.prev.size if st.prev is not None else None
    geoms = {v: ProjectionGeometry.from_params(params.drr, v) for v in VIEWS}
    b = xray_binning(st.spacing_mm, geoms["frontal"].magnification, params.drr.pixel_mm, params.drr.pixels)
    if device is not None and torch.device(device).type == "meta":
        with torch.device("meta"):
            grids = {v: torch.empty(S, S, S, 2) for v in VIEWS}
            return StageNet(cfg, grids, xray_scale=params.model.xray_scale, xray_bin=b, prev_size=prev_size,
                            mode=mode, name=name, norm_min_group_size=norm_min_group_size, cond_skip=cond_skip)
    affine = st.affine()
    grids = {v: lifting_grid(g.place(affine, (S, S, S)), affine, S) for v, g in geoms.items()}
    net = StageNet(
        cfg, grids, xray_scale=params.model.xray_scale, xray_bin=b, prev_size=prev_size, mode=mode, name=name,
        norm_min_group_size=norm_min_group_size, cond_skip=cond_skip,
    )
    return net.to(device) if device is not None else net


def build_sampling_stage(params: Params, k: int | Stage, *, device: torch.device | str | None = None) -> nn.Module:
    """Stage ``k`` as :func:`xct_core.cascade.sample_cascade` samples it: the diffusion network,
    wrapped with a freshly built direct twin (:class:`AnchoredStage`) when the stage is anchored
    (``cfg.anchor == "direct"``). Random weights: for shapes, latency and export tests."""
    net = build_stage(params, k, device=device)
    if not net.anchored:
        return net
    return AnchoredStage(net, build_stage(params, k, mode="direct", device=device))
