r"""Fused Adadelta."""

from __future__ import annotations

import torch
from torch import Tensor

from . import _backend, _base, _ops, _plan
from ._registry import Record

__all__ = ["Adadelta", "adadelta"]


class Adadelta(_base.FusedOptimizer, torch.optim.Adadelta):
    r"""Adadelta, fused.

    A drop-in replacement for :class:`torch.optim.Adadelta`: same arguments,
    defaults, errors, ``state_dict`` and results. Each :meth:`step` updates
    all tensors of one (device, dtype) bucket of a param group in one kernel
    call, and advances each param's own ``step`` count.

    .. math::
       \begin{aligned}
            &\textbf{input}: \gamma \text{ (lr)},\ \theta_0,\ \rho \text{ (decay)},\
                \lambda \text{ (weight decay)},\ \epsilon \\
            &\textbf{initialize}: v_0 \leftarrow 0,\ u_0 \leftarrow 0 \\
            &\textbf{for}\ t = 1, 2, \ldots\ \textbf{do} \\
            &\quad g_t \leftarrow \pm\nabla_\theta f_t(\theta_{t-1})
                \quad (- \text{ if maximize}) \\
            &\quad \textbf{if}\ \lambda \neq 0:\ g_t \leftarrow g_t + \lambda\theta_{t-1} \\
            &\quad v_t \leftarrow \rho v_{t-1} + (1-\rho) g_t^2 \\
            &\quad \Delta_t \leftarrow \sqrt{u_{t-1} + \epsilon} / \sqrt{v_t + \epsilon}\ g_t \\
            &\quad u_t \leftarrow \rho u_{t-1} + (1-\rho) \Delta_t^2 \\
            &\quad \theta_t \leftarrow \theta_{t-1} - \gamma \Delta_t
       \end{aligned}

    Args:
        params (iterable): iterable of parameters or named_parameters to
            optimize, or of dicts defining parameter groups.
        lr (float, Tensor, optional): coefficient that scales delta before it
            is applied to the parameters (default: 1.0)
        rho (float, optional): coefficient of the running averages of squared
            gradients and updates (default: 0.9)
        eps (float, optional): term added to the denominator to improve
            numerical stability (default: 1e-6)
        weight_decay (float, optional): weight decay (L2 penalty) (default: 0)
        foreach (bool, optional): accepted for compatibility (default: None)
        capturable (bool, optional): on CUDA, a step with no host
            synchronisation that a CUDA graph can capture: step counters live
            on the device and a Tensor ``lr`` is read by the kernel. On CPU,
            torch's own step runs and raises as torch does (default: False)
        maximize (bool, optional): maximize the objective (default: False)
        differentiable (bool, optional): autograd through the step; runs
            torch's own for-loop step, not the kernels (default: False)
        backend, kahan_sum, stochastic_round, state_dtype: keyword-only, as for every
            class here (see :class:`~fused_optim._base.FusedOptimizer`)

    .. note::
        Element math runs in float32 (float64 for float64 tensors) with one
        rounding per stored value, so bf16/fp16 training is more accurate
        than torch's for-loop, which rounds every intermediate.
    """

    def __init__(
        self,
        params,
        lr: float | Tensor = 1.0,
        rho: float = 0.9,
        eps: float = 1e-6,
        weight_decay: float = 0,
        foreach: bool | None = None,
        *,
        capturable: bool = False,
        maximize: bool = False,
        differentiable: bool = False,
        backend: str | None = None,
        kahan_sum: bool = False,
        stochastic_round: bool = False,
        state_dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__(params, lr, rho, eps, weight_decay, foreach, capturable=capturable,
                         maximize=maximize, differentiable=differentiable, backend=backend,
                         kahan_sum=kahan_sum, stochastic_round=stochastic_round,
                         state_dtype=state_dtype)

    CAPTURE_HEALTH_CHECK = True

    def _init_group(self, group, params_with_grad, grads, square_avgs, acc_deltas,
                    state_steps):
        # not torch's: one C-level map per fact (see _base._gather_state)
        with_grad, their_grads = _base.params_with_grads(group["params"])
        if not with_grad:
            return False
        found = self._gather_state(group, with_grad, ("square_avg", "acc_delta", "step"),
                                   torchs_raises=_base.any_sparse(their_grads))
        params_with_grad.extend(with_grad)
        grads.extend(their_grads)
        square_avgs.extend(found[0])
        acc_deltas.extend(found[1])
        state_steps.extend(found[2])
        # only torch's own step (differentiable, or capturable CPU params)
        # reads has_complex; the kernels see each tensor's dtype
        if group["differentiable"] or group["capturable"]:
            return any(map(torch.is_complex, with_grad))
        return False

    STATE_LISTS = 3  # square_avgs, acc_deltas, state_steps

    def _check_foreach(self, group, params, states) -> None:
        # (torch's _multi_tensor_adadelta checks before its empty-list return)
        _base.check_foreach_autograd(group, params, without_params=True)

    @staticmethod
    def _hyper(group, has_complex) -> dict:
        return _hyper(group["lr"], group["rho"], group["eps"], group["weight_decay"],
                      group["maximize"], group["capturable"], group["differentiable"],
                      has_complex)


def adadelta(
    params: list[Tensor],
    grads: list[Tensor],
    square_avgs: list[Tensor],
    acc_deltas: list[Tensor],
    state_steps: list[Tensor],
    capturable: bool = False,
    foreach: bool | None = None,
    differentiable: bool = False,
    has_complex: bool = False,
    *,
    lr: float | Tensor,
    rho: float,
    eps: float,
    weight_decay: float,
    maximize: bool,
    backend: str | None = None,
) -> None:
    r"""Functional Adadelta: update params and state in place, as :class:`Adadelta` does.

    Same arguments as ``torch.optim.adadelta.adadelta`` (see :class:`Adadelta`),
    plus ``backend``. ``state_steps`` are advanced by one.
    """
    if not torch.compiler.is_compiling() and not all(
            isinstance(t, torch.Tensor) for t in state_steps):
        raise RuntimeError(
            "API has changed, `state_steps` argument must contain a list of singleton tensors"
        )
    job = _ops.Job(params, grads, [square_avgs, acc_deltas, state_steps], [],
                   _hyper(lr, rho, eps, weight_decay, maximize, capturable, differentiable,
                          has_complex))
    ADADELTA_STEP([job], None, None, backend or "auto", _ops.NO_CACHE,
                  traceable=not differentiable)


def _hyper(lr, rho, eps, weight_decay, maximize, capturable, differentiable, has_complex):
    return dict(lr=lr, rho=rho, eps=eps, weight_decay=weight_decay, maximize=maximize,
                capturable=capturable, differentiable=differentiable, has_complex=has_complex)


def _update(job, key, grad_scale, found_inf, backend, cache, compiled):
    """Validate one group's Adadelta update; return what writes it (None: nothing to do).

    Everything that can raise happens here, before any tensor is written.
    """
    params, grads, (square_avgs, acc_deltas, state_steps), _, h, precision = job
    if compiled:
        h = _base.compiled_semantics(h, params)
    lr, rho, eps, weight_decay = h["lr"], h["rho"], h["eps"], h["weight_decay"]
    maximize, capturable, differentiable, has_complex = (
        h["maximize"], h["capturable"], h["differentiable"], h["has_complex"])
    name = _base.backend_name(backend)
    cpu_capturable = capturable and any(p.device.type == "cpu" for p in params)
    if differentiable or (cpu_capturable and not _backend.stands_in_for_gpu(name)):
        # not covered by the kernels: torch's own for-loop (which also raises
        # torch's error for capturable CPU params)
        def fallback():
            from torch.optim.adadelta import adadelta as torch_adadelta

            if _base.unscale_for_fallback(grads, grad_scale, found_inf):
                return
            torch_adadelta(params, grads, square_avgs, acc_deltas, state_steps,
                           capturable=capturable, foreach=False,
                           differentiable=differentiable, has_complex=has_complex, lr=lr,
                           rho=rho, eps=eps, weight_decay=weight_decay, maximize=maximize)
        return fallback
    if not params:
        return None
    # capturable keeps a Tensor lr on the device, for the kernel to read
    hyper = dict(lr=_base.scalar(lr, keep_tensor=capturable), rho=_base.scalar(rho),
                 eps=float(eps), weight_decay=_base.scalar(weight_decay),
                 maximize=bool(maximize), grad_scale=grad_scale, found_inf=found_inf)

    def reference(ps, gs, states, steps, flag_rows):
        # torch's for-loop, for rows the kernels do not take
        from torch.optim.adadelta import adadelta as torch_adadelta

        torch_adadelta(ps, gs, states[0], states[1], steps, capturable=capturable,
                       foreach=False, differentiable=False,
                       has_complex=any(map(torch.is_complex, ps)), lr=lr, rho=rho, eps=eps,
                       weight_decay=weight_decay, maximize=maximize)

    return _plan.prepare_update("adadelta", name, params, grads, [square_avgs, acc_deltas],
                                ("square_avg", "acc_delta"), hyper, reference,
                                steps=state_steps, cache=cache, key=key, precision=precision)


#: ``fused_optim::adadelta_step``: a whole Adadelta step as one operator (see _ops)
ADADELTA_STEP = Adadelta.STEP_OP = _ops.UpdateOp(
    "adadelta_step", states=("square_avgs", "acc_deltas", "state_steps"),
    scalars=("lr", "rho", "eps", "weight_decay"),
    switches=("maximize", "capturable", "differentiable", "has_complex"),
    update=_update)


RECORDS = (
    Record("Adadelta", "adadelta", "adadelta", "torch.optim.adadelta", kernel="adadelta",
           state=("square_avg", "acc_delta"), has_step=True),
)
