"""KFP v2 components for the cascade steps: train stage K, evaluate, the gate (a report
artifact + the decision), register and the rejected branch.

Each component is a thin adapter around the step's command-line entry point — the same
command dvc.yaml runs (``python -m components.train|evaluate|gate|register``), so the step
logic stays in one place and the three ways of running a step (DVC, a KFP cluster,
``kfp.local``) cannot drift apart. Artifacts map onto the DVC layout:

- ``train_stage_component`` → ``model`` (``Output[Model]``): a training output folder
  (``models/stage{1..K}``, ``plots``, ``metrics``; layout in :mod:`xct_core.training`).
  Stage K>1 starts from a copy of stage K-1's folder (the frozen earlier stages).
- ``evaluate_step_component`` → ``report`` (``reports/eval/stageK``: ``metrics.json``,
  ``per_patient.csv``) + a KFP ``Metrics`` artifact with the numeric metrics.
- ``gate_report_component`` (evaluation folder in) → ``gate`` (``stageK.json``, :meth:`xct_core.gates.GateReport.to_dict`)
  and the output parameter ``passed`` that the pipeline's ``dsl.If`` conditions read.
- ``register_component`` → ``summary`` (``summary.json``), run after the last gate passed.
- ``rejected_component``: the ``dsl.Else`` branch of a gate; records why the run stopped.

``params_yaml`` is the text of a params.yaml (empty: the built-in demo defaults);
``ray_address`` / ``mlflow_tracking_uri`` (empty: the step's own default — local Ray, the
embedded sqlite MLflow) become ``RAY_ADDRESS`` / ``MLFLOW_TRACKING_URI`` for the step.

No ``from __future__ import annotations``: KFP reads the real annotation objects.
"""

from typing import NamedTuple

from kfp.dsl import Dataset, Input, Markdown, Metrics, Model, Output

from components._kfp import light_component, train_component

#: the output-parameter name of the gate decision (read by ``dsl.If`` in pipelines/training.py)
GATE_PASSED = "passed"


def run_step(module: str, args: list, params_yaml: str = "", env: dict | None = None) -> None:
    """Run ``python -m <module> ARGS --params <params_yaml as a file>``.

    Raises ``RuntimeError`` with the step's last stderr lines when it exits non-zero (the
    KFP task then fails, which stops the pipeline — unlike a gate that did not pass).
    """
    import os
    import subprocess
    import sys
    import tempfile

    fd, path = tempfile.mkstemp(prefix="xct-params-", suffix=".yaml")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(params_yaml if params_yaml.strip() else "{}\n")
        cmd = [sys.executable, "-m", module, *[str(a) for a in args], "--params", path]
        full_env = dict(os.environ)
        full_env.update({k: v for k, v in (env or {}).items() if v})
        print("+", " ".join(cmd), flush=True)
        proc = subprocess.run(cmd, env=full_env, stderr=subprocess.PIPE, text=True)
        if proc.stderr:
            sys.stderr.write(proc.stderr)
        if proc.returncode != 0:
            tail = "\n".join(proc.stderr.strip().splitlines()[-5:])
            raise RuntimeError(f"{module} exited with {proc.returncode}: {tail}")
    finally:
        os.unlink(path)


@train_component
def train_stage_component(
    stage: int,
    processed: Input[Dataset],
    model: Output[Model],
    previous: Input[Model] = None,
    params_yaml: str = "",
    ray_address: str = "",
    mlflow_tracking_uri: str = "",
) -> NamedTuple("TrainOutputs", [("final_step", int)]):  # noqa: UP014
    """Train cascade stage ``stage`` into ``model`` with ``xct train`` (Ray Train + MLflow,
    components/train.py; in-process when ``pipeline.train.local`` is true).

    ``previous``: stage K-1's ``model`` folder (required for K > 1; copied in first so the
    frozen earlier stages are found at ``models/stage{1..K-1}``).
    """
    import json
    import shutil
    from collections import namedtuple
    from pathlib import Path

    from components._kfp import params_from_text
    from components.stages_kfp import run_step

    out = Path(model.path)
    if stage > 1:
        if previous is None:
            raise ValueError(f"stage {stage} needs the previous stage's model folder")
        shutil.copytree(previous.path, out, dirs_exist_ok=True, ignore=shutil.ignore_patterns("checkpoints", "ray"))
    out.mkdir(parents=True, exist_ok=True)
    local = params_from_text(params_yaml).pipeline.train.local  # in-process (no Ray/MLflow) when true
    run_step(
        "pipelines.cli",
        ["train", "--stage", stage, "--processed", processed.path, "--out", out, "--fresh", *(["--local"] if local else [])],
        params_yaml,
        {"RAY_ADDRESS": ray_address, "MLFLOW_TRACKING_URI": mlflow_tracking_uri},
    )
    summary_file = out / "metrics" / f"stage{stage}.json"
    summary = json.loads(summary_file.read_text()) if summary_file.is_file() else {}
    model.metadata["stage"] = stage
    model.metadata["final_step"] = int(summary.get("step", 0))
    return namedtuple("TrainOutputs", ["final_step"])(int(summary.get("step", 0)))


@light_component
def evaluate_step_component(
    stage: int,
    processed: Input[Dataset],
    train_dir: Input[Model],
    report: Output[Dataset],
    metrics: Output[Metrics],
    params_yaml: str = "",
) -> None:
    """Evaluate the cascade 1 … ``stage`` from ``train_dir`` on the test split (``python -m
    components.evaluate``) → ``report`` (metrics.json, per_patient.csv, montage.png); the
    numeric metrics also go to a KFP ``Metrics`` artifact."""
    import json
    import math
    from pathlib import Path

    from components.stages_kfp import run_step

    run_step(
        "components.evaluate",
        ["--stage", stage, "--processed", processed.path, "--train-dir", train_dir.path, "--out", report.path],
        params_yaml,
    )
    doc = json.loads((Path(report.path) / "metrics.json").read_text())
    for key, value in doc.items():
        if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
            metrics.log_metric(key, float(value))
    report.metadata["stage"] = stage


@light_component
def gate_report_component(
    stage: int,
    evaluation: Input[Dataset],
    gate: Output[Dataset],
    params_yaml: str = "",
) -> NamedTuple("GateOutputs", [("passed", bool), ("summary", str)]):  # noqa: UP014
    """Apply ``gates.stage{stage}`` to the evaluation metrics → ``gate`` (``stageK.json``);
    returns ``passed`` (the ``dsl.If`` condition) and the one-line summary."""
    import json
    from collections import namedtuple
    from pathlib import Path

    from components.stages_kfp import run_step

    report = Path(gate.path) / f"stage{stage}.json"
    report.parent.mkdir(parents=True, exist_ok=True)
    run_step(
        "components.gate",
        ["--stage", stage, "--metrics", Path(evaluation.path) / "metrics.json", "--out", report],
        params_yaml,
    )
    doc = json.loads(report.read_text())
    passed = bool(doc["passed"])
    summary = str(doc.get("summary", ""))
    print(summary)
    gate.metadata["passed"] = passed
    return namedtuple("GateOutputs", ["passed", "summary"])(passed, summary)


@light_component
def register_component(
    model: Input[Model],
    eval1: Input[Dataset],
    eval2: Input[Dataset],
    eval3: Input[Dataset],
    gate1: Input[Dataset],
    gate2: Input[Dataset],
    gate3: Input[Dataset],
    summary: Output[Dataset],
    params_yaml: str = "",
    mlflow_tracking_uri: str = "",
) -> None:
    """Register the cascade (every gate passed) → ``summary`` (``summary.json``).

    Lays the evaluation and gate artifacts out as ``reports/eval/stageK`` and
    ``reports/gates/stageK.json`` (the DVC layout the register step reads).
    """
    import shutil
    import tempfile
    from pathlib import Path

    from components.stages_kfp import run_step

    with tempfile.TemporaryDirectory(prefix="xct-reports-") as tmp:
        reports = Path(tmp)
        for k, (ev, gt) in enumerate([(eval1, gate1), (eval2, gate2), (eval3, gate3)], start=1):
            shutil.copytree(ev.path, reports / "eval" / f"stage{k}")
            (reports / "gates").mkdir(parents=True, exist_ok=True)
            shutil.copyfile(Path(gt.path) / f"stage{k}.json", reports / "gates" / f"stage{k}.json")
        out = Path(summary.path) / "summary.json"
        out.parent.mkdir(parents=True, exist_ok=True)
        run_step(
            "components.register",
            ["--gates", reports / "gates", "--eval", reports / "eval", "--train-dir", model.path, "--out", out],
            params_yaml,
            {"MLFLOW_TRACKING_URI": mlflow_tracking_uri},
        )


@light_component
def rejected_component(stage: int, gate_summary: str, report: Output[Markdown]) -> str:
    """The ``dsl.Else`` branch of gate ``stage``: the run stops here (rejected, not failed)."""
    line = f"Rejected at stage {stage}; later stages were not run. {gate_summary}"
    print(line)
    with open(report.path, "w") as f:
        f.write(f"# Pipeline stopped at gate {stage}\n\n{gate_summary}\n")
    return line
