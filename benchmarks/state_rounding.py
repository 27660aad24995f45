"""What bfloat16 optimizer state costs on CPU, rounded to nearest or stochastically.

float32 AdamW (decoupled decay 1e-2) over the resnet50-shaped list, the Numba
kernel driven directly (``_plan.pack``, no optimizer around it), three ways
interleaved in each round: float32 state, bfloat16 state rounded to nearest
(``state_round=None``: what ``state_dtype`` would cost without stochastic
rounding), and bfloat16 state rounded stochastically (``state_dtype``'s
stores). Prints the median time per step and the median of the per-round
ratios to float32 state. Compiles the two bfloat16 specializations on a cold
cache (tens of seconds).

    python benchmarks/state_rounding.py [--rounds N] [--list NAME]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from fused_optim import _plan
from fused_optim.bench.cases import shape_list
from fused_optim.kernels.numba.adam import adam

HYPER = dict(lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=1e-2,
             decoupled_weight_decay=True, amsgrad=False, maximize=False)


def batch(shapes, state_dtype):
    params = [torch.randn(s) for s in shapes]
    grads = [torch.randn(s) for s in shapes]
    m = [torch.zeros(s, dtype=state_dtype) for s in shapes]
    v = [torch.zeros(s, dtype=state_dtype) for s in shapes]
    steps = [torch.zeros((), dtype=torch.float32) for _ in shapes]
    (b, _), = _plan.pack(params, grads, [m, v, [None] * len(shapes)],
                         ("exp_avg", "exp_avg_sq", ""), steps=steps, backend="numba",
                         state_dtype=None if state_dtype == torch.float32 else state_dtype)
    return b, (params, grads, m, v, steps)  # (the tensors the table points into)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--list", default="resnet50")
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    shapes = shape_list(args.list).shapes
    counter = torch.zeros((), dtype=torch.int64)
    variants = {"fp32 state": (batch(shapes, torch.float32), None),
                "bf16 state, nearest": (batch(shapes, torch.bfloat16), None),
                "bf16 state, stochastic": (batch(shapes, torch.bfloat16), (12345, counter, 0))}
    for (b, _), sr in variants.values():
        for _ in range(3):  # compile, warm up
            adam(b, **HYPER, state_round=sr)
    times = {k: [] for k in variants}
    for _ in range(args.rounds):
        for name, ((b, _), sr) in variants.items():
            t = time.perf_counter()
            adam(b, **HYPER, state_round=sr)
            times[name].append(time.perf_counter() - t)
    print(f"float32 AdamW, {args.list}, Numba, {torch.get_num_threads()} threads, "
          f"{args.rounds} interleaved rounds")
    for name in variants:
        ratio = statistics.median(a / b for a, b in zip(times[name], times["fp32 state"]))
        print(f"{name:<24} {statistics.median(times[name]) * 1e3:8.2f} ms   "
              f"vs fp32 state {ratio:.2f}x")


if __name__ == "__main__":
    main()
