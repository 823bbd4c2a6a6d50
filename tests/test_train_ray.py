"""Stage training on a real local Ray runtime with real MLflow (sqlite in a temp dir).

One Ray runtime for the module (RAY_TMPDIR under a short /tmp path: unix socket paths are
length-limited); the tiny 16³ stage, 2 CPU workers (DDP over gloo), a few steps."""

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

import pytest
import torch
import yaml

from train_fixtures import REPO, build_processed, tiny_params
from xct_core.checkpoint import list_checkpoints, load_state
from xct_core.training import FaultPlan, NonFiniteError, RunLayout

ray = pytest.importorskip("ray")
mlflow = pytest.importorskip("mlflow")

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("ray")
    ray_tmp = Path(tempfile.mkdtemp(prefix="xr-", dir="/tmp"))
    saved = {k: os.environ.get(k) for k in ("RAY_TMPDIR", "MLFLOW_TRACKING_URI")}
    os.environ["RAY_TMPDIR"] = str(ray_tmp)
    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{root / 'mlflow.db'}"
    params = tiny_params(train={"ray": {"num_workers": 2, "max_failures": 1}})
    processed = build_processed(root, params)
    ray.init(num_cpus=4, log_to_driver=False)
    try:
        yield {"root": root, "params": params, "processed": processed, "uri": os.environ["MLFLOW_TRACKING_URI"]}
    finally:
        ray.shutdown()
        shutil.rmtree(ray_tmp, ignore_errors=True)
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _client(env: dict):
    return mlflow.MlflowClient(tracking_uri=env["uri"])


def _history_steps(env: dict, run_id: str, key: str) -> list[int]:
    return sorted(m.step for m in _client(env).get_metric_history(run_id, key))


def test_two_workers_log_to_mlflow_and_write_loadable_checkpoints(env: dict) -> None:
    from components.train import run_train

    out = env["root"] / "fit"
    s = run_train(env["params"], 1, env["processed"], out, log=lambda _m: None)
    assert s.final_step == 6 and s.start_step == 0 and s.metrics["workers"] == 2
    client = _client(env)
    run = client.get_run(s.run_id)
    assert run.info.status == "FINISHED"
    assert run.data.tags["mlflow.parentRunId"] == s.parent_run_id
    assert client.get_run(s.parent_run_id).info.status == "FINISHED"
    assert run.data.tags["xct.data_hash"] and run.data.tags["xct.data_hash_source"] == "manifest"
    assert "mlflow.source.git.commit" in run.data.tags  # the repo is a git checkout
    assert run.data.params["stage1.size"] == "16" and run.data.params["train.ray.num_workers"] == "2"
    assert _history_steps(env, s.run_id, "train/loss") == [2, 4, 6]
    for key in ("train/lr", "train/samples_per_s", "sys/peak_mem_mb", "val/psnr_window_db", "val/ssim_window"):
        assert key in run.data.metrics, key
    arts = {a.path for a in client.list_artifacts(s.run_id, "model")} | {
        a.path for a in client.list_artifacts(s.run_id, "val_montages")
    }
    assert {"model/final.pt", "model/best.pt", "val_montages/step_00000006.png"} <= arts
    lay = RunLayout(out, 1)
    assert [st for st, _ in list_checkpoints(lay.checkpoints)] == [4, 6]
    ray_ckpts = sorted(p.name for p in (out / "ray" / "stage1").glob("step_*"))
    assert ray_ckpts == ["step_00000004", "step_00000006"]  # persisted by Ray (num_to_keep 2)
    for d in [lay.checkpoints / "step_00000006", out / "ray" / "stage1" / "step_00000006"]:
        st = torch.load(d / "state.pt", weights_only=True)
        assert st["step"] == 6 and st["world_size"] == 2 and st["samples_seen"] == 6 * 2 * 2
    assert torch.load(lay.model("final"), weights_only=True)["step"] == 6


def test_crashed_worker_is_retried_from_checkpoint_and_steps_continue(env: dict) -> None:
    from components.train import run_train

    out = env["root"] / "crash"
    s = run_train(env["params"], 1, env["processed"], out, faults=FaultPlan(crash_at_step=5, crash_rank=1), log=lambda _m: None)
    lay = RunLayout(out, 1)
    assert (lay.checkpoints / ".fault-crash-5").exists()  # the crash happened …
    assert s.start_step == 4 and s.final_step == 6  # … and the retried workers resumed at 4
    assert _client(env).get_run(s.run_id).info.status == "FINISHED"
    assert _history_steps(env, s.run_id, "train/loss") == [2, 4, 6]  # continuous, no duplicates
    assert _history_steps(env, s.run_id, "val/psnr_window_db") == [6]


def test_nan_fails_the_run_with_the_step_and_keeps_last_good_checkpoint(env: dict) -> None:
    from components.train import run_train

    out = env["root"] / "nan"
    with pytest.raises(NonFiniteError) as ei:
        run_train(env["params"], 1, env["processed"], out, faults=FaultPlan(nan_at_step=3), log=lambda _m: None)
    msg = str(ei.value)
    assert "non-finite loss or gradient at step 3" in msg and "step_00000002" in msg
    lay = RunLayout(out, 1)
    assert [st for st, _ in list_checkpoints(lay.checkpoints)] == [2]
    good = load_state(lay.checkpoints / "step_00000002")
    assert good["step"] == 2 and all(torch.isfinite(t).all() for t in good["learners"]["diffusion"]["model"].values())
    run_id = json.loads((lay.checkpoints / "mlflow.json").read_text())["run_id"]
    run = _client(env).get_run(run_id)
    assert run.info.status == "FAILED"
    assert "at step 3" in run.data.tags["xct.failure"] and run.data.tags["xct.nonfinite_step"] == "3"
    assert _client(env).get_run(run.data.tags["mlflow.parentRunId"]).info.status == "FAILED"


def _alive_train_actors_of_other_jobs() -> list[str]:
    """Ray Train actors (controller, workers) still alive that belong to another driver."""
    from ray.util.state import list_actors

    ctx = ray.get_runtime_context()
    alive = list_actors(address=ctx.gcs_address, filters=[("state", "=", "ALIVE")])
    return [a.class_name for a in alive if "Train" in (a.class_name or "") and a.job_id != ctx.get_job_id()]


def test_driver_killed_mid_run_then_rerun_resumes(env: dict) -> None:
    """SIGKILL of the driver (joined to the running cluster via RAY_ADDRESS), then the
    same command again: it resumes at the saved step, in the same MLflow run."""
    from components.train import run_train

    out = env["root"] / "kill"
    pfile = env["root"] / "params_kill.yaml"
    pfile.write_text(yaml.safe_dump(env["params"].model_dump(mode="json")))
    child_env = {
        **os.environ,
        "RAY_ADDRESS": ray.get_runtime_context().gcs_address,
        "XCT_TRAIN_FAULTS": json.dumps({"slow_step_s": 1.0}),
    }
    cmd = [sys.executable, "-m", "pipelines.cli", "train", "--stage", "1", "--processed", str(env["processed"]),
           "--out", str(out), "--params", str(pfile), "--steps", "8"]
    log = env["root"] / "kill_driver.log"
    with open(log, "w") as fh:
        proc = subprocess.Popen(cmd, cwd=REPO, env=child_env, stdout=fh, stderr=subprocess.STDOUT)
    target = RunLayout(out, 1).checkpoints / "step_00000004"
    deadline = time.monotonic() + 200
    try:
        while not target.is_dir():
            assert proc.poll() is None, f"driver exited early:\n{log.read_text()[-3000:]}"
            assert time.monotonic() < deadline, f"no checkpoint 4 in time:\n{log.read_text()[-3000:]}"
            time.sleep(0.2)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    deadline = time.monotonic() + 90  # the dead driver's job (controller + workers) is torn down
    while _alive_train_actors_of_other_jobs():
        assert time.monotonic() < deadline, f"train actors still alive: {_alive_train_actors_of_other_jobs()}"
        time.sleep(0.5)
    killed_run = json.loads((RunLayout(out, 1).checkpoints / "mlflow.json").read_text())["run_id"]
    assert _client(env).get_run(killed_run).info.status == "RUNNING"  # the killed driver never ended it

    s = run_train(env["params"], 1, env["processed"], out, steps=8, log=lambda _m: None)
    assert s.start_step is not None and s.start_step >= 4 and s.final_step == 8
    assert s.run_id == killed_run  # same MLflow run, continued
    run = _client(env).get_run(s.run_id)
    assert run.info.status == "FINISHED" and run.data.tags.get("xct.resumed") == "true"
    assert _history_steps(env, s.run_id, "train/loss") == [2, 4, 6, 8]
    assert torch.load(RunLayout(out, 1).model("final"), weights_only=True)["step"] == 8
