"""The stage count comes from params alone (issue 20 item 3).

A two-stage (8³ → 16³) and a four-stage (8³ → 16³ → 32³ → 64³) tiny profile
(tests/pipeline_profile.py) with no code or DAG file edited by hand:

- fast: each compiles to a KFP DAG with one train → evaluate → gate per stage, nested under
  the previous gate's ``dsl.If`` (a ``dsl.Else`` per gate), every gate after the first
  growing the previous gate's ``reports`` artifact, and register taking the last stage's
  model and the last gate's reports — one input each, whatever the count;
- slow: the two-stage DAG runs under ``kfp.local`` (the pass path: every task through
  register, the exit task's run summary SUCCEEDED) and under ``dvc repro`` (dvc.yaml's
  per-stage blocks written by ``xct pipeline dvc-sync``: one stage FEWER than the repo's),
  every gate passes (test-only thresholds) and register registers a cascade of exactly that
  many stages (its ``xct.stages`` / ``xct.gates`` tags). The same DVC run then goes on: no-op,
  committed + an experiment (``dvc exp run``/``show``, metrics/params/plots diff), a stage-1
  change, a failing last gate, a failing first gate — the suite's only ``dvc repro``. The
  four-stage DAG is compiled and checked above and written by ``dvc-sync`` in
  tests/test_dvc_pipeline.py; it is not run (suite time: its 64³ stage was the most expensive
  part of the suite's former four-stage ``dvc repro``).
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

from components import guard
from dvc_exp_checks import GIT_ID, _run, check_committed_run, check_experiment
from pipeline_profile import (
    FAILING_GATES,
    REPO,
    check_registered,
    copy_repo,
    dvc_chain,
    short_tmpdir,
    step_env,
    tiny_profile,
    write_params,
)

XCT = [sys.executable, "-m", "pipelines.cli"]
DVC = str(Path(sys.executable).parent / "dvc")
COUNTS = (2, 4)


def _names(n: int) -> list[str]:
    return [f"stage{k}" for k in range(1, n + 1)]


def _source(art: dict) -> str:
    """Where a task's input artifact comes from, as ``<producer task>-<output>`` (a task in the
    same group names it directly; inside a ``dsl.If`` group it arrives as a pipeline channel)."""
    if "taskOutputArtifact" in art:
        return f"{art['taskOutputArtifact']['producerTask']}-{art['taskOutputArtifact']['outputArtifactKey']}"
    return art["componentInputArtifact"].removeprefix("pipelinechannel--")


def _suffix(k: int) -> str:
    """KFP's task/component name suffix of the k-th instance of a component."""
    return "" if k == 1 else f"-{k}"


# --------------------------------------------------------------------------- compile (fast)


@pytest.mark.parametrize("n", COUNTS)
def test_the_kfp_dag_walks_the_stages_of_the_params(n: int, tmp_path: Path) -> None:
    from components.ops_params import OpsParams
    from pipelines.kfp_dag import compile_pipeline, load_pipeline_spec
    from xct_core.config import params_from_dict

    out = compile_pipeline(tmp_path / "p.yaml", params_from_dict(tiny_profile(n_stages=n), "tiny", OpsParams))
    load_pipeline_spec(out)  # strict protobuf parse
    text = out.read_text()
    ir = next(yaml.safe_load_all(text))  # the PipelineSpec (a PlatformSpec follows: task resources, secrets)
    comps = ir["components"]
    for base in ("train-stage-component", "evaluate-step-component", "gate-report-component", "rejected-component"):
        have = sorted(c for c in comps if re.fullmatch(rf"comp-{base}(-\d+)?", c))
        assert have == sorted(f"comp-{base}{_suffix(k)}" for k in range(1, n + 1)), have
    assert [c for c in comps if "register" in c] == ["comp-register-component"]
    conditions = re.findall(r"condition: (.+)", text.replace("\n              ", " "))
    assert len([c for c in conditions if "passed" in c and "!" not in c]) == n
    assert len([c for c in conditions if "passed" in c and "!" in c]) == n
    # the If groups nest: gate k's condition group holds stage k+1 … and register in the last one
    groups = {c: spec["dag"]["tasks"] for c, spec in comps.items() if re.fullmatch(r"comp-condition-\d+", c)}
    inner = [g for g, tasks in groups.items() if "register-component" in tasks]
    assert len(inner) == 1
    tasks = {}
    for spec in comps.values():
        tasks.update(spec.get("dag", {}).get("tasks", {}))
    for k in range(2, n + 1):
        gate = tasks[f"gate-report-component{_suffix(k)}"]["inputs"]["artifacts"]
        assert _source(gate["earlier"]) == f"gate-report-component{_suffix(k - 1)}-reports"
        train = tasks[f"train-stage-component{_suffix(k)}"]["inputs"]["artifacts"]
        assert _source(train["previous"]) == f"train-stage-component{_suffix(k - 1)}-model"
    assert "earlier" not in tasks["gate-report-component"]["inputs"].get("artifacts", {})
    register = tasks["register-component"]["inputs"]["artifacts"]
    assert set(register) == {"model", "reports", "processed"}  # processed: the data's lineage (hash, datasets)
    assert _source(register["processed"]) == "preprocess-component-processed"
    assert _source(register["reports"]) == f"gate-report-component{_suffix(n)}-reports"
    assert _source(register["model"]) == f"train-stage-component{_suffix(n)}-model"


# --------------------------------------------------------------------------- helpers of the slow runs


@pytest.fixture(scope="module")
def scratch() -> Iterator[Path]:
    d = short_tmpdir("xstg")
    yield d
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture(scope="module")
def raw(scratch: Path) -> Path:
    """The tiny phantoms, made once for both kfp.local runs."""
    out = scratch / "raw"
    subprocess.run([*XCT, "data", "synth", "--n", "6", "--size", "32", "--seed", "0", "--spacing-mm", "12.8",
                    "--out", str(out), "--no-preview"], cwd=REPO, env=step_env(scratch), check=True,
                   capture_output=True)
    return out


# --------------------------------------------------------------------------- kfp.local (slow)


@pytest.mark.slow
@pytest.mark.timeout(900)
@pytest.mark.parametrize("n", [2])  # 4 stages: compiled and dvc-synced above, not run end to end (suite time; docs/testing.md)
def test_kfp_local_runs_and_registers_n_stages(n: int, scratch: Path, raw: Path) -> None:
    tmp = scratch / f"kfp{n}"
    tmp.mkdir()
    env = step_env(tmp)
    params = write_params(tmp / "params.yaml", tiny_profile(n_stages=n))
    root = tmp / "kfp"
    proc = subprocess.run([*XCT, "pipeline", "run", "--local", "--params", str(params), "--data", str(raw),
                           "--root", str(root)], cwd=REPO, env=env, capture_output=True, text=True, timeout=840)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    (run,) = [p for p in root.iterdir() if p.name.startswith("xct-cascade-")]
    tasks = {p.name for p in run.iterdir() if p.is_dir()}
    for base in ("train-stage-component", "evaluate-step-component", "gate-report-component"):
        assert sorted(t for t in tasks if t.startswith(base)) == sorted(f"{base}{_suffix(k)}" for k in range(1, n + 1))
    assert "register-component" in tasks and not [t for t in tasks if t.startswith("rejected")]
    # the last gate's reports hold every stage's evaluation and gate report: what register read
    last = run / f"gate-report-component{_suffix(n)}" / "reports"
    assert sorted(p.name for p in (last / "gates").iterdir()) == [f"{s}.json" for s in _names(n)]
    assert all((last / "eval" / s / "metrics.json").is_file() for s in _names(n))
    assert re.findall(r"^stage (\d+): gate passed", proc.stdout, re.M) == [str(k) for k in range(1, n + 1)]
    summary = json.loads((run / "register-component" / "summary" / "summary.json").read_text())
    check_registered(summary, n, tmp / "mlflow.db")
    run_summary = json.loads((run / "run-summary-component" / "summary" / "run_summary.json").read_text())
    assert run_summary["state"] == "SUCCEEDED" and run_summary["succeeded"] is True
    # lineage: the version names this kfp.local run and its task, and the processed data's digest
    from components.tracking import dvc_data_hash
    from pipeline_profile import _registered

    tags = _registered(tmp / "mlflow.db", summary["model_version"])
    assert tags["kfp.run_id"] == run_summary["pipeline_job_id"] and tags["kfp.run_name"] == run.name
    assert tags["kfp.task_name"] == "register-component" and tags["xct.origin"] == "kfp"
    assert tags["xct.data_hash"] == dvc_data_hash(run / "preprocess-component" / "processed")[0]


# --------------------------------------------------------------------------- dvc repro (slow)


def _repro(repo: Path, env: dict[str, str], *args: str) -> tuple[list[str], str]:
    """``dvc repro`` (or ``dvc ARGS``, e.g. ``exp run …``): the stages it ran, in order, and its log."""
    proc = subprocess.run([DVC, *(args or ("repro",))], cwd=repo, env=env, capture_output=True, text=True)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-4000:]
    return re.findall(r"Running stage '([^']+)'", log), log


@pytest.mark.slow
@pytest.mark.timeout(1200)
def test_dvc_repro_runs_and_registers_two_stages(scratch: Path) -> None:
    """ONE `dvc repro` run of the two-stage profile (one stage fewer than the repo's dvc.yaml:
    the count comes from params, the blocks from `xct pipeline dvc-sync`), then on that same
    repo, each step changing one thing and asserting exactly what re-ran:

    1. the whole chain, in topological order; register registers two stages;
    2. a second repro is a no-op (`dvc status`: up to date);
    3. committed: dvc.lock and the declared metrics/plots in git (tests/dvc_exp_checks.py);
    4. `dvc exp run -S train.steps.stage2=3`: stage 2 onward only (stage 1's model untouched),
       then `dvc exp show`, `metrics diff`, `params diff`, `plots diff` on it;
    5. a stage-1 parameter: stage 1 re-runs, and stage 2 with it (it trains on the new stage-1
       model), the data steps do not;
    6. a failing last gate: only that gate and register re-run (rejected at stage 2);
    7. a failing gate 1: every later training/evaluation is skipped with markers, the run still
       exits 0 (rejected at stage 1), and a repro after it is a no-op.

    Steps 2 and 5-7 were a separate four-, then three-stage `dvc repro` in
    tests/test_dvc_pipeline.py; one run proves the same (every stage after the first is the
    same ``foreach`` block) at a third of the cost (docs/testing.md)."""
    n = 2
    names = _names(n)
    chain = dvc_chain(names)
    root = scratch / f"dvc{n}"
    root.mkdir()
    repo = copy_repo(root / "repo")
    env = step_env(root, repo)
    params = tiny_profile(n_stages=n)
    write_params(repo / "params.yaml", params)
    sync = subprocess.run([*XCT, "pipeline", "dvc-sync"], cwd=repo, env=env, capture_output=True, text=True)
    assert sync.returncode == 0 and f"for {n} stages" in sync.stdout, sync.stdout + sync.stderr

    # 1. the whole chain
    ran, _ = _repro(repo, env)
    assert ran == chain  # topological order of the whole chain
    check_registered(json.loads((repo / "reports/summary.json").read_text()), n, root / "mlflow.db")
    for k in range(1, n + 1):
        assert (repo / f"outputs/train/models/stage{k}/final.pt").is_file()
        assert (repo / f"reports/eval/stage{k}/per_patient.csv").is_file()
    stage1_model = (repo / "outputs/train/models/stage1/final.pt").read_bytes()

    # 2. nothing changed: nothing runs
    ran, log = _repro(repo, env)
    assert ran == [], log[-2000:]
    st = subprocess.run([DVC, "status"], cwd=repo, env=env, capture_output=True, text=True, check=True).stdout
    assert "up to date" in st

    # 3. DVC as its users expect (issue 22 item 6), on this same run: commit it …
    env = {**env, **GIT_ID}
    _run(["git", "add", "-A"], repo, env)
    _run(["git", "commit", "-q", "-m", "baseline run"], repo, env)
    check_committed_run(repo, env)
    # 4. … then an experiment: stage 2 trains 3 steps instead of 2 (a stage-2 parameter)
    ran, log = _repro(repo, env, "exp", "run", "-S", "train.steps.stage2=3")
    stage2_on = chain[chain.index("train@stage2"):]
    assert ran[:2] == ["train@stage2", "evaluate@stage2"] and set(ran) <= set(stage2_on), log[-3000:]
    assert (repo / "outputs/train/models/stage1/final.pt").read_bytes() == stage1_model  # stage 1 untouched
    check_experiment(repo, env, root / "plots")
    params["train"]["steps"]["stage2"] = 3  # the workspace holds the experiment's params and results

    # 5. a stage-1 parameter: stage 1 re-runs, stage 2 after it (its input is the new stage-1 model)
    params["stages"]["stage1"]["lr"] = params["stages"]["stage1"]["lr"] * 2
    write_params(repo / "params.yaml", params)
    ran, _ = _repro(repo, env)
    stage1_on = chain[chain.index("train@stage1"):]
    assert ran[:2] == ["train@stage1", "evaluate@stage1"] and set(ran) <= set(stage1_on), ran  # no data step
    assert "train@stage2" in ran and "evaluate@stage2" in ran, ran
    assert (repo / "outputs/train/models/stage1/final.pt").read_bytes() != stage1_model

    # 6. the last gate fails (TEST-ONLY threshold): only that gate and register re-run
    params["gates"][names[-1]] = FAILING_GATES["stage1"]
    write_params(repo / "params.yaml", params)
    ran, _ = _repro(repo, env)
    assert ran == [f"gate@{names[-1]}", "register"], ran
    summary = json.loads((repo / "reports/summary.json").read_text())
    assert summary["status"] == "rejected" and summary["rejected_at_stage"] == n
    assert [s["passed"] for s in summary["stages"]] == [True] * (n - 1) + [False]

    # 7. gate 1 fails (TEST-ONLY threshold): the later stages are skipped, the run exits 0
    params["gates"]["stage1"] = FAILING_GATES["stage1"]
    write_params(repo / "params.yaml", params)
    ran, log = _repro(repo, env)  # exits 0: a rejected run is a completed run
    assert "train@stage1" not in ran and ran[0] == "gate@stage1" and ran[-1] == "register", ran
    assert "skipped" in log
    summary = json.loads((repo / "reports/summary.json").read_text())
    assert summary["status"] == "rejected" and summary["rejected_at_stage"] == 1
    assert [s["skipped"] for s in summary["stages"]] == [False] + [True] * (n - 1)
    for k in range(2, n + 1):
        models = repo / f"outputs/train/models/stage{k}"
        assert sorted(p.name for p in models.iterdir()) == [guard.MARKER_NAME]  # no training happened
        for f in (f"outputs/train/metrics/stage{k}.json", f"reports/eval/stage{k}/metrics.json",
                  f"reports/gates/stage{k}.json"):
            doc = json.loads((repo / f).read_text())
            assert doc["skipped"] is True and doc["passed"] is False, f
    ran, _ = _repro(repo, env)
    assert ran == []  # the skip markers are stable outputs: still a no-op
