"""Rprop for the Triton backend: its kernels and launcher.

Built as ``rmsprop`` (the shared prologue, loads and stores, step counters
in ``_kernels``; the launcher body in ``_launch``), with the element update
of the Numba kernel (``kernels/numba/rprop.py``): torch's sign cases per
element, decided in the storage dtype (the grad as ``unscale_`` stores it,
``grad * prev`` rounded to the storage type, etas and step-size bounds as
that type holds them, rounded on the host). The step counter is only
counted, as RMSprop's.
"""

from __future__ import annotations

import triton
import triton.language as tl

from ..reference.rprop import as_stored
from ..steps import advance_host_steps
from ._kernels import (_grad, _load, _program, _rounded, _store_param, _store_state,
                       count_steps_kernel, slots)
from ._launch import launch

__all__ = ["rprop"]

# Slots of the float64 hyperparameter buffer; the launcher writes them in this
# order. MAXIMIZE holds 1.0 or 0.0: a runtime switch.
(_ETAPLUS, _ETAMINUS, _SIZE_MIN, _SIZE_MAX, _MAXIMIZE, _NHYPER) = slots(6)


@triton.jit
def _rprop_block(p_ptr, g_ptr, prev_ptr, size_ptr, c_ptr, offs, mask, etaplus, etaminus,
                 size_min, size_max, inv_scale, maximize, k0, k1, start,
                 ELEM: tl.constexpr, IS_BF16: tl.constexpr, COMPUTE: tl.constexpr,
                 HAS_GRAD_SCALE: tl.constexpr, KAHAN: tl.constexpr, SR: tl.constexpr,
                 S_ELEM: tl.constexpr, S_IS_BF16: tl.constexpr, SSR: tl.constexpr):
    """The Rprop update of one block (``mask`` None: a whole block)."""
    g, p = _grad(g_ptr, p_ptr, offs, mask, inv_scale, maximize, False, 0.0, IS_BF16,
                 COMPUTE, HAS_GRAD_SCALE)
    g = _rounded(g, IS_BF16, ELEM)  # unscale_ stores the grad: rounded to its type
    # grad.mul(prev).sign(), then the three cases; torch's sign is (0 < a) - (a < 0):
    # a NaN product has sign 0, so its step size stays
    d = _rounded(g * _load(prev_ptr, offs, mask, S_IS_BF16, COMPUTE), IS_BF16, ELEM)
    f = tl.where(d > 0.0, etaplus, tl.where(d < 0.0, etaminus, 1.0))
    # step_size.mul_(sign).clamp_(step_size_min, step_size_max): std::min(std::max(...))
    s = _load(size_ptr, offs, mask, S_IS_BF16, COMPUTE) * f
    if not SSR:  # (bfloat16 state: rounded once, by its store)
        s = _rounded(s, IS_BF16, ELEM)
    s = tl.where(s < size_min, size_min, s)
    s = tl.where(size_max < s, size_max, s)
    _store_state(size_ptr, offs, s, mask, k0, k1, start, 1, S_IS_BF16, S_ELEM, SSR)
    g = tl.where(f == etaminus, 0.0, g)  # grad[sign.eq(etaminus)] = 0
    sg = tl.where(g > 0.0, 1.0, tl.where(g < 0.0, -1.0, 0.0))  # NaN: 0
    # param.addcmul_(grad.sign(), step_size, value=-1)
    _store_param(p_ptr, c_ptr, offs, p, tl.fma(-sg, s, p), mask, k0, k1, start, IS_BF16,
                 ELEM, KAHAN, SR)
    # prev.copy_(grad)
    _store_state(prev_ptr, offs, g, mask, k0, k1, start, 0, S_IS_BF16, S_ELEM, SSR)


@triton.jit
def _rprop_kernel(
    table_ptr, map_ptr, hyper_ptr, grad_scale_ptr, found_inf_ptr,
    ELEM: tl.constexpr, IS_BF16: tl.constexpr, COMPUTE: tl.constexpr,
    IS_F64: tl.constexpr, BLOCK: tl.constexpr, ALIGNED: tl.constexpr,
    TAIL_ALIGNED: tl.constexpr, VEC: tl.constexpr,
    HAS_GRAD_SCALE: tl.constexpr, HAS_FOUND_INF: tl.constexpr,
    counter_ptr=None, KAHAN: tl.constexpr = False, SR: tl.constexpr = False,
    S_ELEM: tl.constexpr = None, S_IS_BF16: tl.constexpr = False, SSR: tl.constexpr = False,
):
    """Rprop on one ``BLOCK`` chunk of one row (torch semantics, in place).

    Args:
        table_ptr: int64 address table, ``[rows, NCOLS]``: STATE0 prev,
            STATE1 step_size.
        map_ptr: int32 ``[programs, 2]`` block map: (row, chunk index).
        hyper_ptr: float64 hyperparameters (the slots ``_ETAPLUS`` ... above,
            each as the storage type holds it), MAXIMIZE as 1.0 or 0.0.
        grad_scale_ptr, found_inf_ptr, ELEM, IS_BF16, COMPUTE, IS_F64, BLOCK,
            ALIGNED, TAIL_ALIGNED, VEC, HAS_GRAD_SCALE, HAS_FOUND_INF,
            counter_ptr, KAHAN, SR, S_ELEM, S_IS_BF16, SSR: as in
            ``rmsprop._rmsprop_kernel``.
    """
    (row, offs, bound, whole, inv_scale, p_ptr, g_ptr, prev_ptr, size_ptr, _s2, c_ptr, k0,
     k1, start) = _program(table_ptr, map_ptr, hyper_ptr, grad_scale_ptr, found_inf_ptr,
                           counter_ptr, ELEM, COMPUTE, BLOCK, ALIGNED, TAIL_ALIGNED, VEC, 2,
                           _NHYPER, HAS_GRAD_SCALE, HAS_FOUND_INF, KAHAN, SR,
                           S_ELEM, SSR)
    etaplus = tl.load(hyper_ptr + _ETAPLUS).to(COMPUTE)
    etaminus = tl.load(hyper_ptr + _ETAMINUS).to(COMPUTE)
    size_min = tl.load(hyper_ptr + _SIZE_MIN).to(COMPUTE)
    size_max = tl.load(hyper_ptr + _SIZE_MAX).to(COMPUTE)
    maximize = tl.load(hyper_ptr + _MAXIMIZE) != 0.0

    if whole:
        _rprop_block(p_ptr, g_ptr, prev_ptr, size_ptr, c_ptr, offs, None, etaplus, etaminus,
                     size_min, size_max, inv_scale, maximize, k0, k1, start, ELEM, IS_BF16,
                     COMPUTE, HAS_GRAD_SCALE, KAHAN, SR, S_ELEM, S_IS_BF16, SSR)
    else:
        _rprop_block(p_ptr, g_ptr, prev_ptr, size_ptr, c_ptr, offs, offs < bound, etaplus,
                     etaminus, size_min, size_max, inv_scale, maximize, k0, k1, start, ELEM,
                     IS_BF16, COMPUTE, HAS_GRAD_SCALE, KAHAN, SR, S_ELEM, S_IS_BF16, SSR)


def rprop(batch, *, etaminus, etaplus, step_size_min, step_size_max, maximize,
          grad_scale=None, found_inf=None, kahan_sum=False, stochastic_round=None,
          state_round=None):
    """Rprop (torch semantics) over every row; advances steps.

    Step counters as in :func:`~fused_optim.kernels.triton.rmsprop`; then one
    update launch per alignment class present. The grads are unscaled in the
    kernel and never written; ``grad_scale``, ``found_inf``, ``kahan_sum``,
    ``stochastic_round``, ``state_round`` as every launcher's.
    """
    dt = batch.dtype
    hyper = [as_stored(dt, etaplus), as_stored(dt, etaminus), as_stored(dt, step_size_min),
             as_stored(dt, step_size_max), float(bool(maximize))]
    assert len(hyper) == _NHYPER.value
    launch(_rprop_kernel, batch, hyper, grad_scale, found_inf, kahan_sum, stochastic_round,
           state_round=state_round,
           steps_kernel=count_steps_kernel, host_steps=advance_host_steps)
