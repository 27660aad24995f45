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


# The files whose tests take longest from CI's cold Numba cache run first, so
# that no worker starts one near the end while the other idles (make test
# hands each worker whole files, in this order). Measured on the cold run
# of 2026-11-29: the stateful machines ~170 s, the precision tests ~950 s.
_SLOW_FIRST = ("test_stateful.py", "test_precision_numba.py", "test_precision.py",
               "test_reuse_cases.py", "test_parity.py", "test_cold_start.py",
               "test_bench.py", "test_triton_kernels.py", "test_examples.py")


def pytest_collection_modifyitems(session, config, items):
    rank = {name: i for i, name in enumerate(_SLOW_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))
