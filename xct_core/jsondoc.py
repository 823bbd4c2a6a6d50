"""JSON documents: ONE writer format and ONE reader for every report, manifest and record.

* :func:`json_text` — deterministic JSON (sorted keys, 2-space indent, trailing newline);
  non-finite floats become ``null`` and NumPy scalars plain numbers. Write it atomically with
  :func:`xct_core.atomic.write_json_atomic`.
* :func:`read_json_doc` — a JSON object from a file, or a one-line
  :class:`~xct_core.errors.InputError` naming the file and the problem: missing (with a hint
  of the step that writes it), unreadable, not JSON, not an object, or lacking a required key.
  Every reader of a project document (metrics, gate reports, manifests, stats, summaries)
  goes through it, so the same file is never read two ways.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from xct_core.errors import InputError

__all__ = ["json_text", "jsonable", "read_json_doc"]


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

    Raises :class:`InputError` (one line, naming ``path``) for every way the file is unusable.
    """
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except FileNotFoundError:
        hint = f" ({missing_hint})" if missing_hint else ""
        raise InputError(p, f"{what} not found{hint}") from None
    except IsADirectoryError:
        raise InputError(p, f"{what} expected, found a folder") from None
    except (OSError, UnicodeDecodeError) as e:
        raise InputError(p, f"unreadable {what} ({getattr(e, 'strerror', None) or e})") from None
    try:
        doc = json.loads(text)
    except ValueError as e:
        raise InputError(p, f"{what} is not valid JSON ({e})") from None
    if not isinstance(doc, dict):
        raise InputError(p, f"{what} must hold a JSON object, got {type(doc).__name__}")
    lacking = [k for k in required if k not in doc]
    if lacking:
        raise InputError(p, f"not a valid {what} (missing {', '.join(repr(k) for k in lacking)})")
    return doc
