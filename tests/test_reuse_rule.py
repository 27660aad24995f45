"""Mutation tests of the reuse rule (fused_optim/_facts.py): one fact at a time.

For each fact F1-F6 a scenario changes only that fact between two steps of
a cached plan. With the rule intact the scenario gives torch's result (or
the clear error where torch's step would leave its memory). With that one
fact's check switched off the same scenario must go wrong: that is what
proves the scenario reaches the check, so the test fails the day someone
drops it. The two facts whose absence means reading or writing past an
allocation (F3, F4) are switched off in a subprocess (_rule_worker.py).
"""

import json
import os
import subprocess
import sys

import pytest
import torch

import fused_optim
from fused_optim import _facts
from matrix import BACKENDS, skip_unless_runnable
from sides import assert_same


def _leaf(side, *shape):
    return side.randn(*shape).requires_grad_()


def f1_grad_layout(side):
    """F1: the grad keeps shape, dtype and storage size; only its strides change."""
    p = _leaf(side, 6, 4)
    opt = side.make("SGD", [p], lr=0.1, momentum=0.9)
    for k in range(4):
        g = side.randn(4, 6).t() if k >= 2 else side.randn(6, 4)
        p.grad = g
        side.step(opt)


def f1_state_shape(side):
    """F1: a state entry replaced by a view of itself: same address, other shape."""
    p = _leaf(side, 4, 4)
    opt = side.make("Adam", [p], lr=0.01)
    for k in range(4):
        p.grad = side.randn(4, 4)
        if k == 2:
            opt.state[p]["exp_avg"] = opt.state[p]["exp_avg"].view(2, 8)
        side.step(opt)


def f2_param_swapped(side):
    """F2: ``p.data`` swapped for a tensor of identical layout elsewhere."""
    p = _leaf(side, 50)
    opt = side.make("AdamW", [p], lr=0.01)
    for k in range(4):
        p.grad = side.randn(50)
        if k == 2:
            p.data = side.randn(50)
        side.step(opt)


def f5_grad_aliases_param(side):
    """F5: the grad moves onto its own param's memory (AdamW decays it first)."""
    p = _leaf(side, 40)
    opt = side.make("AdamW", [p], lr=0.01, weight_decay=0.5)
    for k in range(4):
        p.grad = p.data if k >= 2 else side.randn(40)
        side.step(opt)


def f6_fresh_buffer(side):
    """F6: the momentum buffer made at the first step is not fresh at the second."""
    p = _leaf(side, 30)
    opt = side.make("SGD", [p], lr=0.1, momentum=0.9, dampening=0.3)
    for _ in range(3):
        p.grad = side.randn(30)
        side.step(opt)


SAFE = {
    "f1_metadata": [f1_grad_layout, f1_state_shape],
    "f2_addresses": [f2_param_swapped],
    "f5_grad_overlaps": [f5_grad_aliases_param],
    "f6_flags": [f6_fresh_buffer],
}
CASES = [pytest.param(fact, fn, id=f"{fact}-{fn.__name__}")
         for fact, fns in SAFE.items() for fn in fns]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("fact,scenario", CASES)
def test_with_the_rule_the_scenario_matches_torch(fact, scenario, backend):
    skip_unless_runnable(backend)
    assert_same(scenario, backend)


@pytest.mark.parametrize("fact,scenario", CASES)
def test_without_that_fact_the_scenario_goes_wrong(fact, scenario, monkeypatch):
    monkeypatch.setattr(_facts, fact, lambda *args: True)
    with pytest.raises(AssertionError):
        assert_same(scenario, "numba")


def test_every_fact_of_the_rule_has_a_mutation_test():
    facts = {n for n in dir(_facts) if n[:2] in {"f1", "f2", "f3", "f4", "f5", "f6"}
             and n[2] == "_"}
    assert facts == set(SAFE) | set(MEMORY)


# ---------------------------------------------------------------- F3, F4

MEMORY = ["f3_held_storages", "f4_grad_bounds"]


def _worker(fact, mode):
    here = os.path.dirname(__file__)
    out = subprocess.run([sys.executable, os.path.join(here, "_rule_worker.py"), fact, mode],
                         capture_output=True, text=True, timeout=300)
    lines = [line for line in out.stdout.splitlines() if line.startswith("{")]
    return json.loads(lines[-1]) if lines else {"crashed": out.returncode}


@pytest.mark.parametrize("fact", MEMORY)
def test_memory_facts_refuse_with_the_rule_and_not_without(fact):
    with_rule = _worker(fact, "on")
    assert with_rule == {"reached": True, "refused": True}
    without = _worker(fact, "off")
    # without the check nothing refuses: the kernel ran past the allocation
    # (and may have crashed the process doing so)
    assert without.get("crashed") or (without["reached"] and not without["refused"]), without


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_grad_whose_storage_shrank_is_refused(backend):
    skip_unless_runnable(backend)
    p = torch.randn(3000).requires_grad_()
    opt = fused_optim.Adam([p], backend=backend)
    for _ in range(2):
        p.grad = torch.randn(3000)
        opt.step()
    g = torch.randn(3000)
    g.untyped_storage().resize_(64)
    p.grad = g
    before = p.detach().clone()
    with pytest.raises(RuntimeError, match="gradient of parameter 0 lies outside its storage"):
        opt.step()
    assert torch.equal(p.detach(), before)
    assert float(opt.state[p]["step"]) == 2
