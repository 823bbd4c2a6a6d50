"""The one seed rule: every random stream of the project is seeded from integers by
:func:`derive_seed` (NumPy ``SeedSequence`` mixing), never by ad-hoc arithmetic.

Uses (each a distinct tuple of parts, so streams never collide):

* training randomness of stage-loop step ``s`` on rank ``r``, learner ``i``: ``(seed, 4 + i, r, s)``
  (+ ``(seed, 1 | 2 | 3, r)`` for the torch / NumPy / Python global generators at start-up);
* evaluation of case ``c`` (the c-th evaluated volume of a split or a CT folder; training
  validation is the evaluation of the val split): the case seed ``(seed, EVAL_STREAM, c)``;
* sample ``i`` (0-based) of a reconstruction with seed ``s`` (``xct reconstruct --seed s``,
  the pyfunc's ``seed``, a case seed): ``s + i`` — consecutive, so a single run with
  ``--seed s+i`` reproduces sample ``i`` of a K-sample run (the documented CLI contract).
"""

from __future__ import annotations

import numpy as np

__all__ = ["EVAL_STREAM", "case_seed", "derive_seed", "sample_seed"]

#: the stream id of evaluation case seeds
EVAL_STREAM = 99


def derive_seed(*parts: int) -> int:
    """A 63-bit seed from integers (NumPy SeedSequence mixing; order matters)."""
    words = [int(p) & 0xFFFFFFFF for p in parts]
    return int(np.random.SeedSequence(words).generate_state(2, dtype=np.uint32).view(np.uint64)[0] >> 1)


def case_seed(seed: int, case_index: int) -> int:
    """The seed of the ``case_index``-th evaluated case (validation, evaluation, ``xct evaluate``)."""
    return derive_seed(seed, EVAL_STREAM, case_index)


def sample_seed(seed: int, sample_index: int) -> int:
    """The noise seed of sample ``sample_index`` (0-based) of a reconstruction seeded ``seed``:
    ``seed + sample_index`` (mod 2**63)."""
    return (int(seed) + int(sample_index)) % (2**63)
