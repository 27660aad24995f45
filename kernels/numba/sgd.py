"""SGD for the Numba backend: its scalars, element update, entry points and launcher.

The row walk, spans, entry-point bodies and work split are shared
(``_walk``). Scalars arrive already cast to the compute type (float32, or
float64 for float64 tensors); element math never mixes in a float64
literal, so float32 data stays in float32 arithmetic. Each operation rounds
where torch's for-loop rounds, with a fused multiply-add wherever torch's
CPU kernel uses one (``add(alpha=)``): bit-exact with torch in
float32/float64 (tests/test_parity.py).

State: STATE0 the momentum buffer (absent without momentum). Per row, the
buffer's update ``b = fma(g, r[0], b * r[1])`` takes ``r = (1 - dampening,
momentum)``, or ``(1.0, -0.0)`` where the buffer was created this step:
torch's first buffer is the gradient itself, undampened, and the API
creates it zero-filled, so that ``fma(g, 1, 0 * -0.0)`` is ``g`` bit for bit
(-0.0 is the one addend that leaves every ``g``, -0.0 included, as it is).
A per-row select instead cost 1% of bf16 SGD momentum's time.
"""

from numba import njit

from .. import columns as L
from .._jit import HELPER, light_loads
from ._memory import fma, load, store
from ._precision import store_param
from ._launch import run
from ._walk import FIRST, decayed_grad, parallel, serial

__all__ = ["sgd"]

# the batch scalars x[FIRST:] (NX: the length of x); switches are 1.0 (on) or 0.0
NEG_LR, WD, HAS_WD, MOMENTUM, NESTEROV, NX = range(FIRST, FIRST + 6)


@njit(**HELPER)
def _sgd_rows(table, h, rows):
    """``rows[row, :2]``: the buffer update's factors (``h``: 1 - dampening, momentum)."""
    for row in range(table.shape[0]):
        if table[row, L.FLAGS] & L.FLAG_ROW:
            rows[row, 0] = 1.0
            rows[row, 1] = -0.0
        else:
            rows[row, 0] = h[0]
            rows[row, 1] = h[1]


@njit(**HELPER)
def _sgd_element(j, p, g, b, _s1, _s2, comp, sr, x, r):
    """SGD on element ``j``; ``b`` (the momentum buffer) is None without momentum."""
    gj, pj = decayed_grad(g, p, j, x, x[HAS_WD], x[WD])
    if b is not None:
        bj = fma(gj, r[0], load(b, j) * r[1])  # a fresh row: g (module docstring)
        store(b, j, bj)
        if x[NESTEROV] != 0:
            gj = fma(bj, x[MOMENTUM], gj)
        else:
            gj = bj
    store_param(p, j, pj, fma(gj, x[NEG_LR], pj), comp, sr)


@njit(parallel=True, cache=True, error_model="numpy")
def sgd_parallel(table, bounds, itemsize, view_dtype, h, x, rows, has0, has1, has2, kahan,
                 sr_keys, state_keys):
    parallel(_sgd_rows, _sgd_element, NX, table, bounds, itemsize, view_dtype, h, x, rows, has0,
             has1, has2, kahan, sr_keys, state_keys)


@njit(cache=True, error_model="numpy")
def sgd_serial(table, bounds, itemsize, view_dtype, h, x, rows, has0, has1, has2, kahan,
               sr_keys, state_keys):
    serial(_sgd_rows, _sgd_element, NX, table, bounds, itemsize, view_dtype, h, x, rows, has0,
           has1, has2, kahan, sr_keys, state_keys)


def sgd(batch, *, lr, weight_decay, momentum, dampening, nesterov, maximize,
        grad_scale=None, found_inf=None, kahan_sum=False, stochastic_round=None, state_round=None):
    """SGD (torch semantics) over every row of ``batch.table``, in place.

    With ``found_inf`` nonzero nothing is written; grads are multiplied by
    ``1/grad_scale`` inside the same pass. ``kahan_sum`` / ``stochastic_round``:
    how bfloat16/float16 params are stored (``_precision.store_param``).
    """
    run(batch, (sgd_parallel, sgd_serial, NX), lambda c: (
        -lr, weight_decay, weight_decay != 0, momentum, nesterov and momentum != 0),
        maximize=maximize, host=(1.0 - dampening, float(momentum)),
        states=(momentum != 0, False, False),
        grad_scale=grad_scale, found_inf=found_inf, kahan_sum=kahan_sum,
        stochastic_round=stochastic_round, state_round=state_round)


light_loads(vars())  # warm-cache loads without Numba's full refresh
