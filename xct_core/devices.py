"""The ``--device`` option, parsed ONCE for every command (train, reconstruct, evaluate).

:func:`parse_device` turns what the user typed into a device this machine has, or a one-line
:class:`~xct_core.errors.ConfigError` naming the option, the value and what IS available —
before any data or model is loaded (``--device cuda`` on a CPU-only box, a typo such as
``--device cdua``, or ``--device meta``, which computes nothing, are the likeliest mistakes).
"""

from __future__ import annotations

from xct_core.errors import ConfigError

__all__ = ["COMPUTE_TYPES", "available_devices", "parse_device"]

#: device types a model can run on (``meta``, ``xla``, … are not accepted)
COMPUTE_TYPES = ("cpu", "cuda", "mps")


def available_devices() -> list[str]:
    """What ``--device`` can name here: ``cpu``, ``cuda``/``cuda:N`` per GPU, ``mps``."""
    import torch

    out = ["cpu"]
    n = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if n:
        out += ["cuda"] + [f"cuda:{i}" for i in range(n)]
    mps = getattr(torch.backends, "mps", None)
    if mps is not None and mps.is_available():
        out.append("mps")
    return out


def parse_device(spec: str | None, option: str = "--device") -> str | None:
    """``spec`` as a canonical device string (``cpu``, ``cuda``, ``cuda:1``, ``mps``), or
    ``None`` when not given (the caller's default). Raises :class:`ConfigError` (one line)
    when ``spec`` is not a device name, not a compute device, or not present here."""
    if spec is None:
        return None
    import torch

    avail = available_devices()
    have = f"available here: {', '.join(avail)}"
    text = spec.strip()
    try:
        dev = torch.device(text)
    except (RuntimeError, ValueError, TypeError):
        raise ConfigError(f"{option} {spec!r}: not a device name ({have})") from None
    if dev.type not in COMPUTE_TYPES:
        raise ConfigError(f"{option} {spec!r}: {dev.type!r} is not a device a model can run on ({have})")
    if dev.type == "cuda":
        n = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if n == 0:
            raise ConfigError(f"{option} {spec!r}: no CUDA GPU on this machine ({have})")
        if dev.index is not None and dev.index >= n:
            raise ConfigError(f"{option} {spec!r}: this machine has {n} CUDA GPU(s) ({have})")
    if dev.type == "mps" and "mps" not in avail:
        raise ConfigError(f"{option} {spec!r}: no Apple MPS device on this machine ({have})")
    return str(dev)
