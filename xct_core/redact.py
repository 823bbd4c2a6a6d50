"""Secrets out of every output: the ONE redaction of the program (docs/security.md).

What :func:`redact` masks in a text (with ``***``):

* the password of a URL's userinfo, any scheme (``http://user:pw@host`` →
  ``http://user:***@host``, ``postgresql+psycopg2://u:pw@db/x``, ``s3://…``); a userinfo
  without a colon (a bare token, ``https://TOKEN@host``) is masked whole;
* the values of credential-carrying query parameters (``X-Amz-Signature``,
  ``X-Amz-Credential``, ``X-Amz-Security-Token``, ``token``, ``password``, ``access_key``,
  ``secret``, ``sig``, … — any parameter whose name holds one of :data:`_QUERY_WORDS`);
* ``Authorization:`` header values and ``Bearer`` tokens;
* the VALUE of every secret environment variable (:func:`is_secret_name`: the known ones in
  :data:`SECRET_ENV` and any whose name ends in ``PASSWORD``/``PASSWD``/``SECRET``/``TOKEN``/
  ``_KEY``) wherever it appears, plus any value handed to :func:`register_secret` (a secret
  read from a mounted file). Values shorter than :data:`MIN_SECRET_LEN` characters are not
  masked as free text (they would garble ordinary words: ``pw``, ``testing``); inside a URL's
  userinfo a password of any length is masked.

Where it is applied: :func:`xct_core.errors.error_line` / :func:`~xct_core.errors.warning_line`
(every ``xct: error:`` / ``xct: warning:`` line), :func:`redacted_output` (the CLI wraps its
stdout/stderr and installs :class:`RedactFilter` on every log record for the run), and the
documents the program writes (:func:`redact_doc`: ``reports/summary.json``, the model card,
MLflow params and tags, the KFP run summary, the training failure JSON).

Pure standard library: usable from every layer (xct_core imports no engine).
"""

from __future__ import annotations

import logging
import os
import re
import sys
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any, TextIO

MASK = "***"
#: shorter values of secret env vars are not masked in free text (URL passwords always are)
MIN_SECRET_LEN = 8

#: environment variables that hold a credential although their name does not end like one
SECRET_ENV = frozenset({
    "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN", "AWS_ACCESS_KEY_ID",
    "MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_TOKEN", "RAY_AUTH_TOKEN",
    "KFP_TOKEN", "KF_PIPELINES_TOKEN", "XCT_KFP_TOKEN", "XCT_PIPELINE_TOKEN",
    "MINIO_ROOT_PASSWORD", "MINIO_ROOT_USER", "MINIO_ACCESS_KEY", "MINIO_SECRET_KEY",
    "POSTGRES_PASSWORD", "PGPASSWORD", "DATABRICKS_TOKEN", "AZURE_STORAGE_CONNECTION_STRING",
    "AZURE_STORAGE_ACCESS_KEY", "GOOGLE_APPLICATION_CREDENTIALS_JSON",
})
_SECRET_ENDINGS = ("PASSWORD", "PASSWD", "SECRET", "TOKEN", "_KEY", "_SECRET_KEY", "_CREDENTIALS")
#: names that end like a secret but hold a path or a switch, never the secret itself
_NOT_SECRET_ENDINGS = ("_FILE", "_PATH", "_DIR", "_MODE", "_ENABLED")

_registered: set[str] = set()


def is_secret_name(name: str) -> bool:
    """Whether environment variable ``name`` holds a credential (its value is masked)."""
    n = name.upper()
    if n in SECRET_ENV:
        return True
    if n.endswith(_NOT_SECRET_ENDINGS):
        return False
    return n.endswith(_SECRET_ENDINGS)


def register_secret(value: str | None) -> None:
    """Mask ``value`` from now on (a credential read from a file rather than the environment)."""
    if value and value.strip():
        _registered.add(value.strip())


def secret_values(env: Mapping[str, str] | None = None) -> list[str]:
    """The values to mask as free text: secret env vars of ``env`` (default ``os.environ``) and
    :func:`register_secret`'s, at least :data:`MIN_SECRET_LEN` long, longest first (so a
    secret containing another is masked whole)."""
    env = os.environ if env is None else env
    vals = {v for k, v in env.items() if v and is_secret_name(k)} | _registered
    return sorted((v for v in vals if len(v) >= MIN_SECRET_LEN), key=lambda v: (-len(v), v))


# scheme://[userinfo@]: userinfo runs to the LAST '@' before the authority ends (an unescaped
# '@' in a password is common); it never crosses whitespace, quotes, '/', '?' or '#'
_URL_USERINFO = re.compile(r"(?P<scheme>\b[A-Za-z][A-Za-z0-9+.\-]*://)(?P<userinfo>[^\s/?#'\"<>`]*)@")
_QUERY_WORDS = ("token", "password", "passwd", "pwd", "secret", "signature", "credential", "sig",
                "key", "auth", "session")
_QUERY = re.compile(
    r"(?P<name>[?&;](?:[A-Za-z0-9_.\-]*?(?:" + "|".join(_QUERY_WORDS) + r")[A-Za-z0-9_.\-]*)=)"
    r"(?P<value>[^&#\s'\"<>`]*)",
    re.IGNORECASE,
)
#: an Authorization header's value, to the end of the line or the closing quote (AWS SigV4:
#: ``AWS4-HMAC-SHA256 Credential=AKIA…/…, SignedHeaders=…, Signature=…``)
_AUTH = re.compile(r"(?P<head>\b(?:Authorization|Proxy-Authorization)\b['\"]?\s*[:=]\s*(?:b?['\"])?"
                   r"(?:(?:Bearer|Basic|Token|Digest)\s+)?)(?P<value>[^'\"\r\n]+)", re.IGNORECASE)
_BEARER = re.compile(r"(?P<head>\bBearer\s+)(?P<value>[A-Za-z0-9._~+/=\-]{8,})")


def _userinfo(m: re.Match[str]) -> str:
    info = m.group("userinfo")
    user, sep, _pw = info.partition(":")
    return f"{m.group('scheme')}{user}:{MASK}@" if sep else f"{m.group('scheme')}{MASK}@"


def redact_url(url: str) -> str:
    """``url`` with its userinfo password and credential query values masked
    (``postgresql://xct:***@db:5432/optuna``); other URLs unchanged."""
    return redact(url)


def redact(text: Any, secrets: Iterable[str] | None = None) -> str:
    """``text`` (made a ``str``) with every credential masked (see the module docstring).
    ``secrets``: the values to mask as free text (default :func:`secret_values`)."""
    s = text if isinstance(text, str) else str(text)
    if not s:
        return s
    if "://" in s and "@" in s:
        s = _URL_USERINFO.sub(_userinfo, s)
    if "=" in s:
        s = _QUERY.sub(lambda m: m.group("name") + MASK, s)
    if ":" in s or "=" in s:
        s = _AUTH.sub(lambda m: m.group("head") + MASK, s)
    if " " in s:
        s = _BEARER.sub(lambda m: m.group("head") + MASK, s)
    for v in secret_values() if secrets is None else secrets:
        if v and v in s:
            s = s.replace(v, MASK)
    return s


def redact_doc(doc: Any) -> Any:
    """A JSON-like document with every string (keys included) passed through :func:`redact`;
    numbers, booleans and ``None`` unchanged. For the reports and tags the program writes."""
    secrets = secret_values()
    if isinstance(doc, str):
        return redact(doc, secrets)
    if isinstance(doc, Mapping):
        return {(redact(k, secrets) if isinstance(k, str) else k): redact_doc(v) for k, v in doc.items()}
    if isinstance(doc, (list, tuple)):
        return [redact_doc(v) for v in doc]
    return doc


# --------------------------------------------------------------------------- logging


class RedactFilter(logging.Filter):
    """Redacts a log record in place (message with its args, exception text, stack), so no
    handler — the program's or a library's — formats a secret."""

    def filter(self, record: logging.LogRecord) -> bool:
        if getattr(record, "_xct_redacted", False):
            return True
        try:
            msg = record.getMessage()
        except Exception:  # a library's broken format string: leave the record as it is
            return True
        record.msg, record.args = redact(msg), ()
        if record.exc_info and not record.exc_text:
            record.exc_text = redact(logging.Formatter().formatException(record.exc_info))
        elif record.exc_text:
            record.exc_text = redact(record.exc_text)
        if record.stack_info:
            record.stack_info = redact(record.stack_info)
        record._xct_redacted = True
        return True


@contextmanager
def log_redaction() -> Iterator[RedactFilter]:
    """Inside the block every log record, of any logger, is redacted when it is created (the
    record factory applies :class:`RedactFilter`; the filter also sits on the root logger's
    handlers for records made elsewhere)."""
    flt = RedactFilter()
    old_factory = logging.getLogRecordFactory()

    def factory(*args: Any, **kwargs: Any) -> logging.LogRecord:
        record = old_factory(*args, **kwargs)
        flt.filter(record)
        return record

    logging.setLogRecordFactory(factory)
    handlers = list(logging.getLogger().handlers)
    for h in handlers:
        h.addFilter(flt)
    try:
        yield flt
    finally:
        if logging.getLogRecordFactory() is factory:
            logging.setLogRecordFactory(old_factory)
        for h in handlers:
            h.removeFilter(flt)


# --------------------------------------------------------------------------- streams


class RedactingStream:
    """A text stream that redacts what is written to it and passes everything else to the
    stream it wraps (``isatty``, ``fileno``, ``encoding``, ``buffer`` …). A secret split
    over two ``write`` calls is not seen (the program writes whole lines)."""

    def __init__(self, stream: TextIO) -> None:
        self._xct_stream = stream

    def write(self, s: Any) -> int:
        if isinstance(s, str):
            self._xct_stream.write(redact(s))
            return len(s)
        return self._xct_stream.write(s)  # bytes: the text stream raises as it would

    def writelines(self, lines: Iterable[str]) -> None:
        for line in lines:
            self.write(line)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._xct_stream, name)


@contextmanager
def redacted_output() -> Iterator[None]:
    """Inside the block ``sys.stdout``/``sys.stderr`` redact what the program (and the
    libraries it runs in-process: Ray's forwarded worker lines, tqdm, click) print, and log
    records are redacted (:func:`log_redaction`). Subprocesses writing to the file
    descriptors directly are not covered."""
    old_out, old_err = sys.stdout, sys.stderr
    if old_out is not None and not isinstance(old_out, RedactingStream):
        sys.stdout = RedactingStream(old_out)  # type: ignore[assignment]
    if old_err is not None and not isinstance(old_err, RedactingStream):
        sys.stderr = RedactingStream(old_err)  # type: ignore[assignment]
    try:
        with log_redaction():
            yield
    finally:
        sys.stdout, sys.stderr = old_out, old_err


def install_redaction() -> None:
    """:func:`redacted_output` for the rest of the process (no way back): for entry points
    that are not the ``xct`` CLI and have no single place to end (a KFP task's body:
    :func:`components.kfp_components._environment`), so MLflow's own "View run at <tracking
    URI>" lines, library logs and a failing task's traceback are redacted there too."""
    global _installed
    if _installed is None:
        _installed = redacted_output()
        _installed.__enter__()
        sys.excepthook = redacted_excepthook


_installed: Any = None


def redacted_excepthook(kind: type[BaseException], value: BaseException, tb: Any) -> None:
    """``sys.excepthook`` that prints the traceback of an uncaught exception (a bug) redacted."""
    import traceback

    text = "".join(traceback.format_exception(kind, value, tb))
    (sys.stderr or sys.__stderr__).write(redact(text))
