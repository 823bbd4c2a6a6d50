"""The KFP train task on the Jobs-API route WITH run storage (issue 22 items 1-3), run by
kfp.local: a one-task pipeline (the processed data's importer → stage 1's
``train_stage_component``, wrapped by the DAG's own task controls —
:func:`pipelines.kfp_dag.task_controls`, so ``set_retry`` from ``pipeline.kfp.retries.train``),
compiled to IR YAML and run from it by kfp.local's SubprocessRunner, as ``xct pipeline run
--local`` does. The task publishes the processed data to ``s3://bucket/prefix/<KFP run id>/``
and submits ``xct train --data-uri … --storage-uri … --run-id …`` as a Ray job to a two-node
token-auth cluster (tests/ray_cluster.py) whose worker node runs in its own mount namespace: a
private /tmp, the checkout's data/outputs hidden — it shares no file system with the task.
S3 = a moto server on 127.0.0.1, MLflow = a real ``mlflow server`` (the isolated node's
worker logs through HTTP).

A watcher thread stops the Ray job mid-training (``stop_job`` once a checkpoint is in the
bucket): the task fails with the job's status, kfp.local retries it (its retry loop,
kfp/local/orchestrator/task_executor.py, honours the task's ``retry_policy``: the same run id,
a new task process) and the retry resumes from the bucket: the same MLflow run, its logged
steps strictly increasing and none doubled, both nodes trained, checkpoints and models in the
bucket, the task ran exactly twice and the pipeline run succeeded. One cluster, one moto
server, one MLflow server for the module.

Plus a fast check that the compiled pipeline's train task receives ``pipeline.ray`` (the
address the route depends on) in its scoped params.

No ``from __future__ import annotations`` (KFP reads the pipeline function's real annotations)."""

import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import yaml

from moto_server import MotoServer, isolate_aws_env
from train_fixtures import REPO, build_processed, tiny_params
from xct_core.checkpoint import DIGEST_FILE

BUCKET = "xct-jobs"
PREFIX = "runs"  # pipeline.storage.uri = s3://xct-jobs/runs
PIPELINE = "xct-jobs-route"  # the one-task pipeline; kfp.local's run id = "<PIPELINE>-<timestamp>"
#: the train task's KFP retries (pipeline.kfp.retries.train): 2 allowed, 1 needed; back-off 1 s
RETRY = {"num_retries": 2, "backoff_s": 1.0, "backoff_factor": 1.0, "backoff_max_s": 5.0}
XCT_COMMAND = f"{sys.executable} -m pipelines.cli"  # how the cluster's job starts xct (the image: `xct`)
#: where the evidence of a one-off run goes (XCT_JOBS_ROUTE_EVIDENCE=path; unset: nowhere)
EVIDENCE_ENV = "XCT_JOBS_ROUTE_EVIDENCE"


def _train_params_text(address: str, storage_uri: str, **ray: Any) -> tuple[Any, str, Any]:
    """(science params, the stage-1 train task's scoped params text, the ops params the
    pipeline is compiled with: its retries)."""
    from components.ops_params import params_from_dict
    from components.step_params import scoped_text

    params = tiny_params(train={"ray": {"num_workers": 2, "cpus_per_worker": 1.0, "max_failures": 0},
                                "val_reprojection": False})
    data = params.model_dump(mode="json")
    data["pipeline"] = {"ray": {"address": address, **ray}, "storage": {"uri": storage_uri},
                        "kfp": {"caching": False, "retries": {"train": RETRY}}}
    ops = params_from_dict(data)
    return params, scoped_text(ops, "train", 1), ops  # the text: what the pipeline hands the stage-1 train task


def test_the_compiled_train_task_receives_the_ray_address(tmp_path: Path) -> None:
    """pipeline.ray is in the train task's scoped params (components/step_params.py
    KFP_ONLY), so the compiled task takes the Jobs route: the compiled pipeline's params
    (its ``params_yaml`` default) cut by its stage-params task — what each train task's
    ``params_yaml`` input is wired to — carry the address, and the train component reads it
    from that text; the evaluate and gate texts do not carry it, nor does dvc.yaml's training."""
    from components.kfp_components import params_from_text, stage_params_component
    from components.ops_params import OpsParams, params_from_dict
    from components.step_params import dvc_entries, kfp_keys
    from pipelines.kfp_dag import compile_pipeline

    assert "pipeline.ray" in kfp_keys("train", ["stage1"], 1)
    assert not [e for e in dvc_entries("train", ["stage1"]) if isinstance(e, str) and e.startswith("pipeline.ray")]
    data = tiny_params().model_dump(mode="json")
    ray_cfg = {"address": "http://xct-ray-head-svc.xct:8265", "command": "xct", "timeout_s": 600.0}
    data["pipeline"] = {"ray": ray_cfg, "storage": {"uri": f"s3://{BUCKET}/{PREFIX}"}}
    spec = next(yaml.safe_load_all(compile_pipeline(tmp_path / "p.yaml", params_from_dict(data)).read_text()))
    whole = spec["root"]["inputDefinitions"]["parameters"]["params_yaml"]["defaultValue"]
    wiring: list[dict] = []
    for comp in [spec["root"], *spec["components"].values()]:
        for name, task in comp.get("dag", {}).get("tasks", {}).items():
            if name.startswith("train-stage-component"):
                wiring.append(task["inputs"]["parameters"]["params_yaml"]["taskOutputParameter"])
    assert len(wiring) == 2 and all(w["outputParameterKey"] == "train" and w["producerTask"].startswith(
        "stage-params-component") for w in wiring), wiring  # stages 1 and 2, each from its stage-params task
    for k in (1, 2):
        texts = stage_params_component.python_func(params_yaml=whole, stage=k)
        assert yaml.safe_load(texts.train)["pipeline"]["ray"] == ray_cfg
        task = params_from_text(texts.train, OpsParams, step="train", stage=k)  # what train_stage_component reads
        assert task.pipeline.ray.address == ray_cfg["address"] and task.pipeline.storage.uri == f"s3://{BUCKET}/{PREFIX}"
        for other in (texts.evaluate, texts.gate):
            assert "ray" not in (yaml.safe_load(other).get("pipeline") or {})


# --------------------------------------------------------------------------- the cluster route


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory):
    pytest.importorskip("ray")
    pytest.importorskip("mlflow")
    pytest.importorskip("psutil")
    if shutil.which("unshare") is None:
        pytest.skip("unshare (util-linux) is not installed")
    probe = subprocess.run(["unshare", "--user", "--map-root-user", "--mount", "--", "sh", "-c",
                            "mount -t tmpfs tmpfs /tmp"], capture_output=True, text=True, timeout=30)
    if probe.returncode != 0:
        pytest.skip(f"no unprivileged mount namespaces here: {probe.stderr.strip()[:200]}")
    from mlflow_server import MlflowServer
    from ray_cluster import RayCluster

    root = tmp_path_factory.mktemp("jobsroute")
    pythonpath = os.pathsep.join([str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])])
    with pytest.MonkeyPatch.context() as mp:
        isolate_aws_env(mp, tmp_path_factory.mktemp("aws"))
        server = MotoServer(tmp_path_factory.mktemp("moto-log")).start()
        srv = cluster = None
        try:
            server.client().create_bucket(Bucket=BUCKET)
            # the nodes inherit these (the cluster's own S3 endpoint and node caches)
            mp.setenv("XCT_S3_ENDPOINT_URL", server.url)
            mp.setenv("XCT_NODE_CACHE", str(root / "head-cache"))  # the isolated node's: in its private /tmp
            srv = MlflowServer(root / "mlflow", f"s3://{BUCKET}/mlflow", s3_endpoint=server.url).start()
            cluster = RayCluster(num_cpus=1, env={"PYTHONPATH": pythonpath})
            cluster.start(wait=False)
            params, _, _ = _train_params_text("", "")
            processed = build_processed(root, params, n_train=4, n_val=1)  # 2 workers × batch 2
            cluster.wait_alive(1)
            worker = cluster.add_worker(isolated=True)
            cluster.wait_alive(2)
            # the submitting task: the token (no RAY_ADDRESS: it talks HTTP to the dashboard)
            for k in ("RAY_ADDRESS", "RAY_AUTH_TOKEN_PATH"):
                mp.delenv(k, raising=False)
            for k, v in cluster.auth_env().items():
                mp.setenv(k, v)
            mp.setenv("XCT_NODE_CACHE", str(root / "task-cache"))
            yield {"root": root, "server": server, "cluster": cluster, "worker": worker, "processed": processed,
                   "mlflow": srv.url, "head_id": cluster.node_id(cluster.nodes[0]),
                   "worker_id": cluster.node_id(worker)}
        finally:
            if cluster is not None:
                cluster.stop()
            if srv is not None:
                srv.stop()
            server.stop()


def _keys(env: dict, prefix: str) -> list[str]:
    client = env["server"].client()
    out: list[str] = []
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=prefix):
        out += [o["Key"] for o in page.get("Contents", [])]
    return sorted(out)


def _doc(env: dict, key: str) -> Any:
    return json.loads(env["server"].client().get_object(Bucket=BUCKET, Key=key)["Body"].read())



def _stop_once_checkpointed(env: dict, done: threading.Event, found: dict) -> None:
    """Watcher thread: once a complete checkpoint of stage 1 is in the bucket (any run folder
    under ``PREFIX``: the run id is kfp.local's), stop the running Ray job (Jobs API, the
    cluster's token), wait until Ray reports it STOPPED, then record the checkpoints there."""
    from ray.job_submission import JobStatus, JobSubmissionClient

    cluster = env["cluster"]
    client = JobSubmissionClient(cluster.dashboard_url, headers={"Authorization": f"Bearer {cluster.token}"})
    deadline = time.monotonic() + 240
    while not done.is_set() and time.monotonic() < deadline:
        ckpts = [k for k in _keys(env, f"{PREFIX}/") if "/ray/stage1/step_" in k and k.endswith(f"/{DIGEST_FILE}")]
        running = [j for j in client.list_jobs() if j.status == JobStatus.RUNNING
                   and (j.metadata or {}).get("xct.job") == "xct-train-stage1"]
        if ckpts and running:
            job = running[0].submission_id
            found["job"], found["run"] = job, ckpts[0].split("/")[1]
            client.stop_job(job)
            # the fault plan only made the steps slow enough to stop one; the retry's process
            # (spawned after kfp.local's back-off) runs at full speed
            os.environ.pop("XCT_TRAIN_FAULTS", None)
            while time.monotonic() < deadline and client.get_job_status(job) != JobStatus.STOPPED:
                time.sleep(0.2)
            found["status"] = str(client.get_job_status(job).value)
            found["checkpoints"] = sorted({k.split("/")[4] for k in _keys(env, f"{PREFIX}/{found['run']}/ray/stage1/step_")})
            return
        time.sleep(0.3)
    found["error"] = "no checkpoint in the bucket while the job ran"


def _stage1_pipeline(ops: Any, out: Path) -> Any:
    """The smallest honest pipeline for stage 1: the processed data's importer → the SAME
    ``train_stage_component`` the DAG runs, both wrapped by the DAG's task controls
    (:func:`pipelines.kfp_dag.task_controls`: ``set_retry`` from ``pipeline.kfp.retries.train``,
    the Jobs-route train task); compiled to IR YAML, strictly parsed and loaded back — what
    ``run_local`` runs. The run id and task name come from KFP's placeholders (``local=True``)."""
    from kfp import compiler, components, dsl
    from kfp.dsl import Dataset

    from components.kfp_components import train_stage_component
    from pipelines.kfp_dag import load_pipeline_spec, task_controls

    ctl = task_controls(ops, local=True)

    @dsl.pipeline(name=PIPELINE)
    def stage1(processed_uri: str, params_yaml: str, mlflow_tracking_uri: str) -> None:
        data = ctl(dsl.importer(artifact_uri=processed_uri, artifact_class=Dataset, reimport=False))
        ctl(train_stage_component(stage=1, processed=data.output, params_yaml=params_yaml,
                                  mlflow_tracking_uri=mlflow_tracking_uri, **ctl.lineage), "train")

    compiler.Compiler().compile(pipeline_func=stage1, package_path=str(out))
    spec, _ = load_pipeline_spec(out)
    retry = [t.retry_policy for t in spec.root.dag.tasks.values() if t.component_ref.name.startswith("comp-train-stage")]
    assert len(retry) == 1 and retry[0].max_retry_count == RETRY["num_retries"], retry  # set_retry compiled in
    return components.load_component_from_file(str(out))


def test_kfp_pipeline_on_the_jobs_route_retries_and_resumes_from_the_bucket(
        env: dict, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
        caplog: pytest.LogCaptureFixture) -> None:
    import logging
    import re
    import tempfile
    import warnings

    import mlflow
    from kfp import local
    from kfp.local import config as local_config

    t0 = time.monotonic()
    cluster = env["cluster"]
    storage_uri = f"s3://{BUCKET}/{PREFIX}"
    _, text, ops = _train_params_text(cluster.dashboard_url, storage_uri, command=XCT_COMMAND, timeout_s=240.0)
    kfp_root = env["root"] / "kfp"
    pipeline = _stage1_pipeline(ops, env["root"] / "pipeline.yaml")
    for k in ("MLFLOW_TRACKING_URI", "XCT_KFP_RUN_ID", "XCT_KFP_RUN_NAME", "XCT_KFP_TASK_NAME", "XCT_DATA_URI"):
        monkeypatch.setenv(k, "")  # the task sets them from its inputs
    monkeypatch.setenv("XCT_TRAIN_FAULTS", json.dumps({"slow_step_s": 1.0}))  # forwarded to the job: time to stop it
    (kfp_root / "tmp").mkdir(parents=True)
    monkeypatch.setenv("TMPDIR", str(kfp_root / "tmp"))  # kfp.local leaves its per-task temp folders
    monkeypatch.setattr(tempfile, "tempdir", None)
    caplog.set_level(logging.INFO)  # kfp.local logs its retries to the root logger, outside its own log context
    monkeypatch.setattr(local_config.LocalExecutionConfig, "instance", None)  # this test's kfp.local config, undone after
    local.init(runner=local.SubprocessRunner(use_venv=False), pipeline_root=str(kfp_root), raise_on_error=True,
               workspace_root=str(kfp_root / "workspace"), enable_caching=False)

    done, found = threading.Event(), {}
    watcher = threading.Thread(target=_stop_once_checkpointed, args=(env, done, found), daemon=True)
    watcher.start()
    try:
        with warnings.catch_warnings():  # the pods' resources, deadline, secrets: a cluster's business
            warnings.filterwarnings("ignore", message=r".*have no effect in the current local runner")
            pipeline(processed_uri=str(env["processed"]), params_yaml=text, mlflow_tracking_uri=env["mlflow"])
    finally:
        done.set()
        watcher.join(timeout=30)
        # kfp.local's log (coloured; its task logs to stdout, its retry loop's to the root logger), the tasks' output
        log = re.sub(r"\x1b\[[0-9;]*m", "", capsys.readouterr().out + caplog.text)
        print(log[-20000:])  # shown when the test fails
    assert "error" not in found and found.get("status") == "STOPPED", found

    # KFP's retry: the train task ran twice (kfp.local's retry loop), the pipeline run succeeded
    assert log.count("Executing task 'train-stage-component'") == 2, log[-6000:]
    assert "Task train-stage-component failed (attempt 1/3). Retrying in 1.0s" in log
    assert f"ray job {found['job']} STOPPED after" in log  # attempt 1 failed with the Ray job's status …
    assert re.search(rf"Pipeline '{PIPELINE}' finished with status SUCCESS", log), log[-3000:]  # … the run did not
    runs = [p.name for p in kfp_root.iterdir() if p.name.startswith(f"{PIPELINE}-")]
    assert len(runs) == 1, runs  # one pipeline run (kfp.local's folder <pipeline>-<timestamp>) …
    run_id = found["run"]  # … whose run id (PIPELINE_JOB_ID_PLACEHOLDER, kfp.local: a random number) names the
    assert f"'run_uri': '{storage_uri}/{run_id}'" in log  # run's folder in the bucket: the retry's output says so
    run = f"{PREFIX}/{run_id}"
    stopped_at = found["checkpoints"]
    print(f"try 1: ray job {found['job']} {found['status']}; checkpoints then: {stopped_at}")
    assert stopped_at and "step_00000006" not in stopped_at  # stopped mid-training

    # the task's output (the retry's): resumed from the bucket; nothing of the run in the task's folder
    retry = kfp_root / runs[0] / "train-stage-component" / "model"
    metrics = json.loads((retry / "metrics" / "stage1.json").read_text())
    assert metrics["step"] == 6 and metrics["start_step"] >= 2 and metrics["workers"] == 2, metrics
    assert f"step_{metrics['start_step']:08d}" in stopped_at, (metrics, stopped_at)  # from the newest it had then
    assert (retry / "models" / "stage1" / "final.pt").is_file() and (retry / "plots" / "stage1" / "train.csv").is_file()
    assert not (retry / "checkpoints").exists() and not (retry / "ray").exists()

    # both nodes trained: the placement record and the MLflow run name the two nodes (IPs and ids)
    placement = _doc(env, f"{run}/train/checkpoints/stage1/ray_workers.json")["attempts"]
    ips = [sorted(w["node_ip"] for w in a["workers"]) for a in placement]
    assert ips[-1] == ["127.0.0.2", "127.0.0.3"], placement  # the isolated node (127.0.0.3) among them
    client = mlflow.MlflowClient(tracking_uri=env["mlflow"])
    ml = _doc(env, f"{run}/train/checkpoints/stage1/mlflow.json")
    mrun = client.get_run(ml["run_id"])
    assert mrun.info.status == "FINISHED" and mrun.data.tags.get("xct.resumed") == "true"  # one run, continued
    assert set(mrun.data.tags["xct.ray_nodes"].split(",")) == {env["head_id"], env["worker_id"]}
    assert mrun.data.tags["kfp.run_id"] == run_id and mrun.data.tags["kfp.task_name"] == "train-stage-component"
    history = [(m.step, m.value) for m in client.get_metric_history(ml["run_id"], "train/loss")]
    steps = [s for s, _ in history]
    step_log = ", ".join(f"step {s}: {v:.4f}" for s, v in history)
    print("step log (MLflow train/loss of the resumed run): " + step_log)
    assert steps == sorted(set(steps)) == [2, 4, 6], history  # strictly increasing, none doubled

    keys = _keys(env, f"{run}/")
    print("\n".join(["bucket listing of the run:", *keys]))
    assert {f"{run}/ray/stage1/step_00000006/state.pt", f"{run}/train/models/stage1/final.pt",
            f"{run}/train/models/stage1/best.pt", f"{run}/train/metrics/stage1.json"} <= set(keys)
    assert any(k.startswith(f"{run}/processed/") for k in keys)  # the data the job read: published by the task

    # the isolated node really has no view of the task's files (its mount namespace, seen through
    # /proc/<its raylet>/root), and its workers took their data copy from the bucket into its private /tmp
    view = Path(f"/proc/{cluster.raylet(env['worker']).pid}/root")
    inside = lambda p: view / str(p).lstrip("/")  # noqa: E731
    assert inside(REPO / "pyproject.toml").exists()  # the code (the image) is there …
    assert not inside(env["processed"]).exists() and not inside(kfp_root).exists()  # … the task's files are not
    node_copies = list(inside(env["root"] / "head-cache" / "data").glob("*/manifest.json"))
    assert node_copies, "the isolated node holds no copy of the data from the bucket"
    took = time.monotonic() - t0
    print(f"stopped at {stopped_at[-1]}, resumed from step {metrics['start_step']}, finished step 6 in {took:.0f} s")
    if os.environ.get(EVIDENCE_ENV):
        ckpt_keys = [k for k in keys if k.startswith(f"{run}/ray/stage1/")]
        marks = ("Executing task 'train-stage-component'", "train-stage-component failed (attempt",
                 f"ray job {found['job']} STOPPED", "Task 'train-stage-component' finished", f"Pipeline '{PIPELINE}' finished")
        attempts = [ln.strip()[:300] for ln in log.splitlines() if any(m in ln for m in marks)]
        Path(os.environ[EVIDENCE_ENV]).write_text(
            f"kfp.local run {runs[0]}, KFP run id {run_id} (pipeline {PIPELINE}: importer → train_stage_component, "
            f"set_retry {RETRY})\n"
            "kfp.local's log of the train task's attempts:\n" + "\n".join(f"  {a}" for a in attempts) + "\n"
            f"ray job {found['job']} {found['status']} with checkpoints {stopped_at} in the bucket\n"
            f"retry: resumed from step {metrics['start_step']} → step {metrics['step']}, MLflow run {ml['run_id']}\n"
            f"placement (last attempt): {ips[-1]}; xct.ray_nodes = {mrun.data.tags['xct.ray_nodes']}\n"
            f"step log (MLflow train/loss): {step_log}\n"
            "bucket listing of the checkpoints (s3://" + BUCKET + "/…):\n" + "\n".join(ckpt_keys) + "\n"
            "bucket listing of the run:\n" + "\n".join(keys) + "\n")
