"""Adagrad's own tests: what tests/optim_db.py's entry does not cover.

The database enrolls Adagrad in parity, errors (fused/sparse ones included),
state_dict, schedulers, AMP, kernels-do-the-math, memory safety, behaviour,
patch, functionals, compile and the model-based test. Left here: sparse
grads (rows run torch's own loop; the generic tests cover SGD's), the
constructor signature and construction-time state, a zero lr_decay
denominator (ZeroDivisionError before anything is written), float steps of
old checkpoints, the Triton host-side step path, the offline sm_80/sm_90
compile checks, and Numba's parallel path bit for bit against its serial one.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import fused_optim
from matrix import BACKENDS, TOLERANCE, assert_state_close, skip_unless_runnable

HERE = Path(__file__).parent


# ------------------------------------------------------------------ parity


#: torch's for-loop computes a Tensor lr's step size in the lr's dtype
#: (``lr / (1 + (step - 1) * lr_decay)``, Adam's ``lr / bias_correction1``,
#: AdamW's ``1 - lr * weight_decay``: a 0-dim Tensor stays one through that
#: arithmetic, rounded to float16/bfloat16 there) and reads the result as a scalar
_LR_DTYPES = [torch.float16, torch.bfloat16, torch.float32, torch.float64, None]
_LR_CONFIGS = [("Adagrad", dict(lr_decay=0.3, weight_decay=0.1)),
               ("Adam", dict(amsgrad=True, weight_decay=0.1)),
               ("AdamW", dict(weight_decay=0.5)),
               ("RMSprop", dict(momentum=0.9, centered=True)),
               ("SGD", dict(momentum=0.9, weight_decay=0.1))]


def _lr_backends():
    for backend in BACKENDS:
        yield backend
        if backend == "triton":
            yield "triton-host-steps"


@pytest.mark.parametrize("backend", list(_lr_backends()))
@pytest.mark.parametrize("lr_dtype", _LR_DTYPES, ids=lambda d: str(d or "float"))
@pytest.mark.parametrize("name,kw", _LR_CONFIGS, ids=[c[0] for c in _LR_CONFIGS])
def test_tensor_lr_of_any_dtype_steps_as_torch(name, kw, lr_dtype, backend, monkeypatch):
    """fp32 and fp64 params, with a Tensor lr of each dtype (and a float):
    the step size rounds as torch's for-loop rounds it (a float16/bfloat16
    lr's clr drifted about 1e-4 from torch's with float64 math)."""
    if backend == "triton-host-steps":
        skip_unless_runnable("triton")
        from fused_optim.kernels.triton import _launch
        monkeypatch.setattr(_launch, "_steps_on_device", lambda batch: False)
        backend = "triton"
    skip_unless_runnable(backend)
    gen = torch.Generator().manual_seed(5)
    init = [torch.randn(300, generator=gen), torch.randn(7, generator=gen).double()]
    ref_params = [p.clone().requires_grad_() for p in init]
    params = [p.clone().requires_grad_() for p in init]

    def lr():
        return 0.5 if lr_dtype is None else torch.tensor(0.5, dtype=lr_dtype)

    torch_cls, cls = getattr(torch.optim, name), getattr(fused_optim, name)
    ref = torch_cls(ref_params, lr=lr(), foreach=False, **kw)
    opt = cls(params, lr=lr(), backend=backend, **kw)
    for _ in range(5):
        for rp, p in zip(ref_params, params):
            g = torch.randn(rp.shape, generator=gen, dtype=rp.dtype)
            rp.grad, p.grad = g.clone(), g.clone()
        ref.step()
        opt.step()
        for rp, p in zip(ref_params, params):
            torch.testing.assert_close(p, rp, **TOLERANCE[p.dtype])
    assert_state_close(ref, opt, ref_params, params, **TOLERANCE[torch.float32])


# ------------------------------------------------------------ sparse grads


def _sparse(p, idx, vals):
    return torch.sparse_coo_tensor(torch.tensor([idx]), torch.tensor(vals, dtype=p.dtype),
                                   p.shape)


@pytest.mark.parametrize("backend", BACKENDS)
def test_sparse_grad_rows_run_torchs_loop(backend):
    skip_unless_runnable(backend)
    torch.manual_seed(0)
    base = torch.randn(20)
    ref_params = [base[4:10].clone().requires_grad_(), torch.randn(7).requires_grad_()]
    # an offset view: torch 2.13's dense.add_(sparse) writes at twice the offset
    storage = torch.randn(20)
    params = [storage[4:10].detach().requires_grad_(),
              ref_params[1].detach().clone().requires_grad_()]
    params[0].data.copy_(ref_params[0].detach())
    outside = storage.clone()
    kw = dict(lr=0.1, lr_decay=0.1, initial_accumulator_value=0.1)
    ref = torch.optim.Adagrad(ref_params, foreach=False, **kw)
    opt = fused_optim.Adagrad(params, backend=backend, **kw)
    for step in range(3):
        for ps in (ref_params, params):
            ps[0].grad = _sparse(ps[0], [0, 2, 2, 5], [1.0, -2.0, 0.5, step + 1.0])
            ps[1].grad = torch.full((7,), 0.1 * step - 0.2)
        ref.step()
        opt.step()
        assert_state_close(ref, opt, ref_params, params, **TOLERANCE[torch.float32])
    # nothing outside the view was written
    assert torch.equal(storage[:4], outside[:4]) and torch.equal(storage[10:], outside[10:])


# --------------------------------------------------------------- errors


def _p(*shape):
    return torch.randn(*shape or (3,)).requires_grad_()


def _outcome(fn):
    try:
        fn()
    except Exception as err:  # noqa: BLE001 - the type is what we compare
        return type(err), str(err)
    return None, None


def test_constructor_signature_defaults_and_state_are_torchs():
    import inspect

    ours = inspect.signature(fused_optim.Adagrad.__init__).parameters
    theirs = inspect.signature(torch.optim.Adagrad.__init__).parameters
    assert list(ours)[:-3] == list(theirs)
    assert list(ours)[-3:] == ["backend", "kahan_sum", "stochastic_round"]
    for name, par in theirs.items():
        assert ours[name].default == par.default and ours[name].kind == par.kind, name
    p, q = _p(4), _p(4)
    a = torch.optim.Adagrad([p], initial_accumulator_value=0.3)
    b = fused_optim.Adagrad([q], initial_accumulator_value=0.3)
    # torch makes the state at construction
    assert set(a.state[p]) == set(b.state[q]) == {"step", "sum"}
    assert torch.equal(a.state[p]["sum"], b.state[q]["sum"])
    assert a.state[p]["step"].dtype == b.state[q]["step"].dtype
    assert a.param_groups[0].keys() == b.param_groups[0].keys()


@pytest.mark.parametrize("backend", BACKENDS)
def test_zero_denominator_raises_like_torch_and_changes_nothing(backend):
    skip_unless_runnable(backend)
    outs = []
    for cls, kw in ((torch.optim.Adagrad, {}), (fused_optim.Adagrad, dict(backend=backend))):
        p = _p(4)
        opt = cls([p], lr=0.1, **kw)
        p.grad = torch.ones(4)
        opt.step()
        opt.param_groups[0]["lr_decay"] = -1.0  # 1 + (2 - 1) * -1 == 0
        before = p.detach().clone()
        outs.append(_outcome(opt.step))
        if cls is fused_optim.Adagrad:
            assert torch.equal(p.detach(), before)
            assert float(opt.state[p]["step"]) == 1
    assert outs[0][0] is ZeroDivisionError and outs[0] == outs[1]


# ----------------------------------------------------------- state_dict


def test_old_checkpoint_float_steps_and_missing_keys_are_filled_as_torch():
    sds = []
    for cls in (torch.optim.Adagrad, fused_optim.Adagrad):
        p = _p(4)
        opt = cls([p])
        sd = opt.state_dict()
        sd["state"][0]["step"] = 3.0
        for key in ("foreach", "maximize", "differentiable", "fused"):
            del sd["param_groups"][0][key]
        opt.load_state_dict(sd)
        sds.append(opt.state_dict())
    assert sds[0]["param_groups"] == sds[1]["param_groups"]
    a, b = sds[0]["state"][0]["step"], sds[1]["state"][0]["step"]
    assert torch.is_tensor(b) and (a.dtype, float(a)) == (b.dtype, float(b))


# ------------------------------------------------- scheduler, AMP, patch


# ------------------------------------------------------ Triton specifics


def test_triton_host_side_steps(monkeypatch):
    """Steps in host memory (torch's CPU steps of CUDA params): the host advances
    them and uploads clr; a found_inf skip advances nothing. Forced on CPU
    tensors by flagging the rows as the tables flag CUDA params' CPU steps."""
    skip_unless_runnable("triton")
    from fused_optim import _tables
    from fused_optim.kernels import layout as L
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
        for batch, finish in _tables.pack(params, grads, [sums], ("sum",), steps=steps,
                                   backend="triton"):
            batch.table[:, L.FLAGS] |= L.FLAG_STEP_HOST
            tk_adagrad(batch, found_inf=found_inf, **hyper)
            finish()
        if found_inf is not None:
            assert [float(s) for s in steps] == [2.0, 0.0]
            assert torch.equal(sums[0], torch.full_like(sums[0], 0.1))
    for a, b in zip(params + sums + steps, ref_params + ref_sums + ref_steps):
        torch.testing.assert_close(a, b, **TOLERANCE[torch.float32])


_COMPILE = r"""
import json, re, sys, itertools
sys.path.insert(0, sys.argv[1])
import torch, triton, triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from fused_optim.kernels.triton import _launch
from fused_optim.kernels.triton import adagrad as ka
import _compile_matrix as cm

PTRS = {"table_ptr": "*i64", "map_ptr": "*i32", "hyper_ptr": "*fp64", "scal_ptr": "*fp64",
        "grad_scale_ptr": "*fp32", "found_inf_ptr": "*fp32", "rows": "i32"}

def source(fn, const, absent):
    sig = {}
    for n in fn.arg_names:
        if n in PTRS and not absent.get(n, False):
            sig[n] = PTRS[n]
        else:
            sig[n] = "constexpr"
            if n in PTRS:
                const[n] = None
    attrs = {(fn.arg_names.index(n),): [["tt.divisibility", 16]]
             for n in sig if sig[n].startswith("*")}
    return ASTSource(fn, sig, const, attrs)

jobs = []
for cap in (80, 90):
    for dname, dtype in cm.DTYPES.items():
        for aligned in (True, False):
            for on in (True, False):
                sw = dict(TAIL_ALIGNED=aligned and on, HAS_GRAD_SCALE=on, HAS_FOUND_INF=on)
                const = dict(ELEM=_launch._ELEM[dtype], IS_BF16=dtype == torch.bfloat16,
                             COMPUTE=tl.float64 if dtype == torch.float64 else tl.float32,
                             IS_F64=dtype == torch.float64, BLOCK=_launch.BLOCK, ALIGNED=aligned,
                             VEC=16 // torch.empty((), dtype=dtype).element_size(), **sw)
                src = source(ka._adagrad_kernel, const,
                             {"grad_scale_ptr": not on, "found_inf_ptr": not on})
                warps = _launch.num_warps(dtype, aligned, sw["TAIL_ALIGNED"])
                jobs.append(("adagrad", dname, aligned, sw, cap, src, warps))
    for on in (True, False):
        sw = dict(HAS_FOUND_INF=on)
        src = source(ka._adagrad_steps_kernel, dict(BLOCK_R=_launch._STEP_ROWS, **sw),
                     {"found_inf_ptr": not on})
        jobs.append(("adagrad_steps", "float64", False, sw, cap, src, _launch.NUM_WARPS))
for kernel, dname, aligned, sw, cap, src, warps in jobs:
    c = triton.compile(src, target=GPUTarget("cuda", cap, 32),
                       options={"num_warps": warps, "enable_fp_fusion": False})
    ptx = c.asm["ptx"]
    width = 64 if dname == "float64" else 32
    lanes = 2 if dname == "float64" else 4
    out = dict(kernel=kernel, dtype=dname, aligned=aligned, switches=sw, arch=cap,
               inexact=sorted(k for k, pat in cm._INEXACT.items() if re.search(pat, ptx)),
               vector_loads=len(re.findall(rf"ld\.global[.\w]*\.v{lanes}\.b{width}", ptx)),
               vector_stores=len(re.findall(rf"st\.global[.\w]*\.v{lanes}\.b{width}", ptx)),
               ieee_div=len(re.findall(r"\bdiv\.rn\.f(32|64)\b", ptx)),
               ieee_sqrt=len(re.findall(r"\bsqrt\.rn\.f(32|64)\b", ptx)))
    out.update(cm._ptxas_facts(ptx, cap))
    print(json.dumps(out), flush=True)
"""


def test_triton_kernels_compile_for_sm80_and_sm90():
    pytest.importorskip("triton")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, "-c", _COMPILE, str(HERE)], capture_output=True,
                         text=True, env=env, timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    results = [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]
    assert len(results) == 2 * (4 * 2 * 2 + 2)
    for r in results:
        assert r["inexact"] == [], r
        assert not (r["stack_bytes"] or r["spill_store_bytes"] or r["spill_load_bytes"]), r
        assert r["ieee_div"], r
        if r["kernel"] == "adagrad":
            assert r["ieee_sqrt"], r
            if r["aligned"]:
                paths = 2 if r["switches"]["TAIL_ALIGNED"] else 1
                assert r["vector_loads"] >= 3 * paths and r["vector_stores"] >= 2 * paths, r


# ------------------------------------------------ the step operator, compile


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16],
                         ids=str)
def test_numba_parallel_equals_serial(dtype, monkeypatch):
    """The parallel kernel (blocked, prefetching walk) gives the serial one's bits."""
    skip_unless_runnable("numba")
    from fused_optim.kernels.numba import _walk

    kw = dict(lr=0.1, lr_decay=0.02, weight_decay=0.01, initial_accumulator_value=0.1)
    results = []
    for serial_below in (1 << 40, 0):
        # the launcher reads _walk's (the package's SERIAL_BELOW is a copy)
        monkeypatch.setattr(_walk, "SERIAL_BELOW", serial_below)
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
