"""Adam / AdamW for the pure-torch reference backend (see ``kernels/reference``).

This function's signature is the contract the Numba and Triton ``adam``
kernels keep.
"""

from __future__ import annotations

import math

import torch

from ._io import inputs, param_store, rows, state_load, state_store

__all__ = ["adam"]


def _ieee_div(a: float, b: float) -> float:
    """``a / b`` as the compiled kernels divide: inf or NaN where Python raises.

    (A ``beta1`` edited to 1 makes the bias correction 0; the API layer has
    already raised torch's ZeroDivisionError where torch's for-loop would.)
    """
    if b != 0:
        return a / b
    if a != a or a == 0:
        return math.nan
    return math.copysign(math.inf, a) * math.copysign(1.0, b)


def adam(batch, *, lr, beta1, beta2, eps, weight_decay, decoupled_weight_decay,
         amsgrad, maximize, grad_scale=None, found_inf=None, kahan_sum=False,
         stochastic_round=None, state_round=None):
    """Adam / AdamW (torch semantics) over every tensor, in place; advances steps.

    With ``found_inf`` nonzero nothing is written, steps included.
    """
    put = param_store(batch, kahan_sum, stochastic_round)
    put_state = state_store(batch, state_round)
    get_state = state_load(batch)
    for i, p, step_t in rows(batch, found_inf):
        step = float(step_t)
        step_size = _ieee_div(lr, 1.0 - beta1 ** step)
        bc2_sqrt = math.sqrt(1.0 - beta2 ** step)
        ct, old, g = inputs(batch, i, grad_scale, maximize,
                            0.0 if decoupled_weight_decay else weight_decay)
        p32 = old
        if decoupled_weight_decay and weight_decay != 0:
            p32 = p32 * (1.0 - lr * weight_decay)
        m_t, v_t = batch.states[0][i], batch.states[1][i]
        m = torch.lerp(get_state(i, 0, m_t, ct), g, 1.0 - beta1)  # two-sided, as torch's
        v = get_state(i, 1, v_t, ct).mul(beta2).addcmul(g, g, value=1.0 - beta2)
        put_state(i, 0, m_t, m)
        put_state(i, 1, v_t, v)
        if amsgrad:
            vmax_t = batch.states[2][i]
            v = torch.maximum(get_state(i, 2, vmax_t, ct), v)
            put_state(i, 2, vmax_t, v)
        denom = v.sqrt() / bc2_sqrt + eps
        put(i, p, old, p32.addcdiv(m, denom, value=-step_size))
