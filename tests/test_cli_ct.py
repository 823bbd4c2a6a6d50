"""`xct ct info` / `xct ct convert` through the real console entry point (subprocess)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from dicom_synth import write_nifti, write_series

from xct_core.io import load_ct

XCT = [sys.executable, "-m", "pipelines.cli", "ct"]


def run(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(XCT + [str(a) for a in args], capture_output=True, text=True, cwd=cwd, timeout=120)


def _lps_nifti(path: Path) -> Path:
    data = np.full((4, 5, 6), 40, np.int16)
    data[0, 0, 0] = -1000
    data[3, 4, 5] = 1200
    aff = np.diag([-0.5, -0.75, 2.0, 1.0])
    aff[:3, 3] = [10.0, 20.0, -30.0]
    return write_nifti(path, data, aff)


def test_info_text_and_json(tmp_path: Path, repo_root: Path) -> None:
    src = _lps_nifti(tmp_path / "lps.nii.gz")
    out = run(["info", src], repo_root)
    assert out.returncode == 0, out.stderr
    assert "shape:        4 x 5 x 6 (canonical RAS+)" in out.stdout
    assert "spacing_mm:   0.5 x 0.75 x 2" in out.stdout
    assert "source LPS → RAS" in out.stdout
    assert "min -1000.0" in out.stdout and "max 1200.0" in out.stdout
    assert "affine (voxel → world mm, RAS+)" in out.stdout

    js = run(["info", src, "--json"], repo_root)
    assert js.returncode == 0, js.stderr
    d = json.loads(js.stdout)
    assert d["shape"] == [4, 5, 6] and d["orientation"] == "RAS" and d["source_orientation"] == "LPS"
    assert d["hu"]["min"] == -1000.0 and d["hu"]["max"] == 1200.0 and d["hu"]["p50"] == 40.0
    # canonical voxel (0,0,0) is source voxel (3,4,0), at world (10 - 0.5·3, 20 - 0.75·4, -30)
    expect = [[0.5, 0, 0, 8.5], [0, 0.75, 0, 17.0], [0, 0, 2, -30.0], [0, 0, 0, 1]]
    np.testing.assert_allclose(np.array(d["affine"]), expect)


def test_convert_dicom_series_to_canonical_nifti(tmp_path: Path, repo_root: Path) -> None:
    s, r, c = np.meshgrid(np.arange(5), np.arange(8), np.arange(9), indexing="ij")
    raw = (1000 + 3 * c + 11 * r + 97 * s).astype(np.uint16)
    series = tmp_path / "series"
    write_series(series, raw, pixel_spacing=(0.9, 0.7), gap=3.0)
    dst = tmp_path / "out" / "ct.nii.gz"
    out = run(["convert", series, dst], repo_root)
    assert out.returncode == 0, out.stderr
    assert f"wrote {dst}" in out.stdout
    assert sorted(p.name for p in dst.parent.iterdir()) == ["ct.nii.gz"]  # atomic: no temp left
    ref, back = load_ct(series), load_ct(dst)
    assert back.meta["source_orientation"] == ("R", "A", "S")  # written canonical
    assert np.abs(back.hu - ref.hu).max() <= 0.5
    np.testing.assert_allclose(back.affine, ref.affine, atol=1e-4)


@pytest.mark.parametrize("case", ["missing", "truncated", "4d", "mixed", "bad_out"])
def test_bad_input_one_line_error_naming_the_file(tmp_path: Path, repo_root: Path, case: str) -> None:
    if case == "missing":
        bad, args = tmp_path / "missing.nii.gz", ["info", tmp_path / "missing.nii.gz"]
    elif case == "truncated":
        good = _lps_nifti(tmp_path / "g.nii.gz").read_bytes()
        bad = tmp_path / "trunc.nii.gz"
        bad.write_bytes(good[: len(good) // 2])
        args = ["info", bad]
    elif case == "4d":
        bad = write_nifti(tmp_path / "four.nii.gz", np.zeros((4, 5, 6, 3), np.int16), np.eye(4))
        args = ["info", bad]
    elif case == "mixed":
        bad = tmp_path / "mixed"
        write_series(bad, np.full((3, 4, 4), 1024, np.uint16), series_uid="1.2.3.1")
        write_series(bad, np.full((3, 4, 4), 1024, np.uint16), series_uid="1.2.3.2", shuffle_seed=5)
        args = ["convert", bad, tmp_path / "o.nii.gz"]
    else:
        src = _lps_nifti(tmp_path / "ok.nii.gz")
        bad = tmp_path / "out.txt"
        args = ["convert", src, bad]
    out = run(args, repo_root)
    assert out.returncode != 0
    assert "Traceback" not in out.stderr + out.stdout
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1, out.stderr
    assert lines[0].startswith("xct: error: ") and str(bad) in lines[0]
