"""Every example trains to the same weights with torch.optim and with
fused_optim swapped in (float32 tolerance)."""

import contextlib
import importlib.util
import io
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch.optim.optimizer import register_optimizer_step_post_hook

import fused_optim

EXAMPLES_DIR = Path(__file__).resolve().parent.parent / "examples"
EXAMPLES = sorted(p.stem for p in EXAMPLES_DIR.glob("*.py"))
#: examples of fused_optim's own options (torch.optim has no counterpart to
#: run them against); each has its own test file
OWN_OPTIONS = {"bf16_precision", "bf16_state"}  # tests/test_precision.py, test_state_dtype.py
WORKFLOWS = [name for name in EXAMPLES if name not in OWN_OPTIONS]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    # the models are tiny: extra threads only add contention, and a fixed
    # count keeps torch's own reductions identical between the two runs
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(saved)


def _load(name):
    spec = importlib.util.spec_from_file_location(f"fused_optim_example_{name}",
                                                  EXAMPLES_DIR / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _train(module, patched):
    seen = set()
    hook = register_optimizer_step_post_hook(lambda opt, args, kwargs: seen.add(type(opt)))
    patch = fused_optim.patch_torch() if patched else contextlib.nullcontext()
    try:
        with patch, contextlib.redirect_stdout(io.StringIO()):
            state = module.main([])
    finally:
        hook.remove()
    return state, seen


def test_all_workflows_have_an_example():
    assert OWN_OPTIONS <= set(EXAMPLES)
    assert set(WORKFLOWS) == {
        "mobilenetv2_sgd_steplr", "grad_accumulation_warmup", "two_networks_param_groups",
        "checkpoint_resume", "early_stopping", "dropout_mlp"}
    readme = (EXAMPLES_DIR.parent / "README.md").read_text()
    for name in EXAMPLES:
        assert f"{name}.py" in readme


@pytest.mark.parametrize("name", WORKFLOWS)
def test_example_matches_torch_optim(name):
    module = _load(name)
    reference, torch_types = _train(module, patched=False)
    result, fused_types = _train(module, patched=True)

    assert torch_types and {t.__module__.split(".")[0] for t in torch_types} == {"torch"}
    assert fused_types and {t.__module__.split(".")[0] for t in fused_types} == {"fused_optim"}
    assert result.keys() == reference.keys()
    torch.testing.assert_close(result, reference)


def test_example_unmodified_under_fused_optim_run(tmp_path):
    # the path a user takes: `python -m fused_optim run x.py`, against the
    # same script's torch.optim result computed here
    name = "checkpoint_resume"
    try:
        import fused_optim.__main__  # noqa: F401
        runner = [sys.executable, "-m", "fused_optim", "run"]
    except ImportError:
        runner = [sys.executable, "-c",
                  "import sys, fused_optim._run as r; sys.exit(r.main(sys.argv[1:]))"]
    proc = subprocess.Popen(
        runner + [str(EXAMPLES_DIR / f"{name}.py"), "--save", str(tmp_path / "fused.pt")],
        cwd=tmp_path, env=dict(os.environ, OMP_NUM_THREADS="1"),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    reference, _ = _train(_load(name), patched=False)  # while the subprocess runs
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err
    assert "resumed at epoch 4" in out
    torch.testing.assert_close(torch.load(tmp_path / "fused.pt"), reference)
