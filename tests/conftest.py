import os

import pytest
import torch

# Without a GPU the Triton kernels run on CPU tensors through Triton's
# interpreter; it must be switched on before triton is first imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# Kernels compile in the step that needs them, never behind a test's back
# (fused_optim/_warmup.py); tests/test_cold_start.py turns it on where tested.
os.environ.setdefault("FUSED_OPTIM_WARMUP", "0")

# Under pytest-xdist the workers already fill the cores: torch's own intra-op
# threads on top (one per core in each worker) only oversubscribe them, and
# its OpenMP threads spin while they wait. Measured (2-core VM, 2026-12-07,
# load 5-9 from other work): parity's large and many_tiny layouts on the
# reference backend took 66 s of CPU with torch's default 2 threads and 35 s
# with 1. Numba's thread count is its own (NUMBA_NUM_THREADS): the parallel
# entry points still split every batch over the cores.
_workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "0") or 0)
if _workers:
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // _workers))

# FUSED_OPTIM_TEST_DISPATCH=1 runs every eager step through the step
# operators (fused_optim/_ops.py), the way compiled steps run them.
if os.environ.get("FUSED_OPTIM_TEST_DISPATCH") == "1":
    import fused_optim._ops

    fused_optim._ops.DISPATCH_EAGER = True


# The files whose tests take longest from CI's cold Numba cache run first, so
# that no worker starts one near the end while the other idles (make test
# hands each worker whole files, in this order). Measured on the cold run
# of 2026-11-29: the stateful machines ~170 s, the precision tests ~950 s.
_SLOW_FIRST = ("test_stateful.py", "test_precision_kernels.py", "test_precision.py",
               "test_plan_cache.py", "test_parity.py", "test_cold_start.py",
               "test_bench.py", "test_triton_kernels.py", "test_examples.py")


def pytest_collection_modifyitems(session, config, items):
    rank = {name: i for i, name in enumerate(_SLOW_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))


# ------------------------------------------------------------ the check tier
# `make check` runs `pytest -m check`: the fast tier to run while working
# (README "Testing"). Nothing is marked by hand: every test collected is in
# the tier unless one of the rules below takes it out, so a new test (or a
# new optimizer in optim_db.py) joins by itself. The tier is each optimizer on
# the reference ("torch") backend and Numba's serial entry points: parity on
# the small layouts, errors, state_dict, memory safety, the reuse rule,
# behaviour, schedulers, AMP, patching. `make test` runs everything.
# Measured on the 2-core VM, warm Numba cache (README): keep it under 2 min;
# a file or test that costs more than a few seconds goes in a list below,
# with its cost.

#: whole files left to `make test`, with their warm serial cost (2-core VM,
#: 2026-12-07, under load)
_CHECK_SKIP_FILES = frozenset({
    "test_stateful.py",           # hypothesis state machines, ~170 s cold
    "test_cold_start.py",         # fresh interpreters with empty caches
    "test_compile.py",            # torch.compile, ~60 s
    "test_distributed.py",        # process groups in subprocesses, ~40 s
    "test_run.py",                # the console script in subprocesses, ~24 s
    "test_examples.py",           # the examples' training runs
    "test_bench.py",              # the benchmark harness
    "test_gpu_check.py",          # benchmarks/gpu_check.py's time limits
    "test_cuda.py",               # GPU only
    "test_triton_kernels.py", "test_triton_compile.py",  # Triton (interpreted here)
})

#: single tests left to `make test`: statistical runs and subprocesses
_CHECK_SKIP_TESTS = frozenset({
    "test_kahan_and_stochastic_rounding_track_a_float64_shadow",  # ~26 s
    "test_stochastic_rounding_is_unbiased",                        # ~7 s
    "test_functional_map_built_while_patched_is_repaired",         # subprocess, ~6 s
    # examples/bf16_precision.py's 800-step run (test_precision.py), ~9 s
    "test_options_stay_closer_to_fp32_than_plain_bf16",
    "test_same_init_and_data_for_every_variant",
    "test_compiled_step_equals_the_eager_one",  # torch.compile (test_state_dtype.py)
    "test_example_halves_the_state_and_keeps_the_loss",  # 800 steps, ~10 s
})

#: backends in the tier (a test without a backend parameter is in)
_CHECK_BACKENDS = frozenset({"torch", "numba"})

#: tests/matrix.py layouts left out: "large" takes Numba's parallel entry
#: points; "many_tiny" (300 params) is ~90% of parity's time
_CHECK_SKIP_LAYOUTS = frozenset({"large", "many_tiny"})

#: words in a test's name that put it outside the tier (Triton kernels,
#: Numba's parallel entry points; test_precision_kernels.py names its Triton
#: half test_triton_*). Twenty reuse cases in the tier still take
#: the parallel entry points, on purpose (aliased params, three threads,
#: storage shrunk and regrown: test_plan_cache.py), ~10 s warm.
_CHECK_SKIP_WORDS = ("triton", "parallel")


def _in_check_tier(item, serial_below) -> bool:
    if item.path.name in _CHECK_SKIP_FILES:
        return False
    name = getattr(item, "originalname", item.name)
    if name in _CHECK_SKIP_TESTS or any(w in name for w in _CHECK_SKIP_WORDS):
        return False
    callspec = getattr(item, "callspec", None)
    params = callspec.params if callspec is not None else {}
    if params.get("backend", "torch") not in _CHECK_BACKENDS:
        return False
    if params.get("layout") in _CHECK_SKIP_LAYOUTS:
        return False
    big = params.get("big")  # a param's numel: above SERIAL_BELOW runs parallel
    if type(big) is int and big >= serial_below:
        return False
    return True


def pytest_configure(config):
    config.addinivalue_line(
        "markers", "check: the fast tier `make check` runs (set in tests/conftest.py by rule)")


def pytest_itemcollected(item):
    # before any pytest_collection_modifyitems, so before `-m` selects
    from fused_optim.kernels.numba import SERIAL_BELOW

    if _in_check_tier(item, SERIAL_BELOW):
        item.add_marker(pytest.mark.check)


# ------------------------------------------------ where CI's compile time goes
# FUSED_OPTIM_COMPILE_LOG=<prefix>: tests/compile_log.py
if os.environ.get("FUSED_OPTIM_COMPILE_LOG"):
    import compile_log

    compile_log.install()
