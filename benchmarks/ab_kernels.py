"""Paired A/B of two trees' Numba kernels on the same tensors, in one process.

Issue 24 moved the value switches of the Numba kernels (maximize, weight
decay, nesterov, the lerp side, GradScaler's scale, ...) from compile time
to run time. This times the kernels of another tree (``--old``: a directory
holding that tree's ``kernels/`` copied as a package named ``oldk``, e.g.
``git archive bde133e kernels | tar -x -C DIR && mv DIR/kernels DIR/oldk``)
against this tree's, alternating old and new launches on one batch per
case, and prints the median of the paired new/old time ratios.

    python benchmarks/ab_kernels.py --old DIR [--lists resnet50] [--rounds 21]
        [--precision plain kahan sr kahan+sr]

Both trees' kernels update the same tensors in place (the values drift;
the timing does not depend on them). Each case is warmed (compiled) first.
"""

from __future__ import annotations

import argparse
import importlib
import os
import statistics
import sys
import time

os.environ.setdefault("FUSED_OPTIM_WARMUP", "0")

import numpy as np  # noqa: E402
import torch  # noqa: E402

from fused_optim.bench.cases import shape_list  # noqa: E402
from fused_optim.kernels import columns as L  # noqa: E402
from fused_optim.kernels.batch import Batch  # noqa: E402

#: (optimizer, the launcher's keyword arguments, states present, per-row step)
_SGD = dict(lr=0.01, weight_decay=0.0, momentum=0.9, dampening=0.0, nesterov=False,
            maximize=False)
_ADAM = dict(lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.01,
             decoupled_weight_decay=True, amsgrad=False, maximize=False)
CASES = {
    "sgd": ("sgd", dict(_SGD, momentum=0.0), 0),
    "sgd-momentum": ("sgd", _SGD, 1),
    "sgd-momentum+wd+nesterov": ("sgd", dict(_SGD, weight_decay=1e-4, nesterov=True), 1),
    "sgd-momentum+maximize": ("sgd", dict(_SGD, maximize=True), 1),
    "sgd-momentum+grad_scale": ("sgd", dict(_SGD, grad_scale=True), 1),
    "adamw": ("adam", _ADAM, 2),
    "adam-l2": ("adam", dict(_ADAM, decoupled_weight_decay=False), 2),
    "adam-nodecay": ("adam", dict(_ADAM, weight_decay=0.0), 2),
    "adamw-lerp-other-side": ("adam", dict(_ADAM, beta1=0.3), 2),
    "adamw+maximize": ("adam", dict(_ADAM, maximize=True), 2),
    "adamw-amsgrad": ("adam", dict(_ADAM, amsgrad=True), 3),
    "adagrad": ("adagrad", dict(lr=0.01, lr_decay=0.0, eps=1e-10, weight_decay=0.0,
                                maximize=False), 1),
    "adagrad+wd": ("adagrad", dict(lr=0.01, lr_decay=0.0, eps=1e-10, weight_decay=1e-4,
                                   maximize=False), 1),
    "rmsprop": ("rmsprop", dict(lr=0.01, alpha=0.99, eps=1e-8, weight_decay=0.0,
                                momentum=0.0, centered=False, maximize=False), 1),
    "rmsprop-momentum-centered": ("rmsprop", dict(lr=0.01, alpha=0.99, eps=1e-8,
                                                  weight_decay=1e-4, momentum=0.9,
                                                  centered=True, maximize=False), 3),
}
_STEPPED = {"adam", "adagrad", "rmsprop"}


#: ``--precision`` -> the param-store options passed to both sides' launchers
#: (bfloat16/float16 only; Kahan's compensation buffer is a table column)
PRECISIONS = {"plain": {}, "kahan": dict(kahan_sum=True),
              "sr": dict(stochastic_round=(1, 0, 0)),
              "kahan+sr": dict(kahan_sum=True, stochastic_round=(1, 0, 0))}


def make_batch(shapes, dtype, nstates, stepped, comp=False):
    """A Batch over fresh tensors, and the tensors (kept alive by the caller)."""
    keep = []
    rows = len(shapes)
    table = np.zeros((rows, L.NCOLS), dtype=np.int64)
    start = 0
    for r, shape in enumerate(shapes):
        ts = [torch.randn(shape).to(dtype) for _ in range(2)]
        ts += [torch.rand(shape).to(dtype) for _ in range(nstates)]
        keep += ts
        cols = [L.PARAM, L.GRAD, L.STATE0, L.STATE1, L.STATE2][:len(ts)]
        if comp:
            ts.append(torch.zeros(shape, dtype=dtype))
            keep.append(ts[-1])
            cols.append(L.COMP)
        for col, t in zip(cols, ts):
            table[r, col] = t.data_ptr()
        if stepped:
            step = torch.tensor(1.0)
            keep.append(step)
            table[r, L.STEP] = step.data_ptr()
        n = ts[0].numel()
        table[r, L.NUMEL] = n
        table[r, L.START] = start
        start += n
    return Batch(torch.device("cpu"), dtype, table, start), keep


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--old", required=True)
    ap.add_argument("--lists", nargs="+", default=["resnet50"])
    ap.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    ap.add_argument("--cases", nargs="+", default=list(CASES), choices=list(CASES))
    ap.add_argument("--precision", nargs="+", default=["plain"], choices=list(PRECISIONS),
                    help="param-store options (bfloat16/float16 dtypes only)")
    ap.add_argument("--rounds", type=int, default=21)
    args = ap.parse_args(argv)
    sys.path.insert(0, args.old)
    sides = {"old": "oldk.numba", "new": "fused_optim.kernels.numba"}
    print(f"{'list':<11} {'dtype':<9} {'case':<27} {'old ms':>8} {'new ms':>8} "
          f"{'new/old':>8}", flush=True)
    for name in args.lists:
        shapes = [s for s in shape_list(name).shapes]
        for dt in args.dtypes:
            dtype = getattr(torch, dt)
            for case, prec in ((c, q) for c in args.cases for q in args.precision):
                if prec != "plain" and dtype not in (torch.bfloat16, torch.float16):
                    continue
                kernel, kw, nstates = CASES[case]
                kw = dict(kw, **PRECISIONS[prec])
                if kw.pop("grad_scale", False):
                    kw["grad_scale"] = torch.tensor(1024.0)
                batch, keep = make_batch(shapes, dtype, nstates, kernel in _STEPPED,
                                         comp="kahan_sum" in kw)
                fns = {side: getattr(importlib.import_module(f"{mod}.{kernel}"), kernel)
                       for side, mod in sides.items()}
                for fn in fns.values():
                    fn(batch, **kw)  # compile or load
                times = {"old": [], "new": []}
                for i in range(args.rounds):
                    order = ("old", "new") if i % 2 == 0 else ("new", "old")
                    for side in order:
                        t = time.perf_counter()
                        fns[side](batch, **kw)
                        times[side].append(time.perf_counter() - t)
                ratio = statistics.median(n / o for n, o in zip(times["new"], times["old"]))
                label = case if prec == "plain" else f"{case}+{prec}"
                print(f"{name:<11} {dt:<9} {label:<27} "
                      f"{statistics.median(times['old']) * 1e3:8.2f} "
                      f"{statistics.median(times['new']) * 1e3:8.2f} {ratio:8.3f}", flush=True)
                del batch, keep


if __name__ == "__main__":
    main()
