"""A TINY end-to-end profile shared by tests/test_dvc_pipeline.py, tests/test_kfp_pipeline.py
and tests/test_stage_count.py.

6 phantoms at 32³ (12.8 mm voxels, the stages' 409.6 mm FOV), an N-stage cascade (default
three: 8³/16³/32³; four adds 64³, compiled but not run by the suite) with ~10k-parameter networks, 16-pixel DRRs, 2 optimiser
steps per stage, 2 DDIM steps, Ray Train with one worker. TEST-ONLY gate thresholds:
``passing_gates`` accept any finite, non-collapsed output (the plumbing is under test, not
the model quality); ``failing_gates`` no model can pass (PSNR > 1000 dB).
"""

from __future__ import annotations

import copy
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[1]

_STAGE = dict(fov_mm=409.6, token_grid=4, dim=16, depth=1, heads=2, lift_channels=4, enc_channels=[8, 16],
              lr=2e-3, cond_aug_max=0.25, cond_aug_sample=0.05)

#: the tiny stages: grids 8³ → 16³ → 32³ → 64³ (the first ``n`` of them), conv channels per level
_GRIDS = [(8, [8], 2), (16, [4, 8], 2), (32, [4, 4, 8], 1), (64, [4, 4, 4, 8], 1)]


def passing_gates(n: int = 3) -> dict[str, Any]:
    """TEST-ONLY thresholds for ``n`` stages: pass anything finite (plumbing under test, not quality)."""
    return {f"stage{k}": {"psnr_window_db": -1000.0, "ssim_window": -1.0, "max_nan": 0, "min_std_ratio": 0.0}
            for k in range(1, n + 1)}


def failing_gates(n: int = 3) -> dict[str, Any]:
    """TEST-ONLY thresholds for ``n`` stages: nothing passes."""
    return {f"stage{k}": {"psnr_window_db": 1000.0, "ssim_window": 0.99, "max_nan": 0, "min_std_ratio": 0.0}
            for k in range(1, n + 1)}


PASSING_GATES = passing_gates()
FAILING_GATES = failing_gates()


def tiny_profile(gates: dict[str, Any] | None = None, local_training: bool = True, n_stages: int = 3) -> dict[str, Any]:
    """The repo's params.yaml shrunk to the tiny profile (a plain dict, YAML-ready), ``n_stages``
    stages (1 … 4) with passing test gates unless ``gates`` says otherwise.

    ``local_training``: train in-process (``xct train --local``: no Ray start-up per stage).
    """
    data = yaml.safe_load((REPO / "params.yaml").read_text())
    data.pop("overlays", None)  # self-contained: the tuned demo values (hpo/) do not apply here
    data["data"]["synth"].update(n=6, size=32, spacing_mm=12.8, seed=0)
    assert 1 <= n_stages <= len(_GRIDS), n_stages
    data["stages"] = {f"stage{k}": {**_STAGE, "size": size, "conv_channels": conv, "physics_weight": 0.0,
                                    "batch_size": batch}
                      for k, (size, conv, batch) in enumerate(_GRIDS[:n_stages], start=1)}
    data["drr"].update(pixels=16, pixel_mm=40.0)
    data["ingest"].update(min_eval_patients=1)
    data["validation"].update(max_spacing_mm=20.0)  # 12.8 mm voxels (coarse on purpose)
    data["preprocess"].update(workers=1)
    data["diffusion"].update(sample_steps=2)
    data["eval"].update(ssim_win=3, ssim_sigma=0.5, sample_steps=2, max_volumes=1)
    data["train"].update(
        steps={name: 2 for name in data["stages"]}, warmup_steps=0, log_every=1, ckpt_every=2,
        val_every=0, val_sample_steps=2, val_max_volumes=1, val_reprojection=False, ema_decay=0.5,
    )
    data["train"]["ray"].update(num_workers=1, max_failures=0, cpus_per_worker=1.0)
    data["gates"] = copy.deepcopy(gates if gates is not None else passing_gates(n_stages))
    data["pipeline"] = {"train": {"local": local_training}}
    return data


def dvc_chain(names: list[str]) -> list[str]:
    """dvc.yaml's steps in the order `dvc repro` runs them, for the cascade stages ``names``."""
    return ["synth", "ingest", "validate", "preprocess",
            *[f"{step}@{n}" for n in names for step in ("train", "evaluate", "gate")], "register"]


def write_params(path: Path, data: dict[str, Any]) -> Path:
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def short_tmpdir(prefix: str) -> Path:
    """A short temp path (Ray's socket paths must stay under ~107 characters)."""
    return Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))


def step_env(tmp: Path, code: Path = REPO) -> dict[str, str]:
    """Environment for pipeline subprocesses: venv first on PATH, scratch files in ``tmp``,
    ``code`` first on PYTHONPATH (the editable install's ``xct`` script would otherwise
    import the main checkout, not a test copy)."""
    env = dict(os.environ)
    env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", "")
    env.update(
        MLFLOW_TRACKING_URI=f"sqlite:///{tmp / 'mlflow.db'}",
        MLFLOW_DISABLE_TELEMETRY="true",
        GX_ANALYTICS_ENABLED="false",
        DO_NOT_TRACK="1",
        DVC_NO_ANALYTICS="1",
        DVC_SITE_CACHE_DIR=str(tmp / "dvc-site-cache"),
        RAY_TMPDIR=str(tmp / "ray"),
        PYTHONPATH=str(code),
        TMPDIR=str(tmp / "t"),
    )
    env.pop("RAY_ADDRESS", None)
    env.pop("XCT_PARAMS", None)
    for d in ("ray", "t"):
        (tmp / d).mkdir(exist_ok=True)
    return env


#: generated folders whose small metrics/plots files git tracks (dvc.yaml ``cache: false``)
GENERATED = ("outputs/", "reports/")


def copy_repo(dst: Path) -> Path:
    """Copy the checkout's files (tracked + untracked, not ignored) to ``dst``; make it a git +
    DVC repo of its own. Generated folders (data, outputs, reports) are not copied."""
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=REPO, check=True,
                           capture_output=True).stdout.decode().split("\0")
    for rel in filter(None, files):
        if rel == "dvc.lock" or rel.startswith(GENERATED):  # a committed run's results: not the code
            continue
        src = REPO / rel
        if not src.is_file():
            continue
        target = dst / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(src, target)
    env = step_env(dst.parent, dst)
    subprocess.run(["git", "init", "-q"], cwd=dst, check=True, env=env)
    if not (dst / ".dvc" / "config").is_file():
        subprocess.run([str(Path(sys.executable).parent / "dvc"), "init", "-q", "-f"], cwd=dst, check=True, env=env)
    return dst


def _registered(tracking_db: Path, version: str) -> dict[str, str]:
    """The tags of ``xct-cascade`` version ``version`` in the sqlite registry."""
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{tracking_db}")
    return dict(client.get_model_version("xct-cascade", version).tags)


def check_registered(summary: dict, n: int, tracking_db: Path) -> None:
    """``summary`` (reports/summary.json) registered a cascade of ``n`` stages, every gate passed."""
    assert summary["status"] in ("promoted", "registered"), summary
    assert [s["stage"] for s in summary["stages"]] == list(range(1, n + 1))
    assert all(s["passed"] for s in summary["stages"])
    tags = _registered(tracking_db, summary["model_version"])
    assert tags["xct.stages"] == str(n)
    assert tags["xct.gates"] == ",".join(f"{s}=pass" for s in [f"stage{k}" for k in range(1, n + 1)])
