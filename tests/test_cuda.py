"""CUDA-only checks of the Triton backend (skipped without a GPU): parity in
every dtype, GradScaler on the device, a CUDA-graph capture of a whole
capturable step, and a tensor of more than 2**31 elements."""

import os

import pytest
import torch

import fused_optim
from matrix import LOW_PRECISION_SLACK, TOLERANCE, assert_state_close

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")

CASES = {
    "SGD": dict(lr=0.1, momentum=0.9, nesterov=True, weight_decay=1e-3),
    "Adam": dict(lr=0.01, amsgrad=True, weight_decay=0.01),
    "AdamW": dict(lr=0.01, weight_decay=0.1),
}


def _params(dtype, n=3):
    torch.manual_seed(0)
    shapes = [(1023,), (64, 65), (), (0,), (3, 5, 7)][:max(n, 5)]
    return [torch.randn(s, device="cuda", dtype=dtype).requires_grad_() for s in shapes]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("name", list(CASES))
def test_cuda_parity(name, dtype):
    ref_params = _params(dtype)
    params = [p.detach().clone().requires_grad_() for p in ref_params]
    shadow_params = [p.detach().double().requires_grad_() for p in ref_params]
    ref = getattr(torch.optim, name)(ref_params, foreach=False, **CASES[name])
    shadow = getattr(torch.optim, name)(shadow_params, foreach=False, **CASES[name])
    opt = getattr(fused_optim, name)(params, backend="triton", **CASES[name])
    gen = torch.Generator(device="cuda").manual_seed(1)
    for _ in range(5):
        for a, b, c in zip(ref_params, params, shadow_params):
            g = torch.randn(a.shape, device="cuda", generator=gen).to(dtype)
            a.grad, b.grad, c.grad = g.clone(), g.clone(), g.double()
        ref.step()
        opt.step()
        shadow.step()
        if dtype == torch.float32:
            assert_state_close(ref, opt, ref_params, params, **TOLERANCE[dtype])
    if dtype != torch.float32:
        err = lambda ps: sum(float((p.double() - s).pow(2).sum()) for p, s in zip(ps, shadow_params))
        assert err(params) <= err(ref_params) * LOW_PRECISION_SLACK + 1e-6


@pytest.mark.parametrize("name", list(CASES))
def test_cuda_grad_scaler_skips_without_sync(name):
    ref_params, params = _params(torch.float32), None
    params = [p.detach().clone().requires_grad_() for p in ref_params]
    ref = getattr(torch.optim, name)(ref_params, foreach=False, **CASES[name])
    opt = getattr(fused_optim, name)(params, backend="triton", **CASES[name])
    scalers = [torch.amp.GradScaler("cuda", init_scale=1024.0) for _ in range(2)]
    for it in range(4):
        for ps, o, sc in ((ref_params, ref, scalers[0]), (params, opt, scalers[1])):
            o.zero_grad()
            sc.scale(sum((p.float() ** 2).sum() for p in ps)).backward()
            if it == 2:
                ps[0].grad[0] = float("inf")
            sc.step(o)
            sc.update()
        assert opt.last_step_skipped == (it == 2)
    assert_state_close(ref, opt, ref_params, params, **TOLERANCE[torch.float32])


@pytest.mark.parametrize("name", list(CASES))
def test_cuda_graph_captures_a_whole_capturable_step(name):
    ref_params = _params(torch.float32)
    params = [p.detach().clone().requires_grad_() for p in ref_params]
    kw = dict(CASES[name])
    lr0 = kw.pop("lr")
    lr = torch.tensor(lr0, device="cuda")
    ref = getattr(torch.optim, name)(ref_params, lr=lr0, foreach=False, **kw)
    opt = getattr(fused_optim, name)(params, lr=lr, capturable=True, backend="triton", **kw)
    grads = [torch.zeros_like(p) for p in params]
    for p, g in zip(params, grads):
        p.grad = g
    gen = torch.Generator(device="cuda").manual_seed(2)

    def feed(step):
        new_lr = lr0 * 0.7 ** step
        ref.param_groups[0]["lr"] = new_lr
        lr.fill_(new_lr)
        for a, g in zip(ref_params, grads):
            g.copy_(torch.randn(g.shape, device="cuda", generator=gen))
            a.grad = g.clone()

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up steps build and cache every table
        for step in range(3):
            feed(step)
            opt.step()
            ref.step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        opt.step()
    for step in range(3, 8):
        feed(step)
        graph.replay()
        ref.step()
    torch.cuda.synchronize()
    assert_state_close(ref, opt, ref_params, params, **TOLERANCE[torch.float32])


@pytest.mark.parametrize("name", ["Adam", "AdamW"])
def test_one_group_mixing_host_and_device_steps(name):
    """After a "move the optimizer state to the device" loop that missed some
    params, one group holds CPU and CUDA step counters: torch.optim handles
    that; the host must never read the CUDA ones (it segfaulted)."""
    ref_params = _params(torch.float32)
    params = [p.detach().clone().requires_grad_() for p in ref_params]
    ref = getattr(torch.optim, name)(ref_params, foreach=False, **CASES[name])
    opt = getattr(fused_optim, name)(params, backend="triton", **CASES[name])
    gen = torch.Generator(device="cuda").manual_seed(3)
    for it in range(4):
        for a, b in zip(ref_params, params):
            g = torch.randn(a.shape, device="cuda", generator=gen)
            a.grad, b.grad = g.clone(), g.clone()
        ref.step()
        opt.step()
        if it == 0:
            for o, ps in ((ref, ref_params), (opt, params)):
                for p in ps[::2]:
                    o.state[p]["step"] = o.state[p]["step"].cuda()
            assert {opt.state[p]["step"].device.type for p in params} == {"cpu", "cuda"}
    assert_state_close(ref, opt, ref_params, params, **TOLERANCE[torch.float32])


@pytest.mark.skipif(os.environ.get("FUSED_OPTIM_BIG_TESTS") != "1",
                    reason="needs ~13 GB of GPU memory; set FUSED_OPTIM_BIG_TESTS=1")
def test_tensor_of_more_than_2_31_elements():
    n = 2 ** 31 + 4099
    p = torch.zeros(n, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    with torch.no_grad():
        p[-5000:] = torch.arange(5000, device="cuda", dtype=torch.bfloat16)
        p[:5000] = torch.arange(5000, device="cuda", dtype=torch.bfloat16)
    p.grad = torch.ones_like(p)
    opt = fused_optim.SGD([p], lr=0.5, backend="triton")
    opt.step()
    expect = torch.arange(5000, device="cuda", dtype=torch.float32) - 0.5
    torch.testing.assert_close(p[-5000:].float(), expect.bfloat16().float())
    torch.testing.assert_close(p[:5000].float(), expect.bfloat16().float())
    assert bool((p[5000:-5000] == -0.5).all())
