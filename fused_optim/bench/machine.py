"""The machine and software a run measured, for the JSON report."""

from __future__ import annotations

import os
import platform
import subprocess
import time
from pathlib import Path
from typing import Sequence

import numpy as np
import torch


def machine_info(device_types: Sequence[str] = ("cpu",)) -> dict:
    """Description of this machine and the software versions."""
    import numba

    import fused_optim
    info = {
        "cpu_model": _cpu_model(),
        "cores": os.cpu_count(),
        "usable_cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "l3_cache": _read_first("/sys/devices/system/cpu/cpu0/cache/index3/size"),
        "memory_total_bytes": _meminfo("MemTotal"),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "numba": numba.__version__,
        "numpy": np.__version__,
        "fused_optim": getattr(fused_optim, "__version__", None),
        "git_commit": _git_commit(),
        "simd": _simd(),
        "torch_threads": torch.get_num_threads(),
        "numba_threads": numba.get_num_threads(),
        "numba_threading_layer": _numba_layer(),
        "load_average": _loadavg(),
        "env": {k: os.environ[k] for k in _THREAD_ENV if k in os.environ},
    }
    try:
        import triton
        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = None
    if "cuda" in device_types and torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
        info["cuda"] = torch.version.cuda
    return info


#: Environment variables that change how the thread pools behave.
_THREAD_ENV = ("OMP_NUM_THREADS", "OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "KMP_BLOCKTIME",
               "MKL_NUM_THREADS", "NUMBA_NUM_THREADS", "NUMBA_THREADING_LAYER",
               "FUSED_OPTIM_BACKEND")


def _loadavg() -> list | None:
    """1, 5 and 15 minute load averages: above the core count, other
    processes competed for the cores and timings are noisier."""
    text = _read_first("/proc/loadavg")
    return [float(x) for x in text.split()[:3]] if text else None


def cpu_seconds() -> tuple[float, float, float] | None:
    """(wall clock, CPU seconds every process used, CPU seconds this process
    used), or None where the system's total is not readable (no /proc/stat).

    The system's total counts user, nice, system, irq, softirq and steal
    time (steal: other virtual machines on the same host) over all cores.
    """
    text = _read_first("/proc/stat")
    if not text or not text.startswith("cpu "):
        return None
    ticks = [int(x) for x in text.splitlines()[0].split()[1:]]
    busy = sum(ticks[i] for i in (0, 1, 2, 5, 6, 7) if i < len(ticks))
    own = os.times()
    return (time.monotonic(), busy / os.sysconf("SC_CLK_TCK"), own.user + own.system)


def others_cores(before, after) -> float | None:
    """Cores' worth of CPU that other processes used between two
    :func:`cpu_seconds` samples (0: this process had the machine to itself)."""
    if before is None or after is None or after[0] <= before[0]:
        return None
    others = (after[1] - before[1]) - (after[2] - before[2])
    return max(0.0, others / (after[0] - before[0]))


def _simd() -> dict:
    """The widest vector extension the CPU reports, and LLVM's name for the
    CPU Numba compiles for (its kernels use that width)."""
    flags = set()
    for line in (_read_first("/proc/cpuinfo") or "").splitlines():
        if line.startswith(("flags", "Features")):
            flags = set(line.split(":", 1)[1].split())
            break
    isa, bits = None, None
    for name, width in (("avx512f", 512), ("avx2", 256), ("avx", 256), ("sve", None),
                        ("asimd", 128), ("sse2", 128)):
        if name in flags:
            isa, bits = name, width
            break
    try:
        import llvmlite.binding as llvm
        cpu = llvm.get_host_cpu_name()
    except Exception:  # noqa: BLE001 - only a description
        cpu = None
    return {"isa": isa, "vector_bits": bits, "llvm_cpu": cpu}


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _read_first(path: str) -> str | None:
    try:
        return Path(path).read_text().strip()
    except OSError:
        return None


def _fmt_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def _meminfo(key: str) -> int | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent,
                             capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return None
    if out.returncode != 0:
        return None
    return out.stdout.strip() or None


def _numba_layer() -> str | None:
    import numba
    try:
        return numba.threading_layer()
    except ValueError:  # no parallel function has run yet
        return None
