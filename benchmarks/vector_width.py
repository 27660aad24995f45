"""Which vector registers the Numba kernels compile to on this CPU (issue 26, item 3).

Steps each optimizer once per storage type on the serial path, then counts
the 512-, 256- and 128-bit registers (zmm/ymm/xmm) and the float16
conversion instructions in each compiled serial kernel. Numba compiles for
the host CPU; to see another machine's code on this one, name its CPU and
drop the features it lacks, in a fresh cache, e.g. an AVX2 build:

    NUMBA_CACHE_DIR=/tmp/nb-avx2 NUMBA_CPU_NAME=haswell NUMBA_CPU_FEATURES=-avx512f \\
        python benchmarks/vector_width.py

(With a CPU name set, float16 uses the soft conversions: ``_memory.F16_HARDWARE``.)
Numba shows no assembly for kernels loaded from its disk cache, so without
``NUMBA_CACHE_DIR`` the script compiles into a fresh temporary one.
"""
from __future__ import annotations

import os
import re
import tempfile

os.environ.setdefault("NUMBA_CACHE_DIR", tempfile.mkdtemp(prefix="vector-width-"))

import llvmlite.binding as llvm  # noqa: E402
import torch  # noqa: E402

import fused_optim  # noqa: E402
from fused_optim.kernels.numba import _memory, adagrad, adam, rmsprop, sgd  # noqa: E402

_VIEW = {"uint16": "bf16", "int16": "fp16", "float32": "fp32", "float64": "fp64"}
_KERNELS = (("SGD", dict(momentum=0.9), sgd.sgd_serial),
            ("AdamW", {}, adam.adam_serial),
            ("Adagrad", {}, adagrad.adagrad_serial),
            ("RMSprop", {}, rmsprop.rmsprop_serial))


def main() -> None:
    from numba.core import config

    print(f"host CPU {llvm.get_host_cpu_name()}; NUMBA_CPU_NAME={config.CPU_NAME} "
          f"NUMBA_CPU_FEATURES={config.CPU_FEATURES}; fp16 by instruction: "
          f"{_memory.F16_HARDWARE}")
    for name, kw, dispatcher in _KERNELS:
        for dtype in (torch.bfloat16, torch.float16, torch.float32):
            params = [torch.nn.Parameter(torch.randn(1000, dtype=dtype))]
            params[0].grad = torch.randn_like(params[0])
            getattr(fused_optim, name)(params, lr=0.01, backend="numba", **kw).step()
        for sig, asm in dispatcher.inspect_asm().items():
            view = _VIEW.get(str(sig[3].dtype), str(sig[3].dtype))
            counts = {r: len(re.findall(rf"%{r}\d+", asm)) for r in ("zmm", "ymm", "xmm")}
            widest = next((r for r in ("zmm", "ymm", "xmm") if counts[r]), "-")
            print(f"{dispatcher.__name__:16s} {view:5s} widest {widest}  "
                  + "  ".join(f"{r} {c:4d}" for r, c in counts.items())
                  + f"  vcvtph2ps {asm.count('vcvtph2ps')}  vcvtps2ph {asm.count('vcvtps2ph')}")


if __name__ == "__main__":
    main()
