"""Rprop for the pure-torch reference backend.

torch's own for-loop arithmetic, in the storage dtype as torch computes it:
the sign cases are data-dependent per element, and torch decides them on the
product ``grad * prev`` rounded to the storage dtype, with ``etas`` and the
step-size bounds as that dtype holds them. The step size is stored by every
op as torch's is; the param is stored once, through the precision options.
This function's signature is the contract the Numba and Triton ``rprop``
kernels keep.
"""

from __future__ import annotations

import numpy as np
import torch

from ._io import compute_dtype, param_store, rows, state_store

__all__ = ["rprop", "as_stored"]


def as_stored(dtype, v) -> float:
    """``v`` as a tensor of ``dtype`` holds it: torch's Scalar conversion (to
    float32, then to nearest even bfloat16/float16), on the host without a
    tensor (a capturable step reads nothing on the host). The compiled
    kernels take etas and step-size bounds so."""
    if dtype == torch.float64:
        return float(v)
    f = np.float32(v)
    if dtype == torch.float16:
        with np.errstate(over="ignore"):  # beyond 65519.99: inf, as torch's
            return float(np.float16(f))
    if dtype == torch.bfloat16 and np.isfinite(f):
        u = int(f.view(np.uint32))
        u = ((u + 0x7FFF + ((u >> 16) & 1)) >> 16) << 16
        return float(np.array(u & 0xFFFFFFFF, dtype=np.uint32).view(np.float32))
    return float(f)


def rprop(batch, *, etaminus, etaplus, step_size_min, step_size_max, maximize,
          grad_scale=None, found_inf=None, kahan_sum=False, stochastic_round=None,
          state_round=None):
    """Rprop (torch semantics) over every tensor of ``batch``, in place; advances steps.

    States: ``batch.states[0]`` prev, ``[1]`` step_size. The grad is
    unscaled in its own dtype (as GradScaler's ``unscale_`` stores it),
    never written. With ``found_inf`` nonzero nothing is written, steps
    included.
    """
    put = param_store(batch, kahan_sum, stochastic_round)
    put_state = state_store(batch, state_round)
    bounds = (as_stored(batch.dtype, step_size_min), as_stored(batch.dtype, step_size_max))
    for i, p, _ in rows(batch, found_inf):
        ct = compute_dtype(p)
        g = batch.grads[i]
        if grad_scale is not None:
            inv = grad_scale.double().reciprocal().float().to(g.device)
            g = (g.to(ct) * inv.to(ct)).to(g.dtype)
        if maximize:
            g = -g
        prev, step_size = batch.states[0][i], batch.states[1][i]
        # the sign cases in the grad's dtype (bfloat16 state: widened to it)
        sign = g.mul(prev.to(g.dtype)).sign()
        sign[sign.gt(0)] = etaplus
        sign[sign.lt(0)] = etaminus
        sign[sign.eq(0)] = 1
        if state_round is None:
            step_size.mul_(sign).clamp_(step_size_min, step_size_max)
            size = step_size.to(ct)
        else:  # the step size in the compute type, its one rounding the state's store
            size = step_size.to(ct).mul(sign.to(ct)).clamp_(*bounds)
            put_state(i, 1, step_size, size)
        g = g.clone()
        g[sign.eq(etaminus)] = 0
        p32 = p.to(ct)
        put(i, p, p32, p32.addcmul(g.sign().to(ct), size, value=-1))
        if state_round is None:
            prev.copy_(g)
        else:
            put_state(i, 0, prev, g.to(ct))
