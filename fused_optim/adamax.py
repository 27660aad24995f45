r"""Fused Adamax."""

from __future__ import annotations

import torch
from torch import Tensor

from . import _backend, _base, _ops, _plan
from ._registry import Record

__all__ = ["Adamax", "adamax"]

#: the kernels' ``lr_round`` code of a Tensor lr's dtype: torch's loop computes
#: clr = lr / bias_correction in it (kernels/steps.py's LR_F64 ... LR_F16)
_LR_ROUND = {torch.float32: 1, torch.bfloat16: 2, torch.float16: 3}


class Adamax(_base.FusedOptimizer, torch.optim.Adamax):
    r"""Adamax (Adam with the infinity norm), fused.

    A drop-in replacement for :class:`torch.optim.Adamax`: same arguments,
    defaults, errors, ``state_dict`` and results. Each :meth:`step` updates
    all tensors of one (device, dtype) bucket of a param group in one kernel
    call, and advances each param's own ``step`` count.

    .. math::
       \begin{aligned}
            &\textbf{input}: \gamma \text{ (lr)},\ \beta_1, \beta_2 \text{ (betas)},\
                \theta_0,\ \lambda \text{ (weight decay)},\ \epsilon \\
            &\textbf{initialize}: m_0 \leftarrow 0,\ u_0 \leftarrow 0 \\
            &\textbf{for}\ t = 1, 2, \ldots\ \textbf{do} \\
            &\quad g_t \leftarrow \pm\nabla_\theta f_t(\theta_{t-1})
                \quad (- \text{ if maximize}) \\
            &\quad \textbf{if}\ \lambda \neq 0:\ g_t \leftarrow g_t + \lambda\theta_{t-1} \\
            &\quad m_t \leftarrow \beta_1 m_{t-1} + (1-\beta_1) g_t \\
            &\quad u_t \leftarrow \max(\beta_2 u_{t-1}, |g_t| + \epsilon) \\
            &\quad \theta_t \leftarrow \theta_{t-1} - \frac{\gamma}{1-\beta_1^t}\, m_t / u_t
       \end{aligned}

    Args:
        params (iterable): iterable of parameters or named_parameters to
            optimize, or of dicts defining parameter groups.
        lr (float, Tensor, optional): learning rate (default: 2e-3)
        betas (tuple[float, float], optional): coefficients of the running
            average of the gradient and of the infinity norm (default: (0.9, 0.999))
        eps (float, optional): term added to the denominator for numerical
            stability (default: 1e-8)
        weight_decay (float, optional): weight decay (L2 penalty) (default: 0)
        foreach (bool, optional): accepted for compatibility (default: None)
        maximize (bool, optional): maximize the objective (default: False)
        differentiable (bool, optional): autograd through the step; runs
            torch's own for-loop step, not the kernels (default: False)
        capturable (bool, optional): on CUDA, a step with no host
            synchronisation that a CUDA graph can capture: step counters live
            on the device and a Tensor ``lr`` is read by the kernel. On CPU,
            torch's own step runs and raises as torch does (default: False)
        backend, kahan_sum, stochastic_round, state_dtype: keyword-only, as for every
            class here (see :class:`~fused_optim._base.FusedOptimizer`)

    .. note::
        Each row's ``lr / (1 - beta1**step)`` is computed as torch's loop
        computes it (float64, or a Tensor lr's dtype); element math runs in
        float32 (float64 for float64 tensors) with one rounding per stored
        value, so bf16/fp16 training is more accurate than torch's for-loop.
    """

    def __init__(
        self,
        params,
        lr: float | Tensor = 2e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0,
        foreach: bool | None = None,
        *,
        maximize: bool = False,
        differentiable: bool = False,
        capturable: bool = False,
        backend: str | None = None,
        kahan_sum: bool = False,
        stochastic_round: bool = False,
        state_dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__(params, lr, betas, eps, weight_decay, foreach, maximize=maximize,
                         differentiable=differentiable, capturable=capturable,
                         backend=backend, kahan_sum=kahan_sum,
                         stochastic_round=stochastic_round,
                         state_dtype=state_dtype)

    CAPTURE_HEALTH_CHECK = True

    def _init_group(self, group, params, grads, exp_avgs, exp_infs, state_steps):
        # not torch's: one C-level map per fact (see _base._gather_state)
        with_grad, their_grads = _base.params_with_grads(group["params"])
        if not with_grad:
            return False
        found = self._gather_state(group, with_grad, ("exp_avg", "exp_inf", "step"),
                                   torchs_raises=_base.any_sparse(their_grads))
        params.extend(with_grad)
        grads.extend(their_grads)
        exp_avgs.extend(found[0])
        exp_infs.extend(found[1])
        state_steps.extend(found[2])
        # only torch's own step (differentiable, or capturable CPU params)
        # reads has_complex; the kernels see each tensor's dtype
        if group["differentiable"] or group["capturable"]:
            return any(map(torch.is_complex, with_grad))
        return False

    STATE_LISTS = 3  # exp_avgs, exp_infs, state_steps

    def _check_foreach(self, group, params, states) -> None:
        # torch's _multi_tensor_adamax refuses autograd before it looks at params
        _base.check_foreach_autograd(group, params, without_params=True)

    @staticmethod
    def _hyper(group, has_complex) -> dict:
        beta1, beta2 = group["betas"]
        return _hyper(group["lr"], beta1, beta2, group["eps"], group["weight_decay"],
                      group["maximize"], group["capturable"], group["differentiable"],
                      has_complex)


def adamax(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    exp_infs: list[Tensor],
    state_steps: list[Tensor],
    foreach: bool | None = None,
    maximize: bool = False,
    differentiable: bool = False,
    capturable: bool = False,
    has_complex: bool = False,
    *,
    eps: float,
    beta1: float,
    beta2: float,
    lr: float,
    weight_decay: float,
    backend: str | None = None,
) -> None:
    r"""Functional Adamax: update params and state in place, as :class:`Adamax` does.

    Same arguments as ``torch.optim.adamax.adamax`` (see :class:`Adamax`),
    plus ``backend``. ``state_steps`` are advanced by one.
    """
    if not torch.compiler.is_compiling() and not all(
            isinstance(t, torch.Tensor) for t in state_steps):
        raise RuntimeError(
            "API has changed, `state_steps` argument must contain a list of singleton tensors"
        )
    job = _ops.Job(params, grads, [exp_avgs, exp_infs, state_steps], [],
                   _hyper(lr, beta1, beta2, eps, weight_decay, maximize, capturable,
                          differentiable, has_complex))
    ADAMAX_STEP([job], None, None, backend or "auto", _ops.NO_CACHE,
                traceable=not differentiable)


def _hyper(lr, beta1, beta2, eps, weight_decay, maximize, capturable, differentiable,
           has_complex):
    return dict(lr=lr, beta1=beta1, beta2=beta2, eps=eps, weight_decay=weight_decay,
                maximize=maximize, capturable=capturable, differentiable=differentiable,
                has_complex=has_complex)


def _update(job, key, grad_scale, found_inf, backend, cache, compiled):
    """Validate one group's Adamax update; return what writes it (None: nothing to do).

    Everything that can raise happens here, before any tensor is written.
    """
    params, grads, (exp_avgs, exp_infs, state_steps), _, h, precision = job
    if compiled:
        h = _base.compiled_semantics(h, params)
    lr, beta1, beta2, eps, weight_decay = (h["lr"], h["beta1"], h["beta2"], h["eps"],
                                           h["weight_decay"])
    maximize, capturable, differentiable, has_complex = (
        h["maximize"], h["capturable"], h["differentiable"], h["has_complex"])
    name = _base.backend_name(backend)
    cpu_capturable = capturable and any(p.device.type == "cpu" for p in params)
    if differentiable or (cpu_capturable and not _backend.stands_in_for_gpu(name)):
        # not covered by the kernels: torch's own for-loop (which also raises
        # torch's error for capturable CPU params)
        def fallback():
            from torch.optim.adamax import adamax as torch_adamax

            if _base.unscale_for_fallback(grads, grad_scale, found_inf):
                return
            torch_adamax(params, grads, exp_avgs, exp_infs, state_steps, foreach=False,
                         maximize=maximize, differentiable=differentiable,
                         capturable=capturable, has_complex=has_complex, eps=eps,
                         beta1=beta1, beta2=beta2, lr=lr, weight_decay=weight_decay)
        return fallback
    if not params:
        return None
    # torch's lr / (1 - beta1 ** step) raises ZeroDivisionError for a float lr
    # and beta1 = +-1 (param_groups edits reach it), after it has advanced the
    # step and written the moments: the dry run on stand-ins raises it first
    dry_all = not torch.is_tensor(lr) and abs(float(beta1)) == 1.0
    hyper = dict(lr=_base.scalar(lr, keep_tensor=capturable), beta1=_base.scalar(beta1),
                 beta2=_base.scalar(beta2), eps=float(eps),
                 weight_decay=_base.scalar(weight_decay), maximize=bool(maximize),
                 # torch divides a Tensor lr as a Tensor: in its dtype
                 lr_round=(_LR_ROUND.get(lr.dtype, 0)
                           if torch.is_tensor(lr) and not capturable else 0),
                 grad_scale=grad_scale, found_inf=found_inf)

    def reference(ps, gs, states, steps, flag_rows):
        # torch's for-loop, for rows the kernels do not take
        from torch.optim.adamax import adamax as torch_adamax

        torch_adamax(ps, gs, states[0], states[1], steps, foreach=False, maximize=maximize,
                     differentiable=False, capturable=capturable,
                     has_complex=any(map(torch.is_complex, ps)), eps=eps, beta1=beta1,
                     beta2=beta2, lr=lr, weight_decay=weight_decay)

    return _plan.prepare_update("adamax", name, params, grads, [exp_avgs, exp_infs],
                                ("exp_avg", "exp_inf"), hyper, reference, steps=state_steps,
                                cache=cache, key=key, precision=precision, dry_all=dry_all)


#: ``fused_optim::adamax_step``: a whole Adamax step as one operator (see _ops)
ADAMAX_STEP = Adamax.STEP_OP = _ops.UpdateOp(
    "adamax_step", states=("exp_avgs", "exp_infs", "state_steps"),
    scalars=("lr", "beta1", "beta2", "eps", "weight_decay"),
    switches=("maximize", "capturable", "differentiable", "has_complex"),
    update=_update)


RECORDS = (
    Record("Adamax", "adamax", "adamax", "torch.optim.adamax", kernel="adamax",
           state=("exp_avg", "exp_inf"), has_step=True),
)
