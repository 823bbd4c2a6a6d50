"""`xct data pull|push` (components/s3sync.py) against real S3 endpoints: moto's server and
``rclone serve s3`` (a second, independent S3 implementation; every server test runs on both).

Covers: nested round trip byte-identical; resumable re-runs skip everything; sha256 metadata
written on push; tampered bytes / tampered metadata → clear error, nothing left in place;
the endpoint dying mid-object (SIGKILL) → clear error, no partial or temporary file, and a
re-run against a restarted endpoint resumes; Ctrl-C mid-object; user errors as one line
with the documented exit codes.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest
from moto_server import S3_SERVERS, CutProxy, MotoServer, RcloneS3Server, aws_env, free_port, make_s3_server  # noqa: F401  (aws_env is a fixture)

from components import s3sync
from components.s3sync import ChecksumMismatchError, TransferError, expected_digest, parse_s3_url
from pipelines.cli import main
from components.ops_params import S3Params
from xct_core.errors import InputError

pytestmark = [pytest.mark.timeout(120), pytest.mark.usefixtures("aws_env")]

BUCKET = "xct-test"
#: fast-failing settings: no botocore retries (its standard-mode backoff sleeps up to 2 s),
#: 3 tries per object in our own loop with millisecond backoff; 5 MiB multipart threshold
#: so the big test file exercises the multipart upload path
FAST = S3Params(
    request_attempts=1, object_attempts=3, backoff_s=0.01, backoff_max_s=0.05,
    connect_timeout_s=2.0, read_timeout_s=10.0, multipart_threshold_mb=5, multipart_chunksize_mb=5,
)
FAST_YAML = (
    "s3: {request_attempts: 1, object_attempts: 3, backoff_s: 0.01, backoff_max_s: 0.05, "
    "connect_timeout_s: 2.0, multipart_threshold_mb: 5, multipart_chunksize_mb: 5}\n"
)


@pytest.fixture(scope="module", params=S3_SERVERS)
def server(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory):
    """One server of each kind for the module's non-destructive tests (each test uses its own prefix)."""
    with make_s3_server(request.param, tmp_path_factory.mktemp(request.param)) as m:
        m.client().create_bucket(Bucket=BUCKET)
        yield m


def make_tree(root: Path, big_mib: int = 0) -> dict[str, bytes]:
    """A nested folder with an empty file; optionally one random file of ``big_mib`` MiB."""
    rng = __import__("random").Random(0)
    files = {
        "a.txt": b"frontal+lateral\n",
        "empty.dat": b"",
        "sub/b.bin": rng.randbytes(70_000),
        "sub/deeper/c.nii.gz": rng.randbytes(3_000),
    }
    if big_mib:
        files["z_big.bin"] = os.urandom(big_mib << 20)
    for rel, data in files.items():
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(data)
    return files


def tree_bytes(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def leftovers(root: Path) -> list[str]:
    return [p.name for p in root.rglob(f"*{s3sync.PART_SUFFIX}")] if root.exists() else []


class Killer:
    """Progress sink that runs ``action`` once more than ``after`` bytes have arrived
    (from inside the download loop: the transfer is mid-object when it fires)."""

    def __init__(self, after: int, action):
        self.after, self.action, self.seen, self.fired = after, action, 0, False

    def plan(self, total_bytes: int, n_objects: int) -> None:
        pass

    def advance(self, nbytes: int) -> None:
        self.seen += nbytes
        if not self.fired and self.seen > self.after:
            self.fired = True
            self.action()


# --- pure helpers --------------------------------------------------------------------------


def test_parse_s3_url() -> None:
    assert parse_s3_url("s3://xct-data/raw/ct/") == s3sync.S3Url("xct-data", "raw/ct")
    assert parse_s3_url("s3://xct-data").key_for("a/b.nii") == "a/b.nii"
    assert parse_s3_url("s3://xct-data/p").key_for("a/b.nii") == "p/a/b.nii"
    for bad in ("xct-data/raw", "http://xct-data/raw", "s3://ab/x", "s3://Bad_Bucket/x", "s3://xct-data/a/../b", "s3:///x"):
        with pytest.raises(InputError):
            parse_s3_url(bad)


def test_expected_digest_prefers_sha256_and_ignores_unusable_etags() -> None:
    md5 = hashlib.md5(b"x").hexdigest()
    assert expected_digest({"Metadata": {"sha256": "AB" * 32}, "ETag": f'"{md5}"'}) == ("sha256", "ab" * 32)
    assert expected_digest({"ETag": f'"{md5}"'}) == ("md5", md5)
    assert expected_digest({"ETag": f'"{md5}-3"'}) is None  # multipart
    assert expected_digest({"ETag": f'"{md5}"', "ServerSideEncryption": "aws:kms"}) is None


def test_endpoint_resolution_order(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://aws-env:1")
    assert s3sync.resolve_endpoint() == "http://aws-env:1"
    monkeypatch.setenv("XCT_S3_ENDPOINT_URL", "http://xct-env:2/")
    assert s3sync.resolve_endpoint() == "http://xct-env:2"
    assert s3sync.resolve_endpoint("https://flag:3") == "https://flag:3"
    with pytest.raises(InputError, match="invalid endpoint"):
        s3sync.resolve_endpoint("minio:9000")


def test_client_settings_come_from_params_and_endpoint() -> None:
    cfg = S3Params(request_attempts=7, connect_timeout_s=1.5, read_timeout_s=9.0, addressing_style="path")
    client = s3sync.make_client(cfg, "http://127.0.0.1:9")
    conf = client.meta.config
    assert conf.retries == {"total_max_attempts": 7, "mode": "standard"}
    assert (conf.connect_timeout, conf.read_timeout, conf.s3["addressing_style"]) == (1.5, 9.0, "path")
    assert client.meta.endpoint_url == "http://127.0.0.1:9"
    assert client.meta.region_name == "us-east-1"  # AWS_DEFAULT_REGION of aws_env


# --- round trip, resumability, checksums ---------------------------------------------------


def test_push_pull_round_trip_is_byte_identical_and_resumable(server: MotoServer, tmp_path: Path) -> None:
    src = tmp_path / "src"
    files = make_tree(src, big_mib=6)  # 6 MiB > 5 MiB threshold: multipart upload
    url = f"s3://{BUCKET}/round/trip"
    events: list[s3sync.ObjectEvent] = []

    rep = s3sync.push(src, url, FAST, endpoint_url=server.url, on_object=events.append)
    assert (rep.transferred, rep.skipped) == (len(files), 0)
    assert rep.bytes_transferred == sum(map(len, files.values()))
    assert [e.action for e in events] == ["transferred"] * len(files)
    client = server.client()
    for rel, data in files.items():
        head = client.head_object(Bucket=BUCKET, Key=f"round/trip/{rel}")
        assert {k.lower(): v for k, v in head["Metadata"].items()}["sha256"] == hashlib.sha256(data).hexdigest()
    etag = client.head_object(Bucket=BUCKET, Key="round/trip/z_big.bin")["ETag"].strip('"')
    if isinstance(server, RcloneS3Server):  # rclone stores the parts as one file and reports its MD5
        assert etag == hashlib.md5(files["z_big.bin"]).hexdigest()
    else:  # AWS/moto: the multipart ETag (MD5 of the part MD5s, "-<parts>")
        assert etag.endswith("-2")

    rep = s3sync.push(src, url, FAST, endpoint_url=server.url)
    assert (rep.transferred, rep.skipped) == (0, len(files))

    dest = tmp_path / "out" / "nested"
    rep = s3sync.pull(url, dest, FAST, endpoint_url=server.url)
    assert (rep.transferred, rep.skipped, rep.unverified) == (len(files), 0, [])
    assert tree_bytes(dest) == files
    assert leftovers(dest) == []

    rep = s3sync.pull(url, dest, FAST, endpoint_url=server.url)
    assert (rep.transferred, rep.skipped) == (0, len(files))

    # a locally corrupted file of the same size is not "up to date": it is fetched again
    bad = bytearray(files["sub/b.bin"])
    bad[0] ^= 0xFF
    (dest / "sub/b.bin").write_bytes(bytes(bad))
    rep = s3sync.pull(url, dest, FAST, endpoint_url=server.url)
    assert (rep.transferred, rep.skipped) == (1, len(files) - 1)
    assert tree_bytes(dest) == files

    # a changed local file is pushed again; the others are skipped
    (src / "a.txt").write_bytes(b"changed\n")
    rep = s3sync.push(src, url, FAST, endpoint_url=server.url)
    assert (rep.transferred, rep.skipped) == (1, len(files) - 1)


def test_pull_single_object_and_foreign_upload_verified_by_etag(server: MotoServer, tmp_path: Path) -> None:
    """An object put by another tool (no sha256 metadata) is verified through its MD5 ETag."""
    server.client().put_object(Bucket=BUCKET, Key="foreign/one.bin", Body=b"0123456789" * 100)
    rep = s3sync.pull(f"s3://{BUCKET}/foreign/one.bin", tmp_path / "d", FAST, endpoint_url=server.url)
    assert (rep.transferred, rep.unverified) == (1, [])
    assert (tmp_path / "d" / "one.bin").read_bytes() == b"0123456789" * 100


@pytest.mark.parametrize("tamper", ["bytes", "metadata"])
def test_checksum_mismatch_is_an_error_and_leaves_nothing(server: MotoServer, tmp_path: Path, tamper: str) -> None:
    src = tmp_path / "src"
    src.mkdir()
    (src / "vol.nii.gz").write_bytes(b"good bytes " * 50)
    prefix = f"tamper-{tamper}"
    s3sync.push(src, f"s3://{BUCKET}/{prefix}", FAST, endpoint_url=server.url)
    client, key = server.client(), f"{prefix}/vol.nii.gz"
    good_sha = hashlib.sha256(b"good bytes " * 50).hexdigest()
    if tamper == "bytes":  # other bytes under the original checksum
        client.put_object(Bucket=BUCKET, Key=key, Body=b"evil bytes " * 50, Metadata={"sha256": good_sha})
    else:
        client.copy_object(
            Bucket=BUCKET, Key=key, CopySource={"Bucket": BUCKET, "Key": key},
            Metadata={"sha256": "0" * 64}, MetadataDirective="REPLACE",
        )

    dest = tmp_path / "dest"
    dest.mkdir()
    (dest / "vol.nii.gz").write_bytes(b"older local copy")  # must survive a failed refresh
    with pytest.raises(ChecksumMismatchError, match=r"vol\.nii\.gz: sha256 mismatch"):
        s3sync.pull(f"s3://{BUCKET}/{prefix}", dest, FAST, endpoint_url=server.url)
    assert tree_bytes(dest) == {"vol.nii.gz": b"older local copy"}
    assert leftovers(dest) == []

    fresh = tmp_path / "fresh"
    with pytest.raises(ChecksumMismatchError):
        s3sync.pull(f"s3://{BUCKET}/{prefix}", fresh, FAST, endpoint_url=server.url)
    assert not fresh.exists()  # the folder this run created is removed again


def test_ctrl_c_mid_object_leaves_no_partial_or_temp_file(server: MotoServer, tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    (src / "big.bin").write_bytes(os.urandom(3 << 20))
    s3sync.push(src, f"s3://{BUCKET}/ctrlc", FAST, endpoint_url=server.url)

    def interrupt() -> None:
        raise KeyboardInterrupt

    dest = tmp_path / "a" / "dest"
    with pytest.raises(KeyboardInterrupt):
        s3sync.pull(f"s3://{BUCKET}/ctrlc", dest, FAST, endpoint_url=server.url, progress=Killer(1, interrupt))
    assert not (tmp_path / "a").exists()

    (dest).mkdir(parents=True)
    (dest / ".big.bin.x1y2.xct-part").write_bytes(b"stale")  # left by a SIGKILLed run
    rep = s3sync.pull(f"s3://{BUCKET}/ctrlc", dest, FAST, endpoint_url=server.url)
    assert (rep.transferred, rep.stale_removed) == (1, 1)
    assert tree_bytes(dest) == {"big.bin": (src / "big.bin").read_bytes()}


# --- the endpoint dies mid-transfer --------------------------------------------------------


@pytest.mark.parametrize("kind", S3_SERVERS)
def test_endpoint_dies_mid_transfer_then_rerun_resumes(kind: str, aws_env: dict, tmp_path: Path) -> None:
    src = tmp_path / "src"
    files = make_tree(src, big_mib=4)  # the big file sorts last
    url = f"s3://{BUCKET}/kill"
    dest = tmp_path / "dest"
    log_dir = tmp_path / "logs"
    log_dir.mkdir()

    # push: the server process is SIGKILLed after the first object → clear one-line error
    m1 = make_s3_server(kind, log_dir)
    with m1:
        m1.client().create_bucket(Bucket=BUCKET)
        with pytest.raises(TransferError, match="cannot reach the S3 endpoint") as exc:
            s3sync.push(src, url, FAST, endpoint_url=m1.url, on_object=lambda ev: m1.kill())
        assert "\n" not in str(exc.value)

    # restarted: moto is in-memory (empty again); rclone keeps its objects on disk, so the
    # re-run push resumes and what was stored before the kill is not resent
    m2 = make_s3_server(kind, log_dir) if kind == "moto" else m1
    with m2:
        if kind == "moto":
            m2.client().create_bucket(Bucket=BUCKET)
            assert s3sync.push(src, url, FAST, endpoint_url=m2.url).transferred == len(files)
        else:
            rep = s3sync.push(src, url, FAST, endpoint_url=m2.url)
            assert rep.skipped >= 1 and rep.transferred + rep.skipped == len(files), rep
        # pull through a proxy that dies 1 MiB into the big object (after the first object
        # completes, at most ~1 MiB more flows; later reconnects are refused)
        with CutProxy(m2.port) as proxy:
            with pytest.raises(TransferError, match=r"z_big\.bin: (transfer failed|cannot reach)") as exc:
                s3sync.pull(url, dest, FAST, endpoint_url=proxy.url, on_object=lambda ev: proxy.cut_after(1 << 20))
            assert proxy.cut.is_set()
        assert "\n" not in str(exc.value)
        got = tree_bytes(dest)
        assert "z_big.bin" not in got, "a partial object was left in place"
        assert got == {k: v for k, v in files.items() if k != "z_big.bin"}
        assert leftovers(dest) == []

        # the endpoint is back (direct, no proxy): the re-run fetches only what is missing
        rep = s3sync.pull(url, dest, FAST, endpoint_url=m2.url)
    assert (rep.transferred, rep.skipped) == (1, len(files) - 1)
    assert tree_bytes(dest) == files


# --- user errors ---------------------------------------------------------------------------


def test_library_user_errors(server: MotoServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "f").write_bytes(b"x")
    with pytest.raises(InputError, match="s3://no-such-bucket: no such bucket"):
        s3sync.pull("s3://no-such-bucket/p", tmp_path / "d", FAST, endpoint_url=server.url)
    with pytest.raises(InputError, match="s3://no-such-bucket: no such bucket"):
        s3sync.push(tmp_path / "src", "s3://no-such-bucket/p", FAST, endpoint_url=server.url)
    with pytest.raises(InputError, match="no objects under this prefix"):
        s3sync.pull(f"s3://{BUCKET}/nothing-here", tmp_path / "d", FAST, endpoint_url=server.url)
    assert not (tmp_path / "d").exists()
    with pytest.raises(InputError, match="no such folder"):
        s3sync.push(tmp_path / "missing", f"s3://{BUCKET}/p", FAST, endpoint_url=server.url)
    with pytest.raises(InputError, match="not a directory"):
        s3sync.pull(f"s3://{BUCKET}/p", tmp_path / "src" / "f", FAST, endpoint_url=server.url)
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    with pytest.raises(InputError, match="no AWS credentials"):
        s3sync.pull(f"s3://{BUCKET}/p", tmp_path / "d", FAST, endpoint_url=server.url)


def xct(args: list[str], capsys: pytest.CaptureFixture) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as e:
        main(args)
    out, err = capsys.readouterr()
    return int(e.value.code or 0), out, err


def test_cli_push_pull_and_one_line_errors(
    server: MotoServer, tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    params = tmp_path / "params.yaml"
    params.write_text(FAST_YAML)
    monkeypatch.setenv("XCT_PARAMS", str(params))
    src = tmp_path / "src"
    files = make_tree(src)
    url = f"s3://{BUCKET}/cli"

    code, out, err = xct(["data", "push", str(src), url, "--endpoint-url", server.url], capsys)
    assert code == 0, err
    assert out.startswith(f"pushed {len(files)} object(s)")
    monkeypatch.setenv("XCT_S3_ENDPOINT_URL", server.url)  # the env override instead of the flag
    code, out, err = xct(["data", "pull", url, str(tmp_path / "dest")], capsys)
    assert code == 0, err
    assert out.startswith(f"pulled {len(files)} object(s)")
    assert tree_bytes(tmp_path / "dest") == files
    code, out, _ = xct(["data", "pull", url, str(tmp_path / "dest"), "-q"], capsys)
    assert (code, out.split(",")[0]) == (0, "pulled 0 object(s) (0 B)")

    cases = [
        (["data", "pull", "bucket/no-scheme", str(tmp_path / "x")], 2, "not an S3 URL"),
        (["data", "pull", "s3://no-such-bucket/p", str(tmp_path / "x")], 2, "no such bucket"),
        (["data", "push", str(tmp_path / "missing"), url], 2, "no such folder"),
        (["data", "pull", url, str(tmp_path / "x"), "--endpoint-url", f"http://127.0.0.1:{free_port()}"], 1,
         "cannot reach the S3 endpoint"),
    ]
    for args, want_code, want in cases:
        code, out, err = xct(args, capsys)
        lines = err.strip().splitlines()
        assert (code, len(lines)) == (want_code, 1), (args, err)
        assert lines[0].startswith("xct: error: ") and want in lines[0], lines[0]
        assert "Traceback" not in err
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    code, _, err = xct(["data", "pull", url, str(tmp_path / "x")], capsys)
    assert code == 2 and "no AWS credentials" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "x").exists()
