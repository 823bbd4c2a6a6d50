"""Skip-after-failed-gate guard: run a pipeline step only when the previous stage's gate passed.

In the DVC pipeline (dvc.yaml) every step after gate K-1 runs through this wrapper::

    python -m components.guard --after-gate reports/gates/stage1.json \\
        --out outputs/train/models/stage2 --out outputs/train/metrics/stage2.json \\
        -- python -m components.train --stage 2 ...

- gate report says ``"passed": true`` → the command after ``--`` runs unchanged; the guard
  exits with its exit code (the step's own logic lives in one place, its module).
- gate failed, or was itself skipped → the command does NOT run; every ``--out`` is written
  as a small "skipped" marker so DVC finds the stage outputs it declared, and the guard
  exits 0 (a pipeline that stops at a failing gate is a completed, rejected run).
- gate report missing or unreadable → :class:`InputError`, exit 2 (an error, not a skip).

Markers (written atomically): an ``--out`` with a file suffix is a file — ``.json`` gets
the marker below, ``.csv`` a one-row ``skipped,reason`` table, anything else one text
line; an ``--out`` without a suffix is a folder holding ``SKIPPED.json``. Marker::

    {"skipped": true, "passed": false, "stage": K, "reason": "...", "after_gate": "..."}

``passed: false`` makes a skipped gate report read as "not passed", so the skip cascades
to every later stage; :func:`gate_passed` understands both real gate reports
(:meth:`xct_core.gates.GateReport.to_dict`) and these markers.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from xct_core.errors import InputError, XctError
from xct_core.gates import read_gate_report

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


def run_guarded(after_gate: str | Path, outs: list[str | Path], command: list[str],
                stage: int | None = None, log: Any = print) -> int:
    """Run ``command`` if the gate at ``after_gate`` passed, else write skip markers.

    Returns the command's exit code, or 0 when skipped.
    """
    if not command:
        raise InputError(None, "no command given after '--'")
    verdict = read_gate(after_gate)
    if verdict.passed:
        return subprocess.call(command)
    reason = verdict.reason if verdict.skipped else f"gate not passed: {verdict.reason}"
    write_skipped(outs, reason, stage=stage, after_gate=after_gate)
    what = f"stage {stage}" if stage is not None else "step"
    log(f"guard: {what} skipped ({reason}); wrote {len(outs)} skip marker(s)")
    return 0


def main(argv: list[str] | None = None) -> int:
    """``python -m components.guard --after-gate GATE.json [--stage K] [--out PATH ...] -- CMD ...``."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--" in argv:
        i = argv.index("--")
        own, command = argv[:i], argv[i + 1:]
    else:
        own, command = argv, []
    ap = argparse.ArgumentParser(prog="python -m components.guard", description=__doc__.splitlines()[0])
    ap.add_argument("--after-gate", required=True, type=Path, help="gate report of the previous stage")
    ap.add_argument("--stage", type=int, default=None, help="stage this step belongs to (recorded in markers)")
    ap.add_argument("--out", action="append", default=[], type=Path,
                    help="declared output to mark as skipped (repeatable; *.json = file, else folder)")
    args = ap.parse_args(own)
    try:
        return run_guarded(args.after_gate, args.out, command, stage=args.stage)
    except XctError as e:
        print(f"guard: error: {e}", file=sys.stderr)
        return e.exit_code


if __name__ == "__main__":
    sys.exit(main())
