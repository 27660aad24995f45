"""Adagrad for the Numba CPU backend: element update, entry points, launcher.

The row walk, spans and work split are shared (``_walk``); this file holds
only Adagrad's per-row scalars, its element math and its entry points.

Element math as torch's for-loop (``_single_tensor_adagrad``) with its CPU
kernels' roundings: ``grad.add(param, alpha=wd)`` and ``addcmul`` are fused
multiply-adds, ``std = sqrt(sum) + eps`` rounds twice, and ``addcdiv`` is
``p + (-clr * g) / std``. Each row's ``clr = lr / (1 + (step - 1) * lr_decay)``
is computed once, in float64 from the advanced step as torch does in
Python, then rounded to the compute type (torch's ``value=`` cast).

Also here: :func:`advance_host_steps`, the step-counter pass that the
Triton backend runs on the host for CUDA params whose steps live there.
"""

import numpy as np
from numba import carray, njit

from .. import layout as L
from . import _stale
from ._memory import address, fma, load, store
from ._precision import store_param
from ._walk import FIRST, grad, parallel, run, serial

__all__ = ["adagrad", "advance_host_steps"]

# the batch scalars x[FIRST:] (NX: the length of x); HAS_WD is 1.0 (on) or 0.0
EPS, WD, HAS_WD, NX = range(FIRST, FIRST + 4)


@njit(inline="always")
def _adagrad_scalars(table, lr, lr_decay, lr_f32, out):
    """Advance every row's step; ``out[row, 0]`` = that step's clr (float64 math).

    Rows with no elements still count their step. ``lr_f32`` (nonzero):
    torch's float32 Tensor lr, whose division runs in float32.
    """
    for row in range(table.shape[0]):
        if table[row, L.FLAGS] & L.FLAG_STEP_F64:
            s64 = carray(address(table[row, L.STEP]), (1,), np.float64)
            s64[0] += 1.0
            step = s64[0]
        else:
            s32 = carray(address(table[row, L.STEP]), (1,), np.float32)
            s32[0] += np.float32(1.0)
            step = np.float64(s32[0])
        d = 1.0 + (step - 1.0) * lr_decay
        if lr_f32 != 0:
            out[row, 0] = np.float32(lr) / np.float32(d)
        else:
            out[row, 0] = lr / d


@njit(inline="always")
def _adagrad_rows(table, h, rows):
    _adagrad_scalars(table, h[0], h[1], h[2], rows)


@njit(inline="always")
def _adagrad_element(j, p, g, s, _s1, _s2, comp, sr, x, r):
    """Adagrad on element ``j`` (``s``: the ``sum`` state; ``r[0]``: the row's clr)."""
    gj = grad(g, j, x)
    pj = load(p, j)
    if x[HAS_WD] != 0:
        gj = fma(pj, x[WD], gj)
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
def _host_step_scalars(table, lr, lr_decay, lr_f32, out):
    _adagrad_scalars(table, lr, lr_decay, lr_f32, out)


def advance_host_steps(table, *, lr, lr_decay, lr_f32=False):
    """Advance every row's step counter (host memory) by one, in place.

    For GPU backends whose steps live on the host (torch's default for CUDA
    params). Returns float64 ``[rows]``: each row's clr.
    """
    out = np.empty((table.shape[0], 1), dtype=np.float64)
    _host_step_scalars(table, float(lr), float(lr_decay), 1.0 if lr_f32 else 0.0, out)
    return out[:, 0]


def adagrad(batch, *, lr, lr_decay, eps, weight_decay, maximize, lr_f32=False,
            grad_scale=None, found_inf=None, kahan_sum=False, stochastic_round=None):
    """Adagrad (torch semantics) over every row, in place; advances steps.

    With ``found_inf`` nonzero nothing is written, steps included; grads are
    multiplied by ``1/grad_scale`` inside the same pass. ``kahan_sum`` /
    ``stochastic_round``: how bfloat16/float16 params are stored
    (``_precision.store_param``).
    """
    run(batch, (adagrad_parallel, adagrad_serial, NX), lambda c: (
        eps, weight_decay, weight_decay != 0), maximize=maximize,
        host=(float(lr), float(lr_decay), 1.0 if lr_f32 else 0.0), states=(True, False, False),
        grad_scale=grad_scale, found_inf=found_inf, kahan_sum=kahan_sum,
        stochastic_round=stochastic_round)


_stale.light_loads(vars())  # warm-cache loads without Numba's full refresh
