"""Each class derives from FusedOptimizer, then from torch's own class: torch's
``__init__`` checks and defaults, ``__setstate__`` and lazy state are torch's
code, and ``isinstance(opt, torch.optim.<name>)`` holds (issue 25, item 4).

Parametrized over the optimizer registry.
"""

import copy
import pickle

import pytest
import torch

import fused_optim
from fused_optim import _base, _registry, _warmup

RECORDS = [pytest.param(r, id=r.name) for r in _registry.records()]

#: group keys torch's ``__setstate__`` fills in for checkpoints older than them
_LATER_KEYS = ("momentum", "centered", "nesterov", "amsgrad", "maximize", "foreach",
               "capturable", "differentiable", "fused", "decoupled_weight_decay")


def _params():
    gen = torch.Generator().manual_seed(0)
    return [torch.randn(4, 3, generator=gen).requires_grad_(),
            torch.randn(5, generator=gen).requires_grad_()]


@pytest.mark.parametrize("record", RECORDS)
def test_is_torchs_class_with_fused_optims_step(record):
    opt = record.cls(_params())
    assert isinstance(opt, record.torch_cls)
    mro = type(opt).__mro__
    assert mro.index(_base.FusedOptimizer) < mro.index(record.torch_cls)
    assert _warmup._own_class(opt) is record.cls


@pytest.mark.parametrize("record", RECORDS)
def test_constructed_copied_and_pickled_while_patched(record):
    """torch.optim's name is then fused_optim's class: torch's ``__init__``
    in the MRO is still torch's own (no recursion), AdamW's included."""
    params = _params()
    with fused_optim.patch_torch():
        opt = getattr(torch.optim, record.name)(params, lr=0.01)
        assert type(opt) is record.cls
        for p in params:
            p.grad = torch.ones_like(p)
        opt.step()
        for other in (copy.deepcopy(opt), pickle.loads(pickle.dumps(opt))):
            assert type(other) is record.cls
            assert other.param_groups[0].keys() == opt.param_groups[0].keys()
    ref = record.torch_cls(_params(), lr=0.01)
    assert opt.param_groups[0].keys() == ref.param_groups[0].keys()
    assert opt.defaults == ref.defaults


@pytest.mark.parametrize("record", RECORDS)
def test_old_checkpoint_gets_torchs_defaults(record):
    """A checkpoint older than torch's later group keys, with float steps:
    torch's ``__setstate__`` fills them in, and both load it alike."""
    params = _params()
    ref = record.torch_cls(params, lr=0.01)
    for p in params:
        p.grad = torch.ones_like(p)
    ref.step()
    saved = ref.state_dict()
    for group in saved["param_groups"]:
        for key in _LATER_KEYS:
            if group.get(key) in (False, None, 0):
                group.pop(key, None)
    for state in saved["state"].values():
        if "step" in state:
            state["step"] = float(state["step"])
    loaded = []
    for cls in (record.torch_cls, record.cls):
        opt = cls(_params(), lr=0.5)
        opt.load_state_dict(copy.deepcopy(saved))
        loaded.append(opt)
    theirs, ours = loaded
    assert ([{k: v for k, v in g.items() if k != "params"} for g in ours.param_groups]
            == [{k: v for k, v in g.items() if k != "params"} for g in theirs.param_groups])
    for p, q in zip(theirs.param_groups[0]["params"], ours.param_groups[0]["params"]):
        for key, value in theirs.state[p].items():
            mine = ours.state[q][key]
            if torch.is_tensor(value):
                assert (mine.dtype, mine.device) == (value.dtype, value.device), key
                assert torch.equal(mine, value), key
            else:
                assert mine == value, key


@pytest.mark.parametrize("name,switch", [("Adam", "amsgrad"), ("AdamW", "amsgrad"),
                                         ("RMSprop", "centered")])
def test_option_switched_on_raises_torchs_key_error_and_leaves_torchs_state(name, switch):
    """An option switched on mid-training: torch's loop raises KeyError at the
    old param, and never reaches the new one after it. The state left is
    torch's: no empty entry for the new param (an empty dict in state_dict())."""
    outcomes = []
    for cls in (_registry.get(name).torch_cls, _registry.get(name).cls):
        old, new = _params()
        opt = cls([old], foreach=False)
        old.grad = torch.ones_like(old)
        opt.step()
        opt.param_groups[0]["params"].append(new)
        opt.param_groups[0][switch] = True
        new.grad = torch.ones_like(new)
        with pytest.raises(KeyError) as err:
            opt.step()
        outcomes.append((str(err.value), {k: sorted(v) for k, v in
                                          opt.state_dict()["state"].items()}))
    assert outcomes[0] == outcomes[1]
