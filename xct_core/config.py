"""Typed configuration: params.yaml → validated, frozen pydantic models (the science's part).

One source of defaults: params.yaml is the documented default file and spells out every
key; the field defaults below are the same values, and tests/test_one_source.py fails when
the two differ anywhere (``Params()`` == ``load_params("params.yaml")`` without overlays).
Code reads values from the objects here and never re-declares defaults elsewhere; a
component takes the params it is given (no built-in fallback). Unknown keys are rejected so
a typo in params.yaml is an error, not a silently ignored setting.

Operational sections live with the layer that uses them, so editing them invalidates no
science stage of dvc.yaml (whose steps depend on this module): ``s3`` and ``pipeline``
(KFP) in components/ops_params.py, ``hpo`` in xct_core/hpo_params.py, ``train.ray`` (Ray
Train scaling) in components/ray_params.py. :class:`Params` knows only their NAMES
(:data:`OPS_SECTIONS`): a science load drops them unread, the operations layer's models
(``components.ops_params.OpsParams``, a subclass) validate them — unknown keys inside them
are errors there. ``xct params show`` and every pipeline, HPO and S3 command load the whole
file that way.

Profiles: ``load_params(path, overlays=[...])`` deep-merges YAML fragments (a production
profile, an HPO result such as ``hpo/best_stage1.yaml``) over the base file; a params file
can list its own overlays under a top-level ``overlays:`` key (params.yaml lists the
``xct hpo`` results there, so `dvc repro` and every command use the tuned values).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated as _Annotated
from typing import Any, ClassVar, Literal, TypeVar

from pydantic import AfterValidator as _AfterValidator
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator
from pydantic import model_validator as _model_validator

from xct_core.errors import ConfigError, InputError
from xct_core.grid import StageGrid, token_levels
from xct_core.hu import OUTPUT_MAPS, HUMap, HUWindow, get_window
from xct_core.metric_table import check_param_metric as _check_metric
from xct_core.metric_table import entry as _metric_entry

#: a params value naming a metric: looked up in xct_core.metric_table when params load
#: (``single_`` allowed where the training loop reports one-sample metrics)
MetricName = _Annotated[str, _AfterValidator(lambda v: _check_metric(v))]
SelectMetric = _Annotated[str, _AfterValidator(lambda v: _check_metric(v, ("", "single_")))]

#: environment variable naming the params file (default: ./params.yaml)
PARAMS_ENV = "XCT_PARAMS"


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)  # every float finite


class HUMapParams(_Section):
    """Explicit knots of the networks' HU map (:class:`xct_core.hu.HUMap`)."""

    #: strictly increasing HU knots (the first and last bound what the networks can output)
    hu: tuple[float, ...]
    #: strictly increasing unit knots from -1 to 1, one per HU knot
    unit: tuple[float, ...]


class HUParams(_Section):
    #: the evaluation/gate window: a name from xct_core.hu.WINDOWS or an explicit [lo, hi] in HU
    window: str | tuple[float, float] = "soft_tissue"
    #: the units the stage networks predict in (xct_core.hu.HUMap): a full-range map
    #: (soft60: [-1024, 1024] HU with soft tissue given 60 % of [-1, 1] | wide: linear
    #: [-1024, 1024]; xct_core.hu.OUTPUT_MAPS), "window" = the window above mapped linearly
    #: to [-1, 1] (HU outside it are clipped: the output is that window, not a CT), or explicit
    #: {hu: [knots], unit: [knots]} (a monotone piecewise-linear map)
    output: Literal["window", "soft60", "wide"] | HUMapParams = "soft60"
    #: linear attenuation of water in 1/mm (≈0.02 at 60-70 keV)
    mu_water: float = Field(0.02, gt=0)

    @field_validator("window")
    @classmethod
    def _known_window(cls, v: Any) -> Any:
        get_window(v)
        return v

    @_model_validator(mode="after")
    def _valid_map(self) -> HUParams:
        try:
            self.net_map()
        except ConfigError as e:
            raise ValueError(str(e)) from None
        return self

    def get_window(self) -> HUWindow:
        """The evaluation window (gates, reports, display)."""
        return get_window(self.window)

    def net_map(self) -> HUMap:
        """The networks' HU ↔ unit map (datasets, physics loss, reconstruction)."""
        if self.output == "window":
            return HUMap.from_window(self.get_window())
        if isinstance(self.output, str):
            return OUTPUT_MAPS[self.output]
        return HUMap("custom", tuple(self.output.hu), tuple(self.output.unit))


class DRRParams(_Section):
    #: parallel (exact, cheap) or cone (point source, real X-ray geometry)
    geometry: Literal["parallel", "cone"] = "cone"
    #: detector size in pixels (square)
    pixels: int = Field(128, ge=8, le=4096)
    #: detector pixel pitch in mm (at the detector plane)
    pixel_mm: float = Field(4.8, gt=0)
    #: source-to-detector distance, mm (cone beam)
    sdd: float = Field(1500.0, gt=0)
    #: source-to-isocentre distance, mm (cone beam); isocentre = volume centre
    sod: float = Field(1000.0, gt=0)
    #: ray-marching step as a fraction of the smallest voxel spacing (reference renderer)
    step_fraction: float = Field(0.5, gt=0, le=2.0)
    #: renderer: auto (Joseph when the affine is axis-aligned) | joseph | reference
    method: Literal["auto", "joseph", "reference"] = "auto"
    #: unattenuated intensity for quantity=intensity (I = i0 * exp(-line integral))
    i0: float = Field(1.0, gt=0)

    @field_validator("sod")
    @classmethod
    def _sod_lt_sdd(cls, v: float, info: Any) -> float:
        sdd = info.data.get("sdd")
        if sdd is not None and v >= sdd:
            raise ValueError(f"sod ({v}) must be smaller than sdd ({sdd})")
        return v


class SynthParams(_Section):
    """Procedural phantoms: the embedded default data set."""

    #: number of phantoms
    n: int = Field(96, ge=1)
    #: grid size S (S³ voxels); the field of view is S · spacing_mm
    size: int = Field(128, ge=16, le=512)
    seed: int = Field(0, ge=0)
    #: voxel size of the synthesised volumes, mm (isotropic)
    spacing_mm: float = Field(3.2, gt=0)
    #: fraction of phantoms with IV contrast
    contrast_fraction: float = Field(0.5, ge=0, le=1)
    #: standard deviation of the white image noise, HU
    noise_hu: float = Field(12.0, ge=0, le=200)


class CTCheckParams(_Section):
    """Sanity checks applied by ``xct_core.io.load_ct`` to every CT (NIfTI or DICOM)."""

    #: a slice gap may differ from the series' median gap by at most this (mm); slices
    #: closer than this are duplicate positions. Also bounds in-plane IPP drift.
    slice_gap_tol_mm: float = Field(0.1, gt=0)
    #: plausible voxel size range (mm), every axis
    min_spacing_mm: float = Field(0.05, gt=0)
    max_spacing_mm: float = Field(50.0, gt=0)
    #: plausible HU range after rescale; the volume's minimum value (outside-FOV padding,
    #: e.g. -3024) is exempt from hu_min
    hu_min: float = -2000.0
    hu_max: float = 4000.0
    #: reject when more than this fraction of voxels lies outside [hu_min, hu_max]
    max_implausible_fraction: float = Field(0.005, ge=0, le=1)
    #: a volume spanning >= air_check_extent_mm along two axes must contain a voxel
    #: below air_hu (air, lung or fat); otherwise it is raw stored values, not HU
    air_hu: float = -100.0
    air_check_extent_mm: float = Field(200.0, gt=0)

    @field_validator("max_spacing_mm")
    @classmethod
    def _spacing_order(cls, v: float, info: Any) -> float:
        lo = info.data.get("min_spacing_mm")
        if lo is not None and v <= lo:
            raise ValueError(f"max_spacing_mm ({v}) must exceed min_spacing_mm ({lo})")
        return v

    @field_validator("hu_max")
    @classmethod
    def _hu_order(cls, v: float, info: Any) -> float:
        lo = info.data.get("hu_min")
        if lo is not None and v <= lo:
            raise ValueError(f"hu_max ({v}) must exceed hu_min ({lo})")
        return v


class DataParams(_Section):
    raw_dir: str = "data/raw"
    synth: SynthParams = SynthParams()
    ct: CTCheckParams = CTCheckParams()


# --- model / cascade stages (owner: xct_core.models) -----------------------------------


class ModelParams(_Section):
    """Settings shared by every cascade stage network (per-stage sizes live in ``stages``)."""

    #: the encoder sees DRR line integrals (dimensionless ∫mu dl) divided by this constant;
    #: the physics loss compares line integrals in the same units (one fixed scale, no
    #: per-sample normalisation). A 400 mm soft-tissue path gives ∫mu dl ≈ 8.
    xray_scale: float = Field(4.0, gt=0)


class StageParams(_Section):
    """One cascade stage: its grid, network sizes and training knobs.

    The stage grid is a cube of ``size``³ isotropic voxels covering ``fov_mm`` (the same FOV
    at every stage), centred at the world origin in RAS+ (see ``xct_core.models.stage_affine``).
    The conv stem halves the grid ``log2(size / token_grid)`` times (``conv_channels`` lists
    the channels at full, 1/2, 1/4 … resolution) down to a ``token_grid``³ transformer grid.
    """

    size: int = Field(ge=8, le=1024)
    fov_mm: float = Field(409.6, gt=0)
    token_grid: int = Field(ge=2)
    conv_channels: tuple[int, ...]
    dim: int = Field(ge=8)
    depth: int = Field(ge=1)
    heads: int = Field(ge=1)
    mlp_ratio: float = Field(4.0, gt=0)
    #: feature channels per view lifted into the volume (kept rich; views never averaged)
    lift_channels: int = Field(16, ge=1)
    #: 2D X-ray encoder channels per level (level 0 = detector resolution)
    enc_channels: tuple[int, ...] = (16, 32, 64)
    #: weight of the DRR physics-consistency loss (0 = off)
    physics_weight: float = Field(0.0, ge=0)
    lr: float = Field(1e-3, gt=0)
    batch_size: int = Field(1, ge=1)
    #: stage k>1: noise-augmentation level of the previous-stage condition, as a fraction
    #: of the diffusion schedule's timesteps — training draws U[0, cond_aug_max], sampling
    #: uses the fixed cond_aug_sample
    cond_aug_max: float = Field(0.25, ge=0, le=1)
    cond_aug_sample: float = Field(0.05, ge=0, le=1)
    #: activation checkpointing (torch.utils.checkpoint) per conv/transformer block
    grad_checkpointing: bool = False
    #: residual diffusion: "direct" anchors the stage on its direct-regression twin (trained
    #: beside it: train.direct_baseline must be on). The twin's estimate mu is an input
    #: channel and the diffusion runs on the scaled residual r = (x0 - mu) / residual_scale;
    #: a sample is mu + residual_scale * r, so the K-sample mean starts from the regression
    #: mean and the diffusion adds what the twin cannot know. "none": plain diffusion of x0.
    anchor: Literal["none", "direct"] = "none"
    #: the residual's scale in network units (about its std, so the diffused variable is O(1))
    residual_scale: float = Field(0.1, gt=0)
    #: decoder level order (xct_core/models/backbone.py UpBlock): "conv_first" convolves at the
    #: lower resolution, then upsamples (1/8 of the conv's FLOPs); "upsample_first" is the
    #: original order (upsample, then convolve at the higher resolution). Exported models from
    #: before this key (no "decoder" in their stored params) are upsample_first.
    decoder: Literal["conv_first", "upsample_first"] = "conv_first"
    #: cross-fitted anchors of an anchored stage (xct_core/training/crossfit.py): 1 = the residual
    #: diffusion learns the residuals of the twin trained on the same volumes (in-sample); F >= 2
    #: splits the train ids into F folds by a stable hash of the id and trains F more twins, twin g
    #: on every fold but g, and anchors each volume's residual on the twin that never saw it
    #: (out-of-fold residuals, as at inference). The shipped anchor stays the all-data twin.
    anchor_folds: int = Field(1, ge=1, le=16)

    @_model_validator(mode="after")
    def _check_shapes(self) -> StageParams:
        levels = token_levels(self.size, self.token_grid)
        if len(self.conv_channels) != levels:
            raise ValueError(
                f"conv_channels needs {levels} entries (one per level from {self.size}³ down to "
                f"{self.token_grid * 2}³), got {len(self.conv_channels)}"
            )
        if min(self.conv_channels) < 1 or min(self.enc_channels, default=0) < 1:
            raise ValueError("channel counts must be >= 1")
        if self.dim % self.heads:
            raise ValueError(f"dim {self.dim} is not divisible by heads {self.heads}")
        if self.anchor_folds > 1 and self.anchor != "direct":
            raise ValueError(f"anchor_folds {self.anchor_folds} needs anchor: direct (cross-fitted twins anchor the residual)")
        if self.cond_aug_sample > self.cond_aug_max:
            raise ValueError(f"cond_aug_sample {self.cond_aug_sample} exceeds cond_aug_max {self.cond_aug_max}")
        return self


#: stage keys added after models were first exported, with the value every model written
#: before the key existed was built with (a stored params blob lacking the key means that value)
LEGACY_STAGE_DEFAULTS: dict[str, object] = {"decoder": "upsample_first", "anchor_folds": 1}


def with_legacy_stage_defaults(data: dict) -> dict:
    """A copy of a STORED params mapping (e.g. the JSON inside an exported stage model) whose
    stages lack keys of :data:`LEGACY_STAGE_DEFAULTS` filled with the value they were built
    with (not today's default). Params read from params.yaml never go through this."""
    stages = data.get("stages")
    if not isinstance(stages, dict):
        return data
    filled = {name: ({**LEGACY_STAGE_DEFAULTS, **cfg} if isinstance(cfg, dict) else cfg) for name, cfg in stages.items()}
    return {**data, "stages": filled}


def _check_stages(stages: dict[str, StageParams]) -> dict[str, StageParams]:
    names = list(stages)
    want = [f"stage{k}" for k in range(1, len(names) + 1)]
    if not names or names != want:
        raise ValueError(f"stages must be named {', '.join(want) or 'stage1, …'} in order, got {names}")
    cfgs = list(stages.values())
    for a, b in zip(cfgs, cfgs[1:]):
        if b.size <= a.size:
            raise ValueError(f"stage sizes must increase, got {[c.size for c in cfgs]}")
    if len({c.fov_mm for c in cfgs}) > 1:
        raise ValueError(f"every stage must cover the same fov_mm, got {[c.fov_mm for c in cfgs]}")
    return stages


#: ordered ``stage1, stage2, …`` (a mapping so overlays can deep-merge one stage's keys)
Stages = _Annotated[dict[str, StageParams], _AfterValidator(_check_stages)]

#: defaults = the demo profile in params.yaml
_DEMO_STAGES: dict[str, StageParams] = {
    "stage1": StageParams(size=16, token_grid=8, conv_channels=(32,), dim=96, depth=2, heads=4,
                          physics_weight=0.0, batch_size=2, anchor="direct"),
    "stage2": StageParams(size=32, token_grid=8, conv_channels=(16, 32), dim=96, depth=2, heads=4,
                          physics_weight=0.1, batch_size=2, anchor="direct"),
    "stage3": StageParams(size=64, token_grid=8, conv_channels=(8, 16, 32), dim=96, depth=2, heads=4,
                          physics_weight=0.15, batch_size=2, anchor="direct"),
}


# --- diffusion schedule and sampler (owner: xct_core.diffusion) ------------------------


class DiffusionParams(_Section):
    """Noise schedule and DDIM sampler (see xct_core.diffusion for the conventions)."""

    #: number of training timesteps T (t = 0 … T-1)
    num_timesteps: int = Field(1000, ge=2)
    #: noise schedule: Nichol & Dhariwal cosine (diffusers "squaredcos_cap_v2")
    schedule: Literal["cosine"] = "cosine"
    #: cosine offset s and beta cap
    cosine_s: float = Field(0.008, ge=0)
    max_beta: float = Field(0.999, gt=0, le=1)
    #: rescale to zero terminal SNR (Lin et al. 2024); requires trailing spacing
    zero_terminal_snr: bool = True
    #: sampler timestep spacing: trailing (first step at t = T-1) | leading
    timestep_spacing: Literal["trailing", "leading"] = "trailing"
    #: DDIM steps (model evaluations) per sample
    sample_steps: int = Field(50, ge=1)
    #: DDIM eta: 0 deterministic, 1 DDPM-like
    eta: float = Field(0.0, ge=0)
    #: clip the x0 prediction to [-1, 1] inside the sampler
    clip_x0: bool = True
    #: DRR data consistency inside DDIM (xct_core/guidance.py): at every sampler step the x0
    #: prediction takes `guidance_iters` SIRT steps of relaxation `guidance_weight` toward the
    #: input line integrals (detector binned to the stage's resolution); 0 = off. Needs a
    #: full-range hu.output (a window-clipped volume renders -200 HU air)
    guidance_weight: float = Field(0.0, ge=0, lt=2)
    guidance_iters: int = Field(1, ge=1, le=20)

    @_model_validator(mode="after")
    def _check(self) -> DiffusionParams:
        if self.sample_steps > self.num_timesteps:
            raise ValueError(f"sample_steps {self.sample_steps} exceeds num_timesteps {self.num_timesteps}")
        if self.zero_terminal_snr and self.timestep_spacing != "trailing":
            raise ValueError("zero_terminal_snr needs timestep_spacing: trailing (first step at t = T-1)")
        return self


# --- evaluation metrics (owner: xct_core.metrics) --------------------------------------


class CalibrationParams(_Section):
    """Uncertainty calibration of the evaluate step (xct_core/calibration.py): fitted on the
    val split, checked on test, shipped as ``calibration.json``."""

    #: fit σ-recalibration and the conformal interval on the val split in the evaluate step
    #: (when the stage's eval.samples > 1); false: measure raw calibration on test only
    fit: bool = True
    #: nominal coverage of the split-conformal interval (xct reconstruct's _lo/_hi)
    level: float = Field(0.9, gt=0, lt=1)
    #: floor under the std in the normalised score |y - mean| / max(std, floor) (HU)
    floor_hu: float = Field(1.0, gt=0)
    #: evaluate the first N val ids for the fit (0: all)
    val_max_volumes: int = Field(0, ge=0)


class DetectorParams(_Section):
    """The honest protocol's detector (xct_core/detector.py: the formulas and their order).

    Defaults, for a PA chest on a CsI flat panel read out at this project's coarse 4.8 mm
    pitch (sources and arithmetic: benchmarks/results/protocol_cpu.md)."""

    #: unattenuated DETECTED photons per (4.8 mm) detector pixel; 0 = no quantum noise
    photons_per_pixel: float = Field(1.0e6, ge=0)
    #: detector blur (CsI light spread + focal-spot penumbra), Gaussian FWHM in mm at the detector
    blur_fwhm_mm: float = Field(0.7, ge=0)
    #: scatter-to-primary ratio per unit line integral: behind a uniform slab of line integral p the
    #: SPR is this x p (scatter = this x (p x primary) blurred by scatter_sigma_mm)
    scatter_fraction: float = Field(0.1, ge=0, le=10)
    #: width (Gaussian sigma, mm at the detector) of the scatter spread function
    scatter_sigma_mm: float = Field(60.0, gt=0)
    #: the reference ray marcher's step / the CT's smallest voxel spacing
    step_fraction: float = Field(1.0, gt=0, le=1)
    #: rays per pixel and axis (pixel aperture: their intensities are averaged)
    supersample: int = Field(1, ge=1, le=8)
    #: quantum-noise seed (per volume and view: xct_core.detector.noise_rng)
    seed: int = Field(0, ge=0)


class EvalParams(_Section):
    """Metric settings (see xct_core.metrics)."""

    #: which val/test X-rays every evaluation reads: honest (detector model from the finest CT,
    #: xct_core/detector.py) | clean (the training renderer's noise-free DRRs: inverse crime)
    protocol: Literal["honest", "clean"] = "honest"
    #: the honest protocol's detector
    detector: DetectorParams = DetectorParams()

    #: Gaussian SSIM window: sigma (voxels) and window size (odd; 11 = skimage default for 1.5)
    ssim_sigma: float = Field(1.5, gt=0)
    ssim_win: int = Field(11, ge=3)
    #: HU range of the wide-range PSNR / MAE (both volumes clipped to it; data_range = hi - lo)
    hu_lo: float = -1024.0
    hu_hi: float = 1024.0
    #: DDIM steps of the cascade sampler in evaluation, reconstruction and serving (null:
    #: diffusion.sample_steps); one number, or per stage {stage1: 50, stage2: 20} (stages
    #: left out: diffusion.sample_steps). The noise seed is the top-level ``seed``
    sample_steps: int | dict[str, int] | None = Field(default_factory=lambda: {"stage1": 10, "stage2": 20, "stage3": 20})
    #: diffusion samples per evaluated volume: the point estimate is their voxel-wise mean
    #: (posterior mean); with K > 1 the single first sample is reported beside it (single_*).
    #: One number, or per evaluated (last) stage {stage1: 8, stage2: 2} (left out: 1)
    samples: int | dict[str, int] = Field(default_factory=lambda: {"stage1": 8, "stage2": 4, "stage3": 2})
    #: exported stage models evaluated and registered: best.pt | final.pt
    model_file: Literal["best", "final"] = "best"
    #: evaluate the first N ids of the test split (0: all)
    max_volumes: int = Field(0, ge=0)
    #: the point estimate the gates and ``xct reconstruct`` use: the K-sample ``mean``, or the
    #: ``anchor`` (the anchored last stage's direct twin = the residual diffusion's K → ∞
    #: mean), or ``auto``: the anchor when the last stage is anchored, else the mean (the default:
    #: val evidence, benchmarks/results/calibration_cpu.md); the samples give the std and
    #: interval either way (xct_core/inference.py)
    point_estimate: Literal["mean", "anchor", "auto"] = "auto"
    #: uncertainty calibration (xct_core/calibration.py)
    calibration: CalibrationParams = Field(default_factory=CalibrationParams)

    def samples_for(self, stage: str) -> int:
        """Diffusion samples when stage ``stage`` (a name) is the last evaluated stage."""
        return int(self.samples) if isinstance(self.samples, int) else int(self.samples.get(stage, 1))

    def steps_for(self, stage: str) -> int | None:
        """DDIM steps of stage ``stage`` (a name); None: diffusion.sample_steps."""
        if self.sample_steps is None or isinstance(self.sample_steps, int):
            return self.sample_steps
        return self.sample_steps.get(stage)

    @_model_validator(mode="after")
    def _check(self) -> EvalParams:
        for what, v in (("sample_steps", self.sample_steps), ("samples", self.samples)):
            vals = list(v.values()) if isinstance(v, dict) else ([] if v is None else [v])
            if any(int(x) < 1 for x in vals) or (what == "samples" and any(int(x) > 64 for x in vals)):
                raise ValueError(f"{what} must be in 1…{64 if what == 'samples' else 'num_timesteps'}, got {v}")
            if isinstance(v, dict) and not all(str(k).startswith("stage") for k in v):
                raise ValueError(f"{what}: per-stage keys are stage names (stage1, stage2, …), got {sorted(v)}")
        if self.ssim_win % 2 == 0:
            raise ValueError(f"ssim_win must be odd, got {self.ssim_win}")
        if self.hu_hi <= self.hu_lo:
            raise ValueError(f"hu_hi ({self.hu_hi}) must exceed hu_lo ({self.hu_lo})")
        return self


# --- pipeline steps 1-2: ingest and validate (owner: components/ingest.py, validate.py) ----


class IngestParams(_Section):
    """Step 1 (components/ingest.py): raw CTs → canonical volumes, stats table, patient split.

    Splits are by *patient*: every volume of a patient lands in the same split. The patient of
    a volume is the first group of ``patient_regex`` matched against the volume id, else the
    DICOM PatientID, else the volume id itself.
    """

    #: fractions of patients per split (must sum to 1)
    train_fraction: float = Field(0.7, ge=0, le=1)
    val_fraction: float = Field(0.15, ge=0, le=1)
    test_fraction: float = Field(0.15, ge=0, le=1)
    #: val/test (when their fraction > 0) get at least this many patients, as long as train
    #: keeps at least as many patients as val and test together (small data sets)
    min_eval_patients: int = Field(2, ge=0)
    #: seed of the split, independent of the training seed
    split_seed: int = 0
    #: regex on the volume id whose first group is the patient id (null: PatientID / id)
    patient_regex: str | None = None
    #: voxels above this value (HU) count as body in the ``body_fraction`` statistic
    body_hu: float = -500.0

    @_model_validator(mode="after")
    def _check(self) -> IngestParams:
        total = self.train_fraction + self.val_fraction + self.test_fraction
        if abs(total - 1.0) > 1e-6:
            raise ValueError(f"train/val/test fractions must sum to 1, got {total:g}")
        if self.patient_regex is not None:
            import re

            try:
                rx = re.compile(self.patient_regex)
            except re.error as e:
                raise ValueError(f"patient_regex is not a valid regex ({e})") from None
            if rx.groups < 1:
                raise ValueError("patient_regex needs a capturing group (the patient id)")
        return self


class ValidateParams(_Section):
    """Step 2 (components/validate.py): the Great Expectations suite over the stats table.

    Every threshold here is one expectation; a volume failing any of them (or one that did
    not load) is reported by name with the reason. ``policy``: ``fail`` stops the pipeline
    (non-zero exit); ``quarantine`` drops the failing volumes from the split and goes on.
    """

    policy: Literal["fail", "quarantine"] = "fail"
    #: a CT contains air: its minimum must be <= this (HU); raw unsigned stored values fail
    max_hu_min: float = -500.0
    #: minima below this are not HU (e.g. -32768 fill); scanner padding (-3024) passes
    min_hu_min: float = -3100.0
    #: maxima above this are not HU (raw stored values up to 4095 or 65535)
    max_hu_max: float = 4000.0
    #: a body CT has voxels denser than water: its maximum must be >= this (HU)
    min_hu_max: float = 0.0
    #: plausible voxel spacing, every axis (mm)
    min_spacing_mm: float = Field(0.1, gt=0)
    max_spacing_mm: float = Field(10.0, gt=0)
    #: smallest usable volume for the stage grids: voxels and physical extent (mm) per
    #: axis (R, A, S), after canonicalisation
    min_shape: tuple[int, int, int] = (16, 16, 16)
    min_extent_mm: tuple[float, float, float] = (100.0, 100.0, 100.0)
    #: at least this fraction of voxels must lie above ``ingest.body_hu`` (not empty)
    min_body_fraction: float = Field(0.01, ge=0, le=1)

    @_model_validator(mode="after")
    def _check(self) -> ValidateParams:
        if self.max_spacing_mm <= self.min_spacing_mm:
            raise ValueError(f"max_spacing_mm ({self.max_spacing_mm}) must exceed min_spacing_mm ({self.min_spacing_mm})")
        if self.max_hu_max <= self.min_hu_max or self.max_hu_min <= self.min_hu_min:
            raise ValueError("HU bounds must satisfy min_hu_min < max_hu_min and min_hu_max < max_hu_max")
        if min(self.min_shape) < 1 or min(self.min_extent_mm) < 0:
            raise ValueError("min_shape must be >= 1 and min_extent_mm >= 0 on every axis")
        return self


# --- pipeline step 3: preprocess (owner: components/preprocess.py, xct_core/preprocess.py) ---


class AugmentParams(_Section):
    """Training-set augmentation in the preprocess step (xct_core/augment.py; default off).

    ``copies`` augmented copies ``<id>__aug<j>`` of every TRAIN volume (never val/test), each
    the source CT moved by a rigid transform about its centre (+ optional mirror flips) and
    intensity-jittered, resampled ONCE onto the stage grids; its DRRs are rendered from its
    own augmented finest grid. Deterministic from (seed, id, j). Exact maps: xct_core/augment.py.
    """

    #: augmented copies per train volume (0 = augmentation off)
    copies: int = Field(0, ge=0, le=1000)
    #: seed of the per-copy draws (independent of the training seed)
    seed: int = Field(0, ge=0)
    #: max |rotation| about the R, A, S axes through the volume centre, degrees (uniform)
    rotate_deg: tuple[float, float, float] = Field((0.0, 0.0, 0.0))
    #: max |translation| along R, A, S, mm (uniform)
    translate_mm: tuple[float, float, float] = Field((0.0, 0.0, 0.0))
    #: probability of a left-right (sagittal-plane) mirror. A mirrored chest is anatomy no patient
    #: has (heart on the right, situs inversus is ~1 in 10 000), so flip_lr > 0 is refused unless
    #: allow_lr_flip says the data is left-right symmetric enough for it (not a chest)
    flip_lr: float = Field(0.0, ge=0, le=1)
    #: explicit opt-in for flip_lr > 0 (false: a flip probability is a config error)
    allow_lr_flip: bool = False
    #: probability of an anterior-posterior (coronal-plane) mirror
    flip_ap: float = Field(0.0, ge=0, le=1)
    #: intensity jitter HU' = a·HU + b with a ~ U[1 - hu_scale, 1 + hu_scale] ...
    hu_scale: float = Field(0.0, ge=0, lt=1)
    #: ... and b ~ U[-hu_offset, hu_offset] HU ...
    hu_offset: float = Field(0.0, ge=0)
    #: ... applied only to voxels above this HU (body; air, lung and the outside fill are kept)
    jitter_above_hu: float = -500.0

    @field_validator("rotate_deg", "translate_mm")
    @classmethod
    def _non_negative(cls, v: tuple[float, float, float]) -> tuple[float, float, float]:
        if min(v) < 0:
            raise ValueError(f"maxima must be >= 0 on every axis, got {list(v)}")
        return v

    @_model_validator(mode="after")
    def _no_mirror_anatomy(self) -> AugmentParams:
        if self.flip_lr > 0 and not self.allow_lr_flip:
            raise ValueError(f"flip_lr {self.flip_lr} mirrors left and right: a flipped chest puts the heart on the "
                             "right (anatomy no patient has); set flip_lr: 0, or allow_lr_flip: true for data "
                             "where a mirror image is plausible")
        return self


class PreprocessParams(_Section):
    """Step 3 (components/preprocess.py): canonical volumes → stage grids + DRR pairs.

    Every stage grid (``stages.*.size``/``fov_mm``) and the DRRs (``drr``, ``hu.mu_water``)
    are derived from these and other sections; the HU window is NOT applied here (the
    Dataset windows at load time), so changing ``hu.window`` needs no re-run.
    """

    #: worker processes (one torch thread each); 1 = run in-process
    workers: int = Field(2, ge=1)
    #: run the per-volume work as a Ray Data map instead of a local process pool
    use_ray: bool = False
    #: HU of stage-grid voxels outside the source volume (air)
    fill_hu: float = -1024.0
    #: Gaussian anti-aliasing before downsampling to a stage grid (xct_core.io.resample_to_grid)
    antialias: bool = True
    #: training-set augmentation (copies: 0 = off)
    augment: AugmentParams = AugmentParams()
    #: TRAIN ids' X-rays pass through the honest protocol's detector (``eval.detector``: blur,
    #: scatter, Poisson noise, reading clamp; xct_core.detector.detector_postprocess) applied to
    #: the training renderer's DRRs, so the model learns what it is evaluated on; false = clean DRRs
    train_detector: bool = True


# --- pipeline step 4: stage training (owner: xct_core/training.py, components/train.py) ---


class _OpsAware(_Section):
    """A section some of whose keys another layer validates (``ops_keys``): a model that
    does not declare such a key as a field drops it unread; a subclass that does (the
    operations layer's models) validates it. Any other unknown key is still an error."""

    ops_keys: ClassVar[tuple[str, ...]] = ()

    @_model_validator(mode="before")
    @classmethod
    def _drop_ops_keys(cls, data: Any) -> Any:
        if isinstance(data, dict) and any(k in data and k not in cls.model_fields for k in cls.ops_keys):
            data = {k: v for k, v in data.items() if k in cls.model_fields or k not in cls.ops_keys}
        return data


class TrainParams(_OpsAware):
    """Step 4: train one cascade stage (``xct train --stage K``).

    Optimiser AdamW (per-stage ``lr`` and ``batch_size`` in ``stages``); LR: linear warmup
    over ``warmup_steps`` then cosine decay to ``lr · min_lr_ratio`` at the last step. Steps
    count optimiser updates; one step consumes ``batch_size`` volumes per worker.
    """

    #: optimiser steps per stage (stage name → steps); every stage trained needs an entry
    steps: dict[str, int] = Field(default_factory=lambda: {"stage1": 900, "stage2": 700, "stage3": 80})
    warmup_steps: int = Field(10, ge=0)
    min_lr_ratio: float = Field(0.1, ge=0, le=1)
    weight_decay: float = Field(0.0, ge=0)
    adam_betas: tuple[float, float] = (0.9, 0.99)
    #: max global gradient norm (clipped after the AMP unscale)
    grad_clip: float = Field(1.0, gt=0)
    #: EMA of the weights (used for validation and export); warmup min(decay, (1+n)/(10+n))
    ema_decay: float = Field(0.995, ge=0, lt=1)
    #: autocast precision on GPU (CPU always trains in fp32); fp16 adds a GradScaler
    precision: Literal["bf16", "fp16", "fp32"] = "bf16"
    #: metrics/progress every N steps; full checkpoint every N steps (and at the end)
    log_every: int = Field(5, ge=1)
    ckpt_every: int = Field(25, ge=1)
    #: full checkpoints kept besides the best one
    keep_last: int = Field(2, ge=1)
    #: resume meets a checkpoint that fails its sha256 or does not load: warn and use the newest
    #: intact older one (fallback) or refuse (fail); never resumed silently (xct_core.training.state)
    on_corrupt_checkpoint: Literal["fallback", "fail"] = "fallback"
    #: validation every N steps (0: only at the end); DDIM steps of the validation sampler
    val_every: int = Field(300, ge=0)
    val_sample_steps: int = Field(10, ge=1)
    #: diffusion samples per validation volume (their mean is the point estimate, as in evaluation)
    val_samples: int = Field(1, ge=1, le=64)
    #: validation volumes (the first N ids of the val split; 0 = all)
    val_max_volumes: int = Field(6, ge=0)
    #: also render the reconstruction's DRRs and report reprojection PSNR/SSIM
    val_reprojection: bool = True
    #: validation metric that selects best.pt (a key of xct_core.metrics.volume_metrics)
    best_metric: SelectMetric = "psnr_window_db"
    best_mode: Literal["max", "min"] = "max"
    #: also train a direct-regression twin (same network, mode="direct") on the same batches
    #: and report its validation metrics as the baseline (val/direct_*)
    direct_baseline: bool = True
    #: earlier stages used (frozen) for validation of stage k>1: their best.pt or final.pt
    prev_stage_model: Literal["best", "final"] = "best"
    #: DataLoader worker processes per training worker
    loader_workers: int = Field(0, ge=0)
    #: where checkpoints, exported models, curves and montages go (layout: xct_core.training)
    out_dir: str = "outputs/train"
    #: MLflow experiment (tracking: MLFLOW_TRACKING_URI, default sqlite:///mlflow.db in the repo)
    experiment: str = "xct"
    #: ``train.ray`` (Ray Train scaling, fault tolerance): components/ray_params.py
    ops_keys: ClassVar[tuple[str, ...]] = ("ray",)

    @field_validator("steps")
    @classmethod
    def _positive_steps(cls, v: dict[str, int]) -> dict[str, int]:
        bad = {k: n for k, n in v.items() if int(n) < 1}
        if bad:
            raise ValueError(f"steps must be >= 1, got {bad}")
        return v


class RelativeGate(_Section):
    """A check of the candidate against a baseline on the SAME test split (MLflow's
    ``MetricThreshold`` idea): with ``d = candidate − baseline`` (``baseline − candidate``
    when ``greater_is_better`` is false), pass iff ``d ≥ min_absolute_change`` and
    ``d / |baseline| ≥ min_relative_change`` (each when set; at least one must be).

    Baselines: ``mean_volume`` (the evaluation's ``baseline_<metric>``: the train split's
    mean volume), ``direct_twin`` (``direct_<metric>``: the stage's own one-pass regression
    twin) and ``champion`` (the registered champion's stage-K ``<metric>``, only when it was
    measured on the same test split; no champion yet, or another split: the check is skipped
    and says so)."""

    metric: MetricName = "psnr_window_db"
    baseline: Literal["mean_volume", "direct_twin", "champion"]
    min_absolute_change: float | None = None
    min_relative_change: float | None = None
    greater_is_better: bool = True
    #: decide on the patient-paired bootstrap (candidate − baseline per test patient, matched by
    #: id; :func:`xct_core.intervals.paired_bootstrap`): pass iff the LOWER bound of its 95 %
    #: interval clears the required change (e.g. ``min_absolute_change: -0.1`` = "not worse than
    #: the baseline by more than 0.1 dB, with 95 % confidence"); without per-patient rows (or
    #: < 5 patients) the point check decides, with a note
    paired_bootstrap: bool = False
    #: non-inferiority against the direct twin (dB metrics only): the required change is
    #: ``-xct_core.gates.non_inferiority_margin_db(K, slack)``, K = the stage's eval samples
    #: (a K-sample posterior mean trails the twin by 10·log10(1 + 1/K) dB by construction)
    non_inferiority_slack_db: float | None = Field(None, ge=0)

    @_model_validator(mode="after")
    def _needs_a_margin(self) -> RelativeGate:
        if self.non_inferiority_slack_db is not None:
            if self.baseline != "direct_twin" or _metric_entry(self.metric).unit != "dB":
                raise ValueError(f"non_inferiority_slack_db: only against direct_twin on a dB metric "
                                 f"(got {self.baseline}, {self.metric})")
            if self.min_absolute_change is not None or self.min_relative_change is not None:
                raise ValueError("non_inferiority_slack_db sets the margin: leave min_absolute_change/min_relative_change out")
            return self
        if self.min_absolute_change is None and self.min_relative_change is None:
            raise ValueError(f"relative gate against {self.baseline}: set min_absolute_change and/or min_relative_change")
        if self.greater_is_better != (_metric_entry(self.metric).better == "higher"):
            raise ValueError(f"relative gate on {self.metric}: the metric table says {_metric_entry(self.metric).better} "
                             f"is better, greater_is_better is {self.greater_is_better}")
        return self


class CeilingParams(_Section):
    """The information ceiling shown beside every absolute threshold (xct_core/ceiling.py)."""

    #: ``synth``: the data are ``data.synth``'s phantoms (the ceiling is computed by re-drawing
    #: their non-identifiable parts); ``none``: no generator (real data): the ceiling is unknown
    source: Literal["synth", "none"] = "synth"
    #: phantoms re-drawn (two re-draws each); cost ≈ 4 syntheses of a data.synth phantom each
    phantoms: int = Field(2, ge=1, le=64)
    #: seed of the re-draws
    seed: int = Field(1, ge=0)


class StageGate(_Section):
    """Promotion thresholds of one cascade stage (strict inequalities: value must exceed).
    An absolute threshold set to ``null`` is reported beside the others but does not gate."""

    #: 3D PSNR in the training window (data_range 2 in normalised units), dB, whole grid
    psnr_window_db: float | None
    #: 3D SSIM in the training window
    ssim_window: float | None
    #: the same PSNR with the MSE inside the body only (the air around the patient, ~60 % of
    #: a demo grid, does not inflate it); null = reported, not gating
    psnr_window_body_db: float | None = None
    #: maximum number of non-finite voxels allowed in the outputs
    max_nan: int = 0
    #: "not collapsed": output std must be at least this fraction of the target's std
    min_std_ratio: float = Field(0.25, ge=0)
    #: checks against baselines (mean volume, direct twin, champion), all must pass
    relative: list[RelativeGate] = []
    #: the information ceiling reported beside every absolute threshold
    ceiling: CeilingParams = CeilingParams()


#: a gate's key: the name of the stage it gates (``stage1``, ``stage2``, …: the keys of ``stages``)
_GATE_KEY = re.compile(r"stage[1-9][0-9]*")


def _check_gate_names(gates: dict[str, StageGate]) -> dict[str, StageGate]:
    bad = [k for k in gates if not _GATE_KEY.fullmatch(k)]
    if bad:
        raise ValueError(f"gates are keyed by stage name (stage1, stage2, …, as in `stages`), got {bad}")
    return gates


#: Evaluation gates: one :class:`StageGate` per cascade stage, keyed like ``stages`` (``stage1``,
#: ``stage2``, …), read from params, never hard-coded. Every stage in ``stages`` needs its gate
#: (a stage without one is a load-time error, :meth:`Params._gates_mirror_stages`); a gate
#: ``stageK`` beyond the cascade gates nothing and is ignored (a profile that trims the
#: cascade may keep the base file's gates).
GateParams = _Annotated[dict[str, StageGate], _AfterValidator(_check_gate_names)]


def _demo_gate(psnr_window_db: float, ssim_window: float, body_db: float) -> StageGate:
    """The demo profile's gate (params.yaml): absolute bars (whole grid and body) + mean volume
    +3 dB + non-inferior to the twin + not worse than the champion (paired bootstrap)."""
    return StageGate(psnr_window_db=psnr_window_db, ssim_window=ssim_window, psnr_window_body_db=body_db,
                     max_nan=0, min_std_ratio=0.25,
                     relative=[RelativeGate(metric="psnr_window_db", baseline="mean_volume", min_absolute_change=3.0),
                               RelativeGate(metric="psnr_window_db", baseline="direct_twin", paired_bootstrap=True,
                                            non_inferiority_slack_db=0.3),
                               RelativeGate(metric="psnr_window_db", baseline="champion", min_absolute_change=-0.1,
                                            paired_bootstrap=True)])


#: defaults = the demo profile in params.yaml
_DEMO_GATES: dict[str, StageGate] = {
    "stage1": _demo_gate(28.0, 0.65, 24.0),
    "stage2": _demo_gate(32.0, 0.75, 27.0),
    "stage3": _demo_gate(35.0, 0.80, 28.0),
}


class RegisterParams(_Section):
    """Registration step (components/register.py): MLflow registry name and aliases.

    Tracking: ``MLFLOW_TRACKING_URI``, default ``sqlite:///mlflow.db`` in the repo.
    """

    #: registered model name
    model_name: str = "xct-cascade"
    #: alias given when every gate passes and the model beats the champion on the same test split
    champion_alias: str = "champion"
    #: alias given otherwise (gates passed, not better than / not comparable to the champion)
    candidate_alias: str = "candidate"
    #: MLflow experiment of the registration runs
    experiment: str = "xct-register"
    #: how "beats the champion" is decided (same test split only): ``paired`` = the lower bound of
    #: the paired-bootstrap 95 % interval of the per-patient change in the last stage's window PSNR
    #: (xct_core/intervals.py; both versions' per_patient.csv) exceeds ``champion_min_change_db``
    #: (falls back to the means, said in the reason, when either side has no rows or < 5 patients);
    #: ``mean`` = the mean PSNR exceeds the champion's by more than ``champion_min_change_db``
    champion_rule: Literal["paired", "mean"] = "paired"
    #: the change in dB the decision must exceed (0: strictly better)
    champion_min_change_db: float = Field(0.0, ge=0.0, le=10.0)
    #: every MLflow HTTP request waits at most this long for the server (MLFLOW_HTTP_REQUEST_TIMEOUT
    #: unless the environment sets it) and is retried at most ``request_max_retries`` times
    #: (MLFLOW_HTTP_REQUEST_MAX_RETRIES): a dead or black-holed server is an error in bounded time
    request_timeout_s: int = Field(15, ge=1, le=3600)
    request_max_retries: int = Field(3, ge=0, le=10)


# --- reconstruction for users (owner: xct_core/inference.py, `xct reconstruct|evaluate`) ----


class ReconstructParams(_Section):
    """``xct reconstruct`` / ``xct evaluate`` on user X-rays and CTs (xct_core/inference.py).

    The geometry, window and sampler come from the MODEL's params (its artifacts); these
    settings are the local defaults of the commands and the reprojection-QA thresholds.
    """

    #: diffusion samples per reconstruction (K > 1 also writes the voxel-wise std)
    samples: int = Field(8, ge=1, le=64)
    #: samples run together as one batch (each keeps its own seed; memory grows with it:
    #: 1 for the largest grids on a small GPU)
    sample_batch: int = Field(8, ge=1, le=64)
    #: reprojection QA: warn when a view's PSNR (DRR of the output vs the input line
    #: integrals, data_range = input max - min) or 2D SSIM falls below these
    qa_min_psnr_db: float = 20.0
    qa_min_ssim: float = Field(0.5, ge=-1, le=1)
    #: PNG/DICOM inputs: I/I0 = stored value / full scale (2**bits - 1); pixels at 0 are
    #: clamped to this fraction of full scale before p = -ln(I/I0)
    min_intensity_fraction: float = Field(1e-4, gt=0, lt=1)


# --- hostile and broken inputs (every reader: xct_core/io.py, xray_io.py, stats.py; qa.py) ---

#: the most deflate (gzip, zlib) can expand its input: 1032 output bytes per input byte
DEFLATE_MAX_RATIO = 1032


def _human_bytes(n: float) -> str:
    """``3.4 GiB``-style size (powers of 1024, one decimal)."""
    n = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


class LimitsParams(_Section):
    """What an input may claim and hold, judged BEFORE its data is read.

    A header is a promise about the data that follows: a 90-byte ``.nii.gz`` may claim 1200³
    int16 voxels (3.4 GB), a ``.npy`` 200000² float32 pixels (149 GiB). Every reader of user
    files (NIfTI, DICOM series, ``.npy``, PNG, DICOM radiographs) checks the claimed element
    count (:meth:`check_claim`) and the claimed bytes against the file's size
    (:meth:`check_payload`) from the header alone, so nothing is allocated for a forged claim;
    each raises a one-line :class:`~xct_core.errors.InputError` naming the file, the claim
    and the limit. X-ray inputs must be plausible line integrals (xct_core/xray_io.py); a
    reconstruction that is not finite or has no dynamic range is an error (xct_core/qa.py).
    """

    #: most voxels a CT may claim: NIfTI (every axis), DICOM series (rows x cols x slices).
    #: 2**29 = 512 x 512 x 2048 slices (2 GiB as float32 in memory)
    max_ct_voxels: int = Field(2**29, ge=8)
    #: most pixels an X-ray input may claim (.npy, PNG, DICOM radiograph): 2**26 = 8192 x 8192
    max_xray_pixels: int = Field(2**26, ge=4)
    #: .nii.gz: (claimed voxel bytes) / (file size) above this is a truncated or forged
    #: header. 1032 is the most deflate can expand, so no real file exceeds it
    max_compression_ratio: float = Field(1032.0, ge=1)
    #: X-ray inputs are line integrals p = ∫mu dl with 0 <= p <= this. Water is 0.02/mm, so
    #: 400 mm of soft tissue give 8 and a lateral chest with bone ~10; metal can add tens.
    #: 50 means I/I0 = e^-50 ~ 2e-22, far beyond any detector (a 16-bit one ends near 11)
    max_line_integral: float = Field(50.0, gt=0)
    #: a reconstruction whose max - min is below this (HU) is degenerate (a constant volume)
    min_dynamic_range_hu: float = Field(1.0, ge=0)

    def check_claim(self, where: Any, shape: Any, setting: Literal["max_ct_voxels", "max_xray_pixels"],
                    what: str = "voxels") -> int:
        """``prod(shape)`` (exact, Python ints); :class:`InputError` naming ``where`` when it
        exceeds the limit ``setting``. ``what``: ``"voxels"`` | ``"pixels"`` (the message)."""
        from xct_core.errors import InputError

        dims = [int(s) for s in shape]
        n = 1
        for d in dims:
            n *= d
        limit = int(getattr(self, setting))
        if n > limit:
            raise InputError(where, f"header claims {' x '.join(map(str, dims))} = {n:,} {what}, more than "
                                    f"limits.{setting} ({limit:,}): refusing to read it")
        return n

    def check_payload(self, where: Any, claimed_bytes: int, file_bytes: int, *, compressed: bool,
                      offset: int = 0) -> None:
        """The claimed data must fit the file: ``offset + claimed_bytes <= file_bytes`` when
        uncompressed, ``claimed_bytes / file_bytes <= max_compression_ratio`` when compressed."""
        from xct_core.errors import InputError

        claimed_bytes, file_bytes = int(claimed_bytes), int(file_bytes)
        if compressed:
            ratio = claimed_bytes / max(file_bytes, 1)
            if ratio > self.max_compression_ratio:
                raise InputError(
                    where, f"corrupt or truncated data: the header claims {_human_bytes(claimed_bytes)} but the "
                           f"compressed file is {_human_bytes(file_bytes)} ({ratio:,.0f}:1, more than "
                           f"limits.max_compression_ratio {self.max_compression_ratio:g}:1; deflate expands at most "
                           f"{DEFLATE_MAX_RATIO}:1): a truncated file or a forged header")
        elif offset + claimed_bytes > file_bytes:
            raise InputError(where, f"corrupt or truncated data: the header claims {claimed_bytes:,} bytes after "
                                    f"byte {offset:,}, the file has {file_bytes:,} bytes")


@dataclass(frozen=True)
class Stage:
    """Cascade stage ``k`` resolved from params: the one door through which code learns
    about a stage (``params.stage(k)``), instead of re-deriving name, grid, spacing or the
    previous stage from ``params`` + ``k`` in every module.

    Attributes:
        k: 1-based index (stage 1 = the coarsest grid).
        name: ``stage{k}`` (the key in ``stages``, ``train.steps``, ``gates``).
        cfg: the stage's :class:`StageParams`.
        prev: stage ``k-1`` resolved (``None`` for stage 1).
        steps: ``train.steps[name]`` (``None`` when absent; :attr:`train_steps` raises then).
        gate: ``gates[name]`` (every stage has one: :meth:`Params._gates_mirror_stages`).
    """

    k: int
    name: str
    cfg: StageParams
    prev: Stage | None
    steps: int | None
    gate: StageGate

    @property
    def grid(self) -> StageGrid:
        return StageGrid(self.k, int(self.cfg.size), float(self.cfg.fov_mm))

    @property
    def size(self) -> int:
        return int(self.cfg.size)

    @property
    def fov_mm(self) -> float:
        return float(self.cfg.fov_mm)

    @property
    def spacing_mm(self) -> float:
        """Voxel size (isotropic), ``fov_mm / size``."""
        return self.grid.spacing_mm

    @property
    def token_levels(self) -> int:
        """Halvings of the conv stem from ``size``³ to ``token_grid``³ (``log2(size/token_grid)``)."""
        return token_levels(self.size, int(self.cfg.token_grid))

    def affine(self, center_world: Any = (0.0, 0.0, 0.0)) -> Any:
        """Voxel → world (mm, RAS+) affine of this grid, its centre at ``center_world``
        (default the world origin: the networks' and the projection geometry's frame)."""
        return self.grid.affine(center_world)

    @property
    def train_steps(self) -> int:
        """``train.steps[name]``; :class:`ConfigError` when params give none for this stage."""
        if self.steps is None:
            raise ConfigError(f"train.steps has no entry for {self.name}")
        return int(self.steps)


#: top-level sections of a params file that the science does not read, and where their
#: schemas live (validated there; :class:`Params` drops them unread)
OPS_SECTIONS: dict[str, str] = {
    "pipeline": "components/ops_params.py",
    "s3": "components/ops_params.py",
    "hpo": "xct_core/hpo_params.py",
}

#: public name of the frozen, extra="forbid" base of every section (the operations layer's
#: sections derive from it too)
Section = _Section


class Params(_OpsAware):
    """The science's parameter tree (one section per concern); the operational sections
    (:data:`OPS_SECTIONS`, ``train.ray``) are validated by ``components.ops_params.OpsParams``."""

    ops_keys: ClassVar[tuple[str, ...]] = tuple(OPS_SECTIONS)

    seed: int = 0
    data: DataParams = DataParams()
    hu: HUParams = HUParams()
    drr: DRRParams = DRRParams()
    model: ModelParams = ModelParams()
    stages: Stages = _DEMO_STAGES
    diffusion: DiffusionParams = DiffusionParams()
    eval: EvalParams = EvalParams()
    ingest: IngestParams = IngestParams()
    validation: ValidateParams = ValidateParams()
    preprocess: PreprocessParams = PreprocessParams()
    train: TrainParams = TrainParams()
    gates: GateParams = Field(_DEMO_GATES, validate_default=True)  # checked against `stages` even when not given
    registry: RegisterParams = RegisterParams()
    reconstruct: ReconstructParams = ReconstructParams()
    limits: LimitsParams = LimitsParams()

    @field_validator("gates")
    @classmethod
    def _gates_mirror_stages(cls, gates: dict[str, StageGate], info: Any) -> dict[str, StageGate]:
        """Every stage has its gate (a stage without one is an error, not an ungated promotion)."""
        stages = info.data.get("stages")
        missing = [name for name in (stages or {}) if name not in gates]
        if missing:
            raise ValueError(f"no gate for {', '.join(missing)}: every stage in `stages` needs its gates.<stage> "
                             f"thresholds (have {', '.join(gates) or 'none'})")
        return gates

    @_model_validator(mode="after")
    def _cross_checks(self) -> Params:
        if self.diffusion.guidance_weight > 0 and self.hu.output == "window":
            raise ValueError("diffusion.guidance_weight > 0 needs a full-range hu.output (soft60 | wide | knots): "
                             "a window-clipped volume renders -200 HU air, so matching the X-rays would distort it")
        return self

    @property
    def n_stages(self) -> int:
        return len(self.stages)

    def point_estimate_for(self, k: int) -> str:
        """``eval.point_estimate`` resolved for a cascade run up to stage ``k``: ``auto`` is
        ``anchor`` when stage ``k`` is anchored (``anchor: direct``), else ``mean``."""
        which = self.eval.point_estimate
        if which != "auto":
            return which
        return "anchor" if self.stage(k).cfg.anchor == "direct" else "mean"

    def stage(self, k: int | str) -> Stage:
        """Stage ``k`` (1-based index, or its name ``stage{k}``) resolved: see :class:`Stage`.

        Raises :class:`ConfigError` when the params define no such stage."""
        names = list(self.stages)
        if isinstance(k, str):
            if k not in self.stages:
                raise ConfigError(f"no stage {k!r} in params.stages (have {', '.join(names)})")
            k = names.index(k) + 1
        k = int(k)
        if not 1 <= k <= len(names):
            raise ConfigError(f"stage {k} does not exist (params define stages 1…{len(names)})")
        prev = self.stage(k - 1) if k > 1 else None
        name = names[k - 1]
        steps = self.train.steps.get(name)
        return Stage(k=k, name=name, cfg=self.stages[name], prev=prev,
                     steps=None if steps is None else int(steps), gate=self.gates[name])

    def stage_list(self) -> list[Stage]:
        """Every stage resolved, in cascade order."""
        return [self.stage(k) for k in range(1, self.n_stages + 1)]

    def digest(self) -> str:
        """Stable hash of the effective science parameters (lineage tag): the operational
        sections are left out, so the same file gives the same digest whichever layer's
        model loaded it, and an S3 or KFP knob does not change a model's lineage."""
        science = Params.model_validate(self.model_dump(mode="json")) if type(self) is not Params else self
        blob = json.dumps(science.model_dump(mode="json"), sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:16]


def _deep_merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _deep_merge(out[k], v)
        else:
            out[k] = v
    return out


def _read_yaml(path: Path) -> dict:
    from xct_core.errors import InputError
    from xct_core.yamlsafe import read_yaml_doc

    try:  # bounded read and parse (size, regular file, UTF-8, depth, aliases, duplicate keys)
        data = read_yaml_doc(path, "params file")
    except InputError as e:
        raise ConfigError(str(e)) from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: top level must be a mapping, got {type(data).__name__}")
    return data


def default_params_path() -> Path:
    return Path(os.environ.get(PARAMS_ENV, "params.yaml"))


#: a Params model: :class:`Params` or an operations-layer subclass (``OpsParams``)
P = TypeVar("P", bound="Params")


def params_from_dict(data: dict, source: str = "<dict>", schema: type[P] | None = None) -> P:
    """``data`` validated by ``schema`` (default :class:`Params`); a :class:`ConfigError`
    naming ``source`` and the first invalid key otherwise."""
    try:
        return (schema or Params).model_validate(data)
    except ValidationError as e:
        first = e.errors()[0]
        loc = ".".join(str(p) for p in first["loc"])
        more = f" (and {e.error_count() - 1} more)" if e.error_count() > 1 else ""
        raise ConfigError(f"{source}: invalid parameter {loc}: {first['msg']}{more}") from None


#: top-level key of a params file listing overlay files to merge after it (consumed by
#: :func:`load_params`; not a field of :class:`Params`)
OVERLAYS_KEY = "overlays"


def _declared_overlays(data: dict, path: Path) -> list[Path]:
    """Pop ``overlays`` from a params file's mapping: its entries as paths relative to the
    folder of ``path``."""
    raw = data.pop(OVERLAYS_KEY, None)
    if raw is None:
        return []
    if not isinstance(raw, list) or not all(isinstance(x, str) and x.strip() for x in raw):
        raise ConfigError(
            f"{path}: '{OVERLAYS_KEY}' must be a list of YAML file paths (relative to the params file's folder), got {raw!r}"
        )
    return [path.parent / x for x in raw]


def _read_overlay(path: Path, declared_in: Path | None = None) -> dict:
    """One overlay file's mapping; an overlay cannot declare ``overlays`` itself (one level)."""
    if declared_in is not None and not path.is_file():
        raise ConfigError(f"{path}: overlay file not found (listed under '{OVERLAYS_KEY}' in {declared_in})")
    data = _read_yaml(path)
    if OVERLAYS_KEY in data:
        raise ConfigError(f"{path}: an overlay must not declare '{OVERLAYS_KEY}' (one level only: list it in the params file)")
    return data


def parse_set(item: str) -> dict:
    """``KEY=VALUE`` (``--set``) as a nested params fragment: ``KEY`` is a dotted params path
    (``train.ray.num_workers``), ``VALUE`` is parsed as YAML (``2`` → int, ``[1, 2]`` → list,
    ``null``, ``true``; quote a string that looks like a number). One-line ConfigError."""
    key, sep, raw = item.partition("=")
    parts = key.strip().split(".")
    if not sep or not all(p.strip() for p in parts):
        raise ConfigError(f"--set {item!r}: expected KEY=VALUE with a dotted params key, e.g. train.ray.num_workers=2")
    from xct_core.yamlsafe import load_yaml_text

    try:  # the same bounded loader as every params file
        value = load_yaml_text(raw, f"--set {key}") if raw.strip() else ""
    except InputError as e:
        raise ConfigError(str(e)) from None
    for part in reversed([p.strip() for p in parts]):
        value = {part: value}
    return value


def _merged(path: str | Path | None, overlays: list[str | Path] | None, sets: list[str] | None,
            base: dict | None = None) -> tuple[dict, str]:
    """The merged mapping (base file or ``base``, its declared overlays, ``overlays``, then the
    ``--set`` items) and a source label naming what was applied."""
    applied: list[str] = []
    if base is None:
        p = Path(path) if path is not None else default_params_path()
        data = _read_yaml(p)
        for ov in _declared_overlays(data, p):
            frag = _read_overlay(ov, declared_in=p)
            data = _deep_merge(data, frag)
            applied += [str(ov)] if frag else []
        label = str(p)
    else:
        data, label = base, "the built-in defaults (= params.yaml)"
    for ov in overlays or []:
        frag = _read_overlay(Path(ov))
        data = _deep_merge(data, frag)
        applied += [str(ov)] if frag else []
    for item in sets or []:
        data = _deep_merge(data, parse_set(item))
        applied.append(f"--set {item}")
    return data, (f"{label} (+ {', '.join(applied)})" if applied else label)


def load_params(path: str | Path | None = None, overlays: list[str | Path] | None = None,
                sets: list[str] | None = None, schema: type[P] | None = None) -> P:
    """Load params.yaml (or ``$XCT_PARAMS``) and deep-merge its overlays, in this order:

    1. the base file;
    2. the files it lists under the top-level ``overlays:`` key, in order, with paths relative
       to the base file's folder (e.g. the HPO results ``hpo/best_stage{K}.yaml``);
    3. ``overlays`` given here (e.g. ``params.production.yaml``), in order;
    4. ``sets``: ``KEY=VALUE`` items (``--set``, :func:`parse_set`), in order.

    Mappings merge key by key; any other value replaces. A missing overlay is a
    :class:`ConfigError` naming it; an overlay may not declare ``overlays`` itself. The
    result is self-contained: ``Params.model_dump()`` holds the merged values and no
    ``overlays`` key, so a dump loads elsewhere without re-applying anything. ``schema``:
    the model that validates it (default :class:`Params`, the science's sections; the
    operations layer passes ``OpsParams``).
    """
    data, source = _merged(path, overlays, sets)
    return params_from_dict(data, source, schema)


def resolve_params(path: str | Path | None = None, overlays: list[str | Path] | None = None,
                   sets: list[str] | None = None, schema: type[P] | None = None) -> P:
    """The params a command uses: ``path`` if given, else ``$XCT_PARAMS`` (which must exist
    when set), else ./params.yaml when it exists, else the built-in defaults — the same
    values as the repo's params.yaml (tests/test_one_source.py), without its overlays.
    ``overlays`` and ``sets`` apply on top in every case."""
    if path is not None or os.environ.get(PARAMS_ENV) or default_params_path().exists():
        return load_params(path, overlays, sets, schema)
    data, source = _merged(None, overlays, sets, base=(schema or Params)().model_dump(mode="json"))
    return params_from_dict(data, source, schema)
