"""RMSprop against torch.optim.RMSprop (foreach=False), step for step.

Temporary home of RMSprop's tests (issue 14), to be folded into the shared
test database; it reuses the shared tests' helpers where they take an
optimizer name. Backends numba, triton (interpreted without a GPU) and torch.
"""

from __future__ import annotations

import copy
import importlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import fused_optim
import test_capturable
import test_parity as parity
from matrix import (BACKENDS, FULL_PRECISION, LAYOUTS, LOW_PRECISION, TOLERANCE,
                    assert_state_close, build_kwargs, clone_params, config_id, make,
                    skip_unless_runnable)

HERE = Path(__file__).parent
NAME = "RMSprop"

CONFIGS = [
    dict(),
    dict(lr=0.01, alpha=0.9, eps=1e-6),
    dict(lr=0.01, centered=True),
    dict(lr=0.01, momentum=0.9),
    dict(lr=0.01, momentum=0.9, centered=True, weight_decay=0.1),
    dict(lr=0.01, maximize=True, weight_decay=0.05, eps=1e-3, momentum=0.5),
    # 1 - alpha >= 0.5: torch.lerp's other side
    dict(lr=lambda: torch.tensor(0.01), centered=True, alpha=0.3),
]
CONFIG_PARAMS = [pytest.param(c, id=config_id(NAME, c)) for c in CONFIGS]


def _params(dtype, backend):
    ps = LAYOUTS["odd"](dtype) + LAYOUTS["strided"](dtype) + LAYOUTS["channels_last"](dtype)
    if backend != "triton":  # (interpreted Triton: the small layouts, for CI time)
        ps += LAYOUTS["large"](dtype)  # the Numba backend's parallel path
    return ps


def _run_both(kwargs, backend, ref_params, params, steps, tol, gen, frozen=1):
    ref = make(NAME, ref_params, kwargs)
    opt = make(NAME, params, kwargs, fused_backend=backend)
    for step in range(steps):
        grads = parity._grads_for_step(ref_params, step, gen, frozen=frozen)
        parity._assign(ref_params, grads)
        parity._assign(params, grads)
        ref.step()
        opt.step()
        assert_state_close(ref, opt, ref_params, params, **tol)
    return ref, opt


# ------------------------------------------------------------------ parity

@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", FULL_PRECISION, ids=str)
@pytest.mark.parametrize("kwargs", CONFIG_PARAMS)
def test_matches_torch_for_loop(kwargs, dtype, backend):
    skip_unless_runnable(backend)
    torch.manual_seed(0)
    ref_params = _params(dtype, backend)
    params = clone_params(ref_params)
    _run_both(kwargs, backend, ref_params, params, 4, TOLERANCE[dtype],
              torch.Generator().manual_seed(1))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", LOW_PRECISION, ids=str)
@pytest.mark.parametrize("kwargs", CONFIG_PARAMS)
def test_low_precision_no_worse_than_torch(kwargs, dtype, backend):
    parity.test_low_precision_no_worse_than_torch(NAME, kwargs, dtype, backend)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kwargs", CONFIG_PARAMS[::2])
def test_mixed_dtypes_in_one_group(kwargs, backend):
    parity.test_mixed_dtypes_in_one_group(NAME, kwargs, backend)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("bad", [float("nan"), float("inf")], ids=str)
@pytest.mark.parametrize("kwargs", CONFIG_PARAMS[3:5])
def test_nonfinite_grads_match(kwargs, bad, backend):
    parity.test_nonfinite_grads_match(NAME, kwargs, bad, backend)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kwargs", CONFIG_PARAMS[3:5] + CONFIG_PARAMS[:1])
def test_complex_params_as_real_views(kwargs, backend):
    parity.test_complex_params_as_real_views(NAME, kwargs, backend)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=str)
@pytest.mark.parametrize("kwargs", [CONFIGS[0], CONFIGS[4], CONFIGS[5], CONFIGS[6]],
                         ids=lambda c: config_id(NAME, c))
def test_numba_and_triton_agree_bit_for_bit(kwargs, dtype):
    """The two compiled backends round at the same places, FMAs included."""
    skip_unless_runnable("numba")
    skip_unless_runnable("triton")
    torch.manual_seed(0)
    base = [torch.randn(1031, dtype=dtype).requires_grad_(),
            torch.randn(6, 5, dtype=dtype).requires_grad_()]
    a, b = clone_params(base), clone_params(base)
    oa = make(NAME, a, kwargs, fused_backend="numba")
    ob = make(NAME, b, kwargs, fused_backend="triton")
    gen = torch.Generator().manual_seed(5)
    for _ in range(3):
        for x, y in zip(a, b):
            g = torch.randn(x.shape, generator=gen).to(dtype)
            x.grad, y.grad = g, g.clone()
        oa.step()
        ob.step()
        for x, y in zip(a, b):
            assert torch.equal(x, y)
            for k in oa.state[x]:
                assert torch.equal(oa.state[x][k], ob.state[y][k]), k


@pytest.mark.parametrize("backend", BACKENDS)
def test_differentiable_runs_torchs_own_step(backend):
    """Autograd through the step, as torch's (non-leaf params, as torch's own tests)."""
    skip_unless_runnable(backend)
    torch.manual_seed(0)
    kw = dict(lr=0.01, momentum=0.9, centered=True, differentiable=True)
    sides = []
    for cls, extra in ((torch.optim.RMSprop, dict(foreach=False)),
                       (fused_optim.RMSprop, dict(backend=backend))):
        torch.manual_seed(0)
        leaf = torch.randn(5, 3, dtype=torch.float64, requires_grad=True)
        p = leaf.clone()  # non-leaf: torch's in-place update is recorded
        p.grad = torch.randn(5, 3, dtype=torch.float64)
        opt = cls([p], **kw, **extra)
        for _ in range(2):
            opt.step()
        p.sum().backward()
        assert leaf.grad is not None
        sides.append((p.detach(), leaf.grad, opt.state[p]["square_avg"].detach()))
    for a, b in zip(*sides):
        torch.testing.assert_close(b, a, **TOLERANCE[torch.float64])


def test_functional_matches_torchs():
    from torch.optim.rmsprop import rmsprop as torch_rmsprop

    torch.manual_seed(0)
    kw = dict(lr=0.01, alpha=0.9, eps=1e-8, weight_decay=0.1, momentum=0.5, centered=True)
    for backend in BACKENDS:
        if not fused_optim._backend.can_run(backend, "cpu", torch.float32):
            continue
        sides = []
        for fn in (torch_rmsprop, fused_optim.rmsprop):
            gen = torch.Generator().manual_seed(3)
            ps = [torch.ones(7) * 0.5, torch.ones(3, 2)]
            sq, ga, buf = ([torch.zeros_like(p) for p in ps] for _ in range(3))
            steps = [torch.tensor(0.0) for _ in ps]
            extra = {} if fn is torch_rmsprop else dict(backend=backend)
            for _ in range(3):
                gs = [torch.randn(p.shape, generator=gen) for p in ps]
                fn(ps, gs, sq, ga, buf, steps, foreach=False, **kw, **extra)
            sides.append((ps, sq, ga, buf, steps))
        for x, y in zip(*sides):
            for s, t in zip(x, y):
                torch.testing.assert_close(t, s, **TOLERANCE[torch.float32])


# ------------------------------------------------------------------ capturable

@pytest.mark.parametrize("kwargs", [dict(), dict(momentum=0.9, centered=True,
                                                 weight_decay=0.01)], ids=str)
def test_capturable_step_reads_nothing_on_the_host(kwargs, monkeypatch):
    """Interpreted Triton: CPU tensors stand in for CUDA ones (tests/test_capturable.py)."""
    skip_unless_runnable("triton", test_capturable.DEVICE)
    device = test_capturable.DEVICE
    torch.manual_seed(0)
    ref_params = [torch.randn(40, 3, device=device).requires_grad_(),
                  torch.randn(7, device=device).requires_grad_()]
    params = [p.detach().clone().requires_grad_() for p in ref_params]
    lr = torch.tensor(0.01, device=device)
    ref = torch.optim.RMSprop(ref_params, lr=0.01, foreach=False, **kwargs)
    opt = fused_optim.RMSprop(params, lr=lr, capturable=True, backend="triton", **kwargs)
    gen = torch.Generator().manual_seed(1)
    for step in range(4):
        for a, b in zip(ref_params, params):
            g = torch.randn(a.shape, generator=gen).to(device)
            a.grad, b.grad = g, g.clone()
        new_lr = 0.01 * 0.5 ** step  # a scheduler writing the device lr in place
        ref.param_groups[0]["lr"] = new_lr
        lr.fill_(new_lr)
        ref.step()
        with monkeypatch.context() as m:
            test_capturable._forbid_host_reads(m)
            opt.step()
        assert opt.state[params[0]]["step"].device == params[0].device
    assert_state_close(ref, opt, ref_params, params, **TOLERANCE[torch.float32])


# ------------------------------------------------------------------ state_dict

@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("direction", ["torch->fused", "fused->torch"])
def test_state_dict_both_ways(direction, backend):
    skip_unless_runnable(backend)
    torch.manual_seed(0)
    kw = dict(lr=0.01, momentum=0.9, centered=True, weight_decay=0.01)
    init = [torch.randn(6, 4), torch.randn(9)]
    gen = torch.Generator().manual_seed(4)
    grads = [[torch.randn(p.shape, generator=gen) for p in init] for _ in range(5)]

    def run(cls, params, opt=None, steps=range(5), **extra):
        opt = opt or cls(params, **kw, **extra)
        for s in steps:
            for p, g in zip(params, grads[s]):
                p.grad = g.clone()
            opt.step()
        return opt

    straight_p = [p.clone().requires_grad_() for p in init]
    run(torch.optim.RMSprop, straight_p, foreach=False)

    first_p = [p.clone().requires_grad_() for p in init]
    fused_first = direction == "fused->torch"
    first_cls = fused_optim.RMSprop if fused_first else torch.optim.RMSprop
    first = run(first_cls, first_p, steps=range(2),
                **(dict(backend=backend) if fused_first else dict(foreach=False)))
    sd = copy.deepcopy(first.state_dict())
    assert set(sd["state"][0]) == {"step", "square_avg", "momentum_buffer", "grad_avg"}
    assert sd["param_groups"][0].keys() == torch.optim.RMSprop(
        [torch.zeros(1, requires_grad=True)], **kw).state_dict()["param_groups"][0].keys()
    second_p = [p.detach().clone().requires_grad_() for p in first_p]
    second = (torch.optim.RMSprop(second_p, **kw, foreach=False) if fused_first
              else fused_optim.RMSprop(second_p, **kw, backend=backend))
    second.load_state_dict(sd)
    run(None, second_p, opt=second, steps=range(2, 5))
    for a, b in zip(straight_p, second_p):
        torch.testing.assert_close(b, a, **TOLERANCE[torch.float32])
    assert float(second.state[second_p[0]]["step"]) == 5


def test_setstate_fills_torchs_group_defaults_and_tensor_steps():
    p = torch.randn(3).requires_grad_()
    opt = fused_optim.RMSprop([p], backend="torch")
    p.grad = torch.ones(3)
    opt.step()
    state = opt.__getstate__()
    for key in ("momentum", "centered", "foreach", "maximize", "differentiable",
                "capturable"):
        del state["param_groups"][0][key]
    state["state"][p]["step"] = 1.0  # an old checkpoint's float step
    opt.__setstate__(state)
    group = opt.param_groups[0]
    assert (group["momentum"], group["centered"], group["foreach"], group["maximize"],
            group["differentiable"], group["capturable"]) == (0, False, None, False,
                                                              False, False)
    assert torch.is_tensor(opt.state[p]["step"]) and float(opt.state[p]["step"]) == 1.0


# ------------------------------------------------------------------ errors

BAD_CONSTRUCTION = {
    "negative lr": dict(lr=-0.1),
    "negative eps": dict(eps=-1e-8),
    "negative momentum": dict(momentum=-0.5),
    "negative weight_decay": dict(weight_decay=-1e-4),
    "negative alpha": dict(alpha=-0.1),
    "2-element Tensor lr": dict(lr=torch.tensor([0.1, 0.2])),
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
    theirs = _outcome(lambda: torch.optim.RMSprop([torch.randn(3).requires_grad_()], **kw))
    ours = _outcome(lambda: fused_optim.RMSprop([torch.randn(3).requires_grad_()], **kw))
    assert theirs[0] is not None
    assert ours == theirs


def test_signature_is_torchs_plus_backend():
    import inspect

    theirs = inspect.signature(torch.optim.RMSprop.__init__).parameters
    ours = inspect.signature(fused_optim.RMSprop.__init__).parameters
    assert list(ours)[:-1] == list(theirs)
    for name in theirs:
        assert ours[name].default == theirs[name].default, name
        assert ours[name].kind == theirs[name].kind, name
    assert ours["backend"].kind is inspect.Parameter.KEYWORD_ONLY
    fn_theirs = inspect.signature(importlib.import_module("torch.optim.rmsprop").rmsprop)
    fn_ours = inspect.signature(fused_optim.rmsprop)
    assert list(fn_ours.parameters)[:-1] == list(fn_theirs.parameters)


def _sparse(p):
    p.grad = torch.sparse_coo_tensor(torch.tensor([[0, 2]]), torch.tensor([1.0, -2.0]),
                                     p.shape)


def _dense(p):
    p.grad = torch.ones_like(p)


# (kwargs, grad setters of the two params, backends where it applies or None)
BAD_STEP = {
    "sparse grad": (dict(), (_dense, _sparse), None),
    "capturable on CPU": (dict(capturable=True), (_dense, _dense), ("numba", "torch")),
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", list(BAD_STEP))
def test_bad_step_raises_like_torch_and_changes_nothing(case, backend):
    skip_unless_runnable(backend)
    kwargs, setters, applies = BAD_STEP[case]
    if applies and backend not in applies:
        pytest.skip(f"{case!r} is no error for backend {backend!r}")
    ref = [torch.randn(4).requires_grad_(), torch.randn(4).requires_grad_()]
    ours = clone_params(ref)
    for ps in (ref, ours):
        for p, set_grad in zip(ps, setters):
            set_grad(p)
    before = [p.detach().clone() for p in ours]
    theirs_opt = torch.optim.RMSprop(ref, **kwargs)
    ours_opt = fused_optim.RMSprop(ours, backend=backend, **kwargs)
    theirs = _outcome(theirs_opt.step)
    mine = _outcome(ours_opt.step)
    assert theirs[0] is not None
    assert mine == theirs
    for p, b in zip(ours, before):
        assert torch.equal(p.detach(), b)
    # the lazy state torch's loop had made by then, and nothing else
    assert {i for i, p in enumerate(ref) if theirs_opt.state.get(p)} == {
        i for i, p in enumerate(ours) if ours_opt.state.get(p)}


@pytest.mark.parametrize("backend", BACKENDS)
def test_momentum_switched_on_later_raises_torchs_key_error(backend):
    skip_unless_runnable(backend)
    outcomes = []
    for cls, extra in ((torch.optim.RMSprop, {}), (fused_optim.RMSprop, dict(backend=backend))):
        p = torch.randn(3).requires_grad_()
        p.grad = torch.ones(3)
        opt = cls([p], **extra)
        opt.step()
        opt.param_groups[0]["momentum"] = 0.9
        before = p.detach().clone()
        outcomes.append(_outcome(opt.step))
        assert torch.equal(p.detach(), before)
    assert outcomes[0][0] is KeyError and outcomes[0] == outcomes[1]


# ------------------------------------------------------------------ schedulers

@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("tensor_lr", [False, True])
def test_step_lr_scheduler(backend, tensor_lr):
    skip_unless_runnable(backend)
    torch.manual_seed(0)
    ref_params = [torch.randn(8, 3).requires_grad_()]
    params = clone_params(ref_params)
    lr = (lambda: torch.tensor(0.05)) if tensor_lr else 0.05
    kw = dict(lr=lr, momentum=0.5)
    ref = make(NAME, ref_params, kw)
    opt = make(NAME, params, kw, fused_backend=backend)
    scheds = [torch.optim.lr_scheduler.StepLR(o, step_size=2, gamma=0.5) for o in (ref, opt)]
    gen = torch.Generator().manual_seed(6)
    for _ in range(6):
        g = torch.randn(8, 3, generator=gen)
        ref_params[0].grad, params[0].grad = g, g.clone()
        ref.step()
        opt.step()
        for s in scheds:
            s.step()
        assert float(ref.param_groups[0]["lr"]) == float(opt.param_groups[0]["lr"])
        assert_state_close(ref, opt, ref_params, params, **TOLERANCE[torch.float32])
    assert float(opt.param_groups[0]["lr"]) == pytest.approx(0.05 * 0.5 ** 3, rel=1e-6)


# ------------------------------------------------------------------ AMP

@pytest.mark.parametrize("backend", BACKENDS)
def test_found_inf_leaves_params_state_and_steps_untouched(backend):
    skip_unless_runnable(backend)
    params = [torch.randn(50).requires_grad_(), torch.randn(3, 3).requires_grad_()]
    opt = fused_optim.RMSprop(params, lr=0.1, momentum=0.9, centered=True, backend=backend)
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
    ref = torch.optim.RMSprop(ref_p, lr=0.01, momentum=0.5, foreach=False)
    opt = fused_optim.RMSprop(p, lr=0.01, momentum=0.5, backend=backend)
    g = torch.randn(40)
    ref_p[0].grad = g.clone()
    p[0].grad = g * 1024.0
    ref.step()
    opt.grad_scale, opt.found_inf = torch.tensor(1024.0), torch.tensor(0.0)
    opt.step()
    assert not opt.last_step_skipped
    assert_state_close(ref, opt, ref_p, p, **TOLERANCE[torch.float32])


@pytest.mark.parametrize("backend", BACKENDS)
def test_grad_scaler_matches_torch_and_skips_on_inf(backend):
    skip_unless_runnable(backend)

    def model():
        torch.manual_seed(0)
        return torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.Tanh(),
                                   torch.nn.Linear(16, 2))

    kw = dict(lr=0.01, centered=True, momentum=0.5)
    ref_model, ours_model = model(), model()
    ref = torch.optim.RMSprop(ref_model.parameters(), foreach=False, **kw)
    opt = fused_optim.RMSprop(ours_model.parameters(), backend=backend, **kw)
    scalers = [torch.amp.GradScaler("cpu", init_scale=2.0 ** 10, growth_interval=2)
               for _ in range(2)]
    gen = torch.Generator().manual_seed(1)
    for it in range(6):
        x, y = torch.randn(4, 6, generator=gen), torch.randn(4, 2, generator=gen)
        for m, o, sc in ((ref_model, ref, scalers[0]), (ours_model, opt, scalers[1])):
            o.zero_grad()
            sc.scale(torch.nn.functional.mse_loss(m(x), y)).backward()
            if it in (1, 3):
                next(m.parameters()).grad[0, 0] = float("inf")
            sc.step(o)
            sc.update()
        assert opt.last_step_skipped == (it in (1, 3))
        assert scalers[0].get_scale() == scalers[1].get_scale()
        assert_state_close(ref, opt, list(ref_model.parameters()),
                           list(ours_model.parameters()), **TOLERANCE[torch.float32])


# ------------------------------------------------------------------ the kernels do the math

def _forbid(monkeypatch):
    import test_kernels_do_the_math

    def boom(*args, **kwargs):
        raise AssertionError("torch's optimizer code was called")

    test_kernels_do_the_math._forbid(monkeypatch)  # SGD/Adam, every _foreach_/_fused_ op
    mod = importlib.import_module("torch.optim.rmsprop")
    for n in ("rmsprop", "_single_tensor_rmsprop", "_multi_tensor_rmsprop"):
        assert hasattr(mod, n), n
        monkeypatch.setattr(mod, n, boom)
    monkeypatch.setattr(torch.optim.RMSprop, "step", boom)


@pytest.mark.parametrize("backend", ["numba", "triton"])
@pytest.mark.parametrize("kwargs", CONFIG_PARAMS)
def test_step_matches_with_torch_optimizer_code_disabled(kwargs, backend, monkeypatch):
    skip_unless_runnable(backend)
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)
    big = 70_000 if backend == "numba" else 3_000
    ref_params = [torch.randn(37, 5).requires_grad_(), torch.randn(big).requires_grad_(),
                  torch.randn(3, dtype=torch.bfloat16).requires_grad_()]
    params = clone_params(ref_params)
    grads = [[torch.randn(p.shape, generator=gen, dtype=p.dtype) for p in ref_params]
             for _ in range(3)]
    ref = make(NAME, ref_params, kwargs)
    for gs in grads:
        for p, g in zip(ref_params, gs):
            p.grad = g.clone()
        ref.step()
    monkeypatch.setenv("FUSED_OPTIM_BACKEND", backend)
    opt = fused_optim.RMSprop(params, **build_kwargs(kwargs))
    assert opt.backend == backend
    _forbid(monkeypatch)
    with pytest.raises(AssertionError, match="torch's optimizer code"):
        importlib.import_module("torch.optim.rmsprop")._single_tensor_rmsprop()
    for gs in grads:
        for p, g in zip(params, gs):
            p.grad = g.clone()
        opt.step()
    assert_state_close(ref, opt, ref_params[:2], params[:2], **TOLERANCE[torch.float32])
    torch.testing.assert_close(params[2], ref_params[2], atol=2e-2, rtol=2e-2)


# ------------------------------------------------------------------ registry and patch

def test_registered_and_exported():
    from fused_optim import _registry

    record = _registry.get(NAME)
    assert record.cls is fused_optim.RMSprop and record.function is fused_optim.rmsprop
    assert record.torch_cls is torch.optim.RMSprop
    assert record.state == ("square_avg", "momentum_buffer", "grad_avg") and record.has_step
    assert NAME in fused_optim.__all__ and "rmsprop" in fused_optim.__all__
    assert record.traffic(dict(momentum=0.9, centered=True)) == (5, 4)
    assert record.traffic(dict(momentum=0, centered=False)) == (3, 2)


def test_patch_torch_makes_torch_optim_rmsprop_ours():
    orig = torch.optim.RMSprop
    submodule = importlib.import_module("torch.optim.rmsprop")
    orig_fn = submodule.rmsprop
    with fused_optim.patch_torch():
        from torch.optim import RMSprop
        from torch.optim.rmsprop import RMSprop as RMSprop2

        assert RMSprop is RMSprop2 is fused_optim.RMSprop
        assert submodule.rmsprop is orig_fn  # the fallback stays torch's
        p = torch.randn(3).requires_grad_()
        p.grad = torch.ones(3)
        opt = torch.optim.RMSprop([p], lr=0.1)
        opt.step()
        assert type(opt) is fused_optim.RMSprop
        assert fused_optim._patch.original(NAME) is orig
    assert torch.optim.RMSprop is orig


def test_step_operator_round_trip(monkeypatch):
    """Eager steps through the dispatcher (as compiled steps run) give the same."""
    skip_unless_runnable("numba")
    monkeypatch.setattr(fused_optim._ops, "DISPATCH_EAGER", True)
    torch.manual_seed(0)
    ref_params = [torch.randn(9, 2).requires_grad_(), torch.randn(5).requires_grad_()]
    params = clone_params(ref_params)
    for kw in (dict(lr=lambda: torch.tensor(0.01), momentum=0.9, centered=True), dict()):
        _run_both(kw, "numba", [p.detach().clone().requires_grad_() for p in ref_params],
                  clone_params(params), 3, TOLERANCE[torch.float32],
                  torch.Generator().manual_seed(7), frozen=None)


# ------------------------------------------------------------------ offline compile

_SWITCHES = ("TAIL_ALIGNED", "CENTERED", "USE_MOMENTUM", "MAXIMIZE", "HAS_WD",
             "LERP_FROM_START", "HAS_GRAD_SCALE", "HAS_FOUND_INF")


def _compile_facts(archs=(90,)):
    """Compile the RMSprop kernels for real GPUs (no GPU needed); one dict each.

    Per dtype and ALIGNED: every switch on (TAIL_ALIGNED where aligned) and
    every switch off; and the step kernel with and without found_inf. Run
    without TRITON_INTERPRET (see tests/_compile_matrix.py).
    """
    import re

    import triton
    import triton.language as tl
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    import _compile_matrix as cm
    from fused_optim.kernels import triton as tk
    from fused_optim.kernels.triton import rmsprop as rk

    out = []
    for cap in archs:
        for dname, aligned in ((d, a) for d in cm.DTYPES for a in (True, False)):
            dtype = cm.DTYPES[dname]
            for on in (True, False):
                sw = {s: on for s in _SWITCHES}
                sw["TAIL_ALIGNED"] = on and aligned
                fn = rk._rmsprop_kernel
                const = dict(ELEM=tk._ELEM[dtype], IS_BF16=dtype == torch.bfloat16,
                             COMPUTE=tl.float64 if dtype == torch.float64 else tl.float32,
                             IS_F64=dtype == torch.float64, BLOCK=tk.BLOCK, ALIGNED=aligned,
                             VEC=16 // torch.empty((), dtype=dtype).element_size(), **sw)
                sig = {}
                for name in fn.arg_names:
                    if name in cm._SGD_PTRS and (on or name not in ("grad_scale_ptr",
                                                                    "found_inf_ptr")):
                        sig[name] = cm._SGD_PTRS[name]
                    else:
                        sig[name] = "constexpr"
                        if name in cm._SGD_PTRS:
                            const[name] = None
                attrs = {(fn.arg_names.index(n),): [["tt.divisibility", 16]]
                         for n in sig if sig[n].startswith("*")}
                compiled = triton.compile(
                    ASTSource(fn, sig, const, attrs), target=GPUTarget("cuda", cap, 32),
                    options={"num_warps": tk.num_warps(dtype, aligned, sw["TAIL_ALIGNED"]),
                             "enable_fp_fusion": False})
                ptx = compiled.asm["ptx"]
                width, lanes = (64, 2) if dname == "float64" else (32, 4)
                r = dict(kernel="rmsprop", dtype=dname, aligned=aligned, switches=sw, arch=cap,
                         vector_loads=len(re.findall(
                             rf"ld\.global[.\w]*\.v{lanes}\.b{width}", ptx)),
                         vector_stores=len(re.findall(
                             rf"st\.global[.\w]*\.v{lanes}\.b{width}", ptx)),
                         inexact=sorted(k for k, pat in cm._INEXACT.items()
                                        if re.search(pat, ptx)),
                         local=len(re.findall(r"\.local\b", ptx)),
                         ieee_div=len(re.findall(r"\bdiv\.rn\.f(32|64)\b", ptx)),
                         ieee_sqrt=len(re.findall(r"\bsqrt\.rn\.f(32|64)\b", ptx)))
                r.update(cm._ptxas_facts(ptx, cap))
                out.append(r)
        for fi in (False, True):
            fn = rk._rmsprop_steps_kernel
            sig = {"table_ptr": "*i64", "found_inf_ptr": "*fp32" if fi else "constexpr",
                   "rows": "i32", "BLOCK_R": "constexpr", "HAS_FOUND_INF": "constexpr"}
            const = dict(BLOCK_R=rk._STEP_ROWS, HAS_FOUND_INF=fi)
            if not fi:
                const["found_inf_ptr"] = None
            compiled = triton.compile(ASTSource(fn, sig, const, {}),
                                      target=GPUTarget("cuda", cap, 32),
                                      options={"num_warps": tk.NUM_WARPS})
            r = dict(kernel="rmsprop_steps", switches={"HAS_FOUND_INF": fi}, arch=cap,
                     local=len(re.findall(r"\.local\b", compiled.asm["ptx"])))
            r.update(cm._ptxas_facts(compiled.asm["ptx"], cap))
            out.append(r)
    return out


def _violations(r):
    bad = []
    if r["stack_bytes"] or r["spill_store_bytes"] or r["spill_load_bytes"] or r["local"]:
        bad.append("local memory")
    if r["kernel"] == "rmsprop_steps":
        return bad
    sw = r["switches"]
    if r["inexact"]:
        bad.append(f"non-IEEE float math: {r['inexact']}")
    if not (r["ieee_sqrt"] and r["ieee_div"]):
        bad.append("no sqrt.rn / div.rn")
    streams = 3 + sw["USE_MOMENTUM"] + sw["CENTERED"]
    paths = 2 if sw["TAIL_ALIGNED"] else 1
    if r["aligned"] and (r["vector_loads"] < paths * streams
                         or r["vector_stores"] < paths * (streams - 1)):
        bad.append(f"ALIGNED but {r['vector_loads']} 128-bit loads, "
                   f"{r['vector_stores']} stores ({streams} streams, {paths} paths)")
    return bad


def test_triton_kernels_compile_offline_for_sm_90():
    pytest.importorskip("triton")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    code = ("import json, sys; sys.path.insert(0, %r); import test_rmsprop_dev as t; "
            "print(json.dumps(t._compile_facts()))" % str(HERE))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env=env, timeout=900, cwd=str(HERE))
    assert out.returncode == 0, out.stderr[-3000:]
    results = json.loads(out.stdout.splitlines()[-1])
    assert len(results) == 4 * 2 * 2 + 2
    problems = {json.dumps([r["kernel"], r.get("dtype"), r.get("aligned"), r["switches"]]):
                _violations(r) for r in results}
    assert not {k: v for k, v in problems.items() if v}


# ------------------------------------------------------------------ Triton's host-side steps

@pytest.mark.parametrize("found_inf", [None, 0.0, 1.0])
def test_triton_host_side_steps(found_inf):
    """Steps flagged host-side (torch's CPU steps of CUDA params) are advanced
    by the host, or not at all when found_inf is set; the update is the same."""
    skip_unless_runnable("triton")
    from fused_optim import _tables
    from fused_optim.kernels import layout as L
    from fused_optim.kernels.reference.rmsprop import rmsprop as ref_kernel
    from fused_optim.kernels.triton.rmsprop import rmsprop as triton_kernel

    torch.manual_seed(0)
    hyper = dict(lr=0.01, alpha=0.9, eps=1e-8, weight_decay=0.1, momentum=0.5,
                 centered=True, maximize=False)
    sides = []
    for kernel in (ref_kernel, triton_kernel):
        torch.manual_seed(0)
        params = [torch.randn(37), torch.randn(5, 3), torch.randn(0)]
        grads = [torch.randn(p.shape) for p in params]
        # square_avg above grad_avg**2, as any real history leaves them
        states = [[torch.rand(p.shape) + k for p in params] for k in (1.0, 0.0, -0.5)]
        steps = [torch.tensor(3.0), torch.tensor(3.0, dtype=torch.float64), torch.tensor(0.0)]
        (packed,) = _tables.pack(params, grads, states,
                                 ("square_avg", "momentum_buffer", "grad_avg"), steps=steps)
        if kernel is triton_kernel:
            packed.batch.table[:, L.FLAGS] |= L.FLAG_STEP_HOST
        amp = {} if found_inf is None else dict(found_inf=torch.tensor(found_inf))
        kernel(packed.batch, **hyper, **amp)
        packed.finish()
        sides.append((params, states, steps))
    (p0, s0, t0), (p1, s1, t1) = sides
    for a, b in zip(p0 + sum(s0, []), p1 + sum(s1, [])):
        torch.testing.assert_close(b, a, **TOLERANCE[torch.float32])
    assert [float(t) for t in t1] == [float(t) for t in t0] == (
        [3.0, 3.0, 0.0] if found_inf == 1.0 else [4.0, 4.0, 1.0])
    assert [t.dtype for t in t1] == [torch.float32, torch.float64, torch.float32]
