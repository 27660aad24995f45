"""The Numba backend's shared machinery: work split, row walk, plain and blocked spans.

Every optimizer's kernel is the same loop nest; only the element update
differs. Written once here:

* launcher side (Python): :func:`_plan` (chunk edges ``bounds``, parallel or
  serial, the view dtype and compute type of a batch), :func:`_amp`
  (GradScaler's skip and inverse scale), :func:`_opt` / :func:`_on` (the
  None-valued compile-time switches), :func:`_store_options` (the param
  store's ``kahan_sum`` / ``stochastic_round`` switches), and
  :data:`_PARALLEL`, the lock around every parallel region, and
  :func:`launch`, which calls an entry point (the serial one while the
  parallel one compiles in the background);
* jitted side: :func:`walk` (a chunk ``[lo, hi)`` of the global element range
  -> one slice per overlapped row), :func:`plain` (one loop over a slice, for
  the serial kernels) and :func:`blocked` (the same in prefetching blocks, for
  the parallel ones).

Adding an optimizer's kernel (``kernels/numba/<name>.py``) takes four parts:

1. ``_<name>_element(j, p, g, s0, s1, s2, comp, sr, x0, ..., x11)``,
   ``@njit(inline="always")``: the update of element ``j``. ``p``/``g`` are
   the param and grad views, ``s0..s2`` the state views (table columns
   STATE0..STATE2; None when the optimizer or its switches do not use them),
   ``x0..x11`` its scalars. Load and store through ``_memory.load`` /
   ``store`` (they convert bf16/fp16), except the param, which is stored
   with ``_precision.store_param(p, j, old, new, comp, sr)``: ``comp`` (the
   Kahan compensation view, column COMP) and ``sr`` (the stochastic
   rounding stream) come from :func:`walk`, None when off. :func:`grad`
   gives the AMP-unscaled, maximize-negated gradient.
2. ``_<name>_row(table, row, off, n, itemsize, view_dtype, span, element, p,
   g, comp, sr, x0, ..., x11)``, ``@njit(inline="always")``: per row, make
   the state views it needs (:func:`view`), pick anything that varies by row
   (a flag, a scalar from a per-row array passed in a slot) and call
   ``span(element, n, p, g, s0, s1, s2, comp, sr, y0, ..., y11)``.
3. the jitted entry points, ``@njit(parallel=True, cache=True,
   error_model="numpy")`` ``<name>_parallel`` calling ``walk(...)`` under
   ``prange`` over ``bounds`` with :func:`blocked`, and ``@njit(cache=True,
   error_model="numpy")`` ``<name>_serial`` calling it once with
   :func:`plain`; both take the store switches ``kahan, sr_keys`` last and
   hand them to ``walk``;
4. the launcher ``<name>(batch, *, ..., kahan_sum=False,
   stochastic_round=None)``: ``_amp``, ``_plan``, cast the scalars to the
   compute type and call :func:`launch` with both entry points and the
   arguments, ``*_store_options(...)`` last.

Why twelve positional slots rather than a tuple of scalars: a switch that
is off is passed as None, and numba compiles the code behind ``if x is not
None`` away only when ``x`` can be traced, through the inlined calls, back
to an argument of the entry point or a literal None (numba's dead-branch
pruning); a value unpacked from a tuple, or passed as ``*args`` (which the
inliner refuses), cannot, and the untaken branch then fails to type. A
non-inlined element that takes ``*args`` prunes, but stays a call and the
loop no longer vectorises (numba 0.68: no packed instructions, about 2x slower
on a 4M-element axpy). Unused slots take None; scalars that are never None
may share a slot as a tuple.

Measured against the per-optimizer walks and spans this replaced (the same
process, old and new entry points alternated, 161 resnet50-shaped tensors
of 25.6M elements, 2 threads, on the shared 2-core dev VM; median of 60
paired new/old time ratios): SGD momentum fp32 1.01 (12.0 ms), bf16 1.00
(16.0 ms); AdamW fp32 1.00 (24.0 ms), bf16 1.01 (38.1 ms): within the
noise. The entry points compile to the same machine code as before (equal
assembly length and packed-vector instruction counts for bf16 SGD and
Adam, parallel and serial), compile no slower (one fresh-cache compile
each), and give results bit for bit equal to the old kernels' (all four
storage types, parallel and serial, the switches on and off).
"""

from __future__ import annotations

import contextlib
import functools
import os
import threading

import numba
import numpy as np
import torch
from numba import carray, njit

from .. import layout as L
from ..reference._precision import keys
from ._memory import (BLOCK, PREFETCH_BYTES, VIEW_DTYPES, address, load,
                      prefetch_block)

# ------------------------------------------------------------------ launchers

#: Batches smaller than this run on one thread: below it the parallel region's
#: start-up costs more than the work. Provisional; measured in benchmarks/.
SERIAL_BELOW = 1 << 15
#: Held around every parallel kernel: numba's default "workqueue" threading
#: layer aborts the process when two Python threads start parallel regions
#: at once (optimizers stepped from several threads).
_PARALLEL = threading.Lock()
_NO_LOCK = contextlib.nullcontext()
#: Chunk edges fall on multiples of this many elements (a 64-byte line for
#: float32 and wider) so that two threads rarely write the same cache line.
ALIGN = 64


@functools.lru_cache(maxsize=256)
def _bounds(numel: int, chunks: int) -> np.ndarray:
    edges = (np.arange(chunks + 1, dtype=np.int64) * numel) // chunks
    edges = (edges // ALIGN) * ALIGN
    edges[-1] = numel
    edges = np.unique(edges)
    edges.setflags(write=False)
    return edges


#: an empty array of each view dtype: how the kernels are told the dtype
_PROTO = {name: np.empty(0, dtype=view) for name, view in VIEW_DTYPES.items()}


def _plan(batch):
    """(bounds, parallel?, view dtype prototype, itemsize, compute type) of a batch."""
    name = str(batch.dtype).removeprefix("torch.")
    view = VIEW_DTYPES[name]
    compute = np.float64 if view is np.float64 else np.float32
    if batch.numel < SERIAL_BELOW:
        return _bounds(batch.numel, 1), False, _PROTO[name], np.dtype(view).itemsize, compute
    chunks = numba.get_num_threads()
    return _bounds(batch.numel, chunks), True, _PROTO[name], np.dtype(view).itemsize, compute


#: ``FUSED_OPTIM_WARMUP=0``: a step compiles the kernel it needs, there and
#: then (tests and benchmarks: nothing compiles behind their back).
WARMUP_ENV = "FUSED_OPTIM_WARMUP"
_READY: set = set()  # (parallel entry point, argument types) compiled or loaded
_PENDING: dict = {}  # the same keys -> the thread compiling them
_PENDING_LOCK = threading.Lock()


def background() -> bool:
    """Whether kernels may compile in the background (``FUSED_OPTIM_WARMUP``)."""
    return os.environ.get(WARMUP_ENV, "1").strip() != "0"


def launch(parallel_fn, serial_fn, parallel, args) -> None:
    """Run a batch through the parallel entry point, or the serial one.

    A parallel specialization compiles in several times the serial one's
    time (about 12 s against 3 s for AdamW in float32 on the 2-core dev VM,
    ``fused-optim bench --cold-start``), and both give the same bits: each
    element's arithmetic is the same whatever the split. So, where
    :func:`background` allows, a parallel batch whose specialization is
    neither compiled nor in the disk cache runs serially (compiling that
    first, in the step) and then starts a background thread compiling the
    parallel one; later steps take it once it is there (a process that ends
    first waits for it at exit). Numba's compiler
    lock keeps one compilation at a time (hence serial first); calling an
    entry point already compiled for its argument types takes no lock.
    """
    if not parallel:
        serial_fn(*args)
        return
    key = (parallel_fn, args[3].dtype.char, tuple(map(type, args)))
    if key in _READY or _parallel_ready(parallel_fn, key, args):
        with _PARALLEL:
            parallel_fn(*args)
        return
    serial_fn(*args)
    with _PENDING_LOCK:
        if key not in _PENDING:
            types = tuple(parallel_fn.typeof_pyval(a) for a in args)
            thread = _PENDING[key] = threading.Thread(
                # not a daemon: a process ending while LLVM compiles in a
                # daemon thread aborts ("terminate called without an active
                # exception"); the exit waits for the compile instead, which
                # then is in the disk cache for the next process
                target=_compile_quietly, args=(parallel_fn, types), daemon=False,
                name="fused_optim-numba-compile")
            thread.start()


def _parallel_ready(fn, key, args) -> bool:
    """Whether ``fn`` is compiled (or now loaded from the disk cache) for ``args``."""
    if not background():
        _READY.add(key)  # the call compiles it
        return True
    with _PENDING_LOCK:
        thread = _PENDING.get(key)
        if thread is not None:
            if thread.is_alive():
                return False
            del _PENDING[key]
            _READY.add(key)  # (had it failed, the call compiles it and raises the error)
            return True
    types = tuple(fn.typeof_pyval(a) for a in args)
    if types in fn.overloads or _load_cached(fn, types):
        _READY.add(key)
        return True
    return False


def _load_cached(fn, types) -> bool:
    """Load ``fn``'s specialization for ``types`` from Numba's disk cache, if
    there: a warm cache needs no serial detour. Numba has no public "load but
    do not compile"; this is its ``Dispatcher.compile`` up to the cache hit
    (numba 0.68). Anything unexpected answers True: the call then compiles
    or loads it itself, as without the background."""
    try:
        from numba.core.compiler_lock import global_compiler_lock

        with global_compiler_lock:
            if types in fn.overloads:
                return True
            cres = fn._cache.load_overload(types, fn.targetctx)
            if cres is None:
                return False
            fn.targetctx.insert_user_function(cres.entry_point, cres.fndesc, [cres.library])
            fn.add_overload(cres)
            return True
    except Exception:  # noqa: BLE001 - see the docstring
        return True


def _compile_quietly(fn, types) -> None:
    try:
        fn.compile(types)
    except Exception:  # noqa: BLE001 - the step that needs it compiles it and raises
        pass


def wait_for_background(timeout: float | None = None) -> None:
    """Join every background compilation started so far."""
    with _PENDING_LOCK:
        threads = list(_PENDING.values())
    for t in threads:
        t.join(timeout)


def _on(flag):
    """A compile-time switch for the kernels: True, or None for off."""
    return True if flag else None


def _opt(c, value, used):
    """A scalar in the compute type ``c``, or None where the kernel omits it."""
    return c(value) if used else None


def _store_options(batch, kahan_sum, stochastic_round):
    """(kahan, sr_keys): the param store's compile-time switches for a batch.

    ``kahan`` True or None; ``sr_keys`` None or the stream keys ``(k0, k1)``
    (uint32) of ``stochastic_round = (seed, counter, salt)``. Both None for
    float32/float64 batches, which the options do not touch.
    """
    if batch.dtype not in (torch.bfloat16, torch.float16):
        return None, None
    sr_keys = None
    if stochastic_round is not None:
        seed, counter, salt = stochastic_round
        k0, k1 = keys(int(seed), int(counter), int(salt))
        sr_keys = (np.uint32(k0), np.uint32(k1))
    return (True if kahan_sum else None), sr_keys


def _amp(grad_scale, found_inf):
    """(skip?, inverse scale) from GradScaler's CPU tensors; no device sync here.

    The inverse is taken in float32 as GradScaler's own unscale_ does, so the
    result equals unscale_ followed by a plain step.
    """
    if found_inf is not None and float(found_inf) != 0.0:
        return True, 1.0
    if grad_scale is None:
        return False, 1.0
    return False, np.float32(1.0) / np.float32(float(grad_scale))


# ------------------------------------------------------------------- jitted

@njit(inline="always")
def view(table, row, col, off, n, itemsize, view_dtype):
    """Elements ``[off, off + n)`` of the tensor in column ``col`` of ``row``."""
    # view_dtype is an empty array of the view's dtype: numba types an array
    # argument in its C fast path (~0.5 us a call), a dtype class in Python
    # (~6 us, and ~27 us a step measured in a whole SGD step)
    return carray(address(table[row, col] + off * itemsize), (n,), view_dtype.dtype)


@njit(inline="always")
def grad(g, j, inv_scale, maximize):
    """Gradient element ``j`` as the update uses it: AMP-unscaled, maximize-negated."""
    gj = load(g, j)
    if inv_scale is not None:
        gj = gj * inv_scale
    if maximize is not None:
        gj = -gj
    return gj


@njit(inline="always")
def plain(element, n, p, g, s0, s1, s2, s3, sr, x0, x1, x2, x3, x4, x5, x6, x7, x8,
          x9, x10, x11):
    """``element`` over ``n`` elements, one plain loop (the serial kernels' span).

    Every optional argument is None when off, so each combination compiles
    to a straight-line loop that LLVM vectorises. Measured on 25.6M fp32
    elements: runtime flags ran at 0.89 of the read/write-pattern ceiling,
    compile-time ones at 0.98; a stand-in view aliasing another array made
    LLVM fall back to the scalar loop (bf16 Adam 17x slower).
    """
    for j in range(n):
        element(j, p, g, s0, s1, s2, s3, sr, x0, x1, x2, x3, x4, x5, x6, x7, x8, x9, x10,
                x11)


@njit(inline="always")
def blocked(element, n, p, g, s0, s1, s2, s3, sr, x0, x1, x2, x3, x4, x5, x6, x7,
            x8, x9, x10, x11):
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
        if s0 is not None:
            prefetch_block(s0, o + ahead, n)
        if s1 is not None:
            prefetch_block(s1, o + ahead, n)
        if s2 is not None:
            prefetch_block(s2, o + ahead, n)
        if s3 is not None:
            prefetch_block(s3, o + ahead, n)
        for j in range(o, o + BLOCK):
            element(j, p, g, s0, s1, s2, s3, sr, x0, x1, x2, x3, x4, x5, x6, x7, x8,
                    x9, x10, x11)
    for j in range(full, n):
        element(j, p, g, s0, s1, s2, s3, sr, x0, x1, x2, x3, x4, x5, x6, x7, x8, x9,
                x10, x11)


@njit(inline="always")
def walk(table, lo, hi, itemsize, view_dtype, row_fn, span, element, kahan, sr_keys,
         x0, x1, x2, x3, x4, x5, x6, x7, x8, x9, x10, x11):
    """Elements ``[lo, hi)`` of the global range, row by row, as slice views.

    The rows' elements are laid end to end in ``[0, numel)`` (column START),
    which the launcher's ``bounds`` cuts into one chunk per thread. Each
    overlap of the chunk with a row is processed as a view starting at
    element 0 of the overlap: ``row_fn(table, row, off, n, itemsize,
    view_dtype, span, element, p, g, comp, sr, x0, ..., x11)`` with the param
    and grad views ``p``, ``g``; ``comp`` is the row's COMP view when
    ``kahan`` is on, ``sr`` is ``(k0, k1, START + off)`` when ``sr_keys`` is
    (the global index of the slice's element 0, so that stochastic rounding
    draws the same bits whatever the thread split), each a literal None
    otherwise. (A ``range(lo, hi)`` loop with a computed ``lo``
    inside ``prange`` ran about 3x slower in the prototype than ``range(n)``
    over a slice.)
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
        # the param store's options (see _precision.store_param): literal
        # Nones when off, so that each combination compiles on its own
        if kahan is None:
            if sr_keys is None:
                row_fn(table, row, off, n, itemsize, view_dtype, span, element, p, g,
                       None, None, x0, x1, x2, x3, x4, x5, x6, x7, x8, x9, x10, x11)
            else:
                row_fn(table, row, off, n, itemsize, view_dtype, span, element, p, g,
                       None, (sr_keys[0], sr_keys[1], start + off),
                       x0, x1, x2, x3, x4, x5, x6, x7, x8, x9, x10, x11)
        else:
            comp = view(table, row, L.COMP, off, n, itemsize, view_dtype)
            if sr_keys is None:
                row_fn(table, row, off, n, itemsize, view_dtype, span, element, p, g,
                       comp, None, x0, x1, x2, x3, x4, x5, x6, x7, x8, x9, x10, x11)
            else:
                row_fn(table, row, off, n, itemsize, view_dtype, span, element, p, g,
                       comp, (sr_keys[0], sr_keys[1], start + off),
                       x0, x1, x2, x3, x4, x5, x6, x7, x8, x9, x10, x11)
        lo += n
        row += 1
