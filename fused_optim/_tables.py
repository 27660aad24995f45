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
hold; :mod:`fused_optim._facts` lists those facts and why each is re-read
or provably unchanged.
"""

from __future__ import annotations

import heapq
from collections import defaultdict
from itertools import chain

import numpy as np
import torch

from . import _backend, _facts
from .kernels import Batch
from .kernels import layout as L

_PLAIN = (torch.Tensor, torch.nn.Parameter)
_STEP_DTYPES = (torch.float32, torch.float64)
#: the state roles' columns: an optimizer's own roles, in order, then the
#: Kahan compensation buffer (``kahan_sum``), always the fourth role
_STATE_COLS = (L.STATE0, L.STATE1, L.STATE2, L.COMP)


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


class StateMismatchError(RuntimeError):
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
    ext = _facts.extent(t)
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

class KernelUnit:
    """Rows of one (device, dtype) that share no byte: one backend call.

    Attributes:
        module: the backend kernel module.
        rows: int64 group row indices, in group order.
        table: the address table with every direct param/state/step address
            (the grads' and scratch copies' are filled in at each step).
        numel: elements over all rows.
        direct_grad: bool per unit row, or None when every grad is direct.
        staged: ``(unit row, column, group row, column index, write back?,
            shape, strides)`` per tensor staged through a scratch copy.
        whole: the unit is every row of the group, in order, with every grad
            direct (the usual case: the grads' addresses go in as they are).
    """

    __slots__ = ("device", "dtype", "module", "rows", "table", "numel",
                 "direct_grad", "staged", "grad_rows", "whole", "device_cache")

    def __init__(self, device, dtype, module, rows, table, numel, direct_grad, staged, n):
        self.device = device
        self.dtype = dtype
        self.module = module
        self.rows = rows
        self.table = table
        self.numel = numel
        self.direct_grad = None if direct_grad.all() else direct_grad
        self.grad_rows = rows if self.direct_grad is None else rows[direct_grad]
        self.staged = staged
        self.whole = len(rows) == n and self.direct_grad is None
        self.device_cache = {}  # the backend's, for these rows (Batch.cache)


class TorchUnit:
    """Rows that run torch's own for-loop step, in group order."""

    __slots__ = ("rows",)

    def __init__(self, rows):
        self.rows = rows


class Staged:
    """One kernel unit of one step: its batch, and the copies around the kernel."""

    __slots__ = ("module", "batch", "stage_in", "writeback")

    def __init__(self, module, batch, stage_in, writeback):
        self.module = module
        self.batch = batch
        self.stage_in = stage_in
        self.writeback = writeback

    def start(self):
        for scratch, src in self.stage_in:
            scratch.copy_(src)

    def finish(self):
        for dst, scratch in self.writeback:
            dst.copy_(scratch)


def _real(t):
    return torch.view_as_real(t) if t.is_complex() else t


def staged_unit(unit, cols, where, steps, row_flags, grad_ptrs, retain=None) -> Staged:
    """The batch of ``unit`` for this step's tensors (see :class:`Staged`)."""
    table = unit.table.copy()
    if len(unit.grad_rows):
        if unit.whole:
            table[:, L.GRAD] = grad_ptrs
        elif unit.direct_grad is None:
            table[:, L.GRAD] = grad_ptrs[unit.rows]
        else:
            table[unit.direct_grad, L.GRAD] = grad_ptrs[unit.grad_rows]
    stage_in, writeback, scratch = [], [], {}
    for r, col, i, c, back, shape, strides in unit.staged:
        src = cols[c][i]
        s = torch.empty_strided(shape, strides, dtype=src.dtype, device=src.device)
        stage_in.append((s, src))
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
                  cache=unit.device_cache, retain=retain)
    return Staged(unit.module, batch, stage_in, writeback)


# ---------------------------------------------------------------- the plan

class Plan:
    """A validated plan of one group's step, reusable while its facts hold.

    Attributes (see :mod:`fused_optim._facts` for F1-F6):
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

    __slots__ = ("where", "n", "guard", "ptrs", "held", "storages", "grad_ext",
                 "grad_isz", "grad_nonempty", "written", "grad_ptrs", "grad_ptr_bytes",
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


def build(params, grads, states, roles, steps, row_flags, backend, labels=None):
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
        labels: per-param indices for error messages (default: row index).

    Raises:
        StateMismatchError: a tensor lies outside its storage.
        RuntimeError: the backend cannot run these tensors (with a fix).
    """
    n = len(params)
    cols, where = _columns(params, grads, states, steps)
    nstate = sum(1 for c in where if c in _STATE_COLS)
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
                    raise StateMismatchError(
                        f"{whats[c]}parameter {label} lies outside its storage "
                        f"({t.untyped_storage().nbytes()} bytes); was its storage "
                        "freed or resized?")
        torch_row = not plain
        unusual = not plain
        if plain:
            for t in row[1:1 + 1 + nstate]:
                if t.dtype != p.dtype or t.shape != p.shape or t.device != p.device:
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
                ext = _facts.extent(t)
                if ext:
                    ptr = t.data_ptr()
                    intervals.append((ptr, ptr + ext, i, c != 1))
            g = row[1]
            grad_ext[i] = _facts.extent(g)
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
                buckets[(params[i].device, params[i].dtype, host_step)].append(i)
        for (device, dtype, _), rows in buckets.items():
            units.append(_kernel_unit(cols, where, steps, row_flags, rows, device,
                                      modules[(device, dtype)]))
        if torch_rows:
            units.append(TorchUnit(torch_rows))

    plan = Plan()
    plan.where = where
    plan.n = n
    plan.guard = _facts.MetaGuard(tuple(chain.from_iterable(cols)))
    rest = list(chain.from_iterable(cols[2:]))
    # (a tensor without storage, e.g. a sparse grad of a torch row, gets 0:
    # the cached path's own read of it raises, and the group is re-validated)
    plan.ptrs = np.fromiter(map(_ptr_or_0, chain(params, rest)), np.int64,
                            n + len(rest)).tobytes()
    plain_written = [t for t in chain(params, rest) if _plain_strided(t)]
    plan.held = _facts.held_storages(plain_written)
    plan.storages = _facts.storage_facts(plan.held)
    plan.grad_ext = grad_ext
    plan.grad_isz = grad_isz
    plan.grad_nonempty = None if grad_ext.all() else grad_ext > 0
    ws = [(a, b) for a, b, _, w in intervals if w]
    plan.written = _facts.WrittenRanges([a for a, _ in ws], [b for _, b in ws])
    plan.grad_ptrs = np.fromiter(map(_ptr_or_0, grads), np.int64, n)
    plan.grad_ptr_bytes = plan.grad_ptrs.tobytes()
    hit = plan.written.hit(plan.grad_ptrs, plan.grad_ptrs + grad_ext)
    plan.grad_hits = bool((hit & (grad_ext > 0)).any())
    plan.row_flags = row_flags
    plan.units = units
    plan.dry_rows = [i for i in range(n) if dry[i]]
    plan.has_torch_rows = any(isinstance(u, TorchUnit) for u in units)
    return plan


def _kernel_unit(cols, where, steps, row_flags, rows, device, module):
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
            if col == L.STEP:
                continue
            t = cols[c][i]
            if _layout(t.shape, t.stride()) == key and not (t.is_conj() or t.is_neg()):
                if c != 1:
                    table[r, col] = t.data_ptr()
            else:
                staged.append((r, col, i, c, c != 1, shape, strides))
                if c == 1:
                    direct_grad[r] = False
    return KernelUnit(device, dtype, module, np.array(rows, dtype=np.int64), table,
                      start, direct_grad, staged, len(cols[0]))


def prepare(params, grads, states, roles, steps=None, row_flags=None, backend="auto",
            cache=None, key=None):
    """The plan for this step and the grads' addresses, reusing a cached plan.

    Returns:
        (plan, cols, grad_ptrs): the tensor columns (see :func:`_columns`) and
        the grads' addresses (int64 per row), which feed the tables.
    """
    cols, where = _columns(params, grads, states, steps)
    flags_t = tuple(row_flags) if row_flags is not None else None
    plan = cache.get(key) if cache is not None else None
    if plan is not None:
        grad_ptrs = _facts.holds(plan, cols, where, tuple(chain.from_iterable(cols)), flags_t)
        if grad_ptrs is not None:
            return plan, cols, grad_ptrs
    plan = build(params, grads, states, roles, steps, flags_t, backend)
    if cache is not None:
        cache[key] = plan
    return plan, cols, plan.grad_ptrs


class Packed:
    """One kernel unit's batch, for kernel-level tests (see :func:`pack`)."""

    __slots__ = ("device", "batch", "_staged")

    def __init__(self, staged):
        self._staged = staged
        self.batch = staged.batch
        self.device = staged.batch.device

    def finish(self):
        self._staged.finish()


def pack(params, grads, states, roles, steps=None, row_flags=None, backend="auto"):
    """Validate and stage tensors into kernel batches (no cache, no torch rows).

    For driving a backend directly: every row must be one the kernels take.
    Each returned :class:`Packed` has had its scratch copies filled; call
    ``finish()`` after the kernel to write staged params and state back.
    """
    plan, cols, grad_ptrs = prepare(params, grads, states, roles, steps=steps,
                                    row_flags=row_flags, backend=backend)
    out = []
    for unit in plan.units:
        if isinstance(unit, TorchUnit):
            raise ValueError(f"rows {unit.rows} need torch's own step")
        s = staged_unit(unit, cols, plan.where, steps, plan.row_flags, grad_ptrs)
        s.start()
        out.append(Packed(s))
    return out
