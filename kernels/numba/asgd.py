"""ASGD for the Numba backend: element update, entry points, launcher.

Element math as torch's for-loop (``_single_tensor_asgd``) with its CPU
kernels' roundings: the L2 decay and ``param.add_(grad, alpha=-eta)`` are
fused multiply-adds, ``param.mul_(1 - lambd * eta)`` rounds on its own; the
average ``ax + (param - ax) * mu`` rounds after each operation and reads
the param as stored, and is a copy where torch's ``mu.item() != 1`` fails
(a per-row, per-step switch, selected after both are computed; capturable's
torch always averages). Each
row's step, ``eta`` and ``mu`` (its per-row scalar state, in STATE2 and
STATE1) and its scalars come from ``kernels/steps.py``.
"""

from numba import njit

from .. import columns as L
from .._jit import HELPER, light_loads
from ..steps import ETA_AS_F32, asgd_scalars
from ._memory import fma, load, store
from ._precision import store_param
from ._launch import run
from ._walk import FIRST, decayed_grad, parallel, serial

__all__ = ["asgd"]

# the batch scalars x[FIRST:] (NX: the length of x); HAS_WD and AVERAGE are 1.0 or 0.0
(WD, HAS_WD, AVERAGE, NX) = range(FIRST, FIRST + 4)

#: the columns of the per-row scalar states mu and eta
MU, ETA = L.STATE1, L.STATE2


@njit(**HELPER)
def _asgd_rows(table, h, rows):
    asgd_scalars(table, h[0], h[1], h[2], h[3], h[4], h[5], MU, ETA, rows)


@njit(**HELPER)
def _asgd_element(j, p, g, ax, _s1, _s2, comp, sr, x, r):
    """ASGD on element ``j`` (``ax`` the average); ``r``: the row's ``-eta``,
    ``1 - lambd * eta`` and ``mu`` (``steps.asgd_scalars``)."""
    gj, pj = decayed_grad(g, p, j, x, x[HAS_WD], x[WD])
    # loaded even where the param is copied, and before the param's store:
    # under the switch, LLVM masked the load and the store of ax, and a bf16
    # step took twice as long (issue 28)
    aj = load(ax, j)
    # param.mul_(1 - lambd * eta); param.add_(grad, alpha=-eta)
    store_param(p, j, pj, fma(gj, r[0], pj * r[1]), comp, sr)
    pj = load(p, j)  # the param as stored, which torch averages
    # ax.add_(param.sub(ax).mul_(mu)), or ax.copy_(param)
    store(ax, j, aj + (pj - aj) * r[2] if x[AVERAGE] != 0 or r[2] != 1.0 else pj)


@njit(parallel=True, cache=True, error_model="numpy")
def asgd_parallel(table, bounds, itemsize, view_dtype, h, x, rows, has0, has1, has2, kahan,
                  sr_keys, state_keys):
    parallel(_asgd_rows, _asgd_element, NX, table, bounds, itemsize, view_dtype, h, x, rows,
             has0, has1, has2, kahan, sr_keys, state_keys)


@njit(cache=True, error_model="numpy")
def asgd_serial(table, bounds, itemsize, view_dtype, h, x, rows, has0, has1, has2, kahan,
                sr_keys, state_keys):
    serial(_asgd_rows, _asgd_element, NX, table, bounds, itemsize, view_dtype, h, x, rows,
           has0, has1, has2, kahan, sr_keys, state_keys)


def asgd(batch, *, lr, lambd, alpha, t0, weight_decay, maximize, capturable=False,
         eta_round=ETA_AS_F32, mu_f32=True, grad_scale=None, found_inf=None, kahan_sum=False,
         stochastic_round=None, state_round=None):
    """ASGD (torch semantics) over every row, in place; advances steps, etas and mus.

    ``capturable``: average at every step, as torch's capturable loop.
    ``eta_round``, ``mu_f32``: how torch computes the next eta and mu
    (``steps.asgd_scalars``). With ``found_inf`` nonzero nothing is
    written, steps, etas and mus included.
    """
    def scalars(c):
        return (weight_decay, weight_decay != 0, bool(capturable))

    run(batch, (asgd_parallel, asgd_serial, NX), scalars, maximize=maximize,
        host=(float(lr), float(lambd), float(alpha), float(t0), float(eta_round),
              float(bool(mu_f32))),
        states=(True, False, False), grad_scale=grad_scale, found_inf=found_inf,
        kahan_sum=kahan_sum, stochastic_round=stochastic_round, state_round=state_round)


light_loads(vars())  # warm-cache loads without Numba's full refresh
