"""Adagrad against torch.optim.Adagrad (for-loop, foreach=False), step for step.

Temporary: to be folded into the shared test database (tests/optim_db.py).
It reuses the shared helpers of tests/matrix.py with Adagrad's own
configurations.
"""

import copy
import importlib
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import fused_optim
from matrix import (BACKENDS, FULL_PRECISION, LAYOUTS, LOW_PRECISION, LOW_PRECISION_FLOOR,
                    LOW_PRECISION_SLACK, TOLERANCE, assert_state_close, build_kwargs,
                    clone_params, config_id, make, skip_unless_runnable)

HERE = Path(__file__).parent

CONFIGS = [
    dict(),
    dict(lr=0.1),
    dict(lr=0.1, lr_decay=0.05),
    dict(lr=0.05, initial_accumulator_value=0.5, eps=1e-3),
    dict(lr=0.1, weight_decay=0.1),
    dict(lr=0.1, maximize=True, weight_decay=0.05, lr_decay=0.01),
    dict(lr=lambda: torch.tensor(0.05)),
    dict(lr=lambda: torch.tensor(0.05), lr_decay=0.3),  # torch divides in float32
    dict(lr=lambda: torch.tensor(0.05, dtype=torch.float64), lr_decay=0.3),
    dict(lr=0.05, fused=True, weight_decay=0.01),
]
CONFIG_PARAMS = [pytest.param("Adagrad", kw, id=config_id("Adagrad", kw)) for kw in CONFIGS]
STEPS = 4


def _grads_for_step(params, step, gen, frozen=None):
    out = []
    for i, p in enumerate(params):
        if frozen is not None and (i + step) % 4 == frozen:
            out.append(None)
        else:
            g = torch.randn(p.shape, dtype=p.dtype, generator=gen)
            if (i + step) % 3 and p.dim() > 0:
                g = torch.empty_like(p).copy_(g)
            out.append(g)
    return out


def _assign(params, grads):
    for p, g in zip(params, grads):
        p.grad = None if g is None else g.clone()


def _run_both(ref, opt, ref_params, params, grads_per_step, tol):
    for grads in grads_per_step:
        _assign(ref_params, grads)
        _assign(params, grads)
        ref.step()
        opt.step()
        assert_state_close(ref, opt, ref_params, params, **tol)


# ------------------------------------------------------------------ parity


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", FULL_PRECISION, ids=str)
@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("name,kwargs", CONFIG_PARAMS)
def test_matches_torch_for_loop(name, kwargs, layout, dtype, backend):
    skip_unless_runnable(backend)
    if backend == "triton" and layout in ("many_tiny", "large"):
        pytest.skip("interpreted Triton: kept to the small layouts for CI time")
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(1)
    ref_params = LAYOUTS[layout](dtype)
    params = clone_params(ref_params)
    ref = make(name, ref_params, kwargs)
    opt = make(name, params, kwargs, fused_backend=backend)
    _run_both(ref, opt, ref_params, params,
              [_grads_for_step(ref_params, s, gen, frozen=1) for s in range(STEPS)],
              TOLERANCE[dtype])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", LOW_PRECISION, ids=str)
@pytest.mark.parametrize("name,kwargs", CONFIG_PARAMS)
def test_low_precision_no_worse_than_torch(name, kwargs, dtype, backend):
    skip_unless_runnable(backend)
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(2)
    init = [torch.randn(3000, dtype=dtype), torch.randn(17, 9, dtype=dtype)]
    shadow_p = [p.double().requires_grad_() for p in init]
    torch_p = [p.clone().requires_grad_() for p in init]
    ours_p = [p.clone().requires_grad_() for p in init]
    shadow, theirs = make(name, shadow_p, kwargs), make(name, torch_p, kwargs)
    ours = make(name, ours_p, kwargs, fused_backend=backend)
    for _ in range(6):
        grads = [torch.randn(p.shape, generator=gen).to(dtype) for p in init]
        _assign(torch_p, grads)
        _assign(ours_p, grads)
        _assign(shadow_p, [g.double() for g in grads])
        shadow.step()
        theirs.step()
        ours.step()

    def err(params, opt, key=None):
        total = 0.0
        for p, sp in zip(params, shadow_p):
            a = p if key is None else opt.state[p][key]
            b = sp if key is None else shadow.state[sp][key]
            total += float((a.detach().double() - b.detach()).pow(2).sum())
        return total ** 0.5 if total == total else float("inf")

    for key in (None, "sum"):
        e_ours, e_torch = err(ours_p, ours, key), err(torch_p, theirs, key)
        assert e_ours <= e_torch * LOW_PRECISION_SLACK + LOW_PRECISION_FLOOR, (
            key or "param", e_ours, e_torch)
    for p, q in zip(ours_p, torch_p):
        assert ours.state[p]["sum"].dtype == theirs.state[q]["sum"].dtype == dtype
        assert torch.equal(ours.state[p]["step"], theirs.state[q]["step"])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name,kwargs", CONFIG_PARAMS[:6])
def test_mixed_dtypes_and_nonfinite_grads(name, kwargs, backend):
    skip_unless_runnable(backend)
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(3)
    ref_params = [torch.randn(33, dtype=torch.float64).requires_grad_(),
                  torch.randn(5, 7).requires_grad_(),
                  torch.randn(6).requires_grad_()]
    params = clone_params(ref_params)
    ref, opt = make(name, ref_params, kwargs), make(name, params, kwargs, fused_backend=backend)
    steps = []
    for step, bad in enumerate([float("nan"), float("inf"), -float("inf")]):
        grads = _grads_for_step(ref_params, step, gen)
        grads[1][1, step] = bad
        steps.append(grads)
    _run_both(ref, opt, ref_params, params, steps, TOLERANCE[torch.float32])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name,kwargs", CONFIG_PARAMS[:6])
def test_complex_params_as_real_views(name, kwargs, backend):
    skip_unless_runnable(backend)
    torch.manual_seed(0)
    ref_params = [torch.randn(6, 3, dtype=torch.complex64).requires_grad_(),
                  torch.randn(5).requires_grad_()]
    params = clone_params(ref_params)
    kwargs = dict(kwargs, initial_accumulator_value=0.25)
    ref, opt = make(name, ref_params, kwargs), make(name, params, kwargs, fused_backend=backend)
    _run_both(ref, opt, ref_params, params,
              [[torch.randn(p.shape, dtype=p.dtype) for p in ref_params] for _ in range(3)],
              TOLERANCE[torch.float32])


@pytest.mark.parametrize("backend", BACKENDS)
def test_fused_complex_raises_like_torch(backend):
    skip_unless_runnable(backend)
    outs = []
    for cls, kw in ((torch.optim.Adagrad, {}), (fused_optim.Adagrad, dict(backend=backend))):
        p = torch.randn(3, dtype=torch.complex64).requires_grad_()
        p.grad = torch.ones_like(p)
        with pytest.raises(RuntimeError) as e:
            cls([p], fused=True, **kw).step()
        outs.append(str(e.value))
    assert outs[0] == outs[1]


@pytest.mark.parametrize("backend", BACKENDS)
def test_functional_matches_torchs(backend):
    skip_unless_runnable(backend)
    from torch.optim.adagrad import adagrad as torch_adagrad

    torch.manual_seed(0)
    ps = [torch.randn(10), torch.randn(3, 4, dtype=torch.float64)]
    sides = []
    for fn, extra in ((torch_adagrad, dict(foreach=False)), (fused_optim.adagrad,
                                                             dict(backend=backend))):
        params = [p.clone() for p in ps]
        sums = [torch.full_like(p, 0.1) for p in ps]
        steps = [torch.tensor(0.0) for _ in ps]
        for k in range(3):
            grads = [torch.full_like(p, 0.5 * k - 0.3) + p for p in ps]
            fn(params, grads, sums, steps, lr=0.1, weight_decay=0.01, lr_decay=0.1,
               eps=1e-10, maximize=False, **extra)
        sides.append((params, sums, steps))
    for a, b in zip(sides[0], sides[1]):
        for x, y in zip(a, b):
            torch.testing.assert_close(y, x, rtol=1.3e-6, atol=1e-6)


# ------------------------------------------------------------ sparse grads


def _sparse(p, idx, vals):
    return torch.sparse_coo_tensor(torch.tensor([idx]), torch.tensor(vals, dtype=p.dtype),
                                   p.shape)


@pytest.mark.parametrize("backend", BACKENDS)
def test_sparse_grad_rows_run_torchs_loop(backend):
    skip_unless_runnable(backend)
    torch.manual_seed(0)
    base = torch.randn(20)
    ref_params = [base[4:10].clone().requires_grad_(), torch.randn(7).requires_grad_()]
    # an offset view: torch 2.13's dense.add_(sparse) writes at twice the offset
    storage = torch.randn(20)
    params = [storage[4:10].detach().requires_grad_(),
              ref_params[1].detach().clone().requires_grad_()]
    params[0].data.copy_(ref_params[0].detach())
    outside = storage.clone()
    kw = dict(lr=0.1, lr_decay=0.1, initial_accumulator_value=0.1)
    ref = torch.optim.Adagrad(ref_params, foreach=False, **kw)
    opt = fused_optim.Adagrad(params, backend=backend, **kw)
    for step in range(3):
        for ps in (ref_params, params):
            ps[0].grad = _sparse(ps[0], [0, 2, 2, 5], [1.0, -2.0, 0.5, step + 1.0])
            ps[1].grad = torch.full((7,), 0.1 * step - 0.2)
        ref.step()
        opt.step()
        assert_state_close(ref, opt, ref_params, params, **TOLERANCE[torch.float32])
    # nothing outside the view was written
    assert torch.equal(storage[:4], outside[:4]) and torch.equal(storage[10:], outside[10:])


@pytest.mark.parametrize("backend", BACKENDS)
def test_sparse_grad_with_weight_decay_raises_like_torch_and_changes_nothing(backend):
    skip_unless_runnable(backend)
    outs = []
    for cls, kw in ((torch.optim.Adagrad, {}), (fused_optim.Adagrad, dict(backend=backend))):
        dense = torch.randn(5).requires_grad_()
        p = torch.randn(4).requires_grad_()
        opt = cls([dense, p], weight_decay=0.1, **kw)
        dense.grad = torch.ones(5)
        p.grad = _sparse(p, [0, 2], [1.0, -2.0])
        before = dense.detach().clone()
        with pytest.raises(RuntimeError) as e:
            opt.step()
        outs.append(str(e.value))
        if cls is fused_optim.Adagrad:  # torch's loop has stepped the row before
            assert torch.equal(dense.detach(), before)
            assert float(opt.state[dense]["step"]) == 0
    assert outs[0] == outs[1]


@pytest.mark.parametrize("backend", BACKENDS)
def test_fused_sparse_grad_raises_like_torch(backend):
    skip_unless_runnable(backend)
    outs = []
    for cls, kw in ((torch.optim.Adagrad, {}), (fused_optim.Adagrad, dict(backend=backend))):
        p = torch.randn(4).requires_grad_()
        opt = cls([p], fused=True, **kw)
        p.grad = _sparse(p, [0, 2], [1.0, -2.0])
        before = p.detach().clone()
        outs.append(_outcome(opt.step))
        assert torch.equal(p.detach(), before)
    assert outs[0][0] is RuntimeError and outs[0] == outs[1]


# --------------------------------------------------------------- errors


def _p(*shape):
    return torch.randn(*shape or (3,)).requires_grad_()


BAD_CONSTRUCTION = {
    "negative lr": dict(lr=-0.1),
    "negative lr_decay": dict(lr_decay=-0.1),
    "negative weight_decay": dict(weight_decay=-1e-4),
    "negative initial_accumulator_value": dict(initial_accumulator_value=-1.0),
    "negative eps": dict(eps=-1e-10),
    "2-element Tensor lr": dict(lr=torch.tensor([0.1, 0.2])),
    "fused and differentiable": dict(fused=True, differentiable=True),
    "fused and foreach": dict(fused=True, foreach=True),
}


def _outcome(fn):
    try:
        fn()
    except Exception as err:  # noqa: BLE001 - the type is what we compare
        return type(err), str(err)
    return None, None


@pytest.mark.parametrize("case", list(BAD_CONSTRUCTION))
def test_bad_construction_raises_like_torch(case):
    kw = BAD_CONSTRUCTION[case]
    theirs = _outcome(lambda: torch.optim.Adagrad([_p()], **kw))
    ours = _outcome(lambda: fused_optim.Adagrad([_p()], **kw))
    assert theirs[0] is not None
    assert ours == theirs


def test_constructor_signature_defaults_and_state_are_torchs():
    import inspect

    ours = inspect.signature(fused_optim.Adagrad.__init__).parameters
    theirs = inspect.signature(torch.optim.Adagrad.__init__).parameters
    assert list(ours)[:-1] == list(theirs) and list(ours)[-1] == "backend"
    for name, par in theirs.items():
        assert ours[name].default == par.default and ours[name].kind == par.kind, name
    p, q = _p(4), _p(4)
    a = torch.optim.Adagrad([p], initial_accumulator_value=0.3)
    b = fused_optim.Adagrad([q], initial_accumulator_value=0.3)
    # torch makes the state at construction
    assert set(a.state[p]) == set(b.state[q]) == {"step", "sum"}
    assert torch.equal(a.state[p]["sum"], b.state[q]["sum"])
    assert a.state[p]["step"].dtype == b.state[q]["step"].dtype
    assert a.param_groups[0].keys() == b.param_groups[0].keys()


@pytest.mark.parametrize("backend", BACKENDS)
def test_zero_denominator_raises_like_torch_and_changes_nothing(backend):
    skip_unless_runnable(backend)
    outs = []
    for cls, kw in ((torch.optim.Adagrad, {}), (fused_optim.Adagrad, dict(backend=backend))):
        p = _p(4)
        opt = cls([p], lr=0.1, **kw)
        p.grad = torch.ones(4)
        opt.step()
        opt.param_groups[0]["lr_decay"] = -1.0  # 1 + (2 - 1) * -1 == 0
        before = p.detach().clone()
        outs.append(_outcome(opt.step))
        if cls is fused_optim.Adagrad:
            assert torch.equal(p.detach(), before)
            assert float(opt.state[p]["step"]) == 1
    assert outs[0][0] is ZeroDivisionError and outs[0] == outs[1]


# ----------------------------------------------------------- state_dict


def _params():
    torch.manual_seed(0)
    return [torch.randn(6, 4).requires_grad_(), torch.randn(5).requires_grad_(),
            torch.randn(3, dtype=torch.float64).requires_grad_()]


def _train(opt, params, steps, seed):
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        for p in params:
            p.grad = torch.randn(p.shape, generator=gen, dtype=p.dtype)
        opt.step()


def _roundtrip(sd):
    buf = io.BytesIO()
    torch.save(sd, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


@pytest.mark.parametrize("direction", ["torch->fused", "fused->torch"])
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name,kwargs", [CONFIG_PARAMS[2], CONFIG_PARAMS[5]])
def test_checkpoint_moves_both_ways_and_training_continues(name, kwargs, backend, direction):
    skip_unless_runnable(backend)
    src_fused = direction == "fused->torch"
    a_params = _params()
    src = make(name, a_params, kwargs, fused_backend=backend if src_fused else None)
    _train(src, a_params, 3, 1)
    sd = _roundtrip(src.state_dict())
    b_params = clone_params(a_params)
    dst = make(name, b_params, kwargs, fused_backend=None if src_fused else backend)
    dst.load_state_dict(sd)
    c_params = _params()
    ref = make(name, c_params, kwargs)
    _train(ref, c_params, 3, 1)
    _train(dst, b_params, 3, 2)
    _train(ref, c_params, 3, 2)
    assert_state_close(ref, dst, c_params, b_params, **TOLERANCE[torch.float32])


@pytest.mark.parametrize("backend", BACKENDS)
def test_state_dict_has_torchs_structure(backend):
    skip_unless_runnable(backend)
    ref_params = _params()
    params = clone_params(ref_params)
    ref = torch.optim.Adagrad(ref_params, lr_decay=0.1)
    opt = fused_optim.Adagrad(params, lr_decay=0.1, backend=backend)
    _train(ref, ref_params, 2, 0)
    _train(opt, params, 2, 0)
    a, b = ref.state_dict(), opt.state_dict()
    assert a["param_groups"] == b["param_groups"]
    for k in a["state"]:
        assert set(a["state"][k]) == set(b["state"][k]) == {"step", "sum"}
        for key in a["state"][k]:
            x, y = a["state"][k][key], b["state"][k][key]
            assert (x.dtype, x.device, x.shape) == (y.dtype, y.device, y.shape)
    assert "backend" not in b["param_groups"][0]


def test_old_checkpoint_float_steps_and_missing_keys_are_filled_as_torch():
    sds = []
    for cls in (torch.optim.Adagrad, fused_optim.Adagrad):
        p = _p(4)
        opt = cls([p])
        sd = opt.state_dict()
        sd["state"][0]["step"] = 3.0
        for key in ("foreach", "maximize", "differentiable", "fused"):
            del sd["param_groups"][0][key]
        opt.load_state_dict(sd)
        sds.append(opt.state_dict())
    assert sds[0]["param_groups"] == sds[1]["param_groups"]
    a, b = sds[0]["state"][0]["step"], sds[1]["state"][0]["step"]
    assert torch.is_tensor(b) and (a.dtype, float(a)) == (b.dtype, float(b))


def test_deepcopy_and_pickle_keep_backend():
    opt = fused_optim.Adagrad([_p()], backend="torch")
    assert copy.deepcopy(opt).backend == "torch"


# ------------------------------------------------- scheduler, AMP, patch


@pytest.mark.parametrize("backend", BACKENDS)
def test_step_lr_scheduler(backend):
    skip_unless_runnable(backend)
    ref_params = _params()
    params = clone_params(ref_params)
    ref = torch.optim.Adagrad(ref_params, lr=0.1, lr_decay=0.05, foreach=False)
    opt = fused_optim.Adagrad(params, lr=0.1, lr_decay=0.05, backend=backend)
    scheds = [torch.optim.lr_scheduler.StepLR(o, step_size=2, gamma=0.5) for o in (ref, opt)]
    gen = torch.Generator().manual_seed(5)
    for _ in range(5):
        grads = [torch.randn(p.shape, generator=gen, dtype=p.dtype) for p in ref_params]
        _assign(ref_params, grads)
        _assign(params, grads)
        ref.step()
        opt.step()
        for s in scheds:
            s.step()
        assert opt.param_groups[0]["lr"] == ref.param_groups[0]["lr"]
        assert_state_close(ref, opt, ref_params, params, **TOLERANCE[torch.float32])


def _model(seed):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.Tanh(), torch.nn.Linear(16, 2))


@pytest.mark.parametrize("backend", BACKENDS)
def test_grad_scaler_matches_torch_and_skips_on_inf(backend):
    skip_unless_runnable(backend)
    kw = dict(lr=0.05, lr_decay=0.01, weight_decay=1e-3)
    ref_model, model = _model(0), _model(0)
    ref = torch.optim.Adagrad(ref_model.parameters(), foreach=False, **kw)
    opt = fused_optim.Adagrad(model.parameters(), backend=backend, **kw)
    assert opt._step_supports_amp_scaling
    scalers = [torch.amp.GradScaler("cpu", init_scale=2.0 ** 10, growth_interval=2)
               for _ in range(2)]
    gen = torch.Generator().manual_seed(1)
    for it in range(6):
        x, y = torch.randn(4, 6, generator=gen), torch.randn(4, 2, generator=gen)
        for m, o, sc in ((ref_model, ref, scalers[0]), (model, opt, scalers[1])):
            o.zero_grad()
            sc.scale(torch.nn.functional.mse_loss(m(x), y)).backward()
            if it in (0, 3):
                next(m.parameters()).grad[0, 0] = float("inf")
            sc.step(o)
            sc.update()
        assert opt.last_step_skipped == (it in (0, 3))
        assert scalers[0].get_scale() == scalers[1].get_scale()
        assert_state_close(ref, opt, list(ref_model.parameters()), list(model.parameters()),
                           **TOLERANCE[torch.float32])


@pytest.mark.parametrize("backend", BACKENDS)
def test_found_inf_leaves_params_state_and_steps_untouched(backend):
    skip_unless_runnable(backend)
    params = [torch.randn(50).requires_grad_(), torch.randn(3, 3).requires_grad_()]
    opt = fused_optim.Adagrad(params, lr=0.1, backend=backend)
    for p in params:
        p.grad = torch.randn(p.shape)
    opt.step()
    before = [p.detach().clone() for p in params]
    state = [{k: v.clone() for k, v in opt.state[p].items()} for p in params]
    opt.grad_scale, opt.found_inf = torch.tensor(8.0), torch.tensor(1.0)
    opt.step()
    del opt.grad_scale, opt.found_inf
    assert opt.last_step_skipped
    for p, b, s in zip(params, before, state):
        assert torch.equal(p.detach(), b)
        for k, v in s.items():
            assert torch.equal(opt.state[p][k], v), k


@pytest.mark.parametrize("backend", BACKENDS)
def test_grad_scale_divides_in_the_kernel(backend):
    skip_unless_runnable(backend)
    ref_p = [torch.randn(40).requires_grad_()]
    p = [ref_p[0].detach().clone().requires_grad_()]
    ref = torch.optim.Adagrad(ref_p, lr=0.1, foreach=False)
    opt = fused_optim.Adagrad(p, lr=0.1, backend=backend)
    g = torch.randn(40)
    ref_p[0].grad = g.clone()
    p[0].grad = g * 1024.0
    ref.step()
    opt.grad_scale, opt.found_inf = torch.tensor(1024.0), torch.tensor(0.0)
    opt.step()
    assert not opt.last_step_skipped
    assert_state_close(ref, opt, ref_p, p, **TOLERANCE[torch.float32])


def test_differentiable_runs_torchs_step_with_autograd():
    torch.manual_seed(0)
    outs = []
    for cls, kw in ((torch.optim.Adagrad, {}), (fused_optim.Adagrad, dict(backend="numba"))):
        w = torch.randn(4, generator=torch.Generator().manual_seed(0)).requires_grad_()
        p = w.clone()
        p.retain_grad()
        p.grad = torch.randn(4, generator=torch.Generator().manual_seed(1)).requires_grad_()
        opt = cls([p], lr=0.1, differentiable=True, **kw)
        opt.step()
        p.sum().backward()
        outs.append((p.detach().clone(), w.grad.clone()))
    torch.testing.assert_close(outs[1][0], outs[0][0])
    torch.testing.assert_close(outs[1][1], outs[0][1])


def _forbid(monkeypatch):
    def boom(*args, **kwargs):
        raise AssertionError("torch's optimizer code was called")

    mod = importlib.import_module("torch.optim.adagrad")
    for n in ["adagrad", "_single_tensor_adagrad", "_multi_tensor_adagrad", "_fused_adagrad"]:
        assert hasattr(mod, n), n
        monkeypatch.setattr(mod, n, boom)
    forbidden = [n for n in dir(torch) if n.startswith(("_foreach_", "_fused_"))]
    assert "_fused_adagrad_" in forbidden
    for n in forbidden:
        monkeypatch.setattr(torch, n, boom)
    monkeypatch.setattr(torch.optim.Adagrad, "step", boom)


@pytest.mark.parametrize("backend", ["numba", "triton"])
@pytest.mark.parametrize("name,kwargs", CONFIG_PARAMS)
def test_kernels_do_the_math(name, kwargs, backend, monkeypatch):
    skip_unless_runnable(backend)
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)
    ref_params = [torch.randn(37, 5).requires_grad_(), torch.randn(70_000).requires_grad_(),
                  torch.randn(3, dtype=torch.bfloat16).requires_grad_()]
    params = clone_params(ref_params)
    grads = [[torch.randn(p.shape, generator=gen, dtype=p.dtype) for p in ref_params]
             for _ in range(3)]
    ref = make(name, ref_params, kwargs)
    for gs in grads:
        _assign(ref_params, gs)
        ref.step()
    monkeypatch.setenv("FUSED_OPTIM_BACKEND", backend)
    opt = fused_optim.Adagrad(params, **build_kwargs(kwargs))
    assert opt.backend == backend
    _forbid(monkeypatch)
    for gs in grads:
        _assign(params, gs)
        opt.step()
    assert_state_close(ref, opt, ref_params[:2], params[:2], **TOLERANCE[torch.float32])
    torch.testing.assert_close(params[2], ref_params[2], atol=2e-2, rtol=2e-2)


def test_patch_torch_makes_torch_optim_adagrad_ours():
    original = torch.optim.Adagrad
    with fused_optim.patch_torch():
        assert torch.optim.Adagrad is fused_optim.Adagrad
        import torch.optim.adagrad as mod
        assert mod.Adagrad is fused_optim.Adagrad
        p = _p(5)
        opt = torch.optim.Adagrad([p], lr=0.1)
        p.grad = torch.ones(5)
        opt.step()
        assert isinstance(opt, fused_optim.Adagrad)
    assert torch.optim.Adagrad is original


def test_registry_and_exports():
    from fused_optim import _registry

    rec = _registry.get("Adagrad")
    assert rec.cls is fused_optim.Adagrad and rec.function is fused_optim.adagrad
    assert rec.torch_cls is torch.optim.Adagrad
    assert rec.state == ("sum",) and rec.has_step
    assert "Adagrad" in fused_optim.__all__ and "adagrad" in fused_optim.__all__


@pytest.mark.parametrize("backend", ["reference", "numba", "triton"])
def test_backend_modules_keep_the_contract(backend):
    from fused_optim.kernels import contract

    try:
        module = importlib.import_module(f"fused_optim.kernels.{backend}")
    except ImportError as e:
        pytest.skip(str(e))
    assert contract.problems(module, kernels=("adagrad",)) == []


# ------------------------------------------------------ Triton specifics


def test_triton_host_side_steps(monkeypatch):
    """Steps in host memory (torch's CPU steps of CUDA params): the host advances
    them and uploads clr; a found_inf skip advances nothing. Forced on CPU
    tensors by flagging the rows as the tables flag CUDA params' CPU steps."""
    skip_unless_runnable("triton")
    from fused_optim import _tables
    from fused_optim.kernels import layout as L
    from fused_optim.kernels.triton.adagrad import adagrad as tk_adagrad

    torch.manual_seed(0)
    ref_params = [torch.randn(1500), torch.randn(7, dtype=torch.float32)]
    params = [p.clone() for p in ref_params]
    sums = [torch.full_like(p, 0.1) for p in params]
    steps = [torch.tensor(2.0), torch.tensor(0.0, dtype=torch.float64)]
    ref_sums = [s.clone() for s in sums]
    ref_steps = [s.clone() for s in steps]
    grads = [torch.randn(p.shape) for p in params]
    hyper = dict(lr=0.1, lr_decay=0.2, eps=1e-10, weight_decay=0.01, maximize=False)
    from torch.optim.adagrad import adagrad as torch_adagrad
    torch_adagrad(ref_params, [g.clone() for g in grads], ref_sums, ref_steps, foreach=False,
                  lr=0.1, lr_decay=0.2, eps=1e-10, weight_decay=0.01, maximize=False)
    for found_inf in (torch.tensor(1.0), None):
        for packed in _tables.pack(params, grads, [sums], ("sum",), steps=steps,
                                   backend="triton"):
            packed.batch.table[:, L.FLAGS] |= L.FLAG_STEP_HOST
            tk_adagrad(packed.batch, found_inf=found_inf, **hyper)
            packed.finish()
        if found_inf is not None:
            assert [float(s) for s in steps] == [2.0, 0.0]
            assert torch.equal(sums[0], torch.full_like(sums[0], 0.1))
    for a, b in zip(params + sums + steps, ref_params + ref_sums + ref_steps):
        torch.testing.assert_close(a, b, **TOLERANCE[torch.float32])


_COMPILE = r"""
import json, re, sys, itertools
sys.path.insert(0, sys.argv[1])
import torch, triton, triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from fused_optim.kernels import triton as tk
from fused_optim.kernels.triton import adagrad as ka
import _compile_matrix as cm

PTRS = {"table_ptr": "*i64", "map_ptr": "*i32", "hyper_ptr": "*fp64", "scal_ptr": "*fp64",
        "grad_scale_ptr": "*fp32", "found_inf_ptr": "*fp32", "rows": "i32"}

def source(fn, const, absent):
    sig = {}
    for n in fn.arg_names:
        if n in PTRS and not absent.get(n, False):
            sig[n] = PTRS[n]
        else:
            sig[n] = "constexpr"
            if n in PTRS:
                const[n] = None
    attrs = {(fn.arg_names.index(n),): [["tt.divisibility", 16]]
             for n in sig if sig[n].startswith("*")}
    return ASTSource(fn, sig, const, attrs)

jobs = []
for cap in (80, 90):
    for dname, dtype in cm.DTYPES.items():
        for aligned in (True, False):
            for on in (True, False):
                sw = dict(TAIL_ALIGNED=aligned and on, MAXIMIZE=on, HAS_WD=on,
                          HAS_GRAD_SCALE=on, HAS_FOUND_INF=on)
                const = dict(ELEM=tk._ELEM[dtype], IS_BF16=dtype == torch.bfloat16,
                             COMPUTE=tl.float64 if dtype == torch.float64 else tl.float32,
                             IS_F64=dtype == torch.float64, BLOCK=tk.BLOCK, ALIGNED=aligned,
                             VEC=16 // torch.empty((), dtype=dtype).element_size(), **sw)
                src = source(ka._adagrad_kernel, const,
                             {"grad_scale_ptr": not on, "found_inf_ptr": not on})
                warps = tk.num_warps(dtype, aligned, sw["TAIL_ALIGNED"])
                jobs.append(("adagrad", dname, aligned, sw, cap, src, warps))
    for on in (True, False):
        sw = dict(HAS_FOUND_INF=on, LR_F32=on)
        src = source(ka._adagrad_steps_kernel, dict(BLOCK_R=ka._STEP_ROWS, **sw),
                     {"found_inf_ptr": not on})
        jobs.append(("adagrad_steps", "float64", False, sw, cap, src, tk.NUM_WARPS))
for kernel, dname, aligned, sw, cap, src, warps in jobs:
    c = triton.compile(src, target=GPUTarget("cuda", cap, 32),
                       options={"num_warps": warps, "enable_fp_fusion": False})
    ptx = c.asm["ptx"]
    width = 64 if dname == "float64" else 32
    lanes = 2 if dname == "float64" else 4
    out = dict(kernel=kernel, dtype=dname, aligned=aligned, switches=sw, arch=cap,
               inexact=sorted(k for k, pat in cm._INEXACT.items() if re.search(pat, ptx)),
               vector_loads=len(re.findall(rf"ld\.global[.\w]*\.v{lanes}\.b{width}", ptx)),
               vector_stores=len(re.findall(rf"st\.global[.\w]*\.v{lanes}\.b{width}", ptx)),
               ieee_div=len(re.findall(r"\bdiv\.rn\.f(32|64)\b", ptx)),
               ieee_sqrt=len(re.findall(r"\bsqrt\.rn\.f(32|64)\b", ptx)))
    out.update(cm._ptxas_facts(ptx, cap))
    print(json.dumps(out), flush=True)
"""


def test_triton_kernels_compile_for_sm80_and_sm90():
    pytest.importorskip("triton")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, "-c", _COMPILE, str(HERE)], capture_output=True,
                         text=True, env=env, timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    results = [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]
    assert len(results) == 2 * (4 * 2 * 2 + 2)
    for r in results:
        assert r["inexact"] == [], r
        assert not (r["stack_bytes"] or r["spill_store_bytes"] or r["spill_load_bytes"]), r
        assert r["ieee_div"], r
        if r["kernel"] == "adagrad":
            assert r["ieee_sqrt"], r
            if r["aligned"]:
                paths = 2 if r["switches"]["TAIL_ALIGNED"] else 1
                assert r["vector_loads"] >= 3 * paths and r["vector_stores"] >= 2 * paths, r


# ------------------------------------------------ the step operator, compile


def _two_groups():
    gen = torch.Generator().manual_seed(0)
    params = [torch.randn(37, 5, generator=gen), torch.randn(70, generator=gen),
              torch.randn(3, generator=gen).bfloat16(), torch.randn(20, generator=gen)]
    params = [p.requires_grad_() for p in params]
    return params, [{"params": params[:3]},
                    {"params": params[3:], "lr": 0.05, "weight_decay": 0.0}]


def _grads(step, params):
    gen = torch.Generator().manual_seed(100 + step)
    for p in params:
        p.grad = torch.randn(p.shape, generator=gen).to(p.dtype)


def _assert_same(opt_a, params_a, opt_b, params_b):
    for pa, pb in zip(params_a, params_b):
        assert torch.equal(pa, pb)
        for key in opt_a.state[pa]:
            assert torch.equal(opt_a.state[pa][key], opt_b.state[pb][key]), key


def test_eager_steps_through_the_operator_match(monkeypatch):
    from fused_optim import _ops

    kw = dict(lr=0.1, lr_decay=0.02, weight_decay=0.01, maximize=True)
    params_a, groups_a = _two_groups()
    params_b, groups_b = _two_groups()
    a = fused_optim.Adagrad(groups_a, backend="numba", **kw)
    b = fused_optim.Adagrad(groups_b, backend="numba", **kw)
    for s in range(3):
        _grads(s, params_a)
        _grads(s, params_b)
        a.step()
        monkeypatch.setattr(_ops, "DISPATCH_EAGER", True)
        b.step()
        monkeypatch.setattr(_ops, "DISPATCH_EAGER", False)
        _assert_same(a, params_a, b, params_b)


def test_compiled_step_matches_eager_fullgraph(monkeypatch):
    import torch._dynamo
    from torch._dynamo.utils import counters

    from fused_optim.adagrad import ADAGRAD_STEP

    torch._dynamo.reset()
    counters.clear()
    seen = {"compiled": 0}
    run = ADAGRAD_STEP.run

    def counting(jobs, grad_scale, found_inf, backend, cache, compiled):
        seen["compiled"] += compiled
        return run(jobs, grad_scale, found_inf, backend, cache, compiled)

    monkeypatch.setattr(ADAGRAD_STEP, "run", counting)
    kw = dict(lr=0.1, lr_decay=0.02, weight_decay=0.01)
    params_e, groups_e = _two_groups()
    params_c, groups_c = _two_groups()
    eager = fused_optim.Adagrad(groups_e, backend="numba", **kw)
    opt = fused_optim.Adagrad(groups_c, backend="numba", **kw)

    @torch.compile(fullgraph=True)
    def step():
        opt.step()

    try:
        for s in range(3):
            _grads(s, params_e)
            _grads(s, params_c)
            eager.step()
            step()
            _assert_same(eager, params_e, opt, params_c)
        assert seen["compiled"] == 3
        assert not counters["graph_break"]
    finally:
        torch._dynamo.reset()


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16],
                         ids=str)
def test_numba_parallel_equals_serial(dtype, monkeypatch):
    """The parallel kernel (blocked, prefetching walk) gives the serial one's bits."""
    skip_unless_runnable("numba")
    import fused_optim.kernels.numba as nb

    kw = dict(lr=0.1, lr_decay=0.02, weight_decay=0.01, initial_accumulator_value=0.1)
    results = []
    for serial_below in (1 << 40, 0):
        monkeypatch.setattr(nb, "SERIAL_BELOW", serial_below)
        gen = torch.Generator().manual_seed(0)
        params = [torch.randn(40_000, generator=gen).to(dtype).requires_grad_(),
                  torch.randn(333, generator=gen).to(dtype).requires_grad_()]
        opt = fused_optim.Adagrad(params, backend="numba", **kw)
        for _ in range(2):
            for p in params:
                p.grad = torch.randn(p.shape, generator=gen).to(dtype)
            opt.step()
        results.append([t.detach().clone() for p in params
                        for t in (p, opt.state[p]["sum"], opt.state[p]["step"])])
    for a, b in zip(*results):
        assert torch.equal(a, b)
