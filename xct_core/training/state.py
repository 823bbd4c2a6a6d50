"""Training states of one stage: which checkpoint to resume from, whether it fits this
network (:func:`compat_key`), saving (rank 0) and pruning (:class:`Checkpointer`). The
files themselves: :mod:`xct_core.checkpoint`."""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from xct_core.checkpoint import (
    DIGEST_FILE,
    list_checkpoints,
    load_state,
    prune_checkpoints,
    save_state,
    state_digest,
)
from xct_core.config import LEGACY_STAGE_DEFAULTS, Params, Stage
from xct_core.errors import ConfigError, InputError
from xct_core.layout import RunLayout
from xct_core.training.result import TrainingFailed

__all__ = ["Checkpointer", "compat_key", "quarantine"]


def compat_key(params: Params, stage: Stage, kinds: list[str]) -> str:
    """What a checkpoint's weights depend on: the stage's network, the model/diffusion/DRR
    sections, the HU map and window and which learners exist. Other params (LR, steps,
    logging) may change between resumes."""
    cfg = stage.cfg.model_dump(mode="json")
    for key, legacy in LEGACY_STAGE_DEFAULTS.items():  # states saved before the key resume under its legacy value
        if cfg.get(key) == legacy:
            del cfg[key]
    blob = {
        "stage": cfg,
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
    (the compatibility key), saving (rank 0) and pruning to ``keep_last`` + the best.

    Resume never uses a damaged checkpoint silently. Candidates are tried newest first
    (``resume_from`` wins a tie with a local one); each must pass its digest and load
    (:func:`xct_core.checkpoint.load_state`). One that does not — bytes changed (digest
    mismatch), truncated, unreadable — is, per ``on_corrupt``:

    * ``fallback`` (default): reported in one warning line naming the file (rank 0, through
      ``warn``), moved aside to ``corrupt-step_…`` (rank 0; local checkpoints only, so it
      is kept for inspection and neither picked nor counted by ``keep_last`` again), and
      the next older one is tried. When none is intact the run is refused
      (:class:`TrainingFailed`: start over with ``--fresh``) rather than silently
      restarted from step 0.
    * ``fail``: refused at once (:class:`~xct_core.errors.InputError` naming the file).

    A checkpoint without a digest (written before digests were kept) is loaded with a
    one-line warning that it is unverified: refusing it would strand every older run, and a
    truncated or garbled old file still fails to load and is handled as above.
    """

    def __init__(self, layout: RunLayout, keep_last: int, compat: str, is_main: bool,
                 on_corrupt: str = "fallback", warn: Callable[[str], None] | None = None) -> None:
        self.layout = layout
        self.keep_last = int(keep_last)
        self.compat = compat
        self.is_main = is_main
        self.on_corrupt = on_corrupt
        self.warn = warn if warn is not None else (lambda _msg: None)
        self.last: tuple[int, str] | None = None
        self._find_last()

    def _find_last(self) -> None:
        last = list_checkpoints(self.layout.checkpoints)[-1:] if self.is_main else []
        self.last = (last[0][0], str(last[0][1])) if last else None

    def pick(self, resume_from: str | Path | None, fresh: bool) -> tuple[dict[str, Any] | None, str | None]:
        """The newest intact checkpoint of ``resume_from`` and the local ones, loaded (or
        ``None`` when there is none at all); see the class docstring for damaged ones."""
        if fresh:
            return None, None
        bad: list[tuple[str, str]] = []  # (where it was moved, problem) of each damaged one tried
        best: tuple[int, dict[str, Any], str] | None = None
        if resume_from is not None:
            state = self._load(resume_from, bad, local=False)
            if state is not None:
                best = (int(state["step"]), state, str(resume_from))
        for step, d in reversed(list_checkpoints(self.layout.checkpoints)):
            if best is not None and step <= best[0]:
                break
            state = self._load(d, bad, local=True)
            if state is not None:
                best = (step, state, str(d))
                break
        if bad:
            self._find_last()
            if best is None:
                raise TrainingFailed(
                    f"{self.layout.checkpoints}: no intact checkpoint to resume from ({len(bad)} damaged: "
                    f"{bad[0][1]}); start over with --fresh"
                )
            if self.is_main:
                for where, problem in bad:
                    self.warn(f"{problem}; not resumed{where} — resuming from {best[2]} (step {best[0]}) instead")
        if best is None:
            return None, None
        if self.is_main and state_digest(best[2]) is None:
            self.warn(f"{best[2]}: checkpoint has no {DIGEST_FILE} (written before digests were kept): "
                      "resuming from it unverified")
        return best[1], best[2]

    def _load(self, path: str | Path, bad: list[tuple[str, str]], local: bool) -> dict[str, Any] | None:
        """The state at ``path``, or ``None`` after recording why it is unusable (``fallback``)."""
        try:
            return load_state(path)
        except InputError as e:
            if self.on_corrupt == "fail":
                raise InputError(None, f"{e} (train.on_corrupt_checkpoint: fail — resume refused; set it to "
                                       "'fallback' to resume from an older checkpoint, or start over with --fresh)") from None
            where = ""
            if local and self.is_main:
                aside = quarantine(Path(path))
                where = f" (moved to {aside.name})" if aside is not None else ""
            bad.append((where, str(e)))
            return None

    def check(self, state: Mapping[str, Any], path: str, name: str) -> None:
        """Refuse a checkpoint of another network (:class:`ConfigError`)."""
        if state.get("compat") != self.compat:
            raise ConfigError(
                f"{path}: checkpoint was trained with a different {name} network/schedule "
                f"(params changed); restore them or start over with --fresh"
            )

    def save(self, step: int, state: Mapping[str, Any], best_step: int | None) -> str | None:
        """Write ``step``'s state (rank 0), prune, return its directory (``None`` off rank 0).
        A failed write (disk full, file-size limit) is one line that names the last good one."""
        if not self.is_main:
            return None
        try:
            d = save_state(self.layout.checkpoints, step, {**state, "compat": self.compat})
        except InputError as e:
            raise InputError(None, f"{e}; checkpoint of step {step} not written, last good one: {self.last_good()}") from None
        prune_checkpoints(self.layout.checkpoints, self.keep_last, [best_step] if best_step is not None else [])
        self.last = (step, str(d))
        return str(d)

    def last_good(self) -> str:
        return f"{self.last[1]} (step {self.last[0]})" if self.last else "none written yet"


def quarantine(d: Path) -> Path | None:
    """Move a damaged checkpoint directory ``step_N`` aside to ``corrupt-step_N`` (``-2``, …
    when taken) in the same folder; ``None`` when it is gone already (another rank)."""
    for i in range(1, 100):
        aside = d.with_name(f"corrupt-{d.name}" + (f"-{i}" if i > 1 else ""))
        if aside.exists():
            continue
        try:
            os.rename(d, aside)
        except FileNotFoundError:
            return None
        except OSError:
            continue
        return aside
    return None
