"""Opt-in Kahan summation and stochastic rounding of bfloat16/float16 params.

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

Both act on bfloat16/float16 params only (the kernels' float32 math already
holds every float32/float64 result exactly as stored). Where a group mixes
low-precision params with others under ``kahan_sum``, its job is split in two,
so that the compensation role is present on every row of a plan (the address
tables' invariant) without buffers for float32 params. Rows that run torch's
own step (a layout no kernel takes, ``differentiable=True``) store as torch
does; their buffers are left as they are.
"""

from __future__ import annotations

from itertools import repeat
from operator import attrgetter
from typing import NamedTuple

import torch

from .kernels.reference._precision import LOW_PRECISION

__all__ = ["KEYS", "Precision", "attach", "advance", "save", "load"]

#: the group keys of the two options (absent means off)
KEYS = ("kahan_sum", "stochastic_round")
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

    def kernel_args(self, unit, key: int, index: int) -> dict:
        """The kernel keywords for one kernel unit of the job with plan key ``key``."""
        if unit.dtype not in LOW_PRECISION:
            return {}
        out = {}
        if self.comps is not None:
            out["kahan_sum"] = True
        if self.seed is not None:
            # no two calls of one step share a stream: the group's job and
            # the unit within its plan
            salt = ((key & 0xFFFF) << 16) | (index & 0xFFFF)
            out["stochastic_round"] = (self.seed, _counter(self.counters, unit.device), salt)
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


def _split(job, keep):
    """The rows ``keep`` (bools) of ``job``, as a job of their own."""
    def pick(lst):
        return [x for x, k in zip(lst, keep) if k] if lst else lst
    return job._replace(params=pick(job.params), grads=pick(job.grads),
                        states=[pick(s) for s in job.states], row_flags=pick(job.row_flags))


def attach(opt, job, group) -> list:
    """``job`` with the group's options attached: one job, or two where split.

    Returns:
        ``(jobs, after)``: ``after`` (or None) puts the Kahan buffers this
        step made into ``opt.state``, once the step went through.
    """
    kahan = bool(group.get("kahan_sum"))
    seed = counters = None
    if group.get("stochastic_round"):
        seed = _seed(opt)
        counters = opt.__dict__.setdefault("_sr_counters", {})
        for p in job.params:
            if p.dtype in LOW_PRECISION:
                _counter(counters, p.device)
                break
    if not kahan:
        return ([job._replace(precision=Precision(None, seed, counters))] if seed is not None
                else [job]), None
    dtypes = list(map(_DTYPE, job.params))
    low = [d in LOW_PRECISION for d in dtypes]
    if not any(low):
        return ([job._replace(precision=Precision(None, seed, counters))] if seed is not None
                else [job]), None
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
    if all(low):
        return [job._replace(precision=Precision(comps, seed, counters))], after
    rest = _split(job, [not x for x in low])
    return [_split(job, low)._replace(precision=Precision(comps, seed, counters)),
            rest._replace(precision=Precision(None, seed, counters)) if seed is not None
            else rest], after


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
    counter are restored where saved.
    """
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
    if saved is not None:
        opt._sr_seed = int(saved["seed"])
        counters = opt.__dict__.setdefault("_sr_counters", {})
        for c in counters.values():
            c.fill_(int(saved["counter"]))  # in place: a captured graph holds its address
        if not counters:
            with torch.inference_mode(False):
                counters[torch.device("cpu")] = torch.tensor(int(saved["counter"]),
                                                             dtype=torch.int64)
