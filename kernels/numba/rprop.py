"""Rprop for the Numba backend: element update, step advance, entry points, launcher.

The row walk, spans and work split are shared (``_walk``). The sign cases
are decided per element exactly as torch's for-loop decides them, in the
storage dtype: the grad as GradScaler's ``unscale_`` stores it, the product
``grad * prev`` rounded to the storage type (``_memory.rounded``: a
bfloat16/float16 product that underflows is a zero, as in torch), and etas
and step-size bounds as that type holds them (rounded on the host). The
step size takes torch's two roundings (``mul_`` then ``clamp_``); every
other value is exact, so the param's one rounding is torch's too. torch's
``sign`` is ``(0 < a) - (a < 0)``: 0 for a NaN, whose param then stays and
whose NaN goes to ``prev``. With bfloat16 state (``state_dtype``) the
step size stays in the compute type until its store, and both states are
rounded once, stochastically, by their stores (the sign of ``prev``, all
the next step reads of it, survives that rounding unless it lands on zero
from below bfloat16's smallest subnormal). The step is only counted
(``steps.advance``).
"""

from numba import njit

from .._jit import HELPER, light_loads
from ..reference.rprop import as_stored
from ..steps import advance
from ._memory import fma, load, rounded, store
from ._precision import store_param
from ._launch import run
from ._walk import FIRST, grad, parallel, serial

__all__ = ["rprop"]

# the batch scalars x[FIRST:] (NX: the length of x), each as the storage type
# holds it; ONE and ZERO: constants in the compute type (a float64 literal
# would promote float32 arithmetic)
(ETAPLUS, ETAMINUS, SIZE_MIN, SIZE_MAX, ONE, ZERO, NX) = range(FIRST, FIRST + 7)


@njit(**HELPER)
def _rprop_rows(table, h, rows):
    advance(table)


@njit(**HELPER)
def _rprop_element(j, p, g, prev, size, unused, comp, sr, x, r):
    """Rprop on element ``j``: ``prev`` the last grad, ``size`` its step size."""
    gj = rounded(p, grad(g, j, x))  # unscale_ stores the grad: rounded to its type
    pj = load(p, j)
    # grad.mul(prev).sign(), then the three cases; torch's sign is (0 < a) - (a < 0):
    # a NaN product has sign 0, so its step size stays
    d = rounded(p, gj * load(prev, j))
    f = x[ETAPLUS] if d > x[ZERO] else (x[ETAMINUS] if d < x[ZERO] else x[ONE])
    # step_size.mul_(sign).clamp_(step_size_min, step_size_max): std::min(std::max(...))
    s = rounded(size, load(size, j) * f)  # (bfloat16 state: rounded once, by its store)
    s = x[SIZE_MIN] if s < x[SIZE_MIN] else s
    s = x[SIZE_MAX] if x[SIZE_MAX] < s else s
    store(size, j, s)
    gj = x[ZERO] if f == x[ETAMINUS] else gj  # grad[sign.eq(etaminus)] = 0
    sg = x[ONE] if gj > x[ZERO] else (-x[ONE] if gj < x[ZERO] else x[ZERO])  # NaN: 0
    store_param(p, j, pj, fma(-sg, s, pj), comp, sr)  # param.addcmul_(grad.sign(), size, value=-1)
    store(prev, j, gj)  # prev.copy_(grad)


@njit(parallel=True, cache=True, error_model="numpy")
def rprop_parallel(table, bounds, itemsize, view_dtype, h, x, rows, has0, has1, has2,
                   kahan, sr_keys, state_keys):
    parallel(_rprop_rows, _rprop_element, NX, table, bounds, itemsize, view_dtype, h, x,
             rows, has0, has1, has2, kahan, sr_keys, state_keys)


@njit(cache=True, error_model="numpy")
def rprop_serial(table, bounds, itemsize, view_dtype, h, x, rows, has0, has1, has2,
                 kahan, sr_keys, state_keys):
    serial(_rprop_rows, _rprop_element, NX, table, bounds, itemsize, view_dtype, h, x, rows,
           has0, has1, has2, kahan, sr_keys, state_keys)


def rprop(batch, *, etaminus, etaplus, step_size_min, step_size_max, maximize,
          grad_scale=None, found_inf=None, kahan_sum=False, stochastic_round=None,
          state_round=None):
    """Rprop (torch semantics) over every row, in place; advances steps.

    With ``found_inf`` nonzero nothing is written, steps included; grads are
    multiplied by ``1/grad_scale`` inside the same pass (and never written).
    ``kahan_sum`` / ``stochastic_round``: how bfloat16/float16 params are
    stored (``_precision.store_param``).
    """
    dt = batch.dtype
    values = (as_stored(dt, etaplus), as_stored(dt, etaminus), as_stored(dt, step_size_min),
              as_stored(dt, step_size_max), 1.0, 0.0)

    run(batch, (rprop_parallel, rprop_serial, NX), lambda c: values, maximize=maximize,
        states=(True, True, False), grad_scale=grad_scale, found_inf=found_inf,
        kahan_sum=kahan_sum, stochastic_round=stochastic_round, state_round=state_round)


light_loads(vars())  # warm-cache loads without Numba's full refresh
