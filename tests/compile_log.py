"""Where CI's compile time goes: one line per Numba compilation.

``FUSED_OPTIM_COMPILE_LOG=<prefix> make test`` appends (test id, kernel,
argument types, seconds) to ``<prefix>.<worker>.tsv``, from the pytest
workers (tests/conftest.py) and from the stateful machine's subprocesses
(tests/machine.py): which tests compile which specializations from a cold
cache. Cache loads are not compilations and are not logged.
"""

import os
import time

from numba.core import event


class _CompileLog(event.Listener):
    depth = 0

    def on_start(self, ev):
        self.depth += 1
        if self.depth == 1:
            self.t0 = time.perf_counter()

    def on_end(self, ev):
        self.depth -= 1
        if self.depth:  # (a compilation's nested ones count in its own time)
            return
        data = ev.data or {}
        name = getattr(data.get("dispatcher"), "__name__", "?")
        test = os.environ.get("PYTEST_CURRENT_TEST", "?").rsplit(" ", 1)[0]
        where = os.environ.get("PYTEST_XDIST_WORKER", "main")
        if os.environ.get("FUSED_OPTIM_COMPILE_LOG_SUB"):
            where += "-" + os.environ["FUSED_OPTIM_COMPILE_LOG_SUB"]
        with open(f"{os.environ['FUSED_OPTIM_COMPILE_LOG']}.{where}.tsv", "a") as f:
            f.write("%s\t%s\t%s\t%.2f\n" % (test, name, data.get("args", ""),
                                             time.perf_counter() - self.t0))


def install():
    """Log from now on, where FUSED_OPTIM_COMPILE_LOG is set."""
    if os.environ.get("FUSED_OPTIM_COMPILE_LOG"):
        event.register("numba:compile", _CompileLog())
