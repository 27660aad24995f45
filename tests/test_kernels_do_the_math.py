"""Proof that the backends compute the step themselves.

The backend is forced through FUSED_OPTIM_BACKEND, torch's optimizer
functions and every ``torch._foreach_*`` / ``torch._fused_*`` op are made to
raise, and ``step()`` must still match torch's for-loop run beforehand.
"""

import pytest
import torch

import fused_optim
import optim_db
from matrix import (BACKENDS, CONFIG_PARAMS, REPRESENTATIVE_PARAMS, TOLERANCE,
                    assert_state_close, build_kwargs, clone_params, make,
                    skip_unless_runnable)


def _forbid(monkeypatch):
    def boom(*args, **kwargs):
        raise AssertionError("torch's optimizer code was called")

    # torch.optim deletes its submodule attributes; each OptimInfo names them
    for info in optim_db.OPTIM_DB:
        mod, names = info.torch_step_functions()
        for n in names:
            assert hasattr(mod, n), (mod, n)
            monkeypatch.setattr(mod, n, boom)
    forbidden = [n for n in dir(torch) if n.startswith(("_foreach_", "_fused_"))]
    assert len(forbidden) > 20
    for n in forbidden:
        monkeypatch.setattr(torch, n, boom)
    for info in optim_db.OPTIM_DB:
        monkeypatch.setattr(info.record.torch_cls, "step", boom)


#: every configuration on Numba's serial entry points (20,000 elements, under
#: its 2**15 threshold) and over it, on the parallel ones; the other backends
#: run one configuration per optimizer over it (interpreted Triton is slow)
_CASES = ([pytest.param(b, *c.values, 20_000, id=f"{c.id}-{b}")
           for b in BACKENDS for c in CONFIG_PARAMS]
          + [pytest.param(b, *c.values, 70_000, id=f"{c.id}-parallel-{b}")
             for b in BACKENDS
             for c in (CONFIG_PARAMS if b == "numba" else REPRESENTATIVE_PARAMS)])


@pytest.mark.parametrize("backend,name,kwargs,big", _CASES)
def test_step_matches_with_torch_optimizer_code_disabled(name, kwargs, big, backend,
                                                          monkeypatch):
    skip_unless_runnable(backend)
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)
    ref_params = [torch.randn(37, 5).requires_grad_(), torch.randn(big).requires_grad_(),
                  torch.randn(3, dtype=torch.bfloat16).requires_grad_()]
    params = clone_params(ref_params)
    grads = [[torch.randn(p.shape, generator=gen, dtype=p.dtype) for p in ref_params]
             for _ in range(3)]
    ref = make(name, ref_params, kwargs)
    for gs in grads:
        for p, g in zip(ref_params, gs):
            p.grad = g.clone()
        ref.step()

    monkeypatch.setenv("FUSED_OPTIM_BACKEND", backend)
    opt = optim_db.get(name).cls(params, **build_kwargs(kwargs))
    assert opt.backend == backend
    _forbid(monkeypatch)
    for gs in grads:
        for p, g in zip(params, gs):
            p.grad = g.clone()
        opt.step()
    # bf16 param included: one rounding per stored value can differ from
    # torch's several by an ulp, hence bf16's own tolerance for that one.
    assert_state_close(ref, opt, ref_params[:2], params[:2], **TOLERANCE[torch.float32])
    torch.testing.assert_close(params[2], ref_params[2], atol=2e-2, rtol=2e-2)


# ------------------------------------------------ Numba's parallel entry point


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16],
                         ids=str)
def test_adagrad_numba_parallel_equals_serial(dtype, monkeypatch):
    """The parallel kernel (blocked, prefetching walk) gives the serial one's bits."""
    skip_unless_runnable("numba")
    from fused_optim.kernels.numba import _launch

    kw = dict(lr=0.1, lr_decay=0.02, weight_decay=0.01, initial_accumulator_value=0.1)
    results = []
    for serial_below in (1 << 40, 0):
        # the launcher reads _launch's (the package's SERIAL_BELOW is a copy)
        monkeypatch.setattr(_launch, "SERIAL_BELOW", serial_below)
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
