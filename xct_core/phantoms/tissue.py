"""From labels to Hounsfield units: per-patient tissue HU, blur and noise; :func:`make_phantom`."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
from scipy import ndimage

from xct_core.phantoms.anatomy import Anatomy, redraw_nonidentifiable, sample_anatomy
from xct_core.phantoms.labels import HU_MAX, HU_MIN, MIN_SIZE, NOMINAL_HU, Label
from xct_core.phantoms.raster import (
    _Grid,
    _lut,
    _rasterise,
    _smooth_field,
    canonical_affine,
)
from xct_core.phantoms.shapes import _TEX_H

# ----------------------------------------------------------------------------- HU


def tissue_hu(an: Anatomy, contrast: bool) -> np.ndarray:
    """Per-label HU of this patient (a 256-entry lookup table)."""
    lut = np.zeros(256, dtype=np.float32)
    for lab, (plain, enh) in NOMINAL_HU.items():
        v = plain + (enh - plain) * an.contrast_gain if contrast else plain
        if lab not in (Label.AIR, Label.AIRWAY, Label.GAS):
            v += an.hu_jitter[int(lab)]
        lut[int(lab)] = v
    return lut


def _hu_from_labels(an: Anatomy, grid: _Grid, lab: np.ndarray, ves: np.ndarray, contrast: bool) -> np.ndarray:
    lut = tissue_hu(an, contrast)
    hu = lut[lab]
    _, _, Y, _ = grid.full()
    tex = _smooth_field(an.texture[0], _TEX_H[0], grid)
    # lung: gravity-dependent density (patient supine: posterior lung denser) + texture
    lung = lab == Label.LUNG
    grad = an.lung_gradient * np.clip(-(Y - an.cy) / 120.0, -1.0, 1.0)
    hu += np.where(lung, np.broadcast_to(grad, lab.shape) + 12.0 * tex, 0.0).astype(np.float32)
    amp = np.zeros(256, dtype=np.float32)
    amp[[Label.LIVER, Label.SPLEEN, Label.SOFT_TISSUE, Label.KIDNEY]] = 5.0
    amp[[Label.BOWEL, Label.FAT]] = 8.0
    amp[[Label.VERTEBRA, Label.STERNUM]] = 25.0
    hu += amp[lab] * tex
    del tex
    # pulmonary vessels: blend blood into lung / mediastinal fat by fractional occupancy
    blood = lut[int(Label.LUNG_VESSEL)]
    blendable = _lut([Label.LUNG, Label.FAT])[lab] & (ves > 0.0)
    v = ves[blendable]
    hu[blendable] = hu[blendable] * (1.0 - v) + blood * v
    lab[blendable & (ves >= 0.5)] = Label.LUNG_VESSEL
    return hu


def make_phantom(
    size: int,
    spacing_mm: float,
    rng_or_seed: np.random.Generator | int | Sequence[int],
    contrast: bool = False,
    noise_hu: float = 12.0,
    blur_vox: float = 0.5,
    redraw: int | Sequence[int] | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One torso phantom on an isotropic ``size``³ grid of ``spacing_mm`` voxels.

    Returns ``(hu, labels, affine)``: ``hu`` float32 [S, S, S] in HU (clipped to
    [-1024, 3071]), ``labels`` uint8 [S, S, S] of :class:`Label`, ``affine`` the RAS+
    voxel→world matrix (:func:`canonical_affine`, volume centred at the origin).
    ``contrast`` selects IV contrast (enhanced blood, heart chambers, organs).
    ``noise_hu``: standard deviation of white noise; ``blur_vox``: Gaussian PSF σ in voxels
    (anti-aliasing of the analytic edges), applied before the noise.
    ``redraw``: ``None`` (default: the phantom exactly as always) or a seed: the same patient
    (the same draws from ``rng_or_seed``) with the parts that barely change the X-rays —
    fat/bowel field, fine texture, vessel tree below the hila, image noise
    (:data:`xct_core.phantoms.anatomy.REDRAWN_PARTS`) — re-drawn from that seed
    (:func:`xct_core.phantoms.anatomy.redraw_nonidentifiable`); used by :mod:`xct_core.ceiling`.
    """
    if int(size) != size or size < MIN_SIZE:
        raise ValueError(f"size must be an integer >= {MIN_SIZE}, got {size!r}")
    if not (math.isfinite(spacing_mm) and spacing_mm > 0):
        raise ValueError(f"spacing_mm must be positive, got {spacing_mm!r}")
    if noise_hu < 0 or blur_vox < 0:
        raise ValueError("noise_hu and blur_vox must be >= 0")
    rng = rng_or_seed if isinstance(rng_or_seed, np.random.Generator) else np.random.default_rng(rng_or_seed)
    an = sample_anatomy(rng)
    noise_rng = np.random.default_rng(rng.integers(0, 2**63))
    if redraw is not None:  # after every default draw: the rest of the patient is unchanged
        again = np.random.default_rng(redraw)
        an = redraw_nonidentifiable(an, again)
        noise_rng = np.random.default_rng(again.integers(0, 2**63))
    grid = _Grid(int(size), float(spacing_mm))
    lab, ves = _rasterise(an, grid)
    hu = _hu_from_labels(an, grid, lab, ves, contrast)
    del ves
    if blur_vox > 0:
        hu = ndimage.gaussian_filter(hu, sigma=blur_vox, mode="nearest", truncate=3.0)
    if noise_hu > 0:
        hu += noise_rng.standard_normal(hu.shape, dtype=np.float32) * np.float32(noise_hu)
    np.clip(hu, HU_MIN, HU_MAX, out=hu)
    return hu, lab, canonical_affine(int(size), float(spacing_mm))


