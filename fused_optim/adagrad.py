r"""Fused Adagrad."""

from __future__ import annotations

import torch
from torch import Tensor
from torch.optim.optimizer import _device_dtype_check_for_fused

from . import _base, _ops, _plan
from ._registry import Record

__all__ = ["Adagrad", "adagrad"]


#: the kernels' ``lr_round`` code of a Tensor lr's dtype: torch's loop computes
#: ``lr / (1 + (step - 1) * lr_decay)`` in that dtype (float16/bfloat16: in
#: float32, rounded to it); 0: float64, as for a float lr
_LR_ROUND = {torch.float32: 1, torch.bfloat16: 2, torch.float16: 3}


class Adagrad(_base.FusedOptimizer, torch.optim.Adagrad):
    r"""Adagrad, fused.

    A drop-in replacement for :class:`torch.optim.Adagrad`: same arguments,
    defaults, errors, ``state_dict`` and results. Each :meth:`step` updates all
    tensors of one (device, dtype) bucket of a param group in one kernel call,
    each with its own step count.

    .. math::
       \begin{aligned}
            &\textbf{input}: \gamma \text{ (lr)},\ \theta_0,\ \lambda \text{ (weight decay)},\
                \tau \text{ (initial accumulator value)},\ \eta \text{ (lr decay)},\
                \epsilon,\ \textit{maximize} \\
            &\textbf{initialize}: state\_sum_0 \leftarrow \tau \\
            &\textbf{for}\ t = 1, 2, \ldots\ \textbf{do} \\
            &\quad g_t \leftarrow \pm\nabla_\theta f_t(\theta_{t-1})
                \quad (- \text{ if maximize}) \\
            &\quad \tilde\gamma \leftarrow \gamma / (1 + (t-1)\eta) \\
            &\quad \textbf{if}\ \lambda \neq 0:\ g_t \leftarrow g_t + \lambda\theta_{t-1} \\
            &\quad state\_sum_t \leftarrow state\_sum_{t-1} + g_t^2 \\
            &\quad \theta_t \leftarrow \theta_{t-1}
                - \tilde\gamma\, g_t \big/ \big(\sqrt{state\_sum_t} + \epsilon\big)
       \end{aligned}

    Args:
        params (iterable): iterable of parameters or named_parameters to
            optimize, or of dicts defining parameter groups.
        lr (float, Tensor, optional): learning rate (default: 1e-2)
        lr_decay (float, optional): learning rate decay (default: 0)
        weight_decay (float, optional): weight decay (L2 penalty) (default: 0)
        initial_accumulator_value (float, optional): initial value of the
            sum of squares of gradients (default: 0)
        eps (float, optional): term added to the denominator (default: 1e-10)
        foreach (bool, optional): accepted for compatibility (default: None)
        maximize (bool, optional): maximize the objective (default: False)
        differentiable (bool, optional): autograd through the step; runs
            torch's own for-loop step, not the kernels (default: False)
        fused (bool, optional): accepted for compatibility; the kernels are
            always fused (default: None)
        backend, kahan_sum, stochastic_round, state_dtype: keyword-only, as for every
            class here (see :class:`~fused_optim._base.FusedOptimizer`)

    .. note::
        Each param's ``clr`` is computed from its own ``step`` as torch's
        for-loop does: in float64 for a float ``lr`` (Python's arithmetic),
        in the lr's dtype for a Tensor ``lr`` (torch's Tensor division;
        float16/bfloat16 in float32, rounded to it); element math runs in
        float32 (float64 for float64 tensors) with one rounding per stored
        value. Rows with sparse gradients run torch's own for-loop step.
    """

    def __init__(
        self,
        params,
        lr: float | Tensor = 1e-2,
        lr_decay: float = 0,
        weight_decay: float = 0,
        initial_accumulator_value: float = 0,
        eps: float = 1e-10,
        foreach: bool | None = None,
        *,
        maximize: bool = False,
        differentiable: bool = False,
        fused: bool | None = None,
        backend: str | None = None,
        kahan_sum: bool = False,
        stochastic_round: bool = False,
        state_dtype: torch.dtype | None = None,
    ) -> None:
        # (torch's __init__ creates every param's state, not lazily)
        super().__init__(params, lr, lr_decay, weight_decay, initial_accumulator_value, eps,
                         foreach, maximize=maximize, differentiable=differentiable,
                         fused=fused, backend=backend, kahan_sum=kahan_sum,
                         stochastic_round=stochastic_round,
                         state_dtype=state_dtype)

    def _init_group(self, group, params_with_grad, grads, state_sums, state_steps):
        # not torch's: one C-level map per fact (see _base._gather_state);
        # torch's __init__ made the state of the params given to it
        with_grad, their_grads = _base.params_with_grads(group["params"])
        if not with_grad:
            return False, False
        if group["fused"] and getattr(self, "_need_device_dtype_check_for_fused", True):
            _device_dtype_check_for_fused(with_grad[0])
            self._need_device_dtype_check_for_fused = False
        sums, steps = self._gather_state(group, with_grad, ("sum", "step"))
        params_with_grad.extend(with_grad)
        grads.extend(their_grads)
        state_sums.extend(sums)
        state_steps.extend(steps)
        has_sparse_grad = _base.any_sparse(their_grads)
        if group["fused"] and (has_sparse_grad or _base.any_complex(with_grad)):
            # torch's _fused_adagrad, before it writes anything (only the first
            # param met the dtype check above)
            raise RuntimeError("`fused` does not support sparse grad or complex param")
        # only torch's own step (differentiable) reads has_complex; the
        # kernels see each tensor's dtype
        has_complex = group["differentiable"] and any(map(torch.is_complex, with_grad))
        return has_sparse_grad, has_complex

    STATE_LISTS = 2  # state_sums, state_steps

    def _check_foreach(self, group, params, states) -> None:
        # (torch's _multi_tensor_adagrad checks before its empty-list return)
        _base.check_foreach_autograd(group, params, without_params=True)

    @staticmethod
    def _hyper(group, found) -> dict:
        has_sparse_grad, has_complex = found
        return _hyper(group["lr"], group["lr_decay"], group["weight_decay"], group["eps"],
                      group["maximize"], group["differentiable"], has_sparse_grad, has_complex)


def adagrad(
    params: list[Tensor],
    grads: list[Tensor],
    state_sums: list[Tensor],
    state_steps: list[Tensor],
    fused: bool | None = None,
    grad_scale: Tensor | None = None,
    found_inf: Tensor | None = None,
    has_sparse_grad: bool = False,
    foreach: bool | None = None,
    differentiable: bool = False,
    has_complex: bool = False,
    *,
    lr: float | Tensor,
    weight_decay: float,
    lr_decay: float,
    eps: float,
    maximize: bool,
    backend: str | None = None,
) -> None:
    r"""Functional Adagrad: update params and state in place, as :class:`Adagrad` does.

    See :class:`Adagrad` for the arguments. ``state_steps`` are advanced by one.
    """
    job = _ops.Job(params, grads, [state_sums, state_steps], [],
                   _hyper(lr, lr_decay, weight_decay, eps, maximize, differentiable,
                          has_sparse_grad, has_complex))
    ADAGRAD_STEP([job], grad_scale, found_inf, backend or "auto", _ops.NO_CACHE,
                 traceable=not differentiable)


def _hyper(lr, lr_decay, weight_decay, eps, maximize, differentiable, has_sparse_grad,
           has_complex):
    return dict(lr=lr, lr_decay=lr_decay, weight_decay=weight_decay, eps=eps,
                maximize=maximize, differentiable=differentiable,
                has_sparse_grad=has_sparse_grad, has_complex=has_complex)


def _update(job, key, grad_scale, found_inf, backend, cache, compiled):
    """Validate one group's Adagrad update; return what writes it (None: nothing to do).

    Everything that can raise happens here, before any tensor is written.
    """
    params, grads, (state_sums, state_steps), _, h, precision = job
    lr, lr_decay, weight_decay, eps = h["lr"], h["lr_decay"], h["weight_decay"], h["eps"]
    maximize, differentiable = h["maximize"], h["differentiable"]
    has_sparse_grad, has_complex = h["has_sparse_grad"], h["has_complex"]
    if not all(isinstance(t, torch.Tensor) for t in state_steps):
        raise RuntimeError(
            "API has changed, `state_steps` argument must contain a list of singleton tensors"
        )
    name = _base.backend_name(backend)
    if differentiable:
        # not covered by the kernels: torch's own for-loop
        def fallback():
            from torch.optim.adagrad import adagrad as torch_adagrad

            if _base.unscale_for_fallback(grads, grad_scale, found_inf):
                return

            def run(ps, gs, states, steps):
                torch_adagrad(ps, gs, states[0], steps, fused=False, foreach=False,
                              has_sparse_grad=has_sparse_grad, differentiable=True,
                              has_complex=has_complex, lr=lr, weight_decay=weight_decay,
                              lr_decay=lr_decay, eps=eps, maximize=maximize)

            _plan.with_sparse_grads_offset_free(run, list(params), list(grads),
                                                [list(state_sums)], list(state_steps))
        return fallback
    if not params:
        return None
    # torch's lr / (1 + (step - 1) * lr_decay) raises ZeroDivisionError for a
    # float lr where an lr_decay edited below 0 zeroes the denominator (after
    # it has advanced the step); the dry run raises it first
    dry_all = not torch.is_tensor(lr) and float(lr_decay) < 0
    hyper = dict(lr=_base.scalar(lr), lr_decay=float(lr_decay), eps=float(eps),
                 weight_decay=_base.scalar(weight_decay), maximize=bool(maximize),
                 # torch divides a Tensor lr as a Tensor: in its dtype
                 lr_round=_LR_ROUND.get(lr.dtype, 0) if torch.is_tensor(lr) else 0,
                 grad_scale=grad_scale, found_inf=found_inf)

    def reference(ps, gs, states, steps, flag_rows):
        # torch's for-loop, for rows the kernels do not take (sparse grads...)
        from torch.optim.adagrad import adagrad as torch_adagrad

        torch_adagrad(ps, gs, states[0], steps, fused=False, foreach=False,
                      has_sparse_grad=any(g.is_sparse for g in gs), differentiable=False,
                      has_complex=any(map(torch.is_complex, ps)), lr=lr,
                      weight_decay=weight_decay, lr_decay=lr_decay, eps=eps,
                      maximize=maximize)

    return _plan.prepare_update("adagrad", name, params, grads, [state_sums], ("sum",),
                                hyper, reference, steps=state_steps, cache=cache, key=key,
                                precision=precision, dry_all=dry_all)


#: ``fused_optim::adagrad_step``: a whole Adagrad step as one operator (see _ops)
ADAGRAD_STEP = Adagrad.STEP_OP = _ops.UpdateOp(
    "adagrad_step", states=("state_sums", "state_steps"),
    scalars=("lr", "lr_decay", "weight_decay", "eps"),
    switches=("maximize", "differentiable", "has_sparse_grad", "has_complex"),
    update=_update)


RECORDS = (
    Record("Adagrad", "adagrad", "adagrad", "torch.optim.adagrad", kernel="adagrad",
           state=("sum",), has_step=True),
)
