"""RMSprop's own tests: what tests/optim_db.py's entry does not cover.

The database enrolls RMSprop in parity, errors (sparse grads, capturable on
CPU), state_dict, schedulers, AMP, kernels-do-the-math, capturable, memory
safety, behaviour, patch, functionals, compile and the model-based test.
Left here: Numba and Triton bit for bit, __setstate__'s group defaults and
tensor steps, the signature (torch's plus ``backend``), momentum switched on
after the first step (torch's KeyError, nothing written), the offline sm_90
compile check and the Triton host-side step path.
"""

from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import fused_optim
from matrix import TOLERANCE, BACKENDS, clone_params, config_id, make, skip_unless_runnable

HERE = Path(__file__).parent
NAME = "RMSprop"

CONFIGS = [
    dict(),
    dict(lr=0.01, alpha=0.9, eps=1e-6),
    dict(lr=0.01, centered=True),
    dict(lr=0.01, momentum=0.9),
    dict(lr=0.01, momentum=0.9, centered=True, weight_decay=0.1),
    dict(lr=0.01, maximize=True, weight_decay=0.05, eps=1e-3, momentum=0.5),
    # 1 - alpha >= 0.5: torch.lerp's other side
    dict(lr=lambda: torch.tensor(0.01), centered=True, alpha=0.3),
]


# ------------------------------------------------------------------ parity


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=str)
@pytest.mark.parametrize("kwargs", [CONFIGS[0], CONFIGS[4], CONFIGS[5], CONFIGS[6]],
                         ids=lambda c: config_id(NAME, c))
def test_numba_and_triton_agree_bit_for_bit(kwargs, dtype):
    """The two compiled backends round at the same places, FMAs included."""
    skip_unless_runnable("numba")
    skip_unless_runnable("triton")
    torch.manual_seed(0)
    base = [torch.randn(1031, dtype=dtype).requires_grad_(),
            torch.randn(6, 5, dtype=dtype).requires_grad_()]
    a, b = clone_params(base), clone_params(base)
    oa = make(NAME, a, kwargs, fused_backend="numba")
    ob = make(NAME, b, kwargs, fused_backend="triton")
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


# ------------------------------------------------------------------ capturable


# ------------------------------------------------------------------ state_dict


def test_setstate_fills_torchs_group_defaults_and_tensor_steps():
    p = torch.randn(3).requires_grad_()
    opt = fused_optim.RMSprop([p], backend="torch")
    p.grad = torch.ones(3)
    opt.step()
    state = opt.__getstate__()
    for key in ("momentum", "centered", "foreach", "maximize", "differentiable",
                "capturable"):
        del state["param_groups"][0][key]
    state["state"][p]["step"] = 1.0  # an old checkpoint's float step
    opt.__setstate__(state)
    group = opt.param_groups[0]
    assert (group["momentum"], group["centered"], group["foreach"], group["maximize"],
            group["differentiable"], group["capturable"]) == (0, False, None, False,
                                                              False, False)
    assert torch.is_tensor(opt.state[p]["step"]) and float(opt.state[p]["step"]) == 1.0


# ------------------------------------------------------------------ errors


def _outcome(fn):
    try:
        fn()
    except Exception as err:  # noqa: BLE001 - the type is what we compare
        return type(err), str(err)
    return None, None


def test_signature_is_torchs_plus_backend():
    import inspect

    theirs = inspect.signature(torch.optim.RMSprop.__init__).parameters
    ours = inspect.signature(fused_optim.RMSprop.__init__).parameters
    assert list(ours)[:-3] == list(theirs)
    for name in theirs:
        assert ours[name].default == theirs[name].default, name
        assert ours[name].kind == theirs[name].kind, name
    assert ours["backend"].kind is inspect.Parameter.KEYWORD_ONLY
    fn_theirs = inspect.signature(importlib.import_module("torch.optim.rmsprop").rmsprop)
    fn_ours = inspect.signature(fused_optim.rmsprop)
    assert list(fn_ours.parameters)[:-1] == list(fn_theirs.parameters)


# (kwargs, grad setters of the two params, backends where it applies or None)


@pytest.mark.parametrize("backend", BACKENDS)
def test_momentum_switched_on_later_raises_torchs_key_error(backend):
    skip_unless_runnable(backend)
    outcomes = []
    for cls, extra in ((torch.optim.RMSprop, {}), (fused_optim.RMSprop, dict(backend=backend))):
        p = torch.randn(3).requires_grad_()
        p.grad = torch.ones(3)
        opt = cls([p], **extra)
        opt.step()
        opt.param_groups[0]["momentum"] = 0.9
        before = p.detach().clone()
        outcomes.append(_outcome(opt.step))
        assert torch.equal(p.detach(), before)
    assert outcomes[0][0] is KeyError and outcomes[0] == outcomes[1]


# ------------------------------------------------------------------ schedulers


# ------------------------------------------------------------------ AMP


# ------------------------------------------------------------------ the kernels do the math


# ------------------------------------------------------------------ registry and patch


# ------------------------------------------------------------------ offline compile

_SWITCHES = ("TAIL_ALIGNED", "CENTERED", "USE_MOMENTUM", "HAS_GRAD_SCALE", "HAS_FOUND_INF")


def _compile_facts(archs=(90,)):
    """Compile the RMSprop kernels for real GPUs (no GPU needed); one dict each.

    Per dtype and ALIGNED: every switch on (TAIL_ALIGNED where aligned) and
    every switch off; and the step kernel with and without found_inf. Run
    without TRITON_INTERPRET (see tests/_compile_matrix.py).
    """
    import re

    import triton
    import triton.language as tl
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    import _compile_matrix as cm
    from fused_optim.kernels.triton import _launch
    from fused_optim.kernels.triton import rmsprop as rk

    out = []
    for cap in archs:
        for dname, aligned in ((d, a) for d in cm.DTYPES for a in (True, False)):
            dtype = cm.DTYPES[dname]
            for on in (True, False):
                sw = {s: on for s in _SWITCHES}
                sw["TAIL_ALIGNED"] = on and aligned
                fn = rk._rmsprop_kernel
                const = dict(ELEM=_launch._ELEM[dtype], IS_BF16=dtype == torch.bfloat16,
                             COMPUTE=tl.float64 if dtype == torch.float64 else tl.float32,
                             IS_F64=dtype == torch.float64, BLOCK=_launch.BLOCK, ALIGNED=aligned,
                             VEC=16 // torch.empty((), dtype=dtype).element_size(), **sw)
                sig = {}
                for name in fn.arg_names:
                    if name in cm._SGD_PTRS and (on or name not in ("grad_scale_ptr",
                                                                    "found_inf_ptr")):
                        sig[name] = cm._SGD_PTRS[name]
                    else:
                        sig[name] = "constexpr"
                        if name in cm._SGD_PTRS:
                            const[name] = None
                attrs = {(fn.arg_names.index(n),): [["tt.divisibility", 16]]
                         for n in sig if sig[n].startswith("*")}
                compiled = triton.compile(
                    ASTSource(fn, sig, const, attrs), target=GPUTarget("cuda", cap, 32),
                    options={"num_warps": _launch.num_warps(dtype, aligned, sw["TAIL_ALIGNED"]),
                             "enable_fp_fusion": False})
                ptx = compiled.asm["ptx"]
                width, lanes = (64, 2) if dname == "float64" else (32, 4)
                r = dict(kernel="rmsprop", dtype=dname, aligned=aligned, switches=sw, arch=cap,
                         vector_loads=len(re.findall(
                             rf"ld\.global[.\w]*\.v{lanes}\.b{width}", ptx)),
                         vector_stores=len(re.findall(
                             rf"st\.global[.\w]*\.v{lanes}\.b{width}", ptx)),
                         inexact=sorted(k for k, pat in cm._INEXACT.items()
                                        if re.search(pat, ptx)),
                         local=len(re.findall(r"\.local\b", ptx)),
                         ieee_div=len(re.findall(r"\bdiv\.rn\.f(32|64)\b", ptx)),
                         ieee_sqrt=len(re.findall(r"\bsqrt\.rn\.f(32|64)\b", ptx)))
                r.update(cm._ptxas_facts(ptx, cap))
                out.append(r)
        for fi in (False, True):
            fn = rk._rmsprop_steps_kernel
            sig = {"table_ptr": "*i64", "found_inf_ptr": "*fp32" if fi else "constexpr",
                   "rows": "i32", "BLOCK_R": "constexpr", "HAS_FOUND_INF": "constexpr"}
            const = dict(BLOCK_R=_launch._STEP_ROWS, HAS_FOUND_INF=fi)
            if not fi:
                const["found_inf_ptr"] = None
            compiled = triton.compile(ASTSource(fn, sig, const, {}),
                                      target=GPUTarget("cuda", cap, 32),
                                      options={"num_warps": _launch.NUM_WARPS})
            r = dict(kernel="rmsprop_steps", switches={"HAS_FOUND_INF": fi}, arch=cap,
                     local=len(re.findall(r"\.local\b", compiled.asm["ptx"])))
            r.update(cm._ptxas_facts(compiled.asm["ptx"], cap))
            out.append(r)
    return out


def _violations(r):
    bad = []
    if r["stack_bytes"] or r["spill_store_bytes"] or r["spill_load_bytes"] or r["local"]:
        bad.append("local memory")
    if r["kernel"] == "rmsprop_steps":
        return bad
    sw = r["switches"]
    if r["inexact"]:
        bad.append(f"non-IEEE float math: {r['inexact']}")
    if not (r["ieee_sqrt"] and r["ieee_div"]):
        bad.append("no sqrt.rn / div.rn")
    streams = 3 + sw["USE_MOMENTUM"] + sw["CENTERED"]
    paths = 2 if sw["TAIL_ALIGNED"] else 1
    if r["aligned"] and (r["vector_loads"] < paths * streams
                         or r["vector_stores"] < paths * (streams - 1)):
        bad.append(f"ALIGNED but {r['vector_loads']} 128-bit loads, "
                   f"{r['vector_stores']} stores ({streams} streams, {paths} paths)")
    return bad


def test_triton_kernels_compile_offline_for_sm_90():
    pytest.importorskip("triton")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    code = ("import json, sys; sys.path.insert(0, %r); import test_rmsprop as t; "
            "print(json.dumps(t._compile_facts()))" % str(HERE))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env=env, timeout=900, cwd=str(HERE))
    assert out.returncode == 0, out.stderr[-3000:]
    results = json.loads(out.stdout.splitlines()[-1])
    assert len(results) == 4 * 2 * 2 + 2
    problems = {json.dumps([r["kernel"], r.get("dtype"), r.get("aligned"), r["switches"]]):
                _violations(r) for r in results}
    assert not {k: v for k, v in problems.items() if v}


# ------------------------------------------------------------------ Triton's host-side steps

@pytest.mark.parametrize("found_inf", [None, 0.0, 1.0])
def test_triton_host_side_steps(found_inf):
    """Steps flagged host-side (torch's CPU steps of CUDA params) are advanced
    by the host, or not at all when found_inf is set; the update is the same."""
    skip_unless_runnable("triton")
    from fused_optim import _tables
    from fused_optim.kernels import layout as L
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
        ((batch, finish),) = _tables.pack(params, grads, states,
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
