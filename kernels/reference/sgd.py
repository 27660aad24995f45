"""SGD for the pure-torch reference backend (see ``kernels/reference``).

This function's signature is the contract the Numba and Triton ``sgd``
kernels keep.
"""

from __future__ import annotations

from ._io import inputs, param_store, rows, state_store

__all__ = ["sgd"]


def sgd(batch, *, lr, weight_decay, momentum, dampening, nesterov, maximize,
        grad_scale=None, found_inf=None, kahan_sum=False, stochastic_round=None,
        state_round=None):
    """SGD (torch semantics) over every tensor of ``batch``, in place.

    ``kahan_sum`` / ``stochastic_round`` (every kernel's last two keywords):
    how bfloat16/float16 params are stored, see ``_io.param_store``.
    """
    put = param_store(batch, kahan_sum, stochastic_round)
    put_state = state_store(batch, state_round)
    for i, p, _ in rows(batch, found_inf):
        ct, p32, g = inputs(batch, i, grad_scale, maximize, weight_decay)
        if momentum != 0:
            buf = batch.states[0][i]
            if batch.row_flags[i]:
                b = g
            else:
                b = buf.to(ct).mul(momentum).add(g, alpha=1.0 - dampening)
            put_state(i, 0, buf, b)
            g = g.add(b, alpha=momentum) if nesterov else b
        put(i, p, p32, p32.add(g, alpha=-lr))
