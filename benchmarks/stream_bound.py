"""How fast can any kernel stream SGD-momentum's bytes here? (issue 26)

bf16 SGD momentum reads 3 arrays and writes 2 of them back (param, buffer;
the grad is only read). The bench's ceiling (``kernels/numba/_ceiling``) is
that access pattern with no arithmetic. If torch's fused step already runs
at the ceiling, a kernel 10% faster than torch would have to stream faster
than the ceiling does. This script times, interleaved in one process with
every thread: the ceiling over one flat array per role, torch's fused SGD
on the same bytes, and torch's own streaming ops (``copy_``, in-place
``add_``) as other memory patterns, each as GB/s of the bytes it must move.

    python benchmarks/stream_bound.py [--mib 256] [--rounds 15]
"""
from __future__ import annotations

import argparse
import statistics
import time

import numba
import torch

from fused_optim.kernels.numba import _ceiling


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mib", type=int, default=256, help="MiB per array (default 256)")
    ap.add_argument("--rounds", type=int, default=15)
    args = ap.parse_args()
    threads = numba.get_num_threads()
    torch.set_num_threads(threads)
    n = args.mib * 2**20 // 2  # bf16 elements per array
    g = torch.randn(n).to(torch.bfloat16)
    p = torch.randn(n).to(torch.bfloat16)
    buf = torch.randn(n).to(torch.bfloat16)
    # the ceiling writes p and buf back (XOR of the grad's words), reads g
    table = _ceiling.make_table([[p.data_ptr(), buf.data_ptr(), g.data_ptr()]], [n])
    bounds = _ceiling.split(n)
    param = torch.nn.Parameter(p.clone())
    param.grad = g.clone()
    sgd = torch.optim.SGD([param], lr=1e-3, momentum=0.9, fused=True)
    a32 = torch.randn(n // 2)  # fp32 arrays of the same byte size
    b32 = torch.randn(n // 2)
    moved = 5 * 2 * n  # 3 reads + 2 writes of 2-byte elements
    cases = {
        "ceiling: read 3 / write 2 (bf16 words)": (
            lambda: _ceiling.pattern(table, bounds, 2, 3, 2), moved),
        "torch fused SGD momentum, bf16": (sgd.step, moved),
        "torch copy_: read 1 / write 1": (lambda: b32.copy_(a32), 2 * 4 * (n // 2)),
        "torch add_ in place: read 2 / write 1": (lambda: a32.add_(b32), 3 * 4 * (n // 2)),
    }
    for fn, _ in cases.values():
        fn()
        fn()
    times = {k: [] for k in cases}
    for _ in range(args.rounds):
        for k, (fn, _) in cases.items():
            t = time.perf_counter()
            fn()
            times[k].append(time.perf_counter() - t)
    print(f"{threads} threads, {args.mib} MiB per array, medians of {args.rounds} "
          "interleaved rounds")
    ceiling = statistics.median(times["ceiling: read 3 / write 2 (bf16 words)"])
    for k, (_, nbytes) in cases.items():
        m = statistics.median(times[k])
        print(f"{k:42s} {m * 1e3:8.2f} ms {nbytes / m / 1e9:6.1f} GB/s"
              + (f"  ceiling / this {ceiling / m:.2f}" if "SGD" in k else ""))


if __name__ == "__main__":
    main()
