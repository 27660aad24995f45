"""Kahan summation and stochastic rounding in the compiled kernels (issue 15),
bit for bit against the specification (``kernels/reference/_precision.py``).

The kernels layer: each backend's kernels driven directly (``_plan.pack``),
not through the optimizers (tests/test_precision.py is the options' layer:
what the optimizers promise with them on, on every backend).

Numba. Every Numba kernel is driven with the options off, on, and both, for
bfloat16 and float16, over rows of odd sizes (0 included) and rows large
enough for the parallel entry point, whose thread split then falls inside a
row. Each step must equal, bit for bit (params, compensation buffers, every
state, the step counters), the specification
(``kernels/reference/_precision.store_param``) applied to the float32
results the same kernel computes on float32 copies of the inputs
(:func:`expected`). That is exact where comparing with the reference
backend is not: Adam's, Adagrad's and RMSprop's plain float32 results
differ from torch's in about 0.5% of elements by 1 ulp (torch's CPU sqrt is
not correctly rounded), which the Kahan buffer keeps and stochastic
rounding reads. SGD's plain path is bit-exact with torch, so SGD is also
compared with the reference backend end to end.

Triton. The kernels run interpreted on CPU tensors (``TRITON_INTERPRET=1``)
and are compared bit for bit with the reference backend (whose
``_precision`` module is the specification) on identical copies of the
inputs: params, compensation buffers, every state and the steps. Rows of
odd sizes, one spanning several programs with a masked tail (``BLOCK`` is
lowered to keep the interpreter quick), and a row of edge values (inf, NaN,
signed zeros, the largest finite value, float16 subnormals). The offline
compile test lowers the new specializations for sm_90 and sm_80 (no GPU
needed) and checks that they keep the backend's code guarantees. The Triton
tests are named ``test_triton_*`` (tests/conftest.py leaves them out of
``make check``) and skip without triton.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numba
import pytest
import torch

from fused_optim import _plan
from fused_optim.kernels import contract, reference
from fused_optim.kernels import numba as nb
from fused_optim.kernels import reference as ref
from fused_optim.kernels.numba import _launch as nb_launch
from fused_optim.kernels.reference import _precision as P

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

try:  # the Triton half's kernels (its tests skip without triton)
    from fused_optim.kernels import columns as L
    from fused_optim.kernels import triton as tk
    from fused_optim.kernels.triton import _launch
except ImportError:
    L = tk = _launch = None

LOW = (torch.bfloat16, torch.float16)
KERNELS = ("sgd", "adam", "adagrad", "rmsprop")


@pytest.mark.parametrize("backend", ["numba", "triton"])
def test_launchers_keep_the_reference_signatures(backend):
    if backend == "triton" and tk is None:
        pytest.skip("triton is not installed")
    assert contract.problems(nb if backend == "numba" else tk, kernels=KERNELS) == []


# ================================================================== Numba

#: row sizes: empty rows, tiny ones, and a row wide enough that the
#: parallel kernel's split (total // 2, on 2 threads) falls inside it
BIG = [0, 5, 33001, 0, 1031, 7, 9999]
#: under SERIAL_BELOW: the serial entry point
SMALL = [3, 0, 1031, 130, 1]

#: optimizer -> (state roles, has steps, configs)
NUMBA_OPTIMIZERS = {
    "sgd": (("momentum_buffer", "-", "-"), False, [
        dict(lr=0.1, weight_decay=0.0, momentum=0.9, dampening=0.0, nesterov=False,
             maximize=False),
        dict(lr=0.05, weight_decay=0.01, momentum=0.9, dampening=0.1, nesterov=True,
             maximize=True),
        dict(lr=0.1, weight_decay=0.0, momentum=0.0, dampening=0.0, nesterov=False,
             maximize=False),
    ]),
    "adam": (("exp_avg", "exp_avg_sq", "max_exp_avg_sq"), True, [
        dict(lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.0,
             decoupled_weight_decay=False, amsgrad=False, maximize=False),
        dict(lr=1e-2, beta1=0.9, beta2=0.99, eps=1e-6, weight_decay=0.1,
             decoupled_weight_decay=True, amsgrad=True, maximize=False),
        dict(lr=1e-2, beta1=0.3, beta2=0.999, eps=1e-8, weight_decay=0.05,
             decoupled_weight_decay=False, amsgrad=False, maximize=True),
    ]),
    "adagrad": (("sum", "-", "-"), True, [
        dict(lr=0.1, lr_decay=0.0, eps=1e-10, weight_decay=0.0, maximize=False),
        dict(lr=0.05, lr_decay=0.01, eps=1e-6, weight_decay=0.1, maximize=True),
    ]),
    "rmsprop": (("square_avg", "momentum_buffer", "grad_avg"), True, [
        dict(lr=0.01, alpha=0.99, eps=1e-8, weight_decay=0.0, momentum=0.0,
             centered=False, maximize=False),
        dict(lr=0.01, alpha=0.9, eps=1e-6, weight_decay=0.1, momentum=0.9,
             centered=True, maximize=False),
        dict(lr=0.01, alpha=0.3, eps=1e-3, weight_decay=0.05, momentum=0.5,
             centered=True, maximize=True),
    ]),
}


def _numba_used(name, hyper):
    """Which of the three state roles the config uses."""
    if name == "sgd":
        return (hyper["momentum"] != 0, False, False)
    if name == "adam":
        return (True, True, hyper["amsgrad"])
    if name == "adagrad":
        return (True, False, False)
    return (True, hyper["momentum"] > 0, hyper["centered"])


def make_inputs(name, hyper, dtype, sizes, kahan, seed=0):
    """Fresh params, grads, states (one list per role, comps fourth), steps,
    row flags. Values are positive where the math needs them (second
    moments) and comps small, as a history would leave them."""
    gen = torch.Generator().manual_seed(seed)

    def rnd(n, scale=1.0, shift=0.0):
        return (torch.randn(n, generator=gen) * scale + shift).to(dtype)

    params = [rnd(n) for n in sizes]
    grads = [rnd(n, 0.1) for n in sizes]
    used = _numba_used(name, hyper)
    states = []
    for k, on in enumerate(used):
        if not on:
            states.append([None] * len(sizes))
        elif name in ("adam", "adagrad", "rmsprop") and k == 0 and name != "adam":
            states.append([rnd(n, 0.01).abs() + 0.02 for n in sizes])  # sum, square_avg
        elif name == "adam" and k in (1, 2):
            states.append([rnd(n, 0.001).abs() + 0.001 for n in sizes])
        elif name == "rmsprop" and k == 2:
            states.append([rnd(n, 0.01) for n in sizes])  # grad_avg (< sqrt(square_avg))
        else:
            states.append([rnd(n, 0.1) for n in sizes])
    states.append([rnd(n, 1e-3) for n in sizes] if kahan else [None] * len(sizes))
    steps = None
    if NUMBA_OPTIMIZERS[name][1]:
        steps = [torch.tensor(float(3 + i % 2), dtype=torch.float64 if i % 3 == 0
                              else torch.float32) for i in range(len(sizes))]
    flags = [i % 2 == 1 for i in range(len(sizes))] if name == "sgd" else None
    return params, grads, states, steps, flags


def clone(x):
    if isinstance(x, torch.Tensor):
        return x.clone()
    if isinstance(x, (list, tuple)):
        return type(x)(clone(v) for v in x)
    return x


def run(backend, name, hyper, inputs, steps=1, **options):
    """``steps`` steps of kernel ``name`` of ``backend`` on a copy of
    ``inputs``; returns the copy."""
    params, grads, states, st, flags = clone(inputs)
    assert params[0] is not inputs[0]
    module = nb if backend == "numba" else ref
    fn = contract.kernel(module, name)
    roles = NUMBA_OPTIMIZERS[name][0] + ("kahan_comp",)
    for _ in range(steps):
        for batch, finish in _plan.pack(params, grads, states, roles, steps=st,
                                        row_flags=flags, backend=backend):
            fn(batch, **hyper, **options)
            finish()
        flags = None if flags is None else [False] * len(flags)
    return params, grads, states, st, flags


def assert_same(a, b):
    """Bit for bit (NaN payloads included), every tensor."""
    pa, _, sa, ta, _ = a
    pb, _, sb, tb, _ = b
    pairs = list(zip(pa, pb))
    for la, lb in zip(sa, sb):
        pairs += [(x, y) for x, y in zip(la, lb) if x is not None]
    if ta is not None:
        pairs += list(zip(ta, tb))
    for k, (x, y) in enumerate(pairs):
        assert x.dtype == y.dtype and x.shape == y.shape
        if x.dtype in (torch.bfloat16, torch.float16):
            xi, yi = x.view(torch.int16), y.view(torch.int16)
        else:
            xi, yi = x, y
        if not torch.equal(xi, yi):
            bad = (xi != yi).nonzero()[:5].flatten().tolist()
            raise AssertionError(f"tensor {k} differs at {bad}: "
                                 f"{x.flatten()[bad].tolist()} vs {y.flatten()[bad].tolist()}")


def sr_option(seed=1234567890123, counter=7, salt=3):
    return (seed, torch.tensor(counter, dtype=torch.int64), salt)


#: one config per optimizer with most of its switches on (serial tests)
RICH = {"sgd": 1, "adam": 1, "adagrad": 1, "rmsprop": 1}
#: the configs benchmarks/precision_numba.py times (their compiles are shared)
BENCH = {"sgd": 0, "adam": 3}
NUMBA_OPTIMIZERS["adam"][2].append(dict(lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8,
                                        weight_decay=0.01, decoupled_weight_decay=True,
                                        amsgrad=False, maximize=False))
OPTIONS = {"off": (False, False), "kahan": (True, False), "sr": (False, True),
           "both": (True, True)}


def expected(name, hyper, inputs, kahan, sr):
    """One step as the specification stores it, from the Numba kernel's own
    float32 results: the plain kernel run on float32 copies of the
    bf16/fp16 inputs computes, element by element, the float32 ``new`` and
    states that the bf16/fp16 kernel computes (its loads are exact, its
    math is float32 either way); the params are then stored through
    ``reference._precision.store_param`` and the states rounded to nearest.
    """
    from fused_optim.kernels.reference import _precision as P

    dtype = inputs[0][0].dtype
    up = clone(inputs)
    up = ([p.float() for p in up[0]], [g.float() for g in up[1]],
          [[None if t is None else t.float() for t in lst] for lst in up[2]], up[3], up[4])
    saved = nb_launch.SERIAL_BELOW
    nb_launch.SERIAL_BELOW = 1 << 62  # the serial float32 kernel (the same math)
    try:
        p32, _, s32, steps, _ = run("numba", name, hyper, up)
    finally:
        nb_launch.SERIAL_BELOW = saved
    params, grads, states, _, flags = clone(inputs)
    stream = None
    if sr:
        seed, counter, salt = sr_option()
        stream = P.keys(seed, int(counter), salt)
    start = 0
    for i, p in enumerate(params):
        if p.numel():
            comp = states[3][i] if kahan else None
            P.store_param(p, p.float(), p32[i], comp, stream, start)
        start += p.numel()
    for k in range(3):
        for i, t in enumerate(states[k]):
            if t is not None:
                t.copy_(s32[k][i])
    return params, grads, states, steps, flags


def check(name, k, dtype, sizes, option, steps=2):
    """``steps`` steps of the Numba kernel with ``option``, each equal bit
    for bit to :func:`expected`; for SGD, whose plain path is bit-exact
    with the reference backend, to the reference's too."""
    hyper = NUMBA_OPTIMIZERS[name][2][k]
    kahan, sr = OPTIONS[option]
    opts = dict(kahan_sum=kahan, stochastic_round=sr_option() if sr else None)
    inputs = make_inputs(name, hyper, dtype, sizes, kahan=kahan)
    cur = inputs
    for _ in range(steps):
        out = run("numba", name, hyper, cur, **opts)
        assert_same(out, expected(name, hyper, cur, kahan, sr))
        cur = out
    assert not all(torch.equal(x, y) for x, y in zip(out[0], inputs[0]))  # it did step
    if name == "sgd":
        assert_same(cur, run("torch", name, hyper, inputs, steps=steps, **opts))


# each case is a compile of its own (10-60 s from a cold cache on the 2-core
# VM, CI's case): every optimizer with both options in bf16 (each store's
# Kahan and SR parts), each option alone and float16 SR through SGD (the store
# is shared code; test_precision.py runs each option on every optimizer)
SERIAL = ([(n, torch.bfloat16, "both") for n in NUMBA_OPTIMIZERS]
          + [("sgd", torch.bfloat16, o) for o in ("off", "kahan", "sr")]
          + [("sgd", torch.float16, "sr")])


@pytest.mark.parametrize("name,dtype,option", SERIAL,
                         ids=[f"{n}-{str(d)[6:]}-{o}" for n, d, o in SERIAL])
def test_numba_serial_matches_reference_bit_for_bit(name, dtype, option):
    """Params, comps, state and steps equal to the specification's, 2 steps."""
    assert sum(SMALL) < nb_launch.SERIAL_BELOW
    check(name, RICH[name], dtype, SMALL, option)


def test_numba_parallel_entry_point_keeps_the_global_index(monkeypatch):
    """The parallel entry point with both options, its two-thread split
    falling inside the 33001-element row: every step equals the
    specification's bit for bit (SR's element index is the global one
    whatever the split). Its compile from a cold cache took 133 s on the
    2-core VM before issue 24, when this ran as chunked serial launches."""
    total = sum(BIG)
    assert total >= nb_launch.SERIAL_BELOW
    monkeypatch.setattr(nb_launch.numba, "get_num_threads", lambda: 2)
    edges = nb_launch._bounds(total, 2)
    assert len(edges) == 3 and 5 < edges[1] < 5 + 33001  # mid-row
    launched = []
    real = nb_launch.launch

    def spy(parallel_fn, serial_fn, parallel, args):
        launched.append((parallel, tuple(int(e) for e in args[1])))
        real(parallel_fn, serial_fn, parallel, args)

    monkeypatch.setattr(nb_launch, "launch", spy)
    check("sgd", RICH["sgd"], torch.bfloat16, BIG, "both")
    # (the specification side runs the float32 serial kernel: parallel False)
    assert {b for parallel, b in launched if parallel} == {tuple(int(e) for e in edges)}


def test_numba_float32_ignores_the_options():
    """fp32 batches: the same bits with the options as without (and as the
    reference); a comp buffer handed in is left alone."""
    name, k = "sgd", RICH["sgd"]
    hyper = NUMBA_OPTIMIZERS[name][2][k]
    inputs = make_inputs(name, hyper, torch.float32, SMALL, kahan=True)
    off = run("numba", name, hyper, inputs)
    on = run("numba", name, hyper, inputs, kahan_sum=True, stochastic_round=sr_option())
    assert_same(on, off)
    assert_same(off, run("torch", name, hyper, inputs))
    for c, c0 in zip(on[2][3], inputs[2][3]):
        assert torch.equal(c, c0)


def test_numba_stochastic_rounding_is_reproducible_and_keyed_by_the_counter():
    name, k = "sgd", RICH["sgd"]
    hyper = NUMBA_OPTIMIZERS[name][2][k]
    inputs = make_inputs(name, hyper, torch.bfloat16, SMALL, kahan=False)
    a = run("numba", name, hyper, inputs, stochastic_round=sr_option(counter=7))
    b = run("numba", name, hyper, inputs, stochastic_round=sr_option(counter=7))
    c = run("numba", name, hyper, inputs, stochastic_round=sr_option(counter=8))
    assert_same(a, b)
    differ = sum(int((x.view(torch.int16) != y.view(torch.int16)).sum())
                 for x, y in zip(a[0], c[0]))
    assert differ > 0.05 * sum(SMALL)  # a fresh stream: many elements round the other way
    for x, y in zip(a[2][0], c[2][0]):  # momentum: round to nearest, whatever the stream
        assert torch.equal(x, y)


@pytest.mark.parametrize("name", ["adam", "sgd"])
def test_numba_found_inf_writes_nothing(name):
    hyper = NUMBA_OPTIMIZERS[name][2][RICH[name]]
    inputs = make_inputs(name, hyper, torch.bfloat16, SMALL, kahan=True)
    out = run("numba", name, hyper, inputs, kahan_sum=True, stochastic_round=sr_option(),
              found_inf=torch.tensor(1.0))
    assert_same(out, inputs)
    for c, c0 in zip(out[2][3], inputs[2][3]):
        assert torch.equal(c.view(torch.int16), c0.view(torch.int16))


# ------------------------------------------------ the rounding helpers alone

def test_numba_rounding_and_bits_match_the_specification_on_edge_values():
    """sr_bf16 / sr_f16 / bits against reference._precision over the float16
    subnormals, the overflow edge, signed zeros, inf, NaN and a spread of
    exponents, each with several random words; bits past index 2**32."""
    import numpy as np
    from fused_optim.kernels.numba import _precision as NP
    from fused_optim.kernels.reference import _precision as P

    gen = torch.Generator().manual_seed(3)
    special = torch.tensor([0.0, -0.0, 1.0, -1.0, 65504.0, 65519.0, 65520.0, 65535.0,
                            65536.0, 1e6, -7e4, 6.1e-5, 6.0e-5, 5.96e-8, 3e-8, 1e-9,
                            -2.9e-8, 3.4e38, -3.4e38, float("inf"), float("-inf"),
                            float("nan"), 1e-40, -1e-45])
    spread = torch.randn(4000, generator=gen) * torch.exp2(
        torch.randint(-30, 20, (4000,), generator=gen).float())
    t = torch.cat([special.repeat(16), spread]).float()
    r = torch.randint(0, 1 << 32, t.shape, generator=gen, dtype=torch.int64)

    @numba.njit
    def go(t, r, ob, oh):
        for i in range(t.shape[0]):
            ob[i] = NP.sr_bf16(t[i], np.uint32(r[i]))
            oh[i] = NP.sr_f16(t[i], np.uint32(r[i]))

    ob = np.empty(t.shape[0], np.uint16)
    oh = np.empty(t.shape[0], np.int16)
    go(t.numpy(), r.numpy(), ob, oh)
    want_b = P.round_bf16(t, r).to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
    want_h = P.round_f16(t, r).to(torch.float16).view(torch.int16).numpy()
    # NaN: torch's own float32 -> bfloat16 conversion writes 0x7FC0 one element
    # at a time but 0xFFFF in its vectorised loop; the kernels' store writes
    # 0x7FC0 (as their round-to-nearest store always has), so NaNs are
    # compared as NaNs
    nan = t.isnan().numpy()
    assert np.array_equal(ob[~nan], want_b[~nan])
    assert np.all((ob[nan] & 0x7F80 == 0x7F80) & (ob[nan] & 0x7F != 0))
    assert np.all(ob[nan] == 0x7FC0)
    assert np.array_equal(oh[~nan], want_h[~nan])
    assert np.all(np.isnan(oh[nan].view(np.float16)))

    @numba.njit
    def draw(k0, k1, idx, out):
        for i in range(idx.shape[0]):
            out[i] = NP.bits(k0, k1, idx[i])

    k0, k1 = P.keys(2**63 + 12345, 2**33 + 5, 77)
    idx = torch.cat([torch.arange(0, 300), torch.arange(2**32 - 100, 2**32 + 100),
                     torch.tensor([2**40 + 3, 2**62])])
    out = np.empty(idx.shape[0], np.uint32)
    draw(np.uint32(k0), np.uint32(k1), idx.numpy(), out)
    assert np.array_equal(out.astype(np.int64), P.bits(k0, k1, idx).numpy())


# ================================================================== Triton

HERE = Path(__file__).parent
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")

#: elements per program in these tests: the 300-element row takes three
#: programs, the last one masked
TEST_BLOCK = 128
SIZES = (1, 7, 37, 300)

#: each optimizer's state roles (then the Kahan buffer, always the fourth),
#: whether it keeps steps, and two configs (hyperparameters)
TRITON_OPTIMIZERS = {
    "sgd": (("momentum_buffer",), False, [
        dict(lr=0.01, weight_decay=0.01, momentum=0.9, dampening=0.1, nesterov=True,
             maximize=False),
        dict(lr=0.003, weight_decay=0.0, momentum=0.0, dampening=0.0, nesterov=False,
             maximize=True)]),
    "adam": (("exp_avg", "exp_avg_sq", "max_exp_avg_sq"), True, [
        dict(lr=0.01, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.01,
             decoupled_weight_decay=False, amsgrad=True, maximize=False),
        dict(lr=0.003, beta1=0.8, beta2=0.99, eps=1e-6, weight_decay=0.1,
             decoupled_weight_decay=True, amsgrad=False, maximize=True)]),
    "adagrad": (("sum",), True, [
        dict(lr=0.01, lr_decay=0.01, eps=1e-10, weight_decay=0.01, maximize=False),
        dict(lr=0.05, lr_decay=0.0, eps=1e-6, weight_decay=0.0, maximize=True)]),
    "rmsprop": (("square_avg", "momentum_buffer", "grad_avg"), True, [
        dict(lr=0.001, alpha=0.99, eps=1e-8, weight_decay=0.01, momentum=0.9,
             centered=True, maximize=False),
        dict(lr=0.003, alpha=0.9, eps=1e-6, weight_decay=0.0, momentum=0.0,
             centered=False, maximize=True)]),
}

#: the states each config uses (roles a config leaves off are absent)


def _triton_used(name, hyper):
    if name == "sgd":
        return (hyper["momentum"] != 0,)
    if name == "adam":
        return (True, True, hyper["amsgrad"])
    if name == "adagrad":
        return (True,)
    return (True, hyper["momentum"] > 0, hyper["centered"])


def _edge_row(dtype):
    big = torch.finfo(dtype).max
    tiny = 6e-8 if dtype == torch.float16 else 1e-38  # a subnormal float16
    vals = [float("inf"), float("-inf"), float("nan"), 0.0, -0.0, big, -big, tiny, -tiny,
            3 * tiny, 1e-5, -1e-5, 1.0, -1.0, 2049.0, -65.5]
    return torch.tensor(vals, dtype=torch.float64)


class Run:
    """One optimizer's tensors for a few kernel calls, from a seed."""

    def __init__(self, name, config, dtype, kahan, seed=0, edge=True):
        self.name = name
        roles, has_steps, configs = TRITON_OPTIMIZERS[name]
        self.hyper = configs[config]
        self.roles = roles
        self.dtype = dtype
        self.kahan = kahan
        gen = torch.Generator().manual_seed(seed)
        f64 = dict(dtype=torch.float64)

        def rand(s, scale=1.0, positive=False):
            x = torch.randn(s, generator=gen, **f64) * scale
            return (x.abs() if positive else x)

        params = [rand(s) for s in SIZES]
        if edge:
            params.append(_edge_row(dtype))
        if dtype == torch.float16:  # float16 subnormals take the ulp = 2**-24 branch
            params[1] = params[1] * 1e-5
        n = len(params)
        shapes = [p.shape for p in params]
        self.params = [p.to(DEVICE, dtype) for p in params]
        self.grads = [[rand(s, 0.1).to(DEVICE, dtype) for s in shapes] for _ in range(2)]
        used = _triton_used(name, self.hyper)
        self.states = []
        for k in range(3):
            if k < len(roles) and used[k]:
                # second moments and sums non-negative; max_exp_avg_sq above exp_avg_sq
                positive = (name, k) in {("adam", 1), ("adam", 2), ("adagrad", 0),
                                         ("rmsprop", 0)}
                scale = 2.0 if (name, k) == ("adam", 2) else 1.0
                st = [rand(s, scale * 0.01, positive) for s in shapes]
                if (name, k) == ("rmsprop", 0):
                    st = [x + 0.01 for x in st]  # above grad_avg**2
                self.states.append([x.to(DEVICE, dtype) for x in st])
            else:
                self.states.append([None] * n)
        self.comps = ([rand(s, 1e-3).to(DEVICE, dtype) for s in shapes] if kahan
                      else [None] * n)
        self.steps = ([torch.tensor(float(i % 3), dtype=torch.float32 if i % 2 else
                                    torch.float64, device=DEVICE) for i in range(n)]
                      if has_steps else None)

    def clone(self):
        other = object.__new__(Run)
        other.__dict__.update(self.__dict__)
        cl = lambda ts: [None if t is None else t.clone() for t in ts]  # noqa: E731
        other.params = cl(self.params)
        other.states = [cl(s) for s in self.states]
        other.comps = cl(self.comps)
        other.steps = None if self.steps is None else cl(self.steps)
        return other

    def step(self, backend, i, host_steps=False, **options):
        """The ``i``-th grads through backend module ``backend``'s kernel
        (``host_steps``: Triton's rows flagged as torch's CPU steps of CUDA
        params, which the host advances)."""
        roles = tuple(self.roles) + ("",) * (3 - len(self.roles)) + ("kahan_comp",)
        n = len(self.params)
        flags = [False] * n if self.name == "sgd" else None
        packs = _plan.pack(self.params, self.grads[i], self.states + [self.comps], roles,
                           steps=self.steps, row_flags=flags,
                           backend="triton" if backend is tk else "torch")
        for batch, finish in packs:
            if host_steps and backend is tk:
                batch.table[:, L.FLAGS] |= L.FLAG_STEP_HOST
            contract.kernel(backend, self.name)(batch, **self.hyper, **options)
            finish()

    def tensors(self):
        out = list(self.params) + [c for c in self.comps if c is not None]
        for s in self.states:
            out += [t for t in s if t is not None]
        return out + list(self.steps or [])


def _bits(t):
    return t.view(torch.int16) if t.element_size() == 2 else t.view(torch.int32 if
                                                                    t.element_size() == 4
                                                                    else torch.int64)


def _assert_bit_equal(actual, expected, what):
    assert len(actual) == len(expected)
    for i, (a, e) in enumerate(zip(actual, expected)):
        assert a.dtype == e.dtype and a.shape == e.shape
        nan = a.isnan() & e.isnan()  # (a NaN's payload is the conversion's business)
        same = (_bits(a) == _bits(e)) | nan
        assert bool(same.all()), (f"{what}: tensor {i}: {int((~same).sum())} of "
                                  f"{a.numel()} elements differ, e.g. "
                                  f"{a[~same][:4].tolist()} vs {e[~same][:4].tolist()}")


@pytest.fixture
def _small_blocks(monkeypatch):
    monkeypatch.setattr(_launch, "BLOCK", TEST_BLOCK)


def _triton(test):
    """A test of the Triton kernels (as their own file ran them): skipped
    without triton, TEST_BLOCK elements a program, and the edge row's inf
    and NaN params' numpy warnings from the interpreter's float math and
    float16 casts silenced (the values are what is compared)."""
    for mark in (pytest.mark.skipif(tk is None, reason="triton is not installed"),
                 pytest.mark.usefixtures("_small_blocks"),
                 pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning"),
                 pytest.mark.filterwarnings("ignore:overflow encountered in cast:RuntimeWarning")):
        test = mark(test)
    return test


_TORCH_SQRT = torch.Tensor.sqrt


def _ieee_sqrt(self):
    """Correctly rounded float32 square root (sqrt.rn, as the compiled kernels).

    torch's CPU float32 ``sqrt`` in this build is not: about 20% of random
    inputs come out one ulp off ``numpy.sqrt`` (the correctly rounded
    value). A low-precision param store hides that in the stored bits, but
    Kahan's compensation buffer keeps the float32 detail of the update, so
    the reference is run with the IEEE square root (a float32's float64
    square root rounded once more to float32 is correctly rounded).
    """
    if self.dtype == torch.float32:
        return _TORCH_SQRT(self.double()).float()
    return _TORCH_SQRT(self)


@pytest.fixture
def ieee_reference(monkeypatch):
    monkeypatch.setattr(torch.Tensor, "sqrt", _ieee_sqrt)


@_triton
def test_triton_torch_sqrt_is_what_the_fixture_replaces():
    """(Documents why ``ieee_reference`` exists; passes either way.)"""
    x = torch.rand(4096, generator=torch.Generator().manual_seed(0))
    assert torch.equal(_ieee_sqrt(x), torch.from_numpy(__import__("numpy").sqrt(x.numpy())))


def _options(kahan, sr, counter, seed=0x123456789ABCDEF1, salt=5):
    return dict(kahan_sum=kahan,
                stochastic_round=(seed, counter, salt) if sr else None)


def _both(name, config, dtype, kahan, sr, steps=2, host_steps=False, **run_kw):
    """Reference and Triton runs of ``steps`` calls from identical inputs."""
    base = Run(name, config, dtype, kahan, **run_kw)
    sides = []
    for backend in (reference, tk):
        run = base.clone()
        counter = torch.tensor(41, dtype=torch.int64, device=DEVICE)
        for i in range(steps):
            run.step(backend, i, host_steps=host_steps, **_options(kahan, sr, counter))
            counter += 1  # as the optimizer advances it once per step
        sides.append(run)
    return sides


_CASES = ([(name, 0, kahan, sr) for name in KERNELS for kahan in (False, True)
           for sr in (False, True)]
          + [(name, 1, True, True) for name in KERNELS])


@_triton
@pytest.mark.parametrize("dtype", LOW, ids=str)
@pytest.mark.parametrize("name,config,kahan,sr", _CASES,
                         ids=[f"{n}-cfg{c}-{'kahan' if k else 'nokahan'}-{'sr' if s else 'rn'}"
                              for n, c, k, s in _CASES])
def test_triton_matches_reference_bit_for_bit(name, config, kahan, sr, dtype, ieee_reference):
    """Params, compensation buffers, every state and the steps: the same bits
    as the reference backend's (the specification) after two steps. (The
    reference runs with an IEEE float32 square root: see ``_ieee_sqrt``.)"""
    ref, tri = _both(name, config, dtype, kahan, sr)
    _assert_bit_equal(tri.tensors(), ref.tensors(), f"{name} {dtype}")


@_triton
@pytest.mark.parametrize("name", ["adam", "adagrad"])
def test_triton_host_side_steps(name, ieee_reference):
    """Steps the host advances (its per-row scalars uploaded after the
    hyperparameters, and the seed and salt): the same bits as the reference."""
    ref, tri = _both(name, 0, torch.bfloat16, True, True, host_steps=True)
    _assert_bit_equal(tri.tensors(), ref.tensors(), name)


@_triton
def test_triton_options_change_the_stored_bits():
    """Not vacuous: each option, on its own, changes some stored param bits
    (and the compensation buffers hold what the store lost)."""
    runs = {}
    for kahan, sr in ((False, False), (True, False), (False, True)):
        runs[kahan, sr] = _both("adam", 0, torch.bfloat16, kahan, sr, steps=1, edge=False)[1]
    plain = runs[False, False].params
    for key in ((True, False), (False, True)):
        assert any(not torch.equal(_bits(a), _bits(b))
                   for a, b in zip(runs[key].params, plain)), key
    assert any(bool((c != 0).any()) for c in runs[True, False].comps)


def _sr_params(counter, seed=7, salt=5, dtype=torch.bfloat16, name="sgd"):
    run = Run(name, 1, dtype, kahan=False, edge=False)
    run.step(tk, 0, **_options(False, True, torch.tensor(counter, dtype=torch.int64,
                                                         device=DEVICE), seed, salt))
    return run.params


@_triton
@pytest.mark.parametrize("dtype", LOW, ids=str)
def test_triton_stochastic_rounding_is_reproducible_and_keyed(dtype):
    """The same seed, counter and salt give the same bits; changing any of them
    (the counter's high word included) changes some."""
    first = _sr_params(3, dtype=dtype)
    _assert_bit_equal(_sr_params(3, dtype=dtype), first, "rerun")
    for kw in (dict(counter=4), dict(counter=3 + (1 << 32)), dict(counter=3, seed=8),
               dict(counter=3, seed=7 + (1 << 32)), dict(counter=3, salt=6)):
        other = _sr_params(dtype=dtype, **kw)
        assert any(not torch.equal(_bits(a), _bits(b)) for a, b in zip(other, first)), kw


@_triton
@pytest.mark.parametrize("name", KERNELS)
def test_triton_found_inf_writes_nothing(name):
    """A skipped step (found_inf nonzero) leaves params, compensation buffers,
    states and steps as they were, with both options on."""
    run = Run(name, 0, torch.float16, kahan=True)
    before = [t.clone() for t in run.tensors()]
    counter = torch.tensor(9, dtype=torch.int64, device=DEVICE)
    run.step(tk, 0, found_inf=torch.ones(1, device=DEVICE), **_options(True, True, counter))
    _assert_bit_equal(run.tensors(), before, name)
    assert int(counter) == 9


@_triton
@pytest.mark.parametrize("name", ["adam", "rmsprop"])
def test_triton_float32_ignores_the_options(name):
    """float32 batches are stored as without the options, and launch exactly
    as without them (no argument or constexpr differs)."""
    base = Run(name, 0, torch.float32, kahan=False)
    plain, opts = base.clone(), base.clone()
    counter = torch.tensor(1, dtype=torch.int64, device=DEVICE)
    for i in range(2):
        plain.step(tk, i)
        opts.step(tk, i, **_options(True, True, counter))
    _assert_bit_equal(opts.tensors(), plain.tensors(), name)
    ((batch, finish),) = _plan.pack(base.params, base.grads[0], base.states + [base.comps],
                                    tuple(TRITON_OPTIMIZERS[name][0]) + ("",) * (3 - len(
                                 TRITON_OPTIMIZERS[name][0])) + ("kahan_comp",),
                             steps=base.steps, backend="triton")
    for kahan, sr in ((True, True), (True, False), (False, True)):
        assert _launch._precision_args(batch, kahan, (1, counter, 2) if sr else None) \
            is _launch._OFF


@_triton
def test_triton_options_off_launch_as_before():
    """Both options off (or SR off and Kahan off) pass the constexprs
    KAHAN=SR=False, a None counter and no extra hyperparameter: one
    specialization, whatever the dtype."""
    for dtype in LOW:
        run = Run("sgd", 0, dtype, kahan=False, edge=False)
        ((batch, finish),) = _plan.pack(run.params, run.grads[0], run.states + [run.comps],
                                        ("momentum_buffer", "", "", "kahan_comp"),
                                        row_flags=[False] * len(run.params), backend="triton")
        assert _launch._precision_args(batch, False, None) is _launch._OFF
        on = _launch._precision_args(batch, True, (-1, torch.tensor(0), 2**40 + 3))
        assert (on.kahan, on.sr) == (True, True)
        assert on.slots == [float(2**32 - 1), float(2**32 - 1), 3.0]


@_triton
def test_triton_counter_must_live_with_the_params():
    run = Run("sgd", 0, torch.bfloat16, kahan=False, edge=False)
    ((batch, finish),) = _plan.pack(run.params, run.grads[0], run.states + [run.comps],
                                    ("momentum_buffer", "", "", "kahan_comp"),
                                    row_flags=[False] * len(run.params), backend="triton")
    with pytest.raises(ValueError, match="int64"):
        _launch._precision_args(batch, False, (1, torch.tensor(0.0), 2))
    if DEVICE.type == "cpu":
        with pytest.raises(ValueError, match="device"):
            _launch._precision_args(batch, False, (1, torch.tensor(0, device="meta"), 2))


@_triton
@pytest.mark.parametrize("dtype", LOW, ids=str)
def test_triton_rounding_matches_the_specification_across_binades(dtype):
    """SGD with lr 1 stores ``t = p - g`` (one float32 rounding, as torch's):
    param magnitudes over every binade of the type (float16 subnormals and
    values next to the largest finite one included, both signs) and grads of
    a fraction of them, so that ``t`` falls between two neighbours. Each
    element's stored bits are ``_precision``'s rounding of ``t`` with its own
    ``bits(k0, k1, START + i)`` (the second row: START 1000)."""
    gen = torch.Generator().manual_seed(3)
    n = 1000
    lo_exp, hi_exp = (-26, 16) if dtype == torch.float16 else (-130, 127)
    mags = torch.exp2(torch.rand(n, generator=gen, dtype=torch.float64)
                      * (hi_exp - lo_exp) + lo_exp)
    signs = torch.where(torch.rand(n, generator=gen) < 0.5, -1.0, 1.0).double()
    signs[:2] = 1.0  # the first two: t past the largest finite value (-> inf or max)
    big = torch.finfo(dtype).max
    mags[:4] = torch.tensor([big, big, big * 0.999, 1.0], dtype=torch.float64)
    p = (mags * signs).to(dtype)
    g = (p.double() * (torch.rand(n, generator=gen, dtype=torch.float64) - 0.7) * 0.01).to(dtype)
    g[:2] = -torch.tensor([big, big], dtype=torch.float64).to(dtype) * 2.0 ** -12
    params, grads = [p.clone(), p[:37].clone()], [g.clone(), g[:37].clone()]
    counter = torch.tensor(77, dtype=torch.int64, device=DEVICE)
    for batch, finish in _plan.pack(params, grads, [[None] * 2] * 4,
                                    ("momentum_buffer", "", "", "kahan_comp"),
                                    row_flags=[False] * 2, backend="triton"):
        contract.kernel(tk, "sgd")(batch, lr=1.0, weight_decay=0.0, momentum=0.0, dampening=0.0,
                                   nesterov=False, maximize=False, stochastic_round=(99, counter, 4))
        finish()
    k0, k1 = P.keys(99, 77, 4)
    rnd = P.round_bf16 if dtype == torch.bfloat16 else P.round_f16
    wants = []
    for q, h, start in ((p, g, 0), (p[:37], g[:37], n)):
        t = q.float() - h.float()
        r = P.bits(k0, k1, torch.arange(start, start + q.numel(), dtype=torch.int64))
        wants.append(rnd(t, r).to(dtype))
    _assert_bit_equal(params, wants, "spec")
    nearest = (p.float() - g.float()).to(dtype)
    up_or_down = _bits(params[0]) != _bits(nearest)
    assert 0 < int(up_or_down.sum()) < n  # stochastic: some away from nearest


# ----------------------------------------------------------- offline compile

_COMPILE = r"""
import json, re, sys, importlib
sys.path.insert(0, sys.argv[1])
import torch, triton, triton.language as tl
from triton.backends.compiler import GPUTarget
import _compile_matrix as m
from fused_optim.kernels.triton import _launch

_PTRS = {"table_ptr": "*i64", "map_ptr": "*i32", "hyper_ptr": "*fp64",
         "scal_ptr": "*fp64", "grad_scale_ptr": "*fp32", "found_inf_ptr": "*fp32",
         "counter_ptr": "*i64"}
#: every switch on, both options on: the largest code of each kernel (the
#: flags that change only the arithmetic are runtime values, in every build)
_ON = {"sgd": dict(USE_MOMENTUM=True), "adam": dict(AMSGRAD=True), "adagrad": {},
       "rmsprop": dict(CENTERED=True, USE_MOMENTUM=True)}


def facts(kernel, dname, cap):
    fn = getattr(importlib.import_module(f"fused_optim.kernels.triton.{kernel}"),
                 f"_{kernel}_kernel")
    dtype = m.DTYPES[dname]
    const = dict(ELEM=_launch._ELEM[dtype], IS_BF16=dtype == torch.bfloat16,
                 S_ELEM=_launch._ELEM[dtype], S_IS_BF16=dtype == torch.bfloat16,
                 COMPUTE=tl.float32, IS_F64=False, BLOCK=_launch.BLOCK, ALIGNED=True,
                 TAIL_ALIGNED=True, VEC=8, HAS_GRAD_SCALE=True, HAS_FOUND_INF=True,
                 KAHAN=True, SR=True, **_ON[kernel])
    sig = {}
    for n, param in zip(fn.arg_names, fn.params):
        sig[n] = _PTRS.get(n, "constexpr")
        # (a constexpr with a default is one the launchers no longer pass)
        assert n in _PTRS or n in const or param.has_default, n
    attrs = {(fn.arg_names.index(n),): [["tt.divisibility", 16]]
             for n in sig if sig[n].startswith("*")}
    src = m.ASTSource(fn, sig, const, attrs)
    c = triton.compile(src, target=GPUTarget("cuda", cap, 32),
                       options={"num_warps": _launch.num_warps(dtype, True, True),
                                "enable_fp_fusion": False})
    ptx = c.asm["ptx"]
    body = ptx.split(".section")[0]  # the code, not the debug sections
    out = {"kernel": kernel, "dtype": dname, "arch": cap,
           "vector_loads": len(re.findall(r"ld\.global[.\w]*\.v4\.b32", ptx)),
           "vector_stores": len(re.findall(r"st\.global[.\w]*\.v4\.b32", ptx)),
           "inexact": sorted(k for k, pat in m._INEXACT.items() if re.search(pat, ptx)),
           "local": len(re.findall(r"\.local\b", ptx)),
           "ieee_div": len(re.findall(r"\bdiv\.rn\.f32\b", ptx)),
           "ieee_sqrt": len(re.findall(r"\bsqrt\.rn\.f32\b", ptx)),
           "int_mul": len(re.findall(r"\bmul\.lo\.[su]32\b", body)),
           "instructions": len(re.findall(r"^\s+[a-z@][^;]*;", body, re.M))}
    out.update(m._ptxas_facts(ptx, cap))
    return out


jobs = [(k, d, cap) for k in ("sgd", "adam", "adagrad", "rmsprop")
        for d in ("bfloat16", "float16") for cap in map(int, sys.argv[2].split(","))]
for job in jobs:
    print(json.dumps(facts(*job)), flush=True)
"""

#: streams each kernel reads and writes with every switch on (params, grads
#: and states), before the compensation buffer (one more of each)
_STREAMS = {"sgd": (3, 2), "adam": (5, 4), "adagrad": (3, 2), "rmsprop": (5, 4)}


@pytest.fixture(scope="module")
def compiled():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, "-c", _COMPILE, str(HERE), "90,80"],
                         capture_output=True, text=True, env=env, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    return [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]


@_triton
def test_triton_option_specializations_compile_cleanly(compiled):
    """Each kernel, bfloat16 and float16, Kahan and SR on (every other switch
    on, aligned with the tail hint), for sm_90 and sm_80: no local memory or
    spills, IEEE division and square root with no .approx/.ftz, 128-bit loads
    and stores of every stream (the compensation buffer's included) on both
    the whole-block and the masked path."""
    assert len(compiled) == 4 * 2 * 2
    bad = {}
    for r in compiled:
        reads, writes = _STREAMS[r["kernel"]]
        reads, writes = reads + 1, writes + 1  # the compensation buffer
        why = []
        if r["stack_bytes"] or r["spill_store_bytes"] or r["spill_load_bytes"] or r["local"]:
            why.append("local memory")
        if r["inexact"]:
            why.append(f"non-IEEE {r['inexact']}")
        if not r["ieee_div"]:
            why.append("no div.rn")
        if r["kernel"] != "sgd" and not r["ieee_sqrt"]:
            why.append("no sqrt.rn")
        if r["vector_loads"] < 2 * reads or r["vector_stores"] < 2 * writes:
            why.append(f"{r['vector_loads']} v4 loads, {r['vector_stores']} v4 stores")
        # the stream keys and two mixes per element: 4 + 10 + (hi * GOLDEN)
        if r["int_mul"] < 4:
            why.append("no integer mixing")
        if why:
            bad[f"{r['kernel']} {r['dtype']} sm_{r['arch']}"] = why
    assert not bad, bad
