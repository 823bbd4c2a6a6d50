"""Diffusion maths: schedule, v-parameterisation, timestep embedding and the DDIM sampler.

Checks are analytic (oracle predictors that know x0, a Gaussian data distribution with an
exact denoiser) or against the reference implementation (diffusers' DDIMScheduler).
"""

from __future__ import annotations

import math

import pytest
import torch

import xct_core.diffusion as D
from xct_core.config import DiffusionParams, params_from_dict
from xct_core.errors import ConfigError

T = 1000


@pytest.fixture(scope="module", params=[False, True], ids=["cos", "cos-ztsnr"])
def schedule(request) -> D.CosineSchedule:
    return D.CosineSchedule(T, zero_terminal_snr=request.param)


def _diffusers(schedule: D.CosineSchedule, clip: bool, spacing: str = "trailing"):
    diffusers = pytest.importorskip("diffusers")
    return diffusers.DDIMScheduler(
        num_train_timesteps=schedule.num_timesteps,
        beta_schedule="squaredcos_cap_v2",
        prediction_type="v_prediction",
        clip_sample=clip,
        clip_sample_range=1.0,
        set_alpha_to_one=True,
        steps_offset=0,
        timestep_spacing=spacing,
        rescale_betas_zero_snr=schedule.zero_terminal_snr,
    )


def _x0(shape=(2, 1, 6, 7, 5), seed=0, amp=0.9) -> torch.Tensor:
    """A structured x0 strictly inside the clip range [-1, 1]."""
    g = torch.Generator().manual_seed(seed)
    i, j, k = torch.meshgrid(*(torch.linspace(-1, 1, n) for n in shape[2:]), indexing="ij")
    base = torch.sin(3 * i) * torch.cos(2 * j) + 0.5 * k
    x = base.expand(shape) + 0.3 * torch.randn(shape, generator=g)
    return amp * x / x.abs().max()


def _oracle(x0: torch.Tensor, schedule: D.CosineSchedule):
    """predict_v that returns the true v for a known x0, written independently of the
    helpers under test: eps_hat = (x_t − sqrt(ā)·x0)/sqrt(1−ā), v = sqrt(ā)·eps_hat − sqrt(1−ā)·x0."""
    ac = schedule.alphas_cumprod.to(torch.float64)

    def predict_v(x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        a = ac[t].view(-1, *([1] * (x_t.dim() - 1)))
        xt, x0d = x_t.double(), x0.double()
        eps_hat = (xt - a.sqrt() * x0d) / (1 - a).sqrt()
        return (a.sqrt() * eps_hat - (1 - a).sqrt() * x0d).to(x_t.dtype)

    return predict_v


def _fake_model(x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """A deterministic, non-trivial 'network' (x0 predictions regularly leave [-1, 1])."""
    tt = t.to(x_t.dtype).view(-1, *([1] * (x_t.dim() - 1))) / T
    return 1.3 * torch.sin(2.0 * x_t) + 0.4 * x_t * tt - 0.2 * tt


# ------------------------------------------------------------------- schedule


def test_schedule_matches_diffusers(schedule):
    ref = _diffusers(schedule, clip=False)
    assert schedule.alphas_cumprod.dtype == torch.float32
    assert schedule.alphas_cumprod.shape == (T,)
    assert schedule.num_timesteps == T
    torch.testing.assert_close(schedule.alphas_cumprod, ref.alphas_cumprod, atol=2e-6, rtol=0)
    torch.testing.assert_close(schedule.betas, ref.betas, atol=2e-6, rtol=1e-5)
    assert torch.all(schedule.alphas_cumprod[1:] < schedule.alphas_cumprod[:-1])
    if schedule.zero_terminal_snr:
        assert schedule.alphas_cumprod[-1].item() == 0.0
    else:
        assert 0 < schedule.alphas_cumprod[-1].item() < 1e-8


def test_schedule_is_the_published_cosine():
    """ā at the first steps follows f(t)/f(0) with f = cos²((t/T + s)/(1+s)·π/2) (before the
    0.999 beta cap takes effect near t = T)."""
    sch = D.CosineSchedule(T)
    f = lambda tau: math.cos((tau + 0.008) / 1.008 * math.pi / 2) ** 2  # noqa: E731
    for i in (0, 10, 500, 900):
        assert sch.alphas_cumprod[i].item() == pytest.approx(f((i + 1) / T) / f(0), rel=1e-5)


def test_timesteps_match_diffusers(schedule):
    ref = _diffusers(schedule, clip=False)
    for steps in (1, 10, 50, 1000):
        ref.set_timesteps(steps)
        assert D.ddim_timesteps(T, steps) == ref.timesteps.tolist()
    assert D.ddim_timesteps(T, 1) == [T - 1]
    lead = _diffusers(schedule, clip=False, spacing="leading")
    for steps in (10, 50):
        lead.set_timesteps(steps)
        assert D.ddim_timesteps(T, steps, "leading") == lead.timesteps.tolist()
    with pytest.raises(ValueError):
        D.ddim_timesteps(T, 0)
    with pytest.raises(ValueError):
        D.ddim_timesteps(T, T + 1)


def test_timesteps_non_divisible_are_strictly_decreasing():
    for steps in (3, 7, 33, 999):
        ts = D.ddim_timesteps(T, steps)
        assert len(ts) == steps and ts[0] == T - 1 and ts[-1] >= 0
        assert all(b < a for a, b in zip(ts, ts[1:]))


# ------------------------------------------------------------------- v-param helpers


def test_helpers_round_trip_and_broadcast_per_sample(schedule):
    g = torch.Generator().manual_seed(1)
    x0 = torch.randn(4, 2, 3, 4, 5, generator=g, dtype=torch.float64)
    eps = torch.randn(4, 2, 3, 4, 5, generator=g, dtype=torch.float64)
    t = torch.tensor([0, 17, 500, T - 1])
    x_t = D.q_sample(x0, t, eps, schedule)
    v = D.v_target(x0, eps, t, schedule)
    # explicit per-sample formulas (public ā is float32: sqrt(1−ā_0) ≈ 0.006 carries ~1e-5)
    a = schedule.alphas_cumprod.double()[t].view(4, 1, 1, 1, 1)
    torch.testing.assert_close(x_t, a.sqrt() * x0 + (1 - a).sqrt() * eps, atol=2e-5, rtol=0)
    torch.testing.assert_close(v, a.sqrt() * eps - (1 - a).sqrt() * x0, atol=2e-5, rtol=0)
    # mutual inverses
    torch.testing.assert_close(D.x0_from_v(x_t, v, t, schedule), x0, atol=1e-6, rtol=0)
    torch.testing.assert_close(D.eps_from_v(x_t, v, t, schedule), eps, atol=1e-6, rtol=0)
    # and in float32
    x0f, epsf = x0.float(), eps.float()
    xtf = D.q_sample(x0f, t, epsf, schedule)
    vf = D.v_target(x0f, epsf, t, schedule)
    assert xtf.dtype == torch.float32
    torch.testing.assert_close(D.x0_from_v(xtf, vf, t, schedule), x0f, atol=1e-5, rtol=0)
    torch.testing.assert_close(D.eps_from_v(xtf, vf, t, schedule), epsf, atol=1e-5, rtol=0)


def test_helpers_reject_bad_timesteps(schedule):
    x = torch.zeros(2, 1, 2, 2, 2)
    with pytest.raises(TypeError):
        D.q_sample(x, torch.tensor([0.5, 1.0]), x, schedule)
    with pytest.raises(ValueError):
        D.q_sample(x, torch.tensor([0, T]), x, schedule)
    with pytest.raises(ValueError):
        D.q_sample(x, torch.tensor([0, 1, 2]), x, schedule)


def test_snr():
    sch = D.CosineSchedule(T, zero_terminal_snr=True)
    s = D.snr(torch.tensor([0, 500, T - 1]), sch)
    a = sch.alphas_cumprod.double()[[0, 500]]
    torch.testing.assert_close(s[:2], (a / (1 - a)).float(), rtol=1e-3, atol=0)  # float32 ā
    assert s[2].item() == 0.0


def test_sample_timesteps():
    sch = D.CosineSchedule(T)
    t1 = D.sample_timesteps(4096, sch, generator=torch.Generator().manual_seed(3))
    t2 = D.sample_timesteps(4096, sch, generator=torch.Generator().manual_seed(3))
    assert t1.dtype == torch.long and t1.shape == (4096,)
    assert torch.equal(t1, t2)
    assert int(t1.min()) >= 0 and int(t1.max()) <= T - 1
    assert int(t1.min()) < 10 and int(t1.max()) > T - 10  # covers the range
    assert abs(t1.double().mean().item() - (T - 1) / 2) < 25  # uniform: sd of mean ≈ 4.5


# ------------------------------------------------------------------- timestep embedding


def test_timestep_embedding():
    t = torch.tensor([0, 1, 10, 999])
    e = D.timestep_embedding(t, 64)
    assert e.shape == (4, 64) and e.dtype == torch.float32
    torch.testing.assert_close(e[0], torch.cat([torch.ones(32), torch.zeros(32)]))
    torch.testing.assert_close(e[:, 0], torch.cos(t.float()))  # frequency 1
    torch.testing.assert_close(e[:, 32], torch.sin(t.float()))
    torch.testing.assert_close(e[:, 31], torch.cos(t.float() * 10000 ** (-31 / 32)))
    # distinct rows for distinct timesteps
    all_t = D.timestep_embedding(torch.arange(T), 32)
    d = torch.cdist(all_t, all_t) + torch.eye(T) * 1e9
    assert d.min().item() > 1e-3
    # odd dim: a zero column is appended
    eo = D.timestep_embedding(t, 7)
    assert eo.shape == (4, 7)
    torch.testing.assert_close(eo[:, :6], D.timestep_embedding(t, 6))
    assert torch.all(eo[:, 6] == 0)
    assert D.timestep_embedding(t, 1).shape == (4, 1)
    with pytest.raises(ValueError):
        D.timestep_embedding(t, 0)


# ------------------------------------------------------------------- DDIM


def _oracle_sample(schedule: D.CosineSchedule, steps: int, clip=(-1.0, 1.0)) -> tuple[torch.Tensor, torch.Tensor]:
    x0 = _x0()
    out = D.ddim_sample(_oracle(x0, schedule), x0.shape, schedule=schedule, steps=steps,
                        generator=torch.Generator().manual_seed(steps), clip=clip)
    return out, x0


@pytest.mark.parametrize("steps", [1, 10, 50, 1000])
def test_oracle_ddim_recovers_x0(schedule, steps):
    """A predictor returning the true v for a fixed x0 makes DDIM return that x0."""
    for clip in ((-1.0, 1.0), None):
        out, x0 = _oracle_sample(schedule, steps, clip)
        assert out.shape == x0.shape and out.dtype == torch.float32
        assert (out - x0).abs().max().item() < 1e-4


def _psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    return 10 * math.log10(4.0 / ((a - b) ** 2).mean().item())


def test_v_used_as_eps_bug_is_caught(monkeypatch):
    """The original system's validation sampler treated the v output as eps (8.6 dB). Put
    that bug into the real sampler: the oracle test (few steps) and the Gaussian-statistics
    test must fail. (With many steps an x0-oracle partly hides the bug — it re-anchors on
    the true x0 at every step — hence the step counts 1 and 10 in the oracle test.)"""
    sch = D.CosineSchedule(T)

    def x0_as_if_eps(x_t, v, t, schedule):  # eps-parameterisation formula applied to v
        a = schedule.abar(t, x_t)
        return (x_t - (1 - a).sqrt() * v) / a.sqrt()

    monkeypatch.setattr(D, "eps_from_v", lambda x_t, v, t, schedule: v)
    monkeypatch.setattr(D, "x0_from_v", x0_as_if_eps)
    bad1, x0 = _oracle_sample(sch, 1)
    assert _psnr(bad1, x0) < 12.0  # ≈ 7 dB, the order of the original 8.6 dB
    bad10, x0 = _oracle_sample(sch, 10)
    assert (bad10 - x0).abs().max().item() > 1e-2  # fails the 1e-4 oracle criterion
    mean, std = _gaussian_stats(sch, eta=0.0)
    assert abs(mean - 0.3) > 1.0 or not math.isfinite(mean)


@pytest.mark.parametrize("clip", [False, True], ids=["noclip", "clip"])
def test_ddim_matches_diffusers_step_by_step(schedule, clip):
    ref = _diffusers(schedule, clip=clip)
    clip_range = (-1.0, 1.0) if clip else None
    shape = (2, 1, 5, 4, 3)
    for steps in (1, 10, 50):
        ref.set_timesteps(steps)
        ts = D.ddim_timesteps(T, steps)
        assert ts == ref.timesteps.tolist()
        x_T = torch.randn(shape, generator=torch.Generator().manual_seed(steps))
        x = x_T.clone()
        n_clipped = 0
        for i, t in enumerate(ts):
            t_prev = ts[i + 1] if i + 1 < len(ts) else -1
            v = _fake_model(x, torch.full((2,), t))
            mine, x0_pred = D.ddim_step(x, v, t, t_prev, schedule, eta=0.0, clip=clip_range)
            theirs = ref.step(v, t, x, eta=0.0, use_clipped_model_output=True)
            torch.testing.assert_close(mine, theirs.prev_sample, atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(x0_pred, theirs.pred_original_sample, atol=1e-5, rtol=1e-5)
            n_clipped += int((D.x0_from_v(x, v, torch.full((2,), t), schedule).abs() > 1).sum())
            x = theirs.prev_sample
        if clip:
            assert n_clipped > 0, "the fake model must exercise the clipping"
        # the whole trajectory through ddim_sample
        out = D.ddim_sample(_fake_model, shape, schedule=schedule, steps=steps, x_T=x_T, clip=clip_range)
        torch.testing.assert_close(out, x, atol=1e-5, rtol=1e-5)


def test_one_step_returns_x0_prediction_at_first_timestep(schedule):
    x_T = torch.randn(2, 1, 4, 4, 4, generator=torch.Generator().manual_seed(5))
    t = torch.full((2,), T - 1)
    for clip in ((-1.0, 1.0), None):
        out = D.ddim_sample(_fake_model, x_T.shape, schedule=schedule, steps=1, x_T=x_T, clip=clip)
        want = D.x0_from_v(x_T, _fake_model(x_T, t), t, schedule)
        if clip is not None:
            want = want.clamp(*clip)
        torch.testing.assert_close(out, want)


def test_clipping_only_inside_sampler():
    """With clip the output stays in range; without clip the same model leaves it."""
    sch = D.CosineSchedule(T, zero_terminal_snr=True)
    x_T = torch.randn(2, 1, 6, 6, 6, generator=torch.Generator().manual_seed(2))
    clipped = D.ddim_sample(_fake_model, x_T.shape, schedule=sch, steps=10, x_T=x_T)
    free = D.ddim_sample(_fake_model, x_T.shape, schedule=sch, steps=10, x_T=x_T, clip=None)
    assert clipped.abs().max().item() <= 1.0
    assert free.abs().max().item() > 1.0


def _gaussian_oracle(m: float, s: float, schedule: D.CosineSchedule):
    """Exact v predictor for data x0 ~ N(m, s²) (i.i.d. voxels): E[x0|x_t] is linear,
    E[x0|x_t] = m + sqrt(ā)·s²/(ā·s² + 1 − ā)·(x_t − sqrt(ā)·m)."""
    ac = schedule.alphas_cumprod.to(torch.float64)

    def predict_v(x_t, t):
        a = ac[t].view(-1, *([1] * (x_t.dim() - 1)))
        xt = x_t.double()
        x0_hat = m + a.sqrt() * s**2 / (a * s**2 + 1 - a) * (xt - a.sqrt() * m)
        eps_hat = (xt - a.sqrt() * x0_hat) / (1 - a).sqrt()
        return (a.sqrt() * eps_hat - (1 - a).sqrt() * x0_hat).to(x_t.dtype)

    return predict_v


def _gaussian_stats(schedule: D.CosineSchedule, eta: float, m: float = 0.3, s: float = 0.5):
    g = torch.Generator().manual_seed(11)
    out = D.ddim_sample(_gaussian_oracle(m, s, schedule), (16, 1, 16, 16, 16), schedule=schedule,
                        steps=50, eta=eta, generator=g, clip=None)
    return out.mean().item(), out.std().item()


def _ddim_gaussian_std(schedule: D.CosineSchedule, steps: int, eta: float, s: float) -> float:
    """Exact std of DDIM's output for x0 ~ N(m, s²) with the exact denoiser, from x_T ~ N(0, 1).

    Every step is linear: with d_t = x_t − sqrt(ā_t)·m and g = sqrt(ā)·s²/(ā·s² + 1 − ā),
    d_prev = [sqrt(ā_p)·g + sqrt(1 − ā_p − σ²)·(1 − sqrt(ā)·g)/sqrt(1 − ā)]·d_t + σ·z, so
    Var_prev = c²·Var_t + σ². (Independent of the sampler code.)"""
    ac = schedule.alphas_cumprod.double().tolist()
    ts = D.ddim_timesteps(schedule.num_timesteps, steps)
    var = 1.0
    for t, tp in zip(ts, ts[1:] + [-1]):
        a, ap = ac[t], (1.0 if tp < 0 else ac[tp])
        g = math.sqrt(a) * s**2 / (a * s**2 + 1 - a)
        sig = eta * math.sqrt((1 - ap) / (1 - a)) * math.sqrt(1 - a / ap) if tp >= 0 else 0.0
        c = math.sqrt(ap) * g + math.sqrt(max(1 - ap - sig**2, 0.0)) * (1 - math.sqrt(a) * g) / math.sqrt(1 - a)
        var = c * c * var + sig**2
    return math.sqrt(var)


@pytest.mark.parametrize("eta", [0.0, 1.0])
def test_eta_sampling_statistics_gaussian_data(schedule, eta):
    """x0 ~ N(0.3, 0.5²) with the exact denoiser: 50-step samples have mean ≈ 0.3 and
    std ≈ 0.5. DDIM's discretisation shrinks the std a little at 50 steps (≈3% for eta=0,
    ≈7% for eta=1; → 0 as steps grow), so the sample std is also checked tightly against
    the exact linear-Gaussian prediction. 65536 i.i.d. samples: standard errors ≈ 0.002."""
    m, s = 0.3, 0.5
    mean, std = _gaussian_stats(schedule, eta, m, s)
    assert mean == pytest.approx(m, abs=0.015)
    assert std == pytest.approx(s, abs=0.05)
    assert std == pytest.approx(_ddim_gaussian_std(schedule, 50, eta, s), abs=0.008)
    # the prediction converges to s with many steps (so the 50-step gap is discretisation)
    assert _ddim_gaussian_std(schedule, 1000, eta, s) == pytest.approx(s, abs=0.004)


def test_eta_noise_matters_and_bad_sigma_would_be_caught(monkeypatch):
    """eta=1 adds noise (differs from eta=0 from the same x_T); doubling the DDIM sigma
    changes the sample std of the Gaussian test measurably."""
    m, s = 0.0, 0.5
    sch = D.CosineSchedule(T, zero_terminal_snr=True)
    shape = (8, 1, 16, 16, 16)
    x_T = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    kw = dict(schedule=sch, steps=50, clip=None, x_T=x_T)
    a = D.ddim_sample(_gaussian_oracle(m, s, sch), shape, eta=0.0, **kw)
    b = D.ddim_sample(_gaussian_oracle(m, s, sch), shape, eta=1.0, generator=torch.Generator().manual_seed(1), **kw)
    assert (a - b).abs().mean().item() > 0.1
    real_randn = D._randn
    monkeypatch.setattr(D, "_randn", lambda *a_, **k_: 2.0 * real_randn(*a_, **k_))
    c = D.ddim_sample(_gaussian_oracle(m, s, sch), shape, eta=1.0, generator=torch.Generator().manual_seed(1), **kw)
    assert abs(c.std().item() - s) > 0.1


def test_generator_determinism():
    sch = D.CosineSchedule(T)
    shape = (2, 1, 5, 5, 5)

    def run(seed: int, eta: float) -> torch.Tensor:
        return D.ddim_sample(_fake_model, shape, schedule=sch, steps=10, eta=eta,
                             generator=torch.Generator().manual_seed(seed))

    for eta in (0.0, 0.5):
        assert torch.equal(run(7, eta), run(7, eta))
        assert not torch.equal(run(7, eta), run(8, eta))


def test_sampler_argument_checks():
    sch = D.CosineSchedule(T)
    with pytest.raises(ValueError):
        D.ddim_sample(_fake_model, (1, 1, 2, 2, 2), schedule=sch, steps=10, x_T=torch.zeros(2, 1, 2, 2, 2))
    with pytest.raises(ValueError):
        D.ddim_sample(lambda x, t: x[:, :0], (1, 1, 2, 2, 2), schedule=sch, steps=2)
    with pytest.raises(ValueError):
        D.ddim_sample(_fake_model, (1, 1, 2, 2, 2), schedule=sch, steps=10, eta=-1.0)
    seen: list[torch.Tensor] = []

    def spy(x, t):
        seen.append(t.clone())
        return torch.zeros_like(x)

    D.ddim_sample(spy, (3, 1, 2, 2, 2), schedule=sch, steps=4, progress=False)
    assert [tt.tolist() for tt in seen] == [[t] * 3 for t in D.ddim_timesteps(T, 4)]
    assert all(tt.dtype == torch.long for tt in seen)


# ------------------------------------------------------------------- params


def test_params_section():
    p = DiffusionParams()
    sch = D.CosineSchedule.from_params(p)
    assert sch.num_timesteps == p.num_timesteps and sch.zero_terminal_snr == p.zero_terminal_snr
    with pytest.raises(ConfigError, match="trailing"):
        params_from_dict({"diffusion": {"zero_terminal_snr": True, "timestep_spacing": "leading"}})
    with pytest.raises(ConfigError):
        params_from_dict({"diffusion": {"num_timesteps": 10, "sample_steps": 20}})


def test_randn_with_one_generator_per_row_draws_what_each_row_would_alone():
    """Batched samples keep their seeds: row i of a batch draw equals a draw of generator i alone."""
    shape = (3, 1, 4, 4, 4)
    gens = [torch.Generator().manual_seed(s) for s in (5, 6, 7)]
    batch = D.randn(shape, gens, "cpu", torch.float32)
    for i, s in enumerate((5, 6, 7)):
        alone = D.randn(shape[1:], torch.Generator().manual_seed(s), "cpu", torch.float32)
        assert torch.equal(batch[i], alone)
    with pytest.raises(ValueError, match="2 generators for a batch of 3"):
        D.randn(shape, gens[:2], "cpu", torch.float32)
