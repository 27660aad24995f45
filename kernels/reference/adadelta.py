"""Adadelta for the pure-torch reference backend.

Plain tensor arithmetic, as the rest of ``kernels/reference``: float32 math
(float64 for float64 tensors), one rounding per stored value, and the ops
whose CPU kernels round as the compiled backends do (``mul`` then
``addcmul``, ``add``, ``sqrt``, ``div``, ``mul``, ``add(alpha=)``). This
function's signature is the contract the Numba and Triton ``adadelta``
kernels keep.
"""

from __future__ import annotations

import torch

from ._io import inputs, param_store, rows, state_store

__all__ = ["adadelta"]


def adadelta(batch, *, lr, rho, eps, weight_decay, maximize, grad_scale=None,
             found_inf=None, kahan_sum=False, stochastic_round=None, state_round=None):
    """Adadelta (torch semantics) over every tensor of ``batch``, in place; advances steps.

    States: ``batch.states[0]`` square_avg, ``[1]`` acc_delta. With
    ``found_inf`` nonzero nothing is written, steps included.
    """
    if torch.is_tensor(lr):  # capturable's device lr: read here, once
        lr = float(lr)
    put = param_store(batch, kahan_sum, stochastic_round)
    put_state = state_store(batch, state_round)
    for i, p, _ in rows(batch, found_inf):
        ct, p32, g = inputs(batch, i, grad_scale, maximize, weight_decay)
        sq_t, ad_t = batch.states[0][i], batch.states[1][i]
        sq = sq_t.to(ct).mul(rho).addcmul(g, g, value=1.0 - rho)
        put_state(i, 0, sq_t, sq)
        std = sq.add(eps).sqrt()
        ad = ad_t.to(ct)
        delta = ad.add(eps).sqrt().div(std).mul(g)
        put_state(i, 1, ad_t, ad.mul(rho).addcmul(delta, delta, value=1.0 - rho))
        put(i, p, p32, p32.add(delta, alpha=-lr))
