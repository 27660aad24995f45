"""Backend selection: the one place that decides which kernels run.

Order of precedence: the optimizer's ``backend=`` argument, then the
``FUSED_OPTIM_BACKEND`` environment variable (read when the optimizer is
built), then ``"auto"``. Auto sends CUDA tensors to Triton and CPU tensors to
Numba; devices neither covers, and dtypes a compiled backend lacks, go to the
pure-torch reference kernels.
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import os

import torch

ENV_VAR = "FUSED_OPTIM_BACKEND"
BACKENDS = ("auto", "numba", "triton", "torch")

_MODULES = {
    "numba": "fused_optim.kernels.numba",
    "triton": "fused_optim.kernels.triton",
    "torch": "fused_optim.kernels.reference",
}
#: auto's choice per device: the first that runs there natively. (No two
#: compiled backends claim the same device type today, so the order is moot.)
_AUTO_ORDER = ("triton", "numba", "torch")
_loaded: dict[str, object] = {}


def requested(backend: str | None = None) -> str:
    """Validate a backend name; None means the environment default."""
    if backend is None:
        backend = os.environ.get(ENV_VAR, "").strip().lower() or "auto"
        source = f"the {ENV_VAR} environment variable"
    else:
        source = "backend"
    if not isinstance(backend, str) or backend not in BACKENDS:
        raise ValueError(
            f"Invalid {source}: {backend!r}; expected one of {', '.join(BACKENDS)}"
        )
    if backend != "auto":
        module(backend)  # an explicit backend that cannot even import fails now
    return backend


def module(name: str):
    """Import a backend's kernel module, or say how to make it importable."""
    mod = _loaded.get(name)
    if mod is None:
        try:
            mod = importlib.import_module(_MODULES[name])
        except ImportError as err:
            raise RuntimeError(
                f"fused_optim backend {name!r} is not available ({err}). "
                f"Install it with: {declared(name)['INSTALL_HINT']}, or pass backend='auto'."
            ) from err
        _loaded[name] = mod
    return mod


@functools.lru_cache(maxsize=None)
def declared(name: str) -> dict:
    """A backend's literal declarations (kernels/contract.py), without importing it."""
    from fused_optim.kernels import contract

    return contract.declared(importlib.util.find_spec(_MODULES[name]).origin)


def _triton_interpreted() -> bool:
    from fused_optim.kernels import contract

    return contract.interpreted()


def stands_in_for_gpu(name: str) -> bool:
    """True when CPU tensors play CUDA's part: interpreted Triton (tests)."""
    return name == "triton" and _triton_interpreted()


def _importable(name: str) -> bool:
    try:
        module(name)
    except RuntimeError:
        return False
    return True


def runs_on(name: str, device_type: str, *, interpreted: bool | None = None) -> bool:
    """Whether backend ``name`` updates tensors of ``device_type`` (installed or not)."""
    if name == "auto":
        return True
    if interpreted is None:
        interpreted = _triton_interpreted()
    decl = declared(name)
    return (decl["DEVICES"] is None or device_type in decl["DEVICES"]
            or (interpreted and device_type in decl["INTERPRETED_DEVICES"]))


def why_not(name: str, device, dtype: torch.dtype | None = None, *,
            interpreted: bool | None = None) -> str | None:
    """Why backend ``name`` cannot update ``dtype`` tensors on ``device``, or None.

    The reason is the error :func:`select` raises. ``dtype=None`` asks about
    the device alone; ``interpreted`` (default: ``TRITON_INTERPRET`` now)
    says whether interpreted devices count.
    """
    if name == "auto":
        return None
    device = torch.device(device)
    if not runs_on(name, device.type, interpreted=interpreted):
        return declared(name)["DEVICE_HINT"].format(device=device, type=device.type)
    try:
        mod = module(name)
    except RuntimeError as err:
        return str(err)
    supported = mod.SUPPORTED_DTYPES
    if dtype is not None and supported is not None:
        if str(dtype).removeprefix("torch.") not in supported:
            return (f"backend={name!r} does not support {dtype} parameters (it supports "
                    f"{', '.join(supported)}). Use backend='torch' for them.")
    return None


def can_run(name: str, device, dtype: torch.dtype | None = None, *,
            interpreted: bool | None = None) -> bool:
    """Whether backend ``name`` can update ``dtype`` tensors on ``device`` here."""
    return why_not(name, device, dtype, interpreted=interpreted) is None


def select(name: str, device: torch.device, dtype: torch.dtype):
    """The kernel module that updates tensors of ``device`` and ``dtype``."""
    return _select(name, device, dtype, _triton_interpreted())


@functools.lru_cache(maxsize=64)
def _select(name, device, dtype, interpreted):
    # cached: asked for every bucket at every step, and the answer only
    # depends on these and on which packages import (fixed per process)
    if name == "auto":
        # never an interpreter: it stands in for a GPU only when asked by name
        return module(next(b for b in _AUTO_ORDER
                           if can_run(b, device, dtype, interpreted=False)))
    why = why_not(name, device, dtype, interpreted=interpreted)
    if why is not None:
        raise RuntimeError(why)
    return module(name)
