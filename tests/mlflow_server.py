"""A real ``mlflow server`` for tests: a child process on 127.0.0.1, free port, S3 artifacts.

Usage (fixtures imported into a test module are picked up by pytest)::

    from mlflow_server import MlflowServer
    from moto_server import MotoServer, aws_env, moto_s3  # noqa: F401

    with MlflowServer(tmp_path, "s3://xct-test/mlflow", s3_endpoint=moto_s3.url).start() as srv:
        monkeypatch.setenv("MLFLOW_TRACKING_URI", srv.url)

Artifacts are **proxied** (``--serve-artifacts --artifacts-destination s3://…``) rather than
``--default-artifact-root s3://…``: only the server holds the S3 endpoint and credentials;
clients talk HTTP to the server and see ``mlflow-artifacts:/…`` locations, which the server
maps to ``<destination>/…`` (:meth:`MlflowServer.s3_key`). That is the shape of a shared
team server (clients need no bucket credentials), and it lets a test prove that uploads go
through the server. (Downloads: MLflow 3.17 clients fetch presigned S3 URLs from such a
server and read the bucket directly unless ``MLFLOW_ENABLE_PROXY_MULTIPART_DOWNLOAD=false``.)

Start-up waits for ``GET /health`` in a bounded loop and fails with the tail of the
server's log (captured to a file) when it does not come up; :meth:`stop` terminates the
process group (uvicorn workers included) and kills it after a timeout.

``auth=True``: ``mlflow server --app-name basic-auth`` (docs/security.md). Its config is
the deployer's template (the ``basic_auth.ini`` of Secret ``xct-mlflow-auth`` in
infra/k8s/secrets.template.yaml) with a random admin password and a sqlite auth database in
``root`` (written there, 0600, never in the repo); after start the manifest's own
provisioning script (ConfigMap ``mlflow-users`` in infra/k8s/mlflow.yaml) creates the
users ``xct-pipeline`` (EDIT on every experiment and registered model) and ``xct-reader``
(READ) with random passwords: :meth:`MlflowServer.creds` gives a user's client variables.
"""

from __future__ import annotations

import configparser
import contextlib
import io
import os
import runpy
import secrets
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import yaml

from moto_server import HOST, free_port

REPO = Path(__file__).resolve().parents[1]
K8S = REPO / "infra" / "k8s"
#: the users the provisioning script creates (kind → username); passwords are random per server
AUTH_USERS = {"pipeline": "xct-pipeline", "reader": "xct-reader"}
ADMIN = "admin"
#: the server's and a client's credential variables: never inherited from the caller
_CRED_VARS = ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_TOKEN",
              "MLFLOW_AUTH_ADMIN_USERNAME", "MLFLOW_AUTH_ADMIN_PASSWORD", "MLFLOW_AUTH_CONFIG_PATH")


def k8s_doc(filename: str, kind: str, name: str) -> dict:
    """One object of an infra/k8s manifest."""
    for doc in yaml.safe_load_all((K8S / filename).read_text(encoding="utf-8")):
        if doc and doc.get("kind") == kind and doc["metadata"]["name"] == name:
            return doc
    raise LookupError(f"no {kind} {name} in infra/k8s/{filename}")


def provisioning_script() -> str:
    """The mlflow-users Job's script (ConfigMap ``mlflow-users`` of infra/k8s/mlflow.yaml)."""
    return k8s_doc("mlflow.yaml", "ConfigMap", "mlflow-users")["data"]["mlflow_users.py"]


def run_users_script(url: str, auth_config: Path, users_dir: Path) -> tuple[object, str, str]:
    """Run the mlflow-users Job's script against ``url`` with the Job's environment variables
    (the auth file, the users folder) in THIS process (mlflow is imported already: a fresh
    interpreter costs seconds of CPU); the environment is restored afterwards (the script
    sets the admin's variables). Returns (exit code, stdout, stderr)."""
    script = Path(users_dir).parent / "mlflow_users.py"
    script.write_text(provisioning_script(), encoding="utf-8")
    env = {k: v for k, v in os.environ.items() if k not in _CRED_VARS}
    env.update(MLFLOW_TRACKING_URI=url, MLFLOW_AUTH_CONFIG_PATH=str(auth_config), XCT_MLFLOW_USERS_DIR=str(users_dir),
               XCT_MLFLOW_WAIT_S="30")
    saved = dict(os.environ)
    out, err = io.StringIO(), io.StringIO()
    code: object = 0
    try:
        os.environ.clear()
        os.environ.update(env)
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            runpy.run_path(str(script), run_name="__main__")
    except SystemExit as e:
        code = e.code
    finally:
        os.environ.clear()
        os.environ.update(saved)
    return code, out.getvalue(), err.getvalue()


class MlflowServer:
    """``python -m mlflow server`` with proxied S3 artifacts and a sqlite backend in ``root``
    (default) or ``backend_store_uri`` (e.g. ``postgresql+psycopg2://…`` from PostgresServer)."""

    def __init__(self, root: Path, artifacts_destination: str, *, s3_endpoint: str | None,
                 env: dict[str, str] | None = None, backend_store_uri: str | None = None, auth: bool = False):
        self.root = Path(root)
        self.auth = auth
        #: kind ("admin", "pipeline", "reader") → (username, password); filled by start() with auth
        self.users: dict[str, tuple[str, str]] = {}
        self._flask_key = ""
        self.provision_output = ""
        self._backend_store_uri = backend_store_uri
        self.root.mkdir(parents=True, exist_ok=True)
        self.destination = artifacts_destination.rstrip("/")
        self.s3_endpoint = s3_endpoint
        self.extra_env = dict(env or {})
        self.port = 0
        self.proc: subprocess.Popen[bytes] | None = None
        self.log_path = self.root / "mlflow-server.log"

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.port}"

    @property
    def backend_uri(self) -> str:
        """``--backend-store-uri``: the one given, else ``sqlite:///<root>/mlflow.db``."""
        return self._backend_store_uri or f"sqlite:///{self.root / 'mlflow.db'}"

    def server_env(self) -> dict[str, str]:
        """The server's environment: the caller's (dummy AWS credentials from ``aws_env``)
        + the S3 endpoint, telemetry and the job runner off, the allowed Host headers."""
        env = {k: v for k, v in {**os.environ, **self.extra_env}.items() if k not in _CRED_VARS}
        if self.s3_endpoint:
            env["MLFLOW_S3_ENDPOINT_URL"] = self.s3_endpoint
        if self.auth:
            env["MLFLOW_AUTH_CONFIG_PATH"] = str(self.auth_config_path)
            env["MLFLOW_FLASK_SERVER_SECRET_KEY"] = self._flask_key
        env.update({
            "MLFLOW_DISABLE_TELEMETRY": "true",
            "DO_NOT_TRACK": "1",
            # MLflow 3.x also starts a job runner + ~7 huey consumer processes (GenAI jobs) by
            # default: nothing here needs them, and on a 2-core box they double start-up time
            "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",
            "MLFLOW_SERVER_ALLOWED_HOSTS": f"{HOST}:{self.port},localhost:{self.port}",
        })
        env.pop("MLFLOW_TRACKING_URI", None)
        return env

    @property
    def auth_config_path(self) -> Path:
        return self.root / "basic_auth.ini"

    def write_auth_config(self) -> None:
        """The template's ``basic_auth.ini`` with a random admin password and a sqlite auth
        database in ``root`` (0600); every other setting as a deployer gets it."""
        template = k8s_doc("secrets.template.yaml", "Secret", "xct-mlflow-auth")["stringData"]["basic_auth.ini"]
        ini = configparser.ConfigParser()
        ini.read_string(template)
        sec = ini["mlflow"]
        assert sec["admin_password"].startswith("CHANGE_ME") and sec["admin_username"].startswith("CHANGE_ME"), dict(sec)
        sec["admin_username"] = ADMIN
        sec["admin_password"] = secrets.token_urlsafe(24)
        sec["database_uri"] = f"sqlite:///{self.root / 'basic_auth.db'}"
        # test speed only (the template keeps MLflow's 0): each request otherwise pays one scrypt
        # password check (~0.1 s of CPU), and a registration makes ~150 requests
        sec["auth_cache_ttl_seconds"] = "300"
        self.users["admin"] = (sec["admin_username"], sec["admin_password"])
        self._flask_key = secrets.token_hex(32)
        fd = os.open(self.auth_config_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            ini.write(f)

    def creds(self, kind: str, password: str | None = None) -> dict[str, str]:
        """``MLFLOW_TRACKING_USERNAME`` / ``_PASSWORD`` of user ``kind`` (``password``
        replaces the real one: a wrong-password client)."""
        user, pw = self.users[kind]
        return {"MLFLOW_TRACKING_USERNAME": user, "MLFLOW_TRACKING_PASSWORD": pw if password is None else password}

    def provision_users(self) -> None:
        """Run the manifest's provisioning script (with the k8s Job's environment variables)
        with random passwords for :data:`AUTH_USERS`; RuntimeError with its output on failure."""
        users_dir = self.root / "mlflow-users"
        for kind, name in AUTH_USERS.items():
            d = users_dir / kind
            d.mkdir(parents=True, exist_ok=True)
            pw = secrets.token_urlsafe(18)
            (d / "MLFLOW_TRACKING_USERNAME").write_text(name + "\n")
            (d / "MLFLOW_TRACKING_PASSWORD").write_text(pw + "\n")
            self.users[kind] = (name, pw)
        code, out, err = run_users_script(self.url, self.auth_config_path, users_dir)
        if code not in (0, None):
            raise RuntimeError(f"mlflow-users script exited with {code}:\n{out}{err[-3000:]}\n"
                               f"--- server log ---\n{self.log_tail()}")
        self.provision_output = out

    def log_tail(self, n: int = 4000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-n:]
        except OSError:
            return "(no server log)"

    def healthy(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.url}/health", timeout=2) as r:  # noqa: S310 - loopback only
                return r.status == 200
        except (urllib.error.URLError, OSError):
            return False

    def start(self, timeout_s: float = 60.0) -> MlflowServer:
        """Start on a free port and wait (≤ ``timeout_s``) for ``/health``; RuntimeError with
        the log tail when it exits or does not answer in time."""
        self.port = free_port()
        if self.auth:
            self.write_auth_config()
        cmd = [
            sys.executable, "-m", "mlflow", "server", *(["--app-name", "basic-auth"] if self.auth else []),
            "--host", HOST, "--port", str(self.port), "--workers", "1",
            "--backend-store-uri", self.backend_uri,
            "--serve-artifacts", "--artifacts-destination", self.destination,
            "--allowed-hosts", f"{HOST}:{self.port},localhost:{self.port}",
        ]
        with open(self.log_path, "wb") as logf:
            self.proc = subprocess.Popen(
                cmd, stdout=logf, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                env=self.server_env(), cwd=self.root, start_new_session=True,
            )
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                break
            if self.healthy():
                if self.auth:
                    try:
                        self.provision_users()
                    except BaseException:
                        self.stop()
                        raise
                return self
            time.sleep(0.25)
        code = self.proc.poll()
        self.stop()
        why = f"exited with {code}" if code is not None else f"did not answer /health within {timeout_s:.0f} s"
        raise RuntimeError(f"mlflow server {why}; log {self.log_path}:\n{self.log_tail()}")

    def stop(self, timeout_s: float = 15.0) -> None:
        """SIGTERM to the server's process group, SIGKILL after ``timeout_s``; reaped."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
            try:
                self.proc.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                try:
                    os.killpg(self.proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                self.proc.wait(timeout=timeout_s)
        else:  # leader gone: make sure no orphaned worker keeps the port
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        self.proc = None

    def s3_key(self, artifact_uri: str) -> str:
        """The S3 key (within the destination's bucket) of an ``mlflow-artifacts:/…`` URI."""
        rel = artifact_uri.removeprefix("mlflow-artifacts:").lstrip("/")
        bucket_and_prefix = self.destination.removeprefix("s3://")
        prefix = bucket_and_prefix.partition("/")[2]
        return f"{prefix}/{rel}" if prefix else rel

    def __enter__(self) -> MlflowServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
