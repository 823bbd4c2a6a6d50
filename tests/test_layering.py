"""xct_core must stay free of orchestration engines (it runs on a bare torch box)."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

FORBIDDEN = {"mlflow", "ray", "kfp", "great_expectations", "boto3", "botocore", "dvc", "optuna", "components", "pipelines"}


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(a.name.split(".")[0] for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module.split(".")[0])
    return names


def test_xct_core_source_imports_no_orchestration(repo_root: Path) -> None:
    files = sorted((repo_root / "xct_core").rglob("*.py"))
    assert files, "xct_core has no modules"
    offenders = {str(f.relative_to(repo_root)): sorted(_imports(f) & FORBIDDEN) for f in files}
    offenders = {k: v for k, v in offenders.items() if v}
    assert not offenders, f"xct_core imports orchestration packages: {offenders}"


def test_importing_every_xct_core_module_loads_no_orchestration(repo_root: Path) -> None:
    """Also catches indirect imports (a helper library that pulls mlflow in)."""
    mods = [
        "xct_core." + ".".join(f.relative_to(repo_root / "xct_core").with_suffix("").parts)
        for f in sorted((repo_root / "xct_core").rglob("*.py"))
    ]
    mods = [m.removesuffix(".__init__") for m in mods]
    code = (
        "import importlib, sys\n"
        f"for m in {mods!r}: importlib.import_module(m)\n"
        f"bad = sorted(n for n in sys.modules if n.split('.')[0] in {sorted(FORBIDDEN)!r})\n"
        "print(','.join(bad))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=repo_root, check=True)
    assert out.stdout.strip() == "", f"importing xct_core pulled in: {out.stdout.strip()}"
