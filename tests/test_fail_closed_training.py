"""Training fails closed (issue 24 items 3, 5 and 8): a damaged checkpoint is never resumed
silently, one output folder has one run at a time, SIGTERM ends a run cleanly, a full disk
while checkpointing is one line.

The tiny 16³ stage of tests/train_fixtures.py; one uninterrupted 6-step reference run
(checkpoints at steps 4 and 6, ``keep_last: 2``) that each test copies. Damage is done the
way a disk or a copy does it: 64 bytes flipped in the middle of the largest tensor of the
newest ``state.pt`` (``torch.load`` still loads that file: the zip's CRCs are not checked),
or the file cut in half."""

from __future__ import annotations

import json
import os
import re
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

import pytest
import torch
import yaml

from train_fixtures import REPO, build_processed, tiny_params
from xct_core.checkpoint import DIGEST_FILE, STATE_FILE, latest_checkpoint, list_checkpoints, load_state
from xct_core.errors import InputError
from xct_core.training import Checkpointer, RunLayout, TrainHooks, TrainingFailed, train_stage

pytestmark = pytest.mark.timeout(600)


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> dict:
    root = tmp_path_factory.mktemp("failclosed")
    params = tiny_params()
    processed = build_processed(root, params)
    out = root / "ref"
    train_stage(params, 1, processed, out, device="cpu")
    pfile = root / "params.yaml"
    pfile.write_text(yaml.safe_dump(params.model_dump(mode="json")))
    return {"root": root, "params": params, "processed": processed, "out": out, "pfile": pfile}


def _copy(setup: dict, dst: Path) -> RunLayout:
    shutil.copytree(setup["out"], dst)
    lay = RunLayout(dst, 1)
    assert [s for s, _ in list_checkpoints(lay.checkpoints)] == [4, 6]
    return lay


def _flip_tensor_bytes(state_pt: Path, n: int = 64) -> str:
    """Flip ``n`` bytes in the middle of the largest tensor record of a torch zip file."""
    with zipfile.ZipFile(state_pt) as z:
        info = max((i for i in z.infolist() if "/data/" in i.filename), key=lambda i: i.file_size)
    raw = bytearray(state_pt.read_bytes())
    off = info.header_offset
    data = off + 30 + int.from_bytes(raw[off + 26:off + 28], "little") + int.from_bytes(raw[off + 28:off + 30], "little")
    start = data + info.file_size // 2 - n // 2
    assert info.file_size > 4 * n and start + n <= data + info.file_size
    for i in range(start, start + n):
        raw[i] ^= 0xFF
    state_pt.write_bytes(bytes(raw))
    return info.filename


def _truncate(state_pt: Path) -> None:
    raw = state_pt.read_bytes()
    state_pt.write_bytes(raw[: len(raw) // 2])


def _checkpointer(lay: RunLayout, warnings: list[str], policy: str = "fallback") -> Checkpointer:
    return Checkpointer(lay, 2, "compat", True, on_corrupt=policy, warn=warnings.append)


def _env(**extra: str) -> dict[str, str]:
    env = {**os.environ, "TQDM_DISABLE": "1", **extra}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), *([env["PYTHONPATH"]] if env.get("PYTHONPATH") else [])])
    return env


def _xct_train(setup: dict, out: Path, *args: str) -> list[str]:
    return [sys.executable, "-m", "pipelines.cli", "train", "--stage", "1", "--processed", str(setup["processed"]),
            "--out", str(out), "--params", str(setup["pfile"]), *args]


def _leftovers(root: Path) -> list[str]:
    """Temporary files or folders of an interrupted atomic write."""
    return [str(p) for p in root.rglob("*") if p.name.startswith((".tmp-", ".old-")) or p.name.endswith(".tmp")]


def _wait_for(path: Path, proc: subprocess.Popen, log: Path, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert proc.poll() is None, f"run ended early (rc {proc.returncode}):\n{log.read_text()[-3000:]}"
        assert time.monotonic() < deadline, f"no {path.name} in {timeout:.0f} s:\n{log.read_text()[-3000:]}"
        time.sleep(0.2)


# --------------------------------------------------------------------------- digests (item 3)


def test_state_carries_a_sha256sum_digest_that_catches_what_torch_load_does_not(setup: dict, tmp_path: Path) -> None:
    lay = _copy(setup, tmp_path / "o")
    d = lay.checkpoints / "step_00000006"
    assert (d / DIGEST_FILE).is_file()
    ok = subprocess.run(["sha256sum", "-c", DIGEST_FILE], cwd=d, capture_output=True, text=True)
    assert ok.returncode == 0 and f"{STATE_FILE}: OK" in ok.stdout
    _flip_tensor_bytes(d / STATE_FILE)
    state = torch.load(d / STATE_FILE, weights_only=True)  # the damage is invisible to torch …
    assert state["step"] == 6
    assert subprocess.run(["sha256sum", "-c", DIGEST_FILE], cwd=d, capture_output=True).returncode != 0
    with pytest.raises(InputError) as ei:  # … not to xct
        load_state(d)
    assert str(ei.value).startswith(f"{d / STATE_FILE}: corrupted checkpoint") and DIGEST_FILE in str(ei.value)


def test_flipped_bytes_in_newest_checkpoint_resume_from_the_older_one(setup: dict, tmp_path: Path) -> None:
    """The damaged step 6 is reported in one warning and moved aside; the run resumes at
    step 4 and ends with the weights of the undamaged reference run (per-step seeding)."""
    lay = _copy(setup, tmp_path / "o")
    newest = lay.checkpoints / "step_00000006" / STATE_FILE
    _flip_tensor_bytes(newest)
    warnings: list[str] = []
    res = train_stage(setup["params"], 1, setup["processed"], lay.out_dir, device="cpu",
                      hooks=TrainHooks(warn=warnings.append))
    assert res.start_step == 4 and res.final_step == 6 and res.steps_run == 2
    assert res.resumed_from is not None and res.resumed_from.endswith("step_00000004")
    assert len(warnings) == 1 and "\n" not in warnings[0], warnings
    assert warnings[0].startswith(f"{newest}: corrupted checkpoint") and "step_00000004 (step 4) instead" in warnings[0]
    assert (lay.checkpoints / "corrupt-step_00000006" / STATE_FILE).is_file()  # kept for inspection
    ref = torch.load(RunLayout(setup["out"], 1).checkpoints / "step_00000006" / STATE_FILE, weights_only=True)
    new = load_state(lay.checkpoints / "step_00000006")
    for part in ("model", "ema"):
        for key, t in ref["learners"]["diffusion"][part].items():
            torch.testing.assert_close(new["learners"]["diffusion"][part][key], t, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("damage", ["truncated", "truncated_without_digest", "garbled_digest"])
def test_other_damage_to_the_newest_checkpoint_also_falls_back(setup: dict, tmp_path: Path, damage: str) -> None:
    lay = _copy(setup, tmp_path / "o")
    d6 = lay.checkpoints / "step_00000006"
    if damage.startswith("truncated"):
        _truncate(d6 / STATE_FILE)
    if damage == "truncated_without_digest":  # a checkpoint of a run before digests were kept
        (d6 / DIGEST_FILE).unlink()
    if damage == "garbled_digest":
        (d6 / DIGEST_FILE).write_text("not a digest\n")
    warnings: list[str] = []
    state, path = _checkpointer(lay, warnings).pick(None, fresh=False)
    assert state is not None and state["step"] == 4 and path is not None and path.endswith("step_00000004")
    assert len(warnings) == 1 and "step_00000006" in warnings[0] and "resuming from" in warnings[0], warnings
    assert [s for s, _ in list_checkpoints(lay.checkpoints)] == [4]  # step 6 moved aside, never picked again


def test_fail_policy_refuses_a_damaged_checkpoint_in_one_line(setup: dict, tmp_path: Path,
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    from pipelines.cli import main as xct

    lay = _copy(setup, tmp_path / "o")
    newest = lay.checkpoints / "step_00000006" / STATE_FILE
    _flip_tensor_bytes(newest)
    damaged = newest.read_bytes()
    data = setup["params"].model_dump(mode="json")
    data["train"]["on_corrupt_checkpoint"] = "fail"
    pfile = tmp_path / "fail.yaml"
    pfile.write_text(yaml.safe_dump(data))
    final_before = lay.model("final").read_bytes()
    with pytest.raises(SystemExit) as ei:
        xct(["train", "--local", "--stage", "1", "--processed", str(setup["processed"]), "--out", str(lay.out_dir),
             "--params", str(pfile), "--steps", "8", "--device", "cpu"])
    err = capsys.readouterr().err.strip().splitlines()
    assert ei.value.code == 2 and len(err) == 1, err
    assert f"{newest}: corrupted checkpoint" in err[0] and "on_corrupt_checkpoint: fail" in err[0]
    assert newest.read_bytes() == damaged  # nothing moved or rewritten
    assert [s for s, _ in list_checkpoints(lay.checkpoints)] == [4, 6]
    assert lay.model("final").read_bytes() == final_before


def test_no_intact_checkpoint_is_refused_not_restarted_from_scratch(setup: dict, tmp_path: Path) -> None:
    lay = _copy(setup, tmp_path / "o")
    _flip_tensor_bytes(lay.checkpoints / "step_00000006" / STATE_FILE)
    _truncate(lay.checkpoints / "step_00000004" / STATE_FILE)
    warnings: list[str] = []
    with pytest.raises(TrainingFailed) as ei:
        _checkpointer(lay, warnings).pick(None, fresh=False)
    msg = str(ei.value)
    assert "no intact checkpoint to resume from (2 damaged" in msg and "--fresh" in msg and "\n" not in msg


def test_checkpoint_without_a_digest_loads_with_an_unverified_warning(setup: dict, tmp_path: Path) -> None:
    lay = _copy(setup, tmp_path / "o")
    (lay.checkpoints / "step_00000006" / DIGEST_FILE).unlink()
    warnings: list[str] = []
    state, path = _checkpointer(lay, warnings).pick(None, fresh=False)
    assert state is not None and state["step"] == 6
    assert len(warnings) == 1 and "unverified" in warnings[0] and "step_00000006" in warnings[0]


def test_damaged_engine_checkpoint_falls_back_to_the_local_one(setup: dict, tmp_path: Path) -> None:
    """Ray hands the loop its copy of the newest checkpoint (``resume_from``); damaged, the
    local checkpoint of the same step is used, and the engine's copy is left where it is."""
    lay = _copy(setup, tmp_path / "o")
    engine = tmp_path / "ray" / "step_00000006"
    shutil.copytree(lay.checkpoints / "step_00000006", engine)
    _flip_tensor_bytes(engine / STATE_FILE)
    warnings: list[str] = []
    state, path = _checkpointer(lay, warnings).pick(engine, fresh=False)
    assert state is not None and state["step"] == 6 and path == str(lay.checkpoints / "step_00000006")
    assert len(warnings) == 1 and warnings[0].startswith(f"{engine / STATE_FILE}: corrupted checkpoint")
    assert engine.is_dir()


# --------------------------------------------------------------------------- lock + SIGTERM (item 5)


def test_second_run_on_a_folder_is_refused_and_sigterm_stops_the_first_cleanly(setup: dict, tmp_path: Path) -> None:
    """`xct train --local` (slowed to 1 s/step): a second run on its folder exits 1 with one
    line naming the folder and the first run's pid; SIGTERM then ends the first with 143, one
    line, no traceback, its newest checkpoint intact and the folder free again."""
    from xct_core.training import folder_lock

    out = tmp_path / "o"
    log = tmp_path / "first.log"
    with open(log, "w") as fh:
        first = subprocess.Popen(_xct_train(setup, out, "--local", "--device", "cpu", "--steps", "60"), cwd=REPO,
                                 env=_env(XCT_TRAIN_FAULTS=json.dumps({"slow_step_s": 1.0})), stdout=fh,
                                 stderr=subprocess.STDOUT)
    try:
        _wait_for(RunLayout(out, 1).checkpoints / "step_00000002", first, log, 180)
        second = subprocess.run(_xct_train(setup, out, "--local", "--device", "cpu", "--steps", "60"), cwd=REPO,
                                env=_env(), capture_output=True, text=True, timeout=120)
        err = second.stderr.strip().splitlines()
        assert second.returncode == 1 and len(err) == 1, second.stderr
        assert str(out) in err[0] and f"pid {first.pid}" in err[0] and "another `xct train`" in err[0]
        os.kill(first.pid, signal.SIGTERM)
        rc = first.wait(timeout=60)
    finally:
        if first.poll() is None:
            first.kill()
            first.wait(timeout=30)
    text = log.read_text()
    lines = text.strip().splitlines()
    assert rc == 143, text
    assert len(lines) == 1 and "stopped by SIGTERM" in lines[0] and "is intact" in lines[0], text
    last = latest_checkpoint(RunLayout(out, 1).checkpoints)
    assert last is not None and str(last[1]) in lines[0]
    assert load_state(last[1])["step"] == last[0]  # digest verified
    assert not _leftovers(out)
    with folder_lock(RunLayout(out, 1).train_lock):  # released
        pass


def test_run_train_refuses_a_locked_folder_before_starting_ray(setup: dict, tmp_path: Path) -> None:
    from components.train import run_train
    from xct_core.training import folder_lock

    out = tmp_path / "o"
    with folder_lock(RunLayout(out, 1).train_lock):
        with pytest.raises(TrainingFailed) as ei:
            run_train(setup["params"], 1, setup["processed"], out, tracking=False, progress=False)
    assert f"{out}: another `xct train` (pid {os.getpid()}" in str(ei.value)
    assert not (out / "ray").exists()


@pytest.mark.slow
def test_sigterm_on_a_ray_mode_train_marks_the_mlflow_run_killed(setup: dict) -> None:
    """Ray mode (the driver starts a local Ray runtime): SIGTERM after the first checkpoint →
    exit 143, no traceback or C++ stack dump, one error line, the MLflow run KILLED in its
    sqlite store, the newest checkpoint intact."""
    mlflow = pytest.importorskip("mlflow")
    pytest.importorskip("ray")
    root = Path(tempfile.mkdtemp(prefix="xt-", dir="/tmp"))  # Ray's socket paths are length-limited
    try:
        out, db = root / "o", root / "mlflow.db"
        env = _env(RAY_TMPDIR=str(root / "ray"), MLFLOW_TRACKING_URI=f"sqlite:///{db}",
                   XCT_TRAIN_FAULTS=json.dumps({"slow_step_s": 1.0}))
        env.pop("RAY_ADDRESS", None)
        log = root / "driver.log"
        with open(log, "w") as fh:
            proc = subprocess.Popen(_xct_train(setup, out, "--steps", "60"), cwd=REPO, env=env, stdout=fh,
                                    stderr=subprocess.STDOUT)
        try:
            _wait_for(RunLayout(out, 1).checkpoints / "step_00000002", proc, log, 300)
            os.kill(proc.pid, signal.SIGTERM)
            rc = proc.wait(timeout=120)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait(timeout=30)
        text = log.read_text()
        assert rc == 143, text[-3000:]
        assert "SIGTERM received" not in text and "Fatal Python error" not in text, text[-3000:]  # no C++ stack dump
        # the driver's own lines (Ray forwards its actors' logs as "(Name pid=N) …"; on a machine
        # shared with other Ray instances its placement-group cleaner may log its own traceback)
        driver = [ln for ln in text.splitlines() if not re.match(r"^(\x1b\[[0-9;]*m)?\(\w+ pid=\d+", ln)]
        assert not [ln for ln in driver if "Traceback" in ln], text[-3000:]
        errors = [ln for ln in driver if ln.startswith("xct: error:")]
        assert len(errors) == 1 and "stopped by SIGTERM" in errors[0] and "marked KILLED" in errors[0], text[-3000:]
        run_id = json.loads(RunLayout(out, 1).mlflow_state.read_text())["run_id"]
        run = mlflow.MlflowClient(tracking_uri=f"sqlite:///{db}").get_run(run_id)
        assert run.info.status == "KILLED" and "SIGTERM" in run.data.tags["xct.failure"]
        last = latest_checkpoint(RunLayout(out, 1).checkpoints)
        assert last is not None and load_state(last[1])["step"] == last[0]
    finally:
        shutil.rmtree(root, ignore_errors=True)


# --------------------------------------------------------------------------- disk full (item 8)


def _file_size_limit(limit: int):
    def apply() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    return apply


def test_disk_full_while_checkpointing_is_one_line_and_keeps_the_last_checkpoint(setup: dict, tmp_path: Path) -> None:
    """``ulimit -f 300`` (RLIMIT_FSIZE 300 KiB: a model export fits, a ~650 KB training state
    does not): continuing the reference run to step 8 fails writing checkpoint 8 with one
    line naming it and the last good one; step 6 stays the newest, intact; no temp files."""
    lay = _copy(setup, tmp_path / "o")
    proc = subprocess.run(_xct_train(setup, lay.out_dir, "--local", "--device", "cpu", "--steps", "8"), cwd=REPO,
                          env=_env(), capture_output=True, text=True, timeout=300,
                          preexec_fn=_file_size_limit(300 * 1024))
    err = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(err) == 1, proc.stderr[-3000:]
    assert f"{lay.checkpoints / 'step_00000008' / STATE_FILE}: cannot write (File too large)" in err[0]
    assert "last good one: " in err[0] and "step_00000006 (step 6)" in err[0]
    assert [s for s, _ in list_checkpoints(lay.checkpoints)] == [4, 6]
    assert load_state(lay.checkpoints / "step_00000006")["step"] == 6
    assert not _leftovers(lay.out_dir)
