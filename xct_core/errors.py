"""User-facing errors.

Anything a user can cause (a bad file, a bad parameter) raises a subclass of
:class:`XctError`; the CLI prints its message on one line and exits non-zero, without a
traceback. Programming errors stay ordinary exceptions.
"""

from __future__ import annotations

from pathlib import Path
from typing import TypeVar

from xct_core.redact import redact

_E = TypeVar("_E", bound=BaseException)


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


#: bidirectional overrides/isolates: they reorder what a terminal shows (Trojan-source style)
_BIDI = frozenset(map(chr, [*range(0x202A, 0x202F), *range(0x2066, 0x206A)]))


def printable(text: str) -> str:
    """``text`` safe to print as ONE terminal line: control characters (newline, carriage
    return, ESC/OSC sequences, DEL, C1), Unicode line/paragraph separators and bidi overrides
    are shown escaped (``\\n``, ``\\x1b``, ``\\u2028``), and the undecodable bytes of a
    non-UTF-8 file name (surrogate escapes) as ``\\xNN`` — so a file name holding a newline
    cannot forge a second ``xct: error:`` line, nor an escape sequence retitle the terminal.
    Tabs are kept."""
    import unicodedata

    out = []
    for ch in text:
        o = ord(ch)
        if ch == "\t":
            out.append(ch)
        elif 0xDC80 <= o <= 0xDCFF:  # os.fsdecode's surrogateescape of a raw byte
            out.append(f"\\x{o - 0xDC00:02x}")
        elif ch in _BIDI or unicodedata.category(ch) in ("Cc", "Cs", "Zl", "Zp"):
            out.append(ch.encode("unicode_escape").decode("ascii") if o < 0xD800 or o > 0xDFFF else f"\\u{o:04x}")
        else:
            out.append(ch)
    return "".join(out)


def error_line(msg: str, prog: str = "xct") -> str:
    """The one line a CLI prints for a user error: ``<prog>: error: <msg>``, with credentials
    masked (:func:`xct_core.redact.redact`) and made printable."""
    return f"{prog}: error: {printable(redact(msg))}"


def warning_line(msg: str, prog: str = "xct") -> str:
    """The one line a CLI prints for a warning: ``<prog>: warning: <msg>``, redacted and
    printable like :func:`error_line`."""
    return f"{prog}: warning: {printable(redact(msg))}"


def note_line(msg: str, prog: str = "xct") -> str:
    """``<prog>: note: <msg>``, redacted and printable like :func:`error_line`."""
    return f"{prog}: note: {printable(redact(msg))}"


def in_chain(e: BaseException, kind: type[_E]) -> _E | None:
    """The first exception of type ``kind`` in ``e``'s cause/context chain (``e`` included),
    or None; cycles in the chain are followed once."""
    seen: set[int] = set()
    x: BaseException | None = e
    while x is not None and id(x) not in seen:
        if isinstance(x, kind):
            return x
        seen.add(id(x))
        x = x.__cause__ or x.__context__
    return None
