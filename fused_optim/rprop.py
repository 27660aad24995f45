r"""Fused Rprop."""

from __future__ import annotations

import torch
from torch import Tensor

from . import _backend, _base, _ops, _plan
from ._registry import Record

__all__ = ["Rprop", "rprop"]


class Rprop(_base.FusedOptimizer, torch.optim.Rprop):
    r"""Rprop (resilient backpropagation), fused.

    A drop-in replacement for :class:`torch.optim.Rprop`: same arguments,
    defaults, errors, ``state_dict`` and results. Each :meth:`step` updates
    all tensors of one (device, dtype) bucket of a param group in one kernel
    call, and advances each param's own ``step`` count.

    .. math::
       \begin{aligned}
            &\textbf{input}: \theta_0,\ \eta_{+/-} \text{ (etaplus, etaminus)},\
                \Gamma_{max/min} \text{ (step sizes)},\ \eta_0 \text{ (lr)} \\
            &\textbf{initialize}: g^0_{prev} \leftarrow 0,\ \eta_0 \leftarrow \text{lr} \\
            &\textbf{for}\ t = 1, 2, \ldots\ \textbf{do},\ \text{per element}: \\
            &\quad g_t \leftarrow \pm\nabla_\theta f_t(\theta_{t-1})
                \quad (- \text{ if maximize}) \\
            &\quad \textbf{if}\ g^i_{prev} g^i_t > 0:\
                \eta^i_t \leftarrow \min(\eta^i_{t-1}\eta_+, \Gamma_{max}) \\
            &\quad \textbf{else if}\ g^i_{prev} g^i_t < 0:\
                \eta^i_t \leftarrow \max(\eta^i_{t-1}\eta_-, \Gamma_{min}),\ g^i_t \leftarrow 0 \\
            &\quad \textbf{else}:\ \eta^i_t \leftarrow \eta^i_{t-1} \\
            &\quad \theta_t \leftarrow \theta_{t-1} - \eta_t \operatorname{sign}(g_t),\
                g_{prev} \leftarrow g_t
       \end{aligned}

    Args:
        params (iterable): iterable of parameters or named_parameters to
            optimize, or of dicts defining parameter groups.
        lr (float, Tensor, optional): learning rate: the initial step size
            (default: 1e-2)
        etas (Tuple[float, float], optional): pair of (etaminus, etaplus), the
            multiplicative decrease and increase factors (default: (0.5, 1.2))
        step_sizes (Tuple[float, float], optional): pair of minimal and
            maximal allowed step sizes (default: (1e-6, 50))
        capturable (bool, optional): on CUDA, a step with no host
            synchronisation that a CUDA graph can capture (step counters live
            on the device). On CPU, torch's own step runs and raises as torch
            does (default: False)
        foreach (bool, optional): accepted for compatibility (default: None)
        maximize (bool, optional): maximize the objective (default: False)
        differentiable (bool, optional): autograd through the step; runs
            torch's own for-loop step, not the kernels (default: False)
        backend, kahan_sum, stochastic_round, state_dtype: keyword-only, as for every
            class here (see :class:`~fused_optim._base.FusedOptimizer`)

    .. note::
        The sign cases follow torch's for-loop element by element, in the
        storage dtype as torch computes them: the product ``grad * prev``
        rounded to it (bfloat16/float16 products that underflow count as
        zero, as in torch), ``etas`` and ``step_sizes`` as that dtype holds
        them. ``p.grad`` is never written. Only the param store takes
        ``kahan_sum`` / ``stochastic_round``. With ``state_dtype=torch.bfloat16``
        the step size is computed in the compute type and both states are
        rounded once, stochastically; the next step reads only ``prev``'s
        sign, which that rounding keeps (a nonzero below bfloat16's smallest
        subnormal may become zero: its step size then stays).
    """

    def __init__(
        self,
        params,
        lr: float | Tensor = 1e-2,
        etas: tuple[float, float] = (0.5, 1.2),
        step_sizes: tuple[float, float] = (1e-6, 50),
        *,
        capturable: bool = False,
        foreach: bool | None = None,
        maximize: bool = False,
        differentiable: bool = False,
        backend: str | None = None,
        kahan_sum: bool = False,
        stochastic_round: bool = False,
        state_dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__(params, lr, etas, step_sizes, capturable=capturable, foreach=foreach,
                         maximize=maximize, differentiable=differentiable, backend=backend,
                         kahan_sum=kahan_sum, stochastic_round=stochastic_round,
                         state_dtype=state_dtype)

    CAPTURE_HEALTH_CHECK = True

    def _init_group(self, group, params, grads, prevs, step_sizes, state_steps):
        # not torch's: one C-level map per fact (see _base._gather_state)
        with_grad, their_grads = _base.params_with_grads(group["params"])
        if not with_grad:
            return False
        found = self._gather_state(group, with_grad, ("prev", "step_size", "step"),
                                   torchs_raises=_base.any_sparse(their_grads))
        params.extend(with_grad)
        grads.extend(their_grads)
        prevs.extend(found[0])
        step_sizes.extend(found[1])
        state_steps.extend(found[2])
        # only torch's own step (differentiable, or capturable CPU params)
        # reads has_complex; the kernels see each tensor's dtype
        if group["differentiable"] or group["capturable"]:
            return any(map(torch.is_complex, with_grad))
        return False

    STATE_LISTS = 3  # prevs, step_sizes, state_steps

    @staticmethod
    def _hyper(group, has_complex) -> dict:
        etaminus, etaplus = group["etas"]
        step_size_min, step_size_max = group["step_sizes"]
        return _hyper(step_size_min, step_size_max, etaminus, etaplus, group["maximize"],
                      group["capturable"], group["differentiable"], has_complex)


def rprop(
    params: list[Tensor],
    grads: list[Tensor],
    prevs: list[Tensor],
    step_sizes: list[Tensor],
    state_steps: list[Tensor],
    foreach: bool | None = None,
    capturable: bool = False,
    maximize: bool = False,
    differentiable: bool = False,
    has_complex: bool = False,
    *,
    step_size_min: float,
    step_size_max: float,
    etaminus: float,
    etaplus: float,
    backend: str | None = None,
) -> None:
    r"""Functional Rprop: update params and state in place, as :class:`Rprop` does.

    Same arguments as ``torch.optim.rprop.rprop`` (see :class:`Rprop`), plus
    ``backend``. ``state_steps`` are advanced by one.
    """
    if not torch.compiler.is_compiling() and not all(
            isinstance(t, torch.Tensor) for t in state_steps):
        raise RuntimeError(
            "API has changed, `state_steps` argument must contain a list of singleton tensors"
        )
    job = _ops.Job(params, grads, [prevs, step_sizes, state_steps], [],
                   _hyper(step_size_min, step_size_max, etaminus, etaplus, maximize,
                          capturable, differentiable, has_complex))
    RPROP_STEP([job], None, None, backend or "auto", _ops.NO_CACHE,
               traceable=not differentiable)


def _hyper(step_size_min, step_size_max, etaminus, etaplus, maximize, capturable,
           differentiable, has_complex):
    return dict(step_size_min=step_size_min, step_size_max=step_size_max, etaminus=etaminus,
                etaplus=etaplus, maximize=maximize, capturable=capturable,
                differentiable=differentiable, has_complex=has_complex)


def _update(job, key, grad_scale, found_inf, backend, cache, compiled):
    """Validate one group's Rprop update; return what writes it (None: nothing to do).

    Everything that can raise happens here, before any tensor is written.
    """
    params, grads, (prevs, step_sizes, state_steps), _, h, precision = job
    if compiled:
        h = _base.compiled_semantics(h, params)
    step_size_min, step_size_max, etaminus, etaplus = (
        h["step_size_min"], h["step_size_max"], h["etaminus"], h["etaplus"])
    maximize, capturable, differentiable = h["maximize"], h["capturable"], h["differentiable"]
    name = _base.backend_name(backend)
    cpu_capturable = capturable and any(p.device.type == "cpu" for p in params)

    def torchs(ps, gs, prev_list, size_list, steps, differentiable=False):
        from torch.optim.rprop import rprop as torch_rprop

        torch_rprop(ps, gs, prev_list, size_list, steps, foreach=False,
                    capturable=capturable, maximize=maximize, differentiable=differentiable,
                    has_complex=any(map(torch.is_complex, ps)), step_size_min=step_size_min,
                    step_size_max=step_size_max, etaminus=etaminus, etaplus=etaplus)

    if differentiable or (cpu_capturable and not _backend.stands_in_for_gpu(name)):
        # not covered by the kernels: torch's own for-loop (which also raises
        # torch's error for capturable CPU params)
        def fallback():
            if _base.unscale_for_fallback(grads, grad_scale, found_inf):
                return
            torchs(params, grads, prevs, step_sizes, state_steps, differentiable)
        return fallback
    if not params:
        return None
    hyper = dict(etaminus=float(etaminus), etaplus=float(etaplus),
                 step_size_min=float(step_size_min), step_size_max=float(step_size_max),
                 maximize=bool(maximize), grad_scale=grad_scale, found_inf=found_inf)

    def reference(ps, gs, states, steps, flag_rows):
        # torch's for-loop, for rows the kernels do not take
        torchs(ps, gs, states[0], states[1], steps)

    return _plan.prepare_update("rprop", name, params, grads, [prevs, step_sizes],
                                ("prev", "step_size"), hyper, reference, steps=state_steps,
                                cache=cache, key=key, precision=precision)


#: ``fused_optim::rprop_step``: a whole Rprop step as one operator (see _ops)
RPROP_STEP = Rprop.STEP_OP = _ops.UpdateOp(
    "rprop_step", states=("prevs", "step_sizes", "state_steps"),
    scalars=("step_size_min", "step_size_max", "etaminus", "etaplus"),
    switches=("maximize", "capturable", "differentiable", "has_complex"),
    update=_update)


RECORDS = (
    Record("Rprop", "rprop", "rprop", "torch.optim.rprop", kernel="rprop",
           state=("prev", "step_size"), has_step=True),
)
