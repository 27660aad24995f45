"""The unit of work handed to a backend."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch


@dataclass
class Batch:
    """Tensors of one (device, dtype) bucket, validated and ready for a kernel.

    Built by ``fused_optim._tables``; backends only read it.

    Attributes:
        dtype: storage dtype of every tensor in the batch (complex params are
            already viewed as real).
        params: params, in table row order.
        grads: gradients, same order; same shape, dtype and strides as params.
        states: one list per state role (see ``layout.STATE_ROLES``); an entry
            is None where the role is absent (e.g. no amsgrad).
        steps: per-row step counters (Adam), 0-dim tensors; empty for SGD.
        fresh: per-row flag (SGD): momentum buffer created this step.
        table: int64 array ``[rows, layout.NCOLS]`` of addresses and sizes.
        numel: total elements over all rows.
        device_table: a copy of ``table`` on the tensors' device, for GPU
            backends (None on CPU).
    """

    dtype: torch.dtype
    params: list
    grads: list
    states: list
    steps: list = field(default_factory=list)
    fresh: list = field(default_factory=list)
    table: np.ndarray | None = None
    numel: int = 0
    device_table: object = None
