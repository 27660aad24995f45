"""RAdam for the pure-torch reference backend (see ``kernels/reference``).

Plain tensor arithmetic with one rounding per stored value. This function's
signature is the contract the Numba and Triton ``radam`` kernels keep.
"""

from __future__ import annotations

import torch

from ._io import inputs, param_store, rows, state_store

__all__ = ["radam"]


def radam(batch, *, lr, beta1, beta2, eps, weight_decay, decoupled_weight_decay, maximize,
          grad_scale=None, found_inf=None, kahan_sum=False, stochastic_round=None,
          state_round=None):
    """RAdam (torch semantics) over every tensor, in place; advances steps.

    States: ``batch.states[0]`` exp_avg, ``[1]`` exp_avg_sq. The
    rectification is decided per row from its step, as torch's loop. With
    ``found_inf`` nonzero nothing is written, steps included.
    """
    if torch.is_tensor(lr):  # capturable's device lr: read here, once
        lr = float(lr)
    put = param_store(batch, kahan_sum, stochastic_round)
    put_state = state_store(batch, state_round)
    rho_inf = 2.0 / (1.0 - beta2) - 1.0
    for i, p, step_t in rows(batch, found_inf):
        step = float(step_t)
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
        bc1 = 1.0 - beta1 ** step
        bc2 = 1.0 - beta2 ** step
        rho_t = rho_inf - 2.0 * step * (beta2 ** step) / bc2
        update = m / bc1 * lr
        if rho_t > 5.0:
            rect = ((rho_t - 4.0) * (rho_t - 2.0) * rho_inf
                    / ((rho_inf - 4.0) * (rho_inf - 2.0) * rho_t)) ** 0.5
            update = update * (bc2 ** 0.5 / (v.sqrt() + eps)) * rect
        put(i, p, old, p32.add(update, alpha=-1.0))
