"""Hostile and broken inputs (issue 12): every one gets ``xct: error: <file>: <problem>``,
a non-zero exit, no traceback and nothing written.

* Header bombs run in a SUBPROCESS under ``RLIMIT_AS`` (2 GiB of address space; a normal
  ``xct ct info`` / ``xct reconstruct`` needs well under 1 GiB, the controls prove it): a
  reader that believed the header would allocate 3.4 GB … 149 GiB and die with MemoryError
  (or a traceback); the assertion is the limit's own message, not a timing.
* Garbage values run in-process with NumPy's RuntimeWarnings (ComplexWarning included)
  turned into errors: no warning may leak to the terminal.
* Known answers throughout: the bombs' claims are built here (1200³ int16 …), the expected
  numbers in the messages follow from them.
"""

from __future__ import annotations

import gzip
import io
import json
import os
import shutil
import signal
import stat
import struct
import subprocess
import sys
import warnings
import zlib
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import pydicom
import pytest
import torch
from dicom_synth import write_series, write_slice
from test_reconstruct import _args, env, xct  # noqa: F401 - env: the shared tiny-model fixture
from test_reconstruct_inputs import write_radiograph

from xct_core.config import LimitsParams, Params
from xct_core.errors import InputError

REPO = Path(__file__).resolve().parents[1]
#: address-space limit of the bomb subprocesses (torch's import maps ~0.6 GiB here)
AS_LIMIT = 2 << 30


# --------------------------------------------------------------------------- helpers


def one_line_error(code: int, err: str, *needles: str, want_code: int = 2) -> str:
    lines = err.strip().splitlines()
    assert code == want_code, (code, err)
    assert len(lines) == 1 and lines[0].startswith("xct: error: "), err
    assert "Traceback" not in err and "Aborted" not in err
    for n in needles:
        assert n in lines[0], (n, lines[0])
    return lines[0]


def run_limited(args: list[str], cwd: Path, limit: int = AS_LIMIT) -> subprocess.CompletedProcess:
    """``python -m pipelines.cli ARGS`` with RLIMIT_AS = ``limit`` (set inside the child
    before anything is imported); one thread per pool so the limit means the same everywhere."""
    boot = ("import resource, runpy, sys; "
            f"resource.setrlimit(resource.RLIMIT_AS, ({limit}, {limit})); "
            f"sys.argv = ['xct', *{args!r}]; runpy.run_module('pipelines.cli', run_name='__main__')")
    envv = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
            "OPENBLAS_NUM_THREADS": "1", "MALLOC_ARENA_MAX": "2"}
    return subprocess.run([sys.executable, "-c", boot], cwd=cwd, env=envv, capture_output=True, text=True,
                          timeout=300, check=False)


def nifti_bomb(path: Path, shape: tuple[int, ...], dtype: type = np.int16, payload: int = 16) -> Path:
    """A NIfTI header claiming ``shape`` of ``dtype`` followed by ``payload`` zero bytes (gzipped
    when the name ends in .gz): the file is tiny, the claim is not."""
    hdr = nib.Nifti1Header()
    hdr.set_data_shape(shape)
    hdr.set_data_dtype(dtype)
    hdr.set_qform(np.eye(4), code=1)
    hdr.set_sform(np.eye(4), code=1)
    raw = hdr.binaryblock + b"\0" * 4 + b"\0" * payload
    path.write_bytes(gzip.compress(raw) if path.name.endswith(".gz") else raw)
    return path


def npy_bomb(path: Path, shape: tuple[int, ...], dtype: Any = np.float32) -> Path:
    """A .npy header claiming ``shape`` followed by 64 bytes of data."""
    head = np.lib.format.header_data_from_array_1_0(np.zeros((1, 1), dtype))
    head["shape"] = shape
    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(buf, head)
    path.write_bytes(buf.getvalue() + b"\0" * 64)
    return path


def png_bomb(path: Path, width: int, height: int) -> Path:
    """A valid 8-bit grayscale PNG header claiming ``width`` x ``height``, one tiny IDAT."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64))
                     + chunk(b"IEND", b""))
    return path


def dicom_claims(path: Path, rows: int, cols: int) -> Path:
    """Rewrite a DICOM file's Rows/Columns (its pixel data stays small)."""
    ds = pydicom.dcmread(path)
    ds.Rows, ds.Columns = rows, cols
    ds.save_as(path, enforce_file_format=True)
    return path


def with_json(npy: Path, env: dict[str, Any], view: str = "frontal") -> Path:
    shutil.copyfile(env["xr"] / f"{view}.json", npy.with_suffix(".json"))
    return npy


# --------------------------------------------------------------------------- 1. memory bombs


@pytest.fixture(scope="module")
def bombs(env: dict[str, Any], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    d = tmp_path_factory.mktemp("bombs")
    raw = np.full((2, 8, 8), 1024, np.uint16)
    series = d / "series"
    write_series(series, raw)
    for f in series.iterdir():
        dicom_claims(f, 30000, 30000)
    # 43 slices, each header claiming 4096 x 4096 (16.8M pixels: within the limit one by one),
    # together 721M voxels > 2^29
    slice_bomb = d / "slices"
    slice_bomb.mkdir()
    for k in range(43):
        dicom_claims(write_slice(slice_bomb / f"s{k:02d}.dcm", np.zeros((8, 8), np.uint16), (0, 0, 2.5 * k)),
                     4096, 4096)
    p16 = env["params"].drr.pixel_mm
    dx = d / "dx.dcm"
    write_radiograph(dx, np.load(env["xr"] / "frontal.npy"), imager_spacing=(p16, p16))
    dicom_claims(dx, 30000, 30000)
    return {
        "nifti": nifti_bomb(d / "bomb.nii.gz", (1200, 1200, 1200)),
        "nifti_ratio": nifti_bomb(d / "ratio.nii.gz", (512, 512, 512)),  # within max_ct_voxels
        "nifti_short": nifti_bomb(d / "short.nii", (512, 512, 512)),
        "series": series,
        "slices": slice_bomb,
        "npy": with_json(npy_bomb(d / "bomb.npy", (200000, 200000)), env),
        "npy_short": with_json(npy_bomb(d / "short.npy", (16, 16)), env),
        "png": png_bomb(d / "bomb.png", 100000, 100000),  # beyond PIL's own bomb guard
        "png_ours": png_bomb(d / "ours.png", 9000, 9000),  # below PIL's guard, above ours
        "dicom_xray": dx,
        "root": d,
    }


CT_BOMBS = {
    "nifti": ["1200 x 1200 x 1200 = 1,728,000,000 voxels", "limits.max_ct_voxels (536,870,912)"],
    "nifti_ratio": ["256.0 MiB", "limits.max_compression_ratio 1032:1"],
    "nifti_short": ["corrupt or truncated", "268,435,456 bytes"],
    "series": ["30000 x 30000 = 900,000,000 pixels", "limits.max_ct_voxels"],
    "slices": ["4096 x 4096 x 43 = 721,420,288 voxels", "limits.max_ct_voxels"],
}
XRAY_BOMBS = {
    "npy": ["200000 x 200000 = 40,000,000,000 pixels", "limits.max_xray_pixels (67,108,864)"],
    "npy_short": ["corrupt or truncated", "1,024 bytes"],
    "png": ["PNG header claims too many pixels", "decompression bomb"],
    "png_ours": ["9000 x 9000 = 81,000,000 pixels", "limits.max_xray_pixels"],
    "dicom_xray": ["30000 x 30000", "limits.max_xray_pixels"],
}


@pytest.mark.parametrize("name", list(CT_BOMBS))
def test_ct_header_bombs_fail_in_bounded_memory(bombs: dict[str, Any], env: dict[str, Any], name: str) -> None:
    r = run_limited(["ct", "info", str(bombs[name]), "--params", str(env["pfile"])], bombs["root"])
    line = one_line_error(r.returncode, r.stderr, str(bombs[name]), *CT_BOMBS[name])
    assert "MemoryError" not in line


@pytest.mark.parametrize("name", list(XRAY_BOMBS))
def test_xray_header_bombs_fail_in_bounded_memory(bombs: dict[str, Any], env: dict[str, Any], name: str) -> None:
    out = bombs["root"] / f"{name}.nii.gz"
    r = run_limited(_args(env, out, frontal=bombs[name]), bombs["root"])
    line = one_line_error(r.returncode, r.stderr, str(bombs[name]), *XRAY_BOMBS[name])
    assert "MemoryError" not in line and not out.exists()


def test_the_memory_limit_leaves_room_for_real_work(bombs: dict[str, Any], env: dict[str, Any]) -> None:
    """Controls: the same commands on good inputs succeed under the same RLIMIT_AS."""
    r = run_limited(["ct", "info", str(env["cts"] / "pat0.nii.gz"), "--params", str(env["pfile"])], bombs["root"])
    assert r.returncode == 0 and "32 x 32 x 32" in r.stdout, r.stderr
    out = bombs["root"] / "control.nii.gz"
    r = run_limited(_args(env, out), bombs["root"])
    assert r.returncode == 0 and out.is_file(), r.stderr


def test_limits_come_from_params(env: dict[str, Any], tmp_path: Path) -> None:
    """A lowered limit in params refuses what the default accepts (the 32³ phantom)."""
    from xct_core.config import load_params, params_from_dict
    from xct_core.io import load_ct

    ct = env["cts"] / "pat0.nii.gz"
    assert load_ct(ct).shape == (32, 32, 32)
    with pytest.raises(InputError, match=r"32 x 32 x 32 = 32,768 voxels, more than limits.max_ct_voxels \(32,767\)"):
        load_ct(ct, limits=LimitsParams(max_ct_voxels=32767))
    data = env["params"].model_dump(mode="json")
    data["limits"] = {"max_xray_pixels": 255}
    p = params_from_dict(data)
    from xct_core.xray_io import load_xray

    with pytest.raises(InputError, match=r"16 x 16 = 256 pixels, more than limits.max_xray_pixels \(255\)"):
        load_xray(env["xr"] / "frontal.npy", "frontal", p)
    assert load_params(REPO / "params.yaml").limits == LimitsParams()  # params.yaml = the typed defaults


# --------------------------------------------------------------------------- 2. garbage values


def _no_numpy_warnings(args: list[str], capsys: pytest.CaptureFixture) -> tuple[int, str, str]:
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # ComplexWarning is one too
        return xct(args, capsys)


def test_garbage_drrs_are_refused_without_warnings(env: dict[str, Any], tmp_path: Path, capsys) -> None:
    good = np.load(env["xr"] / "frontal.npy")
    assert good.dtype == np.float32 and 0 <= good.min() and good.max() < 50
    cases = {
        "int32": ((good * 1000).astype(np.int32), "this .npy holds int32"),
        "complex": (good.astype(np.complex64), "this .npy holds complex64"),
        "bool": (good > 1, "this .npy holds bool"),
        "negative": (-good - 1.0, f"{good.size} below 0"),
        "x1e30": (good * np.float32(1e30), f"{good.size} above limits.max_line_integral 50"),
        "inf": (np.where(good > good.mean(), np.float32(np.inf), good), "non-finite pixels"),
    }
    for name, (arr, want) in cases.items():
        f = with_json(tmp_path / f"{name}.npy", env)
        np.save(f, arr)
        out = tmp_path / f"{name}.nii.gz"
        code, _, err = _no_numpy_warnings(_args(env, out, frontal=f), capsys)
        one_line_error(code, err, str(f), want)
        assert not list(tmp_path.glob(f"{name}.nii*")) and not list(tmp_path.glob(f"{name}*.qa.json")), name
    # float64 line integrals in range are fine (a real dtype, finite, 0 <= p <= 50)
    f = with_json(tmp_path / "f64.npy", env)
    np.save(f, good.astype(np.float64))
    code, _, err = _no_numpy_warnings(_args(env, tmp_path / "f64.nii.gz", frontal=f), capsys)
    assert code == 0, err


def test_line_integral_range_is_analytic() -> None:
    """0 <= p <= limits.max_line_integral, with float rounding of -ln(1) tolerated."""
    from xct_core.xray_io import LINE_INTEGRAL_ATOL, check_line_integrals

    p = Params()
    top = p.limits.max_line_integral
    ok = check_line_integrals("x", np.array([[0.0, top], [-LINE_INTEGRAL_ATOL / 2, 8.0]]), p)
    assert ok.dtype == np.float32 and ok.max() == top
    for bad, want in (([[0.0, top * 1.001]], "1 above"), ([[-2 * LINE_INTEGRAL_ATOL, 1.0]], "1 below 0"),
                      ([[1 + 1j, 0]], "complex128"), ([[np.nan, 0]], "1 non-finite pixels (1 NaN")):
        with pytest.raises(InputError, match=None) as ei:
            check_line_integrals("x", np.array(bad), p)
        assert want in str(ei.value), (bad, str(ei.value))


def test_reconstruction_check_is_analytic() -> None:
    from xct_core.qa import check_reconstruction

    p = Params()
    ramp = np.linspace(-1000.0, 500.0, 64).reshape(4, 4, 4)
    check_reconstruction(ramp, "m.pt", p)  # finite, 1500 HU of range
    check_reconstruction(np.r_[0.0, 1.0], "m.pt", p)  # exactly the 1 HU floor
    for vol, want in (
        (np.where(ramp > 0, np.nan, ramp), f"{int((ramp > 0).sum())} non-finite voxels ({int((ramp > 0).sum())} NaN, 0 Inf)"),
        (np.full((4, 4, 4), -1024.0), "degenerate reconstruction: every voxel is -1024 .. -1024 HU"),
        (np.r_[0.0, 0.5], "dynamic range 0.5 < limits.min_dynamic_range_hu 1"),
    ):
        with pytest.raises(InputError) as ei:
            check_reconstruction(vol, "m.pt", p)
        assert str(ei.value).startswith("m.pt: ") and want in str(ei.value), str(ei.value)


@pytest.mark.parametrize("kind", ["nan", "constant"])
def test_non_finite_or_degenerate_reconstruction_is_never_written(
    env: dict[str, Any], tmp_path: Path, capsys, monkeypatch: pytest.MonkeyPatch, kind: str
) -> None:
    """Whatever the network produces, a NaN or constant volume is an error naming the model
    file — in `xct reconstruct`, `xct evaluate` and the pyfunc alike — and nothing is written."""
    from xct_core import cascade

    real = cascade.sample_cascade

    def broken(*a: Any, **k: Any) -> list[torch.Tensor]:
        outs = real(*a, **k)
        last = torch.full_like(outs[-1], float("nan") if kind == "nan" else 0.25)
        return [*outs[:-1], last]

    monkeypatch.setattr(cascade, "sample_cascade", broken)
    model = env["train"] / "models" / "stage2" / "best.pt"
    want = "non-finite voxels" if kind == "nan" else "degenerate reconstruction"
    out = tmp_path / "ct.nii.gz"
    code, _, err = _no_numpy_warnings(_args(env, out), capsys)
    one_line_error(code, err, str(model), want)
    assert not list(tmp_path.iterdir())
    ev = tmp_path / "eval"
    code, _, err = _no_numpy_warnings(["evaluate", "--model", str(env["train"]), "--ct", str(env["cts"] / "pat1.nii.gz"),
                                       "--out", str(ev), "--params", str(env["pfile"])], capsys)
    assert code == 2 and err.strip().splitlines()[-1].startswith(f"xct: error: {model}: "), err
    assert want in err and not ev.exists()
    # the pyfunc's predict is the same call: it raises instead of returning the volume
    from components.xct_pyfunc import XctCascadeModel
    from xct_core.inference import load_stages

    m = XctCascadeModel()
    m.params, m.pixels = env["params"], env["params"].drr.pixels
    m.stages = load_stages([env["train"] / "models" / f"stage{k}" / "best.pt" for k in (1, 2)], env["params"])
    views = {v: np.load(env["xr"] / f"{v}.npy") for v in ("frontal", "lateral")}
    with pytest.raises(InputError, match=want):
        m.predict(None, views)
    with pytest.raises(ValueError, match="below 0"):  # and it checks its inputs like load_xray
        m.predict(None, {**views, "frontal": -views["frontal"] - 1})


# --------------------------------------------------------------------------- 3. broken model files


def _model_dir(env: dict[str, Any], root: Path, name: str, blob: Any = None, raw: bytes | None = None) -> Path:
    """A registered-layout model folder (stage1.pt + params.json) with a doctored stage 1."""
    d = root / name
    d.mkdir()
    (d / "params.json").write_text(env["params"].model_dump_json())
    if raw is not None:
        (d / "stage1.pt").write_bytes(raw)
    else:
        torch.save(blob, d / "stage1.pt")
    return d


class Evil:  # a pickled object: weights_only loading must refuse it
    pass


def test_broken_model_files_are_one_line(env: dict[str, Any], tmp_path: Path, capsys) -> None:
    good = torch.load(env["train"] / "models" / "stage1" / "best.pt", weights_only=True)
    first = next(k for k, v in good["state_dict"].items() if v.ndim > 1)
    shape = tuple(good["state_dict"][first].shape)

    def doctored(**changes: Any) -> dict:
        b = {**good, "state_dict": dict(good["state_dict"])}
        for k, v in changes.items():
            if k == "weights":
                b["state_dict"].update(v)
            elif v is None:
                b.pop(k)
            else:
                b[k] = v
        return b

    nan = good["state_dict"][first].clone().fill_(float("nan"))
    cases = {
        "empty": (dict(raw=b""), "empty file (0 bytes)"),
        "garbage": (dict(raw=b"not a checkpoint" * 8), "not a PyTorch weights file"),
        "truncated": (dict(raw=(env["train"] / "models" / "stage1" / "best.pt").read_bytes()[:5000]), "stage model ("),
        "pickle": (dict(blob={"format": "xct-stage-model/1", "obj": Evil()}), "pickled Python objects"),
        "shape": (dict(blob=doctored(weights={first: torch.zeros(3, 3)})),
                  f"{first} has shape (3, 3), the network needs {shape}"),
        "nan": (dict(blob=doctored(weights={first: nan})), f"{first} holds {nan.numel()} NaN/Inf"),
        "no params": (dict(blob=doctored(params=None)), "missing params"),
        "bad params": (dict(blob=doctored(params="{not json")), "params are not valid JSON"),
    }
    for name, (spec, want) in cases.items():
        d = _model_dir(env, tmp_path, name.replace(" ", "_"), **spec)
        out = tmp_path / f"{name.replace(' ', '_')}.nii.gz"
        code, _, err = xct([*_args(env, out, model=str(d)), "--stages", "1"], capsys)
        line = one_line_error(code, err, str(d / "stage1.pt"), want)
        assert "weights_only=False" not in line and "weights_only` set to `False" not in line, line
        assert "IndexError" not in line and not out.exists(), line


def test_training_checkpoint_errors_are_one_line(tmp_path: Path) -> None:
    from xct_core.checkpoint import load_state

    (tmp_path / "state.pt").write_bytes(b"")
    with pytest.raises(InputError, match="empty file"):
        load_state(tmp_path / "state.pt")
    torch.save({"x": Evil()}, tmp_path / "state.pt")
    with pytest.raises(InputError) as ei:
        load_state(tmp_path / "state.pt")
    assert "pickled Python objects" in str(ei.value) and "weights_only=False" not in str(ei.value)
    assert len(str(ei.value).splitlines()) == 1


# --------------------------------------------------------------------------- 4. empty .npy


def test_empty_npy_names_the_file(env: dict[str, Any], tmp_path: Path, capsys) -> None:
    f = with_json(tmp_path / "empty.npy", env)
    f.write_bytes(b"")
    code, _, err = xct(_args(env, tmp_path / "ct.nii.gz", frontal=f), capsys)
    one_line_error(code, err, str(f), "empty file (0 bytes)")


# --------------------------------------------------------------------------- 5. unwritable outputs


def test_unwritable_outputs_are_one_line_everywhere(env: dict[str, Any], tmp_path: Path, capsys) -> None:
    blocker = tmp_path / "afile"
    blocker.write_text("a file, not a folder")
    ct, p = str(env["cts"] / "pat0.nii.gz"), str(env["pfile"])
    good_out = tmp_path / "ok.npy"
    cases = {
        "drr --out": ["drr", ct, "--view", "frontal", "--out", str(blocker / "x.npy"), "--params", p],
        "drr --png": ["drr", ct, "--view", "frontal", "--out", str(good_out), "--png", str(blocker / "x.png"),
                      "--params", p],
        "ct convert": ["ct", "convert", ct, str(blocker / "x.nii.gz"), "--params", p],
        "reconstruct --out": _args(env, blocker / "ct.nii.gz"),
        "reconstruct --report": [*_args(env, tmp_path / "r" / "ct.nii.gz"), "--report", str(blocker / "r.html")],
        "data validate --report": ["data", "validate", str(env["cts"]), "--report", str(blocker / "r.json"),
                                   "--params", p],
        "evaluate --out": ["evaluate", "--model", str(env["train"]), "--ct", ct, "--out", str(blocker / "ev"),
                           "--params", p],
    }
    for name, args in cases.items():
        code, _, err = xct(args, capsys)
        one_line_error(code, err, str(blocker), "cannot write: a parent of this path is a file", want_code=2)
        assert blocker.read_text() == "a file, not a folder", name
    assert not any(p.name.startswith(".") for p in tmp_path.rglob("*")), "temporary files left behind"


# --------------------------------------------------------------------------- 6. file modes of the MLflow copies


def _modes(root: Path) -> tuple[set[int], set[int]]:
    files = {stat.S_IMODE(p.stat().st_mode) for p in root.rglob("*") if p.is_file()}
    dirs = {stat.S_IMODE(p.stat().st_mode) for p in [root, *root.rglob("*")] if p.is_dir()}
    return files, dirs


def test_models_and_their_mlflow_copies_get_umask_modes(env: dict[str, Any], tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """Under umask 027: exported models 0640, their folders 0750 — and the same for the copies
    MLflow keeps (a training run's logged best.pt/final.pt, the registered model's artifacts)."""
    from test_evaluate import export_tiny_stages

    from components.register import register_cascade
    from components.tracking import MetricLogger, get_client

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    old = os.umask(0o027)
    try:
        files = export_tiny_stages(tmp_path / "train", env["params"], seed=3)
        assert {stat.S_IMODE(f.stat().st_mode) for f in files} == {0o640}
        assert _modes(tmp_path / "train")[1] == {0o750}
        client = get_client(uri)
        exp = client.create_experiment("modes", artifact_location=(tmp_path / "mlruns").as_uri())
        run = client.create_run(exp).info.run_id
        logger = MetricLogger(run, uri)
        for k, f in enumerate(files, start=1):  # what components/train.py does with best.pt / final.pt
            logger.artifact(str(f), f"model/stage{k}")
        register_cascade(tmp_path / "train", {2: {"psnr_window_db": 20.0, "test_ids_hash": "t"}}, {}, env["params"],
                         tracking_uri=uri)
    finally:
        os.umask(old)
    runs = tmp_path / "mlruns"
    pts = list(runs.rglob("*.pt"))
    assert len(pts) == 4, pts  # 2 logged by the run + 2 registered artifacts
    assert {stat.S_IMODE(p.stat().st_mode) for p in pts} == {0o640}
    # everything MLflow wrote (MLmodel, params.json, requirements …) too; copies of the repo's
    # source (code_paths, the pyfunc file) keep their checkout's mode, as any copy does
    src = {p for p in runs.rglob("*") if p.is_file() and (p.suffix == ".py" or "code" in p.relative_to(runs).parts)}
    written = {stat.S_IMODE(p.stat().st_mode) for p in runs.rglob("*") if p.is_file() and p not in src}
    assert written == {0o640}, sorted(map(oct, written))
    pyfunc = next(p for p in src if p.name == "xct_pyfunc.py")
    assert stat.S_IMODE(pyfunc.stat().st_mode) == stat.S_IMODE((REPO / "components" / "xct_pyfunc.py").stat().st_mode)
    assert _modes(runs)[1] == {0o750}, sorted(map(oct, _modes(runs)[1]))


# --------------------------------------------------------------------------- 7. symlinks in S3 sync


@pytest.fixture
def s3(aws_env: dict, tmp_path_factory: pytest.TempPathFactory):
    from moto_server import MotoServer

    with MotoServer(tmp_path_factory.mktemp("moto")) as m:
        m.client().create_bucket(Bucket="xct-links")
        yield m


def test_s3_sync_stays_inside_its_folder(s3: Any, tmp_path: Path, capsys, monkeypatch: pytest.MonkeyPatch) -> None:
    from test_s3 import FAST, FAST_YAML

    from components import s3sync

    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret.txt").write_text("not for upload")
    (outside / "deep").mkdir()
    (outside / "deep" / "d.txt").write_text("nor this")
    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    (src / "a.txt").write_text("a")
    (src / "sub" / "b.txt").write_text("b")
    (src / "link.txt").symlink_to(outside / "secret.txt")
    (src / "sub" / "linkdir").symlink_to(outside / "deep", target_is_directory=True)
    url = "s3://xct-links/p"
    rep = s3sync.push(src, url, FAST, endpoint_url=s3.url)
    keys = sorted(o["Key"] for o in s3.client().list_objects_v2(Bucket="xct-links")["Contents"])
    assert keys == ["p/a.txt", "p/sub/b.txt"], keys
    assert rep.symlinks_skipped == ["link.txt", "sub/linkdir"] and "2 symlink(s) skipped" in rep.summary()
    params = tmp_path / "params.yaml"
    params.write_text(FAST_YAML)
    code, out, err = xct(["data", "push", str(src), url, "--endpoint-url", s3.url, "--params", str(params)], capsys)
    assert code == 0 and "symlink(s) skipped" in out
    assert f"xct: warning: {src / 'link.txt'}: symlink skipped" in err and f"{src / 'sub' / 'linkdir'}: symlink" in err

    # pull: a destination sub-folder that is a symlink elsewhere is refused before anything lands
    dest = tmp_path / "dest"
    dest.mkdir()
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (dest / "sub").symlink_to(elsewhere, target_is_directory=True)
    with pytest.raises(InputError, match="is a symlink") as ei:
        s3sync.pull(url, dest, FAST, endpoint_url=s3.url)
    assert ei.value.path == str(dest / "sub")
    assert list(elsewhere.iterdir()) == [] and sorted(p.name for p in dest.iterdir()) == ["sub"]
    code, _, err = xct(["data", "pull", url, str(dest), "--endpoint-url", s3.url, "--params", str(params)], capsys)
    one_line_error(code, err, str(dest / "sub"), "never writes through symlinks")
    # a file that is a symlink is refused too; a plain destination works
    (dest / "sub").unlink()
    (dest / "a.txt").symlink_to(outside / "secret.txt")
    with pytest.raises(InputError, match="is a symlink"):
        s3sync.pull(url, dest, FAST, endpoint_url=s3.url)
    assert (outside / "secret.txt").read_text() == "not for upload"
    rep = s3sync.pull(url, tmp_path / "plain", FAST, endpoint_url=s3.url)
    assert rep.transferred == 2 and (tmp_path / "plain" / "sub" / "b.txt").read_text() == "b"


@pytest.fixture
def aws_env(monkeypatch: pytest.MonkeyPatch, tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    from moto_server import isolate_aws_env

    return isolate_aws_env(monkeypatch, tmp_path_factory.mktemp("aws"))


# --------------------------------------------------------------------------- 9. interrupts


def test_ctrl_c_prints_interrupted_exits_130_and_leaves_nothing(env: dict[str, Any], tmp_path: Path) -> None:
    """SIGINT to a real `xct reconstruct` in its sampling loop (64 samples x 20 steps: the later
    batches are to come when the first batch's line arrives; the loop is bounded)."""
    out = tmp_path / "out" / "ct.nii.gz"
    args = [*_args(env, out), "--samples", "64", "--steps", "20"]
    proc = subprocess.Popen([sys.executable, "-m", "pipelines.cli", *args], cwd=tmp_path, stderr=subprocess.PIPE,
                            stdout=subprocess.DEVNULL, text=True,
                            env={**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"},
                            # a child of a shell job may inherit SIGINT ignored: restore Python's Ctrl-C
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))  # noqa: PLW1509
    try:
        seen = []
        for line in proc.stderr:  # type: ignore[union-attr]
            seen.append(line)
            if line.startswith("samples 1-"):  # the first batch of samples is done
                proc.send_signal(signal.SIGINT)
                break
        rest = proc.stderr.read()  # type: ignore[union-attr]
        code = proc.wait(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert any(s.startswith("samples 1-") for s in seen), "".join(seen)
    assert "-64/64" not in rest, "the run finished before the interrupt"
    assert code == 130 and rest.strip().splitlines()[-1] == "xct: interrupted", rest
    assert "Traceback" not in rest and "Aborted" not in rest
    assert not (tmp_path / "out").exists() or not list((tmp_path / "out").iterdir())


# --------------------------------------------------------------------------- 10. batch tolerance


def test_evaluate_folder_evaluates_the_good_and_lists_every_bad(env: dict[str, Any], tmp_path: Path, capsys) -> None:
    cts = tmp_path / "cts"
    cts.mkdir()
    for name in ("pat0", "pat1"):
        shutil.copyfile(env["cts"] / f"{name}.nii.gz", cts / f"{name}.nii.gz")
    nifti_bomb(cts / "bomb.nii.gz", (1200, 1200, 1200))
    (cts / "junk.nii.gz").write_bytes(b"not gzip at all")
    (cts / "README.txt").write_text("notes")
    out = tmp_path / "ev"
    code, _, err = xct(["evaluate", "--model", str(env["train"]), "--ct", str(cts), "--out", str(out),
                             "--params", str(env["pfile"])], capsys)
    assert code == 1, err
    errors = [ln for ln in err.splitlines() if ln.startswith("xct: error: ")]
    assert errors[0].startswith(f"xct: error: {cts / 'bomb.nii.gz'}: header claims 1200 x 1200 x 1200")
    assert errors[1].startswith(f"xct: error: {cts / 'junk.nii.gz'}: not a readable NIfTI file")
    assert "2 of 4 CT(s) could not be loaded" in errors[2] and len(errors) == 3
    assert f"xct: note: {cts / 'README.txt'}: ignored" in err and "Traceback" not in err
    doc = json.loads((out / "metrics.json").read_text())
    assert [p["id"] for p in doc["patients"]] == ["pat0", "pat1"] and doc["n_patients"] == 2
    assert [d["path"] for d in doc["not_evaluated"]] == [str(cts / "bomb.nii.gz"), str(cts / "junk.nii.gz")]
    assert sorted(p.name for p in (out / "recon").iterdir()) == ["pat0.nii.gz", "pat1.nii.gz"]
    assert "not evaluated (could not be loaded)" in (out / "report.html").read_text()
    # nothing loads: every reason listed, exit 2, nothing written
    for name in ("pat0", "pat1"):
        (cts / f"{name}.nii.gz").unlink()
    code, _, err = xct(["evaluate", "--model", str(env["train"]), "--ct", str(cts), "--out", str(tmp_path / "ev2"),
                        "--params", str(env["pfile"])], capsys)
    errors = [ln for ln in err.splitlines() if ln.startswith("xct: error: ")]
    assert code == 2 and len(errors) == 3 and "none of the 2 CT(s) could be loaded" in errors[-1], err
    assert not (tmp_path / "ev2").exists()


def test_data_validate_names_the_files_it_ignores(env: dict[str, Any], tmp_path: Path, capsys) -> None:
    raw = tmp_path / "raw"
    raw.mkdir()
    shutil.copyfile(env["cts"] / "pat0.nii.gz", raw / "pat0.nii.gz")
    (raw / "README.txt").write_text("notes")
    (raw / "scan.jpg").write_bytes(b"\xff\xd8\xff")
    report = tmp_path / "rep.json"
    code, _, err = xct(["data", "validate", str(raw), "--report", str(report), "--params", str(env["pfile"])], capsys)
    notes = [ln for ln in err.splitlines() if ln.startswith("xct: note: ")]
    assert notes == [f"xct: note: {raw / 'README.txt'}: ignored (neither a .nii/.nii.gz file nor part of a DICOM series)",
                     f"xct: note: {raw / 'scan.jpg'}: ignored (neither a .nii/.nii.gz file nor part of a DICOM series)"]
    assert "2 other file(s) ignored" in err and code in (0, 1)
    assert json.loads(report.read_text())["ignored_files"] == [str(raw / "README.txt"), str(raw / "scan.jpg")]


# --------------------------------------------------------------------------- 11. read-only commands create nothing


def test_read_only_registry_commands_create_no_store(env: dict[str, Any], tmp_path: Path, capsys,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    from components import tracking

    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    db = work / "mlflow.db"
    monkeypatch.setattr(tracking, "DEFAULT_TRACKING_URI", f"sqlite:///{db}")
    code, out, err = xct(["models", "list"], capsys)
    assert code == 0 and out.strip() == f"no model registry at sqlite:///{db} yet: no versions of xct-cascade " \
                                         "(nothing registered)", (out, err)
    code, _, err = xct(["models", "promote", "1"], capsys)
    one_line_error(code, err, "no model registry at")
    code, _, err = xct(_args(env, tmp_path / "ct.nii.gz", model="models:/xct-cascade@champion"), capsys)
    one_line_error(code, err, "does not resolve", "no tracking store there yet")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", (work / "mlruns").as_uri())
    code, out, _ = xct(["models", "list"], capsys)
    assert code == 0 and out.startswith("no model registry at file:")
    assert list(work.iterdir()) == [] and not (tmp_path / "ct.nii.gz").exists()
