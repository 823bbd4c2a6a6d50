"""`xct drr`: outputs (.npy + .json + PNG), re-rendering from the JSON, one-line errors
without partial output."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from PIL import Image

from pipelines.cli import main
from xct_core.drr import render
from xct_core.geometry import PlacedGeometry


@pytest.fixture(scope="module")
def phantom(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """40³ × 5 mm: water ball (r 70 mm) in air with a bone bead on the patient's right."""
    n, sp = 40, 5.0
    aff = np.diag([sp, sp, sp, 1.0])
    aff[:3, 3] = -(n - 1) / 2 * sp
    c = (np.arange(n) - (n - 1) / 2) * sp
    X, Y, Z = np.meshgrid(c, c, c, indexing="ij")
    hu = np.full((n, n, n), -1000.0)
    hu[X**2 + Y**2 + Z**2 < 70**2] = 0.0
    hu[(X - 40) ** 2 + Y**2 + (Z - 20) ** 2 < 12**2] = 1500.0
    img = nib.Nifti1Image(hu.astype(np.int16), aff)
    img.set_qform(aff, code=1)
    img.set_sform(aff, code=1)
    path = tmp_path_factory.mktemp("ct") / "phantom.nii.gz"
    nib.save(img, str(path))
    return path


def xct(args: list[str], capsys: pytest.CaptureFixture) -> tuple[int, str, str]:
    """Run the CLI in-process through its console entry point."""
    try:
        main(args)
        code = 0
    except SystemExit as e:
        code = int(e.code or 0)
    out = capsys.readouterr()
    return code, out.out, out.err


def test_writes_npy_json_png_and_rerenders(phantom: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "d" / "frontal.npy"
    png = tmp_path / "d" / "frontal.png"
    code, stdout, err = xct(
        ["drr", str(phantom), "--view", "frontal", "--geometry", "cone", "--out", str(out), "--pixels", "48",
         "--pixel-mm", "6", "--sdd", "1200", "--sod", "800", "--png", str(png)],
        capsys,
    )
    assert code == 0, err
    assert "wrote" in stdout
    arr = np.load(out)
    assert arr.dtype == np.float32 and arr.shape == (48, 48)
    meta = json.loads(out.with_suffix(".json").read_text())
    for key in ("view", "kind", "pixels", "pixel_mm", "sdd", "sod", "mu_water", "quantity", "source", "det_center",
                "u_axis", "v_axis", "isocenter", "beam"):
        assert key in meta, key
    assert (meta["view"], meta["kind"], meta["pixels"], meta["sdd"], meta["sod"]) == ("frontal", "cone", 48, 1200.0, 800.0)
    assert meta["quantity"] == "line_integral" and meta["mu_water"] == 0.02
    assert meta["source_side"] == "anterior" and meta["source"][1] == pytest.approx(800.0)
    assert meta["ct"]["shape"] == [40, 40, 40] and len(meta["ct"]["sha256"]) == 64
    # the JSON is enough to re-render the same image
    vol = nib.load(meta["ct"]["path"])
    pg = PlacedGeometry.from_json(meta)
    again = render(np.asarray(vol.dataobj, dtype=np.float32), np.array(meta["ct"]["affine"]), pg, mu_water=meta["mu_water"])
    np.testing.assert_allclose(arr, again.numpy(), rtol=1e-5, atol=1e-6)
    # ball of water: centre line integral ≈ 2 · 0.02 · 70 (the bead is off-centre)
    assert arr[23:25, 23:25].mean() == pytest.approx(2.8, rel=0.03)
    # bone bead on the patient's right, superior → upper-left quadrant of the PA display
    bead = np.unravel_index(np.argmax(arr - arr[:, ::-1]), arr.shape)
    assert bead[0] < 24 and bead[1] < 24
    with Image.open(png) as im:
        assert im.size == (48, 48) and im.mode == "L"
    assert sorted(p.name for p in out.parent.iterdir()) == ["frontal.json", "frontal.npy", "frontal.png"]


def test_intensity_quantity(phantom: Path, tmp_path: Path, capsys) -> None:
    common = ["drr", str(phantom), "--view", "lateral", "--geometry", "parallel", "--pixels", "32", "--pixel-mm", "7"]
    assert xct(common + ["--out", str(tmp_path / "p.npy")], capsys)[0] == 0
    assert xct(common + ["--out", str(tmp_path / "i.npy"), "--quantity", "intensity"], capsys)[0] == 0
    p, i = np.load(tmp_path / "p.npy"), np.load(tmp_path / "i.npy")
    np.testing.assert_allclose(i, np.exp(-p), rtol=1e-6)
    assert json.loads((tmp_path / "i.json").read_text())["quantity"] == "intensity"


def test_defaults_come_from_params(phantom: Path, tmp_path: Path, capsys) -> None:
    params = tmp_path / "params.yaml"
    params.write_text("drr:\n  geometry: parallel\n  pixels: 24\n  pixel_mm: 9.0\nhu:\n  mu_water: 0.03\n")
    out = tmp_path / "o.npy"
    code, _, err = xct(["drr", str(phantom), "--view", "frontal", "--out", str(out), "--params", str(params)], capsys)
    assert code == 0, err
    meta = json.loads(out.with_suffix(".json").read_text())
    assert (meta["kind"], meta["pixels"], meta["pixel_mm"], meta["mu_water"]) == ("parallel", 24, 9.0, 0.03)


@pytest.mark.parametrize(
    "args, needle",
    [
        (["--view", "frontal", "CT:missing"], "no such file or directory"),
        (["--view", "sideways"], "--view must be one of frontal, lateral"),
        (["--view", "frontal", "--sod", "1600", "--sdd", "1500"], "must be smaller than sdd"),
        (["--view", "frontal", "--geometry", "fan"], "--geometry must be one of"),
        (["--view", "frontal", "--quantity", "log"], "--quantity must be one of"),
        (["--view", "frontal", "--pixels", "2"], "invalid --pixels"),
    ],
)
def test_bad_input_is_one_line_without_output(phantom: Path, tmp_path: Path, capsys, args: list[str], needle: str) -> None:
    ct = str(tmp_path / "missing.nii.gz") if "CT:missing" in args else str(phantom)
    args = [a for a in args if a != "CT:missing"]
    out_dir = tmp_path / "out"
    code, _, err = xct(["drr", ct, "--out", str(out_dir / "x.npy"), "--png", str(out_dir / "x.png"), *args], capsys)
    assert code != 0
    assert needle in err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("xct: error:") and "Traceback" not in err
    assert not out_dir.exists() or not any(out_dir.iterdir())


def test_console_error_has_no_traceback(repo_root: Path, tmp_path: Path) -> None:
    """The real process: exit code 2, one line on stderr, nothing written."""
    out = tmp_path / "x.npy"
    proc = subprocess.run(
        [sys.executable, "-m", "pipelines.cli", "drr", str(tmp_path / "nope.nii.gz"), "--view", "frontal", "--out", str(out)],
        capture_output=True, text=True, cwd=repo_root, timeout=120,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip() == f"xct: error: {tmp_path / 'nope.nii.gz'}: no such file or directory"
    assert not out.exists()
