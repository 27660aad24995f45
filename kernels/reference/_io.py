"""What every reference kernel reads from a row and how it writes the row back.

The parts of an update that are the same in every optimizer: whether a step
writes at all (GradScaler's ``found_inf``), a row's compute dtype, param and
gradient as the update rule takes them, and the param store through the
bfloat16/float16 options.
"""

from __future__ import annotations

import torch

__all__ = ["skip", "inputs", "param_store"]


def skip(found_inf) -> bool:
    """Whether GradScaler found an inf: then nothing is written, steps included."""
    return found_inf is not None and bool(found_inf != 0)


def compute_dtype(t):
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def inputs(batch, i, grad_scale, maximize, weight_decay):
    """``(ct, p, g)`` of row ``i``: its compute dtype, its param in that dtype,
    and its gradient as the update rule takes it.

    The gradient is unscaled (GradScaler's ``unscale_`` multiplies by a
    float32 reciprocal; so does this), negated for ``maximize``, and, with
    ``weight_decay`` nonzero, L2-decayed: ``g.add(p, alpha=weight_decay)``,
    a fused multiply-add on CPU.
    """
    p = batch.params[i]
    ct = compute_dtype(p)
    g = batch.grads[i].to(ct)
    if grad_scale is not None:
        inv = grad_scale.double().reciprocal().float().to(g.device)
        g = g * inv.to(g.dtype)
    if maximize:
        g = -g
    p32 = p.to(ct)
    if weight_decay != 0:
        g = g.add(p32, alpha=weight_decay)
    return ct, p32, g


def param_store(batch, kahan_sum, stochastic_round):
    """``put(i, p, old, new)``: store row ``i``'s result through the options.

    ``old`` is the param's stored value and ``new`` the update's result, both
    in the compute type. Kahan summation and stochastic rounding act on
    bfloat16/float16 rows only (see ``_precision``); other rows, and rows
    with the options off, take ``p.copy_(new)``. ``stochastic_round`` is
    None or ``(seed, counter, salt)`` with ``counter`` a 0-dim int64 tensor.
    """
    from . import _precision as P

    low = batch.dtype in P.LOW_PRECISION
    kahan = kahan_sum and low
    stream = None
    if stochastic_round is not None and low:
        seed, counter, salt = stochastic_round
        stream = P.keys(int(seed), int(counter), int(salt))
    if not kahan and stream is None:
        return lambda i, p, old, new: p.copy_(new)
    from .. import layout as L

    def put(i, p, old, new):
        P.store_param(p, old, new, batch.states[3][i] if kahan else None, stream,
                      int(batch.table[i, L.START]))
    return put
