"""Atomic file and folder writes: ONE implementation for every output of the project.

A file is written to a temporary sibling (``.{name}.<random>{suffix}`` in the same folder,
so the final ``os.replace`` is atomic on POSIX), given the mode a normally created file
would have (``0o666 & ~umask``; ``mkstemp`` alone creates 0600), then renamed into place.
On any failure the temporary file is removed and the previous content of ``path`` (if any)
is untouched: readers never see a half-written file.

Three ways in, one mechanism:

* :func:`write_bytes_atomic` / :func:`write_text_atomic` / :func:`write_json_atomic` for
  data already in memory;
* :func:`atomic_path` — a context manager yielding the temporary path, for writers that
  want a file name (``nib.save``, ``np.save``, ``savefig``, a KFP compiler, a download):
  raise inside the block (e.g. a failed checksum) and nothing is renamed;
* :func:`atomic_dir` — the same for a folder (a training checkpoint): assembled under a
  temporary sibling name (``0o777 & ~umask``) and renamed into place, replacing an old one.

:func:`writable` turns the OS errors of an output path (parent is a file, no permission,
disk full) into one-line :class:`~xct_core.errors.InputError` s naming the path;
:func:`check_writable` raises the same errors BEFORE any work (a command checks its output
paths first, so a long reconstruction does not end in "cannot write"), creating nothing.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from xct_core.errors import InputError

__all__ = [
    "atomic_dir",
    "atomic_path",
    "check_writable",
    "file_mode",
    "folder_mode",
    "temp_sibling",
    "writable",
    "write_bytes_atomic",
    "write_json_atomic",
    "write_text_atomic",
]


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def file_mode() -> int:
    """The mode of a normally created file: ``0o666 & ~umask``."""
    return 0o666 & ~_umask()


def folder_mode() -> int:
    """The mode of a normally created folder: ``0o777 & ~umask``."""
    return 0o777 & ~_umask()


def _mkdir_parent(path: Path) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        raise InputError(path, "cannot write: a parent of this path is a file, not a folder") from None
    except OSError as e:
        raise InputError(path, f"cannot write ({e.strerror or e})") from None


def temp_sibling(path: str | Path, suffix: str = ".tmp") -> tuple[int, str]:
    """Create ``.{name}.<random>{suffix}`` beside ``path`` (parents made); return (fd, temp path).

    The temp file gets the mode a normally created file would (``0o666 & ~umask``).
    """
    path = Path(path)
    _mkdir_parent(path)
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix, dir=path.parent)
    except OSError as e:
        raise InputError(path, f"cannot write ({e.strerror or e})") from None
    os.chmod(tmp, file_mode())
    return fd, tmp


@contextlib.contextmanager
def atomic_path(path: str | Path, suffix: str = ".tmp") -> Iterator[Path]:
    """Yield a temporary sibling path of ``path``; on a clean exit it replaces ``path``.

    ``suffix`` keeps writers that look at the extension happy (``.nii.gz``, ``.png``,
    ``.yaml``). The temp file exists (empty, normal mode) when the block starts. An
    exception inside the block removes it and propagates; ``path`` is untouched.
    """
    path = Path(path)
    fd, tmp = temp_sibling(path, suffix)
    os.close(fd)
    try:
        yield Path(tmp)
        with writable(path):
            os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


@contextlib.contextmanager
def atomic_dir(path: str | Path) -> Iterator[Path]:
    """Yield a temporary sibling folder of ``path``; on a clean exit it becomes ``path``.

    An existing ``path`` is moved aside first and deleted after the rename (a re-run that
    rewrites the same checkpoint). On an exception the temporary folder is deleted.
    """
    path = Path(path)
    _mkdir_parent(path)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{path.name}-", dir=path.parent))
    os.chmod(tmp, folder_mode())
    try:
        yield tmp
        if path.exists():
            old = path.parent / f".old-{path.name}-{os.getpid()}"
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _fs_limits(path: Path) -> tuple[int, int]:
    """(NAME_MAX, PATH_MAX) of the file system holding the nearest existing ancestor of
    ``path`` (walked from the root down, so an over-long path never reaches ``stat``)."""
    probe = Path(path.anchor or "/")
    for part in path.parts[1:]:
        nxt = probe / part
        try:
            if not nxt.is_dir():
                break
        except OSError:
            break
        probe = nxt
    try:
        return os.pathconf(probe, "PC_NAME_MAX"), os.pathconf(probe, "PC_PATH_MAX")
    except (OSError, ValueError):
        return 255, 4096


def _temp_name_bytes(name: str) -> int:
    """Bytes of the longest temporary sibling a write of ``name`` creates (:func:`temp_sibling`:
    ``.{name}.<8 random>{suffix}``, the suffix being ``.tmp`` or the name's own suffixes)."""
    suffix = "".join(Path(name).suffixes)
    return len(os.fsencode(f".{name}.")) + 8 + max(len(os.fsencode(suffix)), len(".tmp"))


def check_path_limits(path: str | Path) -> None:
    """A one-line :class:`InputError` when ``path`` cannot be created on its file system: a
    name longer than NAME_MAX (the file's, with the temporary sibling every write goes
    through, and every folder to be made), or the whole path longer than PATH_MAX. Checked
    lexically before anything is written, so a too-long sibling (``_std``, ``.qa.json``)
    never leaves the first file of a set written alone."""
    path = Path(path).absolute()
    name_max, path_max = _fs_limits(path)
    for part in path.parts[1:-1]:
        if len(os.fsencode(part)) > name_max:
            raise InputError(f"{part[:40]}…", f"cannot create this folder: its name is {len(os.fsencode(part))} "
                                              f"bytes, the file system allows {name_max}")
    n, tmp = len(os.fsencode(path.name)), _temp_name_bytes(path.name)
    if tmp > name_max:
        raise InputError(f"{path.name[:40]}…" if len(path.name) > 40 else path.name,
                         f"cannot write: this file name is {n} bytes; with the temporary file each write goes "
                         f"through it needs {tmp}, the file system allows {name_max}")
    total = len(os.fsencode(str(path.parent))) + 1 + tmp
    if total >= path_max:
        raise InputError(f"{str(path)[:60]}…", f"cannot write: the path is {len(os.fsencode(str(path)))} bytes "
                                               f"({total} with its temporary file); PATH_MAX is {path_max}")


def check_writable(path: str | Path) -> None:
    """The :func:`writable` errors of ``path``, found before anything is written: a name or
    the path too long (:func:`check_path_limits`), ``path`` is a folder, its nearest existing
    parent is a file, or that parent is not writable. Creates nothing (missing parents are
    made by the write itself)."""
    path = Path(path)
    check_path_limits(path)
    if path.is_dir():
        raise InputError(path, "cannot write: it is a folder")
    for parent in path.absolute().parents:
        if not parent.exists():
            continue
        if not parent.is_dir():
            raise InputError(path, "cannot write: a parent of this path is a file, not a folder")
        if not os.access(parent, os.W_OK | os.X_OK):
            raise InputError(path, f"cannot write (permission denied in {parent})")
        return


@contextlib.contextmanager
def writable(path: str | Path) -> Iterator[None]:
    """Turn OS errors raised while writing ``path`` into a one-line :class:`InputError`."""
    try:
        yield
    except InputError:
        raise
    except (FileExistsError, NotADirectoryError):
        raise InputError(path, "cannot write: a parent of this path is a file, not a folder") from None
    except IsADirectoryError:
        raise InputError(path, "cannot write: it is a folder") from None
    except OSError as e:
        raise InputError(path, f"cannot write ({e.strerror or e})") from None


def write_bytes_atomic(path: str | Path, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically (temp sibling + ``os.replace``)."""
    path = Path(path)
    with atomic_path(path) as tmp, writable(path):
        tmp.write_bytes(data)
    return path


def write_text_atomic(path: str | Path, text: str) -> Path:
    """Write ``text`` (UTF-8, newlines as given) to ``path`` atomically."""
    return write_bytes_atomic(path, text.encode("utf-8"))


def write_json_atomic(path: str | Path, doc: Any) -> Path:
    """Write ``doc`` as indented, key-sorted JSON (non-finite floats → ``null``) atomically."""
    from xct_core.jsondoc import json_text

    return write_text_atomic(path, json_text(doc))
