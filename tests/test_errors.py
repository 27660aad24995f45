"""Bad input gets torch's exception type and message, and corrupts nothing.

The bad inputs are tests/optim_db.py's error inputs (OptimInfo.all_error_inputs):
each builds the same bad input for the oracle (torch's class) and for
fused_optim's; both must raise alike, and as the entry says (type, regex),
at the time it says (``error_on``: construction or step).
"""

import copy
import functools
import re

import pytest
import torch

import fused_optim
import optim_db
from matrix import BACKENDS, skip_unless_runnable
from sides import assert_same
from sides import outcome as _outcome


def _p(*shape):
    return torch.randn(*shape or (3,)).requires_grad_()


def _error_params(error_on):
    return [pytest.param(info, e, id=f"{info.name}: {e.desc}")
            for info in optim_db.OPTIM_DB for e in info.all_error_inputs()
            if e.error_on == error_on]


def _as_declared(outcome, e):
    assert outcome[0] is e.error_type, (outcome, e.error_type)
    assert re.search(e.error_regex, outcome[1]), (outcome[1], e.error_regex)


@pytest.mark.parametrize("info,e", _error_params(optim_db.CONSTRUCT))
def test_bad_construction_raises_like_torch(info, e):
    theirs = _outcome(lambda: info.record.torch_cls(e.params(), **e.kwargs()))
    ours = _outcome(lambda: info.cls(e.params(), **e.kwargs()))
    assert theirs[0] is not None, "error input does not make torch raise"
    _as_declared(theirs, e)
    assert ours == theirs


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("info,e", _error_params(optim_db.STEP))
def test_bad_step_raises_like_torch_and_changes_nothing(info, e, backend):
    skip_unless_runnable(backend)
    if e.backends is not None and backend not in e.backends:
        pytest.skip(f"{e.desc!r} is no error for backend {backend!r}")
    made = e.param()
    refs = [made] if torch.is_tensor(made) else list(made)
    ours = [p.detach().clone().requires_grad_() for p in refs]
    for p in refs + ours:
        e.set_grad(p)
    before = [p.detach().clone() for p in ours]
    torch_opt = info.record.torch_cls(refs, **e.kwargs())
    theirs = _outcome(torch_opt.step)
    opt = info.cls(ours, backend=backend, **e.kwargs())
    outcome = _outcome(opt.step)
    assert theirs[0] is not None, "error input does not make torch's step raise"
    _as_declared(theirs, e)
    assert outcome == theirs
    for p, b in zip(ours, before):
        assert torch.equal(p.detach(), b)
    # nor is the state: what is there is what torch's loop created before it
    # raised, with no step counted (torch's Adagrad counts the step before its
    # sparse weight-decay error; fused_optim writes nothing, by its rule)
    for p_ref, p in zip(refs, ours):
        want, got = torch_opt.state.get(p_ref, {}), opt.state.get(p, {})
        assert set(got) <= set(want)
        for k, v in got.items():
            if k == "step":
                assert float(v) == 0.0
            else:
                assert torch.equal(v, want[k]) if torch.is_tensor(v) else v == want[k], k


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("info", optim_db.OPTIM_DB, ids=lambda i: i.name)
def test_foreach_differentiable_without_grads_raises_as_torch(info, backend):
    """No param has a grad: torch's Adagrad still runs _multi_tensor_adagrad
    (which raises first thing); the others return before their check."""
    skip_unless_runnable(backend)
    outcomes = []
    for make in (info.record.torch_cls, functools.partial(info.cls, backend=backend)):
        p = _p(4)
        opt = make([p], foreach=True, differentiable=True, **info.example)
        outcomes.append(_outcome(opt.step))
        assert p.grad is None and torch.equal(opt.state[p].get("step", torch.tensor(0.)),
                                              torch.tensor(0.))
    assert outcomes[0] == outcomes[1]


def test_unknown_backend_is_refused():
    with pytest.raises(ValueError, match="expected one of auto, numba, triton, torch"):
        fused_optim.SGD([_p()], backend="cuda")


def test_unknown_backend_in_environment_is_refused(monkeypatch):
    monkeypatch.setenv("FUSED_OPTIM_BACKEND", "fastest")
    with pytest.raises(ValueError, match="FUSED_OPTIM_BACKEND"):
        fused_optim.Adam([_p()])


def test_numba_backend_refuses_other_devices_with_a_fix():
    p = torch.empty(3, device="meta", requires_grad=True)
    opt = fused_optim.SGD([p], lr=0.1, backend="numba")
    p.grad = torch.empty(3, device="meta")
    with pytest.raises(RuntimeError, match="runs on CPU tensors.*backend='auto'"):
        opt.step()


def test_triton_backend_without_interpreter_says_how_to_fix(monkeypatch):
    pytest.importorskip("triton")
    if torch.cuda.is_available():
        pytest.skip("CUDA present: triton runs")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    p = _p()
    opt = fused_optim.SGD([p], lr=0.1, backend="triton")
    p.grad = torch.ones(3)
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        opt.step()
    assert torch.equal(p.grad, torch.ones(3))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("info", optim_db.OPTIM_DB, ids=lambda i: i.name)
def test_wrong_shaped_loaded_state_loads_and_the_step_raises_like_torch(info, backend):
    """torch.optim loads any shapes; its step then raises. So do we, writing nothing."""
    skip_unless_runnable(backend)
    name, kw = info.name, info.state_config
    src = [_p(4), _p(2, 3)]
    donor = info.record.torch_cls(src, **kw)
    for p in src:
        p.grad = torch.ones_like(p)
    donor.step()
    sd = donor.state_dict()

    def scenario(side):
        # a checkpoint whose second param is (3, 2): same numel, wrong shape
        params = [side.randn(4).requires_grad_(), side.randn(3, 2).requires_grad_()]
        opt = side.make(name, params, **kw)
        opt.load_state_dict(copy.deepcopy(sd))
        for p in params:
            p.grad = torch.ones_like(p)
        side.step(opt)

    log = assert_same(scenario, backend)
    assert log[-1][0] == "raise"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name,key", [pytest.param(info.name, key, id=f"{info.name}-{key}")
                                      for info in optim_db.OPTIM_DB for key in info.state_keys])
def test_wrong_shaped_state_never_reaches_a_kernel(name, key, backend):
    skip_unless_runnable(backend)
    kw = optim_db.get(name).state_config

    def scenario(side):
        params = [side.randn(5).requires_grad_(), side.randn(4).requires_grad_()]
        opt = side.make(name, params, **kw)
        for k in range(3):  # the second step runs from a cached plan
            for p in params:
                p.grad = torch.ones_like(p)
            if k == 2:
                opt.state[params[1]][key] = torch.zeros(2)  # smaller than the param
            side.step(opt)

    log = assert_same(scenario, backend)
    assert log[-1][0] == "raise"


# ----------------------------------------------- one optimizer's own errors


@pytest.mark.parametrize("backend", BACKENDS)
def test_adagrad_zero_denominator_raises_like_torch_and_changes_nothing(backend):
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


@pytest.mark.parametrize("backend", BACKENDS)
def test_rmsprop_momentum_switched_on_later_raises_torchs_key_error(backend):
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
