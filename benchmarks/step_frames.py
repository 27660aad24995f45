"""How deep one step goes through the project's own code, counted with ``sys.setprofile``.

A newcomer follows one ``step()`` from the optimizer class to the kernel
launch. This counts what they would have to read: every Python frame whose
code lives in ``fused_optim/`` or ``kernels/`` (installed or in the work
tree) during one step on a cached plan, the deepest chain of such frames
(the project's frames only, torch's and Numba's in between not counted),
and the files on that chain.

    python benchmarks/step_frames.py [--optimizers sgd adamw adagrad rmsprop]
                                     [--backend numba] [--first]

``--first`` counts the first step of a new optimizer instead (plan built,
state created). The model: 4 fp32 params with grads, momentum 0.9 for SGD.
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

import fused_optim

ROOTS = tuple(os.path.dirname(m.__file__) + os.sep
              for m in (fused_optim, fused_optim.kernels))

KWARGS = {"sgd": dict(lr=0.1, momentum=0.9), "adam": dict(lr=1e-3), "adamw": dict(lr=1e-3),
          "adagrad": dict(lr=1e-2), "rmsprop": dict(lr=1e-2)}
CLASSES = {"sgd": "SGD", "adam": "Adam", "adamw": "AdamW", "adagrad": "Adagrad",
           "rmsprop": "RMSprop"}


def _ours(code) -> bool:
    return code.co_filename.startswith(ROOTS)


def count(step) -> dict:
    """Frames of the project's own code during ``step()``.

    Returns:
        dict with ``frames`` (calls of project functions), ``depth`` (the
        deepest chain of project frames), ``chain`` (its functions, outermost
        first) and ``files`` (the files on that chain).
    """
    stack, calls, deepest = [], [0], [[]]

    def profile(frame, event, arg):
        if event == "call" and _ours(frame.f_code):
            calls[0] += 1
            stack.append(frame.f_code)
            if len(stack) > len(deepest[0]):
                deepest[0] = list(stack)
        elif event == "return" and stack and frame.f_code is stack[-1]:
            stack.pop()

    sys.setprofile(profile)
    try:
        step()
    finally:
        sys.setprofile(None)
    chain = deepest[0]
    rel = [os.path.relpath(c.co_filename, os.path.dirname(ROOTS[0].rstrip(os.sep)))
           for c in chain]
    return {"frames": calls[0], "depth": len(chain),
            "chain": [f"{os.path.basename(f)}:{c.co_name}" for f, c in zip(rel, chain)],
            "files": sorted(set(rel))}


def measure(name: str, backend: str, first: bool) -> dict:
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(n)) for n in (64, 128, 256, 512)]
    opt = getattr(fused_optim, CLASSES[name])(params, backend=backend, **KWARGS[name])
    for p in params:
        p.grad = torch.randn_like(p)
    if not first:
        for _ in range(3):
            opt.step()
    return count(opt.step)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--optimizers", nargs="+", default=["sgd", "adamw", "adagrad", "rmsprop"],
                    choices=sorted(KWARGS))
    ap.add_argument("--backend", default="numba")
    ap.add_argument("--first", action="store_true")
    args = ap.parse_args(argv)
    os.environ.setdefault("FUSED_OPTIM_WARMUP", "0")
    for name in args.optimizers:
        r = measure(name, args.backend, args.first)
        print(f"{name}: {r['frames']} frames, {r['depth']} deep across "
              f"{len(r['files'])} files ({', '.join(r['files'])})")
        print("   " + " -> ".join(r["chain"]))


if __name__ == "__main__":
    main()
