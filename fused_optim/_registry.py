"""The optimizers fused_optim provides: one :class:`Record` each.

Everything that lists optimizers reads these records: the package's exports,
:func:`fused_optim.patch_torch` (and so ``fused-optim run``), ``fused-optim
bench``, and the tests (``tests/optim_db.py`` pairs each record with its test
data). A record lives beside its class, as ``RECORDS`` in the class's module;
every public module of the package that defines ``RECORDS`` is found here, so
adding an optimizer edits no shared list.
"""

from __future__ import annotations

import functools
import importlib
import os
import pkgutil
from typing import NamedTuple


class Record(NamedTuple):
    """What the rest of fused_optim needs to know about one optimizer class."""

    #: the class name, torch.optim's (``"AdamW"``)
    name: str
    #: the fused_optim submodule that defines the class and its functional
    module: str
    #: the functional's name, in that module and in torch's (``"adamw"``)
    functional: str
    #: the torch.optim submodule that defines torch's class (``"torch.optim.adamw"``)
    torch_module: str
    #: the kernel every backend provides for it (``kernels/<backend>``); several
    #: classes may share one (Adam and AdamW)
    kernel: str
    #: per-param state the kernels update, in table order (STATE0, STATE1, ...)
    state: tuple
    #: whether each param has a ``state["step"]`` counter the kernels advance
    has_step: bool
    #: per-param scalar state (1-element tensors placed as ``step``: NAdam's
    #: ``mu_product``), in table order after ``state``; never ``state_dtype``'s
    scalars: tuple = ()

    @property
    def cls(self) -> type:
        return getattr(importlib.import_module(f"fused_optim.{self.module}"), self.name)

    @property
    def function(self):
        """fused_optim's functional (``fused_optim.adam.adamw``)."""
        return getattr(importlib.import_module(f"fused_optim.{self.module}"),
                       self.functional)

    @property
    def torch_cls(self) -> type:
        """torch's own class, even while :func:`fused_optim.patch_torch` holds.

        Taken by :func:`records` when it finds the record (before any patch:
        patching reads the records); a record it did not find (a test's) is
        looked up where torch defines it.
        """
        cls = _TORCH_CLASSES.get(self.name)
        if cls is None:
            cls = getattr(importlib.import_module(self.torch_module), self.name)
        return cls


#: torch's class of each record, taken when the records are first found: before
#: :func:`fused_optim.patch_torch` can replace it (patching reads the records)
_TORCH_CLASSES: dict = {}


@functools.cache
def records() -> tuple:
    """Every optimizer's record, in a stable order (module name, then as listed)."""
    # the package's directory, not the package: this runs while fused_optim's
    # __init__ is still importing
    found = []
    for info in sorted(pkgutil.iter_modules([os.path.dirname(__file__)]),
                       key=lambda m: m.name):
        if info.ispkg or info.name.startswith("_"):
            continue
        module = importlib.import_module(f"{__package__}.{info.name}")
        found.extend(getattr(module, "RECORDS", ()))
    names = [r.name for r in found]
    if len(set(names)) != len(names):
        raise RuntimeError(f"two optimizer records share a name: {names}")
    for r in found:
        _TORCH_CLASSES.setdefault(r.name, getattr(importlib.import_module(r.torch_module),
                                                  r.name))
    return tuple(found)


def get(name: str) -> Record:
    """The record of class ``name`` (``"SGD"``); KeyError if there is none."""
    for record in records():
        if record.name == name:
            return record
    raise KeyError(f"fused_optim has no optimizer {name!r}; it has "
                   f"{', '.join(r.name for r in records())}")


def names() -> tuple:
    return tuple(r.name for r in records())
