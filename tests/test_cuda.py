"""CUDA-only checks of the Triton backend (skipped without a GPU): parity in
every dtype, GradScaler on the device without host syncs, CUDA-graph capture
(a whole training step with backward, without warm-up, replayed after the
eager steps have replaced every cached device buffer), mixed step devices,
and a tensor of more than 2**31 elements. ``make gpu-check`` runs them."""

import contextlib
import gc
import os

import pytest
import torch

import fused_optim
import optim_db
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
    ref = optim_db.get(name).oracle(ref_params, **CASES[name])
    shadow = optim_db.get(name).oracle(shadow_params, **CASES[name])
    opt = optim_db.get(name).cls(params, backend="triton", **CASES[name])
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
    ref = optim_db.get(name).oracle(ref_params, **CASES[name])
    opt = optim_db.get(name).cls(params, backend="triton", **CASES[name])
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
    assert_state_close(ref, opt, ref_params, params, steps_on_param_device=True,
                       **TOLERANCE[torch.float32])


@contextlib.contextmanager
def _side_stream():
    """torch's CUDA-graph recipe: warm-up steps on a side stream, joined back."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        yield
    torch.cuda.current_stream().wait_stream(side)


@contextlib.contextmanager
def _no_sync_allowed():
    """Every host synchronisation raises (torch's sync debug mode)."""
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode(0)


@pytest.mark.parametrize("name", list(CASES))
def test_grad_scaler_steps_never_sync(name):
    """GradScaler hands found_inf over on the device: no step reads it on the
    host, skipped ones included. Adam's default CPU step counters move to the
    device on the first such step; SGD reads found_inf once, on the step
    that creates its momentum buffers (a skipped first step must not leave
    unwritten buffers behind)."""
    ref_params = _params(torch.float32)
    params = [p.detach().clone().requires_grad_() for p in ref_params]
    ref = optim_db.get(name).oracle(ref_params, **CASES[name])
    opt = optim_db.get(name).cls(params, backend="triton", **CASES[name])
    scalers = [torch.amp.GradScaler("cuda", init_scale=1024.0) for _ in range(2)]
    skipped = []

    def step(ps, o, sc, it):
        o.zero_grad()
        sc.scale(sum((p.float() ** 2).sum() for p in ps)).backward()
        if it in (2, 3):
            ps[0].grad[0] = float("inf")
        sc.step(o)
        sc.update()

    for it in range(6):
        step(ref_params, ref, scalers[0], it)  # torch's for-loop reads found_inf
        # state made from the first grad (SGD's momentum buffer) reads found_inf once
        first = it == 0 and bool(optim_db.get(name).lazy_state)
        with contextlib.nullcontext() if first else _no_sync_allowed():
            step(params, opt, scalers[1], it)
        skipped.append(opt.last_step_skipped)
    assert skipped == [False, False, True, True, False, False]
    if optim_db.get(name).has_step:
        assert {opt.state[p]["step"].device.type for p in params} == {"cuda"}
    assert_state_close(ref, opt, ref_params, params, steps_on_param_device=True,
                       **TOLERANCE[torch.float32])


def _model(seed):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(33, 64), torch.nn.GELU(),
                               torch.nn.Linear(64, 7)).cuda()


_CAPTURE_CASES = {
    "SGD": dict(lr=0.05, momentum=0.9, nesterov=True, weight_decay=1e-3),
    "Adam": dict(lr=0.01, amsgrad=True, weight_decay=0.01, capturable=True),
    "AdamW": dict(lr=0.01, weight_decay=0.1, capturable=True),
}


@pytest.mark.parametrize("name", list(_CAPTURE_CASES))
def test_graph_of_a_whole_training_step(name):
    """torch's whole-network capture recipe: forward, backward and step in
    one graph, after warm-up on a side stream; each replay matches an eager
    torch.optim step on the same data."""
    kw = _CAPTURE_CASES[name]
    ours, theirs = _model(0), _model(0)
    opt = optim_db.get(name).cls(ours.parameters(), backend="triton", **kw)
    ref = optim_db.get(name).oracle(theirs.parameters(), **kw)
    gen = torch.Generator(device="cuda").manual_seed(4)
    x = torch.empty(16, 33, device="cuda")
    y = torch.empty(16, 7, device="cuda")

    def feed():
        x.copy_(torch.randn(x.shape, device="cuda", generator=gen))
        y.copy_(torch.randn(y.shape, device="cuda", generator=gen))

    def train(model, o):
        loss = torch.nn.functional.mse_loss(model(x), y)
        loss.backward()
        o.step()

    with _side_stream():
        for _ in range(3):
            feed()
            for model, o in ((ours, opt), (theirs, ref)):
                o.zero_grad(set_to_none=True)
                train(model, o)
    opt.zero_grad(set_to_none=True)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        train(ours, opt)
    for _ in range(5):
        feed()
        graph.replay()
        ref.zero_grad(set_to_none=True)
        train(theirs, ref)
    torch.cuda.synchronize()
    assert_state_close(ref, opt, list(theirs.parameters()), list(ours.parameters()),
                       **TOLERANCE[torch.float32])


def _warm_kernels(name, kw):
    """Compile the Triton specializations a step of ``name(**kw)`` uses, on
    throwaway params: loading a module is not something to do mid-capture."""
    ps = _params(torch.float32)
    o = optim_db.get(name).cls(ps, backend="triton", **kw)
    for p in ps:
        p.grad = torch.ones_like(p)
    o.step()
    o.step()
    torch.cuda.synchronize()


@pytest.mark.parametrize("name", list(_CAPTURE_CASES))
def test_capture_without_warm_up(name):
    """The first step ever, captured: state is created inside the graph. The
    replays do what torch.optim's captured for-loop step does (it, too,
    bakes the creation of its state into every replay)."""
    kw = _CAPTURE_CASES[name]
    _warm_kernels(name, kw)
    ref_params = _params(torch.float32)
    params = [p.detach().clone().requires_grad_() for p in ref_params]
    grads = [torch.zeros_like(p) for p in params]
    ref_grads = [torch.zeros_like(p) for p in params]
    for p, q, g, h in zip(params, ref_params, grads, ref_grads):
        p.grad, q.grad = g, h
    opt = optim_db.get(name).cls(params, backend="triton", **kw)
    ref = optim_db.get(name).oracle(ref_params, **kw)
    graphs = [torch.cuda.CUDAGraph(), torch.cuda.CUDAGraph()]
    torch.cuda.synchronize()
    with torch.cuda.graph(graphs[0]):
        opt.step()
    with torch.cuda.graph(graphs[1]):
        ref.step()
    gen = torch.Generator(device="cuda").manual_seed(5)
    for _ in range(4):
        for g, h in zip(grads, ref_grads):
            g.copy_(torch.randn(g.shape, device="cuda", generator=gen))
            h.copy_(g)
        graphs[0].replay()
        graphs[1].replay()
    torch.cuda.synchronize()
    assert_state_close(ref, opt, ref_params, params, **TOLERANCE[torch.float32])


@pytest.mark.parametrize("name", list(_CAPTURE_CASES))
def test_replay_after_eager_steps_replaced_every_cached_buffer(name):
    """A graph keeps reading its own tables after eager steps with other grad
    tensors have filled and turned over the optimizer's device-buffer cache
    and their memory has been freed and overwritten (before, 64-entry global
    caches freed what a graph read: the replay then read whatever reused it)."""
    kw = _CAPTURE_CASES[name]
    ref_params = _params(torch.float32)
    params = [p.detach().clone().requires_grad_() for p in ref_params]
    opt = optim_db.get(name).cls(params, backend="triton", **kw)
    ref = optim_db.get(name).oracle(ref_params, **kw)
    static = [torch.zeros_like(p) for p in params]
    gen = torch.Generator(device="cuda").manual_seed(6)

    def both(grads):
        for p, q, g in zip(params, ref_params, grads):
            p.grad, q.grad = g, g.clone()
        opt.step()
        ref.step()

    with _side_stream():
        for _ in range(3):
            for g in static:
                g.copy_(torch.randn(g.shape, device="cuda", generator=gen))
            both(static)
    for p, g in zip(params, static):
        p.grad = g
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        opt.step()
    alive = []
    for _ in range(70):  # distinct grad tensors: a new table each step
        grads = [torch.randn(p.shape, device="cuda", generator=gen) for p in params]
        alive.append(grads)
        both(grads)
    del alive, grads
    gc.collect()
    junk = [torch.full((1 << 16,), -1, dtype=torch.int64, device="cuda") for _ in range(64)]
    for _ in range(3):
        for g in static:
            g.copy_(torch.randn(g.shape, device="cuda", generator=gen))
        graph.replay()
        for q, g in zip(ref_params, static):
            q.grad = g.clone()
        ref.step()
    torch.cuda.synchronize()
    del junk
    assert_state_close(ref, opt, ref_params, params, **TOLERANCE[torch.float32])


@pytest.mark.parametrize("name", list(CASES))
def test_cuda_graph_captures_a_whole_capturable_step(name):
    ref_params = _params(torch.float32)
    params = [p.detach().clone().requires_grad_() for p in ref_params]
    kw = dict(CASES[name])
    lr0 = kw.pop("lr")
    lr = torch.tensor(lr0, device="cuda")
    ref = optim_db.get(name).oracle(ref_params, lr=lr0, **kw)
    opt = optim_db.get(name).cls(params, lr=lr, capturable=True, backend="triton", **kw)
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

    with _side_stream():  # warm-up steps build and cache every table
        for step in range(3):
            feed(step)
            opt.step()
            ref.step()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        opt.step()
    for step in range(3, 8):
        feed(step)
        graph.replay()
        ref.step()
    torch.cuda.synchronize()
    assert_state_close(ref, opt, ref_params, params, **TOLERANCE[torch.float32])


@pytest.mark.parametrize("name", [i.name for i in optim_db.with_capability("has_step")])
def test_one_group_mixing_host_and_device_steps(name):
    """After a "move the optimizer state to the device" loop that missed some
    params, one group holds CPU and CUDA step counters: torch.optim handles
    that; the host must never read the CUDA ones (it segfaulted)."""
    ref_params = _params(torch.float32)
    params = [p.detach().clone().requires_grad_() for p in ref_params]
    ref = optim_db.get(name).oracle(ref_params, **CASES[name])
    opt = optim_db.get(name).cls(params, backend="triton", **CASES[name])
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
