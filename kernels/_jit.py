"""The Numba pieces both backends use: raw addresses, and warm cache loads.

The Numba backend's kernels and the host-side step arithmetic
(``kernels/steps.py``, which the Triton backend runs too) read memory
through the address table's int64 addresses (:func:`address`) and load
their cached code without Numba's full context refresh (:func:`light_loads`).
Backend-neutral, so that neither backend imports the other for them.
"""

from __future__ import annotations

from numba import types
from numba.core import cgutils
from numba.extending import intrinsic

#: How every jitted helper of the kernels is compiled (``@njit(**HELPER)``,
#: ``@overload(..., jit_options=HELPER)``): once per signature and process,
#: then inlined by LLVM (the ``alwaysinline`` attribute), with the entry
#: points' error model. Numba's own ``inline="always"`` re-derives and re-types
#: the helper's IR at every call site instead: most of a kernel's compile time.
#: Only what takes a function as an argument (the walk, the spans, the block)
#: is inlined by numba, which resolves those calls statically (a jitted
#: function passed to a compiled one is a run-time object that numba will not
#: cache). Compile of the first step in a fresh process, empty cache, after
#: an SGD and an Adam step: AdamW bfloat16 with Kahan and stochastic rounding
#: 4.2 s -> 0.9 s, RMSprop with momentum, centered, Kahan 3.8 s -> 1.1 s; the
#: same vector loops (the AdamW bf16 Kahan loop: 70 instructions either way).
HELPER = {"forceinline": True, "error_model": "numpy"}


@intrinsic
def address(typingctx, addr):
    """int64 byte address -> void* (for ``numba.carray``)."""
    sig = types.voidptr(types.int64)

    def codegen(context, builder, sig, args):
        return builder.inttoptr(args[0], cgutils.voidptr_t)

    return sig, codegen


def light_loads(namespace) -> None:
    """Load this module's cached kernels without Numba's full context refresh.

    Numba's ``load_overload`` first runs ``refresh()`` on the CPU target:
    it imports and installs every lowering registry, which only compiling
    needs (Numba's compiler refreshes before each compile anyway). A cached
    kernel needs the runtime (NRT) initialised and its library rebuilt,
    nothing more. Any failure falls back to Numba's own load. What it saves,
    after issue 24's few kernels (``python benchmarks/warm_load.py --runs 5``,
    a 4-layer 1024-wide MLP, Numba already imported, medians of 5 fresh
    processes, 2-core VM, 2026-12-07): the warm-cache first step of AdamW
    98 ms against 314 ms with Numba's own load, SGD with momentum 82 ms
    against 357 ms. It follows Numba 0.68's private cache API.
    """
    from numba.core.dispatcher import Dispatcher
    from numba.core.runtime import rtsys

    for obj in list(namespace.values()):
        cache = getattr(obj, "_cache", None)
        impl = getattr(cache, "_load_overload", None)
        if not isinstance(obj, Dispatcher) or impl is None:
            continue

        def load(sig, ctx, _impl=impl, _full=cache.load_overload):
            try:
                rtsys.initialize(ctx)
                return _impl(sig, ctx)
            except Exception:  # noqa: BLE001 - Numba's own path decides
                return _full(sig, ctx)

        cache.load_overload = load
