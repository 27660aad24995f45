"""The ``bench`` command line: options, the plan of cases, the run."""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import os
import sys
import time
import warnings
from pathlib import Path
from typing import Sequence

import torch

from ..kernels.reference._precision import LOW_PRECISION
from .cases import (DEFAULT_DTYPES, DTYPES, RESULTS_DIR, LISTS, OPTIMIZERS, SIZES, BenchError,
                    _public_lists, shape_list, shapes_from_json, shapes_from_model)
from .impls import (BACKEND_IMPLS, BASELINE_IMPLS, CEILING, COMPILED, COPY,
                    DEFAULT_BASELINES, PRECISIONS, STATES, _backend_device_ok, _backend_problem,
                    available_impls, is_state_option)
from .machine import _loadavg, machine_info
from .compare import format_compare, load
from .measure import COMPETING_CORES, run_case
from .report import _check_matplotlib, format_table, to_json, write_plot
from .timing import CUDA_MAX_STEPS, CUDA_SAMPLE_S


def _names(values: Sequence[str] | None) -> list | None:
    """argparse's list for a ``nargs="+"`` option, each name once, in order."""
    return None if values is None else list(dict.fromkeys(values))


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Add the ``bench`` options to a parser."""
    sel = p.add_argument_group("what to run")
    sel.add_argument("--lists", nargs="+", choices=tuple(LISTS), metavar="NAME",
                     help="parameter lists: " + ", ".join(_public_lists())
                     + " (default: " + " ".join(SIZES["default"].lists) + "; --full: "
                     + " ".join(SIZES["full"].lists) + "; none with --shapes/--model)")
    sel.add_argument("--shapes", metavar="FILE.json", action="append", default=[],
                     help="a list of shapes from JSON ([[768, 768], [768], ...] or "
                     "{\"name\": ..., \"shapes\": [...]}); repeatable")
    sel.add_argument("--model", metavar="MODULE:FACTORY", action="append", default=[],
                     help="benchmark the parameters of MODULE.FACTORY() (an nn.Module); "
                     "repeatable")
    sel.add_argument("--optimizers", nargs="+", choices=tuple(OPTIMIZERS), metavar="NAME",
                     help="optimizer settings: " + ", ".join(OPTIMIZERS)
                     + " (default: " + " ".join(SIZES["default"].optimizers)
                     + "; --full: all of them)")
    sel.add_argument("--dtypes", nargs="+", choices=tuple(DTYPES), metavar="NAME",
                     help=", ".join(DTYPES) + " (default: " + " ".join(DEFAULT_DTYPES) + ")")
    sel.add_argument("--backends", nargs="+", choices=BACKEND_IMPLS, metavar="NAME",
                     help="fused_optim backends: " + ", ".join(BACKEND_IMPLS)
                     + " (default: those that can run here, torch only with "
                     "--all-backends); asking for one that cannot run is an error")
    sel.add_argument("--all-backends", action="store_true",
                     help="also time fused_optim's slow pure-torch reference backend")
    sel.add_argument("--precision", nargs="+", choices=tuple(PRECISIONS), metavar="NAME",
                     help="also time each fused_optim backend built with "
                     "kahan_sum=True (kahan), stochastic_round=True (sr) or both "
                     "(kahan+sr), as <backend>+kahan etc., interleaved in the same "
                     "rounds as the plain backend (not under torch.compile); "
                     "reported with their paired per-round time ratio to it (vs "
                     "plain). bf16/fp16 cases only: the options do nothing to "
                     "fp32/fp64 params, so those cases do not time them (default: none)")
    sel.add_argument("--state", nargs="+", choices=tuple(STATES), metavar="NAME",
                     help="optimizer state storage: fp32 (torch's, the plain backend) "
                     "and/or bf16 (state_dtype=torch.bfloat16, timed as <backend>+state-bf16 "
                     "in the same rounds, with its paired ratio to the plain backend) "
                     "and/or 8bit (state_bits=8, <backend>+state-8bit; Adam/AdamW); "
                     "float32/bfloat16 params (default: fp32)")
    base = sel.add_mutually_exclusive_group()
    base.add_argument("--baselines", nargs="+", choices=BASELINE_IMPLS, metavar="NAME",
                      help="torch.optim paths: " + ", ".join(BASELINE_IMPLS)
                      + " (default: fused, torch's fastest; --full and runs that name "
                      "--lists or --optimizers: " + " ".join(DEFAULT_BASELINES) + "). compiled is "
                      "torch.optim's step under torch.compile, and also times each "
                      "fused_optim backend's step under torch.compile")
    base.add_argument("--no-baselines", action="store_true",
                      help="time none of torch.optim's paths")
    sel.add_argument("--no-ceiling", action="store_true",
                     help="skip the memory-ceiling kernel")
    sel.add_argument("--no-copy", action="store_true",
                     help="skip the copy-bandwidth reference (timed on CUDA only)")
    sel.add_argument("--devices", nargs="+", choices=("cpu", "cuda"), metavar="NAME",
                     help="cpu, cuda (default: cpu, plus cuda when available)")
    how = p.add_argument_group("how")
    size = how.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true",
                      help="the default cases in fewer rounds (about a minute on 2 cores "
                      "once Numba's cache is warm)")
    size.add_argument("--full", action="store_true",
                      help="every list, optimizer setting and torch path, 15 s of rounds "
                      "per case (--lists/--optimizers/--dtypes narrow it); 28 minutes "
                      "on a loaded 2-core machine in issue 30: the estimate is printed "
                      "before it starts")
    how.add_argument("--size", choices=tuple(SIZES), help=argparse.SUPPRESS)
    how.add_argument("--rounds", type=int, metavar="N",
                     help="timed interleaved rounds per case (default: auto, 4-60 "
                     "within a 100 s budget for all cases; --quick: 3-15 within 40 s; "
                     "--full: about 15 s per case, 10-100)")
    how.add_argument("--warmup", type=int, metavar="N",
                     help="untimed rounds first (default: 3; --quick 1)")
    how.add_argument("--steps-per-sample", type=int, metavar="N",
                     help="CUDA: back-to-back steps per timed sample (default: "
                     f"calibrated to about {CUDA_SAMPLE_S * 1e3:g} ms, at most "
                     f"{CUDA_MAX_STEPS})")
    how.add_argument("--threads", type=int, metavar="N",
                     help="torch and numba threads (default: theirs)")
    how.add_argument("--numba-layer", choices=("omp", "tbb", "workqueue"),
                     help="Numba threading layer (default: Numba's choice, or "
                     "NUMBA_THREADING_LAYER)")
    how.add_argument("--seed", type=int, default=0, help="data and order seed (default: 0)")
    cold = p.add_argument_group("cold start (fused_optim/bench/cold.py)")
    cold.add_argument("--cold-start", action="store_true",
                      help="instead of step throughput: import, first-step and peak-memory "
                      "figures of a one-step script in fresh processes, torch.optim vs "
                      "fused_optim with a warm and an empty Numba cache")
    cold.add_argument("--cold-runs", type=int, default=5, metavar="N",
                      help="fresh processes per row (default: 5)")
    cold.add_argument("--cold-width", type=int, default=1024, metavar="N",
                      help="the script's MLP: 4 square layers of this width (default: 1024)")
    cold.add_argument("--cold-env", action="append", metavar="KEY=VALUE",
                      help="also run fused_optim's rows with this environment "
                      "(repeatable, e.g. FUSED_OPTIM_WARMUP=0)")
    out = p.add_argument_group("output")
    out.add_argument("--json", metavar="FILE", help="write every number, the machine's "
                     f"description and the command line as JSON (default: {RESULTS_DIR}/"
                     "<date>-<time>.json in the current directory)")
    out.add_argument("--plot", metavar="FILE.png", help="the chart: per case, each "
                     "implementation's step time and %% of the ceiling, untrustworthy "
                     "figures marked (default: beside the JSON, as .png; needs matplotlib: "
                     "pip install 'fused_optim[bench]')")
    out.add_argument("--no-save", action="store_true",
                     help="write neither the JSON nor the chart unless named")
    out.add_argument("--compare", nargs="+", metavar="FILE.json",
                     help="OLD.json: run, then print each case's change against that "
                     "saved run; OLD.json NEW.json: compare two saved runs, run nothing")
    out.add_argument("--no-progress", action="store_true", help="no progress on stderr")


class _Progress:
    """Progress on stderr, with the time left.

    On a terminal with tqdm (``pip install 'fused_optim[bench]'``): a bar
    showing the case, its phase (allocating, each implementation's first
    call, where Numba compiles, the rounds) and the ETA. Otherwise (a log,
    or no tqdm): one line per finished case with its time, the run's and the
    time left. Nothing with ``--no-progress``.

    The time left is the remaining cases' estimates (:func:`_estimate`),
    scaled by how long the finished cases took against theirs.
    """

    def __init__(self, estimates: Sequence[float], enabled: bool):
        self.estimates = list(estimates)
        self.total = len(self.estimates)
        self.enabled = enabled
        self.t0 = self.case_t0 = time.perf_counter()
        self.index, self.finished, self.case, self.done_s = 0, 0, "", 0.0
        self.bar = None
        if enabled and sys.stderr.isatty():
            try:
                from tqdm import tqdm
            except ImportError:
                pass
            else:
                # leave=False: the table follows on a clean line
                self.bar = tqdm(total=self.total, unit="case", file=sys.stderr, leave=False,
                                dynamic_ncols=True,
                                bar_format="{n_fmt}/{total_fmt} |{bar:16}| {elapsed} {desc}")

    def eta(self) -> float:
        """Seconds left, from the estimates and the cases done so far."""
        now = time.perf_counter()
        est_done = sum(self.estimates[:self.finished])
        scale = self.done_s / est_done if self.finished and est_done > 0 else 1.0
        current = (max(0.0, scale * self.estimates[self.index - 1] - (now - self.case_t0))
                   if self.index > self.finished else 0.0)
        return current + scale * sum(self.estimates[self.index:])

    def _eta_text(self) -> str:
        """The ETA, as "more than" once the current case has run past its
        estimate (then nothing says how much of it is left)."""
        scale = (self.done_s / sum(self.estimates[:self.finished])
                 if self.finished and sum(self.estimates[:self.finished]) > 0 else 1.0)
        over = (self.index > self.finished and time.perf_counter() - self.case_t0
                > scale * self.estimates[self.index - 1])
        return ("more than " if over else "") + _clock(self.eta())

    def start(self, index: int, case: str) -> None:
        self.index, self.case, self.case_t0 = index, case, time.perf_counter()
        self.update("starting")

    def update(self, status: str) -> None:
        if self.bar is not None:
            self.bar.set_description_str(f"{self.case}: {status} | ETA {self._eta_text()}")

    def finish(self) -> None:
        """The current case is done."""
        now = time.perf_counter()
        self.done_s += now - self.case_t0
        self.finished = self.index
        if self.bar is not None:
            self.bar.update(1)
        elif self.enabled:
            left = self.eta()
            print(f"[{self.index}/{self.total}] {self.case}: {now - self.case_t0:.1f} s "
                  f"(elapsed {_clock(now - self.t0)}, about {_clock(left)} left)",
                  file=sys.stderr, flush=True)

    def stop(self) -> None:
        """Take the bar off the terminal (also when the run fails)."""
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def _clock(seconds: float) -> str:
    """``m:ss`` (``h:mm:ss`` from an hour)."""
    seconds = int(round(seconds))
    h, rest = divmod(seconds, 3600)
    return f"{h}:{rest // 60:02d}:{rest % 60:02d}" if h else f"{rest // 60}:{rest % 60:02d}"


#: For the estimate of a run's duration only (``_estimate``): each
#: implementation's counted GB/s and seconds per tensor on the idle 2-core dev
#: VM, read off benchmarks/results/cpu-2core.txt (2026-11-28: resnet50 and
#: gpt2-small give the GB/s, many-small and fixed-cost the per-tensor cost).
_EST_GBPS = {"numba": 35.0, "fused": 35.0, CEILING: 45.0, COPY: 45.0, "for-loop": 10.0,
             "foreach": 8.0}
_EST_PER_TENSOR_S = {"numba": 5e-6, "fused": 6e-6, CEILING: 1e-6, COPY: 0.0,
                     "for-loop": 40e-6, "foreach": 20e-6}
#: Seconds to draw one element of a case's data (two per param: p and g).
_EST_DRAW_S = 20e-9
#: Numba's compile of one kernel specialization on first use, 1.6-3.9 s on
#: the 2-core dev VM at load 5-6 (each optimizer's kernel per dtype, and each
#: ceiling pattern); counted for every one a run needs, cached or not.
_EST_COMPILE_S = 2.5


def _estimate(cases: list, settings: dict) -> tuple[list, str]:
    """Expected seconds of each case, and how they were estimated.

    A case's rounds each step every implementation once: a round's time is
    the sum over implementations of counted bytes over the GB/s and tensors
    times the seconds per tensor measured on the 2-core dev VM. The timed
    rounds last ``target_s`` (or their share of ``budget_s``), at least
    ``min_rounds`` rounds; the warm-up rounds, drawing the data and the
    Numba compiles a case is the first to need come on top.
    """
    n = len(cases)
    share = settings["target_s"]
    if settings["budget_s"] is not None and n:
        share = min(share, 0.5 * settings["budget_s"] / n)
    seen, out = set(), []
    for sl, spec, dt, dev, impls, _ in cases:
        itemsize = torch.empty((), dtype=DTYPES[dt]).element_size()
        nbytes = spec.bytes_per_step(sl.numel, itemsize)
        round_s = sum(nbytes / 1e9 / _EST_GBPS.get(i, 10.0)
                      + len(sl) * _EST_PER_TENSOR_S.get(i, 20e-6) for i in impls)
        if settings["rounds"] is not None:
            timed = settings["rounds"] * round_s
        else:
            timed = min(max(share, settings["min_rounds"] * round_s),
                        settings["max_rounds"] * round_s)
        new = {k for k in ((spec.kind, dt) if "numba" in impls else None,
                           (spec.reads, spec.writes, itemsize) if CEILING in impls else None)
               if k is not None and dev == "cpu"} - seen
        seen |= new
        out.append(timed + settings["warmup"] * round_s + 2 * sl.numel * _EST_DRAW_S
                   + _EST_COMPILE_S * len(new))
    how = (f"{n} case{'s' * (n != 1)}: "
           + (f"{settings['rounds']} timed rounds each" if settings["rounds"] is not None
              else f"about {share:.0f} s of timed rounds each")
           + ", plus warm-up steps and data estimated from the bytes and tensors each "
           "implementation steps, at the speeds of the idle 2-core dev VM, and "
           f"{_EST_COMPILE_S:g} s per Numba kernel compiled on first use")
    return out, how


def _devices_of(backend: str):
    """The device types ``backend`` declares (None: any)."""
    from .. import _backend
    return _backend.declared(backend)["DEVICES"]


def _devices(args, backends_explicit: list | None) -> list:
    names = _names(args.devices)
    cuda = torch.cuda.is_available()
    if names is None:
        if backends_explicit:
            # a backend that runs anywhere is taken to CUDA only where there is one
            names = [d for d in ("cpu", "cuda")
                     if any(_backend_device_ok(b, d) and (d == "cpu" or cuda
                                                          or _devices_of(b) is not None)
                            for b in backends_explicit)]
        else:
            names = ["cpu"] + (["cuda"] if cuda else [])
    if "cuda" in names and not cuda:
        why = ("this torch has no CUDA support" if torch.version.cuda is None
               else "torch.cuda.is_available() is False")
        raise BenchError(f"--devices cuda: no CUDA device here ({why}, "
                         f"torch {torch.__version__})")
    return names


def _plan(args) -> tuple[list, dict]:
    """Resolve the options into cases; raise BenchError for anything unusable."""
    size_name = _size_name(args)
    size = SIZES[size_name]
    custom = [shapes_from_json(f) for f in args.shapes] + [shapes_from_model(m) for m in args.model]
    names = _names(args.lists)
    if names is None:
        names = [] if custom else list(size.lists)
    lists = [shape_list(n) for n in names] + custom
    optimizers = _names(args.optimizers) or list(size.optimizers)
    dtypes = _names(args.dtypes) or list(DEFAULT_DTYPES)
    backends = _names(args.backends)
    precisions = _names(args.precision) or []
    for name in _names(args.state) or ():
        if STATES[name] is not None and STATES[name] not in precisions:
            precisions.append(STATES[name])
    baselines = ([] if args.no_baselines
                 else _names(args.baselines) or list(size.baselines or DEFAULT_BASELINES))
    if backends is not None:
        for b in backends:
            if not _backend_device_ok(b, "cpu") and not torch.cuda.is_available():
                raise BenchError(f"backend {b!r} cannot run here: it needs a CUDA GPU "
                                 "and torch.cuda.is_available() is False")
    devices = _devices(args, backends)
    for b in backends or ():
        if not any(_backend_device_ok(b, d) for d in devices):
            raise BenchError(f"backend {b!r} runs on {' '.join(_devices_of(b))} "
                             f"tensors, but --devices is {' '.join(devices)}")
    if args.rounds is not None and args.rounds < 1:
        raise BenchError("--rounds must be at least 1")
    if args.warmup is not None and args.warmup < 0:
        raise BenchError("--warmup must be at least 0")
    if args.steps_per_sample is not None and args.steps_per_sample < 1:
        raise BenchError("--steps-per-sample must be at least 1")
    if args.plot:
        _check_matplotlib()

    cases = []
    for dev, sl, opt, dt in itertools.product(devices, lists, optimizers, dtypes):
        spec = OPTIMIZERS[opt]
        if backends is None:
            wanted_backends = [b for b in ("numba", "triton", "torch")
                               if _backend_device_ok(b, dev)
                               and (b != "torch" or args.all_backends)]
        else:
            wanted_backends = [b for b in backends if _backend_device_ok(b, dev)]
            for b in wanted_backends:
                why = _backend_problem(b, spec, DTYPES[dt], torch.device(dev))
                if why:
                    raise BenchError(f"backend {b!r} cannot run {opt} {dt} on {dev}: {why}")
        compiled = [f"{b}-compiled" for b in wanted_backends] if COMPILED in baselines else []
        wanted = (wanted_backends + compiled + baselines
                  + ([] if args.no_ceiling else [CEILING])
                  + ([COPY] if dev == "cuda" and not args.no_copy else []))
        impls, skipped = available_impls(spec, DTYPES[dt], dev, wanted)
        here = [p for p in precisions
                if DTYPES[dt] in LOW_PRECISION or is_state_option(p)]
        if here:
            # the variants of every backend that runs this case, right after it
            runnable = [b for b in wanted_backends if b in impls]
            variants = [f"{b}+{p}" for b in runnable for p in here]
            ok, why = available_impls(spec, DTYPES[dt], dev, variants)
            skipped.update(why)
            at = impls.index(runnable[-1]) + 1 if runnable else 0
            impls[at:at] = ok
        if backends is None and "cuda" not in devices:
            for b in BACKEND_IMPLS:
                if not _backend_device_ok(b, "cpu"):
                    skipped[b] = "needs a CUDA GPU and torch.cuda.is_available() is False"
        cases.append((sl, spec, dt, dev, impls, skipped))
    settings = {
        "size": size_name,
        "lists": [sl.name for sl in lists], "optimizers": optimizers, "dtypes": dtypes,
        "devices": devices, "backends": backends, "precision": precisions,
        "baselines": baselines,
        "ceiling": not args.no_ceiling, "copy": not args.no_copy,
        "steps_per_sample": args.steps_per_sample, "cuda_sample_s": CUDA_SAMPLE_S,
        "cuda_max_steps": CUDA_MAX_STEPS,
        "rounds": args.rounds, "warmup": size.warmup if args.warmup is None else args.warmup,
        "min_rounds": size.min_rounds, "max_rounds": size.max_rounds,
        "target_s": size.target_s, "budget_s": size.budget_s, "seed": args.seed,
        "optimizer_kwargs": {o: OPTIMIZERS[o].kwargs for o in optimizers},
    }
    return cases, settings


def _size_name(args) -> str:
    """The run size: --size, --quick, --full; else the default run, unless
    cases are chosen (--lists, --optimizers, --shapes, --model): those get
    --full's rounds and torch paths."""
    if args.size:
        return args.size
    if args.quick:
        return "quick"
    if args.full or args.lists or args.optimizers or args.shapes or args.model:
        return "full"
    return "default"


def _set_numba_layer(name: str) -> None:
    """Select Numba's threading layer; it is fixed by the first parallel call."""
    import numba

    from ..kernels.numba import _ceiling
    numba.config.THREADING_LAYER = name
    table = _ceiling.make_table([[0, 0, 0]], [0])
    try:
        _ceiling._pattern(table, _ceiling.split(0), 4, _ceiling.word_dtype(4), 3)
    except ValueError as err:
        raise BenchError(f"--numba-layer {name}: {str(err).splitlines()[0]}") from None
    if numba.threading_layer() != name:
        raise BenchError(f"--numba-layer {name}: Numba already runs the "
                         f"{numba.threading_layer()} layer")


def _usable_cores() -> int | None:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()


def _warn_load(settings: dict, results: Sequence = ()) -> None:
    cores = _usable_cores()
    loads = [la[0] for la in (settings.get("load_average_start"),
                              settings.get("load_average_end")) if la]
    # The run itself keeps about `cores` threads busy; more than that means
    # other processes shared the cores.
    if cores and loads and max(loads) > cores + 0.5:
        # Measured on the 2-core dev VM at load 3-4: torch's multi-threaded
        # steps intermittently took ~8 ms per parallel region (1.6 s instead
        # of 1.2 ms for 200 small tensors) while one-region-per-step kernels
        # were barely affected; single-threaded runs stayed consistent.
        print(f"note: 1-minute load average reached {max(loads):.1f} on {cores} cores: "
              "other processes competed for the CPU, so expect noisier numbers "
              "(thread-pool stalls hit steps with many parallel regions hardest; "
              "--threads 1 compares the kernels without them)", file=sys.stderr)
    busy = [r for r in results if r.competed]
    if busy:
        lo, hi = (f"{f(r.other_cores for r in busy):.1f}" for f in (min, max))
        print(f"warning: other processes used {lo if lo == hi else f'{lo}-{hi}'} cores "
              f"while {len(busy)} of "
              f"{len(results)} cases ran (at least {COMPETING_CORES:g} counts; marked "
              "'busy' in the table and the chart): their figures are not this machine's "
              "own", file=sys.stderr)


def run(args: argparse.Namespace) -> list:
    """Run the benchmark the parsed options describe; print the table.

    Returns:
        the list of :class:`CaseResult`.

    Raises:
        BenchError: bad names, unusable backends, missing matplotlib, memory.
    """
    if getattr(args, "cold_start", False):
        return _cold(args)
    if args.compare and len(args.compare) > 2:
        raise BenchError("--compare takes OLD.json, or OLD.json NEW.json")
    if args.compare and len(args.compare) == 2:
        print(format_compare(load(args.compare[0]), load(args.compare[1])))
        return []
    old = load(args.compare[0]) if args.compare else None
    # timed steps never share the machine with a background compile
    saved = os.environ.get("FUSED_OPTIM_WARMUP")
    os.environ["FUSED_OPTIM_WARMUP"] = "0"
    try:
        return _run(args, old)
    finally:
        if saved is None:
            os.environ.pop("FUSED_OPTIM_WARMUP", None)
        else:
            os.environ["FUSED_OPTIM_WARMUP"] = saved


def _cold(args) -> list:
    from . import cold

    if args.cold_runs < 1 or args.cold_width < 1:
        raise BenchError("--cold-runs and --cold-width must be at least 1")
    try:
        cold._parse_env(args.cold_env)
    except ValueError as err:
        raise BenchError(str(err)) from None
    show = None if args.no_progress else (lambda msg: print(msg, file=sys.stderr, flush=True))
    try:
        results = cold.measure(runs=args.cold_runs, width=args.cold_width,
                               extra_env=args.cold_env, progress=show, seed=args.seed)
    except RuntimeError as err:
        raise BenchError(str(err)) from None
    print(cold.format_table(results), flush=True)
    if args.json:
        settings = dict(runs=args.cold_runs, width=args.cold_width, env=args.cold_env or [],
                        machine=machine_info())
        try:
            Path(args.json).write_text(json.dumps(cold.to_json(results, settings), indent=1)
                                       + "\n")
        except OSError as err:
            raise BenchError(f"cannot write --json {args.json!r}: {err.strerror}") from None
    return []


def _outputs(args) -> tuple:
    """(JSON path or None, PNG path or None, why no chart or None)."""
    json_path = args.json
    if json_path is None and not args.no_save:
        json_path = str(Path(RESULTS_DIR) / (time.strftime("%Y-%m-%d-%H%M%S") + ".json"))
    png, why = args.plot, None
    if png is None and json_path is not None and not args.no_save:
        try:
            _check_matplotlib()
        except BenchError:
            why = ("no chart: matplotlib is not installed (pip install 'fused_optim[bench]', "
                   "or pip install matplotlib)")
        else:
            png = str(Path(json_path).with_suffix(".png"))
    return json_path, png, why


def _write(path: str, text: str, what: str) -> None:
    try:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(text)
    except OSError as err:
        raise BenchError(f"cannot write {what} {path!r}: {err.strerror}") from None


def _run(args, old: dict | None = None) -> list:
    t_start = time.perf_counter()
    if args.threads is not None:
        if args.threads < 1:
            raise BenchError("--threads must be at least 1")
        import numba
        torch.set_num_threads(args.threads)
        try:
            numba.set_num_threads(args.threads)
        except ValueError as err:
            raise BenchError(f"--threads {args.threads}: {err}") from None
    if args.numba_layer:
        _set_numba_layer(args.numba_layer)
    cases, settings = _plan(args)
    if not cases:
        raise BenchError("nothing to run")
    json_path, png, no_chart = _outputs(args)
    settings["command_line"] = getattr(args, "command_line", None) or list(sys.argv)
    settings["load_average_start"] = _loadavg()
    estimates, how = _estimate(cases, settings)
    if not args.no_progress:
        cores = _usable_cores()
        load = settings["load_average_start"]
        busy = (f"; the 1-minute load is {load[0]:.1f} on {cores} cores now: expect longer"
                if load and cores and load[0] > cores + 0.5
                else "; a loaded machine takes longer")
        print(f"{len(cases)} cases, expected to take about {_clock(sum(estimates))} "
              f"({how}{busy})", file=sys.stderr, flush=True)
    progress = _Progress(estimates, not args.no_progress)
    results = []
    with warnings.catch_warnings(), contextlib.ExitStack() as stack:
        stack.callback(progress.stop)
        # Numba's own pedantic SSA check fires while compiling the bf16/fp16
        # store overloads; it is harmless and would break the progress line.
        from numba.core.errors import NumbaIRAssumptionWarning
        warnings.simplefilter("ignore", NumbaIRAssumptionWarning)
        t0 = time.perf_counter()
        for i, (sl, spec, dt, dev, impls, skipped) in enumerate(cases, 1):
            progress.start(i, f"{sl.name} {spec.name} {dt}" + (f" {dev}" if dev != "cpu" else ""))
            target = settings["target_s"]
            if settings["budget_s"] is not None:
                left = settings["budget_s"] - (time.perf_counter() - t0)
                # Half the share: allocation and warm-up take about as long
                # as the timed rounds.
                target = max(0.0, min(target, 0.5 * left / (len(cases) - i + 1)))
            res = run_case(sl, spec, dt, dev, impls, rounds=settings["rounds"],
                           warmup=settings["warmup"], seed=args.seed,
                           min_rounds=settings["min_rounds"],
                           max_rounds=settings["max_rounds"],
                           target_s=target, skipped=skipped,
                           progress=progress.update, steps=settings["steps_per_sample"])
            results.append(res)
            progress.finish()
    progress.stop()
    settings["load_average_end"] = _loadavg()
    settings["wall_s"] = time.perf_counter() - t_start
    print(format_table(results), flush=True)
    _warn_load(settings, results)
    doc = to_json(results, settings)
    if json_path:
        _write(json_path, json.dumps(doc, indent=1) + "\n", "--json")
    if png:
        write_plot(results, png, doc)
    if old is not None:
        print("\n" + format_compare(old, doc, new_name="this run"), flush=True)
    print(f"\nwall time {_clock(settings['wall_s'])} ({settings['wall_s']:.0f} s); "
          f"results: {json_path or 'not saved'}; chart: {png or no_chart or 'not drawn'}",
          flush=True)
    return results


def command(args: argparse.Namespace, prog: str = "fused-optim bench") -> int:
    """Run parsed ``bench`` options; errors become one line on stderr.

    Returns:
        0 on success, 1 if an implementation raised (the others are still
        reported), 2 on a user error, 130 on Ctrl-C.
    """
    try:
        results = run(args)
    except BenchError as err:
        print(f"\n{prog}: error: {err}" if sys.stderr.isatty() else f"{prog}: error: {err}",
              file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"\n{prog}: interrupted", file=sys.stderr)
        return 130
    if any(r.failed for r in results):
        print(f"{prog}: some implementations failed (see FAILED above)", file=sys.stderr)
        return 1
    return 0
