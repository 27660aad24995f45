r"""Fused Adam and AdamW."""

from __future__ import annotations

import torch
from torch import Tensor

from . import _backend, _base, _ops, _tables
from ._registry import Record

__all__ = ["Adam", "AdamW", "adam", "adamw"]


def _scalar_dtype(is_fused=None):
    if is_fused:
        return torch.float32
    return torch.float64 if torch.get_default_dtype() == torch.float64 else torch.float32


def _to_scalar(x):
    if isinstance(x, Tensor) and x.dim() != 0:
        return x.squeeze()
    return x


#: the state keys a step reads (torch's loop raises KeyError for a missing one)
_KEYS = frozenset(("step", "exp_avg", "exp_avg_sq"))
_AMSGRAD_KEYS = _KEYS | {"max_exp_avg_sq"}


class Adam(_base.FusedOptimizer):
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
        backend (str, optional): keyword-only. ``"auto"``, ``"numba"``,
            ``"triton"`` or ``"torch"``; None reads ``FUSED_OPTIM_BACKEND``
            (default: None, i.e. auto)
        kahan_sum (bool, optional): keyword-only. Kahan summation for
            bfloat16/float16 params: a compensation buffer per param (state
            ``"kahan_comp"``, the param's size again) carries each store's
            rounding error into the next step (default: False)
        stochastic_round (bool, optional): keyword-only. Round bfloat16/float16
            param stores stochastically (unbiased), from a stream seeded by
            torch's generator and saved in ``state_dict`` (default: False)

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
    ) -> None:
        if isinstance(lr, Tensor):
            if foreach and not capturable:
                raise ValueError(
                    "lr as a Tensor is not supported for capturable=False and foreach=True"
                )
            if lr.numel() != 1:
                raise ValueError("Tensor lr must be 1-element")
        if not 0.0 <= lr:
            raise ValueError(f"Invalid learning rate: {lr}")
        if not 0.0 <= eps:
            raise ValueError(f"Invalid epsilon value: {eps}")
        if not 0.0 <= betas[0] < 1.0:
            raise ValueError(f"Invalid beta parameter at index 0: {betas[0]}")
        if not 0.0 <= betas[1] < 1.0:
            raise ValueError(f"Invalid beta parameter at index 1: {betas[1]}")
        if not 0.0 <= weight_decay:
            raise ValueError(f"Invalid weight_decay value: {weight_decay}")
        if not (
            (isinstance(betas[0], float) and isinstance(betas[1], float))
            or (isinstance(betas[0], Tensor) and isinstance(betas[1], Tensor))
        ):
            raise ValueError("betas must be either both floats or both Tensors")
        for i in (0, 1):
            if isinstance(betas[i], Tensor):
                if not capturable and foreach:
                    raise ValueError(
                        f"betas[{i}] as a Tensor is not supported for capturable=False and foreach=True"
                    )
                if betas[i].numel() != 1:
                    raise ValueError(f"Tensor betas[{i}] must be 1-element")
        betas = tuple(map(_to_scalar, betas))

        defaults = {
            "lr": lr,
            "betas": betas,
            "eps": eps,
            "weight_decay": weight_decay,
            "amsgrad": amsgrad,
            "maximize": maximize,
            "foreach": foreach,
            "capturable": capturable,
            "differentiable": differentiable,
            "fused": fused,
            "decoupled_weight_decay": decoupled_weight_decay,
        }
        super().__init__(params, defaults, backend, kahan_sum, stochastic_round)

        if fused:
            if differentiable:
                raise RuntimeError("`fused` does not support `differentiable`")
            self._step_supports_amp_scaling = True
            if foreach:
                raise RuntimeError("`fused` and `foreach` cannot be `True` together.")

    GROUP_DEFAULTS = {"amsgrad": False, "maximize": False, "foreach": None,
                      "capturable": False, "differentiable": False,
                      "decoupled_weight_decay": False, "fused": None}
    CAPTURE_HEALTH_CHECK = True

    def __setstate__(self, state):
        super().__setstate__(state)
        for group in self.param_groups:
            fused = group["fused"]
            for p in group["params"]:
                p_state = self.state.get(p, [])
                if len(p_state) != 0 and not torch.is_tensor(p_state["step"]):
                    step_val = float(p_state["step"])
                    p_state["step"] = (
                        torch.tensor(step_val, dtype=_scalar_dtype(is_fused=fused), device=p.device)
                        if group["capturable"] or group["fused"]
                        else torch.tensor(step_val, dtype=_scalar_dtype())
                    )

    def _init_group(self, group, params, grads, exp_avgs, exp_avg_sqs,
                    max_exp_avg_sqs, state_steps):
        # torch's loop, one C-level map per fact (this runs for every param
        # at every step; see benchmarks/, fixed-cost list). Where torch's loop
        # raises, _raise_in_torchs_order raises what it raises first.
        with_grad, their_grads = _base.params_with_grads(group["params"])
        if not with_grad:
            return False
        if (_base.any_sparse(their_grads)
                or (group["foreach"] and torch.is_tensor(group["lr"])
                    and not group["capturable"])):
            self._raise_in_torchs_order(group)
        all_state = self.state
        states = [all_state[p] for p in with_grad]
        self._lazy_state(group, with_grad, states,
                         _AMSGRAD_KEYS if group["amsgrad"] else _KEYS)
        try:
            found = [_base.state_values(states, "exp_avg"),
                     _base.state_values(states, "exp_avg_sq"),
                     _base.state_values(states, "max_exp_avg_sq") if group["amsgrad"] else [],
                     _base.state_values(states, "step")]
        except KeyError:
            self._raise_in_torchs_order(group)
            raise
        if group["differentiable"] and any(s.requires_grad for s in found[3]):
            self._raise_in_torchs_order(group)
        params.extend(with_grad)
        grads.extend(their_grads)
        exp_avgs.extend(found[0])
        exp_avg_sqs.extend(found[1])
        max_exp_avg_sqs.extend(found[2])
        state_steps.extend(found[3])
        # Only torch's own step, which adam() runs for differentiable or
        # capturable groups it cannot fuse, reads has_complex; the kernels
        # see each tensor's dtype. Elsewhere the ~55 us per 161 params that
        # asking costs on a cold cache is saved.
        if group["differentiable"] or group["capturable"]:
            return any(map(torch.is_complex, with_grad))
        return False

    def _raise_in_torchs_order(self, group):
        """torch's ``_init_group`` loop, param by param: raises what it raises first.

        Only reached where some param makes torch's loop raise; params before
        that one get their lazy state, as in torch.
        """
        for p in group["params"]:
            if p.grad is None:
                continue
            if p.grad.is_sparse:
                raise RuntimeError(
                    "Adam does not support sparse gradients, please consider SparseAdam instead"
                )
            state = self.state[p]
            if len(state) == 0:
                self._init_state(group, state, p)
            state["exp_avg"], state["exp_avg_sq"]  # noqa: B018 - KeyError, as torch
            if group["amsgrad"]:
                state["max_exp_avg_sq"]  # noqa: B018
            if group["differentiable"] and state["step"].requires_grad:
                raise RuntimeError(
                    "`requires_grad` is not supported for `step` in differentiable mode"
                )
            if group["foreach"] and torch.is_tensor(group["lr"]) and not group["capturable"]:
                raise RuntimeError(
                    "lr as a Tensor is not supported for capturable=False and foreach=True"
                )
            state["step"]  # noqa: B018

    @staticmethod
    def _init_state(group, state, p):
        if group["fused"]:
            _base.check_fused_device_dtype(p)
        # step lives on the CPU unless capturable or fused, as in torch
        state["step"] = (
            torch.zeros((), dtype=_scalar_dtype(is_fused=group["fused"]), device=p.device)
            if group["capturable"] or group["fused"]
            else torch.tensor(0.0, dtype=_scalar_dtype())
        )
        state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        if group["amsgrad"]:
            state["max_exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)

    def _group_job(self, group, found_inf):
        params: list[Tensor] = []
        grads: list[Tensor] = []
        exp_avgs: list[Tensor] = []
        exp_avg_sqs: list[Tensor] = []
        max_exp_avg_sqs: list[Tensor] = []
        state_steps: list[Tensor] = []
        beta1, beta2 = group["betas"]
        has_complex = self._init_group(group, params, grads, exp_avgs, exp_avg_sqs,
                                       max_exp_avg_sqs, state_steps)
        if group["differentiable"] and group["foreach"] and not group["fused"] and params:
            _check_foreach_capturable(group, params, state_steps)
            _base.check_foreach_autograd(group, params)
        if found_inf is not None and not torch.compiler.is_compiling():
            self._steps_to_device(params, state_steps)
        return _ops.Job(
            params, grads, [exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps], [],
            _hyper(group["lr"], beta1, beta2, group["eps"], group["weight_decay"],
                   group["amsgrad"], group["maximize"], group["capturable"],
                   group["differentiable"], group["decoupled_weight_decay"],
                   has_complex)), None


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


class AdamW(Adam):
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
        backend (str, optional): keyword-only; see :class:`Adam` (default: None)
        kahan_sum (bool, optional): keyword-only. Kahan summation for
            bfloat16/float16 params: a compensation buffer per param (state
            ``"kahan_comp"``, the param's size again) carries each store's
            rounding error into the next step (default: False)
        stochastic_round (bool, optional): keyword-only. Round bfloat16/float16
            param stores stochastically (unbiased), from a stream seeded by
            torch's generator and saved in ``state_dict`` (default: False)
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
    ) -> None:
        super().__init__(params, lr, betas, eps, weight_decay, amsgrad,
                         foreach=foreach, maximize=maximize, capturable=capturable,
                         differentiable=differentiable, fused=fused,
                         decoupled_weight_decay=True, backend=backend,
                         kahan_sum=kahan_sum, stochastic_round=stochastic_round)

    def __setstate__(self, state):
        super().__setstate__(state)
        for group in self.param_groups:
            group["decoupled_weight_decay"] = True


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

    return _tables.prepare_update("adam", name, params, grads, states,
                                ("exp_avg", "exp_avg_sq", "max_exp_avg_sq"), hyper, reference,
                                steps=state_steps, cache=cache, key=key, precision=precision, dry_all=dry_all)


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
