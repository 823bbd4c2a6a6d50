"""Run-scoped shared storage of a training run: one root URI that every node reads and writes.

``train.ray.storage_uri`` (params) or ``xct train --storage-uri`` names a storage root —
``s3://bucket/prefix`` or a folder every node mounts (an RWX volume); empty = the local
output folder, as before. A run lives in ``<root>/<run id>/`` (the KFP pipeline run id in
a KFP task, ``xct train --run-id`` otherwise); the layout below it is
:data:`xct_core.layout.RUN_STORAGE_DIRS`::

    <root>/<run id>/processed/                  the processed shards (published once, read by every worker)
    <root>/<run id>/ray/stage{K}/step_N/        Ray Train's storage_path: the checkpoints (state.pt + .sha256)
    <root>/<run id>/train/                      the training folder (xct_core.layout.RunLayout): exported
                                                models/stage{K}/*.pt, metrics/, plots/, val/, and the stage's
                                                small state docs (checkpoints/stage{K}/mlflow.json, ray_workers.json)

S3 I/O goes through :mod:`components.s3sync` (boto3, the environment's credential chain,
its retries and checksums); Ray Train itself writes its checkpoints through a pyarrow
``S3FileSystem`` on the same endpoint (:meth:`RunStorage.ray_storage`). Credentials come
from the environment only, never from params or flags.

Workers never read a driver-local path: :meth:`RunStorage.node_copy` downloads a data URI
once per node into a node-local cache keyed by the digest of its listing (keys, sizes,
ETags), under a per-node file lock; a mounted root is read in place.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from xct_core.errors import ConfigError, InputError
from xct_core.layout import RUN_STORAGE_DIRS

__all__ = ["NODE_CACHE_ENV", "RunStorage", "is_uri", "node_cache_root", "validate_run_id"]

#: node-local cache folder (default ``<tmp>/xct-node-cache``): downloaded data, worker scratch
NODE_CACHE_ENV = "XCT_NODE_CACHE"
_RUN_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
_STEP_RE = re.compile(r"^step_\d{8}$")


def is_uri(value: str | Path) -> bool:
    """An ``s3://`` URI (rather than a local path)."""
    return str(value).startswith("s3://")


def validate_run_id(run_id: str) -> str:
    """A run id is one safe path segment (letters, digits, ``._-``; at most 128 characters)."""
    if not _RUN_ID_RE.match(run_id or "") or run_id in (".", ".."):
        raise ConfigError(f"run id {run_id!r}: expected one path segment of letters, digits, '.', '_' or '-' "
                          "(at most 128 characters)")
    return run_id


def node_cache_root() -> Path:
    """This node's cache folder (``$XCT_NODE_CACHE``, else ``<tmp>/xct-node-cache``)."""
    return Path(os.environ.get(NODE_CACHE_ENV) or Path(tempfile.gettempdir()) / "xct-node-cache")


@contextmanager
def _node_lock(path: Path) -> Iterator[None]:
    """A blocking exclusive lock on ``path`` (one download per node at a time)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


@dataclass(frozen=True)
class RunStorage:
    """The storage folder of one run: ``root`` = ``<storage uri>/<run id>`` (an ``s3://`` URI
    or an absolute path), with the S3 settings (``components.ops_params.S3Params`` as a
    dict; its retries and timeouts) used for ``s3://``."""

    root: str
    s3: dict[str, Any]

    @classmethod
    def for_run(cls, storage_uri: str, run_id: str, s3: Any) -> RunStorage:
        """``<storage_uri>/<run_id>``; ``s3`` = the params' ``s3`` section. Bad values: one line."""
        from components.s3sync import parse_s3_url

        validate_run_id(run_id)
        uri = storage_uri.strip()
        if is_uri(uri):
            url = parse_s3_url(uri)
            root = f"s3://{url.bucket}/{url.prefix + '/' if url.prefix else ''}{run_id}"
        else:
            p = urlparse(uri)
            if p.scheme not in ("", "file"):
                raise ConfigError(f"storage URI {uri!r}: expected s3://bucket/prefix or a mounted folder path")
            path = Path(p.path if p.scheme == "file" else uri)
            if not path.is_absolute():
                raise ConfigError(f"storage URI {uri!r}: a mounted folder must be an absolute path (every node "
                                  "resolves it the same way)")
            root = str(path / run_id)
        dump = s3.model_dump(mode="json") if hasattr(s3, "model_dump") else dict(s3)
        return cls(root=root, s3=dump)

    # --- addresses ------------------------------------------------------------------------------

    @staticmethod
    def is_data_uri(value: str | Path) -> bool:
        """:func:`is_uri` (for callers that hold a storage object, not this module)."""
        return is_uri(value)

    @staticmethod
    def node_cache() -> Path:
        """:func:`node_cache_root` of the node this runs on (resolved there, not pickled)."""
        return node_cache_root()

    @property
    def is_s3(self) -> bool:
        return is_uri(self.root)

    def url(self, *parts: str) -> str:
        """The URI (or path) of ``parts`` below the run root."""
        rel = "/".join(p.strip("/") for p in parts if p)
        return f"{self.root}/{rel}" if rel else self.root

    @property
    def processed(self) -> str:
        return self.url(RUN_STORAGE_DIRS["processed"])

    @property
    def train(self) -> str:
        return self.url(RUN_STORAGE_DIRS["train"])

    def ray_storage(self) -> tuple[str, Any]:
        """Ray Train's ``(storage_path, storage_filesystem)``: a path inside a pyarrow
        ``S3FileSystem`` on the S3 endpoint (credentials: the environment), or the mounted
        folder (``None``: Ray's local filesystem)."""
        path = self.url(RUN_STORAGE_DIRS["ray"])
        if not self.is_s3:
            return path, None
        import boto3
        from pyarrow import fs as pafs

        from components.s3sync import resolve_endpoint

        endpoint = resolve_endpoint()
        kw: dict[str, Any] = {
            "region": boto3.session.Session().region_name or self.s3["region"],
            "connect_timeout": float(self.s3["connect_timeout_s"]),
            "request_timeout": float(self.s3["read_timeout_s"]),
            "retry_strategy": pafs.AwsStandardS3RetryStrategy(max_attempts=int(self.s3["request_attempts"])),
        }
        if endpoint:
            u = urlparse(endpoint)
            kw.update(endpoint_override=u.netloc, scheme=u.scheme)
        if self.s3["addressing_style"] != "virtual" and endpoint:
            kw["force_virtual_addressing"] = False
        return path.removeprefix("s3://"), pafs.S3FileSystem(**kw)

    # --- transfers ------------------------------------------------------------------------------

    def _cfg(self) -> Any:
        from components.ops_params import S3Params

        return S3Params.model_validate(self.s3)

    def _client(self) -> Any:
        from components.s3sync import make_client

        return make_client(self._cfg())

    def _run(self, fn: Any, where: str) -> Any:
        """``fn(client)`` with :mod:`components.s3sync`'s bounded retries; what survives them
        is its one-line :class:`~xct_core.errors.XctError` naming ``where``."""
        from components.s3sync import _Retrier, resolve_endpoint

        client = self._client()
        return _Retrier(self._cfg(), resolve_endpoint()).run(lambda: fn(client), where)

    def _listing(self, url: Any) -> list[dict[str, Any]]:
        """The raw ``list_objects_v2`` entries below the folder ``url`` (an ``S3Url``)."""
        prefix = f"{url.prefix}/" if url.prefix else ""

        def go(client: Any) -> list[dict[str, Any]]:
            pages = client.get_paginator("list_objects_v2").paginate(Bucket=url.bucket, Prefix=prefix)
            return [o for page in pages for o in page.get("Contents", []) if not o["Key"].endswith("/")]

        return self._run(go, str(url))

    def list(self, rel: str) -> list[tuple[str, int, str]]:
        """``(relative key, size, etag)`` of every object (file) below ``rel``, sorted."""
        if not self.is_s3:
            base = Path(self.url(rel))
            if not base.is_dir():
                return []
            return sorted((p.relative_to(base).as_posix(), p.stat().st_size, "")
                          for p in base.rglob("*") if p.is_file() and not p.is_symlink())
        from components.s3sync import parse_s3_url

        url = parse_s3_url(self.url(rel))
        n = len(url.prefix) + 1
        return sorted((o["Key"][n:], int(o["Size"]), str(o.get("ETag", "")).strip('"')) for o in self._listing(url))

    def exists(self, rel: str) -> bool:
        """Is there an object (file) at ``rel``?"""
        if not self.is_s3:
            return Path(self.url(rel)).is_file()
        from components.s3sync import parse_s3_url

        import botocore.exceptions as bexc

        url = parse_s3_url(self.url(rel))

        def head(client: Any) -> bool:
            try:
                client.head_object(Bucket=url.bucket, Key=url.prefix)
            except bexc.ClientError as e:  # 404: absent; anything else is a real error (retried, mapped)
                if str(e.response.get("Error", {}).get("Code", "")) in ("404", "NoSuchKey", "NotFound"):
                    return False
                raise
            return True

        return bool(self._run(head, str(url)))

    def put_dir(self, local: str | Path, rel: str) -> None:
        """Copy the folder ``local`` to ``rel`` (unchanged files are skipped)."""
        if not Path(local).is_dir() or not any(Path(local).rglob("*")):
            return
        if self.is_s3:
            from components.s3sync import push

            push(local, self.url(rel), self._cfg())
        else:
            shutil.copytree(local, self.url(rel), dirs_exist_ok=True)

    def get_dir(self, rel: str, local: str | Path) -> bool:
        """Copy everything below ``rel`` into ``local``; False when there is nothing there."""
        if not self.list(rel):
            return False
        if self.is_s3:
            from components.s3sync import pull

            pull(self.url(rel), local, self._cfg())
        else:
            shutil.copytree(self.url(rel), local, dirs_exist_ok=True)
        return True

    def put_file(self, local: str | Path, rel: str) -> None:
        """Upload one file (atomic on both sides: an object PUT, a rename); absent: nothing."""
        local = Path(local)
        if not local.is_file():
            return
        if not self.is_s3:
            from xct_core.atomic import atomic_path

            target = Path(self.url(rel))
            target.parent.mkdir(parents=True, exist_ok=True)
            with atomic_path(target) as tmp:
                shutil.copyfile(local, tmp)
            return
        from components.s3sync import SHA256_META, file_digests, parse_s3_url

        url = parse_s3_url(self.url(rel))
        sha, _ = file_digests(local)
        self._run(lambda c: c.upload_file(str(local), url.bucket, url.prefix, ExtraArgs={"Metadata": {SHA256_META: sha}}),
                  str(url))

    def get_file(self, rel: str, local: str | Path) -> bool:
        """Download one file to the path ``local``; False when it is absent."""
        local = Path(local)
        if not self.exists(rel):
            return False
        if not self.is_s3:
            local.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(self.url(rel), local)
            return True
        from components.s3sync import pull

        with tempfile.TemporaryDirectory(dir=local.parent if local.parent.is_dir() else None) as tmp:
            pull(self.url(rel), tmp, self._cfg())
            local.parent.mkdir(parents=True, exist_ok=True)
            os.replace(Path(tmp) / rel.rsplit("/", 1)[-1], local)
        return True

    def delete(self, rel: str) -> int:
        """Delete everything below ``rel`` (a fresh start); returns how many files went."""
        if not self.is_s3:
            p = Path(self.url(rel))
            n = len(self.list(rel)) if p.is_dir() else int(p.is_file())
            shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
            return n
        from components.s3sync import parse_s3_url

        keys = [k for k, _, _ in self.list(rel)]
        url = parse_s3_url(self.url(rel))
        for i in range(0, len(keys), 1000):
            batch = {"Objects": [{"Key": f"{url.prefix}/{k}"} for k in keys[i:i + 1000]]}
            self._run(lambda c, b=batch: c.delete_objects(Bucket=url.bucket, Delete=b), str(url))
        if self.exists(rel):  # a single object named rel
            self._run(lambda c: c.delete_object(Bucket=url.bucket, Key=url.prefix), str(url))
            return len(keys) + 1
        return len(keys)

    def checkpoint_dirs(self, stage_name: str) -> list[str]:
        """The Ray checkpoint folders ``step_N`` of a stage in this run (oldest first)."""
        rel = f"{RUN_STORAGE_DIRS['ray']}/{stage_name}"
        return sorted({k.split("/", 1)[0] for k, _, _ in self.list(rel) if _STEP_RE.match(k.split("/", 1)[0])
                       and k.endswith("/state.pt")})

    def get_checkpoints(self, stage_name: str, dest: str | Path) -> list[str]:
        """Download the stage's checkpoint folders into ``dest`` (the loop's checkpoints
        folder), so resume picks among them exactly as among local ones (newest intact first)."""
        names = self.checkpoint_dirs(stage_name)
        for name in names:
            self.get_dir(f"{RUN_STORAGE_DIRS['ray']}/{stage_name}/{name}", Path(dest) / name)
        return names

    # --- data on every node ---------------------------------------------------------------------

    def publish_processed(self, local: str | Path) -> str:
        """Copy a local processed folder to the run's ``processed/`` (unchanged files are
        skipped: a retry re-uploads nothing); returns its URI — what a driver on another node
        (a Ray job's entrypoint: ``xct train --processed URI …``) and every worker read."""
        self.put_dir(local, RUN_STORAGE_DIRS["processed"])
        return self.processed

    def node_copy(self, data: str) -> Path:
        """The data folder ``data`` (an ``s3://`` URI or a mounted path) readable on this node:
        a mounted path as is; a URI downloaded once per node into
        ``<node cache>/data/<digest>`` (digest of the listing: keys, sizes, ETags), under a
        per-node lock, completed atomically (a rename), reused by every later worker."""
        if not is_uri(data):
            return Path(data)
        from components.s3sync import parse_s3_url, pull

        url = parse_s3_url(data)
        listing = [(o["Key"], int(o["Size"]), str(o.get("ETag", ""))) for o in self._listing(url)]
        if not listing:
            raise InputError(data, "no objects under this prefix (publish the processed data first)")
        digest = hashlib.sha256(json.dumps(sorted(listing)).encode()).hexdigest()[:24]
        cache = node_cache_root() / "data"
        final = cache / digest
        with _node_lock(cache / f".{digest}.lock"):
            if not (final / ".complete").is_file():
                part = cache / f".{digest}.partial"
                pull(data, part, self._cfg())  # resumable: a killed download continues here
                (part / ".complete").write_text(json.dumps({"source": data, "objects": len(listing)}) + "\n")
                shutil.rmtree(final, ignore_errors=True)
                os.replace(part, final)
        return final
