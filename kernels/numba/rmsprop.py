"""RMSprop for the Numba backend: element update, step advance, entry points, launcher.

The row walk, spans and work split are shared (``_walk``). Element math:
float32 (float64 for float64 tensors), one rounding per stored value, a
fused multiply-add exactly where torch's CPU kernels use one (``addcmul``,
``lerp``, ``add(alpha=)``), none elsewhere (``mul`` then ``addcmul``,
``addcdiv``).

Also here: :func:`advance_steps`, the step-counter pass that the Triton
backend runs on the host for CUDA params whose steps live there.
"""

import numpy as np
from numba import carray, njit, prange

from .. import layout as L
from . import _stale
from ._memory import address, fma, load, store
from ._precision import store_param
from ._walk import (_amp, _on, _opt, _plan, _store_options, blocked, grad, launch,
                    plain, view, walk)

__all__ = ["rmsprop", "advance_steps"]


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
def _rmsprop_element(j, p, g, sq, buf, gavg, comp, sr, inv_scale, neg_lr, alpha, oma, oma_m1, eps,
                     weight_decay, momentum, maximize, _x9, _x10, _x11):
    """RMSprop on element ``j``; None turns a part off at compile time.

    ``sq`` square_avg; ``buf`` None: no momentum; ``gavg`` None: not
    centered; ``oma_m1`` None: torch.lerp's small-weight side;
    ``inv_scale``, ``weight_decay``, ``maximize`` None: unused. ``comp`` /
    ``sr``: the param store's options (``_precision.store_param``).
    """
    gj = grad(g, j, inv_scale, maximize)
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
        store_param(p, j, pj, fma(bj, neg_lr, pj), comp, sr)  # param.add_(buf, alpha=-lr)
    else:
        # param.addcdiv_(grad, avg, value=-lr)
        store_param(p, j, pj, pj + (neg_lr * gj) / avg, comp, sr)


@njit(inline="always")
def _rmsprop_row(table, row, off, n, itemsize, view_dtype, span, element, p, g, comp, sr,
                 inv_scale, neg_lr, alpha, oma, oma_m1, eps, weight_decay, momentum,
                 maximize, use_momentum, centered, _x11):
    """Views of STATE0 square_avg, STATE1 momentum_buffer, STATE2 grad_avg."""
    sq = view(table, row, L.STATE0, off, n, itemsize, view_dtype)
    if use_momentum is None:
        if centered is None:
            span(element, n, p, g, sq, None, None, comp, sr, inv_scale, neg_lr, alpha, oma,
                 oma_m1, eps, weight_decay, momentum, maximize, None, None, None)
        else:
            gavg = view(table, row, L.STATE2, off, n, itemsize, view_dtype)
            span(element, n, p, g, sq, None, gavg, comp, sr, inv_scale, neg_lr, alpha, oma,
                 oma_m1, eps, weight_decay, momentum, maximize, None, None, None)
    else:
        buf = view(table, row, L.STATE1, off, n, itemsize, view_dtype)
        if centered is None:
            span(element, n, p, g, sq, buf, None, comp, sr, inv_scale, neg_lr, alpha, oma,
                 oma_m1, eps, weight_decay, momentum, maximize, None, None, None)
        else:
            gavg = view(table, row, L.STATE2, off, n, itemsize, view_dtype)
            span(element, n, p, g, sq, buf, gavg, comp, sr, inv_scale, neg_lr, alpha, oma,
                 oma_m1, eps, weight_decay, momentum, maximize, None, None, None)


@njit(parallel=True, cache=True, error_model="numpy")
def rmsprop_parallel(table, bounds, itemsize, view_dtype, inv_scale, neg_lr, alpha, oma,
                     oma_m1, eps, weight_decay, momentum, maximize, use_momentum,
                     centered, kahan, sr_keys):
    _advance(table)
    for c in prange(len(bounds) - 1):
        walk(table, bounds[c], bounds[c + 1], itemsize, view_dtype, _rmsprop_row,
             blocked, _rmsprop_element, kahan, sr_keys, inv_scale, neg_lr, alpha, oma, oma_m1, eps,
             weight_decay, momentum, maximize, use_momentum, centered, None)


@njit(cache=True, error_model="numpy")
def rmsprop_serial(table, bounds, itemsize, view_dtype, inv_scale, neg_lr, alpha, oma,
                   oma_m1, eps, weight_decay, momentum, maximize, use_momentum, centered,
                   kahan, sr_keys):
    _advance(table)
    walk(table, bounds[0], bounds[-1], itemsize, view_dtype, _rmsprop_row, plain,
         _rmsprop_element, kahan, sr_keys, inv_scale, neg_lr, alpha, oma, oma_m1, eps, weight_decay,
         momentum, maximize, use_momentum, centered, None)


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
            grad_scale=None, found_inf=None, kahan_sum=False, stochastic_round=None):
    """RMSprop (torch semantics) over every row, in place; advances steps.

    With ``found_inf`` nonzero nothing is written, steps included; grads are
    multiplied by ``1/grad_scale`` inside the same pass. ``kahan_sum`` /
    ``stochastic_round``: how bfloat16/float16 params are stored
    (``_precision.store_param``).
    """
    skip, inv_scale = _amp(grad_scale, found_inf)
    if skip or batch.table is None or batch.table.shape[0] == 0:
        return
    bounds, parallel, view_dtype, itemsize, c = _plan(batch)
    oma = c(1.0 - alpha)
    use_momentum = momentum > 0
    # None switches a part of the kernel off at compile time (see _walk.plain)
    launch(rmsprop_parallel, rmsprop_serial, parallel, (
        batch.table, bounds, itemsize, view_dtype, _opt(c, inv_scale, inv_scale != 1.0),
        c(-lr), c(alpha), oma, _opt(c, oma - c(1.0), not abs(oma) < 0.5), c(eps),
        _opt(c, weight_decay, weight_decay != 0), c(momentum if use_momentum else 0.0),
        _on(maximize), _on(use_momentum), _on(centered),
        *_store_options(batch, kahan_sum, stochastic_round)))


_stale.light_loads(vars())  # warm-cache loads without Numba's full refresh
