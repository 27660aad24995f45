"""Backends as modules with a declared contract (kernels/contract.py), and
_backend.can_run/why_not as the one answer to "can it run there"."""

import itertools

import pytest
import torch

from fused_optim import _backend, _registry
from fused_optim.kernels import contract

NAMED = [b for b in _backend.BACKENDS if b != "auto"]
DTYPES = [torch.float64, torch.float32, torch.bfloat16, torch.float16, torch.complex64]
DEVICES = ["cpu", "meta", "cuda", "cuda:1"]

@pytest.mark.parametrize("name", NAMED)
def test_every_backend_module_keeps_the_contract(name):
    mod = _backend.module(name)
    kernels = tuple(dict.fromkeys(r.kernel for r in _registry.records()))
    assert contract.problems(mod, kernels) == []
    assert isinstance(mod, contract.Backend)
    assert mod.NAME == name
    # what is read without importing is what the module says once imported
    assert _backend.declared(name) == {k: getattr(mod, k) for k in contract.LITERALS}

def test_a_module_that_breaks_the_contract_is_told_how():
    class Broken:
        NAME = "broken"
        DEVICES = "cpu"

        @staticmethod
        def sgd(batch, lr):
            pass

    found = contract.problems(Broken)
    assert "no SUPPORTED_DTYPES" in found and "no kernel adam" in found
    assert "DEVICES is not a tuple of str or None" in found
    assert any(p.startswith("sgd(batch, lr) is not") for p in found)

@pytest.mark.parametrize("interpret", ["0", "1"])
def test_can_run_agrees_with_select(interpret, monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", interpret)
    for name, device, dtype in itertools.product(_backend.BACKENDS, DEVICES, DTYPES):
        device = torch.device(device)
        why = _backend.why_not(name, device, dtype)
        assert _backend.can_run(name, device, dtype) == (why is None)
        try:
            mod = _backend.select(name, device, dtype)
        except RuntimeError as err:
            assert str(err) == why, (name, device, dtype)
        else:
            assert why is None, (name, device, dtype)
            if name != "auto":
                assert mod is _backend.module(name)

def test_auto_picks_as_before():
    def pick(device, dtype):
        return _backend.select("auto", torch.device(device), dtype).NAME

    assert pick("cpu", torch.float32) == "numba"
    assert pick("cuda", torch.bfloat16) == "triton"
    assert pick("cpu", torch.complex64) == "torch"
    assert pick("cuda", torch.complex64) == "torch"
    assert pick("meta", torch.float32) == "torch"

def test_select_messages_are_unchanged(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert _backend.why_not("numba", "meta") == (
        "backend='numba' runs on CPU tensors, but got a parameter on meta. "
        "Use backend='triton' or backend='auto' for meta tensors.")
    assert _backend.why_not("triton", "cpu") == (
        "backend='triton' needs CUDA tensors, but got a parameter on cpu. "
        "Move the model to CUDA, use backend='numba' or 'auto' for CPU tensors, "
        "or set TRITON_INTERPRET=1 to run the Triton kernels on CPU (slowly).")
    assert _backend.why_not("numba", "cpu", torch.complex64) == (
        "backend='numba' does not support torch.complex64 parameters (it supports "
        "float64, float32, bfloat16, float16). Use backend='torch' for them.")
    assert _backend.declared("numba")["INSTALL_HINT"] == "pip install numba"
    assert _backend.declared("triton")["INSTALL_HINT"] == (
        "pip install 'fused_optim[gpu]' (or pip install triton)")

def test_the_interpreter_runs_triton_on_cpu_only_when_asked_by_name(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert _backend.can_run("triton", "cpu", torch.float32)
    assert not _backend.can_run("triton", "cpu", torch.float32, interpreted=False)
    assert not _backend.can_run("triton", "meta", torch.float32)


def test_setting_backend_between_steps_is_seen_by_the_cached_plan():
    """A plan keeps the modules and kernels of the backend it was built for;
    an ``opt.backend`` set between steps must not reuse it (it did: the
    numba kernel kept running after ``opt.backend = "torch"``)."""
    import copy

    import fused_optim

    torch.manual_seed(0)
    p = torch.nn.Parameter(torch.randn(8))
    opt = fused_optim.SGD([p], lr=0.1, momentum=0.9, backend="numba")
    for _ in range(2):
        p.grad = torch.randn(8)
        opt.step()
    assert opt._plans[0].units[0].module.NAME == "numba"
    q = torch.nn.Parameter(p.detach().clone())
    ref = torch.optim.SGD([q], lr=0.1, momentum=0.9)
    ref.load_state_dict(copy.deepcopy(opt.state_dict()))
    opt.backend = "torch"
    p.grad = torch.randn(8)
    q.grad = p.grad.clone()
    opt.step()
    ref.step()
    assert opt._plans[0].units[0].module.NAME == "torch"
    torch.testing.assert_close(p, q)
