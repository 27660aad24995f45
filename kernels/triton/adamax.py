"""Adamax for the Triton backend: its kernels and launcher.

The launcher's body is shared (``_launch.launch``), and so are the update
kernel's prologue, loads and stores and the step counters' reads and writes
(``_kernels``). Element math matches ``kernels/numba/adamax.py`` operation
for operation. Each row's ``clr = lr / (1 - beta1**step)`` is computed once
per step: by ``_adamax_steps_kernel`` on the device (which also advances
device-side counters, in float64), or by the host for counters in host
memory (``steps.adamax_host_steps``, in a Tensor lr's dtype as torch's loop).
"""

import triton
import triton.language as tl

from ..steps import adamax_host_steps
from ._kernels import (_grad, _load, _program, _read_steps, _rounded, _store_param,
                       _store_state, _write_steps, slots)
from ._launch import launch
from .adam import _log2

__all__ = ["adamax"]

# slots of the float64 hyperparameter buffer; MAXIMIZE holds 1.0 or 0.0
(_AX_LR, _AX_BETA1, _AX_BETA2, _AX_OMB1, _AX_EPS, _AX_WD, _AX_LOG2_BETA1, _AX_BETA1_NEG,
 _AX_MAXIMIZE, _AX_NHYPER) = slots(10)


@triton.jit
def _adamax_block(p_ptr, g_ptr, m_ptr, u_ptr, c_ptr, offs, mask, neg_clr, beta2, omb1, eps,
                  weight_decay, inv_scale, maximize, has_wd, lerp_from_start, k0, k1, start,
                  ELEM: tl.constexpr, IS_BF16: tl.constexpr, COMPUTE: tl.constexpr,
                  IS_F64: tl.constexpr, HAS_GRAD_SCALE: tl.constexpr, KAHAN: tl.constexpr,
                  SR: tl.constexpr,
                  S_ELEM: tl.constexpr, S_IS_BF16: tl.constexpr, SSR: tl.constexpr):
    """The Adamax update of one block (``mask`` None: a whole block)."""
    g, p = _grad(g_ptr, p_ptr, offs, mask, inv_scale, maximize, has_wd, weight_decay,
                 IS_BF16, COMPUTE, HAS_GRAD_SCALE)
    m = _load(m_ptr, offs, mask, S_IS_BF16, COMPUTE)
    # torch.lerp's two-sided formula, as its CPU kernel evaluates it
    m = tl.where(lerp_from_start, tl.fma(omb1, g - m, m), tl.fma(omb1 - 1.0, g - m, g))
    # each side rounded to the state's storage type (not where its store rounds
    # stochastically: its one rounding), the grad to its own, as torch's loop
    # (see numba.adamax)
    a = _load(u_ptr, offs, mask, S_IS_BF16, COMPUTE) * beta2
    b = tl.abs(_rounded(g, IS_BF16, ELEM)) + eps
    if not SSR:
        a = _rounded(a, S_IS_BF16, S_ELEM)
        b = _rounded(b, S_IS_BF16, S_ELEM)
    u = tl.maximum(a, b, propagate_nan=tl.PropagateNan.ALL)
    _store_state(m_ptr, offs, m, mask, k0, k1, start, 0, S_IS_BF16, S_ELEM,
                 SSR)
    _store_state(u_ptr, offs, u, mask, k0, k1, start, 1, S_IS_BF16, S_ELEM,
                 SSR)
    # torch's addcdiv: param + (value * exp_avg) / exp_inf
    if IS_F64:
        update = (neg_clr * m) / u  # div.rn.f64 already
    else:
        update = tl.div_rn(neg_clr * m, u)
    _store_param(p_ptr, c_ptr, offs, p, p + update, mask, k0, k1, start, IS_BF16, ELEM,
                 KAHAN, SR)


@triton.jit
def _adamax_kernel(
    table_ptr, map_ptr, hyper_ptr, scal_ptr, grad_scale_ptr, found_inf_ptr,
    ELEM: tl.constexpr, IS_BF16: tl.constexpr, COMPUTE: tl.constexpr,
    IS_F64: tl.constexpr, BLOCK: tl.constexpr, ALIGNED: tl.constexpr,
    TAIL_ALIGNED: tl.constexpr, VEC: tl.constexpr,
    HAS_GRAD_SCALE: tl.constexpr, HAS_FOUND_INF: tl.constexpr,
    counter_ptr=None, KAHAN: tl.constexpr = False, SR: tl.constexpr = False,
    S_ELEM: tl.constexpr = None, S_IS_BF16: tl.constexpr = False, SSR: tl.constexpr = False,
):
    """Adamax on one ``BLOCK`` chunk of one row (torch semantics, in place).

    Args as ``_adam_kernel``'s (kernels/triton/adam.py); ``scal_ptr`` is
    float64 ``[rows]``: each row's clr for this step. STATE0 is exp_avg,
    STATE1 exp_inf.
    """
    (row, offs, bound, whole, inv_scale, p_ptr, g_ptr, m_ptr, u_ptr, _, c_ptr, k0, k1,
     start) = _program(table_ptr, map_ptr, hyper_ptr, grad_scale_ptr, found_inf_ptr,
                       counter_ptr, ELEM, COMPUTE, BLOCK, ALIGNED, TAIL_ALIGNED, VEC, 2,
                       _AX_NHYPER, HAS_GRAD_SCALE, HAS_FOUND_INF, KAHAN, SR,
                       S_ELEM, SSR)
    neg_clr = -(tl.load(scal_ptr + row).to(COMPUTE))
    beta2 = tl.load(hyper_ptr + _AX_BETA2).to(COMPUTE)
    omb1 = tl.load(hyper_ptr + _AX_OMB1).to(COMPUTE)
    eps = tl.load(hyper_ptr + _AX_EPS).to(COMPUTE)
    weight_decay = tl.load(hyper_ptr + _AX_WD).to(COMPUTE)
    maximize = tl.load(hyper_ptr + _AX_MAXIMIZE) != 0.0
    has_wd = tl.load(hyper_ptr + _AX_WD) != 0.0  # float64, as the launcher's test was
    lerp_from_start = omb1 < 0.5  # in COMPUTE, as torch.lerp tests its weight

    if whole:
        _adamax_block(p_ptr, g_ptr, m_ptr, u_ptr, c_ptr, offs, None, neg_clr, beta2, omb1,
                      eps, weight_decay, inv_scale, maximize, has_wd, lerp_from_start, k0,
                      k1, start, ELEM, IS_BF16, COMPUTE, IS_F64, HAS_GRAD_SCALE, KAHAN, SR,
                      S_ELEM, S_IS_BF16, SSR)
    else:
        _adamax_block(p_ptr, g_ptr, m_ptr, u_ptr, c_ptr, offs, offs < bound, neg_clr, beta2,
                      omb1, eps, weight_decay, inv_scale, maximize, has_wd,
                      lerp_from_start, k0, k1, start, ELEM, IS_BF16, COMPUTE, IS_F64,
                      HAS_GRAD_SCALE, KAHAN, SR, S_ELEM, S_IS_BF16, SSR)


@triton.jit
def _adamax_steps_kernel(table_ptr, hyper_ptr, scal_ptr, found_inf_ptr, rows,
                         BLOCK_R: tl.constexpr, HAS_FOUND_INF: tl.constexpr):
    """Advance device-side step counters; each row's clr for ``_adamax_kernel``.

    One lane per row, launched before the update on the same stream; float64
    math, ``beta1**step`` as ``exp2(step * log2|beta1|)`` with the sign of
    odd powers restored (as ``_adam_steps_kernel``).
    """
    r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    live = r < rows
    step, s64_ptr, s32_ptr, s64, s32, is64, is32 = _read_steps(table_ptr, r, rows)
    odd = (step - 2.0 * tl.floor(step * 0.5)) != 0.0
    b1_pow = tl.exp2(step * tl.load(hyper_ptr + _AX_LOG2_BETA1))
    b1_pow *= tl.where(odd, 1.0 - 2.0 * tl.load(hyper_ptr + _AX_BETA1_NEG), 1.0)
    tl.store(scal_ptr + r, tl.load(hyper_ptr + _AX_LR) / (1.0 - b1_pow), mask=live)
    _write_steps(r, rows, s64_ptr, s32_ptr, s64, s32, is64, is32, found_inf_ptr,
                 HAS_FOUND_INF)


def adamax(batch, *, lr, beta1, beta2, eps, weight_decay, maximize, lr_round=0,
           grad_scale=None, found_inf=None, kahan_sum=False, stochastic_round=None,
           state_round=None):
    """Adamax (torch semantics) over every row; advances steps.

    As the Adam launcher: device-side steps are advanced by a first kernel
    (no host sync); host-side steps by the host, which must then read
    ``found_inf`` first (one sync) to know whether to advance them.
    """
    hyper = [lr, beta1, beta2, 1.0 - beta1, eps, weight_decay, _log2(beta1),
             float(beta1 < 0), float(bool(maximize))]
    assert len(hyper) == _AX_NHYPER.value
    launch(_adamax_kernel, batch, hyper, grad_scale, found_inf, kahan_sum, stochastic_round,
           state_round=state_round,
           steps_kernel=_adamax_steps_kernel, width=1,
           host_steps=lambda table: adamax_host_steps(table, lr=lr, beta1=beta1,
                                                      lr_round=lr_round))
