"""`xct data synth`: the command contract scripts rely on.

``xct data synth --n N --size S --seed K --out DIR [--spacing-mm MM]`` writes N int16
NIfTI phantoms with a canonical RAS+ affine centred at the world origin, plus
``preview.png`` and ``phantoms.json``; bad arguments give one line on stderr and a
non-zero exit, never a traceback.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import yaml
from PIL import Image

from pipelines.cli import main
from xct_core.phantoms import canonical_affine

XCT = [sys.executable, "-m", "pipelines.cli"]


@pytest.fixture(autouse=True)
def isolated_params(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Built-in defaults via $XCT_PARAMS, so the tests do not depend on the checkout's params.yaml."""
    p = tmp_path / "defaults.yaml"
    p.write_text("{}\n")
    monkeypatch.setenv("XCT_PARAMS", str(p))
    return p


def xct(args: list[str], capsys: pytest.CaptureFixture) -> tuple[int, str, str]:
    """Run the CLI in-process through its real entry point: (exit code, stdout, stderr)."""
    with pytest.raises(SystemExit) as e:
        main(args)
    out = capsys.readouterr()
    code = e.value.code if isinstance(e.value.code, int) else (0 if e.value.code is None else 1)
    return code, out.out, out.err


def test_synth_writes_ras_int16_phantoms_and_preview(tmp_path: Path, repo_root: Path) -> None:
    out_dir = tmp_path / "synth"
    args = ["data", "synth", "--n", "2", "--size", "32", "--spacing-mm", "12.8", "--seed", "7", "--out", str(out_dir)]
    res = subprocess.run(XCT + args, capture_output=True, text=True, cwd=repo_root, timeout=300)
    assert res.returncode == 0, res.stderr
    assert "wrote 2 phantoms" in res.stdout
    names = sorted(p.name for p in out_dir.iterdir())
    assert names == ["phantom_0000.nii.gz", "phantom_0001.nii.gz", "phantoms.json", "preview.png"]
    for name in names[:2]:
        img = nib.load(out_dir / name)
        assert img.get_data_dtype() == np.int16
        assert img.shape == (32, 32, 32)
        assert nib.aff2axcodes(img.affine) == ("R", "A", "S")
        np.testing.assert_allclose(img.affine, canonical_affine(32, 12.8), atol=1e-4)
        np.testing.assert_allclose(img.affine @ [15.5, 15.5, 15.5, 1.0], [0, 0, 0, 1], atol=1e-4)
        assert int(img.header["qform_code"]) == 1 and int(img.header["sform_code"]) == 1
        hu = np.asarray(img.dataobj)
        assert hu.min() >= -1024 and hu.max() > 300  # air and bone present
    manifest = json.loads((out_dir / "phantoms.json").read_text())
    assert [e["file"] for e in manifest["phantoms"]] == names[:2]
    assert manifest["params"]["seed"] == 7 and manifest["params"]["spacing_mm"] == 12.8
    assert Image.open(out_dir / "preview.png").format == "PNG"


def test_synth_is_deterministic_and_prefix_stable(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    def synth(n: int, seed: int, out: str) -> int:
        args = ["--n", str(n), "--seed", str(seed), "--out", str(tmp_path / out), "--size", "24", "--spacing-mm", "16"]
        return xct(["data", "synth", *args, "--no-preview"], capsys)[0]

    assert synth(3, 3, "a") == 0 and synth(2, 3, "b") == 0 and synth(2, 4, "c") == 0
    for i in range(2):
        name = f"phantom_{i:04d}.nii.gz"
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
        assert (tmp_path / "a" / name).read_bytes() != (tmp_path / "c" / name).read_bytes()
    assert not (tmp_path / "a" / "preview.png").exists()


def test_synth_defaults_come_from_params(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    raw = tmp_path / "raw"
    params = tmp_path / "params.yaml"
    params.write_text(
        yaml.safe_dump({"data": {"raw_dir": str(raw), "synth": {"n": 1, "size": 20, "spacing_mm": 20.0, "seed": 5}}})
    )
    code, out, err = xct(["data", "synth", "--params", str(params), "--no-preview"], capsys)
    assert code == 0, err
    img = nib.load(raw / "phantom_0000.nii.gz")
    assert img.shape == (20, 20, 20)
    np.testing.assert_allclose(img.header.get_zooms(), (20.0, 20.0, 20.0))
    assert not (raw / "phantom_0001.nii.gz").exists()


@pytest.mark.parametrize(
    "extra, needle",
    [
        (["--n", "0"], "--n"),
        (["--size", "8"], "--size"),
        (["--seed", "-1"], "--seed"),
        (["--spacing-mm", "0"], "--spacing-mm"),
        (["--contrast-fraction", "1.5"], "--contrast-fraction"),
        (["--noise-hu", "-3"], "--noise-hu"),
    ],
)
def test_synth_bad_values_are_one_line_errors(
    tmp_path: Path, capsys: pytest.CaptureFixture, extra: list[str], needle: str
) -> None:
    code, out, err = xct(["data", "synth", "--out", str(tmp_path / "o"), "--n", "1", "--size", "16", *extra], capsys)
    assert code != 0
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("xct: error:") and needle in lines[0], err
    assert "Traceback" not in err + out
    assert not list((tmp_path).glob("o/*.nii.gz"))


@pytest.mark.parametrize("sub", ["", "sub"])
def test_synth_unusable_out_dir_is_a_one_line_error(tmp_path: Path, capsys: pytest.CaptureFixture, sub: str) -> None:
    blocker = tmp_path / "a_file"
    blocker.write_text("not a directory")
    target = blocker / sub if sub else blocker
    code, out, err = xct(["data", "synth", "--n", "1", "--size", "16", "--out", str(target)], capsys)
    assert code != 0
    lines = err.strip().splitlines()
    assert len(lines) == 1 and str(target) in lines[0] and "directory" in lines[0], err
    assert "Traceback" not in err + out
