"""The reuse rule: what a cached plan trusts between steps, and why.

Full validation (:func:`fused_optim._plan.build`) turns one param group's
tensors into a :class:`~fused_optim._plan.Plan`: which rows the kernels
take and which run torch's own for-loop, which tensors are staged through
scratch copies, the order of rows whose memory overlaps, and the address
table. Every one of those decisions is a function of the facts below, read
per tensor. A plan is reused at a later step only when each fact is re-read
and equal, or provably unchanged; anything else sends the group back through
full validation before any kernel runs. This module is the one place that
reads them.

=====  ===========================================  ==========  ====================================
fact   what                                         roles       how the next step knows it
=====  ===========================================  ==========  ====================================
F1     exact Python type, dtype, device, shape,     all         re-read: one C++ ``TensorGuards``
       strides, dispatch keys (conj and neg bits,               check over every tensor
       zero-tensor, sparse/mkldnn layouts, Python               (:class:`MetaGuard`), which also
       subclasses, inference tensors) and                       applies the thread's dispatch state
       ``requires_grad``                                        (entering ``inference_mode`` fails it)
F2     address (``data_ptr``)                       all         re-read; equal for param, state and
                                                                step; the grads' new ones fill the
                                                                table
F3     the bytes a row touches, ``[ptr, ptr +       param,      proved: the plan holds the storage
       extent)``, lie in a live allocation          state,      ``S`` each lay in when validated and
                                                    step        re-reads ``S.data_ptr()`` and
                                                                ``S.nbytes()`` (see below)
F4     the same for grads                           grad        re-read: each grad's current
                                                                storage's ``nbytes()`` and the
                                                                grad's ``storage_offset()``
F5     which rows' bytes overlap (order, torch      all         param/state/step: a function of F1
       path for a row overlapping itself)                       and F2; grads: re-checked against
                                                                the written ranges when they moved
F6     the optimizer's per-row flags (row_flags)    state       re-read from the list passed in
=====  ===========================================  ==========  ====================================

The extent of a tensor is ``(1 + sum((size - 1) * stride)) * itemsize``
bytes (0 for no elements), a function of F1 alone: strides are never
negative in torch.

**Why F3 is enough without reading each tensor's storage.** At validation
``[ptr, ptr + extent)`` lay inside ``[S.ptr, S.ptr + S.nbytes)``. At a later
step F2 gives the same ``ptr``, F1 the same extent and F3's reads the same
``S.ptr`` and ``S.nbytes``, so the bytes still lie inside ``S``'s current
allocation, which is live because the plan holds ``S`` (a storage that does
not own its memory holds what does, as torch's own tensors rely on). That
holds whether or not the tensor still uses ``S`` (``p.data = ...`` onto the
same address), and whatever happened in between:

* ``S.resize_(0)`` then back to a smaller size, even at the old address:
  ``nbytes`` differs, so the group is re-validated and a tensor that no
  longer fits raises a clear error (torch's own step would read and write
  past the allocation there);
* a resize to another address: ``S.ptr`` differs, and the tensor's own
  address moves with it;
* back to the very same size at the very same address: the bytes are live
  and ``S``'s; they hold whatever the allocator left, which is exactly what
  torch's for-loop would read too.

**What is deliberately not trusted.** The autograd version counter: it does
not move for ``.data`` assignment or for a storage resize. Object identity:
a new grad, or a state entry replaced by a view of the old one, has
identical facts or is caught by them.
"""

from __future__ import annotations

import functools
from itertools import chain

import numpy as np
import torch

__all__ = ["holds", "MetaGuard", "extent", "held_storages", "storage_facts",
           "grad_bounds_ok", "WrittenRanges"]

T = torch.Tensor
US = torch.UntypedStorage
_PTR = T.data_ptr
_OFFSET = T.storage_offset
_STORAGE = T.untyped_storage
_NBYTES = US.nbytes
_SPTR = US.data_ptr


def extent(t) -> int:
    """Bytes from ``t``'s first element to the end of its last (0 if empty)."""
    if t.numel() == 0:
        return 0
    return (1 + sum((n - 1) * s for n, s in zip(t.shape, t.stride()))) * t.element_size()


# ---------------------------------------------------------------- F1

def _python_facts(t):
    return (type(t), t.dtype, t.device, t.shape, t.stride(), t.is_conj(), t.is_neg(),
            t.layout, t.is_inference(), t.requires_grad, t._is_zerotensor())


class _PythonGuard:
    """F1 read in Python: the fallback where TensorGuards is missing or unsound."""

    def __init__(self, tensors):
        self._facts = list(map(_python_facts, tensors))
        self._mode = torch.is_inference_mode_enabled()

    def check(self, *tensors) -> bool:
        return (len(tensors) == len(self._facts)
                and torch.is_inference_mode_enabled() == self._mode
                and list(map(_python_facts, tensors)) == self._facts)


def _CppGuard(tensors):
    """F1 read by dynamo's C++ ``TensorGuards``: ~40 ns a tensor instead of ~1 us.

    It compares exact Python type, dispatch key set (after the thread's
    include/exclude state), dtype, device index, ``requires_grad``, and every
    size and stride (all static here). Returned as it is, so that its
    ``check(*tensors)`` is one C call with no Python frame around it; a
    wrong count raises TypeError there, which :func:`holds` takes as "does
    not hold".
    """
    from torch._C._dynamo.guards import TensorGuards

    return TensorGuards(*tensors,
                        dynamic_dims_sizes=[list(t.shape) for t in tensors],
                        dynamic_dims_strides=[list(t.stride()) for t in tensors])


@functools.cache
def _guard_class():
    """:class:`_CppGuard` if it catches every change F1 names, else :class:`_PythonGuard`.

    TensorGuards is torch-internal, so it is tried once against one change
    of each kind before it is trusted.
    """
    try:
        base = torch.nn.Parameter(torch.zeros(2, 3))
        c = torch.zeros(2, 3, dtype=torch.complex64)
        with torch.inference_mode():
            inference = torch.zeros(2, 3)
        probes = [base.detach(), c]
        guard = _CppGuard(probes)
        if not guard.check(*probes):
            return _PythonGuard
        changed = [
            [base.detach().t().contiguous().t(), c],        # strides
            [torch.zeros(3, 2), c],                          # shape
            [torch.zeros(2, 3, dtype=torch.float64), c],     # dtype
            [base.detach().requires_grad_(), c],             # requires_grad
            [base, c],                                       # Python type
            [base.detach(), c.conj()],                       # conj bit
            [c.conj().imag, c],                              # neg bit
            [inference, c],                                  # inference tensor
            [torch.zeros(2, 3).to_sparse(), c],              # layout
        ]
        if any(guard.check(*ts) for ts in changed):
            return _PythonGuard
        return _CppGuard
    except Exception:  # noqa: BLE001 - any failure means: do not use it
        return _PythonGuard


class _NeverGuard:
    """For a column holding something other than a tensor: never reused."""

    def __init__(self, tensors):
        pass

    def check(self, *tensors) -> bool:
        return False


def MetaGuard(tensors):
    """F1 of ``tensors`` now; ``.check(*tensors)`` says whether it still holds."""
    if not all(isinstance(t, torch.Tensor) for t in tensors):
        return _NeverGuard(tensors)
    return _guard_class()(tensors)


# ---------------------------------------------------------------- F3

def held_storages(tensors):
    """The distinct storages of ``tensors`` with elements (F3), in first-seen order."""
    seen = {}
    for t in tensors:
        if t.numel():
            s = t.untyped_storage()
            seen.setdefault(s._cdata, s)
    return list(seen.values())


def storage_facts(storages) -> bytes:
    """F3's reads: every held storage's address and size, as one bytes blob."""
    return (np.fromiter(map(_SPTR, storages), np.int64, len(storages)).tobytes()
            + np.fromiter(map(_NBYTES, storages), np.int64, len(storages)).tobytes())


# ---------------------------------------------------------------- F4

def grad_bounds_ok(grads, extents, itemsizes, nonempty) -> bool:
    """F4: every non-empty grad lies inside its current storage.

    ``extents``/``itemsizes`` are the grads' (fixed by F1) as int64 arrays;
    ``nonempty`` is a bool array (or None when every grad has elements).
    """
    n = len(grads)
    nbytes = np.fromiter(map(_NBYTES, map(_STORAGE, grads)), np.int64, n)
    offsets = np.fromiter(map(_OFFSET, grads), np.int64, n)
    fits = offsets * itemsizes + extents <= nbytes
    if nonempty is not None:
        fits |= ~nonempty
    return np.count_nonzero(fits) == n


# ---------------------------------------------------------------- F5

class WrittenRanges:
    """The byte ranges a step writes (params, state, steps), for F5's grad check.

    Sorted by start, with the running maximum of their ends behind a -1, so
    that "does ``[a, b)`` overlap any of them" is one ``searchsorted`` for all
    grads: the ranges starting before ``b`` reach past ``a``.
    """

    __slots__ = ("starts", "max_ends")

    def __init__(self, starts, ends):
        order = np.argsort(np.asarray(starts, dtype=np.int64), kind="stable")
        self.starts = np.asarray(starts, dtype=np.int64)[order]
        ends = np.asarray(ends, dtype=np.int64)[order]
        self.max_ends = np.concatenate([[-1], np.maximum.accumulate(ends)]).astype(np.int64)

    def hit(self, starts, ends) -> np.ndarray:
        """Bool per range ``[starts, ends)``: does it overlap a written range?"""
        return self.max_ends[np.searchsorted(self.starts, ends)] > starts


# ---------------------------------------------------------------- the rule

def f1_metadata(plan, flat) -> bool:
    return plan.guard.check(*flat)


def f2_addresses(plan, cols) -> bool:
    """Params, state and steps at the addresses validated (grads: see holds)."""
    n = plan.n * (len(cols) - 1)
    return np.fromiter(map(_PTR, chain(cols[0], *cols[2:])), np.int64, n).tobytes() == plan.ptrs


def f3_held_storages(plan) -> bool:
    return storage_facts(plan.held) == plan.storages


def f4_grad_bounds(plan, grads) -> bool:
    return grad_bounds_ok(grads, plan.grad_ext, plan.grad_isz, plan.grad_nonempty)


def f5_grad_overlaps(plan, grad_ptrs) -> bool:
    """The grads overlap no written range, or sit where they were validated."""
    # (numpy's reductions cost ~7 us each on 161 elements here; bytes
    # comparison and count_nonzero ~1.5 us)
    if grad_ptrs.tobytes() == plan.grad_ptr_bytes:
        return True
    if plan.grad_hits:
        return False  # the order was decided for those exact addresses
    hit = plan.written.hit(grad_ptrs, grad_ptrs + plan.grad_ext)
    if plan.grad_nonempty is not None:
        hit &= plan.grad_nonempty
    return not np.count_nonzero(hit)


def f6_flags(plan, row_flags) -> bool:
    return row_flags == plan.row_flags


def holds(plan, cols, where, flat, row_flags):
    """The reuse rule: this step's grad addresses if F1-F6 all hold, else None.

    ``cols`` are the tensor columns (params, grads, state roles, steps),
    ``where`` their table columns and ``flat`` all of them in one list.
    Each ``f*`` above reads one fact of the table in the module docstring;
    tests/test_plan_cache.py switches each off in turn and shows a scenario
    that then goes wrong.
    """
    if where != plan.where or len(cols[0]) != plan.n or not f6_flags(plan, row_flags):
        return None
    try:
        if not (f1_metadata(plan, flat) and f2_addresses(plan, cols)
                and f3_held_storages(plan) and f4_grad_bounds(plan, cols[1])):
            return None
        grad_ptrs = np.fromiter(map(_PTR, cols[1]), np.int64, plan.n)
    except (RuntimeError, TypeError, AttributeError, NotImplementedError):
        # a tensor without storage, a non-tensor, a wrong count: revalidate
        return None
    return grad_ptrs if f5_grad_overlaps(plan, grad_ptrs) else None
