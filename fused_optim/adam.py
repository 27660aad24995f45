r"""Fused Adam and AdamW."""

from __future__ import annotations

import torch
from torch import Tensor

from . import _backend, _base, _ops, _plan
from ._registry import Record

__all__ = ["Adam", "AdamW", "adam", "adamw"]


class Adam(_base.FusedOptimizer, torch.optim.Adam):
    r"""Adam, fused; with ``decoupled_weight_decay=True`` it is AdamW.

    A drop-in replacement for :class:`torch.optim.Adam`: same arguments,
    defaults, errors, ``state_dict`` and results. Each :meth:`step` updates all
    tensors of one (device, dtype) bucket of a param group in one kernel call,
    each with its own step count.

    .. math::
       \begin{aligned}
            &\textbf{input}: \gamma \text{ (lr)},\ \beta_1, \beta_2 \text{ (betas)},\
                \theta_0,\ \lambda \text{ (weight decay)},\ \epsilon,\
                \textit{amsgrad},\ \textit{maximize} \\
            &\textbf{initialize}: m_0 \leftarrow 0,\ v_0 \leftarrow 0,\ v_0^{max} \leftarrow 0 \\
            &\textbf{for}\ t = 1, 2, \ldots\ \textbf{do} \\
            &\quad g_t \leftarrow \pm\nabla_\theta f_t(\theta_{t-1})
                \quad (- \text{ if maximize}) \\
            &\quad \textbf{if}\ \lambda \neq 0:\ \textbf{if decoupled}\
                \theta_{t-1} \leftarrow \theta_{t-1}(1 - \gamma\lambda)\
                \textbf{else}\ g_t \leftarrow g_t + \lambda\theta_{t-1} \\
            &\quad m_t \leftarrow \beta_1 m_{t-1} + (1-\beta_1) g_t \\
            &\quad v_t \leftarrow \beta_2 v_{t-1} + (1-\beta_2) g_t^2 \\
            &\quad \textbf{if amsgrad}:\ v_t^{max} \leftarrow \max(v_{t-1}^{max}, v_t),\
                \hat v_t \leftarrow v_t^{max} \ \textbf{else}\ \hat v_t \leftarrow v_t \\
            &\quad \theta_t \leftarrow \theta_{t-1} - \frac{\gamma}{1-\beta_1^t}\,
                m_t \Big/ \Big(\sqrt{\hat v_t}\big/\sqrt{1-\beta_2^t} + \epsilon\Big)
       \end{aligned}

    Args:
        params (iterable): iterable of parameters or named_parameters to
            optimize, or of dicts defining parameter groups.
        lr (float, Tensor, optional): learning rate (default: 1e-3)
        betas (tuple[float | Tensor, float | Tensor], optional): coefficients
            of the running averages of the gradient and its square
            (default: (0.9, 0.999))
        eps (float, optional): term added to the denominator for numerical
            stability (default: 1e-8)
        weight_decay (float, optional): weight decay (L2 penalty, or decoupled
            decay with ``decoupled_weight_decay``) (default: 0)
        amsgrad (bool, optional): use the AMSGrad variant (default: False)
        foreach (bool, optional): accepted for compatibility (default: None)
        maximize (bool, optional): maximize the objective (default: False)
        capturable (bool, optional): on CUDA, a step with no host
            synchronisation that a CUDA graph can capture: step counters live
            on the device and a Tensor ``lr`` is read by the kernel (Tensor
            betas are still read on the host). On CPU, torch's own step runs
            and raises as torch does (default: False)
        differentiable (bool, optional): autograd through the step; runs
            torch's own for-loop step, not the kernels (default: False)
        fused (bool, optional): accepted for compatibility; the kernels are
            always fused (default: None)
        decoupled_weight_decay (bool, optional): decay the weights directly
            instead of through the gradient, i.e. AdamW (default: False)
        backend, kahan_sum, stochastic_round, state_dtype: keyword-only, as for every
            class here (see :class:`~fused_optim._base.FusedOptimizer`)
        state_bits (int, optional): keyword-only; 8 stores the moments of
            float32/bfloat16 params of 4096 elements or more as blockwise
            8-bit codes with a float32 scale per 256 elements (README,
            "Optimizer state in 8 bits") (default: None, torch's state)

    .. note::
        Bias corrections are computed in float64 from each parameter's own
        ``step``, as torch's for-loop does in Python; element math runs in
        float32 (float64 for float64 tensors) with one rounding per stored
        value, so bf16/fp16 training is more accurate than torch's for-loop.
        A float16/bfloat16 Tensor ``lr`` (not capturable) runs torch's own
        for-loop step: torch computes its step size in that dtype.
    """

    def __init__(
        self,
        params,
        lr: float | Tensor = 1e-3,
        betas: tuple[float | Tensor, float | Tensor] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0,
        amsgrad: bool = False,
        *,
        foreach: bool | None = None,
        maximize: bool = False,
        capturable: bool = False,
        differentiable: bool = False,
        fused: bool | None = None,
        decoupled_weight_decay: bool = False,
        backend: str | None = None,
        kahan_sum: bool = False,
        stochastic_round: bool = False,
        state_dtype: torch.dtype | None = None,
        state_bits: int | None = None,
    ) -> None:
        super().__init__(params, lr, betas, eps, weight_decay, amsgrad, foreach=foreach,
                         maximize=maximize, capturable=capturable,
                         differentiable=differentiable, fused=fused,
                         decoupled_weight_decay=decoupled_weight_decay, backend=backend,
                         kahan_sum=kahan_sum, stochastic_round=stochastic_round,
                         state_dtype=state_dtype, state_bits=state_bits)

    CAPTURE_HEALTH_CHECK = True

    def _init_group(self, group, params, grads, exp_avgs, exp_avg_sqs,
                    max_exp_avg_sqs, state_steps):
        # not torch's: one C-level map per fact (see _base._gather_state)
        with_grad, their_grads = _base.params_with_grads(group["params"])
        if not with_grad:
            return False
        amsgrad = group["amsgrad"]
        if group.get("state_bits") is not None:
            _init_quantized(self.state, group, with_grad)
        found = self._gather_state(
            group, with_grad,
            ("exp_avg", "exp_avg_sq", "step") + (("max_exp_avg_sq",) if amsgrad else ()),
            torchs_raises=_base.any_sparse(their_grads) or (
                group["foreach"] and torch.is_tensor(group["lr"]) and not group["capturable"]))
        if group["differentiable"] and any(s.requires_grad for s in found[2]):
            self._torchs_init_group(group)
        params.extend(with_grad)
        grads.extend(their_grads)
        exp_avgs.extend(found[0])
        exp_avg_sqs.extend(found[1])
        state_steps.extend(found[2])
        if amsgrad:
            max_exp_avg_sqs.extend(found[3])
        # Only torch's own step, which adam() runs for differentiable or
        # capturable groups it cannot fuse, reads has_complex; the kernels
        # see each tensor's dtype. Elsewhere the ~55 us per 161 params that
        # asking costs on a cold cache is saved.
        if group["differentiable"] or group["capturable"]:
            return any(map(torch.is_complex, with_grad))
        return False

    STATE_LISTS = 4  # exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps

    def _check_foreach(self, group, params, states) -> None:
        if group["differentiable"] and group["foreach"] and not group["fused"] and params:
            _check_foreach_capturable(group, params, states[-1])
            _base.check_foreach_autograd(group, params)

    @staticmethod
    def _hyper(group, has_complex) -> dict:
        beta1, beta2 = group["betas"]
        return _hyper(group["lr"], beta1, beta2, group["eps"], group["weight_decay"],
                      group["amsgrad"], group["maximize"], group["capturable"],
                      group["differentiable"], group["decoupled_weight_decay"], has_complex)


def _init_quantized(state, group, params):
    """``state_bits=8``: the lazy state of new quantized params made as codes
    and scales, never as torch's float32 zeros first (the peak memory of the
    first step); the rest is left to torch's ``_init_group``."""
    if group["capturable"] or group["fused"] or group["differentiable"]:
        return
    from torch.optim.optimizer import _get_scalar_dtype

    from ._precision import quantized
    from .kernels.reference._blockwise import absmax_key, blocks

    names = ("exp_avg", "exp_avg_sq") + (("max_exp_avg_sq",) if group["amsgrad"] else ())
    for p in params:
        if state.get(p) or not quantized(p):
            continue
        own = state[p]
        own["step"] = torch.tensor(0.0, dtype=_get_scalar_dtype())
        for name in names:
            own[name] = torch.zeros_like(p, dtype=torch.uint8,
                                         memory_format=torch.preserve_format)
            own[absmax_key(name)] = torch.zeros(blocks(p.numel()), dtype=torch.float32,
                                                device=p.device)


def _check_foreach_capturable(group, params, state_steps):
    """torch's _multi_tensor_adam checks capturable devices before autograd."""
    if group["capturable"] and not torch.compiler.is_compiling():
        from torch.optim.optimizer import _get_capturable_supported_devices

        devices = _get_capturable_supported_devices(supports_xla=False)
        if not all(p.device.type == s.device.type and p.device.type in devices
                   for p, s in zip(params, state_steps)):
            raise AssertionError(
                "If capturable=True, params and state_steps must be on supported devices: "
                f"{devices}.")


class AdamW(Adam, torch.optim.AdamW):
    r"""AdamW, fused: Adam with weight decay applied to the weights directly.

    A drop-in replacement for :class:`torch.optim.AdamW` (same arguments,
    defaults, errors and results). The update is :class:`Adam`'s with
    ``decoupled_weight_decay=True``:
    :math:`\theta_{t-1} \leftarrow \theta_{t-1}(1 - \gamma\lambda)` before the
    Adam step, so the decay never enters the moment estimates.

    Args:
        params (iterable): iterable of parameters or named_parameters to
            optimize, or of dicts defining parameter groups.
        lr (float, Tensor, optional): learning rate (default: 1e-3)
        betas (tuple[float | Tensor, float | Tensor], optional): coefficients
            of the running averages (default: (0.9, 0.999))
        eps (float, optional): denominator term (default: 1e-8)
        weight_decay (float, optional): weight decay coefficient (default: 1e-2)
        amsgrad (bool, optional): use the AMSGrad variant (default: False)
        maximize (bool, optional): maximize the objective (default: False)
        foreach (bool, optional): accepted for compatibility (default: None)
        capturable (bool, optional): see :class:`Adam` (default: False)
        differentiable (bool, optional): see :class:`Adam` (default: False)
        fused (bool, optional): accepted for compatibility (default: None)
        backend, kahan_sum, stochastic_round, state_dtype: keyword-only, as for every
            class here (see :class:`~fused_optim._base.FusedOptimizer`)
        state_bits (int, optional): keyword-only; 8 stores the moments of
            float32/bfloat16 params of 4096 elements or more as blockwise
            8-bit codes with a float32 scale per 256 elements (README,
            "Optimizer state in 8 bits") (default: None, torch's state)
    """

    def __init__(
        self,
        params,
        lr: float | Tensor = 1e-3,
        betas: tuple[float | Tensor, float | Tensor] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
        amsgrad: bool = False,
        *,
        maximize: bool = False,
        foreach: bool | None = None,
        capturable: bool = False,
        differentiable: bool = False,
        fused: bool | None = None,
        backend: str | None = None,
        kahan_sum: bool = False,
        stochastic_round: bool = False,
        state_dtype: torch.dtype | None = None,
        state_bits: int | None = None,
    ) -> None:
        # past Adam.__init__: torch's AdamW.__init__ passes decoupled_weight_decay
        _base.FusedOptimizer.__init__(
            self, params, lr, betas, eps, weight_decay, amsgrad, maximize=maximize,
            foreach=foreach, capturable=capturable, differentiable=differentiable,
            fused=fused, backend=backend, kahan_sum=kahan_sum,
            stochastic_round=stochastic_round,
            state_dtype=state_dtype, state_bits=state_bits)


def adam(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    exp_avg_sqs: list[Tensor],
    max_exp_avg_sqs: list[Tensor],
    state_steps: list[Tensor],
    foreach: bool | None = None,
    capturable: bool = False,
    differentiable: bool = False,
    fused: bool | None = None,
    grad_scale: Tensor | None = None,
    found_inf: Tensor | None = None,
    has_complex: bool = False,
    decoupled_weight_decay: bool = False,
    *,
    amsgrad: bool,
    beta1: float | Tensor,
    beta2: float | Tensor,
    lr: float | Tensor,
    weight_decay: float,
    eps: float,
    maximize: bool,
    backend: str | None = None,
) -> None:
    r"""Functional Adam: update params and state in place, as :class:`Adam` does.

    ``torch.optim.adam.adam``'s signature, plus the keyword ``backend``.

    See :class:`Adam` for the arguments. ``state_steps`` are advanced by one.
    """
    job = _ops.Job(params, grads, [exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps], [],
                   _hyper(lr, beta1, beta2, eps, weight_decay, amsgrad, maximize, capturable,
                          differentiable, decoupled_weight_decay, has_complex))
    ADAM_STEP([job], grad_scale, found_inf, backend or "auto", _ops.NO_CACHE,
              traceable=not differentiable)


def _hyper(lr, beta1, beta2, eps, weight_decay, amsgrad, maximize, capturable, differentiable,
           decoupled_weight_decay, has_complex):
    return dict(lr=lr, beta1=beta1, beta2=beta2, eps=eps, weight_decay=weight_decay,
                amsgrad=amsgrad, maximize=maximize, capturable=capturable,
                differentiable=differentiable, decoupled_weight_decay=decoupled_weight_decay,
                has_complex=has_complex)


def _update(job, key, grad_scale, found_inf, backend, cache, compiled):
    """Validate one group's Adam update; return what writes it (None: nothing to do).

    Everything that can raise happens here, before any tensor is written.
    """
    params, grads, (exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps), _, h, precision = job
    if compiled:
        h = _base.compiled_semantics(h, params)
    lr, beta1, beta2, eps, weight_decay = (h["lr"], h["beta1"], h["beta2"], h["eps"],
                                           h["weight_decay"])
    amsgrad, maximize, capturable, differentiable = (h["amsgrad"], h["maximize"],
                                                     h["capturable"], h["differentiable"])
    decoupled_weight_decay, has_complex = h["decoupled_weight_decay"], h["has_complex"]
    name = _base.backend_name(backend)
    cpu_capturable = capturable and any(p.device.type == "cpu" for p in params)
    # torch's loop computes a float16/bfloat16 Tensor lr's lr / bias_correction1
    # (and AdamW's 1 - lr * weight_decay) in that dtype, a rounding the
    # kernels' float64 scalars do not make: torch's own loop runs those
    low_lr = (not capturable and torch.is_tensor(lr)
              and lr.dtype in (torch.float16, torch.bfloat16))
    if (differentiable or low_lr
            or (cpu_capturable and not _backend.stands_in_for_gpu(name))):
        # not covered by the kernels: torch's own for-loop (which also raises
        # torch's error for capturable CPU params)
        def fallback():
            from torch.optim.adam import adam as torch_adam

            if _base.unscale_for_fallback(grads, grad_scale, found_inf):
                return
            torch_adam(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps,
                       foreach=False, capturable=capturable, differentiable=differentiable,
                       fused=False,
                       has_complex=has_complex, decoupled_weight_decay=decoupled_weight_decay,
                       amsgrad=amsgrad, beta1=beta1, beta2=beta2, lr=lr,
                       weight_decay=weight_decay, eps=eps, maximize=maximize)
        return fallback
    if not params:
        return None
    states = [exp_avgs, exp_avg_sqs,
              max_exp_avg_sqs if amsgrad else [None] * len(params)]
    # torch's lr / (1 - beta1 ** step) raises ZeroDivisionError for a float lr
    # and beta1 = +-1 (param_groups edits reach it), after it has advanced the
    # first step and written the first moments. Running torch's step on
    # stand-ins of every row first raises it, or any error torch meets
    # before it, in torch's order, before anything is written.
    dry_all = (not torch.is_tensor(lr) and not torch.is_tensor(beta1)
               and abs(float(beta1)) == 1.0)
    # capturable keeps a Tensor lr on the device; Tensor betas are read on
    # the host (the kernels' lerp branch and log2(beta) are chosen there)
    hyper = dict(lr=_base.scalar(lr, keep_tensor=capturable),
                 beta1=_base.scalar(beta1), beta2=_base.scalar(beta2),
                 eps=float(eps), weight_decay=_base.scalar(weight_decay),
                 decoupled_weight_decay=bool(decoupled_weight_decay),
                 amsgrad=bool(amsgrad), maximize=bool(maximize),
                 grad_scale=grad_scale, found_inf=found_inf)

    def reference(ps, gs, states, steps, flag_rows):
        # torch's for-loop, for rows the kernels do not take
        from torch.optim.adam import adam as torch_adam

        torch_adam(ps, gs, states[0], states[1], states[2] if amsgrad else [], steps,
                   foreach=False, capturable=capturable, differentiable=False,
                   fused=False, has_complex=any(map(torch.is_complex, ps)),
                   decoupled_weight_decay=decoupled_weight_decay, amsgrad=amsgrad,
                   beta1=beta1, beta2=beta2, lr=lr, weight_decay=weight_decay, eps=eps,
                   maximize=maximize)

    return _plan.prepare_update("adam", name, params, grads, states,
                                ("exp_avg", "exp_avg_sq", "max_exp_avg_sq"), hyper, reference,
                                steps=state_steps, cache=cache, key=key, precision=precision,
                                 dry_all=dry_all)


def adamw(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    exp_avg_sqs: list[Tensor],
    max_exp_avg_sqs: list[Tensor],
    state_steps: list[Tensor],
    foreach: bool | None = None,
    capturable: bool = False,
    differentiable: bool = False,
    fused: bool | None = None,
    grad_scale: Tensor | None = None,
    found_inf: Tensor | None = None,
    has_complex: bool = False,
    *,
    amsgrad: bool,
    beta1: float | Tensor,
    beta2: float | Tensor,
    lr: float | Tensor,
    weight_decay: float,
    eps: float,
    maximize: bool,
    backend: str | None = None,
) -> None:
    r"""Functional AdamW: :func:`adam` with ``decoupled_weight_decay=True``.

    ``torch.optim.adamw.adamw``'s signature, plus the keyword ``backend``.
    """
    adam(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps, foreach,
         capturable, differentiable, fused, grad_scale, found_inf, has_complex, True,
         amsgrad=amsgrad, beta1=beta1, beta2=beta2, lr=lr, weight_decay=weight_decay,
         eps=eps, maximize=maximize, backend=backend)


#: ``fused_optim::adam_step``: a whole Adam/AdamW step as one operator (see _ops)
ADAM_STEP = Adam.STEP_OP = _ops.UpdateOp(
    "adam_step", states=("exp_avgs", "exp_avg_sqs", "max_exp_avg_sqs", "state_steps"),
    scalars=("lr", "beta1", "beta2", "eps", "weight_decay"),
    switches=("amsgrad", "maximize", "capturable", "differentiable",
              "decoupled_weight_decay", "has_complex"),
    update=_update)


RECORDS = (
    Record("Adam", "adam", "adam", "torch.optim.adam", kernel="adam",
           state=("exp_avg", "exp_avg_sq", "max_exp_avg_sq"), has_step=True),
    Record("AdamW", "adam", "adamw", "torch.optim.adamw", kernel="adam",
           state=("exp_avg", "exp_avg_sq", "max_exp_avg_sq"), has_step=True),
)
