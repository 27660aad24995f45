"""Adadelta for the Numba backend: element update, step advance, entry points, launcher.

The row walk, spans and work split are shared (``_walk``). Element math:
float32 (float64 for float64 tensors), one rounding per stored value, a
fused multiply-add exactly where torch's CPU kernels use one (``addcmul``,
``add(alpha=)``), none elsewhere (``mul`` then ``addcmul``, ``add``,
``sqrt``, ``div``, ``mul``). The step is only counted (``steps.advance``).
"""

import numpy as np
from numba import njit

from .._jit import HELPER, light_loads
from ..steps import advance
from ._memory import fma, load, store
from ._precision import store_param
from ._launch import run
from ._walk import FIRST, decayed_grad, parallel, serial

__all__ = ["adadelta"]

# the batch scalars x[FIRST:] (NX: the length of x); HAS_WD is 1.0 or 0.0
(NEG_LR, RHO, ONE_MINUS_RHO, EPS, WD, HAS_WD, NX) = range(FIRST, FIRST + 7)


@njit(**HELPER)
def _adadelta_rows(table, h, rows):
    advance(table)


@njit(**HELPER)
def _adadelta_element(j, p, g, sq, ad, unused, comp, sr, x, r):
    """Adadelta on element ``j``: ``sq`` square_avg, ``ad`` acc_delta."""
    gj, pj = decayed_grad(g, p, j, x, x[HAS_WD], x[WD])
    # square_avg.mul_(rho).addcmul_(grad, grad, value=1 - rho)
    sj = fma(x[ONE_MINUS_RHO] * gj, gj, load(sq, j) * x[RHO])
    store(sq, j, sj)
    std = np.sqrt(sj + x[EPS])  # square_avg.add(eps).sqrt_()
    aj = load(ad, j)
    # acc_delta.add(eps).sqrt_().div_(std).mul_(grad)
    dj = (np.sqrt(aj + x[EPS]) / std) * gj
    # acc_delta.mul_(rho).addcmul_(delta, delta, value=1 - rho)
    store(ad, j, fma(x[ONE_MINUS_RHO] * dj, dj, aj * x[RHO]))
    store_param(p, j, pj, fma(dj, x[NEG_LR], pj), comp, sr)  # param.add_(delta, alpha=-lr)


@njit(parallel=True, cache=True, error_model="numpy")
def adadelta_parallel(table, bounds, itemsize, view_dtype, h, x, rows, has0, has1, has2,
                      kahan, sr_keys, state_keys):
    parallel(_adadelta_rows, _adadelta_element, NX, table, bounds, itemsize, view_dtype, h,
             x, rows, has0, has1, has2, kahan, sr_keys, state_keys)


@njit(cache=True, error_model="numpy")
def adadelta_serial(table, bounds, itemsize, view_dtype, h, x, rows, has0, has1, has2,
                    kahan, sr_keys, state_keys):
    serial(_adadelta_rows, _adadelta_element, NX, table, bounds, itemsize, view_dtype, h, x,
           rows, has0, has1, has2, kahan, sr_keys, state_keys)


def adadelta(batch, *, lr, rho, eps, weight_decay, maximize, grad_scale=None,
             found_inf=None, kahan_sum=False, stochastic_round=None, state_round=None):
    """Adadelta (torch semantics) over every row, in place; advances steps.

    With ``found_inf`` nonzero nothing is written, steps included; grads are
    multiplied by ``1/grad_scale`` inside the same pass. ``kahan_sum`` /
    ``stochastic_round``: how bfloat16/float16 params are stored
    (``_precision.store_param``).
    """
    def scalars(c):
        return (-lr, rho, 1.0 - rho, eps, weight_decay, weight_decay != 0)

    run(batch, (adadelta_parallel, adadelta_serial, NX), scalars, maximize=maximize,
        states=(True, True, False), grad_scale=grad_scale, found_inf=found_inf,
        kahan_sum=kahan_sum, stochastic_round=stochastic_round, state_round=state_round)


light_loads(vars())  # warm-cache loads without Numba's full refresh
