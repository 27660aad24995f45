"""Triton multi-tensor kernels: one launch updates every row of an address table.

Each program handles one ``BLOCK``-element chunk of one tensor. The launcher
passes a block map (``int32 [programs, 2]``: row, chunk index within the row)
so a program finds its row with two loads instead of a search, and turns the
row's raw addresses into typed pointers with ``int64.to(tl.pointer_type(T))``
(an ``inttoptr`` when compiled; a reinterpretation of the integer under
``TRITON_INTERPRET=1``). Offsets are int64 (``chunk * BLOCK`` overflows int32
in rows of more than 2**31 elements). A row's whole blocks run unmasked, so
that accesses vectorize (``ld.global.v4`` in the PTX when the launcher can
promise 16-byte aligned addresses); its last block is masked by ``NUMEL``.

Element math matches ``kernels/numba/_kernels.py`` operation for operation:
float32 math (float64 for float64 tensors), one rounding per stored value,
explicit ``tl.fma`` exactly where torch's CPU kernels fuse (``add(alpha=)``,
``lerp``, ``addcmul``), and the launcher turns off any other contraction. Float32 division and square root
are the IEEE ``div_rn`` / ``sqrt_rn``: Triton's ``/`` compiles to
``div.full.f32`` (2 ulp) and ``tl.sqrt`` is approximate for float32 on NVIDIA.
(``tl.fdiv(..., ieee_rounding=True)`` would cover both widths but fails to
compile for float64 in triton 3.9.)

bfloat16 goes through ``uint16`` pointers and is converted by bit
manipulation: the interpreter's float32 -> bfloat16 cast truncates instead of
rounding to nearest even, so the explicit conversion is the one that gives
the same bits compiled, interpreted and in the Numba backend.

Hyperparameters arrive in a float64 buffer (``hyper_ptr``) rather than as
scalar arguments: Triton types a Python float argument as float32, which
would round them before float64 math.

Nested ``@triton.jit`` helpers are kept few: compiled they are inlined and
free, but under the interpreter each call re-patches ``triton.language``,
about 1 ms per call in triton 3.9; with a helper per pointer and per
division they took half of an interpreted Adam program's 40 ms.
"""

import triton
import triton.language as tl

from .. import layout as L

_NCOLS = tl.constexpr(L.NCOLS)
_PARAM = tl.constexpr(L.PARAM)
_GRAD = tl.constexpr(L.GRAD)
_STATE0 = tl.constexpr(L.STATE0)
_STATE1 = tl.constexpr(L.STATE1)
_STATE2 = tl.constexpr(L.STATE2)
_STEP = tl.constexpr(L.STEP)
_NUMEL = tl.constexpr(L.NUMEL)
_FLAGS = tl.constexpr(L.FLAGS)
_FLAG_FRESH = tl.constexpr(L.FLAG_FRESH)
_FLAG_STEP_F64 = tl.constexpr(L.FLAG_STEP_F64)

# Slots of the float64 hyperparameter buffer; the launchers write them in this
# order.
SGD_LR, SGD_WD, SGD_MOMENTUM, SGD_OMD, SGD_NHYPER = range(5)
(ADAM_LR, ADAM_BETA1, ADAM_BETA2, ADAM_OMB1, ADAM_OMB2, ADAM_EPS, ADAM_WD,
 ADAM_DECAY, ADAM_LOG2_BETA1, ADAM_LOG2_BETA2, ADAM_BETA1_NEG, ADAM_BETA2_NEG,
 ADAM_NHYPER) = range(13)

_SGD_LR = tl.constexpr(SGD_LR)
_SGD_WD = tl.constexpr(SGD_WD)
_SGD_MOMENTUM = tl.constexpr(SGD_MOMENTUM)
_SGD_OMD = tl.constexpr(SGD_OMD)
_ADAM_LR = tl.constexpr(ADAM_LR)
_ADAM_BETA1 = tl.constexpr(ADAM_BETA1)
_ADAM_BETA2 = tl.constexpr(ADAM_BETA2)
_ADAM_OMB1 = tl.constexpr(ADAM_OMB1)
_ADAM_OMB2 = tl.constexpr(ADAM_OMB2)
_ADAM_EPS = tl.constexpr(ADAM_EPS)
_ADAM_WD = tl.constexpr(ADAM_WD)
_ADAM_DECAY = tl.constexpr(ADAM_DECAY)
_ADAM_LOG2_BETA1 = tl.constexpr(ADAM_LOG2_BETA1)
_ADAM_LOG2_BETA2 = tl.constexpr(ADAM_LOG2_BETA2)
_ADAM_BETA1_NEG = tl.constexpr(ADAM_BETA1_NEG)
_ADAM_BETA2_NEG = tl.constexpr(ADAM_BETA2_NEG)
_ADAM_NHYPER = tl.constexpr(ADAM_NHYPER)


@triton.jit
def _load(ptr, offs, mask, IS_BF16: tl.constexpr, COMPUTE: tl.constexpr):
    """Load a block (``mask`` None: unmasked) and widen it to the compute type."""
    x = tl.load(ptr + offs, mask=mask)
    if IS_BF16:
        # bfloat16 bits are the high half of the float32 bits: exact
        return (x.to(tl.uint32) << 16).to(tl.float32, bitcast=True)
    else:
        return x.to(COMPUTE)


@triton.jit
def _store(ptr, offs, x, mask, IS_BF16: tl.constexpr, ELEM: tl.constexpr):
    """Round a compute-type block once to the storage type and store it."""
    if IS_BF16:
        u = x.to(tl.uint32, bitcast=True)
        # round to nearest even; a NaN becomes the quiet NaN 0x7FC0 so that
        # rounding cannot carry its payload into the exponent (-> inf)
        r = (u + 0x7FFF + ((u >> 16) & 1)) >> 16
        y = tl.where((u & 0x7FFFFFFF) > 0x7F800000, 0x7FC0, r).to(tl.uint16)
    else:
        y = x.to(ELEM)
    tl.store(ptr + offs, y, mask=mask)


@triton.jit
def _sgd_block(p_ptr, g_ptr, b_ptr, offs, mask, lr, weight_decay, momentum, omd,
               inv_scale, not_fresh, ELEM: tl.constexpr, IS_BF16: tl.constexpr,
               COMPUTE: tl.constexpr, USE_MOMENTUM: tl.constexpr,
               NESTEROV: tl.constexpr, MAXIMIZE: tl.constexpr,
               HAS_WD: tl.constexpr, HAS_GRAD_SCALE: tl.constexpr):
    """The SGD update of one block (``mask`` None: a whole block); see ``_sgd_kernel``."""
    g = _load(g_ptr, offs, mask, IS_BF16, COMPUTE)
    if HAS_GRAD_SCALE:
        g = g * inv_scale
    if MAXIMIZE:
        g = -g
    p = _load(p_ptr, offs, mask, IS_BF16, COMPUTE)
    if HAS_WD:
        g = tl.fma(p, weight_decay, g)
    if USE_MOMENTUM:
        if not_fresh:
            b = tl.fma(g, omd, _load(b_ptr, offs, mask, IS_BF16, COMPUTE) * momentum)
        else:
            # torch: the first buffer is the gradient itself, undampened; the
            # fresh buffer is uninitialised memory and is not even read
            b = g
        _store(b_ptr, offs, b, mask, IS_BF16, ELEM)
        if NESTEROV:
            g = tl.fma(b, momentum, g)
        else:
            g = b
    _store(p_ptr, offs, tl.fma(g, -lr, p), mask, IS_BF16, ELEM)


@triton.jit
def _sgd_kernel(
    table_ptr, map_ptr, hyper_ptr, grad_scale_ptr, found_inf_ptr,
    ELEM: tl.constexpr, IS_BF16: tl.constexpr, COMPUTE: tl.constexpr,
    IS_F64: tl.constexpr, BLOCK: tl.constexpr, ALIGNED: tl.constexpr,
    TAIL_ALIGNED: tl.constexpr, VEC: tl.constexpr, USE_MOMENTUM: tl.constexpr, NESTEROV: tl.constexpr, MAXIMIZE: tl.constexpr,
    HAS_WD: tl.constexpr, HAS_GRAD_SCALE: tl.constexpr,
    HAS_FOUND_INF: tl.constexpr,
):
    """SGD on one ``BLOCK`` chunk of one row (torch semantics, in place).

    Args:
        table_ptr: int64 address table, ``[rows, NCOLS]`` (see ``layout``).
        map_ptr: int32 ``[programs, 2]`` block map: (row, chunk index).
        hyper_ptr: float64 ``[SGD_NHYPER]``: lr, weight decay, momentum,
            1 - dampening.
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
        NESTEROV, MAXIMIZE: the torch flags.
        HAS_WD: weight decay != 0; a constexpr so that a zero decay never
            multiplies an infinite param into a NaN.
        HAS_GRAD_SCALE, HAS_FOUND_INF: the AMP tensors are given.
    """
    pid = tl.program_id(0).to(tl.int64)
    row = tl.load(map_ptr + 2 * pid).to(tl.int64)
    chunk = tl.load(map_ptr + 2 * pid + 1).to(tl.int64)
    row_base = table_ptr + row * _NCOLS
    # Scalar conditions enter the mask through this bound, never as
    # `mask & cond`: the triton 3.9 interpreter widens a broadcast int1
    # scalar to int64 and then rejects the mask.
    bound = tl.load(row_base + _NUMEL)
    if HAS_FOUND_INF:
        # a skipped step masks every lane: no memory traffic at all
        bound = tl.where(tl.load(found_inf_ptr) == 0, bound, 0)
    if TAIL_ALIGNED:
        bound = tl.multiple_of(bound, VEC)  # the launcher checked NUMEL; 0 is too
    offs = chunk * BLOCK + tl.arange(0, BLOCK).to(tl.int64)

    lr = tl.load(hyper_ptr + _SGD_LR).to(COMPUTE)
    weight_decay = tl.load(hyper_ptr + _SGD_WD).to(COMPUTE)
    momentum = tl.load(hyper_ptr + _SGD_MOMENTUM).to(COMPUTE)
    omd = tl.load(hyper_ptr + _SGD_OMD).to(COMPUTE)
    inv_scale = 1.0
    if HAS_GRAD_SCALE:
        # 1/scale rounded once to float32, whatever the compute type
        inv_scale = tl.div_rn(tl.full((), 1.0, tl.float32),
                              tl.load(grad_scale_ptr).to(tl.float32)).to(COMPUTE)
    PTR: tl.constexpr = tl.pointer_type(ELEM)
    p_ptr = tl.load(row_base + _PARAM).to(PTR)
    g_ptr = tl.load(row_base + _GRAD).to(PTR)
    b_ptr = tl.load(row_base + _STATE0).to(PTR)  # 0 without momentum: unused
    if ALIGNED:
        p_ptr = tl.multiple_of(p_ptr, 16)
        g_ptr = tl.multiple_of(g_ptr, 16)
        b_ptr = tl.multiple_of(b_ptr, 16)
    not_fresh = (tl.load(row_base + _FLAGS) & _FLAG_FRESH) == 0

    if (chunk + 1) * BLOCK <= bound:
        _sgd_block(p_ptr, g_ptr, b_ptr, offs, None, lr, weight_decay, momentum,
                   omd, inv_scale, not_fresh, ELEM, IS_BF16, COMPUTE,
                   USE_MOMENTUM, NESTEROV, MAXIMIZE, HAS_WD, HAS_GRAD_SCALE)
    else:
        _sgd_block(p_ptr, g_ptr, b_ptr, offs, offs < bound, lr, weight_decay,
                   momentum, omd, inv_scale, not_fresh, ELEM, IS_BF16, COMPUTE,
                   USE_MOMENTUM, NESTEROV, MAXIMIZE, HAS_WD, HAS_GRAD_SCALE)


@triton.jit
def _adam_block(p_ptr, g_ptr, m_ptr, v_ptr, vmax_ptr, offs, mask, step_size,
                bc2_sqrt, beta1, beta2, omb1, omb2, eps, weight_decay, decay,
                inv_scale, ELEM: tl.constexpr, IS_BF16: tl.constexpr,
                COMPUTE: tl.constexpr, IS_F64: tl.constexpr,
                AMSGRAD: tl.constexpr, MAXIMIZE: tl.constexpr,
                HAS_WD: tl.constexpr, DECOUPLED: tl.constexpr,
                LERP_FROM_START: tl.constexpr, HAS_GRAD_SCALE: tl.constexpr):
    """The Adam update of one block (``mask`` None: a whole block); see ``_adam_kernel``."""
    g = _load(g_ptr, offs, mask, IS_BF16, COMPUTE)
    if HAS_GRAD_SCALE:
        g = g * inv_scale
    if MAXIMIZE:
        g = -g
    p = _load(p_ptr, offs, mask, IS_BF16, COMPUTE)
    if HAS_WD:
        if DECOUPLED:
            p = p * decay
        else:
            g = tl.fma(p, weight_decay, g)
    m = _load(m_ptr, offs, mask, IS_BF16, COMPUTE)
    # torch.lerp's two-sided formula, as its CPU kernel evaluates it
    if LERP_FROM_START:
        m = tl.fma(omb1, g - m, m)
    else:
        m = tl.fma(omb1 - 1.0, g - m, g)
    v = tl.fma(omb2 * g, g, _load(v_ptr, offs, mask, IS_BF16, COMPUTE) * beta2)
    _store(m_ptr, offs, m, mask, IS_BF16, ELEM)
    _store(v_ptr, offs, v, mask, IS_BF16, ELEM)
    if AMSGRAD:
        vmax = _load(vmax_ptr, offs, mask, IS_BF16, COMPUTE)
        v = tl.maximum(vmax, v, propagate_nan=tl.PropagateNan.ALL)
        _store(vmax_ptr, offs, v, mask, IS_BF16, ELEM)
    # torch's addcdiv: param + (value * exp_avg) / denom
    if IS_F64:
        denom = tl.sqrt(v) / bc2_sqrt + eps  # sqrt.rn.f64, div.rn.f64 already
        update = (-step_size * m) / denom
    else:
        denom = tl.div_rn(tl.sqrt_rn(v), bc2_sqrt) + eps
        update = tl.div_rn(-step_size * m, denom)
    _store(p_ptr, offs, p + update, mask, IS_BF16, ELEM)


@triton.jit
def _adam_kernel(
    table_ptr, map_ptr, hyper_ptr, scal_ptr, grad_scale_ptr, found_inf_ptr,
    ELEM: tl.constexpr, IS_BF16: tl.constexpr, COMPUTE: tl.constexpr,
    IS_F64: tl.constexpr, BLOCK: tl.constexpr, ALIGNED: tl.constexpr,
    TAIL_ALIGNED: tl.constexpr, VEC: tl.constexpr,
    AMSGRAD: tl.constexpr, MAXIMIZE: tl.constexpr, HAS_WD: tl.constexpr,
    DECOUPLED: tl.constexpr, LERP_FROM_START: tl.constexpr,
    HAS_GRAD_SCALE: tl.constexpr, HAS_FOUND_INF: tl.constexpr,
):
    """Adam / AdamW on one ``BLOCK`` chunk of one row (torch semantics).

    The step counters are not touched here: row r's (step size, sqrt of the
    second bias correction) wait at ``scal_ptr[2*r]``, computed once per row
    for this step, by ``_adam_steps_kernel`` on the device (which also
    advances the counters) or by the host.

    Args:
        table_ptr: int64 address table, ``[rows, NCOLS]``.
        map_ptr: int32 ``[programs, 2]`` block map: (row, chunk index).
        hyper_ptr: float64 hyperparameters (``ADAM_*`` slots).
        scal_ptr: float64 ``[rows, 2]`` per-row scalars (see above).
        grad_scale_ptr: AMP scale, as in ``_sgd_kernel``.
        found_inf_ptr: AMP flag; nonzero masks every load and store.
        ELEM, IS_BF16, COMPUTE, IS_F64, BLOCK, ALIGNED, TAIL_ALIGNED, VEC: as
            in ``_sgd_kernel``.
        AMSGRAD, MAXIMIZE: the torch flags.
        HAS_WD: weight decay != 0.
        DECOUPLED: AdamW's decay of the weights instead of the gradient.
        LERP_FROM_START: 1 - beta1 < 0.5, the side of torch.lerp's two-sided
            formula that keeps torch's rounding.
        HAS_GRAD_SCALE, HAS_FOUND_INF: the AMP tensors are given.
    """
    pid = tl.program_id(0).to(tl.int64)
    row = tl.load(map_ptr + 2 * pid).to(tl.int64)
    chunk = tl.load(map_ptr + 2 * pid + 1).to(tl.int64)
    row_base = table_ptr + row * _NCOLS
    bound = tl.load(row_base + _NUMEL)  # scalar conditions: see _sgd_kernel
    if HAS_FOUND_INF:
        bound = tl.where(tl.load(found_inf_ptr) == 0, bound, 0)
    if TAIL_ALIGNED:
        bound = tl.multiple_of(bound, VEC)
    offs = chunk * BLOCK + tl.arange(0, BLOCK).to(tl.int64)

    step_size = tl.load(scal_ptr + 2 * row).to(COMPUTE)
    bc2_sqrt = tl.load(scal_ptr + 2 * row + 1).to(COMPUTE)
    beta1 = tl.load(hyper_ptr + _ADAM_BETA1).to(COMPUTE)
    beta2 = tl.load(hyper_ptr + _ADAM_BETA2).to(COMPUTE)
    omb1 = tl.load(hyper_ptr + _ADAM_OMB1).to(COMPUTE)
    omb2 = tl.load(hyper_ptr + _ADAM_OMB2).to(COMPUTE)
    eps = tl.load(hyper_ptr + _ADAM_EPS).to(COMPUTE)
    weight_decay = tl.load(hyper_ptr + _ADAM_WD).to(COMPUTE)
    decay = tl.load(hyper_ptr + _ADAM_DECAY).to(COMPUTE)
    inv_scale = 1.0
    if HAS_GRAD_SCALE:
        inv_scale = tl.div_rn(tl.full((), 1.0, tl.float32),
                              tl.load(grad_scale_ptr).to(tl.float32)).to(COMPUTE)

    PTR: tl.constexpr = tl.pointer_type(ELEM)
    p_ptr = tl.load(row_base + _PARAM).to(PTR)
    g_ptr = tl.load(row_base + _GRAD).to(PTR)
    m_ptr = tl.load(row_base + _STATE0).to(PTR)
    v_ptr = tl.load(row_base + _STATE1).to(PTR)
    vmax_ptr = tl.load(row_base + _STATE2).to(PTR)  # 0 without amsgrad: unused
    if ALIGNED:
        p_ptr = tl.multiple_of(p_ptr, 16)
        g_ptr = tl.multiple_of(g_ptr, 16)
        m_ptr = tl.multiple_of(m_ptr, 16)
        v_ptr = tl.multiple_of(v_ptr, 16)
        vmax_ptr = tl.multiple_of(vmax_ptr, 16)

    if (chunk + 1) * BLOCK <= bound:
        _adam_block(p_ptr, g_ptr, m_ptr, v_ptr, vmax_ptr, offs, None, step_size,
                    bc2_sqrt, beta1, beta2, omb1, omb2, eps, weight_decay, decay,
                    inv_scale, ELEM, IS_BF16, COMPUTE, IS_F64, AMSGRAD, MAXIMIZE,
                    HAS_WD, DECOUPLED, LERP_FROM_START, HAS_GRAD_SCALE)
    else:
        _adam_block(p_ptr, g_ptr, m_ptr, v_ptr, vmax_ptr, offs, offs < bound,
                    step_size, bc2_sqrt, beta1, beta2, omb1, omb2, eps,
                    weight_decay, decay, inv_scale, ELEM, IS_BF16, COMPUTE, IS_F64,
                    AMSGRAD, MAXIMIZE, HAS_WD, DECOUPLED, LERP_FROM_START,
                    HAS_GRAD_SCALE)


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
        hyper_ptr: float64 hyperparameters (``ADAM_*`` slots).
        scal_ptr: float64 ``[rows, 2]`` out: step size, sqrt(bias correction 2).
        found_inf_ptr: AMP flag (if HAS_FOUND_INF): nonzero leaves every
            counter as it is (the scalars are still written, and unused).
        rows: rows in the table.
        BLOCK_R: rows per program.
    """
    r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    live = r < rows
    base = table_ptr + r.to(tl.int64) * _NCOLS
    flags = tl.load(base + _FLAGS, mask=live, other=0)
    step_addr = tl.load(base + _STEP, mask=live, other=0)
    is64 = live & ((flags & _FLAG_STEP_F64) != 0)
    is32 = live & ((flags & _FLAG_STEP_F64) == 0)
    s64_ptr = step_addr.to(tl.pointer_type(tl.float64))
    s32_ptr = step_addr.to(tl.pointer_type(tl.float32))
    s64 = tl.load(s64_ptr, mask=is64, other=0.0) + 1.0
    s32 = tl.load(s32_ptr, mask=is32, other=0.0) + 1.0  # float32 add, as torch
    step = tl.where(is64, s64, s32.to(tl.float64))
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
    # (see _sgd_kernel on the interpreter and scalar masks)
    limit = rows
    if HAS_FOUND_INF:
        limit = tl.where(tl.load(found_inf_ptr) == 0, rows, 0)
    advance = r < limit
    tl.store(s64_ptr, s64, mask=advance & is64)
    tl.store(s32_ptr, s32, mask=advance & is32)
