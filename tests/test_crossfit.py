"""Cross-fitted anchors (stages.stageK.anchor_folds, xct_core/training/crossfit.py): the fold
of a volume is a stable hash of its id; fold twin g never steps on a fold-g volume and is the
anchor of exactly those volumes; anchor_folds: 1 is today's training step bit for bit.

Tiny 16³ stage on procedural phantoms through the real preprocess (tests/train_fixtures.py):
train ids ph00…ph03 fall into folds [1, 0, 1, 1] for F = 2."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from train_fixtures import REPO, TINY_STAGES, build_processed, one_torch_thread, tiny_params
from xct_core.checkpoint import list_checkpoints, load_stage_model, load_state
from xct_core.errors import ConfigError
from xct_core.training import FaultPlan, NonFiniteError, RunLayout, preflight, train_stage
from xct_core.training.crossfit import FoldAnchor, fold_kind, fold_of, fold_weights

ANCHORED = {**TINY_STAGES["stage1"], "anchor": "direct", "residual_scale": 0.2, "batch_size": 1}


def _params(folds: int, steps: int = 4, **stage):
    return tiny_params(train={"direct_baseline": True, "steps": {"stage1": steps}},
                       stages={"stage1": {**ANCHORED, "anchor_folds": folds, **stage}})


@pytest.fixture(scope="module")
def processed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    with one_torch_thread():
        return build_processed(tmp_path_factory.mktemp("crossfit"), tiny_params())


def test_fold_of_is_a_stable_hash_of_the_id_disjoint_and_covering() -> None:
    """The same fold in another interpreter with another PYTHONHASHSEED (so not ``hash()``),
    for any order of the ids; each id in exactly one fold; the folds of 200 ids are balanced
    within binomial noise; fold twin g's training set (every fold but g) excludes fold g."""
    ids = [f"phantom_{i:04d}" for i in range(200)]
    mine = [fold_of(v, 3) for v in ids]
    code = ("import importlib.util, sys; s = importlib.util.spec_from_file_location('cf', sys.argv[1]); "
            "m = importlib.util.module_from_spec(s); s.loader.exec_module(m); "
            "print(','.join(str(m.fold_of(v, 3)) for v in sys.argv[2:]))")
    env = {**os.environ, "PYTHONHASHSEED": "12345"}
    out = subprocess.run([sys.executable, "-c", code, str(REPO / "xct_core/training/crossfit.py"), *reversed(ids)], env=env, capture_output=True, text=True,
                         check=True).stdout.strip()
    assert [int(x) for x in out.split(",")] == list(reversed(mine))
    folds = [{v for v, f in zip(ids, mine, strict=True) if f == g} for g in range(3)]
    assert sum(map(len, folds)) == len(ids) and set().union(*folds) == set(ids)
    assert all(abs(len(f) - 200 / 3) < 4 * (200 * (1 / 3) * (2 / 3)) ** 0.5 for f in folds)
    for g in range(3):
        trained_on = {v for v in ids if fold_weights([v], 3, g).item() == 1.0}
        assert trained_on == set(ids) - folds[g]
    assert {fold_of(v, 1) for v in ids} == {0}


def test_fold_anchor_takes_each_item_from_its_folds_twin() -> None:
    """Item i of fold g gets twin g's output on item i alone (twins here: constants g+1)."""

    class Const(torch.nn.Module):
        def __init__(self, c: float) -> None:
            super().__init__()
            self.c = c

        def forward(self, x_t, t, frontal, lateral, cond, cond_aug):  # noqa: ANN001
            return torch.full((frontal.shape[0], 1, 2, 2, 2), self.c) + frontal[:, :1, :1, :1].reshape(-1, 1, 1, 1, 1)

    frontal = torch.arange(5.0).reshape(5, 1, 1, 1).expand(5, 1, 2, 2).contiguous()
    anchor = FoldAnchor([Const(10.0), Const(20.0)], torch.tensor([1, 0, 1, 1, 0]))
    mu = anchor(None, None, frontal, frontal, None, None)
    assert mu[:, 0, 0, 0, 0].tolist() == [20.0, 11.0, 22.0, 23.0, 14.0]
    assert sorted(anchor.calls) == [(0, [1, 4]), (1, [0, 2, 3])]


@pytest.fixture(scope="module")
def recorded(processed: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """A real 4-step cross-fitted run (F = 2, batch 1: one epoch, each train id once) that
    records, after every step's backward, which fold twins got a gradient and which twin
    anchored each id."""
    import xct_core.training.loop as loop
    import xct_core.training.step as step_mod

    rec: dict = {"stepped": {0: set(), 1: set()}, "seen": [], "anchored_by": [], "grad": []}
    real_step, real_anchor = step_mod.train_step, step_mod.FoldAnchor

    class RecordingAnchor(real_anchor):  # type: ignore[misc, valid-type]
        ids: list[str] = []

        def __call__(self, *a, **kw):  # noqa: ANN002, ANN003
            out = super().__call__(*a, **kw)
            rec["anchored_by"].extend((self.ids[i], g) for g, idx in self.calls for i in idx)
            return out

    def recording_step(learners, batch, **kw):  # noqa: ANN001, ANN003
        RecordingAnchor.ids = list(batch["id"])
        stats = real_step(learners, batch, **kw)
        (vid,) = batch["id"]
        rec["seen"].append(vid)
        for lrn in learners:
            if lrn.holdout is not None:
                norm = sum(float(p.grad.abs().sum()) for p in lrn.net.parameters() if p.grad is not None)
                rec["grad"].append((vid, lrn.holdout, norm))
                if norm > 0:
                    rec["stepped"][lrn.holdout].add(vid)
        return stats

    out = tmp_path_factory.mktemp("cf") / "ref"
    with pytest.MonkeyPatch.context() as mp, one_torch_thread():
        mp.setattr(step_mod, "FoldAnchor", RecordingAnchor)
        mp.setattr(loop, "train_step", recording_step)
        rec["res"] = train_stage(_params(2, steps=4), 1, processed, out, device="cpu")
    rec["out"] = out
    return rec


def test_fold_twins_never_step_on_their_held_out_fold_and_anchor_it(recorded: dict) -> None:
    """Fold twin g has a non-zero gradient exactly at the steps whose id is outside fold g;
    every anchor the residual diffusion used for an id came from the twin of that id's fold,
    so the ids each twin stepped on and the ids it anchored are disjoint. The stage file
    still ships the all-data twin (direct.pt) and loads; checkpoints carry the fold twins."""
    seen = recorded["seen"]
    assert recorded["res"].final_step == 4 and sorted(seen) == ["ph00", "ph01", "ph02", "ph03"]
    assert {fold_of(v, 2) for v in seen} == {0, 1}  # both folds met: the check is not vacuous
    for vid, g, norm in recorded["grad"]:
        assert (norm > 0) == (fold_of(vid, 2) != g), (vid, g, norm)
    for g in (0, 1):
        assert recorded["stepped"][g] == {v for v in seen if fold_of(v, 2) != g}
    assert sorted(recorded["anchored_by"]) == sorted((v, fold_of(v, 2)) for v in seen)
    for v, g in recorded["anchored_by"]:
        assert v not in recorded["stepped"][g]
    lay = RunLayout(recorded["out"], 1)
    state = load_state(list_checkpoints(lay.checkpoints)[-1][1])
    assert set(state["learners"]) == {"diffusion", "direct", fold_kind(0), fold_kind(1)}
    twin, final = load_stage_model(lay.model("direct")), load_stage_model(lay.model("final"))
    assert all(torch.equal(a, b) for a, b in zip(final.anchor.state_dict().values(), twin.state_dict().values(),
                                                 strict=True))  # the shipped anchor is the all-data twin


def test_resume_of_a_cross_fitted_run_reproduces_the_uninterrupted_one(recorded: dict, processed: Path,
                                                                       tmp_path: Path) -> None:
    """Stopped by a NaN at step 3 (checkpoint 2 kept) and resumed to 4: every learner, fold
    twins included, ends as in the run that was never stopped (per-step seeding)."""
    params = _params(2, steps=4)
    part = tmp_path / "cut"
    with one_torch_thread():
        with pytest.raises(NonFiniteError):
            train_stage(params, 1, processed, part, device="cpu", faults=FaultPlan(nan_at_step=3))
        res = train_stage(params, 1, processed, part, device="cpu")
    assert res.start_step == 2 and res.final_step == 4
    a = load_state(list_checkpoints(RunLayout(recorded["out"], 1).checkpoints)[-1][1])
    b = load_state(list_checkpoints(RunLayout(part, 1).checkpoints)[-1][1])
    assert a["step"] == b["step"] == 4
    for kind in ("diffusion", "direct", fold_kind(0), fold_kind(1)):
        for key in ("model", "ema"):
            for name, t in a["learners"][kind][key].items():
                torch.testing.assert_close(b["learners"][kind][key][name], t, rtol=1e-5, atol=1e-6)


def test_anchor_folds_1_is_todays_step_bit_for_bit(processed: Path) -> None:
    """With anchor_folds: 1 train_step's logs and gradients equal the pre-cross-fitting
    formula on a fixed batch: diffusion_loss over the direct twin's EMA and direct_loss, each
    with its generator seeded derive_seed(seed, 4 + learner index, rank, step)."""
    from torch.utils.data import DataLoader

    from xct_core.data import XrayCTDataset
    from xct_core.diffusion import CosineSchedule
    from xct_core.losses import diffusion_loss, direct_loss
    from xct_core.models import build_stage
    from xct_core.seeding import derive_seed
    from xct_core.training.hooks import TrainHooks
    from xct_core.training.step import Learner, train_step

    params = _params(1, batch_size=2)
    st = params.stage(1)
    torch.manual_seed(0)
    learners = [Learner("diffusion", build_stage(params, st), 0.9), Learner("direct", build_stage(params, st, mode="direct"), 0.9)]
    for lrn in learners:
        lrn.opt = torch.optim.AdamW(lrn.net.parameters(), lr=1e-3)
    batch = next(iter(DataLoader(XrayCTDataset(processed, 1, "train", params.hu.net_map()), batch_size=2)))
    sched = CosineSchedule.from_params(params.diffusion)
    with one_torch_thread():
        stats = train_step(learners, batch, step=3, lr=1e-3, rank=0, seed=7, device=torch.device("cpu"),
                           schedule=sched, stage=st, physics=None, grad_clip=1e9, amp_dtype=None, hooks=TrainHooks())
        grads = [[p.grad.clone() for p in lrn.net.parameters()] for lrn in learners]
        got = dict(zip(stats.keys, stats.local.tolist(), strict=True))
        want: dict[str, float] = {}
        for i, lrn in enumerate(learners):
            lrn.opt.zero_grad(set_to_none=True)
            gen = torch.Generator().manual_seed(derive_seed(7, 4 + i, 0, 3))
            args = (lrn.net, batch["x0"], batch["frontal"], batch["lateral"], None)
            if lrn.kind == "diffusion":
                loss, logs = diffusion_loss(*args, schedule=sched, generator=gen, anchor_net=learners[1].ema.module)
            else:
                loss, logs = direct_loss(*args, schedule=sched, generator=gen)
            loss.backward()
            want.update({lrn.prefix + k: float(v) for k, v in logs.items()})
            assert all(torch.equal(p.grad, g) for p, g in zip(lrn.net.parameters(), grads[i], strict=True)), lrn.kind
    assert {k: v for k, v in got.items() if not k.endswith("grad_norm")} == want


def test_cross_fitting_needs_an_anchor_and_a_training_volume_in_every_fold(processed: Path, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="anchor_folds 2 needs anchor: direct"):
        tiny_params(stages={"stage1": {**TINY_STAGES["stage1"], "anchor_folds": 2}})
    with pytest.raises(ConfigError, match=r"leaves a fold without training volumes \(train ids per fold: \["):
        preflight(_params(16), 1, processed, tmp_path)
