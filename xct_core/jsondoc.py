"""JSON documents: ONE writer format and ONE reader for every report, manifest and record.

* :func:`json_text` — deterministic JSON (sorted keys, 2-space indent, trailing newline);
  non-finite floats become ``null`` and NumPy scalars plain numbers. Write it atomically with
  :func:`xct_core.atomic.write_json_atomic`.
* :func:`read_json_doc` — a JSON object from a file, or a one-line
  :class:`~xct_core.errors.InputError` naming the file and the problem: missing (with a hint
  of the step that writes it), unreadable, not JSON, not an object, or lacking a required key.
  Every reader of a project document (metrics, gate reports, manifests, stats, summaries)
  goes through it, so the same file is never read two ways.
* :func:`read_doc_text` — the bounded read under it (and under :mod:`xct_core.yamlsafe`):
  only a regular file (a FIFO or a device such as ``/dev/zero`` is refused before it is
  opened, so nothing blocks), at most ``max_bytes`` read, strict UTF-8.
* :func:`parse_json_text` — ``json.loads`` with nesting bounded (:data:`MAX_JSON_DEPTH`):
  a document nested 10⁵ deep is a one-line error, not a ``RecursionError``.
"""

from __future__ import annotations

import json
import math
import os
import stat
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from xct_core.errors import InputError

__all__ = ["MAX_DOC_BYTES", "MAX_JSON_DEPTH", "json_text", "jsonable", "parse_json_text", "read_doc_text",
           "read_json_doc"]

#: the largest project document (JSON or YAML) read (bytes); bigger is refused before parsing
MAX_DOC_BYTES = 16 << 20
#: the deepest nesting of lists/objects accepted in a JSON document (project documents use < 10)
MAX_JSON_DEPTH = 100


def jsonable(v: Any) -> Any:
    """``v`` with dict keys as strings, tuples as lists, NumPy scalars/arrays as Python
    values and non-finite floats as ``None`` (JSON has no NaN)."""
    if isinstance(v, dict):
        return {str(k): jsonable(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [jsonable(x) for x in v]
    if hasattr(v, "tolist") and hasattr(v, "dtype"):  # NumPy scalar or array
        v = v.tolist()
        if isinstance(v, list):
            return jsonable(v)
    if isinstance(v, Path):
        return str(v)
    if isinstance(v, float) and not math.isfinite(v):
        return None
    return v


def json_text(obj: Any) -> str:
    """Deterministic JSON (sorted keys, 2-space indent, trailing newline); NaN → null."""
    return json.dumps(jsonable(obj), indent=2, sort_keys=True, allow_nan=False) + "\n"


def read_doc_text(path: str | Path, what: str = "document", *, missing_hint: str | None = None,
                  max_bytes: int = MAX_DOC_BYTES) -> str:
    """The UTF-8 text of ``path``, read with bounds: a one-line :class:`InputError` naming the
    file when it is missing (+ ``missing_hint``), a folder, not a regular file (FIFO, device,
    socket: refused before it is opened, so a FIFO never blocks), larger than ``max_bytes``
    (at most ``max_bytes + 1`` bytes are ever read, so ``/dev/zero`` behind a symlink is
    safe too), unreadable or not UTF-8."""
    p = Path(path)
    try:
        st = os.stat(p)
        if stat.S_ISDIR(st.st_mode):
            raise IsADirectoryError
        if not stat.S_ISREG(st.st_mode):
            raise InputError(p, f"{what} must be a regular file, not a {_file_kind(st.st_mode)}")
        if st.st_size > max_bytes:
            raise InputError(p, f"{what} too large ({st.st_size} bytes; at most {max_bytes} are read)")
        fd = os.open(p, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0))
        with os.fdopen(fd, "rb") as f:
            if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):  # replaced between stat and open
                raise InputError(p, f"{what} must be a regular file")
            data = f.read(max_bytes + 1)
    except FileNotFoundError:
        hint = f" ({missing_hint})" if missing_hint else ""
        raise InputError(p, f"{what} not found{hint}") from None
    except IsADirectoryError:
        raise InputError(p, f"{what} expected, found a folder") from None
    except ValueError as e:  # e.g. an embedded NUL in the path
        raise InputError(p, f"unreadable {what} ({e})") from None
    except OSError as e:
        raise InputError(p, f"unreadable {what} ({e.strerror or e})") from None
    if len(data) > max_bytes:
        raise InputError(p, f"{what} too large (more than {max_bytes} bytes)")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise InputError(p, f"{what} is not UTF-8 text (byte 0x{data[e.start]:02x} at offset {e.start})") from None


def _file_kind(mode: int) -> str:
    for test, name in ((stat.S_ISFIFO, "FIFO (named pipe)"), (stat.S_ISCHR, "character device"),
                       (stat.S_ISBLK, "block device"), (stat.S_ISSOCK, "socket")):
        if test(mode):
            return name
    return "special file"


def _too_deep(doc: Any, limit: int) -> bool:
    """Whether lists/dicts in ``doc`` nest deeper than ``limit`` (iterative: no recursion)."""
    stack = [(doc, 1)]
    while stack:
        v, d = stack.pop()
        if isinstance(v, (dict, list)):
            if d > limit:
                return True
            stack.extend((x, d + 1) for x in (v.values() if isinstance(v, dict) else v))
    return False


def parse_json_text(text: str, source: str | Path, what: str = "JSON document", *,
                    max_depth: int = MAX_JSON_DEPTH) -> Any:
    """``json.loads(text)`` or a one-line :class:`InputError` naming ``source``: not JSON, or
    nested deeper than ``max_depth`` (a 10⁵-deep document never reaches a RecursionError)."""
    try:
        doc = json.loads(text)
    except RecursionError:
        raise InputError(source, f"{what} nested too deeply (more than {max_depth} levels)") from None
    except ValueError as e:
        raise InputError(source, f"{what} is not valid JSON ({e})") from None
    if _too_deep(doc, max_depth):
        raise InputError(source, f"{what} nested too deeply (more than {max_depth} levels)")
    return doc


def read_json_doc(
    path: str | Path,
    what: str = "JSON document",
    *,
    missing_hint: str | None = None,
    required: Iterable[str] = (),
) -> dict[str, Any]:
    """Read a JSON object from ``path``.

    Args:
        what: how the document is named in errors (``"gate report"``, ``"metrics file"``).
        missing_hint: appended when the file does not exist (e.g. ``"run the gate step first"``).
        required: keys the object must have.

    Raises :class:`InputError` (one line, naming ``path``) for every way the file is unusable
    (see :func:`read_doc_text` and :func:`parse_json_text` for the bounds).
    """
    p = Path(path)
    doc = parse_json_text(read_doc_text(p, what, missing_hint=missing_hint), p, what)
    if not isinstance(doc, dict):
        raise InputError(p, f"{what} must hold a JSON object, got {type(doc).__name__}")
    lacking = [k for k in required if k not in doc]
    if lacking:
        raise InputError(p, f"not a valid {what} (missing {', '.join(repr(k) for k in lacking)})")
    return doc
