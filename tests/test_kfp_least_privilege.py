"""Least privilege in the compiled KFP pipeline (issue 23 item 3): every task's pod has CPU and
memory requests and limits and a deadline from ``pipeline.kfp.resources``, runs as non-root,
and only the tasks that talk to MLflow get the MLflow / S3 credentials — as env vars from the
Secrets ``pipeline.kfp.secrets`` names (kfp-kubernetes ``use_secret_as_env``), never as a
pipeline parameter. Read from the YAML ``xct pipeline compile`` writes (the platform spec a
KFP backend receives), parsed strictly by :func:`pipelines.kfp_dag.load_pipeline_spec`.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from pipeline_profile import REPO, write_params


def _compile(tmp: Path, kfp: dict | None = None) -> tuple[dict, dict]:
    from components.ops_params import load_params
    from pipelines.cli import main
    from pipelines.kfp_dag import load_pipeline_spec

    args = ["pipeline", "compile", "--out", str(tmp / "p.yaml")]
    if kfp is not None:
        data = load_params(REPO / "params.yaml").model_dump(mode="json")
        for k, v in kfp.items():
            data["pipeline"]["kfp"][k] = v
        args += ["--params", str(write_params(tmp / "params.yaml", data))]
    with pytest.raises(SystemExit) as exc:
        main(args)
    assert not exc.value.code
    _spec, platform = load_pipeline_spec(tmp / "p.yaml")  # strict protobuf parse of both documents
    assert platform is not None
    ir, plat = yaml.safe_load_all((tmp / "p.yaml").read_text())
    return ir, plat["platforms"]["kubernetes"]["deploymentSpec"]["executors"]


def _kind(executor: str) -> str:
    return "train" if "train-stage" in executor else "preprocess" if "preprocess" in executor else "default"


def test_every_task_has_its_kinds_resources_deadline_and_runs_non_root(tmp_path: Path) -> None:
    from components.ops_params import load_params, quantity

    res = load_params(REPO / "params.yaml").pipeline.kfp.resources
    ir, k8s = _compile(tmp_path)
    executors = ir["deploymentSpec"]["executors"]
    containers = {k: e["container"] for k, e in executors.items() if "container" in e}
    assert len(containers) >= 17 and "exec-run-summary-component" in containers, sorted(containers)
    assert set(containers) == set(k8s), "every container task (the exit task included) has a pod config"
    kinds = set()
    for name, c in containers.items():
        want = res.of(_kind(name) if _kind(name) != "default" else "")
        kinds.add(_kind(name))
        r = c["resources"]
        assert (r["resourceCpuRequest"], r["resourceCpuLimit"]) == (want.cpu_request, want.cpu_limit), name
        assert (r["resourceMemoryRequest"], r["resourceMemoryLimit"]) == (want.memory_request, want.memory_limit), name
        assert quantity(r["resourceCpuRequest"]) <= quantity(r["resourceCpuLimit"]), name
        assert int(k8s[name]["activeDeadlineSeconds"]) == want.timeout_s, name
        assert k8s[name]["securityContext"]["runAsNonRoot"] is True, name
    assert kinds == {"train", "preprocess", "default"}
    # the kinds really differ (a test that could not tell them apart would prove nothing)
    assert res.train.timeout_s != res.default.timeout_s and res.train.memory_limit != res.default.memory_limit


def test_only_the_mlflow_tasks_get_the_credentials_as_env_from_the_named_secrets(tmp_path: Path) -> None:
    from pipelines.kfp_dag import SECRET_KEYS

    ir, k8s = _compile(tmp_path, {"secrets": {"mlflow": "team-a-mlflow", "s3": "team-a-s3"}})
    with_secrets = {k for k, v in k8s.items() if v.get("secretAsEnv")}
    talks_to_mlflow = set()
    for comp in ir["components"].values():
        if "mlflow_tracking_uri" in comp.get("inputDefinitions", {}).get("parameters", {}) and "executorLabel" in comp:
            talks_to_mlflow.add(comp["executorLabel"])
    assert talks_to_mlflow and with_secrets == talks_to_mlflow, (sorted(with_secrets), sorted(talks_to_mlflow))
    assert {k.rsplit("-component", 1)[0].removeprefix("exec-") for k in with_secrets} >= {
        "train-stage", "gate-report", "register"}
    assert not any("ingest" in k or "evaluate" in k or "preprocess" in k for k in with_secrets)
    for name in with_secrets:
        got = {}
        for s in k8s[name]["secretAsEnv"]:
            secret = s.get("secretName") or s["secretNameParameter"]["runtimeValue"]["constant"]
            got[secret] = {m["secretKey"]: m["envVar"] for m in s["keyToEnv"]}
            assert not s.get("optional"), "a missing Secret must fail the pod, not run it without credentials"
        assert got == {"team-a-mlflow": {k: k for k in SECRET_KEYS["mlflow"]},
                       "team-a-s3": {k: k for k in SECRET_KEYS["s3"]}}, (name, got)
    # credentials are never pipeline parameters (KFP stores and shows those)
    params = ir["root"]["inputDefinitions"]["parameters"]
    assert not [p for p in params if any(w in p.lower() for w in ("password", "secret", "token", "key"))]
    # "" = no Secret (cloud IAM role / a server without auth): nothing mounted, resources kept
    _, k8s = _compile(tmp_path, {"secrets": {"mlflow": "", "s3": ""}})
    assert not any(v.get("secretAsEnv") for v in k8s.values())
    assert all(v.get("activeDeadlineSeconds") for v in k8s.values())


def test_resources_are_params_and_bad_values_are_config_errors(tmp_path: Path) -> None:
    from components.ops_params import params_from_dict
    from xct_core.errors import ConfigError

    custom = {"default": {"cpu_request": "250m", "cpu_limit": "1", "memory_request": "512Mi",
                          "memory_limit": "1Gi", "timeout_s": 600}}
    ir, k8s = _compile(tmp_path, {"resources": custom})
    ingest = ir["deploymentSpec"]["executors"]["exec-ingest-component"]["container"]["resources"]
    assert (ingest["resourceCpuRequest"], ingest["resourceMemoryLimit"]) == ("250m", "1Gi")
    assert k8s["exec-ingest-component"]["activeDeadlineSeconds"] == "600"
    assert k8s["exec-train-stage-component"]["activeDeadlineSeconds"] != "600", "other kinds keep their own"
    with pytest.raises(ConfigError, match="cpu_request 4 exceeds cpu_limit 2"):
        params_from_dict({"pipeline": {"kfp": {"resources": {"default": {"cpu_request": "4", "cpu_limit": "2"}}}}})
    with pytest.raises(ConfigError, match="memory_limit"):
        params_from_dict({"pipeline": {"kfp": {"resources": {"train": {"memory_limit": "lots"}}}}})
    with pytest.raises(ConfigError, match="timeout_s"):
        params_from_dict({"pipeline": {"kfp": {"resources": {"train": {"timeout_s": 0}}}}})
    with pytest.raises(ConfigError, match="evaluate"):
        params_from_dict({"pipeline": {"kfp": {"resources": {"evaluate": {}}}}})


def _task_inputs(ir: dict) -> dict[str, dict]:
    """Every task of the compiled DAG (nested condition groups included): name → its inputs."""
    found: dict[str, dict] = {}

    def walk(dag: dict) -> None:
        for name, task in dag.get("tasks", {}).items():
            found[name] = task.get("inputs", {}).get("parameters", {})
    walk(ir["root"]["dag"])
    for comp in ir["components"].values():
        walk(comp.get("dag", {}))
    return found


def test_the_run_id_reaches_cached_tasks_outside_their_cache_key(tmp_path: Path) -> None:
    """A KFP server keys a task's cache on its resolved inputs: the run's id or name as an input
    would make every train task a cache miss. On a cluster the tasks that open MLflow runs read
    the id from their pod's ``pipeline/runid`` label (``use_field_path_as_env``); only the task
    name (the same in every run) and the uncached exit task's id stay inputs. kfp.local (no pods,
    a cache keyed on the placeholder text) gets the placeholders as inputs."""
    from kfp import dsl

    from pipelines.kfp_dag import RUN_ID_FIELD, compile_pipeline

    ir, execs = _compile(tmp_path)
    run_unique = (dsl.PIPELINE_JOB_ID_PLACEHOLDER, dsl.PIPELINE_JOB_NAME_PLACEHOLDER)
    leaking = {name: k for name, ins in _task_inputs(ir).items() for k, v in ins.items()
               if any(p in str(v.get("runtimeValue", {}).get("constant", "")) for p in run_unique)}
    assert set(leaking) == {"run-summary-component"}, leaking  # the exit task: caching off
    assert ir["root"]["dag"]["tasks"]["run-summary-component"]["cachingOptions"].get("enableCache") is not True
    named = {name for name, ins in _task_inputs(ir).items() if "kfp_task_name" in ins}
    assert any(n.startswith("train-stage") for n in named) and any(n.startswith("register") for n in named)
    fields = {name: e["fieldPathAsEnv"] for name, e in execs.items() if "fieldPathAsEnv" in e}
    assert {n for n in fields if "train-stage" in n} and {n for n in fields if "register" in n}, sorted(fields)
    assert all(f == [{"name": "XCT_KFP_RUN_ID", "fieldPath": RUN_ID_FIELD}] for f in fields.values()), fields

    local = yaml.safe_load_all(compile_pipeline(tmp_path / "local.yaml", local=True).read_text())
    ins = _task_inputs(next(local))
    train = next(v for n, v in ins.items() if n.startswith("train-stage"))
    assert train["kfp_run_id"]["runtimeValue"]["constant"] == dsl.PIPELINE_JOB_ID_PLACEHOLDER
