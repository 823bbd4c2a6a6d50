"""Cross-fitted anchors (``stages.stageK.anchor_folds`` = F ≥ 2) for an anchored stage.

Why: a residual diffusion anchored on its twin (``anchor: direct``) learns the distribution of
``x0 − twin(x-rays)``. Trained beside the twin on the same volumes it sees the twin's
IN-SAMPLE residuals, which are narrower than the twin's residuals on volumes it never saw —
exactly the residuals it must sample at inference: the spread comes out too small (stacking
without cross-fitting). Cross-fitting: the train ids are split into F folds by a stable hash of
the id (:func:`fold_of`: deterministic, the same on every rank and world size, independent of the
split's order); F extra twins are trained, twin ``g`` only on the volumes of the OTHER folds
(its per-sample loss weight is 0 on fold ``g``: :func:`fold_weights`), and the residual of a
fold-``g`` volume is taken over twin ``g`` (:class:`FoldAnchor`), a twin that never trained on it.

The all-data twin (learner ``direct``) is still trained, validated, exported as ``direct.pt``
and shipped inside the stage file as its anchor: at inference every volume is new to it, as
each training volume was new to its fold twin; it saw all the data (a better point estimate
than any fold twin or their average, which saw (F−1)/F of it), so its residuals on new
volumes are if anything a little narrower than the out-of-fold residuals the diffusion learned
(conservative spread; σ-recalibration on val corrects what is left). The stage file's format
is unchanged; the fold twins live only in the training checkpoints.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # torch is imported where it is used: fold_of runs without it (tests load this file alone)
    import torch
    from torch import nn

__all__ = ["FoldAnchor", "batch_folds", "fold_kind", "fold_of", "fold_weights"]


def fold_of(vid: str, folds: int) -> int:
    """The fold (0 … ``folds``−1) of volume id ``vid``: SHA-256 of the id, first 8 bytes, mod F."""
    if folds < 1:
        raise ValueError(f"folds must be >= 1, got {folds}")
    return int.from_bytes(hashlib.sha256(str(vid).encode("utf-8")).digest()[:8], "big") % folds


def fold_kind(g: int) -> str:
    """The learner kind of fold twin ``g`` (its key in checkpoints and its log prefix)."""
    return f"direct_fold{g}"


def batch_folds(ids: Sequence[str], folds: int) -> torch.Tensor:
    """Per-item fold of a batch's ids (long tensor ``[B]``)."""
    import torch

    return torch.tensor([fold_of(v, folds) for v in ids], dtype=torch.long)


def fold_weights(ids: Sequence[str], folds: int, g: int) -> torch.Tensor:
    """Per-item loss weight of fold twin ``g``: 1 for items outside fold ``g``, 0 inside it."""
    return (batch_folds(ids, folds) != g).float()


class FoldAnchor:
    """The anchor of a cross-fitted residual diffusion on one batch: called like a direct twin
    (``(x_t, t, frontal, lateral, cond, cond_aug)``), it returns for item ``i`` of fold ``g``
    the output of fold twin ``g`` (trained on every fold but ``g``) on that item alone.
    ``calls`` records ``(g, item indices)`` of each twin evaluation (tests)."""

    def __init__(self, twins: Sequence[nn.Module], item_folds: torch.Tensor) -> None:
        self.twins = list(twins)
        self.item_folds = item_folds
        self.calls: list[tuple[int, list[int]]] = []

    def __call__(self, x_t: None, t: None, frontal: torch.Tensor, lateral: torch.Tensor,
                 cond: torch.Tensor | None, cond_aug: torch.Tensor | None) -> torch.Tensor:
        import torch

        folds = self.item_folds.to(frontal.device)
        out: torch.Tensor | None = None
        for g in sorted(set(folds.tolist())):
            idx = torch.nonzero(folds == g).flatten()
            pick = (lambda x: None if x is None else x.index_select(0, idx))  # noqa: E731
            y = self.twins[g](None, None, pick(frontal), pick(lateral), pick(cond), pick(cond_aug))
            if out is None:
                out = y.new_empty((folds.shape[0], *y.shape[1:]))
            out[idx] = y
            self.calls.append((g, idx.tolist()))
        assert out is not None
        return out
