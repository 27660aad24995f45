"""Cold start (issue 16): background compiles, warm-up, and the disk cache.

What is promised (``fused_optim/_warmup.py``, ``kernels/numba/_launch.launch``,
``kernels/numba/_disk_cache.py``):

* a parallel batch whose kernel is not compiled yet runs the serial kernel
  (the same bits) while the parallel one compiles in the background;
* the construction-time warm-up compiles what the first step needs without
  touching the user's tensors, RNG, hooks or state;
* ``fused-optim warmup`` fills the disk cache, so that a later process
  compiles nothing;
* processes compiling into one empty cache at once all succeed, agree bit for
  bit, and leave a cache the next process loads from;
* with no writable cache location Numba would refuse to import the kernels:
  a temporary directory is used instead, and kernels warmed beside the
  sources are copied to where the cache is.

(The suite runs with ``FUSED_OPTIM_WARMUP=0``, tests/conftest.py; these tests
turn it on where they test it.)
"""

from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys
import threading
import types

import numpy as np
import pytest
import torch
from torch.optim.optimizer import register_optimizer_step_pre_hook

import fused_optim
from fused_optim import _warmup
from matrix import skip_unless_runnable

pytestmark = pytest.mark.filterwarnings("ignore::numba.core.errors.NumbaIRAssumptionWarning")


# ---------------------------------------------------------------- launch logic


class _FakeKernel:
    """A stand-in for a Numba dispatcher: records calls; "compiles" on a gate."""

    def __init__(self, name, calls, gate=None):
        self.name, self.calls, self.gate = name, calls, gate
        self.overloads = {}
        self._cache = types.SimpleNamespace(load_overload=lambda sig, ctx: None)
        self.targetctx = None

    def typeof_pyval(self, value):
        return type(value)

    def compile(self, sig):
        if self.gate is not None:
            self.gate.wait(10)
        self.overloads[sig] = True

    def __call__(self, *args):
        self.calls.append(self.name)


def test_parallel_batches_run_serially_until_their_kernel_is_compiled(monkeypatch):
    from fused_optim.kernels.numba import _launch

    monkeypatch.setenv(_launch.WARMUP_ENV, "1")
    calls, gate = [], threading.Event()
    par, ser = _FakeKernel("parallel", calls, gate), _FakeKernel("serial", calls)
    args = (None, None, None, np.empty(0, np.float32), 1.5)
    _launch.launch(par, ser, True, args)
    _launch.launch(par, ser, True, args)
    assert calls == ["serial", "serial"]  # compiling behind, one thread only
    assert len([k for k in _launch._PENDING if k[0] is par]) == 1
    gate.set()
    _launch.wait_for_background(10)
    _launch.launch(par, ser, True, args)
    _launch.launch(par, ser, False, args)
    assert calls == ["serial", "serial", "parallel", "serial"]
    assert not [k for k in _launch._PENDING if k[0] is par]


def test_off_the_step_compiles_the_parallel_kernel_itself(monkeypatch):
    from fused_optim.kernels.numba import _launch

    monkeypatch.setenv(_launch.WARMUP_ENV, "0")
    calls = []
    par, ser = _FakeKernel("parallel", calls), _FakeKernel("serial", calls)
    _launch.launch(par, ser, True, (None, None, None, np.empty(0, np.float64), 2.0))
    assert calls == ["parallel"]


# ---------------------------------------------------------------- warm-up at construction


def test_construction_warms_the_first_steps_kernel_and_touches_nothing(monkeypatch):
    skip_unless_runnable("numba")
    nb_sgd = importlib.import_module("fused_optim.kernels.numba.sgd")

    monkeypatch.setenv(_warmup.ENV_VAR, "1")
    hook_calls = []
    handle = register_optimizer_step_pre_hook(lambda *a: hook_calls.append(a))
    try:
        torch.manual_seed(3)
        params = [torch.randn(7, 5, requires_grad=True), torch.randn(5, requires_grad=True)]
        before = [p.detach().clone() for p in params]
        # an unusual configuration, so that the warm-up has something to compile
        opt = fused_optim.SGD(params, lr=0.25, momentum=0.5, dampening=0.25, maximize=True,
                              backend="numba")
        rng = torch.get_rng_state()
        _warmup.wait(120)
        assert torch.equal(torch.get_rng_state(), rng)
        assert hook_calls == []
        assert len(opt.state) == 0 and all(p.grad is None for p in params)
        assert all(torch.equal(a, b) for a, b in zip(params, before))
        compiled = len(nb_sgd.sgd_serial.overloads)
        for p in params:
            p.grad = torch.ones_like(p)
        opt.step()  # the warm-up's specialization: nothing new to compile
        assert len(nb_sgd.sgd_serial.overloads) == compiled
    finally:
        handle.remove()


class _Seeded(fused_optim.SGD):
    """A user's subclass whose constructor draws from torch's generator."""

    built = 0

    def __init__(self, params, **kwargs):
        type(self).built += 1
        self.noise = float(torch.rand(()))
        super().__init__(params, **kwargs)


def test_warmup_never_constructs_the_users_class(monkeypatch):
    """Issue 29: the shadow step built ``type(opt)``, running a subclass's
    ``__init__`` again in a thread; one drawing from torch's generator then
    changed a seeded run with the warm-up on."""
    skip_unless_runnable("numba")
    monkeypatch.setenv(_warmup.ENV_VAR, "1")
    params = [torch.zeros(6, requires_grad=True)]
    torch.manual_seed(11)
    _Seeded.built = 0
    opt = _Seeded(params, lr=0.0625, momentum=0.125, backend="numba")
    _warmup.wait(120)
    after = torch.get_rng_state()
    torch.manual_seed(11)
    torch.rand(())
    assert _Seeded.built == 1
    assert torch.equal(after, torch.get_rng_state())
    assert _warmup._own_class(opt) is fused_optim.SGD


def test_warmup_keeps_nothing_per_optimizer(monkeypatch):
    """Issue 29: each optimizer built with new hyperparameters left a finished
    thread and a key behind (about 2.6 KB): a sweep grew without bound."""
    import gc
    import tracemalloc

    skip_unless_runnable("numba")
    monkeypatch.setenv(_warmup.ENV_VAR, "1")
    params = [torch.zeros(6, requires_grad=True)]

    def sweep(lrs):
        for lr in lrs:
            fused_optim.SGD(params, lr=lr, momentum=0.5, backend="numba")
            _warmup.wait(120)

    sweep([0.5])  # compiles, and fills lazily built caches
    tracemalloc.start()
    try:
        sweep([1.0 + i for i in range(20)])
        gc.collect()  # what a cycle holds until the collector runs is not kept
        before = tracemalloc.get_traced_memory()[0]
        sweep([100.0 + i for i in range(200)])
        gc.collect()
        grown = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert grown < 200 * 64, f"{grown} bytes kept for 200 optimizers"
    assert not [t for t in threading.enumerate() if t.name == "fused_optim-warmup"]
    assert _warmup._queue == [] and _warmup._worker is None


def test_warmup_is_off_under_the_environment_switch(monkeypatch):
    monkeypatch.setenv(_warmup.ENV_VAR, "0")
    opt = fused_optim.SGD([torch.zeros(3, requires_grad=True)], lr=0.1)
    assert _warmup.start(opt) is None


def test_reference_backend_buckets_are_not_warmed():
    opt = fused_optim.SGD([torch.zeros(3, requires_grad=True)], lr=0.1, backend="torch")
    buckets = _warmup._buckets(opt)
    assert [(d, n) for _, d, n in buckets] == [(torch.float32, 3)]
    assert _warmup._warmable(opt.backend, buckets) == []


# ---------------------------------------------------------------- processes and the cache

_STEPPER = r"""
import hashlib, importlib, json, sys, torch
import fused_optim
from fused_optim import _warmup
torch.manual_seed(0)
rows = 300 if sys.argv[1] == "big" else 3  # over / under Numba's serial threshold
params = [torch.randn(rows, 128, requires_grad=True), torch.randn(128, requires_grad=True)]
opt = fused_optim.Adagrad(params, backend="numba")
for i in range(6):
    g = torch.Generator().manual_seed(i)
    for p in params:
        p.grad = torch.randn(p.shape, generator=g)
    opt.step()
    if i == 2:
        _warmup.wait(600)  # the rest on the parallel kernel
k = importlib.import_module("fused_optim.kernels.numba.adagrad")
h = hashlib.sha256()
for p in params:
    h.update(p.detach().numpy().tobytes())
    h.update(opt.state[p]["sum"].numpy().tobytes())
print(json.dumps(dict(digest=h.hexdigest(), parallel=len(k.adagrad_parallel.overloads),
                      serial=len(k.adagrad_serial.overloads),
                      misses=sum(k.adagrad_parallel.stats.cache_misses.values())
                      + sum(k.adagrad_serial.stats.cache_misses.values()))))
"""


def _env(cache, warmup):
    env = dict(os.environ, NUMBA_CACHE_DIR=str(cache), FUSED_OPTIM_WARMUP=warmup)
    env.pop("TRITON_INTERPRET", None)
    return env


def _step_in_processes(cache, size, warmup, count=1):
    procs = [subprocess.Popen([sys.executable, "-c", _STEPPER, size], env=_env(cache, warmup),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(count)]
    outs = []
    for p in procs:
        out, err = p.communicate(timeout=900)
        assert p.returncode == 0, err[-3000:]
        outs.append(json.loads(out.strip().splitlines()[-1]))
    return outs


def test_processes_compiling_into_one_empty_cache_agree(tmp_path):
    """Three processes compiling the same kernel into one empty cache at
    once, then one that must load it from the cache they left."""
    skip_unless_runnable("numba")
    outs = _step_in_processes(tmp_path, "small", "1", count=3)
    (last,) = _step_in_processes(tmp_path, "small", "0")
    assert {o["digest"] for o in outs} == {last["digest"]}
    assert all(o["serial"] == 1 and o["parallel"] == 0 for o in outs + [last])
    assert last["misses"] == 0


def test_background_compile_gives_the_same_bits(tmp_path):
    """From an empty cache a parallel batch steps on the serial kernel while
    the parallel one compiles behind (both end up compiled in that process);
    a later process loads both and runs every step on the parallel one: the
    same bits."""
    skip_unless_runnable("numba")
    assert 300 * 128 + 128 >= fused_optim.kernels.numba.SERIAL_BELOW  # the parallel path
    (first,) = _step_in_processes(tmp_path, "big", "1")
    (last,) = _step_in_processes(tmp_path, "big", "0")
    assert first["serial"] == 1 and first["parallel"] == 1
    assert last["misses"] == 0 and last["parallel"] == 1 and last["serial"] == 0
    assert first["digest"] == last["digest"]


_FORKER = r"""
import faulthandler, json, multiprocessing as mp, sys, time, torch
import fused_optim

N = 40000 if sys.argv[1] == "background" else 100  # the parallel path / the serial one

def run(q=None):
    if q is not None:
        torch.set_num_threads(1)  # as a DataLoader worker: torch's OpenMP hangs after fork
    p = torch.nn.Parameter(torch.linspace(-1, 1, N))
    p.grad = torch.linspace(0, 1, N)
    opt = fused_optim.SGD([p], lr=0.1, momentum=0.9, backend="numba")
    opt.step()
    opt.step()
    out = float(p.detach().double().sum())
    if q is not None:
        q.put(out)
    return out

if __name__ == "__main__":
    if sys.argv[1] == "background":
        run()  # the step compiles serially; the parallel kernel compiles behind it
    else:
        p = torch.nn.Parameter(torch.zeros(N))
        fused_optim.SGD([p], lr=0.1, momentum=0.9, backend="numba")  # starts the warm-up
        time.sleep(0.3)
    ctx = mp.get_context("fork")
    q = ctx.Queue()
    children = [ctx.Process(target=run, args=(q,)) for _ in range(2)]
    for c in children:
        c.start()
    for c in children:
        c.join(float(sys.argv[2]))
    hung = [c.is_alive() for c in children]
    for c in children:
        if c.is_alive():
            c.kill()
    print(json.dumps(dict(hung=hung, codes=[c.exitcode for c in children],
                          results=[q.get(timeout=5) for c in children if not hung[0]],
                          expected=run())))
"""


@pytest.mark.parametrize("during", ["warmup", "background"])
def test_a_forked_child_steps_while_the_parent_compiles(tmp_path, during):
    """Issue 29: a fork while the warm-up (or a background compile) held
    Numba's compiler lock or an import's lock left it held in the child,
    whose own step then waited forever. From an empty cache, fork two
    children mid-compile; each builds and steps an optimizer."""
    skip_unless_runnable("numba")
    out = subprocess.run([sys.executable, "-c", _FORKER, during, "120"],
                         env=_env(tmp_path, "1"), capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    res = json.loads(out.stdout.strip().splitlines()[-1])
    assert res["hung"] == [False, False] and res["codes"] == [0, 0], res
    assert res["results"] == [res["expected"]] * 2


def test_warmup_command_fills_the_cache(tmp_path):
    skip_unless_runnable("numba")
    out = subprocess.run([sys.executable, "-m", "fused_optim", "warmup", "--optimizers",
                          "Adagrad", "--dtypes", "float32"], env=_env(tmp_path, "1"),
                         capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.startswith("Adagrad (defaults) float32: ")
    for size in ("small", "big"):
        assert _step_in_processes(tmp_path, size, "0")[0]["misses"] == 0


def test_warmup_command_rejects_unknown_names(tmp_path):
    out = subprocess.run([sys.executable, "-m", "fused_optim", "warmup", "--optimizers",
                          "Adamm"], capture_output=True, text=True, timeout=300)
    assert out.returncode == 2 and "unknown optimizer(s) Adamm" in out.stderr
    out = subprocess.run([sys.executable, "-m", "fused_optim", "warmup", "--dtypes", "int8"],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 2 and "not a floating-point torch dtype" in out.stderr


# ---------------------------------------------------------------- where the cache lives

_NO_LOCATION = r"""
import numba, sys
from numba.core import caching
# a read-only install run by a user without a writable home
for cls in (caching.InTreeCacheLocator, caching.UserWideCacheLocator):
    cls.from_function = classmethod(lambda cls, f, p: None)
import fused_optim.kernels.numba as nb
print(numba.config.CACHE_DIR)
print(nb._cache_anchor._cache._cache_path)
"""


def test_no_writable_cache_location_falls_back_to_a_temporary_one(tmp_path):
    skip_unless_runnable("numba")
    env = dict(os.environ, TMPDIR=str(tmp_path))
    env.pop("NUMBA_CACHE_DIR", None)
    out = subprocess.run([sys.executable, "-c", _NO_LOCATION], env=env, capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    chosen, path = out.stdout.split()
    assert chosen.startswith(str(tmp_path)) and path.startswith(chosen)


def test_kernels_warmed_beside_the_sources_are_copied_to_the_cache_in_use(tmp_path,
                                                                         monkeypatch):
    from fused_optim.kernels.numba import _disk_cache

    monkeypatch.delenv("NUMBA_CACHE_DIR", raising=False)
    beside, used = tmp_path / "beside", tmp_path / "used"
    beside.mkdir()
    ours = ["sgd.sgd_serial-70.py311.nbi", "sgd.sgd_serial-70.py311.1.nbc", _disk_cache._STAMP]
    for name in ours + ["userlib.f-1.py311.nbi"]:
        (beside / name).write_text(name)
    used.mkdir()
    (used / ours[0]).write_text("newer")
    fake = types.SimpleNamespace(_cache=types.SimpleNamespace(_cache_path=str(used)))
    assert _disk_cache.seed(fake, beside=str(beside)) == 2
    assert sorted(p.name for p in used.iterdir()) == sorted(ours)
    assert (used / ours[0]).read_text() == "newer"  # never overwritten
    monkeypatch.setenv("NUMBA_CACHE_DIR", str(used))
    assert _disk_cache.seed(fake, beside=str(beside)) == 0  # the user's own cache: as it is


# ---------------------------------------------------------------- the cold-start report


def test_cold_start_report_interleaves_fresh_processes(monkeypatch):
    """measure() runs every variant in every round (shuffled), each empty-cache
    run in a directory of its own and every warm one in the directory its
    fill run left; the table and JSON carry medians (the children stubbed)."""
    from fused_optim.bench import cold

    seen = []

    def child(impl, name, width, env, cwd=None):
        seen.append((impl, name, env.get("NUMBA_CACHE_DIR"), env.get("FUSED_OPTIM_WARMUP"),
                     env.get("X")))
        return dict(import_optim=0.01, construct=0.1, forward_backward=0.0,
                    first_step=0.5 if impl == "fused" else 0.02, second_step=0.001,
                    wall=1.0, peak_rss_mib=400.0, params=10, module="m")

    monkeypatch.setattr(cold, "_child", child)
    results = cold.measure(runs=3, width=8, configs=("SGD",), extra_env=["X=1"])
    fills, runs = seen[:2], seen[2:]
    assert all(f[3] == "0" for f in fills)  # filled by a process compiling in its step
    assert len(runs) == 3 * 5
    empties = [r[2] for r in runs if r[0] == "fused" and "empty" in r[2]]
    assert len(empties) == len(set(empties)) == 6
    warm = {r[2] for r in runs if r[0] == "fused" and "warm" in r[2]}
    assert warm == {f[2] for f in fills}
    assert {r[4] for r in runs} == {None, "1"}
    assert set(results) == {("SGD", v) for v in (
        "torch.optim", "fused_optim (warm cache)", "fused_optim (empty cache)",
        "fused_optim X=1 (warm cache)", "fused_optim X=1 (empty cache)")}
    table = cold.format_table(results)
    assert "medians over 3 fresh processes" in table and "500" in table
    doc = cold.to_json(results, {})
    assert doc["results"][0]["median"]["wall"] == 1.0
    with pytest.raises(ValueError, match="KEY=VALUE"):
        cold.measure(runs=0, extra_env=["nokey"])
