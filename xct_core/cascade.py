"""Cascade conditioning and sampling.

Stage k>1 is conditioned on a lower-resolution volume upsampled to its grid:

* training: the ground truth at the previous stage's resolution
  (:func:`lowres_condition`: area-downsample the target, upsample back), noise-augmented
  with ``q_sample`` at a random level ``t_aug ~ U{0 … round(cond_aug_max·(T−1))}``
  (:func:`augment_condition`); ``t_aug`` is also embedded by the network;
* sampling: the previous stage's output, augmented at the fixed level
  ``round(cond_aug_sample·(T−1))`` (:func:`sample_cascade`).

Upsampling is trilinear with ``align_corners=False`` (every stage grid covers the same FOV,
voxel centres at cell centres, so this is the geometrically consistent resampling).
Sampling uses :func:`xct_core.diffusion.ddim_sample` — the one sampler of the project —
with the settings of one :class:`xct_core.diffusion.Sampler` (steps, eta, clip, spacing).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from xct_core.diffusion import CosineSchedule, Sampler, q_sample, randn
from xct_core.models.stage import AnchoredStage, StageNet, unwrap

__all__ = [
    "aug_timestep",
    "augment_condition",
    "lowres_condition",
    "resize_volume",
    "sample_aug_timesteps",
    "sample_cascade",
]


def resize_volume(vol: torch.Tensor, size: int) -> torch.Tensor:
    """``[B, C, X, Y, Z]`` → ``[B, C, size, size, size]``: area average when shrinking,
    trilinear (``align_corners=False``) when growing, identity when equal."""
    if vol.shape[-3:] == (size,) * 3:
        return vol
    if all(s >= size for s in vol.shape[-3:]):
        return F.interpolate(vol, size=(size,) * 3, mode="area")
    return F.interpolate(vol, size=(size,) * 3, mode="trilinear", align_corners=False)


def lowres_condition(x0: torch.Tensor, prev_size: int) -> torch.Tensor:
    """Training condition for a stage k>1: the target ``x0`` [B,1,S³] averaged down to the
    previous stage's ``prev_size``³ grid and upsampled back to ``S``³."""
    return resize_volume(resize_volume(x0, prev_size), x0.shape[-1])


def aug_timestep(fraction: float, schedule: CosineSchedule) -> int:
    """Augmentation level as a timestep: ``round(fraction · (T − 1))``."""
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"augmentation fraction must be in [0, 1], got {fraction}")
    return int(round(fraction * (schedule.num_timesteps - 1)))


def sample_aug_timesteps(
    batch: int,
    max_fraction: float,
    schedule: CosineSchedule,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Random training augmentation levels ``U{0 … aug_timestep(max_fraction)}``, long ``[batch]``."""
    hi = aug_timestep(max_fraction, schedule)
    gen_dev = generator.device if generator is not None else device
    return torch.randint(0, hi + 1, (batch,), generator=generator, device=gen_dev).to(device)


def augment_condition(
    cond: torch.Tensor,
    t_aug: torch.Tensor,
    schedule: CosineSchedule,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """``q_sample(cond, t_aug, noise)`` with noise drawn from ``generator`` (on its device)."""
    noise = randn(cond.shape, generator, cond.device, cond.dtype)
    return q_sample(cond, t_aug.to(cond.device), noise, schedule)


@torch.no_grad()
def sample_cascade(
    stages: Sequence[nn.Module],
    frontal: torch.Tensor,
    lateral: torch.Tensor,
    *,
    sampler: Sampler,
    generator: torch.Generator | None = None,
    upto: int | None = None,
    anchors: list[torch.Tensor | None] | None = None,
) -> list[torch.Tensor]:
    """Run the cascade: stage 1 from the X-rays, stage k>1 from the X-rays and stage k−1's
    output (upsampled, augmented at ``cfg.cond_aug_sample``).

    Args:
        stages: stage networks in order (:class:`xct_core.models.StageNet`, diffusion or
            direct mode; direct stages predict x0 in one pass; an
            :class:`~xct_core.models.stage.AnchoredStage` returns its twin's estimate plus
            ``residual_scale`` times a sampled residual, the residual unclipped and the sum
            clipped). They are run frozen, in eval mode under ``torch.no_grad``; their previous
            train/eval mode is restored after. With ``sampler.guidance`` every diffusion
            stage's x0 predictions are pulled toward the input line integrals
            (:mod:`xct_core.guidance`); direct stages stay one pass.
        frontal, lateral: line-integral X-rays ``[B, 1, H, W]``.
        sampler: schedule + DDIM settings (:meth:`xct_core.diffusion.Sampler.from_params`);
            its ``steps`` are one int for all stages or one per stage.
        generator: drives all noise (initial x_T, eta noise, condition augmentation); a
            sequence of generators, one per batch row, gives each row its own stream.
        upto: run stages ``1 … upto`` only (default: all).
        anchors: when given, a list that receives one entry per stage run: the anchored
            stage's twin estimate ``mu`` (clipped, ``[B, 1, S, S, S]``; the residual
            diffusion's K → ∞ mean) or None for a stage that is not anchored.

    Returns:
        ``[x0_stage1, …, x0_stage_upto]``, each ``[B, 1, S_k, S_k, S_k]`` in [-1, 1].
    """
    n = len(stages) if upto is None else int(upto)
    if not 1 <= n <= len(stages):
        raise ValueError(f"upto must be in [1, {len(stages)}], got {upto}")
    step_list = sampler.steps_for(n)
    schedule = sampler.schedule
    was_training = [m.training for m in stages]
    outs: list[torch.Tensor] = []
    try:
        for k in range(n):
            model = stages[k]
            net: StageNet = unwrap(model)  # type: ignore[assignment]
            model.eval()
            anchor_k: torch.Tensor | None = None
            ctx = net.encode_views(frontal, lateral)
            B, dev = ctx.frontal.shape[0], ctx.frontal.device
            cond = cond_aug = None
            if net.conditional:
                if not outs:
                    raise ValueError(f"{net.name} is conditioned on a previous stage; it cannot run first")
                cond_aug = torch.full((B,), aug_timestep(net.cfg.cond_aug_sample, schedule), dtype=torch.long, device=dev)
                cond = augment_condition(resize_volume(outs[-1], net.size), cond_aug, schedule, generator)
            clip = (lambda x: x.clamp(*sampler.clip)) if sampler.clip is not None else (lambda x: x)
            if net.mode == "direct":
                x0 = clip(model(None, None, frontal, lateral, cond, cond_aug, context=ctx).float())
            elif getattr(net, "anchored", False):
                if not isinstance(net, AnchoredStage):
                    raise ValueError(f"{net.name} is anchored on its direct twin: sample it as an AnchoredStage "
                                     "(xct_core.checkpoint.load_stage_model of an anchored export)")
                mu = clip(net.anchor(None, None, frontal, lateral, cond, cond_aug).float())

                def predict_r(x_t: torch.Tensor, t: torch.Tensor, _m=model, _c=cond, _a=cond_aug, _ctx=ctx,
                              _mu=mu) -> torch.Tensor:
                    return _m(x_t, t, frontal, lateral, _c, _a, context=_ctx, anchor=_mu).float()

                x0_fn = sampler.guidance.for_stage(net, frontal, lateral, anchor=mu) if sampler.guidance else None
                r = sampler.sample(predict_r, (B, 1, net.size, net.size, net.size), steps=step_list[k],
                                   generator=generator, device=dev, clip=None, x0_fn=x0_fn)
                x0 = clip(mu + net.residual_scale * r)
                anchor_k = mu
            else:

                def predict_v(x_t: torch.Tensor, t: torch.Tensor, _m=model, _c=cond, _a=cond_aug, _ctx=ctx) -> torch.Tensor:
                    return _m(x_t, t, frontal, lateral, _c, _a, context=_ctx).float()

                x0_fn = sampler.guidance.for_stage(net, frontal, lateral) if sampler.guidance else None
                x0 = sampler.sample(
                    predict_v, (B, 1, net.size, net.size, net.size), steps=step_list[k], generator=generator,
                    device=dev, x0_fn=x0_fn,
                )
            if anchors is not None:
                anchors.append(anchor_k)
            outs.append(x0)
    finally:
        for m, tr in zip(stages, was_training, strict=False):
            m.train(tr)
    return outs
