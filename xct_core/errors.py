"""User-facing errors.

Anything a user can cause (a bad file, a bad parameter) raises a subclass of
:class:`XctError`; the CLI prints its message on one line and exits non-zero, without a
traceback. Programming errors stay ordinary exceptions.
"""

from __future__ import annotations

from pathlib import Path


class XctError(Exception):
    """An error caused by input the user controls. The message is shown as-is."""

    exit_code = 2


class InputError(XctError):
    """A file or directory given by the user is unusable. Names the path and the problem."""

    def __init__(self, path: str | Path | None, problem: str):
        self.path = None if path is None else str(path)
        self.problem = problem
        msg = problem if path is None else f"{path}: {problem}"
        super().__init__(msg)


class ConfigError(XctError):
    """params.yaml (or an override) is invalid."""
