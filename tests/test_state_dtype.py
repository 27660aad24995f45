"""state_dtype=torch.bfloat16: optimizer state in bfloat16, stochastically rounded.

What the option promises (``fused_optim/_precision.py``; the rounding's
specification is ``kernels/reference/_precision.py``, "Stochastically
rounded state"): every state tensor of a float32 or bfloat16 param is
stored in bfloat16, each store the float32 result of torch's own update
rounded once, stochastically, with the stream's bits; float16/float64
params keep torch's state; off, nothing changes. Checkpoints save what is
stored, load back bit for bit, convert to and from torch.optim's, and a
bad one is refused with nothing changed.

Numba specializations this file adds to CI's compile (tests/
test_specializations.py counts every configuration's): the four kernels'
serial entry points for float32 params with bfloat16 state (each
optimizer's ``full_state_example``: every state column present), AdamW's
without amsgrad (the other tests), its parallel one
(``test_parallel_path_equals_the_reference``) and its serial one for
bfloat16 params with Kahan and bfloat16 state
(``test_combines_with_bf16_params_and_kahan``): 7, one of them parallel.
"""

from __future__ import annotations

import copy

import pytest
import torch

import fused_optim
import optim_db
from fused_optim import _reuse_rule
from fused_optim.kernels.reference import _precision as P
from matrix import BACKENDS, build_kwargs, info_params, skip_unless_runnable
from sides import torchs_fresh_state

BF16 = dict(state_dtype=torch.bfloat16)
#: two rows, so that the second's global indices start past the first's
SHAPES = [(3, 5), (40,)]


def _params(shapes, dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=gen).to(dtype).requires_grad_() for s in shapes]


def _grads(shapes, steps, seed=1):
    gen = torch.Generator().manual_seed(seed)
    return [[torch.randn(s, generator=gen) for s in shapes] for _ in range(steps)]


def _state_names(info):
    """The record's state keys (the API's list, not restated here)."""
    from fused_optim._precision import _state_names
    return _state_names(info.cls)


def _torch_step(info, kwargs, params, our_opt, grads):
    """torch's for-loop step from our state widened to float32: each state's
    unrounded float32 result, and torch's params."""
    ps = [p.detach().clone().requires_grad_() for p in params]
    ref = info.oracle(ps, **build_kwargs(kwargs))
    init = ref._init_group

    def fresh_as_converted(group, *lists):
        # a fresh state our step reads converted, rounded to nearest (README,
        # "State of another dtype"): Rprop's lr-filled step_size, say; zeros
        # and the state loaded from ours below stay as they are
        out = init(group, *lists)
        for p in group["params"]:
            for name, t in ref.state[p].items():
                if (name != "step" and name not in info.record.scalars and torch.is_tensor(t)
                        and t.is_floating_point()):
                    t.copy_(t.to(torch.bfloat16))
        return out
    ref._init_group = fresh_as_converted
    # (a deep copy: torch's state_dict shares the step counters, which its
    # step advances in place)
    ref.load_state_dict(copy.deepcopy(fused_optim.state_dict_for_torch(our_opt)))
    for p, g in zip(ps, grads):
        p.grad = g.clone()
    ref.step()
    return ps, ref


def _round_like_the_kernels(opt, ref, params, names):
    """torch's float32 state rounded by the specification with this step's bits."""
    sd = opt.state_dict()["stochastic_round"]
    k0, k1 = P.keys(sd["seed"], sd["counter"], 0)  # one group, one kernel unit: salt 0
    out, start = [], 0
    for p, rp in zip(params, ref.param_groups[0]["params"]):
        row = {}
        for col, name in enumerate(names):
            if name in ref.state[rp]:
                t = ref.state[rp][name]
                idx = torch.arange(start, start + t.numel()).view(t.shape)
                row[name] = P.round_bf16(t.float(), P.state_bits(k0, k1, idx, col)).to(
                    torch.bfloat16)
        out.append(row)
        start += p.numel()
    return out


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("info", info_params())
def test_each_state_is_torchs_float32_result_rounded_once(info, backend):
    """Step by step against torch's for-loop on the same state in float32,
    its results rounded by the specification with the step's bits: SGD bit
    for bit; elsewhere a state that reads torch's CPU sqrt (1 ulp off in
    ~0.6% of float32 elements) may land one bfloat16 ulp away, no further,
    and params are within torch's float32 tolerance."""
    skip_unless_runnable(backend)
    kwargs = info.full_state_example
    names = _state_names(info)
    params = _params(SHAPES)
    opt = info.cls(params, backend=backend, **build_kwargs(kwargs), **BF16)
    for grads in _grads(SHAPES, 3):
        ref_params, ref = _torch_step(info, kwargs, params, opt, grads)
        want = _round_like_the_kernels(opt, ref, params, names)
        for p, g in zip(params, grads):
            p.grad = g.clone()
        opt.step()
        for p, rp, w in zip(params, ref_params, want):
            torch.testing.assert_close(p.detach(), rp.detach(), rtol=1.3e-6, atol=1e-5)
            scalars = info.record.scalars  # (torch's dtype and values, as the step counter)
            assert set(w) == {k for k in opt.state[p] if k != "step" and k not in scalars}
            for name in scalars:
                torch.testing.assert_close(opt.state[p][name], ref.state[rp][name], rtol=0,
                                           atol=0)
            for name, expected in w.items():
                got = opt.state[p][name]
                assert got.dtype == torch.bfloat16, name
                if info.is_bit_exact(torch.float32):
                    assert torch.equal(got, expected), name
                else:
                    gap = (got.float() - expected.float()).abs()
                    ulp = expected.float().abs().clamp_min(1e-30) * 2.0 ** -7
                    assert bool((gap <= ulp).all()), name
                    assert (gap > 0).float().mean() < 0.02, name


def test_stochastic_state_decays_where_nearest_would_freeze():
    """Why stochastic: with beta2 = 0.999 and zero gradients, a nearest-rounded
    bfloat16 exp_avg_sq stays at 1.0 for ever; rounded stochastically it
    decays as 0.999 ** steps in expectation (here over 20,000 elements)."""
    p = torch.zeros(20000, requires_grad=True)
    opt = fused_optim.Adam([p], lr=1e-3, backend="torch", **BF16)
    p.grad = torch.zeros_like(p)
    opt.step()
    opt.state[p]["exp_avg_sq"].fill_(1.0)
    nearest = torch.ones(20000, dtype=torch.bfloat16)
    steps = 300
    for _ in range(steps):
        opt.step()
        nearest = (nearest.float() * 0.999).to(torch.bfloat16)
    assert bool((nearest == 1.0).all())
    mean = opt.state[p]["exp_avg_sq"].double().mean().item()
    assert abs(mean / 0.999 ** steps - 1) < 2e-3, mean


@pytest.mark.parametrize("backend", ["numba", "triton"])
def test_parallel_path_equals_the_reference(backend):
    """A batch big enough for Numba's parallel entry point (whose thread split
    falls inside a row) and Triton rows over many programs: every state bit
    for bit the reference backend's (the same float32 math; params within
    torch's tolerance, as Adam's sqrt is not torch's)."""
    skip_unless_runnable(backend)
    shapes = [(33001,), (7,), (9999,)] if backend == "numba" else [(2100,), (7,)]
    runs = {}
    for be in ("torch", backend):
        params = _params(shapes)
        torch.manual_seed(0)  # the stream's seed
        opt = fused_optim.AdamW(params, lr=1e-2, backend=be, **BF16)
        for grads in _grads(shapes, 2):
            for p, g in zip(params, grads):
                p.grad = g
            opt.step()
        runs[be] = (params, opt)
    (pa, oa), (pb, ob) = runs["torch"], runs[backend]
    for a, b in zip(pa, pb):
        torch.testing.assert_close(a.detach(), b.detach(), rtol=1.3e-6, atol=1e-5)
        for name in ("exp_avg", "exp_avg_sq"):
            assert torch.equal(oa.state[a][name], ob.state[b][name]), name


@pytest.mark.parametrize("backend", BACKENDS)
def test_combines_with_bf16_params_and_kahan(backend):
    """bfloat16 params with kahan_sum and bfloat16 state: the state rounds
    stochastically (plain bfloat16 state rounds to nearest), the Kahan
    buffers as without the option; every backend equals the reference."""
    skip_unless_runnable(backend)
    out = {}
    for be, options in (("torch", BF16), (backend, BF16), ("torch", {})):
        params = _params(SHAPES, torch.bfloat16)
        torch.manual_seed(0)
        opt = fused_optim.AdamW(params, lr=1e-2, backend=be, kahan_sum=True, **options)
        for grads in _grads(SHAPES, 3):
            for p, g in zip(params, grads):
                p.grad = g.to(torch.bfloat16)
            opt.step()
        out[(be, bool(options))] = [{k: v for k, v in opt.state[p].items()} for p in params]
    ref, got, plain = out[("torch", True)], out[(backend, True)], out[("torch", False)]
    for r, g in zip(ref, got):
        assert r["exp_avg"].dtype == torch.bfloat16
        assert torch.equal(r["exp_avg"], g["exp_avg"])
        assert torch.equal(r["exp_avg_sq"], g["exp_avg_sq"])
    # the option changes the state's rounding, nothing else's dtype
    assert any(not torch.equal(r["exp_avg_sq"], q["exp_avg_sq"]) for r, q in zip(ref, plain))
    assert all(r["kahan_comp"].dtype == torch.bfloat16 for r in ref)


@pytest.mark.parametrize("info", info_params())
def test_other_params_keep_torchs_state(info):
    """float64 and float16 params keep their own state dtype; float32 ones
    get bfloat16 state, in one group."""
    params = [torch.randn(4, dtype=dt, requires_grad=True)
              for dt in (torch.float32, torch.float64, torch.float16)]
    opt = info.cls(params, backend="torch", **build_kwargs(info.full_state_example), **BF16)
    for p in params:
        p.grad = torch.randn_like(p)
    opt.step()
    names = _state_names(info)
    for p, want in zip(params, (torch.bfloat16, torch.float64, torch.float16)):
        for name in names:
            if name in opt.state[p]:
                assert opt.state[p][name].dtype == want, (p.dtype, name)


@pytest.mark.parametrize("info", info_params())
def test_off_is_torchs_state_and_checkpoint(info):
    params = _params(SHAPES)
    opt = info.cls(params, backend="torch", **build_kwargs(info.full_state_example))
    for p, g in zip(params, _grads(SHAPES, 1)[0]):
        p.grad = g
    opt.step()
    sd = opt.state_dict()
    assert "state_dtype" not in sd["param_groups"][0] and "stochastic_round" not in sd
    assert all(v.dtype == torch.float32 for st in sd["state"].values() for v in st.values())


def test_bad_state_dtype_is_refused():
    with pytest.raises(ValueError, match="state_dtype must be None or torch.bfloat16"):
        fused_optim.AdamW([torch.zeros(2, requires_grad=True)], state_dtype=torch.float16)


# ------------------------------------------------------------------ checkpoints

def _stepped(info, backend, steps=2, **options):
    params = _params(SHAPES)
    torch.manual_seed(0)
    opt = info.cls(params, backend=backend, **build_kwargs(info.full_state_example), **options)
    for grads in _grads(SHAPES, steps):
        for p, g in zip(params, grads):
            p.grad = g.clone()
        opt.step()
    return params, opt


def _continue(params, opt, seed=7):
    for grads in _grads(SHAPES, 2, seed):
        for p, g in zip(params, grads):
            p.grad = g.clone()
        opt.step()
    return [p.detach().clone() for p in params], [
        {k: v.clone() for k, v in opt.state[p].items()} for p in params]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("info", info_params())
def test_checkpoint_saves_what_is_stored_and_resumes_bit_for_bit(info, backend):
    skip_unless_runnable(backend)
    params, opt = _stepped(info, backend, **BF16)
    sd = copy.deepcopy(opt.state_dict())
    names = _state_names(info)
    assert all(v.dtype == torch.bfloat16 for st in sd["state"].values()
               for k, v in st.items() if k in names)
    assert sd["param_groups"][0]["state_dtype"] == torch.bfloat16
    twin = [p.detach().clone().requires_grad_() for p in params]
    other = info.cls(twin, backend=backend, **build_kwargs(info.full_state_example), **BF16)
    other.load_state_dict(sd)
    assert all(other.state[q][k].dtype == torch.bfloat16 for q in twin for k in names
               if k in other.state[q])
    a, b = _continue(params, opt), _continue(twin, other)
    for x, y in zip(a[0], b[0]):
        assert torch.equal(x, y)
    for x, y in zip(a[1], b[1]):
        assert x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)


@pytest.mark.parametrize("info", info_params())
def test_state_dict_for_torch_loads_into_torch_optim(info):
    params, opt = _stepped(info, "torch", **BF16)
    sd = copy.deepcopy(fused_optim.state_dict_for_torch(opt))
    assert "stochastic_round" not in sd and "state_dtype" not in sd["param_groups"][0]
    ps = [p.detach().clone().requires_grad_() for p in params]
    ref = info.oracle(ps, **build_kwargs(info.full_state_example))
    ref.load_state_dict(sd)
    for p, q in zip(params, ps):
        for k, v in opt.state[p].items():
            assert ref.state[q][k].dtype == (torch.float32 if k != "step" else v.dtype)
            assert torch.equal(ref.state[q][k], v.to(ref.state[q][k].dtype)), k
    for p, g in zip(ps, _grads(SHAPES, 1)[0]):
        p.grad = g
    ref.step()  # torch's own step runs on it


class _Made(torch.overrides.TorchFunctionMode):
    """Every tensor ``torch.zeros_like``/``full_like`` makes from one of
    ``params`` or their grads, with its value as made."""

    def __init__(self, params):
        super().__init__()
        self.watch = {id(t) for p in params for t in (p, p.grad)}
        self.made = {}

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if (func is torch.zeros_like or func is torch.full_like) and id(args[0]) in self.watch:
            self.made[id(out)] = out.clone()
        return out


@pytest.mark.parametrize("info", info_params())
def test_fresh_state_is_made_in_bfloat16(info):
    """A float32 param's fresh state is made in bfloat16 where torch makes
    it (never a float32 copy converted at the first step, which doubled the
    first step's peak memory): each state tensor is one torch's own code
    made, holding torch's fresh value rounded to nearest (zeros, Adagrad's
    initial_accumulator_value, Rprop's lr); step counters and scalar states
    as torch makes them."""
    params = _params(SHAPES)
    for p, g in zip(params, _grads(SHAPES, 1)[0]):
        p.grad = g
    kwargs = build_kwargs(info.full_state_example)
    with _Made(params) as made:  # (Adagrad makes its state in its constructor)
        opt = info.cls(params, backend="torch", **kwargs, **BF16)
        opt.step()
    names = _state_names(info)
    for p in params:
        fresh = torchs_fresh_state(opt, p)
        state = opt.state[p]
        assert any(k in state for k in names), state
        for k, t in state.items():
            if k in names:
                assert t.dtype == torch.bfloat16 and id(t) in made.made, k
                # (SGD's buffer: torch's loop makes it from the grad at the
                # step; here zeros, which the kernel writes whole)
                expected = fresh[k] if k in fresh else torch.zeros_like(t)
                assert torch.equal(made.made[id(t)], expected), k
            elif k in fresh:  # the step counter, scalar states: placed as torch's
                assert (t.dtype, t.device, t.shape) == (fresh[k].dtype, fresh[k].device,
                                                        fresh[k].shape), k


@pytest.mark.parametrize("info", info_params())
def test_a_torch_checkpoint_loads_into_bf16_state(info):
    """torch.optim's float32 state is converted (rounded to nearest) on load,
    and the option stays on (a torch group has no ``state_dtype`` key)."""
    params = _params(SHAPES)
    ref = info.oracle(params, **build_kwargs(info.full_state_example))
    for p, g in zip(params, _grads(SHAPES, 1)[0]):
        p.grad = g
    ref.step()
    sd = ref.state_dict()
    opt = info.cls(params, backend="torch", **build_kwargs(info.full_state_example), **BF16)
    opt.load_state_dict(sd)
    assert opt.param_groups[0]["state_dtype"] == torch.bfloat16
    for p in params:
        for k, v in ref.state[p].items():
            if k == "step" or k in info.record.scalars:  # (kept as torch has them)
                assert torch.equal(opt.state[p][k], v), k
                continue
            assert torch.equal(opt.state[p][k], v.to(torch.bfloat16)), k


def test_a_bad_checkpoint_is_refused_with_nothing_changed():
    params, opt = _stepped(optim_db.OPTIM_DB[0], "torch", **BF16)
    before = copy.deepcopy(opt.state_dict())
    bad = copy.deepcopy(before)
    bad["param_groups"][0]["state_dtype"] = torch.float16
    bad["param_groups"][0]["lr"] = 123.0
    for st in bad["state"].values():
        for k, v in st.items():
            st[k] = v.float() + 1
    with pytest.raises(ValueError, match="state_dtype must be None or torch.bfloat16"):
        opt.load_state_dict(bad)
    after = opt.state_dict()
    assert after["param_groups"] == before["param_groups"]
    for i, st in before["state"].items():
        assert all(torch.equal(v, after["state"][i][k]) for k, v in st.items())


def test_state_of_another_dtype_is_converted_never_misread():
    """A state set by hand in float64 (or loaded without the option's
    conversion) is converted to bfloat16 at the step that finds it: the run
    equals one whose state was bfloat16 already."""
    runs = []
    for dtype in (torch.bfloat16, torch.float64):
        params = _params(SHAPES)
        torch.manual_seed(0)
        opt = fused_optim.AdamW(params, lr=1e-2, backend="numba", **BF16)
        for p, g in zip(params, _grads(SHAPES, 1)[0]):
            p.grad = g
        opt.step()
        p = params[1]
        for k in ("exp_avg", "exp_avg_sq"):
            opt.state[p][k] = opt.state[p][k].to(dtype)
        runs.append(_continue(params, opt))
        assert all(opt.state[p][k].dtype == torch.bfloat16 for k in ("exp_avg", "exp_avg_sq"))
    for x, y in zip(runs[0][0], runs[1][0]):
        assert torch.equal(x, y)


def test_a_failing_step_converts_nothing():
    p = torch.zeros(4, requires_grad=True)
    opt = fused_optim.Adam([p], backend="numba", **BF16)
    p.grad = torch.ones(4)
    opt.step()
    opt.state[p]["exp_avg"] = opt.state[p]["exp_avg"].double()
    opt.param_groups[0]["betas"] = (1.0, 0.999)  # torch's loop: ZeroDivisionError
    with pytest.raises(ZeroDivisionError):
        opt.step()
    assert opt.state[p]["exp_avg"].dtype == torch.float64


@pytest.mark.parametrize("backend", BACKENDS)
def test_rows_torch_steps_take_widened_state(backend):
    """A row the kernels do not take (AdamW with the grad on its own param:
    torch decays the param before reading it) runs torch's for-loop on its
    state widened to float32, stored back rounded to nearest: torch's step
    on that state, bit for bit; and torch's error first where torch raises."""
    skip_unless_runnable(backend)
    p = torch.randn(16, requires_grad=True)
    opt = fused_optim.AdamW([p], lr=1e-2, weight_decay=0.5, backend=backend, **BF16)
    p.grad = torch.randn(16)
    opt.step()
    q = p.detach().clone().requires_grad_()
    ref = torch.optim.AdamW([q], lr=1e-2, weight_decay=0.5, foreach=False)
    ref.load_state_dict(copy.deepcopy(fused_optim.state_dict_for_torch(opt)))
    p.grad = p.data
    q.grad = q.data
    opt.step()
    ref.step()
    assert torch.equal(p.detach(), q.detach())
    for k in ("exp_avg", "exp_avg_sq"):
        assert opt.state[p][k].dtype == torch.bfloat16
        assert torch.equal(opt.state[p][k], ref.state[q][k].to(torch.bfloat16))
    opt.param_groups[0]["betas"] = (1.0, 0.999)
    with pytest.raises(ZeroDivisionError):
        opt.step()


# ------------------------------------------------------------------ around the step

@pytest.mark.parametrize("backend", BACKENDS)
def test_gradscaler_unscales_and_skips(backend):
    """A step GradScaler skips changes no state and no stream counter; an
    exact power-of-two scale gives the unscaled run's bits."""
    skip_unless_runnable(backend)
    runs = []
    for scale in (None, 1024.0):
        params = _params(SHAPES)
        torch.manual_seed(0)
        opt = fused_optim.AdamW(params, lr=1e-2, backend=backend, **BF16)
        for grads in _grads(SHAPES, 2):
            for p, g in zip(params, grads):
                p.grad = g if scale is None else g * scale
            if scale is None:
                opt.step()
            else:
                opt.grad_scale = torch.tensor(scale)
                opt.found_inf = torch.tensor(0.0)
                opt.step()
        if scale is not None:
            before = copy.deepcopy(opt.state_dict())
            opt.found_inf = torch.tensor(1.0)
            opt.step()
            after = opt.state_dict()
            assert after["stochastic_round"] == before["stochastic_round"]
            for i, st in before["state"].items():
                assert all(torch.equal(v, after["state"][i][k]) for k, v in st.items())
            del opt.grad_scale, opt.found_inf
        runs.append(([p.detach() for p in params], opt))
    (pa, oa), (pb, ob) = runs
    for a, b in zip(pa, pb):
        assert torch.equal(a, b)
        assert all(torch.equal(oa.state[a][k], ob.state[b][k]) for k in oa.state[a])


@pytest.mark.parametrize("dtype,options", [(torch.float32, BF16),
                                           (torch.bfloat16, dict(stochastic_round=True))],
                         ids=["state_dtype", "stochastic_round"])
def test_compiled_step_equals_the_eager_one(dtype, options):
    """Under torch.compile the step runs eagerly behind a graph break (the
    step operator's schema does not carry the options): the eager bits, the
    stream advancing at every step (it did not, for either option, while the
    first traced step made the stream's counters)."""
    runs = []
    for compiled in (False, True):
        params = _params(SHAPES, dtype)
        torch.manual_seed(0)
        opt = fused_optim.AdamW(params, lr=1e-2, backend="numba", **options)

        def step():
            opt.step()
        fn = torch.compile(step) if compiled else step
        for grads in _grads(SHAPES, 3):
            for p, g in zip(params, grads):
                p.grad = g.to(dtype)
            fn()
        runs.append((params, opt))
    torch._dynamo.reset()
    (pa, oa), (pb, ob) = runs
    assert ob.state_dict()["stochastic_round"]["counter"] == 3
    for a, b in zip(pa, pb):
        assert torch.equal(a.detach(), b.detach())
        assert all(torch.equal(oa.state[a][k], ob.state[b][k]) for k in oa.state[a])


def test_patched_torch_keeps_torchs_state():
    """``fused-optim run`` (patch_torch) swaps the classes; the option stays
    opt-in by keyword, so a patched script keeps float32 state."""
    with fused_optim.patch_torch():
        p = torch.randn(4, requires_grad=True)
        opt = torch.optim.AdamW([p])
        p.grad = torch.randn(4)
        opt.step()
        assert isinstance(opt, fused_optim.AdamW)
        assert opt.state[p]["exp_avg"].dtype == torch.float32
        assert "state_dtype" not in opt.param_groups[0]


# ------------------------------------------------------------------ the reuse rule

def f1_state_dtype(backend):
    """F1 (dtype): a plain optimizer's float32 state replaced by a bfloat16 view
    of its own memory (same address and shape, half the bytes). With the
    rule the group is re-validated: torch's own step runs the row and raises
    torch's error; a reused plan would read and write it as float32, past
    the view's elements (into the sentinel half of its storage)."""
    p = torch.randn(64, requires_grad=True)
    opt = fused_optim.Adam([p], lr=0.01, backend=backend)
    p.grad = torch.randn(64)
    opt.step()
    base = opt.state[p]["exp_avg"].clone()  # 256 bytes; a bf16 view covers 128
    opt.state[p]["exp_avg"] = base  # float32: a new address, re-validated
    p.grad = torch.randn(64)
    opt.step()
    sentinel = base.view(torch.bfloat16)[64:].clone()
    opt.state[p]["exp_avg"] = base.view(torch.bfloat16)[:64]  # same address, bfloat16
    p.grad = torch.randn(64)
    raised = None
    try:
        opt.step()
    except RuntimeError as err:
        raised = err
    return raised, torch.equal(base.view(torch.bfloat16)[64:], sentinel)


def test_state_dtype_with_the_rule_is_refused_safely():
    raised, intact = f1_state_dtype("numba")
    assert raised is not None and intact


def test_state_dtype_without_the_rule_is_misread(monkeypatch):
    monkeypatch.setattr(_reuse_rule, "f1_metadata", lambda *args: True)
    raised, intact = f1_state_dtype("numba")
    assert raised is None and not intact


def test_a_plan_is_reused_only_under_its_option():
    """A plan validated for bfloat16 state is not reused once the group's
    option is off (its rows are then torch's rows: state of another dtype)."""
    p = torch.randn(16, requires_grad=True)
    opt = fused_optim.AdamW([p], backend="numba", **BF16)
    for _ in range(2):
        p.grad = torch.randn(16)
        opt.step()
    plan = opt._plans[0]
    del opt.param_groups[0]["state_dtype"]
    p.grad = torch.randn(16)
    with pytest.raises(RuntimeError):
        opt.step()  # torch's loop: a bfloat16 exp_avg for a float32 param
    assert opt._plans.get(0) is not plan


# ------------------------------------------------------------------ offline Triton compile

_COMPILE = r"""
import json, re, sys, importlib
sys.path.insert(0, sys.argv[1])
import torch, triton.language as tl
import _compile_matrix as m
from fused_optim import _registry
from fused_optim.kernels.triton import _launch

_PTRS = {"table_ptr": "*i64", "map_ptr": "*i32", "hyper_ptr": "*fp64",
         "scal_ptr": "*fp64", "grad_scale_ptr": "*fp32", "found_inf_ptr": "*fp32",
         "counter_ptr": "*i64"}
_ON = {"sgd": dict(USE_MOMENTUM=True), "adam": dict(AMSGRAD=True), "adagrad": {},
       "rmsprop": dict(CENTERED=True, USE_MOMENTUM=True)}
for kernel in sorted({r.kernel for r in _registry.records()}):
    fn = getattr(importlib.import_module(f"fused_optim.kernels.triton.{kernel}"),
                 f"_{kernel}_kernel")
    sw = dict(TAIL_ALIGNED=True, HAS_GRAD_SCALE=True, HAS_FOUND_INF=True, KAHAN=False,
              SR=False, S_ELEM=_launch._ELEM[torch.bfloat16], S_IS_BF16=True, SSR=True,
              **_ON.get(kernel, {}))
    const = m.launcher_consts(torch.float32, True, sw)
    for cap in map(int, sys.argv[2].split(",")):
        ptx = m.compile_ptx(m.ast_source(fn, dict(const), _PTRS, {}), cap,
                            _launch.num_warps(torch.float32, True, True))
        body = ptx.split(".section")[0]
        out = dict(kernel=kernel, arch=cap, **m.ptx_facts(ptx, "float32", cap),
                   int_mul=len(re.findall(r"\bmul\.lo\.[su]32\b", body)))
        print(json.dumps(out), flush=True)
"""


def _streams(kernel):
    """The streams ``kernel`` reads and writes with every switch on: param,
    grad and each state it keeps (the record's), param and those states."""
    from fused_optim import _registry
    n = {r.kernel: len(r.state) for r in _registry.records()}[kernel]
    return 2 + n, 1 + n


def test_triton_bf16_state_specializations_compile_cleanly():
    """Each kernel with float32 params and stochastically rounded bfloat16 state
    (every switch on, aligned with the tail hint), offline for sm_80 and
    sm_90: no local memory or spills, IEEE float math, a 128-bit access per
    stream on the whole-block path and per float32 stream (param, grad) on
    the masked one too, and the hash's multiplies."""
    pytest.importorskip("triton")
    import os
    import subprocess
    import sys
    from pathlib import Path

    here = Path(__file__).parent
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, "-c", _COMPILE, str(here), "80,90"],
                         capture_output=True, text=True, env=env, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    results = [__import__("json").loads(line) for line in out.stdout.splitlines()
               if line.startswith("{")]
    from fused_optim import _registry
    assert len(results) == len({r.kernel for r in _registry.records()}) * 2
    bad = {}
    for r in results:
        reads, writes = _streams(r["kernel"])
        why = []
        if r["stack_bytes"] or r["spill_store_bytes"] or r["spill_load_bytes"] or r["local"]:
            why.append("local memory")
        if r["inexact"]:
            why.append(f"non-IEEE {r['inexact']}")
        # (the masked path's bfloat16 state is 64-bit: TAIL_ALIGNED promises
        # 16 bytes of float32, 4 elements, which is 8 bytes of bfloat16)
        if r["vector_loads"] < reads + 2 or r["vector_stores"] < writes + 1:
            why.append(f"{r['vector_loads']} v4 loads, {r['vector_stores']} v4 stores")
        if r["int_mul"] < 4:
            why.append("no integer mixing")
        if why:
            bad[f"{r['kernel']} sm_{r['arch']}"] = why
    assert not bad, bad


# ------------------------------------------------------------------ the example

def test_example_halves_the_state_and_keeps_the_loss():
    """examples/bf16_state.py, shortened to 800 steps: 8 bytes of state per
    param in float32, 4 in bfloat16, the same init and data, and bfloat16
    state's final loss within 1% of float32 state's."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parent.parent / "examples" / "bf16_state.py"
    spec = importlib.util.spec_from_file_location("bf16_state", path)
    ex = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(ex)
    fp32 = ex.train("fp32 state", steps=800, backend="numba", tail=200)
    bf16 = ex.train("bf16 state", steps=800, backend="numba", tail=200)
    assert fp32["state_bytes"] == 8.0 and bf16["state_bytes"] == 4.0
    assert fp32["losses"][0] == bf16["losses"][0]  # same init, same first batch
    assert abs(bf16["final"] / fp32["final"] - 1) < 0.01
    assert abs(bf16["eval"] / fp32["eval"] - 1) < 0.01
