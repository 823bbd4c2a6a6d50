"""The KFP v2 pipeline (pipelines/training.py) and `xct pipeline compile|run|submit`.

Fast: the compiled IR holds the three gate conditions (``dsl.If`` and its ``dsl.Else``);
`submit` to an unreachable host and `run` without ``--local`` fail with one line.
Slow (real kfp.local SubprocessRunner, tiny profile, in-process training): the pass path
runs every task through register; with a TEST-ONLY failing gate 1 the run still completes
(exit 0), the stage-2/3 tasks and register never run, and the ``dsl.Else`` branch records
the gate summary.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from pipeline_profile import FAILING_GATES, REPO, short_tmpdir, step_env, tiny_profile, write_params

XCT = [sys.executable, "-m", "pipelines.cli"]


def _xct(args: list[str], env: dict[str, str] | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([*XCT, *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)


def test_compile_writes_ir_with_the_gate_conditions(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "pipeline.yaml"
    code, err = _main(["pipeline", "compile", "--out", str(out)], capsys)
    assert code == 0, err
    ir = yaml.safe_load(out.read_text())
    assert ir["pipelineInfo"]["name"] == "xct-cascade"
    assert set(ir["root"]["inputDefinitions"]["parameters"]) == {
        "data_uri", "params_yaml", "ray_address", "mlflow_tracking_uri"}
    conditions = re.findall(r"condition: (.+)", out.read_text().replace("\n              ", " "))
    passed = [c for c in conditions if "passed" in c and not c.lstrip("'").startswith("!")]
    negated = [c for c in conditions if "passed" in c and c.lstrip("'").startswith("!")]
    assert len(passed) == 3 and len(negated) == 3, conditions  # dsl.If + dsl.Else per gate
    assert all("== true" in c for c in passed)
    # every executor has an image (base images from components/_kfp.py)
    images = {e["container"]["image"] for e in ir["deploymentSpec"]["executors"].values() if "container" in e}
    assert images and all(images)


def _main(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    """``xct ARGS`` in this process (the CLI root's one-line error handling included)."""
    from pipelines.cli import main

    with pytest.raises(SystemExit) as exc:
        main(args)
    return int(exc.value.code or 0), capsys.readouterr().err


def test_submit_to_an_unreachable_host_is_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    code, err = _main(["pipeline", "submit", "--host", "http://127.0.0.1:9"], capsys)
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1, err
    assert "cannot reach Kubeflow Pipelines at http://127.0.0.1:9" in lines[0]


def test_run_needs_local_flag(capsys: pytest.CaptureFixture[str]) -> None:
    code, err = _main(["pipeline", "run"], capsys)
    assert code == 2 and "--local" in err and len(err.strip().splitlines()) == 1


def test_run_local_with_missing_data_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    missing = tmp_path / "no-such-raw"
    code, err = _main(["pipeline", "run", "--local", "--data", str(missing), "--root", str(tmp_path / "kfp")], capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1 and str(missing) in err


def _run_local(tmp: Path, gates: dict | None) -> tuple[subprocess.CompletedProcess, Path]:
    env = step_env(tmp)
    raw = tmp / "raw"
    subprocess.run([*XCT, "data", "synth", "--n", "6", "--size", "32", "--seed", "0", "--spacing-mm", "12.8",
                    "--out", str(raw), "--no-preview"], cwd=REPO, env=env, check=True, capture_output=True)
    params = write_params(tmp / "params.yaml", tiny_profile(gates=gates))
    root = tmp / "kfp"
    proc = _xct(["pipeline", "run", "--local", "--params", str(params), "--data", str(raw), "--root", str(root)],
                env=env, timeout=840)
    runs = [p for p in root.iterdir() if p.name.startswith("xct-cascade-")]
    assert len(runs) == 1, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc, runs[0]


@pytest.fixture
def scratch() -> Iterator[Path]:
    """A short, disposable temp dir (removed afterwards)."""
    d = short_tmpdir("xkfp")
    yield d
    shutil.rmtree(d, ignore_errors=True)


def _tasks(run: Path) -> set[str]:
    return {p.name for p in run.iterdir() if p.is_dir()}


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_kfp_local_pass_path_runs_every_task(scratch: Path) -> None:
    tmp = scratch
    proc, run = _run_local(tmp, gates=None)  # PASSING_GATES (test-only thresholds)
    assert proc.returncode == 0, proc.stderr[-3000:]
    tasks = _tasks(run)
    for name in ("ingest-component", "validate-component", "preprocess-component", "register-component"):
        assert name in tasks
    for base in ("train-stage-component", "evaluate-step-component", "gate-report-component"):
        assert {base, f"{base}-2", f"{base}-3"} <= tasks, sorted(tasks)
    assert not [t for t in tasks if t.startswith("rejected-component")]
    summary = json.loads(next(run.glob("register-component/summary/summary.json")).read_text())
    assert summary["status"] in ("promoted", "registered") and [s["passed"] for s in summary["stages"]] == [True] * 3
    assert "stage 3: gate passed" in proc.stdout


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_kfp_local_failing_gate_stops_later_tasks(scratch: Path) -> None:
    tmp = scratch
    gates = tiny_profile()["gates"]
    gates["stage1"] = FAILING_GATES["stage1"]  # TEST-ONLY threshold: gate 1 must fail
    proc, run = _run_local(tmp, gates=gates)
    assert proc.returncode == 0, proc.stderr[-3000:]  # rejected is a completed run
    tasks = _tasks(run)
    assert {"train-stage-component", "evaluate-step-component", "gate-report-component"} <= tasks
    later = [t for t in tasks if re.search(r"-component-[23]$", t) and not t.startswith("rejected")]
    assert later == [] and "register-component" not in tasks, sorted(tasks)
    rejected = [t for t in tasks if t.startswith("rejected-component")]
    assert len(rejected) == 1
    report = (run / rejected[0] / "report").read_text()
    assert "gate 1" in report and "psnr_window" in report
    gate = json.loads((run / "gate-report-component" / "gate" / "stage1.json").read_text())
    assert gate["passed"] is False
    assert "REJECTED" in proc.stdout
