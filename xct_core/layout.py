"""Where things live on disk: the ONE definition of the training-folder and reports layouts.

Training folder (``params.train.out_dir``, default ``outputs/train``; K = stage index)::

    checkpoints/stage{K}/step_{N:08d}/state.pt   full training state (resume), the last
                                                 ``keep_last`` + the best one kept
    checkpoints/stage{K}/mlflow.json             the stage's MLflow run (components/train.py)
    checkpoints/stage{K}/ray_workers.json        the Ray nodes of each worker-group attempt (idem)
    models/stage{K}/final.pt                     EMA weights at the last step  ┐ read by
    models/stage{K}/best.pt                      EMA weights at the best val   ┘ evaluation /
    models/stage{K}/direct.pt                    direct-regression twin (when trained)
    plots/stage{K}/train.csv, val.csv            curves (step-indexed) for ``dvc plots``
    metrics/stage{K}.json                        summary for ``dvc metrics``
    val/stage{K}/step_{N:08d}.png                validation montages

Reports folder (``reports/``, what dvc.yaml declares; :class:`ReportLayout`)::

    eval/stage{K}/metrics.json, per_patient.csv, montage.png   the evaluate step
    gates/stage{K}.json                                        the gate step
    summary.json                                               the register step
    model_card.json, model_card.md                             the register step (every run)

Run storage (a shared root every node sees, ``<storage uri>/<run id>/``: an ``s3://`` prefix or
a mounted folder; components/run_storage.py)::

    processed/              the processed data every worker reads (a node-local cache per node)
    ray/stage{K}/step_N/    Ray Train's storage_path: the checkpoints (state.pt + state.pt.sha256)
    train/                  a training folder in the layout above (exported models, metrics, curves,
                            montages, checkpoints/stage{K}/{mlflow,ray_workers}.json)

Exported stage models are the files :func:`xct_core.checkpoint.export_stage_model` writes;
:func:`stage_model_files` lists a cascade's files for stages 1 … K.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

__all__ = ["RUN_STORAGE_DIRS", "METRICS_JSON", "MODEL_CARD_JSON", "MODEL_CARD_MD", "MODEL_KINDS", "MONTAGE_PNG", "PER_PATIENT_CSV",
           "ReportLayout", "RunLayout", "stage_model_files"]

#: the files of an evaluate step's folder (``reports/eval/stage{K}``)
METRICS_JSON = "metrics.json"
PER_PATIENT_CSV = "per_patient.csv"
MONTAGE_PNG = "montage.png"
#: the register step's model card (beside ``summary.json``; the same names in MLflow)
MODEL_CARD_JSON = "model_card.json"
MODEL_CARD_MD = "model_card.md"

#: the folders of a run's storage root (module docstring), by role
RUN_STORAGE_DIRS = {"processed": "processed", "ray": "ray", "train": "train"}

#: exported stage-model files of a training folder: the last step, the best validation, the twin
MODEL_KINDS = ("final", "best", "direct")


@dataclass(frozen=True)
class RunLayout:
    """Paths of one stage's outputs under a training folder ``out_dir`` (module docstring)."""

    out_dir: Path
    stage: int

    def __post_init__(self) -> None:
        object.__setattr__(self, "out_dir", Path(self.out_dir))

    @property
    def checkpoints(self) -> Path:
        return self.out_dir / "checkpoints" / f"stage{self.stage}"

    @property
    def train_lock(self) -> Path:
        """The lock a training run holds on the whole folder (one ``xct train`` at a time)."""
        return self.out_dir / ".train.lock"

    @property
    def mlflow_state(self) -> Path:
        """The stage's MLflow run id (written by the Ray Train binding)."""
        return self.checkpoints / "mlflow.json"

    @property
    def ray_workers(self) -> Path:
        """The Ray nodes of each worker-group attempt (written by the Ray Train binding)."""
        return self.checkpoints / "ray_workers.json"

    def model(self, which: str = "final", stage: int | None = None) -> Path:
        """``models/stage{k}/{which}.pt`` (``final`` | ``best`` | ``direct``)."""
        if which not in MODEL_KINDS:
            raise ValueError(f"model kind must be one of {MODEL_KINDS}, got {which!r}")
        return self.out_dir / "models" / f"stage{self.stage if stage is None else stage}" / f"{which}.pt"

    @property
    def plots(self) -> Path:
        return self.out_dir / "plots" / f"stage{self.stage}"

    @property
    def metrics_file(self) -> Path:
        return self.out_dir / "metrics" / f"stage{self.stage}.json"

    @property
    def montages(self) -> Path:
        return self.out_dir / "val" / f"stage{self.stage}"

    def step_outputs(self) -> list[Path]:
        """What the pipeline declares for this stage's training step (dvc.yaml ``outs``,
        ``metrics``, ``plots``; the skip markers of a skipped step): the models folder, the
        metrics file and the curves folder."""
        return [self.model().parent, self.metrics_file, self.plots]

    def clear(self) -> None:
        """Delete this stage's checkpoints, models, curves, metrics and montages (fresh start)."""
        for p in (self.checkpoints, self.model().parent, self.plots, self.montages):
            shutil.rmtree(p, ignore_errors=True)
        self.metrics_file.unlink(missing_ok=True)


def stage_model_files(train_dir: str | Path, upto: int, which: str = "best") -> list[Path]:
    """The exported model files of stages 1 … ``upto`` in a training folder (``which`` of each)."""
    return [RunLayout(Path(train_dir), k).model(which) for k in range(1, int(upto) + 1)]


@dataclass(frozen=True)
class ReportLayout:
    """Paths of the evaluate / gate / register outputs under ``root`` (default ``reports``)."""

    root: Path = Path("reports")

    def __post_init__(self) -> None:
        object.__setattr__(self, "root", Path(self.root))

    @property
    def eval_root(self) -> Path:
        return self.root / "eval"

    @property
    def gates_root(self) -> Path:
        return self.root / "gates"

    def eval_dir(self, k: int) -> Path:
        return self.eval_root / f"stage{k}"

    def eval_metrics(self, k: int) -> Path:
        return self.eval_dir(k) / METRICS_JSON

    @staticmethod
    def gate_file(k: int) -> str:
        """The file name of gate ``k``'s report in the gates folder."""
        return f"stage{k}.json"

    def gate(self, k: int) -> Path:
        return self.gates_root / self.gate_file(k)

    @property
    def summary(self) -> Path:
        return self.root / "summary.json"

    @property
    def model_card_json(self) -> Path:
        return self.root / MODEL_CARD_JSON

    @property
    def model_card_md(self) -> Path:
        return self.root / MODEL_CARD_MD
