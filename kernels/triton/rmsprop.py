"""RMSprop for the Triton backend: its kernels and launcher.

The launcher's body is shared (``_launch.launch``), and so are the update
kernel's prologue, loads and stores and the step counters' reads and writes
(``_kernels``). The update kernel is built as ``adam._adam_kernel`` (same
block map, raw-address pointers, unmasked whole blocks, float64
hyperparameter buffer, explicit ``tl.fma`` exactly where torch's CPU kernels
fuse and no other contraction, IEEE ``div_rn``/``sqrt_rn`` for float32).

RMSprop's step counter is only counted, never read by the math: device-side
counters are advanced by a small kernel of one lane per row
(:func:`._kernels.count_steps_kernel`, skipped under ``found_inf`` without a host
sync); host-side ones (torch's default CPU steps for CUDA params) by the host
(``steps.advance_host_steps``).
"""

from __future__ import annotations

import triton
import triton.language as tl

from ..steps import advance_host_steps
from ._kernels import (_grad, _load, _program, _store_param, _store_state,
                       count_steps_kernel, slots)
from ._launch import launch

__all__ = ["rmsprop"]

# Slots of the float64 hyperparameter buffer; the launcher writes them in this
# order. MAXIMIZE holds 1.0 or 0.0: a runtime switch, so that it adds no
# compiled specialization.
(_LR, _ALPHA, _OMA, _EPS, _WD, _MOMENTUM, _MAXIMIZE, _NHYPER) = slots(8)


@triton.jit
def _rmsprop_block(p_ptr, g_ptr, sq_ptr, buf_ptr, ga_ptr, c_ptr, offs, mask, lr, alpha,
                   oma, eps, weight_decay, momentum, inv_scale, maximize, has_wd,
                   lerp_from_start, k0, k1, start, ELEM: tl.constexpr,
                   IS_BF16: tl.constexpr, COMPUTE: tl.constexpr, IS_F64: tl.constexpr,
                   CENTERED: tl.constexpr, USE_MOMENTUM: tl.constexpr,
                   HAS_GRAD_SCALE: tl.constexpr, KAHAN: tl.constexpr, SR: tl.constexpr,
                   S_ELEM: tl.constexpr, S_IS_BF16: tl.constexpr, SSR: tl.constexpr):
    """The RMSprop update of one block (``mask`` None: a whole block)."""
    g, p = _grad(g_ptr, p_ptr, offs, mask, inv_scale, maximize, has_wd, weight_decay,
                 IS_BF16, COMPUTE, HAS_GRAD_SCALE)
    old = p  # the stored param, for the Kahan store
    # square_avg.mul_(alpha).addcmul_(grad, grad, value=1 - alpha)
    sq = tl.fma(oma * g, g, _load(sq_ptr, offs, mask, S_IS_BF16, COMPUTE) * alpha)
    _store_state(sq_ptr, offs, sq, mask, k0, k1, start, 0, S_IS_BF16, S_ELEM, SSR)
    if CENTERED:
        ga = _load(ga_ptr, offs, mask, S_IS_BF16, COMPUTE)
        # grad_avg.lerp_(grad, 1 - alpha): torch.lerp's two-sided formula
        ga = tl.where(lerp_from_start, tl.fma(oma, g - ga, ga), tl.fma(oma - 1.0, g - ga, g))
        _store_state(ga_ptr, offs, ga, mask, k0, k1, start, 2, S_IS_BF16, S_ELEM, SSR)
        sq = tl.fma(-ga, ga, sq)  # square_avg.addcmul(grad_avg, grad_avg, value=-1)
    if IS_F64:
        avg = tl.sqrt(sq) + eps  # sqrt.rn.f64 already
    else:
        avg = tl.sqrt_rn(sq) + eps
    if USE_MOMENTUM:
        # buf.mul_(momentum).addcdiv_(grad, avg); param.add_(buf, alpha=-lr)
        if IS_F64:
            b = _load(buf_ptr, offs, mask, S_IS_BF16, COMPUTE) * momentum + g / avg
        else:
            b = _load(buf_ptr, offs, mask, S_IS_BF16, COMPUTE) * momentum + tl.div_rn(g, avg)
        _store_state(buf_ptr, offs, b, mask, k0, k1, start, 1, S_IS_BF16, S_ELEM, SSR)
        p = tl.fma(b, -lr, p)
    else:
        # param.addcdiv_(grad, avg, value=-lr): param + (-lr * grad) / avg
        if IS_F64:
            p = p + (-lr * g) / avg
        else:
            p = p + tl.div_rn(-lr * g, avg)
    _store_param(p_ptr, c_ptr, offs, old, p, mask, k0, k1, start, IS_BF16, ELEM, KAHAN, SR)


@triton.jit
def _rmsprop_kernel(
    table_ptr, map_ptr, hyper_ptr, grad_scale_ptr, found_inf_ptr,
    ELEM: tl.constexpr, IS_BF16: tl.constexpr, COMPUTE: tl.constexpr,
    IS_F64: tl.constexpr, BLOCK: tl.constexpr, ALIGNED: tl.constexpr,
    TAIL_ALIGNED: tl.constexpr, VEC: tl.constexpr,
    CENTERED: tl.constexpr, USE_MOMENTUM: tl.constexpr,
    HAS_GRAD_SCALE: tl.constexpr, HAS_FOUND_INF: tl.constexpr,
    counter_ptr=None, KAHAN: tl.constexpr = False, SR: tl.constexpr = False,
    S_ELEM: tl.constexpr = None, S_IS_BF16: tl.constexpr = False, SSR: tl.constexpr = False,
):
    """RMSprop on one ``BLOCK`` chunk of one row (torch semantics, in place).

    Args:
        table_ptr: int64 address table, ``[rows, NCOLS]``: STATE0
            square_avg, STATE1 momentum_buffer (0 without momentum), STATE2
            grad_avg (0 unless centered).
        map_ptr: int32 ``[programs, 2]`` block map: (row, chunk index).
        hyper_ptr: float64 hyperparameters (the slots ``_LR`` ... above), with the
            runtime switches: MAXIMIZE as 1.0 or 0.0; weight decay where
            its float64 value is nonzero; and torch.lerp's side,
            |1 - alpha| < 0.5 in the compute type.
        grad_scale_ptr, found_inf_ptr: AMP, as in ``sgd._sgd_kernel``.
        ELEM, IS_BF16, COMPUTE, IS_F64, BLOCK, ALIGNED, TAIL_ALIGNED, VEC: as
            in ``sgd._sgd_kernel``.
        CENTERED: the torch flag (STATE2 holds grad_avg).
        USE_MOMENTUM: momentum > 0 (STATE1 holds momentum_buffer).
        HAS_GRAD_SCALE, HAS_FOUND_INF: the AMP tensors are given (constexpr,
            as in ``sgd._sgd_kernel``).
        counter_ptr, KAHAN, SR: the param store's options, as in
            ``sgd._sgd_kernel`` (seed and salt after ``_NHYPER``).
    """
    (row, offs, bound, whole, inv_scale, p_ptr, g_ptr, sq_ptr, buf_ptr, ga_ptr, c_ptr, k0,
     k1, start) = _program(table_ptr, map_ptr, hyper_ptr, grad_scale_ptr, found_inf_ptr,
                           counter_ptr, ELEM, COMPUTE, BLOCK, ALIGNED, TAIL_ALIGNED, VEC, 3,
                           _NHYPER, HAS_GRAD_SCALE, HAS_FOUND_INF, KAHAN, SR,
                           S_ELEM, SSR)
    lr = tl.load(hyper_ptr + _LR).to(COMPUTE)
    alpha = tl.load(hyper_ptr + _ALPHA).to(COMPUTE)
    oma = tl.load(hyper_ptr + _OMA).to(COMPUTE)
    eps = tl.load(hyper_ptr + _EPS).to(COMPUTE)
    weight_decay = tl.load(hyper_ptr + _WD).to(COMPUTE)
    momentum = tl.load(hyper_ptr + _MOMENTUM).to(COMPUTE)
    maximize = tl.load(hyper_ptr + _MAXIMIZE) != 0.0
    has_wd = tl.load(hyper_ptr + _WD) != 0.0  # float64, as the launcher's test was
    lerp_from_start = tl.abs(oma) < 0.5  # in COMPUTE, as torch.lerp tests its weight
    # (STATE1, momentum_buffer, has address 0 without momentum; STATE2,
    # grad_avg, unless centered)

    if whole:
        _rmsprop_block(p_ptr, g_ptr, sq_ptr, buf_ptr, ga_ptr, c_ptr, offs, None, lr,
                       alpha, oma, eps, weight_decay, momentum, inv_scale, maximize,
                       has_wd, lerp_from_start, k0, k1, start, ELEM, IS_BF16, COMPUTE,
                       IS_F64, CENTERED, USE_MOMENTUM, HAS_GRAD_SCALE, KAHAN, SR, S_ELEM,
                       S_IS_BF16, SSR)
    else:
        _rmsprop_block(p_ptr, g_ptr, sq_ptr, buf_ptr, ga_ptr, c_ptr, offs, offs < bound,
                       lr, alpha, oma, eps, weight_decay, momentum, inv_scale, maximize,
                       has_wd, lerp_from_start, k0, k1, start, ELEM, IS_BF16, COMPUTE,
                       IS_F64, CENTERED, USE_MOMENTUM, HAS_GRAD_SCALE, KAHAN, SR, S_ELEM,
                       S_IS_BF16, SSR)


def rmsprop(batch, *, lr, alpha, eps, weight_decay, momentum, centered, maximize,
            grad_scale=None, found_inf=None, kahan_sum=False, stochastic_round=None,
            state_round=None):
    """RMSprop (torch semantics) over every row; advances steps.

    Step counters on the params' device are advanced by a first small
    kernel (no host sync, found_inf included); counters elsewhere (torch's
    default CPU steps for CUDA params) by the host, which then reads
    ``found_inf`` first (one sync; fused_optim's optimizers move such
    counters to the device under GradScaler). Then one update launch per
    alignment class present.

    Args:
        batch: a :class:`~fused_optim.kernels.batch.Batch`; ``batch.steps``
            holds one 0-dim float32/float64 step tensor per row.
        lr, alpha, eps, weight_decay, momentum, centered, maximize: as
            ``torch.optim.RMSprop``; a Tensor ``lr`` (capturable) is read on
            the device.
        grad_scale: optional AMP scale; grads are multiplied by its float32
            reciprocal in the kernel (the grad tensors are left as they are).
        found_inf: optional AMP flag: when nonzero nothing is written, steps
            included.
        kahan_sum, stochastic_round: how bfloat16/float16 params are
            stored, as in :func:`~fused_optim.kernels.triton.sgd`.
    """
    use_momentum = momentum > 0
    hyper = [lr, alpha, 1.0 - alpha, eps, weight_decay, momentum if use_momentum else 0.0,
             float(bool(maximize))]
    assert len(hyper) == _NHYPER.value
    launch(_rmsprop_kernel, batch, hyper, grad_scale, found_inf, kahan_sum, stochastic_round,
           state_round=state_round,
           steps_kernel=count_steps_kernel, host_steps=advance_host_steps,
           CENTERED=bool(centered), USE_MOMENTUM=bool(use_momentum))
