"""Run storage by URI (issue 22 item 2): stage training whose data, checkpoints and models
live in an S3 bucket (a real moto server on 127.0.0.1), on a real Ray runtime, tracked in
real MLflow (sqlite); a killed ``xct train`` re-run with the same run id resumes from the
bucket.

One moto server, one Ray runtime and one MLflow store for the module. ``xct train`` runs as
its own process joined to the Ray runtime (RAY_ADDRESS), with its own node cache
(``$XCT_NODE_CACHE``), so what the Ray workers read and write (the runtime's node cache,
set before ``ray.init``) is told apart from what the driver does: the workers' data copy
must come from the bucket, and the driver's ``--out`` folder stays untouched.

The KFP train task on run storage (a retried task resumes from the bucket) and two nodes that
share no disk are tested together in tests/test_jobs_route.py (the Jobs-API route, the worker
node in its own mount namespace), not again here: one two-node cluster less in the suite."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

from moto_server import MotoServer, aws_env, free_port, isolate_aws_env  # noqa: F401 (aws_env: a fixture)
from train_fixtures import REPO, build_processed, tiny_params
from xct_core.checkpoint import DIGEST_FILE

ray = pytest.importorskip("ray")
mlflow = pytest.importorskip("mlflow")

pytestmark = [pytest.mark.timeout(400)]

BUCKET = "xct-runs"
PREFIX = "exp"  # pipeline.storage.uri = s3://xct-runs/exp


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("runstore")
    ray_tmp = Path(tempfile.mkdtemp(prefix="xs-", dir="/tmp"))
    worker_cache, driver_cache = root / "worker-cache", root / "driver-cache"
    with pytest.MonkeyPatch.context() as mp:
        aws = isolate_aws_env(mp, tmp_path_factory.mktemp("aws"))
        server = MotoServer(tmp_path_factory.mktemp("moto-log")).start()
        try:
            mp.setenv("XCT_S3_ENDPOINT_URL", server.url)
            mp.setenv("RAY_TMPDIR", str(ray_tmp))
            mp.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{root / 'mlflow.db'}")
            mp.setenv("XCT_NODE_CACHE", str(worker_cache))  # the Ray workers' node cache (inherited by the raylet)
            server.client().create_bucket(Bucket=BUCKET)
            params = tiny_params(train={"ray": {"num_workers": 2, "max_failures": 1}})
            processed = build_processed(root, params)
            pfile = root / "params.yaml"
            pfile.write_text(yaml.safe_dump(params.model_dump(mode="json")))
            ray.init(num_cpus=4, log_to_driver=False)
            child = {**os.environ, "RAY_ADDRESS": ray.get_runtime_context().gcs_address,
                     "XCT_NODE_CACHE": str(driver_cache)}
            try:
                yield {"root": root, "server": server, "params": params, "pfile": pfile, "processed": processed,
                       "uri": os.environ["MLFLOW_TRACKING_URI"], "child": child, "aws": aws,
                       "worker_cache": worker_cache, "driver_cache": driver_cache}
            finally:
                ray.shutdown()
        finally:
            server.stop()
            shutil.rmtree(ray_tmp, ignore_errors=True)


def _keys(env: dict, prefix: str) -> list[str]:
    """Every key below ``prefix`` in the bucket (a listing, as an operator would take it)."""
    client = env["server"].client()
    out: list[str] = []
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=prefix):
        out += [o["Key"] for o in page.get("Contents", [])]
    return sorted(out)


def _train_cmd(env: dict, run_id: str, processed: str, *extra: str) -> list[str]:
    data = ["--data-uri", processed] if processed.startswith("s3://") else ["--processed", processed]
    return [sys.executable, "-m", "pipelines.cli", "train", "--stage", "1", *data,
            "--params", str(env["pfile"]), "--out", str(env["root"] / f"out-{run_id}"),
            "--storage-uri", f"s3://{BUCKET}/{PREFIX}", "--run-id", run_id, *extra]


def _xct(env: dict, cmd: list[str], extra_env: dict[str, str] | None = None, timeout_s: float = 240) -> str:
    proc = subprocess.run(cmd, cwd=REPO, env={**env["child"], **(extra_env or {})}, capture_output=True, text=True,
                          timeout=timeout_s)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"{' '.join(cmd[3:])} exited {proc.returncode}:\n{out[-4000:]}"
    return out


def _client(env: dict) -> Any:
    return mlflow.MlflowClient(tracking_uri=env["uri"])


def _history(env: dict, run_id: str, key: str = "train/loss") -> list[int]:
    return sorted(m.step for m in _client(env).get_metric_history(run_id, key))


def _object(env: dict, key: str, dest: Path) -> Path:
    env["server"].client().download_file(BUCKET, key, str(dest))
    return dest


def test_stage1_trains_with_data_checkpoints_and_models_in_the_bucket(env: dict) -> None:
    run = f"{PREFIX}/run-a"
    out = _xct(env, _train_cmd(env, "run-a", str(env["processed"])))
    keys = _keys(env, run + "/")
    print("\n".join(["bucket listing:", *keys]))
    # the processed data was published to the run and read from there
    assert f"{run}/processed/manifest.json" in keys
    # Ray Train persisted the checkpoints (keep_last 2), each with its digest file
    ckpts = sorted({k.split("/")[4] for k in keys if k.startswith(f"{run}/ray/stage1/step_")})
    assert ckpts == ["step_00000004", "step_00000006"]
    for c in ckpts:
        assert {f"{run}/ray/stage1/{c}/state.pt", f"{run}/ray/stage1/{c}/{DIGEST_FILE}"} <= set(keys)
    # the exported models, curves, metrics and the placement record are in the run's train/ folder
    for rel in ("models/stage1/final.pt", "models/stage1/best.pt", "metrics/stage1.json", "plots/stage1/train.csv",
                "checkpoints/stage1/mlflow.json", "checkpoints/stage1/ray_workers.json", "mlflow_pipeline.json"):
        assert f"{run}/train/{rel}" in keys, rel
    final = torch.load(_object(env, f"{run}/train/models/stage1/final.pt", env["root"] / "final.pt"), weights_only=True)
    assert final["step"] == 6
    state = torch.load(_object(env, f"{run}/ray/stage1/step_00000006/state.pt", env["root"] / "s6.pt"),
                       weights_only=True)
    assert state["step"] == 6 and state["world_size"] == 2
    # nothing of the run was written to the driver's --out folder; the CLI names the model's URI
    assert not (env["root"] / "out-run-a").exists()
    assert f"s3://{BUCKET}/{run}/train/models/stage1/final.pt" in out
    # the Ray workers read the shards through the URI: their node cache holds the bucket's copy
    copies = list((env["worker_cache"] / "data").glob("*/manifest.json"))
    assert len(copies) == 1 and json.loads((copies[0].parent / ".complete").read_text())["source"] == \
        f"s3://{BUCKET}/{run}/processed"
    metrics = json.loads(_object(env, f"{run}/train/metrics/stage1.json", env["root"] / "m.json").read_text())
    assert metrics["step"] == 6 and metrics["start_step"] == 0 and metrics["workers"] == 2
    mlrun = json.loads(_object(env, f"{run}/train/checkpoints/stage1/mlflow.json", env["root"] / "ml.json").read_text())
    r = _client(env).get_run(mlrun["run_id"])
    assert r.info.status == "FINISHED" and r.data.tags["xct.run_uri"] == f"s3://{BUCKET}/{run}"
    assert _history(env, mlrun["run_id"]) == [2, 4, 6]


def _alive_train_actors_of_other_jobs() -> list[str]:
    from ray.util.state import list_actors

    ctx = ray.get_runtime_context()
    alive = list_actors(address=ctx.gcs_address, filters=[("state", "=", "ALIVE")])
    return [a.class_name for a in alive if "Train" in (a.class_name or "") and a.job_id != ctx.get_job_id()]


def test_killed_train_rerun_with_the_same_run_id_resumes_from_the_bucket(env: dict) -> None:
    """SIGKILL of ``xct train`` once checkpoint 4 is in the bucket; the same command again
    (the data given as a URI: no local folder at all) resumes there, in the same MLflow run,
    its logged steps continuous and none doubled. Then the newest checkpoint in the bucket
    is damaged: a further re-run warns, falls back to the older one and finishes."""
    from components.run_storage import RunStorage
    from components.s3sync import push
    from components.ops_params import S3Params

    run = f"{PREFIX}/run-b"
    data_uri = f"s3://{BUCKET}/datasets/processed"
    push(env["processed"], data_uri, S3Params())
    cmd = _train_cmd(env, "run-b", data_uri, "--steps", "8")
    log = env["root"] / "kill.log"
    with open(log, "w") as fh:
        proc = subprocess.Popen(cmd, cwd=REPO, env={**env["child"], "XCT_TRAIN_FAULTS": json.dumps({"slow_step_s": 1.0})},
                                stdout=fh, stderr=subprocess.STDOUT)
    target = f"{run}/ray/stage1/step_00000004/{DIGEST_FILE}"
    deadline = time.monotonic() + 240
    try:
        while target not in _keys(env, f"{run}/ray/stage1/step_00000004/"):
            assert proc.poll() is None, f"xct train exited early:\n{log.read_text()[-3000:]}"
            assert time.monotonic() < deadline, f"no checkpoint 4 in the bucket in time:\n{log.read_text()[-3000:]}"
            time.sleep(0.3)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    killed_at = sorted({k.split("/")[4] for k in _keys(env, f"{run}/ray/stage1/step_")})
    print(f"checkpoints in the bucket when killed: {killed_at}")
    deadline = time.monotonic() + 90  # the dead driver's job (controller + workers) is torn down
    while _alive_train_actors_of_other_jobs():
        assert time.monotonic() < deadline, f"train actors still alive: {_alive_train_actors_of_other_jobs()}"
        time.sleep(0.5)
    ml = json.loads(_object(env, f"{run}/train/checkpoints/stage1/mlflow.json", env["root"] / "mlb.json").read_text())
    assert _client(env).get_run(ml["run_id"]).info.status == "RUNNING"  # the killed driver never ended it

    out = _xct(env, cmd)
    print(out)
    metrics = json.loads(_object(env, f"{run}/train/metrics/stage1.json", env["root"] / "mb.json").read_text())
    assert metrics["start_step"] >= 4 and metrics["step"] == 8
    assert "(resumed)" in out and ml["run_id"] in out  # the same MLflow run, continued
    r = _client(env).get_run(ml["run_id"])
    assert r.info.status == "FINISHED" and r.data.tags.get("xct.resumed") == "true"
    steps = [(m.step, m.value) for m in _client(env).get_metric_history(ml["run_id"], "train/loss")]
    print(f"MLflow train/loss history of the resumed run: {sorted(steps)}")
    assert sorted(s for s, _ in steps) == [2, 4, 6, 8]  # continuous, none doubled
    keys = _keys(env, f"{run}/")
    print("\n".join(["bucket listing after the resume:", *keys]))
    in_bucket = sorted({k.split("/")[4] for k in keys if k.startswith(f"{run}/ray/stage1/step_")})
    assert in_bucket[-2:] == ["step_00000006", "step_00000008"]  # (Ray may keep the killed run's older one too)
    final = torch.load(_object(env, f"{run}/train/models/stage1/final.pt", env["root"] / "fb.pt"), weights_only=True)
    assert final["step"] == 8
    assert not (env["root"] / "out-run-b").exists() and not any(k.startswith(f"{run}/processed/") for k in keys)

    # damage the newest checkpoint in the bucket: the digest check refuses it, resume falls back to step 6
    env["server"].client().put_object(Bucket=BUCKET, Key=f"{run}/ray/stage1/step_00000008/state.pt", Body=b"garbage")
    storage = RunStorage.for_run(f"s3://{BUCKET}/{PREFIX}", "run-b", S3Params())
    assert storage.checkpoint_dirs("stage1")[-2:] == ["step_00000006", "step_00000008"]
    out = _xct(env, _train_cmd(env, "run-b", data_uri, "--steps", "10"))
    assert "step_00000008" in out and "resuming from" in out and "(step 6)" in out, out[-3000:]
    metrics = json.loads(_object(env, f"{run}/train/metrics/stage1.json", env["root"] / "mc.json").read_text())
    assert metrics["start_step"] == 6 and metrics["step"] == 10


def test_bad_storage_settings_are_one_line_errors(env: dict) -> None:
    from cli_run import xct

    base = ["train", "--stage", "1", "--processed", str(env["processed"]), "--params", str(env["pfile"])]
    assert xct([*base, "--storage-uri", f"s3://{BUCKET}/{PREFIX}"]) == 2  # no --run-id
    assert xct([*base, "--run-id", "r1"]) == 2  # a run id without storage
    assert xct([*base, "--data-uri", f"s3://{BUCKET}/d"]) == 2  # a data URI without storage
    assert xct([*base, "--storage-uri", f"s3://{BUCKET}/{PREFIX}", "--run-id", "r1", "--data-uri", "/local"]) == 2
    assert xct([*base, "--storage-uri", "relative/dir", "--run-id", "r1"]) == 2
    assert xct([*base, "--storage-uri", f"s3://{BUCKET}/{PREFIX}", "--run-id", "../up"]) == 2
    assert xct(["train", "--stage", "2", "--processed", str(env["processed"]), "--params", str(env["pfile"]),
                "--storage-uri", f"s3://{BUCKET}/{PREFIX}", "--run-id", "no-stage1"]) == 2  # stage 1 model not in the run


def test_compiled_train_tasks_get_the_run_storage_and_the_kfp_run_id(tmp_path: Path) -> None:
    """Each train task's (scoped) params text carries ``pipeline.storage`` and ``s3`` (what it
    reads to find the run's folder) and the KFP run id (``dsl.PIPELINE_JOB_ID_PLACEHOLDER``:
    the folder's name, the same on a retry); dvc.yaml's training never lists them."""
    from kfp import dsl

    from components.ops_params import params_from_dict
    from components.step_params import dvc_entries, kfp_keys

    assert {"pipeline.storage", "s3"} <= set(kfp_keys("train", ["stage1"], 1))
    assert not [e for e in dvc_entries("train", ["stage1"]) if isinstance(e, str) and e.startswith(("pipeline.storage", "s3"))]
    from pipelines.kfp_dag import compile_pipeline

    data = tiny_params().model_dump(mode="json")
    data["pipeline"] = {"storage": {"uri": f"s3://{BUCKET}/{PREFIX}"}}
    spec = next(yaml.safe_load_all(compile_pipeline(tmp_path / "p.yaml", params_from_dict(data), local=True).read_text()))
    found: list[Any] = []

    def walk(dag: dict) -> None:
        for name, task in dag.get("tasks", {}).items():
            if name.startswith("train-stage-component"):
                found.append(task.get("inputs", {}).get("parameters", {}).get("kfp_run_id", {})
                             .get("runtimeValue", {}).get("constant"))
    walk(spec["root"]["dag"])
    for comp in spec["components"].values():
        walk(comp.get("dag", {}))
    assert found == [dsl.PIPELINE_JOB_ID_PLACEHOLDER] * 2  # stages 1 and 2 (kfp.local; a cluster: the pod label)


def test_a_mounted_folder_is_a_run_storage_too(tmp_path: Path) -> None:
    """``pipeline.storage.uri`` = a folder every node mounts: the same layout and operations,
    Ray Train's storage a plain path (no S3 filesystem), data read in place."""
    from components.ops_params import S3Params
    from components.run_storage import RunStorage

    s3 = S3Params()
    st = RunStorage.for_run(str(tmp_path / "store"), "r1", s3)
    assert st.root == str(tmp_path / "store" / "r1") and not st.is_s3
    assert RunStorage.for_run(f"file://{tmp_path / 'store'}", "r1", s3).root == st.root
    assert st.ray_storage() == (str(tmp_path / "store" / "r1" / "ray"), None)
    ck = tmp_path / "ck" / "step_00000004"
    ck.mkdir(parents=True)
    (ck / "state.pt").write_bytes(b"x")
    (ck / DIGEST_FILE).write_text("d")
    st.put_dir(ck, "ray/stage1/step_00000004")
    st.put_dir(ck, "ray/stage1/step_00000002")
    (tmp_path / "stray").mkdir()
    (tmp_path / "stray" / "notes.txt").write_text("n")
    st.put_dir(tmp_path / "stray", "ray/stage1/step_00000009")  # no state.pt: not a checkpoint
    assert st.checkpoint_dirs("stage1") == ["step_00000002", "step_00000004"]
    got = st.get_checkpoints("stage1", tmp_path / "local")
    assert got == ["step_00000002", "step_00000004"] and (tmp_path / "local" / "step_00000004" / "state.pt").is_file()
    st.put_file(tmp_path / "stray" / "notes.txt", "train/metrics/stage1.json")
    assert st.exists("train/metrics/stage1.json") and not st.exists("train/metrics/stage2.json")
    assert st.get_file("train/metrics/stage1.json", tmp_path / "m.json") and (tmp_path / "m.json").read_text() == "n"
    assert not st.get_file("train/metrics/stage2.json", tmp_path / "m2.json")
    assert st.delete("ray/stage1") == 5 and st.checkpoint_dirs("stage1") == []
    assert st.node_copy(str(tmp_path / "data")) == tmp_path / "data"  # a mounted path is read in place


def test_an_unreachable_s3_endpoint_is_one_line_not_a_traceback(aws_env: dict, monkeypatch: pytest.MonkeyPatch) -> None:
    from components.ops_params import S3Params
    from components.run_storage import RunStorage
    from xct_core.errors import XctError

    monkeypatch.setenv("XCT_S3_ENDPOINT_URL", f"http://127.0.0.1:{free_port()}")  # nothing listens there
    cfg = S3Params(request_attempts=1, object_attempts=1, connect_timeout_s=1.0, read_timeout_s=1.0)
    st = RunStorage.for_run(f"s3://{BUCKET}/{PREFIX}", "r1", cfg)
    assert st.root == f"s3://{BUCKET}/{PREFIX}/r1" and st.is_s3
    for op in (lambda: st.checkpoint_dirs("stage1"), lambda: st.exists("train/metrics/stage1.json")):
        with pytest.raises(XctError) as ei:
            op()
        assert "cannot reach the S3 endpoint" in str(ei.value) and "\n" not in str(ei.value)


# --------------------------------------------------------------------------- two nodes, no shared disk
