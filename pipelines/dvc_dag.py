"""The stage-dependent lines of dvc.yaml, written from params (``xct pipeline dvc-sync``).

dvc.yaml writes the cascade steps once (``train``, ``evaluate``, ``gate``: a ``foreach``
over the ``cascade`` variable) and register depends on whole folders, so the stage count
lives in params alone — except for what DVC's templating cannot compute: stage K's
predecessor (there is no arithmetic in ``${…}``, so ``stage{K-1}`` is spelled out per stage)
and the grid keys preprocess depends on (a list cannot be interpolated into ``params:``).
Those two blocks sit between marker comments and are written here from ``params.stages``:

- ``cascade`` (under ``vars:``): ``stageK: {k: K, after_models: …, after_gate: …}`` — what
  stage K waits for besides the data (stage K-1's models and gate; stage 1: the data again);
- ``params <step>`` (each step's ``params:`` list): the keys the step reads, from the ONE
  declaration in components/step_params.py (the KFP DAG hands each task the same keys), with
  preprocess's grid keys ``stages.stageK.size`` / ``stages.stageK.fov_mm`` per stage.

Each stage's training and evaluation also depend on its tuned overlay ``hpo/best_stageK.yaml``
as a whole file (it must exist): :func:`sync_dvc_yaml` writes an empty one (``{}``) where a
stage has none yet. Adding a stage = its entries in params.yaml (``stages``, ``gates``,
``train.steps``, …) + ``xct pipeline dvc-sync``; tests/test_dvc_pipeline.py fails while
dvc.yaml is out of date with the repo's params.yaml.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from components.step_params import NOTES, OVERLAY, STEP_PARAMS, dvc_entries
from xct_core.atomic import write_text_atomic
from xct_core.config import Params
from xct_core.errors import InputError

#: the generated blocks, each between ``# BEGIN <name> …`` and ``# END <name>`` comment lines
BLOCKS = ("cascade", *(f"params {step}" for step in STEP_PARAMS))
_NOTE = "written by `xct pipeline dvc-sync` from params `stages`; do not edit by hand"
_PARAMS_NOTE = "written by `xct pipeline dvc-sync` from components/step_params.py; do not edit by hand"
#: the tuned overlay of each stage (``xct hpo --stage K``), a whole-file param in dvc.yaml
HPO_OVERLAY = OVERLAY.replace("{stage}", "{name}")


def cascade_lines(params: Params) -> list[str]:
    """The ``cascade`` variable: one line per stage (stage 1 waits for the data only)."""
    lines = ["- cascade:"]
    prev = None
    for st in params.stage_list():
        models = f"outputs/train/models/{prev}" if prev else "data/processed"
        gate = f"reports/gates/{prev}.json" if prev else "data/processed"
        lines.append(f"    {st.name}: {{k: {st.k}, after_models: {models}, after_gate: {gate}}}")
        prev = st.name
    return lines


def params_lines(step: str, params: Params) -> list[str]:
    """dvc.yaml's ``params:`` list of ``step`` (components/step_params.py), one key a line."""
    lines = []
    for entry in dvc_entries(step, list(params.stages)):
        key = entry[0] if isinstance(entry, tuple) else entry
        line = f"- {key}:" if isinstance(entry, tuple) else f"- {key}"
        note = NOTES.get((step, key.replace("${key}", "{stage}")))
        lines.append(f"{line}  # {note}" if note else line)
    return lines


def _replace_block(text: str, name: str, body: list[str], source: str, note: str = _NOTE) -> str:
    lines = text.split("\n")
    starts = [i for i, ln in enumerate(lines) if (ln.strip() + " ").startswith(f"# BEGIN {name} ")]
    ends = [i for i, ln in enumerate(lines) if ln.strip() == f"# END {name}"]
    if len(starts) != 1 or len(ends) != 1 or ends[0] < starts[0]:
        raise InputError(source, f"needs one '# BEGIN {name} …' … '# END {name}' block (found {len(starts)} / {len(ends)})")
    indent = lines[starts[0]][: len(lines[starts[0]]) - len(lines[starts[0]].lstrip())]
    new = [f"{indent}# BEGIN {name} ({note})", *(indent + b for b in body), f"{indent}# END {name}"]
    return "\n".join(lines[: starts[0]] + new + lines[ends[0] + 1:])


def synced_text(text: str, params: Params, source: str = "dvc.yaml") -> str:
    """``text`` (a dvc.yaml) with its generated blocks written from ``params``."""
    text = _replace_block(text, "cascade", cascade_lines(params), source)
    for step in STEP_PARAMS:
        text = _replace_block(text, f"params {step}", params_lines(step, params), source, _PARAMS_NOTE)
    return text


@dataclass(frozen=True)
class SyncResult:
    path: Path
    changed: bool  #: dvc.yaml was (or, with ``check``, would be) rewritten
    overlays: tuple[Path, ...]  #: the empty hpo overlays written (or missing, with ``check``)


def sync_dvc_yaml(path: str | Path, params: Params, *, check: bool = False) -> SyncResult:
    """Write dvc.yaml's generated blocks and the missing ``hpo/best_stageK.yaml`` (``{}``) from
    ``params``, atomically; ``check``: write nothing, only say what is out of date."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise InputError(path, f"cannot read dvc.yaml ({e.strerror or e})") from None
    new = synced_text(text, params, str(path))
    missing = tuple(path.parent / HPO_OVERLAY.format(name=name) for name in params.stages
                    if not (path.parent / HPO_OVERLAY.format(name=name)).is_file())
    if not check:
        if new != text:
            write_text_atomic(path, new)
        for f in missing:
            k = params.stage(f.stem.removeprefix("best_")).k
            write_text_atomic(f, f"# Tuned params overlay for stage {k}, written by `xct hpo --stage {k}` (none yet);\n"
                                 "# merged over params.yaml through its `overlays:` list. `{}` = no tuned values.\n{}\n")
    return SyncResult(path, new != text, missing)
