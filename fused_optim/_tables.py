"""Turn a param group's tensors into validated, bucketed kernel batches.

Safety contract: a pointer reaches a kernel only after its tensor has been
checked here against its param: same device, dtype and shape, identical memory
layout, dense (every element once, no gaps), and wholly inside its storage.
Anything that fails the layout test is staged through a dense scratch copy and
copied back after the kernel; anything that fails the other tests is refused.

Speed: full validation costs ~15 us per tensor in Python, so its result is
cached as a :class:`Plan`. Every step still reads each tensor's address,
shape, contiguity (strides, for rows dense in another layout) and dtype, and
each grad's device: the *signature*, read one fact per C-level ``map`` over a
column. A plan is reused only when the signature is the one it was validated
for and every param, state and step tensor is at the address it was
validated at; the grad column is rewritten from the addresses just read
(grads are new tensors every step). A ``p.data`` swap, reloaded or replaced
state, or a grad of another layout forces a full re-validation: no stale
address, no unchecked layout.
"""

from __future__ import annotations

from collections import defaultdict
from operator import attrgetter

import numpy as np
import torch

from .kernels import Batch
from .kernels import layout as L

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


def _layout(shape, strides):
    # strides of size-1 dims never matter
    return tuple(st for sz, st in zip(shape, strides) if sz != 1)


def _in_storage(t) -> bool:
    end = (t.storage_offset() + t.numel()) * t.element_size()
    return end <= t.untyped_storage().nbytes()


class StateMismatchError(RuntimeError):
    """A state or gradient tensor does not fit its parameter."""


def _check(t, p, what, index):
    if t.device != p.device or t.dtype != p.dtype or t.shape != p.shape:
        raise StateMismatchError(
            f"{what} of parameter {index} does not match the parameter: got "
            f"{tuple(t.shape)} {t.dtype} on {t.device}, expected "
            f"{tuple(p.shape)} {p.dtype} on {p.device}. Was the optimizer state "
            "loaded from a checkpoint of a different model?"
        )


def _check_step(st, index):
    if not (torch.is_tensor(st) and st.numel() == 1
            and st.dtype in (torch.float32, torch.float64)
            and st.is_contiguous() and _in_storage(st)):
        raise StateMismatchError(
            f"state 'step' of parameter {index} must be a 1-element "
            f"float32 or float64 tensor, got {st!r}"
        )


class Packed:
    """One bucket: its batch plus the scratch copies to write back."""

    __slots__ = ("device", "batch", "writeback", "rows")

    def __init__(self, device, batch, writeback, rows=None):
        self.device = device
        self.batch = batch
        self.writeback = writeback
        self.rows = rows

    def finish(self):
        for original, staged in self.writeback:
            original.copy_(staged)


_PTR = torch.Tensor.data_ptr
_CONTIGUOUS = torch.Tensor.is_contiguous
_NUMEL = torch.Tensor.numel
_DTYPE = attrgetter("dtype")
_DEVICE = torch.Tensor.get_device
_VERSION = attrgetter("_version")


def _columns(params, grads, states, steps):
    """The tensor lists of one update, in table-column order, and those columns."""
    cols = [params, grads]
    where = [L.PARAM, L.GRAD]
    for lst, col in zip(states, (L.STATE0, L.STATE1, L.STATE2)):
        if lst and lst[0] is not None:  # a role is either present for every row or absent
            cols.append(lst)
            where.append(col)
    if steps is not None:
        cols.append(steps)
        where.append(L.STEP)
    return cols, where


def _signature(cols, fresh):
    """What one step must find unchanged before a plan's addresses are reused.

    The hot path of every step: one C-level ``map`` per fact and column,
    compared as whole arrays. Right after a step has streamed the tensors'
    data through the caches each map costs ~25-35 us per 161 tensors here,
    so which facts are read is a budget:

    * params: address, element count, contiguity and dtype. With contiguity,
      the element count pins the layout (a shape is only a view of it) at
      about half the price of reading the shape, which allocates a
      ``torch.Size``. Rows that are not contiguous (channels_last) also get
      shapes and strides compared (:func:`_strides`).
    * grads, new tensors every step: the same, and their device. The grad
      setter pins a grad to its param's device, but a ``p.data`` swap there
      and back could leave it elsewhere.
    * state and step tensors: address and version counter. They were
      checked in full when the plan was made; every in-place operation on a
      tensor (``resize_``, ``set_``, ``as_strided_``, ``t_``, ``zero_``...)
      counts a version, which the kernels' own writes do not, and assigning
      ``.data`` anywhere else moves the address. The plan also keeps their
      storages alive (:attr:`Plan.keep`), so a matching address can only
      point into memory validated for the whole row. (Reading a version
      costs one to two facts' worth, 32-55 us cold, and replaces three.)

    Returns:
        (stable, grad_ptrs, objs): int64 ``[rows of facts, params]`` that
        must equal the plan's; the grads' addresses; the dtype lists of
        params and grads and the SGD ``fresh`` flags.
    """
    params, grads = cols[0], cols[1]
    stable = [list(map(_PTR, params)), list(map(_NUMEL, params)),
              list(map(_CONTIGUOUS, params)), list(map(_NUMEL, grads)),
              list(map(_CONTIGUOUS, grads)), list(map(_DEVICE, grads))]
    stable += [list(map(_PTR, c)) for c in cols[2:]]
    stable += [list(map(_VERSION, c)) for c in cols[2:]]
    objs = (list(map(_DTYPE, params)), list(map(_DTYPE, grads)), fresh)
    return (np.array(stable, dtype=np.int64), np.array(list(map(_PTR, grads)), dtype=np.int64),
            objs)


#: rows of the ``stable`` array holding the params' contiguity and the grads'
_CONTIGUITY_ROWS = (2, 4)


def _strides(cols, rows):
    """Shapes and strides of params and grads in rows not both contiguous."""
    params, grads = cols[0], cols[1]
    return [(params[i].shape, params[i].stride(), grads[i].shape, grads[i].stride())
            for i in rows]


class Plan:
    """A validated bucketing of one param group, reusable while its signature holds.

    Attributes:
        where: the table column of each tensor column.
        stable, objs: the signature it was validated for (see
            :func:`_signature`); ``stable`` as bytes.
        grad_needed: bool per row, False where a zero-size grad may have a
            null address; None when every row needs a real one.
        strided: rows with a param or grad that is not contiguous, and their
            shapes and strides.
        buckets: (device, dtype, row indices, table, numel) per bucket; the
            tables hold the validated addresses.
        keep: the storages of the state and step tensors, kept alive so that
            their addresses cannot be reused by other memory. State replaced
            by hand is freed at the next step, which re-validates; loading a
            state_dict drops the plans at once.
    """

    __slots__ = ("where", "shape", "stable", "objs", "grad_needed", "strided",
                 "buckets", "keep")

    def __init__(self, where, stable, objs, grad_needed, strided, buckets, keep):
        self.where = where
        self.shape = stable.shape
        self.stable = stable.tobytes()
        self.objs = objs
        self.grad_needed = grad_needed
        self.strided = strided
        self.buckets = buckets
        self.keep = keep

    def holds(self, cols, where, stable, grad_ptrs, objs) -> bool:
        """Same signature, and a non-null address for every grad that needs one.

        A param, state or step tensor at a new address (``p.data = ...``,
        loaded or replaced state, a freed storage) sends the whole group back
        through full validation, storage bounds included.
        """
        if (where != self.where or stable.shape != self.shape
                or stable.tobytes() != self.stable or objs != self.objs):
            return False
        if self.grad_needed is None:
            if not grad_ptrs.all():
                return False
        elif (self.grad_needed & (grad_ptrs == 0)).any():
            return False
        rows, strides = self.strided
        return not rows or _strides(cols, rows) == strides


def prepare(params, grads, states, roles, steps=None, fresh=None, cache=None, key=None):
    """Validated kernel batches for one update, from a cached plan when possible.

    Args:
        params: params with a gradient, in group order.
        grads: their gradients (dense).
        states: one list per state role, aligned with params; a role is either
            None for every row (absent) or a tensor for every row.
        roles: names of the state roles, for error messages.
        steps: Adam step counters (0-dim tensors), or None.
        fresh: SGD per-param "buffer created this step" flags, or None.
        cache: a dict owned by the optimizer, or None for no caching.
        key: this group's key in ``cache``.

    Returns:
        list of :class:`Packed`, one per (device, dtype) bucket.
    """
    plan = cache.get(key) if cache is not None else None
    if plan is not None:
        cols, where = _columns(params, grads, states, steps)
        try:
            sig = _signature(cols, fresh)
        except (RuntimeError, AttributeError, TypeError):
            # a tensor without storage (sparse, freed) or a non-tensor state
            # value: full validation reports it
            sig = None
        if sig is not None and plan.holds(cols, where, *sig):
            grad_ptrs = sig[1] if plan.grad_needed is None else np.where(
                plan.grad_needed, sig[1], 0)
            out = []
            for device, dtype, rows, table, numel in plan.buckets:
                table = table.copy()
                table[:, L.GRAD] = grad_ptrs[rows]
                source = _lists_of(rows, params, grads, states, steps, fresh)
                out.append(Packed(device, Batch(device, dtype, table, numel, source=source), ()))
            return out
    packed = pack(params, grads, states, roles, steps=steps, fresh=fresh)
    if cache is not None:
        if all(not p.writeback for p in packed):
            cache[key] = _plan_of(packed, params, grads, states, steps, fresh)
        else:
            cache.pop(key, None)  # staged rows are re-staged every step
    return packed


def _plan_of(packed, params, grads, states, steps, fresh):
    """The Plan of a fully validated, unstaged packing."""
    cols, where = _columns(params, grads, states, steps)
    stable, _, objs = _signature(cols, fresh)
    grad_needed = np.zeros(len(params), dtype=bool)
    buckets = []
    for p in packed:
        b = p.batch
        grad_needed[p.rows] = b.table[:, L.GRAD] != 0
        buckets.append((p.device, b.dtype, p.rows, b.table, b.numel))
    contiguous = stable[list(_CONTIGUITY_ROWS)].all(axis=0)
    rows = [int(i) for i in np.flatnonzero(~contiguous)]
    keep = [t.untyped_storage() for c in cols[2:] for t in c]
    return Plan(where, stable, objs, None if grad_needed.all() else grad_needed,
                (rows, _strides(cols, rows)), buckets, keep)


def _real(ts):
    return [t if t is None or not t.is_complex() else torch.view_as_real(t) for t in ts]


def _lists_of(rows, params, grads, states, steps, fresh):
    """The tensor lists of a planned bucket, built only if a backend asks."""
    def build():
        return dict(
            params=_real([params[i] for i in rows]),
            grads=_real([grads[i] for i in rows]),
            states=[_real([s[i] for i in rows]) for s in states],
            steps=[steps[i] for i in rows] if steps is not None else [],
            fresh=[fresh[i] for i in rows] if fresh is not None else [])
    return build


def pack(params, grads, states, roles, steps=None, fresh=None, labels=None):
    """Fully validate and bucket tensors by (device, dtype) into kernel batches.

    Same arguments as :func:`prepare`, without caching; ``labels`` are
    per-param indices for error messages.
    """
    buckets = defaultdict(list)
    for i, p in enumerate(params):
        buckets[(p.device, p.dtype)].append(i)
    out = []
    for (device, _), rows in buckets.items():
        packed = _pack_bucket(device, rows, params, grads, states, roles,
                              steps, fresh, labels)
        packed.rows = np.array(rows, dtype=np.int64)
        out.append(packed)
    return out


def _pack_bucket(device, rows, params, grads, states, roles, steps, fresh, labels):
    n = len(rows)
    table = np.zeros((n, L.NCOLS), dtype=np.int64)
    b_params, b_grads = [], []
    b_states = [[] for _ in states]
    b_steps, b_fresh = [], []
    writeback = []
    start = 0
    dtype = None
    for r, i in enumerate(rows):
        label = labels[i] if labels is not None else i
        p = params[i]
        g = grads[i]
        _check(g, p, "gradient", label)
        row_states = [s[i] for s in states]
        for t, role in zip(row_states, roles):
            if t is not None:
                _check(t, p, f"state {role!r}", label)
        if steps is not None:
            _check_step(steps[i], label)
        if p.is_complex():
            p = torch.view_as_real(p)
            g = torch.view_as_real(g)
            row_states = [None if t is None else torch.view_as_real(t) for t in row_states]
        dtype = p.dtype
        numel = p.numel()
        whats = ("", "gradient of ", *(f"state {r!r} of " for r in roles))
        for t, what in zip((p, g, *row_states), whats):
            if t is not None and not _in_storage(t):
                # torch's own step would read freed memory here (it crashes)
                raise StateMismatchError(
                    f"{what}parameter {label} lies outside its storage "
                    f"({t.untyped_storage().nbytes()} bytes); was its storage freed "
                    "or resized?")
        shape, strides = p.shape, p.stride()
        direct = _dense(shape, strides)
        key = _layout(shape, strides) if direct else None

        def place(t, mutable):
            if direct and _layout(t.shape, t.stride()) == key:
                return t
            if direct:
                s = torch.empty_strided(shape, strides, dtype=dtype, device=device)
            else:
                s = torch.empty(shape, dtype=dtype, device=device)
            s.copy_(t)
            if mutable:
                writeback.append((t, s))
            return s

        if direct:
            kp = p
        else:
            kp = place(p, True)
            # companions now follow the dense scratch copy's layout
            direct = True
            shape, strides = kp.shape, kp.stride()
            key = _layout(shape, strides)
        kg = place(g, False)
        ks = [None if t is None else place(t, True) for t in row_states]
        b_params.append(kp)
        b_grads.append(kg)
        for lst, t in zip(b_states, ks):
            lst.append(t)
        if numel:
            table[r, L.PARAM] = kp.data_ptr()
            table[r, L.GRAD] = kg.data_ptr()
            for col, t in zip((L.STATE0, L.STATE1, L.STATE2), ks):
                if t is not None:
                    table[r, col] = t.data_ptr()
        table[r, L.NUMEL] = numel
        table[r, L.START] = start
        start += numel
        flags = 0
        if steps is not None:
            st = steps[i]
            table[r, L.STEP] = st.data_ptr()
            if st.dtype == torch.float64:
                flags |= L.FLAG_STEP_F64
            if st.device != device:
                flags |= L.FLAG_STEP_HOST
            b_steps.append(st)
        if fresh is not None:
            if fresh[i]:
                flags |= L.FLAG_FRESH
            b_fresh.append(fresh[i])
        table[r, L.FLAGS] = flags
    batch = Batch(device, dtype, table, start, params=b_params, grads=b_grads,
                  states=b_states, steps=b_steps, fresh=b_fresh)
    return Packed(device, batch, writeback)
