"""Host time of a Triton-backend step, kernel launches stubbed out.

On a GPU the step's Python runs while the device works; for lists of many
small tensors it is what the step costs (the memory floor of the 1,000-tensor
list is about 21 us on an H100). This script times that Python on the CPU:
the Triton kernels are replaced by stubs that take their arguments and do
nothing, so what is left is the optimizer's own work (gathering, the reuse
rule, the tables) and the launcher's (alignment classes, cached device
buffers, hyperparameter buffers, constexpr arguments). Tensors are CPU
tensors: uploads are CPU copies here, pinned host-to-device copies on CUDA.

Timed interleaved in one process, medians of ``--rounds``:

* ``step``: a whole ``opt.step()`` with ``backend="triton"``;
* ``launcher``: the launcher alone (``kernels.triton.sgd``/``adam``) on the
  batch a step hands it.

Adam runs twice: with its step counters on the params' device (capturable,
or under GradScaler), and on the host (torch's default for CUDA params).

Usage::

    python benchmarks/launcher_overhead.py [--lists gpt2-small many-small] [--rounds 200]
"""

from __future__ import annotations

import argparse
import importlib
import contextlib
import os
import statistics
import time

# the backend takes CPU tensors only when it believes it is interpreted; the
# stubs mean nothing is
os.environ.setdefault("TRITON_INTERPRET", "1")

import torch  # noqa: E402

import fused_optim  # noqa: E402
from fused_optim import _plan  # noqa: E402
from fused_optim.bench import LISTS, shape_list  # noqa: E402
from fused_optim.kernels import contract  # noqa: E402
from fused_optim.kernels import triton as tk  # noqa: E402
from fused_optim.kernels.triton import _launch  # noqa: E402

#: the jitted kernels, by (file in kernels/triton, name): the launchers call
#: them from their own module
_KERNELS = (("sgd", "_sgd_kernel"), ("adam", "_adam_kernel"), ("adam", "_adam_steps_kernel"))


def _module(name):
    return importlib.import_module(f"{tk.__name__}.{name}")


def kernels() -> dict:
    """The kernels the launchers call now, by ``_KERNELS`` entry."""
    return {k: getattr(_module(k[0]), k[1]) for k in _KERNELS}

CASES = {
    "sgd-momentum": ("SGD", dict(lr=0.01, momentum=0.9), None),
    "adamw device steps": ("AdamW", dict(lr=1e-3), True),
    "adamw host steps": ("AdamW", dict(lr=1e-3), False),
}


class _Stub:
    """Stands in for a jitted kernel: ``kernel[grid](*args, **kw)`` does nothing."""

    def __getitem__(self, grid):
        return _nothing


def _nothing(*args, **kwargs):
    return None


@contextlib.contextmanager
def stubbed(host_steps: bool | None):
    """Kernels stubbed; ``host_steps`` forces Adam's step placement (None: as is)."""
    saved = kernels()
    saved_steps = _launch._steps_on_device
    try:
        for k in saved:
            setattr(_module(k[0]), k[1], _Stub())
        if host_steps is not None:
            _launch._steps_on_device = (lambda batch: not host_steps)
        yield
    finally:
        for k, v in saved.items():
            setattr(_module(k[0]), k[1], v)
        _launch._steps_on_device = saved_steps


def _setup(shapes, name, kw):
    torch.manual_seed(0)
    params = [torch.randn(s).requires_grad_() for s in shapes]
    for p in params:
        p.grad = torch.randn_like(p)
    opt = getattr(fused_optim, name)(params, backend="triton", **kw)
    return params, opt


def _launcher_call(opt, params, name, kw):
    """The launcher call of one step, on that step's own batch."""
    plan = opt._plans[0]
    unit = next(u for u in plan.units if isinstance(u, _plan.KernelUnit))
    grads = [p.grad for p in params]
    state = opt.state
    if name == "SGD":
        cols = [params, grads, [state[p]["momentum_buffer"] for p in params]]
        steps = None
        hyper = dict(lr=kw["lr"], weight_decay=0.0, momentum=kw["momentum"], dampening=0.0,
                     nesterov=False, maximize=False)
        fn = contract.kernel(tk, "sgd")
    else:
        steps = [state[p]["step"] for p in params]
        cols = [params, grads, [state[p]["exp_avg"] for p in params],
                [state[p]["exp_avg_sq"] for p in params], steps]
        hyper = dict(lr=kw["lr"], beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.01,
                     decoupled_weight_decay=True, amsgrad=False, maximize=False)
        fn = contract.kernel(tk, "adam")
    batch, _ = _plan.stage(unit, cols, plan.where, steps, plan.row_flags, plan.grad_ptrs,
                             opt._plans.retain)
    return lambda: fn(batch, **hyper)


def run(lists, rounds: int) -> dict:
    """Median microseconds per call, by (list, case, what)."""
    timed = {}
    for list_name in lists:
        shapes = shape_list(list_name).shapes
        for case, (name, kw, device_steps) in CASES.items():
            params, opt = _setup(shapes, name, kw)
            host = None if device_steps is None else not device_steps
            with stubbed(host):
                for _ in range(3):
                    opt.step()
                timed[(list_name, case, "step")] = (host, opt.step)
                timed[(list_name, case, "launcher")] = (
                    host, _launcher_call(opt, params, name, kw))
    samples = {k: [] for k in timed}
    for _ in range(rounds):
        for k, (host, fn) in timed.items():
            with stubbed(host):
                t0 = time.perf_counter()
                fn()
                samples[k].append(time.perf_counter() - t0)
    return {k: statistics.median(v) * 1e6 for k, v in samples.items()}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--lists", nargs="+", choices=tuple(LISTS), metavar="NAME",
                    default=["gpt2-small", "many-small"])
    ap.add_argument("--rounds", type=int, default=200)
    args = ap.parse_args(argv)
    out = run(args.lists, args.rounds)
    print(f"microseconds per call, kernels stubbed, medians of {args.rounds} interleaved "
          f"rounds (fused_optim from {fused_optim.__file__})")
    for (lst, case, what), us in out.items():
        print(f"  {lst:12s} {case:20s} {what:9s} {us:9.1f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
