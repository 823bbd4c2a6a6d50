"""The Jobs-API route for real: a two-node Ray cluster with token authentication
(tests/ray_cluster.py: 127.0.0.2 head, 127.0.0.3 worker, a random token per cluster), real
``JobSubmissionClient`` calls, and `xct train` processes with ``pipeline.ray.address`` set.

* The dashboard (Jobs API) refuses calls without the token (401) or with another token
  (403), listens on the head's address only, and `xct train` without the token fails in one
  line naming the refusal; with it, it submits.
* `xct train --stage 1` of a tiny profile submitted as a Ray job: exit 0, the job's log
  streamed into the caller's output, the stage trained by the cluster's Ray Train workers
  (``ray_workers.json`` names cluster nodes), the entrypoint runs `xct train` with the
  effective params and the address cleared (no recursion).
* A job whose data path does not exist on the cluster: exit 1, ONE ``xct: error:`` line
  with the job's last lines (the inner `xct: error:` among them).
* SIGTERM to the submitting `xct train`: it stops the Ray job (status STOPPED) and exits 143.

Plus compile-time and argument checks that need no cluster. The cluster is the one this
module shares with tests/test_ray_cluster.py (the ``shared_ray_cluster`` fixture,
tests/conftest.py; stopped after this module's last cluster test): after that module's
node-kill test its worker is the replacement node, so the nodes are read from the cluster.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import typer
import yaml

from train_fixtures import REPO, build_processed, tiny_params

ray = pytest.importorskip("ray")
requests = pytest.importorskip("requests")
psutil = pytest.importorskip("psutil")

from ray_cluster import HEAD_IP, RayCluster  # noqa: E402  (after the importorskip of ray)

pytestmark = pytest.mark.timeout(300)

STEPS = 4
#: how the cluster's job starts xct here (the image runs the `xct` console script)
XCT_COMMAND = f"{sys.executable} -m pipelines.cli"


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory, shared_ray_cluster: RayCluster):
    root = tmp_path_factory.mktemp("rayjobs")
    params = tiny_params(train={"ray": {"num_workers": 1, "cpus_per_worker": 1.0, "max_failures": 0},
                                "val_reprojection": False})
    # the nodes (and so the jobs' drivers) import this checkout, as the image's installed code
    # (the shared cluster's nodes run with REPO first on their PYTHONPATH)
    cluster = shared_ray_cluster
    assert cluster.env["PYTHONPATH"].split(os.pathsep)[0] == str(REPO)
    pythonpath = os.pathsep.join([str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])])
    processed = build_processed(root, params, n_train=2, n_val=1)
    nodes = cluster.wait_alive(2)
    data = params.model_dump(mode="json")
    data["pipeline"] = {"ray": {"address": cluster.dashboard_url, "command": XCT_COMMAND, "timeout_s": 240.0}}
    pfile = root / "params.yaml"
    pfile.write_text(yaml.safe_dump(data, sort_keys=False))
    # the submitter: the token, NOT RAY_ADDRESS (it joins nothing: it talks HTTP to the dashboard)
    child = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "XCT_"))}
    child.update(cluster.auth_env(), OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", PYTHONPATH=pythonpath,
                 MLFLOW_TRACKING_URI=f"sqlite:///{root / 'mlflow.db'}")
    return {"root": root, "cluster": cluster, "processed": processed, "params": pfile, "child": child,
            "nodes": nodes}


def _client(env: dict) -> Any:
    from ray.job_submission import JobSubmissionClient

    return JobSubmissionClient(env["cluster"].dashboard_url, headers={"Authorization": f"Bearer {env['cluster'].token}"})


def _train_cmd(env: dict, out: Path, *extra: str, processed: Path | None = None) -> list[str]:
    return [sys.executable, "-m", "pipelines.cli", "train", "--stage", "1", "--processed",
            str(processed or env["processed"]), "--out", str(out), "--params", str(env["params"]),
            "--steps", str(STEPS), *extra]


def _job_id(text: str) -> str:
    m = re.search(r"ray job (\S+) submitted to ", text)
    assert m, text[-3000:]
    return m.group(1)


# --------------------------------------------------------------------------- token authentication


def test_dashboard_refuses_calls_without_the_token_and_binds_the_head_only(env: dict) -> None:
    cluster: RayCluster = env["cluster"]
    url = cluster.dashboard_url
    assert requests.get(f"{url}/api/jobs/", timeout=10).status_code == 401  # no token
    assert requests.post(f"{url}/api/jobs/", json={"entrypoint": "id"}, timeout=10).status_code == 401
    bad = {"Authorization": "Bearer " + "0" * 64}
    assert requests.get(f"{url}/api/jobs/", headers=bad, timeout=10).status_code == 403  # another token
    ok = requests.get(f"{url}/api/jobs/", headers={"Authorization": f"Bearer {cluster.token}"}, timeout=10)
    assert ok.status_code == 200 and isinstance(ok.json(), list)
    port = cluster.nodes[0].ports["dashboard-port"]
    listening = {c.laddr.ip for c in psutil.net_connections(kind="tcp")
                 if c.status == psutil.CONN_LISTEN and c.laddr.port == port}
    assert listening == {HEAD_IP}, listening  # the Jobs-API route's address, nowhere else


def test_xct_train_without_the_token_is_refused_in_one_line(env: dict) -> None:
    child = {k: v for k, v in env["child"].items() if not k.startswith("RAY_AUTH")}
    child["HOME"] = str(env["root"] / "home")  # no ~/.ray/auth_token either
    proc = subprocess.run(_train_cmd(env, env["root"] / "refused"), cwd=REPO, env=child, capture_output=True,
                          text=True, timeout=120)
    errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("xct: error:")]
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert len(errors) == 1 and "refused (401)" in errors[0], proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (env["root"] / "refused").exists()  # nothing ran


# --------------------------------------------------------------------------- the Jobs-API route


def test_xct_train_runs_stage1_as_a_ray_job(env: dict) -> None:
    out = env["root"] / "train"
    proc = subprocess.run(_train_cmd(env, out), cwd=REPO, env=env["child"], capture_output=True, text=True,
                          timeout=240)
    text = proc.stdout + proc.stderr
    assert proc.returncode == 0, text[-4000:]
    job_id = _job_id(proc.stdout)
    assert f"ray job {job_id}: RUNNING" in proc.stdout and f"ray job {job_id}: SUCCEEDED" in proc.stdout
    # the job's own log, streamed here: the inner `xct train`'s final line
    assert re.search(r"^stage1: step 4\b.*MLflow run [0-9a-f]{32}", proc.stdout, re.M), proc.stdout[-3000:]
    summary = json.loads((out / "metrics" / "stage1.json").read_text())
    assert summary["step"] == STEPS
    # trained by the cluster's Ray Train workers (not a local Ray of the caller)
    workers = json.loads((out / "checkpoints" / "stage1" / "ray_workers.json").read_text())["attempts"][0]["workers"]
    assert workers and {w["node_ip"] for w in workers} <= set(env["nodes"].values())
    info = _client(env).get_job_info(job_id)
    assert str(info.status.value) == "SUCCEEDED"
    argv = shlex.split(info.entrypoint)
    assert argv[:len(shlex.split(XCT_COMMAND)) + 1] == [*shlex.split(XCT_COMMAND), "train"]
    assert argv[-2:] == ["--params", "params.yaml"] and "--steps" in argv and str(out) in argv
    assert env["cluster"].token not in json.dumps(info.runtime_env or {})  # the token never travels as data


def test_the_kfp_train_task_route_returns_the_final_step(env: dict, monkeypatch: pytest.MonkeyPatch,
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    """components.ray_jobs.submit_stage: what train_stage_component runs with pipeline.ray.address."""
    from components.ops_params import load_params
    from components.ray_jobs import submit_stage

    for k, v in env["child"].items():
        if k.startswith(("RAY_AUTH", "MLFLOW_")):
            monkeypatch.setenv(k, v)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    out = env["root"] / "kfp_model"
    params = load_params(env["params"], sets=["train.steps.stage1=2"])
    assert submit_stage(params, 1, env["processed"], out, fresh=True) == 2
    text = capsys.readouterr().out
    assert "--fresh" in text and "SUCCEEDED" in text and (out / "models" / "stage1" / "final.pt").is_file()


def test_a_failing_job_fails_the_caller_with_its_last_lines(env: dict) -> None:
    missing = env["root"] / "no-such-processed"
    proc = subprocess.run(_train_cmd(env, env["root"] / "train_bad", processed=missing), cwd=REPO,
                          env=env["child"], capture_output=True, text=True, timeout=240)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("xct: error:")]
    assert len(errors) == 1, proc.stderr
    line = errors[0]
    job_id = _job_id(proc.stdout)
    assert f"ray job {job_id} FAILED" in line and "last lines:" in line
    assert str(missing) in line  # the job's own one-line error, quoted
    assert line.split("last lines: ", 1)[1].startswith("xct: error:")  # not Ray's own set-up lines
    assert "Traceback" not in proc.stderr
    assert str(_client(env).get_job_status(job_id).value) == "FAILED"


def test_sigterm_to_the_submitter_stops_the_ray_job(env: dict) -> None:
    child = {**env["child"], "XCT_TRAIN_FAULTS": json.dumps({"slow_step_s": 2.0})}  # forwarded to the job
    cmd = _train_cmd(env, env["root"] / "train_stopped")
    cmd[cmd.index("--steps") + 1] = "200"
    proc = subprocess.Popen(cmd, cwd=REPO, env=child, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(iter(proc.stdout.readline, "")), daemon=True)
    reader.start()
    try:
        deadline = time.monotonic() + 180
        # the job is RUNNING and its driver has started training (its log reaches us)
        while not any("RUNNING" in ln for ln in lines) or not any("stage1" in ln and "ray job" not in ln
                                                                 for ln in lines):
            assert proc.poll() is None, "".join(lines)[-3000:] + proc.stderr.read()
            assert time.monotonic() < deadline, "".join(lines)[-3000:]
            time.sleep(0.2)
        job_id = _job_id("".join(lines))
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=30)
    reader.join(timeout=10)
    err = proc.stderr.read()
    assert code == 143, "".join(lines)[-3000:] + err
    assert str(_client(env).get_job_status(job_id).value) == "STOPPED"
    errors = [ln for ln in err.splitlines() if ln.startswith("xct: error:")]
    assert len(errors) == 1 and "SIGTERM" in errors[0] and "STOPPED" in errors[0], err


def test_a_job_past_its_timeout_is_stopped_and_fails_the_caller(env: dict) -> None:
    child = {**env["child"], "XCT_TRAIN_FAULTS": json.dumps({"slow_step_s": 2.0})}
    cmd = _train_cmd(env, env["root"] / "train_timeout", "--set", "pipeline.ray.timeout_s=6")
    cmd[cmd.index("--steps") + 1] = "200"
    proc = subprocess.run(cmd, cwd=REPO, env=child, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 1, proc.stdout[-3000:] + proc.stderr
    errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("xct: error:")]
    assert len(errors) == 1 and "exceeded pipeline.ray.timeout_s = 6 s" in errors[0], proc.stderr
    assert str(_client(env).get_job_status(_job_id(proc.stdout)).value) == "STOPPED"


# --------------------------------------------------------------------------- no cluster needed


def test_passthrough_and_entrypoint_quote_every_argument(tmp_path: Path) -> None:
    from typer.main import get_command

    from components.ray_jobs import entrypoint, passthrough_args

    seen: dict[str, list[str]] = {}
    app = typer.Typer()

    @app.command()
    def train(ctx: typer.Context, stage: int = typer.Option(..., "--stage"), processed: Path = typer.Option(Path("data/p"), "--processed"),  # noqa: B008 (typer signature, as the CLI writes it)
              fresh: bool = typer.Option(False, "--fresh"), gpu: bool = typer.Option(None, "--gpu/--no-gpu"),
              set_: list[str] = typer.Option(None, "--set"), uri: str = typer.Option("s3://b/run 1", "--uri")) -> None:  # noqa: B008
        seen["args"] = passthrough_args(ctx, drop=("set_", "gpu"))

    get_command(app).main(["--stage", "2", "--fresh", "--no-gpu", "--set", "a=b"], standalone_mode=False)
    args = seen["args"]
    assert args == ["--stage", "2", "--processed", str(Path("data/p").absolute()), "--fresh", "--uri", "s3://b/run 1"]
    ep = entrypoint("python -m pipelines.cli", args)
    assert shlex.split(ep) == ["python", "-m", "pipelines.cli", "train", *args, "--params", "params.yaml"]


def test_addresses_tokens_and_forwarded_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from components.ray_jobs import auth_headers, check_address, job_env, ray_token, without_credentials
    from xct_core.errors import ConfigError

    with pytest.raises(ConfigError, match="Ray Client ray:// is not supported"):
        check_address("ray://head:10001")
    assert check_address("http://head:8265/") == "http://head:8265"
    assert without_credentials("http://u:pw@h:5000/x") == "http://h:5000/x"
    env = job_env({"MLFLOW_TRACKING_URI": "http://u:pw@h:5000", "AWS_SECRET_ACCESS_KEY": "s", "XCT_TRAIN_FAULTS": "{}"})
    assert env == {"MLFLOW_TRACKING_URI": "http://h:5000", "XCT_TRAIN_FAULTS": "{}"}  # no secret forwarded
    monkeypatch.delenv("RAY_AUTH_TOKEN", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.delenv("RAY_AUTH_TOKEN_PATH", raising=False)
    assert ray_token() is None and auth_headers(None) == {}
    (tmp_path / ".ray").mkdir()
    (tmp_path / ".ray" / "auth_token").write_text("fromfile\n")
    assert ray_token() == "fromfile"
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(tmp_path / "absent"))
    with pytest.raises(ConfigError, match="RAY_AUTH_TOKEN_PATH"):
        ray_token()
    monkeypatch.setenv("RAY_AUTH_TOKEN", "fromenv")
    assert ray_token() == "fromenv" and auth_headers("fromenv") == {"Authorization": "Bearer fromenv"}


def test_compile_refuses_more_local_gpu_workers_than_the_pod_requests() -> None:
    from components.ops_params import OpsParams, params_from_dict
    from pipelines.kfp_dag import build_pipeline
    from xct_core.errors import ConfigError

    data = OpsParams().model_dump(mode="json")
    data["train"]["ray"].update(use_gpu=True, num_workers=8)
    data["pipeline"]["kfp"]["train_accelerator"].update(type="nvidia.com/gpu", limit=1)
    with pytest.raises(ConfigError, match=r"start 8 GPU\(s\).*requests 1 \(pipeline.kfp.train_accelerator.limit\)"):
        build_pipeline(params_from_dict(data))
    data["pipeline"]["kfp"]["train_accelerator"]["limit"] = 8
    build_pipeline(params_from_dict(data))  # matched: compiles
    data["pipeline"]["kfp"]["train_accelerator"]["limit"] = 1
    data["pipeline"]["ray"]["address"] = "http://head:8265"
    build_pipeline(params_from_dict(data))  # the GPUs are the Ray cluster's: compiles


def test_with_a_ray_address_the_train_pod_requests_no_gpu(tmp_path: Path) -> None:
    from components.ops_params import OpsParams, params_from_dict
    from pipelines.kfp_dag import compile_pipeline

    data = OpsParams().model_dump(mode="json")
    tol = {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}
    data["pipeline"]["kfp"]["train_accelerator"].update(type="nvidia.com/gpu", limit=1, tolerations=[tol])
    found = {}
    for name, address in (("local", ""), ("job", "http://head:8265")):
        data["pipeline"]["ray"]["address"] = address
        docs = list(yaml.safe_load_all(compile_pipeline(tmp_path / f"{name}.yaml", params_from_dict(data)).read_text()))
        executors = docs[0]["deploymentSpec"]["executors"]
        accel = [n for n, e in executors.items() if "accelerator" in e.get("container", {}).get("resources", {})]
        assert all("train" in n for n in accel), accel
        platform = json.dumps(docs[1:])  # the kfp-kubernetes platform spec
        found[name] = (len(accel), "tolerations" in platform, '"secretName": "xct-ray-auth"' in platform)
        if address:
            execs = docs[1]["platforms"]["kubernetes"]["deploymentSpec"]["executors"]
            ray_token = [{"secretKey": "auth_token", "envVar": "RAY_AUTH_TOKEN"}]
            envs = {n: [s for s in e.get("secretAsEnv", []) if s["keyToEnv"] == ray_token] for n, e in execs.items()}
            envs = {n: e for n, e in envs.items() if e}  # the executors given the Ray token (MLflow/S3 secrets aside)
            assert envs and all("train" in n for n in envs), envs
            assert all(e[0]["secretName"] == "xct-ray-auth" for e in envs.values()), envs
    assert found["local"] == (OpsParams().n_stages, True, False)  # each train executor asks for the GPU
    assert found["job"] == (0, False, True)  # a Ray job's submitter: no GPU, no GPU-node toleration; the token


def test_manifests_turn_token_auth_on_and_drop_ray_client() -> None:
    """KubeRay authOptions (mode token, the token from a Secret of the template, key auth_token)
    on the RayCluster and the RayJob's cluster; no Ray Client port or ray:// address left in
    the manifests, the docs or the code."""
    k8s = REPO / "infra" / "k8s"
    secrets = {d["metadata"]["name"]: d for d in yaml.safe_load_all((k8s / "secrets.template.yaml").read_text())
               if d and d.get("kind") == "Secret"}
    clusters = []
    for f in ("raycluster.yaml", "rayjob-train.yaml"):
        for d in yaml.safe_load_all((k8s / f).read_text()):
            if d and d.get("kind") in ("RayCluster", "RayJob"):
                clusters.append((f, d["spec"] if d["kind"] == "RayCluster" else d["spec"]["rayClusterSpec"]))
    assert len(clusters) == 2
    for f, spec in clusters:
        auth = spec["authOptions"]
        assert auth["mode"] == "token", f
        assert secrets[auth["secretName"]]["stringData"]["auth_token"].startswith("CHANGE_ME"), f
        ports = [p["containerPort"] for p in spec["headGroupSpec"]["template"]["spec"]["containers"][0]["ports"]]
        assert 10001 not in ports and 8265 in ports, (f, ports)
    hits = []
    for root in ("infra", "docs", "components", "pipelines", "xct_core", "README.md", "params.yaml",
                 "params.production.yaml"):
        for p in [REPO / root] if (REPO / root).is_file() else (REPO / root).rglob("*"):
            if p.is_file() and p.suffix in (".py", ".md", ".yaml", ".yml", "") and p.name != "test_ray_jobs.py":
                text = p.read_text(errors="replace")
                hits += [f"{p.relative_to(REPO)}: ray://" for _ in [0] if re.search(r"\bray://[a-z0-9$]", text)]
                hits += [f"{p.relative_to(REPO)}: RAY_AUTH_MODE disabled" for _ in [0]
                         if re.search(r"RAY_AUTH_MODE\W{1,3}disabled", text)]
    assert not hits, hits
