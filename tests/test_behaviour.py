"""The rest of torch.optim's contract: repr, copies, closures, hooks, groups,
frozen and swapped params, sparse grads, per-parameter step counts."""

import copy
import pickle

import pytest
import torch

import fused_optim
import optim_db
from matrix import (BACKENDS, TOLERANCE, assert_state_close, clone_params,
                    skip_unless_runnable)
from sides import outcome as _outcome

NAMES = list(optim_db.names())
#: each optimizer with every state key in play
KW = {info.name: info.full_state_example for info in optim_db.OPTIM_DB}


def _pair(name, n=3, backend="numba", **extra):
    torch.manual_seed(0)
    ref_params = [torch.randn(4, 3).requires_grad_() for _ in range(n)]
    params = clone_params(ref_params)
    info = optim_db.get(name)
    ref = info.oracle(ref_params, **KW[name], **extra)
    opt = info.cls(params, backend=backend, **KW[name], **extra)
    return ref, opt, ref_params, params


def _grads(ref_params, params, seed):
    gen = torch.Generator().manual_seed(seed)
    for a, b in zip(ref_params, params):
        g = torch.randn(a.shape, generator=gen, dtype=a.dtype)
        a.grad, b.grad = g.clone(), g.clone()


@pytest.mark.parametrize("name", NAMES)
def test_repr_and_defaults_match_torch(name):
    ref, opt, *_ = _pair(name)
    assert repr(opt).replace(name, "X", 1) == repr(ref).replace(name, "X", 1).replace(
        "foreach: False", "foreach: None")
    assert set(opt.defaults) == set(ref.defaults)
    assert isinstance(opt, torch.optim.Optimizer)


@pytest.mark.parametrize("name", NAMES)
def test_deepcopy_and_pickle_continue_identically(name):
    _, opt, _, params = _pair(name)
    _grads(params, params, 0)
    opt.step()
    clone = copy.deepcopy(opt)
    assert clone.backend == opt.backend
    cparams = [p for g in clone.param_groups for p in g["params"]]
    for p, c in zip(params, cparams):
        assert p.data_ptr() != c.data_ptr()
    _grads(params, cparams, 1)
    opt.step()
    clone.step()
    for p, c in zip(params, cparams):
        torch.testing.assert_close(c, p)
    restored = pickle.loads(pickle.dumps(opt))
    assert restored.backend == opt.backend and len(restored.state) == len(opt.state)


@pytest.mark.parametrize("name", NAMES)
def test_closure_hooks_and_zero_grad(name):
    _, opt, _, params = _pair(name)
    calls = []
    opt.register_step_pre_hook(lambda o, a, k: calls.append("pre"))
    opt.register_step_post_hook(lambda o, a, k: calls.append("post"))

    def closure():
        opt.zero_grad()
        loss = sum((p ** 2).sum() for p in params)
        loss.backward()
        return loss

    loss = opt.step(closure)
    assert torch.is_tensor(loss) and calls == ["pre", "post"]
    opt.zero_grad()
    assert all(p.grad is None for p in params)


@pytest.mark.parametrize("name", NAMES)
def test_step_hooks_run_as_torchs(name):
    """Global and per-optimizer hooks, in torch's order, arguments replaceable."""
    from torch.optim.optimizer import (register_optimizer_step_post_hook,
                                       register_optimizer_step_pre_hook)

    def run(opt, params):
        calls = []
        handles = [
            register_optimizer_step_pre_hook(lambda o, a, k: calls.append("global pre")),
            register_optimizer_step_post_hook(lambda o, a, k: calls.append("global post")),
            opt.register_step_pre_hook(lambda o, a, k: calls.append(("pre", a[1:], sorted(k)))),
            opt.register_step_post_hook(lambda o, a, k: calls.append(("post", a[1:], sorted(k)))),
        ]

        def closure():
            calls.append("closure")
            return torch.tensor(1.0)

        swap = opt.register_step_pre_hook(lambda o, a, k: ((o,), {"closure": closure}))
        try:
            _grads(params, params, 0)
            loss = opt.step()
        finally:
            for h in handles + [swap]:
                h.remove()
        return calls, loss

    ref, opt, ref_params, params = _pair(name)
    expected, ref_loss = run(ref, ref_params)
    got, loss = run(opt, params)
    assert got == expected and loss == ref_loss
    bad = opt.register_step_pre_hook(lambda o, a, k: "not a tuple")
    ref_bad = ref.register_step_pre_hook(lambda o, a, k: "not a tuple")
    with pytest.raises(RuntimeError) as ours:
        opt.step()
    with pytest.raises(RuntimeError) as theirs:
        ref.step()
    bad.remove()
    ref_bad.remove()
    # the message names the wrapped step function, whose address differs
    assert str(ours.value).split(" must ")[1] == str(theirs.value).split(" must ")[1]


@pytest.mark.parametrize("name", NAMES)
def test_profiler_sees_the_step(name):
    _, opt, _, params = _pair(name)
    _grads(params, params, 0)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        opt.step()
    assert f"Optimizer.step#{name}.step" in {e.name for e in prof.events()}


@pytest.mark.parametrize("name", NAMES)
def test_a_cached_step_is_a_short_read(name):
    """One step on a cached plan, from the hook wrapper to the kernel launch
    and the reuse rule, runs at most 8 of the project's frames deep across
    at most 4 files (issue 25: 17 deep across 5 files before; counted as
    benchmarks/step_frames.py counts). A newcomer reads that chain to follow
    a step; a new layer on it fails here."""
    import os
    import sys

    roots = tuple(os.path.dirname(m.__file__) + os.sep
                  for m in (fused_optim, fused_optim.kernels))
    ref, opt, ref_params, params = _pair(name)
    for s in range(3):
        _grads(ref_params, params, s)
        opt.step()
    stack, deepest = [], []

    def profile(frame, event, arg):
        if event == "call" and frame.f_code.co_filename.startswith(roots):
            stack.append(frame.f_code)
            if len(stack) > len(deepest):
                deepest[:] = stack
        elif event == "return" and stack and frame.f_code is stack[-1]:
            stack.pop()

    sys.setprofile(profile)
    try:
        opt.step()
    finally:
        sys.setprofile(None)
    chain = [f"{os.path.basename(c.co_filename)}:{c.co_name}" for c in deepest]
    assert chain[0].endswith(":wrapper") and ":step" in chain[1], chain
    assert len(chain) <= 8, chain
    assert len({c.co_filename for c in deepest}) <= 4, chain


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", NAMES)
def test_backward_through_a_stepped_param_raises_as_torch(name, backend):
    """The kernels' raw writes count as in-place updates for autograd, as
    torch's for-loop's do: a graph that saved a param before step() cannot
    be backpropagated through silently with the new values."""
    skip_unless_runnable(backend)
    ref, opt, ref_params, params = _pair(name, backend=backend)
    errors = []
    for o, ps in ((ref, ref_params), (opt, params)):
        loss = (ps[0] * ps[0]).sum()  # saves ps[0] for backward
        _grads(ps, ps, 0)
        o.step()
        with pytest.raises(RuntimeError) as err:
            loss.backward()
        errors.append(str(err.value).split(";")[0].split(" is at version")[0])
    assert errors[0] == errors[1]
    assert "modified by an inplace operation" in errors[1]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", NAMES)
def test_add_param_group_gets_its_own_step_count(name, backend):
    skip_unless_runnable(backend)
    ref, opt, ref_params, params = _pair(name, backend=backend)
    for s in range(2):
        _grads(ref_params, params, s)
        ref.step()
        opt.step()
    extra_ref = torch.randn(7).requires_grad_()
    extra = extra_ref.detach().clone().requires_grad_()
    ref.add_param_group({"params": [extra_ref], "lr": 0.003})
    opt.add_param_group({"params": [extra], "lr": 0.003})
    assert opt.param_groups[1].keys() == ref.param_groups[1].keys()
    for s in range(2, 5):
        _grads(ref_params + [extra_ref], params + [extra], s)
        ref.step()
        opt.step()
    assert_state_close(ref, opt, ref_params + [extra_ref], params + [extra],
                       **TOLERANCE[torch.float32])
    if optim_db.get(name).has_step:
        assert float(opt.state[extra]["step"]) == 3 and float(opt.state[params[0]]["step"]) == 5


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", NAMES)
def test_frozen_params_and_groups_without_grads(name, backend):
    skip_unless_runnable(backend)
    ref, opt, ref_params, params = _pair(name, n=4, backend=backend)
    ref.add_param_group({"params": [torch.randn(2).requires_grad_()]})
    frozen = torch.randn(2).requires_grad_()
    opt.add_param_group({"params": [frozen]})
    before = frozen.detach().clone()
    for s in range(3):
        _grads(ref_params, params, s)
        ref_params[2].grad = params[2].grad = None  # a frozen layer
        ref.step()
        opt.step()
    # no state for a frozen param, unless torch's constructor made it (Adagrad's)
    assert (params[2] in opt.state) == (ref_params[2] in ref.state)
    assert torch.equal(frozen.detach(), before)
    assert_state_close(ref, opt, ref_params, params, **TOLERANCE[torch.float32])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", NAMES)
def test_p_data_swapped_between_steps(name, backend):
    skip_unless_runnable(backend)
    ref, opt, ref_params, params = _pair(name, backend=backend)
    for s in range(4):
        if s == 2:
            # a new storage behind the same Parameter: no stale address may be used
            new = torch.randn(4, 3)
            ref_params[1].data = new.clone()
            params[1].data = new.clone()
            new_t = torch.randn(3, 4).t()  # also a non-contiguous one
            ref_params[0].data = new_t.clone()
            params[0].data = new_t.clone()
        _grads(ref_params, params, s)
        ref.step()
        opt.step()
    assert_state_close(ref, opt, ref_params, params, **TOLERANCE[torch.float32])


def _no_grad(fn, *args):
    with torch.no_grad():
        return fn(*args)


def _first_state(name):
    return optim_db.get(name).state_keys[0]


#: Changes made in place to a tensor the cached plan validated, after two
#: steps: the next step must see them exactly as torch's does.
TAMPERING = {
    "state transposed": lambda opt, ps, name: opt.state[ps[0]][_first_state(name)].t_(),
    "state resized": lambda opt, ps, name: opt.state[ps[0]][_first_state(name)].resize_(2, 2),
    "state zeroed": lambda opt, ps, name: opt.state[ps[0]][_first_state(name)].zero_(),
    "state replaced": lambda opt, ps, name: opt.state[ps[0]].__setitem__(
        _first_state(name), torch.ones(4, 4)),
    "state view swapped in": lambda opt, ps, name: setattr(
        opt.state[ps[0]][_first_state(name)], "data",
        opt.state[ps[0]][_first_state(name)].data[1:]),
    "param transposed view": lambda opt, ps, name: setattr(ps[0], "data", ps[0].data.t()),
    "param as_strided_": lambda opt, ps, name: _no_grad(ps[0].as_strided_, (4, 4), (1, 4)),
    "step counter reset": lambda opt, ps, name: opt.state[ps[0]]["step"].fill_(0),
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("change", list(TAMPERING))
def test_in_place_changes_after_caching_are_seen(change, name, backend):
    """Changes that keep a tensor's address send the step back to full
    validation: the same result as torch's, or an error where torch errs,
    and then nothing is written."""
    skip_unless_runnable(backend)
    if change == "step counter reset" and not optim_db.get(name).has_step:
        pytest.skip(f"{name} keeps no step counter")
    torch.manual_seed(0)
    ref_params = [torch.randn(4, 4).requires_grad_() for _ in range(3)]
    params = clone_params(ref_params)
    ref = optim_db.get(name).oracle(ref_params, **KW[name])
    opt = optim_db.get(name).cls(params, backend=backend, **KW[name])
    for s in range(2):
        _grads(ref_params, params, s)
        ref.step()
        opt.step()
    TAMPERING[change](ref, ref_params, name)
    TAMPERING[change](opt, params, name)
    _grads(ref_params, params, 2)
    before = [p.detach().clone() for p in params]
    expected = _outcome(ref.step)
    got = _outcome(opt.step)
    if expected == (None, None):  # no exception
        assert got == (None, None), got
        assert_state_close(ref, opt, ref_params, params, **TOLERANCE[torch.float32])
    else:
        assert got[0] is not None and issubclass(got[0], RuntimeError), got
        for p, b in zip(params, before):
            assert torch.equal(p.detach(), b)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kwargs", [dict(lr=0.1), dict(lr=0.1, momentum=0.9, dampening=0.2),
                                    dict(lr=0.1, weight_decay=0.01)],
                         ids=["plain", "momentum", "weight_decay"])
def test_sgd_sparse_grads_give_torchs_result(kwargs, backend):
    skip_unless_runnable(backend)
    torch.manual_seed(0)
    emb_ref = torch.nn.Embedding(10, 3, sparse=True)
    emb = copy.deepcopy(emb_ref)
    ref = torch.optim.SGD(emb_ref.parameters(), foreach=False, **kwargs)
    opt = fused_optim.SGD(emb.parameters(), backend=backend, **kwargs)
    for s in range(3):
        idx = torch.tensor([s, 4, 7])
        outcomes = []
        for m, o in ((emb_ref, ref), (emb, opt)):
            o.zero_grad()
            m(idx).sum().backward()
            outcomes.append(_outcome(o.step))
        # torch refuses sparse grads with weight decay; the same error is its result
        assert outcomes[0] == outcomes[1]
    torch.testing.assert_close(emb.weight, emb_ref.weight)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", [i.name for i in optim_db.with_capability("has_step")])
def test_default_dtype_float64_keeps_float64_steps(name, backend):
    skip_unless_runnable(backend)
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        ref, opt, ref_params, params = _pair(name, backend=backend)
        for s in range(3):
            _grads(ref_params, params, s)
            ref.step()
            opt.step()
        assert opt.state[params[0]]["step"].dtype == torch.float64
        assert_state_close(ref, opt, ref_params, params, **TOLERANCE[torch.float64])
    finally:
        torch.set_default_dtype(old)


@pytest.mark.parametrize("name", NAMES)
def test_differentiable_runs_torchs_step(name):
    ref, opt, ref_params, params = _pair(name, differentiable=True)
    _grads(ref_params, params, 0)
    # torch's differentiable step refuses in-place updates of leaves that
    # require grad; the same refusal (or the same result) is parity
    assert _outcome(opt.step) == _outcome(ref.step)
    with torch.no_grad():
        for p in ref_params + params:
            p.requires_grad_(False)
    ref.step()
    opt.step()
    assert_state_close(ref, opt, ref_params, params, **TOLERANCE[torch.float32])


def test_backend_is_an_attribute_not_a_group_key(monkeypatch):
    monkeypatch.setenv("FUSED_OPTIM_BACKEND", "torch")
    opt = fused_optim.SGD([torch.randn(2).requires_grad_()], lr=0.1)
    assert opt.backend == "torch"
    assert "backend" not in opt.param_groups[0] and "backend" not in opt.defaults
    assert fused_optim.SGD([torch.randn(2).requires_grad_()], backend="numba").backend == "numba"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("info", optim_db.OPTIM_DB, ids=optim_db.names())
def test_option_switched_on_mid_training_creates_only_torchs_state(info, backend):
    """The options that bring more state (``state_config``) switched on after
    a step, when a new param joins in the same step: torch's loop creates the
    new param's state only if no earlier param raised its KeyError first."""
    skip_unless_runnable(backend)
    extra = {k: v for k, v in info.state_config.items() if k not in info.example}
    outcomes = []
    for make in (lambda ps, kw: info.oracle(ps, **kw),
                 lambda ps, kw: info.cls(ps, backend=backend, **kw)):
        a, b = torch.nn.Parameter(torch.ones(3)), torch.nn.Parameter(torch.ones(3))
        opt = make([a, b], dict(info.example))
        a.grad = torch.full((3,), 0.5)
        opt.step()
        opt.param_groups[0].update(extra)
        b.grad = torch.full((3,), 0.25)
        try:
            opt.step()
            error = None
        except KeyError as err:
            error = repr(err)
        outcomes.append((error, sorted(opt.state[b]), a.detach().clone(), b.detach().clone()))
    (err, keys, a_ref, b_ref), (err2, keys2, a_got, b_got) = outcomes
    assert (err2, keys2) == (err, keys)
    torch.testing.assert_close(a_got, a_ref, **TOLERANCE[torch.float32])
    torch.testing.assert_close(b_got, b_ref, **TOLERANCE[torch.float32])


# ------------------------------------------ Tensor lr, Adagrad's sparse rows
# (a Tensor lr of each dtype on every optimizer; Adagrad's sparse grads, whose
# rows run torch's own loop)


#: torch's for-loop computes a Tensor lr's step size in the lr's dtype
#: (``lr / (1 + (step - 1) * lr_decay)``, Adam's ``lr / bias_correction1``,
#: AdamW's ``1 - lr * weight_decay``: a 0-dim Tensor stays one through that
#: arithmetic, rounded to float16/bfloat16 there) and reads the result as a scalar
_LR_DTYPES = [torch.float16, torch.bfloat16, torch.float32, torch.float64, None]
_LR_CONFIGS = [("Adagrad", dict(lr_decay=0.3, weight_decay=0.1)),
               ("Adam", dict(amsgrad=True, weight_decay=0.1)),
               ("AdamW", dict(weight_decay=0.5)),
               ("RMSprop", dict(momentum=0.9, centered=True)),
               ("SGD", dict(momentum=0.9, weight_decay=0.1))]


def _lr_backends():
    for backend in BACKENDS:
        yield backend
        if backend == "triton":
            yield "triton-host-steps"


@pytest.mark.parametrize("backend", list(_lr_backends()))
@pytest.mark.parametrize("lr_dtype", _LR_DTYPES, ids=lambda d: str(d or "float"))
@pytest.mark.parametrize("name,kw", _LR_CONFIGS, ids=[c[0] for c in _LR_CONFIGS])
def test_tensor_lr_of_any_dtype_steps_as_torch(name, kw, lr_dtype, backend, monkeypatch):
    """fp32 and fp64 params, with a Tensor lr of each dtype (and a float):
    the step size rounds as torch's for-loop rounds it (a float16/bfloat16
    lr's clr drifted about 1e-4 from torch's with float64 math)."""
    if backend == "triton-host-steps":
        skip_unless_runnable("triton")
        from fused_optim.kernels.triton import _launch
        monkeypatch.setattr(_launch, "_steps_on_device", lambda batch: False)
        backend = "triton"
    skip_unless_runnable(backend)
    gen = torch.Generator().manual_seed(5)
    init = [torch.randn(300, generator=gen), torch.randn(7, generator=gen).double()]
    ref_params = [p.clone().requires_grad_() for p in init]
    params = [p.clone().requires_grad_() for p in init]

    def lr():
        return 0.5 if lr_dtype is None else torch.tensor(0.5, dtype=lr_dtype)

    torch_cls, cls = getattr(torch.optim, name), getattr(fused_optim, name)
    ref = torch_cls(ref_params, lr=lr(), foreach=False, **kw)
    opt = cls(params, lr=lr(), backend=backend, **kw)
    for _ in range(5):
        for rp, p in zip(ref_params, params):
            g = torch.randn(rp.shape, generator=gen, dtype=rp.dtype)
            rp.grad, p.grad = g.clone(), g.clone()
        ref.step()
        opt.step()
        for rp, p in zip(ref_params, params):
            torch.testing.assert_close(p, rp, **TOLERANCE[p.dtype])
    assert_state_close(ref, opt, ref_params, params, **TOLERANCE[torch.float32])


def _sparse(p, idx, vals):
    return torch.sparse_coo_tensor(torch.tensor([idx]), torch.tensor(vals, dtype=p.dtype),
                                   p.shape)


@pytest.mark.parametrize("backend", BACKENDS)
def test_adagrad_sparse_grad_rows_run_torchs_loop(backend):
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
