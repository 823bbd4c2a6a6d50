"""Register step + summary + `xct models` against a real MLflow (sqlite in tmp).

Tiny untrained two-stage cascade; the evaluation metrics fed to the gates are written by
the TEST (labelled values) so each scenario — pass, worse model, failing gate — is chosen
here, not by training luck. The pyfunc is loaded back by alias and checked against the
project sampler run directly on the same stage files (known answer).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import yaml

from test_evaluate import build_tiny_processed, export_tiny_stages, make_tiny_params
from xct_core.config import Params

NAME = "xct-cascade"
KEYS = {"status", "rejected_at_stage", "stages", "model_uri", "mlflow_tracking_uri", "reports"}


def _write_reports(root: Path, params: Params, psnr: dict[int, float], passing: dict[int, bool],
                   patients: dict[str, float] | None = None) -> tuple[Path, Path]:
    """Evaluation summaries with TEST-CHOSEN values, judged by the real gate step with
    thresholds 10 dB / SSIM 0.1 (test thresholds). ``patients``: the last stage's per-patient
    window PSNR (default: one patient at the stage's mean)."""
    from components.gate import run_gate

    data = params.model_dump(mode="json")
    for k in (1, 2):
        data["gates"][f"stage{k}"] = {"psnr_window_db": 10.0, "ssim_window": 0.1, "max_nan": 0, "min_std_ratio": 0.25}
    gp = Params.model_validate(data)
    ev, gates = root / "eval", root / "gates"
    for k in (1, 2):
        m = {"stage": k, "psnr_window_db": psnr[k] if passing[k] else 5.0, "ssim_window": 0.5, "nan_count": 0,
             "std": 0.4, "target_std": 0.5, "mae_hu": 50.0, "n_patients": 1, "test_ids_hash": "split-A"}
        (ev / f"stage{k}").mkdir(parents=True, exist_ok=True)
        (ev / f"stage{k}" / "metrics.json").write_text(json.dumps(m))
        rows = patients if (k == 2 and patients) else {"ph01": m["psnr_window_db"]}
        (ev / f"stage{k}" / "per_patient.csv").write_text(
            "id,psnr_window_db\n" + "".join(f"{i},{v!r}\n" for i, v in rows.items()))
        run_gate(k, ev / f"stage{k}" / "metrics.json", gates / f"stage{k}.json", gp)
    return gates, ev


def registry_env(root: Path) -> Any:
    """A sqlite MLflow store in ``root`` ($MLFLOW_TRACKING_URI), tiny params and processed data
    (a generator: the fixtures of this module and tests/test_model_card.py yield from it)."""
    uri = f"sqlite:///{root / 'mlflow.db'}"
    mp = pytest.MonkeyPatch()
    mp.setenv("MLFLOW_TRACKING_URI", uri)
    mp.setenv("MLFLOW_DISABLE_TELEMETRY", "true")
    try:
        params = make_tiny_params()
        processed = build_tiny_processed(root, params, n_train=1, n_test=1)
        pfile = root / "params.yaml"
        pfile.write_text(yaml.safe_dump(params.model_dump(mode="json")))
        yield {"root": root, "uri": uri, "params": params, "processed": processed, "params_file": pfile}
    finally:
        mp.undo()


@pytest.fixture(scope="module")
def reg_env(tmp_path_factory: pytest.TempPathFactory) -> Any:
    yield from registry_env(tmp_path_factory.mktemp("register"))


def _run(env: dict[str, Any], name: str, seed: int, psnr2: float, passing2: bool = True,
         pipeline_run: str | None = None, patients: dict[str, float] | None = None) -> dict[str, Any]:
    """The register step on a tiny cascade; ``pipeline_run``: a parent pipeline run the
    training folder names (``mlflow_pipeline.json``, as a training run leaves it)."""
    from components.register import run_register

    run = env["root"] / name
    export_tiny_stages(run / "train", env["params"], seed=seed)
    if pipeline_run is not None:
        (run / "train" / "mlflow_pipeline.json").write_text(json.dumps({"run_id": pipeline_run,
                                                                       "tracking_uri": env["uri"]}))
    gates, ev = _write_reports(run, env["params"], {1: 20.0, 2: psnr2}, {1: True, 2: passing2}, patients)
    return run_register(gates, ev, run / "train", run / "summary.json", env["params"],
                        processed_dir=env["processed"], tracking_uri=env["uri"])


def _versions(env: dict[str, Any]) -> dict[str, Any]:
    from mlflow import MlflowClient

    c = MlflowClient(env["uri"])
    return {str(v.version): v for v in c.search_model_versions(f"name='{NAME}'")}


def _pipeline_run(uri: str) -> str:
    """A parent pipeline run as a training run creates it (experiment ``xct``)."""
    from mlflow import MlflowClient

    from components.tracking import ensure_experiment

    c = MlflowClient(uri)
    return c.create_run(ensure_experiment(c, "xct"), run_name="pipeline", tags={"xct.kind": "pipeline"}).info.run_id


def _datasets(client: Any, run_id: str) -> dict[str, Any]:
    """context → the dataset of each dataset input of ``run_id``."""
    inputs = client.get_run(run_id).inputs.dataset_inputs
    return {next(t.value for t in d.tags if t.key == "mlflow.data.context"): d.dataset for d in inputs}


def test_register_promote_idempotent_candidate_and_rejected(reg_env: dict[str, Any]) -> None:
    from mlflow import MlflowClient

    from components.tracking import dvc_data_hash

    c = MlflowClient(reg_env["uri"])
    # 1. every gate passes, no champion yet → version 1 @champion with lineage tags
    parent = _pipeline_run(reg_env["uri"])
    s1 = _run(reg_env, "run1", seed=0, psnr2=25.0, pipeline_run=parent)
    assert KEYS <= set(s1) and s1["status"] == "promoted" and s1["rejected_at_stage"] is None
    assert s1["model_uri"] == f"models:/{NAME}/1" and s1["alias"] == "champion"
    assert s1["mlflow_tracking_uri"] == reg_env["uri"]
    assert [st["stage"] for st in s1["stages"]] == [1, 2] and all(st["passed"] for st in s1["stages"])
    assert s1["stages"][1]["metrics"]["psnr_window_db"] == 25.0 and s1["stages"][1]["checks"]
    assert json.loads((reg_env["root"] / "run1" / "summary.json").read_text()) == s1
    mv = c.get_model_version_by_alias(NAME, "champion")
    assert str(mv.version) == "1"
    t = mv.tags
    for key in ("xct.git_commit", "xct.data_hash", "xct.data_hash_source", "xct.params_digest", "xct.content_hash",
                "xct.test_ids_hash", "xct.psnr_window_db", "xct.run_id", "xct.gates"):
        assert t.get(key), key
    assert t["xct.params_digest"] == reg_env["params"].digest() and float(t["xct.psnr_window_db"]) == 25.0
    assert t["xct.gates"] == "stage1=pass,stage2=pass"
    arts = {a.path for a in c.list_artifacts(t["xct.run_id"], "gates")}
    assert arts == {"gates/stage1.json", "gates/stage2.json"}
    # lineage: the data the version was trained and evaluated on, as dataset inputs whose
    # digest is the processed folder's hash; where it came from (no KFP here); its pipeline run
    digest, source = dvc_data_hash(reg_env["processed"])
    ds = _datasets(c, t["xct.run_id"])
    assert sorted(ds) == ["test", "train", "val"]
    assert {d.digest for d in ds.values()} == {digest} == {t["xct.data_hash"]} and source == "manifest"
    assert all(json.loads(d.source)["uri"] == str(Path(reg_env["processed"]).absolute()) for d in ds.values())
    assert json.loads(ds["test"].profile)["n_volumes"] == {"test": 1, "train": 1, "val": 0}
    reg_tags = c.get_run(t["xct.run_id"]).data.tags
    assert reg_tags["xct.origin"] == "local" and not [k for k in reg_tags if k.startswith("kfp.")]
    assert t["xct.pipeline_run_id"] == parent and reg_tags["xct.verdict"] == "passed"
    # the experiments open on their runs in the MLflow 3 UI (model training, not GenAI)
    for exp in ("xct-register", "xct"):
        assert c.get_experiment_by_name(exp).tags["mlflow.experimentKind"] == "custom_model_development"
    # the parent pipeline run carries the gate results and the verdict
    pr = c.get_run(parent).data
    assert pr.metrics["gate1.passed"] == 1.0 and pr.metrics["gate2.passed"] == 1.0
    assert pr.metrics["gate2.psnr_window"] == 25.0 and pr.metrics["gate1.psnr_window"] == 20.0
    assert pr.tags["xct.verdict"] == "promoted" and pr.tags["xct.model_uri"] == f"models:/{NAME}/1"

    # 2. the same run again → no new version, champion unchanged
    s1b = _run(reg_env, "run1", seed=0, psnr2=25.0)
    assert s1b["model_uri"] == f"models:/{NAME}/1" and s1b["status"] == "promoted"
    assert sorted(_versions(reg_env)) == ["1"]

    # 3. different weights, worse on the same test split → version 2 @candidate, champion stays 1
    s2 = _run(reg_env, "run2", seed=1, psnr2=22.0)
    assert s2["status"] == "registered" and s2["alias"] == "candidate" and s2["model_uri"] == f"models:/{NAME}/2"
    assert str(c.get_model_version_by_alias(NAME, "champion").version) == "1"
    assert str(c.get_model_version_by_alias(NAME, "candidate").version) == "2"
    assert "does not beat champion v1" in c.get_model_version(NAME, "2").tags["xct.alias_reason"]

    # 4. a failing stage-2 gate → rejected at stage 2, nothing registered, local model uri
    parent3 = _pipeline_run(reg_env["uri"])
    s3 = _run(reg_env, "run3", seed=2, psnr2=30.0, passing2=False, pipeline_run=parent3)
    assert KEYS <= set(s3) and s3["status"] == "rejected" and s3["rejected_at_stage"] == 2
    assert s3["model_version"] is None and s3["model_uri"].endswith("stage2/best.pt")
    assert Path(s3["model_uri"]).is_file()
    assert sorted(_versions(reg_env)) == ["1", "2"]
    assert any(not c_["passed"] for c_ in s3["stages"][1]["checks"])
    # ... and its audit trail is in MLflow: evaluation, gate reports, model card, data, why
    pr3 = c.get_run(parent3).data
    assert pr3.metrics["gate1.passed"] == 1.0 and pr3.metrics["gate2.passed"] == 0.0
    assert pr3.metrics["gate2.psnr_window"] == 5.0 and pr3.tags["xct.verdict"] == "rejected"
    rej = c.get_run(pr3.tags["xct.rejected_run_id"])
    assert_rejected_run(c, rej, stage=2, n_stages=2)
    assert rej.data.tags["xct.pipeline_run_id"] == parent3 and rej.info.status == "FINISHED"
    assert rej.data.metrics["stage2/psnr_window_db"] == 5.0 and rej.data.metrics["stage1/psnr_window_db"] == 20.0
    assert rej.info.experiment_id == c.get_experiment_by_name("xct-register").experiment_id
    assert {d.digest for d in _datasets(c, rej.info.run_id).values()} == {digest}


def assert_rejected_run(client: Any, run: Any, stage: int, n_stages: int) -> None:
    """A rejected-candidate run (:func:`components.register.log_rejected`): tags saying why,
    the gate reports and evaluations up to ``stage``, the model card of a rejected model."""
    t = run.data.tags
    assert t["xct.verdict"] == "rejected" and t["xct.rejected_at_stage"] == str(stage)
    assert t["xct.reason"].startswith(f"stage {stage}: gate FAILED") and "psnr_window" in t["xct.reason"]
    arts = {a.path for a in client.list_artifacts(run.info.run_id, "gates")}
    assert arts == {f"gates/stage{k}.json" for k in range(1, stage + 1)}
    for k in range(1, stage + 1):
        assert f"eval/stage{k}/metrics.json" in {a.path for a in client.list_artifacts(run.info.run_id, f"eval/stage{k}")}
    import mlflow

    local = mlflow.artifacts.download_artifacts(run_id=run.info.run_id, artifact_path="model_card/model_card.json",
                                                tracking_uri=client.tracking_uri)
    card = json.loads(Path(local).read_text())
    assert card["model"]["status"] == "rejected" and card["model"]["rejected_at_stage"] == stage
    assert len(card["gates"]) == n_stages and card["gates"][stage - 1]["passed"] is False


def test_champion_moves_only_when_the_paired_interval_says_better(tmp_path: Path) -> None:
    """registry.champion_rule: paired (default) — on the same test split a version with a higher
    mean PSNR whose paired-bootstrap interval still includes 0 stays @candidate (the raw ">"
    would have promoted it); the reason states the paired interval, so the champion's rows came
    from its registration run (promotion on a clear interval: test_decide_alias_rules_and_fallbacks)."""
    from mlflow import MlflowClient

    env_gen = registry_env(tmp_path)
    env = next(env_gen)
    try:
        c = MlflowClient(env["uri"])
        base = {f"ph{i:02d}": 24.0 + 0.4 * i for i in range(8)}
        mean = sum(base.values()) / len(base)
        s1 = _run(env, "p1", seed=0, psnr2=mean, patients=base)
        assert s1["alias"] == "champion"
        # +0.05 dB on average, ±0.6 dB per patient: better by the mean, not by the paired interval
        noisy = {i: v + (0.65 if j % 2 else -0.55) for j, (i, v) in enumerate(base.items())}
        m2 = sum(noisy.values()) / len(noisy)
        assert m2 > mean
        s2 = _run(env, "p2", seed=1, psnr2=m2, patients=noisy)
        r2 = c.get_model_version(NAME, "2").tags["xct.alias_reason"]
        assert s2["alias"] == "candidate" and "does not beat champion v1: paired change +0.050" in r2, r2
        assert "over 8 patients" in r2 and "lower bound <= 0 dB" in r2
        assert str(c.get_model_version_by_alias(NAME, "champion").version) == "1"
    finally:
        env_gen.close()


def test_decide_alias_rules_and_fallbacks() -> None:
    """The pure decision: no champion → champion; another split → candidate; paired without
    rows (or too few patients) falls back to the means and says so; the margin applies to both
    rules; ``mean`` ignores rows."""
    from types import SimpleNamespace

    from components.register import decide_alias

    p = make_tiny_params()
    champ = SimpleNamespace(version="4", tags={"xct.test_ids_hash": "A", "xct.psnr_window_db": "25.0"})
    assert decide_alias(None, 20.0, "A", p) == ("champion", "no champion yet")
    assert decide_alias(champ, 30.0, "B", p)[0] == "candidate"
    a, why = decide_alias(champ, 25.2, "A", p)
    assert a == "champion" and "means: no paired interval, per-patient rows missing on both sides" in why
    few = {"a": 25.2, "b": 25.3}
    a, why = decide_alias(champ, 25.25, "A", p, few, {"a": 25.0, "b": 25.0})
    assert a == "champion" and "means: no paired interval, n < 5" in why, why
    rows = {f"p{i}": 25.0 + 0.1 * i for i in range(6)}
    up = {k: v + 0.5 for k, v in rows.items()}
    assert decide_alias(champ, 25.75, "A", p, up, rows)[0] == "champion"
    strict = Params.model_validate({**p.model_dump(mode="json"),
                                    "registry": {**p.registry.model_dump(mode="json"), "champion_min_change_db": 0.6}})
    a, why = decide_alias(champ, 25.75, "A", strict, up, rows)
    assert a == "candidate" and "lower bound <= 0.6 dB" in why, why
    assert decide_alias(champ, 25.5, "A", strict)[0] == "candidate"  # means: 25.5 <= 25.0 + 0.6
    mean_rule = Params.model_validate({**p.model_dump(mode="json"),
                                       "registry": {**p.registry.model_dump(mode="json"), "champion_rule": "mean"}})
    worse_rows = {k: v - 1.0 for k, v in rows.items()}
    a, why = decide_alias(champ, 25.1, "A", mean_rule, worse_rows, rows)  # rows ignored: the means decide
    assert a == "champion" and "paired" not in why


def test_gate_reads_the_champion_from_the_registry(reg_env: dict[str, Any], tmp_path: Path) -> None:
    """A champion check of the gate step against the real registry: the champion's stage-2
    metrics of its registration run, on the same test split; a missing store is no champion
    and is not created."""
    from components.gate import read_champion, run_gate

    _run(reg_env, "run1", seed=0, psnr2=25.0)  # idempotent: v1 (@champion, stage-2 PSNR 25.0 on split-A)
    from mlflow import MlflowClient

    champ_v = str(MlflowClient(reg_env["uri"]).get_model_version_by_alias(NAME, "champion").version)
    champ = read_champion(2, reg_env["params"], reg_env["uri"])
    assert champ is not None and champ.version == champ_v and champ.test_ids_hash == "split-A"
    assert champ.metrics["psnr_window_db"] == pytest.approx(25.0 if champ_v == "1" else champ.metrics["psnr_window_db"])
    # its per-patient rows come with it (logged by register: the paired champion check's input)
    assert champ.rows == [{"id": "ph01", "psnr_window_db": pytest.approx(champ.metrics["psnr_window_db"])}]
    base = champ.metrics["psnr_window_db"]
    data = reg_env["params"].model_dump(mode="json")
    data["gates"]["stage2"] = {"psnr_window_db": 10.0, "ssim_window": 0.1, "max_nan": 0, "min_std_ratio": 0.25,
                               "relative": [{"baseline": "champion", "min_absolute_change": 0.5}]}
    gp = Params.model_validate(data)
    for psnr, want in ((base + 0.4, False), (base + 0.6, True)):
        m = tmp_path / f"m{psnr}.json"
        m.write_text(json.dumps({"stage": 2, "psnr_window_db": psnr, "ssim_window": 0.5, "nan_count": 0, "std": 0.4,
                                 "target_std": 0.5, "test_ids_hash": "split-A"}))
        rep = run_gate(2, m, tmp_path / f"g{psnr}.json", gp, tracking_uri=reg_env["uri"])
        assert rep.passed is want
        doc = json.loads((tmp_path / f"g{psnr}.json").read_text())
        check = doc["checks"][-1]
        assert check["baseline"] == "champion" and check["baseline_value"] == pytest.approx(base)
        assert check["threshold"] == pytest.approx(base + 0.5) and f"champion v{champ_v}" in check["note"]
    missing = tmp_path / "none" / "mlflow.db"
    assert read_champion(2, reg_env["params"], f"sqlite:///{missing}") is None and not missing.exists()


def test_registered_pyfunc_loads_by_alias_and_matches_the_sampler(reg_env: dict[str, Any]) -> None:
    import mlflow

    from xct_core.cascade import sample_cascade
    from xct_core.checkpoint import load_stage_model
    from xct_core.diffusion import Sampler

    if not _versions(reg_env):
        _run(reg_env, "run1", seed=0, psnr2=25.0)
    mlflow.set_tracking_uri(reg_env["uri"])
    model = mlflow.pyfunc.load_model(f"models:/{NAME}@champion")
    local = Path(mlflow.artifacts.download_artifacts(f"models:/{NAME}@champion"))
    assert not list(local.rglob("*.pkl")), "the registered model must not be pickled"
    assert (local / "MLmodel").read_text().count("xct_pyfunc.py") >= 1

    p = reg_env["params"]
    rng = np.random.default_rng(0)
    frontal = rng.uniform(0, 8, (16, 16)).astype(np.float32)
    lateral = rng.uniform(0, 8, (16, 16)).astype(np.float32)
    vol = np.asarray(model.predict({"frontal": frontal[None], "lateral": lateral[None]}, params={"seed": 3}))
    assert vol.shape == (32, 32, 32) and np.isfinite(vol).all()
    w = p.hu.net_map()  # the networks' HU range (the map inverse of [-1, 1])
    assert vol.min() >= w.lo - 1e-3 and vol.max() <= w.hi + 1e-3  # window inverse of [-1, 1]

    # known answer: the project sampler on the run-1 stage files, same seed and steps
    stages = [load_stage_model(reg_env["root"] / "run1" / "train" / "models" / f"stage{k}" / "best.pt") for k in (1, 2)]
    outs = sample_cascade(stages, torch.from_numpy(frontal)[None, None], torch.from_numpy(lateral)[None, None],
                          sampler=Sampler.from_params(p, 1), generator=torch.Generator().manual_seed(3))
    np.testing.assert_allclose(vol, w.inverse(outs[-1][0, 0].numpy()), atol=1e-3)
    assert_schema_enforced(model, p.drr.pixels)


def assert_schema_enforced(model: Any, pixels: int) -> None:
    """The registered signature: MLflow itself refuses a wrong shape, a wrong dtype, a missing
    view and a non-integer param before the model runs; the input example is a valid request."""
    from mlflow.exceptions import MlflowException

    sig = model.metadata.get_input_schema()
    assert sig.input_names() == ["frontal", "lateral"]
    assert all(s.type == np.dtype(np.float32) and s.shape == (-1, pixels, pixels) for s in sig.inputs)
    assert {p.name: p.dtype.name for p in model.metadata.get_params_schema().params} == {
        "samples": "long", "steps": "long", "seed": "long"}
    ok = np.zeros((1, pixels, pixels), np.float32)
    bad = {
        "wrong shape": ({"frontal": np.zeros((1, 8, 8), np.float32), "lateral": np.zeros((1, 8, 8), np.float32)},
                        None, "does not match expected shape"),
        "wrong dtype": ({"frontal": ok.astype(np.float64), "lateral": ok}, None, "dtype of input float64"),
        "missing view": ({"frontal": ok}, None, "missing inputs"),
        "bad param": ({"frontal": ok, "lateral": ok}, {"seed": "three"}, "seed"),
    }
    for name, (inputs, params, msg) in bad.items():
        with pytest.raises(MlflowException, match=msg):
            model.predict(inputs, params=params)
        assert name
    example = model.input_example  # (inputs, params) as logged; MLflow ran it once at log time
    vol = np.asarray(model.predict(example[0] if isinstance(example, tuple) else example))
    assert vol.dtype == np.float32 and vol.ndim == 3 and np.isfinite(vol).all()


def test_models_cli_list_and_promote(reg_env: dict[str, Any], capsys) -> None:
    from pipelines.cli import main

    if len(_versions(reg_env)) < 2:
        _run(reg_env, "run1", seed=0, psnr2=25.0)
        _run(reg_env, "run2", seed=1, psnr2=22.0)
    pf = str(reg_env["params_file"])
    with pytest.raises(SystemExit) as e:
        main(["models", "promote", "2", "--alias", "champion", "--params", pf])
    assert e.value.code in (0, None)
    with pytest.raises(SystemExit):
        main(["models", "list", "--params", pf])
    out = capsys.readouterr().out
    line2 = next(ln for ln in out.splitlines() if ln.strip().startswith("2 "))
    assert "champion" in line2 and "22.000" in line2
    with pytest.raises(SystemExit) as e:
        main(["models", "promote", "99", "--params", pf])
    assert e.value.code == 2 and "no version '99'" in capsys.readouterr().err
    # put the champion back for test-order independence
    with pytest.raises(SystemExit):
        main(["models", "promote", "1", "--params", pf])


def test_summary_table_lists_checks_and_commands(reg_env: dict[str, Any]) -> None:
    from components.pipeline_verdict import format_summary

    s = _run(reg_env, "run3", seed=2, psnr2=30.0, passing2=False)
    text = format_summary(s)
    assert "REJECTED at stage 2" in text and "psnr_window_db >" in text and "FAIL" in text
    assert f"mlflow ui --backend-store-uri {reg_env['uri']}" in text
    assert "xct reconstruct --model" in text
    assert not math.isnan(s["stages"][0]["metrics"]["psnr_window_db"])


def test_fallback_model_uri_is_reconstructable(tmp_path: Path) -> None:
    """A rejected run names a model `xct reconstruct` can use: a stage-1 run artifact is a whole
    cascade, a later stage's run artifact is not (it lacks stages 1 … k-1) → the local path."""
    from components.register import _fallback_model_uri

    params = make_tiny_params()
    train = tmp_path / "train"
    for k in (1, 2):
        (train / "models" / f"stage{k}").mkdir(parents=True)
        (train / "checkpoints" / f"stage{k}").mkdir(parents=True)
        (train / "checkpoints" / f"stage{k}" / "mlflow.json").write_text(json.dumps({"run_id": f"run{k}"}))
    (train / "models" / "stage1" / "best.pt").write_bytes(b"x")
    assert _fallback_model_uri(train, params) == "runs:/run1/model/best.pt"
    (train / "models" / "stage2" / "best.pt").write_bytes(b"x")
    uri = _fallback_model_uri(train, params)
    assert uri == str((train / "models" / "stage2" / "best.pt").absolute())


def test_origin_tags_say_where_a_run_came_from(monkeypatch: pytest.MonkeyPatch) -> None:
    """Outside KFP: ``xct.origin=local`` and no kfp.* tags; a KFP task's resolved placeholders
    become kfp.* tags, an unresolved ``{{$.…}}`` (a component called outside a pipeline) never does."""
    from components.tracking import KFP_ENV, kfp_environment, origin_tags

    for var in KFP_ENV:
        monkeypatch.delenv(var, raising=False)
    assert origin_tags() == {"xct.origin": "local"}
    env = kfp_environment("4f1c-9", "xct-cascade-2026-12-07", "{{$.pipeline_task_name}}")
    assert env == {"XCT_KFP_RUN_ID": "4f1c-9", "XCT_KFP_RUN_NAME": "xct-cascade-2026-12-07"}
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    assert origin_tags() == {"xct.origin": "kfp", "kfp.run_id": "4f1c-9", "kfp.run_name": "xct-cascade-2026-12-07"}


def test_gate_metrics_of_the_pipeline_run() -> None:
    """gate{k}.passed is 1 only for a passed, not skipped gate (a missing report is 0); each
    check's finite measured value becomes gate{k}.<check>."""
    from components.tracking import gate_metrics

    checks = [{"name": "psnr_window", "value": 21.5}, {"name": "nan", "value": 0}, {"name": "ssim_window",
                                                                                    "value": float("nan")}]
    m = gate_metrics({1: {"passed": True, "checks": checks}, 2: {"passed": True, "skipped": True}, 3: None})
    assert m == {"gate1.passed": 1.0, "gate1.psnr_window": 21.5, "gate1.nan": 0.0, "gate2.passed": 0.0,
                 "gate3.passed": 0.0}
