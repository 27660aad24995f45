"""Where the fixed cost of a step goes: the per-tensor reads behind the safety checks.

A fused_optim step on N tiny tensors is dominated by Python, not by the
kernel. Most of that Python is the per-step re-read of every tensor that
``fused_optim/_tables.py`` needs before it may reuse a validated address
table (see its ``_signature``). This script times, interleaved in one
process on the ``fixed-cost`` list (161 tensors of 64 elements by default):

* a whole ``step()`` of torch ``fused=True`` and of fused_optim (numba);
* each of those reads alone, as the one C-level ``map`` over a column of
  tensors that fused_optim issues;
* their sum for SGD with momentum and for AdamW, as counted in
  ``READS``.

The sum is a floor for any step that checks every tensor at every step in
Python; its ratio to torch's fused step says how far below torch the fixed
cost can go without giving those checks up.

Usage::

    python benchmarks/step_overhead.py [--tensors 161] [--numel 64] [--rounds 400]
"""

from __future__ import annotations

import argparse
import statistics
import time
from itertools import repeat
from operator import attrgetter, is_

import torch

import fused_optim

T = torch.Tensor
_PLAIN = frozenset((torch.Tensor, torch.nn.Parameter))

#: The maps over a column of tensors that one step issues, by optimizer:
#: gathering (``_init_group``, ``sgd()``), checking (``_tables._signature``)
#: and the version bump after the kernel.
_CHECKS = ["param type", "param data_ptr", "param numel", "param is_contiguous",
           "param dtype", "grad data_ptr", "grad numel", "grad is_contiguous",
           "grad dtype", "grad get_device", "version bump"]
READS = {
    "sgd": ["grad", "grad is None", "state dict", "state value", "grad is_sparse",
            "state is None", "state is None", *_CHECKS, "state data_ptr",
            "state _version"],
    "adamw": ["grad", "grad is None", "state dict", "state value", "state value",
              "state value", "grad is_sparse", *_CHECKS,
              *["state data_ptr", "state _version"] * 3],
}


def _reads(params, grads, states, bufs):
    """One callable per distinct read, each a map over a column of tensors."""
    dicts = list(map(states.__getitem__, params))
    return {
        "grad": lambda: list(map(attrgetter("grad"), params)),
        "grad is None": lambda: any(map(is_, grads, repeat(None))),
        "state dict": lambda: list(map(states.__getitem__, params)),
        "state value": lambda: list(map(dict.get, dicts, repeat("buf"))),
        "grad is_sparse": lambda: any(map(attrgetter("is_sparse"), grads)),
        "state is None": lambda: list(map(is_, bufs, repeat(None))),
        "param type": lambda: _PLAIN.issuperset(map(type, params)),
        "param data_ptr": lambda: list(map(T.data_ptr, params)),
        "param numel": lambda: list(map(T.numel, params)),
        "param is_contiguous": lambda: list(map(T.is_contiguous, params)),
        "param dtype": lambda: list(map(attrgetter("dtype"), params)),
        "grad data_ptr": lambda: list(map(T.data_ptr, grads)),
        "grad numel": lambda: list(map(T.numel, grads)),
        "grad is_contiguous": lambda: list(map(T.is_contiguous, grads)),
        "grad dtype": lambda: list(map(attrgetter("dtype"), grads)),
        "grad get_device": lambda: list(map(T.get_device, grads)),
        "state data_ptr": lambda: list(map(T.data_ptr, bufs)),
        "state _version": lambda: list(map(attrgetter("_version"), bufs)),
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
    steps = {}
    for kind, cls, kw in (("sgd", "SGD", dict(lr=0.01, momentum=0.9)),
                          ("adamw", "AdamW", dict(lr=1e-3))):
        def own(cls=cls, kw=kw):
            copies = [p.detach().clone().requires_grad_() for p in params]
            for c, g in zip(copies, grads):
                c.grad = g.clone()
            return copies
        steps[f"{kind} torch fused"] = getattr(torch.optim, cls)(own(), fused=True, **kw).step
        steps[f"{kind} fused_optim"] = getattr(fused_optim, cls)(own(), backend="numba",
                                                                 **kw).step
    reads = _reads(params, grads, states, bufs)
    timed = {**steps, **reads}
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
        out[f"{kind} reads"] = sum(out[n] for n in names)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tensors", type=int, default=161)
    ap.add_argument("--numel", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=400)
    args = ap.parse_args(argv)
    out = run(args.tensors, args.numel, args.rounds)
    print(f"{args.tensors} tensors of {args.numel} elements, medians of {args.rounds} "
          "interleaved rounds, microseconds")
    for name, us in out.items():
        if not name.endswith(" reads"):
            print(f"  {name:22s} {us:8.1f}")
    for kind, names in READS.items():
        fused = out[f"{kind} torch fused"]
        total = out[f"{kind} reads"]
        print(f"{kind}: {len(names)} maps of reads sum to {total:.1f} us = "
              f"{total / fused:.2f}x torch fused's step; fused_optim's whole step "
              f"{out[f'{kind} fused_optim'] / fused:.2f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
