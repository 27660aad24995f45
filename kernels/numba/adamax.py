"""Adamax for the Numba backend: element update, entry points, launcher.

Element math as torch's for-loop (``_single_tensor_adamax``) with its CPU
kernels' roundings: ``grad.add(param, alpha=wd)`` and ``lerp`` are fused
multiply-adds (as in ``adam``), ``exp_inf.mul_(beta2)`` and
``grad.abs().add_(eps)`` round once each, ``torch.maximum`` propagates a NaN
from either side, and ``addcdiv`` is ``p + (-clr * exp_avg) / exp_inf``.
Each row's ``clr = lr / (1 - beta1**step)`` comes from ``kernels/steps.py``
(in a Tensor lr's dtype, as Adagrad's).
"""

import numpy as np
from numba import njit

from .._jit import HELPER, light_loads
from ..steps import LR_F64, adamax_scalars
from ._memory import fma, load, rounded, store
from ._precision import store_param
from ._launch import run
from ._walk import FIRST, decayed_grad, parallel, serial

__all__ = ["adamax"]

# the batch scalars x[FIRST:] (NX: the length of x); switches are 1.0 (on) or
# 0.0. torch.lerp(m, g, 1 - beta1) as in ``adam``: fma(LERP_W, g - m, m), or
# from the grad's side (LERP_FROM_GRAD) where the weight is at least 0.5
LERP_W, LERP_FROM_GRAD, BETA2, EPS, WD, HAS_WD, NX = range(FIRST, FIRST + 7)


@njit(**HELPER)
def _adamax_rows(table, h, rows):
    adamax_scalars(table, h[0], h[1], h[2], rows)


@njit(**HELPER)
def _adamax_element(j, p, g, m, u, _s2, comp, sr, x, r):
    """Adamax on element ``j`` (``m`` exp_avg, ``u`` exp_inf; ``r[0]`` the row's clr)."""
    gj, pj = decayed_grad(g, p, j, x, x[HAS_WD], x[WD])
    mj = load(m, j)
    mj = fma(x[LERP_W], gj - mj, gj if x[LERP_FROM_GRAD] != 0 else mj)
    # As torch's loop: the candidate |grad| + eps from the grad as stored (a
    # bfloat16/float16 grad.add(param) rounds), each side rounded to the
    # storage type. Rounded once from the float32 grad instead, a bf16
    # exp_inf drifted further from a float64 run's than torch's (0.34
    # against 0.30, tests/test_parity.py's low-precision check): a stored
    # exp_inf cannot follow the float64 run's decay by beta2 (0.999 moves a
    # bfloat16 value by less than half an ulp), and the candidate rounded
    # once, closer at its first step, stays above it
    # (the grad rounds to its own storage type; exp_inf's sides to the state's,
    # none where the state store rounds stochastically: its one rounding)
    a = rounded(u, load(u, j) * x[BETA2])
    b = rounded(u, np.abs(rounded(g, gj)) + x[EPS])
    # torch.maximum: NaN if either is
    uj = a if a != a else (b if b != b else (a if a > b else b))
    store(m, j, mj)
    store(u, j, uj)
    store_param(p, j, pj, pj + (-r[0] * mj) / uj, comp, sr)  # torch's addcdiv order


@njit(parallel=True, cache=True, error_model="numpy")
def adamax_parallel(table, bounds, itemsize, view_dtype, h, x, rows, has0, has1, has2, kahan,
                    sr_keys, state_keys):
    parallel(_adamax_rows, _adamax_element, NX, table, bounds, itemsize, view_dtype, h, x,
             rows, has0, has1, has2, kahan, sr_keys, state_keys)


@njit(cache=True, error_model="numpy")
def adamax_serial(table, bounds, itemsize, view_dtype, h, x, rows, has0, has1, has2, kahan,
                  sr_keys, state_keys):
    serial(_adamax_rows, _adamax_element, NX, table, bounds, itemsize, view_dtype, h, x, rows,
           has0, has1, has2, kahan, sr_keys, state_keys)


def adamax(batch, *, lr, beta1, beta2, eps, weight_decay, maximize, lr_round=LR_F64,
           grad_scale=None, found_inf=None, kahan_sum=False, stochastic_round=None,
           state_round=None):
    """Adamax (torch semantics) over every row, in place; advances steps.

    With ``found_inf`` nonzero nothing is written, steps included.
    ``lr_round``: the Tensor lr's dtype, which torch's loop computes clr in
    (``LR_F64`` also for a float lr). ``kahan_sum`` / ``stochastic_round``:
    how bfloat16/float16 params are stored (``_precision.store_param``).
    """
    def scalars(c):
        omb1 = c(1.0 - beta1)
        from_grad = not omb1 < 0.5
        return (omb1 - c(1.0) if from_grad else omb1, from_grad, beta2, eps, weight_decay,
                weight_decay != 0)

    run(batch, (adamax_parallel, adamax_serial, NX), scalars, maximize=maximize,
        host=(float(lr), float(beta1), float(lr_round)), states=(True, True, False),
        grad_scale=grad_scale, found_inf=found_inf, kahan_sum=kahan_sum,
        stochastic_round=stochastic_round,
        state_round=state_round)


light_loads(vars())  # warm-cache loads without Numba's full refresh
