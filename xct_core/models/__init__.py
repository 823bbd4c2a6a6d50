"""Cascade stage networks: X-ray encoder, depth lifting, hybrid 3D backbone, stage builder.

Pure torch. See :mod:`xct_core.models.stage` for the tensor conventions.
"""

from xct_core.models.backbone import Backbone3D, sincos_pos_embed_3d
from xct_core.models.encoder import VIEWS, XrayEncoder
from xct_core.models.lifting import DepthLifting, lifting_grid
from xct_core.models.stage import (
    AnchoredStage,
    StageNet,
    ViewContext,
    build_sampling_stage,
    build_stage,
    stage_affine,
    unwrap,
    xray_binning,
)

__all__ = [
    "VIEWS",
    "AnchoredStage",
    "Backbone3D",
    "DepthLifting",
    "StageNet",
    "ViewContext",
    "XrayEncoder",
    "build_sampling_stage",
    "build_stage",
    "lifting_grid",
    "sincos_pos_embed_3d",
    "stage_affine",
    "unwrap",
    "xray_binning",
]
