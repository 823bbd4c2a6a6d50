"""S3 data transfer (boto3): ``xct data pull s3://bucket/prefix DIR`` / ``push DIR s3://…``.

Semantics
- A prefix is a folder: ``s3://b/raw`` maps ``DIR/a/x.nii.gz`` ↔ key ``raw/a/x.nii.gz``
  (keys are POSIX relative paths; ``s3://b`` or ``s3://b/`` is the bucket root). Pulling a
  URL that names a single object (no keys below ``prefix/``) writes ``DIR/<basename>``.
  Nothing is ever deleted on either side (copy, not mirror).
- Symlinks: a transfer stays inside its folder. ``pull`` REFUSES (one-line error, before any
  object is transferred) when a path it would write passes through a symlink inside the
  destination folder (a sub-folder linked elsewhere, or a file that is a link): it never
  writes through one. ``push`` SKIPS symlinks below the source folder (files and folders;
  never followed, never uploaded) and names each one: ``TransferReport.symlinks_skipped``,
  the summary line, and one ``xct: warning`` line per link from ``xct data push``. The
  folder given on the command line may itself be a symlink.
- Checksums: push stores the SHA-256 of every file as object metadata ``x-amz-meta-sha256``
  and re-reads it (HEAD) after the upload, together with the size and, for single-part
  objects, the ETag (= MD5 of the stored bytes). Pull hashes the stream while writing a
  temporary file in the destination folder, compares it with the ``sha256`` metadata (else
  with a single-part, non-KMS ETag), and only then ``os.replace``\\ s it into place. A
  mismatch raises :class:`ChecksumMismatchError`; the bad bytes are deleted. Objects with
  neither (multipart uploads made by other tools) are size-checked and listed as
  ``unverified`` in the report.
- Resumable: pull skips files already present with the same size and checksum; push skips
  objects already remote with the same size and checksum. An interrupted run (network,
  Ctrl-C) leaves no partial file in place and no temporary file behind (except after
  SIGKILL: stale ``.*.xct-part`` files are removed by the next pull into that folder).
- Retries: botocore's "standard" retry mode per request (``s3.request_attempts``) plus our
  own bounded loop per object (``s3.object_attempts``, jittered exponential backoff) around
  the whole transfer, which also covers a connection dropped mid-stream.
- Credentials come only from the standard boto3 chain (environment, shared config files,
  instance/pod role) — never from params or CLI flags. Endpoint (MinIO, other
  S3-compatible stores): ``endpoint_url`` argument, else ``$XCT_S3_ENDPOINT_URL``, else
  ``$AWS_ENDPOINT_URL_S3`` / ``$AWS_ENDPOINT_URL``, else AWS.

Errors: bad URL, local path, missing bucket, missing/rejected credentials →
:class:`xct_core.errors.InputError` (exit 2); a transfer that still fails after the retries
(unreachable endpoint, dropped connection) or a checksum mismatch → :class:`TransferError`
(exit 1; re-running resumes). Both print as one line through the CLI root.
"""

from __future__ import annotations

import hashlib
import os
import random
import re
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol
from urllib.parse import urlparse

import boto3
import botocore.exceptions as bexc
from boto3.exceptions import S3UploadFailedError
from boto3.s3.transfer import TransferConfig
from botocore.config import Config

from xct_core.atomic import atomic_path, file_mode
from components.ops_params import S3Params
from xct_core.errors import InputError, XctError
from xct_core.redact import redact, redact_url

#: environment variable with the endpoint of an S3-compatible store (wins over AWS_ENDPOINT_URL)
ENDPOINT_ENV = "XCT_S3_ENDPOINT_URL"
#: object metadata key holding the hex SHA-256 of the object's bytes (x-amz-meta-sha256)
SHA256_META = "sha256"
#: suffix of the temporary files a pull writes next to their final path
PART_SUFFIX = ".xct-part"
_CHUNK = 1 << 20
_MIB = 1 << 20
_BUCKET_RE = re.compile(r"^[a-z0-9][a-z0-9.\-]{1,61}[a-z0-9]$")
_HEX64 = re.compile(r"^[0-9a-f]{64}$")
_HEX32 = re.compile(r"^[0-9a-f]{32}$")
_RETRY_CODES = {
    "SlowDown", "Throttling", "ThrottlingException", "RequestTimeout", "RequestTimeoutException",
    "InternalError", "ServiceUnavailable", "RequestLimitExceeded", "BadDigest",
}
_CRED_CODES = {
    "InvalidAccessKeyId", "SignatureDoesNotMatch", "ExpiredToken", "InvalidToken",
    "TokenRefreshRequired", "InvalidClientTokenId", "UnrecognizedClientException",
}


class TransferError(XctError):
    """A transfer failed after its retries (network, endpoint) or its bytes are wrong.
    Nothing partial is left in place; re-running resumes."""

    exit_code = 1


class ChecksumMismatchError(TransferError):
    """The bytes received (or stored) do not match the recorded checksum."""


# --- URLs and settings ---------------------------------------------------------------------


@dataclass(frozen=True)
class S3Url:
    """``s3://bucket/prefix``; ``prefix`` has no leading or trailing slash ("" = bucket root)."""

    bucket: str
    prefix: str = ""

    def key_for(self, rel: str) -> str:
        """Object key of the POSIX relative path ``rel`` below this prefix."""
        return f"{self.prefix}/{rel}" if self.prefix else rel

    def child(self, key: str) -> str:
        return f"s3://{self.bucket}/{key}"

    def __str__(self) -> str:
        return f"s3://{self.bucket}/{self.prefix}" if self.prefix else f"s3://{self.bucket}"


def parse_s3_url(url: str) -> S3Url:
    """Parse ``s3://bucket[/prefix]``; anything else is an :class:`InputError`."""
    p = urlparse(url)
    if p.scheme != "s3":
        raise InputError(url, "not an S3 URL (expected s3://bucket/prefix)")
    if p.query or p.fragment or p.params:
        raise InputError(url, "S3 URL must not have a query or fragment")
    bucket = p.netloc
    if not _BUCKET_RE.match(bucket) or ".." in bucket:
        raise InputError(url, f"invalid bucket name {bucket!r} (3-63 chars: a-z 0-9 . -)")
    prefix = p.path.strip("/")
    if any(part in ("", ".", "..") for part in prefix.split("/")) and prefix:
        raise InputError(url, "prefix must not contain empty, '.' or '..' segments")
    return S3Url(bucket, prefix)


def resolve_endpoint(endpoint_url: str | None = None) -> str | None:
    """The endpoint to use: argument, ``$XCT_S3_ENDPOINT_URL``, ``$AWS_ENDPOINT_URL_S3``,
    ``$AWS_ENDPOINT_URL``, else None (AWS). Validated as an http(s) URL."""
    for value, origin in (
        (endpoint_url, "--endpoint-url"),
        (os.environ.get(ENDPOINT_ENV), f"${ENDPOINT_ENV}"),
        (os.environ.get("AWS_ENDPOINT_URL_S3"), "$AWS_ENDPOINT_URL_S3"),
        (os.environ.get("AWS_ENDPOINT_URL"), "$AWS_ENDPOINT_URL"),
    ):
        if value:
            u = urlparse(value)
            if u.scheme not in ("http", "https") or not u.netloc:
                raise InputError(None, f"{origin}: invalid endpoint URL {redact_url(value)!r} (expected http(s)://host[:port])")
            return value.rstrip("/")
    return None


def make_client(cfg: S3Params, endpoint_url: str | None = None) -> Any:
    """An S3 client with bounded retries/timeouts; credentials from the boto3 chain only.

    Raises :class:`InputError` when the chain finds no credentials at all.
    """
    endpoint = resolve_endpoint(endpoint_url)
    session = boto3.session.Session()
    try:
        creds = session.get_credentials()
    except bexc.BotoCoreError as e:  # a broken profile / config file
        raise InputError(None, f"cannot load AWS credentials ({redact(e)})") from None
    if creds is None:
        raise InputError(
            None,
            "no AWS credentials found (set AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY or AWS_PROFILE, "
            "or run with an instance/pod role)",
        )
    config = Config(
        region_name=session.region_name or cfg.region,
        connect_timeout=cfg.connect_timeout_s,
        read_timeout=cfg.read_timeout_s,
        retries={"total_max_attempts": cfg.request_attempts, "mode": "standard"},  # incl. the first
        s3={"addressing_style": cfg.addressing_style},
    )
    return session.client("s3", endpoint_url=endpoint, config=config)


# --- progress and reports ------------------------------------------------------------------


class Progress(Protocol):
    """Byte-level progress sink (a tqdm/rich bar). ``advance`` may get negative deltas
    (bytes of a failed attempt that will be sent again)."""

    def plan(self, total_bytes: int, n_objects: int) -> None: ...

    def advance(self, nbytes: int) -> None: ...


class _NoProgress:
    def plan(self, total_bytes: int, n_objects: int) -> None:
        pass

    def advance(self, nbytes: int) -> None:
        pass


class TqdmProgress:
    """tqdm bar in bytes on stderr (hidden when stderr is not a terminal unless ``force``)."""

    def __init__(self, desc: str, force: bool = False):
        self.desc, self.force, self.bar = desc, force, None

    def plan(self, total_bytes: int, n_objects: int) -> None:
        from tqdm import tqdm

        self.bar = tqdm(
            total=total_bytes, unit="B", unit_scale=True, unit_divisor=1024,
            desc=f"{self.desc} ({n_objects} objects)", disable=None if not self.force else False,
            leave=False, dynamic_ncols=True,
        )

    def advance(self, nbytes: int) -> None:
        if self.bar is not None:
            self.bar.update(nbytes)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


@contextmanager
def tqdm_progress(desc: str, force: bool = False) -> Iterator[TqdmProgress]:
    bar = TqdmProgress(desc, force)
    try:
        yield bar
    finally:
        bar.close()


@dataclass(frozen=True)
class ObjectEvent:
    """One object done: ``action`` is what happened to it."""

    key: str
    path: Path
    action: Literal["transferred", "skipped"]
    size: int


@dataclass
class TransferReport:
    """Counts of one pull/push (bytes are object sizes)."""

    direction: Literal["pull", "push"]
    source: str
    dest: str
    transferred: int = 0
    skipped: int = 0
    bytes_transferred: int = 0
    bytes_skipped: int = 0
    #: keys whose bytes could only be size-checked (no sha256 metadata, multipart ETag)
    unverified: list[str] = field(default_factory=list)
    #: stale temporary files of an earlier killed pull that were removed
    stale_removed: int = 0
    #: push: symlinks below the source folder that were skipped (relative POSIX paths)
    symlinks_skipped: list[str] = field(default_factory=list)
    seconds: float = 0.0

    def summary(self) -> str:
        verb = "pulled" if self.direction == "pull" else "pushed"
        s = (
            f"{verb} {self.transferred} object(s) ({_human(self.bytes_transferred)}), "
            f"{self.skipped} already up to date ({_human(self.bytes_skipped)}), "
            f"{self.source} → {self.dest} in {self.seconds:.1f} s"
        )
        if self.unverified:
            s += f"; {len(self.unverified)} without a checksum (size-checked only)"
        if self.symlinks_skipped:
            s += f"; {len(self.symlinks_skipped)} symlink(s) skipped, not followed"
        return s


def _human(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"  # unreachable


# --- error classification ------------------------------------------------------------------


def _code(e: bexc.ClientError) -> tuple[str, int]:
    err = e.response.get("Error", {})
    status = int(e.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0) or 0)
    return str(err.get("Code", "")), status


def _retryable(e: BaseException) -> bool:
    if isinstance(e, S3UploadFailedError) and isinstance(e.__context__, BaseException):
        return _retryable(e.__context__)
    if isinstance(e, bexc.ClientError):
        code, status = _code(e)
        return status >= 500 or code in _RETRY_CODES
    return isinstance(
        e,
        (
            bexc.ConnectionError,  # endpoint unreachable, connect timeout
            bexc.HTTPClientError,  # connection closed, read timeout, stream error
            bexc.IncompleteReadError,
            bexc.FlexibleChecksumError,
            ConnectionError,  # builtin: resets from the socket
            TimeoutError,
        ),
    )


def _user_error(e: BaseException, where: str, endpoint: str | None, attempts: int, request_attempts: int = 1) -> XctError:
    """Map a boto/network exception to a one-line XctError naming ``where``."""
    err = _map_error(e, where, endpoint, attempts, request_attempts)
    err.args = (redact(" ".join(str(err).split())),)  # one line, whatever the server sent; no credential
    return err


def _map_error(e: BaseException, where: str, endpoint: str | None, attempts: int, request_attempts: int) -> XctError:
    if isinstance(e, S3UploadFailedError) and isinstance(e.__context__, bexc.ClientError):
        e = e.__context__
    if isinstance(e, bexc.NoCredentialsError):
        return InputError(where, "no AWS credentials found (environment, profile or instance role)")
    if isinstance(e, bexc.ClientError):
        code, status = _code(e)
        msg = e.response.get("Error", {}).get("Message", "") or code
        if code == "NoSuchBucket":
            bucket = where.split("/")[2] if where.startswith("s3://") else where
            return InputError(f"s3://{bucket}", "no such bucket")
        if code in _CRED_CODES:
            return InputError(where, f"credentials rejected by the endpoint ({code})")
        if code in ("AccessDenied", "AllAccessDisabled") or status == 403:
            return InputError(where, "access denied (check the credentials/role and the bucket policy)")
        if code in ("NoSuchKey", "404") or status == 404:
            return TransferError(f"{where}: object disappeared during the transfer")
        if _retryable(e):
            return TransferError(f"{where}: server error {code or status} after {attempts} attempt(s) ({msg})")
        return TransferError(f"{where}: {code or status}: {msg}")
    if isinstance(e, bexc.ConnectionError):
        target = endpoint or "AWS S3"
        tries = attempts * request_attempts  # botocore retries connection errors itself
        return TransferError(f"{where}: cannot reach the S3 endpoint {target} after {tries} tries ({e})")
    if _retryable(e):
        return TransferError(f"{where}: transfer failed after {attempts} attempt(s) ({type(e).__name__}: {e})")
    return TransferError(f"{where}: {type(e).__name__}: {e}")


class _Retrier:
    """Bounded attempts with jittered exponential backoff around one operation."""

    def __init__(self, cfg: S3Params, endpoint: str | None, sleep: Callable[[float], None] = time.sleep):
        self.cfg, self.endpoint, self.sleep = cfg, endpoint, sleep

    def run(self, fn: Callable[[], Any], where: str, attempts: int | None = None) -> Any:
        """``fn()`` with up to ``attempts`` (default ``s3.object_attempts``) tries; errors that
        survive them become one-line XctErrors. The first request of a run passes 1: a dead
        endpoint is then reported after botocore's own retries, in seconds."""
        n = attempts or self.cfg.object_attempts
        for attempt in range(n):
            try:
                return fn()
            except XctError:
                raise
            except (bexc.BotoCoreError, bexc.ClientError, S3UploadFailedError, OSError) as e:
                if isinstance(e, OSError) and not _retryable(e):  # local disk: full, permissions
                    raise InputError(e.filename or where, f"local I/O error ({e.strerror or e})") from None
                if not _retryable(e) or attempt == n - 1:
                    raise _user_error(e, where, self.endpoint, attempt + 1, self.cfg.request_attempts) from None
                delay = min(self.cfg.backoff_max_s, self.cfg.backoff_s * 2**attempt)
                self.sleep(delay * (0.5 + random.random() / 2))
        raise AssertionError("unreachable")


# --- checksums -----------------------------------------------------------------------------


def file_digests(path: Path) -> tuple[str, str]:
    """(sha256, md5) hex digests of a file, read in 1 MiB chunks."""
    sha, md5 = hashlib.sha256(), hashlib.md5(usedforsecurity=False)
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            sha.update(chunk)
            md5.update(chunk)
    return sha.hexdigest(), md5.hexdigest()


def expected_digest(head: dict[str, Any]) -> tuple[Literal["sha256", "md5"], str] | None:
    """What a HEAD/GET response promises about the bytes: the ``sha256`` metadata (written
    by push), else the ETag when it is a plain MD5 (single-part upload, no SSE-KMS/SSE-C),
    else None. A malformed sha256 value is returned as-is so the comparison fails loudly."""
    meta = {k.lower(): v for k, v in (head.get("Metadata") or {}).items()}
    if SHA256_META in meta:
        return "sha256", str(meta[SHA256_META]).strip().lower()
    etag = str(head.get("ETag", "")).strip('"').lower()
    kms = str(head.get("ServerSideEncryption", "")).startswith("aws:kms") or head.get("SSECustomerAlgorithm")
    if _HEX32.match(etag) and not kms:
        return "md5", etag
    return None


def _matches(expected: tuple[str, str] | None, sha: str, md5: str) -> bool:
    if expected is None:
        return False
    algo, value = expected
    return value == (sha if algo == "sha256" else md5)


# --- pull ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Obj:
    key: str
    rel: str
    size: int


def _safe_rel(rel: str, key: str, url: S3Url) -> str:
    parts = rel.split("/")
    if not rel or any(p in ("", ".", "..") for p in parts) or "\\" in rel or "\0" in rel:
        raise InputError(url.child(key), "object key cannot be mapped to a safe local path")
    return rel


def _list_objects(client: Any, url: S3Url, retrier: _Retrier) -> list[_Obj]:
    list_prefix = f"{url.prefix}/" if url.prefix else ""

    def listing() -> list[_Obj]:
        out: list[_Obj] = []
        pages = client.get_paginator("list_objects_v2").paginate(Bucket=url.bucket, Prefix=list_prefix)
        for page in pages:
            for o in page.get("Contents", []):
                key = o["Key"]
                if key.endswith("/"):  # "folder" marker objects
                    continue
                out.append(_Obj(key, _safe_rel(key[len(list_prefix):], key, url), int(o["Size"])))
        return out

    objs = retrier.run(listing, str(url), attempts=1)
    if objs or not url.prefix:
        return sorted(objs, key=lambda o: o.key)

    def single() -> list[_Obj]:  # the URL may name one object
        try:
            head = client.head_object(Bucket=url.bucket, Key=url.prefix)
        except bexc.ClientError as e:
            if _code(e)[1] == 404 or _code(e)[0] in ("404", "NoSuchKey"):
                return []
            raise
        return [_Obj(url.prefix, url.prefix.rsplit("/", 1)[-1], int(head["ContentLength"]))]

    return retrier.run(single, str(url))


def _remove_stale_parts(dest: Path) -> int:
    n = 0
    for p in dest.rglob(f".*{PART_SUFFIX}"):
        if p.is_file() and not p.is_symlink():
            p.unlink(missing_ok=True)
            n += 1
    return n


def _download_once(
    client: Any, url: S3Url, obj: _Obj, target: Path, progress: Progress, mode: int
) -> bool:
    """GET the object into a temp file beside ``target``, verify, os.replace. Returns whether
    a checksum was verified. Any failure removes the temp file; ``target`` is untouched."""
    done = 0
    try:
        with atomic_path(target, PART_SUFFIX) as tmp, open(tmp, "wb") as f:
            resp = client.get_object(Bucket=url.bucket, Key=obj.key)
            expected = expected_digest(resp)
            length = int(resp["ContentLength"])
            sha, md5 = hashlib.sha256(), hashlib.md5(usedforsecurity=False)
            body = resp["Body"]
            try:
                for chunk in body.iter_chunks(_CHUNK):
                    f.write(chunk)
                    sha.update(chunk)
                    md5.update(chunk)
                    done += len(chunk)
                    progress.advance(len(chunk))
            finally:
                body.close()
            if done != length:
                raise bexc.IncompleteReadError(actual_bytes=done, expected_bytes=length)
            f.flush()
            os.fsync(f.fileno())
            if expected is not None and not _matches(expected, sha.hexdigest(), md5.hexdigest()):
                algo, want = expected
                got = sha.hexdigest() if algo == "sha256" else md5.hexdigest()
                raise ChecksumMismatchError(
                    f"{url.child(obj.key)}: {algo} mismatch (object says {want[:16]}…, received bytes "
                    f"hash to {got[:16]}…); the download was discarded"
                )
            os.chmod(tmp, mode)
        return expected is not None
    except BaseException:
        progress.advance(-done)
        raise


def pull(
    url: str,
    dest: str | Path,
    cfg: S3Params,
    *,
    endpoint_url: str | None = None,
    client: Any = None,
    progress: Progress | None = None,
    on_object: Callable[[ObjectEvent], None] | None = None,
    sleep: Callable[[float], None] = time.sleep,
) -> TransferReport:
    """Copy every object below ``url`` into ``dest`` (created if missing), verified, resumable."""
    t0 = time.perf_counter()
    src = parse_s3_url(url)
    dest = Path(dest)
    if dest.exists() and not dest.is_dir():
        raise InputError(dest, "destination exists and is not a directory")
    endpoint = resolve_endpoint(endpoint_url)
    client = client if client is not None else make_client(cfg, endpoint)
    retrier = _Retrier(cfg, endpoint, sleep)
    progress = progress or _NoProgress()
    report = TransferReport("pull", str(src), str(dest))

    objs = _list_objects(client, src, retrier)
    if not objs:
        raise InputError(str(src), "no objects under this prefix")
    for obj in objs:  # before anything is written: never through a symlink inside dest
        _refuse_symlink(dest, obj.rel, src.child(obj.key))
    created: list[Path] = []
    try:
        for d in [dest, *sorted({(dest / o.rel).parent for o in objs}, key=lambda p: len(p.parts))]:
            missing = [p for p in (d, *d.parents) if not p.exists()]
            for p in reversed(missing):
                p.mkdir()
                created.append(p)
    except OSError as e:
        _rmdirs(created)
        raise InputError(e.filename or dest, f"cannot create folder ({e.strerror})") from None
    report.stale_removed = _remove_stale_parts(dest)
    mode = file_mode()
    progress.plan(sum(o.size for o in objs), len(objs))

    try:
        for obj in objs:
            target = dest / obj.rel
            if target.is_dir():
                raise InputError(target, f"is a folder, but {src.child(obj.key)} is an object")
            if target.is_file() and target.stat().st_size == obj.size:
                head = retrier.run(lambda: client.head_object(Bucket=src.bucket, Key=obj.key), src.child(obj.key))
                exp = expected_digest(head)
                if exp is not None and _matches(exp, *file_digests(target)):
                    report.skipped += 1
                    report.bytes_skipped += obj.size
                    progress.advance(obj.size)
                    if on_object:
                        on_object(ObjectEvent(obj.key, target, "skipped", obj.size))
                    continue
            verified = retrier.run(
                lambda: _download_once(client, src, obj, target, progress, mode), src.child(obj.key)
            )
            if not verified:
                report.unverified.append(obj.key)
            report.transferred += 1
            report.bytes_transferred += obj.size
            if on_object:
                on_object(ObjectEvent(obj.key, target, "transferred", obj.size))
    except BaseException:
        _rmdirs(created)
        raise
    report.seconds = time.perf_counter() - t0
    return report


def _refuse_symlink(dest: Path, rel: str, what: str) -> None:
    """:class:`InputError` when ``dest/rel`` (or a folder on the way below ``dest``) is a symlink."""
    p = dest
    for part in rel.split("/"):
        p = p / part
        if p.is_symlink():
            try:
                to = os.readlink(p)
            except OSError:
                to = "?"
            raise InputError(p, f"is a symlink (to {to}) inside the destination folder; xct data pull never writes "
                                f"through symlinks ({what} would land there): remove the link or pull elsewhere")
        if not p.exists():
            return


def _rmdirs(created: list[Path]) -> None:
    """Remove the folders this run created that are still empty (deepest first)."""
    for p in sorted(created, key=lambda p: len(p.parts), reverse=True):
        try:
            p.rmdir()
        except OSError:
            pass


# --- push ----------------------------------------------------------------------------------


def _local_files(src: Path) -> tuple[list[tuple[Path, str]], list[str]]:
    """(regular files with their relative POSIX paths, symlinks skipped) below ``src``."""
    out: list[tuple[Path, str]] = []
    links: list[str] = []
    for root, dirs, files in os.walk(src, followlinks=False):
        here = Path(root)
        links += [(here / d).relative_to(src).as_posix() for d in dirs if (here / d).is_symlink()]
        dirs[:] = sorted(d for d in dirs if not (here / d).is_symlink())
        for name in sorted(files):
            p = here / name
            if p.is_symlink():
                links.append(p.relative_to(src).as_posix())
                continue
            if name.endswith(PART_SUFFIX) or not p.is_file():  # temp files, sockets, fifos
                continue
            out.append((p, p.relative_to(src).as_posix()))
    return out, sorted(links)


def _head_or_none(client: Any, bucket: str, key: str) -> dict[str, Any] | None:
    try:
        return client.head_object(Bucket=bucket, Key=key)
    except bexc.ClientError as e:
        code, status = _code(e)
        if status == 404 or code in ("404", "NoSuchKey", "NotFound"):
            return None
        raise


def _stored_problem(head: dict[str, Any], size: int, sha: str, md5: str, single_part: bool) -> str | None:
    """Why the object described by ``head`` is not the local file (None when it is): size,
    the sha256 metadata round trip, and — for a single-part, non-KMS upload, whose ETag is
    the MD5 of the bytes S3 stored — the ETag."""
    if int(head["ContentLength"]) != size:
        return f"size {head['ContentLength']} != {size}"
    if not _matches(expected_digest(head), sha, md5):
        return "sha256 metadata differs"
    etag = str(head.get("ETag", "")).strip('"').lower()
    kms = str(head.get("ServerSideEncryption", "")).startswith("aws:kms") or head.get("SSECustomerAlgorithm")
    if single_part and not kms and _HEX32.match(etag) and etag != md5:
        return f"ETag {etag} is not the MD5 {md5} of the file"
    return None


def push(
    src: str | Path,
    url: str,
    cfg: S3Params,
    *,
    endpoint_url: str | None = None,
    client: Any = None,
    progress: Progress | None = None,
    on_object: Callable[[ObjectEvent], None] | None = None,
    sleep: Callable[[float], None] = time.sleep,
) -> TransferReport:
    """Upload every file below ``src`` to ``url`` with its SHA-256 as metadata; resumable."""
    t0 = time.perf_counter()
    dst = parse_s3_url(url)
    src = Path(src)
    if not src.is_dir():
        raise InputError(src, "no such folder" if not src.exists() else "not a folder")
    files, links = _local_files(src)
    if not files:
        why = f" ({len(links)} symlink(s), which push does not follow)" if links else ""
        raise InputError(src, f"no files to push{why}")
    endpoint = resolve_endpoint(endpoint_url)
    client = client if client is not None else make_client(cfg, endpoint)
    retrier = _Retrier(cfg, endpoint, sleep)
    progress = progress or _NoProgress()
    report = TransferReport("push", str(src), str(dst), symlinks_skipped=links)
    tcfg = TransferConfig(
        multipart_threshold=cfg.multipart_threshold_mb * _MIB,
        multipart_chunksize=cfg.multipart_chunksize_mb * _MIB,
        max_concurrency=cfg.max_concurrency,
        preferred_transfer_client="classic",
    )

    def head_bucket() -> None:
        try:
            client.head_bucket(Bucket=dst.bucket)
        except bexc.ClientError as e:
            if _code(e)[1] == 404 or _code(e)[0] in ("404", "NoSuchBucket", "NotFound"):
                raise InputError(f"s3://{dst.bucket}", "no such bucket") from None
            raise

    retrier.run(head_bucket, str(dst), attempts=1)
    try:
        sizes = [p.stat().st_size for p, _ in files]
    except OSError as e:
        raise InputError(e.filename, f"cannot read ({e.strerror})") from None
    progress.plan(sum(sizes), len(files))

    for (path, rel), size in zip(files, sizes):
        key = dst.key_for(rel)
        where = dst.child(key)
        try:
            sha, md5 = file_digests(path)
        except OSError as e:
            raise InputError(path, f"cannot read ({e.strerror})") from None
        head = retrier.run(lambda: _head_or_none(client, dst.bucket, key), where)
        if head is not None and int(head["ContentLength"]) == size and _matches(expected_digest(head), sha, md5):
            report.skipped += 1
            report.bytes_skipped += size
            progress.advance(size)
            if on_object:
                on_object(ObjectEvent(key, path, "skipped", size))
            continue

        sent, lock = [0], threading.Lock()

        def callback(n: int) -> None:  # called from s3transfer's worker threads
            with lock:
                sent[0] += n
                progress.advance(n)

        def rewind() -> None:
            with lock:
                progress.advance(-sent[0])
                sent[0] = 0

        def upload() -> None:
            try:
                client.upload_file(
                    str(path), dst.bucket, key, ExtraArgs={"Metadata": {SHA256_META: sha}}, Callback=callback, Config=tcfg
                )
            except BaseException:
                rewind()
                raise

        retrier.run(upload, where)
        head = retrier.run(lambda: _head_or_none(client, dst.bucket, key), where)
        if head is None:
            raise TransferError(f"{where}: object missing right after its upload")
        problem = _stored_problem(head, size, sha, md5, single_part=size < tcfg.multipart_threshold)
        if problem:
            raise ChecksumMismatchError(f"{where}: the stored object does not match {path} ({problem})")
        report.transferred += 1
        report.bytes_transferred += size
        if on_object:
            on_object(ObjectEvent(key, path, "transferred", size))
    report.seconds = time.perf_counter() - t0
    return report


__all__ = [
    "ENDPOINT_ENV",
    "SHA256_META",
    "ChecksumMismatchError",
    "ObjectEvent",
    "Progress",
    "S3Url",
    "TqdmProgress",
    "TransferError",
    "TransferReport",
    "expected_digest",
    "file_digests",
    "make_client",
    "parse_s3_url",
    "pull",
    "push",
    "resolve_endpoint",
    "tqdm_progress",
]
