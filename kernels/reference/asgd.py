"""ASGD for the pure-torch reference backend (see ``kernels/reference``).

Plain tensor arithmetic with one rounding per stored value. This function's
signature is the contract the Numba and Triton ``asgd`` kernels keep.
"""

from __future__ import annotations

import torch

from ._io import inputs, param_store, rows, state_store

__all__ = ["asgd"]


def asgd(batch, *, lr, lambd, alpha, t0, weight_decay, maximize, capturable=False,
         eta_round=1, mu_f32=True, grad_scale=None, found_inf=None, kahan_sum=False,
         stochastic_round=None, state_round=None):
    """ASGD (torch semantics) over every tensor, in place; advances steps, etas and mus.

    States: ``batch.states[0]`` ax, ``[1]`` and ``[2]`` the per-row scalars
    mu and eta: this step reads them, then sets them from the advanced step
    as torch's loop does (``steps.asgd_scalars``; rows without elements
    too). ``capturable``: average at every step; ``eta_round`` (0 float64,
    1 float64 rounded to float32, 2 float32 tensor arithmetic) and
    ``mu_f32``: how torch computes them. With ``found_inf`` nonzero nothing
    is written, steps, etas and mus included.
    """
    if torch.is_tensor(lr):  # capturable's device lr: read here, once
        lr = float(lr)
    if found_inf is not None and bool(found_inf != 0):
        return
    put = param_store(batch, kahan_sum, stochastic_round)
    put_state = state_store(batch, state_round)
    mus, etas = batch.states[1], batch.states[2]
    now = [(float(etas[i]), float(mus[i])) for i in range(len(batch.params))]
    for i, p, _ in rows(batch, found_inf):
        eta, mu = now[i]
        ct, old, g = inputs(batch, i, grad_scale, maximize, weight_decay)
        new = (old * (1.0 - lambd * eta)).add(g, alpha=-eta)
        put(i, p, old, new)
        p_now = p.to(ct)  # the param as stored, which torch averages
        ax_t = batch.states[0][i]
        if capturable or mu != 1:
            ax = ax_t.to(ct)
            put_state(i, 0, ax_t, ax.add(p_now.sub(ax).mul(mu)))
        else:
            put_state(i, 0, ax_t, p_now)
    f32, f64 = torch.float32, torch.float64
    lr_t = torch.tensor(lr, dtype=f32)
    for i in range(len(batch.params)):  # (steps advanced by rows())
        step = float(batch.steps[i])
        if eta_round == 2:  # torch's ops on a float32 Tensor lr
            etas[i].copy_(lr_t / ((1 + lambd * lr_t * step) ** alpha))
        else:
            etas[i].copy_(torch.as_tensor(lr / ((1 + lambd * lr * step) ** alpha),
                                          dtype=f32 if eta_round == 1 else f64))
        mus[i].copy_(torch.as_tensor(1 / max(1, step - t0), dtype=f32 if mu_f32 else f64))
