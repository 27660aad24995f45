"""fused_optim: drop-in fused SGD, Adam and AdamW for torch.optim.

``import fused_optim as optim`` replaces ``import torch.optim as optim``: same
classes, arguments, defaults, errors, state_dict and lr_scheduler; each
``step()`` runs one multi-tensor kernel per (device, dtype) bucket, on Numba
for CPU tensors and Triton for CUDA tensors.
"""

from torch.optim import Optimizer, lr_scheduler

from ._backend import BACKENDS, ENV_VAR
from ._patch import patch_torch
from .adam import Adam, AdamW, adam, adamw
from .sgd import SGD, sgd

__version__ = "0.1.0"

__all__ = ["SGD", "Adam", "AdamW", "Optimizer", "lr_scheduler", "sgd", "adam",
           "adamw", "BACKENDS", "ENV_VAR", "patch_torch", "__version__"]
