"""Rank-0 validation during training: THE evaluator on the val split (:class:`Validator`;
the contract is in :mod:`xct_core.training`'s docstring)."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from xct_core.checkpoint import step_dir_name
from xct_core.config import Params, Stage
from xct_core.layout import RunLayout
from xct_core.training.hooks import TrainHooks

__all__ = ["Validator"]


class Validator:
    """Rank-0 validation: THE evaluator on the val split (module docstring)."""

    def __init__(self, params: Params, stage: Stage, processed_dir: str | Path, ids: list[str], layout: RunLayout,
                 device: torch.device, hooks: TrainHooks) -> None:
        from xct_core.diffusion import Sampler
        from xct_core.evaluation import EvalProtocol, dataset_cases

        self.params, self.stage, self.layout, self.device, self.hooks = params, stage, layout, device, hooks
        self.tp = params.train
        self.protocol = EvalProtocol.from_params(params)
        self.sampler = Sampler.from_params(params, self.tp.val_sample_steps)
        self.cases = list(dataset_cases(processed_dir, stage.k, "val", ids, xrays=self.protocol.xrays))
        self.prev: list[nn.Module] | None = None

    def _frozen(self) -> list[nn.Module]:
        if self.prev is None:
            from xct_core.evaluation import load_cascade

            self.prev = (load_cascade(self.layout.out_dir, self.stage.k - 1, self.params,
                                      which=self.tp.prev_stage_model, device=self.device) if self.stage.k > 1 else [])
        return self.prev

    @torch.no_grad()
    def run(self, step: int, emas: list[nn.Module]) -> dict[str, float]:
        from xct_core.evaluation import aggregate, evaluate_case, montage_volumes
        from xct_core.models import AnchoredStage

        frozen = self._frozen()
        direct = emas[1] if len(emas) > 1 else None
        if getattr(emas[0], "anchored", False):  # the stage as it is exported: with its twin
            emas = [AnchoredStage(emas[0], emas[1]), *emas[1:]]
        rows = []
        for case in self.cases:
            res = evaluate_case(case, [*frozen, emas[0]], self.params, self.protocol, sampler=self.sampler,
                                samples=self.tp.val_samples, direct=direct, reprojection=self.tp.val_reprojection,
                                device=self.device)
            rows.append(res.metrics)
            if case.index == 0:
                st = self.stage
                vols, spacing = montage_volumes(res, st.spacing_mm, st.prev.spacing_mm if st.prev else None)
        out = {f"val/{k}": v for k, v in aggregate(rows).items()}
        self._montage(step, vols, spacing, out)
        return out

    def _montage(self, step: int, vols: dict[str, np.ndarray], spacing: dict[str, Any], metrics: Mapping[str, float]) -> None:
        from xct_core.viz import save_slice_montage

        w = self.protocol.window
        title = (
            f"{self.stage.name} step {step}: PSNR(window) {metrics.get('val/psnr_window_db', float('nan')):.2f} dB, "
            f"SSIM {metrics.get('val/ssim_window', float('nan')):.3f} ({w.name} window, EMA, "
            f"{self.tp.val_sample_steps} DDIM steps, {self.tp.val_samples} sample(s))"
        )
        path = self.layout.montages / f"{step_dir_name(step)}.png"
        save_slice_montage(vols, path, [w, self.protocol.wide], spacing=spacing, title=title)
        if self.hooks.log_artifact is not None:
            self.hooks.log_artifact(str(path), "val_montages")
