r"""Fused ASGD."""

from __future__ import annotations

import torch
from torch import Tensor

from . import _backend, _base, _ops, _plan
from ._registry import Record

__all__ = ["ASGD", "asgd"]

#: the kernels' ``eta_round`` codes (kernels/steps.py's ETA_F64 ...): how
#: torch's loop computes the next eta
_ETA_F64, _ETA_AS_F32, _ETA_TENSOR_F32 = 0, 1, 2


class ASGD(_base.FusedOptimizer, torch.optim.ASGD):
    r"""Averaged Stochastic Gradient Descent, fused.

    A drop-in replacement for :class:`torch.optim.ASGD`: same arguments,
    defaults, errors, ``state_dict`` and results. Each :meth:`step` updates
    all tensors of one (device, dtype) bucket of a param group in one kernel
    call, and advances each param's own ``step``, ``eta`` and ``mu``.

    .. math::
       \begin{aligned}
            &\textbf{input}: \gamma \text{ (lr)},\ \theta_0,\ \lambda \text{ (lambd)},\
                \alpha,\ t_0,\ \omega \text{ (weight decay)} \\
            &\textbf{initialize}: \eta_0 \leftarrow \gamma,\ \mu_0 \leftarrow 1,\
                a_0 \leftarrow 0 \\
            &\textbf{for}\ t = 1, 2, \ldots\ \textbf{do} \\
            &\quad g_t \leftarrow \pm\nabla_\theta f_t(\theta_{t-1})
                \quad (- \text{ if maximize}) \\
            &\quad \textbf{if}\ \omega \neq 0:\ g_t \leftarrow g_t + \omega\theta_{t-1} \\
            &\quad \theta_t \leftarrow (1 - \lambda\eta_{t-1})\theta_{t-1} - \eta_{t-1} g_t \\
            &\quad a_t \leftarrow a_{t-1} + \mu_{t-1}(\theta_t - a_{t-1})
                \quad (\theta_t \text{ where } \mu_{t-1} = 1) \\
            &\quad \eta_t \leftarrow \gamma / (1 + \lambda\gamma t)^\alpha,\
                \mu_t \leftarrow 1 / \max(1, t - t_0)
       \end{aligned}

    Args:
        params (iterable): iterable of parameters or named_parameters to
            optimize, or of dicts defining parameter groups.
        lr (float, Tensor, optional): learning rate (default: 1e-2)
        lambd (float, optional): decay term (default: 1e-4)
        alpha (float, optional): power for eta update (default: 0.75)
        t0 (float, optional): point at which to start averaging (default: 1e6)
        weight_decay (float, optional): weight decay (L2 penalty) (default: 0)
        foreach (bool, optional): accepted for compatibility (default: None)
        maximize (bool, optional): maximize the objective (default: False)
        differentiable (bool, optional): autograd through the step; runs
            torch's own for-loop step, not the kernels (default: False)
        capturable (bool, optional): on CUDA, a step with no host
            synchronisation that a CUDA graph can capture: step counters, etas
            and mus live on the device. On CPU, torch's own step runs and
            raises as torch does (default: False)
        backend, kahan_sum, stochastic_round, state_dtype: keyword-only, as for every
            class here (see :class:`~fused_optim._base.FusedOptimizer`)

    .. note::
        ``eta`` and ``mu`` are per-param scalar state, computed from the
        advanced step in float64 as torch's loop does and rounded to
        torch's default dtype (``torch.as_tensor``); they are never stored
        in ``state_dtype``. An ``eta`` or ``mu`` that is not a 1-element
        float32/float64 tensor placed as its ``step`` (``load_state_dict``
        casts them to a bf16/fp16 param's dtype) runs torch's own loop for
        that param. Element math runs in float32 (float64 for float64
        tensors) with one rounding per stored value.
    """

    def __init__(
        self,
        params,
        lr: float | Tensor = 1e-2,
        lambd: float = 1e-4,
        alpha: float = 0.75,
        t0: float = 1e6,
        weight_decay: float = 0,
        foreach: bool | None = None,
        maximize: bool = False,
        differentiable: bool = False,
        capturable: bool = False,
        *,
        backend: str | None = None,
        kahan_sum: bool = False,
        stochastic_round: bool = False,
        state_dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__(params, lr, lambd, alpha, t0, weight_decay, foreach, maximize,
                         differentiable, capturable, backend=backend, kahan_sum=kahan_sum,
                         stochastic_round=stochastic_round, state_dtype=state_dtype)

    CAPTURE_HEALTH_CHECK = True

    def _init_group(self, group, params_with_grad, grads, axs, mus, etas, state_steps):
        # not torch's: one C-level map per fact (see _base._gather_state);
        # the lists in its functional's order (axs, mus, etas)
        with_grad, their_grads = _base.params_with_grads(group["params"])
        if not with_grad:
            return False
        found = self._gather_state(group, with_grad, ("ax", "mu", "eta", "step"),
                                   torchs_raises=_base.any_sparse(their_grads))
        params_with_grad.extend(with_grad)
        grads.extend(their_grads)
        axs.extend(found[0])
        mus.extend(found[1])
        etas.extend(found[2])
        state_steps.extend(found[3])
        # only torch's own step (differentiable, or capturable CPU params)
        # reads has_complex; the kernels see each tensor's dtype
        if group["differentiable"] or group["capturable"]:
            return any(map(torch.is_complex, with_grad))
        return False

    STATE_LISTS = 4  # axs, mus, etas, state_steps
    SCALAR_STATE = (("mu", 1), ("eta", 2))  # (placed as the step counter)

    @staticmethod
    def _hyper(group, has_complex) -> dict:
        return _hyper(group["lr"], group["lambd"], group["alpha"], group["t0"],
                      group["weight_decay"], group["maximize"], group["differentiable"],
                      group["capturable"], has_complex)


def asgd(
    params: list[Tensor],
    grads: list[Tensor],
    axs: list[Tensor],
    mus: list[Tensor],
    etas: list[Tensor],
    state_steps: list[Tensor],
    foreach: bool | None = None,
    maximize: bool = False,
    differentiable: bool = False,
    capturable: bool = False,
    has_complex: bool = False,
    *,
    lambd: float,
    lr: float,
    t0: float,
    alpha: float,
    weight_decay: float,
    backend: str | None = None,
) -> None:
    r"""Functional ASGD: update params and state in place, as :class:`ASGD` does.

    Same arguments as ``torch.optim.asgd.asgd`` (see :class:`ASGD`), plus
    ``backend``. ``state_steps`` are advanced by one, ``etas`` and ``mus``
    set for the next step.
    """
    job = _ops.Job(params, grads, [axs, mus, etas, state_steps], [],
                   _hyper(lr, lambd, alpha, t0, weight_decay, maximize, differentiable,
                          capturable, has_complex))
    ASGD_STEP([job], None, None, backend or "auto", _ops.NO_CACHE,
              traceable=not differentiable)


def _hyper(lr, lambd, alpha, t0, weight_decay, maximize, differentiable, capturable,
           has_complex):
    return dict(lr=lr, lambd=lambd, alpha=alpha, t0=t0, weight_decay=weight_decay,
                maximize=maximize, differentiable=differentiable, capturable=capturable,
                has_complex=has_complex)


def _update(job, key, grad_scale, found_inf, backend, cache, compiled):
    """Validate one group's ASGD update; return what writes it (None: nothing to do).

    Everything that can raise happens here, before any tensor is written.
    """
    params, grads, (axs, mus, etas, state_steps), _, h, precision = job
    if compiled:
        h = _base.compiled_semantics(h, params)
    lr, lambd, alpha, t0, weight_decay = (h["lr"], h["lambd"], h["alpha"], h["t0"],
                                          h["weight_decay"])
    maximize, differentiable, capturable, has_complex = (
        h["maximize"], h["differentiable"], h["capturable"], h["has_complex"])
    name = _base.backend_name(backend)
    cpu_capturable = capturable and any(p.device.type == "cpu" for p in params)
    default = torch.get_default_dtype()
    # How torch's loop computes the next eta: in Python floats, as_tensor'd
    # in the default dtype; with a Tensor lr (and capturable), tensor
    # arithmetic in the lr's dtype (steps.asgd_scalars)
    if capturable or (torch.is_tensor(lr) and lr.dtype == torch.float32):
        eta_round = _ETA_TENSOR_F32
    elif torch.is_tensor(lr) or default == torch.float64:
        eta_round = _ETA_F64
    else:
        eta_round = _ETA_AS_F32
    # torch's own loop runs: a base (1 + lambd * lr * step) that can reach
    # zero (ZeroDivisionError) or go negative (a complex power, cast to a
    # real eta), lambd * lr < 0; a bfloat16/float16 Tensor lr (its ops
    # round in that dtype); a default dtype other than float32/float64
    odd = (default not in (torch.float32, torch.float64)
           or (torch.is_tensor(lr) and lr.dtype not in (torch.float32, torch.float64))
           or (not (capturable and torch.is_tensor(lr))
               and _base.scalar(lambd) * _base.scalar(lr) < 0))
    if (differentiable or odd
            or (cpu_capturable and not _backend.stands_in_for_gpu(name))):
        # not covered by the kernels: torch's own for-loop (which also raises
        # torch's error for capturable CPU params)
        def fallback():
            from torch.optim.asgd import asgd as torch_asgd

            if _base.unscale_for_fallback(grads, grad_scale, found_inf):
                return
            torch_asgd(params, grads, axs, mus, etas, state_steps, foreach=False,
                       maximize=maximize, differentiable=differentiable,
                       capturable=capturable, has_complex=has_complex, lambd=lambd, lr=lr,
                       t0=t0, alpha=alpha, weight_decay=weight_decay)
        return fallback
    if not params:
        return None
    # capturable keeps a Tensor lr on the device, for the kernel to read
    hyper = dict(lr=_base.scalar(lr, keep_tensor=capturable), lambd=_base.scalar(lambd),
                 alpha=_base.scalar(alpha), t0=_base.scalar(t0),
                 weight_decay=_base.scalar(weight_decay), maximize=bool(maximize),
                 capturable=bool(capturable), eta_round=eta_round,
                 mu_f32=default == torch.float32,
                 grad_scale=grad_scale, found_inf=found_inf)

    def reference(ps, gs, states, steps, flag_rows):
        # torch's for-loop, for rows the kernels do not take
        from torch.optim.asgd import asgd as torch_asgd

        torch_asgd(ps, gs, states[0], states[1], states[2], steps, foreach=False,
                   maximize=maximize, differentiable=False, capturable=capturable,
                   has_complex=any(map(torch.is_complex, ps)), lambd=lambd, lr=lr, t0=t0,
                   alpha=alpha, weight_decay=weight_decay)

    return _plan.prepare_update("asgd", name, params, grads, [axs, mus, etas],
                                ("ax", "mu", "eta"), hyper, reference, steps=state_steps,
                                cache=cache, key=key, precision=precision,
                                scalars=(1, 2))


#: ``fused_optim::asgd_step``: a whole ASGD step as one operator (see _ops)
ASGD_STEP = ASGD.STEP_OP = _ops.UpdateOp(
    "asgd_step", states=("axs", "mus", "etas", "state_steps"),
    scalars=("lr", "lambd", "alpha", "t0", "weight_decay"),
    switches=("maximize", "differentiable", "capturable", "has_complex"),
    update=_update)


RECORDS = (
    Record("ASGD", "asgd", "asgd", "torch.optim.asgd", kernel="asgd", state=("ax",),
           has_step=True, scalars=tuple(k for k, _ in ASGD.SCALAR_STATE)),
)
