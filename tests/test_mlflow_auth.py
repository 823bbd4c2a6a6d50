"""MLflow authentication against a REAL ``mlflow server --app-name basic-auth`` on 127.0.0.1.

One server per module (tests/mlflow_server.py, ``auth=True``): its config is the deployer's
template from infra/k8s/secrets.template.yaml with a random admin password, and the users
are created by the manifest's own provisioning script (the ``mlflow-users`` Job of
infra/k8s/mlflow.yaml): ``xct-pipeline`` (EDIT on every experiment and registered model)
and ``xct-reader`` (READ). Artifacts are proxied by the server into a local folder.

What is proven: every REST call without credentials is refused (401, while /health stays
open); the project's own register step logs a run and registers + promotes a version with
the service user's ``MLFLOW_TRACKING_USERNAME/PASSWORD``; ``xct models list`` works for both
users; the reader's ``xct models promote`` and a wrong password are each ONE line on
stderr, exit 1, naming the refusal — and the refused promote changed nothing.
"""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from mlflow_server import AUTH_USERS, MlflowServer, k8s_doc, run_users_script
from test_evaluate import build_tiny_processed, export_tiny_stages, make_tiny_params
from test_register import NAME, _write_reports

pytestmark = pytest.mark.timeout(300)

REPO = Path(__file__).resolve().parents[1]
SEARCH = "/api/2.0/mlflow/experiments/search?max_results=5"


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """The basic-auth server with its two users; tiny params and processed data; the test
    process holds NO credentials (each test sets the user it acts as)."""
    root = tmp_path_factory.mktemp("mlflow-auth")
    mp = pytest.MonkeyPatch()
    for var in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_TOKEN"):
        mp.delenv(var, raising=False)
    mp.setenv("MLFLOW_DISABLE_TELEMETRY", "true")
    mp.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")  # a refusal is final; keeps failures fast
    srv = MlflowServer(root / "server", str(root / "server" / "artifacts"), s3_endpoint=None, auth=True)
    try:
        t0 = time.monotonic()
        srv.start(timeout_s=90)
        print(f"basic-auth server up with its users after {time.monotonic() - t0:.1f} s")
        mp.setenv("MLFLOW_TRACKING_URI", srv.url)
        params = make_tiny_params()
        processed = build_tiny_processed(root, params, n_train=1, n_test=1)
        pfile = root / "params.yaml"
        pfile.write_text(yaml.safe_dump(params.model_dump(mode="json")))
        yield {"root": root, "uri": srv.url, "srv": srv, "params": params, "processed": processed,
               "params_file": pfile}
    finally:
        mp.undo()
        srv.stop()


def _get(url: str, creds: dict[str, str] | None = None) -> tuple[int, Any, str]:
    """(status, headers, body) of a GET, with HTTP basic auth when ``creds`` is given."""
    req = urllib.request.Request(url)
    if creds:
        token = f"{creds['MLFLOW_TRACKING_USERNAME']}:{creds['MLFLOW_TRACKING_PASSWORD']}".encode()
        req.add_header("Authorization", "Basic " + base64.b64encode(token).decode())
    try:
        with urllib.request.urlopen(req, timeout=30) as r:  # noqa: S310 - loopback only
            return r.status, r.headers, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.headers, e.read().decode(errors="replace")


def _xct(env: dict[str, Any], *args: str, creds: dict[str, str] | None) -> subprocess.CompletedProcess[str]:
    """``xct ARGS -p params.yaml`` in a fresh process that knows only the server URL and
    ``creds`` (no credentials at all when None)."""
    e = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_TRACKING_")}
    e.update(MLFLOW_TRACKING_URI=env["uri"], **(creds or {}),
             PYTHONPATH=os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p))
    return subprocess.run([sys.executable, "-m", "pipelines.cli", *args, "-p", str(env["params_file"])],
                          env=e, cwd=env["root"], capture_output=True, text=True, timeout=120, check=False)


def _register(env: dict[str, Any], name: str, seed: int, psnr2: float) -> dict[str, Any]:
    """The project's register step (tracking from $MLFLOW_TRACKING_URI + the user's variables)."""
    from components.register import run_register

    run = env["root"] / name
    export_tiny_stages(run / "train", env["params"], seed=seed)
    gates, ev = _write_reports(run, env["params"], {1: 20.0, 2: psnr2}, {1: True, 2: True})
    return run_register(gates, ev, run / "train", run / "summary.json", env["params"], processed_dir=env["processed"])


def _ensure_registered(env: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> None:
    """v1 @champion of NAME exists (registered by the service user), whatever ran before;
    this process then acts as the service user."""
    from mlflow import MlflowClient

    _as(monkeypatch, env["srv"].creds("pipeline"))
    if not MlflowClient(env["uri"]).search_model_versions(f"name='{NAME}'"):
        assert _register(env, "run1", seed=0, psnr2=25.0)["status"] == "promoted"


def _one_line(r: subprocess.CompletedProcess[str]) -> str:
    """The single stderr line of a refused command (exit 1, no traceback)."""
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 1 and len(lines) == 1, (r.returncode, r.stdout, r.stderr)
    assert "Traceback" not in r.stderr and lines[0].startswith("xct: error: MLflow at "), r.stderr
    return lines[0]


def test_without_credentials_every_rest_call_is_401_and_health_stays_open(server: dict[str, Any]) -> None:
    srv = server["srv"]
    status, headers, body = _get(server["uri"] + SEARCH)
    assert status == 401, (status, body)
    assert (headers.get("WWW-Authenticate") or "").startswith("Basic"), dict(headers)
    assert _get(server["uri"] + "/api/2.0/mlflow/registered-models/search")[0] == 401
    assert _get(server["uri"] + "/health")[0] == 200  # probes need no credentials
    # the same call with a user's credentials is answered: it is the credentials that matter
    assert _get(server["uri"] + SEARCH, srv.creds("reader"))[0] == 200
    assert _get(server["uri"] + SEARCH, srv.creds("pipeline", password="not-the-password"))[0] == 401
    # the provisioning script said what it did, without a password
    out = srv.provision_output
    for kind, user in AUTH_USERS.items():
        assert f"mlflow user {user}: created" in out, out
        assert srv.users[kind][1] not in out
    assert srv.users["admin"][1] not in srv.log_tail(10**6)


def _as(monkeypatch: pytest.MonkeyPatch, creds: dict[str, str] | None) -> None:
    """This process acts as ``creds`` (no credentials when None)."""
    for var in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"):
        monkeypatch.delenv(var, raising=False)
    for k, v in (creds or {}).items():
        monkeypatch.setenv(k, v)


def _xct_in_process(capsys: pytest.CaptureFixture[str], *args: str) -> subprocess.CompletedProcess[str]:
    """``xct ARGS`` through the console entry point in this process (its environment)."""
    from cli_run import xct

    capsys.readouterr()
    code = xct(list(args))
    out, err = capsys.readouterr()
    return subprocess.CompletedProcess(list(args), code, out, err)


def test_service_user_logs_registers_and_lists(server: dict[str, Any], monkeypatch: pytest.MonkeyPatch,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    from mlflow import MlflowClient
    from mlflow.server import get_app_client

    srv = server["srv"]
    _as(monkeypatch, srv.creds("pipeline"))
    s1 = _register(server, "run1", seed=0, psnr2=25.0)
    assert s1["status"] == "promoted" and s1["model_uri"] == f"models:/{NAME}/1", s1
    c = MlflowClient(server["uri"])
    mv = c.get_model_version_by_alias(NAME, "champion")
    assert str(mv.version) == "1"
    assert sorted(a.path for a in c.list_artifacts(mv.run_id, "gates")) == ["gates/stage1.json", "gates/stage2.json"]
    exp_id = c.get_run(mv.run_id).info.experiment_id

    # what the grants are, as the server resolves them (asked as the admin): the creator
    # manages what it created, the reader reads it, a user without a role gets nothing
    _as(monkeypatch, srv.creds("admin"))
    admin = get_app_client("basic-auth", tracking_uri=server["uri"])
    admin.create_user("xct-nobody", "nobody-password-1234")
    perm = {(u, t, i): admin.get_user_permission(u, t, i).permission
            for u in ("xct-pipeline", "xct-reader", "xct-nobody") for t, i in (("experiment", exp_id), ("registered_model", NAME))}
    assert perm == {("xct-pipeline", "experiment", exp_id): "MANAGE", ("xct-pipeline", "registered_model", NAME): "MANAGE",
                    ("xct-reader", "experiment", exp_id): "READ", ("xct-reader", "registered_model", NAME): "READ",
                    ("xct-nobody", "experiment", exp_id): "NO_PERMISSIONS",
                    ("xct-nobody", "registered_model", NAME): "NO_PERMISSIONS"}, perm

    for kind in ("pipeline", "reader"):
        _as(monkeypatch, srv.creds(kind))
        r = _xct_in_process(capsys, "models", "list", "-p", str(server["params_file"]))
        assert r.returncode == 0, (kind, r.stderr[-3000:])
        rows = {ln.split()[0]: ln for ln in r.stdout.splitlines() if ln.strip()[:1].isdigit()}
        assert set(rows) == {"1"} and "champion" in rows["1"], (kind, r.stdout)


def test_reader_cannot_promote_and_a_refusal_is_one_line(server: dict[str, Any], monkeypatch: pytest.MonkeyPatch,
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    """As a user runs it: a fresh `xct` process with only the URL and the reader's variables."""
    from mlflow import MlflowClient

    _ensure_registered(server, monkeypatch)
    srv = server["srv"]
    r = _xct(server, "models", "promote", "1", "--alias", "candidate", creds=srv.creds("reader"))
    line = _one_line(r)
    assert "permission denied (HTTP 403)" in line and "'xct-reader'" in line and "@candidate" in line, line
    assert "cannot answer" not in line and srv.users["reader"][1] not in line
    c = MlflowClient(server["uri"])  # the refused promote changed nothing
    assert "candidate" not in (c.get_model_version(NAME, "1").aliases or [])

    # the service user may move aliases: the same command works for it
    _as(monkeypatch, srv.creds("pipeline"))
    ok = _xct_in_process(capsys, "models", "promote", "1", "--alias", "candidate", "-p", str(server["params_file"]))
    assert ok.returncode == 0 and "is now @candidate" in ok.stdout, ok.stderr[-3000:]
    assert "candidate" in (c.get_model_version(NAME, "1").aliases or [])


def test_wrong_or_missing_credentials_are_one_line(server: dict[str, Any], monkeypatch: pytest.MonkeyPatch,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    _ensure_registered(server, monkeypatch)
    srv = server["srv"]
    wrong = "wrong-password-4242"
    for creds, args, why in (
        (srv.creds("pipeline", password=wrong), ("models", "list"), "'xct-pipeline' with the given MLFLOW_TRACKING_PASSWORD"),
        (srv.creds("pipeline", password=wrong), ("models", "promote", "1"), "'xct-pipeline' with the given"),
        (None, ("models", "list"), "no credentials were sent"),
    ):
        _as(monkeypatch, creds)
        line = _one_line(_xct_in_process(capsys, *args, "-p", str(server["params_file"])))
        assert "not authenticated (HTTP 401)" in line and why in line, line
        assert "MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD" in line, line
        assert wrong not in line and srv.users["pipeline"][1] not in line


def test_users_script_refuses_the_templates_placeholders(server: dict[str, Any], tmp_path: Path) -> None:
    """The Job's script fails in one line when a user Secret still holds the template's
    CHANGE_ME values, before creating anyone."""
    srv = server["srv"]
    users = tmp_path / "mlflow-users"
    for kind in AUTH_USERS:
        (users / kind).mkdir(parents=True)
        for key, value in k8s_doc("secrets.template.yaml", "Secret", f"xct-mlflow-{kind}")["stringData"].items():
            (users / kind / key).write_text(value)
    code, out, err = run_users_script(server["uri"], srv.auth_config_path, users)
    assert code == 1 and out == "" and len(err.strip().splitlines()) == 1, (code, out, err)
    assert "still the template's placeholder" in err and "MLFLOW_TRACKING_USERNAME" in err, err
    status, _h, body = _get(server["uri"] + "/api/2.0/mlflow/users/list", srv.creds("admin"))
    # roles by user, less MLflow's synthetic per-user role (``__user_<id>__``: the creator's MANAGE grants)
    users = {u["username"]: sorted(r["name"] for r in u["roles"] if not r["name"].startswith("__user_"))
             for u in json.loads(body)["users"]}
    assert status == 200 and not any(n.startswith("CHANGE_ME") for n in users), users
    # what the Job's successful run left: each user holds exactly its role
    assert users["xct-pipeline"] == ["xct-pipeline"] and users["xct-reader"] == ["xct-reader"], users
