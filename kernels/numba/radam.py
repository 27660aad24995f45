"""RAdam for the Numba backend: element update, entry points, launcher.

Element math as torch's for-loop (``_single_tensor_radam``) with its CPU
kernels' roundings: decay, ``lerp`` and ``mul_(beta2).addcmul_`` as in
``adam``; then ``exp_avg / bias_correction1 * lr``, and where the row's
step is rectified (torch's ``rho_t > 5``, decided per row and step in
``kernels/steps.py``) times ``(sqrt(bias_correction2) / (sqrt(exp_avg_sq) +
eps))``, which torch computes as ``reciprocal() * scalar`` (Python's
``float / Tensor``), and times the rectification term, each product
rounded, as torch's left-to-right chain.
"""

import numpy as np
from numba import njit

from .._jit import HELPER, light_loads
from ..steps import radam_scalars
from ._memory import fma, load, store
from ._precision import store_param
from ._launch import run
from ._walk import FIRST, grad, parallel, serial

__all__ = ["radam"]

# the batch scalars x[FIRST:] (NX: the length of x); switches are 1.0 (on) or 0.0.
# torch.lerp as in ``adam``; DECAY is 1 - lr * weight_decay with decoupled decay, else
# 1.0; ONE is 1.0, the reciprocal's numerator (np.ones_like(v) in the element
# made a heap array per element: 871 ms a step on the resnet50 list, against a
# 44 ms ceiling)
LERP_W, LERP_FROM_GRAD, BETA2, ONE_MINUS_BETA2, EPS, LR, WD, HAS_WD, DECAY, ONE, NX = range(
    FIRST, FIRST + 11)


@njit(**HELPER)
def _radam_rows(table, h, rows):
    radam_scalars(table, h[0], h[1], rows)


@njit(**HELPER)
def _radam_element(j, p, g, m, v, _s2, comp, sr, x, r):
    """RAdam on element ``j``; ``r``: the row's bias correction 1, sqrt of
    bias correction 2, and rectification term (negative: not rectified)."""
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
    step = mj / r[0] * x[LR]
    if r[2] > 0:
        adaptive = x[ONE] / (np.sqrt(vj) + x[EPS]) * r[1]
        step = step * adaptive * r[2]
    store_param(p, j, old, pj - step, comp, sr)


@njit(parallel=True, cache=True, error_model="numpy")
def radam_parallel(table, bounds, itemsize, view_dtype, h, x, rows, has0, has1, has2, kahan,
                   sr_keys, state_keys):
    parallel(_radam_rows, _radam_element, NX, table, bounds, itemsize, view_dtype, h, x,
             rows, has0, has1, has2, kahan, sr_keys, state_keys)


@njit(cache=True, error_model="numpy")
def radam_serial(table, bounds, itemsize, view_dtype, h, x, rows, has0, has1, has2, kahan,
                 sr_keys, state_keys):
    serial(_radam_rows, _radam_element, NX, table, bounds, itemsize, view_dtype, h, x, rows,
           has0, has1, has2, kahan, sr_keys, state_keys)


def radam(batch, *, lr, beta1, beta2, eps, weight_decay, decoupled_weight_decay, maximize,
          grad_scale=None, found_inf=None, kahan_sum=False, stochastic_round=None,
          state_round=None):
    """RAdam (torch semantics) over every row, in place; advances steps.

    With ``found_inf`` nonzero nothing is written, steps included.
    ``kahan_sum`` / ``stochastic_round``: how bfloat16/float16 params are
    stored (``_precision.store_param``).
    """
    decoupled = decoupled_weight_decay and weight_decay != 0

    def scalars(c):
        omb1 = c(1.0 - beta1)
        from_grad = not omb1 < 0.5
        return (omb1 - c(1.0) if from_grad else omb1, from_grad, beta2, 1.0 - beta2, eps, lr,
                weight_decay, weight_decay != 0 and not decoupled,
                1.0 - lr * weight_decay if decoupled else 1.0, 1.0)

    run(batch, (radam_parallel, radam_serial, NX), scalars, maximize=maximize,
        host=(float(beta1), float(beta2)), states=(True, True, False),
        grad_scale=grad_scale, found_inf=found_inf, kahan_sum=kahan_sum,
        stochastic_round=stochastic_round,
        state_round=state_round)


light_loads(vars())  # warm-cache loads without Numba's full refresh
