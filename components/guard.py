"""Skip-after-failed-gate guard: run a stage-K pipeline step only when gate K-1 passed.

In the DVC pipeline (dvc.yaml) the stage steps take ``--gates reports/gates``
(``xct train``, ``xct step evaluate``, ``xct step gate``) and ask :func:`proceed` first:

- stage 1, or gate K-1 says ``"passed": true`` → the step runs;
- gate K-1 failed, or was itself skipped → the step does NOT run; each of its declared
  outputs (the step knows them from :mod:`xct_core.layout`) is written as a small "skipped"
  marker so DVC finds the outputs it declared, and the command exits 0;
- gate report missing or unreadable → :class:`InputError`, exit 2 (an error, not a skip).

Markers (written atomically): an output with a file suffix is a file — ``.json`` gets the
marker below, ``.csv`` a one-row ``skipped,reason`` table, anything else one text line; an
output without a suffix is a folder holding ``SKIPPED.json``. Marker::

    {"skipped": true, "passed": false, "stage": K, "reason": "...", "after_gate": "..."}

``passed: false`` makes a skipped gate report read as "not passed", so the skip cascades
to every later stage; :func:`gate_passed` understands both real gate reports
(:meth:`xct_core.gates.GateReport.to_dict`) and these markers.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from xct_core.errors import InputError
from xct_core.gates import read_gate_report
from xct_core.layout import ReportLayout

#: file written inside a skipped output folder
MARKER_NAME = "SKIPPED.json"


@dataclass(frozen=True)
class GateVerdict:
    """What a gate report says: ``passed`` and, when not, a one-line ``reason``."""

    passed: bool
    reason: str
    skipped: bool = False  #: the gate itself was skipped (an earlier gate failed)


def read_gate(path: str | Path) -> GateVerdict:
    """Read a gate report (or a skip marker) written at ``path``.

    Raises :class:`InputError` when the file is missing, not JSON, or has no boolean
    ``passed`` field — a guard never treats a broken report as a pass or a skip.
    """
    p = Path(path)
    doc = read_gate_report(p)
    if doc["passed"]:
        return GateVerdict(True, "")
    if doc.get("skipped"):
        return GateVerdict(False, str(doc.get("reason") or f"{p} was skipped"), skipped=True)
    summary = doc.get("summary") or f"gate {p} failed"
    return GateVerdict(False, str(summary))


def gate_passed(path: str | Path) -> bool:
    """True when the gate report at ``path`` passed (see :func:`read_gate`)."""
    return read_gate(path).passed


from xct_core.atomic import write_text_atomic as _write_text_atomic  # noqa: E402


def marker(reason: str, stage: int | None = None, after_gate: str | Path | None = None) -> dict[str, Any]:
    """The content of a skip marker (also a valid "not passed" gate report)."""
    doc: dict[str, Any] = {"skipped": True, "passed": False, "reason": reason}
    if stage is not None:
        doc["stage"] = stage
        doc["summary"] = f"stage {stage}: skipped — {reason}"
    if after_gate is not None:
        doc["after_gate"] = str(after_gate)
    return doc


def write_skipped(outs: list[str | Path], reason: str, stage: int | None = None,
                  after_gate: str | Path | None = None) -> list[Path]:
    """Write a skip marker for every declared output; returns the marker files written.

    Outputs with a file suffix become marker files (``.json``: the marker document,
    ``.csv``: ``skipped,reason``, else a text line); others become a folder with
    :data:`MARKER_NAME`. A declared folder that exists as a file (or a ``.json`` output
    that is a folder) is an :class:`InputError`, never silently replaced.
    """
    doc = marker(reason, stage, after_gate)
    written: list[Path] = []
    for out in outs:
        p = Path(out)
        if p.suffix:  # a file output
            if p.is_dir():
                raise InputError(p, "declared as a file output but is a folder")
            if p.suffix == ".json":
                text = json.dumps(doc, indent=2, sort_keys=True) + "\n"
            elif p.suffix == ".csv":
                text = "skipped,reason\ntrue," + json.dumps(reason) + "\n"
            else:
                text = f"skipped: {reason}\n"
            _write_text_atomic(p, text)
            written.append(p)
        else:  # a folder output
            if p.exists() and not p.is_dir():
                raise InputError(p, "declared as an output folder but is a file")
            _write_text_atomic(p / MARKER_NAME, json.dumps(doc, indent=2, sort_keys=True) + "\n")
            written.append(p / MARKER_NAME)
    return written


def previous_gate(gates_dir: str | Path, stage: int) -> Path | None:
    """The gate report stage ``stage`` waits for: ``gates_dir/stage{K-1}.json`` (the
    :class:`xct_core.layout.ReportLayout` name); ``None`` for stage 1, which always runs."""
    return Path(gates_dir) / ReportLayout.gate_file(stage - 1) if stage > 1 else None


def proceed(gates_dir: str | Path | None, stage: int, outs: list[str | Path], log: Any = print) -> bool:
    """Should stage ``stage``'s step run? ``True`` when there is no gate to wait for (stage 1,
    or ``gates_dir`` is ``None``) or the previous stage's gate passed; otherwise every declared
    output in ``outs`` becomes a skip marker and the answer is ``False`` (the step exits 0: a
    pipeline that stops at a failing gate is a completed, rejected run). A missing or broken
    previous gate report is an :class:`InputError`, never a pass or a skip."""
    gate = previous_gate(gates_dir, stage) if gates_dir is not None else None
    if gate is None:
        return True
    verdict = read_gate(gate)
    if verdict.passed:
        return True
    reason = verdict.reason if verdict.skipped else f"gate not passed: {verdict.reason}"
    write_skipped(outs, reason, stage=stage, after_gate=gate)
    log(f"stage {stage} skipped ({reason}); wrote {len(outs)} skip marker(s)")
    return False
