"""Step counters in host memory, advanced for a GPU kernel: backend-neutral.

torch keeps ``state["step"]`` on the CPU for CUDA params by default; a GPU
kernel cannot read it there, so the launcher advances such counters on the
host and uploads each row's step scalars. Done here once, for every backend
that needs it: pure NumPy and Python floats, no compiler.

The counters are read and written through the address table (column
``STEP``; ``FLAG_STEP_F64`` says float64, else float32), gathered and
scattered in one NumPy operation each rather than a Python loop over rows.
The per-row scalars are float64 scalar arithmetic (NumPy's, for IEEE
results where Python's floats raise) on each distinct step value (usually
one per batch): what torch's for-loop computes, libm's ``pow`` included (a
vectorised NumPy power need not round as libm's does).
"""

from __future__ import annotations

import math

import numpy as np

from . import layout as L

__all__ = ["advance", "adam_scalars", "adagrad_clr", "LR_F64", "LR_F32", "LR_BF16", "LR_F16"]

#: ``lr_round`` codes: the dtype torch's loop computes Adagrad's clr in (a
#: Tensor lr's dtype); LR_F64 also for a float lr
LR_F64, LR_F32, LR_BF16, LR_F16 = 0, 1, 2, 3
_BF16_MAX = 3.3895313892515355e38
_F16_MAX = 65504.0


#: where the arrays below start: the first page, never mapped (NumPy takes a
#: null data pointer as "allocate")
_BASE = 4096


class _Memory:
    """The process's address space from ``_BASE`` as one array of ``typestr``:
    indexed only at step addresses, which the launchers have checked are
    host memory (FLAG_STEP_CPU)."""

    def __init__(self, typestr: str, itemsize: int):
        self.__array_interface__ = {"shape": (((1 << 48) - _BASE) // itemsize,),
                                    "typestr": typestr, "data": (_BASE, False), "version": 3}


_F64 = np.asarray(_Memory("<f8", 8))
_F32 = np.asarray(_Memory("<f4", 4))


def advance(table: np.ndarray) -> np.ndarray:
    """Advance every row's step counter (host memory) by one, in place.

    Rows with no elements count their step too; a float32 counter is
    advanced by a float32 add, as torch's ``step += 1``.

    Returns:
        float64 ``[rows]``: each row's new step.
    """
    addr = table[:, L.STEP]
    f64 = (table[:, L.FLAGS] & L.FLAG_STEP_F64) != 0
    steps = np.empty(table.shape[0], dtype=np.float64)
    if f64.any():
        i = (addr[f64] - _BASE) >> 3
        _F64[i] += 1.0
        steps[f64] = _F64[i]
    if not f64.all():
        i = (addr[~f64] - _BASE) >> 2
        _F32[i] += np.float32(1.0)
        steps[~f64] = _F32[i]
    return steps


def _per_step(steps: np.ndarray, fn, width: int) -> np.ndarray:
    """``fn(step)`` (a tuple of ``width`` floats) for each row, once per distinct step."""
    if steps.size and (steps == steps[0]).all():  # the usual case: one step count
        values, inverse = steps[:1], np.zeros(steps.size, dtype=np.intp)
    else:
        values, inverse = np.unique(steps, return_inverse=True)
    with np.errstate(all="ignore"):  # IEEE results (inf, NaN), as the kernels' own
        table = np.array([fn(s) for s in values], dtype=np.float64).reshape(-1, width)
    return table[inverse.reshape(-1)]


def adam_scalars(table: np.ndarray, *, lr, beta1, beta2) -> np.ndarray:
    """Advance the steps; per-row Adam scalars, as torch's for-loop computes them.

    Returns:
        float64 ``[rows, 2]``: step size ``lr / (1 - beta1 ** step)`` and
        ``(1 - beta2 ** step) ** 0.5``, in float64 from the stored step.
    """
    lr, beta1, beta2 = np.float64(lr), np.float64(beta1), np.float64(beta2)
    return _per_step(advance(table), lambda s: (lr / (1.0 - beta1 ** s),
                                                (1.0 - beta2 ** s) ** 0.5), 2)


def _round_to(x: float, sig: int, emin: int, big: float) -> float:
    """``x`` rounded to nearest-even with ``sig`` significant bits.

    Exponents below ``emin`` (frexp's) keep that exponent's quantum (the
    format's subnormals); beyond ``big`` (the largest finite), infinity: an
    IEEE conversion to float16 (11, -13) or bfloat16 (8, -125).
    """
    if x != x or x == 0.0 or math.isinf(x):
        return x
    e = max(math.frexp(x)[1], emin)
    r = math.ldexp(np.rint(math.ldexp(x, sig - e)), e - sig)
    if abs(r) > big:
        return math.copysign(math.inf, r)
    return r


def clr(lr: float, d: float, lr_round: int) -> float:
    """torch's ``lr / d`` for a float lr (float64) or a Tensor lr of dtype ``lr_round``."""
    if lr_round == LR_F64:
        return lr / d
    q = np.float64(np.float32(lr) / np.float32(d))  # float32 math (opmath for both)
    if lr_round == LR_BF16:
        return _round_to(q, 8, -125, _BF16_MAX)
    if lr_round == LR_F16:
        return _round_to(q, 11, -13, _F16_MAX)
    return q


def adagrad_clr(table: np.ndarray, *, lr, lr_decay, lr_round=LR_F64) -> np.ndarray:
    """Advance the steps; per-row Adagrad ``clr = lr / (1 + (step - 1) * lr_decay)``.

    Returns:
        float64 ``[rows]``: each row's clr, computed as torch's loop does (in
        float64 for a float lr, in the Tensor lr's dtype ``lr_round``).
    """
    lr, lr_decay, lr_round = np.float64(lr), np.float64(lr_decay), int(lr_round)
    return _per_step(advance(table),
                     lambda s: (clr(lr, 1.0 + (s - 1.0) * lr_decay, lr_round),), 1)[:, 0]
