"""Step-for-step parity with torch.optim's for-loop (foreach=False).

One matrix: configuration x layout x dtype x backend. fp32/fp64 must match
within torch's own tolerances, params and every state tensor, at every step.
bf16/fp16 are held against a float64 shadow run on the same inputs and must
be no less accurate than torch's for-loop in the same dtype.
"""

import pytest
import torch

import optim_db
from matrix import (BACKENDS, CONFIG_PARAMS, FULL_PRECISION, LAYOUTS,
                    LOW_PRECISION_FLOOR, LOW_PRECISION_SLACK,
                    TOLERANCE, assert_state_close, build_kwargs, clone_params, grad_like,
                    config_id, make, skip_unless_runnable)

STEPS = 4


def _grads_for_step(params, step, gen, frozen=None):
    grads = []
    for i, p in enumerate(params):
        if frozen is not None and (i + step) % 4 == frozen:
            grads.append(None)  # grad None this step: the param is skipped
        else:
            grads.append(grad_like(p, gen, layout="same" if (i + step) % 3 else "contiguous"))
    return grads


def _assign(params, grads):
    for p, g in zip(params, grads):
        p.grad = None if g is None else g.clone()


#: layouts with many elements or rows: interpreted Triton (about 1 ms a
#: program) skips them; "large" takes Numba's parallel entry points
_SLOW_LAYOUTS = ("many_tiny", "large")


def _parity_cases():
    for dtype in FULL_PRECISION:
        for backend in BACKENDS:
            for layout in LAYOUTS:
                if backend == "triton" and layout in _SLOW_LAYOUTS:
                    continue
                for c in CONFIG_PARAMS:
                    yield pytest.param(*c.values, layout, backend, dtype,
                                       id=f"{c.id}-{layout}-{backend}-{dtype}")


@pytest.mark.parametrize("name,kwargs,layout,backend,dtype", list(_parity_cases()))
def test_matches_torch_for_loop(name, kwargs, layout, dtype, backend):
    skip_unless_runnable(backend)
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(1)
    ref_params = LAYOUTS[layout](dtype)
    params = clone_params(ref_params)
    ref = make(name, ref_params, kwargs)
    opt = make(name, params, kwargs, fused_backend=backend)
    for step in range(STEPS):
        grads = _grads_for_step(ref_params, step, gen, frozen=1)
        _assign(ref_params, grads)
        _assign(params, grads)
        ref.step()
        opt.step()
        assert_state_close(ref, opt, ref_params, params, **TOLERANCE[dtype])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name,kwargs,dtype", [
    *(pytest.param(*c.values, torch.bfloat16, id=f"{c.id}-bf16") for c in CONFIG_PARAMS),
    *(pytest.param(*c.values, torch.float16, id=f"{c.id}-fp16") for c in CONFIG_PARAMS)])
def test_low_precision_no_worse_than_torch(name, kwargs, dtype, backend):
    skip_unless_runnable(backend)
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(2)
    n = 3000  # fewer elements make the error ratio a coin toss for SGD
    init = [torch.randn(n, dtype=dtype), torch.randn(17, 9, dtype=dtype)]
    shadow_p = [p.double().requires_grad_() for p in init]
    torch_p = [p.clone().requires_grad_() for p in init]
    ours_p = [p.clone().requires_grad_() for p in init]
    shadow = make(name, shadow_p, kwargs)
    theirs = make(name, torch_p, kwargs)
    ours = make(name, ours_p, kwargs, fused_backend=backend)
    for _ in range(6):
        grads = [torch.randn(p.shape, generator=gen).to(dtype) for p in init]
        _assign(torch_p, grads)
        _assign(ours_p, grads)
        _assign(shadow_p, [g.double() for g in grads])  # the same inputs, exactly
        shadow.step()
        theirs.step()
        ours.step()

    def err(params, opt, key=None):
        total = 0.0
        for p, sp in zip(params, shadow_p):
            a = p if key is None else opt.state[p][key]
            b = sp if key is None else shadow.state[sp][key]
            total += float((a.detach().double() - b.detach()).pow(2).sum())
        return total ** 0.5 if total == total else float("inf")  # NaN: no accuracy

    keys = [None] + [k for k in shadow.state[shadow_p[0]] if k != "step"]
    for key in keys:
        e_ours, e_torch = err(ours_p, ours, key), err(torch_p, theirs, key)
        assert e_ours <= e_torch * LOW_PRECISION_SLACK + LOW_PRECISION_FLOOR, (
            key or "param", e_ours, e_torch)
    for p, q in zip(ours_p, torch_p):
        assert p.dtype == q.dtype
        assert torch.equal(ours.state[p].get("step", torch.tensor(0.)),
                           theirs.state[q].get("step", torch.tensor(0.)))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name,kwargs", CONFIG_PARAMS)
def test_mixed_dtypes_in_one_group(name, kwargs, backend):
    skip_unless_runnable(backend)
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(3)
    ref_params = [torch.randn(33, dtype=torch.float64).requires_grad_(),
                  torch.randn(5, 7).requires_grad_(),
                  torch.randn(3, dtype=torch.float64).requires_grad_(),
                  torch.randn(6).requires_grad_()]
    params = clone_params(ref_params)
    ref = make(name, ref_params, kwargs)
    opt = make(name, params, kwargs, fused_backend=backend)
    for step in range(3):
        grads = _grads_for_step(ref_params, step, gen)
        _assign(ref_params, grads)
        _assign(params, grads)
        ref.step()
        opt.step()
        assert_state_close(ref, opt, ref_params, params, **TOLERANCE[torch.float32])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")], ids=str)
@pytest.mark.parametrize("name,kwargs", CONFIG_PARAMS)
def test_nonfinite_grads_match(name, kwargs, bad, backend):
    skip_unless_runnable(backend)
    torch.manual_seed(0)
    ref_params = [torch.randn(10).requires_grad_(), torch.randn(4, 4).requires_grad_()]
    params = clone_params(ref_params)
    ref = make(name, ref_params, kwargs)
    opt = make(name, params, kwargs, fused_backend=backend)
    for step in range(3):
        grads = [torch.randn(p.shape) for p in ref_params]
        grads[0][step] = bad
        grads[1][1, step] = bad
        _assign(ref_params, grads)
        _assign(params, grads)
        ref.step()
        opt.step()
        assert_state_close(ref, opt, ref_params, params, **TOLERANCE[torch.float32])


COMPLEX_PARAMS = [p for p in CONFIG_PARAMS if optim_db.get(p.values[0]).supports_complex]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name,kwargs", COMPLEX_PARAMS)
def test_complex_params_as_real_views(name, kwargs, backend):
    skip_unless_runnable(backend)
    torch.manual_seed(0)
    ref_params = [torch.randn(6, 3, dtype=torch.complex64).requires_grad_(),
                  torch.randn(5).requires_grad_()]
    params = clone_params(ref_params)
    opt = make(name, params, kwargs, fused_backend=backend)
    if kwargs.get("fused"):
        # torch's fused=True refuses complex params; so must we, word for word
        torch_fused = optim_db.get(name).record.torch_cls(ref_params, **build_kwargs(kwargs))
        for ps, o in ((ref_params, torch_fused), (params, opt)):
            for p in ps:
                p.grad = torch.ones_like(p)
        with pytest.raises(RuntimeError) as theirs:
            torch_fused.step()
        with pytest.raises(RuntimeError) as ours:
            opt.step()
        assert str(ours.value) == str(theirs.value)
        return
    ref = make(name, ref_params, kwargs)
    for _ in range(3):
        grads = [torch.randn(p.shape, dtype=p.dtype) for p in ref_params]
        _assign(ref_params, grads)
        _assign(params, grads)
        ref.step()
        opt.step()
        assert_state_close(ref, opt, ref_params, params, **TOLERANCE[torch.float32])


#: (config, dtype) wherever the optimizer's OptimInfo claims bit-exactness
BIT_EXACT_PARAMS = [
    pytest.param(name, kwargs, dtype, id=f"{config_id(name, kwargs)}-{dtype}")
    for info in optim_db.with_capability("bit_exact")
    for name, kwargs in [(info.name, kw) for kw in info.configs_for("cpu")]
    for dtype in FULL_PRECISION if info.is_bit_exact(dtype)
]


_SPECIAL = [0.0, -0.0, 1.0, -1.0, float("inf"), -float("inf"), float("nan"), 1e-30, -3.5]


def _bits(t):
    """``t``'s bits as integers, NaNs (any payload) as one value."""
    ints = t.view(torch.int64 if t.dtype == torch.float64 else torch.int32).clone()
    ints[torch.isnan(t)] = -1
    return ints


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name,kwargs,dtype", BIT_EXACT_PARAMS)
def test_bit_exact_through_signed_zeros_and_nonfinite_values(name, kwargs, dtype, backend):
    """Every pair of (param, grad) drawn from 0, -0, ±1, ±inf, NaN, a tiny
    value: params and state bit for bit torch's, the zeros' signs included,
    on the step that creates a momentum buffer and the two after (the Numba
    SGD kernel takes a fresh buffer through the factors (1, -0.0))."""
    skip_unless_runnable(backend)
    vals = torch.tensor(_SPECIAL, dtype=dtype)
    ref_params = [vals.repeat(len(_SPECIAL)).requires_grad_()]
    grad = vals.repeat_interleave(len(_SPECIAL))
    params = clone_params(ref_params)
    ref = make(name, ref_params, kwargs)
    opt = make(name, params, kwargs, fused_backend=backend)
    for step in range(3):
        _assign(ref_params, [grad * (step + 1)])
        _assign(params, [grad * (step + 1)])
        ref.step()
        opt.step()
        a, b = ref_params[0], params[0]
        assert torch.equal(_bits(a.detach()), _bits(b.detach())), step
        for key, value in ref.state.get(a, {}).items():
            if torch.is_tensor(value) and value.is_floating_point():
                assert torch.equal(_bits(value), _bits(opt.state[b][key])), (step, key)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name,kwargs,dtype", BIT_EXACT_PARAMS)
def test_bit_exact_with_torch(name, kwargs, dtype, backend):
    """Where OptimInfo.bit_exact says so (SGD in fp32/fp64), we round exactly
    where torch's for-loop rounds (FMAs included): params and every state tensor."""
    skip_unless_runnable(backend)
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(4)
    ref_params = LAYOUTS["odd"](dtype) + LAYOUTS["strided"](dtype)
    params = clone_params(ref_params)
    ref = make(name, ref_params, kwargs)
    opt = make(name, params, kwargs, fused_backend=backend)
    for step in range(5):
        grads = _grads_for_step(ref_params, step, gen)
        _assign(ref_params, grads)
        _assign(params, grads)
        ref.step()
        opt.step()
        for a, b in zip(ref_params, params):
            assert torch.equal(a, b)
            rs, s = ref.state.get(a, {}), opt.state.get(b, {})
            assert set(rs) == set(s)
            for key in rs:
                assert torch.equal(rs[key], s[key]), key
