"""The implementations a case times, and whether each can run here."""

from __future__ import annotations

import functools
import inspect
import time
from dataclasses import dataclass
from typing import Callable, Sequence

import torch

from ..kernels.reference._precision import LOW_PRECISION
from .cases import BenchError, OptimizerSpec


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
#: ``--precision`` names -> the keyword options a backend's optimizer is built
#: with (``fused_optim/_precision.py``; they act on bfloat16/float16 params only).
PRECISIONS = {"kahan": dict(kahan_sum=True), "sr": dict(stochastic_round=True),
              "kahan+sr": dict(kahan_sum=True, stochastic_round=True),
              "state-bf16": dict(state_dtype=torch.bfloat16),
              "state-8bit": dict(state_bits=8)}
#: the ``--state`` names -> their PRECISIONS entry (fp32: the plain backend);
#: ``state_dtype`` and ``state_bits`` act on float32 and bfloat16 params
#: (``state_bits`` on Adam/AdamW's, of 4096 elements or more)
STATES = {"fp32": None, "bf16": "state-bf16", "8bit": "state-8bit"}


def is_state_option(precision: str) -> bool:
    """Whether a PRECISIONS entry is a state storage option (``--state``)."""
    return "state_dtype" in PRECISIONS[precision] or "state_bits" in PRECISIONS[precision]
_STATE_PARAMS = (torch.float32, torch.bfloat16)
#: A backend built with a precision option: ``"<backend>+<precision>"``
#: (``numba+kahan``, ``torch+kahan+sr``), reported right after its plain backend.
PRECISION_IMPLS = tuple(f"{b}+{p}" for b in BACKEND_IMPLS for p in PRECISIONS)
CEILING = "ceiling"
#: ``copy_`` of the bytes one step moves; timed on CUDA only (see the package
#: docstring for why not on CPU).
COPY = "copy"
IMPLS = (tuple(i for b in BACKEND_IMPLS for i in (b, *(f"{b}+{p}" for p in PRECISIONS)))
         + COMPILED_BACKENDS + BASELINE_IMPLS + (CEILING, COPY))
#: The implementation the paired ratio divides by.
REFERENCE = "fused"

_LABELS = {"numba": "fused_optim numba", "triton": "fused_optim triton",
           "torch": "fused_optim torch", "for-loop": "torch for-loop",
           "foreach": "torch foreach", "fused": "torch fused",
           COMPILED: "torch compiled", CEILING: "ceiling", COPY: "copy",
           **{f"{b}-compiled": f"fused_optim {b} compiled" for b in BACKEND_IMPLS},
           **{f"{b}+{p}": f"fused_optim {b} +{p}" for b in BACKEND_IMPLS for p in PRECISIONS}}


def torch_default_path(device) -> str:
    """The path torch.optim's constructors take by default for params on
    ``device`` (the for-loop on CPU, foreach on CUDA), asked of torch itself."""
    device = torch.device(device)
    try:
        from torch.optim.optimizer import _default_to_fused_or_foreach
        p = torch.empty(1, device=device)
        fused, foreach = _default_to_fused_or_foreach([p], differentiable=False,
                                                      use_fused=False)
    except Exception:  # noqa: BLE001 - a torch without the helper: its documented default
        fused, foreach = False, device.type == "cuda"
    return "fused" if fused else "foreach" if foreach else "for-loop"


def best_torch(impls) -> str | None:
    """Which of ``impls`` (``{id: median seconds}``) is torch.optim's fastest path."""
    timed = {i: t for i, t in impls.items() if i in BASELINE_IMPLS}
    return min(timed, key=timed.get) if timed else None


def precision_variant(impl: str) -> tuple[str, str] | None:
    """``(backend, precision)`` of a precision variant id (``"numba+kahan+sr"``
    -> ``("numba", "kahan+sr")``), or None for any other implementation."""
    base, sep, prec = impl.partition("+")
    if sep and base in BACKEND_IMPLS and prec in PRECISIONS:
        return base, prec
    return None


#: The constructor switches that pick each of torch.optim's paths.
_SWITCHES = {"for-loop": dict(foreach=False), "foreach": dict(foreach=True),
             "fused": dict(fused=True), COMPILED: {}}


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


def _leaves(params, grads):
    out = []
    for p, g in zip(params, grads):
        q = p.detach().clone().requires_grad_(True)
        q.grad = g.detach().clone()
        out.append(q)
    return out


def make_runner(impl: str, spec: OptimizerSpec, params, grads, *,
                compile_backend: str = "inductor") -> Runner:
    """An implementation stepping private copies of ``params`` and ``grads``.

    Args:
        impl: an id of ``IMPLS``.
        spec: optimizer setting.
        params, grads: the case's data (cloned, never modified).
        compile_backend: ``torch.compile``'s backend for the compiled
            implementations (the benchmark smoke run in CI passes
            ``aot_eager``: the same traced step, without Inductor's code
            generation; see benchmarks/conftest.py).
    """
    if impl == CEILING:
        return _ceiling_runner(spec, params, grads)
    if impl == COPY:
        numel = sum(p.numel() for p in params)
        return copy_runner(spec.bytes_per_step(numel, params[0].element_size()),
                           params[0].device)
    leaves = _leaves(params, grads)
    base = impl.removesuffix("-compiled")
    variant = precision_variant(impl)
    if base in BACKEND_IMPLS:
        opt = spec.record.cls(leaves, backend=base, **spec.kwargs)
    elif variant is not None:
        backend, prec = variant
        opt = spec.record.cls(leaves, backend=backend, **spec.kwargs, **PRECISIONS[prec])
    elif impl in BASELINE_IMPLS:
        opt = spec.record.torch_cls(leaves, **_SWITCHES[impl], **spec.kwargs)
    else:
        raise BenchError(f"unknown implementation {impl!r} (known: {', '.join(IMPLS)})")
    if impl == COMPILED or impl in COMPILED_BACKENDS:
        return _compiled_runner(impl, opt, leaves, compile_backend)
    return Runner(impl, opt.step, (opt, leaves))


def fresh_compile_caches() -> None:
    """Forget dynamo's compiled frames before a case's compiled runners are built.

    Every optimizer of a class shares ``step``'s code object, and dynamo
    keeps one guarded entry per optimizer on it, up to its recompile limit
    (8), after which it silently runs the frame eagerly: without this, the
    ninth case of a class would time an eager step as "compiled".
    """
    torch._dynamo.reset()


def _compiled_runner(impl: str, opt, keep, backend: str) -> Runner:
    # The pattern of torch's compiled-optimizer tutorial: the step inside a
    # compiled function, with the optimizer's own defaults.
    @torch.compile(backend=backend)
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
        from ..kernels.numba import _ceiling
        arrays = [[p.clone() for _ in range(k - 1)] + [g.clone()] for p, g in zip(params, grads)]
        table = _ceiling.make_table([[a.data_ptr() for a in row] for row in arrays],
                                    [p.numel() for p in params])
        bounds = _ceiling.split(int(table[:, _ceiling.NUMEL].sum()))

        def step():
            _ceiling.pattern(table, bounds, itemsize, k, m)

        return Runner(CEILING, step, (arrays, table, bounds))
    if device.type == "cuda":
        flat_p = torch.cat([p.reshape(-1) for p in params])
        flat_g = torch.cat([g.reshape(-1) for g in grads])
        bufs = [flat_p.clone() for _ in range(k - 1)] + [flat_g]
        del flat_p
        try:
            from ..kernels.triton import _ceiling as triton_pattern
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
    from .. import _backend
    from ..kernels import contract
    # timing an interpreter measures nothing a user would run
    why = _backend.why_not(impl, device, dtype, interpreted=False)
    if why is not None:
        return why
    try:
        contract.kernel(_backend.module(impl), spec.kind)
    except (ImportError, AttributeError):
        return f"the {impl} backend has no {spec.kind} kernel yet"
    return None


def _baseline_problem(impl: str, spec: OptimizerSpec, dtype: torch.dtype,
                      device: torch.device) -> str | None:
    """Why torch.optim's path ``impl`` cannot run this case, or None."""
    cls = spec.record.torch_cls
    for switch in _SWITCHES[impl]:
        if switch not in inspect.signature(cls).parameters:
            return f"torch's {spec.cls} has no {switch} path"
    if impl == "fused":
        try:
            from torch.optim.optimizer import _get_fused_kernels_supported_devices
            if device.type not in _get_fused_kernels_supported_devices():
                return f"torch has no fused {spec.cls} for {device.type}"
        except ImportError:
            pass
        kwargs = tuple(sorted(spec.kwargs.items()))
        try:
            return _fused_probe(cls, kwargs, dtype, device.type)
        except TypeError:  # an unhashable option (a list): probe uncached
            return _fused_probe.__wrapped__(cls, kwargs, dtype, device.type)
    return None


@functools.cache
def _fused_probe(cls: type, kwargs: tuple, dtype: torch.dtype, device: str) -> str | None:
    """Whether torch's ``cls(fused=True)`` steps a one-element ``dtype``
    param on ``device`` (some classes check the device only in the step)."""
    try:
        p = torch.zeros(1, dtype=dtype, device=device, requires_grad=True)
        p.grad = torch.zeros_like(p)
    except Exception:  # noqa: BLE001 - no such device here: let the run tell
        return None
    try:
        cls([p], fused=True, **dict(kwargs)).step()
    except Exception as err:  # noqa: BLE001 - whatever torch says is the reason
        return f"torch's fused {cls.__name__}: {str(err).splitlines()[0]}"
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
        variant = precision_variant(impl)
        if impl.removesuffix("-compiled") in BACKEND_IMPLS:
            why = _backend_problem(impl.removesuffix("-compiled"), spec, dtype, device)
        elif variant is not None:
            why = _backend_problem(variant[0], spec, dtype, device)
            if is_state_option(variant[1]):
                if why is None and dtype not in _STATE_PARAMS:
                    why = (f"--state acts on float32/bfloat16 params only, "
                           f"not {str(dtype).removeprefix('torch.')}")
                if (why is None and "state_bits" in PRECISIONS[variant[1]]
                        and "state_bits" not in inspect.signature(spec.record.cls).parameters):
                    why = f"--state 8bit is for Adam/AdamW, not {spec.cls}"
            elif why is None and dtype not in LOW_PRECISION:
                why = (f"--precision {variant[1]} acts on bfloat16/float16 params only, "
                       f"not {str(dtype).removeprefix('torch.')}")
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


def _ordered(impls) -> list:
    return sorted(impls, key=lambda i: IMPLS.index(i) if i in IMPLS else len(IMPLS))


def _backend_device_ok(backend: str, device: str) -> bool:
    """Whether ``backend`` runs on ``device`` at all, installed or not (so that
    a missing package is reported, not silently left out)."""
    from .. import _backend
    return _backend.runs_on(backend, device, interpreted=False)
