"""Adagrad for the Triton GPU backend: its kernels and launcher.

The launch prologue, the per-alignment-class launches and the host-side step
checks are shared (the package's ``_prologue``, ``_launch_updates``,
``_steps_on_device``, ``_check_host_steps``); ``_kernels`` has the
load/store helpers and the table's column constexprs. Element math matches
``kernels/numba/adagrad.py`` operation for operation (see
``kernels/triton/_kernels.py`` on roundings, ``div_rn`` / ``sqrt_rn`` and
bfloat16).

Each row's ``clr = lr / (1 + (step - 1) * lr_decay)`` is computed once per
step, as torch's loop computes it (in float64; for a Tensor lr in its dtype,
see ``kernels/steps.py``): by ``_adagrad_steps_kernel`` on the
device, which also advances device-side step counters (no host sync), or by
the host for counters in host memory (torch's default: CPU steps for CUDA
params).
"""

import sys

import numpy as np
import torch
import triton
import triton.language as tl

from ..steps import adagrad_host_steps
from . import (NUM_WARPS, _STEP_ROWS, _check_host_steps, _device_context, _launch_lock,
               _launch_updates, _precision_args, _prologue, _resident, _upload)
from ._kernels import (_COMP, _GRAD, _NCOLS, _NUMEL, _PARAM, _START, _STATE0,
                       _load, _read_steps, _sr_keys, _store, _store_param,
                       _write_steps)

__all__ = ["adagrad"]

#: the package (``kernels.triton``): ``_steps_on_device`` is looked up on it at
#: each call, since tests replace it there to force host-side steps
_pkg = sys.modules[__package__]

# slots of the float64 hyperparameter buffer; MAXIMIZE holds 1.0 or 0.0 and
# LR_ROUND the lr's dtype code (kernels/steps.py's LR_F64 ... LR_F16):
# runtime switches, so that they add no compiled specialization
AG_LR, AG_LR_DECAY, AG_EPS, AG_WD, AG_MAXIMIZE, AG_LR_ROUND, AG_NHYPER = range(7)
_AG_LR = tl.constexpr(AG_LR)
_AG_LR_DECAY = tl.constexpr(AG_LR_DECAY)
_AG_EPS = tl.constexpr(AG_EPS)
_AG_WD = tl.constexpr(AG_WD)
_AG_MAXIMIZE = tl.constexpr(AG_MAXIMIZE)
_AG_LR_ROUND = tl.constexpr(AG_LR_ROUND)
_AG_NHYPER = tl.constexpr(AG_NHYPER)


@triton.jit
def _adagrad_block(p_ptr, g_ptr, s_ptr, c_ptr, offs, mask, neg_clr, eps, weight_decay,
                   inv_scale, maximize, has_wd, k0, k1, start, ELEM: tl.constexpr,
                   IS_BF16: tl.constexpr, COMPUTE: tl.constexpr, IS_F64: tl.constexpr,
                   HAS_GRAD_SCALE: tl.constexpr, KAHAN: tl.constexpr, SR: tl.constexpr):
    """The Adagrad update of one block (``mask`` None: a whole block)."""
    g = _load(g_ptr, offs, mask, IS_BF16, COMPUTE)
    if HAS_GRAD_SCALE:
        g = g * inv_scale
    g = tl.where(maximize, -g, g)
    p = _load(p_ptr, offs, mask, IS_BF16, COMPUTE)
    # a select, not fma(p, 0, g): an infinite param would make that NaN
    g = tl.where(has_wd, tl.fma(p, weight_decay, g), g)
    s = tl.fma(g, g, _load(s_ptr, offs, mask, IS_BF16, COMPUTE))  # addcmul(value=1)
    _store(s_ptr, offs, s, mask, IS_BF16, ELEM)
    # torch's addcdiv: param + (value * grad) / std
    if IS_F64:
        std = tl.sqrt(s) + eps  # sqrt.rn.f64, div.rn.f64 already
        update = (neg_clr * g) / std
    else:
        std = tl.sqrt_rn(s) + eps
        update = tl.div_rn(neg_clr * g, std)
    if KAHAN or SR:
        _store_param(p_ptr, c_ptr, offs, p, p + update, mask, k0, k1, start,
                     IS_BF16, ELEM, KAHAN, SR)
    else:
        _store(p_ptr, offs, p + update, mask, IS_BF16, ELEM)


@triton.jit
def _adagrad_kernel(
    table_ptr, map_ptr, hyper_ptr, scal_ptr, grad_scale_ptr, found_inf_ptr,
    ELEM: tl.constexpr, IS_BF16: tl.constexpr, COMPUTE: tl.constexpr,
    IS_F64: tl.constexpr, BLOCK: tl.constexpr, ALIGNED: tl.constexpr,
    TAIL_ALIGNED: tl.constexpr, VEC: tl.constexpr,
    HAS_GRAD_SCALE: tl.constexpr, HAS_FOUND_INF: tl.constexpr,
    counter_ptr=None, KAHAN: tl.constexpr = False, SR: tl.constexpr = False,
):
    """Adagrad on one ``BLOCK`` chunk of one row (torch semantics, in place).

    Args as ``_adam_kernel``'s (kernels/triton/adam.py); ``scal_ptr`` is
    float64 ``[rows]``: each row's clr for this step. STATE0 is ``sum``.
    MAXIMIZE is the hyperparameter slot ``AG_MAXIMIZE`` (1.0 or 0.0), and
    weight decay applies where its float64 slot is nonzero.
    """
    pid = tl.program_id(0).to(tl.int64)
    row = tl.load(map_ptr + 2 * pid).to(tl.int64)
    chunk = tl.load(map_ptr + 2 * pid + 1).to(tl.int64)
    row_base = table_ptr + row * _NCOLS
    bound = tl.load(row_base + _NUMEL)  # scalar conditions: see _sgd_kernel
    if HAS_FOUND_INF:
        bound = tl.where(tl.load(found_inf_ptr) == 0, bound, 0)
    if TAIL_ALIGNED:
        bound = tl.multiple_of(bound, VEC)
    offs = chunk * BLOCK + tl.arange(0, BLOCK).to(tl.int64)

    neg_clr = -(tl.load(scal_ptr + row).to(COMPUTE))
    eps = tl.load(hyper_ptr + _AG_EPS).to(COMPUTE)
    weight_decay = tl.load(hyper_ptr + _AG_WD).to(COMPUTE)
    maximize = tl.load(hyper_ptr + _AG_MAXIMIZE) != 0.0
    has_wd = tl.load(hyper_ptr + _AG_WD) != 0.0  # float64, as the launcher's test was
    inv_scale = 1.0
    if HAS_GRAD_SCALE:
        inv_scale = tl.div_rn(tl.full((), 1.0, tl.float32),
                              tl.load(grad_scale_ptr).to(tl.float32)).to(COMPUTE)

    PTR: tl.constexpr = tl.pointer_type(ELEM)
    p_ptr = tl.load(row_base + _PARAM).to(PTR)
    g_ptr = tl.load(row_base + _GRAD).to(PTR)
    s_ptr = tl.load(row_base + _STATE0).to(PTR)
    if ALIGNED:
        p_ptr = tl.multiple_of(p_ptr, 16)
        g_ptr = tl.multiple_of(g_ptr, 16)
        s_ptr = tl.multiple_of(s_ptr, 16)
    c_ptr = p_ptr  # (unused without KAHAN)
    if KAHAN:
        c_ptr = tl.load(row_base + _COMP).to(PTR)
        if ALIGNED:
            c_ptr = tl.multiple_of(c_ptr, 16)
    k0 = 0
    k1 = 0
    start = 0
    if SR:
        k0, k1 = _sr_keys(hyper_ptr, counter_ptr, _AG_NHYPER)
        start = tl.load(row_base + _START)

    if (chunk + 1) * BLOCK <= bound:
        _adagrad_block(p_ptr, g_ptr, s_ptr, c_ptr, offs, None, neg_clr, eps,
                       weight_decay, inv_scale, maximize, has_wd, k0, k1, start, ELEM,
                       IS_BF16, COMPUTE, IS_F64, HAS_GRAD_SCALE, KAHAN, SR)
    else:
        _adagrad_block(p_ptr, g_ptr, s_ptr, c_ptr, offs, offs < bound, neg_clr, eps,
                       weight_decay, inv_scale, maximize, has_wd, k0, k1, start, ELEM,
                       IS_BF16, COMPUTE, IS_F64, HAS_GRAD_SCALE, KAHAN, SR)


@triton.jit
def _adagrad_steps_kernel(table_ptr, hyper_ptr, scal_ptr, found_inf_ptr, rows,
                          BLOCK_R: tl.constexpr, HAS_FOUND_INF: tl.constexpr):
    """Advance device-side step counters; each row's clr for ``_adagrad_kernel``.

    One lane per row, launched before the update on the same stream. A
    skipped step (found_inf nonzero) leaves every counter as it is (the
    scalars are still written, and unused). The slot ``AG_LR_ROUND`` says
    the dtype clr is computed in: float64 (0), float32 (1), or float32 math
    rounded to bfloat16 (2) or float16 (3), nearest-even, as torch's loop.
    """
    r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    live = r < rows
    step, s64_ptr, s32_ptr, s64, s32, is64, is32 = _read_steps(table_ptr, r, rows)
    lr = tl.load(hyper_ptr + _AG_LR)
    d = 1.0 + (step - 1.0) * tl.load(hyper_ptr + _AG_LR_DECAY)
    lr_round = tl.load(hyper_ptr + _AG_LR_ROUND)
    q = tl.div_rn(lr.to(tl.float32), d.to(tl.float32))
    # bfloat16 by bits, as _store (the interpreter's cast truncates): round to
    # nearest even, a NaN kept quiet
    u = q.to(tl.uint32, bitcast=True)
    bf = ((u + 0x7FFF + ((u >> 16) & 1)) & 0xFFFF0000).to(tl.float32, bitcast=True)
    bf = tl.where(q != q, q, bf)
    q16 = tl.where(lr_round == 2.0, bf,
                   q.to(tl.float16, fp_downcast_rounding="rtne").to(tl.float32))
    clr = tl.where(lr_round == 0.0, lr / d,  # div.rn.f64
                   tl.where(lr_round == 1.0, q, q16).to(tl.float64))
    tl.store(scal_ptr + r, clr, mask=live)
    _write_steps(r, rows, s64_ptr, s32_ptr, s64, s32, is64, is32, found_inf_ptr,
                 HAS_FOUND_INF)


def adagrad(batch, *, lr, lr_decay, eps, weight_decay, maximize, lr_round=0,
            grad_scale=None, found_inf=None, kahan_sum=False, stochastic_round=None):
    """Adagrad (torch semantics) over every row; advances steps.

    As the Adam launcher: device-side steps are advanced by a first kernel
    (no host sync); host-side steps by the host, which must then read
    ``found_inf`` first (one sync) to know whether to advance them.
    """
    if batch.table is None or batch.table.shape[0] == 0:
        return
    device = batch.device
    table = batch.table
    hyper = [lr, lr_decay, eps, weight_decay, float(bool(maximize)), float(lr_round)]
    assert len(hyper) == AG_NHYPER
    prec = _precision_args(batch, kahan_sum, stochastic_round)
    hyper += prec.slots
    device_steps = _pkg._steps_on_device(batch)
    with _device_context(device):
        if not device_steps:
            _check_host_steps(batch)
            if found_inf is not None and bool(found_inf.reshape(-1)[0] != 0):
                return  # skipped step: steps stay as they are
            found_inf = None
            scalars = adagrad_host_steps(table, lr=lr, lr_decay=lr_decay, lr_round=lr_round)
        pro = _prologue(batch, hyper if device_steps else None, grad_scale, found_inf)
        layout = pro.layout
        if device_steps:
            hyper = pro.hyper
            # rewritten whole by the step kernel below before each read
            scal = _resident(batch, "adagrad_scalars", layout.rows, lambda: torch.empty(
                layout.rows, dtype=torch.float64, device=device))
        else:
            # host-step scalars change every step: not worth a cache entry
            both = _upload(np.concatenate([np.asarray(hyper, np.float64), scalars.ravel()]), batch)
            hyper, scal = both, both[len(hyper):]
        with _launch_lock():
            if device_steps:
                _adagrad_steps_kernel[(triton.cdiv(layout.rows, _STEP_ROWS),)](
                    layout.table, hyper, scal, pro.found_inf, layout.rows,
                    BLOCK_R=_STEP_ROWS, HAS_FOUND_INF=pro.found_inf is not None,
                    num_warps=NUM_WARPS, enable_fp_fusion=False)
            _launch_updates(_adagrad_kernel, pro, batch, hyper, scal, pro.grad_scale,
                            pro.found_inf, counter_ptr=prec.counter, KAHAN=prec.kahan,
                            SR=prec.sr)
