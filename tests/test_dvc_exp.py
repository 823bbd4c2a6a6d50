"""DVC as its users expect (issue 22 item 6): after a committed `dvc repro`, `dvc metrics show`,
`dvc metrics diff`, `dvc plots diff`, `dvc exp run -S …` and `dvc exp show` work.

That needs dvc.lock and the metrics/plots files dvc.yaml declares (``cache: false``) to be in
git, not git-ignored (.gitignore un-ignores exactly those). The test: the TWO-stage tiny
profile (tests/pipeline_profile.py) in a temporary git + DVC copy of the repo — `dvc repro`,
`git commit` (dvc.lock and the metrics/plots files must be tracked), then `dvc exp run -S
train.steps.stage2=3` (stage 2 onward: the fewest re-runs) and the comparison commands, asserting on their JSON: the experiment's
changed param and a metric, the old/new values of the diff, both revisions in the plots.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from pipeline_profile import copy_repo, short_tmpdir, step_env, tiny_profile, write_params

DVC = str(Path(sys.executable).parent / "dvc")
XCT = [sys.executable, "-m", "pipelines.cli"]
GIT_ID = {"GIT_AUTHOR_NAME": "xct test", "GIT_AUTHOR_EMAIL": "test@example.invalid",
          "GIT_COMMITTER_NAME": "xct test", "GIT_COMMITTER_EMAIL": "test@example.invalid"}


@pytest.fixture
def scratch() -> Iterator[Path]:
    d = short_tmpdir("xexp")
    yield d
    shutil.rmtree(d, ignore_errors=True)


def _run(cmd: list[str], repo: Path, env: dict[str, str]) -> str:
    proc = subprocess.run(cmd, cwd=repo, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, f"{' '.join(cmd)}: {(proc.stdout + proc.stderr)[-3000:]}"
    return proc.stdout


def _flat(tree: dict, prefix: str = "") -> dict[str, object]:
    out: dict[str, object] = {}
    for k, v in tree.items():
        if isinstance(v, dict):
            out |= _flat(v, f"{prefix}{k}.")
        else:
            out[f"{prefix}{k}"] = v
    return out


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_metrics_plots_and_experiments_after_a_committed_repro(scratch: Path) -> None:
    repo = copy_repo(scratch / "repo")
    env = {**step_env(scratch, repo), **GIT_ID}
    write_params(repo / "params.yaml", tiny_profile(n_stages=2))
    _run([*XCT, "pipeline", "dvc-sync"], repo, env)
    _run([DVC, "repro"], repo, env)
    _run(["git", "add", "-A"], repo, env)
    _run(["git", "commit", "-q", "-m", "baseline run"], repo, env)
    check_committed_run(repo, env)
    # an experiment: stage 2 trains 3 steps instead of 2 (stage 2 onward re-runs: the fewest steps)
    _run([DVC, "exp", "run", "-S", "train.steps.stage2=3"], repo, env)
    check_experiment(repo, env, scratch / "plots")


def check_committed_run(repo: Path, env: dict[str, str]) -> None:
    """dvc.lock and the declared metrics/plots files are in git, DVC-cached outputs are not,
    and `dvc metrics show` reads the committed metrics."""
    tracked = set(_run(["git", "ls-files"], repo, env).split())
    declared = ["outputs/train/metrics/stage1.json", "outputs/train/plots/stage1/train.csv",
                "reports/eval/stage1/metrics.json", "reports/eval/stage1/per_patient.csv",
                "reports/gates/stage1.json", "reports/summary.json", "dvc.lock"]
    assert set(declared) <= tracked, sorted(set(declared) - tracked)
    cached = [f for f in tracked if f.startswith(("outputs/train/models/", "outputs/train/checkpoints/", "data/"))
              and not f.endswith((".gitignore", "README.md"))]
    assert not cached, f"DVC-cached outputs must not be in git: {cached[:5]}"
    assert _run(["git", "status", "--porcelain"], repo, env).strip() == ""

    shown = json.loads(_run([DVC, "metrics", "show", "--json"], repo, env))
    files = next(iter(shown.values()))["data"]
    assert files["outputs/train/metrics/stage2.json"]["data"]["step"] == 2
    assert "psnr_window_db" in files["reports/eval/stage2/metrics.json"]["data"]
    assert files["reports/gates/stage2.json"]["data"]["passed"] is True


def check_experiment(repo: Path, env: dict[str, str], plots_out: Path) -> None:
    """After `dvc exp run -S train.steps.stage2=3`: the experiment in `dvc exp show` (its param
    and metric beside the committed run's), `dvc metrics diff` / `dvc params diff` old → new,
    `dvc plots diff` with both revisions of the stage-2 curves."""
    exps = json.loads(_run([DVC, "exp", "show", "--json"], repo, env))
    head = next(c for c in exps if c.get("rev") != "workspace")
    head_data = head["data"]
    assert _flat(head_data["params"]["params.yaml"]["data"])["train.steps.stage2"] == 2
    assert head_data["metrics"]["outputs/train/metrics/stage2.json"]["data"]["step"] == 2
    rows = [e for c in exps for e in (c.get("experiments") or [])]
    assert len(rows) == 1, exps
    exp = rows[0]["revs"][0]["data"]
    assert _flat(exp["params"]["params.yaml"]["data"])["train.steps.stage2"] == 3
    assert exp["metrics"]["outputs/train/metrics/stage2.json"]["data"]["step"] == 3

    # the workspace holds the experiment's results: diff against the committed run
    diff = json.loads(_run([DVC, "metrics", "diff", "--json"], repo, env))
    step = diff["outputs/train/metrics/stage2.json"]["step"]
    assert (step["old"], step["new"], step["diff"]) == (2, 3, 1)
    assert "psnr_window_db" in diff.get("reports/eval/stage2/metrics.json", {}), sorted(diff)
    assert "outputs/train/metrics/stage1.json" not in diff  # stage 1 did not re-run
    pdiff = json.loads(_run([DVC, "params", "diff", "--json"], repo, env))
    assert {k: pdiff["params.yaml"]["train.steps.stage2"][k] for k in ("old", "new")} == {"old": 2, "new": 3}

    plots = json.loads(_run([DVC, "plots", "diff", "--json"], repo, env))["data"]
    curve = plots["outputs/train/plots/stage2/train.csv"][0]
    assert {"workspace", "HEAD"} <= set(curve["revisions"]), curve["revisions"]
    values = curve["content"]["data"]["values"]
    last = {rev: max(int(v["step"]) for v in values if v["rev"] == rev) for rev in ("workspace", "HEAD")}
    assert last == {"workspace": 3, "HEAD": 2}, last  # the experiment's curve is one step longer
    assert "reports/eval/stage2/per_patient.csv" in plots
    _run([DVC, "plots", "diff", "-o", str(plots_out)], repo, env)  # the HTML report users open
    assert "vega" in (plots_out / "index.html").read_text()
