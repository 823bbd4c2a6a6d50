"""`xct drr`: render a DRR from a CT."""

from __future__ import annotations

import typer


def register(app: typer.Typer) -> None:
    """Add the top-level `drr` command to the root app."""
