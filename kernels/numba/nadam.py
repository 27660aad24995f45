"""NAdam for the Numba backend: element update, entry points, launcher.

Element math as torch's for-loop (``_single_tensor_nadam``) with its CPU
kernels' roundings: decay, ``lerp`` and ``mul_(beta2).addcmul_`` as in
``adam``; ``denom = sqrt(exp_avg_sq / bias_correction2) + eps``; then the
two ``addcdiv`` of torch's loop, ``p + (c1 * grad) / denom`` and ``+ (c2 *
exp_avg) / denom``, each rounded. Each row's step, ``mu_product`` (its
per-row scalar state, in STATE2) and ``c1, c2`` come from
``kernels/steps.py``.
"""

import numpy as np
from numba import njit

from .. import columns as L
from .._jit import HELPER, light_loads
from ..steps import nadam_scalars
from ._memory import fma, load, store
from ._precision import store_param
from ._launch import run
from ._walk import FIRST, grad, parallel, serial

__all__ = ["nadam"]

# the batch scalars x[FIRST:] (NX: the length of x); switches are 1.0 (on) or 0.0.
# torch.lerp as in ``adam``; DECAY is 1 - lr * weight_decay with decoupled decay, else 1.0
LERP_W, LERP_FROM_GRAD, BETA2, ONE_MINUS_BETA2, EPS, WD, HAS_WD, DECAY, NX = range(
    FIRST, FIRST + 9)

#: the column of the per-row scalar state mu_product
MU_PRODUCT = L.STATE2


@njit(**HELPER)
def _nadam_rows(table, h, rows):
    nadam_scalars(table, h[0], h[1], h[2], h[3], MU_PRODUCT, rows)


@njit(**HELPER)
def _nadam_element(j, p, g, m, v, _s2, comp, sr, x, r):
    """NAdam on element ``j``; ``r``: the row's bias correction 2 and the
    values of the two addcdiv (``steps.nadam_scalars``)."""
    gj = grad(g, j, x)
    pj = old = load(p, j)
    pj = pj * x[DECAY]
    if x[HAS_WD] != 0:
        gj = fma(pj, x[WD], gj)
    mj = load(m, j)
    mj = fma(x[LERP_W], gj - mj, gj if x[LERP_FROM_GRAD] != 0 else mj)
    vj = fma(x[ONE_MINUS_BETA2] * gj, gj, load(v, j) * x[BETA2])
    store(m, j, mj)
    store(v, j, vj)
    denom = np.sqrt(vj / r[0]) + x[EPS]
    pj = pj + (r[1] * gj) / denom
    store_param(p, j, old, pj + (r[2] * mj) / denom, comp, sr)


@njit(parallel=True, cache=True, error_model="numpy")
def nadam_parallel(table, bounds, itemsize, view_dtype, h, x, rows, has0, has1, has2, kahan,
                   sr_keys, state_keys):
    parallel(_nadam_rows, _nadam_element, NX, table, bounds, itemsize, view_dtype, h, x,
             rows, has0, has1, has2, kahan, sr_keys, state_keys)


@njit(cache=True, error_model="numpy")
def nadam_serial(table, bounds, itemsize, view_dtype, h, x, rows, has0, has1, has2, kahan,
                 sr_keys, state_keys):
    serial(_nadam_rows, _nadam_element, NX, table, bounds, itemsize, view_dtype, h, x, rows,
           has0, has1, has2, kahan, sr_keys, state_keys)


def nadam(batch, *, lr, beta1, beta2, eps, weight_decay, momentum_decay,
          decoupled_weight_decay, maximize, grad_scale=None, found_inf=None, kahan_sum=False,
          stochastic_round=None, state_round=None):
    """NAdam (torch semantics) over every row, in place; advances steps and mu_products.

    With ``found_inf`` nonzero nothing is written, steps and mu_products included.
    ``kahan_sum`` / ``stochastic_round``: how bfloat16/float16 params are
    stored (``_precision.store_param``).
    """
    decoupled = decoupled_weight_decay and weight_decay != 0

    def scalars(c):
        omb1 = c(1.0 - beta1)
        from_grad = not omb1 < 0.5
        return (omb1 - c(1.0) if from_grad else omb1, from_grad, beta2, 1.0 - beta2, eps,
                weight_decay, weight_decay != 0 and not decoupled,
                1.0 - lr * weight_decay if decoupled else 1.0)

    run(batch, (nadam_parallel, nadam_serial, NX), scalars, maximize=maximize,
        host=(float(lr), float(beta1), float(beta2), float(momentum_decay)),
        states=(True, True, False), grad_scale=grad_scale, found_inf=found_inf,
        kahan_sum=kahan_sum, stochastic_round=stochastic_round,
        state_round=state_round)


light_loads(vars())  # warm-cache loads without Numba's full refresh
