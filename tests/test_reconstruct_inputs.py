"""`xct reconstruct` inputs not covered by tests/test_reconstruct.py: DICOM radiographs and
``runs:/`` model URIs.

DICOM: real DX/CR files written with pydicom from a DRR of a phantom (the ``env`` fixture's
`xct drr` output), so the loader's answer is known: ``p = −ln(stored / (2**BitsStored − 1))``
(MONOCHROME1 inverted first) must give back the DRR's line integrals to within the 16/12-bit
quantisation, and the pixel pitch read from the header (ImagerPixelSpacing, else
PixelSpacing) must be the DRR's ``pixel_mm``. runs:/: tiny models logged as run artifacts
to a sqlite MLflow store in tmp; the volume must equal the one from the same files locally.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import pytest
from pydicom.dataset import FileDataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from dicom_synth import write_slice
from test_reconstruct import _args, env, xct  # noqa: F401 - env is the shared tiny-model fixture
from xct_core.errors import InputError
from xct_core.io import grid_affine

DX_STORAGE = "1.2.840.10008.5.1.4.1.1.1.1"  # Digital X-Ray Image Storage - For Presentation
CR_STORAGE = "1.2.840.10008.5.1.4.1.1.1"  # Computed Radiography Image Storage


def write_radiograph(
    path: Path,
    p: np.ndarray,
    *,
    bits: int = 16,
    photometric: str = "MONOCHROME2",
    modality: str = "DX",
    imager_spacing: Sequence[float] | None = None,
    pixel_spacing: Sequence[float] | None = None,
) -> np.ndarray:
    """A projection radiograph of line integrals ``p``: stored = rint(exp(−p)·(2**bits − 1)),
    inverted for MONOCHROME1; spacings in mm (None: element absent). Returns the stored array."""
    full = 2**bits - 1
    inten = np.clip(np.rint(np.exp(-p.astype(np.float64)) * full), 0, full).astype(np.uint16)
    stored = (full - inten).astype(np.uint16) if photometric == "MONOCHROME1" else inten
    sop = DX_STORAGE if modality == "DX" else CR_STORAGE
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = FileDataset(str(path), {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID = sop
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.Modality = modality
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.ImageType = ["ORIGINAL", "PRIMARY"]
    if imager_spacing is not None:
        ds.ImagerPixelSpacing = [f"{v:g}" for v in imager_spacing]
    if pixel_spacing is not None:
        ds.PixelSpacing = [f"{v:g}" for v in pixel_spacing]
    ds.Rows, ds.Columns = stored.shape
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = photometric
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, bits, bits - 1, 0
    ds.RescaleSlope, ds.RescaleIntercept, ds.RescaleType = "1", "0", "US"  # identity (DX Image module)
    # DICOM PS3.3 C.8.11.3.1.2: the Sign, not the PhotometricInterpretation, says which way the values
    # run; the MONOCHROME1 file here stores full - I (higher values = less intensity): Sign -1
    ds.PixelIntensityRelationship = "LIN"
    ds.PixelIntensityRelationshipSign = -1 if photometric == "MONOCHROME1" else 1
    ds.PixelData = stored.tobytes()
    ds.save_as(path, enforce_file_format=True)
    return stored


def _drr(env: dict[str, Any], view: str) -> tuple[np.ndarray, float]:
    """The `xct drr` line integrals of a view and the detector pitch its JSON records."""
    return np.load(env["xr"] / f"{view}.npy"), float(json.loads((env["xr"] / f"{view}.json").read_text())["pixel_mm"])


# --------------------------------------------------------------------------- DICOM radiographs


@pytest.mark.parametrize(("bits", "photometric", "modality", "min_i"), [
    (16, "MONOCHROME2", "DX", 1e-3), (16, "MONOCHROME1", "DX", 1e-3), (12, "MONOCHROME1", "CR", 0.05),
])
def test_dicom_radiograph_gives_back_the_drr_line_integrals(env: dict[str, Any], tmp_path: Path, bits: int,
                                                            photometric: str, modality: str, min_i: float) -> None:
    from xct_core.xray_io import load_xray

    p, pitch = _drr(env, "frontal")
    assert pitch == env["params"].drr.pixel_mm == 40.0
    f = tmp_path / "frontal.dcm"
    stored = write_radiograph(f, p, bits=bits, photometric=photometric, modality=modality, imager_spacing=(pitch, pitch))
    brightest = stored.flat[int(np.argmin(p))]  # least attenuated ray: white in M2, black (0) in M1
    assert brightest == (stored.min() if photometric == "MONOCHROME1" else stored.max())
    x = load_xray(f, "frontal", env["params"])
    assert x.fmt == "dicom" and x.geometry is None and x.image.dtype == np.float32 and x.image.shape == p.shape
    assert f"BitsStored {bits}" in x.notes[0]
    inten = np.exp(-p.astype(np.float64))
    ok = inten > min_i  # |dp| <= 0.5 / full / I from rounding the intensity to an integer
    assert ok.mean() > 0.5
    np.testing.assert_allclose(x.image[ok], p[ok], atol=0.5 / (2**bits - 1) / min_i + 1e-6)
    # where the intensity rounds to 0 the documented clamp applies: p = -ln(min_intensity_fraction)
    zero = np.rint(inten * (2**bits - 1)) == 0
    cap = -np.log(env["params"].reconstruct.min_intensity_fraction)
    np.testing.assert_allclose(x.image[zero], cap, rtol=1e-6)


def test_monochrome1_and_2_decode_to_the_same_image(env: dict[str, Any], tmp_path: Path) -> None:
    from xct_core.xray_io import load_xray

    p, pitch = _drr(env, "lateral")
    write_radiograph(tmp_path / "m1.dcm", p, photometric="MONOCHROME1", imager_spacing=(pitch, pitch))
    write_radiograph(tmp_path / "m2.dcm", p, photometric="MONOCHROME2", imager_spacing=(pitch, pitch))
    a = load_xray(tmp_path / "m1.dcm", "lateral", env["params"]).image
    b = load_xray(tmp_path / "m2.dcm", "lateral", env["params"]).image
    np.testing.assert_array_equal(a, b)


def test_dicom_pixel_spacing_read_from_header(env: dict[str, Any], tmp_path: Path) -> None:
    """Known answer: the DRR's pitch (40 mm) is accepted from ImagerPixelSpacing (which wins
    over PixelSpacing) or, alone, PixelSpacing; the numbers read appear in the error."""
    from xct_core.xray_io import load_xray

    p, pitch = _drr(env, "frontal")
    accepted = {"imager": ((pitch, pitch), None), "imager wins": ((pitch, pitch), (pitch / 2, pitch / 2)),
                "pixel only": (None, (pitch, pitch)), "within 1 %": ((pitch * 1.005, pitch * 1.005), None)}
    for name, (ips, ps) in accepted.items():
        f = tmp_path / f"{name}.dcm"
        write_radiograph(f, p, imager_spacing=ips, pixel_spacing=ps)
        assert load_xray(f, "frontal", env["params"]).fmt == "dicom", name
    rejected = {"imager wrong, pixel right": ((2 * pitch, 2 * pitch), (pitch, pitch), "pixel spacing 80 x 80 mm"),
                "pixel only, wrong": (None, (pitch / 2, pitch / 2), "pixel spacing 20 x 20 mm"),
                "anisotropic": ((pitch, pitch * 1.025), None, "pixel spacing 40 x 41 mm"),
                "none": (None, None, "without ImagerPixelSpacing/PixelSpacing: pixel pitch unknown")}
    for name, (ips, ps, msg) in rejected.items():
        f = tmp_path / f"{name}.dcm"
        write_radiograph(f, p, imager_spacing=ips, pixel_spacing=ps)
        with pytest.raises(InputError, match=msg) as e:
            load_xray(f, "frontal", env["params"])
        assert str(f) in str(e.value), name
        if ips is not None or ps is not None:
            assert "differs from the model's detector pitch 40 mm (drr.pixel_mm)" in str(e.value), name


def test_reconstruct_cli_with_dicom_radiographs(env: dict[str, Any], tmp_path: Path, capsys) -> None:
    from xct_core.inference import load_stages, reconstruct
    from xct_core.xray_io import load_xray

    files = {}
    for view, phot in (("frontal", "MONOCHROME2"), ("lateral", "MONOCHROME1")):
        p, pitch = _drr(env, view)
        files[view] = tmp_path / f"{view}.dcm"
        write_radiograph(files[view], p, photometric=phot, imager_spacing=(pitch, pitch))
    out = tmp_path / "ct.nii.gz"
    code, _, err = xct(_args(env, out, frontal=files["frontal"], lateral=files["lateral"]), capsys)
    assert code == 0, err
    img = nib.load(str(out))
    # a DICOM carries no placed geometry: the model's, centred at the world origin (documented)
    np.testing.assert_allclose(img.affine, grid_affine((32,) * 3, 409.6 / 32, (0, 0, 0)), atol=1e-3)
    qa = json.loads((tmp_path / "ct.qa.json").read_text())
    assert {v["format"] for v in qa["inputs"].values()} == {"dicom"}
    assert qa["grid"]["isocenter"] == [0.0, 0.0, 0.0] and set(qa["reprojection"]["views"]) == {"frontal", "lateral"}
    # the volume is the cascade run on the decoded line integrals with the documented seed
    params = env["params"]
    nets = load_stages([env["train"] / "models" / f"stage{k}" / "best.pt" for k in (1, 2)], params)
    xs = {v: load_xray(files[v], v, params).image for v in files}
    want = reconstruct(nets, params, xs["frontal"], xs["lateral"], seed=5).mean_hu
    np.testing.assert_allclose(np.asarray(img.dataobj, dtype=np.float32), want, atol=0.51)  # int16 rounding


def test_bad_dicom_inputs_one_line_error_no_output(env: dict[str, Any], tmp_path: Path, capsys) -> None:
    p, pitch = _drr(env, "frontal")
    bad = tmp_path / "bad"
    bad.mkdir()
    write_radiograph(bad / "nospacing.dcm", p)
    write_radiograph(bad / "spacing.dcm", p, imager_spacing=(2 * pitch, 2 * pitch))
    write_radiograph(bad / "small.dcm", p[:8, :8], imager_spacing=(pitch, pitch))
    # a CT slice of the right size and pitch: HU with a rescale, not an X-ray
    write_slice(bad / "ctslice.dcm", np.full(p.shape, 1024, np.uint16), ipp=(0, 0, 0), pixel_spacing=(pitch, pitch))
    (bad / "junk.dcm").write_bytes(b"\0" * 200)
    cases = {
        "nospacing.dcm": "DICOM radiograph without ImagerPixelSpacing/PixelSpacing: pixel pitch unknown",
        "spacing.dcm": "pixel spacing 80 x 80 mm differs from the model's detector pitch 40 mm",
        "small.dcm": "image is 8x8 pixels, the model's detector is 16x16",
        "ctslice.dcm": "DICOM modality CT is a cross-sectional image, not a projection radiograph",
        "junk.dcm": "not a .npy, .png or DICOM file",
    }
    for name, msg in cases.items():
        code, _, err = xct(_args(env, tmp_path / "ct.nii.gz", frontal=bad / name), capsys)
        lines = err.strip().splitlines()
        assert code == 2 and len(lines) == 1, (name, err)
        assert lines[0].startswith("xct: error:") and str(bad / name) in lines[0] and msg in lines[0], (name, err)
        assert not list(tmp_path.glob("ct*")), name


# --------------------------------------------------------------------------- runs:/ model URIs


@pytest.mark.timeout(120)
def test_runs_uri_resolves_run_artifacts(env: dict[str, Any], tmp_path: Path, capsys,
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    from components.tracking import ensure_experiment, get_client

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    client = get_client(uri)
    exp = ensure_experiment(client, "xct-test-runs-uri")

    def run_with(files: dict[Path, str]) -> str:
        run = client.create_run(exp)
        for local, sub in files.items():
            client.log_artifact(run.info.run_id, str(local), sub)
        client.set_terminated(run.info.run_id)
        return run.info.run_id

    reg, models = env["reg"], env["train"] / "models"
    cascade = run_with({reg / "stage1.pt": "model", reg / "stage2.pt": "model", reg / "params.json": "model"})
    train1 = run_with({models / "stage1" / "best.pt": "model"})
    train2 = run_with({models / "stage2" / "best.pt": "model"})

    def recon(model: str, name: str) -> tuple[int, str, np.ndarray | None, dict | None]:
        out = tmp_path / f"{name}.nii.gz"
        code, _, err = xct(_args(env, out, model=model), capsys)
        if code:
            return code, err, None, None
        return code, err, np.asarray(nib.load(str(out)).dataobj), json.loads((tmp_path / f"{name}.qa.json").read_text())

    # runs:/<id>/model holding the registered layout (stage{k}.pt + params.json) == the same folder locally
    code, err, a, qa = recon(f"runs:/{cascade}/model", "a")
    assert code == 0, err
    assert "Downloading artifacts" not in err  # no MLflow progress bars on the CLI's stderr
    assert qa["model"] == {"uri": f"runs:/{cascade}/model", "layout": "registered", "stages_run": 2,
                           "stage_files": ["stage1.pt", "stage2.pt"]}
    code, err, b, _ = recon(str(reg), "b")
    assert code == 0, err
    np.testing.assert_array_equal(a, b)
    # runs:/<id>/model/best.pt, the form components/register.py writes for a rejected run: a stage-1 file
    code, err, c, qa = recon(f"runs:/{train1}/model/best.pt", "c")
    assert code == 0, err
    assert qa["model"]["layout"] == "stage-file" and qa["model"]["stages_run"] == 1 and c.shape == (16, 16, 16)
    code, err, d, _ = recon(str(models / "stage1" / "best.pt"), "d")
    assert code == 0, err
    np.testing.assert_array_equal(c, d)
    # one-line errors: a later stage's file alone, a run that does not exist, a path not in the run
    bad = {f"runs:/{train2}/model/best.pt": "a stage-2 model alone cannot reconstruct",
           "runs:/0123456789abcdef0123456789abcdef/model": "does not resolve",
           f"runs:/{cascade}/no-such-folder": "does not resolve"}
    for model, msg in bad.items():
        code, err, _, _ = recon(model, "bad")
        lines = err.strip().splitlines()
        assert code == 2 and len(lines) == 1 and lines[0].startswith("xct: error:") and msg in lines[0], (model, err)
        assert "Traceback" not in err and not (tmp_path / "bad.nii.gz").exists()
