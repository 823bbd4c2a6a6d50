"""Diffusion maths: cosine noise schedule, v-parameterisation, timestep embedding, DDIM.

This module is the ONE implementation of each of these; training, training-time
validation and inference all import from here.

Conventions
-----------
* Discrete timesteps ``t ∈ {0, …, T-1}`` (integer tensors ``[B]``); ``t = 0`` is the least
  noisy, ``t = T-1`` the noisiest. ``ā_t = schedule.alphas_cumprod[t]``.
* Forward process: ``x_t = sqrt(ā_t)·x0 + sqrt(1-ā_t)·eps`` with ``eps ~ N(0, I)``.
* v-parameterisation (Salimans & Ho 2022)::

      v   = sqrt(ā)·eps − sqrt(1−ā)·x0
      x0  = sqrt(ā)·x_t − sqrt(1−ā)·v
      eps = sqrt(1−ā)·x_t + sqrt(ā)·v        (= (x_t − sqrt(ā)·x0) / sqrt(1−ā))

  The network predicts ``v``; the sampler converts with :func:`x0_from_v` /
  :func:`eps_from_v` (never treats ``v`` as ``eps``).
* Per-sample ``ā`` is broadcast over any ``[B, C, ...]`` shape.
* Data range: windowed volumes live in ``[-1, 1]`` (see :mod:`xct_core.hu`); the sampler
  clips its x0 prediction to that range (only inside the sampler).

Timestep spacing for sampling (:func:`ddim_timesteps`)
-----------------------------------------------------
Default ``"trailing"`` (Lin et al. 2024, Table 2; diffusers ``timestep_spacing="trailing"``):
``round(arange(T, 0, −T/steps)) − 1`` — the first step is always at ``t = T−1`` (pure noise
when ``zero_terminal_snr``), the last at ``T/steps − 1``, then one final step to
``ā_prev = 1`` (diffusers ``set_alpha_to_one=True``), which returns the x0 prediction.
``"leading"`` (``arange(steps)·(T//steps)`` reversed, as diffusers with ``steps_offset=0``)
is available for comparison; it never visits ``t = T−1`` and is not recommended.
The step from ``timesteps[i]`` goes to ``timesteps[i+1]`` (or to ā = 1 after the last one).
For step counts that divide ``T`` this is exactly diffusers' DDIMScheduler; for other
counts diffusers steps to ``t − T//steps`` instead of the next listed timestep, we step to
the next listed timestep.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any, Literal

import torch

if TYPE_CHECKING:  # pragma: no cover - typing only
    from xct_core.config import DiffusionParams, Params

Spacing = Literal["trailing", "leading"]

__all__ = [
    "CosineSchedule",
    "q_sample",
    "v_target",
    "x0_from_v",
    "eps_from_v",
    "snr",
    "sample_timesteps",
    "timestep_embedding",
    "ddim_timesteps",
    "ddim_step",
    "ddim_sample",
    "randn",
    "Sampler",
]


# --------------------------------------------------------------------------------------
# schedule
# --------------------------------------------------------------------------------------


class CosineSchedule:
    """Cosine noise schedule (Nichol & Dhariwal 2021; diffusers ``"squaredcos_cap_v2"``).

    ``f(τ) = cos²((τ + s)/(1 + s) · π/2)``, ``β_i = min(1 − f((i+1)/T)/f(i/T), max_beta)``,
    ``ā_i = Π_{j≤i}(1 − β_j)`` for ``i = 0 … T−1``. Computed in float64.

    With ``zero_terminal_snr=True`` the betas are rescaled as in Lin et al. 2024
    ("Common Diffusion Noise Schedules and Sample Steps are Flawed", Algorithm 1):
    ``sqrt(ā)`` is shifted so that ``ā_{T−1} = 0`` exactly and scaled so ``ā_0`` is kept.
    Then ``x_{T−1}`` is pure noise and the v target there is ``−x0`` (fine for v-prediction;
    note ``snr(T−1) = 0``, so loss weights must not divide by the SNR).

    Attributes:
        num_timesteps: T.
        betas: float32 ``[T]``.
        alphas_cumprod: float32 ``[T]`` (ā_t), decreasing from ≈1 to ≈0 (exactly 0 with
            zero-terminal-SNR).
    """

    def __init__(
        self,
        num_timesteps: int = 1000,
        s: float = 0.008,
        max_beta: float = 0.999,
        zero_terminal_snr: bool = False,
    ) -> None:
        if int(num_timesteps) < 1:
            raise ValueError(f"num_timesteps must be >= 1, got {num_timesteps}")
        if not (0.0 < max_beta <= 1.0):
            raise ValueError(f"max_beta must be in (0, 1], got {max_beta}")
        if s < 0:
            raise ValueError(f"s must be >= 0, got {s}")
        T = int(num_timesteps)
        self.num_timesteps = T
        self.s = float(s)
        self.max_beta = float(max_beta)
        self.zero_terminal_snr = bool(zero_terminal_snr)

        def f(tau: float) -> float:
            return math.cos((tau + s) / (1.0 + s) * math.pi / 2.0) ** 2

        betas = torch.tensor(
            [min(1.0 - f((i + 1) / T) / f(i / T), max_beta) for i in range(T)], dtype=torch.float64
        )
        ac = torch.cumprod(1.0 - betas, dim=0)
        if zero_terminal_snr:
            sq = ac.sqrt()
            sq0, sqT = sq[0].clone(), sq[-1].clone()
            sq = (sq - sqT) * (sq0 / (sq0 - sqT))
            ac = sq**2
            alphas = torch.cat([ac[:1], ac[1:] / ac[:-1]])
            betas = 1.0 - alphas
        self._alphas_cumprod64 = ac
        self._tables: dict[str, torch.Tensor] = {}
        self.alphas_cumprod = ac.to(torch.float32)
        self.betas = betas.to(torch.float32)

    @classmethod
    def from_params(cls, p: DiffusionParams) -> CosineSchedule:
        """Build the schedule from the ``diffusion:`` section of params.yaml."""
        return cls(
            num_timesteps=p.num_timesteps,
            s=p.cosine_s,
            max_beta=p.max_beta,
            zero_terminal_snr=p.zero_terminal_snr,
        )

    def __repr__(self) -> str:
        return (
            f"CosineSchedule(num_timesteps={self.num_timesteps}, s={self.s}, "
            f"max_beta={self.max_beta}, zero_terminal_snr={self.zero_terminal_snr})"
        )

    def abar(self, t: torch.Tensor | int, like: torch.Tensor) -> torch.Tensor:
        """ā_t gathered for integer timesteps and shaped to broadcast against ``like``.

        ``t`` is an int or an integer tensor ``[B]`` (values in ``[0, T)``; ``-1`` means
        "before step 0", i.e. ā = 1). Returns ``[B, 1, 1, ...]`` (or a 0-d tensor for a
        scalar ``t``) in ``like``'s dtype and device.
        """
        if isinstance(t, numbers.Integral):
            t = int(t)
            if not (-1 <= t < self.num_timesteps):
                raise ValueError(f"timestep must be in [-1, {self.num_timesteps}), got {t}")
            val = 1.0 if t < 0 else float(self._alphas_cumprod64[t])
            return torch.tensor(val, dtype=like.dtype, device=like.device)
        if t.dtype.is_floating_point or t.dtype.is_complex or t.dtype == torch.bool:
            raise TypeError(f"timesteps must be an integer tensor, got {t.dtype}")
        if t.device.type == "cpu" and t.numel():  # cheap check; skipped on GPU (no sync)
            lo, hi = int(t.min()), int(t.max())
            if lo < -1 or hi >= self.num_timesteps:
                raise ValueError(f"timesteps must be in [-1, {self.num_timesteps}), got [{lo}, {hi}]")
        vals = self._table(t.device)[t.reshape(-1).long() + 1]
        if t.dim() == 0:
            return vals.reshape(()).to(device=like.device, dtype=like.dtype)
        if like.dim() >= 1 and like.shape[0] != vals.numel():
            raise ValueError(f"timesteps [{vals.numel()}] do not match batch size {like.shape[0]}")
        return vals.reshape(-1, *([1] * (like.dim() - 1))).to(device=like.device, dtype=like.dtype)

    def _table(self, device: torch.device) -> torch.Tensor:
        """float64 ``[1, ā_0, …, ā_{T−1}]`` on ``device`` (index ``t + 1``), cached."""
        key = str(device)
        tab = self._tables.get(key)
        if tab is None:
            tab = torch.cat([torch.ones(1, dtype=torch.float64), self._alphas_cumprod64]).to(device)
            self._tables[key] = tab
        return tab


# --------------------------------------------------------------------------------------
# v-parameterisation helpers
# --------------------------------------------------------------------------------------


def q_sample(
    x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor, schedule: CosineSchedule,
) -> torch.Tensor:
    """Forward process: ``x_t = sqrt(ā_t)·x0 + sqrt(1−ā_t)·noise`` (per-sample ā, [B, ...])."""
    a = schedule.abar(t, x0)
    return a.sqrt() * x0 + (1.0 - a).sqrt() * noise


def v_target(
    x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor, schedule: CosineSchedule,
) -> torch.Tensor:
    """Training target ``v = sqrt(ā_t)·eps − sqrt(1−ā_t)·x0``."""
    a = schedule.abar(t, x0)
    return a.sqrt() * noise - (1.0 - a).sqrt() * x0


def x0_from_v(x_t: torch.Tensor, v: torch.Tensor, t: torch.Tensor, schedule: CosineSchedule) -> torch.Tensor:
    """``x0 = sqrt(ā_t)·x_t − sqrt(1−ā_t)·v``."""
    a = schedule.abar(t, x_t)
    return a.sqrt() * x_t - (1.0 - a).sqrt() * v


def eps_from_v(x_t: torch.Tensor, v: torch.Tensor, t: torch.Tensor, schedule: CosineSchedule) -> torch.Tensor:
    """``eps = sqrt(1−ā_t)·x_t + sqrt(ā_t)·v``."""
    a = schedule.abar(t, x_t)
    return (1.0 - a).sqrt() * x_t + a.sqrt() * v


def snr(t: torch.Tensor, schedule: CosineSchedule) -> torch.Tensor:
    """Signal-to-noise ratio ``ā_t / (1 − ā_t)`` per timestep (float32 ``[B]``; 0 at
    ``t = T−1`` with zero-terminal-SNR). For loss weighting, e.g. min-SNR-γ for v:
    ``min(snr, γ) / (snr + 1)``."""
    a = schedule._table(t.device)[t.detach().long() + 1]
    return (a / (1.0 - a)).to(torch.float32)


#: a generator, or one generator per batch row (batched samples that each keep their own seed)
Generators = "torch.Generator | Sequence[torch.Generator] | None"


def randn(
    shape: tuple[int, ...] | torch.Size,
    generator: torch.Generator | Sequence[torch.Generator] | None,
    device: torch.device | str | None,
    dtype: torch.dtype,
) -> torch.Tensor:
    """Standard normal noise drawn on the generator's device (so a CPU generator gives the
    same numbers whatever ``device`` is), then moved to ``device``.

    ``generator`` may be a sequence of generators, one per batch row (``shape[0]``): row ``i``
    is drawn from generator ``i`` alone, so a batch of samples draws exactly the numbers the
    samples would draw one at a time (batched sampling keeps every sample's seed)."""
    if isinstance(generator, (list, tuple)):
        if len(generator) != shape[0]:
            raise ValueError(f"{len(generator)} generators for a batch of {shape[0]}")
        rows = [torch.randn(tuple(shape[1:]), generator=g, device=g.device, dtype=dtype) for g in generator]
        return torch.stack(rows).to(device)
    gen_device = generator.device if generator is not None else device
    return torch.randn(tuple(shape), generator=generator, device=gen_device, dtype=dtype).to(device)


_randn = randn


def sample_timesteps(
    batch: int,
    schedule: CosineSchedule,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Uniform integer timesteps in ``[0, T)``, ``torch.long`` ``[batch]`` on ``device``."""
    gen_device = generator.device if generator is not None else device
    t = torch.randint(0, schedule.num_timesteps, (int(batch),), generator=generator, device=gen_device)
    return t.to(device)


# --------------------------------------------------------------------------------------
# timestep embedding
# --------------------------------------------------------------------------------------


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal timestep embedding (Transformer / guided-diffusion convention).

    ``half = dim // 2``; ``freq_k = max_period^(−k/half)`` for ``k = 0 … half−1``;
    ``emb = [cos(t·freq), sin(t·freq)]`` → ``[B, 2·half]``; for odd ``dim`` a zero column is
    appended so the result is ``[B, dim]``. ``t`` is the raw integer timestep (not scaled
    to [0, 1]); float ``t`` is accepted too. Output float32 on ``t``'s device. This is the
    only timestep embedding in the project.
    """
    if dim < 1:
        raise ValueError(f"embedding dim must be >= 1, got {dim}")
    t = t.reshape(-1).to(torch.float32)
    half = dim // 2
    freqs = torch.exp(
        -math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / max(half, 1)
    )
    args = t[:, None] * freqs[None, :]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = torch.cat([emb, emb.new_zeros(emb.shape[0], 1)], dim=-1)
    return emb


# --------------------------------------------------------------------------------------
# DDIM
# --------------------------------------------------------------------------------------


def ddim_timesteps(num_timesteps: int, steps: int, spacing: Spacing = "trailing") -> list[int]:
    """The descending timesteps a ``steps``-step sampler visits (see module docstring).

    ``trailing``: ``round(arange(T, 0, −T/steps)) − 1`` (first = T−1).
    ``leading``: ``arange(steps)·(T // steps)`` reversed (first = (steps−1)·(T//steps)).
    """
    T = int(num_timesteps)
    if not (1 <= steps <= T):
        raise ValueError(f"steps must be in [1, {T}], got {steps}")
    if spacing == "trailing":
        ratio = T / steps
        ts = [int(round(T - i * ratio)) - 1 for i in range(steps)]
    elif spacing == "leading":
        ratio_i = T // steps
        ts = [(steps - 1 - i) * ratio_i for i in range(steps)]
    else:
        raise ValueError(f"unknown timestep spacing {spacing!r} (trailing | leading)")
    if any(b >= a for a, b in zip(ts, ts[1:], strict=False)) or ts[-1] < 0:
        raise AssertionError(f"timesteps not strictly decreasing: {ts}")  # cannot happen
    return ts


def ddim_step(
    x_t: torch.Tensor,
    v: torch.Tensor,
    t: int,
    t_prev: int,
    schedule: CosineSchedule,
    *,
    eta: float = 0.0,
    clip: tuple[float, float] | None = (-1.0, 1.0),
    generator: torch.Generator | None = None,
    x0_fn: Callable[[torch.Tensor, int], torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One DDIM update ``x_t → x_{t_prev}`` from a v prediction (Song et al. 2021, eq. 12).

    ``t_prev = -1`` means the final step to ``ā_prev = 1`` (returns the x0 prediction, plus
    no noise). x0 is predicted from v, clipped to ``clip`` (``None``: no clipping), and eps
    is recomputed from the clipped x0 so that ``x_t = sqrt(ā)·x0 + sqrt(1−ā)·eps`` holds
    (diffusers ``use_clipped_model_output=True``). ``x0_fn(x0, t)`` (optional) then corrects
    the x0 prediction — data consistency with the measured X-rays
    (:class:`xct_core.guidance.DataConsistency`) — and eps is re-derived from the corrected
    x0 the same way, so ``x_t = sqrt(ā)·x0 + sqrt(1−ā)·eps`` still holds::

        σ      = eta · sqrt((1−ā_prev)/(1−ā_t)) · sqrt(1 − ā_t/ā_prev)
        x_prev = sqrt(ā_prev)·x0 + sqrt(1 − ā_prev − σ²)·eps + σ·z,   z ~ N(0, I)

    Returns ``(x_prev, x0_pred)``.
    """
    a_t = schedule.abar(int(t), x_t)
    a_prev = schedule.abar(int(t_prev), x_t)
    tt = torch.full((x_t.shape[0],), int(t), dtype=torch.long, device=x_t.device)
    x0_raw = x0_from_v(x_t, v, tt, schedule)
    eps = eps_from_v(x_t, v, tt, schedule)
    x0 = x0_raw
    if clip is not None:
        x0 = x0_raw.clamp(float(clip[0]), float(clip[1]))
        # eps re-derived from the clipped x0: (x_t − sqrt(ā)·x0c)/sqrt(1−ā), written as a
        # correction of eps_from_v so it is exact where nothing was clipped (and at ā=0).
        eps = eps + (a_t.sqrt() / (1.0 - a_t).sqrt()) * (x0_raw - x0)
    if x0_fn is not None:
        x0_new = x0_fn(x0, int(t))
        if clip is not None:
            x0_new = x0_new.clamp(float(clip[0]), float(clip[1]))
        eps = eps + (a_t.sqrt() / (1.0 - a_t).sqrt()) * (x0 - x0_new)
        x0 = x0_new
    if eta > 0 and t_prev >= 0:
        sigma = eta * ((1.0 - a_prev) / (1.0 - a_t)).sqrt() * (1.0 - a_t / a_prev).clamp(min=0).sqrt()
    else:
        sigma = torch.zeros_like(a_t)
    direction = (1.0 - a_prev - sigma**2).clamp(min=0).sqrt()
    x_prev = a_prev.sqrt() * x0 + direction * eps
    if eta > 0 and t_prev >= 0:
        x_prev = x_prev + sigma * _randn(x_t.shape, generator, x_t.device, x_t.dtype)
    return x_prev, x0


@torch.no_grad()
def ddim_sample(
    predict_v: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    shape: tuple[int, ...] | torch.Size,
    *,
    schedule: CosineSchedule,
    steps: int,
    eta: float = 0.0,
    generator: torch.Generator | None = None,
    clip: tuple[float, float] | None = (-1.0, 1.0),
    x_T: torch.Tensor | None = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
    progress: bool = False,
    spacing: Spacing = "trailing",
    x0_fn: Callable[[torch.Tensor, int], torch.Tensor] | None = None,
) -> torch.Tensor:
    """DDIM sampler for a v-predicting model — THE sampler of the project.

    Args:
        predict_v: ``predict_v(x_t, t) -> v``; ``x_t`` has ``shape``, ``t`` is a
            ``torch.long`` tensor ``[B]`` (all equal). Put the model in eval mode and bind
            its conditioning (e.g. with a closure) before calling.
        shape: ``[B, C, ...]`` of the sample.
        schedule: the training schedule.
        steps: number of model evaluations (1 … T); spacing per :func:`ddim_timesteps`.
        eta: 0 = deterministic DDIM; 1 = DDPM-like ancestral noise.
        generator: drives ``x_T`` (when not given) and the eta noise; the same seed gives
            identical samples. Noise is drawn on the generator's device.
        clip: range the x0 prediction is clipped to at every step (``None`` = no clip).
        x_T: starting noise (default: standard normal from ``generator``).
        device, dtype: of the sample (default device: ``x_T``'s, else CPU).
        progress: show a tqdm bar.
        spacing: ``"trailing"`` (default; first step at t = T−1) or ``"leading"``.
        x0_fn: optional correction ``x0_fn(x0, t) -> x0`` of every step's x0 prediction
            (:func:`ddim_step`; e.g. DRR data consistency). ``None``: plain DDIM.

    Returns:
        The x0 sample (``shape``, ``dtype``). With ``steps=1`` it is the (clipped) x0
        prediction at ``t = T−1`` (trailing).
    """
    if not eta >= 0:
        raise ValueError(f"eta must be >= 0, got {eta}")
    if x_T is not None:
        if tuple(x_T.shape) != tuple(shape):
            raise ValueError(f"x_T shape {tuple(x_T.shape)} != requested shape {tuple(shape)}")
        device = x_T.device if device is None else device
        x = x_T.to(device=device, dtype=dtype)
    else:
        device = torch.device("cpu") if device is None else device
        x = _randn(shape, generator, device, dtype)
    ts = ddim_timesteps(schedule.num_timesteps, steps, spacing)
    prevs = ts[1:] + [-1]
    it = zip(ts, prevs, strict=True)
    if progress:
        from tqdm.auto import tqdm

        it = tqdm(it, total=len(ts), desc="DDIM", leave=False)
    B = x.shape[0]
    for t, t_prev in it:
        t_batch = torch.full((B,), t, dtype=torch.long, device=x.device)
        v = predict_v(x, t_batch)
        if v.shape != x.shape:
            raise ValueError(f"predict_v returned shape {tuple(v.shape)}, expected {tuple(x.shape)}")
        x, _ = ddim_step(x, v.to(x.dtype), t, t_prev, schedule, eta=eta, clip=clip, generator=generator, x0_fn=x0_fn)
    return x


# --------------------------------------------------------------------------------------
# the sampler settings, resolved once
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Sampler:
    """Everything :func:`ddim_sample` needs besides the model: the schedule and the
    ``diffusion:`` sampler params, resolved ONCE (:meth:`from_params`) and passed down, so
    ``eta``, ``clip_x0`` and ``timestep_spacing`` reach every caller (validation, evaluation,
    reconstruction, serving) through the same object.

    Attributes:
        schedule: the training noise schedule.
        steps: DDIM steps, one for every stage or one per stage.
        eta: 0 = deterministic DDIM.
        clip: range of the x0 prediction inside the sampler (``None``: no clipping).
        spacing: ``"trailing"`` | ``"leading"`` (:func:`ddim_timesteps`).
    """

    schedule: CosineSchedule
    steps: int | tuple[int, ...]
    eta: float = 0.0
    clip: tuple[float, float] | None = (-1.0, 1.0)
    spacing: Spacing = "trailing"
    #: DRR data consistency inside DDIM (:class:`xct_core.guidance.Guidance`; ``None``: off)
    guidance: Any = None

    @classmethod
    def from_params(cls, params: Params, steps: int | None = None) -> Sampler:
        """The project's sampler from params. THE steps rule: ``steps`` (a command-line or
        validation override, every stage) or ``eval.sample_steps`` (one number or per stage)
        or ``diffusion.sample_steps``."""
        d = params.diffusion
        per = [int(steps or params.eval.steps_for(name) or d.sample_steps) for name in params.stages]
        bad = [s for s in per if not 1 <= s <= d.num_timesteps]
        if bad:
            from xct_core.errors import ConfigError

            raise ConfigError(f"DDIM steps must be in 1…{d.num_timesteps}, got {bad[0]}")
        n: int | tuple[int, ...] = per[0] if len(set(per)) == 1 else tuple(per)
        guidance = None
        if d.guidance_weight > 0:
            from xct_core.guidance import Guidance

            guidance = Guidance.from_params(params)
        return cls(
            schedule=CosineSchedule.from_params(d),
            steps=n,
            eta=float(d.eta),
            clip=(-1.0, 1.0) if d.clip_x0 else None,
            spacing=d.timestep_spacing,
            guidance=guidance,
        )

    def with_steps(self, steps: int | Sequence[int]) -> Sampler:
        return replace(self, steps=int(steps) if isinstance(steps, int) else tuple(int(s) for s in steps))

    def steps_for(self, n_stages: int) -> list[int]:
        """Per-stage step counts for ``n_stages`` stages."""
        if isinstance(self.steps, int):
            return [int(self.steps)] * n_stages
        out = [int(s) for s in self.steps][:n_stages]
        if len(out) != n_stages:
            raise ValueError(f"need {n_stages} step counts, got {self.steps}")
        return out

    def sample(
        self,
        predict_v: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
        shape: tuple[int, ...] | torch.Size,
        *,
        steps: int,
        generator: torch.Generator | None = None,
        device: torch.device | str | None = None,
        progress: bool = False,
        clip: tuple[float, float] | None | str = "settings",
        x0_fn: Callable[[torch.Tensor, int], torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """:func:`ddim_sample` with these settings (``steps``: this stage's count; ``clip``
        overrides the settings' x0 range, e.g. ``None`` for a residual that has no [-1, 1];
        ``x0_fn``: this stage's x0 correction, built from :attr:`guidance`)."""
        return ddim_sample(
            predict_v, shape, schedule=self.schedule, steps=int(steps), eta=self.eta, generator=generator,
            clip=self.clip if clip == "settings" else clip, device=device, progress=progress, spacing=self.spacing,
            x0_fn=x0_fn,
        )
