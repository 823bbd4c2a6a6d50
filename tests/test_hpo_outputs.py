"""`xct hpo`'s study outputs (components/hpo.py) from Optuna's own tools: the trials table from
``study.trials_dataframe()`` and the plots from ``optuna.visualization.matplotlib``.

A real in-memory Optuna study is filled with hand-made trials (``optuna.trial.create_trial``:
values, states, intermediate values and params chosen HERE), so every cell of the table is a
known answer; no Ray, no training."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image

optuna = pytest.importorskip("optuna")
hpo = pytest.importorskip("components.hpo")

LR, GRID = "stages.stage1.lr", "stages.stage1.token_grid"
DISTS = {
    LR: optuna.distributions.FloatDistribution(1e-4, 1e-2, log=True),
    GRID: optuna.distributions.CategoricalDistribution([4, 8]),
}
SPACE = SimpleNamespace(names=[LR, GRID, "stages.stage1.dim"])  # dim: searched, but in no trial here


def _study(trials: list[tuple[str, float | None, dict, dict]]) -> optuna.Study:
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(direction="maximize", study_name="xct-stage1")
    for state, value, params, inter in trials:
        study.add_trial(optuna.trial.create_trial(
            state=getattr(optuna.trial.TrialState, state), value=value, params=params, distributions=DISTS,
            intermediate_values=inter))
    return study


TRIALS = [
    ("COMPLETE", 20.0, {LR: 1e-3, GRID: 8}, {4: 18.0, 8: 20.0}),
    ("COMPLETE", 22.5, {LR: 2e-3, GRID: 4}, {4: 19.0, 8: 22.5}),
    ("PRUNED", None, {LR: 1e-4, GRID: 8}, {4: 10.0}),
    ("COMPLETE", 21.25, {LR: 5e-4, GRID: 8}, {4: 18.5, 8: 21.25}),
]


def _drawn(path: Path) -> np.ndarray:
    img = np.asarray(Image.open(path).convert("L"), dtype=np.float64)
    assert img.shape[0] >= 200 and img.shape[1] >= 300, img.shape
    assert img.std() > 5.0  # drawn on, not blank
    return img


def test_trials_table_is_the_studys_dataframe(tmp_path: Path) -> None:
    path = hpo.write_trials_csv(_study(TRIALS), SPACE, tmp_path / "stage1_trials.csv")
    rows = [r.split(",") for r in path.read_text().splitlines()]
    assert rows[0] == ["number", "state", "value", "last_step", "duration_s", LR, GRID, "stages.stage1.dim"]
    # number, state, value (blank when pruned), last reported step, duration (create_trial
    # stamps start = end: 0 s), each param as JSON, blank for a key the trial did not sample
    assert rows[1:] == [
        ["0", "COMPLETE", "20", "8", "0", "0.001", "8", ""],
        ["1", "COMPLETE", "22.5", "8", "0", "0.002", "4", ""],
        ["2", "PRUNED", "", "4", "0", "0.0001", "8", ""],
        ["3", "COMPLETE", "21.25", "8", "0", "0.0005", "8", ""],
    ]


def test_empty_study_gives_a_header_and_pictures_that_say_why(tmp_path: Path) -> None:
    study = _study([])
    assert hpo.write_trials_csv(study, SPACE, tmp_path / "t.csv").read_text() == (
        f"number,state,value,last_step,duration_s,{LR},{GRID},stages.stage1.dim\n")
    for png in (hpo.plot_history(study, tmp_path / "h.png", "psnr_window_db"),
                hpo.plot_intermediate(study, tmp_path / "i.png", "psnr_window_db", "stage1"),
                hpo.plot_importance(study, tmp_path / "m.png", seed=0)):
        _drawn(png)


def test_optuna_plots_are_written_and_closed(tmp_path: Path) -> None:
    import matplotlib.pyplot as plt

    study = _study(TRIALS)
    before = set(plt.get_fignums())
    pngs = [hpo.plot_history(study, tmp_path / "stage1_history.png", "psnr_window_db"),
            hpo.plot_intermediate(study, tmp_path / "stage1_intermediate.png", "psnr_window_db", "stage1"),
            hpo.plot_importance(study, tmp_path / "stage1_importance.png", seed=0)]
    imgs = [_drawn(p) for p in pngs]
    assert not any(np.array_equal(a, b) for a, b in [(imgs[0], imgs[1]), (imgs[1], imgs[2])])
    assert set(plt.get_fignums()) == before  # pyplot keeps no figure per call
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(p.name for p in pngs)  # no temp file left


def test_importance_with_one_complete_trial_is_a_note_not_an_error(tmp_path: Path) -> None:
    study = _study(TRIALS[:1])
    one = _drawn(hpo.plot_importance(study, tmp_path / "one.png", seed=0))
    full = _drawn(hpo.plot_importance(_study(TRIALS), tmp_path / "full.png", seed=0))
    assert one.shape != full.shape or not np.array_equal(one, full)
