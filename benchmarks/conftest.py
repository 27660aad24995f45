"""pytest-benchmark suite for ``optimizer.step()``: shared cases and fixtures.

One benchmark group per case (``list/optimizer/dtype``, plus ``/cuda`` on the
GPU) and one benchmark per implementation in it: fused_optim's backends,
torch.optim's for-loop, foreach and fused paths, the memory ceiling, and on
CUDA the copy reference. On CUDA each timed call is K back-to-back steps with
one synchronize after the last (K calibrated as ``fused_optim.bench`` does,
recorded as ``steps_per_sample``); pytest-benchmark divides by K, so its
statistics are per step either way.
Parameter lists, optimizer settings and implementations come from
``fused_optim.bench``, so these numbers and the CLI's describe the same work.
The cases are the settings of ``fused_optim.bench.OPTIMIZERS`` (the records'
``bench``): a new optimizer or setting needs no edit here. A module that sets
``KERNEL`` keeps to the settings whose record has that kernel.

Usage::

    pytest benchmarks/ --benchmark-only --benchmark-autosave   # time, save
    pytest benchmarks/ --benchmark-only --benchmark-compare    # vs last save
    FUSED_OPTIM_BENCH_SIZE=tiny pytest benchmarks/ --benchmark-disable  # CI

Environment:
    FUSED_OPTIM_BENCH_SIZE: ``tiny`` (a 4K-param list, seconds), ``quick``
        or ``default`` (resnet50 and many-small; the CLI gives them different
        time budgets, here they are the same) or ``full`` (adds gpt2-small
        and fixed-cost). Default:
        ``quick`` with ``--benchmark-only``, else ``tiny``, so a plain
        ``pytest`` that collects this folder stays a smoke test.
    FUSED_OPTIM_BENCH_ROUNDS: timed rounds per benchmark (default per size).
    FUSED_OPTIM_BENCH_DTYPES: comma-separated dtypes (default fp32,bf16).
    FUSED_OPTIM_BENCH_COMPILE_BACKEND: ``torch.compile``'s backend for the
        compiled implementations (default ``inductor``). ``make test``'s
        smoke run sets ``aot_eager``: every compiled case is still traced
        whole by dynamo and AOT autograd, around fused_optim's step
        operator, but Inductor's C++ code generation for each of them took
        about 90 s of the smoke run's 155 s CPU from a cold cache
        (2026-12-08); tests/test_compile.py and test_bench.py's
        ``test_cli_compiled_baseline`` keep Inductor.

pytest-benchmark times one implementation after another, not interleaved, so
machine drift between benchmarks shows up in the ratios; for A/B decisions on
a noisy machine prefer ``python -m fused_optim bench``. This suite is for
``--benchmark-compare`` across commits.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import pytest
import torch

# timed steps never share the machine with a background compile (fused_optim/_warmup.py)
os.environ.setdefault("FUSED_OPTIM_WARMUP", "0")

from fused_optim import bench  # noqa: E402

SIZE_ENV = "FUSED_OPTIM_BENCH_SIZE"
ROUNDS_ENV = "FUSED_OPTIM_BENCH_ROUNDS"
DTYPES_ENV = "FUSED_OPTIM_BENCH_DTYPES"
COMPILE_BACKEND_ENV = "FUSED_OPTIM_BENCH_COMPILE_BACKEND"

#: (timed rounds, warm-up rounds) per size.
ROUNDS = {"tiny": (3, 1), "quick": (10, 2), "default": (10, 2), "full": (20, 3)}


def _size(config) -> str:
    size = os.environ.get(SIZE_ENV, "").strip().lower()
    if not size:
        return "quick" if config.getoption("benchmark_only", False) else "tiny"
    if size not in bench.SIZES:
        raise pytest.UsageError(f"{SIZE_ENV}={size!r}: expected one of {', '.join(bench.SIZES)}")
    return size


def _rounds(size: str) -> tuple[int, int]:
    rounds, warmup = ROUNDS[size]
    text = os.environ.get(ROUNDS_ENV, "").strip()
    if text:
        try:
            rounds = int(text)
        except ValueError:
            raise pytest.UsageError(f"{ROUNDS_ENV}={text!r} is not an int") from None
        if rounds < 1:
            raise pytest.UsageError(f"{ROUNDS_ENV} must be at least 1")
    return rounds, warmup


def _dtypes() -> list:
    text = os.environ.get(DTYPES_ENV, "").strip()
    names = [t.strip() for t in text.split(",") if t.strip()] or list(bench.DEFAULT_DTYPES)
    for n in names:
        if n not in bench.DTYPES:
            raise pytest.UsageError(f"{DTYPES_ENV}: unknown dtype {n!r} "
                                    f"(known: {', '.join(bench.DTYPES)})")
    return names


def _devices() -> list:
    return ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@dataclass(frozen=True)
class Case:
    """One benchmark: an implementation on one list/optimizer/dtype/device."""

    list: str
    optimizer: str
    dtype: str
    device: str
    impl: str
    rounds: int
    warmup: int

    @property
    def group(self) -> str:
        g = f"{self.list}/{self.optimizer}/{self.dtype}"
        return g if self.device == "cpu" else f"{g}/{self.device}"

    @property
    def id(self) -> str:
        return self.group.replace("/", "-") + f"-{self.impl}"


def _cases(optimizers, size: str) -> list:
    rounds, warmup = _rounds(size)
    out = []
    for device in _devices():
        for list_name in bench.SIZES[size].lists:
            for opt in optimizers:
                spec = bench.OPTIMIZERS[opt]
                for dt in _dtypes():
                    wanted = [i for i in bench.IMPLS if i != "torch"
                              and (i != bench.COPY or device == "cuda")]
                    impls, _ = bench.available_impls(spec, bench.DTYPES[dt], device, wanted)
                    out += [Case(list_name, opt, dt, device, i, rounds, warmup) for i in impls]
    return out


def pytest_report_header(config):
    size = _size(config)
    return (f"fused_optim benchmarks: size={size} ({', '.join(bench.SIZES[size].lists)}), "
            f"rounds={_rounds(size)[0]}; set {SIZE_ENV}=tiny|quick|default|full")


def pytest_generate_tests(metafunc):
    if "bench_case" not in metafunc.fixturenames:
        return
    kernel = getattr(metafunc.module, "KERNEL", None)
    optimizers = [n for n, spec in bench.OPTIMIZERS.items()
                  if kernel is None or spec.kind == kernel]
    if not optimizers:
        raise pytest.UsageError(f"{metafunc.module.__name__}: no fused_optim.bench.OPTIMIZERS "
                                f"setting has the kernel {kernel!r}")
    cases = _cases(optimizers, _size(metafunc.config))
    metafunc.parametrize("bench_case", cases, ids=[c.id for c in cases], indirect=True)


_draw: dict = {}


def _data(case: Case):
    """The seeded draw of a case, kept while consecutive benchmarks (the
    implementations of one group) reuse it; regenerating gpt2-small costs
    seconds."""
    key = (case.list, case.dtype, case.device)
    if key not in _draw:
        _draw.clear()
        shapes = bench.shape_list(case.list)
        _draw[key] = (shapes, *bench.make_data(shapes, bench.DTYPES[case.dtype], case.device))
    return _draw[key]


@pytest.fixture
def bench_case(request):
    """(case, runner): the implementation built on private copies of the
    case's params and grads; building is not timed."""
    case = request.param
    shapes, params, grads = _data(case)
    if case.impl == bench.COMPILED or case.impl in bench.COMPILED_BACKENDS:
        bench.fresh_compile_caches()
    runner = bench.make_runner(case.impl, bench.OPTIMIZERS[case.optimizer], params, grads,
                               compile_backend=os.environ.get(COMPILE_BACKEND_ENV, "inductor"))
    yield case, shapes, runner
    del runner


def run_benchmark(benchmark, bench_case) -> None:
    """Time ``bench_case``'s step with pytest-benchmark and record GB/s."""
    case, shapes, runner = bench_case
    spec = bench.OPTIMIZERS[case.optimizer]
    itemsize = torch.empty((), dtype=bench.DTYPES[case.dtype]).element_size()
    nbytes = spec.bytes_per_step(shapes.numel, itemsize)
    if case.impl == bench.COPY:
        nbytes = 2 * (nbytes // 2)  # what copy_runner moves
    benchmark.group = case.group
    benchmark.extra_info.update(list=case.list, optimizer=case.optimizer, dtype=case.dtype,
                                device=case.device, impl=case.impl, tensors=len(shapes),
                                params=shapes.numel, bytes_per_step=nbytes)
    step, steps = runner.step, 1
    if case.device == "cuda":
        for _ in range(max(1, case.warmup)):  # compile before calibrating
            runner.step()
        steps = bench.calibrate_steps(bench.CudaTimer().sample, runner.step)
        # every round is `steps` calls; the last one's synchronize puts the
        # kernels, not just their launches, inside the round's clock
        step = bench.synced_every(runner.step, steps, torch.cuda.synchronize)
        torch.cuda.synchronize()
    benchmark.extra_info["steps_per_sample"] = steps
    benchmark.pedantic(step, rounds=case.rounds, warmup_rounds=case.warmup,
                       iterations=steps)
    stats = getattr(benchmark, "stats", None)
    median = getattr(getattr(stats, "stats", None), "median", None)
    if median:
        benchmark.extra_info["gb_per_s"] = nbytes / median / 1e9
        benchmark.extra_info["params_per_s"] = shapes.numel / median


@pytest.fixture
def bench_step(benchmark, bench_case):
    """Call with no arguments to time the current case."""
    return lambda: run_benchmark(benchmark, bench_case)
