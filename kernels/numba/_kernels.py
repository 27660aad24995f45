"""Numba multi-tensor kernels: one jitted call updates every row of a table.

Work split: the rows' elements are laid end to end in one global range
``[0, numel)`` which ``bounds`` cuts into one chunk per thread. Each chunk walks
the rows it overlaps and processes each overlap as a slice view starting at
element 0. (A ``range(lo, hi)`` loop with a computed ``lo`` inside ``prange``
ran about 3x slower in the prototype than ``range(n)`` over a slice.) The
parallel kernels walk each slice in prefetching blocks (:func:`_sgd_blocked`),
the serial ones, for batches that fit in cache, in one plain loop.

Scalars arrive already cast to the compute type (float32, or float64 for
float64 tensors); element math never mixes in a float64 literal, so float32
data stays in float32 arithmetic. Each operation rounds where torch's
for-loop rounds, with a fused multiply-add wherever torch's CPU kernel uses
one (``add(alpha=)``, ``lerp``, ``addcmul``): SGD is then bit-exact with
torch in float32/float64, and Adam differs only where torch's own CPU
``sqrt`` is not correctly rounded (about 0.6% of elements, by 1 ulp).
"""

import numpy as np
from numba import carray, njit, prange

from .. import layout as L
from ._memory import (BLOCK, PREFETCH_BYTES, address, fma, load, prefetch_block,
                      store)


@njit(inline="always")
def _view(table, row, col, off, n, itemsize, view_dtype):
    # view_dtype is an empty array of the view's dtype: numba types an array
    # argument in its C fast path (~0.5 us a call), a dtype class in Python
    # (~6 us, and ~27 us a step measured in a whole SGD step)
    return carray(address(table[row, col] + off * itemsize), (n,), view_dtype.dtype)


@njit(inline="always")
def _nanmax(a, b):
    if a != a:
        return a
    if b != b:
        return b
    return a if a > b else b


@njit(inline="always")
def _grad(g, j, inv_scale, maximize):
    """Gradient element ``j`` as the update uses it: AMP-unscaled, maximize-negated."""
    gj = load(g, j)
    if inv_scale is not None:
        gj = gj * inv_scale
    if maximize is not None:
        gj = -gj
    return gj


@njit(inline="always")
def _sgd_element(p, g, b, j, fresh, inv_scale, neg_lr, weight_decay, momentum,
                 one_minus_dampening, nesterov, maximize):
    gj = _grad(g, j, inv_scale, maximize)
    pj = load(p, j)
    if weight_decay is not None:
        gj = fma(pj, weight_decay, gj)
    if b is not None:
        if fresh is not None:
            bj = gj  # torch: the first buffer is the gradient, undampened
        else:
            bj = fma(gj, one_minus_dampening, load(b, j) * momentum)
        store(b, j, bj)
        if nesterov is not None:
            gj = fma(bj, momentum, gj)
        else:
            gj = bj
    store(p, j, fma(gj, neg_lr, pj))


@njit(inline="always")
def _sgd_plain(p, g, b, n, fresh, inv_scale, neg_lr, weight_decay, momentum,
               one_minus_dampening, nesterov, maximize):
    """SGD over ``n`` elements, one plain loop (the serial kernels' span).

    Every optional argument (``b``: no momentum; ``fresh``, ``inv_scale``,
    ``weight_decay``, ``nesterov``, ``maximize``) is None when off, so each
    combination compiles to a straight-line loop that LLVM vectorises.
    Measured on 25.6M fp32 elements: runtime flags ran at 0.89 of the
    read/write-pattern ceiling, compile-time ones at 0.98; a stand-in view
    aliasing another array made LLVM fall back to the scalar loop (bf16 Adam
    17x slower).
    """
    for j in range(n):
        _sgd_element(p, g, b, j, fresh, inv_scale, neg_lr, weight_decay, momentum,
                     one_minus_dampening, nesterov, maximize)


@njit(inline="always")
def _sgd_blocked(p, g, b, n, fresh, inv_scale, neg_lr, weight_decay, momentum,
                 one_minus_dampening, nesterov, maximize):
    """:func:`_sgd_plain` in blocks of ``BLOCK`` elements (the parallel kernels' span).

    Each block first prefetches the block ``PREFETCH_BYTES`` ahead in every
    array (see ``_memory``); the block loop's fixed trip count is what keeps
    it vectorised (a ``range(o, min(o + BLOCK, n))`` inner loop ran 3.5x
    slower). The serial kernels only see batches small enough to sit in
    cache and keep the plain loop, which compiles several times faster: the
    chunk functions take the span as an argument, since numba did not prune
    an ``is None`` switch around the blocked loop and compiled it anyway.
    """
    ahead = PREFETCH_BYTES // p.itemsize
    full = n - n % BLOCK
    for o in range(0, full, BLOCK):
        prefetch_block(p, o + ahead, n)
        prefetch_block(g, o + ahead, n)
        if b is not None:
            prefetch_block(b, o + ahead, n)
        for j in range(o, o + BLOCK):
            _sgd_element(p, g, b, j, fresh, inv_scale, neg_lr, weight_decay,
                         momentum, one_minus_dampening, nesterov, maximize)
    for j in range(full, n):
        _sgd_element(p, g, b, j, fresh, inv_scale, neg_lr, weight_decay, momentum,
                     one_minus_dampening, nesterov, maximize)


@njit(inline="always")
def _sgd_chunk(table, lo, hi, itemsize, view_dtype, inv_scale, neg_lr, weight_decay,
               momentum, one_minus_dampening, nesterov, maximize, use_momentum, span):
    starts = table[:, L.START]
    row = np.searchsorted(starts, lo, side="right") - 1
    while lo < hi:
        start = table[row, L.START]
        end = start + table[row, L.NUMEL]
        if end <= lo:
            row += 1
            continue
        off = lo - start
        n = min(hi, end) - lo
        p = _view(table, row, L.PARAM, off, n, itemsize, view_dtype)
        g = _view(table, row, L.GRAD, off, n, itemsize, view_dtype)
        if use_momentum is None:
            span(p, g, None, n, None, inv_scale, neg_lr, weight_decay,
                 momentum, one_minus_dampening, nesterov, maximize)
        else:
            b = _view(table, row, L.STATE0, off, n, itemsize, view_dtype)
            if table[row, L.FLAGS] & L.FLAG_FRESH:
                span(p, g, b, n, True, inv_scale, neg_lr, weight_decay,
                     momentum, one_minus_dampening, nesterov, maximize)
            else:
                span(p, g, b, n, None, inv_scale, neg_lr, weight_decay,
                     momentum, one_minus_dampening, nesterov, maximize)
        lo += n
        row += 1


@njit(parallel=True, cache=True, error_model="numpy")
def sgd_parallel(table, bounds, itemsize, view_dtype, inv_scale, neg_lr, weight_decay,
                 momentum, one_minus_dampening, nesterov, maximize, use_momentum):
    for c in prange(len(bounds) - 1):
        _sgd_chunk(table, bounds[c], bounds[c + 1], itemsize, view_dtype, inv_scale,
                   neg_lr, weight_decay, momentum, one_minus_dampening, nesterov,
                   maximize, use_momentum, _sgd_blocked)


@njit(cache=True, error_model="numpy")
def sgd_serial(table, bounds, itemsize, view_dtype, inv_scale, neg_lr, weight_decay,
               momentum, one_minus_dampening, nesterov, maximize, use_momentum):
    _sgd_chunk(table, bounds[0], bounds[-1], itemsize, view_dtype, inv_scale, neg_lr,
               weight_decay, momentum, one_minus_dampening, nesterov, maximize,
               use_momentum, _sgd_plain)


@njit(inline="always")
def _adam_scalars(table, lr, beta1, beta2, out):
    """Advance every row's step and compute its bias-corrected scalars.

    Done in float64 from the stored step, as torch's for-loop does in Python,
    then stored in ``out``'s dtype (the compute type). Rows with no elements
    still count their step. A third column, where ``out`` has one, gets
    RN(1 / the stored second), for :func:`_div_by_row_constant`: an IEEE
    division in the compute type, so 0, inf and NaN give what ``x / d`` does.
    """
    one = np.ones_like(out[0:1, 0])[0]
    for row in range(table.shape[0]):
        if table[row, L.FLAGS] & L.FLAG_STEP_F64:
            s64 = carray(address(table[row, L.STEP]), (1,), np.float64)
            s64[0] += 1.0
            step = s64[0]
        else:
            s32 = carray(address(table[row, L.STEP]), (1,), np.float32)
            s32[0] += np.float32(1.0)
            step = np.float64(s32[0])
        out[row, 0] = lr / (1.0 - beta1 ** step)  # step size
        out[row, 1] = (1.0 - beta2 ** step) ** 0.5  # sqrt of 2nd bias correction
        if out.shape[1] > 2:
            out[row, 2] = one / out[row, 1]


@njit(inline="always")
def _div_by_row_constant(x, d, inv_d):
    """``x / d`` correctly rounded, for a divisor shared by a whole row.

    ``inv_d`` is RN(1/d). The quotient ``x * inv_d`` is corrected once with
    its exact FMA residual (Markstein's division step): a multiply and two
    FMAs on the FMA ports instead of a division on the divider, which Adam
    already loads with a square root and a second division per element.
    bf16 AdamW, which moves half the bytes per element and so leans on the
    divider, ran in 0.96 of the time on the resnet50 list (interleaved A/B,
    30 rounds); fp32 (memory-bound) was unchanged.
    Checked equal to ``x / d`` bit for bit on 2.2e10 float32 pairs (the bias
    corrections of beta2 0.999 up to step 20000, of 0.99 and 0.95, and 2000
    random divisors in (0.01, 1), against x over the whole range of
    sqrt(float32)) and 5e9 float64 pairs. Where the residual is NaN the
    uncorrected quotient is already ``x / d``: infinite or NaN ``x``, and the
    divisors torch reaches with ``beta2`` edited to 1 or more (0, inf, NaN;
    ``inv_d`` is then inf, 0 or NaN).
    """
    q = x * inv_d
    r = fma(-q, d, x)
    return q if r != r else fma(r, inv_d, q)


@njit(inline="always")
def _adam_element(p, g, m, v, vmax, j, neg_step_size, bc2_sqrt, inv_bc2_sqrt,
                  inv_scale, beta1_minus_1, beta2, one_minus_beta1, one_minus_beta2, eps,
                  weight_decay, decay, maximize):
    gj = _grad(g, j, inv_scale, maximize)
    pj = load(p, j)
    if decay is not None:
        pj = pj * decay
    if weight_decay is not None:
        gj = fma(pj, weight_decay, gj)
    mj = load(m, j)
    # torch.lerp's two-sided formula, as its CPU kernel evaluates it
    if beta1_minus_1 is None:
        mj = fma(one_minus_beta1, gj - mj, mj)
    else:
        mj = fma(beta1_minus_1, gj - mj, gj)
    vj = fma(one_minus_beta2 * gj, gj, load(v, j) * beta2)
    store(m, j, mj)
    store(v, j, vj)
    if vmax is not None:
        vj = _nanmax(load(vmax, j), vj)
        store(vmax, j, vj)
    denom = _div_by_row_constant(np.sqrt(vj), bc2_sqrt, inv_bc2_sqrt) + eps
    store(p, j, pj + (neg_step_size * mj) / denom)  # torch's addcdiv order


@njit(inline="always")
def _adam_plain(p, g, m, v, vmax, n, neg_step_size, bc2_sqrt, inv_bc2_sqrt, inv_scale,
                beta1_minus_1, beta2, one_minus_beta1, one_minus_beta2, eps,
                weight_decay, decay, maximize):
    """Adam over ``n`` elements; None turns a part off at compile time.

    ``vmax`` None: no amsgrad. ``weight_decay`` (L2) and ``decay``
    (decoupled) are None when unused. ``beta1_minus_1`` is None when
    torch.lerp takes its small-weight side. See :func:`_sgd_plain`.
    """
    for j in range(n):
        _adam_element(p, g, m, v, vmax, j, neg_step_size, bc2_sqrt, inv_bc2_sqrt,
                      inv_scale, beta1_minus_1, beta2, one_minus_beta1,
                      one_minus_beta2, eps, weight_decay, decay, maximize)


@njit(inline="always")
def _adam_blocked(p, g, m, v, vmax, n, neg_step_size, bc2_sqrt, inv_bc2_sqrt,
                  inv_scale, beta1_minus_1, beta2, one_minus_beta1, one_minus_beta2,
                  eps, weight_decay, decay, maximize):
    """:func:`_adam_plain` in prefetching blocks, as :func:`_sgd_blocked`."""
    ahead = PREFETCH_BYTES // p.itemsize
    full = n - n % BLOCK
    for o in range(0, full, BLOCK):
        prefetch_block(p, o + ahead, n)
        prefetch_block(g, o + ahead, n)
        prefetch_block(m, o + ahead, n)
        prefetch_block(v, o + ahead, n)
        if vmax is not None:
            prefetch_block(vmax, o + ahead, n)
        for j in range(o, o + BLOCK):
            _adam_element(p, g, m, v, vmax, j, neg_step_size, bc2_sqrt, inv_bc2_sqrt,
                      inv_scale, beta1_minus_1, beta2, one_minus_beta1,
                      one_minus_beta2, eps, weight_decay, decay, maximize)
    for j in range(full, n):
        _adam_element(p, g, m, v, vmax, j, neg_step_size, bc2_sqrt, inv_bc2_sqrt,
                      inv_scale, beta1_minus_1, beta2, one_minus_beta1,
                      one_minus_beta2, eps, weight_decay, decay, maximize)


@njit(inline="always")
def _adam_chunk(table, scalars, lo, hi, itemsize, view_dtype, inv_scale,
                beta1_minus_1, beta2, one_minus_beta1, one_minus_beta2, eps,
                weight_decay, decay, amsgrad, maximize, span):
    starts = table[:, L.START]
    row = np.searchsorted(starts, lo, side="right") - 1
    while lo < hi:
        start = table[row, L.START]
        end = start + table[row, L.NUMEL]
        if end <= lo:
            row += 1
            continue
        off = lo - start
        n = min(hi, end) - lo
        neg_step_size = -scalars[row, 0]
        bc2_sqrt = scalars[row, 1]
        inv_bc2_sqrt = scalars[row, 2]
        p = _view(table, row, L.PARAM, off, n, itemsize, view_dtype)
        g = _view(table, row, L.GRAD, off, n, itemsize, view_dtype)
        m = _view(table, row, L.STATE0, off, n, itemsize, view_dtype)
        v = _view(table, row, L.STATE1, off, n, itemsize, view_dtype)
        if amsgrad is None:
            span(p, g, m, v, None, n, neg_step_size, bc2_sqrt, inv_bc2_sqrt, inv_scale,
                 beta1_minus_1, beta2, one_minus_beta1, one_minus_beta2, eps,
                 weight_decay, decay, maximize)
        else:
            vmax = _view(table, row, L.STATE2, off, n, itemsize, view_dtype)
            span(p, g, m, v, vmax, n, neg_step_size, bc2_sqrt, inv_bc2_sqrt, inv_scale,
                 beta1_minus_1, beta2, one_minus_beta1, one_minus_beta2, eps,
                 weight_decay, decay, maximize)
        lo += n
        row += 1


@njit(parallel=True, cache=True, error_model="numpy")
def adam_parallel(table, bounds, itemsize, view_dtype, lr, beta1, beta2,
                  scalars, inv_scale, c_b1m1, c_beta2, c_omb1, c_omb2, c_eps, c_wd,
                  c_decay, amsgrad, maximize):
    _adam_scalars(table, lr, beta1, beta2, scalars)
    for c in prange(len(bounds) - 1):
        _adam_chunk(table, scalars, bounds[c], bounds[c + 1], itemsize,
                    view_dtype, inv_scale, c_b1m1, c_beta2, c_omb1, c_omb2, c_eps,
                    c_wd, c_decay, amsgrad, maximize, _adam_blocked)


@njit(cache=True, error_model="numpy")
def adam_serial(table, bounds, itemsize, view_dtype, lr, beta1, beta2,
                scalars, inv_scale, c_b1m1, c_beta2, c_omb1, c_omb2, c_eps, c_wd,
                c_decay, amsgrad, maximize):
    _adam_scalars(table, lr, beta1, beta2, scalars)
    _adam_chunk(table, scalars, bounds[0], bounds[-1], itemsize, view_dtype,
                inv_scale, c_b1m1, c_beta2, c_omb1, c_omb2, c_eps, c_wd, c_decay,
                amsgrad, maximize, _adam_plain)


@njit(cache=True, error_model="numpy")
def host_step_scalars(table, lr, beta1, beta2, out):
    """Advance host-memory step counters; per-row scalars for a GPU kernel."""
    _adam_scalars(table, lr, beta1, beta2, out)
