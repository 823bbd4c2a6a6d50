"""Reconstruction: two line-integral X-rays → the cascade → a HU volume (+ uncertainty).

Pure torch/numpy (no MLflow: model URIs are resolved by ``components/model_uri.py``, which
hands over local stage files + params). Input files: :mod:`xct_core.xray_io`; reprojection
QA: :mod:`xct_core.qa`; measuring against a ground truth: :mod:`xct_core.evaluation`.

Output grid
-----------
The last run stage's grid: ``S``³ isotropic voxels of ``fov_mm / S`` mm, centred at the
isocentre of the input geometry, axes RAS+ of that world frame:
``affine = params.stage(n).affine(isocenter)``. Values are HU: the inverse of the networks'
HU map (``params.hu.output``, :class:`xct_core.hu.HUMap`) applied to the sampler's [−1, 1]
output, so they span the map's HU range (with ``hu.output: window`` they saturate at the
window's ends).

Sampling
--------
Sample ``i`` (0-based) of ``K`` draws all its noise from a ``torch.Generator`` seeded with
:func:`xct_core.seeding.sample_seed` ``(seed, i)`` — also when up to
``reconstruct.sample_batch`` samples run as one batch (each row draws from its own
generator, so batching changes no sample) — and runs the shared sampler
(:func:`xct_core.cascade.sample_cascade` with one :class:`xct_core.diffusion.Sampler`:
steps, ``diffusion.eta``, ``clip_x0``, ``timestep_spacing``), so ``K = 1`` with seed ``s``
gives exactly what the registered pyfunc predicts for seed ``s``. The output is the
voxel-wise mean of the K samples (HU; the posterior-mean estimate); the uncertainty is their
voxel-wise sample standard deviation (HU, ``ddof = 1``), computed with Welford's running
update (no K volumes held in memory unless ``keep_samples``: the evaluator's rank
histogram needs them). The first sample is kept too (``first_hu``): reports show
single-sample and K-mean metrics side by side.

Point estimate
--------------
``eval.point_estimate`` (:meth:`Reconstruction.point_hu`): ``mean`` = the K-sample mean;
``auto`` (the default) = ``anchor`` when the last stage is anchored, else ``mean``;
``anchor`` = the residual diffusion's K → ∞ limit, i.e. the direct twin the last (anchored,
``anchor: direct``) stage is centred on — for stage k > 1 fed by each sample's earlier
stages, averaged over the K samples (``anchor_hu``). The samples give the std and the
calibrated interval either way (:mod:`xct_core.calibration`).

The previous stage (k > 1)
--------------------------
The same K runs also give stage k − 1's point estimate, on its own grid, with no extra
sampling pass: :meth:`Reconstruction.previous_point_hu` resolves ``eval.point_estimate``
for stage k − 1 from the K-mean of stage k − 1's outputs (``previous_mean_hu``) and the
mean of its anchors (``previous_anchor_hu``, anchored stage k − 1 only). Stage k − 1's
outputs of sample ``i`` are exactly what ``reconstruct(..., upto=k-1)`` draws for sample
``i`` (stage 1 … k − 1 consume the sample's generator first), so this is the point estimate
that reconstructing up to stage k − 1 alone gives. The evaluator upsamples it as the cascade
upsamples its condition: the "previous stage upsampled" baseline
(:func:`xct_core.evaluation.upsample_previous`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from xct_core.config import Params
from xct_core.diffusion import Sampler
from xct_core.errors import ConfigError, InputError
from xct_core.qa import check_reconstruction
from xct_core.seeding import sample_seed

__all__ = ["Reconstruction", "load_stage", "load_stages", "output_affine", "reconstruct"]


def output_affine(params: Params, stage: int, isocenter: Sequence[float]) -> np.ndarray:
    """Affine of stage ``stage``'s grid (1-based) centred at ``isocenter`` (world mm, RAS+)."""
    return params.stage(stage).affine(isocenter)


# --------------------------------------------------------------------------- models


def load_stages(files: Sequence[str | Path], params: Params, device: str | torch.device = "cpu") -> list[nn.Module]:
    """THE loader of a cascade: frozen stage networks from exported files (stage 1 first).

    Each file's grid must match ``params.stages`` (:class:`InputError` naming the file
    otherwise); used by training validation (frozen earlier stages), evaluation,
    ``xct reconstruct|evaluate`` and the registered pyfunc."""
    if len(files) > params.n_stages:
        raise InputError(files[-1], f"{len(files)} stage files but the model's params define {params.n_stages} stages")
    return [load_stage(f, params, k, device) for k, f in enumerate(files, start=1)]


def load_stage(path: str | Path, params: Params, k: int, device: str | torch.device = "cpu") -> nn.Module:
    """One frozen stage network (e.g. a direct twin ``direct.pt``) for stage ``k`` of ``params``
    (:class:`InputError` naming the file when its grid does not match)."""
    from xct_core.checkpoint import load_stage_model

    net = load_stage_model(path, device)
    want = params.stage(k).size
    size = int(getattr(net, "size", want))
    if size != want:
        raise InputError(path, f"stage {k} grid {size}³ does not match the model's params ({want}³)")
    return net


# --------------------------------------------------------------------------- reconstruction


@dataclass
class Reconstruction:
    """Mean (and std when ``samples > 1``) HU volumes on the output grid ``affine``."""

    mean_hu: np.ndarray  #: float32 [S, S, S] HU (RAS+): the mean of the K samples
    std_hu: np.ndarray | None  #: float32 [S, S, S] HU, sample std over K (None for K = 1)
    affine: np.ndarray  #: float64 4x4 voxel → world mm
    stage: int
    steps: int
    seeds: list[int]
    #: stage (stage - 1) output of the first sample (HU, its own grid) for pictures; None at stage 1
    previous_hu: np.ndarray | None = None
    #: the first sample alone (HU) — the single-sample estimate beside the K-mean
    first_hu: np.ndarray | None = None
    #: the last stage's anchor (its direct twin's estimate, HU) averaged over the K samples;
    #: None when the last stage is not anchored
    anchor_hu: np.ndarray | None = None
    #: all K samples (float32 [K, S, S, S] HU) when ``reconstruct(keep_samples=True)``
    samples_hu: np.ndarray | None = None
    #: stage (stage - 1)'s outputs averaged over the K samples (HU, its own grid); None at stage 1
    previous_mean_hu: np.ndarray | None = None
    #: stage (stage - 1)'s anchor averaged over the K samples (HU, its own grid); None at stage 1
    #: or when stage (stage - 1) is not anchored
    previous_anchor_hu: np.ndarray | None = None

    @property
    def samples(self) -> int:
        return len(self.seeds)

    def point_hu(self, which: str = "mean") -> np.ndarray:
        """The point estimate ``eval.point_estimate`` (module docstring): ``mean``, ``anchor`` or
        ``auto`` (:meth:`resolve_point`)."""
        which = self.resolve_point(which)
        if which == "mean":
            return self.mean_hu
        if which == "anchor":
            if self.anchor_hu is None:
                raise ConfigError(f"eval.point_estimate: anchor needs an anchored last stage (stage {self.stage} "
                                  "has no anchor: stages.stageK.anchor: direct); use mean")
            return self.anchor_hu
        raise ConfigError(f"eval.point_estimate must be mean, anchor or auto, got {which!r}")

    def resolve_point(self, which: str) -> str:
        """``auto`` → ``anchor`` when this reconstruction's last stage is anchored (it has an
        ``anchor_hu``), else ``mean``; any other value unchanged."""
        if which == "auto":
            return "anchor" if self.anchor_hu is not None else "mean"
        return which

    def previous_point_hu(self, which: str = "mean") -> np.ndarray | None:
        """Stage (stage − 1)'s point estimate on its own grid (HU; None at stage 1), by the
        same rule as :meth:`point_hu`: ``which`` is ``eval.point_estimate`` for stage − 1
        (:meth:`xct_core.config.Params.point_estimate_for` ``(stage - 1)``)."""
        if self.previous_mean_hu is None:
            return None
        if which == "auto":
            which = "anchor" if self.previous_anchor_hu is not None else "mean"
        if which == "mean":
            return self.previous_mean_hu
        if which == "anchor":
            if self.previous_anchor_hu is None:
                raise ConfigError(f"eval.point_estimate: anchor needs an anchored stage {self.stage - 1} (the point "
                                  f"estimate of the stage before stage {self.stage}: stages.stageK.anchor: direct); "
                                  "use mean or auto")
            return self.previous_anchor_hu
        raise ConfigError(f"eval.point_estimate must be mean, anchor or auto, got {which!r}")


@torch.no_grad()
def reconstruct(
    stages: Sequence[nn.Module],
    params: Params,
    frontal: np.ndarray | torch.Tensor,
    lateral: np.ndarray | torch.Tensor,
    *,
    sampler: Sampler | None = None,
    steps: int | None = None,
    isocenter: Sequence[float] = (0.0, 0.0, 0.0),
    samples: int = 1,
    seed: int | None = None,
    upto: int | None = None,
    device: str | torch.device = "cpu",
    log: Any = None,
    keep_samples: bool = False,
) -> Reconstruction:
    """Run the cascade ``samples`` times on one X-ray pair (module docstring: seeds, mean, std).

    ``frontal``/``lateral``: ``[P, P]`` line integrals; ``sampler`` default
    :meth:`Sampler.from_params` ``(params, steps)``; ``upto``: run stages 1 … upto (default
    all given); ``seed`` default ``params.seed``; ``keep_samples``: also return the K samples.
    """
    from xct_core.cascade import sample_cascade

    say = log or (lambda _m: None)
    n = len(stages) if upto is None else int(upto)
    if not 1 <= n <= len(stages):
        raise ConfigError(f"--stages must be in 1…{len(stages)}, got {upto}")
    if samples < 1:
        raise ConfigError(f"--samples must be >= 1, got {samples}")
    dev = torch.device(device)
    net_map = params.hu.net_map()
    sampler = sampler or Sampler.from_params(params, steps)
    n_steps = sampler.steps_for(n)[-1]
    base = int(params.seed if seed is None else seed)
    f = torch.as_tensor(np.asarray(frontal, dtype=np.float32))[None, None].to(dev)
    lat = torch.as_tensor(np.asarray(lateral, dtype=np.float32))[None, None].to(dev)
    mean: np.ndarray | None = None
    m2: np.ndarray | None = None
    prev: np.ndarray | None = None
    first: np.ndarray | None = None
    anchor_sum: np.ndarray | None = None
    prev_sum: np.ndarray | None = None  # stage n-1: the sum of its outputs / anchors over the samples (HU)
    prev_anchor_sum: np.ndarray | None = None
    kept: list[np.ndarray] = []
    seeds = [sample_seed(base, i) for i in range(samples)]
    chunk = max(1, int(params.reconstruct.sample_batch))
    for lo in range(0, samples, chunk):  # samples in batches, each row with its own seed's generator
        batch = seeds[lo : lo + chunk]
        gens = [torch.Generator(device=dev).manual_seed(s) for s in batch]
        fb, lb = f.expand(len(batch), -1, -1, -1), lat.expand(len(batch), -1, -1, -1)
        anchors: list[torch.Tensor | None] = []
        outs = sample_cascade(list(stages[:n]), fb, lb, sampler=sampler, generator=gens, anchors=anchors)
        for j, s in enumerate(batch):
            i = lo + j
            hu = net_map.inverse(outs[-1][j, 0].float().cpu().numpy().astype(np.float64))
            check_reconstruction(hu, stages[n - 1], params)  # never a NaN/constant CT (xct_core/qa.py)
            if anchors[-1] is not None:
                a = net_map.inverse(anchors[-1][j, 0].float().cpu().numpy().astype(np.float64))
                anchor_sum = a if anchor_sum is None else anchor_sum + a
            if len(outs) > 1:  # stage n-1 of this sample: its point estimate comes from the same runs
                p = net_map.inverse(outs[-2][j, 0].float().cpu().numpy().astype(np.float64))
                prev_sum = p if prev_sum is None else prev_sum + p
                if anchors[-2] is not None:
                    pa = net_map.inverse(anchors[-2][j, 0].float().cpu().numpy().astype(np.float64))
                    prev_anchor_sum = pa if prev_anchor_sum is None else prev_anchor_sum + pa
            if keep_samples:
                kept.append(hu.astype(np.float32))
            if i == 0:
                first = hu.astype(np.float32)
                if len(outs) > 1:
                    prev = net_map.inverse(outs[-2][0, 0].float().cpu().numpy()).astype(np.float32)
            if mean is None:
                mean, m2 = hu.copy(), np.zeros_like(hu)
            else:  # Welford
                delta = hu - mean
                mean += delta / (i + 1)
                m2 += delta * (hu - mean)
        say(f"samples {lo + 1}-{lo + len(batch)}/{samples} (seeds {batch[0]}…{batch[-1]}, {n_steps} DDIM steps, "
            f"stages 1-{n})")
    assert mean is not None and m2 is not None
    std = np.sqrt(np.maximum(m2 / (samples - 1), 0.0)).astype(np.float32) if samples > 1 else None
    size = int(mean.shape[0])
    if size != params.stage(n).size:
        raise InputError(None, f"stage {n} produced {size}³, the params say {params.stage(n).size}³")
    anchor = None if anchor_sum is None else (anchor_sum / samples).astype(np.float32)
    prev_mean = None if prev_sum is None else (prev_sum / samples).astype(np.float32)
    prev_anchor = None if prev_anchor_sum is None else (prev_anchor_sum / samples).astype(np.float32)
    return Reconstruction(mean.astype(np.float32), std, output_affine(params, n, isocenter), n, n_steps, seeds,
                          prev, first, anchor, np.stack(kept) if keep_samples else None, prev_mean, prev_anchor)
