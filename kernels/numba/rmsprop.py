"""RMSprop for the Numba CPU backend: one jitted call per batch.

The launcher (:func:`rmsprop`) and the jitted bodies live together here. The
row walk (:func:`_rmsprop_chunk`) is modeled on ``_kernels._adam_chunk``: the
rows' elements are laid end to end in ``[0, numel)``, ``bounds`` cuts that
range into one chunk per thread, and each chunk walks the rows it overlaps as
slice views. Element math: float32 (float64 for float64 tensors), one
rounding per stored value, a fused multiply-add exactly where torch's CPU
kernels use one (``addcmul``, ``lerp``, ``add(alpha=)``), none elsewhere
(``mul`` then ``addcmul``, ``addcdiv``).

Shared helpers used (one place, to be switched to a shared walk later): from
``_memory`` the raw-address view, loads/stores and prefetching; from the
package the launcher's work split and AMP helpers.
"""

import numpy as np
from numba import carray, njit, prange

from .. import layout as L
# ---- shared helpers (the only ones this module uses) ----
from . import _NO_LOCK, _PARALLEL, _amp, _on, _opt, _plan
from ._memory import (BLOCK, PREFETCH_BYTES, address, fma, load, prefetch_block,
                      store)

# ---------------------------------------------------------------------------

__all__ = ["rmsprop", "advance_steps"]


@njit(inline="always")
def _view(table, row, col, off, n, itemsize, view_dtype):
    # as _kernels._view: view_dtype is an empty array of the view's dtype
    return carray(address(table[row, col] + off * itemsize), (n,), view_dtype.dtype)


@njit(inline="always")
def _advance(table):
    """Advance every row's step counter by one (rows with no elements too)."""
    for row in range(table.shape[0]):
        if table[row, L.FLAGS] & L.FLAG_STEP_F64:
            s64 = carray(address(table[row, L.STEP]), (1,), np.float64)
            s64[0] += 1.0
        else:
            s32 = carray(address(table[row, L.STEP]), (1,), np.float32)
            s32[0] += np.float32(1.0)  # a float32 add, as torch's step += 1


@njit(inline="always")
def _rmsprop_element(p, g, sq, buf, gavg, j, inv_scale, neg_lr, alpha, oma, oma_m1, eps,
                     weight_decay, momentum, maximize):
    gj = load(g, j)
    if inv_scale is not None:
        gj = gj * inv_scale
    if maximize is not None:
        gj = -gj
    pj = load(p, j)
    if weight_decay is not None:
        gj = fma(pj, weight_decay, gj)  # grad.add(param, alpha=wd)
    # square_avg.mul_(alpha).addcmul_(grad, grad, value=1 - alpha)
    sj = fma(oma * gj, gj, load(sq, j) * alpha)
    store(sq, j, sj)
    if gavg is not None:
        aj = load(gavg, j)
        # grad_avg.lerp_(grad, 1 - alpha): torch.lerp's two-sided formula
        if oma_m1 is None:
            aj = fma(oma, gj - aj, aj)
        else:
            aj = fma(oma_m1, gj - aj, gj)
        store(gavg, j, aj)
        sj = fma(-aj, aj, sj)  # square_avg.addcmul(grad_avg, grad_avg, value=-1)
    avg = np.sqrt(sj) + eps
    if buf is not None:
        bj = load(buf, j) * momentum + gj / avg  # buf.mul_(momentum).addcdiv_(grad, avg)
        store(buf, j, bj)
        store(p, j, fma(bj, neg_lr, pj))  # param.add_(buf, alpha=-lr)
    else:
        store(p, j, pj + (neg_lr * gj) / avg)  # param.addcdiv_(grad, avg, value=-lr)


@njit(inline="always")
def _rmsprop_plain(p, g, sq, buf, gavg, n, inv_scale, neg_lr, alpha, oma, oma_m1, eps,
                   weight_decay, momentum, maximize):
    """RMSprop over ``n`` elements, one loop; None turns a part off at compile time.

    ``buf`` None: no momentum; ``gavg`` None: not centered; ``oma_m1`` None:
    torch.lerp's small-weight side; ``inv_scale``, ``weight_decay``,
    ``maximize`` None: unused.
    """
    for j in range(n):
        _rmsprop_element(p, g, sq, buf, gavg, j, inv_scale, neg_lr, alpha, oma, oma_m1,
                         eps, weight_decay, momentum, maximize)


@njit(inline="always")
def _rmsprop_blocked(p, g, sq, buf, gavg, n, inv_scale, neg_lr, alpha, oma, oma_m1, eps,
                     weight_decay, momentum, maximize):
    """:func:`_rmsprop_plain` in prefetching blocks (as ``_kernels._sgd_blocked``)."""
    ahead = PREFETCH_BYTES // p.itemsize
    full = n - n % BLOCK
    for o in range(0, full, BLOCK):
        prefetch_block(p, o + ahead, n)
        prefetch_block(g, o + ahead, n)
        prefetch_block(sq, o + ahead, n)
        if buf is not None:
            prefetch_block(buf, o + ahead, n)
        if gavg is not None:
            prefetch_block(gavg, o + ahead, n)
        for j in range(o, o + BLOCK):
            _rmsprop_element(p, g, sq, buf, gavg, j, inv_scale, neg_lr, alpha, oma,
                             oma_m1, eps, weight_decay, momentum, maximize)
    for j in range(full, n):
        _rmsprop_element(p, g, sq, buf, gavg, j, inv_scale, neg_lr, alpha, oma, oma_m1,
                         eps, weight_decay, momentum, maximize)


@njit(inline="always")
def _rmsprop_chunk(table, lo, hi, itemsize, view_dtype, inv_scale, neg_lr, alpha, oma,
                   oma_m1, eps, weight_decay, momentum, maximize, use_momentum, centered,
                   span):
    """The global element range ``[lo, hi)``: every row it overlaps, as views."""
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
        sq = _view(table, row, L.STATE0, off, n, itemsize, view_dtype)
        if use_momentum is None:
            if centered is None:
                span(p, g, sq, None, None, n, inv_scale, neg_lr, alpha, oma, oma_m1,
                     eps, weight_decay, momentum, maximize)
            else:
                gavg = _view(table, row, L.STATE2, off, n, itemsize, view_dtype)
                span(p, g, sq, None, gavg, n, inv_scale, neg_lr, alpha, oma, oma_m1,
                     eps, weight_decay, momentum, maximize)
        else:
            buf = _view(table, row, L.STATE1, off, n, itemsize, view_dtype)
            if centered is None:
                span(p, g, sq, buf, None, n, inv_scale, neg_lr, alpha, oma, oma_m1,
                     eps, weight_decay, momentum, maximize)
            else:
                gavg = _view(table, row, L.STATE2, off, n, itemsize, view_dtype)
                span(p, g, sq, buf, gavg, n, inv_scale, neg_lr, alpha, oma, oma_m1,
                     eps, weight_decay, momentum, maximize)
        lo += n
        row += 1


@njit(parallel=True, cache=True, error_model="numpy")
def rmsprop_parallel(table, bounds, itemsize, view_dtype, inv_scale, neg_lr, alpha, oma,
                     oma_m1, eps, weight_decay, momentum, maximize, use_momentum,
                     centered):
    _advance(table)
    for c in prange(len(bounds) - 1):
        _rmsprop_chunk(table, bounds[c], bounds[c + 1], itemsize, view_dtype, inv_scale,
                       neg_lr, alpha, oma, oma_m1, eps, weight_decay, momentum, maximize,
                       use_momentum, centered, _rmsprop_blocked)


@njit(cache=True, error_model="numpy")
def rmsprop_serial(table, bounds, itemsize, view_dtype, inv_scale, neg_lr, alpha, oma,
                   oma_m1, eps, weight_decay, momentum, maximize, use_momentum, centered):
    _advance(table)
    _rmsprop_chunk(table, bounds[0], bounds[-1], itemsize, view_dtype, inv_scale, neg_lr,
                   alpha, oma, oma_m1, eps, weight_decay, momentum, maximize, use_momentum,
                   centered, _rmsprop_plain)


@njit(cache=True, error_model="numpy")
def _advance_steps(table):
    _advance(table)


def advance_steps(table) -> None:
    """Advance every row's step counter (host memory) by one, in place.

    For GPU backends whose steps live on the host (torch's default for CUDA
    params): one compiled pass over the table's step addresses.
    """
    _advance_steps(table)


def rmsprop(batch, *, lr, alpha, eps, weight_decay, momentum, centered, maximize,
            grad_scale=None, found_inf=None):
    """RMSprop (torch semantics) over every row, in place; advances steps.

    With ``found_inf`` nonzero nothing is written, steps included; grads are
    multiplied by ``1/grad_scale`` inside the same pass.
    """
    skip, inv_scale = _amp(grad_scale, found_inf)
    if skip or batch.table is None or batch.table.shape[0] == 0:
        return
    bounds, parallel, view, itemsize, c = _plan(batch)
    fn = rmsprop_parallel if parallel else rmsprop_serial
    oma = c(1.0 - alpha)
    use_momentum = momentum > 0
    # None switches a part of the kernel off at compile time
    with _PARALLEL if parallel else _NO_LOCK:
        fn(batch.table, bounds, itemsize, view, _opt(c, inv_scale, inv_scale != 1.0),
           c(-lr), c(alpha), oma, _opt(c, oma - c(1.0), not abs(oma) < 0.5), c(eps),
           _opt(c, weight_decay, weight_decay != 0), c(momentum if use_momentum else 0.0),
           _on(maximize), _on(use_momentum), _on(centered))
