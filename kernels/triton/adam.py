"""Adam / AdamW for the Triton backend: its kernels and launcher.

The launch prologue, the per-alignment-class launches and the host-side step
counters are shared (the package's ``_prologue``, ``_launch_updates``,
``_steps_on_device``, ``_check_host_steps``, ``_host_step_scalars``);
``_kernels`` has the load/store helpers and the table's column constexprs.
"""

import sys

import numpy as np
import torch
import triton
import triton.language as tl

from . import (NUM_WARPS, _STEP_ROWS, _check_host_steps, _device_context,
               _host_step_scalars, _launch_lock, _launch_updates, _log2, _precision_args,
               _prologue, _resident, _upload)
from ._kernels import (_COMP, _GRAD, _NCOLS, _NUMEL, _PARAM, _START, _STATE0,
                       _STATE1, _STATE2, _load, _read_steps, _sr_keys, _store,
                       _store_param, _write_steps)

__all__ = ["adam"]

#: the package (``kernels.triton``): ``_steps_on_device`` is looked up on it at
#: each call, since tests replace it there to force host-side steps
_pkg = sys.modules[__package__]

# Slots of the float64 hyperparameter buffer; the launcher writes them in this
# order. MAXIMIZE and DECOUPLED hold 1.0 or 0.0: runtime switches, so that
# they add no compiled specialization (see the kernel's docstring).
(ADAM_LR, ADAM_BETA1, ADAM_BETA2, ADAM_OMB1, ADAM_OMB2, ADAM_EPS, ADAM_WD,
 ADAM_DECAY, ADAM_LOG2_BETA1, ADAM_LOG2_BETA2, ADAM_BETA1_NEG, ADAM_BETA2_NEG,
 ADAM_MAXIMIZE, ADAM_DECOUPLED, ADAM_NHYPER) = range(15)

_ADAM_LR = tl.constexpr(ADAM_LR)
_ADAM_BETA1 = tl.constexpr(ADAM_BETA1)
_ADAM_BETA2 = tl.constexpr(ADAM_BETA2)
_ADAM_OMB1 = tl.constexpr(ADAM_OMB1)
_ADAM_OMB2 = tl.constexpr(ADAM_OMB2)
_ADAM_EPS = tl.constexpr(ADAM_EPS)
_ADAM_WD = tl.constexpr(ADAM_WD)
_ADAM_DECAY = tl.constexpr(ADAM_DECAY)
_ADAM_LOG2_BETA1 = tl.constexpr(ADAM_LOG2_BETA1)
_ADAM_LOG2_BETA2 = tl.constexpr(ADAM_LOG2_BETA2)
_ADAM_BETA1_NEG = tl.constexpr(ADAM_BETA1_NEG)
_ADAM_BETA2_NEG = tl.constexpr(ADAM_BETA2_NEG)
_ADAM_MAXIMIZE = tl.constexpr(ADAM_MAXIMIZE)
_ADAM_DECOUPLED = tl.constexpr(ADAM_DECOUPLED)
_ADAM_NHYPER = tl.constexpr(ADAM_NHYPER)


@triton.jit
def _adam_block(p_ptr, g_ptr, m_ptr, v_ptr, vmax_ptr, c_ptr, offs, mask, step_size,
                bc2_sqrt, beta1, beta2, omb1, omb2, eps, weight_decay, decay,
                inv_scale, maximize, decay_grad, decay_param, lerp_from_start, k0, k1,
                start, ELEM: tl.constexpr, IS_BF16: tl.constexpr,
                COMPUTE: tl.constexpr, IS_F64: tl.constexpr, AMSGRAD: tl.constexpr,
                HAS_GRAD_SCALE: tl.constexpr, KAHAN: tl.constexpr, SR: tl.constexpr):
    """The Adam update of one block (``mask`` None: a whole block); see ``_adam_kernel``."""
    g = _load(g_ptr, offs, mask, IS_BF16, COMPUTE)
    if HAS_GRAD_SCALE:
        g = g * inv_scale
    g = tl.where(maximize, -g, g)
    p = _load(p_ptr, offs, mask, IS_BF16, COMPUTE)
    old = p  # the stored param, for the Kahan store
    # selects, not a zero decay folded into the math: inf * 0 is NaN
    g = tl.where(decay_grad, tl.fma(p, weight_decay, g), g)
    p = tl.where(decay_param, p * decay, p)
    m = _load(m_ptr, offs, mask, IS_BF16, COMPUTE)
    # torch.lerp's two-sided formula, as its CPU kernel evaluates it
    m = tl.where(lerp_from_start, tl.fma(omb1, g - m, m), tl.fma(omb1 - 1.0, g - m, g))
    v = tl.fma(omb2 * g, g, _load(v_ptr, offs, mask, IS_BF16, COMPUTE) * beta2)
    _store(m_ptr, offs, m, mask, IS_BF16, ELEM)
    _store(v_ptr, offs, v, mask, IS_BF16, ELEM)
    if AMSGRAD:
        vmax = _load(vmax_ptr, offs, mask, IS_BF16, COMPUTE)
        v = tl.maximum(vmax, v, propagate_nan=tl.PropagateNan.ALL)
        _store(vmax_ptr, offs, v, mask, IS_BF16, ELEM)
    # torch's addcdiv: param + (value * exp_avg) / denom
    if IS_F64:
        denom = tl.sqrt(v) / bc2_sqrt + eps  # sqrt.rn.f64, div.rn.f64 already
        update = (-step_size * m) / denom
    else:
        denom = tl.div_rn(tl.sqrt_rn(v), bc2_sqrt) + eps
        update = tl.div_rn(-step_size * m, denom)
    if KAHAN or SR:
        _store_param(p_ptr, c_ptr, offs, old, p + update, mask, k0, k1, start,
                     IS_BF16, ELEM, KAHAN, SR)
    else:
        _store(p_ptr, offs, p + update, mask, IS_BF16, ELEM)


@triton.jit
def _adam_kernel(
    table_ptr, map_ptr, hyper_ptr, scal_ptr, grad_scale_ptr, found_inf_ptr,
    ELEM: tl.constexpr, IS_BF16: tl.constexpr, COMPUTE: tl.constexpr,
    IS_F64: tl.constexpr, BLOCK: tl.constexpr, ALIGNED: tl.constexpr,
    TAIL_ALIGNED: tl.constexpr, VEC: tl.constexpr, AMSGRAD: tl.constexpr,
    HAS_GRAD_SCALE: tl.constexpr, HAS_FOUND_INF: tl.constexpr,
    counter_ptr=None, KAHAN: tl.constexpr = False, SR: tl.constexpr = False,
):
    """Adam / AdamW on one ``BLOCK`` chunk of one row (torch semantics).

    The step counters are not touched here: row r's (step size, sqrt of the
    second bias correction) wait at ``scal_ptr[2*r]``, computed once per row
    for this step, by ``_adam_steps_kernel`` on the device (which also
    advances the counters) or by the host.

    Args:
        table_ptr: int64 address table, ``[rows, NCOLS]``.
        map_ptr: int32 ``[programs, 2]`` block map: (row, chunk index).
        hyper_ptr: float64 hyperparameters (``ADAM_*`` slots), with the
            runtime switches: MAXIMIZE and DECOUPLED (AdamW's decay of the
            weights instead of the gradient) as 1.0 or 0.0; weight decay
            where its float64 value is nonzero; and torch.lerp's side,
            1 - beta1 < 0.5 in the compute type (the side of its two-sided
            formula that keeps torch's rounding).
        scal_ptr: float64 ``[rows, 2]`` per-row scalars (see above).
        grad_scale_ptr: AMP scale, as in ``_sgd_kernel``.
        found_inf_ptr: AMP flag; nonzero masks every load and store.
        ELEM, IS_BF16, COMPUTE, IS_F64, BLOCK, ALIGNED, TAIL_ALIGNED, VEC: as
            in ``_sgd_kernel``.
        AMSGRAD: the torch flag (STATE2 holds max_exp_avg_sq).
        HAS_GRAD_SCALE, HAS_FOUND_INF: the AMP tensors are given (constexpr,
            as in ``_sgd_kernel``).
        counter_ptr, KAHAN, SR: the param store's options, as in
            ``_sgd_kernel`` (seed and salt after ``ADAM_NHYPER``).
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

    step_size = tl.load(scal_ptr + 2 * row).to(COMPUTE)
    bc2_sqrt = tl.load(scal_ptr + 2 * row + 1).to(COMPUTE)
    beta1 = tl.load(hyper_ptr + _ADAM_BETA1).to(COMPUTE)
    beta2 = tl.load(hyper_ptr + _ADAM_BETA2).to(COMPUTE)
    omb1 = tl.load(hyper_ptr + _ADAM_OMB1).to(COMPUTE)
    omb2 = tl.load(hyper_ptr + _ADAM_OMB2).to(COMPUTE)
    eps = tl.load(hyper_ptr + _ADAM_EPS).to(COMPUTE)
    weight_decay = tl.load(hyper_ptr + _ADAM_WD).to(COMPUTE)
    decay = tl.load(hyper_ptr + _ADAM_DECAY).to(COMPUTE)
    maximize = tl.load(hyper_ptr + _ADAM_MAXIMIZE) != 0.0
    decoupled = tl.load(hyper_ptr + _ADAM_DECOUPLED) != 0.0
    has_wd = tl.load(hyper_ptr + _ADAM_WD) != 0.0  # float64, as the launcher's test was
    decay_param = has_wd & decoupled
    decay_grad = has_wd & (decoupled == 0)
    lerp_from_start = omb1 < 0.5  # in COMPUTE, as torch.lerp tests its weight
    inv_scale = 1.0
    if HAS_GRAD_SCALE:
        inv_scale = tl.div_rn(tl.full((), 1.0, tl.float32),
                              tl.load(grad_scale_ptr).to(tl.float32)).to(COMPUTE)

    PTR: tl.constexpr = tl.pointer_type(ELEM)
    p_ptr = tl.load(row_base + _PARAM).to(PTR)
    g_ptr = tl.load(row_base + _GRAD).to(PTR)
    m_ptr = tl.load(row_base + _STATE0).to(PTR)
    v_ptr = tl.load(row_base + _STATE1).to(PTR)
    vmax_ptr = tl.load(row_base + _STATE2).to(PTR)  # 0 without amsgrad: unused
    if ALIGNED:
        p_ptr = tl.multiple_of(p_ptr, 16)
        g_ptr = tl.multiple_of(g_ptr, 16)
        m_ptr = tl.multiple_of(m_ptr, 16)
        v_ptr = tl.multiple_of(v_ptr, 16)
        vmax_ptr = tl.multiple_of(vmax_ptr, 16)
    c_ptr = p_ptr  # (unused without KAHAN)
    if KAHAN:
        c_ptr = tl.load(row_base + _COMP).to(PTR)
        if ALIGNED:
            c_ptr = tl.multiple_of(c_ptr, 16)
    k0 = 0
    k1 = 0
    start = 0
    if SR:
        k0, k1 = _sr_keys(hyper_ptr, counter_ptr, _ADAM_NHYPER)
        start = tl.load(row_base + _START)

    if (chunk + 1) * BLOCK <= bound:
        _adam_block(p_ptr, g_ptr, m_ptr, v_ptr, vmax_ptr, c_ptr, offs, None, step_size,
                    bc2_sqrt, beta1, beta2, omb1, omb2, eps, weight_decay, decay,
                    inv_scale, maximize, decay_grad, decay_param, lerp_from_start, k0,
                    k1, start, ELEM, IS_BF16, COMPUTE, IS_F64, AMSGRAD, HAS_GRAD_SCALE,
                    KAHAN, SR)
    else:
        _adam_block(p_ptr, g_ptr, m_ptr, v_ptr, vmax_ptr, c_ptr, offs, offs < bound,
                    step_size, bc2_sqrt, beta1, beta2, omb1, omb2, eps,
                    weight_decay, decay, inv_scale, maximize, decay_grad, decay_param,
                    lerp_from_start, k0, k1, start, ELEM, IS_BF16, COMPUTE, IS_F64,
                    AMSGRAD, HAS_GRAD_SCALE, KAHAN, SR)


@triton.jit
def _adam_steps_kernel(table_ptr, hyper_ptr, scal_ptr, found_inf_ptr, rows,
                       BLOCK_R: tl.constexpr, HAS_FOUND_INF: tl.constexpr):
    """Advance device-side step counters; each row's scalars for ``_adam_kernel``.

    One lane per row, launched before ``_adam_kernel`` on the same stream,
    so the update reads the scalars this kernel wrote and no program of the
    update can see a half-advanced step. The float64 ``exp2``, division and
    square root of the bias corrections run once per row (they ran once per
    1,024-element program before, in every program of a row).

    Args:
        table_ptr: int64 address table; reads STEP and FLAGS of every row.
        hyper_ptr: float64 hyperparameters (``ADAM_*`` slots).
        scal_ptr: float64 ``[rows, 2]`` out: step size, sqrt(bias correction 2).
        found_inf_ptr: AMP flag (if HAS_FOUND_INF): nonzero leaves every
            counter as it is (the scalars are still written, and unused).
        rows: rows in the table.
        BLOCK_R: rows per program.
    """
    r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    live = r < rows
    step, s64_ptr, s32_ptr, s64, s32, is64, is32 = _read_steps(table_ptr, r, rows)
    # Bias corrections in float64. beta**step as exp2(step * log2(beta))
    # with log2 from the host: the interpreter has no libdevice pow, and
    # the relative error, about |step * log2(beta)| * 2**-53, is far below
    # float32 resolution (and below float64 assert_close's).
    lr64 = tl.load(hyper_ptr + _ADAM_LR)
    # log2 is of |beta|; a negative beta (param_groups edits reach it)
    # flips the sign of its odd powers, as Python's float ** does
    # (times +-1, exact; a vector-and-scalar `&` trips the interpreter)
    odd = (step - 2.0 * tl.floor(step * 0.5)) != 0.0
    b1_pow = tl.exp2(step * tl.load(hyper_ptr + _ADAM_LOG2_BETA1))
    b1_pow *= tl.where(odd, 1.0 - 2.0 * tl.load(hyper_ptr + _ADAM_BETA1_NEG), 1.0)
    b2_pow = tl.exp2(step * tl.load(hyper_ptr + _ADAM_LOG2_BETA2))
    b2_pow *= tl.where(odd, 1.0 - 2.0 * tl.load(hyper_ptr + _ADAM_BETA2_NEG), 1.0)
    tl.store(scal_ptr + 2 * r, lr64 / (1.0 - b1_pow), mask=live)
    tl.store(scal_ptr + 2 * r + 1, tl.sqrt(1.0 - b2_pow), mask=live)
    # a skipped step advances nothing; the flag enters through the row bound
    # (see _sgd_kernel on the interpreter and scalar masks)
    _write_steps(r, rows, s64_ptr, s32_ptr, s64, s32, is64, is32, found_inf_ptr,
                 HAS_FOUND_INF)


def adam(batch, *, lr, beta1, beta2, eps, weight_decay, decoupled_weight_decay,
         amsgrad, maximize, grad_scale=None, found_inf=None, kahan_sum=False,
         stochastic_round=None):
    """Adam / AdamW (torch semantics) over every row; advances steps.

    Step counters on the params' device are read and advanced by a first
    kernel, which also computes each row's bias-corrected scalars once; the
    update (one launch per alignment class present) reads those. No host
    sync. Counters elsewhere (torch's default: CPU steps for CUDA params)
    are advanced by the host, which uploads the scalars.

    Args:
        batch: a :class:`~fused_optim.kernels.batch.Batch`; ``batch.steps``
            holds one 0-dim float32/float64 step tensor per row.
        lr, beta1, beta2, eps, weight_decay, amsgrad, maximize: as
            ``torch.optim.Adam``.
        decoupled_weight_decay: AdamW's decay.
        grad_scale: optional AMP scale, as in :func:`sgd`.
        found_inf: optional AMP flag: when nonzero, params, state and steps
            are left unchanged. With device-side steps this costs no host
            sync; with host-side steps it must be read first (one sync),
            since the host cannot otherwise know whether to advance them
            (fused_optim's optimizers move such steps to the device when
            GradScaler is in use).
        kahan_sum, stochastic_round: how bfloat16/float16 params are
            stored, as in :func:`sgd`.
    """
    if batch.table is None or batch.table.shape[0] == 0:
        return
    device = batch.device
    table = batch.table
    hyper = [lr, beta1, beta2, 1.0 - beta1, 1.0 - beta2, eps, weight_decay,
             1.0 - lr * weight_decay, _log2(beta1), _log2(beta2),
             float(beta1 < 0), float(beta2 < 0), float(bool(maximize)),
             float(bool(decoupled_weight_decay))]
    assert len(hyper) == ADAM_NHYPER
    prec = _precision_args(batch, kahan_sum, stochastic_round)
    hyper += prec.slots
    device_steps = _pkg._steps_on_device(batch)
    with _device_context(device):
        if not device_steps:
            _check_host_steps(batch)
            if found_inf is not None and bool(found_inf.reshape(-1)[0] != 0):
                return  # skipped step: steps stay as they are
            found_inf = None
            scalars = _host_step_scalars(table, lr, beta1, beta2)
        pro = _prologue(batch, hyper if device_steps else None, grad_scale,
                             found_inf)
        layout = pro.layout
        if device_steps:
            hyper = pro.hyper
            # R1: rewritten whole by the step kernel below before each read
            scal = _resident(batch, "scalars", layout.rows, lambda: torch.empty(
                (layout.rows, 2), dtype=torch.float64, device=device))
        else:
            # host-step scalars change every step: not worth a cache entry
            both = _upload(np.concatenate([np.asarray(hyper, np.float64),
                                                scalars.ravel()]), batch)
            hyper, scal = both, both[len(hyper):]
        with _launch_lock():
            if device_steps:
                _adam_steps_kernel[(triton.cdiv(layout.rows, _STEP_ROWS),)](
                    layout.table, hyper, scal, pro.found_inf, layout.rows,
                    BLOCK_R=_STEP_ROWS, HAS_FOUND_INF=pro.found_inf is not None,
                    num_warps=NUM_WARPS, enable_fp_fusion=False)
            _launch_updates(
                _adam_kernel, pro, batch, hyper, scal, pro.grad_scale, pro.found_inf,
                counter_ptr=prec.counter, KAHAN=prec.kahan, SR=prec.sr,
                AMSGRAD=bool(amsgrad))
