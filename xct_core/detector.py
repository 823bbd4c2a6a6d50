"""The honest protocol's detector model: X-rays as a flat-panel detector would record them.

Why. Evaluating on noise-free DRRs from the training renderer and grid is an inverse crime
(docs: ../shared/DESIGN.md §5b): the test inputs then obey exactly the forward model the
network's lifting, physics loss and guidance use. The honest views (``eval.protocol:
honest``) break that on purpose, in four independent ways:

1. **Finest grid**: rendered from the CT the preprocess step reads (the 128³ source phantom,
   or the native CT of a real scan), not from the training grid.
2. **Independent renderer**: :func:`xct_core.drr.render` with ``method="reference"`` — the
   ``grid_sample`` ray marcher in world mm at ``step_fraction`` × the CT's smallest spacing —
   never the Joseph projector the training DRRs and the model's geometry use. Each detector
   pixel is ``supersample``² rays whose *intensities* are averaged (the pixel aperture; the
   partial-volume effect of a real pixel is non-linear in the line integral).
3. **Detector physics**, in this order, on intensities ``I = I0·exp(−p)`` (``I0 = 1``):

   - detector blur: a Gaussian PSF of ``blur_fwhm_mm`` FWHM in the detector plane, applied on
     the supersampled grid (``mode="reflect"``: the image integral is conserved), then the
     ``supersample``² sub-pixels are averaged (the pixel aperture);
   - scatter: ``S = scatter_fraction · G_σ ⊛ (p·P)`` with ``G_σ`` a broad Gaussian of
     ``scatter_sigma_mm`` — the "primary convolved with a scatter spread function" model
     (IAEA Diagnostic Radiology Physics handbook §6.3.4) with the kernel's amplitude growing
     with the traversed line integral ``p`` (scatter-kernel superposition, as in CBCT scatter
     correction): no scatter comes from the unattenuated field around the body, and behind
     a uniform slab of line integral ``p`` the scatter-to-primary ratio is exactly
     ``scatter_fraction · p``. ``scatter_fraction`` is therefore the SPR per unit line
     integral (≈ 50 mm of water); ``G`` conserves the integral, so
     ``mean(S) = scatter_fraction · mean(p·P)`` exactly;
   - quantum noise: detected counts ``N ~ Poisson(photons_per_pixel · (P + S))``
     (``photons_per_pixel``: unattenuated detected photons per detector pixel; 0 = off), so
     ``Var(p) ≈ 1 / (N0·exp(−p))`` at a flat field;
   - back to line integrals ``p = −ln(max(N / N0, min_intensity_fraction))`` with the ONE
     clamp of :func:`xct_core.xray_io.intensity_to_line_integral`
     (``reconstruct.min_intensity_fraction``), as a user's PNG/DICOM radiograph is read.
4. **Seeded per volume**: the noise of volume ``vid`` comes from ``(seed, sha256(vid), view)``
   (:func:`noise_rng`), so a re-run gives the same bytes whatever the worker order.

Geometry: the views are placed on the CT's own grid with the isocentre at its centre, which
is :attr:`xct_core.io.CTVolume.center_world` — the same world point the preprocess step
centres every stage grid on — so source, detector and pixel rays are identical to the clean
DRRs' (tests/test_detector.py checks it); only the physics differs.

Training may see the same corruptions (``preprocess.train_detector``): the preprocess step
passes the TRAIN ids' training-renderer DRRs through :func:`detector_postprocess` (step 3's
blur, scatter, noise and clamp at one ray per pixel; :func:`corrupt_views`).

The formulas live here once; the preprocess step (val/test views), ``xct evaluate --ct``
(:func:`xct_core.evaluation.ct_case`) and the real-CT experiment call :func:`honest_views`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from xct_core.errors import ConfigError
from xct_core.geometry import VIEWS, PlacedGeometry, ProjectionGeometry

__all__ = [
    "FWHM_PER_SIGMA",
    "DetectorModel",
    "bin_pixels",
    "corrupt_views",
    "detect",
    "detector_postprocess",
    "gaussian_blur",
    "honest_views",
    "noise_rng",
    "render_fine",
]

#: FWHM of a Gaussian in units of its sigma: 2·sqrt(2·ln 2)
FWHM_PER_SIGMA = 2.0 * math.sqrt(2.0 * math.log(2.0))


@dataclass(frozen=True)
class DetectorModel:
    """The detector of the honest protocol (``params.eval.detector`` + the reading clamp
    ``params.reconstruct.min_intensity_fraction``; module docstring). No defaults here: the
    documented defaults are params.yaml's (:class:`xct_core.config.DetectorParams`)."""

    photons_per_pixel: float  #: unattenuated detected photons per pixel (0 = no quantum noise)
    blur_fwhm_mm: float  #: detector PSF, Gaussian FWHM at the detector (mm)
    scatter_fraction: float  #: scatter-to-primary ratio per unit line integral (behind a uniform slab)
    scatter_sigma_mm: float  #: scatter spread function sigma at the detector (mm)
    step_fraction: float  #: reference ray-marcher step / smallest CT spacing
    supersample: int  #: rays per pixel and axis
    seed: int  #: quantum-noise seed
    min_intensity_fraction: float  #: the reading clamp (``reconstruct.min_intensity_fraction``)

    def __post_init__(self) -> None:
        def bad(name: str, rule: str) -> ConfigError:
            return ConfigError(f"eval.detector.{name} must be {rule}, got {getattr(self, name)!r}")

        for name in ("photons_per_pixel", "blur_fwhm_mm", "scatter_fraction", "scatter_sigma_mm", "step_fraction",
                     "min_intensity_fraction"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                raise bad(name, "a finite number")
        if self.photons_per_pixel < 0:
            raise bad("photons_per_pixel", ">= 0 (0 = no quantum noise)")
        if self.blur_fwhm_mm < 0:
            raise bad("blur_fwhm_mm", ">= 0 (0 = no detector blur)")
        if self.scatter_fraction < 0:
            raise bad("scatter_fraction", ">= 0 (0 = no scatter)")
        if self.scatter_sigma_mm <= 0:
            raise bad("scatter_sigma_mm", "> 0")
        if not 0 < self.step_fraction <= 1:
            raise bad("step_fraction", "in (0, 1]")
        if isinstance(self.supersample, bool) or int(self.supersample) != self.supersample or not 1 <= self.supersample <= 8:
            raise bad("supersample", "an integer in 1…8")
        if isinstance(self.seed, bool) or int(self.seed) != self.seed or self.seed < 0:
            raise bad("seed", "an integer >= 0")
        if not 0 < self.min_intensity_fraction < 1:
            raise bad("min_intensity_fraction", "in (0, 1)")

    @classmethod
    def from_params(cls, params: Any) -> DetectorModel:
        """From a :class:`xct_core.config.Params` (``eval.detector`` + the reading clamp)."""
        d = params.eval.detector
        return cls(**d.model_dump(), min_intensity_fraction=float(params.reconstruct.min_intensity_fraction))

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @property
    def noise_free(self) -> bool:
        return self.photons_per_pixel == 0


# --------------------------------------------------------------------------- the pieces


def render_fine(hu: Any, affine: np.ndarray, geom: ProjectionGeometry, mu_water: float, step_fraction: float,
                supersample: int) -> tuple[np.ndarray, PlacedGeometry]:
    """Line integrals ``[s·P, s·P]`` (float64) of a HU volume with the REFERENCE ray marcher on
    a detector of the same extent with ``s = supersample`` sub-pixels per pixel and axis; and
    the geometry (``geom``, not supersampled) placed on this grid."""
    from xct_core.drr import render

    vol = torch.as_tensor(np.ascontiguousarray(hu, dtype=np.float32))
    placed = geom.place(affine, tuple(vol.shape))
    fine = dataclasses.replace(geom, pixels=geom.pixels * supersample, pixel_mm=geom.pixel_mm / supersample)
    with torch.no_grad():
        p = render(vol, affine, fine.place(affine, tuple(vol.shape)), mu_water=mu_water, method="reference",
                   step_fraction=step_fraction)
    return p.numpy().astype(np.float64), placed


def gaussian_blur(img: np.ndarray, sigma_px: float) -> np.ndarray:
    """Gaussian filter with reflecting borders (conserves the image integral; 0 = identity)."""
    if sigma_px <= 0:
        return np.asarray(img, dtype=np.float64)
    from scipy.ndimage import gaussian_filter

    return gaussian_filter(np.asarray(img, dtype=np.float64), sigma_px, mode="reflect", truncate=4.0)


def bin_pixels(img: np.ndarray, s: int) -> np.ndarray:
    """Mean over ``s × s`` blocks: ``[s·P, s·P]`` → ``[P, P]`` (a detector pixel's aperture)."""
    if s == 1:
        return np.asarray(img, dtype=np.float64)
    h, w = img.shape
    return np.asarray(img, dtype=np.float64).reshape(h // s, s, w // s, s).mean(axis=(1, 3))


def noise_rng(seed: int, vid: str, view: str) -> np.random.Generator:
    """The quantum-noise stream of one view of one volume (independent of worker order)."""
    h = int.from_bytes(hashlib.sha256(vid.encode()).digest()[:8], "little")
    return np.random.default_rng([int(seed), h, VIEWS.index(view)])  # type: ignore[arg-type]


def detector_postprocess(p: np.ndarray, model: DetectorModel, pixel_mm: float, rng: np.random.Generator | None,
                         supersample: int = 1) -> np.ndarray:
    """The detector's post-render part, one callable: line integrals ``[s·P, s·P]`` (``s =
    supersample``) → the detector's line integrals ``[P, P]`` (float64): blur, pixel aperture
    (``s > 1``), scatter, Poisson noise, log with the reading clamp (module docstring).
    ``pixel_mm``: the (binned) detector pitch; ``rng``: needed unless ``model.noise_free``.

    Used by :func:`detect` (the honest views, ``s = model.supersample``) and by the preprocess
    step on the TRAIN ids' training-renderer DRRs (``preprocess.train_detector``, ``s = 1``:
    those are already one ray per pixel, so the aperture's partial-volume non-linearity is
    the one part training cannot see)."""
    s = int(supersample)
    primary = np.exp(-np.asarray(p, dtype=np.float64))  # I / I0
    primary = gaussian_blur(primary, model.blur_fwhm_mm / FWHM_PER_SIGMA / (pixel_mm / s))
    primary = bin_pixels(primary, s)
    total = primary
    if model.scatter_fraction > 0:  # scatter-kernel superposition: amplitude ∝ the pixel's line integral
        source = primary * -np.log(np.clip(primary, 1e-300, None))  # p·P at the detector pixel
        total = primary + model.scatter_fraction * gaussian_blur(source, model.scatter_sigma_mm / pixel_mm)
    if not model.noise_free:
        if rng is None:
            raise ValueError("detector_postprocess: a noise stream (rng) is needed when photons_per_pixel > 0")
        total = rng.poisson(model.photons_per_pixel * total) / model.photons_per_pixel
    from xct_core.xray_io import intensity_to_line_integral

    return intensity_to_line_integral(total, model.min_intensity_fraction)


def detect(p_fine: np.ndarray, model: DetectorModel, pixel_mm: float, rng: np.random.Generator | None) -> np.ndarray:
    """Supersampled line integrals ``[s·P, s·P]`` (``s = model.supersample``) → the detector's
    line integrals ``[P, P]`` (:func:`detector_postprocess`)."""
    return detector_postprocess(p_fine, model, pixel_mm, rng, supersample=int(model.supersample))


def corrupt_views(images: Mapping[str, np.ndarray], vid: str, pixel_mm: float,
                  model: DetectorModel) -> dict[str, np.ndarray]:
    """Training augmentation (``preprocess.train_detector``): each view (float32 ``[P, P]`` line
    integrals from the training renderer) of volume ``vid`` through :func:`detector_postprocess`
    at one ray per pixel, noise from :func:`noise_rng` ``(model.seed, vid, view)``."""
    out: dict[str, np.ndarray] = {}
    for view in VIEWS:
        rng = None if model.noise_free else noise_rng(model.seed, vid, view)
        out[view] = detector_postprocess(images[view], model, pixel_mm, rng, supersample=1).astype(np.float32)
    return out


# --------------------------------------------------------------------------- one CT


def honest_views(hu: Any, affine: np.ndarray, vid: str, drr: Any, mu_water: float,
                 model: DetectorModel) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    """Frontal and lateral views (float32 ``[P, P]`` line integrals) of a full-range HU CT on
    its own grid ``affine`` (the finest available: the source phantom / native CT) as the
    detector ``model`` records them; ``drr``: ``params.drr`` (a DRRParams or its dict).
    Returns ``(frontal, lateral, geometry)``: the JSON-ready description stored beside
    them (per view the placed geometry, plus ``detector`` and ``protocol``)."""
    from xct_core.config import DRRParams

    dp = drr if isinstance(drr, DRRParams) else DRRParams(**dict(drr))
    hu_arr = np.asarray(hu)
    images: dict[str, np.ndarray] = {}
    geo: dict[str, Any] = {
        "quantity": "line_integral",
        "mu_water": float(mu_water),
        "protocol": "honest",
        "detector": model.to_json(),
        "source_grid": {"shape": list(hu_arr.shape), "affine": np.asarray(affine, dtype=np.float64).tolist()},
    }
    for view in VIEWS:
        geom = ProjectionGeometry.from_params(dp, view)  # type: ignore[arg-type]
        p_fine, placed = render_fine(hu_arr, affine, geom, mu_water, model.step_fraction, model.supersample)
        rng = None if model.noise_free else noise_rng(model.seed, vid, view)
        images[view] = detect(p_fine, model, geom.pixel_mm, rng).astype(np.float32)
        geo[view] = {**placed.to_json(), "mu_water": float(mu_water), "quantity": "line_integral"}
    return images["frontal"], images["lateral"], geo


def describe(model: DetectorModel | Mapping[str, Any]) -> str:
    """One line naming the detector (reports, metrics.json)."""
    m = model.to_json() if isinstance(model, DetectorModel) else dict(model)
    n0 = m["photons_per_pixel"]
    return (f"reference ray marcher (step {m['step_fraction']:g} x smallest spacing, {m['supersample']}x{m['supersample']} "
            f"rays per pixel) from the finest CT; blur {m['blur_fwhm_mm']:g} mm FWHM; scatter-to-primary "
            f"{m['scatter_fraction']:g} per unit line integral (sigma {m['scatter_sigma_mm']:g} mm); "
            + (f"Poisson noise at {n0:.3g} photons/pixel" if n0 else "no quantum noise")
            + f"; seed {m['seed']}")
