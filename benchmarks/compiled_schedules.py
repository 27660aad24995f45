"""Graphs a compiled ``opt.step()`` costs under a scheduler, fused_optim vs torch.optim.

``torch.compile`` around ``opt.step()``, a scheduler stepped eagerly after
it, ``--steps`` steps (tiny tensors: compiling is the cost measured).
Schedules: ``lambda`` (LambdaLR warmup, a new float lr every step),
``cosine`` (LinearLR warmup, then CosineAnnealingLR to 0: SequentialLR) and
``onecycle`` (OneCycleLR with ``cycle_momentum=True``: lr and ``betas[0]``
or ``momentum`` new every step). For each optimizer, fused_optim (numba)
against torch.optim's class (``foreach=False``), each from a fresh
``torch._dynamo.reset()``:

* graphs: dynamo's ``unique_graphs``;
* late: graphs compiled after the first two calls (the first step, and the
  second with state and the changed floats made dynamic);
* limit: whether dynamo's ``recompile_limit`` was hit (eager steps after);
* compile s: wall time of the calls that compiled; step ms: the median of
  the calls that did not.

Issue 25, item 7: before the fix, fused_optim recompiled at every new float
(8 graphs, then the limit). Measure an older checkout with
``PYTHONPATH=DIR``.

Usage::

    python benchmarks/compiled_schedules.py [--optims AdamW SGD] [--steps 20]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch._dynamo
from torch._dynamo.utils import counters

import fused_optim

KWARGS = {"SGD": dict(lr=0.1, momentum=0.9), "Adam": dict(lr=0.01),
          "AdamW": dict(lr=0.01), "Adagrad": dict(lr=0.1),
          "RMSprop": dict(lr=0.01, momentum=0.9)}


def schedule(name, opt, steps):
    if name == "lambda":
        return torch.optim.lr_scheduler.LambdaLR(opt, lambda e: (e + 1) / steps)
    if name == "cosine":  # linear warmup, then cosine annealing to 0
        warm = torch.optim.lr_scheduler.LinearLR(opt, 0.1, total_iters=steps // 4)
        cos = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps - steps // 4)
        return torch.optim.lr_scheduler.SequentialLR(opt, [warm, cos], [steps // 4])
    return torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=opt.defaults["lr"] * 10,
                                               total_steps=2 * steps, cycle_momentum=True)


def run(cls, kwargs, sched_name, steps):
    torch._dynamo.reset()
    counters.clear()
    gen = torch.Generator().manual_seed(0)
    params = [torch.randn(6, 3, generator=gen).requires_grad_(),
              torch.randn(5, generator=gen).requires_grad_()]
    opt = cls(params, **kwargs)
    sched = schedule(sched_name, opt, steps)
    step = torch.compile(lambda: opt.step())
    compile_s, step_s, early = 0.0, [], 0
    for s in range(steps):
        for p in params:
            p.grad = torch.randn(p.shape, generator=gen)
        before = counters["stats"]["unique_graphs"]
        t0 = time.perf_counter()
        step()
        dt = time.perf_counter() - t0
        if counters["stats"]["unique_graphs"] > before:
            compile_s += dt
        else:
            step_s.append(dt)
        if s == 1:
            early = counters["stats"]["unique_graphs"]
        sched.step()
    graphs = counters["stats"]["unique_graphs"]
    limit = any("recompile limit" in k for k in counters["unimplemented"])
    torch._dynamo.reset()
    return dict(graphs=graphs, late=graphs - early, limit=limit, compile_s=compile_s,
                step_ms=1e3 * statistics.median(step_s) if step_s else float("nan"))


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--optims", nargs="+", default=["AdamW", "SGD"], choices=sorted(KWARGS))
    ap.add_argument("--schedules", nargs="+", default=["lambda", "onecycle"],
                    choices=["lambda", "onecycle", "cosine"])
    ap.add_argument("--steps", type=int, default=20)
    args = ap.parse_args()
    print(f"fused_optim from {fused_optim.__file__}, torch {torch.__version__}, "
          f"{args.steps} steps")
    print(f"{'optimizer':9} {'schedule':9} {'library':12} {'graphs':>6} {'late':>5} "
          f"{'limit':>5} {'compile s':>9} {'step ms':>8}")
    for name in args.optims:
        for sched_name in args.schedules:
            for lib, cls, extra in (
                    ("torch.optim", getattr(torch.optim, name), dict(foreach=False)),
                    ("fused_optim", getattr(fused_optim, name), dict(backend="numba"))):
                r = run(cls, {**KWARGS[name], **extra}, sched_name, args.steps)
                print(f"{name:9} {sched_name:9} {lib:12} {r['graphs']:6d} {r['late']:5d} "
                      f"{str(r['limit']):>5} {r['compile_s']:9.2f} {r['step_ms']:8.2f}",
                      flush=True)


if __name__ == "__main__":
    main()
