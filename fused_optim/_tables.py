"""Turn a param group's tensors into validated, bucketed kernel batches.

Safety contract: a pointer reaches a kernel only after its tensor has been
checked here against its param: same device, dtype and shape, identical memory
layout, dense (every element once, no gaps), and wholly inside its storage.
Anything that fails the layout test is staged through a dense scratch copy and
copied back after the kernel; anything that fails the other tests is refused.

Speed: full validation costs ~15 us per tensor in Python, so its result is
cached as a :class:`Plan`. Every step still reads each tensor's address,
shape, strides, dtype and device (the *signature*). A plan is reused only when
the layouts are the ones it was validated for and every param, state and step
tensor is at the address it was validated at; the grad column is rewritten
from the addresses just read (grads are new tensors every step). A ``p.data``
swap, reloaded or replaced state, or a grad of another layout forces a full
re-validation: no stale address, no unchecked layout.
"""

from __future__ import annotations

from collections import defaultdict

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


def _signature(params, grads, states, steps, fresh):
    """Addresses (an int64 array, one row per param) and layout of every tensor.

    The hot loop of every step: one pass building tuples, one unrolled body
    per optimizer shape (Adam; SGD with and without momentum).
    """
    # Devices of grads and state are not re-read: the grad setter pins a
    # grad to its param's device, and a state tensor moved to another device
    # has a new address, which forces full validation anyway.
    ptrs = []
    lay = []
    n = len(params)
    if steps is not None:  # Adam: exp_avg, exp_avg_sq, max_exp_avg_sq (or None)
        for p, g, m, v, x, st in zip(params, grads, states[0], states[1], states[2], steps):
            ptrs.append((p.data_ptr(), g.data_ptr(), m.data_ptr(), v.data_ptr(),
                         0 if x is None else x.data_ptr(), st.data_ptr()))
            lay.append((p.shape, p.stride(), p.dtype, p.device, g.shape, g.stride(),
                        g.dtype, m.shape, m.stride(), m.dtype, v.shape, v.stride(),
                        v.dtype, None if x is None else (x.shape, x.stride(), x.dtype),
                        st.shape, st.dtype, st.device))
    elif fresh is not None:  # SGD with momentum: the buffers all exist by now
        for p, g, b, f in zip(params, grads, states[0], fresh):
            ptrs.append((p.data_ptr(), g.data_ptr(), b.data_ptr(), 0, 0, 0))
            lay.append((p.shape, p.stride(), p.dtype, p.device, g.shape, g.stride(),
                        g.dtype, b.shape, b.stride(), b.dtype, f))
    else:  # SGD without momentum: no state
        for p, g in zip(params, grads):
            ptrs.append((p.data_ptr(), g.data_ptr(), 0, 0, 0, 0))
            lay.append((p.shape, p.stride(), p.dtype, p.device, g.shape, g.stride(),
                        g.dtype))
    return np.array(ptrs, dtype=np.int64).reshape(n, 6), lay


class Plan:
    """A validated bucketing of one param group, reusable while its layout holds.

    Attributes:
        layout: the per-row layout signature it was validated for.
        buckets: (device, dtype, row indices, table) per bucket.
    """

    __slots__ = ("layout", "buckets", "needed", "ptrs")

    def __init__(self, layout, buckets, needed, ptrs):
        self.layout = layout
        self.buckets = buckets
        self.needed = needed
        self.ptrs = ptrs

    def addresses_hold(self, ptrs) -> bool:
        """Params, state and steps sit where they were validated, grads are live.

        A param or state tensor at a new address (``p.data = ...``, loaded
        state, a resized storage) sends the whole group back through full
        validation, storage bounds included. Gradients are new tensors every
        step, so for them the layout signature plus a non-null address is
        checked here; their storage bounds are checked on full validation.
        """
        if not np.array_equal(ptrs[:, _STABLE], self.ptrs[:, _STABLE]):
            return False
        return not (self.needed[:, 1] & (ptrs[:, 1] == 0)).any()


_PTR_COLS = [L.PARAM, L.GRAD, L.STATE0, L.STATE1, L.STATE2, L.STEP]
_STABLE = [0, 2, 3, 4, 5]  # every address column of _signature but the grad's


def prepare(params, grads, states, roles, steps=None, fresh=None, cache=None, key=None):
    """Validated kernel batches for one update, from a cached plan when possible.

    Args:
        params: params with a gradient, in group order.
        grads: their gradients (dense).
        states: one list per state role, aligned with params; None entries
            mark an absent role.
        roles: names of the state roles, for error messages.
        steps: Adam step counters (0-dim tensors), or None.
        fresh: SGD per-param "buffer created this step" flags, or None.
        cache: a dict owned by the optimizer, or None for no caching.
        key: this group's key in ``cache``.

    Returns:
        list of :class:`Packed`, one per (device, dtype) bucket.
    """
    ptrs, lay = _signature(params, grads, states, steps, fresh)
    plan = cache.get(key) if cache is not None else None
    if plan is not None and plan.layout == lay and plan.addresses_hold(ptrs):
        out = []
        for device, dtype, rows, table, numel in plan.buckets:
            table = table.copy()
            table[:, _PTR_COLS] = np.where(plan.needed[rows], ptrs[rows], 0)
            source = _lists_of(rows, params, grads, states, steps, fresh)
            out.append(Packed(device, Batch(device, dtype, table, numel, source=source), ()))
        return out
    packed = pack(params, grads, states, roles, steps=steps, fresh=fresh)
    if cache is not None:
        if all(not p.writeback for p in packed):
            buckets = [(p.device, p.batch.dtype, p.rows, p.batch.table, p.batch.numel)
                       for p in packed]
            needed = np.zeros(ptrs.shape, dtype=bool)
            for p in packed:
                needed[p.rows] = p.batch.table[:, _PTR_COLS] != 0
            cache[key] = Plan(lay, buckets, needed, ptrs)
        else:
            cache.pop(key, None)  # staged rows are re-staged every step
    return packed


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
