"""Turn a param group's tensors into validated, bucketed kernel batches.

Safety contract: a pointer reaches a kernel only after its tensor has been
checked here against its param: same device, dtype and shape, identical memory
layout, dense (every element once, no gaps), and wholly inside its storage.
Anything that fails the layout test is staged through a dense scratch copy and
copied back after the kernel; anything that fails the other tests is refused.
Addresses are read afresh at every step, so a swapped ``p.data``, a new grad or
reloaded state can never leave a stale address in a table.
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


class Packed:
    """One bucket: its batch plus the scratch copies to write back."""

    __slots__ = ("device", "batch", "writeback")

    def __init__(self, device, batch, writeback):
        self.device = device
        self.batch = batch
        self.writeback = writeback

    def finish(self):
        for original, staged in self.writeback:
            original.copy_(staged)


def pack(params, grads, states, roles, steps=None, fresh=None, labels=None):
    """Validate and bucket tensors by (device, dtype) into kernel batches.

    Args:
        params: params with a gradient, in group order.
        grads: their gradients (dense).
        states: one list per state role, aligned with params; None entries
            mark an absent role.
        roles: names of the state roles, for error messages.
        steps: Adam step counters (0-dim tensors), or None.
        fresh: SGD per-param "buffer created this step" flags, or None.
        labels: per-param indices used in error messages.

    Returns:
        list of :class:`Packed`, one per (device, dtype).
    """
    buckets = defaultdict(list)
    for i, p in enumerate(params):
        buckets[(p.device, p.dtype)].append(i)
    out = []
    for (device, _), rows in buckets.items():
        out.append(_pack_bucket(device, rows, params, grads, states, roles,
                                steps, fresh, labels))
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
        if p.is_complex():
            p = torch.view_as_real(p)
            g = torch.view_as_real(g)
            row_states = [None if t is None else torch.view_as_real(t) for t in row_states]
        dtype = p.dtype
        numel = p.numel()
        shape, strides = p.shape, p.stride()
        direct = _dense(shape, strides) and _in_storage(p)
        key = _layout(shape, strides) if direct else None

        def place(t, mutable):
            if direct and _layout(t.shape, t.stride()) == key and _in_storage(t):
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
            key = _layout(kp.shape, kp.stride())
            direct = True  # companions now follow the contiguous scratch layout
            shape, strides = kp.shape, kp.stride()
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
            if not (torch.is_tensor(st) and st.numel() == 1
                    and st.dtype in (torch.float32, torch.float64)
                    and st.is_contiguous() and _in_storage(st)):
                raise StateMismatchError(
                    f"state 'step' of parameter {label} must be a 1-element "
                    f"float32 or float64 tensor, got {st!r}"
                )
            table[r, L.STEP] = st.data_ptr()
            if st.dtype == torch.float64:
                flags |= L.FLAG_STEP_F64
            b_steps.append(st)
        if fresh is not None:
            if fresh[i]:
                flags |= L.FLAG_FRESH
            b_fresh.append(fresh[i])
        table[r, L.FLAGS] = flags
    batch = Batch(dtype=dtype, params=b_params, grads=b_grads, states=b_states,
                  steps=b_steps, fresh=b_fresh, table=table, numel=start)
    return Packed(device, batch, writeback)
