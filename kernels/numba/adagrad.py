"""Adagrad for the Numba CPU backend: element update, entry points, launcher.

The row walk, spans and work split are shared (``_walk``); this file holds
only Adagrad's per-row scalars, its element math and its entry points.

Element math as torch's for-loop (``_single_tensor_adagrad``) with its CPU
kernels' roundings: ``grad.add(param, alpha=wd)`` and ``addcmul`` are fused
multiply-adds, ``std = sqrt(sum) + eps`` rounds twice, and ``addcdiv`` is
``p + (-clr * g) / std``. Each row's ``clr = lr / (1 + (step - 1) * lr_decay)``
is computed once, in float64 from the advanced step as torch does in
Python, then rounded to the compute type (torch's ``value=`` cast).

Also here: :func:`advance_host_steps`, the step-counter pass that the
Triton backend runs on the host for CUDA params whose steps live there.
"""

import numpy as np
from numba import carray, njit, prange

from .. import layout as L
from . import _stale
from ._memory import address, fma, load, store
from ._precision import store_param
from ._walk import (_amp, _on, _opt, _plan, _store_options, blocked, grad, launch,
                    plain, view, walk)

__all__ = ["adagrad", "advance_host_steps"]


@njit(inline="always")
def _adagrad_scalars(table, lr, lr_decay, lr_f32, out):
    """Advance every row's step; ``out[row]`` = that step's clr (float64 math).

    Rows with no elements still count their step. ``lr_f32`` (not None):
    torch's float32 Tensor lr, whose division runs in float32.
    """
    for row in range(table.shape[0]):
        if table[row, L.FLAGS] & L.FLAG_STEP_F64:
            s64 = carray(address(table[row, L.STEP]), (1,), np.float64)
            s64[0] += 1.0
            step = s64[0]
        else:
            s32 = carray(address(table[row, L.STEP]), (1,), np.float32)
            s32[0] += np.float32(1.0)
            step = np.float64(s32[0])
        d = 1.0 + (step - 1.0) * lr_decay
        if lr_f32 is not None:
            out[row] = np.float32(lr) / np.float32(d)
        else:
            out[row] = lr / d


@njit(inline="always")
def _adagrad_element(j, p, g, s, _s1, _s2, comp, sr, neg_clr, eps, inv_scale, weight_decay,
                     maximize, _x5, _x6, _x7, _x8, _x9, _x10, _x11):
    """Adagrad on element ``j`` (``s``: the ``sum`` state); None turns a part
    off at compile time (``inv_scale``, ``weight_decay``, ``maximize``);
    ``comp`` / ``sr``: the param store's options (``_precision.store_param``)."""
    gj = grad(g, j, inv_scale, maximize)
    pj = load(p, j)
    if weight_decay is not None:
        gj = fma(pj, weight_decay, gj)
    sj = fma(gj, gj, load(s, j))  # addcmul(value=1)
    store(s, j, sj)
    std = np.sqrt(sj) + eps
    store_param(p, j, pj, pj + (neg_clr * gj) / std, comp, sr)  # torch's addcdiv order


@njit(inline="always")
def _adagrad_row(table, row, off, n, itemsize, view_dtype, span, element, p, g, comp, sr,
                 scalars, eps, inv_scale, weight_decay, maximize, _x5, _x6, _x7, _x8,
                 _x9, _x10, _x11):
    neg_clr = -scalars[row]
    s = view(table, row, L.STATE0, off, n, itemsize, view_dtype)
    span(element, n, p, g, s, None, None, comp, sr, neg_clr, eps, inv_scale, weight_decay,
         maximize, None, None, None, None, None, None, None)


@njit(parallel=True, cache=True, error_model="numpy")
def adagrad_parallel(table, bounds, itemsize, view_dtype, lr, lr_decay, lr_f32, scalars,
                     inv_scale, c_eps, c_wd, maximize, kahan, sr_keys):
    _adagrad_scalars(table, lr, lr_decay, lr_f32, scalars)
    for c in prange(len(bounds) - 1):
        walk(table, bounds[c], bounds[c + 1], itemsize, view_dtype, _adagrad_row,
             blocked, _adagrad_element, kahan, sr_keys, scalars, c_eps, inv_scale, c_wd, maximize,
             None, None, None, None, None, None, None)


@njit(cache=True, error_model="numpy")
def adagrad_serial(table, bounds, itemsize, view_dtype, lr, lr_decay, lr_f32, scalars,
                   inv_scale, c_eps, c_wd, maximize, kahan, sr_keys):
    _adagrad_scalars(table, lr, lr_decay, lr_f32, scalars)
    walk(table, bounds[0], bounds[-1], itemsize, view_dtype, _adagrad_row, plain,
         _adagrad_element, kahan, sr_keys, scalars, c_eps, inv_scale, c_wd, maximize, None, None, None,
         None, None, None, None)


@njit(cache=True, error_model="numpy")
def _host_step_scalars(table, lr, lr_decay, lr_f32, out):
    _adagrad_scalars(table, lr, lr_decay, lr_f32, out)


def advance_host_steps(table, *, lr, lr_decay, lr_f32=False):
    """Advance every row's step counter (host memory) by one, in place.

    For GPU backends whose steps live on the host (torch's default for CUDA
    params). Returns float64 ``[rows]``: each row's clr.
    """
    out = np.empty(table.shape[0], dtype=np.float64)
    _host_step_scalars(table, float(lr), float(lr_decay), _on(lr_f32), out)
    return out


def adagrad(batch, *, lr, lr_decay, eps, weight_decay, maximize, lr_f32=False,
            grad_scale=None, found_inf=None, kahan_sum=False, stochastic_round=None):
    """Adagrad (torch semantics) over every row, in place; advances steps.

    With ``found_inf`` nonzero nothing is written, steps included; grads are
    multiplied by ``1/grad_scale`` inside the same pass. ``kahan_sum`` /
    ``stochastic_round``: how bfloat16/float16 params are stored
    (``_precision.store_param``).
    """
    skip, inv_scale = _amp(grad_scale, found_inf)
    if skip or batch.table is None or batch.table.shape[0] == 0:
        return
    bounds, parallel, view_dtype, itemsize, c = _plan(batch)
    scalars = np.empty(batch.table.shape[0], dtype=c)
    # None switches a part of the kernel off at compile time (see _walk.plain)
    launch(adagrad_parallel, adagrad_serial, parallel, (
        batch.table, bounds, itemsize, view_dtype, float(lr), float(lr_decay),
        _on(lr_f32), scalars, _opt(c, inv_scale, inv_scale != 1.0), c(eps),
        _opt(c, weight_decay, weight_decay != 0), _on(maximize),
        *_store_options(batch, kahan_sum, stochastic_round)))


_stale.light_loads(vars())  # warm-cache loads without Numba's full refresh
