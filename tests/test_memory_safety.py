"""Kernels never touch memory outside a tensor's own elements, and the
bf16/fp16 conversions of the Numba backend are exact."""

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import optim_db
from matrix import (BACKENDS, TOLERANCE, assert_state_close, clone_params,
                    skip_unless_runnable)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=str)
@pytest.mark.parametrize("info", optim_db.OPTIM_DB, ids=lambda i: i.name)
def test_views_with_gaps_leave_the_gaps_alone(info, dtype, backend):
    skip_unless_runnable(backend)
    storage = torch.randn(4000, dtype=dtype)
    sentinel = storage.clone()
    views = [storage[10:110],                          # guard bands either side
             storage[200:600].view(20, 20)[:, ::3],      # every third column
             storage[700:1300].view(20, 30).t(),         # dense, transposed
             storage[1500:1501].view(()),                # 0-dim in the middle
             storage[2000:2400:2]]                       # stride 2
    params = [v.detach().requires_grad_() for v in views]
    gstore = torch.randn(4000, dtype=dtype)
    grads = [gstore[3000:3100], gstore[:400].view(20, 20)[:, ::3].clone(),
             gstore[1000:1600].view(30, 20), gstore[5:6].view(()), gstore[2000:2400:2]]
    opt = info.cls(params, backend=backend, **dict(info.full_state_example, lr=0.1))
    touched = torch.zeros(4000, dtype=torch.bool)
    for v in views:
        idx = torch.arange(4000).as_strided(v.shape, v.stride(), v.storage_offset())
        touched[idx.reshape(-1)] = True
    gsent = gstore.clone()
    for _ in range(2):
        for p, g in zip(params, grads):
            p.grad = g
        opt.step()
    assert torch.equal(storage[~touched], sentinel[~touched])
    assert not torch.equal(storage[touched], sentinel[touched])
    assert torch.equal(gstore, gsent), "a gradient was written"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("info", optim_db.OPTIM_DB, ids=lambda i: i.name)
def test_shared_storage_view_params_match_torch(info, backend):
    skip_unless_runnable(backend)
    base_ref = torch.randn(30)
    base = base_ref.clone()
    ref_params = [base_ref[:10].detach().requires_grad_(), base_ref[15:30].detach().requires_grad_()]
    params = [base[:10].detach().requires_grad_(), base[15:30].detach().requires_grad_()]
    kw = dict(info.full_state_example, lr=0.1)
    ref = info.oracle(ref_params, **kw)
    opt = info.cls(params, backend=backend, **kw)
    for s in range(3):
        for a, b in zip(ref_params, params):
            g = torch.randn(a.shape)
            a.grad, b.grad = g, g.clone()
        ref.step()
        opt.step()
    torch.testing.assert_close(base, base_ref)


@pytest.mark.parametrize("f16", ["soft", "hard"])
def test_half_and_bfloat16_conversions_are_exact(f16):
    """Every half and bfloat16 value decodes as torch's, and ~700k float32
    values (random bits, half subnormals and overflows, edges) encode as
    torch's. Both float16 forms: the kernels take the instruction ("hard")
    where the CPU has it, else the integer ("soft") one."""
    numba = pytest.importorskip("numba")
    from fused_optim.kernels.numba import _memory as mem

    if f16 == "hard" and not mem.F16_HARDWARE:
        pytest.skip("this CPU has no float16 conversion instructions")
    assert mem.f16_to_f32 is (mem._f16_to_f32_hard if mem.F16_HARDWARE
                              else mem._f16_to_f32_soft)
    to32 = getattr(mem, f"_f16_to_f32_{f16}")
    to16 = getattr(mem, f"_f32_to_f16_{f16}")

    @numba.njit
    def decode(a, out, bf):
        for i in range(a.size):
            out[i] = mem.bf16_to_f32(a[i]) if bf else to32(a[i])

    @numba.njit
    def encode16(x, out):
        for i in range(x.size):
            out[i] = to16(x[i])

    @numba.njit
    def encodebf(x, out):
        for i in range(x.size):
            out[i] = mem.f32_to_bf16(x[i])

    every = np.arange(1 << 16, dtype=np.uint32).astype(np.uint16)
    for bf, tdt in ((True, torch.bfloat16), (False, torch.float16)):
        out = np.empty(every.size, np.float32)
        decode(every.view(np.int16) if not bf else every, out, bf)
        ref = torch.from_numpy(every.view(np.int16).copy()).view(tdt).float().numpy()
        finite = ~np.isnan(ref)
        assert np.array_equal(out.view(np.uint32)[finite], ref.view(np.uint32)[finite])
        assert np.isnan(out[~finite]).all()

    rng = np.random.default_rng(0)
    x = np.concatenate([
        rng.integers(0, 2 ** 32, 400_000, dtype=np.uint64).astype(np.uint32).view(np.float32),
        (rng.standard_normal(100_000) * 1e-5).astype(np.float32),   # half subnormals
        (rng.standard_normal(100_000) * 7e4).astype(np.float32),    # half overflow
        np.array([65504, 65519.99, 65520, 2 ** -24, 2 ** -25, 3 * 2 ** -26, 0.0, -0.0,
                  np.inf, -np.inf], np.float32)])
    nan = np.isnan(x)
    o16 = np.empty(x.size, np.int16)
    encode16(x, o16)
    r16 = torch.from_numpy(x).half().view(torch.int16).numpy()
    assert np.array_equal(o16[~nan], r16[~nan])
    assert np.isnan(torch.from_numpy(o16[nan]).view(torch.float16).float().numpy()).all()
    obf = np.empty(x.size, np.uint16)
    encodebf(x, obf)
    rbf = torch.from_numpy(x).bfloat16().view(torch.int16).numpy().view(np.uint16)
    assert np.array_equal(obf[~nan], rbf[~nan])
    assert np.isnan(torch.from_numpy(obf[nan].view(np.int16)).view(torch.bfloat16).float().numpy()).all()


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_row_constant_division_is_a_division(dtype):
    """Adam's ``sqrt(v) / bias_correction2_sqrt`` without a divider (Markstein
    step) must equal the IEEE quotient bit for bit, inf and NaN included, and
    for the divisors an edited ``beta2`` reaches (0, inf, NaN)."""
    numba = pytest.importorskip("numba")
    from fused_optim.kernels.numba.adam import _div_by_row_constant

    @numba.njit(error_model="numpy")
    def mismatches(xs, ds):
        one = np.ones_like(ds[0:1])[0]  # as _adam_scalars computes the inverse
        bad = 0
        for d in ds:
            inv = one / d
            for x in xs:
                q = _div_by_row_constant(x, d, inv)
                ref = x / d
                if q != ref and not (q != q and ref != ref):
                    bad += 1
        return bad

    rng = np.random.default_rng(0)
    lo = -23 if dtype is np.float32 else -160  # smallest sqrt of a positive float
    xs = (rng.uniform(1, 2, 200_000) * 2.0 ** rng.uniform(lo, 20, 200_000)).astype(dtype)
    xs = np.concatenate([xs, np.array([0.0, -0.0, np.inf, np.nan], dtype)])
    steps = np.arange(1, 5001)
    ds = np.concatenate([np.sqrt(1 - 0.999 ** steps[::25]), np.sqrt(1 - 0.9 ** steps[:50]),
                         rng.uniform(0.01, 1.0, 50), [1.0, 0.0, np.inf, np.nan]]).astype(dtype)
    assert mismatches(xs, ds) == 0


_shapes = st.lists(st.lists(st.integers(0, 9), min_size=0, max_size=3), min_size=1, max_size=12)
@settings(max_examples=30, deadline=None)
@given(shapes=_shapes,
       name_kwargs=st.sampled_from(optim_db.OPTIM_DB).flatmap(
           lambda info: st.tuples(st.just(info.name), info.kwargs_strategy())),
       seed=st.integers(0, 2 ** 16))
def test_generated_configurations_match_torch(shapes, name_kwargs, seed):
    name, kwargs = name_kwargs
    torch.manual_seed(seed)
    ref_params = [torch.randn(s).requires_grad_() for s in shapes]
    params = clone_params(ref_params)
    info = optim_db.get(name)
    ref = info.oracle(ref_params, **kwargs)
    opt = info.cls(params, backend="numba", **kwargs)
    for _ in range(3):
        for a, b in zip(ref_params, params):
            g = torch.randn(a.shape)
            a.grad, b.grad = g, g.clone()
        ref.step()
        opt.step()
    assert_state_close(ref, opt, ref_params, params, **TOLERANCE[torch.float32])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("victim", ["param freed", "state shrunk", "grad freed"])
@pytest.mark.parametrize("info", optim_db.OPTIM_DB, ids=lambda i: i.name)
def test_freed_or_shrunk_storage_is_refused_not_dereferenced(info, victim, backend):
    # torch's own for-loop step segfaults on a param whose storage was freed
    skip_unless_runnable(backend)
    params = [torch.randn(1000).requires_grad_(), torch.randn(10).requires_grad_()]
    opt = info.cls(params, backend=backend, **info.full_state_example)
    for _ in range(2):  # the second step runs from a cached plan
        for p in params:
            p.grad = torch.randn(p.shape)
        opt.step()
    for p in params:
        p.grad = torch.randn(p.shape)
    if victim == "param freed":
        params[0].untyped_storage().resize_(0)
    elif victim == "state shrunk":
        opt.state[params[0]][info.state_keys[0]].untyped_storage().resize_(8)
    else:
        params[0].grad.untyped_storage().resize_(0)
    other = params[1].detach().clone()
    with pytest.raises(RuntimeError, match="outside its storage"):
        opt.step()
    assert torch.equal(params[1].detach(), other)
