"""Pipeline step 2 — validate: the Great Expectations suite (real GX runs, no mocks) catches each
bad-input case with its reason; fail/quarantine policies; the `xct data validate` contract."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from dicom_synth import write_nifti

from components.ingest import run_ingest
from cli_run import xct
from components.kfp_components import validate_component
from components.validate import render_html, run_validate, validate_dir
from xct_core.config import Params, params_from_dict

N, SP = 20, 6.0  # 120 mm per axis: above the default min_extent_mm (100) and min_shape (16)
GOOD = ("good_a", "good_b", "good_c", "good_d")
AFF = np.diag([SP, SP, SP, 1.0])


def torso(seed: int, n: int = N) -> np.ndarray:
    """HU (float64): air around an elliptic soft-tissue body with noise and a 700 HU spine."""
    rng = np.random.default_rng(seed)
    x, y, _ = np.mgrid[:n, :n, :n].astype(np.float64)
    c = (n - 1) / 2
    hu = np.full((n, n, n), -1000.0)
    body = (x - c) ** 2 / (0.4 * n) ** 2 + (y - c) ** 2 / (0.3 * n) ** 2 <= 1
    hu[body] = np.rint(40 + rng.normal(0, 10, int(body.sum())))
    hu[(abs(x - c) < 2) & (abs(y - c + 3) < 2)] = 700
    return hu


#: bad case → (file, words its reason must contain)
EXPECTED = {
    "nan": ["load error", "non-finite", "3 NaN voxels"],
    "four_d": ["load error", "4D data"],
    "raw_unsigned": ["not HU: minimum 24 > -500 HU, no air"],
    "spacing": ["absurd voxel spacing 20 x 20 x 20 mm"],
    "truncated": ["load error", "corrupt or truncated"],
    "good_a_copy": ["duplicate of good_a (same file)"],
    "good_b_resaved": ["duplicate of good_b (same voxel data)"],
    "tiny": ["too small for the stage grid: 8 x 8 x 8 voxels", "extent 16 x 16 x 16 mm"],
}


def make_raw(raw: Path, bad: bool = True) -> Path:
    raw.mkdir(parents=True)
    for i, name in enumerate(GOOD):
        write_nifti(raw / f"{name}.nii.gz", torso(i).astype(np.int16), AFF)
    if not bad:
        return raw
    nan = torso(10).astype(np.float32)
    nan[1, 2, 3] = nan[4, 5, 6] = nan[7, 8, 9] = np.nan
    write_nifti(raw / "nan.nii.gz", nan, AFF)
    write_nifti(raw / "four_d.nii.gz", np.stack([torso(11), torso(11)], -1).astype(np.int16), AFF)
    write_nifti(raw / "raw_unsigned.nii.gz", (torso(12) + 1024).astype(np.uint16), AFF)  # stored values, no rescale
    write_nifti(raw / "spacing.nii.gz", torso(13).astype(np.int16), np.diag([20.0, 20.0, 20.0, 1.0]))
    write_nifti(raw / "t.nii.gz", torso(14).astype(np.int16), AFF)
    data = (raw / "t.nii.gz").read_bytes()
    (raw / "t.nii.gz").unlink()
    (raw / "truncated.nii.gz").write_bytes(data[: len(data) * 2 // 3])
    shutil.copyfile(raw / "good_a.nii.gz", raw / "good_a_copy.nii.gz")
    write_nifti(raw / "good_b_resaved.nii", torso(1).astype(np.float32), AFF)  # other bytes, same voxels
    write_nifti(raw / "tiny.nii.gz", torso(15, n=8).astype(np.int16), np.diag([2.0, 2.0, 2.0, 1.0]))
    (raw / "README.txt").write_text("not a CT")
    return raw


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("validate")
    raw = make_raw(root / "raw")
    run_ingest(raw, root / "interim", Params())
    return raw, root / "interim"


@pytest.fixture(scope="module")
def report(dataset: tuple[Path, Path]):
    return validate_dir(dataset[1], Params())


def test_each_bad_case_is_caught_with_its_reason(report, dataset: tuple[Path, Path]) -> None:
    raw, _ = dataset
    vols = {v["id"]: v for v in report.volumes}
    assert set(vols) == set(GOOD) | set(EXPECTED)
    for vid in GOOD:
        assert vols[vid]["passed"] and vols[vid]["reasons"] == [], vols[vid]
    for vid, words in EXPECTED.items():
        v = vols[vid]
        assert not v["passed"], vid
        text = "; ".join(v["reasons"])
        for w in words:
            assert w in text, f"{vid}: {w!r} not in {text!r}"
        assert v["path"].startswith(str(raw / vid))
    assert not report.success
    # the raw unsigned volume loads (no HU check in io fires for a 120 mm volume): only GX catches it
    assert not any("load error" in r for r in vols["raw_unsigned"]["reasons"])


def test_per_expectation_results_name_the_failing_volumes(report) -> None:
    exp = {e["name"]: e for e in report.expectations}
    assert exp["loaded"]["failed_ids"] == ["four_d", "nan", "truncated"]
    assert exp["no_nan"]["failed_ids"] == ["nan"] and exp["no_nan"]["type"] == "expect_column_values_to_be_between"
    assert exp["hu_min_has_air"]["failed_ids"] == ["raw_unsigned"]
    assert exp["spacing_max"]["failed_ids"] == ["spacing"] and exp["spacing_max"]["kwargs"]["max_value"] == 10.0
    assert exp["not_duplicate"]["failed_ids"] == ["good_a_copy", "good_b_resaved"]
    assert exp["shape_x"]["failed_ids"] == ["tiny"] and exp["extent_z"]["failed_ids"] == ["tiny"]
    assert exp["volume_file"]["success"] and exp["unique_id"]["success"] and exp["no_inf"]["success"]
    assert report.to_dict()["statistics"]["n_failed"] == len(EXPECTED)


def test_thresholds_come_from_params(dataset: tuple[Path, Path]) -> None:
    p = params_from_dict({"validation": {"max_spacing_mm": 25.0, "min_shape": [4, 4, 4], "min_extent_mm": [10, 10, 10]}})
    vols = {v["id"]: v for v in validate_dir(dataset[1], p).volumes}
    assert vols["spacing"]["passed"] and vols["tiny"]["passed"]
    assert not vols["raw_unsigned"]["passed"]


def test_file_checks_catch_a_volume_changed_after_ingest(dataset: tuple[Path, Path], tmp_path: Path) -> None:
    interim = tmp_path / "interim"
    shutil.copytree(dataset[1], interim)
    (interim / "volumes" / "good_c.nii.gz").write_bytes(b"oops")
    (interim / "volumes" / "good_d.nii.gz").unlink()
    vols = {v["id"]: v for v in validate_dir(interim, Params()).volumes}
    assert vols["good_c"]["reasons"] == ["canonical volume volumes/good_c.nii.gz: checksum mismatch (changed after ingest)"]
    assert vols["good_d"]["reasons"] == ["canonical volume volumes/good_d.nii.gz: missing"]


def test_quarantine_keeps_the_good_volumes(dataset: tuple[Path, Path], tmp_path: Path) -> None:
    raw, interim = dataset
    before = json.loads((interim / "splits.json").read_text())["volumes"]
    loaded_bad = {"raw_unsigned", "spacing", "good_a_copy", "good_b_resaved", "tiny"}
    assert loaded_bad <= {v for ids in before.values() for v in ids}  # ingest split them: quarantine must drop them
    out = tmp_path / "validated"
    rep = run_validate(interim, out, params_from_dict({"validation": {"policy": "quarantine"}}))
    splits = json.loads((out / "splits.json").read_text())
    kept = {v for ids in splits["volumes"].values() for v in ids}
    assert kept == set(GOOD)
    assert splits["quarantined"] == sorted(EXPECTED) == rep.quarantined
    assert "absurd voxel spacing" in splits["excluded"]["spacing"]
    doc = json.loads((out / "report.json").read_text())
    assert doc["policy"] == "quarantine" and doc["statistics"]["n_failed"] == len(EXPECTED)
    html = (out / "report.html").read_text()
    assert "FAILED" in html and "duplicate of good_a (same file)" in html and "Quarantined" in html


def test_fail_policy_exits_non_zero_and_withholds_the_split(dataset: tuple[Path, Path], tmp_path: Path, capsys) -> None:
    out = tmp_path / "validated"
    out.mkdir()
    (out / "splits.json").write_text("{}")  # stale output from an earlier run must not survive
    rc = xct(["step", "validate", "--interim", str(dataset[1]), "--out", str(out), "--params", str(tmp_path / "none.yaml")])
    assert rc == 2 and "params file not found" in capsys.readouterr().err
    (tmp_path / "p.yaml").write_text("validation:\n  policy: fail\n")
    rc = xct(["step", "validate", "--interim", str(dataset[1]), "--out", str(out), "--params", str(tmp_path / "p.yaml")])
    assert rc == 1
    assert not (out / "splits.json").exists() and (out / "report.json").is_file()
    err = capsys.readouterr().err
    assert sum(line.startswith(str(dataset[0])) for line in err.splitlines()) == len(EXPECTED)
    rc = xct(["step", "validate", "--interim", str(dataset[1]), "--out", str(out), "--params", str(tmp_path / "p.yaml"),
                        "--policy", "quarantine"])  # fmt: skip
    assert rc == 0 and (out / "splits.json").is_file()


def test_kfp_component_raises_under_fail_policy(dataset: tuple[Path, Path], tmp_path: Path) -> None:
    from types import SimpleNamespace

    from kfp import compiler

    compiler.Compiler().compile(validate_component, str(tmp_path / "validate.yaml"))
    assert "image: xct-light:0.1.0" in (tmp_path / "validate.yaml").read_text()
    validated = SimpleNamespace(path=str(tmp_path / "v"), metadata={})
    html = SimpleNamespace(path=str(tmp_path / "h" / "report.html"))
    with pytest.raises(RuntimeError, match="data validation failed for 8 volume"):
        validate_component.python_func(interim=SimpleNamespace(path=str(dataset[1])), validated=validated,
                                       report_html=html, params_yaml="{validation: {policy: fail}, ingest: {body_hu: -500.0}}")  # fmt: skip
    res = validate_component.python_func(interim=SimpleNamespace(path=str(dataset[1])), validated=validated,
                                         report_html=html, params_yaml="{validation: {policy: quarantine}, ingest: {body_hu: -500.0}}")  # fmt: skip
    assert (res.passed, res.n_failed) == (False, 8) and validated.metadata["quarantined"] == sorted(EXPECTED)
    assert Path(html.path).read_text().startswith("<!DOCTYPE html>")


def test_html_escapes_reasons(report) -> None:
    report.volumes[0]["reasons"] = ["<script>"]
    report.volumes[0]["passed"] = False
    assert "&lt;script&gt;" in render_html(report) and "<script>" not in render_html(report)


def _xct(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "GX_ANALYTICS_ENABLED": "false", "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    return subprocess.run([sys.executable, "-m", "pipelines.cli", "data", "validate", *args],
                          capture_output=True, text=True, cwd=cwd, env=env, timeout=300)  # fmt: skip


def test_cli_validate_exit_codes_and_one_line_per_failing_file(dataset: tuple[Path, Path], tmp_path: Path) -> None:
    raw, _ = dataset
    out = _xct(str(raw), "--report", str(tmp_path / "r.json"), cwd=tmp_path)
    assert out.returncode == 1, out.stderr
    lines = out.stdout.splitlines()
    assert len(lines) == len(EXPECTED)
    for vid, words in EXPECTED.items():
        (line,) = [x for x in lines if x.startswith(f"{raw / vid}.nii")]
        assert all(w in line for w in words), line
    assert "4 of 12 volumes passed validation" in out.stderr
    assert json.loads((tmp_path / "r.json").read_text())["success"] is False
    assert (tmp_path / "r.html").is_file()


def _xct_in_process(*args: str, capsys: pytest.CaptureFixture) -> tuple[int, str, str]:
    """The same CLI entry point in-process (saves a subprocess start and GX import)."""
    from pipelines.cli import main

    with pytest.raises(SystemExit) as e:
        main(["data", "validate", *args])
    out = capsys.readouterr()
    return int(e.value.code or 0), out.out, out.err


def test_cli_validate_passes_clean_data_and_rejects_a_missing_dir(tmp_path: Path, capsys) -> None:
    good = make_raw(tmp_path / "good", bad=False)
    rc, out, err = _xct_in_process(str(good), "--report", str(tmp_path / "ok.json"), capsys=capsys)
    assert (rc, out) == (0, ""), err
    assert "4 of 4 volumes passed validation" in err
    assert json.loads((tmp_path / "ok.json").read_text())["success"] is True
    rc, out, err = _xct_in_process(str(tmp_path / "nope"), capsys=capsys)
    assert rc == 2 and err.count("\n") == 1 and "nope: no such directory" in err


def test_gx_exceptions_are_surfaced_not_read_as_a_verdict() -> None:
    from components.validate import _gx_error

    assert _gx_error({"raised_exception": False, "exception_message": None}) is None
    assert _gx_error({"metric-1": {"raised_exception": True, "exception_message": "column x missing"}}) == "column x missing"
