"""Blockwise 8-bit optimizer state (``state_bits=8``): the codes, the specification.

A state tensor of ``n`` elements is stored as ``n`` uint8 codes and
``ceil(n / BLOCK)`` float32 scales: block ``b`` is elements ``[b * BLOCK,
(b + 1) * BLOCK)`` of the tensor (in its param's memory order; the last block
may be partial, and no block spans two tensors). A block's scale is the
absolute maximum of its values (``absmax``), and an element decodes to
``DECODE[code] * absmax``.

**The codes** are small floats relative to the block's absmax, a
dynamic-exponent code as bitsandbytes' dynamic map is, but one a kernel
encodes with a few integer operations instead of a search over the 256
values (bitsandbytes' encode is a binary search of its sorted map):

* ``exp_avg`` (signed, column STATE0): a sign bit and E4M3, 4 exponent bits
  and 3 mantissa bits;
* ``exp_avg_sq`` and ``max_exp_avg_sq`` (unsigned, STATE1/STATE2): E5M3.

With ``E`` exponent and ``M = 3`` mantissa bits a magnitude code ``c`` has
exponent field ``F = c >> M`` and fraction ``f = c & 7``; it is ``f *
2**(EMIN - M)`` for ``F == 0`` (subnormal) and ``(8 + f) * 2**(EMIN + F - 1 -
M)`` otherwise, ``EMIN = 2 - 2**E``, so the largest code is ``YMAX = 1.875``
(exponent 0, fraction 7/8). ``DECODE`` is those values divided by ``YMAX``:
the largest code decodes to the absmax exactly. Every code has 3 mantissa
bits, a relative step of 1/8 to 1/16 (at most 6.25% away, half a step),
from the absmax down to ``2**-17 / 1.875`` of it (signed, about 4e-6) or
``2**-33 / 1.875`` (unsigned, about 6e-11). The second moment gets the
wider range because it is the square of the first: an element whose
``exp_avg`` is representable keeps a nonzero ``exp_avg_sq`` (a second
moment flushed to zero under a nonzero first one would make the update
``lr * m / eps``).

**Encoding** (round to nearest code, ties to even; the second moments
stochastically, see below): ``inv = YMAX / absmax``
(0 where absmax is 0 or not a number), ``y = min(|x| * inv, YMAX)`` (0 for a
NaN), all in float32; ``e = clamp(exponent(y), EMIN, 0)`` read from ``y``'s
bits, and ``code = (e - EMIN) * 8 + rint(y * 2**(M - e))``, plus 128 for a
negative ``x`` in the signed code. The multiplication by ``2**(M - e)`` is
exact, so the code is ``y`` rounded once; carries into the next exponent
fall out of the formula.

**Which rounding.** ``exp_avg`` rounds to nearest: with beta1 = 0.9 it
moves by 10% of itself a step, more than half a code step, and rounding to
nearest cost nothing in the example (+0.28% final loss for the first moment
alone, 2000 steps). ``exp_avg_sq`` and ``max_exp_avg_sq`` round
stochastically, ``t = floor(y * 2**(M - e) + r / 2**16)`` with ``r`` the
16 bits ``reference._precision.state_bits`` gives the element's global index
(the ``state_dtype`` stream's, salted per kernel unit): at beta2 = 0.999 a
step moves ``exp_avg_sq`` by 0.1% of itself, far under half a code step
(3-6%), so rounded to nearest it only grows, and the steps shrink: the
teacher-student run of ``examples/bf16_state.py --hidden 512`` (4000 steps)
ended 6.6% above float32 state's loss with every moment rounded to nearest.

**Non-finite values**: a NaN or infinity in a block makes its absmax NaN or
infinite, and so every element of the block decodes to NaN or infinity (or
NaN): bitsandbytes' behaviour. torch's own step makes that element alone
non-finite.

Tensors below ``MIN_NUMEL`` elements (bitsandbytes' threshold, 4096) keep
torch's state: there the scale's overhead and the launch matter more than
the bytes.
"""

from __future__ import annotations

import numpy as np
import torch

__all__ = ["BLOCK", "MIN_NUMEL", "YMAX", "SIGNED", "UNSIGNED", "DECODE", "blocks",
           "quantize", "dequantize", "absmax_key", "code_of"]

#: elements per block (one float32 scale each)
BLOCK = 256
#: tensors with fewer elements keep torch's state
MIN_NUMEL = 4096
#: mantissa bits of both codes
M = 3
#: the largest code's value before normalisation: every code is divided by it
YMAX = 1.875
#: (exponent bits, signed) of the two codes
SIGNED, UNSIGNED = (4, True), (5, False)


def _magnitudes(e_bits: int) -> np.ndarray:
    lo = 2 - 2 ** e_bits
    out = []
    for c in range(2 ** (e_bits + M)):
        f_field, f = c >> M, c & (2 ** M - 1)
        out.append(f * 2.0 ** (lo - M) if f_field == 0
                   else (2 ** M + f) * 2.0 ** (lo + f_field - 1 - M))
    assert out[-1] == YMAX
    # each magnitude is exact in float32; divided in float32, correctly
    # rounded, as the Triton kernel decodes arithmetically
    return np.array(out, dtype=np.float32) / np.float32(YMAX)


def _table(code) -> np.ndarray:
    e_bits, signed = code
    mags = _magnitudes(e_bits)
    if signed:
        mags = np.concatenate([mags, -mags])
    assert len(mags) == 256 and mags.dtype == np.float32
    return mags


#: code -> value / absmax (float32), per code: DECODE[SIGNED], DECODE[UNSIGNED]
DECODE = {SIGNED: _table(SIGNED), UNSIGNED: _table(UNSIGNED)}


def code_of(col: int):
    """The code of state column ``col``: signed for STATE0 (a first moment,
    momentum), unsigned for STATE1/STATE2 (second moments)."""
    return SIGNED if col == 0 else UNSIGNED


def blocks(numel: int) -> int:
    """Scales a tensor of ``numel`` elements has."""
    return -(-numel // BLOCK)


def _dense_view(t: torch.Tensor) -> torch.Tensor:
    """``t``'s elements in memory order, flat (``t`` dense in some order)."""
    if t.is_contiguous():
        return t.view(-1)
    order = sorted(range(t.dim()), key=lambda d: -t.stride(d))
    return t.permute(order).view(-1)


def quantize(x: torch.Tensor, col: int, codes: torch.Tensor | None = None,
             absmax: torch.Tensor | None = None, like: torch.Tensor | None = None,
             rbits: torch.Tensor | None = None):
    """``(codes, absmax)`` of the float values ``x`` in the code of column
    ``col``, written into ``codes``/``absmax`` where given (else new ones,
    the codes laid out as ``like``, default ``x``, which must be dense).
    Blocks run in the codes' memory order. Rounded to nearest (ties to
    even), or, with ``rbits`` (16 random bits per element, int64, in the
    codes' memory order), stochastically: ``floor(t + rbits / 2**16)``. The
    specification the kernels' stores are checked against."""
    e_bits, signed = code_of(col)
    lo = 2 - 2 ** e_bits
    if codes is None:
        codes = torch.empty_like(x if like is None else like, dtype=torch.uint8)
    n = codes.numel()
    nb = blocks(n)
    if absmax is None:
        absmax = torch.empty(nb, dtype=torch.float32, device=codes.device)
    wide = torch.empty_like(codes, dtype=torch.float32)
    wide.copy_(x)
    flat = _dense_view(wide)
    pad = nb * BLOCK - n
    v = (torch.cat([flat, flat.new_zeros(pad)]) if pad else flat).view(nb, BLOCK)
    amax = v.abs().amax(dim=1)
    zero = torch.zeros((), dtype=torch.float32, device=codes.device)
    inv = torch.where(amax > 0, torch.full((), YMAX, dtype=torch.float32,
                                           device=codes.device) / amax, zero)
    y = v.abs() * inv[:, None]
    y = torch.where(y != y, zero, y).clamp(max=YMAX)
    e = ((y.view(torch.int32) >> 23) - 127).clamp(lo, 0)
    scale = ((127 + M - e) << 23).view(torch.float32)
    t = y * scale
    if rbits is None:
        t = torch.round(t)
    else:
        u = rbits.reshape(-1).to(torch.float32) * 2.0 ** -16
        u = torch.cat([u, u.new_zeros(pad)]) if pad else u
        t = torch.floor(t + u.view(nb, BLOCK))
    code = (e - lo) * 2 ** M + t.to(torch.int32)
    code = code.clamp(0, 2 ** (e_bits + M) - 1)
    if signed:
        code = code + (v < 0).to(torch.int32) * 128
    _dense_view(codes).copy_(code.reshape(-1)[:n])
    absmax.copy_(amax)
    return codes, absmax


def dequantize(codes: torch.Tensor, absmax: torch.Tensor, col: int,
               dtype=torch.float32) -> torch.Tensor:
    """The float32 values (as ``dtype``) that ``codes`` and ``absmax`` stand for,
    shaped and strided as ``codes``."""
    table = torch.from_numpy(DECODE[code_of(col)]).to(codes.device)
    flat = _dense_view(codes).long()
    n = flat.numel()
    vals = table[flat] * absmax.to(torch.float32).repeat_interleave(BLOCK)[:n]
    out = torch.empty_like(codes, dtype=dtype)
    _dense_view(out).copy_(vals)
    return out


def absmax_key(name: str) -> str:
    """The state key of ``name``'s scales (``exp_avg`` -> ``exp_avg_absmax``)."""
    return name + "_absmax"


#: half a code step relative to the value, above the subnormal range
HALF_STEP = 2.0 ** -(M + 1)
