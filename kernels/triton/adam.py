"""Adam / AdamW for the Triton backend: its kernels and launcher.

The launcher's body is shared (``_launch.launch``), and so are the update
kernel's prologue, loads and stores and the step counters' reads and writes
(``_kernels``); host-side steps are advanced by ``kernels/steps.py``.
"""

import math

import triton
import triton.language as tl

from ..steps import adam_host_steps
from ._kernels import (_grad, _load, _load_q, _program, _read_steps, _scales_ptr, slots,
                       _store_param, _store_q, _store_state, _write_steps)
from ._launch import launch

__all__ = ["adam"]

# Slots of the float64 hyperparameter buffer; the launcher writes them in this
# order. MAXIMIZE and DECOUPLED hold 1.0 or 0.0: runtime switches, so that
# they add no compiled specialization (see the kernel's docstring).
(_ADAM_LR, _ADAM_BETA1, _ADAM_BETA2, _ADAM_OMB1, _ADAM_OMB2, _ADAM_EPS, _ADAM_WD,
 _ADAM_DECAY, _ADAM_LOG2_BETA1, _ADAM_LOG2_BETA2, _ADAM_BETA1_NEG, _ADAM_BETA2_NEG,
 _ADAM_MAXIMIZE, _ADAM_DECOUPLED, _ADAM_NHYPER) = slots(15)


@triton.jit
def _adam_block(p_ptr, g_ptr, m_ptr, v_ptr, vmax_ptr, c_ptr, offs, mask, step_size,
                bc2_sqrt, beta1, beta2, omb1, omb2, eps, weight_decay, decay,
                inv_scale, maximize, decay_grad, decay_param, lerp_from_start, k0, k1,
                start, ELEM: tl.constexpr, IS_BF16: tl.constexpr,
                COMPUTE: tl.constexpr, IS_F64: tl.constexpr, AMSGRAD: tl.constexpr,
                HAS_GRAD_SCALE: tl.constexpr, KAHAN: tl.constexpr, SR: tl.constexpr,
                S_ELEM: tl.constexpr, S_IS_BF16: tl.constexpr, SSR: tl.constexpr,
                sc0_ptr, sc1_ptr, sc2_ptr, bound, first, BLOCK: tl.constexpr,
                S_Q: tl.constexpr):
    """The Adam update of one block (``mask`` None: a whole block); see ``_adam_kernel``."""
    g, p = _grad(g_ptr, p_ptr, offs, mask, inv_scale, maximize, decay_grad, weight_decay,
                 IS_BF16, COMPUTE, HAS_GRAD_SCALE)
    old = p  # the stored param, for the Kahan store
    # a select, as _grad's for the grad
    p = tl.where(decay_param, p * decay, p)
    if S_Q:
        m = _load_q(m_ptr, sc0_ptr, offs, mask, True)
        v_old = _load_q(v_ptr, sc1_ptr, offs, mask, False)
    else:
        m = _load(m_ptr, offs, mask, S_IS_BF16, COMPUTE)
        v_old = _load(v_ptr, offs, mask, S_IS_BF16, COMPUTE)
    # torch.lerp's two-sided formula, as its CPU kernel evaluates it
    m = tl.where(lerp_from_start, tl.fma(omb1, g - m, m), tl.fma(omb1 - 1.0, g - m, g))
    v = tl.fma(omb2 * g, g, v_old * beta2)
    if S_Q:
        _store_q(m_ptr, sc0_ptr, offs, m, mask, bound, first, k0, k1, start, 0, BLOCK, SSR)
        _store_q(v_ptr, sc1_ptr, offs, v, mask, bound, first, k0, k1, start, 1, BLOCK, SSR)
    else:
        _store_state(m_ptr, offs, m, mask, k0, k1, start, 0, S_IS_BF16, S_ELEM, SSR)
        _store_state(v_ptr, offs, v, mask, k0, k1, start, 1, S_IS_BF16, S_ELEM, SSR)
    if AMSGRAD:
        if S_Q:
            vmax = _load_q(vmax_ptr, sc2_ptr, offs, mask, False)
        else:
            vmax = _load(vmax_ptr, offs, mask, S_IS_BF16, COMPUTE)
        v = tl.maximum(vmax, v, propagate_nan=tl.PropagateNan.ALL)
        if S_Q:
            _store_q(vmax_ptr, sc2_ptr, offs, v, mask, bound, first, k0, k1, start, 2, BLOCK,
                     SSR)
        else:
            _store_state(vmax_ptr, offs, v, mask, k0, k1, start, 2, S_IS_BF16, S_ELEM, SSR)
    # torch's addcdiv: param + (value * exp_avg) / denom
    if IS_F64:
        denom = tl.sqrt(v) / bc2_sqrt + eps  # sqrt.rn.f64, div.rn.f64 already
        update = (-step_size * m) / denom
    else:
        denom = tl.div_rn(tl.sqrt_rn(v), bc2_sqrt) + eps
        update = tl.div_rn(-step_size * m, denom)
    _store_param(p_ptr, c_ptr, offs, old, p + update, mask, k0, k1, start, IS_BF16, ELEM,
                 KAHAN, SR)


@triton.jit
def _adam_kernel(
    table_ptr, map_ptr, hyper_ptr, scal_ptr, grad_scale_ptr, found_inf_ptr,
    ELEM: tl.constexpr, IS_BF16: tl.constexpr, COMPUTE: tl.constexpr,
    IS_F64: tl.constexpr, BLOCK: tl.constexpr, ALIGNED: tl.constexpr,
    TAIL_ALIGNED: tl.constexpr, VEC: tl.constexpr, AMSGRAD: tl.constexpr,
    HAS_GRAD_SCALE: tl.constexpr, HAS_FOUND_INF: tl.constexpr,
    counter_ptr=None, KAHAN: tl.constexpr = False, SR: tl.constexpr = False,
    S_ELEM: tl.constexpr = None, S_IS_BF16: tl.constexpr = False, SSR: tl.constexpr = False,
    S_Q: tl.constexpr = False,
):
    """Adam / AdamW on one ``BLOCK`` chunk of one row (torch semantics).

    The step counters are not touched here: row r's (step size, sqrt of the
    second bias correction) wait at ``scal_ptr[2*r]``, computed once per row
    for this step, by ``_adam_steps_kernel`` on the device (which also
    advances the counters) or by the host.

    Args:
        table_ptr: int64 address table, ``[rows, NCOLS]``.
        map_ptr: int32 ``[programs, 2]`` block map: (row, chunk index).
        hyper_ptr: float64 hyperparameters (``_ADAM_*`` slots), with the
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
            ``_sgd_kernel`` (seed and salt after ``_ADAM_NHYPER``).
        S_Q: the state is blockwise 8-bit (``state_bits=8``; ``_kernels``,
            "blockwise 8-bit state"): codes in STATE0..2, scales in SCALE0..2.
    """
    (row, offs, bound, whole, inv_scale, p_ptr, g_ptr, m_ptr, v_ptr, vmax_ptr, c_ptr, k0,
     k1, start) = _program(table_ptr, map_ptr, hyper_ptr, grad_scale_ptr, found_inf_ptr,
                           counter_ptr, ELEM, COMPUTE, BLOCK, ALIGNED, TAIL_ALIGNED, VEC, 3,
                           _ADAM_NHYPER, HAS_GRAD_SCALE, HAS_FOUND_INF, KAHAN, SR,
                           S_ELEM, SSR)
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
    # (STATE2, max_exp_avg_sq, has address 0 without amsgrad)
    sc0_ptr = scal_ptr  # (unused unless S_Q)
    sc1_ptr = scal_ptr
    sc2_ptr = scal_ptr
    first = 0  # (unused unless S_Q)
    if S_Q:
        sc0_ptr = _scales_ptr(table_ptr, row, 0)
        sc1_ptr = _scales_ptr(table_ptr, row, 1)
        if AMSGRAD:
            sc2_ptr = _scales_ptr(table_ptr, row, 2)
        first = tl.load(map_ptr + 2 * tl.program_id(0).to(tl.int64) + 1).to(tl.int64) * BLOCK

    if whole:
        _adam_block(p_ptr, g_ptr, m_ptr, v_ptr, vmax_ptr, c_ptr, offs, None, step_size,
                    bc2_sqrt, beta1, beta2, omb1, omb2, eps, weight_decay, decay,
                    inv_scale, maximize, decay_grad, decay_param, lerp_from_start, k0,
                    k1, start, ELEM, IS_BF16, COMPUTE, IS_F64, AMSGRAD, HAS_GRAD_SCALE,
                    KAHAN, SR, S_ELEM, S_IS_BF16, SSR, sc0_ptr, sc1_ptr, sc2_ptr, bound,
                    first, BLOCK, S_Q)
    else:
        _adam_block(p_ptr, g_ptr, m_ptr, v_ptr, vmax_ptr, c_ptr, offs, offs < bound,
                    step_size, bc2_sqrt, beta1, beta2, omb1, omb2, eps,
                    weight_decay, decay, inv_scale, maximize, decay_grad, decay_param,
                    lerp_from_start, k0, k1, start, ELEM, IS_BF16, COMPUTE, IS_F64,
                    AMSGRAD, HAS_GRAD_SCALE, KAHAN, SR, S_ELEM, S_IS_BF16, SSR, sc0_ptr,
                    sc1_ptr, sc2_ptr, bound, first, BLOCK, S_Q)


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
        hyper_ptr: float64 hyperparameters (``_ADAM_*`` slots).
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
    # (see _kernels._program on the interpreter and scalar masks)
    _write_steps(r, rows, s64_ptr, s32_ptr, s64, s32, is64, is32, found_inf_ptr,
                 HAS_FOUND_INF)


def adam(batch, *, lr, beta1, beta2, eps, weight_decay, decoupled_weight_decay,
         amsgrad, maximize, grad_scale=None, found_inf=None, kahan_sum=False,
         stochastic_round=None, state_round=None):
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
    hyper = [lr, beta1, beta2, 1.0 - beta1, 1.0 - beta2, eps, weight_decay,
             1.0 - lr * weight_decay, _log2(beta1), _log2(beta2),
             float(beta1 < 0), float(beta2 < 0), float(bool(maximize)),
             float(bool(decoupled_weight_decay))]
    assert len(hyper) == _ADAM_NHYPER.value
    launch(_adam_kernel, batch, hyper, grad_scale, found_inf, kahan_sum, stochastic_round,
           state_round=state_round,
           steps_kernel=_adam_steps_kernel, width=2,
           host_steps=lambda table: adam_host_steps(table, lr=lr, beta1=beta1, beta2=beta2),
           AMSGRAD=bool(amsgrad))


def _log2(x: float) -> float:
    """log2 |x| (the step kernel restores a negative x's sign from its own slot)."""
    x = abs(x)
    if x != x:
        return math.nan
    return math.log2(x) if x > 0 else -math.inf
