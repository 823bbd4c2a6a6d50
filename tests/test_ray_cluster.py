"""The cluster path for real: a two-node Ray cluster (separate `ray start` processes, one CPU
each, 127.0.0.2 head / 127.0.0.3 worker; tests/ray_cluster.py) with Ray token authentication
on, and the `xct` commands joined to it through ``RAY_ADDRESS`` and the cluster's token
(``RAY_AUTH_TOKEN``: ``cluster.client_env()``), each as its own process, as a user runs them.
(The Jobs-API route and the refusal of calls without the token: tests/test_ray_jobs.py.)

* `xct step preprocess` with ``preprocess.use_ray: true``: Ray Data's tasks ran on both
  nodes, and the folder is the same as the process pool's.
* `xct hpo --stage 1 --trials 2` (2 concurrent trials of 1 CPU): one trial per node (the
  ``xct.ray_node_id`` tag of each trial's MLflow run).
* `xct train --stage 1` (NOT ``--local``: Ray Train, 2 workers of 1 CPU, so they must land
  on different nodes), then the worker node's raylet is SIGKILLed mid-run. The platform's
  answer to a dead node is a replacement node (what KubeRay does for a dead worker pod),
  so the test starts a new worker node (127.0.0.4) right after the kill; Ray Train (``FailureConfig``) restarts the worker group on it from the last
  checkpoint, with the same world size. Proof: ``ray_workers.json`` / the MLflow tags name
  the nodes of each attempt, and the loss history and train.csv have every logged step once.

Elastic training (``ScalingConfig(num_workers=(1, 2))``, carrying on with 1 worker on the
head) was not chosen: the data-parallel world size is part of the recipe (global batch =
batch_size × workers, the checkpoint records it), so a resumed run that silently halves it
is not the same run.

The cluster is the one this module shares with tests/test_ray_jobs.py (the
``shared_ray_cluster`` fixture, tests/conftest.py: started once, stopped after the last test
that uses it, also when a test fails; its worker shares the driver's disk); the node-kill test
leaves it with the head and the replacement node, two ALIVE nodes, which is what the next
module is handed. Every wait is bounded.
"""

from __future__ import annotations

import csv
import json
import os
import re
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import yaml

from train_fixtures import REPO, build_processed, tiny_params
from components.ops_params import OpsParams as Params
from components.ops_params import params_from_dict
from xct_core.layout import RunLayout
from xct_core.preprocess import read_manifest

ray = pytest.importorskip("ray")
mlflow = pytest.importorskip("mlflow")
pytest.importorskip("psutil")

from ray_cluster import RayCluster  # noqa: E402  (after the importorskip of ray)

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

#: the node started after the worker node's raylet is killed
REPLACEMENT_IP = "127.0.0.4"
TRAIN_STEPS = 8


def _with(params: Params, **sections: dict[str, Any]) -> Params:
    data = params.model_dump(mode="json")
    for key, val in sections.items():
        data[key] = {**data[key], **val}
    return params_from_dict(data, "test params")


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory, shared_ray_cluster: RayCluster):
    root = tmp_path_factory.mktemp("cluster")
    params = tiny_params(train={"ray": {"num_workers": 2, "cpus_per_worker": 1.0, "max_failures": 1},
                                "val_reprojection": False})
    cluster = shared_ray_cluster
    processed = build_processed(root, params)  # the process pool's folder (the reference)
    nodes = cluster.wait_alive(2)
    (worker,) = [n for n in cluster.nodes if not n.head and not n.killed and n.ip in nodes.values()]
    child = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "XCT_"))}
    child.update(cluster.client_env(), OMP_NUM_THREADS="1", MLFLOW_TRACKING_URI=f"sqlite:///{root / 'mlflow.db'}",
                 PYTHONUNBUFFERED="1")
    return {"root": root, "params": params, "processed": processed, "cluster": cluster, "worker": worker,
            "head_id": cluster.node_id(cluster.nodes[0]), "worker_id": cluster.node_id(worker), "nodes": nodes,
            "child": child, "uri": child["MLFLOW_TRACKING_URI"]}


def _dump(env: dict, name: str, params: Params) -> Path:
    path = env["root"] / name
    path.write_text(yaml.safe_dump(params.model_dump(mode="json"), sort_keys=False))
    return path


def _xct(env: dict, args: list[str], timeout_s: float = 150) -> str:
    """``xct ARGS`` as its own process joined to the cluster through RAY_ADDRESS; its output."""
    proc = subprocess.run([sys.executable, "-m", "pipelines.cli", *map(str, args)], cwd=REPO,
                          env=env["child"], capture_output=True, text=True, timeout=timeout_s)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"xct {' '.join(map(str, args))} exited {proc.returncode}:\n{out[-4000:]}"
    return out


def _client(env: dict):
    return mlflow.MlflowClient(tracking_uri=env["uri"])


def test_cluster_has_two_nodes_on_their_own_addresses(env: dict) -> None:
    assert sorted(env["nodes"].values()) == ["127.0.0.2", "127.0.0.3"]
    assert env["head_id"] != env["worker_id"]


def test_preprocess_ray_data_runs_on_both_nodes(env: dict) -> None:
    params = _with(env["params"], preprocess={"use_ray": True})
    out = env["root"] / "processed_ray"
    text = _xct(env, ["step", "preprocess", "--volumes", env["root"] / "volumes", "--splits", env["root"] / "splits.json",
                      "--out", out, "--params", _dump(env, "params_pre.yaml", params), "--no-progress"])
    m = re.search(r"Ray Data ran (\d+) item\(s\) on (\d+) node\(s\): (.*)", text)
    assert m, text[-3000:]
    per_node = dict(re.findall(r"([0-9a-f]{56}) \((\d+)\)", m.group(3)))
    assert set(per_node) == {env["head_id"], env["worker_id"]}, (per_node, env["nodes"])  # both nodes worked
    assert sum(map(int, per_node.values())) == int(m.group(1)) == len(read_manifest(env["processed"])["items"])
    assert read_manifest(out)["items"] == read_manifest(env["processed"])["items"]  # same data as the pool's


def test_hpo_two_trials_run_one_per_node(env: dict) -> None:
    root = env["root"]
    point = {"stages.{stage}.lr": 2e-3, "stages.{stage}.lift_channels": 4}
    params = _with(env["params"], hpo={
        "storage": f"sqlite:///{root / 'optuna.db'}", "out_dir": str(root / "hpo"), "steps": {"stage1": 4},
        "val_every": 2, "scheduler": "median", "grace_rounds": 1, "min_samples": 2, "max_concurrent_trials": 2,
        "cpus_per_trial": 1.0, "points": [point, point],
        "space": {"stages.{stage}.lr": {"type": "float", "low": 1e-4, "high": 3e-3, "log": True},
                  "stages.{stage}.lift_channels": {"type": "categorical", "choices": [2, 4]}},
    })
    _xct(env, ["hpo", "--stage", "1", "--trials", "2", "--params", _dump(env, "params_hpo.yaml", params),
               "--processed", env["processed"]])
    client = _client(env)
    exp = client.get_experiment_by_name(params.hpo.experiment)
    trials = client.search_runs([exp.experiment_id], filter_string="tags.`xct.kind` = 'hpo_trial'")
    assert len(trials) == 2
    assert {t.data.tags.get("xct.trial_state") for t in trials} == {"COMPLETE"}
    assert {t.data.tags.get("xct.ray_node_id") for t in trials} == {env["head_id"], env["worker_id"]}


def _timestamped_copy(proc: subprocess.Popen[bytes], log: Path) -> threading.Thread:
    """Copy ``proc``'s output to ``log``, each line prefixed with the seconds since its start
    (what happened when, around the kill, is the first question when this test fails)."""
    t0 = time.monotonic()

    def run() -> None:
        assert proc.stdout is not None
        with open(log, "w") as fh:
            for line in iter(proc.stdout.readline, b""):
                fh.write(f"[{time.monotonic() - t0:7.2f}s] {line.decode(errors='replace')}")
                fh.flush()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


def _ray_latest_step(snapshot: Path) -> int:
    """The step of the latest checkpoint Ray Train has registered (0: none yet)."""
    try:
        doc = json.loads(snapshot.read_text())
        return int(doc["latest_checkpoint_result"]["checkpoint_dir_name"].removeprefix("step_"))
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return 0


def _steps_csv(path: Path) -> list[int]:
    with open(path, newline="") as f:
        return [int(float(r["step"])) for r in csv.DictReader(f)]


def test_train_on_both_nodes_survives_a_killed_raylet(env: dict) -> None:
    cluster: RayCluster = env["cluster"]
    out = env["root"] / "train"
    pfile = _dump(env, "params_train.yaml", env["params"])
    cmd = [sys.executable, "-m", "pipelines.cli", "train", "--stage", "1", "--processed", str(env["processed"]),
           "--out", str(out), "--params", str(pfile), "--steps", str(TRAIN_STEPS)]
    log = env["root"] / "train_driver.log"
    faults = {"XCT_TRAIN_FAULTS": json.dumps({"slow_step_s": 1.0})}  # time to kill the node mid-run
    layout = RunLayout(out, 1)
    snapshot = out / "ray" / "stage1" / "checkpoint_manager_snapshot.json"  # what Ray Train restores from
    proc = subprocess.Popen(cmd, cwd=REPO, env={**env["child"], **faults}, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT)
    copier = _timestamped_copy(proc, log)
    try:
        deadline = time.monotonic() + 120
        while _ray_latest_step(snapshot) < 4:  # registered by Ray (not only written)
            assert proc.poll() is None, f"driver exited early:\n{log.read_text()[-4000:]}"
            assert time.monotonic() < deadline, f"no checkpoint 4 in time:\n{log.read_text()[-4000:]}"
            time.sleep(0.2)
        cluster.kill_raylet(env["worker"])
        replacement = cluster.add_worker(REPLACEMENT_IP)  # what KubeRay does for a dead worker pod
        new_id = cluster.node_id(replacement)
        cluster.wait_for(lambda nodes: env["worker_id"] not in nodes, "the killed node declared dead")
        code = proc.wait(timeout=150)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=30)
    copier.join(timeout=30)
    text = log.read_text()
    assert code == 0, text[-4000:]

    attempts = json.loads((layout.checkpoints / "ray_workers.json").read_text())["attempts"]
    first, last = attempts[0], attempts[-1]
    # attempt 1: two workers, one per node (each node has 1 CPU, each worker needs 1)
    assert first["ray_checkpoint"] is None
    assert sorted(w["node_id"] for w in first["workers"]) == sorted([env["head_id"], env["worker_id"]]), first
    assert sorted(w["node_ip"] for w in first["workers"]) == ["127.0.0.2", "127.0.0.3"]
    # the retried group (after the node died): resumed from a checkpoint, on the head + the new node
    assert len(attempts) >= 2, attempts
    assert last["ray_checkpoint"] is not None and int(last["ray_checkpoint"].removeprefix("step_")) >= 4, last
    assert sorted(w["node_id"] for w in last["workers"]) == sorted([env["head_id"], new_id]), last

    summary = json.loads(layout.metrics_file.read_text())
    assert summary["step"] == TRAIN_STEPS and summary["start_step"] >= 4 and summary["workers"] == 2
    logged = list(range(2, TRAIN_STEPS + 1, 2))  # log_every 2: every logged step once, none missing
    assert _steps_csv(layout.plots / "train.csv") == logged
    run_id = json.loads(layout.mlflow_state.read_text())["run_id"]
    client = _client(env)
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert [m.step for m in sorted(client.get_metric_history(run_id, "train/loss"), key=lambda m: m.step)] == logged
    assert set(run.data.tags["xct.ray_nodes"].split(",")) == {env["head_id"], env["worker_id"], new_id}
    assert int(run.data.tags["xct.ray_attempts"]) == len(attempts)
    assert "ray/ray_workers.json" in {a.path for a in client.list_artifacts(run_id, "ray")}
    assert f"ran on 3 node(s) in {len(attempts)} attempt(s)" in text
