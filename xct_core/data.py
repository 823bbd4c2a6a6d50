"""Torch Dataset over the preprocessed folder (layout: :mod:`xct_core.preprocess`).

Each item is one volume at one cascade stage::

    {"id": str,
     "x0": float32 [1, S, S, S]        stage-k volume in the networks' units [-1, 1] (HUMap.forward),
     "frontal": float32 [1, P, P]      DRR line integral ∫mu dl (dimensionless, not scaled),
     "lateral": float32 [1, P, P],
     "x0_prev": float32 [1, S', S', S'] (stage k > 1 only) stage k-1's ground-truth volume,
                                        mapped the same way; the model upsamples and
                                        noise-augments it}

Volumes are stored full-range int16 HU and mapped here, at load time, with the HU map
passed in (``params.hu.net_map()``) — a different map needs no re-run of the
preprocess step. Axes (i, j, k) = RAS+ (docs/CONVENTIONS.md); X-ray images: row 0 superior,
frontal shows the patient's right on the left columns, lateral anterior on the left.

Memory-light: volumes are opened with ``np.load(mmap_mode="r")`` and only the item being
read is materialised. Nothing is augmented here (validation/test data never is; training
augmentation, if any, must re-render the DRRs from the augmented CT).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from xct_core.errors import InputError
from xct_core.geometry import VIEWS, PlacedGeometry
from xct_core.hu import HUMap, HUWindow
from xct_core.grid import StageGrid
from xct_core.preprocess import item_affine, read_manifest, stage_file, xray_file

__all__ = ["XrayCTDataset", "stage_affine_for", "stage_grid_for"]


def stage_grid_for(processed_dir: str | Path, k: int) -> StageGrid:
    """Stage ``k``'s (1-based) grid as recorded in ``processed_dir``'s manifest."""
    return _grid(read_manifest(processed_dir), k, Path(processed_dir))


def stage_affine_for(processed_dir: str | Path, k: int) -> np.ndarray:
    """Voxel → world (mm, RAS+) affine of stage ``k``'s grid, centred at the world origin.

    Equals :func:`xct_core.models.stage_affine` for the same size/FOV. Each stored volume
    sits on this grid translated to its own centre (``XrayCTDataset.affine_of``); the
    projection geometry is relative to the grid centre, so both describe the same X-rays.
    """
    return stage_grid_for(processed_dir, k).affine()


def _grid(manifest: dict[str, Any], k: int, where: Path) -> StageGrid:
    stages = manifest["stages"]
    if not isinstance(k, int) or not 1 <= k <= len(stages):
        raise InputError(where, f"stage {k!r} not in the processed data (stages 1…{len(stages)})")
    st = stages[k - 1]
    return StageGrid(int(st["k"]), int(st["size"]), float(st["fov_mm"]))


class XrayCTDataset(Dataset):
    """Biplanar DRRs + stage-``k`` target volume (+ stage k-1 volume) per volume id.

    Args:
        processed_dir: output folder of the preprocess step (must hold ``manifest.json``).
        stage: 1-based stage index.
        split: ``"train"``, ``"val"`` or ``"test"``.
        window: the networks' HU map (:class:`~xct_core.hu.HUMap`, or a window), applied at
            load time; ``None``: X-rays, geometry and ids only (``__getitem__`` refuses).
        ids: optional subset of the split's ids (order kept); ids outside the split are an error.

    Raises :class:`InputError` naming the missing file when the folder, the manifest or any
    file this dataset needs is absent.
    """

    def __init__(
        self,
        processed_dir: str | Path,
        stage: int,
        split: str,
        window: HUWindow | HUMap | None,
        *,
        ids: Sequence[str] | None = None,
    ) -> None:
        self.root = Path(processed_dir)
        self.manifest = read_manifest(self.root)
        self.stage = stage
        self.grid = _grid(self.manifest, stage, self.root)
        self.prev_grid = _grid(self.manifest, stage - 1, self.root) if stage > 1 else None
        splits = self.manifest["splits"]
        if split not in splits:
            raise InputError(self.root / "manifest.json", f"no split {split!r} (have {', '.join(splits)})")
        self.split = split
        available = list(splits[split])
        if ids is None:
            self.ids = available
        else:
            avail = set(available)
            stray = [v for v in ids if v not in avail]
            if stray:
                raise InputError(self.root / "manifest.json", f"ids not in split {split!r}: {', '.join(stray[:5])}")
            self.ids = list(ids)
        self.window = window
        self.pixels = int(self.manifest["xrays"]["pixels"])
        for vid in self.ids:
            for rel in self._files(vid):
                if not (self.root / rel).is_file():
                    raise InputError(self.root / rel, "missing from the processed data (re-run preprocess)")

    def _files(self, vid: str) -> list[str]:
        rels = [stage_file(self.stage, vid), xray_file(vid)]
        if self.stage > 1:
            rels.append(stage_file(self.stage - 1, vid))
        return rels

    def __len__(self) -> int:
        return len(self.ids)

    def _volume(self, k: int, vid: str, size: int) -> torch.Tensor:
        path = self.root / stage_file(k, vid)
        arr = np.load(path, mmap_mode="r", allow_pickle=False)
        if arr.shape != (size, size, size) or arr.dtype != np.int16:
            raise InputError(path, f"expected int16 {(size,) * 3}, got {arr.dtype} {arr.shape}")
        if self.window is None:
            raise ValueError("this dataset was opened without an HU map: it serves X-rays and geometry only")
        x = self.window.forward(np.asarray(arr, dtype=np.float32))
        return torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)).unsqueeze(0)

    def _xrays(self, vid: str) -> dict[str, torch.Tensor]:
        path = self.root / xray_file(vid)
        p = self.pixels
        with np.load(path, allow_pickle=False) as z:
            out = {}
            for view in VIEWS:
                img = z[view]
                if img.shape != (p, p):
                    raise InputError(path, f"{view} image has shape {img.shape}, expected {(p, p)}")
                out[view] = torch.from_numpy(np.ascontiguousarray(img, dtype=np.float32)).unsqueeze(0)
        return out

    def xrays(self, vid: str) -> dict[str, np.ndarray]:
        """``{"frontal", "lateral"}``: ``vid``'s stored line-integral images, float32 [P, P]."""
        return {v: t[0].numpy() for v, t in self._xrays(vid).items()}

    def __getitem__(self, index: int) -> dict[str, Any]:
        vid = self.ids[index]
        item: dict[str, Any] = {"id": vid, "x0": self._volume(self.stage, vid, self.grid.size)}
        item.update(self._xrays(vid))
        if self.prev_grid is not None:
            item["x0_prev"] = self._volume(self.stage - 1, vid, self.prev_grid.size)
        return item

    # ------------------------------------------------------------------ geometry
    def affine_of(self, vid: str, stage: int | None = None) -> np.ndarray:
        """World affine of ``vid``'s stage grid (default: this dataset's stage), centred on
        that volume's centre."""
        return item_affine(self.manifest, self.stage if stage is None else stage, vid)

    def geometry_of(self, vid: str) -> dict[str, PlacedGeometry]:
        """The placed projection geometry of each view, as stored with ``vid``'s X-rays."""
        path = self.root / xray_file(vid)
        with np.load(path, allow_pickle=False) as z:
            doc = json.loads(str(z["geometry"]))
        return {v: PlacedGeometry.from_json(doc[v]) for v in VIEWS}
