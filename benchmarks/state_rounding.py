"""What bfloat16 optimizer state costs on CPU, rounded to nearest or stochastically.

AdamW (decoupled decay 1e-2; float32 params, or bfloat16 with ``--params
bf16``) over the resnet50-shaped list, the Numba kernel driven directly
(``_plan.pack``, no optimizer around it), three ways interleaved in each
round: torch's state (the param's dtype), bfloat16 state rounded to nearest
(``state_round=None``: what ``state_dtype`` would cost without stochastic
rounding) and bfloat16 state rounded stochastically (``state_dtype``'s
stores). Prints the median time per step and the median of the per-round
ratios to torch's state. For bfloat16 params the first two are one layout,
and the third is the cost of the rounding alone. Compiles the two bfloat16 specializations on a cold
cache (tens of seconds).

    python benchmarks/state_rounding.py [--rounds N] [--list NAME] [--params fp32|bf16]

The figures before and after the state stream went from two lowbias32
rounds to one are in ``kernels/reference/_precision.py``'s docstring.
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


def batch(shapes, state_dtype, dtype):
    """A packed AdamW batch of ``dtype`` params with ``state_dtype`` moments."""
    params = [torch.randn(s, dtype=dtype) for s in shapes]
    grads = [torch.randn(s, dtype=dtype) for s in shapes]
    m = [torch.zeros(s, dtype=state_dtype) for s in shapes]
    v = [torch.zeros(s, dtype=state_dtype) for s in shapes]
    steps = [torch.zeros((), dtype=torch.float32) for _ in shapes]
    (b, _), = _plan.pack(params, grads, [m, v, [None] * len(shapes)],
                         ("exp_avg", "exp_avg_sq", ""), steps=steps, backend="numba",
                         state_dtype=None if state_dtype == dtype else state_dtype)
    return b, (params, grads, m, v, steps)  # (the tensors the table points into)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--list", default="resnet50")
    ap.add_argument("--params", choices=("fp32", "bf16"), default="fp32")
    args = ap.parse_args(argv)
    dtype = torch.float32 if args.params == "fp32" else torch.bfloat16
    torch.manual_seed(0)
    shapes = shape_list(args.list).shapes
    counter = torch.zeros((), dtype=torch.int64)
    own = "fp32 state" if dtype == torch.float32 else "bf16 state (torch's)"
    variants = {own: (batch(shapes, dtype, dtype), None),
                "bf16 state, nearest": (batch(shapes, torch.bfloat16, dtype), None),
                "bf16 state, stochastic": (batch(shapes, torch.bfloat16, dtype),
                                           (12345, counter, 0))}
    for (b, _), sr in variants.values():
        for _ in range(3):  # compile, warm up
            adam(b, **HYPER, state_round=sr)
    times = {k: [] for k in variants}
    for _ in range(args.rounds):
        for name, ((b, _), sr) in variants.items():
            t = time.perf_counter()
            adam(b, **HYPER, state_round=sr)
            times[name].append(time.perf_counter() - t)
    print(f"AdamW, {args.params} params, {args.list}, Numba, {torch.get_num_threads()} threads, "
          f"{args.rounds} interleaved rounds")
    for name in variants:
        ratio = statistics.median(a / b for a, b in zip(times[name], times[own]))
        print(f"{name:<24} {statistics.median(times[name]) * 1e3:8.2f} ms   "
              f"vs {own} {ratio:.2f}x")


if __name__ == "__main__":
    main()
