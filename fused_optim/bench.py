"""Benchmark ``optimizer.step()``: fused_optim's backends against torch.optim.

Run it as ``python -m fused_optim bench`` (or ``fused-optim bench``); see
``--help``. The building blocks (parameter lists, optimizer settings,
implementations, the interleaved timer) are public so that ``benchmarks/``
(pytest-benchmark) reuses them.

How it measures, and why:

* Every implementation in a case (fused_optim backends, torch.optim's for-loop,
  foreach and fused paths, and the memory ceiling) has its own params, grads
  and state, cloned from one seeded random draw; grads are set once and
  reused, so a step is only the optimizer's work.
* They run interleaved in one process: each round times one sample of every
  implementation, in an order shuffled per round. Drift on a shared, noisy
  machine (other tenants, frequency changes) then hits all of them alike, and
  per-round ratios cancel most of it. Only medians and paired ratios are
  reported, never single times.
* On CPU a sample is one step, timed with ``perf_counter``. On CUDA a sample
  is K back-to-back steps between two CUDA events, with a synchronize only
  before the first and after the last: a step is enqueued while the previous
  one's kernels run, as in training, instead of a synchronize per step timing
  the host's Python on an idle GPU. K is calibrated per implementation after
  the warm-up so that a sample lasts about ``CUDA_SAMPLE_S`` (at most
  ``CUDA_MAX_STEPS``); the time reported per step is the sample's over K. The
  host's wall time for enqueueing the K steps, over K, is reported beside it
  ("host ms"): where the two are close, the host bounds the step.
* Bytes are counted, not measured: per element, SGD with momentum reads p, g,
  buf and writes p, buf (5 element sizes); Adam/AdamW read p, g, m, v and write
  p, m, v (7).
* The ceiling is the same traffic with no arithmetic: on CPU the Numba kernel
  in ``kernels/numba/_pattern.py`` over tensors of the same sizes, on CUDA
  the Triton kernel in ``kernels/triton/_pattern.py`` over flat buffers. On
  CPU a plain copy is the wrong yardstick: it writes lines it never read,
  and optimizer steps reach 1.4-2x its bandwidth.
* On CUDA a copy is timed in the same rounds as a second reference: ``copy_``
  between two flat buffers that together hold the bytes one step moves
  (``copy_gbps`` counts its read and its write). "% copy" is an
  implementation's counted GB/s over the copy's, paired per round.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import importlib
import itertools
import json
import math
import os
import platform
import random
import statistics
import subprocess
import sys
import time
import traceback
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch

__all__ = [
    "BenchError", "ShapeList", "OptimizerSpec", "Runner", "CaseResult",
    "LISTS", "OPTIMIZERS", "DTYPES", "SIZES", "IMPLS",
    "shape_list", "shapes_from_json", "shapes_from_model", "make_data",
    "make_runner", "available_impls", "run_case", "run", "format_table",
    "to_json", "write_plot", "machine_info", "add_arguments", "main",
    "HostTimer", "CudaTimer", "Timings", "calibrate_steps", "interleaved",
    "synced_every", "CUDA_SAMPLE_S", "CUDA_MAX_STEPS",
]


class BenchError(Exception):
    """A user error: unknown name, unusable backend, bad file. Exit code 2."""


# ---------------------------------------------------------------- param lists


@dataclass(frozen=True)
class ShapeList:
    """A named list of parameter shapes.

    Attributes:
        name: label in reports.
        shapes: one tuple of ints per tensor, in model order.
    """

    name: str
    shapes: tuple

    @property
    def numel(self) -> int:
        """Total elements over all tensors."""
        return sum(math.prod(s) for s in self.shapes)

    def __len__(self) -> int:
        return len(self.shapes)

    def describe(self) -> str:
        """e.g. ``"161 tensors, 25.6M params"``."""
        return f"{len(self)} tensors, {_human(self.numel)} params"


def _resnet50() -> list:
    """torchvision ``resnet50()``'s parameter shapes, in ``parameters()`` order.

    Bottleneck v1.5 (stride on the 3x3 conv; strides do not change shapes):
    per block conv1 1x1, bn1, conv2 3x3, bn2, conv3 1x1, bn3, then the
    projection shortcut (1x1 conv, bn) in each stage's first block. 161
    tensors, 25,557,032 params.
    """
    shapes = [(64, 3, 7, 7), (64,), (64,)]
    inplanes = 64
    for width, blocks in ((64, 3), (128, 4), (256, 6), (512, 3)):
        out = width * 4
        for i in range(blocks):
            shapes += [(width, inplanes, 1, 1), (width,), (width,),
                       (width, width, 3, 3), (width,), (width,),
                       (out, width, 1, 1), (out,), (out,)]
            if i == 0:
                shapes += [(out, inplanes, 1, 1), (out,), (out,)]
            inplanes = out
    shapes += [(1000, 2048), (1000,)]
    return shapes


def _gpt2_small() -> list:
    """Hugging Face ``GPT2LMHeadModel`` (gpt2, 124M) parameter shapes.

    wte, wpe, 12 blocks of (ln_1, attn.c_attn, attn.c_proj, ln_2, mlp.c_fc,
    mlp.c_proj; Conv1D weights are [in, out]), ln_f. lm_head is tied to wte
    and not a separate parameter. 148 tensors, 124,439,808 params.
    """
    d, vocab, ctx, layers = 768, 50257, 1024, 12
    shapes = [(vocab, d), (ctx, d)]
    for _ in range(layers):
        shapes += [(d,), (d,), (d, 3 * d), (3 * d,), (d, d), (d,),
                   (d,), (d,), (d, 4 * d), (4 * d,), (4 * d, d), (d,)]
    shapes += [(d,), (d,)]
    return shapes


def _many_small(count: int = 1000, lo: int = 1024, hi: int = 4096, seed: int = 0) -> list:
    """``count`` 1-D tensors of ``lo``..``hi`` elements (seeded): the
    per-tensor overhead case, where launches and bookkeeping dominate."""
    rng = random.Random(seed)
    return [(rng.randint(lo, hi),) for _ in range(count)]


def _fixed_cost() -> list:
    """161 tensors of 64 elements: resnet50's tensor count with almost no
    data, so the step time is the fixed cost per step (Python, launches)."""
    return [(64,)] * 161


def _tiny() -> list:
    """A few odd-sized tensors (4,457 params) for tests and CI smoke runs."""
    return [(64, 32), (64,), (8, 3, 3, 3), (1000,), (17,), (3, 5, 7), (2048,), (1,)]


#: Named lists: name -> (generator, shown in --help).
LISTS: dict[str, tuple[Callable[[], list], bool]] = {
    "resnet50": (_resnet50, True),
    "gpt2-small": (_gpt2_small, True),
    "many-small": (_many_small, True),
    "fixed-cost": (_fixed_cost, True),
    "tiny": (_tiny, False),
}


def shape_list(name: str) -> ShapeList:
    """A named parameter list.

    Args:
        name: a key of ``LISTS``.

    Raises:
        BenchError: unknown name.
    """
    try:
        gen, _ = LISTS[name]
    except KeyError:
        raise BenchError(f"unknown list {name!r} (known: {', '.join(_public_lists())})") from None
    return ShapeList(name, tuple(tuple(s) for s in gen()))


def _public_lists() -> list:
    return [n for n, (_, shown) in LISTS.items() if shown]


def _check_shape(s, where: str) -> tuple:
    if isinstance(s, int) and not isinstance(s, bool):
        s = [s]
    if not isinstance(s, (list, tuple)) or not all(
            isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in s):
        raise BenchError(f"{where}: a shape must be a list of non-negative ints, got {s!r}")
    return tuple(s)


def shapes_from_json(path: str | os.PathLike) -> ShapeList:
    """Read a list of shapes from a JSON file.

    Accepted: ``[[768, 768], [768], ...]`` or ``{"name": "...", "shapes":
    [...]}``; an int stands for a 1-D shape.

    Raises:
        BenchError: unreadable file or malformed content.
    """
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except OSError as err:
        raise BenchError(f"cannot read --shapes file {str(path)!r}: {err.strerror}") from None
    except json.JSONDecodeError as err:
        raise BenchError(f"--shapes file {str(path)!r} is not valid JSON: {err}") from None
    name = path.stem
    if isinstance(data, dict):
        name = str(data.get("name", name))
        data = data.get("shapes")
    if not isinstance(data, list) or not data:
        raise BenchError(f"--shapes file {str(path)!r}: expected a non-empty list of "
                         "shapes or {\"shapes\": [...]}")
    return ShapeList(name, tuple(_check_shape(s, str(path)) for s in data))


def shapes_from_model(spec: str) -> ShapeList:
    """Parameter shapes of ``module:factory()`` (an nn.Module or tensors).

    The current directory is importable, as with ``python -m``.

    Raises:
        BenchError: bad spec, import failure, or a factory that fails.
    """
    mod_name, sep, attr = spec.partition(":")
    if not sep or not mod_name or not attr:
        raise BenchError(f"--model expects module:factory, got {spec!r}")
    if os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        obj = importlib.import_module(mod_name)
    except Exception as err:  # noqa: BLE001 - any import failure is the user's
        raise BenchError(f"--model {spec}: cannot import {mod_name!r}: "
                         f"{type(err).__name__}: {err}") from None
    for part in attr.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            raise BenchError(f"--model {spec}: {mod_name!r} has no attribute {attr!r}") from None
    try:
        model = obj()
    except Exception as err:  # noqa: BLE001
        raise BenchError(f"--model {spec}: {attr}() raised {type(err).__name__}: {err}") from None
    if isinstance(model, torch.nn.Module):
        tensors = [p for p in model.parameters() if p.requires_grad]
    else:
        try:
            tensors = list(model)
        except TypeError:
            tensors = None
        if tensors is None or not all(torch.is_tensor(t) for t in tensors):
            raise BenchError(f"--model {spec}: {attr}() must return an nn.Module or "
                             f"tensors, got {type(model).__name__}")
    if not tensors:
        raise BenchError(f"--model {spec}: the model has no trainable parameters")
    return ShapeList(f"model:{spec}", tuple(tuple(t.shape) for t in tensors))


# ----------------------------------------------------------------- optimizers


@dataclass(frozen=True)
class OptimizerSpec:
    """One optimizer setting, the same for every implementation.

    Attributes:
        name: label (``sgd``, ``sgd-nesterov``, ``adam``, ``adamw``).
        cls: class name in both ``torch.optim`` and ``fused_optim``.
        kwargs: constructor arguments besides params and the path switches.
        reads: arrays read per element (the ceiling's k).
        writes: arrays written per element (the ceiling's m).
    """

    name: str
    cls: str
    kwargs: dict
    reads: int
    writes: int

    @property
    def kind(self) -> str:
        """The kernel family: ``sgd`` or ``adam``."""
        return "sgd" if self.cls == "SGD" else "adam"

    def bytes_per_step(self, numel: int, itemsize: int) -> int:
        """Counted memory traffic of one step."""
        return (self.reads + self.writes) * itemsize * numel


OPTIMIZERS: dict[str, OptimizerSpec] = {
    "sgd": OptimizerSpec("sgd", "SGD", dict(lr=0.01, momentum=0.9, weight_decay=1e-4), 3, 2),
    "sgd-nesterov": OptimizerSpec("sgd-nesterov", "SGD", dict(
        lr=0.01, momentum=0.9, weight_decay=1e-4, nesterov=True), 3, 2),
    "adam": OptimizerSpec("adam", "Adam", dict(lr=1e-3), 4, 3),
    "adamw": OptimizerSpec("adamw", "AdamW", dict(lr=1e-3, weight_decay=0.01), 4, 3),
}

DTYPES: dict[str, torch.dtype] = {"fp32": torch.float32, "bf16": torch.bfloat16,
                                  "fp16": torch.float16, "fp64": torch.float64}
#: What a plain run covers; fp16/fp64 on request.
DEFAULT_DTYPES = ("fp32", "bf16")


# -------------------------------------------------------------------- presets


@dataclass(frozen=True)
class Size:
    """Defaults of one run size.

    Attributes:
        lists: named lists.
        optimizers: optimizer names.
        warmup: untimed interleaved rounds (the first compiles and allocates).
        min_rounds, max_rounds: bounds on the timed rounds.
        target_s: timed seconds per case the round count aims at.
        budget_s: if set, wall-clock seconds for all cases: each case aims
            its timed rounds at an equal share of what is left, so a slow
            (loaded) machine gets fewer rounds rather than a longer run.
    """

    lists: tuple
    optimizers: tuple
    warmup: int
    min_rounds: int
    max_rounds: int
    target_s: float
    budget_s: float | None = None


SIZES: dict[str, Size] = {
    "full": Size(("resnet50", "gpt2-small", "many-small", "fixed-cost"), tuple(OPTIMIZERS),
                 3, 10, 100, 15.0),
    # On the 2-core dev VM with warm Numba caches: 24 s wall when idle; 1-5
    # minutes while other tenants kept the load at 3-6 (torch's thread pool
    # stalls, see _warn_load), hence the budget.
    "quick": Size(("resnet50", "many-small"), ("sgd", "adamw"), 1, 3, 15, 1.5, 40.0),
    "tiny": Size(("tiny",), ("sgd", "adamw"), 1, 3, 3, 0.0),
}


# ------------------------------------------------------------ implementations

#: Implementation ids in report order: fused_optim backends, torch.optim's
#: three paths, the ceiling. ``torch`` is fused_optim's pure-torch reference.
BACKEND_IMPLS = ("numba", "triton", "torch")
#: torch.optim's default step under ``torch.compile`` (what HeavyBall and
#: optimi call the fastest compiled path); asking for it also times each
#: fused_optim backend's step under ``torch.compile`` ("<backend>-compiled").
COMPILED = "compiled"
BASELINE_IMPLS = ("for-loop", "foreach", "fused", COMPILED)
#: Baselines timed when none are named: compiling costs seconds per case.
DEFAULT_BASELINES = ("for-loop", "foreach", "fused")
COMPILED_BACKENDS = tuple(f"{b}-compiled" for b in BACKEND_IMPLS)
CEILING = "ceiling"
#: ``copy_`` of the bytes one step moves; timed on CUDA only (see the module
#: docstring for why not on CPU).
COPY = "copy"
IMPLS = BACKEND_IMPLS + COMPILED_BACKENDS + BASELINE_IMPLS + (CEILING, COPY)
#: The implementation the paired ratio divides by.
REFERENCE = "fused"

_LABELS = {"numba": "fused_optim numba", "triton": "fused_optim triton",
           "torch": "fused_optim torch", "for-loop": "torch for-loop",
           "foreach": "torch foreach", "fused": "torch fused",
           COMPILED: "torch compiled", CEILING: "ceiling", COPY: "copy",
           **{f"{b}-compiled": f"fused_optim {b} compiled" for b in BACKEND_IMPLS}}


@dataclass
class Runner:
    """One implementation, ready to step.

    Attributes:
        impl: implementation id (see ``IMPLS``).
        step: runs one optimizer step (or one ceiling pass).
        keep: whatever must stay alive while ``step`` is used.
    """

    impl: str
    step: Callable[[], object]
    keep: object = None
    #: compiled implementations: seconds of the first call (compilation
    #: and one step), made when the runner is built
    compile_s: float | None = None


def make_data(shapes: ShapeList, dtype: torch.dtype, device, seed: int = 0):
    """Seeded random params and grads of ``shapes``.

    Returns:
        (params, grads): two lists of tensors.
    """
    gen = torch.Generator().manual_seed(seed)
    params, grads = [], []
    for s in shapes.shapes:
        # Drawn in float32 on the CPU from one generator, so every dtype and
        # device of a list starts from the same values.
        params.append(torch.randn(s, generator=gen).to(device=device, dtype=dtype))
        grads.append(torch.randn(s, generator=gen).to(device=device, dtype=dtype))
    return params, grads


def _leaves(params, grads):
    out = []
    for p, g in zip(params, grads):
        q = p.detach().clone().requires_grad_(True)
        q.grad = g.detach().clone()
        out.append(q)
    return out


def make_runner(impl: str, spec: OptimizerSpec, params, grads) -> Runner:
    """An implementation stepping private copies of ``params`` and ``grads``.

    Args:
        impl: an id of ``IMPLS``.
        spec: optimizer setting.
        params, grads: the case's data (cloned, never modified).
    """
    if impl == CEILING:
        return _ceiling_runner(spec, params, grads)
    if impl == COPY:
        numel = sum(p.numel() for p in params)
        return copy_runner(spec.bytes_per_step(numel, params[0].element_size()),
                           params[0].device)
    leaves = _leaves(params, grads)
    base = impl.removesuffix("-compiled")
    if base in BACKEND_IMPLS:
        import fused_optim
        opt = getattr(fused_optim, spec.cls)(leaves, backend=base, **spec.kwargs)
    elif impl in BASELINE_IMPLS:
        switch = {"for-loop": dict(foreach=False), "foreach": dict(foreach=True),
                  "fused": dict(fused=True), COMPILED: {}}[impl]
        opt = getattr(torch.optim, spec.cls)(leaves, **switch, **spec.kwargs)
    else:
        raise BenchError(f"unknown implementation {impl!r} (known: {', '.join(IMPLS)})")
    if impl == COMPILED or impl in COMPILED_BACKENDS:
        return _compiled_runner(impl, opt, leaves)
    return Runner(impl, opt.step, (opt, leaves))


def fresh_compile_caches() -> None:
    """Forget dynamo's compiled frames before a case's compiled runners are built.

    Every optimizer of a class shares ``step``'s code object, and dynamo
    keeps one guarded entry per optimizer on it, up to its recompile limit
    (8), after which it silently runs the frame eagerly: without this, the
    ninth case of a class would time an eager step as "compiled".
    """
    torch._dynamo.reset()


def _compiled_runner(impl: str, opt, keep) -> Runner:
    # The pattern of torch's compiled-optimizer tutorial: the step inside a
    # compiled function, with the optimizer's own defaults.
    @torch.compile
    def step():
        opt.step()

    t0 = time.perf_counter()
    step()
    return Runner(impl, step, (opt, keep), compile_s=time.perf_counter() - t0)


def _ceiling_runner(spec: OptimizerSpec, params, grads) -> Runner:
    k, m = spec.reads, spec.writes
    itemsize = params[0].element_size()
    device = params[0].device
    # Real data in every array: an untouched calloc'd array maps the shared
    # zero page and its reads would never reach memory.
    if device.type == "cpu":
        from .kernels.numba import _pattern
        arrays = [[p.clone() for _ in range(k - 1)] + [g.clone()] for p, g in zip(params, grads)]
        table = _pattern.make_table([[a.data_ptr() for a in row] for row in arrays],
                                    [p.numel() for p in params])
        bounds = _pattern.split(int(table[:, _pattern.NUMEL].sum()))

        def step():
            _pattern.pattern(table, bounds, itemsize, k, m)

        return Runner(CEILING, step, (arrays, table, bounds))
    if device.type == "cuda":
        flat_p = torch.cat([p.reshape(-1) for p in params])
        flat_g = torch.cat([g.reshape(-1) for g in grads])
        bufs = [flat_p.clone() for _ in range(k - 1)] + [flat_g]
        del flat_p
        try:
            from .kernels.triton import _pattern as triton_pattern
        except ImportError as err:
            raise BenchError(f"the CUDA ceiling needs triton ({err})") from None
        return Runner(CEILING, triton_pattern.launcher(bufs, itemsize), bufs)
    raise BenchError(f"no ceiling kernel for {device.type} tensors")


def copy_runner(nbytes: int, device) -> Runner:
    """``dst.copy_(src)`` between two flat byte buffers of ``nbytes // 2``
    each, so that one call reads and writes ``nbytes`` in all."""
    n = nbytes // 2
    # Filled, not empty: every page is real memory before the first timing.
    src = torch.full((n,), 0x5A, dtype=torch.uint8, device=device)
    dst = torch.zeros(n, dtype=torch.uint8, device=device)

    def step():
        dst.copy_(src)

    return Runner(COPY, step, (src, dst))


def _backend_problem(impl: str, spec: OptimizerSpec, dtype: torch.dtype,
                     device: torch.device) -> str | None:
    """Why a fused_optim backend cannot run this case, or None."""
    from . import _backend
    if impl == "numba" and device.type != "cpu":
        return "the numba backend runs on CPU tensors only"
    if impl == "triton" and device.type != "cuda":
        if not torch.cuda.is_available():
            return "the triton backend needs a CUDA GPU and torch.cuda.is_available() is False"
        return "the triton backend runs on CUDA tensors only"
    try:
        mod = _backend.module(impl)
    except RuntimeError as err:
        return str(err)
    if not callable(getattr(mod, spec.kind, None)):
        return f"the {impl} backend has no {spec.kind} kernel yet"
    dname = str(dtype).removeprefix("torch.")
    supported = getattr(mod, "SUPPORTED_DTYPES", None)
    if supported is not None and dname not in supported:
        return f"the {impl} backend does not support {dname}"
    return None


def _baseline_problem(impl: str, spec: OptimizerSpec, dtype: torch.dtype,
                      device: torch.device) -> str | None:
    if impl == "fused":
        try:
            from torch.optim.optimizer import _get_fused_kernels_supported_devices
            if device.type not in _get_fused_kernels_supported_devices():
                return f"torch has no fused {spec.cls} for {device.type}"
        except ImportError:
            pass
    return None


def _ceiling_problem(device: torch.device) -> str | None:
    if device.type == "cpu":
        return None
    if device.type == "cuda":
        try:
            import triton  # noqa: F401
        except ImportError:
            return "the CUDA ceiling kernel needs triton"
        return None
    return f"no ceiling kernel for {device.type} tensors"


def available_impls(spec: OptimizerSpec, dtype: torch.dtype, device,
                    wanted: Sequence[str]) -> tuple[list, dict]:
    """Split ``wanted`` implementations into runnable ones and the others.

    Returns:
        (runnable ids, {id: reason} for the others).
    """
    device = torch.device(device)
    ok, skipped = [], {}
    for impl in wanted:
        if impl.removesuffix("-compiled") in BACKEND_IMPLS:
            why = _backend_problem(impl.removesuffix("-compiled"), spec, dtype, device)
        elif impl in BASELINE_IMPLS:
            why = _baseline_problem(impl, spec, dtype, device)
        elif impl == CEILING:
            why = _ceiling_problem(device)
        elif impl == COPY:
            why = None
        else:
            why = f"unknown implementation {impl!r}"
        if why is None:
            ok.append(impl)
        else:
            skipped[impl] = why
    return ok, skipped


# ------------------------------------------------------------------ measuring


@dataclass
class CaseResult:
    """Timings of one case (list x optimizer x dtype x device).

    Attributes:
        list: list name. tensors, params: its size.
        optimizer, dtype, device: the case.
        bytes_per_step: counted traffic of one step.
        rounds, warmup: timed and untimed rounds.
        times: per implementation, one step time (s) per timed round; index
            ``r`` of every list comes from the same round. On CUDA each is
            a sample's time over its steps.
        skipped: implementations not run, with the reason.
        failed: implementations that raised, with the error.
        compile_s: compiled implementations' first call (s).
        host_times: CUDA only: per implementation and round, the host's
            wall time for enqueueing a sample's steps, over the steps.
        steps_per_sample: per implementation, steps per timed sample (1 on
            CPU, calibrated on CUDA).
        timing: ``"perf_counter"`` (one step per sample) or
            ``"cuda-events"`` (``steps_per_sample`` steps per sample).
    """

    list: str
    tensors: int
    params: int
    optimizer: str
    dtype: str
    device: str
    bytes_per_step: int
    rounds: int
    warmup: int
    times: dict = field(default_factory=dict)
    skipped: dict = field(default_factory=dict)
    failed: dict = field(default_factory=dict)
    compile_s: dict = field(default_factory=dict)
    host_times: dict = field(default_factory=dict)
    steps_per_sample: dict = field(default_factory=dict)
    timing: str = "perf_counter"

    @property
    def copy_bytes(self) -> int:
        """Bytes one copy reference call reads and writes (see ``copy_runner``)."""
        return 2 * (self.bytes_per_step // 2)

    def median(self, impl: str) -> float:
        """Median step time of ``impl`` in seconds."""
        return statistics.median(self.times[impl])

    def paired(self, impl: str, ref: str) -> list:
        """Per-round time ratios ``impl / ref``."""
        return [a / b for a, b in zip(self.times[impl], self.times[ref]) if b > 0]

    def copy_gbps(self) -> float | None:
        """The copy reference's bandwidth (read + write) from its median, or
        None when no copy was timed."""
        if COPY not in self.times:
            return None
        med = self.median(COPY)
        return self.copy_bytes / med / 1e9 if med > 0 else None

    def stats(self, impl: str) -> dict:
        """All reported numbers of one implementation."""
        t = np.asarray(self.times[impl])
        med = float(np.median(t))
        nbytes = self.copy_bytes if impl == COPY else self.bytes_per_step
        host = self.host_times.get(impl)
        out = {
            "impl": impl,
            "label": _LABELS.get(impl, impl),
            "median_s": med,
            "p25_s": float(np.percentile(t, 25)),
            "p75_s": float(np.percentile(t, 75)),
            "min_s": float(t.min()),
            "params_per_s": self.params / med if med > 0 and impl != COPY else None,
            "gb_per_s": nbytes / med / 1e9 if med > 0 else None,
            "pct_ceiling": None,
            "pct_copy": None,
            "ratio_vs_fused": None,
            "ratio_vs_fused_p25": None,
            "ratio_vs_fused_p75": None,
            "steps_per_sample": self.steps_per_sample.get(impl, 1),
            "host_median_s": statistics.median(host) if host else None,
            "host_times_s": [float(x) for x in host] if host else None,
            "times_s": [float(x) for x in t],
        }
        if CEILING in self.times:
            # ceiling time / impl time, paired per round: the share of the
            # attainable bandwidth this implementation reached.
            out["pct_ceiling"] = 100.0 * statistics.median(self.paired(CEILING, impl))
        if COPY in self.times and self.copy_bytes > 0:
            # (nbytes / impl time) / (copy bytes / copy time), paired per round
            scale = nbytes / self.copy_bytes
            out["pct_copy"] = 100.0 * scale * statistics.median(self.paired(COPY, impl))
        if REFERENCE in self.times:
            r = self.paired(impl, REFERENCE)
            out["ratio_vs_fused"] = statistics.median(r)
            out["ratio_vs_fused_p25"] = float(np.percentile(r, 25))
            out["ratio_vs_fused_p75"] = float(np.percentile(r, 75))
        return out

    def to_dict(self) -> dict:
        """JSON-ready summary with every implementation's numbers."""
        d = {k: v for k, v in dataclasses.asdict(self).items()
             if k not in ("times", "host_times")}
        d["copy_bytes"] = self.copy_bytes if COPY in self.times else None
        d["copy_gbps"] = self.copy_gbps()
        d["results"] = [self.stats(i) for i in _ordered(self.times)]
        return d


def _ordered(impls) -> list:
    return sorted(impls, key=lambda i: IMPLS.index(i) if i in IMPLS else len(IMPLS))


#: CUDA: the time one timed sample of K steps aims at. Long enough that the
#: synchronize and the two events at its ends, and the idle GPU while the
#: host enqueues the first step, are a small share of it.
CUDA_SAMPLE_S = 5e-3
#: CUDA: the most steps in one sample, for steps of a few microseconds.
CUDA_MAX_STEPS = 200


class HostTimer:
    """CPU: ``perf_counter`` around the calls; the host time is the time."""

    #: whether samples of more than one step are meaningful (see CudaTimer)
    batched = False

    def __init__(self, clock: Callable[[], float] = time.perf_counter):
        self.clock = clock

    def sample(self, fn, steps: int = 1) -> tuple[float, float | None]:
        """Run ``fn`` ``steps`` times; (seconds per call, None)."""
        t0 = self.clock()
        for _ in range(steps):
            fn()
        return (self.clock() - t0) / steps, None


class CudaTimer:
    """CUDA: ``steps`` back-to-back calls between two events.

    Synchronizes before the first call (the previous sample's work is done)
    and waits for the end event after the last, never in between. The
    ``event``, ``synchronize`` and ``clock`` hooks default to torch.cuda's
    and ``perf_counter``; tests pass fakes.
    """

    batched = True

    def __init__(self, event: Callable[[], object] | None = None,
                 synchronize: Callable[[], None] | None = None,
                 clock: Callable[[], float] = time.perf_counter):
        if event is None:
            def event():
                return torch.cuda.Event(enable_timing=True)
        self.start, self.end = event(), event()
        self.synchronize = synchronize or torch.cuda.synchronize
        self.clock = clock

    def sample(self, fn, steps: int = 1) -> tuple[float, float]:
        """(device seconds per call, host seconds per call) of ``steps`` calls.

        The device time is between the events; the host time is the wall
        time of the calls themselves, read before waiting for the GPU. While
        the GPU is behind, the host runs ahead until the launch queue is
        full, so host time can exceed the host's own work only when the
        step is device-bound.
        """
        self.synchronize()
        self.start.record()
        h0 = self.clock()
        for _ in range(steps):
            fn()
        h1 = self.clock()
        self.end.record()
        self.end.synchronize()
        return self.start.elapsed_time(self.end) / 1e3 / steps, (h1 - h0) / steps


def make_timer(device) -> HostTimer | CudaTimer:
    """The timer for tensors on ``device``."""
    return CudaTimer() if torch.device(device).type == "cuda" else HostTimer()


def calibrate_steps(sample: Callable, fn, target_s: float = CUDA_SAMPLE_S,
                    max_steps: int = CUDA_MAX_STEPS, tries: int = 3) -> int:
    """Steps per sample so that one sample of ``fn`` lasts about ``target_s``.

    Starts from one step and rescales from each measured sample's time per
    step, at most ``tries`` samples: a single step includes the idle GPU
    while its first launch is enqueued, so its time per step overestimates
    that of back-to-back steps. Call it after warming up (a first call that
    compiles would give 1).

    Args:
        sample: ``sample(fn, steps) -> (seconds per step, ...)``, e.g. a
            timer's ``sample``.
        fn: the step.
        target_s: seconds one sample should last.
        max_steps: upper bound on the result.
    """
    steps = 1
    for _ in range(tries):
        per = sample(fn, steps)[0]
        want = max_steps if per <= 0 else math.ceil(target_s / per)
        want = max(1, min(max_steps, want))
        if want == steps:
            break
        steps = want
    return steps


def synced_every(fn, steps: int, synchronize: Callable[[], None]):
    """``fn``, followed by ``synchronize()`` on every ``steps``-th call: for
    timers that read the clock around a fixed number of calls
    (pytest-benchmark's ``iterations``) and must not see a queued GPU."""
    count = 0

    def call():
        nonlocal count
        fn()
        count += 1
        if count % steps == 0:
            synchronize()

    return call


@dataclass
class Timings:
    """What ``interleaved`` measured.

    Attributes:
        times: {impl: [seconds per step, one per timed round]}.
        host: {impl: [host seconds per step, one per timed round]}; empty
            unless the timer is batched (CUDA).
        steps: {impl: steps per sample}.
    """

    times: dict
    host: dict
    steps: dict


def interleaved(runners: Sequence[Runner], rounds: int | None, warmup: int, *,
                device="cpu", seed: int = 0, min_rounds: int = 5,
                max_rounds: int = 100, target_s: float = 10.0,
                progress: Callable[[str], None] | None = None,
                failed: dict | None = None, timer=None, steps: int | None = None,
                sample_s: float = CUDA_SAMPLE_S,
                max_steps: int = CUDA_MAX_STEPS) -> Timings:
    """Time ``runners`` round-robin, one sample each per round, order shuffled.

    Args:
        runners: the implementations.
        rounds: timed rounds; None runs rounds until ``target_s`` seconds
            have passed, within ``[min_rounds, max_rounds]``.
        warmup: untimed rounds of one step each first (compilation, state
            allocation, caches).
        device: where the tensors live; picks the timer unless ``timer``.
        seed: seeds the per-round order.
        progress: called with a short status text now and then.
        failed: if given, an implementation whose step raises is dropped
            (with its samples, which would no longer pair) and its error is
            stored here as ``{impl: message}``; else the exception propagates.
        timer: a ``HostTimer`` or ``CudaTimer`` (or a fake with their
            ``batched`` and ``sample``). A batched timer's samples are
            several steps: ``steps`` if given, else calibrated per
            implementation after the warm-up (``calibrate_steps`` with
            ``sample_s`` and ``max_steps``). Others time one step.

    Returns:
        the times per step, host times per step and steps per sample.
    """
    timer = timer or make_timer(torch.device(device))
    rng = random.Random(seed)
    order = list(runners)
    times = {r.impl: [] for r in runners}
    host = {r.impl: [] for r in runners} if timer.batched else {}
    counts = {r.impl: 1 for r in runners}

    def drop(r, err):
        if failed is None:
            raise err
        _report_failure(failed, r.impl, err)
        order.remove(r)
        for d in (times, host, counts):
            d.pop(r.impl, None)

    def attempt(r, k):
        try:
            return timer.sample(r.step, k)
        except Exception as err:  # noqa: BLE001 - reported, the others go on
            drop(r, err)
            return None

    for w in range(warmup):
        if progress:
            progress(f"warm-up {w + 1}/{warmup}")
        rng.shuffle(order)
        for r in list(order):
            attempt(r, 1)
    if timer.batched:
        if progress:
            progress("calibrating steps per sample")
        for r in list(order):
            if steps is not None:
                counts[r.impl] = steps
                continue
            try:
                counts[r.impl] = calibrate_steps(timer.sample, r.step, sample_s, max_steps)
            except Exception as err:  # noqa: BLE001
                drop(r, err)
    # Without a fixed count, keep going until target_s has passed: an estimate
    # from the warm-up would include compilation and first-touch page faults.
    limit = max_rounds if rounds is None else rounds
    gc_was = gc.isenabled()
    gc.collect()
    gc.disable()  # a collection inside one timed sample would skew that sample
    start = time.perf_counter()
    try:
        for i in range(limit):
            if (rounds is None and i >= min_rounds
                    and time.perf_counter() - start >= target_s):
                break
            if progress:
                progress(f"round {i + 1}" + (f"/{rounds}" if rounds else ""))
            rng.shuffle(order)
            for r in list(order):
                got = attempt(r, counts[r.impl])
                if got is not None:
                    times[r.impl].append(got[0])
                    if timer.batched:
                        host[r.impl].append(got[1])
    finally:
        if gc_was:
            gc.enable()
    return Timings(times, host, counts)


def _report_failure(failed: dict, impl: str, err: BaseException) -> None:
    """Record ``err`` and show its traceback: a failing implementation is a
    bug to fix, not a number to report."""
    failed[impl] = f"{type(err).__name__}: {err}".splitlines()[0]
    print(f"\n{impl} failed:", file=sys.stderr)
    traceback.print_exception(err, file=sys.stderr)


def _fmt_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def _human(n: float) -> str:
    for div, unit in ((1e9, "G"), (1e6, "M"), (1e3, "K")):
        if n >= div:
            return f"{n / div:.1f}{unit}"
    return str(int(n))


def _mem_available(device: torch.device) -> int | None:
    if device.type == "cuda":
        try:
            return torch.cuda.mem_get_info(device)[0]
        except Exception:  # noqa: BLE001
            return None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _case_bytes(spec: OptimizerSpec, impls, numel: int, itemsize: int) -> int:
    """Resident bytes of a case: the draw, every implementation's tensors (the
    copy's two buffers hold one step's bytes), and foreach's whole-list
    temporaries (about two per element)."""
    states = spec.writes - 1
    per = {CEILING: spec.reads, COPY: spec.reads + spec.writes}
    total = 2  # the seeded draw, kept until the runners exist
    for i in impls:
        total += per.get(i, 2 + states) + (2 if i == "foreach" else 0)
    return total * numel * itemsize


def run_case(shapes: ShapeList, spec: OptimizerSpec, dtype_name: str, device,
             impls: Sequence[str], *, rounds: int | None = None, warmup: int = 3,
             seed: int = 0, min_rounds: int = 5, max_rounds: int = 100,
             target_s: float = 10.0, skipped: dict | None = None,
             progress: Callable[[str], None] | None = None, timer=None,
             steps: int | None = None, sample_s: float = CUDA_SAMPLE_S,
             max_steps: int = CUDA_MAX_STEPS) -> CaseResult:
    """Build every implementation for one case and time them interleaved.

    ``timer``, ``steps``, ``sample_s`` and ``max_steps`` go to
    ``interleaved`` (by default the device's timer).

    Raises:
        BenchError: the case would not fit in memory.
    """
    device = torch.device(device)
    dtype = DTYPES[dtype_name]
    itemsize = torch.empty((), dtype=dtype).element_size()
    need = _case_bytes(spec, impls, shapes.numel, itemsize)
    avail = _mem_available(device)
    if avail is not None and need > 0.9 * avail:
        raise BenchError(
            f"{shapes.name} {spec.name} {dtype_name} needs about {_fmt_bytes(need)} "
            f"on {device.type} but {_fmt_bytes(avail)} is available; pick fewer "
            "--lists/--backends or a smaller dtype")
    if progress:
        progress("allocating")
    params, grads = make_data(shapes, dtype, device, seed)
    failed = {}
    runners = []
    if any(i == COMPILED or i in COMPILED_BACKENDS for i in impls):
        fresh_compile_caches()
    for impl in impls:
        try:
            runners.append(make_runner(impl, spec, params, grads))
        except Exception as err:  # noqa: BLE001 - reported, the others go on
            _report_failure(failed, impl, err)
    del params, grads
    compile_s = {r.impl: r.compile_s for r in runners if r.compile_s is not None}
    timer = timer or make_timer(device)
    timed = interleaved(runners, rounds, warmup, device=device, seed=seed,
                        min_rounds=min_rounds, max_rounds=max_rounds,
                        target_s=target_s, progress=progress, failed=failed,
                        timer=timer, steps=steps, sample_s=sample_s, max_steps=max_steps)
    del runners
    gc.collect()
    times = timed.times
    return CaseResult(
        list=shapes.name, tensors=len(shapes), params=shapes.numel,
        optimizer=spec.name, dtype=dtype_name, device=str(device),
        bytes_per_step=spec.bytes_per_step(shapes.numel, itemsize),
        rounds=max((len(t) for t in times.values()), default=0), warmup=warmup,
        times=times, skipped=dict(skipped or {}), failed=failed, compile_s=compile_s,
        host_times=timed.host, steps_per_sample=timed.steps,
        timing="cuda-events" if timer.batched else "perf_counter")


# ------------------------------------------------------------------ reporting


def format_table(results: Sequence[CaseResult]) -> str:
    """The end-of-run table: one row per (case, implementation).

    "host ms" (CUDA) and "% copy" (where a copy was timed) appear only when
    some case has them.
    """
    show_device = len({r.device for r in results}) > 1
    show_host = any(r.host_times for r in results)
    show_copy = any(COPY in r.times for r in results)
    numbers = (["median ms"] + (["host ms"] if show_host else [])
               + ["Mparam/s", "GB/s", "% ceil"] + (["% copy"] if show_copy else [])
               + ["vs fused"])
    head = ["list", "opt", "dtype"] + (["device"] if show_device else []) + ["impl"] + numbers
    rows = []
    for res in results:
        for impl in _ordered(res.times):
            s = res.stats(impl)
            cells = [f"{s['median_s'] * 1e3:.3f}"]
            if show_host:
                h = s["host_median_s"]
                cells.append(f"{h * 1e3:.3f}" if h is not None else "-")
            cells += [
                f"{s['params_per_s'] / 1e6:.0f}" if s["params_per_s"] else "-",
                f"{s['gb_per_s']:.1f}" if s["gb_per_s"] else "-",
                f"{s['pct_ceiling']:.0f}" if s["pct_ceiling"] is not None else "-",
            ]
            if show_copy:
                cells.append(f"{s['pct_copy']:.0f}" if s["pct_copy"] is not None else "-")
            cells.append(f"{s['ratio_vs_fused']:.2f}x" if s["ratio_vs_fused"] is not None
                         else "-")
            rows.append([res.list, res.optimizer, res.dtype]
                        + ([res.device] if show_device else [])
                        + [_LABELS.get(impl, impl)] + cells)
    numeric = set(range(len(head) - len(numbers), len(head)))
    widths = [max(len(str(x)) for x in col) for col in zip(head, *rows)]

    def line(cells):
        return "  ".join(str(c).rjust(w) if j in numeric else str(c).ljust(w)
                         for j, (c, w) in enumerate(zip(cells, widths))).rstrip()

    out = [line(head), line(["-" * w for w in widths])]
    prev = None
    for row, res_key in zip(rows, _row_cases(results)):
        if prev is not None and res_key != prev:
            out.append("")
        prev = res_key
        out.append(line(row))
    notes = _notes(results)
    return "\n".join(out + ([""] + notes if notes else []))


def _row_cases(results):
    for res in results:
        for _ in res.times:
            yield (res.list, res.optimizer, res.dtype, res.device)


def _notes(results) -> list:
    notes = []
    sizes = {}
    for r in results:
        sizes[r.list] = (r.tensors, r.params)
    for name, (t, p) in sizes.items():
        notes.append(f"{name}: {t} tensors, {p:,} params")
    rounds = sorted({r.rounds for r in results})
    notes.append("median of " + "/".join(map(str, rounds)) + " interleaved rounds; "
                 "% ceil" + (", % copy" if any(COPY in r.times for r in results) else "")
                 + " and vs fused are medians of per-round ratios "
                 "(vs fused < 1 is faster than torch fused)")
    ks = [k for r in results if r.timing == "cuda-events" for k in r.steps_per_sample.values()]
    if ks:
        notes.append(f"cuda: each sample is {min(ks)}-{max(ks)} back-to-back steps between "
                     "two CUDA events (synchronized only between samples); ms is per step; "
                     "host ms is the host's wall time enqueueing them, per step "
                     "(where ms is close to host ms, the host bounds the step)")
    for r in results:
        gbps = r.copy_gbps()
        if gbps is not None:
            notes.append(f"copy reference, {r.list} {r.optimizer} {r.dtype}"
                         + (f" {r.device}" if r.device != "cpu" else "")
                         + f": {gbps:.1f} GB/s ({_fmt_bytes(r.copy_bytes // 2)} copied, "
                         "read + write counted)")
    for r in results:
        if r.compile_s:
            notes.append(f"first call (compile + one step), {r.list} {r.optimizer} {r.dtype}: "
                         + ", ".join(f"{_LABELS.get(i, i)} {s:.1f} s"
                                     for i, s in sorted(r.compile_s.items(),
                                                        key=lambda kv: IMPLS.index(kv[0]))))
    seen = set()
    for r in results:
        for impl, why in r.skipped.items():
            if (impl, why) not in seen:
                seen.add((impl, why))
                notes.append(f"skipped {impl}: {why}")
    for r in results:
        for impl, err in r.failed.items():
            notes.append(f"FAILED {impl} on {r.list} {r.optimizer} {r.dtype}: {err}")
    return notes


def machine_info(device_types: Sequence[str] = ("cpu",)) -> dict:
    """Description of this machine and the software versions."""
    import numba

    import fused_optim
    info = {
        "cpu_model": _cpu_model(),
        "cores": os.cpu_count(),
        "usable_cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "l3_cache": _read_first("/sys/devices/system/cpu/cpu0/cache/index3/size"),
        "memory_total_bytes": _meminfo("MemTotal"),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "numba": numba.__version__,
        "numpy": np.__version__,
        "fused_optim": getattr(fused_optim, "__version__", None),
        "git_commit": _git_commit(),
        "torch_threads": torch.get_num_threads(),
        "numba_threads": numba.get_num_threads(),
        "numba_threading_layer": _numba_layer(),
        "load_average": _loadavg(),
        "env": {k: os.environ[k] for k in _THREAD_ENV if k in os.environ},
    }
    try:
        import triton
        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = None
    if "cuda" in device_types and torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
        info["cuda"] = torch.version.cuda
    return info


#: Environment variables that change how the thread pools behave.
_THREAD_ENV = ("OMP_NUM_THREADS", "OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "KMP_BLOCKTIME",
               "MKL_NUM_THREADS", "NUMBA_NUM_THREADS", "NUMBA_THREADING_LAYER",
               "FUSED_OPTIM_BACKEND")


def _loadavg() -> list | None:
    """1, 5 and 15 minute load averages: above the core count, other
    processes competed for the cores and timings are noisier."""
    text = _read_first("/proc/loadavg")
    return [float(x) for x in text.split()[:3]] if text else None


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _read_first(path: str) -> str | None:
    try:
        return Path(path).read_text().strip()
    except OSError:
        return None


def _meminfo(key: str) -> int | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent,
                             capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return None
    if out.returncode != 0:
        return None
    return out.stdout.strip() or None


def _numba_layer() -> str | None:
    import numba
    try:
        return numba.threading_layer()
    except ValueError:  # no parallel function has run yet
        return None


def to_json(results: Sequence[CaseResult], config: dict) -> dict:
    """Everything measured, plus the machine and the run's settings.

    Schema 2 (1 had no host or copy fields). Per case: ``timing``
    (``perf_counter``: one step per sample; ``cuda-events``: K steps per
    sample, times per step), ``steps_per_sample`` ({impl: K}),
    ``copy_bytes`` and ``copy_gbps`` (the copy reference: bytes one call
    reads and writes, and that over its median time; null where no copy
    ran). Per result, besides the times: ``host_median_s`` and
    ``host_times_s`` (CUDA: host wall time enqueueing a sample's steps, per
    step; null on CPU), ``pct_copy`` (counted GB/s as a percentage of the
    copy's, median of per-round ratios) and ``steps_per_sample``.
    """
    devices = sorted({torch.device(r.device).type for r in results}) or ["cpu"]
    return {
        "schema": 2,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "machine": machine_info(devices),
        "config": config,
        "byte_counts": {n: {"reads": s.reads, "writes": s.writes}
                        for n, s in OPTIMIZERS.items()},
        "cases": [r.to_dict() for r in results],
    }


def _check_matplotlib():
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise BenchError("--plot needs matplotlib, which is not installed "
                         "(pip install matplotlib)") from None
    return plt


def write_plot(results: Sequence[CaseResult], path: str | os.PathLike) -> None:
    """Bar chart: GB/s per implementation and case, ceiling as a line.

    Raises:
        BenchError: matplotlib is missing.
    """
    plt = _check_matplotlib()
    impls = _ordered({i for r in results for i in r.times if i not in (CEILING, COPY)})
    labels = [f"{r.list}\n{r.optimizer} {r.dtype}" + (f"\n{r.device}" if r.device != "cpu" else "")
              for r in results]
    fig, ax = plt.subplots(figsize=(max(6.0, 1.4 * len(results) * max(1, len(impls)) / 3), 4.5))
    width = 0.8 / max(1, len(impls))
    for j, impl in enumerate(impls):
        xs, ys = [], []
        for i, r in enumerate(results):
            if impl in r.times:
                xs.append(i + (j - (len(impls) - 1) / 2) * width)
                ys.append(r.stats(impl)["gb_per_s"] or 0.0)
        ax.bar(xs, ys, width, label=_LABELS.get(impl, impl))
    for i, r in enumerate(results):
        if CEILING in r.times:
            g = r.stats(CEILING)["gb_per_s"] or 0.0
            ax.hlines(g, i - 0.45, i + 0.45, colors="black", linestyles="dashed",
                      label="ceiling" if i == 0 else None)
        if COPY in r.times:
            ax.hlines(r.copy_gbps() or 0.0, i - 0.45, i + 0.45, colors="gray",
                      linestyles="dotted", label="copy" if i == 0 else None)
    ax.set_xticks(range(len(results)))
    ax.set_xticklabels(labels, fontsize=8)
    ax.set_ylabel("GB/s (counted bytes / median step time)")
    ax.set_title("optimizer.step() throughput")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ------------------------------------------------------------------------ CLI


def _split_names(text: str | None, known: Sequence[str], what: str,
                 hidden: Sequence[str] = ()) -> list | None:
    if text is None:
        return None
    names = [t.strip() for t in text.split(",") if t.strip()]
    if names == ["all"]:
        return list(known)
    for n in names:
        if n not in known and n not in hidden:
            raise BenchError(f"unknown {what} {n!r} (known: {', '.join(known)})")
    if not names:
        raise BenchError(f"no {what} given")
    return list(dict.fromkeys(names))


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Add the ``bench`` options to a parser."""
    sel = p.add_argument_group("what to run")
    sel.add_argument("--lists", metavar="NAMES",
                     help="comma-separated parameter lists: " + ", ".join(_public_lists())
                     + " or all (default: all; --quick: resnet50,many-small)")
    sel.add_argument("--shapes", metavar="FILE.json", action="append", default=[],
                     help="a list of shapes from JSON ([[768, 768], [768], ...] or "
                     "{\"name\": ..., \"shapes\": [...]}); repeatable")
    sel.add_argument("--model", metavar="MODULE:FACTORY", action="append", default=[],
                     help="benchmark the parameters of MODULE.FACTORY() (an nn.Module); "
                     "repeatable")
    sel.add_argument("--optimizers", metavar="NAMES",
                     help="comma-separated: " + ", ".join(OPTIMIZERS)
                     + " or all (default: all; --quick: sgd,adamw)")
    sel.add_argument("--dtypes", metavar="NAMES",
                     help="comma-separated: " + ", ".join(DTYPES) + " (default: fp32,bf16)")
    sel.add_argument("--backends", metavar="NAMES",
                     help="fused_optim backends: numba, triton, torch (default: those "
                     "that can run here, torch only with --all-backends); asking for "
                     "one that cannot run is an error")
    sel.add_argument("--all-backends", action="store_true",
                     help="also time fused_optim's slow pure-torch reference backend")
    sel.add_argument("--baselines", metavar="NAMES",
                     help="torch.optim paths: for-loop, foreach, fused, compiled "
                     "(default: for-loop,foreach,fused); 'none' for none. compiled is "
                     "torch.optim's step under torch.compile, and also times each "
                     "fused_optim backend's step under torch.compile")
    sel.add_argument("--no-ceiling", action="store_true",
                     help="skip the memory-ceiling kernel")
    sel.add_argument("--no-copy", action="store_true",
                     help="skip the copy-bandwidth reference (timed on CUDA only)")
    sel.add_argument("--devices", metavar="NAMES",
                     help="cpu, cuda (default: cpu, plus cuda when available)")
    how = p.add_argument_group("how")
    how.add_argument("--quick", action="store_true",
                     help="smaller default lists, fewer rounds (under a minute on 2 cores)")
    how.add_argument("--size", choices=tuple(SIZES), help=argparse.SUPPRESS)
    how.add_argument("--rounds", type=int, metavar="N",
                     help="timed interleaved rounds per case (default: auto, "
                     "about 15 s per case, 10-100; --quick: 3-15, within 40 s "
                     "for all cases)")
    how.add_argument("--warmup", type=int, metavar="N",
                     help="untimed rounds first (default: 3; --quick 1)")
    how.add_argument("--steps-per-sample", type=int, metavar="N",
                     help="CUDA: back-to-back steps per timed sample (default: "
                     f"calibrated to about {CUDA_SAMPLE_S * 1e3:g} ms, at most "
                     f"{CUDA_MAX_STEPS})")
    how.add_argument("--threads", type=int, metavar="N",
                     help="torch and numba threads (default: theirs)")
    how.add_argument("--numba-layer", choices=("omp", "tbb", "workqueue"),
                     help="Numba threading layer (default: Numba's choice, or "
                     "NUMBA_THREADING_LAYER)")
    how.add_argument("--seed", type=int, default=0, help="data and order seed (default: 0)")
    out = p.add_argument_group("output")
    out.add_argument("--json", metavar="FILE", help="write every number and the machine "
                     "description as JSON")
    out.add_argument("--plot", metavar="FILE.png", help="bar chart of GB/s (needs matplotlib)")
    out.add_argument("--no-progress", action="store_true", help="no progress on stderr")


class _Progress:
    """One status line on stderr: rewritten in place on a terminal, a line
    per case otherwise (logs stay short)."""

    def __init__(self, total: int, enabled: bool):
        self.total = total
        self.enabled = enabled
        self.tty = enabled and sys.stderr.isatty()
        self.case = ""
        self.index = 0
        self.t0 = time.perf_counter()
        self.width = 0

    def start(self, index: int, case: str) -> None:
        self.index, self.case = index, case
        if self.enabled and not self.tty:
            print(f"[{index}/{self.total}] {case}", file=sys.stderr, flush=True)
        self.update("")

    def update(self, status: str) -> None:
        if not self.tty:
            return
        done = self.index - 1
        bar = "#" * int(20 * done / max(1, self.total))
        text = (f"\r[{bar:<20}] {self.index}/{self.total} {self.case}: {status} "
                f"({time.perf_counter() - self.t0:.0f}s)")
        pad = max(0, self.width - len(text))
        self.width = len(text)
        sys.stderr.write(text + " " * pad)
        sys.stderr.flush()

    def close(self) -> None:
        if self.tty:
            sys.stderr.write("\r" + " " * self.width + "\r")
            sys.stderr.flush()
        if self.enabled:
            print(f"done in {time.perf_counter() - self.t0:.1f}s", file=sys.stderr, flush=True)


def _devices(args, backends_explicit: list | None) -> list:
    names = _split_names(args.devices, ("cpu", "cuda"), "device")
    cuda = torch.cuda.is_available()
    if names is None:
        if backends_explicit:
            names = []
            if "numba" in backends_explicit or "torch" in backends_explicit:
                names.append("cpu")
            if "triton" in backends_explicit or ("torch" in backends_explicit and cuda):
                names.append("cuda")
        else:
            names = ["cpu"] + (["cuda"] if cuda else [])
    if "cuda" in names and not cuda:
        why = ("this torch has no CUDA support" if torch.version.cuda is None
               else "torch.cuda.is_available() is False")
        raise BenchError(f"--devices cuda: no CUDA device here ({why}, "
                         f"torch {torch.__version__})")
    return names


def _plan(args) -> tuple[list, dict]:
    """Resolve the options into cases; raise BenchError for anything unusable."""
    size = SIZES[args.size or ("quick" if args.quick else "full")]
    custom = [shapes_from_json(f) for f in args.shapes] + [shapes_from_model(m) for m in args.model]
    names = _split_names(args.lists, _public_lists(), "list",
                         hidden=[n for n in LISTS if n not in _public_lists()])
    if names is None:
        names = [] if custom else list(size.lists)
    lists = [shape_list(n) for n in names] + custom
    optimizers = (_split_names(args.optimizers, tuple(OPTIMIZERS), "optimizer")
                  or list(size.optimizers))
    dtypes = _split_names(args.dtypes, tuple(DTYPES), "dtype") or list(DEFAULT_DTYPES)
    backends = _split_names(args.backends, BACKEND_IMPLS, "backend")
    if args.baselines is not None and args.baselines.strip() == "none":
        baselines = []
    else:
        baselines = (_split_names(args.baselines, BASELINE_IMPLS, "baseline")
                     or list(DEFAULT_BASELINES))
    if backends is not None:
        for b in backends:
            if b == "triton" and not torch.cuda.is_available():
                raise BenchError("backend 'triton' cannot run here: it needs a CUDA GPU "
                                 "and torch.cuda.is_available() is False")
    devices = _devices(args, backends)
    for b in backends or ():
        if not any(_backend_device_ok(b, d) for d in devices):
            raise BenchError(f"backend {b!r} runs on {'cpu' if b == 'numba' else 'cuda'} "
                             f"tensors, but --devices is {','.join(devices)}")
    if args.rounds is not None and args.rounds < 1:
        raise BenchError("--rounds must be at least 1")
    if args.warmup is not None and args.warmup < 0:
        raise BenchError("--warmup must be at least 0")
    if args.steps_per_sample is not None and args.steps_per_sample < 1:
        raise BenchError("--steps-per-sample must be at least 1")
    if args.plot:
        _check_matplotlib()

    cases = []
    for dev, sl, opt, dt in itertools.product(devices, lists, optimizers, dtypes):
        spec = OPTIMIZERS[opt]
        if backends is None:
            wanted_backends = [b for b in ("numba", "triton", "torch")
                               if _backend_device_ok(b, dev)
                               and (b != "torch" or args.all_backends)]
        else:
            wanted_backends = [b for b in backends if _backend_device_ok(b, dev)]
            for b in wanted_backends:
                why = _backend_problem(b, spec, DTYPES[dt], torch.device(dev))
                if why:
                    raise BenchError(f"backend {b!r} cannot run {opt} {dt} on {dev}: {why}")
        compiled = [f"{b}-compiled" for b in wanted_backends] if COMPILED in baselines else []
        wanted = (wanted_backends + compiled + baselines
                  + ([] if args.no_ceiling else [CEILING])
                  + ([COPY] if dev == "cuda" and not args.no_copy else []))
        impls, skipped = available_impls(spec, DTYPES[dt], dev, wanted)
        if backends is None and "cuda" not in devices:
            skipped["triton"] = "needs a CUDA GPU and torch.cuda.is_available() is False"
        cases.append((sl, spec, dt, dev, impls, skipped))
    settings = {
        "size": args.size or ("quick" if args.quick else "full"),
        "lists": [sl.name for sl in lists], "optimizers": optimizers, "dtypes": dtypes,
        "devices": devices, "backends": backends, "baselines": baselines,
        "ceiling": not args.no_ceiling, "copy": not args.no_copy,
        "steps_per_sample": args.steps_per_sample, "cuda_sample_s": CUDA_SAMPLE_S,
        "cuda_max_steps": CUDA_MAX_STEPS,
        "rounds": args.rounds, "warmup": size.warmup if args.warmup is None else args.warmup,
        "min_rounds": size.min_rounds, "max_rounds": size.max_rounds,
        "target_s": size.target_s, "budget_s": size.budget_s, "seed": args.seed,
        "optimizer_kwargs": {o: OPTIMIZERS[o].kwargs for o in optimizers},
    }
    return cases, settings


def _set_numba_layer(name: str) -> None:
    """Select Numba's threading layer; it is fixed by the first parallel call."""
    import numba

    from .kernels.numba import _pattern
    numba.config.THREADING_LAYER = name
    table = _pattern.make_table([[0, 0, 0]], [0])
    try:
        _pattern._pattern(table, _pattern.split(0), 4, _pattern.word_dtype(4), 3)
    except ValueError as err:
        raise BenchError(f"--numba-layer {name}: {str(err).splitlines()[0]}") from None
    if numba.threading_layer() != name:
        raise BenchError(f"--numba-layer {name}: Numba already runs the "
                         f"{numba.threading_layer()} layer")


def _warn_load(settings: dict) -> None:
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    loads = [la[0] for la in (settings.get("load_average_start"),
                              settings.get("load_average_end")) if la]
    # The run itself keeps about `cores` threads busy; more than that means
    # other processes shared the cores.
    if cores and loads and max(loads) > cores + 0.5:
        # Measured on the 2-core dev VM at load 3-4: torch's multi-threaded
        # steps intermittently took ~8 ms per parallel region (1.6 s instead
        # of 1.2 ms for 200 small tensors) while one-region-per-step kernels
        # were barely affected; single-threaded runs stayed consistent.
        print(f"note: 1-minute load average reached {max(loads):.1f} on {cores} cores: "
              "other processes competed for the CPU, so expect noisier numbers "
              "(thread-pool stalls hit steps with many parallel regions hardest; "
              "--threads 1 compares the kernels without them)", file=sys.stderr)


def _backend_device_ok(backend: str, device: str) -> bool:
    return {"numba": device == "cpu", "triton": device == "cuda"}.get(backend, True)


def run(args: argparse.Namespace) -> list:
    """Run the benchmark the parsed options describe; print the table.

    Returns:
        the list of :class:`CaseResult`.

    Raises:
        BenchError: bad names, unusable backends, missing matplotlib, memory.
    """
    if args.threads is not None:
        if args.threads < 1:
            raise BenchError("--threads must be at least 1")
        import numba
        torch.set_num_threads(args.threads)
        try:
            numba.set_num_threads(args.threads)
        except ValueError as err:
            raise BenchError(f"--threads {args.threads}: {err}") from None
    if args.numba_layer:
        _set_numba_layer(args.numba_layer)
    cases, settings = _plan(args)
    settings["load_average_start"] = _loadavg()
    if not cases:
        raise BenchError("nothing to run")
    progress = _Progress(len(cases), not args.no_progress)
    results = []
    with warnings.catch_warnings():
        # Numba's own pedantic SSA check fires while compiling the bf16/fp16
        # store overloads; it is harmless and would break the progress line.
        from numba.core.errors import NumbaIRAssumptionWarning
        warnings.simplefilter("ignore", NumbaIRAssumptionWarning)
        t0 = time.perf_counter()
        for i, (sl, spec, dt, dev, impls, skipped) in enumerate(cases, 1):
            progress.start(i, f"{sl.name} {spec.name} {dt}" + (f" {dev}" if dev != "cpu" else ""))
            target = settings["target_s"]
            if settings["budget_s"] is not None:
                left = settings["budget_s"] - (time.perf_counter() - t0)
                # Half the share: allocation and warm-up take about as long
                # as the timed rounds.
                target = max(0.0, min(target, 0.5 * left / (len(cases) - i + 1)))
            res = run_case(sl, spec, dt, dev, impls, rounds=settings["rounds"],
                           warmup=settings["warmup"], seed=args.seed,
                           min_rounds=settings["min_rounds"],
                           max_rounds=settings["max_rounds"],
                           target_s=target, skipped=skipped,
                           progress=progress.update, steps=settings["steps_per_sample"])
            results.append(res)
    progress.close()
    settings["load_average_end"] = _loadavg()
    print(format_table(results), flush=True)
    _warn_load(settings)
    if args.json:
        doc = to_json(results, settings)
        try:
            Path(args.json).write_text(json.dumps(doc, indent=1) + "\n")
        except OSError as err:
            raise BenchError(f"cannot write --json {args.json!r}: {err.strerror}") from None
    if args.plot:
        write_plot(results, args.plot)
    return results


def main(argv: Sequence[str] | None = None, prog: str = "fused-optim bench") -> int:
    """``bench`` on its own: parse ``argv``, run, return the exit code."""
    parser = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0])
    add_arguments(parser)
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else 2
    return command(args, prog)


def command(args: argparse.Namespace, prog: str = "fused-optim bench") -> int:
    """Run parsed ``bench`` options; errors become one line on stderr.

    Returns:
        0 on success, 1 if an implementation raised (the others are still
        reported), 2 on a user error, 130 on Ctrl-C.
    """
    try:
        results = run(args)
    except BenchError as err:
        print(f"\n{prog}: error: {err}" if sys.stderr.isatty() else f"{prog}: error: {err}",
              file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"\n{prog}: interrupted", file=sys.stderr)
        return 130
    if any(r.failed for r in results):
        print(f"{prog}: some implementations failed (see FAILED above)", file=sys.stderr)
        return 1
    return 0
