"""`xct pipeline submit` against a multi-user Kubeflow: the bearer token (``--token-file``,
``$XCT_KFP_TOKEN``) or the projected service-account token (``--sa-token-file``) reaches the
API as ``Authorization: Bearer …`` on every request, and never reaches the output.

No live Kubeflow exists here: a stdlib HTTP server on 127.0.0.1 stands in for the API. It
records each request's method, path and Authorization header, answers the client's health
check, and refuses everything else with 401 (what a multi-user Kubeflow's auth proxy answers
a refused caller), so the submission fails — which also proves the token stays out of the
error line. The CLI runs in this process (its one-line error handling included).
"""

from __future__ import annotations

import json
import secrets
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


class _Recorder(BaseHTTPRequestHandler):
    seen: list[tuple[str, str, str | None]] = []

    def _answer(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        if length:
            self.rfile.read(min(length, 10_000_000))
        type(self).seen.append((self.command, self.path, self.headers.get("Authorization")))
        if self.path.startswith("/apis/v2beta1/healthz"):  # the client's first call: a healthy API
            status, doc = 200, {"commit_sha": "test", "tag_name": "2.5.0", "multi_user": False}
        else:
            status, doc = 401, {"error": "unauthenticated", "code": 16, "message": "refused by the test server"}
        body = json.dumps(doc).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    do_GET = do_POST = do_PUT = do_DELETE = _answer

    def log_message(self, *args: object) -> None:  # keep pytest's output clean
        pass


@pytest.fixture()
def api() -> Iterator[tuple[str, list]]:
    _Recorder.seen = []
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Recorder)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.1}, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_port}", _Recorder.seen
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)


class _Result:
    def __init__(self, code: int, out: str, err: str) -> None:
        self.returncode, self.stdout, self.stderr = code, out, err


@pytest.fixture()
def submit(capsys: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture,
           monkeypatch: pytest.MonkeyPatch):  # noqa: ANN201 - the runner below
    """``xct pipeline submit --host HOST ARGS`` in this process, ``env`` set for the call; the
    result carries stdout, stderr and every log record (kfp logs through ``logging``)."""
    from pipelines.cli import main

    def run(host: str, *extra: str, env: dict[str, str] | None = None) -> _Result:
        monkeypatch.delenv("XCT_KFP_TOKEN", raising=False)
        for k, v in (env or {}).items():
            monkeypatch.setenv(k, v)
        caplog.clear()
        with pytest.raises(SystemExit) as exc:
            main(["pipeline", "submit", "--host", host, "--params", str(REPO / "params.yaml"), "--timeout", "60", *extra])
        out = capsys.readouterr()
        return _Result(int(exc.value.code or 0), out.out, out.err + caplog.text)

    return run


def _assert_refused_without_leak(proc: _Result, token: str) -> None:
    assert proc.returncode != 0
    err = proc.stderr.strip().splitlines()
    assert err and any(l.startswith("xct: error:") and "Kubeflow Pipelines" in l for l in err), proc.stderr[-2000:]
    assert "401" in proc.stderr, "the refusal reaches the user"
    assert token not in proc.stdout + proc.stderr


def test_token_file_is_sent_as_a_bearer_header_and_never_printed(api: tuple[str, list], tmp_path: Path, submit) -> None:
    host, seen = api
    token = "xct-kfp-" + secrets.token_hex(24)
    (tmp_path / "token").write_text(token + "\n")
    proc = submit(host, "--token-file", str(tmp_path / "token"))
    _assert_refused_without_leak(proc, token)
    assert seen, "the client never reached the server"
    assert all(auth == f"Bearer {token}" for _, _, auth in seen), seen
    assert any(path.startswith("/apis/") for _, path, _ in seen), seen


def test_env_token_and_service_account_token_file(api: tuple[str, list], tmp_path: Path, submit) -> None:
    host, seen = api
    token = "env-" + secrets.token_hex(24)
    _assert_refused_without_leak(submit(host, env={"XCT_KFP_TOKEN": token}), token)
    assert seen and all(auth == f"Bearer {token}" for _, _, auth in seen), seen
    seen.clear()
    sa = "sa-" + secrets.token_hex(24)  # a projected service-account token, read by kfp's credentials class
    (tmp_path / "sa").write_text(sa)
    _assert_refused_without_leak(submit(host, "--sa-token-file", str(tmp_path / "sa")), sa)
    assert seen and all(auth == f"Bearer {sa}" for _, _, auth in seen), seen


def test_without_credentials_no_authorization_header_is_sent(api: tuple[str, list], submit) -> None:
    """The control: the header above comes from the credential, not from the client by itself."""
    host, seen = api
    proc = submit(host)
    assert proc.returncode != 0
    assert seen and all(auth is None for _, _, auth in seen), seen


def test_bad_credentials_are_one_line_before_any_request(api: tuple[str, list], tmp_path: Path, submit) -> None:
    host, seen = api
    token = secrets.token_hex(16)
    (tmp_path / "token").write_text(token)
    (tmp_path / "empty").write_text("\n")
    cases = [
        (["--token-file", str(tmp_path / "missing")], {}, str(tmp_path / "missing")),
        (["--token-file", str(tmp_path / "empty")], {}, "expected one bearer token"),
        (["--token-file", str(tmp_path / "token")], {"XCT_KFP_TOKEN": "other"}, "give one Kubeflow Pipelines credential"),
        (["--token-file", str(tmp_path / "token"), "--sa-token-file", str(tmp_path / "token")], {}, "not --token-file and"),
    ]
    for args, env, want in cases:
        proc = submit(host, *args, env=env)
        lines = proc.stderr.strip().splitlines()
        assert proc.returncode != 0 and len(lines) == 1 and lines[0].startswith("xct: error:"), proc.stderr[-2000:]
        assert want in lines[0] and token not in proc.stderr + proc.stdout, lines
    assert seen == [], "nothing is sent with a bad credential"
