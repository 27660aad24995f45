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

Element math matches the Numba backend's (``kernels/numba/<name>.py``) operation for operation:
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
division they took half of an interpreted Adam program's 40 ms. What every
update kernel does alike is one call each: :func:`_program` (the row, its
pointers, the AMP scale, the precision keys), :func:`_grad` and
:func:`_store_param`. Interpreted, a program took about what it took with
those lines written in each kernel (SGD with momentum 16.1 -> 17.8 ms,
AdamW 26.0 -> 23.9 ms: one step over 16 programs, best of 5, on the 2-core
VM under other load).
"""

import triton
import triton.language as tl

from .. import columns as L

_NCOLS = tl.constexpr(L.NCOLS)
_PARAM = tl.constexpr(L.PARAM)
_GRAD = tl.constexpr(L.GRAD)
_STATE0 = tl.constexpr(L.STATE0)
_STATE1 = tl.constexpr(L.STATE1)
_STATE2 = tl.constexpr(L.STATE2)
_STEP = tl.constexpr(L.STEP)
_NUMEL = tl.constexpr(L.NUMEL)
_FLAGS = tl.constexpr(L.FLAGS)
_FLAG_ROW = tl.constexpr(L.FLAG_ROW)
_FLAG_STEP_F64 = tl.constexpr(L.FLAG_STEP_F64)
_FLAG_SCALAR_F64 = tl.constexpr(L.FLAG_SCALAR_F64)
_START = tl.constexpr(L.START)
_COMP = tl.constexpr(L.COMP)
_SCALE0 = tl.constexpr(L.SCALE0)


def slots(n: int) -> tuple:
    """Constexprs 0 .. n-1: an optimizer's hyperparameter slots, the last one
    their count (its kernels index the float64 buffer with them)."""
    return tuple(tl.constexpr(i) for i in range(n))


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
def _rounded(x, IS_BF16: tl.constexpr, ELEM: tl.constexpr):
    """``x`` rounded to nearest even to the storage type, back in the compute type
    (``_store`` then ``_load``, without the memory)."""
    if IS_BF16:
        u = x.to(tl.uint32, bitcast=True)
        r = ((u + 0x7FFF + ((u >> 16) & 1)) >> 16) << 16
        r = tl.where((u & 0x7FFFFFFF) > 0x7F800000, 0x7FC00000, r)
        return r.to(tl.float32, bitcast=True)
    else:
        return x.to(ELEM).to(x.dtype)


@triton.jit
def _program(table_ptr, map_ptr, hyper_ptr, grad_scale_ptr, found_inf_ptr, counter_ptr,
             ELEM: tl.constexpr, COMPUTE: tl.constexpr, BLOCK: tl.constexpr,
             ALIGNED: tl.constexpr, TAIL_ALIGNED: tl.constexpr, VEC: tl.constexpr,
             STATES: tl.constexpr, NHYPER: tl.constexpr, HAS_GRAD_SCALE: tl.constexpr,
             HAS_FOUND_INF: tl.constexpr, KAHAN: tl.constexpr, SR: tl.constexpr,
             S_ELEM: tl.constexpr, SSR: tl.constexpr):
    """What every update program starts with: where it works, and the row's pointers.

    The program's row and chunk come from the block map; the row's
    addresses, as typed pointers, from the table: param, grad, the first
    ``STATES`` state columns as ``S_ELEM`` pointers (the state's storage
    type: ELEM unless the ``state_dtype`` option stores it otherwise; the
    other columns: the param's pointer, unused) and the Kahan compensation
    (if KAHAN; else the param's, unused). The stream's keys are read where
    the param (SR) or the state (SSR) rounds stochastically.

    Returns:
        (row, offs, bound, whole, inv_scale, p_ptr, g_ptr, s0_ptr, s1_ptr,
        s2_ptr, c_ptr, k0, k1, start): ``offs`` the chunk's int64 element
        offsets; ``bound`` the row's NUMEL, or 0 when GradScaler found
        inf/NaN (a skipped step masks every lane: no memory traffic at
        all); ``whole`` whether the chunk lies below ``bound`` (its block
        then runs unmasked, so that accesses vectorize); ``inv_scale`` the
        float32 reciprocal of the AMP scale in COMPUTE (1.0 without); the
        stochastic-rounding keys and the row's first global element (if
        SR; seed and salt in the hyperparameter slots from ``NHYPER``).
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
        bound = tl.where(tl.load(found_inf_ptr) == 0, bound, 0)
    if TAIL_ALIGNED:
        bound = tl.multiple_of(bound, VEC)  # the launcher checked NUMEL; 0 is too
    offs = chunk * BLOCK + tl.arange(0, BLOCK).to(tl.int64)
    whole = (chunk + 1) * BLOCK <= bound
    inv_scale = 1.0
    if HAS_GRAD_SCALE:
        # 1/scale rounded once to float32, whatever the compute type, as
        # GradScaler.unscale_ and the Numba backend
        inv_scale = tl.div_rn(tl.full((), 1.0, tl.float32),
                              tl.load(grad_scale_ptr).to(tl.float32)).to(COMPUTE)

    PTR: tl.constexpr = tl.pointer_type(ELEM)
    S_PTR: tl.constexpr = tl.pointer_type(S_ELEM)
    p_ptr = tl.load(row_base + _PARAM).to(PTR)
    g_ptr = tl.load(row_base + _GRAD).to(PTR)
    # a state a switch leaves off has address 0: loaded, never accessed
    s0_ptr = tl.load(row_base + _STATE0).to(S_PTR)
    s1_ptr = s0_ptr
    s2_ptr = s0_ptr
    if STATES > 1:
        s1_ptr = tl.load(row_base + _STATE1).to(S_PTR)
    if STATES > 2:
        s2_ptr = tl.load(row_base + _STATE2).to(S_PTR)
    c_ptr = p_ptr
    if KAHAN:
        c_ptr = tl.load(row_base + _COMP).to(PTR)
    if ALIGNED:
        # lets Triton vectorize through pointers it did not get as arguments
        p_ptr = tl.multiple_of(p_ptr, 16)
        g_ptr = tl.multiple_of(g_ptr, 16)
        s0_ptr = tl.multiple_of(s0_ptr, 16)
        s1_ptr = tl.multiple_of(s1_ptr, 16)
        s2_ptr = tl.multiple_of(s2_ptr, 16)
        c_ptr = tl.multiple_of(c_ptr, 16)
    k0 = 0
    k1 = 0
    start = 0
    if SR or SSR:
        k0, k1 = _sr_keys(hyper_ptr, counter_ptr, NHYPER)
        start = tl.load(row_base + _START)
    return (row, offs, bound, whole, inv_scale, p_ptr, g_ptr, s0_ptr, s1_ptr, s2_ptr,
            c_ptr, k0, k1, start)


@triton.jit
def _grad(g_ptr, p_ptr, offs, mask, inv_scale, maximize, decay, weight_decay,
          IS_BF16: tl.constexpr, COMPUTE: tl.constexpr, HAS_GRAD_SCALE: tl.constexpr):
    """A block's grad as every update starts from it, and its param as loaded.

    The grad unscaled (AMP), negated where ``maximize``, and where ``decay``
    plus ``weight_decay * param`` (``grad.add(param, alpha=wd)``; a select,
    not ``fma(p, 0, g)``: an infinite param would make that NaN).
    """
    g = _load(g_ptr, offs, mask, IS_BF16, COMPUTE)
    if HAS_GRAD_SCALE:
        g = g * inv_scale
    g = tl.where(maximize, -g, g)
    p = _load(p_ptr, offs, mask, IS_BF16, COMPUTE)
    g = tl.where(decay, tl.fma(p, weight_decay, g), g)
    return g, p


@triton.jit
def _read_steps(table_ptr, r, rows):
    """The step counters of rows ``r`` (lanes past ``rows`` masked), plus one.

    Returns (step as float64, and for :func:`_write_steps`: the float64 and
    float32 views of each counter, their new values and which view is live).
    A float32 counter is advanced in float32, as torch's ``step += 1``.
    """
    live = r < rows
    base = table_ptr + r.to(tl.int64) * _NCOLS
    flags = tl.load(base + _FLAGS, mask=live, other=0)
    step_addr = tl.load(base + _STEP, mask=live, other=0)
    is64 = live & ((flags & _FLAG_STEP_F64) != 0)
    is32 = live & ((flags & _FLAG_STEP_F64) == 0)
    s64_ptr = step_addr.to(tl.pointer_type(tl.float64))
    s32_ptr = step_addr.to(tl.pointer_type(tl.float32))
    s64 = tl.load(s64_ptr, mask=is64, other=0.0) + 1.0
    s32 = tl.load(s32_ptr, mask=is32, other=0.0) + 1.0
    step = tl.where(is64, s64, s32.to(tl.float64))
    return step, s64_ptr, s32_ptr, s64, s32, is64, is32


@triton.jit
def _write_steps(r, rows, s64_ptr, s32_ptr, s64, s32, is64, is32, found_inf_ptr,
                 HAS_FOUND_INF: tl.constexpr):
    """Store what :func:`_read_steps` advanced, unless GradScaler found inf/NaN.

    The flag enters through the row bound (see :func:`_program` on the
    interpreter and scalar masks).
    """
    limit = rows
    if HAS_FOUND_INF:
        limit = tl.where(tl.load(found_inf_ptr) == 0, rows, 0)
    advance = r < limit
    tl.store(s64_ptr, s64, mask=advance & is64)
    tl.store(s32_ptr, s32, mask=advance & is32)


@triton.jit
def _scalar_state(table_ptr, r, rows, COL: tl.constexpr):
    """The per-row scalar state in column ``COL`` of rows ``r`` (lanes past
    ``rows`` masked): float64 where ``FLAG_SCALAR_F64``, else float32.

    Returns (its float64 and float32 pointers and which is live), for
    :func:`_load_scalar` and :func:`_store_scalar`.
    """
    live = r < rows
    base = table_ptr + r.to(tl.int64) * _NCOLS
    flags = tl.load(base + _FLAGS, mask=live, other=0)
    addr = tl.load(base + COL, mask=live, other=0)
    m64 = live & ((flags & _FLAG_SCALAR_F64) != 0)
    m32 = live & ((flags & _FLAG_SCALAR_F64) == 0)
    return addr.to(tl.pointer_type(tl.float64)), addr.to(tl.pointer_type(tl.float32)), m64, m32


@triton.jit
def _load_scalar(p64_ptr, p32_ptr, m64, m32):
    """A scalar state (:func:`_scalar_state`) as float64."""
    return tl.where(m64, tl.load(p64_ptr, mask=m64, other=0.0),
                    tl.load(p32_ptr, mask=m32, other=0.0).to(tl.float64))


@triton.jit
def _store_scalar(p64_ptr, p32_ptr, m64, m32, value, advance):
    """Store float64 ``value`` into a scalar state, in its dtype, where ``advance``."""
    tl.store(p64_ptr, value, mask=advance & m64)
    tl.store(p32_ptr, value.to(tl.float32), mask=advance & m32)


@triton.jit
def count_steps_kernel(table_ptr, found_inf_ptr, rows, BLOCK_R: tl.constexpr,
                       HAS_FOUND_INF: tl.constexpr):
    """Advance device-side step counters by one: one lane per row.

    The steps kernel of every optimizer whose per-row scalars need nothing
    but the count (RMSprop, Adadelta, Rprop). ``found_inf`` nonzero (if
    HAS_FOUND_INF) leaves every counter as it is.
    """
    r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    _, s64_ptr, s32_ptr, s64, s32, is64, is32 = _read_steps(table_ptr, r, rows)
    _write_steps(r, rows, s64_ptr, s32_ptr, s64, s32, is64, is32, found_inf_ptr,
                 HAS_FOUND_INF)


# ------------------------------------------------ Kahan summation, stochastic rounding
#
# The param store of bfloat16/float16 batches under ``kahan_sum`` /
# ``stochastic_round``, bit for bit as ``kernels/reference/_precision.py``
# (the specification): integer math in uint32, wrapping modulo 2**32.
# Each update kernel takes the switches KAHAN and SR (constexprs, off for
# float32/float64 batches) and a ``counter_ptr`` (the optimizer's int64 step
# counter, None unless SR); seed and salt travel as three uint32 values in
# float64 slots after the optimizer's own hyperparameters (``SR_SLOTS``).

_GOLDEN = tl.constexpr(0x9E3779B9)
_C2 = tl.constexpr(0x85EBCA6B)
_M1 = tl.constexpr(0x7FEB352D)
_M2 = tl.constexpr(0x846CA68B)


@triton.jit
def _mix32(x):
    """Wellons' lowbias32 of a uint32 (tensor or scalar), as ``_precision.mix32``."""
    x = x ^ (x >> 16)
    x = x * tl.full((), _M1, tl.uint32)
    x = x ^ (x >> 15)
    x = x * tl.full((), _M2, tl.uint32)
    return x ^ (x >> 16)


@triton.jit
def _sr_keys(hyper_ptr, counter_ptr, SLOT: tl.constexpr):
    """This call's stream keys ``(k0, k1)``, as ``_precision.keys``.

    Seed (low, high 32 bits) and salt are uint32 values in the float64 slots
    ``SLOT, SLOT + 1, SLOT + 2`` of ``hyper_ptr``; the counter is read here,
    on the device (no host read: a CUDA graph replays with the live value).
    """
    seed_lo = tl.load(hyper_ptr + SLOT).to(tl.int64).to(tl.uint32)
    seed_hi = tl.load(hyper_ptr + SLOT + 1).to(tl.int64).to(tl.uint32)
    salt = tl.load(hyper_ptr + SLOT + 2).to(tl.int64).to(tl.uint32)
    c = tl.load(counter_ptr)
    c_lo = c.to(tl.uint32)
    c_hi = (c >> 32).to(tl.uint32)
    k0 = _mix32(seed_lo ^ _mix32(c_lo ^ tl.full((), _GOLDEN, tl.uint32)))
    k1 = _mix32(seed_hi ^ _mix32(salt ^ _mix32(c_hi ^ tl.full((), _C2, tl.uint32))))
    return k0, k1


@triton.jit
def _store_param(p_ptr, c_ptr, offs, old, new, mask, k0, k1, start,
                 IS_BF16: tl.constexpr, ELEM: tl.constexpr, KAHAN: tl.constexpr,
                 SR: tl.constexpr):
    """Store the block ``new`` into the param: rounded once, or through the options.

    Without KAHAN and SR, :func:`_store`. With them (bfloat16/float16
    params, ``new`` in float32), ``_precision.store_param`` bit for bit:
    ``old`` the param as loaded (in float32), ``c_ptr`` the compensation
    buffer (if KAHAN), ``(k0, k1)`` the stream keys and ``start`` the row's
    first global element index (if SR). The compensation is stored rounded
    to nearest, like every state.
    """
    if not KAHAN and not SR:
        _store(p_ptr, offs, new, mask, IS_BF16, ELEM)
    else:
        if KAHAN:
            y = (new - old) + _load(c_ptr, offs, mask, IS_BF16, tl.float32)
            t = old + y
        else:
            t = new
        u = t.to(tl.uint32, bitcast=True)
        finite = (u & 0x7FFFFFFF) < 0x7F800000
        if SR:
            idx = start + offs
            hi = (idx >> 32).to(tl.uint32)
            r = _mix32(_mix32(idx.to(tl.uint32) ^ k0)
                       ^ (k1 + hi * tl.full((), _GOLDEN, tl.uint32)))
        if IS_BF16:
            # round to nearest even (NaN -> the quiet 0x7FC0), as _store
            h = (u + 0x7FFF + ((u >> 16) & 1)) >> 16
            h = tl.where((u & 0x7FFFFFFF) > 0x7F800000, 0x7FC0, h)
            if SR:
                # add 16 random bits below the kept ones and truncate
                h = tl.where(finite, (u + (r & 0xFFFF)) >> 16, h)
            h = h.to(tl.uint16)
            s = (h.to(tl.uint32) << 16).to(tl.float32, bitcast=True)
            tl.store(p_ptr + offs, h, mask=mask)
        else:
            near = t.to(tl.float16)
            s = near.to(tl.float32)
            if SR:
                a = tl.abs(t)
                n16 = near.to(tl.uint16, bitcast=True) & 0x7FFF
                # lo: the float16 neighbour at or below |t|; ulp from lo's binade
                below = tl.abs(s) > a
                lo_bits = tl.where(below, n16 - 1, n16)
                lo = lo_bits.to(tl.float16, bitcast=True).to(tl.float32)
                ex = (lo_bits.to(tl.uint32) >> 10) & 0x1F
                ulp = tl.where(ex == 0, 5.960464477539063e-08,  # 2**-24
                               ((ex + 102) << 23).to(tl.float32, bitcast=True))
                # (a - lo) / ulp as a product: dividing by a power of two is exact
                # here (no quotient is subnormal), and so is the product by its
                # exact reciprocal 2**(25 - ex) (2**24 below 2**-14)
                inv_ulp = tl.where(ex == 0, 16777216.0,
                                   ((152 - ex) << 23).to(tl.float32, bitcast=True))
                frac = (a - lo) * inv_ulp
                draw = (r >> 8).to(tl.float32) * 5.960464477539063e-08
                mag = tl.where((draw < frac) & (a != lo), lo + ulp, lo)
                # copysign: mag is not negative
                out = (mag.to(tl.uint32, bitcast=True) | (u & 0x80000000)).to(tl.float32,
                                                                              bitcast=True)
                s = tl.where(finite, out, s)
                near = s.to(ELEM)  # exact, or 2**16 -> inf as the reference's copy_
            tl.store(p_ptr + offs, near, mask=mask)
        if KAHAN:
            c = y - (s - old)
            cu = c.to(tl.uint32, bitcast=True)
            c = tl.where((cu & 0x7FFFFFFF) < 0x7F800000, c, 0.0)
            _store(c_ptr, offs, c, mask, IS_BF16, ELEM)


_STATE_KEY0 = tl.constexpr(0x6A09E667)  # reference._precision.STATE_KEYS
_STATE_KEY1 = tl.constexpr(0xBB67AE85)


@triton.jit
def _state_bits(k0, k1, idx, COL: tl.constexpr):
    """``_precision.state_bits`` of global indices ``idx`` (int64) for state
    column ``COL`` in the call keyed ``(k0, k1)``: its 16 bits are the low
    ones (callers mask)."""
    if COL < 2:
        key = _mix32(k0 ^ tl.full((), _STATE_KEY0, tl.uint32)) ^ k1
    else:
        key = _mix32(k0 ^ tl.full((), _STATE_KEY1, tl.uint32)) ^ k1
    r = _mix32(idx.to(tl.uint32) ^ key)
    if COL % 2 == 1:
        r = r >> 16
    return r


@triton.jit
def _store_state(ptr, offs, x, mask, k0, k1, start, COL: tl.constexpr,
                 IS_BF16: tl.constexpr, ELEM: tl.constexpr, SSR: tl.constexpr):
    """Store a block of state column ``COL`` (0-2): :func:`_store`, or with SSR
    (the ``state_dtype`` option, bfloat16 state) stochastically rounded with
    ``_precision.state_bits`` of the stream ``(k0, k1)``, bit for bit."""
    if SSR:
        u = x.to(tl.uint32, bitcast=True)
        r = _state_bits(k0, k1, start + offs, COL)
        h = (u + 0x7FFF + ((u >> 16) & 1)) >> 16
        h = tl.where((u & 0x7FFFFFFF) > 0x7F800000, 0x7FC0, h)
        h = tl.where((u & 0x7FFFFFFF) < 0x7F800000, (u + (r & 0xFFFF)) >> 16, h)
        tl.store(ptr + offs, h.to(tl.uint16), mask=mask)
    else:
        _store(ptr, offs, x, mask, IS_BF16, ELEM)


# ------------------------------------------------ blockwise 8-bit state
#
# ``state_bits=8`` (``kernels/reference/_blockwise.py`` is the specification,
# bit for bit): uint8 codes through ``S_ELEM = tl.uint8`` pointers and a
# float32 scale per QBLOCK elements of the row (table columns SCALE0..2).
# A program's BLOCK (a multiple of QBLOCK; chunks start on a row's multiples
# of BLOCK) holds whole blocks of its row: it decodes them, and encodes the
# new values with the absmax of each block, which a reshape to
# ``[BLOCK // QBLOCK, QBLOCK]`` and a row reduction give before any code is
# stored. The codes decode arithmetically (no table on the device).

_QBLOCK = tl.constexpr(256)
_YMAX = tl.constexpr(1.875)
_LO_S = tl.constexpr(-14)  # 2 - 2**4: signed E4M3
_LO_U = tl.constexpr(-30)  # 2 - 2**5: unsigned E5M3


@triton.jit
def _scales_ptr(table_ptr, row, k: tl.constexpr):
    """Row ``row``'s float32 block scales of state column ``k``."""
    return tl.load(table_ptr + row * _NCOLS + _SCALE0 + k).to(tl.pointer_type(tl.float32))


@triton.jit
def _load_q(ptr, sc_ptr, offs, mask, SIGNED: tl.constexpr):
    """Decode a block of 8-bit state (``mask`` None: unmasked) to float32."""
    c = tl.load(ptr + offs, mask=mask).to(tl.int32)
    neg = c >= 128
    if SIGNED:
        c = c & 127
        lo: tl.constexpr = _LO_S
    else:
        lo: tl.constexpr = _LO_U
    f_field = c >> 3
    f = c & 7
    mant = tl.where(f_field == 0, f, f + 8).to(tl.float32)
    pw = ((tl.maximum(f_field - 1, 0) + (124 + lo)) << 23).to(tl.float32, bitcast=True)
    d = tl.div_rn(mant * pw, tl.full((), _YMAX, tl.float32))
    if SIGNED:
        d = tl.where(neg, -d, d)
    return d * tl.load(sc_ptr + offs // _QBLOCK, mask=mask)


@triton.jit
def _store_q(ptr, sc_ptr, offs, x, mask, bound, first, k0, k1, start, COL: tl.constexpr,
             BLOCK: tl.constexpr, SSR: tl.constexpr):
    """Encode a block's new float32 values ``x`` of state column ``COL`` with
    their blocks' absmax: signed and to nearest for column 0, else unsigned,
    and stochastically with SSR (the bits of ``_precision.state_bits``, as
    :func:`_store_state` draws them; keep the two alike).

    ``first`` is the program's first element in the row (a multiple of
    BLOCK); lanes from ``bound`` on are none of the row's.
    """
    SIGNED: tl.constexpr = COL == 0
    NQ: tl.constexpr = BLOCK // _QBLOCK
    a = tl.reshape(tl.where(offs < bound, tl.abs(x), 0.0), (NQ, _QBLOCK))
    amax = tl.max(a, axis=1)
    nan = tl.max((a != a).to(tl.int32), axis=1)
    amax = tl.where(nan != 0, float("nan"), amax)
    q = first // _QBLOCK + tl.arange(0, NQ).to(tl.int64)
    tl.store(sc_ptr + q, amax, mask=q * _QBLOCK < bound)
    inv = tl.where(amax > 0, tl.div_rn(tl.full((NQ,), _YMAX, tl.float32), amax), 0.0)
    inv = tl.reshape(tl.broadcast_to(inv[:, None], (NQ, _QBLOCK)), (BLOCK,))
    y = tl.abs(x) * inv
    y = tl.where(y <= _YMAX, y, tl.where(y == y, _YMAX, 0.0))
    if SIGNED:
        lo: tl.constexpr = _LO_S
        cmax: tl.constexpr = 127
    else:
        lo: tl.constexpr = _LO_U
        cmax: tl.constexpr = 255
    e = (y.to(tl.uint32, bitcast=True) >> 23).to(tl.int32) - 127
    e = tl.minimum(tl.maximum(e, lo), 0)
    t = y * ((130 - e) << 23).to(tl.float32, bitcast=True)  # times 2**(3 - e), exact
    if SSR and COL > 0:
        rb = _state_bits(k0, k1, start + offs, COL)
        # (floor of a value >= 0 as a truncating conversion: tl.floor is cvt.rmi.ftz)
        r = (t + (rb & 0xFFFF).to(tl.float32) * (1.0 / 65536.0)).to(tl.int32)
    else:
        r = (t + 0.5).to(tl.int32)
        r = tl.where(((r.to(tl.float32) - t) == 0.5) & ((r & 1) == 1), r - 1, r)  # to even
    c = tl.minimum(tl.maximum((e - lo) * 8 + r, 0), cmax)
    if SIGNED:
        c = tl.where(x < 0, c + 128, c)
    tl.store(ptr + offs, c.to(tl.uint8), mask=mask)
