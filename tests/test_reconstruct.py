"""`xct reconstruct` / `xct evaluate` on a tiny untrained two-stage cascade (16³ → 32³, 16-px DRRs).

Random-weight stage models exported with the real exporter, inputs rendered by `xct drr`
from procedural phantoms. The checks have known answers: the output grid/affine from the
input geometry, the K-sample mean/std equal to the mean/std of K single runs with the
documented seeds, the PNG intensity → line-integral mapping, the same volume from a
registered model URI as from the training folder it was registered from, one-line errors.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import pytest
import yaml
from PIL import Image

from pipelines.cli import main
from test_evaluate import export_tiny_stages
from train_fixtures import tiny_params
from xct_core.io import grid_affine, save_nifti
from xct_core.phantoms import make_phantom


def xct(args: list[str], capsys: pytest.CaptureFixture) -> tuple[int, str, str]:
    try:
        main(args)
        code = 0
    except SystemExit as e:
        code = int(e.code or 0)
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Tiny params file, a training folder (with direct.pt), a registered-layout folder,
    two phantom CTs and their `xct drr` inputs (CT 0 centred off the origin)."""
    import contextlib
    import io

    root = tmp_path_factory.mktemp("recon")
    params = tiny_params(eval={"sample_steps": 1}, reconstruct={"qa_min_psnr_db": 99.0})
    pfile = root / "params.yaml"
    pfile.write_text(yaml.safe_dump(params.model_dump(mode="json")))
    train = root / "train"
    export_tiny_stages(train, params, seed=0, direct=True)
    reg = root / "registered"
    reg.mkdir()
    for k in (1, 2):
        shutil.copyfile(train / "models" / f"stage{k}" / "best.pt", reg / f"stage{k}.pt")
    (reg / "params.json").write_text(params.model_dump_json())
    cts = root / "cts"
    cts.mkdir()
    for i in range(2):
        hu, _, aff = make_phantom(32, 409.6 / 32, i)
        if i == 0:
            aff = aff.copy()
            aff[:3, 3] += [10.0, -20.0, 30.0]
        save_nifti(cts / f"pat{i}.nii.gz", hu, aff)
    xr = root / "xr"
    with contextlib.redirect_stdout(io.StringIO()):
        for view in ("frontal", "lateral"):
            for args in ([], ["--pixels", "8", "--pixel-mm", "80"]):
                tag = "small_" if args else ""
                try:
                    main(["drr", str(cts / "pat0.nii.gz"), "--view", view, "--out", str(xr / f"{tag}{view}.npy"),
                          "--params", str(pfile), *args])
                except SystemExit as e:
                    assert not e.code
    return {"root": root, "params": params, "pfile": pfile, "train": train, "reg": reg, "cts": cts, "xr": xr}


def _args(env: dict[str, Any], out: Path, *extra: str, model: str | None = None,
          frontal: Path | None = None, lateral: Path | None = None) -> list[str]:
    return ["reconstruct", "--model", model or str(env["train"]), "--frontal", str(frontal or env["xr"] / "frontal.npy"),
            "--lateral", str(lateral or env["xr"] / "lateral.npy"), "--out", str(out), "--params", str(env["pfile"]),
            "--seed", "5", *extra]


def test_reconstruct_npy_writes_nifti_with_input_affine_and_qa(env: dict[str, Any], tmp_path: Path, capsys) -> None:
    out = tmp_path / "ct.nii.gz"
    code, stdout, err = xct(_args(env, out), capsys)
    assert code == 0, err
    img = nib.load(str(out))
    assert img.shape == (32, 32, 32) and img.get_data_dtype() == np.int16
    iso = json.loads((env["xr"] / "frontal.json").read_text())["isocenter"]
    want = grid_affine((32, 32, 32), 409.6 / 32, iso)
    np.testing.assert_allclose(img.affine, want, atol=1e-3)
    # the isocentre of an off-origin CT is its own centre: the output sits where the CT is
    ct = nib.load(str(env["cts"] / "pat0.nii.gz"))
    np.testing.assert_allclose(ct.affine[:3, :3] @ (np.array(ct.shape) - 1) / 2 + ct.affine[:3, 3], iso, atol=1e-3)
    assert not (tmp_path / "ct_std.nii.gz").exists()
    qa = json.loads((tmp_path / "ct.qa.json").read_text())
    assert set(qa["reprojection"]["views"]) == {"frontal", "lateral"}
    for v in qa["reprojection"]["views"].values():
        assert math.isfinite(v["psnr_db"]) and -1 <= v["ssim"] <= 1
    assert qa["sampling"] == {"steps": 1, "samples": 1, "seeds": [5], "eta": 0.0}
    # threshold set above any PSNR here (99 dB): the QA warns on stderr, one line per view
    warn = [ln for ln in err.splitlines() if ln.startswith("xct: warning: reprojection QA")]
    assert len(warn) == 2 and qa["reprojection"]["passed"] is False
    hu = np.asarray(img.dataobj)
    w = env["params"].hu.net_map()  # the networks' HU range (the map inverse of [-1, 1])
    assert hu.min() >= w.lo - 1 and hu.max() <= w.hi + 1


def test_samples_mean_and_std_equal_single_runs(env: dict[str, Any], tmp_path: Path, capsys) -> None:
    from xct_core.inference import load_stages, reconstruct

    out = tmp_path / "ct.nii.gz"
    code, _, err = xct(_args(env, out, "--samples", "3"), capsys)
    assert code == 0, err
    std = np.asarray(nib.load(str(tmp_path / "ct_std.nii.gz")).dataobj, dtype=np.float32)
    assert std.shape == (32, 32, 32) and std.max() > 0 and std.min() >= 0
    # known answer: K = 3 is the mean / sample std (ddof 1) of single runs with seeds 5, 6, 7
    p = env["params"]
    nets = load_stages([env["train"] / "models" / f"stage{k}" / "best.pt" for k in (1, 2)], p)
    f = np.load(env["xr"] / "frontal.npy")
    lat = np.load(env["xr"] / "lateral.npy")
    singles = np.stack([reconstruct(nets, p, f, lat, samples=1, seed=s).mean_hu for s in (5, 6, 7)])
    p1 = p.model_copy(update={"reconstruct": p.reconstruct.model_copy(update={"sample_batch": 1})})
    rec = reconstruct(nets, p1, f, lat, samples=3, seed=5)  # one sample at a time
    np.testing.assert_allclose(rec.mean_hu, singles.mean(0), atol=1e-3)
    # batched (the default: all three in one batch, each row with its own seed's generator):
    # the same samples up to float32 rounding of batched convolutions (~1e-5 network units; a unit is
    # up to ~2000 HU in the steep part of the soft60 map, so 1e-4 of the map's HU span)
    assert p.reconstruct.sample_batch >= 3
    tol = 1e-4 * (p.hu.net_map().hi - p.hu.net_map().lo)
    batched = reconstruct(nets, p, f, lat, samples=3, seed=5)
    np.testing.assert_allclose(batched.mean_hu, singles.mean(0), atol=tol)
    np.testing.assert_allclose(batched.std_hu, singles.std(0, ddof=1), atol=tol)
    np.testing.assert_allclose(rec.std_hu, singles.std(0, ddof=1), atol=1e-3)
    mean = np.asarray(nib.load(str(out)).dataobj, dtype=np.float32)
    # the command ran batched (the default): its files are the batched mean / std up to int16 rounding
    np.testing.assert_allclose(mean, batched.mean_hu, atol=0.51)
    np.testing.assert_allclose(std, batched.std_hu, atol=0.51)
    # no calibration (a training folder carries none): one line says so, raw std, no interval
    assert sum("no calibration" in ln for ln in err.splitlines()) == 1
    assert not (tmp_path / "ct_lo.nii.gz").exists() and not (tmp_path / "ct_hi.nii.gz").exists()
    assert b"raw sample std" in nib.load(str(tmp_path / "ct_std.nii.gz")).header["descrip"].tobytes()


def test_calibration_gives_recalibrated_std_and_conformal_interval(env: dict[str, Any], tmp_path: Path,
                                                                   capsys) -> None:
    """A val-fitted calibration.json for this stage and K: std = s · sample std, _lo/_hi =
    point ∓ q · max(sample std, floor); for another K it is not applied (one line, raw std);
    without --samples its K is the default."""
    from xct_core.calibration import Calibration

    cal = tmp_path / "calibration.json"
    cal.write_text(json.dumps(Calibration(stage=2, samples=3, level=0.9, q=1.5, sigma_scale=2.0, floor_hu=1.0,
                                          quantiles={"0.9": 1.5}).to_json()))
    raw_out = tmp_path / "raw" / "ct.nii.gz"
    assert xct(_args(env, raw_out, "--samples", "3"), capsys)[0] == 0
    out = tmp_path / "ct.nii.gz"
    code, _, err = xct(_args(env, out, "--samples", "3", "--calibration", str(cal)), capsys)
    assert code == 0, err
    assert "calibrated on val" in err

    def vol(p: Path) -> np.ndarray:
        return np.asarray(nib.load(str(p)).dataobj, dtype=np.float32)

    raw_std, std, mean = vol(tmp_path / "raw" / "ct_std.nii.gz"), vol(tmp_path / "ct_std.nii.gz"), vol(out)
    np.testing.assert_allclose(std, 2.0 * raw_std, atol=1.51)  # int16 rounding of both files
    half = 1.5 * np.maximum(raw_std, 1.0)
    np.testing.assert_allclose(vol(tmp_path / "ct_lo.nii.gz"), mean - half, atol=1.6)
    np.testing.assert_allclose(vol(tmp_path / "ct_hi.nii.gz"), mean + half, atol=1.6)
    assert b"recalibrated std" in nib.load(str(tmp_path / "ct_std.nii.gz")).header["descrip"].tobytes()
    assert b"90% conformal interval lower" in nib.load(str(tmp_path / "ct_lo.nii.gz")).header["descrip"].tobytes()
    qa = json.loads((tmp_path / "ct.qa.json").read_text())
    assert qa["uncertainty"]["calibration"]["sigma_scale"] == 2.0 and qa["outputs"]["lo"].endswith("ct_lo.nii.gz")
    other = tmp_path / "k2" / "ct.nii.gz"
    code, _, err = xct(_args(env, other, "--samples", "2", "--calibration", str(cal)), capsys)
    assert code == 0 and "at K = 3, this run is stage 2 at K = 2" in err
    assert not (tmp_path / "k2" / "ct_lo.nii.gz").exists()
    # no --samples: the K the calibration was fitted at (3, not reconstruct.samples), so the interval is written
    dflt = tmp_path / "default" / "ct.nii.gz"
    code, _, err = xct(_args(env, dflt, "--calibration", str(cal)), capsys)
    assert code == 0 and "calibrated on val" in err, err
    assert json.loads((tmp_path / "default" / "ct.qa.json").read_text())["sampling"]["samples"] == 3
    np.testing.assert_array_equal(vol(dflt), mean)
    np.testing.assert_array_equal(vol(tmp_path / "default" / "ct_lo.nii.gz"), vol(tmp_path / "ct_lo.nii.gz"))
    bad = tmp_path / "bad.json"
    bad.write_text("{}")
    code, _, err = xct(_args(env, tmp_path / "b" / "ct.nii.gz", "--samples", "3", "--calibration", str(bad)), capsys)
    assert code != 0 and "bad.json" in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "b" / "ct.nii.gz").exists()


def test_png_input_maps_intensity_to_line_integrals(env: dict[str, Any], tmp_path: Path, capsys) -> None:
    from xct_core.xray_io import load_xray

    pngs = {}
    for view in ("frontal", "lateral"):
        p = np.load(env["xr"] / f"{view}.npy")
        inten = np.clip(np.rint(np.exp(-p) * 65535), 0, 65535).astype(np.uint16)
        pngs[view] = tmp_path / f"{view}.png"
        Image.fromarray(inten).save(pngs[view])
        x = load_xray(pngs[view], view, env["params"])
        assert x.fmt == "png" and x.geometry is None
        ok = np.exp(-p) > 1e-3  # where 16-bit quantisation is fine: |Δp| <= 0.5/65535/I
        np.testing.assert_allclose(x.image[ok], p[ok], atol=0.5 / 65535 / 1e-3 + 1e-6)
    out = tmp_path / "png.nii.gz"
    rep = tmp_path / "rep" / "png.html"
    code, _, err = xct(_args(env, out, "--report", str(rep), frontal=pngs["frontal"], lateral=pngs["lateral"]), capsys)
    assert code == 0, err
    srcs = [s.split('"')[0] for s in rep.read_text().split('<img src="')[1:]]
    assert len(srcs) == 2 and all((rep.parent / s).is_file() for s in srcs)  # slices + input vs reprojection
    img = nib.load(str(out))
    # PNG carries no geometry: the grid is centred at the world origin
    np.testing.assert_allclose(img.affine, grid_affine((32,) * 3, 12.8, (0, 0, 0)), atol=1e-3)
    assert json.loads((tmp_path / "png.qa.json").read_text())["inputs"]["frontal"]["format"] == "png"


def _bad_cases(env: dict[str, Any], tmp: Path) -> dict[str, tuple[list[str], str]]:
    xr = env["xr"]
    nojson = tmp / "nojson.npy"
    shutil.copyfile(xr / "frontal.npy", nojson)
    nan = tmp / "nan.npy"
    a = np.load(xr / "frontal.npy")
    a[3, 4] = np.nan
    np.save(nan, a)
    shutil.copyfile(xr / "frontal.json", tmp / "nan.json")
    junk = tmp / "junk.npy"
    junk.write_bytes(b"not a numpy file")
    shutil.copyfile(xr / "frontal.json", tmp / "junk.json")
    o = str(tmp / "ct.nii.gz")
    return {
        "missing geometry JSON": (_args(env, Path(o), frontal=nojson), "missing geometry JSON"),
        "wrong size": (_args(env, Path(o), frontal=xr / "small_frontal.npy"), "geometry differs"),
        "swapped views": (_args(env, Path(o), frontal=xr / "lateral.npy", lateral=xr / "frontal.npy"),
                          "says view 'lateral' but it was given as --frontal"),
        "NaN pixels": (_args(env, Path(o), frontal=nan), "non-finite pixels (1 NaN"),
        "unreadable": (_args(env, Path(o), frontal=junk), "unreadable .npy"),
        "missing file": (_args(env, Path(o), frontal=tmp / "nope.npy"), "no such file"),
        "bad model path": (_args(env, Path(o), model=str(tmp / "no-model")), "model not found"),
        "bad models uri": (_args(env, Path(o), model="models:/no-such-model@champion"), "does not resolve"),
        "not nifti out": (_args(env, tmp / "ct.npy"), "--out must name a NIfTI"),
    }


def test_bad_inputs_one_line_error_no_output(env: dict[str, Any], tmp_path: Path, capsys,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'empty.db'}")
    for name, (args, msg) in _bad_cases(env, tmp_path).items():
        code, _, err = xct(args, capsys)
        lines = err.strip().splitlines()
        assert code == 2, (name, err)
        assert len(lines) == 1 and lines[0].startswith("xct: error:") and msg in lines[0], (name, err)
        assert "Traceback" not in err
        assert not list(tmp_path.glob("ct*")), name
    # an image of the wrong size under a geometry that claims it: the image check speaks
    bad = tmp_path / "size.npy"
    np.save(bad, np.zeros((8, 8), np.float32))
    shutil.copyfile(env["xr"] / "frontal.json", tmp_path / "size.json")
    code, _, err = xct(_args(env, tmp_path / "ct.nii.gz", frontal=bad), capsys)
    assert code == 2 and "image is 8x8 pixels, the model's detector is 16x16" in err


def test_evaluate_two_cts_metrics_baselines_and_report(env: dict[str, Any], tmp_path: Path, capsys) -> None:
    out = tmp_path / "eval"
    code, stdout, err = xct(["evaluate", "--model", str(env["train"]), "--ct", str(env["cts"]), "--out", str(out),
                             "--params", str(env["pfile"]), "--samples", "2", "--gates", str(tmp_path / "none")],
                            capsys)
    assert code == 0, err
    doc = json.loads((out / "metrics.json").read_text())
    assert doc["n_patients"] == 2 and [p["id"] for p in doc["patients"]] == ["pat0", "pat1"]
    assert doc["has_direct"] is True and "leave-one-out" in doc["baseline"]
    for key in ("psnr_hu_db", "psnr_window_db", "ssim_window", "mae_hu", "reproj_psnr_frontal_db",
                "psnr_slice_avg_db", "baseline_psnr_hu_db", "baseline_psnr_window_db", "direct_psnr_window_db",
                "upsampled_psnr_window_db", "gain_over_upsampled_db", "uncertainty_mean_std_hu"):
        for row in [doc["mean"], *doc["patients"]]:
            assert isinstance(row[key], float) and math.isfinite(row[key]), key
    assert doc["mean"]["psnr_hu_db"] == pytest.approx(np.mean([p["psnr_hu_db"] for p in doc["patients"]]))
    # leave-one-out mean of two CTs = the other CT (on its stage grid); like every prediction it is
    # windowed before the HU metrics (evaluation protocol), so its MAE is known in closed form
    from xct_core.evaluation import ct_case
    from xct_core.io import load_ct

    t = [ct_case(f"pat{i}", load_ct(env["cts"] / f"pat{i}.nii.gz"), env["params"], 2).target_hu.astype(np.float64) for i in (0, 1)]
    w = env["params"].hu.net_map()  # the mean volume as the networks could output it
    for i in (0, 1):
        want = np.abs(np.clip(t[1 - i], w.lo, w.hi) - np.clip(t[i], -1024, 1024)).mean()
        assert doc["patients"][i]["baseline_mae_hu"] == pytest.approx(want, rel=1e-4)
    html = (out / "report.html").read_text()
    srcs = [s.split('"')[0] for s in html.split('<img src="')[1:]]
    assert len(srcs) >= 4 and all((out / s).is_file() for s in srcs)
    assert "mean volume" in html and "direct regression" in html and "pat1" in html
    assert "<th>previous stage upsampled</th>" in html and doc["has_upsampled"] is True  # stage 2 beside stage 1
    assert doc["protocol"]["upsampled_*"].startswith("the previous stage upsampled: stage 1's point estimate")
    from xct_core.metrics import ssim_taps  # the SSIM label names the taps used on the evaluated grid

    p = env["params"]
    assert f"σ {p.eval.ssim_sigma:g}, {ssim_taps(p.stage(2).size, p.eval.ssim_win)}³, range 2" in html
    assert (out / "recon" / "pat0.nii.gz").is_file() and (out / "per_patient.csv").read_text().count("\n") == 3
    # K = 2: the calibration plot is in the report; no calibration.json in a training folder: one note, raw metrics
    assert "Uncertainty calibration" in html and "images/calibration.png" in srcs
    assert sum("no calibration" in ln for ln in err.splitlines()) == 1
    assert "spread_skill" in doc["mean"] and "conformal_coverage" not in doc["mean"]
    assert len(doc["calibration_curve"]["rank_histogram"]) == 3


@pytest.mark.timeout(120)
def test_registered_model_uri_resolves_through_mlflow(env: dict[str, Any], tmp_path: Path, capsys,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    from components.register import register_cascade

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    gate = tmp_path / "stage1.json"
    gate.write_text(json.dumps({"stage": 1, "passed": True, "checks": []}))
    from xct_core.calibration import Calibration

    ev = tmp_path / "eval" / "stage2"  # the evaluate step's folder: metrics.json + the val-fitted calibration.json
    ev.mkdir(parents=True)
    (ev / "metrics.json").write_text(json.dumps({"psnr_window_db": 20.0, "test_ids_hash": "x"}))
    (ev / "calibration.json").write_text(json.dumps(
        Calibration(stage=2, samples=2, level=0.9, q=1.7, sigma_scale=1.3, floor_hu=1.0).to_json()))
    r = register_cascade(env["train"], {2: {"psnr_window_db": 20.0, "test_ids_hash": "x"}}, {1: gate},
                         env["params"], tracking_uri=uri, eval_files={2: ev / "metrics.json"})
    assert r.alias == "champion"
    # the registered model carries the calibration: K = 2 from models:/ writes the interval
    code, _, err = xct(_args(env, tmp_path / "k2" / "ct.nii.gz", "--samples", "2", model="models:/xct-cascade@champion"),
                       capsys)
    assert code == 0, err
    assert (tmp_path / "k2" / "ct_lo.nii.gz").is_file() and (tmp_path / "k2" / "ct_hi.nii.gz").is_file()
    assert json.loads((tmp_path / "k2" / "ct.qa.json").read_text())["uncertainty"]["calibration"]["q"] == 1.7
    # ... and without --samples that K is the default (its interval holds there)
    code, _, err = xct(_args(env, tmp_path / "dk" / "ct.nii.gz", model="models:/xct-cascade@champion"), capsys)
    assert code == 0, err
    assert json.loads((tmp_path / "dk" / "ct.qa.json").read_text())["sampling"]["samples"] == 2
    assert (tmp_path / "dk" / "ct_lo.nii.gz").is_file()
    a, b = tmp_path / "a.nii.gz", tmp_path / "b.nii.gz"  # the same model, the same K: the same volume
    code, _, err = xct(_args(env, a, "--samples", "3", model="models:/xct-cascade@champion"), capsys)
    assert code == 0, err
    code, _, err = xct(_args(env, b, "--samples", "3", model=str(env["reg"])), capsys)  # the registered layout, locally
    assert code == 0, err
    np.testing.assert_array_equal(np.asarray(nib.load(str(a)).dataobj), np.asarray(nib.load(str(b)).dataobj))
    assert json.loads((tmp_path / "a.qa.json").read_text())["model"]["layout"] == "registered"
    code, _, err = xct(_args(env, tmp_path / "c.nii.gz", model="models:/xct-cascade@nosuchalias"), capsys)
    assert code == 2 and "does not resolve" in err and not (tmp_path / "c.nii.gz").exists()
