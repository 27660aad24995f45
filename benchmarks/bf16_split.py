"""Where bf16 SGD's time goes, standalone (one thread, 8M elements per array, out of cache).

Issue 26, item 1: the memory pattern alone, the pattern with the bf16
conversions, the SGD update, and the update with plain float32 stores,
timed interleaved in one process (medians of 15 rounds).

    python benchmarks/bf16_split.py
"""
import time, numpy as np
from numba import njit
from fused_optim.kernels.numba._memory import bf16_to_f32, f32_to_bf16, fma

@njit(error_model="numpy")
def sgd_f32(p, g, b, lr, mom, wd):
    for j in range(p.shape[0]):
        gj = fma(p[j], wd, g[j]); bj = fma(b[j], mom, gj)
        b[j] = bj; p[j] = fma(bj, -lr, p[j])

@njit(error_model="numpy")
def sgd_bf16(p, g, b, lr, mom, wd):
    for j in range(p.shape[0]):
        pj = bf16_to_f32(p[j]); gj = fma(pj, wd, bf16_to_f32(g[j])); bj = fma(bf16_to_f32(b[j]), mom, gj)
        b[j] = f32_to_bf16(bj); p[j] = f32_to_bf16(fma(bj, -lr, pj))

@njit(error_model="numpy")
def sgd_bf16_load_only(p, g, b, p32, b32, lr, mom, wd):
    # bf16 loads, plain float32 stores (no rounding): the arithmetic and loads without the store conversion
    for j in range(p.shape[0]):
        pj = bf16_to_f32(p[j]); gj = fma(pj, wd, bf16_to_f32(g[j])); bj = fma(bf16_to_f32(b[j]), mom, gj)
        b32[j] = bj; p32[j] = fma(bj, -lr, pj)

@njit(error_model="numpy")
def pattern_u16(p, g, b):
    # the memory pattern alone: read 3, write 2 (no conversions, no arithmetic)
    for j in range(p.shape[0]):
        x = p[j] ^ g[j] ^ b[j]
        b[j] = x; p[j] = x

@njit(error_model="numpy")
def pattern_bf16_convert(p, g, b):
    # the pattern with the conversions, no arithmetic
    for j in range(p.shape[0]):
        x = bf16_to_f32(p[j]) + bf16_to_f32(g[j]) + bf16_to_f32(b[j])
        b[j] = f32_to_bf16(x); p[j] = f32_to_bf16(x)

n = 1 << 23
rng = np.random.default_rng(0)
f = [rng.standard_normal(n).astype(np.float32) for _ in range(3)]
u = [(a.view(np.uint32) >> 16).astype(np.uint16) for a in f]
o32 = [np.empty(n, np.float32) for _ in range(2)]
hy = (np.float32(0.01), np.float32(0.9), np.float32(1e-4))
cases = {
    "fp32 SGD (12 B read + 8 B write /elem)": (sgd_f32, (*f, *hy), 20),
    "bf16 SGD (6 + 4)": (sgd_bf16, (*u, *hy), 10),
    "bf16 loads, fp32 stores (6 + 8)": (sgd_bf16_load_only, (*u, *o32, *hy), 14),
    "uint16 pattern, no conversions (6 + 4)": (pattern_u16, tuple(u), 10),
    "bf16 pattern with conversions (6 + 4)": (pattern_bf16_convert, tuple(u), 10),
}
for fn, a, _ in cases.values():
    fn(*a)
res = {k: [] for k in cases}
for _ in range(15):
    for k, (fn, a, nb) in cases.items():
        t = time.perf_counter(); fn(*a); res[k].append(time.perf_counter() - t)
for k, (fn, a, nb) in cases.items():
    m = sorted(res[k])[7]
    print(f"{k:42s} {m*1e3:7.2f} ms  {nb * n / m / 1e9:6.1f} GB/s")
