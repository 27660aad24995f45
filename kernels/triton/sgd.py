"""SGD for the Triton backend: its kernel and launcher.

The launcher's body is shared (``_launch.launch``), and so are the update
kernel's prologue and loads and stores (``_kernels``).
"""

import triton
import triton.language as tl

from ._kernels import (_FLAG_ROW, _FLAGS, _grad, _load, _NCOLS, _program, slots, _store_param,
                       _store_state)
from ._launch import launch

__all__ = ["sgd"]

# Slots of the float64 hyperparameter buffer; the launcher writes them in this
# order. NESTEROV and MAXIMIZE hold 1.0 or 0.0: runtime switches, so that
# they add no compiled specialization (see the kernel's docstring).
(_SGD_LR, _SGD_WD, _SGD_MOMENTUM, _SGD_OMD, _SGD_NESTEROV, _SGD_MAXIMIZE,
 _SGD_NHYPER) = slots(7)


@triton.jit
def _sgd_block(p_ptr, g_ptr, b_ptr, c_ptr, offs, mask, lr, weight_decay, momentum, omd,
               inv_scale, not_fresh, nesterov, maximize, has_wd, k0, k1, start,
               ELEM: tl.constexpr, IS_BF16: tl.constexpr, COMPUTE: tl.constexpr,
               USE_MOMENTUM: tl.constexpr, HAS_GRAD_SCALE: tl.constexpr,
               KAHAN: tl.constexpr, SR: tl.constexpr,
               S_ELEM: tl.constexpr, S_IS_BF16: tl.constexpr, SSR: tl.constexpr):
    """The SGD update of one block (``mask`` None: a whole block); see ``_sgd_kernel``."""
    g, p = _grad(g_ptr, p_ptr, offs, mask, inv_scale, maximize, has_wd, weight_decay,
                 IS_BF16, COMPUTE, HAS_GRAD_SCALE)
    if USE_MOMENTUM:
        if not_fresh:
            b = tl.fma(g, omd, _load(b_ptr, offs, mask, S_IS_BF16, COMPUTE) * momentum)
        else:
            # torch: the first buffer is the gradient itself, undampened; the
            # fresh buffer is uninitialised memory and is not even read
            b = g
        _store_state(b_ptr, offs, b, mask, k0, k1, start, 0, S_IS_BF16, S_ELEM, SSR)
        g = tl.where(nesterov, tl.fma(b, momentum, g), b)
    _store_param(p_ptr, c_ptr, offs, p, tl.fma(g, -lr, p), mask, k0, k1, start, IS_BF16,
                 ELEM, KAHAN, SR)


@triton.jit
def _sgd_kernel(
    table_ptr, map_ptr, hyper_ptr, grad_scale_ptr, found_inf_ptr,
    ELEM: tl.constexpr, IS_BF16: tl.constexpr, COMPUTE: tl.constexpr,
    IS_F64: tl.constexpr, BLOCK: tl.constexpr, ALIGNED: tl.constexpr,
    TAIL_ALIGNED: tl.constexpr, VEC: tl.constexpr, USE_MOMENTUM: tl.constexpr,
    HAS_GRAD_SCALE: tl.constexpr, HAS_FOUND_INF: tl.constexpr,
    counter_ptr=None, KAHAN: tl.constexpr = False, SR: tl.constexpr = False,
    S_ELEM: tl.constexpr = None, S_IS_BF16: tl.constexpr = False, SSR: tl.constexpr = False,
):
    """SGD on one ``BLOCK`` chunk of one row (torch semantics, in place).

    Args:
        table_ptr: int64 address table, ``[rows, NCOLS]`` (see ``layout``).
        map_ptr: int32 ``[programs, 2]`` block map: (row, chunk index).
        hyper_ptr: float64 ``[_SGD_NHYPER]``: lr, weight decay, momentum,
            1 - dampening, and the runtime switches NESTEROV (with
            momentum) and MAXIMIZE as 1.0 or 0.0. Weight decay applies
            where its float64 value is nonzero, as the launcher's test was.
        grad_scale_ptr: AMP scale (if HAS_GRAD_SCALE); gradients are
            multiplied by its float32 reciprocal, as GradScaler.unscale_
            and the Numba backend do. The gradient tensors are not modified.
        found_inf_ptr: AMP flag; nonzero masks every load and store (if
            HAS_FOUND_INF).
        ELEM: storage element type of the pointers (uint16 for bfloat16).
        IS_BF16: storage is bfloat16 (bits in uint16).
        COMPUTE: float32, or float64 for float64 storage.
        IS_F64: COMPUTE is float64.
        BLOCK: elements per program.
        ALIGNED: every address of the rows this launch's block map names is
            a multiple of 16 bytes; lets Triton vectorize through pointers it
            did not get as arguments.
        TAIL_ALIGNED: ALIGNED, and every such row's NUMEL is a multiple of
            VEC, so the masked last block vectorizes too (the mask is
            constant over each VEC-element group).
        VEC: elements per 16 bytes of the storage type.
        USE_MOMENTUM: momentum != 0 (STATE0 holds the momentum buffer).
        HAS_GRAD_SCALE, HAS_FOUND_INF: the AMP tensors are given. Kept
            constexpr: Triton specializes a None argument as a constant
            anyway, so runtime flags would save no compile unless the
            launcher passed a dummy device buffer in place of None.
        counter_ptr: the int64 stochastic-rounding step counter (if SR),
            read here; seed and salt wait in the hyperparameter slots after
            ``_SGD_NHYPER``. It and the two switches below default to off,
            as launches written before them pass nothing.
        KAHAN: bfloat16/float16 params are stored with Kahan summation
            through their compensation buffers (the COMP column).
        SR: bfloat16/float16 params are rounded stochastically (see
            ``_kernels._store_param``).
        S_ELEM, S_IS_BF16: the state's storage element type and whether it
            is bfloat16: the param's, unless the ``state_dtype`` option
            stores it in bfloat16 (every kernel takes these three).
        SSR: bfloat16 state stores round stochastically (``state_round``;
            ``_kernels._store_state``).
    """
    (row, offs, bound, whole, inv_scale, p_ptr, g_ptr, b_ptr, _, _, c_ptr, k0, k1,
     start) = _program(table_ptr, map_ptr, hyper_ptr, grad_scale_ptr, found_inf_ptr,
                       counter_ptr, ELEM, COMPUTE, BLOCK, ALIGNED, TAIL_ALIGNED, VEC, 1,
                       _SGD_NHYPER, HAS_GRAD_SCALE, HAS_FOUND_INF, KAHAN, SR,
                       S_ELEM, SSR)
    lr = tl.load(hyper_ptr + _SGD_LR).to(COMPUTE)
    weight_decay = tl.load(hyper_ptr + _SGD_WD).to(COMPUTE)
    momentum = tl.load(hyper_ptr + _SGD_MOMENTUM).to(COMPUTE)
    omd = tl.load(hyper_ptr + _SGD_OMD).to(COMPUTE)
    nesterov = tl.load(hyper_ptr + _SGD_NESTEROV) != 0.0
    maximize = tl.load(hyper_ptr + _SGD_MAXIMIZE) != 0.0
    # float64, as the launcher's `weight_decay != 0`: a decay that rounds to
    # 0 in float32 still takes the fma, as before
    has_wd = tl.load(hyper_ptr + _SGD_WD) != 0.0
    # (STATE0, the momentum buffer, has address 0 without momentum)
    not_fresh = (tl.load(table_ptr + row * _NCOLS + _FLAGS) & _FLAG_ROW) == 0

    if whole:
        _sgd_block(p_ptr, g_ptr, b_ptr, c_ptr, offs, None, lr, weight_decay, momentum,
                   omd, inv_scale, not_fresh, nesterov, maximize, has_wd, k0, k1, start,
                   ELEM, IS_BF16, COMPUTE, USE_MOMENTUM, HAS_GRAD_SCALE, KAHAN, SR, S_ELEM,
                   S_IS_BF16, SSR)
    else:
        _sgd_block(p_ptr, g_ptr, b_ptr, c_ptr, offs, offs < bound, lr, weight_decay,
                   momentum, omd, inv_scale, not_fresh, nesterov, maximize, has_wd, k0,
                   k1, start, ELEM, IS_BF16, COMPUTE, USE_MOMENTUM, HAS_GRAD_SCALE,
                   KAHAN, SR, S_ELEM, S_IS_BF16, SSR)


def sgd(batch, *, lr, weight_decay, momentum, dampening, nesterov, maximize,
        grad_scale=None, found_inf=None, kahan_sum=False, stochastic_round=None,
        state_round=None):
    """SGD (torch semantics) over every row of ``batch.table``.

    One launch per alignment class present (see
    ``_launch.alignment_classes``): usually one.

    Args:
        batch: a :class:`~fused_optim.kernels.batch.Batch` of CUDA tensors
            (CPU tensors under ``TRITON_INTERPRET=1``).
        lr, weight_decay, momentum, dampening, nesterov, maximize: as
            ``torch.optim.SGD``.
        grad_scale: optional 1-element AMP scale on the params' device;
            the kernel multiplies the gradients by its float32 reciprocal
            (GradScaler.unscale_'s rounding, as the Numba backend). The
            gradient tensors themselves are left as they are.
        found_inf: optional 1-element AMP flag on the params' device; when it
            is nonzero nothing is written. Read by the kernel: no host sync.
        kahan_sum, stochastic_round: how bfloat16/float16 params are stored
            (``kernels/reference/_precision.py``); ``stochastic_round`` is
            None or ``(seed, counter, salt)``, ``counter`` a 0-dim int64
            tensor on the params' device, read by the kernel.
    """
    use_momentum = momentum != 0
    hyper = [lr, weight_decay, momentum, 1.0 - dampening,
             float(bool(nesterov) and use_momentum), float(bool(maximize))]
    assert len(hyper) == _SGD_NHYPER.value
    launch(_sgd_kernel, batch, hyper, grad_scale, found_inf, kahan_sum, stochastic_round,
           state_round=state_round,
           USE_MOMENTUM=use_momentum)
