"""Run the `xct` CLI in-process (as a user would from a shell) and return its exit code."""

from __future__ import annotations


def xct(args: list[str]) -> int:
    """``xct ARGS`` through the console entry point; the exit code (0 when it returned)."""
    from pipelines.cli import main

    try:
        main([str(a) for a in args])
    except SystemExit as e:
        return int(e.code or 0) if not isinstance(e.code, str) else 1
    return 0
