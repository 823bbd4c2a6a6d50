"""Resolve a model reference to local stage-model files + the model's params (MLflow here only).

Accepted references (``xct reconstruct --model`` / ``xct evaluate --model``):

* ``models:/<name>@<alias>`` (e.g. ``models:/xct-cascade@champion``), ``models:/<name>/<version>``
  — a registered cascade (:mod:`components.register`): its artifacts ``stage{k}.pt`` +
  ``params.json`` are downloaded from the registry (``$MLFLOW_TRACKING_URI`` or the embedded
  sqlite default, :func:`components.tracking.tracking_uri`);
* ``runs:/<run_id>/<path>`` — a run artifact: a registered model folder (``…/model``), a
  training output folder, or one exported stage file (``…/model/best.pt``, what
  ``reports/summary.json`` names for a rejected run);
* a local path: a folder with ``stage{k}.pt`` + ``params.json`` (the registered layout, also
  as ``<dir>/artifacts/``), a training output folder with ``models/stage{k}/<file>.pt``
  (``eval.model_file`` of the model's params, best by default), or one exported stage
  file (stage 1 alone, or ``…/models/stage{k}/<file>.pt`` inside a training folder: stages
  1 … k of that folder).

The params are the MODEL's (``params.json``, else the params embedded in the stage files),
never the local params.yaml: geometry, window and sampler must be the ones it was trained
with. Anything that does not resolve raises :class:`~xct_core.errors.InputError`.
"""

from __future__ import annotations

import json
import logging
import os
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path

from xct_core.config import Params, params_from_dict
from xct_core.errors import ConfigError, InputError
from xct_core.jsondoc import read_json_doc

__all__ = ["ResolvedModel", "resolve_model"]

_STAGE_FILE = re.compile(r"^stage(\d+)\.pt$")
#: MLflow's switch for its artifact download progress bars (read at each download)
_PROGRESS_ENV = "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"


@dataclass(frozen=True)
class ResolvedModel:
    """Local files of a cascade: ``stage_files`` (stage 1 first), the model's ``params``,
    the direct-regression twin of the last stage when present, and where it came from."""

    uri: str
    stage_files: tuple[Path, ...]
    params: Params
    direct: Path | None
    layout: str  #: registered | training | stage-file
    local_path: Path
    #: the last stage's ``calibration.json`` a registered model carries (xct_core/calibration.py)
    calibration: Path | None = None

    @property
    def n_stages(self) -> int:
        return len(self.stage_files)


def _stage_params(path: Path) -> tuple[int, Params]:
    from xct_core.checkpoint import read_stage_model

    blob = read_stage_model(path)
    try:
        params = params_from_dict(json.loads(blob["params"]), f"{path} (embedded params)")
    except (ValueError, KeyError) as e:
        raise InputError(path, f"stage model carries no valid params ({e})") from None
    return int(blob["stage"]), params


def _registered(d: Path, uri: str) -> ResolvedModel | None:
    for c in (d, d / "artifacts"):
        if not (c / "stage1.pt").is_file():
            continue
        pj = c / "params.json"
        if not pj.is_file():
            raise InputError(c, "stage1.pt without params.json: not a registered xct cascade")
        try:
            params = params_from_dict(read_json_doc(pj, "registered params"), str(pj))
        except ConfigError as e:
            raise InputError(pj, str(e)) from None
        files = []
        k = 1
        while (c / f"stage{k}.pt").is_file():
            files.append(c / f"stage{k}.pt")
            k += 1
        direct = c / "direct.pt"
        cal = c / "calibration.json"
        return ResolvedModel(uri, tuple(files), params, direct if direct.is_file() else None, "registered", c,
                             cal if cal.is_file() else None)
    return None


def _training(d: Path, uri: str, which: str | None, upto: int | None = None) -> ResolvedModel | None:
    models = d / "models"
    if not (models / "stage1").is_dir():
        return None
    names = [which] if which else ["best", "final"]
    first = next((models / "stage1" / f"{n}.pt" for n in names if (models / "stage1" / f"{n}.pt").is_file()), None)
    if first is None:
        raise InputError(models / "stage1", f"no exported stage model ({' or '.join(n + '.pt' for n in names)})")
    _, params = _stage_params(first)
    name = first.stem
    files = []
    for k in range(1, len(params.stages) + 1):
        p = models / f"stage{k}" / f"{name}.pt"
        if not p.is_file() or (upto is not None and k > upto):
            break
        files.append(p)
    direct = models / f"stage{len(files)}" / "direct.pt"
    return ResolvedModel(uri, tuple(files), params, direct if direct.is_file() else None, "training", d)


def _local(path: Path, uri: str) -> ResolvedModel:
    if not path.exists():
        raise InputError(path, "model not found (expected a models:/ or runs:/ URI, a registered model folder, "
                               "a training output folder or a stage .pt file)")
    if path.is_file():
        if path.suffix != ".pt":
            raise InputError(path, "not a model: expected a stage .pt file or a model folder")
        k, params = _stage_params(path)
        if k == 1:
            direct = None
            return ResolvedModel(uri, (path,), params, direct, "stage-file", path)
        if path.parent.name == f"stage{k}" and path.parent.parent.name == "models":
            r = _training(path.parents[2], uri, path.stem, upto=k)
            if r is not None and len(r.stage_files) == k:
                return r
        raise InputError(path, f"a stage-{k} model alone cannot reconstruct: stages 1…{k - 1} are needed "
                               "(give the training folder or the registered model)")
    found = _registered(path, uri) or _training(path, uri, None)
    if found is None:
        raise InputError(path, "no stage models found (expected stage{k}.pt + params.json, or models/stage{k}/best.pt)")
    return found


def _download(uri: str, dst: Path, tracking_uri: str | None) -> Path:
    import mlflow
    from mlflow.exceptions import MlflowException

    from components.tracking import tracking_uri as default_uri

    t = tracking_uri or default_uri()
    from components.tracking import store_exists

    if not store_exists(t):  # opening it would create an empty store: a read must not
        raise InputError(None, f"model URI {uri!r} does not resolve at {t} (no tracking store there yet: "
                               "nothing is registered)")
    # MLflow/alembic log INFO lines on stderr when they create a store: keep errors one line
    quiet = [logging.getLogger(n) for n in ("mlflow", "alembic")]
    levels = [q.level for q in quiet]
    for q in quiet:
        q.setLevel(max(q.getEffectiveLevel(), logging.WARNING))
    # ... nor tqdm "Downloading artifacts" bars on stderr (unless the user asked for them)
    bar_env = os.environ.get(_PROGRESS_ENV)
    os.environ[_PROGRESS_ENV] = bar_env or "false"
    try:
        # as components.register: the registry follows the tracking URI (never pinned here)
        mlflow.set_tracking_uri(t)
        return Path(mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=str(dst), tracking_uri=t))
    except MlflowException as e:
        msg = str(e.message if hasattr(e, "message") else e).splitlines()[0][:300]
        raise InputError(None, f"model URI {uri!r} does not resolve at {t} ({msg})") from None
    except (OSError, ValueError) as e:
        raise InputError(None, f"model URI {uri!r} does not resolve at {t} ({type(e).__name__}: {e})") from None
    finally:
        for q, lvl in zip(quiet, levels, strict=True):
            q.setLevel(lvl)
        if bar_env is None:
            os.environ.pop(_PROGRESS_ENV, None)


def resolve_model(
    uri: str | Path,
    *,
    tracking_uri: str | None = None,
    dst_dir: str | Path | None = None,
) -> ResolvedModel:
    """Local stage files + params of ``uri`` (forms: module docstring).

    MLflow URIs are downloaded into ``dst_dir`` (default: a new temporary folder the caller
    may delete after loading the stages).
    """
    s = str(uri)
    if s.startswith(("models:/", "runs:/")):
        if s.startswith("models:/") and not re.match(r"^models:/[^/@]+(@[\w\-]+|/\d+|/latest)$", s):
            raise InputError(None, f"model URI {s!r}: expected models:/<name>@<alias> or models:/<name>/<version>")
        dst = Path(dst_dir) if dst_dir is not None else Path(tempfile.mkdtemp(prefix="xct-model-"))
        dst.mkdir(parents=True, exist_ok=True)
        local = _download(s, dst, tracking_uri)
        r = _local(local, s)
        return ResolvedModel(s, r.stage_files, r.params, r.direct, r.layout, r.local_path, r.calibration)
    if "://" in s or s.startswith(("s3:", "gs:", "http:", "https:")):
        raise InputError(None, f"model URI {s!r}: supported are models:/…, runs:/… and local paths")
    return _local(Path(s), s)
