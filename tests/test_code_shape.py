"""Code shape (issue 20): no function in xct_core is longer than MAX_LINES lines.

An AST scan of every module under xct_core/ (functions and methods, nested ones too),
measured from the ``def`` line (decorators excluded) to the last line of the body, docstring
included. Nothing is allow-listed: a long function is split, not excused."""

from __future__ import annotations

import ast
from pathlib import Path

MAX_LINES = 150
REPO = Path(__file__).resolve().parents[1]


def long_functions(root: Path, limit: int) -> list[str]:
    """``path:line name (N lines)`` for every function under ``root`` longer than ``limit``."""
    found = []
    for path in sorted(root.rglob("*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        for node in ast.walk(tree):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                n = node.end_lineno - node.lineno + 1
                if n > limit:
                    found.append(f"{path.relative_to(root.parent)}:{node.lineno} {node.name} ({n} lines)")
    return found


def test_no_function_in_xct_core_exceeds_the_limit() -> None:
    too_long = long_functions(REPO / "xct_core", MAX_LINES)
    assert not too_long, f"functions over {MAX_LINES} lines (split them):\n" + "\n".join(too_long)


def test_the_scan_finds_a_long_function(tmp_path: Path) -> None:
    """The scan itself can fail: a 151-line function (a method, nested in a class) is reported,
    a 150-line one is not."""
    pkg = tmp_path / "pkg"
    pkg.mkdir()
    body = lambda n: "".join(f"        x{i} = {i}\n" for i in range(n - 1))  # noqa: E731
    (pkg / "m.py").write_text(
        "class C:\n    def long(self):\n" + body(151) + "\n    def ok(self):\n" + body(150), encoding="utf-8"
    )
    assert long_functions(pkg, MAX_LINES) == ["pkg/m.py:2 long (151 lines)"]
