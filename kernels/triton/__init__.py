"""Triton GPU backend: one kernel launch per batch updates every tensor in it.

The launchers here own the grid. A batch's rows are cut into ``BLOCK``-element
chunks, one program each; a block map (``int32 [programs, 2]``: row, chunk
index) tells a program where it works, and a device copy of ``batch.table``
tells it the addresses. The jitted bodies live in ``_kernels``.

Host to device traffic per call is at most three small copies, each skipped
when an identical one is cached: the address table (cached on its exact bytes,
so a cached copy can never hold a stale address), the block map (cached on the
NUMEL column) and the float64 hyperparameter buffer (cached on its bytes; with
host-side Adam steps it changes every step). Copies go through pinned memory
with ``non_blocking=True``: a pageable copy would make the host wait for all
queued GPU work, e.g. the backward pass.

Under ``TRITON_INTERPRET=1`` the same code runs on CPU tensors.
"""

from __future__ import annotations

import collections
import contextlib
import math
import os
import threading

import numpy as np
import torch
import triton.language as tl

from .. import layout as L
from . import _kernels

__all__ = ["sgd", "adam", "SUPPORTED_DTYPES"]

SUPPORTED_DTYPES = ("float64", "float32", "bfloat16", "float16")

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

#: Pointer element type per storage dtype; bfloat16 travels as its uint16 bits.
_ELEM = {
    torch.float64: tl.float64,
    torch.float32: tl.float32,
    torch.float16: tl.float16,
    torch.bfloat16: tl.uint16,
}


class _LRU:
    """A small least-recently-used map of device tensors built on a miss."""

    def __init__(self, size):
        self._size = size
        self._items = collections.OrderedDict()
        self._lock = threading.Lock()  # optimizers may step from several threads

    def get(self, key, make):
        with self._lock:
            value = self._items.get(key)
            if value is None:
                value = make()
                self._items[key] = value
                if len(self._items) > self._size:
                    self._items.popitem(last=False)
            else:
                self._items.move_to_end(key)
            return value

    def clear(self):
        with self._lock:
            self._items.clear()


_table_cache = _LRU(64)
_map_cache = _LRU(64)
_hyper_cache = _LRU(16)


def _upload(array: np.ndarray, device: torch.device) -> torch.Tensor:
    """A private device copy of ``array``, queued without a host sync on CUDA."""
    host = torch.from_numpy(np.array(array, copy=True, order="C"))
    if device.type == "cuda":
        # the pinned staging buffer is held by the caching host allocator
        # until the copy has run
        return host.pin_memory().to(device, non_blocking=True)
    return host.to(device)


def _device_table(table: np.ndarray, device: torch.device, counters: bool):
    """Device copy of ``table`` (and a zeroed per-row int32 counter array).

    Keyed on the table's exact bytes: equal bytes mean equal addresses, so a
    hit is as fresh as an upload. The counters are reset by the kernel that
    uses them, so they stay valid in the cache.
    """
    entry = _table_cache.get((device, table.shape, table.tobytes()),
                        lambda: {"table": _upload(table, device)})
    if counters and "counters" not in entry:
        entry["counters"] = torch.zeros(table.shape[0], dtype=torch.int32, device=device)
    return entry["table"], entry.get("counters")


def block_map(numel: np.ndarray, block: int, keep_empty: bool) -> np.ndarray:
    """Program -> (row, chunk) map: row r gets ``ceil(numel[r] / block)`` programs.

    Args:
        numel: int64 elements per row.
        block: elements per program.
        keep_empty: give rows with no elements one (fully masked) program, so
            that Adam's in-kernel step counters still advance.

    Returns:
        int32 array ``[programs, 2]``, rows in table order, chunks ascending.
    """
    numel = np.asarray(numel, dtype=np.int64)
    nblocks = (numel + block - 1) // block
    if keep_empty:
        nblocks = np.maximum(nblocks, 1)
    if nblocks.size and nblocks.max() >= 2**31:
        raise ValueError(f"a tensor of {int(numel.max())} elements needs more than "
                         f"2**31 programs of {block}")
    total = int(nblocks.sum())
    rows = np.repeat(np.arange(numel.size, dtype=np.int64), nblocks)
    first = np.repeat(np.cumsum(nblocks) - nblocks, nblocks)
    out = np.empty((total, 2), dtype=np.int32)
    out[:, 0] = rows
    out[:, 1] = np.arange(total, dtype=np.int64) - first
    return out


def _device_map(table: np.ndarray, device: torch.device, block: int, keep_empty: bool):
    numel = np.ascontiguousarray(table[:, L.NUMEL])

    def make():
        bmap = block_map(numel, block, keep_empty)
        return _upload(bmap, device), bmap.shape[0]

    return _map_cache.get((device, numel.tobytes(), block, keep_empty), make)


def _device_hyper(values, device: torch.device) -> torch.Tensor:
    """The float64 hyperparameter buffer on ``device``.

    A Tensor entry (capturable's device ``lr``) is read where it lives, by
    device ops: no host sync, and the buffer is rebuilt inside a CUDA graph
    on every replay, so a scheduler's updates to that Tensor take effect.
    """
    if any(torch.is_tensor(v) for v in values):
        return torch.stack([
            v.detach().to(device=device, dtype=torch.float64).reshape(())
            if torch.is_tensor(v) else torch.full((), v, dtype=torch.float64, device=device)
            for v in values])
    values = np.asarray(values, dtype=np.float64)
    return _hyper_cache.get((device, values.tobytes()), lambda: _upload(values, device))


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
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        return _INTERPRETER_LOCK
    return contextlib.nullcontext()


def _device_context(device):
    if device.type == "cuda":
        return torch.cuda.device(device)
    return contextlib.nullcontext()


_POINTER_COLUMNS = [L.PARAM, L.GRAD, L.STATE0, L.STATE1, L.STATE2]


def _common_args(batch):
    """Constexprs fixed by the batch: storage type and pointer alignment."""
    dtype = batch.dtype
    is_f64 = dtype == torch.float64
    # absent roles hold 0, which is aligned too
    aligned = bool((batch.table[:, _POINTER_COLUMNS] % 16 == 0).all())
    return dict(ELEM=_ELEM[dtype], IS_BF16=dtype == torch.bfloat16,
                COMPUTE=tl.float64 if is_f64 else tl.float32, IS_F64=is_f64,
                BLOCK=BLOCK, ALIGNED=aligned)


def _compute_np(dtype):
    return np.float64 if dtype == torch.float64 else np.float32


def sgd(batch, *, lr, weight_decay, momentum, dampening, nesterov, maximize,
        grad_scale=None, found_inf=None):
    """SGD (torch semantics) over every row of ``batch.table``, in one launch.

    Args:
        batch: a :class:`~fused_optim.kernels.batch.Batch` of CUDA tensors
            (CPU tensors under ``TRITON_INTERPRET=1``).
        lr, weight_decay, momentum, dampening, nesterov, maximize: as
            ``torch.optim.SGD``.
        grad_scale: optional 1-element AMP scale on the params' device;
            the kernel multiplies the gradients by its float32 reciprocal
            (GradScaler.unscale_'s rounding, as the Numba backend). The
            gradient tensors themselves are left as they are.
        found_inf: optional 1-element AMP flag on the params' device; when it
            is nonzero nothing is written. Read by the kernel: no host sync.
    """
    if batch.table is None or batch.table.shape[0] == 0:
        return
    device = batch.device
    table = batch.table
    use_momentum = momentum != 0
    with _device_context(device):
        bmap, programs = _device_map(table, device, BLOCK, keep_empty=False)
        if programs == 0:
            return
        dev_table, _ = _device_table(table, device, counters=False)
        hyper = _device_hyper([lr, weight_decay, momentum, 1.0 - dampening], device)
        grad_scale = _amp_tensor(grad_scale, device)
        found_inf = _amp_tensor(found_inf, device)
        with _launch_lock():
            _kernels._sgd_kernel[(programs,)](
                dev_table, bmap, hyper, grad_scale, found_inf,
                **_common_args(batch),
                USE_MOMENTUM=use_momentum, NESTEROV=bool(nesterov) and use_momentum,
                MAXIMIZE=bool(maximize), HAS_WD=weight_decay != 0,
                HAS_GRAD_SCALE=grad_scale is not None,
                HAS_FOUND_INF=found_inf is not None,
                num_warps=NUM_WARPS,
                # no FMA contraction: the same roundings as the Numba backend
                enable_fp_fusion=False,
            )


def _log2(x: float) -> float:
    """log2 |x| (the kernel restores a negative x's sign from its own slot)."""
    x = abs(x)
    if x != x:
        return math.nan
    return math.log2(x) if x > 0 else -math.inf


def _steps_on_device(batch) -> bool:
    """True if the kernel can read and advance every step counter itself.

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
    """The host is about to read and write every step address: all must be CPU memory."""
    elsewhere = sorted({str(s.device) for s in batch.steps if s.device.type != "cpu"})
    if elsewhere:
        raise ValueError(f"host-side step counters must be CPU tensors, found {elsewhere}")


def _host_step_scalars(table, lr, beta1, beta2) -> np.ndarray:
    """Advance host-side steps; per-row (step size, sqrt(bias correction 2)).

    One compiled pass over the table's step addresses (the Numba backend's
    float64 arithmetic, as torch's for-loop does in Python), not a Python
    loop over tensors.
    """
    from ..numba import advance_host_steps

    return advance_host_steps(table, lr=lr, beta1=beta1, beta2=beta2)


def adam(batch, *, lr, beta1, beta2, eps, weight_decay, decoupled_weight_decay,
         amsgrad, maximize, grad_scale=None, found_inf=None):
    """Adam / AdamW (torch semantics) over every row, in one launch; advances steps.

    Step counters on the params' device are read and advanced by the kernel
    (no host sync). Counters elsewhere (torch's default: CPU steps for CUDA
    params) are advanced here and the per-row scalars uploaded.

    Args:
        batch: a :class:`~fused_optim.kernels.batch.Batch`; ``batch.steps``
            holds one 0-dim float32/float64 step tensor per row.
        lr, beta1, beta2, eps, weight_decay, amsgrad, maximize: as
            ``torch.optim.Adam``.
        decoupled_weight_decay: AdamW's decay.
        grad_scale: optional AMP scale, as in :func:`sgd`.
        found_inf: optional AMP flag: when nonzero, params, state and steps
            are left unchanged. With device-side steps this costs no host
            sync; with host-side steps it must be read first (one sync),
            since the host cannot otherwise know whether to advance them.
    """
    if batch.table is None or batch.table.shape[0] == 0:
        return
    device = batch.device
    table = batch.table
    c = _compute_np(batch.dtype)
    hyper = [lr, beta1, beta2, 1.0 - beta1, 1.0 - beta2, eps, weight_decay,
             1.0 - lr * weight_decay, _log2(beta1), _log2(beta2),
             float(beta1 < 0), float(beta2 < 0)]
    assert len(hyper) == _kernels.ADAM_NHYPER
    device_steps = _steps_on_device(batch)
    with _device_context(device):
        if not device_steps:
            _check_host_steps(batch)
            if found_inf is not None and bool(found_inf.reshape(-1)[0] != 0):
                return  # skipped step: steps stay as they are
            found_inf = None
            scalars = _host_step_scalars(table, lr, beta1, beta2)
            hyper = np.concatenate([np.asarray(hyper, np.float64), scalars.ravel()])
        bmap, programs = _device_map(table, device, BLOCK, keep_empty=device_steps)
        if programs == 0:
            return
        dev_table, counters = _device_table(table, device, counters=device_steps)
        # host-step scalars change every step: not worth a cache slot
        hyper = (_device_hyper(hyper, device) if device_steps
                 else _upload(hyper, device))
        grad_scale = _amp_tensor(grad_scale, device)
        found_inf = _amp_tensor(found_inf, device)
        with _launch_lock():
            _kernels._adam_kernel[(programs,)](
                dev_table, bmap, hyper, counters, grad_scale, found_inf,
                **_common_args(batch),
                AMSGRAD=bool(amsgrad), MAXIMIZE=bool(maximize),
                HAS_WD=weight_decay != 0, DECOUPLED=bool(decoupled_weight_decay),
                # torch.lerp's side test on the weight as the kernel sees it
                LERP_FROM_START=bool(c(1.0 - beta1) < 0.5),
                DEVICE_STEPS=device_steps,
                HAS_GRAD_SCALE=grad_scale is not None,
                HAS_FOUND_INF=found_inf is not None,
                num_warps=NUM_WARPS,
                enable_fp_fusion=False,
            )
