"""Which params keys each pipeline step reads: ONE declaration for dvc.yaml and the KFP DAG.

:data:`STEP_PARAMS` lists, per step, the params keys the step reads (dotted paths; ``{stage}``
= the step's own cascade stage, e.g. ``stages.{stage}`` → ``stages.stage2``). Two pipelines
use it:

- ``xct pipeline dvc-sync`` (pipelines/dvc_dag.py) writes each dvc.yaml stage's ``params:``
  list from it (``{stage}`` → DVC's ``${key}``): a change of a listed key re-runs the step;
- the KFP DAG (pipelines/kfp_dag.py) hands each task only these keys (:func:`scoped_text`),
  so a task's KFP cache key (component spec + inputs) changes when, and only when, a key it
  reads changes: editing ``gates.stage3`` leaves preprocess and the stage-1 training cached.

A component parses its scoped text with :func:`parse_scoped` (via
``components.kfp_components.params_from_text(…, step=…)``): every key the step reads must be
in the text (a missing one is a :class:`ConfigError`, never a silent default) and the usual
schema validation applies (unknown keys are errors). What the step does NOT read is
completed so the typed params validate: missing sections take the schema's defaults, a
stage entry that carries only its grid (preprocess) gets a fixed placeholder network, and a
stage without its gate gets a gate nothing can pass (:data:`UNREAD_GATE`: fail-closed, should
a step ever read a gate it does not declare). tests/test_cache_keys.py runs the steps on
scoped and whole params and finds the same outputs.

Two kinds of entry beyond plain keys:

- :data:`GRIDS`: every stage's ``size`` and ``fov_mm`` (preprocess renders every stage grid);
- :data:`OVERLAY`: the stage's tuned overlay ``hpo/best_{stage}.yaml`` as a whole file (a DVC
  file dependency only: the KFP text is the effective params, overlays merged in);
- :data:`WHOLE`: the KFP task gets the whole params — register, which logs them with the
  registered model (``params.json``, what serving reads); dvc.yaml lists its other entries.

:data:`CASCADE` steps (train, evaluate, gate of stage K) also read the earlier stages'
entries (``stages.stage1 … stage{K-1}``: the frozen cascade they load, the previous grid).
DVC tracks those through the step's file deps (the earlier models and gate), so dvc.yaml does
not list them; the KFP text carries them (a stage entry cannot be validated alone). They never
cause a needless re-run: any change of an earlier stage's entry re-trains that stage, whose
model reaches stage K anyway.
"""

from __future__ import annotations

import json
from typing import Any

from xct_core.errors import ConfigError

#: every stage's grid keys (``stages.stageK.size`` / ``fov_mm``): preprocess's
GRIDS = "<grids>"
#: the tuned overlay of the step's stage, a whole-file param (DVC only)
OVERLAY = "hpo/best_{stage}.yaml"
#: the KFP task gets the WHOLE params (the step ships them: register logs params.json with the
#: model, which serving reads); dvc.yaml lists the step's other entries
WHOLE = "<whole>"
#: the grid keys of one stage (what :data:`GRIDS` stands for)
GRID_KEYS = ("size", "fov_mm")

#: what evaluating a case reads besides ``eval``/``hu``/``drr`` (training's validation and the
#: evaluate step: xct_core.evaluation.EvalProtocol, xct_core.inference.reconstruct, xct_core.qa)
_EVAL_CASE = ("ingest.body_hu", "reconstruct.sample_batch", "limits.min_dynamic_range_hu")

#: step → the params keys it reads (dvc.yaml ``params:`` and the KFP task's ``params_yaml``)
STEP_PARAMS: dict[str, tuple[str, ...]] = {
    "synth": ("data.synth",),
    "ingest": ("data.ct", "ingest", "limits.max_ct_voxels", "limits.max_compression_ratio"),
    "validate": ("validation", "ingest.body_hu"),
    "preprocess": (GRIDS, "drr", "hu.mu_water", "data.ct", "preprocess", "eval.detector",
                   "reconstruct.min_intensity_fraction"),
    "train": (
        "seed", "pipeline.train", "model", "diffusion", "hu", "drr",
        "eval.ssim_sigma", "eval.ssim_win", "eval.hu_lo", "eval.hu_hi", "eval.protocol",
        "stages.{stage}", "train.steps.{stage}",
        "train.warmup_steps", "train.min_lr_ratio", "train.weight_decay", "train.adam_betas", "train.grad_clip",
        "train.ema_decay", "train.precision", "train.log_every", "train.ckpt_every", "train.keep_last",
        "train.on_corrupt_checkpoint", "train.val_every", "train.val_sample_steps", "train.val_samples",
        "train.val_max_volumes", "train.val_reprojection", "train.best_metric", "train.best_mode",
        "train.direct_baseline", "train.prev_stage_model", "train.loader_workers", "train.experiment",
        "train.ray", "registry.request_timeout_s", "registry.request_max_retries", *_EVAL_CASE, OVERLAY,
    ),
    "evaluate": ("seed", "model", "eval", "diffusion", "hu", "drr", "stages.{stage}", *_EVAL_CASE, OVERLAY),
    "gate": ("gates.{stage}", "registry", "data.synth", "stages.{stage}", "preprocess.fill_hu", "preprocess.antialias",
             "hu.window", "ingest.body_hu", "eval.ssim_sigma", "eval.ssim_win", "eval.hu_lo", "eval.hu_hi"),
    "register": (WHOLE, "registry", "eval", "seed", "hu", "diffusion", "drr", "ingest.body_hu",
                 "limits.max_line_integral", "stages"),
}

#: the per-stage steps (one per cascade stage; ``{stage}`` and the earlier stages apply)
CASCADE = ("train", "evaluate", "gate")

#: keys a KFP task reads that decide WHERE it runs, not what it computes: in its text (its KFP
#: cache key), never in dvc.yaml (a DVC run never uses them): the train task's Ray-job route
#: (``pipeline.ray``: the cluster's dashboard address, the job's command and timeout;
#: components/ray_jobs.py) and its run storage (``pipeline.storage`` + the ``s3`` transfer
#: settings, components/run_storage.py)
KFP_ONLY: dict[str, tuple[str, ...]] = {"train": ("pipeline.ray", "pipeline.storage", "s3")}

#: why a key is listed, where that is not obvious (a comment on its dvc.yaml line)
NOTES: dict[tuple[str, str], str] = {
    ("train", OVERLAY): "the tuned overlay (xct hpo --stage K), whole file",
    ("ingest", "limits.max_ct_voxels"): "hostile-input bounds of every CT header (xct_core/io.py)",
    ("train", "registry.request_timeout_s"): "the MLflow HTTP bounds of the stage's run (components/tracking.py)",
    ("train", "ingest.body_hu"): "validation = evaluate_case: body mask, sample batches, degenerate-output check",
    ("evaluate", "ingest.body_hu"): "the body mask of the body metrics (EvalProtocol); batches; degenerate-output check",
    ("gate", "registry"): "a champion check reads the registry's champion (its state is not a DVC dep)",
    ("gate", "data.synth"): "the information ceiling beside the thresholds re-draws these phantoms (xct_core/ceiling.py)",
    ("register", "drr"): "the model card: X-ray geometry, protocol, output grid",
}

#: the gate of a stage whose step does not read gates (nothing passes it: fail-closed)
UNREAD_GATE: dict[str, Any] = {"psnr_window_db": 1.0e9, "ssim_window": 1.0e9}


def _check_step(step: str) -> tuple[str, ...]:
    if step not in STEP_PARAMS:
        raise ConfigError(f"unknown pipeline step {step!r} (known: {', '.join(STEP_PARAMS)})")
    return STEP_PARAMS[step]


def dvc_entries(step: str, stage_names: list[str]) -> list[str | tuple[str, str]]:
    """dvc.yaml's ``params:`` entries of ``step``: dotted keys (``{stage}`` → ``${key}``, the
    ``foreach`` key), the grid keys of ``stage_names``, and ``(file, "")`` for the overlay."""
    out: list[str | tuple[str, str]] = []
    for entry in _check_step(step):
        if entry == WHOLE:
            continue
        if entry == GRIDS:
            out += [f"stages.{name}.{key}" for name in stage_names for key in GRID_KEYS]
        elif entry == OVERLAY:
            out.append((OVERLAY.replace("{stage}", "${key}"), ""))
        else:
            out.append(entry.replace("{stage}", "${key}"))
    return out


def kfp_keys(step: str, stage_names: list[str], stage: int | None = None) -> list[str]:
    """The dotted keys the KFP task of ``step`` (stage ``stage`` of a cascade step) receives:
    the declared keys with ``{stage}`` filled in, plus the earlier stages' entries."""
    entries = _check_step(step)
    if (step in CASCADE) != (stage is not None):
        raise ConfigError(f"step {step}: " + ("needs its stage" if step in CASCADE else "has no stage"))
    name = None
    if stage is not None:
        if not 1 <= stage <= len(stage_names):
            raise ConfigError(f"step {step}: stage {stage} does not exist (params define {len(stage_names)})")
        name = stage_names[stage - 1]
    if WHOLE in entries:
        from components.ops_params import OpsParams

        return list(OpsParams.model_fields)
    keys: list[str] = []
    for entry in entries:
        if entry == GRIDS:
            keys += [f"stages.{n}.{key}" for n in stage_names for key in GRID_KEYS]
        elif entry == OVERLAY:
            continue  # merged into the effective params the text is cut from
        else:
            keys.append(entry.replace("{stage}", name) if name else entry)
    if stage is not None:
        keys += [f"stages.{n}" for n in stage_names[: stage] if f"stages.{n}" not in keys]
    return keys + list(KFP_ONLY.get(step, ()))


def _get(data: Any, key: str) -> tuple[bool, Any]:
    node = data
    for part in key.split("."):
        if not isinstance(node, dict) or part not in node:
            return False, None
        node = node[part]
    return True, node


def pick(data: dict, keys: list[str]) -> dict:
    """The sub-tree of ``data`` holding exactly ``keys`` (dotted paths; each must exist)."""
    out: dict = {}
    for key in keys:
        found, value = _get(data, key)
        if not found:
            raise ConfigError(f"params have no key {key}")
        *head, last = key.split(".")
        node = out
        for part in head:
            node = node.setdefault(part, {})
        node[last] = value
    return out


def scoped_text(params: Any, step: str, stage: int | None = None) -> str:
    """The params text the KFP task of ``step`` gets: only :func:`kfp_keys` of ``params``
    (typed params), as one line of key-sorted JSON (a YAML subset): the same keys and values
    give the same text whatever the order or layout of the source file."""
    data = params.model_dump(mode="json")
    return json.dumps(pick(data, kfp_keys(step, list(data["stages"]), stage)), sort_keys=True, separators=(",", ":"))


def _placeholder_stage(entry: dict) -> dict:
    """A stage entry with only its grid (what preprocess reads) completed to a valid stage: a
    fixed one-level placeholder network (no step that reads the network gets this entry)."""
    size = entry.get("size")
    fill = {"token_grid": size // 2 if isinstance(size, int) and size >= 4 else 2, "conv_channels": [1],
            "dim": 8, "depth": 1, "heads": 1}
    return {**fill, **entry}


def parse_scoped(data: dict, step: str, stage: int | None, source: str = "params_yaml") -> dict:
    """``data`` (a params mapping handed to ``step``) checked and completed for validation:
    every key :func:`kfp_keys` names must be present (:class:`ConfigError` naming the first
    missing one otherwise); unread parts completed as the module doc says. A whole params
    file passes unchanged (it holds every key)."""
    stage_names = list(data["stages"]) if isinstance(data.get("stages"), dict) else []
    needs_stages = stage is not None or any(e in (GRIDS, "stages") for e in _check_step(step))
    if needs_stages and not stage_names:
        raise ConfigError(f"{source}: the {step} task reads `stages`, which the text does not carry "
                          "(components/step_params.py lists what each step reads)")
    try:  # a stage-K step reads stages 1 … K (named stage1 … stageK: the schema's rule)
        keys = (kfp_keys(step, [f"stage{j}" for j in range(1, int(stage) + 1)], stage) if stage is not None
                else kfp_keys(step, stage_names))
    except ConfigError as e:
        raise ConfigError(f"{source}: {e}") from None
    for key in keys:
        if not _get(data, key)[0]:
            raise ConfigError(f"{source}: the {step} task reads {key}, which the text does not carry "
                              "(components/step_params.py lists what each step reads)")
    out = dict(data)
    if stage_names:
        out["stages"] = {n: (_placeholder_stage(e) if isinstance(e, dict) and set(e) <= set(GRID_KEYS) else e)
                         for n, e in data["stages"].items()}
        gates = data.get("gates") if isinstance(data.get("gates"), dict) else {}
        out["gates"] = {**{n: dict(UNREAD_GATE) for n in stage_names if n not in gates}, **gates}
    return out
