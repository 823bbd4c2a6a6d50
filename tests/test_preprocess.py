"""Pipeline step 3 (preprocess): stage grids + DRR pairs → data/processed.

Tiny synthetic CTs (a few thousand voxels each, different shapes, spacings, origins and one
stored in LPS orientation) on tiny stage grids (8³ / 16³) with a 16×16 cone-beam detector.
The known answers are the building blocks themselves: every stored stage volume must equal
``resample_to_grid`` of the loaded CT, and every stored X-ray a direct ``render`` of the
finest stage volume.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from cli_run import xct
from components.kfp_components import preprocess_component
from components.preprocess import run_preprocess
from xct_core.config import Params, params_from_dict
from xct_core.drr import render
from xct_core.errors import InputError
from xct_core.geometry import PlacedGeometry, ProjectionGeometry
from xct_core.io import CTVolume, load_ct, resample_to_grid, save_ct
from xct_core.preprocess import (
    MANIFEST,
    PreprocessSettings,
    file_sha256,
    read_manifest,
    stage_file,
    xray_file,
    xray_honest_file,
)

IDS = ("vol_a", "vol_b", "vol_c", "vol_d")
SPLITS = {"train": ["vol_a", "vol_b"], "val": ["vol_c"], "test": ["vol_d"]}
FOV = 256.0


def small_params(**overrides: dict) -> Params:
    """Two tiny stages (8³, 16³ over 256 mm) and a 16-pixel cone-beam detector."""
    def stage(size: int, conv: list[int]) -> dict:
        return {"size": size, "fov_mm": FOV, "token_grid": 4, "conv_channels": conv, "dim": 8, "depth": 1, "heads": 1}

    data = {
        "stages": {"stage1": stage(8, [4]), "stage2": stage(16, [4, 4])},
        "drr": {"geometry": "cone", "pixels": 16, "pixel_mm": 24.0, "sdd": 1500.0, "sod": 1000.0},
        # the clean training renderer: these tests compare DRRs (train-time detector: test_protocol.py)
        "preprocess": {"workers": 1, "train_detector": False},
    }
    for section, values in overrides.items():
        data[section] = {**data.get(section, {}), **values}
    return params_from_dict(data)


def synthetic_ct(i: int) -> CTVolume:
    """An air-filled box holding a water-ish ellipsoid body, a lung-like hole and a dense
    marker on the patient's right; shape, spacing and origin vary with ``i``."""
    shape = (20 + 2 * i, 18 + i, 22)
    spacing = np.array([10.0, 11.0 - i, 9.5])
    idx = np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing="ij"), axis=-1).astype(np.float64)
    rel = (idx - (np.asarray(shape) - 1) / 2) * spacing  # mm from the centre, RAS+
    hu = np.full(shape, -1000.0, dtype=np.float32)
    body = ((rel[..., 0] / 85) ** 2 + (rel[..., 1] / 65) ** 2 + (rel[..., 2] / 95) ** 2) <= 1
    hu[body] = 40.0 + 10.0 * i
    lung = ((rel[..., 0] + 30) ** 2 + rel[..., 1] ** 2 + (rel[..., 2] - 10) ** 2) <= 30**2
    hu[lung] = -800.0
    marker = ((rel[..., 0] - 50) ** 2 + (rel[..., 1] - 20) ** 2 + rel[..., 2] ** 2) <= 18**2
    hu[marker] = 1200.0
    affine = np.diag([*spacing, 1.0])
    affine[:3, 3] = -(np.asarray(shape) - 1) / 2 * spacing + np.array([15.0 * i, -7.0, 30.0 - 5 * i])
    if i == 1:  # store it LPS-oriented: load_ct must canonicalise it back
        flip = np.diag([-1.0, -1.0, 1.0, 1.0])
        flip[:2, 3] = np.asarray(shape[:2]) - 1
        hu = hu[::-1, ::-1, :].copy()
        affine = affine @ flip
    return CTVolume(hu=hu, affine=affine)


def write_inputs(root: Path, splits_doc: dict | None = None) -> tuple[Path, Path]:
    """``root/volumes/{id}.nii.gz`` for :data:`IDS` and ``root/splits.json``."""
    vols = root / "volumes"
    for i, vid in enumerate(IDS):
        save_ct(vols / f"{vid}.nii.gz", synthetic_ct(i))
    splits = root / "splits.json"
    splits.write_text(json.dumps(splits_doc if splits_doc is not None else SPLITS))
    return vols, splits


def mtimes(root: Path) -> dict[str, int]:
    return {str(p.relative_to(root)): p.stat().st_mtime_ns for p in sorted(root.rglob("*")) if p.is_file()}


def copy_tree(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst, copy_function=shutil.copy2)  # copy2 keeps mtimes
    return dst


@pytest.fixture(scope="module")
def inputs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return write_inputs(tmp_path_factory.mktemp("pre_in"))


@pytest.fixture(scope="module")
def processed(inputs: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("pre") / "processed"
    vols, splits = inputs
    res = run_preprocess(vols, splits, out, small_params(), progress=False)
    # 2 stage grids + 1 view pair each, + the honest protocol's views of the val/test ids (vol_c, vol_d)
    assert sorted(res.processed) == sorted(IDS) and res.files_written == 3 * len(IDS) + 2
    return out


# --------------------------------------------------------------------------- outputs


def test_layout_shapes_dtypes_and_manifest(processed: Path) -> None:
    params = small_params()
    man = read_manifest(processed)
    assert man["splits"] == {s: sorted(v) for s, v in SPLITS.items()}
    assert [(s["k"], s["size"], s["fov_mm"]) for s in man["stages"]] == [(1, 8, FOV), (2, 16, FOV)]
    assert man["params_digest"] == PreprocessSettings.from_params(params).digest()
    assert man["xrays"]["rendered_on_stage"] == 2
    for vid in IDS:
        for k, size in ((1, 8), (2, 16)):
            arr = np.load(processed / stage_file(k, vid))
            assert arr.dtype == np.int16 and arr.shape == (size,) * 3
            assert arr.min() == -1024  # FOV cube larger than the CT: filled with air
            assert arr.max() > (200 if k == 1 else 500)  # the dense marker survives (blurred at 32 mm)
        with np.load(processed / xray_file(vid)) as z:
            assert set(z.files) == {"frontal", "lateral", "geometry"}
            for view in ("frontal", "lateral"):
                assert z[view].dtype == np.float32 and z[view].shape == (16, 16)
                assert np.all(np.isfinite(z[view])) and z[view].max() > 1.0
            geo = json.loads(str(z["geometry"]))
        for view in ("frontal", "lateral"):
            pg = PlacedGeometry.from_json(geo[view])
            assert pg.view == view and pg.pixels == 16 and pg.kind == "cone"
            np.testing.assert_allclose(pg.isocenter, man["items"][vid]["center_world"], atol=1e-9)
        files = man["items"][vid]["files"]
        honest = {xray_honest_file(vid)} if vid in SPLITS["val"] + SPLITS["test"] else set()  # the honest protocol's
        assert set(files) == {stage_file(1, vid), stage_file(2, vid), xray_file(vid)} | honest
        for rel, sha in files.items():
            assert file_sha256(processed / rel) == sha


def test_stage_volumes_equal_resample_to_grid(processed: Path, inputs: tuple[Path, Path]) -> None:
    man = read_manifest(processed)
    for vid in IDS:
        vol = load_ct(inputs[0] / f"{vid}.nii.gz")
        np.testing.assert_allclose(man["items"][vid]["center_world"], vol.center_world, atol=1e-9)
        for k, size in ((1, 8), (2, 16)):
            ref = resample_to_grid(vol, (size,) * 3, FOV / size, fill_hu=-1024.0)
            want = np.clip(np.rint(ref.hu), -32768, 32767).astype(np.int16)
            np.testing.assert_array_equal(np.load(processed / stage_file(k, vid)), want)


def test_xrays_equal_direct_render_of_finest_grid(processed: Path, inputs: tuple[Path, Path]) -> None:
    params = small_params()
    for vid in IDS:
        vol = load_ct(inputs[0] / f"{vid}.nii.gz")
        fine = resample_to_grid(vol, (16,) * 3, FOV / 16, fill_hu=-1024.0)
        stored = np.load(processed / stage_file(2, vid)).astype(np.float32)
        with np.load(processed / xray_file(vid)) as z:
            for view in ("frontal", "lateral"):
                geom = ProjectionGeometry.from_params(params.drr, view)
                exact = render(torch.from_numpy(stored), fine.affine, geom, mu_water=0.02).numpy()
                np.testing.assert_allclose(z[view], exact, rtol=1e-5, atol=1e-5)
                # the float (un-rounded) HU volume differs by < 0.5 HU per voxel
                direct = render(torch.from_numpy(fine.hu), fine.affine, geom, mu_water=0.02).numpy()
                np.testing.assert_allclose(z[view], direct, atol=5e-3)
                # and it is NOT the coarse grid's rendering (the X-rays come from the finest grid)
                coarse = resample_to_grid(vol, (8,) * 3, FOV / 8, fill_hu=-1024.0)
                other = render(torch.from_numpy(coarse.hu), coarse.affine, geom, mu_water=0.02).numpy()
                assert np.abs(z[view] - other).max() > 1e-2


# --------------------------------------------------------------------------- re-runs


def test_rerun_is_a_noop(processed: Path, inputs: tuple[Path, Path]) -> None:
    before = mtimes(processed)
    manifest = (processed / MANIFEST).read_bytes()
    res = run_preprocess(*inputs, processed, small_params(), progress=False)
    assert res.processed == [] and sorted(res.skipped) == sorted(IDS) and res.files_written == 0
    assert mtimes(processed) == before
    assert (processed / MANIFEST).read_bytes() == manifest
    # the window is applied at load time: changing it changes nothing here
    res = run_preprocess(*inputs, processed, small_params(hu={"window": "lung"}), progress=False)
    assert res.files_written == 0 and mtimes(processed) == before


def test_interrupted_run_completes(processed: Path, inputs: tuple[Path, Path], tmp_path: Path) -> None:
    out = copy_tree(processed, tmp_path / "out")
    original = {rel: (out / rel).read_bytes() for rel in (stage_file(2, "vol_b"), xray_file("vol_c"))}
    manifest = (out / MANIFEST).read_bytes()
    # what a killed run leaves behind: a deleted output, a half-written temp file, a truncated
    # output whose record was not updated, and no manifest
    (out / stage_file(2, "vol_b")).unlink()
    stale_tmp = out / "stage1" / ".vol_a.npy.abc123.tmp"
    stale_tmp.write_bytes(b"\x93NUMPY partial")
    (out / xray_file("vol_c")).write_bytes(b"PK truncated")
    (out / MANIFEST).unlink()
    before = mtimes(out)
    with pytest.raises(InputError, match="manifest not found"):
        read_manifest(out)

    res = run_preprocess(*inputs, out, small_params(), progress=False)
    assert res.processed == ["vol_b", "vol_c"] and res.files_written == 2 and res.temp_swept == 1
    assert not stale_tmp.exists()
    for rel, data in original.items():
        assert (out / rel).read_bytes() == data  # deterministic: same bytes as the first run
    after = mtimes(out)
    untouched = [rel for rel in before if rel.endswith((".npy", ".npz")) and "vol_b" not in rel and "vol_c" not in rel]
    assert untouched and all(after[rel] == before[rel] for rel in untouched)
    assert (out / MANIFEST).read_bytes() == manifest


def test_changed_input_is_reprocessed(processed: Path, inputs: tuple[Path, Path], tmp_path: Path) -> None:
    out = copy_tree(processed, tmp_path / "out")
    vols = copy_tree(inputs[0], tmp_path / "volumes")
    vol = synthetic_ct(0)
    vol.hu[vol.hu > 500] = 2000.0  # denser marker
    save_ct(vols / "vol_a.nii.gz", vol)
    res = run_preprocess(vols, inputs[1], out, small_params(), progress=False)
    assert res.processed == ["vol_a"] and res.files_written == 3
    assert np.load(out / stage_file(2, "vol_a")).max() > np.load(processed / stage_file(2, "vol_a")).max()


def test_changing_drr_params_rerenders_only_xrays(processed: Path, inputs: tuple[Path, Path], tmp_path: Path) -> None:
    out = copy_tree(processed, tmp_path / "out")
    before = mtimes(out)
    params = small_params(drr={"pixels": 12, "sdd": 1400.0})
    res = run_preprocess(*inputs, out, params, progress=False)
    assert sorted(res.processed) == sorted(IDS) and res.files_written == len(IDS) + 2  # + the honest val/test views
    after = mtimes(out)
    for vid in IDS:
        assert after[stage_file(1, vid)] == before[stage_file(1, vid)]
        assert after[stage_file(2, vid)] == before[stage_file(2, vid)]
        assert after[xray_file(vid)] != before[xray_file(vid)]
        with np.load(out / xray_file(vid)) as z:
            assert z["frontal"].shape == (12, 12)
            assert PlacedGeometry.from_json(json.loads(str(z["geometry"]))["lateral"]).sdd == 1400.0
    man = read_manifest(out)
    assert man["params_digest"] == PreprocessSettings.from_params(params).digest() != read_manifest(processed)["params_digest"]
    assert man["xrays"]["pixels"] == 12


def test_changing_fill_hu_reprocesses_every_output(
    processed: Path, inputs: tuple[Path, Path], tmp_path: Path
) -> None:
    out = copy_tree(processed, tmp_path / "out")
    before = mtimes(out)
    params = small_params(preprocess={"fill_hu": -1000.0})
    res = run_preprocess(*inputs, out, params, progress=False)
    assert res.files_written == 3 * len(IDS)
    assert all(mtimes(out)[stage_file(1, v)] != before[stage_file(1, v)] for v in IDS)
    assert np.load(out / stage_file(1, "vol_a")).min() == -1000


# --------------------------------------------------------------------------- quarantine, errors


def test_quarantined_ids_are_absent(processed: Path, inputs: tuple[Path, Path], tmp_path: Path) -> None:
    # validate's splits.json: vol_c already dropped and listed; a separate file quarantines vol_d
    doc = {
        "volumes": {"train": ["vol_a", "vol_b"], "val": [], "test": ["vol_d"]},
        "quarantined": ["vol_c"],
        "excluded": {"vol_c": "quarantined: hu_max too high"},
    }
    splits = tmp_path / "splits.json"
    splits.write_text(json.dumps(doc))
    q = tmp_path / "quarantine.json"
    q.write_text(json.dumps({"vol_d": "bad spacing"}))
    out = copy_tree(processed, tmp_path / "out")  # earlier outputs of vol_c/vol_d must go
    res = run_preprocess(inputs[0], splits, out, small_params(), q, progress=False)
    man = read_manifest(out)
    assert man["splits"] == {"train": ["vol_a", "vol_b"], "val": [], "test": []}
    assert set(man["items"]) == {"vol_a", "vol_b"}
    assert man["quarantined"] == {"vol_c": "quarantined: hu_max too high", "vol_d": "bad spacing"}
    names = {p.name for p in out.rglob("*")}
    assert not any(n.startswith(("vol_c", "vol_d")) for n in names)
    assert res.files_written == 0 and len(res.removed) == 2 * 5  # 2 stages, views, honest views, record


def test_bad_inputs_raise_input_errors(inputs: tuple[Path, Path], tmp_path: Path) -> None:
    vols, splits = inputs
    with pytest.raises(InputError, match="splits file not found"):
        run_preprocess(vols, tmp_path / "nope.json", tmp_path / "o", small_params())
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"train": ["vol_a", "ghost"]}))
    with pytest.raises(InputError, match=r"ghost\.nii\.gz.*not found"):
        run_preprocess(vols, bad, tmp_path / "o", small_params())
    bad.write_text(json.dumps({"train": ["../evil"]}))
    with pytest.raises(InputError, match="invalid volume id"):
        run_preprocess(vols, bad, tmp_path / "o", small_params())
    bad.write_text(json.dumps({"train": ["vol_a"], "test": ["vol_a"]}))
    with pytest.raises(InputError, match="two splits"):
        run_preprocess(vols, bad, tmp_path / "o", small_params())
    q = tmp_path / "q.json"
    q.write_text(json.dumps(list(IDS)))
    with pytest.raises(InputError, match="no volumes left"):
        run_preprocess(vols, splits, tmp_path / "o", small_params(), q)
    # a volume that does not load: reported by id, no manifest, the others are kept
    broken = copy_tree(vols, tmp_path / "vols")
    (broken / "vol_b.nii.gz").write_bytes(b"not a nifti")
    with pytest.raises(InputError, match=r"1 of 4 volume\(s\) failed.*vol_b"):
        run_preprocess(broken, splits, tmp_path / "o2", small_params(), progress=False)
    assert not (tmp_path / "o2" / MANIFEST).exists() and (tmp_path / "o2" / stage_file(2, "vol_a")).is_file()


def test_cli_entry_point(inputs: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    vols, splits = inputs
    params_file = tmp_path / "params.yaml"
    import yaml

    params_file.write_text(yaml.safe_dump(small_params().model_dump(mode="json")))
    out = tmp_path / "processed"
    rc = xct(["step", "preprocess", "--volumes", str(vols), "--splits", str(splits), "--out", str(out),
              "--params", str(params_file), "--no-progress"])
    assert rc == 0 and (out / MANIFEST).is_file()
    assert "4 processed, 0 skipped" in capsys.readouterr().out
    rc = xct(["step", "preprocess", "--volumes", str(tmp_path / "missing"), "--splits", str(splits), "--out", str(out),
              "--params", str(params_file)])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and "missing: volumes folder not found" in err


def test_process_pool_matches_in_process(processed: Path, inputs: tuple[Path, Path], tmp_path: Path) -> None:
    """Two spawned workers (one torch thread each) produce byte-identical outputs."""
    out = tmp_path / "pool"
    res = run_preprocess(*inputs, out, small_params(preprocess={"workers": 2}), progress=True)
    assert sorted(res.processed) == sorted(IDS)
    assert read_manifest(out)["items"] == read_manifest(processed)["items"]


def test_kfp_component_compiles(tmp_path: Path) -> None:
    from kfp import compiler

    spec = preprocess_component.component_spec
    assert set(spec.inputs) == {"interim", "validated", "params_yaml"}
    assert {"processed", "n_volumes", "params_digest"} <= set(spec.outputs)
    target = tmp_path / "preprocess.yaml"
    compiler.Compiler().compile(preprocess_component, str(target))
    text = target.read_text()
    assert "run_preprocess" in text and "xct-light" in text


@pytest.mark.slow
@pytest.mark.skipif(
    os.environ.get("XCT_TEST_RAY") != "1",
    reason="starts a local Ray instance (~15-20 s on a 2-core machine); set XCT_TEST_RAY=1 to run",
)
def test_ray_data_path_matches_process_pool(processed: Path, inputs: tuple[Path, Path], tmp_path: Path) -> None:
    out = tmp_path / "ray"
    res = run_preprocess(*inputs, out, small_params(preprocess={"use_ray": True, "workers": 2}), progress=False)
    assert sorted(res.processed) == sorted(IDS)
    assert read_manifest(out)["items"] == read_manifest(processed)["items"]
