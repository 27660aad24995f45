"""Triton backend: kernels against the pure-torch reference and torch.optim.

Without CUDA the kernels run under ``TRITON_INTERPRET=1`` on CPU tensors, at
roughly 10 ms per program (one ``BLOCK`` chunk of one tensor), so every
tensor here is small; sizes straddle ``BLOCK`` (1023, 1025) and tests that
need rows spanning many programs lower ``BLOCK`` instead of growing tensors.
"""

import importlib
import inspect
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import numpy as np  # noqa: E402
import pytest  # noqa: E402

pytest.importorskip("triton")

import triton.language as tl  # noqa: E402

import fused_optim  # noqa: E402
import optim_db  # noqa: E402
from fused_optim import _plan  # noqa: E402
from fused_optim.kernels import contract  # noqa: E402
from fused_optim.kernels import columns as L  # noqa: E402
from fused_optim.kernels import reference  # noqa: E402
from fused_optim.kernels import contract  # noqa: E402
from fused_optim.kernels import triton as tk  # noqa: E402
from fused_optim.kernels.triton import _launch  # noqa: E402
from matrix import (TOLERANCE, clone_params, config_id, make,  # noqa: E402
                    skip_unless_runnable)

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")

#: 1-element, just under/over one BLOCK, empty and 0-dim rows in one batch.
SIZES = [1, 7, 1023, 1025, 0, ()]


def _shape(size):
    return () if size == () else (size,)


def _randn(sizes, dtype, gen, scale=1.0):
    return [(torch.randn(_shape(s), generator=gen, dtype=torch.float64) * scale)
            .to(device=DEVICE, dtype=dtype) for s in sizes]


def _clone(ts):
    return [None if t is None else t.clone() for t in ts]


def _assert_all_close(actual, expected, **kw):
    assert len(actual) == len(expected)
    for i, (a, e) in enumerate(zip(actual, expected)):
        if a is None and e is None:
            continue
        torch.testing.assert_close(a, e, msg=lambda m, i=i: f"tensor {i}: {m}", **kw)


# --------------------------------------------------------------------------
# kernel-level drivers (a Batch built by the API layer's packer)


def _run_sgd(backend, params, grads, bufs, row_flags, **hyper):
    for batch, finish in _plan.pack(params, grads, [bufs], ("momentum_buffer",),
                                    row_flags=row_flags if hyper["momentum"] else None):
        contract.kernel(backend, "sgd")(batch, **hyper)
        finish()


def _run_adam(backend, params, grads, states, steps, **hyper):
    for batch, finish in _plan.pack(params, grads, states,
                                    ("exp_avg", "exp_avg_sq", "max_exp_avg_sq"), steps=steps):
        contract.kernel(backend, "adam")(batch, **hyper)
        finish()


def _sgd_hyper(**kw):
    hyper = dict(lr=0.1, weight_decay=0.0, momentum=0.0, dampening=0.0,
                 nesterov=False, maximize=False)
    hyper.update(kw)
    return hyper


def _adam_hyper(**kw):
    hyper = dict(lr=0.01, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.0,
                 decoupled_weight_decay=False, amsgrad=False, maximize=False)
    hyper.update(kw)
    return hyper


class _SgdState:
    """Params and momentum buffers (None: no momentum) for a kernel-level run."""

    def __init__(self, sizes, dtype, seed, momentum):
        gen = torch.Generator().manual_seed(seed)
        self.params = _randn(sizes, dtype, gen)
        self.bufs = ([torch.zeros_like(p) for p in self.params] if momentum
                     else [None] * len(sizes))

    def clone(self):
        other = object.__new__(_SgdState)
        other.params, other.bufs = _clone(self.params), _clone(self.bufs)
        return other

    def tensors(self):
        return self.params + [b for b in self.bufs if b is not None]


class _AdamState:
    """Params, moments and per-row step counters for a kernel-level run."""

    def __init__(self, sizes, dtype, seed, amsgrad, step_device=DEVICE):
        gen = torch.Generator().manual_seed(seed)
        self.params = _randn(sizes, dtype, gen)
        self.exp_avg = [torch.zeros_like(p) for p in self.params]
        self.exp_avg_sq = [torch.zeros_like(p) for p in self.params]
        self.max_exp_avg_sq = ([torch.zeros_like(p) for p in self.params] if amsgrad
                               else [None] * len(sizes))
        # alternate float32 / float64 counters: both FLAG_STEP_F64 cases
        self.steps = [torch.zeros((), dtype=torch.float64 if i % 2 else torch.float32,
                                  device=step_device) for i in range(len(sizes))]

    def clone(self):
        other = object.__new__(_AdamState)
        for name in ("params", "exp_avg", "exp_avg_sq", "max_exp_avg_sq", "steps"):
            setattr(other, name, _clone(getattr(self, name)))
        return other

    def states(self):
        return [self.exp_avg, self.exp_avg_sq, self.max_exp_avg_sq]

    def tensors(self):
        return (self.params + self.exp_avg + self.exp_avg_sq + self.steps
                + [t for t in self.max_exp_avg_sq if t is not None])


def _sizes(params):
    return [p.shape[0] if p.dim() else () for p in params]


def _sgd_steps(state, backend, nsteps, seed, dtype, **hyper):
    gen = torch.Generator().manual_seed(seed)
    for step in range(nsteps):
        grads = _randn(_sizes(state.params), dtype, gen)
        row_flags = [step == 0] * len(grads)
        _run_sgd(backend, state.params, grads, state.bufs, row_flags, **hyper)


def _adam_steps(state, backend, nsteps, seed, dtype, **hyper):
    gen = torch.Generator().manual_seed(seed)
    for _ in range(nsteps):
        grads = _randn(_sizes(state.params), dtype, gen)
        _run_adam(backend, state.params, grads, state.states(), state.steps, **hyper)


SGD_CONFIGS = [
    dict(),
    dict(momentum=0.9, dampening=0.1),
    dict(momentum=0.9, nesterov=True, weight_decay=0.01),
    dict(maximize=True, weight_decay=0.05),
    dict(momentum=0.5, maximize=True, weight_decay=0.01, lr=0.3),
]

ADAM_CONFIGS = [
    dict(),
    dict(amsgrad=True),
    dict(weight_decay=0.1, maximize=True),
    dict(weight_decay=0.1, decoupled_weight_decay=True, amsgrad=True),
    # 1 - beta1 >= 0.5: the other side of torch.lerp's formula
    dict(beta1=0.3, beta2=0.5, eps=1e-3, weight_decay=0.01, lr=0.1),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("config", SGD_CONFIGS, ids=str)
def test_sgd_kernel_matches_reference(dtype, config):
    hyper = _sgd_hyper(**config)
    ours = _SgdState(SIZES, dtype, 0, hyper["momentum"])
    ref = ours.clone()
    _sgd_steps(ours, tk, 3, 1, dtype, **hyper)
    _sgd_steps(ref, reference, 3, 1, dtype, **hyper)
    _assert_all_close(ours.tensors(), ref.tensors())


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("config", ADAM_CONFIGS, ids=str)
def test_adam_kernel_matches_reference(dtype, config):
    hyper = _adam_hyper(**config)
    ours = _AdamState(SIZES, dtype, 0, hyper["amsgrad"])
    ref = ours.clone()
    _adam_steps(ours, tk, 3, 1, dtype, **hyper)
    _adam_steps(ref, reference, 3, 1, dtype, **hyper)
    _assert_all_close(ours.tensors(), ref.tensors())
    # every row advanced, the empty one included
    assert [float(s) for s in ours.steps] == [3.0] * len(SIZES)


LOW_AND_FULL = [torch.float32, torch.float64, torch.bfloat16, torch.float16]


@pytest.mark.parametrize("dtype", LOW_AND_FULL)
def test_bit_identical_to_numba(dtype):
    """Same operations, same roundings as the Numba backend (bf16/fp16 too).

    The one allowed difference: float64 Adam's bias corrections, where
    exp2(step * log2(beta)) and Python's beta ** step may differ by an ulp.
    """
    if DEVICE.type != "cpu":
        pytest.skip("the Numba backend runs on CPU tensors")
    numba_backend = pytest.importorskip("fused_optim.kernels.numba")
    # a scale that is not a power of two: the unscaling rounds, identically
    amp = dict(grad_scale=torch.tensor([1000.0]), found_inf=torch.tensor([0.0]))
    for config in SGD_CONFIGS[1:3] + [dict(momentum=0.9, **amp)]:
        hyper = _sgd_hyper(**config)
        ours = _SgdState(SIZES, dtype, 30, True)
        theirs = ours.clone()
        _sgd_steps(ours, tk, 2, 31, dtype, **hyper)
        _sgd_steps(theirs, numba_backend, 2, 31, dtype, **hyper)
        _assert_all_close(ours.tensors(), theirs.tensors(), rtol=0, atol=0, equal_nan=True)
    for config in ADAM_CONFIGS[3:] + [dict(amsgrad=True, **amp)]:
        hyper = _adam_hyper(**config)
        ours = _AdamState(SIZES, dtype, 32, hyper["amsgrad"])
        theirs = ours.clone()
        _adam_steps(ours, tk, 2, 33, dtype, **hyper)
        _adam_steps(theirs, numba_backend, 2, 33, dtype, **hyper)
        tol = dict(rtol=1e-13, atol=0) if dtype == torch.float64 else dict(rtol=0, atol=0)
        _assert_all_close(ours.tensors(), theirs.tensors(), equal_nan=True, **tol)


def _host_steps(monkeypatch):
    """Where host-side step counters live: on CUDA, the CPU (as torch keeps
    them for CUDA params); under the interpreter, where params are CPU
    tensors too, the host path is forced (its reads are of host memory)."""
    if DEVICE.type == "cuda":
        return torch.device("cpu")
    monkeypatch.setattr(_launch, "_steps_on_device", lambda batch: False)
    return DEVICE


def test_adam_host_steps_match_reference(monkeypatch):
    """Steps not on the params' device (torch's default for CUDA params)."""
    step_device = _host_steps(monkeypatch)
    hyper = _adam_hyper(amsgrad=True, weight_decay=0.01)
    ours = _AdamState(SIZES, torch.float32, 0, True, step_device)
    ref = ours.clone()
    _adam_steps(ours, tk, 3, 1, torch.float32, **hyper)
    _adam_steps(ref, reference, 3, 1, torch.float32, **hyper)
    _assert_all_close(ours.tensors(), ref.tensors())
    assert [float(s) for s in ours.steps] == [3.0] * len(SIZES)


@pytest.mark.parametrize("optim", ["sgd", "adam"])
def test_rows_spanning_many_programs(monkeypatch, optim):
    """A small BLOCK: rows of many programs, Adam's per-row step counters."""
    monkeypatch.setattr(_launch, "BLOCK", 16)
    sizes = [100, 37, 0, 1, 16, 17]
    if optim == "sgd":
        hyper = _sgd_hyper(momentum=0.9, nesterov=True)
        ours = _SgdState(sizes, torch.float32, 2, True)
        ref = ours.clone()
        _sgd_steps(ours, tk, 3, 3, torch.float32, **hyper)
        _sgd_steps(ref, reference, 3, 3, torch.float32, **hyper)
    else:
        hyper = _adam_hyper(amsgrad=True)
        ours = _AdamState(sizes, torch.float32, 2, True)
        ref = ours.clone()
        _adam_steps(ours, tk, 3, 3, torch.float32, **hyper)
        _adam_steps(ref, reference, 3, 3, torch.float32, **hyper)
        # each step counted once per call although 7 programs share row 0
        assert [float(s) for s in ours.steps] == [3.0] * len(sizes)
    _assert_all_close(ours.tensors(), ref.tensors())


def test_never_writes_outside_rows():
    """Rows that are misaligned views into larger buffers (ALIGNED off)."""
    gen = torch.Generator().manual_seed(5)
    bufs = {k: torch.randn(2200, generator=gen).to(DEVICE)
            for k in ("p", "g", "m", "v", "vmax")}
    bufs["m"].zero_(), bufs["v"].zero_(), bufs["vmax"].zero_()
    spans = [(3, 10), (13, 1038), (1041, 1041), (1100, 1101), (1103, 2100)]

    def views(b):
        vs = [b[lo:hi] for lo, hi in spans]
        vs.append(b[2150])  # 0-dim view
        return vs

    def run(backend, bs):
        steps = [torch.zeros((), device=DEVICE) for _ in range(len(spans) + 1)]
        states = [views(bs["m"]), views(bs["v"]), views(bs["vmax"])]
        for _ in range(2):
            _run_adam(backend, views(bs["p"]), views(bs["g"]), states, steps,
                      **_adam_hyper(amsgrad=True, weight_decay=0.1))

    ours = {k: b.clone() for k, b in bufs.items()}
    ref = {k: b.clone() for k, b in bufs.items()}
    assert ours["p"][3:].data_ptr() % 16 != 0
    run(tk, ours)
    run(reference, ref)
    inside = torch.zeros(2200, dtype=torch.bool, device=DEVICE)
    for lo, hi in spans:
        inside[lo:hi] = True
    inside[2150] = True
    for k in bufs:
        torch.testing.assert_close(ours[k], ref[k])
        assert torch.equal(ours[k][~inside], bufs[k][~inside]), k


def test_int64_offsets_beyond_2_31():
    """A row of 2**31 + 100 elements: only its last program is launched.

    The table points the row 2**31 elements before a small buffer, so the
    launched program lands in the buffer only if its offsets are 64-bit.
    """
    block = _launch.BLOCK
    numel = 2**31 + 100
    chunk = numel // block
    assert chunk * block == 2**31
    gen = torch.Generator().manual_seed(6)
    p = torch.randn(block + 8, generator=gen).to(DEVICE)
    g = torch.randn(block + 8, generator=gen).to(DEVICE)
    p0 = p.clone()
    shift = 2**31 * p.element_size()
    table = np.zeros((1, L.NCOLS), dtype=np.int64)
    table[0, L.PARAM] = p.data_ptr() - shift
    table[0, L.GRAD] = g.data_ptr() - shift
    table[0, L.NUMEL] = numel
    bmap = torch.tensor([[0, chunk]], dtype=torch.int32, device=DEVICE)
    # lr, weight decay, momentum, 1 - dampening, nesterov, maximize
    hyper = torch.tensor([0.5, 0.0, 0.0, 1.0, 0.0, 0.0], dtype=torch.float64, device=DEVICE)
    importlib.import_module(f"{tk.__name__}.sgd")._sgd_kernel[(1,)](
        torch.from_numpy(table).to(DEVICE), bmap, hyper, None, None,
        ELEM=tl.float32, IS_BF16=False, S_ELEM=tl.float32, S_IS_BF16=False,
        COMPUTE=tl.float32, IS_F64=False, BLOCK=block, ALIGNED=False, TAIL_ALIGNED=False, VEC=4, USE_MOMENTUM=False,
        HAS_GRAD_SCALE=False, HAS_FOUND_INF=False)
    torch.testing.assert_close(p[:100], p0[:100] - 0.5 * g[:100])
    assert torch.equal(p[100:], p0[100:])


def test_block_map():
    numel = np.array([2**31 + 5, 0, 3, 2048], dtype=np.int64)
    bmap = _launch.block_map(numel, 1024)
    last = (2**31 + 5 + 1023) // 1024 - 1
    assert bmap.dtype == np.int32
    assert bmap.shape == (last + 1 + 1 + 2, 2)  # the empty row gets no program
    assert tuple(bmap[0]) == (0, 0) and tuple(bmap[last]) == (0, last)
    assert [tuple(r) for r in bmap[last + 1:]] == [(2, 0), (3, 0), (3, 1)]
    bmap = _launch.block_map(numel, 1024, rows=[3, 1, 2])
    assert [tuple(r) for r in bmap] == [(3, 0), (3, 1), (2, 0)]


def test_alignment_is_decided_per_row():
    """One misaligned row costs only its own rows the vector accesses; the
    tail hint needs every aligned row's NUMEL to be a multiple of 16 bytes."""
    table = np.zeros((4, L.NCOLS), dtype=np.int64)
    table[:, L.PARAM] = [4096, 4100, 8192, 0]
    table[:, L.GRAD] = [1 << 20, 1 << 21, (1 << 22) + 8, 0]
    table[:, L.NUMEL] = [8, 3, 12, 0]
    classes = [(a, t, list(r)) for a, t, r in _launch.alignment_classes(table, 4)]
    assert classes == [(True, True, [0, 3]), (False, False, [1, 2])]
    table[3, L.NUMEL] = 6  # 24 bytes: the aligned class's tail is not
    classes = [(a, t, list(r)) for a, t, r in _launch.alignment_classes(table, 4)]
    assert classes == [(True, False, [0, 3]), (False, False, [1, 2])]
    assert [(a, t, list(r)) for a, t, r in _launch.alignment_classes(table, 2)] == [
        (True, False, [0, 3]), (False, False, [1, 2])]  # 8-element tails for 16-bit
    table[1:3, L.PARAM] = 0
    table[1:3, L.GRAD] = 64
    assert [(a, t) for a, t, _ in _launch.alignment_classes(table, 8)] == [(True, False)]


# --------------------------------------------------------------------------
# AMP: grad_scale and found_inf


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("optim", ["sgd", "adam"])
def test_grad_scale_unscales_in_the_kernel(dtype, optim):
    """Grads x 1024 with grad_scale=1024 give the unscaled grads' update."""
    sizes = [7, 1025, ()]
    gen = torch.Generator().manual_seed(7)
    grads = [_randn(sizes, dtype, gen) for _ in range(2)]
    scale = torch.tensor([1024.0], device=DEVICE)
    zero = torch.tensor([0.0], device=DEVICE)
    if optim == "sgd":
        hyper = _sgd_hyper(momentum=0.9, weight_decay=0.01)
        scaled = _SgdState(sizes, dtype, 8, True)
        plain = scaled.clone()
        for step, gs in enumerate(grads):
            row_flags = [step == 0] * len(sizes)
            big = [g * 1024 for g in gs]
            for batch, finish in _plan.pack(scaled.params, big, [scaled.bufs],
                                            ("momentum_buffer",), row_flags=row_flags):
                contract.kernel(tk, "sgd")(batch, grad_scale=scale, found_inf=zero, **hyper)
                finish()
            _assert_all_close(big, [g * 1024 for g in gs], rtol=0, atol=0)  # untouched
            _run_sgd(tk, plain.params, _clone(gs), plain.bufs, row_flags, **hyper)
    else:
        hyper = _adam_hyper(amsgrad=True, weight_decay=0.01)
        scaled = _AdamState(sizes, dtype, 8, True)
        plain = scaled.clone()
        for gs in grads:
            big = [g * 1024 for g in gs]
            for batch, finish in _plan.pack(scaled.params, big, scaled.states(),
                                            ("exp_avg", "exp_avg_sq", "max_exp_avg_sq"),
                                            steps=scaled.steps):
                contract.kernel(tk, "adam")(batch, grad_scale=scale, found_inf=zero, **hyper)
                finish()
            _assert_all_close(big, [g * 1024 for g in gs], rtol=0, atol=0)
            _run_adam(tk, plain.params, _clone(gs), plain.states(), plain.steps, **hyper)
    # unscaling by a power of two is exact: the very same bits
    _assert_all_close(scaled.tensors(), plain.tensors(), rtol=0, atol=0)


@pytest.mark.parametrize("host_steps", [False, True])
def test_found_inf_skips_adam_entirely(monkeypatch, host_steps):
    step_device = _host_steps(monkeypatch) if host_steps else DEVICE
    hyper = _adam_hyper(amsgrad=True, weight_decay=0.1)
    state = _AdamState(SIZES, torch.float32, 9, True, step_device)
    _adam_steps(state, tk, 1, 10, torch.float32, **hyper)
    before = _clone(state.tensors())
    gen = torch.Generator().manual_seed(11)
    grads = _randn(SIZES, torch.float32, gen)
    grads0 = _clone(grads)
    for batch, finish in _plan.pack(state.params, grads, state.states(),
                                    ("exp_avg", "exp_avg_sq", "max_exp_avg_sq"),
                                    steps=state.steps):
        contract.kernel(tk, "adam")(batch, grad_scale=torch.tensor([4.0], device=DEVICE),
                                    found_inf=torch.tensor([1.0], device=DEVICE), **hyper)
    _assert_all_close(state.tensors(), before, rtol=0, atol=0)
    _assert_all_close(grads, grads0, rtol=0, atol=0)
    assert [float(s) for s in state.steps] == [1.0] * len(SIZES)


def test_a_batch_mixing_host_and_device_steps_is_refused():
    """The launcher's own guard: the tables never build such a batch (a
    host-side pass over it would read device addresses on the host)."""
    hyper = _adam_hyper()
    state = _AdamState(SIZES, torch.float32, 3, False)
    before = _clone(state.tensors())
    grads = _randn(SIZES, torch.float32, torch.Generator().manual_seed(4))
    ((batch, finish),) = _plan.pack(state.params, grads, state.states(),
                                    ("exp_avg", "exp_avg_sq", "max_exp_avg_sq"), steps=state.steps)
    batch.table[0, L.FLAGS] |= L.FLAG_STEP_HOST
    with pytest.raises(ValueError, match="mixes step counters"):
        contract.kernel(tk, "adam")(batch, **hyper)
    _assert_all_close(state.tensors(), before, rtol=0, atol=0)


def test_host_steps_that_are_not_host_memory_are_refused(monkeypatch):
    """Steps flagged host-side must be CPU tensors: checked before the host
    touches their addresses."""
    monkeypatch.setattr(_launch, "_steps_on_device", lambda batch: False)
    state = _AdamState(SIZES, torch.float32, 3, False)
    grads = _randn(SIZES, torch.float32, torch.Generator().manual_seed(4))
    ((batch, finish),) = _plan.pack(state.params, grads, state.states(),
                                    ("exp_avg", "exp_avg_sq", "max_exp_avg_sq"), steps=state.steps)
    flags = batch.table[:, L.FLAGS]
    assert ((flags & L.FLAG_STEP_CPU) != 0).all()  # as _plan writes them
    batch.table[1, L.FLAGS] &= ~L.FLAG_STEP_CPU  # as for a counter elsewhere
    with pytest.raises(ValueError, match="must be CPU tensors"):
        contract.kernel(tk, "adam")(batch, **_adam_hyper())


def test_found_inf_skips_sgd_entirely():
    hyper = _sgd_hyper(momentum=0.9, weight_decay=0.1)
    state = _SgdState(SIZES, torch.float32, 12, True)
    _sgd_steps(state, tk, 1, 13, torch.float32, **hyper)
    before = _clone(state.tensors())
    gen = torch.Generator().manual_seed(14)
    grads = _randn(SIZES, torch.float32, gen)
    for row_flags in (False, True):
        for batch, finish in _plan.pack(state.params, grads, [state.bufs],
                                        ("momentum_buffer",), row_flags=[row_flags] * len(SIZES)):
            contract.kernel(tk, "sgd")(batch, found_inf=torch.tensor([1.0], device=DEVICE), **hyper)
        _assert_all_close(state.tensors(), before, rtol=0, atol=0)


# --------------------------------------------------------------------------
# the public API against torch.optim's for-loop


def _pair(cls_name, params, **kw):
    ours = [p.detach().clone() for p in params]
    theirs = [p.detach().clone() for p in params]
    info = optim_db.get(cls_name)
    opt = info.cls(ours, backend="triton", **kw)
    ref = info.oracle(theirs, **kw)
    return ours, opt, theirs, ref


def _step_both(ours, opt, theirs, ref, grads):
    for p, q, g in zip(ours, theirs, grads):
        p.grad, q.grad = g.clone(), g.clone()
    opt.step()
    ref.step()


def _assert_states_close(ours, opt, theirs, ref, **kw):
    _assert_all_close(ours, theirs, **kw)
    for p, q in zip(ours, theirs):
        mine, expected = opt.state[p], ref.state[q]
        assert set(mine) == set(expected)
        for key, value in expected.items():
            if value is None:
                assert mine[key] is None
            else:
                torch.testing.assert_close(mine[key], value, **kw)


API_CONFIGS = [
    ("SGD", dict(lr=0.1)),
    ("SGD", dict(lr=0.1, momentum=0.9, dampening=0.2, weight_decay=0.01)),
    ("SGD", dict(lr=0.1, momentum=0.9, nesterov=True, maximize=True)),
    ("Adam", dict(lr=0.01)),
    ("Adam", dict(lr=0.01, amsgrad=True, weight_decay=0.1, maximize=True)),
    ("AdamW", dict(lr=0.01, weight_decay=0.1)),
    ("AdamW", dict(lr=0.01, betas=(0.3, 0.6), amsgrad=True)),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("name,kw", API_CONFIGS, ids=lambda x: str(x))
def test_public_api_matches_torch_for_loop(dtype, name, kw):
    gen = torch.Generator().manual_seed(20)
    params = _randn(SIZES, dtype, gen)
    pair = _pair(name, params, **kw)
    for _ in range(3):
        _step_both(*pair, _randn(SIZES, dtype, gen))
    _assert_states_close(*pair)


@pytest.mark.parametrize("info", optim_db.OPTIM_DB, ids=lambda i: i.name)
def test_many_tiny_tensors_one_launch(monkeypatch, info):
    name, kw = info.name, info.full_state_example
    launches = []

    class Recorder:
        def __init__(self, kernel):
            self.kernel = kernel

        def __getitem__(self, grid):
            launches.append(grid)
            return self.kernel[grid]

    kernel = info.record.kernel
    attr = f"_{kernel}_kernel"
    # the kernel as its launcher finds it, in kernels/triton/<kernel>.py
    module = importlib.import_module(f"{tk.__name__}.{kernel}")
    monkeypatch.setattr(module, attr, Recorder(getattr(module, attr)))
    gen = torch.Generator().manual_seed(21)
    sizes = [int(n) for n in torch.randint(1, 6, (48,), generator=gen)]
    params = _randn(sizes, torch.float32, gen)
    pair = _pair(name, params, **kw)
    for _ in range(2):
        _step_both(*pair, _randn(sizes, torch.float32, gen))
    _assert_states_close(*pair)
    assert launches == [(48,), (48,)]  # one launch per step, one program per tensor


def test_mixed_dtypes_in_one_group():
    """One launch per (device, dtype) bucket; each bucket as if alone."""
    gen = torch.Generator().manual_seed(22)
    dtypes = [torch.float32, torch.float64, torch.bfloat16, torch.float16] * 2
    sizes = [5, 7, 9, 11, 1025, (), 3, 0]
    params = [_randn([s], dt, gen)[0] for s, dt in zip(sizes, dtypes)]
    kw = dict(lr=0.01, weight_decay=0.1, amsgrad=True)
    mixed = [p.clone() for p in params]
    alone = [p.clone() for p in params]
    opt = fused_optim.AdamW(mixed, backend="triton", **kw)
    singles = [fused_optim.AdamW([p], backend="triton", **kw) for p in alone]
    ref_params = [p.clone() for p in params[:2] + params[4:6]]
    ref = torch.optim.AdamW(ref_params, foreach=False, **kw)
    for _ in range(2):
        grads = [_randn([s], dt, gen)[0] for s, dt in zip(sizes, dtypes)]
        for p, q, g in zip(mixed, alone, grads):
            p.grad, q.grad = g.clone(), g.clone()
        for r, g in zip(ref_params, grads[:2] + grads[4:6]):
            r.grad = g.clone()
        opt.step()
        for s in singles:
            s.step()
        ref.step()
    _assert_all_close(mixed, alone, rtol=0, atol=0)
    _assert_all_close([mixed[i] for i in (0, 1, 4, 5)], ref_params)


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")
def test_nan_and_inf_grads_match_torch():
    gen = torch.Generator().manual_seed(23)
    sizes = [7, 1025]
    for name, kw in [("SGD", dict(lr=0.1, momentum=0.9)),
                     ("Adam", dict(lr=0.01, amsgrad=True)),
                     ("SGD", dict(lr=0.1))]:
        params = _randn(sizes, torch.float32, gen)
        params[0][6] = float("inf")  # an infinite param with zero weight decay
        pair = _pair(name, params, **kw)
        for step in range(3):
            grads = _randn(sizes, torch.float32, gen)
            if step == 1:
                grads[0][:3] = torch.tensor([float("nan"), float("inf"), -float("inf")])
                grads[1][1000] = float("nan")
            _step_both(*pair, grads)
        _assert_states_close(*pair, equal_nan=True)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("name,kw", [
    ("SGD", dict(lr=0.05, momentum=0.9, weight_decay=0.01)),
    ("SGD", dict(lr=0.05, momentum=0.9, nesterov=True)),
    ("Adam", dict(lr=0.01, amsgrad=True, weight_decay=0.01)),
    ("AdamW", dict(lr=0.01, weight_decay=0.1)),
], ids=lambda x: str(x))
def test_low_precision_at_least_as_accurate_as_torch(dtype, name, kw):
    """Against a float64 shadow run: no worse than torch's for-loop in dtype."""
    if dtype == torch.float16 and "eps" in inspect.signature(optim_db.get(name).cls).parameters:
        # eps=1e-8 is 0 in float16 and torch's for-loop then divides 0 by 0
        kw = dict(kw, eps=1e-3)
    gen = torch.Generator().manual_seed(24)
    sizes = [1500, 333]
    # Small weights, so that updates are not tiny next to a weight's ulp:
    # with N(0, 1) weights the rounding of the weight itself dominates and
    # Adam's bf16 ratio sits at 1.00 +- noise; here torch's intermediate
    # roundings show (ratios measured 0.65-0.80 for params, 0.97-1.0 for
    # exp_avg, whose update is the same single rounding in torch).
    params = _randn(sizes, dtype, gen, scale=0.005)
    ours, opt, theirs, ref = _pair(name, params, **kw)
    shadow = [p.detach().double() for p in params]
    shadow_opt = optim_db.get(name).oracle(shadow, **kw)
    for _ in range(5):
        grads = _randn(sizes, dtype, gen)
        _step_both(ours, opt, theirs, ref, grads)
        for s, g in zip(shadow, grads):
            s.grad = g.double()
        shadow_opt.step()

    def tensors(optimizer, params, key):
        return params if key == "param" else [optimizer.state[p][key] for p in params]

    def error(optimizer, params, key):
        exact = tensors(shadow_opt, shadow, key)
        return sum(float(((t.double() - e) ** 2).sum())
                   for t, e in zip(tensors(optimizer, params, key), exact)) ** 0.5

    keys = ["param"] + [k for k in ref.state[theirs[0]] if k != "step"]
    for key in keys:
        mine, torchs = error(opt, ours, key), error(ref, theirs, key)
        assert mine <= 1.05 * torchs, (key, mine, torchs)


# --------------------------------------------------------------------------
# caches and hygiene


def _layouts(opt):
    """The cached launch layouts of ``opt``'s kernel units."""
    return [u.device_cache["layout"][0][1] for plan in opt._plans.values()
            for u in plan.units if "layout" in getattr(u, "device_cache", ())]


def test_device_table_cache_is_never_stale():
    """Swapping p.data between steps must send the update to the new tensor."""
    gen = torch.Generator().manual_seed(25)
    sizes = [7, 33]
    params = _randn(sizes, torch.float32, gen)
    pair = _pair("SGD", params, lr=0.1, momentum=0.9)
    ours, opt, theirs, ref = pair
    _step_both(*pair, _randn(sizes, torch.float32, gen))
    _step_both(*pair, _randn(sizes, torch.float32, gen))
    grads = _randn(sizes, torch.float32, gen)
    cached = None
    for _ in range(2):  # the same grad tensors, at the same addresses: a hit
        for p, q, g in zip(ours, theirs, grads):
            p.grad, q.grad = g, g.clone()
        opt.step()
        ref.step()
        cached = cached or _layouts(opt)
    assert [a is b for a, b in zip(_layouts(opt), cached)] == [True]
    row_flags = _randn(sizes, torch.float32, gen)
    for p, q, f in zip(ours, theirs, row_flags):
        p.data, q.data = f.clone(), f.clone()
    _step_both(*pair, _randn(sizes, torch.float32, gen))
    _assert_states_close(*pair)


def test_buffers_a_capture_reads_outlive_the_cache(monkeypatch):
    """R2/R3 of kernels/triton: what a step uses while a CUDA graph is being
    captured is kept for the optimizer's lifetime, and what it makes then is
    never cached for eager steps (its upload runs only at replay). Capture is
    simulated: the launcher asks ``_capturing``, and the kernels run."""
    import gc
    import weakref

    gen = torch.Generator().manual_seed(26)
    sizes = [7, 33]
    params = _randn(sizes, torch.float32, gen)
    opt = fused_optim.Adam(params, lr=0.1, backend="triton")

    alive = []  # every grad stays alive: new addresses, so a new table, each time

    def step(new_grads=True):
        for p in params:
            if new_grads:
                p.grad = torch.randn(p.shape, generator=gen)
                alive.append(p.grad)
        opt.step()

    step()
    eager = weakref.ref(_layouts(opt)[0])
    monkeypatch.setattr(_launch, "_capturing", lambda device: True)
    step()  # "captured" with a table made during capture
    captured = [weakref.ref(o) for o in opt._plans.graph_owned.values()
                if isinstance(o, (_launch._Layout, torch.Tensor))]
    assert captured and _layouts(opt)[0] is eager(), "made during capture, then cached"
    monkeypatch.setattr(_launch, "_capturing", lambda device: False)
    for _ in range(_launch._KEEP + 1):
        step()
    gc.collect()
    assert eager() is None  # an eager-only buffer is freed once replaced
    assert all(r() is not None for r in captured)  # what the graph reads is not
    opt.load_state_dict(opt.state_dict())
    gc.collect()
    assert all(r() is not None for r in captured)
    step()
    kept = len(opt._plans.graph_owned)
    monkeypatch.setattr(_launch, "_capturing", lambda device: True)
    step(new_grads=False)  # a capture of a cached layout retains that one
    assert any(o is _layouts(opt)[0] for o in opt._plans.graph_owned.values())
    assert len(opt._plans.graph_owned) > kept


def test_kernels_do_not_import_torch_optim():
    import ast
    import inspect

    for module in (tk, _launch, importlib.import_module(f"{tk.__name__}._kernels"),
                   importlib.import_module(f"{tk.__name__}.sgd"),
                   importlib.import_module(f"{tk.__name__}.adam")):
        for node in ast.walk(ast.parse(inspect.getsource(module))):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                names = [node.module or ""]
            else:
                continue
            assert not any(n.startswith("torch.optim") for n in names), names


def test_capture_uploads_carve_fresh_slices():
    """R3: each upload made during a capture copies from its own slice of a
    host arena, never reused (a replay copies from it again), 16-byte
    aligned; a full arena gives None (the caller then pins new memory)."""
    arena = [torch.zeros(64, dtype=torch.uint8), 0]
    a = _launch._carve(arena, np.arange(5, dtype=np.uint8))
    b = _launch._carve(arena, np.full(20, 7, dtype=np.uint8))
    assert a.tolist() == list(range(5)) and b.tolist() == [7] * 20
    assert b.data_ptr() - a.data_ptr() == 16 and arena[1] == 48
    assert _launch._carve(arena, np.zeros(17, dtype=np.uint8)) is None
    assert _launch._carve(None, np.zeros(1, dtype=np.uint8)) is None
    assert a.tolist() == list(range(5))  # untouched by later slices


# ------------------------------------------------ Adagrad's and RMSprop's
# (Triton's host-side steps, and RMSprop's kernels bit for bit against Numba's)


def test_adagrad_host_side_steps(monkeypatch):
    """Steps in host memory (torch's CPU steps of CUDA params): the host advances
    them and uploads clr; a found_inf skip advances nothing. Forced on CPU
    tensors by flagging the rows as the tables flag CUDA params' CPU steps."""
    skip_unless_runnable("triton")
    from fused_optim import _plan
    from fused_optim.kernels import columns as L
    from fused_optim.kernels.triton.adagrad import adagrad as tk_adagrad

    torch.manual_seed(0)
    ref_params = [torch.randn(1500), torch.randn(7, dtype=torch.float32)]
    params = [p.clone() for p in ref_params]
    sums = [torch.full_like(p, 0.1) for p in params]
    steps = [torch.tensor(2.0), torch.tensor(0.0, dtype=torch.float64)]
    ref_sums = [s.clone() for s in sums]
    ref_steps = [s.clone() for s in steps]
    grads = [torch.randn(p.shape) for p in params]
    hyper = dict(lr=0.1, lr_decay=0.2, eps=1e-10, weight_decay=0.01, maximize=False)
    from torch.optim.adagrad import adagrad as torch_adagrad
    torch_adagrad(ref_params, [g.clone() for g in grads], ref_sums, ref_steps, foreach=False,
                  lr=0.1, lr_decay=0.2, eps=1e-10, weight_decay=0.01, maximize=False)
    for found_inf in (torch.tensor(1.0), None):
        for batch, finish in _plan.pack(params, grads, [sums], ("sum",), steps=steps,
                                        backend="triton"):
            batch.table[:, L.FLAGS] |= L.FLAG_STEP_HOST
            tk_adagrad(batch, found_inf=found_inf, **hyper)
            finish()
        if found_inf is not None:
            assert [float(s) for s in steps] == [2.0, 0.0]
            assert torch.equal(sums[0], torch.full_like(sums[0], 0.1))
    for a, b in zip(params + sums + steps, ref_params + ref_sums + ref_steps):
        torch.testing.assert_close(a, b, **TOLERANCE[torch.float32])


@pytest.mark.parametrize("found_inf", [None, 0.0, 1.0])
def test_rmsprop_host_side_steps(found_inf):
    """Steps flagged host-side (torch's CPU steps of CUDA params) are advanced
    by the host, or not at all when found_inf is set; the update is the same."""
    skip_unless_runnable("triton")
    from fused_optim import _plan
    from fused_optim.kernels import columns as L
    from fused_optim.kernels.reference.rmsprop import rmsprop as ref_kernel
    from fused_optim.kernels.triton.rmsprop import rmsprop as triton_kernel

    torch.manual_seed(0)
    hyper = dict(lr=0.01, alpha=0.9, eps=1e-8, weight_decay=0.1, momentum=0.5,
                 centered=True, maximize=False)
    sides = []
    for kernel in (ref_kernel, triton_kernel):
        torch.manual_seed(0)
        params = [torch.randn(37), torch.randn(5, 3), torch.randn(0)]
        grads = [torch.randn(p.shape) for p in params]
        # square_avg above grad_avg**2, as any real history leaves them
        states = [[torch.rand(p.shape) + k for p in params] for k in (1.0, 0.0, -0.5)]
        steps = [torch.tensor(3.0), torch.tensor(3.0, dtype=torch.float64), torch.tensor(0.0)]
        ((batch, finish),) = _plan.pack(params, grads, states,
                                        ("square_avg", "momentum_buffer", "grad_avg"), steps=steps)
        if kernel is triton_kernel:
            batch.table[:, L.FLAGS] |= L.FLAG_STEP_HOST
        amp = {} if found_inf is None else dict(found_inf=torch.tensor(found_inf))
        kernel(batch, **hyper, **amp)
        finish()
        sides.append((params, states, steps))
    (p0, s0, t0), (p1, s1, t1) = sides
    for a, b in zip(p0 + sum(s0, []), p1 + sum(s1, [])):
        torch.testing.assert_close(b, a, **TOLERANCE[torch.float32])
    assert [float(t) for t in t1] == [float(t) for t in t0] == (
        [3.0, 3.0, 0.0] if found_inf == 1.0 else [4.0, 4.0, 1.0])
    assert [t.dtype for t in t1] == [torch.float32, torch.float64, torch.float32]


_RMSPROP = "RMSprop"
#: the defaults and three of optim_db's RMSprop configs (momentum, centered,
#: maximize, a Tensor lr, torch.lerp's other side)
_RMSPROP_CONFIGS = [
    dict(),
    dict(lr=0.01, momentum=0.9, centered=True, weight_decay=0.1),
    dict(lr=0.01, maximize=True, weight_decay=0.05, eps=1e-3, momentum=0.5),
    # 1 - alpha >= 0.5: torch.lerp's other side
    dict(lr=lambda: torch.tensor(0.01), centered=True, alpha=0.3),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=str)
@pytest.mark.parametrize("kwargs", _RMSPROP_CONFIGS,
                         ids=lambda c: config_id(_RMSPROP, c))
def test_rmsprop_numba_and_triton_agree_bit_for_bit(kwargs, dtype):
    """The two compiled backends round at the same places, FMAs included."""
    skip_unless_runnable("numba")
    skip_unless_runnable("triton")
    torch.manual_seed(0)
    base = [torch.randn(1031, dtype=dtype).requires_grad_(),
            torch.randn(6, 5, dtype=dtype).requires_grad_()]
    a, b = clone_params(base), clone_params(base)
    oa = make(_RMSPROP, a, kwargs, fused_backend="numba")
    ob = make(_RMSPROP, b, kwargs, fused_backend="triton")
    gen = torch.Generator().manual_seed(5)
    for _ in range(3):
        for x, y in zip(a, b):
            g = torch.randn(x.shape, generator=gen).to(dtype)
            x.grad, y.grad = g, g.clone()
        oa.step()
        ob.step()
        for x, y in zip(a, b):
            assert torch.equal(x, y)
            for k in oa.state[x]:
                assert torch.equal(oa.state[x][k], ob.state[y][k]), k
