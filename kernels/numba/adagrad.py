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
compute type (torch's ``value=`` cast): ``kernels/steps.py``.
"""

import numpy as np
from numba import njit

from .._jit import HELPER, light_loads
from ..steps import LR_F64, adagrad_scalars
from ._memory import fma, load, store
from ._precision import store_param
from ._launch import run
from ._walk import FIRST, decayed_grad, parallel, serial

__all__ = ["adagrad"]

# the batch scalars x[FIRST:] (NX: the length of x); HAS_WD is 1.0 (on) or 0.0
EPS, WD, HAS_WD, NX = range(FIRST, FIRST + 4)


@njit(**HELPER)
def _adagrad_rows(table, h, rows):
    adagrad_scalars(table, h[0], h[1], h[2], rows)


@njit(**HELPER)
def _adagrad_element(j, p, g, s, _s1, _s2, comp, sr, x, r):
    """Adagrad on element ``j`` (``s``: the ``sum`` state; ``r[0]``: the row's clr)."""
    gj, pj = decayed_grad(g, p, j, x, x[HAS_WD], x[WD])
    sj = fma(gj, gj, load(s, j))  # addcmul(value=1)
    store(s, j, sj)
    std = np.sqrt(sj) + x[EPS]
    store_param(p, j, pj, pj + (-r[0] * gj) / std, comp, sr)  # torch's addcdiv order


@njit(parallel=True, cache=True, error_model="numpy")
def adagrad_parallel(table, bounds, itemsize, view_dtype, h, x, rows, has0, has1, has2,
                     kahan, sr_keys, state_keys):
    parallel(_adagrad_rows, _adagrad_element, NX, table, bounds, itemsize, view_dtype, h, x,
             rows, has0, has1, has2, kahan, sr_keys, state_keys)


@njit(cache=True, error_model="numpy")
def adagrad_serial(table, bounds, itemsize, view_dtype, h, x, rows, has0, has1, has2,
                   kahan, sr_keys, state_keys):
    serial(_adagrad_rows, _adagrad_element, NX, table, bounds, itemsize, view_dtype, h, x, rows,
           has0, has1, has2, kahan, sr_keys, state_keys)


def adagrad(batch, *, lr, lr_decay, eps, weight_decay, maximize, lr_round=LR_F64,
            grad_scale=None, found_inf=None, kahan_sum=False, stochastic_round=None,
            state_round=None):
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
        stochastic_round=stochastic_round, state_round=state_round)


light_loads(vars())  # warm-cache loads without Numba's full refresh
