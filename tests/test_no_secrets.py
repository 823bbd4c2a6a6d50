"""No secret in any output (issue 23 item 4).

Sentinel secrets — random strings — sit where a deployer's credentials sit: in the
environment (``AWS_SECRET_ACCESS_KEY``, ``AWS_ACCESS_KEY_ID``, ``MLFLOW_TRACKING_PASSWORD``,
``RAY_AUTH_TOKEN``) and inside URLs (``MLFLOW_TRACKING_URI=http://xct:S@127.0.0.1:port``,
``AWS_ENDPOINT_URL=http://AKIA…:S@127.0.0.1:port``). The real program then runs its S3 path
(a moto server: a push and a pull that succeed, a push against an unreachable endpoint that
fails), its MLflow path (a real ``mlflow server``: ``xct models list``, ``models show`` of a
missing version, a registry that cannot answer, a stage run whose params, tags and failure
message carry URLs), the register step that writes ``reports/summary.json`` and the model
card, the KFP exit summary and the Ray training failure JSON — with every library logging at
DEBUG into a log file. Then EVERY output is searched for every sentinel: stdout and stderr
(file-descriptor level), the log file, every file under the test's temporary folders (the
MLflow server's sqlite store and log included) and every object in the S3 server.

The search is proven able to fail (``test_the_search_finds_an_unredacted_secret``), and the
redaction itself is checked against the un-redacted text it replaces.
"""

from __future__ import annotations

import logging
import os
import secrets
import socket
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from cli_run import xct
from mlflow_server import MlflowServer
from moto_server import HOST, MotoServer, isolate_aws_env

from xct_core.errors import error_line, warning_line
from xct_core.redact import MASK, redact, redact_doc, redact_url, redacted_output


def _token(prefix: str = "") -> str:
    return prefix + secrets.token_hex(12)


def _dead_port() -> int:
    """A 127.0.0.1 port nothing listens on (connection refused at once)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


def _scan_tree(root: Path, needles: dict[str, str]) -> list[str]:
    """``path: NAME`` for every file below ``root`` (names included) holding a sentinel."""
    hits = []
    for p in sorted(root.rglob("*")):
        for name, value in needles.items():
            if value in str(p):
                hits.append(f"{p} (its name): {name}")
        if p.is_file() and not p.is_symlink():
            data = p.read_bytes()
            hits += [f"{p}: {name}" for name, value in needles.items() if value.encode() in data]
    return hits


def _scan_text(where: str, text: str, needles: dict[str, str]) -> list[str]:
    return [f"{where}: {name}" for name, value in needles.items() if value in text]


def _scan_s3(client, needles: dict[str, str]) -> list[str]:  # noqa: ANN001 - a boto3 client
    hits = []
    for b in client.list_buckets().get("Buckets", []):
        for page in client.get_paginator("list_objects_v2").paginate(Bucket=b["Name"]):
            for obj in page.get("Contents", []):
                body = client.get_object(Bucket=b["Name"], Key=obj["Key"])["Body"].read()
                hits += [f"s3://{b['Name']}/{obj['Key']}: {n}" for n, v in needles.items()
                         if v.encode() in body or v in obj["Key"]]
    return hits


@pytest.fixture
def debug_log(tmp_path: Path) -> Iterator[Path]:
    """Every logger (boto, urllib3, MLflow, ours) at DEBUG into ``tmp/debug.log``."""
    path = tmp_path / "logs" / "debug.log"
    path.parent.mkdir()
    handler = logging.FileHandler(path, encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(name)s %(levelname)s %(message)s"))
    root = logging.getLogger()
    old = root.level
    root.addHandler(handler)
    root.setLevel(logging.DEBUG)
    try:
        yield path
    finally:
        root.removeHandler(handler)
        root.setLevel(old)
        handler.close()


def _tiny_ct(path: Path) -> Path:
    from dicom_synth import write_nifti

    data = np.full((4, 5, 6), 40, np.int16)
    data[0, 0, 0] = -1000
    return write_nifti(path, data, np.diag([0.5, 0.75, 2.0, 1.0]))


# --------------------------------------------------------------------------- the redaction


def test_redact_masks_url_passwords_query_credentials_and_secret_env_values(monkeypatch: pytest.MonkeyPatch) -> None:
    key, tok = _token("k"), _token("t")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", key)
    monkeypatch.setenv("SOME_SERVICE_TOKEN", tok)
    monkeypatch.setenv("SOME_SERVICE_TOKEN_FILE", "/run/secrets/some-token-file")  # a path, shown
    cases = {
        "http://xct:pw@mlflow:5000/api": "http://xct:***@mlflow:5000/api",
        "postgresql+psycopg2://mlflow:s3cr@t@db:5432/mlflow": "postgresql+psycopg2://mlflow:***@db:5432/mlflow",
        "mysql://u:p@h/db": "mysql://u:***@h/db",
        "https://ghp_tokenonly@github.com/x.git": "https://***@github.com/x.git",
        "s3://xct-data/raw/a@b.nii.gz": "s3://xct-data/raw/a@b.nii.gz",  # no userinfo: unchanged
        "sqlite:////tmp/mlflow.db": "sqlite:////tmp/mlflow.db",
        "https://b.s3.amazonaws.com/k?X-Amz-Credential=AKIA%2F1&X-Amz-Date=1&X-Amz-Signature=ab12&x=1":
            "https://b.s3.amazonaws.com/k?X-Amz-Credential=***&X-Amz-Date=1&X-Amz-Signature=***&x=1",
        "http://h/?token=abc&password=def&access_key=g&plain=1": "http://h/?token=***&password=***&access_key=***&plain=1",
        "Authorization: Bearer abc.def.ghi": "Authorization: Bearer ***",
        f"key {key}, token {tok}": "key ***, token ***",
        "see /run/secrets/some-token-file": "see /run/secrets/some-token-file",
    }
    for raw, want in cases.items():
        assert redact(raw) == want, raw
    assert redact_url("http://xct:pw@mlflow:5000") == "http://xct:***@mlflow:5000"
    # a short env value is not masked as free text (it would garble words), in a URL it is
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", "pw")
    assert redact("pwd: http://u:pw@h") == "pwd: http://u:***@h"
    doc = redact_doc({"uri": "http://u:pw@h", "n": 3, "x": [f"s {key}", None, 1.5], "ok": True})
    assert doc == {"uri": "http://u:***@h", "n": 3, "x": ["s ***", None, 1.5], "ok": True}
    # one redaction: the hpo storage URL goes through it too (no second masking anywhere)
    repo = Path(__file__).resolve().parents[1]
    assert "mask_url = redact_url" in (repo / "components" / "hpo.py").read_text()
    assert not [p for d in ("components", "pipelines", "xct_core") for p in (repo / d).rglob("*.py")
                if "hide_password" in p.read_text()]


def test_error_warning_and_note_lines_are_redacted_and_one_line(monkeypatch: pytest.MonkeyPatch) -> None:
    from xct_core.errors import note_line

    secret = _token()
    monkeypatch.setenv("RAY_AUTH_TOKEN", secret)
    name = f"evil\nxct: error: forged\x1b]0;pwned\x07 {secret} http://u:{secret}@h"
    for make, kind in ((error_line, "error"), (warning_line, "warning"), (note_line, "note")):
        line = make(name)
        assert line.startswith(f"xct: {kind}: evil\\nxct: error: forged\\x1b]0;pwned\\x07 ")
        assert "\n" not in line and "\x1b" not in line and "\x07" not in line and secret not in line
        assert line.endswith("*** http://u:***@h")


def test_library_log_lines_and_prints_are_redacted_inside_the_cli(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                  capfd: pytest.CaptureFixture[str]) -> None:
    """A library logger with its OWN handler (not the root's) and a bare print: both redacted
    inside :func:`redacted_output`, both raw outside it — so the search below can fail."""
    secret = _token()
    monkeypatch.setenv("AWS_SESSION_TOKEN", secret)
    log_path = tmp_path / "lib.log"
    lib = logging.getLogger("xct_test_thirdparty")
    handler = logging.FileHandler(log_path, encoding="utf-8")
    lib.addHandler(handler)
    lib.setLevel(logging.INFO)
    lib.propagate = False
    try:
        with redacted_output():
            lib.info("connecting with token %s to %s", secret, f"http://u:{secret}@h")
            try:
                raise RuntimeError(f"boom {secret}")
            except RuntimeError:
                lib.exception("failed")
            print(f"a print with {secret}")
        handler.flush()
        inside, out = log_path.read_text(), capfd.readouterr().out
        assert "connecting with token *** to http://u:***@h" in inside and "RuntimeError: boom ***" in inside
        assert "a print with ***" in out and secret not in inside + out
        lib.info("outside %s", secret)  # the CLI's redaction is scoped to its run
        print(f"outside {secret}")
        handler.flush()
        assert _scan_text("log", log_path.read_text(), {"S": secret}) == ["log: S"]
        assert _scan_text("stdout", capfd.readouterr().out, {"S": secret}) == ["stdout: S"]
    finally:
        lib.removeHandler(handler)
        handler.close()
        lib.propagate = True


def test_the_search_finds_an_unredacted_secret(tmp_path: Path) -> None:
    """The searches of the end-to-end test report a sentinel written raw (they can fail)."""
    s = _token()
    (tmp_path / "deep" / "er").mkdir(parents=True)
    (tmp_path / "deep" / "er" / "store.db").write_bytes(b"\x00sqlite\x00" + s.encode() + b"\x00")
    (tmp_path / "clean.txt").write_text(redact(f"http://u:{s}@h"))
    assert _scan_tree(tmp_path, {"S": s}) == [f"{tmp_path / 'deep' / 'er' / 'store.db'}: S"]
    (tmp_path / f"named-{s}").write_text("")
    assert f"{tmp_path / f'named-{s}'} (its name): S" in _scan_tree(tmp_path, {"S": s})
    assert _scan_text("stderr", f"xct: error: at http://u:{s}@h", {"S": s}) == ["stderr: S"]
    assert _scan_text("stderr", error_line(f"at http://u:{s}@h"), {"S": s}) == []


# --------------------------------------------------------------------------- file names


def test_file_names_in_wrote_and_source_lines_are_escaped(tmp_path: Path, capfd: pytest.CaptureFixture[str]) -> None:
    src = _tiny_ct(tmp_path / "in\nxct: error: forged\x1b]0;pwned\x07.nii.gz")
    out = tmp_path / "out\nxct: error: forged\x1b[31m.nii.gz"
    assert xct(["ct", "convert", src, out]) == 0
    assert xct(["ct", "info", src]) == 0
    text = "".join(capfd.readouterr())
    assert out.is_file()
    assert "\x1b" not in text and "\x07" not in text
    assert not any(ln.startswith("xct: error:") for ln in text.splitlines()), text
    assert "wrote " in text and "out\\nxct: error: forged\\x1b[31m.nii.gz" in text
    assert "in\\nxct: error: forged\\x1b]0;pwned\\x07.nii.gz" in text  # the `source:` line of ct info
    # a step's log line naming a file that failed to load (`xct step ingest`)
    raw = tmp_path / "raw"
    raw.mkdir()
    (raw / "bad\nxct: error: forged\x1b[2J.nii.gz").write_bytes(b"junk")
    xct(["step", "ingest", "--raw", raw, "--out", tmp_path / "interim"])
    text = "".join(capfd.readouterr())
    assert "load error: bad\\nxct: error: forged\\x1b[2J.nii.gz: " in text, text
    assert "\x1b" not in text and not any(ln.startswith("xct: error: forged") for ln in text.splitlines())


# --------------------------------------------------------------------------- end to end


@pytest.fixture
def sentinels(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    """Random credentials in the environment (AWS, MLflow, Ray) and for URLs."""
    isolate_aws_env(monkeypatch, tmp_path_factory.mktemp("aws"))
    s = {
        "AWS_ACCESS_KEY_ID": "AKIA" + secrets.token_hex(8).upper(),
        "AWS_SECRET_ACCESS_KEY": _token("sak"),
        "MLFLOW_TRACKING_PASSWORD": _token("mtp"),
        "RAY_AUTH_TOKEN": _token("rat"),
        "mlflow URI password": _token("mup"),
        "S3 endpoint URL password": _token("sep"),
    }
    for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "MLFLOW_TRACKING_PASSWORD", "RAY_AUTH_TOKEN"):
        monkeypatch.setenv(k, s[k])
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "xct")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "5")
    return s


S3_FAST = ["--set", "s3.request_attempts=1", "--set", "s3.object_attempts=1", "--set", "s3.connect_timeout_s=2",
           "--quiet"]


@pytest.mark.integration  # moto + a real mlflow server (≈ 20 s quiet, 75 s on a loaded 2-core box): not in test-fast
def test_no_sentinel_secret_in_any_output(tmp_path: Path, sentinels: dict[str, str], debug_log: Path,
                                          monkeypatch: pytest.MonkeyPatch, capfd: pytest.CaptureFixture[str]) -> None:
    s = sentinels
    outputs: dict[str, str] = {}

    def run(label: str, args: list, want: int) -> str:
        code = xct(args)
        out, err = capfd.readouterr()
        outputs[f"{label} stdout"], outputs[f"{label} stderr"] = out, err
        assert code == want, f"{label}: exit {code}\n{out}\n{err}"
        return out + err

    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    (tmp_path / "moto-log").mkdir()
    moto = MotoServer(tmp_path / "moto-log").start()
    try:
        client = moto.client()
        client.create_bucket(Bucket="xct-data")
        client.create_bucket(Bucket="xct-mlflow")
        # ---- S3: the endpoint URL carries the access key and a password
        endpoint = f"http://{s['AWS_ACCESS_KEY_ID']}:{s['S3 endpoint URL password']}@{HOST}:{moto.port}"
        monkeypatch.setenv("AWS_ENDPOINT_URL", endpoint)
        src = work / "push-me"
        src.mkdir()
        (src / "a.txt").write_text("payload\n")
        os.symlink("a.txt", src / "link\nxct: error: forged\x1b]0;pwned\x07")
        text = run("push", ["data", "push", src, "s3://xct-data/raw", *S3_FAST], 0)
        assert "pushed 1 object" in text or "1 object" in text
        assert "symlink skipped" in text and "\x1b" not in text
        assert not any(ln.startswith("xct: error:") for ln in text.splitlines())
        run("pull", ["data", "pull", "s3://xct-data/raw", work / "pulled", *S3_FAST], 0)
        assert (work / "pulled" / "a.txt").read_text() == "payload\n"
        dead = f"http://{s['AWS_ACCESS_KEY_ID']}:{s['S3 endpoint URL password']}@{HOST}:{_dead_port()}"
        monkeypatch.setenv("AWS_ENDPOINT_URL", dead)
        text = run("push unreachable", ["data", "push", src, "s3://xct-data/raw", *S3_FAST], 1)
        assert "cannot reach the S3 endpoint http://***:***@127.0.0.1:" in text, text
        monkeypatch.delenv("AWS_ENDPOINT_URL")

        # ---- MLflow: a real server; the tracking URI carries a password
        with MlflowServer(tmp_path / "mlflow", "s3://xct-mlflow/artifacts", s3_endpoint=moto.url).start() as srv:
            uri = f"http://xct:{s['mlflow URI password']}@{HOST}:{srv.port}"
            monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
            text = run("models list", ["models", "list"], 0)
            assert f"http://xct:{MASK}@{HOST}:{srv.port}" in text
            text = run("models show", ["models", "show", "7"], 2)
            assert "xct: error:" in text
            with redacted_output():  # what every entry point does (the CLI, a KFP task, realct)
                _stage_run_with_secrets(tmp_path / "train", uri, s)
            out, err = capfd.readouterr()
            outputs["stage run stdout"], outputs["stage run stderr"] = out, err
            assert f"View run stage1 at: http://xct:{MASK}@" in out  # MLflow's own print, redacted
            # the register step (no gate passed: rejected) writes summary.json and the model card
            reports = work / "reports"
            text = run("register", ["step", "register", "--gates", work / "gates", "--eval", work / "eval",
                                    "--train-dir", work / "train", "--processed", work / "processed",
                                    "--out", reports / "summary.json"], 0)
            assert "rejected" in text
            from components.pipeline_verdict import format_summary, read_summary

            summary = read_summary(reports / "summary.json")
            assert summary["mlflow_tracking_uri"] == f"http://xct:{MASK}@{HOST}:{srv.port}"
            assert (reports / "model_card.json").is_file()
            outputs["format_summary"] = format_summary({**summary, "mlflow_tracking_uri": uri})
        # ---- a registry that cannot answer
        monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://xct:{s['mlflow URI password']}@{HOST}:{_dead_port()}")
        text = run("models list (down)", ["models", "list"], 1)
        assert "cannot answer" in text and f"http://xct:{MASK}@" in text

        # ---- the KFP exit summary and the Ray training failure JSON
        from components.kfp_exit_handler import run_summary, write_run_summary
        from components.train import _failure_file, _write_failure
        from xct_core.layout import RunLayout

        why = f"worker at {uri} failed with token {s['RAY_AUTH_TOKEN']}"
        write_run_summary(run_summary("FAILED", error_message=why, data_uri=endpoint + "/xct-data/raw"), work / "kfp")
        layout = RunLayout(work / "ray-train", 1)
        layout.checkpoints.mkdir(parents=True)
        _write_failure(layout, {"step": 3, "message": why})
        assert "***" in _failure_file(layout).read_text()

        for h in logging.getLogger().handlers:
            h.flush()
        outputs["debug log"] = debug_log.read_text(encoding="utf-8", errors="replace")
        assert "botocore" in outputs["debug log"]  # the libraries did log at DEBUG
        hits = [h for label, text in outputs.items() for h in _scan_text(label, text, s)]
        hits += _scan_tree(tmp_path, s)
        hits += _scan_s3(client, s)
        lines = [f"{label}: {line[:300]!r}" for label, text in outputs.items() for line in text.splitlines()
                 if any(v in line for v in s.values())]
        assert not hits, "secrets leaked:\n" + "\n".join(hits + lines[:20])
    finally:
        moto.stop()


def _stage_run_with_secrets(root: Path, uri: str, s: dict[str, str]) -> None:
    """A stage run against the server whose params, tags and failure message hold secrets;
    what the server stored is masked (checked through the client, and by the file scan)."""
    from components.tracking import StageRun, get_client

    root.mkdir()
    run = StageRun(experiment="xct-secrets", stage=1, run_name="stage1", state_file=root / "state.json",
                   pipeline_file=root / "pipeline.json",
                   params={"data": {"remote": f"s3://{s['AWS_ACCESS_KEY_ID']}@bucket/x",
                                    "store": uri, "n": 2}},
                   tags={"xct.data_uri": f"{uri}/artifacts", "xct.note": f"token {s['RAY_AUTH_TOKEN']}"})
    run.set_tags({"xct.endpoint": f"http://{s['AWS_ACCESS_KEY_ID']}:{s['AWS_SECRET_ACCESS_KEY']}@h"})
    run.end("FAILED", f"cannot reach {uri}: {s['MLFLOW_TRACKING_PASSWORD']}")
    got = get_client(uri).get_run(run.run_id).data
    assert got.params["data.store"].startswith("http://xct:***@") and got.params["data.n"] == "2"
    assert got.tags["xct.note"] == "token ***" and got.tags["xct.failure"].startswith("cannot reach http://xct:***@")


def test_a_bugs_traceback_is_redacted(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    """An unexpected exception leaves ``main`` (a bug: traceback, exit 1, as before) and the
    interpreter prints it with the hook ``main`` installed: redacted."""
    import pipelines.cli as cli
    from xct_core.redact import redacted_excepthook

    secret = _token()
    monkeypatch.setenv("XCT_TEST_URL", f"http://u:{secret}@h")

    def boom(*_a: object, **_k: object) -> None:
        raise RuntimeError("bug near " + os.environ["XCT_TEST_URL"])

    monkeypatch.setattr(cli, "app", boom)
    monkeypatch.setattr(sys, "excepthook", sys.excepthook)  # restored after the test
    with pytest.raises(RuntimeError) as info:
        cli.main(["params", "show"])
    assert sys.excepthook is redacted_excepthook
    sys.excepthook(info.type, info.value, info.tb)
    err = capsys.readouterr().err
    assert "Traceback (most recent call last)" in err and "RuntimeError: bug near http://u:***@h" in err
    assert secret not in err
