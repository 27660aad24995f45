"""Pure-torch reference backend: the update rules written out per tensor.

It is the ``torch`` backend (any device, no compiler) and the reference the
tests import. It uses plain tensor arithmetic only: no ``torch.optim`` code, no
``_foreach_*`` or ``_fused_*`` ops. Math runs in float32 (float64 for float64
tensors) and each stored value is rounded once, like the compiled backends.
The ops are the ones whose CPU kernels round as the compiled backends do
(``add(alpha=)``, ``lerp`` and ``addcmul`` are fused multiply-adds).
"""

from __future__ import annotations

import math

import torch

__all__ = ["sgd", "adam"]

# the contract (kernels/contract.py): the fallback that runs anywhere
NAME = "torch"
DEVICES = None
INTERPRETED_DEVICES = ()
SUPPORTED_DTYPES = None
INSTALL_HINT = None
DEVICE_HINT = None


def _compute_dtype(t):
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def _unscale(g, grad_scale):
    if grad_scale is None:
        return g
    # GradScaler.unscale_ multiplies by a float32 reciprocal; so do we
    inv = grad_scale.double().reciprocal().float().to(g.device)
    return g * inv.to(g.dtype)


def _ieee_div(a: float, b: float) -> float:
    """``a / b`` as the compiled kernels divide: inf or NaN where Python raises.

    (A ``beta1`` edited to 1 makes the bias correction 0; the API layer has
    already raised torch's ZeroDivisionError where torch's for-loop would.)
    """
    if b != 0:
        return a / b
    if a != a or a == 0:
        return math.nan
    return math.copysign(math.inf, a) * math.copysign(1.0, b)


def _skip(found_inf) -> bool:
    return found_inf is not None and bool(found_inf != 0)


def param_store(batch, kahan_sum, stochastic_round):
    """``put(i, p, old, new)``: store row ``i``'s result through the options.

    ``old`` is the param's stored value and ``new`` the update's result, both
    in the compute type. Kahan summation and stochastic rounding act on
    bfloat16/float16 rows only (see ``_precision``); other rows, and rows
    with the options off, take ``p.copy_(new)``.
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


def sgd(batch, *, lr, weight_decay, momentum, dampening, nesterov, maximize,
        grad_scale=None, found_inf=None, kahan_sum=False, stochastic_round=None):
    """SGD (torch semantics) over every tensor of ``batch``, in place.

    ``kahan_sum`` / ``stochastic_round`` (every kernel's last two keywords):
    how bfloat16/float16 params are stored, see :func:`param_store`;
    ``stochastic_round`` is None or ``(seed, counter, salt)`` with ``counter``
    a 0-dim int64 tensor.
    """
    if _skip(found_inf):
        return
    put = param_store(batch, kahan_sum, stochastic_round)
    for i, p in enumerate(batch.params):
        if p.numel() == 0:
            continue
        ct = _compute_dtype(p)
        g = _unscale(batch.grads[i].to(ct), grad_scale)
        if maximize:
            g = -g
        p32 = p.to(ct)
        if weight_decay != 0:
            g = g.add(p32, alpha=weight_decay)
        if momentum != 0:
            buf = batch.states[0][i]
            if batch.row_flags[i]:
                b = g
            else:
                b = buf.to(ct).mul(momentum).add(g, alpha=1.0 - dampening)
            buf.copy_(b)
            g = g.add(b, alpha=momentum) if nesterov else b
        put(i, p, p32, p32.add(g, alpha=-lr))


def adam(batch, *, lr, beta1, beta2, eps, weight_decay, decoupled_weight_decay,
         amsgrad, maximize, grad_scale=None, found_inf=None, kahan_sum=False,
         stochastic_round=None):
    """Adam / AdamW (torch semantics) over every tensor, in place; advances steps."""
    if _skip(found_inf):
        return
    put = param_store(batch, kahan_sum, stochastic_round)
    for i, p in enumerate(batch.params):
        step_t = batch.steps[i]
        step_t += 1
        step = float(step_t)
        if p.numel() == 0:
            continue
        ct = _compute_dtype(p)
        step_size = _ieee_div(lr, 1.0 - beta1 ** step)
        bc2_sqrt = math.sqrt(1.0 - beta2 ** step)
        g = _unscale(batch.grads[i].to(ct), grad_scale)
        if maximize:
            g = -g
        p32 = old = p.to(ct)
        if weight_decay != 0:
            if decoupled_weight_decay:
                p32 = p32 * (1.0 - lr * weight_decay)
            else:
                g = g.add(p32, alpha=weight_decay)
        m_t, v_t = batch.states[0][i], batch.states[1][i]
        m = torch.lerp(m_t.to(ct), g, 1.0 - beta1)  # two-sided formula, as torch's
        v = v_t.to(ct).mul(beta2).addcmul(g, g, value=1.0 - beta2)
        m_t.copy_(m)
        v_t.copy_(v)
        if amsgrad:
            vmax_t = batch.states[2][i]
            v = torch.maximum(vmax_t.to(ct), v)
            vmax_t.copy_(v)
        denom = v.sqrt() / bc2_sqrt + eps
        put(i, p, old, p32.addcdiv(m, denom, value=-step_size))
