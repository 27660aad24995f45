"""SGD for the Numba backend: its element update, entry points and launcher.

The row walk, spans and work split are shared (``_walk``). Scalars arrive
already cast to the compute type (float32, or float64 for float64 tensors);
element math never mixes in a float64 literal, so float32 data stays in
float32 arithmetic. Each operation rounds where torch's for-loop rounds, with
a fused multiply-add wherever torch's CPU kernel uses one (``add(alpha=)``):
bit-exact with torch in float32/float64 (tests/test_parity.py).
"""

from numba import njit, prange

from .. import layout as L
from . import _stale
from ._memory import fma, load, store
from ._precision import store_param
from ._walk import (_amp, _on, _opt, _plan, _store_options, blocked, grad, launch,
                    plain, view, walk)

__all__ = ["sgd"]


@njit(inline="always")
def _sgd_element(j, p, g, b, _s1, _s2, comp, sr, fresh, inv_scale, neg_lr, weight_decay,
                 momentum, one_minus_dampening, nesterov, maximize, _x8, _x9, _x10,
                 _x11):
    """SGD on element ``j``. ``b`` (the momentum buffer) is None without
    momentum; ``fresh``, ``inv_scale``, ``weight_decay``, ``nesterov`` and
    ``maximize`` are None when off; ``comp`` / ``sr``: the param store's
    options (``_precision.store_param``)."""
    gj = grad(g, j, inv_scale, maximize)
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
    store_param(p, j, pj, fma(gj, neg_lr, pj), comp, sr)


@njit(inline="always")
def _sgd_row(table, row, off, n, itemsize, view_dtype, span, element, p, g, comp, sr,
             use_momentum, inv_scale, neg_lr, weight_decay, momentum,
             one_minus_dampening, nesterov, maximize, _x8, _x9, _x10, _x11):
    if use_momentum is None:
        span(element, n, p, g, None, None, None, comp, sr, None, inv_scale, neg_lr,
             weight_decay, momentum, one_minus_dampening, nesterov, maximize,
             None, None, None, None)
    else:
        b = view(table, row, L.STATE0, off, n, itemsize, view_dtype)
        if table[row, L.FLAGS] & L.FLAG_FRESH:
            span(element, n, p, g, b, None, None, comp, sr, True, inv_scale, neg_lr,
                 weight_decay, momentum, one_minus_dampening, nesterov, maximize,
                 None, None, None, None)
        else:
            span(element, n, p, g, b, None, None, comp, sr, None, inv_scale, neg_lr,
                 weight_decay, momentum, one_minus_dampening, nesterov, maximize,
                 None, None, None, None)


@njit(parallel=True, cache=True, error_model="numpy")
def sgd_parallel(table, bounds, itemsize, view_dtype, inv_scale, neg_lr, weight_decay,
                 momentum, one_minus_dampening, nesterov, maximize, use_momentum, kahan, sr_keys):
    for c in prange(len(bounds) - 1):
        walk(table, bounds[c], bounds[c + 1], itemsize, view_dtype, _sgd_row, blocked,
             _sgd_element, kahan, sr_keys, use_momentum, inv_scale, neg_lr, weight_decay, momentum,
             one_minus_dampening, nesterov, maximize, None, None, None, None)


@njit(cache=True, error_model="numpy")
def sgd_serial(table, bounds, itemsize, view_dtype, inv_scale, neg_lr, weight_decay,
               momentum, one_minus_dampening, nesterov, maximize, use_momentum, kahan, sr_keys):
    walk(table, bounds[0], bounds[-1], itemsize, view_dtype, _sgd_row, plain,
         _sgd_element, kahan, sr_keys, use_momentum, inv_scale, neg_lr, weight_decay, momentum,
         one_minus_dampening, nesterov, maximize, None, None, None, None)


def sgd(batch, *, lr, weight_decay, momentum, dampening, nesterov, maximize,
        grad_scale=None, found_inf=None, kahan_sum=False, stochastic_round=None):
    """SGD (torch semantics) over every row of ``batch.table``, in place.

    With ``found_inf`` nonzero nothing is written; grads are multiplied by
    ``1/grad_scale`` inside the same pass. ``kahan_sum`` / ``stochastic_round``:
    how bfloat16/float16 params are stored (``_precision.store_param``).
    """
    skip, inv_scale = _amp(grad_scale, found_inf)
    if skip or batch.table is None or batch.table.shape[0] == 0:
        return
    bounds, parallel, view_dtype, itemsize, c = _plan(batch)
    # None switches a part of the kernel off at compile time (see _walk.plain)
    launch(sgd_parallel, sgd_serial, parallel, (
        batch.table, bounds, itemsize, view_dtype, _opt(c, inv_scale, inv_scale != 1.0),
        c(-lr), _opt(c, weight_decay, weight_decay != 0), c(momentum),
        c(1.0 - dampening), _on(nesterov and momentum != 0), _on(maximize),
        _on(momentum != 0), *_store_options(batch, kahan_sum, stochastic_round)))


_stale.light_loads(vars())  # warm-cache loads without Numba's full refresh
