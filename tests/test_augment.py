"""Training-set augmentation (xct_core/augment.py, wired into the preprocess step).

Analytic checks on tiny phantoms (≤ 24³ voxels, 16³ stage grids, 16-pixel detectors):

- identity augmentation = the un-augmented outputs, bit for bit (through the whole step);
- a left-right flip mirrors the stage volume exactly and the frontal DRR left↔right, and
  leaves the lateral DRR unchanged (parallel beam: each lateral ray is only reversed);
- a translation by n voxels shifts the stage volume by exactly n voxels;
- +90° about S (R turns towards A): new volume = np.rot90(old, 1, axes=(R, A)); with the
  image axes of docs/CONVENTIONS.md (frontal u = −R, lateral u = −A, beam = u × v) a point
  at old (r, a) sits at new (−a, r), so new frontal column coordinate −(−a) = a = −(old
  lateral column coordinate): new frontal = old lateral mirrored left↔right, and new
  lateral column −r = old frontal column: new lateral = old frontal (parallel beam);
- intensity jitter HU' = a·HU + b changes the line integrals as Beer-Lambert predicts:
  mu' = a·mu + mu_water·(1 − a + b/1000), so p' = a·p + (1 − a + b/1000)·p_water with
  p_water the line integral of the same grid filled with water;
- copies are deterministic from (seed, id, j), differ across seeds; val/test never get any.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from components.preprocess import run_preprocess
from xct_core.augment import Augmentation, aug_id, plan_copies, rotation_matrix, sample_augmentation
from xct_core.config import AugmentParams, DRRParams, params_from_dict
from xct_core.errors import ConfigError
from xct_core.io import CTVolume, grid_affine, save_ct
from xct_core.preprocess import PreprocessSettings, StageGrid, read_manifest, render_xrays, stage_file, stage_hu, xray_file

FOV = 64.0  # mm; 16³ stage grid of 4 mm voxels
GRID = StageGrid(1, 16, FOV)
MU = 0.02


def parallel_settings(pixels: int = 16) -> PreprocessSettings:
    """Parallel beam, one detector pixel per stage voxel (pixel centres on voxel centres)."""
    drr = DRRParams(geometry="parallel", pixels=pixels, pixel_mm=FOV / pixels).model_dump(mode="json")
    return PreprocessSettings(grids=(GRID,), drr=drr, mu_water=MU)


def phantom(body_only: bool = False) -> CTVolume:
    """A 24³ box of 3 mm voxels (72 mm > the 64 mm grid) centred off the origin: a water-ish
    slab with a dense marker on the patient's right-anterior-superior side, a lung-like hole,
    and air around (``body_only``: no air or lung, every voxel > -500 HU)."""
    n, sp = 24, 3.0
    idx = np.stack(np.meshgrid(*[np.arange(n)] * 3, indexing="ij"), axis=-1).astype(np.float64)
    rel = (idx - (n - 1) / 2) * sp
    hu = np.full((n, n, n), -300.0 if body_only else -1000.0, dtype=np.float32)
    body = (np.abs(rel[..., 0]) < 28) & (np.abs(rel[..., 1]) < 22) & (np.abs(rel[..., 2]) < 30)
    hu[body] = 30.0
    if not body_only:
        hu[((rel[..., 0] + 12) ** 2 + rel[..., 1] ** 2 + rel[..., 2] ** 2) < 9**2] = -800.0
    marker = ((rel[..., 0] - 15) ** 2 + (rel[..., 1] - 8) ** 2 + (rel[..., 2] - 10) ** 2) < 7**2
    hu[marker] = 900.0
    return CTVolume(hu=hu, affine=grid_affine(hu.shape, sp, (12.0, -5.0, 30.0)))


def outputs(vol: CTVolume, aug: Augmentation | None, s: PreprocessSettings) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Stage volume and (frontal, lateral) as the preprocess step makes them."""
    arr = stage_hu(vol, GRID, s.fill_hu, s.antialias, aug)
    f, lat, _ = render_xrays(arr, GRID.affine(vol.center_world), s)
    return arr, f, lat


def rel_err(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


# --------------------------------------------------------------------------- geometry


def test_rotation_matrix_is_right_handed_and_exact_at_zero() -> None:
    assert np.array_equal(rotation_matrix((0.0, 0.0, 0.0)), np.eye(3))
    np.testing.assert_allclose(rotation_matrix((0, 0, 90)) @ [1, 0, 0], [0, 1, 0], atol=1e-12)  # R → A
    np.testing.assert_allclose(rotation_matrix((90, 0, 0)) @ [0, 1, 0], [0, 0, 1], atol=1e-12)  # A → S
    np.testing.assert_allclose(rotation_matrix((0, 90, 0)) @ [0, 0, 1], [1, 0, 0], atol=1e-12)  # S → R
    r = rotation_matrix((7.0, -3.0, 11.0))
    np.testing.assert_allclose(r @ r.T, np.eye(3), atol=1e-12)
    assert np.linalg.det(r) == pytest.approx(1.0)
    m = Augmentation("v", 0, rotate_deg=(0, 0, 90), translate_mm=(1.0, 2.0, 3.0)).world_matrix((10.0, 0.0, 0.0))
    np.testing.assert_allclose(m @ [10.0, 0, 0, 1], [11.0, 2.0, 3.0, 1.0], atol=1e-12)  # the centre only moves by t


def test_left_right_flip_mirrors_volume_and_frontal_keeps_lateral() -> None:
    vol, s = phantom(), parallel_settings()
    base, f0, l0 = outputs(vol, None, s)
    arr, f1, l1 = outputs(vol, Augmentation("v", 0, flip_lr=True), s)
    assert np.array_equal(arr, base[::-1])
    # the marker (patient's right) is on the frontal image's left half, after the flip on its right half
    assert f0[:, :8].max() > f0[:, 8:].max() + 0.1 and f1[:, 8:].max() > f1[:, :8].max() + 0.1
    np.testing.assert_allclose(f1, f0[:, ::-1], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(l1, l0, rtol=1e-5, atol=1e-5)  # the same rays, reversed


def test_integer_translation_shifts_by_whole_voxels() -> None:
    vol, s = phantom(), parallel_settings()
    base = stage_hu(vol, GRID, s.fill_hu, s.antialias)
    sp = GRID.spacing_mm
    for axis, n in ((0, 2), (1, -3), (2, 1)):
        t = [0.0, 0.0, 0.0]
        t[axis] = n * sp
        arr = stage_hu(vol, GRID, s.fill_hu, s.antialias, Augmentation("v", 0, translate_mm=tuple(t)))
        moved = np.moveaxis(arr, axis, 0)
        ref = np.moveaxis(base, axis, 0)
        if n > 0:  # old voxel i is now at i + n
            assert np.array_equal(moved[n:], ref[:-n])
        else:
            assert np.array_equal(moved[:n], ref[-n:])
        assert not np.array_equal(arr, base)


def test_rotation_90_about_s_swaps_frontal_and_lateral() -> None:
    vol, s = phantom(), parallel_settings()
    base, f0, l0 = outputs(vol, None, s)
    arr, f1, l1 = outputs(vol, Augmentation("v", 0, rotate_deg=(0.0, 0.0, 90.0)), s)
    assert np.array_equal(arr, np.rot90(base, 1, axes=(0, 1)))
    assert rel_err(f1, l0[:, ::-1]) < 1e-5  # new frontal = old lateral, mirrored left↔right
    assert rel_err(l1, f0) < 1e-5  # new lateral = old frontal
    assert rel_err(f1, f0) > 0.05  # and it is not the identity


def test_intensity_jitter_follows_beer_lambert() -> None:
    vol, s = phantom(body_only=True), parallel_settings()
    a, b = 1.04, -15.0
    base, f0, l0 = outputs(vol, None, s)
    arr, f1, l1 = outputs(vol, Augmentation("v", 0, hu_scale=a, hu_offset=b), s)
    assert base.min() > -500 and arr.min() > -1000  # every voxel jittered, none clamped at mu = 0
    water = np.zeros_like(base)
    fw, lw, _ = render_xrays(water, GRID.affine(vol.center_world), s)  # mu_water · chord length
    for p0, p1, pw in ((f0, f1, fw), (l0, l1, lw)):
        want = a * p0 + (1.0 - a + b / 1000.0) * pw
        # int16 rounding of HU: ≤ 0.5 HU per voxel → ≤ 0.5e-3 · mu_water per mm of path
        np.testing.assert_allclose(p1, want, atol=0.5e-3 * MU * FOV + 1e-5)
        assert np.abs(p1 - p0).max() > 20 * (0.5e-3 * MU * FOV)  # the jitter is far above that tolerance


def test_jitter_leaves_air_lung_and_fill_alone() -> None:
    aug = Augmentation("v", 0, hu_scale=1.1, hu_offset=30.0, jitter_above_hu=-500.0)
    hu = np.array([-1024.0, -1000.0, -800.0, -500.0, -499.0, 0.0, 1000.0], dtype=np.float32)
    np.testing.assert_allclose(aug.jitter(hu), [-1024, -1000, -800, -500, 1.1 * -499 + 30, 30, 1130], rtol=1e-6)


# --------------------------------------------------------------------------- sampling


def cfg(**kw: object) -> AugmentParams:
    base = {"copies": 3, "seed": 0, "rotate_deg": (5, 5, 10), "translate_mm": (10, 10, 10), "flip_lr": 0.5,
            "allow_lr_flip": True, "hu_scale": 0.05, "hu_offset": 20.0}
    return AugmentParams(**{**base, **kw})


def test_copies_are_deterministic_per_seed_and_id() -> None:
    one = plan_copies(["a", "b"], cfg())
    assert list(one) == [aug_id(v, j) for v in ("a", "b") for j in range(3)] == ["a__aug0", "a__aug1", "a__aug2",
                                                                                 "b__aug0", "b__aug1", "b__aug2"]
    assert one == plan_copies(["b", "a"], cfg())  # same seed: same copies, whatever the order
    assert plan_copies(["b"], cfg()) == {k: v for k, v in one.items() if k.startswith("b")}  # independent of others
    other = plan_copies(["a", "b"], cfg(seed=1))
    assert all(one[k] != other[k] for k in one)  # a different seed: different copies
    a0 = one["a__aug0"]
    assert a0 == Augmentation.from_json(json.loads(json.dumps(a0.to_json())))
    assert all(abs(x) <= m for x, m in zip(a0.rotate_deg, (5, 5, 10)))
    assert 0.95 <= a0.hu_scale <= 1.05 and abs(a0.hu_offset) <= 20.0
    assert plan_copies(["a"], cfg(copies=0)) == {}
    flips = [sample_augmentation(cfg(), "a", j).flip_lr for j in range(40)]
    assert 5 < sum(flips) < 35  # p = 0.5
    with pytest.raises(ConfigError, match="rotate_deg"):
        params_from_dict({"preprocess": {"augment": {"rotate_deg": [-1, 0, 0]}}})


# --------------------------------------------------------------------------- the preprocess step


def small_params(**augment: object):
    stage = {"fov_mm": FOV, "token_grid": 4, "dim": 8, "depth": 1, "heads": 1}
    return params_from_dict({
        "stages": {"stage1": {**stage, "size": 8, "conv_channels": [4]},
                   "stage2": {**stage, "size": 16, "conv_channels": [4, 4]}},
        "drr": {"geometry": "cone", "pixels": 16, "pixel_mm": FOV * 1.5 / 16},
        # the clean training renderer: these tests compare DRRs (train-time detector: test_protocol.py)
        "preprocess": {"workers": 1, "augment": augment, "train_detector": False},
    })


@pytest.fixture(scope="module")
def inputs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("aug_in")
    vol = phantom()
    for i, vid in enumerate(("tr_a", "tr_b", "va_c", "te_d")):
        v = CTVolume(hu=vol.hu + 10.0 * i, affine=vol.affine.copy())
        save_ct(root / "volumes" / f"{vid}.nii.gz", v)
    (root / "splits.json").write_text(json.dumps({"train": ["tr_a", "tr_b"], "val": ["va_c"], "test": ["te_d"]}))
    return root / "volumes", root / "splits.json"


def test_identity_copies_equal_the_originals_bit_for_bit(inputs: tuple[Path, Path], tmp_path: Path) -> None:
    vols, splits = inputs
    res = run_preprocess(vols, splits, tmp_path / "p", small_params(copies=1), progress=False)
    man = res.manifest
    assert man["splits"]["train"] == ["tr_a", "tr_a__aug0", "tr_b", "tr_b__aug0"]
    for vid in ("tr_a", "tr_b"):
        for rel in (stage_file(1, vid), stage_file(2, vid)):
            a = (tmp_path / "p" / rel).read_bytes()
            assert a == (tmp_path / "p" / rel.replace(vid, vid + "__aug0")).read_bytes(), rel
        with np.load(tmp_path / "p" / xray_file(vid)) as x0, np.load(tmp_path / "p" / xray_file(vid + "__aug0")) as x1:
            for key in ("frontal", "lateral", "geometry"):
                assert np.array_equal(x0[key], x1[key]), key
        assert man["items"][vid + "__aug0"]["augment"]["source_id"] == vid


def test_val_test_never_augmented_and_reruns_follow_the_settings(inputs: tuple[Path, Path], tmp_path: Path) -> None:
    vols, splits = inputs
    out = tmp_path / "p"
    p1 = small_params(copies=2, rotate_deg=[0, 0, 20], flip_lr=0.5, allow_lr_flip=True, hu_scale=0.05, hu_offset=10.0)
    res = run_preprocess(vols, splits, out, p1, progress=False)
    man = read_manifest(out)
    assert man["splits"]["val"] == ["va_c"] and man["splits"]["test"] == ["te_d"]
    copies = sorted(v for v, it in man["items"].items() if "augment" in it)
    assert copies == ["tr_a__aug0", "tr_a__aug1", "tr_b__aug0", "tr_b__aug1"]
    assert all(man["items"][v]["split"] == "train" for v in copies)
    assert not any(v.startswith(("va_c", "te_d")) and v not in ("va_c", "te_d") for v in man["items"])
    rec = json.loads((out / "records" / "tr_a__aug1.json").read_text())
    assert rec["augment"] == sample_augmentation(p1.preprocess.augment, "tr_a", 1).to_json()
    assert man["params"]["augment"]["copies"] == 2
    assert not np.array_equal(np.load(out / stage_file(2, "tr_a")), np.load(out / stage_file(2, "tr_a__aug0")))
    # same settings: nothing redone; new rotation range: only the copies are redone; copies 0: they are removed
    assert run_preprocess(vols, splits, out, p1, progress=False).processed == []
    p2 = small_params(copies=2, rotate_deg=[0, 0, 30], flip_lr=0.5, allow_lr_flip=True, hu_scale=0.05, hu_offset=10.0)
    assert sorted(run_preprocess(vols, splits, out, p2, progress=False).processed) == copies
    res = run_preprocess(vols, splits, out, small_params(copies=0), progress=False)
    assert res.processed == [] and len(res.removed) == 4 * 4  # 2 stages + xrays + record per copy
    assert "augment" not in res.manifest["params"]
    assert res.manifest["params_digest"] == PreprocessSettings.from_params(small_params()).digest()
