"""Turn a param group's tensors into a validated plan of kernel launches.

Safety contract: a pointer reaches a kernel only if its tensor was checked
here against its param (same device, dtype and shape), is a plain strided
tensor whose every element lies inside a live allocation, and is laid out
exactly like the kernel's view of the param (dense: every element once, no
gaps; no conj or neg bit). A tensor that fails only the layout test is staged
through a dense scratch copy (params and state are copied back after the
kernel). A row that fails anything else, or whose param or state overlaps
another of its own tensors, runs torch's own for-loop instead (after a dry
run on stand-ins, so that torch's exception comes before anything is
written). Rows whose memory overlaps run in torch's order: in generations,
each a kernel launch of rows that share no byte, one after the other.

Full validation (:func:`build`) costs ~15 us per tensor in Python, so its
result is kept as a :class:`Plan` and reused while the facts it rests on
hold; :mod:`fused_optim._reuse_rule` lists those facts and why each is re-read
or provably unchanged.
"""

from __future__ import annotations

import contextlib
import functools
import heapq
from collections import defaultdict
from dataclasses import dataclass, field
from itertools import chain

import numpy as np
import torch

from . import _backend, _reuse_rule
from ._precision import stored_dtype
from .kernels import Batch, contract
from .kernels.reference import _blockwise
from .kernels import columns as L

_PLAIN = (torch.Tensor, torch.nn.Parameter)
_PLAIN_SET = frozenset(_PLAIN)
_STEP_DTYPES = (torch.float32, torch.float64)
#: the state roles' columns: an optimizer's own roles, in order, then the
#: Kahan compensation buffer (``kahan_sum``), always the fourth role
_STATE_COLS = (L.STATE0, L.STATE1, L.STATE2, L.COMP, L.SCALE0, L.SCALE1, L.SCALE2)
#: the block scales of 8-bit state roles (``state_bits=8``), roles 4..6: a
#: float32 vector of ``_blockwise.blocks(numel)`` elements each, not the
#: param's shape
_SCALE_COLS = (L.SCALE0, L.SCALE1, L.SCALE2)
#: the optimizer's own state roles, stored in ``state_dtype`` where it is on
_ROLE_COLS = (L.STATE0, L.STATE1, L.STATE2)


class PlanCache(dict):
    """An optimizer's plans (group index -> :class:`Plan`), and what graphs hold.

    ``retain`` keeps an object for the optimizer's lifetime, whatever
    happens to the plans: the backends hand it the device buffers a CUDA
    graph captured over a step reads (see ``kernels/triton``), which must
    outlive both a plan rebuilt for new tensors and ``load_state_dict``.
    """

    def __init__(self, graph_owned=None):
        super().__init__()
        self.graph_owned = {} if graph_owned is None else graph_owned

    def retain(self, obj) -> None:
        self.graph_owned.setdefault(id(obj), obj)


class OutsideStorageError(RuntimeError):
    """A tensor lies outside its storage, where torch's own step is undefined."""


# ---------------------------------------------------------------- layouts

_dense_cache: dict = {}


def _dense(shape, strides) -> bool:
    """True if a tensor with these sizes/strides covers a gap-free block once."""
    key = (shape, strides)
    hit = _dense_cache.get(key)
    if hit is None:
        dims = sorted((st, sz) for sz, st in zip(shape, strides) if sz != 1)
        expect = 1
        hit = True
        for st, sz in dims:
            if st != expect:
                hit = False
                break
            expect *= sz
        if len(_dense_cache) < 4096:
            _dense_cache[key] = hit
    return hit


def _non_overlapping(t) -> bool:
    """No two elements of ``t`` share memory (sufficient test on sorted strides)."""
    reach = 0  # elements spanned by the smaller-stride dims so far, minus one
    for st, sz in sorted((st, sz) for sz, st in zip(t.shape, t.stride()) if sz > 1):
        if st <= reach:
            return False
        reach += (sz - 1) * st
    return True


def _layout(shape, strides):
    # strides of size-1 dims never matter
    return tuple(st for sz, st in zip(shape, strides) if sz != 1)


def _plain_strided(t) -> bool:
    """A dense-storage tensor a kernel can address (not sparse, quantized, meta...)."""
    return (type(t) in _PLAIN and t.layout == torch.strided and not t.is_quantized
            and not t.is_meta and not t.is_nested and not t._is_zerotensor())


def _in_storage(t) -> bool:
    ext = _reuse_rule.extent(t)
    if ext == 0:
        return True
    return t.storage_offset() * t.element_size() + ext <= t.untyped_storage().nbytes()


def _columns(params, grads, states, steps):
    """The tensor lists of one update in table-column order, and their columns."""
    cols = [params, grads]
    where = [L.PARAM, L.GRAD]
    for lst, col in zip(states, _STATE_COLS):
        if lst and lst[0] is not None:  # a role is either present for every row or absent
            cols.append(lst)
            where.append(col)
    if steps is not None:
        cols.append(steps)
        where.append(L.STEP)
    return cols, tuple(where)


# ---------------------------------------------------------------- units

@dataclass(slots=True, eq=False)
class KernelUnit:
    """Rows of one (device, dtype) that share no byte: one backend call.

    Attributes:
        module: the backend kernel module.
        kernel: its kernel for the plan's optimizer (None: a plan for
            driving the backend directly, see :func:`pack`).
        rows: int64 group row indices, in group order.
        table: the address table with every direct param/state/step address
            (the grads' and scratch copies' are filled in at each step).
        numel: elements over all rows.
        direct_grad: bool per unit row, or None when every grad is direct.
        grad_rows: the group rows whose grads are direct.
        staged: ``(unit row, column, group row, column index, write back?,
            shape, strides)`` per tensor staged through a scratch copy.
        whole: the unit is every row of the group, in order, with every grad
            direct (the usual case: the grads' addresses go in as they are).
    """

    device: torch.device
    dtype: torch.dtype
    module: object
    kernel: object
    rows: np.ndarray
    table: np.ndarray
    numel: int
    direct_grad: object
    grad_rows: np.ndarray
    staged: list
    whole: bool
    #: the dtype of every row's state roles (STATE0..2), read from the
    #: validated tensors (F1 re-reads it): the kernels' view of them; None
    #: where the unit has no state role
    state_dtype: object = None
    #: the backend's, for these rows (Batch.cache)
    device_cache: dict = field(default_factory=dict)


class TorchUnit:
    """Rows that run torch's own for-loop step, in group order."""

    __slots__ = ("rows",)

    def __init__(self, rows):
        self.rows = rows


def _real(t):
    return torch.view_as_real(t) if t.is_complex() else t


def stage(unit, cols, where, steps, row_flags, grad_ptrs, retain=None):
    """This step's :class:`~fused_optim.kernels.Batch` of ``unit``, scratch copies filled.

    Returns:
        ``(batch, writeback)``: after the kernel, copy each ``(tensor,
        scratch)`` of ``writeback`` back into the tensor.
    """
    table = unit.table.copy()
    if len(unit.grad_rows):
        if unit.whole:
            table[:, L.GRAD] = grad_ptrs
        elif unit.direct_grad is None:
            table[:, L.GRAD] = grad_ptrs[unit.rows]
        else:
            table[unit.direct_grad, L.GRAD] = grad_ptrs[unit.grad_rows]
    writeback, scratch = [], {}
    for r, col, i, c, back, shape, strides in unit.staged:
        src = cols[c][i]
        s = torch.empty_strided(shape, strides, dtype=src.dtype, device=src.device)
        s.copy_(src)
        if back:
            writeback.append((src, s))
        table[r, col] = s.data_ptr()
        scratch[(r, c)] = s
    rows = unit.rows

    def lists():
        # only the reference backend walks tensors; built on first access
        out = [[_real(scratch.get((r, c), cols[c][i])) for r, i in enumerate(rows)]
               for c in range(len(cols))]
        states = [None] * len(_STATE_COLS)
        for c, col in enumerate(where):
            if col in _STATE_COLS:
                states[_STATE_COLS.index(col)] = out[c]
        n = len(rows)
        return dict(params=out[0], grads=out[1],
                    states=[s if s is not None else [None] * n for s in states],
                    steps=[steps[i] for i in rows] if steps is not None else [],
                    row_flags=[row_flags[i] for i in rows] if row_flags is not None else [])

    batch = Batch(unit.device, unit.dtype, table, unit.numel, source=lists,
                  cache=unit.device_cache, retain=retain, state_dtype=unit.state_dtype)
    return batch, writeback


# ---------------------------------------------------------------- the plan

class Plan:
    """A validated plan of one group's step, reusable while its facts hold.

    Attributes (see :mod:`fused_optim._reuse_rule` for F1-F6):
        backend: the backend name requested when it was built (its units'
            modules and kernels were chosen for it; a plan is reused only
            for the same name).
        state_dtype: the ``state_dtype`` option it was validated for (a plan
            is reused only under the same option).
        where: the table column of each tensor column.
        n: rows.
        guard: F1 over every tensor, columns in ``where`` order.
        ptrs: F2, the addresses of params, state and steps, as bytes.
        held, storages: F3, the storages those lie in, and their facts.
        grad_ext, grad_isz, grad_nonempty: F4's fixed parts for the grads.
        written, grad_ptrs, grad_hits: F5: the ranges a step writes, the grads'
            addresses when validated, and whether any grad overlapped them.
        row_flags: F6.
        units: :class:`KernelUnit` and :class:`TorchUnit`, in execution order.
        dry_rows: rows torch's for-loop is first run on stand-ins for,
            every step, because torch may raise there.
    """

    __slots__ = ("backend", "state_dtype", "where", "n", "guard", "ptrs", "held", "storages",
                 "grad_ext", "grad_isz", "grad_nonempty", "written", "grad_ptrs", "grad_ptr_bytes",
                 "grad_hits", "row_flags", "units", "dry_rows", "has_torch_rows")


def _ptr_or_0(t):
    return t.data_ptr() if _plain_strided(t) else 0


def _overlap_edges(intervals):
    """Pairs of rows whose byte ranges overlap where at least one is written.

    ``intervals``: (start, end, row, written) with start < end. Returns
    (edges between different rows, rows that overlap themselves).
    """
    intervals.sort()
    active = []  # heap of (end, row, written)
    edges, selves = set(), set()
    for start, end, row, written in intervals:
        while active and active[0][0] <= start:
            heapq.heappop(active)
        for _, other, other_written in active:
            if written or other_written:
                if other == row:
                    selves.add(row)
                else:
                    edges.add((min(row, other), max(row, other)))
        heapq.heappush(active, (end, row, written))
    return edges, selves


def _generations(n, edges):
    """Row -> generation: one more than any earlier row it overlaps."""
    earlier = defaultdict(list)
    for a, b in edges:
        earlier[b].append(a)
    gen = [0] * n
    for j in range(n):
        if j in earlier:
            gen[j] = 1 + max(gen[i] for i in earlier[j])
    return gen


def _scalar_cols(where, scalars):
    """The tensor columns (indices into ``cols``) of the scalar state roles ``scalars``."""
    cols = {_STATE_COLS[k] for k in scalars}
    return frozenset(c for c, w in enumerate(where) if w in cols)


def build(params, grads, states, roles, steps, row_flags, backend, kernel_name=None,
          labels=None, state_dtype=None, scalars=()):
    """Fully validate one group's tensors into a :class:`Plan`.

    Args:
        params: params with a gradient, in group order.
        grads: their gradients (dense layout).
        states: one list per state role, aligned with params; a role is
            either None for every row (absent) or a tensor for every row.
        roles: names of the state roles, for error messages.
        steps: per-row step counters (0-dim tensors the kernels advance: any
            optimizer with ``state["step"]``), or None.
        row_flags: per-row bools, or None: the optimizer's own per-row switch,
            written into the table as ``layout.FLAG_ROW`` (SGD: the momentum
            buffer is created this step).
        backend: the requested backend name (see :mod:`fused_optim._backend`).
        kernel_name: the optimizer record's ``kernel`` (``"sgd"``, ...),
            whose function each kernel unit keeps (None: none).
        labels: per-param indices for error messages (default: row index).
        state_dtype: the ``state_dtype`` option (None: off): the dtype the
            optimizer's own state roles (not the Kahan buffers) must have,
            for the params it acts on (``_precision.stored_dtype``); a row
            whose state has another dtype runs torch's own step.
        scalars: indices of the state roles that are per-row scalars, not
            per-element state: 1-element float32/float64 tensors placed as
            the row's step counter (on the host or on the param's device),
            which the kernels' step prologue reads and writes through the
            role's column (NAdam's ``mu_product``). Any other such tensor
            makes its row torch's. All of a row's scalars share a dtype
            (``FLAG_SCALAR_F64``).

    Raises:
        OutsideStorageError: a tensor lies outside its storage.
        RuntimeError: the backend cannot run these tensors (with a fix).
    """
    n = len(params)
    cols, where = _columns(params, grads, states, steps)
    nstate = sum(1 for c in where if c in _STATE_COLS)
    scalar_cols = _scalar_cols(where, scalars)
    written_cols = [0] + list(range(2, len(cols)))  # params, states, steps
    in_inference = torch.is_inference_mode_enabled()
    whats = ["", "gradient of ", *(f"state {r!r} of " for r, lst in zip(roles, states)
                                   if lst and lst[0] is not None)]
    if steps is not None:
        whats.append("state 'step' of ")

    kind = [None] * n        # "kernel" or "torch"
    dry = [False] * n
    modules = {}
    intervals = []
    grad_ext = np.zeros(n, dtype=np.int64)
    grad_isz = np.ones(n, dtype=np.int64)
    for i in range(n):
        label = labels[i] if labels is not None else i
        row = [c[i] for c in cols]
        p = row[0]
        if type(p) in _PLAIN:
            key = (p.device, p.dtype)
            if key not in modules:
                real = p.dtype.to_real() if p.is_complex() else p.dtype
                modules[key] = _backend.select(backend, p.device, real)
        plain = all(map(_plain_strided, row))
        if plain:
            for c, t in enumerate(row):
                if not _in_storage(t):
                    # torch's own step would read (and write) past the allocation
                    raise OutsideStorageError(
                        f"{whats[c]}parameter {label} lies outside its storage "
                        f"({t.untyped_storage().nbytes()} bytes); was its storage "
                        "freed or resized?")
        torch_row = not plain
        unusual = not plain
        if plain:
            want = stored_dtype(p.dtype, state_dtype, p.numel())
            for c, t in enumerate(row[1:1 + 1 + nstate], 1):
                if where[c] in _SCALE_COLS:
                    # one float32 per block, in the codes' memory order
                    if (t.dtype != torch.float32 or t.shape != (_blockwise.blocks(p.numel()),)
                            or t.device != p.device or want != torch.uint8):
                        torch_row = unusual = True
                elif c in scalar_cols:
                    # placed as the step counter: both on the host, or both on the
                    # param's device (never in state_dtype: torch's dtype)
                    home = steps[i].device if steps is not None else p.device
                    if not (t.numel() == 1 and t.dtype in _STEP_DTYPES and t.device == home
                            and t.dtype == row[min(scalar_cols)].dtype):
                        torch_row = unusual = True
                elif (t.dtype != (want if where[c] in _ROLE_COLS else p.dtype)
                        or t.shape != p.shape or t.device != p.device):
                    torch_row = unusual = True
                elif t.dtype == torch.uint8 and not (
                        _dense(p.shape, p.stride()) and not (p.is_conj() or p.is_neg())
                        and _layout(t.shape, t.stride()) == _layout(p.shape, p.stride())):
                    # 8-bit codes are never staged: a scratch copy in another
                    # memory order would cut other blocks than their scales'
                    torch_row = unusual = True
            if steps is not None:
                st = row[-1]
                if not (st.numel() == 1 and st.dtype in _STEP_DTYPES and (
                        st.device == p.device
                        or (st.device.type == "cpu" and p.device.type != "cpu"))):
                    torch_row = unusual = True
            if any(t.is_conj() or t.is_neg() for t in row):
                unusual = True  # torch's view_as_real refuses a conj grad, for one
            for c in written_cols:
                t = row[c]
                if not _non_overlapping(t):
                    torch_row = unusual = True
                if t.is_inference() and not in_inference:
                    torch_row = unusual = True  # torch: no in-place update outside
            if p.dtype not in (torch.float64, torch.float32, torch.bfloat16,
                               torch.float16, torch.complex64, torch.complex128):
                torch_row = unusual = True
            for c, t in enumerate(row):
                ext = _reuse_rule.extent(t)
                if ext:
                    ptr = t.data_ptr()
                    intervals.append((ptr, ptr + ext, i, c != 1))
            g = row[1]
            grad_ext[i] = _reuse_rule.extent(g)
            grad_isz[i] = g.element_size()
        kind[i] = "torch" if torch_row else "kernel"
        dry[i] = unusual

    edges, selves = _overlap_edges(intervals)
    for i in selves:
        kind[i] = "torch"  # e.g. AdamW with p.grad = p: torch decays p before reading it
    gen = _generations(n, edges)

    units = []
    for g in sorted(set(gen)):
        buckets = defaultdict(list)
        torch_rows = []
        for i in range(n):
            if gen[i] != g:
                continue
            if kind[i] == "torch":
                torch_rows.append(i)
            else:
                # Step counters off the param's device (torch's CPU steps of
                # CUDA params) are advanced on the host, the others by the
                # kernel: never in one launch, so the host never reads a
                # device address (a group can mix both after a "move the
                # state to the device" loop).
                host_step = steps is not None and steps[i].device != params[i].device
                buckets[(params[i].device, params[i].dtype,
                         stored_dtype(params[i].dtype, state_dtype, params[i].numel()),
                         host_step)].append(i)
        for (device, dtype, _, _), rows in buckets.items():
            module = modules[(device, dtype)]
            units.append(_kernel_unit(cols, where, steps, row_flags, rows, device, module,
                                      kernel_name and contract.kernel(module, kernel_name),
                                      scalar_cols))
        if torch_rows:
            units.append(TorchUnit(torch_rows))

    plan = Plan()
    plan.backend = backend
    plan.state_dtype = state_dtype
    plan.where = where
    plan.n = n
    plan.guard = _reuse_rule.MetaGuard(tuple(chain.from_iterable(cols)))
    rest = list(chain.from_iterable(cols[2:]))
    # (a tensor without storage, e.g. a sparse grad of a torch row, gets 0:
    # the cached path's own read of it raises, and the group is re-validated)
    plan.ptrs = np.fromiter(map(_ptr_or_0, chain(params, rest)), np.int64,
                            n + len(rest)).tobytes()
    plain_written = [t for t in chain(params, rest) if _plain_strided(t)]
    plan.held = _reuse_rule.held_storages(plain_written)
    plan.storages = _reuse_rule.storage_facts(plan.held)
    plan.grad_ext = grad_ext
    plan.grad_isz = grad_isz
    plan.grad_nonempty = None if grad_ext.all() else grad_ext > 0
    ws = [(a, b) for a, b, _, w in intervals if w]
    plan.written = _reuse_rule.WrittenRanges([a for a, _ in ws], [b for _, b in ws])
    plan.grad_ptrs = np.fromiter(map(_ptr_or_0, grads), np.int64, n)
    plan.grad_ptr_bytes = plan.grad_ptrs.tobytes()
    hit = plan.written.hit(plan.grad_ptrs, plan.grad_ptrs + grad_ext)
    plan.grad_hits = bool((hit & (grad_ext > 0)).any())
    plan.row_flags = row_flags
    plan.units = units
    plan.dry_rows = [i for i in range(n) if dry[i]]
    plan.has_torch_rows = any(isinstance(u, TorchUnit) for u in units)
    return plan


def _kernel_unit(cols, where, steps, row_flags, rows, device, module, kernel,
                 scalar_cols=frozenset()):
    """A :class:`KernelUnit` for ``rows`` (validated kernel rows of one bucket)."""
    m = len(rows)
    table = np.zeros((m, L.NCOLS), dtype=np.int64)
    direct_grad = np.ones(m, dtype=bool)
    staged = []
    start = 0
    dtype = None
    for r, i in enumerate(rows):
        p = cols[0][i]
        elems = p.numel() * (2 if p.is_complex() else 1)
        dtype = p.dtype.to_real() if p.is_complex() else p.dtype
        table[r, L.NUMEL] = elems
        table[r, L.START] = start
        start += elems
        flags = 0
        if steps is not None:
            st = steps[i]
            table[r, L.STEP] = st.data_ptr()
            if st.dtype == torch.float64:
                flags |= L.FLAG_STEP_F64
            if st.device != p.device:
                flags |= L.FLAG_STEP_HOST
            if st.device.type == "cpu":
                flags |= L.FLAG_STEP_CPU
        if row_flags is not None and row_flags[i]:
            flags |= L.FLAG_ROW
        for c in scalar_cols:  # (rows without elements advance theirs too)
            t = cols[c][i]
            table[r, where[c]] = t.data_ptr()
            if t.dtype == torch.float64:
                flags |= L.FLAG_SCALAR_F64
        table[r, L.FLAGS] = flags
        if elems == 0:
            direct_grad[r] = False  # no address is ever read
            continue
        shape, strides = p.shape, p.stride()
        if _dense(shape, strides) and not (p.is_conj() or p.is_neg()):
            table[r, L.PARAM] = p.data_ptr()
        else:
            if not _dense(shape, strides):
                strides = torch.empty(shape, device="meta").stride()  # contiguous
            staged.append((r, L.PARAM, i, 0, True, shape, strides))
        key = _layout(shape, strides)
        for c in range(1, len(cols)):
            col = where[c]
            if col == L.STEP or c in scalar_cols:
                continue
            if col in _SCALE_COLS:
                table[r, col] = cols[c][i].data_ptr()  # (build: a dense float32 vector)
                continue
            t = cols[c][i]
            if _layout(t.shape, t.stride()) == key and not (t.is_conj() or t.is_neg()):
                if c != 1:
                    table[r, col] = t.data_ptr()
            else:
                staged.append((r, col, i, c, c != 1, shape, strides))
                if c == 1:
                    direct_grad[r] = False
    role = [c for c in range(2, len(cols)) if where[c] in _ROLE_COLS and c not in scalar_cols]
    state_dtype = cols[role[0]][rows[0]].dtype if role else None
    if state_dtype is not None and state_dtype.is_complex:
        state_dtype = state_dtype.to_real()
    rows = np.array(rows, dtype=np.int64)
    every = direct_grad.all()
    return KernelUnit(device, dtype, module, kernel, rows, table, start,
                      None if every else direct_grad, rows if every else rows[direct_grad],
                      staged, bool(every and m == len(cols[0])), state_dtype)


def pack(params, grads, states, roles, steps=None, row_flags=None, backend="auto",
         state_dtype=None, scalars=()):
    """Validate and stage tensors into kernel batches (no cache, no torch rows).

    For driving a backend directly: every row must be one the kernels take.

    Returns:
        ``[(batch, finish)]`` per kernel unit, scratch copies filled: call
        ``finish()`` after the kernel to write staged params and state back.
    """
    flags = tuple(row_flags) if row_flags is not None else None
    plan = build(params, grads, states, roles, steps, flags, backend, state_dtype=state_dtype,
                 scalars=scalars)
    cols, _ = _columns(params, grads, states, steps)
    out = []
    for unit in plan.units:
        if isinstance(unit, TorchUnit):
            raise ValueError(f"rows {unit.rows} need torch's own step")
        batch, writeback = stage(unit, cols, plan.where, steps, plan.row_flags, plan.grad_ptrs)
        out.append((batch, functools.partial(_write_back, writeback)))
    return out


def _write_back(writeback):
    for dst, scratch in writeback:
        dst.copy_(scratch)


# ---------------------------------------------------------------- one step

@torch.compiler.disable
def run(update, jobs: list, grad_scale, found_inf, backend: str, cache,
        compiled: bool = False) -> None:
    """One step of every job (a param group's share): all are validated
    before any is written.

    ``update(job, key, grad_scale, found_inf, backend, cache, compiled)`` is
    the optimizer's (its class module's ``_update``, ``STEP_OP.update``): it
    validates one job, ``key`` its plan-cache key, and returns what writes
    it (None: nothing to do). A bad tensor in the last group raises with the
    first untouched (torch's loop has updated the groups before it by then).

    Never traced (``torch.compiler.disable``), from wherever it is called:
    while compiling, a graph break, and eagerly too, because an eager call
    may come from a frame dynamo gave up on (a sparse grad it cannot wrap),
    whose callees it still tries to compile one frame at a time: it traced
    into the Numba launcher. Costs ~0.4 us a call on the dev VM.
    """
    writes = []
    for key, job in enumerate(jobs):
        writes.append(update(job, key, grad_scale, found_inf, backend, cache, compiled))
    for write in writes:
        if write is not None:
            write()


@torch.compiler.disable
def validate(update, jobs: list, grad_scale, found_inf, backend: str, cache,
             compiled: bool = False) -> list:
    """Everything :func:`run` checks, raising torch's error; nothing is written.

    Returns:
        each job's update (None: nothing to do), not yet run.
    """
    return [update(job, key, grad_scale, found_inf, backend, cache, compiled)
            for key, job in enumerate(jobs)]


def prepare_update(kind, backend, params, grads, states, roles, hyper, reference,
                   steps=None, row_flags=None, cache=None, key=None, dry_all=False,
                   precision=None, scalars=()):
    """Validate one group's update by kernel ``kind``; return what writes it.

    ``kind`` is the optimizer record's ``kernel`` (``"sgd"``, ``"adam"``, ...).

    Everything that can raise is done here, before any tensor is written:
    the reuse rule on the cached plan (:func:`fused_optim._reuse_rule.holds`)
    or full validation (:func:`build`), the backends' choice, and torch's
    own step on stand-ins of the rows where torch may raise.

    Args:
        reference: ``reference(params, grads, states, steps, row_flags)`` runs
            torch's own for-loop step on those rows (lists as here, a subset
            of rows; states one list per role, None where absent) and
            returns the momentum buffers it created, or None. It runs rows
            the kernels do not take, and first, on stand-ins, every row
            where torch may raise, so that its exception comes before
            anything is written.
        cache, key: the optimizer's :class:`PlanCache` and this group's key
            in it (None: validate from scratch, keep nothing).
        dry_all: run that dry run on every row (hyperparameters with which
            torch's step raises).
        precision: the job's ``_precision.Precision`` (None: round to
            nearest). Its Kahan compensation buffers join the plan as the
            fourth state role (column COMP), validated like any state.
        scalars: indices of the state roles that are per-row scalars (see
            :func:`build`).

    Returns:
        A callable with no arguments that carries out the update.
    """
    if precision is not None and precision.comps is not None:
        n = len(params)
        states = [*states, *([[None] * n] * (3 - len(states))), precision.comps]
        roles = (*roles, *(("",) * (3 - len(roles))), "kahan_comp")
    if precision is not None and precision.scales is not None:
        n = len(params)
        states = [*states, *([[None] * n] * (4 - len(states))), *precision.scales]
        roles = (*roles, *(("",) * (4 - len(roles))),
                 *(_blockwise.absmax_key(r) for r in roles[:3]))
    if not _PLAIN_SET.issuperset(map(type, params)):
        params, grads = _local(params), _local(grads)
        states = [_local(s) for s in states]
        steps = _local(steps) if steps is not None else None
    cols, where = _columns(params, grads, states, steps)
    flags = tuple(row_flags) if row_flags is not None else None
    plan = cache.get(key) if cache is not None else None
    grad_ptrs = None
    # (the units' backend modules and kernels were chosen for the backend
    # requested then: ``opt.backend`` may have been set since)
    state_dtype = precision.state_dtype if precision is not None else None
    if plan is not None and plan.backend == backend and plan.state_dtype == state_dtype:
        grad_ptrs = _reuse_rule.holds(plan, cols, where, tuple(chain.from_iterable(cols)), flags)
    if grad_ptrs is None:
        plan = build(params, grads, states, roles, steps, flags, backend, kind,
                     state_dtype=state_dtype, scalars=scalars)
        grad_ptrs = plan.grad_ptrs
        if cache is not None:
            cache[key] = plan
    dry = range(len(params)) if dry_all else plan.dry_rows
    if dry:
        _dry_run(dry, params, grads, states, steps, row_flags, _widening(reference, state_dtype))
    retain = cache.retain if isinstance(cache, PlanCache) else None
    return functools.partial(execute, plan, cols, grad_ptrs, params, grads, states, steps,
                             row_flags, hyper, reference, retain, precision, key or 0)


def execute(plan, cols, grad_ptrs, params, grads, states, steps, row_flags, hyper, reference,
            retain, precision=None, key=0):
    """Carry out a validated plan: every unit in order, kernels and torch rows."""
    grad_scale, found_inf = hyper.get("grad_scale"), hyper.get("found_inf")
    torch_grads = grads
    if plan.has_torch_rows:
        if found_inf is not None and bool(found_inf != 0):
            torch_grads = None  # a skipped step; the kernels skip on their own
        elif grad_scale is not None:
            inv = grad_scale.double().reciprocal().float()  # as GradScaler.unscale_
            torch_grads = {i: grads[i] * inv.to(grads[i].device)
                           for u in plan.units if isinstance(u, TorchUnit) for i in u.rows}
    for u, unit in enumerate(plan.units):
        if isinstance(unit, TorchUnit):
            if torch_grads is not None:
                _torch_rows(unit.rows, params, torch_grads, states, steps, row_flags,
                            _widening(reference, precision and precision.state_dtype))
            continue
        batch, writeback = stage(unit, cols, plan.where, steps, plan.row_flags, grad_ptrs,
                                 retain)
        if precision is None:
            unit.kernel(batch, **hyper)
        else:
            unit.kernel(batch, **hyper, **precision.kernel_args(unit, key, u))
        for dst, scratch in writeback:
            dst.copy_(scratch)
    # The kernels write through raw addresses, which autograd cannot see. As
    # torch's for-loop does, count the in-place update of every param, so a
    # backward through a graph that saved a param before step() raises
    # instead of silently using the new values. (State tensors are never in a
    # graph; they are left alone. Inference tensors keep no count.)
    if torch.is_inference_mode_enabled():
        params = [p for p in params if not p.is_inference()]
    torch._C._increment_version(params)


def _local(ts):
    """Local shards of DTensors (FSDP2 params, grads and state), else as given.

    The kernels update a DTensor's local shard in place, with no gather; its
    state stays DTensor-shaped, exactly as torch.optim's under FSDP2.
    """
    return [t if t is None or type(t) in _PLAIN_SET else getattr(t, "_local_tensor", t)
            for t in ts]


def _subset(rows, params, grads, states, steps, row_flags):
    return ([params[i] for i in rows], [grads[i] for i in rows],
            [None if s is None or not s or s[0] is None else [s[i] for i in rows]
             for s in states],
            None if steps is None else [steps[i] for i in rows],
            None if row_flags is None else [row_flags[i] for i in rows])


def _widening(reference, state_dtype):
    """``reference`` (torch's for-loop on some rows), for the ``state_dtype`` option.

    torch's loop takes state in its param's dtype only: each state role the
    option stores otherwise is widened to the param's dtype for it, and the
    result stored back rounded to nearest (rows the kernels do not take, and
    the stand-ins that let torch raise first). Without the option, or for
    state of any other dtype, torch's loop gets the state as it is.
    """
    if state_dtype is None:
        return reference
    if state_dtype == torch.uint8:
        return _dequantizing(reference)

    def widened(ps, gs, ss, *rest):
        back = []
        wide = []
        for k, lst in enumerate(ss):
            if lst is None or k >= 3:  # (the fourth role: Kahan buffers, param dtype)
                wide.append(lst)
                continue
            out = []
            for p, t in zip(ps, lst):
                if (isinstance(t, torch.Tensor) and isinstance(p, torch.Tensor)
                        and t.dtype == stored_dtype(p.dtype, state_dtype) != p.dtype):
                    w = t.to(p.dtype)
                    back.append((t, w))
                    t = w
                out.append(t)
            wide.append(out)
        made = reference(ps, gs, wide, *rest)
        with torch.no_grad():
            for t, w in back:
                t.copy_(w)
        return made
    return widened


def _dequantizing(reference):
    """``reference`` for rows with 8-bit state (``state_bits=8``): torch's loop
    gets each role's codes dequantized to the param's dtype (roles 4..6 hold
    their scales), and the result is quantized back into the same codes and
    scales (``reference._blockwise``)."""
    def dequantized(ps, gs, ss, *rest):
        back = []
        wide = list(ss)
        for k in range(min(3, len(ss))):
            lst = ss[k]
            if lst is None or len(ss) <= 4 + k or ss[4 + k] is None:
                continue
            out = []
            for p, t, a in zip(ps, lst, ss[4 + k]):
                if isinstance(t, torch.Tensor) and t.dtype == torch.uint8:
                    w = _blockwise.dequantize(t, a, k, dtype=p.dtype)
                    back.append((w, k, t, a))
                    t = w
                out.append(t)
            wide[k] = out
        made = reference(ps, gs, wide, *rest)
        with torch.no_grad():
            for w, k, t, a in back:
                _blockwise.quantize(w, k, codes=t, absmax=a)
        return made
    return dequantized


def _torch_rows(rows, params, grads, states, steps, row_flags, reference):
    """Run torch's for-loop on ``rows``; keep the momentum buffers it creates."""
    ps, gs, ss, st, fr = _subset(rows, params, grads, states, steps, row_flags)
    made = with_sparse_grads_offset_free(reference, ps, gs, ss, st, fr)
    if made is not None:  # the buffers of this step's first momentum step
        for i, buf, new in zip(rows, made, fr):
            if new:
                # Behind the step operator (compiled steps) the caller keeps
                # the buffer it allocated for this row, not the list entry:
                # it gets the values of torch's. Eagerly the entry replaces
                # it, and the state holds torch's own buffer (sparse for a
                # sparse grad, as in torch).
                mine = states[0][i]
                if isinstance(mine, torch.Tensor) and mine is not buf:
                    with torch.no_grad():
                        mine.copy_(buf.to_dense() if buf.layout != torch.strided else buf)
                states[0][i] = buf


def with_sparse_grads_offset_free(reference, params, grads, states, *rest):
    """``reference(params, grads, states, *rest)``, safe from a torch bug.

    torch 2.13's CPU ``dense.add_(sparse)`` writes at twice a view's storage
    offset: with ``p = b[6:7]``, ``p.add_(g.to_sparse())`` changes ``b[12]``,
    and a view far enough into its storage is written past the allocation.
    torch's for-loop SGD does exactly that with a sparse grad. Where a row
    has a sparse grad, its param and dense state run on offset-free copies,
    copied back after: the update torch means, inside the tensor's memory.
    (The lists are the caller's own copies; their entries may be replaced.)
    """
    copies = {}  # by identity: a param listed twice is stepped twice, on one copy
    for k, g in enumerate(grads):
        if isinstance(g, torch.Tensor) and g.layout != torch.strided:
            for lst in [params, *(s for s in states if s is not None)]:
                t = lst[k]
                if (isinstance(t, torch.Tensor) and t.layout == torch.strided
                        and t.storage_offset() != 0):
                    if id(t) not in copies:
                        copies[id(t)] = (t, t.detach().clone(
                            memory_format=torch.contiguous_format))
                    lst[k] = copies[id(t)][1]
    made = reference(params, grads, states, *rest)
    with torch.no_grad():
        for t, copy in copies.values():
            t.copy_(copy)
    return made


def _stand_in(t):
    """A tensor torch's step treats as ``t`` for its checks, on its own memory.

    Same type of memory, dtype, device, sizes and strides (internal overlap
    included), conj and neg bits, and inference-ness; zeros as values,
    except a plain 1-element tensor (a step count), whose value is copied:
    torch's ZeroDivisionError for beta1 = -1 depends on it.
    """
    if not isinstance(t, torch.Tensor):
        return t  # (torch's step raises its own error for a non-tensor)
    if type(t) not in _PLAIN or t.layout != torch.strided or t.is_quantized:
        return t.clone()
    inference = t.is_inference() and not torch.is_inference_mode_enabled()
    with torch.inference_mode() if inference else contextlib.nullcontext():
        span = _reuse_rule.extent(t) // t.element_size()
        base = torch.zeros(max(span, 1), dtype=t.dtype, device=t.device)
        s = base.as_strided(t.shape, t.stride())
        if t.numel() == 1 and not (t.is_conj() or t.is_neg()):
            s.copy_(t)
        if t.is_conj():
            s = s.conj()
        if t.is_neg():
            s = torch._neg_view(s)
    return s


def _dry_run(rows, params, grads, states, steps, row_flags, reference):
    """torch's step on stand-ins of ``rows``: raises where torch's would."""
    ps, gs, ss, st, fr = _subset(rows, params, grads, states, steps, row_flags)
    reference(list(map(_stand_in, ps)), list(map(_stand_in, gs)),
              [None if s is None else list(map(_stand_in, s)) for s in ss],
              None if st is None else list(map(_stand_in, st)), fr)
