"""Kahan summation and stochastic rounding of param stores: the specification.

Every backend stores a low-precision (bfloat16 / float16) param through the
same two opt-in steps, bit for bit; this module is their definition, in
torch ops, and what the compiled backends are tested against.

Kahan summation (``kahan_sum``): each param has a compensation buffer ``c``
of its own dtype (state ``"kahan_comp"``). With ``p`` the stored param and
``new`` the update's result in the compute type (float32)::

    y = (new - p) + c          # this step's change plus the error carried in
    t = p + y
    s = round(t)               # to the storage type: nearest-even, or stochastic
    c = RN(y - (s - p))        # what the store lost; 0 where that is not finite
    p = s

``s - p`` is exact (two nearby low-precision values, in float32), so ``p +
c`` carries the sum to about 8 more bits than the storage type.

Stochastic rounding (``stochastic_round``): the store of ``t`` rounds to one of
its two neighbours in the storage type, up with probability equal to the
fraction of the gap below ``t``, so that the expected stored value is ``t``.
The random bits come from a counter-based stream: element ``idx`` of a kernel
call (its row's START plus its place in the row's memory, in address order:
the same whatever the launch or thread split; a transposed param's elements
take their addresses' order, not their logical one) gets :func:`bits` ``(k0, k1, idx)``, where
:func:`keys` derives ``k0, k1`` from the optimizer's 64-bit ``seed``, its step
``counter`` (advanced once per step that is not skipped) and the call's
``salt`` (its param group and kernel unit), so that no two elements of one
step, and no two steps, share a stream. No state is read but the counter:
a run is reproducible from the seed, and a resumed run continues it.

* bfloat16: add the low 16 random bits to the float32 bits of ``t`` and
  truncate (the carry into bit 16 happens with probability equal to the
  truncated fraction). Inf and NaN round to nearest.
* float16: ``lo``/``hi`` the float16 neighbours of ``|t|`` (``hi`` may be
  inf past the largest finite half), ``ulp = hi - lo`` taken from ``lo``'s
  binade (2**-24 below 2**-14); round up iff ``(r >> 8) * 2**-24 < (|t| - lo)
  / ulp`` with ``r`` the 32 random bits. Inf and NaN round to nearest.

Stochastically rounded state (``state_round``, for the ``state_dtype``
option): every store of a bfloat16 state tensor rounds as a bfloat16 param
does under ``stochastic_round``, with its own, cheaper stream: element
``idx`` of state column ``c`` (0, 1, 2: STATE0..2) takes the 16 bits ``(r >>
16 * (c % 2)) & 0xFFFF`` of ``r = M((idx mod 2**32) ^ key)`` (:func:`state_bits`),
with ``key = M(k0 ^ STATE_KEYS[c // 2]) ^ k1`` (:func:`state_key`, once per
call on the host) and ``(k0, k1)`` the keys of the call's ``(seed, counter,
salt)``. One word per element serves two state columns, and no state shares
the param's bits. Elements ``2**32`` apart in one call share their state's
bits; nothing else does.

Why one round, where the param's stream has two: a state store sits in
every element of the optimizers' loops, and on the CPU those loops are
compute-bound once the state is 16-bit. With two rounds, a 64-bit index and
a finite test per store, AdamW over the resnet50-shaped list took 0.96x the
time of float32 state with float32 params (rounding to nearest: 0.77x), and
1.56x that of torch's bfloat16 state with bfloat16 params; with one round,
0.75x and 0.95x (nearest 0.73x) and 1.15x and 1.12x, in two runs
(``python benchmarks/state_rounding.py --rounds 21 --params fp32|bf16``,
paired medians, quiet 2-core AVX-512 EPYC, 2026-12-07). Per element the
stream is still uniform in every step (``key`` is new each step) and
distinct within a call (``M`` is a bijection).

``M`` is Wellons' ``lowbias32`` 32-bit integer mixer (a bijection with low
avalanche bias): two keyed rounds per element are cheap enough for the CPU
kernels (a Philox-4x32-10 per element is ~20 wide multiplies) and give each
element its own pseudo-random word. All integer arithmetic is modulo 2**32.
"""

from __future__ import annotations

import torch

__all__ = ["LOW_PRECISION", "mix32", "keys", "bits", "state_key", "state_bits", "round_bf16",
           "round_f16",
           "store_param", "STATE_KEYS"]

#: storage dtypes the options act on; other params are stored as without them
LOW_PRECISION = (torch.bfloat16, torch.float16)

_MASK = 0xFFFFFFFF
GOLDEN = 0x9E3779B9
C2 = 0x85EBCA6B
_M1 = 0x7FEB352D
_M2 = 0x846CA68B
#: what a state word's ``k0`` is XORed with (state columns 0-1, 2): the
#: fractional bits of sqrt(2) and sqrt(3), so that no state shares the
#: param's stream
STATE_KEYS = (0x6A09E667, 0xBB67AE85)


def mix32(x):
    """Wellons' lowbias32 on an int (Python) or int64 tensor of uint32 values."""
    if isinstance(x, torch.Tensor):
        x = x ^ (x >> 16)
        x = (x * _M1) & _MASK
        x = x ^ (x >> 15)
        x = (x * _M2) & _MASK
        return x ^ (x >> 16)
    x &= _MASK
    x ^= x >> 16
    x = (x * _M1) & _MASK
    x ^= x >> 15
    x = (x * _M2) & _MASK
    return x ^ (x >> 16)


def keys(seed: int, counter: int, salt: int):
    """The per-call stream keys ``(k0, k1)``, uint32 each."""
    seed_lo, seed_hi = seed & _MASK, (seed >> 32) & _MASK
    c_lo, c_hi = counter & _MASK, (counter >> 32) & _MASK
    k0 = mix32(seed_lo ^ mix32(c_lo ^ GOLDEN))
    k1 = mix32(seed_hi ^ mix32((salt & _MASK) ^ mix32(c_hi ^ C2)))
    return k0, k1


def bits(k0: int, k1: int, idx: torch.Tensor) -> torch.Tensor:
    """32 random bits (int64 holding a uint32) per element index ``idx`` (int64)."""
    lo = idx & _MASK
    hi = idx >> 32
    return mix32(mix32(lo ^ k0) ^ ((k1 + hi * GOLDEN) & _MASK))


def state_key(k0: int, k1: int, col: int) -> int:
    """The key (uint32) of state column ``col``'s stream in the call keyed ``(k0, k1)``."""
    return mix32(k0 ^ STATE_KEYS[col // 2]) ^ k1


def state_bits(k0: int, k1: int, idx: torch.Tensor, col: int) -> torch.Tensor:
    """The 16 random bits (int64) per element index ``idx`` of state column ``col``."""
    r = mix32((idx & _MASK) ^ state_key(k0, k1, col))
    return (r >> (16 * (col % 2))) & 0xFFFF


def _f32_bits(x):
    return x.view(torch.int32).to(torch.int64) & _MASK


def _from_bits(u):
    u = torch.where(u >= 1 << 31, u - (1 << 32), u)
    return u.to(torch.int32).view(torch.float32)


def round_bf16(t: torch.Tensor, r) -> torch.Tensor:
    """float32 ``t`` rounded to bfloat16 values (as float32): stochastically
    with bits ``r``, or to nearest even where ``r`` is None."""
    if r is None:
        return t.to(torch.bfloat16).float()
    u = _f32_bits(t)
    up = (u + (r & 0xFFFF)) & 0xFFFF0000
    finite = (u & 0x7FFFFFFF) < 0x7F800000
    return torch.where(finite, _from_bits(up), t.to(torch.bfloat16).float())


def round_f16(t: torch.Tensor, r) -> torch.Tensor:
    """float32 ``t`` rounded to float16 values (as float32); see round_bf16."""
    near = t.to(torch.float16).float()
    if r is None:
        return near
    a = t.abs()
    n = near.abs()
    # lo: the float16 neighbour at or below |t|
    below = n > a
    n16 = n.to(torch.float16).view(torch.int16).to(torch.int32)
    lo = torch.where(below, (n16 - 1).to(torch.int16).view(torch.float16).float(), n)
    lo_bits = lo.to(torch.float16).view(torch.int16).to(torch.int32)
    exp = (lo_bits >> 10) & 0x1F
    ulp = torch.where(exp == 0, torch.full_like(a, 2.0 ** -24),
                      torch.ldexp(torch.ones_like(a), (exp - 25).to(torch.float32)))
    frac = (a - lo) / ulp
    u = (r >> 8).to(torch.float32) * (2.0 ** -24)
    mag = torch.where(u < frac, lo + ulp, lo)
    mag = torch.where(a == lo, lo, mag)
    out = torch.copysign(mag, t)
    finite = torch.isfinite(t)
    return torch.where(finite, out, near)


def _dense(shape, strides) -> bool:
    """Whether the elements tile ``[0, numel)`` of their storage (any dim order)."""
    expected = 1
    for size, stride in sorted(((sz, st) for sz, st in zip(shape, strides) if sz != 1),
                               key=lambda d: d[1]):
        if stride != expected:
            return False
        expected *= size
    return True


def _indices(p, start):
    """The global element indices of ``p``'s elements (int64, ``p``'s shape).

    The kernels walk a row in address order (a dense tensor with its own
    strides, a transposed one included; others are staged contiguous).
    """
    idx = torch.arange(start, start + p.numel(), dtype=torch.int64, device=p.device)
    return (idx.as_strided(p.shape, p.stride()) if _dense(p.shape, p.stride())
            else idx.view(p.shape))


def store_state(s: torch.Tensor, new: torch.Tensor, stream, col: int, start: int) -> None:
    """Store ``new`` (compute type) into the bfloat16 state ``s``, stochastically
    rounded with :func:`state_bits` of ``stream`` (``(k0, k1)``) and ``col``."""
    s.copy_(round_bf16(new.float(), state_bits(stream[0], stream[1], _indices(s, start), col)))


def store_param(p: torch.Tensor, old: torch.Tensor, new: torch.Tensor, comp=None,
                stream=None, start: int = 0) -> None:
    """Store ``new`` (compute type) into low-precision ``p`` through the options.

    Args:
        p: the param (storage), written.
        old: ``p``'s stored values in the compute type (before the update).
        new: the update's result in the compute type.
        comp: the Kahan compensation buffer (written), or None.
        stream: ``(k0, k1)`` from :func:`keys` for stochastic rounding, or None.
        start: the global index of ``p``'s first element in the kernel call.
    """
    r = None
    if stream is not None:
        r = bits(stream[0], stream[1], _indices(p, start))
    rnd = round_bf16 if p.dtype == torch.bfloat16 else round_f16
    if comp is None:
        p.copy_(rnd(new, r))
        return
    new = new.float()
    old = old.float()
    y = (new - old) + comp.float()
    s = rnd(old + y, r)
    c = y - (s - old)
    c = torch.where(torch.isfinite(c), c, torch.zeros_like(c))
    p.copy_(s)
    comp.copy_(c)
