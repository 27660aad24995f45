"""Behaviour shared by the fused optimizers: backend attribute, pickling,
checked state loading, and the kernel dispatch of one update."""

from __future__ import annotations

import contextlib
import functools
import inspect
from itertools import chain, compress, repeat
from operator import attrgetter, is_, is_not

import torch
from torch.optim import Optimizer
from torch.optim import optimizer as _optimizer_module

from . import _backend, _facts, _ops, _precision, _tables, _warmup


def _grad_mode_for_differentiable(step):
    """Run ``step`` with autograd on only when the optimizer is differentiable."""

    @functools.wraps(step)
    def wrapper(self, *args, **kwargs):
        prev = torch.is_grad_enabled()
        want = self.defaults["differentiable"]
        if prev == want:
            return step(self, *args, **kwargs)
        try:
            torch._C._set_grad_enabled(want)
            return step(self, *args, **kwargs)
        finally:
            torch._C._set_grad_enabled(prev)

    return wrapper


@functools.cache
def accelerator_present() -> bool:
    """Whether this process has an accelerator (CUDA graph capture is possible).

    Asked once: torch's per-step capture health check costs ~50 us on a
    cold cache and can only ever fail where an accelerator exists.
    """
    current = getattr(torch, "accelerator", None)
    if current is not None and hasattr(current, "current_accelerator"):
        return current.current_accelerator(check_available=True) is not None
    return torch.cuda.is_available()


def _step_with_hooks(func):
    """torch's ``Optimizer.profile_hook_step``, with the profiler range made lazy.

    The same pre-hooks (which may replace the arguments, with torch's error
    for a bad return), ``_optimizer_step_code`` call and post-hooks, in the
    same order. The ``record_function`` range, which only a running profiler
    records, is entered only while one runs: on a cold cache, right after a
    step has streamed the tensors' data, entering it cost ~230 us here, a
    sixth of the whole per-step overhead on resnet50-shaped lists.
    """

    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        self = args[0]
        # (dynamo cannot trace the bool _profiler_enabled returns: skipped
        # while compiling, where torch ignores record_function anyway)
        if not torch.compiler.is_compiling() and torch.autograd._profiler_enabled():
            with torch.autograd.profiler.record_function(
                    f"Optimizer.step#{self.__class__.__name__}.step"):
                return _hooked_call(func, self, args, kwargs)
        return _hooked_call(func, self, args, kwargs)

    return wrapper


def _hooked_call(func, self, args, kwargs):
    global_pre = _optimizer_module._global_optimizer_pre_hooks
    if global_pre or self._optimizer_step_pre_hooks:
        for pre_hook in chain(global_pre.values(), self._optimizer_step_pre_hooks.values()):
            result = pre_hook(self, args, kwargs)
            if result is not None:
                if isinstance(result, tuple) and len(result) == 2:
                    args, kwargs = result
                else:
                    raise RuntimeError(
                        f"{func} must return None or a tuple of (new_args, new_kwargs), "
                        f"but got {result}.")
    out = func(*args, **kwargs)
    self._optimizer_step_code()
    global_post = _optimizer_module._global_optimizer_post_hooks
    if global_post or self._optimizer_step_post_hooks:
        for post_hook in chain(self._optimizer_step_post_hooks.values(),
                               global_post.values()):
            post_hook(self, args, kwargs)
    return out


class FusedOptimizer(Optimizer):
    """Base of fused_optim's optimizers. Not for direct use.

    Adds to :class:`torch.optim.Optimizer`:

    * ``backend``: the requested backend name, an attribute of the optimizer
      (never a param_group or state_dict key, so checkpoints stay torch's);
    * AMP in the kernel: ``_step_supports_amp_scaling`` is set, so
      ``GradScaler`` hands over ``grad_scale`` and ``found_inf`` and the same
      kernel pass unscales the grads, or skips the whole update (params, state
      and step counts) when an inf/NaN was found, with no host
      synchronisation; :attr:`last_step_skipped` tells which.

    A class here derives from this and from torch's own class, in that
    order (``class SGD(FusedOptimizer, torch.optim.SGD)``): torch's
    ``__init__`` checks the arguments (its errors, in its order) and builds
    the defaults, torch's ``__setstate__`` fills in old checkpoints' keys,
    and torch's ``_init_group`` creates the lazy state; ``isinstance(opt,
    torch.optim.SGD)`` holds. This class comes first, so its ``step`` (and
    the subclass's ``_init_group``, a per-step fast path) run.

    Every class here takes, besides torch's arguments, the keyword-only:

    * ``backend`` (str, optional): ``"auto"``, ``"numba"``, ``"triton"`` or
      ``"torch"``; None reads ``FUSED_OPTIM_BACKEND`` (default: None, i.e. auto)
    * ``kahan_sum`` (bool, optional): Kahan summation for bfloat16/float16
      params: a compensation buffer per param (state ``"kahan_comp"``, the
      param's size again) carries each store's rounding error into the next
      step (default: False)
    * ``stochastic_round`` (bool, optional): round bfloat16/float16 param
      stores stochastically (unbiased), from a stream seeded by torch's
      generator and saved in ``state_dict`` (default: False)

    .. note::
        As with torch's ``fused=True`` optimizers, ``GradScaler.step`` then
        leaves ``p.grad`` scaled: call ``scaler.unscale_(optimizer)`` first
        where unscaled grads are needed (clipping, logging).
    """

    _step_supports_amp_scaling = True

    #: installed on ``step`` by torch's ``Optimizer.__init__`` (see _step_with_hooks)
    profile_hook_step = staticmethod(_step_with_hooks)

    #: the class's whole-step operator (an ``_ops.UpdateOp``)
    STEP_OP = None
    #: keyword-only options of fused_optim's own that are group keys, set
    #: only where on: a group without them is torch's, and so is its
    #: checkpoint (see _precision)
    OPTIONS = ("kahan_sum", "stochastic_round")
    #: whether torch's ``step`` runs the CUDA-graph capture health check
    CAPTURE_HEALTH_CHECK = False

    def __init__(self, params, *args, backend=None, **kwargs):
        """The next class in the MRO's ``__init__`` (torch's) with ``args`` and
        the ``kwargs`` that are not ``OPTIONS``: its checks, in its order, and
        its defaults; then the options that are on become group keys."""
        self.backend = _backend.requested(backend)
        self._plans = _tables.PlanCache()  # group index -> validated _tables.Plan
        self._handle = _ops.register_optimizer(self)  # how the step operator finds _plans
        on = {name: True for name in self.OPTIONS if kwargs.pop(name, False)}
        super().__init__(params, *args, **kwargs)
        if on:
            self.defaults.update(on)  # (and so to add_param_group's groups)
            for group in self.param_groups:
                for name in on:
                    group.setdefault(name, True)
        if on.get("stochastic_round"):
            _precision._seed(self)  # drawn now, reproducibly after torch.manual_seed
        _warmup.start(self)  # compile the first step's kernels in the background

    def state_dict(self):
        return _precision.save(self, super().state_dict())

    def load_state_dict(self, state_dict):
        _precision.load(self, state_dict, super().load_state_dict)

    #: per-optimizer state outside torch's three keys that a copy or pickle
    #: keeps: the stochastic-rounding stream (seed and per-device counters; a
    #: copy without them drew a new seed and its bf16 params diverged from
    #: the original's, issue 29). The plans and the operator handle are never
    #: copied (see ``__setstate__``).
    _COPIED = ("backend", "_sr_seed", "_sr_counters")

    def __getstate__(self):
        state = super().__getstate__()
        for key in self._COPIED:
            if key in self.__dict__:
                state[key] = self.__dict__[key]
        return state

    def __setstate__(self, state):
        super().__setstate__(state)  # torch's class's: old checkpoints' defaults
        if "backend" not in self.__dict__:
            self.backend = _backend.requested(None)
        # plans hold addresses of the tensors they were built for, and keep
        # their state storages alive: never copied, and dropped when
        # load_state_dict (which comes through here) replaces the state. What
        # captured CUDA graphs read stays (PlanCache.retain).
        old = self.__dict__.get("_plans")
        self._plans = _tables.PlanCache(getattr(old, "graph_owned", None))
        if "_handle" not in self.__dict__:  # unpickled or copied (load_state_dict keeps it)
            self._handle = _ops.register_optimizer(self)

    def _group_job(self, group, found_inf):
        """One group's work for this step.

        Returns:
            ``(job, after)``: the group's ``_ops.Job`` (None when it has
            nothing to do) and a callable run after the update (None: none),
            e.g. to store the state the update created.
        """
        raise NotImplementedError

    def _steps_to_device(self, params, state_steps):
        """Under GradScaler, move CPU step counters of CUDA params to their device.

        Whether a step counts depends on ``found_inf``, which lives on the
        device: a counter on the host could only be advanced after reading it
        there, a sync at every step. On the device the kernels advance it, or
        not, themselves, as torch's ``fused=True`` optimizers keep their counters.
        The value and dtype are kept, and torch.optim loads such a state as
        it is (its for-loop then reads the counter with ``.item()``). The move
        is made once per param and costs no sync (the counter is read on the
        host, where it is). Only the first and last counters are looked at
        each step (a full scan costs about 0.2 us per param): a group that
        mixes placements otherwise keeps the host path, which reads
        found_inf (correct, one sync).
        """
        if not state_steps or not any(
                s.device.type == "cpu" and p.device.type == "cuda"
                for p, s in ((params[0], state_steps[0]), (params[-1], state_steps[-1]))):
            return
        state = self.state
        for i, (p, s) in enumerate(zip(params, state_steps)):
            if s.device.type == "cpu" and p.device.type == "cuda" and not s.requires_grad:
                moved = torch.full((), float(s), dtype=s.dtype, device=p.device)
                state[p]["step"] = state_steps[i] = moved

    def _torchs_init_group(self, group) -> None:
        """torch's own ``_init_group`` on ``group``, the lists it fills thrown away.

        Creates the lazy state torch's loop creates and raises the error it
        raises first, param by param, in its order: the cold path of the
        subclasses' per-step ``_init_group`` (see ``_gather_state``).
        """
        init_group = super()._init_group  # the torch class's, next in the MRO
        lists = len(inspect.signature(init_group).parameters) - 1  # those after group
        init_group(group, *[[] for _ in range(lists)])

    def _gather_state(self, group, with_grad, keys, torchs_raises=False) -> list:
        """``state[key]`` of every param of ``with_grad``, a list for each of ``keys``.

        torch's ``_init_group`` does this in a Python loop, at every step for
        every param; here one C-level map per key (benchmarks/step_overhead.py).
        Where a param has no state yet, where a state lacks a key, or where
        the caller found that torch's loop raises (``torchs_raises``), torch's
        own loop runs first (``_torchs_init_group``): its lazy state, its error.
        """
        if torchs_raises:
            self._torchs_init_group(group)
        # (.get: a defaultdict entry made here for a param torch's loop never
        # reaches would stay behind in state_dict() where that loop raises)
        all_state = self.state
        if torch.compiler.is_compiling():  # dynamo traces comprehensions, not bound-method maps
            states = [all_state.get(p) for p in with_grad]
        else:  # 161 params: 12 us, against 15 us for a comprehension of .get
            states = list(map(all_state.get, with_grad))
        if not all(states):
            self._torchs_init_group(group)
            states = [all_state[p] for p in with_grad]
        try:
            return [state_values(states, key) for key in keys]
        except KeyError:
            self._torchs_init_group(group)
            raise

    @staticmethod
    def _traceable(hyper) -> bool:
        """Whether a group's update may hide behind the step operator.

        False where it runs torch's own ops, which autograd and dynamo must see.
        """
        return not hyper["differentiable"]

    def _step(self, closure=None):
        """torch's step skeleton: closure, AMP arguments, every group, one update."""
        # (torch's check is a no-op while compiling too)
        if (self.CAPTURE_HEALTH_CHECK and not torch.compiler.is_compiling()
                and accelerator_present()):
            check = getattr(self, "_accelerator_graph_capture_health_check", None) or getattr(
                self, "_cuda_graph_capture_health_check", None)
            if check is not None:
                check()
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        grad_scale, found_inf = self._amp_args()
        jobs, afters = [], []
        rounded = False
        for group in self.param_groups:
            try:
                job, after = self._group_job(group, found_inf)
                if job is not None and _precision.enabled(group):
                    more, made = _precision.attach(self, job, group)
                    job = more.pop()
                    jobs.extend(more)
                    if made is not None:
                        afters.append(made)
                    rounded = rounded or group.get("stochastic_round", False)
            except Exception:
                # torch's loop steps each group before it reads the next, so
                # an error in an earlier group's update comes first: those
                # are checked (nothing is written) before this one is raised
                if jobs and not torch.compiler.is_compiling():
                    _ops.opaque(self.STEP_OP.validate, jobs, grad_scale, found_inf,
                                self.backend, _ops.cache_of(self._handle))
                raise
            if job is not None:
                jobs.append(job)
            if after is not None:
                afters.append(after)
        if jobs:
            self.STEP_OP(jobs, grad_scale, found_inf, self.backend, self._handle,
                         traceable=all(self._traceable(job.hyper) for job in jobs))
        for after in afters:
            after()
        if rounded:
            _precision.advance(self, found_inf)
        return loss

    @_grad_mode_for_differentiable
    def step(self, closure=None):
        """Perform a single optimization step.

        Args:
            closure (Callable, optional): A closure that reevaluates the model
                and returns the loss.
        """
        return self._step(closure)

    @property
    def last_step_skipped(self) -> bool:
        """True if the last ``step()`` was skipped because GradScaler found inf/NaN.

        Reading it synchronises with the device (the step itself does not).
        Torch's fused optimizers hide this, and schedulers advance anyway;
        ``if not opt.last_step_skipped: scheduler.step()`` avoids that.
        """
        found_inf = getattr(self, "_last_found_inf", None)
        return found_inf is not None and bool(found_inf != 0)

    def _amp_args(self):
        """GradScaler's tensors for this step (attributes it sets and deletes)."""
        grad_scale = getattr(self, "grad_scale", None)
        found_inf = getattr(self, "found_inf", None)
        self._last_found_inf = found_inf
        return grad_scale, found_inf


_PLAIN = frozenset((torch.Tensor, torch.nn.Parameter))
_GRAD = attrgetter("grad")
IS_SPARSE = attrgetter("is_sparse")


def params_with_grads(group_params):
    """The params of a group that have a gradient, and those gradients.

    One C-level ``map`` per fact instead of torch's Python loop: this runs
    for every param at every step (see benchmarks/, fixed-cost list).

    Returns:
        (params, grads): two lists in group order.
    """
    if torch.compiler.is_compiling():  # dynamo traces comprehensions, not attrgetter
        with_grad = [p for p in group_params if p.grad is not None]
        return with_grad, [p.grad for p in with_grad]
    grads = list(map(_GRAD, group_params))
    if any(map(is_, grads, repeat(None))):
        keep = list(map(is_not, grads, repeat(None)))
        return list(compress(group_params, keep)), list(compress(grads, keep))
    return list(group_params), grads


def state_values(states, key):
    """``state[key]`` of every per-param state dict (KeyError if missing, as torch).

    These helpers run for every param at every step: one C-level ``map`` per
    fact eagerly; a comprehension while dynamo traces (it cannot trace
    ``attrgetter`` or unbound ``dict`` methods, and traces ``_init_group``
    itself where its own interception gives up, as under GradScaler).
    """
    if torch.compiler.is_compiling():
        return [state[key] for state in states]
    return list(map(dict.__getitem__, states, repeat(key)))


def state_gets(all_state, params, key):
    """``all_state[p].get(key)`` of every param (None where missing)."""
    if torch.compiler.is_compiling():
        return [all_state[p].get(key) for p in params]
    return list(map(dict.get, map(all_state.__getitem__, params), repeat(key)))


def any_sparse(grads) -> bool:
    if torch.compiler.is_compiling():
        return any(g.is_sparse for g in grads)
    return any(map(IS_SPARSE, grads))


_DTYPE = attrgetter("dtype")
_COMPLEX = frozenset((torch.complex32, torch.complex64, torch.complex128))


def any_complex(tensors) -> bool:
    """Whether any of ``tensors`` is complex: one C-level map over dtypes
    (10 us for 161 params, against 23 us for ``map(torch.is_complex, ...)``)."""
    if torch.compiler.is_compiling():
        return any(t.is_complex() for t in tensors)
    return not _COMPLEX.isdisjoint(map(_DTYPE, tensors))


def _local(ts):
    """Local shards of DTensors (FSDP2 params, grads and state), else as given.

    The kernels update a DTensor's local shard in place, with no gather; its
    state stays DTensor-shaped, exactly as torch.optim's under FSDP2.
    """
    return [t if t is None or type(t) in _PLAIN else getattr(t, "_local_tensor", t)
            for t in ts]


def prepare_update(kind, backend, params, grads, states, roles, hyper, reference,
                   steps=None, row_flags=None, cache=None, key=None, dry_all=False,
                   precision=None):
    """Validate one group's update by kernel ``kind``; return what writes it.

    ``kind`` is the optimizer record's ``kernel`` (``"sgd"``, ``"adam"``, ...).

    Everything that can raise is done here, before any tensor is written:
    full validation or the reuse rule, the backends' choice, and torch's
    own step on stand-ins of the rows where torch may raise.

    Args:
        reference: ``reference(params, grads, states, steps, row_flags)`` runs
            torch's own for-loop step on those rows (lists as here, a subset
            of rows; states one list per role, None where absent) and
            returns the momentum buffers it created, or None. It runs rows
            the kernels do not take, and first, on stand-ins, every row
            where torch may raise, so that its exception comes before
            anything is written.
        dry_all: run that dry run on every row (hyperparameters with which
            torch's step raises).
        precision: the job's ``_precision.Precision`` (None: round to
            nearest). Its Kahan compensation buffers join the plan as the
            fourth state role (column COMP), validated like any state.

    Returns:
        A callable with no arguments that carries out the update.
    """
    if precision is not None and precision.comps is not None:
        n = len(params)
        states = [*states, *([[None] * n] * (3 - len(states))), precision.comps]
        roles = (*roles, *(("",) * (3 - len(roles))), "kahan_comp")
    if not _PLAIN.issuperset(map(type, params)):
        params, grads = _local(params), _local(grads)
        states = [_local(s) for s in states]
        steps = _local(steps) if steps is not None else None
    plan, cols, grad_ptrs = _tables.prepare(params, grads, states, roles, steps=steps,
                                            row_flags=row_flags, backend=backend, cache=cache,
                                            key=key)
    dry = range(len(params)) if dry_all else plan.dry_rows
    if dry:
        _dry_run(dry, params, grads, states, steps, row_flags, reference)

    retain = cache.retain if isinstance(cache, _tables.PlanCache) else None

    def update():
        _execute(kind, plan, cols, grad_ptrs, params, grads, states, steps, row_flags, hyper,
                 reference, retain, precision, key or 0)

    return update


def _execute(kind, plan, cols, grad_ptrs, params, grads, states, steps, row_flags, hyper,
             reference, retain, precision=None, key=0):
    grad_scale, found_inf = hyper.get("grad_scale"), hyper.get("found_inf")
    torch_grads = grads
    if plan.has_torch_rows:
        if found_inf is not None and bool(found_inf != 0):
            torch_grads = None  # a skipped step; the kernels skip on their own
        elif grad_scale is not None:
            inv = grad_scale.double().reciprocal().float()  # as GradScaler.unscale_
            torch_grads = {i: grads[i] * inv.to(grads[i].device)
                           for u in plan.units if isinstance(u, _tables.TorchUnit)
                           for i in u.rows}
    for u, unit in enumerate(plan.units):
        if isinstance(unit, _tables.TorchUnit):
            if torch_grads is not None:
                _torch_rows(unit.rows, params, torch_grads, states, steps, row_flags, reference)
            continue
        staged = _tables.staged_unit(unit, cols, plan.where, steps, plan.row_flags, grad_ptrs,
                                     retain)
        staged.start()
        if precision is None:
            _backend.kernel(staged.module, kind)(staged.batch, **hyper)
        else:
            _backend.kernel(staged.module, kind)(
                staged.batch, **hyper, **precision.kernel_args(unit, key, u))
        staged.finish()
    # The kernels write through raw addresses, which autograd cannot see. As
    # torch's for-loop does, count the in-place update of every param, so a
    # backward through a graph that saved a param before step() raises
    # instead of silently using the new values. (State tensors are never in a
    # graph; they are left alone. Inference tensors keep no count.)
    if torch.is_inference_mode_enabled():
        params = [p for p in params if not p.is_inference()]
    torch._C._increment_version(params)


def _subset(rows, params, grads, states, steps, row_flags):
    return ([params[i] for i in rows], [grads[i] for i in rows],
            [None if s is None or not s or s[0] is None else [s[i] for i in rows]
             for s in states],
            None if steps is None else [steps[i] for i in rows],
            None if row_flags is None else [row_flags[i] for i in rows])


def _torch_rows(rows, params, grads, states, steps, row_flags, reference):
    """Run torch's for-loop on ``rows``; keep the momentum buffers it creates."""
    ps, gs, ss, st, fr = _subset(rows, params, grads, states, steps, row_flags)
    made = with_sparse_grads_offset_free(reference, ps, gs, ss, st, fr)
    if made is not None:  # the buffers of this step's first momentum step
        for i, buf, new in zip(rows, made, fr):
            if new:
                # Behind the step operator (compiled steps) the caller keeps
                # the buffer it allocated for this row, not the list entry:
                # it gets the values of torch's. Eagerly the entry replaces
                # it, and the state holds torch's own buffer (sparse for a
                # sparse grad, as in torch).
                mine = states[0][i]
                if isinstance(mine, torch.Tensor) and mine is not buf:
                    with torch.no_grad():
                        mine.copy_(buf.to_dense() if buf.layout != torch.strided else buf)
                states[0][i] = buf


def with_sparse_grads_offset_free(reference, params, grads, states, *rest):
    """``reference(params, grads, states, *rest)``, safe from a torch bug.

    torch 2.13's CPU ``dense.add_(sparse)`` writes at twice a view's storage
    offset: with ``p = b[6:7]``, ``p.add_(g.to_sparse())`` changes ``b[12]``,
    and a view far enough into its storage is written past the allocation.
    torch's for-loop SGD does exactly that with a sparse grad. Where a row
    has a sparse grad, its param and dense state run on offset-free copies,
    copied back after: the update torch means, inside the tensor's memory.
    (The lists are the caller's own copies; their entries may be replaced.)
    """
    copies = {}  # by identity: a param listed twice is stepped twice, on one copy
    for k, g in enumerate(grads):
        if isinstance(g, torch.Tensor) and g.layout != torch.strided:
            for lst in [params, *(s for s in states if s is not None)]:
                t = lst[k]
                if (isinstance(t, torch.Tensor) and t.layout == torch.strided
                        and t.storage_offset() != 0):
                    if id(t) not in copies:
                        copies[id(t)] = (t, t.detach().clone(
                            memory_format=torch.contiguous_format))
                    lst[k] = copies[id(t)][1]
    made = reference(params, grads, states, *rest)
    with torch.no_grad():
        for t, copy in copies.values():
            t.copy_(copy)
    return made


def _stand_in(t):
    """A tensor torch's step treats as ``t`` for its checks, on its own memory.

    Same type of memory, dtype, device, sizes and strides (internal overlap
    included), conj and neg bits, and inference-ness; zeros as values,
    except a plain 1-element tensor (a step count), whose value is copied:
    torch's ZeroDivisionError for beta1 = -1 depends on it.
    """
    if not isinstance(t, torch.Tensor):
        return t  # (torch's step raises its own error for a non-tensor)
    if type(t) not in _PLAIN or t.layout != torch.strided or t.is_quantized:
        return t.clone()
    inference = t.is_inference() and not torch.is_inference_mode_enabled()
    with torch.inference_mode() if inference else contextlib.nullcontext():
        span = _facts.extent(t) // t.element_size()
        base = torch.zeros(max(span, 1), dtype=t.dtype, device=t.device)
        s = base.as_strided(t.shape, t.stride())
        if t.numel() == 1 and not (t.is_conj() or t.is_neg()):
            s.copy_(t)
        if t.is_conj():
            s = s.conj()
        if t.is_neg():
            s = torch._neg_view(s)
    return s


def _dry_run(rows, params, grads, states, steps, row_flags, reference):
    """torch's step on stand-ins of ``rows``: raises where torch's would."""
    ps, gs, ss, st, fr = _subset(rows, params, grads, states, steps, row_flags)
    reference(list(map(_stand_in, ps)), list(map(_stand_in, gs)),
              [None if s is None else list(map(_stand_in, s)) for s in ss],
              None if st is None else list(map(_stand_in, st)), fr)


def unscale_for_fallback(grads, grad_scale, found_inf) -> bool:
    """AMP for the paths that run torch's own step: True means skip the step.

    torch's for-loop refuses grad_scale/found_inf, so the grads are unscaled
    here (as GradScaler.unscale_ would) and the step is skipped on inf/NaN.
    """
    if found_inf is not None and bool(found_inf != 0):
        return True
    if grad_scale is not None:
        inv = grad_scale.double().reciprocal().float()
        for g in grads:
            g.mul_(inv.to(g.device))
    return False


def scalar(x, keep_tensor=False):
    """A hyperparameter as a Python float (Tensor lr and betas included).

    With ``keep_tensor`` (capturable) a Tensor stays a Tensor: reading it on
    the host would synchronise with the device, so the kernel reads it.
    """
    if torch.is_tensor(x):
        return x if keep_tensor else float(x.item())
    return float(x)


def backend_name(backend) -> str:
    return backend if backend in _backend.BACKENDS else _backend.requested(backend)


def check_foreach_autograd(group, params, without_params=False) -> None:
    """torch's ``_multi_tensor_*`` steps refuse ``differentiable=True``.

    A group with ``foreach=True`` (and not ``fused``) runs torch's foreach
    step, which raises before it writes anything: where it has params
    (Adam, AdamW, RMSprop: an empty list returns first), or always
    (``without_params``: Adagrad checks first). torch's SGD does not check.
    """
    if (group["differentiable"] and group.get("foreach") and not group.get("fused")
            and (params or without_params)):
        raise AssertionError("_foreach ops don't support autograd")
