"""Bad input gets torch's exception type and message, and corrupts nothing.

BAD_CONSTRUCTION and BAD_STEP are tables: each row builds the same bad input
for torch.optim.<name> and fused_optim.<name>; both must raise alike.
"""

import copy

import pytest
import torch

import fused_optim
from matrix import BACKENDS, skip_unless_runnable
from sides import assert_same


def _p(*shape):
    return torch.randn(*shape or (3,)).requires_grad_()


def _nonleaf():
    return torch.randn(3, requires_grad=True) * 2


# (optimizer, params factory, kwargs factory)
BAD_CONSTRUCTION = {
    "negative lr": ("SGD", lambda: [_p()], lambda: dict(lr=-0.1)),
    "negative momentum": ("SGD", lambda: [_p()], lambda: dict(momentum=-0.5)),
    "negative weight_decay": ("SGD", lambda: [_p()], lambda: dict(weight_decay=-1e-4)),
    "nesterov without momentum": ("SGD", lambda: [_p()], lambda: dict(nesterov=True)),
    "nesterov with dampening": ("SGD", lambda: [_p()], lambda: dict(momentum=0.9, dampening=0.1, nesterov=True)),
    "2-element Tensor lr": ("SGD", lambda: [_p()], lambda: dict(lr=torch.tensor([0.1, 0.2]))),
    "fused and differentiable": ("SGD", lambda: [_p()], lambda: dict(fused=True, differentiable=True)),
    "fused and foreach": ("SGD", lambda: [_p()], lambda: dict(fused=True, foreach=True)),
    "params as one Tensor": ("SGD", lambda: _p(), lambda: dict(lr=0.1)),
    "empty parameter list": ("SGD", lambda: [], lambda: dict(lr=0.1)),
    "non-leaf tensor": ("SGD", lambda: [_nonleaf()], lambda: dict(lr=0.1)),
    "param in two groups": ("SGD", lambda: (lambda q: [{"params": [q]}, {"params": [q]}])(_p()), lambda: dict(lr=0.1)),
    "integer tensor that requires grad": ("SGD", lambda: [torch.ones(3, dtype=torch.int64).requires_grad_()], lambda: dict(lr=0.1)),
    "group without params": ("SGD", lambda: [{"lr": 0.1}], lambda: dict()),
    "Adam negative lr": ("Adam", lambda: [_p()], lambda: dict(lr=-1.0)),
    "Adam negative eps": ("Adam", lambda: [_p()], lambda: dict(eps=-1e-8)),
    "Adam beta0 = 1": ("Adam", lambda: [_p()], lambda: dict(betas=(1.0, 0.999))),
    "Adam beta1 < 0": ("Adam", lambda: [_p()], lambda: dict(betas=(0.9, -0.1))),
    "Adam negative weight_decay": ("Adam", lambda: [_p()], lambda: dict(weight_decay=-0.1)),
    "Adam betas mixed float/Tensor": ("Adam", lambda: [_p()], lambda: dict(betas=(0.9, torch.tensor(0.99)))),
    "Adam Tensor lr with foreach": ("Adam", lambda: [_p()], lambda: dict(lr=torch.tensor(0.01), foreach=True)),
    "Adam 2-element Tensor lr": ("Adam", lambda: [_p()], lambda: dict(lr=torch.tensor([0.01, 0.02]))),
    "Adam Tensor betas with foreach": ("Adam", lambda: [_p()], lambda: dict(betas=(torch.tensor(0.9), torch.tensor(0.99)), foreach=True)),
    "Adam 2-element Tensor beta": ("Adam", lambda: [_p()], lambda: dict(betas=(torch.tensor([0.9, 0.8]), torch.tensor(0.99)))),
    "Adam fused and differentiable": ("Adam", lambda: [_p()], lambda: dict(fused=True, differentiable=True)),
    "Adam fused and foreach": ("Adam", lambda: [_p()], lambda: dict(fused=True, foreach=True)),
    "Adam empty list": ("Adam", lambda: [], lambda: dict()),
    "AdamW beta0 = 1": ("AdamW", lambda: [_p()], lambda: dict(betas=(1.0, 0.999))),
    "AdamW negative weight_decay": ("AdamW", lambda: [_p()], lambda: dict(weight_decay=-1.0)),
    "AdamW non-leaf": ("AdamW", lambda: [_nonleaf()], lambda: dict()),
}


def _outcome(fn):
    try:
        fn()
    except Exception as err:  # noqa: BLE001 - the type is what we compare
        return type(err), str(err)
    return None, None


@pytest.mark.parametrize("case", list(BAD_CONSTRUCTION))
def test_bad_construction_raises_like_torch(case):
    name, params, kwargs = BAD_CONSTRUCTION[case]
    theirs = _outcome(lambda: getattr(torch.optim, name)(params(), **kwargs()))
    ours = _outcome(lambda: getattr(fused_optim, name)(params(), **kwargs()))
    assert theirs[0] is not None, "table row does not make torch raise"
    assert ours == theirs


def _sparse_grad(p):
    idx = torch.tensor([[0, 2]])
    p.grad = torch.sparse_coo_tensor(idx, torch.tensor([1.0, -2.0]), p.shape)


def _complex_fused(p):
    p.grad = torch.ones_like(p)


# (optimizer, kwargs, param factory, grad setter): the step must raise alike
BAD_STEP = {
    "Adam sparse grad": ("Adam", {}, lambda: _p(4), _sparse_grad),
    "AdamW sparse grad": ("AdamW", {}, lambda: _p(4), _sparse_grad),
    # (interpreted Triton lets CPU tensors stand in for CUDA, where it is valid)
    "Adam capturable on CPU": ("Adam", dict(capturable=True), lambda: _p(4),
                               lambda p: setattr(p, "grad", torch.ones_like(p)),
                               ("numba", "torch")),
    "SGD fused complex": ("SGD", dict(fused=True, lr=0.1), lambda: torch.randn(3, dtype=torch.complex64).requires_grad_(), _complex_fused),
    "Adam fused complex": ("Adam", dict(fused=True), lambda: torch.randn(3, dtype=torch.complex64).requires_grad_(), _complex_fused),
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", list(BAD_STEP))
def test_bad_step_raises_like_torch_and_changes_nothing(case, backend):
    skip_unless_runnable(backend)
    name, kwargs, make_param, set_grad, *applies = BAD_STEP[case]
    if applies and backend not in applies[0]:
        pytest.skip(f"{case!r} is no error for backend {backend!r}")
    p_ref = make_param()
    p_ours = p_ref.detach().clone().requires_grad_()
    set_grad(p_ref)
    set_grad(p_ours)
    before = p_ours.detach().clone()
    theirs = _outcome(getattr(torch.optim, name)([p_ref], **kwargs).step)
    ours = _outcome(getattr(fused_optim, name)([p_ours], backend=backend, **kwargs).step)
    assert theirs[0] is not None
    assert ours == theirs
    assert torch.equal(p_ours.detach(), before)


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
@pytest.mark.parametrize("name", ["SGD", "Adam", "AdamW"])
def test_wrong_shaped_loaded_state_loads_and_the_step_raises_like_torch(name, backend):
    """torch.optim loads any shapes; its step then raises. So do we, writing nothing."""
    skip_unless_runnable(backend)
    kw = dict(momentum=0.9) if name == "SGD" else {}
    src = [_p(4), _p(2, 3)]
    donor = getattr(torch.optim, name)(src, **kw)
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
@pytest.mark.parametrize("name,key", [("SGD", "momentum_buffer"), ("Adam", "exp_avg"),
                                      ("Adam", "exp_avg_sq"), ("AdamW", "exp_avg")])
def test_wrong_shaped_state_never_reaches_a_kernel(name, key, backend):
    skip_unless_runnable(backend)
    kw = dict(momentum=0.9) if name == "SGD" else {}

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
