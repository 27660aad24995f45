"""The contract every backend module (``reference``, ``numba``, ``triton``) keeps.

``fused_optim._backend`` decides where a backend runs from these declarations
alone, so that no other module restates a backend's devices or dtypes.
"""

from __future__ import annotations

import ast
import importlib
import inspect
import os
import pkgutil
from typing import Optional, Protocol, runtime_checkable


@runtime_checkable
class Backend(Protocol):
    #: the ``backend=`` name that selects this module
    NAME: str
    #: device types (``torch.device.type``) its compiled code updates; None: any
    DEVICES: Optional[tuple]
    #: further device types it updates when its interpreter is on
    #: (``TRITON_INTERPRET=1``), slowly: for tests without a GPU
    INTERPRETED_DEVICES: tuple
    #: dtype names (``"float32"``) it updates; None: any the API layer accepts
    SUPPORTED_DTYPES: Optional[tuple]
    #: how to install what it imports; None when there is nothing to install
    INSTALL_HINT: Optional[str]
    #: the error for a tensor on a device it does not run on, formatted with
    #: ``device`` (the torch.device) and ``type`` (its type); None if DEVICES is
    DEVICE_HINT: Optional[str]

    # Kernels, one per optimizer, are found by kernel(): the function <name>
    # of <backend>/<name>.py, with the keywords of the reference backend's
    # (kernels/reference/<name>.py), which all end with ``kahan_sum=False,
    # stochastic_round=None, state_round=None``: how bfloat16/float16 params
    # are stored, and whether bfloat16 state (``batch.state_dtype``) rounds
    # stochastically (reference/_precision.py).


#: Written as literals in the module's source: the install hint is needed
#: exactly when the module cannot be imported, and where a backend runs is
#: asked before it is imported (as the device error always came first).
def interpreted() -> bool:
    """Whether Triton's interpreter is on (``TRITON_INTERPRET`` set, not 0).

    The one reading of the variable: the API layer then lets a backend take
    its INTERPRETED_DEVICES, and the Triton backend serialises launches.
    """
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


LITERALS = ("NAME", "DEVICES", "INTERPRETED_DEVICES", "INSTALL_HINT", "DEVICE_HINT")


def kernel(module, name: str):
    """Backend ``module``'s kernel ``name``.

    The function ``name`` in the submodule ``<backend>/<name>.py``, imported
    on first use (or the module's attribute of that name where one is set,
    as a test's stand-in). Every backend's kernel ``name`` takes the same
    keywords as the reference backend's.
    """
    fn = getattr(module, name, None)
    if fn is None or inspect.ismodule(fn):
        # (importing a submodule binds the module itself to the package's
        # attribute of its name: replaced here by its kernel)
        fn = getattr(importlib.import_module(f"{module.__name__}.{name}"), name)
        setattr(module, name, fn)
    return fn


def declared(path: str) -> dict:
    """The LITERALS of the backend module at ``path``, without importing it."""
    with open(path, encoding="utf-8") as f:
        tree = ast.parse(f.read(), path)
    out = {}
    for node in tree.body:
        if isinstance(node, ast.Assign) and len(node.targets) == 1:
            target = node.targets[0]
            if isinstance(target, ast.Name) and target.id in LITERALS:
                out[target.id] = ast.literal_eval(node.value)
    missing = [name for name in LITERALS if name not in out]
    if missing:
        raise TypeError(f"{path} declares no literal {', '.join(missing)}")
    return out


def kernel_names() -> tuple:
    """Every kernel's name: the reference backend's kernel files (``reference/<name>.py``)."""
    from . import reference

    return tuple(sorted(m.name for m in pkgutil.iter_modules(reference.__path__)
                        if not m.name.startswith("_")))


def problems(module, kernels=None) -> list:
    """How ``module`` breaks the contract (empty if it keeps it).

    ``kernels``: the kernel names to check (the registry's, from the API
    layer; default :func:`kernel_names`); each must take the reference
    backend's keywords.
    """
    out = []
    for name in Backend.__annotations__:
        if not hasattr(module, name):
            out.append(f"no {name}")
    for name in ("DEVICES", "SUPPORTED_DTYPES"):
        value = getattr(module, name, None)
        if value is not None and not (isinstance(value, tuple)
                                      and all(isinstance(v, str) for v in value)):
            out.append(f"{name} is not a tuple of str or None")
    if getattr(module, "DEVICES", None) is not None and getattr(module, "DEVICE_HINT", None) is None:
        out.append("DEVICES is limited but there is no DEVICE_HINT")
    from . import reference
    for name in kernel_names() if kernels is None else kernels:
        try:
            fn = kernel(module, name)
        except ImportError:
            fn = None
        if not callable(fn):
            out.append(f"no kernel {name}")
            continue
        want = inspect.signature(kernel(reference, name)).replace(
            return_annotation=inspect.Signature.empty)
        got = inspect.signature(fn).replace(return_annotation=inspect.Signature.empty)
        if str(got) != str(want):
            out.append(f"{name}{got} is not {name}{want}")
    return out
