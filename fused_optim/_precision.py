"""Opt-in Kahan summation and stochastic rounding of bfloat16/float16 params,
and optimizer state stored in bfloat16.

The API side of the two keyword options every optimizer takes,
``kahan_sum`` and ``stochastic_round`` (the kernels' side, and the exact
arithmetic, is ``kernels/reference/_precision.py``). Off by default: a group
without them has neither key, stores round to nearest as torch's do, and its
checkpoint is torch's.

State, and what a checkpoint holds:

* ``kahan_sum``: each bfloat16/float16 param gets ``state["kahan_comp"]``, a
  zero-initialised buffer of its dtype and shape, made at its first step (or
  again, zeroed, if the param's dtype, shape or device changed). torch.optim
  loading such a checkpoint keeps the key and never reads it; loaded back,
  a missing buffer starts at zero.
* ``stochastic_round``: one 64-bit seed per optimizer (drawn from torch's
  default generator when the option is first asked for, so
  ``torch.manual_seed`` makes runs reproducible) and one step counter,
  advanced once per ``step()`` that GradScaler does not skip. They are saved
  as ``state_dict()["stochastic_round"] = {"seed", "counter"}``, a top-level
  key torch.optim's ``load_state_dict`` ignores; a resumed run continues the
  same stream.

``state_dtype=torch.bfloat16`` stores the optimizer's floating-point state
(its record's ``state`` keys: Adam's moments, SGD's momentum buffer, ...)
of float32 and bfloat16 params in bfloat16, every store rounded
stochastically from the same stream (``kernels/reference/_precision.py``,
"Stochastically rounded state"). Round to nearest would freeze Adam's
``exp_avg_sq`` at beta2 = 0.999: a 0.1% decay is under half a bfloat16
ulp, so it never decays (measured in ``examples/bf16_state.py``). Other
params (float16, float64, complex) keep torch's state. Fresh state is made
in bfloat16 where torch makes it (:func:`fresh_state`). State of another
dtype (a torch.optim checkpoint, a state set by hand) is converted to
bfloat16 (rounded to nearest) when loaded and at the step that finds it.
The group key ``state_dtype`` travels in checkpoints like the other two.

``state_bits=8`` (Adam and AdamW) stores the moments of float32 and
bfloat16 params of at least ``MIN_NUMEL`` (4096) elements as blockwise
8-bit codes: ``state[name]`` a uint8 tensor of the param's shape and
strides, ``state[name + "_absmax"]`` its float32 block scales (one per 256
elements in memory order); ``kernels/reference/_blockwise.py`` is the
specification. Internally the option is the state "dtype" ``QUANTIZED``
(torch.uint8): the plan validates and buckets rows by it as it does
bfloat16 state, and a job's quantized rows carry their scales
(``Precision.scales``), which join the plan as the roles of columns
SCALE0..2. Smaller and other params keep torch's state, in a job of their
own. State of another dtype (torch's fresh state, a torch.optim checkpoint)
is quantized when loaded and at the step that finds it. The group key
``state_bits`` travels in checkpoints; torch's ``load_state_dict``, which
casts state to its param's dtype, never sees the codes and scales (see
:func:`load`).

Kahan summation and stochastic rounding act on bfloat16/float16 params only
(the kernels' float32 math already holds every float32/float64 result
exactly as stored). Where a group mixes
low-precision params with others under ``kahan_sum``, its job is split in two,
so that the compensation role is present on every row of a plan (the address
tables' invariant) without buffers for float32 params. Rows that run torch's
own step (a layout no kernel takes, ``differentiable=True``) store as torch
does; their buffers are left as they are.
"""

from __future__ import annotations

import contextlib
import functools
from itertools import repeat
from operator import attrgetter
from typing import NamedTuple

import torch

from .kernels.reference import _blockwise
from .kernels.reference._precision import LOW_PRECISION

__all__ = ["KEYS", "Precision", "attach", "advance", "save", "load", "stored_dtype",
           "check_state_dtype", "check_state_bits", "state_format", "quantized", "for_torch",
           "fresh_state"]

#: the group keys of the options (absent means off)
KEYS = ("kahan_sum", "stochastic_round", "state_dtype", "state_bits")
#: the ``state_dtype`` values there are kernels for
STATE_DTYPES = (torch.bfloat16,)
#: the param dtypes whose state ``state_dtype`` stores (others keep torch's)
_STATE_PARAMS = (torch.float32, torch.bfloat16)
#: ``state_bits=8`` as the plan and the kernels see it: the dtype of the codes
QUANTIZED = torch.uint8


def check_state_dtype(state_dtype):
    """``state_dtype`` if it is None or one of STATE_DTYPES, else ValueError."""
    if state_dtype is not None and state_dtype not in STATE_DTYPES:
        raise ValueError(f"state_dtype must be None or torch.bfloat16, not {state_dtype!r}")
    return state_dtype


def check_state_bits(state_bits):
    """``state_bits`` if it is None or 8, else ValueError."""
    if state_bits is not None and (isinstance(state_bits, bool) or state_bits != 8):
        raise ValueError(f"state_bits must be None or 8, not {state_bits!r}")
    return state_bits


def state_format(group):
    """The group's state option as the plan sees it: None, torch.bfloat16
    (``state_dtype``) or QUANTIZED (``state_bits=8``)."""
    state_dtype = group.get("state_dtype")
    if state_dtype is not None:
        return state_dtype
    return QUANTIZED if group.get("state_bits") is not None else None


def quantized(param) -> bool:
    """Whether ``state_bits=8`` stores this param's state in 8 bits."""
    return param.dtype in _STATE_PARAMS and param.numel() >= _blockwise.MIN_NUMEL


def stored_dtype(param_dtype, state_dtype, numel=0):
    """The dtype a param of ``param_dtype`` (and ``numel`` elements) keeps its
    state in under ``state_dtype`` (QUANTIZED: ``state_bits=8``)."""
    if state_dtype is None or param_dtype not in _STATE_PARAMS:
        return param_dtype
    if state_dtype == QUANTIZED and numel < _blockwise.MIN_NUMEL:
        return param_dtype
    return state_dtype


#: the top-level state_dict key of the stochastic-rounding stream
SD_KEY = "stochastic_round"


class Precision(NamedTuple):
    """How one job's low-precision params are stored (``_ops.Job.precision``).

    Attributes:
        comps: Kahan compensation buffers, one per row (every row's param is
            bfloat16/float16), or None: no Kahan summation.
        seed: the optimizer's stream seed, or None: round to nearest.
        counters: device -> 0-dim int64 step counter (read by the kernels on
            that device; see :func:`advance`).
    """

    comps: list | None
    seed: int | None
    counters: dict | None
    #: stochastic rounding of low-precision params (``stochastic_round``)
    round_params: bool = True
    #: the ``state_dtype`` option (its state stores round stochastically),
    #: or QUANTIZED (``state_bits=8``; every row of the job is quantized; its
    #: second moments round stochastically from the same stream)
    state_dtype: object = None
    #: ``state_bits=8``: per state role (STATE0..2), the rows' float32 block
    #: scales, a list of None where the role is absent; else None
    scales: object = None

    def kernel_args(self, unit, key: int, index: int) -> dict:
        """The kernel keywords for one kernel unit of the job with plan key ``key``."""
        low = unit.dtype in LOW_PRECISION
        params = low and self.round_params and self.seed is not None
        state = self.state_dtype is not None and unit.state_dtype == self.state_dtype
        out = {}
        if low and self.comps is not None:
            out["kahan_sum"] = True
        if params or state:
            # no two calls of one step share a stream: the group's job and
            # the unit within its plan (the state's bits differ from the
            # param's: reference._precision.state_bits)
            salt = ((key & 0xFFFF) << 16) | (index & 0xFFFF)
            stream = (self.seed, _counter(self.counters, unit.device), salt)
            if params:
                out["stochastic_round"] = stream
            if state:
                out["state_round"] = stream
        return out


_DTYPE, _SHAPE, _DEVICE = attrgetter("dtype"), attrgetter("shape"), attrgetter("device")


def _counter(counters: dict, device) -> torch.Tensor:
    c = counters.get(device)
    if c is None:
        # a device met for the first time starts at the others' count
        # (they all advance together; reading one is a sync, once)
        start = int(next(iter(counters.values()))) if counters else 0
        # a normal tensor even when the first step runs under
        # torch.inference_mode(): an inference tensor could not be advanced
        # or loaded in place afterwards (the model-based test found a
        # checkpoint load failing so)
        with torch.inference_mode(False):
            c = counters[device] = torch.full((), start, dtype=torch.int64, device=device)
    return c


def _seed(opt) -> int:
    seed = opt.__dict__.get("_sr_seed")
    if seed is None:
        seed = opt._sr_seed = int(torch.randint(0, 2 ** 62, (), dtype=torch.int64))
    return seed


def start_stream(opt) -> None:
    """Draw the stream's seed and make a counter per device of the params, now.

    At construction, eagerly: a step traced by torch.compile that first made
    them would not keep them (dynamo's ``__dict__.setdefault`` made a fresh
    dict at every call, and the stream never advanced).
    """
    _seed(opt)
    counters = opt.__dict__.setdefault("_sr_counters", {})
    for group in opt.param_groups:
        for p in group["params"]:
            _counter(counters, p.device)


def _split(job, keep):
    """The rows ``keep`` (bools) of ``job``, as a job of their own."""
    def pick(lst):
        return [x for x, k in zip(lst, keep) if k] if lst else lst
    precision = job.precision
    if precision is not None and precision.comps is not None:
        precision = precision._replace(comps=pick(precision.comps))
    return job._replace(params=pick(job.params), grads=pick(job.grads),
                        states=[pick(s) for s in job.states], row_flags=pick(job.row_flags),
                        precision=precision)


def attach(opt, job, group) -> list:
    """``job`` with the group's options attached: one job or several.

    Returns:
        ``(jobs, after)``: ``after`` (or None) puts the state this step made
        (Kahan buffers, converted or quantized state) into ``opt.state``,
        once the step went through.
    """
    jobs, after = _attach(opt, job, group)
    if group.get("state_bits") is None:
        return jobs, after
    out = []
    for j in jobs:
        keep = list(map(quantized, j.params))
        if not any(keep):
            out.append(j)
            continue
        q = j if all(keep) else _split(j, keep)
        scales, made = _quantized_state(opt, q)
        precision = q.precision if q.precision is not None else Precision(None, None, None, False)
        out.append(q._replace(precision=precision._replace(state_dtype=QUANTIZED,
                                                           scales=scales)))
        if not all(keep):
            out.append(_split(j, [not k for k in keep]))
        after = _both(after, made)
    return out, after


def _quantized_state(opt, job):
    """``(scales, after)`` for a job of quantized rows (``state_bits=8``).

    Each state role's codes stay in the job's lists; ``scales`` holds, per
    role (STATE0..2), the rows' ``<name>_absmax`` tensors (a list of None for
    an absent role). A float state (torch's fresh state, a torch.optim
    checkpoint, a state set by hand) is quantized into new codes and scales
    in the job; ``after`` puts them into ``opt.state`` once the step went
    through (None where nothing was quantized).
    """
    names = _state_names(type(opt))
    n = len(job.params)
    state = opt.state
    scales, made = [], []
    for k in range(3):
        lst = job.states[k] if k < len(names) else None
        if not lst or lst[0] is None:
            scales.append([None] * n)
            continue
        name = names[k]
        key = _blockwise.absmax_key(name)
        out = []
        for i, (p, t) in enumerate(zip(job.params, lst)):
            if not isinstance(t, torch.Tensor):
                raise TypeError(f"state {name!r} of a parameter is not a tensor: {type(t)}")
            if t.dtype == QUANTIZED:
                a = state[p].get(key)
                if not isinstance(a, torch.Tensor):
                    raise ValueError(f"state {name!r} of a parameter holds 8-bit codes without "
                                     f"its block scales {key!r}")
                out.append(a)
                continue
            codes, a = _blockwise.quantize(t.detach(), k, like=p)
            lst[i] = codes
            out.append(a)
            made.append((p, name, t, codes, key, a))
        scales.append(out)
    if not made:
        return scales, None

    def after():
        for p, name, old, codes, key, a in made:
            own = state.get(p)
            if own is not None and own.get(name) is old:
                own[name] = codes
                own[key] = a
    return scales, after


def _attach(opt, job, group) -> list:
    """``job`` with the group's options attached: one job, or two where split.

    Returns:
        ``(jobs, after)``: ``after`` (or None) puts the Kahan buffers this
        step made into ``opt.state``, once the step went through.
    """
    kahan = bool(group.get("kahan_sum"))
    sr = bool(group.get("stochastic_round"))
    state_dtype = group.get("state_dtype")
    stream_state = state_dtype is not None or group.get("state_bits") is not None
    seed = counters = None
    if sr or stream_state:
        seed = _seed(opt)
        counters = opt.__dict__.setdefault("_sr_counters", {})
        for p in job.params:
            if p.dtype in LOW_PRECISION or stream_state:
                _counter(counters, p.device)
                break
    converted = None
    if state_dtype is not None:
        converted = _convert_state(opt, job, check_state_dtype(state_dtype))

    def precision(comps):
        return Precision(comps, seed, counters, sr, state_dtype)

    if not kahan:
        return ([job._replace(precision=precision(None))] if seed is not None
                else [job]), converted
    dtypes = list(map(_DTYPE, job.params))
    low = [d in LOW_PRECISION for d in dtypes]
    if not any(low):
        return ([job._replace(precision=precision(None))] if seed is not None
                else [job]), converted
    params = [p for p, is_low in zip(job.params, low) if is_low] if not all(low) \
        else job.params
    state = opt.state
    after = None
    comps = list(map(dict.get, map(state.__getitem__, params), repeat("kahan_comp")))
    # every step: C-level maps (~0.2 us a param) rather than a Python loop
    if (None in comps or not all(map(isinstance, comps, repeat(torch.Tensor)))
            or list(map(_SHAPE, comps)) != list(map(_SHAPE, params))
            or list(map(_DTYPE, comps)) != list(map(_DTYPE, params))
            or list(map(_DEVICE, comps)) != list(map(_DEVICE, params))):
        made = []
        for k, (p, c) in enumerate(zip(params, comps)):
            if not (isinstance(c, torch.Tensor) and c.shape == p.shape and c.dtype == p.dtype
                    and c.device == p.device):
                # a new param, or one whose dtype, shape or device changed:
                # a fresh buffer, put in the state only once the step went
                # through (a step that raises writes nothing, state included)
                comps[k] = torch.zeros_like(p, memory_format=torch.preserve_format)
                made.append((p, comps[k]))
        if made:
            def after():
                for p, c in made:
                    state[p]["kahan_comp"] = c
    after = _both(after, converted)
    if all(low):
        return [job._replace(precision=precision(comps))], after
    rest = _split(job, [not x for x in low])
    return [_split(job, low)._replace(precision=precision(comps)),
            rest._replace(precision=precision(None)) if seed is not None
            else rest], after


def _both(a, b):
    if a is None or b is None:
        return a or b

    def both():
        a()
        b()
    return both


@functools.cache
def _state_names(cls) -> tuple:
    """The state keys of ``cls``'s record (in job order), for its closest
    fused_optim class: a user's subclass keeps its base's state."""
    from ._registry import records

    by_class = {r.cls: r.state for r in records()}
    for c in cls.__mro__:
        if c in by_class:
            return by_class[c]
    return ()


def _convert_state(opt, job, state_dtype):
    """Make every state tensor of ``job`` that ``state_dtype`` acts on that dtype.

    Each step compares dtypes with C-level maps; where one differs (a
    checkpoint loaded by torch's code, a state set by hand, the state
    torch's ``_init_group`` made while dynamo traced it: elsewhere it is made
    in ``state_dtype``, :func:`fresh_state`) the job gets a
    converted copy (rounded to nearest), which the returned callable puts
    into ``opt.state`` once the step went through (a step that raises
    changes no state). Returns None where nothing differs.
    """
    names = _state_names(type(opt))
    lists = [lst for lst in job.states[:len(names)] if lst]
    if not lists:
        return None
    want = [stored_dtype(d, state_dtype) for d in map(_DTYPE, job.params)]
    if all(list(map(_DTYPE_OR_NONE, lst)) == want for lst in lists):
        return None
    made = []
    state = opt.state
    for name, lst in zip(names, job.states):
        for i, t in enumerate(lst):
            if (isinstance(t, torch.Tensor) and t.dtype != want[i] and t.is_floating_point()
                    and want[i] != job.params[i].dtype):
                new = t.detach().to(want[i])
                lst[i] = new
                made.append((job.params[i], name, t, new))
    if not made:
        return None

    def after():
        for p, name, old, new in made:
            own = state.get(p)
            if own is not None and own.get(name) is old:
                own[name] = new
    return after


class _FreshState(torch.overrides.TorchFunctionMode):
    """torch's own state-creating code, its per-element state made in the
    dtype ``state_dtype`` keeps it in (see :func:`fresh_state`)."""

    def __init__(self, state_dtype):
        super().__init__()
        self.state_dtype = state_dtype

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if ((func is torch.zeros_like or func is torch.full_like) and args
                and isinstance(args[0], torch.Tensor) and kwargs.get("dtype") is None):
            like = args[0]
            want = stored_dtype(like.dtype, self.state_dtype)
            if want != like.dtype:
                if func is torch.full_like:
                    # the fill (a number, or a 0-dim Tensor lr) as a tensor of
                    # ``like``'s dtype holds it, then rounded to ``want``: what
                    # converting that tensor gives
                    fill = args[1] if len(args) > 1 else kwargs.pop("fill_value")
                    fill = torch.as_tensor(fill, dtype=like.dtype).to(want).item()
                    args = (like, fill) + tuple(args[2:])
                kwargs = {**kwargs, "dtype": want}
        return func(*args, **kwargs)


def fresh_state(state_dtype):
    """A context in which torch's ``_init_group`` (or Adagrad's constructor)
    makes fresh state directly in the dtype ``state_dtype`` keeps it in.

    torch makes every per-element state tensor with ``torch.zeros_like`` or
    ``torch.full_like`` of its param or grad (torch 2.13: zeros, Adagrad's
    ``initial_accumulator_value``, Rprop's step sizes ``lr``); here those of
    float32 tensors come out bfloat16, holding the values that converting
    torch's state gives (step counters and scalar states are not made so,
    and keep torch's dtype and device). Made in float32 and converted at the
    step instead, both copies were alive at the first step: AdamW's peak RSS
    on gpt2-small was 3009 MiB against 2530 MiB with float32 state
    (``benchmarks/state_memory.py``). No context where ``state_dtype`` is None,
    or while dynamo traces (which then keeps the conversion at the step,
    :func:`_convert_state`).
    """
    if state_dtype is None or torch.compiler.is_compiling():
        return contextlib.nullcontext()
    return _FreshState(state_dtype)


def _DTYPE_OR_NONE(t):
    return t.dtype if isinstance(t, torch.Tensor) else None


def advance(opt, found_inf) -> None:
    """Count a step in every stream counter, unless GradScaler skips it (no sync)."""
    counters = opt.__dict__.get("_sr_counters")
    if not counters:
        return
    for c in counters.values():
        if found_inf is None:
            c += 1
        else:
            c += (found_inf.to(c.device) == 0).to(torch.int64)


def save(opt, state_dict: dict) -> dict:
    """``state_dict`` with the stream's seed and counter, where there is one."""
    seed = opt.__dict__.get("_sr_seed")
    if seed is not None:
        counters = opt.__dict__.get("_sr_counters") or {}
        count = int(next(iter(counters.values()))) if counters else 0
        state_dict[SD_KEY] = {"seed": seed, "counter": count}
    return state_dict


def load(opt, state_dict: dict, load_torch) -> None:
    """torch's ``load_state_dict`` (``load_torch``), keeping the options and stream.

    A saved group without an option's key (a torch.optim checkpoint) keeps
    the option as this optimizer's group has it; the stream's seed and
    counter are restored where saved. A saved ``state_dict`` that is not
    None or bfloat16 raises ValueError before anything is loaded; state
    that torch's loader cast to the param's dtype goes back to the
    ``state_dtype`` it is kept in (bit for bit: bfloat16 values are float32
    values).
    """
    for g in state_dict["param_groups"]:
        check_state_dtype(g.get("state_dtype"))
        check_state_bits(g.get("state_bits"))
    codes = _take_codes(opt, state_dict)
    if codes:
        state_dict = {**state_dict, "state": codes[1]}
    saved = state_dict.get(SD_KEY)
    if saved is not None:
        state_dict = {k: v for k, v in state_dict.items() if k != SD_KEY}
    mine = [{k: g[k] for k in KEYS if k in g} for g in opt.param_groups]
    missing = [[k for k in KEYS if k not in g] for g in state_dict["param_groups"]]
    load_torch(state_dict)
    for g, own, keys in zip(opt.param_groups, mine, missing):
        for k in keys:
            if k in own:
                g[k] = own[k]
    if codes:
        for (p, key), t in codes[0].items():
            opt.state[p][key] = t.to(p.device)
    if saved is not None:
        opt._sr_seed = int(saved["seed"])
        counters = opt.__dict__.setdefault("_sr_counters", {})
        for c in counters.values():
            c.fill_(int(saved["counter"]))  # in place: a captured graph holds its address
        if not counters:
            with torch.inference_mode(False):
                counters[torch.device("cpu")] = torch.tensor(int(saved["counter"]),
                                                             dtype=torch.int64)
    _convert_loaded(opt)


def _take_codes(opt, state_dict):
    """The 8-bit codes and scales of a ``state_bits=8`` checkpoint, out of it.

    torch's loader would cast them to their params' dtypes (uint8 codes to
    float values; a bfloat16 param's float32 scales rounded): returns
    ``(codes, state)``, ``codes`` ``{(param, key): tensor}`` to put back after
    it, ``state`` the checkpoint's state without them; None where there are
    none. Raises ValueError, before anything is loaded, where a group of
    this optimizer without ``state_bits`` would get them.
    """
    saved_groups = state_dict["param_groups"]
    if len(saved_groups) != len(opt.param_groups):
        return None  # (torch's loader raises its own error)
    for saved, own in zip(saved_groups, opt.param_groups):
        if saved.get("state_bits") is not None and own.get("state_bits") is None:
            raise ValueError(
                "this checkpoint was saved with state_bits=8 (8-bit optimizer state) and a "
                "param group of this optimizer has no state_bits: construct the optimizer "
                "with state_bits=8, or convert the checkpoint with "
                "fused_optim.state_dict_for_torch")
    taken, state = {}, {}
    params = {}
    for saved, own in zip(saved_groups, opt.param_groups):
        for index, p in zip(saved["params"], own["params"]):
            params[index] = (p, own)
    for index, st in state_dict["state"].items():
        keep = {}
        for key, v in st.items():
            if (key != "step" and isinstance(v, torch.Tensor)
                    and (v.dtype == QUANTIZED or key.endswith("_absmax"))):
                if index not in params:
                    return None
                p, own = params[index]
                if own.get("state_bits") is None:
                    raise ValueError(
                        f"this checkpoint holds 8-bit optimizer state ({key!r}, saved with "
                        "state_bits=8) for a param group without state_bits: construct the "
                        "optimizer with state_bits=8, or convert the checkpoint with "
                        "fused_optim.state_dict_for_torch")
                taken[(p, key)] = v
            else:
                keep[key] = v
        state[index] = keep
    return (taken, state) if taken else None


def _convert_loaded(opt) -> None:
    """Every state tensor a group's ``state_dtype`` acts on, in that dtype;
    under ``state_bits=8``, every float state of a quantized param quantized."""
    names = _state_names(type(opt))
    for group in opt.param_groups:
        state_dtype = group.get("state_dtype")
        if group.get("state_bits") is not None:
            _quantize_loaded(opt, group, names)
            continue
        if state_dtype is None:
            continue
        for p in group["params"]:
            own = opt.state.get(p)
            want = stored_dtype(p.dtype, state_dtype)
            if not own:
                continue
            for name in names:
                t = own.get(name)
                if (isinstance(t, torch.Tensor) and t.is_floating_point()
                        and t.dtype != want):
                    own[name] = t.detach().to(want)


def _quantize_loaded(opt, group, names) -> None:
    for p in group["params"]:
        own = opt.state.get(p)
        if not own or not quantized(p):
            continue
        for k, name in enumerate(names):
            t = own.get(name)
            if isinstance(t, torch.Tensor) and t.is_floating_point():
                own[name], own[_blockwise.absmax_key(name)] = _blockwise.quantize(
                    t.detach(), k, like=p)


def for_torch(opt) -> dict:
    """``opt.state_dict()`` as torch.optim's own class would save it.

    Every state tensor in its param's dtype (bfloat16 state widened exactly,
    8-bit state dequantized, its scales left out), and none of fused_optim's
    own keys: the groups' options, the Kahan buffers, the stochastic-rounding
    stream.
    """
    sd = opt.state_dict()
    sd.pop(SD_KEY, None)
    params = [p for g in opt.param_groups for p in g["params"]]
    names = _state_names(type(opt))
    state = {}
    for index, own in sd["state"].items():
        p = params[index]
        out = {}
        for name, t in own.items():
            if name == "kahan_comp" or (name.endswith("_absmax")
                                        and name[:-len("_absmax")] in names):
                continue
            if isinstance(t, torch.Tensor) and t.dtype == QUANTIZED and name in names:
                t = _blockwise.dequantize(t, own[_blockwise.absmax_key(name)],
                                          names.index(name), dtype=p.dtype)
            if (name in names and isinstance(t, torch.Tensor) and t.is_floating_point()
                    and t.dtype != p.dtype and not p.is_complex()):
                t = t.to(p.dtype)
            out[name] = t
        state[index] = out
    groups = [{k: v for k, v in g.items() if k not in KEYS} for g in sd["param_groups"]]
    return {"state": state, "param_groups": groups}
