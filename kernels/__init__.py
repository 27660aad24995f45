"""Pure compute for fused_optim: optimizer update kernels, one module per backend.

Installed as ``fused_optim.kernels``. Every backend module (``reference``,
``numba``, ``triton``) exposes the same two functions::

    sgd(batch, *, lr, weight_decay, momentum, dampening, nesterov, maximize,
        grad_scale=None, found_inf=None)
    adam(batch, *, lr, beta1, beta2, eps, weight_decay, decoupled_weight_decay,
         amsgrad, maximize, grad_scale=None, found_inf=None)

``batch`` is a :class:`~fused_optim.kernels.batch.Batch`: the tensors of one
(device, dtype) bucket, already validated by the API layer, together with their
address table. Updates happen in place. ``grad_scale``/``found_inf`` are
GradScaler's tensors: grads are multiplied by the float32 reciprocal of the
scale in the same pass, and a nonzero ``found_inf`` leaves everything
(params, state, step counts) untouched. Nothing here imports ``torch.optim``.
"""

from .batch import Batch
from . import layout

__all__ = ["Batch", "layout"]
