"""Pure compute for fused_optim: optimizer update kernels, one module per backend.

Installed as ``fused_optim.kernels``. Every backend package (``reference``,
``numba``, ``triton``) has one file per optimizer kernel, ``<backend>/<name>.py``,
whose function ``<name>(batch, *, <hyperparameters>, grad_scale=None,
found_inf=None, ...)`` takes the reference backend's keywords
(``contract.kernel`` finds it, ``contract.problems`` checks it).

``batch`` is a :class:`~fused_optim.kernels.batch.Batch`: the tensors of one
(device, dtype) bucket, already validated by the API layer, together with their
address table. Updates happen in place. ``grad_scale``/``found_inf`` are
GradScaler's tensors: grads are multiplied by the float32 reciprocal of the
scale in the same pass, and a nonzero ``found_inf`` leaves everything
(params, state, step counts) untouched. Nothing here imports ``torch.optim``.
"""

from .batch import Batch
from . import columns

__all__ = ["Batch", "columns"]
