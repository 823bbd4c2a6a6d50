"""`xct data pull s3://bucket/prefix DIR` and `xct data push DIR s3://bucket/prefix`.

Thin wrappers over :mod:`components.s3sync` (checksummed, resumable, retried transfers).
Credentials come only from the standard boto3 chain (environment, profile, instance/pod
role). ``--endpoint-url`` (else ``$XCT_S3_ENDPOINT_URL`` / ``$AWS_ENDPOINT_URL``) selects an
S3-compatible store such as MinIO. Retries, timeouts and part sizes: ``params.yaml → s3``.

Exit status: 0 done (the summary line goes to stdout); 2 bad input (URL, folder, bucket,
credentials, a symlink inside the pull destination); 1 the transfer failed after its retries
or a checksum did not match — nothing partial is left in place and re-running resumes.
Errors are one line on stderr. Symlinks: pull refuses to write through one inside DIR; push
skips (and names) every symlink below DIR (components/s3sync.py).
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from pipelines.commands.params import OverlayOpt, ParamsOpt, SetOpt, command_params
from xct_core.errors import printable, warning_line

EndpointOpt = Annotated[
    Optional[str],
    typer.Option(
        "--endpoint-url",
        help="S3-compatible endpoint, e.g. http://minio:9000 (default: $XCT_S3_ENDPOINT_URL, $AWS_ENDPOINT_URL, AWS)",
    ),
]
QuietOpt = Annotated[bool, typer.Option("--quiet", "-q", help="no progress bar")]




def _s3(params: Path | None, overlay: list[Path] | None, sets: list[str] | None):  # noqa: ANN202 - S3Params
    """The ``s3`` section of the command's params (components/ops_params.py validates it)."""
    from components.ops_params import OpsParams

    return command_params(params, overlay, sets, schema=OpsParams).s3


def register(app: typer.Typer) -> None:
    """Add ``pull`` and ``push`` to the ``data`` group."""

    @app.command("pull")
    def pull(
        url: Annotated[str, typer.Argument(metavar="S3_URL", help="s3://bucket/prefix (a folder, or one object)")],
        directory: Annotated[Path, typer.Argument(metavar="DIR", help="destination folder (created if missing)")],
        endpoint_url: EndpointOpt = None,
        quiet: QuietOpt = False,
        params: ParamsOpt = None,
        overlay: OverlayOpt = None,
        set_: SetOpt = None,
    ) -> None:
        """Download every object below S3_URL into DIR (verified; up-to-date files are skipped)."""
        from components import s3sync

        cfg = _s3(params, overlay, set_)
        with s3sync.tqdm_progress("pull") as bar:
            report = s3sync.pull(url, directory, cfg, endpoint_url=endpoint_url, progress=None if quiet else bar)
        typer.echo(printable(report.summary()))

    @app.command("push")
    def push(
        directory: Annotated[Path, typer.Argument(metavar="DIR", help="folder to upload (recursively)")],
        url: Annotated[str, typer.Argument(metavar="S3_URL", help="s3://bucket/prefix")],
        endpoint_url: EndpointOpt = None,
        quiet: QuietOpt = False,
        params: ParamsOpt = None,
        overlay: OverlayOpt = None,
        set_: SetOpt = None,
    ) -> None:
        """Upload every file below DIR to S3_URL with its SHA-256 (objects already up to date are skipped)."""
        from components import s3sync

        cfg = _s3(params, overlay, set_)
        with s3sync.tqdm_progress("push") as bar:
            report = s3sync.push(directory, url, cfg, endpoint_url=endpoint_url, progress=None if quiet else bar)
        for rel in report.symlinks_skipped:
            typer.echo(warning_line(f"{directory / rel}: symlink skipped (push does not follow symlinks)"), err=True)
        typer.echo(printable(report.summary()))
