"""Training checkpoints and exported stage models: atomic writes, ``weights_only`` loads.

Everything written here loads with ``torch.load(path, weights_only=True)``: only state
dicts, plain tensors, ints, floats, bools, strings, lists/tuples/dicts of those. Configs
travel as JSON strings; RNG states as tensors (see :func:`capture_rng` / :func:`restore_rng`).

Two kinds of files
------------------
* **Training state** (resume): a directory ``step_{N:08d}/`` holding ``state.pt`` and its
  digest ``state.pt.sha256`` (``sha256sum`` format; see :func:`save_state`). The directory
  is written under a temporary name in the same folder and renamed into place, so a reader
  sees either no checkpoint or a complete one with its digest. It is a directory (not a
  file) because Ray Train persists checkpoint directories (the digest travels with it).
  :func:`load_state` verifies the digest before unpickling anything: a flipped byte inside a
  tensor (which ``torch.load`` does not notice) or a truncated file is a one-line
  :class:`~xct_core.errors.InputError` naming the file. A state without a digest (written
  before digests were kept) still loads; :func:`state_digest` returns ``None`` for it so a
  caller can say that it was not verified.
* **Stage model** (export, read by evaluation/registration): one ``.pt`` file with the EMA
  weights and the full params as JSON (:data:`MODEL_FORMAT`, :func:`export_stage_model`,
  :func:`load_stage_model`); self-contained: the network is rebuilt from the params inside.

A write that fails for lack of space or a file-size limit (``ulimit -f``) is a one-line
:class:`~xct_core.errors.InputError` naming the file (torch reports it as a C++ enforce
failure); the temporary file or folder is removed and the previous checkpoint stays.

Broken files are one-line :class:`~xct_core.errors.InputError` s naming the file: empty,
truncated or not a PyTorch file; a pickle that needs Python objects to load (refused: only
``weights_only`` content is ever loaded, and the error does not suggest otherwise); a stage
model lacking a field, with params that do not validate, with a tensor whose shape does not
fit the network its params build (named, both shapes), or with NaN/Inf weights.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import pickle
import random
import re
import shutil
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from xct_core.atomic import atomic_dir, atomic_path, writable
from xct_core.errors import InputError, in_chain

__all__ = [
    "DIGEST_FILE",
    "MODEL_FORMAT",
    "STATE_FILE",
    "STATE_FORMAT",
    "atomic_torch_save",
    "capture_rng",
    "checkpoint_step",
    "export_stage_model",
    "latest_checkpoint",
    "list_checkpoints",
    "load_stage_model",
    "load_state",
    "prune_checkpoints",
    "read_stage_model",
    "restore_rng",
    "save_state",
    "state_digest",
    "step_dir_name",
    "verify_state",
]

#: format tag of a training-state file
STATE_FORMAT = "xct-train-state/1"
#: format tag of an exported stage model
MODEL_FORMAT = "xct-stage-model/1"
#: the file inside a checkpoint directory
STATE_FILE = "state.pt"
#: the digest of :data:`STATE_FILE` beside it (``sha256sum -c`` can check it)
DIGEST_FILE = STATE_FILE + ".sha256"
_STEP_DIR = re.compile(r"^step_(\d{8})$")


# --------------------------------------------------------------------------- atomic writes


@contextlib.contextmanager
def _write_errors(path: Path) -> Iterator[None]:
    """OS errors while ``torch.save`` writes ``path`` as one line naming it. A full disk or a
    file-size limit reaches torch's C++ writer, which raises ``RuntimeError: [enforce fail at
    inline_container.cc…]`` with the ``OSError`` only in its context."""
    try:
        with writable(path):
            yield
    except RuntimeError as e:
        err = in_chain(e, OSError)
        if err is None:
            raise
        raise InputError(path, f"cannot write ({err.strerror or err})") from None


def _torch_save(obj: Any, tmp: Path) -> None:
    with open(tmp, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())


def atomic_torch_save(obj: Any, path: str | Path) -> Path:
    """``torch.save`` to a temp file in the target's folder, then ``os.replace``."""
    path = Path(path)
    with _write_errors(path), atomic_path(path) as tmp:
        _torch_save(obj, tmp)
    return path


def step_dir_name(step: int) -> str:
    """``step_00000025`` for step 25 (sorts by step)."""
    return f"step_{int(step):08d}"


def _sha256(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def save_state(root: str | Path, step: int, state: Mapping[str, Any]) -> Path:
    """Write ``root/step_{step:08d}/`` (``state.pt`` + ``state.pt.sha256``) atomically and
    return the directory.

    The directory is assembled as ``root/.tmp-step_…-<random>`` and renamed into place
    (:func:`xct_core.atomic.atomic_dir`, normal folder/file modes); an existing checkpoint of
    the same step is replaced (a re-run that reached the same step). The digest is of the
    bytes on disk (read back after ``fsync``).
    """
    final = Path(root) / step_dir_name(step)
    with _write_errors(final / STATE_FILE), atomic_dir(final) as tmp:
        _torch_save(dict(state), tmp / STATE_FILE)
        with open(tmp / DIGEST_FILE, "w", encoding="ascii") as f:
            f.write(f"{_sha256(tmp / STATE_FILE)}  {STATE_FILE}\n")
            f.flush()
            os.fsync(f.fileno())
    return final


def _state_file(path: str | Path) -> Path:
    p = Path(path)
    return p / STATE_FILE if p.is_dir() else p


_HEX64 = re.compile(r"^[0-9a-f]{64}$")


def state_digest(path: str | Path) -> str | None:
    """The sha256 recorded beside a checkpoint's ``state.pt`` (``None``: no digest file, i.e.
    written before digests were kept); :class:`InputError` when the digest file is unreadable."""
    f = _state_file(path).parent / DIGEST_FILE
    if not f.is_file():
        return None
    try:
        text = f.read_text(encoding="ascii").split()
    except (OSError, UnicodeDecodeError) as e:
        raise InputError(f, f"unreadable checkpoint digest ({e})") from None
    if not text or not _HEX64.match(text[0]):
        raise InputError(f, "broken checkpoint digest (not a sha256 line)")
    return text[0]


def verify_state(path: str | Path) -> bool:
    """Check a checkpoint's ``state.pt`` against its recorded sha256 (a changed byte anywhere,
    a truncated or extended file). Returns ``False`` when no digest was recorded (nothing to
    check), ``True`` when it matches; raises :class:`InputError` naming the file otherwise."""
    f = _state_file(path)
    want = state_digest(f)
    if want is None:
        return False
    try:
        got = _sha256(f)
    except OSError as e:
        raise InputError(f, f"unreadable checkpoint ({e.strerror or e})") from None
    if got != want:
        raise InputError(f, f"corrupted checkpoint: its sha256 {got[:12]}… ({f.stat().st_size} bytes) does not "
                            f"match the {want[:12]}… recorded in {DIGEST_FILE}")
    return True


def load_state(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load a training state (a checkpoint directory or its ``state.pt``) with
    ``weights_only=True`` after checking its digest (:func:`verify_state`; a state without
    one loads unverified); :class:`InputError` when missing, corrupted, unreadable or not a
    state."""
    f = _state_file(path)
    if not f.is_file():
        raise InputError(f, "checkpoint not found")
    verify_state(f)
    try:
        state = torch.load(f, map_location=map_location, weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unpickling/IO error means a bad file
        raise InputError(f, f"unreadable checkpoint ({torch_load_problem(e, f)})") from None
    if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
        raise InputError(f, f"not an xct training checkpoint (format {state.get('format') if isinstance(state, dict) else None!r})")
    return state


def checkpoint_step(path: str | Path) -> int | None:
    """The step of a checkpoint directory from its name (``None`` if not a step dir)."""
    m = _STEP_DIR.match(Path(path).name)
    return int(m.group(1)) if m else None


def list_checkpoints(root: str | Path) -> list[tuple[int, Path]]:
    """Complete checkpoints under ``root`` as ``(step, dir)``, ascending by step."""
    root = Path(root)
    if not root.is_dir():
        return []
    out = []
    for d in root.iterdir():
        s = checkpoint_step(d)
        if s is not None and (d / STATE_FILE).is_file():
            out.append((s, d))
    return sorted(out)


def latest_checkpoint(root: str | Path) -> tuple[int, Path] | None:
    """The checkpoint with the highest step under ``root`` (or ``None``)."""
    cks = list_checkpoints(root)
    return cks[-1] if cks else None


def prune_checkpoints(root: str | Path, keep_last: int, keep_steps: Iterable[int] = ()) -> list[Path]:
    """Delete all checkpoints under ``root`` except the ``keep_last`` newest and those whose
    step is in ``keep_steps`` (e.g. the best); also sweeps abandoned temp dirs. Returns the
    deleted directories."""
    root = Path(root)
    cks = list_checkpoints(root)
    keep = {s for s, _ in cks[-int(keep_last):]} if keep_last > 0 else set()
    keep |= {int(s) for s in keep_steps}
    gone = []
    for s, d in cks:
        if s not in keep:
            shutil.rmtree(d, ignore_errors=True)
            gone.append(d)
    if root.is_dir():
        for d in root.iterdir():
            if d.name.startswith((".tmp-step_", ".old-step_")) and d.is_dir():
                shutil.rmtree(d, ignore_errors=True)
    return gone


# --------------------------------------------------------------------------- RNG states


def capture_rng() -> dict[str, Any]:
    """Global RNG states as tensors/ints (``weights_only``-safe): torch CPU, every CUDA
    device, NumPy's legacy global generator, Python's ``random``."""
    np_state = np.random.get_state()
    py_state = random.getstate()
    out: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy_keys": torch.from_numpy(np.asarray(np_state[1], dtype=np.int64)),
        "numpy_pos": int(np_state[2]),
        "numpy_has_gauss": int(np_state[3]),
        "numpy_cached_gaussian": float(np_state[4]),
        "python_version": int(py_state[0]),
        "python_state": torch.tensor(py_state[1], dtype=torch.int64),
    }
    if torch.cuda.is_available():
        out["cuda"] = [s.cpu() for s in torch.cuda.get_rng_state_all()]
    return out


def restore_rng(state: Mapping[str, Any]) -> None:
    """Inverse of :func:`capture_rng` (CUDA states only when the device count matches)."""
    torch.set_rng_state(state["torch"].cpu().to(torch.uint8))
    keys = state["numpy_keys"].cpu().numpy().astype(np.uint32)
    np.random.set_state(
        ("MT19937", keys, int(state["numpy_pos"]), int(state["numpy_has_gauss"]), float(state["numpy_cached_gaussian"]))
    )
    random.setstate((int(state["python_version"]), tuple(int(v) for v in state["python_state"].tolist()), None))
    cuda = state.get("cuda")
    if cuda and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all([s.to(torch.uint8) for s in cuda])


# --------------------------------------------------------------------------- exported stage models


def export_stage_model(
    path: str | Path,
    model: nn.Module,
    *,
    params_json: str,
    stage: int,
    name: str,
    mode: str,
    step: int,
    metrics: Mapping[str, float] | None = None,
    weights: str = "ema",
    anchor: nn.Module | None = None,
) -> Path:
    """Write one stage network as a self-contained, ``weights_only``-loadable file.

    Contents: ``format`` (:data:`MODEL_FORMAT`), ``stage`` (1-based), ``name``, ``mode``
    (``diffusion`` | ``direct``), ``step``, ``weights`` (``"ema"``), ``params`` (the full
    params as JSON — :func:`load_stage_model` rebuilds the network from it),
    ``stage_config`` (that stage's section as JSON), ``metrics`` (validation metrics at
    ``step`` as JSON) and ``state_dict`` (the model's persistent tensors, on the CPU). An
    anchored (residual-diffusion) stage also carries its direct twin: ``anchor_state_dict``
    (required: the stage cannot sample without it), so one file is one usable stage.
    """
    params = json.loads(params_json)
    stage_cfg = list(params["stages"].values())[stage - 1]
    blob = {
        "format": MODEL_FORMAT,
        "stage": int(stage),
        "name": str(name),
        "mode": str(mode),
        "step": int(step),
        "weights": str(weights),
        "params": params_json,
        "stage_config": json.dumps(stage_cfg, sort_keys=True),
        "metrics": json.dumps({k: _finite_or_none(v) for k, v in (metrics or {}).items()}, sort_keys=True),
        "state_dict": {k: v.detach().cpu().clone() for k, v in model.state_dict().items()},
    }
    anchored = bool(getattr(model, "anchored", False))
    if anchored != (anchor is not None):
        raise ValueError(f"{name}: an anchored stage is exported with its direct twin (anchor=), a plain one without")
    if anchor is not None:
        blob["anchor_state_dict"] = {k: v.detach().cpu().clone() for k, v in anchor.state_dict().items()}
    return atomic_torch_save(blob, path)


def _finite_or_none(v: Any) -> Any:
    try:
        f = float(v)
    except (TypeError, ValueError):
        return v
    return f if np.isfinite(f) else None


_UNSAFE_GLOBAL = re.compile(r"Unsupported global: GLOBAL ([\w.]+)")
_WO_REASON = re.compile(r"WeightsUnpickler error: ([^\n]*)")


def torch_load_problem(e: BaseException, path: str | Path) -> str:
    """Why ``torch.load(path, weights_only=True)`` failed, in one line.

    A pickle that needs Python objects is named as such (and which object) without torch's
    advice to load it with ``weights_only=False``: xct never does. An empty file and an
    exception without a message are named too."""
    msg = str(e)
    if isinstance(e, pickle.UnpicklingError):
        m = _UNSAFE_GLOBAL.search(msg)
        if m or "weights only" in msg.lower():
            if m is None and (w := _WO_REASON.search(msg)):  # a corrupt pickle, not a forbidden object
                why = w.group(1).strip()[:200]
                return f"not a PyTorch weights file or truncated: corrupt pickle data{' (' + why + ')' if why else ''}"
            what = f" ({m.group(1)})" if m else ""
            return (f"it holds pickled Python objects{what}; xct loads weights only (tensors, numbers, strings) "
                    "and refuses pickled code")
    try:
        if Path(path).stat().st_size == 0:
            return "empty file (0 bytes)"
    except OSError:
        pass
    lines = [ln.strip() for ln in re.sub(r"\x1b\[[0-9;]*m", "", msg).strip().splitlines() if ln.strip()]
    first = lines[0][:200] if lines else ""
    if "weights_only" in first:  # never pass torch's weights_only=False advice on
        first = "not loadable with weights_only=True"
    kind = "not a PyTorch weights file or truncated" if isinstance(e, (EOFError, KeyError, RuntimeError)) else "unreadable"
    return f"{kind}: {type(e).__name__}{': ' + first if first else ''}"


def read_stage_model(path: str | Path) -> dict[str, Any]:
    """The raw exported blob (``weights_only=True``), checked for :data:`MODEL_FORMAT` and
    its fields (``stage``, ``mode``, ``params`` JSON, ``state_dict`` of tensors)."""
    p = Path(path)
    if not p.is_file():
        raise InputError(p, "stage model not found")
    try:
        blob = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001
        raise InputError(p, f"unreadable stage model ({torch_load_problem(e, p)})") from None
    if not isinstance(blob, dict) or blob.get("format") != MODEL_FORMAT:
        raise InputError(p, "not an exported xct stage model")
    lacking = [k for k in ("stage", "mode", "params", "state_dict") if k not in blob]
    if lacking:
        raise InputError(p, f"broken stage model: missing {', '.join(lacking)}")
    sd = blob["state_dict"]
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise InputError(p, "broken stage model: state_dict is not a mapping of tensors")
    if not isinstance(blob["params"], str) or not isinstance(blob["stage"], int):
        raise InputError(p, "broken stage model: params must be a JSON string and stage an integer")
    return blob


def _load_weights(net: nn.Module, state: Any, path: Path) -> None:
    """Load ``state`` into ``net`` (strict) after checking that every stored tensor fits the
    network its params build (names and shapes, both named in the error) and is finite."""
    if not isinstance(state, Mapping) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise InputError(path, "broken stage model: weights that are not a mapping of tensors")
    want = net.state_dict()
    missing = [k for k in want if k not in state]
    unexpected = [k for k in state if k not in want]
    if missing or unexpected:
        dec = _decoder_mismatch(missing, unexpected, net)
        if dec:
            raise InputError(path, dec)
        raise InputError(path, f"weights do not fit the stored config (missing {missing[:3]}, unexpected {unexpected[:3]})")
    wrong = [(k, tuple(state[k].shape), tuple(v.shape)) for k, v in want.items() if tuple(state[k].shape) != tuple(v.shape)]
    if wrong:
        k, got, exp = wrong[0]
        more = f" (and {len(wrong) - 1} more)" if len(wrong) > 1 else ""
        raise InputError(path, f"weights do not fit the stored config: {k} has shape {got}, the network needs {exp}{more}")
    for k, v in state.items():
        if v.is_floating_point() or v.is_complex():
            bad = int(v.numel() - torch.isfinite(v).sum())
            if bad:
                raise InputError(path, f"broken weights: {k} holds {bad} NaN/Inf value(s) of {v.numel()}")
    net.load_state_dict(state, strict=True)


def _decoder_mismatch(missing: list[str], unexpected: list[str], net: nn.Module) -> str | None:
    """One line when the weights are the other decoder order's (:class:`xct_core.models.backbone.UpBlock`
    names its conv ``conv`` when conv-first, ``up`` when upsample-first), else ``None``."""
    names = {"conv": "conv_first", "up": "upsample_first"}
    pat = re.compile(r"backbone\.dec\.\d+\.(conv|up)\.(weight|bias)$")
    got = {names[m.group(1)] for k in unexpected if (m := pat.search(k))}
    want = {names[m.group(1)] for k in missing if (m := pat.search(k))}
    if len(got) != 1 or len(want) != 1 or got == want:
        return None
    stage = getattr(net, "name", "the stage")
    return (f"its weights have a {got.pop()} decoder but its params build stages.{stage}.decoder: {want.pop()} "
            f"(a model must be loaded with the decoder order it was trained with)")


def load_stage_model(path: str | Path, device: str | torch.device | None = None) -> nn.Module:
    """Rebuild an exported stage network (:func:`export_stage_model`) from the params stored
    in it, load its weights, and return it frozen: eval mode, ``requires_grad=False``.

    The network's ``xct_source`` attribute is the file's path (errors about its output name it)."""
    from xct_core.config import params_from_dict, with_legacy_stage_defaults
    from xct_core.models import AnchoredStage, build_stage

    p = Path(path)
    blob = read_stage_model(p)
    try:
        data = json.loads(blob["params"])
    except ValueError as e:
        raise InputError(p, f"broken stage model: its params are not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise InputError(p, "broken stage model: its params are not a JSON object")
    # a model exported before a stage key existed was built with that key's legacy value
    params = params_from_dict(with_legacy_stage_defaults(data), f"{path} (params)")
    net = build_stage(params, int(blob["stage"]), mode=blob["mode"])
    _load_weights(net, blob["state_dict"], p)
    if getattr(net, "anchored", False):
        if "anchor_state_dict" not in blob:
            raise InputError(path, "an anchored (residual-diffusion) stage without its direct twin")
        twin = build_stage(params, int(blob["stage"]), mode="direct")
        _load_weights(twin, blob["anchor_state_dict"], p)
        net = AnchoredStage(net, twin)
    net.xct_source = str(p)
    if device is not None:
        net = net.to(device)
    return net.eval().requires_grad_(False)
