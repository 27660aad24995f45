"""NAdam for the Triton backend: its kernels and launcher.

The launcher's body is shared (``_launch.launch``), and so are the update
kernel's prologue, loads and stores and the step counters' reads and writes
(``_kernels``). Element math matches ``kernels/numba/nadam.py`` operation
for operation. Each row's step, ``mu_product`` (its per-row scalar state,
column STATE2, float64 where ``FLAG_SCALAR_F64``) and scalars are advanced
and computed once per step: by ``_nadam_steps_kernel`` on the device, or by
the host for counters in host memory (``steps.nadam_host_steps``).
"""

import math

import triton
import triton.language as tl

from .. import columns as L
from ..steps import nadam_host_steps
from ._kernels import (_grad, _load, _program, _read_steps, _scalar_state, _store_param,
                       _store_state, _write_steps, slots)
from ._launch import launch

__all__ = ["nadam"]

# slots of the float64 hyperparameter buffer; MAXIMIZE and DECOUPLED hold 1.0 or 0.0
(_NA_LR, _NA_BETA1, _NA_BETA2, _NA_OMB1, _NA_OMB2, _NA_EPS, _NA_WD, _NA_DECAY,
 _NA_MD_LOG2, _NA_LOG2_BETA2, _NA_BETA2_NEG, _NA_MAXIMIZE, _NA_DECOUPLED,
 _NA_NHYPER) = slots(14)

_MU_PRODUCT = tl.constexpr(L.STATE2)


@triton.jit
def _nadam_block(p_ptr, g_ptr, m_ptr, v_ptr, c_ptr, offs, mask, bc2, c1, c2, beta2, omb1,
                 omb2, eps, weight_decay, decay, inv_scale, maximize, decay_grad, decay_param,
                 lerp_from_start, k0, k1, start, ELEM: tl.constexpr, IS_BF16: tl.constexpr,
                 COMPUTE: tl.constexpr, IS_F64: tl.constexpr, HAS_GRAD_SCALE: tl.constexpr,
                 KAHAN: tl.constexpr, SR: tl.constexpr,
                 S_ELEM: tl.constexpr, S_IS_BF16: tl.constexpr, SSR: tl.constexpr):
    """The NAdam update of one block (``mask`` None: a whole block)."""
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
    # torch: denom = sqrt(v / bc2) + eps; p += (c1 * g) / denom; p += (c2 * m) / denom
    if IS_F64:
        denom = tl.sqrt(v / bc2) + eps  # div.rn.f64, sqrt.rn.f64 already
        p = p + (c1 * g) / denom
        p = p + (c2 * m) / denom
    else:
        denom = tl.sqrt_rn(tl.div_rn(v, bc2)) + eps
        p = p + tl.div_rn(c1 * g, denom)
        p = p + tl.div_rn(c2 * m, denom)
    _store_param(p_ptr, c_ptr, offs, old, p, mask, k0, k1, start, IS_BF16, ELEM, KAHAN, SR)


@triton.jit
def _nadam_kernel(
    table_ptr, map_ptr, hyper_ptr, scal_ptr, grad_scale_ptr, found_inf_ptr,
    ELEM: tl.constexpr, IS_BF16: tl.constexpr, COMPUTE: tl.constexpr,
    IS_F64: tl.constexpr, BLOCK: tl.constexpr, ALIGNED: tl.constexpr,
    TAIL_ALIGNED: tl.constexpr, VEC: tl.constexpr,
    HAS_GRAD_SCALE: tl.constexpr, HAS_FOUND_INF: tl.constexpr,
    counter_ptr=None, KAHAN: tl.constexpr = False, SR: tl.constexpr = False,
    S_ELEM: tl.constexpr = None, S_IS_BF16: tl.constexpr = False, SSR: tl.constexpr = False,
):
    """NAdam on one ``BLOCK`` chunk of one row (torch semantics, in place).

    Args as ``_adam_kernel``'s (kernels/triton/adam.py); ``scal_ptr`` is
    float64 ``[rows, 3]``: each row's bias correction 2 and the values of
    its two addcdiv. STATE0 is exp_avg, STATE1 exp_avg_sq (STATE2, the
    scalar mu_product, is the step kernel's).
    """
    (row, offs, bound, whole, inv_scale, p_ptr, g_ptr, m_ptr, v_ptr, _, c_ptr, k0, k1,
     start) = _program(table_ptr, map_ptr, hyper_ptr, grad_scale_ptr, found_inf_ptr,
                       counter_ptr, ELEM, COMPUTE, BLOCK, ALIGNED, TAIL_ALIGNED, VEC, 2,
                       _NA_NHYPER, HAS_GRAD_SCALE, HAS_FOUND_INF, KAHAN, SR,
                       S_ELEM, SSR)
    bc2 = tl.load(scal_ptr + 3 * row).to(COMPUTE)
    c1 = tl.load(scal_ptr + 3 * row + 1).to(COMPUTE)
    c2 = tl.load(scal_ptr + 3 * row + 2).to(COMPUTE)
    beta2 = tl.load(hyper_ptr + _NA_BETA2).to(COMPUTE)
    omb1 = tl.load(hyper_ptr + _NA_OMB1).to(COMPUTE)
    omb2 = tl.load(hyper_ptr + _NA_OMB2).to(COMPUTE)
    eps = tl.load(hyper_ptr + _NA_EPS).to(COMPUTE)
    weight_decay = tl.load(hyper_ptr + _NA_WD).to(COMPUTE)
    decay = tl.load(hyper_ptr + _NA_DECAY).to(COMPUTE)
    maximize = tl.load(hyper_ptr + _NA_MAXIMIZE) != 0.0
    decoupled = tl.load(hyper_ptr + _NA_DECOUPLED) != 0.0
    has_wd = tl.load(hyper_ptr + _NA_WD) != 0.0  # float64, as the launcher's test was
    decay_param = has_wd & decoupled
    decay_grad = has_wd & (decoupled == 0)
    lerp_from_start = omb1 < 0.5  # in COMPUTE, as torch.lerp tests its weight

    if whole:
        _nadam_block(p_ptr, g_ptr, m_ptr, v_ptr, c_ptr, offs, None, bc2, c1, c2, beta2, omb1,
                     omb2, eps, weight_decay, decay, inv_scale, maximize, decay_grad,
                     decay_param, lerp_from_start, k0, k1, start, ELEM, IS_BF16, COMPUTE,
                     IS_F64, HAS_GRAD_SCALE, KAHAN, SR, S_ELEM, S_IS_BF16, SSR)
    else:
        _nadam_block(p_ptr, g_ptr, m_ptr, v_ptr, c_ptr, offs, offs < bound, bc2, c1, c2,
                     beta2, omb1, omb2, eps, weight_decay, decay, inv_scale, maximize,
                     decay_grad, decay_param, lerp_from_start, k0, k1, start, ELEM, IS_BF16,
                     COMPUTE, IS_F64, HAS_GRAD_SCALE, KAHAN, SR, S_ELEM, S_IS_BF16, SSR)


@triton.jit
def _nadam_steps_kernel(table_ptr, hyper_ptr, scal_ptr, found_inf_ptr, rows,
                        BLOCK_R: tl.constexpr, HAS_FOUND_INF: tl.constexpr):
    """Advance device-side step counters and mu_products; each row's scalars.

    One lane per row, launched before ``_nadam_kernel`` on the same stream.
    Float64 math; powers as ``exp2`` of a product with a host log2 (as
    ``_adam_steps_kernel``); ``mu_product *= mu`` in the product's own
    dtype. A skipped step (found_inf nonzero) writes neither counters nor
    products.
    """
    r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    live = r < rows
    step, s64_ptr, s32_ptr, s64, s32, is64, is32 = _read_steps(table_ptr, r, rows)
    lr = tl.load(hyper_ptr + _NA_LR)
    beta1 = tl.load(hyper_ptr + _NA_BETA1)
    md_log2 = tl.load(hyper_ptr + _NA_MD_LOG2)  # momentum_decay * log2(0.96)
    mu = beta1 * (1.0 - 0.5 * tl.exp2(step * md_log2))
    mu_next = beta1 * (1.0 - 0.5 * tl.exp2((step + 1.0) * md_log2))
    p64_ptr, p32_ptr, m64, m32 = _scalar_state(table_ptr, r, rows, _MU_PRODUCT)
    prod64 = tl.load(p64_ptr, mask=m64, other=0.0) * mu
    prod32 = tl.load(p32_ptr, mask=m32, other=0.0) * mu.to(tl.float32)
    prod = tl.where(m64, prod64, prod32.to(tl.float64))
    odd = (step - 2.0 * tl.floor(step * 0.5)) != 0.0
    b2_pow = tl.exp2(step * tl.load(hyper_ptr + _NA_LOG2_BETA2))
    b2_pow *= tl.where(odd, 1.0 - 2.0 * tl.load(hyper_ptr + _NA_BETA2_NEG), 1.0)
    tl.store(scal_ptr + 3 * r, 1.0 - b2_pow, mask=live)
    tl.store(scal_ptr + 3 * r + 1, -lr * (1.0 - mu) / (1.0 - prod), mask=live)
    tl.store(scal_ptr + 3 * r + 2, (-lr * mu_next) / (1.0 - prod * mu_next), mask=live)
    limit = rows
    if HAS_FOUND_INF:
        limit = tl.where(tl.load(found_inf_ptr) == 0, rows, 0)
    advance = r < limit
    tl.store(p64_ptr, prod64, mask=advance & m64)
    tl.store(p32_ptr, prod32, mask=advance & m32)
    _write_steps(r, rows, s64_ptr, s32_ptr, s64, s32, is64, is32, found_inf_ptr,
                 HAS_FOUND_INF)


def nadam(batch, *, lr, beta1, beta2, eps, weight_decay, momentum_decay,
          decoupled_weight_decay, maximize, grad_scale=None, found_inf=None, kahan_sum=False,
          stochastic_round=None,
          state_round=None):
    """NAdam (torch semantics) over every row; advances steps and mu_products.

    As the Adam launcher: device-side steps are advanced by a first kernel
    (no host sync); host-side steps (and their mu_products, placed alike)
    by the host, which must then read ``found_inf`` first (one sync).
    """
    from .adam import _log2

    hyper = [lr, beta1, beta2, 1.0 - beta1, 1.0 - beta2, eps, weight_decay,
             1.0 - lr * weight_decay, momentum_decay * math.log2(0.96), _log2(beta2),
             float(beta2 < 0),
             float(bool(maximize)), float(bool(decoupled_weight_decay))]
    assert len(hyper) == _NA_NHYPER.value
    launch(_nadam_kernel, batch, hyper, grad_scale, found_inf, kahan_sum, stochastic_round,
           state_round=state_round,
           steps_kernel=_nadam_steps_kernel, width=3,
           host_steps=lambda table: nadam_host_steps(
               table, lr=lr, beta1=beta1, beta2=beta2, momentum_decay=momentum_decay,
               col=L.STATE2))
