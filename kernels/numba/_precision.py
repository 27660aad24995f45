"""Kahan summation and stochastic rounding of param stores, for the Numba kernels.

The jitted form of ``kernels/reference/_precision.py`` (the specification),
bit for bit: :func:`mix32` / :func:`bits` (the counter-based random stream),
:func:`sr_bf16` / :func:`sr_f16` (stochastic rounding to the stored bits)
and :func:`store_param`, the param store every element function ends with.

:func:`store_param` takes the compensation view ``comp`` and the stream
``sr`` as None-valued compile-time switches (see ``_walk``): with both None
it is ``store(p, j, new)`` and the kernels compile to the code they had
before the options existed. ``sr`` is ``(k0, k1, base)``: the stream keys
(uint32, from ``reference._precision.keys`` on the host) and the global
index of the view's element 0 (its row's START plus the slice offset), so
element ``j`` draws ``bits(k0, k1, base + j)`` whatever the thread split.

All integer arithmetic is on uint32: numba widens ``uint32 * uint32`` to 64
bits, so the multiplies are an intrinsic LLVM ``mul i32`` (wrapping, and
vectorisable as ``vpmulld``) and every other op is cast back to uint32.
"""

import numpy as np
from llvmlite import ir
from numba import njit, types
from numba.extending import intrinsic, overload

from .._jit import HELPER

from ._memory import (_f32_to_u32, _u32_to_f32, bf16_to_f32, f16_to_f32, f32_to_bf16, f32_to_f16,
                      load, store)

_GOLDEN = np.uint32(0x9E3779B9)
_M1 = np.uint32(0x7FEB352D)
_M2 = np.uint32(0x846CA68B)


@intrinsic
def mul32(typingctx, a, b):
    """``a * b`` modulo 2**32 (uint32 operands and result)."""
    if not (a == types.uint32 and b == types.uint32):
        return None
    sig = types.uint32(types.uint32, types.uint32)

    def codegen(context, builder, sig, args):
        return builder.mul(args[0], args[1])

    return sig, codegen


@njit(**HELPER)
def mix32(x):
    """Wellons' lowbias32 on a uint32."""
    x = np.uint32(x ^ (x >> np.uint32(16)))
    x = mul32(x, _M1)
    x = np.uint32(x ^ (x >> np.uint32(15)))
    x = mul32(x, _M2)
    return np.uint32(x ^ (x >> np.uint32(16)))


@njit(**HELPER)
def bits(k0, k1, idx):
    """32 random bits (uint32) for global element index ``idx`` (int64)."""
    lo = np.uint32(idx & 0xFFFFFFFF)
    hi = np.uint32(idx >> 32)
    return mix32(np.uint32(mix32(np.uint32(lo ^ k0)) ^ np.uint32(k1 + mul32(hi, _GOLDEN))))


@njit(**HELPER)
def state_bits(key, lo, shift):
    """``reference._precision.state_bits``: the 16 random bits (uint32) of the
    element whose global index is ``lo`` mod 2**32 (uint32), for the state
    column whose stream key is ``key`` (``reference._precision.state_key``)
    and ``shift`` ``16 * (col % 2)``."""
    return np.uint32(mix32(np.uint32(lo ^ key)) >> shift) & np.uint32(0xFFFF)


@njit(**HELPER)
def sr_bf16(t, r):
    """float32 ``t`` stochastically rounded with bits ``r``: the bfloat16 bits
    (uint16). Non-finite ``t`` rounds to nearest."""
    u = _f32_to_u32(t)
    up = np.uint16(np.uint32(u + (r & np.uint32(0xFFFF))) >> np.uint32(16))
    finite = (u & np.uint32(0x7FFFFFFF)) < np.uint32(0x7F800000)
    return up if finite else f32_to_bf16(t)


@njit(**HELPER)
def sr_f16(t, r):
    """float32 ``t`` stochastically rounded with bits ``r``: the float16 bits
    (int16). Non-finite ``t`` rounds to nearest.

    The specification's float arithmetic on the bits: ``lo`` the half at or
    below ``|t|`` (one below the nearest half when that is above), ``ulp``
    2**(exponent - 25) of ``lo``'s binade (2**-24 for subnormals), and the
    half above ``lo`` is ``lo``'s bits plus one (inf past 65504).
    """
    near = f32_to_f16(t)
    nb = np.uint32(np.uint16(near)) & np.uint32(0x7FFF)
    a = np.abs(t)
    below = f16_to_f32(np.int16(nb)) > a
    lo_bits = np.uint32(nb - np.uint32(1)) if below else nb
    lo = f16_to_f32(np.int16(lo_bits))
    exp = lo_bits >> np.uint32(10)
    e = exp if exp > np.uint32(0) else np.uint32(1)  # subnormals: 2**-24, as exponent 1
    # 1 / ulp = 2**(25 - e), a power of two: (a - lo) * inv_ulp is (a - lo) / ulp exactly
    inv_ulp = _u32_to_f32(np.uint32(np.uint32(152) - e) << np.uint32(23))
    frac = (a - lo) * inv_ulp
    # r >> 8 < 2**24: exact in float32 (via int32, which converts in vector registers)
    u = np.float32(np.int32(r >> np.uint32(8))) * np.float32(5.9604644775390625e-08)
    mag = np.uint32(lo_bits + np.uint32(1)) if u < frac else lo_bits
    sign = (_f32_to_u32(t) >> np.uint32(16)) & np.uint32(0x8000)
    finite = (_f32_to_u32(t) & np.uint32(0x7FFFFFFF)) < np.uint32(0x7F800000)
    return np.int16(np.uint16(mag | sign)) if finite else near


def sr_round(a, t, r):  # pragma: no cover - replaced by the overloads below
    raise NotImplementedError


def nearest(a, t):  # pragma: no cover
    raise NotImplementedError


def widen(a, v):  # pragma: no cover
    raise NotImplementedError


@overload(sr_round, jit_options=HELPER)
def _sr_round_impl(a, t, r):
    """float32 ``t`` rounded stochastically to ``a``'s storage type (its bits)."""
    if a.dtype == types.uint16:
        return lambda a, t, r: sr_bf16(np.float32(t), r)
    if a.dtype == types.int16:
        return lambda a, t, r: sr_f16(np.float32(t), r)
    return None


@overload(nearest, jit_options=HELPER)
def _nearest_impl(a, t):
    """float32 ``t`` rounded to nearest in ``a``'s storage type (its bits)."""
    if a.dtype == types.uint16:
        return lambda a, t: f32_to_bf16(np.float32(t))
    if a.dtype == types.int16:
        return lambda a, t: f32_to_f16(np.float32(t))
    return None


@overload(widen, jit_options=HELPER)
def _widen_impl(a, v):
    """The float32 value of ``a``'s storage bits ``v``."""
    if a.dtype == types.uint16:
        return lambda a, v: bf16_to_f32(v)
    if a.dtype == types.int16:
        return lambda a, v: f16_to_f32(v)
    return None


def store_param(p, j, old, new, comp, sr):  # pragma: no cover - the overload below
    """Store the update's result ``new`` into param element ``j``.

    ``old`` is the element's stored value before the update (compute type).
    ``comp`` None and ``sr`` None: ``store(p, j, new)``, the store the
    kernels had before the options. ``comp`` (the Kahan compensation view):
    the specification's Kahan store; ``sr`` (``(k0, k1, base)``): rounding
    with ``bits(k0, k1, base + j)``. Only bfloat16/float16 batches are
    launched with either.
    """
    raise NotImplementedError


def _plain_store(p, j, old, new, comp, sr):
    store(p, j, new)


def _sr_store(p, j, old, new, comp, sr):
    p[j] = sr_round(p, new, bits(sr[0], sr[1], sr[2] + j))


def _kahan_store(p, j, old, new, comp, sr):
    y = (new - old) + load(comp, j)
    s = nearest(p, old + y)
    p[j] = s
    c = y - (widen(p, s) - old)
    # c - c is 0 exactly when c is finite (inf - inf and NaN give NaN)
    store(comp, j, c if c - c == np.float32(0.0) else np.float32(0.0))


def _kahan_sr_store(p, j, old, new, comp, sr):
    y = (new - old) + load(comp, j)
    s = sr_round(p, old + y, bits(sr[0], sr[1], sr[2] + j))
    p[j] = s
    c = y - (widen(p, s) - old)
    store(comp, j, c if c - c == np.float32(0.0) else np.float32(0.0))


@overload(store_param, jit_options=HELPER)
def _store_param_impl(p, j, old, new, comp, sr):
    """One implementation per option combination, chosen by the argument
    types (None or not) when the element is typed.

    Not an ``if comp is None`` inside one function: numba's dead-branch
    pruning, which that relies on, kept the plain branch of Adagrad's
    inlined element with a Kahan view present (its buffers were never
    written), while SGD's and Adam's were right. Choosing by type does not
    depend on that pass.
    """
    off = (isinstance(comp, types.NoneType), isinstance(sr, types.NoneType))
    return {(True, True): _plain_store, (True, False): _sr_store,
            (False, True): _kahan_store, (False, False): _kahan_sr_store}[off]


@overload(store, jit_options=HELPER)
def _store_rounded_state(a, i, v):
    """``_memory.store`` into a bfloat16 state view with its stream, ``(view,
    key, base, shift)`` (``_walk.rounded``; ``base`` the view's element 0's
    global index mod 2**32): stochastically rounded with the bits of
    ``reference._precision.state_bits``.

    :func:`sr_bf16` without its finite test: adding fewer than 2**16 to the
    bits of an infinity cannot carry, so only NaN (to 0x7FC0, as
    ``f32_to_bf16``) needs a select.
    """
    if not isinstance(a, types.BaseTuple):
        return None

    def impl(a, i, v):
        t = np.float32(v)
        r = state_bits(a[1], np.uint32(a[2] + np.uint32(i)), a[3])
        up = np.uint32(_f32_to_u32(t) + r) >> np.uint32(16)
        a[0][i] = np.uint16(up if t == t else np.uint32(0x7FC0))
    return impl
