"""Behaviour shared by the fused optimizers: backend attribute, pickling,
checked state loading, and the kernel dispatch of one update."""

from __future__ import annotations

import functools
from itertools import chain, compress, repeat
from operator import attrgetter, is_, is_not

import torch
from torch.optim import Optimizer
from torch.optim import optimizer as _optimizer_module

from . import _backend, _tables


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
        if torch.autograd._profiler_enabled():
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
    * a ``load_state_dict`` that refuses state tensors whose shape does not
      match their param before anything is loaded;
    * AMP in the kernel: ``_step_supports_amp_scaling`` is set, so
      ``GradScaler`` hands over ``grad_scale`` and ``found_inf`` and the same
      kernel pass unscales the grads, or skips the whole update (params, state
      and step counts) when an inf/NaN was found, with no host
      synchronisation; :attr:`last_step_skipped` tells which.

    .. note::
        As with torch's ``fused=True`` optimizers, ``GradScaler.step`` then
        leaves ``p.grad`` scaled: call ``scaler.unscale_(optimizer)`` first
        where unscaled grads are needed (clipping, logging).
    """

    _step_supports_amp_scaling = True

    #: installed on ``step`` by torch's ``Optimizer.__init__`` (see _step_with_hooks)
    profile_hook_step = staticmethod(_step_with_hooks)

    def __init__(self, params, defaults, backend):
        self.backend = _backend.requested(backend)
        self._plans = {}  # group index -> validated _tables.Plan
        super().__init__(params, defaults)

    def __getstate__(self):
        state = super().__getstate__()
        state["backend"] = self.backend
        return state

    def __setstate__(self, state):
        super().__setstate__(state)
        if "backend" not in self.__dict__:
            self.backend = _backend.requested(None)
        # plans hold addresses of the tensors they were built for, and keep
        # their state storages alive: never copied, and dropped when
        # load_state_dict (which comes through here) replaces the state
        self._plans = {}

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

    def load_state_dict(self, state_dict):
        self._check_loaded_state(state_dict)
        super().load_state_dict(state_dict)

    def _check_loaded_state(self, state_dict):
        groups = self.param_groups
        saved_groups = state_dict.get("param_groups", [])
        if len(groups) != len(saved_groups) or any(
            len(g["params"]) != len(s["params"]) for g, s in zip(groups, saved_groups)
        ):
            return  # torch's own load_state_dict reports this mismatch
        id_map = dict(zip(chain.from_iterable(g["params"] for g in saved_groups),
                          chain.from_iterable(g["params"] for g in groups)))
        for k, pstate in state_dict.get("state", {}).items():
            param = id_map.get(k)
            if param is None or not isinstance(pstate, dict):
                continue
            for key, value in pstate.items():
                if not torch.is_tensor(value):
                    continue
                if key == "step":
                    if value.numel() != 1:
                        raise ValueError(
                            f"loaded state 'step' for parameter {k} has shape "
                            f"{tuple(value.shape)}; expected one element"
                        )
                elif value.shape != param.shape:
                    raise ValueError(
                        f"loaded state {key!r} for parameter {k} has shape "
                        f"{tuple(value.shape)} but the parameter has shape "
                        f"{tuple(param.shape)}; the checkpoint does not belong "
                        "to this model"
                    )


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
    grads = list(map(_GRAD, group_params))
    if any(map(is_, grads, repeat(None))):
        keep = list(map(is_not, grads, repeat(None)))
        return list(compress(group_params, keep)), list(compress(grads, keep))
    return list(group_params), grads


def state_values(states, key):
    """``state[key]`` of every per-param state dict (KeyError if missing, as torch)."""
    return list(map(dict.__getitem__, states, repeat(key)))


def _local(ts):
    """Local shards of DTensors (FSDP2 params, grads and state), else as given.

    The kernels update a DTensor's local shard in place, with no gather; its
    state stays DTensor-shaped, exactly as torch.optim's under FSDP2.
    """
    return [t if t is None or type(t) in _PLAIN else getattr(t, "_local_tensor", t)
            for t in ts]


def run(kind, backend, params, grads, states, roles, hyper, steps=None, fresh=None,
        cache=None, key=None):
    """Validate, pack and launch one update of ``kind`` ("sgd" or "adam")."""
    if not _PLAIN.issuperset(map(type, params)):
        params, grads = _local(params), _local(grads)
        states = [_local(s) for s in states]
    for packed in _tables.prepare(params, grads, states, roles, steps=steps,
                                  fresh=fresh, cache=cache, key=key):
        mod = _backend.select(backend, packed.device, packed.batch.dtype)
        getattr(mod, kind)(packed.batch, **hyper)
        packed.finish()
    # The kernels write through raw addresses, which autograd cannot see. As
    # torch's for-loop does, count the in-place update of every param, so a
    # backward through a graph that saved a param before step() raises
    # instead of silently using the new values. (State tensors are never in a
    # graph; they are left alone.)
    torch._C._increment_version(params)


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


def check_fused_device_dtype(p) -> None:
    """torch's ``fused=True`` rule: floating-point params on a fused device."""
    try:
        from torch.optim.optimizer import _get_fused_kernels_supported_devices
        devices = _get_fused_kernels_supported_devices()
    except ImportError:  # older torch
        devices = ["mps", "cuda", "xpu", "hpu", "cpu"]
    if not (p.device.type in devices and torch.is_floating_point(p)):
        raise RuntimeError(
            "`fused=True` requires all the params to be floating point Tensors of "
            f"supported devices: {devices} but {p.dtype} and {p.device.type}"
        )
