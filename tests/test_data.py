"""XrayCTDataset over a tiny preprocessed folder (built by the real preprocess step)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from components.preprocess import run_preprocess
from test_preprocess import FOV, SPLITS, small_params, write_inputs
from xct_core.data import XrayCTDataset, stage_affine_for, stage_grid_for
from xct_core.errors import InputError
from xct_core.hu import get_window
from xct_core.preprocess import stage_file, xray_file

SOFT = get_window("soft_tissue")  # [-200, 200] HU


@pytest.fixture(scope="module")
def processed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("data")
    vols, splits = write_inputs(root)
    out = root / "processed"
    run_preprocess(vols, splits, out, small_params(), progress=False)
    return out


def test_stage1_items(processed: Path) -> None:
    ds = XrayCTDataset(processed, 1, "train", SOFT)
    assert len(ds) == 2 and ds.ids == SPLITS["train"]
    item = ds[0]
    assert set(item) == {"id", "x0", "frontal", "lateral"}  # no x0_prev at stage 1
    assert item["id"] == "vol_a"
    assert item["x0"].shape == (1, 8, 8, 8) and item["x0"].dtype == torch.float32
    for view in ("frontal", "lateral"):
        assert item[view].shape == (1, 16, 16) and item[view].dtype == torch.float32


def test_stage2_items_window_and_prev(processed: Path) -> None:
    ds = XrayCTDataset(processed, 2, "val", SOFT)
    item = ds[0]
    assert set(item) == {"id", "x0", "frontal", "lateral", "x0_prev"} and item["id"] == "vol_c"
    assert item["x0"].shape == (1, 16, 16, 16) and item["x0_prev"].shape == (1, 8, 8, 8)
    # windowed at load time: x0 = clip((HU - lo) * 2 / width - 1, -1, 1) of the stored int16 HU
    for key, k in (("x0", 2), ("x0_prev", 1)):
        hu = np.load(processed / stage_file(k, "vol_c")).astype(np.float64)
        want = np.clip((hu + 200.0) / 200.0 - 1.0, -1.0, 1.0)
        np.testing.assert_allclose(item[key][0].numpy(), want, atol=1e-6)
        assert item[key].min() == -1.0 and item[key].max() == 1.0  # air and the marker saturate
    # X-rays are the stored line integrals, unscaled
    with np.load(processed / xray_file("vol_c")) as z:
        np.testing.assert_array_equal(item["frontal"][0].numpy(), z["frontal"])
        np.testing.assert_array_equal(item["lateral"][0].numpy(), z["lateral"])
    # another window needs no re-run: a 40 HU+ body voxel maps differently under "wide"
    wide = XrayCTDataset(processed, 2, "val", get_window("wide"))[0]["x0"]
    hu = np.load(processed / stage_file(2, "vol_c")).astype(np.float64)
    np.testing.assert_allclose(wide[0].numpy(), np.clip(hu / 1024.0, -1, 1), atol=1e-6)


def test_dataloader_batches(processed: Path) -> None:
    ds = XrayCTDataset(processed, 2, "train", SOFT)
    batch = next(iter(DataLoader(ds, batch_size=2, shuffle=False)))
    assert batch["id"] == ["vol_a", "vol_b"]
    assert batch["x0"].shape == (2, 1, 16, 16, 16) and batch["x0_prev"].shape == (2, 1, 8, 8, 8)
    assert batch["frontal"].shape == (2, 1, 16, 16)


def test_ids_subset_and_split_errors(processed: Path) -> None:
    assert XrayCTDataset(processed, 1, "train", SOFT, ids=["vol_b"]).ids == ["vol_b"]
    with pytest.raises(InputError, match="ids not in split 'train': vol_c"):
        XrayCTDataset(processed, 1, "train", SOFT, ids=["vol_c"])
    with pytest.raises(InputError, match="no split 'holdout'"):
        XrayCTDataset(processed, 1, "holdout", SOFT)
    with pytest.raises(InputError, match=r"stage 3 not in the processed data \(stages 1…2\)"):
        XrayCTDataset(processed, 3, "train", SOFT)


def test_missing_or_incomplete_folder(processed: Path, tmp_path: Path) -> None:
    with pytest.raises(InputError, match="processed data folder not found"):
        XrayCTDataset(tmp_path / "nothing", 1, "train", SOFT)
    broken = Path(shutil.copytree(processed, tmp_path / "broken"))
    (broken / stage_file(1, "vol_b")).unlink()
    XrayCTDataset(broken, 1, "val", SOFT)  # other splits do not need it
    with pytest.raises(InputError, match=r"stage1/vol_b\.npy: missing from the processed data"):
        XrayCTDataset(broken, 2, "train", SOFT)  # stage 2 needs stage 1 as x0_prev
    (broken / xray_file("vol_c")).unlink()
    with pytest.raises(InputError, match=r"xrays/vol_c\.npz: missing"):
        XrayCTDataset(broken, 1, "val", SOFT)
    (broken / "manifest.json").unlink()
    with pytest.raises(InputError, match="manifest.json: manifest not found"):
        XrayCTDataset(broken, 1, "val", SOFT)


def test_grids_and_geometry(processed: Path) -> None:
    aff = stage_affine_for(processed, 2)
    assert stage_grid_for(processed, 2).spacing_mm == FOV / 16
    np.testing.assert_allclose(np.diag(aff)[:3], FOV / 16)
    np.testing.assert_allclose(aff[:3, :3] @ np.full(3, 7.5) + aff[:3, 3], 0.0, atol=1e-9)  # origin-centred
    try:
        from xct_core.models import stage_affine
    except ImportError:  # the model package is optional for this check
        pass
    else:
        np.testing.assert_allclose(aff, stage_affine(small_params().stages["stage2"]))
    ds = XrayCTDataset(processed, 2, "test", SOFT)
    man = json.loads((processed / "manifest.json").read_text())
    centre = np.asarray(man["items"]["vol_d"]["center_world"])
    per_item = ds.affine_of("vol_d")
    np.testing.assert_allclose(per_item[:3, :3], aff[:3, :3])
    np.testing.assert_allclose(per_item[:3, 3] - aff[:3, 3], centre, atol=1e-9)  # a pure translation
    geo = ds.geometry_of("vol_d")
    np.testing.assert_allclose(geo["frontal"].isocenter, centre, atol=1e-9)
    assert geo["frontal"].beam == (0.0, -1.0, 0.0) and geo["lateral"].beam == (1.0, 0.0, 0.0)
