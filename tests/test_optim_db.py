"""tests/optim_db.py covers exactly the registered optimizers, and its
entries are well formed: a registered optimizer without test data fails
here, loudly, instead of silently going untested."""

import pytest
import torch

import optim_db
from fused_optim import _registry


def test_every_registered_optimizer_has_an_optim_info_and_vice_versa():
    registered, described = set(_registry.names()), set(optim_db.names())
    assert registered - described == set(), (
        f"registered in fused_optim but without an OptimInfo in tests/optim_db.py: "
        f"{sorted(registered - described)}")
    assert described - registered == set(), (
        f"OptimInfo in tests/optim_db.py without a fused_optim record: "
        f"{sorted(described - registered)}")
    assert len(optim_db.names()) == len(described), "two OptimInfo entries share a name"


@pytest.mark.parametrize("info", optim_db.OPTIM_DB, ids=lambda i: i.name)
def test_optim_info_is_well_formed(info):
    assert info.record.name == info.name
    assert info.configs, "an optimizer needs configurations"
    assert "lr" in info.example
    assert info.sparse_grads in ("error", "torch-path")
    assert set(info.lazy_state) <= set(info.state_keys)
    assert all(dt.is_floating_point for dt in info.bit_exact)
    for e in info.all_error_inputs():
        assert e.error_on in (optim_db.CONSTRUCT, optim_db.STEP), e.desc
        assert issubclass(e.error_type, BaseException) and e.error_regex, e.desc
    descs = [e.desc for e in info.all_error_inputs()]
    assert len(descs) == len(set(descs)), "error inputs need distinct descriptions"
    common = {e.desc for e in optim_db.COMMON_ERROR_INPUTS}
    assert set(info.skip_common_errors) <= common, "skip_common_errors names no common input"
    module, names = info.torch_step_functions()
    for n in names:
        assert hasattr(module, n), (module.__name__, n)
    assert issubclass(info.cls, torch.optim.Optimizer)


@pytest.mark.parametrize("info", optim_db.OPTIM_DB, ids=lambda i: i.name)
def test_state_config_creates_every_state_key(info):
    p = torch.randn(4).requires_grad_()
    opt = info.oracle([p], **info.full_state_example)
    p.grad = torch.randn(4)
    opt.step()
    assert set(info.state_keys) <= set(opt.state[p]), (info.state_keys, set(opt.state[p]))
    assert ("step" in opt.state[p]) == info.has_step
