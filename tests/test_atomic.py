"""The one atomic writer (xct_core/atomic.py) and the one JSON-document reader (xct_core/jsondoc.py)."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest
import torch

from xct_core.atomic import atomic_dir, atomic_path, file_mode, folder_mode, write_json_atomic, write_text_atomic
from xct_core.checkpoint import atomic_torch_save, save_state
from xct_core.errors import InputError
from xct_core.jsondoc import json_text, read_json_doc


def _mode(p: Path) -> int:
    return stat.S_IMODE(p.stat().st_mode)


@pytest.fixture()
def umask_022():
    old = os.umask(0o022)
    try:
        yield
    finally:
        os.umask(old)


def test_atomic_path_renames_only_on_success(tmp_path: Path) -> None:
    target = tmp_path / "out.txt"
    target.write_text("old")
    with pytest.raises(RuntimeError), atomic_path(target) as tmp:
        tmp.write_text("half")
        raise RuntimeError("writer failed")
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["out.txt"]  # no temp file left behind
    with atomic_path(target, ".txt") as tmp:
        assert tmp.parent == tmp_path and tmp.name.startswith(".out.txt.") and tmp.name.endswith(".txt")
        tmp.write_text("new")
    assert target.read_text() == "new"


def test_every_writer_gives_umask_derived_modes(tmp_path: Path, umask_022) -> None:
    """mkstemp creates 0600; the project's outputs must be 0644 / folders 0755 under umask 022
    (exported models and checkpoints used to be 0600 / 0700)."""
    assert file_mode() == 0o644 and folder_mode() == 0o755
    assert _mode(write_text_atomic(tmp_path / "a.txt", "x")) == 0o644
    assert _mode(atomic_torch_save({"w": torch.zeros(2)}, tmp_path / "m" / "best.pt")) == 0o644
    ck = save_state(tmp_path / "ckpts", 25, {"format": "x", "step": 25})
    assert _mode(ck) == 0o755 and _mode(ck / "state.pt") == 0o644
    with atomic_dir(tmp_path / "d") as d:
        (d / "f").write_text("1")
    assert _mode(tmp_path / "d") == 0o755


def test_atomic_dir_replaces_an_existing_folder(tmp_path: Path) -> None:
    target = tmp_path / "step_00000001"
    target.mkdir()
    (target / "old").write_text("1")
    with atomic_dir(target) as d:
        (d / "new").write_text("2")
    assert sorted(p.name for p in target.iterdir()) == ["new"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_00000001"]


def test_unwritable_target_is_a_one_line_input_error(tmp_path: Path) -> None:
    blocker = tmp_path / "f.npy"
    blocker.write_text("a file, not a folder")
    with pytest.raises(InputError, match="parent of this path is a file"):
        write_text_atomic(blocker / "x.json", "{}")
    with pytest.raises(InputError, match="parent of this path is a file"):
        atomic_torch_save({}, blocker / "m.pt")


def test_json_text_is_deterministic_and_has_no_nan(tmp_path: Path) -> None:
    import numpy as np

    doc = {"b": float("nan"), "a": np.float32(1.5), "c": (1, np.int64(2)), "d": np.arange(2)}
    text = json_text(doc)
    assert text == '{\n  "a": 1.5,\n  "b": null,\n  "c": [\n    1,\n    2\n  ],\n  "d": [\n    0,\n    1\n  ]\n}\n'
    write_json_atomic(tmp_path / "d.json", doc)
    assert json.loads((tmp_path / "d.json").read_text())["b"] is None


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (None, "gate report not found (run the gate step first)"),
        ("{not json", "gate report is not valid JSON"),
        ("[1, 2]", "gate report must hold a JSON object, got list"),
        ('{"stage": 1}', "not a valid gate report (missing 'passed')"),
    ],
)
def test_read_json_doc_names_the_file_and_the_problem(tmp_path: Path, content: str | None, message: str) -> None:
    p = tmp_path / "stage1.json"
    if content is not None:
        p.write_text(content)
    with pytest.raises(InputError) as e:
        read_json_doc(p, "gate report", missing_hint="run the gate step first", required=("passed",))
    assert str(e.value).startswith(f"{p}: ") and message in str(e.value)
    assert "\n" not in str(e.value)


def test_read_json_doc_returns_the_object(tmp_path: Path) -> None:
    p = tmp_path / "m.json"
    p.write_text('{"passed": true, "stage": 2}')
    assert read_json_doc(p, "gate report", required=("passed", "stage")) == {"passed": True, "stage": 2}
