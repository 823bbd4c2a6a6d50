"""Issue 24 (items 1, 2; MLflow parts of 4, 5, 8): the registry fails closed.

"Cannot tell" is never "none". A REAL ``mlflow server`` (sqlite backend, local artifact
destination, tests/mlflow_server.py) sits behind a fault proxy (tests/fault_proxy.py) that
forwards, refuses, hangs, or refuses / drops one chosen request; the client only knows the
proxy's URL. Each scenario below failed open before the fix:

* a gate with a champion check while the registry is down passed as "no champion yet";
* one failed champion read during register made a worse model @champion;
* a version whose registration was cut after ``model-versions/create`` reached the server was
  never given its alias decision nor its card ("already registered; nothing new");
* a register step that failed after its run ended left the run FINISHED (or RUNNING);
* ``xct models list|promote`` against a dead server took ~250 s and said "no versions" /
  "has no version"; against a black-holed one it hung until killed;
* ``xct train``'s MLflow stage run against a failing server was a chained traceback.

Timings are bounded by the params keys ``registry.request_timeout_s`` /
``registry.request_max_retries`` (the environment's MLFLOW_HTTP_REQUEST_* win over them).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from fault_proxy import FaultProxy
from mlflow_server import MlflowServer
from moto_server import free_port
from test_evaluate import build_tiny_processed, export_tiny_stages, make_tiny_params
from test_register import _write_reports
from xct_core.config import Params
from xct_core.errors import XctError

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

REPO = Path(__file__).resolve().parents[1]
CANNOT = "cannot answer"


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """A real mlflow server, a fault proxy in front of it (the client's tracking URI), tiny
    processed data. In-process MLflow requests: 5 s timeout, no retries (one refused
    request is final, as after the bounded retries)."""
    root = tmp_path_factory.mktemp("fail-closed")
    mp = pytest.MonkeyPatch()
    srv = MlflowServer(root / "server", (root / "artifacts").as_uri(), s3_endpoint="")
    proxy = None
    try:
        srv.start(timeout_s=90)
        proxy = FaultProxy(srv.port).start()
        mp.setenv("MLFLOW_TRACKING_URI", proxy.url)
        mp.setenv("MLFLOW_DISABLE_TELEMETRY", "true")
        mp.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "5")
        mp.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
        params = make_tiny_params()
        processed = build_tiny_processed(root, params, n_train=1, n_test=1)
        yield {"root": root, "srv": srv, "proxy": proxy, "params": params, "processed": processed}
    finally:
        mp.undo()
        if proxy is not None:
            proxy.stop()
        srv.stop()


@pytest.fixture
def proxy(env: dict[str, Any]) -> Iterator[FaultProxy]:
    """The proxy, forwarding, with no pending rules (reset after each test)."""
    p: FaultProxy = env["proxy"]
    p.rules.clear()
    p.set_mode("forward")
    yield p
    p.rules.clear()
    p.set_mode("forward")


def _params(env: dict[str, Any], model: str) -> Params:
    """The tiny params with a model name of the test's own (tests share one server)."""
    data = env["params"].model_dump(mode="json")
    data["registry"]["model_name"] = model
    data["registry"]["experiment"] = f"register-{model}"
    return Params.model_validate(data)


def _direct(env: dict[str, Any]) -> Any:
    """A client of the server itself (not through the proxy): what really is registered."""
    from mlflow import MlflowClient

    return MlflowClient(env["srv"].url)


def _prepare(env: dict[str, Any], params: Params, name: str, seed: int, psnr2: float) -> tuple[Path, Path, Path]:
    """Stage models + TEST-chosen evaluation values judged by the real gates (all pass):
    ``(run folder, gates folder, eval folder)``."""
    run = env["root"] / params.registry.model_name / name
    if not (run / "train").is_dir():
        export_tiny_stages(run / "train", params, seed=seed)
    gates, ev = _write_reports(run, params, {1: 20.0, 2: psnr2}, {1: True, 2: True})
    return run, gates, ev


def _register(env: dict[str, Any], params: Params, name: str, seed: int, psnr2: float) -> dict[str, Any]:
    """The project's register step (in-process)."""
    from components.register import run_register

    run, gates, ev = _prepare(env, params, name, seed, psnr2)
    return run_register(gates, ev, run / "train", run / "summary.json", params, processed_dir=env["processed"])


def _champion_version(env: dict[str, Any], model: str) -> str | None:
    from mlflow.exceptions import MlflowException

    try:
        return str(_direct(env).get_model_version_by_alias(model, "champion").version)
    except MlflowException:
        return None


def _one_line(e: BaseException) -> str:
    msg = str(e)
    assert "\n" not in msg and "Traceback" not in msg, msg
    return msg


# --------------------------------------------------------------------------- the gate


def test_gate_champion_check_with_the_registry_down_is_an_error_not_a_skip(env: dict[str, Any], proxy: FaultProxy,
                                                                           tmp_path: Path) -> None:
    from components.gate import read_champion, run_gate

    params = _params(env, "fc-gate")
    _register(env, params, "v1", seed=0, psnr2=25.0)  # v1 @champion, stage-2 PSNR 25 on split-A
    data = params.model_dump(mode="json")
    data["gates"]["stage2"] = {"psnr_window_db": 10.0, "ssim_window": 0.1, "max_nan": 0, "min_std_ratio": 0.25,
                               "relative": [{"baseline": "champion", "min_absolute_change": 0.5}]}
    gp = Params.model_validate(data)
    m = tmp_path / "metrics.json"  # no better than the champion: must FAIL its champion check
    m.write_text(json.dumps({"stage": 2, "psnr_window_db": 25.2, "ssim_window": 0.5, "nan_count": 0, "std": 0.4,
                             "target_std": 0.5, "test_ids_hash": "split-A"}))
    # registry up (through the proxy): the champion is read and the gate fails against it
    assert read_champion(2, gp).version == "1"
    assert run_gate(2, m, tmp_path / "up.json", gp).passed is False
    # registry refusing / black-holed: an error, never "no champion yet: skipped" (a pass)
    for mode in ("refuse", "hang"):
        proxy.set_mode(mode)
        out = tmp_path / f"{mode}.json"
        t0 = time.monotonic()
        with pytest.raises(XctError) as ei:
            run_gate(2, m, out, gp)
        assert time.monotonic() - t0 < 30  # 5 s timeout, no retries (the env wins over params)
        msg = _one_line(ei.value)
        assert CANNOT in msg and proxy.url in msg and "fc-gate@champion" in msg, msg
        assert not out.exists()  # no gate report written from a guess
    # the unit repro: a dead port (nothing listens) is an error too
    with pytest.raises(XctError, match=CANNOT):
        read_champion(2, gp, f"http://127.0.0.1:{free_port()}")
    # a registry that answers "no such model" is still "no champion" (None), not an error
    proxy.set_mode("forward")
    assert read_champion(2, _params(env, "fc-never-registered")) is None


# --------------------------------------------------------------------------- register


def test_register_during_a_registry_outage_never_promotes_and_its_run_is_failed(env: dict[str, Any],
                                                                                proxy: FaultProxy) -> None:
    model = "fc-outage"
    params = _params(env, model)
    s1 = _register(env, params, "good", seed=0, psnr2=25.0)
    assert s1["status"] == "promoted" and _champion_version(env, model) == "1"
    # the champion read of the next (WORSE) model's registration fails once
    proxy.fail_request("GET /api/2.0/mlflow/registered-models/alias", action="refuse")
    with pytest.raises(XctError) as ei:
        _register(env, params, "worse", seed=1, psnr2=20.0)
    assert proxy.fired()
    assert CANNOT in _one_line(ei.value)
    c = _direct(env)
    assert _champion_version(env, model) == "1"  # the worse model did not displace v1
    v2 = c.get_model_version(model, "2")
    assert list(v2.aliases or []) == [] and "xct.alias_reason" not in (v2.tags or {})
    assert c.get_run(v2.tags["xct.run_id"]).info.status == "FAILED"  # not RUNNING, not FINISHED
    # registry back: the re-run completes v2's registration — against champion v1
    s2 = _register(env, params, "worse", seed=1, psnr2=20.0)
    assert s2["status"] == "registered" and s2["alias"] == "candidate" and s2["model_version"] == "2"
    v2 = c.get_model_version(model, "2")
    assert list(v2.aliases) == ["candidate"] and "does not beat champion v1" in v2.tags["xct.alias_reason"]
    assert v2.tags["xct.model_card"].startswith("runs:/")
    assert _champion_version(env, model) == "1" and len(c.search_model_versions(f"name='{model}'")) == 2
    assert c.get_run(v2.tags["xct.run_id"]).info.status == "FINISHED"


def test_promotion_compares_against_the_champion_read_right_before_the_alias_is_written(
        env: dict[str, Any], proxy: FaultProxy) -> None:
    """v1 (25 dB) is @champion, v2 (30 dB) exists. While v3 (27 dB) is being registered,
    another client moves @champion to v2 between register's champion read and its alias write
    (at the re-read). v3 must be judged against v2 — candidate — not displace it."""
    model = "fc-race"
    params = _params(env, model)
    c = _direct(env)
    _register(env, params, "a", seed=4, psnr2=25.0)
    _register(env, params, "b", seed=5, psnr2=30.0)
    assert _champion_version(env, model) == "2"
    c.set_registered_model_alias(model, "champion", "1")  # a manual rollback to v1
    proxy.on_request("GET /api/2.0/mlflow/registered-models/alias",
                     lambda: c.set_registered_model_alias(model, "champion", "2"), nth=2)
    s3 = _register(env, params, "c", seed=6, psnr2=27.0)
    assert proxy.fired()  # the champion WAS read again right before the write
    assert s3["model_version"] == "3" and s3["alias"] == "candidate" and s3["status"] == "registered"
    assert _champion_version(env, model) == "2"
    assert "does not beat champion v2" in c.get_model_version(model, "3").tags["xct.alias_reason"]


def test_an_interrupted_registration_is_completed_on_rerun(env: dict[str, Any], proxy: FaultProxy) -> None:
    """The server records the new version, then 'dies' before answering: no alias, no card,
    run RUNNING (it could not be told). The re-run makes the alias decision and logs the card."""
    from components.register import show_card

    model = "fc-interrupted"
    params = _params(env, model)
    proxy.fail_request("POST /api/2.0/mlflow/model-versions/create", action="drop", then="refuse")
    with pytest.raises(XctError) as ei:
        _register(env, params, "run", seed=2, psnr2=24.0)
    assert proxy.fired() and CANNOT in _one_line(ei.value)
    c = _direct(env)
    v1 = c.get_model_version(model, "1")  # the create DID reach the server
    assert list(v1.aliases or []) == [] and "xct.model_card" not in v1.tags and "xct.alias_reason" not in v1.tags
    run_id = v1.tags["xct.run_id"]
    assert c.get_run(run_id).info.status == "RUNNING"  # MLflow could not be told
    proxy.set_mode("forward")
    s = _register(env, params, "run", seed=2, psnr2=24.0)
    assert s["status"] == "promoted" and s["model_version"] == "1" and s["alias"] == "champion"
    v1 = c.get_model_version(model, "1")
    assert list(v1.aliases) == ["champion"] and v1.tags["xct.alias_reason"] == "no champion yet"
    assert v1.tags["xct.model_card"] == f"runs:/{run_id}/model_card"
    assert c.get_run(run_id).info.status == "FINISHED"
    assert len(c.search_model_versions(f"name='{model}'")) == 1  # completed, not registered twice
    assert "# " in show_card("1", params) and "v1" in show_card("1", params)
    # a third run: nothing left to do, nothing changes
    s3 = _register(env, params, "run", seed=2, psnr2=24.0)
    assert s3["model_version"] == "1" and list(c.get_model_version(model, "1").aliases) == ["champion"]


def test_a_register_step_that_fails_after_logging_marks_its_run_failed(env: dict[str, Any], proxy: FaultProxy,
                                                                        capsys: pytest.CaptureFixture[str]) -> None:
    """`xct step register` with model-versions/create refused (it never reaches the server):
    one line, exit 1, no summary, no version, the run FAILED; the next run registers normally
    and the failed run stays FAILED."""
    from cli_run import xct

    model = "fc-failed-run"
    params = _params(env, model)
    run, gates, ev = _prepare(env, params, "run", seed=3, psnr2=24.0)
    pfile = run / "params.yaml"
    pfile.write_text(yaml.safe_dump(params.model_dump(mode="json")))
    proxy.fail_request("POST /api/2.0/mlflow/model-versions/create", action="refuse")
    capsys.readouterr()
    code = xct(["step", "register", "--gates", gates, "--eval", ev, "--train-dir", run / "train",
                "--processed", env["processed"], "--out", run / "summary.json", "-p", pfile])
    err = capsys.readouterr().err.strip().splitlines()
    assert proxy.fired() and code == 1, (code, err)
    assert err[-1].startswith(f"xct: error: MLflow at {proxy.url} {CANNOT}"), err
    # before it, MLflow's own "Successfully registered model '…'." (the registered model, not a version)
    assert all(line.startswith("Successfully registered model") for line in err[:-1]), err
    assert not (run / "summary.json").exists()  # nothing half-written
    c = _direct(env)
    assert c.search_model_versions(f"name='{model}'") == []
    exp = c.get_experiment_by_name(f"register-{model}")
    runs = c.search_runs([exp.experiment_id])
    assert [r.info.status for r in runs] == ["FAILED"]
    s = _register(env, params, "run", seed=3, psnr2=24.0)
    assert s["status"] == "promoted" and s["model_version"] == "1"
    statuses = sorted(r.info.status for r in c.search_runs([exp.experiment_id]))
    assert statuses == ["FAILED", "FINISHED"]


# --------------------------------------------------------------------------- training's MLflow runs


def test_a_training_stage_run_against_a_failing_server_is_one_line(env: dict[str, Any], proxy: FaultProxy,
                                                                  tmp_path: Path) -> None:
    from components.tracking import MetricLogger, StageRun

    def open_run() -> Any:
        return StageRun(experiment="fc-train", stage=1, run_name="stage1", state_file=tmp_path / "mlflow.json",
                        pipeline_file=tmp_path / "pipeline.json", params={"lr": 1e-3}, tags={"xct.x": "1"})

    proxy.set_mode("refuse")
    with pytest.raises(XctError) as ei:
        open_run()
    assert CANNOT in _one_line(ei.value) and "stage 1" in str(ei.value)
    proxy.set_mode("forward")
    run = open_run()
    logger = MetricLogger(run.run_id)
    assert logger.log({"loss": 1.0}, 1) == 1
    proxy.set_mode("refuse")
    with pytest.raises(XctError, match=CANNOT):
        logger.log({"loss": 0.5}, 2)
    with pytest.raises(XctError) as ei:  # the failure being reported stays in front, one line
        run.end("FAILED", "stage1: training failed")
    msg = _one_line(ei.value)
    assert msg.startswith("stage1: training failed; MLflow at") and CANNOT in msg
    proxy.set_mode("forward")
    run.end("FAILED", "stage1: training failed")
    assert _direct(env).get_run(run.run_id).info.status == "FAILED"


# --------------------------------------------------------------------------- `xct models` CLI


def test_models_list_and_promote_against_a_dead_or_hanging_server_fail_in_one_line_in_bounded_time(
        env: dict[str, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    """`xct models list` / `xct models promote 1` against a dead port (connection refused)
    and a black hole (accepts, never answers): one line, exit 1, within the bounds — never
    "no versions" nor "has no version '1'". In-process with the bounds from the environment
    (2 s, 1 retry: the user's MLFLOW_HTTP_REQUEST_* win), then as a real process with the
    bounds from the params file (3 s, 1 retry; the environment sets none)."""
    from cli_run import xct

    plain = tmp_path / "plain.yaml"
    plain.write_text(yaml.safe_dump(env["params"].model_dump(mode="json")))
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "2")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
    bounds = "MLFLOW_HTTP_REQUEST_TIMEOUT=2 s, MLFLOW_HTTP_REQUEST_MAX_RETRIES=1"
    with FaultProxy(free_port(), mode="hang") as hole:
        dead = f"http://127.0.0.1:{free_port()}"
        for where, uri, why in (("dead", dead, "connection refused"), ("hang", hole.url, "no answer within 2 s")):
            monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
            for cmd in (["models", "list"], ["models", "promote", "1"]):
                capsys.readouterr()
                t0 = time.monotonic()
                code = xct([*cmd, "-p", plain])
                took = time.monotonic() - t0
                out, err = capsys.readouterr()
                lines = err.strip().splitlines()
                assert "no versions" not in out and "has no version" not in err, (where, cmd, out, err)
                assert code == 1, (where, cmd, code, out, err)
                assert len(lines) == 1 and lines[0].startswith(f"xct: error: MLflow at {uri} {CANNOT}"), (where, err)
                assert why in lines[0] and bounds in lines[0], lines[0]
                assert took < 20, (where, cmd, took)  # 2 tries × 2 s + backoff/jitter ≤ 1 s
        # a real process (what a user runs), black hole, bounds from the params file
        data = env["params"].model_dump(mode="json")
        data["registry"].update(request_timeout_s=3, request_max_retries=1)  # a retry: no "Retrying" lines either
        pfile = tmp_path / "params.yaml"
        pfile.write_text(yaml.safe_dump(data))
        env_vars = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_HTTP_REQUEST_")}
        env_vars.update(MLFLOW_TRACKING_URI=hole.url,
                        PYTHONPATH=os.pathsep.join(p for p in (str(REPO), env_vars.get("PYTHONPATH", "")) if p))
        try:
            r = subprocess.run([sys.executable, "-m", "pipelines.cli", "models", "list", "-p", str(pfile)],
                               env=env_vars, cwd=tmp_path, capture_output=True, text=True, timeout=120, check=False)
        except subprocess.TimeoutExpired:
            pytest.fail("`xct models list` against a black-holed MLflow still running after 120 s")
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 1 and len(lines) == 1, (r.returncode, r.stdout, r.stderr)
    assert lines[0].startswith(f"xct: error: MLflow at {hole.url} {CANNOT}") and "no answer within 3 s" in lines[0]
    assert "MLFLOW_HTTP_REQUEST_TIMEOUT=3 s, MLFLOW_HTTP_REQUEST_MAX_RETRIES=1" in lines[0], lines[0]
    assert "no versions" not in r.stdout
