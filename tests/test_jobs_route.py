"""The KFP train task on the Jobs-API route WITH run storage (issue 22 items 1-3): the task
(its component function, what its pod — or kfp.local — runs) publishes the processed data
to ``s3://bucket/prefix/<KFP run id>/`` and submits ``xct train --data-uri … --storage-uri …
--run-id …`` as a Ray job to a two-node token-auth cluster (tests/ray_cluster.py) whose
worker node runs in its own mount namespace: a private /tmp, the checkout's data/outputs
hidden — it shares no file system with the task. S3 = a moto server on 127.0.0.1, MLflow
= a real ``mlflow server`` (the isolated node's worker logs through HTTP).

The Ray job is stopped mid-training (``stop_job`` once a checkpoint is in the bucket: the
task fails with the job's status), then the task runs again (KFP's retry: a fresh pod, an
empty artifact folder) and resumes from the bucket: the same MLflow run, its logged steps
strictly increasing and none doubled, both nodes trained, checkpoints and models in the
bucket. One cluster, one moto server, one MLflow server for the module.

Plus a fast check that the compiled pipeline's train task receives ``pipeline.ray`` (the
address the route depends on) in its scoped params."""

from __future__ import annotations

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
RUN_ID = "kfp-jobs-1"  # the KFP run id: the run's folder, the same on a retry
XCT_COMMAND = f"{sys.executable} -m pipelines.cli"  # how the cluster's job starts xct (the image: `xct`)
#: where the evidence of a one-off run goes (XCT_JOBS_ROUTE_EVIDENCE=path; unset: nowhere)
EVIDENCE_ENV = "XCT_JOBS_ROUTE_EVIDENCE"


def _train_params_text(address: str, storage_uri: str, **ray: Any) -> tuple[Any, str]:
    from components.ops_params import params_from_dict
    from components.step_params import scoped_text

    params = tiny_params(train={"ray": {"num_workers": 2, "cpus_per_worker": 1.0, "max_failures": 0},
                                "val_reprojection": False})
    data = params.model_dump(mode="json")
    data["pipeline"] = {"ray": {"address": address, **ray}, "storage": {"uri": storage_uri}}
    ops = params_from_dict(data)
    return params, scoped_text(ops, "train", 1)  # what the pipeline hands the stage-1 train task


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
            params, _ = _train_params_text("", "")
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


def _stop_once_checkpointed(env: dict, run: str, done: threading.Event, found: dict) -> None:
    """Watcher thread: once a checkpoint of the job is in the bucket, stop the job (Jobs API)."""
    from ray.job_submission import JobSubmissionClient

    cluster = env["cluster"]
    client = JobSubmissionClient(cluster.dashboard_url, headers={"Authorization": f"Bearer {cluster.token}"})
    deadline = time.monotonic() + 240
    while not done.is_set() and time.monotonic() < deadline:
        ckpts = [k for k in _keys(env, f"{run}/ray/stage1/step_") if k.endswith(f"/{DIGEST_FILE}")]  # complete ones
        running = [j for j in client.list_jobs() if str(j.status.value) == "RUNNING"
                   and (j.metadata or {}).get("xct.job") == "xct-train-stage1"]
        if ckpts and running:
            found["job"], found["checkpoints"] = running[0].submission_id, sorted(ckpts)
            client.stop_job(running[0].submission_id)
            return
        time.sleep(0.3)
    found["error"] = "no checkpoint in the bucket while the job ran"


def test_kfp_train_task_on_the_jobs_route_resumes_from_the_bucket(env: dict, monkeypatch: pytest.MonkeyPatch) -> None:
    import mlflow
    from kfp import dsl

    from components.kfp_components import train_stage_component
    from components.ray_jobs import RayJobFailed

    t0 = time.monotonic()
    cluster = env["cluster"]
    storage_uri = f"s3://{BUCKET}/{PREFIX}"
    _, text = _train_params_text(cluster.dashboard_url, storage_uri, command=XCT_COMMAND, timeout_s=240.0)
    fn = train_stage_component.python_func
    run = f"{PREFIX}/{RUN_ID}"
    for k in ("MLFLOW_TRACKING_URI", "XCT_KFP_RUN_ID", "XCT_KFP_RUN_NAME", "XCT_KFP_TASK_NAME", "XCT_DATA_URI"):
        monkeypatch.setenv(k, "")  # the task sets them (restored after the test)
    monkeypatch.setenv("XCT_TRAIN_FAULTS", json.dumps({"slow_step_s": 1.0}))  # forwarded to the job: time to stop it

    # try 1: the Ray job is stopped once a checkpoint is in the bucket; the task fails
    done, found = threading.Event(), {}
    watcher = threading.Thread(target=_stop_once_checkpointed, args=(env, run, done, found), daemon=True)
    watcher.start()
    try:
        with pytest.raises(RayJobFailed, match="STOPPED") as ei:
            fn(stage=1, processed=dsl.Dataset(uri=str(env["processed"])), model=dsl.Model(uri=str(env["root"] / "try1")),
               params_yaml=text, mlflow_tracking_uri=env["mlflow"], kfp_run_id=RUN_ID, kfp_task_name="train-stage-1")
    finally:
        done.set()
        watcher.join(timeout=30)
    assert "error" not in found, found
    assert os.environ["XCT_KFP_RUN_ID"] == RUN_ID  # the run id the task took its folder from
    stopped_at = sorted({k.split("/")[4] for k in _keys(env, f"{run}/ray/stage1/step_")})
    print(f"try 1: ray job {found['job']} stopped ({str(ei.value)[:160]}…); checkpoints then: {stopped_at}")
    assert stopped_at and "step_00000006" not in stopped_at  # stopped mid-training
    ml = _doc(env, f"{run}/train/checkpoints/stage1/mlflow.json")

    # try 2 (KFP's retry: a fresh pod, an empty artifact folder): resumes from the bucket
    monkeypatch.delenv("XCT_TRAIN_FAULTS")
    retry = env["root"] / "try2"
    r = fn(stage=1, processed=dsl.Dataset(uri=str(env["processed"])), model=dsl.Model(uri=str(retry)),
           params_yaml=text, mlflow_tracking_uri=env["mlflow"], kfp_run_id=RUN_ID, kfp_task_name="train-stage-1")
    assert r.final_step == 6
    metrics = json.loads((retry / "metrics" / "stage1.json").read_text())
    assert metrics["step"] == 6 and metrics["start_step"] >= 2 and metrics["workers"] == 2, metrics
    assert (retry / "models" / "stage1" / "final.pt").is_file() and (retry / "plots" / "stage1" / "train.csv").is_file()
    assert not (retry / "checkpoints").exists() and not (retry / "ray").exists()  # nothing of the run in the pod

    # both nodes trained: the placement record and the MLflow run name the two nodes (IPs and ids)
    placement = _doc(env, f"{run}/train/checkpoints/stage1/ray_workers.json")["attempts"]
    ips = [sorted(w["node_ip"] for w in a["workers"]) for a in placement]
    assert ips[-1] == ["127.0.0.2", "127.0.0.3"], placement  # the isolated node (127.0.0.3) among them
    client = mlflow.MlflowClient(tracking_uri=env["mlflow"])
    ml2 = _doc(env, f"{run}/train/checkpoints/stage1/mlflow.json")
    assert ml2["run_id"] == ml["run_id"]  # the same MLflow run, continued
    mrun = client.get_run(ml["run_id"])
    assert mrun.info.status == "FINISHED" and mrun.data.tags.get("xct.resumed") == "true"
    assert set(mrun.data.tags["xct.ray_nodes"].split(",")) == {env["head_id"], env["worker_id"]}
    assert mrun.data.tags["kfp.run_id"] == RUN_ID and mrun.data.tags["kfp.task_name"] == "train-stage-1"  # lineage
    history = [(m.step, m.value) for m in client.get_metric_history(ml["run_id"], "train/loss")]
    steps = [s for s, _ in history]
    print("step log (MLflow train/loss of the resumed run): " + ", ".join(f"step {s}: {v:.4f}" for s, v in history))
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
    assert not inside(env["processed"]).exists() and not inside(retry).exists()  # … the task's files are not
    node_copies = list(inside(env["root"] / "head-cache" / "data").glob("*/manifest.json"))
    assert node_copies, "the isolated node holds no copy of the data from the bucket"
    took = time.monotonic() - t0
    print(f"stopped at {stopped_at[-1]}, resumed from step {metrics['start_step']}, finished step 6 in {took:.0f} s")
    if os.environ.get(EVIDENCE_ENV):
        Path(os.environ[EVIDENCE_ENV]).write_text(
            f"ray job {found['job']} stopped with checkpoints {stopped_at} in the bucket\n"
            f"retry: resumed from step {metrics['start_step']} → step {metrics['step']}, MLflow run {ml['run_id']}\n"
            f"placement (last attempt): {ips[-1]}; xct.ray_nodes = {mrun.data.tags['xct.ray_nodes']}\n"
            "step log (MLflow train/loss): " + ", ".join(f"step {s}: {v:.4f}" for s, v in history) + "\n"
            "bucket listing:\n" + "\n".join(keys) + "\n")
