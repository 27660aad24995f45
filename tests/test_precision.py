"""kahan_sum and stochastic_round, through the optimizers, on every backend.

What the options promise (``fused_optim/_precision.py``,
``kernels/reference/_precision.py``): off, nothing changes; on, float32 and
float64 params are untouched and bfloat16/float16 params are stored through
a Kahan-compensated and/or stochastically rounded store, reproducible from
the seed, saved and resumed with ``state_dict``, and skipped whole by
GradScaler's ``found_inf``. Every test runs each optimizer of the database
(no name branches) on each backend it can.

The options' layer: through the optimizers, and (the last section) through
examples/bf16_precision.py's training run. The kernels' stores, bit for bit
against the specification, are tests/test_precision_kernels.py's.
"""

from __future__ import annotations

import copy
import importlib.util
import math
from pathlib import Path

import pytest
import torch

import optim_db
from matrix import BACKENDS, build_kwargs, info_params, skip_unless_runnable

OPTIONS = [pytest.param(dict(kahan_sum=True), id="kahan"),
           pytest.param(dict(stochastic_round=True), id="sr"),
           pytest.param(dict(kahan_sum=True, stochastic_round=True), id="kahan+sr")]
LOW = [pytest.param(torch.bfloat16, id="bf16"), pytest.param(torch.float16, id="fp16")]
# (Per optimizer the tests run its full_state_example in bfloat16, which the
# stateful machine's precision mode shares: Numba compiles a specialization
# per dtype and option; float16 shares the code and is checked here through
# SGD, and bit for bit against the reference in test_precision_kernels.py.)
#: interpreted Triton runs ~1 ms per program: its cases use fewer, smaller steps
SMALL = {"triton": True}


def _grads(shapes, steps, seed, scale=1.0):
    gen = torch.Generator().manual_seed(seed)
    return [[torch.randn(s, generator=gen, dtype=torch.float64) * scale for s in shapes]
            for _ in range(steps)]


def _run(info, kwargs, params, grads, backend, dtype, **options):
    """Step a fresh optimizer over ``grads`` (rounded to ``dtype``); return it."""
    opt = info.cls(params, backend=backend, **build_kwargs(kwargs), **options)
    for gs in grads:
        for p, g in zip(params, gs):
            p.grad = g.to(dtype)
        opt.step()
    return opt


def _snapshot(opt):
    out = []
    for group in opt.param_groups:
        for p in group["params"]:
            out.append(p.detach().clone())
            for k, v in sorted(opt.state[p].items()):
                if isinstance(v, torch.Tensor):
                    out.append(v.detach().clone())
    return out


_INT = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def _assert_same_bits(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.dtype == y.dtype and x.shape == y.shape and x.device == y.device
        if x.is_floating_point():
            x, y = x.view(_INT[x.element_size()]), y.view(_INT[y.element_size()])
        assert torch.equal(x, y), (x, y)


# ---------------------------------------------------------------- off / fp32


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("options", OPTIONS)
@pytest.mark.parametrize("info", info_params())
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
def test_options_leave_float32_and_float64_params_bit_for_bit(info, options, backend, dtype):
    skip_unless_runnable(backend)
    shapes = [(13, 7), (300,)]
    grads = _grads(shapes, 3, seed=1)
    init = [torch.randn(s, generator=torch.Generator().manual_seed(2), dtype=dtype)
            for s in shapes]
    plain = _run(info, info.full_state_example, [p.clone().requires_grad_() for p in init],
                 grads, backend, dtype)
    opt = _run(info, info.full_state_example, [p.clone().requires_grad_() for p in init],
               grads, backend, dtype, **options)
    _assert_same_bits(_snapshot(plain), _snapshot(opt))
    for p in opt.param_groups[0]["params"]:
        assert "kahan_comp" not in opt.state[p]


@pytest.mark.parametrize("info", info_params())
def test_off_means_no_group_key_and_torchs_checkpoint(info):
    p = torch.zeros(3, requires_grad=True)
    opt = info.cls([p], **build_kwargs(info.example))
    ref = info.oracle([torch.zeros(3, requires_grad=True)], **build_kwargs(info.example))
    assert opt.param_groups[0].keys() == ref.param_groups[0].keys()
    assert opt.state_dict().keys() == ref.state_dict().keys()
    on = info.cls([p], **build_kwargs(info.example), kahan_sum=True, stochastic_round=True)
    assert on.param_groups[0]["kahan_sum"] is True
    assert on.param_groups[0]["stochastic_round"] is True


# ---------------------------------------------------------------- Kahan


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", LOW)
def test_kahan_compensation_is_exact_in_a_constructed_case(backend, dtype):
    """p = 1 and a step of -d each time, an eighth of the ulp below 1 (a
    quarter of the half ulp that rounding to nearest needs), so plain
    storage never moves; with the buffer, p + c is exactly 1 - k * d after k
    steps (every value involved is representable)."""
    skip_unless_runnable(backend)
    info = optim_db.get("SGD")
    steps = 20 if backend in SMALL else 100
    d = (1.0 - torch.tensor(1.0, dtype=dtype).view(torch.int16).sub(1)
         .view(dtype).item()) / 8
    p = torch.ones(100, dtype=dtype, requires_grad=True)
    q = torch.ones(100, dtype=dtype, requires_grad=True)
    opt = info.cls([p], lr=1.0, backend=backend, kahan_sum=True)
    plain = info.cls([q], lr=1.0, backend=backend)
    for k in range(1, steps + 1):
        p.grad = torch.full_like(p, d)
        q.grad = torch.full_like(q, d)
        opt.step()
        plain.step()
        comp = opt.state[p]["kahan_comp"]
        total = p.detach().double() + comp.double()
        assert torch.equal(total, torch.full_like(total, 1.0 - k * d)), k
        assert torch.equal(q.detach(), torch.ones_like(q))  # stagnates
    assert comp.dtype == dtype and comp.shape == p.shape


def _shadow_errors(info, backend, dtype, steps, n, option_sets):
    """Errors of low-precision runs against the same optimizer in float64
    (torch's for-loop), fed identical grads: per option set, the mean
    |p - shadow| and the mean signed (p - shadow) * sign(shadow - p0), both
    over the mean |shadow - p0| (0 where the run follows the shadow, 1 in
    absolute and -1 in signed where it never moves).

    Params start in [1, 2), where every value has the same ulp, and the lr
    is set so that the shadow's steps move them by a tenth of an ulp on
    average (scaled from a run at the example's lr: every update here is
    proportional to lr): plain round-to-nearest storage cannot follow. The
    grads have a drift (mean 0.5, sd 0.5), so the shadow moves steadily.
    """
    shapes = [(n,), (n // 3, 3)]
    gen = torch.Generator().manual_seed(5)
    init = [(1 + torch.rand(s, generator=gen)).to(dtype) for s in shapes]
    ulp = torch.finfo(dtype).eps  # the ulp of [1, 2)
    grads = [[(0.5 + 0.5 * torch.randn(s, generator=gen, dtype=torch.float64))
              .to(dtype).double() for s in shapes] for _ in range(steps)]
    kwargs = dict(info.full_state_example, **info.shadow_kwargs)

    def shadow(lr, k):
        ref = [p.double().requires_grad_() for p in init]
        opt = info.oracle(ref, **build_kwargs(dict(kwargs, lr=lr)))
        for gs in grads[:k]:
            for p, g in zip(ref, gs):
                p.grad = g.clone()
            opt.step()
        return ref

    lr0 = kwargs["lr"]
    run = shadow(lr0, steps)
    per_step = sum((a.double() - b).abs().sum().item()
                   for a, b in zip(init, run)) / (4 * n // 3) / steps
    kwargs["lr"] = lr0 * 0.1 * ulp / per_step
    ref = shadow(kwargs["lr"], steps)
    moved = sum((a.double() - b).abs().sum().item() for a, b in zip(init, ref))
    out = []
    for options in option_sets:
        torch.manual_seed(0)  # the stream's seed
        low = [p.clone().requires_grad_() for p in init]
        _run(info, kwargs, low, grads, backend, dtype, **options)
        err = [a.double() - b for a, b in zip(low, ref)]
        signed = sum((e * (b - a.double()).sign()).sum().item()
                     for e, a, b in zip(err, init, ref))
        out.append((sum(e.abs().sum().item() for e in err) / moved, signed / moved))
    return out


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("info", info_params())
def test_kahan_and_stochastic_rounding_track_a_float64_shadow(info, backend):
    """Against the same optimizer run in float64 on the same grads, with
    steps of about a tenth of an ulp: plain storage stays put (its error is
    the whole distance the shadow moved: measured 0.998-1.000, signed
    -1.0); Kahan's stored params stay within their own rounding of the
    shadow (measured 0.06 over 60 steps, 0.095 over 40, every optimizer,
    bf16 and fp16), and stochastic rounding's average follows it (signed
    error measured within +-0.04) while each element walks around it
    (absolute 0.38 over 60 steps, 0.50 over 40). Bounds: 2x the measured
    values, 1.4x for stochastic rounding's absolute error."""
    skip_unless_runnable(backend)
    steps, n = (40, 300) if backend in SMALL else (60, 3000)
    plain, kahan, sr = _shadow_errors(info, backend, torch.bfloat16, steps, n,
                                      [{}, dict(kahan_sum=True), dict(stochastic_round=True)])
    assert plain[0] > 0.9 and plain[1] < -0.9, plain  # plain storage stagnates here
    assert kahan[0] < 0.2 and abs(kahan[1]) < 0.1, kahan
    assert sr[0] < 0.7 and abs(sr[1]) < 0.1, sr


# ---------------------------------------------------------------- stochastic rounding


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", LOW)
@pytest.mark.parametrize("frac", [0.3125, 0.875])
def test_stochastic_rounding_is_unbiased(backend, dtype, frac):
    """p = 1 (and -1, 2**-10) moved by ``frac`` of an ulp in one SGD step:
    each element rounds up with probability ``frac``. Over N elements and
    several steps (p reset each time) the mean rounded value is within 5
    standard deviations of the exact one; so is each element's own mean
    over steps, on average (independence across steps)."""
    skip_unless_runnable(backend)
    info = optim_db.get("SGD")
    # under SERIAL_BELOW: Numba's serial entry point. The parallel one draws
    # the same bits (test_precision_kernels.py, its global-index test), and
    # here it cost two specializations no other test needs (bf16 and fp16
    # SR-only sgd_parallel, 7 s each cold, loaded 2-core VM). n * steps is
    # what it was with 65,536 x 12, so the bound is as tight.
    n, steps = (4096, 6) if backend in SMALL else (1 << 14, 48)
    if backend == "numba":
        from fused_optim.kernels.numba import _launch
        assert n < _launch.SERIAL_BELOW
    for base in (1.0, -1.0, 2.0 ** -10):
        b = torch.tensor(base, dtype=dtype)
        nxt = (b.view(torch.int16) + 1).view(dtype)  # the next magnitude up
        ulp = (nxt.double() - b.double()).abs()
        p = torch.full((n,), base, dtype=dtype, requires_grad=True)
        opt = info.cls([p], lr=1.0, backend=backend, stochastic_round=True)
        ups = torch.zeros(n, dtype=torch.float64)
        for _ in range(steps):
            with torch.no_grad():
                p.fill_(base)
            # grad = -sign(base) * frac * ulp: the update moves |p| up
            p.grad = torch.full((n,), -math.copysign(frac, base) * ulp.item(), dtype=dtype)
            assert p.grad[0].double().abs() == frac * ulp  # representable exactly
            opt.step()
            moved = (p.detach().double() - base) / (nxt.double() - b.double())
            assert set(moved.unique().tolist()) <= {0.0, 1.0}
            ups += moved
        mean = ups.sum().item() / (n * steps)
        sigma = math.sqrt(frac * (1 - frac) / (n * steps))
        assert abs(mean - frac) < 5 * sigma, (base, mean, frac)
        assert 0 < mean < 1


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("info", info_params())
def test_stochastic_rounding_is_reproducible_from_the_seed(info, backend):
    skip_unless_runnable(backend)
    dtype = torch.bfloat16
    shapes = [(257,), (9, 5)]
    grads = _grads(shapes, 3, seed=3, scale=0.01)
    init = [torch.randn(s, generator=torch.Generator().manual_seed(4)).to(dtype)
            for s in shapes]
    runs = []
    for seed in (7, 7, 8):
        torch.manual_seed(seed)
        ps = [p.clone().requires_grad_() for p in init]
        runs.append(_snapshot(_run(info, info.full_state_example, ps, grads, backend, dtype,
                                   stochastic_round=True)))
    _assert_same_bits(runs[0], runs[1])
    assert any(not torch.equal(a, b) for a, b in zip(runs[0], runs[2]))


@pytest.mark.parametrize("backend", ["numba", "triton"])
def test_stochastic_rounding_keys_elements_alike_in_every_layout(backend):
    """Each element's random bits are keyed by its place in the row's memory,
    on every backend alike: transposed (dense, walked in address order),
    channels-last and strided (staged contiguous) params match the reference
    backend bit for bit. (Found by the precision machine: the reference keyed a
    transposed param by logical index; every tolerance-level comparison
    passed, as each stored value was one of the same two neighbours.)"""
    skip_unless_runnable(backend)
    info = optim_db.get("SGD")
    dtype = torch.bfloat16
    gen = torch.Generator().manual_seed(21)
    base = [torch.randn(s, generator=gen).to(dtype) for s in [(6, 4), (2, 3, 2, 5), (20,)]]
    layouts = [lambda t: t.t().contiguous().t(),  # (6, 4) with strides (1, 6)
               lambda t: t.contiguous(memory_format=torch.channels_last),
               lambda t: torch.empty(40, dtype=t.dtype)[::2].copy_(t)]
    grads = _grads([t.shape for t in base], 3, seed=22, scale=0.01)
    runs = []
    for b in (backend, "torch"):
        torch.manual_seed(5)
        ps = [f(t.clone()).requires_grad_() for f, t in zip(layouts, base)]
        runs.append(_snapshot(_run(info, info.full_state_example, ps, grads, b, dtype,
                                   stochastic_round=True)))
    assert [t.stride() for t in runs[0][:1]] == [(1, 6)]
    _assert_same_bits(runs[0], runs[1])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("info", info_params())
def test_state_dict_resumes_the_same_run(info, backend):
    """3 steps, save, 3 more; a new optimizer loaded from the save, 3 more:
    bit for bit the same params, state, buffers and stream (both options on)."""
    skip_unless_runnable(backend)
    options = dict(kahan_sum=True, stochastic_round=True)
    dtype = torch.bfloat16
    shapes = [(130,), (4, 6)]
    grads = _grads(shapes, 6, seed=9, scale=0.01)
    init = [torch.randn(s, generator=torch.Generator().manual_seed(10)).to(dtype)
            for s in shapes]
    torch.manual_seed(0)
    ps = [p.clone().requires_grad_() for p in init]
    opt = _run(info, info.full_state_example, ps, grads[:3], backend, dtype, **options)
    saved = copy.deepcopy(opt.state_dict())  # (state_dict() holds the live tensors)
    saved_params = [p.detach().clone() for p in ps]
    if info.cast_on_load:
        # torch's load changes those keys' dtype: the run goes on through its own
        # checkpoint too
        opt.load_state_dict(copy.deepcopy(saved))
    for gs in grads[3:]:
        for p, g in zip(ps, gs):
            p.grad = g.to(dtype)
        opt.step()
    want = _snapshot(opt)

    torch.manual_seed(123)  # a different seed drawn at construction: the save's wins
    qs = [p.clone().requires_grad_() for p in saved_params]
    again = info.cls(qs, backend=backend, **build_kwargs(info.full_state_example), **options)
    again.load_state_dict(saved)
    for gs in grads[3:]:
        for p, g in zip(qs, gs):
            p.grad = g.to(dtype)
        again.step()
    _assert_same_bits(want, _snapshot(again))


@pytest.mark.parametrize("how", ["deepcopy", "pickle"])
@pytest.mark.parametrize("info", info_params())
def test_a_copy_continues_the_same_run(info, how):
    """An optimizer copied (``copy.deepcopy``) or pickled and loaded after 2
    steps, then both stepped alike: bit for bit the same params, state and
    stream, as torch.optim's copies continue. The copy lost the stream's seed
    and counter and drew a new seed at its next step (issue 29)."""
    import pickle

    skip_unless_runnable("numba")
    dtype = torch.bfloat16
    shapes = [(130,), (4, 6)]
    grads = _grads(shapes, 5, seed=4, scale=0.01)
    torch.manual_seed(0)
    ps = [torch.randn(s).to(dtype).requires_grad_() for s in shapes]
    opt = _run(info, info.full_state_example, ps, grads[:2], "numba", dtype,
               kahan_sum=True, stochastic_round=True)
    twin = copy.deepcopy(opt) if how == "deepcopy" else pickle.loads(pickle.dumps(opt))
    qs = [p for g in twin.param_groups for p in g["params"]]
    torch.manual_seed(77)  # a copy that drew a seed now would differ
    for gs in grads[2:]:
        for o, params in ((opt, ps), (twin, qs)):
            for p, g in zip(params, gs):
                p.grad = g.to(dtype)
            o.step()
    _assert_same_bits(_snapshot(opt), _snapshot(twin))
    assert twin.state_dict()["stochastic_round"] == opt.state_dict()["stochastic_round"]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("info", info_params())
def test_a_first_step_under_inference_mode_leaves_a_stream_that_loads(info, backend):
    """The stream's counter made by a step under ``torch.inference_mode()`` is
    a normal tensor: a checkpoint loads into it in place afterwards (it was
    an inference tensor, and ``load_state_dict`` raised; found by the
    model-based test's precision machine)."""
    skip_unless_runnable(backend)
    p = torch.randn(6, dtype=torch.bfloat16, requires_grad=True)
    opt = info.cls([p], backend=backend, **build_kwargs(info.example), stochastic_round=True)
    p.grad = torch.randn_like(p)
    with torch.inference_mode():
        opt.step()
    saved = copy.deepcopy(opt.state_dict())
    opt.load_state_dict(saved)
    assert opt.state_dict()["stochastic_round"] == saved["stochastic_round"]


@pytest.mark.parametrize("info", info_params())
def test_checkpoints_move_to_torch_and_back(info):
    """Ours -> torch.optim: the extra state key and group keys are kept and
    never read, the stream entry is ignored; torch's steps as from its own
    checkpoint. torch -> ours: the options stay as constructed, the buffers
    start at zero."""
    dtype = torch.bfloat16
    shapes = [(40,), (3, 5)]
    grads = _grads(shapes, 4, seed=11, scale=0.1)
    init = [torch.randn(s, generator=torch.Generator().manual_seed(12)).to(dtype)
            for s in shapes]
    kwargs = info.full_state_example
    ps = [p.clone().requires_grad_() for p in init]
    ours = _run(info, kwargs, ps, grads[:2], "torch", dtype, kahan_sum=True,
                stochastic_round=True)
    sd = copy.deepcopy(ours.state_dict())
    assert "kahan_comp" in sd["state"][0] and "stochastic_round" in sd

    qs = [p.detach().clone().requires_grad_() for p in ps]
    theirs = info.oracle(qs, **build_kwargs(kwargs))
    theirs.load_state_dict(copy.deepcopy(sd))
    rs = [p.detach().clone().requires_grad_() for p in ps]
    plain_sd = {"state": {k: {n: v for n, v in s.items() if n != "kahan_comp"}
                          for k, s in sd["state"].items()},
                "param_groups": [{k: v for k, v in g.items()
                                  if k not in ("kahan_sum", "stochastic_round")}
                                 for g in sd["param_groups"]]}
    control = info.oracle(rs, **build_kwargs(kwargs))
    control.load_state_dict(copy.deepcopy(plain_sd))
    for gs in grads[2:]:
        for a, b, g in zip(qs, rs, gs):
            a.grad = g.to(dtype)
            b.grad = g.to(dtype)
        theirs.step()
        control.step()
    for a, b in zip(qs, rs):
        assert torch.equal(a, b)

    back = info.cls([p.detach().clone().requires_grad_() for p in qs],
                    **build_kwargs(kwargs), kahan_sum=True)
    back.load_state_dict(copy.deepcopy(theirs.state_dict()))
    assert back.param_groups[0]["kahan_sum"] is True  # kept: the key was saved
    torch_only = info.oracle([p.detach().clone().requires_grad_() for p in qs],
                             **build_kwargs(kwargs))
    torch_only.load_state_dict(copy.deepcopy(plain_sd))
    back2 = info.cls([p.detach().clone().requires_grad_() for p in qs],
                     **build_kwargs(kwargs), kahan_sum=True)
    back2.load_state_dict(copy.deepcopy(torch_only.state_dict()))
    assert back2.param_groups[0]["kahan_sum"] is True  # as constructed
    for p, gs in zip(back2.param_groups[0]["params"], grads[2]):
        p.grad = gs.to(dtype)
    back2.step()
    for p in back2.param_groups[0]["params"]:
        assert back2.state[p]["kahan_comp"].dtype == dtype


# ---------------------------------------------------------------- AMP, layouts


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("info", info_params())
def test_found_inf_advances_no_stream_and_changes_no_buffer(info, backend):
    """A skipped step leaves params, state, buffers and the counter; the run
    then continues exactly as one that never saw the skipped step."""
    skip_unless_runnable(backend)
    dtype = torch.bfloat16
    shapes = [(77,), (2, 9)]
    grads = _grads(shapes, 3, seed=13, scale=0.05)
    init = [torch.randn(s, generator=torch.Generator().manual_seed(14)).to(dtype)
            for s in shapes]
    runs = []
    for skip in (False, True):
        torch.manual_seed(1)
        ps = [p.clone().requires_grad_() for p in init]
        opt = info.cls(ps, backend=backend, **build_kwargs(info.full_state_example),
                       kahan_sum=True, stochastic_round=True)
        for k, gs in enumerate(grads):
            for p, g in zip(ps, gs):
                p.grad = g.to(dtype)
            opt.step()
            if skip and k == 1:
                before = _snapshot(opt)
                count = opt.state_dict()["stochastic_round"]["counter"]
                opt.grad_scale, opt.found_inf = torch.tensor(4.0), torch.tensor(1.0)
                opt.step()
                del opt.grad_scale, opt.found_inf
                _assert_same_bits(before, _snapshot(opt))
                assert opt.state_dict()["stochastic_round"]["counter"] == count
        runs.append(_snapshot(opt))
    _assert_same_bits(runs[0], runs[1])


@pytest.mark.parametrize("backend", BACKENDS)
def test_mixed_group_kahan_only_on_low_precision_params(backend):
    """One group of float32 and bfloat16 params: the float32 ones step as
    without the option and get no buffer; the bfloat16 ones get theirs."""
    skip_unless_runnable(backend)
    info = optim_db.get("AdamW")
    gen = torch.Generator().manual_seed(15)
    init = [torch.randn(50, generator=gen), torch.randn(30, generator=gen).bfloat16(),
            torch.randn(20, generator=gen)]
    grads = [[torch.randn(p.shape, generator=gen).to(p.dtype) for p in init]
             for _ in range(3)]
    ps = [p.clone().requires_grad_() for p in init]
    qs = [p.clone().requires_grad_() for p in init]
    a = info.cls(ps, backend=backend, **info.full_state_example, kahan_sum=True)
    b = info.cls(qs, backend=backend, **info.full_state_example)
    for gs in grads:
        for p, q, g in zip(ps, qs, gs):
            p.grad, q.grad = g.clone(), g.clone()
        a.step()
        b.step()
    for i in (0, 2):
        assert torch.equal(ps[i], qs[i])
        assert "kahan_comp" not in a.state[ps[i]]
    assert a.state[ps[1]]["kahan_comp"].abs().sum() > 0


@pytest.mark.parametrize("backend", BACKENDS)
def test_replaced_or_viewed_buffers_are_safe(backend):
    """A buffer the user replaced by a wrong shape is remade (zeros); one
    replaced by a strided view of a larger tensor is updated through the
    staged path: its neighbours (sentinels) are never written."""
    skip_unless_runnable(backend)
    info = optim_db.get("SGD")
    dtype = torch.bfloat16
    p = torch.ones(6, 4, dtype=dtype, requires_grad=True)
    opt = info.cls([p], lr=1.0, backend=backend, kahan_sum=True)
    p.grad = torch.full_like(p, 2.0 ** -10)
    opt.step()
    opt.state[p]["kahan_comp"] = torch.zeros(3, dtype=dtype)  # wrong shape
    opt.step()
    assert opt.state[p]["kahan_comp"].shape == p.shape
    big = torch.full((4, 8, 6), 7.0, dtype=dtype)
    view = big[1, 1:5, :].t()  # (6, 4), strided, inside sentinels
    view.zero_()
    opt.state[p]["kahan_comp"] = view
    before = p.detach().double() + view.double()
    opt.step()
    mask = torch.ones_like(big, dtype=torch.bool)
    mask[1, 1:5, :] = False
    assert (big[mask] == 7.0).all()
    after = p.detach().double() + opt.state[p]["kahan_comp"].double()
    assert torch.equal(after, before - 2.0 ** -10)


# -------------------------------------------------- the example, shortened
#
# examples/bf16_precision.py, shortened: Kahan summation and stochastic
# rounding keep a bfloat16 AdamW run next to the float32 one, where plain
# round-to-nearest stores fall behind.
#
# 800 steps instead of the example's 4000: long enough that plain bfloat16 is
# already clearly behind (~15% at this length, seeds 0-1) while both options
# stay within ~0.7% of float32. The assertions are on that ordering,
# with margin, not on the numbers. The reference kernels (backend='torch')
# keep it fast and free of JIT compiles; the compiled backends' stores are
# tested against the same specification (kernels/reference/_precision.py) in
# tests/test_precision_kernels.py.

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "bf16_precision.py"
STEPS, TAIL = 800, 100


def _load():
    spec = importlib.util.spec_from_file_location("fused_optim_example_bf16_precision", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def results():
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _load().compare(steps=STEPS, seed=0, device="cpu", backend="torch",
                               torch_baseline=False, tail=TAIL, log=lambda *a: None)
    finally:
        torch.set_num_threads(saved)


@pytest.mark.parametrize("measure", ["final", "eval"])
def test_options_stay_closer_to_fp32_than_plain_bf16(results, measure):
    fp32 = results["fp32"][measure]
    gap = {name: r[measure] / fp32 - 1.0 for name, r in results.items()}
    # plain bfloat16 falls behind float32 ...
    assert gap["bf16"] > 0.02, gap
    # ... and each option recovers most of it (0.3-0.7% here, against ~15%)
    for name in ("bf16+kahan", "bf16+sr"):
        assert abs(gap[name]) < gap["bf16"] / 4, (name, gap)
    # every run trained: well below the loss at the start
    for name, r in results.items():
        assert r["final"] < 0.75 * sum(r["losses"][:TAIL]) / TAIL, name


def test_same_init_and_data_for_every_variant(results):
    # the first step's loss is the shared init on the shared first batch
    # (bfloat16 rounding of the init moves it only slightly)
    first = {name: r["losses"][0] for name, r in results.items()}
    for name, loss in first.items():
        assert loss == pytest.approx(first["fp32"], rel=0.02), first
    assert first["bf16"] == first["bf16+kahan"] == first["bf16+sr"]
