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
"""

import numpy as np
from numba import carray, njit, types
from numba.extending import overload

from .. import columns as L
from .._jit import address
from ..reference._blockwise import BLOCK, DECODE, M, SIGNED, UNSIGNED, YMAX
from ._memory import _f32_to_u32, _u32_to_f32
from ._precision import state_bits

__all__ = ["BLOCK", "block_len", "blocks", "buffers", "quantized"]

_DEC_S = DECODE[SIGNED]
_DEC_U = DECODE[UNSIGNED]
_LO_S = 2 - 2 ** SIGNED[0]
_LO_U = 2 - 2 ** UNSIGNED[0]
_CMAX_S = 2 ** (SIGNED[0] + M) - 1
_CMAX_U = 2 ** (UNSIGNED[0] + M) - 1
_YMAX = np.float32(YMAX)


def _is_codes(t) -> bool:
    return isinstance(t, types.Array) and t.dtype == types.uint8


def block_len(has0):  # pragma: no cover - the overload below
    """BLOCK where the state is 8-bit codes (``has0`` a uint8 prototype), else 1."""
    raise NotImplementedError


@overload(block_len, inline="always")
def _block_len_impl(has0):
    if _is_codes(has0):
        return lambda has0: BLOCK
    return lambda has0: 1


def buffers(has0):  # pragma: no cover
    """A thread's float32 buffers, one block per state column, or None."""
    raise NotImplementedError


@overload(buffers, inline="always")
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


@overload(quantized, inline="always")
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


def decoded(s, o, m, b):  # pragma: no cover
    """Block ``b`` (elements ``[o, o + m)`` of the span) of quantized state
    ``s`` decoded into its buffer; the buffer's first ``m`` elements, or None."""
    raise NotImplementedError


@overload(decoded, inline="always")
def _decoded_impl(s, o, m, b):
    if isinstance(s, types.NoneType):
        return lambda s, o, m, b: None

    def impl(s, o, m, b):
        codes, scale, buf, dec = s[0], s[1][b], s[2], s[3]
        for k in range(m):
            buf[k] = dec[codes[o + k]] * scale
        return buf[:m]
    return impl


def encoded(s, f, o, m, b, col):  # pragma: no cover
    """The new values ``f`` (the buffer) of block ``b`` of ``s``: its absmax
    into the scale, the values encoded into the codes (``reference._blockwise``:
    signed and to nearest for column 0; with a stream, the others
    stochastically)."""
    raise NotImplementedError


@overload(encoded, inline="always")
def _encoded_impl(s, f, o, m, b, col):
    if isinstance(s, types.NoneType):
        return lambda s, f, o, m, b, col: None

    def impl(s, f, o, m, b, col):
        amax = np.float32(0.0)
        nan = False
        for k in range(m):
            a = abs(f[k])
            amax = a if a > amax else amax
            nan = nan or a != a
        if nan:
            amax = np.float32(np.nan)
        s[1][b] = amax
        inv = _YMAX / amax if amax > 0 else np.float32(0.0)
        signed = col == 0
        lo = _LO_S if signed else _LO_U
        cmax = _CMAX_S if signed else _CMAX_U
        codes = s[0]
        for k in range(m):
            x = f[k]
            y = abs(x) * inv
            y = y if y <= _YMAX else (_YMAX if y == y else np.float32(0.0))
            e = np.int32(_f32_to_u32(y) >> np.uint32(23)) - 127
            e = min(max(e, lo), 0)
            scale = _u32_to_f32(np.uint32(127 + M - e) << np.uint32(23))
            c = (e - lo) * 8 + np.int32(_rounded(y * scale, s, o + k, col))
            c = min(max(c, 0), cmax)
            if signed and x < 0:
                c += 128
            codes[o + k] = np.uint8(c)
    return impl


def _rounded(t, s, j, col):  # pragma: no cover
    """``t`` (a code's fraction, exact) rounded: to nearest even, or for
    columns 1 and 2 with a stream stochastically, with the 16 bits of the
    element's global index ``s[5] + j`` (``reference._precision.state_bits``)."""
    raise NotImplementedError


@overload(_rounded, inline="always")
def _rounded_impl(t, s, j, col):
    if isinstance(s.types[4], types.NoneType):
        return lambda t, s, j, col: np.rint(t)

    def impl(t, s, j, col):
        if col == 0:
            return np.rint(t)
        key, shift = s[4]
        r = state_bits(key, np.uint32((s[5] + j) & 0xFFFFFFFF), shift)
        return np.floor(t + np.float32(r) * np.float32(2.0 ** -16))
    return impl


def _part(a, o, m):  # pragma: no cover
    raise NotImplementedError


@overload(_part, inline="always")
def _part_impl(a, o, m):
    if isinstance(a, types.NoneType):
        return lambda a, o, m: None
    return lambda a, o, m: a[o:o + m]


def _shifted(sr, o):  # pragma: no cover
    raise NotImplementedError


@overload(_shifted, inline="always")
def _shifted_impl(sr, o):
    if isinstance(sr, types.NoneType):
        return lambda sr, o: None
    return lambda sr, o: (sr[0], sr[1], sr[2] + o)


@njit(inline="always")
def blocks(element, n, p, g, s0, s1, s2, comp, sr, x, r):
    """``element`` over ``n`` elements of 8-bit state, a block at a time."""
    for b in range((n + BLOCK - 1) // BLOCK):
        o = b * BLOCK
        m = min(BLOCK, n - o)
        f0 = decoded(s0, o, m, b)
        f1 = decoded(s1, o, m, b)
        f2 = decoded(s2, o, m, b)
        pb = p[o:o + m]
        gb = g[o:o + m]
        cb = _part(comp, o, m)
        sb = _shifted(sr, o)
        for j in range(m):
            element(j, pb, gb, f0, f1, f2, cb, sb, x, r)
        encoded(s0, f0, o, m, b, 0)
        encoded(s1, f1, o, m, b, 1)
        encoded(s2, f2, o, m, b, 2)
