"""What ``kernels/_jit.light_loads`` saves: a warm-cache first step.

Fresh processes, one after the other and alternating, each loading the
kernels a first ``step()`` needs from a Numba cache that already holds them:
with the light loads (as shipped), and with Numba's own load (the light
loads undone after import). Prints the median first step of each.

    python benchmarks/warm_load.py [--runs 7] [--optimizer AdamW] [--width 1024]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile

CHILD = r"""
import json, sys, time
import torch
import fused_optim
name, width, light = sys.argv[1], int(sys.argv[2]), sys.argv[3] == "1"
import fused_optim.kernels.numba as nb
if not light:
    import importlib
    for mod in ("sgd", "adam", "adagrad", "rmsprop"):
        for v in vars(importlib.import_module("fused_optim.kernels.numba." + mod)).values():
            cache = getattr(v, "_cache", None)
            if cache is not None and "load_overload" in vars(cache):
                del cache.load_overload  # Numba's own load again
torch.manual_seed(0)
model = torch.nn.Sequential(*[torch.nn.Linear(width, width) for _ in range(4)])
kw = dict(lr=0.01, momentum=0.9) if name == "SGD" else {}
opt = getattr(fused_optim, name)(model.parameters(), **kw)
model(torch.randn(8, width)).square().mean().backward()
t = time.perf_counter()
opt.step()
print(json.dumps(dict(first_step=time.perf_counter() - t)))
"""


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=7)
    ap.add_argument("--optimizer", default="AdamW")
    ap.add_argument("--width", type=int, default=1024)
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory() as cache, tempfile.TemporaryDirectory() as cwd:
        env = dict(os.environ, NUMBA_CACHE_DIR=cache, FUSED_OPTIM_WARMUP="0")

        def child(light: bool) -> float:
            out = subprocess.run([sys.executable, "-c", CHILD, args.optimizer, str(args.width),
                                  "1" if light else "0"], env=env, cwd=cwd,
                                 capture_output=True, text=True, check=True)
            return json.loads(out.stdout.strip().splitlines()[-1])["first_step"]

        child(True)  # fills the cache
        times = {True: [], False: []}
        for r in range(args.runs):
            for light in ((True, False) if r % 2 == 0 else (False, True)):
                times[light].append(child(light))
    for light, label in ((True, "light loads"), (False, "Numba's own load")):
        print(f"{args.optimizer} warm-cache first step, {label}: "
              f"{statistics.median(times[light]) * 1e3:.0f} ms (median of {args.runs})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
