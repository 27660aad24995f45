"""NAdam for the pure-torch reference backend (see ``kernels/reference``).

Plain tensor arithmetic with one rounding per stored value. This function's
signature is the contract the Numba and Triton ``nadam`` kernels keep.
"""

from __future__ import annotations

import torch

from ._io import inputs, param_store, rows, state_store
from .adam import _ieee_div as _div

__all__ = ["nadam"]


def nadam(batch, *, lr, beta1, beta2, eps, weight_decay, momentum_decay,
          decoupled_weight_decay, maximize, grad_scale=None, found_inf=None, kahan_sum=False,
          stochastic_round=None, state_round=None):
    """NAdam (torch semantics) over every tensor, in place; advances steps.

    States: ``batch.states[0]`` exp_avg, ``[1]`` exp_avg_sq, ``[2]`` the
    per-row scalar mu_product (multiplied by ``mu`` in its own dtype, as
    torch's loop). With ``found_inf`` nonzero nothing is written, steps and
    mu_products included.
    """
    if torch.is_tensor(lr):  # capturable's device lr: read here, once
        lr = float(lr)
    if found_inf is not None and bool(found_inf != 0):
        return
    put = param_store(batch, kahan_sum, stochastic_round)
    put_state = state_store(batch, state_round)
    n = len(batch.params)
    empty = [i for i in range(n) if batch.params[i].numel() == 0]
    for i in empty:  # rows() passes over them, after advancing their steps
        _mu(batch.states[2][i], float(batch.steps[i]) + 1.0, beta1, momentum_decay)
    for i, p, step_t in rows(batch, found_inf):
        step = float(step_t)
        mu, mu_next, prod = _mu(batch.states[2][i], step, beta1, momentum_decay)
        ct, old, g = inputs(batch, i, grad_scale, maximize,
                            0.0 if decoupled_weight_decay else weight_decay)
        p32 = old
        if decoupled_weight_decay and weight_decay != 0:
            p32 = p32 * (1.0 - lr * weight_decay)
        m_t, v_t = batch.states[0][i], batch.states[1][i]
        m = torch.lerp(m_t.to(ct), g, 1.0 - beta1)  # two-sided formula, as torch's
        v = v_t.to(ct).mul(beta2).addcmul(g, g, value=1.0 - beta2)
        put_state(i, 0, m_t, m)
        put_state(i, 1, v_t, v)
        denom = v.div(1.0 - beta2 ** step).sqrt().add(eps)
        p32 = p32.addcdiv(g, denom, value=_div(-lr * (1.0 - mu), 1.0 - prod))
        put(i, p, old, p32.addcdiv(m, denom, value=_div(-lr * mu_next,
                                                          1.0 - prod * mu_next)))


def _mu(mu_product, step, beta1, momentum_decay):
    """Advance ``mu_product`` (in place, in its dtype); ``(mu, mu_next, new product)``."""
    mu = beta1 * (1.0 - 0.5 * (0.96 ** (step * momentum_decay)))
    mu_next = beta1 * (1.0 - 0.5 * (0.96 ** ((step + 1) * momentum_decay)))
    mu_product *= mu
    return mu, mu_next, float(mu_product)
