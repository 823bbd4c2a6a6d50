"""The DVC pipeline (dvc.yaml) and its skip-after-failed-gate guard (components/guard.py).

Fast checks: the DAG chain (`dvc dag`), the `foreach` cascade against params.yaml, that every
step depends on the code it runs (its import closure) and lists only params keys that exist
and only its own stage's keys, and the guard's pass / skip / error behaviour.
The `dvc repro` runs (no-op, partial re-runs, failing gates, an experiment) are ONE run of the
two-stage tiny profile: tests/test_stage_count.py::test_dvc_repro_runs_and_registers_two_stages.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from typing import Any
from pathlib import Path

import pytest
import yaml

from components import guard
from pipeline_profile import REPO, dvc_chain
from xct_core.config import Params, TrainParams

DVC = str(Path(sys.executable).parent / "dvc")


#: the repo's chain (params.yaml's stages)
REPO_STAGES = list(yaml.safe_load((REPO / "params.yaml").read_text())["stages"])
CHAIN = dvc_chain(REPO_STAGES)
STAGE_OF = {s: int(m.group(1)) for s in CHAIN if (m := re.search(r"stage(\d+)$", s))}

#: what each DVC stage runs: the command it must start with, the shell module of that command
#: (listed, not followed) and the entry modules whose import closure it must depend on
ENTRIES: dict[str, tuple[str, str, list[str]]] = {
    "synth": ("xct data synth", "pipelines/commands/data.py", ["xct_core.phantoms"]),
    "ingest": ("xct step ingest", "pipelines/commands/step.py", ["components.ingest"]),
    "validate": ("xct step validate", "pipelines/commands/step.py", ["components.validate"]),
    "preprocess": ("xct step preprocess", "pipelines/commands/step.py", ["components.preprocess"]),
    "train": ("xct train", "pipelines/commands/train.py", ["components.train", "components.guard"]),
    "evaluate": ("xct step evaluate", "pipelines/commands/step.py", ["components.evaluate", "components.guard"]),
    "gate": ("xct step gate", "pipelines/commands/step.py", ["components.gate", "components.guard"]),
    "register": ("xct step register", "pipelines/commands/step.py", ["components.register"]),
}
#: what register ships with the model besides what it imports (MLflow "models from code")
REGISTER_SHIPS = ["components/xct_pyfunc.py", "xct_core"]


@pytest.fixture(scope="module")
def dvc_stages() -> dict[str, Any]:
    """dvc.yaml as DVC resolves it (``foreach`` expanded): name → stage."""
    from dvc.repo import Repo

    return {st.name: st for st in Repo(str(REPO)).index.stages}


def _params_of(stage: Any) -> list[str]:
    return [k for p in stage.params for k in p.params]


def _param_files_of(stage: Any) -> list[str]:
    """Params files a stage depends on as a whole (``- hpo/best_stage1.yaml:``)."""
    return [str(p.def_path) for p in stage.params if not p.params]


def _deps_of(stage: Any) -> list[str]:
    from dvc.dependency.param import ParamsDependency

    return [str(d.def_path) for d in stage.deps if not isinstance(d, ParamsDependency)]


# --------------------------------------------------------------------------- DAG shape


def test_dvc_dag_is_the_gated_chain() -> None:
    out = subprocess.run([DVC, "dag", "--mermaid"], cwd=REPO, capture_output=True, text=True, check=True).stdout
    names = dict(re.findall(r'(node\d+)\["([^"]+)"\]', out))
    edges = {(names[a], names[b]) for a, b in re.findall(r"(node\d+)-->(node\d+)", out)}
    assert set(names.values()) == set(CHAIN)
    for a, b in zip(CHAIN, CHAIN[1:]):
        assert (a, b) in edges, f"missing edge {a} -> {b}"
    # every later step waits for the previous stage's gate
    for k in range(2, len(REPO_STAGES) + 1):
        for step in (f"train@stage{k}", f"evaluate@stage{k}", f"gate@stage{k}"):
            assert (f"gate@stage{k - 1}", step) in edges, step


def test_cascade_vars_match_the_params_stages() -> None:
    """dvc.yaml's per-stage blocks are what `xct pipeline dvc-sync` writes from params.yaml."""
    from pipelines.dvc_dag import sync_dvc_yaml
    from xct_core.config import load_params

    res = sync_dvc_yaml(REPO / "dvc.yaml", load_params(REPO / "params.yaml"), check=True)
    assert not res.changed and not res.overlays, "dvc.yaml is out of date with params.yaml: run `xct pipeline dvc-sync`"
    cascade = _dvc_yaml()["vars"][0]["cascade"]
    assert list(cascade) == list(Params().stages) == REPO_STAGES
    for name, item in cascade.items():
        k = item["k"]
        assert name == f"stage{k}"
        if k > 1:
            assert item["after_models"] == f"outputs/train/models/stage{k - 1}"
            assert item["after_gate"] == f"reports/gates/stage{k - 1}.json"
    grids = [k for p in _dvc_yaml()["stages"]["preprocess"]["params"] if isinstance(p, str)
             for k in [p] if k.startswith("stages.")]
    assert grids == [f"stages.{n}.{key}" for n in REPO_STAGES for key in ("size", "fov_mm")]


def test_dvc_sync_writes_the_blocks_for_any_stage_count(tmp_path: Path) -> None:
    """Two and four stages: the cascade chain, the grid keys and the missing hpo overlays;
    a second sync changes nothing; --check on a stale file is one line, exit 2."""
    from cli_run import xct
    from pipeline_profile import tiny_profile
    from pipelines.dvc_dag import sync_dvc_yaml
    from xct_core.config import params_from_dict

    (tmp_path / "hpo").mkdir()
    shutil.copy(REPO / "dvc.yaml", tmp_path / "dvc.yaml")
    (tmp_path / "hpo" / "best_stage1.yaml").write_text("stages: {stage1: {lr: 0.002}}\n")
    made = {}
    for n in (4, 2):
        res = sync_dvc_yaml(tmp_path / "dvc.yaml", params_from_dict(tiny_profile(n_stages=n)))
        assert res.changed
        made[n] = sorted(p.name for p in res.overlays)
        doc = yaml.safe_load((tmp_path / "dvc.yaml").read_text())
        names = [f"stage{k}" for k in range(1, n + 1)]
        assert list(doc["vars"][0]["cascade"]) == names
        assert doc["vars"][0]["cascade"][names[-1]] == {
            "k": n, "after_models": f"outputs/train/models/stage{n - 1}", "after_gate": f"reports/gates/stage{n - 1}.json"}
        assert [p for p in doc["stages"]["preprocess"]["params"] if str(p).startswith("stages.")] == [
            f"stages.{s}.{key}" for s in names for key in ("size", "fov_mm")]
        assert not sync_dvc_yaml(tmp_path / "dvc.yaml", params_from_dict(tiny_profile(n_stages=n))).changed
    assert made == {4: ["best_stage2.yaml", "best_stage3.yaml", "best_stage4.yaml"], 2: []}
    assert (tmp_path / "hpo" / "best_stage1.yaml").read_text() == "stages: {stage1: {lr: 0.002}}\n"  # never overwritten
    assert yaml.safe_load((tmp_path / "hpo" / "best_stage4.yaml").read_text()) == {}
    # the file still holds the two-stage blocks: --check against the repo's three stages fails
    rc = xct(["pipeline", "dvc-sync", "--check", "--dvc-yaml", str(tmp_path / "dvc.yaml"),
              "--params", str(REPO / "params.yaml")])
    assert rc == 2


def _dvc_yaml() -> dict:
    return yaml.safe_load((REPO / "dvc.yaml").read_text())


def test_every_step_depends_on_the_code_it_runs(dvc_stages: dict[str, Any]) -> None:
    """Each step's deps cover the repo modules its command can run (the transitive import
    closure of its entry modules, function-level imports included): change one and `dvc
    repro` re-runs the step. Package ``__init__`` files (markers + the version) are exempt."""
    from import_closure import closure

    assert set(dvc_stages) == set(CHAIN)
    for name, st in dvc_stages.items():
        cmd_prefix, shell, entries = ENTRIES[name.split("@")[0]]
        assert st.cmd.startswith(cmd_prefix), (name, st.cmd)
        deps = _deps_of(st)
        need = {f for f in closure(entries) if not f.endswith("__init__.py")} | {shell}
        if name == "register":
            need |= set(REGISTER_SHIPS)
        covered = {f for f in need for d in deps if f == d or f.startswith(d.rstrip("/") + "/")}
        assert need <= covered, f"{name}: dvc.yaml deps miss {sorted(need - covered)}"


def test_stage_params_exist_and_are_scoped(dvc_stages: dict[str, Any]) -> None:
    """Each params key exists in the typed config, a stage-K step names no other stage's
    keys (so a stage-2 change re-runs stage 2 onward only), and training tracks every
    training knob it reads."""
    from components.ops_params import OpsParams

    tree = OpsParams().model_dump(mode="json")  # the whole file: train.ray and pipeline.train too
    for name, st in dvc_stages.items():
        for key in _params_of(st):
            node = tree
            for part in key.split("."):
                assert isinstance(node, dict) and part in node, f"{name}: params key {key} not in the params schema"
                node = node[part]
            k = STAGE_OF.get(name)
            if k is not None:
                other = re.findall(r"stage(\d+)", key)
                assert all(int(j) == k for j in other), f"{name} depends on {key}"
    train_keys = set(TrainParams.model_fields) - {"steps", "out_dir"}
    for k in range(1, len(REPO_STAGES) + 1):
        listed = {p.split(".", 1)[1] for p in _params_of(dvc_stages[f"train@stage{k}"]) if p.startswith("train.")}
        assert train_keys <= listed, f"train@stage{k} misses {sorted(train_keys - listed)}"
        assert f"steps.stage{k}" in listed
    # data steps never depend on training / gate params
    for name in ("synth", "ingest", "validate", "preprocess"):
        assert not [p for p in _params_of(dvc_stages[name]) if p.split(".")[0] in ("train", "gates", "registry")]
    # the tuned overlays (`xct hpo`): each is a whole-file param of its own stage's training and
    # evaluation only, exists, and is one of params.yaml's `overlays` (so commands apply it too)
    overlays = yaml.safe_load((REPO / "params.yaml").read_text()).get("overlays", [])
    for name, st in dvc_stages.items():
        for f in _param_files_of(st):
            assert STAGE_OF.get(name) is not None and f == f"hpo/best_stage{STAGE_OF[name]}.yaml", f"{name}: {f}"
            assert f in overlays and (REPO / f).is_file(), f
    for k in range(1, len(REPO_STAGES) + 1):
        for name in (f"train@stage{k}", f"evaluate@stage{k}"):
            assert _param_files_of(dvc_stages[name]) == [f"hpo/best_stage{k}.yaml"], name


# --------------------------------------------------------------------------- guard


def _gate(path: Path, passed: bool, summary: str = "") -> Path:
    path.write_text(json.dumps({"stage": 1, "passed": passed, "summary": summary, "checks": []}))
    return path


def test_guard_lets_the_step_run_when_the_gate_passed(tmp_path: Path) -> None:
    _gate(tmp_path / "stage1.json", True)
    outs = [tmp_path / "m.json"]
    assert guard.proceed(tmp_path, 2, outs) is True  # gate 1 passed: stage 2 runs
    assert guard.proceed(None, 2, outs) is True  # no gates folder: nothing to wait for
    assert guard.proceed(tmp_path / "absent", 1, outs) is True  # stage 1 never waits
    assert not (tmp_path / "m.json").exists()


def test_guard_skips_after_a_failed_gate_and_the_skip_cascades(tmp_path: Path) -> None:
    gates = tmp_path / "gates"
    gates.mkdir()
    _gate(gates / "stage1.json", False, "stage 1: gate FAILED — psnr_window: 20 (needs > 28, -8)")
    outs = [tmp_path / "models" / "stage2", tmp_path / "metrics" / "stage2.json", gates / "stage2.json",
            tmp_path / "eval" / "per_patient.csv"]
    lines: list[str] = []
    assert guard.proceed(gates, 2, outs, log=lines.append) is False
    assert "stage 2 skipped" in lines[0]
    marker = json.loads((outs[0] / guard.MARKER_NAME).read_text())
    assert marker["skipped"] is True and marker["passed"] is False and marker["stage"] == 2
    assert "psnr_window" in marker["reason"]
    assert json.loads(outs[1].read_text())["skipped"] is True
    assert outs[3].read_text().splitlines()[0] == "skipped,reason"  # a file, not a folder
    # the skipped gate 2 reads as "not passed, skipped" for stage 3
    verdict = guard.read_gate(outs[2])
    assert not verdict.passed and verdict.skipped and "psnr_window" in verdict.reason
    assert guard.proceed(gates, 3, [tmp_path / "m3.json"]) is False
    assert "psnr_window" in json.loads((tmp_path / "m3.json").read_text())["reason"]


@pytest.mark.parametrize("content", [None, "not json", '{"stage": 1}'])
def test_guard_errors_on_a_missing_or_broken_gate_report(tmp_path: Path, content: str | None,
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    from cli_run import xct

    gate = tmp_path / "stage1.json"
    if content is not None:
        gate.write_text(content)
    rc = xct(["step", "gate", "--stage", "2", "--gates", str(tmp_path), "--metrics", str(tmp_path / "x.json"),
              "--out", str(tmp_path / "m.json")])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1 and str(gate) in err
    assert not (tmp_path / "m.json").exists()
