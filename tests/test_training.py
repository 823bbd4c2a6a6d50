"""The engine-agnostic stage training loop (xct_core.training), without Ray or MLflow.

Tiny two-stage cascade (16³ → 32³, 16-pixel DRRs) on procedural phantoms run through the
real preprocess step (tests/train_fixtures.py)."""

from __future__ import annotations

import csv
import hashlib
import json
import math
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from torch import nn

from train_fixtures import TINY_STAGES, build_processed, tiny_params
from xct_core.checkpoint import MODEL_FORMAT, STATE_FORMAT, list_checkpoints, load_stage_model, load_state
from xct_core.errors import ConfigError, InputError
from xct_core.training import (
    EMA,
    FaultPlan,
    NonFiniteError,
    RunLayout,
    ShardSampler,
    lr_factor,
    preflight,
    train_stage,
)


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Processed data + one uninterrupted 6-step stage-1 run (the reference)."""
    root = tmp_path_factory.mktemp("train")
    params = tiny_params()
    processed = build_processed(root, params)
    out = root / "ref"
    res = train_stage(params, 1, processed, out, device="cpu")
    return {"root": root, "params": params, "processed": processed, "out": out, "res": res}


def _steps(csv_path: Path) -> list[int]:
    with open(csv_path, newline="") as f:
        return [int(r["step"]) for r in csv.DictReader(f)]


# --------------------------------------------------------------------------- pure pieces


def test_lr_warmup_then_cosine_to_min() -> None:
    total, warm, lo = 13, 2, 0.1  # decay span: updates 2 … 12 (10 intervals)
    f = [lr_factor(s, total, warm, lo) for s in range(total)]
    assert f[0] == pytest.approx(0.5) and f[1] == pytest.approx(1.0)  # linear warmup
    assert f[2] == pytest.approx(1.0)  # the cosine starts at the peak,
    assert f[7] == pytest.approx((1 + lo) / 2)  # is halfway down halfway through,
    assert f[-1] == pytest.approx(lo)  # and reaches min_ratio on the last update
    assert all(a >= b for a, b in zip(f[2:], f[3:]))
    assert lr_factor(5, 10, 0, 1.0) == 1.0  # min_ratio 1: constant


def test_ema_update_matches_formula() -> None:
    net = nn.Linear(2, 1)
    with torch.no_grad():
        net.weight.fill_(0.0)
        net.bias.fill_(0.0)
    ema = EMA(net, decay=0.9)
    with torch.no_grad():
        net.weight.fill_(1.0)
        net.bias.fill_(1.0)
    expected = 0.0
    for n in range(1, 6):
        ema.update(net, n)
        d = min(0.9, (1 + n) / (10 + n))
        expected = d * expected + (1 - d)
        assert torch.allclose(ema.module.weight, torch.full_like(ema.module.weight, expected))
    assert not any(p.requires_grad for p in ema.module.parameters())


def test_shard_sampler_partitions_each_epoch_and_resumes_mid_epoch() -> None:
    data = list(range(7))
    shards = [ShardSampler(data, 2, r, seed=3) for r in range(2)]
    for epoch in (0, 1):
        for s in shards:
            s.set_epoch(epoch)
        a, b = (list(s) for s in shards)
        assert len(a) == len(b) == 4  # padded to equal length (every rank runs the same steps)
        assert set(a) | set(b) == set(data)
    shards[0].set_epoch(1)
    full = list(shards[0])
    shards[0].set_start(2)
    assert list(shards[0]) == full[2:] and len(shards[0]) == 2
    e0, e1 = ShardSampler(data, 1, 0, seed=3), ShardSampler(data, 1, 0, seed=3)
    e1.set_epoch(1)
    assert list(e0) != list(e1)  # reshuffled per epoch


# --------------------------------------------------------------------------- a real run


def test_run_writes_weights_only_checkpoints_models_and_curves(setup: dict) -> None:
    out, res, params = setup["out"], setup["res"], setup["params"]
    lay = RunLayout(out, 1)
    assert res.start_step == 0 and res.final_step == 6 and res.steps_run == 6
    assert [s for s, _ in list_checkpoints(lay.checkpoints)] == [4, 6]  # keep_last 2 (best = 6)
    state = torch.load(lay.checkpoints / "step_00000006" / "state.pt", weights_only=True)
    assert state["format"] == STATE_FORMAT and state["step"] == 6 and state["samples_seen"] == 12
    assert set(state["learners"]["diffusion"]) == {"model", "ema", "optimizer", "scaler"}
    assert isinstance(state["rng"]["torch"], torch.Tensor)
    for which in ("final", "best"):
        blob = torch.load(lay.model(which), weights_only=True)
        assert blob["format"] == MODEL_FORMAT and blob["step"] == 6 and blob["mode"] == "diffusion"
        assert json.loads(blob["stage_config"])["size"] == 16
        for key, t in state["learners"]["diffusion"]["ema"].items():  # exported = the EMA weights
            assert torch.equal(blob["state_dict"][key], t)
    assert "val/psnr_window_db" in res.val_metrics and math.isfinite(res.val_metrics["val/psnr_window_db"])
    assert "val/reproj_psnr_frontal_db" in res.val_metrics
    assert _steps(lay.plots / "train.csv") == [2, 4, 6]
    assert _steps(lay.plots / "val.csv") == [6]
    summary = json.loads(lay.metrics_file.read_text())
    assert summary["step"] == 6 and summary["best_step"] == 6 and summary["best_metric"] == params.train.best_metric
    assert (lay.montages / "step_00000006.png").stat().st_size > 1000


def test_exported_model_reloads_frozen_and_identical(setup: dict) -> None:
    lay = RunLayout(setup["out"], 1)
    net = load_stage_model(lay.model("final"))
    assert not net.training and not any(p.requires_grad for p in net.parameters())
    blob = torch.load(lay.model("final"), weights_only=True)
    for key, t in net.state_dict().items():
        assert torch.equal(t, blob["state_dict"][key])


def test_nan_stops_at_the_step_keeps_last_checkpoint_and_resume_reproduces_run(setup: dict) -> None:
    """A NaN at step 5 stops the run (checkpoint 4 intact); resuming runs steps 5-6 and ends
    with the same weights as the uninterrupted reference run (per-step seeding)."""
    params, processed = setup["params"], setup["processed"]
    out = setup["root"] / "nan"
    with pytest.raises(NonFiniteError) as ei:
        train_stage(params, 1, processed, out, device="cpu", faults=FaultPlan(nan_at_step=5))
    msg = str(ei.value)
    assert "non-finite" in msg and "at step 5" in msg and "step_00000004" in msg
    assert ei.value.step == 5
    lay = RunLayout(out, 1)
    assert [s for s, _ in list_checkpoints(lay.checkpoints)] == [2, 4]
    good = load_state(ei.value.last_good)
    assert good["step"] == 4
    assert all(torch.isfinite(t).all() for t in good["learners"]["diffusion"]["model"].values())
    assert not lay.model("final").exists()

    res = train_stage(params, 1, processed, out, device="cpu")
    assert res.start_step == 4 and res.final_step == 6 and res.steps_run == 2
    assert res.resumed_from is not None and res.resumed_from.endswith("step_00000004")
    assert _steps(lay.plots / "train.csv") == [2, 4, 6]  # no duplicated or missing steps
    ref = torch.load(RunLayout(setup["out"], 1).checkpoints / "step_00000006" / "state.pt", weights_only=True)
    new = torch.load(lay.checkpoints / "step_00000006" / "state.pt", weights_only=True)
    for part in ("model", "ema"):
        for key, t in ref["learners"]["diffusion"][part].items():
            torch.testing.assert_close(new["learners"]["diffusion"][part][key], t, rtol=1e-5, atol=1e-6)


def test_rerun_of_finished_stage_is_a_no_op(setup: dict) -> None:
    lay = RunLayout(setup["out"], 1)
    before = lay.model("final").read_bytes()
    res = train_stage(setup["params"], 1, setup["processed"], setup["out"], device="cpu")
    assert res.steps_run == 0 and res.final_step == 6 and lay.model("final").read_bytes() == before


def test_stage2_with_frozen_stage1_and_direct_baseline(setup: dict, tmp_path: Path, artifacts_dir: Path) -> None:
    params = tiny_params(train={"direct_baseline": True, "steps": {"stage1": 6, "stage2": 2}})
    out = tmp_path / "s2"
    for which in ("best", "final"):  # the frozen stage 1 of the reference run
        (out / "models" / "stage1").mkdir(parents=True, exist_ok=True)
        (out / "models" / "stage1" / f"{which}.pt").write_bytes(RunLayout(setup["out"], 1).model(which).read_bytes())
    s1 = out / "models" / "stage1" / "best.pt"
    digest = hashlib.sha256(s1.read_bytes()).hexdigest()
    res = train_stage(params, 2, setup["processed"], out, device="cpu")
    assert res.final_step == 2
    for key in ("val/psnr_window_db", "val/direct_psnr_window_db", "val/ssim_window", "val/direct_mae_hu"):
        assert math.isfinite(res.val_metrics[key]), key
    lay = RunLayout(out, 2)
    direct = torch.load(lay.model("direct"), weights_only=True)
    assert direct["mode"] == "direct" and direct["stage"] == 2
    assert hashlib.sha256(s1.read_bytes()).hexdigest() == digest  # stage 1 stayed frozen
    with open(lay.plots / "train.csv", newline="") as f:
        cols = next(csv.reader(f))
    assert {"loss", "loss_physics", "direct_loss", "lr", "samples_per_s", "peak_mem_mb"} <= set(cols)
    montage = lay.montages / "step_00000002.png"  # rows: target, diffusion, direct, previous stage
    assert montage.stat().st_size > 1000
    shutil.copyfile(montage, artifacts_dir / "train_stage2_val_montage.png")


def test_anchored_stage_trains_on_its_twin_and_exports_both(setup: dict, tmp_path: Path) -> None:
    """Residual diffusion (stages.stage1.anchor: direct): the twin trains beside the stage, the
    exported best/final carry it (they load as an AnchoredStage), validation samples mu + s·r
    and reports the twin beside it; without the twin the params are refused up front."""
    from xct_core.models import AnchoredStage

    anchored = {**TINY_STAGES["stage1"], "anchor": "direct", "residual_scale": 0.2}
    params = tiny_params(train={"direct_baseline": True, "steps": {"stage1": 4}}, stages={"stage1": anchored})
    out = tmp_path / "anchored"
    res = train_stage(params, 1, setup["processed"], out, device="cpu")
    assert res.final_step == 4
    for key in ("val/psnr_window_db", "val/direct_psnr_window_db"):
        assert math.isfinite(res.val_metrics[key]), key
    lay = RunLayout(out, 1)
    for which in ("final", "best"):
        net = load_stage_model(lay.model(which))
        assert isinstance(net, AnchoredStage) and net.residual_scale == 0.2
    twin = load_stage_model(lay.model("direct"))
    final = load_stage_model(lay.model("final"))
    assert all(torch.equal(a, b) for a, b in zip(final.anchor.state_dict().values(), twin.state_dict().values(),
                                                 strict=True))  # final.pt's twin is direct.pt
    with pytest.raises(ConfigError, match="needs train.direct_baseline: true"):
        preflight(tiny_params(stages={"stage1": anchored}), 1, setup["processed"], out)


# --------------------------------------------------------------------------- user errors


def test_preflight_reports_user_errors(setup: dict, tmp_path: Path) -> None:
    params, processed = setup["params"], setup["processed"]
    with pytest.raises(InputError, match="processed data folder not found"):
        preflight(params, 1, tmp_path / "nope", tmp_path)
    with pytest.raises(InputError, match="stage 1 model not found: train stage 1 first"):
        preflight(params, 2, processed, tmp_path / "empty")
    with pytest.raises(ConfigError, match="train.steps has no entry for stage2"):
        preflight(tiny_params(train={"steps": {"stage1": 3}}), 2, processed, setup["out"])
    big = tiny_params(stages={"stage1": {**params.stages["stage1"].model_dump(mode="json"), "batch_size": 3}})
    with pytest.raises(ConfigError, match="batch_size 3 exceeds the 2 training volumes per worker"):
        preflight(big, 1, processed, tmp_path, world_size=2)
    with pytest.raises(ConfigError, match="stage 3 does not exist"):
        preflight(params, 3, processed, tmp_path)


def test_resume_with_a_different_network_is_refused(setup: dict) -> None:
    wider = tiny_params(stages={"stage1": {**setup["params"].stages["stage1"].model_dump(mode="json"), "dim": 32}})
    with pytest.raises(ConfigError, match="different stage1 network"):
        train_stage(wider, 1, setup["processed"], setup["out"], device="cpu", steps=8)


def test_bare_entry_point(setup: dict, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The bare-GPU-box entry point is `xct train --local` (xct_core holds no CLI): it prints
    one summary line and errors are one line with exit 2."""
    from pipelines.cli import main as xct

    def run(args: list[str]) -> int:
        try:
            xct(args)
        except SystemExit as e:
            return int(e.code or 0)
        return 0

    pfile = tmp_path / "params.yaml"
    pfile.write_text(yaml.safe_dump(setup["params"].model_dump(mode="json")))
    rc = run(["train", "--local", "--stage", "1", "--processed", str(setup["processed"]), "--out", str(tmp_path / "o"),
              "--params", str(pfile), "--steps", "2", "--device", "cpu"])
    assert rc == 0
    out = capsys.readouterr().out
    assert "stage1: step 2 →" in out and "(from scratch" in out
    assert (tmp_path / "o" / "models" / "stage1" / "final.pt").is_file()
    rc = run(["train", "--local", "--stage", "2", "--processed", str(setup["processed"]), "--out", str(tmp_path / "none"),
              "--params", str(pfile)])
    assert rc == 2 and "stage 1 model not found" in capsys.readouterr().err


def test_xct_train_cli(setup: dict, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """`xct train --local` runs the loop in-process; bad input is one line, exit 2, before Ray."""
    from pipelines.cli import main as xct

    def run(args: list[str]) -> tuple[int, str, str]:
        try:
            xct(args)
            code = 0
        except SystemExit as e:
            code = int(e.code or 0)
        out = capsys.readouterr()
        return code, out.out, out.err

    pfile = tmp_path / "params.yaml"
    pfile.write_text(yaml.safe_dump(setup["params"].model_dump(mode="json")))
    base = ["train", "--processed", str(setup["processed"]), "--params", str(pfile)]
    code, out, _ = run([*base, "--stage", "1", "--out", str(tmp_path / "o"), "--steps", "2", "--local"])
    assert code == 0 and "stage1: step 2 →" in out
    for extra, msg in (
        (["--stage", "2", "--out", str(tmp_path / "none")], "stage 1 model not found"),
        (["--stage", "4", "--out", str(tmp_path / "none")], "stage 4 does not exist"),
    ):
        code, _, err = run([*base, *extra])
        assert code == 2 and msg in err and len(err.strip().splitlines()) == 1, err
