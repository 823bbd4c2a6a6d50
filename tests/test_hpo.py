"""`xct hpo`: search space and fragment (xct_core/hpo.py), params overlays (config.load_params),
the pruning-aware Optuna searcher, CLI errors, and a real 3-trial study on local Ray.

The end-to-end study (slow) runs the real `xct hpo` command in-process on the tiny profile
(tests/train_fixtures.py) with a real local Ray runtime, sqlite Optuna storage and sqlite
MLflow in a temp dir. It is deterministic: ``hpo.points`` enqueue two identical sensible
configs (same seed → identical validation curves) and a third whose learning rate (1e-8)
cannot move the weights, and the median stopping rule (grace 1 round, 2 other trials) stops
that one at its first validation, below the other two's.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import pytest
import yaml

from train_fixtures import build_processed, tiny_params
from components.ops_params import OpsParams as Params  # hpo is an operational section (xct_core/hpo_params.py)
from components.ops_params import load_params, params_from_dict, resolve_params
from xct_core.errors import ConfigError
from xct_core.hpo import (
    apply_config,
    carried_over,
    check_points,
    fragment,
    fragment_yaml,
    parse_space,
    trial_params,
    validation_rounds,
)


def _with_hpo(params: Params, **hpo: Any) -> Params:
    data = params.model_dump(mode="json")
    data["hpo"] = {**data["hpo"], **hpo}
    return params_from_dict(data, "test params")


# --------------------------------------------------------------------------- search space


def test_default_space_expands_per_stage_and_is_valid_for_every_stage() -> None:
    p = Params()
    for k in (1, 2, 3):
        sp = parse_space(p, k)
        assert sp.names == [f"stages.stage{k}.{n}" for n in ("lr", "lift_channels", "physics_weight", "token_grid")]
        assert sp.global_names == []
        assert sp[f"stages.stage{k}.lr"].log and sp[f"stages.stage{k}.lr"].low == pytest.approx(1e-4)


@pytest.mark.parametrize(
    "space, needle",
    [
        ({"stages.{stage}.lrr": {"type": "float", "low": 0.1, "high": 0.2}}, "unknown parameter 'stages.stage1.lrr'"),
        ({"train.no_such": {"type": "int", "low": 1, "high": 2}}, "'no_such' is not in train"),
        ({"stages.stage2.lr": {"type": "float", "low": 0.1, "high": 0.2}}, "belongs to stage2"),
        ({"train.steps.{stage}": {"type": "int", "low": 1, "high": 9}}, "set by the search itself"),
        ({"train.val_every": {"type": "int", "low": 1, "high": 9}}, "set by the search itself"),
        ({"hpo.seed": {"type": "int", "low": 1, "high": 9}}, "set by the search itself"),
        ({"stages.{stage}": {"type": "categorical", "choices": [1]}}, "not a scalar parameter (a section)"),
        ({"stages.{stage}.conv_channels": {"type": "categorical", "choices": [1]}}, "not a scalar parameter (a list)"),
        ({"stages.{stage}.lift_channels": {"type": "float", "low": 4, "high": 8}}, "integer parameter needs type: int"),
        ({"train.precision": {"type": "int", "low": 1, "high": 3}}, "a str parameter needs type: categorical"),
        ({"stages.{stage}.token_grid": {"type": "categorical", "choices": [8, 3]}}, "token_grid = 3 gives invalid params"),
        ({"stages.{stage}.heads": {"type": "categorical", "choices": [4, 5]}}, "heads = 5 gives invalid params"),
        ({"stages.{stg}.lr": {"type": "float", "low": 0.1, "high": 0.2}}, "only {stage} can be substituted"),
        ({"stages.{stage}.lr": {"type": "float", "low": 1e-4, "high": 1e-3},
          "stages.stage1.lr": {"type": "float", "low": 1e-4, "high": 1e-3}}, "stages.stage1.lr is listed twice"),
        ({}, "hpo.space is empty"),
    ],
)
def test_space_errors_name_the_entry(space: dict, needle: str) -> None:
    p = _with_hpo(Params(), space=space)
    with pytest.raises(ConfigError) as e:
        parse_space(p, 1)
    assert needle in str(e.value)
    assert "\n" not in str(e.value)


def test_global_parameters_are_flagged() -> None:
    p = _with_hpo(Params(), space={"train.val_sample_steps": {"type": "int", "low": 5, "high": 20},
                                    "stages.{stage}.lr": {"type": "float", "low": 1e-4, "high": 1e-3, "log": True}})
    sp = parse_space(p, 2)
    assert sp.names == ["train.val_sample_steps", "stages.stage2.lr"]
    assert sp.global_names == ["train.val_sample_steps"]
    assert sp["train.val_sample_steps"].kind == "int" and sp["train.val_sample_steps"].low == 5


@pytest.mark.parametrize(
    "dist, needle",
    [
        ({"type": "float", "low": 1.0, "high": 1.0}, "must be smaller than high"),
        ({"type": "float", "low": 0.0, "high": 1.0, "log": True}, "log: true needs low > 0"),
        ({"type": "float", "low": 0.1, "high": 1.0, "log": True, "step": 0.1}, "cannot be combined"),
        ({"type": "int", "low": 1.5, "high": 4}, "integer low/high/step"),
        ({"type": "float", "low": 0.1}, "needs 'low' and 'high'"),
        ({"type": "categorical", "choices": []}, "non-empty 'choices'"),
        ({"type": "categorical", "choices": [[8], [16]]}, "choices must be scalars"),
        ({"type": "categorical", "choices": [8, 8]}, "duplicates"),
        ({"type": "categorical", "choices": [8], "low": 1}, "takes only 'choices'"),
        ({"type": "normal", "low": 0, "high": 1}, "hpo.space"),
    ],
)
def test_distribution_shape_errors_are_one_line_config_errors(dist: dict, needle: str) -> None:
    data = Params().model_dump(mode="json")
    data["hpo"]["space"] = {"stages.{stage}.lr": dist}
    with pytest.raises(ConfigError) as e:
        params_from_dict(data, "p.yaml")
    assert needle in str(e.value) and str(e.value).startswith("p.yaml: invalid parameter hpo.space")


def test_points_expand_and_must_lie_in_the_space() -> None:
    sp = parse_space(Params(), 1)
    assert check_points(sp, [{"stages.{stage}.lr": 1e-3, "stages.{stage}.lift_channels": 16}]) == [
        {"stages.stage1.lr": 1e-3, "stages.stage1.lift_channels": 16}]
    with pytest.raises(ConfigError, match=r"hpo.points\[0\]: stages.stage1.lr = 0.5 is outside"):
        check_points(sp, [{"stages.{stage}.lr": 0.5}])
    with pytest.raises(ConfigError, match=r"hpo.points\[1\]: stages.stage1.lift_channels = 12 is outside"):
        check_points(sp, [{}, {"stages.{stage}.lift_channels": 12}])
    with pytest.raises(ConfigError, match=r"hpo.points\[0\]: stages.stage1.dim is not in hpo.space"):
        check_points(sp, [{"stages.stage1.dim": 64}])


# --------------------------------------------------------------------------- trial params, fragment


def test_apply_config_sets_values_and_keeps_token_grid_and_conv_channels_consistent() -> None:
    p = Params()  # demo stage1: 16³, token grid 8, conv_channels [32]
    q, changed = apply_config(p, 1, {"stages.stage1.token_grid": 4, "stages.stage1.lr": 2e-3})
    assert q.stages["stage1"].token_grid == 4 and q.stages["stage1"].lr == 2e-3
    assert q.stages["stage1"].conv_channels == (32, 64)  # one entry per halving 16 → 8 → 4
    assert changed == {"stages.stage1.token_grid": 4, "stages.stage1.lr": 2e-3, "stages.stage1.conv_channels": [32, 64]}
    assert q.stages["stage2"] == p.stages["stage2"] and q.train == p.train
    q3, _ = apply_config(p, 3, {"stages.stage3.token_grid": 16})  # 64³: two halvings, finest widths kept
    assert q3.stages["stage3"].conv_channels == (8, 16)
    with pytest.raises(ConfigError, match=r"trial config \{stages.stage1.heads=5\}: invalid parameter stages.stage1"):
        apply_config(p, 1, {"stages.stage1.heads": 5})


def test_trial_params_set_the_trial_schedule_and_output_folder() -> None:
    p = _with_hpo(Params(), steps={"stage1": 30, "stage2": 10, "stage3": 5}, val_every=10)
    q, changed = trial_params(p, 1, {"stages.stage1.lr": 5e-4}, "/tmp/x/trial_0001")
    assert q.train.steps["stage1"] == 30 and q.train.steps["stage2"] == p.train.steps["stage2"]
    assert q.train.val_every == 10 and q.train.out_dir == "/tmp/x/trial_0001"
    assert q.stages["stage1"].lr == 5e-4 and changed == {"stages.stage1.lr": 5e-4}
    assert [validation_rounds(s, 10) for s in (30, 31, 9)] == [3, 4, 1]


def test_fragment_is_a_nested_overlay_that_loads(tmp_path: Path) -> None:
    changed = {"stages.stage1.lr": 0.0012, "stages.stage1.token_grid": 4, "stages.stage1.conv_channels": [32, 64],
               "train.val_sample_steps": 7}
    assert fragment(changed) == {"stages": {"stage1": {"conv_channels": [32, 64], "lr": 0.0012, "token_grid": 4}},
                                 "train": {"val_sample_steps": 7}}
    text = fragment_yaml(changed, ["written by a test", "second line"])
    assert text.startswith("# written by a test\n# second line\n")
    base = tmp_path / "params.yaml"
    base.write_text(yaml.safe_dump(Params().model_dump(mode="json")))
    (tmp_path / "frag.yaml").write_text(text)
    q = load_params(base, [tmp_path / "frag.yaml"])
    assert q.stages["stage1"].lr == 0.0012 and q.stages["stage1"].conv_channels == (32, 64)
    assert q.train.val_sample_steps == 7 and q.stages["stage1"].dim == Params().stages["stage1"].dim
    assert fragment_yaml({}) == "{}\n" and yaml.safe_load(fragment_yaml({}, ["x"])) == {}


def test_carried_over_keeps_previous_keys_still_in_effect() -> None:
    p, _ = apply_config(Params(), 1, {"stages.stage1.lr": 5e-4, "stages.stage1.physics_weight": 0.2})
    previous = {"stages": {"stage1": {"lr": 5e-4, "physics_weight": 0.2, "lift_channels": 99}}}
    kept = carried_over(previous, p, {"stages.stage1.lr": 1e-3})
    assert kept == {"stages.stage1.physics_weight": 0.2}  # lr re-searched; lift_channels not in effect


# --------------------------------------------------------------------------- overlays: key


def _write(path: Path, doc: Any) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(doc if isinstance(doc, str) else yaml.safe_dump(doc))
    return path


def test_overlays_key_merges_relative_files_in_order_before_explicit_overlays(tmp_path: Path) -> None:
    base = _write(tmp_path / "cfg" / "params.yaml", {
        "overlays": ["hpo/a.yaml", "hpo/b.yaml"],
        "hu": {"window": "lung"},
        "stages": {"stage1": {**Params().stages["stage1"].model_dump(mode="json"), "lr": 1e-3}},
    })
    _write(tmp_path / "cfg" / "hpo" / "a.yaml", {"stages": {"stage1": {"lr": 2e-3, "lift_channels": 8}}})
    _write(tmp_path / "cfg" / "hpo" / "b.yaml", "# placeholder\n{}\n")
    explicit = _write(tmp_path / "prod.yaml", {"stages": {"stage1": {"lift_channels": 32}}})
    p = load_params(base)
    assert p.stages["stage1"].lr == 2e-3 and p.stages["stage1"].lift_channels == 8  # nested merge
    assert p.stages["stage1"].dim == Params().stages["stage1"].dim and p.hu.window == "lung"  # siblings kept
    q = load_params(base, [explicit])
    assert q.stages["stage1"].lift_channels == 32 and q.stages["stage1"].lr == 2e-3  # explicit after declared
    # the effective params are self-contained: no overlays key, a dump loads anywhere unchanged
    dump = p.model_dump(mode="json")
    assert "overlays" not in dump
    moved = _write(tmp_path / "elsewhere" / "effective.yaml", dump)
    assert load_params(moved) == p and load_params(moved).digest() == p.digest()
    # changing an overlay changes the digest (lineage)
    _write(tmp_path / "cfg" / "hpo" / "b.yaml", {"stages": {"stage1": {"lr": 3e-3}}})
    assert load_params(base).stages["stage1"].lr == 3e-3 and load_params(base).digest() != p.digest()


def test_overlays_key_errors(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    base = _write(tmp_path / "params.yaml", {"overlays": ["hpo/missing.yaml"]})
    with pytest.raises(ConfigError, match=r"hpo/missing.yaml: overlay file not found \(listed under 'overlays' in"):
        load_params(base)
    _write(base, {"overlays": "hpo/a.yaml"})
    with pytest.raises(ConfigError, match="'overlays' must be a list of YAML file paths"):
        load_params(base)
    _write(base, {"overlays": ["a.yaml"]})
    _write(tmp_path / "a.yaml", {"overlays": ["b.yaml"]})
    with pytest.raises(ConfigError, match=r"a.yaml: an overlay must not declare 'overlays'"):
        load_params(base)
    _write(tmp_path / "a.yaml", {"hu": {"mu_water": -1.0}})
    with pytest.raises(ConfigError, match=r"params.yaml \(\+ .*a.yaml\): invalid parameter hu.mu_water"):
        load_params(base)
    _write(tmp_path / "a.yaml", {"hu": {"window": "bone"}})
    monkeypatch.setenv("XCT_PARAMS", str(base))  # resolve_params / $XCT_PARAMS apply them too
    assert resolve_params().hu.window == "bone"


def test_repo_params_list_the_hpo_placeholders_and_production_still_loads(repo_root: Path) -> None:
    doc = yaml.safe_load((repo_root / "params.yaml").read_text())
    assert doc["overlays"] == [f"hpo/best_stage{k}.yaml" for k in (1, 2, 3)]
    for f in doc["overlays"]:
        assert yaml.safe_load((repo_root / f).read_text()) is not None  # a mapping ({} until tuned)
    prod = load_params(repo_root / "params.yaml", [repo_root / "params.production.yaml"])
    assert prod.stages["stage3"].size == 256 and prod.hpo.storage.startswith("sqlite:///")


# --------------------------------------------------------------------------- the searcher


def test_searcher_records_scheduler_stopped_trials_as_pruned() -> None:
    """Ray's OptunaSearch tells COMPLETE for a trial the scheduler stopped (its last result
    holds the metric); PruningOptunaSearch tells PRUNED, with the stop result as the last
    intermediate value. Driven directly (no Ray runtime needed)."""
    pytest.importorskip("ray.tune")
    import optuna
    from optuna.distributions import FloatDistribution
    from optuna.trial import TrialState
    from ray.tune.search.optuna import OptunaSearch

    from components.hpo import TRIAL_KEY, PruningOptunaSearch

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    space = {"x": FloatDistribution(0.0, 1.0)}
    stock = OptunaSearch(space, metric="m", mode="max", sampler=optuna.samplers.TPESampler(seed=0))
    stock.suggest("a")
    stock.on_trial_complete("a", {"m": 0.1, "step": 4})  # stopped at step 4 of 8
    assert stock._ot_study.trials[0].state == TrialState.COMPLETE  # why the subclass exists

    done: list[tuple] = []
    s = PruningOptunaSearch(space, metric="m", mode="max", sampler=optuna.samplers.TPESampler(seed=0), total_steps=8,
                            on_new=lambda t, cfg: {"run_id": f"run{t.number}"}, on_done=lambda *a: done.append(a))
    cfg = s.suggest("a")
    assert set(cfg) == {"x", TRIAL_KEY} and cfg[TRIAL_KEY] == {"number": 0, "run_id": "run0"}
    s.on_trial_result("a", {"m": 1.0, "step": 4})
    s.on_trial_result("a", {"m": 2.0, "step": 8})
    s.on_trial_complete("a", {"m": 2.0, "step": 8})  # ran to the end
    s.suggest("b")
    s.on_trial_complete("b", {"m": 0.5, "step": 4})  # the scheduler stopped it at step 4
    s.suggest("c")
    s.on_trial_complete("c", None, error=True)
    s.on_trial_complete("c", None, error=True)  # a second notification is ignored
    t = s._ot_study.trials
    assert [x.state for x in t] == [TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL]
    assert t[0].value == 2.0 and t[0].intermediate_values == {4: 1.0, 8: 2.0}
    assert t[1].intermediate_values == {4: 0.5} and t[1].value == 0.5
    assert done == [(0, "COMPLETE", 2.0, 8), (1, "PRUNED", 0.5, 4), (2, "FAIL", None, None)]


def test_scheduler_and_storage_url_helpers() -> None:
    pytest.importorskip("ray.tune")
    from ray.tune.schedulers import ASHAScheduler, MedianStoppingRule

    from components.hpo import build_scheduler, mask_url

    asha = build_scheduler(_with_hpo(Params(), scheduler="asha", grace_rounds=2, reduction_factor=3.0), 8)
    assert isinstance(asha, ASHAScheduler) and asha._max_t == 8 and asha.metric == "psnr_window_db"
    med = build_scheduler(_with_hpo(Params(), scheduler="median", grace_rounds=1, min_samples=2), 4)
    assert isinstance(med, MedianStoppingRule) and med._min_samples_required == 2 and med._grace_period == 1
    assert med._on_insufficient_samples(None, None, 1) == "CONTINUE"  # never PAUSE (no Tune checkpoints)
    masked = mask_url("postgresql+psycopg2://xct:s3cret@db:5432/optuna")
    assert "s3cret" not in masked and masked.startswith("postgresql+psycopg2://xct:***@db:5432/optuna")
    assert mask_url("sqlite:///hpo/optuna.db") == "sqlite:///hpo/optuna.db"


# --------------------------------------------------------------------------- the CLI


def _xct(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    from pipelines.cli import main

    with pytest.raises(SystemExit) as e:
        main(args)
    out = capsys.readouterr()
    return int(e.value.code or 0), out.out, out.err


def _test_params(root: Path, **hpo: Any) -> Params:
    base = tiny_params(train={"val_reprojection": False})
    settings = dict(
        storage=f"sqlite:///{root / 'optuna.db'}", out_dir=str(root / "hpo"),
        steps={"stage1": 8, "stage2": 4}, val_every=4, scheduler="median", grace_rounds=1, min_samples=2,
        space={"stages.{stage}.lr": {"type": "float", "low": 1e-8, "high": 3e-3, "log": True},
               "stages.{stage}.lift_channels": {"type": "categorical", "choices": [2, 4]},
               "stages.{stage}.token_grid": {"type": "categorical", "choices": [4, 8]}},
        points=[{"stages.{stage}.lr": 2e-3, "stages.{stage}.lift_channels": 4, "stages.{stage}.token_grid": 8}] * 2
        + [{"stages.{stage}.lr": 1e-8, "stages.{stage}.lift_channels": 4, "stages.{stage}.token_grid": 8}],
    )
    return _with_hpo(base, **{**settings, **hpo})


def _dump(path: Path, params: Params) -> Path:
    path.write_text(yaml.safe_dump(params.model_dump(mode="json"), sort_keys=False))
    return path


@pytest.mark.parametrize(
    "case, needle",
    [
        ("bad_stage", "stage 7 does not exist"),
        ("no_processed", "processed data folder not found"),
        ("unknown_path", "unknown parameter 'stages.stage1.lrr'"),
        ("no_rounds", "nothing could ever be pruned"),
    ],
)
def test_cli_errors_are_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str], case: str, needle: str) -> None:
    params = _test_params(tmp_path)
    stage = "7" if case == "bad_stage" else "1"
    if case == "unknown_path":
        params = _with_hpo(params, points=[], space={"stages.{stage}.lrr": {"type": "float", "low": 0.1, "high": 0.2}})
    if case == "no_rounds":
        params = _with_hpo(params, steps={"stage1": 4}, val_every=4)
    pfile = _dump(tmp_path / "params.yaml", params)
    code, out, err = _xct(["hpo", "--stage", stage, "--trials", "2", "--params", str(pfile),
                           "--processed", str(tmp_path / "nope")], capsys)
    assert code != 0 and needle in err, err
    assert err.startswith("xct: error:") and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "optuna.db").exists()  # nothing was started


# --------------------------------------------------------------------------- a real study (slow)


@pytest.fixture(scope="module")
def study_env(tmp_path_factory: pytest.TempPathFactory):
    ray = pytest.importorskip("ray")
    pytest.importorskip("optuna")
    root = tmp_path_factory.mktemp("hpo")
    ray_tmp = Path(tempfile.mkdtemp(prefix="xh-", dir="/tmp"))  # unix socket paths are length-limited
    keys = ("RAY_TMPDIR", "MLFLOW_TRACKING_URI", "XCT_HPO_STORAGE", "RAY_ADDRESS", "RAY_AIR_NEW_OUTPUT")
    saved = {k: os.environ.get(k) for k in keys}
    os.environ["RAY_TMPDIR"] = str(ray_tmp)
    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{root / 'mlflow.db'}"
    os.environ.pop("XCT_HPO_STORAGE", None)
    os.environ.pop("RAY_ADDRESS", None)
    params = _test_params(root)
    processed = build_processed(root, params, n_train=4, n_val=1)
    pfile = _dump(root / "params.yaml", params)
    ray.init(num_cpus=2, log_to_driver=False)  # shared by the three `xct hpo` calls below
    try:
        yield {"root": root, "params": params, "pfile": pfile, "processed": processed,
               "uri": os.environ["MLFLOW_TRACKING_URI"], "storage": params.hpo.storage}
    finally:
        ray.shutdown()
        shutil.rmtree(ray_tmp, ignore_errors=True)
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _run_study(env: dict, trials: int, capsys: pytest.CaptureFixture[str]) -> str:
    code, out, err = _xct(["hpo", "--stage", "1", "--trials", str(trials), "--params", str(env["pfile"]),
                           "--processed", str(env["processed"])], capsys)
    assert code == 0, err[-3000:]
    return out


def _study(env: dict):
    import optuna

    return optuna.load_study(study_name="xct-stage1", storage=env["storage"])


def _image_ok(path: Path) -> None:
    import numpy as np
    from PIL import Image

    img = np.asarray(Image.open(path).convert("L"), dtype=np.float64)
    assert img.shape[0] >= 200 and img.shape[1] >= 300, img.shape
    assert img.std() > 5.0 and (img < 128).mean() > 0.002  # drawn on, not blank


def _child_runs(env: dict, parent: str) -> list:
    import mlflow

    client = mlflow.MlflowClient(env["uri"])
    exp = client.get_experiment_by_name("xct-hpo")
    return client.search_runs([exp.experiment_id], filter_string=f"tags.`mlflow.parentRunId` = '{parent}'")


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_three_trial_study_prunes_one_and_writes_the_best_overlay(study_env: dict, capsys: pytest.CaptureFixture[str]) -> None:
    import mlflow
    from optuna.trial import TrialState

    env = study_env
    out = _run_study(env, 3, capsys)
    assert "trial 2: PRUNED at step 4" in out, out
    study = _study(env)
    t = sorted(study.trials, key=lambda x: x.number)
    assert [x.state for x in t] == [TrialState.COMPLETE, TrialState.COMPLETE, TrialState.PRUNED]
    assert t[0].value == pytest.approx(t[1].value, abs=1e-9)  # same config, same seed: same curve
    assert sorted(t[0].intermediate_values) == [4, 8] and sorted(t[2].intermediate_values) == [4]
    assert t[2].intermediate_values[4] < t[0].intermediate_values[4]  # why the median rule stopped it
    assert t[2].params["stages.stage1.lr"] == pytest.approx(1e-8)

    hpo_dir = env["root"] / "hpo"
    frag = hpo_dir / "best_stage1.yaml"
    doc = yaml.safe_load(frag.read_text())
    assert doc == {"stages": {"stage1": {"lr": 2e-3, "lift_channels": 4, "token_grid": 8, "conv_channels": [8]}}}
    text = frag.read_text()
    assert "study xct-stage1" in text and f"best trial {study.best_trial.number}" in text and "1 pruned" in text
    # the fragment is a valid overlay, explicitly and through an `overlays:` key
    merged = load_params(env["pfile"], [frag])
    assert merged.stages["stage1"].lr == 2e-3 and merged.stages["stage1"].lift_channels == 4
    via_key = env["root"] / "with_overlay.yaml"
    via_key.write_text(env["pfile"].read_text() + "overlays: [hpo/best_stage1.yaml]\n")
    assert load_params(via_key) == merged
    for png in ("stage1_history.png", "stage1_importance.png"):
        _image_ok(hpo_dir / png)
    rows = (hpo_dir / "stage1_trials.csv").read_text().splitlines()
    assert rows[0].startswith("number,state,value,last_step") and [r.split(",")[1] for r in rows[1:]] == [
        "COMPLETE", "COMPLETE", "PRUNED"]

    client = mlflow.MlflowClient(env["uri"])
    exp = client.get_experiment_by_name("xct-hpo")
    parents = client.search_runs([exp.experiment_id], filter_string="tags.`xct.kind` = 'hpo_study'")
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    parent = parents[0]
    assert parent.data.tags["xct.params_digest"] == env["params"].digest()
    assert {a.path for a in client.list_artifacts(parent.info.run_id)} >= {
        "best_stage1.yaml", "stage1_history.png", "stage1_importance.png", "stage1_trials.csv"}
    children = {r.data.tags["xct.trial_number"]: r for r in _child_runs(env, parent.info.run_id)}
    assert sorted(children) == ["0", "1", "2"]
    pruned = children["2"]
    assert pruned.data.tags["xct.trial_state"] == "PRUNED" and pruned.info.status == "KILLED"
    assert pruned.data.tags["xct.pruned_at_step"] == "4" and float(pruned.data.params["stages.stage1.lr"]) == 1e-8
    for run in children.values():  # every trial carries the training runs' lineage (its own params digest)
        tags = run.data.tags
        for tag in ("mlflow.source.git.commit", "xct.data_hash_source", "xct.data_dir"):
            assert tags.get(tag) == parent.data.tags.get(tag) and tags.get(tag), tag
        assert tags.get("xct.data_hash") == parent.data.tags.get("xct.data_hash")
        assert len(tags["xct.params_digest"]) == 16 and tags["xct.params_digest"] != parent.data.tags["xct.params_digest"]
    for n in ("0", "1"):
        run = children[n]
        assert run.info.status == "FINISHED" and run.data.tags["xct.trial_state"] == "COMPLETE"
        curve = {m.step: m.value for m in client.get_metric_history(run.info.run_id, "val/psnr_window_db")}
        assert sorted(curve) == [4, 8] and math.isclose(curve[8], t[int(n)].value, rel_tol=1e-6)
    trial0 = env["root"] / "hpo" / "trials" / "xct-stage1" / "trial_0000"
    assert (trial0 / "models" / "stage1" / "final.pt").is_file() and (trial0 / "metrics" / "stage1.json").is_file()
    assert not (trial0 / "checkpoints").exists()  # removed when the trial ended


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_rerun_resumes_the_study(study_env: dict, capsys: pytest.CaptureFixture[str]) -> None:
    from optuna.trial import TrialState

    env = study_env
    if len(_study(env).trials) != 3:
        pytest.fail("needs the 3-trial study of the previous test")
    out = _run_study(env, 3, capsys)  # the same N: nothing to run
    assert "3 finished trial(s), 0 to run" in out and "started" not in out
    assert len(_study(env).trials) == 3
    out = _run_study(env, 4, capsys)  # one more: TPE continues the same study
    assert "3 finished trial(s), 1 to run" in out and out.count("started") == 1
    study = _study(env)
    finished = [x for x in study.trials if x.state in (TrialState.COMPLETE, TrialState.PRUNED)]
    assert len(study.trials) == 4 and len(finished) == 4
    assert [x.state for x in sorted(study.trials, key=lambda x: x.number)][:3] == [
        TrialState.COMPLETE, TrialState.COMPLETE, TrialState.PRUNED]
    import mlflow

    client = mlflow.MlflowClient(env["uri"])
    exp = client.get_experiment_by_name("xct-hpo")
    parents = client.search_runs([exp.experiment_id], filter_string="tags.`xct.kind` = 'hpo_study'")
    assert len(parents) == 1  # the resumed study reuses its MLflow run
    assert len(_child_runs(env, parents[0].info.run_id)) == 4
    rows = (env["root"] / "hpo" / "stage1_trials.csv").read_text().splitlines()
    assert len(rows) == 5
    best = study.best_trial
    doc = yaml.safe_load((env["root"] / "hpo" / "best_stage1.yaml").read_text())
    assert doc["stages"]["stage1"]["lr"] == pytest.approx(best.params["stages.stage1.lr"])
    assert json.dumps(doc["stages"]["stage1"]["token_grid"]) == json.dumps(best.params["stages.stage1.token_grid"])


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_a_trial_whose_params_are_invalid_fails_cleanly(study_env: dict, capsys: pytest.CaptureFixture[str]) -> None:
    """dim 12 and heads 8 are each valid for the tiny stage, together not (12 % 8): the trial
    FAILS with the reason on its MLflow run and the command exits 1 (no completed trial)."""
    import mlflow
    from optuna.trial import TrialState

    env = study_env
    root = env["root"] / "bad"
    params = _with_hpo(env["params"], out_dir=str(root / "hpo"), storage=f"sqlite:///{root / 'optuna.db'}",
                       space={"stages.{stage}.dim": {"type": "categorical", "choices": [16, 12]},
                              "stages.{stage}.heads": {"type": "categorical", "choices": [2, 8]}},
                       points=[{"stages.{stage}.dim": 12, "stages.{stage}.heads": 8}])
    root.mkdir()
    pfile = _dump(root / "params.yaml", params)
    code, out, err = _xct(["hpo", "--stage", "1", "--trials", "1", "--params", str(pfile), "--study", "bad",
                           "--processed", str(env["processed"])], capsys)
    assert code == 1 and "no completed trial" in err and len(err.strip().splitlines()) == 1, err
    assert "trial 0: FAIL" in out and "dim 12 is not divisible by heads 8" in out, out
    import optuna

    trials = optuna.load_study(study_name="bad", storage=params.hpo.storage).trials
    assert [t.state for t in trials] == [TrialState.FAIL]
    run = mlflow.MlflowClient(env["uri"]).get_run(trials[0].user_attrs["mlflow_run_id"])
    assert run.info.status == "FAILED" and "dim 12 is not divisible by heads 8" in run.data.tags["xct.failure"]
    assert not (root / "hpo" / "best_stage1.yaml").exists()
