r"""Fused stochastic gradient descent."""

from __future__ import annotations


import torch
from torch import Tensor
from torch.optim.optimizer import _device_dtype_check_for_fused

from . import _base, _ops, _plan
from ._precision import stored_dtype
from ._registry import Record

__all__ = ["SGD", "sgd"]


class SGD(_base.FusedOptimizer, torch.optim.SGD):
    r"""Stochastic gradient descent (optionally with momentum), fused.

    A drop-in replacement for :class:`torch.optim.SGD`: same arguments,
    defaults, errors, ``state_dict`` and results. Each :meth:`step` updates all
    tensors of one (device, dtype) bucket of a param group in one kernel call.

    .. math::
       \begin{aligned}
            &\textbf{input}: \gamma \text{ (lr)},\ \theta_0 \text{ (params)},\
                \lambda \text{ (weight decay)},\ \mu \text{ (momentum)},\
                \tau \text{ (dampening)},\ \textit{nesterov},\ \textit{maximize} \\
            &\textbf{for}\ t = 1, 2, \ldots\ \textbf{do} \\
            &\quad g_t \leftarrow \pm\nabla_\theta f_t(\theta_{t-1})
                \quad (- \text{ if maximize}) \\
            &\quad \textbf{if}\ \lambda \neq 0:\ g_t \leftarrow g_t + \lambda\theta_{t-1} \\
            &\quad \textbf{if}\ \mu \neq 0: \\
            &\qquad b_t \leftarrow g_t \ \textbf{if}\ t = 1
                \ \textbf{else}\ \mu b_{t-1} + (1-\tau) g_t \\
            &\qquad g_t \leftarrow g_t + \mu b_t \ \textbf{if nesterov else}\ b_t \\
            &\quad \theta_t \leftarrow \theta_{t-1} - \gamma g_t
       \end{aligned}

    Args:
        params (iterable): iterable of parameters or named_parameters to
            optimize, or of dicts defining parameter groups.
        lr (float, Tensor, optional): learning rate (default: 1e-3)
        momentum (float, optional): momentum factor (default: 0)
        dampening (float, optional): dampening for momentum (default: 0)
        weight_decay (float, optional): weight decay (L2 penalty) (default: 0)
        nesterov (bool, optional): enables Nesterov momentum; needs a positive
            momentum and zero dampening (default: False)
        maximize (bool, optional): maximize the objective instead of
            minimizing it (default: False)
        foreach (bool, optional): accepted for compatibility with
            torch.optim; the fused kernels always run (default: None)
        differentiable (bool, optional): autograd through the step; runs
            torch's own for-loop step, not the kernels (default: False)
        fused (bool, optional): accepted for compatibility; the kernels are
            always fused (default: None)
        capturable (bool, optional): keyword-only, not in torch's SGD. On
            CUDA, ``step()`` then makes no host synchronisation and reads a
            Tensor ``lr`` on the device, so a whole step can be captured in a
            CUDA graph. The key appears in ``param_groups`` only when True, so
            default checkpoints stay torch's (default: False)
        backend, kahan_sum, stochastic_round, state_dtype: keyword-only, as for every
            class here (see :class:`~fused_optim._base.FusedOptimizer`)

    Example:
        >>> optimizer = fused_optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        >>> optimizer.zero_grad()
        >>> loss_fn(model(input), target).backward()
        >>> optimizer.step()

    .. note::
        As in torch.optim (and unlike Sutskever et al.), the learning rate
        multiplies the whole momentum-adjusted step, and the momentum buffer
        starts as the first gradient itself, so dampening applies from the
        second step on.

    .. note::
        Sparse gradients and ``differentiable=True`` are not covered by the
        kernels; those steps run torch's own for-loop implementation.
    """

    def __init__(
        self,
        params,
        lr: float | Tensor = 1e-3,
        momentum: float = 0,
        dampening: float = 0,
        weight_decay: float | Tensor = 0,
        nesterov: bool = False,
        *,
        maximize: bool = False,
        foreach: bool | None = None,
        differentiable: bool = False,
        fused: bool | None = None,
        capturable: bool = False,
        backend: str | None = None,
        kahan_sum: bool = False,
        stochastic_round: bool = False,
        state_dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__(params, lr, momentum, dampening, weight_decay, nesterov,
                         maximize=maximize, foreach=foreach, differentiable=differentiable,
                         fused=fused, capturable=capturable, backend=backend,
                         kahan_sum=kahan_sum, stochastic_round=stochastic_round,
                         state_dtype=state_dtype)

    OPTIONS = ("capturable",) + _base.FusedOptimizer.OPTIONS

    def _init_group(self, group, params, grads, momentum_buffer_list):
        # not torch's: its Python loop runs for every param at every step;
        # one C-level map per fact here (benchmarks/step_overhead.py)
        with_grad, their_grads = _base.params_with_grads(group["params"])
        if (with_grad and group["fused"]
                and getattr(self, "_need_device_dtype_check_for_fused", True)):
            _device_dtype_check_for_fused(with_grad[0])
            self._need_device_dtype_check_for_fused = False
        if with_grad and group["fused"]:
            _check_fused_grads(with_grad, their_grads)
        params.extend(with_grad)
        grads.extend(their_grads)
        if group["momentum"] != 0:
            momentum_buffer_list.extend(
                _base.state_gets(self.state, with_grad, "momentum_buffer"))
        # torch returns whether a grad is sparse, to choose its foreach path.
        # Here the plan finds sparse grads itself (not strided: such a row
        # runs torch's for-loop), and the ~20 us a map over 161 grads costs
        # is saved at every step.
        return False

    def _group_job(self, group, found_inf):
        params: list[Tensor] = []
        grads: list[Tensor] = []
        momentum_buffer_list: list[Tensor | None] = []
        has_sparse_grad = self._init_group(group, params, grads, momentum_buffer_list)
        hyper = _hyper(group["lr"], group["weight_decay"], group["momentum"],
                       group["dampening"], group["nesterov"], group["maximize"],
                       group.get("capturable", False), group["differentiable"],
                       has_sparse_grad)
        missing = [i for i, b in enumerate(momentum_buffer_list) if b is None]
        job = _job(params, grads, momentum_buffer_list, hyper, found_inf,
                   group.get("state_dtype"))
        if job is None or not missing:
            return job, None

        def after():
            for i in missing:  # the buffers this step created
                if momentum_buffer_list[i] is not None:
                    self.state[params[i]]["momentum_buffer"] = momentum_buffer_list[i]
        return job, after

    @staticmethod
    def _traceable(hyper) -> bool:
        return not _torch_only(hyper)


def sgd(
    params: list[Tensor],
    d_p_list: list[Tensor],
    momentum_buffer_list: list[Tensor | None],
    has_sparse_grad: bool = False,
    foreach: bool | None = None,
    fused: bool | None = None,
    grad_scale: Tensor | None = None,
    found_inf: Tensor | None = None,
    *,
    weight_decay: float,
    momentum: float,
    lr: float,
    dampening: float,
    nesterov: bool,
    maximize: bool,
    backend: str | None = None,
) -> None:
    r"""Functional SGD: update ``params`` in place, as :class:`SGD` does.

    ``torch.optim.sgd.sgd``'s signature, plus the keyword ``backend``.
    ``momentum_buffer_list`` entries that are None are filled with new
    buffers. See :class:`SGD` for the arguments; ``foreach`` and ``fused`` are
    accepted for signature compatibility.
    """
    hyper = _hyper(lr, weight_decay, momentum, dampening, nesterov, maximize, False,
                   False, has_sparse_grad)
    job = _job(params, d_p_list, momentum_buffer_list, hyper, found_inf)
    if job is not None:
        SGD_STEP([job], grad_scale, found_inf, backend or "auto", _ops.NO_CACHE,
                 traceable=not _torch_only(job.hyper))


def _hyper(lr, weight_decay, momentum, dampening, nesterov, maximize, capturable,
           differentiable, has_sparse_grad):
    return dict(lr=lr, weight_decay=weight_decay, momentum=momentum, dampening=dampening,
                nesterov=nesterov, maximize=maximize, capturable=capturable,
                differentiable=differentiable, has_sparse_grad=has_sparse_grad)


def _torch_only(hyper):
    """Groups that run torch's own ops (autograd and dynamo must see them)."""
    return hyper["differentiable"] or hyper["has_sparse_grad"]


#: c10's names of the complex dtypes (the kernels' NotImplementedError)
_C10_COMPLEX = {torch.complex32: "ComplexHalf", torch.complex64: "ComplexFloat",
                torch.complex128: "ComplexDouble"}


def _check_fused_grads(params, grads):
    """What torch's _fused_sgd raises, before it writes anything.

    A sparse grad; else a complex param (only the first param met the dtype
    check): torch's fused kernel raises for the first complex (device, dtype)
    group in its grouping's order (earlier groups written: here nothing is).
    """
    if _base.any_sparse(grads):
        raise RuntimeError("`_fused_sgd` does not support sparse gradients")
    if _base.any_complex(params):
        from torch.optim.optimizer import Optimizer

        for _, dtype in Optimizer._group_tensors_by_device_and_dtype([params, grads]):
            if dtype.is_complex:
                raise NotImplementedError(
                    f"\"fused_sgd_kernel\" not implemented for '{_C10_COMPLEX[dtype]}'")


def _job(params, grads, momentum_buffer_list, hyper, found_inf, state_dtype=None):
    """A group's :class:`~fused_optim._ops.Job`, its new momentum buffers made.

    The buffers torch's loop would create this step (None entries, filled in
    place) are allocated here, before the update, which writes them whole:
    the kernels take them as state like any other, flagged in ``row_flags``. None
    means the group has nothing to do: a first momentum step that GradScaler
    skips must not leave unwritten buffers behind (the next real step is the
    first). That reads found_inf on the host, once, only while some buffer
    has yet to be created. ``state_dtype``: the group's option (the buffers'
    dtype, ``_precision.stored_dtype``).
    """
    if _torch_only(hyper):  # torch's loop creates its buffers
        return _ops.Job(params, grads, [momentum_buffer_list], [], hyper)
    if hyper["momentum"] == 0:
        return _ops.Job(params, grads, [[]], [], hyper)
    row_flags = [b is None for b in momentum_buffer_list]
    if True in row_flags:
        if found_inf is not None and bool(found_inf != 0):
            return None
        for i, new in enumerate(row_flags):
            if new:
                # zeros, not empty: the Numba kernel takes a fresh row's
                # buffer as the gradient through fma(g, 1, b * -0.0), which
                # is g exactly only for a finite, non-negative b
                # in the dtype ``state_dtype`` keeps it in: a float32 buffer
                # converted afterwards doubled the first step's peak memory
                momentum_buffer_list[i] = torch.zeros_like(
                    params[i], dtype=stored_dtype(params[i].dtype, state_dtype),
                    memory_format=torch.preserve_format)
    return _ops.Job(params, grads, [momentum_buffer_list], row_flags, hyper)


def _update(job, key, grad_scale, found_inf, backend, cache, compiled):
    """Validate one group's SGD update; return what writes it (None: nothing to do).

    Everything that can raise happens here, before any tensor is written.
    The job's ``row_flags`` flag the momentum buffers created for this step
    (see _job). ``compiled`` changes nothing for SGD.
    """
    params, d_p_list, (momentum_buffer_list,), row_flags, h, precision = job
    lr, weight_decay, momentum, dampening = (h["lr"], h["weight_decay"], h["momentum"],
                                             h["dampening"])
    nesterov, maximize, has_sparse_grad = h["nesterov"], h["maximize"], h["has_sparse_grad"]
    if has_sparse_grad or h["differentiable"]:
        def fallback():
            from torch.optim.sgd import sgd as torch_sgd  # not covered by the kernels

            if _base.unscale_for_fallback(d_p_list, grad_scale, found_inf):
                return

            def run(ps, gs, states):
                torch_sgd(ps, gs, states[0], has_sparse_grad=has_sparse_grad,
                          foreach=False, fused=False,
                          weight_decay=weight_decay, momentum=momentum, lr=lr,
                          dampening=dampening, nesterov=nesterov, maximize=maximize)

            bufs = list(momentum_buffer_list)
            _plan.with_sparse_grads_offset_free(run, list(params), d_p_list, [bufs])
            for i, b in enumerate(momentum_buffer_list):
                if b is None:  # the buffers torch made
                    momentum_buffer_list[i] = bufs[i]
        return fallback
    if not params:
        return None
    if momentum != 0:
        states = [momentum_buffer_list]
    else:
        row_flags, states = None, [[None] * len(params)]
    hyper = dict(lr=_base.scalar(lr, keep_tensor=h["capturable"]),
                 weight_decay=_base.scalar(weight_decay),
                 momentum=float(momentum), dampening=float(dampening),
                 nesterov=bool(nesterov), maximize=bool(maximize),
                 grad_scale=grad_scale, found_inf=found_inf)

    def reference(ps, gs, states, steps, flag_rows):
        # torch's for-loop, for rows the kernels do not take; a buffer to be
        # created this step goes in as None, and torch creates it
        from torch.optim.sgd import sgd as torch_sgd

        bufs = ([None if f else b for b, f in zip(states[0], flag_rows)]
                if momentum != 0 else [None] * len(ps))
        torch_sgd(ps, gs, bufs, has_sparse_grad=False, foreach=False, fused=False,
                  weight_decay=weight_decay, momentum=momentum, lr=lr,
                  dampening=dampening, nesterov=nesterov, maximize=maximize)
        return bufs if momentum != 0 else None

    return _plan.prepare_update("sgd", _base.backend_name(backend), params, d_p_list, states,
                                ("momentum_buffer",), hyper, reference, row_flags=row_flags,
                                cache=cache, key=key, precision=precision)


#: ``fused_optim::sgd_step``: a whole SGD step as one operator (see _ops)
SGD_STEP = SGD.STEP_OP = _ops.UpdateOp(
    "sgd_step", states=("momentum_buffers",),
    scalars=("lr", "weight_decay", "momentum", "dampening"),
    switches=("nesterov", "maximize", "capturable", "differentiable", "has_sparse_grad"),
    update=_update, has_row_flags=True)


RECORDS = (
    Record("SGD", "sgd", "sgd", "torch.optim.sgd", kernel="sgd", state=("momentum_buffer",),
           has_step=False),
)
