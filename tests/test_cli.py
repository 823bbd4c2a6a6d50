"""The `xct` console command: groups listed, user errors are one line without a traceback."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

XCT = [sys.executable, "-m", "pipelines.cli"]


def run(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(XCT + args, capture_output=True, text=True, cwd=cwd, timeout=120)


def test_help_lists_groups(repo_root: Path) -> None:
    out = run(["--help"], repo_root)
    assert out.returncode == 0
    for group in ("data", "ct", "params", "drr"):
        assert group in out.stdout


def test_console_script_installed(repo_root: Path) -> None:
    exe = Path(sys.executable).parent / "xct"
    if not exe.exists():
        pytest.skip("console script not installed in this environment")
    out = subprocess.run([str(exe), "--help"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "params" in out.stdout


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
