"""Tiny training set-ups shared by tests/test_training.py, tests/test_train_ray.py and
benchmarks/bench_train.py: a two-stage 16³/32³ cascade with 16-pixel DRRs, and a processed
data folder made by the real preprocess step from procedural phantoms."""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from components.ops_params import OpsParams as Params  # the whole file's model: train.ray, hpo included
from components.ops_params import params_from_dict
from xct_core.io import save_nifti
from xct_core.phantoms import make_phantom

REPO = Path(__file__).resolve().parents[1]

#: two tiny stages (~35k parameters each): 16³ then 32³, one transformer block
TINY_STAGES: dict[str, Any] = {
    "stage1": dict(size=16, fov_mm=409.6, token_grid=8, conv_channels=[8], dim=16, depth=1, heads=2,
                   lift_channels=4, enc_channels=[8, 16], physics_weight=0.0, lr=2e-3, batch_size=2),
    "stage2": dict(size=32, fov_mm=409.6, token_grid=8, conv_channels=[4, 8], dim=16, depth=1, heads=2,
                   lift_channels=4, enc_channels=[8, 16], physics_weight=0.1, lr=2e-3, batch_size=1),
}


def tiny_params(train: dict[str, Any] | None = None, **sections: Any) -> Params:
    """The default params (= the demo profile) with the tiny cascade, 16-pixel cone-beam
    DRRs and a short training schedule; ``train`` / ``sections`` override keys (one level
    deep). Built from the typed defaults, not params.yaml, so edits there cannot break it."""
    data = Params().model_dump(mode="json")
    data["stages"] = json.loads(json.dumps(TINY_STAGES))
    data["drr"] = {**data["drr"], "pixels": 16, "pixel_mm": 40.0}
    data["train"] = {
        **data["train"],
        "steps": {"stage1": 6, "stage2": 4},
        "warmup_steps": 2,
        "log_every": 2,
        "ckpt_every": 2,
        "keep_last": 2,
        "val_every": 0,
        "val_sample_steps": 2,
        "val_max_volumes": 1,
        "ema_decay": 0.9,
        "direct_baseline": False,  # the twin only where a test asks for it (speed)
        **(train or {}),
    }
    # one sample at diffusion.sample_steps (what the tests' known answers use; the demo draws more)
    data["eval"] = {**data["eval"], "samples": 1, "sample_steps": None}
    data["reconstruct"] = {**data["reconstruct"], "samples": 1}
    for key, val in sections.items():
        data[key] = {**data.get(key, {}), **val} if isinstance(val, dict) else val
    return params_from_dict(data, "tiny params")


def build_processed(root: Path, params: Params, n_train: int = 4, n_val: int = 1, seed: int = 0) -> Path:
    """Phantoms (finest stage grid, the stages' FOV) → NIfTI → ``components.preprocess``;
    returns the processed folder ``root/processed``."""
    from components.preprocess import run_preprocess

    stages = list(params.stages.values())
    size = stages[-1].size
    spacing = stages[-1].fov_mm / size
    vols = root / "volumes"
    vols.mkdir(parents=True, exist_ok=True)
    ids = [f"ph{i:02d}" for i in range(n_train + n_val)]
    for i, vid in enumerate(ids):
        hu, _, affine = make_phantom(size, spacing, seed * 1000 + i)
        save_nifti(vols / f"{vid}.nii.gz", hu, affine)
    splits = root / "splits.json"
    splits.write_text(json.dumps({"train": ids[:n_train], "val": ids[n_train:], "test": []}))
    out = root / "processed"
    run_preprocess(vols, splits, out, params, workers=1, progress=False)
    return out


@contextmanager
def one_torch_thread() -> Iterator[None]:
    """One intra-op torch thread, restored afterwards: on the shared 2-core box OpenMP threads
    spinning at barriers under oversubscription cost far more than they gain for small models."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)
