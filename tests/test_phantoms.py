"""Procedural torso phantoms (xct_core.phantoms) and picture helpers (xct_core.viz).

Anatomy is checked in world coordinates computed from the label map and the affine
(never from array order): heart/aorta/stomach/spleen on the patient's left (smaller x),
liver on the right, sternum anterior to the spine, lungs superior to the liver.
"""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from PIL import Image
from scipy import ndimage

from xct_core import phantoms as P
from xct_core import viz
from xct_core.config import SynthParams
from xct_core.errors import InputError
from xct_core.phantoms import Label

SMALL = dict(size=48, spacing_mm=8.5)  # 408 mm field of view, ~0.1 s per phantom


def centroid_world(labels: np.ndarray, affine: np.ndarray, *which: Label) -> np.ndarray:
    """World (RAS+ mm) centroid of the voxels carrying any of ``which``."""
    ijk = np.argwhere(np.isin(labels, [int(w) for w in which]))
    assert len(ijk) > 0, f"no voxels labelled {which}"
    return (affine[:3, :3] @ ijk.mean(axis=0)) + affine[:3, 3]


@pytest.fixture(scope="module")
def small_set() -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    return [P.make_phantom(rng_or_seed=[11, i], contrast=bool(i % 2), **SMALL) for i in range(6)]


@pytest.fixture(scope="module")
def full_pair() -> dict[bool, tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """The same patient at the default grid (128³ @ 3.2 mm) without and with IV contrast."""
    return {c: P.make_phantom(128, 3.2, [2, 0], contrast=c) for c in (False, True)}


# --------------------------------------------------------------------------- basics


def test_labels_documented_with_nominal_hu() -> None:
    assert set(P.NOMINAL_HU) == set(Label)
    assert len({int(v) for v in Label}) == len(Label)
    assert max(Label) < 256  # stored as uint8


def test_affine_is_canonical_ras_and_centred() -> None:
    hu, labels, aff = P.make_phantom(20, 7.0, 0)
    assert hu.shape == labels.shape == (20, 20, 20)
    assert hu.dtype == np.float32 and labels.dtype == np.uint8
    assert nib.aff2axcodes(aff) == ("R", "A", "S")
    np.testing.assert_allclose(np.sqrt((aff[:3, :3] ** 2).sum(0)), [7.0] * 3)
    np.testing.assert_allclose(aff @ [9.5, 9.5, 9.5, 1.0], [0, 0, 0, 1], atol=1e-9)
    assert hu.min() >= P.HU_MIN and hu.max() <= P.HU_MAX


def test_deterministic_by_seed() -> None:
    a = P.make_phantom(rng_or_seed=[5, 0], **SMALL)
    b = P.make_phantom(rng_or_seed=[5, 0], **SMALL)
    c = P.make_phantom(rng_or_seed=[6, 0], **SMALL)
    for x, y in zip(a, b):
        assert np.array_equal(x, y)
    assert not np.array_equal(a[1], c[1]) and not np.array_equal(a[0], c[0])


def test_phantom_depends_only_on_seed_and_index() -> None:
    later = P.synth_phantom(4, 2, 32, 12.8)
    for i in range(3):  # generating other phantoms first changes nothing
        P.synth_phantom(4, i, 32, 12.8)
    again = P.synth_phantom(4, 2, 32, 12.8)
    assert np.array_equal(later.hu, again.hu) and later.contrast == again.contrast
    other = P.synth_phantom(4, 3, 32, 12.8)
    assert not np.array_equal(later.labels, other.labels)


def test_contrast_changes_values_not_anatomy(full_pair) -> None:
    (hu0, lab0, _), (hu1, lab1, _) = full_pair[False], full_pair[True]
    assert np.array_equal(lab0, lab1)
    m = lab0 == Label.BLOOD_POOL
    assert np.median(hu1[m]) - np.median(hu0[m]) > 150


def test_bad_arguments_raise() -> None:
    with pytest.raises(ValueError):
        P.make_phantom(P.MIN_SIZE - 1, 3.0, 0)
    with pytest.raises(ValueError):
        P.make_phantom(32, 0.0, 0)
    with pytest.raises(ValueError):
        P.phantom_rng(-1, 0)


# --------------------------------------------------------------------------- HU per tissue

#: expected HU medians over "core" voxels (all 26 neighbours share the label), per the issue
HU_RANGES: dict[Label, tuple[tuple[float, float], tuple[float, float]]] = {  # (plain, contrast)
    Label.AIR: ((-1010, -990), (-1010, -990)),
    Label.FAT: ((-130, -70), (-130, -70)),
    Label.SOFT_TISSUE: ((20, 70), (20, 80)),
    Label.LUNG: ((-900, -800), (-900, -800)),
    Label.MYOCARDIUM: ((20, 70), (60, 140)),
    Label.BLOOD_POOL: ((20, 70), (240, 320)),
    Label.AORTA: ((20, 70), (240, 360)),
    Label.LIVER: ((40, 80), (80, 130)),
    Label.GAS: ((-1010, -950), (-1010, -950)),
    Label.AIRWAY: ((-1010, -950), (-1010, -950)),
    Label.VERTEBRA: ((150, 260), (150, 260)),
    Label.STERNUM: ((250, 450), (250, 450)),
}


@pytest.mark.parametrize("contrast", [False, True])
def test_tissue_hu_ranges(full_pair, contrast: bool) -> None:
    hu, labels, _ = full_pair[contrast]
    cube = np.ones((3, 3, 3), dtype=bool)
    for lab, ranges in HU_RANGES.items():
        core = ndimage.binary_erosion(labels == lab, cube)
        assert core.sum() >= 20, f"{lab.name}: too few core voxels ({core.sum()})"
        lo, hi = ranges[contrast]
        med = float(np.median(hu[core]))
        assert lo <= med <= hi, f"{lab.name} (contrast={contrast}): median {med:.0f} HU not in [{lo}, {hi}]"
    # thin bones: the densest voxels reach bone values (partial volume lowers the rest)
    assert np.percentile(hu[labels == Label.RIB], 95) > 500
    cortex = hu[labels == Label.CORTICAL_BONE]
    assert np.percentile(cortex, 50) > 150 and np.percentile(cortex, 90) > 300
    # noise/texture: mild (10-30 HU) inside a large homogeneous organ
    core = ndimage.binary_erosion(labels == Label.LIVER, cube, iterations=2)
    assert 8.0 < float(hu[core].std()) < 30.0


def test_pulmonary_vessels_inside_the_lungs(full_pair) -> None:
    hu, labels, aff = full_pair[True]
    ves = labels == Label.LUNG_VESSEL
    assert ves.sum() > 200
    # most vessel voxels touch lung (they branch inside it, not in the chest wall)
    near_lung = ndimage.binary_dilation(labels == Label.LUNG, np.ones((3, 3, 3), bool), iterations=2)
    assert (ves & near_lung).sum() / ves.sum() > 0.8
    # enhanced vessels raise the lung's upper HU percentiles well above parenchyma
    assert np.percentile(hu[(labels == Label.LUNG) | ves], 99) > 0.0


# --------------------------------------------------------------------------- anatomy


def test_laterality_in_world_coordinates(small_set) -> None:
    for hu, labels, aff in small_set:
        spine = centroid_world(labels, aff, Label.VERTEBRA)
        heart = centroid_world(labels, aff, Label.MYOCARDIUM, Label.BLOOD_POOL)
        liver = centroid_world(labels, aff, Label.LIVER)
        aorta = centroid_world(labels, aff, Label.AORTA)
        stomach = centroid_world(labels, aff, Label.STOMACH, Label.GAS)
        sternum = centroid_world(labels, aff, Label.STERNUM)
        lungs = centroid_world(labels, aff, Label.LUNG)
        # x: +right. heart, aorta, stomach on the patient's left; liver on the right
        assert heart[0] < spine[0] - 5, (heart, spine)
        assert aorta[0] < spine[0], (aorta, spine)
        assert stomach[0] < spine[0] - 20
        assert liver[0] > spine[0] + 20, (liver, spine)
        # y: +anterior. sternum in front of the spine, heart in front of the spine
        assert sternum[1] > spine[1] + 80
        assert heart[1] > spine[1] + 30
        # z: +superior. lungs above the liver, heart above the liver
        assert lungs[2] > liver[2] + 50
        assert heart[2] > liver[2]


def test_left_and_right_lungs_differ_in_height(small_set) -> None:
    """The right hemidiaphragm is higher (liver): the right lung base is higher than the left."""
    for hu, labels, aff in small_set:
        lung = labels == Label.LUNG
        x = aff[0, 0] * np.arange(lung.shape[0]) + aff[0, 3]
        z = aff[2, 2] * np.arange(lung.shape[2]) + aff[2, 3]
        spine_x = centroid_world(labels, aff, Label.VERTEBRA)[0]
        right = lung & (x[:, None, None] > spine_x + 40)
        left = lung & (x[:, None, None] < spine_x - 40)
        zr = np.percentile(np.broadcast_to(z, lung.shape)[right], 2)
        zl = np.percentile(np.broadcast_to(z, lung.shape)[left], 2)
        assert zr > zl - 5.0


def test_patients_vary(small_set) -> None:
    widths, hearts, livers = [], [], []
    for hu, labels, aff in small_set:
        body = np.argwhere(labels != Label.AIR)
        widths.append((body[:, 0].max() - body[:, 0].min()) * aff[0, 0])
        hearts.append(centroid_world(labels, aff, Label.MYOCARDIUM, Label.BLOOD_POOL))
        livers.append((labels == Label.LIVER).sum())
    assert np.ptp(widths) >= 2 * SMALL["spacing_mm"], widths
    assert np.ptp(np.asarray(hearts), axis=0).max() > 10.0
    assert np.ptp(livers) / np.mean(livers) > 0.05


def test_same_patient_at_two_resolutions() -> None:
    """Anatomy is defined in mm: 64³ @ 6.4 mm and 128³ @ 3.2 mm show the same patient."""
    coarse = P.make_phantom(64, 6.4, [3, 1])
    fine = P.make_phantom(128, 3.2, [3, 1])
    for lab in (Label.LIVER, Label.LUNG, Label.VERTEBRA, Label.AORTA):
        a = centroid_world(coarse[1], coarse[2], lab)
        b = centroid_world(fine[1], fine[2], lab)
        assert np.abs(a - b).max() < 4.0, (lab.name, a, b)
    vol = lambda ph, lab: (ph[1] == lab).sum() * ph[2][0, 0] ** 3  # noqa: E731
    assert vol(coarse, Label.LIVER) == pytest.approx(vol(fine, Label.LIVER), rel=0.05)
    # the line integral through the phantom (what a DRR sees) matches too
    mu = lambda ph: np.clip(0.02 * (1 + ph[0] / 1000.0), 0, None).sum() * ph[2][0, 0] ** 3  # noqa: E731
    assert mu(coarse) == pytest.approx(mu(fine), rel=0.01)


# --------------------------------------------------------------------------- data set writer


def test_write_phantoms_prefix_and_files(tmp_path: Path) -> None:
    sp = SynthParams(n=3, size=24, seed=9, spacing_mm=16.0)
    a = P.write_phantoms(tmp_path / "a", sp, preview=False)
    b = P.write_phantoms(tmp_path / "b", sp.model_copy(update={"n": 2}), preview=False)
    assert [p.name for p in a] == ["phantom_0000.nii.gz", "phantom_0001.nii.gz", "phantom_0002.nii.gz"]
    for pa, pb in zip(a, b):
        assert pa.read_bytes() == pb.read_bytes()
    assert (tmp_path / "a" / P.MANIFEST_NAME).exists()
    assert not [p for p in (tmp_path / "a").iterdir() if p.name.startswith(".")]  # no temp files left


def test_write_phantoms_rejects_a_file_as_out_dir(tmp_path: Path) -> None:
    f = tmp_path / "file"
    f.write_text("x")
    with pytest.raises(InputError, match="not a directory"):
        P.write_phantoms(f, SynthParams(n=1, size=16), preview=False)


# --------------------------------------------------------------------------- pictures


def test_slice_orientation_convention() -> None:
    """A marker at the patient's right/anterior/superior lands where the conventions say."""
    v = np.zeros((10, 12, 14), np.float32)
    v[8, 6, 7] = 1.0  # right of centre
    v[5, 10, 7] = 2.0  # anterior
    v[5, 6, 12] = 3.0  # superior
    ax = viz.orthogonal_slice(v, "axial", 7)  # rows A→P, cols R→L
    assert ax.shape == (12, 10)
    r, c = np.argwhere(ax == 1.0)[0]
    assert c < 5  # patient's right on the image's left
    r, c = np.argwhere(ax == 2.0)[0]
    assert r < 6  # anterior at the top
    cor = viz.orthogonal_slice(v, "coronal", 6)  # rows S→I, cols R→L
    r, c = np.argwhere(cor == 3.0)[0]
    assert r < 7 and cor.shape == (14, 10)
    assert np.argwhere(cor == 1.0)[0][1] < 5
    sag = viz.orthogonal_slice(v, "sagittal", 5)  # rows S→I, cols A→P
    assert np.argwhere(sag == 2.0)[0][1] < 6 and np.argwhere(sag == 3.0)[0][0] < 7


def test_pictures_are_written_atomically(tmp_path: Path, artifacts_dir: Path) -> None:
    import torch

    vol = P.make_phantom(48, 8.5, [1, 0], contrast=True)
    volumes = {"phantom": vol[0], "torch": torch.from_numpy(vol[0])}
    path = viz.save_slice_montage(volumes, tmp_path / "m.png", window=["soft_tissue", "lung"], spacing=vol[2])
    img = Image.open(path)
    assert img.format == "PNG" and img.size[0] > img.size[1] > 100
    row = viz.save_image_row({"a": np.eye(8), "b": torch.ones(4, 6)}, tmp_path / "r.png", shared_scale=True)
    assert Image.open(row).size[0] > 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.png", "r.png"]
    with pytest.raises(ValueError):
        viz.save_image_row({"bad": np.zeros((2, 2, 2))}, tmp_path / "bad.png")
    assert not (tmp_path / "bad.png").exists()


def test_phantom_preview_and_drr_laterality(artifacts_dir: Path) -> None:
    """Frontal DRR (PA display): the heart's extra attenuation lies on the image's right half."""
    ph = P.synth_phantom(0, 0, 96, 4.4)
    pair = viz.drr_pair(ph.hu, ph.affine)
    assert set(pair) == {"frontal", "lateral"} and pair["frontal"].shape == (96, 96)
    # rows through the heart: more attenuation on the patient's left = image right columns
    hc = centroid_world(ph.labels, ph.affine, Label.MYOCARDIUM, Label.BLOOD_POOL)
    row = int(round((ph.affine[2, 3] + (96 - 1) * 4.4 - hc[2]) / 4.4))  # row 0 = superior
    band = pair["frontal"][row - 3 : row + 4]
    half = band.shape[1] // 2
    assert band[:, half:].mean() > band[:, :half].mean()
    out = viz.save_ct_preview(
        {f"phantom {i}": (p.hu, p.affine) for i, p in enumerate([ph, P.synth_phantom(0, 1, 96, 4.4)])},
        artifacts_dir / "phantoms_preview.png",
        title="test_phantoms: seed 0, 96³ @ 4.4 mm",
    )
    assert out.exists() and Image.open(out).size[0] > 800
