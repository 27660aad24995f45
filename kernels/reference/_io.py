"""What every reference kernel reads from a row and how it writes the row back.

The parts of an update that are the same in every optimizer: which rows a
step writes (none after GradScaler's ``found_inf``) and their step counters,
a row's compute dtype, param and gradient as the update rule takes them, and
the param store through the bfloat16/float16 options.
"""

from __future__ import annotations

import torch

__all__ = ["rows", "inputs", "param_store", "state_load", "state_store"]


def rows(batch, found_inf):
    """``(i, p, step)`` for each row of ``batch`` that an update writes.

    None at all where ``found_inf`` is nonzero (GradScaler found an inf:
    nothing is written, steps included). Otherwise every row's step counter, where the
    optimizer keeps them (``batch.steps``), is advanced by one, in place,
    empty rows' too; ``step`` is that 0-dim tensor (None without counters),
    and rows without elements are passed over.
    """
    if found_inf is not None and bool(found_inf != 0):
        return
    for i, p in enumerate(batch.params):
        step = None
        if batch.steps:
            step = batch.steps[i]
            step += 1
        if p.numel() == 0:
            continue
        yield i, p, step


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
    from .. import columns as L

    def put(i, p, old, new):
        P.store_param(p, old, new, batch.states[3][i] if kahan else None, stream,
                      int(batch.table[i, L.START]))
    return put


def state_load(batch):
    """``get(i, c, s, ct)``: row ``i``'s state column ``c`` (tensor ``s``) in the
    compute type ``ct``; 8-bit codes (``batch.state_dtype`` uint8) decoded
    with their block scales (``_blockwise.dequantize``)."""
    if batch.state_dtype != torch.uint8:
        return lambda i, c, s, ct: s.to(ct)
    from . import _blockwise

    return lambda i, c, s, ct: _blockwise.dequantize(s, batch.states[4 + c][i], c)


def state_store(batch, state_round):
    """``put(i, c, s, new)``: store row ``i``'s state column ``c`` (tensor ``s``).

    ``new`` is in the compute type. Without ``state_round``, ``s.copy_(new)``
    (rounded to nearest to the state's dtype); with it (``(seed, counter,
    salt)``, the ``state_dtype`` option's stream; bfloat16 state only),
    stochastically rounded (``_precision.store_state``). 8-bit codes are
    encoded with new block scales (``_blockwise.quantize``).
    """
    if batch.state_dtype == torch.uint8:
        from . import _blockwise
        from . import _precision as P
        from .. import columns as L

        stream = None if state_round is None else P.keys(*map(int, state_round))

        def encode(i, c, s, new):
            rbits = None
            if stream is not None and c > 0:  # the second moments: stochastically
                start = int(batch.table[i, L.START])
                idx = torch.arange(start, start + s.numel(), device=s.device)
                rbits = P.state_bits(*stream, idx, c)
            _blockwise.quantize(new, c, codes=s, absmax=batch.states[4 + c][i], rbits=rbits)
        return encode
    if state_round is None:
        return lambda i, c, s, new: s.copy_(new)
    from . import _precision as P
    from .. import columns as L

    seed, counter, salt = state_round
    stream = P.keys(int(seed), int(counter), int(salt))

    def put(i, c, s, new):
        if s.dtype != torch.bfloat16:
            raise ValueError(f"state_round stores bfloat16 state, not {s.dtype}")
        P.store_state(s, new, stream, c, int(batch.table[i, L.START]))
    return put
