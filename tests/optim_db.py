"""The optimizer database the tests are driven from (after torch's
torch/testing/_internal/common_optimizers.py).

One :class:`OptimInfo` per optimizer class of fused_optim, paired by name
with its :class:`fused_optim._registry.Record`. It holds everything a test
needs to know about an optimizer, as data: the configurations to run, the
bad inputs and what they must raise (and when), the capabilities tests
filter on, the oracle (torch's own class, for-loop), and the per-optimizer
facts tests used to get from ``if name == ...`` branches. Tests parametrize
over :data:`OPTIM_DB` (or :func:`with_capability`) and never branch on an
optimizer's name: a new entry enrolls its optimizer in the parity, errors,
state_dict, scheduler, AMP, memory-safety, model-based (machine.py) and
kernels-do-the-math tests. ``test_optim_db.py`` fails while a registered
optimizer has no entry here, or an entry has no registered optimizer.

How to add an optimizer's test record
-------------------------------------
Append ONE ``OptimInfo(...)`` to :data:`OPTIM_DB`. Required fields:

``name``
    the class name, as in the registry (``"Adagrad"``).
``configs``
    a tuple of constructor kwargs dicts covering every branch of the update
    (each option on and off, maximize, weight_decay, ...). A value may be a
    zero-argument callable (``lr=lambda: torch.tensor(0.01)``): it is built
    afresh for each optimizer. ``fused=True`` configs only if torch's class
    takes ``fused``. Parity runs every config on every layout, dtype, backend.
``example``
    one plain working config with an explicit ``lr`` (schedulers, AMP, ...).
``state_config``
    kwargs that, added to ``example``, make every key of the record's
    ``state`` exist after a step (SGD: ``momentum=0.9``; Adam:
    ``amsgrad=True``; ``{}`` when all state always exists).
``error_inputs``
    a tuple of :class:`ErrorInput`: the class's own bad hyperparameters
    (torch's ``__init__`` checks) and step-time errors. The errors every
    ``torch.optim.Optimizer`` raises (empty list, non-leaf, ...) and those
    that follow from the capabilities below are added by
    :meth:`OptimInfo.all_error_inputs`; do not repeat them.
``kwargs_strategy``
    a zero-argument callable returning a hypothesis strategy of valid
    constructor kwargs (test_memory_safety's generated configurations).
``hyperparameter_edits``
    ``(key, value)`` pairs machine.py may write into a param group between
    steps (valid and invalid ones: torch must then raise alike).

Capabilities (defaults in brackets):

``supports_fused`` [False]
    torch's class takes ``fused=True`` (adds fused/foreach/differentiable
    and fused-complex error inputs).
``fused_complex_error`` [RuntimeError, "`fused=True` requires all ..."]
    (type, regex) torch's fused step raises for a complex param that is not
    the group's first (only the first meets the common dtype check).
``foreach_differentiable`` ["error"]
    ``"error"``: with ``foreach=True, differentiable=True`` torch's step
    raises ``AssertionError: _foreach ops don't support autograd`` (an error
    input is generated); ``"steps"``: torch's foreach step runs.
``supports_capturable`` [False]
    torch's class takes ``capturable=True`` (on CPU torch's step then
    raises; the error input is added for the numba and torch backends).
``capturable_error`` [AssertionError, "If capturable=True, params and state_steps ..."]
    (type, regex) torch's step raises for capturable CPU params.
``supports_complex`` [True]
    complex params are optimized as real views, like torch.
``bit_exact`` [frozenset()]
    dtypes in which fused_optim matches torch's for-loop bit for bit (SGD:
    fp32 and fp64). Elsewhere, within matrix.TOLERANCE.
``sparse_grads`` ["error"]
    ``"error"``: torch's step raises on a sparse grad, and so must ours
    (an error input is generated). ``"torch-path"``: torch steps sparse
    grads, and fused_optim runs torch's code for them.
``lazy_state`` [()]
    state keys created from the first grad rather than as zeros (SGD's
    ``momentum_buffer``); ``with_capability("creates_state_lazily")``.
``scale_sensitive`` [{}]
    kwargs under which a missing GradScaler unscale would show in the result
    (Adam normalises the grad away unless ``eps`` is large: ``eps=0.1``).
``torch_functions`` [derived]
    names in the record's ``torch_module`` that compute torch's step;
    test_kernels_do_the_math makes them raise. Default: the functional and
    its ``_single_tensor_``/``_multi_tensor_``/``_fused_`` variants (torch's
    RMSprop/Adagrad have no ``_fused_``: list the names that exist).
``cast_on_load`` [()]
    state keys torch keeps in float32 but its ``load_state_dict`` casts to
    the param's dtype (NAdam's ``mu_product``): a resumed bf16 run is then
    not the uninterrupted one, in torch too.
``compiled_tolerance`` [None]
    ``assert_close`` tolerances of fused_optim's compiled step against
    torch's compiled step, where torch's (traced with capturable's float32
    tensor arithmetic for its scalars) strays from its own for-loop by more
    than ``matrix.TOLERANCE`` (None: that tolerance); False: torch's
    compiled step is no reference at all (checked against its for-loop only).
``skip_common_errors`` [()]
    descriptions of COMMON_ERROR_INPUTS torch's class does not raise for.
``torch_steps_dtensor`` [True]
    torch's for-loop step runs on FSDP2's sharded DTensor params (Rprop's
    does not in torch 2.13: ``sign[sign.gt(0)] = etaplus`` is an
    ``index_put_`` DTensor refuses); test_distributed's FSDP2 case and its
    checkpoint cases across kinds then check that torch's step raises.
``shadow_kwargs`` [{}]
    kwargs added to ``full_state_example`` in test_precision's float64-shadow
    runs, which need every update proportional to ``lr`` (Rprop: an etaplus
    near 1, else its step sizes grow geometrically from lr).

``with_capability(cap)`` selects entries by: ``"fused"``, ``"capturable"``,
``"complex"``, ``"bit_exact"``, ``"creates_state_lazily"``, ``"has_step"``,
``"sparse_grads:error"``, ``"sparse_grads:torch-path"``.

Everything else comes from the registry record: ``state`` (the state keys),
``has_step`` (a float32 ``state["step"]``), ``torch_cls`` (the oracle).
"""

from __future__ import annotations

import dataclasses
import importlib
from typing import Any, Callable

import torch

from fused_optim import _registry

CONSTRUCT = "construct"
STEP = "step"


def _param(*shape):
    return torch.randn(*shape or (3,)).requires_grad_()


def _one_param():
    return [_param()]


def _nonleaf():
    return torch.randn(3, requires_grad=True) * 2


def _ones_grad(p):
    p.grad = torch.ones_like(p)


def _sparse_grad(p):
    idx = torch.tensor([[0, 2]])
    p.grad = torch.sparse_coo_tensor(idx, torch.tensor([1.0, -2.0]), p.shape)


@dataclasses.dataclass(frozen=True)
class ErrorInput:
    """A bad input, what torch raises for it, and when (after torch's ErrorOptimizerInput).

    ``error_on=CONSTRUCT``: building the optimizer from ``params()`` and
    ``kwargs()`` raises. ``error_on=STEP``: it builds from ``param()`` (one
    param, or a list of them), ``set_grad`` runs on each, and ``step()``
    raises (and must write nothing: no param, no existing state tensor). ``backends``: only these fused_optim backends are held
    to it (None: all).
    """

    desc: str
    kwargs: Callable[[], dict]
    error_type: type
    error_regex: str
    error_on: str = CONSTRUCT
    params: Callable[[], Any] = _one_param
    param: Callable[[], Any] = lambda: _param(4)
    set_grad: Callable[[torch.Tensor], None] = _ones_grad
    backends: tuple | None = None


def _no_kwargs():
    return {}


#: what every torch.optim.Optimizer raises, whatever the class
COMMON_ERROR_INPUTS = (
    ErrorInput("params as one Tensor", lambda: dict(lr=0.1), TypeError,
               "should be an iterable of Tensors or dicts", params=_param),
    ErrorInput("empty parameter list", lambda: dict(lr=0.1), ValueError,
               "empty parameter list", params=lambda: []),
    ErrorInput("non-leaf tensor", lambda: dict(lr=0.1), ValueError,
               "can't optimize a non-leaf Tensor", params=lambda: [_nonleaf()]),
    ErrorInput("param in two groups", lambda: dict(lr=0.1), ValueError,
               "more than one parameter group",
               params=lambda: (lambda q: [{"params": [q]}, {"params": [q]}])(_param())),
    ErrorInput("integer tensor that requires grad", lambda: dict(lr=0.1), RuntimeError,
               "only Tensors of floating point dtype",
               params=lambda: [torch.ones(3, dtype=torch.int64).requires_grad_()]),
    ErrorInput("group without params", _no_kwargs, KeyError, "params",
               params=lambda: [{"lr": 0.1}]),
    ErrorInput("negative lr", lambda: dict(lr=-0.1), ValueError, "Invalid learning rate"),
    ErrorInput("2-element Tensor lr", lambda: dict(lr=torch.tensor([0.1, 0.2])), ValueError,
               "Tensor lr must be 1-element"),
    ErrorInput("negative weight_decay", lambda: dict(weight_decay=-1e-4), ValueError,
               "Invalid weight_decay value"),
)

_FUSED_ERROR_INPUTS = (
    ErrorInput("fused and differentiable", lambda: dict(fused=True, differentiable=True),
               RuntimeError, "`fused` does not support `differentiable`"),
    ErrorInput("fused and foreach", lambda: dict(fused=True, foreach=True), RuntimeError,
               "`fused` and `foreach` cannot be `True` together"),
    ErrorInput("fused complex", lambda: dict(fused=True), RuntimeError,
               "`fused=True` requires all the params to be floating point", error_on=STEP,
               param=lambda: torch.randn(3, dtype=torch.complex64).requires_grad_()),
)


def _real_then_complex():
    # torch checks only the first param's dtype up front: a complex param
    # after it meets each class's own later check
    return [_param(4), torch.randn(3, dtype=torch.complex64).requires_grad_()]


def _fused_complex_not_first(error):
    error_type, error_regex = error
    return ErrorInput("fused complex param not first", lambda: dict(fused=True), error_type,
                      error_regex, error_on=STEP, param=_real_then_complex)


_FOREACH_DIFFERENTIABLE_ERROR_INPUTS = (
    ErrorInput("foreach and differentiable", lambda: dict(foreach=True, differentiable=True),
               AssertionError, "_foreach ops don't support autograd", error_on=STEP),
)

def _capturable_on_cpu(error):
    # (interpreted Triton lets CPU tensors stand in for CUDA, where it is valid)
    error_type, error_regex = error
    return ErrorInput("capturable on CPU", lambda: dict(capturable=True), error_type,
                      error_regex, error_on=STEP, backends=("numba", "torch"))

_SPARSE_ERROR_INPUTS = (
    ErrorInput("sparse grad", _no_kwargs, RuntimeError, "does not support sparse gradients",
               error_on=STEP, set_grad=_sparse_grad),
)


@dataclasses.dataclass(frozen=True)
class OptimInfo:
    """One optimizer's test data; see the module docstring for the fields."""

    name: str
    configs: tuple
    example: dict
    state_config: dict
    error_inputs: tuple
    kwargs_strategy: Callable[[], Any]
    hyperparameter_edits: tuple
    supports_fused: bool = False
    fused_complex_error: tuple = (
        RuntimeError, "`fused=True` requires all the params to be floating point")
    foreach_differentiable: str = "error"
    supports_capturable: bool = False
    capturable_error: tuple = (
        AssertionError, "If capturable=True, params and state_steps must be on supported devices")
    supports_complex: bool = True
    bit_exact: frozenset = frozenset()
    sparse_grads: str = "error"
    lazy_state: tuple = ()
    scale_sensitive: dict = dataclasses.field(default_factory=dict)
    torch_functions: tuple | None = None
    skip_common_errors: tuple = ()
    shadow_kwargs: dict = dataclasses.field(default_factory=dict)
    torch_steps_dtensor: bool = True
    cast_on_load: tuple = ()
    compiled_tolerance: dict | bool | None = None

    # ------------------------------------------------------------ derived

    @property
    def record(self) -> _registry.Record:
        return _registry.get(self.name)

    @property
    def cls(self) -> type:
        return self.record.cls

    @property
    def state_keys(self) -> tuple:
        """The record's state keys, its per-param scalars last."""
        return self.record.state + self.record.scalars

    @property
    def has_step(self) -> bool:
        return self.record.has_step

    @property
    def full_state_example(self) -> dict:
        """``example`` plus ``state_config``: every state key exists after a step."""
        return {**self.example, **self.state_config}

    def oracle(self, params, **kwargs):
        """torch's own class, for-loop (foreach=False), even under patch_torch."""
        kwargs.pop("fused", None)
        return self.record.torch_cls(params, foreach=False, **kwargs)

    def torch_step_functions(self):
        """(module, names) of torch's code that computes this optimizer's step."""
        f = self.record.functional
        names = self.torch_functions or (f, f"_single_tensor_{f}", f"_multi_tensor_{f}",
                                         f"_fused_{f}")
        return importlib.import_module(self.record.torch_module), tuple(names)

    def configs_for(self, device="cpu", dtype=None) -> list:
        """The configs that apply on ``device`` (capturable ones need an accelerator)."""
        return [kw for kw in self.configs
                if device != "cpu" or not kw.get("capturable", False)]

    def is_bit_exact(self, *dtypes) -> bool:
        return bool(dtypes) and all(dt in self.bit_exact for dt in dtypes)

    def capabilities(self) -> frozenset:
        caps = set()
        if self.supports_fused:
            caps.add("fused")
        if self.supports_capturable:
            caps.add("capturable")
        if self.supports_complex:
            caps.add("complex")
        if self.bit_exact:
            caps.add("bit_exact")
        if self.lazy_state:
            caps.add("creates_state_lazily")
        if self.has_step:
            caps.add("has_step")
        caps.add(f"sparse_grads:{self.sparse_grads}")
        return frozenset(caps)

    def all_error_inputs(self) -> tuple:
        """The class's own error inputs, the common ones, and those its capabilities imply."""
        out = [e for e in COMMON_ERROR_INPUTS if e.desc not in self.skip_common_errors]
        out += self.error_inputs
        if self.supports_fused:
            out += _FUSED_ERROR_INPUTS
            out.append(_fused_complex_not_first(self.fused_complex_error))
        if self.foreach_differentiable == "error":
            out += _FOREACH_DIFFERENTIABLE_ERROR_INPUTS
        if self.supports_capturable:
            out.append(_capturable_on_cpu(self.capturable_error))
        if self.sparse_grads == "error":
            out += _SPARSE_ERROR_INPUTS
        return tuple(out)


def _st():
    from hypothesis import strategies as st
    return st


def _sgd_strategy():
    st = _st()
    return st.fixed_dictionaries({"lr": st.floats(1e-4, 1.0),
                                  "momentum": st.sampled_from([0.0, 0.5, 0.9]),
                                  "weight_decay": st.sampled_from([0.0, 1e-2]),
                                  "maximize": st.booleans()})


def _adam_strategy():
    st = _st()
    return st.fixed_dictionaries({"lr": st.floats(1e-4, 0.1), "amsgrad": st.booleans(),
                                  "betas": st.tuples(st.floats(0.0, 0.99),
                                                     st.floats(0.0, 0.999)),
                                  "weight_decay": st.sampled_from([0.0, 0.1]),
                                  "maximize": st.booleans()})


def _adagrad_strategy():
    st = _st()
    return st.fixed_dictionaries({"lr": st.floats(1e-4, 1.0),
                                  "lr_decay": st.sampled_from([0.0, 0.01, 0.1]),
                                  "weight_decay": st.sampled_from([0.0, 1e-2]),
                                  "initial_accumulator_value": st.sampled_from([0.0, 0.1]),
                                  "eps": st.sampled_from([1e-10, 1e-3]),
                                  "maximize": st.booleans()})


def _rmsprop_strategy():
    st = _st()
    return st.fixed_dictionaries({"lr": st.floats(1e-4, 0.1),
                                  "alpha": st.sampled_from([0.99, 0.9, 0.3]),
                                  "eps": st.sampled_from([1e-8, 1e-3]),
                                  "momentum": st.sampled_from([0.0, 0.5, 0.9]),
                                  "centered": st.booleans(),
                                  "weight_decay": st.sampled_from([0.0, 1e-2]),
                                  "maximize": st.booleans()})


def _adadelta_strategy():
    st = _st()
    return st.fixed_dictionaries({"lr": st.floats(1e-3, 1.0),
                                  "rho": st.sampled_from([0.9, 0.5, 0.0, 1.0]),
                                  "eps": st.sampled_from([1e-6, 1e-3]),
                                  "weight_decay": st.sampled_from([0.0, 1e-2]),
                                  "maximize": st.booleans()})


def _rprop_strategy():
    st = _st()
    return st.fixed_dictionaries({"lr": st.floats(1e-4, 0.1),
                                  "etas": st.sampled_from([(0.5, 1.2), (0.3, 1.5), (0.9, 1.01)]),
                                  "step_sizes": st.sampled_from([(1e-6, 50.0), (1e-3, 0.05)]),
                                  "maximize": st.booleans()})


def _adamax_strategy():
    st = _st()
    return st.fixed_dictionaries({"lr": st.floats(1e-4, 0.1),
                                  "betas": st.tuples(st.floats(0.0, 0.99),
                                                     st.floats(0.0, 0.999)),
                                  "eps": st.sampled_from([1e-8, 1e-3]),
                                  "weight_decay": st.sampled_from([0.0, 0.1]),
                                  "maximize": st.booleans()})


def _radam_strategy():
    st = _st()
    return st.fixed_dictionaries({"lr": st.floats(1e-4, 0.1),
                                  "betas": st.tuples(st.floats(0.0, 0.99),
                                                     st.floats(0.0, 0.999)),
                                  "weight_decay": st.sampled_from([0.0, 0.1]),
                                  "decoupled_weight_decay": st.booleans(),
                                  "maximize": st.booleans()})


def _nadam_strategy():
    st = _st()
    return st.fixed_dictionaries({"lr": st.floats(1e-4, 0.1),
                                  "betas": st.tuples(st.floats(0.0, 0.99),
                                                     st.floats(0.0, 0.999)),
                                  "momentum_decay": st.sampled_from([4e-3, 0.0, 0.5]),
                                  "weight_decay": st.sampled_from([0.0, 0.1]),
                                  "decoupled_weight_decay": st.booleans(),
                                  "maximize": st.booleans()})


def _asgd_strategy():
    st = _st()
    return st.fixed_dictionaries({"lr": st.floats(1e-4, 0.1),
                                  "lambd": st.sampled_from([1e-4, 0.0, 0.1]),
                                  "alpha": st.sampled_from([0.75, 0.5, 1.0]),
                                  "t0": st.sampled_from([1e6, 0.0, 1.5]),
                                  "weight_decay": st.sampled_from([0.0, 0.1]),
                                  "maximize": st.booleans()})

_ADAM_EDITS = (
    ("lr", 0.003), ("weight_decay", 0.0), ("weight_decay", 0.3),
    ("betas", (0.8, 0.95)), ("betas", (1.0, 0.999)), ("betas", (0.9, 1.0)),
    ("betas", (-0.5, 0.99)), ("eps", 0.0), ("maximize", True), ("maximize", False))

#: torch's __init__ checks shared by Adamax, RAdam and NAdam
_BETAS_EPS_ERRORS = (
    ErrorInput("negative eps", lambda: dict(eps=-1e-8), ValueError, "Invalid epsilon value"),
    ErrorInput("beta0 = 1", lambda: dict(betas=(1.0, 0.999)), ValueError,
               "Invalid beta parameter at index 0"),
    ErrorInput("beta1 < 0", lambda: dict(betas=(0.9, -0.1)), ValueError,
               "Invalid beta parameter at index 1"),
)

_ADAM_ERRORS = (
    ErrorInput("negative eps", lambda: dict(eps=-1e-8), ValueError, "Invalid epsilon value"),
    ErrorInput("beta0 = 1", lambda: dict(betas=(1.0, 0.999)), ValueError,
               "Invalid beta parameter at index 0"),
    ErrorInput("beta1 < 0", lambda: dict(betas=(0.9, -0.1)), ValueError,
               "Invalid beta parameter at index 1"),
    ErrorInput("betas mixed float/Tensor", lambda: dict(betas=(0.9, torch.tensor(0.99))),
               ValueError, "betas must be either both floats or both Tensors"),
    ErrorInput("Tensor lr with foreach", lambda: dict(lr=torch.tensor(0.01), foreach=True),
               ValueError, "lr as a Tensor is not supported for capturable=False and foreach=True"),
    ErrorInput("Tensor betas with foreach",
               lambda: dict(betas=(torch.tensor(0.9), torch.tensor(0.99)), foreach=True),
               ValueError, r"betas\[0\] as a Tensor is not supported"),
    # torch's _multi_tensor_adam checks the devices first (its own list, no 'xla')
    ErrorInput("capturable, foreach and differentiable on CPU",
               lambda: dict(capturable=True, foreach=True, differentiable=True),
               AssertionError, r"If capturable=True, params and state_steps must be on "
               r"supported devices: \[[^\]]*'privateuseone'\]\.$", error_on=STEP),
    ErrorInput("2-element Tensor beta",
               lambda: dict(betas=(torch.tensor([0.9, 0.8]), torch.tensor(0.99))),
               RuntimeError, "Boolean value of Tensor with more than one value is ambiguous"),
)

OPTIM_DB = (
    OptimInfo(
        name="SGD",
        configs=(
            dict(lr=0.1),
            dict(lr=0.1, weight_decay=0.1),
            dict(lr=0.1, momentum=0.9),
            dict(lr=0.1, momentum=0.9, dampening=0.5),
            dict(lr=0.1, momentum=0.9, nesterov=True, weight_decay=0.1),
            dict(lr=0.1, momentum=0.9, maximize=True, weight_decay=0.05),
            dict(lr=lambda: torch.tensor(0.05), momentum=0.5),
            dict(lr=0.05, momentum=0.9, fused=True),
        ),
        example=dict(lr=0.1),
        state_config=dict(momentum=0.9),
        error_inputs=(
            ErrorInput("negative momentum", lambda: dict(momentum=-0.5), ValueError,
                       "Invalid momentum value"),
            ErrorInput("nesterov without momentum", lambda: dict(nesterov=True), ValueError,
                       "Nesterov momentum requires a momentum and zero dampening"),
            ErrorInput("nesterov with dampening",
                       lambda: dict(momentum=0.9, dampening=0.1, nesterov=True), ValueError,
                       "Nesterov momentum requires a momentum and zero dampening"),
            ErrorInput("fused sparse grad", lambda: dict(fused=True), RuntimeError,
                       "`_fused_sgd` does not support sparse gradients",
                       error_on=STEP, set_grad=_sparse_grad),
        ),
        kwargs_strategy=_sgd_strategy,
        hyperparameter_edits=(
            ("lr", 0.02), ("lr", 0.2), ("weight_decay", 0.0), ("weight_decay", 0.05),
            ("momentum", 0.0), ("momentum", 0.5), ("dampening", 0.1),
            ("maximize", True), ("maximize", False)),
        supports_fused=True,
        fused_complex_error=(NotImplementedError,
                             "\"fused_sgd_kernel\" not implemented for 'ComplexFloat'"),
        foreach_differentiable="steps",  # torch's _multi_tensor_sgd does not check
        bit_exact=frozenset({torch.float32, torch.float64}),
        sparse_grads="torch-path",
        lazy_state=("momentum_buffer",),
    ),
    OptimInfo(
        name="Adam",
        configs=(
            dict(),
            dict(lr=0.01, weight_decay=0.1),
            dict(lr=0.01, amsgrad=True),
            dict(lr=0.01, maximize=True, betas=(0.5, 0.9), eps=1e-3),
            dict(lr=0.01, weight_decay=0.1, decoupled_weight_decay=True, amsgrad=True),
            dict(lr=lambda: torch.tensor(0.01),
                 betas=lambda: (torch.tensor(0.8), torch.tensor(0.95))),
            dict(lr=0.02, betas=(0.3, 0.99)),  # 1 - beta1 >= 0.5: lerp's other branch
            dict(lr=0.01, fused=True, weight_decay=0.01),
        ),
        example=dict(lr=0.01),
        state_config=dict(amsgrad=True),
        error_inputs=_ADAM_ERRORS,
        kwargs_strategy=_adam_strategy,
        hyperparameter_edits=_ADAM_EDITS,
        supports_fused=True,
        supports_capturable=True,
        scale_sensitive=dict(eps=0.1),
    ),
    OptimInfo(
        name="AdamW",
        configs=(
            dict(),
            dict(lr=0.01, amsgrad=True, weight_decay=0.5),
            dict(lr=0.01, maximize=True),
        ),
        example=dict(lr=0.01),
        state_config=dict(amsgrad=True),
        error_inputs=_ADAM_ERRORS,
        kwargs_strategy=_adam_strategy,
        hyperparameter_edits=_ADAM_EDITS,
        supports_fused=True,
        supports_capturable=True,
        scale_sensitive=dict(eps=0.1),
        torch_functions=("adamw",),  # torch's AdamW runs torch.optim.adam's code
    ),
    OptimInfo(
        name="Adagrad",
        # each option in at least one config, combined to keep CI's budget
        configs=(
            dict(lr=0.1, lr_decay=0.05, weight_decay=0.1),
            dict(lr=0.05, initial_accumulator_value=0.5, eps=1e-3),
            dict(lr=0.1, maximize=True, weight_decay=0.05, lr_decay=0.01),
            dict(lr=lambda: torch.tensor(0.05), lr_decay=0.3),  # torch divides in float32
            dict(lr=0.05, fused=True, weight_decay=0.01),
        ),
        example=dict(lr=0.1),
        state_config={},  # torch makes "step" and "sum" at construction
        error_inputs=(
            ErrorInput("negative lr_decay", lambda: dict(lr_decay=-0.1), ValueError,
                       "Invalid lr_decay value"),
            ErrorInput("negative initial_accumulator_value",
                       lambda: dict(initial_accumulator_value=-1.0), ValueError,
                       "Invalid initial_accumulator_value value"),
            ErrorInput("negative eps", lambda: dict(eps=-1e-10), ValueError,
                       "Invalid epsilon value"),
            ErrorInput("sparse grad with weight_decay", lambda: dict(weight_decay=0.1),
                       RuntimeError, "weight_decay option is not compatible with sparse gradients",
                       error_on=STEP, set_grad=_sparse_grad),
            ErrorInput("fused sparse grad", lambda: dict(fused=True), RuntimeError,
                       "`fused` does not support sparse grad or complex param",
                       error_on=STEP, set_grad=_sparse_grad),
        ),
        kwargs_strategy=_adagrad_strategy,
        hyperparameter_edits=(
            ("lr", 0.02), ("lr", 0.3), ("lr_decay", 0.0), ("lr_decay", 0.1),
            ("lr_decay", -1.0),  # 1 + (step - 1) * lr_decay == 0 at step 2: ZeroDivisionError
            ("weight_decay", 0.0), ("weight_decay", 0.05), ("eps", 1e-3), ("eps", 0.0),
            ("initial_accumulator_value", 1.0),  # torch reads the constructor's, not the group's
            ("maximize", True), ("maximize", False)),
        supports_fused=True,
        fused_complex_error=(RuntimeError,
                             "`fused` does not support sparse grad or complex param"),
        sparse_grads="torch-path",
        scale_sensitive=dict(eps=0.1),
    ),
    OptimInfo(
        name="RMSprop",
        # each option in at least one config, combined to keep CI's budget
        configs=(
            dict(lr=0.01, alpha=0.9, eps=1e-6),
            dict(lr=0.01, momentum=0.9, centered=True, weight_decay=0.1),
            dict(lr=0.01, maximize=True, weight_decay=0.05, eps=1e-3, momentum=0.5),
            # 1 - alpha >= 0.5: torch.lerp's other side
            dict(lr=lambda: torch.tensor(0.01), centered=True, alpha=0.3),
            dict(lr=0.01, capturable=True),
            dict(lr=0.01, capturable=True, momentum=0.9, centered=True, weight_decay=0.1),
        ),
        example=dict(lr=0.01),
        state_config=dict(momentum=0.9, centered=True),
        error_inputs=(
            ErrorInput("negative eps", lambda: dict(eps=-1e-8), ValueError,
                       "Invalid epsilon value"),
            ErrorInput("negative momentum", lambda: dict(momentum=-0.5), ValueError,
                       "Invalid momentum value"),
            ErrorInput("negative alpha", lambda: dict(alpha=-0.1), ValueError,
                       "Invalid alpha value"),
        ),
        kwargs_strategy=_rmsprop_strategy,
        hyperparameter_edits=(
            ("lr", 0.003), ("alpha", 0.5), ("alpha", 1.0), ("eps", 0.0),
            ("weight_decay", 0.0), ("weight_decay", 0.1),
            ("momentum", 0.0), ("momentum", 0.9),  # switched on later: torch's KeyError
            ("centered", True), ("centered", False), ("maximize", True), ("maximize", False)),
        supports_capturable=True,
        scale_sensitive=dict(eps=0.1),
        # torch's RMSprop has no _fused_rmsprop
        torch_functions=("rmsprop", "_single_tensor_rmsprop", "_multi_tensor_rmsprop"),
    ),
    OptimInfo(
        name="Adadelta",
        # each option in at least one config, combined to keep CI's budget
        configs=(
            dict(lr=1.0),
            dict(lr=0.5, rho=0.5, eps=1e-3, weight_decay=0.1),
            dict(lr=0.5, maximize=True, weight_decay=0.05, rho=0.95),
            dict(lr=lambda: torch.tensor(0.5), rho=0.3),
            dict(lr=1.0, capturable=True, weight_decay=0.1),
        ),
        example=dict(lr=1.0),
        state_config={},  # square_avg, acc_delta and step exist after every step
        error_inputs=(
            ErrorInput("rho above 1", lambda: dict(rho=1.5), ValueError, "Invalid rho value"),
            ErrorInput("negative eps", lambda: dict(eps=-1e-6), ValueError,
                       "Invalid epsilon value"),
        ),
        kwargs_strategy=_adadelta_strategy,
        hyperparameter_edits=(
            ("lr", 0.3), ("rho", 0.5), ("rho", 1.0), ("rho", 0.0), ("eps", 0.0),
            ("weight_decay", 0.0), ("weight_decay", 0.1), ("maximize", True),
            ("maximize", False)),
        supports_capturable=True,
        scale_sensitive=dict(eps=0.1),
        # torch's Adadelta has no _fused_adadelta
        torch_functions=("adadelta", "_single_tensor_adadelta", "_multi_tensor_adadelta"),
    ),
    OptimInfo(
        name="Rprop",
        # each option in at least one config, combined to keep CI's budget
        configs=(
            dict(lr=0.01),
            # both clamps bind: step sizes leave [1e-3, 0.05] within a few steps
            dict(lr=0.02, etas=(0.3, 1.5), step_sizes=(1e-3, 0.05)),
            dict(lr=0.01, maximize=True, etas=(0.9, 1.01)),
            dict(lr=lambda: torch.tensor(0.02)),  # read once, for the first step sizes
            dict(lr=0.01, capturable=True, maximize=True),
        ),
        example=dict(lr=0.01),
        state_config={},  # prev, step_size and step exist after every step
        error_inputs=(
            ErrorInput("etaminus above 1", lambda: dict(etas=(1.5, 1.2)), ValueError,
                       "Invalid eta values: 1.5, 1.2"),
            ErrorInput("etaplus below 1", lambda: dict(etas=(0.5, 0.9)), ValueError,
                       "Invalid eta values: 0.5, 0.9"),
        ),
        kwargs_strategy=_rprop_strategy,
        hyperparameter_edits=(
            ("lr", 0.3),  # torch reads lr only when it creates the step sizes
            ("etas", (0.4, 1.3)), ("etas", (1.5, 1.2)),  # not checked at step time
            ("step_sizes", (1e-4, 0.02)), ("maximize", True), ("maximize", False)),
        supports_capturable=True,
        bit_exact=frozenset({torch.float32, torch.float64}),
        # torch's Rprop has no _fused_rprop
        torch_functions=("rprop", "_single_tensor_rprop", "_multi_tensor_rprop"),
        skip_common_errors=("negative weight_decay",),  # Rprop has no weight_decay
        shadow_kwargs=dict(etas=(0.5, 1.001)),
        torch_steps_dtensor=False,
    ),
    OptimInfo(
        name="Adamax",
        # each option in at least one config, combined to keep CI's budget
        configs=(
            dict(lr=0.01),
            dict(lr=0.01, weight_decay=0.1, maximize=True, eps=1e-3),
            # 1 - beta1 >= 0.5: torch.lerp's other side; torch divides in float32
            dict(lr=lambda: torch.tensor(0.01), betas=(0.3, 0.99)),
            dict(lr=0.01, capturable=True, weight_decay=0.1),
        ),
        example=dict(lr=0.01),
        state_config={},
        error_inputs=_BETAS_EPS_ERRORS,
        kwargs_strategy=_adamax_strategy,
        hyperparameter_edits=(
            ("lr", 0.003), ("weight_decay", 0.0), ("weight_decay", 0.3),
            ("betas", (0.8, 0.95)),
            ("betas", (1.0, 0.999)),  # 1 - beta1**step == 0: ZeroDivisionError
            ("betas", (-0.5, 0.99)), ("eps", 0.0), ("maximize", True), ("maximize", False)),
        supports_capturable=True,
        scale_sensitive=dict(eps=0.1),
        # torch's Adamax has no _fused_adamax
        torch_functions=("adamax", "_single_tensor_adamax", "_multi_tensor_adamax"),
    ),
    OptimInfo(
        name="RAdam",
        # each option in at least one config, combined to keep CI's budget;
        # beta2 = 0.9 rectifies from step 6 on, 0.999 from step 7: parity's
        # steps cross the switch (rho_t > 5)
        configs=(
            dict(lr=0.01, betas=(0.9, 0.9)),
            dict(lr=0.01, weight_decay=0.1, maximize=True, eps=1e-3),
            dict(lr=0.01, weight_decay=0.1, decoupled_weight_decay=True, betas=(0.3, 0.5)),
            dict(lr=lambda: torch.tensor(0.01), betas=(0.8, 0.9)),
            dict(lr=0.01, capturable=True, weight_decay=0.1, betas=(0.9, 0.9)),
        ),
        # rectified from step 6 on; with the default beta2 (rectified from step 7,
        # by a tiny term at first) the first six steps dwarf the rest, and
        # test_precision's shadow run, whose steps must be a tenth of an ulp
        # each, could not be made
        example=dict(lr=0.01, betas=(0.9, 0.9)),
        state_config={},
        error_inputs=_BETAS_EPS_ERRORS,
        kwargs_strategy=_radam_strategy,
        hyperparameter_edits=(
            ("lr", 0.003), ("weight_decay", 0.0), ("weight_decay", 0.3),
            ("decoupled_weight_decay", True), ("betas", (0.8, 0.9)),
            ("betas", (0.9, 1.0)),  # 2 / (1 - beta2): ZeroDivisionError
            ("betas", (-0.5, 0.99)), ("eps", 0.0), ("maximize", True), ("maximize", False)),
        supports_capturable=True,
        # measured: 1.8e-5 absolute, 5.4e-5 relative from torch's for-loop
        # after OneCycleLR's steps (test_compile)
        compiled_tolerance=dict(rtol=2e-4, atol=1e-4),
        scale_sensitive=dict(eps=0.1, betas=(0.9, 0.5)),
        # torch's RAdam has no _fused_radam
        torch_functions=("radam", "_single_tensor_radam", "_multi_tensor_radam"),
    ),
    OptimInfo(
        name="NAdam",
        # each option in at least one config, combined to keep CI's budget
        configs=(
            dict(lr=0.01),
            dict(lr=0.01, weight_decay=0.1, maximize=True, eps=1e-3, momentum_decay=0.3),
            dict(lr=0.01, weight_decay=0.1, decoupled_weight_decay=True, betas=(0.3, 0.9)),
            dict(lr=lambda: torch.tensor(0.01), momentum_decay=0.0),
            dict(lr=0.01, capturable=True, weight_decay=0.1),
        ),
        example=dict(lr=0.01),
        state_config={},
        error_inputs=(
            *_BETAS_EPS_ERRORS,
            ErrorInput("negative momentum_decay", lambda: dict(momentum_decay=-0.1),
                       ValueError, "Invalid momentum_decay value"),
        ),
        kwargs_strategy=_nadam_strategy,
        hyperparameter_edits=(
            ("lr", 0.003), ("weight_decay", 0.0), ("weight_decay", 0.3),
            ("decoupled_weight_decay", True), ("momentum_decay", 0.1),
            ("betas", (0.8, 0.95)),
            ("betas", (2.0, 0.999)),  # beta1 outside [0, 1): dry runs on every row
            ("betas", (0.9, 1.0)), ("eps", 0.0), ("maximize", True), ("maximize", False)),
        supports_capturable=True,
        capturable_error=(AssertionError, "If capturable=True, params, mu_products and "
                          "state_steps must be on supported devices"),
        cast_on_load=("mu_product",),
        # torch's own compiled NAdam ends 0.097 (30% relative) away from its
        # for-loop after test_compile's OneCycleLR schedule (torch 2.13,
        # 2026-12-07); fused_optim's compiled step matches the for-loop
        compiled_tolerance=False,
        scale_sensitive=dict(eps=0.1),
        # torch's NAdam has no _fused_nadam
        torch_functions=("nadam", "_single_tensor_nadam", "_multi_tensor_nadam"),
    ),
    OptimInfo(
        name="ASGD",
        # each option in at least one config, combined to keep CI's budget;
        # t0 = 0 averages from the third step on (mu = 1 / (step - t0)), the
        # default t0 copies the param into ax at every step (torch's mu == 1 branch)
        configs=(
            dict(lr=0.01),
            dict(lr=0.01, t0=0.0, lambd=0.01, alpha=0.5, weight_decay=0.1),
            dict(lr=0.01, t0=1.5, maximize=True, lambd=0.1),
            dict(lr=lambda: torch.tensor(0.01), t0=0.0),
            dict(lr=0.01, capturable=True, t0=0.0, weight_decay=0.1),
        ),
        example=dict(lr=0.01, t0=0.0),
        state_config={},  # ax, mu, eta and step exist after every step
        error_inputs=(),  # (torch's ASGD checks lr and weight_decay only: the common ones)
        kwargs_strategy=_asgd_strategy,
        hyperparameter_edits=(
            ("lr", 0.3), ("lambd", 1e-3), ("alpha", 0.5), ("t0", 0.0), ("t0", 1e6),
            ("lambd", -1e-4),  # lambd * lr < 0: torch's own loop runs it
            ("weight_decay", 0.0), ("weight_decay", 0.1), ("maximize", True),
            ("maximize", False)),
        supports_capturable=True,
        capturable_error=(AssertionError, "If capturable=True, params, mus, etas, and "
                          "state_steps must be on supported devices"),
        cast_on_load=("mu", "eta"),
        bit_exact=frozenset({torch.float32, torch.float64}),
        # torch's ASGD has no _fused_asgd
        torch_functions=("asgd", "_single_tensor_asgd", "_multi_tensor_asgd"),
    ),
)


def get(name: str) -> OptimInfo:
    for info in OPTIM_DB:
        if info.name == name:
            return info
    raise KeyError(f"tests/optim_db.py has no OptimInfo for {name!r}")


def names() -> tuple:
    return tuple(info.name for info in OPTIM_DB)


def with_capability(cap: str) -> tuple:
    """The entries that have capability ``cap`` (see OptimInfo.capabilities)."""
    return tuple(info for info in OPTIM_DB if cap in info.capabilities())
