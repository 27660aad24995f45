"""state_bits=8: blockwise 8-bit Adam/AdamW moments.

What the option promises (``fused_optim/_precision.py``; the codes'
specification is ``kernels/reference/_blockwise.py``): the moments of
float32/bfloat16 params of at least MIN_NUMEL elements are stored as uint8
codes of the param's layout plus a float32 absmax per 256 elements, each
block encoded from the update's float32 values, rounded to the nearest
code; every backend stores the specification's codes and scales bit for
bit; smaller and other params keep torch's state; checkpoints save what is
stored, load back bit for bit, convert to and from torch.optim's, and an
8-bit checkpoint for a group without the option is refused with nothing
changed.

Numba specializations this file adds to CI's compile (tests/
test_specializations.py counts every configuration's): Adam's serial entry
point for float32 params with 8-bit state, without and with amsgrad, its
serial one for bfloat16 params, and its
parallel one for float32 params
(``test_parallel_path_equals_the_reference``): 4, one of them parallel.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

import fused_optim
from fused_optim import _reuse_rule
from fused_optim.kernels.reference import _blockwise as B
from fused_optim.kernels.reference import _precision as P
from matrix import BACKENDS, skip_unless_runnable

Q = dict(state_bits=8)
#: a quantized row with a partial last block, and a row under MIN_NUMEL
SHAPES = [(33, 130), (40,)]
NAMES = ("exp_avg", "exp_avg_sq", "max_exp_avg_sq")


def _params(shapes, dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=gen).to(dtype).requires_grad_() for s in shapes]


def _grads(shapes, steps, seed=1):
    # a wide dynamic range, as real gradients have
    gen = torch.Generator().manual_seed(seed)
    return [[torch.randn(s, generator=gen) * torch.randn(s, generator=gen).mul(2).exp()
             for s in shapes] for _ in range(steps)]


def _run(backend, shapes=SHAPES, dtype=torch.float32, steps=3, cls=fused_optim.AdamW,
         **kwargs):
    params = _params(shapes, dtype)
    torch.manual_seed(0)  # the stream's seed (exp_avg_sq rounds stochastically)
    opt = cls(params, lr=1e-2, backend=backend, **Q, **kwargs)
    for grads in _grads(shapes, steps):
        for p, g in zip(params, grads):
            p.grad = g.to(dtype)
        opt.step()
    return params, opt


def _assert_same_state(oa, pa, ob, pb):
    for a, b in zip(pa, pb):
        assert oa.state[a].keys() == ob.state[b].keys()
        for k, v in oa.state[a].items():
            assert torch.equal(v, ob.state[b][k]), k


# ------------------------------------------------------------------ the codes

def _nearest(x, amax, col):
    """Brute force: the value of the code nearest ``x`` (float64)."""
    table = torch.from_numpy(B.DECODE[B.code_of(col)]).double()
    return (table[None, :] * amax[:, None]).gather(
        1, ((table[None, :] * amax[:, None]) - x[:, None]).abs().argmin(1, keepdim=True))[:, 0]


@pytest.mark.parametrize("col", [0, 1])
def test_each_value_decodes_to_its_nearest_code(col):
    """The stored code is the nearest of the 256 to the value (scaled by its
    block's absmax), and the error is at most half a code step: 1/16 of the
    value above the subnormal codes."""
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(4 * B.BLOCK + 17, generator=gen) * torch.randn(
        4 * B.BLOCK + 17, generator=gen).mul(4).exp()
    if col:
        x = x * x
    x[5] = 0.0
    codes, amax = B.quantize(x, col)
    assert codes.dtype == torch.uint8 and amax.shape == (B.blocks(x.numel()),)
    assert torch.equal(amax, torch.stack([b.abs().max() for b in x.split(B.BLOCK)]))
    got = B.dequantize(codes, amax, col).double()
    per = amax.double().repeat_interleave(B.BLOCK)[:x.numel()]
    best = _nearest(x.double(), per, col)
    # nearest up to the float32 rounding of |x| * YMAX / absmax
    assert ((got - x.double()).abs() <= (best - x.double()).abs() + 1e-6 * per).all()
    smallest = per * float(B.DECODE[B.code_of(col)][1])
    assert ((got - x.double()).abs() <= B.HALF_STEP * x.double().abs() + smallest).all()
    assert got[5] == 0 and (got.sign() * x.sign() >= 0).all()


def test_block_extremes_and_non_finite_values():
    """A block's absmax decodes exactly; an all-zero block stays zero; a NaN
    makes its own block NaN and no other."""
    x = torch.zeros(3 * B.BLOCK)
    x[:B.BLOCK] = torch.linspace(-3, 2, B.BLOCK)
    x[2 * B.BLOCK + 7] = float("nan")
    codes, amax = B.quantize(x, 0)
    got = B.dequantize(codes, amax, 0)
    assert got[0] == -3.0 and amax[0] == 3.0
    assert (got[B.BLOCK:2 * B.BLOCK] == 0).all()
    assert got[2 * B.BLOCK:].isnan().all() and not got[:2 * B.BLOCK].isnan().any()


# ------------------------------------------------------------------ every backend

@pytest.mark.parametrize("backend", ["numba", "triton"])
@pytest.mark.parametrize("amsgrad", [False, True], ids=["plain", "amsgrad"])
def test_each_backend_stores_the_references_codes(backend, amsgrad):
    """Codes and scales equal the reference backend's bit for bit, params
    within float32 rounding (torch's own sqrt is not correctly rounded)."""
    skip_unless_runnable(backend)
    pa, oa = _run("torch", amsgrad=amsgrad)
    pb, ob = _run(backend, amsgrad=amsgrad)
    _assert_same_state(oa, pa, ob, pb)
    assert ob.state[pb[0]]["exp_avg"].dtype == torch.uint8
    assert ob.state[pb[1]]["exp_avg"].dtype == torch.float32  # under MIN_NUMEL
    for a, b in zip(pa, pb):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_the_state_is_the_updates_values_encoded(backend):
    """With betas (0, 0) the new moments are the grad and its square, exactly:
    the stored state is the specification's encoding of them, on every
    backend: ``exp_avg`` to nearest, ``exp_avg_sq`` stochastically with the
    stream's bits."""
    skip_unless_runnable(backend)
    params = _params(SHAPES)
    opt = fused_optim.AdamW(params, lr=1e-2, betas=(0.0, 0.0), backend=backend, **Q)
    for grads in _grads(SHAPES, 2):
        for p, g in zip(params, grads):
            p.grad = g
        opt.step()
    st = opt.state[params[0]]
    g = grads[0]
    sd = opt.state_dict()["stochastic_round"]
    # the second step's stream: one group, the quantized job first, one unit: salt 0
    k0, k1 = P.keys(sd["seed"], sd["counter"] - 1, 0)
    rbits = P.state_bits(k0, k1, torch.arange(g.numel()), 1)
    for col, (name, want, r) in enumerate((("exp_avg", g, None), ("exp_avg_sq", g * g, rbits))):
        codes, amax = B.quantize(want, col, rbits=r)
        assert torch.equal(st[name], codes) and torch.equal(st[name + "_absmax"], amax)
    assert not torch.equal(st["exp_avg_sq"], B.quantize(g * g, 1)[0])  # not to nearest


def test_numba_decodes_every_code_as_the_table():
    """The Numba kernels decode by arithmetic (``_blockwise._value``), not by
    the table: the same float32 for all 256 codes of both moments. (A
    decode 1 ulp off would not show in the codes, which it re-encodes to the
    same ones, and would hide in the params' tolerance.)"""
    from numba import njit

    from fused_optim.kernels.numba import _blockwise as NB

    @njit
    def table(col):
        out = np.empty(256, dtype=np.float32)
        for c in range(256):
            out[c] = NB._value(np.uint32(c), col)
        return out

    for col in (0, 1):
        want = B.DECODE[B.code_of(col)]
        assert np.array_equal(table(col).view(np.uint32), want.view(np.uint32)), col


@pytest.mark.parametrize("backend", ["numba", "triton"])
def test_every_code_and_non_finite_blocks_as_the_reference(backend):
    """Every code of both moments decoded and re-encoded by the kernel (a
    block holding codes 0..255), and the blocks the Numba encode takes apart
    from the rest: an infinity, a NaN, a minus infinity, an absmax so small that
    YMAX / absmax overflows float32, an all-zero block. Codes bit for bit;
    scales and params equal or both NaN."""
    skip_unless_runnable(backend)
    shape = (16, B.BLOCK)

    def run(b):
        params = [torch.linspace(-1, 1, shape[0] * shape[1]).view(shape).requires_grad_()]
        torch.manual_seed(0)
        opt = fused_optim.AdamW(params, lr=1e-2, backend=b, **Q)
        params[0].grad = torch.ones(shape)
        opt.step()
        st = opt.state[params[0]]
        with torch.no_grad():
            for name in ("exp_avg", "exp_avg_sq"):
                st[name][0] = torch.arange(256, dtype=torch.uint8)
                st[name][4:6] = 0
                st[name + "_absmax"][0] = 3.0
                st[name + "_absmax"][4:6] = 0.0
        g = torch.randn(shape, generator=torch.Generator().manual_seed(2))
        g[0] = 0.0
        g[1, 3], g[2, 9], g[3, 0] = float("inf"), float("nan"), -float("inf")
        g[4] = torch.linspace(-3e-38, 3e-38, B.BLOCK)  # exp_avg's absmax 3e-39
        g[5] = 0.0
        params[0].grad = g
        opt.step()
        return params, opt
    pa, oa = run("torch")
    pb, ob = run(backend)
    for name in ("exp_avg", "exp_avg_sq"):
        a, b = oa.state[pa[0]], ob.state[pb[0]]
        assert torch.equal(a[name], b[name]), name
        torch.testing.assert_close(a[name + "_absmax"], b[name + "_absmax"], rtol=0, atol=0,
                                   equal_nan=True)
    assert oa.state[pa[0]]["exp_avg_absmax"][1:4].isinf().tolist() == [True, False, True]
    torch.testing.assert_close(pa[0], pb[0], rtol=1e-6, atol=1e-6, equal_nan=True)


@pytest.mark.parametrize("backend", ["numba", "triton"])
def test_parallel_path_equals_the_reference(backend):
    """Above SERIAL_BELOW (Numba's threads split the elements; a block belongs
    to the chunk its first element lies in) and over many Triton programs."""
    skip_unless_runnable(backend)
    shapes = [(300, 131), (5001,)]
    pa, oa = _run("torch", shapes, steps=2)
    pb, ob = _run(backend, shapes, steps=2)
    _assert_same_state(oa, pa, ob, pb)


@pytest.mark.parametrize("backend", BACKENDS)
def test_bf16_params_and_channels_last(backend):
    """bfloat16 params, channels_last: the codes keep the param's layout
    (blocks run in memory order), and codes, scales and params are the
    reference's bit for bit. (Not with kahan_sum: AdamW's Kahan buffer on
    the reference backend differs from the kernels' already without
    state_bits, at 700e685, for this param.)"""
    skip_unless_runnable(backend)
    shapes = [(8, 16, 7, 7)]

    def run(b):
        params = [p.detach().to(memory_format=torch.channels_last).requires_grad_()
                  for p in _params(shapes, torch.bfloat16)]
        torch.manual_seed(0)
        opt = fused_optim.AdamW(params, lr=1e-2, backend=b, **Q)
        for grads in _grads(shapes, 2):
            params[0].grad = grads[0].to(torch.bfloat16).contiguous(
                memory_format=torch.channels_last)
            opt.step()
        return params, opt
    pa, oa = run("torch")
    pb, ob = run(backend)
    assert ob.state[pb[0]]["exp_avg"].stride() == pb[0].stride()
    _assert_same_state(oa, pa, ob, pb)
    assert torch.equal(pa[0], pb[0])


def test_kernels_do_the_math(monkeypatch):
    """Forced to Numba with torch's optimizer functions and foreach/fused ops
    raising, and with the reference quantizer raising too: the step runs and
    its codes equal the reference backend's."""
    pa, oa = _run("torch")

    def boom(*args, **kwargs):
        raise AssertionError("torch's code was called")
    import torch.optim.adam as torch_adam
    for n in ("adam", "_single_tensor_adam", "_multi_tensor_adam", "_fused_adam"):
        monkeypatch.setattr(torch_adam, n, boom)
    for n in dir(torch):
        if n.startswith(("_foreach_", "_fused_")):
            monkeypatch.setattr(torch, n, boom)
    monkeypatch.setattr(B, "quantize", boom)
    monkeypatch.setattr(B, "dequantize", boom)
    params = _params(SHAPES[:1])
    torch.manual_seed(0)
    opt = fused_optim.AdamW(params, lr=1e-2, backend="numba", **Q)  # state made as codes
    for gs in _grads(SHAPES, 3):
        params[0].grad = gs[0]
        opt.step()
    for k, v in oa.state[pa[0]].items():
        assert torch.equal(v, opt.state[params[0]][k]), k


# ------------------------------------------------------------------ what is stored

def test_state_bytes_and_what_keeps_torchs_state():
    """About 2 bytes per element plus a float32 per 256; small, float16 and
    float64 params keep torch's state; the option is checked."""
    params = [torch.randn(1000, 100, requires_grad=True), torch.randn(10, requires_grad=True),
              torch.randn(5000, dtype=torch.float64, requires_grad=True),
              torch.randn(5000, dtype=torch.float16, requires_grad=True)]
    opt = fused_optim.AdamW(params, backend="torch", **Q)
    for p in params:
        p.grad = torch.ones_like(p)
    opt.step()
    big = opt.state[params[0]]
    nbytes = sum(t.numel() * t.element_size() for k, t in big.items() if k != "step")
    n = params[0].numel()
    assert nbytes == 2 * n + 2 * 4 * B.blocks(n) and 2.03 < nbytes / n < 2.04
    for p in params[1:]:
        assert opt.state[p]["exp_avg"].dtype == p.dtype
        assert "exp_avg_absmax" not in opt.state[p]
    for bad in (4, 16, True, 8.5):
        with pytest.raises(ValueError, match="state_bits"):
            fused_optim.AdamW(params, state_bits=bad)
    with pytest.raises(ValueError, match="state_dtype"):
        fused_optim.AdamW(params, state_bits=8, state_dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="differentiable"):
        fused_optim.AdamW(params, state_bits=8, differentiable=True)


def test_patched_torch_keeps_torchs_state():
    """Opt-in by keyword only: a ``fused-optim run``-patched script keeps
    float32 state."""
    with fused_optim.patch_torch():
        p = torch.randn(5000, requires_grad=True)
        opt = torch.optim.AdamW([p])
        p.grad = torch.randn(5000)
        opt.step()
        assert opt.state[p]["exp_avg"].dtype == torch.float32
        assert "state_bits" not in opt.param_groups[0]


# ------------------------------------------------------------------ checkpoints

def _continue(params, opt, steps=2, seed=7):
    for grads in _grads([p.shape for p in params], steps, seed):
        for p, g in zip(params, grads):
            p.grad = g.to(p.dtype)
        opt.step()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_checkpoint_saves_codes_and_resumes_bit_for_bit(dtype):
    """state_dict holds the uint8 codes and float32 scales under the state
    names and ``<name>_absmax`` (a bfloat16 param's scales are not rounded
    by torch's loader, nor its codes made floats); loaded into a fresh
    optimizer, the run continues bit for bit."""
    params, opt = _run("numba", dtype=dtype)
    sd = copy.deepcopy(opt.state_dict())
    assert sd["param_groups"][0]["state_bits"] == 8
    assert sd["state"][0]["exp_avg"].dtype == torch.uint8
    assert sd["state"][0]["exp_avg_absmax"].dtype == torch.float32
    clones = [p.detach().clone().requires_grad_() for p in params]
    other = fused_optim.AdamW(clones, lr=1e-2, backend="numba", **Q)
    other.load_state_dict(sd)
    _assert_same_state(opt, params, other, clones)
    _continue(params, opt)
    _continue(clones, other)
    _assert_same_state(opt, params, other, clones)
    assert all(torch.equal(a, b) for a, b in zip(params, clones))


def test_state_dict_for_torch_loads_into_torch_optim():
    """Dequantized float32 moments, no scales, no option key: torch.optim
    loads it, and its next step lands where ours does, within the codes'
    resolution."""
    params, opt = _run("numba")
    sd = fused_optim.state_dict_for_torch(opt)
    assert "state_bits" not in sd["param_groups"][0]
    assert set(sd["state"][0]) == {"step", "exp_avg", "exp_avg_sq"}
    st = opt.state[params[0]]
    want = B.dequantize(st["exp_avg"], st["exp_avg_absmax"], 0)
    assert torch.equal(sd["state"][0]["exp_avg"], want)
    clones = [p.detach().clone().requires_grad_() for p in params]
    ref = torch.optim.AdamW(clones, lr=1e-2, foreach=False)
    ref.load_state_dict(copy.deepcopy(sd))
    _continue(params, opt, steps=1)
    _continue(clones, ref, steps=1)
    for a, b in zip(params, clones):
        torch.testing.assert_close(a, b, rtol=0, atol=2e-3)


def test_a_torch_checkpoint_is_quantized_on_load():
    """torch.optim's float32 moments load into an 8-bit optimizer as their
    encoding (the quantized rows), the small row as it is."""
    params = _params(SHAPES)
    ref = torch.optim.AdamW(params, lr=1e-2)
    _continue(params, ref)
    opt = fused_optim.AdamW(params, lr=1e-2, backend="numba", **Q)
    opt.load_state_dict(ref.state_dict())
    assert opt.param_groups[0]["state_bits"] == 8
    for col, name in enumerate(NAMES[:2]):
        codes, amax = B.quantize(ref.state[params[0]][name], col)
        assert torch.equal(opt.state[params[0]][name], codes)
        assert torch.equal(opt.state[params[0]][name + "_absmax"], amax)
    assert torch.equal(opt.state[params[1]]["exp_avg"], ref.state[params[1]]["exp_avg"])
    _continue(params, opt)  # and it steps


def test_an_8bit_checkpoint_is_refused_by_a_plain_optimizer():
    """A clear ValueError, and nothing changed (state, groups)."""
    _, opt = _run("torch")
    sd = opt.state_dict()
    params = _params(SHAPES)
    plain = fused_optim.AdamW(params, lr=1e-2, backend="torch")
    _continue(params, plain)
    before = copy.deepcopy(plain.state_dict())
    with pytest.raises(ValueError, match="state_bits=8"):
        plain.load_state_dict(sd)
    after = plain.state_dict()
    assert after["param_groups"] == before["param_groups"]
    for i, st in before["state"].items():
        assert all(torch.equal(v, after["state"][i][k]) for k, v in st.items())


# ------------------------------------------------------------------ GradScaler, compile

@pytest.mark.parametrize("backend", ["numba", "torch"])
def test_gradscaler_skip_changes_nothing(backend):
    params, opt = _run(backend)
    before = copy.deepcopy(opt.state_dict())
    for p in params:
        p.grad = torch.randn_like(p)
    opt.grad_scale = torch.tensor(1024.0)
    opt.found_inf = torch.tensor(1.0)
    opt.step()
    del opt.grad_scale, opt.found_inf
    after = opt.state_dict()
    for i, st in before["state"].items():
        assert all(torch.equal(v, after["state"][i][k]) for k, v in st.items())


def test_compiled_step_equals_the_eager_one():
    """Under torch.compile the step runs eagerly behind a graph break: the
    eager bits."""
    runs = []
    for compiled in (False, True):
        params = _params(SHAPES)
        torch.manual_seed(0)
        opt = fused_optim.AdamW(params, lr=1e-2, backend="numba", **Q)

        def step():
            opt.step()
        fn = torch.compile(step) if compiled else step
        for grads in _grads(SHAPES, 3):
            for p, g in zip(params, grads):
                p.grad = g
            fn()
        runs.append((params, opt))
    torch._dynamo.reset()
    (pa, oa), (pb, ob) = runs
    _assert_same_state(oa, pa, ob, pb)
    assert all(torch.equal(a, b) for a, b in zip(pa, pb))


# ------------------------------------------------------------------ the reuse rule

def f1_scales(backend):
    """F1 (shape) of the new state arrays: a param's scales replaced by a view
    of themselves one block shorter (same address). With the rule the group
    is re-validated and the row refused; a reused plan would write the last
    block's scale past the view (into the sentinel)."""
    params = _params(SHAPES[:1])
    opt = fused_optim.AdamW(params, lr=1e-2, backend=backend, **Q)
    _continue(params, opt, steps=1)
    st = opt.state[params[0]]
    nb = st["exp_avg_absmax"].numel()
    base = torch.full((nb + 1,), 7.0)
    base[:nb] = st["exp_avg_absmax"]
    st["exp_avg_absmax"] = base[:nb]  # a new address: re-validated, then cached
    _continue(params, opt, steps=1)
    st["exp_avg_absmax"] = base[:nb - 1]  # the same address, one block short
    sentinel = base[nb - 1:].clone()
    raised = None
    try:
        _continue(params, opt, steps=1)
    except (RuntimeError, ValueError) as err:
        raised = err
    return raised, torch.equal(base[nb - 1:], sentinel)


def test_scales_with_the_rule_are_refused_safely():
    raised, intact = f1_scales("numba")
    assert raised is not None and intact


def test_scales_without_the_rule_are_overwritten(monkeypatch):
    monkeypatch.setattr(_reuse_rule, "f1_metadata", lambda *args: True)
    raised, intact = f1_scales("numba")
    assert raised is None and not intact


def test_new_scales_tensor_is_used():
    """F2: scales replaced by a new tensor of the same shape are read and
    written there (its values: the old ones, so the run is unchanged)."""
    pa, oa = _run("numba")
    pb, ob = _run("numba", steps=2)
    st = ob.state[pb[0]]
    old = st["exp_avg_sq_absmax"]
    st["exp_avg_sq_absmax"] = old.clone()
    keep = old.clone()
    grads = _grads(SHAPES, 3)[2]
    for p, g in zip(pb, grads):
        p.grad = g
    ob.step()
    assert torch.equal(old, keep)  # the replaced tensor is no longer written
    _assert_same_state(oa, pa, ob, pb)


# ------------------------------------------------------------------ offline Triton compile

_COMPILE = r"""
import json, sys
sys.path.insert(0, sys.argv[1])
import torch
import _compile_matrix as m
from fused_optim.kernels.triton import _launch, adam

_PTRS = {"table_ptr": "*i64", "map_ptr": "*i32", "hyper_ptr": "*fp64",
         "scal_ptr": "*fp64", "grad_scale_ptr": "*fp32", "found_inf_ptr": "*fp32",
         "counter_ptr": "*i64"}
sw = dict(TAIL_ALIGNED=True, HAS_GRAD_SCALE=True, HAS_FOUND_INF=True, KAHAN=False, SR=False,
          S_ELEM=_launch._ELEM[torch.uint8], S_IS_BF16=False, SSR=False, S_Q=True,
          AMSGRAD=True)
const = m.launcher_consts(torch.float32, True, sw)
for cap in map(int, sys.argv[2].split(",")):
    ptx = m.compile_ptx(m.ast_source(adam._adam_kernel, dict(const), _PTRS, {}), cap,
                        _launch.num_warps(torch.float32, True, True))
    print(json.dumps(dict(arch=cap, **m.ptx_facts(ptx, "float32", cap))), flush=True)
"""


def test_triton_8bit_specialization_compiles_cleanly():
    """Adam with 8-bit state and amsgrad (float32 params, aligned with the tail
    hint), offline for sm_80 and sm_90: no local memory or spills, IEEE
    float math, 128-bit accesses of the float32 streams (param, grad)."""
    pytest.importorskip("triton")
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    here = Path(__file__).parent
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, "-c", _COMPILE, str(here), "80,90"],
                         capture_output=True, text=True, env=env, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    results = [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]
    assert len(results) == 2
    for r in results:
        assert not (r["stack_bytes"] or r["spill_store_bytes"] or r["spill_load_bytes"]
                    or r["local"]), r
        assert not r["inexact"], r
        assert r["vector_loads"] >= 2 and r["vector_stores"] >= 1, r


# ------------------------------------------------------------------ the example

def test_example_keeps_the_loss_in_8_bits():
    """examples/bf16_state.py's 8-bit run with --hidden 512 (both weight
    matrices 8-bit), shortened to 800 steps: about 2 bytes of state per
    param plus the scales, the same init and data, and a final loss within
    1% of float32 state's."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parent.parent / "examples" / "bf16_state.py"
    spec = importlib.util.spec_from_file_location("bf16_state", path)
    ex = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(ex)
    fp32 = ex.train("fp32 state", steps=800, backend="numba", tail=200, hidden=512)
    q8 = ex.train("8-bit state", steps=800, backend="numba", tail=200, hidden=512)
    assert fp32["losses"][0] == q8["losses"][0]
    assert 2.0 < q8["state_bytes"] < 2.3  # (the biases, 520 elements, keep float32 state)
    assert abs(q8["final"] / fp32["final"] - 1) < 0.01
    assert abs(q8["eval"] / fp32["eval"] - 1) < 0.01
    assert np.isfinite(q8["losses"]).all()
