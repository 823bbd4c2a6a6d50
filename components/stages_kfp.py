"""KFP v2 components for the cascade steps: train stage K, evaluate, the gate (a report
artifact + the decision), register and the rejected branch.

Each component is a thin adapter that calls the step's plain function — the same function
the ``xct`` command dvc.yaml runs calls (``components.train.run_train``, ``run_evaluate``,
``run_gate``, ``run_register``), as the KFP v2 lightweight-component samples do — so the step
logic stays in one place and the three ways of running a step (DVC, a KFP cluster,
``kfp.local``) cannot drift apart. Nothing here calls up into ``pipelines/``. Artifacts map
onto the DVC layout (:mod:`xct_core.layout`):

- ``train_stage_component`` → ``model`` (``Output[Model]``): a training output folder
  (``models/stage{1..K}``, ``plots``, ``metrics``; layout in :mod:`xct_core.training`).
  Stage K>1 starts from a copy of stage K-1's folder (the frozen earlier stages).
- ``evaluate_step_component`` → ``report`` (``reports/eval/stageK``: ``metrics.json``,
  ``per_patient.csv``) + a KFP ``Metrics`` artifact with the numeric metrics.
- ``gate_report_component`` (evaluation folder in) → ``gate`` (``stageK.json``, :meth:`xct_core.gates.GateReport.to_dict`)
  and the output parameter ``passed`` that the pipeline's ``dsl.If`` conditions read.
- ``register_component`` → ``summary`` (``summary.json`` + the model card ``model_card.{json,md}``),
  run after the last gate passed.
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


def _environment(values: dict) -> None:
    """Set the non-empty ``values`` as environment variables of this task (RAY_ADDRESS,
    MLFLOW_TRACKING_URI: the engines read them)."""
    import os

    os.environ.update({k: v for k, v in values.items() if v})


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
    """Train cascade stage ``stage`` into ``model`` (:func:`components.train.run_train`: Ray
    Train + MLflow; :func:`components.train.run_local` in-process when
    ``pipeline.train.local`` is true) — the functions ``xct train`` calls.

    ``previous``: stage K-1's ``model`` folder (required for K > 1; copied in first so the
    frozen earlier stages are found at ``models/stage{1..K-1}``).
    """
    import shutil
    from collections import namedtuple
    from pathlib import Path

    from components._kfp import params_from_text
    from components.ops_params import OpsParams
    from components.stages_kfp import _environment
    from components.train import run_local, run_train

    out = Path(model.path)
    if stage > 1:
        if previous is None:
            raise ValueError(f"stage {stage} needs the previous stage's model folder")
        shutil.copytree(previous.path, out, dirs_exist_ok=True, ignore=shutil.ignore_patterns("checkpoints", "ray"))
    out.mkdir(parents=True, exist_ok=True)
    params = params_from_text(params_yaml, OpsParams)
    _environment({"RAY_ADDRESS": ray_address, "MLFLOW_TRACKING_URI": mlflow_tracking_uri})
    if params.pipeline.train.local:
        final_step = run_local(params, stage, processed.path, out, fresh=True).final_step
    else:
        final_step = run_train(params, stage, processed.path, out, fresh=True).final_step
    model.metadata["stage"] = stage
    model.metadata["final_step"] = int(final_step)
    return namedtuple("TrainOutputs", ["final_step"])(int(final_step))


@light_component
def evaluate_step_component(
    stage: int,
    processed: Input[Dataset],
    train_dir: Input[Model],
    report: Output[Dataset],
    metrics: Output[Metrics],
    params_yaml: str = "",
) -> None:
    """Evaluate the cascade 1 … ``stage`` from ``train_dir`` on the test split
    (:func:`components.evaluate.run_evaluate`) → ``report`` (metrics.json, per_patient.csv,
    montage.png); the numeric metrics also go to a KFP ``Metrics`` artifact."""
    import math

    from components._kfp import params_from_text
    from components.evaluate import run_evaluate

    doc = run_evaluate(stage, processed.path, train_dir.path, report.path, params_from_text(params_yaml), log=print)
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
    mlflow_tracking_uri: str = "",
) -> NamedTuple("GateOutputs", [("passed", bool), ("summary", str)]):  # noqa: UP014
    """Apply ``gates.stage{stage}`` to the evaluation metrics (:func:`components.gate.run_gate`)
    → ``gate`` (``stageK.json``); returns ``passed`` (the ``dsl.If`` condition) and the summary.
    ``mlflow_tracking_uri``: the registry a champion check reads (empty: the step's default)."""
    from collections import namedtuple
    from pathlib import Path

    from components._kfp import params_from_text
    from components.gate import report_lines, run_gate
    from xct_core.layout import METRICS_JSON, ReportLayout

    out = Path(gate.path) / ReportLayout.gate_file(stage)
    report = run_gate(stage, Path(evaluation.path) / METRICS_JSON, out, params_from_text(params_yaml),
                      tracking_uri=mlflow_tracking_uri or None)
    for line in report_lines(report):
        print(line)
    gate.metadata["passed"] = report.passed
    return namedtuple("GateOutputs", ["passed", "summary"])(bool(report.passed), report.summary())


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
    """Register the cascade (every gate passed; :func:`components.register.run_register`) →
    ``summary`` (``summary.json``).

    Lays the evaluation and gate artifacts out as ``reports/eval/stageK`` and
    ``reports/gates/stageK.json`` (the layout the register step reads).
    """
    import shutil
    import tempfile
    from pathlib import Path

    from components._kfp import params_from_text
    from components.register import run_register
    from components.stages_kfp import _environment
    from xct_core.layout import ReportLayout

    _environment({"MLFLOW_TRACKING_URI": mlflow_tracking_uri})
    with tempfile.TemporaryDirectory(prefix="xct-reports-") as tmp:
        reports = ReportLayout(Path(tmp))
        for k, (ev, gt) in enumerate([(eval1, gate1), (eval2, gate2), (eval3, gate3)], start=1):
            shutil.copytree(ev.path, reports.eval_dir(k))
            reports.gates_root.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(Path(gt.path) / ReportLayout.gate_file(k), reports.gate(k))
        out = Path(summary.path) / "summary.json"
        run_register(reports.gates_root, reports.eval_root, model.path, out, params_from_text(params_yaml), log=print)


@light_component
def rejected_component(stage: int, gate_summary: str, report: Output[Markdown]) -> str:
    """The ``dsl.Else`` branch of gate ``stage``: the run stops here (rejected, not failed)."""
    line = f"Rejected at stage {stage}; later stages were not run. {gate_summary}"
    print(line)
    with open(report.path, "w") as f:
        f.write(f"# Pipeline stopped at gate {stage}\n\n{gate_summary}\n")
    return line
