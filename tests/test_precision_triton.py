"""Triton backend: Kahan summation and stochastic rounding of bfloat16/float16 params.

The kernels run interpreted on CPU tensors (``TRITON_INTERPRET=1``) and are
compared bit for bit with the reference backend (``kernels/reference``,
whose ``_precision`` module is the specification) on identical copies of
the inputs: params, compensation buffers, every state and the steps. Rows
of odd sizes, one spanning several programs with a masked tail (``BLOCK``
is lowered to keep the interpreter quick), and a row of edge values (inf,
NaN, signed zeros, the largest finite value, float16 subnormals).

The offline compile test lowers the new specializations for sm_90 and sm_80
(no GPU needed) and checks that they keep the backend's code guarantees.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

pytest.importorskip("triton")

from fused_optim import _tables  # noqa: E402
from fused_optim.kernels import contract, reference  # noqa: E402
from fused_optim.kernels import layout as L  # noqa: E402
from fused_optim.kernels import triton as tk  # noqa: E402
from fused_optim.kernels.triton import _launch  # noqa: E402
from fused_optim.kernels.reference import _precision as P  # noqa: E402

#: the edge row's inf and NaN params: numpy's warnings from the interpreter's
#: float math and float16 casts (the values are what is compared)
pytestmark = [pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning"),
              pytest.mark.filterwarnings("ignore:overflow encountered in cast:RuntimeWarning")]

HERE = Path(__file__).parent
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
KERNELS = ("sgd", "adam", "adagrad", "rmsprop")
LOW = (torch.bfloat16, torch.float16)

#: elements per program in these tests: the 300-element row takes three
#: programs, the last one masked
TEST_BLOCK = 128
SIZES = (1, 7, 37, 300)

#: each optimizer's state roles (then the Kahan buffer, always the fourth),
#: whether it keeps steps, and two configs (hyperparameters)
OPTIMIZERS = {
    "sgd": (("momentum_buffer",), False, [
        dict(lr=0.01, weight_decay=0.01, momentum=0.9, dampening=0.1, nesterov=True,
             maximize=False),
        dict(lr=0.003, weight_decay=0.0, momentum=0.0, dampening=0.0, nesterov=False,
             maximize=True)]),
    "adam": (("exp_avg", "exp_avg_sq", "max_exp_avg_sq"), True, [
        dict(lr=0.01, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.01,
             decoupled_weight_decay=False, amsgrad=True, maximize=False),
        dict(lr=0.003, beta1=0.8, beta2=0.99, eps=1e-6, weight_decay=0.1,
             decoupled_weight_decay=True, amsgrad=False, maximize=True)]),
    "adagrad": (("sum",), True, [
        dict(lr=0.01, lr_decay=0.01, eps=1e-10, weight_decay=0.01, maximize=False),
        dict(lr=0.05, lr_decay=0.0, eps=1e-6, weight_decay=0.0, maximize=True)]),
    "rmsprop": (("square_avg", "momentum_buffer", "grad_avg"), True, [
        dict(lr=0.001, alpha=0.99, eps=1e-8, weight_decay=0.01, momentum=0.9,
             centered=True, maximize=False),
        dict(lr=0.003, alpha=0.9, eps=1e-6, weight_decay=0.0, momentum=0.0,
             centered=False, maximize=True)]),
}

#: the states each config uses (roles a config leaves off are absent)
def _used(name, hyper):
    if name == "sgd":
        return (hyper["momentum"] != 0,)
    if name == "adam":
        return (True, True, hyper["amsgrad"])
    if name == "adagrad":
        return (True,)
    return (True, hyper["momentum"] > 0, hyper["centered"])


def _edge_row(dtype):
    big = torch.finfo(dtype).max
    tiny = 6e-8 if dtype == torch.float16 else 1e-38  # a subnormal float16
    vals = [float("inf"), float("-inf"), float("nan"), 0.0, -0.0, big, -big, tiny, -tiny,
            3 * tiny, 1e-5, -1e-5, 1.0, -1.0, 2049.0, -65.5]
    return torch.tensor(vals, dtype=torch.float64)


class Run:
    """One optimizer's tensors for a few kernel calls, from a seed."""

    def __init__(self, name, config, dtype, kahan, seed=0, edge=True):
        self.name = name
        roles, has_steps, configs = OPTIMIZERS[name]
        self.hyper = configs[config]
        self.roles = roles
        self.dtype = dtype
        self.kahan = kahan
        gen = torch.Generator().manual_seed(seed)
        f64 = dict(dtype=torch.float64)

        def rand(s, scale=1.0, positive=False):
            x = torch.randn(s, generator=gen, **f64) * scale
            return (x.abs() if positive else x)

        params = [rand(s) for s in SIZES]
        if edge:
            params.append(_edge_row(dtype))
        if dtype == torch.float16:  # float16 subnormals take the ulp = 2**-24 branch
            params[1] = params[1] * 1e-5
        n = len(params)
        shapes = [p.shape for p in params]
        self.params = [p.to(DEVICE, dtype) for p in params]
        self.grads = [[rand(s, 0.1).to(DEVICE, dtype) for s in shapes] for _ in range(2)]
        used = _used(name, self.hyper)
        self.states = []
        for k in range(3):
            if k < len(roles) and used[k]:
                # second moments and sums non-negative; max_exp_avg_sq above exp_avg_sq
                positive = (name, k) in {("adam", 1), ("adam", 2), ("adagrad", 0),
                                         ("rmsprop", 0)}
                scale = 2.0 if (name, k) == ("adam", 2) else 1.0
                st = [rand(s, scale * 0.01, positive) for s in shapes]
                if (name, k) == ("rmsprop", 0):
                    st = [x + 0.01 for x in st]  # above grad_avg**2
                self.states.append([x.to(DEVICE, dtype) for x in st])
            else:
                self.states.append([None] * n)
        self.comps = ([rand(s, 1e-3).to(DEVICE, dtype) for s in shapes] if kahan
                      else [None] * n)
        self.steps = ([torch.tensor(float(i % 3), dtype=torch.float32 if i % 2 else
                                    torch.float64, device=DEVICE) for i in range(n)]
                      if has_steps else None)

    def clone(self):
        other = object.__new__(Run)
        other.__dict__.update(self.__dict__)
        cl = lambda ts: [None if t is None else t.clone() for t in ts]  # noqa: E731
        other.params = cl(self.params)
        other.states = [cl(s) for s in self.states]
        other.comps = cl(self.comps)
        other.steps = None if self.steps is None else cl(self.steps)
        return other

    def step(self, backend, i, host_steps=False, **options):
        """The ``i``-th grads through backend module ``backend``'s kernel
        (``host_steps``: Triton's rows flagged as torch's CPU steps of CUDA
        params, which the host advances)."""
        roles = tuple(self.roles) + ("",) * (3 - len(self.roles)) + ("kahan_comp",)
        n = len(self.params)
        flags = [False] * n if self.name == "sgd" else None
        packs = _tables.pack(self.params, self.grads[i], self.states + [self.comps], roles,
                             steps=self.steps, row_flags=flags,
                             backend="triton" if backend is tk else "torch")
        for batch, finish in packs:
            if host_steps and backend is tk:
                batch.table[:, L.FLAGS] |= L.FLAG_STEP_HOST
            contract.kernel(backend, self.name)(batch, **self.hyper, **options)
            finish()

    def tensors(self):
        out = list(self.params) + [c for c in self.comps if c is not None]
        for s in self.states:
            out += [t for t in s if t is not None]
        return out + list(self.steps or [])


def _bits(t):
    return t.view(torch.int16) if t.element_size() == 2 else t.view(torch.int32 if
                                                                       t.element_size() == 4
                                                                       else torch.int64)


def _assert_bit_equal(actual, expected, what):
    assert len(actual) == len(expected)
    for i, (a, e) in enumerate(zip(actual, expected)):
        assert a.dtype == e.dtype and a.shape == e.shape
        nan = a.isnan() & e.isnan()  # (a NaN's payload is the conversion's business)
        same = (_bits(a) == _bits(e)) | nan
        assert bool(same.all()), (f"{what}: tensor {i}: {int((~same).sum())} of "
                                  f"{a.numel()} elements differ, e.g. "
                                  f"{a[~same][:4].tolist()} vs {e[~same][:4].tolist()}")


@pytest.fixture(autouse=True)
def _small_blocks(monkeypatch):
    monkeypatch.setattr(_launch, "BLOCK", TEST_BLOCK)


_TORCH_SQRT = torch.Tensor.sqrt


def _ieee_sqrt(self):
    """Correctly rounded float32 square root (sqrt.rn, as the compiled kernels).

    torch's CPU float32 ``sqrt`` in this build is not: about 20% of random
    inputs come out one ulp off ``numpy.sqrt`` (the correctly rounded
    value). A low-precision param store hides that in the stored bits, but
    Kahan's compensation buffer keeps the float32 detail of the update, so
    the reference is run with the IEEE square root (a float32's float64
    square root rounded once more to float32 is correctly rounded).
    """
    if self.dtype == torch.float32:
        return _TORCH_SQRT(self.double()).float()
    return _TORCH_SQRT(self)


@pytest.fixture
def ieee_reference(monkeypatch):
    monkeypatch.setattr(torch.Tensor, "sqrt", _ieee_sqrt)


def test_torch_sqrt_is_what_the_fixture_replaces():
    """(Documents why ``ieee_reference`` exists; passes either way.)"""
    x = torch.rand(4096, generator=torch.Generator().manual_seed(0))
    assert torch.equal(_ieee_sqrt(x), torch.from_numpy(__import__("numpy").sqrt(x.numpy())))


def _options(kahan, sr, counter, seed=0x123456789ABCDEF1, salt=5):
    return dict(kahan_sum=kahan,
                stochastic_round=(seed, counter, salt) if sr else None)


def _both(name, config, dtype, kahan, sr, steps=2, host_steps=False, **run_kw):
    """Reference and Triton runs of ``steps`` calls from identical inputs."""
    base = Run(name, config, dtype, kahan, **run_kw)
    sides = []
    for backend in (reference, tk):
        run = base.clone()
        counter = torch.tensor(41, dtype=torch.int64, device=DEVICE)
        for i in range(steps):
            run.step(backend, i, host_steps=host_steps, **_options(kahan, sr, counter))
            counter += 1  # as the optimizer advances it once per step
        sides.append(run)
    return sides


def test_launchers_take_the_reference_keywords():
    assert contract.problems(tk, kernels=KERNELS) == []


_CASES = ([(name, 0, kahan, sr) for name in KERNELS for kahan in (False, True)
           for sr in (False, True)]
          + [(name, 1, True, True) for name in KERNELS])


@pytest.mark.parametrize("dtype", LOW, ids=str)
@pytest.mark.parametrize("name,config,kahan,sr", _CASES,
                         ids=[f"{n}-cfg{c}-{'kahan' if k else 'nokahan'}-{'sr' if s else 'rn'}"
                              for n, c, k, s in _CASES])
def test_matches_reference_bit_for_bit(name, config, kahan, sr, dtype, ieee_reference):
    """Params, compensation buffers, every state and the steps: the same bits
    as the reference backend's (the specification) after two steps. (The
    reference runs with an IEEE float32 square root: see ``_ieee_sqrt``.)"""
    ref, tri = _both(name, config, dtype, kahan, sr)
    _assert_bit_equal(tri.tensors(), ref.tensors(), f"{name} {dtype}")


@pytest.mark.parametrize("name", ["adam", "adagrad"])
def test_host_side_steps(name, ieee_reference):
    """Steps the host advances (its per-row scalars uploaded after the
    hyperparameters, and the seed and salt): the same bits as the reference."""
    ref, tri = _both(name, 0, torch.bfloat16, True, True, host_steps=True)
    _assert_bit_equal(tri.tensors(), ref.tensors(), name)


def test_the_options_change_the_stored_bits():
    """Not vacuous: each option, on its own, changes some stored param bits
    (and the compensation buffers hold what the store lost)."""
    runs = {}
    for kahan, sr in ((False, False), (True, False), (False, True)):
        runs[kahan, sr] = _both("adam", 0, torch.bfloat16, kahan, sr, steps=1, edge=False)[1]
    plain = runs[False, False].params
    for key in ((True, False), (False, True)):
        assert any(not torch.equal(_bits(a), _bits(b))
                   for a, b in zip(runs[key].params, plain)), key
    assert any(bool((c != 0).any()) for c in runs[True, False].comps)


def _sr_params(counter, seed=7, salt=5, dtype=torch.bfloat16, name="sgd"):
    run = Run(name, 1, dtype, kahan=False, edge=False)
    run.step(tk, 0, **_options(False, True, torch.tensor(counter, dtype=torch.int64,
                                                         device=DEVICE), seed, salt))
    return run.params


@pytest.mark.parametrize("dtype", LOW, ids=str)
def test_stochastic_rounding_is_reproducible_and_keyed(dtype):
    """The same seed, counter and salt give the same bits; changing any of them
    (the counter's high word included) changes some."""
    first = _sr_params(3, dtype=dtype)
    _assert_bit_equal(_sr_params(3, dtype=dtype), first, "rerun")
    for kw in (dict(counter=4), dict(counter=3 + (1 << 32)), dict(counter=3, seed=8),
               dict(counter=3, seed=7 + (1 << 32)), dict(counter=3, salt=6)):
        other = _sr_params(dtype=dtype, **kw)
        assert any(not torch.equal(_bits(a), _bits(b)) for a, b in zip(other, first)), kw


@pytest.mark.parametrize("name", KERNELS)
def test_found_inf_writes_nothing(name):
    """A skipped step (found_inf nonzero) leaves params, compensation buffers,
    states and steps as they were, with both options on."""
    run = Run(name, 0, torch.float16, kahan=True)
    before = [t.clone() for t in run.tensors()]
    counter = torch.tensor(9, dtype=torch.int64, device=DEVICE)
    run.step(tk, 0, found_inf=torch.ones(1, device=DEVICE), **_options(True, True, counter))
    _assert_bit_equal(run.tensors(), before, name)
    assert int(counter) == 9


@pytest.mark.parametrize("name", ["adam", "rmsprop"])
def test_float32_ignores_the_options(name):
    """float32 batches are stored as without the options, and launch exactly
    as without them (no argument or constexpr differs)."""
    base = Run(name, 0, torch.float32, kahan=False)
    plain, opts = base.clone(), base.clone()
    counter = torch.tensor(1, dtype=torch.int64, device=DEVICE)
    for i in range(2):
        plain.step(tk, i)
        opts.step(tk, i, **_options(True, True, counter))
    _assert_bit_equal(opts.tensors(), plain.tensors(), name)
    ((batch, finish),) = _tables.pack(base.params, base.grads[0], base.states + [base.comps],
                             tuple(OPTIMIZERS[name][0]) + ("",) * (3 - len(
                                 OPTIMIZERS[name][0])) + ("kahan_comp",),
                             steps=base.steps, backend="triton")
    for kahan, sr in ((True, True), (True, False), (False, True)):
        assert _launch._precision_args(batch, kahan, (1, counter, 2) if sr else None) \
            is _launch._OFF


def test_options_off_launch_as_before():
    """Both options off (or SR off and Kahan off) pass the constexprs
    KAHAN=SR=False, a None counter and no extra hyperparameter: one
    specialization, whatever the dtype."""
    for dtype in LOW:
        run = Run("sgd", 0, dtype, kahan=False, edge=False)
        ((batch, finish),) = _tables.pack(run.params, run.grads[0], run.states + [run.comps],
                                 ("momentum_buffer", "", "", "kahan_comp"),
                                 row_flags=[False] * len(run.params), backend="triton")
        assert _launch._precision_args(batch, False, None) is _launch._OFF
        on = _launch._precision_args(batch, True, (-1, torch.tensor(0), 2**40 + 3))
        assert (on.kahan, on.sr) == (True, True)
        assert on.slots == [float(2**32 - 1), float(2**32 - 1), 3.0]


def test_counter_must_live_with_the_params():
    run = Run("sgd", 0, torch.bfloat16, kahan=False, edge=False)
    ((batch, finish),) = _tables.pack(run.params, run.grads[0], run.states + [run.comps],
                             ("momentum_buffer", "", "", "kahan_comp"),
                             row_flags=[False] * len(run.params), backend="triton")
    with pytest.raises(ValueError, match="int64"):
        _launch._precision_args(batch, False, (1, torch.tensor(0.0), 2))
    if DEVICE.type == "cpu":
        with pytest.raises(ValueError, match="device"):
            _launch._precision_args(batch, False, (1, torch.tensor(0, device="meta"), 2))


@pytest.mark.parametrize("dtype", LOW, ids=str)
def test_rounding_matches_the_specification_across_binades(dtype):
    """SGD with lr 1 stores ``t = p - g`` (one float32 rounding, as torch's):
    param magnitudes over every binade of the type (float16 subnormals and
    values next to the largest finite one included, both signs) and grads of
    a fraction of them, so that ``t`` falls between two neighbours. Each
    element's stored bits are ``_precision``'s rounding of ``t`` with its own
    ``bits(k0, k1, START + i)`` (the second row: START 1000)."""
    gen = torch.Generator().manual_seed(3)
    n = 1000
    lo_exp, hi_exp = (-26, 16) if dtype == torch.float16 else (-130, 127)
    mags = torch.exp2(torch.rand(n, generator=gen, dtype=torch.float64)
                      * (hi_exp - lo_exp) + lo_exp)
    signs = torch.where(torch.rand(n, generator=gen) < 0.5, -1.0, 1.0).double()
    signs[:2] = 1.0  # the first two: t past the largest finite value (-> inf or max)
    big = torch.finfo(dtype).max
    mags[:4] = torch.tensor([big, big, big * 0.999, 1.0], dtype=torch.float64)
    p = (mags * signs).to(dtype)
    g = (p.double() * (torch.rand(n, generator=gen, dtype=torch.float64) - 0.7) * 0.01).to(dtype)
    g[:2] = -torch.tensor([big, big], dtype=torch.float64).to(dtype) * 2.0 ** -12
    params, grads = [p.clone(), p[:37].clone()], [g.clone(), g[:37].clone()]
    counter = torch.tensor(77, dtype=torch.int64, device=DEVICE)
    for batch, finish in _tables.pack(params, grads, [[None] * 2] * 4,
                               ("momentum_buffer", "", "", "kahan_comp"),
                               row_flags=[False] * 2, backend="triton"):
        contract.kernel(tk, "sgd")(batch, lr=1.0, weight_decay=0.0, momentum=0.0, dampening=0.0,
               nesterov=False, maximize=False, stochastic_round=(99, counter, 4))
        finish()
    k0, k1 = P.keys(99, 77, 4)
    rnd = P.round_bf16 if dtype == torch.bfloat16 else P.round_f16
    wants = []
    for q, h, start in ((p, g, 0), (p[:37], g[:37], n)):
        t = q.float() - h.float()
        r = P.bits(k0, k1, torch.arange(start, start + q.numel(), dtype=torch.int64))
        wants.append(rnd(t, r).to(dtype))
    _assert_bit_equal(params, wants, "spec")
    nearest = (p.float() - g.float()).to(dtype)
    up_or_down = _bits(params[0]) != _bits(nearest)
    assert 0 < int(up_or_down.sum()) < n  # stochastic: some away from nearest


# ----------------------------------------------------------- offline compile

_COMPILE = r"""
import json, re, sys, importlib
sys.path.insert(0, sys.argv[1])
import torch, triton, triton.language as tl
from triton.backends.compiler import GPUTarget
import _compile_matrix as m
from fused_optim.kernels.triton import _launch

_PTRS = {"table_ptr": "*i64", "map_ptr": "*i32", "hyper_ptr": "*fp64",
         "scal_ptr": "*fp64", "grad_scale_ptr": "*fp32", "found_inf_ptr": "*fp32",
         "counter_ptr": "*i64"}
#: every switch on, both options on: the largest code of each kernel (the
#: flags that change only the arithmetic are runtime values, in every build)
_ON = {"sgd": dict(USE_MOMENTUM=True), "adam": dict(AMSGRAD=True), "adagrad": {},
       "rmsprop": dict(CENTERED=True, USE_MOMENTUM=True)}


def facts(kernel, dname, cap):
    fn = getattr(importlib.import_module(f"fused_optim.kernels.triton.{kernel}"),
                 f"_{kernel}_kernel")
    dtype = m.DTYPES[dname]
    const = dict(ELEM=_launch._ELEM[dtype], IS_BF16=dtype == torch.bfloat16,
                 COMPUTE=tl.float32, IS_F64=False, BLOCK=_launch.BLOCK, ALIGNED=True,
                 TAIL_ALIGNED=True, VEC=8, HAS_GRAD_SCALE=True, HAS_FOUND_INF=True,
                 KAHAN=True, SR=True, **_ON[kernel])
    sig = {}
    for n, param in zip(fn.arg_names, fn.params):
        sig[n] = _PTRS.get(n, "constexpr")
        # (a constexpr with a default is one the launchers no longer pass)
        assert n in _PTRS or n in const or param.has_default, n
    attrs = {(fn.arg_names.index(n),): [["tt.divisibility", 16]]
             for n in sig if sig[n].startswith("*")}
    src = m.ASTSource(fn, sig, const, attrs)
    c = triton.compile(src, target=GPUTarget("cuda", cap, 32),
                       options={"num_warps": _launch.num_warps(dtype, True, True),
                                "enable_fp_fusion": False})
    ptx = c.asm["ptx"]
    body = ptx.split(".section")[0]  # the code, not the debug sections
    out = {"kernel": kernel, "dtype": dname, "arch": cap,
           "vector_loads": len(re.findall(r"ld\.global[.\w]*\.v4\.b32", ptx)),
           "vector_stores": len(re.findall(r"st\.global[.\w]*\.v4\.b32", ptx)),
           "inexact": sorted(k for k, pat in m._INEXACT.items() if re.search(pat, ptx)),
           "local": len(re.findall(r"\.local\b", ptx)),
           "ieee_div": len(re.findall(r"\bdiv\.rn\.f32\b", ptx)),
           "ieee_sqrt": len(re.findall(r"\bsqrt\.rn\.f32\b", ptx)),
           "int_mul": len(re.findall(r"\bmul\.lo\.[su]32\b", body)),
           "instructions": len(re.findall(r"^\s+[a-z@][^;]*;", body, re.M))}
    out.update(m._ptxas_facts(ptx, cap))
    return out


jobs = [(k, d, cap) for k in ("sgd", "adam", "adagrad", "rmsprop")
        for d in ("bfloat16", "float16") for cap in map(int, sys.argv[2].split(","))]
for job in jobs:
    print(json.dumps(facts(*job)), flush=True)
"""

#: streams each kernel reads and writes with every switch on (params, grads
#: and states), before the compensation buffer (one more of each)
_STREAMS = {"sgd": (3, 2), "adam": (5, 4), "adagrad": (3, 2), "rmsprop": (5, 4)}


@pytest.fixture(scope="module")
def compiled():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, "-c", _COMPILE, str(HERE), "90,80"],
                         capture_output=True, text=True, env=env, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    return [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]


def test_option_specializations_compile_cleanly(compiled):
    """Each kernel, bfloat16 and float16, Kahan and SR on (every other switch
    on, aligned with the tail hint), for sm_90 and sm_80: no local memory or
    spills, IEEE division and square root with no .approx/.ftz, 128-bit loads
    and stores of every stream (the compensation buffer's included) on both
    the whole-block and the masked path."""
    assert len(compiled) == 4 * 2 * 2
    bad = {}
    for r in compiled:
        reads, writes = _STREAMS[r["kernel"]]
        reads, writes = reads + 1, writes + 1  # the compensation buffer
        why = []
        if r["stack_bytes"] or r["spill_store_bytes"] or r["spill_load_bytes"] or r["local"]:
            why.append("local memory")
        if r["inexact"]:
            why.append(f"non-IEEE {r['inexact']}")
        if not r["ieee_div"]:
            why.append("no div.rn")
        if r["kernel"] != "sgd" and not r["ieee_sqrt"]:
            why.append("no sqrt.rn")
        if r["vector_loads"] < 2 * reads or r["vector_stores"] < 2 * writes:
            why.append(f"{r['vector_loads']} v4 loads, {r['vector_stores']} v4 stores")
        # the stream keys and two mixes per element: 4 + 10 + (hi * GOLDEN)
        if r["int_mul"] < 4:
            why.append("no integer mixing")
        if why:
            bad[f"{r['kernel']} {r['dtype']} sm_{r['arch']}"] = why
    assert not bad, bad
