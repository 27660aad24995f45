"""How many Numba specializations every configuration needs, against a cap.

A Numba kernel compiles one specialization per distinct set of argument
types its launcher passes (``kernels/numba/_walk.py``, "What is compiled").
Only what changes which arrays are streamed or how they are stored may
change those types: the storage type, which state arrays exist, Kahan,
stochastic rounding; each then compiles twice, serial and parallel. A value
switch that leaks into the types (passed as None when off, say) multiplies
the count, and with it the first step's compile time and CI's.

The count here runs every ``tests/optim_db.py`` configuration in float32 and
bfloat16, bfloat16 with and without each precision option, and records the
argument types each launch would compile for, without compiling anything.
"""

import inspect

import numba
import pytest
import torch

from fused_optim.kernels.numba import _launch

import optim_db
from matrix import build_kwargs

#: Storage variants counted per (optimizer, state arrays present): float32,
#: and bfloat16 plain, with kahan_sum, with stochastic_round and with both;
#: float32 and bfloat16 with state_dtype=bfloat16 (bfloat16 state, rounded
#: stochastically: one more each).
VARIANTS = 7
#: The (optimizer, state arrays present) combinations the configurations
#: reach, per kernel: SGD with and without momentum, Adam/AdamW with and
#: without amsgrad (one kernel), Adagrad, RMSprop with momentum and centered
#: on or off (4), and one each for the kernels whose state is fixed.
STATE_COMBINATIONS_BY_KERNEL = {"sgd": 2, "adam": 2, "adagrad": 1, "rmsprop": 4,
                                "adadelta": 1, "rprop": 1, "nadam": 1, "radam": 1,
                                "adamax": 1, "asgd": 1}
STATE_COMBINATIONS = sum(STATE_COMBINATIONS_BY_KERNEL.values())
#: state_bits=8 (blockwise 8-bit state, Adam/AdamW's params of MIN_NUMEL
#: elements or more): float32 params, and bfloat16 plain, with kahan_sum,
#: with stochastic_round and with both (the 8-bit views, and the stream its
#: second moments round with, are types of their own).
QUANTIZED_VARIANTS = 5
#: the combinations that take it: Adam/AdamW with and without amsgrad
QUANTIZED_COMBINATIONS = 2
#: Each specialization compiles twice: the serial and the parallel entry point.
CAP = (STATE_COMBINATIONS * VARIANTS + QUANTIZED_COMBINATIONS * QUANTIZED_VARIANTS) * 2

_OPTIONS = ({}, dict(kahan_sum=True), dict(stochastic_round=True),
            dict(kahan_sum=True, stochastic_round=True), dict(state_dtype=torch.bfloat16))
_FP32_OPTIONS = ({}, dict(state_dtype=torch.bfloat16))
_8BIT = dict(state_bits=8)
_8BIT_OPTIONS = tuple({**o, **_8BIT} for o in _OPTIONS[:4])


def _options(info, dtype):
    """``(numel, options)`` of each run of ``info``'s configurations in ``dtype``."""
    runs = [(8, o) for o in (_OPTIONS if dtype == torch.bfloat16 else _FP32_OPTIONS)]
    if "state_bits" in inspect.signature(info.cls).parameters:
        from fused_optim.kernels.reference._blockwise import MIN_NUMEL
        runs += [(MIN_NUMEL, o) for o in (_8BIT_OPTIONS if dtype == torch.bfloat16
                                           else (_8BIT,))]
    return runs


def _needed(monkeypatch, mutate=None) -> set:
    """The (entry point, argument types) every configuration launches."""
    seen = set()

    def record(parallel_fn, serial_fn, parallel, args):
        if mutate is not None:
            args = mutate(args)
        types = tuple(numba.typeof(a) for a in args)
        seen.add((parallel_fn.py_func.__qualname__, types))
        seen.add((serial_fn.py_func.__qualname__, types))

    monkeypatch.setattr(_launch, "launch", record)
    for info in optim_db.OPTIM_DB:
        for config in info.configs_for("cpu"):
            for dtype in (torch.float32, torch.bfloat16):
                for numel, options in _options(info, dtype):
                    p = torch.randn(numel, dtype=dtype, requires_grad=True)
                    opt = info.cls([p], backend="numba", **build_kwargs(config), **options)
                    for _ in range(2):  # a fresh momentum buffer, then an old one
                        p.grad = torch.randn_like(p)
                        opt.step()
    return seen


def test_every_configuration_compiles_at_most_the_cap(monkeypatch):
    needed = _needed(monkeypatch)
    assert len(needed) <= CAP, sorted(k[0] for k in needed)
    # every kernel took part (a launcher that stopped launching would pass the cap)
    assert {k[0] for k in needed} == {
        f"{info.record.kernel}_{path}" for info in optim_db.OPTIM_DB
        for path in ("parallel", "serial")} | {"adam_blocks_parallel", "adam_blocks_serial"}


def test_a_value_switch_made_compile_time_goes_over_the_cap(monkeypatch):
    """The check can fail: weight decay passed as None where it is off, as
    before issue 24 (SGD's scalars: x[FIRST + 1] weight decay)."""
    def weight_decay_as_none(args):
        x = args[5]
        if len(x) == 6 and x[2] == 0:  # SGD's tuple
            x = (*x[:2], None, *x[3:])
        return (*args[:5], x, *args[6:])

    assert len(_needed(monkeypatch, weight_decay_as_none)) > CAP
