"""How the Triton backend launches an optimizer's kernels: written once for all of them.

The launcher owns the grid. A batch's rows are cut into ``BLOCK``-element
chunks, one program each; a block map (``int32 [programs, 2]``: row, chunk
index) tells a program where it works, and a device copy of ``batch.table``
tells it the addresses.

Here: :func:`launch`, the one launcher body every optimizer's ``<name>(batch,
...)`` calls (the precision options, host- or device-side step counters,
the launch prologue, one update launch per alignment class); the prologue
(:func:`_prologue`: table and block maps to the device, the hyperparameter
upload, alignment classes, AMP tensors, the storage type's constexprs); the
device-buffer cache; and the checks of host-side step counters, whose
arithmetic is ``kernels/steps.py``'s.

Host to device traffic per call is at most three small copies, each skipped
when an identical one is cached (see "device buffers" below): the address
table with its block maps, and the float64 hyperparameter buffer (with
host-side steps it changes every step). Copies go through pinned memory
with ``non_blocking=True``: a pageable copy would make the host wait for all
queued GPU work, e.g. the backward pass.
"""

from __future__ import annotations

import contextlib
import threading

import numpy as np
import torch
import triton
import triton.language as tl

from .. import columns as L
from ..contract import interpreted

#: Elements per program: the usual Triton elementwise choice, 4 warps x 32
#: lanes x 8 elements, so two 128-bit accesses per lane and tensor for 4-byte
#: types. Provisional: this backend was written without a GPU and the value is
#: not yet measured. A row's tail, and every tensor smaller than this, leaves
#: part of a program idle, which matters only for models of many tiny
#: tensors. Read at every call, so tests can lower it to exercise rows that
#: span many programs.
BLOCK = 1024
#: Warps per program (Triton's default).
NUM_WARPS = 4


def num_warps(dtype: torch.dtype, aligned: bool, tail: bool) -> int:
    """Warps per program of an update launch (one alignment class of a bucket).

    8 (4 elements per thread instead of 8) for unaligned float64 only: with
    4, ptxas spilled 8 bytes there in Adam on sm_90 at 128 registers (triton
    3.9, ``make compile-check``); with 8, 72 registers and no spill. Not
    wider: aligned float64 then spilled on sm_80 instead, and 8 warps would
    leave 16-bit types 8 bytes per thread, too few for 128-bit accesses.
    """
    return 2 * NUM_WARPS if dtype == torch.float64 and not aligned else NUM_WARPS


_ITEMSIZE = {torch.float64: 8, torch.float32: 4, torch.float16: 2, torch.bfloat16: 2}

#: Pointer element type per storage dtype; bfloat16 travels as its uint16 bits.
_ELEM = {
    torch.float64: tl.float64,
    torch.float32: tl.float32,
    torch.float16: tl.float16,
    torch.bfloat16: tl.uint16,
    torch.uint8: tl.uint8,  # 8-bit state's codes (state_bits=8)
}


# ------------------------------------------------------------ device buffers
#
# What a launch reads besides the tensors themselves (the address table, the
# block maps, the hyperparameters, Adam's per-row scalars) lives in device
# buffers. They are kept per kernel unit of the caller's plan
# (``batch.cache``, a dict this module owns) rather than in a global cache,
# because a CUDA graph captured over a step bakes their addresses in:
#
# * R1. A cached buffer is keyed on the exact bytes it was copied from, so a
#   hit is as fresh as an upload. Buffers are never written after their
#   upload (the per-row scalars are rewritten by every step's first kernel,
#   before the update reads them, on the same stream).
# * R2. Every buffer a step uses while a graph is being captured is handed to
#   ``batch.retain``, which the optimizer keeps for its lifetime: a later
#   eager step that replaces the unit's entry, or a rebuilt plan, drops the
#   cache's reference, never the graph's. (Without an owner, e.g. the
#   kernel-level API, such buffers are kept for the process's lifetime.)
# * R3. A buffer made during capture is never cached: its upload runs only
#   when the graph replays, so an eager step must not read it. Its pinned
#   host source is retained too, since each replay copies from it again, and
#   is never written again: it is a fresh slice of a pinned arena that eager
#   steps set aside in the unit (``pin_memory()`` mid-capture fails on some
#   torch versions, whose host allocator queries events), carved forward
#   only.


def _capturing(device: torch.device) -> bool:
    return device.type == "cuda" and torch.cuda.is_current_stream_capturing()


#: buffers captured into graphs by callers that own no optimizer, by id
_ORPHANS: dict = {}


def _retain(batch):
    keep = getattr(batch, "retain", None)
    return keep if keep is not None else (lambda obj: _ORPHANS.setdefault(id(obj), obj))


#: pinned bytes set aside per unit for uploads made during a capture: at
#: least this, and at least 4 times the largest upload the unit has made
_ARENA_MIN = 1 << 16


#: set aside by any eager upload in the process, for captures by units that
#: have none yet (the very first step of an optimizer, captured)
_SHARED_ARENA: dict = {}


def _carve(arena, raw):
    """A fresh slice of ``arena`` ([tensor, offset]) holding ``raw``, or None."""
    if arena is None or arena[1] + raw.nbytes > arena[0].numel():
        return None
    host = arena[0][arena[1]:arena[1] + raw.nbytes]
    arena[1] += -(-raw.nbytes // 16) * 16  # forward only: a slice is never reused
    host.numpy()[:] = raw
    return host


def _set_aside(holder: dict, need: int):
    arena = holder.get("arena")
    if arena is None or arena[0].numel() - arena[1] < 2 * need:
        holder["arena"] = [torch.empty(max(_ARENA_MIN, 4 * need), dtype=torch.uint8,
                                       pin_memory=True), 0]


def _pinned(raw: np.ndarray, batch) -> torch.Tensor:
    """A pinned host copy of ``raw`` (uint8), safe to copy from (see R3)."""
    cache = getattr(batch, "cache", None)
    if not _capturing(batch.device):
        if cache is not None:
            need = cache["arena_need"] = max(cache.get("arena_need", 0), raw.nbytes)
            _set_aside(cache, need)
        _set_aside(_SHARED_ARENA, raw.nbytes)
        return torch.from_numpy(raw.copy()).pin_memory()
    host = _carve(cache.get("arena") if cache is not None else None, raw)
    if host is None:
        host = _carve(_SHARED_ARENA.get("arena"), raw)
    if host is None:
        try:
            host = torch.from_numpy(raw.copy()).pin_memory()
        except RuntimeError as e:
            raise RuntimeError(
                "fused_optim: this step's address table is new to the optimizer and "
                "torch could not pin host memory to upload it during CUDA graph capture; "
                "run one eager step (with the same grad tensors) before capturing") from e
    _retain(batch)(host)
    return host


def _upload(array: np.ndarray, batch) -> torch.Tensor:
    """A private device copy of ``array``, queued without a host sync on CUDA."""
    array = np.ascontiguousarray(array)
    device = batch.device
    if device.type == "cuda":
        # a pageable copy would wait for all queued work (the backward pass);
        # the caching host allocator holds a pinned buffer until it has run
        raw = array.reshape(-1).view(np.uint8)
        host = _pinned(raw, batch)
        out = host.to(device, non_blocking=True)
        return out.view(torch.from_numpy(array[:0]).dtype).reshape(array.shape)
    return torch.from_numpy(array.copy()).to(device)


#: entries kept per unit and kind: grads that alternate between two sets of
#: addresses (a new ``p.grad`` allocated while the old one is alive) hit
_KEEP = 4


def _resident(batch, name: str, key, make):
    """``make()``'s device buffer for ``key``, cached in the unit (R1-R3)."""
    cache = getattr(batch, "cache", None)
    entries = cache.setdefault(name, []) if cache is not None else []
    for i, (k, value) in enumerate(entries):
        if k == key:
            if i:
                entries.insert(0, entries.pop(i))
            break
    else:
        value = None
    if _capturing(batch.device):
        if value is None:
            value = make()  # R3: for this capture only
        _retain(batch)(value)  # R2
        return value
    if value is None:
        value = make()
        entries.insert(0, (key, value))
        del entries[_KEEP:]
    return value


def block_map(numel: np.ndarray, block: int, rows=None) -> np.ndarray:
    """Program -> (row, chunk) map: row r gets ``ceil(numel[r] / block)`` programs.

    Args:
        numel: int64 elements per row.
        block: elements per program.
        rows: the rows to map (default: all), by index into ``numel``.

    Returns:
        int32 array ``[programs, 2]``, rows in table order, chunks ascending;
        rows with no elements get no program.
    """
    numel = np.asarray(numel, dtype=np.int64)
    index = np.arange(numel.size, dtype=np.int64) if rows is None else np.asarray(rows, np.int64)
    nblocks = (numel[index] + block - 1) // block
    if nblocks.size and nblocks.max() >= 2**31:
        raise ValueError(f"a tensor of {int(numel.max())} elements needs more than "
                         f"2**31 programs of {block}")
    total = int(nblocks.sum())
    first = np.repeat(np.cumsum(nblocks) - nblocks, nblocks)
    out = np.empty((total, 2), dtype=np.int32)
    out[:, 0] = np.repeat(index, nblocks)
    out[:, 1] = np.arange(total, dtype=np.int64) - first
    return out


_POINTER_COLUMNS = [L.PARAM, L.GRAD, L.STATE0, L.STATE1, L.STATE2, L.COMP]


def alignment_classes(table: np.ndarray, itemsize: int):
    """Rows by how far their accesses can vectorize: ``[(ALIGNED, TAIL_ALIGNED, rows)]``.

    Decided per row, so one misaligned tensor (a DDP bucket view of an
    odd-sized param, say) costs its own rows the vector accesses, not the
    whole batch's: at most two launches, one in the usual case. ALIGNED:
    every address of the row is a multiple of 16 bytes (absent roles hold
    0). TAIL_ALIGNED: ALIGNED, and every NUMEL of the class is a multiple
    of 16 bytes' worth of elements, so masked last blocks vectorize too (a
    launch of its own for the few rows that are not would cost more than
    their scalar tails). Classes without rows are left out.
    """
    aligned = (table[:, _POINTER_COLUMNS] % 16 == 0).all(axis=1)
    out = []
    rows = np.flatnonzero(aligned)
    if rows.size:
        whole = bool((table[rows, L.NUMEL] % (16 // itemsize) == 0).all())
        out.append((True, whole, rows))
    rows = np.flatnonzero(~aligned)
    if rows.size:
        out.append((False, False, rows))
    return out


class _Layout:
    """What a launch needs that follows from the table alone (cached on its bytes)."""

    __slots__ = ("table", "launches", "rows", "__weakref__")

    def __init__(self, table, launches, rows):
        self.table = table  # the device copy
        self.launches = launches  # [(block map, programs, ALIGNED, TAIL_ALIGNED)]
        self.rows = rows


def _layout(batch, block: int) -> _Layout:
    table = batch.table
    itemsize = _ITEMSIZE[batch.dtype]

    def make():
        classes = alignment_classes(table, itemsize)
        numel = table[:, L.NUMEL]

        def launches():
            out = []
            for aligned, tail, rows in classes:
                bmap = block_map(numel, block, rows)
                if bmap.shape[0]:
                    out.append((_upload(bmap, batch), bmap.shape[0], aligned, tail))
            return out

        # block maps follow from the sizes and alignment alone: grads at new
        # addresses (a graph's own, say) need only a new table
        key = (numel.tobytes(), block, tuple((a, t, r.tobytes()) for a, t, r in classes))
        return _Layout(_upload(table, batch), _resident(batch, "launches", key, launches),
                       table.shape[0])

    return _resident(batch, "layout", (table.tobytes(), block, itemsize), make)


def _device_hyper(batch, values) -> torch.Tensor:
    """The float64 hyperparameter buffer on the batch's device.

    A Tensor entry (capturable's device ``lr``) is read where it lives, by
    device ops: no host sync, and the buffer is rebuilt inside a CUDA graph
    on every replay, so a scheduler's updates to that Tensor take effect.
    """
    device = batch.device
    if any(torch.is_tensor(v) for v in values):
        return torch.stack([
            v.detach().to(device=device, dtype=torch.float64).reshape(())
            if torch.is_tensor(v) else torch.full((), v, dtype=torch.float64, device=device)
            for v in values])
    values = np.asarray(values, dtype=np.float64)
    return _resident(batch, "hyper", values.tobytes(), lambda: _upload(values, batch))


def _amp_tensor(t, device):
    if t is None:
        return None
    if t.device != device:
        t = t.to(device, non_blocking=True)
    return t.detach().reshape(-1)


#: Triton's interpreter patches ``triton.language`` for the length of a
#: launch, so two threads interpreting kernels at once break each other
#: (seen: InterpreterError, and step counts left wrong). Compiled launches
#: need no lock.
_INTERPRETER_LOCK = threading.Lock()


def _launch_lock():
    if interpreted():
        return _INTERPRETER_LOCK
    return contextlib.nullcontext()


def _device_context(device):
    if device.type == "cuda":
        return torch.cuda.device(device)
    return contextlib.nullcontext()


def _common_args(batch):
    """Constexprs fixed by the batch's storage types (params, state)."""
    dtype = batch.dtype
    is_f64 = dtype == torch.float64
    const = dict(ELEM=_ELEM[dtype], IS_BF16=dtype == torch.bfloat16,
                 S_ELEM=_ELEM[batch.state_dtype], S_IS_BF16=batch.state_dtype == torch.bfloat16,
                 COMPUTE=tl.float64 if is_f64 else tl.float32, IS_F64=is_f64,
                 BLOCK=BLOCK, VEC=16 // _ITEMSIZE[dtype])
    if batch.state_dtype == torch.uint8:
        const["S_Q"] = True  # (only kernels with 8-bit state take it: Adam's)
    return const


class _Prologue:
    """What every update launch of one batch reads besides its own scalars."""

    __slots__ = ("layout", "hyper", "grad_scale", "found_inf", "const")

    def __init__(self, layout, hyper, grad_scale, found_inf, const):
        self.layout = layout  # _Layout: device table, block map per alignment class
        self.hyper = hyper  # float64 hyperparameters on the device, or None
        self.grad_scale = grad_scale  # AMP tensors on the device, or None
        self.found_inf = found_inf
        self.const = const  # the constexprs every update kernel takes


def _prologue(batch, hyper=None, grad_scale=None, found_inf=None) -> _Prologue:
    """The launch prologue every optimizer shares; call it in ``_device_context``.

    Uploads (or finds cached, see "device buffers") the address table and
    its block maps, and the float64 hyperparameter buffer from the values
    ``hyper`` (None: the launcher uploads its own); moves the AMP tensors to
    the device; and collects the constexprs of the batch's storage type,
    the AMP switches and ``enable_fp_fusion=False`` (no FMA contraction: the
    same roundings as the Numba backend).
    """
    layout = _layout(batch, BLOCK)
    if hyper is not None:
        hyper = _device_hyper(batch, hyper)
    grad_scale = _amp_tensor(grad_scale, batch.device)
    found_inf = _amp_tensor(found_inf, batch.device)
    const = dict(_common_args(batch), HAS_GRAD_SCALE=grad_scale is not None,
                 HAS_FOUND_INF=found_inf is not None, enable_fp_fusion=False)
    return _Prologue(layout, hyper, grad_scale, found_inf, const)


def _launch_updates(kernel, pro: _Prologue, batch, *args, **const) -> None:
    """``kernel`` once per alignment class of the batch (usually one launch).

    Called as ``kernel[(programs,)](table, block map, *args, ALIGNED=,
    TAIL_ALIGNED=, num_warps=, **pro.const, **const)``. The caller holds
    ``_launch_lock()``.
    """
    for bmap, programs, aligned, tail in pro.layout.launches:
        kernel[(programs,)](pro.layout.table, bmap, *args, ALIGNED=aligned,
                            TAIL_ALIGNED=tail,
                            num_warps=num_warps(batch.dtype, aligned, tail),
                            **pro.const, **const)


def _steps_on_device(batch) -> bool:
    """True if the kernels can read and advance every step counter themselves.

    Raises:
        ValueError: the batch mixes host and device counters (fused_optim's
            tables never build one: the host would read device addresses).
    """
    host = (batch.table[:, L.FLAGS] & L.FLAG_STEP_HOST) != 0
    if host.any() and not host.all():
        raise ValueError("a batch mixes step counters on the host and on the device; "
                         "each placement needs its own launch")
    return not host.any()


def _check_host_steps(batch) -> None:
    """The host is about to read and write every step address: all must be CPU memory.

    Read off the table (FLAG_STEP_CPU, written with the address from the
    same tensor), not the tensors: building a batch's tensor lists costs
    about 2 us per row.
    """
    flags = batch.table[:, L.FLAGS]
    if ((flags & L.FLAG_STEP_CPU) == 0).any():
        raise ValueError("host-side step counters must be CPU tensors")
    if _capturing(batch.device):
        raise RuntimeError("a CUDA graph cannot advance step counters that live on the "
                           "host: put them on the params' device (capturable=True)")


#: rows per program of the step kernel
_STEP_ROWS = 128


_MASK32 = 0xFFFFFFFF


class _Precision:
    """How an update launch stores params (``kahan_sum`` / ``stochastic_round``)."""

    __slots__ = ("kahan", "sr", "ssr", "counter", "slots")

    def __init__(self, kahan, sr, counter, slots, ssr=False):
        self.kahan = kahan  # the KAHAN constexpr
        self.sr = sr  # the SR constexpr
        self.ssr = ssr  # the SSR constexpr (state stores, ``state_round``)
        self.counter = counter  # the kernel's counter_ptr: None unless SR
        self.slots = slots  # hyperparameter values to append: [] unless SR


_OFF = _Precision(False, False, None, [])


def _precision_args(batch, kahan_sum, stochastic_round, state_round=None) -> _Precision:
    """The kernel arguments of the two param-store options for ``batch``.

    Both act on bfloat16/float16 batches only; for other batches (and with
    both off) the launch is exactly the one without them. With
    ``stochastic_round = (seed, counter, salt)``, the seed's two 32-bit
    halves and the salt's low 32 bits go after the optimizer's own
    hyperparameters (float64 holds them exactly; a buffer cached on its
    bytes, rule R1), and the counter, a 0-dim int64 tensor on the params'
    device, is passed as a pointer: the kernel reads it (no host sync, and a
    CUDA graph replays with the live value). ``state_round`` (bfloat16
    state only) rounds the state stores stochastically from a stream of the
    same form; with ``stochastic_round`` too, it must be the same stream
    (the kernels read one: the state's bits differ from the param's by their
    keys, ``_precision.state_bits``).
    """
    ssr = state_round is not None
    if ssr and batch.state_dtype not in (torch.bfloat16, torch.uint8):
        raise ValueError(f"state_round stores bfloat16 or 8-bit state, not {batch.state_dtype}")
    if batch.dtype not in (torch.bfloat16, torch.float16):
        kahan_sum, stochastic_round = False, None
    kahan = bool(kahan_sum)
    if stochastic_round is None and not ssr:
        return _Precision(True, False, None, []) if kahan else _OFF
    if ssr and stochastic_round is not None and not (
            int(state_round[0]) == int(stochastic_round[0])
            and state_round[1] is stochastic_round[1]
            and int(state_round[2]) == int(stochastic_round[2])):
        raise ValueError("state_round and stochastic_round must be the same stream")
    seed, counter, salt = stochastic_round if stochastic_round is not None else state_round
    if not torch.is_tensor(counter) or counter.dtype != torch.int64 or counter.numel() != 1:
        raise ValueError("stochastic_round's counter must be a 1-element int64 tensor")
    if counter.device != batch.device:
        raise ValueError(f"stochastic_round's counter is on {counter.device}, the params "
                         f"on {batch.device}: the kernel reads it on the params' device")
    seed = int(seed)
    slots = [float(seed & _MASK32), float((seed >> 32) & _MASK32), float(int(salt) & _MASK32)]
    return _Precision(kahan, stochastic_round is not None, counter.detach().reshape(-1), slots,
                      ssr)


def launch(update, batch, hyper, grad_scale, found_inf, kahan_sum, stochastic_round, *,
           state_round=None, steps_kernel=None, host_steps=None, width=0,
           **switches) -> None:
    """One optimizer step over ``batch``: every launcher's body.

    Args:
        update: the ``@triton.jit`` update kernel, called as
            ``update[(programs,)](table, block map, hyper, [scalars,]
            grad_scale, found_inf, ALIGNED=, TAIL_ALIGNED=, <the prologue's
            constexprs>, counter_ptr=, KAHAN=, SR=, SSR=, **switches)``.
        hyper: the optimizer's hyperparameter slots (floats, or a device
            Tensor for a capturable lr); the precision options' slots are
            appended here.
        grad_scale, found_inf, kahan_sum, stochastic_round, state_round: as
            the launchers'.
        steps_kernel: for an optimizer with step counters, the kernel that
            advances device-side ones (one lane per row, ``_STEP_ROWS`` rows
            a program), called as ``steps_kernel[grid](table, [hyper,
            scalars,] found_inf, rows, BLOCK_R=, HAS_FOUND_INF=)``; None for
            one without (SGD). Launched before the update on the same
            stream, so the update reads what it wrote.
        host_steps: ``host_steps(table)`` advances host-side counters (in
            host memory: torch's default for CUDA params) and returns the
            rows' float64 scalars (``[rows, width]``), or None.
        width: per-row float64 scalars the step kernel writes and the
            update reads (``scal_ptr``, after ``hyper``); 0: none.
    """
    if batch.table is None or batch.table.shape[0] == 0:
        return
    prec = _precision_args(batch, kahan_sum, stochastic_round, state_round)
    hyper = list(hyper) + prec.slots
    device = batch.device
    on_device = steps_kernel is None or _steps_on_device(batch)
    with _device_context(device):
        if not on_device:
            _check_host_steps(batch)
            # the host must know whether to advance the counters: one sync
            # (fused_optim's optimizers move counters to the device under GradScaler)
            if found_inf is not None and bool(found_inf.reshape(-1)[0] != 0):
                return  # skipped step: steps stay as they are
            found_inf = None
            scalars = host_steps(batch.table)
        pro = _prologue(batch, None if width and not on_device else hyper, grad_scale,
                        found_inf)
        layout = pro.layout
        args = (pro.hyper,)
        if width and on_device:
            # R1: rewritten whole by the step kernel before each read
            scal = _resident(batch, "scalars", (layout.rows, width), lambda: torch.empty(
                (layout.rows, width), dtype=torch.float64, device=device))
            args = (pro.hyper, scal)
        elif width:
            # host-step scalars change every step: not worth a cache entry
            both = _upload(np.concatenate([np.asarray(hyper, np.float64), scalars.ravel()]),
                           batch)
            args = (both, both[len(hyper):])
        with _launch_lock():
            if steps_kernel is not None and on_device:
                # rows without elements count their step too: launched even
                # when there is no update launch
                steps_kernel[(triton.cdiv(layout.rows, _STEP_ROWS),)](
                    layout.table, *(args if width else ()), pro.found_inf, layout.rows,
                    BLOCK_R=_STEP_ROWS,
                    HAS_FOUND_INF=pro.found_inf is not None, num_warps=NUM_WARPS,
                    enable_fp_fusion=False)
            _launch_updates(update, pro, batch, *args, pro.grad_scale, pro.found_inf,
                            counter_ptr=prec.counter, KAHAN=prec.kahan, SR=prec.sr,
                            SSR=prec.ssr, **switches)
