r"""Fused RMSprop."""

from __future__ import annotations

import torch
from torch import Tensor

from . import _backend, _base, _ops, _tables
from ._registry import Record

__all__ = ["RMSprop", "rmsprop"]


def _scalar_dtype():
    # torch.optim.optimizer._get_scalar_dtype()
    return torch.float64 if torch.get_default_dtype() == torch.float64 else torch.float32


class RMSprop(_base.FusedOptimizer):
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
    ) -> None:
        if isinstance(lr, Tensor) and lr.numel() != 1:
            raise ValueError("Tensor lr must be 1-element")
        if not 0.0 <= lr:
            raise ValueError(f"Invalid learning rate: {lr}")
        if not 0.0 <= eps:
            raise ValueError(f"Invalid epsilon value: {eps}")
        if not 0.0 <= momentum:
            raise ValueError(f"Invalid momentum value: {momentum}")
        if not 0.0 <= weight_decay:
            raise ValueError(f"Invalid weight_decay value: {weight_decay}")
        if not 0.0 <= alpha:
            raise ValueError(f"Invalid alpha value: {alpha}")

        defaults = {
            "lr": lr,
            "momentum": momentum,
            "alpha": alpha,
            "eps": eps,
            "centered": centered,
            "weight_decay": weight_decay,
            "capturable": capturable,
            "foreach": foreach,
            "maximize": maximize,
            "differentiable": differentiable,
        }
        super().__init__(params, defaults, backend, kahan_sum, stochastic_round)

    GROUP_DEFAULTS = {"momentum": 0, "centered": False, "foreach": None, "maximize": False,
                      "differentiable": False, "capturable": False}
    CAPTURE_HEALTH_CHECK = True

    def __setstate__(self, state):
        super().__setstate__(state)
        for group in self.param_groups:
            for p in group["params"]:
                p_state = self.state.get(p, [])
                if len(p_state) != 0 and not torch.is_tensor(p_state["step"]):
                    step_val = float(p_state["step"])
                    p_state["step"] = (
                        torch.tensor(step_val, dtype=_scalar_dtype(), device=p.device)
                        if group["capturable"]
                        else torch.tensor(step_val, dtype=_scalar_dtype())
                    )

    def _init_group(self, group, params, grads, square_avgs, momentum_buffer_list,
                    grad_avgs, state_steps):
        # torch's loop, one C-level map per fact (see Adam._init_group).
        # Where torch's loop raises, _raise_in_torchs_order raises what it
        # raises first.
        with_grad, their_grads = _base.params_with_grads(group["params"])
        if not with_grad:
            return False
        if _base.any_sparse(their_grads):
            self._raise_in_torchs_order(group)
        all_state = self.state
        states = [all_state[p] for p in with_grad]
        needed = {"square_avg", "step"}
        if group["momentum"] > 0:
            needed.add("momentum_buffer")
        if group["centered"]:
            needed.add("grad_avg")
        self._lazy_state(group, with_grad, states, needed)
        try:
            found = [_base.state_values(states, "square_avg"),
                     _base.state_values(states, "step"),
                     _base.state_values(states, "momentum_buffer")
                     if group["momentum"] > 0 else [],
                     _base.state_values(states, "grad_avg") if group["centered"] else []]
        except KeyError:
            self._raise_in_torchs_order(group)
            raise
        params.extend(with_grad)
        grads.extend(their_grads)
        square_avgs.extend(found[0])
        state_steps.extend(found[1])
        momentum_buffer_list.extend(found[2])
        grad_avgs.extend(found[3])
        # only torch's own step (differentiable, or capturable CPU params)
        # reads has_complex; the kernels see each tensor's dtype
        if group["differentiable"] or group["capturable"]:
            return any(map(torch.is_complex, with_grad))
        return False

    def _raise_in_torchs_order(self, group):
        """torch's ``_init_group`` loop, param by param: raises what it raises first.

        Params before the one that raises get their lazy state, as in torch.
        """
        for p in group["params"]:
            if p.grad is None:
                continue
            if p.grad.is_sparse:
                raise RuntimeError("RMSprop does not support sparse gradients")
            state = self.state[p]
            if len(state) == 0:
                self._init_state(group, state, p)
            state["square_avg"], state["step"]  # noqa: B018 - KeyError, as torch
            if group["momentum"] > 0:
                state["momentum_buffer"]  # noqa: B018
            if group["centered"]:
                state["grad_avg"]  # noqa: B018

    @staticmethod
    def _init_state(group, state, p):
        # step lives on the CPU unless capturable, as in torch
        state["step"] = (
            torch.zeros((), dtype=_scalar_dtype(), device=p.device)
            if group["capturable"]
            else torch.zeros((), dtype=_scalar_dtype())
        )
        state["square_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        if group["momentum"] > 0:
            state["momentum_buffer"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        if group["centered"]:
            state["grad_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)

    def _group_job(self, group, found_inf):
        params: list[Tensor] = []
        grads: list[Tensor] = []
        square_avgs: list[Tensor] = []
        momentum_buffer_list: list[Tensor] = []
        grad_avgs: list[Tensor] = []
        state_steps: list[Tensor] = []
        has_complex = self._init_group(group, params, grads, square_avgs,
                                       momentum_buffer_list, grad_avgs, state_steps)
        _base.check_foreach_autograd(group, params)
        if found_inf is not None and not torch.compiler.is_compiling():
            self._steps_to_device(params, state_steps)
        return _ops.Job(
            params, grads, [square_avgs, momentum_buffer_list, grad_avgs, state_steps], [],
            _hyper(group["lr"], group["alpha"], group["eps"], group["weight_decay"],
                   group["momentum"], group["centered"], group["maximize"],
                   group["capturable"], group["differentiable"], has_complex)), None


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

    return _tables.prepare_update("rmsprop", name, params, grads, states,
                                ("square_avg", "momentum_buffer", "grad_avg"), hyper,
                                reference, steps=state_steps, cache=cache, key=key, precision=precision)


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
