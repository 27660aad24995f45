"""Cost of kahan_sum / stochastic_round in the Numba kernels (issue 15).

One process, variants interleaved round by round: bf16 time per step of the
parallel entry point on the resnet50 shape list (161 tensors, 25.6M
elements), 2 threads, for SGD-momentum and AdamW, with the options off
("plain"), kahan_sum, stochastic_round, and both; with ``--base DIR`` also
the kernels of another checkout's ``kernels/`` (e.g. the commit before the
options, ``git archive e0059c0 kernels | tar -x -C DIR``), imported as a
separate package, for the options-off path against the code before.

Prints per variant the median ms per step over the rounds and the median of
the per-round paired ratios against "plain"::

    PYTHONPATH=build/shim:. python benchmarks/precision_numba.py --rounds 15 \\
        --base /tmp/base15
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
import sys
import time

import numba
import torch

from fused_optim import _plan
from fused_optim.bench.cases import shape_list
from fused_optim.kernels import contract
from fused_optim.kernels import numba as nb

HYPER = {
    "sgd": dict(lr=0.01, weight_decay=0.0, momentum=0.9, dampening=0.0, nesterov=False,
                maximize=False),
    "adam": dict(lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.01,
                 decoupled_weight_decay=True, amsgrad=False, maximize=False),
}
ROLES = {"sgd": ("momentum_buffer", "-", "-", "kahan_comp"),
         "adam": ("exp_avg", "exp_avg_sq", "-", "kahan_comp")}


def _load_base(path):
    """``path``/kernels imported as the package ``kernels_base``."""
    spec = importlib.util.spec_from_file_location(
        "kernels_base", f"{path}/kernels/__init__.py",
        submodule_search_locations=[f"{path}/kernels"])
    mod = importlib.util.module_from_spec(spec)
    sys.modules["kernels_base"] = mod
    spec.loader.exec_module(mod)
    return importlib.import_module("kernels_base.numba")


def _batches(name, dtype):
    """(batch without comps, batch with comps) over the same params and state."""
    torch.manual_seed(0)
    shapes = shape_list("resnet50").shapes
    params = [torch.randn(s).to(dtype) for s in shapes]
    grads = [torch.randn(s).mul(0.01).to(dtype) for s in shapes]
    n = len(params)
    s0 = [torch.zeros_like(p) for p in params]
    s1 = [torch.zeros_like(p) for p in params] if name == "adam" else [None] * n
    comps = [torch.zeros_like(p) for p in params]
    steps = [torch.tensor(0.0) for _ in params] if name == "adam" else None
    out = []
    for c in ([None] * n, comps):
        ((batch, _),) = _plan.pack(params, grads, [s0, s1, [None] * n, c], ROLES[name],
                                    steps=steps, backend="numba")
        out.append(batch)
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--reps", type=int, default=3, help="steps timed per variant per round")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--base", help="a checkout whose kernels/ to time as 'before'")
    ap.add_argument("--opt", nargs="+", default=["sgd", "adam"])
    args = ap.parse_args(argv)
    numba.set_num_threads(args.threads)
    base = _load_base(args.base) if args.base else None
    sr = (20260815, torch.tensor(11, dtype=torch.int64), 1)
    for name in args.opt:
        plain, with_comp = _batches(name, torch.bfloat16)
        assert plain.numel >= nb.SERIAL_BELOW
        fn = contract.kernel(nb, name)
        hyper = HYPER[name]
        variants = {
            "plain": lambda: fn(plain, **hyper),
            "kahan": lambda: fn(with_comp, **hyper, kahan_sum=True),
            "sr": lambda: fn(plain, **hyper, stochastic_round=sr),
            "both": lambda: fn(with_comp, **hyper, kahan_sum=True, stochastic_round=sr),
        }
        if base is not None:
            bfn = getattr(base, name) if name in ("sgd", "adam") else None
            variants["before"] = lambda: bfn(plain, **hyper)
        for v in variants.values():  # compile (or load from cache), warm up
            v()
            v()
        times = {k: [] for k in variants}
        for _ in range(args.rounds):
            for k, v in variants.items():
                t = time.perf_counter()
                for _ in range(args.reps):
                    v()
                times[k].append((time.perf_counter() - t) / args.reps)
        label = "SGD-momentum" if name == "sgd" else "AdamW"
        print(f"{label} bf16, resnet50 ({plain.numel / 1e6:.1f}M elements, "
              f"{plain.table.shape[0]} tensors), {args.threads} threads, "
              f"{args.rounds} rounds x {args.reps} steps:")
        for k, ts in times.items():
            ratio = statistics.median(a / b for a, b in zip(ts, times["plain"]))
            print(f"  {k:7s} {statistics.median(ts) * 1e3:7.2f} ms/step   "
                  f"paired ratio vs plain {ratio:.3f}")
        sys.stdout.flush()


if __name__ == "__main__":
    main()
