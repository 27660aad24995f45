"""Adam / AdamW for the Numba backend: element update, entry points, launcher.

The row walk, spans and work split are shared (``_walk``). As in ``sgd``:
scalars in the compute type, one rounding where torch's for-loop rounds, a
fused multiply-add where torch's CPU kernel uses one (``lerp``,
``addcmul``). Adam then differs from torch only where torch's own CPU
``sqrt`` is not correctly rounded (about 0.6% of elements, by 1 ulp).
Each row's step and bias-corrected scalars: ``kernels/steps.py``.
"""

import numpy as np
import torch
from numba import njit

from .._jit import HELPER, light_loads
from ..steps import adam_scalars
from ._memory import fma, load, store
from ._precision import store_param
from ._launch import run
from ._walk import FIRST, grad, parallel, parallel_blocks, serial, serial_blocks

__all__ = ["adam"]

# the batch scalars x[FIRST:] (NX: the length of x); switches are 1.0 (on) or 0.0. torch.lerp(m, g,
# 1 - beta1) is fma(LERP_W, g - m, m), or fma(LERP_W, g - m, g) from the grad's
# side (LERP_FROM_GRAD) where the weight is at least 0.5, LERP_W then beta1 - 1
LERP_W, LERP_FROM_GRAD, BETA2, ONE_MINUS_BETA2, EPS, WD, HAS_WD, DECAY, NX = range(
    FIRST, FIRST + 9)


@njit(**HELPER)
def _nanmax(a, b):
    if a != a:
        return a
    if b != b:
        return b
    return a if a > b else b


@njit(**HELPER)
def _div_by_row_constant(x, d, inv_d):
    """``x / d`` correctly rounded, for a divisor shared by a whole row.

    ``inv_d`` is RN(1/d). The quotient ``x * inv_d`` is corrected once with
    its exact FMA residual (Markstein's division step): a multiply and two
    FMAs on the FMA ports instead of a division on the divider, which Adam
    already loads with a square root and a second division per element.
    bf16 AdamW, which moves half the bytes per element and so leans on the
    divider, ran in 0.96 of the time on the resnet50 list (interleaved A/B,
    30 rounds); fp32 (memory-bound) was unchanged.
    Checked equal to ``x / d`` bit for bit on 2.2e10 float32 pairs (the bias
    corrections of beta2 0.999 up to step 20000, of 0.99 and 0.95, and 2000
    random divisors in (0.01, 1), against x over the whole range of
    sqrt(float32)) and 5e9 float64 pairs. Where the residual is NaN the
    uncorrected quotient is already ``x / d``: infinite or NaN ``x``, and the
    divisors torch reaches with ``beta2`` edited to 1 or more (0, inf, NaN;
    ``inv_d`` is then inf, 0 or NaN).
    """
    q = x * inv_d
    r = fma(-q, d, x)
    return q if r != r else fma(r, inv_d, q)


@njit(**HELPER)
def _adam_rows(table, h, rows):
    adam_scalars(table, h[0], h[1], h[2], rows)


@njit(**HELPER)
def _adam_element(j, p, g, m, v, vmax, comp, sr, x, r):
    """Adam on element ``j``; ``vmax`` is None without amsgrad.

    ``r``: the row's step size, sqrt of the second bias correction and its
    reciprocal (``steps.adam_scalars``). L2 decay (``HAS_WD``) is skipped when
    off; decoupled decay multiplies by ``DECAY``, which is exactly 1.0 when off.
    """
    # Not _walk.decayed_grad: that takes L2 on the stored param, the same bits
    # (DECAY is 1.0 wherever HAS_WD is on) but other machine code (the serial
    # float32 L2 kernel's x86: 1768 instructions against these 1758,
    # 2026-12-07); this form is the one the benchmarks measured.
    gj = grad(g, j, x)
    pj = old = load(p, j)
    pj = pj * x[DECAY]
    if x[HAS_WD] != 0:
        gj = fma(pj, x[WD], gj)
    mj = load(m, j)
    # torch.lerp's two-sided formula, as its CPU kernel evaluates it
    mj = fma(x[LERP_W], gj - mj, gj if x[LERP_FROM_GRAD] != 0 else mj)
    vj = fma(x[ONE_MINUS_BETA2] * gj, gj, load(v, j) * x[BETA2])
    store(m, j, mj)
    store(v, j, vj)
    if vmax is not None:
        vj = _nanmax(load(vmax, j), vj)
        store(vmax, j, vj)
    denom = _div_by_row_constant(np.sqrt(vj), r[1], r[2]) + x[EPS]
    store_param(p, j, old, pj + (-r[0] * mj) / denom, comp, sr)  # torch's addcdiv order


@njit(parallel=True, cache=True, error_model="numpy")
def adam_parallel(table, bounds, itemsize, view_dtype, h, x, rows, has0, has1, has2, kahan,
                  sr_keys, state_keys):
    parallel(_adam_rows, _adam_element, NX, table, bounds, itemsize, view_dtype, h, x, rows,
             has0, has1, has2, kahan, sr_keys, state_keys)


@njit(cache=True, error_model="numpy")
def adam_serial(table, bounds, itemsize, view_dtype, h, x, rows, has0, has1, has2, kahan,
                sr_keys, state_keys):
    serial(_adam_rows, _adam_element, NX, table, bounds, itemsize, view_dtype, h, x, rows, has0,
           has1, has2, kahan, sr_keys, state_keys)


@njit(parallel=True, cache=True, error_model="numpy")
def adam_blocks_parallel(table, bounds, itemsize, view_dtype, h, x, rows, has0, has1, has2,
                         kahan, sr_keys, state_keys):
    parallel_blocks(_adam_rows, _adam_element, NX, table, bounds, itemsize, view_dtype, h, x,
                    rows, has0, has1, has2, kahan, sr_keys, state_keys)


@njit(cache=True, error_model="numpy")
def adam_blocks_serial(table, bounds, itemsize, view_dtype, h, x, rows, has0, has1, has2,
                       kahan, sr_keys, state_keys):
    serial_blocks(_adam_rows, _adam_element, NX, table, bounds, itemsize, view_dtype, h, x,
                  rows, has0, has1, has2, kahan, sr_keys, state_keys)


def adam(batch, *, lr, beta1, beta2, eps, weight_decay, decoupled_weight_decay,
         amsgrad, maximize, grad_scale=None, found_inf=None, kahan_sum=False,
         stochastic_round=None, state_round=None):
    """Adam / AdamW (torch semantics) over every row, in place; advances steps.

    With ``found_inf`` nonzero nothing is written, steps included.
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

    entries = ((adam_blocks_parallel, adam_blocks_serial) if batch.state_dtype == torch.uint8
               else (adam_parallel, adam_serial))  # (8-bit state: state_bits=8)
    run(batch, (*entries, NX), scalars, maximize=maximize,
        host=(float(lr), float(beta1), float(beta2)), states=(True, True, amsgrad),
        grad_scale=grad_scale, found_inf=found_inf, kahan_sum=kahan_sum,
        stochastic_round=stochastic_round, state_round=state_round)


light_loads(vars())  # warm-cache loads without Numba's full refresh
