"""benchmarks/bench_reconstruct.py: its bookkeeping, not its speed.

The benchmark's main path runs on the tiny cascade (2 DDIM steps, 1 repeat) in a fresh
interpreter where ray, mlflow, typer, kfp, boto3 and optuna cannot be imported (as on a bare
torch GPU box). Known answers: every stage does exactly ``steps`` network forwards per
sample, the total wall time equals the sum of the stages and the timed overhead, and the
production cascade's shapes pass the meta-device check. No timing is asserted.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from train_fixtures import tiny_params

REPO = Path(__file__).resolve().parents[1]
BENCH = REPO / "benchmarks" / "bench_reconstruct.py"
BLOCKED = ("ray", "mlflow", "typer", "kfp", "boto3", "optuna", "great_expectations")


def _load_bench():  # noqa: ANN202 - the benchmark module
    import importlib.util

    spec = importlib.util.spec_from_file_location("bench_reconstruct", BENCH)
    mod = importlib.util.module_from_spec(spec)
    assert spec.loader is not None
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def bench_doc(tmp_path_factory: pytest.TempPathFactory) -> dict:
    root = tmp_path_factory.mktemp("bench_recon")
    pfile = root / "tiny.yaml"
    pfile.write_text(yaml.safe_dump(tiny_params().model_dump(mode="json")))
    out = root / "results"
    args = ["--params", str(pfile), "--profile", "demo", "--steps", "2", "--repeats", "1", "--warmup", "0",
            "--samples", "1", "2", "--meta-check", "yes", "--out-dir", str(out)]
    code = ("import runpy, sys\n"
            f"sys.modules.update(dict.fromkeys({BLOCKED!r}))\n"  # None in sys.modules: import fails
            f"sys.argv = [{str(BENCH)!r}, *{args!r}]\n"
            f"runpy.run_path({str(BENCH)!r}, run_name='__main__')\n")
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    doc = json.loads((out / "reconstruct_cpu.json").read_text())
    doc["_md"] = (out / "reconstruct_cpu.md").read_text()
    return doc


def test_stage_entries_and_forward_counts_match_the_steps_asked(bench_doc: dict) -> None:
    assert bench_doc["steps"] == 2 and bench_doc["steps_source"] == "--steps"
    assert [r["samples"] for r in bench_doc["results"]] == [1, 2]
    for res in bench_doc["results"]:
        k = res["samples"]
        assert [s["stage"] for s in res["stages"]] == [1, 2] and [s["size"] for s in res["stages"]] == [16, 32]
        for s in res["stages"]:
            assert s["forwards_per_sample"] == 2  # one network forward per DDIM step, per sample
            assert s["median_s"] > 0 and s["min_s"] <= s["median_s"]
            assert s["per_ddim_step_median_s"] == pytest.approx(s["median_s"] / (2 * k), rel=1e-9)
        for run in res["runs"]:
            assert run["forwards"] == {"1": 2 * k, "2": 2 * k}  # summed over the K samples
            assert run["output_shape"] == [32, 32, 32] and run["output_finite"]


def test_total_is_the_sum_of_stages_and_overhead(bench_doc: dict) -> None:
    for res in bench_doc["results"]:
        for run in res["runs"]:
            stages = sum(run["stage_s"].values())
            parts = [run[key] for key in ("load_inputs_s", "load_models_s", "setup_s", "hu_conversion_s",
                                          "finalize_s", "qa_s", "write_s")]
            assert all(p >= 0 for p in parts) and run["load_models_s"] > 0 and run["qa_s"] > 0
            assert run["sampling_s"] == pytest.approx(stages)
            assert run["overhead_s"] == pytest.approx(sum(parts))
            # independently measured wall time: only the glue between the timed pieces is missing
            assert run["total_s"] == pytest.approx(stages + sum(parts), rel=0.05, abs=0.05)
            assert run["peak_mem_gib"] > 0
        total = res["total"]["median_s"]
        assert total == pytest.approx(res["sampling"]["median_s"] + res["overhead_total"]["median_s"],
                                      rel=0.05, abs=0.05)


def test_meta_check_production_shapes_and_report_says_what_was_not_measured(bench_doc: dict) -> None:
    m = bench_doc["meta_check"]
    assert m["ok"] and m["profile"] == "production" and m["stage_sizes"] == [64, 128, 256]
    assert m["output_shapes"] == [[1, 1, s, s, s] for s in (64, 128, 256)] and m["forwards_per_stage"] == [2, 2, 2]
    if bench_doc["device"] == "cpu":
        assert "NOT measured" in bench_doc["gpu"]
        assert any("No GPU was lent" in n for n in bench_doc["notes"])
    assert bench_doc["loadavg_start"] and "Load average" in bench_doc["_md"]
    assert "| stage 2 (32³, incl. conditioning) |" in bench_doc["_md"] and "**total**" in bench_doc["_md"]


def test_probe_attribution_known_answer() -> None:
    """Segments between probe events with chosen timestamps (2 stages, 2 samples)."""
    bench = _load_bench()
    probe = bench.StageProbe([], bench.Device("cpu"))
    ev = [("start", 0, 0.0), ("enc", 1, 1.0), ("fwd", 1, 2.0), ("fwd", 1, 4.0), ("enc", 2, 5.0), ("fwd", 2, 7.0),
          ("fwd", 2, 10.0), ("say", 0, 11.0),                                      # sample 1
          ("enc", 1, 11.5), ("fwd", 1, 12.0), ("enc", 2, 12.5), ("fwd", 2, 13.5), ("say", 0, 14.0),  # sample 2
          ("end", 0, 14.25)]
    probe.events = ev
    seconds, forwards = probe.attribute(2)
    assert seconds == pytest.approx({"setup": 1.5, "stage1": 4.0 + 1.0, "stage2": 5.0 + 1.0,
                                     "hu_conversion": 1.0 + 0.5, "finalize": 0.25})
    assert sum(seconds.values()) == pytest.approx(14.25) and forwards == {1: 3, 2: 3}
    probe.events = [("start", 0, 0.0), ("enc", 2, 1.0)]  # stage 2 before stage 1: bookkeeping error
    with pytest.raises(RuntimeError, match="unexpected probe event order"):
        probe.attribute(2)
    # a batched forward of 4 sample rows counts as 4 evaluations
    probe.events, probe.rows = ev, {2: 4}
    assert probe.attribute(2)[1] == {1: 6, 2: 3}
