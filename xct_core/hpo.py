"""Hyperparameter search, the pure part: search space, trial params, best-params fragment.

No optuna / Ray / MLflow here (``components/hpo.py`` binds these to an Optuna study run on
Ray Tune); everything below works on :class:`xct_core.config.Params` and plain dicts.
How to run a search, its outputs and a measured study: docs/hpo.md.

Conventions
-----------
* A searched parameter is named by its dotted path in the params tree, e.g.
  ``stages.stage1.lr`` or ``train.val_sample_steps``. In ``hpo.space`` (and ``hpo.points``)
  ``{stage}`` stands for the tuned stage's name (``stage1`` … ``stageN``).
* Every path must name an existing scalar leaf of :class:`Params`; paths the search itself
  controls (``hpo.*``, ``train.steps``, ``train.val_every``, ``train.out_dir``,
  ``train.experiment``, ``train.ray``, ``pipeline``) and other stages' keys are refused.
  Parameters outside ``stages.{stage}`` are *global* (they also change every other stage
  once written to the fragment); :func:`parse_space` flags them.
* A trial's config is ``{path: value}``. :func:`apply_config` returns new validated Params
  and the leaves it changed; searching ``stages.{stage}.token_grid`` also rewrites that
  stage's ``conv_channels`` so there is one entry per halving from ``size`` down to the
  token grid (the channel width at each resolution is kept; extra levels double the last
  width, e.g. 16³ with ``conv_channels [32]``: token grid 8 → ``[32]``, 4 → ``[32, 64]``).
* The best-params fragment (:func:`fragment`) is a nested params overlay holding only the
  changed leaves (searched + derived), e.g. ``{"stages": {"stage1": {"lr": 0.0012}}}``.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import yaml

from xct_core.config import Params, params_from_dict
from xct_core.errors import ConfigError
from xct_core.grid import token_levels
from xct_core.hpo_params import HPODistribution

__all__ = [
    "CONTROLLED",
    "SearchParam",
    "SearchSpace",
    "apply_config",
    "carried_over",
    "check_metric",
    "check_points",
    "fragment",
    "fragment_yaml",
    "leaves",
    "parse_space",
    "stage_name",
    "trial_params",
    "trial_steps",
    "validation_rounds",
]

#: params paths the search sets itself (or that must not vary between trials)
CONTROLLED: tuple[str, ...] = (
    "hpo",
    "train.steps",
    "train.val_every",
    "train.out_dir",
    "train.experiment",
    "train.ray",
    "pipeline",
)


@dataclass(frozen=True)
class SearchParam:
    """One searched parameter with ``{stage}`` expanded.

    Attributes:
        name: dotted params path (the Optuna parameter name), e.g. ``stages.stage1.lr``.
        kind: ``float`` | ``int`` | ``categorical``.
        low, high, log, step: numeric range (``float``/``int``).
        choices: the values of a ``categorical`` parameter.
        scoped: True when the path lies under the tuned stage (``stages.stageK``); False for a
            global parameter, which the fragment then sets for every stage.
    """

    name: str
    kind: Literal["float", "int", "categorical"]
    low: float | None = None
    high: float | None = None
    log: bool = False
    step: float | None = None
    choices: tuple[Any, ...] = ()
    scoped: bool = True

    def contains(self, value: Any) -> bool:
        """Is ``value`` a possible sample of this distribution?"""
        if self.kind == "categorical":
            return any(json.dumps(value) == json.dumps(c) for c in self.choices)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            return False
        if self.kind == "int" and float(value) != int(value):
            return False
        assert self.low is not None and self.high is not None
        return self.low <= value <= self.high


@dataclass(frozen=True)
class SearchSpace:
    """The validated search space of one stage (``params`` in the order of ``hpo.space``)."""

    stage: int
    stage_name: str
    params: tuple[SearchParam, ...]

    @property
    def names(self) -> list[str]:
        return [p.name for p in self.params]

    @property
    def global_names(self) -> list[str]:
        """Searched paths outside ``stages.{stage}`` (they affect every stage)."""
        return [p.name for p in self.params if not p.scoped]

    def __getitem__(self, name: str) -> SearchParam:
        for p in self.params:
            if p.name == name:
                return p
        raise KeyError(name)


# --------------------------------------------------------------------------- helpers


def stage_name(params: Params, stage: int) -> str:
    """``stage{K}`` for a 1-based stage index; :class:`ConfigError` when it does not exist."""
    names = list(params.stages)
    if not isinstance(stage, int) or not 1 <= stage <= len(names):
        raise ConfigError(f"stage {stage} does not exist (params define stages 1…{len(names)})")
    return names[stage - 1]


def _expand(template: str, name: str) -> str:
    try:
        return template.format(stage=name)
    except (KeyError, IndexError, ValueError) as e:
        raise ConfigError(f"hpo.space: {template!r}: only {{stage}} can be substituted ({e!s})") from None


def _lookup(tree: Mapping[str, Any], path: str, what: str) -> Any:
    node: Any = tree
    done: list[str] = []
    for part in path.split("."):
        if not isinstance(node, Mapping) or part not in node:
            where = ".".join(done) or "the top level"
            have = ", ".join(sorted(node)) if isinstance(node, Mapping) else "none (not a section)"
            raise ConfigError(f"{what}: unknown parameter {path!r} ({part!r} is not in {where}; have: {have})")
        node = node[part]
        done.append(part)
    return node


def _set(tree: dict[str, Any], path: str, value: Any) -> None:
    parts = path.split(".")
    node = tree
    for part in parts[:-1]:
        node = node[part]
    node[parts[-1]] = value


def _under(path: str, prefix: str) -> bool:
    return path == prefix or path.startswith(prefix + ".")


def _check_kind(name: str, dist: HPODistribution, current: Any) -> None:
    """The distribution's type must fit the parameter's current value."""
    if dist.type == "categorical":
        return
    if isinstance(current, bool) or current is None or isinstance(current, str):
        shown = "null" if current is None else type(current).__name__
        raise ConfigError(f"hpo.space: {name}: a {shown} parameter needs type: categorical, not {dist.type}")
    if isinstance(current, int) and dist.type == "float":
        raise ConfigError(f"hpo.space: {name}: an integer parameter needs type: int (or categorical), not float")


# --------------------------------------------------------------------------- space


def parse_space(params: Params, stage: int) -> SearchSpace:
    """Validate ``params.hpo.space`` for stage ``stage`` against the params tree.

    Raises :class:`ConfigError` naming the entry: an empty space, an unknown path, a path
    that is a section or a list (not a scalar), one of :data:`CONTROLLED`, another stage's
    key, a distribution type that does not fit the parameter, a range end or a choice that
    makes the params invalid on its own (e.g. a ``token_grid`` that does not divide the
    stage ``size``), or two templates naming the same parameter.
    """
    name = stage_name(params, stage)
    if not params.hpo.space:
        raise ConfigError("hpo.space is empty: nothing to search")
    tree = params.model_dump(mode="json")
    others = [s for s in params.stages if s != name]
    out: list[SearchParam] = []
    for template, dist in params.hpo.space.items():
        path = _expand(template, name)
        for ctl in CONTROLLED:
            if _under(path, ctl):
                raise ConfigError(f"hpo.space: {path}: set by the search itself ({ctl}); it cannot be searched")
        for other in others:
            if _under(path, f"stages.{other}"):
                raise ConfigError(
                    f"hpo.space: {path}: belongs to {other}, but this search tunes {name} (write stages.{{stage}}.… )"
                )
        current = _lookup(tree, path, "hpo.space")
        if isinstance(current, (Mapping, list)):
            raise ConfigError(f"hpo.space: {path}: not a scalar parameter (a {'section' if isinstance(current, Mapping) else 'list'})")
        _check_kind(path, dist, current)
        if path in (p.name for p in out):
            raise ConfigError(f"hpo.space: {path} is listed twice")
        sp = SearchParam(
            name=path, kind=dist.type, low=dist.low, high=dist.high, log=dist.log, step=dist.step,
            choices=tuple(dist.choices or ()), scoped=_under(path, f"stages.{name}"),
        )
        if sp.kind == "int":
            assert sp.low is not None and sp.high is not None
            sp = SearchParam(sp.name, "int", int(sp.low), int(sp.high), sp.log,
                             int(sp.step) if sp.step is not None else None, (), sp.scoped)
        probes = list(sp.choices) if sp.kind == "categorical" else [sp.low, sp.high]
        for v in probes:
            try:
                apply_config(params, stage, {path: v})
            except ConfigError as e:
                raise ConfigError(f"hpo.space: {path} = {v!r} gives invalid params ({e})") from None
        out.append(sp)
    return SearchSpace(stage=stage, stage_name=name, params=tuple(out))


def check_points(space: SearchSpace, points: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """``hpo.points`` with ``{stage}`` expanded; each key must be a searched parameter and
    each value a possible sample of its distribution (:class:`ConfigError` otherwise)."""
    out: list[dict[str, Any]] = []
    for i, pt in enumerate(points):
        row: dict[str, Any] = {}
        for key, value in pt.items():
            path = _expand(str(key), space.stage_name)
            if path not in space.names:
                raise ConfigError(f"hpo.points[{i}]: {path} is not in hpo.space ({', '.join(space.names)})")
            if not space[path].contains(value):
                raise ConfigError(f"hpo.points[{i}]: {path} = {value!r} is outside its distribution")
            row[path] = value
        out.append(row)
    return out


# --------------------------------------------------------------------------- trial params


def _conv_for_grid(size: int, token_grid: int, conv: Sequence[int]) -> list[int]:
    """``conv_channels`` with one entry per halving from ``size`` to ``token_grid`` (widths
    per resolution kept; extra levels double the last width)."""
    try:
        levels = token_levels(size, token_grid)
    except (ValueError, ZeroDivisionError):
        return list(conv)  # invalid grid: the params validation reports it
    out = list(conv[:levels])
    while len(out) < levels:
        out.append(out[-1] * 2 if out else 16)
    return out


def apply_config(params: Params, stage: int, config: Mapping[str, Any]) -> tuple[Params, dict[str, Any]]:
    """Params with a trial's ``{path: value}`` set (plus derived keys), validated.

    Returns ``(params, changed)``: ``changed`` = ``config`` plus the derived leaves (the
    stage's ``conv_channels`` whenever its ``token_grid`` is in ``config``), i.e. everything a
    params overlay needs to reproduce this trial over ``params``. Raises
    :class:`ConfigError` naming the config when the result is invalid.
    """
    name = stage_name(params, stage)
    tree = params.model_dump(mode="json")
    for path, value in config.items():
        _lookup(tree, path, "trial config")
        _set(tree, path, value)
    changed = dict(config)
    grid_key = f"stages.{name}.token_grid"
    conv_key = f"stages.{name}.conv_channels"
    if grid_key in config and conv_key not in config:
        st = tree["stages"][name]
        st["conv_channels"] = _conv_for_grid(int(st["size"]), int(st["token_grid"]), st["conv_channels"])
        changed[conv_key] = list(st["conv_channels"])
    shown = ", ".join(f"{k}={v!r}" for k, v in config.items())
    return params_from_dict(tree, f"trial config {{{shown}}}", type(params)), changed


def leaves(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """A nested mapping flattened to ``{dotted path: value}`` (lists are values)."""
    out: dict[str, Any] = {}
    for k, v in tree.items():
        if isinstance(v, Mapping) and v:
            out.update(leaves(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def carried_over(previous: Mapping[str, Any], params: Params, changed: Mapping[str, Any]) -> dict[str, Any]:
    """Leaves of a previous fragment (nested mapping) that the new one must keep: those in
    effect in ``params`` (same value) and not in ``changed``.

    The trials of a study run on the effective params, i.e. with the previous
    ``best_stageK.yaml`` applied; a key it set that the new study no longer searches was in
    effect for every trial, so the new fragment keeps it (otherwise replacing the file would
    silently drop it)."""
    tree = params.model_dump(mode="json")
    out: dict[str, Any] = {}
    for path, value in leaves(previous).items():
        if path in changed:
            continue
        try:
            current = _lookup(tree, path, "fragment")
        except ConfigError:
            continue
        if json.dumps(current) == json.dumps(value):
            out[path] = value
    return out


def trial_steps(params: Params, stage: int) -> int:
    """``hpo.steps`` of the stage (:class:`ConfigError` when it has no entry)."""
    name = stage_name(params, stage)
    try:
        return int(params.hpo.steps[name])
    except KeyError:
        raise ConfigError(f"hpo.steps has no entry for {name} (have {', '.join(params.hpo.steps) or 'none'})") from None


def validation_rounds(steps: int, val_every: int) -> int:
    """Validations in a trial of ``steps`` steps: every ``val_every`` steps and at the end."""
    return steps // val_every + (1 if steps % val_every else 0)


def trial_params(params: Params, stage: int, config: Mapping[str, Any], out_dir: str) -> tuple[Params, dict[str, Any]]:
    """The params of one trial: ``config`` applied (:func:`apply_config`), the stage trained for
    ``hpo.steps`` steps with validation every ``hpo.val_every`` steps, outputs in ``out_dir``."""
    name = stage_name(params, stage)
    tree = params.model_dump(mode="json")
    tree["train"]["steps"] = {**tree["train"]["steps"], name: trial_steps(params, stage)}
    tree["train"]["val_every"] = params.hpo.val_every
    tree["train"]["out_dir"] = str(out_dir)
    base = params_from_dict(tree, "trial params", type(params))
    return apply_config(base, stage, config)


def check_metric(params: Params) -> None:
    """``hpo.metric`` must be a validation metric the training loop reports."""
    from xct_core.metrics import METRIC_KEYS

    m = params.hpo.metric
    if m not in METRIC_KEYS and not m.startswith("reproj_"):
        raise ConfigError(f"hpo.metric {m!r} is not a validation metric ({', '.join(METRIC_KEYS)})")
    if m.startswith("reproj_") and not params.train.val_reprojection:
        raise ConfigError(f"hpo.metric {m!r} needs train.val_reprojection: true")


# --------------------------------------------------------------------------- fragment


def fragment(changed: Mapping[str, Any]) -> dict[str, Any]:
    """Nested params overlay from ``{dotted path: value}`` (e.g. the best trial's changes)."""
    out: dict[str, Any] = {}
    for path in sorted(changed):
        node = out
        parts = path.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = changed[path]
    return out


def fragment_yaml(changed: Mapping[str, Any], header: Sequence[str] = ()) -> str:
    """The fragment as YAML text with ``header`` lines as ``#`` comments (``{}`` when empty)."""
    lines = [f"# {h}".rstrip() for h in header]
    body = yaml.safe_dump(fragment(changed), sort_keys=True, default_flow_style=False) if changed else "{}\n"
    return "\n".join(lines) + ("\n" if lines else "") + body
