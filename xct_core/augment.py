"""Training-set augmentation of CT volumes (pipeline step 3, ``preprocess.augment``).

Each augmented copy is a new TRAIN item ``<id>__aug<j>`` (j = 0 … copies-1) whose stage
grids are the source CT moved by a rigid transform (+ optional mirror flips) and
intensity-jittered; its DRR pair is rendered from its own (augmented) finest stage grid by
the unchanged preprocess code path, so the X-rays and every target stay consistent by
construction. Validation and test items are never augmented (only ``train`` ids are
expanded, see :func:`plan_copies`).

Conventions (docs/CONVENTIONS.md: world RAS+ mm; volumes [X, Y, Z] = R, A, S)
--------------------------------------------------------------------------------
Geometry. With ``c`` the source volume's centre (:attr:`xct_core.io.CTVolume.center_world`,
which is also the centre of every stage grid of the item), the augmented CT is
``A(x) = V(T⁻¹(x))`` with the world → world map::

    T(x) = c + R · F · (x − c) + t

- ``F = diag(−1 if flip_lr, −1 if flip_ap, 1)``: mirror about the sagittal (left-right)
  and/or coronal (anterior-posterior) plane through ``c``. A left-right flip moves the
  patient's right side to the left: the frontal DRR is mirrored left↔right (columns), the
  lateral DRR is unchanged in parallel geometry (each ray is reversed, its integral is not).
- ``R = Rz(γ) · Ry(β) · Rx(α)``: right-handed rotations about the R (x), A (y) and S (z)
  axes through ``c`` by ``rotate_deg = (α, β, γ)`` degrees, applied x first. A positive
  angle about S turns R towards A (seen from the patient's head: counter-clockwise), so
  +90° about S makes the new frontal DRR the old lateral one mirrored left↔right, and the
  new lateral the old frontal (parallel geometry; derivation in tests/test_augment.py).
- ``t = translate_mm``: the anatomy moves by ``t`` inside the fixed grid (a shift of
  ``n`` voxels along +R puts old voxel ``i`` at ``i + n``).

The transform is folded into the ONE resampling of the source CT onto each stage grid
(:func:`xct_core.io.resample_to_grid` of the source with its affine replaced by
``T · affine``): no intermediate volume, no double interpolation. Voxels sampled outside
the source are ``preprocess.fill_hu`` (air), as for un-augmented items. The anti-aliasing
sigma of ``resample_to_grid`` is computed from that combined map (per input axis, the largest
step), so a copy rotated by θ is smoothed by a factor ≈ cos θ less than an unrotated one
(≥ 0.98 for the ≤ 10° of the real-CT profile).

Intensity. After resampling (float HU, before rounding to int16), every voxel whose value
is strictly above ``jitter_above_hu`` (default −500 HU: soft tissue, fat, bone, contrast —
not air, lung or the outside fill) becomes ``a · HU + b``; the other voxels are unchanged.
``a = hu_scale`` factor and ``b = hu_offset`` HU of the sampled copy. In attenuation terms
(mu = mu_water · (1 + HU/1000), clamped at 0) a jittered voxel has
``mu' = a · mu + mu_water · (1 − a + b/1000)``.

Sampling. Copy ``j`` of volume ``id`` draws its parameters from a NumPy generator seeded by
``sha256(f"{seed}:{id}:{j}")`` (independent of the other volumes, of the order of ids and of
the number of copies): angles ``U[−max, max]`` per axis, shifts ``U[−max, max]`` mm per axis,
flips Bernoulli(``flip_lr``/``flip_ap``), ``a ~ U[1 − hu_scale, 1 + hu_scale]``,
``b ~ U[−hu_offset, hu_offset]``. Every draw is made whatever the settings, so changing one
range does not reshuffle the others. The sampled copy (:class:`Augmentation`) is recorded in
the item's record and the manifest, and is part of its output keys (re-runs redo exactly the
copies whose settings changed).
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from xct_core.config import AugmentParams
from xct_core.io import CTVolume, resample_to_grid

#: separator between a source id and its copy number: ``<id>__aug<j>``
AUG_TAG = "__aug"

__all__ = ["AUG_TAG", "Augmentation", "aug_id", "plan_copies", "rotation_matrix", "sample_augmentation"]


def aug_id(vid: str, j: int) -> str:
    """Id of copy ``j`` of volume ``vid``: ``<vid>__aug<j>``."""
    return f"{vid}{AUG_TAG}{int(j)}"


def rotation_matrix(rotate_deg: Sequence[float]) -> np.ndarray:
    """``Rz(γ) · Ry(β) · Rx(α)`` for ``rotate_deg = (α, β, γ)`` degrees about the R, A, S axes
    (right-handed; x applied first). Exact identity for zero angles."""
    ax, ay, az = (math.radians(float(a)) for a in rotate_deg)
    cx, sx, cy, sy, cz, sz = math.cos(ax), math.sin(ax), math.cos(ay), math.sin(ay), math.cos(az), math.sin(az)
    rx = np.array([[1.0, 0.0, 0.0], [0.0, cx, -sx], [0.0, sx, cx]])
    ry = np.array([[cy, 0.0, sy], [0.0, 1.0, 0.0], [-sy, 0.0, cy]])
    rz = np.array([[cz, -sz, 0.0], [sz, cz, 0.0], [0.0, 0.0, 1.0]])
    return rz @ ry @ rx


@dataclass(frozen=True)
class Augmentation:
    """One sampled augmented copy (plain values; JSON round-trips through :meth:`to_json`).

    ``rotate_deg`` (about R, A, S; degrees), ``translate_mm`` (along R, A, S; mm), the flips,
    ``hu_scale`` (a) and ``hu_offset`` (b, HU) applied to voxels above ``jitter_above_hu``.
    Module docstring: the exact transform.
    """

    source_id: str
    copy: int
    rotate_deg: tuple[float, float, float] = (0.0, 0.0, 0.0)
    translate_mm: tuple[float, float, float] = (0.0, 0.0, 0.0)
    flip_lr: bool = False
    flip_ap: bool = False
    hu_scale: float = 1.0
    hu_offset: float = 0.0
    jitter_above_hu: float = -500.0

    @property
    def id(self) -> str:
        return aug_id(self.source_id, self.copy)

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["rotate_deg"] = [float(v) for v in self.rotate_deg]
        d["translate_mm"] = [float(v) for v in self.translate_mm]
        return d

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> Augmentation:
        return cls(
            source_id=str(d["source_id"]),
            copy=int(d["copy"]),
            rotate_deg=tuple(float(v) for v in d["rotate_deg"]),  # type: ignore[arg-type]
            translate_mm=tuple(float(v) for v in d["translate_mm"]),  # type: ignore[arg-type]
            flip_lr=bool(d["flip_lr"]),
            flip_ap=bool(d["flip_ap"]),
            hu_scale=float(d["hu_scale"]),
            hu_offset=float(d["hu_offset"]),
            jitter_above_hu=float(d["jitter_above_hu"]),
        )

    # ------------------------------------------------------------------ geometry

    def linear(self) -> np.ndarray:
        """The 3×3 part ``R · F`` of the world map."""
        flips = np.diag([-1.0 if self.flip_lr else 1.0, -1.0 if self.flip_ap else 1.0, 1.0])
        return rotation_matrix(self.rotate_deg) @ flips

    def world_matrix(self, center_world: Sequence[float]) -> np.ndarray:
        """4×4 world → world (mm, RAS+) map ``T(x) = c + R·F·(x − c) + t`` (``c`` = centre)."""
        c = np.asarray(center_world, dtype=np.float64)
        lin = self.linear()
        m = np.eye(4)
        m[:3, :3] = lin
        m[:3, 3] = c - lin @ c + np.asarray(self.translate_mm, dtype=np.float64)
        return m

    @property
    def moves(self) -> bool:
        """Whether the geometry differs from the identity (else the source is resampled as is)."""
        return bool(self.flip_lr or self.flip_ap or any(self.rotate_deg) or any(self.translate_mm))

    # ------------------------------------------------------------------ application

    def jitter(self, hu: np.ndarray) -> np.ndarray:
        """``a · HU + b`` on the voxels strictly above ``jitter_above_hu`` (float32, new array)."""
        out = np.asarray(hu, dtype=np.float32).copy()
        if self.hu_scale == 1.0 and self.hu_offset == 0.0:
            return out
        body = out > self.jitter_above_hu
        out[body] = np.float32(self.hu_scale) * out[body] + np.float32(self.hu_offset)
        return out

    def resample(
        self,
        vol: CTVolume,
        shape: tuple[int, int, int],
        spacing_mm: float,
        fill_hu: float = -1024.0,
        antialias: bool = True,
    ) -> np.ndarray:
        """The augmented CT on the grid of ``shape`` × ``spacing_mm`` centred on ``vol``'s
        centre: float32 HU (jittered, not rounded). One trilinear resampling of the source."""
        center = np.asarray(vol.center_world, dtype=np.float64)
        src = vol
        if self.moves:
            src = CTVolume(hu=vol.hu, affine=self.world_matrix(center) @ np.asarray(vol.affine, dtype=np.float64),
                           source=vol.source, meta=vol.meta)
        res = resample_to_grid(src, shape, spacing_mm, center, fill_hu, antialias=antialias)
        return self.jitter(res.hu)


# --------------------------------------------------------------------------- sampling


def _rng(seed: int, vid: str, j: int) -> np.random.Generator:
    digest = hashlib.sha256(f"{int(seed)}:{vid}:{int(j)}".encode()).digest()
    return np.random.default_rng(int.from_bytes(digest[:8], "little"))


def sample_augmentation(cfg: AugmentParams, vid: str, j: int) -> Augmentation:
    """Copy ``j`` of volume ``vid``, deterministic from ``(cfg.seed, vid, j)`` (module docstring)."""
    g = _rng(cfg.seed, vid, j)
    rot = g.uniform(-1.0, 1.0, 3) * np.asarray(cfg.rotate_deg, dtype=np.float64)
    shift = g.uniform(-1.0, 1.0, 3) * np.asarray(cfg.translate_mm, dtype=np.float64)
    u_lr, u_ap = g.random(2)
    a = 1.0 + float(g.uniform(-1.0, 1.0)) * cfg.hu_scale
    b = float(g.uniform(-1.0, 1.0)) * cfg.hu_offset
    return Augmentation(
        source_id=vid,
        copy=int(j),
        rotate_deg=tuple(float(v) for v in rot),  # type: ignore[arg-type]
        translate_mm=tuple(float(v) for v in shift),  # type: ignore[arg-type]
        flip_lr=bool(u_lr < cfg.flip_lr),
        flip_ap=bool(u_ap < cfg.flip_ap),
        hu_scale=a,
        hu_offset=b,
        jitter_above_hu=float(cfg.jitter_above_hu),
    )


def plan_copies(train_ids: Iterable[str], cfg: AugmentParams) -> dict[str, Augmentation]:
    """``cfg.copies`` sampled copies of every TRAIN id: augmented id → :class:`Augmentation`
    (sorted by id; empty when ``copies`` is 0). Only pass the train split: validation and
    test volumes are never augmented."""
    plan = {}
    for vid in train_ids:
        for j in range(int(cfg.copies)):
            a = sample_augmentation(cfg, vid, j)
            plan[a.id] = a
    return dict(sorted(plan.items()))
