"""RMSprop for the Numba backend: element update, step advance, entry points, launcher.

The row walk, spans and work split are shared (``_walk``). Element math:
float32 (float64 for float64 tensors), one rounding per stored value, a
fused multiply-add exactly where torch's CPU kernels use one (``addcmul``,
``lerp``, ``add(alpha=)``), none elsewhere (``mul`` then ``addcmul``,
``addcdiv``). The step is only counted (``steps.advance``).
"""

import numpy as np
from numba import njit

from .._jit import HELPER, light_loads
from ..steps import advance
from ._memory import fma, load, store
from ._precision import store_param
from ._launch import run
from ._walk import FIRST, decayed_grad, parallel, serial

__all__ = ["rmsprop"]

# the batch scalars x[FIRST:] (NX: the length of x); switches are 1.0 (on) or 0.0. grad_avg.lerp_(g,
# 1 - alpha) is fma(LERP_W, g - a, a), or fma(LERP_W, g - a, g) from the
# grad's side (LERP_FROM_GRAD) where |1 - alpha| >= 0.5, LERP_W then -alpha
(NEG_LR, ALPHA, ONE_MINUS_ALPHA, LERP_W, LERP_FROM_GRAD, EPS, WD, HAS_WD, MOMENTUM,
 NX) = range(FIRST, FIRST + 10)


@njit(**HELPER)
def _rmsprop_rows(table, h, rows):
    advance(table)


@njit(**HELPER)
def _rmsprop_element(j, p, g, sq, buf, gavg, comp, sr, x, r):
    """RMSprop on element ``j``: ``sq`` square_avg; ``buf`` None without
    momentum; ``gavg`` None unless centered."""
    gj, pj = decayed_grad(g, p, j, x, x[HAS_WD], x[WD])
    # square_avg.mul_(alpha).addcmul_(grad, grad, value=1 - alpha)
    sj = fma(x[ONE_MINUS_ALPHA] * gj, gj, load(sq, j) * x[ALPHA])
    store(sq, j, sj)
    if gavg is not None:
        aj = load(gavg, j)
        # grad_avg.lerp_(grad, 1 - alpha): torch.lerp's two-sided formula
        aj = fma(x[LERP_W], gj - aj, gj if x[LERP_FROM_GRAD] != 0 else aj)
        store(gavg, j, aj)
        sj = fma(-aj, aj, sj)  # square_avg.addcmul(grad_avg, grad_avg, value=-1)
    avg = np.sqrt(sj) + x[EPS]
    if buf is not None:
        bj = load(buf, j) * x[MOMENTUM] + gj / avg  # buf.mul_(momentum).addcdiv_(grad, avg)
        store(buf, j, bj)
        store_param(p, j, pj, fma(bj, x[NEG_LR], pj), comp, sr)  # param.add_(buf, alpha=-lr)
    else:
        # param.addcdiv_(grad, avg, value=-lr)
        store_param(p, j, pj, pj + (x[NEG_LR] * gj) / avg, comp, sr)


@njit(parallel=True, cache=True, error_model="numpy")
def rmsprop_parallel(table, bounds, itemsize, view_dtype, h, x, rows, has0, has1, has2,
                     kahan, sr_keys, state_keys):
    parallel(_rmsprop_rows, _rmsprop_element, NX, table, bounds, itemsize, view_dtype, h, x,
             rows, has0, has1, has2, kahan, sr_keys, state_keys)


@njit(cache=True, error_model="numpy")
def rmsprop_serial(table, bounds, itemsize, view_dtype, h, x, rows, has0, has1, has2,
                   kahan, sr_keys, state_keys):
    serial(_rmsprop_rows, _rmsprop_element, NX, table, bounds, itemsize, view_dtype, h, x, rows,
           has0, has1, has2, kahan, sr_keys, state_keys)


def rmsprop(batch, *, lr, alpha, eps, weight_decay, momentum, centered, maximize,
            grad_scale=None, found_inf=None, kahan_sum=False, stochastic_round=None,
            state_round=None):
    """RMSprop (torch semantics) over every row, in place; advances steps.

    With ``found_inf`` nonzero nothing is written, steps included; grads are
    multiplied by ``1/grad_scale`` inside the same pass. ``kahan_sum`` /
    ``stochastic_round``: how bfloat16/float16 params are stored
    (``_precision.store_param``).
    """
    use_momentum = momentum > 0

    def scalars(c):
        oma = c(1.0 - alpha)
        from_grad = not abs(oma) < 0.5
        return (-lr, alpha, oma, oma - c(1.0) if from_grad else oma, from_grad, eps,
                weight_decay, weight_decay != 0, momentum if use_momentum else 0.0)

    run(batch, (rmsprop_parallel, rmsprop_serial, NX), scalars, maximize=maximize,
        states=(True, use_momentum, centered), grad_scale=grad_scale, found_inf=found_inf,
        kahan_sum=kahan_sum, stochastic_round=stochastic_round, state_round=state_round)


light_loads(vars())  # warm-cache loads without Numba's full refresh
