"""Memory-traffic ceiling for the optimizer kernels: their access pattern, no math.

``pattern`` reads ``k`` arrays and writes ``m = k - 1`` of them back in place
(the last array is read-only, like the gradient), element by element in one
fused loop, over tensors laid out exactly like an optimizer's: one row per
tensor, their elements end to end in one global range that ``bounds`` splits
evenly across threads. The benchmark times it beside the optimizers on the
same tensor sizes, so "percent of ceiling" compares like with like.

Why not a copy: a copy writes lines it never read, which costs a
read-for-ownership on top of the counted bytes, while an optimizer writes back
lines it has just read. On the 2-core dev VM (Xeon, 25.6M float32 elements
per array, 2 threads, counted bytes, medians of 20 interleaved runs):
``torch.Tensor.copy_`` 20.0 GB/s, this kernel 37.8 GB/s reading 3 / writing
2 and 40.5 GB/s reading 4 / writing 3. (The VM's bandwidth drifts by up to
2x over a day; compare figures from one run only.)

Elements are viewed as unsigned integers of the tensors' item size and
combined with XOR: the traffic of the real dtype, with no float arithmetic
that could reach denormals or NaN over thousands of repetitions.

=======  ====  ====================================  =========================
k        m     arrays (in order)                      stands for
=======  ====  ====================================  =========================
2        1     p, g                                   SGD without momentum
3        2     p, buf, g                              SGD with momentum
4        3     p, m, v, g                             Adam, AdamW
5        4     p, m, v, vmax, g                       Adam with amsgrad
=======  ====  ====================================  =========================
"""

from __future__ import annotations

import numba
import numpy as np
from numba import njit, types
from numba.extending import overload

from .. import columns as L
from .._jit import HELPER, light_loads
from ._walk import no_rows, parallel

__all__ = ["PATTERNS", "NUMEL", "START", "NCOLS", "make_table", "split", "pattern",
           "word_dtype"]

#: Supported (reads, writes).
PATTERNS = ((2, 1), (3, 2), (4, 3), (5, 4))
#: The optimizers' table layout (``kernels/columns.py``), walked by the same
#: code (``_walk``): a row's read-only array sits where the walk finds the
#: gradient, its written ones where it finds the param and the states.
NUMEL = L.NUMEL
START = L.START
NCOLS = L.NCOLS
_WRITTEN = (L.PARAM, L.STATE0, L.STATE1, L.STATE2)

_WORDS = {1: np.uint8, 2: np.uint16, 4: np.uint32, 8: np.uint64}
_PROTO = {size: np.empty(0, dtype=w) for size, w in _WORDS.items()}


def word_dtype(itemsize: int):
    """The unsigned integer numpy type of ``itemsize`` bytes."""
    try:
        return _WORDS[itemsize]
    except KeyError:
        raise ValueError(f"no integer view for an item size of {itemsize} bytes") from None


def make_table(addresses, numels) -> np.ndarray:
    """Build the row table.

    Args:
        addresses: per row, the byte addresses of its ``k`` arrays, written
            arrays first and the read-only one last.
        numels: per row, the element count.

    Returns:
        int64 array ``[rows, NCOLS]``.
    """
    numels = [int(n) for n in numels]
    table = np.zeros((len(numels), NCOLS), dtype=np.int64)
    start = 0
    for r, (addrs, n) in enumerate(zip(addresses, numels)):
        addrs = [int(a) for a in addrs]
        if addrs:
            table[r, L.GRAD] = addrs[-1]
            for c, a in zip(_WRITTEN, addrs[:-1]):
                table[r, c] = a
        table[r, NUMEL] = n
        table[r, START] = start
        start += n
    return table


def split(numel: int, chunks: int | None = None) -> np.ndarray:
    """Chunk edges that split ``numel`` elements evenly into ``chunks`` parts.

    Args:
        numel: total elements.
        chunks: parts; default ``numba.get_num_threads()``.

    Returns:
        int64 array of ``chunks + 1`` edges from 0 to ``numel``.
    """
    chunks = chunks or numba.get_num_threads()
    return (np.arange(chunks + 1, dtype=np.int64) * numel) // chunks


@njit(**HELPER)
def _xor_element(j, w0, src, w1, w2, w3, _comp, _sr, _x, _r):
    """XOR ``src[j]`` into ``w0[j]`` and each of ``w1..w3`` that is not None.

    Run by the optimizer kernels' span (``_walk.blocked``: blocks of BLOCK
    elements, each prefetching the block PREFETCH_BYTES ahead in every
    array, then a tail). With a plain loop this "ceiling" ran 5-7% slower
    than the prefetching SGD kernel on resnet50-shaped lists. Absent arrays
    are None, chosen by type at compile time, as the optimizers' absent
    states are: a loop over the arrays inside the element loop would not
    vectorise.
    """
    x = src[j]
    w0[j] = w0[j] ^ x
    _xor_into(w1, j, x)
    _xor_into(w2, j, x)
    _xor_into(w3, j, x)


def _xor_into(w, j, x):  # pragma: no cover - the overload below
    raise NotImplementedError


@overload(_xor_into, jit_options=HELPER)
def _xor_into_impl(w, j, x):
    if isinstance(w, types.NoneType):
        return lambda w, j, x: None

    def impl(w, j, x):
        w[j] = w[j] ^ x
    return impl


_NO_X = np.empty(0, dtype=np.float32)  # the batch scalars: none


@njit(parallel=True, cache=True)
def _pattern(table, bounds, itemsize, word, rows, has0, has1, has2):
    # word: an empty array of the word type (cheap for numba to type); the
    # param store's options (Kahan, stochastic rounding) and the state's
    # stochastic rounding stay None
    parallel(no_rows, _xor_element, 0, table, bounds, itemsize, word, (), _NO_X, rows, has0,
             has1, has2, None, None, None)


def pattern(table, bounds, itemsize: int, k: int, m: int) -> None:
    """Read ``k`` arrays and write ``m`` of them back in place, per table row.

    Args:
        table: from :func:`make_table`; every address must point at
            ``NUMEL * itemsize`` writable bytes (the last array of a row is
            only read).
        bounds: from :func:`split`.
        itemsize: bytes per element of the arrays.
        k: arrays read.
        m: arrays written; must be ``k - 1`` (see ``PATTERNS``).
    """
    if (k, m) not in PATTERNS:
        raise ValueError(f"unsupported pattern: read {k}, write {m}; "
                         f"supported (read, write): {PATTERNS}")
    if table.shape[0] == 0:
        return
    word_dtype(itemsize)  # the error for a size without a word type
    rows = np.zeros((table.shape[0], 3), dtype=np.float32)
    _pattern(table, bounds, itemsize, _PROTO[itemsize], rows,
             *(_PROTO[itemsize] if k > i else None for i in (2, 3, 4)))


light_loads(vars())  # warm-cache loads without Numba's full refresh
