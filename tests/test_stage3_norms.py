"""The two stage-3 levers of benchmarks/results/stage3_diagnosis_cpu.md: GroupNorm groups of at
least two channels (``norm_min_group_size``) and the direct twin's condition skip (``cond_skip``).
Both are opt-in: the defaults build the original networks."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from test_models import TINY, tiny_params, wake, xrays
from xct_core.models import Backbone3D, build_stage
from xct_core.models.backbone import group_norm


def _backbone(gn: int | None) -> Backbone3D:
    torch.manual_seed(0)
    kw = {} if gn is None else {"norm_min_group_size": gn}
    return Backbone3D(in_channels=3, size=16, token_grid=4, conv_channels=[8, 16], dim=32, depth=1, heads=2,
                      mlp_ratio=2.0, cond_dim=32, **kw)


def test_group_norm_default_groups_unchanged() -> None:
    for c in (1, 2, 4, 6, 8, 12, 16, 24, 32, 64, 96):
        assert group_norm(c).num_groups == math.gcd(c, 8)
    # groups of >= 2 channels change only layers narrower than 2 x max_groups
    assert [group_norm(c, min_group_size=2).num_groups for c in (2, 4, 8, 16, 32)] == [1, 2, 4, 8, 8]
    with pytest.raises(ValueError, match="min_group_size"):
        group_norm(8, min_group_size=0)


def test_default_backbone_bit_for_bit() -> None:
    a, b = _backbone(None), _backbone(1)
    for (n1, p1), (n2, p2) in zip(a.state_dict().items(), b.state_dict().items(), strict=True):
        assert n1 == n2 and torch.equal(p1, p2)
    wake(a), wake(b)
    h, c = torch.randn(1, 3, 16, 16, 16), torch.randn(1, 32)
    with torch.no_grad():
        assert torch.equal(a(h, c), b(h, c))


def _head_affine_gap(bb: Backbone3D) -> float:
    """Max change of the head's output when each input channel gets its own gain and offset."""
    g = torch.Generator().manual_seed(1)
    h = torch.randn(2, 8, 6, 6, 6, generator=g)
    gain = torch.rand(1, 8, 1, 1, 1, generator=g) * 3 + 0.5
    off = torch.randn(1, 8, 1, 1, 1, generator=g) * 2
    with torch.no_grad():
        return float((bb._head(gain * h + off) - bb._head(h)).abs().max())


def test_single_channel_groups_blind_the_head_to_channel_levels() -> None:
    # 8 channels at full resolution (stage 3's conv_channels[0]): the default head norm is a
    # per-channel instance norm, so nothing the trunk does to a channel's level or gain reaches
    # the output: x0's level/range rests on the head's own few scalars
    assert _head_affine_gap(_backbone(None)) < 1e-5
    bb = _backbone(2)
    assert bb.out_norm.num_groups == 4 and bb.enc[0].norm1.num_groups == 4
    assert _head_affine_gap(bb) > 1e-2


def test_cond_skip_starts_as_its_condition() -> None:
    params = tiny_params()
    torch.manual_seed(0)
    net = build_stage(params, 2, mode="direct", cond_skip=True)
    f, lat = xrays(2, TINY["drr"]["pixels"])
    cond = torch.rand(2, 1, 16, 16, 16) * 2 - 1
    up = F.interpolate(cond, size=(32,) * 3, mode="trilinear", align_corners=False)
    out = net(None, None, f, lat, cond)
    assert torch.allclose(out, up, atol=1e-6)
    out.sub(up.roll(1, dims=2)).pow(2).mean().backward()
    assert net.backbone.out.weight.grad.abs().sum() > 0  # the head learns a residual from here
    plain = build_stage(params, 2, mode="direct")
    assert not torch.allclose(plain(None, None, f, lat, cond), up, atol=1e-2)


@pytest.mark.parametrize(("k", "mode"), [(1, "direct"), (2, "diffusion")])
def test_cond_skip_only_for_conditioned_direct_stages(k: int, mode: str) -> None:
    with pytest.raises(ValueError, match="cond_skip"):
        build_stage(tiny_params(), k, mode=mode, cond_skip=True)  # type: ignore[arg-type]
