"""The KFP v2 pipeline (pipelines/kfp_dag.py) and `xct pipeline compile|run|submit`.

Fast: the compiled IR holds the three gate conditions (``dsl.If`` and its ``dsl.Else``);
`submit` to an unreachable host and `run` without ``--local`` fail with one line.
Slow (real kfp.local SubprocessRunner, tiny profile, in-process training): with a TEST-ONLY
failing gate 1 the run still completes (exit 0), the later stages' tasks and register never
run, and the ``dsl.Else`` branch records the gate summary. The pass path (every task through
register) runs for a two-stage profile in tests/test_stage_count.py.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from pipeline_profile import FAILING_GATES, REPO, short_tmpdir, step_env, tiny_profile, write_params

XCT = [sys.executable, "-m", "pipelines.cli"]


def _xct(args: list[str], env: dict[str, str] | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([*XCT, *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)


def test_compile_writes_ir_with_the_gate_conditions(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "pipeline.yaml"
    code, err = _main(["pipeline", "compile", "--out", str(out)], capsys)
    assert code == 0, err
    ir = next(yaml.safe_load_all(out.read_text()))  # + the platform spec (tests/test_kfp_least_privilege.py)
    assert ir["pipelineInfo"]["name"] == "xct-cascade"
    assert set(ir["root"]["inputDefinitions"]["parameters"]) == {
        "data_uri", "params_yaml", "ray_address", "mlflow_tracking_uri"}
    conditions = re.findall(r"condition: (.+)", out.read_text().replace("\n              ", " "))
    passed = [c for c in conditions if "passed" in c and not c.lstrip("'").startswith("!")]
    negated = [c for c in conditions if "passed" in c and c.lstrip("'").startswith("!")]
    assert len(passed) == 3 and len(negated) == 3, conditions  # dsl.If + dsl.Else per gate
    assert all("== true" in c for c in passed)
    # every executor has an image (base images from components/kfp_components.py)
    images = {e["container"]["image"] for e in ir["deploymentSpec"]["executors"].values() if "container" in e}
    assert images and all(images)


def _main(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    """``xct ARGS`` in this process (the CLI root's one-line error handling included)."""
    from pipelines.cli import main

    with pytest.raises(SystemExit) as exc:
        main(args)
    return int(exc.value.code or 0), capsys.readouterr().err


def test_submit_to_an_unreachable_host_is_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    code, err = _main(["pipeline", "submit", "--host", "http://127.0.0.1:9"], capsys)
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1, err
    assert "cannot reach Kubeflow Pipelines at http://127.0.0.1:9" in lines[0]


def test_run_needs_local_flag(capsys: pytest.CaptureFixture[str]) -> None:
    code, err = _main(["pipeline", "run"], capsys)
    assert code == 2 and "--local" in err and len(err.strip().splitlines()) == 1


def test_run_local_with_missing_data_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    missing = tmp_path / "no-such-raw"
    code, err = _main(["pipeline", "run", "--local", "--data", str(missing), "--root", str(tmp_path / "kfp")], capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1 and str(missing) in err


def _run_local(tmp: Path, gates: dict | None, n_stages: int = 3,
               local_training: bool = True) -> tuple[subprocess.CompletedProcess, Path]:
    env = step_env(tmp)
    raw = tmp / "raw"
    subprocess.run([*XCT, "data", "synth", "--n", "6", "--size", "32", "--seed", "0", "--spacing-mm", "12.8",
                    "--out", str(raw), "--no-preview"], cwd=REPO, env=env, check=True, capture_output=True)
    params = write_params(tmp / "params.yaml", tiny_profile(gates=gates, n_stages=n_stages,
                                                            local_training=local_training))
    root = tmp / "kfp"
    proc = _xct(["pipeline", "run", "--local", "--params", str(params), "--data", str(raw), "--root", str(root)],
                env=env, timeout=840)
    runs = [p for p in root.iterdir() if p.name.startswith("xct-cascade-")]
    assert len(runs) == 1, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc, runs[0]


@pytest.fixture
def scratch() -> Iterator[Path]:
    """A short, disposable temp dir (removed afterwards)."""
    d = short_tmpdir("xkfp")
    yield d
    shutil.rmtree(d, ignore_errors=True)


def _tasks(run: Path) -> set[str]:
    return {p.name for p in run.iterdir() if p.is_dir()}


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_kfp_local_failing_gate_stops_later_tasks(scratch: Path) -> None:
    tmp = scratch
    gates = tiny_profile(n_stages=2)["gates"]  # two stages: what runs is the same for any count
    gates["stage1"] = FAILING_GATES["stage1"]  # TEST-ONLY threshold: gate 1 must fail
    # stage 1 trains with Ray Train (one worker) so that it opens MLflow runs (lineage below)
    proc, run = _run_local(tmp, gates=gates, n_stages=2, local_training=False)
    assert proc.returncode == 0, proc.stderr[-3000:]  # rejected is a completed run
    tasks = _tasks(run)
    assert {"train-stage-component", "evaluate-step-component", "gate-report-component"} <= tasks
    later = [t for t in tasks if re.search(r"-component-\d+$", t) and not t.startswith("rejected")]
    assert later == [] and "register-component" not in tasks, sorted(tasks)
    rejected = [t for t in tasks if t.startswith("rejected-component")]
    assert len(rejected) == 1
    report = (run / rejected[0] / "report").read_text()
    assert "gate 1" in report and "psnr_window" in report
    gate = json.loads((run / "gate-report-component" / "reports" / "gates" / "stage1.json").read_text())
    assert gate["passed"] is False
    assert sorted(p.name for p in (run / "gate-report-component" / "reports" / "gates").iterdir()) == ["stage1.json"]
    assert "REJECTED" in proc.stdout
    run_summary = json.loads((run / "run-summary-component" / "summary" / "run_summary.json").read_text())
    assert run_summary["state"] == "SUCCEEDED", "a rejected run is a completed run"
    _assert_lineage(tmp, run, run_summary, rejected[0])


def _assert_lineage(tmp: Path, run: Path, run_summary: dict, rejected_task: str) -> None:
    """Every MLflow run the KFP tasks made carries kfp.local's run id (the one the exit task
    recorded), the run's name and its task's name; the stage run logged the processed data
    artifact as its train/val datasets; the rejected candidate left its audit run (evaluation,
    gate report, model card, reason) and the pipeline run the gate results."""
    from mlflow import MlflowClient

    from components.tracking import dvc_data_hash
    from test_register import _datasets, assert_rejected_run

    job_id = run_summary["pipeline_job_id"]
    assert re.fullmatch(r"[0-9a-zA-Z-]+", job_id), run_summary
    c = MlflowClient(f"sqlite:///{tmp / 'mlflow.db'}")
    exps = c.search_experiments()
    assert {e.name for e in exps} >= {"xct", "xct-register"}
    assert all(e.tags.get("mlflow.experimentKind") == "custom_model_development" for e in exps if e.name != "Default")
    runs = c.search_runs([e.experiment_id for e in exps])
    assert runs and all(r.data.tags.get("kfp.run_id") == job_id for r in runs), [r.data.tags for r in runs]
    assert all(r.data.tags["kfp.run_name"] == run.name and r.data.tags["xct.origin"] == "kfp" for r in runs)
    by_kind = {r.data.tags["xct.kind"]: r for r in runs}
    assert sorted(by_kind) == ["pipeline", "rejected-candidate", "stage"] and len(runs) == 3, sorted(by_kind)
    tasks = {kind: r.data.tags["kfp.task_name"] for kind, r in by_kind.items()}
    assert tasks == {"pipeline": "train-stage-component", "stage": "train-stage-component",
                     "rejected-candidate": rejected_task}, tasks  # the task folders of this kfp.local run
    processed = run / "preprocess-component" / "processed"
    digest, _ = dvc_data_hash(processed)
    ds = _datasets(c, by_kind["stage"].info.run_id)
    assert sorted(ds) == ["train", "val"] and {d.digest for d in ds.values()} == {digest}
    assert json.loads(ds["train"].source)["uri"] == str(processed)
    rejected = by_kind["rejected-candidate"]
    assert_rejected_run(c, rejected, stage=1, n_stages=2)
    assert {d.digest for d in _datasets(c, rejected.info.run_id).values()} == {digest}
    parent = by_kind["pipeline"]
    assert rejected.data.tags["xct.pipeline_run_id"] == parent.info.run_id
    pm = c.get_run(parent.info.run_id).data
    assert pm.metrics["gate1.passed"] == 0.0 and "gate1.psnr_window" in pm.metrics and "gate2.passed" in pm.metrics
    assert pm.tags["xct.verdict"] == "rejected" and pm.tags["xct.rejected_run_id"] == rejected.info.run_id
    summary = json.loads((run / rejected_task / "summary" / "summary.json").read_text())
    assert summary["status"] == "rejected" and summary["rejected_at_stage"] == 1


# --------------------------------------------------------------------------- everyday controls


def _all_tasks(ir: dict) -> dict[str, dict]:
    """Every task of the compiled IR (root DAG and every sub-DAG), by ``<dag>/<task>``."""
    out = {f"root/{n}": t for n, t in ir["root"]["dag"]["tasks"].items()}
    for comp, spec in ir["components"].items():
        for n, t in spec.get("dag", {}).get("tasks", {}).items():
            out[f"{comp}/{n}"] = t
    return out


def _container_tasks(ir: dict) -> dict[str, dict]:
    """Tasks that run an executor (not a sub-DAG), the exit task excluded."""
    comps = ir["components"]
    return {k: t for k, t in _all_tasks(ir).items()
            if "executorLabel" in comps[t["componentRef"]["name"]] and not k.endswith("run-summary-component")}


def _compile(tmp: Path, capsys: pytest.CaptureFixture[str], *extra: str, kfp: dict | None = None) -> list[dict]:
    from components.ops_params import load_params

    args = ["pipeline", "compile", "--out", str(tmp / "p.yaml")]
    if kfp is not None:
        data = load_params(REPO / "params.yaml").model_dump(mode="json")
        data["pipeline"]["kfp"].update(kfp)
        args += ["--params", str(write_params(tmp / "params.yaml", data))]
    code, err = _main([*args, *extra], capsys)
    assert code == 0, err
    return list(yaml.safe_load_all((tmp / "p.yaml").read_text()))


def test_compiled_tasks_cache_retry_and_sit_inside_the_exit_handler(tmp_path: Path,
                                                                     capsys: pytest.CaptureFixture[str]) -> None:
    from components.ops_params import load_params

    kp = load_params(REPO / "params.yaml").pipeline.kfp
    ir, _platform = _compile(tmp_path, capsys)  # the platform spec: resources/secrets (tests/test_kfp_least_privilege.py)
    tasks = _container_tasks(ir)
    assert len(tasks) >= 14, sorted(tasks)  # importer, ingest, validate, preprocess, 3 × (train, eval, gate), register, 3 rejected
    assert all(t.get("cachingOptions", {}).get("enableCache") is True for t in tasks.values()), "caching: true"
    retried = {k: t["retryPolicy"] for k, t in tasks.items() if "retryPolicy" in t}
    kinds = {k.rsplit("/", 1)[1].split("-component")[0] for k in retried}
    assert kinds == {"train-stage", "preprocess"}, sorted(retried)
    assert sum(k.rsplit("/", 1)[1].startswith("train-stage") for k in retried) == 3
    for k, r in retried.items():
        want = kp.retries["preprocess" if "preprocess" in k else "train"]
        assert int(r["maxRetryCount"]) == want.num_retries
        assert r["backoffDuration"] == f"{want.backoff_s:g}s" and r["backoffMaxDuration"] == f"{want.backoff_max_s:g}s"
        assert float(r["backoffFactor"]) == want.backoff_factor
    assert not any("accelerator" in e.get("container", {}).get("resources", {})
                   for e in ir["deploymentSpec"]["executors"].values()), "type '' = no accelerator request"
    # the exit handler: the root DAG is the guarded group + the exit task, which gets the final status
    root = ir["root"]["dag"]["tasks"]
    assert set(root) == {"exit-handler-1", "run-summary-component"}, sorted(root)
    exit_task = root["run-summary-component"]
    assert exit_task["triggerPolicy"]["strategy"] == "ALL_UPSTREAM_TASKS_COMPLETED"
    assert exit_task["dependentTasks"] == ["exit-handler-1"]
    assert "taskFinalStatus" in exit_task["inputs"]["parameters"]["status"]
    assert not exit_task.get("cachingOptions", {}).get("enableCache"), "the run summary is never cached"
    assert "ingest-component" in ir["components"]["comp-exit-handler-1"]["dag"]["tasks"]


def test_no_cache_and_the_train_accelerator_reach_the_compiled_yaml(tmp_path: Path,
                                                                    capsys: pytest.CaptureFixture[str]) -> None:
    tol = {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}
    ir, platform = _compile(tmp_path, capsys, "--no-cache",
                            kfp={"train_accelerator": {"type": "nvidia.com/gpu", "limit": 2, "tolerations": [tol]}})
    tasks = _container_tasks(ir)
    assert tasks and not any(t.get("cachingOptions", {}).get("enableCache") for t in tasks.values()), "--no-cache"
    executors = ir["deploymentSpec"]["executors"]
    with_acc = {k: e["container"]["resources"]["accelerator"] for k, e in executors.items()
                if "accelerator" in e.get("container", {}).get("resources", {})}
    assert sorted(with_acc) == ["exec-train-stage-component", "exec-train-stage-component-2",
                                "exec-train-stage-component-3"], sorted(with_acc)
    for acc in with_acc.values():
        assert acc["resourceType"] == "nvidia.com/gpu" and str(acc["resourceCount"]) == "2"
    tolerations = {k: v["tolerations"] for k, v in platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"].items()
                   if "tolerations" in v}  # every task has a pod config (resources, deadline); only train tolerates
    assert sorted(tolerations) == sorted(with_acc) and all(v == [tol] for v in tolerations.values())
    # caching on again without the flag (params decide)
    ir2, _ = _compile(tmp_path, capsys, kfp={"train_accelerator": {"type": "nvidia.com/gpu", "limit": 2,
                                                                   "tolerations": [tol]}})
    assert all(t.get("cachingOptions", {}).get("enableCache") is True for t in _container_tasks(ir2).values())


def test_kfp_params_are_validated() -> None:
    from components.ops_params import params_from_dict
    from xct_core.errors import ConfigError

    with pytest.raises(ConfigError, match="retries"):
        params_from_dict({"pipeline": {"kfp": {"retries": {"evaluate": {"num_retries": 1}}}}})
    with pytest.raises(ConfigError, match="backoff_factor"):
        params_from_dict({"pipeline": {"kfp": {"retries": {"train": {"backoff_factor": 0.5}}}}})


def test_exit_handler_writes_the_run_summary_when_a_step_fails(scratch: Path) -> None:
    """A real kfp.local run whose ingest fails (an empty data folder): the run fails with one
    line, and the exit task still wrote run_summary.json with the FAILED state."""
    env = step_env(scratch)
    raw = scratch / "raw"
    raw.mkdir()
    root = scratch / "kfp"
    proc = _xct(["pipeline", "run", "--local", "--params", str(REPO / "params.yaml"), "--data", str(raw),
                 "--root", str(root), "--no-cache"], env=env, timeout=300)
    assert proc.returncode != 0
    assert proc.stderr.strip().splitlines()[-1].startswith("xct: error: pipeline run failed"), proc.stderr[-2000:]
    (summary,) = root.glob("xct-cascade-*/run-summary-component/summary/run_summary.json")
    doc = json.loads(summary.read_text())
    assert doc["state"] == "FAILED" and doc["succeeded"] is False, doc
    assert doc["data_uri"] == str(raw) and doc["error_message"]
    assert not list(root.glob("xct-cascade-*/validate-component")), "nothing ran after the failed step"


def test_compiled_yaml_parses_strictly_as_pipeline_and_platform_specs(tmp_path: Path,
                                                                       capsys: pytest.CaptureFixture[str]) -> None:
    from pipelines.kfp_dag import load_pipeline_spec
    from xct_core.errors import InputError

    tol = {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}
    _compile(tmp_path, capsys, kfp={"train_accelerator": {"type": "nvidia.com/gpu", "limit": 1, "tolerations": [tol]}})
    spec, platform = load_pipeline_spec(tmp_path / "p.yaml")
    assert spec.pipeline_info.name == "xct-cascade" and "comp-exit-handler-1" in spec.components
    assert platform is not None and "kubernetes" in platform.platforms
    # strict: one unknown field anywhere and the parse fails, naming the file
    docs = list(yaml.safe_load_all((tmp_path / "p.yaml").read_text()))
    docs[0]["root"]["dag"]["tasks"]["exit-handler-1"]["retryPolicyy"] = {}
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump_all(docs))
    with pytest.raises(InputError, match="not a valid KFP PipelineSpec") as exc:
        load_pipeline_spec(bad)
    assert str(bad) in str(exc.value)


def test_a_local_run_executes_the_compiled_yaml(scratch: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`run_local` runs <root>/pipeline.yaml loaded back from the file, not the Python function:
    a YAML whose ingest task is renamed on disk runs under the new name."""
    import pipelines.kfp_dag as kfp_dag
    from xct_core.errors import XctError

    real = kfp_dag.compile_pipeline

    def renamed(out, params=None, **kw):  # noqa: ANN001, ANN202
        path = real(out, params, **kw)
        path.write_text(path.read_text().replace("ingest-component", "ingestfromyaml-component"))
        return path

    monkeypatch.setattr(kfp_dag, "compile_pipeline", renamed)
    monkeypatch.chdir(scratch)
    raw = scratch / "raw"
    raw.mkdir()
    root = scratch / "kfp"
    with pytest.raises(XctError, match="ingestfromyaml-component"):  # empty data: ingest fails (fast)
        kfp_dag.run_local(raw, "", root)
    (run,) = root.glob("xct-cascade-*")
    assert "ingestfromyaml-component" in _tasks(run) and "ingest-component" not in _tasks(run)
    assert "ingestfromyaml-component" in (root / "pipeline.yaml").read_text()


def test_the_sessions_kfp_stack_shim_changes_nothing_but_time(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """tests/conftest.py swaps kfp.dsl.pipeline_task's ``inspect`` for ``_KfpCallerName`` in the
    test process (KFP's ``inspect.stack()`` made each in-process compile take minutes there).
    With the shim and with the real ``inspect``: a pod setting on a task without a container
    fails with the same message (the calling method's name, what KFP reads from the stack), and
    the same pipeline with pod settings compiles to the same YAML."""
    import inspect

    from kfp import compiler, dsl
    from kfp.dsl import pipeline_task

    from components.kfp_components import stage_params_component

    shim = pipeline_task.inspect
    assert type(shim).__name__ == "_KfpCallerName"  # the session fixture is on

    errors: dict[str, str] = {}
    for name, module in (("shim", shim), ("real", inspect)):
        monkeypatch.setattr(pipeline_task, "inspect", module)

        @dsl.pipeline(name="shim-check")
        def pipe():  # no annotations: KFP reads them (this module has `from __future__ import annotations`)
            task = stage_params_component(params_yaml="{}", stage=1)
            task.set_cpu_request("500m").set_cpu_limit("1").set_memory_request("1Gi")
            task.set_memory_limit("2Gi").set_retry(2)
            importer = dsl.importer(artifact_uri="gs://bucket/data", artifact_class=dsl.Dataset)
            with pytest.raises(ValueError) as exc:
                importer.set_memory_limit("1Gi")
            errors[name] = str(exc.value)

        compiler.Compiler().compile(pipe, str(tmp_path / f"{name}.yaml"))
    assert errors["shim"] == errors["real"] and errors["real"].startswith("set_memory_limit can only be used"), errors
    assert (tmp_path / "shim.yaml").read_text() == (tmp_path / "real.yaml").read_text()
