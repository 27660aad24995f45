"""ASGD for the Triton backend: its kernels and launcher.

The launcher's body is shared (``_launch.launch``), and so are the update
kernel's prologue, loads and stores and the step counters' and scalar
states' reads and writes (``_kernels``). Element math matches
``kernels/numba/asgd.py`` operation for operation; the average reads the
param as stored (re-read after a Kahan or stochastically rounded store),
and is skipped for a copy where torch's ``mu.item() != 1`` fails. Each
row's step, ``eta`` and ``mu`` (its per-row scalar states, columns STATE2
and STATE1, float64 where ``FLAG_SCALAR_F64``) and scalars are advanced
and computed once per step: by ``_asgd_steps_kernel`` on the device, or by
the host for counters in host memory (``steps.asgd_host_steps``).
"""

import triton
import triton.language as tl

from .. import columns as L
from ..steps import ETA_AS_F32, asgd_host_steps
from ._kernels import (_grad, _load, _load_scalar, _program, _read_steps, _rounded,
                       _scalar_state, _store_param, _store_scalar, _store_state,
                       _write_steps, slots)
from ._launch import launch

__all__ = ["asgd"]

# slots of the float64 hyperparameter buffer; MAXIMIZE, CAPTURABLE and MU_F32 hold 1.0
# or 0.0, ETA_ROUND steps.ETA_F64 ...
(_AS_LR, _AS_LAMBD, _AS_ALPHA, _AS_T0, _AS_WD, _AS_MAXIMIZE, _AS_CAPTURABLE, _AS_ETA_ROUND,
 _AS_MU_F32, _AS_NHYPER) = slots(10)

_MU = tl.constexpr(L.STATE1)
_ETA = tl.constexpr(L.STATE2)


@triton.jit
def _asgd_block(p_ptr, g_ptr, ax_ptr, c_ptr, offs, mask, neg_eta, decay, mu, average,
                weight_decay, inv_scale, maximize, has_wd, k0, k1, start,
                ELEM: tl.constexpr, IS_BF16: tl.constexpr, COMPUTE: tl.constexpr,
                HAS_GRAD_SCALE: tl.constexpr, KAHAN: tl.constexpr, SR: tl.constexpr,
                S_ELEM: tl.constexpr, S_IS_BF16: tl.constexpr, SSR: tl.constexpr):
    """The ASGD update of one block (``mask`` None: a whole block)."""
    g, p = _grad(g_ptr, p_ptr, offs, mask, inv_scale, maximize, has_wd, weight_decay,
                 IS_BF16, COMPUTE, HAS_GRAD_SCALE)
    # param.mul_(1 - lambd * eta); param.add_(grad, alpha=-eta)
    new = tl.fma(g, neg_eta, p * decay)
    _store_param(p_ptr, c_ptr, offs, p, new, mask, k0, k1, start, IS_BF16, ELEM, KAHAN, SR)
    if KAHAN or SR:
        new = _load(p_ptr, offs, mask, IS_BF16, COMPUTE)  # the param as stored
    else:
        new = _rounded(new, IS_BF16, ELEM)
    if average:  # ax.add_(param.sub(ax).mul_(mu))
        ax = _load(ax_ptr, offs, mask, S_IS_BF16, COMPUTE)
        ax = ax + (new - ax) * mu
    else:  # ax.copy_(param)
        ax = new
    _store_state(ax_ptr, offs, ax, mask, k0, k1, start, 0, S_IS_BF16, S_ELEM, SSR)


@triton.jit
def _asgd_kernel(
    table_ptr, map_ptr, hyper_ptr, scal_ptr, grad_scale_ptr, found_inf_ptr,
    ELEM: tl.constexpr, IS_BF16: tl.constexpr, COMPUTE: tl.constexpr,
    IS_F64: tl.constexpr, BLOCK: tl.constexpr, ALIGNED: tl.constexpr,
    TAIL_ALIGNED: tl.constexpr, VEC: tl.constexpr,
    HAS_GRAD_SCALE: tl.constexpr, HAS_FOUND_INF: tl.constexpr,
    counter_ptr=None, KAHAN: tl.constexpr = False, SR: tl.constexpr = False,
    S_ELEM: tl.constexpr = None, S_IS_BF16: tl.constexpr = False, SSR: tl.constexpr = False,
):
    """ASGD on one ``BLOCK`` chunk of one row (torch semantics, in place).

    Args as ``_adam_kernel``'s (kernels/triton/adam.py); ``scal_ptr`` is
    float64 ``[rows, 3]``: each row's ``-eta``, ``1 - lambd * eta`` and
    ``mu`` for this step. STATE0 is ax (STATE1 and STATE2, the scalars mu
    and eta, are the step kernel's).
    """
    (row, offs, bound, whole, inv_scale, p_ptr, g_ptr, ax_ptr, _s1, _s2, c_ptr, k0, k1,
     start) = _program(table_ptr, map_ptr, hyper_ptr, grad_scale_ptr, found_inf_ptr,
                       counter_ptr, ELEM, COMPUTE, BLOCK, ALIGNED, TAIL_ALIGNED, VEC, 1,
                       _AS_NHYPER, HAS_GRAD_SCALE, HAS_FOUND_INF, KAHAN, SR, S_ELEM, SSR)
    neg_eta = tl.load(scal_ptr + 3 * row).to(COMPUTE)
    decay = tl.load(scal_ptr + 3 * row + 1).to(COMPUTE)
    mu = tl.load(scal_ptr + 3 * row + 2).to(COMPUTE)
    weight_decay = tl.load(hyper_ptr + _AS_WD).to(COMPUTE)
    maximize = tl.load(hyper_ptr + _AS_MAXIMIZE) != 0.0
    has_wd = tl.load(hyper_ptr + _AS_WD) != 0.0  # float64, as the launcher's test was
    average = (tl.load(hyper_ptr + _AS_CAPTURABLE) != 0.0) | (mu != 1.0)

    if whole:
        _asgd_block(p_ptr, g_ptr, ax_ptr, c_ptr, offs, None, neg_eta, decay, mu, average,
                    weight_decay, inv_scale, maximize, has_wd, k0, k1, start, ELEM, IS_BF16,
                    COMPUTE, HAS_GRAD_SCALE, KAHAN, SR, S_ELEM, S_IS_BF16, SSR)
    else:
        _asgd_block(p_ptr, g_ptr, ax_ptr, c_ptr, offs, offs < bound, neg_eta, decay, mu,
                    average, weight_decay, inv_scale, maximize, has_wd, k0, k1, start, ELEM,
                    IS_BF16, COMPUTE, HAS_GRAD_SCALE, KAHAN, SR, S_ELEM, S_IS_BF16, SSR)


@triton.jit
def _asgd_steps_kernel(table_ptr, hyper_ptr, scal_ptr, found_inf_ptr, rows,
                       BLOCK_R: tl.constexpr, HAS_FOUND_INF: tl.constexpr):
    """Advance device-side step counters, etas and mus; each row's scalars.

    One lane per row, launched before ``_asgd_kernel`` on the same stream;
    float64 math as ``steps.asgd_scalars`` (the power as ``exp2`` of
    ``alpha * log2``). A skipped step (found_inf nonzero) writes neither
    counters nor scalars.
    """
    r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    live = r < rows
    step, s64_ptr, s32_ptr, s64, s32, is64, is32 = _read_steps(table_ptr, r, rows)
    lr = tl.load(hyper_ptr + _AS_LR)
    lambd = tl.load(hyper_ptr + _AS_LAMBD)
    e64, e32, em64, em32 = _scalar_state(table_ptr, r, rows, _ETA)
    u64, u32, um64, um32 = _scalar_state(table_ptr, r, rows, _MU)
    eta = _load_scalar(e64, e32, em64, em32)
    tl.store(scal_ptr + 3 * r, -eta, mask=live)
    tl.store(scal_ptr + 3 * r + 1, 1.0 - lambd * eta, mask=live)
    tl.store(scal_ptr + 3 * r + 2, _load_scalar(u64, u32, um64, um32), mask=live)
    alpha = tl.load(hyper_ptr + _AS_ALPHA)
    eta_round = tl.load(hyper_ptr + _AS_ETA_ROUND)
    # (powers as exp2(alpha * log2): the interpreter has no libdevice pow)
    if eta_round == 2.0:  # float32 tensor arithmetic (steps.asgd_scalars)
        lr32 = lr.to(tl.float32)
        base = (lr32 * lambd.to(tl.float32)) * step.to(tl.float32) + 1.0
        pw = tl.exp2(alpha * tl.log2(base.to(tl.float64))).to(tl.float32)
        new_eta = tl.div_rn(lr32, pw).to(tl.float64)
    else:
        new_eta = lr / tl.exp2(alpha * tl.log2(1.0 + lambd * lr * step))
        if eta_round == 1.0:  # torch.as_tensor's default dtype, float32
            new_eta = new_eta.to(tl.float32).to(tl.float64)
    d = step - tl.load(hyper_ptr + _AS_T0)
    new_mu = tl.where(d > 1.0, 1.0 / d, 1.0)
    if tl.load(hyper_ptr + _AS_MU_F32) != 0.0:
        new_mu = new_mu.to(tl.float32).to(tl.float64)
    limit = rows
    if HAS_FOUND_INF:
        limit = tl.where(tl.load(found_inf_ptr) == 0, rows, 0)
    advance = r < limit
    _store_scalar(e64, e32, em64, em32, new_eta, advance)
    _store_scalar(u64, u32, um64, um32, new_mu, advance)
    _write_steps(r, rows, s64_ptr, s32_ptr, s64, s32, is64, is32, found_inf_ptr,
                 HAS_FOUND_INF)


def asgd(batch, *, lr, lambd, alpha, t0, weight_decay, maximize, capturable=False,
         eta_round=ETA_AS_F32, mu_f32=True, grad_scale=None, found_inf=None, kahan_sum=False,
         stochastic_round=None, state_round=None):
    """ASGD (torch semantics) over every row; advances steps, etas and mus.

    As the Adam launcher: device-side steps are advanced by a first kernel
    (no host sync); host-side steps (and their etas and mus, placed alike)
    by the host, which must then read ``found_inf`` first (one sync).
    """
    hyper = [lr, lambd, alpha, t0, weight_decay, float(bool(maximize)),
             float(bool(capturable)), float(eta_round), float(bool(mu_f32))]
    assert len(hyper) == _AS_NHYPER.value
    launch(_asgd_kernel, batch, hyper, grad_scale, found_inf, kahan_sum, stochastic_round,
           state_round=state_round, steps_kernel=_asgd_steps_kernel, width=3,
           host_steps=lambda table: asgd_host_steps(
               table, lr=lr, lambd=lambd, alpha=alpha, t0=t0, eta_round=eta_round,
               mu_f32=mu_f32, mu_col=L.STATE1, eta_col=L.STATE2))
