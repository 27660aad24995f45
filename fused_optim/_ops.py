"""Each optimizer's whole update as one torch operator, for torch.compile.

``fused_optim::sgd_step`` and ``fused_optim::adam_step`` update every param
group of one ``step()``. Their schemas say exactly which tensor lists they
write (``Tensor(a!)[]``); a fake implementation says they return nothing. So
dynamo and Inductor see a step as one opaque call: no tracing reaches Numba,
NumPy or the address tables, and Inductor's re-inplacing hands the op the
real params and state (its writes go nowhere else).

Eager and compiled steps share one code path, :func:`fused_optim._plan.run`,
which validates every group and then launches the kernels (see
:func:`fused_optim._plan.prepare_update`). Under ``torch.compile`` the
optimizer calls the operator, whose kernel decodes its arguments and calls
``run``. Eagerly, ``step()`` calls ``run`` directly: going through the dispatcher
costs the boxing of every tensor twice. Measured on this 2-core machine
for 161 params with one state list (3 x 161 tensors, a no-op body, mean
of 2,000 calls): a ``torch.library.custom_op`` 490 us (its Python
ADInplaceOrView layer bumps each version counter), a ``Library.define``
operator 100 us, the Python call 3 us, against ~680 us of Python in a
whole eager SGD step of resnet50's 161 tensors (benchmarks/step_overhead.py). ``DISPATCH_EAGER = True`` routes eager steps through the
operator too: ``FUSED_OPTIM_TEST_DISPATCH=1 make test`` runs the whole test
suite that way, and tests/test_compile.py a table of configurations both
ways on every run.

CUDA graphs: the operators are tagged ``cudagraph_unsafe``, so under
``mode="reduce-overhead"`` Inductor keeps them out of captured graphs and
they run as eager launches between them (same results). Not yet proven
safe inside a capture: the Triton launcher keeps device copies of tables
in LRU caches that an eager step can evict while a captured graph would
still replay their addresses, and a plan rebuilt during capture would
upload from host memory. Lifting the tag for capturable groups waits for
the GPU device check (issue 13).

Encoding (what dynamo traces): per group, its params, grads and state lists
(each a list as long as the params, or empty where the group has no such
state), the hyperparameters as one float64 ``Tensor`` (every group's, the
Python floats' bits exactly) with a ``Tensor?[]`` beside them (a Tensor
``lr`` rides there; its slot in the float64 Tensor is unused), and switches
as ``bool[]``. Neither a Tensor ``lr`` written in place nor a float that a
scheduler replaces at every step (LambdaLR's lr, OneCycleLR's betas or
momentum) recompiles the step after the second call: the floats reach the
graph as torch's own optimizers' floats do, see :func:`_float_tensor`.
Switches, and the choices the Python around the operator makes from a float
(SGD's ``momentum != 0``: whether buffers exist), still guard, as torch's.
While compiling, complex tensors go as real views (see
:meth:`UpdateOp.real_views`): Inductor cannot take them into a mutating
operator.

Steps the operator cannot carry (sparse grads, which dynamo cannot wrap;
precision options; autograd through the step) call ``run`` directly, which
dynamo never traces (``torch.compiler.disable``): a graph break.
"""

from __future__ import annotations

import itertools
import weakref
from typing import Callable, NamedTuple

import torch

from . import _plan

__all__ = ["Job", "UpdateOp", "DISPATCH_EAGER", "register_optimizer", "cache_of"]

#: Route eager steps through the dispatcher as compiled ones are (tests).
DISPATCH_EAGER = False

try:
    # Truthy where torch.compile may trace the next Python call: an eager
    # frame inside a compiled region, after a graph break (GradScaler.step,
    # which dynamo never traces, calls step() so). ``step()`` then calls
    # UpdateOp.__call__, a frame dynamo compiles on its own; elsewhere it
    # calls ``_plan.run`` directly (one frame fewer). A C function: no
    # Python frame, ~50 ns. Private to torch: without it, every step takes
    # the __call__ frame.
    from torch._C._dynamo.eval_frame import get_eval_frame_callback as compile_active
except ImportError:  # pragma: no cover - other torch versions
    def compile_active():
        return True

_PLAIN = (torch.Tensor, torch.nn.Parameter)
#: devices whose dispatch key reaches the real kernel (CompositeExplicitAutograd)
_KERNEL_DEVICES = ("cpu", "cuda")

LIB = torch.library.Library("fused_optim", "DEF")

# ------------------------------------------------------------ plan caches

#: handle -> optimizer, so the operator (which takes plain values only)
#: finds the plan cache of the optimizer that called it. A handle is never
#: reused; a dead optimizer's handle finds nothing and its step validates
#: from scratch.
_OPTIMIZERS: weakref.WeakValueDictionary = weakref.WeakValueDictionary()
_HANDLES = itertools.count(1)
NO_CACHE = 0


def register_optimizer(opt) -> int:
    handle = next(_HANDLES)
    _OPTIMIZERS[handle] = opt
    return handle


def cache_of(handle: int):
    """The plan cache of the optimizer ``handle`` names, or None."""
    opt = _OPTIMIZERS.get(handle) if handle != NO_CACHE else None
    return None if opt is None else opt._plans


# ------------------------------------------------------------ the operator


class Job(NamedTuple):
    """One param group's share of a step, as ``run`` receives it."""

    params: list
    grads: list
    states: list  # one list per state role of the op (empty: the group has none)
    row_flags: list  # per row, the optimizer's own flag (SGD: buffer created this step)
    hyper: dict  # scalar name -> float or Tensor; switch name -> bool
    #: how low-precision params are stored (a ``_precision.Precision``), or
    #: None: round to nearest, as torch
    precision: object = None


class UpdateOp:
    """One optimizer's step as the operator ``fused_optim::<name>``.

    Args:
        name: the operator's name.
        states: names of the state lists it writes, in order.
        scalars: hyperparameters that are floats or 1-element Tensors.
        switches: boolean hyperparameters.
        has_row_flags: each job's ``row_flags`` mark its first state list's entries
            (else it is empty).
        update: ``update(job, key, grad_scale, found_inf, backend, cache,
            compiled)`` validates one job (``key``: its plan-cache key) and
            returns what writes it, or None (see
            :func:`fused_optim._plan.run`). ``compiled``: dynamo traced the
            step, so torch's compiled semantics apply (dynamo reads every
            group's ``capturable`` as True while tracing, CPU groups
            included, and torch's own step then skips its capturable device
            check).
    """

    def __init__(self, name: str, states: tuple, scalars: tuple, switches: tuple,
                 update: Callable, has_row_flags: bool = False):
        self.name, self.states, self.scalars, self.switches = name, states, scalars, switches
        self.update, self.has_row_flags = update, has_row_flags
        mutable = ", ".join(f"Tensor({chr(ord('b') + i)}!)[] {s}" for i, s in enumerate(states))
        LIB.define(
            f"{name}(Tensor(a!)[] params, Tensor[] grads, {mutable}, bool[] row_flags, "
            "int[] group_sizes, bool[] state_present, Tensor scalars, "
            "Tensor?[] scalar_tensors, bool[] switches, Tensor? grad_scale, "
            "Tensor? found_inf, str backend, int handle, bool compiled) -> ()",
            tags=(torch.Tag.cudagraph_unsafe,))
        LIB.impl(name, self._kernel, "CompositeExplicitAutograd")
        torch.library.register_fake(f"fused_optim::{name}", _nothing, lib=LIB)
        self.op = getattr(torch.ops.fused_optim, name).default

    def __call__(self, jobs: list, grad_scale, found_inf, backend: str, handle: int,
                 traceable: bool = True) -> None:
        """The step: through the operator when compiling, else ``run`` itself.

        ``traceable=False`` (autograd through the step, sparse grads: torch's
        own ops, which autograd must see) and jobs the operator cannot carry
        call :func:`fused_optim._plan.run` itself (a graph break when
        compiling). Either way ``run`` validates every tensor eagerly before
        any kernel writes: the operator adds no path around the address
        checks.
        """
        compiling = torch.compiler.is_compiling()
        if traceable and (DISPATCH_EAGER or compiling) and self.encodable(jobs):
            # (jobs with a precision option never get here: encodable)
            args = self.encode(jobs, compiling)
            written_back = ()
            if compiling:
                args, written_back = self.real_views(args)
            self.op(*args, grad_scale, found_inf, backend, handle, compiling)
            if written_back:
                with torch.no_grad():
                    for t, real in written_back:
                        torch.view_as_real(t).copy_(real)
        else:
            _plan.run(self.update, jobs, grad_scale, found_inf, backend, cache_of(handle),
                      compiling)

    def encodable(self, jobs) -> bool:
        """Whether the operator can carry ``jobs`` as ``run`` receives them.

        Plain strided tensors on a device with a real kernel (on "meta" the
        dispatcher would pick the fake one), without lazy conj or neg bits
        (the dispatcher's fallbacks resolve those into copies, and a write
        to a copy is lost), and hyperparameters that are numbers or
        Tensors. Anything else (old checkpoints' float steps, DTensors,
        sparse grads) goes to ``run`` directly, which gives torch's answer.
        """
        # (dynamo cannot trace is_conj()/is_neg(), which return a bool.
        # Through the dispatcher, its math-bit fallbacks hand the kernel
        # resolved tensors: checked for a neg-bit grad, not for complex
        # conj-bit params, which eager steps keep off the operator.)
        bits = not torch.compiler.is_compiling()
        for job in jobs:
            if job.precision is not None:
                # kahan_sum / stochastic_round are not in the operator's
                # schema: such a step runs eagerly, behind a graph break
                return False
            for tensors in (job.params, job.grads, *job.states):
                for t in tensors:
                    if not (type(t) in _PLAIN and t.layout == torch.strided
                            and t.device.type in _KERNEL_DEVICES
                            and not (bits and (t.is_conj() or t.is_neg()))):
                        return False
            for name in self.scalars:
                if not isinstance(job.hyper[name], (int, float, torch.Tensor)):
                    return False
        return True

    def encode(self, jobs, compiling: bool = False):
        """The operator's tensor lists and per-group values, from ``jobs``.

        The float hyperparameters go as one float64 Tensor (exactly the
        Python floats' bits), so dynamo guards on none of their values:
        see :func:`_float_tensor`.
        """
        params, grads, row_flags, sizes, present = [], [], [], [], []
        states = [[] for _ in self.states]
        scalars, scalar_tensors, switches = [], [], []
        for job in jobs:
            params.extend(job.params)
            grads.extend(job.grads)
            sizes.append(len(job.params))
            for into, given in zip(states, job.states):
                into.extend(given)
                present.append(len(given) > 0)
            row_flags.extend(job.row_flags)
            for name in self.scalars:
                value = job.hyper[name]
                if isinstance(value, torch.Tensor):
                    scalars.append(0.0)
                    scalar_tensors.append(value)
                else:
                    scalars.append(value)
                    scalar_tensors.append(None)
            switches.extend(bool(job.hyper[name]) for name in self.switches)
        return (params, grads, *states, row_flags, sizes, present,
                _float_tensor(scalars, compiling), scalar_tensors, switches)

    def real_views(self, args):
        """``encode``'s tensor lists with no complex tensor, for Inductor.

        Inductor (torch 2.13) decomposes the ``auto_functionalized_v2`` node
        of a mutating operator nowhere a complex tensor reaches it (its
        pattern matcher skips such nodes), then asserts that none is left,
        so a complex tensor must not reach the operator, nor be the base of
        a view it writes. A complex grad goes as its real view (read only).
        A complex param or state goes as a real copy, written back through
        its real view after the operator: Inductor's re-inplacing turns the
        copy into the view itself and the write-back into a copy onto
        itself, so the kernels write the tensor's own memory, as eagerly
        (the real view is what ``run`` makes of a complex tensor anyway).

        Returns:
            (the operator's leading arguments, [(complex tensor, its real copy)]).
        """
        n = 2 + len(self.states)
        written_back = []

        def as_real(tensors, written):
            out = []
            for t in tensors:
                if t.is_complex():
                    if written:
                        # one copy per tensor (a param listed twice is
                        # stepped twice, as eagerly)
                        real = next((r for c, r in written_back if c is t), None)
                        if real is None:
                            real = torch.view_as_real(t).clone()
                            written_back.append((t, real))
                    else:
                        real = torch.view_as_real(t)
                    t = real
                out.append(t)
            return out

        lists = [as_real(tensors, k != 1) for k, tensors in enumerate(args[:n])]
        return (*lists, *args[n:]), written_back

    def decode(self, params, grads, states, row_flags, sizes, present, scalars, scalar_tensors,
               switches):
        jobs = []
        at = [0] * len(self.states)
        row = flags_at = 0
        ns, nw = len(self.scalars), len(self.switches)
        scalars = scalars.tolist()  # float64: the Python floats encode had, bit for bit
        for g, size in enumerate(sizes):
            mine = []
            for k, flat in enumerate(states):
                if present[g * len(self.states) + k]:
                    mine.append(list(flat[at[k]:at[k] + size]))
                    at[k] += size
                else:
                    mine.append([])
            nflags = len(mine[0]) if self.has_row_flags else 0
            hyper = {}
            for i, name in enumerate(self.scalars):
                t = scalar_tensors[g * ns + i]
                hyper[name] = t if t is not None else scalars[g * ns + i]
            for i, name in enumerate(self.switches):
                hyper[name] = switches[g * nw + i]
            jobs.append(Job(list(params[row:row + size]), list(grads[row:row + size]), mine,
                            list(row_flags[flags_at:flags_at + nflags]), hyper))
            row += size
            flags_at += nflags
        return jobs

    def _kernel(self, params, grads, *rest):
        n = len(self.states)
        states, rest = rest[:n], rest[n:]
        (row_flags, sizes, present, scalars, scalar_tensors, switches, grad_scale, found_inf,
         backend, handle, compiled) = rest
        jobs = self.decode(params, grads, states, row_flags, sizes, present, scalars,
                           scalar_tensors, switches)
        opt = _OPTIMIZERS.get(handle) if handle != NO_CACHE else None
        if opt is not None:
            # (set by the traced step too, but dynamo 2.13 drops that store
            # on an optimizer: last_step_skipped read nothing after compiled steps)
            opt._last_found_inf = found_inf
        _plan.run(self.update, jobs, grad_scale, found_inf, backend,
                  None if opt is None else opt._plans, compiled)


def _float_tensor(values: list, compiling: bool) -> torch.Tensor:
    """``values`` (Python numbers) as a 1-D float64 Tensor, bit for bit.

    Eagerly, ``torch.tensor``. While compiling, each value is multiplied
    into a float64 one (exact: ``x * 1.0 == x``, signed zeros and
    infinities included), the form dynamo gives torch's own optimizers'
    float hyperparameters: a group's float that changed since the last
    compilation (a scheduler's lr, OneCycleLR's betas or momentum) is
    traced as a SymFloat (dynamo's automatic dynamic, ``specialize_float``
    off), and Inductor's ``tensorify_python_scalars`` pass turns a SymFloat
    used in Tensor arithmetic into the float64 graph input dynamo made of
    it. As a ``float[]`` argument of the operator it could not: the pass
    specialised it, so dynamo guarded on its value and every new lr
    recompiled the step, up to the recompile limit (issue 25, item 7).
    """
    if not compiling or not values:
        return torch.tensor(values, dtype=torch.float64)
    one = torch.ones((), dtype=torch.float64)
    return torch.stack([one * v for v in values])


def _nothing(*args, **kwargs):
    """The fake implementation: the update writes its inputs, returns nothing."""
    return None
