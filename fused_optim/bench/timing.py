"""Timers and the interleaved rounds that pair implementations' samples."""

from __future__ import annotations

import gc
import math
import random
import sys
import time
import traceback
from dataclasses import dataclass
from typing import Callable, Sequence

import torch

from .impls import Runner


#: CUDA: the time one timed sample of K steps aims at. Long enough that the
#: synchronize and the two events at its ends, and the idle GPU while the
#: host enqueues the first step, are a small share of it.
CUDA_SAMPLE_S = 5e-3
#: CUDA: the most steps in one sample, for steps of a few microseconds.
CUDA_MAX_STEPS = 200


class HostTimer:
    """CPU: ``perf_counter`` around the calls; the host time is the time."""

    #: whether samples of more than one step are meaningful (see CudaTimer)
    batched = False

    def __init__(self, clock: Callable[[], float] = time.perf_counter):
        self.clock = clock

    def sample(self, fn, steps: int = 1) -> tuple[float, float | None]:
        """Run ``fn`` ``steps`` times; (seconds per call, None)."""
        t0 = self.clock()
        for _ in range(steps):
            fn()
        return (self.clock() - t0) / steps, None


class CudaTimer:
    """CUDA: ``steps`` back-to-back calls between two events.

    Synchronizes before the first call (the previous sample's work is done)
    and waits for the end event after the last, never in between. The
    ``event``, ``synchronize`` and ``clock`` hooks default to torch.cuda's
    and ``perf_counter``; tests pass fakes.
    """

    batched = True

    def __init__(self, event: Callable[[], object] | None = None,
                 synchronize: Callable[[], None] | None = None,
                 clock: Callable[[], float] = time.perf_counter):
        if event is None:
            def event():
                return torch.cuda.Event(enable_timing=True)
        self.start, self.end = event(), event()
        self.synchronize = synchronize or torch.cuda.synchronize
        self.clock = clock

    def sample(self, fn, steps: int = 1) -> tuple[float, float]:
        """(device seconds per call, host seconds per call) of ``steps`` calls.

        The device time is between the events; the host time is the wall
        time of the calls themselves, read before waiting for the GPU. While
        the GPU is behind, the host runs ahead until the launch queue is
        full, so host time can exceed the host's own work only when the
        step is device-bound.
        """
        self.synchronize()
        self.start.record()
        h0 = self.clock()
        for _ in range(steps):
            fn()
        h1 = self.clock()
        self.end.record()
        self.end.synchronize()
        return self.start.elapsed_time(self.end) / 1e3 / steps, (h1 - h0) / steps


def make_timer(device) -> HostTimer | CudaTimer:
    """The timer for tensors on ``device``."""
    return CudaTimer() if torch.device(device).type == "cuda" else HostTimer()


def calibrate_steps(sample: Callable, fn, target_s: float = CUDA_SAMPLE_S,
                    max_steps: int = CUDA_MAX_STEPS, tries: int = 3) -> int:
    """Steps per sample so that one sample of ``fn`` lasts about ``target_s``.

    Starts from one step and rescales from each measured sample's time per
    step, at most ``tries`` samples: a single step includes the idle GPU
    while its first launch is enqueued, so its time per step overestimates
    that of back-to-back steps. Call it after warming up (a first call that
    compiles would give 1).

    Args:
        sample: ``sample(fn, steps) -> (seconds per step, ...)``, e.g. a
            timer's ``sample``.
        fn: the step.
        target_s: seconds one sample should last.
        max_steps: upper bound on the result.
    """
    steps = 1
    for _ in range(tries):
        per = sample(fn, steps)[0]
        want = max_steps if per <= 0 else math.ceil(target_s / per)
        want = max(1, min(max_steps, want))
        if want == steps:
            break
        steps = want
    return steps


def synced_every(fn, steps: int, synchronize: Callable[[], None]):
    """``fn``, followed by ``synchronize()`` on every ``steps``-th call: for
    timers that read the clock around a fixed number of calls
    (pytest-benchmark's ``iterations``) and must not see a queued GPU."""
    count = 0

    def call():
        nonlocal count
        fn()
        count += 1
        if count % steps == 0:
            synchronize()

    return call


@dataclass
class Timings:
    """What ``interleaved`` measured.

    Attributes:
        times: {impl: [seconds per step, one per timed round]}.
        host: {impl: [host seconds per step, one per timed round]}; empty
            unless the timer is batched (CUDA).
        steps: {impl: steps per sample}.
        first_s: {impl: seconds of its first warm-up call}: where Numba
            compiles, or the first step allocates state.
    """

    times: dict
    host: dict
    steps: dict
    first_s: dict = None


def interleaved(runners: Sequence[Runner], rounds: int | None, warmup: int, *,
                device="cpu", seed: int = 0, min_rounds: int = 5,
                max_rounds: int = 100, target_s: float = 10.0,
                progress: Callable[[str], None] | None = None,
                failed: dict | None = None, timer=None, steps: int | None = None,
                sample_s: float = CUDA_SAMPLE_S,
                max_steps: int = CUDA_MAX_STEPS) -> Timings:
    """Time ``runners`` round-robin, one sample each per round, order shuffled.

    Args:
        runners: the implementations.
        rounds: timed rounds; None runs rounds until ``target_s`` seconds
            have passed, within ``[min_rounds, max_rounds]``.
        warmup: untimed rounds of one step each first (compilation, state
            allocation, caches).
        device: where the tensors live; picks the timer unless ``timer``.
        seed: seeds the per-round order.
        progress: called with a short status text now and then.
        failed: if given, an implementation whose step raises is dropped
            (with its samples, which would no longer pair) and its error is
            stored here as ``{impl: message}``; else the exception propagates.
        timer: a ``HostTimer`` or ``CudaTimer`` (or a fake with their
            ``batched`` and ``sample``). A batched timer's samples are
            several steps: ``steps`` if given, else calibrated per
            implementation after the warm-up (``calibrate_steps`` with
            ``sample_s`` and ``max_steps``). Others time one step.

    Returns:
        the times per step, host times per step and steps per sample.
    """
    timer = timer or make_timer(torch.device(device))
    rng = random.Random(seed)
    order = list(runners)
    times = {r.impl: [] for r in runners}
    host = {r.impl: [] for r in runners} if timer.batched else {}
    counts = {r.impl: 1 for r in runners}

    def drop(r, err):
        if failed is None:
            raise err
        _report_failure(failed, r.impl, err)
        order.remove(r)
        for d in (times, host, counts):
            d.pop(r.impl, None)

    def attempt(r, k):
        try:
            return timer.sample(r.step, k)
        except Exception as err:  # noqa: BLE001 - reported, the others go on
            drop(r, err)
            return None

    first = {}
    for w in range(warmup):
        if progress:
            progress(f"warm-up {w + 1}/{warmup}")
        rng.shuffle(order)
        for r in list(order):
            if w == 0 and progress:
                progress(f"first call, compiles if not cached: {r.impl}")
            t0 = time.perf_counter()
            if attempt(r, 1) is not None and w == 0:
                first[r.impl] = time.perf_counter() - t0
    if timer.batched:
        if progress:
            progress("calibrating steps per sample")
        for r in list(order):
            if steps is not None:
                counts[r.impl] = steps
                continue
            try:
                counts[r.impl] = calibrate_steps(timer.sample, r.step, sample_s, max_steps)
            except Exception as err:  # noqa: BLE001
                drop(r, err)
    # Without a fixed count, keep going until target_s has passed: an estimate
    # from the warm-up would include compilation and first-touch page faults.
    limit = max_rounds if rounds is None else rounds
    gc_was = gc.isenabled()
    gc.collect()
    gc.disable()  # a collection inside one timed sample would skew that sample
    start = time.perf_counter()
    try:
        for i in range(limit):
            if (rounds is None and i >= min_rounds
                    and time.perf_counter() - start >= target_s):
                break
            if progress:
                progress(f"round {i + 1}" + (f"/{rounds}" if rounds else ""))
            rng.shuffle(order)
            for r in list(order):
                got = attempt(r, counts[r.impl])
                if got is not None:
                    times[r.impl].append(got[0])
                    if timer.batched:
                        host[r.impl].append(got[1])
    finally:
        if gc_was:
            gc.enable()
    return Timings(times, host, counts, {i: t for i, t in first.items() if i in times})


def _report_failure(failed: dict, impl: str, err: BaseException) -> None:
    """Record ``err`` and show its traceback: a failing implementation is a
    bug to fix, not a number to report."""
    failed[impl] = f"{type(err).__name__}: {err}".splitlines()[0]
    print(f"\n{impl} failed:", file=sys.stderr)
    traceback.print_exception(err, file=sys.stderr)
