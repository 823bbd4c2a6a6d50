"""Hostile inputs: judge what a file's header CLAIMS before its data is read.

A header is a promise about the data that follows: a 90-byte ``.nii.gz`` may claim
1200³ int16 voxels (3.4 GB), a ``.npy`` 200000² float32 pixels (149 GiB). A reader that
believes it allocates the claim first and only then finds the data missing — or is
killed. Every reader of user files (NIfTI, DICOM series, ``.npy``, PNG, DICOM radiographs:
:mod:`xct_core.io`, :mod:`xct_core.xray_io`, :func:`xct_core.stats.probe_nifti`) therefore
checks, from the header alone:

* the claimed element count against ``params.limits`` (:class:`~xct_core.config.LimitsParams`:
  ``max_ct_voxels`` for CTs, ``max_xray_pixels`` for X-rays) — :func:`check_count`;
* the claimed bytes against the file's size (:func:`check_payload`): an uncompressed file
  must hold them; a compressed one cannot expand beyond ``max_compression_ratio``
  (deflate's own ceiling is 1032:1, so a larger claim is a truncated or forged header).

Both raise :class:`~xct_core.errors.InputError` naming the file, the claim and the limit.
No format in xct is read as NRRD/MHA/TIFF: those are not accepted inputs at all.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from xct_core.errors import InputError

__all__ = ["DEFLATE_MAX_RATIO", "check_count", "check_payload", "human_bytes"]

#: the most deflate (gzip, zlib) can expand its input: 1032 output bytes per input byte
DEFLATE_MAX_RATIO = 1032


def human_bytes(n: float) -> str:
    """``3.4 GB``-style size (powers of 1024, one decimal)."""
    n = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"  # unreachable


def check_count(where: object, shape: Sequence[int], limit: int, what: str, setting: str) -> int:
    """``prod(shape)`` (exact, Python ints); :class:`InputError` when it exceeds ``limit``.

    ``what``: ``"voxels"`` | ``"pixels"``; ``setting``: the ``limits`` key named in the error.
    """
    dims = [int(s) for s in shape]
    n = math.prod(dims)
    if n > int(limit):
        raise InputError(
            where, f"header claims {' x '.join(map(str, dims))} = {n:,} {what}, more than limits.{setting} "
                   f"({int(limit):,}): refusing to read it"
        )
    return n


def check_payload(
    where: object, claimed_bytes: int, file_bytes: int, *, compressed: bool, max_ratio: float, offset: int = 0
) -> None:
    """The claimed data must fit the file: ``offset + claimed_bytes <= file_bytes`` when
    uncompressed; ``claimed_bytes / file_bytes <= max_ratio`` when compressed."""
    claimed_bytes, file_bytes = int(claimed_bytes), int(file_bytes)
    if compressed:
        ratio = claimed_bytes / max(file_bytes, 1)
        if ratio > max_ratio:
            raise InputError(
                where, f"corrupt or truncated data: the header claims {human_bytes(claimed_bytes)} but the compressed "
                       f"file is {human_bytes(file_bytes)} ({ratio:,.0f}:1, more than limits.max_compression_ratio "
                       f"{max_ratio:g}:1; deflate expands at most {DEFLATE_MAX_RATIO}:1): a truncated file or a forged header"
            )
    elif offset + claimed_bytes > file_bytes:
        raise InputError(
            where, f"corrupt or truncated data: the header claims {claimed_bytes:,} bytes after byte {offset:,}, "
                   f"the file has {file_bytes:,} bytes"
        )
