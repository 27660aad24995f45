r"""Fused RAdam."""

from __future__ import annotations

import torch
from torch import Tensor

from . import _backend, _base, _ops, _plan
from ._registry import Record

__all__ = ["RAdam", "radam"]


class RAdam(_base.FusedOptimizer, torch.optim.RAdam):
    r"""RAdam (rectified Adam), fused.

    A drop-in replacement for :class:`torch.optim.RAdam`: same arguments,
    defaults, errors, ``state_dict`` and results. Each :meth:`step` updates
    all tensors of one (device, dtype) bucket of a param group in one kernel
    call, and advances each param's own ``step`` count. Whether a param's
    step is rectified (torch's ``rho_t > 5``) is decided from that param's
    own step, as torch's loop decides it.

    .. math::
       \begin{aligned}
            &\textbf{input}: \gamma \text{ (lr)},\ \beta_1, \beta_2 \text{ (betas)},\
                \theta_0,\ \lambda \text{ (weight decay)},\ \epsilon,\
                \textit{decoupled},\ \textit{maximize} \\
            &\textbf{initialize}: m_0 \leftarrow 0,\ v_0 \leftarrow 0,\
                \rho_\infty \leftarrow 2/(1-\beta_2) - 1 \\
            &\textbf{for}\ t = 1, 2, \ldots\ \textbf{do} \\
            &\quad g_t \leftarrow \pm\nabla_\theta f_t(\theta_{t-1})
                \quad (- \text{ if maximize}) \\
            &\quad \textbf{if}\ \lambda \neq 0:\ \textbf{if decoupled}\
                \theta_{t-1} \leftarrow \theta_{t-1}(1 - \gamma\lambda)\
                \textbf{else}\ g_t \leftarrow g_t + \lambda\theta_{t-1} \\
            &\quad m_t \leftarrow \beta_1 m_{t-1} + (1-\beta_1) g_t,\quad
                v_t \leftarrow \beta_2 v_{t-1} + (1-\beta_2) g_t^2 \\
            &\quad \hat m_t \leftarrow m_t / (1-\beta_1^t),\quad
                \rho_t \leftarrow \rho_\infty - 2t\beta_2^t/(1-\beta_2^t) \\
            &\quad \textbf{if}\ \rho_t > 5:\ \theta_t \leftarrow \theta_{t-1}
                - \gamma \hat m_t \frac{\sqrt{1-\beta_2^t}}{\sqrt{v_t} + \epsilon}
                \sqrt{\frac{(\rho_t-4)(\rho_t-2)\rho_\infty}
                {(\rho_\infty-4)(\rho_\infty-2)\rho_t}} \\
            &\quad \textbf{else}:\ \theta_t \leftarrow \theta_{t-1} - \gamma \hat m_t
       \end{aligned}

    Args:
        params (iterable): iterable of parameters or named_parameters to
            optimize, or of dicts defining parameter groups.
        lr (float, Tensor, optional): learning rate (default: 1e-3)
        betas (tuple[float, float], optional): coefficients of the running
            averages of the gradient and its square (default: (0.9, 0.999))
        eps (float, optional): term added to the denominator for numerical
            stability (default: 1e-8)
        weight_decay (float, optional): weight decay (L2 penalty, or decoupled
            decay with ``decoupled_weight_decay``) (default: 0)
        decoupled_weight_decay (bool, optional): decay the weights directly
            instead of through the gradient, as AdamW (default: False)
        foreach (bool, optional): accepted for compatibility (default: None)
        maximize (bool, optional): maximize the objective (default: False)
        capturable (bool, optional): on CUDA, a step with no host
            synchronisation that a CUDA graph can capture: step counters live
            on the device and a Tensor ``lr`` is read by the kernel. On CPU,
            torch's own step runs and raises as torch does (default: False)
        differentiable (bool, optional): autograd through the step; runs
            torch's own for-loop step, not the kernels (default: False)
        backend, kahan_sum, stochastic_round, state_dtype: keyword-only, as for every
            class here (see :class:`~fused_optim._base.FusedOptimizer`)

    .. note::
        Per-param scalars (bias corrections, rectification) are computed in
        float64 from each param's own ``step``, as torch's for-loop does in
        Python; element math runs in float32 (float64 for float64 tensors)
        with one rounding per stored value. A float16/bfloat16 Tensor ``lr``
        (not capturable) runs torch's own for-loop step: torch computes its
        decoupled decay ``1 - lr * weight_decay`` in that dtype.
    """

    def __init__(
        self,
        params,
        lr: float | Tensor = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0,
        decoupled_weight_decay: bool = False,
        *,
        foreach: bool | None = None,
        maximize: bool = False,
        capturable: bool = False,
        differentiable: bool = False,
        backend: str | None = None,
        kahan_sum: bool = False,
        stochastic_round: bool = False,
        state_dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__(params, lr, betas, eps, weight_decay, decoupled_weight_decay,
                         foreach=foreach, maximize=maximize, capturable=capturable,
                         differentiable=differentiable, backend=backend,
                         kahan_sum=kahan_sum, stochastic_round=stochastic_round,
                         state_dtype=state_dtype)

    CAPTURE_HEALTH_CHECK = True

    def _init_group(self, group, params, grads, exp_avgs, exp_avg_sqs, state_steps):
        # not torch's: one C-level map per fact (see _base._gather_state)
        with_grad, their_grads = _base.params_with_grads(group["params"])
        if not with_grad:
            return False
        found = self._gather_state(group, with_grad, ("exp_avg", "exp_avg_sq", "step"),
                                   torchs_raises=_base.any_sparse(their_grads))
        params.extend(with_grad)
        grads.extend(their_grads)
        exp_avgs.extend(found[0])
        exp_avg_sqs.extend(found[1])
        state_steps.extend(found[2])
        # only torch's own step (differentiable, or capturable CPU params)
        # reads has_complex; the kernels see each tensor's dtype
        if group["differentiable"] or group["capturable"]:
            return any(map(torch.is_complex, with_grad))
        return False

    STATE_LISTS = 3  # exp_avgs, exp_avg_sqs, state_steps

    @staticmethod
    def _hyper(group, has_complex) -> dict:
        beta1, beta2 = group["betas"]
        return _hyper(group["lr"], beta1, beta2, group["eps"], group["weight_decay"],
                      group["decoupled_weight_decay"], group["maximize"],
                      group["capturable"], group["differentiable"], has_complex)


def radam(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    exp_avg_sqs: list[Tensor],
    state_steps: list[Tensor],
    decoupled_weight_decay: bool = False,
    foreach: bool | None = None,
    differentiable: bool = False,
    capturable: bool = False,
    has_complex: bool = False,
    maximize: bool = False,
    *,
    beta1: float,
    beta2: float,
    lr: float,
    weight_decay: float,
    eps: float,
    backend: str | None = None,
) -> None:
    r"""Functional RAdam: update params and state in place, as :class:`RAdam` does.

    Same arguments as ``torch.optim.radam.radam`` (see :class:`RAdam`), plus
    ``backend``. ``state_steps`` are advanced by one.
    """
    if not all(isinstance(t, torch.Tensor) for t in state_steps):
        raise RuntimeError(
            "API has changed, `state_steps` argument must contain a list of singleton tensors"
        )
    job = _ops.Job(params, grads, [exp_avgs, exp_avg_sqs, state_steps], [],
                   _hyper(lr, beta1, beta2, eps, weight_decay, decoupled_weight_decay,
                          maximize, capturable, differentiable, has_complex))
    RADAM_STEP([job], None, None, backend or "auto", _ops.NO_CACHE,
               traceable=not differentiable)


def _hyper(lr, beta1, beta2, eps, weight_decay, decoupled_weight_decay, maximize, capturable,
           differentiable, has_complex):
    return dict(lr=lr, beta1=beta1, beta2=beta2, eps=eps, weight_decay=weight_decay,
                decoupled_weight_decay=decoupled_weight_decay, maximize=maximize,
                capturable=capturable, differentiable=differentiable,
                has_complex=has_complex)


def _update(job, key, grad_scale, found_inf, backend, cache, compiled):
    """Validate one group's RAdam update; return what writes it (None: nothing to do).

    Everything that can raise happens here, before any tensor is written.
    """
    params, grads, (exp_avgs, exp_avg_sqs, state_steps), _, h, precision = job
    if compiled:
        h = _base.compiled_semantics(h, params)
    lr, beta1, beta2, eps, weight_decay = (h["lr"], h["beta1"], h["beta2"], h["eps"],
                                           h["weight_decay"])
    decoupled_weight_decay, maximize, capturable, differentiable, has_complex = (
        h["decoupled_weight_decay"], h["maximize"], h["capturable"], h["differentiable"],
        h["has_complex"])
    name = _base.backend_name(backend)
    cpu_capturable = capturable and any(p.device.type == "cpu" for p in params)
    # torch's loop computes a float16/bfloat16 Tensor lr's decoupled decay
    # 1 - lr * weight_decay in that dtype, a rounding the kernels' float64
    # scalars do not make: torch's own loop runs those
    low_lr = (not capturable and torch.is_tensor(lr)
              and lr.dtype in (torch.float16, torch.bfloat16))
    if (differentiable or low_lr
            or (cpu_capturable and not _backend.stands_in_for_gpu(name))):
        # not covered by the kernels: torch's own for-loop (which also raises
        # torch's error for capturable CPU params)
        def fallback():
            from torch.optim.radam import radam as torch_radam

            if _base.unscale_for_fallback(grads, grad_scale, found_inf):
                return
            torch_radam(params, grads, exp_avgs, exp_avg_sqs, state_steps,
                        decoupled_weight_decay=decoupled_weight_decay, foreach=False,
                        differentiable=differentiable, capturable=capturable,
                        has_complex=has_complex, maximize=maximize, beta1=beta1,
                        beta2=beta2, lr=lr, weight_decay=weight_decay, eps=eps)
        return fallback
    if not params:
        return None
    # torch's float arithmetic raises where beta2 (param_groups edits reach
    # it) leaves [0, 1): ZeroDivisionError in 2 / (1 - beta2) or by a zero
    # bias correction, a TypeError from a complex rectification term, after
    # it has advanced the step and written the moments. The dry run on
    # stand-ins of every row raises it first, or runs clean.
    dry_all = not 0.0 <= _base.scalar(beta2) < 1.0
    hyper = dict(lr=_base.scalar(lr, keep_tensor=capturable), beta1=_base.scalar(beta1),
                 beta2=_base.scalar(beta2), eps=float(eps),
                 weight_decay=_base.scalar(weight_decay),
                 decoupled_weight_decay=bool(decoupled_weight_decay), maximize=bool(maximize),
                 grad_scale=grad_scale, found_inf=found_inf)

    def reference(ps, gs, states, steps, flag_rows):
        # torch's for-loop, for rows the kernels do not take
        from torch.optim.radam import radam as torch_radam

        torch_radam(ps, gs, states[0], states[1], steps,
                    decoupled_weight_decay=decoupled_weight_decay, foreach=False,
                    differentiable=False, capturable=capturable,
                    has_complex=any(map(torch.is_complex, ps)), maximize=maximize,
                    beta1=beta1, beta2=beta2, lr=lr, weight_decay=weight_decay, eps=eps)

    return _plan.prepare_update("radam", name, params, grads, [exp_avgs, exp_avg_sqs],
                                ("exp_avg", "exp_avg_sq"), hyper, reference, steps=state_steps,
                                cache=cache, key=key, precision=precision, dry_all=dry_all)


#: ``fused_optim::radam_step``: a whole RAdam step as one operator (see _ops)
RADAM_STEP = RAdam.STEP_OP = _ops.UpdateOp(
    "radam_step", states=("exp_avgs", "exp_avg_sqs", "state_steps"),
    scalars=("lr", "beta1", "beta2", "eps", "weight_decay"),
    switches=("decoupled_weight_decay", "maximize", "capturable", "differentiable",
              "has_complex"),
    update=_update)


RECORDS = (
    Record("RAdam", "radam", "radam", "torch.optim.radam", kernel="radam",
           state=("exp_avg", "exp_avg_sq"), has_step=True),
)
