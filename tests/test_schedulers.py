"""torch's lr_scheduler drives fused_optim exactly as it drives torch.optim:
hyperparameters are re-read from param_groups at every step."""

import pytest
import torch

import fused_optim
from fused_optim import lr_scheduler
from matrix import BACKENDS, TOLERANCE, assert_state_close, clone_params, skip_unless_runnable

# (optimizer, optimizer kwargs, scheduler factory, steps on a plateau metric?)
SCHEDULES = {
    "StepLR": ("SGD", dict(lr=0.1, momentum=0.9, weight_decay=4e-5),
               lambda o: lr_scheduler.StepLR(o, step_size=1, gamma=0.98)),
    "MultiStepLR": ("Adam", dict(lr=0.01), lambda o: lr_scheduler.MultiStepLR(o, [2, 4], 0.1)),
    "ExponentialLR": ("AdamW", dict(lr=0.01), lambda o: lr_scheduler.ExponentialLR(o, 0.9)),
    "CosineAnnealingLR": ("SGD", dict(lr=0.1, momentum=0.9, nesterov=True),
                          lambda o: lr_scheduler.CosineAnnealingLR(o, T_max=5)),
    "LambdaLR": ("Adam", dict(lr=0.01), lambda o: lr_scheduler.LambdaLR(o, lambda e: 0.5 ** e)),
    "OneCycleLR-SGD": ("SGD", dict(lr=0.1, momentum=0.9),
                       lambda o: lr_scheduler.OneCycleLR(o, max_lr=0.5, total_steps=8)),
    "OneCycleLR-Adam": ("Adam", dict(lr=0.01), lambda o: lr_scheduler.OneCycleLR(o, max_lr=0.05, total_steps=8)),
    "CyclicLR": ("SGD", dict(lr=0.1, momentum=0.9),
                 lambda o: lr_scheduler.CyclicLR(o, base_lr=0.01, max_lr=0.1, step_size_up=2)),
    "LinearLR+Sequential": ("AdamW", dict(lr=0.01), lambda o: lr_scheduler.SequentialLR(
        o, [lr_scheduler.LinearLR(o, start_factor=0.1, total_iters=3),
            lr_scheduler.ExponentialLR(o, 0.9)], milestones=[3])),
    "ReduceLROnPlateau": ("SGD", dict(lr=0.1, momentum=0.9),
                          lambda o: lr_scheduler.ReduceLROnPlateau(o, patience=0, factor=0.5)),
}


def _run(cls_ns, name, kwargs, make_sched, params, backend=None):
    kw = dict(kwargs)
    if backend is not None:
        kw["backend"] = backend
    else:
        kw["foreach"] = False
    opt = getattr(cls_ns, name)(params, **kw)
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
@pytest.mark.parametrize("case", list(SCHEDULES))
def test_scheduler_drives_fused_like_torch(case, backend):
    skip_unless_runnable(backend)
    name, kwargs, make_sched = SCHEDULES[case]
    torch.manual_seed(0)
    ref_params = [torch.randn(8, 3).requires_grad_(), torch.randn(4).requires_grad_()]
    params = clone_params(ref_params)
    ref, ref_lrs = _run(torch.optim, name, kwargs, make_sched, ref_params)
    opt, lrs = _run(fused_optim, name, kwargs, make_sched, params, backend)
    assert lrs == ref_lrs
    assert len(set(map(tuple, lrs))) > 1, "the schedule never changed the lr"
    assert_state_close(ref, opt, ref_params, params, **TOLERANCE[torch.float32])


@pytest.mark.parametrize("backend", BACKENDS)
def test_manual_warmup_and_gradient_accumulation(backend):
    """The seeds' pattern: lr set by hand in param_groups, step every k batches."""
    skip_unless_runnable(backend)
    torch.manual_seed(0)
    model_ref = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 1))
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 1))
    model.load_state_dict(model_ref.state_dict())
    groups = lambda m: [{"params": m[0].parameters()}, {"params": m[2].parameters(), "lr": 0.05}]
    ref = torch.optim.SGD(groups(model_ref), lr=0.1, momentum=0.9, foreach=False)
    opt = fused_optim.SGD(groups(model), lr=0.1, momentum=0.9, backend=backend)
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
                    for g, base in zip(o.param_groups, (0.1, 0.05)):
                        g["lr"] = base * k / warmup
                o.step()
                o.zero_grad()
    for a, b in zip(model_ref.parameters(), model.parameters()):
        torch.testing.assert_close(b, a)
