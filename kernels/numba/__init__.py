"""Numba CPU backend: one jitted call per batch updates every tensor in it.

The row walk and spans are written once in ``_walk``, the work split and
launch in ``_launch``; each
optimizer's element update, jitted entry points and launcher live in its own
file (``<name>.py``), imported on first use (``contract.kernel``).
"""

from __future__ import annotations

import warnings

from numba.core.errors import NumbaIRAssumptionWarning

from . import _disk_cache
# before any kernel is decorated: Numba picks each one's cache directory then
_disk_cache.choose_location()
from ._memory import VIEW_DTYPES  # noqa: E402
# wait_for_background: fused_optim._warmup.wait joins the background compiles
# through the backend module; SERIAL_BELOW: the size where the parallel entry
# points start, for the tests and benchmarks to read (a copy: the launcher
# reads _launch.SERIAL_BELOW, so patch that one)
from ._launch import SERIAL_BELOW, wait_for_background  # noqa: E402, F401

__all__ = ["SUPPORTED_DTYPES", "warm_numel"]

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

def warm_numel(numel: int) -> int:
    """How many elements a dummy batch needs to take the entry point (serial
    or parallel) that a batch of ``numel`` elements takes (fused_optim's
    warm-up steps one of that size)."""
    from . import _launch

    return min(numel, _launch.SERIAL_BELOW)


# before any kernel is compiled or loaded from the disk cache (see _disk_cache);
# the cache is found through a dispatcher of no optimizer's file, so that
# importing the backend compiles, loads and imports no kernel
_cache_anchor = _disk_cache.anchor()
_disk_cache.seed(_cache_anchor)
_disk_cache.check(_cache_anchor)
