"""The Triton kernels compile for real GPUs, with the code they are meant to have.

No GPU is needed: tests/_compile_matrix.py compiles, in a subprocess without
the interpreter, a covering subset of the specializations the launchers can
produce (per kernel, dtype and ALIGNED: every switch on and every switch off;
and each step kernel) for sm_80 and sm_90, and reads facts off the PTX and
``ptxas -v``. ``make compile-check`` runs all of them (``python
tests/_compile_matrix.py --full --count`` says how many: 734 per arch with
all eleven optimizers' kernels; 394 before Adagrad's, RMSprop's, Adadelta's
and Rprop's joined the matrix from tests of their own, one subprocess each;
2,114 before the flags that change only the arithmetic became runtime
values). A kernel joins both through one entry of
``_compile_matrix.UPDATE_KERNELS`` or ``STEPS_KERNELS``; the counts the tests
expect are derived from those. NAdam's, RAdam's, Adamax's and ASGD's kernels
are ``thin``: here, four specializations each (``_compile_matrix.THIN``:
every dtype once, aligned and not, switches on and off) and their step
kernel with found_inf, to keep CI's compile time; ``make compile-check``
compiles their full matrix.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("triton")

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE))
import _compile_matrix  # noqa: E402

ARCHS = (80, 90)


@pytest.fixture(scope="module")
def compiled():
    """Every offline compile of this file, from one subprocess (its imports
    alone take seconds): the covering subset, then the extra jobs (below)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run(
        [sys.executable, str(HERE / "_compile_matrix.py"), "--archs",
         ",".join(map(str, ARCHS)), "--jobs", str(min(2, os.cpu_count() or 1)),
         "--also", json.dumps(_FORMERLY_SPILLING)],
        capture_output=True, text=True, env=env, timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    every = [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]
    n = len(every) - len(_FORMERLY_SPILLING)
    return every[:n], every[n:]


@pytest.fixture(scope="module")
def results(compiled):
    return compiled[0]


def _per_kernel(specs) -> dict:
    out = {}
    for spec in specs:
        out[spec[0]] = out.get(spec[0], 0) + 1
    return out


def test_every_covering_specialization_compiled(results):
    subset = list(_compile_matrix.specializations(full=False))
    # per update kernel, dtype and ALIGNED: all on and all off; each step kernel twice
    assert _per_kernel(subset) == _compile_matrix.counts(full=False)
    assert len(results) == len(subset) * len(ARCHS)
    assert {r["kernel"] for r in results} == (set(_compile_matrix.UPDATE_KERNELS)
                                              | set(_compile_matrix.STEPS_KERNELS))
    seen = {(r["kernel"], r["dtype"], r["aligned"], json.dumps(r["switches"], sort_keys=True),
             r["arch"]) for r in results}
    assert len(seen) == len(results)


def test_full_matrix_is_what_the_launchers_can_produce():
    full = list(_compile_matrix.specializations(full=True))
    # per dtype: (ALIGNED with or without the tail hint, or neither) x every
    # other switch of the kernel, on or off; and the step kernel with and
    # without found_inf
    assert _per_kernel(full) == _compile_matrix.counts(full=True)
    updates = _compile_matrix.UPDATE_KERNELS
    for kernel, _, aligned, sw in full:
        if kernel in updates:
            assert tuple(sw) == updates[kernel].switches
            assert aligned or not sw["TAIL_ALIGNED"]
    # the runtime flags are not kernel arguments: a launch cannot specialize on them
    for kernel, entry in updates.items():
        runtime = {"MAXIMIZE", "HAS_WD", "NESTEROV", "DECOUPLED", "LERP_FROM_START"}
        assert not runtime & set(entry.kernel.arg_names), kernel
        # every constexpr switch of the kernel is one the matrix varies
        assert set(entry.switches) <= set(entry.kernel.arg_names), kernel


@pytest.mark.parametrize("arch", ARCHS)
def test_codegen_facts(results, arch):
    """No local memory or spills; IEEE division and square root, no .ftz in
    the float math; 128-bit loads and stores of every stream where ALIGNED."""
    mine = [r for r in results if r["arch"] == arch]
    assert mine
    problems = {f"{r['kernel']} {r['dtype']} aligned={r['aligned']} {r['switches']}":
                _compile_matrix.violations(r) for r in mine}
    assert not {k: v for k, v in problems.items() if v}


def test_the_checks_can_fail(results):
    """Each check flags a result doctored to break it."""
    adam = next(r for r in results if r["kernel"] == "adam" and r["aligned"]
                and r["switches"]["TAIL_ALIGNED"])
    steps = next(r for r in results if r["kernel"] == "adam_steps")
    assert _compile_matrix.violations(adam) == [] == _compile_matrix.violations(steps)
    # one 128-bit load per stream short of both paths (whole and masked block)
    short = 2 * (4 + adam["switches"]["AMSGRAD"]) - 1
    for r, change, word in [(adam, dict(spill_store_bytes=8), "local memory"),
                            (adam, dict(local=1), "local memory"),
                            (adam, dict(inexact=["div.approx"]), "non-IEEE"),
                            (adam, dict(inexact=[".ftz"]), "non-IEEE"),
                            (steps, dict(ftz_lines=steps["exp2_range_checks"] + 1), "non-IEEE"),
                            (adam, dict(ieee_sqrt=0), "sqrt.rn"),
                            (adam, dict(ieee_div=0), "div.rn"),
                            (steps, dict(ieee_div=0), "div.rn"),
                            (adam, dict(vector_loads=1), "128-bit"),
                            (adam, dict(vector_loads=short), "128-bit")]:
        doctored = dict(r, **change)
        assert any(word in v for v in _compile_matrix.violations(doctored)), change


#: Found by ``make compile-check`` before the step kernel (triton 3.9): ptxas
#: gave 56 Adam specializations 4-16 bytes of stack and spills, 50 of them
#: with device-side steps (benchmarks/results/compile-matrix-triton-3.9.txt).
#: Moving the step logic out of the update kernel removed them; these two,
#: outside the covering subset, stay as a regression check.
#: (Their runtime flags, then all off but LERP_FROM_START, are now read from
#: the hyperparameter buffer, in every build.)
_FORMERLY_SPILLING = [
    ("adam", "float32", True, dict(TAIL_ALIGNED=False, AMSGRAD=False,
                                   HAS_GRAD_SCALE=True, HAS_FOUND_INF=False), 80),
    ("adam", "float64", True, dict(TAIL_ALIGNED=False, AMSGRAD=False,
                                   HAS_GRAD_SCALE=False, HAS_FOUND_INF=True), 90),
]


@pytest.mark.parametrize("i", range(len(_FORMERLY_SPILLING)),
                         ids=[f"{s[1]}-sm_{s[4]}" for s in _FORMERLY_SPILLING])
def test_formerly_spilling_specializations(compiled, i):
    kernel, dname, aligned, sw, arch = _FORMERLY_SPILLING[i]
    result = compiled[1][i]
    assert (result["kernel"], result["dtype"], result["aligned"], result["switches"],
            result["arch"]) == (kernel, dname, aligned, sw, arch)
    assert _compile_matrix.violations(result) == []
