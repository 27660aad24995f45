"""Where the fixed cost of a step goes: the per-tensor reads behind the reuse rule.

A fused_optim step on N tiny tensors is dominated by Python, not by the
kernel. Most of that Python is reading tensors: gathering them as torch's
``_init_group`` does, and re-reading the facts that let a validated plan be
reused safely (``fused_optim/_reuse_rule.py``, F1-F6). This script times,
interleaved in one process on the ``fixed-cost`` list (161 tensors of 64
elements by default):

* a whole ``step()`` of torch ``fused=True`` and of fused_optim (numba);
* each gathering read, as the C-level ``map`` over a column that
  fused_optim issues;
* each fact of the reuse rule, as the very function ``_reuse_rule.holds`` calls,
  on the plan of a real optimizer;
* their sums for SGD with momentum and for AdamW (``READS``).

The sum is a floor for a step that checks every tensor at every step in
Python; its ratio to torch's fused step says how far below torch the fixed
cost can go without giving those checks up.

Usage::

    python benchmarks/step_overhead.py [--tensors 161] [--numel 64] [--rounds 400]
"""

from __future__ import annotations

import argparse
import statistics
import time
from itertools import chain, repeat
from operator import attrgetter, is_

import numpy as np
import torch

import fused_optim
from fused_optim import _reuse_rule

T = torch.Tensor

#: what one step reads, by optimizer: gathering (``_init_group`` and the
#: functional), the reuse rule's facts, and the version bump after the kernel
_GATHER = ["grad", "grad is None", "state dict", "grad is_sparse"]
_RULE = ["F1 TensorGuards check", "F2 data_ptr", "grad data_ptr", "F3 held storages",
         "F4 grad bounds", "F5 grad overlaps"]
READS = {
    "sgd": [*_GATHER, "state value", "state is None", *_RULE, "version bump"],
    "adamw": [*_GATHER, "state value", "state value", "state value", *_RULE,
              "version bump"],
}


def _optimizer(kind, params, grads):
    copies = [p.detach().clone().requires_grad_() for p in params]
    for c, g in zip(copies, grads):
        c.grad = g.clone()
    return copies


def _rule_reads(opt, params):
    """The fact checks of ``_reuse_rule.holds``, each as it runs on ``opt``'s plan."""
    plan = opt._plans[0]
    grads = [p.grad for p in params]
    states = opt.state
    if "momentum_buffer" in states[params[0]]:
        cols = [params, grads, [states[p]["momentum_buffer"] for p in params]]
    else:
        cols = [params, grads, [states[p]["exp_avg"] for p in params],
                [states[p]["exp_avg_sq"] for p in params], [states[p]["step"] for p in params]]
    flat = tuple(chain.from_iterable(cols))
    assert _reuse_rule.holds(plan, cols, plan.where, flat, plan.row_flags) is not None
    grad_ptrs = np.fromiter(map(T.data_ptr, grads), np.int64, len(grads))
    moved = grad_ptrs + 64  # as if every grad were new: the overlap check runs
    return {
        "F1 TensorGuards check": lambda: _reuse_rule.f1_metadata(plan, flat),
        "F2 data_ptr": lambda: _reuse_rule.f2_addresses(plan, cols),
        "grad data_ptr": lambda: np.fromiter(map(T.data_ptr, grads), np.int64, len(grads)),
        "F3 held storages": lambda: _reuse_rule.f3_held_storages(plan),
        "F4 grad bounds": lambda: _reuse_rule.f4_grad_bounds(plan, grads),
        "F5 grad overlaps": lambda: _reuse_rule.f5_grad_overlaps(plan, moved),
    }


def _gather_reads(params, grads, states, bufs):
    dicts = list(map(states.__getitem__, params))
    return {
        "grad": lambda: list(map(attrgetter("grad"), params)),
        "grad is None": lambda: any(map(is_, grads, repeat(None))),
        "state dict": lambda: list(map(states.__getitem__, params)),
        "state value": lambda: list(map(dict.get, dicts, repeat("buf"))),
        "grad is_sparse": lambda: any(map(attrgetter("is_sparse"), grads)),
        "state is None": lambda: list(map(is_, bufs, repeat(None))),
        "version bump": lambda: torch._C._increment_version(params),
    }


def _median_us(samples) -> float:
    return statistics.median(samples) * 1e6


def run(tensors: int = 161, numel: int = 64, rounds: int = 400) -> dict:
    """Time the steps and the reads; returns every median in microseconds."""
    torch.manual_seed(0)
    params = [torch.randn(numel).requires_grad_() for _ in range(tensors)]
    grads = [torch.randn(numel) for _ in range(tensors)]
    for p, g in zip(params, grads):
        p.grad = g
    bufs = [torch.randn(numel) for _ in range(tensors)]
    states = {p: {"buf": b} for p, b in zip(params, bufs)}
    steps, rule = {}, {}
    for kind, cls, kw in (("sgd", "SGD", dict(lr=0.01, momentum=0.9)),
                          ("adamw", "AdamW", dict(lr=1e-3))):
        steps[f"{kind} torch fused"] = getattr(torch.optim, cls)(
            _optimizer(kind, params, grads), fused=True, **kw).step
        ours = _optimizer(kind, params, grads)
        opt = getattr(fused_optim, cls)(ours, backend="numba", **kw)
        for _ in range(3):
            opt.step()
        steps[f"{kind} fused_optim"] = opt.step
        rule[kind] = _rule_reads(opt, ours)
    gather = _gather_reads(params, grads, states, bufs)
    timed = dict(steps)
    timed.update(gather)
    for kind, reads in rule.items():
        timed.update({f"{kind} {name}": fn for name, fn in reads.items()})
    for fn in timed.values():
        for _ in range(5):
            fn()
    samples = {name: [] for name in timed}
    for _ in range(rounds):
        for name, fn in timed.items():
            t0 = time.perf_counter()
            fn()
            samples[name].append(time.perf_counter() - t0)
    out = {name: _median_us(s) for name, s in samples.items()}
    for kind, names in READS.items():
        out[f"{kind} reads"] = sum(out[f"{kind} {n}" if n in _RULE else n] for n in names)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tensors", type=int, default=161)
    ap.add_argument("--numel", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=400)
    args = ap.parse_args(argv)
    out = run(args.tensors, args.numel, args.rounds)
    print(f"{args.tensors} tensors of {args.numel} elements, medians of {args.rounds} "
          "interleaved rounds, microseconds per step")
    for name, us in out.items():
        if not name.endswith(" reads"):
            print(f"  {name:32s} {us:8.1f}")
    for kind, names in READS.items():
        fused = out[f"{kind} torch fused"]
        total = out[f"{kind} reads"]
        print(f"{kind}: {len(names)} reads sum to {total:.1f} us = {total / fused:.2f}x torch "
              f"fused's step; fused_optim's whole step {out[f'{kind} fused_optim'] / fused:.2f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
