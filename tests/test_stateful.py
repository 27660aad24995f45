"""The model-based test (machine.py) on each backend, in a subprocess.

A subprocess, because the failure this test exists to find may be a write
past an allocation: a crash then fails this test with the output so far
instead of ending pytest. The budget is small in ``make test`` and larger in
``make fuzz`` (FUSED_OPTIM_FUZZ_EXAMPLES, FUSED_OPTIM_FUZZ_STEPS; there
FUSED_OPTIM_FUZZ_RANDOM=1 draws new examples at every run).
"""

import os
import subprocess
import sys

import pytest

from matrix import skip_unless_runnable

HERE = os.path.dirname(__file__)


@pytest.mark.parametrize("backend,big,precision",
                         [("numba", False, False), ("numba", True, False),
                          ("triton", False, False), ("torch", False, False),
                          ("numba", False, True), ("triton", False, True)],
                         ids=["numba", "numba-parallel", "triton", "torch",
                              "numba-precision", "triton-precision"])
def test_model_based_steps_match_torch(backend, big, precision):
    """(precision: kahan_sum/stochastic_round against the reference backend)"""
    skip_unless_runnable(backend)
    code = ("import sys; sys.path.insert(0, %r); import machine; "
            "machine.run(%r, big=%r, precision=%r)" % (HERE, backend, big, precision))
    env = dict(os.environ)
    env.setdefault("TRITON_INTERPRET", "1")
    if (big or precision) and "FUSED_OPTIM_FUZZ_EXAMPLES" not in env:
        # each parallel numba kernel compiles in ~7 s from a cold cache (CI's)
        env["FUSED_OPTIM_FUZZ_EXAMPLES"] = "10"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env=env, timeout=1500)
    assert out.returncode == 0, (f"exit code {out.returncode}\n--- stdout\n{out.stdout[-20000:]}"
                                 f"\n--- stderr\n{out.stderr[-20000:]}")
    print(out.stdout.strip().splitlines()[-1])  # what was explored (pytest -s shows it)
