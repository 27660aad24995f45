"""Subprocess half of test_plan_cache.py's rule tests: a memory fact, its check optional.

    python _rule_worker.py FACT on|off

Runs the scenario for FACT (``f3_held_storages`` or ``f4_grad_bounds``) on
the numba backend, with that one check of the reuse rule left on, or
switched off. Without the check the kernel reads or writes past an
allocation, so this runs in its own process. Prints one JSON line and leaves
at once (``os._exit``), before a corrupted heap can take the answer with it:
``{"reached": bool, "refused": bool}``: whether the scenario's condition was
produced, and whether the step was refused with the clear error.
"""

import json
import os
import sys

import torch

import fused_optim
from fused_optim import _reuse_rule


def regrow_at_same_address(storage):
    old, full = storage.data_ptr(), storage.nbytes()
    for frac in (0.5, 0.75, 0.25, 0.9):
        storage.resize_(0)
        storage.resize_(int(full * frac) // 64 * 64)
        if storage.data_ptr() == old:
            return True
    return False


def held_storage_regrown():
    """A momentum buffer's storage resized to 0 and back, smaller, at its old
    address: address, shape, strides and version as validated."""
    for attempt in range(40):
        p = torch.randn(40_000 + 4096 * attempt).requires_grad_()
        opt = fused_optim.SGD([p], lr=0.1, momentum=0.9, backend="numba")
        for _ in range(2):
            p.grad = torch.randn(p.shape)
            opt.step()
        p.grad = torch.randn(p.shape)
        if not regrow_at_same_address(opt.state[p]["momentum_buffer"].untyped_storage()):
            continue
        try:
            opt.step()
        except RuntimeError as err:
            return True, "outside its storage" in str(err)
        return True, False
    return False, False


def grad_storage_shrunk():
    """A grad whose storage was shrunk under it, at a new address."""
    p = torch.randn(200_000).requires_grad_()
    opt = fused_optim.SGD([p], lr=0.1, backend="numba")
    for _ in range(2):
        p.grad = torch.randn(p.shape)
        opt.step()
    g = torch.randn(p.shape)
    g.untyped_storage().resize_(64)
    p.grad = g
    try:
        opt.step()
    except RuntimeError as err:
        return True, "outside its storage" in str(err)
    return True, False


SCENARIOS = {"f3_held_storages": held_storage_regrown, "f4_grad_bounds": grad_storage_shrunk}


def main():
    fact, mode = sys.argv[1], sys.argv[2]
    if mode == "off":
        setattr(_reuse_rule, fact, lambda *args: True)
    reached, refused = SCENARIOS[fact]()
    sys.stdout.write(json.dumps({"reached": reached, "refused": refused}) + "\n")
    sys.stdout.flush()
    os._exit(0)


if __name__ == "__main__":
    main()
