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
import os

import torch

ENV_VAR = "FUSED_OPTIM_BACKEND"
BACKENDS = ("auto", "numba", "triton", "torch")

_MODULES = {
    "numba": "fused_optim.kernels.numba",
    "triton": "fused_optim.kernels.triton",
    "torch": "fused_optim.kernels.reference",
}
_INSTALL_HINT = {
    "numba": "pip install numba",
    "triton": "pip install 'fused_optim[gpu]' (or pip install triton)",
}
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
                f"Install it with: {_INSTALL_HINT[name]}, or pass backend='auto'."
            ) from err
        _loaded[name] = mod
    return mod


def _triton_interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def stands_in_for_gpu(name: str) -> bool:
    """True when CPU tensors play CUDA's part: interpreted Triton (tests)."""
    return name == "triton" and _triton_interpreted()


def _importable(name: str) -> bool:
    try:
        module(name)
    except RuntimeError:
        return False
    return True


def select(name: str, device: torch.device, dtype: torch.dtype):
    """The kernel module that updates tensors of ``device`` and ``dtype``."""
    return _select(name, device, dtype, _triton_interpreted())


@functools.lru_cache(maxsize=64)
def _select(name, device, dtype, interpreted):
    # cached: asked for every bucket at every step, and the answer only
    # depends on these and on which packages import (fixed per process)
    dname = str(dtype).removeprefix("torch.")
    if name == "auto":
        if device.type == "cuda" and _importable("triton"):
            name = "triton"
        elif device.type == "cpu" and _importable("numba"):
            name = "numba"
        else:
            name = "torch"
        mod = module(name)
        if dname not in getattr(mod, "SUPPORTED_DTYPES", (dname,)):
            mod = module("torch")
        return mod
    if name == "numba" and device.type != "cpu":
        raise RuntimeError(
            f"backend='numba' runs on CPU tensors, but got a parameter on "
            f"{device}. Use backend='triton' or backend='auto' for {device.type} tensors."
        )
    if name == "triton" and device.type != "cuda" and not (
        device.type == "cpu" and interpreted
    ):
        raise RuntimeError(
            f"backend='triton' needs CUDA tensors, but got a parameter on {device}. "
            "Move the model to CUDA, use backend='numba' or 'auto' for CPU tensors, "
            "or set TRITON_INTERPRET=1 to run the Triton kernels on CPU (slowly)."
        )
    mod = module(name)
    supported = getattr(mod, "SUPPORTED_DTYPES", None)
    if supported is not None and dname not in supported:
        raise RuntimeError(
            f"backend={name!r} does not support {dtype} parameters (it supports "
            f"{', '.join(supported)}). Use backend='torch' for them."
        )
    return mod
