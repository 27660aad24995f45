"""examples/bf16_precision.py, shortened: Kahan summation and stochastic
rounding keep a bfloat16 AdamW run next to the float32 one, where plain
round-to-nearest stores fall behind.

800 steps instead of the example's 4000: long enough that plain bfloat16 is
already clearly behind (~15% at this length, seeds 0-1) while both options
stay within ~0.7% of float32. The assertions are on that ordering,
with margin, not on the numbers. The reference kernels (backend='torch')
keep it fast and free of JIT compiles; the compiled backends' stores are
tested against the same specification (kernels/reference/_precision.py) in
their own tests.
"""

import importlib.util
from pathlib import Path

import pytest
import torch

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "bf16_precision.py"
STEPS, TAIL = 800, 100


def _load():
    spec = importlib.util.spec_from_file_location("fused_optim_example_bf16_precision", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def results():
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _load().compare(steps=STEPS, seed=0, device="cpu", backend="torch",
                               torch_baseline=False, tail=TAIL, log=lambda *a: None)
    finally:
        torch.set_num_threads(saved)


@pytest.mark.parametrize("measure", ["final", "eval"])
def test_options_stay_closer_to_fp32_than_plain_bf16(results, measure):
    fp32 = results["fp32"][measure]
    gap = {name: r[measure] / fp32 - 1.0 for name, r in results.items()}
    # plain bfloat16 falls behind float32 ...
    assert gap["bf16"] > 0.02, gap
    # ... and each option recovers most of it (0.3-0.7% here, against ~15%)
    for name in ("bf16+kahan", "bf16+sr"):
        assert abs(gap[name]) < gap["bf16"] / 4, (name, gap)
    # every run trained: well below the loss at the start
    for name, r in results.items():
        assert r["final"] < 0.75 * sum(r["losses"][:TAIL]) / TAIL, name


def test_same_init_and_data_for_every_variant(results):
    # the first step's loss is the shared init on the shared first batch
    # (bfloat16 rounding of the init moves it only slightly)
    first = {name: r["losses"][0] for name, r in results.items()}
    for name, loss in first.items():
        assert loss == pytest.approx(first["fp32"], rel=0.02), first
    assert first["bf16"] == first["bf16+kahan"] == first["bf16+sr"]
