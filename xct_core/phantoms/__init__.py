"""Procedural torso phantoms: the embedded default CT data set.

A phantom is a chest/upper-abdomen CT volume in Hounsfield units, built from analytic
shapes defined in **world millimetres** (so a 64³ grid at 6.4 mm and a 128³ grid at
3.2 mm show the same patient) and rasterised with vectorised NumPy.

Conventions (docs/CONVENTIONS.md)
---------------------------------
- Array axes (i, j, k) are RAS+: i increases towards the patient's **Right**, j
  **Anterior**, k **Superior**. World x = patient's right, y = anterior, z = superior (mm).
- The grid is isotropic (``spacing_mm``) and centred at the world origin:
  voxel ``(S - 1) / 2`` sits at (0, 0, 0); see :func:`canonical_affine`.
- Anatomy is left-right asymmetric on purpose (heart, aorta, stomach, spleen on the
  patient's LEFT = smaller x; liver on the RIGHT), so orientation errors are visible.
- Values are HU (float32, clipped to [-1024, 3071]); ``labels`` is a uint8 map of
  :class:`Label` (one tissue per voxel, at the voxel centre, before blur/noise).

Determinism: every random choice comes from the ``numpy.random.Generator`` passed in.
Anatomy is drawn first (independent of the grid); image noise comes from a child stream,
so the anatomy does not depend on ``size`` or ``spacing_mm``. For a data set, phantom
``index`` of seed ``seed`` uses :func:`phantom_rng` — it depends only on (seed, index).
"""

from __future__ import annotations

from xct_core.phantoms.anatomy import Anatomy, sample_anatomy
from xct_core.phantoms.dataset import (
    MANIFEST_NAME,
    PREVIEW_NAME,
    SynthPhantom,
    phantom_name,
    phantom_rng,
    stale_phantoms,
    synth_phantom,
    write_phantoms,
)
from xct_core.phantoms.labels import (
    HU_MAX,
    HU_MIN,
    MIN_SIZE,
    NOMINAL_HU,
    PHANTOM_VERSION,
    Label,
)
from xct_core.phantoms.raster import canonical_affine
from xct_core.phantoms.tissue import make_phantom, tissue_hu

__all__ = [
    "HU_MAX", "HU_MIN", "MANIFEST_NAME", "MIN_SIZE", "NOMINAL_HU", "PHANTOM_VERSION", "PREVIEW_NAME",
    "Anatomy", "Label", "SynthPhantom", "canonical_affine", "make_phantom", "phantom_name", "phantom_rng",
    "sample_anatomy", "stale_phantoms", "synth_phantom", "tissue_hu", "write_phantoms",
]  # fmt: skip
