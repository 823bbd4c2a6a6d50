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
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

from moto_server import HOST, free_port


class MlflowServer:
    """``python -m mlflow server`` with proxied S3 artifacts and a sqlite backend in ``root``
    (default) or ``backend_store_uri`` (e.g. ``postgresql+psycopg2://…`` from PostgresServer)."""

    def __init__(self, root: Path, artifacts_destination: str, *, s3_endpoint: str, env: dict[str, str] | None = None,
                 backend_store_uri: str | None = None):
        self.root = Path(root)
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
        env = {**os.environ, **self.extra_env}
        env.update({
            "MLFLOW_S3_ENDPOINT_URL": self.s3_endpoint,
            "MLFLOW_DISABLE_TELEMETRY": "true",
            "DO_NOT_TRACK": "1",
            # MLflow 3.x also starts a job runner + ~7 huey consumer processes (GenAI jobs) by
            # default: nothing here needs them, and on a 2-core box they double start-up time
            "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",
            "MLFLOW_SERVER_ALLOWED_HOSTS": f"{HOST}:{self.port},localhost:{self.port}",
        })
        env.pop("MLFLOW_TRACKING_URI", None)
        return env

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
        cmd = [
            sys.executable, "-m", "mlflow", "server",
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
