import os

import torch

# Without a GPU the Triton kernels run on CPU tensors through Triton's
# interpreter; it must be switched on before triton is first imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# Kernels compile in the step that needs them, never behind a test's back
# (fused_optim/_warmup.py); tests/test_cold_start.py turns it on where tested.
os.environ.setdefault("FUSED_OPTIM_WARMUP", "0")

# FUSED_OPTIM_TEST_DISPATCH=1 runs every eager step through the step
# operators (fused_optim/_ops.py), the way compiled steps run them.
if os.environ.get("FUSED_OPTIM_TEST_DISPATCH") == "1":
    import fused_optim._ops

    fused_optim._ops.DISPATCH_EAGER = True
