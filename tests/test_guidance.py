"""DRR data consistency inside the one DDIM sampler (xct_core/guidance.py, the x0_fn hook)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import xct_core.diffusion as D
from xct_core.config import Params, params_from_dict
from xct_core.hu import OUTPUT_MAPS


def _oracle(sch: D.CosineSchedule, x0: torch.Tensor):
    def predict_v(x_t, t):  # noqa: ANN001, ANN202
        a = sch.abar(t, x_t)
        eps = (x_t - a.sqrt() * x0) / (1 - a).sqrt().clamp(min=1e-12)
        return a.sqrt() * eps - (1 - a).sqrt() * x0

    return predict_v


def test_identity_x0_fn_changes_nothing():
    sch = D.CosineSchedule(1000, zero_terminal_snr=True)
    x0 = 0.8 * torch.tanh(torch.randn(2, 1, 4, 5, 6, generator=torch.Generator().manual_seed(0)))
    for steps in (1, 10):
        ref = D.ddim_sample(_oracle(sch, x0), x0.shape, schedule=sch, steps=steps, generator=torch.Generator().manual_seed(1))
        out = D.ddim_sample(_oracle(sch, x0), x0.shape, schedule=sch, steps=steps, generator=torch.Generator().manual_seed(1),
                            x0_fn=lambda x, t: x)
        assert torch.equal(ref, out) and float((out - x0).abs().max()) < 1e-4


def test_the_corrected_x0_is_what_the_sampler_returns():
    """A correction that replaces x0 by a constant makes DDIM end at that constant (eps is
    re-derived from the corrected x0 at every step)."""
    sch = D.CosineSchedule(1000, zero_terminal_snr=True)
    c = torch.full((1, 1, 4, 4, 4), 0.3)
    seen: list[int] = []
    out = D.ddim_sample(lambda x, t: torch.zeros_like(x), c.shape, schedule=sch, steps=8,
                        generator=torch.Generator().manual_seed(0), x0_fn=lambda x, t: seen.append(t) or c)
    assert float((out - c).abs().max()) < 1e-5
    assert seen == D.ddim_timesteps(1000, 8)  # once per step, with that step's timestep


def _sphere_case(p: Params):
    from xct_core.drr import render
    from xct_core.geometry import ProjectionGeometry

    st = p.stage(1)
    aff = st.affine()
    geoms = {v: ProjectionGeometry.from_params(p.drr, v) for v in ("frontal", "lateral")}
    i, j, k = np.meshgrid(*(np.linspace(-1, 1, st.size),) * 3, indexing="ij")
    hu = np.where(i**2 + j**2 + k**2 < 0.6, 40.0, -1000.0) + 600.0 * (((i - 0.3) ** 2 + j**2 + k**2) < 0.05)
    true_hu = torch.from_numpy(hu).float()
    views = {v: render(true_hu[None], aff, g, mu_water=p.hu.mu_water) for v, g in geoms.items()}
    return st, aff, geoms, true_hu, views


def test_sirt_reduces_the_line_integral_residual():
    from xct_core.guidance import DataConsistency

    p = Params()
    st, aff, geoms, true_hu, views = _sphere_case(p)
    dc = DataConsistency(OUTPUT_MAPS["wide"], aff, geoms, views, weight=1.0, iters=3, bin=8)
    start = torch.full((1, st.size, st.size, st.size), -200.0)
    assert dc.residual(dc.sirt(start)) < 0.2 * dc.residual(start)
    assert dc.residual(true_hu[None]) < 1e-6 * max(dc.residual(start), 1.0)  # the truth is consistent
    x0 = OUTPUT_MAPS["wide"].forward(start)[:, None]
    assert torch.equal(DataConsistency(OUTPUT_MAPS["wide"], aff, geoms, views, weight=0.0)(x0, 10), x0)


def test_guided_cascade_reprojects_closer_to_the_inputs():
    """Through the one sampler: the same (imperfect) oracle stage, sampled with data
    consistency on, ends closer to the X-rays than without."""
    from xct_core.cascade import sample_cascade
    from xct_core.diffusion import Sampler
    from xct_core.guidance import DataConsistency
    from xct_core.models import build_stage

    p = params_from_dict({"hu": {"output": "wide"}, "diffusion": {"guidance_weight": 0.5, "guidance_iters": 2}})
    s1 = p.stages["stage1"].model_copy(update={"anchor": "none"})  # a plain (not twin-anchored) stage
    p = p.model_copy(update={"stages": {**p.stages, "stage1": s1}})
    st, aff, geoms, true_hu, views = _sphere_case(p)
    wrong = OUTPUT_MAPS["wide"].forward(true_hu * 0.6)[None, None]  # the stage believes in a fainter body

    net = build_stage(p, 1)
    sch = D.CosineSchedule.from_params(p.diffusion)
    oracle = _oracle(sch, wrong)
    net.forward = lambda x_t, t, *a, **k: oracle(x_t, t)  # the stage predicts the v of `wrong`
    f, lat = views["frontal"][:, None], views["lateral"][:, None]
    guided = Sampler.from_params(p, 6)
    assert guided.guidance is not None and Sampler.from_params(Params(), 6).guidance is None
    plain = Sampler(sch, 6)
    out_g = sample_cascade([net], f, lat, sampler=guided, generator=torch.Generator().manual_seed(0))[0]
    out_p = sample_cascade([net], f, lat, sampler=plain, generator=torch.Generator().manual_seed(0))[0]
    torch.testing.assert_close(out_p, wrong, atol=1e-4, rtol=0)
    dc = DataConsistency(OUTPUT_MAPS["wide"], aff, geoms, views, bin=net.xray_bin)
    hu = OUTPUT_MAPS["wide"].inverse
    assert dc.residual(hu(out_g[:, 0])) < 0.5 * dc.residual(hu(out_p[:, 0]))


def test_guidance_params_are_validated():
    with pytest.raises(Exception, match="guidance_weight"):
        params_from_dict({"diffusion": {"guidance_weight": 2.5}, "hu": {"output": "wide"}})
    with pytest.raises(Exception, match="needs a full-range hu.output"):
        params_from_dict({"diffusion": {"guidance_weight": 0.5}, "hu": {"output": "window"}})
