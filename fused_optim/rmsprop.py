r"""Fused RMSprop."""

from __future__ import annotations

import torch
from torch import Tensor

from . import _backend, _base, _ops, _plan
from ._registry import Record

__all__ = ["RMSprop", "rmsprop"]


class RMSprop(_base.FusedOptimizer, torch.optim.RMSprop):
    r"""RMSprop, fused.

    A drop-in replacement for :class:`torch.optim.RMSprop`: same arguments,
    defaults, errors, ``state_dict`` and results. Each :meth:`step` updates
    all tensors of one (device, dtype) bucket of a param group in one kernel
    call, and advances each param's own ``step`` count.

    .. math::
       \begin{aligned}
            &\textbf{input}: \alpha \text{ (alpha)},\ \gamma \text{ (lr)},\
                \theta_0,\ \lambda \text{ (weight decay)},\ \mu \text{ (momentum)},\
                \textit{centered},\ \epsilon \\
            &\textbf{initialize}: v_0 \leftarrow 0,\ b_0 \leftarrow 0,\ g^{ave}_0 \leftarrow 0 \\
            &\textbf{for}\ t = 1, 2, \ldots\ \textbf{do} \\
            &\quad g_t \leftarrow \pm\nabla_\theta f_t(\theta_{t-1})
                \quad (- \text{ if maximize}) \\
            &\quad \textbf{if}\ \lambda \neq 0:\ g_t \leftarrow g_t + \lambda\theta_{t-1} \\
            &\quad v_t \leftarrow \alpha v_{t-1} + (1-\alpha) g_t^2,\quad
                \tilde v_t \leftarrow v_t \\
            &\quad \textbf{if centered}:\ g^{ave}_t \leftarrow \alpha g^{ave}_{t-1}
                + (1-\alpha) g_t,\ \tilde v_t \leftarrow \tilde v_t - (g^{ave}_t)^2 \\
            &\quad \textbf{if}\ \mu > 0:\ b_t \leftarrow \mu b_{t-1}
                + g_t / (\sqrt{\tilde v_t} + \epsilon),\
                \theta_t \leftarrow \theta_{t-1} - \gamma b_t \\
            &\quad \textbf{else}:\ \theta_t \leftarrow \theta_{t-1}
                - \gamma g_t / (\sqrt{\tilde v_t} + \epsilon)
       \end{aligned}

    Args:
        params (iterable): iterable of parameters or named_parameters to
            optimize, or of dicts defining parameter groups.
        lr (float, Tensor, optional): learning rate (default: 1e-2)
        alpha (float, optional): smoothing constant (default: 0.99)
        eps (float, optional): term added to the denominator for numerical
            stability (default: 1e-8)
        weight_decay (float, optional): weight decay (L2 penalty) (default: 0)
        momentum (float, optional): momentum factor (default: 0)
        centered (bool, optional): normalize the gradient by an estimate of
            its variance (default: False)
        capturable (bool, optional): on CUDA, a step with no host
            synchronisation that a CUDA graph can capture: step counters live
            on the device and a Tensor ``lr`` is read by the kernel. On CPU,
            torch's own step runs and raises as torch does (default: False)
        foreach (bool, optional): accepted for compatibility (default: None)
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
        lr: float | Tensor = 1e-2,
        alpha: float = 0.99,
        eps: float = 1e-8,
        weight_decay: float = 0,
        momentum: float = 0,
        centered: bool = False,
        capturable: bool = False,
        foreach: bool | None = None,
        maximize: bool = False,
        differentiable: bool = False,
        *,
        backend: str | None = None,
        kahan_sum: bool = False,
        stochastic_round: bool = False,
        state_dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__(params, lr, alpha, eps, weight_decay, momentum, centered, capturable,
                         foreach, maximize, differentiable, backend=backend,
                         kahan_sum=kahan_sum, stochastic_round=stochastic_round,
                         state_dtype=state_dtype)

    CAPTURE_HEALTH_CHECK = True

    def _init_group(self, group, params, grads, square_avgs, momentum_buffer_list,
                    grad_avgs, state_steps):
        # not torch's: one C-level map per fact (see _base._gather_state)
        with_grad, their_grads = _base.params_with_grads(group["params"])
        if not with_grad:
            return False
        momentum, centered = group["momentum"] > 0, group["centered"]
        found = self._gather_state(
            group, with_grad,
            ("square_avg", "step") + (("momentum_buffer",) if momentum else ())
            + (("grad_avg",) if centered else ()),
            torchs_raises=_base.any_sparse(their_grads))
        params.extend(with_grad)
        grads.extend(their_grads)
        square_avgs.extend(found[0])
        state_steps.extend(found[1])
        if momentum:
            momentum_buffer_list.extend(found[2])
        if centered:
            grad_avgs.extend(found[-1])
        # only torch's own step (differentiable, or capturable CPU params)
        # reads has_complex; the kernels see each tensor's dtype
        if group["differentiable"] or group["capturable"]:
            return any(map(torch.is_complex, with_grad))
        return False

    STATE_LISTS = 4  # square_avgs, momentum_buffer_list, grad_avgs, state_steps

    @staticmethod
    def _hyper(group, has_complex) -> dict:
        return _hyper(group["lr"], group["alpha"], group["eps"], group["weight_decay"],
                      group["momentum"], group["centered"], group["maximize"],
                      group["capturable"], group["differentiable"], has_complex)


def rmsprop(
    params: list[Tensor],
    grads: list[Tensor],
    square_avgs: list[Tensor],
    grad_avgs: list[Tensor],
    momentum_buffer_list: list[Tensor],
    state_steps: list[Tensor],
    foreach: bool | None = None,
    maximize: bool = False,
    differentiable: bool = False,
    capturable: bool = False,
    has_complex: bool = False,
    *,
    lr: float | Tensor,
    alpha: float,
    eps: float,
    weight_decay: float,
    momentum: float,
    centered: bool,
    backend: str | None = None,
) -> None:
    r"""Functional RMSprop: update params and state in place, as :class:`RMSprop` does.

    Same arguments as ``torch.optim.rmsprop.rmsprop`` (see :class:`RMSprop`),
    plus ``backend``. ``state_steps`` are advanced by one.
    """
    if not torch.compiler.is_compiling() and not all(
            isinstance(t, torch.Tensor) for t in state_steps):
        raise RuntimeError(
            "API has changed, `state_steps` argument must contain a list of singleton tensors"
        )
    job = _ops.Job(params, grads,
                   [square_avgs, momentum_buffer_list if momentum > 0 else [],
                    grad_avgs if centered else [], state_steps], [],
                   _hyper(lr, alpha, eps, weight_decay, momentum, centered, maximize,
                          capturable, differentiable, has_complex))
    RMSPROP_STEP([job], None, None, backend or "auto", _ops.NO_CACHE,
                 traceable=not differentiable)


def _hyper(lr, alpha, eps, weight_decay, momentum, centered, maximize, capturable,
           differentiable, has_complex):
    return dict(lr=lr, alpha=alpha, eps=eps, weight_decay=weight_decay, momentum=momentum,
                centered=centered, maximize=maximize, capturable=capturable,
                differentiable=differentiable, has_complex=has_complex)


def _update(job, key, grad_scale, found_inf, backend, cache, compiled):
    """Validate one group's RMSprop update; return what writes it (None: nothing to do).

    Everything that can raise happens here, before any tensor is written.
    """
    params, grads, (square_avgs, momentum_buffer_list, grad_avgs, state_steps), _, h, \
        precision = job
    if compiled:
        h = _base.compiled_semantics(h, params)
    lr, alpha, eps, weight_decay, momentum = (h["lr"], h["alpha"], h["eps"], h["weight_decay"],
                                              h["momentum"])
    centered, maximize, capturable, differentiable, has_complex = (
        h["centered"], h["maximize"], h["capturable"], h["differentiable"], h["has_complex"])
    name = _base.backend_name(backend)
    use_momentum = momentum > 0
    cpu_capturable = capturable and any(p.device.type == "cpu" for p in params)
    if differentiable or (cpu_capturable and not _backend.stands_in_for_gpu(name)):
        # not covered by the kernels: torch's own for-loop (which also raises
        # torch's error for capturable CPU params)
        def fallback():
            from torch.optim.rmsprop import rmsprop as torch_rmsprop

            if _base.unscale_for_fallback(grads, grad_scale, found_inf):
                return
            torch_rmsprop(params, grads, square_avgs, grad_avgs, momentum_buffer_list,
                          state_steps, foreach=False, maximize=maximize,
                          differentiable=differentiable, capturable=capturable,
                          has_complex=has_complex, lr=lr, alpha=alpha, eps=eps,
                          weight_decay=weight_decay, momentum=momentum, centered=centered)
        return fallback
    if not params:
        return None
    none = [None] * len(params)
    states = [square_avgs, momentum_buffer_list if use_momentum else none,
              grad_avgs if centered else none]
    # capturable keeps a Tensor lr on the device, for the kernel to read
    hyper = dict(lr=_base.scalar(lr, keep_tensor=capturable), alpha=_base.scalar(alpha),
                 eps=float(eps), weight_decay=_base.scalar(weight_decay),
                 momentum=_base.scalar(momentum), centered=bool(centered),
                 maximize=bool(maximize), grad_scale=grad_scale, found_inf=found_inf)

    def reference(ps, gs, states, steps, flag_rows):
        # torch's for-loop, for rows the kernels do not take
        from torch.optim.rmsprop import rmsprop as torch_rmsprop

        torch_rmsprop(ps, gs, states[0], states[2] if centered else [],
                      states[1] if use_momentum else [], steps, foreach=False,
                      maximize=maximize, differentiable=False, capturable=capturable,
                      has_complex=any(map(torch.is_complex, ps)), lr=lr, alpha=alpha,
                      eps=eps, weight_decay=weight_decay, momentum=momentum,
                      centered=centered)

    return _plan.prepare_update("rmsprop", name, params, grads, states,
                                ("square_avg", "momentum_buffer", "grad_avg"), hyper,
                                reference, steps=state_steps, cache=cache, key=key,
                                 precision=precision)


#: ``fused_optim::rmsprop_step``: a whole RMSprop step as one operator (see _ops)
RMSPROP_STEP = RMSprop.STEP_OP = _ops.UpdateOp(
    "rmsprop_step", states=("square_avgs", "momentum_buffer_list", "grad_avgs", "state_steps"),
    scalars=("lr", "alpha", "eps", "weight_decay", "momentum"),
    switches=("centered", "maximize", "capturable", "differentiable", "has_complex"),
    update=_update)


RECORDS = (
    Record("RMSprop", "rmsprop", "rmsprop", "torch.optim.rmsprop", kernel="rmsprop",
           state=("square_avg", "momentum_buffer", "grad_avg"), has_step=True),
)
