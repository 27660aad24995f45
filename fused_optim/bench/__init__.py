"""Benchmark ``optimizer.step()``: fused_optim's backends against torch.optim.

Run it as ``python -m fused_optim bench`` (or ``fused-optim bench``); see
``--help``. The building blocks (parameter lists, optimizer settings,
implementations, the interleaved timer) are public so that ``benchmarks/``
(pytest-benchmark) reuses them.

What it runs: by default (``make bench``) SGD with momentum and AdamW, fp32
and bf16, on resnet50 and many-small, against torch.optim's default path
(the for-loop on CPU) and its fastest (fused), and the ceiling, in about
2 minutes on 2 cores (``cases.SIZES["default"]``); ``--full`` runs every list,
optimizer setting and torch path, and says first how long that will take.
It ends with the answer (fused_optim's time against torch's default and
fastest paths, paired per round), saves the JSON and a chart
(``bench-results/`` unless ``--json``/``--plot``), and ``--compare`` sets a
run against a saved one (``compare.py``).

How it measures, and why:

* Every implementation in a case (fused_optim backends, torch.optim's for-loop,
  foreach and fused paths, and the memory ceiling) has its own params, grads
  and state, cloned from one seeded random draw; grads are set once and
  reused, so a step is only the optimizer's work.
* They run interleaved in one process: each round times one sample of every
  implementation, in an order shuffled per round. Drift on a shared, noisy
  machine (other tenants, frequency changes) then hits all of them alike, and
  per-round ratios cancel most of it. Only medians and paired ratios are
  reported, never single times.
* On CPU a sample is one step, timed with ``perf_counter``. On CUDA a sample
  is K back-to-back steps between two CUDA events, with a synchronize only
  before the first and after the last: a step is enqueued while the previous
  one's kernels run, as in training, instead of a synchronize per step timing
  the host's Python on an idle GPU. K is calibrated per implementation after
  the warm-up so that a sample lasts about ``CUDA_SAMPLE_S`` (at most
  ``CUDA_MAX_STEPS``); the time reported per step is the sample's over K. The
  host's wall time for enqueueing the K steps, over K, is reported beside it
  ("host ms"): where the two are close, the host bounds the step.
* Bytes are counted, not measured: the arrays an element update reads and
  writes, counted from the per-element state torch's own class keeps
  (``cases.traffic``); e.g. SGD with momentum reads p, g, buf and writes p,
  buf (5 element sizes), Adam/AdamW read p, g, m, v and write p, m, v (7).
  The settings timed (``--optimizers``) are ``cases.SETTINGS``, and the
  class's defaults for an optimizer without one.
* The ceiling is the same traffic with no arithmetic: on CPU the Numba kernel
  in ``kernels/numba/_ceiling.py`` over tensors of the same sizes, on CUDA
  the Triton kernel in ``kernels/triton/_ceiling.py`` over flat buffers. On
  CPU a plain copy is the wrong yardstick: it writes lines it never read,
  and optimizer steps reach 1.4-2x its bandwidth.
* On CUDA a copy is timed in the same rounds as a second reference: ``copy_``
  between two flat buffers that together hold the bytes one step moves
  (``copy_gbps`` counts its read and its write). "% copy" is an
  implementation's counted GB/s over the copy's, paired per round.
* ``--precision kahan sr kahan+sr`` adds, in bf16/fp16 cases, each fused_optim
  backend built with ``kahan_sum=True`` / ``stochastic_round=True`` / both
  (``<backend>+kahan``, ``+sr``, ``+kahan+sr``) to the same interleaved
  rounds; their cost is reported as "vs plain", the median of per-round
  ratios to the plain backend's step (issue 15's target: at most 1.15x on
  resnet50 and gpt2-small). fp32/fp64 cases do not time them: the options
  leave such params alone. A variant's GB/s and % ceil count the plain
  step's bytes (not the Kahan buffer's read and write): they show its time,
  not extra traffic.
* A figure is flagged when its rounds spread: interquartile range over median
  of at least 10% (``measure.SPREAD_LIMIT``, torch.utils.benchmark's warning
  threshold) for its step times, or for its per-round ratios to torch's
  fastest path or to the ceiling (the rounds disagree), or when fewer than 4
  rounds ran. A case is flagged "busy" when other processes used at least a
  quarter of a core while it ran (``measure.COMPETING_CORES``, counted from
  /proc/stat less this process's own CPU time): on a shared machine, thread
  pools stall and the figures describe the neighbours, not the code.
"""

from __future__ import annotations

import argparse
import sys
from typing import Sequence

# Names beyond __all__ stay importable from here, as when this was one
# module: benchmarks/conftest.py, __main__ and the tests use them.
from .cases import (DEFAULT_DTYPES, DTYPES, LISTS, OPTIMIZERS, SIZES, BenchError,
                    OptimizerSpec, ShapeList, Size, make_data, shape_list,
                    shapes_from_json, shapes_from_model)
from .cli import add_arguments, command, run
from .impls import (BACKEND_IMPLS, BASELINE_IMPLS, CEILING, COMPILED, COMPILED_BACKENDS,
                    COPY, DEFAULT_BASELINES, IMPLS, PRECISION_IMPLS, PRECISIONS, REFERENCE,
                    Runner, available_impls, copy_runner, fresh_compile_caches,
                    make_runner, precision_variant)
from .machine import machine_info
from .measure import CaseResult, run_case
from .report import format_table, make_figure, to_json, write_plot
from .timing import (CUDA_MAX_STEPS, CUDA_SAMPLE_S, CudaTimer, HostTimer, Timings,
                     calibrate_steps, interleaved, make_timer, synced_every)

__all__ = [
    "BenchError", "ShapeList", "OptimizerSpec", "Runner", "CaseResult",
    "LISTS", "OPTIMIZERS", "DTYPES", "SIZES", "IMPLS",
    "shape_list", "shapes_from_json", "shapes_from_model", "make_data",
    "make_runner", "available_impls", "run_case", "run", "format_table",
    "to_json", "write_plot", "make_figure", "machine_info", "add_arguments", "main",
    "HostTimer", "CudaTimer", "Timings", "calibrate_steps", "interleaved",
    "synced_every", "CUDA_SAMPLE_S", "CUDA_MAX_STEPS",
]


def main(argv: Sequence[str] | None = None, prog: str = "fused-optim bench") -> int:
    """``bench`` on its own: parse ``argv``, run, return the exit code."""
    parser = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0])
    add_arguments(parser)
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else 2
    args.command_line = [*prog.split(), *argv]
    return command(args, prog)
