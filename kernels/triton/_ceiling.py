"""Memory-traffic ceiling on CUDA: the optimizers' access pattern, no math.

The counterpart of ``kernels/numba/_ceiling.py`` for the benchmark's CUDA
runs, over flat buffers rather than a table of tensors: ``pattern`` reads
the first ``K`` of five flat integer buffers and XORs the K-th into each of
the others, over ``n`` elements: K reads and K-1 writes per element.

A program whose block lies wholly below ``n`` takes an unmasked path; only
the one block that straddles ``n`` is masked. A mask compiles to scalar
accesses unless Triton can prove it constant over 16 bytes, i.e. unless
``n`` is a known multiple of 16 (the launcher specializes ints on that), so
one mask on every block left the whole kernel scalar for any other element
count. The unmasked path needs no hint: the launcher specializes each
pointer on its actual 16-byte alignment and the offsets are a multiple of
BLOCK plus an arange, so it gets 128-bit accesses exactly when the buffers
are aligned (fresh allocations are).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

__all__ = ["BLOCK", "pattern", "launcher"]

#: Elements per program.
BLOCK = 4096


@triton.jit
def _xor_block(a, b, c, d, e, offs, mask, K: tl.constexpr):
    if K == 2:
        x = tl.load(b + offs, mask=mask)
        tl.store(a + offs, tl.load(a + offs, mask=mask) ^ x, mask=mask)
    elif K == 3:
        x = tl.load(c + offs, mask=mask)
        tl.store(a + offs, tl.load(a + offs, mask=mask) ^ x, mask=mask)
        tl.store(b + offs, tl.load(b + offs, mask=mask) ^ x, mask=mask)
    elif K == 4:
        x = tl.load(d + offs, mask=mask)
        tl.store(a + offs, tl.load(a + offs, mask=mask) ^ x, mask=mask)
        tl.store(b + offs, tl.load(b + offs, mask=mask) ^ x, mask=mask)
        tl.store(c + offs, tl.load(c + offs, mask=mask) ^ x, mask=mask)
    else:
        x = tl.load(e + offs, mask=mask)
        tl.store(a + offs, tl.load(a + offs, mask=mask) ^ x, mask=mask)
        tl.store(b + offs, tl.load(b + offs, mask=mask) ^ x, mask=mask)
        tl.store(c + offs, tl.load(c + offs, mask=mask) ^ x, mask=mask)
        tl.store(d + offs, tl.load(d + offs, mask=mask) ^ x, mask=mask)


@triton.jit
def pattern(a, b, c, d, e, n, K: tl.constexpr, BLOCK: tl.constexpr):
    start = tl.program_id(0).to(tl.int64) * BLOCK
    offs = start + tl.arange(0, BLOCK)
    if start + BLOCK <= n:
        _xor_block(a, b, c, d, e, offs, None, K)
    else:
        _xor_block(a, b, c, d, e, offs, offs < n, K)


def launcher(bufs, itemsize, block: int = BLOCK):
    """A step reading ``len(bufs)`` (2-5) flat buffers of equal length and
    XORing the last into each of the others in place."""
    word = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[itemsize]
    views = [b.view(word) for b in bufs]
    k = len(views)
    if not 2 <= k <= 5 or len({v.numel() for v in views}) != 1:
        raise ValueError(f"the ceiling kernel takes 2-5 buffers of one length, got "
                         f"{[v.numel() for v in views]}")
    args = views + [views[0]] * (5 - k)
    n = views[0].numel()
    grid = (triton.cdiv(n, block),)

    def step():
        if n:  # an empty grid is not a launch
            pattern[grid](*args, n, K=k, BLOCK=block)

    return step
