"""`xct data validate DIR`: run the data-validation suite (Great Expectations) over a folder.

DIR is a raw folder of CTs (NIfTI files, DICOM series folders; scanned in memory, nothing
written) or an ingest output folder (it has ``stats.json``; the table is validated and the
canonical volume files are checked against their checksums).

Contract (scripts rely on it): exit 0 when every volume passes; exit 1 otherwise, with one
line per failing file on stdout, ``<path>: <reason>; <reason>``; a summary goes to stderr,
after one ``xct: note: <path>: ignored (…)`` line per file that is neither a NIfTI file nor
part of a DICOM series (named, not validated; it does not change the exit status).
Unusable input (no such folder, no CT in it, bad params) exits 2 with one line, via the CLI
root. ``--report OUT.json`` also writes the full report there and ``OUT.html`` beside it.
The ``validation.policy`` of params does not change this command's exit status: it is a
check; the pipeline step (``python -m components.validate``) applies the policy.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from pipelines.commands.params import OverlayOpt, ParamsOpt, SetOpt, command_params
from xct_core.errors import note_line, printable




def register(app: typer.Typer) -> None:
    """Add the ``validate`` command to the ``data`` group."""

    @app.command("validate")
    def validate(
        directory: Annotated[Path, typer.Argument(metavar="DIR", help="raw CT folder or ingest output folder")],
        report: Annotated[
            Optional[Path], typer.Option("--report", help="write the JSON report here (and OUT.html beside it)")
        ] = None,
        params: ParamsOpt = None,
        overlay: OverlayOpt = None,
        set_: SetOpt = None,
    ) -> None:
        """Validate every CT in DIR; print each failing file with its reason; exit 1 if any fails."""
        from components.validate import html_path_for, validate_dir, write_report
        from xct_core.atomic import check_writable

        if report is not None:  # before the suite runs
            check_writable(report)
            check_writable(html_path_for(report))
        rep = validate_dir(directory, command_params(params, overlay, set_))
        if report is not None:
            write_report(rep, report, html_path_for(report))
        for line in rep.failure_lines():
            typer.echo(printable(line))
        for line in rep.ignored_lines():
            print(note_line(line), file=sys.stderr)
        n, bad = len(rep.volumes), len(rep.failed)
        ign = f"; {len(rep.ignored)} other file(s) ignored" if rep.ignored else ""
        print(f"{n - bad} of {n} volumes passed validation" + (f"; {bad} failed" if bad else "") + ign, file=sys.stderr)
        raise typer.Exit(0 if rep.success else 1)
