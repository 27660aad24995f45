"""Pure-torch reference backend: the update rules written out per tensor.

It is the ``torch`` backend (any device, no compiler) and the reference the
tests import: each optimizer's kernel in its own file (``<name>.py``, found by
``contract.kernel``), whose signature is the contract every backend's kernel
of that name keeps; what the kernels share is in ``_io``. They use plain
tensor arithmetic only: no ``torch.optim`` code, no ``_foreach_*`` or
``_fused_*`` ops. Math runs in float32 (float64 for float64
tensors) and each stored value is rounded once, like the compiled backends.
The ops are the ones whose CPU kernels round as the compiled backends do
(``add(alpha=)``, ``lerp`` and ``addcmul`` are fused multiply-adds).
"""

from __future__ import annotations

# the contract (kernels/contract.py): the fallback that runs anywhere
NAME = "torch"
DEVICES = None
INTERPRETED_DEVICES = ()
SUPPORTED_DTYPES = None
INSTALL_HINT = None
DEVICE_HINT = None
