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

from . import _backend, _ops, _precision, _plan, _warmup


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
    sixth of the whole per-step overhead on resnet50-shaped lists. Without
    hooks or a profiler the step is called directly (one frame fewer).
    """

    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        self = args[0]
        # (dynamo cannot trace the bool _profiler_enabled returns: skipped
        # while compiling, where torch ignores record_function anyway)
        if (_optimizer_module._global_optimizer_pre_hooks or self._optimizer_step_pre_hooks
                or _optimizer_module._global_optimizer_post_hooks
                or self._optimizer_step_post_hooks
                or (not torch.compiler.is_compiling() and torch.autograd._profiler_enabled())):
            return _hooked_call(func, self, args, kwargs)
        out = func(*args, **kwargs)
        self._optimizer_step_code()
        return out

    return wrapper


def _hooked_call(func, self, args, kwargs):
    profiling = not torch.compiler.is_compiling() and torch.autograd._profiler_enabled()
    with (torch.autograd.profiler.record_function(
            f"Optimizer.step#{self.__class__.__name__}.step") if profiling
          else contextlib.nullcontext()):
        for pre_hook in chain(_optimizer_module._global_optimizer_pre_hooks.values(),
                              self._optimizer_step_pre_hooks.values()):
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
        for post_hook in chain(self._optimizer_step_post_hooks.values(),
                               _optimizer_module._global_optimizer_post_hooks.values()):
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
    * ``state_dtype`` (torch.dtype, optional): None (torch's state), or
      ``torch.bfloat16``: the state of float32 and bfloat16 params (Adam's
      moments, momentum buffers, ...) is stored in bfloat16, each store
      rounded stochastically from the same stream; math stays float32
      (default: None)
    * ``state_bits`` (int, optional; Adam and AdamW): None (torch's state), or
      8: blockwise 8-bit moments for float32/bfloat16 params of 4096
      elements or more (``kernels/reference/_blockwise.py``); not with
      ``state_dtype`` (default: None)

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
        self._plans = _plan.PlanCache()  # group index -> validated _plan.Plan
        self._handle = _ops.register_optimizer(self)  # how the step operator finds _plans
        on = {name: True for name in self.OPTIONS if kwargs.pop(name, False)}
        state_dtype = _precision.check_state_dtype(kwargs.pop("state_dtype", None))
        if state_dtype is not None:
            on["state_dtype"] = state_dtype
        state_bits = _precision.check_state_bits(kwargs.pop("state_bits", None))
        if state_bits is not None:
            if state_dtype is not None:
                raise ValueError("state_bits and state_dtype do not combine: choose one")
            on["state_bits"] = state_bits
        with _precision.fresh_state(state_dtype):  # (Adagrad makes its state here)
            super().__init__(params, *args, **kwargs)
        if state_dtype is not None and self.defaults.get("differentiable"):
            # (torch's own step, which autograd needs, keeps torch's state)
            raise ValueError("state_dtype does not combine with differentiable=True")
        if state_bits is not None and self.defaults.get("differentiable"):
            raise ValueError("state_bits does not combine with differentiable=True")
        if on:
            self.defaults.update(on)  # (and so to add_param_group's groups)
            for group in self.param_groups:
                for name, value in on.items():
                    group.setdefault(name, value)
        if on.get("stochastic_round") or state_dtype is not None or state_bits is not None:
            _precision.start_stream(self)  # seeded now, reproducibly after torch.manual_seed
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
        self._plans = _plan.PlanCache(getattr(old, "graph_owned", None))
        if "_handle" not in self.__dict__:  # unpickled or copied (load_state_dict keeps it)
            self._handle = _ops.register_optimizer(self)

    #: how many per-param lists the class's ``_init_group`` fills after
    #: params and grads, in torch's order: the Job's state lists, the last
    #: of them the step counters
    STATE_LISTS = 0

    def _group_job(self, group, found_inf):
        """One group's work for this step: torch's ``_init_group`` lists as a Job.

        Returns:
            ``(job, after)``: the group's ``_ops.Job`` (None when it has
            nothing to do) and a callable run after the update (None: none),
            e.g. to store the state the update created (SGD's buffers).
        """
        params, grads = [], []
        states = [[] for _ in range(self.STATE_LISTS)]
        found = self._init_group(group, params, grads, *states)
        self._check_foreach(group, params, states)
        if found_inf is not None and not torch.compiler.is_compiling():
            self._steps_to_device(params, states)
        return _ops.Job(params, grads, states, [], self._hyper(group, found)), None

    def _check_foreach(self, group, params, states) -> None:
        """What torch's foreach step checks before it writes (see
        :func:`check_foreach_autograd`)."""
        check_foreach_autograd(group, params)

    @staticmethod
    def _hyper(group, found) -> dict:
        """The Job's hyperparameters from ``group`` and what ``_init_group``
        returned (``found``: has_complex, has_sparse_grad)."""
        raise NotImplementedError

    #: per-param scalar state placed as the step counter (NAdam's mu_product),
    #: as ``(key, index of its list in _init_group's lists)``: it moves with it
    SCALAR_STATE: tuple = ()

    def _steps_to_device(self, params, states):
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
        found_inf (correct, one sync). ``states`` are the job's state lists,
        the counters last; the ``SCALAR_STATE`` move with their counter (the
        kernels take a row whose scalars are placed as its step).
        """
        state_steps = states[-1]
        if not state_steps or not any(
                s.device.type == "cpu" and p.device.type == "cuda"
                for p, s in ((params[0], state_steps[0]), (params[-1], state_steps[-1]))):
            return
        state = self.state
        for i, (p, s) in enumerate(zip(params, state_steps)):
            if s.device.type == "cpu" and p.device.type == "cuda" and not s.requires_grad:
                moved = torch.full((), float(s), dtype=s.dtype, device=p.device)
                state[p]["step"] = state_steps[i] = moved
                for key, k in self.SCALAR_STATE:
                    t = states[k][i]
                    if t.device.type == "cpu" and not t.requires_grad:
                        state[p][key] = states[k][i] = torch.full(
                            (), float(t), dtype=t.dtype, device=p.device)

    def _torchs_init_group(self, group) -> None:
        """torch's own ``_init_group`` on ``group``, the lists it fills thrown away.

        Creates the lazy state torch's loop creates and raises the error it
        raises first, param by param, in its order: the cold path of the
        subclasses' per-step ``_init_group`` (see ``_gather_state``).
        """
        init_group = super()._init_group  # the torch class's, next in the MRO
        lists = len(inspect.signature(init_group).parameters) - 1  # those after group
        with _precision.fresh_state(group.get("state_dtype")):
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

    def step(self, closure=None):
        """Perform a single optimization step.

        Args:
            closure (Callable, optional): A closure that reevaluates the model
                and returns the loss.
        """
        # torch's skeleton: autograd on only for a differentiable optimizer
        # (torch's _use_grad_for_differentiable, inline), the closure,
        # GradScaler's arguments, every group's job, one update of them all
        prev = torch.is_grad_enabled()
        want = self.defaults["differentiable"]
        if prev != want:
            torch._C._set_grad_enabled(want)
        try:
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
            # GradScaler's tensors: attributes it sets and deletes
            grad_scale = getattr(self, "grad_scale", None)
            found_inf = self._last_found_inf = getattr(self, "found_inf", None)
            update = self.STEP_OP.update
            jobs, afters = [], []
            rounded = False
            for group in self.param_groups:
                try:
                    job, after = self._group_job(group, found_inf)
                    if job is not None and any(map(group.get, _precision.KEYS)):
                        more, made = _precision.attach(self, job, group)
                        job = more.pop()
                        jobs.extend(more)
                        if made is not None:
                            afters.append(made)
                        rounded = rounded or bool(group.get("stochastic_round")) or (
                            group.get("state_dtype") is not None) or (
                            group.get("state_bits") is not None)
                except Exception:
                    # torch's loop steps each group before it reads the next,
                    # so an error in an earlier group's update comes first:
                    # those are checked (nothing is written) before this one
                    # is raised
                    if jobs and not torch.compiler.is_compiling():
                        _plan.validate(update, jobs, grad_scale, found_inf, self.backend,
                                       self._plans)
                    raise
                if job is not None:
                    jobs.append(job)
                if after is not None:
                    afters.append(after)
            if jobs:
                if (_ops.DISPATCH_EAGER or torch.compiler.is_compiling()
                        or _ops.compile_active()):
                    self.STEP_OP(jobs, grad_scale, found_inf, self.backend, self._handle,
                                 traceable=all([self._traceable(job.hyper) for job in jobs]))
                else:
                    _plan.run(update, jobs, grad_scale, found_inf, self.backend, self._plans)
            for after in afters:
                after()
            if rounded:
                _precision.advance(self, found_inf)
            return loss
        finally:
            if prev != want:
                torch._C._set_grad_enabled(prev)

    #: the step without torch's hooks or profiler range (torch wraps the
    #: class's ``step`` in ``profile_hook_step`` at the first construction):
    #: the warm-up's shadow steps (fused_optim/_warmup.py)
    _step = step

    @property
    def last_step_skipped(self) -> bool:
        """True if the last ``step()`` was skipped because GradScaler found inf/NaN.

        Reading it synchronises with the device (the step itself does not).
        Torch's fused optimizers hide this, and schedulers advance anyway;
        ``if not opt.last_step_skipped: scheduler.step()`` avoids that.
        """
        found_inf = getattr(self, "_last_found_inf", None)
        return found_inf is not None and bool(found_inf != 0)


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


def compiled_semantics(hyper, params):
    """A job's ``hyper`` as torch's compiled step reads it.

    Dynamo traces every group with ``capturable`` True, and torch's step
    then skips its device check; on CPU params the update is the same, so
    a traced CPU group runs as an eager one, on the kernels.
    """
    if hyper["capturable"] and any(p.device.type == "cpu" for p in params):
        hyper = dict(hyper, capturable=False)
    return hyper


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
