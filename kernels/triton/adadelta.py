"""Adadelta for the Triton backend: its kernels and launcher.

Built as ``rmsprop`` (the shared prologue, loads and stores, step counters
in ``_kernels``; the launcher body in ``_launch``): explicit ``tl.fma``
exactly where torch's CPU kernels fuse and no other contraction, IEEE
``div_rn``/``sqrt_rn`` for float32. The step counter is only counted: a
small kernel of one lane per row advances device-side counters, the host
(``steps.advance_host_steps``) host-side ones.
"""

from __future__ import annotations

import triton
import triton.language as tl

from ..steps import advance_host_steps
from ._kernels import (_grad, _load, _program, _store_param, _store_state,
                       count_steps_kernel, slots)
from ._launch import launch

__all__ = ["adadelta"]

# Slots of the float64 hyperparameter buffer; the launcher writes them in this
# order. MAXIMIZE holds 1.0 or 0.0: a runtime switch.
(_LR, _RHO, _OMR, _EPS, _WD, _MAXIMIZE, _NHYPER) = slots(7)


@triton.jit
def _adadelta_block(p_ptr, g_ptr, sq_ptr, ad_ptr, c_ptr, offs, mask, lr, rho, omr, eps,
                    weight_decay, inv_scale, maximize, has_wd, k0, k1, start,
                    ELEM: tl.constexpr, IS_BF16: tl.constexpr, COMPUTE: tl.constexpr,
                    IS_F64: tl.constexpr, HAS_GRAD_SCALE: tl.constexpr,
                    KAHAN: tl.constexpr, SR: tl.constexpr, S_ELEM: tl.constexpr,
                    S_IS_BF16: tl.constexpr, SSR: tl.constexpr):
    """The Adadelta update of one block (``mask`` None: a whole block)."""
    g, p = _grad(g_ptr, p_ptr, offs, mask, inv_scale, maximize, has_wd, weight_decay,
                 IS_BF16, COMPUTE, HAS_GRAD_SCALE)
    old = p  # the stored param, for the Kahan store
    # square_avg.mul_(rho).addcmul_(grad, grad, value=1 - rho)
    sq = tl.fma(omr * g, g, _load(sq_ptr, offs, mask, S_IS_BF16, COMPUTE) * rho)
    ad = _load(ad_ptr, offs, mask, S_IS_BF16, COMPUTE)
    # std = square_avg.add(eps).sqrt_(); delta = acc_delta.add(eps).sqrt_().div_(std).mul_(grad)
    if IS_F64:
        d = (tl.sqrt(ad + eps) / tl.sqrt(sq + eps)) * g  # sqrt.rn.f64, div.rn.f64 already
    else:
        d = tl.div_rn(tl.sqrt_rn(ad + eps), tl.sqrt_rn(sq + eps)) * g
    # (stored after delta: before it, float32 params with stochastically rounded
    # bfloat16 state spilled on sm_80, 16 bytes of stack; test_state_dtype)
    _store_state(sq_ptr, offs, sq, mask, k0, k1, start, 0, S_IS_BF16, S_ELEM, SSR)
    # acc_delta.mul_(rho).addcmul_(delta, delta, value=1 - rho)
    _store_state(ad_ptr, offs, tl.fma(omr * d, d, ad * rho), mask, k0, k1, start, 1,
                 S_IS_BF16, S_ELEM, SSR)
    p = tl.fma(d, -lr, p)  # param.add_(delta, alpha=-lr)
    _store_param(p_ptr, c_ptr, offs, old, p, mask, k0, k1, start, IS_BF16, ELEM, KAHAN, SR)


@triton.jit
def _adadelta_kernel(
    table_ptr, map_ptr, hyper_ptr, grad_scale_ptr, found_inf_ptr,
    ELEM: tl.constexpr, IS_BF16: tl.constexpr, COMPUTE: tl.constexpr,
    IS_F64: tl.constexpr, BLOCK: tl.constexpr, ALIGNED: tl.constexpr,
    TAIL_ALIGNED: tl.constexpr, VEC: tl.constexpr,
    HAS_GRAD_SCALE: tl.constexpr, HAS_FOUND_INF: tl.constexpr,
    counter_ptr=None, KAHAN: tl.constexpr = False, SR: tl.constexpr = False,
    S_ELEM: tl.constexpr = None, S_IS_BF16: tl.constexpr = False, SSR: tl.constexpr = False,
):
    """Adadelta on one ``BLOCK`` chunk of one row (torch semantics, in place).

    Args:
        table_ptr: int64 address table, ``[rows, NCOLS]``: STATE0
            square_avg, STATE1 acc_delta.
        map_ptr: int32 ``[programs, 2]`` block map: (row, chunk index).
        hyper_ptr: float64 hyperparameters (the slots ``_LR`` ... above), with
            the runtime switches: MAXIMIZE as 1.0 or 0.0; weight decay where
            its float64 value is nonzero.
        grad_scale_ptr, found_inf_ptr, ELEM, IS_BF16, COMPUTE, IS_F64, BLOCK,
            ALIGNED, TAIL_ALIGNED, VEC, HAS_GRAD_SCALE, HAS_FOUND_INF,
            counter_ptr, KAHAN, SR, S_ELEM, S_IS_BF16, SSR: as in
            ``rmsprop._rmsprop_kernel``.
    """
    (row, offs, bound, whole, inv_scale, p_ptr, g_ptr, sq_ptr, ad_ptr, _s2, c_ptr, k0,
     k1, start) = _program(table_ptr, map_ptr, hyper_ptr, grad_scale_ptr, found_inf_ptr,
                           counter_ptr, ELEM, COMPUTE, BLOCK, ALIGNED, TAIL_ALIGNED, VEC, 2,
                           _NHYPER, HAS_GRAD_SCALE, HAS_FOUND_INF, KAHAN, SR,
                           S_ELEM, SSR)
    lr = tl.load(hyper_ptr + _LR).to(COMPUTE)
    rho = tl.load(hyper_ptr + _RHO).to(COMPUTE)
    omr = tl.load(hyper_ptr + _OMR).to(COMPUTE)
    eps = tl.load(hyper_ptr + _EPS).to(COMPUTE)
    weight_decay = tl.load(hyper_ptr + _WD).to(COMPUTE)
    maximize = tl.load(hyper_ptr + _MAXIMIZE) != 0.0
    has_wd = tl.load(hyper_ptr + _WD) != 0.0  # float64, as the launcher's test was

    if whole:
        _adadelta_block(p_ptr, g_ptr, sq_ptr, ad_ptr, c_ptr, offs, None, lr, rho, omr, eps,
                        weight_decay, inv_scale, maximize, has_wd, k0, k1, start, ELEM,
                        IS_BF16, COMPUTE, IS_F64, HAS_GRAD_SCALE, KAHAN, SR, S_ELEM,
                        S_IS_BF16, SSR)
    else:
        _adadelta_block(p_ptr, g_ptr, sq_ptr, ad_ptr, c_ptr, offs, offs < bound, lr, rho,
                        omr, eps, weight_decay, inv_scale, maximize, has_wd, k0, k1, start,
                        ELEM, IS_BF16, COMPUTE, IS_F64, HAS_GRAD_SCALE, KAHAN, SR,
                        S_ELEM, S_IS_BF16, SSR)


def adadelta(batch, *, lr, rho, eps, weight_decay, maximize, grad_scale=None,
             found_inf=None, kahan_sum=False, stochastic_round=None, state_round=None):
    """Adadelta (torch semantics) over every row; advances steps.

    Step counters as in :func:`~fused_optim.kernels.triton.rmsprop`; then one
    update launch per alignment class present. ``lr`` ... ``maximize`` as
    ``torch.optim.Adadelta`` (a Tensor ``lr``, capturable, is read on the
    device); ``grad_scale``, ``found_inf``, ``kahan_sum``,
    ``stochastic_round``, ``state_round`` as every launcher's.
    """
    hyper = [lr, rho, 1.0 - rho, eps, weight_decay, float(bool(maximize))]
    assert len(hyper) == _NHYPER.value
    launch(_adadelta_kernel, batch, hyper, grad_scale, found_inf, kahan_sum, stochastic_round,
           state_round=state_round,
           steps_kernel=count_steps_kernel, host_steps=advance_host_steps)
