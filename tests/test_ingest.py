"""Pipeline step 1 — ingest: stats (known answers), discovery, checksums, canonical volumes,
idempotence, the patient split, and the KFP component wiring."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import nibabel as nib
import numpy as np
import pytest
from dicom_synth import write_nifti, write_series

import components.ingest as ingest_mod
from components.ingest import run_ingest
from components.kfp_components import ingest_component
from xct_core.config import IngestParams, Params, params_from_dict
from xct_core.errors import ConfigError, InputError
from xct_core.io import CTVolume
from xct_core.stats import (
    STATS_COLUMNS,
    assign_splits,
    discover,
    mark_duplicates,
    patient_of,
    split_counts,
    value_stats,
    volume_stats,
)

N, SP = 20, 6.0  # 20³ voxels at 6 mm: 120 mm per axis (passes the default validation)


def torso(seed: int, n: int = N) -> np.ndarray:
    """int16 HU: air (-1000) around an elliptic soft-tissue body (40 ± noise) with a 700 HU spine."""
    rng = np.random.default_rng(seed)
    x, y, _ = np.mgrid[:n, :n, :n].astype(np.float64)
    c = (n - 1) / 2
    hu = np.full((n, n, n), -1000.0)
    body = (x - c) ** 2 / (0.4 * n) ** 2 + (y - c) ** 2 / (0.3 * n) ** 2 <= 1
    hu[body] = 40 + rng.normal(0, 10, int(body.sum()))
    hu[(abs(x - c) < 2) & (abs(y - c + 3) < 2)] = 700
    return np.rint(hu).astype(np.int16)


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# --------------------------------------------------------------------------- statistics


def test_value_stats_known_answers() -> None:
    a = np.full(1000, -1000.0, dtype=np.float32)
    a[:400] = 100.0  # 40 % body
    a[400:410] = -500.0  # exactly at the threshold: not body (strictly above counts)
    s = value_stats(a, body_hu=-500.0)
    assert s["hu_min"] == -1000 and s["hu_max"] == 100 and s["hu_p50"] == -1000
    assert s["body_fraction"] == pytest.approx(0.4)
    assert s["hu_mean"] == pytest.approx((400 * 100 - 10 * 500 - 590 * 1000) / 1000)
    assert s["nan_count"] == 0 and s["inf_count"] == 0

    b = a.copy()
    b[:2] = np.nan
    b[2] = np.inf
    s = value_stats(b)
    assert (s["nan_count"], s["inf_count"]) == (2, 1)
    assert s["hu_max"] == 100 and s["body_fraction"] == pytest.approx(397 / 1000)  # over all voxels


def test_volume_stats_geometry_in_mm() -> None:
    aff = np.diag([0.5, 2.0, 5.0, 1.0])
    vol = CTVolume(hu=np.full((4, 6, 8), -1000, np.float32), affine=aff)
    s = volume_stats(vol)
    assert (s["shape_x"], s["shape_y"], s["shape_z"], s["n_voxels"]) == (4, 6, 8, 192)
    assert (s["extent_x_mm"], s["extent_y_mm"], s["extent_z_mm"]) == (2.0, 12.0, 40.0)
    assert (s["spacing_min"], s["spacing_max"]) == (0.5, 5.0)
    assert s["body_fraction"] == 0.0


def test_duplicates_by_file_or_by_voxel_data() -> None:
    rows = [
        {"id": "b", "sha256": "f1", "data_sha256": "d1"},
        {"id": "a", "sha256": "f1", "data_sha256": "d1"},
        {"id": "c", "sha256": "f2", "data_sha256": "d1"},
        {"id": "d", "sha256": "f3", "data_sha256": None},
    ]
    mark_duplicates(rows)
    got = {r["id"]: (r["duplicate_of"], r["duplicate_kind"]) for r in rows}
    assert got == {"a": (None, None), "b": ("a", "same file"), "c": ("a", "same voxel data"), "d": (None, None)}


# --------------------------------------------------------------------------- discovery


def test_discover_nifti_dicom_series_and_other_files(tmp_path: Path) -> None:
    raw = tmp_path / "raw"
    (raw / "site1").mkdir(parents=True)
    write_nifti(raw / "a.nii.gz", torso(0), np.diag([SP, SP, SP, 1]))
    write_nifti(raw / "a.nii", torso(0), np.diag([SP, SP, SP, 1]))  # same stem: ids must differ
    (raw / "site1" / "broken.nii.gz").write_bytes(b"not gzip")  # a NIfTI name is a source even if corrupt
    write_series(raw / "site1" / "series 7", np.zeros((3, 4, 4), np.uint16))
    (raw / "notes.txt").write_text("hello")
    (raw / ".hidden.nii.gz").write_bytes(b"")
    sources, ignored = discover(raw)
    got = {(s.id, s.rel, s.kind) for s in sources}
    assert got == {
        ("a", "a.nii", "nifti"),
        ("a_2", "a.nii.gz", "nifti"),
        ("site1__broken", "site1/broken.nii.gz", "nifti"),
        ("site1__series_7", "site1/series 7", "dicom"),
    }
    assert ignored == ["notes.txt"]
    series = next(s for s in sources if s.kind == "dicom")
    assert len(series.files) == 3
    with pytest.raises(InputError, match="not a directory"):
        discover(tmp_path / "missing")


# --------------------------------------------------------------------------- ingest


@pytest.fixture(scope="module")
def raw_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    raw = tmp_path_factory.mktemp("ingest") / "raw"
    raw.mkdir()
    write_nifti(raw / "ras.nii.gz", torso(1), np.diag([SP, SP, SP, 1]))
    # LPS storage: the canonical volume must be flipped along i and j
    write_nifti(raw / "lps.nii.gz", torso(2), np.diag([-SP, -SP, SP, 1]))
    write_nifti(raw / "four_d.nii.gz", np.stack([torso(3), torso(3)], axis=-1), np.diag([SP, SP, SP, 1]))
    write_nifti(raw / "trunc_src.nii.gz", torso(4), np.diag([SP, SP, SP, 1]))
    data = (raw / "trunc_src.nii.gz").read_bytes()
    (raw / "trunc_src.nii.gz").unlink()
    (raw / "truncated.nii.gz").write_bytes(data[: len(data) // 2])
    # DICOM series: HU = raw - 1024, 20 slices 6 mm apart
    write_series(raw / "series", (torso(5).transpose(2, 1, 0) + 1024).astype(np.uint16), pixel_spacing=(SP, SP), gap=SP)
    (raw / "README.md").write_text("raw CTs")
    return raw


@pytest.fixture(scope="module")
def ingested(raw_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("interim")
    run_ingest(raw_dir, out, Params())
    return out, {r["id"]: r for r in json.loads((out / "stats.json").read_text())["volumes"]}


def test_ingest_table_keeps_failures_with_their_error(ingested: tuple[Path, dict]) -> None:
    out, rows = ingested
    assert set(rows) == {"ras", "lps", "four_d", "truncated", "series"}
    assert rows["four_d"]["status"] == "error" and "4D data" in rows["four_d"]["error"]
    assert rows["four_d"]["source_ndim"] == 4  # the lenient probe still read the header
    assert rows["truncated"]["status"] == "error" and "truncated" in rows["truncated"]["error"]
    assert rows["truncated"]["volume"] is None and rows["truncated"]["hu_min"] is None
    for vid in ("ras", "lps", "series"):
        assert rows[vid]["status"] == "ok" and rows[vid]["error"] is None
    assert sorted(p.name for p in (out / "volumes").iterdir()) == ["lps.nii.gz", "ras.nii.gz", "series.nii.gz"]
    splits = json.loads((out / "splits.json").read_text())
    in_split = [v for s in ("train", "val", "test") for v in splits["volumes"][s]]
    assert sorted(in_split) == ["lps", "ras", "series"]
    assert set(splits["excluded"]) == {"four_d", "truncated"}
    assert "4D data" in splits["excluded"]["four_d"]
    csv_lines = (out / "stats.csv").read_text().splitlines()
    assert csv_lines[0].split(",") == list(STATS_COLUMNS) and len(csv_lines) == 6


def test_ingest_canonical_volumes_and_checksums(raw_dir: Path, ingested: tuple[Path, dict]) -> None:
    out, rows = ingested
    lps = nib.load(out / "volumes" / "lps.nii.gz")
    assert lps.get_data_dtype() == np.int16
    assert nib.aff2axcodes(lps.affine) == ("R", "A", "S")
    np.testing.assert_array_equal(np.asarray(lps.dataobj), torso(2)[::-1, ::-1, :])
    assert rows["lps"]["source_orientation"] == "LPS" and rows["ras"]["source_orientation"] == "RAS"
    assert rows["ras"]["sha256"] == sha(raw_dir / "ras.nii.gz")
    assert rows["truncated"]["sha256"] == sha(raw_dir / "truncated.nii.gz")
    assert rows["ras"]["volume_sha256"] == sha(out / "volumes" / "ras.nii.gz")
    t = torso(1)
    assert (rows["ras"]["hu_min"], rows["ras"]["hu_max"]) == (float(t.min()), float(t.max()))
    assert rows["ras"]["body_fraction"] == pytest.approx(np.count_nonzero(t > -500) / t.size)
    assert rows["ras"]["extent_x_mm"] == pytest.approx(N * SP)
    # DICOM: checksum of the sorted name/sha manifest; slice gaps from ImagePositionPatient
    files = sorted((raw_dir / "series").iterdir())
    manifest = "".join(f"{p.name}  {sha(p)}\n" for p in files)
    s = rows["series"]
    assert s["sha256"] == hashlib.sha256(manifest.encode()).hexdigest() and s["n_files"] == N
    assert s["slice_gap_mm"] == pytest.approx(SP) and s["slice_gap_min_mm"] == pytest.approx(SP)
    assert s["slice_gap_max_mm"] == pytest.approx(SP)
    assert (s["hu_min"], s["hu_max"]) == (float(torso(5).min()), float(torso(5).max()))


def test_ingest_is_idempotent_and_reuses_unchanged_volumes(
    raw_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    raw = tmp_path / "raw"
    shutil.copytree(raw_dir, raw)
    out = tmp_path / "interim"
    run_ingest(raw, out, Params())
    first = {p.relative_to(out): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}

    calls: list[str] = []
    real_measure = ingest_mod.measure
    monkeypatch.setattr(ingest_mod, "measure", lambda src, *a, **k: calls.append(src.id) or real_measure(src, *a, **k))
    res = run_ingest(raw, out, Params())
    second = {p.relative_to(out): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}
    assert second == first  # byte-identical outputs, no leftovers
    assert calls == [] and res.reused == 5

    (raw / "lps.nii.gz").unlink()  # a deleted raw file's volume goes away
    (out / "volumes" / "ras.nii.gz").write_bytes(b"tampered")  # a damaged output is rebuilt
    res = run_ingest(raw, out, Params())
    assert sorted(calls) == ["ras"] and not (out / "volumes" / "lps.nii.gz").exists()
    assert (out / "volumes" / "ras.nii.gz").read_bytes() == first[Path("volumes/ras.nii.gz")]

    calls.clear()  # a parameter the rows depend on invalidates the cache
    run_ingest(raw, out, params_from_dict({"ingest": {"body_hu": -400.0}}))
    assert sorted(calls) == ["four_d", "ras", "series", "truncated"]


def test_ingest_empty_folder_is_a_user_error(tmp_path: Path) -> None:
    (tmp_path / "raw").mkdir()
    with pytest.raises(InputError, match="no CT volumes found"):
        run_ingest(tmp_path / "raw", tmp_path / "out", Params())
    from cli_run import xct

    assert xct(["step", "ingest", "--raw", str(tmp_path / "raw"), "--out", str(tmp_path / "out")]) == 2


# --------------------------------------------------------------------------- split


def test_split_counts_small_and_large_n() -> None:
    fr = (0.7, 0.15, 0.15)
    assert split_counts(24, fr, 2) == (17, 3, 4)
    assert split_counts(100, fr, 2) == (70, 15, 15)
    assert split_counts(1, fr, 2) == (1, 0, 0)
    assert split_counts(0, fr, 2) == (0, 0, 0)
    for n in range(1, 80):
        tr, va, te = split_counts(n, fr, 2)
        assert tr + va + te == n and tr >= 1 and min(va, te) >= 0
        if n >= 8:
            assert va >= 2 and te >= 2
        if va > round(0.15 * n) + 1 or te > round(0.15 * n) + 1:  # raised to the minimum...
            assert tr >= va + te  # ...only while train keeps at least as many
    assert split_counts(10, (1.0, 0.0, 0.0), 2) == (10, 0, 0)
    with pytest.raises(ValueError):
        split_counts(10, (0.5, 0.2, 0.2), 2)


def test_assign_splits_is_deterministic_disjoint_and_by_patient() -> None:
    vols = {f"p{p:02d}_{s}": f"p{p:02d}" for p in range(24) for s in "ab"}
    res = assign_splits(vols, (0.7, 0.15, 0.15), 2, seed=0)
    pats = res["patients"]
    assert len(pats["val"]) >= 2 and len(pats["test"]) >= 2
    assert sum(len(v) for v in pats.values()) == 24
    assert not (set(pats["train"]) & set(pats["val"]) or set(pats["train"]) & set(pats["test"]) or set(pats["val"]) & set(pats["test"]))
    for split, ids in res["volumes"].items():
        assert {vols[v] for v in ids} == set(pats[split])  # both volumes of a patient together
    assert sorted(v for ids in res["volumes"].values() for v in ids) == sorted(vols)
    shuffled = dict(reversed(list(vols.items())))
    assert assign_splits(shuffled, (0.7, 0.15, 0.15), 2, seed=0) == res  # order-independent
    assert assign_splits(vols, (0.7, 0.15, 0.15), 2, seed=1) != res


def test_patient_rule_and_ingest_params() -> None:
    rx = r"(LIDC-IDRI-\d+)"
    assert patient_of("ct__chest_LIDC-IDRI-0001_labels", "anon", rx) == "LIDC-IDRI-0001"
    assert patient_of("phantom_03", "PAT7", rx) == "PAT7"
    assert patient_of("phantom_03", None, None) == "phantom_03"
    with pytest.raises(ConfigError, match="sum to 1"):
        params_from_dict({"ingest": {"train_fraction": 0.9}})
    with pytest.raises(ConfigError, match="capturing group"):
        params_from_dict({"ingest": {"patient_regex": "LIDC"}})
    assert IngestParams().min_eval_patients == 2


# --------------------------------------------------------------------------- KFP + real data


def test_kfp_component_uses_the_image_and_runs_the_same_function(raw_dir: Path, tmp_path: Path) -> None:
    from kfp import compiler

    spec = tmp_path / "ingest.yaml"
    compiler.Compiler().compile(ingest_component, str(spec))
    text = spec.read_text()
    assert "image: xct-light:0.1.0" in text and "pip install" not in text
    interim = SimpleNamespace(path=str(tmp_path / "interim"), metadata={})
    from components.ops_params import OpsParams
    from components.step_params import scoped_text

    res = ingest_component.python_func(raw=SimpleNamespace(path=str(raw_dir)), interim=interim,
                                       params_yaml=scoped_text(OpsParams(), "ingest"))  # the keys ingest reads
    assert (res.n_ok, res.n_failed) == (3, 2) and interim.metadata["n_volumes"] == 5
    assert (tmp_path / "interim" / "splits.json").is_file()


@pytest.mark.shared_data
def test_ingest_real_ct_checksums_and_geometry(shared_data: Path, tmp_path: Path) -> None:
    raw = tmp_path / "raw"
    raw.mkdir()
    names = {"abdomen-pelvis_totalseg-example_3mm": "8a6efdc4", "chest-mediastinum_crop_totalseg-aorta": "17a7b0bc"}
    for n in names:
        src = shared_data / "ct" / f"{n}.nii.gz"
        if not src.exists():
            pytest.skip(f"{src} not available")
        (raw / src.name).symlink_to(src)
    res = run_ingest(raw, tmp_path / "interim", Params())
    rows = {r["id"]: r for r in res.rows}
    for n, prefix in names.items():
        assert rows[n]["status"] == "ok" and rows[n]["sha256"].startswith(prefix)
        assert rows[n]["source_orientation"] == "RAS" and rows[n]["hu_min"] == -1024.0
    ab = rows["abdomen-pelvis_totalseg-example_3mm"]
    assert (ab["shape_x"], ab["shape_y"], ab["shape_z"]) == (122, 101, 112)
    assert ab["spacing_min"] == pytest.approx(3.0, abs=1e-3) and ab["hu_max"] == 3071.0  # metal hip implant
    assert 0.2 < ab["body_fraction"] < 0.9
