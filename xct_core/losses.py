"""Training losses of the cascade stages.

* :func:`diffusion_loss` — v-prediction MSE (+ optional physics term) for a diffusion stage.
* :func:`direct_loss` — x0 MSE (+ optional physics term) for the direct-regression baseline.
* :class:`PhysicsLoss` — DRR consistency: the line integrals of the predicted x0 and of the
  target x0, both views, rendered by the SAME renderer (:func:`xct_core.drr.render`) with
  the SAME geometry on the stage grid (``params.stage(k).affine()``).

Units: volumes are in the networks' units [-1, 1] (``HUMap.forward``, ``params.hu.output``);
the physics term maps them back to HU with ``HUMap.inverse`` (with a window map the target
is clipped to the window, and so is a perfect prediction — both sides see the same
clipping), renders line integrals
``∫mu dl`` (mu = mu_water·(1 + HU/1000), dl in mm), divides them by the fixed
``params.model.xray_scale`` (the encoder's input scale) and takes the MSE over both views'
pixels. There is no per-sample normalisation.

The losses read static attributes (mode, grid size, condition settings) from the bare
module (:func:`xct_core.models.unwrap`) but always run the forward pass through the model
they are given, so DDP's gradient synchronisation works.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from xct_core.cascade import augment_condition, lowres_condition, resize_volume, sample_aug_timesteps
from xct_core.diffusion import CosineSchedule, q_sample, sample_timesteps, v_target, x0_from_v
from xct_core.hu import HUMap, HUWindow
from xct_core.models.encoder import VIEWS
from xct_core.models.stage import StageNet, unwrap

if TYPE_CHECKING:  # pragma: no cover
    from xct_core.config import Params, Stage

__all__ = ["PhysicsLoss", "diffusion_loss", "direct_loss", "weighted_mse"]

Logs = dict[str, torch.Tensor]


class PhysicsLoss(nn.Module):
    """DRR line-integral consistency on one stage grid (both views).

    Args:
        geometries: ``{"frontal": ProjectionGeometry, "lateral": ProjectionGeometry}``.
        affine: the stage grid's voxel→world affine (mm).
        window: the networks' HU map (volumes are [-1, 1] tensors in its units; a window works too).
        mu_water: 1/mm.
        scale: line integrals are divided by this (``params.model.xray_scale``).

    ``project(x_norm [B,1,X,Y,Z]) -> [B, 2, H, W]`` (frontal, lateral; scaled line
    integrals); ``forward(pred_x0, target_x0) -> scalar`` MSE between the projections
    (the target's projection carries no gradient).
    """

    def __init__(
        self,
        geometries: dict[str, object],
        affine: np.ndarray,
        window: HUMap | HUWindow,
        mu_water: float,
        scale: float,
    ) -> None:
        super().__init__()
        self.geometries = {v: geometries[v] for v in VIEWS}
        self.affine = np.asarray(affine, dtype=np.float64)
        self.window = window
        self.mu_water = float(mu_water)
        self.scale = float(scale)

    @classmethod
    def from_params(cls, params: Params, stage: int | Stage) -> PhysicsLoss:
        """The physics term of a stage (index or ``params.stage(k)``): its grid, the
        ``params.drr`` geometry, the networks' HU map and mu_water, ``params.model.xray_scale``."""
        from xct_core.geometry import ProjectionGeometry

        st = params.stage(stage) if isinstance(stage, int) else stage
        return cls(
            {v: ProjectionGeometry.from_params(params.drr, v) for v in VIEWS},
            st.affine(),
            params.hu.net_map(),
            params.hu.mu_water,
            params.model.xray_scale,
        )

    def project(self, x_norm: torch.Tensor) -> torch.Tensor:
        from xct_core.drr import render

        if x_norm.dim() != 5 or x_norm.shape[1] != 1:
            raise ValueError(f"expected volumes [B, 1, X, Y, Z], got {tuple(x_norm.shape)}")
        # always float32 (also under bf16/fp16 autocast): line integrals sum many voxels
        with torch.autocast(x_norm.device.type, enabled=False):
            hu = self.window.inverse(x_norm[:, 0].float())
            imgs = [
                render(hu, self.affine, self.geometries[v], mu_water=self.mu_water, quantity="line_integral")
                for v in VIEWS
            ]
            return torch.stack(imgs, dim=1) / self.scale

    def forward(self, pred_x0: torch.Tensor, target_x0: torch.Tensor,
                sample_weight: torch.Tensor | None = None) -> torch.Tensor:
        """MSE of the projections; with ``sample_weight`` ``[B]``, the weighted mean of the
        per-volume MSEs (:func:`weighted_mse`)."""
        with torch.no_grad():
            target = self.project(target_x0)
        if sample_weight is not None:
            return weighted_mse(self.project(pred_x0), target, sample_weight)
        return F.mse_loss(self.project(pred_x0), target)


def weighted_mse(pred: torch.Tensor, target: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``Σ_i w_i · MSE_i / max(Σ_i w_i, 1)`` over the batch's per-item MSEs: with every
    ``w_i = 1`` the plain batch MSE; items with weight 0 add nothing (and no gradient), and a
    batch of zero weights gives a zero loss that still flows through the graph (DDP-safe)."""
    per = (pred - target).square().flatten(1).mean(1)
    w = weight.to(per)
    return (per * w).sum() / w.sum().clamp_min(1.0)


def _training_condition(
    net: StageNet,
    x0: torch.Tensor,
    cond: torch.Tensor | None,
    schedule: CosineSchedule | None,
    generator: torch.Generator | None,
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """(augmented condition, augmentation timesteps) for a stage k>1; (None, None) for stage 1.

    ``cond`` (any grid size, e.g. the preprocessed previous-stage volume) defaults to the
    target averaged down to the previous stage's grid (:func:`lowres_condition`).
    Without a schedule (direct mode only) the condition is used clean (level 0)."""
    if not net.conditional:
        if cond is not None:
            raise ValueError(f"{net.name} is the first stage: it takes no cond")
        return None, None
    base = lowres_condition(x0, net.prev_size) if cond is None else resize_volume(cond.to(x0), net.size)  # type: ignore[arg-type]
    B = x0.shape[0]
    if schedule is None:
        return base, torch.zeros(B, dtype=torch.long, device=x0.device)
    t_aug = sample_aug_timesteps(B, net.cfg.cond_aug_max, schedule, generator, x0.device)
    return augment_condition(base, t_aug, schedule, generator), t_aug


def _physics(
    physics: PhysicsLoss | None,
    weight: float,
    pred_x0: torch.Tensor | None,
    x0: torch.Tensor,
    loss: torch.Tensor,
    logs: Logs,
    sample_weight: torch.Tensor | None = None,
) -> torch.Tensor:
    """``loss + weight · physics(pred_x0, x0)`` (logged as ``loss_physics``); ``loss`` when off."""
    if weight < 0:
        raise ValueError(f"physics_weight must be >= 0, got {weight}")
    if weight == 0:
        return loss
    if physics is None:
        raise ValueError("physics_weight > 0 needs a PhysicsLoss (PhysicsLoss.from_params(params, k))")
    assert pred_x0 is not None
    lp = physics(pred_x0, x0) if sample_weight is None else physics(pred_x0, x0, sample_weight)
    logs["loss_physics"] = lp.detach()
    return loss + weight * lp


def diffusion_loss(
    model: nn.Module,
    x0: torch.Tensor,
    frontal: torch.Tensor,
    lateral: torch.Tensor,
    cond: torch.Tensor | None = None,
    *,
    schedule: CosineSchedule,
    generator: torch.Generator | None = None,
    physics_weight: float = 0.0,
    physics: PhysicsLoss | None = None,
    t: torch.Tensor | None = None,
    noise: torch.Tensor | None = None,
    anchor_net: nn.Module | None = None,
) -> tuple[torch.Tensor, Logs]:
    """v-prediction loss of a diffusion stage on a batch.

    Anchored stage (``cfg.anchor == "direct"``): ``anchor_net`` is the direct twin (its EMA);
    its estimate ``mu`` of this batch (no gradient, from the same noise-augmented condition
    the stage sees) is the stage's extra input, the diffused variable is
    ``(x0 − mu) / residual_scale`` and the physics term sees ``mu + residual_scale · r̂``.

    Draws ``t ~ U{0 … T−1}`` and ``noise ~ N(0, I)`` (from ``generator``, unless given),
    forms ``x_t = q_sample(x0, t, noise)`` and returns ``MSE(v̂, v)`` +
    ``physics_weight · PhysicsLoss(x0̂, x0)`` with ``x0̂ = x0_from_v(x_t, v̂, t)``. Stage k>1:
    ``cond`` (default: the low-res ground truth) is noise-augmented at a random level in
    ``[0, cfg.cond_aug_max]`` (fraction of T), which the network also receives.

    Args:
        model: a diffusion-mode :class:`~xct_core.models.StageNet`, possibly DDP-wrapped.
        x0: target volumes ``[B, 1, S, S, S]`` in [-1, 1].
        frontal, lateral: line-integral X-rays ``[B, 1, H, W]``.
        cond: optional previous-stage-resolution volume (stage k>1).

    Returns:
        ``(loss, logs)``; ``logs`` holds detached 0-d tensors ``loss``, ``loss_v`` and, when
        the physics term is on, ``loss_physics`` (call ``.item()`` when logging).
    """
    net = unwrap(model)
    if getattr(net, "mode", None) != "diffusion":
        raise ValueError("diffusion_loss needs a diffusion-mode stage (use direct_loss for mode='direct')")
    B = x0.shape[0]
    if t is None:
        t = sample_timesteps(B, schedule, generator, x0.device)
    if noise is None:
        gen_dev = generator.device if generator is not None else x0.device
        noise = torch.randn(x0.shape, generator=generator, device=gen_dev, dtype=x0.dtype).to(x0.device)
    c, c_aug = _training_condition(net, x0, cond, schedule, generator)  # type: ignore[arg-type]
    kw: dict[str, torch.Tensor] = {}
    target, mu = x0, None
    if getattr(net, "anchored", False):
        if anchor_net is None:
            raise ValueError(f"{net.name} is anchored on its direct twin: pass anchor_net (the twin)")
        with torch.no_grad():
            mu = anchor_net(None, None, frontal, lateral, c, c_aug).float().clamp(-1.0, 1.0).to(x0.dtype)
        kw["anchor"] = mu
        target = (x0 - mu) / net.residual_scale
    x_t = q_sample(target, t, noise, schedule)
    v = model(x_t, t, frontal, lateral, c, c_aug, **kw).float()
    loss_v = F.mse_loss(v, v_target(target, noise, t, schedule).float())
    logs: Logs = {"loss_v": loss_v.detach()}
    pred_x0 = x0_from_v(x_t.float(), v, t, schedule) if physics_weight > 0 else None
    if pred_x0 is not None and mu is not None:
        pred_x0 = mu + net.residual_scale * pred_x0
    loss = _physics(physics, physics_weight, pred_x0, x0, loss_v, logs)
    logs["loss"] = loss.detach()
    return loss, logs


def direct_loss(
    model: nn.Module,
    x0: torch.Tensor,
    frontal: torch.Tensor,
    lateral: torch.Tensor,
    cond: torch.Tensor | None = None,
    *,
    schedule: CosineSchedule | None = None,
    generator: torch.Generator | None = None,
    physics_weight: float = 0.0,
    physics: PhysicsLoss | None = None,
    sample_weight: torch.Tensor | None = None,
) -> tuple[torch.Tensor, Logs]:
    """x0-regression loss of a direct-mode stage: ``MSE(x0̂, x0)`` + physics term.

    Stage k>1 conditions on ``cond`` (default: the low-res ground truth), noise-augmented
    like :func:`diffusion_loss` when a ``schedule`` is given (clean otherwise).
    ``sample_weight`` ``[B]`` (a cross-fitted fold twin: 0 on its held-out fold) weights the
    per-item terms (:func:`weighted_mse`); None = the plain batch mean.
    Returns ``(loss, logs)`` with detached ``loss``, ``loss_x0`` (and ``loss_physics``)."""
    net = unwrap(model)
    if getattr(net, "mode", None) != "direct":
        raise ValueError("direct_loss needs a direct-mode stage (build_stage(..., mode='direct'))")
    c, c_aug = _training_condition(net, x0, cond, schedule, generator)  # type: ignore[arg-type]
    pred = model(None, None, frontal, lateral, c, c_aug).float()
    if sample_weight is None:
        loss_x0 = F.mse_loss(pred, x0.float())
    else:
        loss_x0 = weighted_mse(pred, x0.float(), sample_weight)
    logs: Logs = {"loss_x0": loss_x0.detach()}
    loss = _physics(physics, physics_weight, pred, x0, loss_x0, logs, sample_weight)
    logs["loss"] = loss.detach()
    return loss, logs
