"""``fused-optim run``: run an unmodified script with torch.optim patched.

``fused-optim run script.py args...`` behaves like ``python script.py
args...`` (and ``fused-optim run -m module args...`` like ``python -m``),
except that torch.optim's classes are fused_optim's (every registered one)
while the script runs.
"""

from __future__ import annotations

import builtins
import io
import os
import runpy
import sys
import threading
import traceback
import types
import zipfile
from importlib.machinery import SourceFileLoader

from ._patch import patch_torch

__all__ = ["main"]

PROG = "fused-optim run"
USAGE = f"usage: {PROG} [-h] (script.py | -m module) [args ...]"
HELP = f"""{USAGE}

Run a Python script (or module, with -m) exactly as `python` would, with
torch.optim's {{names}} replaced by fused_optim's fused classes.
Everything after the script or module name is passed to it in sys.argv.
"""

# Leading traceback frames from these files are the runner's, not the
# script's; python's own traceback of the same error would not show them.
_RUNNER_FILES = frozenset({__file__, runpy.__file__, "<frozen runpy>"})


def main(argv: list[str] | None = None) -> int:
    """Run a script or module with torch.optim patched.

    Args:
        argv: ``["script.py", *args]``, ``["-m", "module", *args]``, or
            either preceded by ``"--"``. Defaults to ``sys.argv[1:]``.

    Returns:
        int: the exit status ``python`` would have had: the script's
        ``SystemExit`` code, 1 after an uncaught exception (its traceback
        printed through ``sys.excepthook``), 130 after an uncaught
        ``KeyboardInterrupt``, 2 for a usage error or a missing script.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "--":
        argv = argv[1:]
    if not argv:
        print(USAGE, file=sys.stderr)
        print(f"{PROG}: error: a script or -m module is required", file=sys.stderr)
        return 2
    if argv[0] in ("-h", "--help"):
        from . import _registry
        print(HELP.format(names=", ".join(_registry.names())), end="")
        return 0
    if argv[0] == "-m":
        if len(argv) < 2:
            print(USAGE, file=sys.stderr)
            print(f"{PROG}: error: argument expected for the -m option", file=sys.stderr)
            return 2
        return _run(_module_runner(argv[1]), argv[1:], path0=os.getcwd())
    if argv[0].startswith("-"):
        print(USAGE, file=sys.stderr)
        print(f"{PROG}: error: unknown option {argv[0]}", file=sys.stderr)
        return 2

    script = argv[0]
    path = os.path.abspath(script)
    if not os.path.exists(path):
        print(f"{PROG}: can't open file {path!r}: [Errno 2] No such file or directory",
              file=sys.stderr)
        return 2
    if os.path.isdir(path) or not _is_source(path):
        # directories, zip files and .pyc: runpy does what python does
        def runner():
            runpy.run_path(script, run_name="__main__")
        return _run(runner, argv, path0=path)
    return _run(_script_runner(path), argv,
                path0=os.path.dirname(os.path.realpath(path)))


def _is_source(path: str) -> bool:
    return not (path.endswith((".pyc", ".pyo")) or zipfile.is_zipfile(path))


def _script_runner(path: str):
    """Execute ``path`` as ``__main__`` the way the interpreter runs a script.

    runpy.run_path would set sys.argv[0] to the path it is given, while python
    keeps sys.argv[0] as typed and makes ``__file__`` absolute.
    """

    def runner():
        with io.open_code(path) as f:
            source = f.read()
        # dont_inherit: this module's __future__ imports must not leak in
        code = compile(source, path, "exec", dont_inherit=True)
        module = types.ModuleType("__main__")
        module.__dict__.update(
            __file__=path,
            __cached__=None,
            __loader__=SourceFileLoader("__main__", path),
            __builtins__=builtins,
        )
        # _run puts the previous __main__ back
        sys.modules["__main__"] = module
        exec(code, module.__dict__)

    return runner


def _module_runner(name: str):
    def runner():
        runpy.run_module(name, run_name="__main__", alter_sys=True)

    return runner


def _run(runner, argv: list[str], path0: str) -> int:
    saved_argv, saved_path = sys.argv, list(sys.path)
    saved_main = sys.modules.get("__main__")
    sys.argv = list(argv)
    # python -P / -I do not put the script's directory on sys.path
    if not getattr(sys.flags, "safe_path", False):
        if sys.path:
            sys.path[0] = path0
        else:
            sys.path.insert(0, path0)
    patch = patch_torch()
    status = 0
    before = set(threading.enumerate())
    try:
        runner()
    except SystemExit as exc:
        status = _exit_status(exc.code)
    except BaseException as exc:  # noqa: B036 - python reports every uncaught exception
        _report(exc)
        status = 130 if isinstance(exc, KeyboardInterrupt) else 1
    finally:
        # Non-daemon threads the script started keep running after it returns
        # (python waits for them), and may still build optimizers or read
        # sys.argv: leave everything as the script saw it for them.
        if not _script_threads_running(before):
            patch.undo()
            sys.argv = saved_argv
            sys.path[:] = saved_path
            if saved_main is not None:
                sys.modules["__main__"] = saved_main
    return status


def _exit_status(code) -> int:
    if code is None:
        return 0
    if isinstance(code, int):
        return code
    # as python does for sys.exit("message")
    try:
        print(code, file=sys.stderr)
    except Exception:
        pass
    return 1


def _report(exc: BaseException) -> None:
    tb = exc.__traceback__
    while tb is not None and tb.tb_frame.f_code.co_filename in _RUNNER_FILES:
        tb = tb.tb_next
    if tb is None and isinstance(exc, ImportError):
        # raised by runpy before any of the script ran (no such module, no
        # __main__ in a directory): python prints just the message
        print(f"{PROG}: {exc}", file=sys.stderr)
        return
    exc.__traceback__ = tb
    # for pdb.pm() after an in-process run, as the interpreter sets them
    sys.last_type, sys.last_value, sys.last_traceback = type(exc), exc, tb
    if sys.version_info >= (3, 12):
        sys.last_exc = exc
    try:
        sys.excepthook(type(exc), exc, tb)
    except BaseException:
        print("Error in sys.excepthook:", file=sys.stderr)
        traceback.print_exc()
        print("\nOriginal exception was:", file=sys.stderr)
        traceback.print_exception(type(exc), exc, tb)


def _script_threads_running(before) -> bool:
    """Non-daemon threads the script started that still run.

    Threads alive before it started are not its own: e.g. the thread pool
    Inductor starts to compile a graph outlives the compile, and left the
    patch in place after every later in-process run (found by a CI run on
    cold caches, after tests/test_compile.py).
    """
    me = threading.current_thread()
    return any(t is not me and t not in before and not t.daemon and t.is_alive()
               for t in threading.enumerate())
