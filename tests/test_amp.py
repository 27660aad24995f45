"""GradScaler hands grad_scale/found_inf to the optimizer; the kernels unscale
in the same pass, or skip the update entirely on inf/NaN."""

import pytest
import torch

import optim_db
from matrix import (BACKENDS, TOLERANCE, assert_state_close, build_kwargs, config_id,
                    skip_unless_runnable)

def _model(seed):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.Tanh(), torch.nn.Linear(16, 2))


def _amp_configs():
    """Per optimizer: its example, every state key in play, and fused=True
    where torch has it (every config under GradScaler cost ~4 min of CI; the
    parity matrix covers the configs without it)."""
    out = []
    for info in optim_db.OPTIM_DB:
        kws = [info.example, info.full_state_example]
        if info.supports_fused:
            kws.append({**info.full_state_example, "fused": True})
        seen = []
        for kw in kws:
            if kw not in seen:
                seen.append(kw)
                out.append(pytest.param(info.name, kw, id=config_id(info.name, kw)))
    return out


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name,kwargs", _amp_configs())
def test_grad_scaler_matches_torch_and_skips_on_inf(name, kwargs, backend):
    skip_unless_runnable(backend)
    info = optim_db.get(name)
    ref_model, model = _model(0), _model(0)
    ref = info.oracle(ref_model.parameters(), **build_kwargs(kwargs))
    opt = info.cls(model.parameters(), backend=backend, **build_kwargs(kwargs))
    assert opt._step_supports_amp_scaling
    scalers = [torch.amp.GradScaler("cpu", init_scale=2.0 ** 10, growth_interval=2)
               for _ in range(2)]
    gen = torch.Generator().manual_seed(1)
    # step 0 is an overflow: the first step of all, so no state exists yet
    for it in range(6):
        x, y = torch.randn(4, 6, generator=gen), torch.randn(4, 2, generator=gen)
        for m, o, sc in ((ref_model, ref, scalers[0]), (model, opt, scalers[1])):
            o.zero_grad()
            sc.scale(torch.nn.functional.mse_loss(m(x), y)).backward()
            if it in (0, 3):
                next(m.parameters()).grad[0, 0] = float("inf")
            sc.step(o)
            sc.update()
        assert opt.last_step_skipped == (it in (0, 3))
        assert scalers[0].get_scale() == scalers[1].get_scale()
        ref_params, params = list(ref_model.parameters()), list(model.parameters())
        if it == 0 and len(ref.state):
            # torch skipped its step; its state is what its constructor made
            # (Adagrad's): ours must be the same, bit for bit
            assert_state_close(ref, opt, ref_params, params, rtol=0, atol=0)
        elif it == 0:
            # torch skipped its step; ours ran and left only fresh state
            # behind: what torch's _init_group makes before a first step
            # (zeros; NAdam's mu_product 1)
            clones = [p.detach().clone().requires_grad_() for p in params]
            for c, p in zip(clones, params):
                c.grad = torch.zeros_like(c)
            fresh = info.cls(clones, **build_kwargs(kwargs))
            fresh._torchs_init_group(fresh.param_groups[0])
            for p, rp, c in zip(params, ref_params, clones):
                s, f = opt.state.get(p, {}), fresh.state.get(c, {})
                assert not set(info.lazy_state) & set(s)  # made from a grad: none yet
                assert float(s.get("step", 0)) == 0
                assert all(torch.equal(v, f[k]) for k, v in s.items() if k != "step")
                assert torch.equal(p, rp)
        else:
            assert_state_close(ref, opt, ref_params, params, **TOLERANCE[torch.float32])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("info", optim_db.OPTIM_DB, ids=lambda i: i.name)
def test_found_inf_leaves_params_state_and_steps_untouched(info, backend):
    skip_unless_runnable(backend)
    params = [torch.randn(50).requires_grad_(), torch.randn(3, 3).requires_grad_()]
    opt = info.cls(params, backend=backend, **info.full_state_example)
    for p in params:
        p.grad = torch.randn(p.shape)
    opt.step()
    before = [p.detach().clone() for p in params]
    state = [{k: v.clone() for k, v in opt.state[p].items()} for p in params]
    opt.grad_scale, opt.found_inf = torch.tensor(8.0), torch.tensor(1.0)
    opt.step()
    del opt.grad_scale, opt.found_inf
    assert opt.last_step_skipped
    for p, b, s in zip(params, before, state):
        assert torch.equal(p.detach(), b)
        for k, v in s.items():
            assert torch.equal(opt.state[p][k], v), k


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("info", optim_db.OPTIM_DB, ids=lambda i: i.name)
def test_grad_scale_divides_in_the_kernel(info, backend):
    skip_unless_runnable(backend)
    ref_p = [torch.randn(40).requires_grad_()]
    p = [ref_p[0].detach().clone().requires_grad_()]
    ref = info.oracle(ref_p, **info.full_state_example)
    opt = info.cls(p, backend=backend, **info.full_state_example)
    g = torch.randn(40)
    ref_p[0].grad = g.clone()
    p[0].grad = g * 1024.0
    ref.step()
    opt.grad_scale, opt.found_inf = torch.tensor(1024.0), torch.tensor(0.0)
    opt.step()
    assert not opt.last_step_skipped
    assert_state_close(ref, opt, ref_p, p, **TOLERANCE[torch.float32])
