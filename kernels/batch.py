"""The unit of work handed to a backend."""

from __future__ import annotations

import numpy as np
import torch


class Batch:
    """Tensors of one (device, dtype) bucket, validated and ready for a kernel.

    Built by ``fused_optim._plan``; backends only read it. The compiled
    backends need only ``table``; the tensor lists, which the reference
    backend walks, are built on first access when the batch comes from a
    cached plan (``source``), since that costs ~2 us per tensor per step.

    Attributes:
        device: the device of every tensor in the batch.
        dtype: storage dtype of every param and grad in the batch (complex
            params are already viewed as real), and of the Kahan buffers.
        state_dtype: storage dtype of every state tensor (STATE0..2): ``dtype``
            unless the ``state_dtype`` option stores them otherwise.
        table: int64 array ``[rows, layout.NCOLS]`` of addresses and sizes.
        numel: total elements over all rows.
        params: params, in table row order.
        grads: gradients, same order; same shape, dtype and strides as params.
        states: one list per state role, in the order of the STATE0..2 columns
            of ``layout``; an entry
            is None where the role is absent (e.g. no amsgrad).
        steps: per-row step counters, 0-dim tensors (layout column STEP);
            empty for an optimizer without one (SGD).
        row_flags: per-row bools, the optimizer's own switch (layout
            FLAG_ROW; SGD: the momentum buffer is created this step); empty
            where unused.
        cache: a dict the backend may keep device buffers in between steps,
            owned by the caller's plan for these rows (None: nothing is
            kept).
        retain: ``retain(obj)`` keeps ``obj`` alive as long as the caller's
            optimizer: what a CUDA graph captured over the step reads
            (None: no owner).
    """

    _LISTS = ("params", "grads", "states", "steps", "row_flags")

    def __init__(self, device: torch.device, dtype: torch.dtype, table: np.ndarray,
                 numel: int, params=None, grads=None, states=None, steps=None,
                 row_flags=None, source=None, cache=None, retain=None, state_dtype=None):
        self.device = device
        self.state_dtype = dtype if state_dtype is None else state_dtype
        self.cache = cache
        self.retain = retain
        self.dtype = dtype
        self.table = table
        self.numel = numel
        self._source = source
        if source is None:
            self.params = params
            self.grads = grads
            self.states = states
            self.steps = steps if steps is not None else []
            self.row_flags = row_flags if row_flags is not None else []

    def __getattr__(self, name):
        # only reached for the lazily built lists of a batch from a cached plan
        if name in Batch._LISTS and self.__dict__.get("_source") is not None:
            self.__dict__.update(self._source())
            self._source = None
            return self.__dict__[name]
        raise AttributeError(name)
