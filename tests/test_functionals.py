"""The public functionals (``fused_optim.sgd.sgd``, ``adam.adam``, ...): torch's
signatures, and torch's results when torch's own class drives them.

Parametrized over the optimizer registry, so every optimizer added there is
checked with no edit here.
"""

import importlib
import inspect

import pytest
import torch

import fused_optim
from fused_optim import _registry

import matrix

RECORDS = [pytest.param(r, id=r.name) for r in _registry.records()]


def _torch_functional(record):
    return getattr(importlib.import_module(record.torch_module), record.functional)


def _shape(sig):
    return [(p.name, p.kind, p.default) for p in sig.parameters.values()]


@pytest.mark.parametrize("record", RECORDS)
def test_signature_is_torchs_plus_backend(record):
    ours = inspect.signature(record.function)
    theirs = inspect.signature(_torch_functional(record))
    *same, backend = _shape(ours)
    assert same == _shape(theirs)
    assert backend == ("backend", inspect.Parameter.KEYWORD_ONLY, None)


@pytest.mark.parametrize("record", RECORDS)
def test_functionals_live_in_their_modules_as_torchs(record):
    """``from fused_optim.<module> import <functional>``, as from torch.optim's
    module; the package exports the class only, so ``fused_optim.sgd`` is
    the module and never also a function (issue 25)."""
    module = importlib.import_module(f"fused_optim.{record.module}")
    assert getattr(module, record.functional) is record.function
    assert record.functional not in fused_optim.__all__ and record.name in fused_optim.__all__
    attr = getattr(fused_optim, record.functional, None)
    assert attr is None or inspect.ismodule(attr)
    assert inspect.ismodule(getattr(fused_optim, record.module))


@pytest.mark.parametrize("record", RECORDS)
def test_class_signature_is_torchs_plus_our_keywords(record):
    """torch's constructor, then the keyword-only ``backend``, ``kahan_sum``,
    ``stochastic_round`` and ``state_dtype`` (off by default), and for Adam
    and AdamW ``state_bits`` last (off by default). SGD also takes Adam's
    keyword-only ``capturable`` (a CUDA-graph step), which torch's SGD
    lacks."""
    ours = _shape(inspect.signature(record.cls.__init__))
    theirs = _shape(inspect.signature(record.torch_cls.__init__))
    kw = inspect.Parameter.KEYWORD_ONLY
    if record.kernel == "adam":
        assert ours[-1] == ("state_bits", kw, None)
        ours = ours[:-1]
    assert [x for x in ours[:-4] if x in theirs] == theirs
    assert [x for x in ours[:-4] if x not in theirs] in ([], [("capturable", kw, False)])
    assert ours[-4:] == [("backend", kw, None), ("kahan_sum", kw, False),
                         ("stochastic_round", kw, False), ("state_dtype", kw, None)]


@pytest.mark.parametrize("backend", ["numba", "triton", "torch"])
@pytest.mark.parametrize("record", RECORDS)
def test_torchs_class_driving_our_functional_gets_torchs_results(record, backend,
                                                                 monkeypatch):
    """torch's class with its step's functional replaced by ours.

    torch's ``step`` calls the functional of the module that defines it
    (AdamW's is Adam's ``adam``), with every argument it has: ours must take
    them all and do what torch's does.
    """
    matrix.skip_unless_runnable(backend)
    step_module = importlib.import_module(record.torch_cls.step.__module__)
    name = step_module.__name__.rsplit(".", 1)[-1]
    ours = getattr(importlib.import_module(f"fused_optim.{name}"), name)
    calls = []

    def through_ours(*args, **kwargs):
        calls.append(1)
        return ours(*args, **kwargs, backend=backend)

    gen = torch.Generator().manual_seed(0)
    params = [torch.randn(5, 3, generator=gen), torch.randn(7, generator=gen)]
    ref = [p.clone().requires_grad_() for p in params]
    mine = [p.clone().requires_grad_() for p in params]
    ref_opt = record.torch_cls(ref, lr=0.01, foreach=False)
    opt = record.torch_cls(mine, lr=0.01, foreach=False)
    for _ in range(3):
        for a, b in zip(ref, mine):
            g = torch.randn(a.shape, generator=gen)
            a.grad, b.grad = g.clone(), g.clone()
        ref_opt.step()
        with monkeypatch.context() as m:
            m.setattr(step_module, name, through_ours)
            opt.step()
    assert calls == [1, 1, 1]
    tol = matrix.TOLERANCE[torch.float32]
    for a, b in zip(ref, mine):
        torch.testing.assert_close(b, a, **tol)
    for a, b in zip(ref, mine):
        for key, value in ref_opt.state[a].items():
            torch.testing.assert_close(opt.state[b][key], value, **tol)


# ------------------------------------------------------ Adagrad's constructor
# (stricter than the general class-signature test for Adagrad)


def _p(*shape):
    return torch.randn(*shape or (3,)).requires_grad_()


def test_adagrad_constructor_signature_defaults_and_state_are_torchs():
    """Exactly torch's parameters (the general test above also lets a class
    add a keyword-only ``capturable``, as SGD does), and torch's state
    made at construction."""
    ours = inspect.signature(fused_optim.Adagrad.__init__).parameters
    theirs = inspect.signature(torch.optim.Adagrad.__init__).parameters
    assert list(ours)[:-4] == list(theirs)
    assert list(ours)[-4:] == ["backend", "kahan_sum", "stochastic_round", "state_dtype"]
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
