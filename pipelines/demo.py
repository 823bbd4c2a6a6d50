"""`make demo` (``python -m pipelines.demo``): the whole pipeline on a laptop, end to end.

What it does, from a fresh clone (``make demo`` installs first):

1. makes sure the repo is a DVC project (``dvc init`` when ``.dvc/`` is missing);
2. ``dvc repro`` with the demo profile in params.yaml — the ``synth`` stage writes the
   deterministic procedural phantoms to ``data/raw`` (``data.synth``), then ingest →
   validate → preprocess → the gated cascade stages (params ``stages``) → register (see
   dvc.yaml; a dvc.yaml whose per-stage blocks disagree with params.yaml stops the demo
   before anything runs: `xct pipeline dvc-sync` writes them);
3. prints the end-of-run summary (``reports/summary.json``: per-stage gate checks, the
   verdict, where the model and the MLflow UI are) and the wall time.

Exit 0 when the pipeline completed — promoted or rejected at a gate; non-zero when a step
failed (its error is above the summary). A second ``make demo`` is a no-op re-run.
Environment: the venv's ``bin`` is put first on PATH so the steps (``python``, ``xct``,
``dvc``) run in this interpreter's environment.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SUMMARY = Path("reports/summary.json")

#: quiet, offline-friendly defaults for every step (the Makefile exports them too)
DEMO_ENV = {
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "GX_ANALYTICS_ENABLED": "false",
    "RAY_AUTH_MODE": "token",  # Ray token auth (a local cluster makes ~/.ray/auth_token once)
    "DO_NOT_TRACK": "1",
    "DVC_NO_ANALYTICS": "1",
}


def step_env(base: dict[str, str] | None = None) -> dict[str, str]:
    """``base`` (default: os.environ) with this interpreter's bin dir first on PATH."""
    env = dict(os.environ if base is None else base)
    for k, v in DEMO_ENV.items():
        env.setdefault(k, v)
    bindir = str(Path(sys.executable).parent)
    env["PATH"] = bindir + os.pathsep + env.get("PATH", "")
    return env


def _dvc(env: dict[str, str]) -> list[str]:
    exe = Path(sys.executable).parent / "dvc"
    return [str(exe)] if exe.exists() else [shutil.which("dvc", path=env["PATH"]) or "dvc"]


def ensure_dvc_project(repo: Path, env: dict[str, str]) -> None:
    """``dvc init`` (``--no-scm`` outside git) when the checkout has no ``.dvc/``."""
    if (repo / ".dvc").is_dir():
        return
    args = [*_dvc(env), "init", "-q"]
    if not (repo / ".git").exists():
        args.append("--no-scm")
    subprocess.run(args, cwd=repo, env=env, check=True)


def dvc_yaml_out_of_date(repo: Path) -> str | None:
    """Why dvc.yaml's per-stage blocks disagree with ``repo``'s params.yaml, or ``None``."""
    from pipelines.dvc_dag import sync_dvc_yaml
    from xct_core.config import load_params

    from xct_core.errors import XctError

    try:
        params = load_params(repo / "params.yaml")
        res = sync_dvc_yaml(repo / "dvc.yaml", params, check=True)
    except XctError as e:  # a broken params.yaml / dvc.yaml: one line, as the CLI says it
        return str(e)
    if not (res.changed or res.overlays):
        return None
    return (f"{repo / 'dvc.yaml'} does not match the {params.n_stages} stages of params.yaml: "
            "run `xct pipeline dvc-sync` first")


def run_demo(repo: Path = REPO, force: bool = False) -> int:
    """Run the demo in ``repo``; returns the exit code."""
    from components.pipeline_verdict import format_summary, read_summary

    env = step_env()
    t0 = time.perf_counter()
    ensure_dvc_project(repo, env)
    stale = dvc_yaml_out_of_date(repo)
    if stale:
        print(f"demo: {stale}", file=sys.stderr)
        return 2
    cmd = [*_dvc(env), "repro", *(["--force"] if force else [])]
    print("+ dvc " + " ".join(cmd[1:]), flush=True)
    rc = subprocess.run(cmd, cwd=repo, env=env).returncode
    dt = time.perf_counter() - t0
    if rc != 0:
        print(f"demo: `dvc repro` failed (exit {rc}) after {dt:.0f} s; the failing step's error is above",
              file=sys.stderr)
        return rc
    summary = repo / SUMMARY
    if not summary.is_file():
        print(f"demo: {SUMMARY} was not written", file=sys.stderr)
        return 1
    print()
    print(format_summary(read_summary(summary)))
    print(f"\ndemo finished in {dt / 60:.1f} min (dvc repro; `dvc metrics show`, `dvc plots show` for details)")
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m pipelines.demo", description=__doc__.splitlines()[0])
    ap.add_argument("--force", action="store_true", help="re-run every stage (dvc repro --force)")
    args = ap.parse_args(argv)
    return run_demo(REPO, force=args.force)


if __name__ == "__main__":
    sys.exit(main())
