"""Triton GPU backend: one kernel launch per batch updates every tensor in it.

This module holds the backend's contract (``kernels/contract.py``); each
optimizer ``<name>`` lives in ``<name>.py`` (its ``@triton.jit`` kernels
and its launcher ``<name>(batch, ...)``), found on first use by
``contract.kernel``. Written once for all of them: ``_launch`` (the launcher
body, :func:`_launch.launch`: prologue, device buffers, launches per
alignment class) and ``_kernels`` (the ``@triton.jit`` helpers: the update
kernels' prologue, loads and stores, step counters, the precision options).
Adding an optimizer ``<name>`` (``kernels/triton/<name>.py``):

1. its hyperparameter slots (``(_<NAME>_LR, ..., _<NAME>_NHYPER) =
   _kernels.slots(k)``), the float64 buffer the launcher uploads; its flags that change only the
   arithmetic (maximize, nesterov, ...) go there too, as 1.0 or 0.0;
2. a ``@triton.jit`` update kernel taking ``(table_ptr, map_ptr, hyper_ptr,
   [scal_ptr,] grad_scale_ptr, found_inf_ptr)`` and the constexprs of
   ``_launch._common_args`` (ELEM, IS_BF16, COMPUTE, IS_F64, BLOCK, VEC),
   ALIGNED, TAIL_ALIGNED, HAS_GRAD_SCALE, HAS_FOUND_INF, a switch per
   optional state array (USE_MOMENTUM, AMSGRAD, ...), and last
   ``counter_ptr=None, KAHAN=False, SR=False``. A constexpr is a compiled
   specialization, so only what changes which arrays are streamed or how
   they are stored is one; other flags are read from the buffer and applied
   with selects (``tl.where``) that give each setting the arithmetic it had
   as a constexpr (a zero weight decay selects the undecayed value rather
   than computing ``fma(p, 0, g)``, NaN for an infinite param). It starts
   with ``_kernels._program`` (its row, chunk, pointers, AMP scale and
   precision keys), reads the grad through ``_kernels._grad`` and stores
   the param through ``_kernels._store_param``;
3. the launcher ``<name>(batch, *, ...)``: its hyperparameter list, then
   ``_launch.launch(kernel, batch, hyper, ...)``, with its step kernel and
   host-side step function if it counts steps (``kernels/steps.py``);
4. its specializations in ``tests/_compile_matrix.py``, so that the offline
   compile checks (vector loads, IEEE division, no spills) cover it.

Under ``TRITON_INTERPRET=1`` the same code runs on CPU tensors.
"""

from __future__ import annotations

# the backend imports exactly where Triton does (fused_optim._backend then
# reports INSTALL_HINT); its kernels import it on first use
import triton  # noqa: F401

__all__ = ["SUPPORTED_DTYPES"]

# the contract (kernels/contract.py)
NAME = "triton"
DEVICES = ("cuda",)
INTERPRETED_DEVICES = ("cpu",)
SUPPORTED_DTYPES = ("float64", "float32", "bfloat16", "float16")
INSTALL_HINT = "pip install 'fused_optim[gpu]' (or pip install triton)"
DEVICE_HINT = ("backend='triton' needs CUDA tensors, but got a parameter on {device}. "
               "Move the model to CUDA, use backend='numba' or 'auto' for CPU tensors, "
               "or set TRITON_INTERPRET=1 to run the Triton kernels on CPU (slowly).")
