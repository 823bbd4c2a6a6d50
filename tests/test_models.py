"""Cascade stage network (xct_core.models), losses and cascade sampling.

Regression tests for the lessons of /work/shared/DESIGN.md §4: views kept apart and lifted
along their own rays (checked analytically against the projection formulas), rich lifted
features, full-resolution output path, token grids matching their position embeddings,
stage k>1 conditioning, direct mode, physics loss, and the one sampler.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from train_fixtures import one_torch_thread
import torch
import torch.nn.functional as F
from torch import nn

from xct_core.cascade import aug_timestep, lowres_condition, resize_volume, sample_cascade
from xct_core.config import Params, load_params, params_from_dict
from xct_core.diffusion import CosineSchedule, Sampler
from xct_core.errors import ConfigError
from xct_core.losses import PhysicsLoss, diffusion_loss, direct_loss
from xct_core.models import (
    Backbone3D,
    DepthLifting,
    StageNet,
    ViewContext,
    build_stage,
    lifting_grid,
    stage_affine,
    unwrap,
    xray_binning,
)

#: a tiny two-stage profile (16³ → 32³) with a small cone-beam detector covering the FOV
TINY = {
    "drr": {"geometry": "cone", "pixels": 32, "pixel_mm": 19.2, "sdd": 1500.0, "sod": 1000.0},
    "stages": {
        "stage1": {"size": 16, "token_grid": 4, "conv_channels": [8, 16], "dim": 32, "depth": 1, "heads": 2,
                   "lift_channels": 4, "enc_channels": [8, 16]},
        "stage2": {"size": 32, "token_grid": 8, "conv_channels": [8, 16], "dim": 32, "depth": 1, "heads": 2,
                   "lift_channels": 4, "enc_channels": [8, 16], "physics_weight": 0.1},
    },
}


def tiny_params(**drr: object) -> Params:
    d = {k: (dict(v) if isinstance(v, dict) else v) for k, v in TINY.items()}
    d["drr"] = {**TINY["drr"], **drr}
    return params_from_dict(d)


def wake(net: nn.Module, seed: int = 0, std: float = 0.05) -> nn.Module:
    """Give the zero-initialised parameters (adaLN-Zero gates, FiLM) small random values, as
    after some training, so the conditioning paths are live."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():
            if not p.any():
                p.copy_(torch.randn(p.shape, generator=g) * std)
    return net


def xrays(B: int, P: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(B, 1, P, P, generator=g) * 6, torch.rand(B, 1, P, P, generator=g) * 6


@pytest.fixture(autouse=True, scope="module")
def _one_thread() -> Iterator[None]:
    """One intra-op thread for these small models (restored afterwards): on the shared
    2-core box OpenMP barrier spinning under oversubscription dominates otherwise."""
    with one_torch_thread():
        yield


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)  # model initialisation is deterministic in every test


@pytest.fixture(scope="module")
def schedule() -> CosineSchedule:
    return CosineSchedule(1000, zero_terminal_snr=True)


# --------------------------------------------------------------------------- config


def _with_stage(**over: object) -> dict:
    d = {"stages": {"stage1": {**TINY["stages"]["stage1"], **over}}}
    return d


@pytest.mark.parametrize(
    ("over", "msg"),
    [
        ({"token_grid": 6}, "not divisible by token_grid"),
        ({"size": 24, "token_grid": 8, "conv_channels": [8]}, "power of two"),
        ({"token_grid": 16}, "power of two >= 2"),
        ({"conv_channels": [8]}, "conv_channels needs 2 entries"),
        ({"dim": 30, "heads": 4}, "not divisible by heads"),
        ({"cond_aug_sample": 0.5, "cond_aug_max": 0.25}, "exceeds cond_aug_max"),
    ],
)
def test_stage_config_validation(over: dict, msg: str) -> None:
    with pytest.raises(ConfigError, match=msg):
        params_from_dict(_with_stage(**over))


def test_stages_must_be_ordered_growing_and_share_the_fov() -> None:
    s1, s2 = TINY["stages"]["stage1"], TINY["stages"]["stage2"]
    with pytest.raises(ConfigError, match="named stage1, stage2 in order"):
        params_from_dict({"stages": {"stage2": s1, "stage1": s2}})
    with pytest.raises(ConfigError, match="sizes must increase"):
        params_from_dict({"stages": {"stage1": s2, "stage2": s1}})
    with pytest.raises(ConfigError, match="same fov_mm"):
        params_from_dict({"stages": {"stage1": s1, "stage2": {**s2, "fov_mm": 300.0}}})
    with pytest.raises(ConfigError, match="stage 3 does not exist"):
        tiny_params().stage(3)


def test_repo_profiles_are_valid(repo_root: Path) -> None:
    demo = load_params(repo_root / "params.yaml")
    assert demo.stages == Params().stages  # code defaults mirror the demo profile
    prod = load_params(repo_root / "params.yaml", [repo_root / "params.production.yaml"])
    sizes = [s.size for s in prod.stages.values()]
    assert sizes == [64, 128, 256]
    assert [s.dim for s in prod.stages.values()] == [256, 384, 512]
    assert [s.depth for s in prod.stages.values()] == [4, 6, 8]
    assert [s.heads for s in prod.stages.values()] == [4, 6, 8]
    assert [s.physics_weight for s in prod.stages.values()] == [0.0, 0.1, 0.15]
    assert all(s.lr == 5e-5 for s in prod.stages.values())
    assert max(s.token_grid for s in prod.stages.values()) <= 32


def test_stage_affine_is_the_origin_centred_phantom_grid() -> None:
    from xct_core.phantoms import canonical_affine

    cfg = tiny_params().stage(2).cfg
    aff = stage_affine(cfg)
    np.testing.assert_allclose(aff, canonical_affine(cfg.size, cfg.fov_mm / cfg.size))
    centre = aff @ np.array([(cfg.size - 1) / 2] * 3 + [1.0])
    np.testing.assert_allclose(centre[:3], 0.0, atol=1e-9)


def test_xray_binning_matches_the_voxel_footprint() -> None:
    # 25.6 mm voxels × 1.5 / 3.2 mm pixels = 12 pixels → bin 8 (power of two ≤ 12)
    assert xray_binning(25.6, 1.5, 3.2, 128) == 8
    assert xray_binning(6.4, 1.5, 3.2, 128) == 2
    assert xray_binning(1.6, 1.5, 3.2, 128) == 1
    assert xray_binning(25.6, 1.5, 3.2, 96) == 8 and xray_binning(25.6, 1.5, 3.2, 100) == 4


# --------------------------------------------------------------------------- shapes


def test_demo_stage_output_shapes() -> None:
    p = Params()
    P = p.drr.pixels
    for k in (1, 2, 3):
        net = build_stage(p, k).eval()
        S = net.size
        f, lat = xrays(1, P)
        cond = None if k == 1 else torch.zeros(1, 1, S // 2, S // 2, S // 2)
        anchor = torch.zeros(1, 1, S, S, S) if net.anchored else None  # the demo stages are anchored
        with torch.no_grad():
            out = net(torch.randn(1, 1, S, S, S), torch.tensor([500]), f, lat, cond, anchor=anchor)
        assert out.shape == (1, 1, S, S, S)
        assert torch.isfinite(out).all()


def test_production_stages_on_the_meta_device(repo_root: Path) -> None:
    """Production shapes without memory or compute: every stage builds, its stem reaches
    exactly the configured token grid, the position embedding has token_grid³ rows, and
    the output has full resolution."""
    prod = load_params(repo_root / "params.yaml", [repo_root / "params.production.yaml"])
    P = prod.drr.pixels
    for k, cfg in enumerate(prod.stages.values(), start=1):
        net = build_stage(prod, k, device="meta")
        seen: dict[str, tuple[int, ...]] = {}

        def hook(_m: nn.Module, _i: object, o: torch.Tensor) -> None:
            seen["grid"] = tuple(o.shape[-3:])

        net.backbone.to_tokens.register_forward_hook(hook)
        S, T = cfg.size, cfg.token_grid
        assert net.backbone.pos_embed.shape == (T**3, cfg.dim)
        with torch.device("meta"):
            cond = None if k == 1 else torch.empty(2, 1, S // 2, S // 2, S // 2)
            anchor = torch.empty(2, 1, S, S, S) if net.anchored else None
            out = net(torch.empty(2, 1, S, S, S), torch.zeros(2, dtype=torch.long),
                      torch.empty(2, 1, P, P), torch.empty(2, 1, P, P), cond, anchor=anchor)
        assert seen["grid"] == (T, T, T)
        assert out.shape == (2, 1, S, S, S)


@pytest.mark.parametrize(("size", "token", "chans"), [(16, 8, (8,)), (32, 8, (8, 16)), (64, 16, (8, 8))])
def test_position_embedding_matches_the_token_grid(size: int, token: int, chans: tuple[int, ...]) -> None:
    bb = Backbone3D(3, size, token, chans, dim=24, depth=1, heads=2, mlp_ratio=2.0, cond_dim=24)
    assert bb.pos_embed.shape == (token**3, 24)
    out = bb(torch.randn(1, 3, size, size, size), torch.randn(1, 24))
    assert out.shape == (1, 1, size, size, size)
    # a stem / embedding mismatch is an error, never a silent broadcast or crop
    bb.pos_embed = torch.zeros((token // 2) ** 3, 24)
    with pytest.raises(RuntimeError, match="does not match the position embedding"):
        bb(torch.randn(1, 3, size, size, size), torch.randn(1, 24))


def test_sincos_position_embedding_distinguishes_every_token() -> None:
    from xct_core.models import sincos_pos_embed_3d

    pe = sincos_pos_embed_3d(8, 48)
    d = torch.cdist(pe, pe)
    d.fill_diagonal_(float("inf"))
    assert d.min() > 0.1  # no two tokens share a position code
    # axis-separable: tokens differing only in x share the y and z channels
    per = 2 * (48 // 6)
    assert torch.equal(pe[0, per:], pe[64, per:]) and not torch.equal(pe[0, :per], pe[64, :per])


# --------------------------------------------------------------------------- gradients


def test_gradients_reach_every_parameter_group() -> None:
    """Stage k>1 (all inputs). adaLN-Zero/FiLM start at zero, so take one optimiser step
    first; after it every single parameter receives a non-zero gradient."""
    p = tiny_params()
    net = build_stage(p, 2)
    f, lat = xrays(2, p.drr.pixels)
    x_t = torch.randn(2, 1, 32, 32, 32)
    t = torch.tensor([10, 900])
    cond = torch.randn(2, 1, 16, 16, 16)
    aug = torch.tensor([0, 200])
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    for _ in range(2):
        opt.zero_grad()
        net(x_t, t, f, lat, cond, aug).square().mean().backward()
        if _ == 0:
            opt.step()
    dead = [n for n, q in net.named_parameters() if q.grad is None or not q.grad.abs().sum() > 0]
    assert not dead, f"parameters without gradient: {dead}"
    groups = {n.split(".")[0] + ("." + n.split(".")[1] if n.startswith(("backbone", "encoder")) else "")
              for n, _ in net.named_parameters()}
    for g in ["encoder.view_embed", "encoder.inp", "encoder.enc", "encoder.dec", "xray_global", "time_embed",
              "aug_embed", "backbone.fuse", "backbone.enc", "backbone.down", "backbone.to_tokens",
              "backbone.blocks", "backbone.dec", "backbone.out"]:
        assert g in groups, g


# --------------------------------------------------------------------------- depth lifting


def _expected_detector_coords(view: str, kind: str, xyz: torch.Tensor, pixels: int, pixel_mm: float,
                              sdd: float, sod: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(col, row) in pixels of world points, written from docs/CONVENTIONS.md alone:
    frontal: source anterior (y = +sod), image columns towards the patient's left (−x);
    lateral: source on the patient's left (x = −sod), columns towards posterior (−y);
    rows towards inferior (−z); cone magnification sdd / (distance from the source)."""
    x, y, z = xyz.unbind(-1)
    depth = (sod - y) if view == "frontal" else (sod + x)
    m = sdd / depth if kind == "cone" else torch.ones_like(x)
    u = -x if view == "frontal" else -y
    c0 = (pixels - 1) / 2
    return u * m / pixel_mm + c0, -z * m / pixel_mm + c0


@pytest.mark.parametrize("kind", ["parallel", "cone"])
@pytest.mark.parametrize("view", ["frontal", "lateral"])
def test_lifting_samples_each_voxel_where_its_ray_hits_the_detector(view: str, kind: str) -> None:
    """A feature map equal to the column (row) index lifts to the analytic detector column
    (row) of every voxel centre: exact for bilinear sampling of a linear function."""
    pix, pmm = 48, 17.6 if kind == "cone" else 9.6
    p = tiny_params(geometry=kind, pixels=pix, pixel_mm=pmm)
    cfg = p.stage(1).cfg
    aff = stage_affine(cfg)
    from xct_core.geometry import ProjectionGeometry, voxel_centers_world

    S = cfg.size
    grid = lifting_grid(ProjectionGeometry.from_params(p.drr, view).place(aff, (S,) * 3), aff, S)
    lift = DepthLifting({"frontal": grid, "lateral": grid})
    cols, rows = torch.meshgrid(torch.arange(pix, dtype=torch.float64), torch.arange(pix, dtype=torch.float64),
                                indexing="xy")
    feat = torch.stack([cols, rows])[None].float()  # [1, 2, H, W]: channel 0 = column, 1 = row
    out = lift.lift(feat, view)[0]
    want_c, want_r = _expected_detector_coords(view, kind, voxel_centers_world(aff, (S,) * 3, torch.float64),
                                               pix, pmm, p.drr.sdd, p.drr.sod)
    inside = (want_c > 0) & (want_c < pix - 1) & (want_r > 0) & (want_r < pix - 1)
    assert inside.float().mean() > 0.9  # the detector sees (almost) the whole grid
    torch.testing.assert_close(out[0][inside], want_c[inside].float(), atol=2e-3, rtol=0)
    torch.testing.assert_close(out[1][inside], want_r[inside].float(), atol=2e-3, rtol=0)


def test_lifting_keeps_float32_sampling_positions_for_bf16_features() -> None:
    """A bf16 feature map (autocast) is sampled at the float32 positions: the result is the
    float32 lifting rounded to bf16 once, not a lifting at bf16-rounded positions (up to a
    quarter pixel off at 256 px)."""
    pix = 256
    p = tiny_params(geometry="cone", pixels=pix, pixel_mm=1.6)
    cfg = p.stage(1).cfg
    aff = stage_affine(cfg)
    from xct_core.geometry import ProjectionGeometry

    S = cfg.size
    grid = lifting_grid(ProjectionGeometry.from_params(p.drr, "frontal").place(aff, (S,) * 3), aff, S)
    lift = DepthLifting({"frontal": grid, "lateral": grid})
    cols = torch.arange(pix, dtype=torch.float32).expand(pix, pix)[None, None]  # value = column index
    feat = cols.to(torch.bfloat16)
    want = lift.lift(feat.float(), "frontal").to(torch.bfloat16)
    got = lift.lift(feat, "frontal")
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), want.float(), atol=0, rtol=0)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        torch.testing.assert_close(lift.lift(feat, "frontal").float(), want.float(), atol=0, rtol=0)
    # the bf16-rounded grid would have sampled elsewhere: the check above can fail
    bad = F.grid_sample(feat.float(), getattr(lift, "grid_frontal").to(torch.bfloat16).float(), align_corners=False)
    assert (bad.reshape(-1) - want.float().reshape(-1)).abs().max() > 0.05


@pytest.mark.parametrize("kind", ["parallel", "cone"])
def test_a_detector_feature_lands_on_the_voxels_along_its_ray(kind: str) -> None:
    """Frontal: a feature at a column on the image's left (= the patient's right) lights
    voxels with large i (world x > 0) at every depth j (anterior-posterior); lateral: a
    feature at a left column (= anterior) lights voxels with large j at every i. The two
    views spread along different axes; a cone beam's rays diverge away from the source."""
    p = tiny_params(geometry=kind, pixels=32, pixel_mm=19.2 if kind == "cone" else 12.8)
    net = build_stage(p, 1)
    S, P = net.size, 32
    feat = torch.zeros(1, 1, P, P)
    c, r = 7, 15  # left of centre; central row
    feat[..., r - 1 : r + 2, c - 1 : c + 2] = 1.0  # a 3×3 blob around (row r, col c)
    aff = stage_affine(net.cfg)
    from xct_core.geometry import voxel_centers_world

    xyz = voxel_centers_world(aff, (S,) * 3, torch.float64)
    for view, depth_axis, lit_axis in [("frontal", 1, 0), ("lateral", 0, 1)]:
        vol = net.lifting.lift(feat, view)[0, 0]
        lit = vol > 0.5
        assert lit.any()
        coord = xyz[..., lit_axis][lit]
        assert (coord > 0).all(), f"{view}: lit voxels must lie on the patient's {'right' if view == 'frontal' else 'anterior'} side"
        idx = lit.nonzero()
        assert set(idx[:, depth_axis].tolist()) == set(range(S)), f"{view}: the ray crosses the whole depth"
        # lit positions per depth plane: constant for parallel beam, moving away from the
        # centre with distance from the source for cone beam (source: anterior / left)
        depth = xyz[..., depth_axis][lit]
        src_side = 1.0 if view == "frontal" else -1.0  # source at y = +sod / x = -sod
        near = coord[depth * src_side > 0].mean()
        far = coord[depth * src_side < 0].mean()
        if kind == "parallel":
            assert abs(float(near - far)) < 1e-6
        else:
            assert far > near + 5.0  # mm: rays diverge away from the source
    # the two views spread the same detector feature along different axes
    f_lit = net.lifting.lift(feat, "frontal")[0, 0] > 0.5
    l_lit = net.lifting.lift(feat, "lateral")[0, 0] > 0.5
    assert (f_lit & l_lit).sum() < 0.5 * min(f_lit.sum(), l_lit.sum())


def test_views_are_kept_apart_and_swapping_them_changes_the_output() -> None:
    p = tiny_params()
    net = wake(build_stage(p, 1)).eval()
    a, b = xrays(1, p.drr.pixels, seed=3)
    x_t, t = torch.randn(1, 1, 16, 16, 16), torch.tensor([400])
    with torch.no_grad():
        out_ab = net(x_t, t, a, b)
        out_ba = net(x_t, t, b, a)
        ctx = net.encode_views(a, b)
    assert (out_ab - out_ba).abs().mean() > 1e-2 * out_ab.abs().mean()
    # the lifted input holds both views' features side by side (2 × lift_channels)
    lifted = net.lifting(ctx.frontal, ctx.lateral)
    assert lifted.shape[1] == 2 * net.cfg.lift_channels
    # the encoder is shared, the view embedding tells the views apart
    ctx_same = net.encode_views(a, a)
    assert not torch.allclose(ctx_same.frontal, ctx_same.lateral)


# --------------------------------------------------------------------------- full resolution


def _voxel_response(net: StageNet, c: tuple[int, int, int], t: int = 300) -> torch.Tensor:
    """Output change when one voxel of x_t is raised by 1 (everything else fixed)."""
    p = tiny_params()
    f, lat = xrays(1, p.drr.pixels)
    x = torch.randn(1, 1, net.size, net.size, net.size, generator=torch.Generator().manual_seed(1))
    x2 = x.clone()
    x2[0, 0, c[0], c[1], c[2]] += 1.0
    with torch.no_grad():
        ctx = net.encode_views(f, lat)
        tt = torch.tensor([t])
        return (net(x2, tt, f, lat, context=ctx) - net(x, tt, f, lat, context=ctx))[0, 0]


def _cell_contrast(resp: torch.Tensor, c: tuple[int, int, int], r: int) -> float:
    """std / mean|.| of the response over the r³ token cell that contains voxel c."""
    cell = resp[tuple(slice((ci // r) * r, (ci // r + 1) * r) for ci in c)]
    return float(cell.std() / (cell.abs().mean() + 1e-12))


def test_output_varies_at_full_resolution_inside_a_token_cell() -> None:
    """Perturb one voxel of x_t: the output change varies inside that voxel's token cell. A
    model that predicts at token resolution and upsamples gives a change that is constant
    over each cell — the control built that way fails the same check."""
    torch.manual_seed(0)
    net = wake(build_stage(tiny_params(), 1)).eval()
    c, r = (9, 6, 10), net.size // net.cfg.token_grid  # token cell edge: 4 voxels
    d = _voxel_response(net, c)
    assert _cell_contrast(d, c, r) > 0.3
    token_res = torch.nn.functional.avg_pool3d(d[None, None], r)
    control = torch.nn.functional.interpolate(token_res, scale_factor=r, mode="nearest")[0, 0]
    assert _cell_contrast(control, c, r) < 1e-5


def test_network_learns_to_pass_voxel_noise_through() -> None:
    """At small t the v target is ≈ the noise in x_t: the network must output voxel-level
    noise. Train a tiny stage to reproduce its own noisy input (target v = x_t): with a
    full-resolution path it reaches R² > 0.8 in 30 steps (a token-resolution prediction
    cannot exceed ≈ 1/64, one value per 4³ cell), and its response to a single input voxel
    then peaks at that voxel."""
    torch.manual_seed(0)
    p = tiny_params()
    net = build_stage(p, 1)
    f, lat = xrays(2, p.drr.pixels)
    opt = torch.optim.Adam(net.parameters(), lr=3e-3)
    t = torch.tensor([5, 5])
    for _ in range(30):
        x = torch.randn(2, 1, 16, 16, 16)
        loss = (net(x, t, f, lat) - x).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    x = torch.randn(2, 1, 16, 16, 16)
    with torch.no_grad():
        r2 = 1 - (net(x, t, f, lat) - x).square().mean() / x.var()
    assert r2 > 0.8, f"R² = {float(r2):.3f}"
    c = (9, 6, 10)
    d = _voxel_response(net.eval(), c, t=5).abs()
    assert tuple(int(i) for i in np.unravel_index(int(d.argmax()), d.shape)) == c
    others = d.clone()
    others[c] = 0
    assert d[c] > 0.5 and d[c] > 3 * others.max(), (float(d[c]), float(others.max()))  # seen: 0.77 vs 0.05


# --------------------------------------------------------------------------- modes, conditioning


def test_direct_mode_same_class_no_noise_input() -> None:
    p = tiny_params()
    diff, direct = build_stage(p, 2), build_stage(p, 2, mode="direct")
    assert type(direct) is type(diff) is StageNet and direct.mode == "direct"
    assert direct.backbone.fuse.in_channels == diff.backbone.fuse.in_channels - 1  # no x_t channel
    f, lat = xrays(2, p.drr.pixels)
    cond = torch.zeros(2, 1, 16, 16, 16)
    out = direct(None, None, f, lat, cond)
    assert out.shape == (2, 1, 32, 32, 32)
    with pytest.raises(ValueError, match="direct mode takes no x_t"):
        direct(torch.zeros(2, 1, 32, 32, 32), None, f, lat, cond)
    with pytest.raises(ValueError, match="diffusion mode needs x_t and t"):
        diff(None, None, f, lat, cond)
    x0 = torch.rand(2, 1, 32, 32, 32) * 2 - 1
    loss, logs = direct_loss(direct, x0, f, lat, schedule=CosineSchedule(1000))
    loss.backward()
    assert set(logs) == {"loss", "loss_x0"} and direct.encoder.inp.weight.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="diffusion-mode"):
        diffusion_loss(direct, x0, f, lat, schedule=CosineSchedule(1000))
    with pytest.raises(ValueError, match="direct-mode"):
        direct_loss(diff, x0, f, lat)


def test_conditioning_inputs_are_checked_and_used() -> None:
    p = tiny_params()
    s1, s2 = build_stage(p, 1), wake(build_stage(p, 2)).eval()
    f, lat = xrays(1, p.drr.pixels)
    x_t, t = torch.randn(1, 1, 32, 32, 32), torch.tensor([100])
    with pytest.raises(ValueError, match="pass cond"):
        s2(x_t, t, f, lat)
    with pytest.raises(ValueError, match="takes no cond"):
        s1(torch.randn(1, 1, 16, 16, 16), t, f, lat, torch.zeros(1, 1, 8, 8, 8))
    low = torch.rand(1, 1, 16, 16, 16)
    with torch.no_grad():
        a = s2(x_t, t, f, lat, low, torch.tensor([0]))
        b = s2(x_t, t, f, lat, resize_volume(low, 32), torch.tensor([0]))  # upsampled inside = same
        c = s2(x_t, t, f, lat, low, torch.tensor([200]))  # augmentation level is embedded
        d = s2(x_t, t, f, lat, -low, torch.tensor([0]))  # the condition volume is used
    torch.testing.assert_close(a, b)
    assert (a - c).abs().mean() > 1e-4 and (a - d).abs().mean() > 1e-4


def test_ddp_need_not_broadcast_derived_buffers() -> None:
    net = build_stage(tiny_params(), 1)
    assert set(net._ddp_params_and_buffers_to_ignore) == {n for n, _ in net.named_buffers()}
    assert {"lifting.grid_frontal", "lifting.grid_lateral", "backbone.pos_embed"} <= set(net._ddp_params_and_buffers_to_ignore)
    assert not any(k.startswith("lifting.") or k.endswith("pos_embed") for k in net.state_dict())


# --------------------------------------------------------------------------- losses


def _bump(S: int, centre: tuple[float, float, float], r: float) -> torch.Tensor:
    ax = torch.arange(S, dtype=torch.float32)
    i, j, k = torch.meshgrid(ax, ax, ax, indexing="ij")
    d2 = (i - centre[0]) ** 2 + (j - centre[1]) ** 2 + (k - centre[2]) ** 2
    return torch.exp(-d2 / (2 * r * r))


def test_physics_loss_zero_for_identical_positive_for_shifted_and_differentiable() -> None:
    p = tiny_params()
    phys = PhysicsLoss.from_params(p, 2)
    S = 32
    target = (-0.6 + 1.2 * _bump(S, (14, 17, 15), 5.0))[None, None].repeat(2, 1, 1, 1, 1)
    assert float(phys(target, target)) == 0.0
    shifted = torch.roll(target, shifts=3, dims=2).requires_grad_()
    loss = phys(shifted, target)
    assert loss > 1e-4
    loss.backward()
    assert shifted.grad is not None and shifted.grad.abs().sum() > 0
    # one renderer and geometry for both sides; the value is the plain MSE of scaled line
    # integrals over both views (no per-sample normalisation): check against drr.render
    from xct_core.drr import render
    from xct_core.geometry import ProjectionGeometry

    win, aff = p.hu.net_map(), stage_affine(p.stage(2).cfg)
    imgs = {
        name: torch.stack([render(win.inverse(v[:, 0]), aff, ProjectionGeometry.from_params(p.drr, view),
                                  mu_water=p.hu.mu_water) for view in ("frontal", "lateral")], 1)
        for name, v in (("pred", shifted.detach()), ("tgt", target))
    }
    manual = ((imgs["pred"] - imgs["tgt"]) / p.model.xray_scale).square().mean()
    torch.testing.assert_close(loss.detach(), manual, rtol=1e-5, atol=1e-9)


def test_physics_loss_has_no_per_sample_normalisation() -> None:
    """Line integrals are linear in HU (inside the window, mu > 0): doubling a deviation
    quadruples the loss, and a batch's loss is the mean of its samples' losses."""
    phys = PhysicsLoss.from_params(tiny_params(), 1)
    S = 16
    target = torch.full((1, 1, S, S, S), -0.2)
    dev = 0.3 * _bump(S, (8, 6, 9), 2.5)[None, None]
    l1, l2 = phys(target + dev, target), phys(target + 2 * dev, target)
    torch.testing.assert_close(l2, 4 * l1, rtol=1e-4, atol=0)
    other = target + 0.1 * _bump(S, (4, 10, 6), 2.0)[None, None]
    l3 = phys(other, target)
    both = phys(torch.cat([target + dev, other]), torch.cat([target, target]))
    torch.testing.assert_close(both, (l1 + l3) / 2, rtol=1e-5, atol=0)


class _Oracle(nn.Module):
    """A 'stage' that knows the answer: returns the true v (or x0) and records its inputs."""

    def __init__(self, x0: torch.Tensor, noise: torch.Tensor | None, schedule: CosineSchedule,
                 mode: str = "diffusion", prev_size: int | None = None, name: str = "oracle") -> None:
        super().__init__()
        self.x0, self.noise, self.schedule = x0, noise, schedule
        self.mode, self.prev_size, self.name = mode, prev_size, name
        self.size = x0.shape[-1]
        self.cfg = tiny_params().stage(2).cfg
        self.w = nn.Parameter(torch.zeros(()))
        self.seen: list[dict] = []

    @property
    def conditional(self) -> bool:
        return self.prev_size is not None

    def encode_views(self, frontal: torch.Tensor, lateral: torch.Tensor) -> ViewContext:
        return ViewContext(frontal, lateral, torch.zeros(frontal.shape[0], 1))

    def forward(self, x_t, t, frontal, lateral, cond=None, cond_aug=None, *, context=None):  # noqa: ANN001
        self.seen.append({"t": t, "cond": cond, "cond_aug": cond_aug, "training": self.training})
        if self.mode == "direct":
            return self.x0 + self.w
        a = self.schedule.alphas_cumprod.double()[t].view(-1, 1, 1, 1, 1)
        eps = (x_t.double() - a.sqrt() * self.x0.double()) / (1 - a).sqrt()
        return (a.sqrt() * eps - (1 - a).sqrt() * self.x0.double()).float() + self.w


def test_diffusion_loss_is_zero_for_the_oracle_and_wires_physics(schedule: CosineSchedule) -> None:
    p = tiny_params()
    g = torch.Generator().manual_seed(0)
    x0 = (torch.rand(2, 1, 16, 16, 16, generator=g) * 1.6 - 0.8)
    noise = torch.randn(x0.shape, generator=g)
    t = torch.tensor([3, 700])
    f, lat = xrays(2, p.drr.pixels)
    oracle = _Oracle(x0, noise, schedule)
    loss, logs = diffusion_loss(oracle, x0, f, lat, schedule=schedule, t=t, noise=noise,
                                physics_weight=0.5, physics=PhysicsLoss.from_params(p, 1))
    assert float(logs["loss_v"]) < 1e-9 and float(logs["loss_physics"]) < 1e-9
    assert set(logs) == {"loss", "loss_v", "loss_physics"}
    # a wrong v is penalised exactly by its MSE
    wrong = _Oracle(x0, noise, schedule)
    with torch.no_grad():
        wrong.w.fill_(0.1)
    loss, logs = diffusion_loss(wrong, x0, f, lat, schedule=schedule, t=t, noise=noise)
    assert math.isclose(float(loss.detach()), 0.01, rel_tol=1e-4)
    with pytest.raises(ValueError, match="needs a PhysicsLoss"):
        diffusion_loss(oracle, x0, f, lat, schedule=schedule, physics_weight=0.1)


def test_training_condition_is_the_augmented_lowres_ground_truth(schedule: CosineSchedule) -> None:
    g = torch.Generator().manual_seed(1)
    x0 = _bump(32, (12, 18, 16), 6.0)[None, None].repeat(4, 1, 1, 1, 1) * 1.6 - 0.8
    oracle = _Oracle(x0, None, schedule, prev_size=16)
    f, lat = xrays(4, 32)
    diffusion_loss(oracle, x0, f, lat, schedule=schedule, generator=g)
    seen = oracle.seen[-1]
    aug = seen["cond_aug"]
    assert aug.shape == (4,) and int(aug.min()) >= 0 and int(aug.max()) <= aug_timestep(0.25, schedule)
    low = lowres_condition(x0, 16)
    assert not torch.allclose(low, x0, atol=1e-3)  # really low-pass
    a = schedule.alphas_cumprod[aug].view(-1, 1, 1, 1, 1)
    resid = (seen["cond"] - a.sqrt() * low) / (1 - a).sqrt()  # must be the N(0,1) augmentation noise
    assert abs(float(resid.std()) - 1.0) < 0.05 and abs(float(resid.mean())) < 0.05


# --------------------------------------------------------------------------- cascade sampling


def test_sample_cascade_with_oracle_stages(schedule: CosineSchedule) -> None:
    """The one sampler returns each stage's x0 for oracle stages (any step count); stage 2
    receives stage 1's output, upsampled and augmented at cond_aug_sample; modes restored."""
    g = torch.Generator().manual_seed(2)
    x1 = torch.rand(1, 1, 8, 8, 8, generator=g) * 1.6 - 0.8
    x2 = torch.rand(1, 1, 16, 16, 16, generator=g) * 1.6 - 0.8
    s1, s2 = _Oracle(x1, None, schedule), _Oracle(x2, None, schedule, prev_size=8)
    s1.train()
    s2.eval()
    f, lat = xrays(1, 32)
    outs = sample_cascade([s1, s2], f, lat, sampler=Sampler(schedule, (4, 7)), generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(outs[0], x1, atol=1e-4, rtol=0)
    torch.testing.assert_close(outs[1], x2, atol=1e-4, rtol=0)
    assert len(s1.seen) == 4 and len(s2.seen) == 7
    assert not any(s["training"] for s in s1.seen + s2.seen)  # sampled in eval mode
    assert s1.training and not s2.training  # previous modes restored
    level = aug_timestep(s2.cfg.cond_aug_sample, schedule)
    assert all(int(s["cond_aug"][0]) == level for s in s2.seen)
    cond = s2.seen[0]["cond"]
    a = schedule.alphas_cumprod[level]
    resid = (cond - a.sqrt() * resize_volume(x1, 16)) / (1 - a).sqrt()
    assert abs(float(resid.std()) - 1.0) < 0.1  # augmented with unit noise around stage 1's output
    assert len(sample_cascade([s1, s2], f, lat, sampler=Sampler(schedule, 2), upto=1)) == 1
    with pytest.raises(ValueError, match="cannot run first"):
        sample_cascade([s2], f, lat, sampler=Sampler(schedule, 2))


class _AnchoredOracle(_Oracle):
    """An anchored (residual) stage that knows the answer: the true v of the scaled residual
    ``(x0 − anchor) / scale`` for whatever anchor it is given; records the anchors it saw."""

    anchored = True

    def __init__(self, x0: torch.Tensor, schedule: CosineSchedule, scale: float) -> None:
        super().__init__(x0, None, schedule)
        self.residual_scale = scale
        self.anchors: list[torch.Tensor] = []

    def forward(self, x_t, t, frontal, lateral, cond=None, cond_aug=None, *, context=None, anchor=None):  # noqa: ANN001
        self.anchors.append(anchor)
        r = (self.x0.double() - anchor.double()) / self.residual_scale
        a = self.schedule.alphas_cumprod.double()[t].view(-1, 1, 1, 1, 1)
        eps = (x_t.double() - a.sqrt() * r) / (1 - a).sqrt()
        return (a.sqrt() * eps - (1 - a).sqrt() * r).float()


def test_anchored_stage_samples_twin_plus_residual(schedule: CosineSchedule) -> None:
    """Residual diffusion over the direct twin: the sample is mu + scale·r with mu the twin's
    one-pass estimate (given to the residual network at every step) and r the residual the
    network diffuses — unclipped, so a residual beyond [-1, 1] (|x0 − mu| > scale) survives."""
    from xct_core.models import AnchoredStage

    g = torch.Generator().manual_seed(4)
    x0 = torch.rand(1, 1, 8, 8, 8, generator=g) * 1.6 - 0.8
    mu = x0 + 0.3 * torch.randn(x0.shape, generator=g).clamp(-1, 1)  # residual/scale reaches ±3
    twin = _Oracle(mu, None, schedule, mode="direct")
    stage = AnchoredStage(_AnchoredOracle(x0, schedule, scale=0.1), twin)
    f, lat = xrays(1, 32)
    for steps in (1, 6):
        got: list = []
        out = sample_cascade([stage], f, lat, sampler=Sampler(schedule, steps), generator=torch.Generator().manual_seed(0),
                             anchors=got)[0]
        torch.testing.assert_close(out, x0, atol=1e-4, rtol=0)
        assert len(got) == 1 and torch.equal(got[0], mu.clamp(-1, 1))  # the K → ∞ mean handed out
    assert all(torch.equal(a, mu.clamp(-1, 1)) for a in stage.diffusion.anchors)
    assert len(twin.seen) == 2  # one pass of the twin per sample
    # a plain-diffusion view of the same residual (clipped to [-1, 1]) would miss x0
    r = (x0 - mu.clamp(-1, 1)) / 0.1
    assert float(r.abs().max()) > 1.5
    with pytest.raises(ValueError, match="sample it as an AnchoredStage"):
        sample_cascade([_AnchoredOracle(x0, schedule, 0.1)], f, lat, sampler=Sampler(schedule, 2))


def test_anchored_diffusion_loss_diffuses_the_scaled_residual(schedule: CosineSchedule) -> None:
    g = torch.Generator().manual_seed(5)
    x0 = torch.rand(2, 1, 8, 8, 8, generator=g) * 1.6 - 0.8
    mu = (x0 + 0.05 * torch.randn(x0.shape, generator=g)).clamp(-1, 1)
    twin = _Oracle(mu, None, schedule, mode="direct")
    oracle = _AnchoredOracle(x0, schedule, scale=0.1)
    f, lat = xrays(2, 32)
    loss, logs = diffusion_loss(oracle, x0, f, lat, schedule=schedule, generator=g, anchor_net=twin)
    assert float(logs["loss_v"]) < 1e-9  # the oracle's v of (x0 - mu) / scale is the training target
    assert torch.equal(oracle.anchors[-1], mu)
    with pytest.raises(ValueError, match="pass anchor_net"):
        diffusion_loss(oracle, x0, f, lat, schedule=schedule, generator=g)


def test_anchored_stage_exports_and_loads_with_its_twin(tmp_path) -> None:
    from xct_core.checkpoint import export_stage_model, load_stage_model
    from xct_core.models import AnchoredStage

    d = tiny_params().model_dump(mode="json")
    d["stages"]["stage1"].update(anchor="direct", residual_scale=0.2)
    p = params_from_dict(d)
    net, twin = build_stage(p, 1), build_stage(p, 1, mode="direct")
    assert net.anchored and not twin.anchored
    assert net.backbone.fuse.in_channels == build_stage(tiny_params(), 1).backbone.fuse.in_channels + 1  # + mu
    with pytest.raises(ValueError, match="exported with its direct twin"):
        export_stage_model(tmp_path / "x.pt", net, params_json=p.model_dump_json(), stage=1, name="stage1",
                           mode="diffusion", step=1)
    path = export_stage_model(tmp_path / "best.pt", net, params_json=p.model_dump_json(), stage=1, name="stage1",
                              mode="diffusion", step=1, anchor=twin)
    loaded = load_stage_model(path)
    assert isinstance(loaded, AnchoredStage) and loaded.residual_scale == 0.2 and loaded.size == net.size
    for a, b in ((loaded.diffusion, net), (loaded.anchor, twin)):
        assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values(), strict=True))
    f, lat = xrays(1, p.drr.pixels)
    out = sample_cascade([loaded], f, lat, sampler=Sampler(CosineSchedule(1000, zero_terminal_snr=True), 2),
                         generator=torch.Generator().manual_seed(0))[0]
    assert out.shape == (1, 1, net.size, net.size, net.size) and float(out.abs().max()) <= 1.0


def test_sample_cascade_real_stages_deterministic(schedule: CosineSchedule) -> None:
    p = tiny_params()
    torch.manual_seed(0)
    stages = [wake(build_stage(p, 1)), wake(build_stage(p, 2, mode="direct"))]
    f, lat = xrays(2, p.drr.pixels)
    run = lambda: sample_cascade(stages, f, lat, sampler=Sampler(schedule, 3),  # noqa: E731
                                 generator=torch.Generator().manual_seed(5))
    a, b = run(), run()
    assert [o.shape for o in a] == [(2, 1, 16, 16, 16), (2, 1, 32, 32, 32)]
    assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))
    assert all(float(o.abs().max()) <= 1.0 for o in a)
    assert all(m.training for m in stages)  # build_stage returns train mode; restored


def test_unwrap_reads_through_wrappers() -> None:
    net = build_stage(tiny_params(), 1)

    class Wrapper(nn.Module):
        def __init__(self, m: nn.Module) -> None:
            super().__init__()
            self.module = m

    assert unwrap(Wrapper(Wrapper(net))) is net and unwrap(net) is net
