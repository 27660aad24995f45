"""Raw-address views and element load/store for the Numba kernels.

Storage dtypes are carried by the numpy dtype of the view:

========  =============  ===========================================
torch     numpy view     load -> compute / compute -> store
========  =============  ===========================================
float64   float64        native, compute in float64
float32   float32        native
bfloat16  uint16         bits << 16; round-to-nearest-even on store
float16   int16          IEEE half decode; round-to-nearest-even on store
========  =============  ===========================================

float16 converts by instruction where the CPU has it (``F16_HARDWARE``: x86
F16C, aarch64; LLVM's ``fpext``/``fptrunc`` on ``half``), else by integer bit
manipulation. Every conversion is checked against torch for every half value
and for float32 rounding edge cases in ``tests/test_memory_safety.py``.

Where the bf16/fp16 time goes (issue 26; AVX-512 AMD EPYC dev VM, 2026-12-07,
2 threads; ``fused-optim bench --lists resnet50 gpt2-small --dtypes bf16
fp16``, paired against torch's fused step in one run):

* fp16 was 2.3-7.3x torch fused: the integer conversions ran in 64-bit
  vector lanes (Numba types uint32 arithmetic as 64-bit, and LLVM could not
  narrow through the branches: 116 ``<16 x i64>`` values in the SGD kernel's
  IR). A standalone fp16 SGD loop over 1M elements: 6.67 ms; 32-bit
  branch-free soft form 1.56 ms; by instruction 0.21 ms (bf16: 0.27 ms).
  After: SGD 1.05-1.07x, AdamW 0.81-0.85x, Adagrad 0.90-0.95x torch fused.
* bf16 SGD with momentum is 1.08x (resnet50) and 1.14x (gpt2-small) torch
  fused, at 70% and 80% of the ceiling kernel (``_ceiling``, same arrays and
  loop, no arithmetic) against torch's 76% and 96%; the ceiling itself is
  0.76x and 0.96x torch fused there, so 0.90x torch on gpt2-small would take
  a faster memory pattern than the ceiling's, not cheaper arithmetic alone.
  The serial kernel's vector loop is 38 instructions per 16 elements (three
  ``vpmovzxwd`` loads and shifts, five FP ops, two round-to-nearest-even
  stores of about seven integer/mask ops each with a masked ``vpmovdw``),
  five of them reloads of the rounding constants that LLVM rematerialises
  inside the loop (a standalone loop hoists them: 32). Blocks of 256 bytes
  (128 bf16 elements) instead of 64 elements changed nothing (paired A/B
  ``benchmarks/ab_kernels.py``: 0.93-1.03); a block length that is not a
  compile-time constant lost vectorisation (fp32 SGD 1.56x torch fused).
  A prefetch distance of 1 KiB or 4 KiB for 2-byte types instead of 2 KiB:
  no change either (0.99-1.04).
* Split, standalone loops over 8M elements per array (one thread, out of
  cache; ``python benchmarks/bf16_split.py``, medians of 15 interleaved rounds): the
  uint16 read-3-write-2 pattern with no conversions 1.72 ms; the same with
  the bf16 conversions and no arithmetic 1.79 ms (conversions: +0-4% in two runs); bf16
  SGD 2.28 ms (the arithmetic: +27-29%, one thread is compute-bound here); bf16
  loads with plain float32 stores 3.97 ms (twice the bytes stored); fp32 SGD
  5.71 ms. So the round-to-nearest-even store is cheap and the element math
  is what one thread pays for; with two threads sharing the memory bus the
  ratio to torch (above) is what counts.
* bf16 AdamW (0.58-0.80x), Adagrad (0.34-0.80x) and RMSprop (0.15-0.38x of
  torch's fastest, its for-loop) were already below torch.
* Vector width: every serial kernel (four optimizers x bf16/fp16/fp32)
  uses 512-bit registers on this AVX-512 host, and 256-bit ones, none
  wider, when built for an AVX2 CPU on the same host
  (``benchmarks/vector_width.py``; results/vector-width-2026-12-07.txt).
  No code path depends on the CPU except ``F16_HARDWARE``, whose two forms
  are both tested here.
* What is left for bf16 SGD is memory, not conversions (quiet machine,
  2026-12-07, the issue's bench command): bf16 SGD 0.98x (resnet50) and
  1.06x (gpt2-small) torch fused, fp16 0.99x and 0.87x; the ceiling kernel
  was 0.82x and 0.95x torch fused in the same rounds, so 0.90x on gpt2-small
  needs a faster memory pattern than the ceiling's. On one flat 256 MiB
  array per role (``benchmarks/stream_bound.py``) torch's fused step moved
  its bytes 1.10x as fast as the ceiling in one run and 0.88x in the next
  (a plain two-chunk loop without prefetching: the ceiling's speed, within
  2%): this VM's bandwidth moves by more between runs than the gap.
"""

import numpy as np
from llvmlite import ir
from numba import njit, types
from numba.core import cgutils
from numba.extending import intrinsic, overload

from .._jit import HELPER

#: numpy view dtype per torch dtype name.
VIEW_DTYPES = {
    "float64": np.float64,
    "float32": np.float32,
    "bfloat16": np.uint16,
    "float16": np.int16,
}


@intrinsic
def _u32_to_f32(typingctx, x):
    sig = types.float32(types.uint32)

    def codegen(context, builder, sig, args):
        return builder.bitcast(args[0], ir.FloatType())

    return sig, codegen


@intrinsic
def _f32_to_u32(typingctx, x):
    sig = types.uint32(types.float32)

    def codegen(context, builder, sig, args):
        return builder.bitcast(args[0], ir.IntType(32))

    return sig, codegen


_U = np.uint32


@njit(**HELPER)
def bf16_to_f32(h):
    return _u32_to_f32(np.uint32(np.uint16(h)) << np.uint32(16))


@njit(**HELPER)
def f32_to_bf16(x):
    u = _f32_to_u32(x)
    # every step cast back to uint32 (see the float16 conversions below): a
    # kernel that reads the stored value back (ASGD averages the param as
    # stored) otherwise kept the whole rounding in 64-bit vector lanes
    r = _U(_U(_U(u + _U(0x7FFF)) + _U(_U(u >> _U(16)) & _U(1))) >> _U(16))
    # NaN -> the quiet NaN 0x7FC0 (rounding must not carry it into inf). The
    # test is x != x, one compare with no constants: testing the bits took two
    # more constants and an AND, and with the run-time switches of issue 24
    # live LLVM reloaded such constants inside the loop
    return np.uint16(r if x == x else np.uint32(0x7FC0))


# float16 conversions, written so that every value stays 32 bits wide and
# every branch is a select. Numba types arithmetic on uint32 scalars as
# 64-bit; a plain ``if`` over such values kept the whole conversion in 64-bit
# lanes (LLVM could not narrow through the branches' phis): a standalone fp16
# SGD loop over 1M elements took 6.67 ms that way, and 1.56 ms with each
# result cast back to uint32 and the cases computed, then selected (bf16, for
# scale: 0.27 ms), on the AVX-512 EPYC dev VM, 2026-12-07. Same bits: all
# 65,536 halves and ~3.1M float32 values (NaNs, edges, subnormals) checked
# against the branchy form, and tests/test_memory_safety.py against torch.


@njit(**HELPER)
def _f16_to_f32_soft(h):
    u = _U(np.uint16(h))
    sign = _U(_U(u & _U(0x8000)) << _U(16))
    exp = _U(_U(u >> _U(10)) & _U(0x1F))
    mant = _U(u & _U(0x3FF))
    # zero or subnormal: mant * 2**-24 is exact in float32
    sub = _U(_f32_to_u32(np.float32(np.int32(mant)) * np.float32(5.9604644775390625e-08)))
    normal = _U(_U(_U(exp + _U(112)) << _U(23)) | _U(mant << _U(13)))
    special = _U(_U(0x7F800000) | _U(mant << _U(13)))  # inf or NaN
    bits = sub if exp == _U(0) else (special if exp == _U(31) else normal)
    return _u32_to_f32(_U(bits | sign))


@njit(**HELPER)
def _f32_to_f16_soft(x):
    f = _f32_to_u32(x)
    sign = _U(_U(f >> _U(16)) & _U(0x8000))
    f = _U(f & _U(0x7FFFFFFF))
    # >= 2**16: inf, or NaN above 0x7F800000
    big = _U(0x7E00) if f > _U(0x7F800000) else _U(0x7C00)
    # below the smallest normal half, 2**-14: adding 0.5 lets the FPU do the
    # round-to-nearest-even of the subnormal
    magic = _U(126 << 23)
    sub = _U(_f32_to_u32(_u32_to_f32(f) + _u32_to_f32(magic)) - magic)
    # rebias exponent 127 -> 15, round to nearest even
    odd = _U(_U(f >> _U(13)) & _U(1))
    normal = _U(_U(_U(f + _U(0xC8000FFF)) + odd) >> _U(13))
    o = big if f >= _U(0x47800000) else (sub if f < _U(0x38800000) else normal)
    return np.int16(np.uint16(_U(o | sign)))


@intrinsic
def _f16_to_f32_hard(typingctx, h):
    """float16 bits -> float32 by LLVM's ``fpext half``: one ``vcvtph2ps`` per
    vector on x86 with F16C, ``fcvt`` on aarch64. Exact for every half."""
    sig = types.float32(types.int16)

    def codegen(context, builder, sig, args):
        return builder.fpext(builder.bitcast(args[0], ir.HalfType()), ir.FloatType())

    return sig, codegen


@intrinsic
def _f32_to_f16_hard(typingctx, x):
    """float32 -> float16 bits by LLVM's ``fptrunc``: round to nearest even,
    as the soft form (NaNs keep their payload's top bits, as torch's own
    vectorised ``.half()`` does; the soft form gives 0x7E00)."""
    sig = types.int16(types.float32)

    def codegen(context, builder, sig, args):
        return builder.bitcast(builder.fptrunc(args[0], ir.HalfType()), ir.IntType(16))

    return sig, codegen


def _f16_hardware() -> bool:
    """Whether LLVM lowers the float16 conversions to instructions here.

    x86-64 with F16C (every x86 CPU since 2012-13) and aarch64 have them;
    elsewhere LLVM would call compiler-rt helpers, which Numba's JIT may not
    link, so the soft form is used. A CPU name or features set for Numba
    (``NUMBA_CPU_NAME``, portable caches) keeps the soft form too: the host's
    features are then not the target's.
    """
    import platform

    from numba.core import config

    if config.CPU_NAME or config.CPU_FEATURES:
        return False
    machine = platform.machine().lower()
    if machine in ("aarch64", "arm64"):
        return True
    if machine in ("x86_64", "amd64"):
        import llvmlite.binding as llvm

        try:
            return bool(llvm.get_host_cpu_features().get("f16c", False))
        except RuntimeError:
            return False
    return False


#: float16 <-> float32 by instruction where the CPU has them (a standalone
#: fp16 SGD loop over 1M elements: 0.21 ms against the soft form's 1.56 ms,
#: AVX-512 EPYC dev VM, 2026-12-07), else the soft form. Both are tested
#: for every half and ~700k float32 values (tests/test_memory_safety.py).
F16_HARDWARE = _f16_hardware()
if F16_HARDWARE:
    f16_to_f32, f32_to_f16 = _f16_to_f32_hard, _f32_to_f16_hard
else:
    f16_to_f32, f32_to_f16 = _f16_to_f32_soft, _f32_to_f16_soft


@intrinsic
def fma(typingctx, a, b, c):
    """a * b + c with one rounding (LLVM's llvm.fma), in the operands' type.

    torch's CPU kernels for ``add(alpha=)``, ``lerp`` and ``addcmul`` are
    fused multiply-adds; using one at the same places makes SGD bit-exact
    with torch's float32/float64 for-loop (tests/test_parity.py).
    """
    if not (a == b == c and a in (types.float32, types.float64)):
        return None
    sig = a(a, b, c)

    def codegen(context, builder, sig, args):
        lty = context.get_value_type(sig.return_type)
        fnty = ir.FunctionType(lty, [lty, lty, lty])
        fn = builder.module.declare_intrinsic("llvm.fma", [lty], fnty)
        return builder.call(fn, args)

    return sig, codegen


@intrinsic
def prefetch(typingctx, addr):
    """Start loading the cache line at byte address ``addr`` (x86 PREFETCHT0).

    ``llvm.prefetch`` (read, high locality, data). A prefetch is a hint: it
    never faults and changes no memory; the kernels aim it only inside the
    span of elements they own (:func:`prefetch_block`).
    """
    sig = types.void(types.int64)

    def codegen(context, builder, sig, args):
        i32 = ir.IntType(32)
        fnty = ir.FunctionType(ir.VoidType(), [cgutils.voidptr_t, i32, i32, i32])
        fn = builder.module.declare_intrinsic("llvm.prefetch", [cgutils.voidptr_t], fnty)
        ptr = builder.inttoptr(args[0], cgutils.voidptr_t)
        builder.call(fn, [ptr, ir.Constant(i32, 0), ir.Constant(i32, 3), ir.Constant(i32, 1)])
        return context.get_dummy_value()

    return sig, codegen


#: Elements per block of the kernels' loops: each block first prefetches
#: the block PREFETCH_BYTES further on, in every array it streams.
BLOCK = 64
#: How far ahead the prefetches reach. Sweep on resnet50-shaped fp32 lists
#: (2 threads, 25 interleaved runs, time against the same loop without
#: prefetching; each value compiled into a fresh NUMBA_CACHE_DIR):
#: 512 B SGD 0.98 / AdamW 0.94, 1 KiB 0.92-0.96 / 0.90, 2 KiB 0.93-0.95 /
#: 0.89-0.90, 4 KiB 0.95 / 0.91, 8 KiB 0.98 / 0.94. BLOCK 32 or 128 instead
#: of 64 (at 2 KiB): within noise. The hardware prefetchers alone keep too
#: few lines in flight per core on this VM. The memory-pattern ceiling kernel
#: (_ceiling) uses the same loop, so it stays the best this access pattern
#: reaches.
PREFETCH_BYTES = 2048
_LINE = 64


def prefetch_block(a, start, n):  # pragma: no cover - replaced by the overload below
    """Prefetch elements ``[start, start + BLOCK)`` of view ``a``, clipped to ``n``."""
    raise NotImplementedError


@overload(prefetch_block, jit_options=HELPER)
def _prefetch_block_impl(a, start, n):
    if isinstance(a, types.NoneType):
        return lambda a, start, n: None
    if isinstance(a, types.BaseTuple):  # a stochastically rounded state (_walk.rounded)
        return lambda a, start, n: prefetch_block(a[0], start, n)

    def impl(a, start, n):
        if start < n:
            base = a.ctypes.data + start * a.itemsize
            for k in range(0, min(BLOCK, n - start) * a.itemsize, _LINE):
                prefetch(base + k)
    return impl


# An absent state array is a None (see _walk): code behind ``if s is not None``
# is still typed, though it then compiles to nothing, so load and store take
# None too (a 0.0 and a no-op that never run).

def load(a, i):  # pragma: no cover - replaced by the overload below
    raise NotImplementedError


def store(a, i, v):  # pragma: no cover
    raise NotImplementedError


@overload(load, jit_options=HELPER)
def _load_impl(a, i):
    if isinstance(a, types.NoneType):
        return lambda a, i: np.float32(0.0)
    if isinstance(a, types.BaseTuple):  # a stochastically rounded bfloat16 state
        return lambda a, i: bf16_to_f32(a[0][i])
    dt = a.dtype
    if dt == types.float32 or dt == types.float64:
        return lambda a, i: a[i]
    if dt == types.uint16:
        return lambda a, i: bf16_to_f32(a[i])
    if dt == types.int16:
        return lambda a, i: f16_to_f32(a[i])
    return None


@overload(store, jit_options=HELPER)
def _store_impl(a, i, v):
    if isinstance(a, types.NoneType):
        return lambda a, i, v: None
    if isinstance(a, types.BaseTuple):
        return None  # a stochastically rounded state: _precision's overload
    dt = a.dtype
    if dt == types.float32 or dt == types.float64:
        def impl(a, i, v):
            a[i] = v
        return impl
    if dt == types.uint16:
        def impl(a, i, v):
            a[i] = f32_to_bf16(np.float32(v))
        return impl
    if dt == types.int16:
        def impl(a, i, v):
            a[i] = f32_to_f16(np.float32(v))
        return impl
    return None


def rounded(a, v):  # pragma: no cover - replaced by the overload below
    raise NotImplementedError


@overload(rounded, jit_options=HELPER)
def _rounded_impl(a, v):
    """``v`` rounded to nearest even to ``a``'s storage type, in the compute type:
    what :func:`store` then :func:`load` give, without the memory (a value
    torch computes in the storage dtype and tests before it stores it). A
    stochastically rounded state (a tuple, ``_walk.rounded``): ``v`` itself,
    its one rounding the store's."""
    if isinstance(a, types.BaseTuple):
        return lambda a, v: v
    dt = a.dtype
    if dt == types.float32:
        return lambda a, v: np.float32(v)
    if dt == types.float64:
        return lambda a, v: np.float64(v)
    if dt == types.uint16:
        return lambda a, v: bf16_to_f32(f32_to_bf16(np.float32(v)))
    if dt == types.int16:
        return lambda a, v: f16_to_f32(f32_to_f16(np.float32(v)))
    return None
