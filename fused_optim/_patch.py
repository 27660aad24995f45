"""Swap torch.optim's classes for fused_optim's (every registered one), reversibly.

Only the class attributes move; torch's functional ``sgd``/``adam``/``adamw``
and everything else in torch.optim stay torch's, so fused_optim's own fallbacks
(``torch.optim.sgd.sgd`` for sparse gradients, ``torch.optim.adam.adam`` for
``differentiable=True``) keep calling torch's code while patched.
"""

from __future__ import annotations

import importlib
import sys
import threading

import torch.optim  # also loads torch.optim's submodules (sgd, adam, ...)

from . import _registry

__all__ = ["patch_torch", "PatchHandle", "is_patched", "original"]


def _classes() -> dict:
    """name -> fused class, for every optimizer in the registry."""
    return {r.name: r.cls for r in _registry.records()}


def _targets():
    """(module that exposes the class, attribute name, fused replacement).

    The package attribute serves ``torch.optim.SGD`` and ``from torch.optim
    import SGD``; the defining submodule serves ``from torch.optim.sgd import
    SGD``.
    """
    for r in _registry.records():
        yield "torch.optim", r.name, r.cls
        yield r.torch_module, r.name, r.cls

# torch.distributed.optim.utils builds ``functional_optim_map`` (keyed by
# torch.optim classes) when first imported, and ZeroRedundancyOptimizer
# (overlap_with_ddp=True) and DistributedOptimizer look optimizer classes up
# in it. Importing it eagerly costs over a second, so instead the map is
# reconciled: fused classes get torch's functional counterparts while patched,
# and torch's classes get their entries back if the map was built while
# patched.
_FUNCTIONAL_MAP_MODULE = "torch.distributed.optim.utils"

# Modules that copy torch.optim classes at import time. They are cheap, so
# importing them before patching keeps them holding torch's classes forever.
_PREIMPORT = ("torch.optim._multi_tensor",)

_lock = threading.RLock()
_depth = 0
_saved: dict[tuple[str, str], object] = {}
_map_added: list[type] = []


def _module(name: str):
    return sys.modules.get(name) or importlib.import_module(name)


def _functional_map():
    mod = sys.modules.get(_FUNCTIONAL_MAP_MODULE)
    return getattr(mod, "functional_optim_map", None)


def _apply() -> None:
    for name in _PREIMPORT:
        try:
            importlib.import_module(name)
        except ImportError:
            pass
    targets = list(_targets())
    for modname, attr, _ in targets:
        _saved[(modname, attr)] = getattr(_module(modname), attr)
    for modname, attr, fused in targets:
        setattr(_module(modname), attr, fused)

    fmap = _functional_map()
    _map_added.clear()
    for name, fused in _classes().items():
        orig = _saved[("torch.optim", name)]
        if fmap is None:
            # if the map gets built while patched it is keyed by this class
            _map_added.append(fused)
        elif orig in fmap and fused not in fmap:
            fmap[fused] = fmap[orig]
            _map_added.append(fused)


def _restore() -> None:
    for (modname, attr), orig in _saved.items():
        setattr(_module(modname), attr, orig)
    fmap = _functional_map()
    if fmap is not None:
        for name, fused in _classes().items():
            if fused in _map_added and fused in fmap:
                fmap.setdefault(_saved[("torch.optim", name)], fmap.pop(fused))
    _map_added.clear()
    _saved.clear()


class PatchHandle:
    """One activation of :func:`patch_torch`.

    torch.optim stays patched until every live handle has been undone, so
    nested and repeated activations compose. Also a context manager that
    undoes itself on exit.
    """

    def __init__(self) -> None:
        self._active = True

    @property
    def active(self) -> bool:
        """Whether this handle still holds the patch."""
        return self._active

    def undo(self) -> None:
        """Release this handle; the last release restores torch's classes.

        Calling it again does nothing.
        """
        global _depth
        with _lock:
            if not self._active:
                return
            self._active = False
            _depth -= 1
            if _depth == 0:
                _restore()

    restore = undo

    def __enter__(self) -> PatchHandle:
        return self

    def __exit__(self, *exc_info) -> None:
        self.undo()

    def __repr__(self) -> str:
        return f"<fused_optim patch of torch.optim ({'active' if self._active else 'undone'})>"


def patch_torch() -> PatchHandle:
    """Make torch.optim's classes be fused_optim's, for every optimizer it has.

    Replaces the classes on ``torch.optim`` and on ``torch.optim.sgd``,
    ``torch.optim.adam`` and ``torch.optim.adamw``, so every later lookup --
    ``torch.optim.SGD``, ``from torch.optim import SGD``,
    ``from torch.optim.sgd import SGD`` -- gets the fused class. Names bound
    before the call (``from torch.optim import SGD`` done earlier) keep
    torch's class. lr_scheduler, GradScaler, state_dicts and
    ``isinstance(opt, torch.optim.Optimizer)`` work as before, and
    checkpoints are interchangeable with unpatched torch.optim.

    Takes effect immediately; use the result as a context manager or call its
    :meth:`~PatchHandle.undo`. Calls nest: torch's original classes come back
    when the last active handle is undone.

    Returns:
        PatchHandle: the handle that undoes this activation.

    Example:
        >>> with fused_optim.patch_torch():
        ...     optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        >>> type(optimizer)
        <class 'fused_optim.sgd.SGD'>
    """
    global _depth
    with _lock:
        if _depth == 0:
            _apply()
        _depth += 1
        return PatchHandle()


def is_patched() -> bool:
    """Whether torch.optim currently holds fused_optim's classes."""
    return _depth > 0


def original(name: str) -> type:
    """torch's own class ``name`` (a registered name: "SGD", "Adam", ...), patched or not."""
    if name not in _registry.names():
        raise KeyError(f"fused_optim patches {', '.join(_registry.names())}, not {name!r}")
    with _lock:
        saved = _saved.get(("torch.optim", name))
        return saved if saved is not None else getattr(torch.optim, name)
