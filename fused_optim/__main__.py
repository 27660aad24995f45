"""Command line: ``python -m fused_optim`` / ``fused-optim``.

Subcommands:

* ``bench``: time ``optimizer.step()`` of fused_optim's backends against
  torch.optim's for-loop, foreach and fused paths (see ``fused_optim.bench``).
* ``run``: handled by ``fused_optim._run``; every argument after ``run`` is
  passed through untouched.
* ``warmup``: compile the CPU kernels of the common configurations into
  Numba's disk cache ahead of time (``fused_optim._warmup``), e.g. in a
  Dockerfile: ``RUN fused-optim warmup --dtypes float32 bfloat16``.
"""

from __future__ import annotations

import argparse
import sys
from typing import Sequence

PROG = "fused-optim"


def _run_command(rest: Sequence[str]) -> int:
    """Hand ``rest`` to ``fused_optim._run.main`` and return its exit code."""
    try:
        from . import _run
    except ImportError as err:
        if getattr(err, "name", None) != f"{__package__}._run":
            raise  # a broken _run module should show its own traceback
        print(f"{PROG} run: error: this installation of fused_optim has no 'run' "
              "command (fused_optim._run is missing)", file=sys.stderr)
        return 2
    try:
        code = _run.main(list(rest))
    except SystemExit as exc:
        code = exc.code
    return _exit_code(code)


def _exit_code(code) -> int:
    """sys.exit semantics: None is 0, an int is itself, anything else 1."""
    if code is None:
        return 0
    if isinstance(code, bool):
        return int(code)
    if isinstance(code, int):
        return code
    print(code, file=sys.stderr)
    return 1


def _parser() -> argparse.ArgumentParser:
    from . import bench

    parser = argparse.ArgumentParser(
        prog=PROG, description="fused_optim: fused torch.optim optimizers.")
    parser.add_argument("--version", action="version", version=_version())
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    p_bench = sub.add_parser(
        "bench", help="benchmark optimizer.step() against torch.optim",
        description=bench.__doc__.split("\n\n")[0],
        epilog="Example: python -m fused_optim bench --quick --json out.json")
    bench.add_arguments(p_bench)
    p_warm = sub.add_parser(
        "warmup", help="compile the CPU kernels of the common configurations ahead of time",
        description="Compile, into Numba's disk cache, the kernels that each optimizer's "
        "common configurations (torch's defaults; SGD also with momentum=0.9) need on "
        "CPU tensors of each dtype, so that no later process compiles them in its first "
        "step. Run it as the user (or with the NUMBA_CACHE_DIR) the training runs with.")
    p_warm.add_argument("--optimizers", nargs="+", metavar="NAME",
                        help="optimizer classes (default: all)")
    p_warm.add_argument("--dtypes", nargs="+", metavar="NAME", default=["float32"],
                        help="param dtypes, e.g. float32 bfloat16 (default: float32)")
    # Only here for --help: main() hands everything after "run" to _run
    # before argparse could mistake the script's own options for ours.
    sub.add_parser("run", help="run a script with fused_optim (fused_optim._run); "
                   "arguments pass through", add_help=False)
    return parser


def _version() -> str:
    from . import __version__
    return f"{PROG} {__version__}"


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``python -m fused_optim`` and the ``fused-optim`` script.

    Args:
        argv: arguments without the program name; default ``sys.argv[1:]``.

    Returns:
        the process exit code.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "run":
        return _run_command(argv[1:])
    parser = _parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help, --version, usage errors
        return _exit_code(exc.code)
    if args.command == "bench":
        from . import bench
        args.command_line = [PROG, *argv]
        return bench.command(args, prog=f"{PROG} bench")
    if args.command == "warmup":
        return _warmup_command(args, parser)
    parser.print_help(sys.stderr)
    return 2


def _warmup_command(args, parser) -> int:
    import torch

    from . import _registry, _warmup

    names = args.optimizers or list(_registry.names())
    unknown = [n for n in names if n not in _registry.names()]
    if unknown:
        parser.error(f"warmup: unknown optimizer(s) {', '.join(unknown)}; "
                     f"choose from {', '.join(_registry.names())}")
    dtypes = []
    for d in args.dtypes:
        dtype = getattr(torch, d.removeprefix("torch."), None)
        if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
            parser.error(f"warmup: {d!r} is not a floating-point torch dtype")
        dtypes.append(dtype)
    done = _warmup.ahead_of_time(names, dtypes, report=lambda line: print(line, flush=True))
    if not done:
        print(f"{PROG} warmup: nothing to compile (no backend here compiles CPU kernels)",
              file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
