"""Decoder order (``stages.<stage>.decoder``): conv_first convolves at the lower resolution,
then upsamples; upsample_first is the original order. Same parameters, fewer FLOPs, same
output shapes; models exported before the key load as upsample_first, and weights of one
order never load silently into the other."""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterator
from pathlib import Path

import pytest

from train_fixtures import one_torch_thread
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from xct_core.config import Params, load_params, params_from_dict
from xct_core.errors import ConfigError, InputError
from xct_core.models import Backbone3D, build_stage
from xct_core.models.backbone import DECODER_ORDERS, UpBlock

TINY = {
    "drr": {"geometry": "cone", "pixels": 32, "pixel_mm": 19.2, "sdd": 1500.0, "sod": 1000.0},
    "stages": {
        "stage1": {"size": 16, "token_grid": 4, "conv_channels": [8, 16], "dim": 32, "depth": 1, "heads": 2,
                   "lift_channels": 4, "enc_channels": [8, 16], "anchor": "direct"},
    },
}


@pytest.fixture(autouse=True, scope="module")
def _one_thread() -> Iterator[None]:
    with one_torch_thread():
        yield


def with_decoder(p: Params, order: str) -> Params:
    d = p.model_dump(mode="json")
    for cfg in d["stages"].values():
        cfg["decoder"] = order
    return params_from_dict(d)


def tiny(order: str) -> Params:
    return with_decoder(params_from_dict(json.loads(json.dumps(TINY))), order)


def backbone(order: str) -> Backbone3D:
    """16³ grid, two conv levels (16³, 8³), 4³ tokens."""
    torch.manual_seed(0)
    return Backbone3D(3, 16, 4, (8, 16), dim=24, depth=1, heads=2, mlp_ratio=2.0, cond_dim=24, decoder=order)


def test_default_is_conv_first_and_the_key_is_checked() -> None:
    assert Params().stages["stage1"].decoder == "conv_first"
    assert load_params(Path(__file__).resolve().parents[1] / "params.yaml").stages["stage2"].decoder == "conv_first"
    d = json.loads(json.dumps(TINY))
    d["stages"]["stage1"]["decoder"] = "pixel_shuffle"
    with pytest.raises(ConfigError, match=r"stages\.stage1\.decoder"):
        params_from_dict(d)
    with pytest.raises(ValueError, match="decoder must be one of"):
        backbone("sideways")


@pytest.mark.parametrize("order", DECODER_ORDERS)
def test_where_each_order_convolves(order: str) -> None:
    """conv_first: each decoder conv sees the level's INPUT grid (half the skip's) and the
    block still returns the skip's grid; upsample_first: the conv sees the skip's grid."""
    bb = backbone(order)
    seen: list[tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]] = []
    for blk in bb.dec:
        conv = blk.conv if order == "conv_first" else blk.up
        rec: dict[str, tuple[int, ...]] = {}
        conv.register_forward_hook(lambda _m, i, _o, rec=rec: rec.__setitem__("conv_in", tuple(i[0].shape[-3:])))
        blk.register_forward_hook(
            lambda _m, i, o, rec=rec: seen.append((tuple(i[0].shape[-3:]), rec["conv_in"], tuple(o.shape[-3:]))))
    out = bb(torch.randn(1, 3, 16, 16, 16), torch.randn(1, 24))
    assert out.shape == (1, 1, 16, 16, 16)
    assert [s[0] for s in seen] == [(4,) * 3, (8,) * 3]  # the levels' inputs: token grid, then 8³
    assert [s[2] for s in seen] == [(8,) * 3, (16,) * 3]  # each level doubles the grid
    for block_in, conv_in, block_out in seen:
        assert conv_in == (block_in if order == "conv_first" else block_out)


def test_conv_first_saves_seven_eighths_of_each_decoder_conv() -> None:
    """Counted FLOPs of the whole backbone differ by exactly the analytic saving: every
    decoder conv (k=3, in→out channels) runs on N³/8 instead of N³ voxels."""
    flops = {}
    for order in DECODER_ORDERS:
        bb = backbone(order)
        with FlopCounterMode(display=False) as fc:
            bb(torch.randn(1, 3, 16, 16, 16), torch.randn(1, 24))
        flops[order] = fc.get_total_flops()
    saving = 0
    for blk, n in zip(backbone("conv_first").dec, (8, 16), strict=True):
        c = blk.conv
        saving += 2 * 27 * c.in_channels * c.out_channels * n**3 * 7 // 8
    assert flops["upsample_first"] - flops["conv_first"] == saving
    assert flops["conv_first"] < 0.9 * flops["upsample_first"]


def test_demo_stage_flops_drop_by_a_fifth_or_more() -> None:
    """The demo stages (meta device: shapes only): conv_first costs <= 80 % of the original
    order's forward FLOPs at 16³, 32³ and 64³, with identical parameter counts."""
    for k in (1, 2, 3):
        counts, n_params = {}, {}
        for order in DECODER_ORDERS:
            net = build_stage(with_decoder(Params(), order), k, device="meta")
            S, P = net.size, Params().drr.pixels
            with torch.device("meta"):
                cond = torch.empty(1, 1, S // 2, S // 2, S // 2) if k > 1 else None
                with FlopCounterMode(display=False) as fc:
                    net(torch.empty(1, 1, S, S, S), torch.zeros(1, dtype=torch.long), torch.empty(1, 1, P, P),
                        torch.empty(1, 1, P, P), cond, anchor=torch.empty(1, 1, S, S, S))
            counts[order] = fc.get_total_flops()
            n_params[order] = sum(p.numel() for p in net.parameters())
        assert n_params["conv_first"] == n_params["upsample_first"]
        assert counts["conv_first"] <= 0.8 * counts["upsample_first"], (k, counts)


@pytest.mark.parametrize("order", DECODER_ORDERS)
def test_every_stage_size_keeps_its_output_shape(order: str) -> None:
    """Demo 16³/32³ for real, and every demo + production stage (up to 256³) on the meta device:
    full-resolution output, same parameter shapes for both orders (only the conv's name differs)."""
    root = Path(__file__).resolve().parents[1]
    demo = with_decoder(Params(), order)
    for k in (1, 2):
        net = build_stage(demo, k).eval()
        S, P = net.size, demo.drr.pixels
        cond = torch.zeros(1, 1, S // 2, S // 2, S // 2) if k > 1 else None
        with torch.no_grad():
            out = net(torch.randn(1, 1, S, S, S), torch.tensor([500]), torch.rand(1, 1, P, P),
                      torch.rand(1, 1, P, P), cond, anchor=torch.zeros(1, 1, S, S, S))
        assert out.shape == (1, 1, S, S, S) and torch.isfinite(out).all()
    prod = with_decoder(load_params(root / "params.yaml", [root / "params.production.yaml"]), order)
    for p in (demo, prod):
        for k, cfg in enumerate(p.stages.values(), start=1):
            net = build_stage(p, k, device="meta")
            other = build_stage(with_decoder(p, next(o for o in DECODER_ORDERS if o != order)), k, device="meta")
            def shapes(m: nn.Module) -> dict[str, torch.Size]:  # the decoder conv's name (conv | up) left out
                return {re.sub(r"^(backbone\.dec\.\d+)\.(conv|up)\.", r"\1.X.", n): q.shape
                        for n, q in m.named_parameters()}

            assert shapes(net) == shapes(other)
            assert any(".dec.0.conv." in n for n, _ in (net if order == "conv_first" else other).named_parameters())
            S, P = cfg.size, p.drr.pixels
            with torch.device("meta"):
                cond = torch.empty(1, 1, S // 2, S // 2, S // 2) if k > 1 else None
                out = net(torch.empty(1, 1, S, S, S), torch.zeros(1, dtype=torch.long), torch.empty(1, 1, P, P),
                          torch.empty(1, 1, P, P), cond, anchor=torch.empty(1, 1, S, S, S) if net.anchored else None)
            assert out.shape == (1, 1, S, S, S)


def test_upblock_orders_compute_different_maps_with_the_same_weights() -> None:
    """Same weights, different order → different outputs (so loading one order's weights into
    the other would be silently wrong, which the loader refuses below)."""
    torch.manual_seed(0)
    a, b = UpBlock(8, 4, 0, order="conv_first"), UpBlock(8, 4, 0, order="upsample_first")
    b.up.load_state_dict(a.conv.state_dict())
    b.res.load_state_dict(a.res.state_dict())
    h, skip = torch.randn(1, 8, 4, 4, 4), torch.randn(1, 4, 8, 8, 8)
    ya, yb = a(h, skip, None), b(h, skip, None)
    assert ya.shape == yb.shape == (1, 4, 8, 8, 8)
    assert not torch.allclose(ya, yb, atol=1e-3)


def _export(tmp_path: Path, p: Params, params_json: str, name: str = "best.pt") -> tuple[Path, nn.Module]:
    from xct_core.checkpoint import export_stage_model

    torch.manual_seed(1)
    net, twin = build_stage(p, 1), build_stage(p, 1, mode="direct")
    path = export_stage_model(tmp_path / name, net, params_json=params_json, stage=1, name="stage1",
                              mode="diffusion", step=3, anchor=twin)
    return path, net


def test_a_model_exported_before_the_key_loads_as_upsample_first(tmp_path: Path) -> None:
    """An exported model whose stored params have no ``decoder`` (written before the key) was
    built upsample-first: it rebuilds that way and computes what it computed then."""
    from xct_core.checkpoint import load_stage_model

    p = tiny("upsample_first")
    old = p.model_dump(mode="json")
    for cfg in old["stages"].values():
        del cfg["decoder"]
    path, net = _export(tmp_path, p, json.dumps(old))
    loaded = load_stage_model(path)
    assert loaded.diffusion.backbone.decoder == "upsample_first" and loaded.anchor.backbone.decoder == "upsample_first"
    f = torch.rand(1, 1, 32, 32) * 4
    x, mu = torch.randn(1, 1, 16, 16, 16), torch.randn(1, 1, 16, 16, 16)
    with torch.no_grad():
        assert torch.equal(loaded(x, torch.tensor([10]), f, f, anchor=mu), net.eval()(x, torch.tensor([10]), f, f, anchor=mu))


@pytest.mark.parametrize(("trained", "claimed"), [("upsample_first", "conv_first"), ("conv_first", "upsample_first")])
def test_weights_of_the_other_order_are_one_clear_line(tmp_path: Path, trained: str, claimed: str) -> None:
    from xct_core.checkpoint import load_stage_model

    path, _ = _export(tmp_path, tiny(trained), tiny(claimed).model_dump_json())
    with pytest.raises(InputError) as e:
        load_stage_model(path)
    msg = str(e.value)
    assert "\n" not in msg and str(path) in msg
    assert f"weights have a {trained} decoder but its params build stages.stage1.decoder: {claimed}" in msg


def test_training_states_resume_only_under_the_order_they_were_trained_with() -> None:
    """A state saved before the key (compat hashed without ``decoder``) resumes under
    upsample_first and is refused under conv_first; the two orders never share a key."""
    from xct_core.training.state import Checkpointer, compat_key

    def pre_key_compat(p: Params) -> str:  # compat_key as computed before the decoder key existed
        st = p.stage(1)
        cfg = st.cfg.model_dump(mode="json")
        del cfg["decoder"]
        del cfg["anchor_folds"]  # a later key (cross-fitted anchors): absent from those states too
        blob = {"stage": cfg, "prev": None, "model": p.model.model_dump(mode="json"),
                "diffusion": p.diffusion.model_dump(mode="json"), "drr": p.drr.model_dump(mode="json"),
                "hu": p.hu.model_dump(mode="json"), "learners": ["diffusion", "direct"]}
        return hashlib.sha256(json.dumps(blob, sort_keys=True).encode()).hexdigest()[:16]

    old, new = tiny("upsample_first"), tiny("conv_first")
    kinds = ["diffusion", "direct"]
    assert compat_key(old, old.stage(1), kinds) == pre_key_compat(old)
    assert compat_key(new, new.stage(1), kinds) != compat_key(old, old.stage(1), kinds)
    ck = Checkpointer.__new__(Checkpointer)
    ck.compat = compat_key(new, new.stage(1), kinds)
    with pytest.raises(ConfigError, match="params changed"):
        ck.check({"compat": pre_key_compat(old)}, "ckpt/step_00000010", "stage1")


def test_bench_model_attributes_every_flop_to_a_part() -> None:
    """benchmarks/bench_model.count_flops: the parts add up to the counted total (nothing left
    in "other" for the demo stage 2), and the two orders differ only in the decoder part."""
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    from bench_model import count_flops

    rows = {o: count_flops(Params(), 2, "demo", decoder=o) for o in DECODER_ORDERS}
    for r in rows.values():
        parts = r["parts_gflop"]
        assert abs(parts["other"]) < 1e-3 * r["fwd_gflop"], parts
        assert min(parts["decoder"], parts["transformer"], parts["conv_encoder"], parts["xray_encoder"]) > 0
        assert r["fwd_bwd_gflop"] > 2 * r["fwd_gflop"]
    a, b = rows["upsample_first"]["parts_gflop"], rows["conv_first"]["parts_gflop"]
    assert {k for k in a if abs(a[k] - b[k]) > 1e-9} == {"decoder"}
    assert b["decoder"] < a["decoder"]
