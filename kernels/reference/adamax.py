"""Adamax for the pure-torch reference backend (see ``kernels/reference``).

Plain tensor arithmetic with one rounding per stored value. This function's
signature is the contract the Numba and Triton ``adamax`` kernels keep.
"""

from __future__ import annotations

import torch

from ._io import inputs, param_store, rows, state_store
from .adam import _ieee_div

__all__ = ["adamax"]

#: ``lr_round`` codes (kernels/steps.py's LR_F64 ... LR_F16)
_LR_DTYPES = {1: torch.float32, 2: torch.bfloat16, 3: torch.float16}


def _clr(lr: float, d: float, lr_round: int) -> float:
    """torch's ``lr / d``: float64 for a float lr, else in the Tensor lr's dtype."""
    if lr_round:
        return float(torch.tensor(lr, dtype=_LR_DTYPES[int(lr_round)]) / d)
    return _ieee_div(lr, d)


def adamax(batch, *, lr, beta1, beta2, eps, weight_decay, maximize, lr_round=0,
           grad_scale=None, found_inf=None, kahan_sum=False, stochastic_round=None,
           state_round=None):
    """Adamax (torch semantics) over every tensor, in place; advances steps.

    States: ``batch.states[0]`` exp_avg, ``[1]`` exp_inf. With ``found_inf``
    nonzero nothing is written, steps included.
    """
    if torch.is_tensor(lr):  # capturable's device lr: read here, once
        lr = float(lr)
    put = param_store(batch, kahan_sum, stochastic_round)
    put_state = state_store(batch, state_round)
    for i, p, step_t in rows(batch, found_inf):
        clr = _clr(lr, 1.0 - beta1 ** float(step_t), lr_round)
        ct, p32, g = inputs(batch, i, grad_scale, maximize, weight_decay)
        m_t, u_t = batch.states[0][i], batch.states[1][i]
        m = torch.lerp(m_t.to(ct), g, 1.0 - beta1)  # two-sided formula, as torch's
        # each side rounded to the state's storage type, the grad to its own, as
        # torch's loop (see numba.adamax); a stochastically rounded store is
        # exp_inf's one rounding
        st = ct if state_round is not None else u_t.dtype
        u = torch.maximum(u_t.to(ct).mul(beta2).to(st).to(ct),
                          g.to(p.dtype).to(ct).abs().add(eps).to(st).to(ct))
        put_state(i, 0, m_t, m)
        put_state(i, 1, u_t, u)
        put(i, p, p32, p32.addcdiv(m, u, value=-clr))
