"""The 8-bit state span against the float32 state span, paired in one process (issue 27).

AdamW's element over one flat float32 list (default 24 x 1M elements), two
threads, each thread one chunk of whole blocks: ``_blockwise.blocks`` over
uint8 codes and scales (the second moment stochastically rounded) against
``_walk.blocked`` over float32 moments, interleaved, each timing ``--rep``
steps. Prints the medians, the median of the paired ratios and, as a check
on a loaded machine, the same for the process's CPU time. Compiles its own
two kernels (about half a minute) into Numba's memory, not the disk cache.

    python benchmarks/blockwise_span.py [--elements N] [--rounds R] [--rep K]
"""
from __future__ import annotations

import argparse
import os
import statistics
import time

import numba
import numpy as np
from numba import njit, prange

from fused_optim.kernels.numba import _blockwise as QB
from fused_optim.kernels.numba import _walk as W
from fused_optim.kernels.numba.adam import _adam_element
from fused_optim.kernels.reference._blockwise import BLOCK

# INV_SCALE, LERP_W, LERP_FROM_GRAD, BETA2, 1 - BETA2, EPS, WD, HAS_WD, DECAY
X = (np.float32(1.0), np.float32(0.1), np.float32(0.0), np.float32(0.999), np.float32(0.001),
     np.float32(1e-8), np.float32(0.0), np.float32(0.0), np.float32(1 - 1e-3 * 1e-2))
R = (np.float32(1e-2), np.float32(0.3), np.float32(1 / np.float32(0.3)))


@njit(error_model="numpy")
def _chunk_8bit(p, g, cm, cv, sm, sv, key, lo, hi, x, r):
    bufs = np.empty((3, BLOCK), dtype=np.float32)
    s0 = (cm[lo:hi], sm[lo // BLOCK:], bufs[0], QB._DEC_S, None, lo)
    s1 = (cv[lo:hi], sv[lo // BLOCK:], bufs[1], QB._DEC_U, (key, np.uint32(0)), lo)
    QB.blocks(_adam_element, hi - lo, p[lo:hi], g[lo:hi], s0, s1, None, None, None, x, r)


@njit(parallel=True, error_model="numpy")
def step_8bit(p, g, cm, cv, sm, sv, key, bounds, x, r):
    for c in prange(len(bounds) - 1):
        _chunk_8bit(p, g, cm, cv, sm, sv, key, bounds[c], bounds[c + 1], x, r)


@njit(parallel=True, error_model="numpy")
def step_fp32(p, g, m, v, bounds, x, r):
    for c in prange(len(bounds) - 1):
        lo, hi = bounds[c], bounds[c + 1]
        W.blocked(_adam_element, hi - lo, p[lo:hi], g[lo:hi], m[lo:hi], v[lo:hi], None, None,
                  None, x, r)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--elements", type=int, default=24 << 20)
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--rep", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    numba.set_num_threads(a.threads)
    n = a.elements
    nb = -(-n // BLOCK)
    bounds = np.array([min(n, nb * c // a.threads * BLOCK) for c in range(a.threads + 1)],
                      dtype=np.int64)
    rng = np.random.default_rng(0)
    g = rng.standard_normal(n, dtype=np.float32) * np.exp(
        2 * rng.standard_normal(n, dtype=np.float32))
    q = [rng.standard_normal(n, dtype=np.float32), g, np.zeros(n, np.uint8),
         np.zeros(n, np.uint8), np.zeros(nb, np.float32), np.zeros(nb, np.float32)]
    f = [q[0].copy(), g, np.zeros(n, np.float32), np.zeros(n, np.float32)]
    key = np.uint32(0x12345678)
    step_8bit(*q, key, bounds, X, R)
    step_fp32(*f, bounds, X, R)
    wall = {"8bit": [], "fp32": []}
    cpu = {"8bit": [], "fp32": []}
    runs = {"8bit": lambda: step_8bit(*q, key, bounds, X, R),
            "fp32": lambda: step_fp32(*f, bounds, X, R)}
    for _ in range(a.rounds):
        for k, run in runs.items():
            c0, t0 = time.process_time(), time.perf_counter()
            for _ in range(a.rep):
                run()
            wall[k].append((time.perf_counter() - t0) / a.rep)
            cpu[k].append((time.process_time() - c0) / a.rep)
    for name, d in (("wall", wall), ("cpu", cpu)):
        ratios = sorted(b / c for b, c in zip(d["8bit"], d["fp32"]))
        print(f"{name:4s} fp32 state {statistics.median(d['fp32']) * 1e3:7.2f} ms  8-bit state "
              f"{statistics.median(d['8bit']) * 1e3:7.2f} ms  paired ratio "
              f"{statistics.median(ratios):.3f} (p25 {ratios[len(ratios) // 4]:.3f} "
              f"p75 {ratios[3 * len(ratios) // 4]:.3f})")
    print(f"{n} elements, {a.threads} threads, {a.rounds} rounds of {a.rep} steps; "
          f"load average {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
