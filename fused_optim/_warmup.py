"""Compile the kernels an optimizer needs before its first step needs them.

A compiled backend builds one specialization per optimizer, dtype and set
of switches, the first time a step meets it; Numba keeps it in its disk
cache. A fresh install pays the compilation in the first ``step()``, and
every process pays loading the backend (Numba's import and the first
kernel's load). Two ways to pay it elsewhere:

* **at construction** (:func:`start`, on by default): the optimizer's
  constructor queues a *shadow step* for one worker thread: a throwaway
  optimizer of fused_optim's own class (never the user's subclass, whose
  ``__init__`` may draw from torch's generator or have side effects), the
  same backend and param-group hyperparameters, over one small zero tensor
  per (group, dtype) bucket that a backend with ``warm_numel`` (Numba) will
  update, sized by it to take the same entry point, stepped once without
  hooks. It compiles or loads what the real first step will use while the
  script builds its model and runs the first forward and backward. It never
  touches the user's tensors, RNG (a fixed stream seed), hooks or state;
  errors are dropped (the real step raises them). A process that ends first
  waits for it (a compile cut short in a daemon thread aborts the process at
  exit). CUDA buckets are left alone: a background launch could meet a CUDA
  graph capture on another stream. ``FUSED_OPTIM_WARMUP=0`` turns it (and
  the Numba backend's background compiles) off.

  Nothing is kept once the work is done: the worker exits when the queue is
  empty, so a sweep building thousands of optimizers holds no thread or key
  per optimizer (a shadow step on kernels already loaded costs well under a
  millisecond of the worker's time). And ``os.fork`` waits for the worker
  and the background compiles first (:func:`_before_fork`): a fork while one
  held Numba's compiler lock or an import's module lock left the lock held
  in the child forever, so a child that stepped an optimizer hung (seen with
  ``multiprocessing``'s fork start method, issue 29).
* **ahead of time** (:func:`ahead_of_time`, ``fused-optim warmup``):
  compiles the common configurations' specializations into the disk cache,
  e.g. in a Dockerfile, before any training process starts.
"""

from __future__ import annotations

import os
import threading
import time

import torch

from . import _backend, _registry

ENV_VAR = "FUSED_OPTIM_WARMUP"
#: what ``fused-optim warmup`` compiles for each optimizer by default: torch's
#: defaults, and SGD with momentum (the configurations most scripts use)
COMMON_CONFIGS = {"SGD": [dict(lr=0.1), dict(lr=0.1, momentum=0.9)]}
_local = threading.local()
_lock = threading.Lock()
_queue: list = []  # (class, backend, buckets) waiting for the worker
_worker: threading.Thread | None = None  # the worker, while it has work


def enabled() -> bool:
    """Whether optimizers warm their kernels up at construction."""
    return os.environ.get(ENV_VAR, "1").strip() != "0"


def _buckets(opt) -> list:
    """``(hyperparameters, dtype, numel)`` per group and CPU dtype (no backend imported)."""
    out = []
    for group in opt.param_groups:
        sizes: dict = {}
        for p in group["params"]:
            if p.device.type == "cpu":
                dtype = p.dtype.to_real() if p.is_complex() else p.dtype
                sizes[dtype] = sizes.get(dtype, 0) + p.numel() * (2 if p.is_complex() else 1)
        hyper = {k: v for k, v in group.items() if k != "params"}
        out += [(hyper, dtype, numel) for dtype, numel in sizes.items() if numel]
    return out


def _warmable(backend, buckets) -> list:
    """The buckets whose backend has ``warm_numel``, sized by it. Imports the
    backends, so it runs in the warm-up thread, not in the constructor (Numba's
    import alone is a few hundred ms)."""
    out = []
    cpu = torch.device("cpu")
    for hyper, dtype, numel in buckets:
        try:
            mod = _backend.select(backend, cpu, dtype)
        except RuntimeError:
            continue  # the step raises why
        warm = getattr(mod, "warm_numel", None)
        if warm is not None:
            out.append((hyper, dtype, int(warm(numel))))
    return out


def shadow_step(cls, backend, buckets) -> None:
    """Step a throwaway ``cls`` once over zero tensors, one per bucket."""
    _local.shadow = True
    try:
        groups = []
        for hyper, dtype, numel in buckets:
            p = torch.zeros(numel, dtype=dtype, requires_grad=True)
            p.grad = torch.zeros(numel, dtype=dtype)
            groups.append(dict(hyper, params=[p]))
        opt = cls(groups, backend=backend)
        opt._sr_seed = 0  # never drawn from the user's generator
        with torch.no_grad():
            opt._step()  # not step(): no user or global hooks
    finally:
        _local.shadow = False


def _quietly(cls, backend, buckets) -> None:
    try:
        buckets = _warmable(backend, buckets)
        if buckets:
            shadow_step(cls, backend, buckets)
    except Exception:  # noqa: BLE001 - the real step raises whatever this met
        pass


def _work() -> None:
    """The worker: shadow steps until the queue is empty, then gone."""
    global _worker
    while True:
        with _lock:
            if not _queue:
                _worker = None
                return
            job = _queue.pop(0)
        _quietly(*job)


def _own_class(opt) -> type | None:
    """fused_optim's class that ``opt`` is (or derives from)."""
    for cls in type(opt).__mro__:
        try:
            if _registry.get(cls.__name__).cls is cls:
                return cls
        except KeyError:
            continue
    return None


def start(opt) -> threading.Thread | None:
    """Queue a warm-up of ``opt``'s kernels (see the module docstring).

    Returns the worker thread that will run it, or None when nothing was queued.
    """
    global _worker
    if getattr(_local, "shadow", False) or not enabled():
        return None
    try:
        buckets = _buckets(opt)
        cls = _own_class(opt)
    except Exception:  # noqa: BLE001 - e.g. a backend that cannot run: the step says so
        return None
    if not buckets or cls is None:
        return None
    with _lock:
        _queue.append((cls, opt.backend, buckets))
        if _worker is None:
            # not a daemon: see the module docstring
            _worker = threading.Thread(target=_work, daemon=False, name="fused_optim-warmup")
            _worker.start()
        return _worker


def wait(timeout: float | None = None) -> None:
    """Join the warm-up worker, and the compilations it or a step started."""
    with _lock:
        worker = _worker
    if worker is not None and worker is not threading.current_thread():
        worker.join(timeout)
    for name in ("numba",):
        mod = _backend._loaded.get(name)
        join = getattr(mod, "wait_for_background", None)
        if join is not None:
            join(timeout)


def _before_fork() -> None:
    # the child gets a copy of every lock as it is now, and none of the
    # threads holding them: let them finish first (see the module docstring)
    wait()


def _in_child() -> None:
    # another thread may have queued (or held the lock) after the join
    global _lock, _worker
    _lock, _worker = threading.Lock(), None
    _queue.clear()


os.register_at_fork(before=_before_fork, after_in_child=_in_child)


def ahead_of_time(names=None, dtypes=None, *, report=print) -> list:
    """Compile each optimizer's common configurations for ``dtypes`` on CPU.

    Every entry point a step can take (Numba's serial and parallel ones) is
    compiled now, in this thread, into the disk cache. Returns
    ``[(name, config, dtype, seconds)]``.
    """
    names = list(names or _registry.names())
    dtypes = list(dtypes or [torch.float32])
    saved = os.environ.get(ENV_VAR)
    os.environ[ENV_VAR] = "0"  # compile every entry point here, not behind
    out = []
    try:
        for name in names:
            cls = _registry.get(name).cls
            for config in COMMON_CONFIGS.get(name, [{}]):
                for dtype in dtypes:
                    # the smallest and largest batches: each entry point once
                    sizes = {n for _, _, n in _warmable("auto", [(config, dtype, 1),
                                                                  (config, dtype, 1 << 62)])}
                    if not sizes:
                        continue
                    t0 = time.perf_counter()
                    for numel in sorted(sizes):
                        shadow_step(cls, "auto", [(dict(config), dtype, numel)])
                    out.append((name, config, dtype, time.perf_counter() - t0))
                    report(f"{name} {config or '(defaults)'} {str(dtype).removeprefix('torch.')}: "
                           f"{out[-1][3]:.1f} s")
    finally:
        if saved is None:
            os.environ.pop(ENV_VAR, None)
        else:
            os.environ[ENV_VAR] = saved
    return out
