"""capturable=True: step counters on the device, a Tensor lr read by the
kernel, and no host synchronisation inside step().

Without a GPU this runs the Triton kernels through the interpreter on CPU
tensors, with every way of reading a tensor on the host made to raise during
step(). The CUDA graph capture itself is in tests/test_cuda.py.
"""

import inspect

import pytest
import torch

import fused_optim
import optim_db
from matrix import TOLERANCE, assert_state_close, clone_params, config_id, skip_unless_runnable

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
#: every OptimInfo config that runs on DEVICE, of every class that takes
#: capturable (fused_optim's SGD does, though torch's has no such mode;
#: Adagrad does not, like torch's), lr aside: the test drives a Tensor lr
CASES = [pytest.param(info.name, {k: v for k, v in kw.items() if k != "lr"},
                      id=config_id(info.name, kw))
         for info in optim_db.OPTIM_DB for kw in info.configs_for(DEVICE)
         if "capturable" in inspect.signature(info.cls).parameters
         and not kw.get("fused") and not any(callable(v) for v in kw.values())]


class _HostReadError(AssertionError):
    pass


def _forbid_host_reads(monkeypatch):
    def boom(self, *args, **kwargs):
        raise _HostReadError("a tensor was read on the host inside step()")

    for name in ("item", "tolist", "numpy", "__float__", "__bool__", "__int__"):
        monkeypatch.setattr(torch.Tensor, name, boom)


@pytest.mark.parametrize("name,kwargs", CASES)
def test_capturable_step_reads_nothing_on_the_host(name, kwargs, monkeypatch):
    skip_unless_runnable("triton", DEVICE)
    torch.manual_seed(0)
    ref_params = [torch.randn(40, 3, device=DEVICE).requires_grad_(),
                  torch.randn(7, device=DEVICE).requires_grad_()]
    params = clone_params(ref_params) if DEVICE == "cpu" else [
        p.detach().clone().requires_grad_() for p in ref_params]
    lr = torch.tensor(0.01, device=DEVICE)
    info = optim_db.get(name)
    ref = info.oracle(ref_params, lr=0.01, **kwargs)
    opt = info.cls(params, lr=lr, capturable=True, backend="triton", **kwargs)
    gen = torch.Generator().manual_seed(1)
    for step in range(4):
        for a, b in zip(ref_params, params):
            g = torch.randn(a.shape, generator=gen).to(DEVICE)
            a.grad, b.grad = g, g.clone()
        new_lr = 0.01 * 0.5 ** step  # a scheduler writing the device lr in place
        ref.param_groups[0]["lr"] = new_lr
        lr.fill_(new_lr)
        ref.step()
        with monkeypatch.context() as m:
            _forbid_host_reads(m)
            opt.step()
        if info.has_step:
            assert opt.state[params[0]]["step"].device == params[0].device
    assert_state_close(ref, opt, ref_params, params, **TOLERANCE[torch.float32])


def test_host_read_guard_catches_a_sync(monkeypatch):
    # the guard above must be able to fail: a non-capturable step with a
    # Tensor lr reads it on the host
    skip_unless_runnable("triton", DEVICE)
    p = torch.randn(5, device=DEVICE).requires_grad_()
    p.grad = torch.ones_like(p)
    opt = fused_optim.SGD([p], lr=torch.tensor(0.1, device=DEVICE), backend="triton")
    _forbid_host_reads(monkeypatch)
    with pytest.raises(_HostReadError):
        opt.step()
