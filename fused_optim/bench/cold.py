"""Cold start: what a fresh process pays before its first step is done.

``fused-optim bench --cold-start`` runs a one-step training script in fresh
Python processes, interleaved round by round, and reports the median of each
figure over the rounds, for torch.optim and for fused_optim:

* ``fused_optim (warm cache)``: Numba's disk cache already holds the kernels
  (filled beforehand by one process that compiled them in its step);
* ``fused_optim (empty cache)``: a new, empty cache directory per process,
  as after a fresh install;
* ``--cold-env KEY=VALUE`` adds the same two with that environment (e.g.
  ``FUSED_OPTIM_WARMUP=0``: no background warm-up), or a ``PYTHONPATH`` of
  another checkout to compare trees.

The script (:data:`CHILD`): ``import torch``; import the optimizers; build an
MLP (``--cold-width`` square layers, 4 of them); construct the optimizer;
one forward and backward; ``step()``; a second forward, backward and step.
Reported per process: the import of the optimizer package after torch, the
constructor, the first and second ``step()``, the process's wall time from
start to exit, and its peak resident memory over its whole life (the
rusage ``wait4`` returns: a background compile the exit waits for counts).
"""

from __future__ import annotations

import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time

CHILD = r"""
import json, sys, time
t0 = time.perf_counter()
import torch
t1 = time.perf_counter()
impl, name, width = sys.argv[1], sys.argv[2], int(sys.argv[3])
if impl == "torch":
    import torch.optim as optim
else:
    import fused_optim as optim
t2 = time.perf_counter()
torch.manual_seed(0)
model = torch.nn.Sequential(*[m for _ in range(4)
                              for m in (torch.nn.Linear(width, width), torch.nn.Tanh())])
kw = dict(lr=0.01, momentum=0.9) if name == "SGD" else {}
t3 = time.perf_counter()
opt = getattr(optim, name)(model.parameters(), **kw)
t4 = time.perf_counter()
x = torch.randn(64, width, generator=torch.Generator().manual_seed(1))
model(x).square().mean().backward()
t5 = time.perf_counter()
opt.step()
t6 = time.perf_counter()
opt.zero_grad()
model(x).square().mean().backward()
t7 = time.perf_counter()
opt.step()
t8 = time.perf_counter()
print(json.dumps(dict(import_torch=t1 - t0, import_optim=t2 - t1, construct=t4 - t3,
                      forward_backward=t5 - t4, first_step=t6 - t5, second_step=t8 - t7,
                      params=sum(p.numel() for p in model.parameters()),
                      module=optim.__file__)))
"""

#: the configurations issue 16 names: SGD with momentum and AdamW, defaults otherwise
CONFIGS = ("SGD", "AdamW")
FIGURES = ("import_optim", "construct", "first_step", "second_step", "wall", "peak_rss_mib")


def _child(impl, name, width, env, cwd=None) -> dict:
    """One fresh process: its own figures, its wall time from start to exit,
    and its peak resident memory over its whole life (``wait4``'s rusage:
    background compiles that the exit waits for included)."""
    t0 = time.perf_counter()
    # (run from a scratch directory: a checkout in the working directory
    # would shadow the installed package, or the one PYTHONPATH names)
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        proc = subprocess.Popen([sys.executable, "-c", CHILD, impl, name, str(width)],
                                stdout=out, stderr=err, text=True, env=env, cwd=cwd)
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - t0
        proc.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        stdout, stderr = out.read(), err.read()
    if proc.returncode != 0:
        raise RuntimeError(f"cold-start child ({impl} {name}) failed:\n{stderr[-3000:]}")
    res = json.loads(stdout.strip().splitlines()[-1])
    res["wall"] = wall
    res["peak_rss_mib"] = usage.ru_maxrss / 1024  # KiB on Linux
    return res


def _parse_env(items) -> list:
    out = []
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ValueError(f"--cold-env wants KEY=VALUE, got {item!r}")
        out.append((key, value))
    return out


def measure(runs: int = 5, width: int = 1024, configs=CONFIGS, extra_env=(),
            progress=None, seed: int = 0) -> dict:
    """``{(config, variant): {figure: [values]}}`` over ``runs`` interleaved rounds."""
    base = dict(os.environ)
    base.pop("NUMBA_CACHE_DIR", None)
    variants = {"torch.optim": ("torch", None, {})}
    envs = [("", {})] + [(f" {k}={v}", {k: v}) for k, v in _parse_env(extra_env)]
    for label, env in envs:
        variants[f"fused_optim{label} (warm cache)"] = ("fused", "warm", env)
        variants[f"fused_optim{label} (empty cache)"] = ("fused", "empty", env)
    rng = random.Random(seed)
    results: dict = {}
    with tempfile.TemporaryDirectory(prefix="fused_optim-cold-") as tmp:
        warm_dirs = {}
        for name in configs:
            for label, env in envs:
                # filled by a process that compiles in its step (no background
                # compile cut short by the exit)
                d = warm_dirs[(name, label)] = os.path.join(tmp, f"warm-{name}-{len(warm_dirs)}")
                _child("fused", name, width, {**base, **env, "NUMBA_CACHE_DIR": d,
                                              "FUSED_OPTIM_WARMUP": "0"}, cwd=tmp)
        count = 0
        for r in range(runs):
            order = [(n, v) for n in configs for v in variants]
            rng.shuffle(order)
            for name, variant in order:
                impl, cache, env = variants[variant]
                label = next(lbl for lbl, e in envs if e == env)
                child_env = {**base, **env}
                if cache == "warm":
                    child_env["NUMBA_CACHE_DIR"] = warm_dirs[(name, label)]
                elif cache == "empty":
                    count += 1
                    child_env["NUMBA_CACHE_DIR"] = os.path.join(tmp, f"empty-{count}")
                if progress is not None:
                    progress(f"round {r + 1}/{runs}: {name} {variant}")
                res = _child(impl, name, width, child_env, cwd=tmp)
                slot = results.setdefault((name, variant), {f: [] for f in FIGURES})
                for f in FIGURES:
                    slot[f].append(res[f])
                slot.setdefault("params", res["params"])
                slot.setdefault("module", res["module"])
    return results


def format_table(results: dict) -> str:
    head = ("optimizer", "variant", "import ms", "construct ms", "1st step ms", "2nd step ms",
            "wall s", "peak MiB")
    rows = []
    for (name, variant), figs in results.items():
        med = {f: statistics.median(v) for f, v in figs.items() if f in FIGURES}
        rows.append((name, variant, f"{med['import_optim'] * 1e3:.0f}",
                     f"{med['construct'] * 1e3:.1f}", f"{med['first_step'] * 1e3:.0f}",
                     f"{med['second_step'] * 1e3:.1f}", f"{med['wall']:.2f}",
                     f"{med['peak_rss_mib']:.0f}"))
    rows.sort(key=lambda r: (r[0], r[1] != "torch.optim", r[1]))
    widths = [max(len(str(x)) for x in col) for col in zip(head, *rows)]
    line = "  ".join(f"{{:<{w}}}" if i < 2 else f"{{:>{w}}}" for i, w in enumerate(widths))
    n = len(next(iter(results.values()))["wall"]) if results else 0
    out = [f"cold start: medians over {n} fresh processes per row", line.format(*head)]
    out += [line.format(*r) for r in rows]
    return "\n".join(out)


def to_json(results: dict, settings: dict) -> dict:
    return {"settings": settings,
            "results": [{"optimizer": name, "variant": variant,
                         **{f: figs[f] for f in FIGURES},
                         "median": {f: statistics.median(figs[f]) for f in FIGURES},
                         "params": figs.get("params"), "module": figs.get("module")}
                        for (name, variant), figs in results.items()]}
