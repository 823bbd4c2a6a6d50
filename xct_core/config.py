"""Typed configuration: params.yaml → validated, frozen pydantic models.

params.yaml is the single source of truth for every parameter; code reads values from
the objects here and never re-declares defaults elsewhere. Unknown keys are rejected so a
typo in params.yaml is an error, not a silently ignored setting.

Profiles: ``load_params(path, overlays=[...])`` deep-merges YAML fragments (a production
profile, an HPO result such as ``hpo/best_stage1.yaml``) over the base file.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from xct_core.errors import ConfigError
from xct_core.hu import HUWindow, get_window

#: environment variable naming the params file (default: ./params.yaml)
PARAMS_ENV = "XCT_PARAMS"


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class HUParams(_Section):
    #: training window: a name from xct_core.hu.WINDOWS or an explicit [lo, hi] in HU
    window: str | tuple[float, float] = "soft_tissue"
    #: linear attenuation of water in 1/mm (≈0.02 at 60-70 keV)
    mu_water: float = Field(0.02, gt=0)

    @field_validator("window")
    @classmethod
    def _known_window(cls, v: Any) -> Any:
        get_window(v)
        return v

    def get_window(self) -> HUWindow:
        return get_window(self.window)


class DRRParams(_Section):
    #: parallel (exact, cheap) or cone (point source, real X-ray geometry)
    geometry: Literal["parallel", "cone"] = "cone"
    #: detector size in pixels (square)
    pixels: int = Field(128, ge=8, le=4096)
    #: detector pixel pitch in mm (at the detector plane)
    pixel_mm: float = Field(3.2, gt=0)
    #: source-to-detector distance, mm (cone beam)
    sdd: float = Field(1500.0, gt=0)
    #: source-to-isocentre distance, mm (cone beam); isocentre = volume centre
    sod: float = Field(1000.0, gt=0)
    #: ray-marching step as a fraction of the smallest voxel spacing
    step_fraction: float = Field(0.5, gt=0, le=2.0)

    @field_validator("sod")
    @classmethod
    def _sod_lt_sdd(cls, v: float, info: Any) -> float:
        sdd = info.data.get("sdd")
        if sdd is not None and v >= sdd:
            raise ValueError(f"sod ({v}) must be smaller than sdd ({sdd})")
        return v


class SynthParams(_Section):
    """Procedural phantoms: the embedded default data set."""

    n: int = Field(24, ge=1)
    size: int = Field(128, ge=16)
    seed: int = 0
    #: voxel size of the synthesised volumes, mm (isotropic)
    spacing_mm: float = Field(3.2, gt=0)
    #: fraction of phantoms with IV contrast
    contrast_fraction: float = Field(0.5, ge=0, le=1)


class DataParams(_Section):
    raw_dir: str = "data/raw"
    synth: SynthParams = SynthParams()


class Params(_Section):
    """The whole parameter tree (one section per concern)."""

    seed: int = 0
    data: DataParams = DataParams()
    hu: HUParams = HUParams()
    drr: DRRParams = DRRParams()

    def digest(self) -> str:
        """Stable hash of the effective parameters (lineage tag)."""
        blob = json.dumps(self.model_dump(mode="json"), sort_keys=True).encode()
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
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise ConfigError(f"{path}: params file not found") from None
    except OSError as e:
        raise ConfigError(f"{path}: cannot read params file ({e.strerror})") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML ({str(e).splitlines()[0]})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: top level must be a mapping, got {type(data).__name__}")
    return data


def default_params_path() -> Path:
    return Path(os.environ.get(PARAMS_ENV, "params.yaml"))


def params_from_dict(data: dict, source: str = "<dict>") -> Params:
    try:
        return Params.model_validate(data)
    except ValidationError as e:
        first = e.errors()[0]
        loc = ".".join(str(p) for p in first["loc"])
        more = f" (and {e.error_count() - 1} more)" if e.error_count() > 1 else ""
        raise ConfigError(f"{source}: invalid parameter {loc}: {first['msg']}{more}") from None


def load_params(path: str | Path | None = None, overlays: list[str | Path] | None = None) -> Params:
    """Load params.yaml (or ``$XCT_PARAMS``), deep-merging any overlay files in order."""
    p = Path(path) if path is not None else default_params_path()
    data = _read_yaml(p)
    for ov in overlays or []:
        data = _deep_merge(data, _read_yaml(Path(ov)))
    return params_from_dict(data, str(p))
