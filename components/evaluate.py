"""Pipeline step — evaluate stage K: the cascade 1 … K on the TEST split, per-patient metrics.

Output folder (``reports/eval/stageK``)::

    metrics.json      patient means + target_std + n_patients + mean-volume baseline
                      (baseline_*) + direct-regression twin (direct_*, when
                      models/stageK/direct.pt exists) + test_ids_hash — read by the gate and
                      register steps and by ``dvc metrics``
    per_patient.csv   one row per test volume (= patient in the demo/LIDC data), for ``dvc plots``
    montage.png       axial/coronal/sagittal slices of the first test volume

Science in :mod:`xct_core.evaluation` (stage K fed by stage K−1's samples, as in production).
Three ways to run it, one function (:func:`run_evaluate`):
``python -m components.evaluate --stage K --processed data/processed --train-dir outputs/train
--out reports/eval/stageK [--params params.yaml]``, the KFP component
:data:`components.stages_kfp` (its KFP component, which runs this module's CLI), or a direct call.
"""

import argparse
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any


from xct_core.config import Params, load_params
from xct_core.errors import XctError


def run_evaluate(
    stage: int,
    processed_dir: str | Path,
    train_dir: str | Path,
    out_dir: str | Path,
    params: Params | None = None,
    *,
    split: str = "test",
    device: str = "cpu",
    log: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Evaluate stage ``stage`` and write the reports into ``out_dir``; returns the summary
    metrics (the content of ``metrics.json``)."""
    from xct_core.evaluation import evaluate_stage, write_eval_reports

    params = params or Params()
    say = log or (lambda _m: None)
    res = evaluate_stage(params, processed_dir, train_dir, stage, split=split, device=device, log=say)
    paths = write_eval_reports(res, out_dir, params.hu.get_window())
    m = res.metrics
    direct = f", direct {m['direct_psnr_window_db']:.2f} dB" if m.get("has_direct") else ""
    say(
        f"stage{stage} on {m['n_patients']} {split} volumes ({m['sample_steps']} DDIM steps): "
        f"PSNR(window) {m['psnr_window_db']:.2f} dB, SSIM {m['ssim_window']:.3f}, "
        f"MAE {m['mae_hu']:.1f} HU; mean-volume baseline {m['baseline_psnr_window_db']:.2f} dB{direct} "
        f"→ {paths['metrics'].parent}"
    )
    return m


def main(argv: list[str] | None = None) -> int:
    """CLI (dvc.yaml). Exit 0 when the evaluation ran; 2 with one line on stderr for
    unusable input or params."""
    ap = argparse.ArgumentParser(prog="python -m components.evaluate", description=__doc__.splitlines()[0])
    ap.add_argument("--stage", type=int, required=True, help="cascade stage K (1-based)")
    ap.add_argument("--processed", type=Path, default=Path("data/processed"), help="preprocessed data folder")
    ap.add_argument("--train-dir", type=Path, default=None, help="training output folder (default: params train.out_dir)")
    ap.add_argument("--out", type=Path, default=None, help="report folder (default: reports/eval/stageK)")
    ap.add_argument("--split", default="test", choices=["test", "val", "train"], help="split to evaluate (default: test)")
    ap.add_argument("--device", default="cpu", help="torch device (default: cpu)")
    ap.add_argument("--params", type=Path, default=None, help="params file (default: $XCT_PARAMS or ./params.yaml)")
    args = ap.parse_args(argv)
    try:
        params = load_params(args.params)
        train_dir = args.train_dir or Path(params.train.out_dir)
        out = args.out or Path("reports/eval") / f"stage{args.stage}"
        run_evaluate(args.stage, args.processed, train_dir, out, params, split=args.split, device=args.device, log=print)
    except XctError as e:
        print(f"evaluate: error: {e}", file=sys.stderr)
        return e.exit_code
    return 0


if __name__ == "__main__":
    sys.exit(main())
