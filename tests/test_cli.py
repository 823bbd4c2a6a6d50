"""The `xct` console command: groups listed, user errors are one line without a traceback."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

XCT = [sys.executable, "-m", "pipelines.cli"]


#: every command and group of the root app (docs/cli.md)
COMMANDS = {"data", "ct", "params", "drr", "train", "hpo", "pipeline", "models", "reconstruct", "evaluate", "step"}


def run(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "COLUMNS": "120"}  # a fixed width: rich wraps the help table to the terminal
    return subprocess.run(XCT + args, capture_output=True, text=True, cwd=cwd, timeout=120, env=env)


def listed_commands(help_text: str) -> set[str]:
    """The first word of each row of the help's "Commands" panel (not any word of the text:
    "ct" is inside "xct" and "data" in the app's description)."""
    names, inside = set(), False
    for line in help_text.splitlines():
        if "─ Commands " in line:
            inside = True
        elif inside and line.startswith("╰"):
            break
        elif inside and line.startswith("│ ") and line[2:3].strip():
            names.add(line[2:].split()[0])
    return names


def test_help_lists_groups(repo_root: Path) -> None:
    out = run(["--help"], repo_root)
    assert out.returncode == 0
    assert listed_commands(out.stdout) == COMMANDS
    assert listed_commands("Biplanar X-ray → 3D CT: data, ct, params") == set()  # the parser reads rows only


def test_console_script_installed(repo_root: Path) -> None:
    exe = Path(sys.executable).parent / "xct"
    if not exe.exists():
        pytest.skip("console script not installed in this environment")
    out = subprocess.run([str(exe), "--help"], capture_output=True, text=True, timeout=120,
                         env={**os.environ, "COLUMNS": "120"})
    assert out.returncode == 0 and listed_commands(out.stdout) == COMMANDS


@pytest.mark.parametrize(
    "args, needle",
    [
        (["params", "show", "--params", "missing.yaml"], "missing.yaml: params file not found"),
        (["params", "show", "--no-such-flag"], "No such option"),
        (["no-such-command"], "No such command"),
    ],
)
def test_user_errors_exit_nonzero_without_traceback(repo_root: Path, args: list[str], needle: str) -> None:
    out = run(args, repo_root)
    assert out.returncode != 0
    assert needle in out.stderr
    assert "Traceback" not in out.stderr + out.stdout


def test_params_show_prints_effective_params(repo_root: Path) -> None:
    out = run(["params", "show"], repo_root)
    assert out.returncode == 0, out.stderr
    assert "window: soft_tissue" in out.stdout and "# digest:" in out.stdout
