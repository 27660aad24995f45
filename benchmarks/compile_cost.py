"""Compile cost from an empty Numba cache: the first ``step()`` of every
``tests/optim_db.py`` configuration.

One child process per path, each with a new, empty ``NUMBA_CACHE_DIR`` and
``FUSED_OPTIM_WARMUP=0`` (every kernel compiles in the step that needs it),
steps each configuration once in every dtype asked, on one param of 8
elements (the serial entry points) or of 40,000 (over ``SERIAL_BELOW``: the
parallel ones), in the order of the database. Reported: the seconds of all
those first steps together, the slowest one, and the number of
specializations the Numba kernels then hold.

    python benchmarks/compile_cost.py [--site DIR] [--paths serial parallel]
                                      [--dtypes float32 bfloat16] [--json FILE]

``--site DIR`` measures another install (``pip install --no-deps --target
DIR <checkout>``) instead of the one this Python imports: the children run
with ``PYTHONPATH=DIR`` from a scratch directory.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

_TESTS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests")

CHILD = r"""
import importlib, json, sys, time
sys.path.insert(0, sys.argv[1])
numel, dtypes = int(sys.argv[2]), sys.argv[3].split(",")
import numba, torch
import fused_optim
import optim_db
from matrix import build_kwargs
times = []
for info in optim_db.OPTIM_DB:
    for config in info.configs_for("cpu"):
        for dt in dtypes:
            p = torch.randn(numel, dtype=getattr(torch, dt), requires_grad=True)
            opt = info.cls([p], backend="numba", **build_kwargs(config))
            p.grad = torch.randn_like(p)
            t = time.perf_counter()
            opt.step()
            times.append((info.name, repr(config), dt, time.perf_counter() - t))
count = 0  # the entry points' (the helpers they inline are compiled per signature too)
for mod in sorted({r.kernel for r in fused_optim._registry.records()}):
    m = importlib.import_module("fused_optim.kernels.numba." + mod)
    for v in vars(m).values():
        if (isinstance(v, numba.core.registry.CPUDispatcher)
                and v.__name__.endswith(("_serial", "_parallel"))):
            count += len(v.overloads)
print(json.dumps(dict(times=times, specializations=count, module=fused_optim.__file__)))
"""


def measure(path: str, dtypes, site=None) -> dict:
    numel = {"serial": 8, "parallel": 40_000}[path]
    env = dict(os.environ, FUSED_OPTIM_WARMUP="0")
    if site:
        env["PYTHONPATH"] = site
    with tempfile.TemporaryDirectory() as cache, tempfile.TemporaryDirectory() as cwd:
        env["NUMBA_CACHE_DIR"] = cache
        out = subprocess.run([sys.executable, "-c", CHILD, _TESTS, str(numel), ",".join(dtypes)],
                             env=env, cwd=cwd, capture_output=True, text=True, check=False)
    if out.returncode:
        raise SystemExit(f"the {path} child failed:\n{out.stderr[-4000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--site", help="measure the install in DIR (PYTHONPATH)")
    ap.add_argument("--paths", nargs="+", default=["serial", "parallel"],
                    choices=["serial", "parallel"])
    ap.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    ap.add_argument("--json", help="also write the results here")
    args = ap.parse_args(argv)
    results = {}
    for path in args.paths:
        r = results[path] = measure(path, args.dtypes, args.site)
        secs = [t[-1] for t in r["times"]]
        print(f"{path:<8} {len(secs)} first steps: {sum(secs):7.1f} s in all, slowest "
              f"{max(secs):5.1f} s, {r['specializations']} specializations "
              f"({r['module']})", flush=True)
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(dict(argv=sys.argv, site=args.site, results=results), f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
