"""The metric table (xct_core/metric_table.py) is the one declaration of every metric.

Adding a metric = compute it + one table entry: the first test fails while either is missing
(an emitted key the table does not know, or an entry nothing emits). The others prove the
table is what the consumers read: the gates judge exactly its ``gate`` metrics, params naming
an unknown metric fail at load, rows are aggregated by its rule, its function references
resolve, and the protocol sentences name its metrics.
"""

from __future__ import annotations

import importlib
from pathlib import Path

import numpy as np
import pytest
import torch
from train_fixtures import tiny_params

from xct_core import metric_table as T
from components.ops_params import load_params  # the whole file: hpo.metric is an operational key
from xct_core.calibration import Calibration
from xct_core.diffusion import Sampler
from xct_core.errors import ConfigError
from xct_core.evaluation import EvalProtocol, ct_case, evaluate_case
from xct_core.gates import evaluate_gate
from xct_core.geometry import VIEWS
from xct_core.io import CTVolume
from xct_core.metrics import METRIC_KEYS, mean_rows
from xct_core.models import build_stage
from xct_core.phantoms import make_phantom


@pytest.fixture(scope="module")
def emitted() -> dict[str, float]:
    """Every key evaluate_case can write: K = 2 samples (single_ + uncertainty + calibration), the direct
    twin, the mean-volume baseline, the previous stage upsampled and the reprojections, on the tiny
    random-weight two-stage cascade (stage 2 evaluated)."""
    params = tiny_params(eval={"sample_steps": 1})
    st = params.stage(1)
    hu, _, affine = make_phantom(params.stage(params.n_stages).size, st.fov_mm / params.stage(params.n_stages).size, 0)
    case = ct_case("ph0", CTVolume(hu.astype(np.float32), affine), params, upto=2)
    torch.manual_seed(0)
    stages = [build_stage(params, 1).eval(), build_stage(params, 2).eval()]
    direct = build_stage(params, 2, mode="direct").eval()
    cal = Calibration(stage=2, samples=2, level=0.9, q=2.0, sigma_scale=1.5, floor_hu=1.0)  # calibrated metrics too
    res = evaluate_case(case, stages, params, EvalProtocol.from_params(params), sampler=Sampler.from_params(params),
                        samples=2, direct=direct, baseline_hu=np.full_like(case.target_hu, -200.0), reprojection=True,
                        calibration=cal)
    return res.metrics


def test_every_emitted_metric_is_in_the_table_and_every_entry_is_emitted(emitted: dict[str, float]) -> None:
    declared = T.emitted_names()
    assert set(emitted) - declared == set(), "evaluate_case emits metrics the table does not declare (add an entry)"
    assert declared - set(emitted) == set(), "the table declares metrics nothing emits (remove the entry)"
    assert all(T.lookup(k) is not None for k in emitted)
    assert set(METRIC_KEYS) <= {m.name for m in T.METRICS}


def test_entries_are_well_formed() -> None:
    names = [m.name for m in T.METRICS]
    assert len(names) == len(set(names))
    for m in T.METRICS:
        mod, _, fn = m.computed_by.rpartition(".")
        assert callable(getattr(importlib.import_module(mod), fn)), m.computed_by
        assert m.uses <= T.USES, (m.name, m.uses - T.USES)
        assert m.better in ("higher", "lower", "none") and m.aggregate in ("mean", "sum")
        assert set(m.shown_with) <= {p.prefix for p in T.PREDICTIONS if p.prefix}
        assert m.defined_with is None or T.entry(m.defined_with).definition is not None
        if m.per_view:
            assert m.names() == tuple(m.name.format(view=v) for v in VIEWS)
    assert {p.gate_baseline for p in T.PREDICTIONS if p.gate_baseline} == {"mean_volume", "direct_twin"}


def test_protocol_sentences_name_table_metrics() -> None:
    defs = EvalProtocol.from_params(tiny_params()).describe(16)
    named = {n.strip().replace("<view>", "{view}") for k in defs for n in k.split("/")}
    assert named == {m.name for m in T.METRICS if m.definition or m.defined_with}
    assert "7^3 taps on the 16^3 grid" in defs["ssim_window"]


def test_the_gates_read_exactly_the_gate_metrics() -> None:
    """Removing a ``gate`` metric fails a check; removing any other metric changes nothing."""
    gate = tiny_params().stage(1).gate
    good = {n: 1.0 for n in T.emitted_names()}
    good.update(psnr_window_db=gate.psnr_window_db + 5, ssim_window=min(1.0, gate.ssim_window + 0.1), nan_count=0.0,
                std=0.5, target_std=0.5, baseline_psnr_window_db=0.0, test_ids_hash="x",
                psnr_window_body_db=gate.psnr_window_body_db + 5)
    gate_free = gate.model_copy(update={"relative": []})
    assert evaluate_gate(1, good, gate_free).passed
    gate_metrics = set(T.names_for("gate"))
    assert gate_metrics == {"psnr_window_db", "psnr_window_body_db", "ssim_window", "nan_count", "std", "target_std"}
    for name in T.emitted_names():
        rep = evaluate_gate(1, {k: v for k, v in good.items() if k != name}, gate_free)
        assert rep.passed == (name not in gate_metrics), name


def test_mean_rows_sums_the_counts_the_table_says_are_summed() -> None:
    rows = [{"id": "a", "nan_count": 2.0, "single_nan_count": 1.0, "psnr_window_db": 10.0, "std": 1.0},
            {"id": "b", "nan_count": 3.0, "single_nan_count": 0.0, "psnr_window_db": 20.0, "std": 3.0}]
    out = mean_rows(rows)
    assert out == {"nan_count": 5.0, "single_nan_count": 1.0, "psnr_window_db": 15.0, "std": 2.0}
    assert [m.name for m in T.METRICS if m.aggregate == "sum"] == ["nan_count"]


@pytest.mark.parametrize("yaml_text, where", [
    ("train: {best_metric: psnr_windw_db}", "train.best_metric"),
    ("train: {best_metric: direct_psnr_window_db}", "train.best_metric"),
    ("hpo: {metric: std}", "hpo.metric"),
    ("hpo: {metric: reproj_psnr_top_db}", "hpo.metric"),
    ("gates: {stage1: {psnr_window_db: 1, ssim_window: 0.1, relative: [{metric: ssim, baseline: champion, "
     "min_absolute_change: 0}]}}", "gates.stage1.relative.0.metric"),
    ("gates: {stage1: {psnr_window_db: 1, ssim_window: 0.1, relative: [{metric: mae_hu, baseline: mean_volume, "
     "min_absolute_change: 5}]}}", "gates.stage1.relative.0"),  # lower is better: greater_is_better must say so
])
def test_params_naming_an_unknown_metric_fail_at_load(tmp_path: Path, yaml_text: str, where: str) -> None:
    p = tmp_path / "params.yaml"
    p.write_text(yaml_text + "\n")
    with pytest.raises(ConfigError) as e:
        load_params(p)
    msg = str(e.value)
    assert str(p) in msg and where in msg and "\n" not in msg


def test_params_naming_table_metrics_load(tmp_path: Path, repo_root: Path) -> None:
    p = tmp_path / "params.yaml"
    p.write_text("train: {best_metric: single_reproj_psnr_lateral_db, best_mode: max}\n"
                 "hpo: {metric: psnr_window_body_db}\n"
                 "gates: {stage1: {psnr_window_db: 1, ssim_window: 0.1, relative: [{metric: mae_hu, baseline: "
                 "mean_volume, min_absolute_change: 5, greater_is_better: false}]},\n"
                 "        stage2: {psnr_window_db: 1, ssim_window: 0.1}, stage3: {psnr_window_db: 1, ssim_window: 0.1}}\n")
    got = load_params(p)
    assert got.train.best_metric == "single_reproj_psnr_lateral_db" and got.hpo.metric == "psnr_window_body_db"
    assert got.gates["stage1"].relative[0].metric == "mae_hu"
    shipped = load_params(repo_root / "params.yaml")
    for name in (shipped.train.best_metric, shipped.hpo.metric,
                 *(r.metric for k in range(1, shipped.n_stages + 1) for r in shipped.stage(k).gate.relative)):
        assert T.lookup(name, ("", "single_")) is not None


def test_consumers_list_only_table_metrics_in_table_order() -> None:
    from components.pipeline_verdict import STAGE_METRIC_KEYS
    from pipelines.realct import METHODS, REPORTED
    from xct_core.model_card import PREDICTIONS, SLICE_AVG_KEYS, card_metrics
    from xct_core.report import COMPARE_METRICS

    order = [n for m in T.METRICS for n in m.names()]
    for keys in (COMPARE_METRICS, card_metrics(), SLICE_AVG_KEYS, [k for k, _ in REPORTED]):
        assert list(keys) == sorted(keys, key=order.index)
    assert set(card_metrics()) | set(SLICE_AVG_KEYS) == set(T.names_for("card"))
    assert [k for k, _ in REPORTED] == list(T.names_for("realct"))
    assert {k for k in STAGE_METRIC_KEYS if k != "n_patients"} == {
        p + n for n in T.names_for("summary") for p in ("", *T.entry(n).shown_with)}
    assert [p for p, _ in PREDICTIONS] == [p for p, _ in METHODS] == [p.prefix for p in T.PREDICTIONS]
    assert [lab for _, lab in REPORTED] == [T.label(k, short=True) for k, _ in REPORTED]
