"""Adagrad for the pure-torch reference backend (see ``kernels/reference``).

Plain tensor arithmetic, no ``torch.optim`` code: math in float32 (float64
for float64 tensors), one rounding per stored value, and the ops whose CPU
kernels round as the compiled backends do (``add(alpha=)`` and ``addcmul``
are fused multiply-adds; ``addcdiv`` is ``p + (value * g) / std``).
"""

from __future__ import annotations

import math

import torch

from ._io import inputs, param_store, rows, state_store

__all__ = ["adagrad"]


#: ``lr_round`` codes (kernels/steps.py's LR_F64 ... LR_F16): the dtype
#: of a Tensor lr, which torch's loop computes clr in
_LR_DTYPES = {1: torch.float32, 2: torch.bfloat16, 3: torch.float16}


def clr(lr: float, lr_decay: float, step: float, lr_round: int = 0) -> float:
    """torch's ``lr / (1 + (step - 1) * lr_decay)``, as an IEEE division.

    In float64, as torch's for-loop computes it in Python for a float (or
    float64 Tensor) lr; with ``lr_round`` nonzero as torch's division of a
    0-dim Tensor lr of that dtype by the Python float denominator does. A
    zero denominator (an ``lr_decay`` edited below 0) gives inf or NaN; the
    API layer has raised torch's ZeroDivisionError first where torch's step
    would.
    """
    d = 1.0 + (step - 1.0) * lr_decay
    if lr_round:
        return float(torch.tensor(lr, dtype=_LR_DTYPES[int(lr_round)]) / d)
    if d != 0:
        return lr / d
    if lr != lr or lr == 0 or d != d:
        return math.nan
    return math.copysign(math.inf, lr) * math.copysign(1.0, d)


def adagrad(batch, *, lr, lr_decay, eps, weight_decay, maximize, lr_round=0,
            grad_scale=None, found_inf=None, kahan_sum=False, stochastic_round=None,
            state_round=None):
    """Adagrad (torch semantics) over every tensor, in place; advances steps.

    With ``found_inf`` nonzero nothing is written, steps included.
    """
    put = param_store(batch, kahan_sum, stochastic_round)
    put_state = state_store(batch, state_round)
    for i, p, step_t in rows(batch, found_inf):
        neg_clr = -clr(lr, lr_decay, float(step_t), lr_round)
        ct, p32, g = inputs(batch, i, grad_scale, maximize, weight_decay)
        s_t = batch.states[0][i]
        s = s_t.to(ct).addcmul(g, g, value=1)
        put_state(i, 0, s_t, s)
        std = s.sqrt().add(eps)
        put(i, p, p32, p32.addcdiv(g, std, value=neg_clr))
