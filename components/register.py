"""Pipeline step — register: when every gate passed, log the cascade to the MLflow registry.

What is registered (a version of ``registry.model_name``, default ``xct-cascade``)
-----------------------------------------------------------------------------------
An MLflow **pyfunc from code** (:mod:`components.xct_pyfunc`, logged as a path to the .py
file; nothing is pickled): artifacts = the exported stage models
``outputs/train/models/stage{k}/{eval.model_file}.pt`` (state dicts + params JSON, loadable
with ``torch.load(weights_only=True)``) + the effective params as JSON + the last stage's
``calibration.json`` when its evaluate step fitted one (xct_core/calibration.py; not part of the
content hash: it is fitted from the models); ``code_paths=[xct_core]``;
``pip_requirements`` given explicitly (the installed versions of torch, numpy, scipy, …).
The registration run (experiment ``registry.experiment``) also holds every stage's
evaluation metrics (``stage{k}/<metric>``), the gate reports (artifacts ``gates/``), the
evaluation summaries (``eval/stage{k}/metrics.json``) and the processed data as dataset
inputs (contexts ``train``, ``val``, ``test``; digest = ``xct.data_hash``:
:func:`components.tracking.dataset_inputs`).

Signature (:func:`model_signature`): inputs ``frontal`` and ``lateral``, float32 tensors
``[-1, P, P]`` (``P = drr.pixels``; one pair per request: batch 1), params ``samples``,
``steps`` (0 = the sampler's default rule) and ``seed`` (long, defaults from params), output
float32 ``[S, S, S]`` HU. MLflow enforces it on ``pyfunc.predict`` and ``mlflow models
serve``: a missing view, a wrong shape, a wrong dtype or a non-integer param is refused
before the model runs. The input example (:func:`input_example`: zero images, one sample of
one DDIM step) is what MLflow runs once to validate the logged model.

Rejected candidates (a gate failed): :func:`log_rejected` records them in the same
experiment — a run ``rejected-stage{k}`` tagged ``xct.verdict=rejected``,
``xct.rejected_at_stage`` and ``xct.reason`` (the failing gate's summary), with the
evaluations, the gate reports, the model card and the dataset inputs — an audit trail of what
was rejected and why; nothing is registered. Either way the pipeline's parent run (the
training folder's ``mlflow_pipeline.json``) gets the gate results as metrics
(``gate{k}.passed``, ``gate{k}.<check>``) and ``xct.verdict``
(:func:`components.tracking.log_pipeline_verdict`).

Tags (run and model version): ``xct.git_commit`` (+ ``xct.git_dirty``), ``xct.data_hash``
and ``xct.data_hash_source`` — the DVC hash of ``data/processed`` from ``dvc.lock`` when
DVC produced it, else the sha256 of ``data/processed/manifest.json`` (which lists every
processed file's sha256; :func:`components.tracking.dvc_data_hash`) — ``xct.params_digest``,
``xct.content_hash``, ``xct.test_ids_hash``, ``xct.psnr_window_db`` (the LAST stage's test
PSNR in the window), ``xct.stages``, ``xct.gates`` (``stage1=pass,…``), ``xct.run_id``,
``xct.pipeline_run_id`` (the parent pipeline run, when known), ``xct.origin`` and, from a
KFP task, ``kfp.run_id`` / ``kfp.run_name`` / ``kfp.task_name``
(:func:`components.tracking.origin_tags`).

Model card
----------
Every run of the step writes the card of its model beside the summary
(``reports/model_card.json`` + ``model_card.md``, :mod:`xct_core.model_card`), registered or
rejected; a new version also gets it on its registration run (artifacts ``model_card/``) and
the version tag ``xct.model_card`` = ``runs:/<run id>/model_card``, which
:func:`show_card` (``xct models show VERSION``) reads. The card's intervals come from each
stage's ``per_patient.csv``.

Aliases and idempotency
-----------------------
* ``xct.content_hash`` = sha256 of the stage model files + the params sections the model's
  predictions depend on (seed, hu, diffusion, eval). Registering content that is already a
  version returns that version (no new version, aliases untouched) — unless its registration
  was interrupted (the server died after the version was created): the version then lacks the
  tag ``xct.alias_reason`` (written last, after the alias) and/or its card, and the re-run
  completes what is missing (alias decision, card; its run ends FINISHED).
* A new version gets ``champion`` when there is no champion yet, or when the champion's
  ``xct.test_ids_hash`` equals this one's (the same test split) and it beats the champion:
  with ``registry.champion_rule: paired`` (default) the lower bound of the paired-bootstrap
  95 % interval of the per-patient change in the last stage's window PSNR (this version's
  ``per_patient.csv`` against the one on the champion's registration run,
  :func:`xct_core.intervals.paired_bootstrap`) exceeds ``registry.champion_min_change_db`` —
  the same paired comparison the gate's champion check makes, so a difference inside the noise
  of a re-used test split never moves @champion; without rows on either side (or < 5
  patients) the means decide, and the reason says so; ``mean``: this version's
  ``xct.psnr_window_db`` exceeds the champion's by more than the margin. Otherwise (worse,
  not clearly better, or not comparable — a different test split) it gets ``candidate``; the
  champion is left unchanged. The reason (tag ``xct.alias_reason``) states the interval.
  The decision uses the champion read immediately before the alias is written (read, decide,
  read again: decided again when it moved; :func:`set_decided_alias`).
* "Cannot tell" is never "none": only a definite "not found" from the registry means no
  version / no champion; a registry that is down, black-holed or failing stops the step with
  one line (:class:`components.tracking.RegistryError`, exit 1), within
  ``registry.request_timeout_s`` × (1 + ``registry.request_max_retries``) per request.
* The registration run stays RUNNING until version, alias and card exist, then FINISHED; a
  failure marks it FAILED (KILLED on Ctrl-C) — or, when MLflow cannot be told, the next
  register run of the same content does.

Tracking: ``$MLFLOW_TRACKING_URI`` or ``sqlite:///<repo>/mlflow.db``
(:func:`components.tracking.tracking_uri`). Entry points: :func:`run_register` (all gates →
register → ``reports/summary.json``, see :mod:`components.pipeline_verdict`),
``xct step register --gates reports/gates --eval reports/eval --train-dir
outputs/train --out reports/summary.json [--processed data/processed] [--params params.yaml]``,
and its KFP component in :mod:`components.kfp_components` (which calls :func:`run_register`).
"""

import hashlib
import json
import math
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

from xct_core.calibration import CALIBRATION_JSON
from xct_core.config import Params
from xct_core.errors import ConfigError, InputError, XctError
from xct_core.jsondoc import read_json_doc
from xct_core.redact import redact, redact_doc
from xct_core.stats import file_sha256
from xct_core.layout import (
    METRICS_JSON,
    MODEL_CARD_JSON,
    MODEL_CARD_MD,
    PER_PATIENT_CSV,
    ReportLayout,
    RunLayout,
    stage_model_files,
)

if TYPE_CHECKING:
    from xct_core.model_card import StageInputs

REPO = Path(__file__).resolve().parents[1]
PYFUNC_FILE = Path(__file__).resolve().with_name("xct_pyfunc.py")
#: distributions pinned in the registered model's requirements (installed versions)
_REQUIREMENTS = ("torch", "numpy", "scipy", "nibabel", "pydantic", "pyyaml", "mlflow")
#: params sections a registered model's predictions depend on (content hash)
_CONTENT_SECTIONS = ("seed", "hu", "diffusion", "eval", "drr", "model", "stages")
#: the registration run's artifact folder of the model card; the version tag that points at it
CARD_ARTIFACT_DIR = "model_card"
#: the dataset contexts of a registration / rejected-candidate run (the stage runs log train, val)
SPLIT_CONTEXTS = ("train", "val", "test")
CARD_TAG = "xct.model_card"


@dataclass(frozen=True)
class Registration:
    """What :func:`register_cascade` did."""

    name: str
    version: str
    alias: str | None  #: alias this call set (None when the content was already registered)
    aliases: tuple[str, ...]  #: the version's aliases after the call
    created: bool
    run_id: str
    reason: str
    card: dict[str, Any] | None = None  #: the model card (built for a new or an existing version)

    @property
    def model_uri(self) -> str:
        return f"models:/{self.name}/{self.version}"


def pip_requirements() -> list[str]:
    """Explicit requirements of the registered pyfunc (installed versions; local build
    tags such as ``+cpu`` dropped)."""
    from importlib.metadata import PackageNotFoundError, version

    reqs = []
    for dist in _REQUIREMENTS:
        try:
            reqs.append(f"{dist}=={version(dist).split('+')[0]}")
        except PackageNotFoundError:
            reqs.append(dist)
    return reqs


def stage_files(train_dir: str | Path, params: Params, n: int | None = None) -> list[Path]:
    """The exported stage models ``1 … n`` (default: every stage in params) that make up the
    cascade; :class:`InputError` naming the first missing one."""
    paths = stage_model_files(train_dir, n or params.n_stages, params.eval.model_file)
    for p in paths:
        if not p.is_file():
            raise InputError(p, "stage model not found (train the stage first)")
    return paths


def content_hash(files: list[Path], params: Params) -> str:
    """Identity of a cascade: the stage files' sha256 and the prediction-relevant params."""
    dump = params.model_dump(mode="json")
    blob = {"files": [file_sha256(p) for p in files], "params": {k: dump[k] for k in _CONTENT_SECTIONS}}
    return hashlib.sha256(json.dumps(blob, sort_keys=True).encode()).hexdigest()[:32]


def _float(v: Any) -> float:
    try:
        return float(v)
    except (TypeError, ValueError):
        return math.nan


def _client(uri: str | None):  # noqa: ANN202 - MlflowClient (imported lazily)
    from components.tracking import get_client, tracking_uri

    return get_client(uri or tracking_uri())


def find_version(client: Any, name: str, key: str, value: str) -> Any | None:
    """The registered version of ``name`` whose tag ``key`` equals ``value``, or None: the
    oldest whose registration completed (tag ``xct.alias_reason``), else the oldest (a
    client's retry of a request whose answer was lost can create a second version of the
    same content). A registry that cannot answer raises (never "not registered")."""
    from mlflow.exceptions import MlflowException

    from components.tracking import not_found

    try:
        versions = client.search_model_versions(f"name='{name}'")
    except MlflowException as e:
        if not_found(e):
            return None
        raise
    hits = sorted((v for v in versions if (v.tags or {}).get(key) == value), key=lambda v: int(v.version))
    return next((v for v in hits if "xct.alias_reason" in (v.tags or {})), hits[0] if hits else None)


def _aliases(client: Any, name: str, version: Any) -> tuple[str, ...]:
    """A version's aliases (search results do not carry them on every backend)."""
    return tuple(client.get_model_version(name, str(version)).aliases or [])


def _champion(client: Any, name: str, alias: str) -> Any | None:
    """The version holding ``alias``; None only when the registry says there is none."""
    from mlflow.exceptions import MlflowException

    from components.tracking import not_found

    try:
        return client.get_model_version_by_alias(name, alias)
    except MlflowException as e:
        if not_found(e):
            return None
        raise


def _same_version(a: Any | None, b: Any | None) -> bool:
    return (a is None and b is None) or (a is not None and b is not None and str(a.version) == str(b.version))


#: how often :func:`set_decided_alias` re-decides when the champion moves under it
_ALIAS_TRIES = 5


def set_decided_alias(client: Any, params: Params, version: Any, psnr: float, test_hash: str | None,
                      rows: Mapping[str, float] | None = None) -> tuple[str, str]:
    """Decide ``version``'s alias (:func:`decide_alias`) against the champion read right
    before the alias is written, write it and record the reason (tag ``xct.alias_reason``,
    written last: a version without it never had its decision made). The champion is read
    again immediately before the write; when it changed the decision is made again.
    ``rows``: the version's last-stage per-patient ``psnr_window_db`` (the paired rule); the
    champion's come from its registration run (``eval/stageN/per_patient.csv``)."""
    from components.tracking import RegistryError

    reg = params.registry
    champ = _champion(client, reg.model_name, reg.champion_alias)
    for _ in range(_ALIAS_TRIES):
        alias, reason = decide_alias(champ, psnr, test_hash, params, rows, _version_psnr_rows(client, champ, params))
        now = _champion(client, reg.model_name, reg.champion_alias)  # re-read right before the write
        if _same_version(now, champ):
            break
        champ = now
    else:
        raise RegistryError(f"{reg.model_name}@{reg.champion_alias} changed {_ALIAS_TRIES} times while v{version}'s "
                            "alias was decided; run the register step again")
    client.set_registered_model_alias(reg.model_name, alias, str(version))
    client.set_model_version_tag(reg.model_name, str(version), "xct.alias_reason", reason)
    return alias, reason


def _version_psnr_rows(client: Any, champion: Any | None, params: Params) -> dict[str, float] | None:
    """A registered version's (the champion's) last-stage per-patient window PSNR (its
    registration run's ``eval/stageN/per_patient.csv``), or None (no version, the paired rule
    off, no rows)."""
    run_id = None if champion is None else (getattr(champion, "run_id", None) or (champion.tags or {}).get("xct.run_id"))
    if not run_id or params.registry.champion_rule != "paired":
        return None
    from components.tracking import stage_rows

    rows = stage_rows(client, run_id, params.n_stages)
    return psnr_rows(rows)


def _own_psnr_rows(eval_files: "Mapping[int, Path] | None", n: int) -> dict[str, float] | None:
    """This version's last-stage per-patient window PSNR (``per_patient.csv`` beside its
    ``metrics.json``), or None when the evaluation wrote none."""
    from xct_core.intervals import read_rows_csv

    if not eval_files or n not in eval_files or not (Path(eval_files[n]).parent / PER_PATIENT_CSV).is_file():
        return None
    return psnr_rows(read_rows_csv(Path(eval_files[n]).parent / PER_PATIENT_CSV))


def psnr_rows(rows: "Sequence[Mapping[str, Any]] | None") -> dict[str, float] | None:
    """patient id → ``psnr_window_db`` of per-patient rows (None without rows)."""
    from xct_core.intervals import rows_by_id

    return rows_by_id(rows, "psnr_window_db") if rows else None


def _log_card(client: Any, name: str, version: Any, run_id: str, card: Mapping[str, Any]) -> None:
    """The card on the registration run (``model_card/``) and the version tag pointing at it."""
    with tempfile.TemporaryDirectory(prefix="xct-card-") as tmp:
        write_card(card, Path(tmp))
        client.log_artifacts(run_id, tmp, CARD_ARTIFACT_DIR)
    client.set_model_version_tag(name, str(version), CARD_TAG, f"runs:/{run_id}/{CARD_ARTIFACT_DIR}")


def _fail_stale_runs(client: Any, experiment_id: str, chash: str, note: str) -> None:
    """Registration runs of this content left RUNNING by an earlier attempt that could not
    tell MLflow it failed (the server was down) are marked FAILED."""
    runs = client.search_runs([experiment_id], filter_string=f"tags.`xct.content_hash` = '{chash}' and attributes.status = 'RUNNING'")
    for r in runs:
        client.set_tag(r.info.run_id, "xct.failure", redact(note))
        client.set_terminated(r.info.run_id, status="FAILED")


def _complete_existing(client: Any, existing: Any, params: Params, stages_in: "Sequence[StageInputs]",
                       psnr: float, test_hash: str | None, processed_dir: str | Path | None, say: Any) -> Registration:
    """An already registered version of this content: complete what an interrupted
    registration left undone (the alias decision, the model card; its run then ends
    FINISHED), else report it unchanged."""
    reg = params.registry
    name, v = reg.model_name, str(existing.version)
    mv = client.get_model_version(name, v)
    et = dict(mv.tags or {})
    aliases = tuple(mv.aliases or [])
    run_id = et.get("xct.run_id") or str(mv.run_id or "")
    reason = et.get("xct.alias_reason")
    alias, done = None, []
    if reason is None:  # the registration stopped before its alias decision was recorded
        held = next((a for a in (reg.champion_alias, reg.candidate_alias) if a in aliases), None)
        if held is not None:  # the alias was written, its reason was not
            alias, reason = held, f"@{held} was set before the registration was interrupted"
            client.set_model_version_tag(name, v, "xct.alias_reason", reason)
        else:
            vpsnr = _float(et.get("xct.psnr_window_db", psnr))
            own = _version_psnr_rows(client, mv, params)
            alias, reason = set_decided_alias(client, params, v, vpsnr, et.get("xct.test_ids_hash") or test_hash, own)
        aliases = _aliases(client, name, v) or (alias,)
        done.append(f"alias decision @{alias}")
    card = model_card(params, stages_in, {**card_lineage(et), "run_id": run_id or None},
                      _version_status(params, v, aliases, alias, reason), processed_dir)
    if CARD_TAG not in et and run_id:
        _log_card(client, name, v, run_id, card)
        done.append("model card")
    if not done:
        say(f"register: this cascade is already {name} v{v} "
            f"(aliases: {', '.join(aliases) or 'none'}); nothing new registered")
        return Registration(name, v, None, aliases, False, str(existing.run_id or ""),
                            "already registered (same content hash)", card)
    if run_id and client.get_run(run_id).info.status != "FINISHED":
        client.set_tag(run_id, "xct.completed_on_rerun", "true")
        client.set_terminated(run_id, status="FINISHED")
    say(f"register: completed the interrupted registration of {name} v{v} ({', '.join(done)}): "
        f"@{alias or ','.join(aliases) or 'none'} ({reason}); model card: `xct models show {v}`")
    return Registration(name, v, alias, aliases, False, run_id, reason, card)


def model_signature(params: Params) -> Any:
    """The registered pyfunc's :class:`mlflow.models.ModelSignature` (module docstring):
    float32 ``frontal``/``lateral`` ``[-1, P, P]``, params samples/steps/seed, float32
    ``[S, S, S]`` out."""
    import numpy as np
    from mlflow.models import ModelSignature
    from mlflow.types import ParamSchema, ParamSpec, Schema, TensorSpec

    p = int(params.drr.pixels)
    s = int(list(params.stages.values())[-1].size)
    f32 = np.dtype(np.float32)
    return ModelSignature(
        inputs=Schema([TensorSpec(f32, (-1, p, p), "frontal"), TensorSpec(f32, (-1, p, p), "lateral")]),
        outputs=Schema([TensorSpec(f32, (s, s, s), "volume_hu")]),
        params=ParamSchema([ParamSpec("samples", "long", int(params.reconstruct.samples)),
                            ParamSpec("steps", "long", 0),
                            ParamSpec("seed", "long", int(params.seed))]),
    )


def input_example(params: Params) -> tuple[dict[str, Any], dict[str, int]]:
    """A request MLflow can run cheaply when it validates the logged model: zero line
    integrals (valid: no body in the beam), one sample of one DDIM step."""
    import numpy as np

    p = int(params.drr.pixels)
    zero = np.zeros((1, p, p), dtype=np.float32)
    return {"frontal": zero, "lateral": zero.copy()}, {"samples": 1, "steps": 1, "seed": int(params.seed)}


@contextmanager
def _quiet(*loggers: str) -> Iterator[None]:
    """MLflow's INFO lines of ``loggers`` off inside the block (a step's stderr stays its own
    messages; warnings and errors still show)."""
    import logging

    saved = [(lg, lg.level) for lg in (logging.getLogger(n) for n in loggers)]
    for lg, level in saved:
        lg.setLevel(max(level, logging.WARNING))
    try:
        yield
    finally:
        for lg, level in saved:
            lg.setLevel(level)


def decide_alias(champion: Any | None, psnr: float, test_hash: str | None, params: Params,
                 rows: Mapping[str, float] | None = None,
                 champion_rows: Mapping[str, float] | None = None) -> tuple[str, str]:
    """``(alias, reason)`` for a new version (rules in the module docstring). ``rows`` /
    ``champion_rows``: patient id → the last stage's ``psnr_window_db`` of the new version and of
    the champion (their ``per_patient.csv``), for ``registry.champion_rule: paired``."""
    from xct_core.intervals import paired_bootstrap

    reg = params.registry
    if champion is None:
        return reg.champion_alias, "no champion yet"
    tags = champion.tags or {}
    if tags.get("xct.test_ids_hash") != test_hash:
        return reg.candidate_alias, (f"champion v{champion.version} was measured on another test split "
                                     f"({tags.get('xct.test_ids_hash')} vs {test_hash}): not comparable")
    margin = float(reg.champion_min_change_db)
    note = ""
    if reg.champion_rule == "paired":
        pb = paired_bootstrap(rows, champion_rows) if rows and champion_rows else None
        if pb is not None and pb.get("interval"):
            lo, hi = (float(x) for x in pb["interval"])
            says = (f"paired change {float(pb['mean']):+.3f} dB [{lo:+.3f}, {hi:+.3f}] PSNR(window) over {pb['n']} "
                    f"patients (95 % bootstrap)")
            if lo > margin:
                return reg.champion_alias, f"beats champion v{champion.version}: {says}, lower bound > {margin:g} dB"
            return reg.candidate_alias, (f"does not beat champion v{champion.version}: {says}, lower bound <= "
                                         f"{margin:g} dB")
        why = pb.get("note") if pb is not None else "per-patient rows missing on " + (
            "both sides" if not rows and not champion_rows else "this version" if not rows else "the champion")
        note = f" (means: no paired interval, {why})"
    old = _float(tags.get("xct.psnr_window_db"))
    if math.isfinite(psnr) and (not math.isfinite(old) or psnr > old + margin):
        return reg.champion_alias, (f"beats champion v{champion.version}: {psnr:.3f} > {old:.3f} dB PSNR(window)"
                                    f"{f' + {margin:g}' if margin else ''}{note}")
    return reg.candidate_alias, (f"does not beat champion v{champion.version}: {psnr:.3f} <= {old:.3f} dB "
                                 f"PSNR(window){f' + {margin:g}' if margin else ''}{note}")


def register_cascade(
    train_dir: str | Path,
    stage_metrics: dict[int, dict[str, Any]],
    gate_reports: dict[int, Path],
    params: Params,
    *,
    processed_dir: str | Path | None = None,
    eval_files: dict[int, Path] | None = None,
    card_stages: "Sequence[StageInputs] | None" = None,
    tracking_uri: str | None = None,
    pipeline_run_id: str | None = None,
    log: Any = None,
) -> Registration:
    """Log the cascade (every stage in params) as a pyfunc and register it (module docstring).

    ``stage_metrics``: stage → its evaluation summary (metrics.json); the last stage's
    ``psnr_window_db`` and ``test_ids_hash`` decide the alias. ``card_stages``: what the model
    card reports per stage (:func:`read_stage_inputs`; default: ``stage_metrics`` and the gate
    reports, without per-patient rows, so without intervals). The card is logged on the
    registration run (``model_card/model_card.{json,md}``) and the version's tag
    ``xct.model_card`` points at it (``runs:/<run id>/model_card``).
    """
    from components.tracking import no_progress_bars

    with no_progress_bars():
        return _register_cascade(train_dir, stage_metrics, gate_reports, params, processed_dir=processed_dir,
                                 eval_files=eval_files, card_stages=card_stages, tracking_uri=tracking_uri,
                                 pipeline_run_id=pipeline_run_id, log=log)


def _register_cascade(
    train_dir: str | Path,
    stage_metrics: dict[int, dict[str, Any]],
    gate_reports: dict[int, Path],
    params: Params,
    *,
    processed_dir: str | Path | None,
    eval_files: dict[int, Path] | None,
    card_stages: "Sequence[StageInputs] | None",
    tracking_uri: str | None,
    pipeline_run_id: str | None,
    log: Any,
) -> Registration:
    import mlflow

    from components.tracking import (
        _transport_errors,
        bound_requests,
        ensure_experiment,
        lineage_tags,
        log_datasets,
        registry_errors,
    )
    from components.tracking import tracking_uri as default_uri

    say = log or (lambda _m: None)
    uri = tracking_uri or default_uri()
    reg = params.registry
    bound_requests(reg)
    n = len(params.stages)
    files = stage_files(train_dir, params, n)
    chash = content_hash(files, params)
    last = stage_metrics.get(n) or {}
    psnr = _float(last.get("psnr_window_db"))
    test_hash = last.get("test_ids_hash")
    client = _client(uri)
    from xct_core.model_card import StageInputs

    stages_in = list(card_stages) if card_stages is not None else [
        StageInputs(k, stage_metrics.get(k), None, _read_json(gate_reports[k]) if k in gate_reports else None)
        for k in range(1, n + 1)]

    what = f"registering {reg.model_name}"
    with registry_errors(uri, what):
        existing = find_version(client, reg.model_name, "xct.content_hash", chash)
        if existing is not None:
            return _complete_existing(client, existing, params, stages_in, psnr, test_hash, processed_dir, say)

    lineage = lineage_tags(params.digest(), processed_dir)
    commit = lineage.get("mlflow.source.git.commit")
    tags = {
        "xct.content_hash": chash,
        "xct.params_digest": params.digest(),
        "xct.test_ids_hash": str(test_hash),
        "xct.psnr_window_db": repr(psnr),
        "xct.stages": str(n),
        "xct.model_file": params.eval.model_file,
        "xct.gates": ",".join(f"stage{k}=pass" for k in sorted(gate_reports)),
        "xct.git_commit": commit or "unknown",
        **{k: v for k, v in lineage.items() if k.startswith(("xct.", "kfp."))},
        **({"xct.pipeline_run_id": pipeline_run_id} if pipeline_run_id else {}),
    }
    mlflow.set_tracking_uri(uri)
    with registry_errors(uri, what):
        exp_id = ensure_experiment(client, reg.experiment)
        _fail_stale_runs(client, exp_id, chash, "registration interrupted (MLflow could not be told); registered again")
    with tempfile.TemporaryDirectory(prefix="xct-register-") as tmp:
        arts: dict[str, str] = {}
        for k, src in enumerate(files, start=1):
            dst = Path(tmp) / f"stage{k}.pt"
            shutil.copyfile(src, dst)
            arts[f"stage{k}"] = str(dst)
        pj = Path(tmp) / "params.json"
        pj.write_text(params.model_dump_json(indent=2))
        arts["params"] = str(pj)
        cal = Path(eval_files[n]).parent / CALIBRATION_JSON if eval_files and n in eval_files else None
        if cal is not None and cal.is_file():  # the last stage's val-fitted calibration (xct reconstruct's interval)
            shutil.copyfile(cal, Path(tmp) / CALIBRATION_JSON)
            arts["calibration"] = str(Path(tmp) / CALIBRATION_JSON)
        with registry_errors(uri, what):
            run_id = mlflow.start_run(experiment_id=exp_id, run_name=f"register-{chash[:8]}",
                                      tags={**lineage, **tags, "xct.verdict": "passed"}).info.run_id
        # the run stays RUNNING until the version, its alias decision and its card exist:
        # FINISHED then, FAILED (KILLED on Ctrl-C) when any of it fails
        try:
            with registry_errors(uri, what):
                for k, m in sorted(stage_metrics.items()):
                    vals = {f"stage{k}/{key}": float(v) for key, v in m.items()
                            if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(float(v))}
                    if vals:
                        mlflow.log_metrics(vals)
                mlflow.log_params({"model_name": reg.model_name, "stages": n, "model_file": params.eval.model_file})
                for k, p in sorted(gate_reports.items()):
                    mlflow.log_artifact(str(p), "gates")
                for k, p in sorted((eval_files or {}).items()):
                    mlflow.log_artifact(str(p), f"eval/stage{k}")
                    if (Path(p).parent / PER_PATIENT_CSV).is_file():  # the next gate's paired champion check
                        mlflow.log_artifact(str(Path(p).parent / PER_PATIENT_CSV), f"eval/stage{k}")
                log_datasets(client, run_id, processed_dir, SPLIT_CONTEXTS)
                with _quiet("mlflow.pyfunc", "mlflow.models"):  # "Validating input example …" INFO lines
                    info = mlflow.pyfunc.log_model(
                        name="model",
                        python_model=str(PYFUNC_FILE),
                        artifacts=arts,
                        code_paths=[str(REPO / "xct_core")],
                        pip_requirements=pip_requirements(),
                        signature=model_signature(params),
                        input_example=input_example(params),
                    )
                tags["xct.run_id"] = run_id
                mv = mlflow.register_model(info.model_uri, reg.model_name, tags=tags)
                own_rows = _own_psnr_rows(eval_files, n)
                alias, reason = set_decided_alias(client, params, mv.version, psnr, test_hash, own_rows)
                aliases = _aliases(client, reg.model_name, mv.version) or (alias,)
                card = model_card(params, stages_in, {**card_lineage(tags), "run_id": run_id},
                                  _version_status(params, mv.version, aliases, alias, reason), processed_dir)
                _log_card(client, reg.model_name, mv.version, run_id, card)
        except BaseException as e:
            status = "KILLED" if isinstance(e, KeyboardInterrupt) else "FAILED"
            try:
                mlflow.end_run(status)
            except _transport_errors():
                say(f"register: run {run_id} could not be marked {status} (MLflow cannot answer); "
                    "the next register run of this cascade marks it")
            raise
        with registry_errors(uri, what):
            mlflow.end_run("FINISHED")
    say(f"register: {reg.model_name} v{mv.version} → @{alias} ({reason}); model card: `xct models show {mv.version}`")
    return Registration(reg.model_name, str(mv.version), alias, aliases, True, run_id, reason, card)


# --------------------------------------------------------------------------- the model card


def read_stage_inputs(gates_dir: str | Path, eval_dir: str | Path, params: Params) -> "list[StageInputs]":
    """Every stage's ``metrics.json``, per-patient rows and gate report (None where missing;
    no rows for a skipped stage)."""
    from xct_core.model_card import StageInputs, read_rows_csv

    out = []
    for k in range(1, params.n_stages + 1):
        ed = Path(eval_dir) / f"stage{k}"
        m = _read_json(ed / METRICS_JSON)
        rows = read_rows_csv(ed / PER_PATIENT_CSV) if m is not None and not m.get("skipped") and (
            ed / PER_PATIENT_CSV).is_file() else None
        out.append(StageInputs(k, m, rows, _read_json(Path(gates_dir) / ReportLayout.gate_file(k))))
    return out


def _version_status(params: Params, version: Any, aliases: Sequence[str], alias: str | None,
                    reason: str | None) -> dict[str, Any]:
    """The card's status block of a registered version."""
    reg = params.registry
    return {"status": "promoted" if reg.champion_alias in aliases else "registered", "name": reg.model_name,
            "version": str(version), "model_uri": f"models:/{reg.model_name}/{version}", "alias": alias,
            "alias_reason": reason}


def card_lineage(tags: Mapping[str, str]) -> dict[str, Any]:
    """The card's lineage values from lineage / version tags (:func:`components.tracking.lineage_tags`)."""
    return {
        "git_commit": tags.get("xct.git_commit") or tags.get("mlflow.source.git.commit"),
        "git_dirty": tags.get("xct.git_dirty"),
        "params_digest": tags.get("xct.params_digest"),
        "content_hash": tags.get("xct.content_hash"),
        "data_hash": tags.get("xct.data_hash"),
        "data_hash_source": tags.get("xct.data_hash_source"),
        "data_dir": tags.get("xct.data_dir"),
    }


def model_card(params: Params, stages: "Sequence[StageInputs]", lineage: Mapping[str, Any], status: Mapping[str, Any],
               processed_dir: str | Path | None) -> dict[str, Any]:
    """The card (:func:`xct_core.model_card.build_card`) with the protocol built from params
    and the preprocess manifest of ``processed_dir`` when there is one."""
    from xct_core.evaluation import EvalProtocol
    from xct_core.model_card import build_card

    manifest = None
    if processed_dir is not None and Path(processed_dir).is_dir():
        from xct_core.preprocess import read_manifest

        try:
            manifest = read_manifest(processed_dir)
        except XctError:
            manifest = None
    return build_card(params=params, protocol=EvalProtocol.from_params(params), stages=stages, lineage=lineage,
                      status=status, manifest=manifest)


def write_card(card: Mapping[str, Any], out_dir: str | Path) -> tuple[Path, Path]:
    """``model_card.json`` + ``model_card.md`` in ``out_dir``, atomically (no credential:
    :func:`xct_core.redact.redact_doc`)."""
    from xct_core.atomic import write_json_atomic, write_text_atomic
    from xct_core.model_card import render_markdown

    out = Path(out_dir)
    card = redact_doc(dict(card))
    return (write_json_atomic(out / MODEL_CARD_JSON, dict(card)),
            write_text_atomic(out / MODEL_CARD_MD, render_markdown(card)))


# --------------------------------------------------------------------------- registry queries


def list_versions(params: Params, tracking_uri: str | None = None) -> list[dict[str, Any]]:
    """Every version of ``registry.model_name``, newest first: version, aliases, key metrics.

    A tracking store that does not exist yet has no versions, and is not created (read-only);
    a registry that cannot answer raises :class:`components.tracking.RegistryError`."""
    from components.tracking import store_exists
    from components.tracking import tracking_uri as default_uri

    from components.tracking import bound_requests, registry_errors

    uri = tracking_uri or default_uri()
    if not store_exists(uri):
        return []
    bound_requests(params.registry)
    client = _client(uri)
    name = params.registry.model_name
    with registry_errors(uri, f"listing the versions of {name}"):
        versions = sorted(client.search_model_versions(f"name='{name}'"), key=lambda v: int(v.version), reverse=True)
        aliases = {str(v.version): list(_aliases(client, name, v.version)) for v in versions}
    out = []
    for v in versions:
        t = v.tags or {}
        out.append({
            "version": str(v.version),
            "aliases": aliases[str(v.version)],
            "psnr_window_db": _float(t.get("xct.psnr_window_db")),
            "stages": t.get("xct.stages"),
            "test_ids_hash": t.get("xct.test_ids_hash"),
            "git_commit": t.get("xct.git_commit"),
            "data_hash": t.get("xct.data_hash"),
            "run_id": v.run_id,
            "created": int(v.creation_timestamp or 0),
        })
    return out


def _existing_version(version: str, params: Params, tracking_uri: str | None) -> tuple[Any, str, Any]:
    """``(client, model name, model version)`` of an existing ``version``; :class:`InputError`
    (one line) when there is no registry yet (which is not created) or the registry answers
    that there is no such version; :class:`components.tracking.RegistryError` when it cannot
    answer."""
    from mlflow.exceptions import MlflowException

    from components.tracking import bound_requests, not_found, registry_errors, store_exists
    from components.tracking import tracking_uri as default_uri

    name = params.registry.model_name
    uri = tracking_uri or default_uri()
    if not store_exists(uri):
        raise InputError(None, f"no model registry at {uri} yet: nothing is registered (see `xct models list`)")
    if not str(version).isdigit():
        raise InputError(None, f"{name} has no version {version!r}: a version is a number (see `xct models list`)")
    bound_requests(params.registry)
    client = _client(uri)
    with registry_errors(uri, f"reading {name} v{version}"):
        try:
            mv = client.get_model_version(name, str(version))
        except MlflowException as e:
            if not not_found(e):
                raise
            raise InputError(None, f"{name} has no version {version!r} (see `xct models list`)") from None
    return client, name, mv


def promote(version: str, alias: str, params: Params, tracking_uri: str | None = None) -> dict[str, Any]:
    """Point ``alias`` at ``version`` (idempotent); :class:`InputError` for an unknown version."""
    client, name, _mv = _existing_version(version, params, tracking_uri)
    if not alias or not alias.replace("-", "").replace("_", "").isalnum():
        raise ConfigError(f"alias must be letters, digits, '-' or '_', got {alias!r}")
    from components.tracking import registry_errors
    from components.tracking import tracking_uri as default_uri

    with registry_errors(tracking_uri or default_uri(), f"pointing @{alias} at {name} v{version}"):
        client.set_registered_model_alias(name, alias, str(version))
        client.set_model_version_tag(name, str(version), f"xct.promoted_{alias}", "manual")
    return {"name": name, "version": str(version), "alias": alias, "model_uri": f"models:/{name}@{alias}"}


def show_card(version: str, params: Params, *, as_json: bool = False, tracking_uri: str | None = None) -> str:
    """The model card of ``version`` as logged at registration: its Markdown, or (``as_json``)
    its JSON. :class:`InputError` for no registry, an unknown version, or a version
    registered without a card."""
    from components.model_uri import _download  # the one quiet download (no progress bars, one-line errors)
    from components.tracking import tracking_uri as default_uri

    _client_, name, mv = _existing_version(version, params, tracking_uri)
    ref = (mv.tags or {}).get(CARD_TAG)
    if not ref:
        raise InputError(None, f"{name} v{mv.version} has no model card (registered before cards were logged, or its "
                         "registration was interrupted: run the register step again)")
    fname = MODEL_CARD_JSON if as_json else MODEL_CARD_MD
    with tempfile.TemporaryDirectory(prefix="xct-card-") as tmp:
        try:
            local = _download(f"{ref}/{fname}", Path(tmp), tracking_uri or default_uri())
        except InputError as e:
            raise InputError(None, f"{name} v{mv.version}: cannot fetch its model card ({e})") from None
        if as_json:
            from xct_core.jsondoc import json_text

            return json_text(read_json_doc(local, "model card"))
        return local.read_text(encoding="utf-8")


# --------------------------------------------------------------------------- the step


def _read_json(path: Path) -> dict[str, Any] | None:
    """A report, or None when the file does not exist (a stage that never ran)."""
    if not path.exists():
        return None
    return read_json_doc(path, "report")


def _fallback_model_uri(train_dir: Path, params: Params) -> str | None:
    """The last trained stage's model, as a reference ``xct reconstruct --model`` accepts.

    Stage 1: ``runs:/<train run>/model/<file>.pt`` when its MLflow run is recorded
    (checkpoints/stage{k}/mlflow.json), else its local path. Stage k > 1: always the local
    ``models/stage{k}/<file>.pt`` inside the training folder, which resolves stages 1 … k —
    the run artifact holds stage k alone, which cannot reconstruct without the earlier stages."""
    for k in range(params.n_stages, 0, -1):
        lay = RunLayout(Path(train_dir), k)
        p = lay.model(params.eval.model_file)
        if p.is_file():
            run = _read_json(lay.mlflow_state) or {}
            if k == 1 and run.get("run_id"):
                return f"runs:/{run['run_id']}/model/{p.name}"
            return str(p.absolute())
    return None


def run_register(
    gates_dir: str | Path,
    eval_dir: str | Path,
    train_dir: str | Path,
    out_path: str | Path,
    params: Params,
    *,
    processed_dir: str | Path | None = "data/processed",
    tracking_uri: str | None = None,
    log: Any = None,
) -> dict[str, Any]:
    """Read every stage's gate report and evaluation; register when all passed; write and
    return the summary (:mod:`components.pipeline_verdict`)."""
    from components.pipeline_verdict import build_summary, stage_entry, write_summary
    from components.tracking import pipeline_run_of
    from components.tracking import tracking_uri as default_uri

    say = log or (lambda _m: None)
    uri = tracking_uri or default_uri()
    gates_dir, eval_dir, train_dir = Path(gates_dir), Path(eval_dir), Path(train_dir)
    stages, metrics, gate_paths, eval_paths = [], {}, {}, {}
    for k in range(1, params.n_stages + 1):
        gp, ep = gates_dir / ReportLayout.gate_file(k), eval_dir / f"stage{k}" / METRICS_JSON
        gate, m = _read_json(gp), _read_json(ep)
        stages.append(stage_entry(k, gate, m, gp, ep))
        if gate is not None:
            gate_paths[k] = gp
        if m is not None and not m.get("skipped"):
            metrics[k] = m
            eval_paths[k] = ep
    card_dir = Path(out_path).parent
    reports = {
        "summary": str(out_path), "gates_dir": str(gates_dir), "eval_dir": str(eval_dir),
        "gates": [s["gate_report"] for s in stages], "eval": [s["eval_metrics"] for s in stages],
        "model_card": str(card_dir / MODEL_CARD_MD), "model_card_json": str(card_dir / MODEL_CARD_JSON),
    }
    card_stages = read_stage_inputs(gates_dir, eval_dir, params)
    pipeline_run = pipeline_run_of(train_dir, uri)
    if all(s["passed"] for s in stages):
        r = register_cascade(train_dir, metrics, gate_paths, params, processed_dir=processed_dir,
                             eval_files=eval_paths, card_stages=card_stages, tracking_uri=uri,
                             pipeline_run_id=pipeline_run, log=say)
        status = "promoted" if params.registry.champion_alias in r.aliases else "registered"
        alias = r.alias or (params.registry.champion_alias if status == "promoted"
                            else (r.aliases[0] if r.aliases else None))
        summary = build_summary(status=status, stages=stages, model_uri=r.model_uri, tracking_uri=uri,
                                reports=reports, model_name=r.name, model_version=r.version, alias=alias)
        card = r.card
        verdict = {"xct.verdict": status, "xct.model_uri": r.model_uri, "xct.register_run_id": r.run_id}
    else:
        from components.tracking import lineage_tags

        summary = build_summary(status="rejected", stages=stages, model_uri=_fallback_model_uri(train_dir, params),
                                tracking_uri=uri, reports=reports)
        card = model_card(params, card_stages, card_lineage(lineage_tags(params.digest(), processed_dir)), {
            "status": "rejected", "rejected_at_stage": summary["rejected_at_stage"],
            "model_uri": summary["model_uri"]}, processed_dir)
        k = int(summary["rejected_at_stage"])
        reason = next(s["summary"] for s in stages if s["stage"] == k)
        rejected_run = log_rejected(params, k, reason, metrics, {**gate_paths}, eval_dir, card,
                                    processed_dir=processed_dir, pipeline_run_id=pipeline_run, tracking_uri=uri)
        say(f"register: rejected at stage {k}; audit trail in MLflow run {rejected_run} "
            f"(experiment {params.registry.experiment})")
        verdict = {"xct.verdict": "rejected", "xct.rejected_at_stage": str(k), "xct.reason": reason[:5000],
                   "xct.rejected_run_id": rejected_run}
    if pipeline_run:
        from components.tracking import get_client, log_pipeline_verdict, registry_errors

        with registry_errors(uri, f"logging the gate results on pipeline run {pipeline_run}"):
            log_pipeline_verdict(get_client(uri), pipeline_run,
                                 {s["stage"]: _read_json(Path(s["gate_report"])) for s in stages}, verdict)
    if card is not None:  # the card of this run, registered or not, beside its summary
        write_card(card, card_dir)
    write_summary(out_path, summary)
    return summary


def log_rejected(params: Params, stage: int, reason: str, stage_metrics: Mapping[int, Mapping[str, Any]],
                 gate_reports: Mapping[int, Path], eval_dir: str | Path, card: Mapping[str, Any], *,
                 processed_dir: str | Path | None = None, pipeline_run_id: str | None = None,
                 tracking_uri: str | None = None) -> str:
    """The audit trail of a rejected candidate: a FINISHED run ``rejected-stage{stage}`` in
    ``registry.experiment`` tagged ``xct.verdict=rejected``, ``xct.rejected_at_stage``,
    ``xct.reason`` (+ the lineage and origin tags, ``xct.pipeline_run_id``), holding every
    evaluated stage's metrics (``stage{k}/<metric>``), the evaluation reports
    (``eval/stage{k}/``), the gate reports (``gates/``), the model card (``model_card/``) and
    the dataset inputs. Returns its run id; an MLflow that cannot answer is one
    :class:`components.tracking.RegistryError` line."""
    from mlflow.entities import Metric, RunTag

    from components.tracking import ensure_experiment, lineage_tags, log_datasets, no_progress_bars, registry_errors
    from components.tracking import tracking_uri as default_uri

    uri = tracking_uri or default_uri()
    client = _client(uri)
    reg = params.registry
    tags = {**lineage_tags(params.digest(), processed_dir), "xct.kind": "rejected-candidate",
            "xct.verdict": "rejected", "xct.rejected_at_stage": str(stage), "xct.reason": reason[:5000],
            "xct.stages": str(params.n_stages),
            "xct.gates": ",".join(f"stage{k}={'pass' if (_read_json(p) or {}).get('passed') else 'fail'}"
                                  for k, p in sorted(gate_reports.items())),
            **({"xct.pipeline_run_id": pipeline_run_id} if pipeline_run_id else {})}
    now = int(time.time() * 1000)
    metrics = [Metric(f"stage{k}/{key}", float(v), now, 0) for k, m in sorted(stage_metrics.items())
               for key, v in m.items()
               if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(float(v))]
    with registry_errors(uri, f"recording the rejected candidate of {reg.model_name}"), no_progress_bars():
        exp_id = ensure_experiment(client, reg.experiment)
        run_id = client.create_run(exp_id, run_name=f"rejected-stage{stage}", tags=tags).info.run_id
        try:
            for i in range(0, len(metrics), 900):
                client.log_batch(run_id, metrics=metrics[i : i + 900], synchronous=True)
            for p in gate_reports.values():
                client.log_artifact(run_id, str(p), "gates")
            for k in sorted(stage_metrics):
                ed = Path(eval_dir) / f"stage{k}"
                for f in sorted(ed.iterdir()) if ed.is_dir() else []:
                    if f.is_file():
                        client.log_artifact(run_id, str(f), f"eval/stage{k}")
            with tempfile.TemporaryDirectory(prefix="xct-card-") as tmp:
                write_card(card, Path(tmp))
                client.log_artifacts(run_id, tmp, CARD_ARTIFACT_DIR)
            log_datasets(client, run_id, processed_dir, SPLIT_CONTEXTS)
            client.log_batch(run_id, tags=[RunTag("xct.run_id", run_id)], synchronous=True)
        except BaseException:
            client.set_terminated(run_id, status="FAILED")
            raise
        client.set_terminated(run_id, status="FINISHED")
    return run_id


