"""The Numba backend's launcher: one optimizer's kernel over a batch, in place.

:func:`run` is every kernel file's launcher body (see ``_walk`` for what a
kernel file declares): GradScaler's skip and inverse scale, the batch
scalars, the work split (:data:`SERIAL_BELOW`, chunk bounds), and
:func:`launch`, which picks the serial or parallel entry point and, on a cold
cache, compiles the parallel one in the background while the serial one
runs. Fork safety (``os.register_at_fork``) lives here too.
"""

from __future__ import annotations

import functools
import os
import threading

import numba
import numpy as np
import torch

from ..reference._precision import keys, state_key
from ._memory import VIEW_DTYPES

#: Batches smaller than this run on one thread: below it the parallel region's
#: start-up costs more than the work. Provisional; measured in benchmarks/.
SERIAL_BELOW = 1 << 15
#: Held around every parallel kernel: numba's default "workqueue" threading
#: layer aborts the process when two Python threads start parallel regions
#: at once (optimizers stepped from several threads).
_PARALLEL = threading.Lock()
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


#: torch dtype -> (view dtype prototype, itemsize, compute type)
_STORAGE = {getattr(torch, name): (_PROTO[name], np.dtype(view).itemsize,
                                   np.float64 if view is np.float64 else np.float32)
            for name, view in VIEW_DTYPES.items()}


#: Set in a child forked from this process. Numba's "omp" threading layer
#: (GNU OpenMP, its default here) terminates a forked child that starts a
#: parallel region once the parent had started the layer ("fork() called
#: from a process already using GNU OpenMP, this is unsafe"): seen with a
#: ``multiprocessing`` fork child stepping a batch above SERIAL_BELOW, issue
#: 29. So a forked child runs every batch serially: the same bits, one thread
#: (what torch asks of a forked child too: a DataLoader worker runs torch on
#: one thread, and torch's own OpenMP hangs in a child otherwise).
_FORKED = False


def _forked() -> None:
    # and the child has none of the parent's other threads: a lock one of
    # them held at the fork would stay held
    global _FORKED, _PARALLEL, _PENDING_LOCK
    _FORKED, _PARALLEL, _PENDING_LOCK = True, threading.Lock(), threading.Lock()
    _PENDING.clear()


os.register_at_fork(after_in_child=_forked)


def _plan(batch):
    """(bounds, parallel?, view dtype prototype, itemsize, compute type) of a batch."""
    proto, itemsize, compute = _STORAGE[batch.dtype]
    if batch.numel < SERIAL_BELOW or _FORKED:
        return _bounds(batch.numel, 1), False, proto, itemsize, compute
    return _bounds(batch.numel, numba.get_num_threads()), True, proto, itemsize, compute


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
    time, and both give the same bits (after issue 24: 76.0 s for the 18
    parallel specializations of every ``tests/optim_db.py`` configuration in
    float32 and bfloat16, against 21.4 s for the 18 serial ones, about 4.2 s
    and 1.2 s each, ``python benchmarks/compile_cost.py``, 2-core VM,
    2026-12-07): each
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
        threads = [t for t in _PENDING.values() if t is not threading.current_thread()]
    for t in threads:
        t.join(timeout)


# A fork while a background compile holds Numba's compiler lock leaves it
# held in the child, by a thread the child does not have: its first compile
# would wait forever (issue 29). So a fork waits for them.
os.register_at_fork(before=wait_for_background)


def _store_options(batch, kahan_sum, stochastic_round):
    """(kahan, sr_keys): the param store's compile-time switches for a batch.

    ``kahan`` the view dtype's prototype array (present) or None; ``sr_keys``
    None or the stream keys ``(k0, k1)`` (uint32) of ``stochastic_round = (seed, counter, salt)``. Both None for
    float32/float64 batches, which the options do not touch.
    """
    if batch.dtype not in (torch.bfloat16, torch.float16):
        return None, None
    sr_keys = None
    if stochastic_round is not None:
        seed, counter, salt = stochastic_round
        k0, k1 = keys(int(seed), int(counter), int(salt))
        sr_keys = (np.uint32(k0), np.uint32(k1))
    return (_STORAGE[batch.dtype][0] if kahan_sum else None), sr_keys


#: the prototype of 8-bit state (``state_bits=8``): uint8 codes, see ``_blockwise``
_CODES = np.empty(0, dtype=np.uint8)


def _state_keys(batch, state_round):
    """None, or the keys (uint32) of state columns 0-1 and 2 of ``state_round =
    (seed, counter, salt)``: the bfloat16 state stores' stochastic rounding
    (``_walk.rounded``, ``reference._precision.state_key``)."""
    if state_round is None:
        return None
    if batch.state_dtype not in (torch.bfloat16, torch.uint8):
        raise ValueError(f"state_round stores bfloat16 or 8-bit state, not {batch.state_dtype}")
    seed, counter, salt = state_round
    k0, k1 = keys(int(seed), int(counter), int(salt))
    return np.uint32(state_key(k0, k1, 0)), np.uint32(state_key(k0, k1, 2))


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


def run(batch, kernel, scalars, *, maximize, host=(), states=(False, False, False),
        grad_scale=None, found_inf=None, kahan_sum=False, stochastic_round=None,
        state_round=None) -> None:
    """Launch one optimizer's kernel over every row of ``batch``, in place.

    ``kernel`` is its ``(parallel, serial, NX)``: the entry points and the
    length of ``x``; ``scalars(c)`` gives its own batch scalars
    (``x[_walk.FIRST:]``), stored in the compute type ``c``; ``host`` the Python
    floats its prologue reads (an int among them would type the tuple
    otherwise and compile a specialization of its own); ``states`` which of STATE0..2 exist (the
    compile-time part). With ``found_inf`` nonzero nothing is written, steps
    included. The state views take ``batch.state_dtype``; ``state_round``
    rounds their stores stochastically (:func:`_state_keys`).
    """
    skip, inv_scale = _amp(grad_scale, found_inf)
    if skip or batch.table is None or batch.table.shape[0] == 0:
        return
    bounds, par, view_dtype, itemsize, c = _plan(batch)
    # -(g * s) and g * -s are the same bits (the product's magnitude rounds
    # alike whatever its sign); folding maximize into the factor saved a
    # compare and blend per element. x travels as an array (a tuple of numpy
    # scalars took 0.7 us more to build and type) and becomes a tuple of
    # NX scalars in the kernel.
    x = np.array((-inv_scale if maximize else inv_scale, *scalars(c)), dtype=c)
    if len(x) != kernel[2]:
        raise ValueError(f"{len(x)} batch scalars for a kernel that takes {kernel[2]}")
    s0, s1, s2 = states
    state = _CODES if batch.state_dtype == torch.uint8 else _STORAGE[batch.state_dtype][0]
    launch(kernel[0], kernel[1], par, (
        batch.table, bounds, itemsize, view_dtype, host, x,
        np.empty((batch.table.shape[0], 3), dtype=c), state if s0 else None,
        state if s1 else None, state if s2 else None,
        *_store_options(batch, kahan_sum, stochastic_round), _state_keys(batch, state_round)))
