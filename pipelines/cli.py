"""The `xct` command line.

Every sub-command group lives in its own module under ``pipelines/commands`` and is
registered here. User errors (:class:`xct_core.errors.XctError`, bad CLI usage) print one
line on stderr and exit non-zero; only genuine bugs produce a traceback. Ctrl-C (SIGINT)
prints ``xct: interrupted`` and exits 130; every output is written atomically, so an
interrupted command leaves no partial file.
"""

from __future__ import annotations

import errno
import sys

import typer

from xct_core.errors import XctError, error_line, in_chain
from xct_core.redact import redacted_excepthook, redacted_output

app = typer.Typer(
    name="xct",
    help="Biplanar X-ray → 3D CT: data, physics (DRR), training, pipeline and models.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)


def _register() -> None:
    from pipelines.commands import ct, data, drr, hpo, models, params, pipeline, reconstruct, step, train

    app.add_typer(data.app, name="data", help="Data sets: synthesise phantoms, validate, transfer.")
    app.add_typer(ct.app, name="ct", help="Inspect and convert CT volumes (NIfTI, DICOM).")
    app.add_typer(params.app, name="params", help="Show and check the typed parameters.")
    for module in (drr, train, hpo, models, pipeline, reconstruct, step):
        module.register(app)


_register()


def _fail(msg: str, code: int) -> None:
    print(error_line(msg), file=sys.stderr)  # control characters escaped: always ONE line
    sys.exit(code)


def _interrupt() -> None:
    print("xct: interrupted", file=sys.stderr)
    sys.exit(130)


def main(argv: list[str] | None = None) -> None:
    """Console entry point (``xct``).

    Typer runs in standalone mode (usage errors print usage and exit 2); errors raised by
    xct for bad input are caught here and shown as one line. Typer turns Ctrl-C into a
    silent ``exit 130``; it is told here: ``xct: interrupted``, exit 130.

    No secret reaches the terminal: for the whole run stdout/stderr and every log record are
    redacted (:func:`xct_core.redact.redacted_output`: URL passwords, credential query
    parameters, the values of secret environment variables), and error lines are made
    printable (a file name cannot forge a second line nor send escape sequences).
    """
    sys.excepthook = redacted_excepthook  # a bug's traceback (printed after main) is redacted too
    with redacted_output():
        _main(argv)


def _main(argv: list[str] | None) -> None:
    try:
        app(args=argv, prog_name="xct")
    except XctError as e:
        _fail(str(e), e.exit_code)
    except OSError as e:
        if e.errno != errno.ENAMETOOLONG:
            raise
        # a path the user typed beyond NAME_MAX/PATH_MAX, met wherever it is first stat'ed (outputs
        # are checked before anything is written: xct_core.atomic.check_path_limits)
        name = str(e.filename or "")
        _fail(f"{name[:60]}{'…' if len(name) > 60 else ''}: {e.strerror} (a name beyond NAME_MAX or a path beyond PATH_MAX)", 2)
    except KeyboardInterrupt:
        _interrupt()
    except SystemExit as e:
        if e.code == 130 and in_chain(e, KeyboardInterrupt) is not None:
            _interrupt()
        raise


if __name__ == "__main__":
    main()
