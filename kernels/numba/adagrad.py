"""Adagrad for the Numba CPU backend: element update, entry points, launcher.

The row walk, spans and work split are shared (``_walk``); this file holds
only Adagrad's per-row scalars, its element math and its entry points.

Element math as torch's for-loop (``_single_tensor_adagrad``) with its CPU
kernels' roundings: ``grad.add(param, alpha=wd)`` and ``addcmul`` are fused
multiply-adds, ``std = sqrt(sum) + eps`` rounds twice, and ``addcdiv`` is
``p + (-clr * g) / std``. Each row's ``clr = lr / (1 + (step - 1) * lr_decay)``
is computed once from the advanced step as torch's loop computes it: in
float64 for a float lr (Python's arithmetic); for a Tensor lr in the lr's
dtype (a 0-dim Tensor stays one through that arithmetic): float64, float32,
or for float16/bfloat16 float32 math rounded to the lr's dtype (torch's CPU
division of a reduced-float Tensor by a scalar). Then rounded to the
compute type (torch's ``value=`` cast).

Also here: :func:`advance_host_steps`, the step-counter pass that the
Triton backend runs on the host for CUDA params whose steps live there.
"""

import math

import numpy as np
from numba import njit

from . import _stale
from ._memory import fma, load, store
from ._precision import store_param
from ._walk import FIRST, advance_step, decayed_grad, parallel, run, serial

__all__ = ["adagrad", "advance_host_steps", "LR_F64", "LR_F32", "LR_BF16", "LR_F16"]

# the batch scalars x[FIRST:] (NX: the length of x); HAS_WD is 1.0 (on) or 0.0
EPS, WD, HAS_WD, NX = range(FIRST, FIRST + 4)

#: ``lr_round``: the dtype torch's loop computes clr in (a Tensor lr's dtype);
#: LR_F64 also for a float lr
LR_F64, LR_F32, LR_BF16, LR_F16 = 0, 1, 2, 3
_BF16_MAX = 3.3895313892515355e38
_F16_MAX = 65504.0


@njit(inline="always")
def _round_to(x, sig, emin, big):
    """``x`` rounded to nearest-even with ``sig`` significant bits.

    Exponents below ``emin`` (frexp's) keep that exponent's quantum (the
    format's subnormals); beyond ``big`` (the largest finite), infinity: an
    IEEE conversion to float16 (11, -13) or bfloat16 (8, -125).
    """
    if x != x or x == 0.0 or np.isinf(x):
        return x
    e = math.frexp(x)[1]
    if e < emin:
        e = emin
    r = math.ldexp(np.rint(math.ldexp(x, sig - e)), e - sig)
    if abs(r) > big:
        return math.copysign(np.inf, r)
    return r


@njit(inline="always")
def _clr(lr, d, lr_round):
    """torch's ``lr / d`` for a float lr (float64) or a Tensor lr of dtype ``lr_round``."""
    if lr_round == LR_F64:
        return lr / d
    q = np.float64(np.float32(lr) / np.float32(d))  # float32 math (opmath for both)
    if lr_round == LR_BF16:
        return _round_to(q, 8, -125, _BF16_MAX)
    if lr_round == LR_F16:
        return _round_to(q, 11, -13, _F16_MAX)
    return q


@njit(inline="always")
def _adagrad_scalars(table, lr, lr_decay, lr_round, out):
    """Advance every row's step; ``out[row, 0]`` = that step's clr.

    Rows with no elements still count their step. ``lr_round``: the dtype
    clr is computed in, as torch's loop does (``_clr``).
    """
    for row in range(table.shape[0]):
        step = advance_step(table, row)
        out[row, 0] = _clr(lr, 1.0 + (step - 1.0) * lr_decay, lr_round)


@njit(inline="always")
def _adagrad_rows(table, h, rows):
    _adagrad_scalars(table, h[0], h[1], h[2], rows)


@njit(inline="always")
def _adagrad_element(j, p, g, s, _s1, _s2, comp, sr, x, r):
    """Adagrad on element ``j`` (``s``: the ``sum`` state; ``r[0]``: the row's clr)."""
    gj, pj = decayed_grad(g, p, j, x, x[HAS_WD], x[WD])
    sj = fma(gj, gj, load(s, j))  # addcmul(value=1)
    store(s, j, sj)
    std = np.sqrt(sj) + x[EPS]
    store_param(p, j, pj, pj + (-r[0] * gj) / std, comp, sr)  # torch's addcdiv order


@njit(parallel=True, cache=True, error_model="numpy")
def adagrad_parallel(table, bounds, itemsize, view_dtype, h, x, rows, has0, has1, has2,
                     kahan, sr_keys):
    parallel(_adagrad_rows, _adagrad_element, NX, table, bounds, itemsize, view_dtype, h, x,
             rows, has0, has1, has2, kahan, sr_keys)


@njit(cache=True, error_model="numpy")
def adagrad_serial(table, bounds, itemsize, view_dtype, h, x, rows, has0, has1, has2,
                   kahan, sr_keys):
    serial(_adagrad_rows, _adagrad_element, NX, table, bounds, itemsize, view_dtype, h, x, rows,
           has0, has1, has2, kahan, sr_keys)


@njit(cache=True, error_model="numpy")
def _host_step_scalars(table, lr, lr_decay, lr_round, out):
    _adagrad_scalars(table, lr, lr_decay, lr_round, out)


def advance_host_steps(table, *, lr, lr_decay, lr_round=LR_F64):
    """Advance every row's step counter (host memory) by one, in place.

    For GPU backends whose steps live on the host (torch's default for CUDA
    params). Returns float64 ``[rows]``: each row's clr.
    """
    out = np.empty((table.shape[0], 1), dtype=np.float64)
    _host_step_scalars(table, float(lr), float(lr_decay), float(lr_round), out)
    return out[:, 0]


def adagrad(batch, *, lr, lr_decay, eps, weight_decay, maximize, lr_round=LR_F64,
            grad_scale=None, found_inf=None, kahan_sum=False, stochastic_round=None):
    """Adagrad (torch semantics) over every row, in place; advances steps.

    With ``found_inf`` nonzero nothing is written, steps included; grads are
    multiplied by ``1/grad_scale`` inside the same pass. ``kahan_sum`` /
    ``stochastic_round``: how bfloat16/float16 params are stored
    (``_precision.store_param``). ``lr_round``: the Tensor lr's dtype, which
    torch's loop computes clr in (``LR_F64`` also for a float lr).
    """
    run(batch, (adagrad_parallel, adagrad_serial, NX), lambda c: (
        eps, weight_decay, weight_decay != 0), maximize=maximize,
        host=(float(lr), float(lr_decay), float(lr_round)), states=(True, False, False),
        grad_scale=grad_scale, found_inf=found_inf, kahan_sum=kahan_sum,
        stochastic_round=stochastic_round)


_stale.light_loads(vars())  # warm-cache loads without Numba's full refresh
