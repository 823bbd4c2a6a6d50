"""Pipeline step — evaluate stage K: the cascade 1 … K on the TEST split, per-patient metrics.

Output folder (``reports/eval/stageK``, :class:`xct_core.layout.ReportLayout`)::

    metrics.json      patient means + target_std + n_patients + mean-volume baseline
                      (baseline_*) + direct-regression twin (direct_*, when
                      the evaluated model ships one: best.pt's own twin, ``direct_source``) + single-sample metrics (single_*, when
                      eval.samples > 1) + the previous stage upsampled (upsampled_*
                      and gain_over_upsampled_db, stage K > 1) + test_ids_hash + the protocol —
                      read by the gate and register steps and by ``dvc metrics``
    per_patient.csv   one row per test volume (= patient in the demo/LIDC data), for ``dvc plots``
    montage.png       axial/coronal/sagittal slices of the first test volume
    calibration.json  (eval.samples > 1 and eval.calibration.fit) σ-recalibration s and the
                      split-conformal quantile q fitted on the VAL split
                      (:class:`xct_core.calibration.Calibration`; also under ``calibration`` in
                      metrics.json; the register step ships it with the model, ``xct
                      reconstruct`` applies it); the test metrics check it
    calibration.png   expected vs observed coverage + rank histogram (K > 1)

Science in :mod:`xct_core.evaluation` (THE evaluator; stage K fed by stage K−1's samples, as in
production). This adapter builds the evaluation protocol (the window) once from params and
writes the reports. The input X-rays are those of ``eval.protocol`` (honest: the detector
model's val/test views; clean: the training renderer's, labelled "clean (inverse-crime)"),
recorded in metrics.json as ``eval_protocol``/``eval_protocol_label``/``eval_detector``. One function, :func:`run_evaluate`, called by ``xct step evaluate``
(dvc.yaml) and by the KFP component (components/kfp_components.py).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from xct_core.config import Params
from xct_core.layout import METRICS_JSON, PER_PATIENT_CSV
from xct_core.metric_table import UPSAMPLED_PREFIX


def step_outputs(out_dir: str | Path) -> list[Path]:
    """What the pipeline declares for an evaluate step (dvc.yaml; skip markers)."""
    return [Path(out_dir) / METRICS_JSON, Path(out_dir) / PER_PATIENT_CSV]


def run_evaluate(
    stage: int,
    processed_dir: str | Path,
    train_dir: str | Path,
    out_dir: str | Path,
    params: Params,
    *,
    split: str = "test",
    device: str = "cpu",
    log: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Evaluate stage ``stage`` and write the reports into ``out_dir``; returns the summary
    metrics (the content of ``metrics.json``)."""
    import time

    from xct_core.evaluation import EvalProtocol, evaluate_stage, fit_stage_calibration, write_eval_reports

    say = log or (lambda _m: None)
    protocol = EvalProtocol.from_params(params)
    calibration, fit_s = None, 0.0
    c = params.eval.calibration
    from xct_core.preprocess import read_manifest

    has_val = bool(read_manifest(Path(processed_dir))["splits"].get("val"))
    if c.fit and split != "val" and params.eval.samples_for(params.stage(stage).name) > 1 and not has_val:
        say(f"stage{stage}: no val split: uncertainty calibration not fitted (raw std only)")
    elif c.fit and split != "val" and params.eval.samples_for(params.stage(stage).name) > 1:
        t0 = time.monotonic()
        # the fit needs the samples and the truth only: no reprojection on val
        val = evaluate_stage(params, processed_dir, train_dir, stage, protocol=protocol, split="val", device=device,
                             log=say, max_volumes=c.val_max_volumes, reprojection=False)
        calibration = fit_stage_calibration(val, params)
        fit_s = time.monotonic() - t0
        if calibration is not None:
            say(f"stage{stage} calibration fitted on {len(val.ids)} val volumes in {fit_s:.0f} s: "
                f"spread-skill {val.metrics.get('spread_skill', float('nan')):.2f} raw → s = "
                f"{calibration.sigma_scale:.2f}; conformal q({calibration.level:g}) = {calibration.q:.2f}")
    res = evaluate_stage(params, processed_dir, train_dir, stage, protocol=protocol, split=split, device=device, log=say,
                         calibration=calibration)
    if calibration is not None:
        res.metrics["calibration_fit_s"] = round(fit_s, 1)
        res.metrics["val_spread_skill"] = val.metrics.get("spread_skill")
    paths = write_eval_reports(res, out_dir, protocol)
    m = res.metrics
    direct = f", direct {m['direct_psnr_window_db']:.2f} dB" if m.get("has_direct") else ""
    single = f", single sample {m['single_psnr_window_db']:.2f} dB" if "single_psnr_window_db" in m else ""
    up = UPSAMPLED_PREFIX + "psnr_window_db"
    upsampled = (f", previous stage upsampled {m[up]:.2f} dB (gain {m['gain_over_upsampled_db']:+.2f} dB)"
                 if up in m else "")
    say(
        f"[{protocol.label}] "
        f"stage{stage} on {m['n_patients']} {split} volumes ({m['samples']} sample(s), {m['sample_steps']} DDIM steps): "
        f"PSNR(window) {m['psnr_window_db']:.2f} dB, SSIM {m['ssim_window']:.3f}, "
        f"MAE {m['mae_hu']:.1f} HU{single}{_calibration_note(m)}; mean-volume baseline {m['baseline_psnr_window_db']:.2f} dB{direct}{upsampled} "
        f"→ {paths['metrics'].parent}"
    )
    return m


def _calibration_note(m: dict[str, Any]) -> str:
    if "spread_skill" not in m:
        return ""
    conf = f", conformal coverage {m['conformal_coverage']:.3f}" if "conformal_coverage" in m else ""
    return f", spread-skill {m['spread_skill']:.2f}{conf}"
