"""What keeps a training folder sane around the loop: one run per folder
(:func:`folder_lock`) and SIGTERM as a clean stop (:class:`SigtermGuard`).

* **Lock.** ``xct train`` holds an exclusive ``fcntl.flock`` on ``<out>/.train.lock``
  (:attr:`xct_core.layout.RunLayout.train_lock`) for the whole run; the file records the
  holder's pid and host. A second run on the same folder stops at once with one line
  naming the folder and that pid (:class:`~xct_core.training.TrainingFailed`, exit 1)
  instead of both "resuming" and interleaving checkpoints. The kernel drops the lock when
  the holder exits, however it dies (``kill -9`` included), so there is no stale lock to
  clean up; the file itself stays.
* **SIGTERM** (a Kubernetes eviction, ``kill PID``): while :class:`SigtermGuard` is active
  in the main thread, SIGTERM interrupts the main thread where it is, so the ``finally`` /
  ``except`` blocks of the run close it (the engine's MLflow run is marked KILLED; Ray is
  shut down), and the block ends with :class:`~xct_core.training.Terminated` (exit 143). Checkpoints are written
  atomically, so whichever one was newest stays intact. Further SIGTERMs during that
  clean-up are ignored (the orchestrator's SIGKILL after its grace period still ends it).
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import signal
import socket
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from types import FrameType
from typing import Any

from xct_core.atomic import file_mode, writable
from xct_core.training.result import Terminated, TrainingFailed

__all__ = ["SigtermGuard", "SigtermInterrupt", "folder_lock"]


def _holder(fd: int) -> str:
    try:
        text = os.pread(fd, 200, 0).decode("utf-8", "replace").split()
    except OSError:
        text = []
    if not text:
        return "pid unknown"
    return f"pid {text[0]}" + (f" on {text[1]}" if len(text) > 1 else "")


@contextlib.contextmanager
def folder_lock(lock_file: str | Path) -> Iterator[None]:
    """Hold an exclusive lock on ``lock_file`` (created with its folder) for the block.

    Raises :class:`TrainingFailed` at once when another process holds it (one line: the
    folder and the holder's pid), :class:`~xct_core.errors.InputError` when the folder
    cannot be written."""
    lock_file = Path(lock_file)
    with writable(lock_file):
        lock_file.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(lock_file, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, file_mode())
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise TrainingFailed(
                f"{lock_file.parent}: another `xct train` ({_holder(fd)}) is using this output folder; "
                "wait for it to finish or train into another --out"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()} {socket.gethostname()}\n".encode(), 0)
        yield
    finally:
        os.close(fd)  # releases the lock


class SigtermInterrupt(KeyboardInterrupt):
    """What SIGTERM raises inside a :class:`SigtermGuard` block. A ``KeyboardInterrupt``
    because blocking engine calls only let that through (``ray.get`` turns a signal
    handler's other exceptions into "exception ignored" and keeps waiting); the guard turns
    it into :class:`Terminated` when the block ends."""


class SigtermGuard:
    """While active (``with``; main thread only, elsewhere a no-op), SIGTERM interrupts the
    main thread once (:class:`SigtermInterrupt`); later SIGTERMs are ignored so the clean-up
    runs. Leaving the block with that interrupt (or with anything else after SIGTERM came,
    e.g. an engine's own interrupt error) raises :class:`Terminated` with ``message()``.
    :meth:`reassert` re-installs the handler after a library replaced it (``ray.init``
    installs a ``sys.exit`` handler, under which Ray's C++ core dumps a stack trace)."""

    def __init__(self, message: Callable[[], str]) -> None:
        self.message = message
        self.active = threading.current_thread() is threading.main_thread()
        self._prev: Any = None
        self.fired = False

    def _handler(self, signum: int, frame: FrameType | None) -> None:
        if self.fired:
            return
        self.fired = True
        raise SigtermInterrupt()

    def reassert(self) -> None:
        if self.active:
            signal.signal(signal.SIGTERM, self._handler)

    def __enter__(self) -> SigtermGuard:
        if self.active:
            self._prev = signal.signal(signal.SIGTERM, self._handler)
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: Any) -> None:
        if self.active:
            signal.signal(signal.SIGTERM, self._prev if self._prev is not None else signal.SIG_DFL)
        if self.fired and exc is not None and not isinstance(exc, Terminated):
            raise Terminated(self.message()) from None
