"""What a benchmark case is made of: parameter lists, optimizer settings,
dtypes, run sizes, and the seeded data drawn for a case."""

from __future__ import annotations

import importlib
import json
import math
import os
import random
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from .. import _registry


class BenchError(Exception):
    """A user error: unknown name, unusable backend, bad file. Exit code 2."""


# ---------------------------------------------------------------- param lists


@dataclass(frozen=True)
class ShapeList:
    """A named list of parameter shapes.

    Attributes:
        name: label in reports.
        shapes: one tuple of ints per tensor, in model order.
    """

    name: str
    shapes: tuple

    @property
    def numel(self) -> int:
        """Total elements over all tensors."""
        return sum(math.prod(s) for s in self.shapes)

    def __len__(self) -> int:
        return len(self.shapes)

    def describe(self) -> str:
        """e.g. ``"161 tensors, 25.6M params"``."""
        return f"{len(self)} tensors, {_human(self.numel)} params"


def _resnet50() -> list:
    """torchvision ``resnet50()``'s parameter shapes, in ``parameters()`` order.

    Bottleneck v1.5 (stride on the 3x3 conv; strides do not change shapes):
    per block conv1 1x1, bn1, conv2 3x3, bn2, conv3 1x1, bn3, then the
    projection shortcut (1x1 conv, bn) in each stage's first block. 161
    tensors, 25,557,032 params.
    """
    shapes = [(64, 3, 7, 7), (64,), (64,)]
    inplanes = 64
    for width, blocks in ((64, 3), (128, 4), (256, 6), (512, 3)):
        out = width * 4
        for i in range(blocks):
            shapes += [(width, inplanes, 1, 1), (width,), (width,),
                       (width, width, 3, 3), (width,), (width,),
                       (out, width, 1, 1), (out,), (out,)]
            if i == 0:
                shapes += [(out, inplanes, 1, 1), (out,), (out,)]
            inplanes = out
    shapes += [(1000, 2048), (1000,)]
    return shapes


def _gpt2_small() -> list:
    """Hugging Face ``GPT2LMHeadModel`` (gpt2, 124M) parameter shapes.

    wte, wpe, 12 blocks of (ln_1, attn.c_attn, attn.c_proj, ln_2, mlp.c_fc,
    mlp.c_proj; Conv1D weights are [in, out]), ln_f. lm_head is tied to wte
    and not a separate parameter. 148 tensors, 124,439,808 params.
    """
    d, vocab, ctx, layers = 768, 50257, 1024, 12
    shapes = [(vocab, d), (ctx, d)]
    for _ in range(layers):
        shapes += [(d,), (d,), (d, 3 * d), (3 * d,), (d, d), (d,),
                   (d,), (d,), (d, 4 * d), (4 * d,), (4 * d, d), (d,)]
    shapes += [(d,), (d,)]
    return shapes


def _many_small(count: int = 1000, lo: int = 1024, hi: int = 4096, seed: int = 0) -> list:
    """``count`` 1-D tensors of ``lo``..``hi`` elements (seeded): the
    per-tensor overhead case, where launches and bookkeeping dominate."""
    rng = random.Random(seed)
    return [(rng.randint(lo, hi),) for _ in range(count)]


def _fixed_cost() -> list:
    """161 tensors of 64 elements: resnet50's tensor count with almost no
    data, so the step time is the fixed cost per step (Python, launches)."""
    return [(64,)] * 161


def _tiny() -> list:
    """A few odd-sized tensors (4,457 params) for tests and CI smoke runs."""
    return [(64, 32), (64,), (8, 3, 3, 3), (1000,), (17,), (3, 5, 7), (2048,), (1,)]


#: Named lists: name -> (generator, shown in --help).
LISTS: dict[str, tuple[Callable[[], list], bool]] = {
    "resnet50": (_resnet50, True),
    "gpt2-small": (_gpt2_small, True),
    "many-small": (_many_small, True),
    "fixed-cost": (_fixed_cost, True),
    "tiny": (_tiny, False),
}


def shape_list(name: str) -> ShapeList:
    """A named parameter list.

    Args:
        name: a key of ``LISTS``.

    Raises:
        BenchError: unknown name.
    """
    try:
        gen, _ = LISTS[name]
    except KeyError:
        raise BenchError(f"unknown list {name!r} (known: {', '.join(_public_lists())})") from None
    return ShapeList(name, tuple(tuple(s) for s in gen()))


def _public_lists() -> list:
    return [n for n, (_, shown) in LISTS.items() if shown]


def _check_shape(s, where: str) -> tuple:
    if isinstance(s, int) and not isinstance(s, bool):
        s = [s]
    if not isinstance(s, (list, tuple)) or not all(
            isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in s):
        raise BenchError(f"{where}: a shape must be a list of non-negative ints, got {s!r}")
    return tuple(s)


def shapes_from_json(path: str | os.PathLike) -> ShapeList:
    """Read a list of shapes from a JSON file.

    Accepted: ``[[768, 768], [768], ...]`` or ``{"name": "...", "shapes":
    [...]}``; an int stands for a 1-D shape.

    Raises:
        BenchError: unreadable file or malformed content.
    """
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except OSError as err:
        raise BenchError(f"cannot read --shapes file {str(path)!r}: {err.strerror}") from None
    except json.JSONDecodeError as err:
        raise BenchError(f"--shapes file {str(path)!r} is not valid JSON: {err}") from None
    name = path.stem
    if isinstance(data, dict):
        name = str(data.get("name", name))
        data = data.get("shapes")
    if not isinstance(data, list) or not data:
        raise BenchError(f"--shapes file {str(path)!r}: expected a non-empty list of "
                         "shapes or {\"shapes\": [...]}")
    return ShapeList(name, tuple(_check_shape(s, str(path)) for s in data))


def shapes_from_model(spec: str) -> ShapeList:
    """Parameter shapes of ``module:factory()`` (an nn.Module or tensors).

    The current directory is importable, as with ``python -m``.

    Raises:
        BenchError: bad spec, import failure, or a factory that fails.
    """
    mod_name, sep, attr = spec.partition(":")
    if not sep or not mod_name or not attr:
        raise BenchError(f"--model expects module:factory, got {spec!r}")
    if os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        obj = importlib.import_module(mod_name)
    except Exception as err:  # noqa: BLE001 - any import failure is the user's
        raise BenchError(f"--model {spec}: cannot import {mod_name!r}: "
                         f"{type(err).__name__}: {err}") from None
    for part in attr.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            raise BenchError(f"--model {spec}: {mod_name!r} has no attribute {attr!r}") from None
    try:
        model = obj()
    except Exception as err:  # noqa: BLE001
        raise BenchError(f"--model {spec}: {attr}() raised {type(err).__name__}: {err}") from None
    if isinstance(model, torch.nn.Module):
        tensors = [p for p in model.parameters() if p.requires_grad]
    else:
        try:
            tensors = list(model)
        except TypeError:
            tensors = None
        if tensors is None or not all(torch.is_tensor(t) for t in tensors):
            raise BenchError(f"--model {spec}: {attr}() must return an nn.Module or "
                             f"tensors, got {type(model).__name__}")
    if not tensors:
        raise BenchError(f"--model {spec}: the model has no trainable parameters")
    return ShapeList(f"model:{spec}", tuple(tuple(t.shape) for t in tensors))


# ----------------------------------------------------------------- optimizers


@dataclass(frozen=True)
class OptimizerSpec:
    """One optimizer setting, the same for every implementation.

    Attributes:
        name: label (``sgd``, ``sgd-nesterov``, ``adam``, ``adamw``, ...).
        cls: class name in both ``torch.optim`` and ``fused_optim``: the name
            of its record in ``fused_optim._registry``.
        kwargs: constructor arguments besides params and the path switches.
    """

    name: str
    cls: str
    kwargs: dict

    @property
    def record(self):
        """The class's :class:`fused_optim._registry.Record`."""
        return _registry.get(self.cls)

    @property
    def kind(self) -> str:
        """The kernel the backends run for it (the record's; Adam and AdamW share one)."""
        return self.record.kernel

    @property
    def reads(self) -> int:
        """Arrays read per element (the ceiling's k): see :func:`traffic`."""
        return traffic(self.cls, self.kwargs)[0]

    @property
    def writes(self) -> int:
        """Arrays written per element (the ceiling's m)."""
        return traffic(self.cls, self.kwargs)[1]

    def bytes_per_step(self, numel: int, itemsize: int) -> int:
        """Counted memory traffic of one step."""
        return (self.reads + self.writes) * itemsize * numel


_TRAFFIC: dict = {}


def traffic(cls: str, kwargs: dict) -> tuple:
    """``(arrays read, arrays written)`` per element by optimizer ``cls`` with ``kwargs``.

    Counted from torch's own class after one step on a 2-element param: the
    grad is read, and the param and every per-element state tensor it keeps
    (the step counter is not) are read and written. So a new optimizer
    needs no byte counts written down anywhere, and the count follows the
    options that create state (SGD's momentum, Adam's amsgrad, RMSprop's
    centered).
    """
    key = (cls, repr(sorted(kwargs.items())))
    if key not in _TRAFFIC:
        p = torch.nn.Parameter(torch.zeros(2))
        p.grad = torch.ones(2)
        opt = _registry.get(cls).torch_cls([p], **kwargs)
        opt.step()
        n = sum(1 for v in opt.state[p].values() if torch.is_tensor(v) and v.shape == p.shape)
        _TRAFFIC[key] = (2 + n, 1 + n)
    return _TRAFFIC[key]


#: The settings ``fused-optim bench`` times, by ``--optimizers`` name: the
#: class's name and its constructor's arguments besides params. A record
#: without an entry is timed as ``<functional>`` with the class's defaults.
SETTINGS: dict[str, tuple] = {
    "sgd": ("SGD", dict(lr=0.01, momentum=0.9, weight_decay=1e-4)),
    "sgd-nesterov": ("SGD", dict(lr=0.01, momentum=0.9, weight_decay=1e-4, nesterov=True)),
    "adam": ("Adam", dict(lr=1e-3)),
    "adamw": ("AdamW", dict(lr=1e-3, weight_decay=0.01)),
    "adagrad": ("Adagrad", dict(lr=0.01)),
    "rmsprop": ("RMSprop", dict(lr=1e-3)),
    # averaging from the third step on: the default t0 (1e6) copies the param
    # into ax, reading one stream less than the traffic count assumes
    "asgd": ("ASGD", dict(lr=0.01, t0=0.0)),
}


def _optimizers() -> dict:
    """:data:`SETTINGS`, and a default setting for each record without one."""
    out = {name: OptimizerSpec(name, cls, dict(kwargs))
           for name, (cls, kwargs) in SETTINGS.items()}
    timed = {spec.cls for spec in out.values()}
    for record in _registry.records():
        if record.name not in timed:
            out[record.functional] = OptimizerSpec(record.functional, record.name, {})
    return out


#: The settings a run can time (see :data:`SETTINGS`).
OPTIMIZERS: dict[str, OptimizerSpec] = _optimizers()

DTYPES: dict[str, torch.dtype] = {"fp32": torch.float32, "bf16": torch.bfloat16,
                                  "fp16": torch.float16, "fp64": torch.float64}
#: What a plain run covers; fp16/fp64 on request.
DEFAULT_DTYPES = ("fp32", "bf16")


# -------------------------------------------------------------------- presets

#: Where a run saves its JSON and chart unless told (``--json``, ``--plot``):
#: a folder of the current directory, so that it works the same from a
#: checkout (``make bench``) and from an installed package, and one file per
#: run (named by its start time), so that ``--compare`` finds earlier runs.
#: Not benchmarks/results/: that holds the curated runs the README quotes,
#: and a default run should not dirty the checkout (.gitignore lists it).
RESULTS_DIR = "bench-results"


@dataclass(frozen=True)
class Size:
    """Defaults of one run size.

    Attributes:
        lists: named lists.
        optimizers: optimizer names.
        warmup: untimed interleaved rounds (the first compiles and allocates).
        min_rounds, max_rounds: bounds on the timed rounds.
        target_s: timed seconds per case the round count aims at.
        budget_s: if set, wall-clock seconds for all cases: each case aims
            its timed rounds at an equal share of what is left, so a slow
            (loaded) machine gets fewer rounds rather than a longer run.
        baselines: torch.optim paths timed when ``--baselines`` names none
            (None: ``impls.DEFAULT_BASELINES``).
    """

    lists: tuple
    optimizers: tuple
    warmup: int
    min_rounds: int
    max_rounds: int
    target_s: float
    budget_s: float | None = None
    baselines: tuple | None = None


SIZES: dict[str, Size] = {
    # What `make bench` runs: issue 30 asks for the answer within 5 minutes
    # of a fresh clone on the 2-core machine, virtualenv included. A fresh
    # clone at load 8 (other processes on 1.5 of the 2 cores): 5:23 with
    # torch's for-loop also timed, the bench 223 s of it, of which Numba's
    # first calls 9-14 s per optimizer kernel and 4-6 s per ceiling
    # pattern, and the for-loop's rounds 0.7-1.4 s each. So torch's fastest
    # path only (fused: fastest in every case of the 2026-11-28 full run,
    # benchmarks/results/cpu-2core.txt; the for-loop and foreach are in
    # --full), 4 rounds at least (the fewest whose spread is judged) in a
    # 100 s budget; idle, the 60-round cap ends it sooner. resnet50 rather
    # than gpt2-small: a fifth of the bytes per step, so five times the
    # rounds in the same time.
    "default": Size(("resnet50", "many-small"), ("sgd", "adamw"), 1, 4, 60, 10.0, 100.0,
                    ("fused",)),
    # On the 2-core dev VM with warm Numba caches: 24 s wall when idle; 1-5
    # minutes while other tenants kept the load at 3-6 (torch's thread pool
    # stalls, see _warn_load), hence the budget.
    "quick": Size(("resnet50", "many-small"), ("sgd", "adamw"), 1, 3, 15, 1.5, 40.0,
                  ("fused",)),
    # Every list, optimizer setting and torch path: 48 cases took 28 minutes
    # on the loaded 2-core machine (issue 30, cold Numba cache).
    "full": Size(("resnet50", "gpt2-small", "many-small", "fixed-cost"), tuple(OPTIMIZERS),
                 3, 10, 100, 15.0),
    "tiny": Size(("tiny",), ("sgd", "adamw"), 1, 3, 3, 0.0),
}


def make_data(shapes: ShapeList, dtype: torch.dtype, device, seed: int = 0):
    """Seeded random params and grads of ``shapes``.

    Returns:
        (params, grads): two lists of tensors.
    """
    gen = torch.Generator().manual_seed(seed)
    params, grads = [], []
    for s in shapes.shapes:
        # Drawn in float32 on the CPU from one generator, so every dtype and
        # device of a list starts from the same values.
        params.append(torch.randn(s, generator=gen).to(device=device, dtype=dtype))
        grads.append(torch.randn(s, generator=gen).to(device=device, dtype=dtype))
    return params, grads


def _human(n: float) -> str:
    for div, unit in ((1e9, "G"), (1e6, "M"), (1e3, "K")):
        if n >= div:
            return f"{n / div:.1f}{unit}"
    return str(int(n))
