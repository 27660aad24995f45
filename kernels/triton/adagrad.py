"""Adagrad for the Triton GPU backend: its kernels and launcher.

The launcher's body is shared (``_launch.launch``), and so are the update
kernel's prologue, loads and stores and the step counters' reads and writes
(``_kernels``). Element math matches ``kernels/numba/adagrad.py`` operation
for operation (see ``kernels/triton/_kernels.py`` on roundings, ``div_rn`` /
``sqrt_rn`` and bfloat16).

Each row's ``clr = lr / (1 + (step - 1) * lr_decay)`` is computed once per
step, as torch's loop computes it (in float64; for a Tensor lr in its dtype,
see ``kernels/steps.py``): by ``_adagrad_steps_kernel`` on the device,
which also advances device-side step counters (no host sync), or by the
host for counters in host memory (torch's default: CPU steps for CUDA
params; ``steps.adagrad_host_steps``).
"""

import triton
import triton.language as tl

from ..steps import adagrad_host_steps
from ._kernels import (_grad, _load, _program, _read_steps, slots, _store_param, _store_state,
                       _write_steps)
from ._launch import launch

__all__ = ["adagrad"]

# slots of the float64 hyperparameter buffer; MAXIMIZE holds 1.0 or 0.0 and
# LR_ROUND the lr's dtype code (kernels/steps.py's LR_F64 ... LR_F16):
# runtime switches, so that they add no compiled specialization
(_AG_LR, _AG_LR_DECAY, _AG_EPS, _AG_WD, _AG_MAXIMIZE, _AG_LR_ROUND,
 _AG_NHYPER) = slots(7)


@triton.jit
def _adagrad_block(p_ptr, g_ptr, s_ptr, c_ptr, offs, mask, neg_clr, eps, weight_decay,
                   inv_scale, maximize, has_wd, k0, k1, start, ELEM: tl.constexpr,
                   IS_BF16: tl.constexpr, COMPUTE: tl.constexpr, IS_F64: tl.constexpr,
                   HAS_GRAD_SCALE: tl.constexpr, KAHAN: tl.constexpr, SR: tl.constexpr,
                   S_ELEM: tl.constexpr, S_IS_BF16: tl.constexpr, SSR: tl.constexpr):
    """The Adagrad update of one block (``mask`` None: a whole block)."""
    g, p = _grad(g_ptr, p_ptr, offs, mask, inv_scale, maximize, has_wd, weight_decay,
                 IS_BF16, COMPUTE, HAS_GRAD_SCALE)
    s = tl.fma(g, g, _load(s_ptr, offs, mask, S_IS_BF16, COMPUTE))  # addcmul(value=1)
    _store_state(s_ptr, offs, s, mask, k0, k1, start, 0, S_IS_BF16, S_ELEM, SSR)
    # torch's addcdiv: param + (value * grad) / std
    if IS_F64:
        std = tl.sqrt(s) + eps  # sqrt.rn.f64, div.rn.f64 already
        update = (neg_clr * g) / std
    else:
        std = tl.sqrt_rn(s) + eps
        update = tl.div_rn(neg_clr * g, std)
    _store_param(p_ptr, c_ptr, offs, p, p + update, mask, k0, k1, start, IS_BF16, ELEM,
                 KAHAN, SR)


@triton.jit
def _adagrad_kernel(
    table_ptr, map_ptr, hyper_ptr, scal_ptr, grad_scale_ptr, found_inf_ptr,
    ELEM: tl.constexpr, IS_BF16: tl.constexpr, COMPUTE: tl.constexpr,
    IS_F64: tl.constexpr, BLOCK: tl.constexpr, ALIGNED: tl.constexpr,
    TAIL_ALIGNED: tl.constexpr, VEC: tl.constexpr,
    HAS_GRAD_SCALE: tl.constexpr, HAS_FOUND_INF: tl.constexpr,
    counter_ptr=None, KAHAN: tl.constexpr = False, SR: tl.constexpr = False,
    S_ELEM: tl.constexpr = None, S_IS_BF16: tl.constexpr = False, SSR: tl.constexpr = False,
):
    """Adagrad on one ``BLOCK`` chunk of one row (torch semantics, in place).

    Args as ``_adam_kernel``'s (kernels/triton/adam.py); ``scal_ptr`` is
    float64 ``[rows]``: each row's clr for this step. STATE0 is ``sum``.
    MAXIMIZE is the hyperparameter slot ``_AG_MAXIMIZE`` (1.0 or 0.0), and
    weight decay applies where its float64 slot is nonzero.
    """
    (row, offs, bound, whole, inv_scale, p_ptr, g_ptr, s_ptr, _, _, c_ptr, k0, k1,
     start) = _program(table_ptr, map_ptr, hyper_ptr, grad_scale_ptr, found_inf_ptr,
                       counter_ptr, ELEM, COMPUTE, BLOCK, ALIGNED, TAIL_ALIGNED, VEC, 1,
                       _AG_NHYPER, HAS_GRAD_SCALE, HAS_FOUND_INF, KAHAN, SR,
                       S_ELEM, SSR)
    neg_clr = -(tl.load(scal_ptr + row).to(COMPUTE))
    eps = tl.load(hyper_ptr + _AG_EPS).to(COMPUTE)
    weight_decay = tl.load(hyper_ptr + _AG_WD).to(COMPUTE)
    maximize = tl.load(hyper_ptr + _AG_MAXIMIZE) != 0.0
    has_wd = tl.load(hyper_ptr + _AG_WD) != 0.0  # float64, as the launcher's test was

    if whole:
        _adagrad_block(p_ptr, g_ptr, s_ptr, c_ptr, offs, None, neg_clr, eps,
                       weight_decay, inv_scale, maximize, has_wd, k0, k1, start, ELEM,
                       IS_BF16, COMPUTE, IS_F64, HAS_GRAD_SCALE, KAHAN, SR, S_ELEM, S_IS_BF16, SSR)
    else:
        _adagrad_block(p_ptr, g_ptr, s_ptr, c_ptr, offs, offs < bound, neg_clr, eps,
                       weight_decay, inv_scale, maximize, has_wd, k0, k1, start, ELEM,
                       IS_BF16, COMPUTE, IS_F64, HAS_GRAD_SCALE, KAHAN, SR, S_ELEM, S_IS_BF16, SSR)


@triton.jit
def _adagrad_steps_kernel(table_ptr, hyper_ptr, scal_ptr, found_inf_ptr, rows,
                          BLOCK_R: tl.constexpr, HAS_FOUND_INF: tl.constexpr):
    """Advance device-side step counters; each row's clr for ``_adagrad_kernel``.

    One lane per row, launched before the update on the same stream. A
    skipped step (found_inf nonzero) leaves every counter as it is (the
    scalars are still written, and unused). The slot ``_AG_LR_ROUND`` says
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
            grad_scale=None, found_inf=None, kahan_sum=False, stochastic_round=None,
            state_round=None):
    """Adagrad (torch semantics) over every row; advances steps.

    As the Adam launcher: device-side steps are advanced by a first kernel
    (no host sync); host-side steps by the host, which must then read
    ``found_inf`` first (one sync) to know whether to advance them.
    """
    hyper = [lr, lr_decay, eps, weight_decay, float(bool(maximize)), float(lr_round)]
    assert len(hyper) == _AG_NHYPER.value
    launch(_adagrad_kernel, batch, hyper, grad_scale, found_inf, kahan_sum, stochastic_round,
           state_round=state_round,
           steps_kernel=_adagrad_steps_kernel, width=1,
           host_steps=lambda table: adagrad_host_steps(table, lr=lr, lr_decay=lr_decay,
                                                       lr_round=lr_round))
