"""params.yaml → typed config: the repo's file is valid, typos and bad values are clear errors."""

from __future__ import annotations

from pathlib import Path

import pytest

from xct_core.config import load_params
from xct_core.errors import ConfigError


def test_repo_params_yaml_is_valid(repo_root: Path) -> None:
    p = load_params(repo_root / "params.yaml")
    assert p.hu.get_window().name == "soft_tissue"
    assert p.drr.sod < p.drr.sdd


def test_unknown_key_is_rejected(tmp_path: Path) -> None:
    f = tmp_path / "p.yaml"
    f.write_text("hu:\n  windw: lung\n")
    with pytest.raises(ConfigError, match=r"p.yaml: invalid parameter hu.windw"):
        load_params(f)


def test_bad_values_are_rejected(tmp_path: Path) -> None:
    f = tmp_path / "p.yaml"
    f.write_text("drr:\n  sdd: 900\n  sod: 1000\n")
    with pytest.raises(ConfigError, match="drr.sod"):
        load_params(f)
    f.write_text("hu:\n  window: nonsense\n")
    with pytest.raises(ConfigError, match="unknown HU window"):
        load_params(f)
    f.write_text("- just\n- a list\n")
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        load_params(f)
    f.write_text("hu: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_params(f)


def test_overlay_deep_merges_and_changes_digest(tmp_path: Path, repo_root: Path) -> None:
    base = load_params(repo_root / "params.yaml")
    ov = tmp_path / "ov.yaml"
    ov.write_text("hu:\n  window: wide\n")
    merged = load_params(repo_root / "params.yaml", [ov])
    assert merged.hu.get_window().name == "wide"
    assert merged.hu.mu_water == base.hu.mu_water  # sibling key kept
    assert merged.digest() != base.digest()
    assert load_params(repo_root / "params.yaml").digest() == base.digest()  # stable
