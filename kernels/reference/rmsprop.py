"""RMSprop for the pure-torch reference backend (the ``torch`` backend).

Plain tensor arithmetic, as the rest of ``kernels/reference``: float32 math
(float64 for float64 tensors), one rounding per stored value, and the ops
whose CPU kernels round as the compiled backends do (``mul`` then
``addcmul``, ``lerp``, ``addcmul(value=-1)``, ``sqrt``, ``add``,
``addcdiv``, ``add(alpha=)``). This function's signature is the contract the
Numba and Triton ``rmsprop`` kernels keep.
"""

from __future__ import annotations

import torch

from ._io import inputs, param_store, rows, state_store

__all__ = ["rmsprop"]


def rmsprop(batch, *, lr, alpha, eps, weight_decay, momentum, centered, maximize,
            grad_scale=None, found_inf=None, kahan_sum=False, stochastic_round=None,
            state_round=None):
    """RMSprop (torch semantics) over every tensor of ``batch``, in place; advances steps.

    States: ``batch.states[0]`` square_avg, ``[1]`` momentum_buffer (used when
    ``momentum > 0``), ``[2]`` grad_avg (used when ``centered``). With
    ``found_inf`` nonzero nothing is written, steps included.
    """
    if torch.is_tensor(lr):  # capturable's device lr: read here, once
        lr = float(lr)
    put = param_store(batch, kahan_sum, stochastic_round)
    put_state = state_store(batch, state_round)
    for i, p, _ in rows(batch, found_inf):
        ct, p32, g = inputs(batch, i, grad_scale, maximize, weight_decay)
        sq_t = batch.states[0][i]
        sq = sq_t.to(ct).mul(alpha).addcmul(g, g, value=1.0 - alpha)
        put_state(i, 0, sq_t, sq)
        if centered:
            ga_t = batch.states[2][i]
            ga = torch.lerp(ga_t.to(ct), g, 1.0 - alpha)  # two-sided formula, as torch's
            put_state(i, 2, ga_t, ga)
            avg = sq.addcmul(ga, ga, value=-1).sqrt()
        else:
            avg = sq.sqrt()
        avg = avg.add(eps)
        if momentum > 0:
            b_t = batch.states[1][i]
            b = b_t.to(ct).mul(momentum).addcdiv(g, avg)
            put_state(i, 1, b_t, b)
            put(i, p, p32, p32.add(b, alpha=-lr))
        else:
            put(i, p, p32, p32.addcdiv(g, avg, value=-lr))
