"""RAdam for the Triton backend: its kernels and launcher.

The launcher's body is shared (``_launch.launch``), and so are the update
kernel's prologue, loads and stores and the step counters' reads and writes
(``_kernels``). Element math matches ``kernels/numba/radam.py`` operation
for operation. Each row's bias corrections and rectification term (or -1.0
where torch's ``rho_t > 5`` fails for the row's step) are computed once per
step: by ``_radam_steps_kernel`` on the device (which also advances
device-side counters), or by the host for counters in host memory
(``steps.radam_host_steps``).
"""

import triton
import triton.language as tl

from ..steps import radam_host_steps
from ._kernels import (_grad, _load, _program, _read_steps, _store_param, _store_state,
                       _write_steps, slots)
from ._launch import launch
from .adam import _log2

__all__ = ["radam"]

# slots of the float64 hyperparameter buffer; MAXIMIZE and DECOUPLED hold 1.0 or 0.0
(_RA_LR, _RA_BETA2, _RA_OMB1, _RA_OMB2, _RA_EPS, _RA_WD, _RA_DECAY, _RA_RHO_INF,
 _RA_LOG2_BETA1, _RA_LOG2_BETA2, _RA_BETA1_NEG, _RA_BETA2_NEG, _RA_MAXIMIZE, _RA_DECOUPLED,
 _RA_NHYPER) = slots(15)


@triton.jit
def _radam_block(p_ptr, g_ptr, m_ptr, v_ptr, c_ptr, offs, mask, bc1, bc2_sqrt, rect, lr,
                 beta2, omb1, omb2, eps, weight_decay, decay, inv_scale, maximize,
                 decay_grad, decay_param, lerp_from_start, k0, k1, start, ELEM: tl.constexpr,
                 IS_BF16: tl.constexpr, COMPUTE: tl.constexpr, IS_F64: tl.constexpr,
                 HAS_GRAD_SCALE: tl.constexpr, KAHAN: tl.constexpr, SR: tl.constexpr,
                 S_ELEM: tl.constexpr, S_IS_BF16: tl.constexpr, SSR: tl.constexpr):
    """The RAdam update of one block (``mask`` None: a whole block)."""
    g, p = _grad(g_ptr, p_ptr, offs, mask, inv_scale, maximize, decay_grad, weight_decay,
                 IS_BF16, COMPUTE, HAS_GRAD_SCALE)
    old = p
    p = tl.where(decay_param, p * decay, p)
    m = _load(m_ptr, offs, mask, S_IS_BF16, COMPUTE)
    m = tl.where(lerp_from_start, tl.fma(omb1, g - m, m), tl.fma(omb1 - 1.0, g - m, g))
    v = tl.fma(omb2 * g, g, _load(v_ptr, offs, mask, S_IS_BF16, COMPUTE) * beta2)
    _store_state(m_ptr, offs, m, mask, k0, k1, start, 0, S_IS_BF16, S_ELEM,
                 SSR)
    _store_state(v_ptr, offs, v, mask, k0, k1, start, 1, S_IS_BF16, S_ELEM,
                 SSR)
    # torch: exp_avg / bc1 * lr [* (1 / (sqrt(v) + eps) * sqrt(bc2)) * rect]
    if IS_F64:
        step = m / bc1 * lr  # div.rn.f64, sqrt.rn.f64 already
        adaptive = 1.0 / (tl.sqrt(v) + eps) * bc2_sqrt
    else:
        step = tl.div_rn(m, bc1) * lr
        adaptive = tl.div_rn(tl.full((), 1.0, tl.float32), tl.sqrt_rn(v) + eps) * bc2_sqrt
    step = tl.where(rect > 0.0, step * adaptive * rect, step)
    _store_param(p_ptr, c_ptr, offs, old, p - step, mask, k0, k1, start, IS_BF16, ELEM,
                 KAHAN, SR)


@triton.jit
def _radam_kernel(
    table_ptr, map_ptr, hyper_ptr, scal_ptr, grad_scale_ptr, found_inf_ptr,
    ELEM: tl.constexpr, IS_BF16: tl.constexpr, COMPUTE: tl.constexpr,
    IS_F64: tl.constexpr, BLOCK: tl.constexpr, ALIGNED: tl.constexpr,
    TAIL_ALIGNED: tl.constexpr, VEC: tl.constexpr,
    HAS_GRAD_SCALE: tl.constexpr, HAS_FOUND_INF: tl.constexpr,
    counter_ptr=None, KAHAN: tl.constexpr = False, SR: tl.constexpr = False,
    S_ELEM: tl.constexpr = None, S_IS_BF16: tl.constexpr = False, SSR: tl.constexpr = False,
):
    """RAdam on one ``BLOCK`` chunk of one row (torch semantics, in place).

    Args as ``_adam_kernel``'s (kernels/triton/adam.py); ``scal_ptr`` is
    float64 ``[rows, 3]``: each row's bias correction 1, sqrt of bias
    correction 2 and rectification term (negative: not rectified). STATE0
    is exp_avg, STATE1 exp_avg_sq.
    """
    (row, offs, bound, whole, inv_scale, p_ptr, g_ptr, m_ptr, v_ptr, _, c_ptr, k0, k1,
     start) = _program(table_ptr, map_ptr, hyper_ptr, grad_scale_ptr, found_inf_ptr,
                       counter_ptr, ELEM, COMPUTE, BLOCK, ALIGNED, TAIL_ALIGNED, VEC, 2,
                       _RA_NHYPER, HAS_GRAD_SCALE, HAS_FOUND_INF, KAHAN, SR,
                       S_ELEM, SSR)
    bc1 = tl.load(scal_ptr + 3 * row).to(COMPUTE)
    bc2_sqrt = tl.load(scal_ptr + 3 * row + 1).to(COMPUTE)
    rect = tl.load(scal_ptr + 3 * row + 2).to(COMPUTE)
    lr = tl.load(hyper_ptr + _RA_LR).to(COMPUTE)
    beta2 = tl.load(hyper_ptr + _RA_BETA2).to(COMPUTE)
    omb1 = tl.load(hyper_ptr + _RA_OMB1).to(COMPUTE)
    omb2 = tl.load(hyper_ptr + _RA_OMB2).to(COMPUTE)
    eps = tl.load(hyper_ptr + _RA_EPS).to(COMPUTE)
    weight_decay = tl.load(hyper_ptr + _RA_WD).to(COMPUTE)
    decay = tl.load(hyper_ptr + _RA_DECAY).to(COMPUTE)
    maximize = tl.load(hyper_ptr + _RA_MAXIMIZE) != 0.0
    decoupled = tl.load(hyper_ptr + _RA_DECOUPLED) != 0.0
    has_wd = tl.load(hyper_ptr + _RA_WD) != 0.0  # float64, as the launcher's test was
    decay_param = has_wd & decoupled
    decay_grad = has_wd & (decoupled == 0)
    lerp_from_start = omb1 < 0.5  # in COMPUTE, as torch.lerp tests its weight

    if whole:
        _radam_block(p_ptr, g_ptr, m_ptr, v_ptr, c_ptr, offs, None, bc1, bc2_sqrt, rect, lr,
                     beta2, omb1, omb2, eps, weight_decay, decay, inv_scale, maximize,
                     decay_grad, decay_param, lerp_from_start, k0, k1, start, ELEM, IS_BF16,
                     COMPUTE, IS_F64, HAS_GRAD_SCALE, KAHAN, SR, S_ELEM, S_IS_BF16, SSR)
    else:
        _radam_block(p_ptr, g_ptr, m_ptr, v_ptr, c_ptr, offs, offs < bound, bc1, bc2_sqrt,
                     rect, lr, beta2, omb1, omb2, eps, weight_decay, decay, inv_scale,
                     maximize, decay_grad, decay_param, lerp_from_start, k0, k1, start, ELEM,
                     IS_BF16, COMPUTE, IS_F64, HAS_GRAD_SCALE, KAHAN, SR, S_ELEM, S_IS_BF16, SSR)


@triton.jit
def _radam_steps_kernel(table_ptr, hyper_ptr, scal_ptr, found_inf_ptr, rows,
                        BLOCK_R: tl.constexpr, HAS_FOUND_INF: tl.constexpr):
    """Advance device-side step counters; each row's scalars for ``_radam_kernel``.

    One lane per row, launched before the update on the same stream; float64
    math, ``beta**step`` as ``exp2(step * log2|beta|)`` with the sign of odd
    powers restored (as ``_adam_steps_kernel``).
    """
    r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    live = r < rows
    step, s64_ptr, s32_ptr, s64, s32, is64, is32 = _read_steps(table_ptr, r, rows)
    odd = (step - 2.0 * tl.floor(step * 0.5)) != 0.0
    b1_pow = tl.exp2(step * tl.load(hyper_ptr + _RA_LOG2_BETA1))
    b1_pow *= tl.where(odd, 1.0 - 2.0 * tl.load(hyper_ptr + _RA_BETA1_NEG), 1.0)
    b2_pow = tl.exp2(step * tl.load(hyper_ptr + _RA_LOG2_BETA2))
    b2_pow *= tl.where(odd, 1.0 - 2.0 * tl.load(hyper_ptr + _RA_BETA2_NEG), 1.0)
    bc2 = 1.0 - b2_pow
    rho_inf = tl.load(hyper_ptr + _RA_RHO_INF)
    rho_t = rho_inf - 2.0 * step * b2_pow / bc2
    ratio = ((rho_t - 4.0) * (rho_t - 2.0) * rho_inf
             / ((rho_inf - 4.0) * (rho_inf - 2.0) * rho_t))
    rect = tl.where(rho_t > 5.0, tl.sqrt(tl.where(rho_t > 5.0, ratio, 1.0)), -1.0)
    tl.store(scal_ptr + 3 * r, 1.0 - b1_pow, mask=live)
    tl.store(scal_ptr + 3 * r + 1, tl.sqrt(bc2), mask=live)
    tl.store(scal_ptr + 3 * r + 2, rect, mask=live)
    _write_steps(r, rows, s64_ptr, s32_ptr, s64, s32, is64, is32, found_inf_ptr,
                 HAS_FOUND_INF)


def radam(batch, *, lr, beta1, beta2, eps, weight_decay, decoupled_weight_decay, maximize,
          grad_scale=None, found_inf=None, kahan_sum=False, stochastic_round=None,
          state_round=None):
    """RAdam (torch semantics) over every row; advances steps.

    As the Adam launcher: device-side steps are advanced by a first kernel
    (no host sync); host-side steps by the host, which must then read
    ``found_inf`` first (one sync) to know whether to advance them.
    """
    one_minus = 1.0 - beta2
    rho_inf = 2.0 / one_minus - 1.0 if one_minus != 0 else float("inf")
    hyper = [lr, beta2, 1.0 - beta1, one_minus, eps, weight_decay, 1.0 - lr * weight_decay,
             rho_inf, _log2(beta1), _log2(beta2), float(beta1 < 0), float(beta2 < 0),
             float(bool(maximize)), float(bool(decoupled_weight_decay))]
    assert len(hyper) == _RA_NHYPER.value
    launch(_radam_kernel, batch, hyper, grad_scale, found_inf, kahan_sum, stochastic_round,
           state_round=state_round,
           steps_kernel=_radam_steps_kernel, width=3,
           host_steps=lambda table: radam_host_steps(table, beta1=beta1, beta2=beta2))
