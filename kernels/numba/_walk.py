"""The Numba backend's jitted row walk, written once: spans, entry-point bodies.

The Python side of a launch (work split, serial or parallel, background
compiles, fork safety) is ``_launch``.

Every optimizer's kernel is the same loop nest; only the element update and
the per-row scalars differ. An optimizer's kernel file
(``kernels/numba/<name>.py``) declares:

1. its batch scalars: names for the indices of ``x``, the tuple of scalars in
   the compute type (float32, float64 for float64 tensors) that every element
   receives, and ``NX``, its length. ``x[INV_SCALE]`` is shared (:func:`grad`);
   the optimizer's own start at ``FIRST``. Switches that only change values
   (weight decay on or off, nesterov, torch.lerp's side, ...) are scalars
   too, 1.0 or 0.0, tested at run time (see "What is compiled").
2. ``_<name>_rows(table, h, rows)``, ``@njit(**HELPER)``: the
   prologue, run once per launch before the walk. It advances step counters
   and fills ``rows[row, 0..2]``, the per-row scalars (bias corrections, a
   row flag), from ``h``, a tuple of float64 host hyperparameters.
3. ``_<name>_element(j, p, g, s0, s1, s2, comp, sr, x, r)``,
   ``@njit(**HELPER)``: the update of element ``j``. ``p``/``g`` are
   the param and grad views, ``s0..s2`` the state views (table columns
   STATE0..2), None where the launcher says a state array is absent; ``r``
   is the row's ``(rows[row, 0], rows[row, 1], rows[row, 2])``. Load and
   store through ``_memory.load``/``store`` (they convert bf16/fp16), except
   the param, stored with ``_precision.store_param(p, j, old, new, comp,
   sr)`` (``comp``/``sr``: ``kahan_sum``/``stochastic_round``, None when off).
4. its two entry points, each one call of :func:`parallel` or :func:`serial`
   with the prologue, the element and ``NX`` (numba caches a kernel by its own function
   and file, so each optimizer needs jitted functions of its own: a kernel
   made by a factory, or taking the element as an argument, was never found
   in the disk cache, and the latter cost 6 us a call to dispatch);
5. the launcher, ``<name>(batch, *, <torch's hyperparameters>, grad_scale=None,
   found_inf=None, kahan_sum=False, stochastic_round=None, state_round=None)``:
   one call of :func:`_launch.run` with ``(parallel, serial, NX)``, the
   scalars, the host tuple and which states exist.

What is compiled: one specialization per storage type (of the params, and of
the state: ``has0..2`` carry its dtype), per set of state arrays present
(``has0..2``), per param-store option (Kahan, stochastic rounding), per
state store (``state_keys``: bfloat16 state rounded stochastically, see
:func:`rounded`) and per path (serial, parallel): what changes which arrays are
streamed or how they are stored. Everything else is a run-time value that
keeps torch's bits: a switch tests a loop-invariant scalar, which LLVM
if-converts to a select or unswitches, and a disabled part is skipped, never
computed with a neutral value, except where the neutral value is exact for
every input: a multiplication by 1.0 (inverse scale, decoupled decay), by
-1.0 for maximize (folded into the inverse scale), and SGD's fresh buffer
(its row's factors, see ``sgd``). Two things cost speed while this was
built, and are avoided: a load under a run-time condition (LLVM then kept
the loop scalar: load unconditionally, select after), and constants the
element needs besides the switches' scalars (LLVM reloaded them inside the
loop: the bf16 store's NaN test became ``x != x``). Measured against the
compile-time switches this replaced: the README's "Compile cost" section.

How it is compiled (``kernels/_jit.HELPER``): the element, the prologue and
every helper under them are jitted functions of their own, typed once per
signature and inlined by LLVM. Only the functions that take another as an
argument (:func:`walk`, the spans, the entry-point bodies) are inlined by
numba. A parallel entry point's ``prange`` body is one call of the thread's
chunk (:func:`chunk`, a jitted :func:`walk` made once per span and element),
so numba's parfor passes see a call, not the whole walk; the 8-bit serial
entry points call the same chunk, so the block walk compiles once for both.

The state arrays and the param-store options reach the element as Nones
when off, and their views when on, chosen by argument type (the
``optional_view`` and ``stream`` overloads): ``has0..2`` and ``kahan`` are
None or the view dtype's prototype array, ``sr_keys`` None or the keys. An
``if has is None`` branch would not do: numba prunes it at compile time
only when the argument is None, so a present array was typed as an
Optional (both branches compiled, or the load overloads failed to type).
Code behind ``if s is not None`` with ``s`` None is typed but compiles to
nothing (``_memory.load``/``store`` take None for that).
"""

from __future__ import annotations

import numpy as np
from numba import carray, njit, prange, types
from numba.extending import overload
from numba.np.unsafe.ndarray import to_fixed_tuple

from .. import columns as L
from .._jit import HELPER, address
from ._blockwise import block_len, blocks, buffers, quantized
from ._memory import BLOCK, PREFETCH_BYTES, fma, load, prefetch_block

#: The index of the batch scalar every kernel shares (``x``): the gradient's
#: factor, GradScaler's inverse scale (1.0 without one), negated for
#: ``maximize``. An optimizer's own scalars start at FIRST.
INV_SCALE, FIRST = 0, 1


# ------------------------------------------------------------------- jitted

@njit(**HELPER)
def view(table, row, col, off, n, itemsize, view_dtype):
    """Elements ``[off, off + n)`` of the tensor in column ``col`` of ``row``."""
    # view_dtype is an empty array of the view's dtype: numba types an array
    # argument in its C fast path (~0.5 us a call), a dtype class in Python
    # (~6 us, and ~27 us a step measured in a whole SGD step)
    return carray(address(table[row, col] + off * itemsize), (n,), view_dtype.dtype)


def optional_view(table, row, col, off, n, present):  # pragma: no cover
    """The state view of column ``col``, or None where ``present`` is None.

    ``present`` is the state's prototype array: the view takes its dtype and
    itemsize, so a state stored otherwise than its param (the ``state_dtype``
    option) is a specialization only where it is used. Chosen by type (the
    overload).
    """
    raise NotImplementedError


@overload(optional_view, jit_options=HELPER)
def _optional_view_impl(table, row, col, off, n, present):
    if isinstance(present, types.NoneType):
        return lambda table, row, col, off, n, present: None
    return lambda table, row, col, off, n, present: view(
        table, row, col, off, n, present.itemsize, present)


def rounded(v, state_keys, base, col):  # pragma: no cover
    """State view ``v`` as stochastic-rounding stores see it, or ``v`` itself.

    Where ``state_keys`` (the keys of state columns 0-1 and 2,
    ``reference._precision.state_key``) is not None, the tuple ``(v, key,
    base mod 2**32, shift)`` that ``_memory.load``/``store`` take: stores
    round stochastically with the 16 bits ``mix32((base + j) ^ key) >> shift``
    (``reference._precision.state_bits``).
    """
    raise NotImplementedError


@overload(rounded, jit_options=HELPER)
def _rounded_impl(v, state_keys, base, col):
    if (isinstance(v, types.NoneType) or isinstance(state_keys, types.NoneType)
            or v.dtype == types.uint8):  # (8-bit codes take the keys in _blockwise)
        return lambda v, state_keys, base, col: v
    return lambda v, state_keys, base, col: (
        v, state_keys[0] if col < 2 else state_keys[1], np.uint32(base & 0xFFFFFFFF),
        np.uint32(16 * (col % 2)))


def stream(sr_keys, base):  # pragma: no cover
    """The stochastic-rounding stream ``(k0, k1, base)``, or None where ``sr_keys`` is."""
    raise NotImplementedError


@overload(stream, jit_options=HELPER)
def _stream_impl(sr_keys, base):
    if isinstance(sr_keys, types.NoneType):
        return lambda sr_keys, base: None
    return lambda sr_keys, base: (sr_keys[0], sr_keys[1], base)


@njit(**HELPER)
def grad(g, j, x):
    """Gradient element ``j`` as the update uses it: AMP-unscaled, maximize-negated.

    One multiply by ``x[INV_SCALE]``: 1.0 or -1.0 without GradScaler, and
    ``g * 1.0`` is ``g`` and ``g * -1.0`` is ``-g``, bit for bit.
    """
    return load(g, j) * x[INV_SCALE]


@njit(**HELPER)
def decayed_grad(g, p, j, x, has_wd, wd):
    """``(gj, pj)``: element ``j``'s gradient (:func:`grad`) and param.

    Where ``has_wd`` is nonzero the gradient takes L2 weight decay,
    ``grad.add(param, alpha=wd)``: a fused multiply-add, as in torch's CPU
    kernel. ``has_wd`` and ``wd`` are the optimizer's batch scalars.
    """
    gj = grad(g, j, x)
    pj = load(p, j)
    if has_wd != 0:
        gj = fma(pj, wd, gj)
    return gj, pj


@njit(inline="always")
def plain(element, n, p, g, s0, s1, s2, comp, sr, x, r):
    """``element`` over ``n`` elements, one plain loop (the serial kernels' span).

    Absent arrays are literal Nones, so each combination compiles to a loop
    that streams only its arrays; the run-time switches in ``x`` and ``r``
    are loop-invariant. A stand-in view aliasing another array instead of a
    None made LLVM fall back to the scalar loop (bf16 Adam 17x slower).
    """
    for j in range(n):
        element(j, p, g, s0, s1, s2, comp, sr, x, r)


@njit(inline="always")
def blocked(element, n, p, g, s0, s1, s2, comp, sr, x, r):
    """:func:`plain` in blocks of ``BLOCK`` elements (the parallel kernels' span).

    Each block first prefetches the block ``PREFETCH_BYTES`` ahead in every
    array present (see ``_memory``); the block loop's fixed trip count is
    what keeps it vectorised (a ``range(o, min(o + BLOCK, n))`` inner loop
    ran 3.5x slower). The serial kernels only see batches small enough to
    sit in cache and keep the plain loop, which compiles several times
    faster: the walk takes the span as an argument, since numba did not
    prune an ``is None`` switch around the blocked loop and compiled it
    anyway.
    """
    ahead = PREFETCH_BYTES // p.itemsize
    full = n - n % BLOCK
    for o in range(0, full, BLOCK):
        prefetch_block(p, o + ahead, n)
        prefetch_block(g, o + ahead, n)
        prefetch_block(s0, o + ahead, n)  # (an absent array's prefetch is none)
        prefetch_block(s1, o + ahead, n)
        prefetch_block(s2, o + ahead, n)
        prefetch_block(comp, o + ahead, n)
        for j in range(o, o + BLOCK):
            element(j, p, g, s0, s1, s2, comp, sr, x, r)
    for j in range(full, n):
        element(j, p, g, s0, s1, s2, comp, sr, x, r)


@njit(inline="always")
def walk(table, lo, hi, itemsize, view_dtype, span, element, x, rows, has0, has1, has2,
         kahan, sr_keys, state_keys):
    """Elements ``[lo, hi)`` of the global range, row by row, as slice views.

    The rows' elements are laid end to end in ``[0, numel)`` (column START),
    which the launcher's ``bounds`` cuts into one chunk per thread. Each
    overlap of the chunk with a row is processed as views starting at
    element 0 of the overlap: ``span(element, n, p, g, s0, s1, s2, comp, sr,
    x, r)``. ``s0..s2`` are the STATE0..2 views where ``has0..2`` is not
    None (of their prototypes' dtype; :func:`rounded` where ``state_keys``
    is not None), ``comp`` the COMP view where ``kahan`` is not, ``sr`` is ``(k0, k1,
    START + off)`` where ``sr_keys`` is not (the global index of the slice's
    element 0, so that stochastic rounding draws the same bits whatever the
    thread split), each None otherwise. (A ``range(lo, hi)`` loop with a
    computed ``lo`` inside ``prange`` ran about 3x slower in the prototype
    than ``range(n)`` over a slice.)
    """
    starts = table[:, L.START]
    row = np.searchsorted(starts, lo, side="right") - 1
    while lo < hi:
        start = table[row, L.START]
        end = start + table[row, L.NUMEL]
        if end <= lo:
            row += 1
            continue
        off = lo - start
        n = min(hi, end) - lo
        p = view(table, row, L.PARAM, off, n, itemsize, view_dtype)
        g = view(table, row, L.GRAD, off, n, itemsize, view_dtype)
        s0 = rounded(optional_view(table, row, L.STATE0, off, n, has0), state_keys,
                     start + off, 0)
        s1 = rounded(optional_view(table, row, L.STATE1, off, n, has1), state_keys,
                     start + off, 1)
        s2 = rounded(optional_view(table, row, L.STATE2, off, n, has2), state_keys,
                     start + off, 2)
        comp = optional_view(table, row, L.COMP, off, n, kahan)
        sr = stream(sr_keys, start + off)
        span(element, n, p, g, s0, s1, s2, comp, sr, x, (rows[row, 0], rows[row, 1],
                                                         rows[row, 2]))
        lo += n
        row += 1


@njit(inline="always")
def walk_blocks(table, lo, hi, itemsize, view_dtype, span, element, x, rows, has0, has1,
                has2, kahan, sr_keys, state_keys):
    """:func:`walk` for 8-bit state: each chunk's edges move to block edges
    and the state views are ``_blockwise.quantized``. A copy, not a switch in
    :func:`walk`: with this logic inside it every plain kernel's parallel
    entry ran 2-4x slower (AdamW over 24 x 1M float32 elements, 51 ms
    against 27 ms, 2 threads, 2026-12-07).

    Elements ``[lo, hi)`` of the global range, row by row, as slice views.

    The rows' elements are laid end to end in ``[0, numel)`` (column START),
    which the launcher's ``bounds`` cuts into one chunk per thread. Each
    overlap of the chunk with a row is processed as views starting at
    element 0 of the overlap: ``span(element, n, p, g, s0, s1, s2, comp, sr,
    x, r)``. ``s0..s2`` are the STATE0..2 views where ``has0..2`` is not
    None (of their prototypes' dtype; :func:`rounded` where ``state_keys``
    is not None), ``comp`` the COMP view where ``kahan`` is not, ``sr`` is ``(k0, k1,
    START + off)`` where ``sr_keys`` is not (the global index of the slice's
    element 0, so that stochastic rounding draws the same bits whatever the
    thread split), each None otherwise. Where the state is 8-bit codes
    (``has0`` a uint8 prototype, ``state_bits=8``), a thread takes whole
    blocks (and the span is ``_blockwise.blocks``: :func:`serial_blocks`).
    (A ``range(lo, hi)`` loop with a
    computed ``lo`` inside ``prange`` ran about 3x slower in the prototype
    than ``range(n)`` over a slice.)
    """
    starts = table[:, L.START]
    row = np.searchsorted(starts, lo, side="right") - 1
    qb = block_len(has0)  # 1 (a constant LLVM folds away) but for 8-bit state
    bufs = buffers(has0)
    while lo < hi:
        start = table[row, L.START]
        end = start + table[row, L.NUMEL]
        if end <= lo:
            row += 1
            continue
        off = lo - start
        stop = min(hi, end) - start
        if qb > 1:
            # 8-bit state: whole blocks, each in the chunk its first element is in
            off = (off + qb - 1) // qb * qb
            stop = min((stop + qb - 1) // qb * qb, end - start)
        n = stop - off
        if n > 0:
            p = view(table, row, L.PARAM, off, n, itemsize, view_dtype)
            g = view(table, row, L.GRAD, off, n, itemsize, view_dtype)
            s0 = quantized(rounded(optional_view(table, row, L.STATE0, off, n, has0),
                                   state_keys, start + off, 0), table, row, 0, off, n, bufs,
                             state_keys, start + off)
            s1 = quantized(rounded(optional_view(table, row, L.STATE1, off, n, has1),
                                   state_keys, start + off, 1), table, row, 1, off, n, bufs,
                             state_keys, start + off)
            s2 = quantized(rounded(optional_view(table, row, L.STATE2, off, n, has2),
                                   state_keys, start + off, 2), table, row, 2, off, n, bufs,
                             state_keys, start + off)
            comp = optional_view(table, row, L.COMP, off, n, kahan)
            sr = stream(sr_keys, start + off)
            span(element, n, p, g, s0, s1, s2, comp, sr, x,
                 (rows[row, 0], rows[row, 1], rows[row, 2]))
        lo = min(hi, end)
        row += 1


_CHUNKS: dict = {}


def _chunk_function(span, element):
    """The jitted walk of one chunk with ``span`` and ``element``, made once.

    They are its globals, not its arguments: a jitted function passed to a
    compiled one is a run-time object, and numba will not disk-cache an
    entry point that passes one (it did not for ``span``/``element`` as
    arguments here). Before, the walk was inlined into the ``prange`` body:
    a fresh process's first parallel AdamW step compiled in 4.55 s, now 3.9
    s (with the helpers of ``_jit.HELPER`` too: 1.8 s), the 8-bit one in
    37-47 s, now 16 s.
    """
    fn = _CHUNKS.get((span, element))
    if fn is None:
        walker = walk_blocks if span is blocks else walk

        @njit(error_model="numpy")  # (the entry points')
        def fn(table, lo, hi, itemsize, view_dtype, x, rows, has0, has1, has2, kahan, sr_keys,
               state_keys):
            walker(table, lo, hi, itemsize, view_dtype, span, element, x, rows, has0, has1,
                   has2, kahan, sr_keys, state_keys)

        _CHUNKS[(span, element)] = fn
    return fn


def chunk(span, element, table, lo, hi, itemsize, view_dtype, x, rows, has0, has1, has2,
          kahan, sr_keys, state_keys):  # pragma: no cover
    """One thread's chunk ``[lo, hi)``: :func:`walk` (or :func:`walk_blocks`) as a call."""
    raise NotImplementedError


@overload(chunk, inline="always")
def _chunk_impl(span, element, table, lo, hi, itemsize, view_dtype, x, rows, has0, has1, has2,
                kahan, sr_keys, state_keys):
    fn = _chunk_function(span.dispatcher, element.dispatcher)

    def impl(span, element, table, lo, hi, itemsize, view_dtype, x, rows, has0, has1, has2,
             kahan, sr_keys, state_keys):
        fn(table, lo, hi, itemsize, view_dtype, x, rows, has0, has1, has2, kahan, sr_keys,
           state_keys)
    return impl


@njit(inline="always")
def parallel(prologue, element, nx, table, bounds, itemsize, view_dtype, h, xa, rows, has0,
             has1, has2, kahan, sr_keys, state_keys):
    """A parallel entry point's body: the prologue, then one chunk per thread.

    ``nx`` (a module constant) is the length of the batch scalars ``xa``,
    made a tuple here: loop-invariant values LLVM keeps in registers, where
    loads from an array that may alias the views would be repeated.
    """
    x = to_fixed_tuple(xa, nx)
    prologue(table, h, rows)
    for c in prange(len(bounds) - 1):
        chunk(blocked, element, table, bounds[c], bounds[c + 1], itemsize, view_dtype, x,
              rows, has0, has1, has2, kahan, sr_keys, state_keys)


@njit(inline="always")
def serial(prologue, element, nx, table, bounds, itemsize, view_dtype, h, xa, rows, has0,
           has1, has2, kahan, sr_keys, state_keys):
    """A serial entry point's body: the prologue, then the whole range."""
    x = to_fixed_tuple(xa, nx)
    prologue(table, h, rows)
    walk(table, bounds[0], bounds[-1], itemsize, view_dtype, plain, element, x, rows,
         has0, has1, has2, kahan, sr_keys, state_keys)


@njit(inline="always")
def parallel_blocks(prologue, element, nx, table, bounds, itemsize, view_dtype, h, xa, rows,
                    has0, has1, has2, kahan, sr_keys, state_keys):
    """:func:`parallel` for 8-bit state (``state_bits=8``): the span is
    ``_blockwise.blocks``. Entry points of their own (an optimizer's
    ``<name>_blocks_parallel``/``_serial``), chosen by the launcher: a span
    chosen by type inside the walk (an overload) lost the Kahan buffer's
    stores of the other kernels (numba 0.68; seen in
    tests/test_precision_kernels.py)."""
    x = to_fixed_tuple(xa, nx)
    prologue(table, h, rows)
    for c in prange(len(bounds) - 1):
        chunk(blocks, element, table, bounds[c], bounds[c + 1], itemsize, view_dtype, x,
              rows, has0, has1, has2, kahan, sr_keys, state_keys)


@njit(inline="always")
def serial_blocks(prologue, element, nx, table, bounds, itemsize, view_dtype, h, xa, rows,
                  has0, has1, has2, kahan, sr_keys, state_keys):
    """:func:`serial` for 8-bit state (see :func:`parallel_blocks`)."""
    x = to_fixed_tuple(xa, nx)
    prologue(table, h, rows)
    chunk(blocks, element, table, bounds[0], bounds[-1], itemsize, view_dtype, x, rows,
          has0, has1, has2, kahan, sr_keys, state_keys)


@njit(**HELPER)
def no_rows(table, h, rows):
    """The prologue of an optimizer without per-row scalars or steps."""
