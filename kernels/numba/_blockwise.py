"""Blockwise 8-bit state (``state_bits=8``) in the Numba row walk.

The codes and their encoding are ``reference/_blockwise.py``'s (that file is
one of the kernels' sources, ``_disk_cache``). Where the state views'
prototypes are uint8 arrays (``has0..2``), the walk (``_walk.walk``) hands
each thread whole blocks of a row (a block belongs to the chunk its first
element lies in, so chunks end on a row's block edges) and the span is
:func:`blocks` instead of ``plain``/``blocked``: for each block of BLOCK
elements it decodes the block's codes into a float32 buffer of the thread's
(:func:`decoded`), runs the optimizer's element update over the block with
the buffers as its state views (plain float32 arrays: the element is the
same function as for float32 state), then takes the absmax of the new values
and encodes them (:func:`encoded`): each code byte and scale is read once
and written once, in one pass, and the absmax is known before a code is
written.

Speed (issue 27): every loop of a full block has the constant trip count
BLOCK and no branch, so each is a 512-bit vector loop on the AVX-512 dev VM:
the decode is arithmetic (:func:`_value`), the absmax an integer max on the
bits, the encode (:func:`_code`) the reference's formula without the clamps
and NaN test that cannot apply to finite values (a block with an infinity
or NaN takes a short fix-up loop first), the stochastic rounding's index a
uint32 counter, and the codes are indexed through a view of the block (as
``codes[o + k]`` numba's wraparound of negative indices left the kernels'
code loads and stores scalar: the whole AdamW step stayed at 4.1-4.5x
float32 state's, against 1.6x with the view, 24 x 1M float32 params, under
load). Before, with ``range(m)`` loops, a NaN flag and a
table lookup, only part of it vectorised: AdamW over 24 x 1M float32
elements, 2 threads, paired with float32 state's span in one process (the
spans alone, as ``benchmarks/blockwise_span.py`` runs them; the machine
loaded by other jobs, load average 3-5, 2026-12-07): 4.5-5.3x float32
state's step time before, 1.35-1.6x after. Where the rest goes (perf, cpu-clock
samples in the kernel): the element update over the buffers 27% (it is the
same divide- and sqrt-bound math as float32 state's, which there hides
under the memory traffic), encoding the stochastically rounded second moment
25% (the counter hash, two 32-bit multiplies per element, is a third of
it), its decode 15% and the first moment's encode 13%, per-block work
(prefetches, alias checks, absmax reductions) 12%. Tried and slower (same
harness): the decode by table lookup (a gather: 2.1x against 1.58x), the
division by YMAX as a multiply-and-FMA correction (Markstein; 1.70x against
1.50x), the decode fused into the element's loads (1.70x), the partial
last block through zero-padded copies so that the block is compiled once
(1.49x against 1.35x); one encode loop for all columns: no change.
"""

import numpy as np
from numba import carray, njit, types
from numba.extending import overload

from .. import columns as L
from .._jit import HELPER, address
from ..reference._blockwise import BLOCK, DECODE, M, SIGNED, UNSIGNED, YMAX
from ._memory import BLOCK as _RUN, PREFETCH_BYTES, _f32_to_u32, _u32_to_f32, fma, prefetch_block
from ._precision import state_bits

__all__ = ["BLOCK", "block_len", "blocks", "buffers", "quantized"]

_DEC_S = DECODE[SIGNED]
_DEC_U = DECODE[UNSIGNED]
_LO_S = 2 - 2 ** SIGNED[0]
_LO_U = 2 - 2 ** UNSIGNED[0]
_CMAX_S = 2 ** (SIGNED[0] + M) - 1
_CMAX_U = 2 ** (UNSIGNED[0] + M) - 1
_YMAX = np.float32(YMAX)
# Every integer below is int32/uint32: numba types arithmetic on them as
# 64-bit, and LLVM then kept the encode loop's lanes 64 bits wide
_I = np.int32
_U = np.uint32
_LO_S32, _LO_U32 = _I(_LO_S), _I(_LO_U)
# a code c >= 8 (exponent field F > 0, fraction f) is (1 + f/8) * 2**(lo + F - 1):
# its float32 bits are c << 20 plus (lo + 126) << 23; c < 8 is c * 2**(lo - 3)
_NORM_S = _U((_LO_S + 126) << 23)
_NORM_U = _U((_LO_U + 126) << 23)
_SUB_S = np.float32(2.0 ** (_LO_S - 3))
_SUB_U = np.float32(2.0 ** (_LO_U - 3))
_ABS = _U(0x7FFFFFFF)
_INF = _U(0x7F800000)


def _is_codes(t) -> bool:
    return isinstance(t, types.Array) and t.dtype == types.uint8


def block_len(has0):  # pragma: no cover - the overload below
    """BLOCK where the state is 8-bit codes (``has0`` a uint8 prototype), else 1."""
    raise NotImplementedError


@overload(block_len, jit_options=HELPER)
def _block_len_impl(has0):
    if _is_codes(has0):
        return lambda has0: BLOCK
    return lambda has0: 1


def buffers(has0):  # pragma: no cover
    """A thread's float32 buffers, one block per state column, or None."""
    raise NotImplementedError


@overload(buffers, jit_options=HELPER)
def _buffers_impl(has0):
    if _is_codes(has0):
        return lambda has0: np.empty((3, BLOCK), dtype=np.float32)
    return lambda has0: None


def quantized(v, table, row, k, off, n, bufs, state_keys, base):  # pragma: no cover
    """State view ``v`` of column STATE``k`` (elements ``[off, off + n)`` of the
    row, ``off`` a block edge) as :func:`blocks` takes it: ``(codes, scales,
    buffer, decode table, stream, base)``, the scales from column SCALE``k``;
    ``v`` itself where it is not 8-bit codes (or None). ``stream`` is None
    (round to nearest) or ``(key, shift)`` (``_walk.rounded``'s key of
    ``state_keys``), for columns 1 and 2; ``base`` the global index of the
    view's element 0."""
    raise NotImplementedError


@overload(quantized, jit_options=HELPER)
def _quantized_impl(v, table, row, k, off, n, bufs, state_keys, base):
    if not _is_codes(v):
        return lambda v, table, row, k, off, n, bufs, state_keys, base: v
    if isinstance(state_keys, types.NoneType):
        def impl(v, table, row, k, off, n, bufs, state_keys, base):
            scales = carray(address(table[row, L.SCALE0 + k] + (off // BLOCK) * 4),
                            ((n + BLOCK - 1) // BLOCK,), np.float32)
            return (v, scales, bufs[k], _DEC_S if k == 0 else _DEC_U, None, base)
        return impl

    def impl_keys(v, table, row, k, off, n, bufs, state_keys, base):
        scales = carray(address(table[row, L.SCALE0 + k] + (off // BLOCK) * 4),
                        ((n + BLOCK - 1) // BLOCK,), np.float32)
        stream = (state_keys[0] if k < 2 else state_keys[1], np.uint32(16 * (k % 2)))
        return (v, scales, bufs[k], _DEC_S if k == 0 else _DEC_U, stream, base)
    return impl_keys


@njit(**HELPER)
def _value(c, col):
    """``DECODE[code_of(col)][c]`` (``c`` a uint32 code) by arithmetic, the
    same float32: the magnitude is exact, then divided by YMAX (correctly
    rounded, as the table's). A table lookup is a gather; all 256 codes of
    both tables are checked in tests/test_state_bits.py."""
    signed = col == 0
    mag = c & _U(0x7F) if signed else c
    norm = _U(_NORM_S if signed else _NORM_U)
    sub = _SUB_S if signed else _SUB_U
    v = (np.float32(_I(mag)) * sub if mag < _U(8)
         else _u32_to_f32(_U(_U(mag << _U(20)) + norm)))
    d = v / _YMAX
    if signed:
        d = _u32_to_f32(_U(_f32_to_u32(d) | _U(_U(c & _U(0x80)) << _U(24))))
    return d


def decoded(s, o, m, b, col):  # pragma: no cover
    """Block ``b`` (elements ``[o, o + m)`` of the span) of quantized state
    ``s`` of column ``col`` decoded into its buffer (its first ``m``
    elements, the buffer returned whole), or None."""
    raise NotImplementedError


@overload(decoded, jit_options=HELPER)
def _decoded_impl(s, o, m, b, col):
    if isinstance(s, types.NoneType):
        return lambda s, o, m, b, col: None

    def impl(s, o, m, b, col):
        # the block's codes as a view of their own: indexed ``o + k``, numba's
        # wraparound of negative indices made every load and store of the
        # codes scalar inside the kernels' parallel loop
        codes, scale, buf = s[0][o:o + m], s[1][b], s[2]
        for k in range(m):
            buf[k] = _value(_U(codes[k]), col) * scale
        return buf
    return impl


@njit(**HELPER)
def _code(x, inv, col, s, j):
    """The code (int32) of ``x`` in a block whose ``inv`` is YMAX / absmax,
    for ``x`` finite, ``|x| <= absmax`` and ``inv`` finite: the reference's
    formula less what cannot happen then (a NaN ``y``; an exponent above 0,
    as ``y <= YMAX < 2``; a code below 0 or above cmax, as ``y * 2**(M - e)``
    is below 16 and rounds to at most 16). Equal to the reference's formula
    for every float32 ``x`` with ``inv`` 1 and near the absmax of 20,000
    random absmaxes (both columns, 2026-12-07)."""
    signed = col == 0
    lo = _LO_S32 if signed else _LO_U32
    y = abs(x) * inv
    y = y if y < _YMAX else _YMAX  # |x| * inv may round above YMAX
    eb = _I(_f32_to_u32(y) >> _U(23))  # the exponent biased by 127, at least lo's
    eb = eb if eb > lo + _I(127) else lo + _I(127)
    scale = _u32_to_f32(_U(_U(_I(254 + M) - eb) << _U(23)))
    c = _I(_I(_I(eb - (lo + _I(127))) * _I(8)) + _rounded(y * scale, s, j, col))
    if signed:
        c = _I(c | _I(128)) if x < 0 else c
    return c


def encoded(s, f, o, m, b, col):  # pragma: no cover
    """The new values ``f`` (the buffer) of block ``b`` of ``s``: its absmax
    into the scale, the values encoded into the codes (``reference._blockwise``:
    signed and to nearest for column 0; with a stream, the others
    stochastically)."""
    raise NotImplementedError


@overload(encoded, jit_options=HELPER)
def _encoded_impl(s, f, o, m, b, col):
    if isinstance(s, types.NoneType):
        return lambda s, f, o, m, b, col: None

    def impl(s, f, o, m, b, col):
        # the absmax on the bits (an integer max, which vectorises where a
        # float one with a NaN flag did not): non-negative floats order as
        # their bits, NaNs above infinity
        top = _U(0)
        for k in range(m):
            a = _U(_f32_to_u32(f[k]) & _ABS)
            top = a if a > top else top
        amax = np.float32(np.nan) if top > _INF else _u32_to_f32(top)
        inv = _YMAX / amax if amax > 0 else np.float32(0.0)
        s[1][b] = amax
        codes = s[0][o:o + m]  # (see decoded)
        if not (top < _INF and inv < np.float32(np.inf)):
            # an infinity or NaN in the block (inv is then 0), or an absmax so
            # small that YMAX / absmax overflows: values and an inv that give
            # the reference's codes in the loop below (whose _code assumes
            # finite values and inv), in place of the buffer's
            big = inv == np.float32(np.inf)  # (the reference: cmax for x != 0)
            for k in range(m):
                v = f[k]
                a = np.float32(1.0) if big and v != 0 else np.float32(0.0)
                f[k] = a if not v < 0 else (-a if big else np.float32(-1.0))
            inv = _YMAX if big else np.float32(0.0)
        j = _U(_U(s[5] & 0xFFFFFFFF) + _U(o))  # element 0's global index mod 2**32
        for k in range(m):
            codes[k] = np.uint8(_code(f[k], inv, col, s, j))
            j = _U(j + _U(1))  # (counted apart from k: from k, 64-bit lanes)
    return impl


def _rounded(t, s, j, col):  # pragma: no cover
    """``t`` (a code's fraction, exact, not negative) rounded to an int32: to
    nearest even, or for columns 1 and 2 with a stream stochastically, with
    the 16 bits of the element whose global index mod 2**32 is ``j``
    (``reference._precision.state_bits``): ``floor(t + r / 2**16)``, the sum
    rounded to float32 as the reference's (one fma: ``r / 2**16`` is exact),
    the floor a truncation (the sum is not negative)."""
    raise NotImplementedError


@overload(_rounded, jit_options=HELPER)
def _rounded_impl(t, s, j, col):
    if isinstance(s.types[4], types.NoneType):
        return lambda t, s, j, col: _I(np.rint(t))

    def impl(t, s, j, col):
        if col == 0:
            return _I(np.rint(t))
        key, shift = s[4]
        r = state_bits(key, j, shift)
        return _I(fma(np.float32(_I(r)), np.float32(2.0 ** -16), t))
    return impl


def _part(a, o, m):  # pragma: no cover
    raise NotImplementedError


@overload(_part, jit_options=HELPER)
def _part_impl(a, o, m):
    if isinstance(a, types.NoneType):
        return lambda a, o, m: None
    return lambda a, o, m: a[o:o + m]


def _shifted(sr, o):  # pragma: no cover
    raise NotImplementedError


@overload(_shifted, jit_options=HELPER)
def _shifted_impl(sr, o):
    if isinstance(sr, types.NoneType):
        return lambda sr, o: None
    return lambda sr, o: (sr[0], sr[1], sr[2] + o)


@njit(inline="always")
def _block(element, o, m, b, p, g, s0, s1, s2, comp, sr, x, r):
    """Block ``b``, elements ``[o, o + m)`` of the span: decode, update, encode."""
    f0 = decoded(s0, o, m, b, 0)
    f1 = decoded(s1, o, m, b, 1)
    f2 = decoded(s2, o, m, b, 2)
    pb = p[o:o + m]
    gb = g[o:o + m]
    cb = _part(comp, o, m)
    sb = _shifted(sr, o)
    for j in range(m):
        element(j, pb, gb, f0, f1, f2, cb, sb, x, r)
    encoded(s0, f0, o, m, b, 0)
    encoded(s1, f1, o, m, b, 1)
    encoded(s2, f2, o, m, b, 2)


@njit(inline="always")
def blocks(element, n, p, g, s0, s1, s2, comp, sr, x, r):
    """``element`` over ``n`` elements of 8-bit state, a block at a time.

    Full blocks are :func:`_block` with the trip count BLOCK, a constant
    (with ``min(BLOCK, n - o)`` none of its loops was a fixed-length vector
    loop), and prefetch the block ``PREFETCH_BYTES`` of params ahead in
    every array, as ``_walk.blocked``; a partial last block is a second
    copy with its own length.
    """
    ahead = PREFETCH_BYTES // p.itemsize
    full = n - n % BLOCK
    for o in range(0, full, BLOCK):
        for q in range(o + ahead, o + ahead + BLOCK, _RUN):  # (_RUN elements a prefetch_block)
            prefetch_block(p, q, n)
            prefetch_block(g, q, n)
            prefetch_block(comp, q, n)
            prefetch_block(s0, q, n)  # (the codes: a quantized view's prefetch is theirs)
            prefetch_block(s1, q, n)
            prefetch_block(s2, q, n)
        _block(element, o, BLOCK, o // BLOCK, p, g, s0, s1, s2, comp, sr, x, r)
    if full < n:
        _block(element, full, n - full, full // BLOCK, p, g, s0, s1, s2, comp, sr, x, r)
