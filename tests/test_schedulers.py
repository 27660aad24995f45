"""torch's lr_scheduler drives fused_optim exactly as it drives torch.optim:
hyperparameters are re-read from param_groups at every step."""

import pytest
import torch

import optim_db
from fused_optim import lr_scheduler
from matrix import BACKENDS, TOLERANCE, assert_state_close, clone_params, skip_unless_runnable


def _cycles_momentum(o):
    # torch's cyclic schedulers also cycle momentum (or beta1) where the optimizer has one
    return any(k in o.defaults for k in ("momentum", "betas"))


# scheduler factories: f(optimizer, the optimizer's base lr); each runs on
# every OptimInfo with its full_state_example (every state key in play)
SCHEDULES = {
    "StepLR": lambda o, lr: lr_scheduler.StepLR(o, step_size=1, gamma=0.98),
    "MultiStepLR": lambda o, lr: lr_scheduler.MultiStepLR(o, [2, 4], 0.1),
    "ExponentialLR": lambda o, lr: lr_scheduler.ExponentialLR(o, 0.9),
    "CosineAnnealingLR": lambda o, lr: lr_scheduler.CosineAnnealingLR(o, T_max=5),
    "LambdaLR": lambda o, lr: lr_scheduler.LambdaLR(o, lambda e: 0.5 ** e),
    "OneCycleLR": lambda o, lr: lr_scheduler.OneCycleLR(
        o, max_lr=5 * lr, total_steps=8, cycle_momentum=_cycles_momentum(o)),
    "CyclicLR": lambda o, lr: lr_scheduler.CyclicLR(
        o, base_lr=lr / 10, max_lr=lr, step_size_up=2, cycle_momentum=_cycles_momentum(o)),
    "LinearLR+Sequential": lambda o, lr: lr_scheduler.SequentialLR(
        o, [lr_scheduler.LinearLR(o, start_factor=0.1, total_iters=3),
            lr_scheduler.ExponentialLR(o, 0.9)], milestones=[3]),
    "ReduceLROnPlateau": lambda o, lr: lr_scheduler.ReduceLROnPlateau(o, patience=0, factor=0.5),
}


def _run(make_opt, make_sched, params):
    opt = make_opt(params)
    sched = make_sched(opt)
    gen = torch.Generator().manual_seed(0)
    lrs = []
    for step in range(8):
        for p in params:
            p.grad = torch.randn(p.shape, generator=gen)
        opt.step()
        if isinstance(sched, lr_scheduler.ReduceLROnPlateau):
            sched.step(1.0)  # a flat metric: the lr halves every epoch
        else:
            sched.step()
        lrs.append([g["lr"] for g in opt.param_groups])
    return opt, lrs


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("info", optim_db.OPTIM_DB, ids=lambda i: i.name)
@pytest.mark.parametrize("case", list(SCHEDULES))
def test_scheduler_drives_fused_like_torch(case, info, backend):
    skip_unless_runnable(backend)
    kwargs = info.full_state_example
    make_sched = lambda o: SCHEDULES[case](o, kwargs["lr"])  # noqa: E731
    torch.manual_seed(0)
    ref_params = [torch.randn(8, 3).requires_grad_(), torch.randn(4).requires_grad_()]
    params = clone_params(ref_params)
    ref, ref_lrs = _run(lambda ps: info.oracle(ps, **kwargs), make_sched, ref_params)
    opt, lrs = _run(lambda ps: info.cls(ps, backend=backend, **kwargs), make_sched, params)
    assert lrs == ref_lrs
    assert len(set(map(tuple, lrs))) > 1, "the schedule never changed the lr"
    assert_state_close(ref, opt, ref_params, params, **TOLERANCE[torch.float32])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("info", optim_db.OPTIM_DB, ids=lambda i: i.name)
def test_manual_warmup_and_gradient_accumulation(info, backend):
    """The seeds' pattern: lr set by hand in param_groups, step every k batches."""
    skip_unless_runnable(backend)
    torch.manual_seed(0)
    model_ref = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 1))
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 1))
    model.load_state_dict(model_ref.state_dict())
    kwargs = info.full_state_example
    base = (kwargs["lr"], kwargs["lr"] / 2)
    groups = lambda m: [{"params": m[0].parameters()}, {"params": m[2].parameters(), "lr": base[1]}]
    ref = info.oracle(groups(model_ref), **kwargs)
    opt = info.cls(groups(model), backend=backend, **kwargs)
    gen = torch.Generator().manual_seed(5)
    accum, warmup = 3, 4
    for it in range(12):
        x, y = torch.randn(5, 4, generator=gen), torch.randn(5, 1, generator=gen)
        for m in (model_ref, model):
            (torch.nn.functional.mse_loss(m(x), y) / accum).backward()
        if (it + 1) % accum == 0:
            k = (it + 1) // accum
            for o in (ref, opt):
                if k <= warmup:
                    for g, b in zip(o.param_groups, base):
                        g["lr"] = b * k / warmup
                o.step()
                o.zero_grad()
    for a, b in zip(model_ref.parameters(), model.parameters()):
        torch.testing.assert_close(b, a)
