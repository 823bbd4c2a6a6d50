"""The repo modules a pipeline step can run: the transitive closure of its entry modules'
imports (module-level AND function-level, found statically with ``ast``), restricted to the
project's own packages. tests/test_dvc_pipeline.py checks dvc.yaml's deps against it."""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("xct_core", "components")


def module_file(module: str) -> Path | None:
    base = REPO / module.replace(".", "/")
    for p in (base.with_suffix(".py"), base / "__init__.py"):
        if p.is_file():
            return p
    return None


def imported_modules(path: Path, module: str) -> set[str]:
    """Every module named by an import statement anywhere in ``path`` (``from a import b``
    yields ``a`` and ``a.b``: b may be a submodule)."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[: len(parts) - node.level + 1])
                name = f"{base}.{node.module}" if node.module else base
            else:
                name = node.module or ""
            out.add(name)
            out.update(f"{name}.{a.name}" for a in node.names)
    return {m for m in out if m.split(".")[0] in PACKAGES}


def closure(entries: list[str]) -> set[str]:
    """Repo-relative files of ``entries`` and everything they import, transitively."""
    seen: dict[str, Path] = {}
    todo = list(entries)
    while todo:
        mod = todo.pop()
        if mod in seen:
            continue
        path = module_file(mod)
        if path is None:
            continue
        seen[mod] = path
        parts = mod.split(".")
        todo.extend(".".join(parts[:i]) for i in range(1, len(parts)))  # parent packages run first
        todo.extend(imported_modules(path, mod))
    return {p.relative_to(REPO).as_posix() for p in seen.values()}
