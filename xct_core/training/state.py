"""Training states of one stage: which checkpoint to resume from, whether it fits this
network (:func:`compat_key`), saving (rank 0) and pruning (:class:`Checkpointer`). The
files themselves: :mod:`xct_core.checkpoint`."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from xct_core.checkpoint import latest_checkpoint, list_checkpoints, load_state, prune_checkpoints, save_state
from xct_core.config import Params, Stage
from xct_core.errors import ConfigError
from xct_core.layout import RunLayout

__all__ = ["Checkpointer", "compat_key"]


def compat_key(params: Params, stage: Stage, kinds: list[str]) -> str:
    """What a checkpoint's weights depend on: the stage's network, the model/diffusion/DRR
    sections, the HU map and window and which learners exist. Other params (LR, steps,
    logging) may change between resumes."""
    blob = {
        "stage": stage.cfg.model_dump(mode="json"),
        "prev": stage.prev.size if stage.prev is not None else None,
        "model": params.model.model_dump(mode="json"),
        "diffusion": params.diffusion.model_dump(mode="json"),
        "drr": params.drr.model_dump(mode="json"),
        "hu": params.hu.model_dump(mode="json"),
        "learners": kinds,
    }
    return hashlib.sha256(json.dumps(blob, sort_keys=True).encode()).hexdigest()[:16]


class Checkpointer:
    """One stage's training states: which one to resume from, whether it fits this network
    (the compatibility key), saving (rank 0) and pruning to ``keep_last`` + the best."""

    def __init__(self, layout: RunLayout, keep_last: int, compat: str, is_main: bool) -> None:
        self.layout = layout
        self.keep_last = int(keep_last)
        self.compat = compat
        self.is_main = is_main
        last = list_checkpoints(layout.checkpoints)[-1:] if is_main else []
        self.last: tuple[int, str] | None = (last[0][0], str(last[0][1])) if last else None

    def pick(self, resume_from: str | Path | None, fresh: bool) -> tuple[dict[str, Any] | None, str | None]:
        """The newest of ``resume_from`` and the newest local checkpoint, loaded (or ``None``)."""
        if fresh:
            return None, None
        cands: list[tuple[int, str]] = []
        ext_state: dict[str, Any] | None = None
        if resume_from is not None:
            ext_state = load_state(resume_from)
            cands.append((int(ext_state["step"]), str(resume_from)))
        loc = latest_checkpoint(self.layout.checkpoints)
        if loc is not None:
            cands.append((loc[0], str(loc[1])))
        if not cands:
            return None, None
        _, path = max(cands, key=lambda c: c[0])
        if ext_state is not None and path == str(resume_from):
            return ext_state, path
        return load_state(path), path

    def check(self, state: Mapping[str, Any], path: str, name: str) -> None:
        """Refuse a checkpoint of another network (:class:`ConfigError`)."""
        if state.get("compat") != self.compat:
            raise ConfigError(
                f"{path}: checkpoint was trained with a different {name} network/schedule "
                f"(params changed); restore them or start over with --fresh"
            )

    def save(self, step: int, state: Mapping[str, Any], best_step: int | None) -> str | None:
        """Write ``step``'s state (rank 0), prune, return its directory (``None`` off rank 0)."""
        if not self.is_main:
            return None
        d = save_state(self.layout.checkpoints, step, {**state, "compat": self.compat})
        prune_checkpoints(self.layout.checkpoints, self.keep_last, [best_step] if best_step is not None else [])
        self.last = (step, str(d))
        return str(d)

    def last_good(self) -> str:
        return f"{self.last[1]} (step {self.last[0]})" if self.last else "none written yet"
