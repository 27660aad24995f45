"""fused_optim: drop-in fused optimizers for torch.optim.

``import fused_optim as optim`` replaces ``import torch.optim as optim``: same
classes, arguments, defaults, errors, state_dict and lr_scheduler; each
``step()`` runs one multi-tensor kernel per (device, dtype) bucket, on Numba
for CPU tensors and Triton for CUDA tensors.

The optimizer classes (SGD, Adam, AdamW, ...) are exported from their
records (``fused_optim._registry``). As in torch.optim, the functionals stay
in their modules (``from fused_optim.sgd import sgd``): ``fused_optim.sgd`` is
the module, never also a function.
"""

from torch.optim import Optimizer, lr_scheduler

from . import _registry
from ._backend import BACKENDS, ENV_VAR
from ._patch import patch_torch
from ._precision import for_torch as state_dict_for_torch

__version__ = "0.1.0"


def _export() -> list:
    names = []
    for record in _registry.records():
        globals()[record.name] = record.cls
        names.append(record.name)
    return names


__all__ = [*_export(), "Optimizer", "lr_scheduler", "BACKENDS", "ENV_VAR",
           "patch_torch", "state_dict_for_torch", "__version__"]
