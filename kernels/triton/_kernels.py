"""Triton multi-tensor kernels: one launch updates every row of an address table.

Each program handles one ``BLOCK``-element chunk of one tensor. The launcher
passes a block map (``int32 [programs, 2]``: row, chunk index within the row)
so a program finds its row with two loads instead of a search, and turns the
row's raw addresses into typed pointers with ``int64.to(tl.pointer_type(T))``
(an ``inttoptr`` when compiled; a reinterpretation of the integer under
``TRITON_INTERPRET=1``). Offsets are int64 (``chunk * BLOCK`` overflows int32
in rows of more than 2**31 elements). A row's whole blocks run unmasked, so
that accesses vectorize (``ld.global.v4`` in the PTX when the launcher can
promise 16-byte aligned addresses); its last block is masked by ``NUMEL``.

Element math matches the Numba backend's (``kernels/numba/<name>.py``) operation for operation:
float32 math (float64 for float64 tensors), one rounding per stored value,
explicit ``tl.fma`` exactly where torch's CPU kernels fuse (``add(alpha=)``,
``lerp``, ``addcmul``), and the launcher turns off any other contraction. Float32 division and square root
are the IEEE ``div_rn`` / ``sqrt_rn``: Triton's ``/`` compiles to
``div.full.f32`` (2 ulp) and ``tl.sqrt`` is approximate for float32 on NVIDIA.
(``tl.fdiv(..., ieee_rounding=True)`` would cover both widths but fails to
compile for float64 in triton 3.9.)

bfloat16 goes through ``uint16`` pointers and is converted by bit
manipulation: the interpreter's float32 -> bfloat16 cast truncates instead of
rounding to nearest even, so the explicit conversion is the one that gives
the same bits compiled, interpreted and in the Numba backend.

Hyperparameters arrive in a float64 buffer (``hyper_ptr``) rather than as
scalar arguments: Triton types a Python float argument as float32, which
would round them before float64 math.

Nested ``@triton.jit`` helpers are kept few: compiled they are inlined and
free, but under the interpreter each call re-patches ``triton.language``,
about 1 ms per call in triton 3.9; with a helper per pointer and per
division they took half of an interpreted Adam program's 40 ms.
"""

import triton
import triton.language as tl

from .. import layout as L

_NCOLS = tl.constexpr(L.NCOLS)
_PARAM = tl.constexpr(L.PARAM)
_GRAD = tl.constexpr(L.GRAD)
_STATE0 = tl.constexpr(L.STATE0)
_STATE1 = tl.constexpr(L.STATE1)
_STATE2 = tl.constexpr(L.STATE2)
_STEP = tl.constexpr(L.STEP)
_NUMEL = tl.constexpr(L.NUMEL)
_FLAGS = tl.constexpr(L.FLAGS)
_FLAG_FRESH = tl.constexpr(L.FLAG_FRESH)
_FLAG_STEP_F64 = tl.constexpr(L.FLAG_STEP_F64)

@triton.jit
def _load(ptr, offs, mask, IS_BF16: tl.constexpr, COMPUTE: tl.constexpr):
    """Load a block (``mask`` None: unmasked) and widen it to the compute type."""
    x = tl.load(ptr + offs, mask=mask)
    if IS_BF16:
        # bfloat16 bits are the high half of the float32 bits: exact
        return (x.to(tl.uint32) << 16).to(tl.float32, bitcast=True)
    else:
        return x.to(COMPUTE)


@triton.jit
def _store(ptr, offs, x, mask, IS_BF16: tl.constexpr, ELEM: tl.constexpr):
    """Round a compute-type block once to the storage type and store it."""
    if IS_BF16:
        u = x.to(tl.uint32, bitcast=True)
        # round to nearest even; a NaN becomes the quiet NaN 0x7FC0 so that
        # rounding cannot carry its payload into the exponent (-> inf)
        r = (u + 0x7FFF + ((u >> 16) & 1)) >> 16
        y = tl.where((u & 0x7FFFFFFF) > 0x7F800000, 0x7FC0, r).to(tl.uint16)
    else:
        y = x.to(ELEM)
    tl.store(ptr + offs, y, mask=mask)


#: names that moved to the optimizers' own files, still readable from here
_MOVED = {"_sgd_block": "sgd", "_sgd_kernel": "sgd", "SGD_LR": "sgd", "SGD_WD": "sgd",
          "SGD_MOMENTUM": "sgd", "SGD_OMD": "sgd", "SGD_NHYPER": "sgd",
          "_adam_block": "adam", "_adam_kernel": "adam", "_adam_steps_kernel": "adam",
          "ADAM_NHYPER": "adam"}


def __getattr__(name):
    # (reading only: the launchers use their own module's names, so replace a
    # kernel in kernels/triton/<name>.py, not here)
    if name in _MOVED:
        import importlib
        return getattr(importlib.import_module(f"{__package__}.{_MOVED[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


@triton.jit
def _read_steps(table_ptr, r, rows):
    """The step counters of rows ``r`` (lanes past ``rows`` masked), plus one.

    Returns (step as float64, and for :func:`_write_steps`: the float64 and
    float32 views of each counter, their new values and which view is live).
    A float32 counter is advanced in float32, as torch's ``step += 1``.
    """
    live = r < rows
    base = table_ptr + r.to(tl.int64) * _NCOLS
    flags = tl.load(base + _FLAGS, mask=live, other=0)
    step_addr = tl.load(base + _STEP, mask=live, other=0)
    is64 = live & ((flags & _FLAG_STEP_F64) != 0)
    is32 = live & ((flags & _FLAG_STEP_F64) == 0)
    s64_ptr = step_addr.to(tl.pointer_type(tl.float64))
    s32_ptr = step_addr.to(tl.pointer_type(tl.float32))
    s64 = tl.load(s64_ptr, mask=is64, other=0.0) + 1.0
    s32 = tl.load(s32_ptr, mask=is32, other=0.0) + 1.0
    step = tl.where(is64, s64, s32.to(tl.float64))
    return step, s64_ptr, s32_ptr, s64, s32, is64, is32


@triton.jit
def _write_steps(r, rows, s64_ptr, s32_ptr, s64, s32, is64, is32, found_inf_ptr,
                 HAS_FOUND_INF: tl.constexpr):
    """Store what :func:`_read_steps` advanced, unless GradScaler found inf/NaN.

    The flag enters through the row bound (see ``sgd._sgd_kernel`` on the
    interpreter and scalar masks).
    """
    limit = rows
    if HAS_FOUND_INF:
        limit = tl.where(tl.load(found_inf_ptr) == 0, rows, 0)
    advance = r < limit
    tl.store(s64_ptr, s64, mask=advance & is64)
    tl.store(s32_ptr, s32, mask=advance & is32)
