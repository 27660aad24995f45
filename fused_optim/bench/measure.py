"""One case measured: its implementations built, timed, and summarised."""

from __future__ import annotations

import dataclasses
import gc
import statistics
import time
from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np
import torch

from .cases import DTYPES, BenchError, OptimizerSpec, ShapeList, make_data
from .impls import (_LABELS, CEILING, COMPILED, COMPILED_BACKENDS, COPY, PRECISIONS,
                    REFERENCE, _ordered, best_torch, fresh_compile_caches, make_runner,
                    precision_variant)
from .machine import _fmt_bytes, _meminfo, cpu_seconds, others_cores
from .timing import (CUDA_MAX_STEPS, CUDA_SAMPLE_S, _report_failure, interleaved,
                     make_timer)


#: A figure is flagged as untrustworthy when the interquartile range of its
#: rounds is at least this share of their median: of an implementation's
#: step times (its spread), or of its per-round ratios to torch's fastest
#: path or to the ceiling (the rounds disagree). torch.utils.benchmark warns
#: at the same 10% ("could indicate system fluctuation").
SPREAD_LIMIT = 0.10
#: A case is flagged as competed for when other processes used at least this
#: many cores' worth of CPU, on average, while its rounds ran.
COMPETING_CORES = 0.25


def _spread(values) -> float | None:
    """Interquartile range over median, or None for fewer than 4 values
    (torch.utils.benchmark shows no IQR below 4 either)."""
    if len(values) < 4:
        return None
    q25, q50, q75 = np.percentile(values, [25, 50, 75])
    return float((q75 - q25) / q50) if q50 > 0 else None


@dataclass
class CaseResult:
    """Timings of one case (list x optimizer x dtype x device).

    Attributes:
        list: list name. tensors, params: its size.
        optimizer, dtype, device: the case.
        bytes_per_step: counted traffic of one step.
        rounds, warmup: timed and untimed rounds.
        times: per implementation, one step time (s) per timed round; index
            ``r`` of every list comes from the same round. On CUDA each is
            a sample's time over its steps.
        skipped: implementations not run, with the reason.
        failed: implementations that raised, with the error.
        compile_s: compiled implementations' first call (s).
        host_times: CUDA only: per implementation and round, the host's
            wall time for enqueueing a sample's steps, over the steps.
        steps_per_sample: per implementation, steps per timed sample (1 on
            CPU, calibrated on CUDA).
        timing: ``"perf_counter"`` (one step per sample) or
            ``"cuda-events"`` (``steps_per_sample`` steps per sample).
        first_call_s: per implementation, its first (warm-up) call: Numba
            compiling, or state being allocated.
        other_cores: cores' worth of CPU other processes used, on average,
            while the rounds ran (None where unknown, see
            ``machine.cpu_seconds``).
        wall_s: the case's wall time, data and warm-up included.
    """

    list: str
    tensors: int
    params: int
    optimizer: str
    dtype: str
    device: str
    bytes_per_step: int
    rounds: int
    warmup: int
    times: dict = field(default_factory=dict)
    skipped: dict = field(default_factory=dict)
    failed: dict = field(default_factory=dict)
    compile_s: dict = field(default_factory=dict)
    host_times: dict = field(default_factory=dict)
    steps_per_sample: dict = field(default_factory=dict)
    timing: str = "perf_counter"
    first_call_s: dict = field(default_factory=dict)
    other_cores: float | None = None
    wall_s: float | None = None

    @property
    def copy_bytes(self) -> int:
        """Bytes one copy reference call reads and writes (see ``copy_runner``)."""
        return 2 * (self.bytes_per_step // 2)

    def median(self, impl: str) -> float:
        """Median step time of ``impl`` in seconds."""
        return statistics.median(self.times[impl])

    def paired(self, impl: str, ref: str) -> list:
        """Per-round time ratios ``impl / ref``: only rounds that timed both
        (an implementation that failed mid-run has no rounds left)."""
        a, b = self.times[impl], self.times[ref]
        if len(a) != len(b):
            return []
        return [x / y for x, y in zip(a, b) if y > 0]

    @property
    def best_torch(self) -> str | None:
        """torch.optim's fastest path in this case, by median time."""
        return best_torch({i: self.median(i) for i in self.times if self.times[i]})

    @property
    def competed(self) -> bool:
        """Whether other processes used the cores while the rounds ran."""
        return self.other_cores is not None and self.other_cores >= COMPETING_CORES

    def unstable(self, impl: str) -> list:
        """Why ``impl``'s figures cannot be trusted (empty: they can)."""
        s = self.stats(impl)
        why = []
        if len(self.times[impl]) < 4:
            why.append(f"only {len(self.times[impl])} rounds")
        for key, name in (("spread", "time"), ("ratio_vs_best_spread", "vs best"),
                          ("pct_ceiling_spread", "% ceil")):
            if s[key] is not None and s[key] >= SPREAD_LIMIT:
                why.append(f"{name} ±{100 * s[key]:.0f}%")
        return why

    def copy_gbps(self) -> float | None:
        """The copy reference's bandwidth (read + write) from its median, or
        None when no copy was timed."""
        if COPY not in self.times:
            return None
        med = self.median(COPY)
        return self.copy_bytes / med / 1e9 if med > 0 else None

    def stats(self, impl: str) -> dict:
        """All reported numbers of one implementation."""
        t = np.asarray(self.times[impl])
        med = float(np.median(t))
        nbytes = self.copy_bytes if impl == COPY else self.bytes_per_step
        host = self.host_times.get(impl)
        out = {
            "impl": impl,
            "label": _LABELS.get(impl, impl),
            "median_s": med,
            "p25_s": float(np.percentile(t, 25)),
            "p75_s": float(np.percentile(t, 75)),
            "min_s": float(t.min()),
            "params_per_s": self.params / med if med > 0 and impl != COPY else None,
            "gb_per_s": nbytes / med / 1e9 if med > 0 else None,
            "spread": _spread(t),
            "pct_ceiling": None,
            "pct_ceiling_spread": None,
            "best_torch": None,
            "ratio_vs_best": None,
            "ratio_vs_best_p25": None,
            "ratio_vs_best_p75": None,
            "ratio_vs_best_spread": None,
            "pct_copy": None,
            "ratio_vs_fused": None,
            "ratio_vs_fused_p25": None,
            "ratio_vs_fused_p75": None,
            "precision": None,
            "plain": None,
            "ratio_vs_plain": None,
            "ratio_vs_plain_p25": None,
            "ratio_vs_plain_p75": None,
            "steps_per_sample": self.steps_per_sample.get(impl, 1),
            "host_median_s": statistics.median(host) if host else None,
            "host_times_s": [float(x) for x in host] if host else None,
            "times_s": [float(x) for x in t],
        }
        if CEILING in self.times and self.paired(CEILING, impl):
            # ceiling time / impl time, paired per round: the share of the
            # attainable bandwidth this implementation reached.
            r = self.paired(CEILING, impl)
            out["pct_ceiling"] = 100.0 * statistics.median(r)
            if impl != CEILING:
                out["pct_ceiling_spread"] = _spread(r)
        best = self.best_torch
        if best is not None and impl != best and self.paired(impl, best):
            r = self.paired(impl, best)
            out["best_torch"] = best
            out["ratio_vs_best"] = statistics.median(r)
            out["ratio_vs_best_p25"] = float(np.percentile(r, 25))
            out["ratio_vs_best_p75"] = float(np.percentile(r, 75))
            out["ratio_vs_best_spread"] = _spread(r)
        elif best is not None and impl == best:
            out["best_torch"], out["ratio_vs_best"] = best, 1.0
        if COPY in self.times and self.copy_bytes > 0:
            # (nbytes / impl time) / (copy bytes / copy time), paired per round
            scale = nbytes / self.copy_bytes
            out["pct_copy"] = 100.0 * scale * statistics.median(self.paired(COPY, impl))
        if REFERENCE in self.times and self.paired(impl, REFERENCE):
            r = self.paired(impl, REFERENCE)
            out["ratio_vs_fused"] = statistics.median(r)
            out["ratio_vs_fused_p25"] = float(np.percentile(r, 25))
            out["ratio_vs_fused_p75"] = float(np.percentile(r, 75))
        variant = precision_variant(impl)
        if variant is not None:
            out["plain"], out["precision"] = variant
            if variant[0] in self.times:
                # the options' cost: this variant's time over its plain
                # backend's in the same round
                r = self.paired(impl, variant[0])
                out["ratio_vs_plain"] = statistics.median(r)
                out["ratio_vs_plain_p25"] = float(np.percentile(r, 25))
                out["ratio_vs_plain_p75"] = float(np.percentile(r, 75))
        return out

    def to_dict(self) -> dict:
        """JSON-ready summary with every implementation's numbers."""
        d = {k: v for k, v in dataclasses.asdict(self).items()
             if k not in ("times", "host_times")}
        d["copy_bytes"] = self.copy_bytes if COPY in self.times else None
        d["copy_gbps"] = self.copy_gbps()
        d["results"] = [dict(self.stats(i), unstable=self.unstable(i))
                        for i in _ordered(self.times)]
        d["best_torch"] = self.best_torch
        d["competed"] = self.competed
        return d


def _mem_available(device: torch.device) -> int | None:
    if device.type == "cuda":
        try:
            return torch.cuda.mem_get_info(device)[0]
        except Exception:  # noqa: BLE001
            return None
    return _meminfo("MemAvailable")


def _case_bytes(spec: OptimizerSpec, impls, numel: int, itemsize: int) -> int:
    """Resident bytes of a case: the draw, every implementation's tensors (the
    copy's two buffers hold one step's bytes), and foreach's whole-list
    temporaries (about two per element)."""
    states = spec.writes - 1
    per = {CEILING: spec.reads, COPY: spec.reads + spec.writes}
    total = 2  # the seeded draw, kept until the runners exist
    for i in impls:
        variant = precision_variant(i)
        # kahan_sum keeps one compensation buffer per param
        kahan = variant is not None and "kahan_sum" in PRECISIONS[variant[1]]
        total += per.get(i, 2 + states + kahan) + (2 if i == "foreach" else 0)
    return total * numel * itemsize


def run_case(shapes: ShapeList, spec: OptimizerSpec, dtype_name: str, device,
             impls: Sequence[str], *, rounds: int | None = None, warmup: int = 3,
             seed: int = 0, min_rounds: int = 5, max_rounds: int = 100,
             target_s: float = 10.0, skipped: dict | None = None,
             progress: Callable[[str], None] | None = None, timer=None,
             steps: int | None = None, sample_s: float = CUDA_SAMPLE_S,
             max_steps: int = CUDA_MAX_STEPS) -> CaseResult:
    """Build every implementation for one case and time them interleaved.

    ``timer``, ``steps``, ``sample_s`` and ``max_steps`` go to
    ``interleaved`` (by default the device's timer).

    Raises:
        BenchError: the case would not fit in memory.
    """
    t0 = time.perf_counter()
    device = torch.device(device)
    dtype = DTYPES[dtype_name]
    itemsize = torch.empty((), dtype=dtype).element_size()
    need = _case_bytes(spec, impls, shapes.numel, itemsize)
    avail = _mem_available(device)
    if avail is not None and need > 0.9 * avail:
        raise BenchError(
            f"{shapes.name} {spec.name} {dtype_name} needs about {_fmt_bytes(need)} "
            f"on {device.type} but {_fmt_bytes(avail)} is available; pick fewer "
            "--lists/--backends or a smaller dtype")
    if progress:
        progress("allocating")
    params, grads = make_data(shapes, dtype, device, seed)
    failed = {}
    runners = []
    if any(i == COMPILED or i in COMPILED_BACKENDS for i in impls):
        fresh_compile_caches()
    for impl in impls:
        try:
            runners.append(make_runner(impl, spec, params, grads))
        except Exception as err:  # noqa: BLE001 - reported, the others go on
            _report_failure(failed, impl, err)
    del params, grads
    compile_s = {r.impl: r.compile_s for r in runners if r.compile_s is not None}
    timer = timer or make_timer(device)
    cpu_before = cpu_seconds()
    timed = interleaved(runners, rounds, warmup, device=device, seed=seed,
                        min_rounds=min_rounds, max_rounds=max_rounds,
                        target_s=target_s, progress=progress, failed=failed,
                        timer=timer, steps=steps, sample_s=sample_s, max_steps=max_steps)
    other_cores = others_cores(cpu_before, cpu_seconds())
    del runners
    gc.collect()
    times = timed.times
    return CaseResult(
        list=shapes.name, tensors=len(shapes), params=shapes.numel,
        optimizer=spec.name, dtype=dtype_name, device=str(device),
        bytes_per_step=spec.bytes_per_step(shapes.numel, itemsize),
        rounds=max((len(t) for t in times.values()), default=0), warmup=warmup,
        times=times, skipped=dict(skipped or {}), failed=failed, compile_s=compile_s,
        host_times=timed.host, steps_per_sample=timed.steps,
        timing="cuda-events" if timer.batched else "perf_counter",
        first_call_s=timed.first_s or {}, other_cores=other_cores,
        wall_s=time.perf_counter() - t0)
