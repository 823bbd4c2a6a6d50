"""The KFP pipeline's exit handler: a run summary written however the run ended (not the
pipeline's verdict ``reports/summary.json``: that is :mod:`components.pipeline_verdict`).

``run_summary_component`` (components/kfp_components.py) is the exit task of
``dsl.ExitHandler`` in pipelines/kfp_dag.py: KFP runs it after every other task has finished
— succeeded, failed or skipped — and hands it the run's final status
(``dsl.PipelineTaskFinalStatus``). It writes ``run_summary.json`` (:func:`run_summary`: state,
the KFP job and task names, the error code and message of a failure, the data URI, the time)
as its ``summary`` artifact and prints it, so a failed run still leaves one document that
says what happened. The gate verdicts of a completed run
stay in ``summary.json`` (register / rejected tasks); an exit task cannot read the outputs
of the tasks it guards (a KFP rule), so this summary holds the run's status, not its metrics.
The document carries no credential (:func:`xct_core.redact.redact_doc`: a failing task's
error message may quote a URL with a password or a signed S3 link).
"""

from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from xct_core.atomic import write_json_atomic
from xct_core.redact import redact_doc

#: the file inside the exit task's ``summary`` artifact
SUMMARY_FILE = "run_summary.json"


def run_summary(state: str, job: str = "", task: str = "", error_code: float | None = None,
                error_message: str = "", data_uri: str = "", job_id: str = "") -> dict[str, Any]:
    """The run summary document (plain dict, JSON-ready). ``task`` is the task the exit handler
    guards (its ``exit-handler-N`` group); ``error_code`` arrives as a float from KFP;
    ``job_id``: the run's id, the ``kfp.run_id`` tag of its MLflow runs (lineage)."""
    return redact_doc({
        "state": state,
        "succeeded": state == "SUCCEEDED",
        "pipeline_job": job,
        "pipeline_job_id": job_id,
        "guarded_task": task,
        "error_code": int(error_code) if error_code is not None else None,
        "error_message": error_message,
        "data_uri": data_uri,
        "finished_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    })


def write_run_summary(doc: dict[str, Any], out_dir: str | Path) -> Path:
    """``out_dir/run_summary.json`` written atomically; returns the path."""
    path = Path(out_dir) / SUMMARY_FILE
    write_json_atomic(path, redact_doc(doc))
    return path
