"""Numba CPU backend: one jitted call per batch updates every tensor in it.

The launchers here own the work split (``bounds``) and cast hyperparameters to
the compute type; the jitted bodies live in ``_kernels``.
"""

from __future__ import annotations

import contextlib
import functools
import threading
import warnings

import numba
import numpy as np
from numba.core.errors import NumbaIRAssumptionWarning

from . import _kernels
from ._memory import VIEW_DTYPES

__all__ = ["sgd", "adam", "advance_host_steps", "SUPPORTED_DTYPES"]

# numba's SSA pass flags branches in our inlined helpers and bf16/fp16 overloads
# ("variable ... is not in scope"); the code is right (the conversions are
# tested bit for bit against torch), so only that message is hidden.
warnings.filterwarnings("ignore", category=NumbaIRAssumptionWarning,
                        message=r"variable '_")

# the contract (kernels/contract.py)
NAME = "numba"
DEVICES = ("cpu",)
INTERPRETED_DEVICES = ()
SUPPORTED_DTYPES = tuple(VIEW_DTYPES)
INSTALL_HINT = "pip install numba"
DEVICE_HINT = ("backend='numba' runs on CPU tensors, but got a parameter on {device}. "
               "Use backend='triton' or backend='auto' for {type} tensors.")

#: Batches smaller than this run on one thread: below it the parallel region's
#: start-up costs more than the work. Provisional; measured in benchmarks/.
SERIAL_BELOW = 1 << 15
#: Held around every parallel kernel: numba's default "workqueue" threading
#: layer aborts the process when two Python threads start parallel regions
#: at once (optimizers stepped from several threads).
_PARALLEL = threading.Lock()
_NO_LOCK = contextlib.nullcontext()
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


def _plan(batch):
    """(bounds, parallel?, view dtype prototype, itemsize, compute type) of a batch."""
    name = str(batch.dtype).removeprefix("torch.")
    view = VIEW_DTYPES[name]
    compute = np.float64 if view is np.float64 else np.float32
    if batch.numel < SERIAL_BELOW:
        return _bounds(batch.numel, 1), False, _PROTO[name], np.dtype(view).itemsize, compute
    chunks = numba.get_num_threads()
    return _bounds(batch.numel, chunks), True, _PROTO[name], np.dtype(view).itemsize, compute


def _on(flag):
    """A compile-time switch for the kernels: True, or None for off."""
    return True if flag else None


def _opt(c, value, used):
    """A scalar in the compute type ``c``, or None where the kernel omits it."""
    return c(value) if used else None


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


def sgd(batch, *, lr, weight_decay, momentum, dampening, nesterov, maximize,
        grad_scale=None, found_inf=None):
    """SGD (torch semantics) over every row of ``batch.table``, in place.

    With ``found_inf`` nonzero nothing is written; grads are multiplied by
    ``1/grad_scale`` inside the same pass.
    """
    skip, inv_scale = _amp(grad_scale, found_inf)
    if skip or batch.table is None or batch.table.shape[0] == 0:
        return
    bounds, parallel, view, itemsize, c = _plan(batch)
    fn = _kernels.sgd_parallel if parallel else _kernels.sgd_serial
    # None switches a part of the kernel off at compile time (see _sgd_plain)
    with _PARALLEL if parallel else _NO_LOCK:
        fn(batch.table, bounds, itemsize, view, _opt(c, inv_scale, inv_scale != 1.0),
           c(-lr), _opt(c, weight_decay, weight_decay != 0), c(momentum),
           c(1.0 - dampening), _on(nesterov and momentum != 0), _on(maximize),
           _on(momentum != 0))


def adam(batch, *, lr, beta1, beta2, eps, weight_decay, decoupled_weight_decay,
         amsgrad, maximize, grad_scale=None, found_inf=None):
    """Adam / AdamW (torch semantics) over every row, in place; advances steps.

    With ``found_inf`` nonzero nothing is written, steps included.
    """
    skip, inv_scale = _amp(grad_scale, found_inf)
    if skip or batch.table is None or batch.table.shape[0] == 0:
        return
    bounds, parallel, view, itemsize, c = _plan(batch)
    fn = _kernels.adam_parallel if parallel else _kernels.adam_serial
    scalars = np.empty((batch.table.shape[0], 3), dtype=c)
    decoupled = decoupled_weight_decay and weight_decay != 0
    omb1 = c(1.0 - beta1)
    # None switches a part of the kernel off at compile time (see _adam_plain)
    with _PARALLEL if parallel else _NO_LOCK:
        fn(batch.table, bounds, itemsize, view, float(lr), float(beta1),
           float(beta2), scalars, _opt(c, inv_scale, inv_scale != 1.0),
           _opt(c, omb1 - c(1.0), not omb1 < 0.5), c(beta2), omb1, c(1.0 - beta2),
           c(eps), _opt(c, weight_decay, weight_decay != 0 and not decoupled),
           _opt(c, 1.0 - lr * weight_decay, decoupled), _on(amsgrad), _on(maximize))


def advance_host_steps(table, *, lr, beta1, beta2):
    """Advance every row's step counter (host memory) by one, in place.

    For GPU backends whose Adam steps live on the host (torch's default for
    CUDA params): the same float64 bias-correction arithmetic as the Numba
    Adam kernel, without a Python loop over tensors.

    Returns:
        float64 ``[rows, 2]``: step size and sqrt of the second bias correction.
    """
    out = np.empty((table.shape[0], 2), dtype=np.float64)
    _kernels.host_step_scalars(table, float(lr), float(beta1), float(beta2), out)
    return out
