"""The checks a stage training needs before any compute is spent (:func:`preflight`)."""

from __future__ import annotations

import math
from pathlib import Path

from xct_core.config import Params
from xct_core.errors import ConfigError, InputError
from xct_core.layout import RunLayout

__all__ = ["preflight"]


def preflight(
    params: Params,
    stage: int,
    processed_dir: str | Path,
    out_dir: str | Path | None = None,
    *,
    world_size: int = 1,
    steps: int | None = None,
    check_models: bool = True,
) -> None:
    """Check everything a stage training needs before any compute is spent (an engine calls
    it on the driver, :func:`train_stage` again on every worker).

    Raises :class:`ConfigError` (unknown stage, no ``train.steps`` entry, unknown
    ``best_metric``, batch larger than a worker's data shard) or :class:`InputError` (no or
    incomplete processed data, empty train split, earlier stage's exported model missing).
    """
    from xct_core.data import XrayCTDataset
    from xct_core.metrics import METRIC_KEYS

    st = params.stage(stage)
    if steps is None:
        st.train_steps  # noqa: B018 - raises ConfigError when absent
    tp = params.train
    base = tp.best_metric.removeprefix("single_")
    if base not in METRIC_KEYS and not base.startswith("reproj_"):
        raise ConfigError(f"train.best_metric {tp.best_metric!r} is not a validation metric ({', '.join(METRIC_KEYS)})")
    if tp.best_metric.startswith("reproj_") and not tp.val_reprojection:
        raise ConfigError(f"train.best_metric {tp.best_metric!r} needs train.val_reprojection: true")
    if st.cfg.anchor == "direct" and not tp.direct_baseline:
        raise ConfigError(f"{st.name}: anchor 'direct' (residual diffusion over the direct twin) needs "
                          "train.direct_baseline: true")
    ds = XrayCTDataset(processed_dir, st.k, "train", params.hu.net_map())
    if len(ds) == 0:
        raise InputError(Path(processed_dir) / "manifest.json", "the train split is empty")
    if ds.grid.size != st.size:
        raise ConfigError(
            f"{st.name}: processed data has {ds.grid.size}³ volumes for stage {st.k} but params say {st.size}³ "
            "(re-run preprocess)"
        )
    if st.cfg.anchor_folds > 1:  # every fold twin must have volumes to learn from and a fold to anchor
        from xct_core.training.crossfit import fold_of

        counts = [0] * st.cfg.anchor_folds
        for vid in ds.ids:
            counts[fold_of(vid, st.cfg.anchor_folds)] += 1
        if min(counts) == 0:
            raise ConfigError(f"{st.name}: anchor_folds {st.cfg.anchor_folds} leaves a fold without training volumes "
                              f"(train ids per fold: {counts}); use fewer folds")
    per_worker = math.ceil(len(ds) / world_size)
    if per_worker < st.cfg.batch_size:
        raise ConfigError(
            f"{st.name}: batch_size {st.cfg.batch_size} exceeds the {per_worker} training volumes per worker "
            f"({len(ds)} volumes / {world_size} workers)"
        )
    if check_models:
        layout = RunLayout(Path(out_dir if out_dir is not None else tp.out_dir).absolute(), st.k)
        for j in range(1, st.k):  # frozen earlier stages are needed for validation
            p = layout.model(tp.prev_stage_model, stage=j)
            if not p.is_file():
                raise InputError(p, f"stage {j} model not found: train stage {j} first (xct train --stage {j})")
