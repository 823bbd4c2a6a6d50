"""Atomic file writes: one implementation for the whole project.

A file is written to a temporary sibling (``.{name}.*.tmp`` in the same folder, so the
final ``os.replace`` is atomic on POSIX), given the usual umask-derived mode (mkstemp
creates 0600), then renamed into place. On any failure the temporary file is removed and
the previous content of ``path`` (if any) is untouched: readers never see a half-written
file.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path


def temp_sibling(path: str | Path, suffix: str = ".tmp") -> tuple[int, str]:
    """Create ``.{name}.<random>{suffix}`` beside ``path`` (parents made); return (fd, temp path).

    The temp file gets the mode a normally created file would (``0o666 & ~umask``).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix, dir=path.parent)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)
    return fd, tmp


def write_bytes_atomic(path: str | Path, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically (temp sibling + ``os.replace``)."""
    path = Path(path)
    fd, tmp = temp_sibling(path)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def write_text_atomic(path: str | Path, text: str) -> Path:
    """Write ``text`` (UTF-8, newlines as given) to ``path`` atomically."""
    return write_bytes_atomic(path, text.encode("utf-8"))
