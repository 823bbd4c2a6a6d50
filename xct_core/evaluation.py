"""THE evaluator: one case → reconstruct → reproject → metrics; many cases → :func:`aggregate`.

Every number the project reports about a model comes from :func:`evaluate_case` — training
validation (the val split, :mod:`xct_core.training`), the evaluate step on the test split
(:func:`evaluate_stage`, read by the gates), ``xct evaluate`` on user CTs
(:func:`evaluate_cts`) — and the prediction inside it is :func:`xct_core.inference.reconstruct`,
the same call the registered pyfunc and ``xct reconstruct`` make. A lever (HU map, posterior
mean of K samples, sampler settings, protocol) therefore changes one place.

What is measured (one case)
---------------------------
The cascade 1 … K runs as in production: stage k>1 is conditioned on stage k−1's *samples*
(never on the ground truth), with the :class:`~xct_core.diffusion.Sampler` given (the steps
rule: :meth:`Sampler.from_params`) and ``samples`` draws whose seeds follow the one seed rule
(:mod:`xct_core.seeding`: the case seed ``(seed, 99, case index)``, sample ``i`` of it
``(case seed, i)``) — two runs on the same models and data give the same numbers. Metrics
(:class:`EvalProtocol`, :func:`xct_core.metrics.hu_metrics_per_sample`) compare the
reconstruction in HU with the case's full-range HU target; reprojection PSNR/SSIM compare its
DRRs, rendered with the geometry the inputs were rendered with, against the input X-rays.
Keys, each with an optional prefix:

* (none) — the point estimate: the voxel-wise mean of the ``samples`` draws (posterior mean);
* ``single_`` — the first draw alone (only when ``samples > 1``: single-sample vs K-mean);
* ``direct_`` — the direct-regression twin (one pass, fed by the first draw's earlier
  stages), when the models include one;
* ``baseline_`` — the mean volume (voxel-wise mean HU of the TRAIN split, or of the other
  evaluated CTs), limited to the range the networks can output (``params.hu.output``),
  predicted for every case: what a collapsed model scores;
* ``upsampled_`` (stage k > 1 only) — the previous stage upsampled: stage k − 1's point
  estimate (``eval.point_estimate`` resolved for stage k − 1,
  :meth:`~xct_core.inference.Reconstruction.previous_point_hu`: from the SAME K runs, no extra
  sampling) upsampled to stage k's grid exactly as the cascade upsamples its condition
  (:func:`upsample_previous`): what stage k adds over its own input; ``gain_over_upsampled_db``
  = ``psnr_window_db`` − ``upsampled_psnr_window_db`` per case;
* ``target_std`` — std of the windowed target (the reference of the gates' not-collapsed check).

The point estimate (prefix none) is ``eval.point_estimate`` (the evaluate step passes it;
:meth:`~xct_core.inference.Reconstruction.point_hu`: the K-mean or the anchored stage's
twin). Uncertainty and realism (:mod:`xct_core.calibration`, conventions there): every
prediction gets ``psd_top_band_ratio`` (its top radial power band / the truth's); with
K > 1 the case gets ``spread_skill``, ``coverage_minmax``, ``ause`` and
``spearman_std_abs_err`` over the body mask, and — given a :class:`Calibration` fitted on
val — ``spread_skill_recal`` (std × s) and ``conformal_coverage`` (the truth inside
the calibrated interval around the point estimate).

:func:`aggregate` gives patient means (``*nan_count``: the total). The demo data and the
LIDC ids have one volume per patient, so a row is a patient.
"""

from __future__ import annotations

import csv
import hashlib
import io
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from xct_core import calibration as cal
from xct_core.atomic import write_text_atomic
from xct_core.calibration import Calibration, CaseScores
from xct_core.config import Params
from xct_core.detector import DetectorModel, honest_views
from xct_core.detector import describe as describe_detector
from xct_core.diffusion import Sampler
from xct_core.errors import InputError
from xct_core.geometry import VIEWS, PlacedGeometry
from xct_core.hu import HUWindow
from xct_core.inference import Reconstruction, load_stage, load_stages, reconstruct
from xct_core.io import CTVolume
from xct_core.jsondoc import json_text
from xct_core.layout import METRICS_JSON, MONTAGE_PNG, PER_PATIENT_CSV, RunLayout, stage_model_files
from xct_core.metric_table import KMEAN_PREFIX, UPSAMPLED_PREFIX
from xct_core.metric_table import definitions as metric_definitions
from xct_core.metrics import body_mask, dynamic_range, hu_metrics_per_sample, mean_rows, ssim_taps
from xct_core.seeding import case_seed, sample_seed

__all__ = [
    "BASELINE_LOO",
    "BASELINE_TRAIN",
    "METRICS_JSON",
    "MONTAGE_PNG",
    "PER_PATIENT_CSV",
    "Case",
    "CaseResult",
    "EvalProtocol",
    "PROTOCOL_LABELS",
    "EvalResult",
    "aggregate",
    "ct_case",
    "dataset_cases",
    "evaluate_case",
    "evaluate_cts",
    "evaluate_stage",
    "fit_stage_calibration",
    "gain_over_upsampled",
    "load_cascade",
    "mean_volume_baseline",
    "split_ids_hash",
    "stage_twin",
    "twin_of",
    "upsample_previous",
    "write_eval_reports",
]


#: the calibration plot of an evaluation (beside montage.png)
CALIBRATION_PNG = "calibration.png"
#: how each ``eval.protocol`` is named wherever numbers are shown (reports, model card)
PROTOCOL_LABELS = {
    "honest": "honest (detector model)",
    "clean": "clean (inverse-crime)",
}

#: how the mean-volume baseline was obtained (recorded in metrics.json and the report)
BASELINE_TRAIN = "train-split mean volume"
BASELINE_LOO = "leave-one-out mean of the other evaluated CTs"


# --------------------------------------------------------------------------- the protocol


@dataclass(frozen=True)
class EvalProtocol:
    """How a reconstruction is scored, built ONCE from params by the caller (an adapter)
    and passed down: the evaluation window (the gates read PSNR/SSIM in it), the wide HU
    range, the SSIM window, and the reprojection renderer's settings."""

    window: HUWindow
    hu_range: tuple[float, float]
    ssim_sigma: float
    ssim_win: int  #: the most taps; a small grid gets fewer (:meth:`ssim_taps`)
    body_hu: float  #: the body mask's threshold (``ingest.body_hu``: the same "body" everywhere)
    params: Params  #: for the renderer (``drr``, ``hu.mu_water``) of the reprojection
    #: which input X-rays the cases carry (``eval.protocol``): ``honest`` (the detector model,
    #: :mod:`xct_core.detector`) | ``clean`` (the training renderer's DRRs: inverse crime)
    xrays: str = "honest"

    @classmethod
    def from_params(cls, params: Params, window: HUWindow | None = None) -> EvalProtocol:
        ev = params.eval
        return cls(window=window or params.hu.get_window(), hu_range=(float(ev.hu_lo), float(ev.hu_hi)),
                   ssim_sigma=float(ev.ssim_sigma), ssim_win=int(ev.ssim_win),
                   body_hu=float(params.ingest.body_hu), params=params, xrays=str(ev.protocol))

    @property
    def detector(self) -> DetectorModel | None:
        """The honest views' detector (None under the clean protocol)."""
        return DetectorModel.from_params(self.params) if self.xrays == "honest" else None

    @property
    def label(self) -> str:
        """The protocol's name as every report shows it (:data:`PROTOCOL_LABELS`)."""
        return PROTOCOL_LABELS[self.xrays]

    def record(self) -> dict[str, Any]:
        """What metrics.json records about the input X-rays: ``eval_protocol`` (name),
        ``eval_protocol_label`` and, for the honest protocol, ``eval_detector`` (its params)
        and ``eval_detector_text`` (one line)."""
        out: dict[str, Any] = {"eval_protocol": self.xrays, "eval_protocol_label": self.label}
        det = self.detector
        if det is not None:
            out["eval_detector"] = det.to_json()
            out["eval_detector_text"] = describe_detector(det)
        return out

    def ssim_taps(self, size: int) -> int:
        """SSIM taps on a ``size``³ grid (:func:`xct_core.metrics.ssim_taps`)."""
        return ssim_taps(size, self.ssim_win)

    @property
    def wide(self) -> HUWindow:
        """The wide-range window ``[hu_lo, hu_hi]`` (pictures of the full HU range)."""
        return HUWindow("wide", *self.hu_range)

    def metrics(self, pred_hu: np.ndarray, target_hu: np.ndarray,
                views: Mapping[str, tuple[np.ndarray, np.ndarray]] | None = None) -> dict[str, float]:
        """The metric set of one HU prediction against its HU target (+ reprojection views)."""
        v = None if views is None else {n: (torch.from_numpy(a), torch.from_numpy(b)) for n, (a, b) in views.items()}
        size = int(np.asarray(target_hu).shape[-1])
        return hu_metrics_per_sample(torch.from_numpy(np.asarray(pred_hu, dtype=np.float32)),
                                     torch.from_numpy(np.asarray(target_hu, dtype=np.float32)), self.window,
                                     hu_range=self.hu_range, ssim_sigma=self.ssim_sigma, ssim_win=self.ssim_taps(size),
                                     views=v, body_hu=self.body_hu)[0]

    def label_context(self, size: int | None = None) -> dict[str, Any]:
        """The values the metric table's labels and definitions are formatted with
        (:mod:`xct_core.metric_table`); ``size``: the grid, for the SSIM taps actually used
        (without it, no ``taps``: a label that needs them refuses to guess)."""
        w, (lo, hi) = self.window, self.hu_range
        ctx: dict[str, Any] = {
            "window": w.name, "wlo": w.lo, "whi": w.hi, "sigma": self.ssim_sigma, "body_hu": self.body_hu,
            "hu_lo": lo, "hu_hi": hi, "hu_span": hi - lo,
            "taps_text": (f"{self.ssim_taps(size)}^3 taps on the {size}^3 grid" if size else
                          f"min({self.ssim_win}, largest odd <= S/2-1)^3 taps on an S^3 grid"),
        }
        if size:
            ctx["taps"] = self.ssim_taps(size)
        return ctx

    def describe(self, size: int | None = None) -> dict[str, str]:
        """The protocol, in words, for metrics.json and the reports (``size``: the grid, for
        the SSIM taps actually used): the metric table's definitions."""
        return metric_definitions(self.label_context(size))


# --------------------------------------------------------------------------- one case


@dataclass
class Case:
    """One volume to evaluate: its input X-rays, its full-range HU target on the output grid,
    that grid's world affine and the geometry the X-rays were rendered with."""

    id: str
    index: int  #: position among the evaluated cases (the seed rule)
    frontal: np.ndarray  #: float32 [P, P] line integrals
    lateral: np.ndarray
    target_hu: np.ndarray  #: float32 [S, S, S] HU
    affine: np.ndarray  #: output grid, voxel → world mm
    geometries: dict[str, PlacedGeometry]

    @property
    def xrays(self) -> dict[str, np.ndarray]:
        return {"frontal": self.frontal, "lateral": self.lateral}

    @property
    def isocenter(self) -> np.ndarray:
        """World position of the grid centre (= the geometry's isocentre)."""
        n = self.target_hu.shape[0]
        return np.asarray(self.affine, dtype=np.float64)[:3, :3] @ np.full(3, (n - 1) / 2.0) + self.affine[:3, 3]


@dataclass
class CaseResult:
    """What :func:`evaluate_case` measured on one case, with the volumes behind it."""

    case: Case
    metrics: dict[str, float]
    recon: Reconstruction
    direct_hu: np.ndarray | None = None
    baseline_hu: np.ndarray | None = None
    #: stage k > 1: the previous stage's point estimate upsampled to this grid (HU; the ``upsampled_`` baseline)
    upsampled_hu: np.ndarray | None = None
    reprojections: dict[str, np.ndarray] = field(default_factory=dict)  #: DRRs of ``recon.mean_hu``
    #: per-voxel calibration scores (body mask; K > 1): what a fit on val pools
    scores: CaseScores | None = None
    #: radial band power ratios (prediction / truth, :data:`xct_core.calibration.PSD_BANDS`) per prefix
    band_ratios: dict[str, list[float]] = field(default_factory=dict)

    @property
    def case_id(self) -> str:
        return self.case.id

    @property
    def target_hu(self) -> np.ndarray:
        return self.case.target_hu

    @property
    def xrays(self) -> dict[str, np.ndarray]:
        return self.case.xrays

    @property
    def row(self) -> dict[str, Any]:
        return {"id": self.case.id, **self.metrics}


@torch.no_grad()
def _direct_hu(stages: Sequence[nn.Module], direct: nn.Module, case: Case, params: Params, sampler: Sampler,
               seed: int, device: torch.device) -> np.ndarray:
    """The direct twin of the last stage, fed by earlier stages sampled with ``seed``."""
    from xct_core.cascade import sample_cascade

    gen = torch.Generator(device=device).manual_seed(seed)
    f = torch.from_numpy(np.ascontiguousarray(case.frontal, dtype=np.float32))[None, None].to(device)
    lat = torch.from_numpy(np.ascontiguousarray(case.lateral, dtype=np.float32))[None, None].to(device)
    outs = sample_cascade([*stages[:-1], direct], f, lat, sampler=sampler, generator=gen)
    return params.hu.net_map().inverse(outs[-1][0, 0].float().cpu().numpy()).astype(np.float32)


def twin_of(stage: nn.Module, direct: nn.Module | None) -> nn.Module | None:
    """THE twin an evaluated stage is compared against: for an anchored (residual-diffusion)
    stage, the direct twin SHIPPED INSIDE it (its anchor: the twin of the very step whose
    weights are evaluated, e.g. best.pt's) — whatever ``direct`` was given; otherwise
    ``direct`` (which the caller must take from the same step: :func:`stage_twin`)."""
    anchor = getattr(stage, "anchor", None) if getattr(stage, "anchored", False) else None
    return anchor if anchor is not None else direct


def stage_twin(stage: nn.Module, direct_path: str | Path, params: Params, k: int,
               device: str | torch.device = "cpu") -> tuple[nn.Module | None, str]:
    """The twin evaluation compares stage ``k`` (a loaded exported model) against, and where it
    comes from: the anchor inside the evaluated file (anchored stages); else ``direct_path``
    (``models/stageK/direct.pt``, written at the last step) only when it was exported at the
    same step as the evaluated model — a twin of another step is no baseline of this model."""
    from xct_core.checkpoint import read_stage_model

    src = getattr(stage, "xct_source", None)
    if getattr(stage, "anchored", False):
        step = read_stage_model(src)["step"] if src else None
        return twin_of(stage, None), f"the twin shipped in {Path(src).name if src else 'the model'} (step {step})"
    p = Path(direct_path)
    if not p.is_file():
        return None, f"none ({p.name} not found)"
    if src is None:
        raise ValueError("stage_twin needs a stage loaded from an exported file (xct_source)")
    s_model, s_twin = read_stage_model(src)["step"], read_stage_model(p)["step"]
    if s_model != s_twin:
        return None, (f"none: {p.name} is from step {s_twin}, the evaluated {Path(src).name} from step {s_model} "
                      "(a twin of another step is not this model's baseline)")
    return load_stage(p, params, k, device), f"{p.name} (step {s_twin})"


def evaluate_case(
    case: Case,
    stages: Sequence[nn.Module],
    params: Params,
    protocol: EvalProtocol,
    *,
    sampler: Sampler,
    samples: int = 1,
    seed: int | None = None,
    direct: nn.Module | None = None,
    baseline_hu: np.ndarray | None = None,
    reprojection: bool = True,
    device: str | torch.device = "cpu",
    point_estimate: str = "mean",
    calibration: Calibration | None = None,
    floor_hu: float = 1.0,
) -> CaseResult:
    """Reconstruct ``case`` with the cascade ``stages`` (``samples`` draws) and measure it,
    its twin ``direct``, the mean volume ``baseline_hu`` and, with two or more stages, the
    previous stage upsampled (module docstring: keys).

    ``params``: the MODEL's params (HU map, sampler); ``seed``: the base seed (default
    ``params.seed``), the case seed derives from it and ``case.index``; ``point_estimate``:
    ``eval.point_estimate``; ``calibration``: fitted on val (its ``floor_hu`` wins over
    ``floor_hu``, the score floor of a case measured for a fit). The twin is
    :func:`twin_of` (an anchored stage's own twin, whatever ``direct`` says).
    """
    dev = torch.device(device)
    direct = twin_of(stages[-1], direct)
    cseed = case_seed(int(params.seed if seed is None else seed), case.index)
    rec = reconstruct(stages, params, case.frontal, case.lateral, sampler=sampler, isocenter=case.isocenter,
                      samples=samples, seed=cseed, device=dev, keep_samples=samples > 1)
    if rec.mean_hu.shape != case.target_hu.shape:
        raise InputError(None, f"{case.id}: reconstruction {rec.mean_hu.shape} does not match the target grid "
                               f"{case.target_hu.shape}")
    point = rec.point_hu(point_estimate)
    preds: dict[str, np.ndarray] = {"": point}
    if samples > 1 and rec.first_hu is not None:
        preds["single_"] = rec.first_hu
        # the K-sample mean, whatever the point estimate: what the twin non-inferiority check judges
        preds[KMEAN_PREFIX] = rec.mean_hu
    direct_hu = None
    if direct is not None:
        direct_hu = _direct_hu(stages, direct, case, params, sampler, sample_seed(cseed, 0), dev)
        preds["direct_"] = direct_hu
    upsampled_hu = None
    if rec.stage > 1:  # the previous stage's point estimate (same runs), upsampled as the cascade does
        prev = rec.previous_point_hu(params.point_estimate_for(rec.stage - 1))
        assert prev is not None
        upsampled_hu = upsample_previous(prev, case.target_hu.shape[-1], params)
        preds[UPSAMPLED_PREFIX] = upsampled_hu
    if baseline_hu is not None:
        if baseline_hu.shape != case.target_hu.shape:
            raise InputError(None, f"mean-volume baseline {baseline_hu.shape} does not match the grid "
                                   f"{case.target_hu.shape}")
        # the mean volume as the networks could output it (their HU map's range): a collapsed model
        net = params.hu.net_map()
        preds["baseline_"] = net.inverse(net.forward(np.asarray(baseline_hu, dtype=np.float32))).astype(np.float32)
    metrics: dict[str, float] = {}
    reproj_main: dict[str, np.ndarray] = {}
    bands: dict[str, list[float]] = {}
    truth_w = protocol.window.forward(case.target_hu)
    for prefix, pred in preds.items():
        bands[prefix] = [float(v) for v in cal.power_ratio(protocol.window.forward(pred), truth_w, cal.PSD_BANDS)]
        metrics[f"{prefix}psd_top_band_ratio"] = bands[prefix][-1]
        views = None
        if reprojection:
            from xct_core.qa import render_views

            drrs = render_views(pred, case.affine, case.geometries, protocol.params)
            views = {v: (drrs[v], case.xrays[v]) for v in VIEWS}
            if prefix == "":
                reproj_main = drrs
        metrics.update({f"{prefix}{k}": v for k, v in protocol.metrics(pred, case.target_hu, views).items()})
    scores = None
    if rec.std_hu is not None:
        metrics["uncertainty_mean_std_hu"] = float(rec.std_hu.mean())
        scores = _calibration_metrics(metrics, rec, point, case, protocol, calibration, floor_hu)
    metrics["target_std"] = float(dynamic_range(protocol.window.forward(case.target_hu))[1])
    if UPSAMPLED_PREFIX in preds:
        metrics["gain_over_upsampled_db"] = gain_over_upsampled(metrics)
    return CaseResult(case, metrics, rec, direct_hu, baseline_hu, upsampled_hu, reproj_main, scores, bands)


def upsample_previous(previous_hu: np.ndarray, size: int, params: Params) -> np.ndarray:
    """Stage k − 1's volume (HU, its own grid) on stage k's ``size``³ grid, resampled exactly
    as :func:`xct_core.cascade.sample_cascade` resamples stage k's condition: in the networks'
    units (``params.hu.net_map()``) with :func:`xct_core.cascade.resize_volume` (trilinear,
    ``align_corners=False``), back to HU with the same map."""
    from xct_core.cascade import resize_volume

    net = params.hu.net_map()
    units = torch.from_numpy(np.ascontiguousarray(net.forward(np.asarray(previous_hu, dtype=np.float32)),
                                                  dtype=np.float32))[None, None]
    return net.inverse(resize_volume(units, int(size))[0, 0].numpy()).astype(np.float32)


def gain_over_upsampled(metrics: Mapping[str, float]) -> float:
    """``psnr_window_db − upsampled_psnr_window_db`` of one case (dB): what stage k adds over its
    own input, the previous stage upsampled (NaN without that baseline)."""
    return float(metrics.get("psnr_window_db", math.nan)) - float(metrics.get(UPSAMPLED_PREFIX + "psnr_window_db",
                                                                              math.nan))


def _calibration_metrics(metrics: dict[str, float], rec: Reconstruction, point: np.ndarray, case: Case,
                         protocol: EvalProtocol, calibration: Calibration | None, floor_hu: float) -> CaseScores:
    """The case's calibration metrics (into ``metrics``) and its scores for a fit."""
    assert rec.std_hu is not None and rec.samples_hu is not None
    y, std, k = case.target_hu, rec.std_hu, rec.samples
    mask = body_mask(y, protocol.body_hu).cpu().numpy().reshape(y.shape)
    floor = calibration.floor_hu if calibration is not None else floor_hu
    scores = CaseScores.of(rec.samples_hu, point, std, y, mask, floor, seed=case.index)
    abs_err = np.abs(rec.mean_hu.astype(np.float64) - y)
    metrics["spread_skill"] = cal.spread_skill(rec.mean_hu, std, y, k, mask)
    metrics["coverage_minmax"] = cal.minmax_coverage(scores.ranks, k)
    metrics["ause"] = cal.ause(std, abs_err, mask)
    metrics["spearman_std_abs_err"] = cal.spearman_std_error(std, abs_err, mask)
    if calibration is not None:
        metrics["spread_skill_recal"] = cal.spread_skill(rec.mean_hu, std, y, k, mask, scale=calibration.sigma_scale)
        metrics["conformal_coverage"] = cal.coverage(scores.scores, calibration.q)
    return scores


def aggregate(rows: Sequence[Mapping[str, Any]]) -> dict[str, float]:
    """Patient means of per-case metric rows (``*nan_count``: summed; the ``id`` is skipped)."""
    return mean_rows(rows)


# --------------------------------------------------------------------------- cases


def _hu_volume(processed: Path, k: int, vid: str) -> np.ndarray:
    from xct_core.preprocess import stage_file

    path = processed / stage_file(k, vid)
    try:
        arr = np.load(path, mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError) as e:
        raise InputError(path, f"unreadable stage volume ({e})") from None
    return np.asarray(arr, dtype=np.float32)


def dataset_cases(processed_dir: str | Path, k: int, split: str, ids: Sequence[str] | None = None, *,
                  xrays: str = "clean") -> Iterable[Case]:
    """The cases of a processed split at stage ``k`` (its stored X-rays, full-range HU target,
    grid affine and the X-rays' placed geometry), in split order.

    ``xrays``: which stored views are the inputs — ``"clean"`` (``xrays/``: the training
    renderer's DRRs) or ``"honest"`` (``xrays_honest/``: the detector model, val/test only);
    callers pass their :attr:`EvalProtocol.xrays`. Both pairs share one geometry (the honest
    views are placed with the same isocentre, source and detector), so the placed geometry is
    the clean pair's either way."""
    from xct_core.data import XrayCTDataset
    from xct_core.preprocess import load_view_pair, xray_honest_file

    if xrays not in PROTOCOL_LABELS:
        raise ValueError(f"xrays must be one of {sorted(PROTOCOL_LABELS)}, got {xrays!r}")
    root = Path(processed_dir)
    ds = XrayCTDataset(root, k, split, None, ids=ids)
    for idx, vid in enumerate(ds.ids):
        if xrays == "honest":
            xr, _ = load_view_pair(root / xray_honest_file(vid), ds.pixels)
        else:
            xr = ds.xrays(vid)
        yield Case(id=vid, index=idx, frontal=xr["frontal"], lateral=xr["lateral"], target_hu=_hu_volume(root, k, vid),
                   affine=ds.affine_of(vid), geometries=ds.geometry_of(vid))


def ct_case(case_id: str, vol: CTVolume, params: Params, upto: int, index: int = 0, *,
            xrays: str | None = None) -> Case:
    """A user CT as the preprocess step would store it: resampled to the finest stage grid
    (centred on the volume centre); the target is ``vol`` on stage ``upto``'s grid. The input
    views (``xrays``, default ``params.eval.protocol``): ``"clean"`` — rendered from that
    finest grid with the training renderer; ``"honest"`` — the detector model of
    ``params.eval.detector`` applied to the NATIVE CT ``vol`` on its own grid
    (:func:`xct_core.detector.honest_views`, seeded by ``case_id``). The geometry is the same."""
    from xct_core.preprocess import PreprocessSettings, render_xrays, stage_hu

    which = params.eval.protocol if xrays is None else xrays
    if which not in PROTOCOL_LABELS:
        raise ValueError(f"xrays must be one of {sorted(PROTOCOL_LABELS)}, got {which!r}")
    s = PreprocessSettings.from_params(params)
    center = np.asarray(vol.center_world, dtype=np.float64)
    finest = stage_hu(vol, s.finest, s.fill_hu, s.antialias)
    frontal, lateral, geo = render_xrays(finest, s.finest.affine(center), s)
    if which == "honest":
        frontal, lateral, _ = honest_views(vol.hu, vol.affine, case_id, s.drr, s.mu_water,
                                           DetectorModel.from_params(params))
    grid = s.grids[upto - 1]
    target = finest if grid.k == s.finest.k else stage_hu(vol, grid, s.fill_hu, s.antialias)
    return Case(id=case_id, index=index, frontal=frontal, lateral=lateral, target_hu=target.astype(np.float32),
                affine=grid.affine(center), geometries={v: PlacedGeometry.from_json(geo[v]) for v in VIEWS})


# --------------------------------------------------------------------------- baselines, models, ids


def mean_volume_baseline(processed_dir: str | Path, k: int, split: str = "train") -> np.ndarray:
    """Voxel-wise mean (float32 HU, full range) of ``split``'s stage-``k`` volumes."""
    from xct_core.preprocess import read_manifest

    root = Path(processed_dir)
    ids = list(read_manifest(root)["splits"].get(split) or [])
    if not ids:
        raise InputError(root / "manifest.json", f"split {split!r} is empty: no mean-volume baseline")
    acc: np.ndarray | None = None
    for vid in ids:
        v = _hu_volume(root, k, vid).astype(np.float64)
        acc = v if acc is None else acc + v
    assert acc is not None
    return (acc / len(ids)).astype(np.float32)


def load_cascade(
    train_dir: str | Path,
    upto: int,
    params: Params,
    *,
    which: str | None = None,
    device: str | torch.device = "cpu",
) -> list[nn.Module]:
    """Frozen stage networks 1 … ``upto`` of a training folder (``which`` default
    ``params.eval.model_file``) through the one loader :func:`xct_core.inference.load_stages`."""
    params.stage(upto)  # ConfigError for a stage the params do not define
    return load_stages(stage_model_files(train_dir, upto, which or params.eval.model_file), params, device)


def split_ids_hash(ids: Sequence[str]) -> str:
    """Order-independent identity of a split: sha256 (16 hex) of the sorted ids, one a line."""
    return hashlib.sha256("\n".join(sorted(ids)).encode()).hexdigest()[:16]


# --------------------------------------------------------------------------- the evaluate step


@dataclass
class EvalResult:
    """One stage's evaluation: per-volume rows, the summary, and volumes for the montage."""

    stage: int
    split: str
    ids: list[str]
    rows: list[dict[str, Any]]
    metrics: dict[str, Any]
    #: HU volumes of the first volume (target, diffusion, direct, mean-volume baseline, previous stage)
    montage: dict[str, np.ndarray] = field(default_factory=dict)
    spacing: dict[str, tuple[float, float, float]] = field(default_factory=dict)
    #: per-case calibration scores (K > 1): what :func:`fit_stage_calibration` pools
    scores: list[CaseScores] = field(default_factory=list)


def montage_volumes(res: CaseResult, stage_spacing: float, prev_spacing: float | None) -> tuple[
        dict[str, np.ndarray], dict[str, tuple[float, float, float]]]:
    """The pictures of one case (target, reconstruction, direct, mean volume, the previous stage
    upsampled (its point estimate) and the previous stage's first sample on its own grid)."""
    vols = {"target": res.target_hu, "diffusion": res.recon.mean_hu}
    if res.direct_hu is not None:
        vols["direct"] = res.direct_hu
    if res.baseline_hu is not None:
        vols["mean volume"] = res.baseline_hu
    if res.upsampled_hu is not None:
        vols["previous stage upsampled"] = res.upsampled_hu
    spacing = {n: (stage_spacing,) * 3 for n in vols}
    if res.recon.previous_hu is not None and prev_spacing is not None:
        vols["previous stage"] = res.recon.previous_hu
        spacing["previous stage"] = (prev_spacing,) * 3
    return vols, spacing


@torch.no_grad()
def evaluate_stage(
    params: Params,
    processed_dir: str | Path,
    train_dir: str | Path,
    k: int,
    *,
    protocol: EvalProtocol | None = None,
    split: str = "test",
    steps: int | None = None,
    device: str | torch.device = "cpu",
    reprojection: bool = True,
    log: Callable[[str], None] | None = None,
    calibration: Calibration | None = None,
    max_volumes: int | None = None,
    on_case: Callable[[CaseResult], None] | None = None,
) -> EvalResult:
    """Run the cascade 1 … ``k`` of ``train_dir`` on ``split`` and measure stage ``k`` with
    :func:`evaluate_case` (the mean-volume baseline from the TRAIN split; the direct twin:
    the twin of :func:`stage_twin`, the one the evaluated model ships). ``steps`` overrides the
    steps rule; ``calibration`` (fitted on val) adds the calibrated metrics; ``max_volumes``
    default ``eval.max_volumes``; ``on_case`` sees each :class:`CaseResult` (benchmarks).
    Raises :class:`InputError` for a missing model or data file, or an empty split."""
    say = log or (lambda _m: None)
    protocol = protocol or EvalProtocol.from_params(params)
    st = params.stage(k)
    root = Path(processed_dir)
    from xct_core.preprocess import read_manifest

    ids = list(read_manifest(root)["splits"].get(split) or [])
    cap = params.eval.max_volumes if max_volumes is None else max_volumes
    if cap:
        ids = ids[:cap]
    if not ids:
        raise InputError(root / "manifest.json", f"split {split!r} is empty: nothing to evaluate")
    dev = torch.device(device)
    stages = load_cascade(train_dir, k, params, device=dev)
    direct, direct_source = stage_twin(stages[-1], RunLayout(Path(train_dir), k).model("direct"), params, k, dev)
    sampler = Sampler.from_params(params, steps)
    base_hu = mean_volume_baseline(root, k, "train")
    samples = params.eval.samples_for(st.name)

    rows: list[dict[str, Any]] = []
    montage: dict[str, np.ndarray] = {}
    spacing: dict[str, tuple[float, float, float]] = {}
    scores: list[CaseScores] = []
    band_rows: list[dict[str, list[float]]] = []
    for case in dataset_cases(root, k, split, ids, xrays=protocol.xrays):
        res = evaluate_case(case, stages, params, protocol, sampler=sampler, samples=samples, direct=direct,
                            baseline_hu=base_hu, reprojection=reprojection, device=dev,
                            point_estimate=params.point_estimate_for(k), calibration=calibration,
                            floor_hu=params.eval.calibration.floor_hu)
        if on_case is not None:
            on_case(res)
        rows.append(res.row)
        band_rows.append(res.band_ratios)
        if res.scores is not None:
            scores.append(res.scores)
        m = res.metrics
        up = (f", previous stage upsampled {m[UPSAMPLED_PREFIX + 'psnr_window_db']:.2f} dB"
              if UPSAMPLED_PREFIX + "psnr_window_db" in m else "")
        say(f"{st.name} {split} {case.id}: PSNR(window) {m['psnr_window_db']:.2f} dB, "
            f"SSIM {m['ssim_window']:.3f} (mean volume {m['baseline_psnr_window_db']:.2f} dB{up})")
        if case.index == 0:
            montage, spacing = montage_volumes(res, st.spacing_mm, st.prev.spacing_mm if st.prev else None)

    metrics: dict[str, Any] = aggregate(rows)
    metrics.update({
        "stage": k,
        "split": split,
        "n_patients": len(rows),
        "sample_steps": sampler.steps_for(k)[-1],
        "samples": samples,
        "seed": int(params.seed),
        "model_file": params.eval.model_file,
        "has_direct": direct is not None,
        "has_upsampled": k > 1,
        "direct_source": direct_source,
        "test_ids_hash": split_ids_hash(ids),
        "ssim_taps": protocol.ssim_taps(st.size),
        "protocol": protocol.describe(st.size),
        "point_estimate": params.point_estimate_for(k),
        "power_spectrum": {"bands": cal.PSD_BANDS, "band_ratio": {
            (p or "point"): [float(v) for v in np.nanmean([b[p] for b in band_rows], axis=0)]
            for p in band_rows[0]}},
        **protocol.record(),
    })
    if scores:
        metrics["calibration_curve"] = cal.coverage_curve(scores, calibration, samples)
    if calibration is not None:
        metrics["calibration"] = calibration.to_json()
    return EvalResult(stage=k, split=split, ids=ids, rows=rows, metrics=metrics, montage=montage, spacing=spacing,
                      scores=scores)


def fit_stage_calibration(val: EvalResult, params: Params) -> Calibration | None:
    """σ-recalibration and the conformal quantile of stage ``val.stage`` fitted on a val
    :class:`EvalResult` (None when it has no samples' spread: K = 1)."""
    if not val.scores:
        return None
    c = params.eval.calibration
    return cal.fit_calibration(val.scores, stage=val.stage, samples=int(val.metrics["samples"]), level=c.level,
                               floor_hu=c.floor_hu, point_estimate=params.point_estimate_for(val.stage),
                               fitted_on={"split": val.split, "n_patients": len(val.ids),
                                          "ids_hash": split_ids_hash(val.ids)})


def evaluate_cts(
    cts: Mapping[str, CTVolume],
    stages: Sequence[nn.Module],
    params: Params,
    *,
    protocol: EvalProtocol | None = None,
    steps: int | None = None,
    samples: int = 1,
    seed: int | None = None,
    upto: int | None = None,
    direct: nn.Module | None = None,
    train_mean_hu: np.ndarray | None = None,
    device: str | torch.device = "cpu",
    log: Callable[[str], None] | None = None,
    calibration: Calibration | None = None,
) -> tuple[list[CaseResult], dict[str, Any]]:
    """Evaluate user CTs (``xct evaluate``): each a :func:`ct_case`, measured by
    :func:`evaluate_case`; returns the cases and the summary.

    Mean-volume baseline: ``train_mean_hu`` (the train split's voxel-wise mean HU on the
    output grid) when given; otherwise — the model artifacts carry no train mean — the
    voxel-wise mean of the OTHER evaluated CTs' targets (leave-one-out; needs >= 2 CTs),
    else none. The summary: ``mean`` (patient means; ``*nan_count`` summed), ``n_patients``,
    ``baseline`` (which mean volume, or why none), ``has_direct``, ``sample_steps``, ``seeds``,
    and with K > 1 ``calibration_curve`` (``calibration``: the model's val-fitted one, applied).
    """
    say = log or (lambda _m: None)
    protocol = protocol or EvalProtocol.from_params(params)
    n = len(stages) if upto is None else int(upto)
    ids = list(cts)
    if not ids:
        raise InputError(None, "no CT to evaluate")
    cases = [ct_case(i, cts[i], params, n, index=idx, xrays=protocol.xrays) for idx, i in enumerate(ids)]
    if train_mean_hu is not None:
        baseline_note = BASELINE_TRAIN
    elif len(ids) >= 2:
        baseline_note = BASELINE_LOO + " (the model artifacts carry no train-split mean volume)"
        total = np.sum([c.target_hu.astype(np.float64) for c in cases], axis=0)
    else:
        baseline_note = ("none: the model artifacts carry no train-split mean volume and a leave-one-out "
                         "mean needs >= 2 CTs (pass the processed data folder to use its train split)")
    sampler = Sampler.from_params(params, steps)
    results = []
    for case in cases:
        if train_mean_hu is not None:
            base = np.asarray(train_mean_hu, dtype=np.float32)
        elif len(ids) >= 2:
            base = ((total - case.target_hu) / (len(ids) - 1)).astype(np.float32)
        else:
            base = None
        res = evaluate_case(case, list(stages[:n]), params, protocol, sampler=sampler, samples=samples, seed=seed,
                            direct=direct, baseline_hu=base, device=device, point_estimate=params.point_estimate_for(n),
                            calibration=calibration, floor_hu=params.eval.calibration.floor_hu)
        m = res.metrics
        up = (f"; previous stage upsampled {m[UPSAMPLED_PREFIX + 'psnr_window_db']:.2f} dB"
              if UPSAMPLED_PREFIX + "psnr_window_db" in m else "")
        say(f"{case.id}: PSNR(window) {m['psnr_window_db']:.2f} dB, PSNR[{protocol.hu_range[0]:g},"
            f"{protocol.hu_range[1]:g}] {m['psnr_hu_db']:.2f} dB, SSIM {m['ssim_window']:.3f}, MAE {m['mae_hu']:.1f} HU{up}")
        results.append(res)
    summary = {
        "n_patients": len(results),
        "stage": n,
        "mean": aggregate([r.metrics for r in results]),
        "baseline": baseline_note,
        "has_baseline": any("baseline_psnr_window_db" in r.metrics for r in results),
        "has_direct": direct is not None,
        "has_upsampled": n > 1,
        "sample_steps": results[0].recon.steps,
        "samples": samples,
        "seeds": {r.case_id: r.recon.seeds for r in results},
        "point_estimate": params.point_estimate_for(n),
        **protocol.record(),
    }
    scores = [r.scores for r in results if r.scores is not None]
    if scores:
        summary["calibration_curve"] = cal.coverage_curve(scores, calibration, samples)
    if calibration is not None:
        summary["calibration"] = calibration.to_json()
    return results, summary


# --------------------------------------------------------------------------- reports


def rows_csv(rows: Sequence[Mapping[str, Any]]) -> str:
    """Per-patient rows as CSV: ``id`` first, then the sorted metric columns (NaN → empty)."""
    cols = ["id"] + sorted({c for r in rows for c in r} - {"id"})
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=cols, lineterminator="\n", restval="")
    w.writeheader()
    for r in rows:
        w.writerow({c: ("" if isinstance(r.get(c), float) and not math.isfinite(r[c]) else r.get(c, "")) for c in cols})
    return buf.getvalue()


def write_eval_reports(result: EvalResult, out_dir: str | Path, protocol: EvalProtocol) -> dict[str, Path]:
    """Write ``metrics.json`` (summary; NaN → null), ``per_patient.csv`` (one row per volume,
    sorted columns) and ``montage.png`` (first volume: target, samples, baselines; the
    evaluation window and the wide HU range) into ``out_dir``, atomically; with K > 1 also
    ``calibration.png`` (:func:`xct_core.report.save_calibration_plot`) and, when a
    calibration was fitted, ``calibration.json`` (:class:`~xct_core.calibration.Calibration`:
    what ``xct reconstruct`` and the registered model apply)."""
    from xct_core.viz import save_slice_montage

    out = Path(out_dir)
    paths = {
        "metrics": write_text_atomic(out / METRICS_JSON, json_text(result.metrics)),
        "per_patient": write_text_atomic(out / PER_PATIENT_CSV, rows_csv(result.rows)),
    }
    if result.montage:
        m = result.metrics
        up = (f", previous stage upsampled {m[UPSAMPLED_PREFIX + 'psnr_window_db']:.2f} dB"
              if UPSAMPLED_PREFIX + "psnr_window_db" in m else "")
        title = (f"[{protocol.label}] stage{result.stage} {result.split} {result.ids[0]}: PSNR(window) {m.get('psnr_window_db', math.nan):.2f} dB "
                 f"(mean volume {m.get('baseline_psnr_window_db', math.nan):.2f} dB{up}), {m.get('sample_steps')} DDIM steps")
        paths["montage"] = save_slice_montage(result.montage, out / MONTAGE_PNG, [protocol.window, protocol.wide],
                                              spacing=result.spacing, title=title)
    if result.metrics.get("calibration"):
        paths["calibration"] = write_text_atomic(out / cal.CALIBRATION_JSON, json_text(result.metrics["calibration"]))
    if result.metrics.get("calibration_curve"):
        from xct_core.report import save_calibration_plot

        m = result.metrics
        paths["calibration_plot"] = save_calibration_plot(
            m["calibration_curve"], out / CALIBRATION_PNG,
            f"stage{result.stage} {result.split}: spread-skill {m.get('spread_skill', math.nan):.2f}, "
            f"conformal {m.get('conformal_coverage', math.nan):.3f} (K = {m.get('samples')})")
    return paths
